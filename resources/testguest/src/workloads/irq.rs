//! `irq`: device interrupts routed through the IOAPIC to a counting CPL0 stub while ring 3 runs
//! with RFLAGS.IF set.
//!
//! Ring 3 masks the 8259 PICs, software-enables the local APIC, finds the IOAPIC pin of the
//! source's ISA IRQ in the MADT (cross-checked with the MP table) and programs its redirection
//! entry (fixed, physical destination = this CPU's APIC ID, edge, vector
//! `IRQ_VECTOR_BASE + irq`), all through MMIO. It then sets IF through the #UD gate
//! ([`entry::set_interrupts`]) and asks the source for one interrupt at a time, waiting for the
//! stub's counter to move before asking again (an edge that arrives while the previous one is
//! still pending would be merged, so one at a time keeps the count exact).
//!
//! Parameters: `tg.irq_source=serial|pit|virtio-rng` (serial; virtio-rng: the first entropy
//! device's used-buffer interrupt, one 16-byte request per trigger), `tg.irq_count=<N>` (16) deliveries wanted,
//! `tg.timeout_ms` (2000), `tg.irq_mask=1` (leave the IOAPIC pin masked), `tg.irq_if=0` (leave
//! IF clear in ring 3), `tg.irq_expect=some|none` (some: pass when at least N deliveries were
//! counted within the timeout; none: pass when none were, after waiting the whole timeout).
//!
//! Prints `irq_source=<name> irq=<isa irq> pin=<pin> ioapic_id=<id>`, `irq_vector=<v>`,
//! `irq_tx=...` (the serial source's bytes), `irq_rflags_if=<0|1>` (IF as ring 3 reads it with
//! pushfq after the gate; under PVM this is the host's view and reads 1 even when the guest's IF
//! is clear), `irq_triggers=<n>`, `irq_count=<n>`, `irq_pending=<0|1>` (the vector's LAPIC IRR
//! bit at the end: 1 when an interrupt was held off by IF=0), `irq_latency_ns=<n>` (mean time
//! from asking for an interrupt to seeing it counted), `irq_trigger_ns=<n>` (asking with the
//! pin masked), `irq_gate_ns=<n>` (a ring 3 -> CPL0 -> ring 3 round trip through the #UD
//! gate), then the result. The `_ns` figures are for humans; nothing asserts on them.
//!
//! Adding a source (a virtio device's used-buffer interrupt, say) means implementing
//! [`IrqSource`] for it and naming it in [`run`].

use super::param;
use crate::apic::{self, IoApic};
use crate::cmdline::Params;
use crate::dma::Arena;
use crate::virtio::Chain;
use crate::{console, entry, exit, io, tables, time};

/// A device that raises an edge-triggered interrupt on an ISA IRQ when asked.
trait IrqSource {
    /// Name printed on the `irq_source` line.
    fn name(&self) -> &'static str;
    /// The ISA IRQ (before any source override) the device interrupts on.
    fn isa_irq(&self) -> u8;
    /// Turns the device's interrupt output on; may raise the first interrupt at once.
    fn enable(&mut self);
    /// Acknowledges the last interrupt at the device and asks it for one more.
    fn trigger(&mut self);
    /// Turns the device's interrupt output off.
    fn disable(&mut self);
}

// 16550 UART registers (offsets from the base port) and bits.
const COM1: u16 = 0x3f8;
const UART_THR: u16 = 0;
const UART_IER: u16 = 1;
const UART_IIR: u16 = 2;
const UART_MCR: u16 = 4;
const IER_THRE: u8 = 1 << 1;
const MCR_DTR_RTS: u8 = 0x03;
const MCR_OUT2: u8 = 1 << 3;

/// COM1's transmitter-holding-register-empty interrupt (IRQ 4): every byte written raises it
/// again once the previous one was acknowledged by reading IIR.
struct Serial;

impl IrqSource for Serial {
    fn name(&self) -> &'static str {
        "serial"
    }
    fn isa_irq(&self) -> u8 {
        4
    }
    fn enable(&mut self) {
        console::write_bytes(b"TG irq_tx=");
        io::outb(COM1 + UART_MCR, MCR_DTR_RTS | MCR_OUT2);
        io::outb(COM1 + UART_IER, IER_THRE);
    }
    fn trigger(&mut self) {
        let _ = io::inb(COM1 + UART_IIR);
        io::outb(COM1 + UART_THR, b'.');
    }
    fn disable(&mut self) {
        io::outb(COM1 + UART_IER, 0);
        let _ = io::inb(COM1 + UART_IIR);
        io::outb(COM1 + UART_MCR, MCR_OUT2);
        console::write_bytes(b"\n");
    }
}

