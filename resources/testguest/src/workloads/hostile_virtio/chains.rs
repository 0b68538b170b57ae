//! The `chains` scenario: malformed requests on a correctly set-up queue, then a well-formed
//! probe (see the parent module for the memory discipline every descriptor here obeys).

use super::{
    Outcome, Storm, Target, CHAIN_KINDS, DESC_F_INDIRECT, INDIRECT_SLOTS, READ_LEN,
    SCRATCH_DESC_MAX, SCRATCH_SECTOR, T_FLUSH, T_GET_ID, T_IN, T_OUT, Z_AVAIL, Z_DESC, Z_HDR,
    Z_INDIRECT, Z_PROBE_DATA, Z_PROBE_HDR, Z_PROBE_STATUS, Z_READ, Z_STATUS, Z_USED, Z_WRITE,
};
use crate::virtio as v;
use crate::{exit, phys};

impl Storm {
    // ---- scenario: malformed requests ----

    pub(super) fn chains(&mut self, t: &Target) {
        if !self.negotiate(t) {
            exit::fail(format_args!(
                "device {:#x}: a correct negotiation failed",
                t.dev.base()
            ));
        }
        let max = t.dev.reg(v::QUEUE_NUM_MAX).clamp(1, 256);
        let size = (1u32 << self.rng.below(9)).min(max) as u16;
        let z = self.zone;
        self.set_queue(t, u32::from(size), z + Z_DESC, z + Z_AVAIL, z + Z_USED);
        t.dev.set_reg(v::QUEUE_READY, 1);
        // Every descriptor the device may reach holds something harmless: a short read of
        // the filler.
        for i in 0..u64::from(size) {
            self.put_desc(z + Z_DESC, i, z + Z_READ, 16, 0, 0);
        }
        for i in 0..INDIRECT_SLOTS {
            self.put_desc(z + Z_INDIRECT, i, z + Z_READ, 16, 0, 0);
        }
        phys::write_u16(z + Z_AVAIL, v::AVAIL_F_NO_INTERRUPT);
        self.driver_ok(t);
        if self.rng.below(3) == 0 {
            // Queue registers after DRIVER_OK: the device must ignore them.
            self.ops += 1;
            let d = &t.dev;
            d.set_reg(v::QUEUE_NUM, 1);
            d.set_reg(v::QUEUE_DESC_LOW, self.outside() as u32);
            d.set_reg(v::QUEUE_DEVICE_LOW, 0x1);
            d.set_reg(v::QUEUE_READY, 0);
            d.set_reg(v::QUEUE_SEL, 3);
            d.set_reg(v::QUEUE_SEL, 0);
        }
        if self.rng.below(3) == 0 {
            self.ops += 1;
            self.config_garbage(t);
        }
        // Slots [0, size - 3) for malformed chains (all of them for some kinds); the last three
        // for the probe.
        let mut avail_idx: u16 = 0;
        let mut jumped = false;
        let mut cursor: u16 = 0;
        let count = 1 + self.rng.below(4);
        for _ in 0..count {
            self.ops += 1;
            let kind = self.rng.below(CHAIN_KINDS.len() as u64) as usize;
            self.kinds[kind] += 1;
            match kind {
                7 => {
                    let head = self.rng.pick(&[size, size + 1, 0x7fff, 0xffff]);
                    self.make_avail(size, &mut avail_idx, head);
                }
                8 => {
                    let jump = size + 1 + self.rng.below(30_000) as u16;
                    avail_idx = avail_idx.wrapping_add(jump);
                    phys::write_u16(z + Z_AVAIL + 2, avail_idx);
                    jumped = true;
                }
                9 => {
                    let head = self.build(t, size, 0, &mut cursor);
                    self.make_avail(size, &mut avail_idx, head);
                    self.make_avail(size, &mut avail_idx, head);
                }
                _ => {
                    let head = self.build(t, size, kind, &mut cursor);
                    self.make_avail(size, &mut avail_idx, head);
                }
            }
        }
        let notify = if self.rng.below(4) == 0 {
            self.ops += 1;
            self.rng.pick(&[1, 2, 0xffff, u32::MAX, 0x8000_0000])
        } else {
            0
        };
        t.dev.set_reg(v::QUEUE_NOTIFY, notify);
        if notify != 0 {
            t.dev.set_reg(v::QUEUE_NOTIFY, 0);
        }
        // More than `size` heads outstanding (an available index that jumped, or simply too
        // many requests) makes the device ignore the queue until the next reset.
        let overrun = jumped || avail_idx > size;
        let target = avail_idx;
        if !overrun && self.wait(t, |u| u == target, self.wait_ticks) == Outcome::NeedsReset {
            return;
        }
        self.probe(t, size, avail_idx, overrun);
    }

