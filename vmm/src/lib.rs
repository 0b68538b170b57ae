//! Anvil's VMM core: it owns the KVM VM, the vCPU threads, guest memory, the devices and the
//! event loop. It knows nothing of HTTP or the command line: callers build a [`VmConfig`]
//! and hand it to [`Vmm::build`], then [`Vmm::run`] drives the guest until it stops.
#![warn(missing_docs)]

pub mod config;
pub mod controller;
pub mod device_manager;
pub mod file_pages;
pub mod kvm;
pub mod loader;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod resources;
pub mod rpc;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
mod vmm;

pub use config::{BootProtocolChoice, ConfigError, VmConfig};
pub use seccomp::SeccompLevel;
pub use vmm::{ApiContext, MemorySource, PreparedVm, RestoreTarget, VmOutcome, Vmm, VmmError};
