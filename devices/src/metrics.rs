//! Device metrics: lock-free counters each device instance owns and bumps on its own thread.
//! The VMM collects them and writes them out (`vmm::metrics`); devices only count.
//!
//! A [`Counter`] keeps its running total and the total at the last flush, so one writer can
//! report the change since its last flush (Firecracker's JSON lines) while another reads the
//! running total (Prometheus) without either resetting anything.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter {
    total: AtomicU64,
    flushed: AtomicU64,
}

impl Counter {
    /// A counter at zero (usable in statics).
    pub const fn new() -> Self {
        Self {
            total: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        }
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// The running total.
    pub fn get(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The change since the previous call (the running total the first time); for the
    /// one periodic flusher.
    pub fn take_delta(&self) -> u64 {
        let now = self.total.load(Ordering::Relaxed);
        let before = self.flushed.swap(now, Ordering::Relaxed);
        now.wrapping_sub(before)
    }
}

/// A value that is set, not counted (a duration, a size).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// A gauge at zero (usable in statics).
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Sets the value.
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Declares a struct of [`Counter`]s with a `counters()` list of (name, counter) in
/// declaration order; the names are Firecracker's where Firecracker has the metric.
macro_rules! counters {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: Counter,)*
        }

        impl $name {
            /// Every counter with its name.
            pub fn counters(&self) -> Vec<(&'static str, &Counter)> {
                vec![$((stringify!($field), &self.$field),)*]
            }
        }
    };
}

counters!(
    /// One virtio-blk device.
    BlockMetrics {
        /// Read requests completed.
        read_count,
        /// Bytes read for the guest.
        read_bytes,
        /// Write requests completed.
        write_count,
        /// Bytes written for the guest.
        write_bytes,
        /// Flush requests completed.
        flush_count,
        /// Requests refused as malformed or unsupported (bad header, range, read-only).
        invalid_reqs_count,
        /// Requests whose host I/O failed.
        execute_fails,
        /// Requests the rate limiter held back.
        rate_limiter_throttled_events,
        /// Queue notifications from the guest.
        queue_event_count,
    }
);

counters!(
    /// One virtio-net device.
    NetMetrics {
        /// Frames delivered to the guest.
        rx_packets_count,
        /// Bytes delivered to the guest.
        rx_bytes_count,
        /// Frames read from the tap and dropped (no room in the guest's buffers).
        rx_dropped_frames,
        /// Tap reads that failed.
        tap_read_fails,
        /// Frames the guest sent.
        tx_packets_count,
        /// Bytes the guest sent.
        tx_bytes_count,
        /// Frames the guest sent that could not be written to the tap or were malformed.
        tx_fails,
        /// Receive work held back by the rate limiter.
        rx_rate_limiter_throttled,
        /// Transmit work held back by the rate limiter.
        tx_rate_limiter_throttled,
    }
);

counters!(
    /// The virtio-vsock device.
    VsockMetrics {
        /// Packets delivered to the guest.
        rx_packets_count,
        /// Payload bytes delivered to the guest.
        rx_bytes_count,
        /// Packets the guest sent.
        tx_packets_count,
        /// Payload bytes the guest sent.
        tx_bytes_count,
        /// Connections opened (either side).
        conns_added,
        /// Connections closed.
        conns_removed,
        /// Connections reset on an error or refusal.
        conns_killed,
    }
);

counters!(
    /// The virtio-rng device.
    EntropyMetrics {
        /// Requests served.
        entropy_event_count,
        /// Random bytes given to the guest.
        entropy_bytes,
        /// Host getrandom failures.
        host_rng_fails,
    }
);

counters!(
    /// The COM1 serial port.
    SerialMetrics {
        /// Bytes the guest wrote to the transmit register.
        write_count,
        /// Bytes the guest read from the receive register.
        read_count,
        /// Output bytes that could not be written to the host.
        missed_write_count,
    }
);

counters!(
    /// The i8042 controller.
    I8042Metrics {
        /// Resets the guest requested (CPU reset command).
        reset_count,
        /// Register reads.
        read_count,
        /// Register writes.
        write_count,
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_reports_the_change_since_the_last_flush() {
        let c = Counter::default();
        c.add(5);
        assert_eq!(c.take_delta(), 5);
        assert_eq!(c.take_delta(), 0);
        c.inc();
        c.add(2);
        assert_eq!(c.take_delta(), 3);
        assert_eq!(c.get(), 8, "the running total is untouched by flushes");
    }

    #[test]
    fn counters_are_listed_in_order_with_their_names() {
        let m = BlockMetrics::default();
        m.write_bytes.add(7);
        let names: Vec<_> = m.counters().iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names[..4],
            ["read_count", "read_bytes", "write_count", "write_bytes"]
        );
        assert_eq!(m.counters()[3].1.get(), 7);
    }
}
