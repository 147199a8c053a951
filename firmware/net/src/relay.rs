//! Relaying for nodes that cannot be dialed (DESIGN.md section 8, docs/NAT.md).
//!
//! A relayed node keeps a tree-protocol link to its relay and registers on it
//! (`relay.register`). Somebody who wants the relayed node connects to the relay and sends one
//! line, `BORG-RELAY <key>`; the relay sends `relay.open {token}` over the registered link,
//! the relayed node connects back with `BORG-ACCEPT <token>`, and the relay splices the two TCP
//! streams. The TLS handshake that follows runs between the two ends, pinned to the relayed
//! node's key: the relay forwards ciphertext it cannot read or forge.
//!
//! [`RelayHub`] pairs waiting requests with the connections that answer them, counts what it
//! forwards, and bounds what a requester can cost (issue 9 item 8): a request line is
//! plain text anybody can send, and each one admitted costs the relay a signature and the
//! relayed node a dial. So requests are admitted per source IP at a bounded rate
//! ([`REQUESTS_PER_IP_PER_SEC`], burst [`REQUEST_BURST`]), waiting requests are bounded per IP
//! and in total, and a splice ends when idle ([`SPLICE_IDLE`]) or past its byte budget
//! ([`SPLICE_MAX_BYTES`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// How long a relay request waits for the relayed node to connect back.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Splices in progress at once; further requests are refused.
pub const MAX_SPLICES: u64 = 256;
/// Requests waiting for their relayed node at once, from everybody: a wait holds a socket
/// for up to [`ANSWER_TIMEOUT`]; 64 is far more than the joins and repairs of the at most
/// 256 nodes a relay serves start within 5 s.
pub const MAX_WAITING: usize = 64;
/// Requests waiting at once from one source IP: a node dials one peer through a relay once
/// per attempt; a LAN behind one router may have a few nodes dialing at once.
pub const MAX_WAITING_PER_IP: usize = 4;
/// Sustained relay requests admitted per source IP and second. Each admitted request costs
/// an ECDSA signature here and a dial at the relayed node; legitimate dialers retry a failed
/// link every few seconds at most.
pub const REQUESTS_PER_IP_PER_SEC: f64 = 2.0;
/// Requests one source IP may send at once before the rate applies (a tree repair dials a
/// few peers through the same relay).
pub const REQUEST_BURST: f64 = 8.0;
/// Source IPs whose request budget is remembered; when full, idle buckets (full again) are
/// forgotten first, else the request is refused (a flood from many IPs costs the flooders).
pub const MAX_TRACKED_IPS: usize = 4096;
/// A splice with no byte either way for this long ends: a tree link heartbeats every few
/// seconds, so only abandoned connections are this quiet.
pub const SPLICE_IDLE: Duration = Duration::from_secs(120);
/// Bytes one splice forwards (both ways together) before it ends: a tree link carries
/// envelopes, not bulk data; past 1 GiB it re-dials, which costs little and caps what one
/// requester can make the relay forward on one admission.
pub const SPLICE_MAX_BYTES: u64 = 1 << 30;

/// Waiting relay requests and relay counters.
#[derive(Debug, Default)]
pub struct RelayHub {
    waiting: Mutex<HashMap<String, oneshot::Sender<TcpStream>>>,
    limits: Mutex<Limits>,
    pub active: AtomicU64,
    pub spliced_total: AtomicU64,
    pub failed_total: AtomicU64,
    pub bytes_total: AtomicU64,
    /// Requests refused before costing anything (rate, waiting bounds).
    pub limited_total: AtomicU64,
}

#[derive(Debug, Default)]
struct Limits {
    buckets: HashMap<IpAddr, Bucket>,
    waiting_total: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    waiting: usize,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * REQUESTS_PER_IP_PER_SEC).min(REQUEST_BURST);
        self.at = now;
    }
}

/// Errors of one relay request.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("too many relayed connections in progress")]
    Busy,
    #[error("too many relay requests from {0}")]
    Limited(IpAddr),
    #[error("the relayed node did not connect back within {0:?}")]
    NoAnswer(Duration),
    #[error("splice: {0}")]
    Io(#[from] std::io::Error),
}

