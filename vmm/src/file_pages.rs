//! Guest memory that starts out as a private mapping of the kernel and initrd files.
//!
//! Reading a 9 MiB vmlinux into fresh anonymous guest memory costs ~4 ms here, nearly all of
//! it allocating and zeroing 4 KiB pages; `InstanceStart` waits for it. The loader instead
//! reads through a [`MappingReader`], which maps the whole pages of each kernel segment (and
//! of the initrd) straight from the file over guest memory (`MAP_PRIVATE | MAP_FIXED`): the
//! guest starts on the page cache's pages and copies only those it writes.
//!
//! A private file mapping still depends on its file: a page not yet copied shows what the
//! file holds now, and truncating the file discards even the copied pages (Linux zaps private
//! COW pages past the new end) so that the next access raises SIGBUS. The guest must not
//! depend on the file after it started, so once the vCPUs run, [`Detacher`] swaps each range
//! for anonymous memory with the same content. A helper thread allocates the replacement
//! buffers and copies the ranges into them ([`Detacher::prepare`], while the guest runs);
//! then the event loop pauses the vCPUs and the devices, copies again the pages written since
//! (the anonymous ones in `/proc/self/pagemap`: a written page of a private file mapping is a
//! copy), checks that no file changed since loading (its change time) and moves the buffers
//! over the ranges with `mremap` ([`Detacher::swap`]). Copies read `/proc/self/mem`, which
//! fails with an error where a plain copy would raise SIGBUS; a file that was truncated or
//! written before the swap fails the VM with an error that names it.
//!
//! Until the swap, a page of those ranges absent from `/proc/self/pagemap` is not a zero
//! page: live migration then reads every page (see `SendJob::untouched_is_zero`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use devices::GuestMemoryMmap;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile,
    VolatileMemoryError, VolatileSlice,
};

/// The page size the mappings work in.
const PAGE: usize = 4096;
/// Smaller runs of whole pages are copied: a mapping splits the guest memory VMA and the
/// swap needs a buffer per range, which is not worth it for a few pages.
const MIN_MAPPED: usize = 16 * PAGE;

/// Errors of making guest memory independent of the files it was mapped from.
#[derive(Debug, thiserror::Error)]
pub enum FilePagesError {
    /// A replacement buffer cannot be allocated.
    #[error("cannot allocate {len} bytes to copy guest memory mapped from {}", .path.display())]
    Allocate {
        /// The file the range was mapped from.
        path: PathBuf,
        /// The range's length.
        len: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The range cannot be read: its file was truncated, and its pages are gone.
    #[error(
        "guest memory at {addr:#x} was mapped from {} and can no longer be read (the file \
         was truncated or replaced in place while the guest started)",
        .path.display()
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The guest address of the range.
        addr: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The copy cannot be moved over the range.
    #[error("cannot move the copy of guest memory at {addr:#x} into place")]
    Remap {
        /// The guest address of the range.
        addr: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file changed (written or truncated) while guest memory still mapped it.
    #[error(
        "{} was written or truncated while the guest started from it: guest memory mapped \
         from it is no longer what was loaded",
        .path.display()
    )]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// The range is no longer in guest memory (a bug).
    #[error("guest memory at {addr:#x} (+{len:#x}) is not mapped")]
    Range {
        /// The guest address.
        addr: u64,
        /// The length.
        len: usize,
    },
}

/// A range of guest memory mapped privately from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedRange {
    /// Where it starts in the guest (page aligned).
    pub addr: GuestAddress,
    /// Its length (whole pages).
    pub len: usize,
    /// The file, for error messages.
    pub path: PathBuf,
}

/// The ranges of guest memory mapped from the kernel and initrd files, and those files.
#[derive(Debug, Default)]
pub struct FileMappings {
    ranges: Vec<MappedRange>,
    files: Vec<Source>,
}

/// A file guest memory maps, open, with its change time when loading started: any write or
/// truncation changes it.
#[derive(Debug)]
struct Source {
    path: PathBuf,
    file: File,
    ctime: (i64, i64),
}

fn ctime(m: &std::fs::Metadata) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (m.ctime(), m.ctime_nsec())
}

