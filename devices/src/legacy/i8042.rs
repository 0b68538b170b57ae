//! The i8042 PS/2 controller with its keyboard, modelled as far as a guest kernel probes it:
//! the controller configuration byte (CTR), self-tests, the output port and the keyboard's
//! replies to commands, so Linux's driver finds a working controller at once instead of
//! waiting for timeouts. Writing 0xfe (pulse the reset line) to the command port signals the
//! VMM's reset event. There is no mouse (AUX) port.

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::metrics::I8042Metrics;

use crate::bus::BusDevice;

/// Offsets from the base port 0x60.
const DATA: u64 = 0;
const COMMAND: u64 = 4;

// Status register bits (IBM PC/AT technical reference, 8042).
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_LAST_WAS_COMMAND: u8 = 0x08;
const SB_KBD_NOT_INHIBITED: u8 = 0x10;

// Controller configuration byte bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
/// The AUX port test answers "clock line stuck low": there is no mouse.
const AUX_TEST_FAIL: u8 = 0x01;

// Keyboard commands and replies.
const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_GET_ID: u8 = 0xf2;
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_ECHO: u8 = 0xee;

/// Bytes the output buffer holds at most; more are dropped (a guest that never reads).
const OUTPUT_CAPACITY: usize = 16;

/// The i8042 at ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042 {
    status: u8,
    control: u8,
    output_port: u8,
    /// A command waiting for its data byte on the data port.
    pending: Option<u8>,
    output: VecDeque<u8>,
    reset_evt: EventFd,
    kbd_irq: EventFd,
    metrics: Arc<I8042Metrics>,
}

/// The controller's registers and output buffer, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Controller configuration byte.
    pub control: u8,
    /// Output port.
    pub output_port: u8,
    /// A command waiting for its data byte.
    pub pending: Option<u8>,
    /// Bytes the guest has not read.
    pub output: Vec<u8>,
}

