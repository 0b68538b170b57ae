//! `hostile_virtio`: a seeded stream of malformed virtio use against every virtio-rng and
//! virtio-blk device on the command line, then checks that well-formed use still works.
//!
//! Parameters: `tg.seed` (1), `tg.batches` (300), `tg.probe_ms` (20: how long one batch waits
//! for the device), `tg.disk_seed` (optional: the disk holds the `blk` workload's pattern for
//! this seed, which the final check compares), `tg.io_timeout_ms` (5000, final checks).
//!
//! Each batch picks a device, resets it and runs one of three scenarios:
//! - `regs`: register writes in the wrong device state: DRIVER_OK before FEATURES_OK,
//!   FEATURES_OK without VIRTIO_F_VERSION_1 (a device may refuse it or not: counted),
//!   FEATURES_OK before DRIVER,
//!   status bits cleared, FAILED and DEVICE_NEEDS_RESET written by the driver, garbage feature
//!   selectors and features, queue registers before FEATURES_OK, writes to read-only and unknown
//!   registers, 1/2/8-byte and unaligned register accesses, garbage INTERRUPT_ACK and
//!   QUEUE_NOTIFY, garbage in the configuration space. The magic, version and device ID must
//!   read back unchanged.
//! - `setup`: correct negotiation, then a queue with one bogus parameter: size 0, not a power of
//!   two, above the maximum (or above 16 bits); ring addresses outside RAM, in the MMIO hole,
//!   straddling the end of RAM, above 4 GiB, misaligned; the queue made ready under the wrong
//!   QUEUE_SEL, not made ready, or made "ready" with a value other than 1; then DRIVER_OK, a
//!   notify, and an empty request on the (zeroed) rings.
//! - `chains`: a correctly set-up queue of a random size (1..256), queue registers rewritten
//!   after DRIVER_OK (must be ignored), configuration-space garbage, then 1..4 malformed
//!   requests (see `CHAIN_KINDS`): descriptor loops, chains longer than the queue, indirect
//!   descriptors (never offered), buffers outside RAM or in the MMIO hole, wrong directions,
//!   zero and huge lengths, `next` out of range, head indexes out of range, the available index
//!   jumping far ahead, the same head made available twice; notifies for queues that do not
//!   exist; finally a well-formed probe request, counted as `ok`, `needs_reset` or `silent`.
//!
//! After each batch the driver reads the status, counts DEVICE_NEEDS_RESET (unless it wrote
//! that bit itself) and resets the device, as a driver does when it sees it.
//!
//! Memory discipline, so that a device behaving as the spec allows can never hurt the guest:
//! everything the device may write (used rings, writable buffers) starts inside the "zone", the
//! top of RAM from the end of the DMA arena's guard to the end of RAM, or lies outside RAM; what
//! it reads as descriptors or requests is either written by us or 0xFF filler; a 256 KiB guard
//! below the zone is checked at the end. Malformed blk writes only ever target sectors past the
//! capacity or the scratch sectors `SCRATCH_SECTOR..+SCRATCH_SECTORS`, with short enough
//! descriptors that even a looping chain stays inside them; the final check writes the whole
//! scratch range with the `blk` pattern for `tg.seed`, so a host test can predict the image.
//!
//! Prints `hostile_virtio_seed=<s> batches=<n>`, `hostile_virtio_devices=rng:<n> blk:<n>`,
//! `hostile_virtio_mix=...`, `hostile_virtio_chains=...`, `hostile_virtio_probe=ok:<n>
//! needs_reset:<n> silent:<n> silent_after_overrun:<n>`,
//! `hostile_virtio_features_ok_refused=<refused>/<tried>`, `hostile_virtio_ms=<n>`,
//! `hostile_virtio_guard=ok`, per device `hostile_virtio_check_rng<i>=ok bytes=<n>` or
//! `hostile_virtio_check_blk<i>=ok known=<pattern|unchanged> written=<bytes>`, then
//! `hostile_virtio_ops=<n>`, `needs_reset_seen=<n>` and the result.

mod chains;
mod checks;

use self::checks::WellFormed;
use super::hostile::Rng;
use super::{param, param_opt};
use crate::bootinfo::BootInfo;
use crate::cmdline::Params;
use crate::dma::Arena;
use crate::virtio::{self as v, Device};
use crate::{entry, exit, io, phys, time};

