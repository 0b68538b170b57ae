//! virtio-vsock (virtio 1.2, 5.10) in Firecracker's hybrid style: the guest's AF_VSOCK stream
//! connections meet Unix sockets on the host. A host program reaches guest port P by
//! connecting to the device's socket path and writing `CONNECT P\n` (answered `OK <port>\n`);
//! a guest connection to host port P is connected to the Unix socket `<path>_P`.
//!
//! Everything from the guest is checked: header fields, CIDs, payload lengths, credit; the
//! number of connections and every host-side buffer are bounded. A protocol error resets the
//! one connection, never the device.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use self::packet::*;
use super::worker::{QueueHandler, Worker};
use super::{
    check_avail_index, read_config_bytes, stop_worker, take_queues, ActivateContext, ActivateError,
    Interrupt, VirtioDevice, QUEUE_MAX_SIZE,
};
use crate::metrics::VsockMetrics;

/// The host's CID (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;
/// Receive buffer the host side advertises per connection.
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload in one packet.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Most connections at once.
const MAX_CONNECTIONS: usize = 1024;
/// Most host connections still waiting to send their `CONNECT` line.
const MAX_PENDING_HOST: usize = 64;
/// Most packets waiting for guest receive buffers.
const MAX_BACKLOG: usize = 4096;
/// Host-initiated connections get local ports from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

/// Errors of setting up a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved.
    #[error("vsock guest cid {0} is reserved (it must be 3 or more)")]
    ReservedCid(u64),
    /// Another process listens on the socket path.
    #[error("vsock socket {} is in use by another process", .0.display())]
    InUse(PathBuf),
    /// The Unix socket cannot be created.
    #[error("cannot listen on vsock socket {}", .path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    config: [u8; 8],
    worker: Option<Worker>,
    metrics: Arc<VsockMetrics>,
}

