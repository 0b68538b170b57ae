//! The Linux lane: a real Linux guest (the shared kernel and busybox initramfs) booted by
//! anvil-vmm. These need a KVM that runs guest kernel code (hardware KVM); on a PVM host they
//! skip loudly here and `.ci/run` runs them inside the L1 machine instead.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{anvil_vmm, boot, linux_capable, linux_guest_dir, Run, SockDir};

/// Under the L1 machine's software CPU a boot takes seconds; leave ample room.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MEMORY_MIB: u64 = 256;

fn boot_linux(kernel: &str, anvil_cmd: &str) -> Run {
    let dir = linux_guest_dir();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 quiet anvil_cmd=\"{anvil_cmd}\"");
    let memory = format!("{MEMORY_MIB}M");
    boot(
        &[
            "--kernel",
            dir.join(kernel).to_str().unwrap(),
            "--initrd",
            dir.join("initramfs.cpio.gz").to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            &memory,
            "--cmdline",
            &cmdline,
        ],
        BOOT_TIMEOUT,
    )
}

/// Boots `kernel`, runs commands in the guest and checks what they printed.
fn check_linux_boot(kernel: &str) {
    let cmd = "echo marker-$((6*7)); echo nproc=$(nproc); grep MemTotal /proc/meminfo; echo epoch=$(date +%s)";
    let run = boot_linux(kernel, cmd);
    let host_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    assert!(
        lines.contains(&"marker-42"),
        "the guest must run the command\n{run}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("anvil-guest: init ready")),
        "{run}"
    );
    assert!(
        lines.contains(&"nproc=2"),
        "the guest must see 2 vCPUs\n{run}"
    );
    let mem_kib: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal\n{run}"));
    let expected_kib = MEMORY_MIB * 1024;
    assert!(
        mem_kib.abs_diff(expected_kib) * 10 <= expected_kib,
        "MemTotal {mem_kib} kB is not within 10% of {expected_kib} kB\n{run}"
    );
    let guest_epoch: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("epoch="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no epoch\n{run}"));
    assert!(
        guest_epoch.abs_diff(host_epoch) <= 60,
        "guest clock {guest_epoch} is more than a minute from the host's {host_epoch}\n{run}"
    );
    assert!(lines.contains(&"anvil-guest: cmd exit 0"), "{run}");
    assert_eq!(
        run.status.code(),
        Some(0),
        "the VMM must exit 0 after the guest reboots\n{run}"
    );
    assert!(
        run.stderr.contains("Guest-boot-time = "),
        "init signals boot on port 0x3f0\n{run}"
    );
}

#[test]
fn linux_vmlinux_boots_with_two_vcpus() {
    if !linux_capable("linux_vmlinux_boots_with_two_vcpus") {
        return;
    }
    check_linux_boot("vmlinux");
}

#[test]
fn linux_bzimage_boots_with_two_vcpus() {
    if !linux_capable("linux_bzimage_boots_with_two_vcpus") {
        return;
    }
    check_linux_boot("bzImage");
}

#[test]
fn linux_shell_reads_console_input() {
    if !linux_capable("linux_shell_reads_console_input") {
        return;
    }
    let dir = linux_guest_dir();
    let mut child = Command::new(anvil_vmm())
        .args(["boot", "--kernel"])
        .arg(dir.join("vmlinux"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio.gz"))
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1 quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut seen = Vec::new();
    let wait_for = |needle: &str, seen: &mut Vec<String>| {
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return true;
                }
            }
        }
        false
    };
    assert!(
        wait_for("anvil-guest: init ready", &mut seen),
        "no init\n{}",
        seen.join("\n")
    );
    // The shell starts right after init prints; typed input waits in the serial FIFO.
    stdin.write_all(b"echo typed-$((20+3))\n").unwrap();
    assert!(
        wait_for("typed-23", &mut seen),
        "the shell must run typed input\n{}",
        seen.join("\n")
    );
    stdin.write_all(b"reboot -f\n").unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the VMM did not exit after reboot"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}

/// Boots Linux from a virtio-blk root disk (no initramfs) with a read-only data disk and
/// virtio-rng, checks what the guest sees, then boots again to find what it wrote.
#[test]
fn linux_boots_from_a_virtio_root_disk_with_rng() {
    if !linux_capable("linux_boots_from_a_virtio_root_disk_with_rng") {
        return;
    }
    let dir = common::TempDir::new("linux-disk");
    let root = dir.path("rootfs.ext4");
    std::fs::copy(linux_guest_dir().join("rootfs.ext4"), &root).unwrap();
    let data = dir.path("data.img");
    let content: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(7919) >> 8) as u8)
        .collect();
    std::fs::write(&data, &content).unwrap();
    let first_sector_sum: u32 = content[..512].iter().map(|&b| u32::from(b)).sum();
    let vmlinux = linux_guest_dir().join("vmlinux");
    let boot_with = |anvil_cmd: &str| {
        let cmdline = format!("console=ttyS0 reboot=k panic=-1 quiet anvil_cmd=\"{anvil_cmd}\"");
        boot(
            &[
                "--kernel",
                vmlinux.to_str().unwrap(),
                "--cmdline",
                &cmdline,
                "--disk",
                &format!("path={},root,id=rootfs", root.display()),
                "--disk",
                &format!("path={},ro,id=data", data.display()),
                "--rng",
            ],
            BOOT_TIMEOUT,
        )
    };
    let run = boot_with(
        "echo rootdev=$(grep ' / ' /proc/mounts | cut -d' ' -f1); \
         echo vdb_size=$(cat /sys/block/vdb/size); echo vdb_ro=$(cat /sys/block/vdb/ro); \
         echo vdb_sum=$(dd if=/dev/vdb bs=512 count=1 2>/dev/null | od -An -v -tu1 | tr -s ' ' '\\n' | awk '{s+=$1} END {print s}'); \
         dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null && echo vdb_write=ok || echo vdb_write=refused; \
         echo rng=$(cat /sys/class/misc/hw_random/rng_current); \
         echo rng_bytes=$(head -c 64 /dev/hwrng | wc -c); \
         echo persisted-$((40+2)) > /marker && sync && echo wrote=$(cat /marker)",
    );
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    for expected in [
        "rootdev=/dev/root".to_string(),
        "vdb_size=2048".to_string(),
        "vdb_ro=1".to_string(),
        format!("vdb_sum={first_sector_sum}"),
        "vdb_write=refused".to_string(),
        "rng=virtio_rng.0".to_string(),
        "rng_bytes=64".to_string(),
        "wrote=persisted-42".to_string(),
    ] {
        assert!(
            lines.contains(&expected.as_str()),
            "missing {expected:?}\n{run}"
        );
    }
    assert_eq!(run.status.code(), Some(0), "{run}");
    assert_eq!(
        std::fs::read(&data).unwrap(),
        content,
        "the read-only disk is untouched"
    );

    let run = boot_with("echo found=$(cat /marker)");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.trim_end_matches('\r') == "found=persisted-42"),
        "what the guest wrote to its root disk survives a reboot\n{run}"
    );
    assert_eq!(run.status.code(), Some(0), "{run}");
}

