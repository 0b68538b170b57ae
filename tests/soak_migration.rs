//! A soak run for the Linux lane's rare guest crashes inside L1 (docs/testing.md, "The Linux
//! lane"): the Linux guest of `tests/linux_migration.rs` (a disk written every tick, a TCP echo,
//! a checksummed buffer) moves back and forth between anvil-vmm processes over Unix sockets,
//! `ANVIL_SOAK_MOVES` times (default 30), with `ANVIL_SOAK_VCPUS` vCPUs (default 2), and must
//! keep ticking and echoing after every move. Ignored by default (minutes per run); inside L1:
//!
//! ```text
//! cargo test --release --test soak_migration --no-run   # prints the binary
//! ANVIL_REQUIRE_LINUX=1 resources/l1/run-in-l1.sh --timeout 3000 -- BINARY --ignored --nocapture
//! ```

#![allow(clippy::unwrap_used)]

mod common;

use std::io::BufReader;
use std::time::Duration;

use common::api_vmm::{ok, start_ticking_guest, ApiVmm};
use common::netns::{connect_from, echo, ip};
use common::{linux_capable, linux_guest_dir, SockDir};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ticks(vmm: &ApiVmm) -> usize {
    vmm.console()
        .lines()
        .filter(|l| l.starts_with("tick="))
        .count()
}

/// A namespace with a bridge at 10.0.0.1 holding two taps, for the guest to alternate between.
struct Bridge {
    ns: String,
    taps: [String; 2],
}

impl Bridge {
    fn new() -> Self {
        let id = std::process::id() & 0xffff;
        let b = Bridge {
            ns: format!("anvil-soak-{id}"),
            taps: [format!("ska{id:x}"), format!("skb{id:x}")],
        };
        ip(&["netns", "add", &b.ns]);
        ip(&["-n", &b.ns, "link", "add", "br0", "type", "bridge"]);
        for tap in &b.taps {
            ip(&["-n", &b.ns, "tuntap", "add", "dev", tap, "mode", "tap"]);
            ip(&["-n", &b.ns, "link", "set", tap, "master", "br0"]);
            ip(&["-n", &b.ns, "link", "set", tap, "up"]);
        }
        ip(&["-n", &b.ns, "addr", "add", "10.0.0.1/24", "dev", "br0"]);
        ip(&["-n", &b.ns, "link", "set", "br0", "up"]);
        ip(&["-n", &b.ns, "link", "set", "lo", "up"]);
        b
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
    }
}

#[test]
#[ignore = "a soak run of minutes, for investigating L1; see the file's comment"]
fn linux_guest_survives_many_moves() {
    if !linux_capable("linux_guest_survives_many_moves") {
        return;
    }
    let moves = env_or("ANVIL_SOAK_MOVES", 30);
    let vcpus = env_or("ANVIL_SOAK_VCPUS", 2);
    let dir = linux_guest_dir();
    let work = SockDir::new("linux-soak");
    let bridge = Bridge::new();
    let prefix = ["ip", "netns", "exec", bridge.ns.as_str()];
    let disk = work.path.join("data.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let sock = |n: u64| work.path.join(format!("vmm{n}.sock"));
    let mut vmm = ApiVmm::spawn_with(&prefix, None, &["--api-sock", sock(0).to_str().unwrap()]);
    let mut c = vmm.client();
    ok(
        &mut c,
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": vcpus, "mem_size_mib": 256}),
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
        serde_json::json!({"iface_id": "eth0", "host_dev_name": bridge.taps[0]}),
    );
    start_ticking_guest(&mut c, &dir);
    vmm.wait_for_within("ticks", Duration::from_secs(300), |_| ticks(&vmm) >= 3);
    let conn = connect_from(&bridge.ns, "10.0.0.2:7000");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut conn = BufReader::new(conn);
    echo(&mut conn, "before");
    for m in 1..=moves {
        let next = ApiVmm::spawn_with(&prefix, None, &["--api-sock", sock(m).to_str().unwrap()]);
        let mut nc = next.client();
        let url = format!("unix:{}", work.path.join(format!("move{m}.sock")).display());
        let tap = &bridge.taps[usize::from(m % 2 == 1)];
        ok(
            &mut nc,
            "PUT",
            "/migration/receive",
            serde_json::json!({"receiver_url": url, "network_overrides": [{"iface_id": "eth0", "host_dev_name": tap}]}),
        );
        ok(
            &mut c,
            "PUT",
            "/migration/send",
            serde_json::json!({"destination_url": url}),
        );
        assert_eq!(vmm.wait_exit_within(Duration::from_secs(30)), 0);
        next.wait_for_within(
            &format!("ticks after move {m}"),
            Duration::from_secs(60),
            |_| ticks(&next) >= 3,
        );
        echo(&mut conn, &format!("after-move-{m}"));
        eprintln!("soak: move {m} of {moves} done");
        vmm = next;
        c = nc;
    }
}
