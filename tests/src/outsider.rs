//! An outsider: a client with its own fresh key that talks TLS to real nodes and sends them
//! well-formed, signed envelopes (as tests/tests/adversarial.rs does), plus the node figures
//! such tests assert on (resident memory).

use std::net::SocketAddr;
use std::time::Duration;

use borg_net::conn::{self, PeerConn};
use borg_net::node::now_ms;
use borg_net::tls::TlsIdentity;
use borg_proto::envelope;
use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::tree::{Peer, TreeMsg};
use serde_json::Value;

use crate::Net;

/// A key with no place in any tree.
pub struct Outsider {
    pub key: SecretKey,
    pub identity: TlsIdentity,
    /// How it presents itself in messages (an address nobody listens on).
    pub peer: Peer,
}

impl Outsider {
    pub fn new(addr: &str) -> Self {
        let key = SecretKey::generate();
        let identity = TlsIdentity::new(&key).unwrap();
        let peer = Peer {
            key: key.public(),
            addr: addr.to_string(),
            mon: String::new(),
        };
        Self {
            key,
            identity,
            peer,
        }
    }

    /// A TLS connection to a node's tree port (pinned to its key).
    pub async fn connect(&self, to: &Target) -> Option<PeerConn> {
        conn::connect(to.addr, to.key, &self.identity, Duration::from_secs(5))
            .await
            .ok()
    }

    /// A signed frame of `kind` with `body` (any JSON: also bodies today's decoder would
    /// refuse, or yesterday's would take).
    pub fn frame(&self, kind: &str, body: Value) -> Vec<u8> {
        envelope::seal(&self.key, kind, Some(&self.peer.addr), now_ms(), body).to_bytes()
    }

    /// A signed frame of a tree message.
    pub fn tree_frame(&self, msg: &TreeMsg) -> Vec<u8> {
        let (kind, body) = msg.to_kind_body();
        self.frame(&kind, body)
    }
}

/// POST a request of `kind` signed by `key` to the receptor at `addr`: the HTTP status and
/// the verified answer's body, or the error object.
pub fn receptor_call(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    key: &SecretKey,
    kind: &str,
    body: Value,
) -> (u16, Value) {
    let env = envelope::seal(key, kind, None, now_ms(), body);
    let (status, bytes) = rt
        .block_on(borg_net::client::receptor_post_within(
            addr,
            env.to_bytes(),
            Duration::from_secs(30),
        ))
        .expect("the receptor answers");
    let v = if status == 200 {
        envelope::verify_signature_only(&bytes)
            .expect("a signed answer")
            .into_inner()
            .body
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    (status, v)
}

/// A node as an attacker sees it: its tree address, its key and, to aim at, its position.
#[derive(Debug, Clone)]
pub struct Target {
    pub node: usize,
    pub addr: SocketAddr,
    pub key: PublicKey,
    pub pos: u64,
}

/// Every running node of `net` as a target.
pub fn targets(net: &Net) -> Vec<Target> {
    net.nodes
        .keys()
        .map(|&i| Target {
            node: i,
            addr: format!("{}:13300", net.ip(i)).parse().unwrap(),
            key: node_key(net, i),
            pos: net.status(i).unwrap()["position"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// Most rounds an attack runs (each round is one pass over the targets), so that a test
/// whose stop flag is never raised still ends.
pub const MAX_ATTACK_ROUNDS: u64 = 2_000;

/// Run an attack in the background until `stop` is set: every `every`, one round, which
/// sends each target the frames `frames(outsider, target, round)` over a connection kept
/// per target (re-opened when the node closes it). Counts the frames sent in `sent` as it
/// goes, and returns the total.
pub fn attack(
    outsider: Outsider,
    targets: Vec<Target>,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
    frames: impl Fn(&Outsider, &Target, u64) -> Vec<Vec<u8>> + Send + 'static,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut conns: Vec<Option<PeerConn>> = targets.iter().map(|_| None).collect();
            let mut sent = 0u64;
            for round in 0..MAX_ATTACK_ROUNDS {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                for (t, c) in targets.iter().zip(conns.iter_mut()) {
                    if c.is_none() {
                        *c = outsider.connect(t).await;
                    }
                    let Some(conn) = c.as_mut() else { continue };
                    for f in frames(&outsider, t, round) {
                        if conn.send(&f).await.is_err() {
                            *c = None;
                            break;
                        }
                        sent += 1;
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(every).await;
            }
            sent
        })
    })
}

/// Node `i`'s public key, from its status.
pub fn node_key(net: &Net, i: usize) -> PublicKey {
    let st = net.status(i).unwrap();
    PublicKey::from_b64(st["public_key"].as_str().unwrap()).unwrap()
}

/// Resident memory of node `i`'s process in KiB (`VmRSS` in /proc/PID/status).
pub fn rss_kib(net: &Net, i: usize) -> u64 {
    crate::proc_rss_kib(net.nodes[&i].child.id())
}

/// The largest resident memory among the running nodes, in KiB.
pub fn max_rss_kib(net: &Net) -> u64 {
    net.nodes
        .keys()
        .map(|&i| rss_kib(net, i))
        .max()
        .unwrap_or(0)
}
