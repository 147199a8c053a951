//! The cell's two doors: the receptor (HTTPS `POST /` with a signed envelope) and the
//! read-only monitor (HTTP `GET /` a page for people, `GET /status`, `GET /metrics`).
//!
//! The receptor answers success with an envelope signed by this node whose `body.re` is the
//! request's nonce, and failure with `{"error": code, "message": ...}` and a 4xx/5xx status.
//! The monitor never changes state: it only reads the actor's published snapshot.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use borg_proto::envelope::{self, ReplayCache};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::guard::{ConnLimiter, Door, NetCounters, RateLimiter, Refusal, Trusted};
use crate::node::{render_metrics, NodeError, NodeHandle, ReceptorRequest};

/// Largest request body the receptor reads (the envelope limit).
pub const MAX_REQUEST: usize = envelope::MAX_ENVELOPE_BYTES;

/// Connections one source IP may hold open on the receptor or the monitor: a CLI or a
/// scraper needs one or two at a time; 8 leaves room for a household behind one NAT.
pub const MAX_HTTP_CONNS_PER_IP: usize = 8;
/// Connections the receptor or the monitor holds open in all (each costs an fd and a few KB,
/// a TLS session more); further ones are closed at accept.
pub const MAX_HTTP_CONNS: usize = 64;
/// Slots above [`MAX_HTTP_CONNS`] kept for the node's own address and its tree neighbours'
/// (the local console, a neighbour's operator), so a flood from strangers cannot lock
/// them out.
pub const RESERVED_HTTP_CONNS: usize = 8;
/// Time for a receptor client to finish its TLS handshake (see
/// [`crate::conn::DEFAULT_HANDSHAKE_TIMEOUT`]).
pub const HTTP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a client to send the request line and headers (hyper's header timer): a slow
/// loris cannot hold a slot longer than this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a receptor or monitor connection lives, handshake to last byte. Keep-alive is
/// off (one request per connection), so this also bounds a slowly sent 1 MiB body: 30 s is
/// 35 KB/s.
pub const CONN_DEADLINE: Duration = Duration::from_secs(30);
/// Receptor requests per second one source IP may make, with [`RECEPTOR_BURST`] saved up;
/// each request costs a signature check and maybe a broadcast. A person or a script needs
/// far less; a flood gets `429 rate_limited`.
pub const RECEPTOR_RATE: u32 = 20;
pub const RECEPTOR_BURST: u32 = 40;
/// Request bodies the receptor reads at once, in bytes: 8 maximal envelopes (8 MiB). More
/// concurrent requests wait for room (within [`CONN_DEADLINE`]).
pub const RECEPTOR_BODY_BYTES: usize = 8 * MAX_REQUEST;
/// A request announced larger than `MAX_REQUEST` but at most this is read and discarded
/// before the 413, so an honest client that sent a slightly oversized envelope sees
/// `too_large` instead of a connection reset; larger ones are refused without reading.
/// Draining costs bandwidth, never memory.
const TOO_LARGE_DRAIN_BYTES: u64 = 4 * MAX_REQUEST as u64;
/// Monitor requests per second per source IP (burst [`MONITOR_BURST`]): rendering the
/// status is cheap but not free.
pub const MONITOR_RATE: u32 = 50;
pub const MONITOR_BURST: u32 = 100;

/// One door's connection guard: slots, and who may use the reserved ones.
struct Door2 {
    door: Door,
    slots: Arc<ConnLimiter>,
    trusted: Arc<Trusted>,
    counters: Arc<NetCounters>,
}

impl Door2 {
    fn new(door: Door, node: &NodeHandle) -> Self {
        Self {
            door,
            slots: ConnLimiter::new(MAX_HTTP_CONNS_PER_IP, MAX_HTTP_CONNS, RESERVED_HTTP_CONNS),
            trusted: node.trusted.clone(),
            counters: node.counters.clone(),
        }
    }

    /// A slot for a connection from `ip`, or `None` (counted) if it must be closed.
    fn admit(&self, ip: IpAddr) -> Option<crate::guard::ConnSlot> {
        let trusted = self.trusted.has_ip(&ip);
        match self.slots.try_acquire(ip, trusted) {
            Ok(slot) => Some(slot),
            Err(Refusal::PerIp) => {
                NetCounters::bump(&self.counters.refused_per_ip, self.door);
                None
            }
            Err(Refusal::Total) => {
                NetCounters::bump(&self.counters.refused_total, self.door);
                None
            }
        }
    }
}

/// Accept the next TCP connection, backing off after a failure (e.g. EMFILE) so an fd
/// shortage is not a busy loop.
async fn accept_backoff(
    listener: &TcpListener,
    backoff: &mut Duration,
    counters: &NetCounters,
    door: Door,
) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(a) => {
                *backoff = crate::conn::ACCEPT_BACKOFF_MIN;
                return a;
            }
            Err(e) => {
                NetCounters::bump(&counters.accept_errors, door);
                tracing::debug!("{} accept: {e}", door.as_str());
                tokio::time::sleep(*backoff).await;
                *backoff = (*backoff * 2).min(crate::conn::ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

fn http_builder() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false);
    b
}

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

/// Internal marker on refusals, so that one place counts them all (stripped before sending
/// would cost a copy; it is harmless to the client and names the code it got anyway).
const REFUSAL_HEADER: &str = "x-borg-refusal";

/// Refusal codes the receptor counts.
const RECEPTOR_CODES_BY_NAME: [&str; crate::guard::RECEPTOR_CODES.len()] =
    crate::guard::RECEPTOR_CODES;

fn error_response(status: u16, code: &str, message: &str) -> Resp {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = json_response(status, &json!({"error": code, "message": message}));
    if let Ok(v) = hyper::header::HeaderValue::from_str(code) {
        r.headers_mut().insert(REFUSAL_HEADER, v);
    }
    r
}

struct Receptor {
    node: Arc<NodeHandle>,
    replay: Mutex<ReplayCache>,
    cell: String,
    rate: RateLimiter,
    bodies: Arc<Semaphore>,
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
    let door = Door2::new(Door::Receptor, &node);
    let receptor = Arc::new(Receptor {
        node,
        replay: Mutex::new(ReplayCache::default()),
        cell,
        rate: RateLimiter::new(RECEPTOR_RATE, RECEPTOR_BURST),
        bodies: Arc::new(Semaphore::new(RECEPTOR_BODY_BYTES / 1024)),
    });
    tokio::spawn(async move {
        let mut backoff = crate::conn::ACCEPT_BACKOFF_MIN;
        loop {
            let (tcp, from) =
                accept_backoff(&listener, &mut backoff, &door.counters, door.door).await;
            let Some(slot) = door.admit(from.ip()) else {
                continue;
            };
            let acceptor = acceptor.clone();
            let receptor = receptor.clone();
            tokio::spawn(async move {
                let counters = receptor.node.counters.clone();
                let serve = async {
                    let handshake =
                        tokio::time::timeout(HTTP_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    let Ok(Ok(tls)) = handshake.await else {
                        NetCounters::bump(&counters.tls_failures, Door::Receptor);
                        counters.receptor_reject("handshake");
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let receptor = receptor.clone();
                        async move { Ok::<_, Infallible>(receptor.handle(req, from.ip()).await) }
                    });
                    let conn = http_builder().serve_connection(TokioIo::new(tls), svc);
                    if tokio::time::timeout(CONN_DEADLINE, conn).await.is_err() {
                        counters.receptor_reject("timeout");
                    }
                };
                tokio::select! {
                    () = serve => {}
                    () = slot.evicted() => {}
                }
            });
        }
    });
    Ok(())
}

impl Receptor {
    async fn handle(&self, req: Request<Incoming>, from: IpAddr) -> Resp {
        let resp = self.handle_inner(req, from).await;
        if let Some(code) = resp.headers().get(REFUSAL_HEADER) {
            let code = RECEPTOR_CODES_BY_NAME
                .iter()
                .find(|c| code.as_bytes() == c.as_bytes())
                .copied()
                .unwrap_or("malformed");
            self.node.counters.receptor_reject(code);
        }
        resp
    }

    async fn handle_inner(&self, req: Request<Incoming>, from: IpAddr) -> Resp {
        if !self.rate.allow(from) {
            NetCounters::bump(&self.node.counters.rate_limited, Door::Receptor);
            return error_response(429, "rate_limited", "too many requests from your address");
        }
        if req.method() != Method::POST || req.uri().path() != "/" {
            return error_response(
                405,
                "malformed",
                "the receptor takes POST / with a signed envelope",
            );
        }
        let announced = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = announced.filter(|&n| n > MAX_REQUEST as u64) {
            if n <= TOO_LARGE_DRAIN_BYTES {
                // Read and discard (no buffering), so that the client gets the answer rather
                // than a reset while it is still writing. Bounded by the announced length and
                // by the connection deadline.
                let mut body = req.into_body();
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
            }
            return error_response(413, "too_large", "envelopes are limited to 1 MiB");
        }
        let Ok(_room) = self
            .bodies
            .clone()
            .acquire_many_owned((MAX_REQUEST / 1024) as u32)
            .await
        else {
            return error_response(503, "unavailable", "node is shutting down");
        };
        let body = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return error_response(413, "too_large", "envelopes are limited to 1 MiB"),
        };
        let now = self.node.clock.now_ms();
        let env = {
            let mut replay = self.replay.lock().await;
            match envelope::open(&body, now, &mut replay) {
                Ok(env) => env.into_inner(),
                Err(e) => {
                    let status = match e.code() {
                        "too_large" => 413,
                        "rate_limited" => 429,
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
                "time": self.node.clock.now_ms(),
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
            other if self.node.receptor_kinds.contains(&other) => {
                self.node
                    .request(ReceptorRequest::Cell {
                        from: env.from,
                        kind: other.to_string(),
                        body: env.body.clone(),
                    })
                    .await
            }
            other => {
                let mut known = vec!["ping", "broadcast", "status"];
                known.extend(self.node.receptor_kinds.iter().copied());
                Err((
                    400,
                    "unknown_kind",
                    format!(
                        "this receptor does not know kind {other:?}; it knows {}",
                        known.join(", ")
                    ),
                ))
            }
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
                    self.node.clock.now_ms(),
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
    let door = Door2::new(Door::Monitor, &node);
    let rate = Arc::new(RateLimiter::new(MONITOR_RATE, MONITOR_BURST));
    tokio::spawn(async move {
        let mut backoff = crate::conn::ACCEPT_BACKOFF_MIN;
        loop {
            let (tcp, from) =
                accept_backoff(&listener, &mut backoff, &door.counters, door.door).await;
            let Some(slot) = door.admit(from.ip()) else {
                continue;
            };
            let node = node.clone();
            let rate = rate.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let node = node.clone();
                    let allowed = rate.allow(from.ip());
                    async move {
                        if !allowed {
                            NetCounters::bump(&node.counters.rate_limited, Door::Monitor);
                            return Ok::<_, Infallible>(error_response(
                                429,
                                "rate_limited",
                                "too many requests from your address",
                            ));
                        }
                        Ok::<_, Infallible>(monitor(&node, &req))
                    }
                });
                let conn = http_builder().serve_connection(TokioIo::new(tcp), svc);
                tokio::select! {
                    _ = tokio::time::timeout(CONN_DEADLINE, conn) => {}
                    () = slot.evicted() => {}
                }
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
            "the monitor is read-only: GET /, /status or /metrics",
        );
    }
    let snap = node.snapshot.borrow().clone();
    match req.uri().path() {
        "/" => {
            // PID 1's file is small and on tmpfs (bounded read): no need to leave the task.
            let page = crate::page::render(&node.status(), crate::page::appliance_view().as_ref());
            let mut r = Response::new(Full::new(Bytes::from(page)));
            let h = r.headers_mut();
            h.insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            for (name, value) in crate::page::HEADERS {
                h.insert(*name, hyper::header::HeaderValue::from_static(value));
            }
            r
        }
        "/status" => json_response(StatusCode::OK, &node.status()),
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(render_metrics(
                &snap,
                &node.counters,
            ))));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        _ => error_response(
            404,
            "malformed",
            "try GET / (a page), GET /status or GET /metrics",
        ),
    }
}
