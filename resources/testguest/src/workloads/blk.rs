//! `blk`: a virtio-blk device (device ID 2, one request queue): configuration, GET_ID,
//! out-of-range reads, then either a seeded write/flush/read-back of the disk or, on a disk the
//! device reports read-only (VIRTIO_BLK_F_RO), a refused write and a checksummed read.
//!
//! Parameters: `tg.blk_index` (0: the first block device on the command line), `tg.seed` (1),
//! `tg.blk_mib` (the whole disk by default), `tg.blk_req_kib` (64, at most 1024) bytes per
//! request, `tg.io_timeout_ms` (5000) per request.
//!
//! Pattern: the little-endian u64 at byte offset `o` of the disk (`o` a multiple of 8) is
//! `mix64(mix64(seed) ^ o)`, with `mix64` the SplitMix64 finaliser. Requests cycle through
//! four data layouts: one descriptor (twice), three descriptors of unequal sizes (not sector
//! multiples) scattered in memory, and one descriptor whose buffer crosses a 2 MiB boundary in
//! guest memory. Data descriptors are split further to honour SIZE_MAX, and multi-descriptor
//! layouts fall back to one descriptor when SEG_MAX forbids them.
//!
//! Prints `blk_device=<addr> irq=<n> features=<hex> queue_size=<n>`, `blk_capacity=<sectors>`,
//! `blk_size=<n>` (with VIRTIO_BLK_F_BLK_SIZE), `blk_ro=<0|1>`, `blk_id=<serial>` (or
//! `blk_id_status=<status>` when GET_ID fails), `blk_oob=ioerr` (a read of the sector at the
//! capacity) and `blk_oob_straddle=ioerr` (a read of the last sector and the one past it);
//! then, writable: `blk_written=<bytes>`, `blk_write_us=<n>`, `blk_flush=ok|unsupported`,
//! `blk_verify=ok`, `blk_read_us=<n>`; read-only: `blk_ro_write=ioerr`, `blk_read=ok`; both:
//! `blk_sum=<16 hex>` and `blk_sum_bytes=<n>`, the FNV-1a-64 of the first MiB (or less on a
//! smaller disk) as read back; then the result. A status other than the expected one is printed
//! by name (`ok`, `ioerr`, `unsupp` or the number) and fails the run. With `tg.blk_watch_ms`
//! it then waits for the host to swap the disk (see `watch`).

use super::{fnv1a, param, param_opt, FNV_OFFSET};
use crate::bootinfo::BootInfo;
use crate::cmdline::Params;
use crate::dma::Arena;
use crate::virtio::{Chain, Device, Queue, VirtioError};
use crate::{exit, io, phys, time};

/// virtio device ID of a block device (5.2).
const DEVICE_ID_BLK: u32 = 2;

// Feature bits (5.2.3).
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;

// struct virtio_blk_config offsets (5.2.4).
const CFG_CAPACITY: u64 = 0;
const CFG_SIZE_MAX: u64 = 8;
const CFG_SEG_MAX: u64 = 12;
const CFG_BLK_SIZE: u64 = 20;

// Request types and status values (5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// What the status byte holds before the device answers.
const S_NONE: u8 = 0xff;

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;
const TWO_MIB: u64 = 2 << 20;
const ID_BYTES: u32 = 20;
const HEADER_BYTES: u32 = 16;
/// Most data segments one request uses.
const MAX_SEGS: usize = 48;
/// The data window: 2 MiB-aligned, twice that long (see `Layouts`).
const WINDOW: u64 = 4 << 20;
const MAX_REQ: u64 = MIB;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn status_name(s: u8) -> &'static str {
    match s {
        S_OK => "ok",
        S_IOERR => "ioerr",
        S_UNSUPP => "unsupp",
        S_NONE => "none",
        _ => "other",
    }
}

/// A block device ready for requests.
struct Blk {
    dev: Device,
    queue: Queue,
    /// A page for the request header (offset 0), the status byte (64) and the ID (128).
    scratch: u64,
    size_max: u64,
    seg_max: u64,
    timeout: u64,
}

/// One request's data: (address, length) segments in disk order.
#[derive(Clone, Copy)]
struct Segs {
    segs: [(u64, u64); MAX_SEGS],
    len: usize,
}

