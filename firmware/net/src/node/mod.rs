//! The node actor: one tokio task per cell drives that cell's runtime and moves its bytes.
//!
//! By duty:
//! - [`host`]: the sans-IO core (tree state machine, the cell, envelope open/seal, replay
//!   cache): frames and timers in, sealed frames out; [`mem`] wires hosts together in memory
//!   for paused-time tests;
//! - this file: the actor loop and the inbound events ([`Inbound`]) connection tasks send it;
//! - `io`: accepting and running connections, with their bounds; `links`: the links and the
//!   queues of frames waiting for one; `follow`: following the NAT role and the LAN;
//!   `router`: links routed to cells by ALPN, and a non-base cell following the base tree;
//!   `publish`: the status snapshot and the neighbourhood; `metrics`: `/metrics`.
//!
//! The actor checks that an envelope's signer is the key the TLS handshake authenticated
//! (in the host), then carries out what the host asks: send (dialing when needed), deliver.
//! No lock is held across an await; the status snapshot is published through a `watch`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use borg_proto::envelope::{self, Envelope};
use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::reach::msg::ReachMsg;
use borg_proto::reach::{PeerAddr, RelayChoice, Role};
use borg_proto::tree::{OrderSeal, Peer, Target, TreeConfig, TreeNode, TreeStats};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::cell::{BaseView, Cell};
use crate::conn::{self, Incoming, Listener, PeerWriter, TransportError};
use crate::frame::{FrameError, MAX_FRAME};
use crate::guard::{Bucket, ConnLimiter, Door, NetCounters, Refusal, Trusted};
use crate::nat::{self, NatConfig, NatHandle, NatStatus};
use crate::relay::RelayHub;
use crate::tls::TlsIdentity;

mod follow;
mod host;
mod io;
mod links;
pub mod mem;
mod metrics;
mod publish;
mod replies;
mod router;

pub use crate::clock::system_ms as now_ms;
use follow::nat_changed;
use host::Host;
use io::{accept_loop, spawn_link_conn};
pub use metrics::render_metrics;
pub use router::{BaseFollow, CellRouter};

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
    /// The node's clock (shared by all its cells).
    pub clock: Arc<crate::clock::NetClock>,
    /// The node's cells' tree links, by ALPN (shared by all its cells' listeners).
    pub router: Arc<CellRouter>,
    /// For a non-base cell: the base cell it follows for its address and its peers.
    pub base: Option<BaseFollow>,
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
        /// Local clock (µs) when the frame was read off the link.
        rx_local_us: u64,
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
    /// A blocking job of the cell finished (see [`crate::cell::Work`]).
    WorkDone(crate::cell::WorkDone),
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
/// Binary stream frames (no signature to check) have their own bucket at the neighbours'
/// rate on every link: a client pulling shards sends one small `Want` per 256 KiB.
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
pub(crate) use host::HostRequest as ReceptorRequest;

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
    /// The cell's own metric lines and network time's (Prometheus text).
    pub extra_metrics: String,
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
    /// The node's clock (network time for every envelope).
    pub clock: Arc<crate::clock::NetClock>,
    /// Receptor kinds the cell answers beyond ping, broadcast and status.
    pub receptor_kinds: &'static [&'static str],
    /// The base cell publishes its tree here for the node's other cells.
    pub base_view: watch::Receiver<BaseView>,
    /// The other cells of this node (set on the base cell once all have started): shown in
    /// its status as `cells`.
    pub siblings: std::sync::OnceLock<Vec<(String, watch::Receiver<Arc<Snapshot>>)>>,
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
    fn check_broadcast(&self, origin: &PublicKey, payload: &Value) -> bool {
        broadcast_origin_ok(payload) || cell_broadcast_origin_ok(origin, payload)
    }
}

/// Whether a broadcast payload is `{text, origin_env}` where `origin_env` is a validly
/// signed `broadcast` request envelope whose `body.text` is the payload's text.
pub fn broadcast_origin_ok(payload: &Value) -> bool {
    vouched(payload, "text").is_some_and(|(text, env)| {
        env.kind == "broadcast"
            && text.is_string()
            && env.body.get("text").and_then(|t| t.as_str()) == text.as_str()
    })
}

