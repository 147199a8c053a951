//! Deterministic simulation of many [`TreeNode`]s on a virtual clock.
//!
//! A discrete-event loop: messages take a random latency (FIFO per directed link, like a TCP
//! connection), may be lost, may be cut by a partition; crashes are either "loud" (the
//! neighbours' connections reset, as after `kill -9`) or silent (only timeouts notice).
//! Everything derives from one seed, so a failing run replays exactly. Used by the unit tests
//! and by `borg bench tree` for the 10,000-node figures; nothing here sleeps or reads a clock.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::geometry::{child_range, parent_of, tree_depth, Pos};
use super::{Action, OrderSeal, Peer, Target, TreeConfig, TreeMsg, TreeNode, TreeState};
use crate::identity::{PublicKey, SecretKey};

/// Network behaviour of the simulation.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub seed: u64,
    pub latency_min_ms: u64,
    pub latency_max_ms: u64,
    /// Probability of losing a message, in parts per million.
    pub loss_ppm: u32,
    /// Whether a crash resets the neighbours' connections at once (like kill -9).
    pub loud_crashes: bool,
    /// Granularity of node timers.
    pub tick_ms: u64,
    /// Check the safety invariants after every event (slow for big networks).
    pub check_every_event: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            latency_min_ms: 1,
            latency_max_ms: 20,
            loss_ppm: 0,
            loud_crashes: true,
            tick_ms: 50,
            check_every_event: false,
        }
    }
}

/// A stand-in for ECDSA seals: binds the seal to the signer and bytes, nothing more. The
/// real signatures are exercised by the multi-process tests.
#[derive(Debug, Clone, Copy)]
pub struct SimSeal {
    pub signer: PublicKey,
}