// 8254 PIT channel 0 (IRQ 0).
const PIT_CH0: u16 = 0x40;
const PIT_MODE: u16 = 0x43;
/// Channel 0, lobyte/hibyte, mode 0 (interrupt on terminal count), binary.
const PIT_ONE_SHOT: u8 = 0x30;
/// 1193 ticks of 1.193182 MHz: one millisecond.
const PIT_1MS: u16 = 1193;

/// PIT channel 0 in one-shot mode: each trigger reloads the count and raises IRQ 0 a
/// millisecond later.
struct Pit;

impl IrqSource for Pit {
    fn name(&self) -> &'static str {
        "pit"
    }
    fn isa_irq(&self) -> u8 {
        0
    }
    fn enable(&mut self) {}
    fn trigger(&mut self) {
        let [lo, hi] = PIT_1MS.to_le_bytes();
        io::outb(PIT_MODE, PIT_ONE_SHOT);
        io::outb(PIT_CH0, lo);
        io::outb(PIT_CH0, hi);
    }
    fn disable(&mut self) {
        // A mode word without a count stops channel 0 (the counter waits for its count).
        io::outb(PIT_MODE, PIT_ONE_SHOT);
    }
}

/// A virtio-rng device with used-buffer interrupts on: each trigger acknowledges the interrupt
/// status, reclaims what the device returned and submits one 16-byte request.
struct VirtioRng {
    rng: super::rng::Rng,
    buf: u64,
}

/// Bytes asked for per virtio-rng trigger.
const VIRTIO_RNG_REQ: u32 = 16;

impl IrqSource for VirtioRng {
    fn name(&self) -> &'static str {
        "virtio-rng"
    }
    fn isa_irq(&self) -> u8 {
        u8::try_from(self.rng.dev.irq).unwrap_or(u8::MAX)
    }
    fn enable(&mut self) {
        self.rng.queue.set_interrupts(true);
    }
    fn trigger(&mut self) {
        self.rng.dev.ack_interrupt();
        while let Ok(Some(_)) = self.rng.queue.poll() {}
        let mut chain = Chain::new();
        // A full queue (the device is slow to return buffers) just skips this trigger.
        if chain.writable(self.buf, VIRTIO_RNG_REQ).is_ok() && self.rng.queue.submit(&chain).is_ok()
        {
            self.rng.queue.notify();
        }
    }
    fn disable(&mut self) {
        self.rng.queue.set_interrupts(false);
        self.rng.dev.ack_interrupt();
    }
}

/// Samples of the cost measurements printed at the end.
const COST_SAMPLES: u64 = 16;

/// How long to wait for one interrupt before asking the device again.
const PER_TRIGGER_WAIT_MS: u64 = 10;

