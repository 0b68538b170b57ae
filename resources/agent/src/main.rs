//! `anvil-agent`: the init (PID 1) of an `anvil-vmm run` guest. It reads the run spec from
//! `/anvil/spec.json` in its initramfs, connects three vsock streams to the host (stdout,
//! stderr, status), mounts the image root (`/dev/vda`, read-only ext4) under a writable overlay
//! (`/dev/vdb`, ext4), mounts /proc, /sys, /dev and /tmp inside it, switches into it, runs the
//! entrypoint as the image's user with its environment and working directory, reaps orphans,
//! sends `exit N` on the status stream and reboots (the VMM sees the reset and stops).
//!
//! Wire protocol (host side: `anvil-vmm run`, src/image_cmd.rs): the guest connects to the
//! host CID 2 on the ports in the spec; stdout and stderr carry the raw bytes; the status
//! stream carries one line `exit N` (N = exit code, or 128 + signal); with `run -i` a fourth
//! stream carries the workload's stdin from the host (its end is the workload's end of input);
//! on the control stream the host sends lines `signal N`, which the agent forwards to the
//! workload.
//!
//! Local mode, for testing the agent on a host without a VM:
//! `unshare --pid --fork anvil-agent --local SPEC LOWER SCRATCH` runs the same steps as PID 1 of a
//! new PID namespace, with three differences: the spec comes from the file SPEC, the overlay's
//! lower layer is the directory LOWER (an unpacked image root, left untouched) and its upper layer
//! a tmpfs mounted on the empty directory SCRATCH, and the workload's stdout and stderr (and
//! stdin, when the spec has a stdin port) are the agent's own, whose exit code is the workload's. The agent first moves into new mount, UTS and
//! network namespaces of its own, so nothing it mounts or sets (hostname, `lo`) reaches the host.
//! Everything after the root is mounted (user, environment, working directory, the run, reaping,
//! the exit code) is the guest's code path.
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};

use serde::Deserialize;

mod net;

/// The spec `anvil-vmm run` puts in the initramfs.
#[derive(Debug, Deserialize)]
struct Spec {
    argv: Vec<String>,
    env: Vec<String>,
    workdir: String,
    user: String,
    hostname: String,
    stdout_port: u32,
    stderr_port: u32,
    status_port: u32,
    /// `run -i`: the workload's stdin is a stream from the host on this port (else /dev/null).
    #[serde(default)]
    stdin_port: Option<u32>,
    /// Control stream from the host: lines `signal N` forward signal N to the workload.
    #[serde(default)]
    control_port: Option<u32>,
    /// `run --ip`: the address (and default route) of a `--net` interface.
    #[serde(default)]
    net: Option<net::NetSpec>,
}

/// The host's vsock CID.
const HOST_CID: u32 = 2;
/// Exit code when the command cannot be found (as shells and container runtimes use).
const EXIT_NOT_FOUND: i32 = 127;
/// Exit code when the command cannot be run.
const EXIT_CANNOT_RUN: i32 = 126;