const DEVICE_ID_BLK: u32 = 2;
const DEVICE_ID_RNG: u32 = 4;
const MAX_DEVICES: u64 = 8;
/// VIRTQ_DESC_F_INDIRECT (2.7.5.3): never offered by anvil's devices.
const DESC_F_INDIRECT: u16 = 4;
/// VIRTIO_BLK_F_RO (5.2.3).
pub(super) const F_RO: u64 = 1 << 5;
pub(super) const F_FLUSH: u64 = 1 << 9;
pub(super) const T_IN: u32 = 0;
pub(super) const T_OUT: u32 = 1;
pub(super) const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
pub(super) const SECTOR: u64 = 512;
/// Sectors malformed writes may reach (512 KiB..768 KiB of the disk); the final check
/// rewrites all of them.
pub const SCRATCH_SECTOR: u64 = 1024;
/// Length of the scratch range in sectors.
pub const SCRATCH_SECTORS: u64 = 512;
/// Malformed writes to scratch start in its first 64 sectors, and their readable descriptors
/// are at most this long: at most 256 main-table plus 512 indirect descriptors (768 * 256 B =
/// 384 sectors) stay inside the range.
const SCRATCH_DESC_MAX: u32 = 256;
/// Bytes compared at each end of the disk before and after the storm.
pub(super) const KNOWN_BYTES: u64 = 64 << 10;
pub(super) const REQ_BYTES: u64 = 64 << 10;

// Zone layout (offsets from its start).
const Z_DESC: u64 = 0x0000;
const Z_AVAIL: u64 = 0x2000;
const Z_USED: u64 = 0x3000;
const Z_HDR: u64 = 0x4000;
const Z_STATUS: u64 = 0x4040;
const Z_PROBE_HDR: u64 = 0x4080;
const Z_PROBE_STATUS: u64 = 0x40c0;
const Z_INDIRECT: u64 = 0x5000;
const INDIRECT_SLOTS: u64 = 512;
const Z_READ: u64 = 0x8000;
const READ_LEN: u64 = 0x10000;
const Z_WRITE: u64 = 0x20000;
const Z_PROBE_DATA: u64 = 0x1f000;
/// The zone must at least hold the layout and the final checks' queues and buffers.
const ZONE_MIN: u64 = 8 << 20;
const GUARD_LEN: u64 = 256 << 10;

const SCENARIOS: [&str; 3] = ["regs", "setup", "chains"];
const CHAIN_KINDS: [&str; 10] = [
    "loop",
    "long",
    "indirect",
    "outside",
    "direction",
    "length",
    "next_oob",
    "bad_head",
    "avail_jump",
    "dup",
];

pub(super) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn guard_word(addr: u64) -> u64 {
    mix64(addr ^ 0x6a09_e667_f3bc_c908)
}

/// A device under attack.
struct Target {
    dev: Device,
    blk: bool,
    ro: bool,
    capacity: u64,
}

/// How a wait on the device ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    NeedsReset,
    Silent,
}

/// The storm's state.
struct Storm {
    rng: Rng,
    zone: u64,
    zone_end: u64,
    ram_end: u64,
    /// `zone_end == ram_end`: buffers straddling the end of RAM start inside the zone.
    straddle_ok: bool,
    wait_ticks: u64,
    io_ticks: u64,
    ops: u64,
    needs_reset: u64,
    /// This batch wrote DEVICE_NEEDS_RESET itself.
    self_set: bool,
    mix: [u64; SCENARIOS.len()],
    kinds: [u64; CHAIN_KINDS.len()],
    probe: [u64; 4],
    /// FEATURES_OK without VERSION_1: (tried, refused).
    no_v1: [u64; 2],
}

