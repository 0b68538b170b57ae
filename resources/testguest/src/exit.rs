//! Ending the run: the result line, then reset through the i8042, then a deliberate triple fault.

use core::fmt;

use crate::{entry, io, phys};

/// i8042 command port; command 0xFE pulses the CPU reset line.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Prints `TG result=pass` and resets.
pub fn pass() -> ! {
    crate::tg!("result=pass");
    reset()
}

/// Prints `TG result=fail reason=<args>` and resets.
pub fn fail(args: fmt::Arguments<'_>) -> ! {
    crate::tg!("result=fail reason={}", args);
    reset()
}

/// Resets the machine: i8042 first; if we are still running (no i8042), triple-fault.
pub fn reset() -> ! {
    io::outb(I8042_COMMAND, I8042_RESET);
    // Give a VMM that handles the reset asynchronously a moment before forcing the issue.
    let start = io::rdtsc();
    while io::rdtsc().wrapping_sub(start) < 100_000_000 {
        core::hint::spin_loop();
    }
    triple_fault()
}

/// Clears every IDT gate (the IDT is user-accessible memory) and raises #UD: the CPU finds no
/// present gate for #UD, then none for #GP and #DF, and shuts down (a triple fault).
pub fn triple_fault() -> ! {
    let idt = entry::idt_addr();
    for i in 0..(entry::IDT_VECTORS as u64 * 16 / 8) {
        phys::write_u64(idt + i * 8, 0);
    }
    loop {
        // SAFETY: `ud2` only raises #UD; with the IDT cleared that ends the VM, which is the
        // purpose of this function.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack)) }
    }
}

/// Ring-3 target of the exception stubs: prints the fault and resets.
#[no_mangle]
extern "C" fn tg_fault_report() -> ! {
    static REPORTING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
    if REPORTING.swap(true, core::sync::atomic::Ordering::Relaxed) {
        // A fault while reporting a fault: do not loop.
        triple_fault()
    }
    let f = entry::fault_info();
    if f.vector == 14 {
        crate::tg!("fault_addr={:#x}", f.cr2);
    }
    fail(format_args!(
        "exception vector={} rip={:#x} err={:#x}",
        f.vector, f.rip, f.err
    ))
}
