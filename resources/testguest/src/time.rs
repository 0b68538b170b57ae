//! TSC frequency discovery and busy-wait timing (ring 3, RDTSC).

use crate::io;

/// Where the TSC frequency came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscSource {
    /// Hypervisor timing leaf 0x40000010 (KVM/VMware), EAX = TSC kHz.
    Cpuid40000010,
    /// CPUID 0x15: crystal clock times the TSC/crystal ratio.
    Cpuid15,
    /// CPUID 0x16: processor base frequency in MHz.
    Cpuid16,
    /// Calibrated against PIT channel 2.
    Pit,
}

impl TscSource {
    /// Name printed on the `tsc_khz` line.
    pub fn name(self) -> &'static str {
        match self {
            TscSource::Cpuid40000010 => "cpuid40000010",
            TscSource::Cpuid15 => "cpuid15",
            TscSource::Cpuid16 => "cpuid16",
            TscSource::Pit => "pit",
        }
    }
}

/// Finds the TSC frequency in kHz.
pub fn tsc_khz() -> (u64, TscSource) {
    let (max_hv, ..) = io::cpuid(0x4000_0000, 0);
    if (0x4000_0010..0x4001_0000).contains(&max_hv) {
        let (khz, ..) = io::cpuid(0x4000_0010, 0);
        if khz != 0 {
            return (u64::from(khz), TscSource::Cpuid40000010);
        }
    }
    let (max_std, ..) = io::cpuid(0, 0);
    if max_std >= 0x15 {
        let (denom, numer, crystal_hz, _) = io::cpuid(0x15, 0);
        if denom != 0 && numer != 0 && crystal_hz != 0 {
            let khz = u64::from(crystal_hz) * u64::from(numer) / u64::from(denom) / 1000;
            return (khz, TscSource::Cpuid15);
        }
    }
    if max_std >= 0x16 {
        let (mhz, ..) = io::cpuid(0x16, 0);
        if mhz != 0 {
            return (u64::from(mhz) * 1000, TscSource::Cpuid16);
        }
    }
    (pit_calibrate(), TscSource::Pit)
}

// PIT (8254) ports and the NMI status/control port that gates channel 2.
const PIT_CH2: u16 = 0x42;
const PIT_MODE: u16 = 0x43;
const PORT_61: u16 = 0x61;
const PIT_HZ: u64 = 1_193_182;
const CALIBRATE_MS: u64 = 50;

/// Counts TSC ticks while PIT channel 2 counts down `CALIBRATE_MS` (as Linux's
/// `pit_calibrate_tsc`): gate on, speaker off, mode 0, then wait for OUT2 (port 0x61 bit 5).
fn pit_calibrate() -> u64 {
    let latch = PIT_HZ * CALIBRATE_MS / 1000;
    io::outb(PORT_61, (io::inb(PORT_61) & !0x02) | 0x01);
    io::outb(PIT_MODE, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    io::outb(PIT_CH2, (latch & 0xff) as u8);
    io::outb(PIT_CH2, (latch >> 8) as u8);
    let start = io::rdtsc();
    let mut spins = 0u64;
    while io::inb(PORT_61) & 0x20 == 0 {
        spins += 1;
        if spins > 100_000_000 {
            break;
        }
    }
    let ticks = io::rdtsc().wrapping_sub(start);
    (ticks / CALIBRATE_MS).max(1)
}

/// Spins until the TSC reaches `deadline`.
pub fn wait_until(deadline: u64) {
    while (io::rdtsc().wrapping_sub(deadline) as i64) < 0 {
        core::hint::spin_loop();
    }
}
