//! Small clients for the CLI and tests: the monitor over HTTP, the receptor over HTTPS.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls::cli_client_config;

/// Errors talking to a node's monitor or receptor.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("{addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("HTTP exchange with {addr} failed: {reason}")]
    Http { addr: SocketAddr, reason: String },
    #[error("{addr} answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("{addr} sent invalid JSON: {reason}")]
    Json { addr: SocketAddr, reason: String },
}

const TIMEOUT: Duration = Duration::from_secs(5);

async fn exchange<S>(
    addr: SocketAddr,
    io: S,
    req: Request<Full<Bytes>>,
) -> Result<(u16, Bytes), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| ClientError::Http {
        addr,
        reason: e.to_string(),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http)?;
    tokio::spawn(conn);
    let res = sender.send_request(req).await.map_err(http)?;
    let status = res.status().as_u16();
    // An answer is one envelope (at most 1 MiB) or a status page: a peer that sends more is
    // cut off here, whatever it says its length is.
    let body = http_body_util::Limited::new(res.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| ClientError::Http {
            addr,
            reason: format!("answer: {e}"),
        })?
        .to_bytes();
    Ok((status, body))
}

/// The largest answer body a client reads: an envelope's bound plus room for HTTP framing.
pub const MAX_ANSWER_BYTES: usize = borg_proto::envelope::MAX_ENVELOPE_BYTES + 64 * 1024;

fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: Vec<u8>,
) -> Result<Request<Full<Bytes>>, ClientError> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| ClientError::Http {
            addr,
            reason: e.to_string(),
        })
}

/// TCP connection to `addr`, as a client error on failure.
async fn tcp_connect(addr: SocketAddr) -> Result<TcpStream, ClientError> {
    TcpStream::connect(addr)
        .await
        .map_err(|e| ClientError::Connect {
            addr,
            reason: e.to_string(),
        })
}

/// Run one whole exchange within [`TIMEOUT`].
async fn within_timeout<T>(
    addr: SocketAddr,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    within(TIMEOUT, addr, fut).await
}

async fn within<T>(
    limit: Duration,
    addr: SocketAddr,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| ClientError::Timeout { addr })?
}

/// `GET path` on a monitor; returns the body of a 200 answer.
pub async fn monitor_get(addr: SocketAddr, path: &str) -> Result<String, ClientError> {
    let (status, body) = within_timeout(addr, async {
        let tcp = tcp_connect(addr).await?;
        exchange(addr, tcp, request("GET", addr, path, Vec::new())?).await
    })
    .await?;
    let body = String::from_utf8_lossy(&body).into_owned();
    if status != 200 {
        return Err(ClientError::Status { addr, status, body });
    }
    Ok(body)
}

/// `GET /status` as JSON.
pub async fn status(addr: SocketAddr) -> Result<Value, ClientError> {
    let body = monitor_get(addr, "/status").await?;
    serde_json::from_str(&body).map_err(|e| ClientError::Json {
        addr,
        reason: e.to_string(),
    })
}

/// `POST /` an envelope to a receptor over HTTPS; returns the status and body as they came.
/// The node's certificate is not pinned here: callers authenticate the signed answer.
pub async fn receptor_post(
    addr: SocketAddr,
    envelope: Vec<u8>,
) -> Result<(u16, Vec<u8>), ClientError> {
    receptor_post_within(addr, envelope, TIMEOUT).await
}

/// [`receptor_post`] waiting up to `limit` for the whole exchange: requests a cell answers
/// later (a shard fetched from its holders) take longer than the default 5 s.
pub async fn receptor_post_within(
    addr: SocketAddr,
    envelope: Vec<u8>,
    limit: Duration,
) -> Result<(u16, Vec<u8>), ClientError> {
    let (status, body) = within(limit, addr, async {
        let config = cli_client_config(None).map_err(|e| ClientError::Connect {
            addr,
            reason: e.to_string(),
        })?;
        let tcp = tcp_connect(addr).await?;
        let tls = TlsConnector::from(config)
            .connect(ServerName::from(addr.ip()), tcp)
            .await
            .map_err(|e| ClientError::Connect {
                addr,
                reason: format!("TLS: {e}"),
            })?;
        exchange(addr, tls, request("POST", addr, "/", envelope)?).await
    })
    .await?;
    Ok((status, body.to_vec()))
}
