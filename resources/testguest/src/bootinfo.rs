//! Boot information: the Linux zero page (`struct boot_params`) or PVH `struct hvm_start_info`.
//!
//! Read in ring 3 (the memory is identity-mapped and user-accessible) and copied into a
//! [`BootInfo`] so that workloads may overwrite low memory afterwards.

use crate::entry::{self, Protocol};
use crate::phys;

/// Longest command line we copy.
pub const CMDLINE_MAX: usize = 4096;
/// Most memory-map entries we keep (the zero page holds at most 128).
pub const MEMMAP_MAX: usize = 128;
/// E820 / PVH memory type of usable RAM.
pub const MEM_TYPE_RAM: u32 = 1;

// struct boot_params offsets (Documentation/arch/x86/zero-page.rst, boot.rst).
const BP_E820_ENTRIES: u64 = 0x1e8;
const BP_BOOT_FLAG: u64 = 0x1fe;
const BP_HEADER: u64 = 0x202;
const BP_TYPE_OF_LOADER: u64 = 0x210;
const BP_CMD_LINE_PTR: u64 = 0x228;
const BP_CMDLINE_SIZE: u64 = 0x238;
const BP_E820_TABLE: u64 = 0x2d0;
const E820_ENTRY_SIZE: u64 = 20;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"

// struct hvm_start_info offsets (xen/include/public/arch-x86/hvm/start_info.h).
const SI_MAGIC: u64 = 0;
const SI_VERSION: u64 = 4;
const SI_CMDLINE_PADDR: u64 = 24;
const SI_RSDP_PADDR: u64 = 32;
const SI_MEMMAP_PADDR: u64 = 40;
const SI_MEMMAP_ENTRIES: u64 = 48;
const PVH_MEMMAP_ENTRY_SIZE: u64 = 24;
const PVH_START_MAGIC: u32 = 0x336e_c578;

/// One memory-map entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type (1 = RAM).
    pub kind: u32,
}

impl MemEntry {
    /// End address (exclusive), saturating.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// What the boot protocol told us.
#[derive(Debug)]
pub struct BootInfo {
    /// Entry protocol.
    pub protocol: Protocol,
    /// Address of the zero page or start_info.
    pub ptr: u64,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    memmap: [MemEntry; MEMMAP_MAX],
    memmap_len: usize,
    /// RSDP address from start_info (PVH); Linux64 searches the BIOS area.
    pub rsdp: Option<u64>,
    /// The first problem with the zero page / start_info header, if any.
    pub header_error: Option<&'static str>,
}

impl BootInfo {
    /// Reads the boot information the entry code recorded.
    pub fn read() -> Self {
        let mut info = BootInfo {
            protocol: entry::protocol(),
            ptr: entry::boot_info_ptr(),
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            memmap: [MemEntry::default(); MEMMAP_MAX],
            memmap_len: 0,
            rsdp: None,
            header_error: None,
        };
        if info.ptr == 0 || info.ptr >= phys::STATIC_MAP_END - 0x1000 {
            info.header_error = Some("boot info pointer out of range");
            return info;
        }
        match info.protocol {
            Protocol::Linux64 => info.read_zero_page(),
            Protocol::Pvh => info.read_start_info(),
        }
        info
    }

    fn read_zero_page(&mut self) {
        let zp = self.ptr;
        if phys::read_u16(zp + BP_BOOT_FLAG) != BOOT_FLAG_MAGIC {
            self.header_error = Some("zero page boot_flag is not 0xaa55");
        } else if phys::read_u32(zp + BP_HEADER) != HDRS_MAGIC {
            self.header_error = Some("zero page header is not HdrS");
        } else if phys::read_u8(zp + BP_TYPE_OF_LOADER) == 0 {
            self.header_error = Some("zero page type_of_loader is 0");
        }
        let n = u64::from(phys::read_u8(zp + BP_E820_ENTRIES));
        if n as usize > MEMMAP_MAX {
            self.set_error("zero page e820_entries above 128");
        }
        for i in 0..n.min(MEMMAP_MAX as u64) {
            let e = zp + BP_E820_TABLE + i * E820_ENTRY_SIZE;
            self.push_mem(MemEntry {
                addr: phys::read_u64(e),
                size: phys::read_u64(e + 8),
                kind: phys::read_u32(e + 16),
            });
        }
        let cmd = u64::from(phys::read_u32(zp + BP_CMD_LINE_PTR));
        let size = phys::read_u32(zp + BP_CMDLINE_SIZE) as usize;
        if cmd != 0 {
            // cmdline_size excludes the terminating NUL; 0 (old loaders) means "unknown".
            let max = if size == 0 {
                CMDLINE_MAX
            } else {
                size.min(CMDLINE_MAX)
            };
            self.cmdline_len = phys::read_cstr(cmd, max, &mut self.cmdline);
        }
    }

