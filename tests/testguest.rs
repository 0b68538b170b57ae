//! The fast lane: the test guest booted by anvil-vmm on this host's KVM, checking what it
//! reads through the boot protocol (vCPU count, memory size, command line, boot tables) and
//! what anvil-vmm does with its signals (boot-complete port, reset).

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use common::{boot_testguest, kvm_available, Run};

fn hello(cpus: &str, memory: &str, extra: &[&str]) -> Option<Run> {
    if !kvm_available("testguest hello") {
        return None;
    }
    let mut args = vec!["--cpus", cpus, "--memory", memory];
    args.extend_from_slice(extra);
    let run = boot_testguest("console=ttyS0 tg.run=hello", &args);
    run.assert_pass();
    Some(run)
}

fn assert_cpus(n: &str) {
    let Some(run) = hello(n, "128M", &[]) else {
        return;
    };
    let tg = run.tg();
    assert_eq!(tg.get("cpus").map(String::as_str), Some(n), "{run}");
    assert_eq!(
        tg.get("bootinfo").map(String::as_str),
        Some("valid"),
        "{run}"
    );
}

#[test]
fn hello_sees_one_vcpu() {
    assert_cpus("1");
}

#[test]
fn hello_sees_two_vcpus() {
    assert_cpus("2");
}

#[test]
fn hello_sees_four_vcpus() {
    assert_cpus("4");
}

#[test]
fn hello_sees_the_memory_size() {
    for (flag, mib) in [("128M", "128"), ("1G", "1024")] {
        let Some(run) = hello("1", flag, &[]) else {
            return;
        };
        assert_eq!(
            run.tg().get("mem_mib").map(String::as_str),
            Some(mib),
            "{run}"
        );
    }
}

#[test]
fn hello_sees_memory_above_the_mmio_hole() {
    // 3.5 GiB: 3 GiB below the 32-bit MMIO hole, the rest above 4 GiB.
    let Some(run) = hello("1", "3584", &[]) else {
        return;
    };
    let tg = run.tg();
    assert_eq!(tg.get("mem_mib").map(String::as_str), Some("3584"), "{run}");
    assert_eq!(
        tg.get("bootinfo").map(String::as_str),
        Some("valid"),
        "{run}"
    );
}

#[test]
fn hello_sees_the_command_line_verbatim() {
    if !kvm_available("hello_sees_the_command_line_verbatim") {
        return;
    }
    let cmdline = "console=ttyS0 tg.run=hello tg.note=anvil~1 x=\"a b\" last";
    let run = boot_testguest(cmdline, &[]);
    run.assert_pass();
    assert_eq!(
        run.tg().get("cmdline").map(String::as_str),
        Some(cmdline),
        "{run}"
    );
}

#[test]
fn both_boot_protocols_reach_the_guest() {
    for (flag, reported) in [("linux64", "linux64"), ("pvh", "pvh"), ("auto", "pvh")] {
        let Some(run) = hello("2", "256M", &["--boot-protocol", flag]) else {
            return;
        };
        let tg = run.tg();
        assert_eq!(
            tg.get("protocol").map(String::as_str),
            Some(reported),
            "{run}"
        );
        assert_eq!(
            tg.get("bootinfo").map(String::as_str),
            Some("valid"),
            "{run}"
        );
        assert_eq!(tg.get("cpus").map(String::as_str), Some("2"), "{run}");
    }
}

#[test]
fn boot_complete_port_logs_the_boot_time() {
    let Some(run) = hello("1", "128M", &[]) else {
        return;
    };
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("Guest-boot-time = "))
        .unwrap_or_else(|| panic!("no boot time logged\n{run}"));
    let rest = line.split("Guest-boot-time = ").nth(1).unwrap();
    let words: Vec<&str> = rest.split_whitespace().collect();
    let us: u64 = words[0].parse().unwrap();
    assert_eq!(words[1], "us");
    let ms: u64 = words[2].parse().unwrap();
    assert_eq!(words[3], "ms");
    assert_eq!(ms, us / 1000, "{line}");
    assert!(
        us > 0 && us < run.elapsed.as_micros() as u64,
        "{line} vs {:?}",
        run.elapsed
    );
    assert_eq!(
        run.tg().get("boot").map(String::as_str),
        Some("ok"),
        "{run}"
    );
}

#[test]
fn unknown_workload_fails_cleanly() {
    if !kvm_available("unknown_workload_fails_cleanly") {
        return;
    }
    let run = boot_testguest("tg.run=nosuchthing", &[]);
    let result = run.tg().get("result").cloned().unwrap_or_default();
    assert!(result.starts_with("fail"), "{run}");
    assert!(result.contains("nosuchthing"), "{run}");
    // The guest still resets through the i8042, so the VMM exits cleanly.
    assert_eq!(run.status.code(), Some(0), "{run}");
}

#[test]
fn counter_counts_at_its_period() {
    if !kvm_available("counter_counts_at_its_period") {
        return;
    }
    let run = boot_testguest("tg.run=counter tg.period_ms=20 tg.count=10", &[]);
    run.assert_pass();
    let counts: Vec<u64> = run
        .tg_all("count")
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(counts, (1..=10).collect::<Vec<u64>>(), "{run}");
    assert!(run.tg().contains_key("tsc_khz"), "{run}");
}

#[test]
fn memtest_fills_and_verifies_guest_memory() {
    if !kvm_available("memtest_fills_and_verifies_guest_memory") {
        return;
    }
    let run = boot_testguest(
        "tg.run=memtest tg.seed=7 tg.rounds=3",
        &["--memory", "256M"],
    );
    run.assert_pass();
    let tg = run.tg();
    assert_eq!(tg.get("verify").map(String::as_str), Some("ok"), "{run}");
    // "TG memtest pages=<n>" parses as key "memtest pages".
    let pages: u64 = tg
        .get("memtest pages")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no page count\n{run}"));
    // Most of 256 MiB is filled (the guest keeps a few MiB for itself).
    assert!(pages > 60_000, "only {pages} pages filled\n{run}");
    assert_eq!(run.tg_all("round").len(), 3, "{run}");
}

#[test]
fn memtest_checksums_depend_on_the_seed() {
    if !kvm_available("memtest_checksums_depend_on_the_seed") {
        return;
    }
    let a = boot_testguest("tg.run=memtest tg.seed=1 tg.rounds=1", &["--memory", "64M"]);
    let b = boot_testguest("tg.run=memtest tg.seed=1 tg.rounds=1", &["--memory", "64M"]);
    let c = boot_testguest("tg.run=memtest tg.seed=2 tg.rounds=1", &["--memory", "64M"]);
    for run in [&a, &b, &c] {
        run.assert_pass();
    }
    let sum = |r: &Run| r.tg_all("checksum");
    assert_eq!(sum(&a), sum(&b), "same seed, same memory, same checksums");
    assert_ne!(sum(&a), sum(&c), "another seed must change the checksum");
}

#[test]
fn hello_finds_the_virtio_devices_on_the_command_line() {
    if !kvm_available("hello_finds_the_virtio_devices_on_the_command_line") {
        return;
    }
    let run = boot_testguest("tg.run=hello tg.expect_devices=1", &["--rng"]);
    run.assert_pass();
    let tg = run.tg();
    let cmdline = tg.get("cmdline").cloned().unwrap_or_default();
    assert!(
        cmdline.ends_with(" virtio_mmio.device=4K@0xd0000000:5"),
        "the device is announced the way Linux expects\n{run}"
    );
    assert_eq!(
        tg.get("bootinfo").map(String::as_str),
        Some("valid"),
        "{run}"
    );
}
