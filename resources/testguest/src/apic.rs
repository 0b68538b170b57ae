//! The local APIC and the IOAPIC, programmed from ring 3 through MMIO (the MMIO hole is mapped
//! uncached and user-accessible), and the legacy 8259 PICs, masked through ports.
//!
//! Register layouts: Intel SDM Vol. 3A chapter 11 (local APIC), the 82093AA IOAPIC datasheet.

use crate::{io, phys};

/// Local APIC MMIO base (the reset value of IA32_APIC_BASE; we never move it).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_SVR: u64 = 0xf0;
/// First of the eight interrupt request registers (vectors 0..31), 16 bytes apart.
const LAPIC_IRR: u64 = 0x200;
/// SVR bit 8: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;

/// Reads a local APIC register.
pub fn lapic_read(reg: u64) -> u32 {
    phys::mmio_read_u32(LAPIC_BASE + reg)
}

/// Writes a local APIC register.
pub fn lapic_write(reg: u64, value: u32) {
    phys::mmio_write_u32(LAPIC_BASE + reg, value)
}

/// This CPU's local APIC ID.
pub fn lapic_id() -> u8 {
    (lapic_read(LAPIC_ID) >> 24) as u8
}

/// True when `vector` is pending in the local APIC's interrupt request register.
pub fn lapic_irr(vector: u8) -> bool {
    let reg = LAPIC_IRR + u64::from(vector / 32) * 0x10;
    lapic_read(reg) & (1 << (vector % 32)) != 0
}

/// Software-enables the local APIC with `spurious` as its spurious-interrupt vector and accepts
/// every priority (TPR 0).
pub fn lapic_enable(spurious: u8) {
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, SVR_ENABLE | u32::from(spurious));
}

// IOAPIC: an index register and a data window.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOAPIC_REG_ID: u32 = 0x00;
const IOAPIC_REG_VER: u32 = 0x01;
const IOAPIC_REDTBL: u32 = 0x10;
/// Redirection entry bit 16: masked.
const REDIR_MASKED: u32 = 1 << 16;

/// One IOAPIC at `base`.
#[derive(Debug, Clone, Copy)]
pub struct IoApic {
    base: u64,
}

impl IoApic {
    /// The IOAPIC whose registers are at `base` (4-byte aligned, in the MMIO hole).
    pub fn new(base: u64) -> Self {
        Self { base }
    }

    fn read(self, reg: u32) -> u32 {
        phys::mmio_write_u32(self.base + IOREGSEL, reg);
        phys::mmio_read_u32(self.base + IOWIN)
    }

    fn write(self, reg: u32, value: u32) {
        phys::mmio_write_u32(self.base + IOREGSEL, reg);
        phys::mmio_write_u32(self.base + IOWIN, value);
    }

    /// The APIC ID in the IOAPIC's ID register (bits 27:24).
    pub fn id(self) -> u8 {
        ((self.read(IOAPIC_REG_ID) >> 24) & 0xf) as u8
    }

    /// Number of redirection entries (pins).
    pub fn pins(self) -> u32 {
        ((self.read(IOAPIC_REG_VER) >> 16) & 0xff) + 1
    }

    /// Routes `pin` to `vector` on the CPU with APIC ID `dest`: fixed delivery, physical
    /// destination, active high, edge triggered; `masked` keeps the pin from delivering.
    pub fn route(self, pin: u32, vector: u8, dest: u8, masked: bool) {
        let reg = IOAPIC_REDTBL + 2 * pin;
        // Mask first, then set the destination, then write the low half with the vector.
        self.write(reg, REDIR_MASKED);
        self.write(reg + 1, u32::from(dest) << 24);
        let low = u32::from(vector) | if masked { REDIR_MASKED } else { 0 };
        self.write(reg, low);
    }

    /// Masks `pin`.
    pub fn mask(self, pin: u32) {
        self.write(IOAPIC_REDTBL + 2 * pin, REDIR_MASKED);
    }

    /// The low half of `pin`'s redirection entry.
    pub fn entry_low(self, pin: u32) -> u32 {
        self.read(IOAPIC_REDTBL + 2 * pin)
    }
}

// 8259A PICs: writing the data port outside an initialization sequence sets the mask (OCW1).
const PIC1_DATA: u16 = 0x21;
const PIC2_DATA: u16 = 0xa1;

/// Masks every line of both 8259 PICs, so that the legacy IRQs reach the CPU only through the
/// IOAPIC (the PIC's output would otherwise arrive through LINT0 as ExtINT, with the vectors an
/// uninitialized PIC gives: 0..15, the exception vectors).
pub fn mask_pics() {
    io::outb(PIC1_DATA, 0xff);
    io::outb(PIC2_DATA, 0xff);
}