impl FileMappings {
    /// The ranges, in loading order.
    pub fn ranges(&self) -> &[MappedRange] {
        &self.ranges
    }

    /// Bytes mapped from files.
    pub fn bytes(&self) -> usize {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// Nothing is mapped from a file.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Fails if a file changed since loading started: its pages not yet copied may then
    /// show new bytes, and a truncation discards the pages the guest had written.
    fn check_unchanged(&self) -> Result<(), FilePagesError> {
        for source in &self.files {
            let now = source.file.metadata().map(|m| ctime(&m)).ok();
            if now != Some(source.ctime) {
                return Err(FilePagesError::Changed {
                    path: source.path.clone(),
                });
            }
        }
        Ok(())
    }
}

/// A guest memory region that may be replaced by file mappings: private anonymous memory
/// of normal pages (not shared, not hugetlbfs, not a file such as a snapshot's memory).
#[derive(Debug, Clone, Copy)]
struct Target {
    host: usize,
    len: usize,
    guest: u64,
}

fn targets(mem: &GuestMemoryMmap) -> Vec<Target> {
    mem.iter()
        .filter(|r| {
            let flags = r.flags();
            r.file_offset().is_none()
                && flags & libc::MAP_PRIVATE != 0
                && flags & libc::MAP_ANONYMOUS != 0
                && flags & (libc::MAP_SHARED | libc::MAP_HUGETLB) == 0
                && r.is_hugetlbfs() != Some(true)
                && r.prot() == libc::PROT_READ | libc::PROT_WRITE
        })
        .filter_map(|r| {
            Some(Target {
                host: r.as_ptr() as usize,
                len: usize::try_from(r.len()).ok()?,
                guest: r.start_addr().raw_value(),
            })
        })
        .collect()
}

/// A kernel or initrd file that linux-loader (or the initrd loader) reads into guest memory:
/// reads into private anonymous guest memory map the whole pages instead, when the file
/// offset and the guest address agree modulo the page size; everything else (headers, the
/// partial first and last pages, misaligned segments, other memory) is read as usual.
/// linux-loader keeps doing every check it does on the file (segments inside guest memory,
/// sizes, notes): this only changes how the bytes get there.
#[derive(Debug)]
pub struct MappingReader<'a> {
    file: &'a File,
    path: &'a Path,
    /// The file's size when opened: pages past it are never mapped (they would raise SIGBUS).
    size: u64,
    /// Its change time then.
    ctime: (i64, i64),
    pos: u64,
    targets: Vec<Target>,
    mapped: &'a mut FileMappings,
}

impl<'a> MappingReader<'a> {
    /// A reader of `file` (at `path`, for messages) that maps into the eligible regions of
    /// `mem`, recording what it mapped in `mapped`.
    pub fn new(
        file: &'a File,
        path: &'a Path,
        mem: &GuestMemoryMmap,
        mapped: &'a mut FileMappings,
    ) -> std::io::Result<Self> {
        let metadata = file.metadata()?;
        Ok(Self {
            file,
            path,
            size: metadata.len(),
            ctime: ctime(&metadata),
            pos: 0,
            targets: targets(mem),
            mapped,
        })
    }

    /// A reader that never maps (the copy path, for comparison in tests).
    #[cfg(test)]
    fn copying(file: &'a File, path: &'a Path, mapped: &'a mut FileMappings) -> Self {
        Self {
            file,
            path,
            size: file.metadata().map(|m| m.len()).unwrap_or(0),
            ctime: (0, 0),
            pos: 0,
            targets: Vec::new(),
            mapped,
        }
    }

