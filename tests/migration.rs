//! Live migration with the test guest: a running guest moves to a second anvil-vmm over a
//! Unix socket and over TCP between two network namespaces, and goes on where it was (its
//! counter continues, its memory checksum holds, its disk works); a destination that dies,
//! speaks another protocol version, lacks the memory or the disk leaves the guest running on the
//! source.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use api_server::client::Client;
use common::api_vmm::{ok, ApiVmm};
use common::{kvm_available, testguest, TempDir};

fn get(c: &mut Client, path: &str) -> serde_json::Value {
    let r = c.request("GET", path, None).unwrap();
    assert_eq!(r.status, 200, "GET {path}: {r:?}");
    serde_json::from_str(&r.body).unwrap()
}

/// Spawns a VMM (through `prefix`, e.g. `ip netns exec NS`) with its API socket in `dir`.
fn vmm(dir: &TempDir, prefix: &[&str], name: &str) -> (ApiVmm, Client) {
    let sock = dir.path(&format!("{name}.sock"));
    let vmm = ApiVmm::spawn_with(prefix, None, &["--api-sock", sock.to_str().unwrap()]);
    let c = vmm.client();
    (vmm, c)
}

/// Configures and starts the test guest with `cmdline`.
fn start_guest(c: &mut Client, mem_mib: u64, cmdline: &str) {
    ok(
        c,
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 2, "mem_size_mib": mem_mib}),
    );
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

fn send(c: &mut Client, url: &str, extra: serde_json::Value) -> api_server::client::Response {
    let mut body = serde_json::json!({ "destination_url": url });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    c.request("PUT", "/migration/send", Some(&body.to_string()))
        .unwrap()
}

fn receive(c: &mut Client, url: &str) {
    ok(
        c,
        "PUT",
        "/migration/receive",
        serde_json::json!({ "receiver_url": url }),
    );
}

fn counts(vmm: &ApiVmm) -> Vec<u64> {
    counts_in(&vmm.console())
}

fn counts_in(console: &str) -> Vec<u64> {
    common::tg_lines(console)
        .into_iter()
        .filter(|(k, _)| k == "count")
        .filter_map(|(_, v)| v.parse().ok())
        .collect()
}

/// memtest rounds (`TG round=N ...`) printed so far.
fn rounds(vmm: &ApiVmm) -> Vec<u64> {
    rounds_in(&vmm.console())
}

