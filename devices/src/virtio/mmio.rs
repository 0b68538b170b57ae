//! The virtio-mmio transport (virtio 1.2, 4.2.2, modern interface only): the register file a
//! driver programs, the device status state machine and queue set-up, in front of a
//! [`VirtioDevice`]. Every register value comes from the guest and is checked.

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, Interrupt, VirtioDevice, QUEUE_MAX_SIZE, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern virtio-mmio interface.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the driver ("ANVL").
pub const VENDOR_ID: u32 = 0x4c56_4e41;
/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, for ioeventfd registration.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

const BAD_SIZE: u8 = 1;
const BAD_DESC: u8 = 2;
const BAD_AVAIL: u8 = 4;
const BAD_USED: u8 = 8;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// The driver knows how to drive the device.
pub const STATUS_DRIVER: u32 = 2;
/// The driver is set up and ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// The device hit an error it cannot recover from without a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
/// The driver gave up on the device.
pub const STATUS_FAILED: u32 = 128;

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    /// Per queue, the settings the driver gave and virtio-queue refused ([`BAD_SIZE`]: zero,
    /// too large or not a power of two; [`BAD_DESC`], [`BAD_AVAIL`], [`BAD_USED`]: misaligned
    /// ring addresses). virtio-queue keeps the old value then, so these flags are what fail
    /// activation.
    bad: Vec<u8>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    activated: bool,
    /// The next activation resumes a VM restored from a snapshot.
    restoring: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

/// A queue's settings and positions, for snapshots (virtio-queue's `QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// The driver finished setting it up.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueSnapshot {
    fn from(q: virtio_queue::QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl QueueSnapshot {
    /// The queue, if virtio-queue accepts the values (sizes and alignments are checked).
    fn to_queue(self) -> Result<Queue, String> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("invalid queue: {e}"))
    }
}

/// A virtio-mmio transport's registers and queues, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    /// The device's virtio type (checked on restore).
    pub device_type: u32,
    /// Device status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// The device was running.
    pub activated: bool,
    /// The queues.
    pub queues: Vec<QueueSnapshot>,
    /// Per-queue set-up errors.
    pub bad: Vec<u8>,
    /// Interrupt status register.
    pub interrupt_status: u32,
    /// The device asked for a reset.
    pub needs_reset: bool,
}

