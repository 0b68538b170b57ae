//! Snapshots through the API with the test guest: pause, snapshot, kill the VMM, load in a
//! new process, resume; the guest continues where it stopped with its memory intact. Clones
//! from one snapshot run side by side, and damaged snapshot files are refused clearly.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::Path;

use api_server::client::Client;
use common::api_vmm::{ok, ApiVmm};
use common::{kvm_available, testguest, TempDir};

/// Sets the test guest with `cmdline` (after `console=ttyS0`) as the boot source and starts it.
fn start_guest(c: &mut Client, cmdline: &str) {
    ok(
        c,
        "PUT",
        "/boot-source",
        serde_json::json!({"kernel_image_path": testguest(), "boot_args": format!("console=ttyS0 {cmdline}")}),
    );
    ok(
        c,
        "PUT",
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
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
    start_guest(&mut c, cmdline);
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
    resume_from(&mut c, state, mem);
    (vmm, c)
}

/// Loads the snapshot (File backend) into the fresh VMM behind `c` and resumes it.
fn resume_from(c: &mut Client, state: &Path, mem: &Path) {
    ok(
        c,
        "PUT",
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true,
        }),
    );
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
    // The pause may have stopped the guest half-way through a line; the restored guest
    // finishes it.
    let before = vmm.console_all();
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
    assert!(
        after[0] == last + 1 || (after[0] == last + 2 && !before.ends_with('\n')),
        "the counter must continue from {last}, not restart: {after:?}"
    );
    let joined: Vec<u64> = common::tg_lines(&(before + &restored.console()))
        .into_iter()
        .filter(|(k, _)| k == "count")
        .filter_map(|(_, v)| v.parse().ok())
        .collect();
    assert!(
        joined.windows(2).all(|w| w[1] == w[0] + 1),
        "the console before and after the restore must be one sequence: {joined:?}"
    );
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
    // 20 rounds of 64 dirtied pages at 640 pages/s: about 2 s, snapshotted after round 5.
    let (vmm, mut c) = boot(
        &dir,
        "source",
        "tg.run=memtest tg.rounds=20 tg.dirty_pages=64 tg.dirty_rate=640 tg.mem_limit_mib=24",
        "TG round=5 ",
    );
    snapshot(&mut c, &state, &mem);
    drop(vmm);
    let a = load(&dir, "clone-a", &state, &mem);
    let b = load(&dir, "clone-b", &state, &mem);
    for (mut clone, _) in [a, b] {
        assert_eq!(
            clone.wait_exit_within(std::time::Duration::from_secs(90)),
            0,
            "{}",
            clone.output()
        );
        let out = clone.console();
        assert!(out.contains("TG round=20 "), "{out}");
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
    resume_from(&mut c, &state, &mem);
    target.wait_for("the counter", |_| !counts(&target).is_empty());
}

fn allocated(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap()) * 512
}

