//! Rate-limited logging for events a guest can trigger at will: the first few of each call
//! site are logged, then one in every [`EVERY`], each with the running count, so a hostile
//! guest cannot flood the VMM's log.

use std::sync::atomic::{AtomicU64, Ordering};

/// Occurrences of a call site logged before rate limiting starts.
pub const FIRST: u64 = 10;
/// After the first few, one occurrence in this many is logged.
pub const EVERY: u64 = 1000;

/// Counts one occurrence at a call site; returns the count if this one should be logged.
pub fn should_log(counter: &AtomicU64) -> Option<u64> {
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    (n <= FIRST || n.is_multiple_of(EVERY)).then_some(n)
}

/// `tracing::warn!`, rate-limited per call site; the event carries `count`, the number of
/// occurrences so far.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static COUNT: ::std::sync::atomic::AtomicU64 = ::std::sync::atomic::AtomicU64::new(0);
        if let Some(count) = $crate::log::should_log(&COUNT) {
            ::tracing::warn!(count, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_few_and_then_one_in_every_thousand_are_logged() {
        let counter = AtomicU64::new(0);
        let logged: Vec<u64> = (0..5000).filter_map(|_| should_log(&counter)).collect();
        let mut want: Vec<u64> = (1..=FIRST).collect();
        want.extend([1000, 2000, 3000, 4000, 5000]);
        assert_eq!(logged, want);
    }
}
