//! A bump allocator over guest RAM for memory shared with devices (virtqueues and buffers).
//!
//! The arena is the largest RAM range of the memory map at or above 1 MiB, outside the guest
//! image and inside the identity map. Nothing is ever freed; a workload allocates what it needs
//! up front. Allocations are zeroed.

use crate::bootinfo::BootInfo;
use crate::{entry, paging, phys};

const LOW_SKIP: u64 = 1 << 20;

/// Guest RAM handed out to devices.
#[derive(Debug)]
pub struct Arena {
    next: u64,
    end: u64,
}

impl Arena {
    /// The largest usable RAM range, or `None` when there is none.
    pub fn new(info: &BootInfo) -> Option<Self> {
        let (img_start, img_end) = entry::image_range();
        let mapped = paging::mapped_end();
        let mut best: Option<(u64, u64)> = None;
        let mut consider = |start: u64, end: u64| {
            let better = match best {
                None => true,
                Some((s, e)) => end - start > e - s,
            };
            if end > start && better {
                best = Some((start, end));
            }
        };
        for e in info.ram() {
            let start = e.addr.max(LOW_SKIP);
            let end = e.end().min(mapped);
            consider(start, end.min(img_start));
            consider(start.max(img_end), end);
        }
        let (next, end) = best?;
        Some(Arena { next, end })
    }

    /// An arena over `[start, end)`, which the caller owns (RAM inside the identity map,
    /// outside the image, handed to no device that may still write it).
    pub fn from_range(start: u64, end: u64) -> Self {
        Arena { next: start, end }
    }

    /// Hands out everything that is left, 4 KiB aligned: `(start, end)`, or `None` when less
    /// than a page remains.
    pub fn take_rest(&mut self) -> Option<(u64, u64)> {
        let start = self.next.checked_next_multiple_of(4096)?;
        if start + 4096 > self.end {
            return None;
        }
        self.next = self.end;
        Some((start, self.end))
    }

    /// `len` zeroed bytes aligned to `align` (a power of two), or `None` when the arena is full.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let start = self.next.checked_next_multiple_of(align)?;
        let end = start.checked_add(len)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        // SAFETY: `[start, end)` is RAM inside the arena (mapped, outside the image) that no
        // earlier allocation covers, and no device has been given it yet.
        unsafe { phys::bytes_mut(start, len as usize) }.fill(0);
        Some(start)
    }
}
