//! Virtio devices (virtio 1.2, split virtqueues) and the virtio-mmio transport.
//!
//! A device model implements [`VirtioDevice`]: it says what it is (type, queues, features,
//! configuration space) and, once the driver is ready, [`VirtioDevice::activate`] hands it
//! guest memory, its queues with their notification eventfds and an [`Interrupt`]. The device
//! never sees transport registers, so a PCI transport can wrap the same models later.

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;
pub use virtio_queue::Error as QueueError;
pub use worker::{set_worker_start_hook, WorkerStartHook};

/// VIRTIO_F_VERSION_1 (virtio 1.2, 6): the device is modern; the transport always offers it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The largest queue any anvil device offers.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Interrupt status bit: a used buffer was added (virtio 1.2, 4.2.2 InterruptStatus).
pub const INTERRUPT_USED_BUFFER: u32 = 1;
/// Interrupt status bit: the configuration changed (or the device needs a reset).
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("device expects {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// The device's worker thread could not be started.
    #[error("cannot start the device worker")]
    Worker(#[source] std::io::Error),
}

/// The interrupt line of a virtio device: an interrupt status register shared with the
/// transport and the irqfd that raises the device's IRQ.
#[derive(Debug, Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irq: Arc<EventFd>,
    needs_reset: Arc<AtomicBool>,
}

impl Interrupt {
    /// An interrupt that raises `irq` (an irqfd registered with KVM).
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            irq: Arc::new(irq),
            needs_reset: Arc::new(AtomicBool::new(false)),
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            tracing::error!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// Tells the driver that used buffers were added.
    pub fn signal_used_queue(&self) {
        self.raise(INTERRUPT_USED_BUFFER);
    }

    /// Tells the driver that the configuration (or the device status) changed.
    pub fn signal_config_change(&self) {
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }

    /// Marks the device as broken (the guest corrupted its queues): the transport then reports
    /// DEVICE_NEEDS_RESET, and the driver is told through a configuration interrupt.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    /// True once the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Forgets all pending state (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Takes a snapshot's interrupt status and reset request.
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        if status != 0 {
            // Re-raise the line: the guest had not acknowledged it.
            if let Err(e) = self.irq.write(1) {
                tracing::error!("cannot raise a virtio interrupt: {e}");
            }
        }
    }

    /// The interrupt status register's value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the acknowledged bits of the interrupt status register.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What an activated device receives.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt.
    pub interrupt: Interrupt,
    /// The queues as the driver set them up (validated against guest memory).
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver notifies that queue.
    pub queue_evts: Vec<EventFd>,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The device resumes in a VM restored from a snapshot: its host-side connections are
    /// gone (vsock tells the driver with a transport reset).
    pub restored: bool,
}

/// Takes exactly `N` queues out of `queues`, in order.
pub(crate) fn take_queues<const N: usize>(queues: Vec<Queue>) -> Result<[Queue; N], ActivateError> {
    let got = queues.len();
    <[Queue; N]>::try_from(queues).map_err(|_| ActivateError::QueueCount { expected: N, got })
}

/// Checks that the driver has not made more buffers available than the queue holds (its
/// available index ran ahead of the device by more than the queue size). virtio-queue then
/// stops handing out chains; without this check the device would go quiet instead of
/// reporting that it needs a reset.
pub(crate) fn check_avail_index(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), String> {
    use virtio_queue::QueueOwnedT;
    queue
        .iter(mem)
        .map(|_| ())
        .map_err(|e| format!("bad available ring index: {e}"))
}

/// VIRTQ_AVAIL_F_NO_INTERRUPT (virtio 1.2, 2.7.6): the driver does not want interrupts for
/// this queue (a polling driver sets it).
pub(crate) const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver wants an interrupt for the used buffers just added to `queue`: not when
/// its available ring carries VIRTQ_AVAIL_F_NO_INTERRUPT (EVENT_IDX is not offered, so that is
/// the only hint). Saves an irqfd write and an interrupt injection per batch for polling
/// drivers. When the flags cannot be read the interrupt is sent.
pub(crate) fn driver_wants_interrupt(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    use virtio_queue::QueueT;
    use vm_memory::Bytes;
    // The used ring writes must be visible before the flags are read: a driver that clears
    // the flag and then checks the used ring either sees our entries or we see its flag.
    std::sync::atomic::fence(Ordering::SeqCst);
    match mem.load::<u16>(
        vm_memory::GuestAddress(queue.avail_ring()),
        Ordering::SeqCst,
    ) {
        Ok(flags) => u16::from_le(flags) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// Pops every chain the driver made available on `queue`, hands it to `handle` and returns it
/// to the driver with the used length `handle` gives; `handle` returning `None` puts the chain
/// back and stops (a throttled device resumes later). Returns whether any buffer was used, or
/// an error when the driver corrupted the available ring.
pub(crate) fn serve_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
) -> Result<bool, String> {
    use virtio_queue::{QueueOwnedT, QueueT};
    check_avail_index(queue, mem)?;
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let Some(len) = handle(chain) else {
            queue.go_to_previous_position();
            break;
        };
        queue
            .add_used(mem, head, len)
            .map_err(|e| format!("cannot return a used buffer: {e}"))?;
        used = true;
    }
    check_avail_index(queue, mem)?;
    Ok(used)
}

/// Stops a device's worker, if it runs.
/// Stops a worker and returns its queues' states (see [`VirtioDevice::quiesce`]).
pub(crate) fn quiesce_worker(
    worker: &mut Option<worker::Worker>,
) -> Option<Vec<virtio_queue::QueueState>> {
    worker.take()?.stop_collect()
}

pub(crate) fn stop_worker(worker: &mut Option<worker::Worker>) {
    if let Some(mut worker) = worker.take() {
        worker.stop();
    }
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (virtio 1.2, 5).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device feature bits offered to the driver (the transport adds VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64;
    /// Reads the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts processing the queues; returns at once (the work runs on the device's worker).
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops processing and forgets the queues, so the device can be activated again.
    fn reset(&mut self);
    /// Stops an activated device's work (its worker thread) and returns its queues' states,
    /// for a snapshot; `None` when it is not active (never activated, or failed).
    fn quiesce(&mut self) -> Option<Vec<virtio_queue::QueueState>>;
}

/// Reads from a byte slice at `offset` into `data`, the rest filled with zeros; for
/// configuration spaces, where a guest may read any offset and length.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests;
