//! The test guest's `hostile_virtio` workload: a seeded stream of malformed virtio use against
//! virtio-rng and virtio-blk (descriptor loops, over-long chains, indirect descriptors that were
//! never offered, buffers outside RAM and in the MMIO hole, wrong directions, zero and huge
//! lengths, bogus queue set-ups, registers written in the wrong device state, runaway available
//! indexes, configuration-space garbage), each batch ended by a device reset; then well-formed
//! use of every device. anvil-vmm must exit 0 within the deadline without panicking, report the
//! broken devices at warn level, and leave the disk as the guest's well-formed writes left it:
//! the size unchanged, the initial pattern everywhere but the scratch sectors, and the guest's
//! pattern there.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{boot, kvm_available, testguest, Run, TempDir};

/// Far above the second or two a run takes here: reaching it means a hang.
const DEADLINE: Duration = Duration::from_secs(90);
const DISK_BYTES: usize = 1 << 20;
/// The pattern the host writes before the run (the `blk` workload's pattern for this seed).
const DISK_SEED: u64 = 0x5eed_d15c;
/// The sectors the workload may write (`SCRATCH_SECTOR`, `SCRATCH_SECTORS` in
/// resources/testguest/src/workloads/hostile_virtio.rs).
const SCRATCH: std::ops::Range<usize> = 1024 * 512..(1024 + 512) * 512;

/// What anvil logs when a guest breaks a device (at warn level).
const DEVICE_ERRORS: [&str; 3] = [
    "virtio-mmio device needs reset",
    "virtio-rng stopped",
    "virtio-blk stopped",
];

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `blk` workload's pattern: the u64 at byte offset `o` is `mix64(mix64(seed) ^ o)`.
fn pattern(seed: u64, range: std::ops::Range<usize>) -> Vec<u8> {
    let key = mix64(seed);
    range
        .step_by(8)
        .flat_map(|o| mix64(key ^ o as u64).to_le_bytes())
        .collect()
}

/// The last value the guest printed for `key`.
fn tg_value(run: &Run, key: &str) -> String {
    run.tg()
        .get(key)
        .cloned()
        .unwrap_or_else(|| panic!("no TG {key}= line\n{run}"))
}

fn number(run: &Run, key: &str) -> u64 {
    tg_value(run, key)
        .parse()
        .unwrap_or_else(|_| panic!("TG {key} is not a number\n{run}"))
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn storm(test: &str, seed: u64, extra: &[&str]) {
    if !kvm_available(test) {
        return;
    }
    let dir = TempDir::new("hostile-virtio");
    let disk = dir.path("disk.img");
    let initial = pattern(DISK_SEED, 0..DISK_BYTES);
    std::fs::write(&disk, &initial).unwrap();
    let guest = testguest();
    let cmdline =
        format!("console=ttyS0 tg.run=hostile_virtio tg.seed={seed} tg.disk_seed={DISK_SEED}");
    let disk_spec = format!("path={}", disk.display());
    let mut args = vec![
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--rng",
        "--disk",
        &disk_spec,
    ];
    args.extend_from_slice(extra);
    let run = boot(&args, DEADLINE);
    run.assert_pass();
    assert!(
        !run.stderr.contains("panicked"),
        "anvil-vmm panicked\n{run}"
    );

    // The guest's view: the storm ran, devices broke and were reset, every probe that did
    // not overrun its queue was answered, and the final well-formed checks passed.
    assert!(
        tg_value(&run, "hostile_virtio_seed").starts_with(&format!("{seed} ")),
        "{run}"
    );
    assert!(number(&run, "hostile_virtio_ops") > 0, "{run}");
    assert!(number(&run, "needs_reset_seen") > 0, "{run}");
    assert!(
        tg_value(&run, "hostile_virtio_probe").contains(" silent:0 "),
        "a device ignored a well-formed request without asking for a reset\n{run}"
    );
    assert_eq!(tg_value(&run, "hostile_virtio_guard"), "ok", "{run}");
    assert!(
        tg_value(&run, "hostile_virtio_check_rng0").starts_with("ok "),
        "{run}"
    );
    assert_eq!(
        tg_value(&run, "hostile_virtio_check_blk1"),
        format!("ok known=pattern written={}", SCRATCH.len()),
        "{run}"
    );

    // The VMM's view: it noticed the broken devices.
    let warnings = run
        .stderr
        .lines()
        .filter(|l| l.contains("WARN") && DEVICE_ERRORS.iter().any(|e| l.contains(e)))
        .count();
    assert!(warnings > 0, "anvil-vmm reported no device error\n{run}");

    // The disk: same size, the initial pattern outside the scratch sectors, the guest's
    // final well-formed write inside them.
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after.len(), DISK_BYTES, "the disk changed size");
    let mut want = initial;
    want[SCRATCH].copy_from_slice(&pattern(seed, SCRATCH));
    if let Some(at) = first_difference(&after, &want) {
        panic!(
            "disk byte {at:#x} differs from what the guest's well-formed writes leave \
             (scratch {SCRATCH:#x?})\n{run}"
        );
    }
}

#[test]
fn hostile_virtio_seed_1_leaves_devices_working() {
    storm("hostile_virtio_seed_1_leaves_devices_working", 1, &[]);
}

#[test]
fn hostile_virtio_seed_2_leaves_devices_working() {
    storm("hostile_virtio_seed_2_leaves_devices_working", 2, &[]);
}

#[test]
fn hostile_virtio_seed_3_with_two_vcpus() {
    storm(
        "hostile_virtio_seed_3_with_two_vcpus",
        0xdead_beef,
        &["--cpus", "2"],
    );
}

#[test]
fn hostile_virtio_seed_4_leaves_devices_working() {
    storm("hostile_virtio_seed_4_leaves_devices_working", 4, &[]);
}
