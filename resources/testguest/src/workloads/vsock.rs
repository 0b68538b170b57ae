//! `vsock`: one stream connection over a virtio-vsock device (device ID 19; queues rx=0,
//! tx=1, event=2) to the host (CID 2), in either direction.
//!
//! Parameters: `tg.vsock_connect=<port>` (connect to host port P, send `tg.vsock_bytes`
//! (65536) bytes of a pattern seeded by `tg.seed` (1), expect the same bytes echoed back, shut
//! down and wait for the host's RST or SHUTDOWN), `tg.vsock_listen=<port>` (wait for a REQUEST
//! to P, answer RESPONSE, echo everything received until the host shuts down, then reset the
//! connection), `tg.vsock_expect_rst=1` (the REQUEST of `vsock_connect` must be refused with
//! RST), `tg.vsock_rx_buf` (4096: payload bytes per receive buffer, as Linux posts),
//! `tg.vsock_index` (0), `tg.io_timeout_ms` (5000: the longest wait without progress).
//! With both ports the connect side runs first.
//!
//! Only VIRTIO_F_VERSION_1 is accepted. Every packet starts with the 44-byte
//! `virtio_vsock_hdr` (virtio 1.2, 5.10.6). Transmitted packets are a readable header
//! descriptor followed, for RW, by a readable payload descriptor; receive buffers are a
//! writable 44-byte header descriptor followed by a writable payload descriptor; the device must
//! fit its packets to them (vsock has no mergeable receive buffers), a buffer returned with less
//! than a header fails the run. Up to
//! `TX_SLOTS` transmissions are in flight; the receive queue is drained between them, so the
//! device never waits on us. Credit (5.10.6.3): we advertise `BUF_ALLOC` bytes and our
//! `fwd_cnt`, send a CREDIT_UPDATE after consuming half of it unreported, answer
//! CREDIT_REQUEST, and never have more than the peer's `buf_alloc - (tx_cnt - fwd_cnt)` bytes
//! in flight.
//!
//! Prints `vsock_device=<addr> irq=<n> features=<hex> queue_size=<n>`, `vsock_cid=<n>` (from
//! the configuration space), `vsock_connect=ok bytes=<n>` (or `vsock_connect=rst`),
//! `vsock_listen=ok bytes=<n> peer_port=<n>`, then the result.

use super::{param, param_opt};
use crate::bootinfo::BootInfo;
use crate::cmdline::Params;
use crate::dma::Arena;
use crate::virtio::{Chain, Device, Queue, VirtioError};
use crate::{exit, io, phys, time};

/// virtio device ID of a socket device (5.10).
const DEVICE_ID_VSOCK: u32 = 19;
const RX_Q: u16 = 0;
const TX_Q: u16 = 1;
const EVENT_Q: u16 = 2;
/// Configuration space: `guest_cid` (le64) at offset 0 (5.10.4).
const CFG_GUEST_CID: u64 = 0;
/// The host's CID (5.10.4).
const HOST_CID: u64 = 2;

/// `struct virtio_vsock_hdr` (5.10.6).
const HDR: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags: will not receive, will not send.
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

/// Our receive buffer, as advertised to the peer.
const BUF_ALLOC: u32 = 65536;
/// Payload bytes per transmitted RW packet, and the default payload buffer per receive buffer
/// (Linux's VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE).
const PAYLOAD: usize = 4096;
/// Largest receive payload buffer `tg.vsock_rx_buf` may ask for.
const MAX_RX_BUF: u64 = 1 << 20;
const RX_BUFFERS: usize = 32;
const EVENT_BUFFERS: usize = 4;
const TX_SLOTS: usize = 8;
const QUEUE_SIZE: u16 = 128;
/// Our port for the connection we open.
const LOCAL_PORT: u32 = 49152;
/// Most bytes one `vsock_connect` run sends.
const MAX_BYTES: u64 = 1 << 30;

/// A packet header.
#[derive(Debug, Clone, Copy, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Hdr {
    fn encode(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HDR]) -> Hdr {
        let u64_at = |at: usize| u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32);
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: le32(b, 16),
            dst_port: le32(b, 20),
            len: le32(b, 24),
            kind: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: le32(b, 32),
            buf_alloc: le32(b, 36),
            fwd_cnt: le32(b, 40),
        }
    }
}

