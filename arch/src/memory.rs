//! Guest RAM regions, initrd placement and the E820 map.
//!
//! RAM starts at guest physical address 0 and runs up to the 32-bit MMIO hole at
//! [`MMIO32_START`]; whatever does not fit below the hole continues at 4 GiB.

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{
    BIOS_AREA_END, BIOS_AREA_START, EBDA_END, EBDA_START, FIRST_ADDR_PAST_32BITS, HIMEM_START,
    MMIO32_START,
};

/// Guest page size; RAM sizes and initrd addresses are multiples of it.
pub const PAGE_SIZE: u64 = 0x1000;

/// Smallest guest RAM we accept: 16 MiB. The fixed low-memory layout (boot structures, command
/// line, MP and ACPI tables) takes the first MiB and a kernel is loaded at [`HIMEM_START`]; a
/// relocatable bzImage wants its 16 MiB `kernel_alignment`, so less RAM cannot boot Linux.
pub const MIN_MEM_SIZE_BYTES: u64 = 16 << 20;

/// Errors of the memory layout helpers.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    /// Zero bytes of RAM.
    #[error("guest memory size is zero")]
    ZeroSize,
    /// The size is not a multiple of the page size.
    #[error("guest memory size {0:#x} is not a multiple of 4 KiB")]
    Unaligned(u64),
    /// The size is below [`MIN_MEM_SIZE_BYTES`].
    #[error("guest memory size {size:#x} is below the minimum of {min:#x} bytes")]
    TooSmall {
        /// Requested size.
        size: u64,
        /// Smallest accepted size.
        min: u64,
    },
    /// The RAM above 4 GiB would end past the 64-bit address space or host `usize`.
    #[error("guest memory size {0:#x} does not fit in the address space")]
    TooLarge(u64),
    /// An empty initrd was given.
    #[error("initrd is empty")]
    EmptyInitrd,
    /// The guest has no RAM at address 0.
    #[error("guest memory has no low RAM region at address 0")]
    NoLowMemory,
    /// The initrd does not fit between the kernel and the highest address it may use.
    #[error(
        "initrd of {size:#x} bytes does not fit between the kernel end {kernel_end:#x} and \
         {ceiling:#x} (end of low RAM or the kernel's initrd_addr_max)"
    )]
    InitrdDoesNotFit {
        /// Initrd size in bytes.
        size: usize,
        /// First byte past the kernel.
        kernel_end: u64,
        /// First byte the initrd must not reach.
        ceiling: u64,
    },
}

/// Guest RAM regions for `mem_size_bytes` of RAM: [0, min(size, MMIO32_START)) and, for the
/// rest, [4 GiB, ..).
///
/// The size must be a non-zero multiple of 4 KiB and at least [`MIN_MEM_SIZE_BYTES`].
pub fn guest_memory_regions(
    mem_size_bytes: u64,
) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    if mem_size_bytes == 0 {
        return Err(MemoryError::ZeroSize);
    }
    if mem_size_bytes & (PAGE_SIZE - 1) != 0 {
        return Err(MemoryError::Unaligned(mem_size_bytes));
    }
    if mem_size_bytes < MIN_MEM_SIZE_BYTES {
        return Err(MemoryError::TooSmall {
            size: mem_size_bytes,
            min: MIN_MEM_SIZE_BYTES,
        });
    }
    let too_large = || MemoryError::TooLarge(mem_size_bytes);
    let low_size = mem_size_bytes.min(MMIO32_START);
    let mut regions = vec![(
        GuestAddress(0),
        usize::try_from(low_size).map_err(|_| too_large())?,
    )];
    let high_size = mem_size_bytes - low_size;
    if high_size > 0 {
        FIRST_ADDR_PAST_32BITS
            .checked_add(high_size)
            .ok_or_else(too_large)?;
        regions.push((
            GuestAddress(FIRST_ADDR_PAST_32BITS),
            usize::try_from(high_size).map_err(|_| too_large())?,
        ));
    }
    Ok(regions)
}

/// First byte past the RAM that starts at address 0, capped at the MMIO hole.
fn low_ram_end<M: GuestMemoryBackend>(mem: &M) -> Option<u64> {
    let region = mem.find_region(GuestAddress(0))?;
    let end = region.start_addr().raw_value().checked_add(region.len())?;
    Some(end.min(MMIO32_START))
}