    fn put_desc(&self, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + i * v::DESC_SIZE;
        phys::write_u64(at, addr);
        phys::write_u32(at + 8, len);
        phys::write_u16(at + 12, flags);
        phys::write_u16(at + 14, next);
    }

    fn make_avail(&self, size: u16, avail_idx: &mut u16, head: u16) {
        let slot = self.zone + Z_AVAIL + 4 + 2 * u64::from(*avail_idx % size);
        phys::write_u16(slot, head);
        *avail_idx = avail_idx.wrapping_add(1);
        phys::write_u16(self.zone + Z_AVAIL + 2, *avail_idx);
    }

    /// Writes a blk request header; returns the bound on readable lengths it needs.
    fn header(&mut self, t: &Target, at: u64) -> u32 {
        let random = self.rng.next() as u32;
        let kind = self
            .rng
            .pick(&[T_IN, T_IN, T_OUT, T_OUT, T_FLUSH, T_GET_ID, 11, 13, random]);
        let c = t.capacity;
        let (sector, cap) = if kind == T_OUT {
            if !t.ro && self.rng.below(2) == 0 {
                (SCRATCH_SECTOR + self.rng.below(64), SCRATCH_DESC_MAX)
            } else {
                let far = [c, c - 1, u64::MAX, u64::MAX / 512, 1 << 55, c + 1000];
                (self.rng.pick(&far), u32::MAX)
            }
        } else {
            let any = [0, 1, c - 1, c, u64::MAX, random.into()];
            (self.rng.pick(&any), u32::MAX)
        };
        phys::write_u32(at, kind);
        phys::write_u32(at + 4, self.rng.next() as u32 & 1);
        phys::write_u64(at + 8, sector);
        cap
    }

