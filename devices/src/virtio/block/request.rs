//! Parsing and executing one virtio-blk request (virtio 1.2, 5.2.6): a 16-byte header the
//! driver wrote, data buffers, and a status byte the device writes last. Everything in a
//! request comes from the guest: lengths, sectors and layout are checked here.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Reader, Writer};
use vm_memory::ByteValued;

/// Bytes per virtio-blk sector, whatever the backing file's block size.
pub const SECTOR_SIZE: u64 = 512;
/// The largest data transfer one request may ask for; larger ones fail with IOERR rather
/// than make the device allocate what the guest says.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Bounce buffer size: data moves between guest memory and the file in chunks of this.
const CHUNK_BYTES: usize = 1 << 20;

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

/// Executes the request whose header and output data are in `reader` and whose input data
/// go to `data` (the writable buffers minus the status byte). Returns the bytes written to
/// `data`.
pub fn execute(
    disk: &mut Disk,
    reader: &mut Reader<'_>,
    data: &mut Writer<'_>,
    bounce: &mut Vec<u8>,
) -> Result<usize, RequestError> {
    run(disk, reader, data, bounce).result
}

/// What [`run`] did.
#[derive(Debug)]
pub struct Outcome {
    /// The request's kind, once its header was read.
    pub kind: Option<RequestKind>,
    /// Bytes written to `data`, or why the request failed.
    pub result: Result<usize, RequestError>,
    /// Bytes moved between the guest and the disk (read or written).
    pub disk_bytes: usize,
}

/// Like [`execute`], also reporting the request's kind and the bytes it moved (for metrics).
pub fn run(
    disk: &mut Disk,
    reader: &mut Reader<'_>,
    data: &mut Writer<'_>,
    bounce: &mut Vec<u8>,
) -> Outcome {
    let header: RequestHeader = match reader.read_obj() {
        Ok(h) => h,
        Err(_) => {
            return Outcome {
                kind: None,
                result: Err(RequestError::NoHeader),
                disk_bytes: 0,
            }
        }
    };
    let kind = RequestKind::from(header.request_type);
    let disk_bytes = match kind {
        RequestKind::In => data.available_bytes(),
        RequestKind::Out => reader.available_bytes(),
        _ => 0,
    };
    let result = execute_kind(disk, kind, header.sector, reader, data, bounce);
    Outcome {
        kind: Some(kind),
        disk_bytes: if result.is_ok() { disk_bytes } else { 0 },
        result,
    }
}

fn execute_kind(
    disk: &mut Disk,
    kind: RequestKind,
    sector: u64,
    reader: &mut Reader<'_>,
    data: &mut Writer<'_>,
    bounce: &mut Vec<u8>,
) -> Result<usize, RequestError> {
    match kind {
        RequestKind::In => {
            let len = data.available_bytes();
            let mut offset = check_range(disk, sector, len)?;
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK_BYTES);
                bounce.resize(n, 0);
                disk.file
                    .read_exact_at(&mut bounce[..n], offset)
                    .map_err(RequestError::Io)?;
                data.write_all(&bounce[..n]).map_err(RequestError::Io)?;
                offset += n as u64;
                left -= n;
            }
            Ok(len)
        }
        RequestKind::Out => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes();
            let mut offset = check_range(disk, sector, len)?;
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK_BYTES);
                bounce.resize(n, 0);
                reader
                    .read_exact(&mut bounce[..n])
                    .map_err(RequestError::Io)?;
                disk.file
                    .write_all_at(&bounce[..n], offset)
                    .map_err(RequestError::Io)?;
                offset += n as u64;
                left -= n;
            }
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
            let len = data.available_bytes().min(id.len());
            data.write_all(&id[..len]).map_err(RequestError::Io)?;
            Ok(len)
        }
        RequestKind::Unsupported(t) => Err(RequestError::Unsupported(t)),
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