/// Where to place an initrd of `size` bytes: page aligned, as high as possible below
/// min(end of low RAM, `initrd_addr_max` + 1), above `kernel_end`.
///
/// `initrd_addr_max` is the kernel's `setup_header.initrd_addr_max`, the highest address the
/// initrd may occupy; pass `0x7fff_ffff` (the protocol's default) when unknown.
pub fn initrd_load_addr<M: GuestMemoryBackend>(
    mem: &M,
    size: usize,
    kernel_end: u64,
    initrd_addr_max: u64,
) -> Result<GuestAddress, MemoryError> {
    if size == 0 {
        return Err(MemoryError::EmptyInitrd);
    }
    let ceiling = low_ram_end(mem)
        .ok_or(MemoryError::NoLowMemory)?
        .min(initrd_addr_max.saturating_add(1));
    let does_not_fit = MemoryError::InitrdDoesNotFit {
        size,
        kernel_end,
        ceiling,
    };
    let floor = kernel_end
        .max(HIMEM_START)
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or(does_not_fit.clone())?;
    let size_u64 = u64::try_from(size).map_err(|_| does_not_fit.clone())?;
    let start = ceiling
        .checked_sub(size_u64)
        .map(|top| top - top % PAGE_SIZE)
        .ok_or(does_not_fit.clone())?;
    if start < floor {
        return Err(does_not_fit);
    }
    Ok(GuestAddress(start))
}

/// Kind of an E820 range, with its numeric type from the ACPI address range types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM (`E820_TYPE_RAM`).
    Ram = 1,
    /// Reserved, not usable by the OS (`E820_TYPE_RESERVED`).
    Reserved = 2,
}

/// One E820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest physical address of the range.
    pub addr: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

impl E820Entry {
    /// First address past the range (saturating).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Where RAM may be reported: below the EBDA, from 1 MiB up to the MMIO hole, above 4 GiB.
const RAM_WINDOWS: [(u64, u64); 3] = [
    (0, EBDA_START),
    (HIMEM_START, MMIO32_START),
    (FIRST_ADDR_PAST_32BITS, u64::MAX),
];

/// The E820 map for the guest: RAM [0, EBDA_START), reserved [EBDA_START, 0xa0000), reserved
/// [BIOS_AREA_START, BIOS_AREA_END), RAM [HIMEM_START, end of low RAM), RAM above 4 GiB.
///
/// Sorted by address, non-overlapping, and without RAM in the MMIO hole.
pub fn e820_map<M: GuestMemoryBackend>(mem: &M) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: EBDA_START,
            size: EBDA_END - EBDA_START,
            kind: E820Kind::Reserved,
        },
        E820Entry {
            addr: BIOS_AREA_START,
            size: BIOS_AREA_END - BIOS_AREA_START,
            kind: E820Kind::Reserved,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start.saturating_add(region.len());
        for (win_start, win_end) in RAM_WINDOWS {
            let (s, e) = (start.max(win_start), end.min(win_end));
            if s < e {
                map.push(E820Entry {
                    addr: s,
                    size: e - s,
                    kind: E820Kind::Ram,
                });
            }
        }
    }
    map.sort_by_key(|e| e.addr);
    // Merge RAM ranges that touch (adjacent guest memory regions).
    let mut merged: Vec<E820Entry> = Vec::with_capacity(map.len());
    for entry in map {
        match merged.last_mut() {
            Some(last) if last.kind == entry.kind && last.end() == entry.addr => {
                last.size += entry.size;
            }
            _ => merged.push(entry),
        }
    }
    merged
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // anvil runs on 64-bit hosts only
mod tests {
    use super::*;
    use crate::test_utils::guest_mem;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_low_region() {
        let regions = guest_memory_regions(256 * MIB).unwrap();
        assert_eq!(regions, vec![(GuestAddress(0), (256 * MIB) as usize)]);
    }

    #[test]
    fn exactly_three_gib_is_one_low_region() {
        let regions = guest_memory_regions(3 * GIB).unwrap();
        assert_eq!(regions, vec![(GuestAddress(0), (3 * GIB) as usize)]);
    }

