//! Metrics from a running VMM: the Firecracker-style JSON line written when the VM stops
//! (`anvil-vmm boot --metrics-path`), and through the API `PUT /metrics`, `FlushMetrics` and
//! `GET /metrics/prometheus`, with the test guest doing real work.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{anvil_vmm, boot_testguest, kvm_available, testguest, TempDir};
use serde_json::Value;

const MIB: u64 = 1024 * 1024;

/// The JSON lines in `path`, each checked to be one object starting with the timestamp.
fn metric_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            assert!(line.starts_with("{\"utc_timestamp_ms\":"), "{line}");
            serde_json::from_str(line).unwrap()
        })
        .collect()
}

fn count(v: &Value, group: &str, field: &str) -> u64 {
    v[group][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {group}.{field} in {v}"))
}

/// The blk workload writes the whole disk and reads it back: the line written when the VM
/// stops counts those requests and bytes for the drive, and the vCPU exits and console bytes
/// that went with them.
#[test]
fn blk_workload_counts_reach_the_metrics_file() {
    if !kvm_available("blk_workload_counts_reach_the_metrics_file") {
        return;
    }
    let dir = TempDir::new("metrics-blk");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let metrics = dir.path("metrics.json");
    std::fs::write(&metrics, b"").unwrap();
    let spec = format!("path={},id=data", disk.display());
    let run = boot_testguest(
        "tg.run=blk tg.seed=4",
        &["--disk", &spec, "--metrics-path", metrics.to_str().unwrap()],
    );
    run.assert_pass();
    let lines = metric_lines(&metrics);
    assert_eq!(lines.len(), 1, "one line, at exit: {lines:?}");
    let line = &lines[0];
    assert!(count(line, "block_data", "write_count") > 0, "{line}");
    assert!(count(line, "block_data", "read_count") > 0, "{line}");
    assert!(count(line, "block_data", "write_bytes") >= MIB, "{line}");
    assert!(count(line, "block_data", "read_bytes") >= MIB, "{line}");
    assert_eq!(count(line, "block_data", "execute_fails"), 0, "{line}");
    assert_eq!(
        count(line, "block", "write_bytes"),
        count(line, "block_data", "write_bytes"),
        "the block group sums the one drive"
    );
    assert!(count(line, "vcpu", "exit_mmio_write") > 0, "{line}");
    assert!(count(line, "vcpu", "exit_io_out") > 0, "{line}");
    assert!(count(line, "uart", "write_count") > 0, "{line}");
    assert_eq!(count(line, "i8042", "reset_count"), 1, "{line}");
}

/// The hello workload signals boot completion on port 0x3f0: the boot time is recorded.
#[test]
fn boot_time_is_recorded() {
    if !kvm_available("boot_time_is_recorded") {
        return;
    }
    let dir = TempDir::new("metrics-boot");
    let metrics = dir.path("metrics.json");
    std::fs::write(&metrics, b"").unwrap();
    let run = boot_testguest(
        "tg.run=hello",
        &["--rng", "--metrics-path", metrics.to_str().unwrap()],
    );
    run.assert_pass();
    let line = &metric_lines(&metrics)[0];
    let boot_us = count(line, "latencies_us", "guest_boot_time");
    assert!(boot_us > 0 && boot_us < 60_000_000, "{line}");
    assert!(line["entropy"].is_object(), "{line}");
    assert!(line["vsock"].is_null(), "{line}");
    // A metrics path that does not exist is an error before boot, as in Firecracker.
    let run = boot_testguest(
        "tg.run=hello",
        &["--metrics-path", dir.path("absent").to_str().unwrap()],
    );
    assert_eq!(run.status.code(), Some(1), "{run}");
    assert!(run.stderr.contains("metrics"), "{run}");
}

/// Through the API: PUT /metrics before boot, FlushMetrics while the guest runs writes a line
/// with the API's own counters, and GET /metrics/prometheus gives cumulative counters.
#[test]
fn api_flushes_metrics_and_serves_prometheus_text() {
    if !kvm_available("api_flushes_metrics_and_serves_prometheus_text") {
        return;
    }
    let dir = TempDir::new("metrics-api");
    let sock = dir.path("api.sock");
    let metrics = dir.path("metrics.json");
    std::fs::write(&metrics, b"").unwrap();
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
        (r.status, r.body.clone())
    };
    let metrics_body = serde_json::json!({ "metrics_path": metrics }).to_string();
    assert_eq!(call("PUT", "/metrics", Some(metrics_body.clone())).0, 204);
    // A second PUT /metrics is refused, as in Firecracker.
    assert_eq!(call("PUT", "/metrics", Some(metrics_body)).0, 400);
    let boot = serde_json::json!({
        "kernel_image_path": testguest(),
        "boot_args": "console=ttyS0 tg.run=counter tg.period_ms=10",
    });
    assert_eq!(call("PUT", "/boot-source", Some(boot.to_string())).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#.to_string();
    assert_eq!(call("PUT", "/actions", Some(start)).0, 204);
    // Let the guest print a few counts (port writes to COM1).
    std::thread::sleep(Duration::from_millis(300));
    let flush = r#"{"action_type": "FlushMetrics"}"#.to_string();
    assert_eq!(call("PUT", "/actions", Some(flush.clone())).0, 204);
    assert_eq!(call("PUT", "/actions", Some(flush)).0, 204);
    let (status, text) = call("GET", "/metrics/prometheus", None);
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    assert!(alive, "anvil-vmm died\n{stderr}");
    assert_eq!(status, 200, "{text}");

    let lines = metric_lines(&metrics);
    assert_eq!(lines.len(), 2, "{lines:?}\n{stderr}");
    let first = &lines[0];
    assert!(count(first, "vcpu", "exit_io_out") > 0, "{first}");
    assert!(
        count(first, "put_api_requests", "metrics_count") >= 2,
        "{first}"
    );
    assert!(
        count(first, "put_api_requests", "metrics_fails") >= 1,
        "{first}"
    );
    assert!(
        count(first, "put_api_requests", "actions_count") >= 1,
        "{first}"
    );
    // The second line holds only what happened since the first.
    assert_eq!(count(&lines[1], "put_api_requests", "metrics_count"), 0);

    assert!(
        text.contains("# TYPE anvil_vcpu_exit_io_out_total counter"),
        "{text}"
    );
    let exits: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("anvil_vcpu_exit_io_out_total{vcpu=\"0\"} "))
        .unwrap_or_else(|| panic!("{text}"))
        .parse()
        .unwrap();
    assert!(
        exits >= count(first, "vcpu", "exit_io_out"),
        "Prometheus totals are cumulative"
    );
    assert!(
        text.contains("anvil_api_requests_total{method=\"PUT\",family=\"actions\"}"),
        "{text}"
    );
}