fn rounds_in(console: &str) -> Vec<u64> {
    common::tg_lines(console)
        .into_iter()
        .filter(|(k, _)| k == "round")
        .filter_map(|(_, v)| v.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The guest's whole console across a move: the source's, then the destination's (a line
/// the guest was printing when it stopped ends at the destination).
fn joined(source: &ApiVmm, dest: &ApiVmm) -> String {
    source.console_all() + &dest.console()
}

#[test]
fn a_guest_dirtying_memory_moves_over_a_unix_socket() {
    if !kvm_available("a_guest_dirtying_memory_moves_over_a_unix_socket") {
        return;
    }
    let dir = TempDir::new("mig-unix");
    let (mut source, mut sc) = vmm(&dir, &[], "source");
    // memtest fills 48 MiB with a pattern, then rewrites 64 pages every 100 ms (640 pages/s)
    // and checks everything at the end: a page lost or stale in the move fails it.
    start_guest(
        &mut sc,
        128,
        "tg.run=memtest tg.rounds=40 tg.dirty_pages=64 tg.dirty_rate=640 tg.mem_limit_mib=48",
    );
    source.wait_for("memtest's first rounds", |out| out.contains("TG round=3 "));
    let (mut dest, mut dc) = vmm(&dir, &[], "dest");
    assert_eq!(get(&mut dc, "/migration")["state"], "idle");
    let url = format!("unix:{}", dir.path("migrate.sock").display());
    receive(&mut dc, &url);
    assert_eq!(get(&mut dc, "/migration")["state"], "receiving");
    let before = *rounds(&source).last().unwrap();
    let r = send(&mut sc, &url, serde_json::json!({}));
    assert_eq!(r.status, 204, "{r:?}\n{}", source.output());

    // The source reports what it did, then exits on its own.
    let status = get(&mut sc, "/migration");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["role"], "source");
    assert!(status["rounds"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["bytes"].as_u64().unwrap() > 48 << 20, "{status}");
    assert!(status["downtime_ms"].as_f64().unwrap() > 0.0, "{status}");
    assert_eq!(
        source.wait_exit_within(Duration::from_secs(10)),
        0,
        "{}",
        source.output()
    );
    let last_on_source = *rounds(&source).last().unwrap();
    assert!(last_on_source >= before);

    // The destination runs the same guest on: its rounds continue from where they were
    // (no restart: no second `memtest pages=` line), and the final check passes.
    assert_eq!(
        dest.wait_exit_within(Duration::from_secs(60)),
        0,
        "{}",
        dest.output()
    );
    let console = dest.console();
    assert!(!console.contains("TG memtest pages="), "{console}");
    assert!(
        rounds(&dest).iter().all(|&r| r > last_on_source),
        "{console}"
    );
    assert_eq!(
        rounds_in(&joined(&source, &dest)),
        (1..=40).collect::<Vec<_>>(),
        "{console}"
    );
    assert!(console.contains("TG verify=ok"), "{console}");
}

#[test]
fn a_counting_guest_moves_over_tcp_between_two_hosts() {
    if !kvm_available("a_counting_guest_moves_over_tcp_between_two_hosts") {
        return;
    }
    let hosts = common::netns::TwoHosts::new();
    let dir = TempDir::new("mig-tcp");
    let a = ["ip", "netns", "exec", hosts.a.as_str()];
    let b = ["ip", "netns", "exec", hosts.b.as_str()];
    let (mut source, mut sc) = vmm(&dir, &a, "source");
    start_guest(&mut sc, 64, "tg.run=counter tg.period_ms=20");
    source.wait_for("count 20", |out| out.contains("TG count=20"));
    let (mut dest, mut dc) = vmm(&dir, &b, "dest");
    // The command-line convenience: tells the destination to listen, moves the guest,
    // prints the source's final status.
    let out = std::process::Command::new(common::anvil_vmm())
        .args(["migrate", "--from"])
        .arg(dir.path("source.sock"))
        .args(["--to", "tcp:10.77.0.2:47000", "--dest-api-sock"])
        .arg(dir.path("dest.sock"))
        .args(["--downtime-ms", "20"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        source.output()
    );
    let status: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["url"], "tcp:10.77.0.2:47000");
    assert_eq!(source.wait_exit_within(Duration::from_secs(10)), 0);
    let last = *counts(&source).last().unwrap();
    dest.wait_for("the counter to go on", |out| {
        out.contains(&format!("TG count={}", last + 20))
    });
    // One count after the other, across the move: no restart, no gap.
    let all = counts_in(&joined(&source, &dest));
    assert_eq!(
        all,
        (1..=all.len() as u64).collect::<Vec<_>>(),
        "the counter restarted or skipped\n{}\n{}",
        source.output(),
        dest.output()
    );
    assert!(*all.last().unwrap() >= last + 20);
    let status = get(&mut dc, "/migration");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["role"], "destination");
    assert!(status["bytes"].as_u64().unwrap() > 0);
    // The moved guest answers the API as a running VM.
    assert_eq!(get(&mut dc, "/")["state"], "Running");
    assert_eq!(
        get(&mut dc, "/vm/config")["machine-config"]["mem_size_mib"],
        64
    );
    dest.child.kill().unwrap();
}

#[test]
fn a_dead_destination_leaves_the_guest_running_and_a_retry_succeeds() {
    if !kvm_available("a_dead_destination_leaves_the_guest_running_and_a_retry_succeeds") {
        return;
    }
    let dir = TempDir::new("mig-kill");
    let (mut source, mut sc) = vmm(&dir, &[], "source");
    start_guest(
        &mut sc,
        256,
        "tg.run=memtest tg.rounds=0 tg.dirty_pages=64 tg.dirty_rate=640 tg.mem_limit_mib=160",
    );
    source.wait_for("memtest's first round", |out| out.contains("TG round=1 "));
    let (mut dead, mut dc) = vmm(&dir, &[], "dead");
    let url = format!("unix:{}", dir.path("dead-migrate.sock").display());
    receive(&mut dc, &url);
    // 20 MiB/s: the 160 MiB of memory take seconds, and the destination dies half-way.
    let sender = {
        let sock = dir.path("source.sock");
        let url = url.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(&sock).unwrap();
            send(&mut c, &url, serde_json::json!({"bandwidth_mib_s": 20}))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = get(&mut sc, "/migration");
        if s["state"] == "sending" && s["bytes"].as_u64().unwrap() > 30 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    dead.child.kill().unwrap();
    let r = sender.join().unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("migration failed"), "{r:?}");
    let s = get(&mut sc, "/migration");
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap().contains("connection"), "{s}");

    // The source still runs the guest: its rounds go on.
    assert_eq!(get(&mut sc, "/")["state"], "Running");
    let seen = *rounds(&source).last().unwrap();
    source.wait_for("memtest to go on", |out| {
        out.contains(&format!("TG round={} ", seen + 2))
    });

    // A healthy destination takes it.
    let (mut dest, mut dc) = vmm(&dir, &[], "dest");
    let url = format!("unix:{}", dir.path("dest-migrate.sock").display());
    receive(&mut dc, &url);
    let r = send(&mut sc, &url, serde_json::json!({}));
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(source.wait_exit_within(Duration::from_secs(10)), 0);
    let last = *rounds(&source).last().unwrap();
    dest.wait_for("memtest to go on at the destination", |out| {
        out.contains(&format!("TG round={} ", last + 2))
    });
    assert!(!dest.console().contains("TG verify=bad"));
    dest.child.kill().unwrap();
}