impl Vsock {
    /// This device's counters.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// A device with guest CID `cid` whose host side listens at `path` (a stale socket file
    /// there is replaced).
    pub fn new(cid: u64, path: &Path) -> Result<Self, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(cid));
        }
        let bind = |source| VsockError::Bind {
            path: path.to_path_buf(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            // A socket someone still answers on belongs to a live process; a dead one is
            // left over from a VMM that exited and may be replaced.
            if UnixStream::connect(path).is_ok() {
                return Err(VsockError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(bind)?;
        }
        let listener = UnixListener::bind(path).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        Ok(Self {
            cid,
            path: path.to_path_buf(),
            listener,
            config: cid.to_le_bytes(),
            worker: None,
            metrics: Arc::default(),
        })
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        stop_worker(&mut self.worker);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One stream connection.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    /// Host side of the connection (CID 2).
    local_port: u32,
    /// Guest side.
    peer_port: u32,
    /// Waiting for the guest's RESPONSE (host-initiated).
    connecting: bool,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// The guest's receive buffer and how much of our data it consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes of the guest's data written to the host stream.
    fwd_cnt: u32,
    /// fwd_cnt when we last told the guest.
    fwd_cnt_sent: u32,
    /// Guest data the host stream has not taken yet (bounded by BUF_ALLOC through credit).
    to_host: Vec<u8>,
    /// The host stream reached end of file.
    host_eof: bool,
    /// The stream is registered for EPOLLOUT.
    want_write: bool,
}

impl Conn {
    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Keys of the inner epoll: the listener, then connections by fd.
const LISTENER_TOKEN: u64 = u64::MAX;

struct VsockHandler {
    /// A transport reset event is owed to the driver (the VM was restored: every connection
    /// it knew is gone).
    transport_reset: bool,
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    _event: Queue,
    interrupt: Interrupt,
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// By (local port, peer port).
    conns: HashMap<(u32, u32), Conn>,
    /// Connections by fd, for epoll events.
    by_fd: HashMap<RawFd, (u32, u32)>,
    pending: HashMap<RawFd, PendingHost>,
    next_local_port: u32,
    /// Packets for the guest waiting for receive buffers.
    backlog: VecDeque<(Header, Vec<u8>)>,
    /// The guest had no receive buffer last time: host input waits.
    rx_blocked: bool,
    buf: Vec<u8>,
    metrics: Arc<VsockMetrics>,
}

/// A packet header from the host side of `conn` to the guest `cid`.
fn header(cid: u64, conn: &Conn, op: u16, flags: u32, len: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: conn.local_port,
        dst_port: conn.peer_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: conn.fwd_cnt,
    }
}

impl VsockHandler {
    fn rst_for(&self, hdr: &Header) -> Header {
        self.metrics.conns_killed.inc();
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    fn queue_packet(&mut self, hdr: Header, payload: Vec<u8>) {
        if self.backlog.len() < MAX_BACKLOG {
            self.backlog.push_back((hdr, payload));
        } else {
            crate::warn_limited!("virtio-vsock: guest receive backlog full, packet dropped");
        }
    }

    /// Writes waiting packets into guest receive buffers.
    fn flush_backlog(&mut self) -> Result<(), String> {
        let mem = self.mem.clone();
        let mut used_any = false;
        check_avail_index(&mut self.rx, &mem)?;
        while let Some((hdr, payload)) = self.backlog.pop_front() {
            let Some(chain) = self.rx.pop_descriptor_chain(&mem) else {
                self.backlog.push_front((hdr, payload));
                self.rx_blocked = true;
                break;
            };
            let head = chain.head_index();
            let written = match Writer::new(&mem, chain) {
                Ok(mut w) if w.available_bytes() > HEADER_LEN || payload.is_empty() => {
                    // No mergeable buffers in vsock: data that does not fit this buffer goes on
                    // in the next one, as a packet of its own.
                    let room = w.available_bytes().saturating_sub(HEADER_LEN);
                    let (mut hdr, mut payload) = (hdr, payload);
                    if payload.len() > room {
                        let rest = payload.split_off(room);
                        let mut rest_hdr = hdr;
                        rest_hdr.len = u32::try_from(rest.len()).unwrap_or(0);
                        hdr.len = u32::try_from(room).unwrap_or(0);
                        self.backlog.push_front((rest_hdr, rest));
                    }
                    if w.available_bytes() >= HEADER_LEN
                        && w.write_obj(hdr).is_ok()
                        && w.write_all(&payload).is_ok()
                    {
                        self.metrics.rx_packets_count.inc();
                        self.metrics.rx_bytes_count.add(payload.len() as u64);
                        HEADER_LEN + payload.len()
                    } else {
                        0
                    }
                }
                Ok(_) => {
                    // Too small for a header and a byte: the packet waits for the next buffer.
                    crate::warn_limited!("virtio-vsock: guest receive buffer too small");
                    self.backlog.push_front((hdr, payload));
                    0
                }
                Err(_) => {
                    crate::warn_limited!("virtio-vsock: guest receive buffer outside its memory");
                    self.backlog.push_front((hdr, payload));
                    0
                }
            };
            self.rx
                .add_used(&mem, head, u32::try_from(written).unwrap_or(0))
                .map_err(|e| format!("cannot return a receive buffer: {e}"))?;
            used_any = true;
        }
        if self.backlog.is_empty() {
            self.rx_blocked = false;
        }
        if used_any {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn close(&mut self, key: (u32, u32)) {
        if let Some(conn) = self.conns.remove(&key) {
            self.metrics.conns_removed.inc();
            self.by_fd.remove(&conn.stream.as_raw_fd());
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn reset_conn(&mut self, key: (u32, u32)) {
        if let Some(conn) = self.conns.get(&key) {
            self.metrics.conns_killed.inc();
            let hdr = header(self.cid, conn, OP_RST, 0, 0);
            self.queue_packet(hdr, Vec::new());
        }
        self.close(key);
    }

    fn watch(&mut self, fd: RawFd, write: bool) -> std::io::Result<()> {
        let events = if write {
            EventSet::IN | EventSet::OUT
        } else {
            EventSet::IN
        };
        self.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, fd as u64),
        )
    }

    fn add_conn(&mut self, conn: Conn) -> Result<(), std::io::Error> {
        let fd = conn.stream.as_raw_fd();
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        )?;
        let key = (conn.local_port, conn.peer_port);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.metrics.conns_added.inc();
        Ok(())
    }

    /// Handles one packet the guest sent.
    fn on_guest_packet(
        &mut self,
        hdr: Header,
        reader: &mut Reader<'_, vm_memory::bitmap::BS<'_, vm_memory::bitmap::AtomicBitmap>>,
    ) {
        let (src_cid, dst_cid, len, type_) = (hdr.src_cid, hdr.dst_cid, hdr.len, hdr.type_);
        if src_cid != self.cid || dst_cid != HOST_CID || type_ != TYPE_STREAM {
            crate::warn_limited!(
                "virtio-vsock: dropped packet {src_cid}->{dst_cid} of type {type_}"
            );
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.peer_buf_alloc = hdr.buf_alloc;
            conn.peer_fwd_cnt = hdr.fwd_cnt;
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(hdr),
            OP_RESPONSE => {
                let Some(conn) = self.conns.get_mut(&key).filter(|c| c.connecting) else {
                    let rst = self.rst_for(&hdr);
                    self.queue_packet(rst, Vec::new());
                    return;
                };
                conn.connecting = false;
                let line = format!("OK {}\n", conn.local_port);
                if conn.stream.write_all(line.as_bytes()).is_err() {
                    self.reset_conn(key);
                }
            }
            OP_RW => {
                let n = len as usize;
                let established = self.conns.get(&key).is_some_and(|c| !c.connecting);
                if !established || n > MAX_PAYLOAD || n > reader.available_bytes() {
                    if self.conns.contains_key(&key) {
                        self.reset_conn(key);
                    } else {
                        let rst = self.rst_for(&hdr);
                        self.queue_packet(rst, Vec::new());
                    }
                    return;
                }
                self.buf.resize(n, 0);
                if reader.read_exact(&mut self.buf[..n]).is_err() {
                    self.reset_conn(key);
                    return;
                }
                self.send_to_host(key, n);
            }
            OP_CREDIT_UPDATE => self.pump_from_host(key),
            OP_CREDIT_REQUEST => {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.fwd_cnt_sent = conn.fwd_cnt;
                    let hdr = header(self.cid, &self.conns[&key], OP_CREDIT_UPDATE, 0, 0);
                    self.queue_packet(hdr, Vec::new());
                }
            }
            OP_SHUTDOWN => {
                let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
                if hdr.flags & both == both {
                    self.reset_conn(key);
                } else if let Some(conn) = self.conns.get(&key) {
                    if hdr.flags & SHUTDOWN_SEND != 0 {
                        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                    }
                }
            }
            OP_RST => self.close(key),
            _ => self.reset_conn(key),
        }
    }

    /// Guest data for the host: written now, or kept (within the credit we gave).
    fn send_to_host(&mut self, key: (u32, u32), n: usize) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.to_host.len() + n > BUF_ALLOC as usize {
            // The guest ignored our credit.
            self.reset_conn(key);
            return;
        }
        conn.to_host.extend_from_slice(&self.buf[..n]);
        self.flush_to_host(key);
    }

    fn flush_to_host(&mut self, key: (u32, u32)) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        while !conn.to_host.is_empty() {
            match conn.stream.write(&conn.to_host) {
                Ok(0) => break,
                Ok(n) => {
                    conn.to_host.drain(..n);
                    // n is at most BUF_ALLOC.
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(u32::try_from(n).unwrap_or(0));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.reset_conn(key);
                    return;
                }
            }
        }
        let want_write = !conn.to_host.is_empty();
        let fd = conn.stream.as_raw_fd();
        let changed = want_write != conn.want_write;
        conn.want_write = want_write;
        // Tell the guest about freed buffer space once half the window is consumed.
        let update = conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent) >= BUF_ALLOC / 2;
        if update {
            conn.fwd_cnt_sent = conn.fwd_cnt;
        }
        if changed && self.watch(fd, want_write).is_err() {
            self.reset_conn(key);
            return;
        }
        if update {
            let hdr = header(self.cid, &self.conns[&key], OP_CREDIT_UPDATE, 0, 0);
            self.queue_packet(hdr, Vec::new());
        }
    }

    /// Moves host data to the guest as far as its credit and our backlog allow.
    fn pump_from_host(&mut self, key: (u32, u32)) {
        loop {
            if self.backlog.len() >= MAX_BACKLOG / 2 {
                self.rx_blocked = true;
                return;
            }
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            if conn.connecting || conn.host_eof {
                return;
            }
            let room = (conn.peer_credit() as usize).min(MAX_PAYLOAD);
            if room == 0 {
                return;
            }
            let mut data = vec![0u8; room];
            match conn.stream.read(&mut data) {
                Ok(0) => {
                    conn.host_eof = true;
                    let hdr = header(self.cid, conn, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0);
                    self.queue_packet(hdr, Vec::new());
                    return;
                }
                Ok(n) => {
                    data.truncate(n);
                    // n is at most MAX_PAYLOAD.
                    let n32 = u32::try_from(n).unwrap_or(0);
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(n32);
                    conn.fwd_cnt_sent = conn.fwd_cnt;
                    let hdr = header(self.cid, conn, OP_RW, 0, n32);
                    self.queue_packet(hdr, data);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.reset_conn(key);
                    return;
                }
            }
        }
    }

    /// A guest REQUEST: connect to `<path>_<port>`.
    fn guest_connect(&mut self, hdr: Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            let rst = self.rst_for(&hdr);
            self.queue_packet(rst, Vec::new());
            return;
        }
        let dst_port = hdr.dst_port;
        let mut target = self.path.clone().into_os_string();
        target.push(format!("_{dst_port}"));
        let stream = match UnixStream::connect(&target) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                let rst = self.rst_for(&hdr);
                self.queue_packet(rst, Vec::new());
                return;
            }
        };
        let conn = Conn {
            stream,
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
            connecting: false,
            tx_cnt: 0,
            peer_buf_alloc: hdr.buf_alloc,
            peer_fwd_cnt: hdr.fwd_cnt,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            to_host: Vec::new(),
            host_eof: false,
            want_write: false,
        };
        let response = header(self.cid, &conn, OP_RESPONSE, 0, 0);
        if self.add_conn(conn).is_err() {
            let rst = self.rst_for(&hdr);
            self.queue_packet(rst, Vec::new());
            return;
        }
        self.queue_packet(response, Vec::new());
    }

    /// A host program connected to the device's socket.
    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() >= MAX_PENDING_HOST
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.pending.insert(
                            fd,
                            PendingHost {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads a waiting host program's `CONNECT <port>\n` line.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let done = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break true,
                Ok(1) if p.line.len() < 32 => p.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // End of file, an over-long line, or an error: drop the caller.
                _ => break false,
            }
        };
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let port = std::str::from_utf8(&p.line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let (Some(port), true) = (port, done) else {
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let local_port = self.next_local_port;
        self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let conn = Conn {
            stream: p.stream,
            local_port,
            peer_port: port,
            connecting: true,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            to_host: Vec::new(),
            host_eof: false,
            want_write: false,
        };
        let request = header(self.cid, &conn, OP_REQUEST, 0, 0);
        if self.add_conn(conn).is_ok() {
            self.queue_packet(request, Vec::new());
        }
    }

    fn transmit(&mut self) -> Result<(), String> {
        let mem = self.mem.clone();
        let mut used_any = false;
        check_avail_index(&mut self.tx, &mem)?;
        while let Some(chain) = self.tx.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            if let Ok(mut reader) = Reader::new(&mem, chain) {
                match reader.read_obj::<Header>() {
                    Ok(hdr) => {
                        self.metrics.tx_packets_count.inc();
                        self.metrics.tx_bytes_count.add(u64::from(hdr.len));
                        self.on_guest_packet(hdr, &mut reader)
                    }
                    Err(_) => crate::warn_limited!("virtio-vsock: packet shorter than its header"),
                }
            }
            self.tx
                .add_used(&mem, head, 0)
                .map_err(|e| format!("cannot return a transmit buffer: {e}"))?;
            used_any = true;
        }
        if used_any {
            self.interrupt.signal_used_queue();
        }
        self.flush_backlog()
    }

    /// Handles what the inner epoll reports.
    fn host_events(&mut self) -> Result<(), String> {
        let mut events = vec![EpollEvent::default(); 64];
        let n = self
            .epoll
            .wait(0, &mut events)
            .map_err(|e| format!("vsock epoll failed: {e}"))?;
        for event in &events[..n] {
            let token = event.data();
            if token == LISTENER_TOKEN {
                self.accept();
                continue;
            }
            let Ok(fd) = RawFd::try_from(token) else {
                continue;
            };
            if self.pending.contains_key(&fd) {
                self.read_connect_line(fd);
            } else if let Some(&key) = self.by_fd.get(&fd) {
                if event.event_set().contains(EventSet::OUT) {
                    self.flush_to_host(key);
                }
                self.pump_from_host(key);
            }
        }
        self.flush_backlog()
    }
}

