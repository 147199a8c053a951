//! The cell's two doors: the receptor (HTTPS `POST /` with a signed envelope) and the
//! read-only monitor (HTTP `GET /status`, `GET /metrics`).
//!
//! The receptor answers success with an envelope signed by this node whose `body.re` is the
//! request's nonce, and failure with `{"error": code, "message": ...}` and a 4xx/5xx status.
//! The monitor never changes state: it only reads the actor's published snapshot.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use borg_proto::envelope::{self, ReplayCache};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_rustls::TlsAcceptor;

use crate::node::{now_ms, render_metrics, NodeError, NodeHandle, ReceptorRequest};

/// Largest request body the receptor reads (the envelope limit).
pub const MAX_REQUEST: usize = envelope::MAX_ENVELOPE_BYTES;

type Resp = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(status: u16, code: &str, message: &str) -> Resp {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    json_response(status, &json!({"error": code, "message": message}))
}

struct Receptor {
    node: Arc<NodeHandle>,
    replay: Mutex<ReplayCache>,
    cell: String,
}

/// Serve the receptor on `addr` until the process ends.
pub async fn serve_receptor(
    node: Arc<NodeHandle>,
    addr: SocketAddr,
    cell: String,
) -> Result<(), NodeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Listen { addr, source })?;
    let acceptor = TlsAcceptor::from(node.identity.receptor_server_config());
    let receptor = Arc::new(Receptor {
        node,
        replay: Mutex::new(ReplayCache::default()),
        cell,
    });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let receptor = receptor.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
                let Ok(Ok(tls)) = handshake.await else {
                    return;
                };
                let svc = service_fn(move |req| {
                    let receptor = receptor.clone();
                    async move { Ok::<_, Infallible>(receptor.handle(req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Ok(())
}

impl Receptor {
    async fn handle(&self, req: Request<Incoming>) -> Resp {
        if req.method() != Method::POST || req.uri().path() != "/" {
            return error_response(
                405,
                "malformed",
                "the receptor takes POST / with a signed envelope",
            );
        }
        let body = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return error_response(413, "too_large", "envelopes are limited to 1 MiB"),
        };
        let now = now_ms();
        let env = {
            let mut replay = self.replay.lock().await;
            match envelope::open(&body, now, &mut replay) {
                Ok(env) => env.into_inner(),
                Err(e) => {
                    let status = match e.code() {
                        "too_large" => 413,
                        "replay" | "stale" => 409,
                        "bad_signature" => 401,
                        _ => 400,
                    };
                    return error_response(status, e.code(), &e.to_string());
                }
            }
        };
        let result = match env.kind.as_str() {
            "ping" => Ok(json!({
                "cell": self.cell,
                "node": self.node.key.public().to_b64(),
                "time": now_ms(),
            })),
            "broadcast" => match env.body.get("text").and_then(|t| t.as_str()) {
                Some(text) if text.len() <= 64 * 1024 => {
                    let text = text.to_string();
                    self.node
                        .request(ReceptorRequest::Broadcast {
                            text,
                            origin: env.clone(),
                        })
                        .await
                }
                _ => Err((
                    400,
                    "malformed",
                    "broadcast needs body.text (a string up to 64 KiB)".to_string(),
                )),
            },
            "status" => Ok(self.node.status()),
            other => Err((
                400,
                "unknown_kind",
                format!(
                    "this receptor does not know kind {other:?}; it knows ping, broadcast, status"
                ),
            )),
        };
        match result {
            Ok(mut body) => {
                if let Value::Object(map) = &mut body {
                    map.insert("re".into(), Value::String(env.nonce.clone()));
                }
                let reply = envelope::seal(
                    &self.node.key,
                    &format!("{}.ok", env.kind),
                    None,
                    now_ms(),
                    body,
                );
                let mut r = Response::new(Full::new(Bytes::from(reply.to_bytes())));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                r
            }
            Err((status, code, message)) => error_response(status, code, &message),
        }
    }
}

/// Serve the read-only monitor on `addr`.
pub async fn serve_monitor(node: Arc<NodeHandle>, addr: SocketAddr) -> Result<(), NodeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Listen { addr, source })?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let node = node.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let node = node.clone();
                    async move { Ok::<_, Infallible>(monitor(&node, &req)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(())
}

fn monitor(node: &NodeHandle, req: &Request<Incoming>) -> Resp {
    if req.method() != Method::GET {
        return error_response(
            405,
            "forbidden",
            "the monitor is read-only: GET /status or /metrics",
        );
    }
    let snap = node.snapshot.borrow().clone();
    match req.uri().path() {
        "/status" => json_response(StatusCode::OK, &snap.status),
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(render_metrics(&snap))));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        _ => error_response(404, "malformed", "try GET /status or GET /metrics"),
    }
}
