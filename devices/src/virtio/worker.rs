//! A device worker thread: waits on the queue notification eventfds and a stop eventfd, and
//! hands each notified queue to the device's handler, so that no device work runs on a vCPU.

use std::os::fd::AsRawFd;
use std::sync::RwLock;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What a worker calls when a queue is notified.
pub(crate) trait QueueHandler: Send + 'static {
    /// Processes everything available on queue `index`. An error means the device is broken
    /// (the guest corrupted its queues): the worker stops.
    fn process_queue(&mut self, index: usize) -> Result<(), String>;
    /// Host file descriptors (besides the queues) the worker watches for input, such as a tap;
    /// their position in this list is the `index` given to `process_fd`.
    fn watched_fds(&self) -> Vec<std::os::fd::RawFd>;
    /// Handles input on watched fd `index`.
    fn process_fd(&mut self, index: usize) -> Result<(), String>;
    /// Whether watched fd `index` should be polled now (a device with nowhere to put input
    /// stops watching until the guest gives it buffers).
    fn wants_fd(&self, index: usize) -> bool;
    /// Called once when the worker stops because of an error.
    fn failed(&mut self, why: &str);
    /// The queues' positions and settings (for snapshots, once the worker stopped).
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;
}

/// A running worker thread.
#[derive(Debug)]
pub(crate) struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<Vec<virtio_queue::QueueState>>>,
}

const STOP_TOKEN: u64 = u64::MAX;

/// What each worker thread runs first, before it touches a queue (the VMM installs its
/// seccomp filter there); an error fails the device.
pub type WorkerStartHook = fn() -> Result<(), String>;

static WORKER_START_HOOK: RwLock<Option<WorkerStartHook>> = RwLock::new(None);

/// Sets the hook every worker thread started from now on runs first.
pub fn set_worker_start_hook(hook: WorkerStartHook) {
    *WORKER_START_HOOK.write().unwrap_or_else(|p| p.into_inner()) = Some(hook);
}

fn run_start_hook() -> Result<(), String> {
    let hook = *WORKER_START_HOOK.read().unwrap_or_else(|p| p.into_inner());
    hook.map_or(Ok(()), |hook| hook())
}

impl Worker {
    /// Starts a thread named `name` serving `queue_evts` with `handler`.
    pub(crate) fn spawn<H: QueueHandler>(
        name: String,
        queue_evts: Vec<EventFd>,
        mut handler: H,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (index, evt) in queue_evts.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, index as u64),
            )?;
        }
        let extra = handler.watched_fds();
        let extra_base = queue_evts.len();
        let mut watching = Vec::with_capacity(extra.len());
        for (i, fd) in extra.iter().enumerate() {
            let want = handler.wants_fd(i);
            let events = if want {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            epoll.ctl(
                ControlOperation::Add,
                *fd,
                EpollEvent::new(events, (extra_base + i) as u64),
            )?;
            watching.push(want);
        }
        let stop_clone = stop.try_clone()?;
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            // The eventfds must outlive the epoll registration.
            let _keep = (&queue_evts, &stop_clone);
            // Runs until stopped or failed; the queues' states are the thread's result.
            let mut serve = || {
                if let Err(why) = run_start_hook() {
                    handler.failed(&why);
                    return;
                }
                let refresh = |handler: &H, watching: &mut Vec<bool>| -> Result<(), String> {
                    for (i, fd) in extra.iter().enumerate() {
                        let want = handler.wants_fd(i);
                        if want != watching[i] {
                            let events = if want {
                                EventSet::IN
                            } else {
                                EventSet::empty()
                            };
                            epoll
                                .ctl(
                                    ControlOperation::Modify,
                                    *fd,
                                    EpollEvent::new(events, (extra_base + i) as u64),
                                )
                                .map_err(|e| format!("cannot watch a device fd: {e}"))?;
                            watching[i] = want;
                        }
                    }
                    Ok(())
                };
                // Queues may already hold buffers the driver made available before activation.
                for index in 0..queue_evts.len() {
                    if let Err(why) = handler.process_queue(index) {
                        handler.failed(&why);
                        return;
                    }
                }
                let mut events = vec![EpollEvent::default(); queue_evts.len() + extra.len() + 1];
                loop {
                    if let Err(why) = refresh(&handler, &mut watching) {
                        handler.failed(&why);
                        return;
                    }
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            handler.failed(&format!("epoll failed: {e}"));
                            return;
                        }
                    };
                    for event in &events[..n] {
                        let token = event.data();
                        if token == STOP_TOKEN {
                            return;
                        }
                        let Ok(index) = usize::try_from(token) else {
                            continue;
                        };
                        let result = if let Some(evt) = queue_evts.get(index) {
                            // Drain the counter; everything available is processed below.
                            let _ = evt.read();
                            handler.process_queue(index)
                        } else if index - extra_base < extra.len() {
                            handler.process_fd(index - extra_base)
                        } else {
                            Ok(())
                        };
                        if let Err(why) = result {
                            handler.failed(&why);
                            return;
                        }
                    }
                }
            };
            serve();
            handler.queue_states()
        })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(&mut self) {
        let _ = self.stop_collect();
    }

    /// Stops the thread, waits for it and returns its queues' states.
    pub(crate) fn stop_collect(&mut self) -> Option<Vec<virtio_queue::QueueState>> {
        let thread = self.thread.take()?;
        if let Err(e) = self.stop.write(1) {
            tracing::error!("cannot stop a device worker: {e}");
            return None;
        }
        match thread.join() {
            Ok(states) => Some(states),
            Err(_) => {
                tracing::error!("a device worker panicked");
                None
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
