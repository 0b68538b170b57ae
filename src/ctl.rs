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

fn action(kind: &str) -> (&'static str, String, Option<String>) {
    (
        "PUT",
        "/actions".into(),
        Some(format!(r#"{{"action_type":"{kind}"}}"#)),
    )
}