    /// For a read of `len` bytes into host address `ptr` at the current position: the bytes
    /// to read before the first whole page, the bytes to map after them, and the guest
    /// address of the mapped part; `None` when nothing is to be mapped.
    fn plan(&self, ptr: usize, len: usize) -> Option<(usize, usize, GuestAddress)> {
        let target = self.targets.iter().find(|t| {
            ptr >= t.host
                && ptr
                    .checked_add(len)
                    .is_some_and(|end| end <= t.host + t.len)
        })?;
        let pos = usize::try_from(self.pos).ok()?;
        if ptr % PAGE != pos % PAGE {
            return None;
        }
        let head = (PAGE - ptr % PAGE) % PAGE;
        let after_head = u64::try_from(pos.checked_add(head)?).ok()?;
        let in_file = usize::try_from(self.size.checked_sub(after_head)?).ok()?;
        let pages = len.checked_sub(head)?.min(in_file) / PAGE * PAGE;
        if pages < MIN_MAPPED {
            return None;
        }
        let guest = target.guest + u64::try_from(ptr + head - target.host).ok()?;
        Some((head, pages, GuestAddress(guest)))
    }

    /// Reads into `[ptr, ptr + len)` from the current position until it is full or the
    /// file ends; returns the bytes read.
    fn read_at_ptr(&mut self, ptr: *mut u8, len: usize) -> std::io::Result<usize> {
        let mut done = 0;
        while done < len {
            // SAFETY: the caller guarantees `[ptr, ptr + len)` is writable memory (a
            // VolatileSlice of guest memory); `done < len` keeps the write inside it.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr.add(done), len - done) };
            match self.file.read_at(dst, self.pos) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Maps `len` bytes of the file at the current position over `ptr`.
    fn map_at_ptr(&mut self, ptr: *mut u8, len: usize) -> std::io::Result<()> {
        let offset = libc::off_t::try_from(self.pos)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: `[ptr, ptr + len)` lies inside a private anonymous guest memory region
        // (checked by `plan`), page aligned; replacing its pages with the file's is what a
        // read would do to its content. The region's owner unmaps the whole range later,
        // these mappings included. MAP_FIXED never touches memory outside the range.
        let got = unsafe {
            libc::mmap(
                ptr.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                self.file.as_raw_fd(),
                offset,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        self.pos += len as u64;
        Ok(())
    }
}

impl Read for MappingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for MappingReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let invalid = || std::io::Error::from_raw_os_error(libc::EINVAL);
        self.pos = match to {
            SeekFrom::Start(n) => n,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or_else(invalid)?,
            SeekFrom::End(d) => self.size.checked_add_signed(d).ok_or_else(invalid)?,
        };
        Ok(self.pos)
    }
}

impl ReadVolatile for MappingReader<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let ptr = guard.as_ptr();
        let len = buf.len();
        let mut done = 0;
        if let Some((head, pages, guest)) = self.plan(ptr as usize, len) {
            done = self
                .read_at_ptr(ptr, head)
                .map_err(VolatileMemoryError::IOError)?;
            if done == head && !self.mapped.files.iter().any(|f| f.path == self.path) {
                // Kept open to check, before the swap, that it did not change.
                let file = self
                    .file
                    .try_clone()
                    .map_err(VolatileMemoryError::IOError)?;
                self.mapped.files.push(Source {
                    path: self.path.to_path_buf(),
                    file,
                    ctime: self.ctime,
                });
            }
            if done == head {
                // SAFETY: `head + pages <= len` (from `plan`): inside the slice.
                let at = unsafe { ptr.add(head) };
                // A failed MAP_FIXED may leave the range unmapped: loading then fails.
                self.map_at_ptr(at, pages)
                    .map_err(VolatileMemoryError::IOError)?;
                done += pages;
                self.mapped.ranges.push(MappedRange {
                    addr: guest,
                    len: pages,
                    path: self.path.to_path_buf(),
                });
            }
        }
        if done < len {
            // SAFETY: `done <= len`, so the pointer stays inside the slice.
            done += self
                .read_at_ptr(unsafe { ptr.add(done) }, len - done)
                .map_err(VolatileMemoryError::IOError)?;
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

/// An anonymous mapping that replaces a range mapped from a file.
#[derive(Debug)]
struct Replacement {
    range: MappedRange,
    buf: *mut libc::c_void,
}

// SAFETY: the buffer is a private mapping owned by the `Replacement` alone; it is used by
// one thread at a time (prepared on a helper thread, swapped in on the event loop's).
unsafe impl Send for Replacement {}

impl Drop for Replacement {
    fn drop(&mut self) {
        if !self.buf.is_null() {
            // SAFETY: `buf` is a mapping of `range.len` bytes this value owns (null once
            // `mremap` moved it into guest memory).
            unsafe { libc::munmap(self.buf, self.range.len) };
        }
    }
}

/// Swaps the file-mapped ranges of guest memory for anonymous memory with the same content.
#[derive(Debug)]
pub struct Detacher {
    replacements: Vec<Replacement>,
    mappings: FileMappings,
    own_memory: File,
}

impl Detacher {
    /// Allocates and faults in a buffer for each range of `mem` and copies the range into it
    /// (on a helper thread while the guest runs: this is the slow part). A range that can no
    /// longer be read fails.
    /// `own_memory` is [`open_own_memory`]'s file (opened by the caller: threads other than
    /// the main one may not open files under seccomp).
    pub fn prepare(
        mappings: FileMappings,
        mem: &GuestMemoryMmap,
        own_memory: File,
    ) -> Result<Self, FilePagesError> {
        let mut replacements = Vec::new();
        for range in mappings.ranges() {
            let allocate_error = |source| FilePagesError::Allocate {
                path: range.path.clone(),
                len: range.len,
                source,
            };
            // SAFETY: a new private anonymous mapping; nothing else refers to it.
            let buf = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    range.len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if buf == libc::MAP_FAILED {
                return Err(allocate_error(std::io::Error::last_os_error()));
            }
            let replacement = Replacement {
                range: range.clone(),
                buf,
            };
            populate(buf.cast(), range.len).map_err(allocate_error)?;
            let addr = range.addr.raw_value();
            let host = host_range(mem, range.addr, range.len).ok_or(FilePagesError::Range {
                addr,
                len: range.len,
            })?;
            copy_own_memory(&own_memory, host, buf.cast(), range.len).map_err(|source| {
                FilePagesError::Read {
                    path: range.path.clone(),
                    addr,
                    source,
                }
            })?;
            replacements.push(replacement);
        }
        Ok(Self {
            replacements,
            mappings,
            own_memory,
        })
    }

    /// Copies again the pages of each range written since [`Detacher::prepare`] copied it,
    /// checks that no file changed, and moves the buffers over the ranges; returns the bytes swapped and the bytes copied
    /// again. The vCPUs and the devices must not write guest memory meanwhile (the event loop
    /// pauses them).
    ///
    /// A written page of a private file mapping is an anonymous page (copy-on-write); a page
    /// that is still the file's holds what the file holds, which `prepare` copied. So only
    /// the anonymous (or swapped-out) pages in `/proc/self/pagemap` are copied again; when
    /// the map cannot be read, every page is.
    pub fn swap(mut self, mem: &GuestMemoryMmap) -> Result<(usize, usize), FilePagesError> {
        let pagemap = File::open("/proc/self/pagemap").ok();
        let (mut bytes, mut copied) = (0, 0);
        for r in &mut self.replacements {
            let addr = r.range.addr.raw_value();
            let len = r.range.len;
            let host =
                host_range(mem, r.range.addr, len).ok_or(FilePagesError::Range { addr, len })?;
            let runs = pagemap
                .as_ref()
                .and_then(|map| written_runs(map, host as usize, len / PAGE))
                .unwrap_or_else(|| vec![(0, len / PAGE)]);
            for (first, count) in runs {
                let (at, n) = (first * PAGE, count * PAGE);
                // SAFETY: `first + count <= len / PAGE`: inside the range and the buffer.
                let (src, dst) = unsafe { (host.add(at), r.buf.cast::<u8>().add(at)) };
                copy_own_memory(&self.own_memory, src, dst, n).map_err(|source| {
                    FilePagesError::Read {
                        path: r.range.path.clone(),
                        addr,
                        source,
                    }
                })?;
                copied += n;
            }
        }
        // After the last copy: a change before it may have reached guest memory, one after
        // it cannot reach the buffers.
        self.mappings.check_unchanged()?;
        for r in &mut self.replacements {
            let addr = r.range.addr.raw_value();
            let len = r.range.len;
            let host =
                host_range(mem, r.range.addr, len).ok_or(FilePagesError::Range { addr, len })?;
            // SAFETY: `buf` is our anonymous mapping of `len` bytes; `host` is the start of
            // the file mapping of the same length inside guest memory (page aligned). The
            // move replaces that mapping atomically with the buffer and its pages, so the
            // guest memory range never has a hole; guest memory's owner unmaps it later.
            let moved = unsafe {
                libc::mremap(
                    r.buf,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    host.cast::<libc::c_void>(),
                )
            };
            if moved == libc::MAP_FAILED {
                return Err(FilePagesError::Remap {
                    addr,
                    source: std::io::Error::last_os_error(),
                });
            }
            r.buf = std::ptr::null_mut();
            bytes += len;
        }
        Ok((bytes, copied))
    }
}

/// The runs `(first page, count)` of the `pages` pages at host address `host` that are
/// anonymous or swapped out per `/proc/self/pagemap` (written since they were mapped from
/// the file); `None` when the map cannot be read.
fn written_runs(pagemap: &File, host: usize, pages: usize) -> Option<Vec<(usize, usize)>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    let mut raw = vec![0u8; pages.checked_mul(8)?];
    pagemap
        .read_exact_at(&mut raw, u64::try_from(host / PAGE * 8).ok()?)
        .ok()?;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (page, entry) in raw.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(entry.try_into().ok()?);
        let written = (word & PRESENT != 0 && word & FILE_OR_SHARED == 0) || word & SWAPPED != 0;
        if !written {
            continue;
        }
        match runs.last_mut() {
            Some((first, count)) if *first + *count == page => *count += 1,
            _ => runs.push((page, 1)),
        }
    }
    Some(runs)
}

/// The host address of `[addr, addr + len)` when it lies inside one region of `mem`.
fn host_range(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> Option<*mut u8> {
    let region = mem.find_region(addr)?;
    let offset = usize::try_from(addr.raw_value() - region.start_addr().raw_value()).ok()?;
    let end = offset.checked_add(len)?;
    if end > usize::try_from(region.len()).ok()? {
        return None;
    }
    // SAFETY: `offset + len` is inside the region's mapping (checked above).
    Some(unsafe { region.as_ptr().add(offset) })
}

/// Faults in every page of our own anonymous mapping `[buf, buf + len)`.
fn populate(buf: *mut u8, len: usize) -> std::io::Result<()> {
    // SAFETY: `[buf, buf + len)` is a mapping of ours that nothing else uses yet.
    if unsafe { libc::madvise(buf.cast(), len, libc::MADV_POPULATE_WRITE) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
        return Err(e);
    }
    // Kernels before 5.14 (EINVAL) or without madvise (ENOSYS, CONFIG_ADVISE_SYSCALLS off,
    // as in the L1 machine's kernel): touch each page (the buffer is ours and still zero).
    for offset in (0..len).step_by(PAGE) {
        // SAFETY: inside the mapping, which no other thread sees.
        unsafe { buf.add(offset).write_volatile(0) };
    }
    Ok(())
}

/// Opens this process's memory (`/proc/self/mem`) for [`Detacher`]'s copies: a read there
/// of a page that cannot be faulted in (a file mapping past its file's end) fails with an
/// error instead of raising SIGBUS as a plain copy would. (`process_vm_readv` would do the
/// same without a file, but kernels built without CONFIG_CROSS_MEMORY_ATTACH, as the L1
/// machine's, lack it.)
pub fn open_own_memory() -> std::io::Result<File> {
    File::open("/proc/self/mem")
}

/// Copies `len` bytes of this process's memory from `src` to `dst` through `own_memory`
/// ([`open_own_memory`]).
fn copy_own_memory(
    own_memory: &File,
    src: *const u8,
    dst: *mut u8,
    len: usize,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: `[dst, dst + len)` is a buffer of ours (a replacement) that nothing else
        // uses meanwhile; `done < len` keeps the slice inside it.
        let buf = unsafe { std::slice::from_raw_parts_mut(dst.add(done), len - done) };
        match own_memory.read_at(buf, src as u64 + done as u64) {
            Ok(0) => return Err(std::io::Error::from_raw_os_error(libc::EFAULT)),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
