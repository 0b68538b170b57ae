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

/// Guest memory as every device and the VMM see it: each region carries a bitmap of the pages
/// written through it (by devices, and by the VMM itself), which KVM's dirty log cannot see.
/// Live migration sends those pages again.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// A slice of [`GuestMemoryMmap`] (writes through it can be marked in the region's bitmap).
pub type GuestSlice<'a> =
    vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;