impl VsockHandler {
    /// Puts the owed VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2, 5.10.6.7) in the next
    /// event buffer the driver posted; waits for one if there is none.
    fn send_transport_reset(&mut self) -> Result<(), String> {
        if !self.transport_reset {
            return Ok(());
        }
        let mem = self.mem.clone();
        check_avail_index(&mut self._event, &mem)?;
        let Some(chain) = self._event.pop_descriptor_chain(&mem) else {
            return Ok(());
        };
        let head = chain.head_index();
        let written = match Writer::new(&mem, chain) {
            // struct virtio_vsock_event { le32 id }, id 0 = TRANSPORT_RESET.
            Ok(mut w) if w.available_bytes() >= 4 => w.write_obj(0u32).map(|()| 4).unwrap_or(0),
            _ => 0,
        };
        self._event
            .add_used(&mem, head, written)
            .map_err(|e| format!("event queue: {e}"))?;
        self.transport_reset = false;
        self.interrupt.signal_used_queue();
        tracing::debug!("vsock: transport reset sent after a restore");
        Ok(())
    }
}

impl QueueHandler for VsockHandler {
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        vec![self.rx.state(), self.tx.state(), self._event.state()]
    }

    fn process_queue(&mut self, index: usize) -> Result<(), String> {
        match index {
            RX_QUEUE => {
                self.flush_backlog()?;
                // Host input waited for buffers: look again.
                let keys: Vec<_> = self.conns.keys().copied().collect();
                for key in keys {
                    self.pump_from_host(key);
                }
                self.flush_backlog()
            }
            TX_QUEUE => self.transmit(),
            _ => self.send_transport_reset(),
        }
    }

    fn watched_fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    fn process_fd(&mut self, _index: usize) -> Result<(), String> {
        self.host_events()
    }

    fn wants_fd(&self, _index: usize) -> bool {
        !self.rx_blocked
    }

    fn failed(&mut self, why: &str) {
        crate::warn_limited!("virtio-vsock stopped: {why}");
        self.interrupt.signal_needs_reset();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE, QUEUE_MAX_SIZE, QUEUE_MAX_SIZE]
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-vsock: write to configuration offset {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let [rx, tx, event] = take_queues::<3>(ctx.queues)?;
        let listener = self.listener.try_clone().map_err(ActivateError::Worker)?;
        let epoll = Epoll::new().map_err(ActivateError::Worker)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(ActivateError::Worker)?;
        let handler = VsockHandler {
            mem: ctx.mem,
            rx,
            tx,
            _event: event,
            interrupt: ctx.interrupt,
            cid: self.cid,
            path: self.path.clone(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            next_local_port: FIRST_LOCAL_PORT,
            backlog: VecDeque::new(),
            rx_blocked: false,
            buf: Vec::new(),
            metrics: self.metrics.clone(),
            transport_reset: ctx.restored,
        };
        self.worker = Some(
            Worker::spawn("anvil-vsock".into(), ctx.queue_evts, handler)
                .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn quiesce(&mut self) -> Option<Vec<virtio_queue::QueueState>> {
        super::quiesce_worker(&mut self.worker)
    }

    fn reset(&mut self) {
        // Connections live in the worker's handler and close with it, as Firecracker resets
        // vsock connections on device reset.
        stop_worker(&mut self.worker);
    }
}
