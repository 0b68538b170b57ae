//! The Firecracker-compatible API: the test guest booted and driven by HTTP requests over the
//! Unix socket alone, a Firecracker configuration file, and every kind of bad input refused
//! with 400, a fault_message naming the field, and no change to the VM.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use api_server::client::{Client, Response};
use common::api_vmm::ApiVmm;
use common::{kvm_available, testguest, TempDir};

fn send(c: &mut Client, method: &str, path: &str, body: Option<&str>) -> Response {
    c.request(method, path, body).unwrap()
}

fn assert_204(c: &mut Client, method: &str, path: &str, body: &str) {
    let r = send(c, method, path, Some(body));
    assert_eq!(r.status, 204, "{method} {path} {body}: {r:?}");
}

fn boot_source(cmdline: &str) -> String {
    serde_json::json!({
        "kernel_image_path": testguest(),
        "boot_args": format!("console=ttyS0 {cmdline}"),
    })
    .to_string()
}

#[test]
fn boots_by_api_calls_alone_then_pauses_resumes_and_takes_ctrl_alt_del() {
    if !kvm_available("boots_by_api_calls_alone_then_pauses_resumes_and_takes_ctrl_alt_del") {
        return;
    }
    let dir = TempDir::new("api-boot");
    let sock = dir.path("api.sock");
    let log = dir.path("vmm.log");
    let vmm = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap(), "--id", "api-test-1"]);
    let mut c = vmm.client();

    let info = send(&mut c, "GET", "/", None);
    assert_eq!(info.status, 200);
    assert_eq!(info.json()["state"], "Not started");
    assert_eq!(info.json()["id"], "api-test-1");
    assert_204(
        &mut c,
        "PUT",
        "/logger",
        &serde_json::json!({"log_path": log, "level": "Info", "show_level": true}).to_string(),
    );
    assert_204(
        &mut c,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
    );
    assert_204(
        &mut c,
        "PUT",
        "/boot-source",
        &boot_source("tg.run=counter tg.period_ms=20"),
    );
    let mc = send(&mut c, "GET", "/machine-config", None);
    assert_eq!(mc.json()["vcpu_count"], 2);
    assert_eq!(mc.json()["mem_size_mib"], 64);
    assert_204(
        &mut c,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!(send(&mut c, "GET", "/", None).json()["state"], "Running");
    vmm.wait_for("the counter", |out| out.contains("TG count=5"));

    // Paused: the counter stops.
    assert_204(&mut c, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(send(&mut c, "GET", "/", None).json()["state"], "Paused");
    let at_pause = vmm.count();
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        vmm.count() <= at_pause + 1,
        "the counter kept going while paused: {at_pause} -> {}",
        vmm.count()
    );
    let paused_at = vmm.count();
    // Resumed: it continues from where it stopped (no restart).
    assert_204(&mut c, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(send(&mut c, "GET", "/", None).json()["state"], "Running");
    vmm.wait_for("the counter to move on", |_| vmm.count() >= paused_at + 5);
    let counts: Vec<u64> = common::tg_lines(&vmm.console())
        .iter()
        .filter(|(k, _)| k == "count")
        .map(|(_, v)| v.parse().unwrap())
        .collect();
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "the counter restarted or skipped: {counts:?}"
    );

    // The log went to the file from PUT /logger on, with levels shown.
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("INFO") && log_text.contains("vCPUs paused"),
        "{log_text}"
    );

    // Ctrl-Alt-Del reaches the guest's keyboard; the test guest then resets, ending the VMM.
    assert_204(
        &mut c,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    let mut vmm = vmm;
    assert_eq!(vmm.wait_exit(), 0, "{}", vmm.output());
    let out = vmm.output();
    assert!(
        out.contains("TG key=0x1d") && out.contains("TG ctrl-alt-del"),
        "{out}"
    );
    assert!(out.contains("TG result=pass"), "{out}");
}

fn firecracker_config(dir: &TempDir, cmdline: &str, disk: &Path) -> PathBuf {
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": testguest(),
            "boot_args": format!("console=ttyS0 {cmdline}"),
        },
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": disk,
            "is_root_device": false,
            "is_read_only": false,
        }],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": false},
        "network-interfaces": [],
        "entropy": {},
    });
    let path = dir.path("vm_config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    path
}

