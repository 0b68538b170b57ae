//! Every error a user meets at start-up: a one-line message that names the problem and the
//! documented exit status, never a panic.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::{anvil_vmm, boot, run_with_deadline, testguest, tiny_elf, Run, TempDir};

const EXIT_ERROR: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_GUEST_FAILURE: i32 = 3;
const T: Duration = Duration::from_secs(30);

/// Asserts the exit status, that stderr's last line names `needle`, and that nothing
/// panicked.
fn assert_error(run: &Run, status: i32, needle: &str) {
    assert_eq!(run.status.code(), Some(status), "{run}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("anvil-vmm: "),
        "message must be one anvil-vmm line\n{run}"
    );
    assert!(last.contains(needle), "message must name {needle:?}\n{run}");
    assert!(!run.stderr.contains("panicked"), "{run}");
    assert!(!run.stderr.contains("RUST_BACKTRACE"), "{run}");
}

fn guest() -> String {
    testguest().to_str().unwrap().to_string()
}

#[test]
fn missing_kernel_is_named() {
    let run = boot(&["--kernel", "/nonexistent/vmlinux"], T);
    assert_error(
        &run,
        EXIT_ERROR,
        "cannot open kernel /nonexistent/vmlinux: No such file",
    );
}

#[test]
fn a_directory_is_not_a_kernel_file() {
    let run = boot(&["--kernel", "/tmp"], T);
    assert_error(&run, EXIT_ERROR, "cannot open kernel /tmp");
}

#[test]
fn a_file_that_is_not_a_kernel_is_refused() {
    let dir = TempDir::new("notkernel");
    let path = dir.path("vmlinux");
    std::fs::write(&path, b"#!/bin/sh\necho this is not a kernel\n".repeat(200)).unwrap();
    let run = boot(&["--kernel", path.to_str().unwrap()], T);
    assert_error(&run, EXIT_ERROR, "is not a kernel");
    let empty = dir.path("empty");
    std::fs::write(&empty, b"").unwrap();
    let run = boot(&["--kernel", empty.to_str().unwrap()], T);
    assert_error(&run, EXIT_ERROR, "is not a kernel");
}

/// Runs anvil-vmm as the unprivileged `nobody` user (when we are root) so that file
/// permissions apply.
fn boot_as_nobody(args: &[&str]) -> Option<Run> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(anvil_vmm())
        .arg("boot")
        .args(args);
    Some(run_with_deadline(cmd, T))
}

#[test]
fn unreadable_kernel_is_named() {
    let dir = TempDir::new("unreadable");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path("vmlinux");
    std::fs::write(&path, b"kernel").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
    let run = match boot_as_nobody(&["--kernel", path.to_str().unwrap()]) {
        Some(run) => run,
        None => boot(&["--kernel", path.to_str().unwrap()], T),
    };
    assert_error(&run, EXIT_ERROR, "Permission denied");
    assert!(run.stderr.contains(path.to_str().unwrap()), "{run}");
}

#[test]
fn inaccessible_kvm_is_reported() {
    let dir = TempDir::new("nokvm");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let kernel = dir.path("guest");
    std::fs::copy(testguest(), &kernel).unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    let Some(run) = boot_as_nobody(&["--kernel", kernel.to_str().unwrap()]) else {
        eprintln!(
            "SKIPPED inaccessible_kvm_is_reported: needs root to drop to an unprivileged user"
        );
        return;
    };
    if std::fs::metadata("/dev/kvm")
        .map(|m| m.permissions().mode() & 0o006 != 0)
        .unwrap_or(true)
    {
        eprintln!("SKIPPED inaccessible_kvm_is_reported: /dev/kvm is missing or world-accessible");
        return;
    }
    assert_error(&run, EXIT_ERROR, "no permission to open /dev/kvm");
}

#[test]
fn missing_kvm_device_is_reported() {
    let run = boot(
        &["--kernel", &guest(), "--kvm-device", "/nonexistent/kvm"],
        T,
    );
    assert_error(&run, EXIT_ERROR, "/nonexistent/kvm does not exist");
}