impl Segs {
    fn new() -> Self {
        Segs {
            segs: [(0, 0); MAX_SEGS],
            len: 0,
        }
    }
    fn push(&mut self, addr: u64, len: u64) {
        if self.len < MAX_SEGS && len > 0 {
            self.segs[self.len] = (addr, len);
            self.len += 1;
        }
    }
    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.segs[..self.len].iter().copied()
    }
}

impl Blk {
    fn open(params: &Params<'_>, arena: &mut Arena, index: u64, timeout: u64) -> Blk {
        let mut dev = match Device::find(params, DEVICE_ID_BLK, index) {
            Ok(d) => d,
            Err(e) => exit::fail(format_args!("blk device: {e}")),
        };
        let wanted = F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH;
        if let Err(e) = dev.init(wanted, timeout) {
            exit::fail(format_args!("blk init: {e}"));
        }
        let queue = match dev.queue(arena, 0, 256) {
            Ok(q) => q,
            Err(e) => exit::fail(format_args!("blk queue: {e}")),
        };
        let Some(scratch) = arena.alloc(4096, 4096) else {
            exit::fail(format_args!("no RAM for the blk request header"))
        };
        let size_max = match dev.features & F_SIZE_MAX {
            0 => u64::from(u32::MAX),
            _ => u64::from(dev.config_u32(CFG_SIZE_MAX)).max(SECTOR),
        };
        let seg_max = match dev.features & F_SEG_MAX {
            0 => u64::MAX,
            _ => u64::from(dev.config_u32(CFG_SEG_MAX)).max(1),
        };
        dev.driver_ok();
        Blk {
            dev,
            queue,
            scratch,
            size_max,
            seg_max,
            timeout,
        }
    }

    /// Sends one request and returns its status. `writes` is true when the device writes the
    /// data (IN, GET_ID).
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: &Segs,
        writes: bool,
    ) -> Result<u8, VirtioError> {
        let hdr = self.scratch;
        let status = self.scratch + 64;
        phys::write_u32(hdr, kind);
        phys::write_u32(hdr + 4, 0);
        phys::write_u64(hdr + 8, sector);
        phys::write_u64(status, u64::from(S_NONE));
        let mut chain = Chain::new();
        chain.readable(hdr, HEADER_BYTES)?;
        let mut data_len = 0u64;
        for (addr, len) in data.iter() {
            data_len += len;
            // Honour SIZE_MAX: no descriptor longer than the device takes.
            let mut off = 0;
            while off < len {
                let n = (len - off).min(self.size_max) as u32;
                if writes {
                    chain.writable(addr + off, n)?;
                } else {
                    chain.readable(addr + off, n)?;
                }
                off += u64::from(n);
            }
        }
        chain.writable(status, 1)?;
        let used = self.queue.transact(&chain, self.timeout)?;
        let s = phys::read_u8(status);
        if s == S_OK {
            let want = if writes { data_len + 1 } else { 1 };
            if u64::from(used) != want && kind != T_GET_ID {
                exit::fail(format_args!(
                    "blk request type {kind} used length {used}, expected {want}"
                ));
            }
        }
        Ok(s)
    }

    fn request_or_fail(&mut self, kind: u32, sector: u64, data: &Segs, writes: bool) -> u8 {
        match self.request(kind, sector, data, writes) {
            Ok(s) => s,
            Err(e) => exit::fail(format_args!("blk request type {kind} sector {sector}: {e}")),
        }
    }
}

/// Where the data of request `k` goes in the 4 MiB, 2 MiB-aligned window at `base`:
/// one descriptor at `base` (k % 4 = 0, 1), three scattered unequal pieces above
/// `base + 2 MiB + req/2` (k % 4 = 2), or one buffer centred on `base + 2 MiB` (k % 4 = 3).
fn layout(base: u64, k: u64, len: u64, seg_max: u64) -> Segs {
    let mut s = Segs::new();
    match k % 4 {
        2 if seg_max >= 3 => {
            let a = len / 4 + 8;
            let b = len / 4 - 8;
            let c = len - a - b;
            let mut at = base + TWO_MIB + MAX_REQ / 2 + 4096;
            for piece in [a, b, c] {
                s.push(at, piece);
                at += piece + 520;
            }
        }
        3 => s.push((base + TWO_MIB - len / 2) & !7, len),
        _ => s.push(base, len),
    }
    s
}

