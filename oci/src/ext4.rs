//! Builds an ext4 image from a directory tree with `mkfs.ext4 -d` (e2fsprogs), sized to fit.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::error::{io_err, ImageError, Result};

/// ext4 block size used for image disks.
const BLOCK: u64 = 4096;

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
