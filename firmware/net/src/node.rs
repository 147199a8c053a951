//! The node actor: one tokio task owns the [`TreeNode`] state machine and drives it.
//!
//! Connection tasks turn frames into [`Inbound`] events; the actor opens each frame as an
//! envelope (signature, clock window, replay), checks that the envelope's signer is the key
//! the TLS handshake authenticated, decodes the tree message and hands it to the state
//! machine, then carries out the returned actions: sign and send, dial, deliver. No lock is
//! held across an await; the status snapshot is published through a `watch` channel.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use borg_proto::envelope::{self, Envelope, ReplayCache};
use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::reach::msg::ReachMsg;
use borg_proto::reach::{PeerAddr, RelayChoice, Role};
use borg_proto::tree::{
    geometry, Action, OrderSeal, Peer, Target, TreeConfig, TreeMsg, TreeNode, TreeStats,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::conn::{self, Incoming, Listener, PeerWriter, TransportError};
use crate::frame::{FrameError, MAX_FRAME};
use crate::guard::{Bucket, ConnLimiter, Door, NetCounters, Refusal, Trusted};
use crate::nat::{self, NatConfig, NatHandle, NatStatus};
use crate::relay::RelayHub;
use crate::tls::TlsIdentity;

/// How a node is run.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Cell name (its DNA), e.g. `peerTreeNet`.
    pub cell: String,
    pub data_dir: PathBuf,
    /// Tree (net) listen address.
    pub listen: SocketAddr,
    /// Receptor (HTTPS) listen address.
    pub recp: SocketAddr,
    /// Monitor (HTTP) listen address.
    pub mon: SocketAddr,
    /// Contacts to join through.
    pub join: Vec<SocketAddr>,
    /// The IP other nodes reach us at, when `listen` is a wildcard address.
    pub advertise: Option<std::net::IpAddr>,
    pub max_children: u64,
    pub heartbeat_ms: u64,
    /// Work out and keep reachability (NAT role, port mapping, relaying, LAN beacons).
    pub nat: bool,
    /// Let the reachability task map a port on the router (when `nat`).
    pub port_mapping: bool,
}

/// Errors that stop a node from starting.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node key: {0}")]
    Identity(#[from] borg_proto::identity::IdentityError),
    #[error("TLS setup: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
}

/// Events into the actor.
pub(crate) enum Inbound {
    Connected {
        key: PublicKey,
        id: u64,
        writer: mpsc::Sender<Vec<u8>>,
        queued: Arc<std::sync::atomic::AtomicUsize>,
        /// Set for a first-contact dial to an address.
        dialed_addr: Option<String>,
        /// Where the link's connection comes from (per-IP bounds).
        remote_ip: IpAddr,
    },
    Frame {
        key: PublicKey,
        bytes: Vec<u8>,
        /// This frame's share of the inbound byte budgets, given back once it is handled.
        _budget: InboundBudget,
    },
    Closed {
        key: PublicKey,
        id: u64,
    },
    DialFailed {
        key: Option<PublicKey>,
        addr: String,
    },
    /// A frame-level error on an authenticated connection (oversized, truncated).
    FrameError {
        code: &'static str,
    },
    Receptor {
        request: ReceptorRequest,
        reply: oneshot::Sender<Result<Value, (u16, &'static str, String)>>,
    },
    /// Somebody wants the node `target`, registered with us as its relay: answer with the
    /// token it will connect back with, or `None` if we do not relay for it.
    RelayRequest {
        target: PublicKey,
        reply: oneshot::Sender<Option<String>>,
    },
}

/// Permits of the per-link and node-wide inbound byte budgets, in KiB, held by a frame
/// until the actor has handled it.
pub(crate) struct InboundBudget {
    _link: OwnedSemaphorePermit,
    _node: OwnedSemaphorePermit,
}

/// Bytes of frames one link may have queued for the actor: four maximal frames. A link that
/// sends faster than the actor handles its frames waits (its TCP window fills), others don't.
const LINK_INBOUND_BYTES: usize = 4 * MAX_FRAME;
/// Bytes of frames all links together may have queued for the actor (the actor queue's
/// memory bound, on top of the 4,096-event count): 32 MiB is an eighth of a 256 MB Pi.
const NODE_INBOUND_BYTES: usize = 32 << 20;
/// Budget unit (permits are KiB, so a u32 count covers any frame).
const BUDGET_UNIT: usize = 1024;

/// Frames per second a link from a tree neighbour may deliver, with [`TRUSTED_LINK_BURST`]
/// saved up: far above the tree's own traffic (a few messages per heartbeat) so broadcasts
/// are never slowed, yet a bound on what one compromised neighbour can make us verify.
const TRUSTED_LINK_RATE: u32 = 2000;
const TRUSTED_LINK_BURST: u32 = 4000;
/// Frames per second a link from any other key may deliver: a joining node or a contact
/// sends a handful of messages, so 100/s (burst 200) is plenty, and a flooder's link costs at
/// most 100 signature checks a second. Excess frames wait (backpressure), none is dropped.
const UNTRUSTED_LINK_RATE: u32 = 100;
const UNTRUSTED_LINK_BURST: u32 = 200;

/// Accepted links from keys that are not tree neighbours, per source IP and in total. 16
/// per IP lets a NAT or a relay carry several honest joiners; 256 in all bounds what
/// strangers hold (fds, buffers) on a node serving a tree of thousands.
const MAX_UNTRUSTED_LINKS_PER_IP: usize = 16;
const MAX_UNTRUSTED_LINKS: usize = 256;

/// A frame that has begun to arrive must be complete within two of these (checked once per
/// period), so a peer cannot hold a link's buffer with a half-sent frame. 15 s moves a 1 MiB
/// frame at 70 KB/s, slower than any link a node runs on.
const FRAME_STALL: Duration = Duration::from_secs(15);
/// Periods of [`FRAME_STALL`] an accepted link from a non-neighbour may stay silent before it
/// is closed (60 s): neighbours heartbeat, strangers have no reason to idle.
const UNTRUSTED_IDLE_PERIODS: u32 = 4;

/// Bytes of frames one link's writer may have queued: eight maximal frames. Beyond that a
/// link is too slow and further frames for it are dropped (counted), not buffered.
const LINK_OUTBOUND_BYTES: usize = 8 * MAX_FRAME;
/// Bytes waiting for a connection to one key, and to all keys together.
const PENDING_BYTES_PER_PEER: usize = 2 * MAX_FRAME;
const PENDING_BYTES_TOTAL: usize = 16 << 20;
/// Addresses queued for first-contact dials at once.
const MAX_PENDING_ADDRS: usize = 64;
/// Signed addresses remembered for peers (32 B key + ~30 B address each): far more than a
/// node's neighbourhood, small in memory; when full, unknown peers are not remembered.
const MAX_PEER_ADDRS: usize = 4096;
/// How long a LAN node stays in `met` (it is met again after that).
const MET_RETENTION_MS: u64 = 60_000;

/// Room the sealed envelope of a broadcast needs beside its payload (kind, id, origin key,
/// addr, ts, nonce, signature and JSON punctuation: under 600 bytes; 4 KiB leaves margin).
const BCAST_ENVELOPE_OVERHEAD: usize = 4096;

/// What a receptor asks the actor to do (already verified).
pub(crate) enum ReceptorRequest {
    Broadcast { text: String, origin: Envelope },
}

/// Counters published on /metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub rejected: BTreeMap<&'static str, u64>,
    pub frames_in: u64,
    pub frames_out: u64,
    pub dials: u64,
    pub dial_failures: u64,
    pub dropped_outbound: u64,
    pub broadcast_origin_invalid: u64,
    pub relay_registrations: u64,
    pub relay_refused: u64,
    pub relayed_dials: u64,
    /// Connections this node spliced as a relay, failed relay requests, bytes forwarded.
    pub relay_splices: u64,
    pub relay_failed: u64,
    pub relay_bytes: u64,
    /// Relay requests refused by the per-IP rate or the waiting bounds (issue 9 item 8).
    pub relay_limited: u64,
    /// Links that closed (any reason).
    pub links_closed: u64,
}