/// The SplitMix64 finaliser.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Byte `i` of the stream `vsock_connect` sends: byte `i % 8` of `mix64(mix64(seed) ^ i / 8)`.
fn pattern_byte(seed: u64, i: u64) -> u8 {
    (mix64(mix64(seed) ^ (i >> 3)) >> ((i & 7) * 8)) as u8
}

/// One stream connection's addresses and credit counters.
#[derive(Debug, Clone, Copy, Default)]
struct Conn {
    local_port: u32,
    peer_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes we have sent.
    tx_cnt: u32,
    /// Payload bytes of the peer's we have consumed.
    fwd_cnt: u32,
    /// The `fwd_cnt` the peer last heard from us.
    fwd_reported: u32,
}

impl Conn {
    /// Bytes we may still send.
    fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn learn(&mut self, h: &Hdr) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }
}

/// A received packet: its header and how many payload bytes landed in the scratch buffer
/// ([`Vsock::byte`]).
struct Packet {
    hdr: Hdr,
    len: usize,
}

/// The socket device and its queues.
struct Vsock {
    dev: Device,
    rx: Queue,
    tx: Queue,
    event: Queue,
    cid: u64,
    timeout: u64,
    /// Receive buffers (header, payload) behind each rx head.
    rx_bufs: [(u64, u64); QUEUE_SIZE as usize],
    /// Transmit slots: a header page of which the first `HDR` bytes are used, then
    /// `PAYLOAD` bytes of payload.
    tx_slot: [u64; TX_SLOTS],
    tx_busy: [bool; TX_SLOTS],
    /// The slot behind each in-flight tx head.
    tx_head_slot: [u8; QUEUE_SIZE as usize],
    /// Payload bytes per receive buffer.
    rx_buf: usize,
    /// Arena copy of the last received packet's payload (`rx_buf` bytes).
    scratch: u64,
}

fn vfail(what: &str, e: VirtioError) -> ! {
    exit::fail(format_args!("vsock {what}: {e}"))
}

impl Vsock {
    fn open(params: &Params<'_>, arena: &mut Arena, timeout: u64, rx_buf: usize) -> Vsock {
        let index = param(params, "vsock_index", 0);
        let mut dev = match Device::find(params, DEVICE_ID_VSOCK, index) {
            Ok(d) => d,
            Err(e) => vfail("device", e),
        };
        if let Err(e) = dev.init(0, timeout) {
            vfail("init", e);
        }
        let queue = |dev: &Device, arena: &mut Arena, i: u16| match dev.queue(arena, i, QUEUE_SIZE)
        {
            Ok(q) => q,
            Err(e) => vfail("queue", e),
        };
        let rx = queue(&dev, arena, RX_Q);
        let tx = queue(&dev, arena, TX_Q);
        let mut event = queue(&dev, arena, EVENT_Q);
        let mut alloc = |len: u64| match arena.alloc(len, 64) {
            Some(a) => a,
            None => exit::fail(format_args!("no RAM for the vsock buffers")),
        };
        let mut tx_slot = [0u64; TX_SLOTS];
        for s in &mut tx_slot {
            *s = alloc(64 + PAYLOAD as u64);
        }
        let mut rx_hdrs = [0u64; RX_BUFFERS];
        let mut rx_data = [0u64; RX_BUFFERS];
        for (h, d) in rx_hdrs.iter_mut().zip(rx_data.iter_mut()) {
            *h = alloc(64);
            *d = alloc(rx_buf as u64);
        }
        let scratch = alloc(rx_buf as u64);
        for _ in 0..EVENT_BUFFERS {
            let buf = alloc(8);
            let mut chain = Chain::new();
            if let Err(e) = chain
                .writable(buf, 8)
                .map(|_| ())
                .and_then(|()| event.submit(&chain).map(|_| ()))
            {
                vfail("event buffer", e);
            }
        }
        let cid = dev.config_u64(CFG_GUEST_CID);
        let mut v = Vsock {
            dev,
            rx,
            tx,
            event,
            cid,
            timeout,
            rx_bufs: [(0, 0); QUEUE_SIZE as usize],
            tx_slot,
            tx_busy: [false; TX_SLOTS],
            tx_head_slot: [0; QUEUE_SIZE as usize],
            rx_buf,
            scratch,
        };
        // Receive buffers go in before DRIVER_OK, so the device never lacks one.
        for (&h, &d) in rx_hdrs.iter().zip(rx_data.iter()) {
            if let Err(e) = v.post_rx(h, d) {
                vfail("receive buffer", e);
            }
        }
        v.dev.driver_ok();
        v.rx.notify();
        v.event.notify();
        v
    }