#[test]
fn boots_from_a_firecracker_configuration_file() {
    if !kvm_available("boots_from_a_firecracker_configuration_file") {
        return;
    }
    let dir = TempDir::new("api-config");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // Without the API: the blk and rng workloads use the configured devices, then pass.
    let config = firecracker_config(&dir, "tg.run=blk", &disk);
    let mut vmm = ApiVmm::spawn(&["--no-api", "--config-file", config.to_str().unwrap()]);
    assert_eq!(vmm.wait_exit(), 0, "{}", vmm.output());
    assert!(vmm.output().contains("TG result=pass"), "{}", vmm.output());

    // With the API too: the VM runs at once and the API reports it.
    let config = firecracker_config(&dir, "tg.run=counter tg.period_ms=20", &disk);
    let sock = dir.path("api.sock");
    let vmm = ApiVmm::spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        config.to_str().unwrap(),
    ]);
    let mut c = vmm.client();
    vmm.wait_for("the counter", |out| out.contains("TG count=3"));
    assert_eq!(send(&mut c, "GET", "/", None).json()["state"], "Running");
    let full = send(&mut c, "GET", "/vm/config", None).json();
    assert_eq!(full["drives"][0]["drive_id"], "rootfs");
    assert!(full["entropy"].is_object(), "{full}");

    // A configuration file with an unknown field is refused before anything starts.
    let bad = dir.path("bad.json");
    std::fs::write(
        &bad,
        r#"{"boot-source": {"kernel_image_path": "/x", "bogus": 1}}"#,
    )
    .unwrap();
    let mut vmm = ApiVmm::spawn(&["--no-api", "--config-file", bad.to_str().unwrap()]);
    assert_eq!(vmm.wait_exit(), 1);
    assert!(vmm.output().contains("bogus"), "{}", vmm.output());
}

