//! Legacy PC devices: the 16550 serial port, the i8042 (for reset), the CMOS RTC and the
//! boot-complete timer port.

mod boot_timer;
mod cmos;
mod i8042;
mod serial;

pub use boot_timer::{monotonic_us, BootTimer};
pub use cmos::{Cmos, CmosState};
pub use i8042::{I8042State, I8042};
pub use serial::{SerialDevice, SerialError, SerialMetrics, SerialSnapshot};

use vmm_sys_util::eventfd::EventFd;

/// An eventfd used as a vm-superio `Trigger`: an interrupt line (irqfd) or an exit event.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The wrapped eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
