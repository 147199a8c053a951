//! Reachability (sans-IO): how other nodes reach this one, and the NAT role that follows.
//!
//! The I/O layer feeds a [`Reach`] with what it learns and asks it for a [`Decision`]:
//! - the local network ([`LocalNet`]: our addresses with their prefixes, and the router);
//! - evidence from probes of other nodes ([`Evidence`]): an observer saw our connection come
//!   from `ip:port` ("seen"), or reached us at an address ("reached");
//! - other nodes' self-reported roles ([`Reach::observer_role`]), e.g. from probe answers;
//! - LAN beacons of nodes on the same link ([`LanPeer`]);
//! - the state of our own port mapping on the router ([`MapState`]).
//!
//! Rules (DESIGN.md section 8; docs/NAT.md explains why):
//! - Evidence counts only from observers outside our own subnets, and a conclusion needs two
//!   *independent* observers: different keys seen from different IPs. One peer can never make
//!   a node believe it is public or learn a wrong external address.
//! - `public`: two independent observers reached us at one of our own addresses.
//! - Behind NAT: two independent observers saw our connections come from the same foreign IP.
//!   If the ports they saw for the same local source port differ, the NAT is symmetric.
//! - On a LAN behind NAT, exactly one node tries to map a port: the lowest key among the live
//!   LAN nodes that are not public and have not been refused by this router. It becomes
//!   `gateway` once an outside observer reached it through the mapping. The others are
//!   `relayed` through it. If the router maps nothing, every node on the LAN is relayed by a
//!   public peer chosen by rendezvous hashing (spreads the load, same answer every time).
//! - A small network may never offer two independent witnesses (one public node and a LAN
//!   behind one router is one witness for everybody). After [`ReachConfig::tentative_ms`]
//!   with one witness only, the node decides on it *tentatively* ([`Decision::tentative`]):
//!   `public` if that witness came in at our own, non-private address; otherwise its view of
//!   our external IP stands until a second witness confirms or contradicts it. A tentative
//!   conclusion never overrides a confirmed one, and it only ever replaces `local` (no path
//!   from outside at all), so one lying witness can at worst leave us as unreachable as we
//!   would be without it. docs/NAT.md ("Small networks") explains the trade-off.
//! - With no outside evidence after the settle time, the node is `local`: it serves its LAN's
//!   tree and advertises its LAN address.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::identity::PublicKey;

/// The NAT role of a node (DESIGN.md section 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Not decided yet: waiting for evidence or for the LAN's mapping attempt.
    Probing,
    /// Directly reachable at its own address.
    Public,
    /// Holds the LAN's port mapping and relays for the other nodes of its LAN.
    Gateway,
    /// Reached through a gateway on its LAN or a public relay it keeps a connection to.
    Relayed,
    /// No path from outside is known; serves the tree of its LAN.
    Local,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Probing => "probing",
            Role::Public => "public",
            Role::Gateway => "gateway",
            Role::Relayed => "relayed",
            Role::Local => "local",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Role {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "probing" => Role::Probing,
            "public" => Role::Public,
            "gateway" => Role::Gateway,
            "relayed" => Role::Relayed,
            "local" => Role::Local,
            _ => return Err(AddrError::Role(s.into())),
        })
    }
}

/// What the NAT in front of us does, as far as the evidence tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    Unknown,
    /// Observers see our own address: no translation.
    None,
    /// One local port keeps one external port whoever we talk to (port-preserving or cone).
    EndpointIndependent,
    /// The external port depends on the destination: hole punching would not work.
    Symmetric,
}

impl NatKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            NatKind::Unknown => "unknown",
            NatKind::None => "none",
            NatKind::EndpointIndependent => "endpoint_independent",
            NatKind::Symmetric => "symmetric",
        }
    }
}

/// Errors parsing addresses and roles.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("not an ip:port address: {0:?}")]
    Socket(String),
    #[error("bad node key in relayed address {0:?}")]
    Key(String),
    #[error("unknown NAT role {0:?}")]
    Role(String),
}

