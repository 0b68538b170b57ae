//! Builds an ext4 image from a directory tree with `mkfs.ext4 -d` (e2fsprogs), sized to fit.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use crate::error::{io_err, ImageError, Result};

/// ext4 block size used for image disks.
const BLOCK: u64 = 4096;
/// Most data a sparse copy of an empty file system may carry: more means the file system does
/// not report holes (its SEEK_DATA calls the whole file data), and mkfs.ext4 is cheaper.
const MAX_SPARSE_COPY_BYTES: u64 = 64 << 20;

/// Bytes of file data (rounded up to blocks) and inode count under `dir`; symlinks not followed.
fn tree_usage(dir: &Path) -> Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut inodes = 1u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(io_err(&d))? {
            let entry = entry.map_err(io_err(&d))?;
            let meta = entry.metadata().map_err(io_err(entry.path()))?;
            inodes += 1;
            bytes = bytes.saturating_add(meta.size().div_ceil(BLOCK) * BLOCK);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Writes `image`, an ext4 file system holding the tree `dir` (owners, modes, links and
/// device nodes as they are on the host), with room to spare for metadata.
pub fn build(dir: &Path, image: &Path) -> Result<u64> {
    let (bytes, inodes) = tree_usage(dir)?;
    // Data, plus a quarter for directories and indirection, plus 16 MiB for the fixed metadata;
    // inodes: what the tree needs and a margin.
    let size = (bytes + bytes / 4 + (16 << 20)).div_ceil(1 << 20) << 20;
    let inodes = inodes + inodes / 4 + 1024;
    let output = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-L",
            "anvil-image",
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(dir)
        .arg(image)
        .arg(format!("{}k", size / 1024))
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .map_err(|e| ImageError::Mkfs {
            path: image.to_path_buf(),
            why: format!("cannot run mkfs.ext4 (install e2fsprogs): {e}"),
        })?;
    if !output.status.success() {
        let why = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if why.contains("No space left") {
            return Err(ImageError::DiskFull(image.to_path_buf()));
        }
        return Err(ImageError::Mkfs {
            path: image.to_path_buf(),
            why,
        });
    }
    Ok(size)
}

/// Writes an empty ext4 file system of `size_mib` MiB to `image` (a run's writable layer).
pub fn build_empty(image: &Path, size_mib: u64) -> Result<()> {
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-m", "0", "-L", "anvil-rw"])
        .arg(image)
        .arg(format!("{size_mib}M"))
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .map_err(|e| ImageError::Mkfs {
            path: image.to_path_buf(),
            why: format!("cannot run mkfs.ext4 (install e2fsprogs): {e}"),
        })?;
    if !output.status.success() {
        return Err(ImageError::Mkfs {
            path: image.to_path_buf(),
            why: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// `lseek(2)` with SEEK_DATA or SEEK_HOLE; `None` past the last data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on a descriptor `file` owns and keeps open; no memory is passed.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(u64::try_from(rc).ok())
}

/// Copies `template` to the new file `image`, writing only its data extents (holes stay
/// holes). Ok(false), with nothing left at `image`, when the template reports more than
/// [`MAX_SPARSE_COPY_BYTES`] of data: the file system does not report holes.
pub fn copy_sparse(template: &Path, image: &Path) -> Result<bool> {
    let src = File::open(template).map_err(io_err(template))?;
    let len = src.metadata().map_err(io_err(template))?.len();
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(io_err(image))?;
    let result = copy_extents(&src, len, &dst, template, image);
    if !matches!(result, Ok(true)) {
        drop(dst);
        let _ = fs::remove_file(image);
    }
    result
}

fn copy_extents(src: &File, len: u64, dst: &File, template: &Path, image: &Path) -> Result<bool> {
    dst.set_len(len).map_err(io_err(image))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    let mut copied = 0;
    while offset < len {
        let Some(start) = seek(src, offset, libc::SEEK_DATA).map_err(io_err(template))? else {
            break;
        };
        let end = seek(src, start, libc::SEEK_HOLE)
            .map_err(io_err(template))?
            .unwrap_or(len)
            .min(len);
        copied += end.saturating_sub(start);
        if copied > MAX_SPARSE_COPY_BYTES {
            return Ok(false);
        }
        let mut pos = start;
        while pos < end {
            let n = usize::try_from((end - pos).min(buf.len() as u64))
                .expect("at most the buffer's length");
            src.read_exact_at(&mut buf[..n], pos)
                .map_err(io_err(template))?;
            dst.write_all_at(&buf[..n], pos).map_err(io_err(image))?;
            pos += n as u64;
        }
        offset = end.max(start + 1);
    }
    Ok(true)
}
