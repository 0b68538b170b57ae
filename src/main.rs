//! `anvil-vmm`: boots a guest in a KVM microVM. A thin `main`: parse the command line,
//! build a [`vmm::VmConfig`], hand it to the VMM core and turn the outcome into an exit status.

mod ctl;
mod image_cmd;
mod terminal;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use vmm::config::{
    parse_disks, parse_mem_size_mib, parse_nets, validate_vcpu_count, VsockConfig, DEFAULT_CMDLINE,
};
use vmm::{BootProtocolChoice, SeccompLevel, VmConfig, VmOutcome, Vmm};

/// Exit status when the guest reset or powered off.
const EXIT_OK: u8 = 0;
/// Exit status for errors of the VMM or its configuration (missing kernel, no KVM, ...).
const EXIT_ERROR: u8 = 1;
/// Exit status for command-line usage errors.
const EXIT_USAGE: u8 = 2;
/// Exit status when the guest crashed (triple fault, KVM failure) or stopped making progress.
const EXIT_GUEST_FAILURE: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "anvil-vmm",
    version,
    about = "Anvil microVM monitor: boots a Linux (or test) guest under KVM",
    long_about = "Anvil microVM monitor: boots a Linux (or test) guest under KVM.\n\n\
        Exit status: 0 when the guest resets or powers off, 1 on a VMM or configuration \
        error, 2 on a command-line error, 3 when the guest crashes or stops making progress."
)]
struct Cli {
    /// Log level: off, error, warn(ing), info, debug or trace (the ANVIL_LOG environment
    /// variable overrides it). `--level` is Firecracker's spelling.
    #[arg(
        long,
        global = true,
        default_value = "info",
        value_name = "LEVEL",
        alias = "level"
    )]
    log_level: String,

    #[command(flatten)]
    fc: FirecrackerArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

/// The command line of Firecracker mode alone (no subcommand): what tools that spawn
/// Firecracker pass. Parsing it does not build the subcommands' definitions, which is most of
/// clap's start-up work and of the code a VMM process would otherwise fault in (see
/// [`parse_cli`]); it accepts exactly what [`Cli`] accepts without a subcommand.
#[derive(Debug, Parser)]
#[command(name = "anvil-vmm", version)]
struct FirecrackerCli {
    /// See [`Cli::log_level`].
    #[arg(long, default_value = "info", value_name = "LEVEL", alias = "level")]
    log_level: String,

    #[command(flatten)]
    fc: FirecrackerArgs,
}

/// Words that make the command line more than Firecracker mode: the subcommands and the
/// requests for help or the version (checked against [`Cli`] by a unit test).
const FULL_CLI_WORDS: &[&str] = &[
    "boot",
    "ctl",
    "migrate",
    "snapshot",
    "pull",
    "run",
    "images",
    "help",
    "-h",
    "--help",
    "-V",
    "--version",
];

/// Parses the command line. One without any subcommand name or help request is parsed as
/// Firecracker mode first (see [`FirecrackerCli`]); anything else, or anything that parser
/// refuses, goes to the full parser, whose errors and help are the ones users see. A word that
/// only looks like a subcommand (`--id run`) merely takes the full parser, which accepts it too.
fn parse_cli() -> Result<Cli, clap::Error> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let full = args
        .iter()
        .skip(1)
        .any(|a| a.to_str().is_some_and(|a| FULL_CLI_WORDS.contains(&a)));
    if !full {
        if let Ok(fc) = FirecrackerCli::try_parse_from(&args) {
            return Ok(Cli {
                log_level: fc.log_level,
                fc: fc.fc,
                command: None,
            });
        }
    }
    Cli::try_parse_from(args)
}

/// Firecracker's own command-line flags: `anvil-vmm` without a subcommand behaves as
/// `firecracker` does, so tools that spawn Firecracker can spawn anvil.
#[derive(Debug, clap::Args)]
struct FirecrackerArgs {
    /// Serve the API on this Unix socket (a stale socket is replaced; one in use is refused).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,

    /// Boot at once from this configuration file (Firecracker's JSON format).
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,

    /// Do not serve the API (needs --config-file).
    #[arg(long)]
    no_api: bool,

    /// The microVM's ID, reported by `GET /`.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    id: String,