/// The pattern word at disk byte offset `off` (a multiple of 8).
fn pattern(key: u64, off: u64) -> u64 {
    mix64(key ^ off)
}

fn fill(segs: &Segs, key: u64, mut disk_off: u64) {
    for (addr, len) in segs.iter() {
        for i in (0..len).step_by(8) {
            phys::write_u64(addr + i, pattern(key, disk_off + i));
        }
        disk_off += len;
    }
}

fn poison(segs: &Segs) {
    for (addr, len) in segs.iter() {
        // SAFETY: the segments lie in the data window (arena RAM) and the device has returned
        // every buffer (requests complete one at a time).
        unsafe { phys::bytes_mut(addr, len as usize) }.fill(0xa5);
    }
}

/// First disk offset whose word differs from the pattern.
fn verify(segs: &Segs, key: u64, mut disk_off: u64) -> Option<u64> {
    for (addr, len) in segs.iter() {
        for i in (0..len).step_by(8) {
            if phys::read_u64(addr + i) != pattern(key, disk_off + i) {
                return Some(disk_off + i);
            }
        }
        disk_off += len;
    }
    None
}

/// Continues the FNV-1a hash of the disk's first `limit` bytes with this request's data.
fn hash(h: u64, segs: &Segs, mut disk_off: u64, limit: u64) -> u64 {
    let mut h = h;
    for (addr, len) in segs.iter() {
        let n = len.min(limit.saturating_sub(disk_off));
        if n > 0 {
            // SAFETY: as in `poison`; the borrow ends before the next request.
            h = fnv1a(h, unsafe { phys::bytes_mut(addr, n as usize) });
        }
        disk_off += len;
    }
    h
}

/// Runs the workload.
/// `tg.blk_bench=1`: raw sequential throughput, one request in flight, no pattern work in the
/// timed loops: writes `test_bytes` in `req`-byte requests from one buffer, then reads them back
/// into it, and prints `blk_bench_bytes`, `blk_bench_write_us` and `blk_bench_read_us`.
fn bench(blk: &mut Blk, window: u64, req: u64, test_bytes: u64, khz: u64) {
    let segs = layout(window, 0, req, blk.seg_max);
    fill(&segs, 0, 0);
    for (t, name) in [(T_OUT, "write"), (T_IN, "read")] {
        let t0 = io::rdtsc();
        let mut off = 0u64;
        while off + req <= test_bytes {
            let s = blk.request_or_fail(t, off / SECTOR, &segs, t == T_IN);
            if s != S_OK {
                exit::fail(format_args!("blk bench {name} status={}", status_name(s)));
            }
            off += req;
        }
        crate::tg!("blk_bench_{name}_us={}", (io::rdtsc() - t0) * 1000 / khz);
        if t == T_OUT {
            crate::tg!("blk_bench_bytes={off}");
        }
    }
}

