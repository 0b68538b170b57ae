//! `anvil-vmm pull`, `run` and `images`: container images as microVMs. The image logic lives
//! in the `oci` crate; this module turns the flags into a [`vmm::VmConfig`] whose guest is the
//! agent initramfs (resources/agent) over the image's root disk, and relays the workload's
//! stdout, stderr and exit code from the agent's vsock streams.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use oci::{Image, ImageRef, RegistryOptions, Store};
use serde::Serialize;
use vmm::config::{parse_disks, parse_mem_size_mib, parse_nets, validate_vcpu_count, VsockConfig};
use vmm::{VmConfig, VmOutcome, Vmm};

use relay::{finish, relay, relay_stdin, Janitor, SocketDir};
use signals::{accept_control, remove_on_signal, stop_on_signals};

mod relay;
mod signals;

/// Exit status of `run` when anvil itself fails (as `docker run` does): the workload's own
/// codes pass through unchanged.
const EXIT_RUN_ERROR: u8 = 125;
/// Exit status for command-line errors.
const EXIT_USAGE: u8 = 2;
/// Exit status of `pull` and `images` on errors.
const EXIT_ERROR: u8 = 1;
/// Host vsock ports the agent connects to.
const PORT_STDOUT: u32 = 1000;
const PORT_STDERR: u32 = 1001;
const PORT_STATUS: u32 = 1002;
const PORT_STDIN: u32 = 1003;
const PORT_CONTROL: u32 = 1004;
/// The guest's vsock CID.
const GUEST_CID: u64 = 3;
/// Size of each run's writable layer (a sparse file).
const SCRATCH_DISK_MIB: u64 = 1024;
/// Kernel command line of `run` guests: no console unless asked for, so the serial port
/// (which anvil prints to stdout) stays silent and stdout is the workload's alone.
const RUN_CMDLINE: &str = "reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux \
     i8042.dumbkbd tsc=reliable no_timer_check quiet loglevel=1";
/// How long the output streams may lag behind the VM's end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Default PATH for images whose configuration sets none (as Docker's).
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Flags shared by the image commands.
#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    /// The image cache (default $XDG_DATA_HOME/anvil or ~/.local/share/anvil).
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
}

/// `anvil-vmm pull`.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// host[:port]/name[:tag|@digest], oci:DIR[:tag] or docker-archive:FILE.
    image: String,
    /// Speak plain HTTP to this registry (host or host:port). Repeatable. Loopback always is.
    #[arg(long, value_name = "HOST")]
    insecure_registry: Vec<String>,
    #[command(flatten)]
    cache: CacheArgs,
}

/// `anvil-vmm run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// host[:port]/name[:tag|@digest], oci:DIR[:tag] or docker-archive:FILE; pulled if the
    /// cache does not have it.
    image: String,
    /// Arguments: replace the image's Cmd.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1")]
    cpus: String,
    /// Guest memory: MiB or a size such as 512M.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    memory: String,
    /// Set an environment variable (K=V, or K to pass this process's value). Repeatable.
    #[arg(long, short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Replace the image's entrypoint (one executable; the image's Cmd is dropped too).
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,
    /// Working directory of the workload.
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    /// Keep stdin open: the workload reads this process's stdin (else /dev/null).
    #[arg(long, short = 'i')]
    interactive: bool,
    /// User of the workload: user[:group], names or numbers.
    #[arg(long, short = 'u', value_name = "USER")]
    user: Option<String>,
    /// A virtio-net interface, as `boot --net`. Repeatable.
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// IPv4 address of the first --net interface (eth0 in the guest) as ADDR/PREFIX; the agent
    /// configures it before the workload starts (without it, only `lo` is up).
    #[arg(long, value_name = "ADDR/PREFIX", requires = "net")]
    ip: Option<String>,
    /// Default route of the guest, via this address (with --ip).
    #[arg(long, value_name = "ADDR", requires = "ip")]
    gateway: Option<std::net::Ipv4Addr>,
    /// An extra virtio-blk disk, as `boot --disk` (the guest sees it as vdc, vdd, ...).
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// Remove the run's writable layer when it ends.
    #[arg(long)]
    rm: bool,
    /// Speak plain HTTP to this registry (host or host:port). Repeatable.
    #[arg(long, value_name = "HOST")]
    insecure_registry: Vec<String>,
    /// Guest kernel (default $ANVIL_RUN_KERNEL, else DATA/guest/vmlinux).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Agent initramfs from resources/agent/build-initramfs.sh (default $ANVIL_RUN_AGENT, else
    /// DATA/guest/agent-initramfs.cpio.gz).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Show the guest kernel's console (on stdout, mixed with the workload's output).
    #[arg(long)]
    console: bool,
    #[command(flatten)]
    cache: CacheArgs,
}