/// The state the monitor shows.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub status: Value,
    pub tree: TreeStats,
    pub metrics: Metrics,
}

/// A running node's handles.
pub struct NodeHandle {
    pub(crate) tx: mpsc::Sender<Inbound>,
    /// Counters kept outside the actor (listeners, links, receptor).
    pub counters: Arc<NetCounters>,
    /// The tree neighbourhood (reserved connection slots).
    pub trusted: Arc<Trusted>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub key: SecretKey,
    pub identity: Arc<TlsIdentity>,
    pub nat: Option<NatHandle>,
    pub relay: Arc<RelayHub>,
}

struct EcdsaSeal {
    key: SecretKey,
}

impl OrderSeal for EcdsaSeal {
    fn seal(&self, bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.key.sign(bytes))
    }
    fn check(&self, signer: &PublicKey, bytes: &[u8], seal: &str) -> bool {
        use base64::Engine;
        match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(seal) {
            Ok(sig) => signer.verify(bytes, &sig).is_ok(),
            Err(_) => false,
        }
    }
    fn check_broadcast(&self, _origin: &PublicKey, payload: &Value) -> bool {
        broadcast_origin_ok(payload)
    }
}

/// Whether a broadcast payload is `{text, origin_env}` where `origin_env` is a validly
/// signed `broadcast` request envelope whose `body.text` is the payload's text.
pub fn broadcast_origin_ok(payload: &Value) -> bool {
    let Some(obj) = payload.as_object() else {
        return false;
    };
    let (Some(text), Some(env)) = (
        obj.get("text").and_then(|t| t.as_str()),
        obj.get("origin_env").and_then(|e| e.as_str()),
    ) else {
        return false;
    };
    if obj.len() != 2 {
        return false;
    }
    match envelope::verify_signature_only(env.as_bytes()) {
        Ok(env) => {
            env.kind == "broadcast" && env.body.get("text").and_then(|t| t.as_str()) == Some(text)
        }
        Err(_) => false,
    }
}

/// Milliseconds since the Unix epoch (network time is the system clock until cronoTree).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The tracing target of the one line each delivered broadcast logs (at debug).
pub const DELIVERED_LOG_TARGET: &str = "borg::delivered";

const OUTBOUND_QUEUE: usize = 1024;
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

