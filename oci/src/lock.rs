//! Advisory file locks (flock) for the cache.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{io_err, Result};

/// A held flock; released on drop (closing the file).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// How to lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders (a VM using a disk).
    Shared,
    /// One holder (writers of the cache, removal of a disk).
    Exclusive,
}

impl FileLock {
    /// Locks `path` (created if missing), waiting when `wait`; `None` if busy and not waiting.
    pub fn acquire(path: &Path, mode: LockMode, wait: bool) -> Result<Option<Self>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err(path))?;
        let mut op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        };
        if !wait {
            op |= libc::LOCK_NB;
        }
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(Some(Self { _file: file }));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if !wait => return Ok(None),
                _ => return Err(io_err(path)(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let path = std::env::temp_dir().join(format!("anvil-lock-{}", std::process::id()));
        let a = FileLock::acquire(&path, LockMode::Shared, false).unwrap();
        let b = FileLock::acquire(&path, LockMode::Shared, false).unwrap();
        assert!(a.is_some() && b.is_some());
        assert!(FileLock::acquire(&path, LockMode::Exclusive, false)
            .unwrap()
            .is_none());
        drop((a, b));
        assert!(FileLock::acquire(&path, LockMode::Exclusive, false)
            .unwrap()
            .is_some());
        std::fs::remove_file(&path).unwrap();
    }
}
