//! Seccomp filters, one per kind of thread, built with seccompiler.
//!
//! Every thread of a running VMM is filtered (`Seccomp: 2` in `/proc/PID/task/*/status`):
//!
//! | thread | filter | installed |
//! | --- | --- | --- |
//! | `anvil-vmm` (main) | [`ThreadKind::Vmm`] | by [`crate::Vmm::run`] after the vCPU threads exist and before any of them enters the guest |
//! | `anvil-vcpu{N}` | [`ThreadKind::Vcpu`] | by the vCPU thread itself, first thing; the guest runs only once every vCPU and the main thread are filtered |
//! | `anvil-blk{N}`, `anvil-net{N}`, `anvil-vsock`, `anvil-rng` | [`ThreadKind::Worker`] (stacked on the vCPU filter it inherits) | by each worker at its start, through the hook set with `devices::virtio::set_worker_start_hook` |
//! | `anvil-api` | [`ThreadKind::Api`] | by the API thread before it serves its first request ([`install`]) |
//!
//! Filters are inherited by threads created later and stack (a syscall must pass every filter
//! of the thread). Device workers are spawned by the vCPU thread that activates the device, so
//! the vCPU filter also admits what a worker needs; each worker then narrows itself to the
//! worker filter.
//!
//! The syscall sets come from `strace -f` of the test guest's rng, blk, net and vsock workloads
//! (see `docs/seccomp.md`). [`SeccompLevel::Syscalls`] checks syscall numbers only;
//! [`SeccompLevel::Arguments`] (the default) also checks the arguments that matter: ioctl
//! request numbers per thread, `fcntl` commands, `socket` domains, `prctl` options, `tgkill`
//! signals, `clone` flags (threads only; `clone3`, whose arguments live in memory a filter
//! cannot read, answers ENOSYS so glibc falls back to `clone`), and no executable mappings.
//! `openat` off the main thread also answers ENOSYS (glibc's malloc probes a /proc file).
//!
//! A forbidden syscall raises SIGSYS; [`install`] sets a handler that prints which thread kind
//! made which syscall and how to debug it (`--no-seccomp`, `strace -f`), then kills the process
//! with SIGSYS.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Mutex, Once};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// How much seccomp restricts the VMM's threads (Firecracker's `--seccomp-level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompLevel {
    /// No filters (`--seccomp-level 0`, `--no-seccomp`).
    None,
    /// Allow-lists of syscall numbers (`--seccomp-level 1`).
    Syscalls,
    /// Allow-lists of syscall numbers and, where it matters, their arguments
    /// (`--seccomp-level 2`, the default).
    #[default]
    Arguments,
}

impl SeccompLevel {
    /// The level for Firecracker's `--seccomp-level N` (0, 1 or 2).
    pub fn from_number(level: u64) -> Result<Self, SeccompError> {
        match level {
            0 => Ok(Self::None),
            1 => Ok(Self::Syscalls),
            2 => Ok(Self::Arguments),
            other => Err(SeccompError::Level(other)),
        }
    }
}

