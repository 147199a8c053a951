//! The reachability task: finds out how other nodes reach this one and keeps it so.
//!
//! It owns a [`Reach`] state machine (`borg_proto::reach`, the rules) and does the I/O:
//! - re-reads the local network from the kernel every few seconds ([`crate::localnet`]);
//! - probes peers outside the LAN on `borg-probe/1` connections from a fixed source port:
//!   each observer answers where the connection came from and, if asked, dials back the
//!   address under test; it also learns that we reached it (evidence for its own role);
//! - sends and hears signed LAN beacons (UDP broadcast on the tree port);
//! - maps a port on the router when the rules make this node the LAN's candidate, renews the
//!   lease, and removes the mapping when it is no longer wanted or the node shuts down;
//! - publishes a [`NatStatus`] that the node actor (advertised address, relay registration,
//!   LAN shortcuts) and the monitor read.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use borg_proto::envelope::{self, ReplayCache};
use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::reach::msg::{
    peek_beacon, BeaconMap, ReachMsg, Referral, MAX_BEACON_PROOFS, MAX_PROOF_BYTES, MAX_REFERRALS,
};
use borg_proto::reach::{
    is_private, Decision, Evidence, LanPeer, LocalNet, MapState, PeerAddr, Reach, ReachConfig, Role,
};
use serde_json::{json, Value};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::NetClock;
use crate::conn::{self, PeerConn};
use crate::portmap::{self, MapRequest, PortMapping};
use crate::tls::TlsIdentity;

/// How the reachability task runs.
#[derive(Debug, Clone)]
pub struct NatConfig {
    pub cell: String,
    /// The tree listen address (its port is the beacon port too; probes use port + 1).
    pub listen: SocketAddr,
    /// Address to advertise while nothing better is known.
    pub fallback: SocketAddr,
    /// Send LAN beacons (off on loopback, where there is no LAN).
    pub beacons: bool,
    pub beacon_every: Duration,
    /// Try to map a port on the router when this node is the LAN's candidate.
    pub port_mapping: bool,
    pub lease: Duration,
    /// Probe interval while undecided; decided nodes probe ten times less often.
    pub probe_every: Duration,
    pub rules: ReachConfig,
    /// The node's network clock (envelope `ts` and windows).
    pub clock: Arc<NetClock>,
}

impl NatConfig {
    pub fn new(cell: &str, listen: SocketAddr, fallback: SocketAddr, clock: Arc<NetClock>) -> Self {
        Self {
            clock,
            cell: cell.to_string(),
            listen,
            fallback,
            beacons: !listen.ip().is_loopback(),
            beacon_every: Duration::from_secs(1),
            port_mapping: true,
            lease: Duration::from_secs(120),
            probe_every: Duration::from_secs(2),
            rules: ReachConfig {
                listen_ip: (!listen.ip().is_unspecified()).then_some(listen.ip()),
                ..ReachConfig::new(listen.port())
            },
        }
    }
}

/// What the rest of the node sees.
#[derive(Debug, Clone, PartialEq)]
pub struct NatStatus {
    pub decision: Decision,
    pub map: MapState,
    pub map_protocol: Option<String>,
    pub net: LocalNet,
    pub lan: Vec<LanPeer>,
    /// Milliseconds from start to the first decided role (for the benchmark).
    pub decided_after_ms: Option<u64>,
    pub probes_sent: u64,
    pub probes_answered: u64,
}

impl NatStatus {
    fn initial(cfg: &NatConfig) -> Self {
        Self {
            decision: Decision {
                role: Role::Probing,
                nat: borg_proto::reach::NatKind::Unknown,
                external_ip: None,
                advertise: PeerAddr::Direct(cfg.fallback),
                relay: None,
                want_mapping: false,
                reason: "starting".into(),
                tentative: false,
            },
            map: MapState::Idle,
            map_protocol: None,
            net: LocalNet::default(),
            lan: Vec::new(),
            decided_after_ms: None,
            probes_sent: 0,
            probes_answered: 0,
        }
    }

    /// The address outsiders use for this node, when it has one.
    pub fn external_addr(&self) -> Option<String> {
        match self.decision.role {
            Role::Public | Role::Gateway | Role::Relayed => {
                Some(self.decision.advertise.to_string())
            }
            Role::Probing | Role::Local => None,
        }
    }

    /// The status JSON fields (merged into the node's `/status`).
    pub fn to_json(&self) -> Value {
        let d = &self.decision;
        let (map_reason, map_external) = match &self.map {
            MapState::Refused { reason, .. } => (Some(reason.clone()), None),
            MapState::Mapped { external, .. } => (None, Some(external.to_string())),
            _ => (None, None),
        };
        json!({
            "nat_role": d.role.as_str(),
            "external_addr": self.external_addr(),
            "external_ip": d.external_ip.map(|ip| ip.to_string()),
            "nat_type": d.nat.as_str(),
            "nat_reason": d.reason,
            "nat_tentative": d.tentative,
            "advertised_addr": d.advertise.to_string(),
            "router": self.net.router.map(|r| r.to_string()),
            "relay": d.relay.map(|r| json!({"key": r.key.to_b64(), "addr": r.public.to_string(), "dial": r.dial.to_string()})),
            "mapping": {
                "state": self.map.as_str(),
                "protocol": self.map_protocol,
                "external": map_external,
                "reason": map_reason,
            },
            "lan_peers": self.lan.iter().map(|p| json!({
                "key": p.key.to_b64(), "addr": p.lan_addr.to_string(), "role": p.role.as_str(),
                "believed": p.role != Role::Gateway || p.believed_gateway(),
            })).collect::<Vec<_>>(),
            "nat_decided_after_ms": self.decided_after_ms,
        })
    }
}

