//! virtio-net (virtio 1.2, 5.1) over a tap: a receive queue fed from the tap and a transmit
//! queue written to it, the 12-byte virtio-net header passed through (the tap speaks it), and
//! checksum/TSO offloads offered when the tap supports them.

pub mod tap;

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
};
use virtio_queue::{Queue, QueueT, Writer};
use vm_memory::GuestMemoryBackend;

pub use self::tap::{Tap, TapError, MAX_FRAME_PIECES, VNET_HDR_LEN};
use super::worker::{QueueHandler, Worker};
use super::QUEUE_MAX_SIZE;
use super::{
    check_avail_index, driver_wants_interrupt, read_config_bytes, serve_queue, stop_worker,
    take_queues, ActivateContext, ActivateError, Interrupt, VirtioDevice,
};
use crate::rate_limiter::{LimiterUpdate, RateLimiterConfig, Throttle};

/// Largest frame the device moves: a 64 KiB TSO segment, its Ethernet header and the
/// virtio-net header.
pub const MAX_FRAME_LEN: usize = 65535 + 14 + VNET_HDR_LEN;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Offload features offered when the tap takes TUN_F_CSUM|TSO4|TSO6.
const OFFLOAD_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6);

pub use crate::metrics::NetMetrics;

/// A virtio network device.
#[derive(Debug)]
pub struct Net {
    tap: Arc<Mutex<Tap>>,
    config: [u8; 6],
    features: u64,
    index: usize,
    metrics: Arc<NetMetrics>,
    rx_rate: RateLimiterConfig,
    tx_rate: RateLimiterConfig,
    control: NetControl,
    worker: Option<Worker>,
}

impl Net {
    /// A handle to change the device while the VM runs.
    pub fn control(&self) -> NetControl {
        self.control.clone()
    }

    /// A device on `tap` with the guest MAC address `mac`; `index` names the worker thread.
    pub fn new(tap: Tap, mac: [u8; 6], index: usize) -> Self {
        Self::new_limited(
            tap,
            mac,
            index,
            RateLimiterConfig::default(),
            RateLimiterConfig::default(),
        )
    }

