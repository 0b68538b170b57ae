//! Shared helpers of the integration tests: finding the binaries and guests, spawning
//! anvil-vmm with a deadline, and reading what the guest printed.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]

pub mod api_vmm;
pub mod netns;
pub mod vsock_guest;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The anvil-vmm binary under test: `ANVIL_TEST_VMM` when set (scripts/test.sh sets it to the
/// static release binary of scripts/build-static.sh, the one that ships), else the one cargo
/// built for these tests.
pub fn anvil_vmm() -> PathBuf {
    match std::env::var_os("ANVIL_TEST_VMM") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_anvil-vmm")),
    }
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True when /dev/kvm can be used; otherwise prints loudly why the test is skipped.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert!(
        ok || std::env::var_os("ANVIL_REQUIRE_LINUX").is_none(),
        "{test}: ANVIL_REQUIRE_LINUX is set but /dev/kvm cannot be opened"
    );
    if !ok {
        eprintln!("SKIPPED {test}: /dev/kvm is missing or not accessible on this host");
    }
    ok
}

/// True when this host's KVM runs a Linux guest at a useful speed (hardware KVM, not PVM
/// emulating guest kernel code); otherwise prints loudly why the test is skipped.
pub fn linux_capable(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(
            std::env::var_os("ANVIL_REQUIRE_LINUX").is_none(),
            "{test}: ANVIL_REQUIRE_LINUX is set but this host's KVM (kvm_pvm) cannot run Linux"
        );
        eprintln!(
            "SKIPPED {test}: this host's KVM (kvm_pvm) emulates guest kernel code, so Linux \
             cannot boot here; .ci/run runs the Linux lane inside the L1 machine"
        );
        return false;
    }
    true
}

/// The test guest ELF: `$ANVIL_TESTGUEST` if set, else built (once per test binary) with
/// cargo into a target directory of its own, so the nested build never waits on the lock of
/// the build that is running these tests.
pub fn testguest() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("ANVIL_TESTGUEST") {
            return PathBuf::from(path);
        }
        let target_dir = repo_root().join("target").join("testguest-build");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet", "-p", "anvil-testguest"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(repo_root())
            .status()
            .expect("cannot run cargo to build the test guest");
        assert!(status.success(), "building the test guest failed");
        target_dir.join("release").join("anvil-testguest")
    })
    .clone()
}

/// The directory with the Linux guest artifacts (vmlinux, bzImage, initramfs.cpio.gz),
/// found or built by scripts/guest-artifacts.sh.
pub fn linux_guest_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(repo_root().join("scripts").join("guest-artifacts.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("cannot run scripts/guest-artifacts.sh");
        assert!(out.status.success(), "scripts/guest-artifacts.sh failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// What an anvil-vmm run left behind.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// `TG key=value` lines the test guest printed, by key (last value wins).
    pub fn tg(&self) -> BTreeMap<String, String> {
        tg_lines(&self.stdout).into_iter().collect()
    }

    /// Every value printed for `key`, in order.
    pub fn tg_all(&self, key: &str) -> Vec<String> {
        tg_lines(&self.stdout)
            .into_iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .collect()
    }

    /// Panics with the whole output unless the guest passed and the VMM exited 0.
    pub fn assert_pass(&self) {
        let tg = self.tg();
        assert_eq!(
            tg.get("result").map(String::as_str),
            Some("pass"),
            "guest did not pass\n{self}"
        );
        assert_eq!(
            self.status.code(),
            Some(0),
            "anvil-vmm did not exit 0\n{self}"
        );
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status: {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Parses `TG key=value` lines (carriage returns stripped).
pub fn tg_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.trim_end_matches('\r').strip_prefix("TG "))
        .filter_map(|rest| {
            let (k, v) = rest.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Runs `cmd` with stdin closed, killing it after `timeout`; panics on timeout with what it
/// printed so far.
pub fn run_with_deadline(mut cmd: Command, timeout: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot spawn");
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    match status {
        Some(status) => Run {
            status,
            stdout,
            stderr,
            elapsed,
        },
        None => panic!(
            "timed out after {timeout:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        ),
    }
}

/// Runs `anvil-vmm boot` with `args`.
pub fn boot(args: &[&str], timeout: Duration) -> Run {
    let mut cmd = Command::new(anvil_vmm());
    cmd.arg("boot").args(args);
    run_with_deadline(cmd, timeout)
}

/// Boots the test guest with `cmdline` and extra `args`.
pub fn boot_testguest(cmdline: &str, args: &[&str]) -> Run {
    let guest = testguest();
    let mut all = vec![
        "--kernel",
        guest.to_str().expect("utf-8 path"),
        "--cmdline",
        cmdline,
    ];
    all.extend_from_slice(args);
    boot(&all, Duration::from_secs(60))
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("anvil-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A minimal static ELF64 "kernel": one PT_LOAD segment with `code` at physical `load_addr`,
/// entered at its first byte through the 64-bit boot protocol. For guests that misbehave on
/// purpose (triple fault, halt forever).
pub fn tiny_elf(code: &[u8], load_addr: u64) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let offset = 0x1000u64;
    let mut elf = vec![0u8; offset as usize];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // ELFCLASS64
    elf[5] = 1; // little endian
    elf[6] = 1; // EV_CURRENT
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&load_addr.to_le_bytes()); // e_entry
    elf[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    elf[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut elf[EHDR..EHDR + PHDR];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&offset.to_le_bytes());
    ph[16..24].copy_from_slice(&load_addr.to_le_bytes()); // vaddr
    ph[24..32].copy_from_slice(&load_addr.to_le_bytes()); // paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

/// A directory for Unix sockets, removed on drop. Inside the L1 machine the temporary
/// directory is the host's, over 9p, which cannot hold sockets: then a tmpfs is mounted on it
/// (the Linux lane runs as root there).
pub struct SockDir {
    /// The directory.
    pub path: std::path::PathBuf,
    mounted: bool,
}

impl SockDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("anvil-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        let probe = path.join("probe.sock");
        let mounted = match std::os::unix::net::UnixListener::bind(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                false
            }
            Err(_) => {
                let status = Command::new("mount")
                    .args(["-t", "tmpfs", "tmpfs"])
                    .arg(&path)
                    .status()
                    .expect("run mount");
                assert!(status.success(), "cannot mount a tmpfs for Unix sockets");
                true
            }
        };
        Self { path, mounted }
    }
}

impl Drop for SockDir {
    fn drop(&mut self) {
        if self.mounted {
            // Lazily: a test may still hold a socket in it (a listener thread).
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