/// `anvil-vmm images`.
#[derive(Debug, clap::Args)]
pub struct ImagesArgs {
    #[command(subcommand)]
    action: Option<ImagesAction>,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Debug, clap::Subcommand)]
enum ImagesAction {
    /// List cached images with their sizes (the default).
    Ls,
    /// Remove images by reference or configuration digest (12+ hex digits).
    Rm {
        /// References or digests.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove unused blobs, stale scratch and finished runs' writable layers.
    Prune,
}

/// The run spec the agent reads from /anvil/spec.json (see resources/agent/src/main.rs).
#[derive(Debug, Serialize, PartialEq)]
struct AgentSpec {
    argv: Vec<String>,
    env: Vec<String>,
    workdir: String,
    user: String,
    hostname: String,
    stdout_port: u32,
    stderr_port: u32,
    status_port: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdin_port: Option<u32>,
    control_port: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    net: Option<AgentNet>,
}

/// `--ip`/`--gateway` for the agent (resources/agent/src/net.rs).
#[derive(Debug, Serialize, PartialEq)]
struct AgentNet {
    interface: String,
    address: std::net::Ipv4Addr,
    prefix_len: u8,
    gateway: Option<std::net::Ipv4Addr>,
}

/// Parses `--ip ADDR/PREFIX`.
fn parse_ip(text: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let bad = || format!("invalid --ip {text:?}: expected an IPv4 ADDR/PREFIX such as 10.0.0.2/24");
    let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
    let addr = addr.parse().map_err(|_| bad())?;
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(bad)?;
    Ok((addr, prefix))
}

fn error_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

fn open_store(cache: &CacheArgs) -> Result<Store, String> {
    let dir = cache.data_dir.clone().unwrap_or_else(Store::default_dir);
    Store::open(&dir).map_err(|e| error_line(&e))
}

fn fail(code: u8, why: &str) -> ExitCode {
    eprintln!("anvil-vmm: error: {why}");
    ExitCode::from(code)
}

/// `anvil-vmm pull IMAGE`: prints the root disk's path.
pub fn pull(args: PullArgs) -> ExitCode {
    let reference = match ImageRef::parse(&args.image) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_USAGE, &e.to_string()),
    };
    let store = match open_store(&args.cache) {
        Ok(s) => s,
        Err(why) => return fail(EXIT_ERROR, &why),
    };
    let options = RegistryOptions {
        insecure: args.insecure_registry,
        docker_config: None,
    };
    match store.pull(&reference, &options) {
        Ok(image) => {
            println!("{}", image.disk.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_ERROR, &error_line(&e)),
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `anvil-vmm images [ls|rm|prune]`.
pub fn images(args: ImagesArgs) -> ExitCode {
    let store = match open_store(&args.cache) {
        Ok(s) => s,
        Err(why) => return fail(EXIT_ERROR, &why),
    };
    match args.action.unwrap_or(ImagesAction::Ls) {
        ImagesAction::Ls => match store.list() {
            Ok(images) => {
                println!("{:<14} {:>10} {:>10}  REFERENCES", "IMAGE", "DISK", "BLOBS");
                for image in images {
                    let r = &image.record;
                    println!(
                        "{:<14} {:>10} {:>10}  {}",
                        &r.config_digest.hex()[..12],
                        human(r.disk_bytes),
                        human(store.blob_bytes(r)),
                        r.refs.join(", ")
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_ERROR, &error_line(&e)),
        },
        ImagesAction::Rm { images } => {
            let mut code = ExitCode::SUCCESS;
            for name in images {
                match store.remove(&name) {
                    Ok(r) if r.refs.is_empty() => println!("removed {}", r.config_digest),
                    Ok(_) => println!("untagged {name}"),
                    Err(e) => code = fail(EXIT_ERROR, &error_line(&e)),
                }
            }
            code
        }
        ImagesAction::Prune => match store.prune() {
            Ok(report) => {
                println!(
                    "removed {} blobs ({}) and {} directories",
                    report.blobs,
                    human(report.bytes),
                    report.dirs
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_ERROR, &error_line(&e)),
        },
    }
}

/// The workload's argv, env, working directory and user: the image configuration with the
/// flags on top, as `docker run` combines them.
fn agent_spec(args: &RunArgs, image: &Image) -> Result<AgentSpec, String> {
    let config = image.record.config.config.clone().unwrap_or_default();
    let (entrypoint, cmd) = match &args.entrypoint {
        Some(e) => (vec![e.clone()], Vec::new()),
        None => (
            config.entrypoint.unwrap_or_default(),
            config.cmd.unwrap_or_default(),
        ),
    };
    let mut argv = entrypoint;
    argv.extend(if args.args.is_empty() {
        cmd
    } else {
        args.args.clone()
    });
    if argv.is_empty() {
        return Err("the image has no entrypoint or cmd: give a command after --".into());
    }
    let mut env = config.env.unwrap_or_default();
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or("").to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(kv);
    };
    for e in &args.env {
        if e.is_empty() || e.starts_with('=') {
            return Err(format!("invalid --env {e:?}: expected K=V or K"));
        }
        if e.contains('=') {
            set(e.clone());
        } else if let Ok(value) = std::env::var(e) {
            set(format!("{e}={value}"));
        }
    }
    let hostname = image.record.config_digest.hex()[..12].to_string();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={hostname}"));
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push("HOME=/root".to_string());
    }
    Ok(AgentSpec {
        argv,
        env,
        workdir: args
            .workdir
            .clone()
            .or(config.working_dir)
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".to_string()),
        user: args.user.clone().or(config.user).unwrap_or_default(),
        hostname,
        stdout_port: PORT_STDOUT,
        stderr_port: PORT_STDERR,
        status_port: PORT_STATUS,
        stdin_port: args.interactive.then_some(PORT_STDIN),
        control_port: PORT_CONTROL,
        net: match &args.ip {
            Some(ip) => {
                let (address, prefix_len) = parse_ip(ip)?;
                Some(AgentNet {
                    interface: "eth0".into(),
                    address,
                    prefix_len,
                    gateway: args.gateway,
                })
            }
            None => None,
        },
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// CLOCK_MONOTONIC in microseconds: the clock benchmark scripts read (Python's
/// `time.monotonic_ns`), so they can place these log lines against their own spawn time.
fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000
}

/// Appends one newc cpio entry.
fn cpio_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) -> Result<(), String> {
    let name_z = format!("{name}\0");
    let too_big = |_| format!("{name} is too large for a cpio archive");
    let data_len = u32::try_from(data.len()).map_err(too_big)?;
    let name_len = u32::try_from(name_z.len()).map_err(too_big)?;
    let fields = [1, mode, 0, 0, 1, 0, data_len, 0, 0, 0, 0, name_len, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name_z.as_bytes());
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
    Ok(())
}

/// The agent initramfs with the spec appended as a second (uncompressed) cpio archive.
fn write_initrd(agent: &Path, spec: &AgentSpec, out: &Path) -> Result<(), String> {
    let mut bytes = std::fs::read(agent)
        .map_err(|e| format!("cannot read the agent initramfs {}: {e}", agent.display()))?;
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    let json = serde_json::to_vec(spec).map_err(|e| e.to_string())?;
    cpio_entry(&mut bytes, "anvil", 0o040755, &[])?;
    cpio_entry(&mut bytes, "anvil/spec.json", 0o100644, &json)?;
    cpio_entry(&mut bytes, "TRAILER!!!", 0, &[])?;
    std::fs::write(out, bytes).map_err(|e| format!("cannot write {}: {e}", out.display()))
}

/// A guest file: the flag, else the environment variable, else DATA/guest/NAME.
fn guest_file(
    flag: &Option<PathBuf>,
    var: &str,
    store: &Store,
    name: &str,
) -> Result<PathBuf, String> {
    let path = flag
        .clone()
        .or_else(|| std::env::var_os(var).map(PathBuf::from))
        .unwrap_or_else(|| store.dir().join("guest").join(name));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no {} (give --{} or ${var}, or put it in {})",
            path.display(),
            if var.ends_with("KERNEL") {
                "kernel"
            } else {
                "agent"
            },
            store.dir().join("guest").display()
        ))
    }
}

/// `anvil-vmm run IMAGE`: exits with the workload's exit code.
pub fn run(args: RunArgs, start: Instant) -> ExitCode {
    if let Err(why) = stop_on_signals() {
        return fail(EXIT_RUN_ERROR, &why);
    }
    let reference = match ImageRef::parse(&args.image) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_USAGE, &e.to_string()),
    };
    let vcpu_count = match args
        .cpus
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("invalid --cpus {:?}", args.cpus))
        .and_then(|n| validate_vcpu_count(n).map_err(|e| format!("invalid --cpus: {e}")))
    {
        Ok(n) => n,
        Err(why) => return fail(EXIT_USAGE, &why),
    };
    let mem_size_mib = match parse_mem_size_mib(&args.memory) {
        Ok(m) => m,
        Err(e) => return fail(EXIT_USAGE, &format!("invalid --memory: {e}")),
    };
    if let Some(Err(why)) = args.ip.as_deref().map(parse_ip) {
        return fail(EXIT_USAGE, &why);
    }
    let store = match open_store(&args.cache) {
        Ok(s) => s,
        Err(why) => return fail(EXIT_RUN_ERROR, &why),
    };
    let (kernel, agent) = match guest_file(&args.kernel, "ANVIL_RUN_KERNEL", &store, "vmlinux")
        .and_then(|k| {
            guest_file(
                &args.agent,
                "ANVIL_RUN_AGENT",
                &store,
                "agent-initramfs.cpio.gz",
            )
            .map(|a| (k, a))
        }) {
        Ok(files) => files,
        Err(why) => return fail(EXIT_RUN_ERROR, &why),
    };
    let options = RegistryOptions {
        insecure: args.insecure_registry.clone(),
        docker_config: None,
    };
    let image = match store.get_or_pull(&reference, &options) {
        Ok(image) => image,
        Err(e) => return fail(EXIT_RUN_ERROR, &error_line(&e)),
    };
    let spec = match agent_spec(&args, &image) {
        Ok(spec) => spec,
        Err(why) => return fail(EXIT_USAGE, &why),
    };
    let run_dir = match store.begin_run(&image) {
        Ok(d) => d,
        Err(e) => return fail(EXIT_RUN_ERROR, &error_line(&e)),
    };
    if args.rm {
        remove_on_signal(&run_dir.path);
    }
    let janitor = match Janitor::start() {
        Ok(j) => j,
        Err(why) => return fail(EXIT_RUN_ERROR, &why),
    };
    let code = match run_vm(
        &janitor,
        &store,
        &args,
        &image,
        &spec,
        &run_dir.path,
        &kernel,
        &agent,
        vcpu_count,
        mem_size_mib,
        start,
    ) {
        Ok(code) => ExitCode::from(code),
        Err(why) => fail(EXIT_RUN_ERROR, &why),
    };
    if args.rm {
        janitor.remove(&run_dir.path);
    } else {
        tracing::info!(dir = %run_dir.path.display(), "the run's writable layer is kept (--rm removes it)");
    }
    janitor.finish();
    code
}

