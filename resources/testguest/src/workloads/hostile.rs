//! `hostile`: a seeded storm of malformed port I/O and MMIO, then checks that the well-formed
//! operations still work.
//!
//! Parameters: `tg.seed` (1), `tg.ops` (20000), `tg.kinds` (a bit mask of the operation kinds
//! in `hostile_mix` order; all by default). Each operation is one of: a port access of 1, 2
//! or 4 bytes, in or out, to any port (half of them near a port something claims: COM1, CMOS,
//! i8042, PIC, PIT, PCI config, boot timer, ...); a `rep ins/outs` of up to 4096 elements; an
//! MMIO load or store of 1, 2, 4 or 8 bytes anywhere in the hole 0xC0000000..4 GiB (aligned or
//! not, page-crossing included); a `rep stos/movs` of up to 64 elements to or from the hole;
//! CMOS index/data garbage; COM1 register garbage (DLAB, FCR, MCR loopback, IER, ...).
//!
//! What is left out, because a guest may legitimately stop or wedge the machine with it:
//! - the reset commands: byte 0xFE reaching port 0x64 (i8042 pulse reset line; anvil stops the
//!   VM), and, should a device ever claim them, bit 2 of port 0xCF9 (PCI reset control) and
//!   bit 0 of port 0x92 (fast reset); such bytes are changed before they are written;
//! - the LAPIC page (0xFEE00000) and the IOAPIC page (0xFEC00000): writes there program the
//!   interrupt controllers, e.g. an INIT IPI to ourselves or an INIT/NMI/SMI redirection entry,
//!   which would reset or stop the vCPU rather than test the VMM (both are KVM's, not anvil's);
//! - port accesses whose bytes would run past port 0xFFFF (the TSS I/O bitmap ends there, so
//!   they #GP in ring 3 by design).
//!
//! Interrupts stay disabled (RFLAGS.IF=0) throughout, so the PIC/PIT/COM1 interrupts the storm
//! may enable are never delivered. After the storm the guest re-initialises COM1 and CMOS
//! register B, as a driver would, and checks: COM1's scratch register round-trips and printing
//! works; the CMOS reads a valid BCD time (seconds 0..59); unclaimed MMIO and ports read as
//! all-ones. Prints `hostile_seed=<s> ops=<n>` first, then `hostile_mix=...` (operations per
//! kind), `hostile_storm_ms=<n>`, `hostile_serial=ok`, `hostile_cmos=ok time=<hh:mm:ss>`,
//! `hostile_unclaimed=ok`, `hostile_ops=<n>` and the result.

use core::arch::asm;

use super::param;
use crate::cmdline::Params;
use crate::{console, exit, io, time};

/// splitmix64: small, seedable, good enough to pick operations.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// One of `items` (not empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Ports something claims (anvil, KVM's in-kernel devices) or that PC guests commonly poke.
const INTERESTING_PORTS: &[u16] = &[
    0x3f8, 0x3f0, 0x60, 0x64, 0x70, 0x71, 0x20, 0x21, 0xa0, 0xa1, 0x40, 0x43, 0x61, 0x4d0, 0xcf8,
    0xcfc, 0x80, 0x92, 0x2f8, 0x3e8, 0x510, 0x600, 0xe9, 0x402, 0xcf9,
];
const COM1: u16 = 0x3f8;
const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;

/// Bytes that must not reach these ports: (port, bits that must be clear, byte that must not be
/// written). See the module docs.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
const PCI_RESET_CONTROL: u16 = 0xcf9;
const PCI_RESET_CPU: u8 = 1 << 2;
const SYSTEM_CONTROL_A: u16 = 0x92;
const FAST_RESET: u8 = 1 << 0;

/// The MMIO hole and the pages left out of it.
const HOLE_START: u64 = 0xc000_0000;
const HOLE_END: u64 = 1 << 32;
const IOAPIC_PAGE: u64 = 0xfec0_0000;
const LAPIC_PAGE: u64 = 0xfee0_0000;
const PAGE: u64 = 0x1000;
/// Addresses where devices live or may live, for half of the MMIO operations.
const INTERESTING_MMIO: &[u64] = &[
    0xd000_0000,
    0xd000_1000,
    0xd000_2000,
    0xfdff_f000,
    IOAPIC_PAGE - 8,
    IOAPIC_PAGE + PAGE,
    LAPIC_PAGE - 8,
    LAPIC_PAGE + PAGE,
    0xfeff_c000,
    0xffff_f000,
    HOLE_START,
];

/// Scratch buffer for `rep ins/outs/movs`.
const BUF_LEN: usize = 64 * 1024;
static mut BUF: [u8; BUF_LEN] = [0; BUF_LEN];