/// A node's advertised tree address: direct, or through a relay.
///
/// Text forms: `203.0.113.7:13300` and `203.0.113.7:13300/<node key>`; the second means
/// "connect to the relay at that address and ask for the node with that key". TLS then runs end
/// to end with the named node, so the relay sees only ciphertext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    Direct(SocketAddr),
    Relayed {
        relay: SocketAddr,
        target: PublicKey,
    },
}

impl PeerAddr {
    /// The socket address a dialer connects to.
    pub fn socket(&self) -> SocketAddr {
        match self {
            PeerAddr::Direct(a) => *a,
            PeerAddr::Relayed { relay, .. } => *relay,
        }
    }
    pub fn is_direct(&self) -> bool {
        matches!(self, PeerAddr::Direct(_))
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Direct(a) => write!(f, "{a}"),
            PeerAddr::Relayed { relay, target } => write!(f, "{relay}/{}", target.to_b64()),
        }
    }
}

impl serde::Serialize for PeerAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PeerAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for PeerAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (sock, key) = match s.split_once('/') {
            Some((a, k)) => (a, Some(k)),
            None => (s, None),
        };
        let sock: SocketAddr = sock.parse().map_err(|_| AddrError::Socket(s.into()))?;
        match key {
            None => Ok(PeerAddr::Direct(sock)),
            Some(k) => Ok(PeerAddr::Relayed {
                relay: sock,
                target: PublicKey::from_b64(k).map_err(|_| AddrError::Key(s.into()))?,
            }),
        }
    }
}

/// One local address and its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddr {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl LocalAddr {
    pub fn contains(&self, other: IpAddr) -> bool {
        match (self.ip, other) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// The local network as the kernel describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalNet {
    pub addrs: Vec<LocalAddr>,
    /// The default gateway (the home router), if there is one.
    pub router: Option<IpAddr>,
}

impl LocalNet {
    /// Whether `ip` is on our own private LAN (or loopback): a node there sees our LAN
    /// address, not what the outside sees, so it is no witness of our reachability. A
    /// neighbour on a public subnet (a data centre's /24) is a fine witness.
    pub fn is_on_private_lan(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || is_private(ip) && self.addrs.iter().any(|a| a.contains(ip))
    }
    pub fn is_mine(&self, ip: IpAddr) -> bool {
        self.addrs.iter().any(|a| a.ip == ip)
    }
}

/// What an observer told us about ourselves (after its envelope was verified).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// Our connection from local port `local_port` reached the observer from `seen`.
    Seen { seen: SocketAddr, local_port: u16 },
    /// The observer opened a connection to `addr` and it reached us.
    Reached { addr: SocketAddr },
}

#[derive(Debug, Clone, Copy)]
struct Observation {
    observer: PublicKey,
    /// The observer's IP as we see it (independence is judged on it).
    from_ip: IpAddr,
    evidence: Evidence,
    at: u64,
}

/// A node heard on our LAN (from its signed beacon).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanPeer {
    pub key: PublicKey,
    /// Its tree address on the LAN.
    pub lan_addr: SocketAddr,
    pub router: Option<IpAddr>,
    pub role: Role,
    /// For a gateway: the mapped address outsiders use.
    pub external: Option<SocketAddr>,
    /// It tried to map a port on `router` and was refused.
    pub map_refused: bool,
    /// Its beacon carried a proof ([`proof::check`]) that an observer of ours reached it
    /// at `external`: only then is its gateway claim believed.
    pub vouched: bool,
    pub at: u64,
}

impl LanPeer {
    /// A gateway claim with evidence: a claim alone would let any LAN device make the real
    /// gateway yield its mapping and draw the LAN's relayed traffic.
    pub fn believed_gateway(&self) -> bool {
        self.role == Role::Gateway && self.external.is_some() && self.vouched
    }
}

/// Our port mapping on the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapState {
    Idle,
    Trying {
        since: u64,
    },
    Mapped {
        external: SocketAddr,
        protocol: String,
        since: u64,
    },
    Refused {
        reason: String,
        at: u64,
    },
}

impl MapState {
    pub fn as_str(&self) -> &'static str {
        match self {
            MapState::Idle => "none",
            MapState::Trying { .. } => "trying",
            MapState::Mapped { .. } => "mapped",
            MapState::Refused { .. } => "refused",
        }
    }
}