    fn read_start_info(&mut self) {
        let si = self.ptr;
        if phys::read_u32(si + SI_MAGIC) != PVH_START_MAGIC {
            self.header_error = Some("start_info magic is not 0x336ec578");
            return;
        }
        let version = phys::read_u32(si + SI_VERSION);
        let cmd = phys::read_u64(si + SI_CMDLINE_PADDR);
        if cmd != 0 && cmd < phys::STATIC_MAP_END {
            self.cmdline_len = phys::read_cstr(cmd, CMDLINE_MAX, &mut self.cmdline);
        }
        let rsdp = phys::read_u64(si + SI_RSDP_PADDR);
        if rsdp != 0 {
            self.rsdp = Some(rsdp);
        }
        if version < 1 {
            self.set_error("start_info version 0 has no memory map");
            return;
        }
        let map = phys::read_u64(si + SI_MEMMAP_PADDR);
        let n = u64::from(phys::read_u32(si + SI_MEMMAP_ENTRIES));
        if map == 0 || map >= phys::STATIC_MAP_END {
            self.set_error("start_info memmap_paddr out of range");
            return;
        }
        if n as usize > MEMMAP_MAX {
            self.set_error("start_info memmap_entries above 128");
        }
        for i in 0..n.min(MEMMAP_MAX as u64) {
            let e = map + i * PVH_MEMMAP_ENTRY_SIZE;
            self.push_mem(MemEntry {
                addr: phys::read_u64(e),
                size: phys::read_u64(e + 8),
                kind: phys::read_u32(e + 16),
            });
        }
    }

    fn set_error(&mut self, why: &'static str) {
        if self.header_error.is_none() {
            self.header_error = Some(why);
        }
    }

    fn push_mem(&mut self, e: MemEntry) {
        if let Some(slot) = self.memmap.get_mut(self.memmap_len) {
            *slot = e;
            self.memmap_len += 1;
        }
    }

    /// The command line, verbatim.
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// The memory map as given.
    pub fn memmap(&self) -> &[MemEntry] {
        &self.memmap[..self.memmap_len]
    }

    /// RAM entries only.
    pub fn ram(&self) -> impl Iterator<Item = &MemEntry> {
        self.memmap().iter().filter(|e| e.kind == MEM_TYPE_RAM)
    }

    /// Total usable RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram().fold(0u64, |acc, e| acc.saturating_add(e.size))
    }
}

/// Start of the MMIO hole that must not contain RAM.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;

/// Checks that the map is sorted, non-overlapping, has RAM and keeps RAM out of the MMIO hole.
///
/// Empty entries are ignored, as Linux's `e820__update_table` does (QEMU's PVH map ends with one).
pub fn check_memmap(map: &[MemEntry]) -> Result<(), &'static str> {
    if !map.iter().any(|e| e.kind == MEM_TYPE_RAM && e.size > 0) {
        return Err("memory map has no RAM");
    }
    let mut prev: Option<&MemEntry> = None;
    for e in map.iter().filter(|e| e.size > 0) {
        if let Some(p) = prev {
            if e.addr < p.addr {
                return Err("memory map not sorted");
            }
            if e.addr < p.end() {
                return Err("memory map entries overlap");
            }
        }
        prev = Some(e);
    }
    for e in map.iter().filter(|e| e.kind == MEM_TYPE_RAM) {
        if e.addr.checked_add(e.size).is_none() {
            return Err("memory map entry wraps");
        }
        if e.addr < MMIO_HOLE_END && e.end() > MMIO_HOLE_START {
            return Err("RAM in the MMIO hole");
        }
    }
    Ok(())
}
