//! Workloads selected by `tg.run=<name>`; each ends the run itself (pass, fail or forever).

pub mod blk;
pub mod counter;
pub mod hello;
pub mod hostile;
pub mod hostile_virtio;
pub mod irq;
pub mod memtest;
pub mod net;
pub mod rng;
pub mod vsock;

use crate::cmdline::Params;
use crate::exit;

/// A numeric parameter or a failure naming it.
pub fn param(params: &Params<'_>, key: &'static str, default: u64) -> u64 {
    match params.u64_or(key, default) {
        Ok(v) => v,
        Err(k) => exit::fail(format_args!("bad parameter tg.{k}")),
    }
}

/// An optional numeric parameter or a failure naming it.
pub fn param_opt(params: &Params<'_>, key: &'static str) -> Option<u64> {
    match params.u64_opt(key) {
        Ok(v) => v,
        Err(k) => exit::fail(format_args!("bad parameter tg.{k}")),
    }
}

/// FNV-1a's 64-bit offset basis: the hash of no bytes.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Continues a 64-bit FNV-1a hash `h` over `data` (start from [`FNV_OFFSET`]).
pub fn fnv1a(h: u64, data: &[u8]) -> u64 {
    data.iter().fold(h, |acc, &b| {
        (acc ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
