//! Filters are tested on real threads of a child process: the test binary runs itself with
//! `ANVIL_SECCOMP_CHILD` naming a scenario, the scenario installs a filter and makes
//! syscalls, and the parent checks how the child ended.

use std::process::Command;

use super::*;

const CHILD_ENV: &str = "ANVIL_SECCOMP_CHILD";

#[test]
fn levels_follow_firecracker_numbers() {
    assert_eq!(SeccompLevel::from_number(0).unwrap(), SeccompLevel::None);
    assert_eq!(
        SeccompLevel::from_number(1).unwrap(),
        SeccompLevel::Syscalls
    );
    assert_eq!(
        SeccompLevel::from_number(2).unwrap(),
        SeccompLevel::Arguments
    );
    assert!(matches!(
        SeccompLevel::from_number(3),
        Err(SeccompError::Level(3))
    ));
    assert_eq!(SeccompLevel::default(), SeccompLevel::Arguments);
}

#[test]
fn every_thread_kind_builds_at_every_level() {
    for kind in [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Worker,
        ThreadKind::Api,
    ] {
        assert!(filters(kind, SeccompLevel::None).unwrap().0.is_empty());
        // The allow-list, and before it the ENOSYS filter (openat off the main thread, clone3
        // at level 2 where threads are started).
        for level in [SeccompLevel::Syscalls, SeccompLevel::Arguments] {
            let expected = if kind == ThreadKind::Vmm && level == SeccompLevel::Syscalls {
                1
            } else {
                2
            };
            let got = filters(kind, level).unwrap().0.len();
            assert_eq!(got, expected, "{kind:?} {level:?}");
        }
    }
}

#[test]
fn workers_get_nothing_their_parent_refuses() {
    // A worker runs under the filter it inherits (from the vCPU that activated its device, or
    // the main thread that restarted it after a snapshot) and its own: what the worker filter
    // allows must pass the parent's too, with the same argument rules.
    for (level, parent) in [
        (SeccompLevel::Syscalls, ThreadKind::Vcpu),
        (SeccompLevel::Arguments, ThreadKind::Vcpu),
        (SeccompLevel::Syscalls, ThreadKind::Vmm),
        (SeccompLevel::Arguments, ThreadKind::Vmm),
    ] {
        let vcpu = rules(parent, level).into_inner();
        for (nr, worker_rules) in rules(ThreadKind::Worker, level).into_inner() {
            let vcpu_rules = vcpu
                .get(&nr)
                .unwrap_or_else(|| panic!("syscall {nr} is allowed to workers, not vCPUs"));
            if !vcpu_rules.is_empty() {
                for rule in &worker_rules {
                    assert!(
                        vcpu_rules.contains(rule),
                        "syscall {nr}: a worker rule the vCPU filter lacks"
                    );
                }
                assert!(!worker_rules.is_empty(), "syscall {nr}");
            }
        }
    }
}

#[test]
fn level_one_has_no_argument_rules() {
    for kind in [ThreadKind::Vmm, ThreadKind::Vcpu] {
        assert!(rules(kind, SeccompLevel::Syscalls)
            .into_inner()
            .values()
            .all(Vec::is_empty));
        assert!(rules(kind, SeccompLevel::Arguments)
            .into_inner()
            .get(&libc::SYS_ioctl)
            .is_some_and(|r| !r.is_empty()));
    }
}

/// Runs scenario `name` in a child copy of this test binary; returns its status and stderr.
fn run_child(name: &str) -> (std::process::ExitStatus, String) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--exact", "seccomp::tests::child_scenario", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, name)
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The child side: does nothing unless started by `run_child`.
#[test]
fn child_scenario() {
    let Ok(name) = std::env::var(CHILD_ENV) else {
        return;
    };
    // Filters go on a fresh thread, so the harness's own threads stay free.
    let handle = std::thread::spawn(move || child(&name));
    let code = handle.join().unwrap();
    std::process::exit(code);
}