fn buf_ptr() -> *mut u8 {
    core::ptr::addr_of_mut!(BUF).cast::<u8>()
}

/// Operation kinds, in the order of `hostile_mix`.
const KINDS: [&str; 7] = [
    "pio", "rep_pio", "mmio", "rep_mmio", "cmos", "serial", "i8042",
];

/// Runs the workload.
pub fn run(params: &Params<'_>) -> ! {
    let seed = param(params, "seed", 1);
    let ops = param(params, "ops", 20_000);
    let kinds = param(params, "kinds", (1 << KINDS.len()) - 1);
    if kinds & ((1 << KINDS.len()) - 1) == 0 {
        exit::fail(format_args!(
            "bad parameter tg.kinds={kinds:#x}: no operation kind"
        ));
    }
    crate::tg!("hostile_seed={seed} ops={ops}");
    let mut rng = Rng(seed);
    let mut mix = [0u64; KINDS.len()];
    let (khz, _) = time::tsc_khz();
    let start = io::rdtsc();
    let mut done = 0;
    while done < ops {
        // String operations exit once per element (10-20 us each here), so they are rarer.
        let kind = match rng.below(100) {
            0..=37 => 0,
            38..=39 => 1,
            40..=73 => 2,
            74..=77 => 3,
            78..=85 => 4,
            86..=95 => 5,
            _ => 6,
        };
        if kinds & (1 << kind) == 0 {
            continue;
        }
        done += 1;
        mix[kind] += 1;
        match kind {
            0 => pio_op(&mut rng),
            1 => rep_pio_op(&mut rng),
            2 => mmio_op(&mut rng),
            3 => rep_mmio_op(&mut rng),
            4 => cmos_op(&mut rng),
            5 => serial_op(&mut rng),
            _ => i8042_op(&mut rng),
        }
    }
    let storm_ms = io::rdtsc().wrapping_sub(start) / khz.max(1);

    let serial = restore_serial();
    // The storm may have left a partial line (garbage bytes) on the console: end it.
    console::write_bytes(b"\n");
    crate::tg!(
        "hostile_mix={}:{} {}:{} {}:{} {}:{} {}:{} {}:{} {}:{}",
        KINDS[0],
        mix[0],
        KINDS[1],
        mix[1],
        KINDS[2],
        mix[2],
        KINDS[3],
        mix[3],
        KINDS[4],
        mix[4],
        KINDS[5],
        mix[5],
        KINDS[6],
        mix[6]
    );
    crate::tg!("hostile_storm_ms={storm_ms}");
    if let Err(why) = serial {
        exit::fail(format_args!("serial after the storm: {why}"));
    }
    crate::tg!("hostile_serial=ok");
    match check_cmos() {
        Ok((h, m, s)) => crate::tg!("hostile_cmos=ok time={h:02x}:{m:02x}:{s:02x}"),
        Err(why) => exit::fail(format_args!("cmos after the storm: {why}")),
    }
    if let Err(why) = check_unclaimed() {
        exit::fail(format_args!("unclaimed access after the storm: {why}"));
    }
    crate::tg!("hostile_unclaimed=ok");
    crate::tg!("hostile_ops={ops}");
    exit::pass()
}

/// A port: half the time near an interesting one, otherwise anywhere; `size` bytes from it
/// stay at or below 0xFFFF.
fn pick_port(rng: &mut Rng, size: u16) -> u16 {
    let port = if rng.below(2) == 0 {
        rng.pick(INTERESTING_PORTS)
            .wrapping_add(rng.below(8) as u16)
    } else {
        rng.next() as u16
    };
    port.min(0xffff - (size - 1))
}

fn pick_size(rng: &mut Rng) -> u16 {
    rng.pick(&[1, 2, 4])
}

/// Changes the bytes of an `out` of `size` bytes at `port` that would reset the machine.
fn sanitize(port: u16, size: u16, value: u32) -> u32 {
    let mut bytes = value.to_le_bytes();
    for (lane, b) in bytes.iter_mut().enumerate().take(usize::from(size)) {
        match port.wrapping_add(lane as u16) {
            I8042_COMMAND if *b == I8042_RESET => *b = 0,
            PCI_RESET_CONTROL => *b &= !PCI_RESET_CPU,
            SYSTEM_CONTROL_A => *b &= !FAST_RESET,
            _ => {}
        }
    }
    u32::from_le_bytes(bytes)
}

fn pio_op(rng: &mut Rng) {
    let size = pick_size(rng);
    let port = pick_port(rng, size);
    if rng.below(2) == 0 {
        let _ = port_in(port, size);
    } else {
        port_out(port, size, sanitize(port, size, rng.next() as u32));
    }
}

