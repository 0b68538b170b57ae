//! Requests per second through the virtio-blk model, no guest and no KVM: a driver thread
//! publishes batches of requests on a hand-made queue, notifies the device's eventfd and
//! waits for its interrupt; the device's worker thread runs them against a file in
//! /var/tmp (page cache). Covers the whole host-side path: worker wake-up, chain parsing,
//! checks, the preadv/pwritev on guest memory, used ring and interrupt.
//!
//!     cargo bench -p devices --bench blk

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Rig, F_NEXT, F_WRITE, QUEUE_SIZE, VERSION_1};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use devices::virtio::block::Block;
use devices::virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
/// Headers and status bytes live here, one 32-byte slot per request of a batch.
const META: u64 = 0x10_0000;
/// Data buffers start here.
const DATA: u64 = 0x20_0000;
const MEM_BYTES: usize = 64 << 20;
const DISK_BYTES: u64 = 64 << 20;

/// A disk image that removes itself.
struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn image() -> Image {
    let path = PathBuf::from(format!(
        "/var/tmp/anvil-blk-bench-{}.img",
        std::process::id()
    ));
    let mut f = std::fs::File::create(&path).expect("create the disk image");
    // Written out (not sparse), so reads come from the page cache like a used disk's.
    let chunk = vec![0x5a_u8; 1 << 20];
    for _ in 0..(DISK_BYTES >> 20) {
        f.write_all(&chunk).expect("fill the disk image");
    }
    Image(path)
}

/// One configuration: request size, how many requests per batch, direction.
struct Load {
    name: &'static str,
    kind: u32,
    bytes: u32,
    batch: u16,
}

/// Sets up `batch` three-descriptor chains (header, data, status) for `load`.
fn build_chains(rig: &Rig, load: &Load) {
    let q = &rig.queues[0];
    let data_flags = if load.kind == T_IN { F_WRITE } else { 0 };
    for i in 0..load.batch {
        let meta = META + 32 * u64::from(i);
        let head = 3 * i;
        rig.mem
            .write_obj(load.kind, GuestAddress(meta))
            .expect("header");
        q.put_desc(&rig.mem, head, meta, 16, F_NEXT, head + 1);
        let data = DATA + u64::from(i) * u64::from(load.bytes);
        q.put_desc(
            &rig.mem,
            head + 1,
            data,
            load.bytes,
            data_flags | F_NEXT,
            head + 2,
        );
        q.put_desc(&rig.mem, head + 2, meta + 16, 1, F_WRITE, 0);
    }
}

/// Runs `iters` batches of sequential requests; returns the time they took.
fn run(rig: &mut Rig, load: &Load, sector: &mut u64, iters: u64) -> Duration {
    let sectors_per_req = u64::from(load.bytes) / 512;
    let disk_sectors = DISK_BYTES / 512;
    let start = Instant::now();
    for _ in 0..iters {
        for i in 0..load.batch {
            if *sector + sectors_per_req > disk_sectors {
                *sector = 0;
            }
            let meta = META + 32 * u64::from(i);
            rig.mem
                .write_obj(*sector, GuestAddress(meta + 8))
                .expect("header");
            *sector += sectors_per_req;
        }
        rig.queues[0].publish(&rig.mem, (0..load.batch).map(|i| 3 * i));
        rig.kick(0);
        rig.wait_all_used(0);
        // Every request must have succeeded, or the figure means nothing.
        for i in 0..load.batch {
            let status: u8 = rig
                .mem
                .read_obj(GuestAddress(META + 32 * u64::from(i) + 16))
                .expect("status");
            assert_eq!(status, 0, "request failed");
        }
    }
    start.elapsed()
}

fn blk(c: &mut Criterion) {
    let loads = [
        Load {
            name: "4KiB-read",
            kind: T_IN,
            bytes: 4 << 10,
            batch: 64,
        },
        Load {
            name: "4KiB-write",
            kind: T_OUT,
            bytes: 4 << 10,
            batch: 64,
        },
        Load {
            name: "64KiB-read",
            kind: T_IN,
            bytes: 64 << 10,
            batch: 64,
        },
        Load {
            name: "64KiB-write",
            kind: T_OUT,
            bytes: 64 << 10,
            batch: 64,
        },
        Load {
            name: "1MiB-read",
            kind: T_IN,
            bytes: 1 << 20,
            batch: 16,
        },
        Load {
            name: "1MiB-write",
            kind: T_OUT,
            bytes: 1 << 20,
            batch: 16,
        },
    ];
    let img = image();
    let mut group = c.benchmark_group("virtio-blk");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    for load in &loads {
        assert!(load.batch * 3 <= QUEUE_SIZE);
        let mut dev = Block::open(&img.0, false, "bench", 0).expect("open the disk image");
        let mut rig = Rig::activate(&mut dev, 1, MEM_BYTES, VERSION_1);
        build_chains(&rig, load);
        let mut sector = 0;
        group.throughput(Throughput::Elements(u64::from(load.batch)));
        group.bench_function(BenchmarkId::new("requests", load.name), |b| {
            b.iter_custom(|iters| run(&mut rig, load, &mut sector, iters))
        });
        dev.reset();
    }
    group.finish();
}

criterion_group!(benches, blk);
criterion_main!(benches);