/// A scenario; returns the exit status the parent expects for a pass (0), or the step that
/// went wrong.
fn child(name: &str) -> i32 {
    match name {
        "worker-forbidden-syscall" => {
            install(ThreadKind::Worker, SeccompLevel::Arguments).unwrap();
            // SAFETY: getpid is allowed; then ptrace, which no filter allows, must not return.
            unsafe { libc::getpid() };
            // SAFETY: PTRACE_TRACEME with null arguments only changes this process's state.
            unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            10
        }
        "vcpu-forbidden-ioctl" => {
            install(ThreadKind::Vcpu, SeccompLevel::Arguments).unwrap();
            // TCSETS is the VMM's, not the vCPU's: refused at level 2.
            // SAFETY: the request is refused before the kernel reads the null argument.
            unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TCSETS, std::ptr::null::<u8>()) };
            11
        }
        "vcpu-ioctl-level-one" => {
            install(ThreadKind::Vcpu, SeccompLevel::Syscalls).unwrap();
            // Level 1 does not look at the request: the kernel answers (ENOTTY or EFAULT).
            // SAFETY: a null termios pointer makes the kernel fail with EFAULT at worst.
            let ret =
                unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TCSETS, std::ptr::null::<u8>()) };
            if ret == -1 && errno() != 0 {
                0
            } else {
                12
            }
        }
        "vcpu-spawns-filtered-worker" => {
            install(ThreadKind::Vcpu, SeccompLevel::Arguments).unwrap();
            // clone3 is ENOSYS (glibc falls back to clone with CLONE_THREAD).
            // SAFETY: clone3 with a null argument is refused by the filter before any use.
            let ret = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            if ret != -1 || errno() != libc::ENOSYS {
                return 13;
            }
            set_worker_filters(Some(
                filters(ThreadKind::Worker, SeccompLevel::Arguments).unwrap(),
            ));
            let worker = std::thread::Builder::new()
                .name("anvil-test".into())
                .spawn(|| {
                    install_worker().unwrap();
                    // Opening a file fails quietly (glibc's malloc tries it, see
                    // `quietly_refused`).
                    match std::fs::File::open("/proc/sys/vm/overcommit_memory") {
                        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {}
                        _ => return 14,
                    }
                    // A socket other than AF_UNIX is refused, by the worker's filter.
                    // SAFETY: creating a socket has no memory-safety preconditions.
                    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                    15
                })
                .unwrap();
            worker.join().unwrap_or(16)
        }
        "no-exec-mappings" => {
            install(ThreadKind::Api, SeccompLevel::Arguments).unwrap();
            // SAFETY: an anonymous private mapping; the filter refuses PROT_EXEC first.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            17
        }
        "allowed-work-goes-on" => {
            install(ThreadKind::Vmm, SeccompLevel::Arguments).unwrap();
            // Allocation, logging to stderr, locks, time, thread-safe channel use.
            let v: Vec<u8> = vec![1; 10 << 20];
            let (tx, rx) = std::sync::mpsc::channel();
            tx.send(v.len()).unwrap();
            eprintln!("still alive after {} bytes", rx.recv().unwrap());
            let _ = std::time::SystemTime::now();
            std::thread::sleep(std::time::Duration::from_millis(1));
            0
        }
        other => panic!("unknown scenario {other}"),
    }
}

fn assert_sigsys(name: &str, kind: &str) {
    use std::os::unix::process::ExitStatusExt;
    let (status, stderr) = run_child(name);
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{name}: {status:?}\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("the {kind} thread made forbidden syscall"))
            && stderr.contains("--no-seccomp"),
        "{name}: no hint in\n{stderr}"
    );
}

#[test]
fn forbidden_syscall_kills_the_process_with_sigsys_and_a_hint() {
    assert_sigsys("worker-forbidden-syscall", "device worker");
    let (_, stderr) = run_child("worker-forbidden-syscall");
    assert!(
        stderr.contains(&format!("forbidden syscall {}", libc::SYS_ptrace)),
        "{stderr}"
    );
}

#[test]
fn level_two_refuses_an_ioctl_the_thread_does_not_need() {
    assert_sigsys("vcpu-forbidden-ioctl", "vcpu");
}

#[test]
fn level_one_checks_numbers_only() {
    let (status, stderr) = run_child("vcpu-ioctl-level-one");
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn workers_stack_their_filter_on_the_vcpu_one() {
    assert_sigsys("vcpu-spawns-filtered-worker", "device worker");
}

#[test]
fn executable_mappings_are_refused() {
    assert_sigsys("no-exec-mappings", "api");
}

#[test]
fn allowed_work_goes_on_under_the_vmm_filter() {
    let (status, stderr) = run_child("allowed-work-goes-on");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("still alive after 10485760 bytes"),
        "{stderr}"
    );
}
