//! vCPU threads: each runs `KVM_RUN` in a loop, dispatches port I/O and MMIO exits to the
//! buses, and reports why it stopped. The event loop talks to a vCPU through a channel and
//! kicks it out of `KVM_RUN` with a signal that sets `immediate_exit`.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use devices::legacy::monotonic_us;
use devices::Bus;
use kvm_bindings::{
    kvm_run, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::metrics::VcpuMetrics;
use crate::seccomp::{SeccompError, ThreadFilters, ThreadKind};

/// Unclaimed guest accesses logged before rate limiting starts.
const UNCLAIMED_LOG_FIRST: u64 = 8;
/// After the first few, one unclaimed access in this many is logged.
const UNCLAIMED_LOG_EVERY: u64 = 4096;

/// RFLAGS.IF (Intel SDM Vol. 1, 3.4.3).
const RFLAGS_IF: u64 = 1 << 9;

thread_local! {
    /// This thread's `kvm_run` area, so the kick signal handler can set `immediate_exit`.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Notes a guest access no device claimed. A guest can do this in a loop, so only the first
/// few and then one in every [`UNCLAIMED_LOG_EVERY`] are logged.
fn note_unclaimed(count: &mut u64, vcpu: u8, what: &str, addr: u64) {
    *count += 1;
    let n = *count;
    if n <= UNCLAIMED_LOG_FIRST || n.is_multiple_of(UNCLAIMED_LOG_EVERY) {
        tracing::debug!(vcpu, count = n, "unclaimed {what} at {addr:#x}");
    }
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|ptr| {
        let run = ptr.get();
        if !run.is_null() {
            // SAFETY: the pointer was set by this thread to its own vCPU's `kvm_run` mapping,
            // which outlives the thread's run loop (it is cleared before the VcpuFd drops);
            // a volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick signal handler; call once before starting vCPU threads.
pub fn register_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)
}

/// Errors of vCPU setup and control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Installing the kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Spawning the thread failed.
    #[error("cannot spawn the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
}

/// Why a vCPU stopped for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for a reset or power-off through KVM (system event).
    GuestReset,
    /// The guest triple-faulted.
    TripleFault,
    /// KVM could not run or emulate the guest.
    Failed(String),
}

/// What a vCPU reports to the event loop.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The vCPU stopped.
    Stopped {
        /// vCPU index.
        id: u8,
        /// Why.
        reason: VcpuStop,
    },
    /// Answer to [`VcpuRequest::CheckProgress`].
    Progress {
        /// vCPU index.
        id: u8,
        /// The vCPU cannot run again without outside help: halted with interrupts disabled,
        /// or never started by the guest.
        idle_forever: bool,
    },
    /// Answer to [`VcpuRequest::Pause`]: the vCPU is out of `KVM_RUN` and waits.
    Paused {
        /// vCPU index.
        id: u8,
    },
    /// Answer to [`VcpuRequest::Resume`].
    Resumed {
        /// vCPU index.
        id: u8,
    },
    /// Answer to [`VcpuRequest::SaveState`].
    Saved {
        /// vCPU index.
        id: u8,
        /// The state, or why it could not be read.
        state: Box<Result<crate::snapshot::VcpuState, String>>,
    },
}

/// What the event loop asks a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRequest {
    /// Report whether this vCPU can still make progress.
    CheckProgress,
    /// Stop running the guest until [`VcpuRequest::Resume`].
    Pause,
    /// Run the guest again.
    Resume,
    /// Report the vCPU's state (only while paused).
    SaveState,
}

/// A vCPU and what it needs to run.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio_bus: Bus,
    mmio_bus: Bus,
    events: Sender<VcpuEvent>,
    events_evt: EventFd,
    requests: Receiver<VcpuRequest>,
    start: Instant,
    /// Guest accesses no device claimed.
    unclaimed_count: u64,
    metrics: Arc<VcpuMetrics>,
    /// The MSRs KVM saves, for snapshots.
    msr_list: std::sync::Arc<Vec<u32>>,
}

/// The event loop's handle on a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    /// vCPU index.
    pub id: u8,
    requests: Sender<VcpuRequest>,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Sends `request` and kicks the vCPU out of `KVM_RUN` so it sees it.
    pub fn request(&self, request: VcpuRequest) {
        // The thread only goes away after reporting that it stopped; a failed send then
        // needs no answer.
        if self.requests.send(request).is_ok() {
            self.kick();
        }
    }

    /// Interrupts `KVM_RUN` on this vCPU.
    pub fn kick(&self) {
        if let Err(e) = self.thread.kill(kick_signal()) {
            tracing::debug!(vcpu = self.id, "kick failed: {e}");
        }
    }
}