pub fn run(info: &BootInfo, params: &Params<'_>) -> ! {
    let index = param(params, "blk_index", 0);
    let seed = param(params, "seed", 1);
    let limit_mib = param_opt(params, "blk_mib");
    let req = (param(params, "blk_req_kib", 64).saturating_mul(1024) / SECTOR * SECTOR)
        .clamp(SECTOR, MAX_REQ);
    let timeout_ms = param(params, "io_timeout_ms", 5000);
    let (khz, _) = time::tsc_khz();
    let khz = khz.max(1);
    let Some(mut arena) = Arena::new(info) else {
        exit::fail(format_args!("no RAM for the blk buffers"))
    };
    let mut blk = Blk::open(params, &mut arena, index, timeout_ms.saturating_mul(khz));
    let Some(window) = arena.alloc(WINDOW, TWO_MIB) else {
        exit::fail(format_args!("no RAM for the blk data window"))
    };
    let features = blk.dev.features;
    crate::tg!(
        "blk_device={:#x} irq={} features={features:#x} queue_size={}",
        blk.dev.base(),
        blk.dev.irq,
        blk.queue.size()
    );
    let capacity = blk.dev.config_u64(CFG_CAPACITY);
    crate::tg!("blk_capacity={capacity}");
    if features & F_BLK_SIZE != 0 {
        crate::tg!("blk_size={}", blk.dev.config_u32(CFG_BLK_SIZE));
    }
    let ro = features & F_RO != 0;
    crate::tg!("blk_ro={}", u8::from(ro));
    if capacity == 0 {
        exit::fail(format_args!("blk capacity is 0"));
    }

    get_id(&mut blk);
    oob(&mut blk, window, capacity);

    let disk_bytes = capacity.saturating_mul(SECTOR);
    let test_bytes = limit_mib.map_or(disk_bytes, |m| m.saturating_mul(MIB).min(disk_bytes));
    let sum_bytes = test_bytes.min(MIB);
    let key = mix64(seed);
    if param(params, "blk_bench", 0) == 1 && !ro {
        bench(&mut blk, window, req, test_bytes, khz);
    }
    let sum = if ro {
        read_only(&mut blk, window, req, sum_bytes)
    } else {
        let t0 = io::rdtsc();
        let mut k = 0u64;
        let mut off = 0u64;
        while off < test_bytes {
            let len = req.min(test_bytes - off);
            let segs = layout(window, k, len, blk.seg_max);
            fill(&segs, key, off);
            let s = blk.request_or_fail(T_OUT, off / SECTOR, &segs, false);
            if s != S_OK {
                exit::fail(format_args!(
                    "blk write at sector {} status={}",
                    off / SECTOR,
                    status_name(s)
                ));
            }
            off += len;
            k += 1;
        }
        let t1 = io::rdtsc();
        crate::tg!("blk_written={test_bytes}");
        crate::tg!("blk_write_us={}", (t1 - t0) * 1000 / khz);
        if features & F_FLUSH != 0 {
            let s = blk.request_or_fail(T_FLUSH, 0, &Segs::new(), false);
            if s != S_OK {
                exit::fail(format_args!("blk flush status={}", status_name(s)));
            }
            crate::tg!("blk_flush=ok");
        } else {
            crate::tg!("blk_flush=unsupported");
        }
        let t2 = io::rdtsc();
        let (mut h, mut off, mut k) = (FNV_OFFSET, 0u64, 0u64);
        while off < test_bytes {
            let len = req.min(test_bytes - off);
            let segs = layout(window, k, len, blk.seg_max);
            poison(&segs);
            let s = blk.request_or_fail(T_IN, off / SECTOR, &segs, true);
            if s != S_OK {
                exit::fail(format_args!(
                    "blk read at sector {} status={}",
                    off / SECTOR,
                    status_name(s)
                ));
            }
            if let Some(bad) = verify(&segs, key, off) {
                crate::tg!("blk_verify=bad offset={bad:#x}");
                exit::fail(format_args!("blk data differs at disk offset {bad:#x}"));
            }
            h = hash(h, &segs, off, sum_bytes);
            off += len;
            k += 1;
        }
        crate::tg!("blk_verify=ok");
        crate::tg!("blk_read_us={}", (io::rdtsc() - t2) * 1000 / khz);
        h
    };
    crate::tg!("blk_sum={sum:016x}");
    crate::tg!("blk_sum_bytes={sum_bytes}");
    if let Some(ms) = param_opt(params, "blk_watch_ms") {
        watch(&mut blk, window, capacity, ms.saturating_mul(khz));
    }
    exit::pass()
}