/// An admitted request: holds its place among the waiting ones until dropped.
#[derive(Debug)]
pub struct Admission {
    hub: Arc<RelayHub>,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut l = self.hub.limits();
        l.waiting_total = l.waiting_total.saturating_sub(1);
        if let Some(b) = l.buckets.get_mut(&self.ip) {
            b.waiting = b.waiting.saturating_sub(1);
        }
    }
}

impl RelayHub {
    /// Admit a request from `ip` (before anything costly is done for it), or refuse it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Admission, RelayError> {
        let refused = |hub: &RelayHub| {
            hub.limited_total.fetch_add(1, Ordering::Relaxed);
            Err(RelayError::Limited(ip))
        };
        if self.active.load(Ordering::Relaxed) >= MAX_SPLICES {
            self.failed_total.fetch_add(1, Ordering::Relaxed);
            return Err(RelayError::Busy);
        }
        let mut l = self.limits();
        if l.waiting_total >= MAX_WAITING {
            drop(l);
            return refused(self);
        }
        if !l.buckets.contains_key(&ip) && l.buckets.len() >= MAX_TRACKED_IPS {
            l.buckets.retain(|_, b| {
                b.refill(now);
                b.waiting > 0 || b.tokens < REQUEST_BURST
            });
            if l.buckets.len() >= MAX_TRACKED_IPS {
                drop(l);
                return refused(self);
            }
        }
        let b = l.buckets.entry(ip).or_insert(Bucket {
            tokens: REQUEST_BURST,
            at: now,
            waiting: 0,
        });
        b.refill(now);
        if b.tokens < 1.0 || b.waiting >= MAX_WAITING_PER_IP {
            drop(l);
            return refused(self);
        }
        b.tokens -= 1.0;
        b.waiting += 1;
        l.waiting_total += 1;
        Ok(Admission {
            hub: self.clone(),
            ip,
        })
    }

    /// Wait for the answer carrying `token`, then forward bytes both ways until both sides
    /// close, the splice is idle for [`SPLICE_IDLE`] or it has forwarded
    /// [`SPLICE_MAX_BYTES`]. Returns the bytes forwarded (client to node, node to client).
    /// `admission` (from [`Self::admit`]) is released once the wait is over.
    pub async fn splice(
        &self,
        token: String,
        client: TcpStream,
        admission: Option<Admission>,
    ) -> Result<(u64, u64), RelayError> {
        if self.active.load(Ordering::Relaxed) >= MAX_SPLICES {
            self.failed_total.fetch_add(1, Ordering::Relaxed);
            return Err(RelayError::Busy);
        }
        let (tx, rx) = oneshot::channel();
        self.lock().insert(token.clone(), tx);
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, rx).await;
        self.lock().remove(&token);
        drop(admission);
        let Ok(Ok(node)) = answer else {
            self.failed_total.fetch_add(1, Ordering::Relaxed);
            return Err(RelayError::NoAnswer(ANSWER_TIMEOUT));
        };
        self.active.fetch_add(1, Ordering::Relaxed);
        self.spliced_total.fetch_add(1, Ordering::Relaxed);
        let result = copy_bounded(client, node, SPLICE_IDLE, SPLICE_MAX_BYTES).await;
        self.active.fetch_sub(1, Ordering::Relaxed);
        let (up, down) = result?;
        self.bytes_total.fetch_add(up + down, Ordering::Relaxed);
        Ok((up, down))
    }

    /// A relayed node connected back with `token`: hand its stream to the waiting request.
    /// Unknown tokens are dropped (closing the connection).
    pub fn answer(&self, token: &str, stream: TcpStream) -> bool {
        match self.lock().remove(token) {
            Some(tx) => tx.send(stream).is_ok(),
            None => false,
        }
    }

    /// Requests waiting for their relayed node now.
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<TcpStream>>> {
        // A panic while holding this lock cannot leave the map inconsistent: recover it.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn limits(&self) -> std::sync::MutexGuard<'_, Limits> {
        // Counters only; a panic while holding it leaves them usable: recover it.
        self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Copy both ways until both sides close, nothing moved for `idle`, or `max_bytes` moved in
/// total. Returns the bytes each way (a to b, b to a).
async fn copy_bounded(
    a: TcpStream,
    b: TcpStream,
    idle: Duration,
    max_bytes: u64,
) -> std::io::Result<(u64, u64)> {
    let last = Arc::new(Mutex::new(Instant::now()));
    let total = Arc::new(AtomicU64::new(0));
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let one = pump(ar, bw, last.clone(), total.clone(), idle, max_bytes);
    let other = pump(br, aw, last, total, idle, max_bytes);
    let (x, y) = tokio::join!(one, other);
    Ok((x?, y?))
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    last: Arc<Mutex<Instant>>,
    total: Arc<AtomicU64>,
    idle: Duration,
    max_bytes: u64,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut moved = 0u64;
    loop {
        if total.load(Ordering::Relaxed) >= max_bytes {
            break;
        }
        let n = match tokio::time::timeout(idle, r.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                let _ = w.shutdown().await;
                return Err(e);
            }
            Err(_) => {
                // Quiet this way; the splice is idle only if the other way was quiet too.
                let since = last.lock().map(|t| t.elapsed()).unwrap_or(idle);
                if since >= idle {
                    break;
                }
                continue;
            }
        };
        if let Ok(mut t) = last.lock() {
            *t = Instant::now();
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
        w.write_all(&buf[..n]).await?;
        moved += n as u64;
    }
    let _ = w.shutdown().await;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([203, 0, 113, last])
    }

    #[test]
    fn one_source_gets_its_burst_then_its_rate() {
        let hub = Arc::new(RelayHub::default());
        let t0 = Instant::now();
        let mut held = Vec::new();
        // At most MAX_WAITING_PER_IP wait at once.
        for _ in 0..MAX_WAITING_PER_IP {
            held.push(hub.admit(ip(66), t0).expect("within the waiting bound"));
        }
        assert!(matches!(hub.admit(ip(66), t0), Err(RelayError::Limited(_))));
        // Another source is not affected.
        assert!(hub.admit(ip(12), t0).is_ok());
        // Released waits free their places, up to the burst.
        let burst = REQUEST_BURST as usize;
        let mut admitted = held.len();
        held.clear();
        while hub.admit(ip(66), t0).is_ok() {
            admitted += 1;
            assert!(admitted <= burst, "more than the burst at one instant");
        }
        assert_eq!(admitted, burst);
        // Then the rate: one more after 1 / rate seconds.
        let later = t0 + Duration::from_secs_f64(1.0 / REQUESTS_PER_IP_PER_SEC);
        assert!(hub.admit(ip(66), later).is_ok());
        assert!(hub.admit(ip(66), later).is_err());
        assert!(hub.limited_total.load(Ordering::Relaxed) >= 3);
    }

    #[test]
    fn waiting_requests_are_bounded_in_total() {
        let hub = Arc::new(RelayHub::default());
        let now = Instant::now();
        let mut held = Vec::new();
        for i in 0..=255u8 {
            if let Ok(a) = hub.admit(IpAddr::from([198, 51, i, 1]), now) {
                held.push(a);
            }
        }
        assert_eq!(held.len(), MAX_WAITING);
        drop(held);
        assert!(hub.admit(ip(1), now).is_ok(), "places come back");
    }

    #[tokio::test]
    async fn an_idle_splice_ends() {
        let listener = tokio::net::TcpListener::bind("127.70.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (c, d) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_a, b, c, _d) = (a.unwrap(), b.unwrap().0, c.unwrap(), d.unwrap().0);
        // Both outer ends stay open and silent: only the idle bound ends the splice.
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            copy_bounded(b, c, Duration::from_millis(200), SPLICE_MAX_BYTES),
        )
        .await;
        assert!(matches!(r, Ok(Ok((0, 0)))), "{r:?}");
    }

    #[tokio::test]
    async fn a_splice_ends_past_its_byte_budget() {
        let listener = tokio::net::TcpListener::bind("127.70.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (c, d) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut a, b, c, mut d) = (a.unwrap(), b.unwrap().0, c.unwrap(), d.unwrap().0);
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 4096];
            // Far past the budget; stops when the splice closes.
            for _ in 0..1024 {
                if a.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            a
        });
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = d.read_to_end(&mut sink).await;
            sink.len()
        });
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            copy_bounded(b, c, Duration::from_secs(5), 64 * 1024),
        )
        .await
        .expect("the budget ends the splice");
        let (up, _) = r.unwrap();
        assert!((64 * 1024..64 * 1024 + 16 * 1024 + 1).contains(&up), "{up}");
        drop(writer);
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got as u64, up);
    }
}