/// Timing of the rules, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReachConfig {
    /// Our tree listen port.
    pub listen_port: u16,
    /// The IP we listen on, when it is one address rather than all of them.
    pub listen_ip: Option<IpAddr>,
    /// Evidence older than this is forgotten.
    pub evidence_ttl_ms: u64,
    /// A LAN peer not heard for this long is gone.
    pub beacon_ttl_ms: u64,
    /// With no outside evidence after this long, the role is `local`.
    pub settle_ms: u64,
    /// How long a refusal by the router stands before the mapping is tried again.
    pub refused_retry_ms: u64,
    /// How long a fresh mapping may wait for an outside observer to reach it.
    pub verify_ms: u64,
    /// With one independent witness only after this long, decide on its word tentatively.
    pub tentative_ms: u64,
    /// With no believed gateway on the LAN for this long, stop waiting for the mapping
    /// candidate and map too: a LAN device with the lowest key that never maps (keys and
    /// LAN addresses are free) must not keep the LAN unmapped. An honest candidate maps
    /// within a beacon TTL and is verified within `verify_ms`; of several gateways the
    /// higher keys yield.
    pub candidate_patience_ms: u64,
}

/// Default of [`ReachConfig::tentative_ms`]: two probe rounds (undecided nodes probe every
/// 2 s) and their answers, so that a second witness named in the first answers (a referral)
/// has been asked before we settle for one; and early enough that a relayed node has its
/// role, mapping attempt included (1.5-3 s), well inside the 10 s a join waits for it.
pub const TENTATIVE_AFTER_MS: u64 = 4_000;

impl ReachConfig {
    pub fn new(listen_port: u16) -> Self {
        Self {
            listen_port,
            listen_ip: None,
            evidence_ttl_ms: 10 * 60_000,
            beacon_ttl_ms: 3_500,
            settle_ms: 20_000,
            refused_retry_ms: 5 * 60_000,
            verify_ms: 15_000,
            tentative_ms: TENTATIVE_AFTER_MS,
            candidate_patience_ms: 30_000,
        }
    }
}

/// The relay a relayed node registers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayChoice {
    pub key: PublicKey,
    /// Where we connect to it (its LAN address for a gateway).
    pub dial: SocketAddr,
    /// Where others connect to it to reach us.
    pub public: SocketAddr,
}

/// What the node should be and do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub role: Role,
    pub nat: NatKind,
    /// Our address as the outside sees it (IP from the evidence; port of the mapping if any).
    pub external_ip: Option<IpAddr>,
    /// The tree address to advertise.
    pub advertise: PeerAddr,
    pub relay: Option<RelayChoice>,
    /// We are the LAN's mapping candidate and should hold (or try) a mapping.
    pub want_mapping: bool,
    /// Why, in a few words (shown on the console and in status).
    pub reason: String,
    /// The role rests on one independent witness only (a small network); a second witness
    /// confirms or overturns it.
    pub tentative: bool,
}

/// A probe target's role as it reported it, with the address we reached it at.
#[derive(Debug, Clone, Copy)]
struct ObserverInfo {
    addr: SocketAddr,
    role: Role,
    at: u64,
}

/// The reachability state of one node.
#[derive(Debug)]
pub struct Reach {
    cfg: ReachConfig,
    me: PublicKey,
    net: LocalNet,
    started: u64,
    observations: Vec<Observation>,
    observers: BTreeMap<PublicKey, ObserverInfo>,
    lan: BTreeMap<PublicKey, LanPeer>,
    map: MapState,
    /// When a believed gateway's beacon last came (0: never).
    gateway_seen_at: u64,
}

const MAX_OBSERVATIONS: usize = 256;
const MAX_LAN_PEERS: usize = 256;
const MAX_OBSERVERS: usize = 256;

impl Reach {
    pub fn new(cfg: ReachConfig, me: PublicKey, net: LocalNet, now: u64) -> Self {
        Self {
            cfg,
            me,
            net,
            started: now,
            observations: Vec::new(),
            observers: BTreeMap::new(),
            lan: BTreeMap::new(),
            map: MapState::Idle,
            gateway_seen_at: 0,
        }
    }