fn rep_pio_op(rng: &mut Rng) {
    let size = pick_size(rng);
    let port = pick_port(rng, size);
    // Counts up to 4096, log-distributed; at most 64 on COM1, whose output would flood the
    // console.
    let max_shift = if (COM1..COM1 + 8).contains(&port) {
        6
    } else {
        12
    };
    let shift = rng.below(max_shift + 1);
    let count = 1 + rng.below(1 << shift) as usize;
    let bytes = count * usize::from(size);
    let out = rng.below(2) == 0;
    if out {
        for i in 0..count {
            let v = sanitize(port, size, rng.next() as u32).to_le_bytes();
            for (j, b) in v.iter().take(usize::from(size)).enumerate() {
                let at = i * usize::from(size) + j;
                // SAFETY: `at < bytes <= 4096 * 4 < BUF_LEN`; BUF is only used from this
                // single-threaded ring-3 workload.
                unsafe { buf_ptr().add(at).write(*b) };
            }
        }
    }
    let p = buf_ptr();
    debug_assert!(bytes <= BUF_LEN);
    // SAFETY: the string instructions read or write `count * size <= BUF_LEN` bytes of BUF
    // (exclusively ours) with the direction flag clear; the TSS bitmap allows every port and
    // `pick_port` keeps the access below port 0x10000.
    unsafe {
        match (out, size) {
            (true, 1) => {
                asm!("rep outsb", in("dx") port, inout("rsi") p => _, inout("rcx") count => _, options(nostack, readonly))
            }
            (true, 2) => {
                asm!("rep outsw", in("dx") port, inout("rsi") p => _, inout("rcx") count => _, options(nostack, readonly))
            }
            (true, _) => {
                asm!("rep outsd", in("dx") port, inout("rsi") p => _, inout("rcx") count => _, options(nostack, readonly))
            }
            (false, 1) => {
                asm!("rep insb", in("dx") port, inout("rdi") p => _, inout("rcx") count => _, options(nostack))
            }
            (false, 2) => {
                asm!("rep insw", in("dx") port, inout("rdi") p => _, inout("rcx") count => _, options(nostack))
            }
            (false, _) => {
                asm!("rep insd", in("dx") port, inout("rdi") p => _, inout("rcx") count => _, options(nostack))
            }
        }
    }
}

/// True when `[addr, addr + len)` lies in the hole and avoids the interrupt controllers.
fn mmio_allowed(addr: u64, len: u64) -> bool {
    let end = addr.saturating_add(len);
    let overlaps = |page: u64| addr < page + PAGE && end > page;
    addr >= HOLE_START && end <= HOLE_END && !overlaps(IOAPIC_PAGE) && !overlaps(LAPIC_PAGE)
}

/// An address for an access of `len` bytes: near an interesting one or anywhere in the hole,
/// re-drawn until [`mmio_allowed`].
fn pick_mmio(rng: &mut Rng, len: u64) -> u64 {
    loop {
        let addr = if rng.below(2) == 0 {
            rng.pick(INTERESTING_MMIO) + rng.below(0x1010)
        } else {
            HOLE_START + rng.below(HOLE_END - HOLE_START)
        };
        if mmio_allowed(addr, len) {
            return addr;
        }
    }
}

