//! A network namespace with a tap, for tests that give the guest a network.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Runs `ip` with `args`; panics with its output when it fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("cannot run ip");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with a tap at 10.0.0.1/24, deleted (tap and all) on drop.
pub struct NetNs {
    /// The namespace.
    pub name: String,
    /// The tap in it.
    pub tap: String,
}

impl NetNs {
    /// Makes the namespace and its tap.
    pub fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let ns = NetNs {
            name: format!("anvil-tgnet-{pid}-{n}"),
            // Interface names are at most 15 bytes.
            tap: format!("tgt{:x}n{n}", pid & 0xff_ffff),
        };
        ip(&["netns", "add", &ns.name]);
        // From here on the guard exists, so a failure below still removes the namespace.
        let (name, tap) = (ns.name.as_str(), ns.tap.as_str());
        ip(&["-n", name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["-n", name, "addr", "add", "10.0.0.1/24", "dev", tap]);
        ip(&["-n", name, "link", "set", tap, "up"]);
        ns
    }

    /// The tap's MAC address as the host sees it.
    pub fn tap_mac(&self) -> String {
        let out = ip(&["-n", &self.name, "-o", "link", "show", "dev", &self.tap]);
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no link/ether in {out}"))
            .to_string()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("cannot delete network namespace {}: {out:?}", self.name);
        }
    }
}

/// Two network namespaces standing for two hosts, joined by a veth pair: `a` is 10.77.0.1
/// and `b` is 10.77.0.2; both deleted on drop.
#[allow(dead_code)]
pub struct TwoHosts {
    /// The first namespace (10.77.0.1).
    pub a: String,
    /// The second namespace (10.77.0.2).
    pub b: String,
}

#[allow(dead_code)]
impl TwoHosts {
    /// Makes the namespaces and the link between them.
    pub fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let hosts = TwoHosts {
            a: format!("anvil-ha-{pid}-{n}"),
            b: format!("anvil-hb-{pid}-{n}"),
        };
        ip(&["netns", "add", &hosts.a]);
        ip(&["netns", "add", &hosts.b]);
        let (va, vb) = (
            format!("va{:x}n{n}", pid & 0xff_ffff),
            format!("vb{:x}n{n}", pid & 0xff_ffff),
        );
        ip(&[
            "-n", &hosts.a, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns",
            &hosts.b,
        ]);
        for (ns, dev, addr) in [
            (&hosts.a, &va, "10.77.0.1/24"),
            (&hosts.b, &vb, "10.77.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Opens a TCP connection from inside network namespace `ns` (on a thread that joins it).
#[allow(dead_code)]
pub fn connect_from(ns: &str, addr: &str) -> TcpStream {
    let (ns, addr) = (ns.to_string(), addr.to_string());
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns on this thread with a namespace fd we own; it changes only this
        // thread's network namespace, and the thread ends right after connecting.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() > deadline => panic!("connect {addr}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    })
    .join()
    .unwrap()
}

/// Sends a line on the echo connection and expects it back.
#[allow(dead_code)]
pub fn echo(reader: &mut BufReader<TcpStream>, line: &str) {
    let mut s = reader.get_ref().try_clone().unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut back = String::new();
    reader.read_line(&mut back).unwrap();
    assert_eq!(back.trim_end(), line, "the guest's echo");
}