/// The kinds of threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: the event loop (and the API controller).
    Vmm,
    /// A vCPU thread; it also spawns device workers when the guest activates a device.
    Vcpu,
    /// A virtio device worker (blk, net, vsock, rng).
    Worker,
    /// The API server thread: a tokio current-thread runtime serving HTTP on a Unix socket.
    Api,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Vcpu => "vcpu",
            Self::Worker => "device worker",
            Self::Api => "api",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Vmm => 1,
            Self::Vcpu => 2,
            Self::Worker => 3,
            Self::Api => 4,
        }
    }
}

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// `--seccomp-level` out of range.
    #[error("seccomp level {0} is not 0, 1 or 2")]
    Level(u64),
    /// The rules do not make a valid filter (a bug in this module).
    #[error("cannot build the {0} seccomp filter")]
    Build(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the {0} seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
    /// The SIGSYS handler cannot be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// The compiled filters of one thread kind, in installation order.
#[derive(Debug, Clone)]
pub struct ThreadFilters(Vec<BpfProgram>);

/// Builds the filters of `kind` at `level` (nothing at [`SeccompLevel::None`]).
pub fn filters(kind: ThreadKind, level: SeccompLevel) -> Result<ThreadFilters, SeccompError> {
    if level == SeccompLevel::None {
        return Ok(ThreadFilters(Vec::new()));
    }
    let rules = rules(kind, level);
    let build = |rules, mismatch, matched| {
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
            .and_then(BpfProgram::try_from)
            .map_err(|e| SeccompError::Build(kind.name(), e))
    };
    let mut programs = Vec::new();
    // Syscalls refused with ENOSYS rather than SIGSYS, in a filter of their own that goes
    // first (installing the next filter needs prctl and seccomp, which it lets through).
    // Stacked filters take the strictest answer, so its ENOSYS wins over the allow-list's
    // Allow; the allow-list lets these through so that its SIGSYS does not win instead.
    let quiet: BTreeMap<i64, Vec<SeccompRule>> = quietly_refused(kind, level)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    if !quiet.is_empty() {
        programs.push(build(
            quiet,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
        )?);
    }
    programs.push(build(
        rules.into_inner(),
        SeccompAction::Trap,
        SeccompAction::Allow,
    )?);
    Ok(ThreadFilters(programs))
}

/// Whether threads of `kind` start other threads (device workers).
fn allows_threads(kind: ThreadKind) -> bool {
    matches!(kind, ThreadKind::Vcpu | ThreadKind::Vmm)
}

/// Syscalls threads of `kind` may attempt but that fail with ENOSYS:
/// - `openat` outside the main thread: glibc's malloc, when it first shrinks a thread's
///   arena (on `free` or at thread exit), opens `/proc/sys/vm/overcommit_memory` and treats
///   a failed open as "overcommit is not strict", which is what we want; nothing else on
///   those threads opens files.
/// - `clone3` at level 2 on threads that start threads: its flags live in memory a filter
///   cannot read, and glibc falls back to `clone`, whose flags the allow-list checks.
fn quietly_refused(kind: ThreadKind, level: SeccompLevel) -> Vec<i64> {
    let mut syscalls = Vec::new();
    if kind != ThreadKind::Vmm {
        syscalls.push(libc::SYS_openat);
    }
    if level == SeccompLevel::Arguments && allows_threads(kind) {
        syscalls.push(libc::SYS_clone3);
    }
    syscalls
}

thread_local! {
    /// The kind of filter this thread installed last, for the SIGSYS message.
    static THREAD_KIND: Cell<u8> = const { Cell::new(0) };
}

/// Installs the filters of `kind` at `level` on the calling thread (and the SIGSYS handler,
/// once per process). Threads this one creates afterwards inherit them.
pub fn install(kind: ThreadKind, level: SeccompLevel) -> Result<(), SeccompError> {
    let filters = filters(kind, level)?;
    install_filters(kind, &filters)
}

/// Installs filters built earlier with [`filters`] on the calling thread.
pub fn install_filters(kind: ThreadKind, filters: &ThreadFilters) -> Result<(), SeccompError> {
    if filters.0.is_empty() {
        return Ok(());
    }
    register_sigsys_handler()?;
    THREAD_KIND.with(|k| k.set(kind.code()));
    for program in &filters.0 {
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind.name(), e))?;
    }
    tracing::debug!(thread = kind.name(), "seccomp filter installed");
    Ok(())
}

/// The worker filters device workers install, set by [`crate::Vmm::run`]; `None` while no
/// VM runs with seccomp on.
static WORKER_FILTERS: Mutex<Option<ThreadFilters>> = Mutex::new(None);

/// Makes every device worker started from now on install the worker filter of `level`.
pub(crate) fn prepare_workers(level: SeccompLevel) -> Result<(), SeccompError> {
    let filters = match level {
        SeccompLevel::None => None,
        _ => Some(filters(ThreadKind::Worker, level)?),
    };
    set_worker_filters(filters);
    Ok(())
}

/// Makes every device worker started from now on install `filters` (`None`: none), through
/// the hook `devices` calls at the start of each worker thread.
pub(crate) fn set_worker_filters(filters: Option<ThreadFilters>) {
    *WORKER_FILTERS.lock().unwrap_or_else(|p| p.into_inner()) = filters;
    devices::virtio::set_worker_start_hook(install_worker);
}

