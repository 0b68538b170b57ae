//! `anvil-vmm`: boots a guest in a KVM microVM. A thin `main`: parse the command line,
//! build a [`vmm::VmConfig`], hand it to the VMM core and turn the outcome into an exit status.

mod terminal;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use vmm::config::{
    parse_mem_size_mib, validate_vcpu_count, DiskConfig, NetConfig, VsockConfig, DEFAULT_CMDLINE,
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
    /// Log level: off, error, warn, info, debug or trace (the ANVIL_LOG environment variable
    /// overrides it).
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest kernel and connect its serial console (COM1) to this terminal.
    Boot(BootArgs),
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

/// Parses a log level name.
fn parse_level(text: &str) -> Result<tracing::level_filters::LevelFilter, String> {
    text.trim().parse().map_err(|_| {
        format!("invalid log level {text:?}: expected off, error, warn, info, debug or trace")
    })
}

fn init_logging(level: tracing::level_filters::LevelFilter) {
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(terminal::stderr_is_tty())
        .with_target(false)
        .init();
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
        cpu_template: args.cpu_template,
        boot_protocol: match args.boot_protocol {
            BootProtocolArg::Auto => BootProtocolChoice::Auto,
            BootProtocolArg::Linux64 => BootProtocolChoice::Linux64,
            BootProtocolArg::Pvh => BootProtocolChoice::Pvh,
        },
        kvm_device: args.kvm_device,
        rng: args.rng,
        disks: args
            .disk
            .iter()
            .enumerate()
            .map(|(i, text)| DiskConfig::parse(text, i))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("invalid --disk: {e}"))?,
        nets: args
            .net
            .iter()
            .map(|text| NetConfig::parse(text))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("invalid --net: {e}"))?,
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
    vmm.run(Some(libc::STDIN_FILENO))
        .map_err(|e| error_line(&e))
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = match Cli::try_parse() {
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
    match parse_level(&level_text) {
        Ok(level) => init_logging(level),
        Err(why) => {
            eprintln!("anvil-vmm: {why} (see --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let result = match cli.command {
        Command::Boot(args) => match vm_config(args) {
            Ok(config) => boot(config, start),
            Err(why) => {
                eprintln!("anvil-vmm: {why} (see --help)");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    match result {
        Ok(VmOutcome::Reset) => ExitCode::from(EXIT_OK),
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
