//! The test guest's polling virtio-mmio drivers under anvil-vmm: `rng` with `--rng`, `blk`
//! with `--disk` (write/flush/verify with the file checked on the host, read-only refusal with
//! the file unchanged), and virtio-rng as the `irq` workload's interrupt source.
#![allow(clippy::unwrap_used)]

mod common;

use common::{boot_testguest, kvm_available, Run, TempDir};

const MIB: usize = 1 << 20;

/// SplitMix64's finaliser, as the guest's `blk` workload uses it.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The bytes the `blk` workload writes at disk offsets `0..len` for `seed`.
fn blk_pattern(seed: u64, len: usize) -> Vec<u8> {
    let key = mix64(seed);
    (0..len as u64 / 8)
        .flat_map(|i| mix64(key ^ (i * 8)).to_le_bytes())
        .collect()
}

/// 64-bit FNV-1a, as the guest's `blk_sum`.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Asserts `TG key=value` was printed (last value wins), with the whole run on failure.
fn assert_tg(run: &Run, key: &str, want: &str) {
    assert_eq!(
        run.tg().get(key).map(String::as_str),
        Some(want),
        "TG {key}\n{run}"
    );
}

/// First differing offset of two byte strings, for readable failures.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn rng_reads_entropy() {
    if !kvm_available("rng_reads_entropy") {
        return;
    }
    let run = boot_testguest("tg.run=rng", &["--rng"]);
    run.assert_pass();
    assert_tg(&run, "rng_bytes", "4096");
    assert_tg(&run, "rng_requests", "8");
}

#[test]
fn rng_odd_chunks() {
    if !kvm_available("rng_odd_chunks") {
        return;
    }
    let run = boot_testguest(
        "tg.run=rng tg.rng_bytes=65536 tg.rng_chunk=1000",
        &["--rng"],
    );
    run.assert_pass();
    assert_tg(&run, "rng_bytes", "65536");
    let requests: u64 = run.tg()["rng_requests"].parse().unwrap();
    assert!(
        requests >= 66,
        "{requests} requests for 65536 bytes in 1000-byte chunks\n{run}"
    );
}

#[test]
fn rng_without_device_fails() {
    if !kvm_available("rng_without_device_fails") {
        return;
    }
    let run = boot_testguest("tg.run=rng", &[]);
    let result = run.tg().get("result").cloned().unwrap_or_default();
    assert!(
        result.starts_with("fail reason=rng device: no such virtio device"),
        "{run}"
    );
    assert_eq!(run.status.code(), Some(0), "{run}");
}

#[test]
fn blk_writes_whole_disk_and_reads_it_back() {
    if !kvm_available("blk_writes_whole_disk_and_reads_it_back") {
        return;
    }
    let dir = TempDir::new("tg-blk");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 8 * MIB]).unwrap();
    let spec = format!("path={},id=tgdisk", disk.display());
    let run = boot_testguest("tg.run=blk tg.seed=1", &["--disk", &spec]);
    run.assert_pass();
    assert_tg(&run, "blk_capacity", "16384");
    assert_tg(&run, "blk_ro", "0");
    assert_tg(&run, "blk_id", "tgdisk");
    assert_tg(&run, "blk_oob", "ioerr");
    assert_tg(&run, "blk_oob_straddle", "ioerr");
    assert_tg(&run, "blk_written", &(8 * MIB).to_string());
    assert_tg(&run, "blk_verify", "ok");
    assert_tg(&run, "blk_flush", "ok");

    let content = std::fs::read(&disk).unwrap();
    let want = blk_pattern(1, 8 * MIB);
    assert_eq!(content.len(), want.len(), "the disk image changed size");
    assert_eq!(
        first_difference(&content, &want),
        None,
        "the file differs from the guest's pattern\n{run}"
    );
    assert_tg(&run, "blk_sum", &format!("{:016x}", fnv1a(&content[..MIB])));
    assert_tg(&run, "blk_sum_bytes", &MIB.to_string());
}

#[test]
fn blk_limit_seed_and_request_size() {
    if !kvm_available("blk_limit_seed_and_request_size") {
        return;
    }
    let dir = TempDir::new("tg-blk-limit");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0x5au8; 4 * MIB]).unwrap();
    let spec = format!("path={}", disk.display());
    let run = boot_testguest(
        "tg.run=blk tg.seed=42 tg.blk_mib=2 tg.blk_req_kib=256",
        &["--disk", &spec],
    );
    run.assert_pass();
    assert_tg(&run, "blk_written", &(2 * MIB).to_string());
    assert_tg(&run, "blk_verify", "ok");

    let content = std::fs::read(&disk).unwrap();
    assert_eq!(
        first_difference(&content[..2 * MIB], &blk_pattern(42, 2 * MIB)),
        None,
        "the first 2 MiB differ from the guest's pattern\n{run}"
    );
    assert!(
        content[2 * MIB..].iter().all(|&b| b == 0x5a),
        "the guest wrote past tg.blk_mib\n{run}"
    );
}

