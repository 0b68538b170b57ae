//! The MC146818 CMOS RTC at ports 0x70 (index) and 0x71 (data): the guest reads the host's
//! wall-clock time (UTC) from it. Time registers follow register B's binary/BCD and 12/24-hour
//! bits; guest writes to the time registers are ignored (the host clock is authoritative);
//! the rest of the 128-byte NVRAM is plain storage.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY_OF_MONTH: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;
/// Register B: data mode binary (else BCD).
const REG_B_BINARY: u8 = 1 << 2;
/// Register B: 24-hour mode (else 12-hour with bit 7 of the hour as PM).
const REG_B_24H: u8 = 1 << 1;
/// Register A: 32.768 kHz time base, 1024 Hz rate; the update-in-progress bit stays clear.
const REG_A_DEFAULT: u8 = 0x26;
/// Register D: valid RAM and time.
const REG_D_VRT: u8 = 0x80;

/// A calendar date and time in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: u32,
    month: u32,
    day: u32,
    weekday: u32, // 1 = Sunday
    hour: u32,
    minute: u32,
    second: u32,
}

/// Splits seconds since the epoch into a UTC calendar date (Howard Hinnant's civil_from_days).
fn civil_from_unix(secs: u64) -> DateTime {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // 1970-01-01 was a Thursday (weekday 5 with Sunday = 1).
    let weekday = (days + 4) % 7 + 1;
    // All fields are small and non-negative for any u64 seconds count after 1970.
    let field = |v: i64| u32::try_from(v).unwrap_or(0);
    let small = |v: u64| u32::try_from(v).unwrap_or(0);
    DateTime {
        year: field(year),
        month: field(month),
        day: field(day),
        weekday: small(weekday),
        hour: small(rem / 3600),
        minute: small(rem / 60 % 60),
        second: small(rem % 60),
    }
}

fn to_bcd(v: u32) -> u8 {
    // Two BCD digits always fit a byte.
    u8::try_from(((v / 10 % 10) << 4) | (v % 10)).unwrap_or(0)
}

/// The CMOS RTC and NVRAM.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    clock: fn() -> u64,
}

/// The CMOS index register and NVRAM, for snapshots (the clock is the host's).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    /// Selected register.
    pub index: u8,
    /// The 128 bytes of NVRAM.
    pub nvram: Vec<u8>,
}

impl Cmos {
    /// The index register and NVRAM.
    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    /// Takes a snapshot's index register and NVRAM (exactly 128 bytes).
    pub fn restore(&mut self, state: &CmosState) -> Result<(), String> {
        self.nvram = state
            .nvram
            .as_slice()
            .try_into()
            .map_err(|_| format!("CMOS NVRAM of {} bytes (expected 128)", state.nvram.len()))?;
        self.index = state.index & 0x7f;
        Ok(())
    }
}

fn host_unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(host_unix_time)
    }
}

