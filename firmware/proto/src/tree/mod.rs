//! The PeerTree state machine (sans-IO).
//!
//! One [`TreeNode`] per node and cell. The I/O layer feeds it verified messages
//! ([`TreeNode::handle`]), lost connections ([`TreeNode::link_down`]) and clock ticks
//! ([`TreeNode::tick`]), and carries out the [`Action`]s it returns. Nothing here reads a
//! clock, opens a socket or sleeps, so the same code runs in the tokio actor and in the
//! deterministic simulation ([`sim`]).
//!
//! Rules (DESIGN.md section 6, details in docs/PROTOCOL.md):
//! - Positions 1..N, breadth-first; `parent(p) = (p-2)/k + 1` ([`geometry`]).
//! - Join: newcomer -> any contact -> routed up to the root, which assigns `N+1` (a local
//!   counter: no lock across round trips) and routes an `attach` down to the parent of the new
//!   position; that parent welcomes the newcomer. Cost: 2*depth + 3 messages.
//! - Repair: the parent of a failed position reports it to the root, which orders the last
//!   node (position N) to move into it. The order passes the failed node's parent, which
//!   records a one-time ticket and names itself as the new parent, then reaches the mover; the
//!   mover says hello with the ticket and the parent tells the orphans to re-attach. For a failed
//!   root, the lowest surviving root child coordinates the same move to position 1.
//! - Merge: nodes probe former neighbours and contacts; when two trees meet, the smaller
//!   (by size, then root key) dissolves and its nodes join the larger.
//! - Broadcast: flooded over tree links, de-duplicated by id: N-1 transmissions.
//! - Authority: attach/dissolve/evict only from the parent, adopt only from the grandparent
//!   (or, for the root's children, the coordinating root child), moves only with the seal of
//!   the root (or coordinator), reports only from below.

pub mod geometry;
mod merge;
pub mod msg;
pub mod sim;

use std::collections::{BTreeMap, HashSet, VecDeque};

use serde_json::Value;

use crate::identity::PublicKey;
pub use geometry::Pos;
use geometry::{child_range, in_subtree, next_hop_down, parent_of, root_child_of};
use merge::{ForeignClaim, ProbeOut};
pub use merge::{MAX_SIZE_GROWTH_PER_S, MAX_TREE_SIZE};
pub use msg::{
    adopt_seal_bytes, join_seal_bytes, move_seal_bytes, DownInfo, Peer, Placed, Routed, TreeMsg,
    Voucher,
};

/// Timing and shape parameters. Every timeout derives from the heartbeat period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeConfig {
    /// Maximum children per node (k, from the cell's DNA).
    pub max_children: u64,
    /// Heartbeat period in ms.
    pub heartbeat_ms: u64,
}

impl TreeConfig {
    pub fn new(max_children: u64, heartbeat_ms: u64) -> Self {
        Self {
            max_children: max_children.max(1),
            heartbeat_ms: heartbeat_ms.max(10),
        }
    }
    /// Silence after which a neighbour is taken for dead.
    pub fn dead_after_ms(&self) -> u64 {
        3 * self.heartbeat_ms
    }
    /// How long a lost connection may stay lost before the neighbour is taken for dead.
    /// A killed process's connections close at once, so this is what bounds repair time.
    pub fn link_grace_ms(&self) -> u64 {
        self.heartbeat_ms / 2
    }
    /// How often a still-vacant position is reported again.
    pub fn report_every_ms(&self) -> u64 {
        2 * self.heartbeat_ms
    }
    /// How long a newcomer or mover waits for its welcome.
    pub fn join_timeout_ms(&self) -> u64 {
        3 * self.heartbeat_ms
    }
    /// How long the root ignores repeated reports of a position it has just ordered filled.
    pub fn fill_hold_ms(&self) -> u64 {
        4 * self.heartbeat_ms
    }
    /// How long an orphan waits for adoption before it leaves and joins again.
    pub fn orphan_giveup_ms(&self) -> u64 {
        12 * self.heartbeat_ms
    }
    /// Base interval of merge probes.
    pub fn probe_every_ms(&self) -> u64 {
        5 * self.heartbeat_ms
    }
}

/// Where a message goes: a known peer (pinned by key) or, for first contact, an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Peer(Peer),
    Addr(String),
    /// Reply over an existing connection from this key; dropped if there is none.
    Key(PublicKey),
}

/// What the I/O layer must do.
// Actions live briefly in one Vec per input; boxing the message would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `msg` (signed by this node) to `to`, dialing if needed.
    Send { to: Target, msg: TreeMsg },
    /// A broadcast reached this node for the first time: hand it to the application.
    Deliver {
        id: String,
        origin: PublicKey,
        payload: Value,
    },
    /// Something worth a log line.
    Event(TreeEvent),
}

/// Notable state changes, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeEvent {
    Joined { pos: Pos },
    BecameRootAlone,
    BecameRoot { size: u64 },
    Moved { from: Pos, to: Pos },
    ChildFailed { pos: Pos },
    ParentFailed { pos: Pos },
    Evicted { pos: Pos },
    Dissolving,
    Rejected { reason: &'static str },
}

/// The coarse state, as shown on LEDs and in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeState {
    Joining,
    /// Root of a tree of one.
    Alone,
    Root,
    Joined,
}

impl TreeState {
    pub fn as_str(&self) -> &'static str {
        match self {
            TreeState::Joining => "joining",
            TreeState::Alone => "alone",
            TreeState::Root => "root",
            TreeState::Joined => "joined",
        }
    }
}

/// Signs and checks move and adopt orders, and checks a broadcast's origin proof (ECDSA and
/// the originator's envelope in the node, a cheap stand-in in simulation).
pub trait OrderSeal {
    fn seal(&self, bytes: &[u8]) -> String;
    fn check(&self, signer: &PublicKey, bytes: &[u8], seal: &str) -> bool;
    /// Whether a broadcast `payload` from `origin` carries a valid proof of its origin.
    /// Called before a received broadcast is delivered or forwarded.
    fn check_broadcast(&self, origin: &PublicKey, payload: &Value) -> bool;
}

/// Counters for metrics and the benchmark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeStats {
    pub sent_topology: u64,
    pub sent_heartbeat: u64,
    pub sent_broadcast: u64,
    pub delivered_broadcasts: u64,
    pub duplicate_broadcasts: u64,
    pub rejected_unauthorized: u64,
    pub rejected_invalid: u64,
    pub joins_assigned: u64,
    pub repairs_ordered: u64,
    pub dropped_queued: u64,
    /// Received broadcasts refused because their origin proof did not verify.
    pub rejected_broadcast_origin: u64,
}

#[derive(Debug, Clone)]
enum Phase {
    Joining {
        deadline: u64,
        attempts: u32,
    },
    Moving {
        to_pos: Pos,
        new_parent: Peer,
        deadline: u64,
    },
    Member,
}

#[derive(Debug, Clone)]
struct ParentLink {
    peer: Peer,
    pos: Pos,
    last_heard: u64,
    down_since: Option<u64>,
    /// When this node took its parent for dead (an orphan).
    failed_at: Option<u64>,
    last_orphan_ask: u64,
}

#[derive(Debug, Clone)]
struct ChildSlot {
    peer: Peer,
    max_pos: Pos,
    last_heard: u64,
    down_since: Option<u64>,
    grandchildren: Vec<Placed>,
}

#[derive(Debug, Clone)]
struct Vacancy {
    since: u64,
    last_report: Option<u64>,
    grandchildren: Vec<Placed>,
    /// Who held (or, for a new root, is expected back at) this position: the one key taken
    /// back here without a ticket or voucher.
    former: Option<PublicKey>,
}

#[derive(Debug, Clone)]
struct LostPeer {
    peer: Option<Peer>,
    addr: String,
    next_probe: u64,
    tries: u32,
}

#[derive(Debug, Clone)]
struct Coordination {
    deadline: u64,
    size: u64,
}

const MAX_QUEUE_PER_POS: usize = 4096;
/// Hellos held while moving: at most our future children (k), with room for repeats.
const MAX_HELD_HELLOS: usize = 64;
const MAX_CONTACTS: usize = 16;
const MAX_LOST: usize = 16;
const MAX_PROBE_TRIES: u32 = 40;
/// Broadcast ids remembered for de-duplication. Each is kept as a 32-byte digest (about
/// 100 bytes with the set and queue overhead), so the store is ~10 MB at most whatever the
/// ids' length; 100,000 covers a sustained 1,000 broadcasts per second for 100 s.
const SEEN_CAPACITY: usize = 100_000;
/// How far a root believes reports (`taken`, `max`, `up`) of positions beyond its own size:
/// a root that took over from a failed one may have missed the joins of about one heartbeat
/// of a join storm (its coordinator hears every size change at once). Reports beyond this
/// are refused, so no report can push the size toward `u64::MAX`.
pub const MAX_SIZE_CATCHUP: u64 = 4096;

/// The de-duplication key of a broadcast id: fixed size, so a long id costs no memory.
fn seen_digest(id: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(id.as_bytes()).into()
}

/// A hello kept while moving: sender, position, ticket, peer, its children, voucher.
type HeldHello = (
    PublicKey,
    Pos,
    Option<u64>,
    Peer,
    Vec<Placed>,
    Option<Voucher>,
);

