//! Port I/O, TSC and CPUID from ring 3.
//!
//! Port I/O works in ring 3 because the TSS I/O permission bitmap allows every port (see
//! `entry.rs`); RDTSC and CPUID are unprivileged (CR4.TSD is clear).

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the TSS I/O bitmap grants ring 3 every port; `out` touches no memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; `in` touches no memory.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed at CPL3 (CR4.TSD clear) and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Executes CPUID for `leaf`/`subleaf`, returning (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}