struct Link {
    id: u64,
    writer: mpsc::Sender<Vec<u8>>,
    remote_ip: IpAddr,
    /// Bytes queued in `writer` and not yet written.
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

/// Frames waiting for a connection, with their total size.
#[derive(Default)]
struct PendingQ {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
}

struct Actor {
    cfg: NodeConfig,
    key: SecretKey,
    identity: Arc<TlsIdentity>,
    tree: TreeNode,
    replay: ReplayCache,
    links: HashMap<PublicKey, Link>,
    /// Frames waiting for a connection to a key (bounded; delivered when it comes back).
    pending: HashMap<PublicKey, PendingQ>,
    pending_addr: HashMap<String, PendingQ>,
    /// Bytes in `pending` and `pending_addr` together.
    pending_bytes: usize,
    counters: Arc<NetCounters>,
    trusted: Arc<Trusted>,
    dialing: HashMap<String, Instant>,
    peer_addrs: HashMap<PublicKey, String>,
    tx: mpsc::Sender<Inbound>,
    metrics: Metrics,
    started: Instant,
    snapshot: watch::Sender<Arc<Snapshot>>,
    my_addr: String,
    /// Id and wall-clock time of the last broadcast delivered (for the benchmark).
    last_broadcast: Option<(String, u64)>,
    nat: Option<NatHandle>,
    nat_status: Option<Arc<NatStatus>>,
    relay_hub: Arc<RelayHub>,
    /// Nodes we relay for: key -> registration expiry (ms).
    relayed_for: HashMap<PublicKey, u64>,
    /// Our relay, and when we last registered with it (ms).
    my_relay: Option<(RelayChoice, u64)>,
    /// Nodes on our LAN (from beacons): dialed directly, never through a relay.
    lan_addrs: HashMap<PublicKey, SocketAddr>,
    /// LAN nodes already handed to the tree, and when.
    met: HashMap<PublicKey, u64>,
    candidates: watch::Sender<Vec<(Option<PublicKey>, String)>>,
    /// Join deferred until the NAT role is known, at the latest then.
    join_after: Option<Instant>,
    /// What link tasks share (set once at start).
    link_ctx: Option<LinkCtx>,
}

/// How long a node waits for its NAT role before joining anyway.
const JOIN_WAIT_FOR_ROLE: Duration = Duration::from_secs(10);

/// How long a relay registration lasts without renewal.
const RELAY_REGISTRATION_MS: u64 = 30_000;
/// How often a relayed node renews it.
const RELAY_RENEW_MS: u64 = 10_000;
/// Nodes one relay serves at most.
const MAX_RELAYED: usize = 256;
/// Nodes one relay serves from one source IP: a home LAN's relayed nodes all come from its
/// router's address, and 16 is more nodes than a home LAN has; keys are free, so without
/// this one host could take all [`MAX_RELAYED`] places.
const MAX_RELAYED_PER_IP: usize = 16;

/// Start the node: bind the tree listener, spawn the actor, return handles. The receptor and
/// monitor servers are started by [`crate::serve`].
pub async fn start(cfg: NodeConfig) -> Result<NodeHandle, NodeError> {
    let key = SecretKey::load_or_create(&cfg.data_dir)?;
    let identity = Arc::new(TlsIdentity::new(&key)?);
    let counters = Arc::new(NetCounters::default());
    let trusted = Arc::new(Trusted::default());
    let listener = Listener::bind(cfg.listen, &identity)
        .await?
        .with_guards(trusted.clone(), counters.clone());
    let (tx, rx) = mpsc::channel::<Inbound>(4096);
    let public_ip = match cfg.advertise {
        Some(ip) if cfg.listen.ip().is_unspecified() => ip,
        _ => cfg.listen.ip(),
    };
    let my_addr = SocketAddr::new(public_ip, cfg.listen.port()).to_string();
    let me = Peer {
        key: key.public(),
        addr: my_addr.clone(),
        mon: SocketAddr::new(public_ip, cfg.mon.port()).to_string(),
    };
    let contacts: Vec<String> = cfg.join.iter().map(|a| a.to_string()).collect();
    let (candidates_tx, candidates_rx) = watch::channel(
        contacts
            .iter()
            .map(|c| (None, c.clone()))
            .collect::<Vec<_>>(),
    );
    let nat = cfg.nat.then(|| {
        let fallback = SocketAddr::new(public_ip, cfg.listen.port());
        let mut nc = NatConfig::new(&cfg.cell, cfg.listen, fallback);
        nc.port_mapping = cfg.port_mapping;
        nat::spawn(nc, key.clone(), identity.clone(), candidates_rx)
    });
    let relay_hub = Arc::new(RelayHub::default());
    let seed = u64::from_le_bytes(key.sign(b"seed")[..8].try_into().unwrap_or([7; 8]))
        ^ now_ms().rotate_left(17);
    let tree = TreeNode::new(
        TreeConfig::new(cfg.max_children, cfg.heartbeat_ms),
        me,
        contacts,
        Box::new(EcdsaSeal { key: key.clone() }),
        seed,
    );
    let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot {
        status: json!({}),
        tree: TreeStats::default(),
        metrics: Metrics::default(),
    }));
    let mut actor = Actor {
        my_addr,
        cfg,
        key: key.clone(),
        identity: identity.clone(),
        tree,
        replay: ReplayCache::default(),
        links: HashMap::new(),
        pending: HashMap::new(),
        pending_addr: HashMap::new(),
        pending_bytes: 0,
        counters: counters.clone(),
        trusted: trusted.clone(),
        dialing: HashMap::new(),
        peer_addrs: HashMap::new(),
        tx: tx.clone(),
        metrics: Metrics::default(),
        started: Instant::now(),
        snapshot: snap_tx,
        last_broadcast: None,
        nat: nat.clone(),
        nat_status: None,
        relay_hub: relay_hub.clone(),
        relayed_for: HashMap::new(),
        my_relay: None,
        lan_addrs: HashMap::new(),
        met: HashMap::new(),
        candidates: candidates_tx,
        join_after: None,
        link_ctx: None,
    };
    let links = LinkCtx {
        tx: tx.clone(),
        counters: counters.clone(),
        trusted: trusted.clone(),
        node_budget: Arc::new(Semaphore::new(NODE_INBOUND_BYTES / BUDGET_UNIT)),
    };
    actor.link_ctx = Some(links.clone());
    tokio::spawn(accept_loop(
        listener,
        links,
        relay_hub.clone(),
        nat.as_ref().map(|n| n.probe_ctx.clone()),
    ));
    // A node that will reach its contacts across the internet first learns how it is reached
    // itself (bounded), so that it joins with the address others can use, not its LAN address.
    let outside_contacts = actor
        .cfg
        .join
        .iter()
        .any(|c| !borg_proto::reach::is_private(c.ip()) && !c.ip().is_unspecified());
    if actor.nat.is_some() && outside_contacts {
        actor.join_after = Some(Instant::now() + JOIN_WAIT_FOR_ROLE);
    } else {
        actor.tree.start(now_ms());
    }
    actor.carry_out();
    actor.publish();
    tokio::spawn(actor.run(rx));
    Ok(NodeHandle {
        tx,
        counters,
        trusted,
        snapshot: snap_rx,
        key,
        identity,
        nat,
        relay: relay_hub,
    })
}

/// What every link task shares: the way into the actor, counters, the neighbourhood and
/// the node-wide inbound byte budget.
#[derive(Clone)]
pub(crate) struct LinkCtx {
    tx: mpsc::Sender<Inbound>,
    counters: Arc<NetCounters>,
    trusted: Arc<Trusted>,
    node_budget: Arc<Semaphore>,
}

async fn accept_loop(
    mut listener: Listener,
    ctx: LinkCtx,
    hub: Arc<RelayHub>,
    probes: Option<Arc<nat::ProbeCtx>>,
) {
    let strangers = ConnLimiter::new(MAX_UNTRUSTED_LINKS_PER_IP, MAX_UNTRUSTED_LINKS, 0);
    loop {
        match listener.accept_incoming().await {
            Ok(Incoming::Peer(conn)) => {
                let key = conn.peer_key();
                let slot = if ctx.trusted.has_key(&key) {
                    None
                } else {
                    match strangers.try_acquire(conn.remote_addr().ip(), false) {
                        Ok(slot) => Some(slot),
                        Err(refusal) => {
                            let c = match refusal {
                                Refusal::PerIp => &ctx.counters.refused_per_ip,
                                Refusal::Total => &ctx.counters.refused_total,
                            };
                            NetCounters::bump(c, Door::Tree);
                            continue;
                        }
                    }
                };
                let remote_ip = conn.remote_addr().ip();
                let (mut reader, writer) = conn.into_split();
                if let Some(slot) = slot {
                    reader.hold(slot);
                }
                spawn_link(reader, writer, key, remote_ip, None, ctx.clone());
            }
            Ok(Incoming::Probe(conn)) => {
                if let Some(probe_ctx) = probes.clone() {
                    tokio::spawn(nat::answer_probe(probe_ctx, conn));
                }
            }
            Ok(Incoming::RelayConnect { tcp, target, from }) => {
                // Rate and waiting bounds per source IP before anything costs a signature
                // or a dial (issue 9 item 8).
                let admission = match hub.admit(from.ip(), Instant::now()) {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!("relay request from {from} refused: {e}");
                        continue;
                    }
                };
                let (tx, hub) = (ctx.tx.clone(), hub.clone());
                tokio::spawn(async move {
                    let (reply, rx) = oneshot::channel();
                    if tx
                        .send(Inbound::RelayRequest { target, reply })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let Ok(Some(token)) = rx.await else {
                        tracing::debug!("relay request from {from} for {} refused", target.short());
                        return;
                    };
                    if let Err(e) = hub.splice(token, tcp, Some(admission)).await {
                        tracing::debug!("relay {from} -> {}: {e}", target.short());
                    }
                });
            }
            Ok(Incoming::RelayAccept { tcp, token, .. }) => {
                hub.answer(&token, tcp);
            }
            Err(e) => {
                tracing::debug!("inbound connection refused: {e}");
                if matches!(
                    e,
                    TransportError::Handshake { .. } | TransportError::PeerKey { .. }
                ) {
                    // Never wait on the actor for this: a handshake flood must not queue up.
                    let _ = ctx.tx.try_send(Inbound::FrameError { code: "handshake" });
                }
            }
        }
    }
}

