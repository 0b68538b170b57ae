//! Helpers shared by the unit tests of this crate.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::memory::guest_memory_regions;

/// Guest memory of `size` bytes laid out exactly as the VMM lays it out.
pub(crate) fn guest_mem(size: u64) -> GuestMemoryMmap {
    let regions: Vec<(GuestAddress, usize)> = guest_memory_regions(size).unwrap();
    GuestMemoryMmap::from_ranges(&regions).unwrap()
}
