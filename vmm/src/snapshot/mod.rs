//! Snapshots: the state file (a header with a magic, a format version, the payload length
//! and a CRC-32, then the [`MicrovmState`] in bincode) and the memory file (guest RAM, its
//! regions one after the other, written sparse: pages that are all zero are holes).
//!
//! Loading trusts nothing: the header is checked before the payload is read, the payload is
//! bounded and checksummed, decoding is limited to the payload's size, and every count and
//! layout in the state is checked against what the VM being built expects.

pub mod state;
pub mod uffd;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bincode::Options;
use devices::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

pub use state::{MicrovmState, VcpuState, VmState};

/// The state file's first bytes.
pub const MAGIC: [u8; 8] = *b"ANVILSNP";
/// The state format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest state payload accepted (the state of a VM is tens of KiB per vCPU).
pub const MAX_PAYLOAD: u64 = 64 << 20;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
const PAGE: usize = 4096;

/// Errors of writing or reading snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file cannot be created, read or written.
    #[error("{what} {}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than its header says.
    #[error("snapshot file {} is truncated", .0.display())]
    Truncated(PathBuf),
    /// The file is not an anvil snapshot.
    #[error("{} is not an anvil snapshot (bad magic)", .0.display())]
    BadMagic(PathBuf),
    /// The format version is not this build's.
    #[error("snapshot format version {found} is not supported (this anvil reads version {FORMAT_VERSION})")]
    Version {
        /// The file's version.
        found: u32,
    },
    /// The payload is larger than any valid state.
    #[error("snapshot state of {0} bytes is larger than the limit of {MAX_PAYLOAD}")]
    TooLarge(u64),
    /// The checksum does not match: the file is corrupted.
    #[error("snapshot file {} is corrupted (checksum mismatch)", .0.display())]
    Checksum(PathBuf),
    /// The payload cannot be decoded.
    #[error("snapshot state cannot be decoded: {0}")]
    Decode(String),
    /// The state is inconsistent.
    #[error("invalid snapshot state: {0}")]
    Invalid(String),
    /// KVM cannot report the pages the guest wrote.
    #[error("KVM cannot report the dirty pages: {0}")]
    DirtyLog(kvm_ioctls::Error),
    /// The memory file does not match the state.
    #[error("memory file {}: {why}", .path.display())]
    Memory {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(MAX_PAYLOAD)
        .with_fixint_encoding()
        .reject_trailing_bytes()
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// Writes `state` to `path` (created or truncated).
pub fn write_state(path: &Path, state: &MicrovmState) -> Result<(), SnapshotError> {
    let payload = encode_state(state)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    let mut file = File::create(path).map_err(io("cannot create snapshot file", path))?;
    file.write_all(&out)
        .and_then(|()| file.sync_all())
        .map_err(io("cannot write snapshot file", path))
}

/// Parses a state file's bytes (see [`read_state`]).
pub fn parse_state(path: &Path, bytes: &[u8]) -> Result<MicrovmState, SnapshotError> {
    let truncated = || SnapshotError::Truncated(path.to_path_buf());
    let header = bytes.get(..HEADER_LEN).ok_or_else(truncated)?;
    if header[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path.to_path_buf()));
    }
    let word =
        |range: std::ops::Range<usize>| -> [u8; 4] { header[range].try_into().unwrap_or([0; 4]) };
    let version = u32::from_le_bytes(word(8..12));
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { found: version });
    }
    let len = u64::from_le_bytes(header[12..20].try_into().unwrap_or([0xff; 8]));
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge(len));
    }
    let crc = u32::from_le_bytes(word(20..24));
    let payload = &bytes[HEADER_LEN..];
    let len = usize::try_from(len).map_err(|_| SnapshotError::TooLarge(len))?;
    if payload.len() < len {
        return Err(truncated());
    }
    if payload.len() > len {
        return Err(SnapshotError::Invalid(format!(
            "{} bytes after the state",
            payload.len() - len
        )));
    }
    if crc32fast::hash(payload) != crc {
        return Err(SnapshotError::Checksum(path.to_path_buf()));
    }
    decode_state(payload)
}

/// Encodes `state` as a snapshot payload (bincode; live migration sends it as is).
pub fn encode_state(state: &MicrovmState) -> Result<Vec<u8>, SnapshotError> {
    options()
        .serialize(state)
        .map_err(|e| SnapshotError::Decode(e.to_string()))
}

/// Decodes and checks a payload from [`encode_state`]: decoding is bounded by the payload's
/// size and [`MAX_PAYLOAD`], and every count and layout is checked.
pub fn decode_state(payload: &[u8]) -> Result<MicrovmState, SnapshotError> {
    let state: MicrovmState = options()
        .deserialize(payload)
        .map_err(|e| SnapshotError::Decode(e.to_string()))?;
    validate(&state)?;
    Ok(state)
}

