//! The per-VM REST API over a Unix socket, compatible with Firecracker's: axum on a tokio
//! current-thread runtime on its own thread. Each request becomes a typed
//! [`vmm::rpc::VmmAction`] sent to the VMM thread; its answer becomes the HTTP response
//! (204, 200 with JSON, or 400 with `{"fault_message": ...}`).

pub mod client;
mod routes;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::rpc::ApiSender;

/// Largest request body accepted (Firecracker's limit).
pub const MAX_BODY_BYTES: usize = 51_200;

/// Errors of starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Another process serves the socket.
    #[error("API socket {} is in use by another process", .0.display())]
    InUse(PathBuf),
    /// A stale socket (or other file) cannot be removed.
    #[error("cannot remove the stale API socket {}", .0.display())]
    RemoveStale(PathBuf, #[source] std::io::Error),
    /// The path exists and is not a socket.
    #[error("API socket path {} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Binding failed.
    #[error("cannot bind the API socket {}", .0.display())]
    Bind(PathBuf, #[source] std::io::Error),
    /// The thread or runtime cannot be created.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// Binds `path`: refuses a socket another process answers on and replaces a stale one.
pub fn bind(path: &Path) -> Result<UnixListener, ApiServerError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiServerError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiServerError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path)
            .map_err(|e| ApiServerError::RemoveStale(path.to_path_buf(), e))?;
    }
    UnixListener::bind(path).map_err(|e| ApiServerError::Bind(path.to_path_buf(), e))
}

/// The running API server (see [`spawn`]).
#[derive(Debug)]
pub struct ApiServer {
    stop: tokio::sync::oneshot::Sender<()>,
    /// Disconnects when the API thread ends.
    done: std::sync::mpsc::Receiver<()>,
}

impl ApiServer {
    /// Stops accepting connections and requests, and waits up to `timeout` for the responses
    /// in flight to be written: the VMM's answer to a request it served just before it
    /// stopped (a guest that shuts down right after a drive update, say) must still reach
    /// the client, not a closed socket.
    pub fn stop(self, timeout: Duration) {
        // The thread may be gone already (its socket failed): nothing to wait for then.
        let _ = self.stop.send(());
        let _ = self.done.recv_timeout(timeout);
    }
}

/// Serves the API on `listener` from a new thread named `anvil-api`, forwarding requests
/// through `sender`. `on_start` runs first on the new thread (to install its seccomp filter).
pub fn spawn(
    listener: UnixListener,
    sender: ApiSender,
    on_start: Box<dyn FnOnce() + Send>,
) -> Result<ApiServer, ApiServerError> {
    listener
        .set_nonblocking(true)
        .map_err(ApiServerError::Thread)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ApiServerError::Thread)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("anvil-api".into())
        .spawn(move || {
            // Dropped when the thread ends, which is what `ApiServer::stop` waits for.
            let _done = done_tx;
            on_start();
            runtime.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("API server cannot use its socket: {e}");
                        return;
                    }
                };
                let app = routes::router(std::sync::Arc::new(sender));
                let shutdown = async move {
                    // An error means the handle was dropped without `stop`: stop as well.
                    let _ = stopped.await;
                };
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    tracing::error!("API server stopped: {e}");
                }
            });
        })
        .map_err(ApiServerError::Thread)?;
    Ok(ApiServer { stop, done })
}