    /// Like [`Net::new`], with received and transmitted frames limited by `rx_rate` and
    /// `tx_rate`.
    pub fn new_limited(
        tap: Tap,
        mac: [u8; 6],
        index: usize,
        rx_rate: RateLimiterConfig,
        tx_rate: RateLimiterConfig,
    ) -> Self {
        let mut features = 1u64 << VIRTIO_NET_F_MAC;
        let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        if tap.set_offload(offloads).is_ok() {
            features |= OFFLOAD_FEATURES;
        }
        // Nothing is offloaded until the guest accepts it.
        if let Err(e) = tap.set_offload(0) {
            tracing::warn!("tap {}: cannot clear offloads: {e}", tap.name());
        }
        Self {
            tap: Arc::new(Mutex::new(tap)),
            config: mac,
            features,
            index,
            metrics: Arc::new(NetMetrics::default()),
            rx_rate,
            tx_rate,
            control: NetControl::default(),
            worker: None,
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }
}

/// The tap offloads matching what the guest accepted to receive.
fn tun_offloads(acked: u64) -> libc::c_uint {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

struct NetHandler {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
    tap: Arc<Mutex<Tap>>,
    tap_fd: RawFd,
    metrics: Arc<NetMetrics>,
    frame: Vec<u8>,
    /// Length of a frame read from the tap that no receive buffer has taken yet.
    pending: Option<usize>,
    /// The guest may have receive buffers (false after the queue was found empty).
    rx_buffers: bool,
    rx_throttle: Option<Throttle>,
    tx_throttle: Option<Throttle>,
    control: NetControl,
}

/// Changes a network device's rate limits while the VM runs.
#[derive(Debug, Clone, Default)]
pub struct NetControl {
    rx: LimiterUpdate,
    tx: LimiterUpdate,
}

impl NetControl {
    /// Replaces the limits on what the guest receives.
    pub fn set_rx_rate_limit(&self, config: RateLimiterConfig) {
        self.rx.request(config);
    }

    /// Replaces the limits on what the guest sends.
    pub fn set_tx_rate_limit(&self, config: RateLimiterConfig) {
        self.tx.request(config);
    }
}

/// The host fds a network device's worker watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchedFd {
    Tap,
    RxTimer,
    TxTimer,
}

/// Always present, so limits set while the VM runs have a timer to use.
fn throttle(config: RateLimiterConfig) -> Result<Option<Throttle>, ActivateError> {
    Throttle::new(config)
        .map(Some)
        .map_err(ActivateError::Worker)
}

impl NetHandler {
    /// Sends every chain on the transmit queue to the tap.
    fn transmit(&mut self) -> Result<(), String> {
        let mem = self.mem.clone();
        if let Some(t) = &mut self.tx_throttle {
            self.control.tx.apply(t);
        }
        let (throttle, frame, tap, metrics) = (
            &mut self.tx_throttle,
            &mut self.frame,
            &self.tap,
            &self.metrics,
        );
        let used = serve_queue(&mut self.tx, &mem, |chain| {
            // The device-readable part of the chain, as guest-memory slices.
            let mut slices = Vec::with_capacity(2);
            let mut len = 0usize;
            for desc in chain.readable() {
                let Some(total) = len.checked_add(desc.len() as usize) else {
                    metrics.tx_fails.inc();
                    return Some(0);
                };
                len = total;
                if len > MAX_FRAME_LEN {
                    break;
                }
                let start = slices.len();
                for slice in GuestMemoryBackend::get_slices(&mem, desc.addr(), desc.len() as usize)
                {
                    match slice {
                        Ok(s) => slices.push(s),
                        Err(_) => {
                            metrics.tx_fails.inc();
                            return Some(0);
                        }
                    }
                }
                let mapped: usize = slices[start..].iter().map(|s| s.len()).sum();
                if mapped != desc.len() as usize {
                    metrics.tx_fails.inc();
                    return Some(0);
                }
            }
            if let Some(t) = throttle {
                if !t.admit(len.saturating_sub(VNET_HDR_LEN) as u64) {
                    // Sent when the rate limiter's timer fires.
                    metrics.tx_rate_limiter_throttled.inc();
                    return None;
                }
            }
            if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len) {
                metrics.tx_fails.inc();
                return Some(0);
            }
            let mut tap = tap.lock().unwrap_or_else(|p| p.into_inner());
            let sent = if slices.len() <= MAX_FRAME_PIECES {
                tap.write_frame_slices(&slices)
            } else {
                // A frame in many small pieces: gather it first.
                let mut at = 0;
                for s in &slices {
                    at += s.copy_to(&mut frame[at..len]);
                }
                tap.write_frame(&frame[..len])
            };
            drop(tap);
            match sent {
                Ok(_) => {
                    metrics.tx_packets_count.inc();
                    metrics.tx_bytes_count.add((len - VNET_HDR_LEN) as u64);
                }
                Err(e) => {
                    tracing::debug!("virtio-net: tap write failed: {e}");
                    metrics.tx_fails.inc();
                }
            }
            Some(0)
        })?;
        if used && driver_wants_interrupt(&self.tx, &mem) {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Moves frames from the tap into receive buffers until either runs out.
    fn receive(&mut self) -> Result<(), String> {
        let mem = self.mem.clone();
        let mut used_any = false;
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => {
                    let read = {
                        let mut tap = self.tap.lock().unwrap_or_else(|p| p.into_inner());
                        tap.read_frame(&mut self.frame)
                    };
                    match read {
                        Ok(len) if len >= VNET_HDR_LEN => len,
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            self.metrics.tap_read_fails.inc();
                            return Err(format!("tap read failed: {e}"));
                        }
                    }
                }
            };
            check_avail_index(&mut self.rx, &mem)?;
            check_avail_index(&mut self.rx, &mem)?;
            if let Some(t) = &mut self.rx_throttle {
                self.control.rx.apply(t);
                if !t.admit((len - VNET_HDR_LEN) as u64) {
                    // The frame waits; the tap is not read until the timer fires.
                    self.metrics.rx_rate_limiter_throttled.inc();
                    self.pending = Some(len);
                    break;
                }
            }
            let Some(chain) = self.rx.pop_descriptor_chain(&mem) else {
                // Keep the frame until the guest posts buffers; stop watching the tap.
                self.pending = Some(len);
                self.rx_buffers = false;
                break;
            };
            self.pending = None;
            let head = chain.head_index();
            // VERSION_1 without mergeable buffers: one buffer per frame, num_buffers = 1.
            self.frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            let written = match Writer::new(&mem, chain) {
                Ok(mut writer) if writer.available_bytes() >= len => {
                    match writer.write_all(&self.frame[..len]) {
                        Ok(()) => {
                            self.metrics.rx_packets_count.inc();
                            self.metrics.rx_bytes_count.add((len - VNET_HDR_LEN) as u64);
                            len
                        }
                        Err(_) => {
                            self.metrics.rx_dropped_frames.inc();
                            0
                        }
                    }
                }
                _ => {
                    // Too small or outside guest memory: the frame is lost, the buffer returned.
                    self.metrics.rx_dropped_frames.inc();
                    0
                }
            };
            let written = u32::try_from(written).unwrap_or(0);
            self.rx
                .add_used(&mem, head, written)
                .map_err(|e| format!("cannot return a receive buffer: {e}"))?;
            used_any = true;
        }
        if used_any && driver_wants_interrupt(&self.rx, &mem) {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }
}