    /// Write the log to this file or named pipe instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,

    /// Write metrics lines to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,

    /// Accepted for compatibility: anvil's boot timer device (port 0x3f0) is always present.
    #[arg(long)]
    boot_timer: bool,

    /// Seccomp filtering: 0 none, 1 syscall numbers, 2 syscall numbers and arguments.
    #[arg(long, value_name = "LEVEL", value_parser = clap::value_parser!(u8).range(0..=2))]
    seccomp_level: Option<u8>,

    /// Disable seccomp filtering.
    #[arg(long, conflicts_with = "seccomp_level")]
    no_seccomp: bool,

    /// Largest API request body in bytes (accepted for compatibility; anvil's limit is 51200).
    #[arg(long, value_name = "BYTES")]
    http_api_max_payload_size: Option<usize>,

    /// Jailer start-time hint, accepted for compatibility.
    #[arg(long, value_name = "US", hide = true)]
    start_time_us: Option<u64>,
    /// Jailer start-time hint, accepted for compatibility.
    #[arg(long, value_name = "US", hide = true)]
    start_time_cpu_us: Option<u64>,
    /// Jailer start-time hint, accepted for compatibility.
    #[arg(long, value_name = "US", hide = true)]
    parent_cpu_time_us: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest kernel and connect its serial console (COM1) to this terminal.
    Boot(BootArgs),
    /// Talk to a running anvil-vmm (or Firecracker) over its API socket and print the JSON
    /// answer.
    Ctl(ctl::CtlArgs),
    /// Live-migrate the guest of one anvil-vmm to another (PUT /migration/send with progress).
    Migrate(ctl::MigrateArgs),
    /// Work on snapshot files.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Fetch and convert a container image; prints the path of its root disk.
    Pull(image_cmd::PullArgs),
    /// Run a container image's entrypoint in a microVM; exits with its exit code (125: anvil failed).
    Run(image_cmd::RunArgs),
    /// List (ls), remove (rm) or prune the cached images.
    Images(image_cmd::ImagesArgs),
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Apply a Diff snapshot's memory file to its base (the memory file of the snapshot it is
    /// relative to), in place; the Diff's state file then loads with the merged memory file.
    Merge {
        /// The base memory file, updated in place.
        base: PathBuf,
        /// The Diff snapshot's memory file.
        diff: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BootProtocolArg {
    /// PVH when the ELF kernel has a PVH note, else the 64-bit Linux boot protocol.
    Auto,
    /// The 64-bit Linux boot protocol (zero page), even if the kernel has a PVH note.
    Linux64,
    /// The PVH entry (the kernel must have the PVH ELF note).
    Pvh,
}

#[derive(Debug, clap::Args)]
struct BootArgs {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,

    /// Initial ramdisk, placed in guest memory below the kernel's limit.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line; replaces the default one entirely.
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_CMDLINE)]
    cmdline: String,