#[test]
fn a_diff_snapshot_merged_onto_its_base_equals_a_full_one() {
    if !kvm_available("a_diff_snapshot_merged_onto_its_base_equals_a_full_one") {
        return;
    }
    let dir = TempDir::new("snap-diff");
    let sock = dir.path("source.sock");
    let vmm = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    ok(
        &mut c,
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}),
    );
    start_guest(
        &mut c,
        "tg.run=memtest tg.rounds=40 tg.dirty_pages=16 tg.dirty_rate=320 tg.mem_limit_mib=24",
    );
    vmm.wait_for("round 3", |out| out.contains("TG round=3 "));
    let (base_state, base_mem) = (dir.path("base.snap"), dir.path("base.mem"));
    snapshot(&mut c, &base_state, &base_mem);
    ok(
        &mut c,
        "PATCH",
        "/vm",
        serde_json::json!({"state": "Resumed"}),
    );
    vmm.wait_for("round 6", |out| out.contains("TG round=6 "));
    ok(
        &mut c,
        "PATCH",
        "/vm",
        serde_json::json!({"state": "Paused"}),
    );
    let (diff_state, diff_mem) = (dir.path("diff.snap"), dir.path("diff.mem"));
    ok(
        &mut c,
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_type": "Diff", "snapshot_path": diff_state, "mem_file_path": diff_mem}),
    );
    // A full snapshot of the very same moment, to compare with.
    let (full_state, full_mem) = (dir.path("full.snap"), dir.path("full.mem"));
    ok(
        &mut c,
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": full_state, "mem_file_path": full_mem}),
    );
    drop(vmm);

    // The diff holds a few rounds of dirtied pages, far less than the full file.
    assert!(
        allocated(&diff_mem) * 4 < allocated(&full_mem),
        "diff {} bytes vs full {} bytes",
        allocated(&diff_mem),
        allocated(&full_mem)
    );
    let merged = dir.path("merged.mem");
    std::fs::copy(&base_mem, &merged).unwrap();
    let status = std::process::Command::new(common::anvil_vmm())
        .args(["snapshot", "merge"])
        .arg(&merged)
        .arg(&diff_mem)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        std::fs::read(&merged).unwrap() == std::fs::read(&full_mem).unwrap(),
        "base + diff must equal the full snapshot's memory"
    );
    // And it runs: the guest finishes its rounds and verifies all of memory.
    let (mut restored, _c) = load(&dir, "restored", &diff_state, &merged);
    assert_eq!(
        restored.wait_exit_within(std::time::Duration::from_secs(90)),
        0,
        "{}",
        restored.output()
    );
    let out = restored.console();
    assert!(out.contains("TG verify=ok"), "{out}");
    assert!(!out.contains("TG round=1 "), "{out}");

    // A diff without dirty page tracking is refused.
    let sock = dir.path("plain.sock");
    let plain = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = plain.client();
    start_guest(&mut c, "tg.run=counter");
    ok(
        &mut c,
        "PATCH",
        "/vm",
        serde_json::json!({"state": "Paused"}),
    );
    let r = c
        .request(
            "PUT",
            "/snapshot/create",
            Some(&serde_json::json!({"snapshot_type": "Diff", "snapshot_path": dir.path("x.snap"), "mem_file_path": dir.path("x.mem")}).to_string()),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("track_dirty_pages"), "{r:?}");
}

#[test]
fn a_page_fault_handler_serves_the_restored_memory() {
    if !kvm_available("a_page_fault_handler_serves_the_restored_memory") {
        return;
    }
    let dir = TempDir::new("snap-uffd");
    let (state, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let (vmm, mut c) = boot(
        &dir,
        "source",
        "tg.run=memtest tg.rounds=12 tg.dirty_pages=64 tg.dirty_rate=640 tg.mem_limit_mib=24",
        "TG round=4 ",
    );
    snapshot(&mut c, &state, &mem);
    drop(vmm);
    let handler_sock = dir.path("uffd.sock");
    let handler = std::process::Command::new(env!("CARGO_BIN_EXE_anvil-uffd-handler"))
        .arg(&handler_sock)
        .arg(&mem)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !handler_sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the handler never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let sock = dir.path("restored.sock");
    let mut restored = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = restored.client();
    ok(
        &mut c,
        "PUT",
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "Uffd", "backend_path": handler_sock},
            "resume_vm": true,
        }),
    );
    assert_eq!(
        restored.wait_exit_within(std::time::Duration::from_secs(90)),
        0,
        "{}",
        restored.output()
    );
    let out = restored.console();
    assert!(
        out.contains("TG round=12 ") && out.contains("TG verify=ok"),
        "{out}"
    );
    assert!(!out.contains("TG round=1 "), "{out}");
    // The handler saw the VMM go and reports the pages it filled.
    let output = handler.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    let pages: u64 = text
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        pages > 1000,
        "the handler must have filled the tested memory: {text}"
    );
}