fn vsock_connect(port: u32) -> Result<OwnedFd, String> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("vsock socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor this function owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family =
        libc::sa_family_t::try_from(libc::AF_VSOCK).expect("AF_VSOCK (40) fits sa_family_t");
    addr.svm_cid = HOST_CID;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm and its exact size is passed.
    let rc = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>())
                .expect("sockaddr_vm is 16 bytes"),
        )
    };
    if rc != 0 {
        return Err(format!(
            "vsock connect to port {port}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(owned)
}

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} has a NUL byte"))
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let _ = fs::create_dir_all(target);
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc != 0 {
        return Err(format!(
            "mount {fstype} {source} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Where the workload's root comes from: the overlay's read-only lower directory, the directory
/// holding its upper and work directories, and where it is mounted.
#[derive(Debug)]
struct RootLayout {
    lower: String,
    rw: String,
    root: String,
}

/// The guest's: the image disk (vda) and the writable layer (vdb) from the initramfs' mount points.
fn guest_layout() -> Result<RootLayout, String> {
    mount("devtmpfs", "/dev", "devtmpfs", 0, "")?;
    mount("/dev/vda", "/mnt/lower", "ext4", libc::MS_RDONLY, "")?;
    mount("/dev/vdb", "/mnt/rw", "ext4", 0, "")?;
    Ok(RootLayout {
        lower: "/mnt/lower".into(),
        rw: "/mnt/rw".into(),
        root: "/mnt/root".into(),
    })
}

/// Mounts the image root with its writable layer at `layout.root` and the API file systems in
/// it.
fn mount_root(layout: &RootLayout) -> Result<(), String> {
    let RootLayout { lower, rw, root } = layout;
    for d in [format!("{rw}/upper"), format!("{rw}/work")] {
        fs::create_dir_all(&d).map_err(|e| format!("mkdir {d}: {e}"))?;
    }
    mount(
        "overlay",
        root,
        "overlay",
        0,
        &format!("lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work"),
    )?;
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", &format!("{root}/proc"), "proc", nosuid, "")?;
    mount("sysfs", &format!("{root}/sys"), "sysfs", nosuid, "")?;
    mount(
        "devtmpfs",
        &format!("{root}/dev"),
        "devtmpfs",
        libc::MS_NOSUID,
        "",
    )?;
    mount(
        "devpts",
        &format!("{root}/dev/pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "",
    )?;
    mount("tmpfs", &format!("{root}/dev/shm"), "tmpfs", nosuid, "")?;
    mount(
        "tmpfs",
        &format!("{root}/tmp"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    Ok(())
}

/// Finds `name` in an /etc/passwd or /etc/group style file: (field 2, field 3) as numbers.
fn lookup(file: &str, name: &str) -> Option<(u32, u32)> {
    let text = fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&name) {
            let id = fields.get(2)?.parse().ok()?;
            let gid = fields.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
            Some((id, gid))
        } else {
            None
        }
    })
}

/// Resolves `user[:group]` (names or numbers) inside the image root.
fn resolve_user(spec: &str) -> Result<(u32, u32), String> {
    if spec.is_empty() {
        return Ok((0, 0));
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, lookup("/etc/passwd", user).map_or(uid, |(_, g)| g)),
        Err(_) => {
            lookup("/etc/passwd", user).ok_or_else(|| format!("no user {user:?} in the image"))?
        }
    };
    let gid = match group {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                lookup("/etc/group", g)
                    .ok_or_else(|| format!("no group {g:?} in the image"))?
                    .0
            }
        },
    };
    Ok((uid, gid))
}

/// The workload's standard streams (`stdin` `None` is /dev/null) and the host's control stream.
#[derive(Debug)]
struct Streams {
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    control: Option<OwnedFd>,
}

/// Largest control line read.
const MAX_CONTROL_LINE: u64 = 64;

/// Reads `signal N` lines from the host and sends signal N to the workload `pid`.
fn forward_signals(control: OwnedFd, pid: libc::pid_t) {
    let spawned = std::thread::Builder::new()
        .name("anvil-control".into())
        .spawn(move || {
            let mut lines = std::io::BufReader::new(fs::File::from(control));
            loop {
                let mut line = String::new();
                match std::io::BufRead::read_line(
                    &mut std::io::Read::take(&mut lines, MAX_CONTROL_LINE),
                    &mut line,
                ) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let signal = line
                    .trim()
                    .strip_prefix("signal ")
                    .and_then(|n| n.parse::<libc::c_int>().ok())
                    .filter(|n| (1..=64).contains(n));
                if let Some(signal) = signal {
                    // SAFETY: kill(2) on the workload's pid, which this process has not reaped
                    // while the thread can run (the agent powers off right after reaping it).
                    unsafe { libc::kill(pid, signal) };
                }
            }
        });
    drop(spawned);
}

/// Runs the workload; returns its exit code.
fn run(
    spec: &Spec,
    layout: Result<RootLayout, String>,
    streams: Streams,
    err: &mut dyn Write,
) -> i32 {
    let root = match layout.and_then(|layout| {
        mount_root(&layout)?;
        cstr(&layout.root)
    }) {
        Ok(root) => root,
        Err(e) => {
            let _ = writeln!(err, "anvil-agent: {e}");
            return EXIT_CANNOT_RUN;
        }
    };
    // Loopback up, as container runtimes do; other interfaces only with `run --ip`.
    if let Err(e) = net::link_up("lo") {
        let _ = writeln!(err, "anvil-agent: {e}");
    }
    if let Some(spec) = &spec.net {
        if let Err(e) = net::configure(spec) {
            let _ = writeln!(err, "anvil-agent: {e}");
            return EXIT_CANNOT_RUN;
        }
    }
    if let Ok(name) = cstr(&spec.hostname) {
        // SAFETY: `name` is valid for its length.
        unsafe { libc::sethostname(name.as_ptr(), spec.hostname.len()) };
    }
    // SAFETY: a valid path; chroot changes only this process's root.
    if unsafe { libc::chroot(root.as_ptr()) } != 0 || std::env::set_current_dir("/").is_err() {
        let _ = writeln!(
            err,
            "anvil-agent: chroot: {}",
            std::io::Error::last_os_error()
        );
        return EXIT_CANNOT_RUN;
    }
    let (uid, gid) = match resolve_user(&spec.user) {
        Ok(ids) => ids,
        Err(e) => {
            let _ = writeln!(err, "anvil-agent: {e}");
            return EXIT_CANNOT_RUN;
        }
    };
    let workdir = if spec.workdir.is_empty() {
        "/"
    } else {
        spec.workdir.as_str()
    };
    // Like container runtimes: a missing working directory is created.
    let _ = fs::create_dir_all(workdir);
    let Some((program, args)) = spec.argv.split_first() else {
        let _ = writeln!(
            err,
            "anvil-agent: no command (the image has no entrypoint or cmd)"
        );
        return EXIT_CANNOT_RUN;
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(spec.env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir(workdir)
        .stdin(streams.stdin.map_or_else(Stdio::null, Stdio::from))
        .stdout(Stdio::from(streams.stdout))
        .stderr(Stdio::from(streams.stderr))
        .uid(uid)
        .gid(gid);
    // With uid set, std also drops the supplementary groups (setgroups(0)) when run as root.
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = writeln!(err, "anvil-agent: cannot run {program:?}: {e}");
            return if e.kind() == std::io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_RUN
            };
        }
    };
    drop(command);
    let pid = child.id() as libc::pid_t;
    if let Some(control) = streams.control {
        forward_signals(control, pid);
    }
    // PID 1 reaps every orphan; the workload's status is the one that counts.
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped == pid {
            let status = std::process::ExitStatus::from_raw(status);
            return status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(EXIT_CANNOT_RUN);
        }
        if reaped < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return EXIT_CANNOT_RUN;
        }
    }
}

fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; with reboot=k the VMM sees an i8042 reset.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::park();
    }
}

/// Reads and parses the run spec.
fn read_spec(path: &str) -> Result<Spec, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("bad {path}: {e}"))
}

/// Local mode's set-up (see the crate docs): checks it is PID 1, moves into mount, UTS and
/// network namespaces of its own and mounts a tmpfs on `scratch` for the overlay's upper layer.
fn local_layout(lower: &str, scratch: &str) -> Result<RootLayout, String> {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        return Err("--local runs as PID 1 of a new PID namespace (unshare --pid --fork)".into());
    }
    for dir in [lower, scratch] {
        // The overlay's mount options are separated by ',' and lower layers by ':'.
        if !dir.starts_with('/') || dir.contains([',', ':', '\\']) {
            return Err(format!(
                "{dir:?}: give an absolute path without ',', ':' or '\\'"
            ));
        }
    }
    // SAFETY: unshare(2) with constant flags; the agent has no other threads yet.
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare mount, UTS and network namespaces: {}",
            std::io::Error::last_os_error()
        ));
    }
    // Nothing mounted from here on propagates back to the host.
    mount("none", "/", "", libc::MS_REC | libc::MS_PRIVATE, "")?;
    mount("tmpfs", scratch, "tmpfs", 0, "mode=0755")?;
    Ok(RootLayout {
        lower: lower.to_string(),
        rw: format!("{scratch}/rw"),
        root: format!("{scratch}/root"),
    })
}

/// `anvil-agent --local SPEC LOWER SCRATCH`: the host-side test mode (see the crate docs).
fn local_main(args: &[String]) -> ! {
    let [spec, lower, scratch] = args else {
        eprintln!("usage: anvil-agent --local SPEC LOWER SCRATCH");
        std::process::exit(EXIT_CANNOT_RUN);
    };
    let spec = match read_spec(spec) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("anvil-agent: {e}");
            std::process::exit(EXIT_CANNOT_RUN);
        }
    };
    let streams = (|| {
        Ok::<_, std::io::Error>(Streams {
            stdin: match spec.stdin_port {
                Some(_) => Some(std::io::stdin().as_fd().try_clone_to_owned()?),
                None => None,
            },
            stdout: std::io::stdout().as_fd().try_clone_to_owned()?,
            stderr: std::io::stderr().as_fd().try_clone_to_owned()?,
            control: None,
        })
    })();
    let code = match streams {
        Ok(streams) => run(
            &spec,
            local_layout(lower, scratch),
            streams,
            &mut std::io::stderr(),
        ),
        Err(e) => {
            eprintln!("anvil-agent: dup: {e}");
            EXIT_CANNOT_RUN
        }
    };
    std::process::exit(code)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--local") {
        local_main(&args[2..]);
    }
    let mut console = fs::OpenOptions::new().write(true).open("/dev/console").ok();
    let fail = |console: &mut Option<fs::File>, why: String| -> ! {
        if let Some(c) = console.as_mut() {
            let _ = writeln!(c, "anvil-agent: {why}");
        }
        power_off()
    };
    let spec = match read_spec("/anvil/spec.json") {
        Ok(s) => s,
        Err(e) => fail(&mut console, e),
    };
    let streams = vsock_connect(spec.status_port).and_then(|status| {
        let streams = Streams {
            stdout: vsock_connect(spec.stdout_port)?,
            stderr: vsock_connect(spec.stderr_port)?,
            stdin: spec.stdin_port.map(vsock_connect).transpose()?,
            control: spec.control_port.map(vsock_connect).transpose()?,
        };
        Ok((status, streams))
    });
    let (status, streams) = match streams {
        Ok(s) => s,
        Err(e) => fail(&mut console, e),
    };
    let mut err = match streams.stderr.try_clone() {
        Ok(fd) => fs::File::from(fd),
        Err(e) => fail(&mut console, format!("dup: {e}")),
    };
    let code = run(&spec, guest_layout(), streams, &mut err);
    drop(err);
    let mut status = fs::File::from(status);
    let _ = writeln!(status, "exit {code}");
    let _ = status.flush();
    drop(status);
    power_off()
}
