//! Helpers shared by the unit tests of this crate.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::memory::guest_memory_regions;

/// Guest memory of `size` bytes laid out exactly as the VMM lays it out.
pub(crate) fn guest_mem(size: u64) -> GuestMemoryMmap {
    let regions: Vec<(GuestAddress, usize)> = guest_memory_regions(size).unwrap();
    GuestMemoryMmap::from_ranges(&regions).unwrap()
}

/// Opens /dev/kvm, or explains on stderr why a KVM test is skipped (only when it is missing).
pub(crate) fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED {test}: /dev/kvm is missing on this host");
        return None;
    }
    Some(kvm_ioctls::Kvm::new().expect("/dev/kvm exists but cannot be opened"))
}