#[test]
fn bad_input_gets_400_names_the_field_and_changes_nothing() {
    if !kvm_available("bad_input_gets_400_names_the_field_and_changes_nothing") {
        return;
    }
    let dir = TempDir::new("api-bad");
    let sock = dir.path("api.sock");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let vmm = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    let big = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
        testguest().display(),
        "x".repeat(60_000)
    );
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("PUT", "/machine-config", "{".into(), "invalid JSON"),
        ("PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 64, "extra": true}"#.into(), "extra"),
        ("PUT", "/machine-config", r#"{"vcpu_count": "two", "mem_size_mib": 64}"#.into(), "vcpu_count"),
        ("PUT", "/machine-config", r#"{"vcpu_count": 0, "mem_size_mib": 64}"#.into(), "vcpu_count"),
        ("PUT", "/machine-config", r#"{"vcpu_count": 255, "mem_size_mib": 64}"#.into(), "vcpu_count"),
        ("PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 0}"#.into(), "mem_size_mib"),
        ("PUT", "/machine-config", r#"{"mem_size_mib": 64}"#.into(), "vcpu_count"),
        ("PATCH", "/machine-config", r#"{"mem_size_mib": 0}"#.into(), "mem_size_mib"),
        ("PUT", "/boot-source", r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#.into(), "kernel_image_path"),
        ("PUT", "/boot-source", big, "larger than the limit"),
        ("PUT", "/drives/a", format!(r#"{{"drive_id": "b", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#, disk.display()), "drive_id"),
        ("PUT", "/drives/a", r#"{"drive_id": "a", "path_on_host": "/nonexistent.img", "is_root_device": false, "is_read_only": false}"#.into(), "path_on_host"),
        ("PUT", "/drives/a", format!(r#"{{"drive_id": "a", "path_on_host": "{}", "is_root_device": "yes"}}"#, disk.display()), "is_root_device"),
        ("PUT", "/network-interfaces/eth0", r#"{"iface_id": "eth0", "host_dev_name": "anvil-no-such-tap"}"#.into(), "host_dev_name"),
        ("PUT", "/network-interfaces/eth0", r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz:00:00:00:00:01"}"#.into(), "guest_mac"),
        ("PUT", "/network-interfaces/eth0", r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#.into(), "iface_id"),
        ("PUT", "/vsock", r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#.into(), "guest_cid"),
        ("PUT", "/logger", r#"{"level": "Loud"}"#.into(), "level"),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#.into(), "boot source"),
        ("PUT", "/actions", r#"{"action_type": "Explode"}"#.into(), "action_type"),
        ("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#.into(), "after the microVM starts"),
        ("PATCH", "/vm", r#"{"state": "Paused"}"#.into(), "after the microVM starts"),
        ("PATCH", "/drives/a", r#"{"drive_id": "a"}"#.into(), "after the microVM starts"),
        ("GET", "/no-such-path", String::new(), "Invalid request method and/or path"),
        ("DELETE", "/machine-config", String::new(), "Invalid request method and/or path"),
    ];
    let before = send(&mut c, "GET", "/vm/config", None);
    assert_eq!(before.status, 200);
    for (method, path, body, needle) in &cases {
        let body = (!body.is_empty()).then_some(body.as_str());
        let r = send(&mut c, method, path, body);
        assert_eq!(r.status, 400, "{method} {path}: {r:?}");
        let message = r.json()["fault_message"].as_str().unwrap_or("").to_string();
        assert!(
            message.contains(needle),
            "{method} {path}: fault_message {message:?} does not mention {needle:?}"
        );
        assert_eq!(
            send(&mut c, "GET", "/vm/config", None).body,
            before.body,
            "{method} {path} changed the configuration"
        );
    }

    // After the start: pre-boot-only changes and a second InstanceStart are refused.
    assert_204(
        &mut c,
        "PUT",
        "/boot-source",
        &boot_source("tg.run=counter"),
    );
    assert_204(
        &mut c,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    let running = send(&mut c, "GET", "/vm/config", None);
    for (method, path, body, needle) in [
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
            "before the microVM starts",
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/bin/true"}"#,
            "before the microVM starts",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
            "already running",
        ),
        ("PATCH", "/vm", r#"{"state": "Sleeping"}"#, "state"),
    ] {
        let r = send(&mut c, method, path, Some(body));
        assert_eq!(r.status, 400, "{method} {path}: {r:?}");
        assert!(
            r.json()["fault_message"].as_str().unwrap().contains(needle),
            "{r:?}"
        );
    }
    assert_eq!(send(&mut c, "GET", "/vm/config", None).body, running.body);
    // The API thread survived all of it.
    assert_eq!(send(&mut c, "GET", "/", None).json()["state"], "Running");
}

#[test]
fn a_socket_in_use_is_refused_and_a_stale_one_replaced() {
    if !kvm_available("a_socket_in_use_is_refused_and_a_stale_one_replaced") {
        return;
    }
    let dir = TempDir::new("api-sock");
    let sock = dir.path("api.sock");
    let mut first = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let _ = first.client();
    let mut second = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    assert_eq!(second.wait_exit(), 1);
    assert!(second.output().contains("in use"), "{}", second.output());
    // SIGKILL leaves the socket file behind: the next VMM replaces it.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(sock.exists());
    let third = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = third.client();
    assert_eq!(
        send(&mut c, "GET", "/", None).json()["state"],
        "Not started"
    );
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn a_drive_is_swapped_while_the_guest_runs() {
    if !kvm_available("a_drive_is_swapped_while_the_guest_runs") {
        return;
    }
    let dir = TempDir::new("api-swap");
    let sock = dir.path("api.sock");
    let first = dir.path("first.img");
    let second = dir.path("second.img");
    std::fs::write(&first, vec![0u8; 1 << 20]).unwrap();
    let new_disk: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&second, &new_disk).unwrap();
    let vmm = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    assert_204(
        &mut c,
        "PUT",
        "/boot-source",
        &boot_source("tg.run=blk tg.blk_watch_ms=15000"),
    );
    let drive = serde_json::json!({
        "drive_id": "data", "path_on_host": first, "is_root_device": false, "is_read_only": false,
    });
    assert_204(&mut c, "PUT", "/drives/data", &drive.to_string());
    assert_204(
        &mut c,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    vmm.wait_for("the blk workload to watch", |out| {
        out.contains("TG blk_watching")
    });

    // Bad patches change nothing.
    let before = send(&mut c, "GET", "/vm/config", None).body;
    for (path, body, needle) in [
        (
            "/drives/data",
            r#"{"drive_id": "data", "path_on_host": "/nonexistent.img"}"#,
            "path_on_host",
        ),
        (
            "/drives/other",
            r#"{"drive_id": "other", "path_on_host": "/dev/null"}"#,
            "no drive",
        ),
        ("/drives/data", r#"{"drive_id": "x"}"#, "drive_id"),
        (
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0"}"#,
            "no network interface",
        ),
    ] {
        let r = send(&mut c, "PATCH", path, Some(body));
        assert_eq!(r.status, 400, "{path}: {r:?}");
        assert!(
            r.json()["fault_message"].as_str().unwrap().contains(needle),
            "{r:?}"
        );
    }
    assert_eq!(send(&mut c, "GET", "/vm/config", None).body, before);

    let patch = serde_json::json!({
        "drive_id": "data",
        "path_on_host": second,
        "rate_limiter": {"ops": {"size": 1000, "refill_time": 100}},
    });
    assert_204(&mut c, "PATCH", "/drives/data", &patch.to_string());
    let config = send(&mut c, "GET", "/vm/config", None).json();
    assert_eq!(
        config["drives"][0]["path_on_host"],
        second.to_str().unwrap()
    );
    assert_eq!(config["drives"][0]["rate_limiter"]["ops"]["size"], 1000);
    let mut vmm = vmm;
    assert_eq!(vmm.wait_exit(), 0, "{}", vmm.output());
    let tg: std::collections::BTreeMap<String, String> =
        common::tg_lines(&vmm.console()).into_iter().collect();
    assert_eq!(tg["blk_capacity_changed"], "4096");
    assert_eq!(tg["blk_config_irq"], "1");
    assert_eq!(
        tg["blk_new_sum"],
        format!("{:016x}", fnv1a(&new_disk[..512]))
    );
    // The first image was left as the guest wrote it; the second is untouched.
    assert_eq!(std::fs::read(&second).unwrap(), new_disk);
}