/// Runs the workload.
pub fn run(info: &BootInfo, params: &Params<'_>) -> ! {
    let seed = param(params, "seed", 1);
    let batches = param(params, "batches", 300);
    let probe_ms = param(params, "probe_ms", 20);
    let disk_seed = param_opt(params, "disk_seed");
    let timeout_ms = param(params, "io_timeout_ms", 5000);
    let (khz, _) = time::tsc_khz();
    let khz = khz.max(1);
    let io_timeout = timeout_ms.saturating_mul(khz);

    let mut targets: [Option<Target>; 2 * MAX_DEVICES as usize] = Default::default();
    let (mut n_rng, mut n_blk) = (0u64, 0u64);
    for (id, count) in [(DEVICE_ID_RNG, &mut n_rng), (DEVICE_ID_BLK, &mut n_blk)] {
        while *count < MAX_DEVICES {
            let Ok(dev) = Device::find(params, id, *count) else {
                break;
            };
            let blk = id == DEVICE_ID_BLK;
            let slot = targets.iter_mut().find(|t| t.is_none());
            if let Some(slot) = slot {
                *slot = Some(Target {
                    dev,
                    blk,
                    ro: false,
                    capacity: 0,
                });
            }
            *count += 1;
        }
    }
    let n = (n_rng + n_blk) as usize;
    if n == 0 {
        exit::fail(format_args!("no virtio-rng or virtio-blk device to attack"));
    }
    crate::tg!("hostile_virtio_seed={seed} batches={batches}");
    crate::tg!("hostile_virtio_devices=rng:{n_rng} blk:{n_blk}");

    let (guard, zone, zone_end) = layout(info);
    let ram_end = info.ram().map(|e| e.end()).max().unwrap_or(zone_end);
    for w in (guard..guard + GUARD_LEN).step_by(8) {
        phys::write_u64(w, guard_word(w));
    }

    // Before the storm: what the disks hold at both ends.
    let mut known = [(0u64, 0u64); 2 * MAX_DEVICES as usize];
    for (i, t) in targets.iter_mut().flatten().enumerate() {
        if t.blk {
            let mut arena = Arena::from_range(zone + Z_WRITE, zone_end);
            let mut b = WellFormed::open(&t.dev, &mut arena, true, io_timeout);
            t.ro = b.dev.features & F_RO != 0;
            t.capacity = b.dev.config_u64(0);
            if t.capacity < SCRATCH_SECTOR + SCRATCH_SECTORS || t.capacity % 128 != 0 {
                exit::fail(format_args!(
                    "blk{i}: capacity {} sectors, need at least {} in whole 64 KiB",
                    t.capacity,
                    SCRATCH_SECTOR + SCRATCH_SECTORS
                ));
            }
            known[i] = b.known_sums(&mut arena, t.capacity);
            if let Err(e) = b.dev.reset(io_timeout) {
                exit::fail(format_args!("blk{i} reset: {e}"));
            }
        }
    }

    let mut s = Storm {
        rng: Rng(seed),
        zone,
        zone_end,
        ram_end,
        straddle_ok: zone_end == ram_end,
        wait_ticks: probe_ms.saturating_mul(khz).max(1),
        io_ticks: io_timeout,
        ops: 0,
        needs_reset: 0,
        self_set: false,
        mix: [0; SCENARIOS.len()],
        kinds: [0; CHAIN_KINDS.len()],
        probe: [0; 4],
        no_v1: [0; 2],
    };
    let start = io::rdtsc();
    for _ in 0..batches {
        let i = s.rng.below(n as u64) as usize;
        let Some(t) = targets.iter().flatten().nth(i) else {
            continue;
        };
        s.batch(t, io_timeout);
    }
    let storm_ms = io::rdtsc().wrapping_sub(start) / khz;
    crate::tg!(
        "hostile_virtio_mix={}:{} {}:{} {}:{}",
        SCENARIOS[0],
        s.mix[0],
        SCENARIOS[1],
        s.mix[1],
        SCENARIOS[2],
        s.mix[2]
    );
    print_kinds(&s.kinds);
    crate::tg!(
        "hostile_virtio_probe=ok:{} needs_reset:{} silent:{} silent_after_overrun:{}",
        s.probe[0],
        s.probe[1],
        s.probe[2],
        s.probe[3]
    );
    crate::tg!(
        "hostile_virtio_features_ok_refused={}/{}",
        s.no_v1[1],
        s.no_v1[0]
    );
    crate::tg!("hostile_virtio_ms={storm_ms}");

    if let Some(w) = (guard..guard + GUARD_LEN)
        .step_by(8)
        .find(|&w| phys::read_u64(w) != guard_word(w))
    {
        exit::fail(format_args!("guard word at {w:#x} below the zone changed"));
    }
    crate::tg!("hostile_virtio_guard=ok");

    let mut arena = Arena::from_range(zone + Z_WRITE, zone_end);
    let key = mix64(seed);
    for (i, t) in targets.iter().flatten().enumerate() {
        let mut w = WellFormed::open(&t.dev, &mut arena, t.blk, io_timeout);
        if !t.blk {
            let got = w.rng_read(&mut arena);
            crate::tg!("hostile_virtio_check_rng{i}=ok bytes={got}");
            continue;
        }
        let sums = w.known_sums(&mut arena, t.capacity);
        if sums != known[i] {
            exit::fail(format_args!(
                "blk{i}: data outside the scratch sectors changed"
            ));
        }
        let mut how = "unchanged";
        if let Some(ds) = disk_seed {
            w.verify_known(&mut arena, t.capacity, mix64(ds), i);
            how = "pattern";
        }
        let mut written = 0;
        if !t.ro {
            written = w.write_scratch(&mut arena, key, i);
        }
        crate::tg!("hostile_virtio_check_blk{i}=ok known={how} written={written}");
    }
    crate::tg!("hostile_virtio_ops={}", s.ops);
    crate::tg!("needs_reset_seen={}", s.needs_reset);
    exit::pass()
}