/// The hook run at the start of each device worker thread: installs the worker filter on top
/// of the vCPU filter the thread inherited.
fn install_worker() -> Result<(), String> {
    let filters = WORKER_FILTERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match filters {
        Some(filters) => install_filters(ThreadKind::Worker, &filters).map_err(|e| {
            let mut text = e.to_string();
            if let Some(source) = std::error::Error::source(&e) {
                text.push_str(&format!(": {source}"));
            }
            text
        }),
        None => Ok(()),
    }
}

/// A syscall number no kernel has: issuing it on a filtered thread always traps.
const NO_SUCH_SYSCALL: libc::c_long = 999_999;
/// `si_code` of a SIGSYS raised by seccomp (`SYS_SECCOMP` in `<asm-generic/siginfo.h>`).
const SYS_SECCOMP: libc::c_int = 1;

fn register_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys)
            .map_err(SeccompError::Handler);
    });
    result
}

/// Appends `n` in decimal to `buf` at `len`; async-signal-safe.
fn push_decimal(buf: &mut [u8], len: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(buf, len, &digits[i..]);
}

fn push(buf: &mut [u8], len: &mut usize, bytes: &[u8]) {
    let room = buf.len().saturating_sub(*len).min(bytes.len());
    buf[*len..*len + room].copy_from_slice(&bytes[..room]);
    *len += room;
}

extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // For SIGSYS the siginfo holds `_sigsys { void *call_addr; int syscall; unsigned arch; }`
    // after the three ints and padding of the header: the syscall is the seventh int.
    // SAFETY: the siginfo is at least 128 bytes; offset 24 is inside it.
    let syscall = unsafe { *info.cast::<libc::c_int>().add(6) };
    let kind = match THREAD_KIND.with(Cell::get) {
        1 => ThreadKind::Vmm.name(),
        2 => ThreadKind::Vcpu.name(),
        3 => ThreadKind::Worker.name(),
        4 => ThreadKind::Api.name(),
        _ => "unfiltered",
    };
    let mut buf = [0u8; 400];
    let mut len = 0;
    if code == SYS_SECCOMP {
        crate::metrics::SECCOMP_FAULTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        push(&mut buf, &mut len, b"anvil-vmm: seccomp: the ");
        push(&mut buf, &mut len, kind.as_bytes());
        push(&mut buf, &mut len, b" thread made forbidden syscall ");
        push_decimal(&mut buf, &mut len, u64::try_from(syscall).unwrap_or(0));
        push(
            &mut buf,
            &mut len,
            b" (see `ausyscall x86_64 N`); killing the VMM with SIGSYS. To debug: rerun with \
              --no-seccomp, or strace -f it, and extend vmm/src/seccomp.rs\n",
        );
    } else {
        push(&mut buf, &mut len, b"anvil-vmm: SIGSYS received; exiting\n");
    }
    // SAFETY: write(2) is async-signal-safe; `buf[..len]` is initialised.
    unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len) };
    // SIGSYS is blocked while this handler runs, so a second trapped syscall makes the kernel
    // reset SIGSYS to its default action and kill the whole process with it.
    // SAFETY: a syscall number no kernel implements; unfiltered it fails with ENOSYS.
    unsafe { libc::syscall(NO_SUCH_SYSCALL) };
    // Not filtered (a SIGSYS sent by someone else): end the process as SIGSYS would.
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

/// An allow-list under construction.
struct Rules {
    level: SeccompLevel,
    map: BTreeMap<i64, Vec<SeccompRule>>,
}

/// A condition on argument `arg` (32-bit compare, enough for flags, commands and ioctls).
fn arg_eq(arg: u8, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .expect("argument indexes used here are below 6")
}

/// Bits `mask` of argument `arg` equal `value`.
fn arg_masked(arg: u8, mask: u64, value: u64) -> SeccompCondition {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
    .expect("argument indexes used here are below 6")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("every rule here has a condition")
}

impl Rules {
    fn new(level: SeccompLevel) -> Self {
        Self {
            level,
            map: BTreeMap::new(),
        }
    }

    /// Allows `syscalls` whatever their arguments.
    fn allow(&mut self, syscalls: &[i64]) -> &mut Self {
        for &nr in syscalls {
            self.map.insert(nr, Vec::new());
        }
        self
    }

