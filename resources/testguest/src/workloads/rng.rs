//! `rng`: read entropy from a virtio-rng device (device ID 4, one request queue).
//!
//! Parameters: `tg.rng_bytes` (4096) bytes wanted, `tg.rng_chunk` (512) bytes per request,
//! `tg.rng_index` (0: the first entropy device on the command line), `tg.io_timeout_ms`
//! (5000) per request.
//!
//! Every request is one device-writable buffer. Before it is submitted the buffer holds canary
//! words (a function of their address); afterwards every whole 8-byte word inside the used
//! length must differ from its canary (the device wrote what it reported) and every byte past
//! the used length must still be the canary (it wrote nothing more). The data must look random:
//! not all zero, a byte histogram whose chi-square (255 degrees of freedom) is below 400 when
//! there are at least 2048 bytes, and no two 64-byte blocks equal.
//!
//! Prints `rng_device=<addr> irq=<n> features=<hex> queue_size=<n>`, `rng_bytes=<n>`,
//! `rng_requests=<n>`, `rng_chi2=<n>`, `rng_us=<n>` (for humans), then the result.

use super::{fnv1a, param, FNV_OFFSET};
use crate::bootinfo::BootInfo;
use crate::cmdline::Params;
use crate::dma::Arena;
use crate::virtio::{Chain, Device, Queue};
use crate::{exit, io, phys, time};

/// virtio device ID of an entropy source (5.4).
const DEVICE_ID_RNG: u32 = 4;
/// Consecutive empty answers tolerated before giving up.
const MAX_EMPTY: u32 = 100;
const BLOCK: u64 = 64;
const CHI2_LIMIT: u64 = 400;
const CHI2_MIN_BYTES: u64 = 2048;

