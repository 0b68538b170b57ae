//! Shared pieces of anvil's fuzz targets: the guest memory layout, a byte cursor, and the
//! decoding of an input into a split virtqueue written into guest memory the way a (hostile)
//! driver would write it.
//!
//! Inputs are decoded with a small hand-written format rather than `arbitrary` so that the
//! seed corpus can be written by `seeds/gen_seeds.py` from the unit tests' request shapes.

#![allow(clippy::cast_possible_truncation)]

use std::os::fd::FromRawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use devices::GuestMemoryMmap;

/// Guest memory: two adjacent regions (buffers may straddle the boundary at
/// [`REGION_EDGE`]), a hole, and a small third region after it.
pub const MEM_RANGES: [(u64, usize); 3] = [
    (0, 0x8_0000),
    (REGION_EDGE, 0x8_0000),
    (0x20_0000, 0x1_0000),
];
/// Where the first two regions meet.
pub const REGION_EDGE: u64 = 0x8_0000;
/// Descriptor table (256 entries of 16 bytes).
pub const DESC: u64 = 0x1000;
/// Available ring.
pub const AVAIL: u64 = 0x3000;
/// Used ring.
pub const USED: u64 = 0x4000;
/// An indirect descriptor table the input may fill (up to [`MAX_INDIRECT`] entries).
pub const INDIRECT: u64 = 0x5000;
/// The request header the input writes (16 bytes).
pub const HDR: u64 = 0x8000;
/// The data area the rest of the input is copied to.
pub const DATA: u64 = 0x1_0000;
/// Size of the data area.
pub const DATA_LEN: usize = 0x1_0000;
/// Largest indirect table the input can write.
pub const MAX_INDIRECT: usize = 64;
/// Largest number of chain heads the input can publish.
pub const MAX_HEADS: usize = 32;

/// Descriptor flags (virtio 1.2, 2.7.5).
pub const F_NEXT: u16 = 1;
/// The buffer is device-writable.
pub const F_WRITE: u16 = 2;
/// The buffer is an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// Guest memory as [`MEM_RANGES`] describes it.
pub fn guest_memory() -> GuestMemoryMmap {
    let ranges = MEM_RANGES.map(|(start, len)| (GuestAddress(start), len));
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

/// Reads the input front to back; past its end everything reads as zero.
#[derive(Debug)]
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Takes up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// Takes exactly `N` bytes, zero-padded.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let src = self.take(N);
        out[..src.len()].copy_from_slice(src);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// True when nothing is left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }
}

/// A split virtqueue as the input lays it out (see `fuzz/README.md` for the byte format).
#[derive(Debug)]
pub struct QueueLayout {
    /// Open the disk read-only.
    pub read_only: bool,
    /// Negotiate VIRTIO_F_EVENT_IDX.
    pub event_idx: bool,
    /// Queue size (a power of two, 1..=256).
    pub queue_size: u16,
    /// Disk size in 512-byte sectors.
    pub disk_sectors: u64,
    /// The available ring's idx as published by the driver.
    pub avail_idx: u16,
    /// The 16-byte request header written at [`HDR`].
    pub header: [u8; 16],
    /// Chain heads in the available ring.
    pub heads: Vec<u16>,
    /// Raw descriptors written at [`DESC`] (index 0 up).
    pub descs: Vec<[u8; 16]>,
    /// Raw descriptors written at [`INDIRECT`].
    pub indirect: Vec<[u8; 16]>,
    /// Bytes copied to [`DATA`].
    pub data: Vec<u8>,
}

impl QueueLayout {
    /// Decodes `input`:
    /// `flags:u8 sectors:u8 avail_idx:u16 nheads:u8 ndesc:u8 nindirect:u8 pad:u8 header:[u8;16]
    /// heads:[u16;nheads] descs:[[u8;16];ndesc] indirect:[[u8;16];nindirect] data:rest`.
    pub fn decode(input: &[u8]) -> Self {
        let mut c = Cursor::new(input);
        let flags = c.u8();
        let disk_sectors = u64::from(c.u8() % 33);
        let avail_idx = c.u16();
        let nheads = usize::from(c.u8()).min(MAX_HEADS);
        let ndesc = usize::from(c.u8());
        let nindirect = usize::from(c.u8()).min(MAX_INDIRECT);
        let _pad = c.u8();
        let header = c.array::<16>();
        let queue_size = 1u16 << ((flags >> 4) % 9);
        let heads = (0..nheads).map(|_| c.u16()).collect();
        let descs = (0..ndesc.min(usize::from(queue_size)))
            .map(|_| c.array::<16>())
            .collect();
        let indirect = (0..nindirect).map(|_| c.array::<16>()).collect();
        let data = c.take(DATA_LEN).to_vec();
        Self {
            read_only: flags & 1 != 0,
            event_idx: flags & 2 != 0,
            queue_size,
            disk_sectors,
            avail_idx,
            header,
            heads,
            descs,
            indirect,
            data,
        }
    }

    /// Writes the rings, tables, header and data into `mem` and returns a ready queue over
    /// them, as the transport would hand it to the device.
    pub fn install(&self, mem: &GuestMemoryMmap) -> Queue {
        for (i, d) in self.descs.iter().enumerate() {
            mem.write_slice(d, GuestAddress(DESC + 16 * i as u64))
                .expect("descriptor table");
        }
        for (i, d) in self.indirect.iter().enumerate() {
            mem.write_slice(d, GuestAddress(INDIRECT + 16 * i as u64))
                .expect("indirect table");
        }
        mem.write_slice(&self.header, GuestAddress(HDR))
            .expect("header");
        mem.write_slice(&self.data, GuestAddress(DATA)).expect("data");
        for (i, h) in self.heads.iter().enumerate() {
            // The ring has queue_size slots; extra heads wrap, as a driver's would.
            let slot = i as u64 % u64::from(self.queue_size);
            mem.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * slot))
                .expect("avail ring");
        }
        mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .expect("avail idx");

        let mut q = Queue::new(256).expect("queue");
        q.try_set_size(self.queue_size).expect("queue size");
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(self.event_idx);
        q.set_ready(true);
        assert!(q.is_valid(mem), "the fixed ring layout is valid");
        q
    }
}

/// An anonymous in-memory file of `len` bytes (a memfd), for a disk backing.
pub fn memfd(len: u64) -> std::fs::File {
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"anvil-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len).expect("memfd size");
    file
}

/// A cheap content fingerprint (FNV-1a) for "the file is untouched" checks.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