    /// Number of vCPUs (1 to 254, and at most what KVM supports on this host).
    #[arg(
        long,
        value_name = "N",
        default_value = "1",
        allow_hyphen_values = true
    )]
    cpus: String,

    /// Guest memory: a number of MiB, or a size such as 512M or 2G.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "128M",
        allow_hyphen_values = true
    )]
    memory: String,

    /// Firecracker-style custom CPU template: a JSON file of CPUID and MSR modifiers.
    #[arg(long, value_name = "FILE")]
    cpu_template: Option<PathBuf>,

    /// Boot protocol used to enter the kernel.
    #[arg(long, value_enum, default_value = "auto", value_name = "PROTOCOL")]
    boot_protocol: BootProtocolArg,

    /// The KVM device node.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    kvm_device: PathBuf,

    /// Give the guest a virtio-rng entropy device (virtio-mmio), fed from the host's getrandom.
    #[arg(long)]
    rng: bool,

    /// A virtio-blk disk backed by a raw image:
    /// path=PATH[,ro][,root][,id=ID][,bw=SIZE:REFILL_MS[:BURST]][,ops=N:REFILL_MS[:BURST]].
    /// Repeatable; the guest sees them in order as vda, vdb, ... `ro` makes it read-only,
    /// `root` adds root=/dev/vdX to the kernel command line, `id` names it (and is its serial),
    /// `bw` and `ops` are token buckets (bytes or requests per refill time, with an optional
    /// one-time burst; SIZE takes K, M, G).
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,

    /// A virtio-net interface on an existing tap device:
    /// tap=NAME[,mac=MAC][,rx_bw=..][,rx_ops=..][,tx_bw=..][,tx_ops=..]. Repeatable; the guest
    /// sees them in order. Without mac= a locally administered address is made up. The rate
    /// limits are token buckets SIZE:REFILL_MS[:BURST] on received/sent bytes and frames.
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,

    /// A virtio-vsock device: cid=N,socket=PATH (Firecracker's hybrid vsock). A host program
    /// reaches guest port P by connecting to PATH and writing "CONNECT P\n"; the guest's
    /// connections to host port P go to the Unix socket PATH_P.
    #[arg(long, value_name = "SPEC")]
    vsock: Option<String>,

    /// Seccomp filtering of the VMM's threads (Firecracker's flag): 0 none, 1 syscall numbers,
    /// 2 syscall numbers and arguments.
    #[arg(
        long,
        value_name = "0|1|2",
        default_value = "2",
        allow_hyphen_values = true
    )]
    seccomp_level: String,

    /// Turn seccomp off (the same as --seccomp-level 0).
    #[arg(long)]
    no_seccomp: bool,

    /// Write Firecracker-style JSON metrics lines to this existing file or named pipe (every
    /// 60 s and when the VM stops).
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
}

/// Prints `error` and its causes on one line.
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

/// Parses a log level name (Firecracker's "Warning" included).
fn parse_level(text: &str) -> Result<tracing::level_filters::LevelFilter, String> {
    let t = text.trim();
    let t = if t.eq_ignore_ascii_case("warning") {
        "warn"
    } else {
        t
    };
    t.parse().map_err(|_| {
        format!("invalid log level {text:?}: expected off, error, warn, info, debug or trace")
    })
}

/// Turns the flags into a VM configuration; errors are command-line errors.
fn vm_config(args: BootArgs) -> Result<VmConfig, String> {
    let vcpu_count = args
        .cpus
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("invalid --cpus {:?}: expected a whole number", args.cpus))
        .and_then(|n| validate_vcpu_count(n).map_err(|e| format!("invalid --cpus: {e}")))?;
    let mem_size_mib =
        parse_mem_size_mib(&args.memory).map_err(|e| format!("invalid --memory: {e}"))?;
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpu_count,
        mem_size_mib,
        cpu_template: args.cpu_template.map(vmm::config::CpuTemplateSource::File),
        boot_protocol: match args.boot_protocol {
            BootProtocolArg::Auto => BootProtocolChoice::Auto,
            BootProtocolArg::Linux64 => BootProtocolChoice::Linux64,
            BootProtocolArg::Pvh => BootProtocolChoice::Pvh,
        },
        kvm_device: args.kvm_device,
        rng: args.rng,
        track_dirty_pages: false,
        disks: parse_disks(&args.disk).map_err(|e| format!("invalid --disk: {e}"))?,
        nets: parse_nets(&args.net).map_err(|e| format!("invalid --net: {e}"))?,
        vsock: args
            .vsock
            .as_deref()
            .map(VsockConfig::parse)
            .transpose()
            .map_err(|e| format!("invalid --vsock: {e}"))?,
        seccomp_level: if args.no_seccomp {
            SeccompLevel::None
        } else {
            args.seccomp_level
                .trim()
                .parse::<u64>()
                .map_err(|_| {
                    format!(
                        "invalid --seccomp-level {:?}: expected 0, 1 or 2",
                        args.seccomp_level
                    )
                })
                .and_then(|n| {
                    SeccompLevel::from_number(n)
                        .map_err(|e| format!("invalid --seccomp-level: {e}"))
                })?
        },
        metrics_path: args.metrics_path,
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn boot(config: VmConfig, start: Instant) -> Result<VmOutcome, String> {
    if vmm::kvm::host_emulates_guest_kernel() {
        tracing::warn!(
            "this host's KVM (kvm_pvm) emulates guest kernel code: a Linux guest will boot very slowly here"
        );
    }
    let vmm = Vmm::build(&config, start).map_err(|e| error_line(&e))?;
    tracing::debug!(protocol = ?vmm.boot_protocol(), "VM built");
    let _raw = terminal::RawStdin::enable();
    vmm.run(Some(libc::STDIN_FILENO), None)
        .map_err(|e| error_line(&e))
}

