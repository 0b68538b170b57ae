//! The COM1 console: `TG <key>=<value>` lines written to the 16550 THR at port 0x3f8.
//!
//! The VMM's serial port is always ready, so we do not poll the line status register.

use core::fmt::{self, Write};

use crate::io::outb;

/// COM1 base port; offset 0 is the transmit holding register.
const COM1: u16 = 0x3f8;

/// A writer to COM1.
#[derive(Debug)]
pub struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Writes raw bytes to COM1.
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        outb(COM1, b);
    }
}

/// Prints one `TG ...` line.
pub fn line(args: fmt::Arguments<'_>) {
    let mut c = Com1;
    // Com1 never fails.
    let _ = c.write_str("TG ");
    let _ = c.write_fmt(args);
    let _ = c.write_str("\n");
}

/// Prints `TG <formatted>` and a newline on COM1.
#[macro_export]
macro_rules! tg {
    ($($arg:tt)*) => { $crate::console::line(format_args!($($arg)*)) };
}