impl NetHandler {
    /// The tap, then the timers of the rate limiters that exist, in a fixed order.
    fn watched(&self) -> Vec<(RawFd, WatchedFd)> {
        let mut fds = vec![(self.tap_fd, WatchedFd::Tap)];
        if let Some(t) = &self.rx_throttle {
            fds.push((t.as_raw_fd(), WatchedFd::RxTimer));
        }
        if let Some(t) = &self.tx_throttle {
            fds.push((t.as_raw_fd(), WatchedFd::TxTimer));
        }
        fds
    }
}

impl QueueHandler for NetHandler {
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        vec![self.rx.state(), self.tx.state()]
    }

    fn process_queue(&mut self, index: usize) -> Result<(), String> {
        match index {
            RX_QUEUE => {
                self.rx_buffers = true;
                self.receive()
            }
            TX_QUEUE => self.transmit(),
            _ => Ok(()),
        }
    }

    fn watched_fds(&self) -> Vec<RawFd> {
        self.watched().iter().map(|(fd, _)| *fd).collect()
    }

    fn process_fd(&mut self, index: usize) -> Result<(), String> {
        match self.watched().get(index).map(|(_, kind)| *kind) {
            Some(WatchedFd::RxTimer) => {
                if let Some(t) = &mut self.rx_throttle {
                    t.on_timer();
                }
                self.receive()
            }
            Some(WatchedFd::TxTimer) => {
                if let Some(t) = &mut self.tx_throttle {
                    t.on_timer();
                }
                self.transmit()
            }
            Some(WatchedFd::Tap) | None => self.receive(),
        }
    }

    fn wants_fd(&self, index: usize) -> bool {
        let throttled = |t: &Option<Throttle>| t.as_ref().is_some_and(Throttle::is_throttled);
        match self.watched().get(index).map(|(_, kind)| *kind) {
            Some(WatchedFd::Tap) => self.rx_buffers && !throttled(&self.rx_throttle),
            Some(WatchedFd::RxTimer | WatchedFd::TxTimer) => true,
            None => false,
        }
    }

    fn failed(&mut self, why: &str) {
        crate::warn_limited!("virtio-net stopped: {why}");
        self.interrupt.signal_needs_reset();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE, QUEUE_MAX_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-net: write to configuration offset {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let [rx, tx] = take_queues::<2>(ctx.queues)?;
        let tap_fd = {
            let tap = self.tap.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = tap.set_offload(tun_offloads(ctx.acked_features)) {
                tracing::warn!("virtio-net: {e}");
            }
            tap.as_raw_fd()
        };
        let handler = NetHandler {
            mem: ctx.mem,
            rx,
            tx,
            interrupt: ctx.interrupt,
            tap: self.tap.clone(),
            tap_fd,
            metrics: self.metrics.clone(),
            frame: vec![0; MAX_FRAME_LEN],
            pending: None,
            rx_buffers: true,
            rx_throttle: throttle(self.rx_rate)?,
            tx_throttle: throttle(self.tx_rate)?,
            control: self.control.clone(),
        };
        let worker = Worker::spawn(format!("anvil-net{}", self.index), ctx.queue_evts, handler)
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn quiesce(&mut self) -> Option<Vec<virtio_queue::QueueState>> {
        super::quiesce_worker(&mut self.worker)
    }

    fn reset(&mut self) {
        stop_worker(&mut self.worker);
        let tap = self.tap.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = tap.set_offload(0) {
            tracing::warn!("virtio-net: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_the_guest_features() {
        assert_eq!(tun_offloads(0), 0);
        assert_eq!(
            tun_offloads(1 << VIRTIO_NET_F_GUEST_TSO4),
            0,
            "TSO needs checksum offload"
        );
        assert_eq!(
            tun_offloads(OFFLOAD_FEATURES),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }

    #[test]
    fn missing_and_non_tap_interfaces_are_refused() {
        assert!(matches!(
            Tap::open("anvil-nosuch0"),
            Err(TapError::Missing(_))
        ));
        assert!(matches!(Tap::open("lo"), Err(TapError::NotATap(_))));
        assert!(matches!(Tap::open("a/b"), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open(&"x".repeat(20)),
            Err(TapError::BadName(_))
        ));
    }
}
