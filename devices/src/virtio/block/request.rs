//! Parsing and executing one virtio-blk request (virtio 1.2, 5.2.6): a 16-byte header the
//! driver wrote, data buffers, and a status byte the device writes last. Everything in a
//! request comes from the guest: lengths, sectors and layout are checked here.
//!
//! The chain is walked once, into guest-memory slices ([`Request::parse`]); data then moves
//! between the backing file and those slices with one `preadv`/`pwritev` per request (more
//! only for short transfers or more than `IOV_MAX` pieces), with no copy in between.

use std::os::fd::AsRawFd;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;

use crate::{GuestMemoryMmap, GuestSlice};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

/// Bytes per virtio-blk sector, whatever the backing file's block size.
pub const SECTOR_SIZE: u64 = 512;
/// The largest data transfer one request may ask for; larger ones fail with IOERR rather
/// than make the device allocate what the guest says.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// The most pieces one `preadv`/`pwritev` takes (Linux's UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;
/// Length of the request header.
const HEADER_LEN: usize = std::mem::size_of::<RequestHeader>();

/// The request header (`struct virtio_blk_outhdr`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RequestHeader {
    /// VIRTIO_BLK_T_*.
    pub request_type: u32,
    /// Reserved (ioprio in legacy devices).
    pub reserved: u32,
    /// First 512-byte sector.
    pub sector: u64,
}

// SAFETY: RequestHeader is #[repr(C)], made of integers only, with no padding (4 + 4 + 8).
unsafe impl ByteValued for RequestHeader {}

/// The kinds of request the device understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the driver's buffers.
    In,
    /// Write the driver's buffers to sectors.
    Out,
    /// Make written data durable.
    Flush,
    /// Return the device's ID string.
    GetId,
    /// Anything else.
    Unsupported(u32),
}

impl From<u32> for RequestKind {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

/// Why a request failed; each becomes a status byte for the driver.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain is too short for a header.
    #[error("request has no complete header")]
    NoHeader,
    /// The data length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(usize),
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}+{len_bytes}B are beyond the disk's {capacity_bytes} bytes")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length.
        len_bytes: usize,
        /// Disk size.
        capacity_bytes: u64,
    },
    /// The request moves more data than a request may.
    #[error("request of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The request type is unknown.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Reading or writing the backing file or guest memory failed.
    #[error("I/O error")]
    Io(#[source] std::io::Error),
}

impl RequestError {
    /// The status byte the driver sees.
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// The disk a request works on.
#[derive(Debug)]
pub struct Disk {
    /// Backing file.
    pub file: std::fs::File,
    /// Its size in bytes (a whole number of sectors).
    pub capacity_bytes: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// The ID string returned by GET_ID (at most 20 bytes used).
    pub id: String,
}

/// Checks that `len` bytes at `sector` lie on the disk; returns the byte offset.
fn check_range(disk: &Disk, sector: u64, len: usize) -> Result<u64, RequestError> {
    if len > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge(len));
    }
    if !(len as u64).is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned(len));
    }
    let out_of_range = || RequestError::OutOfRange {
        sector,
        len_bytes: len,
        capacity_bytes: disk.capacity_bytes,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
    let end = offset.checked_add(len as u64).ok_or_else(out_of_range)?;
    if end > disk.capacity_bytes {
        return Err(out_of_range());
    }
    Ok(offset)
}

/// Why a descriptor chain cannot be a request at all; the device returns it with used
/// length 0 and writes no status.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer at {addr:#x}+{len} is outside guest memory")]
    OutsideMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable buffer follows a device-writable one (virtio 1.2, 2.7.4.2).
    #[error("readable buffer after a writable one")]
    ReadableAfterWritable,
    /// The buffers add up to more than the address space.
    #[error("buffer lengths overflow")]
    Overflow,
    /// No writable byte for the status.
    #[error("request without a status byte")]
    NoStatus,
}

/// A request's buffers, as slices of guest memory: what the driver wrote (header, then the
/// data of a write), where the data of a read goes, and the status byte.
#[derive(Debug)]
pub struct Request<'a> {
    readable: Vec<GuestSlice<'a>>,
    /// Writable buffers without the status byte.
    writable: Vec<GuestSlice<'a>>,
    status: GuestSlice<'a>,
    readable_bytes: usize,
    writable_bytes: usize,
}