/// A network namespace with one tap in it, deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new(tag: &str, tap: &str, host_cidr: &str) -> Self {
        let name = format!("anvil-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("run ip");
            assert!(status.success(), "ip {args:?} failed");
        };
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&["-n", &ns.name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["-n", &ns.name, "addr", "add", host_cidr, "dev", tap]);
        ip(&["-n", &ns.name, "link", "set", tap, "up"]);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The host side of the TCP checks: serves GET /blob and answers a POST with the MD5 of its
/// body, inside the test's network namespace.
const HTTP_SERVER: &str = r#"
import hashlib, http.server, sys
blob = open(sys.argv[1], "rb").read()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        self.wfile.write(blob)
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        digest = hashlib.md5(body).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(digest)))
        self.end_headers()
        self.wfile.write(digest)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("10.0.0.1", 8080), H)
open(sys.argv[2], "w").close()
server.serve_forever()
"#;

/// Linux talks to the host through virtio-net on a tap in a namespace of the test's own: ping
/// (small and fragmented), then TCP both ways with checksums (4 MiB down, 1.5 MiB up: random
/// bytes as hex text, since busybox wget posts a file as a C string), which
/// goes through the checksum and segmentation offloads the guest negotiates with the tap.
#[test]
fn linux_talks_to_the_host_over_virtio_net() {
    if !linux_capable("linux_talks_to_the_host_over_virtio_net") {
        return;
    }
    let ns = NetNs::new("net", "tap0", "10.0.0.1/24");
    let tmp = common::TempDir::new("linux-net");
    let blob: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let blob_path = tmp.path("blob");
    std::fs::write(&blob_path, &blob).unwrap();
    let script = tmp.path("server.py");
    std::fs::write(&script, HTTP_SERVER).unwrap();
    let mut server = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3"])
        .arg(&script)
        .arg(&blob_path)
        .arg(tmp.path("ready"))
        .spawn()
        .expect("start the host's HTTP server");
    // Python starts slowly under the L1 machine's software CPU: wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !tmp.path("ready").exists() {
        assert!(
            Instant::now() < deadline,
            "the host's HTTP server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let md5 = |path: &std::path::Path| -> String {
        let out = Command::new("md5sum").arg(path).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let blob_md5 = md5(&blob_path);

    let dir = linux_guest_dir();
    let cmdline = "console=ttyS0 reboot=k panic=-1 quiet ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off \
                   anvil_cmd=\"cat /sys/class/net/eth0/address; ping -c 3 10.0.0.1; ping -c 2 -s 6000 10.0.0.1; \
                   echo down=$(wget -q -O - http://10.0.0.1:8080/blob | md5sum); \
                   dd if=/dev/urandom bs=64k count=8 2>/dev/null | od -An -tx1 > /tmp/up; echo upmd5=$(md5sum /tmp/up); \
                   echo upreply=$(wget -q -O - --post-file=/tmp/up http://10.0.0.1:8080/up)\"";
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(anvil_vmm())
        .arg("boot")
        .arg("--kernel")
        .arg(dir.join("vmlinux"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio.gz"))
        .args([
            "--cmdline",
            cmdline,
            "--net",
            "tap=tap0,mac=52:54:00:12:34:56",
        ]);
    let run = common::run_with_deadline(cmd, BOOT_TIMEOUT);
    let _ = server.kill();
    let _ = server.wait();
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    assert!(
        lines.contains(&"52:54:00:12:34:56"),
        "the guest has the MAC we gave\n{run}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("packets transmitted") && l.contains(" 0% packet loss"))
            .count(),
        2,
        "every ping, small and fragmented, is answered\n{run}"
    );
    let field = |key: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        field("down="),
        blob_md5,
        "4 MiB from the host arrive intact\n{run}"
    );
    let up = field("upmd5=");
    assert_eq!(up.len(), 32, "{run}");
    assert_eq!(
        field("upreply="),
        up,
        "1.5 MiB from the guest arrive intact\n{run}"
    );
    assert_eq!(run.status.code(), Some(0), "{run}");
}

/// Linux's AF_VSOCK driver talks to a host Unix socket through anvil's hybrid vsock: a guest
/// program connects to host port 5005, the test's listener on `<socket>_5005` echoes.
#[test]
fn linux_vsock_round_trip_to_a_host_socket() {
    if !linux_capable("linux_vsock_round_trip_to_a_host_socket") {
        return;
    }
    let tmp = common::TempDir::new("linux-vsock");
    let initrd_path = common::vsock_guest::initramfs_with_vsock_client(&tmp);

    let sock_dir = SockDir::new("vsock");
    let sock = sock_dir.path.join("v.sock");
    let listener =
        std::os::unix::net::UnixListener::bind(format!("{}_5005", sock.display())).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut got).unwrap();
        stream.write_all(b"echo:").unwrap();
        stream.write_all(&got).unwrap();
        got
    });
    let cmdline = "console=ttyS0 reboot=k panic=-1 quiet anvil_cmd=\"/bin/vsock-client 5005 hello-from-linux\"";
    let run = boot(
        &[
            "--kernel",
            linux_guest_dir().join("vmlinux").to_str().unwrap(),
            "--initrd",
            initrd_path.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--vsock",
            &format!("cid=7,socket={}", sock.display()),
        ],
        BOOT_TIMEOUT,
    );
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    assert!(
        lines.contains(&"vsock-reply=echo:hello-from-linux"),
        "{run}"
    );
    assert!(lines.contains(&"vsock-bytes=21"), "{run}");
    assert_eq!(echo.join().unwrap(), b"hello-from-linux");
    assert_eq!(run.status.code(), Some(0), "{run}");
}

