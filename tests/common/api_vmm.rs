//! An anvil-vmm process in Firecracker mode (`--api-sock`), its console and log collected
//! while it runs, for the API tests of both lanes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api_server::client::Client;

use super::anvil_vmm;

/// An anvil-vmm process in Firecracker mode, its console output collected as it comes.
pub struct ApiVmm {
    pub child: Child,
    /// stdout (the guest console) and stderr (the log), kept apart so lines do not mix.
    streams: [Arc<Mutex<String>>; 2],
    socket: PathBuf,
}

impl ApiVmm {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_in(None, args)
    }

    /// Like [`ApiVmm::spawn`], in the working directory `cwd` (relative paths in the VM's
    /// configuration are then that directory's, as under Firecracker's jailer).
    pub fn spawn_in(cwd: Option<&std::path::Path>, args: &[&str]) -> Self {
        Self::spawn_with(&[], cwd, args)
    }

    /// Like [`ApiVmm::spawn_in`], run through `prefix` (e.g. `ip netns exec NAME`).
    pub fn spawn_with(prefix: &[&str], cwd: Option<&std::path::Path>, args: &[&str]) -> Self {
        let socket = args
            .iter()
            .position(|a| *a == "--api-sock")
            .map(|i| PathBuf::from(args[i + 1]))
            .unwrap_or_default();
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(anvil_vmm());
                c
            }
            None => Command::new(anvil_vmm()),
        };
        if let Some(dir) = cwd {
            command.current_dir(dir);
        }
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let streams = [
            Arc::new(Mutex::new(String::new())),
            Arc::new(Mutex::new(String::new())),
        ];
        for (stream, output) in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ]
        .into_iter()
        .zip(streams.clone())
        {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Self {
            child,
            streams,
            socket,
        }
    }

    /// Connects once the socket answers.
    pub fn client(&self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = Client::connect(&self.socket) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "API socket never answered; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The console and then the log.
    pub fn output(&self) -> String {
        let out = self.streams[0].lock().unwrap().clone();
        out + &self.streams[1].lock().unwrap()
    }

    /// The guest console alone.
    pub fn console(&self) -> String {
        // Complete lines only: the guest may be half-way through one.
        let text = self.streams[0].lock().unwrap().clone();
        match text.rfind('\n') {
            Some(end) => text[..=end].to_string(),
            None => String::new(),
        }
    }

    /// Everything the guest printed so far, a line it is half-way through included.
    pub fn console_all(&self) -> String {
        self.streams[0].lock().unwrap().clone()
    }

    /// Waits until `cond` holds for the output.
    pub fn wait_for(&self, what: &str, cond: impl Fn(&str) -> bool) {
        self.wait_for_within(what, Duration::from_secs(20), cond);
    }

    /// Waits up to `timeout` until `cond` holds for the output.
    pub fn wait_for_within(&self, what: &str, timeout: Duration, cond: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond(&self.output()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last `TG count=` the guest printed.
    pub fn count(&self) -> u64 {
        super::tg_lines(&self.console())
            .iter()
            .filter(|(k, _)| k == "count")
            .filter_map(|(_, v)| v.parse().ok())
            .next_back()
            .unwrap_or(0)
    }

    /// Waits for the process to exit; returns its status code.
    pub fn wait_exit(&mut self) -> i32 {
        self.wait_exit_within(Duration::from_secs(20))
    }

    /// Waits up to `timeout` for the process to exit; returns its status code.
    pub fn wait_exit_within(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers catch the last bytes.
                std::thread::sleep(Duration::from_millis(50));
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "anvil-vmm did not exit; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ApiVmm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows what every VMM it ran said, including one that stopped
            // on its own before the assertion that failed.
            let status = self.child.try_wait().ok().flatten();
            let console = self.streams[0]
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            let lines: Vec<&str> = console.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            let log = self.streams[1]
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            eprintln!(
                "--- anvil-vmm {} ({}): the last 40 console lines, then its log:\n{tail}\n{log}--- end",
                self.socket.display(),
                status.map_or("still running".to_string(), |s| format!("exited: {s}")),
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `method path` with a JSON `body` and asserts the answer is 204 No Content.
#[allow(dead_code)]
pub fn ok(c: &mut Client, method: &str, path: &str, body: serde_json::Value) {
    let r = c.request(method, path, Some(&body.to_string())).unwrap();
    assert_eq!(r.status, 204, "{method} {path}: {r:?}");
}

/// Boots Linux through the API (`c`, already given the rest of its configuration): `kernel`
/// and `initrd`, with `cmd` for the guest's init to run (`anvil_cmd=`), console on COM1.
#[allow(dead_code)]
pub fn start_linux(c: &mut Client, kernel: &Path, initrd: &Path, cmd: &str) {
    ok(
        c,
        "PUT",
        "/boot-source",
        serde_json::json!({
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": format!("console=ttyS0 reboot=k panic=-1 quiet anvil_cmd=\"{cmd}\""),
        }),
    );
    ok(
        c,
        "PUT",
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
}

/// Boots the Linux guest in `dir` through the API (`c`, already given its machine, a disk as
/// vda and a network interface) with the workload of the migration tests: a TCP echo service
/// on port 7000 at 10.0.0.2; 8 MiB of random data in tmpfs (guest memory); every 0.3 s a tick
/// that writes `block-N` to its own 512-byte block N of the disk (synchronously) and prints
/// `tick=N sum=<the buffer's md5>`.
#[allow(dead_code)]
pub fn start_ticking_guest(c: &mut Client, dir: &Path) {
    let cmd = "ip addr add 10.0.0.2/24 dev eth0; ip link set eth0 up; \
               nc -l -p 7000 -e cat & \
               head -c 8388608 /dev/urandom > /tmp/buf; i=0; while true; do i=$((i+1)); \
               echo block-$i | dd of=/dev/vda bs=512 seek=$i count=1 conv=sync,fsync 2>/dev/null; \
               echo tick=$i sum=$(md5sum < /tmp/buf | cut -c1-32); sleep 0.3; done";
    start_linux(c, &dir.join("vmlinux"), &dir.join("initramfs.cpio.gz"), cmd);
}