/// Removes the API socket when the process ends normally.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads a Firecracker-format configuration file.
fn read_config_file(path: &std::path::Path) -> Result<vmm::resources::VmResources, String> {
    use vmm::resources::{FullVmConfiguration, VmResources};
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --config-file {}: {e}", path.display()))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    let full: FullVmConfiguration = serde_path_to_error::deserialize(de)
        .map_err(|e| format!("invalid --config-file {}: {e}", path.display()))?;
    VmResources::from_full_config(full)
        .map_err(|e| format!("invalid --config-file {}: {e}", path.display()))
}

/// Firecracker mode: serve the API (and/or boot from a configuration file).
fn firecracker_mode(args: FirecrackerArgs, start: Instant) -> Result<VmOutcome, String> {
    if args.no_api && args.config_file.is_none() {
        return Err("--no-api needs --config-file: there would be nothing to boot".into());
    }
    let mut resources = match &args.config_file {
        Some(path) => read_config_file(path)?,
        None => vmm::resources::VmResources::default(),
    };
    let seccomp_level = match (args.no_seccomp, args.seccomp_level) {
        (true, _) => SeccompLevel::None,
        (false, Some(n)) => SeccompLevel::from_number(u64::from(n)).map_err(|e| error_line(&e))?,
        (false, None) => SeccompLevel::default(),
    };
    resources.seccomp_level = seccomp_level;
    if let Some(path) = &args.metrics_path {
        resources.metrics = Some(vmm::resources::Metrics {
            metrics_path: path.clone(),
            emit_id: false,
            properties: None,
        });
    }
    let (receiver, _guard, server) = if args.no_api {
        (None, None, None)
    } else {
        let path = args
            .api_sock
            .clone()
            .unwrap_or_else(|| PathBuf::from("/run/anvil.socket"));
        let listener = api_server::bind(&path).map_err(|e| error_line(&e))?;
        let guard = SocketGuard(path);
        let (sender, receiver) =
            vmm::rpc::api_channel().map_err(|e| format!("cannot create the API channel: {e}"))?;
        // The API thread filters itself before it reads a request.
        let on_start = Box::new(move || {
            if let Err(e) = vmm::seccomp::install(vmm::seccomp::ThreadKind::Api, seccomp_level) {
                eprintln!("anvil-vmm: error: {}", error_line(&e));
                std::process::exit(i32::from(EXIT_ERROR));
            }
        });
        let server = api_server::spawn(listener, sender, on_start).map_err(|e| error_line(&e))?;
        // The API server's HTTP parser asks std which SIMD extensions the CPU has on the
        // first request, a dozen CPUIDs (each a VM exit when anvil itself runs in a VM). Ask
        // here, while the API thread installs its seccomp filter, so that the answer is cached.
        #[cfg(target_arch = "x86_64")]
        let _ = std::is_x86_feature_detected!("avx2");
        tracing::info!(socket = %guard.0.display(), "API server listening");
        (Some(receiver), Some(guard), Some(server))
    };
    let _raw = terminal::RawStdin::enable();
    let outcome = vmm::controller::run(
        resources,
        receiver,
        &args.id,
        args.config_file.is_some(),
        Some(libc::STDIN_FILENO),
        start,
    );
    // The VMM has stopped; a response to a request it answered just before must still be
    // written before the process exits.
    if let Some(server) = server {
        server.stop(API_DRAIN_TIMEOUT);
    }
    outcome.map_err(|e| error_line(&e))
}

/// How long an exiting VMM waits for the API thread to write the responses in flight.
const API_DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

