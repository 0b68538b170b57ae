//! Seccomp on a running VMM: every thread is filtered while the guest works, the guest still
//! does its I/O, and the flags that turn filtering down or off do so.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{anvil_vmm, boot_testguest, kvm_available, testguest, TempDir};

const MIB: usize = 1024 * 1024;

/// `(thread name, Seccomp: value)` for every thread of process `pid`.
fn thread_seccomp(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for task in tasks.flatten() {
        // A thread that ended since the directory was read (a short-lived helper such as
        // anvil-kpages) runs nothing, filtered or not.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        threads.push((field("Name:"), field("Seccomp:")));
    }
    threads
}

/// While a rate-limited blk workload keeps two vCPUs and the disk worker busy, every thread of
/// the VMM runs in seccomp filter mode (2); the workload then passes.
#[test]
fn every_thread_is_filtered_while_the_guest_does_io() {
    if !kvm_available("every_thread_is_filtered_while_the_guest_does_io") {
        return;
    }
    let dir = TempDir::new("seccomp-threads");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 2 * MIB]).unwrap();
    // 512 KiB per 250 ms: moving 4 MiB takes a few seconds.
    let spec = format!("path={},bw=512K:250", disk.display());
    let mut child = Command::new(anvil_vmm())
        .arg("boot")
        .arg("--kernel")
        .arg(testguest())
        .args(["--cpus", "2", "--cmdline", "tg.run=blk tg.seed=5"])
        .args(["--disk", &spec])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        seen = thread_seccomp(child.id());
        if seen.iter().any(|(name, _)| name == "anvil-blk0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    let report = format!("threads: {seen:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");

    for name in ["anvil-vmm", "anvil-vcpu0", "anvil-vcpu1", "anvil-blk0"] {
        assert!(
            seen.iter().any(|(n, _)| n == name),
            "no {name} thread\n{report}"
        );
    }
    assert!(
        seen.iter().all(|(_, mode)| mode == "2"),
        "a thread is not in seccomp filter mode\n{report}"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{report}");
    assert!(stdout.contains("TG result=pass"), "{report}");
    assert!(
        stderr.contains("seccomp filters installed on every thread"),
        "{report}"
    );
}

/// The filters admit what the rng and blk devices do at level 1 too.
#[test]
fn level_one_runs_the_devices() {
    if !kvm_available("level_one_runs_the_devices") {
        return;
    }
    let dir = TempDir::new("seccomp-level1");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; MIB]).unwrap();
    let spec = format!("path={}", disk.display());
    let run = boot_testguest(
        "tg.run=blk tg.seed=2",
        &["--seccomp-level", "1", "--disk", &spec],
    );
    run.assert_pass();
    assert!(run.stderr.contains("level=Syscalls"), "{run}");
    let run = boot_testguest("tg.run=rng", &["--seccomp-level", "1", "--rng"]);
    run.assert_pass();
}

/// --no-seccomp (and level 0) leave every thread unfiltered; bad levels are usage errors.
#[test]
fn no_seccomp_turns_filtering_off() {
    if !kvm_available("no_seccomp_turns_filtering_off") {
        return;
    }
    let mut child = Command::new(anvil_vmm())
        .arg("boot")
        .arg("--kernel")
        .arg(testguest())
        .args(["--no-seccomp", "--cmdline", "tg.run=counter"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        seen = thread_seccomp(child.id());
        if seen.iter().any(|(name, _)| name == "anvil-vcpu0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.iter().any(|(n, _)| n == "anvil-vcpu0"), "{seen:?}");
    assert!(seen.iter().all(|(_, mode)| mode == "0"), "{seen:?}");

    let run = boot_testguest("tg.run=hello", &["--seccomp-level", "3"]);
    assert_eq!(run.status.code(), Some(2), "{run}");
    assert!(run.stderr.contains("--seccomp-level"), "{run}");
}

/// In Firecracker mode the API thread is filtered too, and keeps answering while the guest
/// runs under the filters; a guest started through the API runs with every thread filtered.
#[test]
fn api_mode_filters_the_api_thread_and_it_keeps_serving() {
    if !kvm_available("api_mode_filters_the_api_thread_and_it_keeps_serving") {
        return;
    }
    let dir = TempDir::new("seccomp-api");
    let sock = dir.path("api.sock");
    let mut child = Command::new(anvil_vmm())
        .args(["--api-sock", sock.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        if let Ok(c) = api_server::client::Client::connect(&sock) {
            break c;
        }
        assert!(Instant::now() < deadline, "the API socket never answered");
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut call = |method: &str, path: &str, body: Option<String>| {
        let r = client.request(method, path, body.as_deref()).unwrap();
        assert!(r.status < 300, "{method} {path}: {r:?}");
        r
    };
    call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#.into()),
    );
    let boot = serde_json::json!({
        "kernel_image_path": testguest(),
        "boot_args": "console=ttyS0 tg.run=counter tg.period_ms=20",
    });
    call("PUT", "/boot-source", Some(boot.to_string()));
    call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#.into()),
    );
    let threads = thread_seccomp(child.id());
    // Requests served by the filtered API thread and VMM thread while the guest runs.
    for _ in 0..20 {
        let info = call("GET", "/", None);
        assert_eq!(info.json()["state"], "Running");
    }
    call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#.into()));
    call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#.into()));
    call("GET", "/vm/config", None);
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    assert!(alive, "anvil-vmm died\n{stderr}");
    for name in ["anvil-vmm", "anvil-api", "anvil-vcpu0", "anvil-vcpu1"] {
        assert!(
            threads.iter().any(|(n, _)| n == name),
            "no {name}: {threads:?}"
        );
    }
    assert!(
        threads.iter().all(|(_, mode)| mode == "2"),
        "{threads:?}\n{stderr}"
    );
}