/// Events into the task.
pub(crate) enum NatEvent {
    Evidence {
        observer: PublicKey,
        from_ip: IpAddr,
        evidence: Evidence,
    },
    ObserverRole {
        key: PublicKey,
        addr: SocketAddr,
        role: Role,
    },
    /// A dial-back arrived carrying `token` for `addr`; `proof` is the observer's sealed
    /// `nat.reached` as it came (a gateway shows it to its LAN in its beacons).
    DialedBack {
        observer: PublicKey,
        from_ip: IpAddr,
        addr: SocketAddr,
        token: String,
        proof: String,
    },
    /// An observer named other nodes it reached directly: more witnesses to ask.
    Referred {
        by: PublicKey,
        peers: Vec<Referral>,
    },
    ProbeRoundDone {
        sent: u64,
        answered: u64,
    },
    Mapped(Result<PortMapping, String>),
    Renewed(PortMapping, Result<(), String>),
    /// Remove any mapping and stop (node shutdown).
    Shutdown(oneshot::Sender<()>),
}

/// Handles the node keeps.
#[derive(Clone)]
pub struct NatHandle {
    pub(crate) events: mpsc::Sender<NatEvent>,
    pub status: watch::Receiver<Arc<NatStatus>>,
    pub(crate) probe_ctx: Arc<ProbeCtx>,
}

impl std::fmt::Debug for NatHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatHandle")
    }
}

/// What answering probes needs (shared with the accept loop).
pub(crate) struct ProbeCtx {
    key: SecretKey,
    identity: Arc<TlsIdentity>,
    status: watch::Receiver<Arc<NatStatus>>,
    replay: Mutex<ReplayCache>,
    events: mpsc::Sender<NatEvent>,
    /// The tree's neighbours and contacts (the probe candidates): referred to probers.
    candidates: watch::Receiver<Vec<(Option<PublicKey>, String)>>,
    /// Recent probers that came from the address they advertise (so are directly
    /// reachable there): referred to other probers. At most [`MAX_KNOWN_PROBERS`].
    probers: Mutex<Vec<(Referral, Instant)>>,
    /// Datagrams on the beacon port dropped before a signature check (not in [`NatStatus`],
    /// so that a flood of them does not wake the node actor).
    pub(crate) beacons_dropped: AtomicU64,
    /// Gateway claims in LAN beacons without a proof we could check (not believed).
    pub(crate) gateway_claims_unproven: AtomicU64,
    clock: Arc<NetClock>,
}

/// Beacon sources whose rate is tracked: a /24 LAN has at most 254 hosts.
const MAX_BEACON_SOURCES: usize = 256;
/// A source's beacons are verified at most this often: nodes beacon once a second (each cell
/// on its own port), so a faster sender is flooding.
const BEACON_MIN_GAP: Duration = Duration::from_millis(500);
/// Beacon signature checks per second in total (against spoofed source addresses): two per
/// second from each of 32 LAN nodes; an ECDSA verification costs about 0.1-0.5 ms on a Pi.
const MAX_BEACON_VERIFIES_PER_SEC: u32 = 64;

/// Direct probers an observer remembers for referral. A small network has a handful; a big
/// one has witnesses enough without referrals, so the oldest simply make room.
const MAX_KNOWN_PROBERS: usize = 16;
/// How long a prober stays worth referring: decided nodes probe every 30 s, so two missed
/// rounds mean it is gone or no longer direct.
const PROBER_TTL: Duration = Duration::from_secs(90);
/// Referred witnesses a prober keeps asking at most (all observers' referrals together):
/// bounds what observers can make it dial, and is twice the second witness it needs.
const MAX_REFERRED: usize = 8;
/// How long a referred witness is kept without being referred again.
const REFERRED_TTL: Duration = Duration::from_secs(10 * 60);

/// Dial-back proofs a node keeps (one per observer and address, newest kept).
const MAX_PROOFS_KEPT: usize = 4;

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A tentative role (one witness) probes every `probe_every` times this (10 s by default):
/// five times as often as a decided node, so a second witness confirms it soon after it
/// appears, yet a small network's lone public node is probed once per 10 s per node.
const TENTATIVE_PROBE_FACTOR: u32 = 5;
const MAX_PROBES_PER_ROUND: usize = 6;
const NET_RECHECK: Duration = Duration::from_secs(3);

