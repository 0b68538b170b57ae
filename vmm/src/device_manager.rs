//! The device manager: creates the legacy devices, places them on the port I/O and MMIO buses
//! and wires their interrupts (irqfd) and events.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::acpi::VirtioMmioDevice;
use arch::layout::{BOOT_TIMER_PORT, CMOS_PORT, COM1_IRQ, COM1_PORT, I8042_KBD_IRQ, I8042_PORT};
use arch::layout::{IRQ_BASE, IRQ_MAX, VIRTIO_MMIO_END, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START};
use devices::legacy::{BootTimer, Cmos, SerialDevice, I8042};
use devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
use devices::virtio::{Interrupt, MmioTransport, VirtioDevice};
use devices::GuestMemoryMmap;
use devices::{Bus, BusError};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// Errors of device setup.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for {0}")]
    EventFd(&'static str, #[source] std::io::Error),
    /// An interrupt line could not be connected.
    #[error("cannot connect the interrupt of {0}")]
    Irqfd(&'static str, #[source] kvm_ioctls::Error),
    /// A device could not be placed on a bus.
    #[error("cannot place {0} on the bus")]
    Bus(&'static str, #[source] BusError),
    /// No MMIO slot or IRQ line is left for another virtio device.
    #[error("too many virtio devices: no MMIO slot or IRQ line left for {0}")]
    NoSlot(&'static str),
    /// A queue notification could not be connected (ioeventfd).
    #[error("cannot connect the queue notifications of {0}")]
    Ioeventfd(&'static str, #[source] kvm_ioctls::Error),
    /// A snapshot's device state is invalid.
    #[error("invalid device state in the snapshot: {0}")]
    State(String),
    /// The device's queues could not be created.
    #[error("cannot create the queues of {0}")]
    Queue(&'static str, #[source] devices::virtio::QueueError),
}

/// Writes guest console output straight to the host's stdout, unbuffered, so interactive
/// prompts appear as soon as the guest prints them.
#[derive(Debug)]
pub struct ConsoleOut;

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        let n = out.write(buf)?;
        out.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// The VM's devices and buses.
#[derive(Debug)]
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio_bus: Bus,
    /// MMIO bus.
    pub mmio_bus: Bus,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the guest has drained the serial receive FIFO.
    pub serial_input_room_evt: EventFd,
    /// Signalled when the guest resets through the i8042.
    pub reset_evt: EventFd,
    /// The i8042 (for the host's Ctrl-Alt-Del).
    pub i8042: Arc<Mutex<I8042>>,
    /// The CMOS RTC.
    pub cmos: Arc<Mutex<Cmos>>,
    /// Handles on the block devices, by disk ID, to change them while the VM runs.
    pub block_controls: Vec<(String, devices::virtio::block::BlockControl)>,
    /// Handles on the network devices, in configuration order.
    pub net_controls: Vec<devices::virtio::net::NetControl>,
    /// The virtio-mmio transports, in bus order (for snapshots).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Virtio-mmio devices placed so far: their windows and GSIs, as the ACPI DSDT and the
    /// kernel command line describe them.
    pub virtio_devices: Vec<VirtioMmioDevice>,
    /// The boot timer's measurement: microseconds from start to the guest's boot signal.
    pub boot_time_us: Arc<std::sync::atomic::AtomicU64>,
}

fn eventfd(what: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::EventFd(what, e))
}

fn clone_evt(evt: &EventFd, what: &'static str) -> Result<EventFd, DeviceError> {
    evt.try_clone().map_err(|e| DeviceError::EventFd(what, e))
}

impl DeviceManager {
    /// Stops every virtio device touching guest memory (its worker ends) and returns the
    /// transports' state, for a snapshot or a migration; [`Self::resume_virtio`] restarts them.
    pub fn quiesce_virtio(&self) -> Vec<devices::virtio::mmio::MmioTransportState> {
        self.transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).save_state())
            .collect()
    }

    /// Restarts the virtio devices stopped by [`Self::quiesce_virtio`] from its states.
    pub fn resume_virtio(&self, states: &[devices::virtio::mmio::MmioTransportState]) {
        for (t, state) in self.transports.iter().zip(states) {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .resume_after_save(state);
        }
    }

    /// Creates the legacy devices of a PC (COM1, i8042, CMOS RTC, boot timer) for `vm`.
    pub fn new(
        vm: &VmFd,
        start: Instant,
        console: Box<dyn Write + Send>,
    ) -> Result<Self, DeviceError> {
        Self::with_state(vm, start, console, None)
    }

    /// Like [`DeviceManager::new`], the devices taking a snapshot's state when given.
    pub fn with_state(
        vm: &VmFd,
        start: Instant,
        console: Box<dyn Write + Send>,
        legacy: Option<&crate::snapshot::state::LegacyState>,
    ) -> Result<Self, DeviceError> {
        let mut pio_bus = Bus::new();

        let serial_irq = eventfd("COM1")?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|e| DeviceError::Irqfd("COM1", e))?;
        let serial_input_room_evt = eventfd("COM1 input")?;
        let room = clone_evt(&serial_input_room_evt, "COM1 input")?;
        let serial = Arc::new(Mutex::new(match legacy {
            Some(state) => SerialDevice::from_state(&state.serial, serial_irq, console, room)
                .map_err(|e| DeviceError::State(e.to_string()))?,
            None => SerialDevice::new(serial_irq, console, room),
        }));
        pio_bus
            .insert(serial.clone(), u64::from(COM1_PORT), 8)
            .map_err(|e| DeviceError::Bus("COM1", e))?;

        let reset_evt = eventfd("i8042 reset")?;
        let kbd_irq = eventfd("i8042")?;
        vm.register_irqfd(&kbd_irq, I8042_KBD_IRQ)
            .map_err(|e| DeviceError::Irqfd("i8042", e))?;
        let mut kbd = I8042::new(clone_evt(&reset_evt, "i8042 reset")?, kbd_irq);
        let mut cmos = Cmos::new();
        if let Some(state) = legacy {
            kbd.restore(&state.i8042).map_err(DeviceError::State)?;
            cmos.restore(&state.cmos).map_err(DeviceError::State)?;
        }
        let i8042 = Arc::new(Mutex::new(kbd));
        let cmos = Arc::new(Mutex::new(cmos));
        pio_bus
            .insert(i8042.clone(), u64::from(I8042_PORT), 5)
            .map_err(|e| DeviceError::Bus("i8042", e))?;

        pio_bus
            .insert(cmos.clone(), u64::from(CMOS_PORT), 2)
            .map_err(|e| DeviceError::Bus("CMOS RTC", e))?;
        let boot_timer = BootTimer::new(start);
        let boot_time_us = boot_timer.boot_time_us();
        pio_bus
            .insert(
                Arc::new(Mutex::new(boot_timer)),
                u64::from(BOOT_TIMER_PORT),
                1,
            )
            .map_err(|e| DeviceError::Bus("boot timer", e))?;

        Ok(Self {
            pio_bus,
            mmio_bus: Bus::new(),
            serial,
            serial_input_room_evt,
            reset_evt,
            i8042,
            cmos,
            block_controls: Vec::new(),
            net_controls: Vec::new(),
            transports: Vec::new(),
            virtio_devices: Vec::new(),
            boot_time_us,
        })
    }

    /// The `virtio_mmio.device=<size>@<addr>:<irq>` kernel parameters for the devices placed,
    /// in order, as Linux's virtio_mmio driver reads them.
    pub fn virtio_cmdline(&self) -> impl Iterator<Item = String> + '_ {
        self.virtio_devices.iter().map(|d| {
            format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                d.len >> 10,
                d.addr,
                d.gsi
            )
        })
    }

    /// Places `device` behind a virtio-mmio transport in the next free slot: its own IRQ
    /// line (irqfd) and an ioeventfd per queue on QueueNotify, so notifications reach the
    /// device's worker without a trip through the vCPU thread.
    pub fn add_virtio_device(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        name: &'static str,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), DeviceError> {
        let index =
            u32::try_from(self.virtio_devices.len()).map_err(|_| DeviceError::NoSlot(name))?;
        let addr = VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SLOT_SIZE;
        let irq = IRQ_BASE + index;
        if addr + VIRTIO_MMIO_SLOT_SIZE > VIRTIO_MMIO_END || irq > IRQ_MAX {
            return Err(DeviceError::NoSlot(name));
        }
        let irq_evt = eventfd(name)?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|e| DeviceError::Irqfd(name, e))?;
        let mut queue_evts = Vec::new();
        for queue in 0..device.queue_max_sizes().len() {
            let evt = eventfd(name)?;
            let datamatch = u32::try_from(queue).expect("a device has a handful of queues");
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(addr + QUEUE_NOTIFY_OFFSET),
                datamatch,
            )
            .map_err(|e| DeviceError::Ioeventfd(name, e))?;
            queue_evts.push(evt);
        }
        let transport =
            MmioTransport::new(device, mem.clone(), Interrupt::new(irq_evt), queue_evts)
                .map_err(|e| DeviceError::Queue(name, e))?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(transport.clone(), addr, VIRTIO_MMIO_SLOT_SIZE)
            .map_err(|e| DeviceError::Bus(name, e))?;
        self.transports.push(transport);
        self.virtio_devices.push(VirtioMmioDevice {
            addr,
            len: VIRTIO_MMIO_SLOT_SIZE,
            gsi: irq,
        });
        tracing::debug!(device = name, addr, irq, "virtio-mmio device placed");
        Ok(())
    }
}
