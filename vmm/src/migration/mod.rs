//! Live migration (an Anvil extension; docs/migration.md): pre-copy of guest memory over a
//! TCP or Unix socket while the guest runs, then a short stop for the last dirty pages and
//! the vCPU, VM and device state (the snapshot state types), and an acknowledgement from the
//! destination before the source lets the guest go. A failure at any step resumes the guest
//! on the source; the destination discards what it received.

pub mod protocol;
pub mod receive;
pub mod send;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::resources::{NetworkOverride, VsockOverride};

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The URL is not `tcp:HOST:PORT` or `unix:PATH`.
    #[error("{field}: {why}")]
    Url {
        /// The request field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// Connecting, listening or accepting failed.
    #[error("cannot {what} {url}")]
    Connect {
        /// What was being done.
        what: &'static str,
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The stream broke or the peer broke the protocol.
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    /// The destination cannot take the VM.
    #[error("{0}")]
    Refused(String),
    /// The source VM cannot be stopped or saved.
    #[error("{0}")]
    Source(String),
}

/// Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    /// A TCP address.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl MigrationUrl {
    /// Parses a URL; `field` names the request field in errors.
    pub fn parse(field: &'static str, url: &str) -> Result<Self, MigrationError> {
        let bad = |why: &str| MigrationError::Url {
            field,
            why: format!("{url:?}: {why}"),
        };
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("the socket path is empty"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = url.strip_prefix("tcp:") {
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
            if host.is_empty() {
                return Err(bad("the host is empty"));
            }
            port.parse::<u16>()
                .map_err(|_| bad("the port is not a number from 0 to 65535"))?;
            return Ok(Self::Tcp(addr.to_string()));
        }
        Err(bad("expected tcp:HOST:PORT or unix:PATH"))
    }

    fn text(&self) -> String {
        match self {
            Self::Tcp(a) => format!("tcp:{a}"),
            Self::Unix(p) => format!("unix:{}", p.display()),
        }
    }

    /// Connects to the destination.
    pub fn connect(&self) -> Result<Stream, MigrationError> {
        let fail = |source| MigrationError::Connect {
            what: "connect to",
            url: self.text(),
            source,
        };
        match self {
            Self::Tcp(addr) => {
                let s = TcpStream::connect(addr).map_err(fail)?;
                s.set_nodelay(true).map_err(fail)?;
                Ok(Stream::Tcp(s))
            }
            Self::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).map_err(fail)?)),
        }
    }

    /// Listens for the source (a stale Unix socket file is replaced, one in use refused).
    pub fn listen(&self) -> Result<Listener, MigrationError> {
        let fail = |source| MigrationError::Connect {
            what: "listen on",
            url: self.text(),
            source,
        };
        match self {
            Self::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr).map_err(fail)?)),
            Self::Unix(path) => {
                if path.exists() {
                    if UnixStream::connect(path).is_ok() {
                        return Err(fail(std::io::Error::from(std::io::ErrorKind::AddrInUse)));
                    }
                    std::fs::remove_file(path).map_err(fail)?;
                }
                Ok(Listener::Unix(
                    UnixListener::bind(path).map_err(fail)?,
                    path.clone(),
                ))
            }
        }
    }
}

/// A migration connection.
#[derive(Debug)]
pub enum Stream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl Stream {
    /// Bounds every read and write (a silent or stalled peer must not hang a migration).
    pub fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Self::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A listening socket for an incoming migration.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket, removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Waits for the source to connect.
    pub fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Self::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Self::Unix(l, _) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `PUT /migration/receive`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationReceiveParams {
    /// `tcp:HOST:PORT` or `unix:PATH` to listen on.
    pub receiver_url: String,
    /// Taps replacing the source's (the destination may not share the source's taps).
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// A vsock socket path replacing the source's (needed on the same host: the source
    /// still listens on its path while the guest moves).
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
}

/// `PUT /migration/send`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSendParams {
    /// `tcp:HOST:PORT` or `unix:PATH` of the destination.
    pub destination_url: String,
    /// The pause the guest may see, in milliseconds: pre-copy stops once the remaining
    /// dirty pages would be sent within it (default 30).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Most pre-copy rounds before the guest is stopped anyway (default 10, at most 100).
    #[serde(default)]
    pub max_rounds: Option<u32>,
    /// A bandwidth limit in MiB/s (default none).
    #[serde(default)]
    pub bandwidth_mib_s: Option<u64>,
}