#[test]
fn a_disk_keeps_working_after_a_restore() {
    if !kvm_available("a_disk_keeps_working_after_a_restore") {
        return;
    }
    let dir = TempDir::new("snap-blk");
    let (state, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let (first, second) = (dir.path("first.img"), dir.path("second.img"));
    std::fs::write(&first, vec![0u8; 1 << 20]).unwrap();
    let new_disk: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&second, &new_disk).unwrap();
    let sock = dir.path("source.sock");
    let vmm = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    ok(&mut c, "PUT", "/entropy", serde_json::json!({}));
    ok(
        &mut c,
        "PUT",
        "/drives/data",
        serde_json::json!({"drive_id": "data", "path_on_host": first, "is_root_device": false, "is_read_only": false}),
    );
    start_guest(&mut c, "tg.run=blk tg.blk_watch_ms=60000");
    vmm.wait_for("the blk workload to watch", |out| {
        out.contains("TG blk_watching")
    });
    snapshot(&mut c, &state, &mem);
    drop(vmm);

    // The restored VM reopens the disk by path; its queue goes on where it stopped: the
    // guest sees the swap and reads the new disk through the restored queue.
    let (mut restored, mut c) = load(&dir, "restored", &state, &mem);
    let patch = serde_json::json!({"drive_id": "data", "path_on_host": second});
    ok(&mut c, "PATCH", "/drives/data", patch);
    assert_eq!(
        restored.wait_exit_within(std::time::Duration::from_secs(60)),
        0,
        "{}",
        restored.output()
    );
    let tg: std::collections::BTreeMap<String, String> =
        common::tg_lines(&restored.console()).into_iter().collect();
    assert_eq!(tg["blk_capacity_changed"], "4096");
    assert_eq!(tg["blk_config_irq"], "1");
    let sum = new_disk[..512]
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    assert_eq!(tg["blk_new_sum"], format!("{sum:016x}"));

    // A snapshot whose disk is gone fails to load, clearly.
    std::fs::remove_file(&first).unwrap();
    let sock = dir.path("missing.sock");
    let target = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = target.client();
    let r = c
        .request(
            "PUT",
            "/snapshot/load",
            Some(&serde_json::json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}}).to_string()),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("cannot open disk image") && r.body.contains("first.img"),
        "{r:?}"
    );
}

#[test]
fn vsock_serves_a_host_connection_after_a_restore() {
    use std::io::{BufRead, BufReader, Read, Write};
    if !kvm_available("vsock_serves_a_host_connection_after_a_restore") {
        return;
    }
    let dir = TempDir::new("snap-vsock");
    let (state, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let uds = dir.path("v.sock");
    let sock = dir.path("source.sock");
    let vmm = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    ok(
        &mut c,
        "PUT",
        "/vsock",
        serde_json::json!({"guest_cid": 3, "uds_path": uds}),
    );
    start_guest(
        &mut c,
        "tg.run=vsock tg.vsock_listen=6000 tg.io_timeout_ms=60000",
    );
    // The guest has set the device up and waits for a connection.
    vmm.wait_for("the vsock device", |out| out.contains("TG vsock_cid=3"));
    std::thread::sleep(std::time::Duration::from_millis(200));
    snapshot(&mut c, &state, &mem);
    drop(vmm);

    let (mut restored, _c) = load(&dir, "restored", &state, &mem);
    // The restored VMM listens on the same path; the guest accepts through its restored queues.
    let stream = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match std::os::unix::net::UnixStream::connect(&uds) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "connect: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    };
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    writer.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}\n{}", restored.output());
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    writer.write_all(&data).unwrap();
    let mut echo = vec![0u8; data.len()];
    reader.read_exact(&mut echo).unwrap();
    assert_eq!(echo, data);
    drop(writer);
    drop(reader);
    assert_eq!(
        restored.wait_exit_within(std::time::Duration::from_secs(60)),
        0,
        "{}",
        restored.output()
    );
    let out = restored.console();
    assert!(out.contains("TG vsock_listen=ok bytes=8192"), "{out}");
}

