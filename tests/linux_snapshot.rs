//! The Linux lane of snapshots: the shared Linux guest, counting and checking a checksummed
//! buffer in its memory, is paused, snapshotted, killed and loaded in a new process; it goes
//! on counting from where it stopped, its buffer intact and its clock sane. Skips (loudly)
//! where KVM cannot run Linux; `.ci/run` runs it inside the L1 machine.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::api_vmm::ApiVmm;
use common::{linux_capable, linux_guest_dir, SockDir};

fn put(c: &mut api_server::client::Client, path: &str, body: serde_json::Value) {
    let r = c.request("PUT", path, Some(&body.to_string())).unwrap();
    assert_eq!(r.status, 204, "PUT {path}: {r:?}");
}

/// The guest's `tick=N sum=S epoch=E` lines.
fn ticks(vmm: &ApiVmm) -> Vec<(u64, String, u64)> {
    vmm.console()
        .lines()
        .filter_map(|l| {
            let mut it = l.trim_end_matches('\r').split_whitespace();
            let n = it.next()?.strip_prefix("tick=")?.parse().ok()?;
            let sum = it.next()?.strip_prefix("sum=")?.to_string();
            let epoch = it.next()?.strip_prefix("epoch=")?.parse().ok()?;
            Some((n, sum, epoch))
        })
        .collect()
}

#[test]
fn linux_continues_after_a_snapshot_is_loaded_in_a_new_process() {
    if !linux_capable("linux_continues_after_a_snapshot_is_loaded_in_a_new_process") {
        return;
    }
    let dir = linux_guest_dir();
    let work = SockDir::new("linux-snap");
    let sock = work.path.join("source.sock");
    let vmm = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    put(
        &mut c,
        "/machine-config",
        serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256}),
    );
    // 8 MiB of random data in tmpfs (guest memory), its checksum printed with every tick.
    let cmd = "head -c 8388608 /dev/urandom > /tmp/buf; i=0; while true; do i=$((i+1)); \
               echo tick=$i sum=$(md5sum < /tmp/buf | cut -c1-32) epoch=$(date +%s); sleep 0.3; done";
    put(
        &mut c,
        "/boot-source",
        serde_json::json!({
            "kernel_image_path": dir.join("vmlinux"),
            "initrd_path": dir.join("initramfs.cpio.gz"),
            "boot_args": format!("console=ttyS0 reboot=k panic=-1 quiet anvil_cmd=\"{cmd}\""),
        }),
    );
    put(
        &mut c,
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    vmm.wait_for_within("ticks", Duration::from_secs(300), |_| {
        ticks(&vmm).len() >= 3
    });
    let r = c
        .request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#))
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    let (state, mem) = (work.path.join("vm.snap"), work.path.join("vm.mem"));
    put(
        &mut c,
        "/snapshot/create",
        serde_json::json!({"snapshot_path": state, "mem_file_path": mem}),
    );
    let before = ticks(&vmm);
    let (last, sum, _) = before.last().unwrap().clone();
    drop(vmm);
    std::thread::sleep(Duration::from_secs(2));

    let sock = work.path.join("restored.sock");
    let restored = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let mut c = restored.client();
    put(
        &mut c,
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true,
        }),
    );
    restored.wait_for_within("ticks after the restore", Duration::from_secs(120), |_| {
        ticks(&restored).len() >= 3
    });
    let after = ticks(&restored);
    assert_eq!(
        after[0].0,
        last + 1,
        "the guest must continue from tick {last}, not restart: {after:?}\n{}",
        restored.output()
    );
    assert!(
        after.iter().all(|(_, s, _)| *s == sum),
        "the buffer in guest memory changed: {sum} before, {after:?} after"
    );
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let guest = after.last().unwrap().2;
    assert!(
        host.abs_diff(guest) < 120,
        "guest clock {guest} is far from the host's {host}"
    );
    assert_eq!(
        c.request("GET", "/", None).unwrap().json()["state"],
        "Running"
    );
}