fn sim_seal_text(signer: &PublicKey, bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(signer.as_bytes());
    h.update(bytes);
    let d = h.finalize();
    d.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

impl OrderSeal for SimSeal {
    fn seal(&self, bytes: &[u8]) -> String {
        sim_seal_text(&self.signer, bytes)
    }
    fn check(&self, signer: &PublicKey, bytes: &[u8], seal: &str) -> bool {
        sim_seal_text(signer, bytes) == seal
    }
    /// Stand-in origin proof: a payload that carries `origin_env` must carry
    /// [`sim_origin_proof`] of its origin there; other payloads pass (the node's check
    /// requires the real envelope, and the multi-process tests exercise it).
    fn check_broadcast(&self, origin: &PublicKey, payload: &Value) -> bool {
        match payload.get("origin_env") {
            None => true,
            Some(v) => v.as_str() == Some(sim_origin_proof(origin).as_str()),
        }
    }
}

/// The simulation's stand-in for a broadcast's origin envelope, for tests of the check.
pub fn sim_origin_proof(origin: &PublicKey) -> String {
    sim_seal_text(origin, b"broadcast-origin")
}

#[allow(clippy::large_enum_variant)] // queued events are mostly deliveries anyway
#[derive(Debug)]
enum Event {
    Deliver {
        to: usize,
        from: PublicKey,
        msg: TreeMsg,
    },
    LinkDown {
        to: usize,
        key: PublicKey,
    },
}

/// Per-run counters.
#[derive(Debug, Default, Clone)]
pub struct SimStats {
    pub sent_by_kind: BTreeMap<&'static str, u64>,
    pub topology_messages: u64,
    pub broadcast_transmissions: u64,
    pub lost: u64,
    pub events: u64,
    /// (node index, broadcast id) -> times delivered to the application.
    pub deliveries: HashMap<(usize, String), u32>,
}

/// One simulated node.
pub struct SimNode {
    pub node: TreeNode,
    pub alive: bool,
    pub key: PublicKey,
    pub addr: String,
    group: u8,
}

/// The simulated network.
pub struct Sim {
    pub cfg: SimConfig,
    pub tree_cfg: TreeConfig,
    pub now: u64,
    pub nodes: Vec<SimNode>,
    pub stats: SimStats,
    by_key: HashMap<PublicKey, usize>,
    by_addr: HashMap<String, usize>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    seq: u64,
    link_last: HashMap<(u32, u32), u64>,
    next_tick: u64,
    rng: u64,
    partitioned: bool,
}

/// A deterministic key for node `i` of run `seed`.
pub fn sim_key(seed: u64, i: usize) -> SecretKey {
    let mut ctr = 0u32;
    loop {
        let mut h = Sha256::new();
        h.update(seed.to_le_bytes());
        h.update((i as u64).to_le_bytes());
        h.update(ctr.to_le_bytes());
        let d: [u8; 32] = h.finalize().into();
        if let Some(k) = SecretKey::from_scalar_bytes(&d) {
            return k;
        }
        ctr += 1;
    }
}

impl Sim {
    pub fn new(cfg: SimConfig, tree_cfg: TreeConfig) -> Self {
        Self {
            cfg,
            tree_cfg,
            now: 0,
            nodes: Vec::new(),
            stats: SimStats::default(),
            by_key: HashMap::new(),
            by_addr: HashMap::new(),
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            link_last: HashMap::new(),
            next_tick: 0,
            rng: cfg.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1,
            partitioned: false,
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn addr_of(i: usize) -> String {
        format!("sim:{i}")
    }

    /// Add a node (not started). Contacts are node indices.
    pub fn add_node(&mut self, contacts: &[usize]) -> usize {
        let i = self.nodes.len();
        let key = sim_key(self.cfg.seed, i);
        let node = self.make_node(i, &key, contacts);
        self.by_key.insert(key.public(), i);
        self.by_addr.insert(Self::addr_of(i), i);
        self.nodes.push(SimNode {
            node,
            alive: false,
            key: key.public(),
            addr: Self::addr_of(i),
            group: 0,
        });
        i
    }

    fn make_node(&mut self, i: usize, key: &SecretKey, contacts: &[usize]) -> TreeNode {
        let me = Peer {
            key: key.public(),
            addr: Self::addr_of(i),
            mon: String::new(),
        };
        let contacts = contacts.iter().map(|c| Self::addr_of(*c)).collect();
        let seed = self.rand();
        TreeNode::new(
            self.tree_cfg,
            me,
            contacts,
            Box::new(SimSeal {
                signer: key.public(),
            }),
            seed,
        )
    }

    /// Start node `i` now.
    pub fn start(&mut self, i: usize) {
        let now = self.now;
        self.nodes[i].alive = true;
        self.nodes[i].node.start(now);
        self.dispatch(i);
    }

    /// Crash node `i`.
    pub fn crash(&mut self, i: usize) {
        if !self.nodes[i].alive {
            return;
        }
        self.nodes[i].alive = false;
        if !self.cfg.loud_crashes {
            return;
        }
        let key = self.nodes[i].key;
        // Everyone holding a connection to it sees a reset: its tree neighbours.
        let view = self.nodes[i].node.view();
        let mut neighbours: Vec<PublicKey> = view.children.iter().map(|c| c.peer.key).collect();
        if let Some(p) = view.parent {
            neighbours.push(p.peer.key);
        }
        for j in 0..self.nodes.len() {
            if self.nodes[j].alive {
                let v = self.nodes[j].node.view();
                if v.parent.as_ref().is_some_and(|p| p.peer.key == key) {
                    neighbours.push(self.nodes[j].key);
                }
            }
        }
        neighbours.sort();
        neighbours.dedup();
        for n in neighbours {
            if let Some(&j) = self.by_key.get(&n) {
                let at = self.now + self.latency();
                self.push(at, Event::LinkDown { to: j, key });
            }
        }
    }

    /// Restart node `i` with its old key, joining through `contacts`.
    pub fn restart(&mut self, i: usize, contacts: &[usize]) {
        let key = sim_key(self.cfg.seed, i);
        self.nodes[i].node = self.make_node(i, &key, contacts);
        self.start(i);
    }

    /// Split the network: nodes with `group(i) != group(j)` cannot exchange messages.
    pub fn partition(&mut self, group: impl Fn(usize) -> u8) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            n.group = group(i);
        }
        self.partitioned = true;
    }

    pub fn heal(&mut self) {
        for n in self.nodes.iter_mut() {
            n.group = 0;
        }
        self.partitioned = false;
    }

    fn latency(&mut self) -> u64 {
        let span = self
            .cfg
            .latency_max_ms
            .saturating_sub(self.cfg.latency_min_ms)
            + 1;
        self.cfg.latency_min_ms + self.rand() % span
    }

    fn push(&mut self, at: u64, ev: Event) {
        let id = self.seq;
        self.seq += 1;
        self.events.insert(id, ev);
        self.queue.push(Reverse((at, id)));
    }

    fn dispatch(&mut self, i: usize) {
        let actions = self.nodes[i].node.drain();
        for a in actions {
            match a {
                Action::Send { to, msg } => self.send(i, to, msg),
                Action::Deliver { id, .. } => {
                    *self.stats.deliveries.entry((i, id)).or_insert(0) += 1;
                }
                Action::Event(_) => {}
            }
        }
    }

    fn send(&mut self, from: usize, to: Target, msg: TreeMsg) {
        *self.stats.sent_by_kind.entry(msg.kind()).or_insert(0) += 1;
        if msg.is_topology() {
            self.stats.topology_messages += 1;
        }
        if matches!(msg, TreeMsg::Bcast { .. }) {
            self.stats.broadcast_transmissions += 1;
        }
        let target = match &to {
            Target::Peer(p) => self.by_key.get(&p.key).copied(),
            Target::Key(k) => self.by_key.get(k).copied(),
            Target::Addr(a) => self.by_addr.get(a).copied(),
        };
        let Some(j) = target else {
            return;
        };
        if let Target::Addr(a) = &to {
            // (What the TLS handshake of a dial to an address shows.)
            let key = self.nodes[j].key;
            self.nodes[from].node.contact_answered(a, key);
        }
        let from_key = self.nodes[from].key;
        if !self.nodes[j].alive {
            if self.cfg.loud_crashes {
                // Connection refused.
                let at = self.now + self.latency();
                let key = self.nodes[j].key;
                self.push(at, Event::LinkDown { to: from, key });
            }
            return;
        }
        if self.partitioned && self.nodes[from].group != self.nodes[j].group {
            self.stats.lost += 1;
            return;
        }
        if self.cfg.loss_ppm > 0 && (self.rand() % 1_000_000) < self.cfg.loss_ppm as u64 {
            self.stats.lost += 1;
            return;
        }
        let lat = self.latency();
        let link = (from as u32, j as u32);
        let at = (self.now + lat).max(self.link_last.get(&link).copied().unwrap_or(0));
        self.link_last.insert(link, at);
        self.push(
            at,
            Event::Deliver {
                to: j,
                from: from_key,
                msg,
            },
        );
    }

    /// Process events up to and including virtual time `until`.
    pub fn run_until(&mut self, until: u64) -> Result<(), String> {
        loop {
            let next_event = self.queue.peek().map(|Reverse((t, _))| *t);
            let next = match next_event {
                Some(t) if t < self.next_tick => t,
                _ => self.next_tick,
            };
            if next > until {
                self.now = until;
                return Ok(());
            }
            self.now = next;
            if next_event == Some(next) && next < self.next_tick {
                let Some(Reverse((_, id))) = self.queue.pop() else {
                    continue;
                };
                let Some(ev) = self.events.remove(&id) else {
                    continue;
                };
                self.stats.events += 1;
                match ev {
                    Event::Deliver { to, from, msg } => {
                        if self.nodes[to].alive {
                            let now = self.now;
                            self.nodes[to].node.handle(now, from, msg);
                            self.dispatch(to);
                        }
                    }
                    Event::LinkDown { to, key } => {
                        if self.nodes[to].alive {
                            let now = self.now;
                            self.nodes[to].node.link_down(now, &key);
                            self.dispatch(to);
                        }
                    }
                }
                // (While partitioned, nodes cannot yet tell which tree they are in: root
                // knowledge lags, so per-tree attribution is checked once healed.)
                if self.cfg.check_every_event && !self.partitioned {
                    self.check_safety()?;
                }
            } else {
                let now = self.now;
                for i in 0..self.nodes.len() {
                    if self.nodes[i].alive {
                        self.nodes[i].node.tick(now);
                        self.dispatch(i);
                    }
                }
                self.next_tick = now + self.cfg.tick_ms;
                if (self.cfg.check_every_event || self.nodes.len() <= 1000) && !self.partitioned {
                    self.check_safety()?;
                }
            }
        }
    }

    /// Run until `done(self)` holds (checked every tick) or `deadline`; returns the time it
    /// took, or an error with the last tree check's complaint.
    pub fn run_until_converged(&mut self, deadline: u64) -> Result<u64, String> {
        let start = self.now;
        let mut last_err = String::new();
        while self.now < deadline {
            let step = (self.now + self.cfg.tick_ms).min(deadline);
            self.run_until(step)?;
            match self.check_tree() {
                Ok(_) => return Ok(self.now - start),
                Err(e) => last_err = e,
            }
        }
        Err(format!("not converged by t={deadline}: {last_err}"))
    }

    /// Safety invariants that must hold after every step, even mid-repair: every child
    /// slot is a real child position, no node is its own parent or child, no two alive
    /// nodes hold the same position in the same tree while both are acknowledged by the
    /// same parent.
    pub fn check_safety(&self) -> Result<(), String> {
        let k = self.tree_cfg.max_children;
        let mut acknowledged: HashMap<(PublicKey, Pos), PublicKey> = HashMap::new();
        for n in self.nodes.iter().filter(|n| n.alive) {
            let v = n.node.view();
            let Some(pos) = v.position else { continue };
            for c in &v.children {
                if parent_of(c.pos, k) != Some(pos) {
                    return Err(format!("node at {pos} lists child at {}", c.pos));
                }
                if c.peer.key == n.key {
                    return Err(format!("node at {pos} is its own child"));
                }
                let root = v.root.as_ref().map(|r| r.key).unwrap_or(n.key);
                if let Some(other) = acknowledged.insert((root, c.pos), c.peer.key) {
                    if other != c.peer.key {
                        return Err(format!(
                            "two parents acknowledge different holders of {}",
                            c.pos
                        ));
                    }
                }
            }
            if let Some(p) = &v.parent {
                if p.peer.key == n.key {
                    return Err(format!("node at {pos} is its own parent"));
                }
            }
        }
        Ok(())
    }

    /// The full structural invariants of a settled tree: every alive node is a member of
    /// one tree with one root, positions 1..N are each held exactly once, parent and child
    /// links agree in both directions, nothing is vacant and the root knows N.
    pub fn check_tree(&self) -> Result<TreeSummary, String> {
        let k = self.tree_cfg.max_children;
        let alive: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].alive)
            .collect();
        let mut by_pos: BTreeMap<Pos, usize> = BTreeMap::new();
        let mut roots = Vec::new();
        for &i in &alive {
            let v = self.nodes[i].node.view();
            let Some(pos) = v.position else {
                return Err(format!("node {i} is not a member ({})", v.state.as_str()));
            };
            if let Some(other) = by_pos.insert(pos, i) {
                return Err(format!("position {pos} held by nodes {other} and {i}"));
            }
            if pos == 1 {
                roots.push(i);
            }
        }
        if roots.len() != 1 {
            return Err(format!("{} roots", roots.len()));
        }
        let n = alive.len() as u64;
        if by_pos.keys().next_back().copied() != Some(n) {
            return Err(format!(
                "positions are not 1..{n}: last is {:?}",
                by_pos.keys().next_back()
            ));
        }
        let root_view = self.nodes[roots[0]].node.view();
        if root_view.size != n {
            return Err(format!(
                "root thinks size {} but {n} nodes hold positions",
                root_view.size
            ));
        }
        let mut max_depth = 0;
        for (&pos, &i) in &by_pos {
            let v = self.nodes[i].node.view();
            if !v.vacant.is_empty() {
                return Err(format!("node at {pos} has vacancies {:?}", v.vacant));
            }
            let want_parent = parent_of(pos, k);
            match (&v.parent, want_parent) {
                (None, None) => {}
                (Some(p), Some(wp)) => {
                    let holder = by_pos.get(&wp).copied();
                    if p.pos != wp || holder.map(|h| self.nodes[h].key) != Some(p.peer.key) {
                        return Err(format!("node at {pos} has the wrong parent"));
                    }
                }
                _ => return Err(format!("node at {pos} parent link mismatch")),
            }
            let (first, last) = child_range(pos, k);
            let want: Vec<(Pos, PublicKey)> = (first..=last.min(n))
                .filter_map(|c| by_pos.get(&c).map(|&h| (c, self.nodes[h].key)))
                .collect();
            let have: Vec<(Pos, PublicKey)> =
                v.children.iter().map(|c| (c.pos, c.peer.key)).collect();
            if want != have {
                return Err(format!(
                    "node at {pos} has children {:?}, should be {:?}",
                    have.iter().map(|c| c.0).collect::<Vec<_>>(),
                    want.iter().map(|c| c.0).collect::<Vec<_>>()
                ));
            }
            max_depth = max_depth.max(super::geometry::depth_of(pos, k));
        }
        Ok(TreeSummary {
            size: n,
            depth: max_depth,
            root: roots[0],
        })
    }

    /// Whether every alive node names the same root. Root knowledge travels with the
    /// heartbeats (one level per period), so this lags the structure by up to depth periods.
    pub fn check_root_agreement(&self) -> Result<(), String> {
        let root = self.holder_of(1).ok_or("no root")?;
        let key = self.nodes[root].key;
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.alive) {
            if n.node.view().root.map(|r| r.key) != Some(key) {
                return Err(format!("node {i} follows another root"));
            }
        }
        Ok(())
    }

    /// Node `i` hears of node `j` outside the tree (as from a LAN beacon).
    pub fn meet(&mut self, i: usize, j: usize) {
        let now = self.now;
        let peer = self.nodes[j].node.me().clone();
        self.nodes[i].node.meet(now, peer);
        self.dispatch(i);
    }

    /// A message from a key outside the simulation (an attacker) reaches node `i` now; what
    /// node `i` sends back to such a key goes nowhere.
    pub fn inject(&mut self, i: usize, from: PublicKey, msg: TreeMsg) {
        let now = self.now;
        self.nodes[i].node.handle(now, from, msg);
        self.dispatch(i);
    }

    /// Originate a broadcast at node `i`; returns its id.
    pub fn broadcast_from(&mut self, i: usize, payload: Value) -> String {
        let id = self.nodes[i].node.broadcast(payload);
        self.dispatch(i);
        id
    }

    /// How many alive nodes delivered broadcast `id`, and the most times any one did.
    pub fn delivery_count(&self, id: &str) -> (usize, u32) {
        let mut nodes = 0;
        let mut max = 0;
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.alive {
                continue;
            }
            if let Some(c) = self.stats.deliveries.get(&(i, id.to_string())) {
                nodes += 1;
                max = max.max(*c);
            }
        }
        (nodes, max)
    }

    /// Index of the node holding `pos` (alive members only).
    pub fn holder_of(&self, pos: Pos) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.alive && n.node.view().position == Some(pos))
    }

    pub fn alive_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.alive).count()
    }

    pub fn states(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for n in self.nodes.iter().filter(|n| n.alive) {
            *m.entry(n.node.state().as_str()).or_insert(0) += 1;
        }
        m
    }

    /// Depth bound used for the per-join message budget: 4*depth + 8.
    pub fn join_budget(size: u64, k: u64) -> u64 {
        4 * tree_depth(size, k) as u64 + 8
    }
}

/// What a settled tree looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeSummary {
    pub size: u64,
    pub depth: u32,
    pub root: usize,
}

impl TreeState {
    pub fn is_member(&self) -> bool {
        !matches!(self, TreeState::Joining)
    }
}