/// One node's view of one cell's tree.
pub struct TreeNode {
    cfg: TreeConfig,
    me: Peer,
    seal: Box<dyn OrderSeal + Send>,
    phase: Phase,
    contacts: Vec<String>,
    /// The keys that answered our dials to contact addresses (learned from the TLS handshake
    /// by the I/O layer): a welcome is taken only through one of them.
    contact_keys: Vec<(String, PublicKey)>,
    next_contact: usize,
    lost: Vec<LostPeer>,
    pos: Pos,
    size: u64,
    root: Option<Peer>,
    parent: Option<ParentLink>,
    grandparent: Option<Peer>,
    siblings: Vec<Placed>,
    root_children: Vec<Placed>,
    children: BTreeMap<Pos, ChildSlot>,
    vacant: BTreeMap<Pos, Vacancy>,
    /// Tickets of moves into a child position (recorded as the order passes).
    expect_move: BTreeMap<Pos, (u64, u64)>,
    /// Messages for child positions whose holder is not (yet) there.
    queues: BTreeMap<Pos, VecDeque<TreeMsg>>,
    /// Hellos that reached us while moving, replayed once we hold the new position.
    held_hellos: Vec<HeldHello>,
    /// The subtree maximum last reported to the parent.
    reported_max: Pos,
    /// Root only: positions it vacated (moved or shrank away), until when stale reports of
    /// them are ignored.
    vacated: BTreeMap<Pos, u64>,
    /// Child positions within the size that we have not heard of, since when.
    unknown_since: BTreeMap<Pos, u64>,
    /// Root only: holes just ordered filled, until when to ignore repeated reports.
    filling: BTreeMap<Pos, u64>,
    /// Root child only: coordinating a root replacement.
    coordinating: Option<Coordination>,
    seen: HashSet<[u8; 32]>,
    seen_order: VecDeque<[u8; 32]>,
    /// Probes we sent and wait an answer for (nonce, expected key).
    probes_out: Vec<ProbeOut>,
    /// What foreign roots last claimed about their tree's size.
    foreign: BTreeMap<PublicKey, ForeignClaim>,
    /// Keys we knew first-hand as part of our own tree (our root, our children) until we lost
    /// them, with the tree's size then and until when (see `merge::FORMER_MS`).
    former: BTreeMap<PublicKey, merge::Former>,
    rng: u64,
    now: u64,
    last_down_at: u64,
    last_heartbeat: u64,
    size_learned_at: u64,
    pub stats: TreeStats,
    out: Vec<Action>,
}

impl std::fmt::Debug for TreeNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeNode")
            .field("me", &self.me.key)
            .field("pos", &self.pos)
            .field("size", &self.size)
            .field("phase", &self.phase)
            .finish()
    }
}

/// A snapshot of the node's view, for status output and invariant checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeView {
    pub state: TreeState,
    pub key: PublicKey,
    /// The address this node advertises (where peers dial it).
    pub addr: String,
    pub position: Option<Pos>,
    pub parent: Option<Placed>,
    pub children: Vec<Placed>,
    pub root: Option<Peer>,
    pub size: u64,
    pub vacant: Vec<Pos>,
}

impl TreeNode {
    /// A node that will join through `contacts` (addresses), or be a root of one if none.
    /// `seed` feeds the ticket and broadcast-id generator; give it real randomness.
    pub fn new(
        cfg: TreeConfig,
        me: Peer,
        contacts: Vec<String>,
        seal: Box<dyn OrderSeal + Send>,
        seed: u64,
    ) -> Self {
        let contacts: Vec<String> = contacts.into_iter().filter(|c| *c != me.addr).collect();
        Self {
            cfg,
            me,
            seal,
            phase: Phase::Joining {
                deadline: 0,
                attempts: 0,
            },
            contacts,
            contact_keys: Vec::new(),
            next_contact: 0,
            lost: Vec::new(),
            pos: 0,
            size: 0,
            root: None,
            parent: None,
            grandparent: None,
            siblings: Vec::new(),
            root_children: Vec::new(),
            children: BTreeMap::new(),
            vacant: BTreeMap::new(),
            expect_move: BTreeMap::new(),
            queues: BTreeMap::new(),
            filling: BTreeMap::new(),
            unknown_since: BTreeMap::new(),
            vacated: BTreeMap::new(),
            reported_max: 0,
            held_hellos: Vec::new(),
            coordinating: None,
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            probes_out: Vec::new(),
            foreign: BTreeMap::new(),
            former: BTreeMap::new(),
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
            now: 0,
            last_down_at: 0,
            last_heartbeat: 0,
            size_learned_at: 0,
            stats: TreeStats::default(),
            out: Vec::new(),
        }
    }

    pub fn config(&self) -> &TreeConfig {
        &self.cfg
    }

    pub fn me(&self) -> &Peer {
        &self.me
    }

    /// Start: join through the first contact, or become a root of one.
    pub fn start(&mut self, now: u64) {
        self.start_join(now);
    }

    /// Our advertised address changed (e.g. a NAT role was decided): later messages carry it.
    /// Neighbours learn it from our signed envelopes ([`TreeNode::peer_addr_changed`]).
    pub fn set_my_addr(&mut self, addr: String) {
        if addr == self.me.addr {
            return;
        }
        let old = std::mem::replace(&mut self.me.addr, addr);
        self.contacts.retain(|c| *c != self.me.addr && *c != old);
    }

    /// Our dial to `addr` reached `key` (the TLS handshake showed it). Recorded for contact
    /// addresses only: a joining node takes a welcome only through a contact it asked.
    pub fn contact_answered(&mut self, addr: &str, key: PublicKey) {
        if !self.contacts.iter().any(|c| c == addr) {
            return;
        }
        self.contact_keys.retain(|(a, _)| a != addr);
        if self.contact_keys.len() >= MAX_CONTACTS {
            self.contact_keys.remove(0);
        }
        self.contact_keys.push((addr.to_string(), key));
    }

    /// `key` now advertises `addr` (taken from an envelope that key signed): update every
    /// record of it, so repairs and re-dials use the new address.
    pub fn peer_addr_changed(&mut self, key: &PublicKey, addr: &str) {
        if *key == self.me.key || addr.is_empty() {
            return;
        }
        let fix = |p: &mut Peer| {
            if p.key == *key && p.addr != addr {
                p.addr = addr.to_string();
            }
        };
        if let Some(r) = self.root.as_mut() {
            fix(r);
        }
        if let Some(p) = self.parent.as_mut() {
            fix(&mut p.peer);
        }
        if let Some(g) = self.grandparent.as_mut() {
            fix(g);
        }
        for p in self
            .siblings
            .iter_mut()
            .chain(self.root_children.iter_mut())
        {
            fix(&mut p.peer);
        }
        for slot in self.children.values_mut() {
            fix(&mut slot.peer);
            for g in slot.grandchildren.iter_mut() {
                fix(&mut g.peer);
            }
        }
        for l in self.lost.iter_mut() {
            if let Some(p) = l.peer.as_mut() {
                if p.key == *key {
                    fix(p);
                    l.addr = addr.to_string();
                }
            }
        }
    }

    /// A node of this cell was found without any tree (e.g. by a LAN beacon). If it is in
    /// another tree the two merge, through the usual probes; a joining node gains a contact.
    pub fn meet(&mut self, now: u64, peer: Peer) {
        if peer.key == self.me.key || peer.addr.is_empty() {
            return;
        }
        if self.knows(&peer.key) {
            return;
        }
        if !self.contacts.contains(&peer.addr) {
            self.contacts.push(peer.addr.clone());
            if self.contacts.len() > MAX_CONTACTS {
                self.contacts.remove(0);
            }
        }
        if self.is_member() && !self.lost.iter().any(|l| l.addr == peer.addr) {
            let addr = peer.addr.clone();
            self.remember_lost(Some(peer), addr.clone(), now);
            if let Some(l) = self.lost.iter_mut().find(|l| l.addr == addr) {
                l.next_probe = now;
            }
        }
    }

    /// A node alone in its tree (a root of one) learned contacts from elsewhere (a non-base
    /// cell, from the base tree): join through them, first ones first. Ignored unless alone,
    /// so a member never leaves its tree for it.
    pub fn join_through(&mut self, now: u64, contacts: &[String]) {
        if self.state() != TreeState::Alone {
            return;
        }
        let fresh: Vec<String> = contacts
            .iter()
            .filter(|c| **c != self.me.addr && !c.is_empty())
            .cloned()
            .collect();
        if fresh.is_empty() {
            return;
        }
        self.contacts.retain(|c| !fresh.contains(c));
        for c in fresh.into_iter().rev() {
            self.contacts.insert(0, c);
        }
        self.contacts.truncate(MAX_CONTACTS);
        self.next_contact = 0;
        self.now = now;
        self.start_join(now);
    }

    /// Whether `key` is a neighbour we already track in this tree.
    fn knows(&self, key: &PublicKey) -> bool {
        self.root.as_ref().is_some_and(|r| r.key == *key)
            || self.parent.as_ref().is_some_and(|p| p.peer.key == *key)
            || self.children.values().any(|c| c.peer.key == *key)
            || self.siblings.iter().any(|s| s.peer.key == *key)
    }

