//! The live-migration wire format (docs/migration.md): a stream of frames, each an 8-byte
//! header (kind `u32` LE, payload length `u32` LE) and its payload. Every kind has its own
//! payload limit, checked before the payload is read, so a hostile peer cannot make the
//! reader allocate more than [`MAX_STATE`] bytes or write outside guest memory.

use std::io::{Read, Write};

/// First bytes of a `Hello` payload.
pub const MAGIC: [u8; 8] = *b"ANVILMIG";
/// The protocol version this build speaks (both ends must speak the same one).
pub const PROTOCOL_VERSION: u32 = 1;
/// Guest page size the protocol moves memory in.
pub const PAGE_SIZE: u64 = 4096;
/// [`PAGE_SIZE`] as a `usize`.
pub const PAGE_BYTES: usize = 4096;
/// Most pages in one `Pages` frame.
pub const MAX_PAGES_PER_FRAME: u32 = 256;
/// Most data bytes in one `Pages` frame.
pub const MAX_PAGES_BYTES: usize = 256 * PAGE_BYTES;
/// Largest `Config` payload (a JSON VM configuration).
pub const MAX_CONFIG: u32 = 1 << 20;
/// Largest `State` payload (the snapshot state limit).
pub const MAX_STATE: u32 = 64 << 20;
/// Largest `Error` payload.
pub const MAX_ERROR: u32 = 4096;
const MAX_HELLO: u32 = 8 + 4 + 64;
const PAGES_HEADER: u32 = 16;
/// `Pages` flag: the pages are all zero and no data follows.
pub const PAGES_ZERO: u32 = 1;

/// Errors of reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed or closed.
    #[error("the connection failed")]
    Io(#[from] std::io::Error),
    /// The peer sent something this protocol does not allow.
    #[error("protocol violation: {0}")]
    Violation(String),
    /// The peer speaks another protocol version.
    #[error("the peer speaks migration protocol version {peer}, this anvil speaks version {PROTOCOL_VERSION}")]
    Version {
        /// The peer's version.
        peer: u32,
    },
    /// The peer reported an error.
    #[error("the peer refused: {0}")]
    Refused(String),
}

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Magic, version, VMM version (both directions, source first).
    Hello = 1,
    /// The VM's configuration as JSON (source to destination).
    Config = 2,
    /// A run of guest pages (source to destination).
    Pages = 3,
    /// The vCPU, VM and device state (source to destination).
    State = 4,
    /// The source has stopped for good: run the guest (source to destination).
    Complete = 5,
    /// The previous frame was accepted (destination to source).
    Ok = 6,
    /// A reason to abort, UTF-8 (either direction).
    Error = 7,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::Config,
            3 => Self::Pages,
            4 => Self::State,
            5 => Self::Complete,
            6 => Self::Ok,
            7 => Self::Error,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_len(self) -> u32 {
        match self {
            Self::Hello => MAX_HELLO,
            Self::Config => MAX_CONFIG,
            Self::Pages => PAGES_HEADER + MAX_PAGES_PER_FRAME * 4096,
            Self::State => MAX_STATE,
            Self::Complete | Self::Ok => 0,
            Self::Error => MAX_ERROR,
        }
    }
}

/// A decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// `Hello`.
    Hello {
        /// The sender's protocol version.
        version: u32,
        /// The sender's anvil version.
        vmm_version: String,
    },
    /// `Config`: the JSON text.
    Config(String),
    /// `Pages`.
    Pages(Pages),
    /// `State`: the bincode state (decoded and checked by the snapshot code).
    State(Vec<u8>),
    /// `Complete`.
    Complete,
    /// `Ok`.
    Ok,
    /// `Error`.
    Error(String),
}

/// A run of consecutive guest pages.
#[derive(Debug, PartialEq, Eq)]
pub struct Pages {
    /// Guest-physical address of the first page (page-aligned).
    pub guest_addr: u64,
    /// How many pages.
    pub count: u32,
    /// The pages' bytes (`count * PAGE_SIZE`), or empty for zero pages.
    pub data: Vec<u8>,
}

impl Pages {
    /// The run's length in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.count) * PAGE_SIZE
    }

    /// Whether the run is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

fn header(kind: Kind, len: usize) -> Result<[u8; 8], ProtocolError> {
    let len = u32::try_from(len)
        .ok()
        .filter(|&l| l <= kind.max_len())
        .ok_or_else(|| ProtocolError::Violation(format!("{kind:?} frame of {len} bytes")))?;
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&(kind as u32).to_le_bytes());
    h[4..].copy_from_slice(&len.to_le_bytes());
    Ok(h)
}

/// Writes one frame with `payload`.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
    w.write_all(&header(kind, payload.len())?)?;
    w.write_all(payload)?;
    Ok(())
}

/// Writes a `Hello` with this build's versions.
pub fn write_hello(w: &mut impl Write, vmm_version: &str) -> Result<(), ProtocolError> {
    write_hello_version(w, PROTOCOL_VERSION, vmm_version)
}

