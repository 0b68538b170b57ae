//! A small blocking HTTP/1.1 client for the API socket (hyper over a Unix stream), used by
//! `anvil-vmm ctl`, the tests and the benchmarks. One connection is kept open and reused.

use std::path::Path;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Errors of talking to an API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("cannot connect to the API socket {0}")]
    Connect(String, #[source] std::io::Error),
    /// The runtime cannot be created.
    #[error("cannot create the client runtime")]
    Runtime(#[source] std::io::Error),
    /// HTTP failed.
    #[error("HTTP request failed")]
    Http(#[source] hyper::Error),
    /// The request cannot be built (bad method or path).
    #[error("bad request: {0}")]
    Request(String),
}

/// An HTTP response: status and body text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body (empty for 204).
    pub body: String,
}

impl Response {
    /// The body parsed as JSON (`Null` when empty or not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A connection to one VMM's API socket.
#[derive(Debug)]
pub struct Client {
    runtime: tokio::runtime::Runtime,
    sender: SendRequest<Full<Bytes>>,
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(ClientError::Runtime)?;
        let sender = runtime.block_on(async {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| ClientError::Connect(path.display().to_string(), e))?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(ClientError::Http)?;
            tokio::spawn(async move {
                // The connection ends when the server closes it; the next request reports it.
                let _ = connection.await;
            });
            Ok::<_, ClientError>(sender)
        })?;
        Ok(Self { runtime, sender })
    }

    /// Sends one request with an optional JSON body and returns the response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Response, ClientError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("Host", "localhost")
            .header("Accept", "application/json");
        if body.is_some() {
            builder = builder.header("Content-Type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let sender = &mut self.sender;
        self.runtime.block_on(async {
            sender.ready().await.map_err(ClientError::Http)?;
            let response = sender
                .send_request(request)
                .await
                .map_err(ClientError::Http)?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(ClientError::Http)?
                .to_bytes();
            Ok(Response {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            })
        })
    }
}