/// Start the reachability task. `candidates` yields the peers worth probing (the tree's
/// neighbours and contacts), read at every probe round.
pub fn spawn(
    cfg: NatConfig,
    key: SecretKey,
    identity: Arc<TlsIdentity>,
    candidates: watch::Receiver<Vec<(Option<PublicKey>, String)>>,
) -> NatHandle {
    let (events_tx, events_rx) = mpsc::channel(256);
    let (status_tx, status_rx) = watch::channel(Arc::new(NatStatus::initial(&cfg)));
    let probe_ctx = Arc::new(ProbeCtx {
        key: key.clone(),
        identity: identity.clone(),
        status: status_rx.clone(),
        replay: Mutex::new(ReplayCache::default()),
        events: events_tx.clone(),
        candidates: candidates.clone(),
        probers: Mutex::new(Vec::new()),
        beacons_dropped: AtomicU64::new(0),
        gateway_claims_unproven: AtomicU64::new(0),
        clock: cfg.clock.clone(),
    });
    let net = crate::localnet::read();
    let now = cfg.clock.mono_ms();
    let task = NatTask {
        reach: Reach::new(cfg.rules, key.public(), net, now),
        cfg,
        key,
        candidates,
        events: events_tx.clone(),
        status: status_tx,
        started: Instant::now(),
        mapping: None,
        map_busy: false,
        map_protocol: None,
        next_renew: None,
        probing: false,
        next_probe: Instant::now(),
        tokens: HashMap::new(),
        referred: Vec::new(),
        proofs: Vec::new(),
        beacon_sources: HashMap::new(),
        beacon_window: (Instant::now(), 0),
        last: None,
        probes_sent: 0,
        probes_answered: 0,
        decided_after_ms: None,
        ctx: probe_ctx.clone(),
    };
    tokio::spawn(task.run(events_rx));
    NatHandle {
        events: events_tx,
        status: status_rx,
        probe_ctx,
    }
}

struct NatTask {
    cfg: NatConfig,
    key: SecretKey,
    reach: Reach,
    candidates: watch::Receiver<Vec<(Option<PublicKey>, String)>>,
    events: mpsc::Sender<NatEvent>,
    status: watch::Sender<Arc<NatStatus>>,
    started: Instant,
    mapping: Option<PortMapping>,
    map_busy: bool,
    map_protocol: Option<String>,
    next_renew: Option<Instant>,
    probing: bool,
    next_probe: Instant,
    /// Dial-back tokens we handed out: token -> address under test.
    tokens: HashMap<String, (SocketAddr, Instant)>,
    /// Witnesses observers referred us to (at most [`MAX_REFERRED`]), with when.
    referred: Vec<(Referral, Instant)>,
    /// Dial-backs that came in with our tokens, newest last (at most [`MAX_PROOFS_KEPT`]):
    /// (observer, address reached, its sealed `nat.reached`, when).
    proofs: Vec<(PublicKey, SocketAddr, String, Instant)>,
    /// Beacon sources by IP: when we last checked one's signature (at most
    /// [`MAX_BEACON_SOURCES`]).
    beacon_sources: HashMap<IpAddr, Instant>,
    /// This second's signature checks of beacons: (start, count).
    beacon_window: (Instant, u32),
    last: Option<Decision>,
    probes_sent: u64,
    probes_answered: u64,
    decided_after_ms: Option<u64>,
    ctx: Arc<ProbeCtx>,
}