impl Cmos {
    /// A CMOS whose clock reads the host's wall-clock time.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_clock(clock: fn() -> u64) -> Self {
        let mut nvram = [0u8; 128];
        nvram[REG_A] = REG_A_DEFAULT;
        nvram[REG_B] = REG_B_24H;
        nvram[REG_D] = REG_D_VRT;
        Self {
            index: 0,
            nvram,
            clock,
        }
    }

    fn encode(&self, v: u32) -> u8 {
        if self.nvram[REG_B] & REG_B_BINARY != 0 {
            u8::try_from(v % 256).unwrap_or(0)
        } else {
            to_bcd(v)
        }
    }

    fn read_register(&mut self, index: usize) -> u8 {
        let now = civil_from_unix((self.clock)());
        match index {
            SECONDS => self.encode(now.second),
            MINUTES => self.encode(now.minute),
            HOURS => {
                if self.nvram[REG_B] & REG_B_24H != 0 {
                    self.encode(now.hour)
                } else {
                    let pm = if now.hour >= 12 { 0x80 } else { 0 };
                    let h12 = match now.hour % 12 {
                        0 => 12,
                        h => h,
                    };
                    self.encode(h12) | pm
                }
            }
            WEEKDAY => self.encode(now.weekday),
            DAY_OF_MONTH => self.encode(now.day),
            MONTH => self.encode(now.month),
            YEAR => self.encode(now.year % 100),
            CENTURY => self.encode(now.year / 100),
            REG_C => std::mem::take(&mut self.nvram[REG_C]),
            _ => self.nvram.get(index).copied().unwrap_or(0xff),
        }
    }

    fn write_register(&mut self, index: usize, value: u8) {
        match index {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY_OF_MONTH | MONTH | YEAR | CENTURY => {
                tracing::debug!("cmos: guest write to time register {index:#x} ignored");
            }
            // Keep the time base running and the update-in-progress bit clear.
            REG_A => self.nvram[REG_A] = (value & 0x7f) | (REG_A_DEFAULT & 0x70),
            REG_C | REG_D => {}
            _ => {
                if let Some(slot) = self.nvram.get_mut(index) {
                    *slot = value;
                }
            }
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            0 => self.index,
            1 => self.read_register(usize::from(self.index & 0x7f)),
            _ => 0xff,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port masks NMIs on real hardware; the index is 7 bits.
            0 => self.index = value & 0x7f,
            1 => self.write_register(usize::from(self.index), value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index]);
        let mut data = [0u8];
        cmos.read(1, &mut data);
        data[0]
    }

    #[test]
    fn unix_time_converts_to_the_right_calendar_date() {
        // 2026-11-25 14:29:51 UTC, a Wednesday.
        let t = civil_from_unix(1_795_616_991);
        assert_eq!(
            t,
            DateTime {
                year: 2026,
                month: 11,
                day: 25,
                weekday: 4,
                hour: 14,
                minute: 29,
                second: 51
            }
        );
        assert_eq!(civil_from_unix(0).weekday, 5);
        // Leap day.
        let t = civil_from_unix(951_782_400); // 2000-02-29 00:00:00
        assert_eq!((t.year, t.month, t.day), (2000, 2, 29));
    }

    #[test]
    fn time_registers_read_in_bcd_by_default() {
        let mut cmos = Cmos::with_clock(|| 1_795_616_991);
        assert_eq!(read(&mut cmos, 0x00), 0x51);
        assert_eq!(read(&mut cmos, 0x02), 0x29);
        assert_eq!(read(&mut cmos, 0x04), 0x14);
        assert_eq!(read(&mut cmos, 0x07), 0x25);
        assert_eq!(read(&mut cmos, 0x08), 0x11);
        assert_eq!(read(&mut cmos, 0x09), 0x26);
        assert_eq!(read(&mut cmos, 0x32), 0x20);
        assert_eq!(read(&mut cmos, 0x0d), REG_D_VRT);
        assert_eq!(
            read(&mut cmos, 0x0a) & 0x80,
            0,
            "update in progress must read clear"
        );
    }

    #[test]
    fn binary_and_12_hour_modes_follow_register_b() {
        let mut cmos = Cmos::with_clock(|| 1_795_616_991);
        cmos.write(0, &[0x0b]);
        cmos.write(1, &[REG_B_BINARY]);
        assert_eq!(read(&mut cmos, 0x00), 51);
        assert_eq!(read(&mut cmos, 0x04), 0x80 | 2, "14h is 2 PM");
    }

    #[test]
    fn nvram_is_storage_and_time_writes_are_ignored() {
        let mut cmos = Cmos::with_clock(|| 1_795_616_991);
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0x5a]);
        assert_eq!(read(&mut cmos, 0x40), 0x5a);
        cmos.write(0, &[0x00]);
        cmos.write(1, &[0x00]);
        assert_eq!(read(&mut cmos, 0x00), 0x51);
        // The NMI-mask bit of the index port does not select another register.
        assert_eq!(read(&mut cmos, 0x80 | 0x40), 0x5a);
    }
}
