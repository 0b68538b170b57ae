//! `anvil-vmm ctl`: a client for a running VMM's API socket. Prints the JSON answer (or
//! nothing for 204) and exits 0; on an error answer prints the fault_message and exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use api_server::client::Client;
use clap::Subcommand;

/// Arguments of `anvil-vmm ctl`.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,

    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// GET /: ID, state and version.
    Info,
    /// GET /version.
    Version,
    /// GET /vm/config: the whole configuration.
    Config,
    /// GET /machine-config.
    MachineConfig,
    /// PUT /actions InstanceStart.
    Start,
    /// PATCH /vm Paused.
    Pause,
    /// PATCH /vm Resumed.
    Resume,
    /// PUT /actions SendCtrlAltDel.
    CtrlAltDel,
    /// PUT /actions FlushMetrics.
    FlushMetrics,
    /// GET /metrics/prometheus.
    Metrics,
    /// PUT /snapshot/create (pause first).
    SnapshotCreate {
        /// The state file to write.
        #[arg(long)]
        snapshot_path: PathBuf,
        /// The memory file to write.
        #[arg(long)]
        mem_file_path: PathBuf,
        /// Write only the pages dirtied since the last snapshot.
        #[arg(long)]
        diff: bool,
    },
    /// PUT /snapshot/load (on a VMM that has not booted).
    SnapshotLoad {
        /// The state file.
        #[arg(long)]
        snapshot_path: PathBuf,
        /// The memory file (File backend) or the page-fault handler's socket (with --uffd).
        #[arg(long)]
        mem_path: PathBuf,
        /// Serve memory through a userfaultfd handler listening at --mem-path.
        #[arg(long)]
        uffd: bool,
        /// Run the guest once loaded.
        #[arg(long)]
        resume: bool,
        /// Track dirty pages for diff snapshots.
        #[arg(long)]
        track_dirty_pages: bool,
    },
    /// PUT /migration/receive: listen for a live migration (tcp:HOST:PORT or unix:PATH).
    MigrateReceive {
        /// Where to listen.
        url: String,
    },
    /// PUT /migration/send: move the running guest to a VMM receiving at URL.
    MigrateSend {
        /// The destination (tcp:HOST:PORT or unix:PATH).
        url: String,
    },
    /// GET /migration: the state of the last migration.
    Migration,
    /// Any request: METHOD PATH [JSON-BODY].
    Request {
        /// GET, PUT or PATCH.
        method: String,
        /// The path, e.g. /machine-config.
        path: String,
        /// The JSON body.
        body: Option<String>,
    },
}

