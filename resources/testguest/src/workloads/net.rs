//! `net`: a virtio-net device (device ID 1, queues rx=0 and tx=1) pinging a host over a tap:
//! ARP for the peer, then ICMP echo requests with patterned payloads, matched against the
//! host kernel's echo replies; ARP requests for our address are answered meanwhile.
//!
//! Parameters: `tg.ip` (10.0.0.2), `tg.peer` (10.0.0.1), `tg.pings` (8), `tg.size` (56 payload
//! bytes, at most 1472), `tg.net_index` (0: the first network device on the command line),
//! `tg.io_timeout_ms` (5000: per ARP attempt and per echo reply), `tg.retries` (0: echo
//! requests sent again after a timeout, in all), `tg.ping_gap_ms` (0: a pause before each echo
//! request), `tg.arp` (1; with 0 the
//! guest does not ARP: the first echo request goes to the broadcast MAC and the peer's MAC is
//! learned from its reply, so the host has to ARP for us and our responder is exercised).
//!
//! Only VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS are accepted: no
//! offloads, so every frame carries complete checksums, and no mergeable buffers, so each
//! receive buffer holds one whole frame after the 12-byte `virtio_net_hdr_v1`. Frames are sent
//! as one readable descriptor (header and frame together). Receive buffers are one writable
//! descriptor of 2 KiB each, reposted as soon as a frame is consumed.
//!
//! Prints `net_device=<addr> irq=<n> features=<hex> queue_size=<n>`, `net_mac=<mac>` (from
//! the configuration space), `net_link=up|down` (with VIRTIO_NET_F_STATUS), `net_peer_mac=<mac>`,
//! `net_pings=<n>`, `net_replies=<n>`, `net_rtt_us=<median>`, `net_rx_frames=<n>` (everything
//! received, including frames not for us), `net_arp_answered=<n>`, then the result: pass when
//! every echo request got its reply with the right identifier, sequence and payload.
//!
//! `tg.net_bench=1` measures transmit throughput instead (no ARP, no pings): see [`bench_tx`].

use super::param;
use crate::bootinfo::BootInfo;
use crate::cmdline::Params;
use crate::dma::Arena;
use crate::virtio::{Chain, Device, Queue, VirtioError};
use crate::{exit, io, phys, time};

/// virtio device ID of a network card (5.1).
const DEVICE_ID_NET: u32 = 1;
// Feature bits (5.1.3).
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
// Configuration space (5.1.4): mac[6], then status (le16) with VIRTIO_NET_F_STATUS.
const CFG_MAC: u64 = 0;
const CFG_STATUS: u64 = 6;
const LINK_UP: u16 = 1;
/// `struct virtio_net_hdr_v1` (5.1.6): flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
const HDR: u64 = 12;
const RX_BUF: u64 = 2048;
const RX_BUFFERS: u16 = 64;
const QUEUE_SIZE: u16 = 128;
const MAX_PINGS: usize = 1024;
/// The largest ICMP payload in one 1500-byte IPv4 packet.
const MAX_PAYLOAD: u64 = 1500 - 20 - 8;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const IPPROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const BROADCAST: [u8; 6] = [0xff; 6];
/// Used when the device offers no MAC (locally administered).
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x7e, 0x57, 0x01];

