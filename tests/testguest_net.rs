//! The test guest's `net` workload over virtio-net: inside a network namespace made for the
//! test, with a tap at 10.0.0.1/24, the guest (10.0.0.2) ARPs for the host, pings it with
//! patterned payloads and checks every echo reply the host kernel sends back; with `tg.arp=0`
//! the host has to ARP for the guest, which answers. The namespace (and the tap in it) is
//! removed when the test ends, passed or not.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::netns::NetNs;
use common::{anvil_vmm, kvm_available, run_with_deadline, testguest, Run};

const DEADLINE: Duration = Duration::from_secs(60);
const GUEST_MAC: &str = "52:54:00:aa:bb:cc";

/// Boots the test guest with `cmdline` and a virtio-net device on the tap, inside the
/// namespace.
fn boot(ns: &NetNs, cmdline: &str) -> Run {
    let guest = testguest();
    let net = format!("tap={},mac={GUEST_MAC}", ns.tap);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(anvil_vmm())
        .args(["boot", "--kernel"])
        .arg(&guest)
        .args(["--cmdline", cmdline, "--net", &net]);
    run_with_deadline(cmd, DEADLINE)
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
    let run = boot(
        &ns,
        "console=ttyS0 tg.run=net tg.ip=10.0.0.2 tg.peer=10.0.0.1 tg.pings=8",
    );
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
    let run = boot(
        &ns,
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