impl NatTask {
    async fn run(mut self, mut events: mpsc::Receiver<NatEvent>) {
        let beacon = if self.cfg.beacons {
            match beacon_socket(self.cfg.listen.port()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(
                        "LAN beacons off: cannot bind UDP port {}: {e}",
                        self.cfg.listen.port()
                    );
                    None
                }
            }
        } else {
            None
        };
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_beacon = Instant::now();
        let mut next_net = Instant::now() + NET_RECHECK;
        let mut buf = vec![0u8; 4096];
        loop {
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else { return };
                    if let NatEvent::Shutdown(done) = ev {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    self.on_event(ev);
                }
                got = recv_beacon(beacon.as_ref(), &mut buf) => {
                    if let Some((n, from)) = got {
                        self.on_beacon(&buf[..n], from);
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    if now >= next_net {
                        next_net = now + NET_RECHECK;
                        let net = crate::localnet::read();
                        if net != *self.reach.net() {
                            tracing::info!(cell = %self.cfg.cell, "local network changed: {net:?}");
                            self.drop_mapping().await;
                            self.reach.set_net(net, self.cfg.clock.mono_ms());
                            self.referred.clear();
                            self.next_probe = now;
                        }
                    }
                    if let Some(sock) = beacon.as_ref() {
                        if now >= next_beacon {
                            next_beacon = now + self.cfg.beacon_every;
                            self.send_beacon(sock).await;
                        }
                    }
                    self.maintain();
                }
            }
            self.publish();
        }
    }

    fn on_event(&mut self, ev: NatEvent) {
        let now = self.cfg.clock.mono_ms();
        match ev {
            NatEvent::Evidence {
                observer,
                from_ip,
                evidence,
            } => self.reach.observe(now, observer, from_ip, evidence),
            NatEvent::ObserverRole { key, addr, role } => {
                self.reach.observer_role(now, key, addr, role)
            }
            NatEvent::DialedBack {
                observer,
                from_ip,
                addr,
                token,
                proof,
            } => {
                if self.tokens.get(&token).is_some_and(|(a, _)| *a == addr) {
                    self.reach
                        .observe(now, observer, from_ip, Evidence::Reached { addr });
                    if proof.len() <= MAX_PROOF_BYTES {
                        self.proofs
                            .retain(|(o, a, _, _)| !(*o == observer && *a == addr));
                        if self.proofs.len() >= MAX_PROOFS_KEPT {
                            self.proofs.remove(0);
                        }
                        self.proofs.push((observer, addr, proof, Instant::now()));
                    }
                }
            }
            NatEvent::Referred { by, peers } => {
                let me = self.key.public();
                let net = self.reach.net().clone();
                let mut fresh = false;
                for r in peers {
                    if r.key == me
                        || r.key == by
                        || is_private(r.addr.ip())
                        || net.is_on_private_lan(r.addr.ip())
                        || r.addr.ip().is_unspecified()
                    {
                        continue;
                    }
                    if let Some(e) = self.referred.iter_mut().find(|(e, _)| e.key == r.key) {
                        *e = (r, Instant::now());
                        continue;
                    }
                    if self.referred.len() >= MAX_REFERRED {
                        continue;
                    }
                    self.referred.push((r, Instant::now()));
                    fresh = true;
                }
                // Ask a new witness now rather than in 30 s: a small network is waiting on it.
                if fresh && !self.probing {
                    self.next_probe = Instant::now();
                }
            }
            NatEvent::ProbeRoundDone { sent, answered } => {
                self.probing = false;
                self.probes_sent += sent;
                self.probes_answered += answered;
            }
            NatEvent::Mapped(result) => {
                self.map_busy = false;
                match result {
                    Ok(m) => {
                        tracing::info!(cell = %self.cfg.cell, "port mapped: {} via {}", m.external(), m.protocol());
                        self.reach.set_map(MapState::Mapped {
                            external: m.external(),
                            protocol: m.protocol().to_string(),
                            since: now,
                        });
                        self.map_protocol = Some(m.protocol().to_string());
                        self.next_renew = Some(Instant::now() + m.lease() / 3);
                        self.mapping = Some(m);
                        // Ask the observers to come in through the mapping right away.
                        self.next_probe = Instant::now();
                    }
                    Err(reason) => {
                        tracing::info!(cell = %self.cfg.cell, "router maps no port: {reason}");
                        self.reach.set_map(MapState::Refused { reason, at: now });
                    }
                }
            }
            NatEvent::Renewed(m, result) => {
                self.map_busy = false;
                match result {
                    Ok(()) => {
                        self.next_renew = Some(Instant::now() + m.lease() / 3);
                        self.mapping = Some(m);
                    }
                    Err(reason) => {
                        tracing::warn!(cell = %self.cfg.cell, "mapping renewal failed: {reason}");
                        self.mapping = None;
                        self.reach.set_map(MapState::Idle);
                    }
                }
            }
            NatEvent::Shutdown(_) => {}
        }
    }

    /// Whether a datagram deserves a signature check: cheap checks first (issue 9 item 8).
    /// From our own LAN only (a subnet of ours, not our own address), of our cell, speaking
    /// for the address it came from, and within the per-source and total rates.
    fn beacon_admitted(&mut self, bytes: &[u8], from: SocketAddr) -> bool {
        let ip = from.ip();
        let on_lan = self
            .reach
            .net()
            .addrs
            .iter()
            .any(|a| !a.ip.is_loopback() && a.contains(ip) && a.ip != ip);
        if !on_lan {
            return false;
        }
        match peek_beacon(bytes) {
            Some((cell, lan)) if cell == self.cfg.cell && lan.ip() == ip => {}
            _ => return false,
        }
        let now = Instant::now();
        if now.saturating_duration_since(self.beacon_window.0) >= Duration::from_secs(1) {
            self.beacon_window = (now, 0);
        }
        if self.beacon_window.1 >= MAX_BEACON_VERIFIES_PER_SEC {
            return false;
        }
        if let Some(last) = self.beacon_sources.get(&ip) {
            if now.saturating_duration_since(*last) < BEACON_MIN_GAP {
                return false;
            }
        } else if self.beacon_sources.len() >= MAX_BEACON_SOURCES {
            let ttl = Duration::from_millis(self.cfg.rules.beacon_ttl_ms);
            self.beacon_sources
                .retain(|_, at| now.saturating_duration_since(*at) < ttl);
            if self.beacon_sources.len() >= MAX_BEACON_SOURCES {
                return false;
            }
        }
        self.beacon_sources.insert(ip, now);
        self.beacon_window.1 += 1;
        true
    }

    fn on_beacon(&mut self, bytes: &[u8], from: SocketAddr) {
        if !self.beacon_admitted(bytes, from) {
            self.ctx.beacons_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = self.cfg.clock.mono_ms();
        let env = {
            let mut replay = self.ctx.replay.lock().unwrap_or_else(|e| e.into_inner());
            match envelope::open(bytes, self.cfg.clock.now_ms(), &mut replay) {
                Ok(e) => e.into_inner(),
                Err(_) => return,
            }
        };
        if env.from == self.key.public() {
            return;
        }
        let Ok(ReachMsg::Beacon {
            cell,
            lan,
            router,
            role,
            external,
            map,
            proofs,
        }) = ReachMsg::from_kind_body(&env.kind, &env.body)
        else {
            return;
        };
        // A beacon speaks only for the address it came from.
        if cell != self.cfg.cell || lan.ip() != from.ip() {
            return;
        }
        let vouched = role == Role::Gateway
            && external.is_some_and(|ext| self.vouched(&env.from, ext, &proofs));
        if role == Role::Gateway && !vouched {
            self.ctx
                .gateway_claims_unproven
                .fetch_add(1, Ordering::Relaxed);
        }
        self.reach.lan_peer(LanPeer {
            key: env.from,
            lan_addr: lan,
            router,
            role,
            external,
            map_refused: map == BeaconMap::Refused,
            vouched,
            at: now,
        });
    }

    /// Whether one of a gateway claim's proofs shows an observer of ours reached `claimant`
    /// at `external` (at most [`MAX_BEACON_PROOFS`] signature checks, none for a signer that
    /// is not one of our observers).
    fn vouched(&self, claimant: &PublicKey, external: SocketAddr, proofs: &[String]) -> bool {
        let now_ms = self.cfg.clock.now_ms();
        let ttl = self.cfg.rules.evidence_ttl_ms;
        proofs.iter().any(|p| {
            borg_proto::reach::proof::check(p, claimant, external, now_ms, ttl, |k| {
                self.reach.is_observer(k)
            })
            .inspect_err(|e| tracing::debug!("gateway proof from {claimant} refused: {e}"))
            .is_ok()
        })
    }

    async fn send_beacon(&self, sock: &UdpSocket) {
        let st = self.status.borrow().clone();
        let d = &st.decision;
        let lan = match self.my_lan_ip() {
            Some(ip) => SocketAddr::new(ip, self.cfg.listen.port()),
            None => return,
        };
        let external = match (d.role, d.advertise) {
            (Role::Gateway, PeerAddr::Direct(a)) => Some(a),
            _ => None,
        };
        let map = match st.map {
            MapState::Idle => BeaconMap::None,
            MapState::Trying { .. } => BeaconMap::Trying,
            MapState::Mapped { .. } => BeaconMap::Mapped,
            MapState::Refused { .. } => BeaconMap::Refused,
        };
        // A gateway's evidence: the newest dial-backs through its external address.
        let proofs = external
            .map(|ext| {
                self.proofs
                    .iter()
                    .rev()
                    .filter(|p| p.1 == ext)
                    .take(MAX_BEACON_PROOFS)
                    .map(|p| p.2.clone())
                    .collect()
            })
            .unwrap_or_default();
        let msg = ReachMsg::Beacon {
            cell: self.cfg.cell.clone(),
            lan,
            router: self.reach.net().router,
            role: d.role,
            external,
            map,
            proofs,
        };
        let (kind, body) = msg.to_kind_body();
        let bytes = envelope::seal(
            &self.key,
            &kind,
            Some(&d.advertise.to_string()),
            self.cfg.clock.now_ms(),
            body,
        )
        .to_bytes();
        for b in crate::localnet::broadcast_addrs() {
            let _ = sock
                .send_to(
                    &bytes,
                    SocketAddr::new(IpAddr::V4(b), self.cfg.listen.port()),
                )
                .await;
        }
    }

    fn my_lan_ip(&self) -> Option<IpAddr> {
        if let Some(ip) = self.cfg.rules.listen_ip {
            return Some(ip);
        }
        let net = self.reach.net();
        let on_router = net.router.and_then(|r| {
            net.addrs
                .iter()
                .find(|a| a.contains(r) && !a.ip.is_loopback())
        });
        on_router
            .or_else(|| net.addrs.iter().find(|a| !a.ip.is_loopback()))
            .map(|a| a.ip)
    }

    /// Probing, mapping and renewal, as the current decision asks.
    fn maintain(&mut self) {
        let now = self.cfg.clock.mono_ms();
        self.reach.expire(now);
        self.tokens
            .retain(|_, (_, at)| at.elapsed() < Duration::from_secs(60));
        self.referred.retain(|(_, at)| at.elapsed() < REFERRED_TTL);
        let proof_ttl = Duration::from_millis(self.cfg.rules.evidence_ttl_ms);
        self.proofs.retain(|p| p.3.elapsed() < proof_ttl);
        let d = self.reach.decide(now, self.cfg.fallback);

        // Mapping.
        if self.cfg.port_mapping && !self.map_busy {
            if d.want_mapping
                && self.mapping.is_none()
                && matches!(self.reach.map_state(), MapState::Idle)
            {
                self.start_mapping(now);
            } else if self.mapping.is_some()
                && (!d.want_mapping || self.reach.mapping_unverified_too_long(now))
            {
                let reason = if d.want_mapping {
                    "mapped, but no outside peer could reach the mapping (double NAT?)".to_string()
                } else {
                    "another node holds the LAN's mapping".to_string()
                };
                if let Some(m) = self.mapping.take() {
                    tokio::spawn(async move {
                        let _ = m.remove().await;
                    });
                }
                self.map_protocol = None;
                self.reach.set_map(if d.want_mapping {
                    MapState::Refused { reason, at: now }
                } else {
                    MapState::Idle
                });
            } else if let (Some(at), Some(_)) = (self.next_renew, self.mapping.as_ref()) {
                if Instant::now() >= at {
                    if let Some(mut m) = self.mapping.take() {
                        self.map_busy = true;
                        let events = self.events.clone();
                        tokio::spawn(async move {
                            let r = m.renew().await.map_err(|e| e.to_string());
                            let _ = events.send(NatEvent::Renewed(m, r)).await;
                        });
                    }
                }
            }
        }

        // Probing.
        if !self.probing && Instant::now() >= self.next_probe {
            let every = if d.role == Role::Probing
                || self.mapping.is_some() && !self.reach.mapping_verified()
            {
                self.cfg.probe_every
            } else if d.tentative {
                // One witness so far: look for the second more often than a decided node.
                self.cfg.probe_every * TENTATIVE_PROBE_FACTOR
            } else {
                self.cfg.probe_every * 15
            };
            self.next_probe = Instant::now() + every;
            self.start_probe_round();
        }
    }

    fn start_mapping(&mut self, now: u64) {
        let net = self.reach.net();
        let (Some(IpAddr::V4(gateway)), Some(IpAddr::V4(local_ip))) =
            (net.router, self.my_lan_ip())
        else {
            self.reach.set_map(MapState::Refused {
                reason: "no IPv4 router to ask".into(),
                at: now,
            });
            return;
        };
        self.map_busy = true;
        self.reach.set_map(MapState::Trying { since: now });
        let req = MapRequest {
            gateway,
            local_ip,
            internal_port: self.cfg.listen.port(),
            external_port: self.cfg.listen.port(),
            lease: self.cfg.lease,
            timeout: Duration::from_millis(1500),
            description: format!("BorgIOS {}", self.cfg.cell),
        };
        let events = self.events.clone();
        tokio::spawn(async move {
            let r = portmap::map_tcp(&req).await.map_err(|e| e.to_string());
            let _ = events.send(NatEvent::Mapped(r)).await;
        });
    }

    fn start_probe_round(&mut self) {
        let net = self.reach.net().clone();
        let me = self.key.public();
        let mut targets: Vec<(Option<PublicKey>, SocketAddr)> = Vec::new();
        // Contacts and tree neighbours first, then the witnesses observers referred us to.
        let mut all: Vec<(Option<PublicKey>, PeerAddr)> = self
            .candidates
            .borrow()
            .iter()
            .filter_map(|(k, a)| Some((*k, a.parse::<PeerAddr>().ok()?)))
            .collect();
        all.extend(
            self.referred
                .iter()
                .map(|(r, _)| (Some(r.key), PeerAddr::Direct(r.addr))),
        );
        for (key, addr) in all.iter() {
            if key.is_some_and(|k| k == me) {
                continue;
            }
            let PeerAddr::Direct(sock) = *addr else {
                continue;
            };
            if net.is_on_private_lan(sock.ip()) || sock.ip().is_unspecified() {
                continue;
            }
            if targets
                .iter()
                .any(|(k, a)| *a == sock || key.is_some() && k == key)
            {
                continue;
            }
            targets.push((*key, sock));
            if targets.len() >= MAX_PROBES_PER_ROUND {
                break;
            }
        }
        if targets.is_empty() {
            return;
        }
        // Dial-back: the mapping under test, else our own address (only a node with a public
        // address can be dialed back at it; observers refuse other IPs).
        // Behind NAT, ask to be dialed at the external IP on our own port: that reaches us only
        // if the router forwards the port to this node (set up by hand).
        let external_ip = self
            .reach
            .decide(self.cfg.clock.mono_ms(), self.cfg.fallback)
            .external_ip
            .filter(|ip| !net.is_mine(*ip));
        let dialback = match (self.reach.map_state(), external_ip) {
            (MapState::Mapped { external, .. }, _) => Some(*external),
            (_, Some(ip)) => Some(SocketAddr::new(ip, self.cfg.listen.port())),
            _ => self
                .my_lan_ip()
                .map(|ip| SocketAddr::new(ip, self.cfg.listen.port())),
        };
        let bind_ip = if self.cfg.listen.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            self.cfg.listen.ip()
        };
        let bind = SocketAddr::new(bind_ip, self.cfg.listen.port().wrapping_add(1));
        let mut jobs = Vec::new();
        for (key, addr) in targets {
            let token = random_token();
            if let Some(d) = dialback {
                self.tokens.insert(token.clone(), (d, Instant::now()));
            }
            jobs.push((key, addr, token));
        }
        self.probing = true;
        let ctx = self.ctx.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let (mut sent, mut answered) = (0, 0);
            // One at a time: they share the source port.
            for (key, addr, token) in jobs {
                sent += 1;
                match probe_one(&ctx, key, addr, bind, dialback, token).await {
                    Ok(()) => answered += 1,
                    Err(e) => tracing::debug!("probe of {addr} failed: {e}"),
                }
            }
            let _ = events
                .send(NatEvent::ProbeRoundDone { sent, answered })
                .await;
        });
    }

    async fn drop_mapping(&mut self) {
        if let Some(m) = self.mapping.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), m.remove()).await;
        }
        self.map_protocol = None;
        self.reach.set_map(MapState::Idle);
    }

    async fn shutdown(&mut self) {
        if let Some(m) = self.mapping.take() {
            let ext = m.external();
            match tokio::time::timeout(Duration::from_secs(3), m.remove()).await {
                Ok(Ok(())) => tracing::info!(cell = %self.cfg.cell, "port mapping {ext} removed"),
                Ok(Err(e)) => {
                    tracing::warn!(cell = %self.cfg.cell, "removing port mapping {ext}: {e}")
                }
                Err(_) => {
                    tracing::warn!(cell = %self.cfg.cell, "removing port mapping {ext}: timed out")
                }
            }
        }
    }

    fn publish(&mut self) {
        let now = self.cfg.clock.mono_ms();
        let mut d = self.reach.decide(now, self.cfg.fallback);
        // While a decided node re-decides (e.g. its gateway just died), keep advertising the
        // last address that worked rather than an unreachable LAN address.
        if d.role == Role::Probing {
            if let Some(last) = self.last.as_ref() {
                d.advertise = last.advertise;
            }
        } else {
            if self.decided_after_ms.is_none() {
                self.decided_after_ms = Some(self.started.elapsed().as_millis() as u64);
                tracing::info!(cell = %self.cfg.cell, "NAT role {} after {} ms: {}", d.role, self.decided_after_ms.unwrap_or(0), d.reason);
            } else if self.last.as_ref().is_some_and(|l| {
                l.role != d.role || l.advertise != d.advertise || l.tentative != d.tentative
            }) {
                tracing::info!(cell = %self.cfg.cell, "NAT role {} at {}: {}", d.role, d.advertise, d.reason);
            }
            self.last = Some(d.clone());
        }
        let st = NatStatus {
            decision: d,
            map: self.reach.map_state().clone(),
            map_protocol: self.map_protocol.clone(),
            net: self.reach.net().clone(),
            // Without the time heard, so that a beacon that changes nothing wakes nobody.
            lan: self
                .reach
                .lan_peers(now)
                .map(|p| LanPeer { at: 0, ..p.clone() })
                .collect(),
            decided_after_ms: self.decided_after_ms,
            probes_sent: self.probes_sent,
            probes_answered: self.probes_answered,
        };
        // Wake the node actor only when something changed.
        self.status.send_if_modified(|old| {
            if **old != st {
                *old = Arc::new(st);
                true
            } else {
                false
            }
        });
    }
}

fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn relay_token() -> String {
    random_token()
}

fn beacon_socket(port: u16) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Every cell of the host, and every test node in its namespace, binds the wildcard.
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_broadcast(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port).into())?;
    UdpSocket::from_std(s.into())
}

async fn recv_beacon(sock: Option<&UdpSocket>, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}

/// Errors of one probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("transport: {0}")]
    Transport(#[from] conn::TransportError),
    #[error("frame: {0}")]
    Frame(#[from] crate::frame::FrameError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before an answer")]
    Closed,
    #[error("answer rejected: {0}")]
    Rejected(String),
}

fn seal(ctx: &ProbeCtx, msg: &ReachMsg, addr: &str) -> Vec<u8> {
    let (kind, body) = msg.to_kind_body();
    envelope::seal(&ctx.key, &kind, Some(addr), ctx.clock.now_ms(), body).to_bytes()
}

/// Open a verified reachability message from `conn`'s peer, with the address it advertises.
fn open_from(
    ctx: &ProbeCtx,
    conn_key: PublicKey,
    bytes: &[u8],
) -> Result<(ReachMsg, Option<String>), ProbeError> {
    let env = {
        let mut replay = ctx.replay.lock().unwrap_or_else(|e| e.into_inner());
        envelope::open(bytes, ctx.clock.now_ms(), &mut replay)
            .map_err(|e| ProbeError::Rejected(e.to_string()))?
            .into_inner()
    };
    if env.from != conn_key {
        return Err(ProbeError::Rejected(
            "signed by another key than the TLS peer".into(),
        ));
    }
    let msg = ReachMsg::from_kind_body(&env.kind, &env.body)
        .map_err(|e| ProbeError::Rejected(e.to_string()))?;
    Ok((msg, env.addr))
}

async fn recv_within(conn: &mut PeerConn, t: Duration) -> Result<Vec<u8>, ProbeError> {
    match tokio::time::timeout(t, conn.recv()).await {
        Err(_) => Err(ProbeError::Timeout(t)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(None)) => Err(ProbeError::Closed),
        Ok(Ok(Some(b))) => Ok(b),
    }
}

/// Probe one observer: what does it see, and can it come back in?
async fn probe_one(
    ctx: &ProbeCtx,
    key: Option<PublicKey>,
    addr: SocketAddr,
    bind: SocketAddr,
    dialback: Option<SocketAddr>,
    token: String,
) -> Result<(), ProbeError> {
    // The fixed source port lets observers' reports be compared; if it is taken (another
    // program, or a probe still closing), probe from any port rather than not at all.
    let (mut conn, local) =
        match conn::connect_probe(addr, key, Some(bind), &ctx.identity, PROBE_TIMEOUT).await {
            Err(conn::TransportError::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse
                    || source.kind() == std::io::ErrorKind::AddrNotAvailable =>
            {
                conn::connect_probe(addr, key, None, &ctx.identity, PROBE_TIMEOUT).await?
            }
            other => other?,
        };
    let observer = conn.peer_key();
    let my_addr = ctx.status.borrow().decision.advertise.to_string();
    let probe = ReachMsg::Probe {
        reached: addr,
        dialback,
        token,
    };
    conn.send(&seal(ctx, &probe, &my_addr)).await?;
    let bytes = recv_within(&mut conn, PROBE_TIMEOUT).await?;
    let (
        ReachMsg::Seen {
            seen,
            role,
            addr: their,
            peers,
        },
        _,
    ) = open_from(ctx, observer, &bytes)?
    else {
        return Err(ProbeError::Rejected("expected nat.seen".into()));
    };
    let _ = ctx
        .events
        .send(NatEvent::Evidence {
            observer,
            from_ip: addr.ip(),
            evidence: Evidence::Seen {
                seen,
                local_port: local.port(),
            },
        })
        .await;
    if !peers.is_empty() {
        let _ = ctx
            .events
            .send(NatEvent::Referred {
                by: observer,
                peers,
            })
            .await;
    }
    // A relay candidate must be reachable where it says it is: where we just reached it.
    if their == PeerAddr::Direct(addr) {
        let _ = ctx
            .events
            .send(NatEvent::ObserverRole {
                key: observer,
                addr,
                role,
            })
            .await;
    }
    // The observer closes once its dial-back is done (bounded by its own timeout).
    let _ = tokio::time::timeout(PROBE_TIMEOUT + Duration::from_secs(1), conn.recv()).await;
    Ok(())
}

/// Answer a probe or a dial-back that arrived on our listener.
pub(crate) async fn answer_probe(ctx: Arc<ProbeCtx>, mut conn: PeerConn) {
    if let Err(e) = answer_probe_inner(&ctx, &mut conn).await {
        tracing::debug!("probe from {} refused: {e}", conn.remote_addr());
    }
    let (_, mut w) = conn.into_split();
    let _ = w.shutdown().await;
}

async fn answer_probe_inner(ctx: &ProbeCtx, conn: &mut PeerConn) -> Result<(), ProbeError> {
    let prober = conn.peer_key();
    let remote = conn.remote_addr();
    let bytes = recv_within(conn, PROBE_TIMEOUT).await?;
    let (msg, prober_addr) = open_from(ctx, prober, &bytes)?;
    match msg {
        ReachMsg::Probe {
            reached,
            dialback,
            token,
        } => {
            let _ = ctx
                .events
                .send(NatEvent::Evidence {
                    observer: prober,
                    from_ip: remote.ip(),
                    evidence: Evidence::Reached { addr: reached },
                })
                .await;
            let (role, addr) = {
                let st = ctx.status.borrow();
                (st.decision.role, st.decision.advertise)
            };
            let peers = ctx.referrals(prober, remote.ip());
            ctx.remember_prober(prober, remote, prober_addr.as_deref());
            let seen = ReachMsg::Seen {
                seen: remote,
                role,
                addr,
                peers,
            };
            conn.send(&seal(ctx, &seen, &addr.to_string())).await?;
            // Dial back only to the IP the probe came from: nobody can aim us at a third party.
            if let Some(target) = dialback.filter(|d| d.ip() == remote.ip()) {
                let (mut back, _) =
                    conn::connect_probe(target, Some(prober), None, &ctx.identity, PROBE_TIMEOUT)
                        .await?;
                let msg = ReachMsg::Reached {
                    addr: target,
                    token,
                    to: prober,
                };
                back.send(&seal(ctx, &msg, &addr.to_string())).await?;
                let _ = tokio::time::timeout(PROBE_TIMEOUT, back.recv()).await;
            }
            Ok(())
        }
        ReachMsg::Reached { addr, token, to } => {
            let _ = prober_addr;
            if to != ctx.key.public() {
                return Err(ProbeError::Rejected("a dial-back for another key".into()));
            }
            let _ = ctx
                .events
                .send(NatEvent::DialedBack {
                    observer: prober,
                    from_ip: remote.ip(),
                    addr,
                    token,
                    proof: String::from_utf8_lossy(&bytes).into_owned(),
                })
                .await;
            Ok(())
        }
        _ => Err(ProbeError::Rejected("not a probe".into())),
    }
}

impl ProbeCtx {
    /// Other nodes a prober at `prober_ip` could ask: tree neighbours, contacts and recent
    /// probers we know at a direct, non-private address; never the prober itself, nor anyone
    /// at its IP (they are no independent witness for it), at most [`MAX_REFERRALS`].
    fn referrals(&self, prober: PublicKey, prober_ip: IpAddr) -> Vec<Referral> {
        let me = self.key.public();
        let mut out: Vec<Referral> = Vec::new();
        let neighbours: Vec<Referral> = self
            .candidates
            .borrow()
            .iter()
            .filter_map(|(k, a)| match (k, a.parse::<PeerAddr>()) {
                (Some(key), Ok(PeerAddr::Direct(addr))) => Some(Referral { key: *key, addr }),
                _ => None,
            })
            .collect();
        let probers: Vec<Referral> = {
            let known = self.probers.lock().unwrap_or_else(|e| e.into_inner());
            known
                .iter()
                .rev()
                .filter(|(_, at)| at.elapsed() < PROBER_TTL)
                .map(|(r, _)| *r)
                .collect()
        };
        for r in neighbours.into_iter().chain(probers) {
            if out.len() >= MAX_REFERRALS {
                break;
            }
            let ip = r.addr.ip();
            if r.key == me
                || r.key == prober
                || ip == prober_ip
                || is_private(ip)
                || ip.is_unspecified()
                || out.iter().any(|o| o.key == r.key || o.addr == r.addr)
            {
                continue;
            }
            out.push(r);
        }
        out
    }

    /// Remember a prober that came from the very address it advertises (so it takes
    /// connections there), for referral to later probers.
    fn remember_prober(&self, key: PublicKey, remote: SocketAddr, advertised: Option<&str>) {
        let Some(Ok(PeerAddr::Direct(addr))) = advertised.map(str::parse::<PeerAddr>) else {
            return;
        };
        if addr.ip() != remote.ip() || is_private(addr.ip()) {
            return;
        }
        let mut known = self.probers.lock().unwrap_or_else(|e| e.into_inner());
        known.retain(|(r, at)| r.key != key && at.elapsed() < PROBER_TTL);
        if known.len() >= MAX_KNOWN_PROBERS {
            known.remove(0);
        }
        known.push((Referral { key, addr }, Instant::now()));
    }
}

impl NatHandle {
    /// Remove the port mapping (if any) and stop the task; bounded by a few seconds.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.events.send(NatEvent::Shutdown(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }
}