impl Vcpu {
    /// A vCPU that reports through `events` (waking the loop with `events_evt`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u8,
        fd: VcpuFd,
        pio_bus: Bus,
        mmio_bus: Bus,
        events: Sender<VcpuEvent>,
        events_evt: EventFd,
        requests: Receiver<VcpuRequest>,
        start: Instant,
    ) -> Self {
        Self {
            id,
            fd,
            pio_bus,
            mmio_bus,
            events,
            events_evt,
            requests,
            start,
            unclaimed_count: 0,
            metrics: Arc::default(),
            msr_list: std::sync::Arc::new(Vec::new()),
        }
    }

    /// Counts this vCPU's exits in `metrics` (registered with the VM's metrics registry).
    pub fn set_metrics(&mut self, metrics: Arc<VcpuMetrics>) {
        self.metrics = metrics;
    }

    /// Sets the MSRs saved in snapshots.
    pub fn set_msr_list(&mut self, list: std::sync::Arc<Vec<u32>>) {
        self.msr_list = list;
    }

    /// Loads a snapshot's state into this (not yet started) vCPU.
    pub fn restore(&self, state: &crate::snapshot::VcpuState) -> Result<(), String> {
        state
            .restore(&self.fd)
            .map_err(|e| crate::controller::error_chain(&e))
    }

    /// Starts the vCPU thread. The thread installs `filters` first and reports the outcome on
    /// `ready`; it enters the guest only once `go` says so, and ends if `go` is dropped.
    pub fn start(
        self,
        requests: Sender<VcpuRequest>,
        filters: ThreadFilters,
        ready: Sender<Result<(), SeccompError>>,
        go: Receiver<()>,
    ) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let thread = std::thread::Builder::new()
            .name(format!("anvil-vcpu{id}"))
            .spawn(move || {
                let installed = crate::seccomp::install_filters(ThreadKind::Vcpu, &filters);
                let ok = installed.is_ok();
                // The receiver lives until every vCPU answered; if it is gone, `go` is too.
                let _ = ready.send(installed);
                if ok && go.recv().is_ok() {
                    self.run();
                }
            })
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuHandle {
            id,
            requests,
            thread,
        })
    }

    fn report(&self, event: VcpuEvent) {
        // The loop owns the receiver for the VM's lifetime; if it is gone the process is
        // exiting and nobody needs the report.
        if self.events.send(event).is_ok() {
            if let Err(e) = self.events_evt.write(1) {
                tracing::error!(vcpu = self.id, "cannot wake the event loop: {e}");
            }
        }
    }

    fn run(mut self) {
        KVM_RUN_PTR.with(|p| p.set(self.fd.get_kvm_run()));
        let reason = self.run_loop();
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        self.report(VcpuEvent::Stopped {
            id: self.id,
            reason,
        });
    }

    fn run_loop(&mut self) -> VcpuStop {
        if self.id == 0 {
            tracing::info!(
                since_start_us =
                    u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX),
                monotonic_us = monotonic_us(),
                "vcpu0 entering KVM_RUN for the first time"
            );
        }
        loop {
            if let Some(stop) = self.run_once() {
                return stop;
            }
        }
    }

    /// One `KVM_RUN` and the handling of its exit. Returns why the vCPU stops, if it does.
    fn run_once(&mut self) -> Option<VcpuStop> {
        // Read before `run()` borrows the fd: the io exit's element size is not part of
        // what kvm-ioctls returns, and `rep ins/outs` must reach devices element by element.
        let run_ptr: *const kvm_run = self.fd.get_kvm_run();
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.metrics.exit_io_out.inc();
                // SAFETY: `run_ptr` points at this vCPU's `kvm_run` mapping, alive as long as
                // `self.fd`; the exit reason is KVM_EXIT_IO, so the `io` union member is the
                // valid one, and it does not overlap the data area `data` borrows.
                let size = usize::from(unsafe { (*run_ptr).__bindgen_anon_1.io.size });
                for chunk in data.chunks(size.max(1)) {
                    if !self.pio_bus.write(u64::from(port), chunk) {
                        note_unclaimed(
                            &mut self.unclaimed_count,
                            self.id,
                            "port write",
                            u64::from(port),
                        );
                    }
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.metrics.exit_io_in.inc();
                // SAFETY: as for IoOut above.
                let size = usize::from(unsafe { (*run_ptr).__bindgen_anon_1.io.size });
                for chunk in data.chunks_mut(size.max(1)) {
                    if !self.pio_bus.read(u64::from(port), chunk) {
                        note_unclaimed(
                            &mut self.unclaimed_count,
                            self.id,
                            "port read",
                            u64::from(port),
                        );
                    }
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.metrics.exit_mmio_read.inc();
                if !self.mmio_bus.read(addr, data) {
                    note_unclaimed(&mut self.unclaimed_count, self.id, "MMIO read", addr);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.metrics.exit_mmio_write.inc();
                if !self.mmio_bus.write(addr, data) {
                    note_unclaimed(&mut self.unclaimed_count, self.id, "MMIO write", addr);
                }
                None
            }
            Ok(VcpuExit::Shutdown) => {
                self.metrics.failures.inc();
                self.log_triple_fault();
                Some(VcpuStop::TripleFault)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET | kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    Some(VcpuStop::GuestReset)
                }
                other => Some(VcpuStop::Failed(format!("unexpected system event {other}"))),
            },
            Ok(VcpuExit::Hlt) => {
                self.metrics.exit_hlt.inc();
                // With the in-kernel LAPIC, KVM handles HLT itself; this exit means the guest
                // halted for good.
                Some(VcpuStop::Failed(
                    "guest halted the vCPU outside KVM's LAPIC".into(),
                ))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                self.metrics.failures.inc();
                Some(VcpuStop::Failed(format!(
                "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host cpu {cpu})"
            )))
            }
            Ok(VcpuExit::InternalError) => {
                self.metrics.failures.inc();
                Some(VcpuStop::Failed(
                    "KVM internal error (the guest ran an instruction KVM cannot emulate)".into(),
                ))
            }
            Ok(other) => {
                tracing::warn!(vcpu = self.id, "unhandled vCPU exit {other:?}");
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                self.serve_requests()
            }
            Err(e) => {
                self.metrics.failures.inc();
                Some(VcpuStop::Failed(format!("KVM_RUN failed: {e}")))
            }
        }
    }

    /// Serves the waiting requests; a vCPU paused when the VMM goes away stops for good
    /// (its guest must not run again: it may be running elsewhere after a migration).
    fn serve_requests(&mut self) -> Option<VcpuStop> {
        while let Ok(request) = self.requests.try_recv() {
            if request == VcpuRequest::Pause {
                if !self.paused() {
                    return Some(VcpuStop::Failed("the VMM stopped".into()));
                }
            } else {
                self.serve(request);
            }
        }
        None
    }

    fn serve(&mut self, request: VcpuRequest) {
        match request {
            VcpuRequest::CheckProgress => {
                let idle_forever = self.idle_forever();
                self.report(VcpuEvent::Progress {
                    id: self.id,
                    idle_forever,
                });
            }
            // Already running: acknowledge so the caller's count is right.
            VcpuRequest::Resume => self.report(VcpuEvent::Resumed { id: self.id }),
            VcpuRequest::Pause => self.report(VcpuEvent::Paused { id: self.id }),
            VcpuRequest::SaveState => self.report(VcpuEvent::Saved {
                id: self.id,
                state: Box::new(Err("the vCPU is running: pause it first".into())),
            }),
        }
    }

    /// Logs where the guest was when this vCPU triple-faulted, for the guest's developers.
    /// (KVM on AMD has reset the registers by then; the last exception still says what
    /// failed.)
    fn log_triple_fault(&self) {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return;
        };
        let events = self.fd.get_vcpu_events().ok();
        tracing::error!(
            vcpu = self.id,
            rip = format_args!("{:#x}", regs.rip),
            rsp = format_args!("{:#x}", regs.rsp),
            rflags = format_args!("{:#x}", regs.rflags),
            cs = format_args!("{:#x}", sregs.cs.selector),
            cr0 = format_args!("{:#x}", sregs.cr0),
            cr2 = format_args!("{:#x}", sregs.cr2),
            cr3 = format_args!("{:#x}", sregs.cr3),
            cr4 = format_args!("{:#x}", sregs.cr4),
            efer = format_args!("{:#x}", sregs.efer),
            gs_base = format_args!("{:#x}", sregs.gs.base),
            idt = format_args!("{:#x}/{:#x}", sregs.idt.base, sregs.idt.limit),
            gdt = format_args!("{:#x}/{:#x}", sregs.gdt.base, sregs.gdt.limit),
            tr = format_args!("{:#x}@{:#x}", sregs.tr.selector, sregs.tr.base),
            exception = ?events.map(|e| (e.exception.injected, e.exception.nr, e.exception.error_code)),
            "vCPU state at the triple fault"
        );
    }

    /// Waits outside `KVM_RUN` until resumed (true) or the VMM is gone (false). Progress
    /// checks are answered as "not idle": a paused guest is not a stuck one.
    fn paused(&mut self) -> bool {
        self.report(VcpuEvent::Paused { id: self.id });
        loop {
            match self.requests.recv() {
                Ok(VcpuRequest::Resume) => {
                    self.report(VcpuEvent::Resumed { id: self.id });
                    return true;
                }
                Ok(VcpuRequest::Pause) => self.report(VcpuEvent::Paused { id: self.id }),
                Ok(VcpuRequest::CheckProgress) => self.report(VcpuEvent::Progress {
                    id: self.id,
                    idle_forever: false,
                }),
                Ok(VcpuRequest::SaveState) => {
                    let state = crate::snapshot::VcpuState::save(&self.fd, &self.msr_list)
                        .map_err(|e| crate::controller::error_chain(&e));
                    self.report(VcpuEvent::Saved {
                        id: self.id,
                        state: Box::new(state),
                    });
                }
                // The VMM is gone: nothing will resume this vCPU.
                Err(_) => return false,
            }
        }
    }

    /// True when this vCPU cannot run again unless something outside the guest intervenes:
    /// halted with interrupts disabled, or an AP the guest never started.
    fn idle_forever(&self) -> bool {
        let Ok(mp) = self.fd.get_mp_state() else {
            return false;
        };
        match mp.mp_state {
            KVM_MP_STATE_HALTED => self
                .fd
                .get_regs()
                .map(|regs| regs.rflags & RFLAGS_IF == 0)
                .unwrap_or(false),
            KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => self.id != 0,
            _ => false,
        }
    }
}
