//! The test guest's `vsock` workload over virtio-vsock in Firecracker's hybrid style, both
//! directions: the guest connects to host port 5000 (the Unix socket `<path>_5000`, where the
//! test echoes) and checks its pattern comes back; the host connects to guest port 6000
//! through `<path>` and `CONNECT 6000\n`, and checks the guest echoes its pattern; a
//! connection to a host port nobody listens on is refused with RST.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{boot_testguest, kvm_available, Run, TempDir};

/// How long the host side waits for anvil-vmm to bind its socket or for the guest to answer.
const HOST_TIMEOUT: Duration = Duration::from_secs(30);

fn vsock_arg(dir: &TempDir) -> String {
    format!("cid=3,socket={}", dir.path("v.sock").display())
}

/// Accepts one connection on `listener` and echoes it until EOF; returns the bytes echoed.
fn echo_once(listener: UnixListener) -> u64 {
    let (mut stream, _) = listener.accept().expect("accept the guest's connection");
    stream.set_read_timeout(Some(HOST_TIMEOUT)).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).expect("read from the guest");
        if n == 0 {
            return total;
        }
        stream.write_all(&buf[..n]).expect("echo to the guest");
        total += n as u64;
    }
}

/// Boots the guest with `tg.vsock_connect=5000` and `extra` parameters against an echoing
/// `<path>_5000`; asserts it passed having sent and verified `bytes` bytes.
fn connect_and_echo(tag: &str, extra: &str, bytes: u64) {
    let dir = TempDir::new(tag);
    let listener = UnixListener::bind(dir.path("v.sock_5000")).expect("bind v.sock_5000");
    // The echo thread ends when the guest (through anvil-vmm) closes, or never accepts if the
    // guest never connects; it is not joined, its count comes through a channel.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(echo_once(listener)));
    let run = boot_testguest(
        &format!("tg.run=vsock tg.vsock_connect=5000 {extra}"),
        &["--vsock", &vsock_arg(&dir)],
    );
    run.assert_pass();
    let tg = run.tg();
    assert_eq!(tg.get("vsock_cid").map(String::as_str), Some("3"), "{run}");
    assert_eq!(
        tg.get("vsock_connect").cloned(),
        Some(format!("ok bytes={bytes}")),
        "{run}"
    );
    let echoed = rx
        .recv_timeout(HOST_TIMEOUT)
        .unwrap_or_else(|e| panic!("the host echo did not see EOF: {e}\n{run}"));
    assert_eq!(echoed, bytes, "{run}");
}

#[test]
fn vsock_connect_echoes_through_host_socket() {
    if !kvm_available("vsock_connect_echoes_through_host_socket") {
        return;
    }
    connect_and_echo("vsock-connect", "", 65536);
}

/// Sixteen times both sides' 64 KiB buffers: the transfer only completes if each side's
/// credit updates reach the other.
#[test]
fn vsock_connect_mebibytes_flow_on_credit_updates() {
    if !kvm_available("vsock_connect_mebibytes_flow_on_credit_updates") {
        return;
    }
    connect_and_echo("vsock-credit", "tg.vsock_bytes=1048576 tg.seed=7", 1 << 20);
}

/// Byte `i` of the stream the host sends to the guest.
fn host_pattern(i: usize) -> u8 {
    (i.wrapping_mul(131) ^ (i >> 9)).to_le_bytes()[0]
}

/// Connects to anvil-vmm's socket at `path`, retrying until it is bound or `vmm` ended.
fn connect_host(path: &Path, vmm: &thread::JoinHandle<Run>) -> Option<UnixStream> {
    let deadline = Instant::now() + HOST_TIMEOUT;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Some(s),
            Err(_) if vmm.is_finished() || Instant::now() > deadline => return None,
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The host side of the listen test: CONNECT, send `len` bytes, read them back, close.
/// Returns the `OK` line.
fn host_echo_session(stream: UnixStream, len: usize) -> Result<String, String> {
    stream.set_read_timeout(Some(HOST_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(HOST_TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    writer
        .write_all(b"CONNECT 6000\n")
        .map_err(|e| format!("write CONNECT: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut ok = String::new();
    reader
        .read_line(&mut ok)
        .map_err(|e| format!("read the OK line: {e}"))?;
    let port = ok
        .strip_prefix("OK ")
        .and_then(|p| p.strip_suffix('\n'))
        .and_then(|p| p.parse::<u32>().ok());
    if port.is_none() {
        return Err(format!("expected `OK <port>`, got {ok:?}"));
    }
    let data: Vec<u8> = (0..len).map(host_pattern).collect();
    // Write from another thread: the guest echoes as it receives, and with both sides'
    // buffers full a single thread writing everything first would deadlock.
    let sender = thread::spawn(move || writer.write_all(&data).map(|()| writer));
    let mut got = vec![0u8; len];
    reader
        .read_exact(&mut got)
        .map_err(|e| format!("read the echo: {e}"))?;
    let writer = sender
        .join()
        .unwrap()
        .map_err(|e| format!("write the pattern: {e}"))?;
    if let Some(at) = (0..len).find(|&i| got[i] != host_pattern(i)) {
        return Err(format!("echo differs at byte {at}"));
    }
    drop(writer);
    drop(reader);
    Ok(ok)
}

#[test]
fn vsock_listen_echoes_host_connection() {
    if !kvm_available("vsock_listen_echoes_host_connection") {
        return;
    }
    const LEN: usize = 256 * 1024;
    let dir = TempDir::new("vsock-listen");
    let arg = vsock_arg(&dir);
    let vmm = thread::spawn(move || {
        boot_testguest(
            "tg.run=vsock tg.vsock_listen=6000 tg.io_timeout_ms=20000",
            &["--vsock", &arg],
        )
    });
    let session = match connect_host(&dir.path("v.sock"), &vmm) {
        Some(stream) => host_echo_session(stream, LEN),
        None => Err("cannot connect to anvil-vmm's vsock socket".to_string()),
    };
    let run = vmm.join().unwrap();
    let ok = session.unwrap_or_else(|e| panic!("host side: {e}\n{run}"));
    run.assert_pass();
    let tg = run.tg();
    assert_eq!(tg.get("vsock_cid").map(String::as_str), Some("3"), "{run}");
    let listen = tg.get("vsock_listen").cloned().unwrap_or_default();
    let port = ok.trim_end().trim_start_matches("OK ");
    assert_eq!(
        listen,
        format!("ok bytes={LEN} peer_port={port}"),
        "the guest's report does not match what the host sent\n{run}"
    );
}

#[test]
fn vsock_connect_to_absent_port_gets_rst() {
    if !kvm_available("vsock_connect_to_absent_port_gets_rst") {
        return;
    }
    let dir = TempDir::new("vsock-rst");
    let arg = vsock_arg(&dir);
    let run = boot_testguest(
        "tg.run=vsock tg.vsock_connect=5001 tg.vsock_expect_rst=1",
        &["--vsock", &arg],
    );
    run.assert_pass();
    assert_eq!(
        run.tg().get("vsock_connect").map(String::as_str),
        Some("rst"),
        "{run}"
    );

    // Without the expectation the refusal is a failure that says so.
    let run = boot_testguest("tg.run=vsock tg.vsock_connect=5001", &["--vsock", &arg]);
    assert_eq!(
        run.tg().get("result").map(String::as_str),
        Some("fail reason=vsock RST on REQUEST to port 5001"),
        "{run}"
    );
}
