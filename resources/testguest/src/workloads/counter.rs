//! `counter`: `TG count=<n>` every `tg.period_ms` ms (default 100), TSC-timed in ring 3, forever
//! or `tg.count=<N>` times then pass. First prints `TG tsc_khz=<n> source=<where from>`.
//! Between ticks it polls the i8042 keyboard: every scan code is printed as `TG key=<hex>`, and
//! Ctrl+Alt+Del (scan code set 1, as a translating controller delivers it) prints
//! `TG ctrl-alt-del` and ends the run with a pass and a reset, as a Linux guest reboots.

use super::{param, param_opt};
use crate::cmdline::Params;
use crate::{exit, io, time};

/// Runs the workload.
pub fn run(params: &Params<'_>) -> ! {
    let period_ms = param(params, "period_ms", 100);
    let count = param_opt(params, "count");
    let (khz, source) = time::tsc_khz();
    crate::tg!("tsc_khz={khz} source={}", source.name());
    let period = khz.saturating_mul(period_ms).max(1);
    let mut deadline = io::rdtsc();
    let mut n = 0u64;
    let mut keyboard = Keyboard::default();
    loop {
        if count.is_some_and(|c| n >= c) {
            exit::pass()
        }
        deadline = deadline.wrapping_add(period);
        time::wait_until(deadline);
        n += 1;
        crate::tg!("count={n}");
        if keyboard.poll() {
            crate::tg!("ctrl-alt-del");
            exit::pass()
        }
    }
}

/// i8042 ports and the status register's output-buffer-full bit.
const I8042_DATA: u16 = 0x60;
const I8042_STATUS: u16 = 0x64;
const STATUS_OUT_FULL: u8 = 0x01;

/// Tracks Ctrl and Alt from set-1 scan codes.
#[derive(Default)]
struct Keyboard {
    ctrl: bool,
    alt: bool,
    extended: bool,
}

impl Keyboard {
    /// Reads what the keyboard sent; true once Del is pressed with Ctrl and Alt held.
    fn poll(&mut self) -> bool {
        let mut seen = false;
        // Bounded: a controller that always reports data cannot keep us here.
        for _ in 0..64 {
            if io::inb(I8042_STATUS) & STATUS_OUT_FULL == 0 {
                break;
            }
            let code = io::inb(I8042_DATA);
            crate::tg!("key={code:#04x}");
            if code == 0xe0 {
                self.extended = true;
                continue;
            }
            let pressed = code & 0x80 == 0;
            match (self.extended, code & 0x7f) {
                (_, 0x1d) => self.ctrl = pressed,
                (_, 0x38) => self.alt = pressed,
                (true, 0x53) if pressed && self.ctrl && self.alt => seen = true,
                _ => {}
            }
            self.extended = false;
        }
        seen
    }
}