    /// Take the actions produced so far.
    pub fn drain(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    pub fn state(&self) -> TreeState {
        match self.phase {
            Phase::Member if self.pos == 1 && self.size <= 1 => TreeState::Alone,
            Phase::Member if self.pos == 1 => TreeState::Root,
            Phase::Member => TreeState::Joined,
            _ => TreeState::Joining,
        }
    }

    pub fn view(&self) -> TreeView {
        TreeView {
            state: self.state(),
            key: self.me.key,
            addr: self.me.addr.clone(),
            position: self.is_member().then_some(self.pos),
            parent: self.parent.as_ref().map(|p| Placed {
                pos: p.pos,
                peer: p.peer.clone(),
            }),
            children: self.child_list(),
            root: self.root.clone(),
            size: self.size,
            vacant: self.vacant.keys().copied().collect(),
        }
    }

    pub fn is_member(&self) -> bool {
        matches!(self.phase, Phase::Member)
    }

    /// Originate a broadcast; returns its id. Not a member: it is still delivered locally and
    /// sent to whatever links exist.
    pub fn broadcast(&mut self, payload: Value) -> String {
        let id = format!("{}-{:016x}", self.me.key.short(), self.next_rand());
        let msg = TreeMsg::Bcast {
            id: id.clone(),
            origin: self.me.key,
            payload,
        };
        self.accept_broadcast(None, msg);
        id
    }

    // ----- inputs -------------------------------------------------------------------------

    /// A verified message from `from`.
    pub fn handle(&mut self, now: u64, from: PublicKey, msg: TreeMsg) {
        self.now = now;
        self.touch(now, &from);
        match msg {
            TreeMsg::Join { peer } => self.on_join(now, from, peer),
            TreeMsg::Retry { root } => self.on_retry(now, root),
            TreeMsg::Route { dest, order } => self.on_route(now, from, dest, order),
            TreeMsg::Welcome {
                your_pos,
                parent,
                info,
                via,
            } => self.on_welcome(now, from, your_pos, parent, info, via),
            TreeMsg::Hello {
                pos,
                ticket,
                peer,
                children,
                voucher,
            } => self.on_hello(now, from, pos, ticket, peer, children, voucher),
            TreeMsg::Down { info } | TreeMsg::Announce { info } => self.on_down(now, from, info),
            TreeMsg::Max { pos, max_pos } => self.on_max(now, from, pos, max_pos),
            TreeMsg::Up {
                pos,
                children,
                max_pos,
            } => self.on_up(now, from, pos, children, max_pos),
            TreeMsg::Adopt {
                parent_pos,
                parent,
                seal,
            } => self.on_adopt(now, from, parent_pos, parent, seal),
            TreeMsg::Orphan { pos, peer } => self.on_orphan(from, pos, peer),
            TreeMsg::Evict { pos } => self.on_evict(now, from, pos),
            TreeMsg::InPlace { pos, peer } => self.on_in_place(now, from, pos, peer),
            TreeMsg::Probe { nonce, .. } => self.on_probe(from, nonce),
            TreeMsg::ProbeAck {
                root,
                size,
                peer,
                re,
            } => self.on_probe_ack(from, root, size, peer, re),
            TreeMsg::Dissolve { contact } => self.on_dissolve(now, from, contact),
            msg @ TreeMsg::Bcast { .. } => self.accept_broadcast(Some(from), msg),
        }
        self.report_max_if_changed();
    }

    /// The highest position held in our subtree, as far as we know.
    fn subtree_max(&self) -> Pos {
        self.children
            .values()
            .map(|c| c.max_pos)
            .max()
            .unwrap_or(0)
            .max(self.pos)
    }

    /// Tell the parent at once when our subtree's highest position changed.
    fn report_max_if_changed(&mut self) {
        if !self.is_member() || self.pos == 1 {
            return;
        }
        let max_pos = self.subtree_max();
        if max_pos == self.reported_max {
            return;
        }
        let Some(parent) = self.parent.clone() else {
            return;
        };
        if parent.failed_at.is_some() {
            return;
        }
        self.reported_max = max_pos;
        let pos = self.pos;
        self.send(Target::Peer(parent.peer), TreeMsg::Max { pos, max_pos });
    }

    fn on_max(&mut self, now: u64, from: PublicKey, pos: Pos, max_pos: Pos) {
        if !in_subtree(pos, max_pos, self.cfg.max_children) {
            return self.reject_invalid("subtree maximum outside the subtree");
        }
        if let Some(slot) = self.children.get_mut(&pos) {
            if slot.peer.key == from {
                slot.last_heard = now;
                slot.max_pos = max_pos;
                self.learn_tree_end(now, max_pos);
            }
        }
    }

    /// Root only: the root's size can fall behind the tree (a root that took over from a
    /// failed one, a move whose mover refused): a subtree reporting a position beyond it
    /// means that position is held. Positions this root vacated itself recently are ignored,
    /// since caches up the path may still name them.
    /// Until when a vacated position may still be named by caches up a tree of `size`:
    /// one heartbeat per level, plus margin.
    fn vacated_hold(&self, now: u64, size: u64) -> u64 {
        let depth = geometry::tree_depth(size, self.cfg.max_children) as u64;
        now + (depth + 3) * self.cfg.heartbeat_ms
    }

    fn learn_tree_end(&mut self, now: u64, max_pos: Pos) {
        if self.pos == 1 && max_pos > self.size {
            if max_pos > self.size.saturating_add(MAX_SIZE_CATCHUP) || max_pos > MAX_TREE_SIZE {
                return self.reject_invalid("reported position far beyond the tree");
            }
            self.vacated.retain(|_, until| *until > now);
            if !self.vacated.contains_key(&max_pos) {
                self.size = max_pos;
            }
        }
    }

    /// The connection to `key` was lost (closed, reset, or a dial failed).
    pub fn link_down(&mut self, now: u64, key: &PublicKey) {
        self.now = now;
        let mut redial = false;
        if let Some(p) = self.parent.as_mut() {
            if p.peer.key == *key && p.down_since.is_none() && p.failed_at.is_none() {
                p.down_since = Some(now);
                redial = true;
            }
        }
        if redial && self.is_member() {
            // Children dial parents: try at once, so a dropped connection heals in a round trip.
            self.send_up(now);
        }
        for slot in self.children.values_mut() {
            if slot.peer.key == *key && slot.down_since.is_none() {
                slot.down_since = Some(now);
            }
        }
    }

    /// Periodic work: heartbeats, failure detection, reports, timeouts, probes.
    pub fn tick(&mut self, now: u64) {
        self.now = now;
        match self.phase.clone() {
            Phase::Joining { deadline, .. } => {
                if now >= deadline {
                    self.next_join_attempt(now);
                }
            }
            Phase::Moving { deadline, .. } => {
                if now >= deadline {
                    // The new parent never welcomed us: start over as a newcomer.
                    self.rejoin(now);
                }
            }
            Phase::Member => self.member_tick(now),
        }
        self.probe_tick(now);
        self.report_max_if_changed();
    }

    // ----- joining ------------------------------------------------------------------------

    fn start_join(&mut self, now: u64) {
        self.reset_membership();
        if self.contacts.is_empty() {
            self.become_alone_root(now);
            return;
        }
        self.phase = Phase::Joining {
            deadline: now,
            attempts: 0,
        };
        self.next_join_attempt(now);
    }

    fn next_join_attempt(&mut self, now: u64) {
        let attempts = match self.phase {
            Phase::Joining { attempts, .. } => attempts,
            _ => 0,
        };
        // After every contact failed twice, run alone and keep probing them for a merge.
        // (At least six tries: in a join storm a contact may itself still be joining.)
        if self.contacts.is_empty() || attempts as usize >= (2 * self.contacts.len()).max(6) {
            self.become_alone_root(now);
            for c in self.contacts.clone() {
                self.remember_lost(None, c, now);
            }
            return;
        }
        let contact = self.contacts[self.next_contact % self.contacts.len()].clone();
        self.next_contact = self.next_contact.wrapping_add(1);
        let jitter = self.next_rand() % (self.cfg.heartbeat_ms / 2 + 1);
        self.phase = Phase::Joining {
            deadline: now + self.cfg.join_timeout_ms() + jitter,
            attempts: attempts + 1,
        };
        self.send(
            Target::Addr(contact),
            TreeMsg::Join {
                peer: self.me.clone(),
            },
        );
    }

    fn reset_membership(&mut self) {
        self.reported_max = 0;
        self.pos = 0;
        self.size = 0;
        self.root = None;
        self.parent = None;
        self.grandparent = None;
        self.siblings.clear();
        self.root_children.clear();
        self.children.clear();
        self.vacant.clear();
        self.expect_move.clear();
        self.queues.clear();
        self.filling.clear();
        self.unknown_since.clear();
        self.coordinating = None;
    }

    fn become_alone_root(&mut self, now: u64) {
        self.reset_membership();
        self.phase = Phase::Member;
        self.pos = 1;
        self.size = 1;
        self.root = Some(self.me.clone());
        self.size_learned_at = now;
        self.event(TreeEvent::BecameRootAlone);
    }

    /// Leave the current position and join again as a newcomer.
    fn rejoin(&mut self, now: u64) {
        if let Some(root) = self.root.clone() {
            if root.key != self.me.key && !self.contacts.contains(&root.addr) {
                self.contacts.insert(0, root.addr.clone());
            }
        }
        if let Some(p) = self.parent.clone() {
            if !self.contacts.contains(&p.peer.addr) {
                self.contacts.push(p.peer.addr.clone());
            }
        }
        let me = self.me.addr.clone();
        self.contacts.retain(|c| *c != me);
        self.contacts.truncate(MAX_CONTACTS);
        self.start_join(now);
    }

    fn on_retry(&mut self, now: u64, root: Option<Peer>) {
        let Phase::Joining { deadline, attempts } = self.phase else {
            return;
        };
        if let Some(root) = root {
            if root.key != self.me.key && !self.contacts.contains(&root.addr) {
                self.contacts.insert(0, root.addr);
                self.contacts.truncate(MAX_CONTACTS);
                self.next_contact = 0;
            }
        }
        let jitter = self.next_rand() % (self.cfg.heartbeat_ms / 2 + 1);
        self.phase = Phase::Joining {
            deadline: deadline.min(now + self.cfg.heartbeat_ms / 2 + jitter),
            attempts,
        };
    }

    fn on_join(&mut self, now: u64, from: PublicKey, peer: Peer) {
        if peer.key != from {
            return self.reject_invalid("join for another key");
        }
        if !self.is_member() {
            let root = self.root.clone();
            // (Over the connection the join came on: never dial an address a stranger names.)
            return self.send(Target::Key(from), TreeMsg::Retry { root });
        }
        // Our seal tells the newcomer that its welcome comes from the tree it asked us into.
        let via = Voucher {
            signer: self.me.key,
            seal: self.seal.seal(&join_seal_bytes(&peer.key)),
        };
        self.route(
            now,
            1,
            Routed::JoinReq {
                peer,
                via: Some(via),
            },
        );
    }

    /// Whether `via` is the seal of a contact we asked, over our own join.
    fn via_our_contact(&self, via: Option<&Voucher>) -> bool {
        via.is_some_and(|v| {
            self.contact_keys.iter().any(|(_, k)| *k == v.signer)
                && self
                    .seal
                    .check(&v.signer, &join_seal_bytes(&self.me.key), &v.seal)
        })
    }

    fn on_welcome(
        &mut self,
        now: u64,
        from: PublicKey,
        your_pos: Pos,
        parent: Peer,
        info: DownInfo,
        via: Option<Voucher>,
    ) {
        if parent.key != from || parent_of(your_pos, self.cfg.max_children) != Some(info.pos) {
            return self.reject_invalid("inconsistent welcome");
        }
        match self.phase.clone() {
            Phase::Joining { .. } if self.via_our_contact(via.as_ref()) => {}
            Phase::Moving {
                to_pos, new_parent, ..
            } if new_parent.key == from && to_pos == your_pos => {}
            Phase::Member if self.pos == your_pos && self.is_parent(&from) => {
                // A repeated welcome (e.g. after a reconnect): refresh only.
                return self.apply_down(now, info);
            }
            _ => return self.reject_unauthorized("welcome not expected"),
        }
        let old = self.pos;
        self.reset_membership();
        self.phase = Phase::Member;
        self.pos = your_pos;
        self.parent = Some(ParentLink {
            peer: parent,
            pos: info.pos,
            last_heard: now,
            down_since: None,
            failed_at: None,
            last_orphan_ask: 0,
        });
        self.apply_down(now, info);
        if old != 0 && old != your_pos {
            self.event(TreeEvent::Moved {
                from: old,
                to: your_pos,
            });
        } else {
            self.event(TreeEvent::Joined { pos: your_pos });
        }
        self.send_up(now);
        for (from, pos, ticket, peer, children, voucher) in std::mem::take(&mut self.held_hellos) {
            self.on_hello(now, from, pos, ticket, peer, children, voucher);
        }
    }

    // ----- routing ------------------------------------------------------------------------

    /// Send a routed order toward `dest`, or handle it here if `dest` is this node.
    fn route(&mut self, now: u64, dest: Pos, order: Routed) {
        if !self.is_member() {
            return;
        }
        if dest == self.pos {
            return self.act_on(now, None, order);
        }
        let k = self.cfg.max_children;
        let msg = TreeMsg::Route { dest, order };
        if let Some(child) = next_hop_down(self.pos, dest, k) {
            let mover_leaves = dest == child
                && matches!(&msg, TreeMsg::Route { order: Routed::Move { from_pos, .. }, .. } if *from_pos == child);
            self.send_to_child_pos(child, dest, msg);
            if mover_leaves {
                // Our child is moving to fill a vacancy: its position is no longer held, and
                // as the mover is always the last node, the tree now ends before it.
                self.children.remove(&child);
                self.vacant.remove(&child);
                if self.size >= child {
                    self.size = child - 1;
                    self.size_learned_at = self.now;
                }
            }
            return;
        }
        if self.pos == 1 {
            // Outside the tree (dest > size or 0): nowhere to go.
            return;
        }
        self.send_up_route(msg, dest);
    }

    fn send_up_route(&mut self, msg: TreeMsg, dest: Pos) {
        let k = self.cfg.max_children;
        let Some(parent) = self.parent.clone() else {
            return;
        };
        if parent.failed_at.is_none() {
            return self.send(Target::Peer(parent.peer), msg);
        }
        // Route around a failed parent.
        if parent.pos == 1 {
            // Root failed: go sideways to the root child whose subtree holds dest.
            if let Some(rc) = root_child_of(dest, k) {
                if let Some(s) = self.root_children.iter().find(|s| s.pos == rc).cloned() {
                    if s.peer.key != self.me.key {
                        return self.send(Target::Peer(s.peer), msg);
                    }
                }
            }
            return;
        }
        if let Some(gp) = self.grandparent.clone() {
            self.send(Target::Peer(gp), msg);
        }
    }

    /// Send toward child position `child` (on the way to `dest`), routing around a failed
    /// child through the grandchild on the path, or queueing until the position is held.
    fn send_to_child_pos(&mut self, child: Pos, dest: Pos, msg: TreeMsg) {
        let k = self.cfg.max_children;
        if let Some(slot) = self.children.get(&child) {
            if slot.down_since.is_none() {
                let to = slot.peer.clone();
                return self.send(Target::Peer(to), msg);
            }
        }
        let grandchildren = self
            .children
            .get(&child)
            .map(|s| s.grandchildren.clone())
            .or_else(|| self.vacant.get(&child).map(|v| v.grandchildren.clone()))
            .unwrap_or_default();
        if let Some(gc_pos) = next_hop_down(child, dest, k) {
            if let Some(gc) = grandchildren.iter().find(|g| g.pos == gc_pos) {
                let to = gc.peer.clone();
                return self.send(Target::Peer(to), msg);
            }
        }
        if dest == child
            && matches!(
                msg,
                TreeMsg::Route {
                    order: Routed::Move { .. },
                    ..
                }
            )
        {
            // The mover is the failed child itself: the root will try again.
            return;
        }
        self.enqueue(child, msg);
    }

    fn enqueue(&mut self, pos: Pos, msg: TreeMsg) {
        let q = self.queues.entry(pos).or_default();
        if q.len() >= MAX_QUEUE_PER_POS {
            q.pop_front();
            self.stats.dropped_queued += 1;
        }
        q.push_back(msg);
    }

    fn flush_queue(&mut self, pos: Pos) {
        let Some(q) = self.queues.remove(&pos) else {
            return;
        };
        let Some(slot) = self.children.get(&pos) else {
            return;
        };
        let to = slot.peer.clone();
        for msg in q {
            self.send(Target::Peer(to.clone()), msg);
        }
    }

    fn on_route(&mut self, now: u64, from: PublicKey, dest: Pos, order: Routed) {
        if !self.is_member() {
            return;
        }
        if !self.is_tree_neighbor(&from) {
            return self.reject_unauthorized("routed message from a non-neighbour");
        }
        if dest == self.pos {
            return self.act_on(now, Some(from), order);
        }
        self.route(now, dest, order);
    }

    fn act_on(&mut self, now: u64, from: Option<PublicKey>, order: Routed) {
        let from_above = from.map(|f| self.is_from_above(&f)).unwrap_or(true);
        let from_below = from.map(|f| self.is_from_below(&f)).unwrap_or(true);
        match order {
            Routed::JoinReq { peer, via } => {
                if self.pos != 1 {
                    return self.route(now, 1, Routed::JoinReq { peer, via });
                }
                self.root_assign(now, peer, via);
            }
            Routed::Attach { pos, peer, via } => {
                if !from_above {
                    return self.reject_unauthorized("attach not from parent");
                }
                self.on_attach(now, pos, peer, via);
            }
            Routed::Move {
                from_pos,
                to_pos,
                ticket,
                new_parent,
                signer,
                seal,
                size,
                root_children,
                coordinator,
            } => {
                let k = self.cfg.max_children;
                if new_parent.is_none() && parent_of(to_pos, k) == Some(self.pos) {
                    // We are the parent of the vacant position: record the ticket and pass
                    // the order on to the mover with ourselves as its new parent.
                    if !from_above {
                        return self.reject_unauthorized("move not from above");
                    }
                    if let Some(slot) = self.children.get(&to_pos) {
                        if slot.down_since.is_none() {
                            // Not vacant after all: tell the root the mover stays.
                            return self.route(now, 1, Routed::Taken { pos: from_pos });
                        }
                    }
                    self.expect_move
                        .insert(to_pos, (ticket, now + 2 * self.cfg.join_timeout_ms()));
                    let order = Routed::Move {
                        from_pos,
                        to_pos,
                        ticket,
                        new_parent: Some(self.me.clone()),
                        signer,
                        seal,
                        size,
                        root_children,
                        coordinator,
                    };
                    if from_pos == self.pos {
                        return self.act_on(now, None, order);
                    }
                    return self.route(now, from_pos, order);
                }
                if from_pos != self.pos {
                    return;
                }
                self.on_move(
                    now,
                    to_pos,
                    ticket,
                    new_parent,
                    signer,
                    seal,
                    size,
                    root_children,
                    coordinator,
                );
            }
            Routed::Failed { pos } => {
                if !from_below {
                    return self.reject_unauthorized("failure report not from below");
                }
                if self.pos == 1 {
                    self.root_fill(now, pos);
                }
            }
            Routed::Taken { pos } => {
                if self.pos == 1 && pos > self.size {
                    if pos > self.size.saturating_add(MAX_SIZE_CATCHUP) || pos > MAX_TREE_SIZE {
                        return self.reject_invalid("taken position far beyond the tree");
                    }
                    self.size = pos;
                }
            }
            Routed::Merge {
                contact,
                their_size,
                their_root,
            } => {
                // The root checks for itself, root to root, before dissolving anything.
                if self.pos == 1
                    && contact.key == their_root
                    && self.should_merge_into(their_size, &their_root)
                {
                    // (Witnessed: a member of our tree checked this root's answer.)
                    self.send_probe(now, Target::Peer(contact), true);
                }
            }
        }
    }

    // ----- root duties --------------------------------------------------------------------

    fn root_assign(&mut self, now: u64, peer: Peer, via: Option<Voucher>) {
        if peer.key == self.me.key {
            return;
        }
        let k = self.cfg.max_children;
        let Some(pos) = self.size.checked_add(1).filter(|p| *p <= MAX_TREE_SIZE) else {
            // Full (or a corrupted size): refuse rather than wrap.
            self.reject_invalid("tree full");
            let root = self.root.clone();
            return self.send(Target::Peer(peer), TreeMsg::Retry { root });
        };
        self.size = pos;
        self.stats.joins_assigned += 1;
        self.root_announce(false);
        let parent = parent_of(pos, k).unwrap_or(1);
        self.route(now, parent, Routed::Attach { pos, peer, via });
    }

    /// Root only: after a size or root-children change, tell the children at once (the
    /// lowest one always, all of them when the root-children list changed), so that whoever
    /// coordinates a root repair knows the true last position and its siblings.
    fn root_announce(&mut self, all: bool) {
        if self.pos != 1 {
            return;
        }
        let info = self.down_info();
        let targets: Vec<Peer> = if all {
            self.children.values().map(|s| s.peer.clone()).collect()
        } else {
            self.children
                .values()
                .take(1)
                .map(|s| s.peer.clone())
                .collect()
        };
        for peer in targets {
            self.send(Target::Peer(peer), TreeMsg::Announce { info: info.clone() });
        }
    }

    fn root_fill(&mut self, now: u64, hole: Pos) {
        self.filling.retain(|_, until| *until > now);
        if hole <= 1 || hole > self.size || self.filling.contains_key(&hole) {
            return;
        }
        let hold = self.vacated_hold(now, self.size);
        if hole == self.size {
            self.vacated.insert(hole, hold);
            self.size -= 1;
            return self.root_announce(hole <= self.cfg.max_children + 1);
        }
        let mover = self.size;
        self.vacated.insert(mover, hold);
        self.size -= 1;
        let ticket = self.next_rand();
        self.filling.insert(hole, now + self.cfg.fill_hold_ms());
        self.stats.repairs_ordered += 1;
        self.root_announce(false);
        let seal = self.seal.seal(&move_seal_bytes(mover, hole, ticket, 0));
        let k = self.cfg.max_children;
        let parent = parent_of(hole, k).unwrap_or(1);
        self.route(
            now,
            parent,
            Routed::Move {
                from_pos: mover,
                to_pos: hole,
                ticket,
                new_parent: None,
                signer: self.me.key,
                seal,
                size: 0,
                root_children: Vec::new(),
                coordinator: None,
            },
        );
    }

    fn on_attach(&mut self, now: u64, pos: Pos, peer: Peer, via: Option<Voucher>) {
        let k = self.cfg.max_children;
        // (A stale second join request of ours can come back as our own child: the slot
        // stays empty and is reported and filled like any vacancy.)
        if parent_of(pos, k) != Some(self.pos) || peer.key == self.me.key {
            return;
        }
        if let Some(slot) = self.children.get(&pos) {
            if slot.down_since.is_none() && slot.peer.key != peer.key {
                return self.route(now, 1, Routed::Taken { pos });
            }
        }
        self.place_child(now, pos, peer.clone(), Vec::new());
        let info = self.down_info();
        self.send(
            Target::Peer(peer),
            TreeMsg::Welcome {
                your_pos: pos,
                parent: self.me.clone(),
                info,
                via,
            },
        );
        self.flush_queue(pos);
    }

    /// Put `peer` at child position `pos`, removing it from any other slot it held.
    fn place_child(&mut self, now: u64, pos: Pos, peer: Peer, grandchildren: Vec<Placed>) {
        self.children
            .retain(|p, s| *p == pos || s.peer.key != peer.key);
        let grandchildren = if grandchildren.is_empty() {
            self.vacant
                .remove(&pos)
                .map(|v| v.grandchildren)
                .unwrap_or_default()
        } else {
            self.vacant.remove(&pos);
            grandchildren
        };
        self.children.insert(
            pos,
            ChildSlot {
                max_pos: pos,
                peer,
                last_heard: now,
                down_since: None,
                grandchildren,
            },
        );
        if pos > self.size && self.pos == 1 {
            self.size = pos;
        }
    }

    // ----- moves (repair) -----------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn on_move(
        &mut self,
        now: u64,
        to_pos: Pos,
        ticket: u64,
        new_parent: Option<Peer>,
        signer: PublicKey,
        seal: String,
        size: u64,
        root_children: Vec<Placed>,
        coordinator: Option<Peer>,
    ) {
        let from_pos = self.pos;
        let entitled = if to_pos == 1 {
            // A root replacement: ordered by a root child (the coordinator).
            self.root_children.iter().any(|s| s.peer.key == signer)
                || self.parent.as_ref().is_some_and(|p| p.peer.key == signer)
        } else {
            self.root.as_ref().is_some_and(|r| r.key == signer)
        };
        let sealed_size = if to_pos == 1 { size } else { 0 };
        let sealed = self.seal.check(
            &signer,
            &move_seal_bytes(from_pos, to_pos, ticket, sealed_size),
            &seal,
        );
        if !entitled || !sealed {
            if sealed && to_pos != 1 {
                // Properly sealed by a root we do not know yet (our root knowledge lags after
                // a root change): stay, and tell the root we still hold our position so it
                // does not count us gone.
                self.route(now, 1, Routed::Taken { pos: from_pos });
            }
            return self.reject_unauthorized("move order without the entitled seal");
        }
        if to_pos == 1 {
            return self.become_root_by_move(now, size, root_children, coordinator);
        }
        let Some(new_parent) = new_parent else {
            return;
        };
        // Leave our position: our parent already dropped us as the order passed (or will
        // find out); a last node has no children.
        self.reset_membership_keep_root();
        self.phase = Phase::Moving {
            to_pos,
            new_parent: new_parent.clone(),
            deadline: now + self.cfg.join_timeout_ms(),
        };
        self.pos = from_pos;
        let children = Vec::new();
        self.send(
            Target::Peer(new_parent),
            TreeMsg::Hello {
                pos: to_pos,
                ticket: Some(ticket),
                peer: self.me.clone(),
                children,
                voucher: None,
            },
        );
    }