#[test]
fn a_file_that_is_not_kvm_is_reported() {
    let run = boot(&["--kernel", &guest(), "--kvm-device", "/dev/null"], T);
    assert_error(&run, EXIT_ERROR, "/dev/null is not a KVM device");
}

#[test]
fn bad_memory_sizes_are_refused() {
    let g = guest();
    for (value, needle, status) in [
        ("0", "memory size must be at least 1 MiB", EXIT_USAGE),
        ("12X", "invalid --memory", EXIT_USAGE),
        ("lots", "invalid --memory", EXIT_USAGE),
        ("2T", "larger than the maximum", EXIT_USAGE),
    ] {
        let run = boot(&["--kernel", &g, "--memory", value], T);
        assert_error(&run, status, needle);
    }
}

#[test]
fn memory_beyond_the_host_is_refused() {
    let host_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap()
        / 1024;
    let too_much = format!("{}M", host_mib + 1024);
    let run = boot(&["--kernel", &guest(), "--memory", &too_much], T);
    if !common::kvm_available("memory_beyond_the_host_is_refused") {
        return;
    }
    assert_error(&run, EXIT_ERROR, "larger than the host's");
}

#[test]
fn bad_vcpu_counts_are_refused() {
    let g = guest();
    for (value, needle) in [
        ("0", "vCPU count must be at least 1"),
        ("abc", "invalid --cpus"),
        ("-1", "invalid --cpus"),
        ("255", "larger than the maximum of 254"),
        ("99999999999999999999999", "invalid --cpus"),
    ] {
        let run = boot(&["--kernel", &g, "--cpus", value], T);
        assert_error(&run, EXIT_USAGE, needle);
    }
}

#[test]
fn missing_required_flag_is_a_usage_error() {
    let run = boot(&[], T);
    assert_error(&run, EXIT_USAGE, "--kernel");
}

#[test]
fn initrd_too_large_for_memory_is_refused() {
    if !common::kvm_available("initrd_too_large_for_memory_is_refused") {
        return;
    }
    let dir = TempDir::new("bigrd");
    let initrd = dir.path("initrd");
    let file = std::fs::File::create(&initrd).unwrap();
    file.set_len(200 << 20).unwrap();
    let run = boot(
        &[
            "--kernel",
            &guest(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "128M",
        ],
        T,
    );
    assert_error(&run, EXIT_ERROR, "does not fit in guest memory");
    assert!(run.stderr.contains(initrd.to_str().unwrap()), "{run}");
}

#[test]
fn missing_initrd_is_named() {
    let run = boot(
        &["--kernel", &guest(), "--initrd", "/nonexistent/initrd"],
        T,
    );
    assert_error(&run, EXIT_ERROR, "cannot read initrd /nonexistent/initrd");
}

#[test]
fn pvh_without_a_note_is_refused() {
    if !common::kvm_available("pvh_without_a_note_is_refused") {
        return;
    }
    let dir = TempDir::new("nopvh");
    let kernel = dir.path("tiny");
    std::fs::write(&kernel, tiny_elf(&[0xf4], 0x20_0000)).unwrap();
    let run = boot(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--boot-protocol",
            "pvh",
        ],
        T,
    );
    assert_error(&run, EXIT_ERROR, "has no PVH entry note");
}

#[test]
fn a_triple_fault_ends_the_vmm_with_guest_failure() {
    if !common::kvm_available("a_triple_fault_ends_the_vmm_with_guest_failure") {
        return;
    }
    let dir = TempDir::new("triple");
    let kernel = dir.path("tiny");
    // ud2: #UD with the boot IDT empty escalates to a triple fault.
    std::fs::write(&kernel, tiny_elf(&[0x0f, 0x0b], 0x20_0000)).unwrap();
    let run = boot(&["--kernel", kernel.to_str().unwrap()], T);
    assert_error(&run, EXIT_GUEST_FAILURE, "triple-faulted");
    // Where the guest was is logged for its developers.
    assert!(
        run.stderr.contains("vCPU state at the triple fault") && run.stderr.contains("cr3="),
        "{run}"
    );
}

