//! Anvil's device models. Devices see only offsets within their own registered range (the
//! [`bus::BusDevice`] trait) and know nothing of the VMM, its threads or its API; what they
//! need from the VMM (an interrupt line, an exit event) arrives in their constructor.
#![warn(missing_docs)]

pub mod bus;
pub mod legacy;
pub mod log;
pub mod metrics;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
