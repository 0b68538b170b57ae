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
    // A vCPU descheduled for longer than the PIT's 55 ms wrap during a calibration (seen on
    // a loaded 2-core host) misses a wrap and overestimates the frequency 2-3x; it can never
    // underestimate it, so the lowest of a few short calibrations is the right one.
    let khz = (0..CALIBRATIONS)
        .map(|_| pit_calibrate())
        .min()
        .unwrap_or(1);
    (khz, TscSource::Pit)
}

// PIT (8254) ports.
const PIT_CH0: u16 = 0x40;
const PIT_MODE: u16 = 0x43;
const PIT_HZ: u64 = 1_193_182;
const CALIBRATE_MS: u64 = 20;
/// Calibrations whose lowest result counts.
const CALIBRATIONS: usize = 3;

/// Reads PIT channel 0's current count with a counter-latch command.
fn pit_ch0_count() -> u16 {
    io::outb(PIT_MODE, 0x00); // latch channel 0
    let lo = io::inb(PIT_CH0);
    let hi = io::inb(PIT_CH0);
    u16::from_le_bytes([lo, hi])
}

/// Counts TSC ticks while PIT channel 0 counts down `CALIBRATE_MS`.
///
/// Channel 0 is used rather than Linux's channel 2 because its gate is always on: channel 2's
/// gate and output go through port 0x61, which QEMU's microvm does not have. Interrupts are off,
/// so reprogramming the system timer has no other effect. The count is read back with latch
/// commands (each an exit to the VMM; a few hundred of them).
fn pit_calibrate() -> u64 {
    let want = PIT_HZ * CALIBRATE_MS / 1000;
    io::outb(PIT_MODE, 0x30); // channel 0, lobyte/hibyte, mode 0, binary
    io::outb(PIT_CH0, 0xff);
    io::outb(PIT_CH0, 0xff);
    let mut last = pit_ch0_count();
    let start = io::rdtsc();
    let mut elapsed = 0u64;
    let mut spins = 0u64;
    loop {
        // Summed read by read, so the 16-bit count may wrap (after 55 ms) between the first
        // and the last read; a gap of 55 ms between two reads still loses a wrap.
        let now = pit_ch0_count();
        elapsed += u64::from(last.wrapping_sub(now));
        last = now;
        spins += 1;
        if elapsed >= want || spins > 10_000_000 {
            let ticks = io::rdtsc().wrapping_sub(start);
            // Scale by what the PIT actually counted (we overshoot by one read).
            return (ticks * PIT_HZ / elapsed.max(1) / 1000).max(1);
        }
    }
}

/// Spins until the TSC reaches `deadline`.
pub fn wait_until(deadline: u64) {
    while (io::rdtsc().wrapping_sub(deadline) as i64) < 0 {
        core::hint::spin_loop();
    }
}