impl<'a> Request<'a> {
    /// Walks `chain` once and maps every buffer into guest memory. A buffer that straddles
    /// memory regions becomes several slices; one outside memory fails the chain.
    pub fn parse(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, ChainError> {
        let mut readable = Vec::with_capacity(2);
        let mut writable = Vec::with_capacity(2);
        let (mut readable_bytes, mut writable_bytes) = (0usize, 0usize);
        for desc in chain {
            let len = desc.len();
            if len == 0 {
                continue;
            }
            let (slices, total) = if desc.is_write_only() {
                (&mut writable, &mut writable_bytes)
            } else if !writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            } else {
                (&mut readable, &mut readable_bytes)
            };
            *total = total
                .checked_add(len as usize)
                .ok_or(ChainError::Overflow)?;
            map_buffer(mem, desc.addr(), len, slices)?;
        }
        let last = writable.pop().ok_or(ChainError::NoStatus)?;
        let split = last.len() - 1;
        let status = last.offset(split).map_err(|_| ChainError::NoStatus)?;
        if split > 0 {
            writable.push(last.subslice(0, split).map_err(|_| ChainError::NoStatus)?);
        }
        Ok(Self {
            readable,
            writable,
            status,
            readable_bytes,
            writable_bytes: writable_bytes - 1,
        })
    }

    /// Data bytes the request moves at most: everything but the header and the status byte
    /// (what a rate limiter charges).
    pub fn data_bytes(&self) -> usize {
        self.readable_bytes.saturating_sub(HEADER_LEN) + self.writable_bytes
    }

    /// The request's kind, when the header is there.
    pub fn kind(&self) -> Option<RequestKind> {
        let mut header = RequestHeader::default();
        (copy_from_slices(&self.readable, header.as_mut_slice()) >= HEADER_LEN)
            .then(|| RequestKind::from(header.request_type))
    }

    /// Bytes in the writable buffers, status byte excluded.
    pub fn writable_bytes(&self) -> usize {
        self.writable_bytes
    }

    /// Runs the request on `disk`; returns the bytes written to the driver's buffers (status
    /// byte excluded).
    pub fn execute(&self, disk: &mut Disk) -> Result<usize, RequestError> {
        let mut header = RequestHeader::default();
        if copy_from_slices(&self.readable, header.as_mut_slice()) < HEADER_LEN {
            return Err(RequestError::NoHeader);
        }
        match RequestKind::from(header.request_type) {
            RequestKind::In => {
                let len = self.writable_bytes;
                let offset = check_range(disk, header.sector, len)?;
                transfer(disk, offset, &self.writable, 0, Direction::FileToGuest)?;
                Ok(len)
            }
            RequestKind::Out => {
                if disk.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let len = self.readable_bytes - HEADER_LEN;
                let offset = check_range(disk, header.sector, len)?;
                transfer(
                    disk,
                    offset,
                    &self.readable,
                    HEADER_LEN,
                    Direction::GuestToFile,
                )?;
                Ok(0)
            }
            RequestKind::Flush => {
                if !disk.read_only {
                    disk.file.sync_data().map_err(RequestError::Io)?;
                }
                Ok(0)
            }
            RequestKind::GetId => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let bytes = disk.id.as_bytes();
                let n = bytes.len().min(id.len());
                id[..n].copy_from_slice(&bytes[..n]);
                Ok(copy_to_slices(&self.writable, &id))
            }
            RequestKind::Unsupported(t) => Err(RequestError::Unsupported(t)),
        }
    }

    /// Writes the status byte; returns the used length for the queue (`written` data bytes
    /// and the status byte).
    pub fn complete(&self, status: u8, written: usize) -> u32 {
        if self.status.write_obj(status, 0).is_err() {
            return 0;
        }
        u32::try_from(written.min(self.writable_bytes) + 1).unwrap_or(u32::MAX)
    }
}

/// Appends the slices covering `len` bytes at `addr` to `slices`.
fn map_buffer<'a>(
    mem: &'a GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
    slices: &mut Vec<GuestSlice<'a>>,
) -> Result<(), ChainError> {
    let outside = || ChainError::OutsideMemory { addr: addr.0, len };
    let mut mapped = 0usize;
    for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
        let slice = slice.map_err(|_| outside())?;
        mapped += slice.len();
        slices.push(slice);
    }
    if mapped != len as usize {
        return Err(outside());
    }
    Ok(())
}

