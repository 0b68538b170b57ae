//! SIGINT, SIGTERM and SIGHUP during `run`: forwarded to the workload through the agent's
//! control stream, then a hard stop that removes the run's temporary files.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a workload has to end after a forwarded signal before the VM is stopped.
const SIGNAL_GRACE: Duration = Duration::from_secs(10);

/// Paths removed when a signal stops `run`.
static CLEANUP: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

pub(super) fn remove_on_signal(path: &Path) {
    if let Ok(mut paths) = CLEANUP.lock() {
        paths.push(path.to_path_buf());
    }
}

/// The agent's control stream, once it has connected.
static CONTROL: std::sync::Mutex<Option<std::os::unix::net::UnixStream>> =
    std::sync::Mutex::new(None);

/// Accepts the agent's control stream into [`CONTROL`].
pub(super) fn accept_control(listener: UnixListener) {
    std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            if let Ok(mut control) = CONTROL.lock() {
                *control = Some(stream);
            }
        }
    });
}

/// Sends `signal N` to the agent; false when there is no control stream (yet).
fn forward_signal(sig: libc::c_int) -> bool {
    let Ok(mut control) = CONTROL.lock() else {
        return false;
    };
    control
        .as_mut()
        .is_some_and(|stream| writeln!(stream, "signal {sig}").is_ok())
}

/// Removes the run's temporary files and exits with 128 + `sig`, as a shell reports a job
/// killed by it. The guest dies with the process.
fn stop_now(sig: libc::c_int) -> ! {
    tracing::info!(signal = sig, "stopping the workload and the VM");
    if let Ok(paths) = CLEANUP.lock() {
        for path in paths.iter() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
    std::process::exit(128 + sig)
}

/// Ctrl-C (SIGINT), SIGTERM and SIGHUP: the signals are blocked in every thread (this runs
/// before any is started) and taken by one thread with sigwait. The first is forwarded to the
/// workload through the agent's control stream, as `docker run` does; `run` then ends with the
/// workload. A second signal, or no end within [`SIGNAL_GRACE`] (or no workload yet), stops
/// the VM at once (`stop_now`).
pub(super) fn stop_on_signals() -> Result<(), String> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises; all pointers are valid.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    };
    // SAFETY: `set` is initialised; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(format!(
            "cannot block signals: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    std::thread::Builder::new()
        .name("anvil-signals".into())
        .spawn(move || {
            let mut forwarded: Option<(libc::c_int, Instant)> = None;
            loop {
                let timeout = forwarded.map(|(_, at)| {
                    let left = (at + SIGNAL_GRACE).saturating_duration_since(Instant::now());
                    libc::timespec {
                        tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(0),
                        tv_nsec: libc::c_long::from(left.subsec_nanos()),
                    }
                });
                // SAFETY: `set` is initialised; the timeout, when given, is a valid timespec and
                // the siginfo pointer may be null.
                let sig = unsafe {
                    match &timeout {
                        Some(t) => libc::sigtimedwait(&set, std::ptr::null_mut(), t),
                        None => libc::sigwaitinfo(&set, std::ptr::null_mut()),
                    }
                };
                if sig < 0 {
                    let e = std::io::Error::last_os_error();
                    match (e.raw_os_error(), forwarded) {
                        (Some(libc::EAGAIN), Some((first, _))) => {
                            tracing::warn!("the workload did not end after the signal");
                            stop_now(first)
                        }
                        _ => continue,
                    }
                }
                if forwarded.is_none() && forward_signal(sig) {
                    tracing::info!(
                        signal = sig,
                        "signal forwarded to the workload; another stops the VM"
                    );
                    forwarded = Some((sig, Instant::now()));
                    continue;
                }
                stop_now(sig)
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the signal thread: {e}"))
}