/// One malloc arena for the whole process, as Firecracker has with musl's allocator: glibc
/// would otherwise give each new thread (API, vCPUs, device workers) an arena of its own,
/// mapped and trimmed on the thread's first allocation, and ~100 KiB resident each. The VMM's
/// threads allocate little once running, so they do not contend for it.
fn one_malloc_arena() {
    // SAFETY: mallopt only changes the allocator's tuning; it is called before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    one_malloc_arena();
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            {
                let _ = e.print();
                return ExitCode::from(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        EXIT_USAGE
                    } else {
                        EXIT_OK
                    },
                );
            }
            // clap's message spans lines up to the first blank one; make it one line.
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let message = message.join(" ");
            eprintln!(
                "anvil-vmm: {} (see --help)",
                message.trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let level_text = std::env::var("ANVIL_LOG").unwrap_or_else(|_| cli.log_level.clone());
    let level = match parse_level(&level_text) {
        Ok(level) => level,
        Err(why) => {
            eprintln!("anvil-vmm: {why} (see --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = vmm::logger::init(level, terminal::stderr_is_tty(), cli.fc.log_path.as_deref())
    {
        eprintln!("anvil-vmm: error: {}", error_line(&e));
        return ExitCode::from(EXIT_ERROR);
    }
    let result = match cli.command {
        Some(Command::Boot(args)) => match vm_config(args) {
            Ok(config) => boot(config, start),
            Err(why) => {
                eprintln!("anvil-vmm: {why} (see --help)");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        Some(Command::Ctl(args)) => return ctl::run(args),
        Some(Command::Migrate(args)) => return ctl::migrate(args),
        Some(Command::Pull(args)) => return image_cmd::pull(args),
        Some(Command::Run(args)) => return image_cmd::run(args, start),
        Some(Command::Images(args)) => return image_cmd::images(args),
        Some(Command::Snapshot(SnapshotCommand::Merge { base, diff })) => {
            return match vmm::snapshot::merge_memory(&base, &diff) {
                Ok(bytes) => {
                    println!(
                        "merged {bytes} bytes of {} into {}",
                        diff.display(),
                        base.display()
                    );
                    ExitCode::from(EXIT_OK)
                }
                Err(e) => {
                    eprintln!("anvil-vmm: error: {}", error_line(&e));
                    ExitCode::from(EXIT_ERROR)
                }
            };
        }
        None if cli.fc.api_sock.is_none() && cli.fc.config_file.is_none() => {
            eprintln!(
                "anvil-vmm: give a subcommand (boot, ctl, migrate, run, pull, images) or --api-sock/--config-file (see --help)"
            );
            return ExitCode::from(EXIT_USAGE);
        }
        None => firecracker_mode(cli.fc, start),
    };
    match result {
        Ok(VmOutcome::Reset) => ExitCode::from(EXIT_OK),
        Ok(VmOutcome::Migrated) => {
            tracing::info!("the guest migrated to another VMM; exiting");
            ExitCode::from(EXIT_OK)
        }
        Ok(VmOutcome::GuestFailure(why)) => {
            eprintln!("anvil-vmm: {why}");
            ExitCode::from(EXIT_GUEST_FAILURE)
        }
        Err(why) => {
            eprintln!("anvil-vmm: error: {why}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn full_cli_words_name_every_subcommand() {
        let mut names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        names.push("help".to_string());
        for name in &names {
            assert!(FULL_CLI_WORDS.contains(&name.as_str()), "{name} is missing");
        }
        let flags = ["-h", "--help", "-V", "--version"];
        assert_eq!(FULL_CLI_WORDS.len(), names.len() + flags.len());
    }

    #[test]
    fn firecracker_mode_parses_alike_with_either_parser() {
        let argv = [
            "anvil-vmm",
            "--api-sock",
            "/tmp/x.sock",
            "--id",
            "vm1",
            "--level",
            "Warning",
            "--seccomp-level",
            "1",
            "--boot-timer",
            "--metrics-path",
            "/tmp/m",
        ];
        let light = FirecrackerCli::try_parse_from(argv).expect("light parser");
        let full = Cli::try_parse_from(argv).expect("full parser");
        assert!(full.command.is_none());
        assert_eq!(format!("{:?}", light.fc), format!("{:?}", full.fc));
        assert_eq!(light.log_level, full.log_level);
        // The light parser refuses what only subcommands accept; the full one decides then.
        assert!(FirecrackerCli::try_parse_from(["anvil-vmm", "--kernel", "k"]).is_err());
        assert!(FirecrackerCli::try_parse_from(["anvil-vmm", "--seccomp-level", "3"]).is_err());
    }
}