    pub fn config(&self) -> &ReachConfig {
        &self.cfg
    }
    pub fn net(&self) -> &LocalNet {
        &self.net
    }
    pub fn map_state(&self) -> &MapState {
        &self.map
    }

    /// The kernel's view changed (address, link or lease): old evidence no longer applies.
    pub fn set_net(&mut self, net: LocalNet, now: u64) {
        if net != self.net {
            self.net = net;
            self.observations.clear();
            self.observers.clear();
            self.lan.clear();
            self.map = MapState::Idle;
            self.started = now;
        }
    }

    /// Verified evidence from `observer`, whose connection came from `from_ip`. Observers on
    /// our own links are ignored: they cannot tell what the outside sees.
    pub fn observe(&mut self, now: u64, observer: PublicKey, from_ip: IpAddr, evidence: Evidence) {
        if observer == self.me || self.net.is_on_private_lan(from_ip) {
            return;
        }
        self.observations
            .retain(|o| !(o.observer == observer && same_kind(&o.evidence, &evidence)));
        if self.observations.len() >= MAX_OBSERVATIONS {
            self.observations.remove(0);
        }
        self.observations.push(Observation {
            observer,
            from_ip,
            evidence,
            at: now,
        });
    }

    /// An outside node answered a probe we sent to `addr`, naming its role.
    pub fn observer_role(&mut self, now: u64, key: PublicKey, addr: SocketAddr, role: Role) {
        if key == self.me || self.net.is_on_private_lan(addr.ip()) {
            return;
        }
        if self.observers.len() >= MAX_OBSERVERS && !self.observers.contains_key(&key) {
            return;
        }
        self.observers.insert(
            key,
            ObserverInfo {
                addr,
                role,
                at: now,
            },
        );
    }

    /// Whether `key` is an outside node we reached ourselves (a probe we sent answered):
    /// the only keys whose proofs of a LAN gateway we take.
    pub fn is_observer(&self, key: &PublicKey) -> bool {
        self.observers.contains_key(key)
    }

    /// A verified beacon from a node on our LAN.
    pub fn lan_peer(&mut self, peer: LanPeer) {
        if peer.key == self.me {
            return;
        }
        if peer.believed_gateway() {
            self.gateway_seen_at = self.gateway_seen_at.max(peer.at);
        }
        if self.lan.len() >= MAX_LAN_PEERS && !self.lan.contains_key(&peer.key) {
            return;
        }
        self.lan.insert(peer.key, peer);
    }

    pub fn set_map(&mut self, map: MapState) {
        self.map = map;
    }

    /// Live LAN peers (heard within the beacon TTL), for dialing them directly.
    pub fn lan_peers(&self, now: u64) -> impl Iterator<Item = &LanPeer> {
        let ttl = self.cfg.beacon_ttl_ms;
        self.lan
            .values()
            .filter(move |p| now.saturating_sub(p.at) <= ttl)
    }

    /// Forget what has expired.
    pub fn expire(&mut self, now: u64) {
        let ttl = self.cfg.evidence_ttl_ms;
        self.observations
            .retain(|o| now.saturating_sub(o.at) <= ttl);
        self.observers
            .retain(|_, o| now.saturating_sub(o.at) <= ttl);
        let lan_ttl = self.cfg.beacon_ttl_ms * 20;
        self.lan.retain(|_, p| now.saturating_sub(p.at) <= lan_ttl);
        if let MapState::Refused { at, .. } = self.map {
            if now.saturating_sub(at) > self.cfg.refused_retry_ms {
                self.map = MapState::Idle;
            }
        }
    }

    /// Whether an outside observer reached us through our mapping (proves the mapping works).
    pub fn mapping_verified(&self) -> bool {
        match &self.map {
            MapState::Mapped { external, .. } => self
                .observations
                .iter()
                .any(|o| matches!(o.evidence, Evidence::Reached { addr } if addr == *external)),
            _ => false,
        }
    }

    /// Whether a fresh mapping has waited too long for an outside observer.
    pub fn mapping_unverified_too_long(&self, now: u64) -> bool {
        match &self.map {
            MapState::Mapped { since, .. } => {
                !self.mapping_verified() && now.saturating_sub(*since) > self.cfg.verify_ms
            }
            _ => false,
        }
    }