#[allow(clippy::too_many_arguments)]
fn run_vm(
    janitor: &Janitor,
    store: &Store,
    args: &RunArgs,
    image: &Image,
    spec: &AgentSpec,
    run_dir: &Path,
    kernel: &Path,
    agent: &Path,
    vcpu_count: u8,
    mem_size_mib: u64,
    start: Instant,
) -> Result<u8, String> {
    let rw_disk = run_dir.join("rw.ext4");
    store
        .scratch_disk(&rw_disk, SCRATCH_DISK_MIB)
        .map_err(|e| error_line(&e))?;
    let initrd = run_dir.join("initrd.cpio");
    write_initrd(agent, spec, &initrd)?;

    let sockets = SocketDir(
        std::env::temp_dir().join(format!(
            "anvil-run-{}-{}",
            std::process::id(),
            run_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        )),
        janitor,
    );
    std::fs::create_dir_all(&sockets.0)
        .map_err(|e| format!("cannot create {}: {e}", sockets.0.display()))?;
    remove_on_signal(&sockets.0);
    let uds = sockets.0.join("v.sock");
    let listen = |port: u32| {
        let path = format!("{}_{port}", uds.display());
        UnixListener::bind(&path).map_err(|e| {
            format!(
                "cannot listen on {path}: {e} (TMPDIR must be on a file system with Unix sockets)"
            )
        })
    };
    let stdout = relay(listen(PORT_STDOUT)?, Some(Box::new(std::io::stdout())));
    let stderr = relay(listen(PORT_STDERR)?, Some(Box::new(std::io::stderr())));
    let status = relay(listen(PORT_STATUS)?, None);
    if spec.stdin_port.is_some() {
        relay_stdin(listen(PORT_STDIN)?);
    }
    accept_control(listen(PORT_CONTROL)?);

    let mut disks = vec![
        format!("path={},ro,id=image", image.disk.display()),
        format!("path={},id=scratch", rw_disk.display()),
    ];
    disks.extend(args.disk.iter().cloned());
    let config = VmConfig {
        kernel: kernel.to_path_buf(),
        initrd: Some(initrd),
        cmdline: if args.console {
            format!("console=ttyS0 {RUN_CMDLINE}")
        } else {
            RUN_CMDLINE.to_string()
        },
        vcpu_count,
        mem_size_mib,
        rng: true,
        disks: parse_disks(&disks).map_err(|e| format!("invalid --disk: {e}"))?,
        nets: parse_nets(&args.net).map_err(|e| format!("invalid --net: {e}"))?,
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        }),
        // Defaults for the rest: auto boot protocol, /dev/kvm, no CPU template.
        ..VmConfig::default()
    };
    config.validate().map_err(|e| e.to_string())?;
    // Phase marks for scripts/bench/oci_bench.py (with vCPU 0's first KVM_RUN line between them):
    // image preparation ends here, the guest's time ends when `run` returns.
    tracing::info!(
        since_start_us = micros(start.elapsed()),
        monotonic_us = monotonic_us(),
        "image prepared; starting the VM"
    );
    let vmm = Vmm::build(&config, start).map_err(|e| error_line(&e))?;
    let outcome = vmm.run(None, None).map_err(|e| error_line(&e))?;
    tracing::info!(
        since_start_us = micros(start.elapsed()),
        monotonic_us = monotonic_us(),
        "VM stopped"
    );
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let status = finish(status, deadline).unwrap_or_default();
    finish(stdout, deadline);
    finish(stderr, deadline);
    if let VmOutcome::GuestFailure(why) = outcome {
        return Err(format!("guest failure: {why}"));
    }
    let text = String::from_utf8_lossy(&status);
    text.trim()
        .strip_prefix("exit ")
        .and_then(|n| n.parse::<u8>().ok())
        .ok_or_else(|| {
            "the guest stopped without reporting the workload's exit status (rerun with --console to see its kernel log)".to_string()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_flag_takes_an_ipv4_address_and_prefix() {
        assert_eq!(
            parse_ip("10.0.0.2/24").unwrap(),
            ("10.0.0.2".parse().unwrap(), 24)
        );
        for bad in [
            "10.0.0.2",
            "10.0.0.2/33",
            "10.0.0/24",
            "::1/64",
            "10.0.0.2/x",
        ] {
            assert!(parse_ip(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpio_entries_are_aligned_newc() {
        let mut out = Vec::new();
        cpio_entry(&mut out, "a", 0o100644, b"xyz").unwrap();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // Header (110) + "a\0" padded to 112, then 3 data bytes padded to 4.
        assert_eq!(out.len(), 116);
    }
}