/// Parses a dotted IPv4 address.
fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut out {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn ip_param(params: &Params<'_>, key: &'static str, default: [u8; 4]) -> [u8; 4] {
    match params.get(key) {
        None => default,
        Some(s) => match parse_ip(s) {
            Some(ip) => ip,
            None => exit::fail(format_args!("bad parameter tg.{key}")),
        },
    }
}

/// A MAC address for printing.
struct Mac([u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Payload byte `i` of echo request `seq`.
fn payload_byte(id: u16, seq: u16, i: usize) -> u8 {
    (i as u32)
        .wrapping_mul(7)
        .wrapping_add(u32::from(seq).wrapping_mul(31))
        .wrapping_add(u32::from(id)) as u8
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The network device and its state.
struct Net {
    dev: Device,
    rx: Queue,
    tx: Queue,
    /// The receive buffer behind each rx descriptor head.
    rx_buf: [u64; QUEUE_SIZE as usize],
    tx_buf: u64,
    mac: [u8; 6],
    ip: [u8; 4],
    peer_ip: [u8; 4],
    timeout: u64,
    rx_frames: u64,
    arp_answered: u64,
}

/// What a received frame was.
enum Rx {
    Other,
    ArpReply([u8; 6]),
    Echo {
        src: [u8; 6],
        id: u16,
        seq: u16,
        ok: bool,
    },
}

impl Net {
    fn open(params: &Params<'_>, arena: &mut Arena, timeout: u64) -> Net {
        let index = param(params, "net_index", 0);
        let mut dev = match Device::find(params, DEVICE_ID_NET, index) {
            Ok(d) => d,
            Err(e) => exit::fail(format_args!("net device: {e}")),
        };
        if let Err(e) = dev.init(F_MAC | F_STATUS, timeout) {
            exit::fail(format_args!("net init: {e}"));
        }
        let rx = Self::queue(&dev, arena, 0);
        let tx = Self::queue(&dev, arena, 1);
        let Some(tx_buf) = arena.alloc(4096, 4096) else {
            exit::fail(format_args!("no RAM for the net transmit buffer"))
        };
        let mut mac = DEFAULT_MAC;
        if dev.features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = dev.config_u8(CFG_MAC + i as u64);
            }
        }
        let mut net = Net {
            dev,
            rx,
            tx,
            rx_buf: [0; QUEUE_SIZE as usize],
            tx_buf,
            mac,
            ip: ip_param(params, "ip", [10, 0, 0, 2]),
            peer_ip: ip_param(params, "peer", [10, 0, 0, 1]),
            timeout,
            rx_frames: 0,
            arp_answered: 0,
        };
        // Receive buffers go in before DRIVER_OK, so no frame is dropped for want of one.
        let n = RX_BUFFERS.min(net.rx.size());
        for _ in 0..n {
            let Some(buf) = arena.alloc(RX_BUF, 64) else {
                exit::fail(format_args!("no RAM for the net receive buffers"))
            };
            if let Err(e) = net.post_rx(buf) {
                exit::fail(format_args!("net receive buffer: {e}"));
            }
        }
        net.dev.driver_ok();
        net.rx.notify();
        net
    }

    fn queue(dev: &Device, arena: &mut Arena, index: u16) -> Queue {
        match dev.queue(arena, index, QUEUE_SIZE) {
            Ok(q) => q,
            Err(e) => exit::fail(format_args!("net queue {index}: {e}")),
        }
    }

    fn post_rx(&mut self, buf: u64) -> Result<(), VirtioError> {
        let mut chain = Chain::new();
        chain.writable(buf, RX_BUF as u32)?;
        let head = self.rx.submit(&chain)?;
        self.rx_buf[usize::from(head)] = buf;
        Ok(())
    }

    /// Sends `frame` (the Ethernet frame, padded to 60 bytes) and waits for the device to
    /// take it.
    fn send(&mut self, frame: &[u8]) {
        let len = frame.len().max(60);
        // SAFETY: `tx_buf` is a page of arena RAM that only this driver uses, and the device
        // has returned it (every transmission completes before the next).
        let buf = unsafe { phys::bytes_mut(self.tx_buf, 4096) };
        buf[..HDR as usize].fill(0);
        buf[HDR as usize..HDR as usize + len].fill(0);
        buf[HDR as usize..HDR as usize + frame.len()].copy_from_slice(frame);
        let mut chain = Chain::new();
        let r = chain
            .readable(self.tx_buf, (HDR as usize + len) as u32)
            .map(|_| ())
            .and_then(|()| self.tx.transact(&chain, self.timeout));
        if let Err(e) = r {
            exit::fail(format_args!("net transmit: {e}"));
        }
    }

    fn eth_header(&self, frame: &mut [u8], dst: [u8; 6], ethertype: u16) {
        frame[0..6].copy_from_slice(&dst);
        frame[6..12].copy_from_slice(&self.mac);
        frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
    }

    /// An ARP request (op 1) or reply (op 2) to `tha`/`tpa`.
    fn send_arp(&mut self, op: u16, dst: [u8; 6], tha: [u8; 6], tpa: [u8; 4]) {
        let mut f = [0u8; 42];
        self.eth_header(&mut f, dst, ETHERTYPE_ARP);
        let a = &mut f[ETH_HLEN..];
        a[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        a[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        a[4] = 6;
        a[5] = 4;
        a[6..8].copy_from_slice(&op.to_be_bytes());
        a[8..14].copy_from_slice(&self.mac);
        a[14..18].copy_from_slice(&self.ip);
        a[18..24].copy_from_slice(&tha);
        a[24..28].copy_from_slice(&tpa);
        self.send(&f);
    }

    fn send_echo(&mut self, peer_mac: [u8; 6], id: u16, seq: u16, size: usize) {
        let mut f = [0u8; ETH_HLEN + 20 + 8 + MAX_PAYLOAD as usize];
        self.eth_header(&mut f, peer_mac, ETHERTYPE_IPV4);
        let total = 20 + 8 + size;
        let ip = &mut f[ETH_HLEN..ETH_HLEN + total];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&seq.to_be_bytes());
        ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
        ip[8] = 64;
        ip[9] = IPPROTO_ICMP;
        ip[12..16].copy_from_slice(&self.ip);
        ip[16..20].copy_from_slice(&self.peer_ip);
        let c = checksum(&ip[..20]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let icmp = &mut ip[20..];
        icmp[0] = ICMP_ECHO_REQUEST;
        icmp[4..6].copy_from_slice(&id.to_be_bytes());
        icmp[6..8].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in icmp[8..].iter_mut().enumerate() {
            *b = payload_byte(id, seq, i);
        }
        let c = checksum(icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        self.send(&f[..ETH_HLEN + total]);
    }

    /// Takes the next received frame, if any, classifies it (answering ARP requests for us)
    /// and gives its buffer back to the device.
    fn receive(&mut self) -> Option<Rx> {
        let (head, len) = match self.rx.poll() {
            Ok(Some(x)) => x,
            Ok(None) => return None,
            Err(e) => exit::fail(format_args!("net receive: {e}")),
        };
        let buf = self.rx_buf[usize::from(head)];
        if u64::from(len) > RX_BUF || buf == 0 {
            exit::fail(format_args!(
                "net received {len} bytes in a {RX_BUF}-byte buffer"
            ));
        }
        self.rx_frames += 1;
        let mut frame = [0u8; RX_BUF as usize];
        let n = (len as usize).saturating_sub(HDR as usize);
        for (i, b) in frame[..n].iter_mut().enumerate() {
            *b = phys::read_u8(buf + HDR + i as u64);
        }
        if let Err(e) = self.post_rx(buf) {
            exit::fail(format_args!("net receive buffer: {e}"));
        }
        self.rx.notify();
        Some(self.classify(&frame[..n]))
    }

    fn classify(&mut self, f: &[u8]) -> Rx {
        if f.len() < ETH_HLEN || (f[0..6] != self.mac && f[0..6] != BROADCAST) {
            return Rx::Other;
        }
        let p = &f[ETH_HLEN..];
        match be16(f, 12) {
            ETHERTYPE_ARP if p.len() >= 28 && p[4] == 6 && p[5] == 4 => {
                let op = be16(p, 6);
                let mut sha = [0u8; 6];
                sha.copy_from_slice(&p[8..14]);
                let spa = [p[14], p[15], p[16], p[17]];
                let tpa = [p[24], p[25], p[26], p[27]];
                if tpa != self.ip {
                    return Rx::Other;
                }
                if op == ARP_REQUEST {
                    self.send_arp(ARP_REPLY, sha, sha, spa);
                    self.arp_answered += 1;
                    return Rx::Other;
                }
                if op == ARP_REPLY && spa == self.peer_ip {
                    return Rx::ArpReply(sha);
                }
                Rx::Other
            }
            ETHERTYPE_IPV4 if p.len() >= 20 + 8 && p[0] == 0x45 && p[9] == IPPROTO_ICMP => {
                let total = usize::from(be16(p, 2));
                if total > p.len()
                    || total < 28
                    || p[12..16] != self.peer_ip
                    || p[16..20] != self.ip
                {
                    return Rx::Other;
                }
                let icmp = &p[20..total];
                if icmp[0] != ICMP_ECHO_REPLY {
                    return Rx::Other;
                }
                let (id, seq) = (be16(icmp, 4), be16(icmp, 6));
                let sums_ok = checksum(&p[..20]) == 0 && checksum(icmp) == 0;
                let payload_ok = icmp[8..]
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == payload_byte(id, seq, i));
                let mut src = [0u8; 6];
                src.copy_from_slice(&f[6..12]);
                Rx::Echo {
                    src,
                    id,
                    seq,
                    ok: sums_ok && payload_ok,
                }
            }
            _ => Rx::Other,
        }
    }
}

/// ARPs for the peer: up to three requests, a timeout each. Returns its MAC.
fn arp_for_peer(net: &mut Net, timeout: u64) -> [u8; 6] {
    for _ in 0..3 {
        let peer_ip = net.peer_ip;
        net.send_arp(ARP_REQUEST, BROADCAST, [0; 6], peer_ip);
        let deadline = io::rdtsc().wrapping_add(timeout);
        while before(deadline) {
            if let Some(Rx::ArpReply(m)) = net.receive() {
                return m;
            }
            core::hint::spin_loop();
        }
    }
    exit::fail(format_args!("no ARP reply from the peer"))
}

fn before(deadline: u64) -> bool {
    (io::rdtsc().wrapping_sub(deadline) as i64) < 0
}

/// Local experimental EtherType (IEEE 802): no host protocol handles it, so the host stack
/// drops the benchmark's frames as soon as it sees them.
const ETHERTYPE_BENCH: u16 = 0x88b5;

/// `tg.net_bench=1`: sends `tg.net_bench_mib` MiB (256) of `tg.net_frame`-byte frames (1514,
/// Ethernet header included; 60 to 1514) to the broadcast address with [`ETHERTYPE_BENCH`],
/// as fast as the device takes them: the transmit queue is kept full (each chain is one
/// readable descriptor over the same buffer) and refilled, with one notification, whenever
/// half of it has been used. Prints `net_bench_frames`, `net_bench_bytes` (Ethernet frames,
/// virtio-net headers excluded) and `net_bench_us`.
fn bench_tx(net: &mut Net, params: &Params<'_>, khz: u64) -> ! {
    let len = param(params, "net_frame", 1514).clamp(60, 1514) as usize;
    let total_bytes = param(params, "net_bench_mib", 256).saturating_mul(1 << 20);
    let frames = (total_bytes / len as u64).max(1);
    // SAFETY: `tx_buf` is a page of arena RAM that only this driver uses; the device only
    // reads it, and nothing writes it once the loop below starts.
    let buf = unsafe { phys::bytes_mut(net.tx_buf, 4096) };
    buf[..HDR as usize + len].fill(0);
    let f = &mut buf[HDR as usize..];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&net.mac);
    f[12..14].copy_from_slice(&ETHERTYPE_BENCH.to_be_bytes());
    let mut chain = Chain::new();
    if let Err(e) = chain.readable(net.tx_buf, (HDR as usize + len) as u32) {
        exit::fail(format_args!("net bench chain: {e}"));
    }
    let size = net.tx.size();
    let (mut submitted, mut done) = (0u64, 0u64);
    let t0 = io::rdtsc();
    let mut last_progress = t0;
    while done < frames {
        if net.tx.free() >= size / 2 {
            let mut added = false;
            while submitted < frames && net.tx.free() > 0 {
                if let Err(e) = net.tx.submit(&chain) {
                    exit::fail(format_args!("net bench submit: {e}"));
                }
                submitted += 1;
                added = true;
            }
            if added {
                net.tx.notify();
            }
        }
        let mut progressed = false;
        loop {
            match net.tx.poll() {
                Ok(Some(_)) => {
                    done += 1;
                    progressed = true;
                }
                Ok(None) => break,
                Err(e) => exit::fail(format_args!("net bench: {e}")),
            }
        }
        let now = io::rdtsc();
        if progressed {
            last_progress = now;
        } else if now.wrapping_sub(last_progress) > net.timeout {
            exit::fail(format_args!("net bench: the device stopped taking frames"));
        } else {
            core::hint::spin_loop();
        }
    }
    let us = (io::rdtsc() - t0) * 1000 / khz;
    crate::tg!("net_bench_frames={frames}");
    crate::tg!("net_bench_bytes={}", frames * len as u64);
    crate::tg!("net_bench_us={us}");
    exit::pass()
}

/// Runs the workload.
pub fn run(info: &BootInfo, params: &Params<'_>) -> ! {
    let pings = param(params, "pings", 8).min(MAX_PINGS as u64);
    let size = param(params, "size", 56);
    if size > MAX_PAYLOAD {
        exit::fail(format_args!("tg.size={size} is above {MAX_PAYLOAD}"));
    }
    let timeout_ms = param(params, "io_timeout_ms", 5000);
    let (khz, _) = time::tsc_khz();
    let khz = khz.max(1);
    let timeout = timeout_ms.saturating_mul(khz);
    let Some(mut arena) = Arena::new(info) else {
        exit::fail(format_args!("no RAM for the net buffers"))
    };
    let mut net = Net::open(params, &mut arena, timeout);
    crate::tg!(
        "net_device={:#x} irq={} features={:#x} queue_size={}",
        net.dev.base(),
        net.dev.irq,
        net.dev.features,
        net.rx.size()
    );
    crate::tg!("net_mac={}", Mac(net.mac));
    if net.dev.features & F_STATUS != 0 {
        let status = u16::from(net.dev.config_u8(CFG_STATUS))
            | (u16::from(net.dev.config_u8(CFG_STATUS + 1)) << 8);
        let up = if status & LINK_UP != 0 { "up" } else { "down" };
        crate::tg!("net_link={up}");
    }

    if param(params, "net_bench", 0) == 1 {
        bench_tx(&mut net, params, khz);
    }

    let mut peer_mac = if param(params, "arp", 1) != 0 {
        let m = arp_for_peer(&mut net, timeout);
        crate::tg!("net_peer_mac={}", Mac(m));
        Some(m)
    } else {
        None
    };

    let id = (io::rdtsc() as u16) | 1;
    let mut rtt = [0u64; MAX_PINGS];
    let mut replies = 0usize;
    let mut retries = param(params, "retries", 0);
    let gap = param(params, "ping_gap_ms", 0).saturating_mul(khz);
    for seq in 0..pings as u16 {
        if gap > 0 {
            time::wait_until(io::rdtsc().wrapping_add(gap));
        }
        let mut start = io::rdtsc();
        // Without ARP the first request goes to the broadcast address: the host must then
        // ARP for us to answer it.
        net.send_echo(peer_mac.unwrap_or(BROADCAST), id, seq, size as usize);
        let mut deadline = start.wrapping_add(timeout);
        loop {
            if !before(deadline) {
                if retries == 0 {
                    exit::fail(format_args!("no echo reply for sequence {seq}"));
                }
                // A reply lost (the VM was snapshotted and moved meanwhile): ask again.
                retries -= 1;
                crate::tg!("net_retry seq={seq}");
                start = io::rdtsc();
                net.send_echo(peer_mac.unwrap_or(BROADCAST), id, seq, size as usize);
                deadline = start.wrapping_add(timeout);
            }
            match net.receive() {
                Some(Rx::Echo {
                    src,
                    id: rid,
                    seq: rseq,
                    ok,
                }) if rid == id && rseq == seq => {
                    if !ok {
                        exit::fail(format_args!("echo reply {seq}: bad checksum or payload"));
                    }
                    rtt[replies] = io::rdtsc().wrapping_sub(start) * 1000 / khz;
                    replies += 1;
                    if peer_mac.is_none() {
                        crate::tg!("net_peer_mac={}", Mac(src));
                        peer_mac = Some(src);
                    }
                    break;
                }
                _ => core::hint::spin_loop(),
            }
        }
    }
    let rtt = &mut rtt[..replies];
    rtt.sort_unstable();
    let median = rtt.get(replies / 2).copied().unwrap_or(0);
    crate::tg!("net_pings={pings}");
    crate::tg!("net_replies={replies}");
    crate::tg!("net_rtt_us={median}");
    crate::tg!("net_rx_frames={}", net.rx_frames);
    crate::tg!("net_arp_answered={}", net.arp_answered);
    if replies as u64 != pings {
        exit::fail(format_args!("{replies} of {pings} echo replies"));
    }
    exit::pass()
}