impl I8042 {
    /// The registers and buffer.
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            output_port: self.output_port,
            pending: self.pending,
            output: self.output.iter().copied().collect(),
        }
    }

    /// Raises IRQ 1 again if bytes wait for the guest (after a restore).
    pub fn raise_pending_interrupt(&self) {
        self.raise_kbd_irq();
    }

    /// Takes the registers and buffer of a snapshot (at most the buffer's capacity).
    pub fn restore(&mut self, state: &I8042State) -> Result<(), String> {
        if state.output.len() > OUTPUT_CAPACITY {
            return Err(format!(
                "i8042 output buffer of {} bytes (at most {OUTPUT_CAPACITY})",
                state.output.len()
            ));
        }
        self.status = state.status;
        self.control = state.control;
        self.output_port = state.output_port;
        self.pending = state.pending;
        self.output = state.output.iter().copied().collect();
        Ok(())
    }

    /// A controller that signals `reset_evt` when the guest asks for a CPU reset and raises
    /// `kbd_irq` (an irqfd for IRQ 1) when keyboard data is ready.
    pub fn new(reset_evt: EventFd, kbd_irq: EventFd) -> Self {
        Self {
            status: SB_SYSTEM | SB_KBD_NOT_INHIBITED,
            control: CTR_KBD_INT | CTR_SYSTEM | CTR_TRANSLATE | CTR_AUX_DISABLE,
            output_port: 0x01,
            pending: None,
            output: VecDeque::with_capacity(OUTPUT_CAPACITY),
            reset_evt,
            kbd_irq,
            metrics: Arc::default(),
        }
    }

    /// The controller's counters.
    pub fn metrics(&self) -> Arc<I8042Metrics> {
        self.metrics.clone()
    }

    fn push(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back(byte);
        }
        self.status |= SB_OUT_FULL;
    }

    /// Queues bytes from the keyboard and raises IRQ 1 if the guest enabled it.
    fn push_from_keyboard(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b);
        }
        self.raise_kbd_irq();
    }

    fn raise_kbd_irq(&self) {
        if self.control & CTR_KBD_INT != 0 && self.status & SB_OUT_FULL != 0 {
            if let Err(e) = self.kbd_irq.write(1) {
                tracing::debug!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    /// Presses and releases Ctrl+Alt+Del on the keyboard, as the host's "send Ctrl-Alt-Del"
    /// action does; the codes are scan code set 1 when the controller translates (as Linux
    /// sets it up) and set 2 otherwise.
    pub fn trigger_ctrl_alt_del(&mut self) {
        // Ctrl, Alt, Del (extended) pressed, then released in reverse order.
        const SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
        const SET2: [u8; 11] = [
            0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
        ];
        if self.control & CTR_TRANSLATE != 0 {
            self.push_from_keyboard(&SET1);
        } else {
            self.push_from_keyboard(&SET2);
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.output.pop_front().unwrap_or(0);
        if self.output.is_empty() {
            self.status &= !SB_OUT_FULL;
        } else {
            self.raise_kbd_irq();
        }
        byte
    }

    fn write_command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_COMMAND;
        self.pending = None;
        match cmd {
            CMD_READ_CTR => self.push(self.control),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_AUX_DISABLE => self.control |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.control &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST => self.push(AUX_TEST_FAIL),
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_KBD_TEST => self.push(PORT_TEST_OK),
            CMD_KBD_DISABLE => self.control |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.control &= !CTR_KBD_DISABLE,
            CMD_READ_OUTP => self.push(self.output_port),
            CMD_RESET_CPU => {
                self.metrics.reset_count.inc();
                if let Err(e) = self.reset_evt.write(1) {
                    tracing::error!("i8042 cannot signal the reset event: {e}");
                }
            }
            _ => tracing::debug!("i8042: ignoring controller command {cmd:#x}"),
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => {
                self.control = byte;
                // The system flag mirrors CTR bit 2.
                self.status = (self.status & !SB_SYSTEM) | (byte & CTR_SYSTEM);
            }
            Some(CMD_WRITE_OUTP) => self.output_port = byte,
            // Bytes for the absent mouse are dropped.
            Some(_) => {}
            None => self.keyboard_command(byte),
        }
    }

    /// A byte written to the data port goes to the keyboard, which answers every byte (a
    /// command or its argument) with an acknowledgement.
    fn keyboard_command(&mut self, byte: u8) {
        match byte {
            KBD_RESET => self.push_from_keyboard(&[KBD_ACK, KBD_BAT_OK]),
            KBD_GET_ID => self.push_from_keyboard(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_ECHO => self.push_from_keyboard(&[KBD_ECHO]),
            _ => self.push_from_keyboard(&[KBD_ACK]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.metrics.read_count.inc();
        data.fill(0);
        let value = match offset {
            DATA => self.read_data(),
            COMMAND => self.status,
            _ => 0xff,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        self.metrics.write_count.inc();
        match offset {
            DATA => self.write_data(value),
            COMMAND => self.write_command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    fn device() -> (I8042, EventFd, EventFd) {
        let reset = evt();
        let irq = evt();
        let dev = I8042::new(reset.try_clone().unwrap(), irq.try_clone().unwrap());
        (dev, reset, irq)
    }

    #[test]
    fn reset_command_signals_the_reset_event() {
        let (mut dev, reset, _) = device();
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert!(reset.read().is_err(), "self-test must not reset");
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn controller_self_test_and_ctr_round_trip() {
        let (mut dev, _, _) = device();
        assert_eq!(read(&mut dev, COMMAND) & SB_OUT_FULL, 0);
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, COMMAND) & SB_OUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA), SELF_TEST_OK);
        assert_eq!(read(&mut dev, COMMAND) & SB_OUT_FULL, 0);

        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA), 0x47);
    }

    #[test]
    fn there_is_no_mouse() {
        let (mut dev, _, _) = device();
        dev.write(COMMAND, &[CMD_AUX_TEST]);
        assert_eq!(read(&mut dev, DATA), AUX_TEST_FAIL);
        // Bytes for the mouse vanish without a reply.
        dev.write(COMMAND, &[CMD_WRITE_AUX]);
        dev.write(DATA, &[0xff]);
        assert_eq!(read(&mut dev, COMMAND) & SB_OUT_FULL, 0);
    }

    #[test]
    fn keyboard_commands_are_acknowledged_with_an_interrupt() {
        let (mut dev, _, irq) = device();
        dev.write(DATA, &[KBD_RESET]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read(&mut dev, DATA), KBD_ACK);
        assert_eq!(read(&mut dev, DATA), KBD_BAT_OK);
        dev.write(DATA, &[KBD_GET_ID]);
        assert_eq!(
            [
                read(&mut dev, DATA),
                read(&mut dev, DATA),
                read(&mut dev, DATA)
            ],
            [KBD_ACK, 0xab, 0x83]
        );
        // Controller replies raise no keyboard interrupt.
        let _ = irq.read();
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert!(irq.read().is_err());
    }

    #[test]
    fn interrupts_follow_the_ctr_enable_bit() {
        let (mut dev, _, irq) = device();
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0]);
        dev.write(DATA, &[0xf4]);
        assert!(irq.read().is_err());
        assert_eq!(read(&mut dev, DATA), KBD_ACK);
    }

    #[test]
    fn ctrl_alt_del_arrives_as_scan_codes_with_an_interrupt() {
        let (mut dev, _reset, irq) = device();
        dev.trigger_ctrl_alt_del();
        assert_eq!(irq.read().unwrap(), 1);
        let bytes: Vec<u8> = (0..8).map(|_| read(&mut dev, DATA)).collect();
        assert_eq!(bytes, [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
        assert_eq!(read(&mut dev, COMMAND) & SB_OUT_FULL, 0);
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_buffer() {
        let (mut dev, _, _) = device();
        for _ in 0..1000 {
            dev.write(DATA, &[KBD_RESET]);
        }
        assert_eq!(dev.output.len(), OUTPUT_CAPACITY);
        // Reading an empty buffer yields 0 and clears "output full".
        for _ in 0..OUTPUT_CAPACITY + 2 {
            read(&mut dev, DATA);
        }
        assert_eq!(read(&mut dev, COMMAND) & SB_OUT_FULL, 0);
    }
}