/// Copies the start of `slices` into `buf`; returns the bytes copied.
fn copy_from_slices(slices: &[GuestSlice<'_>], buf: &mut [u8]) -> usize {
    let mut done = 0;
    for s in slices {
        if done == buf.len() {
            break;
        }
        done += s.copy_to(&mut buf[done..]);
    }
    done
}

/// Copies `buf` into the start of `slices`, as much as fits; returns the bytes copied.
fn copy_to_slices(slices: &[GuestSlice<'_>], buf: &[u8]) -> usize {
    let mut done = 0;
    for s in slices {
        if done == buf.len() {
            break;
        }
        let n = s.len().min(buf.len() - done);
        s.copy_from(&buf[done..done + n]);
        done += n;
    }
    done
}

/// Which way data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Read the file into guest memory.
    FileToGuest,
    /// Write guest memory to the file.
    GuestToFile,
}

/// Moves the bytes of `slices` (after the first `skip` bytes) to or from the file at `offset`,
/// with positioned vectored I/O straight on guest memory. The caller has checked that the
/// range lies on the disk.
fn transfer(
    disk: &Disk,
    mut offset: u64,
    slices: &[GuestSlice<'_>],
    mut skip: usize,
    direction: Direction,
) -> Result<(), RequestError> {
    let fd = disk.file.as_raw_fd();
    let mut index = 0;
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(slices.len().min(MAX_IOVECS));
    while index < slices.len() {
        // Drop what was already moved: whole slices, then `skip` bytes of the next one.
        while let Some(s) = slices.get(index) {
            if skip < s.len() {
                break;
            }
            skip -= s.len();
            index += 1;
        }
        if index == slices.len() {
            break;
        }
        iovecs.clear();
        for (i, s) in slices[index..].iter().take(MAX_IOVECS).enumerate() {
            let from = if i == 0 { skip } else { 0 };
            iovecs.push(libc::iovec {
                // The pointer is only handed to the kernel; a slice of guest memory is valid
                // for its whole length (vm-memory checked it against the mapping).
                iov_base: s.ptr_guard_mut().as_ptr().wrapping_add(from).cast(),
                iov_len: s.len() - from,
            });
        }
        let pos = libc::off_t::try_from(offset)
            .map_err(|_| RequestError::Io(std::io::ErrorKind::InvalidInput.into()))?;
        let count = libc::c_int::try_from(iovecs.len()).unwrap_or(libc::c_int::MAX);
        let n = match direction {
            // SAFETY: every iovec covers memory inside one guest-memory slice (checked
            // against the mapping when the chain was parsed); guest memory stays mapped while
            // the device runs. The kernel writes at most the iovecs' lengths into it.
            Direction::FileToGuest => unsafe { libc::preadv(fd, iovecs.as_ptr(), count, pos) },
            // SAFETY: as above; the kernel only reads the iovecs' memory.
            Direction::GuestToFile => unsafe { libc::pwritev(fd, iovecs.as_ptr(), count, pos) },
        };
        let n = match usize::try_from(n) {
            Ok(0) => return Err(RequestError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RequestError::Io(e));
            }
        };
        if direction == Direction::FileToGuest {
            mark_dirty(&slices[index..], skip, n);
        }
        offset += n as u64;
        skip += n;
    }
    Ok(())
}

/// Marks `len` bytes of `slices`, from `skip` on, as written (dirty-page tracking).
fn mark_dirty(slices: &[GuestSlice<'_>], mut skip: usize, mut len: usize) {
    for s in slices {
        if len == 0 {
            break;
        }
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        let n = (s.len() - skip).min(len);
        s.bitmap().mark_dirty(skip, n);
        len -= n;
        skip = 0;
    }
}

/// Status byte: success (virtio 1.2, 5.2.6, VIRTIO_BLK_S_OK).
pub const STATUS_OK: u8 = 0;
/// Status byte: the request failed (VIRTIO_BLK_S_IOERR).
pub const STATUS_IOERR: u8 = 1;
/// Status byte: the request type is not supported (VIRTIO_BLK_S_UNSUPP).
pub const STATUS_UNSUPP: u8 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(len: u64, read_only: bool) -> Disk {
        let file = tempfile();
        file.set_len(len).unwrap();
        Disk {
            file,
            capacity_bytes: len,
            read_only,
            id: "disk0".into(),
        }
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "anvil-blk-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    use std::os::unix::fs::FileExt;

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const F_WRITE: u16 = 2;
    /// Where the two regions of [`two_regions`] meet.
    const SEAM: u64 = 0x10000;

    /// Guest memory of two separately mapped, adjacent regions.
    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(SEAM), 0x10000)])
            .unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        m.write_obj(
            RequestHeader {
                request_type: kind,
                reserved: 0,
                sector,
            },
            GuestAddress(at),
        )
        .unwrap();
    }

    /// Parses and runs the chain `descs`; returns (status, used length).
    fn run(
        m: &GuestMemoryMmap,
        d: &mut Disk,
        descs: &[RawDescriptor],
    ) -> Result<(u8, u32), ChainError> {
        let queue = MockSplitQueue::new(m, 16);
        let chain = queue.build_desc_chain(descs).unwrap();
        let request = Request::parse(m, chain)?;
        let (status, written) = match request.execute(d) {
            Ok(n) => (STATUS_OK, n),
            Err(e) => (e.status(), 0),
        };
        Ok((status, request.complete(status, written)))
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
    }

    #[test]
    fn data_straddling_two_memory_regions_reaches_the_file() {
        let m = two_regions();
        let mut d = disk(8192, false);
        let data = pattern(4096);
        m.write_slice(&data, GuestAddress(SEAM - 1536)).unwrap();
        header(&m, 0x2000, VIRTIO_BLK_T_OUT, 2);
        let descs = [
            desc(0x2000, 16, 0),
            desc(SEAM - 1536, 4096, 0),
            desc(0x3000, 1, F_WRITE),
        ];
        assert_eq!(run(&m, &mut d, &descs).unwrap(), (STATUS_OK, 1));
        let mut back = vec![0u8; 4096];
        d.file.read_exact_at(&mut back, 1024).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn reads_fill_buffers_straddling_two_memory_regions() {
        let m = two_regions();
        let mut d = disk(8192, false);
        let data = pattern(8192);
        d.file.write_all_at(&data, 0).unwrap();
        header(&m, 0x2000, VIRTIO_BLK_T_IN, 1);
        // Two data buffers, the second across the seam, and the status byte after it.
        let descs = [
            desc(0x2000, 16, 0),
            desc(0x4000, 512, F_WRITE),
            desc(SEAM - 100, 1024, F_WRITE),
            desc(0x3000, 1, F_WRITE),
        ];
        assert_eq!(run(&m, &mut d, &descs).unwrap(), (STATUS_OK, 1537));
        let mut first = vec![0u8; 512];
        m.read_slice(&mut first, GuestAddress(0x4000)).unwrap();
        assert_eq!(first, data[512..1024]);
        let mut second = vec![0u8; 1024];
        m.read_slice(&mut second, GuestAddress(SEAM - 100)).unwrap();
        assert_eq!(second, data[1024..2048]);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), STATUS_OK);
    }

    #[test]
    fn a_header_and_status_split_across_buffers_and_regions_work() {
        let m = two_regions();
        let mut d = disk(4096, false);
        d.file.write_all_at(&pattern(4096), 0).unwrap();
        // The header starts 8 bytes before the seam; data and status share one buffer that
        // straddles it too.
        header(&m, SEAM - 8, VIRTIO_BLK_T_IN, 0);
        let descs = [desc(SEAM - 8, 16, 0), desc(SEAM - 256, 513, F_WRITE)];
        assert_eq!(run(&m, &mut d, &descs).unwrap(), (STATUS_OK, 513));
        let mut back = vec![0u8; 512];
        m.read_slice(&mut back, GuestAddress(SEAM - 256)).unwrap();
        assert_eq!(back, pattern(512));
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(SEAM + 256)).unwrap(),
            STATUS_OK
        );
    }

    #[test]
    fn buffers_reaching_outside_guest_memory_fail_the_chain() {
        let m = two_regions();
        let mut d = disk(4096, false);
        header(&m, 0x2000, VIRTIO_BLK_T_IN, 0);
        let descs = [
            desc(0x2000, 16, 0),
            desc(2 * SEAM - 256, 512, F_WRITE),
            desc(0x3000, 1, F_WRITE),
        ];
        assert!(matches!(
            run(&m, &mut d, &descs),
            Err(ChainError::OutsideMemory { .. })
        ));
        let descs = [desc(0x2000, 16, 0), desc(u64::MAX - 4, 512, F_WRITE)];
        assert!(matches!(
            run(&m, &mut d, &descs),
            Err(ChainError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn chains_without_status_or_with_readable_after_writable_are_refused() {
        let m = two_regions();
        let mut d = disk(4096, false);
        header(&m, 0x2000, VIRTIO_BLK_T_OUT, 0);
        assert!(matches!(
            run(&m, &mut d, &[desc(0x2000, 16, 0), desc(0x4000, 512, 0)]),
            Err(ChainError::NoStatus)
        ));
        assert!(matches!(
            run(
                &m,
                &mut d,
                &[
                    desc(0x2000, 16, 0),
                    desc(0x3000, 1, F_WRITE),
                    desc(0x4000, 512, 0)
                ]
            ),
            Err(ChainError::ReadableAfterWritable)
        ));
    }

    #[test]
    fn short_headers_unaligned_data_and_read_only_writes_fail_the_request() {
        let m = two_regions();
        let mut d = disk(4096, true);
        header(&m, 0x2000, VIRTIO_BLK_T_OUT, 0);
        let status = desc(0x3000, 1, F_WRITE);
        assert_eq!(
            run(&m, &mut d, &[desc(0x2000, 15, 0), status]).unwrap(),
            (STATUS_IOERR, 1),
            "no complete header"
        );
        assert_eq!(
            run(
                &m,
                &mut d,
                &[desc(0x2000, 16, 0), desc(0x4000, 512, 0), status]
            )
            .unwrap(),
            (STATUS_IOERR, 1),
            "read-only"
        );
        header(&m, 0x2000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(
                &m,
                &mut d,
                &[desc(0x2000, 16, 0), desc(0x4000, 100, F_WRITE), status]
            )
            .unwrap(),
            (STATUS_IOERR, 1),
            "unaligned"
        );
        header(&m, 0x2000, 99, 0);
        assert_eq!(
            run(&m, &mut d, &[desc(0x2000, 16, 0), status]).unwrap(),
            (STATUS_UNSUPP, 1)
        );
    }

    #[test]
    fn requests_with_more_pieces_than_one_syscall_takes_complete() {
        // A 1 MiB read into 2048 buffers of 512 bytes: more than MAX_IOVECS pieces.
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut d = disk(2 << 20, false);
        let data = pattern(1 << 20);
        d.file.write_all_at(&data, 4096).unwrap();
        let r = Request {
            readable: {
                header(&m, 0x2000, VIRTIO_BLK_T_IN, 8);
                vec![m.get_slice(GuestAddress(0x2000), 16).unwrap()]
            },
            writable: (0..2048u64)
                .map(|i| {
                    m.get_slice(GuestAddress((1 << 20) + i * 1024), 512)
                        .unwrap()
                })
                .collect(),
            status: m.get_slice(GuestAddress(0x3000), 1).unwrap(),
            readable_bytes: 16,
            writable_bytes: 1 << 20,
        };
        assert_eq!(r.execute(&mut d).unwrap(), 1 << 20);
        for i in 0..2048usize {
            let mut piece = [0u8; 512];
            m.read_slice(&mut piece, GuestAddress((1 << 20) + i as u64 * 1024))
                .unwrap();
            assert_eq!(piece[..], data[i * 512..(i + 1) * 512], "piece {i}");
        }
    }

    #[test]
    fn header_is_16_bytes() {
        assert_eq!(std::mem::size_of::<RequestHeader>(), 16);
    }

    #[test]
    fn ranges_are_checked_against_the_capacity() {
        let d = disk(4096, false);
        assert_eq!(check_range(&d, 0, 4096).unwrap(), 0);
        assert_eq!(check_range(&d, 7, 512).unwrap(), 3584);
        assert!(matches!(
            check_range(&d, 8, 512),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(&d, 0, 100),
            Err(RequestError::Unaligned(100))
        ));
        assert!(matches!(
            check_range(&d, u64::MAX, 512),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(&d, u64::MAX / 512, 512),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(&d, 0, MAX_REQUEST_BYTES + 512),
            Err(RequestError::TooLarge(_))
        ));
    }

    #[test]
    fn statuses() {
        assert_eq!(RequestError::Unsupported(99).status(), STATUS_UNSUPP);
        assert_eq!(RequestError::ReadOnly.status(), STATUS_IOERR);
    }
}