/// Reads and checks the state file at `path`: its size is bounded before anything is read.
pub fn read_state(path: &Path) -> Result<MicrovmState, SnapshotError> {
    let mut file = File::open(path).map_err(io("cannot open snapshot file", path))?;
    let len = file
        .metadata()
        .map_err(io("cannot read snapshot file", path))?
        .len();
    if len > MAX_PAYLOAD + HEADER_LEN as u64 {
        return Err(SnapshotError::TooLarge(len));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.read_to_end(&mut bytes)
        .map_err(io("cannot read snapshot file", path))?;
    parse_state(path, &bytes)
}

/// Checks the counts and layout in a decoded state.
fn validate(state: &MicrovmState) -> Result<(), SnapshotError> {
    let invalid = |why: String| Err(SnapshotError::Invalid(why));
    crate::config::validate_vcpu_count(u64::from(state.vcpu_count))
        .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    if state.vcpus.len() != usize::from(state.vcpu_count) {
        return invalid(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            state.vcpu_count
        ));
    }
    if state.mem_size_mib == 0 || state.mem_size_mib > crate::config::MAX_MEM_SIZE_MIB {
        return invalid(format!("memory size {} MiB", state.mem_size_mib));
    }
    let expected = memory_layout(state.mem_size_mib)?;
    if state.memory != expected {
        return invalid("the memory regions do not match the memory size".into());
    }
    for (i, v) in state.vcpus.iter().enumerate() {
        if v.cpuid.is_empty() || v.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
            return invalid(format!("vCPU {i} has {} CPUID entries", v.cpuid.len()));
        }
        if v.msrs.len() > kvm_bindings::KVM_MAX_MSR_ENTRIES {
            return invalid(format!("vCPU {i} has {} MSRs", v.msrs.len()));
        }
    }
    Ok(())
}

/// The memory file layout for a guest of `mem_size_mib`: the arch regions, packed.
pub fn memory_layout(mem_size_mib: u64) -> Result<Vec<state::MemoryRegionState>, SnapshotError> {
    let regions = arch::memory::guest_memory_regions(mem_size_mib.saturating_mul(1 << 20))
        .map_err(|e| SnapshotError::Invalid(format!("memory layout: {e}")))?;
    let mut offset = 0u64;
    Ok(regions
        .iter()
        .map(|(addr, len)| {
            let r = state::MemoryRegionState {
                guest_addr: addr.raw_value(),
                len: *len as u64,
                file_offset: offset,
            };
            offset += *len as u64;
            r
        })
        .collect())
}

/// Creates (or truncates) the memory file at `path`, sized for all of `mem`.
fn create_memory_file(path: &Path, mem: &GuestMemoryMmap) -> Result<File, SnapshotError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io("cannot create memory file", path))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total)
        .map_err(io("cannot size memory file", path))?;
    Ok(file)
}

/// The pages written since the last call, one bitmap per region of `mem` (slot N is region
/// N, bit i is page i): KVM's dirty log (what the vCPUs wrote) ORed with the region's own
/// bitmap (what the devices and the VMM wrote, which KVM never sees). Both are cleared.
/// Diff snapshots and live migration both read dirty pages through this.
pub fn take_dirty_pages(
    mem: &GuestMemoryMmap,
    vm: &kvm_ioctls::VmFd,
) -> Result<Vec<Vec<u64>>, SnapshotError> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| {
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            let size = usize::try_from(region.len()).unwrap_or(usize::MAX);
            let mut pages = vm
                .get_dirty_log(slot, size)
                .map_err(SnapshotError::DirtyLog)?;
            let mmap: &vm_memory::MmapRegion<_> = region;
            for (k, d) in pages.iter_mut().zip(mmap.bitmap().get_and_reset()) {
                *k |= d;
            }
            Ok(pages)
        })
        .collect()
}

/// The page numbers set in a bitmap from [`take_dirty_pages`], in order.
pub fn set_pages(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(w, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let b = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            Some(w as u64 * 64 + b)
        })
    })
}

/// Reads the page of `region` at offset `at` (the region's last page may be shorter) into
/// `page`; returns its length. `path` names the memory file in errors.
fn read_page(
    region: &devices::GuestRegionMmap,
    at: u64,
    page: &mut [u8],
    path: &Path,
) -> Result<usize, SnapshotError> {
    let n = usize::try_from((region.len() - at).min(PAGE as u64)).unwrap_or(PAGE);
    region
        .read_slice(&mut page[..n], vm_memory::MemoryRegionAddress(at))
        .map_err(|e| SnapshotError::Memory {
            path: path.to_path_buf(),
            why: format!("cannot read guest memory: {e}"),
        })?;
    Ok(n)
}

/// Writes guest memory to `path`, sparse: all-zero pages are left as holes.
pub fn write_memory(path: &Path, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
    let file = create_memory_file(path, mem)?;
    let mut offset = 0u64;
    let mut page = vec![0u8; PAGE];
    for region in mem.iter() {
        let len = region.len();
        let mut at = 0u64;
        while at < len {
            let n = read_page(region, at, &mut page, path)?;
            if page[..n].iter().any(|&b| b != 0) {
                file.write_all_at(&page[..n], offset + at)
                    .map_err(io("cannot write memory file", path))?;
            }
            at += n as u64;
        }
        offset += len;
    }
    file.sync_all()
        .map_err(io("cannot write memory file", path))
}