    fn post_rx(&mut self, hdr: u64, data: u64) -> Result<(), VirtioError> {
        let mut chain = Chain::new();
        chain.writable(hdr, HDR as u32)?;
        chain.writable(data, self.rx_buf as u32)?;
        let head = self.rx.submit(&chain)?;
        self.rx_bufs[usize::from(head)] = (hdr, data);
        Ok(())
    }

    /// Frees the slots of transmissions the device has finished.
    fn reap_tx(&mut self) {
        loop {
            match self.tx.poll() {
                Ok(Some((head, _))) => {
                    let slot = usize::from(self.tx_head_slot[usize::from(head)]);
                    if let Some(b) = self.tx_busy.get_mut(slot) {
                        *b = false;
                    }
                }
                Ok(None) => return,
                Err(e) => vfail("transmit", e),
            }
        }
    }

    fn free_slots(&self) -> usize {
        self.tx_busy.iter().filter(|b| !**b).count()
    }

    /// Sends a packet of operation `op` on `conn` with `payload` (RW only), waiting for a free
    /// transmit slot if need be.
    fn send(&mut self, conn: &mut Conn, op: u16, flags: u32, payload: &[u8]) {
        let deadline = io::rdtsc().wrapping_add(self.timeout);
        let slot = loop {
            self.reap_tx();
            if let Some(s) = self.tx_busy.iter().position(|b| !*b) {
                break s;
            }
            if !before(deadline) {
                exit::fail(format_args!("vsock transmit: no slot freed in time"));
            }
            core::hint::spin_loop();
        };
        let hdr = Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: conn.local_port,
            dst_port: conn.peer_port,
            len: payload.len() as u32,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: conn.fwd_cnt,
        };
        let base = self.tx_slot[slot];
        // SAFETY: the slot is arena RAM that only this driver uses, and the device has returned
        // it (it is not busy), so nothing else reads or writes it while we fill it.
        let buf = unsafe { phys::bytes_mut(base, 64 + PAYLOAD) };
        buf[..HDR].copy_from_slice(&hdr.encode());
        let n = payload.len().min(PAYLOAD);
        buf[64..64 + n].copy_from_slice(&payload[..n]);
        let mut chain = Chain::new();
        let r = chain.readable(base, HDR as u32).map(|_| ()).and_then(|()| {
            if n > 0 {
                chain.readable(base + 64, n as u32)?;
            }
            self.tx.submit(&chain)
        });
        match r {
            Ok(head) => {
                self.tx_head_slot[usize::from(head)] = slot as u8;
                self.tx_busy[slot] = true;
            }
            Err(e) => vfail("transmit", e),
        }
        self.tx.notify();
        conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
        conn.fwd_reported = conn.fwd_cnt;
    }

    /// Sends a reply of operation `op` to a packet that belongs to no connection of ours.
    fn reply_to(&mut self, h: &Hdr, op: u16) {
        let mut c = Conn {
            local_port: h.dst_port,
            peer_port: h.src_port,
            ..Conn::default()
        };
        self.send(&mut c, op, 0, &[]);
    }

    /// Takes the next received packet, if any, after checking its header; its payload is in
    /// the scratch buffer ([`Vsock::byte`]). The buffer goes back to the device at once.
    fn recv(&mut self) -> Option<Packet> {
        let (head, used) = match self.rx.poll() {
            Ok(Some(x)) => x,
            Ok(None) => return None,
            Err(e) => vfail("receive", e),
        };
        let (hbuf, dbuf) = self.rx_bufs[usize::from(head)];
        if hbuf == 0 {
            exit::fail(format_args!("vsock received on an unknown buffer {head}"));
        }
        let used = used as usize;
        if used < HDR {
            exit::fail(format_args!(
                "vsock device returned a receive buffer ({HDR}+{} bytes) with used length {used}",
                self.rx_buf
            ));
        }
        let mut raw = [0u8; HDR];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = phys::read_u8(hbuf + i as u64);
        }
        let hdr = Hdr::decode(&raw);
        let len = hdr.len as usize;
        if len > self.rx_buf || HDR + len > used {
            exit::fail(format_args!(
                "vsock bad header: len {len} with {used} bytes used"
            ));
        }
        if hdr.kind != TYPE_STREAM || hdr.src_cid != HOST_CID || hdr.dst_cid != self.cid {
            exit::fail(format_args!(
                "vsock bad header: type {} src_cid {} dst_cid {} op {}",
                hdr.kind, hdr.src_cid, hdr.dst_cid, hdr.op
            ));
        }
        if len > 0 && hdr.op != OP_RW {
            exit::fail(format_args!("vsock bad header: op {} with payload", hdr.op));
        }
        for i in 0..len as u64 {
            phys::write_u8(self.scratch + i, phys::read_u8(dbuf + i));
        }
        if let Err(e) = self.post_rx(hbuf, dbuf) {
            vfail("receive buffer", e);
        }
        self.rx.notify();
        Some(Packet { hdr, len })
    }

    /// Byte `i` of the last received payload.
    fn byte(&self, i: usize) -> u8 {
        phys::read_u8(self.scratch + i as u64)
    }

    /// Handles the packets every state treats alike; returns true when `p` was one of them.
    /// Packets for other connections get an RST (unless they are one).
    fn common(&mut self, conn: &mut Conn, p: &Packet) -> bool {
        let h = &p.hdr;
        if h.dst_port != conn.local_port || h.src_port != conn.peer_port {
            if h.op != OP_RST {
                self.reply_to(h, OP_RST);
            }
            return true;
        }
        conn.learn(h);
        match h.op {
            OP_CREDIT_UPDATE => true,
            OP_CREDIT_REQUEST => {
                self.send(conn, OP_CREDIT_UPDATE, 0, &[]);
                true
            }
            _ => false,
        }
    }

    /// Tells the peer about consumed bytes once half our buffer is unreported.
    fn maybe_credit_update(&mut self, conn: &mut Conn) {
        if conn.fwd_cnt.wrapping_sub(conn.fwd_reported) >= BUF_ALLOC / 2 {
            self.send(conn, OP_CREDIT_UPDATE, 0, &[]);
        }
    }
}