    fn reset_membership_keep_root(&mut self) {
        let root = self.root.clone();
        self.reset_membership();
        self.root = root;
    }

    fn become_root_by_move(
        &mut self,
        now: u64,
        size: u64,
        root_children: Vec<Placed>,
        coordinator: Option<Peer>,
    ) {
        let old = self.pos;
        self.reset_membership();
        self.phase = Phase::Member;
        self.pos = 1;
        self.size = size.clamp(1, MAX_TREE_SIZE);
        // Our old position is vacated: caches up the tree may still report it for a while.
        let hold = self.vacated_hold(now, old);
        self.vacated.insert(old, hold);
        self.root = Some(self.me.clone());
        self.size_learned_at = now;
        // The surviving root children keep their positions; they will say hello once the
        // coordinator tells them who we are. Until then they count as vacancies in waiting.
        for rc in root_children {
            if rc.peer.key != self.me.key && rc.pos <= self.size {
                self.vacant.insert(
                    rc.pos,
                    Vacancy {
                        since: now,
                        last_report: Some(now),
                        grandchildren: Vec::new(),
                        former: Some(rc.peer.key),
                    },
                );
            }
        }
        self.event(TreeEvent::Moved { from: old, to: 1 });
        self.event(TreeEvent::BecameRoot { size: self.size });
        if let Some(c) = coordinator {
            if c.key != self.me.key {
                let peer = self.me.clone();
                self.send(Target::Peer(c), TreeMsg::InPlace { pos: 1, peer });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_hello(
        &mut self,
        now: u64,
        from: PublicKey,
        pos: Pos,
        ticket: Option<u64>,
        peer: Peer,
        children: Vec<Placed>,
        voucher: Option<Voucher>,
    ) {
        let k = self.cfg.max_children;
        if peer.key != from {
            return self.reject_invalid("hello for another key");
        }
        if let Phase::Moving { to_pos, .. } = self.phase {
            // An orphan adopted on our behalf can say hello before our own welcome arrives:
            // hold it until we are in place.
            if parent_of(pos, k) == Some(to_pos) && self.held_hellos.len() < MAX_HELD_HELLOS {
                self.held_hellos
                    .push((from, pos, ticket, peer, children, voucher));
            }
            return;
        }
        if !self.is_member() {
            return;
        }
        if parent_of(pos, k) != Some(self.pos) {
            return self.send(Target::Peer(peer), TreeMsg::Evict { pos });
        }
        let existing = self.children.get(&pos).map(|s| (s.peer.key, s.down_since));
        let accepted = match (existing, ticket) {
            // Reconnect of the holder.
            (Some((key, _)), _) if key == from => true,
            // A mover with the ticket the root's order left here.
            (_, Some(t)) => {
                let ok = self.expect_move.get(&pos).is_some_and(|(et, _)| *et == t);
                if ok {
                    self.expect_move.remove(&pos);
                }
                ok
            }
            // An adopted orphan or a returning root child: only into an empty or dead slot,
            // and only the position's former holder or one whom the entitled node told to
            // adopt us (its voucher). A live holder is never displaced this way.
            (existing, None) => {
                existing.is_none_or(|(_, down)| down.is_some())
                    && (self.vacant.get(&pos).and_then(|v| v.former) == Some(from)
                        || self.voucher_ok(pos, &from, voucher.as_ref()))
            }
        };
        if !accepted {
            self.reject_unauthorized("hello without a ticket or voucher");
            return self.send(Target::Key(from), TreeMsg::Evict { pos });
        }
        let is_new_holder = existing.map(|(key, _)| key != from).unwrap_or(true);
        let root_child_changed = is_new_holder && self.pos == 1;
        let adoptees = self
            .vacant
            .get(&pos)
            .map(|v| v.grandchildren.clone())
            .unwrap_or_default();
        self.place_child(now, pos, peer.clone(), children);
        if is_new_holder {
            if ticket.is_some() {
                self.send(
                    Target::Peer(peer.clone()),
                    TreeMsg::Welcome {
                        your_pos: pos,
                        parent: self.me.clone(),
                        info: self.down_info(),
                        via: None,
                    },
                );
            }
            // Tell the orphans of this position who their parent is now.
            for gc in adoptees {
                if gc.peer.key != peer.key {
                    let msg = self.adopt_msg(gc.pos, &gc.peer.key, pos, peer.clone());
                    self.send(Target::Peer(gc.peer), msg);
                }
            }
        }
        let info = self.down_info();
        self.send(Target::Peer(peer), TreeMsg::Down { info });
        self.flush_queue(pos);
        if root_child_changed {
            self.root_announce(true);
        }
    }

    /// Whether `voucher` proves that `child` (saying hello at `pos`) was told to adopt us by
    /// a node entitled to: our parent (the grandparent of `pos`), or for the root, one of its
    /// children or expected children (the coordinator of a root repair and its siblings).
    fn voucher_ok(&self, pos: Pos, child: &PublicKey, voucher: Option<&Voucher>) -> bool {
        let Some(v) = voucher else {
            return false;
        };
        let entitled = v.signer == self.me.key
            || self.is_parent(&v.signer)
            || (self.pos == 1
                && (self.children.values().any(|c| c.peer.key == v.signer)
                    || self.vacant.values().any(|x| x.former == Some(v.signer))));
        entitled
            && self.seal.check(
                &v.signer,
                &adopt_seal_bytes(pos, child, &self.me.key),
                &v.seal,
            )
    }

    /// An adopt order for the orphan `child` at `child_pos`: its new parent is `parent`,
    /// sealed by us so that the parent can check who sent the orphan.
    fn adopt_msg(
        &self,
        child_pos: Pos,
        child: &PublicKey,
        parent_pos: Pos,
        parent: Peer,
    ) -> TreeMsg {
        let seal = self
            .seal
            .seal(&adopt_seal_bytes(child_pos, child, &parent.key));
        TreeMsg::Adopt {
            parent_pos,
            parent,
            seal: Some(seal),
        }
    }

    fn on_adopt(
        &mut self,
        now: u64,
        from: PublicKey,
        parent_pos: Pos,
        parent: Peer,
        seal: Option<String>,
    ) {
        let k = self.cfg.max_children;
        if !self.is_member() || parent_of(self.pos, k) != Some(parent_pos) {
            return;
        }
        // Adopting the parent we already have (or have given up on) changes nothing; a
        // sibling that has not noticed the root failure yet may still name the dead root.
        if self
            .parent
            .as_ref()
            .is_some_and(|p| p.peer.key == parent.key)
        {
            return;
        }
        let from_grandparent = self.grandparent.as_ref().is_some_and(|g| g.key == from);
        // A root child accepts a new root from a sibling once its own link to the root is
        // lost (the kill of a root closes every connection to it at once).
        let root_lost = self
            .parent
            .as_ref()
            .is_some_and(|p| p.failed_at.is_some() || p.down_since.is_some());
        let sibling = self.root_children.iter().any(|s| s.peer.key == from)
            || self.siblings.iter().any(|s| s.peer.key == from);
        let from_coordinator = parent_pos == 1 && root_lost && sibling;
        let from_self = from == self.me.key;
        if !(from_grandparent || from_coordinator || from_self) {
            let reason = if parent_pos == 1 && !root_lost {
                "adopt for the root position while the root looks alive"
            } else {
                "adopt not from grandparent or a root sibling"
            };
            return self.reject_unauthorized(reason);
        }
        self.coordinating = None;
        self.reported_max = 0;
        self.parent = Some(ParentLink {
            peer: parent.clone(),
            pos: parent_pos,
            last_heard: now,
            down_since: None,
            failed_at: None,
            last_orphan_ask: 0,
        });
        // (The root itself is learned from the new parent's answer, which then passes the
        // news on down at once; setting it here would hide the change from that path.)
        let seal = match seal {
            Some(s) => s,
            None if from_self => {
                self.seal
                    .seal(&adopt_seal_bytes(self.pos, &self.me.key, &parent.key))
            }
            None => String::new(),
        };
        self.send(
            Target::Peer(parent),
            TreeMsg::Hello {
                pos: self.pos,
                ticket: None,
                peer: self.me.clone(),
                children: self.child_list(),
                voucher: Some(Voucher { signer: from, seal }),
            },
        );
    }

    fn on_orphan(&mut self, from: PublicKey, pos: Pos, peer: Peer) {
        let k = self.cfg.max_children;
        if peer.key != from {
            return self.reject_invalid("orphan for another key");
        }
        let Some(parent_pos) = parent_of(pos, k) else {
            return;
        };
        if parent_pos == 1 && parent_of(self.pos, k) == Some(1) {
            // A fellow root child after a root failure: point it at the new root if we have
            // one (our parent link is live again).
            if let Some(p) = self.parent.clone() {
                if p.failed_at.is_none() && p.down_since.is_none() && p.peer.key != from {
                    let msg = self.adopt_msg(pos, &from, 1, p.peer);
                    self.send(Target::Peer(peer), msg);
                }
            }
            return;
        }
        if parent_of(parent_pos, k) != Some(self.pos) {
            return;
        }
        if let Some(slot) = self.children.get(&parent_pos) {
            if slot.down_since.is_none() && slot.peer.key != from {
                let msg = self.adopt_msg(pos, &from, parent_pos, slot.peer.clone());
                return self.send(Target::Peer(peer), msg);
            }
        }
        // Still vacant (or never known): remember the orphan so the filler adopts it.
        let now = self.now;
        let v = self.vacant.entry(parent_pos).or_insert(Vacancy {
            since: now,
            last_report: None,
            grandchildren: Vec::new(),
            former: None,
        });
        if !v.grandchildren.iter().any(|g| g.peer.key == from)
            && v.grandchildren.len() < msg::MAX_PLACED_LIST
        {
            v.grandchildren.push(Placed { pos, peer });
        }
    }

    fn on_evict(&mut self, now: u64, from: PublicKey, pos: Pos) {
        let entitled = self.is_parent(&from)
            || matches!(&self.phase, Phase::Moving { new_parent, .. } if new_parent.key == from);
        if !entitled || (self.is_member() && pos != self.pos) {
            return self.reject_unauthorized("evict not from parent");
        }
        self.event(TreeEvent::Evicted { pos });
        self.rejoin(now);
    }

    fn on_in_place(&mut self, now: u64, from: PublicKey, pos: Pos, new_root: Peer) {
        if new_root.key != from || pos != 1 {
            return self.reject_invalid("inconsistent in_place");
        }
        if self.coordinating.take().is_none() {
            return;
        }
        let siblings = self.root_children.clone();
        for s in siblings {
            if s.peer.key == self.me.key {
                continue;
            }
            let msg = self.adopt_msg(s.pos, &s.peer.key, 1, new_root.clone());
            self.send(Target::Peer(s.peer), msg);
        }
        self.on_adopt(now, self.me.key, 1, new_root, None);
    }

    fn on_dissolve(&mut self, now: u64, from: PublicKey, contact: Peer) {
        if !self.is_parent(&from) {
            return self.reject_unauthorized("dissolve not from parent");
        }
        self.dissolve(now, contact);
    }

    fn dissolve(&mut self, now: u64, contact: Peer) {
        self.event(TreeEvent::Dissolving);
        for slot in self.children.values().cloned().collect::<Vec<_>>() {
            self.send(
                Target::Peer(slot.peer),
                TreeMsg::Dissolve {
                    contact: contact.clone(),
                },
            );
        }
        self.contacts.retain(|c| *c != contact.addr);
        self.contacts.insert(0, contact.addr.clone());
        self.next_contact = 0;
        self.start_join(now);
    }

    // ----- heartbeats and failure detection ---------------------------------------------------

    fn on_down(&mut self, now: u64, from: PublicKey, info: DownInfo) {
        if !self.is_member() || !self.is_parent(&from) {
            // Someone thinks we are its child: we are not.
            return;
        }
        self.apply_down(now, info);
    }

    fn apply_down(&mut self, now: u64, info: DownInfo) {
        if let Some(p) = self.parent.as_mut() {
            p.last_heard = now;
            p.down_since = None;
            p.failed_at = None;
        }
        let root_changed = self.root.as_ref().map(|r| r.key) != Some(info.root.key);
        if root_changed || self.size != info.size {
            self.size_learned_at = now;
        }
        self.last_down_at = now;
        self.root = Some(info.root);
        self.size = info.size;
        self.grandparent = info.grandparent;
        self.siblings = info.siblings;
        self.root_children = if info.pos == 1 {
            self.siblings.clone()
        } else {
            info.root_children
        };
        self.coordinating = None;
        if root_changed && !self.children.is_empty() && self.is_member() {
            // A new root: send this period's heartbeats now rather than later, so the news
            // reaches every level within a few hops instead of one level per period. (The
            // regular heartbeat is pushed back, so this costs no extra messages.)
            self.last_heartbeat = now;
            self.send_heartbeats(now);
        }
    }

    fn on_up(&mut self, now: u64, from: PublicKey, pos: Pos, children: Vec<Placed>, max_pos: Pos) {
        if !in_subtree(pos, max_pos, self.cfg.max_children) {
            return self.reject_invalid("subtree maximum outside the subtree");
        }
        match self.children.get_mut(&pos) {
            Some(slot) if slot.peer.key == from => {
                slot.last_heard = now;
                slot.down_since = None;
                slot.grandchildren = children;
                slot.max_pos = max_pos;
                self.learn_tree_end(now, max_pos);
            }
            _ => {
                let k = self.cfg.max_children;
                if self.is_member() && parent_of(pos, k) == Some(self.pos) {
                    // Not our child at that position (replaced while away): tell it.
                    self.send(Target::Key(from), TreeMsg::Evict { pos });
                }
            }
        }
    }

    fn member_tick(&mut self, now: u64) {
        let k = self.cfg.max_children;
        // Children: detect failures, report vacancies.
        let dead_after = self.cfg.dead_after_ms();
        let grace = self.cfg.link_grace_ms();
        let failed: Vec<Pos> = self
            .children
            .iter()
            .filter(|(_, s)| {
                now.saturating_sub(s.last_heard) > dead_after
                    || s.down_since
                        .is_some_and(|d| now.saturating_sub(d) >= grace && s.last_heard <= d)
            })
            .map(|(p, _)| *p)
            .collect();
        for pos in failed {
            if let Some(slot) = self.children.remove(&pos) {
                self.remember_lost(Some(slot.peer.clone()), slot.peer.addr.clone(), now);
                self.remember_former(slot.peer.key, now);
                self.vacant.insert(
                    pos,
                    Vacancy {
                        since: now,
                        last_report: None,
                        grandchildren: slot.grandchildren,
                        former: Some(slot.peer.key),
                    },
                );
                self.event(TreeEvent::ChildFailed { pos });
            }
        }
        // Child positions the tree size says must be held but that we never heard of.
        let (first, last) = child_range(self.pos, k);
        // (Noticed per position; a position unknown for a whole join timeout is vacant: its
        // attach would have arrived by then.)
        let known_size = self.size;
        let wait = self.cfg.join_timeout_ms();
        let mut unknown = BTreeMap::new();
        for c in first..=last.min(known_size) {
            if self.children.contains_key(&c)
                || self.vacant.contains_key(&c)
                || self.expect_move.contains_key(&c)
            {
                continue;
            }
            let since = self.unknown_since.get(&c).copied().unwrap_or(now);
            if now.saturating_sub(since) >= wait {
                self.vacant.insert(
                    c,
                    Vacancy {
                        since: now,
                        last_report: None,
                        grandchildren: Vec::new(),
                        former: None,
                    },
                );
            } else {
                unknown.insert(c, since);
            }
        }
        self.unknown_since = unknown;
        {}
        self.expect_move.retain(|_, (_, until)| *until > now);
        // Vacancies beyond the size are gone (the last node failed and the tree shrank).
        // (Only with a size heard after the vacancy opened: an older one says nothing. The
        // root's own size is always current.)
        let size = self.size;
        let heard = if self.pos == 1 {
            now
        } else {
            self.last_down_at
        };
        self.vacant.retain(|p, v| *p <= size || heard <= v.since);
        let report_every = self.cfg.report_every_ms();
        let due: Vec<Pos> = self
            .vacant
            .iter()
            .filter(|(_, v)| {
                v.last_report
                    .is_none_or(|t| now.saturating_sub(t) >= report_every)
            })
            .map(|(p, _)| *p)
            .collect();
        for pos in due {
            if let Some(v) = self.vacant.get_mut(&pos) {
                v.last_report = Some(now);
            }
            self.route(now, 1, Routed::Failed { pos });
        }
        // Parent: detect failure; orphans ask the grandparent; root children coordinate.
        self.parent_tick(now);
        // Heartbeats.
        if now.saturating_sub(self.last_heartbeat) >= self.cfg.heartbeat_ms {
            self.last_heartbeat = now;
            self.send_heartbeats(now);
        }
    }

    fn parent_tick(&mut self, now: u64) {
        let dead_after = self.cfg.dead_after_ms();
        let grace = self.cfg.link_grace_ms();
        let Some(parent) = self.parent.clone() else {
            return;
        };
        let dead = parent.failed_at.is_some()
            || now.saturating_sub(parent.last_heard) > dead_after
            || parent
                .down_since
                .is_some_and(|d| now.saturating_sub(d) >= grace && parent.last_heard <= d);
        if !dead {
            return;
        }
        let failed_at = match parent.failed_at {
            Some(t) => t,
            None => {
                self.remember_lost(Some(parent.peer.clone()), parent.peer.addr.clone(), now);
                if let Some(root) = self.root.as_ref().map(|r| r.key) {
                    self.remember_former(root, now);
                }
                if let Some(p) = self.parent.as_mut() {
                    p.failed_at = Some(now);
                }
                self.event(TreeEvent::ParentFailed { pos: parent.pos });
                now
            }
        };
        if parent.pos == 1 {
            return self.root_child_tick(now, failed_at);
        }
        if now.saturating_sub(failed_at) > self.cfg.orphan_giveup_ms() {
            return self.rejoin(now);
        }
        if now.saturating_sub(parent.last_orphan_ask) >= self.cfg.heartbeat_ms {
            if let Some(p) = self.parent.as_mut() {
                p.last_orphan_ask = now;
            }
            if let Some(gp) = self.grandparent.clone() {
                self.send(
                    Target::Peer(gp),
                    TreeMsg::Orphan {
                        pos: self.pos,
                        peer: self.me.clone(),
                    },
                );
            }
        }
    }

    /// The root failed and we are one of its children.
    fn root_child_tick(&mut self, now: u64, failed_at: Pos) {
        if now.saturating_sub(failed_at) > self.cfg.orphan_giveup_ms() * 2 {
            return self.rejoin(now);
        }
        if let Some(c) = &self.coordinating {
            if now < c.deadline {
                return;
            }
        }
        // Lower root children go first; each step down waits two heartbeats more.
        let rank = self
            .root_children
            .iter()
            .filter(|s| s.pos < self.pos)
            .count() as u64;
        let wait = rank * 2 * self.cfg.heartbeat_ms;
        if now.saturating_sub(failed_at) < wait {
            // Meanwhile ask the lower root children whether a new root is in place: the
            // coordinator's list of root children may be older than our position.
            let last_ask = self.parent.as_ref().map(|p| p.last_orphan_ask).unwrap_or(0);
            if now.saturating_sub(last_ask) >= self.cfg.heartbeat_ms / 2 {
                if let Some(p) = self.parent.as_mut() {
                    p.last_orphan_ask = now;
                }
                let lower: Vec<Peer> = self
                    .root_children
                    .iter()
                    .filter(|s| s.pos < self.pos && s.peer.key != self.me.key)
                    .map(|s| s.peer.clone())
                    .collect();
                for sib in lower {
                    let msg = TreeMsg::Orphan {
                        pos: self.pos,
                        peer: self.me.clone(),
                    };
                    self.send(Target::Peer(sib), msg);
                }
            }
            return;
        }
        let size = match &self.coordinating {
            // The previous mover never arrived: it is probably dead too; try the one before.
            Some(c) => c.size.saturating_sub(1),
            None => self.size,
        };
        self.coordinate_root_repair(now, size);
    }

    fn coordinate_root_repair(&mut self, now: u64, size: u64) {
        let k = self.cfg.max_children;
        let mover = size;
        let deadline = now + self.cfg.join_timeout_ms();
        self.coordinating = Some(Coordination { deadline, size });
        // Every root child but the mover keeps its position (our size may be stale, so do
        // not drop those above it; the new root learns the true size from their reports).
        let survivors: Vec<Placed> = self
            .root_children
            .iter()
            .filter(|s| s.pos != mover)
            .cloned()
            .collect();
        if mover <= 1 || mover == self.pos {
            // We are the last node ourselves: take the root position directly.
            let me = self.me.clone();
            let others: Vec<Placed> = survivors
                .iter()
                .filter(|s| s.peer.key != me.key)
                .cloned()
                .collect();
            self.become_root_by_move(now, size.saturating_sub(1).max(1), others.clone(), None);
            for s in others {
                let msg = self.adopt_msg(s.pos, &s.peer.key, 1, me.clone());
                self.send(Target::Peer(s.peer), msg);
            }
            return;
        }
        let ticket = self.next_rand();
        let new_size = size - 1;
        let seal = self.seal.seal(&move_seal_bytes(mover, 1, ticket, new_size));
        let order = Routed::Move {
            from_pos: mover,
            to_pos: 1,
            ticket,
            new_parent: None,
            signer: self.me.key,
            seal,
            size: new_size,
            root_children: survivors,
            coordinator: Some(self.me.clone()),
        };
        let msg = TreeMsg::Route { dest: mover, order };
        if let Some(child) = next_hop_down(self.pos, mover, k) {
            return self.send_to_child_pos(child, mover, msg);
        }
        if let Some(rc) = root_child_of(mover, k) {
            if let Some(s) = self.root_children.iter().find(|s| s.pos == rc).cloned() {
                self.send(Target::Peer(s.peer), msg);
            }
        }
    }

    fn send_heartbeats(&mut self, now: u64) {
        let info = self.down_info();
        let targets: Vec<Peer> = self.children.values().map(|s| s.peer.clone()).collect();
        for peer in targets {
            self.send(Target::Peer(peer), TreeMsg::Down { info: info.clone() });
        }
        self.send_up(now);
    }

    fn send_up(&mut self, _now: u64) {
        let Some(parent) = self.parent.clone() else {
            return;
        };
        if parent.failed_at.is_some() {
            return;
        }
        let msg = if parent.down_since.is_some() {
            // Re-establish the link (the I/O layer dials) and re-introduce ourselves.
            TreeMsg::Hello {
                pos: self.pos,
                ticket: None,
                peer: self.me.clone(),
                children: self.child_list(),
                voucher: None,
            }
        } else {
            TreeMsg::Up {
                pos: self.pos,
                children: self.child_list(),
                max_pos: self.subtree_max(),
            }
        };
        self.send(Target::Peer(parent.peer), msg);
    }

    fn down_info(&self) -> DownInfo {
        let siblings = self.child_list();
        DownInfo {
            pos: self.pos,
            root: self.root.clone().unwrap_or_else(|| self.me.clone()),
            size: self.size,
            grandparent: self.parent.as_ref().map(|p| p.peer.clone()),
            root_children: if self.pos == 1 {
                siblings.clone()
            } else {
                self.root_children.clone()
            },
            siblings,
        }
    }

    fn child_list(&self) -> Vec<Placed> {
        self.children
            .iter()
            .map(|(pos, s)| Placed {
                pos: *pos,
                peer: s.peer.clone(),
            })
            .collect()
    }

    // ----- broadcast ----------------------------------------------------------------------

    fn accept_broadcast(&mut self, from: Option<PublicKey>, msg: TreeMsg) {
        let TreeMsg::Bcast {
            id,
            origin,
            payload,
        } = &msg
        else {
            return;
        };
        // Accepted only over tree links (the parent, a child, or the grandparent or a
        // grandchild routing around a failed node), and only with a valid origin proof,
        // checked before anything is kept or forwarded. De-duplication (by a fixed-size
        // digest of the id) stops loops.
        if let Some(f) = from {
            if !(self.is_from_above(&f) || self.is_from_below(&f)) {
                return self.reject_unauthorized("broadcast not from a tree link");
            }
        }
        let digest = seen_digest(id);
        if self.seen.contains(&digest) {
            self.stats.duplicate_broadcasts += 1;
            return;
        }
        if from.is_some() && !self.seal.check_broadcast(origin, payload) {
            self.stats.rejected_broadcast_origin += 1;
            return self.reject_invalid("broadcast without a valid origin proof");
        }
        self.seen.insert(digest);
        self.seen_order.push_back(digest);
        while self.seen_order.len() > SEEN_CAPACITY {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.stats.delivered_broadcasts += 1;
        self.out.push(Action::Deliver {
            id: id.clone(),
            origin: *origin,
            payload: payload.clone(),
        });
        // Forward to every tree neighbour except where it came from.
        if let Some(parent) = self.parent.clone() {
            if Some(parent.peer.key) != from {
                if parent.failed_at.is_none() {
                    self.send(Target::Peer(parent.peer), msg.clone());
                } else if let Some(gp) = self.grandparent.clone() {
                    if Some(gp.key) != from {
                        self.send(Target::Peer(gp), msg.clone());
                    }
                }
            }
        }
        let child_positions: Vec<Pos> = self.children.keys().copied().collect();
        for pos in child_positions {
            let Some(slot) = self.children.get(&pos).cloned() else {
                continue;
            };
            if Some(slot.peer.key) == from {
                continue;
            }
            if slot.down_since.is_none() {
                self.send(Target::Peer(slot.peer), msg.clone());
            } else {
                // Route around the unreachable child, and keep a copy for whoever holds
                // the position next (the de-duplication makes a second copy harmless).
                for gc in slot.grandchildren.clone() {
                    if Some(gc.peer.key) != from {
                        self.send(Target::Peer(gc.peer), msg.clone());
                    }
                }
                self.enqueue(pos, msg.clone());
            }
        }
        for (pos, v) in self.vacant.clone() {
            for gc in v.grandchildren {
                if Some(gc.peer.key) != from {
                    self.send(Target::Peer(gc.peer), msg.clone());
                }
            }
            self.enqueue(pos, msg.clone());
        }
    }

    // ----- helpers ------------------------------------------------------------------------

    fn touch(&mut self, now: u64, from: &PublicKey) {
        if let Some(p) = self.parent.as_mut() {
            if p.peer.key == *from && p.failed_at.is_none() {
                p.last_heard = now;
                p.down_since = None;
            }
        }
        for slot in self.children.values_mut() {
            if slot.peer.key == *from {
                slot.last_heard = now;
                slot.down_since = None;
            }
        }
    }

    fn is_parent(&self, key: &PublicKey) -> bool {
        self.parent.as_ref().is_some_and(|p| p.peer.key == *key)
    }

    fn is_from_above(&self, key: &PublicKey) -> bool {
        self.is_parent(key)
            || self.grandparent.as_ref().is_some_and(|g| g.key == *key)
            || (self.parent.as_ref().is_some_and(|p| p.pos == 1)
                && self.root_children.iter().any(|s| s.peer.key == *key))
    }

    fn is_from_below(&self, key: &PublicKey) -> bool {
        self.children
            .values()
            .any(|s| s.peer.key == *key || s.grandchildren.iter().any(|g| g.peer.key == *key))
            || self
                .vacant
                .values()
                .any(|v| v.grandchildren.iter().any(|g| g.peer.key == *key))
    }

    fn is_tree_neighbor(&self, key: &PublicKey) -> bool {
        *key == self.me.key
            || self.is_from_above(key)
            || self.is_from_below(key)
            || self.siblings.iter().any(|s| s.peer.key == *key)
    }

    fn send(&mut self, to: Target, msg: TreeMsg) {
        let to_self = match &to {
            Target::Peer(p) => p.key == self.me.key,
            Target::Key(k) => *k == self.me.key,
            Target::Addr(a) => *a == self.me.addr,
        };
        {
            if to_self {
                // Loopback (e.g. a coordinator adopting itself) is handled by the caller.
                return;
            }
        }
        match &msg {
            TreeMsg::Down { .. } | TreeMsg::Up { .. } => self.stats.sent_heartbeat += 1,
            TreeMsg::Bcast { .. } => self.stats.sent_broadcast += 1,
            m if m.is_topology() => self.stats.sent_topology += 1,
            _ => {}
        }
        self.out.push(Action::Send { to, msg });
    }

    fn event(&mut self, e: TreeEvent) {
        self.out.push(Action::Event(e));
    }

    fn reject_unauthorized(&mut self, reason: &'static str) {
        self.stats.rejected_unauthorized += 1;
        self.event(TreeEvent::Rejected { reason });
    }

    fn reject_invalid(&mut self, reason: &'static str) {
        self.stats.rejected_invalid += 1;
        self.event(TreeEvent::Rejected { reason });
    }

    fn next_rand(&mut self) -> u64 {
        // splitmix64: deterministic for simulation; the node seeds it from the OS RNG.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod adversary_tests;
#[cfg(test)]
mod tests;