    /// Distinct observers (by key and by IP) behind a set of observations.
    fn independent<'a>(obs: impl Iterator<Item = &'a Observation>) -> usize {
        let mut keys = Vec::new();
        let mut ips = Vec::new();
        let mut n = 0;
        for o in obs {
            if !keys.contains(&o.observer) && !ips.contains(&o.from_ip) {
                keys.push(o.observer);
                ips.push(o.from_ip);
                n += 1;
            }
        }
        n
    }

    /// Our own address that `min` independent observers reached, if any. With one witness
    /// only (`min` 1), a private address never counts: an outsider "reaching" our LAN address
    /// came through somebody's port forward, which proves nothing about the address itself.
    fn reached_directly(&self, min: usize) -> Option<SocketAddr> {
        let mut candidates: Vec<SocketAddr> = self
            .observations
            .iter()
            .filter_map(|o| match o.evidence {
                Evidence::Reached { addr }
                    if self.net.is_mine(addr.ip())
                        && addr.port() == self.cfg.listen_port
                        && (min >= 2 || !is_private(addr.ip())) =>
                {
                    Some(addr)
                }
                _ => None,
            })
            .collect();
        candidates.sort();
        candidates.dedup();
        candidates.into_iter().find(|addr| {
            let obs = self
                .observations
                .iter()
                .filter(|o| matches!(o.evidence, Evidence::Reached { addr: a } if a == *addr));
            Self::independent(obs) >= min.max(1)
        })
    }

    /// The external IP `min` independent observers agree on, and what the NAT does. With
    /// `min` 1 (one witness), observers that disagree cancel out: no IP at all.
    fn external(&self, min: usize) -> Option<(IpAddr, NatKind)> {
        let mut ips: Vec<IpAddr> = self
            .observations
            .iter()
            .filter_map(|o| match o.evidence {
                Evidence::Seen { seen, .. } => Some(seen.ip()),
                _ => None,
            })
            .collect();
        ips.sort();
        ips.dedup();
        // Prefer the IP seen most recently (a network change moves it).
        let mut agreed: Vec<(u64, IpAddr)> = ips
            .into_iter()
            .filter_map(|ip| {
                let obs: Vec<&Observation> = self
                    .observations
                    .iter()
                    .filter(
                        |o| matches!(o.evidence, Evidence::Seen { seen, .. } if seen.ip() == ip),
                    )
                    .collect();
                let newest = obs.iter().map(|o| o.at).max().unwrap_or(0);
                (Self::independent(obs.into_iter()) >= min.max(1)).then_some((newest, ip))
            })
            .collect();
        if min < 2 && agreed.len() > 1 {
            return None;
        }
        agreed.sort();
        let (_, ip) = agreed.pop()?;
        if self.net.is_mine(ip) {
            return Some((ip, NatKind::None));
        }
        // Same local port, different external ports across observers: symmetric.
        let mut by_local: BTreeMap<u16, Vec<u16>> = BTreeMap::new();
        for o in &self.observations {
            if let Evidence::Seen { seen, local_port } = o.evidence {
                if seen.ip() == ip {
                    by_local.entry(local_port).or_default().push(seen.port());
                }
            }
        }
        let comparable: Vec<&Vec<u16>> = by_local.values().filter(|v| v.len() >= 2).collect();
        let kind = if comparable.is_empty() {
            NatKind::Unknown
        } else if comparable.iter().any(|v| v.iter().any(|p| *p != v[0])) {
            NatKind::Symmetric
        } else {
            NatKind::EndpointIndependent
        };
        Some((ip, kind))
    }

    fn my_lan_addr(&self) -> Option<SocketAddr> {
        if let Some(ip) = self.cfg.listen_ip {
            return Some(SocketAddr::new(ip, self.cfg.listen_port));
        }
        // The address on the router's link, else the first non-loopback one.
        let on_router = self.net.router.and_then(|r| {
            self.net
                .addrs
                .iter()
                .find(|a| a.contains(r) && !a.ip.is_loopback())
        });
        let a = on_router.or_else(|| self.net.addrs.iter().find(|a| !a.ip.is_loopback()))?;
        Some(SocketAddr::new(a.ip, self.cfg.listen_port))
    }

    /// The rules, applied to what we know at `now`. `fallback` is the address to advertise
    /// when nothing better is known (the configured listen or advertise address).
    pub fn decide(&self, now: u64, fallback: SocketAddr) -> Decision {
        let direct = PeerAddr::Direct(self.my_lan_addr().unwrap_or(fallback));
        let mut d = Decision {
            role: Role::Probing,
            nat: NatKind::Unknown,
            external_ip: None,
            advertise: direct,
            relay: None,
            want_mapping: false,
            reason: String::new(),
            tentative: false,
        };
        if let Some(addr) = self.reached_directly(2) {
            d.role = Role::Public;
            d.nat = NatKind::None;
            d.external_ip = Some(addr.ip());
            d.advertise = PeerAddr::Direct(addr);
            d.reason = "two independent peers reached this node at its own address".into();
            return d;
        }
        let settled = now.saturating_sub(self.started) >= self.cfg.settle_ms;
        // A small network: one witness is all there is, after a wait for a second one.
        let one_witness_will_do = now.saturating_sub(self.started) >= self.cfg.tentative_ms;
        if one_witness_will_do {
            if let Some(addr) = self.reached_directly(1) {
                d.role = Role::Public;
                d.nat = NatKind::None;
                d.external_ip = Some(addr.ip());
                d.advertise = PeerAddr::Direct(addr);
                d.tentative = true;
                d.reason = "one peer reached this node at its own address (tentative: no second \
                            independent peer yet)"
                    .into();
                return d;
            }
        }
        let confirmed = self.external(2);
        let ext = confirmed.or_else(|| one_witness_will_do.then(|| self.external(1)).flatten());
        let Some((ext_ip, nat)) = ext else {
            if let Some(relay) = settled.then(|| self.public_relay()).flatten() {
                // Outsiders disagree on our address (one of them lies, or the network moved),
                // but a public peer we reached directly can still relay us.
                d.role = Role::Relayed;
                d.tentative = true;
                d.advertise = PeerAddr::Relayed {
                    relay: relay.public,
                    target: self.me,
                };
                d.relay = Some(relay);
                d.reason = "peers disagree on this node's address; relayed by a public peer".into();
            } else if settled {
                d.role = Role::Local;
                d.reason = "no peer outside this LAN has reported on this node".into();
            } else {
                d.reason = "waiting for two independent peers outside this LAN".into();
            }
            return d;
        };
        d.external_ip = Some(ext_ip);
        d.nat = nat;
        d.tentative = confirmed.is_none();
        let ttl = self.cfg.beacon_ttl_ms;
        let live: Vec<&LanPeer> = self
            .lan
            .values()
            .filter(|p| now.saturating_sub(p.at) <= ttl)
            .filter(|p| p.router == self.net.router)
            .collect();
        let router_refused =
            matches!(self.map, MapState::Refused { .. }) || live.iter().any(|p| p.map_refused);

        // Our own mapping, once an outsider came through it. Two nodes that mapped at once
        // (neither had heard the other yet) settle it: the higher key yields.
        let lower_gateway = live.iter().any(|p| p.believed_gateway() && p.key < self.me);
        if let MapState::Mapped { external, .. } = &self.map {
            if self.mapping_verified() && !lower_gateway {
                d.role = Role::Gateway;
                d.advertise = PeerAddr::Direct(*external);
                d.want_mapping = true;
                // An outsider came in through the mapping: that is the proof, not the IP.
                d.tentative = false;
                d.reason = "holds the LAN's port mapping; relays for the LAN".into();
                return d;
            }
        }
        // A port forwarded to us by hand: an outsider came in at the external IP on our own
        // port (the dial-back token proves it was our request).
        let forwarded = SocketAddr::new(ext_ip, self.cfg.listen_port);
        let reached_forwarded = self
            .observations
            .iter()
            .any(|o| matches!(o.evidence, Evidence::Reached { addr } if addr == forwarded));
        // Only on a confirmed external IP: one witness could name any IP (docs/NAT.md).
        if reached_forwarded && !lower_gateway && nat != NatKind::None && confirmed.is_some() {
            d.role = Role::Gateway;
            d.advertise = PeerAddr::Direct(forwarded);
            d.reason = format!(
                "the router forwards port {} to this node; relays for the LAN",
                self.cfg.listen_port
            );
            return d;
        }
        // A live gateway on our LAN (lowest key if there are several).
        if let Some(gw) = live
            .iter()
            .filter(|p| p.believed_gateway())
            .find_map(|p| p.external.map(|ext| (p, ext)))
        {
            let (gw, ext) = gw;
            d.role = Role::Relayed;
            d.relay = Some(RelayChoice {
                key: gw.key,
                dial: gw.lan_addr,
                public: ext,
            });
            d.advertise = PeerAddr::Relayed {
                relay: ext,
                target: self.me,
            };
            d.reason = "relayed by the gateway of this LAN".into();
            return d;
        }
        if !router_refused && nat != NatKind::None {
            // The mapping candidate: lowest key among live, non-public LAN nodes; one that
            // claims to be the gateway without proof is not waited for.
            let candidate = live
                .iter()
                .filter(|p| p.role != Role::Public && !p.map_refused)
                .filter(|p| p.role != Role::Gateway)
                .map(|p| p.key)
                .chain(std::iter::once(self.me))
                .min();
            // Map only after a beacon TTL, so that the LAN's other nodes have been heard.
            let heard_lan = now.saturating_sub(self.started) >= self.cfg.beacon_ttl_ms;
            let waited_since = self
                .started
                .max(self.gateway_seen_at.saturating_add(self.cfg.beacon_ttl_ms));
            let impatient = now.saturating_sub(waited_since) >= self.cfg.candidate_patience_ms;
            if (candidate == Some(self.me) || impatient) && heard_lan {
                d.want_mapping = true;
                d.reason = "mapping a port on the router for this LAN".into();
                return d;
            }
            if candidate == Some(self.me) {
                d.reason = "listening for the other nodes of this LAN".into();
                return d;
            }
            // The candidate is alive and has not given up: wait for it.
            d.reason = "waiting for the LAN's gateway".into();
            return d;
        }
        // No mapping on this LAN: a public peer relays us.
        if let Some(relay) = self.public_relay() {
            d.role = Role::Relayed;
            d.advertise = PeerAddr::Relayed {
                relay: relay.public,
                target: self.me,
            };
            d.relay = Some(relay);
            d.reason = if router_refused {
                "the router maps no port; relayed by a public peer".into()
            } else {
                "no inbound path; relayed by a public peer".into()
            };
            return d;
        }
        if settled {
            d.role = Role::Local;
            d.reason = "behind NAT with no mapping and no public peer: LAN only".into();
        } else {
            d.reason = "behind NAT; looking for a public peer to relay through".into();
        }
        d
    }
}

