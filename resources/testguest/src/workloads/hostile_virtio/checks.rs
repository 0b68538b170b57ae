//! Well-formed use of a device, through the ordinary driver (`virtio::Device` and `Queue`):
//! before the storm (what the disk holds) and after it (everything still works).

use super::{
    mix64, F_FLUSH, F_RO, KNOWN_BYTES, REQ_BYTES, SCRATCH_SECTOR, SCRATCH_SECTORS, SECTOR, T_FLUSH,
    T_IN, T_OUT,
};
use crate::dma::Arena;
use crate::virtio::{Chain, Device, Queue, VirtioError};
use crate::workloads::{fnv1a, FNV_OFFSET};
use crate::{exit, phys};

/// A device driven the ordinary way (`virtio::Device` and `Queue`).
pub(super) struct WellFormed {
    /// The device.
    pub(super) dev: Device,
    queue: Queue,
    /// Request header (offset 0) and status byte (64).
    page: u64,
    timeout: u64,
}

impl WellFormed {
    /// Initialises `dev` and sets up its queue in `arena`.
    pub(super) fn open(dev: &Device, arena: &mut Arena, blk: bool, timeout: u64) -> WellFormed {
        let mut dev = dev.clone();
        let wanted = if blk { F_RO | F_FLUSH } else { 0 };
        if let Err(e) = dev.init(wanted, timeout) {
            exit::fail(format_args!("device {:#x} init: {e}", dev.base()));
        }
        let queue = match dev.queue(arena, 0, 64) {
            Ok(q) => q,
            Err(e) => exit::fail(format_args!("device {:#x} queue: {e}", dev.base())),
        };
        dev.driver_ok();
        let page = Self::alloc(arena, 4096);
        WellFormed {
            dev,
            queue,
            page,
            timeout,
        }
    }

    fn alloc(arena: &mut Arena, len: u64) -> u64 {
        match arena.alloc(len, 4096) {
            Some(a) => a,
            None => exit::fail(format_args!("no RAM for {len} bytes of buffers")),
        }
    }

    /// Reads up to 256 bytes of entropy; returns how many came.
    pub(super) fn rng_read(&mut self, arena: &mut Arena) -> u32 {
        let buf = Self::alloc(arena, 4096);
        let mut chain = Chain::new();
        let r = chain
            .writable(buf, 256)
            .map(|_| ())
            .and_then(|()| self.queue.transact(&chain, self.timeout));
        match r {
            Ok(len) if (1..=256).contains(&len) => len,
            Ok(len) => exit::fail(format_args!("rng after the storm returned {len} bytes")),
            Err(e) => exit::fail(format_args!("rng after the storm: {e}")),
        }
    }

    /// One blk request: header, `len` bytes at `data`, status. Returns the status byte.
    fn blk(&mut self, kind: u32, sector: u64, data: u64, len: u32) -> u8 {
        let page = self.page;
        phys::write_u32(page, kind);
        phys::write_u32(page + 4, 0);
        phys::write_u64(page + 8, sector);
        phys::write_u8(page + 64, 0xff);
        match self.blk_chain(page, kind, data, len) {
            Ok(()) => phys::read_u8(page + 64),
            Err(e) => exit::fail(format_args!(
                "blk {:#x} request type {kind} sector {sector}: {e}",
                self.dev.base()
            )),
        }
    }

    fn blk_chain(&mut self, page: u64, kind: u32, data: u64, len: u32) -> Result<(), VirtioError> {
        let mut chain = Chain::new();
        chain.readable(page, 16)?;
        if len > 0 {
            if kind == T_IN {
                chain.writable(data, len)?;
            } else {
                chain.readable(data, len)?;
            }
        }
        chain.writable(page + 64, 1)?;
        self.queue.transact(&chain, self.timeout).map(|_| ())
    }

    fn read(&mut self, sector: u64, buf: u64, len: u64) {
        let s = self.blk(T_IN, sector, buf, len as u32);
        if s != 0 {
            exit::fail(format_args!(
                "blk {:#x}: read of sector {sector} gave status {s}",
                self.dev.base()
            ));
        }
    }

    /// FNV-1a of the first and last `KNOWN_BYTES` of the disk.
    pub(super) fn known_sums(&mut self, arena: &mut Arena, capacity: u64) -> (u64, u64) {
        let buf = Self::alloc(arena, KNOWN_BYTES);
        let mut sums = (0, 0);
        for (slot, sector) in [(0, 0), (1, capacity - KNOWN_BYTES / SECTOR)] {
            self.read(sector, buf, KNOWN_BYTES);
            // SAFETY: `buf` is ours and the device completed the request.
            let h = fnv1a(FNV_OFFSET, unsafe {
                phys::bytes_mut(buf, KNOWN_BYTES as usize)
            });
            if slot == 0 {
                sums.0 = h;
            } else {
                sums.1 = h;
            }
        }
        sums
    }

    /// The disk's ends hold the `blk` pattern for `key`.
    pub(super) fn verify_known(&mut self, arena: &mut Arena, capacity: u64, key: u64, i: usize) {
        let buf = Self::alloc(arena, KNOWN_BYTES);
        for sector in [0, capacity - KNOWN_BYTES / SECTOR] {
            self.read(sector, buf, KNOWN_BYTES);
            let base = sector * SECTOR;
            for o in (0..KNOWN_BYTES).step_by(8) {
                if phys::read_u64(buf + o) != mix64(key ^ (base + o)) {
                    exit::fail(format_args!(
                        "blk{i}: disk offset {:#x} does not hold the disk_seed pattern",
                        base + o
                    ));
                }
            }
        }
    }

    /// Writes the scratch sectors with the pattern for `key`, flushes, reads them back.
    pub(super) fn write_scratch(&mut self, arena: &mut Arena, key: u64, i: usize) -> u64 {
        let buf = Self::alloc(arena, REQ_BYTES);
        let total = SCRATCH_SECTORS * SECTOR;
        let first = SCRATCH_SECTOR * SECTOR;
        for off in (0..total).step_by(REQ_BYTES as usize) {
            for o in (0..REQ_BYTES).step_by(8) {
                phys::write_u64(buf + o, mix64(key ^ (first + off + o)));
            }
            let s = self.blk(T_OUT, (first + off) / SECTOR, buf, REQ_BYTES as u32);
            if s != 0 {
                exit::fail(format_args!("blk{i}: scratch write gave status {s}"));
            }
        }
        if self.dev.features & F_FLUSH != 0 {
            let s = self.blk(T_FLUSH, 0, 0, 0);
            if s != 0 {
                exit::fail(format_args!("blk{i}: flush gave status {s}"));
            }
        }
        for off in (0..total).step_by(REQ_BYTES as usize) {
            // SAFETY: `buf` is ours; no request is in flight.
            unsafe { phys::bytes_mut(buf, REQ_BYTES as usize) }.fill(0xa5);
            self.read((first + off) / SECTOR, buf, REQ_BYTES);
            for o in (0..REQ_BYTES).step_by(8) {
                if phys::read_u64(buf + o) != mix64(key ^ (first + off + o)) {
                    exit::fail(format_args!(
                        "blk{i}: scratch offset {:#x} did not read back",
                        first + off + o
                    ));
                }
            }
        }
        total
    }
}