static LINK_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn spawn_link_conn(conn: conn::PeerConn, dialed_addr: Option<String>, ctx: LinkCtx) {
    let key = conn.peer_key();
    let remote_ip = conn.remote_addr().ip();
    let (reader, writer) = conn.into_split();
    spawn_link(reader, writer, key, remote_ip, dialed_addr, ctx);
}

fn spawn_link(
    mut reader: conn::PeerReader,
    writer: PeerWriter,
    key: PublicKey,
    remote_ip: IpAddr,
    dialed_addr: Option<String>,
    ctx: LinkCtx,
) {
    let id = LINK_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (wtx, wrx) = mpsc::channel::<Vec<u8>>(OUTBOUND_QUEUE);
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(write_loop(
        writer,
        wrx,
        queued.clone(),
        ctx.counters.clone(),
    ));
    tokio::spawn(async move {
        let tx2 = ctx.tx.clone();
        if tx2
            .send(Inbound::Connected {
                key,
                id,
                writer: wtx,
                queued,
                dialed_addr,
                remote_ip,
            })
            .await
            .is_err()
        {
            return;
        }
        let link_budget = Arc::new(Semaphore::new(LINK_INBOUND_BYTES / BUDGET_UNIT));
        let trusted_at_start = ctx.trusted.has_key(&key);
        let (rate, burst) = if trusted_at_start {
            (TRUSTED_LINK_RATE, TRUSTED_LINK_BURST)
        } else {
            (UNTRUSTED_LINK_RATE, UNTRUSTED_LINK_BURST)
        };
        let mut bucket = Bucket::new(rate, burst, Instant::now());
        let mut upgraded = trusted_at_start;
        let mut stalled = false;
        let mut idle_periods = 0u32;
        let slot = reader.take_slot();
        let evicted = async {
            match slot.as_ref() {
                Some(slot) => slot.evicted().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(evicted);
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(FRAME_STALL, reader.recv()) => next,
                () = &mut evicted => break,
            };
            let got = match next {
                Ok(got) => got,
                Err(_) => {
                    let trusted = ctx.trusted.has_key(&key);
                    if reader.frame_in_progress() {
                        if stalled {
                            tracing::debug!("{}: half-sent frame stalled", key.short());
                            let _ = tx2.try_send(Inbound::FrameError { code: "timeout" });
                            break;
                        }
                        stalled = true;
                    } else if !trusted {
                        idle_periods += 1;
                        if idle_periods >= UNTRUSTED_IDLE_PERIODS {
                            break;
                        }
                    }
                    continue;
                }
            };
            stalled = false;
            idle_periods = 0;
            match got {
                Ok(Some(bytes)) => {
                    if !upgraded && ctx.trusted.has_key(&key) {
                        // Became a neighbour: the neighbour's rate from now on.
                        bucket = Bucket::new(TRUSTED_LINK_RATE, TRUSTED_LINK_BURST, Instant::now());
                        upgraded = true;
                    }
                    let wait = bucket.take_or_wait(Instant::now());
                    if !wait.is_zero() {
                        NetCounters::bump(&ctx.counters.rate_limited, Door::Tree);
                        tokio::time::sleep(wait).await;
                    }
                    let units = u32::try_from(bytes.len() / BUDGET_UNIT + 1).unwrap_or(u32::MAX);
                    let Ok(link) = link_budget.clone().acquire_many_owned(units).await else {
                        break;
                    };
                    let Ok(node) = ctx.node_budget.clone().acquire_many_owned(units).await else {
                        break;
                    };
                    let ev = Inbound::Frame {
                        key,
                        bytes,
                        _budget: InboundBudget {
                            _link: link,
                            _node: node,
                        },
                    };
                    if tx2.send(ev).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let code = match e {
                        FrameError::TooLarge { .. } => "too_large",
                        _ => "malformed",
                    };
                    let _ = tx2.send(Inbound::FrameError { code }).await;
                    break;
                }
            }
        }
        let _ = tx2.send(Inbound::Closed { key, id }).await;
    });
}