/// Writes a `Hello` claiming `version` (tests use other versions).
pub fn write_hello_version(
    w: &mut impl Write,
    version: u32,
    vmm_version: &str,
) -> Result<(), ProtocolError> {
    let mut p = Vec::with_capacity(MAX_HELLO as usize);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&version.to_le_bytes());
    let v = vmm_version.as_bytes();
    p.extend_from_slice(&v[..v.len().min(64)]);
    write_frame(w, Kind::Hello, &p)
}

/// Writes the header of a `Pages` frame; the caller writes `count` pages of data after it
/// unless `zero`.
pub fn write_pages_header(
    w: &mut impl Write,
    guest_addr: u64,
    count: u32,
    zero: bool,
) -> Result<(), ProtocolError> {
    if count == 0 || count > MAX_PAGES_PER_FRAME {
        return Err(ProtocolError::Violation(format!(
            "{count} pages in a frame"
        )));
    }
    let data = if zero { 0 } else { count as usize * PAGE_BYTES };
    w.write_all(&header(Kind::Pages, PAGES_HEADER as usize + data)?)?;
    let mut p = [0u8; PAGES_HEADER as usize];
    p[..8].copy_from_slice(&guest_addr.to_le_bytes());
    p[8..12].copy_from_slice(&count.to_le_bytes());
    p[12..].copy_from_slice(&(if zero { PAGES_ZERO } else { 0 }).to_le_bytes());
    w.write_all(&p)?;
    Ok(())
}

/// Writes an `Error` frame (the message is cut to the limit).
pub fn write_error(w: &mut impl Write, message: &str) -> Result<(), ProtocolError> {
    let mut end = message.len().min(MAX_ERROR as usize);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    write_frame(w, Kind::Error, &message.as_bytes()[..end])
}

/// Reads one frame; lengths are checked against the kind's limit before anything is
/// allocated, and a payload is decoded only as far as its kind needs.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    read_frame_reusing(r, &mut Vec::new())
}

/// Like [`read_frame`], with `spare` as the buffer for a `Pages` frame's data (give the
/// data back in `spare` after use: a stream of page frames then allocates nothing).
pub fn read_frame_reusing(r: &mut impl Read, spare: &mut Vec<u8>) -> Result<Frame, ProtocolError> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h)?;
    let raw_kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let kind = Kind::from_u32(raw_kind)
        .ok_or_else(|| ProtocolError::Violation(format!("unknown frame kind {raw_kind}")))?;
    if len > kind.max_len() {
        return Err(ProtocolError::Violation(format!(
            "{kind:?} frame of {len} bytes (at most {})",
            kind.max_len()
        )));
    }
    if kind == Kind::Pages {
        return read_pages(r, len, spare);
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    decode(kind, payload)
}

/// A `Pages` frame's body: its header is checked before the data is read into `spare`.
fn read_pages(r: &mut impl Read, len: u32, spare: &mut Vec<u8>) -> Result<Frame, ProtocolError> {
    let violation = |why: String| ProtocolError::Violation(format!("Pages frame: {why}"));
    if len < PAGES_HEADER {
        return Err(violation("shorter than its header".into()));
    }
    let mut h = [0u8; PAGES_HEADER as usize];
    r.read_exact(&mut h)?;
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&h[..8]);
    let guest_addr = u64::from_le_bytes(addr);
    let count = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let flags = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if count == 0 || count > MAX_PAGES_PER_FRAME {
        return Err(violation(format!("{count} pages")));
    }
    if guest_addr % PAGE_SIZE != 0 {
        return Err(violation(format!(
            "address {guest_addr:#x} is not page-aligned"
        )));
    }
    if flags & !PAGES_ZERO != 0 {
        return Err(violation(format!("unknown flags {flags:#x}")));
    }
    let data_len = (len - PAGES_HEADER) as usize;
    let expect = if flags & PAGES_ZERO != 0 {
        0
    } else {
        count as usize * PAGE_BYTES
    };
    if data_len != expect {
        return Err(violation(format!(
            "{data_len} bytes of data for {count} pages"
        )));
    }
    let mut data = std::mem::take(spare);
    if data.len() != data_len {
        data.resize(data_len, 0);
    }
    r.read_exact(&mut data)?;
    Ok(Frame::Pages(Pages {
        guest_addr,
        count,
        data,
    }))
}

fn decode(kind: Kind, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
    let violation = |why: &str| ProtocolError::Violation(format!("{kind:?} frame: {why}"));
    Ok(match kind {
        Kind::Hello => {
            if payload.len() < 12 || payload[..8] != MAGIC {
                return Err(violation("not an anvil migration stream (bad magic)"));
            }
            let version = u32::from_le_bytes([payload[8], payload[9], payload[10], payload[11]]);
            let vmm_version = String::from_utf8_lossy(&payload[12..]).into_owned();
            Frame::Hello {
                version,
                vmm_version,
            }
        }
        Kind::Config => {
            Frame::Config(String::from_utf8(payload).map_err(|_| violation("not UTF-8"))?)
        }
        Kind::Pages => return Err(violation("decoded by read_pages")),
        Kind::State => Frame::State(payload),
        Kind::Complete => Frame::Complete,
        Kind::Ok => Frame::Ok,
        Kind::Error => Frame::Error(String::from_utf8_lossy(&payload).into_owned()),
    })
}