fn mmio_op(rng: &mut Rng) {
    let size = rng.pick(&[1u64, 2, 4, 8]);
    let addr = pick_mmio(rng, size);
    let value = rng.next();
    let write = rng.below(2) == 0;
    // SAFETY: `addr..addr + size` lies in the MMIO hole below 4 GiB (mmio_allowed), which the
    // page tables map user-accessible and uncached and which holds no RAM of ours: loads and
    // stores there exit to KVM/anvil and touch no guest memory. `mov` allows any alignment.
    unsafe {
        match (write, size) {
            (true, 1) => {
                asm!("mov byte ptr [{a}], {v:l}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
            (true, 2) => {
                asm!("mov word ptr [{a}], {v:x}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
            (true, 4) => {
                asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
            (true, _) => {
                asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
            (false, 1) => {
                asm!("mov {v:l}, byte ptr [{a}]", a = in(reg) addr, v = out(reg) _, options(nostack))
            }
            (false, 2) => {
                asm!("mov {v:x}, word ptr [{a}]", a = in(reg) addr, v = out(reg) _, options(nostack))
            }
            (false, 4) => {
                asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) _, options(nostack))
            }
            (false, _) => {
                asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) _, options(nostack))
            }
        }
    }
}

fn rep_mmio_op(rng: &mut Rng) {
    let size = rng.pick(&[1u64, 2, 4, 8]);
    let shift = rng.below(7);
    let count = 1 + rng.below(1 << shift);
    let addr = pick_mmio(rng, size * count);
    let value = rng.next();
    let p = buf_ptr();
    // SAFETY: the MMIO side `addr..addr + size * count` is in the hole (see `mmio_op`); the RAM
    // side is at most 512 bytes of BUF, which is ours; the direction flag is clear.
    unsafe {
        match (rng.below(3), size) {
            (0, 1) => {
                asm!("rep stosb", inout("rdi") addr => _, inout("rcx") count => _, in("rax") value, options(nostack))
            }
            (0, 2) => {
                asm!("rep stosw", inout("rdi") addr => _, inout("rcx") count => _, in("rax") value, options(nostack))
            }
            (0, 4) => {
                asm!("rep stosd", inout("rdi") addr => _, inout("rcx") count => _, in("rax") value, options(nostack))
            }
            (0, _) => {
                asm!("rep stosq", inout("rdi") addr => _, inout("rcx") count => _, in("rax") value, options(nostack))
            }
            (1, 1) => {
                asm!("rep movsb", inout("rdi") addr => _, inout("rsi") p => _, inout("rcx") count => _, options(nostack))
            }
            (1, 2) => {
                asm!("rep movsw", inout("rdi") addr => _, inout("rsi") p => _, inout("rcx") count => _, options(nostack))
            }
            (1, 4) => {
                asm!("rep movsd", inout("rdi") addr => _, inout("rsi") p => _, inout("rcx") count => _, options(nostack))
            }
            (1, _) => {
                asm!("rep movsq", inout("rdi") addr => _, inout("rsi") p => _, inout("rcx") count => _, options(nostack))
            }
            (_, 1) => {
                asm!("rep movsb", inout("rdi") p => _, inout("rsi") addr => _, inout("rcx") count => _, options(nostack))
            }
            (_, 2) => {
                asm!("rep movsw", inout("rdi") p => _, inout("rsi") addr => _, inout("rcx") count => _, options(nostack))
            }
            (_, 4) => {
                asm!("rep movsd", inout("rdi") p => _, inout("rsi") addr => _, inout("rcx") count => _, options(nostack))
            }
            (_, _) => {
                asm!("rep movsq", inout("rdi") p => _, inout("rsi") addr => _, inout("rcx") count => _, options(nostack))
            }
        }
    }
}

fn cmos_op(rng: &mut Rng) {
    // Any index, NMI-disable bit included; then read or write the data port.
    io::outb(CMOS_INDEX, rng.next() as u8);
    if rng.below(2) == 0 {
        let _ = io::inb(CMOS_DATA);
    } else {
        io::outb(CMOS_DATA, rng.next() as u8);
    }
}

fn serial_op(rng: &mut Rng) {
    let reg = rng.below(8) as u16;
    if rng.below(2) == 0 {
        let _ = io::inb(COM1 + reg);
    } else {
        // Mostly the control registers: LCR (DLAB), FCR, MCR (loopback), IER, divisor.
        io::outb(COM1 + reg, rng.next() as u8);
    }
}

fn i8042_op(rng: &mut Rng) {
    let port = rng.pick(&[0x60u16, 0x64]);
    if rng.below(2) == 0 {
        let _ = io::inb(port);
    } else {
        io::outb(port, sanitize(port, 1, rng.next() as u32) as u8);
    }
}

fn port_in(port: u16, size: u16) -> u32 {
    let v: u32;
    // SAFETY: the TSS bitmap allows every port and the access ends at or below 0xFFFF; `in`
    // touches no memory.
    unsafe {
        match size {
            1 => asm!("in al, dx", in("dx") port, inout("eax") 0u32 => v, options(nomem, nostack)),
            2 => asm!("in ax, dx", in("dx") port, inout("eax") 0u32 => v, options(nomem, nostack)),
            _ => asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)),
        }
    }
    v
}

fn port_out(port: u16, size: u16, value: u32) {
    // SAFETY: as for `port_in`; `out` touches no memory.
    unsafe {
        match size {
            1 => asm!("out dx, al", in("dx") port, in("eax") value, options(nomem, nostack)),
            2 => asm!("out dx, ax", in("dx") port, in("eax") value, options(nomem, nostack)),
            _ => asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)),
        }
    }
}