fn print_kinds(k: &[u64; CHAIN_KINDS.len()]) {
    let c = CHAIN_KINDS;
    crate::tg!(
        "hostile_virtio_chains={}:{} {}:{} {}:{} {}:{} {}:{} {}:{} {}:{} {}:{} {}:{} {}:{}",
        c[0],
        k[0],
        c[1],
        k[1],
        c[2],
        k[2],
        c[3],
        k[3],
        c[4],
        k[4],
        c[5],
        k[5],
        c[6],
        k[6],
        c[7],
        k[7],
        c[8],
        k[8],
        c[9],
        k[9]
    );
}

/// The guard and the zone: `(guard, zone, zone_end)`. The zone runs to the end of its RAM
/// range, above the image.
fn layout(info: &BootInfo) -> (u64, u64, u64) {
    let Some(mut arena) = Arena::new(info) else {
        exit::fail(format_args!("no RAM for the virtqueues"))
    };
    let Some(guard) = arena.alloc(GUARD_LEN, 4096) else {
        exit::fail(format_args!("no RAM for the guard"))
    };
    let Some((zone, zone_end)) = arena.take_rest() else {
        exit::fail(format_args!("no RAM for the zone"))
    };
    let (_, img_end) = entry::image_range();
    if zone_end - zone < ZONE_MIN || img_end > zone {
        exit::fail(format_args!(
            "zone {zone:#x}..{zone_end:#x} too small or below the image"
        ));
    }
    (guard, zone, zone_end)
}

impl Storm {
    fn dev_reset(&mut self, t: &Target, timeout: u64) {
        let status = t.dev.reg(v::STATUS);
        if status & v::STATUS_NEEDS_RESET != 0 && !self.self_set {
            self.needs_reset += 1;
        }
        self.self_set = false;
        if let Err(e) = t.dev.reset(timeout) {
            exit::fail(format_args!("reset of {:#x}: {e}", t.dev.base()));
        }
    }

    fn batch(&mut self, t: &Target, timeout: u64) {
        self.dev_reset(t, timeout);
        // SAFETY: the ring area of the zone is ours: every device was reset (its worker joined)
        // before and after each batch, so nothing else writes it now.
        unsafe { phys::bytes_mut(self.zone + Z_DESC, (Z_INDIRECT - Z_DESC) as usize) }.fill(0);
        // SAFETY: as above, for the 0xFF filler that devices read as data.
        unsafe { phys::bytes_mut(self.zone + Z_READ, READ_LEN as usize) }.fill(0xff);
        let scenario = match self.rng.below(10) {
            0..=2 => 0,
            3..=4 => 1,
            _ => 2,
        };
        self.mix[scenario] += 1;
        match scenario {
            0 => self.regs(t),
            1 => self.setup(t),
            _ => self.chains(t),
        }
        self.dev_reset(t, timeout);
        // The registers must not have changed.
        let (magic, version) = (t.dev.reg(v::MAGIC), t.dev.reg(v::VERSION));
        let id = t.dev.reg(v::DEVICE_ID);
        let want_id = if t.blk { DEVICE_ID_BLK } else { DEVICE_ID_RNG };
        if magic != v::MAGIC_VALUE || version != v::VERSION_MODERN || id != want_id {
            exit::fail(format_args!(
                "device {:#x} now reads magic={magic:#x} version={version} id={id}",
                t.dev.base()
            ));
        }
    }