/// A Firecracker-style CPU template reaches the guest: clearing CPUID.1:ECX[25] (AES-NI)
/// removes the `aes` flag Linux shows, which the same boot without the template has.
#[test]
fn linux_sees_the_cpu_template() {
    if !linux_capable("linux_sees_the_cpu_template") {
        return;
    }
    let tmp = common::TempDir::new("linux-template");
    let template = tmp.path("no-aes.json");
    let bitmap = format!("0b{}0{}", "x".repeat(6), "x".repeat(25));
    std::fs::write(
        &template,
        format!(
            r#"{{"cpuid_modifiers":[{{"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[{{"register":"ecx","bitmap":"{bitmap}"}}]}}],"msr_modifiers":[]}}"#
        ),
    )
    .unwrap();
    let dir = linux_guest_dir();
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initramfs.cpio.gz");
    let boot_with = |extra: &[&str]| {
        let cmdline = "console=ttyS0 reboot=k panic=-1 quiet anvil_cmd=\"echo aes=$(grep -c -w aes /proc/cpuinfo)\"";
        let mut args = vec![
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            cmdline,
        ];
        args.extend_from_slice(extra);
        boot(&args, BOOT_TIMEOUT)
    };
    let plain = boot_with(&[]);
    let with_template = boot_with(&["--cpu-template", template.to_str().unwrap()]);
    let aes = |run: &Run| {
        run.stdout
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix("aes="))
            .unwrap_or_else(|| panic!("no aes line\n{run}"))
            .to_string()
    };
    assert_ne!(
        aes(&plain),
        "0",
        "the guest CPU has AES-NI without a template\n{plain}"
    );
    assert_eq!(
        aes(&with_template),
        "0",
        "the template hides AES-NI\n{with_template}"
    );
    assert_eq!(with_template.status.code(), Some(0), "{with_template}");
}