/// Kind of the envelope that vouches for a broadcast a cell started ([`CellAction::Broadcast`]).
pub const CELL_BCAST_KIND: &str = "cell.bcast";

/// Whether a broadcast payload is `{data, origin_env}` where `origin_env` is a `cell.bcast`
/// envelope signed by `origin` whose body is exactly `{"data": data}`.
pub fn cell_broadcast_origin_ok(origin: &PublicKey, payload: &Value) -> bool {
    vouched(payload, "data").is_some_and(|(data, env)| {
        env.from == *origin
            && env.kind == CELL_BCAST_KIND
            && env.body.as_object().is_some_and(|b| b.len() == 1)
            && env.body.get("data") == Some(data)
    })
}

/// A payload of exactly `{<field>, origin_env}`: the field and the origin envelope, if its
/// signature holds (it is evidence carried along, so no clock or replay check).
fn vouched<'a>(payload: &'a Value, field: &str) -> Option<(&'a Value, Envelope)> {
    let obj = payload.as_object().filter(|o| o.len() == 2)?;
    let value = obj.get(field)?;
    let env = obj.get("origin_env")?.as_str()?;
    let env = envelope::verify_signature_only(env.as_bytes()).ok()?;
    Some((value, env.into_inner()))
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
    /// The tree, the cell and the envelope layer (sans-IO).
    host: Host,
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
    /// Base cell: where it publishes its tree for the node's other cells.
    base_view_tx: watch::Sender<BaseView>,
    /// When a non-base cell last tried to join through the base tree (mono ms).
    last_base_join: u64,
    /// Receptor requests the cell answers later.
    replies: replies::Replies,
    /// Join deferred until network time is synced (bounded by `join_after`).
    wait_for_time: bool,
    /// Join deferred until the NAT role is known (bounded by `join_after`).
    wait_for_role: bool,
    /// The cell's blocking jobs running now (at most `cell::MAX_WORK_IN_FLIGHT`).
    work_in_flight: usize,
}

/// How long a node waits for its NAT role, or for network time, before joining anyway.
const JOIN_WAIT_FOR_ROLE: Duration = Duration::from_secs(10);
/// How long a node waits for network time before joining anyway: a node with a wrong clock
/// cannot join (its messages are stale), and the time cell falls back to the local clock
/// after about 18 s without a synced answer.
const JOIN_WAIT_FOR_TIME: Duration = Duration::from_secs(20);
/// How often a non-base cell alone in its tree tries to join through the base tree.
const BASE_JOIN_EVERY_MS: u64 = 3_000;

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
pub async fn start(cfg: NodeConfig, cell: Box<dyn Cell>) -> Result<NodeHandle, NodeError> {
    let key = SecretKey::load_or_create(&cfg.data_dir)?;
    let clock = cfg.clock.clone();
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
        let mut nc = NatConfig::new(&cfg.cell, cfg.listen, fallback, cfg.clock.clone());
        nc.port_mapping = cfg.port_mapping;
        nat::spawn(nc, key.clone(), identity.clone(), candidates_rx)
    });
    let relay_hub = Arc::new(RelayHub::default());
    let seed = u64::from_le_bytes(key.sign(b"seed")[..8].try_into().unwrap_or([7; 8]))
        ^ crate::clock::system_us().rotate_left(17);
    let tree = TreeNode::new(
        TreeConfig::new(cfg.max_children, cfg.heartbeat_ms),
        me,
        contacts.clone(),
        Box::new(EcdsaSeal { key: key.clone() }),
        seed,
    );
    let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot {
        status: json!({}),
        tree: TreeStats::default(),
        metrics: Metrics::default(),
        extra_metrics: String::new(),
    }));
    let (base_view_tx, base_view_rx) = watch::channel(BaseView {
        contacts: contacts.clone(),
        ..BaseView::default()
    });
    let receptor_kinds = cell.receptor_kinds();
    let host = Host::new(
        key.clone(),
        my_addr,
        cfg.cell.clone(),
        cfg.max_children,
        cfg.clock.clone(),
        tree,
        cell,
    );
    let mut actor = Actor {
        cfg,
        key: key.clone(),
        identity: identity.clone(),
        host,
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
        base_view_tx,
        last_base_join: 0,
        replies: replies::Replies::default(),
        wait_for_time: false,
        wait_for_role: false,
        work_in_flight: 0,
    };
    let links = LinkCtx {
        cell: crate::tls::cell_of_alpn(&crate::tls::alpn_of(&actor.cfg.cell))
            .unwrap_or(borg_proto::dna::PEER_TREE_NET.name),
        tx: tx.clone(),
        counters: counters.clone(),
        trusted: trusted.clone(),
        node_budget: Arc::new(Semaphore::new(NODE_INBOUND_BYTES / BUDGET_UNIT)),
        clock: actor.cfg.clock.clone(),
        router: actor.cfg.router.clone(),
    };
    actor.cfg.router.register(links.cell, links.clone());
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
    actor.wait_for_role = actor.nat.is_some() && outside_contacts;
    // A node whose time cell has contacts to ask first learns network time (bounded): with
    // a wrong clock (a Pi 4 boots at 1970) its tree messages would be refused as stale.
    actor.wait_for_time =
        actor.cfg.clock.has_source() && !actor.cfg.clock.is_synced() && !actor.cfg.join.is_empty();
    if actor.wait_for_role || actor.wait_for_time {
        let wait = if actor.wait_for_time {
            JOIN_WAIT_FOR_TIME
        } else {
            JOIN_WAIT_FOR_ROLE
        };
        actor.join_after = Some(Instant::now() + wait);
    } else {
        actor.host.tree.start(actor.cfg.clock.mono_ms());
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
        clock,
        receptor_kinds,
        base_view: base_view_rx,
        siblings: std::sync::OnceLock::new(),
    })
}

