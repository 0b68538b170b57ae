//! The host-side baseline of the virtio-net transmit benchmark (`scripts/bench/bench.py net`):
//! writes the same frames the test guest's `tg.net_bench=1` sends (virtio-net header of
//! zeros, then a broadcast Ethernet frame of a local experimental EtherType) straight to the
//! same tap, one `write` per frame, through the tap code the device uses.
//!
//!     cargo run --release -p devices --example tap_blast -- TAP FRAME_BYTES MIB
//!
//! Prints `host_bench_frames=`, `host_bench_bytes=` (Ethernet frames, headers excluded) and
//! `host_bench_us=`.

use std::time::Instant;

use devices::virtio::net::{Tap, VNET_HDR_LEN};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, tap, frame, mib] = &args[..] else {
        return Err("usage: tap_blast TAP FRAME_BYTES MIB".into());
    };
    let len: usize = frame.parse::<usize>()?.clamp(60, 1514);
    let total: u64 = mib.parse::<u64>()? << 20;
    let frames = (total / len as u64).max(1);
    let mut tap = Tap::open(tap)?;
    let mut buf = vec![0u8; VNET_HDR_LEN + len];
    let f = &mut buf[VNET_HDR_LEN..];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0x00, 0x7e, 0x57, 0x02]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    let start = Instant::now();
    for _ in 0..frames {
        loop {
            match tap.write_frame(&buf) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    let us = start.elapsed().as_micros();
    println!("host_bench_frames={frames}");
    println!("host_bench_bytes={}", frames * len as u64);
    println!("host_bench_us={us}");
    Ok(())
}
