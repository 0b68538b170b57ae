//! COM1: vm-superio's 16550 model behind the bus, its output going to a host writer and its
//! input fed by the VMM's event loop.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Raising the interrupt after queueing input failed.
    #[error("cannot queue serial input")]
    Enqueue(#[source] vm_superio::serial::Error<std::io::Error>),
    /// A snapshot's serial state is invalid.
    #[error("invalid serial state: {0}")]
    Restore(String),
}

pub use crate::metrics::SerialMetrics;

/// Forwards vm-superio's events to counters and wakes the input feeder when the guest has
/// drained the receive FIFO.
#[derive(Debug)]
struct Events {
    metrics: Arc<SerialMetrics>,
    input_room_evt: EventFd,
}

impl SerialEvents for Events {
    fn buffer_read(&self) {
        self.metrics.read_count.inc();
    }
    fn out_byte(&self) {
        self.metrics.write_count.inc();
    }
    fn tx_lost_byte(&self) {
        self.metrics.missed_write_count.inc();
    }
    fn in_buffer_empty(&self) {
        // A failed wake-up only delays input until the next poll; nothing to recover.
        if let Err(e) = self.input_room_evt.write(1) {
            tracing::debug!("serial input wake-up failed: {e}");
        }
    }
}

/// The UART's registers and receive FIFO, for snapshots (vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

/// A 16550 UART on the bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, Events, Box<dyn Write + Send>>,
    metrics: Arc<SerialMetrics>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("metrics", &self.metrics)
            .finish()
    }
}

impl SerialDevice {
    /// A UART that raises `interrupt` (an irqfd) and writes guest output to `out`;
    /// `input_room_evt` is signalled when the guest has emptied the receive FIFO.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>, input_room_evt: EventFd) -> Self {
        let metrics = Arc::new(SerialMetrics::default());
        let events = Events {
            metrics: metrics.clone(),
            input_room_evt,
        };
        Self {
            serial: Serial::with_events(EventFdTrigger::new(interrupt), events, out),
            metrics,
        }
    }

    /// Like [`SerialDevice::new`], with the registers and FIFO of a snapshot; refused when
    /// the FIFO holds more than the UART's 64 bytes.
    pub fn from_state(
        state: &SerialSnapshot,
        interrupt: EventFd,
        out: Box<dyn Write + Send>,
        input_room_evt: EventFd,
    ) -> Result<Self, SerialError> {
        let metrics = Arc::new(SerialMetrics::default());
        let events = Events {
            metrics: metrics.clone(),
            input_room_evt,
        };
        let inner = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&inner, EventFdTrigger::new(interrupt), events, out)
            .map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        Ok(Self { serial, metrics })
    }

    /// Raises the interrupt again if the UART has one pending (after a restore, once the
    /// interrupt controllers hold their saved state).
    pub fn raise_pending_interrupt(&self) {
        // IIR bit 0 clear: an interrupt is pending.
        if self.serial.state().interrupt_identification & 1 == 0 {
            if let Err(e) = self.serial.interrupt_evt().eventfd().write(1) {
                tracing::debug!("serial interrupt failed: {e}");
            }
        }
    }

    /// The registers and FIFO.
    pub fn state(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<SerialMetrics> {
        self.metrics.clone()
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        self.serial
            .enqueue_raw_bytes(bytes)
            .map_err(SerialError::Enqueue)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART's registers are bytes; wider accesses read the first and pad with zeros.
        data.fill(0);
        if let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(reg)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.serial.write(reg, value) {
            tracing::debug!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn guest_writes_reach_the_host_writer() {
        let sink = Sink::default();
        let mut dev = SerialDevice::new(evt(), Box::new(sink.clone()), evt());
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(dev.metrics().write_count.get(), 3);
    }

    #[test]
    fn host_input_is_readable_and_raises_the_interrupt() {
        let irq = evt();
        let room = evt();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            Box::new(Sink::default()),
            room.try_clone().unwrap(),
        );
        // Enable the "received data available" interrupt (IER bit 0).
        dev.write(1, &[1]);
        assert_eq!(dev.enqueue_input(b"ab").unwrap(), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut data = [0u8; 1];
        dev.read(0, &mut data);
        assert_eq!(data, [b'a']);
        dev.read(0, &mut data);
        assert_eq!(data, [b'b']);
        assert_eq!(room.read().unwrap(), 1);
    }

    #[test]
    fn offsets_beyond_a_byte_are_ignored() {
        let mut dev = SerialDevice::new(evt(), Box::new(Sink::default()), evt());
        let mut data = [0xaau8; 2];
        dev.read(0x1_0000, &mut data);
        assert_eq!(data, [0, 0]);
        dev.write(0x1_0000, &[1]);
        dev.write(0, &[]);
    }
}
