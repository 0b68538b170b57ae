//! The Linux lane of the API: a real Linux guest configured and started through the socket
//! as Firecracker's tools do it, paused and resumed, and rebooted by SendCtrlAltDel through
//! the guest kernel's own keyboard driver. Skips (loudly) where KVM cannot run Linux;
//! `.ci/run` runs it inside the L1 machine.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use common::api_vmm::{ok, start_linux, ApiVmm};
use common::{linux_capable, linux_guest_dir, SockDir};

#[test]
fn linux_started_by_api_pauses_resumes_and_reboots_on_ctrl_alt_del() {
    if !linux_capable("linux_started_by_api_pauses_resumes_and_reboots_on_ctrl_alt_del") {
        return;
    }
    let dir = linux_guest_dir();
    let socks = SockDir::new("api");
    let sock = socks.path.join("api.sock");
    let vmm = ApiVmm::spawn(&["--api-sock", sock.to_str().unwrap(), "--id", "linux-api"]);
    let mut c = vmm.client();
    ok(
        &mut c,
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256}),
    );
    // The guest prints a tick every 200 ms until it is rebooted from outside.
    let cmd = "echo cad-ready; i=0; while true; do i=$((i+1)); echo tick=$i; sleep 0.2; done";
    start_linux(
        &mut c,
        &dir.join("vmlinux"),
        &dir.join("initramfs.cpio.gz"),
        cmd,
    );
    vmm.wait_for_within("the guest's command", Duration::from_secs(300), |out| {
        out.contains("tick=3")
    });

    let ticks = |v: &ApiVmm| {
        v.console()
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("tick="))
            .filter_map(|n| n.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    };
    let r = c
        .request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#))
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    let at_pause = ticks(&vmm);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        ticks(&vmm) <= at_pause + 1,
        "the guest kept running while paused: {at_pause} -> {}",
        ticks(&vmm)
    );
    let r = c
        .request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#))
        .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    let resumed_from = ticks(&vmm);
    vmm.wait_for_within("ticks after resuming", Duration::from_secs(120), |_| {
        ticks(&vmm) >= resumed_from + 3
    });

    // Ctrl+Alt+Del reaches Linux's keyboard driver, which restarts the machine at once.
    ok(
        &mut c,
        "PUT",
        "/actions",
        serde_json::json!({"action_type": "SendCtrlAltDel"}),
    );
    let mut vmm = vmm;
    assert_eq!(
        vmm.wait_exit_within(Duration::from_secs(120)),
        0,
        "{}",
        vmm.output()
    );
    let out = vmm.console();
    assert!(out.contains("cad-ready"), "{out}");
    assert!(
        !out.contains("anvil-guest: cmd exit"),
        "the guest's command must not have ended on its own\n{out}"
    );
}
