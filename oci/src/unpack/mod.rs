//! Applies image layers (tar, optionally gzip or zstd compressed) to a directory, as an
//! overlay would: whiteouts (`.wh.NAME`) delete what lower layers made, an opaque marker
//! (`.wh..wh..opq`) hides a directory's lower contents.
//!
//! Layers are hostile input. No entry lands outside the root: paths with `..` or a leading
//! `/` are refused, and every parent directory is resolved inside the root the way the
//! guest's chroot will see it (a symlink to `/etc` means the root's `etc`, never the host's),
//! so a symlink planted by one entry cannot carry a later write outside. Files are created
//! with `O_EXCL` after removing what was there, so a final-component symlink is replaced, not
//! followed. Sizes and entry counts are capped, and every read of the decompressed stream counts
//! against the layer's cap (tar extension headers included).

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::digest::{Digest, HashingReader};

/// The whiteout prefix.
const WHITEOUT: &str = ".wh.";
/// The opaque-directory marker.
const OPAQUE: &str = ".wh..wh..opq";
/// Symlinks followed while resolving one path, as Linux's MAXSYMLINKS.
const MAX_SYMLINK_HOPS: u32 = 40;

/// Caps on what one image may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    /// Bytes of decompressed tar stream, all layers together.
    pub max_bytes: u64,
    /// Tar entries, all layers together.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 30,
            max_entries: 2_000_000,
        }
    }
}

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer tries something no well-formed layer does.
    #[error("hostile layer: entry {path:?} {why}")]
    Hostile {
        /// The entry's path as stored.
        path: String,
        /// What it tried.
        why: &'static str,
    },
    /// The image is bigger than the limits allow.
    #[error("layer exceeds the unpack limit of {limit} {what}")]
    TooBig {
        /// Bytes or entries.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// The host file system is full.
    #[error("disk full while unpacking into {}", .0.display())]
    DiskFull(PathBuf),
    /// The uncompressed layer is not the one the image configuration names.
    #[error("layer content digest mismatch: configuration says {expected}, layer is {actual}")]
    DiffIdMismatch {
        /// From the image configuration.
        expected: Digest,
        /// Of the layer's tar stream.
        actual: Digest,
    },
    /// Reading the archive or writing the tree failed.
    #[error("cannot unpack {}", .path.display())]
    Io {
        /// What was being read or written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

type Result<T, E = UnpackError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            UnpackError::DiskFull(path.to_path_buf())
        } else {
            UnpackError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Counts the decompressed bytes and fails the read past the shared budget.
struct Budget<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("decompressed layers exceed {} bytes", self.limit),
            )
        })?;
        Ok(n)
    }
}

/// A zstd stream of one or more frames.
struct Zstd<R: BufRead> {
    decoder: Option<ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>>,
}

impl<R: BufRead> Read for Zstd<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(decoder) = self.decoder.as_mut() else {
                return Ok(0);
            };
            let n = decoder.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // End of a frame: another one may follow.
            let Some(decoder) = self.decoder.take() else {
                return Ok(0);
            };
            let (mut source, frame) = decoder.into_parts();
            if source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            self.decoder = Some(
                ruzstd::decoding::StreamingDecoder::new_with_decoder(source, frame)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?,
            );
        }
    }
}

/// Wraps `reader` in the decompressor its first bytes call for (gzip, zstd or none).
pub fn decompress<'a, R: Read + 'a>(reader: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::with_capacity(256 << 10, reader);
    let head = reader.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = ruzstd::decoding::StreamingDecoder::new(reader)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(Box::new(Zstd {
            decoder: Some(decoder),
        }))
    } else {
        Ok(Box::new(reader))
    }
}

/// Unpacks layers into one directory tree.
#[derive(Debug)]
pub struct Unpacker {
    root: PathBuf,
    limits: UnpackLimits,
    bytes_left: u64,
    entries_left: u64,
    /// Set owners and make device nodes (only root may).
    privileged: bool,
    /// Modification times of the directories the layers list, by path inside the root: set by
    /// [`Unpacker::finish`], since every entry added to a directory changes its time.
    dir_mtimes: HashMap<Vec<OsString>, i64>,
}