/// Reads the peer's `Hello` and checks its magic and version.
pub fn expect_hello(r: &mut impl Read) -> Result<String, ProtocolError> {
    match read_frame(r)? {
        Frame::Hello {
            version,
            vmm_version,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(ProtocolError::Version { peer: version });
            }
            Ok(vmm_version)
        }
        Frame::Error(why) => Err(ProtocolError::Refused(why)),
        other => Err(unexpected("Hello", &other)),
    }
}

/// Reads the peer's answer to the previous frame: `Ok`, or its `Error`.
pub fn expect_ok(r: &mut impl Read) -> Result<(), ProtocolError> {
    match read_frame(r)? {
        Frame::Ok => Ok(()),
        Frame::Error(why) => Err(ProtocolError::Refused(why)),
        other => Err(unexpected("Ok", &other)),
    }
}

/// The error for a frame that is not the one expected.
pub fn unexpected(wanted: &str, got: &Frame) -> ProtocolError {
    let name = match got {
        Frame::Hello { .. } => "Hello",
        Frame::Config(_) => "Config",
        Frame::Pages(_) => "Pages",
        Frame::State(_) => "State",
        Frame::Complete => "Complete",
        Frame::Ok => "Ok",
        Frame::Error(_) => "Error",
    };
    ProtocolError::Violation(format!("expected a {wanted} frame, got {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(bytes: &[u8]) -> Result<Frame, ProtocolError> {
        read_frame(&mut &bytes[..])
    }

    #[test]
    fn frames_roundtrip() {
        let mut buf = Vec::new();
        write_hello(&mut buf, "1.2.3").unwrap();
        write_frame(&mut buf, Kind::Config, b"{}").unwrap();
        write_pages_header(&mut buf, 0x2000, 1, false).unwrap();
        buf.extend_from_slice(&[7u8; 4096]);
        write_pages_header(&mut buf, 0x4000, 3, true).unwrap();
        write_error(&mut buf, "no").unwrap();
        let mut r = &buf[..];
        assert_eq!(expect_hello(&mut r).unwrap(), "1.2.3");
        assert_eq!(read_frame(&mut r).unwrap(), Frame::Config("{}".into()));
        match read_frame(&mut r).unwrap() {
            Frame::Pages(p) => {
                assert_eq!((p.guest_addr, p.count, p.data.len()), (0x2000, 1, 4096));
                assert!(p.data.iter().all(|&b| b == 7));
            }
            other => panic!("{other:?}"),
        }
        match read_frame(&mut r).unwrap() {
            Frame::Pages(p) => assert_eq!((p.guest_addr, p.count, p.data.len()), (0x4000, 3, 0)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(expect_ok(&mut r), Err(ProtocolError::Refused(m)) if m == "no"));
    }

    #[test]
    fn hostile_frames_are_refused_before_allocation() {
        // A State frame claiming 4 GiB.
        let mut h = Vec::new();
        h.extend_from_slice(&(Kind::State as u32).to_le_bytes());
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(roundtrip(&h), Err(ProtocolError::Violation(_))));
        // Unknown kind.
        let mut h = Vec::new();
        h.extend_from_slice(&99u32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(roundtrip(&h), Err(ProtocolError::Violation(_))));
        // Pages: unaligned, too many, length mismatch, unknown flags.
        for (addr, count, flags, data) in [
            (0x1001u64, 1u32, 0u32, 4096usize),
            (0x1000, 0, 0, 0),
            (0x1000, 2, 0, 4096),
            (0x1000, 1, 2, 4096),
            (0x1000, 1, PAGES_ZERO, 4096),
        ] {
            let mut p = Vec::new();
            p.extend_from_slice(&addr.to_le_bytes());
            p.extend_from_slice(&count.to_le_bytes());
            p.extend_from_slice(&flags.to_le_bytes());
            p.resize(16 + data, 0);
            let mut f = Vec::new();
            write_frame(&mut f, Kind::Pages, &p).unwrap();
            assert!(
                matches!(roundtrip(&f), Err(ProtocolError::Violation(_))),
                "{addr:#x} {count} {flags} {data}"
            );
        }
        // A Hello with another version or magic.
        let mut f = Vec::new();
        write_hello_version(&mut f, 2, "x").unwrap();
        assert!(matches!(
            expect_hello(&mut &f[..]),
            Err(ProtocolError::Version { peer: 2 })
        ));
        let mut f = Vec::new();
        write_frame(&mut f, Kind::Hello, b"NOTANVIL\x01\0\0\0").unwrap();
        assert!(matches!(roundtrip(&f), Err(ProtocolError::Violation(_))));
        // Truncated.
        assert!(matches!(roundtrip(&[1, 0, 0]), Err(ProtocolError::Io(_))));
    }
}
