//! Packets per second through the virtio-net model, no guest and no KVM, on a tap the bench
//! creates (root and /dev/net/tun needed; the bench says so and skips otherwise):
//!
//! - transmit: the driver side publishes batches of frames on the transmit queue, the
//!   device's worker writes them to the tap (the host stack drops them: broadcast frames of
//!   a local experimental EtherType);
//! - receive: the driver side posts receive buffers, the bench sends frames into the tap
//!   from the host through an AF_PACKET socket, the worker moves them into the buffers.
//!
//!     cargo bench -p devices --bench net

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Rig, F_WRITE, VERSION_1};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use devices::virtio::net::{Net, Tap, VNET_HDR_LEN};
use devices::virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
/// VIRTIO_NET_F_MAC.
const F_MAC: u64 = 1 << 5;
/// Frames per batch (one descriptor each).
const BATCH: u16 = 128;
/// Buffers start here, one 2 KiB slot per descriptor.
const BUFS: u64 = 0x10_0000;
const SLOT: u64 = 2048;
/// Local experimental EtherType (IEEE 802): nothing on the host handles it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// A tap made for the bench, removed on drop.
struct BenchTap(String);

impl BenchTap {
    fn create() -> Result<Self, String> {
        let name = format!("anvbench{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"])?;
        let tap = Self(name);
        // No IPv6 chatter (router solicitations) into the receive queue.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.0),
            "1",
        );
        ip(&["link", "set", &tap.0, "up"])?;
        Ok(tap)
    }
}

impl Drop for BenchTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// A frame of `len` bytes (Ethernet header included) to the broadcast address.
fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&ETHERTYPE);
    f
}

/// An AF_PACKET socket sending on interface `name`.
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn open(name: &str) -> std::io::Result<Self> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let ifname = std::ffi::CString::new(name).expect("interface name");
        // SAFETY: if_nametoindex reads a NUL-terminated string, which `ifname` is.
        let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
        if index == 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new socket nobody else owns.
        let sock = Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET fits sa_family_t");
        addr.sll_ifindex = i32::try_from(index).expect("interface index fits");
        // SAFETY: `addr` is a sockaddr_ll and the length passed is its size.
        let ret = unsafe {
            libc::bind(
                sock.0.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>())
                    .expect("small struct"),
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(sock)
    }

    fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: the kernel reads `frame.len()` bytes from `frame`.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "AF_PACKET send failed");
    }
}

fn transmit(rig: &mut Rig, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        rig.queues[TX].publish(&rig.mem, 0..BATCH);
        rig.kick(TX);
        rig.wait_all_used(TX);
    }
    start.elapsed()
}

fn receive(rig: &mut Rig, sock: &PacketSocket, frame: &[u8], iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        rig.queues[RX].publish(&rig.mem, 0..BATCH);
        rig.kick(RX);
        for _ in 0..BATCH {
            sock.send(frame);
        }
        rig.wait_all_used(RX);
    }
    start.elapsed()
}

fn net(c: &mut Criterion) {
    let tap = match BenchTap::create() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("\n*** SKIPPING the virtio-net benches: cannot create a tap ({e}); run as root with /dev/net/tun ***\n");
            return;
        }
    };
    let mut group = c.benchmark_group("virtio-net");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .throughput(Throughput::Elements(u64::from(BATCH)));
    for len in [64usize, 1514] {
        let mut dev = Net::new(
            Tap::open(&tap.0).expect("open the bench tap"),
            [2, 0, 0, 0, 0, 2],
            0,
        );
        let mut rig = Rig::activate(&mut dev, 2, 16 << 20, VERSION_1 | F_MAC);
        // Transmit chains: one readable buffer, virtio-net header (zeros: no offloads) + frame.
        let f = frame(len);
        for i in 0..BATCH {
            let at = BUFS + SLOT * u64::from(i);
            rig.mem
                .write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(at))
                .expect("header");
            rig.mem
                .write_slice(&f, GuestAddress(at + VNET_HDR_LEN as u64))
                .expect("frame");
            rig.queues[TX].put_desc(
                &rig.mem,
                i,
                at,
                u32::try_from(VNET_HDR_LEN + len).expect("small frame"),
                0,
                0,
            );
        }
        group.bench_function(BenchmarkId::new("tx-frames", len), |b| {
            b.iter_custom(|iters| transmit(&mut rig, iters))
        });
        // Receive buffers: one writable slot each.
        let rx_base = BUFS + SLOT * u64::from(BATCH);
        for i in 0..BATCH {
            let at = rx_base + SLOT * u64::from(i);
            rig.queues[RX].put_desc(
                &rig.mem,
                i,
                at,
                u32::try_from(SLOT).expect("small slot"),
                F_WRITE,
                0,
            );
        }
        let sock = PacketSocket::open(&tap.0).expect("AF_PACKET socket on the bench tap");
        group.bench_function(BenchmarkId::new("rx-frames", len), |b| {
            b.iter_custom(|iters| receive(&mut rig, &sock, &f, iters))
        });
        let rx_frames = dev.metrics().rx_packets_count.get();
        assert!(rx_frames > 0, "no frame reached the receive queue");
        dev.reset();
    }
    group.finish();
}

criterion_group!(benches, net);
criterion_main!(benches);
