//! The Linux lane of live migration: the shared Linux guest keeps a checksummed buffer in
//! memory, writes every tick to its disk and serves a TCP echo; it moves over TCP between two
//! network namespaces standing for two hosts (their bridges joined by a veth pair, a tap on
//! each), then back over a Unix socket. It goes on counting where it stopped, its buffer and
//! disk intact, and a TCP connection opened from outside before the first move still works
//! after both. Skips (loudly) where KVM cannot run Linux; `.ci/run` runs it inside L1.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeMap;
use std::io::BufReader;
use std::time::Duration;

use common::api_vmm::{ok, start_ticking_guest, ApiVmm};
use common::netns::{connect_from, echo, ip};
use common::{linux_capable, linux_guest_dir, SockDir};

/// The guest's `tick=N sum=S` lines.
fn ticks(vmm: &ApiVmm) -> Vec<BTreeMap<String, String>> {
    ticks_in(&vmm.console())
}

fn ticks_in(console: &str) -> Vec<BTreeMap<String, String>> {
    console
        .lines()
        .filter(|l| l.starts_with("tick="))
        .map(|l| {
            l.trim_end_matches('\r')
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .filter(|m: &BTreeMap<String, String>| m.len() == 2 && m["sum"].len() == 32)
        .collect()
}

fn tick(m: &BTreeMap<String, String>) -> u64 {
    m["tick"].parse().unwrap()
}

/// Two namespaces ("hosts"), each with a bridge holding a tap for the guest and one end of
/// a veth pair: one layer-2 network, 10.0.0.1 on host A's bridge, 10.0.0.3 on B's.
struct Hosts {
    a: String,
    b: String,
    tap_a: String,
    tap_b: String,
}

impl Hosts {
    fn new() -> Self {
        let id = std::process::id() & 0xffff;
        let h = Hosts {
            a: format!("anvil-mla-{id}"),
            b: format!("anvil-mlb-{id}"),
            tap_a: format!("mta{id:x}"),
            tap_b: format!("mtb{id:x}"),
        };
        ip(&["netns", "add", &h.a]);
        ip(&["netns", "add", &h.b]);
        let (va, vb) = (format!("mva{id:x}"), format!("mvb{id:x}"));
        ip(&[
            "-n", &h.a, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &h.b,
        ]);
        for (ns, tap, veth, addr) in [
            (&h.a, &h.tap_a, &va, "10.0.0.1/24"),
            (&h.b, &h.tap_b, &vb, "10.0.0.3/24"),
        ] {
            ip(&["-n", ns, "link", "add", "br0", "type", "bridge"]);
            ip(&["-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"]);
            for dev in [tap.as_str(), veth.as_str()] {
                ip(&["-n", ns, "link", "set", dev, "master", "br0"]);
                ip(&["-n", ns, "link", "set", dev, "up"]);
            }
            ip(&["-n", ns, "addr", "add", addr, "dev", "br0"]);
            ip(&["-n", ns, "link", "set", "br0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        h
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

fn spawn(prefix: &[&str], work: &SockDir, name: &str) -> (ApiVmm, api_server::client::Client) {
    let sock = work.path.join(format!("{name}.sock"));
    let vmm = ApiVmm::spawn_with(prefix, None, &["--api-sock", sock.to_str().unwrap()]);
    let c = vmm.client();
    (vmm, c)
}

/// Moves the guest from `source` to a fresh VMM (through `prefix`, with `tap`), over `url`;
/// returns the new VMM once it printed ticks after the move, checked against the old ones.
fn move_guest(
    source: &mut ApiVmm,
    sc: &mut api_server::client::Client,
    prefix: &[&str],
    work: &SockDir,
    name: &str,
    url: &str,
    tap: &str,
) -> (ApiVmm, api_server::client::Client) {
    let (dest, mut dc) = spawn(prefix, work, name);
    ok(
        &mut dc,
        "PUT",
        "/migration/receive",
        serde_json::json!({"receiver_url": url, "network_overrides": [{"iface_id": "eth0", "host_dev_name": tap}]}),
    );
    ok(
        sc,
        "PUT",
        "/migration/send",
        serde_json::json!({"destination_url": url}),
    );
    let status = sc.request("GET", "/migration", None).unwrap().json();
    assert_eq!(status["state"], "completed", "{status}");
    eprintln!("migration to {name} over {url}: {status}");
    assert_eq!(source.wait_exit_within(Duration::from_secs(30)), 0);
    let before = ticks(source);
    let last = before.last().unwrap();
    dest.wait_for_within("ticks after the move", Duration::from_secs(120), |_| {
        ticks(&dest).len() >= 3
    });
    // The source's console, a line the guest was half-way through included, then the
    // destination's: one run of ticks, none repeated or skipped.
    let all = ticks_in(&(source.console_all() + &dest.console()));
    let numbers: Vec<u64> = all.iter().map(tick).collect();
    let first = numbers[0];
    assert_eq!(
        numbers,
        (first..first + numbers.len() as u64).collect::<Vec<_>>(),
        "the guest must continue from tick {}, not restart or skip: {all:?}\n{}",
        tick(last),
        dest.output()
    );
    let after = ticks(&dest);
    assert!(tick(after.last().unwrap()) > tick(last));
    assert!(
        after.iter().all(|t| t["sum"] == last["sum"]),
        "the buffer in guest memory changed: {last:?} before, {after:?} after"
    );
    let dstatus = dc.request("GET", "/migration", None).unwrap().json();
    assert_eq!(dstatus["state"], "completed", "{dstatus}");
    (dest, dc)
}

#[test]
fn linux_moves_between_hosts_with_its_tcp_connection_open() {
    if !linux_capable("linux_moves_between_hosts_with_its_tcp_connection_open") {
        return;
    }
    let dir = linux_guest_dir();
    let work = SockDir::new("linux-mig");
    let hosts = Hosts::new();
    let in_a = ["ip", "netns", "exec", hosts.a.as_str()];
    let in_b = ["ip", "netns", "exec", hosts.b.as_str()];
    let disk = work.path.join("data.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let (mut source, mut sc) = spawn(&in_a, &work, "source");
    ok(
        &mut sc,
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256}),
    );
    ok(
        &mut sc,
        "PUT",
        "/drives/data",
        serde_json::json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false, "is_read_only": false}),
    );
    ok(
        &mut sc,
        "PUT",
        "/network-interfaces/eth0",
        serde_json::json!({"iface_id": "eth0", "host_dev_name": hosts.tap_a, "guest_mac": "52:54:00:12:34:56"}),
    );
    start_ticking_guest(&mut sc, &dir);
    source.wait_for_within("ticks", Duration::from_secs(300), |_| {
        ticks(&source).len() >= 3
    });
    // A connection from host A, open across both moves.
    let conn = connect_from(&hosts.a, "10.0.0.2:7000");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut conn = BufReader::new(conn);
    echo(&mut conn, "before");

    // Host A to host B over TCP (the destination listens on B's address).
    let (mut on_b, mut bc) = move_guest(
        &mut source,
        &mut sc,
        &in_b,
        &work,
        "on-b",
        "tcp:10.0.0.3:47001",
        &hosts.tap_b,
    );
    echo(&mut conn, "after-tcp-move");

    // And back to host A over a Unix socket.
    let url = format!("unix:{}", work.path.join("back-migrate.sock").display());
    let (back, _c) = move_guest(&mut on_b, &mut bc, &in_a, &work, "back", &url, &hosts.tap_a);
    echo(&mut conn, "after-unix-move");

    // Every tick's disk write, before and after both moves, is on the disk.
    let last = tick(ticks(&back).last().unwrap());
    let data = std::fs::read(&disk).unwrap();
    for i in 1..=last {
        let block = &data[i as usize * 512..][..512];
        let want = format!("block-{i}\n");
        assert!(
            block.starts_with(want.as_bytes()),
            "disk block {i} holds {:?}",
            String::from_utf8_lossy(&block[..16])
        );
    }
}
