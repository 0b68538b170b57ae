//! Raw descriptor-chain handling over hostile tables: the virtio-queue `DescriptorChain`,
//! `Reader` and `Writer` that every anvil device builds on, checked against a plain walk of
//! guest memory.
//!
//! Same input layout as `blk_request` (see `anvil_fuzz::QueueLayout`); the header bytes
//! double as split offsets. Asserts: no panic; a pass pops at most queue-size chains; a head
//! outside the queue yields no buffers and cannot be returned to the used ring;
//! Reader/Writer exist exactly when every buffer of their direction lies in guest memory and
//! then see exactly the sum of those buffers' lengths; reading a chain yields the bytes of its
//! readable buffers in order; writing fills exactly the writable bytes; `split_at` splits at
//! the offset it is given or refuses offsets past the end.

#![no_main]

use std::io::{Read, Write};

use anvil_fuzz::{guest_memory, QueueLayout};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestMemory, Permissions};
use devices::GuestMemoryMmap;

/// The bytes of `descs` read straight from guest memory, or None if one is not in memory.
fn plain_bytes(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for d in descs {
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), len, Permissions::Read) {
            return None;
        }
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, d.addr()).ok()?;
        out.extend_from_slice(&buf);
    }
    Some(out)
}

fuzz_target!(|input: &[u8]| {
    let layout = QueueLayout::decode(input);
    let split = u64::from_le_bytes(layout.header[8..16].try_into().expect("8 bytes")) as usize;
    let mem = guest_memory();
    let mut queue = layout.install(&mem);

    let mut popped = 0u32;
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        popped += 1;
        assert!(popped <= u32::from(layout.queue_size));
        let head = chain.head_index();
        if head >= layout.queue_size {
            // virtio-queue pops such a head as an empty chain and refuses to return it to
            // the used ring, which makes anvil's workers mark the device as needing reset.
            assert_eq!(chain.clone().count(), 0, "head {head} outside the queue yields buffers");
            assert!(queue.add_used(&mem, head, 0).is_err());
            break;
        }

        let all: Vec<Descriptor> = chain.clone().collect();
        let total: u64 = all.iter().map(|d| u64::from(d.len())).sum();
        assert!(total <= u64::from(u32::MAX), "a chain longer than 4 GiB");
        assert!(all.iter().all(|d| !d.refers_to_indirect_table()));
        let readable: Vec<Descriptor> = all.iter().copied().filter(|d| !d.is_write_only()).collect();
        let writable: Vec<Descriptor> = all.iter().copied().filter(|d| d.is_write_only()).collect();
        let r_len: usize = readable.iter().map(|d| d.len() as usize).sum();
        let w_len: usize = writable.iter().map(|d| d.len() as usize).sum();
        // Byte-for-byte comparison only for chains of at most this many readable bytes: a
        // chain may name the whole guest memory 256 times over, and copying that under ASan
        // turns into libFuzzer timeouts that are the harness's, not the code's.
        const COMPARE_MAX: usize = 1 << 20;
        let r_plain = if r_len <= COMPARE_MAX {
            plain_bytes(&mem, &readable)
        } else {
            readable
                .iter()
                .all(|d| d.len() == 0 || mem.check_range(d.addr(), d.len() as usize, Permissions::Read))
                .then(Vec::new)
        };
        let w_in_mem = writable
            .iter()
            .all(|d| d.len() == 0 || mem.check_range(d.addr(), d.len() as usize, Permissions::Write));

        match Reader::new(&mem, chain.clone()) {
            Ok(mut reader) => {
                let expect = r_plain.expect("Reader accepted a buffer outside memory");
                assert_eq!(reader.available_bytes(), r_len);
                let mut tail = match reader.split_at(split) {
                    Ok(t) => {
                        assert!(split <= r_len);
                        assert_eq!(reader.available_bytes() + t.available_bytes(), r_len);
                        t
                    }
                    Err(_) => {
                        assert!(split > r_len, "split at {split} of {r_len} refused");
                        reader.split_at(r_len).expect("split at the end")
                    }
                };
                if r_len <= COMPARE_MAX {
                    let mut got = Vec::new();
                    reader.read_to_end(&mut got).expect("read");
                    tail.read_to_end(&mut got).expect("read tail");
                    assert!(got == expect, "Reader returned other bytes than the buffers hold");
                    assert_eq!(reader.bytes_read() + tail.bytes_read(), r_len);
                }
            }
            Err(_) => assert!(r_plain.is_none(), "Reader refused buffers inside memory"),
        }

        match Writer::new(&mem, chain.clone()) {
            Ok(mut writer) => {
                assert!(w_in_mem, "Writer accepted a buffer outside memory");
                assert_eq!(writer.available_bytes(), w_len);
                let fill = vec![0xa5u8; w_len.min(COMPARE_MAX)];
                let n = writer.write(&fill).expect("write");
                assert_eq!(n, fill.len());
                assert_eq!(writer.bytes_written(), fill.len());
                if w_len <= fill.len() {
                    assert_eq!(writer.available_bytes(), 0);
                    assert_eq!(writer.write(&[1]).expect("write at end"), 0);
                }
            }
            Err(_) => assert!(!w_in_mem, "Writer refused buffers inside memory"),
        }

        if queue.add_used(&mem, head, 0).is_err() {
            break;
        }
    }
});