impl Reach {
    /// The public observer that relays us: rendezvous hashing over the observers that said
    /// they are public where we reached them (lowest weight wins).
    fn public_relay(&self) -> Option<RelayChoice> {
        self.observers
            .iter()
            .filter(|(_, o)| o.role == Role::Public)
            .min_by_key(|(k, _)| rendezvous(&self.me, k))
            .map(|(k, o)| RelayChoice {
                key: *k,
                dial: o.addr,
                public: o.addr,
            })
    }
}

/// Private, shared (CGNAT) and link-local ranges: addresses only a LAN can see.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_link_local()
                || v4.is_loopback()
                || o[0] == 100 && (o[1] & 0xc0) == 64
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            v6.is_loopback() || (s & 0xfe00) == 0xfc00 || (s & 0xffc0) == 0xfe80
        }
    }
}

fn same_kind(a: &Evidence, b: &Evidence) -> bool {
    matches!(
        (a, b),
        (Evidence::Seen { .. }, Evidence::Seen { .. })
            | (Evidence::Reached { .. }, Evidence::Reached { .. })
    )
}

/// Rendezvous weight of relay `candidate` for node `me`: lowest wins.
fn rendezvous(me: &PublicKey, candidate: &PublicKey) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(me.as_bytes());
    h.update(candidate.as_bytes());
    h.finalize().into()
}

pub mod msg;
pub mod proof;

#[cfg(test)]
mod tests;
