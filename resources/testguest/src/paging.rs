//! Maps RAM above 4 GiB (the entry code's static tables cover only the first 4 GiB).
//!
//! Runs in ring 3: the page tables are user-accessible memory. Only not-present entries are
//! filled, which the TLB never caches, so no invalidation is needed.

use crate::bootinfo::BootInfo;
use crate::entry;
use crate::phys;

const GIB: u64 = 1 << 30;
const PDE_2M: u64 = 0x87; // present, writable, user, 2 MiB page
const PDPTE_TABLE: u64 = 0x7; // present, writable, user

/// End (exclusive) of the identity map after [`map_high_ram`].
pub fn mapped_end() -> u64 {
    phys::STATIC_MAP_END + entry::PD_POOL_LEN as u64 * GIB
}

/// Maps every RAM entry above 4 GiB (up to [`mapped_end`]) with 2 MiB pages.
pub fn map_high_ram(info: &BootInfo) {
    let pdpt = entry::pdpt_addr();
    let pool = entry::pd_pool_addr();
    for e in info.ram() {
        let start = e.addr.max(phys::STATIC_MAP_END) & !(GIB - 1);
        let end = e.end().min(mapped_end());
        let mut gib = start;
        while gib < end {
            let slot = gib / GIB; // PDPT index (4..)
            let pd = pool + (slot - 4) * 4096;
            if phys::read_u64(pdpt + slot * 8) == 0 {
                for i in 0..512 {
                    phys::write_u64(pd + i * 8, (gib + i * (2 << 20)) | PDE_2M);
                }
                phys::write_u64(pdpt + slot * 8, pd | PDPTE_TABLE);
            }
            gib += GIB;
        }
    }
}