    #[test]
    fn one_page_past_the_hole_goes_above_4g() {
        let regions = guest_memory_regions(3 * GIB + PAGE_SIZE).unwrap();
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), MMIO32_START as usize),
                (GuestAddress(FIRST_ADDR_PAST_32BITS), PAGE_SIZE as usize)
            ]
        );
    }

    #[test]
    fn large_memory_splits_around_the_hole() {
        let regions = guest_memory_regions(8 * GIB).unwrap();
        assert_eq!(regions[0], (GuestAddress(0), MMIO32_START as usize));
        assert_eq!(
            regions[1],
            (GuestAddress(1 << 32), (8 * GIB - MMIO32_START) as usize)
        );
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert_eq!(guest_memory_regions(0), Err(MemoryError::ZeroSize));
        assert_eq!(
            guest_memory_regions(32 * MIB + 1),
            Err(MemoryError::Unaligned(32 * MIB + 1))
        );
        assert_eq!(
            guest_memory_regions(MIN_MEM_SIZE_BYTES - PAGE_SIZE),
            Err(MemoryError::TooSmall {
                size: MIN_MEM_SIZE_BYTES - PAGE_SIZE,
                min: MIN_MEM_SIZE_BYTES
            })
        );
        assert!(guest_memory_regions(MIN_MEM_SIZE_BYTES).is_ok());
        let huge = u64::MAX - PAGE_SIZE + 1;
        assert_eq!(guest_memory_regions(huge), Err(MemoryError::TooLarge(huge)));
    }

    fn assert_well_formed(map: &[E820Entry]) {
        for pair in map.windows(2) {
            assert!(
                pair[0].end() <= pair[1].addr,
                "overlap or unsorted: {map:?}"
            );
        }
        for e in map.iter().filter(|e| e.kind == E820Kind::Ram) {
            let in_hole = e.addr < FIRST_ADDR_PAST_32BITS && e.end() > MMIO32_START;
            assert!(!in_hole, "RAM in the MMIO hole: {e:?}");
            assert!(e.size > 0);
        }
    }

    #[test]
    fn e820_for_small_memory() {
        let mem = guest_mem(128 * MIB);
        let map = e820_map(&mem);
        assert_well_formed(&map);
        let expected = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Kind::Ram,
            },
            E820Entry {
                addr: EBDA_START,
                size: 0xa0000 - EBDA_START,
                kind: E820Kind::Reserved,
            },
            E820Entry {
                addr: 0xe0000,
                size: 0x20000,
                kind: E820Kind::Reserved,
            },
            E820Entry {
                addr: HIMEM_START,
                size: 128 * MIB - HIMEM_START,
                kind: E820Kind::Ram,
            },
        ];
        assert_eq!(map, expected);
    }

    #[test]
    fn e820_for_memory_above_4g() {
        // Regions only, no mapping needed: build the layout without touching 5 GiB of RAM.
        let mem = guest_mem(3 * GIB + 2 * PAGE_SIZE);
        let map = e820_map(&mem);
        assert_well_formed(&map);
        assert_eq!(map.len(), 5);
        assert_eq!(
            map[3],
            E820Entry {
                addr: HIMEM_START,
                size: MMIO32_START - HIMEM_START,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(
            map[4],
            E820Entry {
                addr: FIRST_ADDR_PAST_32BITS,
                size: 2 * PAGE_SIZE,
                kind: E820Kind::Ram
            }
        );
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let mem = guest_mem(64 * MIB);
        let addr = initrd_load_addr(&mem, 5 * MIB as usize + 3, 16 * MIB, 0x7fff_ffff).unwrap();
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert!(addr.raw_value() + 5 * MIB + 3 <= 64 * MIB);
        assert_eq!(addr.raw_value(), 64 * MIB - 5 * MIB - PAGE_SIZE);
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let mem = guest_mem(64 * MIB);
        let max = 32 * MIB - 1;
        let addr = initrd_load_addr(&mem, MIB as usize, 2 * MIB, max).unwrap();
        assert_eq!(addr.raw_value(), 31 * MIB);
    }

    #[test]
    fn initrd_stays_below_the_hole() {
        let mem = guest_mem(3 * GIB + PAGE_SIZE);
        let addr = initrd_load_addr(&mem, PAGE_SIZE as usize, 2 * MIB, u64::MAX).unwrap();
        assert_eq!(addr.raw_value(), MMIO32_START - PAGE_SIZE);
    }

    #[test]
    fn initrd_too_big_is_an_error() {
        let mem = guest_mem(32 * MIB);
        let err = initrd_load_addr(&mem, 20 * MIB as usize, 16 * MIB, 0x7fff_ffff).unwrap_err();
        assert_eq!(
            err,
            MemoryError::InitrdDoesNotFit {
                size: 20 * MIB as usize,
                kernel_end: 16 * MIB,
                ceiling: 32 * MIB
            }
        );
        assert!(initrd_load_addr(&mem, 64 * MIB as usize, 0, 0x7fff_ffff).is_err());
        assert_eq!(
            initrd_load_addr(&mem, 0, 0, 0x7fff_ffff),
            Err(MemoryError::EmptyInitrd)
        );
    }

    #[test]
    fn initrd_fits_exactly_above_an_unaligned_kernel_end() {
        let mem = guest_mem(32 * MIB);
        let kernel_end = 16 * MIB - 10;
        let addr = initrd_load_addr(&mem, 16 * MIB as usize, kernel_end, u64::MAX).unwrap();
        assert_eq!(addr.raw_value(), 16 * MIB);
        assert!(initrd_load_addr(&mem, 16 * MIB as usize + 1, kernel_end, u64::MAX).is_err());
    }
}