#[test]
fn blk_read_only_disk_refuses_writes() {
    if !kvm_available("blk_read_only_disk_refuses_writes") {
        return;
    }
    let dir = TempDir::new("tg-blk-ro");
    let disk = dir.path("ro.img");
    let original: Vec<u8> = (0..3 * MIB as u64)
        .map(|i| mix64(i / 8 + 7).to_le_bytes()[(i % 8) as usize])
        .collect();
    std::fs::write(&disk, &original).unwrap();
    let before = fnv1a(&original);
    let spec = format!("path={},ro,id=rodisk", disk.display());
    let run = boot_testguest("tg.run=blk", &["--disk", &spec]);
    run.assert_pass();
    assert_tg(&run, "blk_capacity", "6144");
    assert_tg(&run, "blk_ro", "1");
    assert_tg(&run, "blk_id", "rodisk");
    assert_tg(&run, "blk_ro_write", "ioerr");
    assert_tg(&run, "blk_read", "ok");
    assert_tg(&run, "blk_oob", "ioerr");
    assert_tg(
        &run,
        "blk_sum",
        &format!("{:016x}", fnv1a(&original[..MIB])),
    );

    let after = std::fs::read(&disk).unwrap();
    assert_eq!(fnv1a(&after), before, "the read-only file changed\n{run}");
    assert_eq!(first_difference(&after, &original), None);
}

#[test]
fn blk_index_picks_the_second_disk() {
    if !kvm_available("blk_index_picks_the_second_disk") {
        return;
    }
    let dir = TempDir::new("tg-blk-index");
    let (a, b) = (dir.path("a.img"), dir.path("b.img"));
    std::fs::write(&a, vec![0u8; MIB]).unwrap();
    std::fs::write(&b, vec![0u8; 2 * MIB]).unwrap();
    let (sa, sb) = (
        format!("path={},id=first", a.display()),
        format!("path={},id=second", b.display()),
    );
    let run = boot_testguest(
        "tg.run=blk tg.blk_index=1 tg.seed=9",
        &["--disk", &sa, "--disk", &sb],
    );
    run.assert_pass();
    assert_tg(&run, "blk_id", "second");
    assert_tg(&run, "blk_capacity", "4096");
    assert!(
        std::fs::read(&a).unwrap().iter().all(|&b| b == 0),
        "the first disk was written\n{run}"
    );
    assert_eq!(
        first_difference(&std::fs::read(&b).unwrap(), &blk_pattern(9, 2 * MIB)),
        None,
        "the second disk differs from the guest's pattern\n{run}"
    );
}

#[test]
fn irq_from_virtio_rng_used_buffers() {
    if !kvm_available("irq_from_virtio_rng_used_buffers") {
        return;
    }
    let run = boot_testguest("tg.run=irq tg.irq_source=virtio-rng", &["--rng"]);
    run.assert_pass();
    assert_tg(&run, "irq_count", "16");
}

/// A bandwidth limit slows the guest's disk traffic to the configured rate, and the data still
/// arrive intact. (A lower bound only: the limiter guarantees the guest cannot go faster.)
#[test]
fn blk_bandwidth_limit_holds_the_guest_to_its_rate() {
    if !kvm_available("blk_bandwidth_limit_holds_the_guest_to_its_rate") {
        return;
    }
    let dir = TempDir::new("tg-blk-rate");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 2 * MIB]).unwrap();
    // 1 MiB bucket refilled every 500 ms: 2 MiB/s after the first full bucket.
    let spec = format!("path={},bw=1M:500", disk.display());
    let run = boot_testguest("tg.run=blk tg.seed=3", &["--disk", &spec]);
    run.assert_pass();
    assert_tg(&run, "blk_verify", "ok");
    let us = |key: &str| -> u64 { run.tg().get(key).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let moved_us = us("blk_write_us") + us("blk_read_us");
    // 4 MiB of data (2 written, 2 read back) less the first 1 MiB bucket: at least 1.5 s.
    assert!(
        moved_us >= 1_400_000,
        "4 MiB moved in {moved_us} us, faster than the 2 MiB/s limit allows\n{run}"
    );
    assert_eq!(
        first_difference(&std::fs::read(&disk).unwrap(), &blk_pattern(3, 2 * MIB)),
        None
    );
}

/// An operations limit also holds, and a malformed limit is refused before boot.
#[test]
fn blk_ops_limit_holds_the_guest_to_its_rate() {
    if !kvm_available("blk_ops_limit_holds_the_guest_to_its_rate") {
        return;
    }
    let dir = TempDir::new("tg-blk-ops");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; MIB]).unwrap();
    // 1 MiB in 256 KiB requests: 4 writes, 4 reads and a few more; 4 operations per 200 ms.
    let spec = format!("path={},ops=4:200", disk.display());
    let run = boot_testguest("tg.run=blk tg.blk_req_kib=256", &["--disk", &spec]);
    run.assert_pass();
    let us = |key: &str| -> u64 { run.tg().get(key).and_then(|v| v.parse().ok()).unwrap_or(0) };
    assert!(us("blk_write_us") + us("blk_read_us") >= 150_000, "{run}");
    let bad = format!("path={},ops=4", disk.display());
    let run = boot_testguest("tg.run=blk", &["--disk", &bad]);
    assert_eq!(run.status.code(), Some(2), "{run}");
    assert!(run.stderr.contains("bad rate limit \"4\""), "{run}");
}

/// The throughput mode used by scripts/bench/bench.py moves every byte it reports.
#[test]
fn blk_bench_mode_moves_the_whole_range() {
    if !kvm_available("blk_bench_mode_moves_the_whole_range") {
        return;
    }
    let dir = TempDir::new("tg-blk-bench");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 2 * MIB]).unwrap();
    let spec = format!("path={}", disk.display());
    let run = boot_testguest(
        "tg.run=blk tg.blk_bench=1 tg.blk_req_kib=256",
        &["--disk", &spec],
    );
    run.assert_pass();
    assert_tg(&run, "blk_bench_bytes", &(2 * MIB).to_string());
    assert!(run.tg().contains_key("blk_bench_write_us"), "{run}");
    assert!(run.tg().contains_key("blk_bench_read_us"), "{run}");
}