/// `tg.blk_watch_ms=N`: prints `blk_watching`, then waits up to N ms for the host to change
/// the disk (a swapped backing file): prints `blk_capacity_changed=<sectors>` and
/// `blk_config_irq=<0|1>` (whether the configuration-change interrupt bit was set), then
/// `blk_new_sum=<16 hex>`, the FNV-1a-64 of the new disk's first sector.
fn watch(blk: &mut Blk, window: u64, capacity: u64, ticks: u64) {
    // Interrupt status bit 1: configuration change (4.2.2.1).
    const ISR_CONFIG: u32 = 2;
    let _ = blk.dev.ack_interrupt();
    crate::tg!("blk_watching");
    let deadline = io::rdtsc().saturating_add(ticks);
    let mut config_irq = false;
    loop {
        config_irq |= blk.dev.ack_interrupt() & ISR_CONFIG != 0;
        let now = blk.dev.config_u64(CFG_CAPACITY);
        if now != capacity {
            // The device stores the capacity and then sets the interrupt status: a status read
            // between the two misses the bit, so look again for a while.
            let settle = io::rdtsc().saturating_add(ticks / 1000 + 1);
            while !config_irq && io::rdtsc() < settle {
                config_irq |= blk.dev.ack_interrupt() & ISR_CONFIG != 0;
            }
            crate::tg!("blk_capacity_changed={now}");
            crate::tg!("blk_config_irq={}", u8::from(config_irq));
            break;
        }
        if io::rdtsc() > deadline {
            exit::fail(format_args!("blk capacity did not change"));
        }
        time::wait_until(io::rdtsc().saturating_add(ticks / 1000 + 1));
    }
    let segs = layout(window, 0, SECTOR, blk.seg_max);
    poison(&segs);
    let s = blk.request_or_fail(T_IN, 0, &segs, true);
    if s != S_OK {
        exit::fail(format_args!(
            "blk read of the new disk status={}",
            status_name(s)
        ));
    }
    crate::tg!("blk_new_sum={:016x}", hash(FNV_OFFSET, &segs, 0, SECTOR));
}

/// GET_ID into the scratch page: prints the serial (printable ASCII up to the first NUL).
fn get_id(blk: &mut Blk) {
    let id = blk.scratch + 128;
    let mut segs = Segs::new();
    segs.push(id, u64::from(ID_BYTES));
    let s = blk.request_or_fail(T_GET_ID, 0, &segs, true);
    if s != S_OK {
        crate::tg!("blk_id_status={}", status_name(s));
        return;
    }
    let mut buf = [0u8; ID_BYTES as usize];
    let n = phys::read_cstr(id, buf.len(), &mut buf);
    for b in &mut buf[..n] {
        if !b.is_ascii_graphic() {
            *b = b'?';
        }
    }
    let text = core::str::from_utf8(&buf[..n]).unwrap_or("?");
    crate::tg!("blk_id={text}");
}

/// Reads past the end must fail with IOERR.
fn oob(blk: &mut Blk, window: u64, capacity: u64) {
    for (name, sector, sectors) in [
        ("blk_oob", capacity, 1),
        ("blk_oob_straddle", capacity - 1, 2),
    ] {
        let mut segs = Segs::new();
        segs.push(window, sectors * SECTOR);
        let s = blk.request_or_fail(T_IN, sector, &segs, true);
        crate::tg!("{name}={}", status_name(s));
        if s != S_IOERR {
            exit::fail(format_args!(
                "{name}: read past the capacity gave status {s}"
            ));
        }
    }
}

/// A read-only disk: a write must fail with IOERR, reads must work. Returns the checksum of
/// the first `sum_bytes`.
fn read_only(blk: &mut Blk, window: u64, req: u64, sum_bytes: u64) -> u64 {
    let mut segs = Segs::new();
    segs.push(window, SECTOR);
    fill(&segs, 0x5eed, 0);
    let s = blk.request_or_fail(T_OUT, 0, &segs, false);
    crate::tg!("blk_ro_write={}", status_name(s));
    if s != S_IOERR {
        exit::fail(format_args!(
            "blk write to a read-only disk gave status {s}"
        ));
    }
    let (mut h, mut off, mut k) = (FNV_OFFSET, 0u64, 0u64);
    while off < sum_bytes {
        let len = req.min(sum_bytes - off);
        let segs = layout(window, k, len, blk.seg_max);
        poison(&segs);
        let s = blk.request_or_fail(T_IN, off / SECTOR, &segs, true);
        if s != S_OK {
            exit::fail(format_args!(
                "blk read at sector {} status={}",
                off / SECTOR,
                status_name(s)
            ));
        }
        h = hash(h, &segs, off, sum_bytes);
        off += len;
        k += 1;
    }
    crate::tg!("blk_read=ok");
    h
}