    /// Allows `syscall` when one of `rules` matches (at level 1, always).
    fn allow_if(&mut self, syscall: i64, rules: Vec<SeccompRule>) -> &mut Self {
        match self.map.get_mut(&syscall) {
            // Already allowed whatever the arguments.
            Some(existing) if existing.is_empty() => {}
            Some(existing) => existing.extend(rules),
            None => {
                let rules = if self.level == SeccompLevel::Arguments {
                    rules
                } else {
                    Vec::new()
                };
                self.map.insert(syscall, rules);
            }
        }
        self
    }

    /// Allows `syscall` when argument `arg` is one of `values`.
    fn allow_arg_in(&mut self, syscall: i64, arg: u8, values: &[u64]) -> &mut Self {
        let rules = values.iter().map(|&v| rule(vec![arg_eq(arg, v)])).collect();
        self.allow_if(syscall, rules)
    }

    /// Allows `ioctl` with the given request numbers.
    fn allow_ioctls(&mut self, requests: &[u64]) -> &mut Self {
        self.allow_arg_in(libc::SYS_ioctl, 1, requests)
    }

    fn into_inner(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.map
    }
}

/// `fcntl` commands any thread may use (dup for eventfd clones, flag reads and changes).
const FCNTL_CMDS: [u64; 5] = [
    libc::F_DUPFD_CLOEXEC as u64,
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
];

/// The KVM ioctls the filters name (numbers as kvm-ioctls declares them).
mod ioctls {
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_irqchip, kvm_lapic_state,
        kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
        kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    // vCPU state for snapshots, read on the vCPU thread.
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
    ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
    // VM state for snapshots, read on the main thread.
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    // Live migration switches KVM's dirty log on.
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
}

/// What every thread does: memory, locks, signals, time, logging, thread exit.
fn common(rules: &mut Rules) {
    rules.allow(&[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // std's HashMap seeds and the rng device.
        libc::SYS_getrandom,
    ]);
    // Memory, but never executable: nothing maps code after start-up.
    let no_exec = || vec![rule(vec![arg_masked(2, libc::PROT_EXEC as u64, 0)])];
    rules.allow_if(libc::SYS_mmap, no_exec());
    rules.allow_if(libc::SYS_mprotect, no_exec());
    // Kicking a vCPU (pthread_kill) and abort() after a panic.
    let signals = [
        u64::try_from(vmm_sys_util::signal::SIGRTMIN()).unwrap_or(34),
        libc::SIGABRT as u64,
    ];
    rules.allow_arg_in(libc::SYS_tgkill, 2, &signals);
}

/// What an epoll loop needs.
fn epoll(rules: &mut Rules) {
    rules.allow(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
    ]);
    rules.allow_arg_in(libc::SYS_fcntl, 1, &FCNTL_CMDS);
}