    /// Negotiates VERSION_1 (and nothing else) correctly.
    fn negotiate(&mut self, t: &Target) -> bool {
        let d = &t.dev;
        d.set_reg(v::STATUS, v::STATUS_ACKNOWLEDGE);
        d.set_reg(v::STATUS, v::STATUS_ACKNOWLEDGE | v::STATUS_DRIVER);
        d.set_reg(v::DRIVER_FEATURES_SEL, 0);
        d.set_reg(v::DRIVER_FEATURES, 0);
        d.set_reg(v::DRIVER_FEATURES_SEL, 1);
        d.set_reg(v::DRIVER_FEATURES, (v::F_VERSION_1 >> 32) as u32);
        let ok = v::STATUS_ACKNOWLEDGE | v::STATUS_DRIVER | v::STATUS_FEATURES_OK;
        d.set_reg(v::STATUS, ok);
        d.reg(v::STATUS) & v::STATUS_FEATURES_OK != 0
    }

    fn set_queue(&self, t: &Target, size: u32, desc: u64, avail: u64, used: u64) {
        let d = &t.dev;
        d.set_reg(v::QUEUE_SEL, 0);
        d.set_reg(v::QUEUE_NUM, size);
        for (low, high, addr) in [
            (v::QUEUE_DESC_LOW, v::QUEUE_DESC_HIGH, desc),
            (v::QUEUE_DRIVER_LOW, v::QUEUE_DRIVER_HIGH, avail),
            (v::QUEUE_DEVICE_LOW, v::QUEUE_DEVICE_HIGH, used),
        ] {
            d.set_reg(low, addr as u32);
            d.set_reg(high, (addr >> 32) as u32);
        }
    }

    fn driver_ok(&self, t: &Target) {
        let s = t.dev.reg(v::STATUS);
        t.dev.set_reg(v::STATUS, s | v::STATUS_DRIVER_OK);
    }

    /// An address outside guest RAM (or straddling its end).
    fn outside(&mut self) -> u64 {
        let r = self.rng.next();
        match self.rng.below(10) {
            0 => self.ram_end,
            1 => self.ram_end + (r & 0xff_fff0),
            2 => 0xc000_0000 + (r % 0x1000_0000),
            3 => 0xd000_0000 + (r & 0x3ffc),
            // Not the LAPIC page: a DMA write there is an MSI on a VMM that models it (QEMU).
            4 => 0xfe00_0000 + (r & 0xfff0),
            5 => 1 << 32,
            6 => (1 << 40) | (r & 0xfff0),
            7 => u64::MAX - (r & 0xff),
            8 => 1 << 63,
            _ if self.straddle_ok => self.ram_end - 8 - (r & 0xf0),
            _ => self.ram_end,
        }
    }

    /// Where the device may write: the write area (anywhere in its first MiB) or outside RAM.
    fn writable_addr(&mut self) -> u64 {
        if self.rng.below(3) == 0 {
            self.outside()
        } else {
            self.zone + Z_WRITE + self.rng.below(1 << 20)
        }
    }

    /// What the device reads as data: the 0xFF filler or outside RAM.
    fn readable_addr(&mut self) -> u64 {
        if self.rng.below(4) == 0 {
            self.outside()
        } else {
            self.zone + Z_READ + self.rng.below(READ_LEN)
        }
    }

    fn length(&mut self) -> u32 {
        let l = self.rng.pick(&[
            0,
            1,
            7,
            16,
            17,
            511,
            512,
            4096,
            65535,
            65536,
            1 << 20,
            (16 << 20) + 512,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_fff0,
            u32::MAX,
        ]);
        if self.rng.below(8) == 0 {
            self.rng.next() as u32
        } else {
            l
        }
    }

    // ---- scenario: registers in the wrong state ----

