//! The threads `run` starts before the VM (once it runs, the main thread is under the VMM's
//! seccomp filter): directory removal and the relays of the agent's vsock streams.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Removes directories on a thread started before the VM: once the VM runs, this (main)
/// thread is under the VMM's seccomp filter, which does not allow walking directories.
pub(super) struct Janitor {
    tx: Option<std::sync::mpsc::Sender<PathBuf>>,
    thread: Option<JoinHandle<()>>,
}

impl Janitor {
    pub(super) fn start() -> Result<Self, String> {
        let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
        let thread = std::thread::Builder::new()
            .name("anvil-janitor".into())
            .spawn(move || {
                for path in rx {
                    match std::fs::remove_dir_all(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(dir = %path.display(), error = %e, "cannot remove")
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the cleanup thread: {e}"))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub(super) fn remove(&self, path: &Path) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(path.to_path_buf());
        }
    }

    /// Waits until everything sent has been removed.
    pub(super) fn finish(mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sockets live in a directory of their own under the temporary directory: the data
/// directory may be on a file system without Unix sockets (9p).
pub(super) struct SocketDir<'a>(pub(super) PathBuf, pub(super) &'a Janitor);
impl Drop for SocketDir<'_> {
    fn drop(&mut self) {
        self.1.remove(&self.0);
    }
}

/// Accepts one connection on `listener` and copies it to `out` (`None`: collect it).
pub(super) fn relay(
    listener: UnixListener,
    mut out: Option<Box<dyn Write + Send>>,
) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut collected = Vec::new();
        let Ok((mut stream, _)) = listener.accept() else {
            return collected;
        };
        let mut buf = [0u8; 16 << 10];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => match out.as_mut() {
                    Some(w) => {
                        if w.write_all(&buf[..n]).and_then(|()| w.flush()).is_err() {
                            break;
                        }
                    }
                    None => collected.extend_from_slice(&buf[..n]),
                },
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        collected
    })
}

/// Accepts one connection on `listener` and copies this process's stdin to it; at the end of
/// stdin it shuts the stream's write side, which the workload sees as its end of input. Not
/// joined: it may stay blocked on stdin until the process exits.
pub(super) fn relay_stdin(listener: UnixListener) {
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let mut stdin = std::io::stdin().lock();
        if let Err(e) = std::io::copy(&mut stdin, &mut stream) {
            tracing::debug!(error = %e, "stdin relay stopped");
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
    });
}

/// Waits up to `deadline` for a relay thread.
pub(super) fn finish(handle: JoinHandle<Vec<u8>>, deadline: Instant) -> Option<Vec<u8>> {
    while !handle.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if handle.is_finished() {
        handle.join().ok()
    } else {
        None
    }
}