/// What every link task shares: the way into the actor, counters, the neighbourhood and
/// the node-wide inbound byte budget.
#[derive(Clone)]
pub(crate) struct LinkCtx {
    /// The cell whose actor this reaches.
    cell: &'static str,
    tx: mpsc::Sender<Inbound>,
    counters: Arc<NetCounters>,
    trusted: Arc<Trusted>,
    node_budget: Arc<Semaphore>,
    clock: Arc<crate::clock::NetClock>,
    router: Arc<CellRouter>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Inbound>) {
        let tick_ms = (self.cfg.heartbeat_ms / 10).clamp(10, 200);
        let mut ticker = tokio::time::interval(Duration::from_millis(tick_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nat_rx = self
            .nat
            .as_ref()
            .or(self.cfg.base.as_ref().and_then(|b| b.nat.as_ref()))
            .map(|n| n.status.clone());
        let mut base_rx = self.cfg.base.as_ref().map(|b| b.view.clone());
        loop {
            // At least 1 ms ahead: a cell that keeps asking for a deadline already past
            // costs a timer a millisecond, never a hot loop.
            let cell_deadline = self.host.poll_timeout().map(|t| {
                let now = self.cfg.clock.mono_ms();
                tokio::time::Instant::now() + Duration::from_millis(t.saturating_sub(now).max(1))
            });
            tokio::select! {
                () = router::sleep_until_opt(cell_deadline) => self.host.handle_timeout(),
                changed = router::base_changed(base_rx.as_mut()) => {
                    match changed {
                        Some(view) => self.on_base_view(&view),
                        None => base_rx = None,
                    }
                }
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
                    if self.join_after.is_some() && self.wait_for_time && self.cfg.clock.is_synced() {
                        self.wait_for_time = false;
                        if !self.wait_for_role {
                            self.start_tree("network time synced");
                        }
                    }
                    if self.join_after.is_some_and(|t| Instant::now() >= t) {
                        self.start_tree("waited long enough for the NAT role and network time");
                    }
                    if let Some(view) = base_rx.as_ref().map(|r| r.borrow().clone()) {
                        self.base_join_tick(&view);
                    }
                    if self.join_after.is_none() {
                        self.host.handle_tick();
                    }
                    self.relay_tick();
                    self.replies.expire(self.cfg.clock.mono_ms());
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
                    self.host.tree.contact_answered(&addr, key);
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
                rx_local_us,
                _budget,
            } => self.on_frame(key, bytes, rx_local_us),
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
                    self.host.tree.link_down(self.cfg.clock.mono_ms(), &key);
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
                    self.host.tree.link_down(self.cfg.clock.mono_ms(), &key);
                }
            }
            Inbound::FrameError { code } => self.reject(code),
            Inbound::WorkDone(done) => {
                self.work_in_flight = self.work_in_flight.saturating_sub(1);
                self.host.handle_work_done(done);
            }
            Inbound::Receptor { request, reply } => {
                let Some(ticket) = self.replies.ticket() else {
                    let busy = (
                        503,
                        "unavailable",
                        "too many requests wait for this cell".into(),
                    );
                    let _ = reply.send(Err(busy));
                    return;
                };
                match self.host.handle_request(request, ticket) {
                    Ok(Some(v)) => {
                        let _ = reply.send(Ok(v));
                    }
                    Ok(None) => self.replies.wait(ticket, self.cfg.clock.mono_ms(), reply),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Inbound::RelayRequest { target, reply } => {
                let _ = reply.send(self.open_relay(target));
            }
        }
    }

    fn on_frame(&mut self, link_key: PublicKey, bytes: Vec<u8>, rx_local_us: u64) {
        self.metrics.frames_in += 1;
        if crate::cell::is_binary_frame(&bytes) {
            if let Err(code) = self.host.dispatch_binary(&link_key, &bytes) {
                self.reject(code);
            }
            return;
        }
        let env = match self.host.open(&link_key, &bytes) {
            Ok(env) => env,
            Err(code) => return self.reject(code),
        };
        if let Some(addr) = env.addr.clone() {
            let room =
                self.peer_addrs.len() < MAX_PEER_ADDRS || self.peer_addrs.contains_key(&env.from);
            if room && self.peer_addrs.get(&env.from) != Some(&addr) {
                self.host.tree.peer_addr_changed(&env.from, &addr);
                self.peer_addrs.insert(env.from, addr);
            }
        }
        if ReachMsg::is_reach_kind(&env.kind) {
            return self.on_reach_frame(env.from, &env.kind, &env.body);
        }
        if let Err(code) = self.host.dispatch(&env, rx_local_us) {
            self.reject(code);
        }
    }

    /// Carry out what the tree and the cell asked for: seal and send.
    fn carry_out(&mut self) {
        self.host.carry_out();
        while let Some((ticket, answer)) = self.host.poll_reply() {
            self.replies.answer(ticket, answer);
        }
        while let Some((to, frame)) = self.host.poll_transmit() {
            self.send_frame(to, frame);
        }
        self.metrics.dropped_outbound += self.host.take_dropped();
        self.start_work();
    }

    /// Hand the cell's blocking jobs to blocking threads, within the in-flight bound; each
    /// result comes back as an [`Inbound::WorkDone`].
    fn start_work(&mut self) {
        while self.work_in_flight < crate::cell::MAX_WORK_IN_FLIGHT {
            let Some(work) = self.host.poll_work() else {
                return;
            };
            self.work_in_flight += 1;
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let done = tokio::task::spawn_blocking(work)
                    .await
                    .unwrap_or_else(|_| Box::new(crate::cell::WorkPanicked));
                // The actor is gone only when the node stops.
                let _ = tx.send(Inbound::WorkDone(done)).await;
            });
        }
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

    /// The current status JSON; the base cell's lists the node's cells.
    pub fn status(&self) -> Value {
        let mut status = self.snapshot.borrow().status.clone();
        if let (Some(sibs), Some(obj)) = (self.siblings.get(), status.as_object_mut()) {
            let me = router::cell_summary(obj);
            let mut cells = vec![me];
            for (_, rx) in sibs {
                if let Some(st) = rx.borrow().status.as_object() {
                    cells.push(router::cell_summary(st));
                }
            }
            obj.insert("cells".into(), Value::Array(cells));
        }
        status
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