/// The device workers: queue eventfds, disks, taps, vsock's Unix sockets, rate limiter timers.
fn worker(rules: &mut Rules) {
    common(rules);
    epoll(rules);
    rules.allow(&[
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_connect,
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
    ]);
    rules.allow_arg_in(libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
    rules.allow_ioctls(&[libc::FIONBIO]);
}

/// The vCPU threads: KVM_RUN and what the devices do on activation (creating eventfds,
/// epolls and timers, configuring the tap, spawning the worker), plus all a worker does,
/// since the worker inherits this filter.
fn vcpu(rules: &mut Rules) {
    device_host(rules);
    rules.allow_ioctls(&[
        ioctls::KVM_RUN(),
        ioctls::KVM_GET_REGS(),
        ioctls::KVM_GET_MP_STATE(),
        ioctls::KVM_GET_SREGS(),
        ioctls::KVM_GET_MSRS(),
        ioctls::KVM_GET_CPUID2(),
        ioctls::KVM_GET_LAPIC(),
        ioctls::KVM_GET_VCPU_EVENTS(),
        ioctls::KVM_GET_DEBUGREGS(),
        ioctls::KVM_GET_TSC_KHZ(),
        ioctls::KVM_GET_XSAVE(),
        ioctls::KVM_GET_XCRS(),
        ioctls::KVM_GET_XSAVE2(),
        ioctls::KVM_KVMCLOCK_CTRL(),
    ]);
}

/// What a thread that (re)starts devices needs: creating their eventfds, epolls and timers,
/// configuring the tap, spawning the worker and letting it install its filter, plus all a
/// worker does, since the worker inherits this filter. vCPU threads start devices when the
/// driver activates them, the main thread when a snapshot is done with them.
fn device_host(rules: &mut Rules) {
    worker(rules);
    rules.allow(&[
        libc::SYS_eventfd2,
        libc::SYS_epoll_create1,
        libc::SYS_timerfd_create,
        // Starting a thread (glibc's pthread_create and its start routine).
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
    ]);
    rules.allow_if(
        libc::SYS_clone,
        vec![rule(vec![arg_masked(
            0,
            libc::CLONE_THREAD as u64,
            libc::CLONE_THREAD as u64,
        )])],
    );
    rules.allow_arg_in(
        libc::SYS_prctl,
        0,
        &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
    );
    // The worker installs its own filter on top of this one (seccompiler sets
    // no_new_privs first); more filters can only take permissions away.
    rules.allow_arg_in(
        libc::SYS_seccomp,
        0,
        &[u64::from(libc::SECCOMP_SET_MODE_FILTER)],
    );
    rules.allow_ioctls(&[libc::TUNSETOFFLOAD]);
}

/// The main thread once the VM runs: its epoll loop, vCPU kicks, stdin, the terminal mode
/// restored at exit, the vsock socket removed at exit, the metrics timer, the copy of the
/// guest memory mapped from the kernel files (`/proc/self/mem`), and the API actions
/// on a running VM: `PATCH /drives` opens the new backing file, a snapshot creates its files
/// and reads the VM's state (irqchip, PIT, clock, dirty log), stopping the device workers and
/// starting them again afterwards.
fn vmm(rules: &mut Rules) {
    device_host(rules);
    rules.allow(&[
        libc::SYS_openat,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
    ]);
    rules.allow_ioctls(&[
        libc::TCGETS,
        libc::TCSETS,
        libc::FIONBIO,
        ioctls::KVM_GET_CLOCK(),
        ioctls::KVM_GET_DIRTY_LOG(),
        ioctls::KVM_GET_IRQCHIP(),
        ioctls::KVM_GET_PIT2(),
    ]);
    migration_source(rules);
}

/// The live-migration thread the main thread starts (it inherits the main thread's filter):
/// a TCP or Unix stream to the destination, and KVM's dirty log switched on for every
/// memory slot.
fn migration_source(rules: &mut Rules) {
    rules.allow_arg_in(
        libc::SYS_socket,
        0,
        &[
            libc::AF_UNIX as u64,
            libc::AF_INET as u64,
            libc::AF_INET6 as u64,
        ],
    );
    rules.allow(&[
        // /proc/self/pagemap: which pages the guest never touched.
        libc::SYS_pread64,
        libc::SYS_connect,
        libc::SYS_setsockopt,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_shutdown,
    ]);
    rules.allow_ioctls(&[ioctls::KVM_SET_USER_MEMORY_REGION()]);
}

/// The API thread: tokio's current-thread runtime (mio over epoll, an eventfd waker) serving
/// HTTP on a Unix listener, talking to the VMM through a channel and an eventfd.
fn api(rules: &mut Rules) {
    common(rules);
    epoll(rules);
    rules.allow(&[
        libc::SYS_epoll_create1,
        libc::SYS_eventfd2,
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
    ]);
    rules.allow_ioctls(&[libc::FIONBIO, libc::FIOCLEX]);
}

fn rules(kind: ThreadKind, level: SeccompLevel) -> Rules {
    let mut rules = Rules::new(level);
    // The filter installed before the allow-list answers these with ENOSYS.
    rules.allow(&quietly_refused(kind, level));
    match kind {
        ThreadKind::Vmm => vmm(&mut rules),
        ThreadKind::Vcpu => vcpu(&mut rules),
        ThreadKind::Worker => worker(&mut rules),
        ThreadKind::Api => api(&mut rules),
    }
    rules
}

#[cfg(test)]
mod tests;