    fn regs(&mut self, t: &Target) {
        let d = t.dev.clone();
        let steps = 2 + self.rng.below(7);
        for _ in 0..steps {
            self.ops += 1;
            let r = self.rng.next();
            match self.rng.below(14) {
                0 => {
                    // DRIVER_OK before FEATURES_OK.
                    d.set_reg(v::STATUS, v::STATUS_ACKNOWLEDGE);
                    d.set_reg(v::STATUS, v::STATUS_ACKNOWLEDGE | v::STATUS_DRIVER);
                    let ok = v::STATUS_ACKNOWLEDGE | v::STATUS_DRIVER | v::STATUS_DRIVER_OK;
                    d.set_reg(v::STATUS, ok);
                }
                1 => {
                    // FEATURES_OK without VERSION_1.
                    d.set_reg(v::STATUS, 0);
                    d.set_reg(v::STATUS, v::STATUS_ACKNOWLEDGE | v::STATUS_DRIVER);
                    d.set_reg(v::DRIVER_FEATURES_SEL, 1);
                    d.set_reg(v::DRIVER_FEATURES, 0);
                    d.set_reg(v::DRIVER_FEATURES_SEL, 0);
                    d.set_reg(v::DRIVER_FEATURES, r as u32);
                    let want = v::STATUS_ACKNOWLEDGE | v::STATUS_DRIVER | v::STATUS_FEATURES_OK;
                    d.set_reg(v::STATUS, want);
                    // The spec lets a device refuse (anvil does) or accept (QEMU does).
                    self.no_v1[0] += 1;
                    if d.reg(v::STATUS) & v::STATUS_FEATURES_OK == 0 {
                        self.no_v1[1] += 1;
                    }
                }
                2 => {
                    // Clearing bits other than by writing 0.
                    let s = d.reg(v::STATUS);
                    d.set_reg(v::STATUS, (s & !(1 << self.rng.below(8))) | 1);
                }
                3 => {
                    let s = d.reg(v::STATUS);
                    d.set_reg(v::STATUS, s | v::STATUS_FAILED);
                }
                4 => {
                    let s = d.reg(v::STATUS);
                    d.set_reg(v::STATUS, s | v::STATUS_NEEDS_RESET);
                    self.self_set = true;
                }
                5 => d.set_reg(v::STATUS, v::STATUS_ACKNOWLEDGE | v::STATUS_FEATURES_OK),
                6 => {
                    d.set_reg(v::DEVICE_FEATURES_SEL, r as u32);
                    let _ = d.reg(v::DEVICE_FEATURES);
                    d.set_reg(v::DRIVER_FEATURES_SEL, (r >> 32) as u32 & 3);
                    d.set_reg(v::DRIVER_FEATURES, (r >> 16) as u32);
                }
                7 => {
                    // Queue registers before FEATURES_OK, any queue.
                    d.set_reg(v::QUEUE_SEL, if r & 1 == 0 { 0 } else { (r >> 8) as u32 });
                    let _ = d.reg(v::QUEUE_NUM_MAX);
                    d.set_reg(v::QUEUE_NUM, (r >> 40) as u32 & 0x1ff);
                    d.set_reg(v::QUEUE_DESC_LOW, self.outside() as u32);
                    d.set_reg(v::QUEUE_READY, 1);
                }
                8 => {
                    // Read-only and unknown registers.
                    let reg = self.rng.pick(&[
                        v::MAGIC,
                        v::VERSION,
                        v::DEVICE_ID,
                        0x00c,
                        v::DEVICE_FEATURES,
                        0x018,
                        v::QUEUE_NUM_MAX,
                        0x03c,
                        0x040,
                        0x048,
                        v::INTERRUPT_STATUS,
                        0x0a8,
                        0x0b0,
                        0x0c0,
                        v::CONFIG_GENERATION,
                    ]);
                    d.set_reg(reg, r as u32);
                    let _ = d.reg(reg & !0xf);
                }
                9 => {
                    // Sub-word, 8-byte and unaligned register accesses.
                    let off = self.rng.below(0x100);
                    let size = self.rng.pick(&[1u64, 2, 4, 8]);
                    let off = off.min(0x100 - size);
                    let off = if off & 3 == 0 && size == 4 {
                        off + 1
                    } else {
                        off
                    };
                    if r & 1 == 0 {
                        phys::mmio_write(d.base() + off, size, r);
                    } else {
                        let _ = phys::mmio_read(d.base() + off, size);
                    }
                }
                10 => d.set_reg(v::INTERRUPT_ACK, r as u32),
                11 => d.set_reg(v::QUEUE_NOTIFY, r as u32),
                12 => self.config_garbage(t),
                _ => {
                    // A correct negotiation then DRIVER_OK without any queue set up.
                    if self.negotiate(t) {
                        self.driver_ok(t);
                    }
                }
            }
        }
    }