/// Writes the pages written since the last call ([`take_dirty_pages`]: by the vCPUs, the
/// devices or the VMM) to `path`, at their offsets in the memory file layout; everything else is a hole. Dirty pages
/// are written even when they are all zero, so the file's data extents are exactly the
/// dirty pages (what [`merge_memory`] copies).
pub fn write_dirty_memory(
    path: &Path,
    mem: &GuestMemoryMmap,
    vm: &kvm_ioctls::VmFd,
) -> Result<u64, SnapshotError> {
    let file = create_memory_file(path, mem)?;
    let dirty = take_dirty_pages(mem, vm)?;
    let mut offset = 0u64;
    let mut written = 0u64;
    let mut page = vec![0u8; PAGE];
    for (region, bitmap) in mem.iter().zip(&dirty) {
        let len = region.len();
        for index in set_pages(bitmap) {
            let at = index * PAGE as u64;
            if at >= len {
                break;
            }
            let n = read_page(region, at, &mut page, path)?;
            file.write_all_at(&page[..n], offset + at)
                .map_err(io("cannot write memory file", path))?;
            written += n as u64;
        }
        offset += len;
    }
    file.sync_all()
        .map_err(io("cannot write memory file", path))?;
    Ok(written)
}

/// Forgets the pages written so far (after a full snapshot, the next diff is relative to it).
pub fn clear_dirty_log(mem: &GuestMemoryMmap, vm: &kvm_ioctls::VmFd) -> Result<(), SnapshotError> {
    take_dirty_pages(mem, vm).map(drop)
}

/// Applies a diff snapshot's memory file to its base: the diff's data extents (its dirty
/// pages) are copied over the base at the same offsets. The two must be the same size.
pub fn merge_memory(base: &Path, diff: &Path) -> Result<u64, SnapshotError> {
    use std::os::fd::AsRawFd;
    let diff_file = File::open(diff).map_err(io("cannot open diff memory file", diff))?;
    let base_file = OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(io("cannot open base memory file", base))?;
    let len = diff_file
        .metadata()
        .map_err(io("cannot read diff memory file", diff))?
        .len();
    let base_len = base_file
        .metadata()
        .map_err(io("cannot read base memory file", base))?
        .len();
    if len != base_len {
        return Err(SnapshotError::Memory {
            path: diff.to_path_buf(),
            why: format!("{len} bytes, but the base is {base_len}: not a diff of it"),
        });
    }
    let fd = diff_file.as_raw_fd();
    let seek = |from: u64, whence: i32| -> Option<u64> {
        let from = i64::try_from(from).ok()?;
        // SAFETY: lseek on a descriptor we own; SEEK_DATA/SEEK_HOLE only report offsets.
        let at = unsafe { libc::lseek(fd, from, whence) };
        u64::try_from(at).ok()
    };
    let mut copied = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while let Some(start) = seek(at, libc::SEEK_DATA).filter(|&s| s < len) {
        let end = seek(start, libc::SEEK_HOLE).unwrap_or(len).min(len);
        let mut pos = start;
        while pos < end {
            let n = usize::try_from((end - pos).min(buf.len() as u64)).unwrap_or(buf.len());
            diff_file
                .read_exact_at(&mut buf[..n], pos)
                .map_err(io("cannot read diff memory file", diff))?;
            base_file
                .write_all_at(&buf[..n], pos)
                .map_err(io("cannot write base memory file", base))?;
            pos += n as u64;
            copied += n as u64;
        }
        at = end;
    }
    base_file
        .sync_all()
        .map_err(io("cannot write base memory file", base))?;
    Ok(copied)
}

/// Maps the memory file at `path` as guest memory: a private mapping per region, so pages
/// are read on first touch and guest writes never reach the file.
pub fn map_memory(
    path: &Path,
    layout: &[state::MemoryRegionState],
) -> Result<GuestMemoryMmap, SnapshotError> {
    let file = File::open(path).map_err(io("cannot open memory file", path))?;
    let len = file
        .metadata()
        .map_err(io("cannot read memory file", path))?
        .len();
    let need: u64 = layout.iter().map(|r| r.len).sum();
    if len < need {
        return Err(SnapshotError::Memory {
            path: path.to_path_buf(),
            why: format!("{len} bytes, the snapshot needs {need}"),
        });
    }
    let mut regions = Vec::new();
    for r in layout {
        let fail = |why: String| SnapshotError::Memory {
            path: path.to_path_buf(),
            why,
        };
        let file = file
            .try_clone()
            .map_err(io("cannot open memory file", path))?;
        let size = usize::try_from(r.len).map_err(|_| fail("region too large".into()))?;
        let mapping = vm_memory::MmapRegion::build(
            Some(vm_memory::FileOffset::new(file, r.file_offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| fail(format!("cannot map it: {e}")))?;
        regions.push(
            devices::GuestRegionMmap::new(mapping, vm_memory::GuestAddress(r.guest_addr))
                .ok_or_else(|| fail("region address overflows".into()))?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Memory {
        path: path.to_path_buf(),
        why: format!("invalid regions: {e}"),
    })
}