#[test]
fn clones_each_use_their_own_disk_copy() {
    if !kvm_available("clones_each_use_their_own_disk_copy") {
        return;
    }
    let dir = TempDir::new("snap-clone-disks");
    let (state, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    // The drive's path is relative: each process opens the disk.img of its own directory.
    let source_dir = dir.path("source");
    std::fs::create_dir_all(&source_dir).unwrap();
    std::fs::write(source_dir.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path("source.sock");
    let vmm = ApiVmm::spawn_in(Some(&source_dir), &["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    ok(
        &mut c,
        "PUT",
        "/drives/data",
        serde_json::json!({"drive_id": "data", "path_on_host": "disk.img", "is_root_device": false, "is_read_only": false}),
    );
    start_guest(&mut c, "tg.run=blk tg.blk_watch_ms=60000");
    vmm.wait_for("the blk workload", |out| out.contains("TG blk_watching"));
    snapshot(&mut c, &state, &mem);
    drop(vmm);

    let mut clones = Vec::new();
    for (name, fill) in [("clone-a", 0x5au8), ("clone-b", 0xa5u8)] {
        let cdir = dir.path(name);
        std::fs::create_dir_all(&cdir).unwrap();
        std::fs::copy(source_dir.join("disk.img"), cdir.join("disk.img")).unwrap();
        std::fs::write(cdir.join("new.img"), vec![fill; 2 << 20]).unwrap();
        let sock = dir.path(&format!("{name}.sock"));
        let vmm = ApiVmm::spawn_in(Some(&cdir), &["--api-sock", sock.to_str().unwrap()]);
        let mut c = vmm.client();
        resume_from(&mut c, &state, &mem);
        clones.push((vmm, c, fill));
    }
    for (_, c, _) in &mut clones {
        ok(
            c,
            "PATCH",
            "/drives/data",
            serde_json::json!({"drive_id": "data", "path_on_host": "new.img"}),
        );
    }
    for (mut vmm, _, fill) in clones {
        assert_eq!(
            vmm.wait_exit_within(std::time::Duration::from_secs(60)),
            0,
            "{}",
            vmm.output()
        );
        let tg: std::collections::BTreeMap<String, String> =
            common::tg_lines(&vmm.console()).into_iter().collect();
        let sum = [fill; 512].iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        assert_eq!(tg["blk_new_sum"], format!("{sum:016x}"), "{}", vmm.output());
    }
}

#[test]
fn the_network_works_again_after_a_restore() {
    if !kvm_available("the_network_works_again_after_a_restore") {
        return;
    }
    let ns = common::netns::NetNs::new();
    let dir = TempDir::new("snap-net");
    let (state, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let prefix = ["ip", "netns", "exec", ns.name.as_str()];
    let sock = dir.path("source.sock");
    let vmm = ApiVmm::spawn_with(&prefix, None, &["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    ok(
        &mut c,
        "PUT",
        "/network-interfaces/eth0",
        serde_json::json!({"iface_id": "eth0", "host_dev_name": ns.tap, "guest_mac": "52:54:00:aa:bb:cd"}),
    );
    // 150 pings 20 ms apart (3 s); a reply lost while the VM moves is asked for again.
    start_guest(
        &mut c,
        "tg.run=net tg.pings=150 tg.ping_gap_ms=20 tg.retries=3 tg.io_timeout_ms=400",
    );
    vmm.wait_for("the guest to reach the host", |out| {
        out.contains("TG net_peer_mac=")
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    snapshot(&mut c, &state, &mem);
    drop(vmm);

    // The restored VMM reopens the tap by name; the guest's pings go on through it.
    let sock = dir.path("restored.sock");
    let mut restored = ApiVmm::spawn_with(&prefix, None, &["--api-sock", sock.to_str().unwrap()]);
    let mut c = restored.client();
    resume_from(&mut c, &state, &mem);
    assert_eq!(
        restored.wait_exit_within(std::time::Duration::from_secs(60)),
        0,
        "{}",
        restored.output()
    );
    let tg: std::collections::BTreeMap<String, String> =
        common::tg_lines(&restored.console()).into_iter().collect();
    assert_eq!(tg["net_replies"], "150", "{}", restored.output());
    assert_eq!(tg["net_pings"], "150");
}

#[test]
fn ctl_pauses_snapshots_and_loads() {
    if !kvm_available("ctl_pauses_snapshots_and_loads") {
        return;
    }
    let dir = TempDir::new("snap-ctl");
    let (state, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let ctl = |sock: &str, args: &[&str]| {
        let out = std::process::Command::new(common::anvil_vmm())
            .args(["ctl", "--api-sock"])
            .arg(dir.path(sock))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (vmm, _c) = boot(
        &dir,
        "source",
        "tg.run=counter tg.period_ms=20",
        "TG count=5",
    );
    ctl("source.sock", &["pause"]);
    let (s, m) = (state.to_str().unwrap(), mem.to_str().unwrap());
    ctl(
        "source.sock",
        &[
            "snapshot-create",
            "--snapshot-path",
            s,
            "--mem-file-path",
            m,
        ],
    );
    let last = *counts(&vmm).last().unwrap();
    drop(vmm);
    let sock = dir.path("loaded.sock");
    let loaded = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    drop(loaded.client());
    ctl(
        "loaded.sock",
        &[
            "snapshot-load",
            "--snapshot-path",
            s,
            "--mem-path",
            m,
            "--resume",
        ],
    );
    loaded.wait_for("the counter to go on", |out| {
        out.contains(&format!("TG count={}", last + 3))
    });
    assert_eq!(counts(&loaded)[0], last + 1);
}
