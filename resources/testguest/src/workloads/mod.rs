//! Workloads selected by `tg.run=<name>`; each ends the run itself (pass, fail or forever).

pub mod counter;
pub mod hello;
pub mod hostile;
pub mod irq;
pub mod memtest;

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
