//! `memtest`: fill usable RAM with a seeded pattern, dirty pages in rounds, verify.
//!
//! Parameters: `tg.seed` (default 1), `tg.rounds` (default 3, 0 = forever), `tg.dirty_pages`
//! (default 256 per round), `tg.dirty_rate` (pages/s, optional), `tg.mem_limit_mib` (optional).
//! Output: `TG memtest pages=<n>`, `TG checksum=<16 hex>`, per round
//! `TG round=<r> checksum=<16 hex>`, then `TG verify=ok` (pass) or `TG verify=bad addr=<hex>`.
//!
//! Tested memory is RAM from the memory map at or above 1 MiB, minus the guest image (which holds
//! stacks and page tables) and minus a table of per-page generations carved from the first
//! tested range. Page `p` at generation `g` holds words `base(seed, addr, g) + i * STEP`.
//! A page's hash is position-sensitive (Fletcher-like sums over its words) and the checksum is
//! the wrapping sum of page hashes, so a round updates it incrementally from the memory it reads.

use super::{param, param_opt};
use crate::bootinfo::BootInfo;
use crate::cmdline::Params;
use crate::{entry, exit, io, paging, phys, time};

const PAGE: u64 = 4096;
const WORDS: usize = 512;
const LOW_SKIP: u64 = 1 << 20;
const MAX_RANGES: usize = 160;
const STEP: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64 finaliser.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn page_base(seed: u64, addr: u64, gen: u32) -> u64 {
    mix64(seed ^ mix64(addr ^ (u64::from(gen) << 44)))
}

fn fill(page: &mut [u64; WORDS], base: u64) {
    let mut v = base;
    for w in page.iter_mut() {
        *w = v;
        v = v.wrapping_add(STEP);
    }
}

fn hash(page: &[u64; WORDS], addr: u64) -> u64 {
    let (mut s1, mut s2) = (0u64, 0u64);
    for &w in page.iter() {
        s1 = s1.wrapping_add(w);
        s2 = s2.wrapping_add(s1);
    }
    mix64(s1 ^ s2.rotate_left(32) ^ addr)
}

/// First word that differs from the expected pattern, as a byte address.
fn first_mismatch(page: &[u64; WORDS], addr: u64, base: u64) -> Option<u64> {
    let mut v = base;
    for (i, &w) in page.iter().enumerate() {
        if w != v {
            return Some(addr + i as u64 * 8);
        }
        v = v.wrapping_add(STEP);
    }
    None
}

/// The tested pages: disjoint page-aligned ranges.
struct Pages {
    ranges: [(u64, u64); MAX_RANGES],
    len: usize,
    total: u64,
}

impl Pages {
    fn new() -> Self {
        Pages {
            ranges: [(0, 0); MAX_RANGES],
            len: 0,
            total: 0,
        }
    }

    fn push(&mut self, start: u64, end: u64, limit: u64) {
        let start = start.next_multiple_of(PAGE);
        let end = end & !(PAGE - 1);
        if end <= start || self.len == MAX_RANGES || self.total >= limit {
            return;
        }
        let room = (limit - self.total).saturating_mul(PAGE);
        let end = end.min(start.saturating_add(room));
        self.ranges[self.len] = (start, end);
        self.len += 1;
        self.total += (end - start) / PAGE;
    }

    fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges[..self.len]
    }

    /// Address of page `idx` (counting across ranges).
    fn addr(&self, mut idx: u64) -> u64 {
        for &(s, e) in self.ranges() {
            let n = (e - s) / PAGE;
            if idx < n {
                return s + idx * PAGE;
            }
            idx -= n;
        }
        0
    }

    fn for_each(&self, mut f: impl FnMut(u64, u64)) {
        let mut idx = 0;
        for &(s, e) in self.ranges() {
            let mut a = s;
            while a < e {
                f(idx, a);
                idx += 1;
                a += PAGE;
            }
        }
    }
}

/// Collects RAM >= 1 MiB outside the image and below the mapped end, capped to `limit` pages.
fn collect(info: &BootInfo, limit: u64) -> Pages {
    let (img_start, img_end) = entry::image_range();
    let mapped = paging::mapped_end();
    let mut pages = Pages::new();
    for e in info.ram() {
        let start = e.addr.max(LOW_SKIP);
        let end = e.end().min(mapped);
        if start >= end {
            continue;
        }
        // Remove the image [img_start, img_end) from [start, end).
        pages.push(start, end.min(img_start), limit);
        pages.push(start.max(img_end), end, limit);
    }
    pages
}

