//! Guest memory: allocation per the arch memory map, and registration with KVM.

use devices::GuestMemoryMmap;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

/// Errors of guest memory setup.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The memory map for the size is invalid.
    #[error("invalid guest memory layout")]
    Layout(#[source] arch::memory::MemoryError),
    /// Mapping the memory failed.
    #[error("cannot allocate guest memory")]
    Allocate(#[source] vm_memory::mmap::FromRangesError),
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {slot}")]
    SetRegion {
        /// The slot number.
        slot: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Allocates `mem_size_mib` of guest RAM laid out around the 32-bit MMIO hole.
pub fn create_guest_memory(mem_size_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    // The configuration caps the size far below u64 overflow (`MAX_MEM_SIZE_MIB`).
    let size = mem_size_mib.saturating_mul(1 << 20);
    let regions = arch::memory::guest_memory_regions(size).map_err(MemoryError::Layout)?;
    GuestMemoryMmap::from_ranges(&regions).map_err(MemoryError::Allocate)
}

/// Registers every region of `mem` with the VM as a KVM memory slot (slot N is region N);
/// with `track_dirty`, KVM logs the pages the guest writes (for diff snapshots).
pub fn register_with_kvm(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    track_dirty: bool,
) -> Result<(), MemoryError> {
    for (index, region) in mem.iter().enumerate() {
        let slot = u32::try_from(index).expect("a guest has at most a handful of memory regions");
        let kvm_region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: if track_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VM keeps for as long
        // as the VM fd exists; slots are numbered uniquely by region index.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::SetRegion { slot, source })?;
    }
    Ok(())
}
