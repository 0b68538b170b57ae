//! The boot-complete port: when the guest writes [`MAGIC`] to it, log how long the VMM took
//! from process start to that point, as Firecracker's boot timer does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::bus::BusDevice;

/// The value a guest writes to say it has booted (Firecracker's convention).
pub const MAGIC: u8 = 123;

/// CLOCK_MONOTONIC in microseconds, so that benchmarks can relate VMM events to their own
/// clock (a process's start `Instant` cannot be compared across processes).
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill in; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let micros = u64::try_from(ts.tv_nsec / 1000).unwrap_or(0);
    secs * 1_000_000 + micros
}

/// The boot timer device.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    /// Microseconds from start to the first boot signal, 0 until then.
    boot_time_us: Arc<AtomicU64>,
}

impl BootTimer {
    /// A timer measuring from `start` (taken when the VMM process started).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            boot_time_us: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Microseconds from start to the guest's first boot signal, 0 before it.
    pub fn boot_time_us(&self) -> Arc<AtomicU64> {
        self.boot_time_us.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&MAGIC) {
            return;
        }
        let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        // Only the first signal counts; a guest that reboots or repeats it changes nothing.
        if self
            .boot_time_us
            .compare_exchange(0, us.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!(
                monotonic_us = monotonic_us(),
                "Guest-boot-time = {us} us {} ms",
                us / 1000
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_value_records_the_boot_time_once() {
        let mut timer = BootTimer::new(Instant::now());
        let t = timer.boot_time_us();
        timer.write(0, &[1]);
        assert_eq!(t.load(Ordering::Relaxed), 0);
        timer.write(0, &[MAGIC]);
        let first = t.load(Ordering::Relaxed);
        assert!(first > 0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        timer.write(0, &[MAGIC]);
        assert_eq!(t.load(Ordering::Relaxed), first);
    }
}
