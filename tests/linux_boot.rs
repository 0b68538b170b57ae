//! The Linux lane: a real Linux guest (the shared kernel and busybox initramfs) booted by
//! anvil-vmm. These need a KVM that runs guest kernel code (hardware KVM); on a PVM host they
//! skip loudly here and `.ci/run` runs them inside the L1 machine instead.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{anvil_vmm, boot, linux_capable, linux_guest_dir, Run};

/// Under the L1 machine's software CPU a boot takes seconds; leave ample room.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MEMORY_MIB: u64 = 256;

fn boot_linux(kernel: &str, anvil_cmd: &str) -> Run {
    let dir = linux_guest_dir();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 quiet anvil_cmd=\"{anvil_cmd}\"");
    let memory = format!("{MEMORY_MIB}M");
    boot(
        &[
            "--kernel",
            dir.join(kernel).to_str().unwrap(),
            "--initrd",
            dir.join("initramfs.cpio.gz").to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            &memory,
            "--cmdline",
            &cmdline,
        ],
        BOOT_TIMEOUT,
    )
}

/// Boots `kernel`, runs commands in the guest and checks what they printed.
fn check_linux_boot(kernel: &str) {
    let cmd = "echo marker-$((6*7)); echo nproc=$(nproc); grep MemTotal /proc/meminfo; echo epoch=$(date +%s)";
    let run = boot_linux(kernel, cmd);
    let host_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    assert!(
        lines.contains(&"marker-42"),
        "the guest must run the command\n{run}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("anvil-guest: init ready")),
        "{run}"
    );
    assert!(
        lines.contains(&"nproc=2"),
        "the guest must see 2 vCPUs\n{run}"
    );
    let mem_kib: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal\n{run}"));
    let expected_kib = MEMORY_MIB * 1024;
    assert!(
        mem_kib.abs_diff(expected_kib) * 10 <= expected_kib,
        "MemTotal {mem_kib} kB is not within 10% of {expected_kib} kB\n{run}"
    );
    let guest_epoch: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("epoch="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no epoch\n{run}"));
    assert!(
        guest_epoch.abs_diff(host_epoch) <= 60,
        "guest clock {guest_epoch} is more than a minute from the host's {host_epoch}\n{run}"
    );
    assert!(lines.contains(&"anvil-guest: cmd exit 0"), "{run}");
    assert_eq!(
        run.status.code(),
        Some(0),
        "the VMM must exit 0 after the guest reboots\n{run}"
    );
    assert!(
        run.stderr.contains("Guest-boot-time = "),
        "init signals boot on port 0x3f0\n{run}"
    );
}

#[test]
fn linux_vmlinux_boots_with_two_vcpus() {
    if !linux_capable("linux_vmlinux_boots_with_two_vcpus") {
        return;
    }
    check_linux_boot("vmlinux");
}

#[test]
fn linux_bzimage_boots_with_two_vcpus() {
    if !linux_capable("linux_bzimage_boots_with_two_vcpus") {
        return;
    }
    check_linux_boot("bzImage");
}

#[test]
fn linux_shell_reads_console_input() {
    if !linux_capable("linux_shell_reads_console_input") {
        return;
    }
    let dir = linux_guest_dir();
    let mut child = Command::new(anvil_vmm())
        .args(["boot", "--kernel"])
        .arg(dir.join("vmlinux"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio.gz"))
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1 quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut seen = Vec::new();
    let wait_for = |needle: &str, seen: &mut Vec<String>| {
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return true;
                }
            }
        }
        false
    };
    assert!(
        wait_for("anvil-guest: init ready", &mut seen),
        "no init\n{}",
        seen.join("\n")
    );
    // The shell starts right after init prints; typed input waits in the serial FIFO.
    stdin.write_all(b"echo typed-$((20+3))\n").unwrap();
    assert!(
        wait_for("typed-23", &mut seen),
        "the shell must run typed input\n{}",
        seen.join("\n")
    );
    stdin.write_all(b"reboot -f\n").unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the VMM did not exit after reboot"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}