/// Sets the low or high half of a 64-bit value.
fn set_half(value: u64, high: bool, half: u32) -> u64 {
    if high {
        (value & 0xffff_ffff) | (u64::from(half) << 32)
    } else {
        (value & !0xffff_ffff) | u64::from(half)
    }
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` raises its IRQ and `queue_evts` (one per queue) are the
    /// eventfds the VMM registers as ioeventfds on QueueNotify.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = Self::fresh_queues(device.as_ref())?;
        let bad = vec![0; queues.len()];
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            bad,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            activated: false,
            restoring: false,
        })
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Result<Vec<Queue>, virtio_queue::Error> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max.min(QUEUE_MAX_SIZE)))
            .collect()
    }

    /// Stops the device's work and returns the transport's state (queue positions from the
    /// device's worker); [`MmioTransport::resume_after_save`] starts it again. Guest memory is
    /// then no longer written by this device until it resumes.
    pub fn save_state(&mut self) -> MmioTransportState {
        let mut activated = self.activated;
        let queues: Vec<QueueSnapshot> = if self.activated {
            match self.device.quiesce() {
                Some(states) => states.into_iter().map(QueueSnapshot::from).collect(),
                None => {
                    // The device failed: it waits for the driver to reset it.
                    activated = false;
                    Vec::new()
                }
            }
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        if self.activated {
            // Held here until resumed (or restored elsewhere).
            self.queues = queues.iter().filter_map(|q| q.to_queue().ok()).collect();
            self.activated = false;
        }
        MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            activated,
            queues,
            bad: self.bad.clone(),
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
        }
    }

    /// Starts the device again after [`MmioTransport::save_state`] if it was running.
    pub fn resume_after_save(&mut self, state: &MmioTransportState) {
        if state.activated && !self.activated {
            self.activate();
        }
    }

    /// Takes a snapshot's state (before the guest runs). Values are checked as a driver's
    /// would be: a device whose queues are invalid in this VM's memory is marked as needing a
    /// reset, never trusted.
    pub fn restore_state(&mut self, state: &MmioTransportState) -> Result<(), String> {
        if state.device_type != self.device.device_type() {
            return Err(format!(
                "device type {} where the VM has {}",
                state.device_type,
                self.device.device_type()
            ));
        }
        let count = self.device.queue_max_sizes().len();
        if state.queues.len() != count || state.bad.len() != count {
            return Err(format!(
                "{} queues for a device with {count}",
                state.queues.len()
            ));
        }
        let queues = state
            .queues
            .iter()
            .map(|q| q.to_queue())
            .collect::<Result<Vec<_>, _>>()?;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features & self.device_features();
        self.queue_sel = state.queue_sel;
        self.queues = queues;
        self.bad = state.bad.clone();
        self.interrupt
            .restore(state.interrupt_status, state.needs_reset);
        if state.activated {
            self.activate();
        }
        Ok(())
    }

    /// The device's virtio type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Number of queues (and of queue eventfds the transport expects).
    pub fn queue_count(&self) -> usize {
        self.device.queue_max_sizes().len()
    }

    /// The device's current status byte, as the driver reads it.
    pub fn status(&self) -> u32 {
        let needs_reset = if self.interrupt.needs_reset() {
            STATUS_DEVICE_NEEDS_RESET
        } else {
            0
        };
        self.status | needs_reset
    }

    fn device_features(&self) -> u64 {
        self.device.avail_features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    /// QueueNumMax of the selected queue while the device holds the queues (0: no such queue).
    fn activated_queue_max(&self) -> u32 {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.device.queue_max_sizes().get(i))
            .map_or(0, |&max| u32::from(max.min(QUEUE_MAX_SIZE)))
    }

    /// Sets or clears `flag` for the selected queue.
    fn flag_selected(&mut self, flag: u8, set: bool) {
        let sel = usize::try_from(self.queue_sel).ok();
        if let Some(bad) = sel.and_then(|i| self.bad.get_mut(i)) {
            if set {
                *bad |= flag;
            } else {
                *bad &= !flag;
            }
        }
    }

    /// Queue set-up is allowed only between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        match Self::fresh_queues(self.device.as_ref()) {
            Ok(queues) => {
                self.bad = vec![0; queues.len()];
                self.queues = queues;
            }
            // Sizes were valid at construction and have not changed.
            Err(e) => tracing::error!("virtio-mmio: cannot recreate queues: {e}"),
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.reset();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set (virtio 1.2, 2.1.1): a driver's write of
        // it is ignored.
        let value = value & !STATUS_DEVICE_NEEDS_RESET;
        let added = value & !self.status;
        if value & self.status != self.status {
            // A driver may not clear bits except by writing 0 (virtio 1.2, 2.1.1).
            tracing::debug!(
                "virtio-mmio: status {value:#x} clears bits of {:#x}",
                self.status
            );
            return;
        }
        let mut value = value;
        if added & STATUS_FEATURES_OK != 0
            && (self.acked_features & VIRTIO_F_VERSION_1 == 0 || value & STATUS_DRIVER == 0)
        {
            // Modern devices require VIRTIO_F_VERSION_1; without it FEATURES_OK does not stick.
            value &= !STATUS_FEATURES_OK;
        }
        if value & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK == 0 {
            // DRIVER_OK without an accepted feature set: the device cannot start.
            self.status = value & !STATUS_DRIVER_OK;
            self.fail_device("DRIVER_OK before FEATURES_OK");
            return;
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    /// Starts the device once the driver set DRIVER_OK (after FEATURES_OK, which
    /// `set_status` guarantees).
    fn activate(&mut self) {
        if let Some(index) = self
            .queues
            .iter()
            .zip(&self.bad)
            .position(|(q, &bad)| bad != 0 || !q.ready() || !q.is_valid(&self.mem))
        {
            self.fail_device(&format!("queue {index} is not ready or not valid"));
            return;
        }
        let evts: Result<Vec<EventFd>, _> =
            self.queue_evts.iter().map(EventFd::try_clone).collect();
        let evts = match evts {
            Ok(evts) => evts,
            Err(e) => {
                self.fail_device(&format!("cannot clone queue eventfds: {e}"));
                return;
            }
        };
        let queues = std::mem::take(&mut self.queues);
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            queue_evts: evts,
            acked_features: self.acked_features,
            restored: std::mem::take(&mut self.restoring),
        };
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => self.fail_device(&format!("activation failed: {e}")),
        }
    }

    /// The driver set the device up wrongly: report DEVICE_NEEDS_RESET; the VM goes on.
    fn fail_device(&mut self, why: &str) {
        crate::warn_limited!(
            device = self.device.device_type(),
            "virtio-mmio device needs reset: {why}"
        );
        self.interrupt.signal_needs_reset();
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => {
                let features = self.device_features();
                match self.device_features_sel {
                    0 => u32::try_from(features & 0xffff_ffff).unwrap_or(0),
                    1 => u32::try_from(features >> 32).unwrap_or(0),
                    _ => 0,
                }
            }
            // Once the device runs, it holds the queues; all of them were ready then.
            QUEUE_NUM_MAX if self.activated => self.activated_queue_max(),
            QUEUE_READY if self.activated => u32::from(self.activated_queue_max() != 0),
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status(),
            CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!("virtio-mmio: read of register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => {
                if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
                    return;
                }
                let high = match self.driver_features_sel {
                    0 => false,
                    1 => true,
                    _ => return,
                };
                // Bits the device did not offer cannot be accepted.
                self.acked_features =
                    set_half(self.acked_features, high, value) & self.device_features();
            }
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM if setup => {
                let ok = self.selected_queue().is_some_and(|q| {
                    u16::try_from(value).is_ok_and(|size| q.try_set_size(size).is_ok())
                });
                self.flag_selected(BAD_SIZE, !ok);
            }
            QUEUE_READY if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH if setup => {
                let high = offset == QUEUE_DESC_HIGH;
                let ok = self.selected_queue().is_some_and(|q| {
                    let addr = set_half(q.desc_table(), high, value);
                    q.try_set_desc_table_address(GuestAddress(addr)).is_ok()
                });
                self.flag_selected(BAD_DESC, !ok);
            }
            QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH if setup => {
                let high = offset == QUEUE_DRIVER_HIGH;
                let ok = self.selected_queue().is_some_and(|q| {
                    let addr = set_half(q.avail_ring(), high, value);
                    q.try_set_avail_ring_address(GuestAddress(addr)).is_ok()
                });
                self.flag_selected(BAD_AVAIL, !ok);
            }
            QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH if setup => {
                let high = offset == QUEUE_DEVICE_HIGH;
                let ok = self.selected_queue().is_some_and(|q| {
                    let addr = set_half(q.used_ring(), high, value);
                    q.try_set_used_ring_address(GuestAddress(addr)).is_ok()
                });
                self.flag_selected(BAD_USED, !ok);
            }
            QUEUE_NOTIFY => {
                // Normally KVM consumes this write through an ioeventfd; this path serves
                // VMMs without one (and tests).
                if let Some(evt) = usize::try_from(value)
                    .ok()
                    .and_then(|i| self.queue_evts.get(i))
                {
                    if let Err(e) = evt.write(1) {
                        tracing::error!("virtio-mmio: cannot signal a queue: {e}");
                    }
                }
            }
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.set_status(value),
            _ => tracing::debug!("virtio-mmio: write {value:#x} to register {offset:#x} ignored"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        data.fill(0);
        // Registers are 32-bit and naturally aligned (virtio 1.2, 4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}
