//! `counter`: `TG count=<n>` every `tg.period_ms` ms (default 100), TSC-timed in ring 3, forever
//! or `tg.count=<N>` times then pass. First prints `TG tsc_khz=<n> source=<where from>`.

use super::{param, param_opt};
use crate::cmdline::Params;
use crate::{exit, io, time};

/// Runs the workload.
pub fn run(params: &Params<'_>) -> ! {
    let period_ms = param(params, "period_ms", 100);
    let count = param_opt(params, "count");
    let (khz, source) = time::tsc_khz();
    crate::tg!("tsc_khz={khz} source={}", source.name());
    let period = khz.saturating_mul(period_ms).max(1);
    let mut deadline = io::rdtsc();
    let mut n = 0u64;
    loop {
        if count.is_some_and(|c| n >= c) {
            exit::pass()
        }
        deadline = deadline.wrapping_add(period);
        time::wait_until(deadline);
        n += 1;
        crate::tg!("count={n}");
    }
}