/// The checked, relative components of an entry path.
fn relative_components(raw: &Path) -> Result<Vec<OsString>> {
    let hostile = |why| UnpackError::Hostile {
        path: raw.display().to_string(),
        why,
    };
    let mut out = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => return Err(hostile("has a '..' component")),
            Component::RootDir | Component::Prefix(_) => return Err(hostile("is absolute")),
        }
    }
    Ok(out)
}

impl Unpacker {
    /// An unpacker into `root` (created if missing).
    pub fn new(root: &Path, limits: UnpackLimits) -> Result<Self> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let privileged = unsafe { libc::geteuid() } == 0;
        Ok(Self {
            root: root.to_path_buf(),
            limits,
            bytes_left: limits.max_bytes,
            entries_left: limits.max_entries,
            privileged,
            dir_mtimes: HashMap::new(),
        })
    }

    /// Applies one layer, read from `reader` (compressed or not); when `diff_id` is given, the
    /// uncompressed stream must have that digest.
    pub fn apply_layer<R: Read>(&mut self, reader: R, diff_id: Option<&Digest>) -> Result<()> {
        let root = self.root.clone();
        let stream = decompress(reader).map_err(io_err(&root))?;
        let budget = Budget {
            inner: stream,
            left: self.bytes_left,
            limit: self.limits.max_bytes,
        };
        let mut hashing = HashingReader::new(budget);
        let mut created = HashSet::new();
        let mut opaque = Vec::new();
        {
            let mut archive = tar::Archive::new(&mut hashing);
            let entries = archive.entries().map_err(io_err(&root))?;
            for entry in entries {
                let entry = entry.map_err(|e| self.read_error(e))?;
                self.entries_left =
                    self.entries_left
                        .checked_sub(1)
                        .ok_or(UnpackError::TooBig {
                            what: "entries",
                            limit: self.limits.max_entries,
                        })?;
                self.apply_entry(entry, &mut created, &mut opaque)?;
            }
        }
        // An opaque directory hides what lower layers put in it, not this layer's entries.
        for dir in opaque {
            self.make_opaque(&dir, &created)?;
        }
        // Drain the end-of-archive padding so the digest covers the whole stream.
        io::copy(&mut hashing, &mut io::sink()).map_err(|e| self.read_error(e))?;
        let (actual, len) = hashing.finish();
        self.bytes_left = self.bytes_left.saturating_sub(len);
        if let Some(expected) = diff_id {
            if *expected != actual {
                return Err(UnpackError::DiffIdMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    fn read_error(&self, e: io::Error) -> UnpackError {
        if e.kind() == io::ErrorKind::FileTooLarge {
            UnpackError::TooBig {
                what: "bytes",
                limit: self.limits.max_bytes,
            }
        } else {
            io_err(&self.root)(e)
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        created: &mut HashSet<Vec<OsString>>,
        opaque: &mut Vec<Vec<OsString>>,
    ) -> Result<()> {
        let raw = entry.path().map_err(io_err(&self.root))?.into_owned();
        let hostile = |why| UnpackError::Hostile {
            path: raw.display().to_string(),
            why,
        };
        let mut comps = relative_components(&raw)?;
        let Some(name) = comps.pop() else {
            return Ok(()); // the root itself ("./")
        };
        let name_bytes = name.as_bytes();
        if name_bytes == OPAQUE.as_bytes() {
            // Resolve (and create) the directory now; hide its lower contents after the layer.
            self.resolve(&comps, true, &raw)?;
            opaque.push(comps);
            return Ok(());
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT.as_bytes()) {
            if hidden.starts_with(WHITEOUT.as_bytes()) || hidden.is_empty() {
                // Other AUFS metadata (.wh..wh.plnk and friends): not part of the image tree.
                return Ok(());
            }
            let parent = self.resolve(&comps, true, &raw)?;
            let victim = parent.join(OsStr::from_bytes(hidden));
            if hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
                return Err(hostile("whites out something outside its directory"));
            }
            remove_any(&victim)?;
            return Ok(());
        }
        let parent = self.resolve(&comps, true, &raw)?;
        let target = parent.join(&name);
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().map_err(io_err(&target))? & 0o7777;
        let existing = fs::symlink_metadata(&target).ok();
        // Replace whatever is there, except a directory by a directory (keep its contents).
        if let Some(meta) = &existing {
            if !(meta.is_dir() && kind.is_dir()) {
                remove_any(&target)?;
            }
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = header.size().map_err(io_err(&target))?;
                if size > self.bytes_left {
                    return Err(UnpackError::TooBig {
                        what: "bytes",
                        limit: self.limits.max_bytes,
                    });
                }
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(io_err(&target))?;
                let copied = io::copy(&mut entry, &mut file).map_err(|e| {
                    if e.kind() == io::ErrorKind::FileTooLarge {
                        self.read_error(e)
                    } else {
                        io_err(&target)(e)
                    }
                })?;
                self.bytes_left = self.bytes_left.saturating_sub(copied);
            }
            tar::EntryType::Directory => {
                if existing.as_ref().is_none_or(|m| !m.is_dir()) {
                    fs::create_dir(&target).map_err(io_err(&target))?;
                }
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(io_err(&target))?
                    .ok_or_else(|| hostile("is a symlink without a target"))?;
                // The target is stored as is: the guest resolves it inside its own root, and
                // this unpacker resolves it inside `root` (see `resolve`).
                std::os::unix::fs::symlink(&link, &target).map_err(io_err(&target))?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(io_err(&target))?
                    .ok_or_else(|| hostile("is a hard link without a target"))?;
                let mut link_comps = relative_components(&link)?;
                let link_name = link_comps
                    .pop()
                    .ok_or_else(|| hostile("is a hard link to the root"))?;
                let source = self.resolve(&link_comps, false, &raw)?.join(link_name);
                match fs::symlink_metadata(&source) {
                    Ok(m) if m.is_dir() => return Err(hostile("is a hard link to a directory")),
                    Ok(_) => {}
                    Err(_) => return Err(hostile("is a hard link to a missing file")),
                }
                fs::hard_link(&source, &target).map_err(io_err(&target))?;
                // A hard link shares its inode: no owner or mode of its own.
                created.insert(full(&comps, &name));
                return Ok(());
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                if !self.make_node(&header, &target, mode)? {
                    return Ok(());
                }
            }
            other => {
                tracing::debug!(path = %raw.display(), kind = ?other, "skipping tar entry");
                return Ok(());
            }
        }
        let key = full(&comps, &name);
        self.set_owner_and_mode(&header, &target, kind.is_symlink(), mode)?;
        let mtime = header
            .mtime()
            .ok()
            .and_then(|t| i64::try_from(t).ok())
            .unwrap_or(0);
        if kind.is_dir() {
            self.dir_mtimes.insert(key.clone(), mtime);
        } else {
            set_mtime(&target, mtime)?;
        }
        created.insert(key);
        Ok(())
    }

    /// Makes a device node or FIFO; false when skipped (device nodes need root).
    fn make_node(&self, header: &tar::Header, target: &Path, mode: u32) -> Result<bool> {
        let kind = header.entry_type();
        let file_type = match kind {
            tar::EntryType::Char => libc::S_IFCHR,
            tar::EntryType::Block => libc::S_IFBLK,
            _ => libc::S_IFIFO,
        };
        if file_type != libc::S_IFIFO && !self.privileged {
            tracing::warn!(path = %target.display(), "skipping a device node: only root can make one");
            return Ok(false);
        }
        let major = header.device_major().ok().flatten().unwrap_or(0);
        let minor = header.device_minor().ok().flatten().unwrap_or(0);
        let c_path =
            CString::new(target.as_os_str().as_bytes()).map_err(|_| UnpackError::Hostile {
                path: target.display().to_string(),
                why: "has a NUL byte",
            })?;
        // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call; mknod
        // does not follow a final symlink and fails if the name exists.
        let rc = unsafe {
            libc::mknod(
                c_path.as_ptr(),
                file_type | (mode & 0o7777),
                libc::makedev(major, minor),
            )
        };
        if rc != 0 {
            return Err(io_err(target)(io::Error::last_os_error()));
        }
        Ok(true)
    }

    fn set_owner_and_mode(
        &self,
        header: &tar::Header,
        target: &Path,
        symlink: bool,
        mode: u32,
    ) -> Result<()> {
        if self.privileged {
            let uid = header
                .uid()
                .ok()
                .and_then(|u| u32::try_from(u).ok())
                .unwrap_or(0);
            let gid = header
                .gid()
                .ok()
                .and_then(|g| u32::try_from(g).ok())
                .unwrap_or(0);
            // lchown: a symlink's own owner, never its target's.
            std::os::unix::fs::lchown(target, Some(uid), Some(gid)).map_err(io_err(target))?;
        }
        if !symlink {
            // After chown, which clears set-id bits.
            fs::set_permissions(target, fs::Permissions::from_mode(mode))
                .map_err(io_err(target))?;
        }
        Ok(())
    }

    /// Resolves the directory `comps` inside the root as a chroot would: symlinks are followed
    /// relative to the root (absolute ones restart at the root, `..` stops at it). Missing
    /// directories are created (0755) when `create` is set. The result is a host path under
    /// the root whose every component is a real directory.
    fn resolve(&self, comps: &[OsString], create: bool, raw: &Path) -> Result<PathBuf> {
        let hostile = |why| UnpackError::Hostile {
            path: raw.display().to_string(),
            why,
        };
        let mut resolved: Vec<OsString> = Vec::new();
        let mut pending: std::collections::VecDeque<OsString> = comps.iter().cloned().collect();
        let mut hops = 0;
        while let Some(c) = pending.pop_front() {
            if c == "." || c.is_empty() {
                continue;
            }
            if c == ".." {
                resolved.pop();
                continue;
            }
            let mut here = self.root.clone();
            here.extend(&resolved);
            here.push(&c);
            match fs::symlink_metadata(&here) {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(hostile("goes through too many symlinks"));
                    }
                    let link = fs::read_link(&here).map_err(io_err(&here))?;
                    if link.is_absolute() {
                        resolved.clear();
                    }
                    let mut next: Vec<OsString> = link
                        .components()
                        .filter_map(|c| match c {
                            Component::Normal(n) => Some(n.to_os_string()),
                            Component::ParentDir => Some(OsString::from("..")),
                            _ => None,
                        })
                        .collect();
                    next.extend(pending.drain(..));
                    pending = next.into();
                }
                Ok(m) if m.is_dir() => resolved.push(c),
                Ok(_) => return Err(hostile("has a parent that is not a directory")),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&here).map_err(io_err(&here))?;
                    fs::set_permissions(&here, fs::Permissions::from_mode(0o755))
                        .map_err(io_err(&here))?;
                    resolved.push(c);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(hostile("names a missing directory"))
                }
                Err(e) => return Err(io_err(&here)(e)),
            }
        }
        let mut out = self.root.clone();
        out.extend(&resolved);
        Ok(out)
    }

    /// Ends the unpacking: gives the directories the layers listed their modification times
    /// (files, symlinks and nodes got theirs as they were made). Directories removed or replaced
    /// by a later layer are skipped; paths are resolved inside the root again, as a later layer
    /// may have turned a parent into a symlink.
    pub fn finish(self) -> Result<()> {
        for (comps, mtime) in &self.dir_mtimes {
            let Some((name, parent)) = comps.split_last() else {
                continue;
            };
            let Ok(parent) = self.resolve(parent, false, Path::new("")) else {
                continue;
            };
            let dir = parent.join(name);
            if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                set_mtime(&dir, *mtime)?;
            }
        }
        Ok(())
    }

    /// Removes what lower layers left in the directory `comps`, keeping this layer's entries.
    fn make_opaque(&self, comps: &[OsString], created: &HashSet<Vec<OsString>>) -> Result<()> {
        let dir = self.resolve(comps, true, Path::new(OPAQUE))?;
        for child in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let child = child.map_err(io_err(&dir))?;
            let mut key = comps.to_vec();
            key.push(child.file_name());
            if !created.contains(&key) {
                remove_any(&child.path())?;
            }
        }
        Ok(())
    }
}

fn full(comps: &[OsString], name: &OsString) -> Vec<OsString> {
    let mut key = comps.to_vec();
    key.push(name.clone());
    key
}

/// Sets the access and modification times of `path` (not of a symlink's target) to `mtime`
/// seconds since the epoch.
fn set_mtime(path: &Path, mtime: i64) -> Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| UnpackError::Hostile {
        path: path.display().to_string(),
        why: "has a NUL byte",
    })?;
    let time = libc::timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    let times = [time, time];
    // SAFETY: `c_path` is a valid NUL-terminated string and `times` two timespecs, both
    // outliving the call; AT_SYMLINK_NOFOLLOW keeps a final symlink from being followed.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io_err(path)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Removes a file, symlink or whole directory (never following symlinks); missing is fine.
fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err(path)),
        Ok(_) => fs::remove_file(path).map_err(io_err(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod tests;
