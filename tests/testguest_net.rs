//! The test guest's `net` workload over virtio-net: inside a network namespace made for the
//! test, with a tap at 10.0.0.1/24, the guest (10.0.0.2) ARPs for the host, pings it with
//! patterned payloads and checks every echo reply the host kernel sends back; with `tg.arp=0`
//! the host has to ARP for the guest, which answers. The namespace (and the tap in it) is
//! removed when the test ends, passed or not.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{anvil_vmm, kvm_available, run_with_deadline, testguest, Run};

const DEADLINE: Duration = Duration::from_secs(60);
const GUEST_MAC: &str = "52:54:00:aa:bb:cc";

/// Runs `ip` with `args`; panics with its output when it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("cannot run ip");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with a tap at 10.0.0.1/24, deleted (tap and all) on drop.
struct NetNs {
    name: String,
    tap: String,
}

impl NetNs {
    fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let ns = NetNs {
            name: format!("anvil-tgnet-{pid}-{n}"),
            // Interface names are at most 15 bytes.
            tap: format!("tgt{:x}n{n}", pid & 0xff_ffff),
        };
        ip(&["netns", "add", &ns.name]);
        // From here on the guard exists, so a failure below still removes the namespace.
        let (name, tap) = (ns.name.as_str(), ns.tap.as_str());
        ip(&["-n", name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["-n", name, "addr", "add", "10.0.0.1/24", "dev", tap]);
        ip(&["-n", name, "link", "set", tap, "up"]);
        ns
    }

    /// The tap's MAC address as the host sees it.
    fn tap_mac(&self) -> String {
        let out = ip(&["-n", &self.name, "-o", "link", "show", "dev", &self.tap]);
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no link/ether in {out}"))
            .to_string()
    }

    /// Boots the test guest with `cmdline` and a virtio-net device on the tap, inside the
    /// namespace.
    fn boot(&self, cmdline: &str) -> Run {
        let guest = testguest();
        let net = format!("tap={},mac={GUEST_MAC}", self.tap);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(anvil_vmm())
            .args(["boot", "--kernel"])
            .arg(&guest)
            .args(["--cmdline", cmdline, "--net", &net]);
        run_with_deadline(cmd, DEADLINE)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("cannot delete network namespace {}: {out:?}", self.name);
        }
    }
}

fn value(run: &Run, key: &str) -> String {
    run.tg()
        .get(key)
        .cloned()
        .unwrap_or_else(|| panic!("no TG {key}= line\n{run}"))
}

#[test]
fn net_pings_the_host_through_a_tap() {
    if !kvm_available("net_pings_the_host_through_a_tap") {
        return;
    }
    let ns = NetNs::new();
    let run = ns.boot("console=ttyS0 tg.run=net tg.ip=10.0.0.2 tg.peer=10.0.0.1 tg.pings=8");
    run.assert_pass();
    assert!(!run.stderr.contains("panicked"), "{run}");
    assert_eq!(value(&run, "net_mac"), GUEST_MAC, "{run}");
    assert_eq!(value(&run, "net_peer_mac"), ns.tap_mac(), "{run}");
    assert_eq!(value(&run, "net_pings"), "8", "{run}");
    assert_eq!(value(&run, "net_replies"), "8", "{run}");
    assert!(value(&run, "net_rtt_us").parse::<u64>().is_ok(), "{run}");
}

#[test]
fn net_full_size_payloads_and_the_guest_answers_arp() {
    if !kvm_available("net_full_size_payloads_and_the_guest_answers_arp") {
        return;
    }
    let ns = NetNs::new();
    // No ARP from the guest: the first echo request goes to the broadcast MAC, so the host
    // must ARP for 10.0.0.2 before it can reply.
    let run = ns.boot(
        "console=ttyS0 tg.run=net tg.ip=10.0.0.2 tg.peer=10.0.0.1 tg.pings=32 tg.size=1472 \
         tg.arp=0",
    );
    run.assert_pass();
    assert_eq!(value(&run, "net_mac"), GUEST_MAC, "{run}");
    assert_eq!(value(&run, "net_peer_mac"), ns.tap_mac(), "{run}");
    assert_eq!(value(&run, "net_replies"), "32", "{run}");
    let answered: u64 = value(&run, "net_arp_answered").parse().unwrap();
    assert!(
        answered >= 1,
        "the host never asked for the guest's MAC\n{run}"
    );
}