#[test]
fn a_guest_halted_with_interrupts_off_is_detected() {
    if !common::kvm_available("a_guest_halted_with_interrupts_off_is_detected") {
        return;
    }
    let dir = TempDir::new("stuck");
    let kernel = dir.path("tiny");
    // cli; hlt; jmp back to hlt.
    std::fs::write(&kernel, tiny_elf(&[0xfa, 0xf4, 0xeb, 0xfd], 0x20_0000)).unwrap();
    let run = boot(&["--kernel", kernel.to_str().unwrap(), "--cpus", "2"], T);
    assert_error(&run, EXIT_GUEST_FAILURE, "stopped making progress");
}

#[test]
fn bad_command_lines_are_refused() {
    let g = guest();
    let long = "x".repeat(3000);
    for (value, needle) in [
        (
            "console=ttyS0 caf\u{e9}",
            "non-printable or non-ASCII character at byte 17",
        ),
        (
            long.as_str(),
            "kernel command line is 3000 bytes, longer than the maximum of 2047",
        ),
    ] {
        let run = boot(&["--kernel", &g, "--cmdline", value], T);
        assert_error(&run, EXIT_USAGE, needle);
    }
}

#[test]
fn a_bad_log_level_is_a_usage_error() {
    let run = boot(&["--kernel", &guest(), "--log-level", "loud"], T);
    assert_error(&run, EXIT_USAGE, "invalid log level \"loud\"");
}

#[test]
fn bad_disks_are_refused_before_the_guest_starts() {
    let g = guest();
    let run = boot(&["--kernel", &g, "--disk", "path=/nonexistent/disk.img"], T);
    assert_error(
        &run,
        EXIT_ERROR,
        "cannot open disk image /nonexistent/disk.img",
    );
    let dir = TempDir::new("disks");
    let img = dir.path("a.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let odd = dir.path("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let a = format!("path={},id=same", img.display());
    let run = boot(&["--kernel", &g, "--disk", &a, "--disk", &a], T);
    assert_error(&run, EXIT_USAGE, "disk id \"same\" is used twice");
    let run = boot(&["--kernel", &g, "--disk", "ro,root"], T);
    assert_error(&run, EXIT_USAGE, "path=PATH is missing");
    let bad_opt = format!("path={},rw", img.display());
    let run = boot(&["--kernel", &g, "--disk", &bad_opt], T);
    assert_error(&run, EXIT_USAGE, "unknown or empty option \"rw\"");
    let odd_disk = format!("path={}", odd.display());
    let run = boot(&["--kernel", &g, "--disk", &odd_disk], T);
    assert_error(&run, EXIT_ERROR, "is 1000 bytes, not a multiple of 512");
}

#[test]
fn bad_network_interfaces_are_refused_before_the_guest_starts() {
    let g = guest();
    let run = boot(&["--kernel", &g, "--net", "tap=anvil-nosuch9"], T);
    assert_error(
        &run,
        EXIT_ERROR,
        "tap device \"anvil-nosuch9\" does not exist",
    );
    let run = boot(&["--kernel", &g, "--net", "tap=lo"], T);
    assert_error(&run, EXIT_ERROR, "\"lo\" is not a tap device");
    let run = boot(&["--kernel", &g, "--net", "tap=t0,mac=52:54:00:12:34"], T);
    assert_error(&run, EXIT_USAGE, "bad MAC address");
    let run = boot(&["--kernel", &g, "--net", "tap=t0", "--net", "tap=t0"], T);
    assert_error(&run, EXIT_USAGE, "tap \"t0\" is used twice");
}

#[test]
fn bad_vsock_settings_are_refused() {
    let g = guest();
    let run = boot(&["--kernel", &g, "--vsock", "cid=2,socket=/tmp/x.sock"], T);
    assert_error(&run, EXIT_USAGE, "cid 2 is reserved");
    let run = boot(&["--kernel", &g, "--vsock", "cid=3"], T);
    assert_error(&run, EXIT_USAGE, "socket=PATH is missing");
    let run = boot(
        &[
            "--kernel",
            &g,
            "--vsock",
            "cid=3,socket=/nonexistent/dir/v.sock",
        ],
        T,
    );
    assert_error(
        &run,
        EXIT_ERROR,
        "cannot listen on vsock socket /nonexistent/dir/v.sock",
    );
}