    /// Builds a malformed request of `kind` in the descriptor table from slot `*cursor` on
    /// (or in the indirect table) and returns its head. Readable lengths stay within `cap`
    /// (see `header`).
    fn build(&mut self, t: &Target, size: u16, kind: usize, cursor: &mut u16) -> u16 {
        let z = self.zone;
        let table = z + Z_DESC;
        let cap = if t.blk {
            self.header(t, z + Z_HDR)
        } else {
            u32::MAX
        };
        // Slots for ordinary chains: below the probe's three.
        let room = u64::from(size.saturating_sub(3).max(1));
        let n = match kind {
            1 => u64::from(size),
            2 => 1,
            _ => (1 + self.rng.below(6)).min(room),
        };
        if u64::from(*cursor) + n > room || kind == 1 {
            *cursor = 0;
        }
        let first = u64::from(*cursor);
        *cursor = (first + n).min(u64::from(u16::MAX)) as u16;
        // The i-th descriptor of a blk request: header, data..., status.
        let mut descs = [(0u64, 0u32, 0u16); 8];
        let parts = if kind == 2 {
            1 + self.rng.below(6) as usize
        } else {
            n.min(8) as usize
        };
        for (i, d) in descs.iter_mut().enumerate().take(parts) {
            *d = self.part(t, i, parts, kind, cap);
        }
        let (first, table, len) = if kind == 2 {
            // Indirect: the head points at a table in the indirect area (or elsewhere).
            let entries = match self.rng.below(4) {
                0 => 300,
                _ => parts as u64,
            };
            for i in 0..entries {
                let (a, l, f) = if (i as usize) < parts {
                    descs[i as usize]
                } else {
                    (self.readable_addr(), self.length().min(cap), 0)
                };
                let mut flags = f | v::DESC_F_NEXT;
                let mut next = (i + 1) as u16;
                if i + 1 == entries {
                    match self.rng.below(3) {
                        0 => flags &= !v::DESC_F_NEXT,
                        1 => next = 0,
                        _ => next = self.rng.pick(&[entries as u16, 0xffff]),
                    }
                }
                if self.rng.below(16) == 0 {
                    // A nested indirect descriptor (forbidden).
                    flags |= DESC_F_INDIRECT;
                    self.put_desc(z + Z_INDIRECT, i, z + Z_INDIRECT, 64, flags, next);
                } else {
                    self.put_desc(z + Z_INDIRECT, i, a, l, flags, next);
                }
            }
            let in_filler = z + Z_READ + (self.rng.below(READ_LEN / 2) & !15);
            let addr = match self.rng.below(8) {
                0 => in_filler,
                1 => self.outside(),
                2 => z + Z_INDIRECT + 8,
                _ => z + Z_INDIRECT,
            };
            let tlen = match self.rng.below(6) {
                0 => 0,
                1 => (entries * 16 + 8) as u32,
                2 => 0x000f_fff0 + self.rng.below(16) as u32,
                _ => (entries * 16) as u32,
            };
            // Entries the device may walk are ours: the indirect slots, or the 0xFF filler
            // (whose INDIRECT flag ends the walk); outside RAM nothing can be read.
            let tlen = if addr >= z + Z_READ && addr < z + Z_READ + READ_LEN {
                tlen.min((READ_LEN / 2) as u32)
            } else if addr < z + Z_READ {
                tlen.min((INDIRECT_SLOTS * 16) as u32)
            } else {
                tlen
            };
            let flags = DESC_F_INDIRECT | self.rng.pick(&[0, v::DESC_F_NEXT, v::DESC_F_WRITE]);
            let next = (first as u16).wrapping_add(1);
            self.put_desc(table, first, addr, tlen, flags, next);
            return first as u16;
        } else {
            (first, table, n)
        };
        for i in 0..len {
            let (a, l, f) = if (i as usize) < parts {
                descs[i as usize]
            } else {
                let (a, l) = if t.blk && self.rng.below(2) == 0 {
                    (self.readable_addr(), self.length().min(cap))
                } else {
                    (self.writable_addr(), self.length())
                };
                (a, l, if l == 0 { 0 } else { v::DESC_F_WRITE })
            };
            let last = i + 1 == len;
            let mut flags = f | v::DESC_F_NEXT;
            let mut next = (first + i + 1) as u16;
            if last {
                match kind {
                    0 => next = (first + self.rng.below(len)) as u16,
                    1 => next = self.rng.pick(&[0, size]),
                    6 => next = self.rng.pick(&[size, size + 1, 0xffff]),
                    _ => flags &= !v::DESC_F_NEXT,
                }
            } else if kind == 6 && self.rng.below(2) == 0 {
                next = size.wrapping_add(self.rng.below(100) as u16);
            }
            self.put_desc(table, first + i, a, l, flags, next);
        }
        first as u16
    }