/// Write queued frames in order. A frame the framing refuses as too large is dropped and
/// counted; the link stays up for the next one. Any other error ends the link.
async fn write_loop(
    mut writer: PeerWriter,
    mut rx: mpsc::Receiver<Vec<u8>>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    counters: Arc<NetCounters>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    while let Some(frame) = rx.recv().await {
        let res = writer.send(&frame).await;
        queued.fetch_sub(frame.len(), Relaxed);
        match res {
            Ok(()) => {}
            Err(FrameError::TooLarge { .. }) => {
                counters.oversize_outbound.fetch_add(1, Relaxed);
            }
            Err(_) => break,
        }
    }
    let _ = writer.shutdown().await;
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Inbound>) {
        let tick_ms = (self.cfg.heartbeat_ms / 10).clamp(10, 200);
        let mut ticker = tokio::time::interval(Duration::from_millis(tick_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nat_rx = self.nat.as_ref().map(|n| n.status.clone());
        loop {
            tokio::select! {
                changed = nat_changed(nat_rx.as_mut()) => {
                    match changed {
                        Some(st) => self.on_nat_status(st),
                        None => nat_rx = None,
                    }
                }
                ev = rx.recv() => {
                    let Some(ev) = ev else { return };
                    self.on_inbound(ev);
                    // Drain what is already queued before publishing.
                    while let Ok(ev) = rx.try_recv() {
                        self.on_inbound(ev);
                    }
                }
                _ = ticker.tick() => {
                    if self.join_after.is_some_and(|t| Instant::now() >= t) {
                        self.start_tree("no NAT role yet");
                    }
                    if self.join_after.is_none() {
                        self.tree.tick(now_ms());
                    }
                    self.relay_tick();
                }
            }
            self.carry_out();
            self.publish();
        }
    }

    fn reject(&mut self, code: &'static str) {
        *self.metrics.rejected.entry(code).or_insert(0) += 1;
    }

    fn on_inbound(&mut self, ev: Inbound) {
        match ev {
            Inbound::Connected {
                key,
                id,
                writer,
                queued,
                dialed_addr,
                remote_ip,
            } => {
                self.links.insert(
                    key,
                    Link {
                        id,
                        writer,
                        remote_ip,
                        queued,
                    },
                );
                if let Some(addr) = dialed_addr {
                    self.tree.contact_answered(&addr, key);
                    self.dialing.remove(&addr);
                    if let Some(q) = self.pending_addr.remove(&addr) {
                        self.pending_bytes = self.pending_bytes.saturating_sub(q.bytes);
                        for f in q.frames {
                            self.write(&key, f);
                        }
                    }
                }
                if let Some(q) = self.pending.remove(&key) {
                    self.pending_bytes = self.pending_bytes.saturating_sub(q.bytes);
                    for f in q.frames {
                        self.write(&key, f);
                    }
                }
            }
            Inbound::Frame {
                key,
                bytes,
                _budget,
            } => self.on_frame(key, bytes),
            Inbound::Closed { key, id } => {
                if self.links.get(&key).is_some_and(|l| l.id == id) {
                    self.links.remove(&key);
                    // A registration is only good with its link (open_relay needs it).
                    self.relayed_for.remove(&key);
                    self.metrics.links_closed += 1;
                    // Forget what a stranger told us; neighbours' addresses stay for redials.
                    if !self.trusted.has_key(&key) {
                        self.peer_addrs.remove(&key);
                    }
                    self.tree.link_down(now_ms(), &key);
                }
            }
            Inbound::DialFailed { key, addr } => {
                self.metrics.dial_failures += 1;
                self.dialing.remove(&addr);
                if let Some(q) = self.pending_addr.remove(&addr) {
                    self.pending_bytes = self.pending_bytes.saturating_sub(q.bytes);
                }
                if let Some(key) = key {
                    if let Some(q) = self.pending.remove(&key) {
                        self.pending_bytes = self.pending_bytes.saturating_sub(q.bytes);
                    }
                    if !self.trusted.has_key(&key) {
                        self.peer_addrs.remove(&key);
                    }
                    self.tree.link_down(now_ms(), &key);
                }
            }
            Inbound::FrameError { code } => self.reject(code),
            Inbound::Receptor { request, reply } => {
                let _ = reply.send(self.on_receptor(request));
            }
            Inbound::RelayRequest { target, reply } => {
                let _ = reply.send(self.open_relay(target));
            }
        }
    }

    // ----- reachability -------------------------------------------------------------------

    /// The reachability task decided something: advertise the new address, follow the
    /// relay, and hand LAN nodes to the tree.
    fn start_tree(&mut self, why: &str) {
        if self.join_after.take().is_some() {
            tracing::info!(cell = %self.cfg.cell, "joining as {} ({why})", self.my_addr);
            self.tree.start(now_ms());
        }
    }

    fn on_nat_status(&mut self, st: Arc<NatStatus>) {
        let now = now_ms();
        let advertise = st.decision.advertise.to_string();
        if advertise != self.my_addr {
            tracing::info!(cell = %self.cfg.cell, "advertising {advertise} ({})", st.decision.role);
            self.my_addr = advertise.clone();
            self.tree.set_my_addr(advertise);
        }
        let relay = st
            .decision
            .relay
            .filter(|_| st.decision.role == Role::Relayed);
        match (relay, self.my_relay) {
            (Some(r), Some((cur, _))) if r == cur => {}
            (Some(r), _) => {
                self.my_relay = Some((r, 0));
                self.relay_tick();
            }
            (None, _) => self.my_relay = None,
        }
        self.lan_addrs = st.lan.iter().map(|p| (p.key, p.lan_addr)).collect();
        for p in &st.lan {
            let stale = self
                .met
                .get(&p.key)
                .is_none_or(|at| now.saturating_sub(*at) > 60_000);
            if stale {
                self.met.insert(p.key, now);
                self.tree.meet(
                    now,
                    borg_proto::tree::Peer {
                        key: p.key,
                        addr: p.lan_addr.to_string(),
                        mon: String::new(),
                    },
                );
            }
        }
        let decided = st.decision.role != Role::Probing;
        self.nat_status = Some(st);
        if decided {
            self.start_tree("NAT role known");
        }
    }

    /// Keep our registration with our relay fresh; forget expired ones we hold.
    fn relay_tick(&mut self) {
        let now = now_ms();
        self.relayed_for.retain(|_, until| *until > now);
        self.met
            .retain(|_, at| now.saturating_sub(*at) <= MET_RETENTION_MS);
        let Some((relay, last)) = self.my_relay else {
            return;
        };
        if now.saturating_sub(last) < RELAY_RENEW_MS && last != 0 {
            return;
        }
        self.my_relay = Some((relay, now));
        let peer = borg_proto::tree::Peer {
            key: relay.key,
            addr: relay.dial.to_string(),
            mon: String::new(),
        };
        let frame = self.seal_reach(&ReachMsg::RelayRegister {});
        self.send_frame(Target::Peer(peer), frame);
    }

    fn open_relay(&mut self, target: PublicKey) -> Option<String> {
        let now = now_ms();
        let registered = self.relayed_for.get(&target).is_some_and(|u| *u > now);
        if !registered || !self.links.contains_key(&target) {
            self.metrics.relay_refused += 1;
            return None;
        }
        let token = nat::relay_token();
        let frame = self.seal_reach(&ReachMsg::RelayOpen {
            token: token.clone(),
        });
        self.write(&target, frame);
        Some(token)
    }

    fn on_reach_frame(&mut self, from: PublicKey, kind: &str, body: &Value) {
        let msg = match ReachMsg::from_kind_body(kind, body) {
            Ok(m) => m,
            Err(_) => return self.reject("malformed"),
        };
        let my_role = self.nat_status.as_ref().map(|s| s.decision.role);
        match msg {
            ReachMsg::RelayRegister {} => {
                // Only a node others can reach relays, and only for so many, and only so
                // many from one IP (fresh keys are free: issue 9 item 8).
                let can = matches!(my_role, Some(Role::Public | Role::Gateway));
                let known = self.relayed_for.contains_key(&from);
                let ip = self.links.get(&from).map(|l| l.remote_ip);
                let from_ip = self
                    .relayed_for
                    .keys()
                    .filter(|k| ip.is_some() && self.links.get(k).map(|l| l.remote_ip) == ip)
                    .count();
                if !can
                    || ip.is_none()
                    || (!known
                        && (self.relayed_for.len() >= MAX_RELAYED || from_ip >= MAX_RELAYED_PER_IP))
                {
                    self.metrics.relay_refused += 1;
                    return;
                }
                if self
                    .relayed_for
                    .insert(from, now_ms() + RELAY_REGISTRATION_MS)
                    .is_none()
                {
                    self.metrics.relay_registrations += 1;
                    tracing::info!(cell = %self.cfg.cell, "relaying for {}", from.short());
                }
            }
            ReachMsg::RelayOpen { token } => {
                let Some((relay, _)) = self.my_relay.filter(|(r, _)| r.key == from) else {
                    return self.reject("forbidden");
                };
                let identity = self.identity.clone();
                let Some(ctx) = self.link_ctx.clone() else {
                    return;
                };
                tokio::spawn(async move {
                    match conn::accept_via(relay.dial, &token, &identity, DIAL_TIMEOUT).await {
                        Ok(c) => spawn_link_conn(c, None, ctx),
                        Err(e) => tracing::debug!("answering relay {}: {e}", relay.dial),
                    }
                });
            }
            // Probe messages travel on probe connections only.
            _ => self.reject("forbidden"),
        }
    }

    fn seal_reach(&self, msg: &ReachMsg) -> Vec<u8> {
        let (kind, body) = msg.to_kind_body();
        envelope::seal(&self.key, &kind, Some(&self.my_addr), now_ms(), body).to_bytes()
    }

    fn on_frame(&mut self, link_key: PublicKey, bytes: Vec<u8>) {
        self.metrics.frames_in += 1;
        let now = now_ms();
        let env = match envelope::open(&bytes, now, &mut self.replay) {
            Ok(env) => env.into_inner(),
            Err(e) => {
                tracing::debug!("rejected frame from {}: {e}", link_key.short());
                return self.reject(e.code());
            }
        };
        if env.from != link_key {
            // Tree messages are re-signed by every hop: the signer must be the TLS peer.
            tracing::debug!(
                "frame signed by {} on {}'s link",
                env.from.short(),
                link_key.short()
            );
            return self.reject("forbidden");
        }
        if let Some(addr) = env.addr.clone() {
            let room =
                self.peer_addrs.len() < MAX_PEER_ADDRS || self.peer_addrs.contains_key(&env.from);
            if room && self.peer_addrs.get(&env.from) != Some(&addr) {
                self.tree.peer_addr_changed(&env.from, &addr);
                self.peer_addrs.insert(env.from, addr);
            }
        }
        if ReachMsg::is_reach_kind(&env.kind) {
            return self.on_reach_frame(env.from, &env.kind, &env.body);
        }
        let msg = match TreeMsg::from_kind_body(&env.kind, &env.body) {
            Ok(m) => m,
            Err(borg_proto::tree::msg::TreeMsgError::UnknownKind(_)) => {
                return self.reject("unknown_kind")
            }
            Err(e) => {
                tracing::debug!("malformed tree message: {e}");
                return self.reject("malformed");
            }
        };
        let before = self.tree.stats.rejected_unauthorized + self.tree.stats.rejected_invalid;
        self.tree.handle(now, env.from, msg);
        if self.tree.stats.rejected_unauthorized + self.tree.stats.rejected_invalid > before {
            self.reject("forbidden");
        }
    }

    fn on_receptor(&mut self, req: ReceptorRequest) -> Result<Value, (u16, &'static str, String)> {
        match req {
            ReceptorRequest::Broadcast { text, origin } => {
                let payload = json!({
                    "text": text,
                    "origin_env": String::from_utf8_lossy(&origin.to_bytes()),
                });
                // Escaping the origin envelope into the payload can double its size (or
                // more): refuse here what could not travel as one frame.
                let size = payload.to_string().len() + BCAST_ENVELOPE_OVERHEAD;
                if size > envelope::MAX_ENVELOPE_BYTES.min(MAX_FRAME) {
                    return Err((
                        413,
                        "too_large",
                        format!(
                            "this broadcast would be a {size}-byte message; the limit is {}",
                            envelope::MAX_ENVELOPE_BYTES
                        ),
                    ));
                }
                let id = self.tree.broadcast(payload);
                Ok(json!({ "id": id }))
            }
        }
    }

    /// Carry out what the state machine asked for.
    fn carry_out(&mut self) {
        for action in self.tree.drain() {
            match action {
                Action::Send { to, msg } => self.send(to, msg),
                Action::Deliver {
                    id,
                    origin,
                    payload,
                } => self.deliver(id, origin, payload),
                Action::Event(e @ borg_proto::tree::TreeEvent::Rejected { .. }) => {
                    tracing::debug!(cell = %self.cfg.cell, "tree: {e:?}")
                }
                Action::Event(e) => tracing::info!(cell = %self.cfg.cell, "tree: {e:?}"),
            }
        }
    }

    fn deliver(&mut self, id: String, origin: PublicKey, payload: Value) {
        self.last_broadcast = Some((id.clone(), now_ms()));
        // (The tree checked the origin envelope before delivering or forwarding it.)
        let text = payload.get("text").and_then(|t| t.as_str()).unwrap_or("");
        // Peer-supplied text: debug only, truncated, under its own target so that tests and the
        // demo can turn on exactly this line (BORG_LOG=info,borg::delivered=debug).
        tracing::debug!(target: DELIVERED_LOG_TARGET, cell = %self.cfg.cell, "broadcast {id:.64} from {}: {text:.80}", origin.short());
    }

    fn seal(&self, msg: &TreeMsg) -> Vec<u8> {
        let (kind, body) = msg.to_kind_body();
        envelope::seal(&self.key, &kind, Some(&self.my_addr), now_ms(), body).to_bytes()
    }

    fn send(&mut self, to: Target, msg: TreeMsg) {
        let frame = self.seal(&msg);
        self.send_frame(to, frame);
    }

    fn send_frame(&mut self, to: Target, frame: Vec<u8>) {
        if frame.len() > MAX_FRAME {
            // Never queued, so it can never take a link down.
            self.counters
                .oversize_outbound
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        match to {
            Target::Key(key) => {
                if self.links.contains_key(&key) {
                    self.write(&key, frame);
                }
            }
            Target::Peer(peer) => {
                if self.links.contains_key(&peer.key) {
                    self.write(&peer.key, frame);
                    return;
                }
                self.queue_pending(peer.key, frame);
                // The freshest address is the one the peer itself signed last.
                let addr = self.peer_addrs.get(&peer.key).cloned().unwrap_or(peer.addr);
                self.dial(Some(peer.key), addr);
            }
            Target::Addr(addr) => {
                let room = self.pending_addr.len() < MAX_PENDING_ADDRS
                    || self.pending_addr.contains_key(&addr);
                if !room || self.pending_bytes + frame.len() > PENDING_BYTES_TOTAL {
                    self.metrics.dropped_outbound += 1;
                    return;
                }
                let q = self.pending_addr.entry(addr.clone()).or_default();
                if q.frames.len() < OUTBOUND_QUEUE
                    && q.bytes + frame.len() <= PENDING_BYTES_PER_PEER
                {
                    q.bytes += frame.len();
                    self.pending_bytes += frame.len();
                    q.frames.push_back(frame);
                } else {
                    self.metrics.dropped_outbound += 1;
                }
                self.dial(None, addr);
            }
        }
    }

    /// Keep `frame` for when a link to `key` is up, within the per-peer and total byte
    /// budgets: the oldest frames for that peer go first.
    fn queue_pending(&mut self, key: PublicKey, frame: Vec<u8>) {
        let q = self.pending.entry(key).or_default();
        while !q.frames.is_empty()
            && (q.frames.len() >= OUTBOUND_QUEUE
                || q.bytes + frame.len() > PENDING_BYTES_PER_PEER
                || self.pending_bytes + frame.len() > PENDING_BYTES_TOTAL)
        {
            if let Some(old) = q.frames.pop_front() {
                q.bytes -= old.len();
                self.pending_bytes -= old.len();
                self.metrics.dropped_outbound += 1;
            }
        }
        if self.pending_bytes + frame.len() > PENDING_BYTES_TOTAL {
            self.metrics.dropped_outbound += 1;
            return;
        }
        q.bytes += frame.len();
        self.pending_bytes += frame.len();
        q.frames.push_back(frame);
    }

    fn write(&mut self, key: &PublicKey, frame: Vec<u8>) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(link) = self.links.get(key) else {
            return;
        };
        let len = frame.len();
        if link.queued.load(Relaxed) + len > LINK_OUTBOUND_BYTES {
            self.metrics.dropped_outbound += 1;
            return;
        }
        link.queued.fetch_add(len, Relaxed);
        match link.writer.try_send(frame) {
            Ok(()) => self.metrics.frames_out += 1,
            Err(mpsc::error::TrySendError::Full(_)) => {
                link.queued.fetch_sub(len, Relaxed);
                self.metrics.dropped_outbound += 1;
            }
            Err(mpsc::error::TrySendError::Closed(frame)) => {
                self.links.remove(key);
                self.queue_pending(*key, frame);
            }
        }
    }

    fn dial(&mut self, key: Option<PublicKey>, addr: String) {
        let now = Instant::now();
        if let Some(started) = self.dialing.get(&addr) {
            if now.duration_since(*started) < DIAL_TIMEOUT + Duration::from_millis(100) {
                return;
            }
        }
        let Ok(parsed) = addr.parse::<PeerAddr>() else {
            return;
        };
        // A node on our own LAN is dialed there, never through a relay (or a router hairpin).
        let lan = key
            .or(match parsed {
                PeerAddr::Relayed { target, .. } => Some(target),
                PeerAddr::Direct(_) => None,
            })
            .and_then(|k| self.lan_addrs.get(&k).map(|a| (k, *a)));
        let route = match (lan, parsed) {
            (Some((k, a)), _) => (Some(k), PeerAddr::Direct(a)),
            (None, PeerAddr::Relayed { relay, target }) => {
                if key.is_some_and(|k| k != target) {
                    return;
                }
                self.metrics.relayed_dials += 1;
                (Some(target), PeerAddr::Relayed { relay, target })
            }
            (None, direct) => (key, direct),
        };
        self.dialing.insert(addr.clone(), now);
        self.metrics.dials += 1;
        let identity = self.identity.clone();
        let tx = self.tx.clone();
        let Some(ctx) = self.link_ctx.clone() else {
            return;
        };
        tokio::spawn(async move {
            let result = match route {
                (_, PeerAddr::Relayed { relay, target }) => {
                    conn::connect_via(relay, target, &identity, DIAL_TIMEOUT).await
                }
                (Some(k), PeerAddr::Direct(sock)) => {
                    conn::connect(sock, k, &identity, DIAL_TIMEOUT).await
                }
                (None, PeerAddr::Direct(sock)) => {
                    conn::connect_unpinned(sock, &identity, DIAL_TIMEOUT).await
                }
            };
            match result {
                Ok(c) => spawn_link_conn(c, Some(addr), ctx),
                Err(e) => {
                    tracing::debug!("dial {addr} failed: {e}");
                    let _ = tx.send(Inbound::DialFailed { key, addr }).await;
                }
            }
        });
    }

    fn publish(&mut self) {
        let view = self.tree.view();
        let k = self.cfg.max_children;
        let placed = |p: &borg_proto::tree::Placed| json!({"pos": p.pos, "key": p.peer.key.to_b64(), "addr": p.peer.addr, "mon": p.peer.mon});
        let status = json!({
            "cell": self.cfg.cell,
            "state": view.state.as_str(),
            "public_key": self.key.public().to_b64(),
            "addr": self.my_addr,
            "mon": self.cfg.mon.to_string(),
            "recp": self.cfg.recp.to_string(),
            "position": view.position,
            "parent": view.parent.as_ref().map(placed),
            "children": view.children.iter().map(placed).collect::<Vec<_>>(),
            "root": view.root.as_ref().map(|r| json!({"key": r.key.to_b64(), "addr": r.addr, "mon": r.mon})),
            "size": view.size,
            "depth": view.position.map(|p| geometry::depth_of(p, k)),
            "tree_depth": geometry::tree_depth(view.size, k),
            "max_children": k,
            "heartbeat_ms": self.cfg.heartbeat_ms,
            "uptime_s": self.started.elapsed().as_secs(),
            "delivered_broadcasts": self.tree.stats.delivered_broadcasts,
            "last_broadcast": self.last_broadcast.as_ref().map(|(id, at)| json!({"id": id, "at_ms": at})),
            "vacant": view.vacant,
            "connections": self.links.len(),
        });
        let mut status = status;
        if let (Some(st), Some(obj)) = (self.nat_status.as_ref(), status.as_object_mut()) {
            if let Some(extra) = st.to_json().as_object() {
                for (k, v) in extra {
                    obj.insert(k.clone(), v.clone());
                }
            }
            obj.insert("relaying_for".into(), json!(self.relayed_for.len()));
            if let Some(n) = self.nat.as_ref() {
                let dropped = n
                    .probe_ctx
                    .beacons_dropped
                    .load(std::sync::atomic::Ordering::Relaxed);
                obj.insert("beacons_dropped".into(), json!(dropped));
            }
            obj.insert(
                "relay_limited".into(),
                json!(self
                    .relay_hub
                    .limited_total
                    .load(std::sync::atomic::Ordering::Relaxed)),
            );
            obj.insert(
                "relay_splices_active".into(),
                json!(self
                    .relay_hub
                    .active
                    .load(std::sync::atomic::Ordering::Relaxed)),
            );
        }
        // Probe candidates: contacts and tree neighbours.
        let mut cands: Vec<(Option<PublicKey>, String)> = self
            .cfg
            .join
            .iter()
            .map(|a| (None, a.to_string()))
            .collect();
        let mut add = |p: &borg_proto::tree::Peer| cands.push((Some(p.key), p.addr.clone()));
        if let Some(r) = view.root.as_ref() {
            add(r);
        }
        if let Some(p) = view.parent.as_ref() {
            add(&p.peer);
        }
        for c in &view.children {
            add(&c.peer);
        }
        // The neighbourhood gets the reserved connection slots and the neighbour's rate.
        let mut keys = std::collections::HashSet::new();
        let mut ips = std::collections::HashSet::new();
        ips.insert(self.cfg.listen.ip());
        for (k, a) in cands.iter().skip(self.cfg.join.len()) {
            if let Some(k) = k {
                keys.insert(*k);
            }
            match a.parse::<PeerAddr>() {
                Ok(PeerAddr::Direct(sock)) => {
                    ips.insert(sock.ip());
                }
                Ok(PeerAddr::Relayed { relay, .. }) => {
                    ips.insert(relay.ip());
                }
                Err(_) => {}
            }
        }
        self.trusted.set(keys, ips);
        self.candidates.send_if_modified(|old| {
            if *old != cands {
                *old = cands;
                true
            } else {
                false
            }
        });
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.relay_splices = self.relay_hub.spliced_total.load(Relaxed);
        self.metrics.relay_failed = self.relay_hub.failed_total.load(Relaxed);
        self.metrics.relay_bytes = self.relay_hub.bytes_total.load(Relaxed);
        self.metrics.relay_limited = self.relay_hub.limited_total.load(Relaxed);
        let snap = Snapshot {
            status,
            tree: self.tree.stats.clone(),
            metrics: self.metrics.clone(),
        };
        self.snapshot.send_replace(Arc::new(snap));
    }
}

impl NodeHandle {
    /// Ask the node to originate a broadcast of `text`, vouched for by `origin` (the
    /// verified request envelope).
    pub(crate) async fn request(
        &self,
        request: ReceptorRequest,
    ) -> Result<Value, (u16, &'static str, String)> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Inbound::Receptor { request, reply })
            .await
            .is_err()
        {
            return Err((503, "unavailable", "node is shutting down".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err((503, "unavailable", "node is shutting down".into())))
    }

    /// The current status JSON.
    pub fn status(&self) -> Value {
        self.snapshot.borrow().status.clone()
    }
}

/// Render Prometheus text for a snapshot and the counters kept outside the actor.
pub fn render_metrics(s: &Snapshot, net: &NetCounters) -> String {
    let mut out = String::new();
    let t = &s.tree;
    let m = &s.metrics;
    out.push_str("# HELP borg_rejected_total Messages rejected, by reason.\n# TYPE borg_rejected_total counter\n");
    for code in [
        "malformed",
        "bad_signature",
        "stale",
        "replay",
        "too_large",
        "unknown_kind",
        "forbidden",
        "handshake",
        "rate_limited",
        "timeout",
    ] {
        let v = m.rejected.get(code).copied().unwrap_or(0);
        out.push_str(&format!("borg_rejected_total{{reason=\"{code}\"}} {v}\n"));
    }
    let counters: [(&str, &str, u64); 14] = [
        ("borg_frames_in_total", "Frames received.", m.frames_in),
        ("borg_frames_out_total", "Frames sent.", m.frames_out),
        ("borg_dials_total", "Outbound connection attempts.", m.dials),
        (
            "borg_dial_failures_total",
            "Failed outbound connections.",
            m.dial_failures,
        ),
        (
            "borg_outbound_dropped_total",
            "Frames dropped from full queues.",
            m.dropped_outbound,
        ),
        (
            "borg_tree_topology_sent_total",
            "Join/repair messages sent.",
            t.sent_topology,
        ),
        (
            "borg_tree_heartbeats_sent_total",
            "Heartbeats sent.",
            t.sent_heartbeat,
        ),
        (
            "borg_tree_broadcast_sent_total",
            "Broadcast transmissions sent.",
            t.sent_broadcast,
        ),
        (
            "borg_broadcasts_delivered_total",
            "Broadcasts delivered here.",
            t.delivered_broadcasts,
        ),
        (
            "borg_broadcast_duplicates_total",
            "Duplicate broadcasts dropped.",
            t.duplicate_broadcasts,
        ),
        (
            "borg_tree_unauthorized_total",
            "Topology orders refused: sender not entitled.",
            t.rejected_unauthorized,
        ),
        (
            "borg_tree_joins_assigned_total",
            "Positions assigned (root).",
            t.joins_assigned,
        ),
        (
            "borg_tree_repairs_ordered_total",
            "Moves ordered (root).",
            t.repairs_ordered,
        ),
        (
            "borg_broadcast_origin_invalid_total",
            "Broadcasts whose origin envelope did not verify.",
            t.rejected_broadcast_origin,
        ),
    ];
    for (name, help, v) in counters {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    let relay_counters: [(&str, &str, u64); 7] = [
        (
            "borg_relay_limited_total",
            "Relay requests refused by the per-IP rate or the waiting bounds.",
            m.relay_limited,
        ),
        (
            "borg_relay_splices_total",
            "Connections spliced for relayed nodes.",
            m.relay_splices,
        ),
        (
            "borg_relay_failed_total",
            "Relay requests whose node did not connect back.",
            m.relay_failed,
        ),
        (
            "borg_relay_bytes_total",
            "Bytes forwarded for relayed nodes (closed splices).",
            m.relay_bytes,
        ),
        (
            "borg_relay_registrations_total",
            "Nodes that registered with this node as their relay.",
            m.relay_registrations,
        ),
        (
            "borg_relay_refused_total",
            "Relay registrations or requests refused.",
            m.relay_refused,
        ),
        (
            "borg_relayed_dials_total",
            "Outbound connections made through a relay.",
            m.relayed_dials,
        ),
    ];
    for (name, help, v) in relay_counters {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    if let Some(role) = s.status.get("nat_role").and_then(|v| v.as_str()) {
        out.push_str("# HELP borg_nat_role The node's NAT role (1 for the current one).\n# TYPE borg_nat_role gauge\n");
        for r in ["probing", "public", "gateway", "relayed", "local"] {
            out.push_str(&format!(
                "borg_nat_role{{role=\"{r}\"}} {}\n",
                u8::from(r == role)
            ));
        }
    }
    out.push_str(&format!(
        "# HELP borg_links_closed_total Node-to-node links that closed.\n# TYPE borg_links_closed_total counter\nborg_links_closed_total {}\n",
        m.links_closed
    ));
    let links = s
        .status
        .get("connections")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    out.push_str(&format!("# HELP borg_links Node-to-node links open now.\n# TYPE borg_links gauge\nborg_links {links}\n"));
    out.push_str(&net.render());
    let size = s.status.get("size").and_then(|v| v.as_u64()).unwrap_or(0);
    out.push_str(&format!("# HELP borg_tree_size Tree size as this node knows it.\n# TYPE borg_tree_size gauge\nborg_tree_size {size}\n"));
    out
}

/// The next reachability status, or `None` once the task is gone (never, if there is none).
async fn nat_changed(rx: Option<&mut watch::Receiver<Arc<NatStatus>>>) -> Option<Arc<NatStatus>> {
    match rx {
        Some(rx) => {
            rx.changed().await.ok()?;
            Some(rx.borrow_and_update().clone())
        }
        None => std::future::pending().await,
    }
}

impl NodeHandle {
    /// Orderly stop of what outlives the process otherwise: the router's port mapping.
    pub async fn shutdown(&self) {
        if let Some(nat) = self.nat.as_ref() {
            nat.shutdown().await;
        }
    }
}