fn canary(addr: u64) -> u64 {
    let mut z = addr ^ 0xca4a_57a1_de57_0000;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn canary_byte(addr: u64) -> u8 {
    canary(addr & !7).to_le_bytes()[(addr & 7) as usize]
}

/// An entropy device set up and ready.
pub struct Rng {
    /// The device.
    pub dev: Device,
    /// Its request queue.
    pub queue: Queue,
}

/// Finds, initialises and starts the `index`-th entropy device.
pub fn open(params: &Params<'_>, arena: &mut Arena, index: u64, timeout: u64) -> Rng {
    let mut dev = match Device::find(params, DEVICE_ID_RNG, index) {
        Ok(d) => d,
        Err(e) => exit::fail(format_args!("rng device: {e}")),
    };
    if let Err(e) = dev.init(0, timeout) {
        exit::fail(format_args!("rng init: {e}"));
    }
    let queue = match dev.queue(arena, 0, 64) {
        Ok(q) => q,
        Err(e) => exit::fail(format_args!("rng queue: {e}")),
    };
    dev.driver_ok();
    Rng { dev, queue }
}

/// Runs the workload.
pub fn run(info: &BootInfo, params: &Params<'_>) -> ! {
    let want = param(params, "rng_bytes", 4096);
    let chunk = param(params, "rng_chunk", 512).clamp(1, u64::from(u32::MAX));
    let index = param(params, "rng_index", 0);
    let timeout_ms = param(params, "io_timeout_ms", 5000);
    let (khz, _) = time::tsc_khz();
    let timeout = timeout_ms.saturating_mul(khz);
    let Some(mut arena) = Arena::new(info) else {
        exit::fail(format_args!("no RAM for the rng buffers"))
    };
    let mut rng = open(params, &mut arena, index, timeout);
    crate::tg!(
        "rng_device={:#x} irq={} features={:#x} queue_size={}",
        rng.dev.base(),
        rng.dev.irq,
        rng.dev.features,
        rng.queue.size()
    );
    let blocks = want / BLOCK;
    let Some(buf) = arena.alloc(want.max(1), 4096) else {
        exit::fail(format_args!("no RAM for {want} bytes of entropy"))
    };
    let Some(hashes) = arena.alloc(blocks.max(1) * 8, 8) else {
        exit::fail(format_args!("no RAM for the block hashes"))
    };
    for w in (0..want.div_ceil(8)).map(|i| buf + i * 8) {
        phys::write_u64(w, canary(w));
    }

    let start = io::rdtsc();
    let (mut pos, mut requests, mut empty) = (0u64, 0u64, 0u32);
    while pos < want {
        let ask = chunk.min(want - pos) as u32;
        let mut chain = Chain::new();
        if let Err(e) = chain.writable(buf + pos, ask) {
            exit::fail(format_args!("rng chain: {e}"));
        }
        let len = match rng.queue.transact(&chain, timeout) {
            Ok(len) => len,
            Err(e) => exit::fail(format_args!("rng request {requests}: {e}")),
        };
        requests += 1;
        if len > ask {
            exit::fail(format_args!("rng used length {len} above the {ask} asked"));
        }
        check_filled(buf + pos, u64::from(len), u64::from(ask));
        if len == 0 {
            empty += 1;
            if empty > MAX_EMPTY {
                exit::fail(format_args!("rng returned no data {MAX_EMPTY} times"));
            }
        } else {
            empty = 0;
        }
        pos += u64::from(len);
    }
    let us = io::rdtsc().wrapping_sub(start) * 1000 / khz.max(1);

    // SAFETY: `buf` and `hashes` are arena allocations of these lengths, disjoint, and the
    // device has returned every buffer it was given (each request completed before the next).
    let data = unsafe { phys::bytes_mut(buf, want as usize) };
    // SAFETY: as above; `hashes` holds `blocks` u64 slots, 8-byte aligned.
    let hashes = unsafe { core::slice::from_raw_parts_mut(hashes as *mut u64, blocks as usize) };
    let chi2 = check_random(data, hashes);
    crate::tg!("rng_bytes={pos}");
    crate::tg!("rng_requests={requests}");
    crate::tg!("rng_chi2={chi2}");
    crate::tg!("rng_us={us}");
    exit::pass()
}

/// Checks that the device wrote the `len` bytes it reported at `addr` (whole words differ from
/// their canaries) and nothing in `[addr + len, addr + asked)`.
fn check_filled(addr: u64, len: u64, asked: u64) {
    let end = addr + len;
    let mut w = addr.next_multiple_of(8);
    while w + 8 <= end {
        if phys::read_u64(w) == canary(w) {
            exit::fail(format_args!("rng left the word at {w:#x} unwritten"));
        }
        w += 8;
    }
    for a in end..addr + asked {
        if phys::read_u8(a) != canary_byte(a) {
            exit::fail(format_args!(
                "rng wrote at {a:#x}, past the used length {len}"
            ));
        }
    }
}

/// Fails unless `data` looks random; returns the histogram's chi-square.
fn check_random(data: &[u8], hashes: &mut [u64]) -> u64 {
    if data.iter().all(|&b| b == 0) {
        exit::fail(format_args!("rng data is all zero"));
    }
    let mut counts = [0u64; 256];
    for &b in data {
        counts[usize::from(b)] += 1;
    }
    let n = data.len() as u64;
    // chi2 = sum((c - n/256)^2 / (n/256)) = 256 * sum(c^2) / n - n
    let sum_sq: u64 = counts.iter().map(|c| c * c).sum();
    let chi2 = (256 * sum_sq)
        .checked_div(n)
        .map_or(0, |v| v.saturating_sub(n));
    if n >= CHI2_MIN_BYTES && chi2 > CHI2_LIMIT {
        exit::fail(format_args!(
            "rng byte histogram chi2={chi2} above {CHI2_LIMIT}"
        ));
    }
    for (h, block) in hashes.iter_mut().zip(data.chunks_exact(BLOCK as usize)) {
        *h = fnv1a(FNV_OFFSET, block);
    }
    hashes.sort_unstable();
    if let Some(pair) = hashes.windows(2).find(|p| p[0] == p[1]) {
        // Equal hashes: compare the blocks themselves before calling it a repeat.
        let h = pair[0];
        let mut same = data
            .chunks_exact(BLOCK as usize)
            .filter(|b| fnv1a(FNV_OFFSET, b) == h);
        if let (Some(a), Some(b)) = (same.next(), same.next()) {
            if a == b {
                exit::fail(format_args!("rng data repeats a 64-byte block"));
            }
        }
    }
    chi2
}