    /// The `i`-th of `n` descriptors of a malformed request of `kind`: `(addr, len, flags)`.
    fn part(&mut self, t: &Target, i: usize, n: usize, kind: usize, cap: u32) -> (u64, u32, u16) {
        let z = self.zone;
        if !t.blk {
            // virtio-rng: writable buffers, sometimes a readable one it must ignore.
            return match kind {
                3 => (self.outside(), self.length(), v::DESC_F_WRITE),
                4 => (self.readable_addr(), self.length().min(cap), 0),
                5 => (self.writable_addr(), self.length(), v::DESC_F_WRITE),
                _ => (
                    self.writable_addr(),
                    64 + self.rng.below(4096) as u32,
                    v::DESC_F_WRITE,
                ),
            };
        }
        let role = if i == 0 {
            0
        } else if i + 1 == n {
            2
        } else {
            1
        };
        let (mut a, mut l, mut f) = match role {
            0 => (z + Z_HDR, 16u32, 0u16),
            2 => (z + Z_STATUS, 1, v::DESC_F_WRITE),
            _ => {
                if self.rng.below(2) == 0 {
                    (
                        self.writable_addr(),
                        512 * (1 + self.rng.below(8) as u32),
                        v::DESC_F_WRITE,
                    )
                } else {
                    (self.readable_addr(), 512, 0)
                }
            }
        };
        match kind {
            3 => {
                a = if f & v::DESC_F_WRITE != 0 || self.rng.below(2) == 0 {
                    self.outside()
                } else {
                    a
                }
            }
            4 => match self.rng.below(3) {
                // Header writable, status readable, data flipped.
                0 if role == 0 => f = v::DESC_F_WRITE,
                1 if role == 2 => f = 0,
                _ if role == 1 => {
                    f ^= v::DESC_F_WRITE;
                    if f & v::DESC_F_WRITE != 0 {
                        a = self.writable_addr();
                    } else {
                        a = self.readable_addr();
                    }
                }
                _ => {}
            },
            5 => l = self.length(),
            _ => {}
        }
        // A header or status made writable may be written anywhere in the zone; readable
        // lengths obey the write bound.
        if f & v::DESC_F_WRITE == 0 {
            l = l.min(cap);
        } else if a < z + Z_WRITE && !(a >= z + Z_HDR && a < z + Z_INDIRECT) {
            a = self.writable_addr();
        } else if a >= z + Z_HDR && a < z + Z_INDIRECT {
            // A writable header or status: at most what fits before the indirect tables.
            l = l.min((Z_INDIRECT - (a - z)) as u32);
        }
        (a, l, f)
    }

    /// A well-formed request in the last descriptors after the malformed ones. Unless the
    /// queue was overrun, it gets the full I/O timeout: a device that neither completes it
    /// nor reports DEVICE_NEEDS_RESET counts as `silent`.
    fn probe(&mut self, t: &Target, size: u16, mut avail_idx: u16, overrun: bool) {
        let z = self.zone;
        let table = z + Z_DESC;
        let need = if t.blk { 3 } else { 1 };
        if size < need + 1 {
            return;
        }
        let head = size - need;
        let data = z + Z_PROBE_DATA;
        if t.blk {
            phys::write_u32(z + Z_PROBE_HDR, T_IN);
            phys::write_u32(z + Z_PROBE_HDR + 4, 0);
            phys::write_u64(z + Z_PROBE_HDR + 8, 0);
            phys::write_u8(z + Z_PROBE_STATUS, 0xff);
            let h = u64::from(head);
            self.put_desc(table, h, z + Z_PROBE_HDR, 16, v::DESC_F_NEXT, head + 1);
            let wn = v::DESC_F_WRITE | v::DESC_F_NEXT;
            self.put_desc(table, h + 1, data, 512, wn, head + 2);
            self.put_desc(table, h + 2, z + Z_PROBE_STATUS, 1, v::DESC_F_WRITE, 0);
        } else {
            self.put_desc(table, u64::from(head), data, 64, v::DESC_F_WRITE, 0);
        }
        let start = phys::load_u16(z + Z_USED + 2);
        self.make_avail(size, &mut avail_idx, head);
        t.dev.set_reg(v::QUEUE_NOTIFY, 0);
        let zone = self.zone;
        let found = move |u: u16| {
            let mut i = start;
            while i != u {
                let elem = zone + Z_USED + 4 + 8 * u64::from(i % size);
                if phys::load_u32(elem) == u32::from(head) {
                    return true;
                }
                i = i.wrapping_add(1);
            }
            false
        };
        let ticks = if overrun {
            self.wait_ticks
        } else {
            self.io_ticks
        };
        let out = self.wait(t, found, ticks);
        match out {
            Outcome::Done => {
                if t.blk && phys::read_u8(z + Z_PROBE_STATUS) != 0 {
                    exit::fail(format_args!(
                        "blk {:#x}: probe read of sector 0 gave status {}",
                        t.dev.base(),
                        phys::read_u8(z + Z_PROBE_STATUS)
                    ));
                }
                self.probe[0] += 1;
            }
            Outcome::NeedsReset => self.probe[1] += 1,
            Outcome::Silent if overrun => self.probe[3] += 1,
            Outcome::Silent => self.probe[2] += 1,
        }
    }
}