/// Runs the workload.
pub fn run(info: &crate::bootinfo::BootInfo, params: &Params<'_>) -> ! {
    let want = param(params, "irq_count", 16);
    let timeout_ms = param(params, "timeout_ms", 2000);
    let masked = param(params, "irq_mask", 0) != 0;
    let set_if = param(params, "irq_if", 1) != 0;
    let expect_none = match params.get("irq_expect") {
        None | Some("some") => false,
        Some("none") => true,
        Some(other) => exit::fail(format_args!("bad parameter tg.irq_expect={other}")),
    };
    let mut serial = Serial;
    let mut pit = Pit;
    let mut virtio_rng = None;
    let source: &mut dyn IrqSource = match params.get("irq_source") {
        None | Some("serial") => &mut serial,
        Some("pit") => &mut pit,
        Some("virtio-rng") => virtio_rng.insert(open_virtio_rng(info, params)),
        Some(other) => exit::fail(format_args!("bad parameter tg.irq_source={other}")),
    };

    let irq = source.isa_irq();
    let route = match (tables::madt_route(info.rsdp, irq), tables::mp_route(irq)) {
        (Ok(a), Ok(m)) if a != m => exit::fail(format_args!(
            "MADT and MP table disagree on IRQ {irq}: {a:?} vs {m:?}"
        )),
        (Ok(r), _) | (Err(_), Ok(r)) => r,
        (Err(e), Err(_)) => exit::fail(format_args!("no route for IRQ {irq}: {e}")),
    };
    let ioapic = IoApic::new(route.ioapic_addr);
    if route.pin >= ioapic.pins() {
        exit::fail(format_args!("IOAPIC has no pin {}", route.pin));
    }
    let vector = entry::IRQ_VECTOR_BASE + irq;
    crate::tg!(
        "irq_source={} irq={irq} pin={} ioapic_id={} ioapic_id_reg={}",
        source.name(),
        route.pin,
        route.ioapic_id,
        ioapic.id()
    );
    crate::tg!("irq_vector={vector}");

    apic::mask_pics();
    apic::lapic_enable(entry::SPURIOUS_VECTOR);
    ioapic.route(route.pin, vector, apic::lapic_id(), masked);
    if set_if {
        entry::set_interrupts(true);
    }
    let if_seen = (entry::read_rflags() >> 9) & 1;

    let (khz, _) = time::tsc_khz();
    let ms = khz.max(1);
    let start = io::rdtsc();
    let deadline = start.wrapping_add(timeout_ms.saturating_mul(ms));
    let base = entry::irq_count(vector);
    let delivered = || entry::irq_count(vector).wrapping_sub(base);
    let (mut triggers, mut waited, mut latency_sum) = (0u64, 0u64, 0u64);
    // A source that is slow to answer (its thread not scheduled within the per-trigger wait)
    // gets asked again, and a virtio device may then answer both requests with one interrupt:
    // keep asking until `want` interrupts arrived. When none are expected, ask `want` times.
    let max_triggers = if expect_none {
        want
    } else {
        want.saturating_mul(4)
    };
    source.enable();
    while triggers < max_triggers && delivered() < want && before(deadline) {
        let seen = delivered();
        let asked = io::rdtsc();
        source.trigger();
        triggers += 1;
        let give_up = asked.wrapping_add(PER_TRIGGER_WAIT_MS * ms);
        while delivered() == seen && before(give_up) && before(deadline) {
            core::hint::spin_loop();
        }
        if delivered() != seen {
            latency_sum += io::rdtsc().wrapping_sub(asked);
            waited += 1;
        }
    }
    // Stragglers (and, when none are expected, the rest of the timeout).
    while (expect_none || delivered() < want) && before(deadline) {
        core::hint::spin_loop();
    }
    let count = delivered();
    let entry_low = ioapic.entry_low(route.pin);
    let pending = apic::lapic_irr(vector);
    ioapic.mask(route.pin);
    // Costs for comparison: asking the device with the pin masked (no delivery), and a round
    // trip through the CPL0 #UD gate (exception entry, a few CPL0 instructions, IRETQ).
    let t0 = io::rdtsc();
    for _ in 0..COST_SAMPLES {
        source.trigger();
    }
    let t1 = io::rdtsc();
    source.disable();
    let t2 = io::rdtsc();
    for _ in 0..COST_SAMPLES {
        entry::set_interrupts(false);
    }
    let t3 = io::rdtsc();
    let ns = |cycles: u64| cycles * 1_000_000 / ms;

    crate::tg!("irq_rflags_if={if_seen}");
    crate::tg!("irq_triggers={triggers}");
    crate::tg!("irq_count={count}");
    crate::tg!("irq_pending={}", u8::from(pending));
    if let Some(mean) = ns(latency_sum).checked_div(waited) {
        crate::tg!("irq_latency_ns={mean}");
    }
    crate::tg!("irq_trigger_ns={}", ns(t1 - t0) / COST_SAMPLES);
    crate::tg!("irq_gate_ns={}", ns(t3 - t2) / COST_SAMPLES);
    let spurious = entry::irq_count(entry::SPURIOUS_VECTOR);
    if spurious != 0 {
        crate::tg!("irq_spurious={spurious}");
    }
    if expect_none {
        if count == 0 {
            exit::pass()
        }
        exit::fail(format_args!(
            "{count} interrupts delivered where none were expected"
        ))
    }
    if count >= want {
        exit::pass()
    }
    exit::fail(format_args!(
        "only {count} of {want} interrupts in {timeout_ms} ms (redirection entry {entry_low:#x})"
    ))
}

/// Sets up the first virtio-rng device (interrupts stay off until `enable`).
fn open_virtio_rng(info: &crate::bootinfo::BootInfo, params: &Params<'_>) -> VirtioRng {
    let Some(mut arena) = Arena::new(info) else {
        exit::fail(format_args!("no RAM for the virtio-rng queue"))
    };
    let (khz, _) = time::tsc_khz();
    let rng = super::rng::open(params, &mut arena, 0, khz.saturating_mul(5000));
    let Some(buf) = arena.alloc(u64::from(VIRTIO_RNG_REQ), 64) else {
        exit::fail(format_args!("no RAM for the virtio-rng buffer"))
    };
    VirtioRng { rng, buf }
}

/// True while the TSC is before `deadline`.
fn before(deadline: u64) -> bool {
    (io::rdtsc().wrapping_sub(deadline) as i64) < 0
}
