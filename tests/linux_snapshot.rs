//! The Linux lane of snapshots: the shared Linux guest, counting, checking a checksummed
//! buffer in its memory, reading back a disk it wrote, pinging the host through a tap and
//! reaching a host service over vsock, is paused, snapshotted, killed and loaded in a new
//! process; it goes on counting from where it stopped, its buffer and disk intact, its network
//! and vsock working and its clock sane. Skips (loudly) where KVM cannot run Linux; `.ci/run`
//! runs it inside the L1 machine.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::api_vmm::{ok, start_linux, ApiVmm};
use common::{linux_capable, linux_guest_dir, SockDir};

/// The guest's `tick=N sum=S epoch=E disk=D net=ok|fail vsock=1|0` lines, as key-value maps.
fn ticks(vmm: &ApiVmm) -> Vec<std::collections::BTreeMap<String, String>> {
    vmm.console()
        .lines()
        .filter(|l| l.starts_with("tick="))
        .map(|l| {
            l.trim_end_matches('\r')
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .filter(|m: &std::collections::BTreeMap<String, String>| m.len() == 6)
        .collect()
}

fn num(m: &std::collections::BTreeMap<String, String>, key: &str) -> u64 {
    m[key].parse().unwrap()
}

#[test]
fn linux_continues_after_a_snapshot_is_loaded_in_a_new_process() {
    if !linux_capable("linux_continues_after_a_snapshot_is_loaded_in_a_new_process") {
        return;
    }
    let dir = linux_guest_dir();
    let work = SockDir::new("linux-snap");
    // The VMM runs in a network namespace with a tap at 10.0.0.1; the guest has a data disk.
    let ns = common::netns::NetNs::new();
    let prefix = ["ip", "netns", "exec", ns.name.as_str()];
    let disk = work.path.join("data.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    // A host service on vsock port 5005 echoing every connection, for the guest's client.
    let tmp = common::TempDir::new("linux-snap-vsock");
    let initrd = common::vsock_guest::initramfs_with_vsock_client(&tmp);
    let vsock = work.path.join("v.sock");
    let listener =
        std::os::unix::net::UnixListener::bind(format!("{}_5005", vsock.display())).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut got = Vec::new();
            if std::io::Read::read_to_end(&mut stream, &mut got).is_ok() {
                let _ = std::io::Write::write_all(&mut stream, b"echo:");
                let _ = std::io::Write::write_all(&mut stream, &got);
            }
        }
    });
    let sock = work.path.join("source.sock");
    let vmm = ApiVmm::spawn_with(&prefix, None, &["--api-sock", sock.to_str().unwrap()]);
    let mut c = vmm.client();
    ok(
        &mut c,
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256}),
    );
    ok(
        &mut c,
        "PUT",
        "/drives/data",
        serde_json::json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false, "is_read_only": false}),
    );
    ok(
        &mut c,
        "PUT",
        "/network-interfaces/eth0",
        serde_json::json!({"iface_id": "eth0", "host_dev_name": ns.tap}),
    );
    ok(
        &mut c,
        "PUT",
        "/vsock",
        serde_json::json!({"guest_cid": 7, "uds_path": vsock}),
    );
    // 8 MiB of random data in tmpfs (guest memory) and 1 MiB written to the disk; every tick
    // prints the buffer's checksum, the disk's read back past the page cache, and whether the
    // host answers a ping.
    let cmd = "ip addr add 10.0.0.2/24 dev eth0; ip link set eth0 up; \
               head -c 8388608 /dev/urandom > /tmp/buf; head -c 1048576 /dev/urandom > /tmp/d; \
               dd if=/tmp/d of=/dev/vda bs=1048576 count=1 conv=fsync 2>/dev/null; \
               echo dsum=$(md5sum < /tmp/d | cut -c1-32); i=0; while true; do i=$((i+1)); \
               echo 3 > /proc/sys/vm/drop_caches; \
               echo tick=$i sum=$(md5sum < /tmp/buf | cut -c1-32) epoch=$(date +%s) \
               disk=$(dd if=/dev/vda bs=1048576 count=1 2>/dev/null | md5sum | cut -c1-32) \
               net=$(ping -c1 -W2 10.0.0.1 >/dev/null 2>&1 && echo ok || echo fail) \
               vsock=$(/bin/vsock-client 5005 t$i | grep -c vsock-reply=echo:t$i); sleep 0.3; done";
    start_linux(&mut c, &dir.join("vmlinux"), &initrd, cmd);
    vmm.wait_for_within("ticks", Duration::from_secs(300), |_| {
        ticks(&vmm).len() >= 3
    });
    let r = c
        .request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#))
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    let (state, mem) = (work.path.join("vm.snap"), work.path.join("vm.mem"));
    ok(
        &mut c,
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_path": state, "mem_file_path": mem}),
    );
    let before = ticks(&vmm);
    let last = num(before.last().unwrap(), "tick");
    let sum = before.last().unwrap()["sum"].clone();
    let dsum = vmm
        .console()
        .lines()
        .find_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix("dsum=")
                .map(str::to_string)
        })
        .unwrap();
    assert!(
        before
            .iter()
            .all(|t| t["disk"] == dsum && t["net"] == "ok" && t["vsock"] == "1"),
        "disk, network or vsock wrong before the snapshot: {before:?}\n{}",
        vmm.output()
    );
    drop(vmm);
    std::thread::sleep(Duration::from_secs(2));

    // Disks and taps are reopened by path and name.
    let sock = work.path.join("restored.sock");
    let restored = ApiVmm::spawn_with(&prefix, None, &["--api-sock", sock.to_str().unwrap()]);
    let mut c = restored.client();
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
    restored.wait_for_within("ticks after the restore", Duration::from_secs(120), |_| {
        ticks(&restored).len() >= 3
    });
    let after = ticks(&restored);
    assert_eq!(
        num(&after[0], "tick"),
        last + 1,
        "the guest must continue from tick {last}, not restart: {after:?}\n{}",
        restored.output()
    );
    assert!(
        after.iter().all(|t| t["sum"] == sum),
        "the buffer in guest memory changed: {sum} before, {after:?} after"
    );
    assert!(
        after.iter().all(|t| t["disk"] == dsum),
        "the disk reads differently after the restore: {dsum} written, {after:?}"
    );
    // A ping or vsock connection in flight across the move may be lost (vsock connections
    // are reset, as Firecracker does); the ones after it work.
    assert_eq!(
        after.last().unwrap()["net"],
        "ok",
        "the network does not work after the restore: {after:?}"
    );
    assert_eq!(
        after.last().unwrap()["vsock"],
        "1",
        "vsock does not work after the restore: {after:?}\n{}",
        restored.output()
    );
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let guest = num(after.last().unwrap(), "epoch");
    assert!(
        host.abs_diff(guest) < 120,
        "guest clock {guest} is far from the host's {host}"
    );
    assert_eq!(
        c.request("GET", "/", None).unwrap().json()["state"],
        "Running"
    );
}
