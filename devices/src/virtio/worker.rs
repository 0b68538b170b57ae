//! A device worker thread: waits on the queue notification eventfds and a stop eventfd, and
//! hands each notified queue to the device's handler, so that no device work runs on a vCPU.

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What a worker calls when a queue is notified.
pub(crate) trait QueueHandler: Send + 'static {
    /// Processes everything available on queue `index`. An error means the device is broken
    /// (the guest corrupted its queues): the worker stops.
    fn process_queue(&mut self, index: usize) -> Result<(), String>;
    /// Called once when the worker stops because of an error.
    fn failed(&mut self, why: &str);
}

/// A running worker thread.
#[derive(Debug)]
pub(crate) struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

const STOP_TOKEN: u64 = u64::MAX;

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
        let stop_clone = stop.try_clone()?;
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            // The eventfds must outlive the epoll registration.
            let _keep = (&queue_evts, &stop_clone);
            // Queues may already hold buffers the driver made available before activation.
            for index in 0..queue_evts.len() {
                if let Err(why) = handler.process_queue(index) {
                    handler.failed(&why);
                    return;
                }
            }
            let mut events = vec![EpollEvent::default(); queue_evts.len() + 1];
            loop {
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
                    let Some((index, evt)) = usize::try_from(token)
                        .ok()
                        .and_then(|i| Some((i, queue_evts.get(i)?)))
                    else {
                        continue;
                    };
                    // Drain the counter; everything available is processed below.
                    let _ = evt.read();
                    if let Err(why) = handler.process_queue(index) {
                        handler.failed(&why);
                        return;
                    }
                }
            }
        })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!("cannot stop a device worker: {e}");
                return;
            }
            if thread.join().is_err() {
                tracing::error!("a device worker panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