/// Runs the command and returns the exit status.
pub fn run(args: CtlArgs) -> ExitCode {
    let (method, path, body): (&str, String, Option<String>) = match args.command {
        CtlCommand::Info => ("GET", "/".into(), None),
        CtlCommand::Version => ("GET", "/version".into(), None),
        CtlCommand::Config => ("GET", "/vm/config".into(), None),
        CtlCommand::MachineConfig => ("GET", "/machine-config".into(), None),
        CtlCommand::Start => action("InstanceStart"),
        CtlCommand::CtrlAltDel => action("SendCtrlAltDel"),
        CtlCommand::FlushMetrics => action("FlushMetrics"),
        CtlCommand::Pause => ("PATCH", "/vm".into(), Some(r#"{"state":"Paused"}"#.into())),
        CtlCommand::Resume => ("PATCH", "/vm".into(), Some(r#"{"state":"Resumed"}"#.into())),
        CtlCommand::Metrics => ("GET", "/metrics/prometheus".into(), None),
        CtlCommand::SnapshotCreate {
            snapshot_path,
            mem_file_path,
            diff,
        } => put(
            "/snapshot/create",
            serde_json::json!({
                "snapshot_type": if diff { "Diff" } else { "Full" },
                "snapshot_path": snapshot_path,
                "mem_file_path": mem_file_path,
            }),
        ),
        CtlCommand::SnapshotLoad {
            snapshot_path,
            mem_path,
            uffd,
            resume,
            track_dirty_pages,
        } => put(
            "/snapshot/load",
            serde_json::json!({
                "snapshot_path": snapshot_path,
                "mem_backend": {
                    "backend_type": if uffd { "Uffd" } else { "File" },
                    "backend_path": mem_path,
                },
                "resume_vm": resume,
                "track_dirty_pages": track_dirty_pages,
            }),
        ),
        CtlCommand::MigrateReceive { url } => put(
            "/migration/receive",
            serde_json::json!({ "receiver_url": url }),
        ),
        CtlCommand::MigrateSend { url } => put(
            "/migration/send",
            serde_json::json!({ "destination_url": url }),
        ),
        CtlCommand::Migration => ("GET", "/migration".into(), None),
        CtlCommand::Request { method, path, body } => {
            let method = match method.to_ascii_uppercase().as_str() {
                "GET" => "GET",
                "PUT" => "PUT",
                "PATCH" => "PATCH",
                other => {
                    eprintln!(
                        "anvil-vmm: ctl: unknown method {other:?}: expected GET, PUT or PATCH"
                    );
                    return ExitCode::from(2);
                }
            };
            if !path.starts_with('/') {
                eprintln!("anvil-vmm: ctl: the path must start with '/': {path:?}");
                return ExitCode::from(2);
            }
            (method, path, body)
        }
    };
    let response =
        Client::connect(&args.api_sock).and_then(|mut c| c.request(method, &path, body.as_deref()));
    print_answer(method, &path, response)
}

/// Prints an answer's JSON (or its fault_message to stderr) and returns the exit status.
pub fn print_answer(
    method: &str,
    path: &str,
    response: Result<api_server::client::Response, api_server::client::ClientError>,
) -> ExitCode {
    match response {
        Ok(r) if (200..300).contains(&r.status) => {
            if !r.body.is_empty() {
                println!("{}", r.body.trim_end());
            }
            ExitCode::SUCCESS
        }
        Ok(r) => {
            let message = r.json()["fault_message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or(r.body);
            eprintln!(
                "anvil-vmm: ctl: {method} {path}: HTTP {}: {message}",
                r.status
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("anvil-vmm: ctl: {}", crate::error_line(&e));
            ExitCode::from(1)
        }
    }
}

fn put(path: &str, body: serde_json::Value) -> (&'static str, String, Option<String>) {
    ("PUT", path.into(), Some(body.to_string()))
}

fn action(kind: &str) -> (&'static str, String, Option<String>) {
    (
        "PUT",
        "/actions".into(),
        Some(format!(r#"{{"action_type":"{kind}"}}"#)),
    )
}

/// Arguments of `anvil-vmm migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The API socket of the VMM running the guest.
    #[arg(long, value_name = "SOCK")]
    from: PathBuf,
    /// Where the destination listens: tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_name = "URL")]
    to: String,
    /// The destination VMM's API socket: it is told to listen at --to first.
    #[arg(long, value_name = "SOCK")]
    dest_api_sock: Option<PathBuf>,
    /// Downtime target in milliseconds.
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Most pre-copy rounds.
    #[arg(long)]
    max_rounds: Option<u32>,
    /// Bandwidth limit in MiB/s.
    #[arg(long)]
    bandwidth_mib_s: Option<u64>,
}

/// `anvil-vmm migrate`: (optionally) tells the destination to listen, sends the guest,
/// reports progress on stderr while it moves, and prints the source's final status.
pub fn migrate(args: MigrateArgs) -> ExitCode {
    if let Some(dest) = &args.dest_api_sock {
        let r = Client::connect(dest).and_then(|mut c| {
            c.request(
                "PUT",
                "/migration/receive",
                Some(&serde_json::json!({ "receiver_url": args.to }).to_string()),
            )
        });
        let code = print_answer("PUT", "/migration/receive", r);
        if code != ExitCode::SUCCESS {
            return code;
        }
    }
    let mut body = serde_json::json!({ "destination_url": args.to });
    for (key, value) in [
        ("downtime_ms", args.downtime_ms),
        ("max_rounds", args.max_rounds.map(u64::from)),
        ("bandwidth_mib_s", args.bandwidth_mib_s),
    ] {
        if let Some(v) = value {
            body[key] = v.into();
        }
    }
    let from = args.from.clone();
    let sender = std::thread::spawn(move || {
        Client::connect(&from)
            .and_then(|mut c| c.request("PUT", "/migration/send", Some(&body.to_string())))
    });
    let mut watcher = Client::connect(&args.from).ok();
    while !sender.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if let Some(Ok(r)) = watcher
            .as_mut()
            .map(|c| c.request("GET", "/migration", None))
        {
            let s = r.json();
            if s["state"] == "sending" {
                eprintln!(
                    "anvil-vmm: migrate: round {}, {} MiB sent",
                    s["rounds"],
                    s["bytes"].as_u64().unwrap_or(0) >> 20
                );
            }
        }
    }
    let answer = sender.join().unwrap_or_else(|_| {
        Err(api_server::client::ClientError::Request(
            "the request thread failed".into(),
        ))
    });
    let code = print_answer("PUT", "/migration/send", answer);
    // The source answers GET /migration for a moment after the guest left.
    if let Some(Ok(r)) = watcher
        .as_mut()
        .map(|c| c.request("GET", "/migration", None))
    {
        println!("{}", r.body.trim_end());
    }
    code
}