fn before(deadline: u64) -> bool {
    (io::rdtsc().wrapping_sub(deadline) as i64) < 0
}

/// A progress deadline: `io_timeout_ms` from the last time something happened.
struct Deadline {
    at: u64,
    timeout: u64,
}

impl Deadline {
    fn new(timeout: u64) -> Self {
        Deadline {
            at: io::rdtsc().wrapping_add(timeout),
            timeout,
        }
    }

    fn progress(&mut self) {
        self.at = io::rdtsc().wrapping_add(self.timeout);
    }

    fn check(&self, what: core::fmt::Arguments<'_>) {
        if !before(self.at) {
            exit::fail(format_args!("vsock timeout {what}"));
        }
    }
}

/// How a `vsock_connect` run ended.
enum Connected {
    Echoed(u64),
    Refused,
}

/// Connects to host port `port`, sends `total` pattern bytes and checks their echo.
fn connect(v: &mut Vsock, port: u32, total: u64, seed: u64) -> Connected {
    let mut conn = Conn {
        local_port: LOCAL_PORT,
        peer_port: port,
        ..Conn::default()
    };
    v.send(&mut conn, OP_REQUEST, 0, &[]);
    let mut dl = Deadline::new(v.timeout);
    loop {
        dl.check(format_args!("waiting for the answer to REQUEST"));
        let Some(p) = v.recv() else {
            core::hint::spin_loop();
            continue;
        };
        if v.common(&mut conn, &p) {
            continue;
        }
        match p.hdr.op {
            OP_RESPONSE => break,
            OP_RST => return Connected::Refused,
            op => exit::fail(format_args!("vsock unexpected op {op} answering REQUEST")),
        }
    }
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut asked_credit = false;
    let mut chunk = [0u8; PAYLOAD];
    dl.progress();
    while received < total {
        dl.check(format_args!(
            "echo at {received} of {total} bytes, {sent} sent"
        ));
        v.reap_tx();
        if let Some(p) = v.recv() {
            dl.progress();
            if v.common(&mut conn, &p) {
                asked_credit = false;
                continue;
            }
            match p.hdr.op {
                OP_RW => {
                    if received + p.len as u64 > sent {
                        exit::fail(format_args!(
                            "vsock echo ran ahead: {} bytes after {received} of {sent} sent",
                            p.len
                        ));
                    }
                    for i in 0..p.len {
                        let at = received + i as u64;
                        if v.byte(i) != pattern_byte(seed, at) {
                            exit::fail(format_args!("vsock echo differs at byte {at}"));
                        }
                    }
                    received += p.len as u64;
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(p.len as u32);
                    v.maybe_credit_update(&mut conn);
                    asked_credit = false;
                }
                op => exit::fail(format_args!(
                    "vsock unexpected op {op} (flags {:#x}) after {received} of {total} echoed",
                    p.hdr.flags
                )),
            }
            continue;
        }
        if sent < total && v.free_slots() >= 2 {
            let credit = u64::from(conn.credit());
            let n = (total - sent).min(PAYLOAD as u64).min(credit) as usize;
            if n > 0 {
                for (i, b) in chunk[..n].iter_mut().enumerate() {
                    *b = pattern_byte(seed, sent + i as u64);
                }
                v.send(&mut conn, OP_RW, 0, &chunk[..n]);
                sent += n as u64;
                dl.progress();
            } else if !asked_credit {
                v.send(&mut conn, OP_CREDIT_REQUEST, 0, &[]);
                asked_credit = true;
            }
        }
        core::hint::spin_loop();
    }
    v.send(&mut conn, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
    dl.progress();
    loop {
        dl.check(format_args!("waiting for the host to close"));
        v.reap_tx();
        let Some(p) = v.recv() else {
            core::hint::spin_loop();
            continue;
        };
        if v.common(&mut conn, &p) {
            continue;
        }
        match p.hdr.op {
            OP_RST => break,
            OP_SHUTDOWN => {
                v.send(&mut conn, OP_RST, 0, &[]);
                break;
            }
            // Stray data after our shutdown is dropped.
            OP_RW => {}
            op => exit::fail(format_args!("vsock unexpected op {op} while closing")),
        }
    }
    Connected::Echoed(received)
}

/// A ring of bytes received and not yet echoed, in arena RAM.
struct EchoRing {
    base: u64,
    head: u64,
    tail: u64,
}

impl EchoRing {
    const SIZE: u64 = BUF_ALLOC as u64;

    fn len(&self) -> u64 {
        self.tail - self.head
    }

    fn push(&mut self, b: u8) {
        phys::write_u8(self.base + self.tail % Self::SIZE, b);
        self.tail += 1;
    }

    fn pop(&mut self, out: &mut [u8]) -> usize {
        let n = (self.len() as usize).min(out.len());
        for b in &mut out[..n] {
            *b = phys::read_u8(self.base + self.head % Self::SIZE);
            self.head += 1;
        }
        n
    }
}

/// Waits for a connection to `port` and echoes it until the host shuts down.
/// Returns the bytes echoed and the host's port.
fn listen(v: &mut Vsock, arena: &mut Arena, port: u32) -> (u64, u32) {
    let Some(base) = arena.alloc(EchoRing::SIZE, 4096) else {
        exit::fail(format_args!("no RAM for the vsock echo buffer"))
    };
    let mut ring = EchoRing {
        base,
        head: 0,
        tail: 0,
    };
    let mut dl = Deadline::new(v.timeout);
    let mut conn = loop {
        dl.check(format_args!("waiting for a REQUEST to port {port}"));
        let Some(p) = v.recv() else {
            core::hint::spin_loop();
            continue;
        };
        let h = p.hdr;
        if h.op == OP_REQUEST && h.dst_port == port {
            let mut c = Conn {
                local_port: port,
                peer_port: h.src_port,
                ..Conn::default()
            };
            c.learn(&h);
            v.send(&mut c, OP_RESPONSE, 0, &[]);
            break c;
        }
        if h.op != OP_RST {
            v.reply_to(&h, OP_RST);
        }
    };
    let mut received = 0u64;
    let mut echoed = 0u64;
    let mut peer_done = false;
    let mut asked_credit = false;
    let mut chunk = [0u8; PAYLOAD];
    dl.progress();
    loop {
        dl.check(format_args!(
            "echoing: {received} bytes received, {echoed} echoed"
        ));
        v.reap_tx();
        if let Some(p) = v.recv() {
            dl.progress();
            if v.common(&mut conn, &p) {
                asked_credit = false;
                continue;
            }
            match p.hdr.op {
                OP_RW => {
                    if ring.len() + p.len as u64 > EchoRing::SIZE {
                        exit::fail(format_args!(
                            "vsock host overran our credit at {received} bytes"
                        ));
                    }
                    for i in 0..p.len {
                        ring.push(v.byte(i));
                    }
                    received += p.len as u64;
                }
                OP_SHUTDOWN => {
                    if p.hdr.flags & SHUTDOWN_RCV != 0 {
                        // Nobody will read the rest of the echo.
                        break;
                    }
                    peer_done = true;
                }
                OP_RST => break,
                op => exit::fail(format_args!("vsock unexpected op {op} while echoing")),
            }
            continue;
        }
        if ring.len() > 0 && v.free_slots() >= 2 {
            let credit = conn.credit() as usize;
            let n = ring.pop(&mut chunk[..PAYLOAD.min(credit)]);
            if n > 0 {
                conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                v.send(&mut conn, OP_RW, 0, &chunk[..n]);
                echoed += n as u64;
                asked_credit = false;
                dl.progress();
            } else if !asked_credit {
                v.send(&mut conn, OP_CREDIT_REQUEST, 0, &[]);
                asked_credit = true;
            }
        } else if peer_done && ring.len() == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    v.send(&mut conn, OP_RST, 0, &[]);
    // Let the device take the RST before we report (and reset the machine).
    let end = Deadline::new(v.timeout);
    while v.free_slots() < TX_SLOTS {
        end.check(format_args!("sending the final RST"));
        v.reap_tx();
        core::hint::spin_loop();
    }
    (echoed, conn.peer_port)
}

fn port_param(params: &Params<'_>, key: &'static str) -> Option<u32> {
    let v = param_opt(params, key)?;
    match u32::try_from(v) {
        Ok(p) => Some(p),
        Err(_) => exit::fail(format_args!("bad parameter tg.{key}")),
    }
}

/// Runs the workload.
pub fn run(info: &BootInfo, params: &Params<'_>) -> ! {
    let connect_port = port_param(params, "vsock_connect");
    let listen_port = port_param(params, "vsock_listen");
    if connect_port.is_none() && listen_port.is_none() {
        exit::fail(format_args!(
            "vsock needs tg.vsock_connect or tg.vsock_listen"
        ));
    }
    let total = param(params, "vsock_bytes", 65536);
    if total > MAX_BYTES {
        exit::fail(format_args!("tg.vsock_bytes={total} is above {MAX_BYTES}"));
    }
    let seed = param(params, "seed", 1);
    let expect_rst = param(params, "vsock_expect_rst", 0) != 0;
    let timeout_ms = param(params, "io_timeout_ms", 5000);
    let (khz, _) = time::tsc_khz();
    let timeout = timeout_ms.saturating_mul(khz.max(1));
    let Some(mut arena) = Arena::new(info) else {
        exit::fail(format_args!("no RAM for the vsock buffers"))
    };
    let rx_buf = param(params, "vsock_rx_buf", PAYLOAD as u64);
    if !(1..=MAX_RX_BUF).contains(&rx_buf) {
        exit::fail(format_args!(
            "tg.vsock_rx_buf={rx_buf} is not in 1..={MAX_RX_BUF}"
        ));
    }
    let mut v = Vsock::open(params, &mut arena, timeout, rx_buf as usize);
    crate::tg!(
        "vsock_device={:#x} irq={} features={:#x} queue_size={}",
        v.dev.base(),
        v.dev.irq,
        v.dev.features,
        v.rx.size()
    );
    crate::tg!("vsock_cid={}", v.cid);
    if v.cid < 3 || v.cid > u64::from(u32::MAX) {
        exit::fail(format_args!("vsock guest cid {} is reserved", v.cid));
    }
    if let Some(port) = connect_port {
        match (connect(&mut v, port, total, seed), expect_rst) {
            (Connected::Echoed(n), false) => {
                if n != total {
                    exit::fail(format_args!("vsock echoed {n} of {total} bytes"));
                }
                crate::tg!("vsock_connect=ok bytes={n}");
            }
            (Connected::Refused, true) => crate::tg!("vsock_connect=rst"),
            (Connected::Echoed(_), true) => exit::fail(format_args!(
                "vsock connection to port {port} was accepted, expected RST"
            )),
            (Connected::Refused, false) => {
                exit::fail(format_args!("vsock RST on REQUEST to port {port}"))
            }
        }
    }
    if let Some(port) = listen_port {
        let (n, peer) = listen(&mut v, &mut arena, port);
        crate::tg!("vsock_listen=ok bytes={n} peer_port={peer}");
    }
    exit::pass()
}