// 16550 registers.
const UART_RBR: u16 = 0;
const UART_IER: u16 = 1;
const UART_IIR_FCR: u16 = 2;
const UART_LCR: u16 = 3;
const UART_MCR: u16 = 4;
const UART_LSR: u16 = 5;
const UART_SCR: u16 = 7;
const LCR_8N1: u8 = 0x03;
const MCR_OUT2: u8 = 0x08;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;

/// Re-initialises COM1 the way a driver would (DLAB off, 8N1, no loopback, interrupts off,
/// receive FIFO drained) and checks that its registers behave.
fn restore_serial() -> Result<(), &'static str> {
    io::outb(COM1 + UART_LCR, LCR_8N1);
    io::outb(COM1 + UART_IER, 0);
    io::outb(COM1 + UART_IIR_FCR, 0);
    io::outb(COM1 + UART_MCR, MCR_OUT2);
    for _ in 0..256 {
        if io::inb(COM1 + UART_LSR) & LSR_DATA_READY == 0 {
            break;
        }
        let _ = io::inb(COM1 + UART_RBR);
    }
    let _ = io::inb(COM1 + UART_IIR_FCR);
    if io::inb(COM1 + UART_LSR) & LSR_DATA_READY != 0 {
        return Err("receive FIFO does not drain");
    }
    if io::inb(COM1 + UART_LSR) & LSR_THR_EMPTY == 0 {
        return Err("transmitter not ready");
    }
    if io::inb(COM1 + UART_LCR) != LCR_8N1 || io::inb(COM1 + UART_MCR) != MCR_OUT2 {
        return Err("LCR or MCR do not read back");
    }
    for v in [0x5a, 0xa5] {
        io::outb(COM1 + UART_SCR, v);
        if io::inb(COM1 + UART_SCR) != v {
            return Err("scratch register does not read back");
        }
    }
    Ok(())
}

// CMOS RTC registers (MC146818).
const RTC_SECONDS: u8 = 0x00;
const RTC_MINUTES: u8 = 0x02;
const RTC_HOURS: u8 = 0x04;
const RTC_REG_B: u8 = 0x0b;
/// Register B: 24-hour mode, BCD, no interrupts, updates running.
const REG_B_24H_BCD: u8 = 0x02;

fn cmos_read(index: u8) -> u8 {
    io::outb(CMOS_INDEX, index);
    io::inb(CMOS_DATA)
}

fn bcd_below(v: u8, limit: u8) -> bool {
    v & 0xf <= 9 && v >> 4 <= 9 && (v >> 4) * 10 + (v & 0xf) < limit
}

/// Puts register B back to BCD/24h (the storm may have changed it) and reads the time.
fn check_cmos() -> Result<(u8, u8, u8), &'static str> {
    io::outb(CMOS_INDEX, RTC_REG_B);
    io::outb(CMOS_DATA, REG_B_24H_BCD);
    if cmos_read(RTC_REG_B) != REG_B_24H_BCD {
        return Err("register B does not read back");
    }
    let (s, m, h) = (
        cmos_read(RTC_SECONDS),
        cmos_read(RTC_MINUTES),
        cmos_read(RTC_HOURS),
    );
    if !bcd_below(s, 60) {
        return Err("seconds register is not BCD 00..59");
    }
    if !bcd_below(m, 60) || !bcd_below(h, 24) {
        return Err("minutes or hours are not BCD");
    }
    Ok((h, m, s))
}

/// Unclaimed MMIO (outside the virtio window, where no device is ever placed) and unclaimed
/// ports read as all-ones at every size.
fn check_unclaimed() -> Result<(), &'static str> {
    for addr in [HOLE_START, 0xc800_1230, 0xfe00_0000] {
        let (b, w, d, q): (u8, u16, u32, u64);
        // SAFETY: aligned loads from the MMIO hole (see `mmio_op`); nothing claims these
        // addresses, so they exit to anvil and touch no memory.
        unsafe {
            asm!("mov {v}, byte ptr [{a}]", a = in(reg) addr, v = out(reg_byte) b, options(nostack, readonly));
            asm!("mov {v:x}, word ptr [{a}]", a = in(reg) addr, v = out(reg) w, options(nostack, readonly));
            asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) d, options(nostack, readonly));
            asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) q, options(nostack, readonly));
        }
        if b != u8::MAX || w != u16::MAX || d != u32::MAX || q != u64::MAX {
            return Err("an unclaimed MMIO read did not return all-ones");
        }
    }
    // COM2 and the PCI config data port: nothing claims them.
    for port in [0x2f8u16, 0xcfc] {
        if port_in(port, 1) != 0xff || port_in(port, 2) != 0xffff || port_in(port, 4) != u32::MAX {
            return Err("an unclaimed port read did not return all-ones");
        }
    }
    Ok(())
}