/// Default downtime target.
pub const DEFAULT_DOWNTIME_MS: u64 = 30;
/// Default most pre-copy rounds.
pub const DEFAULT_MAX_ROUNDS: u32 = 10;
/// Upper limit on `max_rounds`.
pub const MAX_ROUNDS: u32 = 100;
/// How long either end waits for the other's next frame (or for room to write one).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

impl MigrationSendParams {
    /// Checks the request before anything starts.
    pub fn validate(&self) -> Result<MigrationUrl, MigrationError> {
        let url = MigrationUrl::parse("destination_url", &self.destination_url)?;
        let bad = |field, why: &str| MigrationError::Url {
            field,
            why: why.to_string(),
        };
        if self.downtime_ms == Some(0) || self.downtime_ms.is_some_and(|d| d > 60_000) {
            return Err(bad("downtime_ms", "must be from 1 to 60000"));
        }
        if self.max_rounds.is_some_and(|r| r == 0 || r > MAX_ROUNDS) {
            return Err(bad("max_rounds", "must be from 1 to 100"));
        }
        if self.bandwidth_mib_s == Some(0) {
            return Err(bad("bandwidth_mib_s", "must be at least 1"));
        }
        Ok(url)
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// Nothing started.
    #[default]
    Idle,
    /// Sending this VM.
    Sending,
    /// Receiving a VM.
    Receiving,
    /// The last migration finished.
    Completed,
    /// The last migration failed (see `error`).
    Failed,
}

/// `GET /migration`.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct MigrationStatus {
    /// State.
    pub state: MigrationState,
    /// "source" or "destination", once a migration started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// The peer's URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Bytes written to (source) or read from (destination) the connection.
    pub bytes: u64,
    /// Guest pages moved (zero pages included).
    pub pages: u64,
    /// Memory rounds (the first full pass counts as 1; the final stop-and-copy is not one).
    pub rounds: u32,
    /// Pages sent while the guest was stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_pages: Option<u64>,
    /// How long the guest was stopped, in milliseconds (source: from the stop to the
    /// destination's acknowledgement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// The whole migration, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<f64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The status shared by the thread doing a migration and the one answering `GET /migration`.
pub type SharedStatus = Arc<Mutex<MigrationStatus>>;

/// Updates the shared status.
pub fn update(status: &SharedStatus, f: impl FnOnce(&mut MigrationStatus)) {
    f(&mut status.lock().unwrap_or_else(|p| p.into_inner()));
}

/// A copy of the shared status.
pub fn snapshot(status: &SharedStatus) -> MigrationStatus {
    status.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_fail_clearly() {
        assert_eq!(
            MigrationUrl::parse("u", "tcp:127.0.0.1:4000").unwrap(),
            MigrationUrl::Tcp("127.0.0.1:4000".into())
        );
        assert_eq!(
            MigrationUrl::parse("u", "tcp:[::1]:4000").unwrap(),
            MigrationUrl::Tcp("[::1]:4000".into())
        );
        assert_eq!(
            MigrationUrl::parse("u", "unix:/tmp/m.sock").unwrap(),
            MigrationUrl::Unix("/tmp/m.sock".into())
        );
        for bad in [
            "",
            "http://x",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "unix:",
        ] {
            let e = MigrationUrl::parse("destination_url", bad).unwrap_err();
            assert!(e.to_string().starts_with("destination_url: "), "{bad}: {e}");
        }
    }

    #[test]
    fn send_params_are_bounded() {
        let p = |d, r, b| MigrationSendParams {
            destination_url: "unix:/x".into(),
            downtime_ms: d,
            max_rounds: r,
            bandwidth_mib_s: b,
        };
        assert!(p(None, None, None).validate().is_ok());
        assert!(p(Some(0), None, None).validate().is_err());
        assert!(p(None, Some(0), None).validate().is_err());
        assert!(p(None, Some(101), None).validate().is_err());
        assert!(p(None, None, Some(0)).validate().is_err());
    }
}