/// The generation table lives in the first pages of the first range large enough for it.
struct Generations {
    addr: u64,
}

impl Generations {
    fn get(&self, idx: u64) -> u32 {
        phys::read_u32(self.addr + idx * 4)
    }

    fn set(&self, idx: u64, gen: u32) {
        let word = self.addr + ((idx * 4) & !7);
        let old = phys::read_u64(word);
        let shift = (idx & 1) * 32;
        let new = (old & !(0xffff_ffffu64 << shift)) | (u64::from(gen) << shift);
        phys::write_u64(word, new);
    }
}

fn carve_generations(pages: &mut Pages) -> Option<Generations> {
    let need = (pages.total * 4).div_ceil(PAGE).max(1);
    let slot = pages.ranges[..pages.len]
        .iter_mut()
        .find(|(s, e)| (*e - *s) / PAGE > need)?;
    let addr = slot.0;
    slot.0 += need * PAGE;
    pages.total -= need;
    for i in 0..need * PAGE / 8 {
        phys::write_u64(addr + i * 8, 0);
    }
    Some(Generations { addr })
}

fn page(addr: u64) -> &'static mut [u64; WORDS] {
    // SAFETY: `addr` comes from `Pages`, built from RAM entries of the memory map above 1 MiB,
    // below the mapped end, outside the guest image and outside the generation table; pages are
    // 4 KiB aligned and each borrow ends before the next one is taken.
    unsafe { phys::page_mut(addr) }
}

/// Runs the workload.
pub fn run(info: &BootInfo, params: &Params<'_>) -> ! {
    let seed = param(params, "seed", 1);
    let rounds = param(params, "rounds", 3);
    let dirty_pages = param(params, "dirty_pages", 256);
    let dirty_rate = param_opt(params, "dirty_rate");
    let limit = param_opt(params, "mem_limit_mib").map_or(u64::MAX, |m| m.saturating_mul(256));

    let mut pages = collect(info, limit);
    let Some(gens) = carve_generations(&mut pages) else {
        exit::fail(format_args!("memtest found no RAM to test"))
    };
    if pages.total == 0 {
        exit::fail(format_args!("memtest found no RAM to test"))
    }
    let mut checksum = 0u64;
    pages.for_each(|_, addr| {
        let p = page(addr);
        fill(p, page_base(seed, addr, 0));
        checksum = checksum.wrapping_add(hash(p, addr));
    });
    crate::tg!("memtest pages={}", pages.total);
    crate::tg!("checksum={checksum:016x}");

    let ticks_per_page = dirty_rate.filter(|&r| r > 0).map(|rate| {
        let (khz, source) = time::tsc_khz();
        crate::tg!("tsc_khz={khz} source={}", source.name());
        (khz * 1000 / rate).max(1)
    });
    let mut deadline = io::rdtsc();
    let mut round = 1u64;
    while rounds == 0 || round <= rounds {
        let gen = u32::try_from(round).unwrap_or(u32::MAX);
        for j in 0..dirty_pages {
            if let Some(t) = ticks_per_page {
                deadline = deadline.wrapping_add(t);
                time::wait_until(deadline);
            }
            let idx = mix64(seed ^ mix64((round << 32) ^ j ^ 0x5eed)) % pages.total;
            let addr = pages.addr(idx);
            let p = page(addr);
            checksum = checksum.wrapping_sub(hash(p, addr));
            fill(p, page_base(seed, addr, gen));
            checksum = checksum.wrapping_add(hash(p, addr));
            gens.set(idx, gen);
        }
        crate::tg!("round={round} checksum={checksum:016x}");
        round += 1;
    }

    let mut bad = None;
    pages.for_each(|idx, addr| {
        if bad.is_none() {
            bad = first_mismatch(page(addr), addr, page_base(seed, addr, gens.get(idx)));
        }
    });
    match bad {
        None => {
            crate::tg!("verify=ok");
            exit::pass()
        }
        Some(addr) => {
            crate::tg!("verify=bad addr={addr:#x}");
            exit::fail(format_args!("memtest verify failed at {addr:#x}"))
        }
    }
}
