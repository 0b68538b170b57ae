//! virtio-blk request path over hostile split virtqueues.
//!
//! The input is decoded into a queue layout (descriptor table, indirect table, available
//! ring, request header, data; see `anvil_fuzz::QueueLayout`) written into guest memory.
//! Chains are popped with virtio-queue exactly as the block worker does
//! (`BlockHandler::process_queue` / `BlockIo::handle` in devices/src/virtio/block/mod.rs) and run
//! through `devices::virtio::block::request::Request` against a memfd-backed disk.
//!
//! Asserts: no panic; the status byte is OK, IOERR or UNSUPP and lands in the chain's last
//! writable byte; the used length never exceeds the chain's writable bytes; successful requests
//! move exactly the bytes they should; read-only disks are never written; the disk's size never
//! changes; only successful writes change its content; at most queue-size chains are popped per pass (no endless loop).

#![no_main]

use std::os::unix::fs::FileExt;

use anvil_fuzz::{guest_memory, memfd, QueueLayout};
use devices::virtio::block::request::{
    ChainError, Disk, Request, RequestError, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{DescriptorChain, QueueT, Reader};
use vm_memory::{Bytes, GuestAddress};
use devices::GuestMemoryMmap;

const ID: &str = "fuzz-serial-0123456789abcdef";
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// What one request did, for the checks.
struct Outcome {
    status: u8,
    used_len: u32,
}

/// Mirrors `BlockIo::handle`; returns None where the device returns used length 0 without
/// touching the chain.
fn handle(
    mem: &GuestMemoryMmap,
    disk: &mut Disk,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Option<Outcome> {
    // Taken before the request runs: the chain may overlay its own descriptor table, and
    // walking it again would read what the request wrote there.
    let readable: usize = chain.clone().readable().map(|d| d.len() as usize).sum();
    let writable: usize = chain.clone().writable().map(|d| d.len() as usize).sum();
    // The status byte goes to the last byte of the last non-empty writable buffer.
    let last = chain.clone().writable().filter(|d| d.len() > 0).last();
    let header_type: Option<u32> = Reader::new(mem, chain.clone()).ok().and_then(|mut r| {
        r.read_obj::<[u8; 16]>()
            .ok()
            .map(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]))
    });
    let request = match Request::parse(mem, chain) {
        Ok(r) => r,
        Err(ChainError::NoStatus) => {
            assert_eq!(writable, 0, "a chain with a writable byte has a status");
            return None;
        }
        Err(_) => return None,
    };
    let last = last.expect("a parsed request has a writable byte");
    let data_len = request.writable_bytes();
    assert_eq!(data_len, writable - 1);
    let before = snapshot(disk);

    let result = request.execute(disk);
    let (status, written) = match &result {
        Ok(n) => (STATUS_OK, *n),
        Err(e) => (e.status(), 0),
    };
    assert!(
        [STATUS_OK, STATUS_IOERR, STATUS_UNSUPP].contains(&status),
        "status {status}"
    );
    assert!(written <= data_len, "wrote {written} of {data_len} bytes");

    match (&result, header_type) {
        (Err(RequestError::NoHeader), h) => assert!(h.is_none() && readable < 16),
        (_, None) => panic!("a request without a header got {result:?}"),
        (Ok(n), Some(T_IN)) => assert_eq!(*n, data_len, "a read fills its buffers"),
        (Ok(n), Some(T_OUT)) => {
            assert_eq!(*n, 0);
            assert!(!disk.read_only, "write to a read-only disk succeeded");
        }
        (Ok(n), Some(T_FLUSH)) => assert_eq!(*n, 0),
        (Ok(n), Some(T_GET_ID)) => assert_eq!(*n, data_len.min(20)),
        (Ok(_), Some(t)) => panic!("unknown type {t} succeeded"),
        (Err(RequestError::Unsupported(t)), Some(h)) => {
            assert_eq!(*t, h);
            assert!(![T_IN, T_OUT, T_FLUSH, T_GET_ID].contains(t));
        }
        (Err(RequestError::ReadOnly), Some(T_OUT)) => assert!(disk.read_only),
        (Err(e), Some(t)) => {
            assert_eq!(e.status(), STATUS_IOERR, "{e}");
            assert!(
                [T_IN, T_OUT].contains(&t),
                "type {t} failed with {e} (only reads and writes can)"
            );
        }
    }
    if header_type != Some(T_OUT) || result.is_err() {
        assert!(snapshot(disk) == before, "only a successful write changes the disk");
    }

    let used_len = request.complete(status, written);
    let at = GuestAddress(last.addr().0 + u64::from(last.len()) - 1);
    assert_eq!(mem.read_obj::<u8>(at).ok(), Some(status));
    Some(Outcome { status, used_len })
}

/// The disk's content.
fn snapshot(disk: &Disk) -> Vec<u8> {
    let mut now = vec![0u8; usize::try_from(disk.capacity_bytes).expect("small disk")];
    disk.file.read_exact_at(&mut now, 0).expect("disk read");
    now
}

fuzz_target!(|input: &[u8]| {
    let layout = QueueLayout::decode(input);
    let mem = guest_memory();
    let mut queue = layout.install(&mem);

    let capacity = layout.disk_sectors * 512;
    let content: Vec<u8> = (0..capacity).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    let file = memfd(capacity);
    file.write_all_at(&content, 0).expect("disk content");
    let mut disk = Disk {
        file,
        capacity_bytes: capacity,
        read_only: layout.read_only,
        id: ID.to_string(),
    };

    let mut popped = 0u32;
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        popped += 1;
        assert!(
            popped <= u32::from(layout.queue_size),
            "more chains than the queue holds"
        );
        let head = chain.head_index();
        let writable_total: u64 = chain
            .clone()
            .writable()
            .map(|d| u64::from(d.len()))
            .sum();
        let outcome = handle(&mem, &mut disk, chain);
        let used_len = outcome.as_ref().map_or(0, |o| o.used_len);
        assert!(
            u64::from(used_len) <= writable_total,
            "used length {used_len} > writable {writable_total}"
        );
        if let Some(o) = &outcome {
            assert!(o.status <= STATUS_UNSUPP);
        }
        // The device stops (needs reset) when the used ring cannot be written.
        if queue.add_used(&mem, head, used_len).is_err() {
            break;
        }
    }

    let len = disk.file.metadata().expect("disk metadata").len();
    assert_eq!(len, capacity, "the disk changed size");
    if disk.read_only {
        let mut now = vec![0u8; content.len()];
        disk.file.read_exact_at(&mut now, 0).expect("disk read");
        assert!(now == content, "a read-only disk was modified");
    }
});
