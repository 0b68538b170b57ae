//! virtio-rng (virtio 1.2, 5.4): one request queue whose writable buffers the device fills
//! with entropy from the host's getrandom.

use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;
use vm_memory::Bytes;

use super::worker::{QueueHandler, Worker};
use super::{
    serve_queue, stop_worker, take_queues, ActivateContext, ActivateError, Interrupt, VirtioDevice,
    QUEUE_MAX_SIZE,
};
use crate::metrics::EntropyMetrics;

/// Most bytes given for one request; a guest asking for more gets this many (the spec lets
/// the device fill less than offered).
const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// The virtio-rng device.
#[derive(Debug, Default)]
pub struct Rng {
    worker: Option<Worker>,
    metrics: Arc<EntropyMetrics>,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self::default()
    }

    /// This device's counters.
    pub fn metrics(&self) -> Arc<EntropyMetrics> {
        self.metrics.clone()
    }
}

struct RngHandler {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
    buf: Vec<u8>,
    metrics: Arc<EntropyMetrics>,
}

/// Fills `buf` from the host's entropy pool.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of the given length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
            continue;
        }
        filled += n.unsigned_abs();
    }
    Ok(())
}

/// Fills the writable descriptors of one chain with entropy through `buf`; returns the bytes
/// written.
fn fill_chain(
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    metrics: &EntropyMetrics,
) -> u32 {
    let mut written: u32 = 0;
    for desc in chain.writable() {
        let room = MAX_REQUEST_BYTES - written;
        let len = desc.len().min(room);
        if len == 0 {
            break;
        }
        let chunk = &mut buf[..len as usize];
        if let Err(e) = getrandom(chunk) {
            metrics.host_rng_fails.inc();
            tracing::error!("virtio-rng: getrandom failed: {e}");
            break;
        }
        if let Err(e) = mem.write_slice(chunk, desc.addr()) {
            // The guest pointed outside its memory: give what was written so far.
            tracing::debug!("virtio-rng: bad buffer: {e}");
            break;
        }
        written += len;
    }
    metrics.entropy_event_count.inc();
    metrics.entropy_bytes.add(u64::from(written));
    written
}

impl QueueHandler for RngHandler {
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        vec![self.queue.state()]
    }

    fn process_queue(&mut self, _index: usize) -> Result<(), String> {
        let (mem, buf, metrics) = (&self.mem, &mut self.buf, &self.metrics);
        if serve_queue(&mut self.queue, mem, |chain| {
            Some(fill_chain(mem, buf, chain, metrics))
        })? {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn watched_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }

    fn process_fd(&mut self, index: usize) -> Result<(), String> {
        Err(format!("no host fd {index} is watched"))
    }

    fn wants_fd(&self, _index: usize) -> bool {
        false
    }

    fn failed(&mut self, why: &str) {
        crate::warn_limited!("virtio-rng stopped: {why}");
        self.interrupt.signal_needs_reset();
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE]
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-rng: write to configuration offset {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let [queue] = take_queues::<1>(ctx.queues)?;
        let handler = RngHandler {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
            buf: vec![0; MAX_REQUEST_BYTES as usize],
            metrics: self.metrics.clone(),
        };
        let worker = Worker::spawn("anvil-rng".into(), ctx.queue_evts, handler)
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn quiesce(&mut self) -> Option<Vec<virtio_queue::QueueState>> {
        super::quiesce_worker(&mut self.worker)
    }

    fn reset(&mut self) {
        stop_worker(&mut self.worker);
    }
}