/// Reads one frame (kind, payload) of the migration protocol.
fn read_frame(s: &mut impl Read) -> (u32, Vec<u8>) {
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    let kind = u32::from_le_bytes(h[..4].try_into().unwrap());
    let len = u32::from_le_bytes(h[4..].try_into().unwrap());
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).unwrap();
    (kind, p)
}

fn hello(version: u32) -> Vec<u8> {
    let mut p = b"ANVILMIG".to_vec();
    p.extend_from_slice(&version.to_le_bytes());
    p.extend_from_slice(b"9.9.9");
    let mut f = 1u32.to_le_bytes().to_vec();
    f.extend_from_slice(&(p.len() as u32).to_le_bytes());
    f.extend_from_slice(&p);
    f
}

#[test]
fn version_mismatch_too_little_memory_and_a_missing_disk_fail_cleanly() {
    if !kvm_available("version_mismatch_too_little_memory_and_a_missing_disk_fail_cleanly") {
        return;
    }
    let dir = TempDir::new("mig-refuse");
    let disk = dir.path("data.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let (source, mut sc) = vmm(&dir, &[], "source");
    ok(
        &mut sc,
        "PUT",
        "/drives/data",
        serde_json::json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false, "is_read_only": false}),
    );
    start_guest(&mut sc, 64, "tg.run=counter tg.period_ms=20");
    source.wait_for("count 5", |out| out.contains("TG count=5"));

    // Bad requests change nothing.
    for (body, want) in [
        (
            serde_json::json!({"destination_url": "http://x"}),
            "destination_url",
        ),
        (
            serde_json::json!({"destination_url": "unix:/x", "max_rounds": 0}),
            "max_rounds",
        ),
        (
            serde_json::json!({"destination_url": "unix:/x", "bogus": 1}),
            "bogus",
        ),
        (
            serde_json::json!({"destination_url": format!("unix:{}", dir.path("nobody.sock").display())}),
            "cannot connect",
        ),
    ] {
        let r = sc
            .request("PUT", "/migration/send", Some(&body.to_string()))
            .unwrap();
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert!(r.body.contains(want), "{body}: {r:?}");
    }
    let r = sc
        .request(
            "PUT",
            "/migration/receive",
            Some(&serde_json::json!({"receiver_url": "unix:/tmp/x"}).to_string()),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("before the microVM starts"), "{r:?}");

    // A destination that speaks protocol version 99.
    let fake = dir.path("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fake).unwrap();
    let fake_dest = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let (kind, _) = read_frame(&mut s);
        assert_eq!(kind, 1);
        s.write_all(&hello(99)).unwrap();
        // The source says why it stops.
        let (kind, why) = read_frame(&mut s);
        (kind, String::from_utf8_lossy(&why).into_owned())
    });
    let r = send(
        &mut sc,
        &format!("unix:{}", fake.display()),
        serde_json::json!({}),
    );
    assert_eq!(r.status, 400);
    assert!(r.body.contains("version 99"), "{r:?}");
    let (kind, why) = fake_dest.join().unwrap();
    assert_eq!(kind, 7);
    assert!(why.contains("version 99"), "{why}");

    // A source that speaks version 99 is refused by a real destination, which stays free.
    let (_dest, mut dc) = vmm(&dir, &[], "dest");
    let url = dir.path("dest.sock-migrate");
    receive(&mut dc, &format!("unix:{}", url.display()));
    let mut s = std::os::unix::net::UnixStream::connect(&url).unwrap();
    s.write_all(&hello(99)).unwrap();
    let (kind, why) = read_frame(&mut s);
    assert_eq!(kind, 7, "expected an Error frame");
    assert!(String::from_utf8_lossy(&why).contains("version 99"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&mut dc, "/migration")["state"] != "failed" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(&mut dc, "/")["state"], "Not started");

    // A source whose guest needs more memory than this host has is refused before any
    // page moves.
    receive(&mut dc, &format!("unix:{}", url.display()));
    let mut s = std::os::unix::net::UnixStream::connect(&url).unwrap();
    s.write_all(&hello(1)).unwrap();
    assert_eq!(read_frame(&mut s).0, 1, "expected the destination's Hello");
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": testguest()},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 1u64 << 20},
    })
    .to_string();
    let mut f = 2u32.to_le_bytes().to_vec();
    f.extend_from_slice(&(config.len() as u32).to_le_bytes());
    f.extend_from_slice(config.as_bytes());
    s.write_all(&f).unwrap();
    let (kind, why) = read_frame(&mut s);
    let why = String::from_utf8_lossy(&why);
    assert_eq!(kind, 7, "expected an Error frame, got {kind}: {why}");
    assert!(why.contains("not enough memory"), "{why}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&mut dc, "/migration")["state"] != "failed" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(&mut dc, "/")["state"], "Not started");

    // The same destination again, now without the disk: the source's path is gone there
    // (the source keeps its open file).
    receive(&mut dc, &format!("unix:{}", url.display()));
    std::fs::rename(&disk, dir.path("moved.img")).unwrap();
    let r = send(
        &mut sc,
        &format!("unix:{}", url.display()),
        serde_json::json!({}),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("drive \\\"data\\\"") || r.body.contains("drive \"data\""),
        "{r:?}"
    );
    assert!(r.body.contains("data.img"), "{r:?}");
    let status = get(&mut dc, "/migration");
    assert_eq!(status["state"], "failed", "{status}");
    assert_eq!(get(&mut dc, "/")["state"], "Not started");

    // The source runs on through all of it.
    assert_eq!(get(&mut sc, "/")["state"], "Running");
    let seen = *counts(&source).last().unwrap();
    source.wait_for("the counter to go on", |out| {
        out.contains(&format!("TG count={}", seen + 10))
    });
}

