//! The test guest's `hostile` workload: a seeded storm of garbage port I/O (every port, every
//! size, `rep ins/outs`), MMIO across the 32-bit hole (aligned or not, page-crossing, `rep
//! stos/movs`), CMOS and COM1 register garbage; then the guest checks that the well-formed
//! operations still work. anvil-vmm must neither crash nor hang: it exits 0 after the guest's
//! i8042 reset, within the deadline, and the guest passes.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{boot, kvm_available, testguest};

/// Far above the few seconds a storm of 20000 operations takes here: reaching it means a hang.
const DEADLINE: Duration = Duration::from_secs(90);

fn storm(test: &str, seed: u64) {
    if !kvm_available(test) {
        return;
    }
    let guest = testguest();
    let cmdline = format!("console=ttyS0 tg.run=hostile tg.seed={seed} tg.ops=20000");
    let run = boot(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--cpus",
            "2",
        ],
        DEADLINE,
    );
    run.assert_pass();
    let tg = run.tg();
    let seed_line = format!("{seed} ops=20000");
    assert_eq!(
        tg.get("hostile_seed").map(String::as_str),
        Some(seed_line.as_str()),
        "{run}"
    );
    for (key, want) in [
        ("hostile_serial", "ok"),
        ("hostile_unclaimed", "ok"),
        ("hostile_ops", "20000"),
    ] {
        assert_eq!(tg.get(key).map(String::as_str), Some(want), "{key}\n{run}");
    }
    assert!(
        tg.get("hostile_cmos")
            .is_some_and(|v| v.starts_with("ok time=")),
        "{run}"
    );
    assert!(
        !run.stderr.contains("panicked"),
        "anvil-vmm panicked\n{run}"
    );
}

#[test]
fn hostile_storm_seed_1_leaves_the_vmm_working() {
    storm("hostile_storm_seed_1_leaves_the_vmm_working", 1);
}

#[test]
fn hostile_storm_seed_2_leaves_the_vmm_working() {
    storm("hostile_storm_seed_2_leaves_the_vmm_working", 2);
}

#[test]
fn hostile_storm_seed_3_leaves_the_vmm_working() {
    storm("hostile_storm_seed_3_leaves_the_vmm_working", 0xdead_beef);
}