    /// Garbage reads and writes of every size in the configuration space; blk's capacity must
    /// read back unchanged.
    fn config_garbage(&mut self, t: &Target) {
        let d = &t.dev;
        for _ in 0..4 {
            let size = self.rng.pick(&[1u64, 2, 4, 8]);
            let off = v::CONFIG + self.rng.below(0xf00 - size);
            let off = if self.rng.below(2) == 0 {
                off & !(size - 1)
            } else {
                off
            };
            let off = if self.rng.below(3) == 0 {
                v::CONFIG + self.rng.below(16)
            } else {
                off
            };
            if self.rng.below(2) == 0 {
                phys::mmio_write(d.base() + off, size, self.rng.next());
            } else {
                let _ = phys::mmio_read(d.base() + off, size);
            }
        }
        if t.blk {
            let lo = phys::mmio_read(d.base() + v::CONFIG, 4);
            let hi = phys::mmio_read(d.base() + v::CONFIG + 4, 4);
            if lo | (hi << 32) != t.capacity {
                exit::fail(format_args!(
                    "blk {:#x}: capacity reads {:#x} after config writes, was {:#x}",
                    d.base(),
                    lo | (hi << 32),
                    t.capacity
                ));
            }
        }
    }

    // ---- scenario: bogus queue set-up ----

    fn setup(&mut self, t: &Target) {
        self.ops += 1;
        if !self.negotiate(t) {
            exit::fail(format_args!(
                "device {:#x}: a correct negotiation failed",
                t.dev.base()
            ));
        }
        let max = t.dev.reg(v::QUEUE_NUM_MAX);
        let z = self.zone;
        let (mut size, mut desc, mut avail, mut used) =
            (max.min(256), z + Z_DESC, z + Z_AVAIL, z + Z_USED);
        let mut ready = 1;
        let mut sel = 0;
        match self.rng.below(8) {
            0 => {
                size = self
                    .rng
                    .pick(&[0, 3, 100, 255, max + 1, 512, 0xffff, 0x1_0000, u32::MAX])
            }
            1 => desc = self.bogus_ring(z + Z_DESC, 16),
            2 => avail = self.bogus_ring(z + Z_AVAIL, 2),
            3 => used = self.bogus_ring(z + Z_USED, 4),
            4 => sel = self.rng.pick(&[1, 2, 0xffff, u32::MAX]),
            5 => ready = self.rng.pick(&[0, 2, 0xffff_ffff]),
            6 => desc |= 0xffff_ffff << 32,
            _ => used = (1 << 32) + (used & 0xfff),
        }
        self.set_queue(t, size, desc, avail, used);
        if sel != 0 {
            t.dev.set_reg(v::QUEUE_SEL, sel);
        }
        t.dev.set_reg(v::QUEUE_READY, ready);
        self.driver_ok(t);
        // An empty request on the zeroed rings: descriptor 0 is (0, 0, no flags). The ring may
        // be misaligned, so the index goes in byte by byte.
        let avail_idx = if avail >= z && avail + 4 <= self.zone_end {
            Some(avail + 2)
        } else {
            None
        };
        if let Some(at) = avail_idx {
            phys::write_u8(at, 1);
        }
        t.dev.set_reg(v::QUEUE_NOTIFY, 0);
        let _ = self.wait(t, |_| false, self.wait_ticks);
    }

    /// A ring address that is outside RAM, misaligned or straddles the end of RAM.
    fn bogus_ring(&mut self, good: u64, align: u64) -> u64 {
        match self.rng.below(3) {
            0 => self.outside(),
            1 => good + 1 + self.rng.below(align.max(2) - 1),
            _ => self.ram_end - 8,
        }
    }

    /// Polls until `done(used_idx)`, DEVICE_NEEDS_RESET or the batch timeout.
    fn wait(&mut self, t: &Target, done: impl Fn(u16) -> bool, ticks: u64) -> Outcome {
        let deadline = io::rdtsc().wrapping_add(ticks);
        let used = self.zone + Z_USED + 2;
        let mut spins = 0u32;
        loop {
            if done(phys::load_u16(used)) {
                return Outcome::Done;
            }
            spins = spins.wrapping_add(1);
            if spins & 0xff == 0 && t.dev.reg(v::STATUS) & v::STATUS_NEEDS_RESET != 0 {
                return Outcome::NeedsReset;
            }
            if (io::rdtsc().wrapping_sub(deadline) as i64) >= 0 {
                if t.dev.reg(v::STATUS) & v::STATUS_NEEDS_RESET != 0 {
                    return Outcome::NeedsReset;
                }
                return Outcome::Silent;
            }
            core::hint::spin_loop();
        }
    }
}
