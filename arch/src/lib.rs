//! x86_64 boot support for anvil microVMs.
//!
//! This crate owns everything the guest finds when its boot vCPU starts: the guest physical
//! memory map and its E820 description, the Linux zero page and the PVH start info, the boot
//! GDT, IDT and identity page tables, the initial register, FPU and MSR state, the CPUID the
//! vCPUs see (topology and custom CPU templates), and the MP and ACPI tables. It knows nothing
//! about devices, threads or the API: the VMM calls these functions with guest memory and vCPU
//! file descriptors it owns.

#![warn(missing_docs)]

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod template;

#[cfg(test)]
pub(crate) mod test_utils;