#[test]
fn a_failed_restore_at_the_destination_resumes_the_stopped_guest() {
    if !kvm_available("a_failed_restore_at_the_destination_resumes_the_stopped_guest") {
        return;
    }
    let dir = TempDir::new("mig-vsock");
    let (v1, v2) = (dir.path("v1.sock"), dir.path("v2.sock"));
    let (mut source, mut sc) = vmm(&dir, &[], "source");
    ok(
        &mut sc,
        "PUT",
        "/vsock",
        serde_json::json!({"guest_cid": 3, "uds_path": v1}),
    );
    start_guest(&mut sc, 64, "tg.run=counter tg.period_ms=20");
    source.wait_for("count 5", |out| out.contains("TG count=5"));

    // On the same host the source still listens on the vsock path: the destination can only
    // fail once it restores the devices, after the source has stopped the guest.
    let (dest, mut dc) = vmm(&dir, &[], "dest");
    let url = format!("unix:{}", dir.path("m1.sock").display());
    receive(&mut dc, &url);
    let r = send(&mut sc, &url, serde_json::json!({}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("v1.sock"), "{r:?}");
    let s = get(&mut sc, "/migration");
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s.get("downtime_ms").is_none(), "{s}");
    assert_eq!(get(&mut sc, "/")["state"], "Running");
    let seen = *counts(&source).last().unwrap();
    source.wait_for("the counter to go on", |out| {
        out.contains(&format!("TG count={}", seen + 10))
    });

    // With its own vsock path the same destination takes the guest.
    let url = format!("unix:{}", dir.path("m2.sock").display());
    ok(
        &mut dc,
        "PUT",
        "/migration/receive",
        serde_json::json!({"receiver_url": url, "vsock_override": {"uds_path": v2}}),
    );
    let r = send(&mut sc, &url, serde_json::json!({}));
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(source.wait_exit_within(Duration::from_secs(10)), 0);
    let config = get(&mut dc, "/vm/config");
    assert_eq!(
        config["vsock"]["uds_path"],
        v2.to_str().unwrap(),
        "{config}"
    );
    assert!(v2.exists());
    dest.wait_for("the counter to go on there", |out| {
        out.contains("TG count=")
    });
    let all = counts_in(&joined(&source, &dest));
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());
}
