//! Snapshots through the API with the test guest: pause, snapshot, kill the VMM, load in a
//! new process, resume; the guest continues where it stopped with its memory intact. Clones
//! from one snapshot run side by side, and damaged snapshot files are refused clearly.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::Path;

use api_server::client::Client;
use common::api_vmm::ApiVmm;
use common::{kvm_available, testguest, TempDir};

fn ok(c: &mut Client, method: &str, path: &str, body: serde_json::Value) {
    let r = c.request(method, path, Some(&body.to_string())).unwrap();
    assert_eq!(r.status, 204, "{method} {path}: {r:?}");
}

/// Boots the test guest over the API with `cmdline`, waits for `ready` on its console.
fn boot(dir: &TempDir, name: &str, cmdline: &str, ready: &str) -> (ApiVmm, Client) {
    let sock = dir.path(&format!("{name}.sock"));
    let vmm = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    ok(
        &mut c,
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 2, "mem_size_mib": 64}),
    );
    ok(
        &mut c,
        "PUT",
        "/boot-source",
        serde_json::json!({"kernel_image_path": testguest(), "boot_args": format!("console=ttyS0 {cmdline}")}),
    );
    ok(
        &mut c,
        "PUT",
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    vmm.wait_for(ready, |out| out.contains(ready));
    (vmm, c)
}

/// Pauses the VM and writes `state` and `mem`.
fn snapshot(c: &mut Client, state: &Path, mem: &Path) {
    ok(c, "PATCH", "/vm", serde_json::json!({"state": "Paused"}));
    ok(
        c,
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem}),
    );
}

/// A fresh VMM that loads the snapshot and resumes it.
fn load(dir: &TempDir, name: &str, state: &Path, mem: &Path) -> (ApiVmm, Client) {
    let sock = dir.path(&format!("{name}.sock"));
    let vmm = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    ok(
        &mut c,
        "PUT",
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true,
        }),
    );
    (vmm, c)
}

fn counts(vmm: &ApiVmm) -> Vec<u64> {
    common::tg_lines(&vmm.console())
        .into_iter()
        .filter(|(k, _)| k == "count")
        .filter_map(|(_, v)| v.parse().ok())
        .collect()
}

#[test]
fn a_restored_guest_continues_where_it_stopped() {
    if !kvm_available("a_restored_guest_continues_where_it_stopped") {
        return;
    }
    let dir = TempDir::new("snap-counter");
    let (state, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let (vmm, mut c) = boot(
        &dir,
        "source",
        "tg.run=counter tg.period_ms=20",
        "TG count=10",
    );
    // A running VM cannot be snapshotted.
    let r = c
        .request(
            "PUT",
            "/snapshot/create",
            Some(&serde_json::json!({"snapshot_path": state, "mem_file_path": mem}).to_string()),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("paused"), "{r:?}");
    snapshot(&mut c, &state, &mem);
    let last = *counts(&vmm).last().unwrap();
    drop(vmm);

    // The memory file is sparse: a 64 MiB guest that touched little holds little.
    let meta = std::fs::metadata(&mem).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    assert!(allocated < 16 << 20, "memory file uses {allocated} bytes");

    let (restored, mut c2) = load(&dir, "restored", &state, &mem);
    restored.wait_for("the counter after the restore", |_| {
        counts(&restored).len() >= 5
    });
    let after = counts(&restored);
    assert_eq!(
        after[0],
        last + 1,
        "the counter must continue from {last}, not restart: {after:?}"
    );
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:?}");
    let info = c2.request("GET", "/", None).unwrap().json();
    assert_eq!(info["state"], "Running");
    let config = c2.request("GET", "/vm/config", None).unwrap().json();
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
}

#[test]
fn memory_survives_a_snapshot_and_clones_run_side_by_side() {
    if !kvm_available("memory_survives_a_snapshot_and_clones_run_side_by_side") {
        return;
    }
    let dir = TempDir::new("snap-memtest");
    let (state, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    // 30 rounds of 64 dirtied pages at 640 pages/s: about 3 s, snapshotted after round 5.
    let (vmm, mut c) = boot(
        &dir,
        "source",
        "tg.run=memtest tg.rounds=30 tg.dirty_pages=64 tg.dirty_rate=640 tg.mem_limit_mib=24",
        "TG round=5 ",
    );
    snapshot(&mut c, &state, &mem);
    drop(vmm);
    let a = load(&dir, "clone-a", &state, &mem);
    let b = load(&dir, "clone-b", &state, &mem);
    for (mut clone, _) in [a, b] {
        assert_eq!(clone.wait_exit(), 0, "{}", clone.output());
        let out = clone.console();
        assert!(out.contains("TG round=30 "), "{out}");
        assert!(
            out.contains("TG verify=ok"),
            "the restored memory must verify\n{out}"
        );
        assert!(
            !out.contains("TG round=1 "),
            "the clone must not restart\n{out}"
        );
    }
}

#[test]
fn damaged_snapshot_files_are_refused_clearly() {
    if !kvm_available("damaged_snapshot_files_are_refused_clearly") {
        return;
    }
    let dir = TempDir::new("snap-bad");
    let (state, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let (vmm, mut c) = boot(
        &dir,
        "source",
        "tg.run=counter tg.period_ms=20",
        "TG count=3",
    );
    snapshot(&mut c, &state, &mem);
    drop(vmm);
    let good = std::fs::read(&state).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x55;
    let mut version = good.clone();
    version[8] = 99;
    let mut huge = good.clone();
    huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("corrupted", flipped, "checksum"),
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        ("version", version, "version 99"),
        (
            "magic",
            b"not a snapshot at all, just text".to_vec(),
            "not an anvil snapshot",
        ),
        ("length", huge, "larger than the limit"),
        ("empty", Vec::new(), "truncated"),
    ];
    let sock = dir.path("target.sock");
    let target = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = target.client();
    for (name, bytes, needle) in cases {
        let path = dir.path(&format!("{name}.snap"));
        std::fs::write(&path, bytes).unwrap();
        let r = c
            .request(
                "PUT",
                "/snapshot/load",
                Some(
                    &serde_json::json!({"snapshot_path": path, "mem_backend": {"backend_type": "File", "backend_path": mem}})
                        .to_string(),
                ),
            )
            .unwrap();
        assert_eq!(r.status, 400, "{name}: {r:?}");
        let message = r.json()["fault_message"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{name}: {message}");
        assert_eq!(
            c.request("GET", "/", None).unwrap().json()["state"],
            "Not started",
            "{name}"
        );
    }
    // A memory file too short for the state.
    let short = dir.path("short.mem");
    std::fs::write(&short, vec![0u8; 4096]).unwrap();
    let r = c
        .request(
            "PUT",
            "/snapshot/load",
            Some(&serde_json::json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": short}}).to_string()),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("the snapshot needs"), "{r:?}");
    // The good one still loads in this same VMM afterwards.
    ok(
        &mut c,
        "PUT",
        "/snapshot/load",
        serde_json::json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": true}),
    );
    target.wait_for("the counter", |_| !counts(&target).is_empty());
}
