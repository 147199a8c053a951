//! An in-memory network of node runtimes, for tests: no sockets, no sleeps.
//!
//! Each node is the runtime's sans-IO core ([`super::host::Host`]: its tree state machine, its
//! cell, envelope seal/open with the replay cache and the ±30 s window) on its own
//! [`NetClock`]. Frames go from host to host through one queue instead of TLS links: a frame
//! sent to an address or a peer reaches the node with that address or key, and the receiver
//! sees the sender's key as the link's authenticated peer (as the TLS handshake gives it).
//! Time is `tokio::time`: run it under `#[tokio::test(start_paused = true)]` and
//! [`MemNet::run_for`] moves virtual time from event to event (the next frame due, tree tick
//! or cell timer), without waiting for real time. Links deliver at once, or after a latency
//! drawn per frame ([`MemNet::set_latency`]: a base plus a jitter made of two uniform parts,
//! like two queues in a row), from a seeded generator.
//!
//! What it leaves out is the I/O around the host: links and their bounds, dialing, NAT roles,
//! relays, the receptor and monitor servers. Those are tested over loopback sockets.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use borg_proto::crono::sim::Rng;
use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::tree::{Peer, Target, TreeConfig, TreeNode};
use serde_json::Value;

use super::host::{Host, HostRequest};
use super::EcdsaSeal;
use crate::cell::{Cell, CellInit};
use crate::clock::NetClock;

/// Blocking jobs of one node run per step at most.
const WORK_PER_STEP: usize = 1024;

/// Frames handled per step at most (a bound on a cell that answers every frame with two).
const FRAMES_PER_STEP: usize = 100_000;

struct MemNode {
    host: Host,
    key: PublicKey,
    addr: String,
    clock: Arc<NetClock>,
    /// Refusals by wire code (what the actor counts in `borg_rejected_total`).
    rejected: BTreeMap<&'static str, u64>,
    /// Next tree tick (mono ms).
    next_tick: u64,
    /// Nodes whose frames are dropped to and from this one (a cut link).
    cut: Vec<usize>,
    /// Answers to deferred receptor requests, by ticket, until taken.
    replies: BTreeMap<u64, Result<Value, (u16, &'static str, String)>>,
    next_ticket: u64,
}

/// Nodes wired together in memory.
pub struct MemNet {
    nodes: Vec<MemNode>,
    /// Frames due now: (from, to, frame).
    queue: VecDeque<(usize, usize, Vec<u8>)>,
    /// Frames in flight: (due, sequence), and by sequence (from, to, frame).
    flight: BinaryHeap<Reverse<(tokio::time::Instant, u64)>>,
    in_flight: BTreeMap<u64, (usize, usize, Vec<u8>)>,
    seq: u64,
    /// One-way latency: base and jitter, µs (each frame: base - jitter + two uniform draws
    /// of up to one jitter each).
    latency: Option<(u64, u64)>,
    rng: Rng,
    max_children: u64,
    heartbeat_ms: u64,
    frames: u64,
}

impl MemNet {
    /// A network whose trees have `max_children` and `heartbeat_ms`, delivering at once.
    pub fn new(max_children: u64, heartbeat_ms: u64) -> Self {
        Self {
            nodes: Vec::new(),
            queue: VecDeque::new(),
            flight: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            seq: 0,
            latency: None,
            rng: Rng::new(1),
            max_children,
            heartbeat_ms,
            frames: 0,
        }
    }

    /// Every frame from now on takes `base ± jitter` one way (two uniform parts, so most
    /// delays are near `base`), drawn from a generator seeded with `seed`.
    pub fn set_latency(&mut self, base: Duration, jitter: Duration, seed: u64) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.latency = Some((us(base), us(jitter).min(us(base))));
        self.rng = Rng::new(seed);
    }

    /// Queue a frame: due now, or after a drawn latency.
    fn send(&mut self, from: usize, to: usize, frame: Vec<u8>) {
        let Some((base, jitter)) = self.latency else {
            self.queue.push_back((from, to, frame));
            return;
        };
        let us = base - jitter + self.rng.range(0, jitter) + self.rng.range(0, jitter);
        self.seq += 1;
        let due = tokio::time::Instant::now() + Duration::from_micros(us);
        self.flight.push(Reverse((due, self.seq)));
        self.in_flight.insert(self.seq, (from, to, frame));
    }

    /// Add a node of cell type `name` whose local clock reads `local_us` now, joining through
    /// the nodes `contacts` (none: it is a root of one); `make` builds its cell (a registry
    /// constructor). Returns its index.
    pub fn add(
        &mut self,
        name: &'static str,
        local_us: u64,
        contacts: &[usize],
        make: impl FnOnce(CellInit) -> Box<dyn Cell>,
    ) -> usize {
        let i = self.nodes.len();
        let secret = SecretKey::generate();
        let key = secret.public();
        // Addresses only name nodes here; nothing is ever sent to them.
        let addr = format!("127.77.{}.{}:13390", i / 250, i % 250 + 1);
        let clock = NetClock::starting_at(local_us, 0);
        let contact_addrs: Vec<String> = contacts
            .iter()
            .filter_map(|&c| self.nodes.get(c).map(|n| n.addr.clone()))
            .collect();
        let cell = make(CellInit {
            name,
            key,
            clock: clock.clone(),
            contacts: contact_addrs.clone(),
            data_dir: None,
        });
        let me = Peer {
            key,
            addr: addr.clone(),
            mon: addr.clone(),
        };
        let mut tree = TreeNode::new(
            TreeConfig::new(self.max_children, self.heartbeat_ms),
            me,
            contact_addrs,
            Box::new(EcdsaSeal {
                key: secret.clone(),
            }),
            0x5eed ^ i as u64,
        );
        tree.start(clock.mono_ms());
        let host = Host::new(
            secret,
            addr.clone(),
            name.to_string(),
            self.max_children,
            clock.clone(),
            tree,
            cell,
        );
        self.nodes.push(MemNode {
            host,
            key,
            addr,
            clock,
            rejected: BTreeMap::new(),
            next_tick: 0,
            cut: Vec::new(),
            replies: BTreeMap::new(),
            next_ticket: 0,
        });
        self.settle();
        i
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn key(&self, i: usize) -> PublicKey {
        self.nodes[i].key
    }

    pub fn clock(&self, i: usize) -> Arc<NetClock> {
        self.nodes[i].clock.clone()
    }

    /// Frames delivered so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Node `i`'s `/status` as the runtime builds it from its tree and cell.
    pub fn status(&self, i: usize) -> Value {
        let host = &self.nodes[i].host;
        host.status(&host.tree.view())
    }

    /// Node `i`'s cell metrics (the lines its cell adds to `/metrics`).
    pub fn metrics(&self, i: usize) -> String {
        self.nodes[i].host.cell_metrics()
    }

    /// Node `i`'s tree counters.
    pub fn tree_stats(&self, i: usize) -> borg_proto::tree::TreeStats {
        self.nodes[i].host.tree.stats.clone()
    }

    /// Cell broadcasts and binary frames node `i` dropped as unsendable since the last call.
    pub fn take_dropped(&mut self, i: usize) -> u64 {
        self.nodes[i].host.take_dropped()
    }

    /// How many frames node `i` refused with wire code `code`.
    pub fn rejected(&self, i: usize, code: &str) -> u64 {
        self.nodes[i].rejected.get(code).copied().unwrap_or(0)
    }

    /// Cut (or mend) the link between `a` and `b`: frames between them are dropped.
    pub fn set_cut(&mut self, a: usize, b: usize, cut: bool) {
        for (x, y) in [(a, b), (b, a)] {
            let list = &mut self.nodes[x].cut;
            list.retain(|&n| n != y);
            if cut {
                list.push(y);
            }
        }
    }

    /// A receptor request of the cell's kinds to node `i`, from `from`.
    pub fn request(
        &mut self,
        i: usize,
        from: PublicKey,
        kind: &str,
        body: Value,
    ) -> Result<Value, (u16, &'static str, String)> {
        match self.request_later(i, from, kind, body) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(ticket)) => self
                .take_reply(i, ticket)
                .unwrap_or_else(|| Err((504, "pending", "the cell deferred its answer".into()))),
            Err(e) => Err(e),
        }
    }

    /// A receptor request that the cell may answer later: `Ok(Ok(answer))` at once,
    /// `Ok(Err(ticket))` for [`MemNet::take_reply`] once the net has run, or the error.
    #[allow(clippy::type_complexity)]
    pub fn request_later(
        &mut self,
        i: usize,
        from: PublicKey,
        kind: &str,
        body: Value,
    ) -> Result<Result<Value, u64>, (u16, &'static str, String)> {
        self.nodes[i].next_ticket += 1;
        let ticket = self.nodes[i].next_ticket;
        let r = self.nodes[i].host.handle_request(
            HostRequest::Cell {
                from,
                kind: kind.to_string(),
                body,
            },
            ticket,
        );
        self.settle();
        r.map(|v| v.ok_or(ticket))
    }

    /// The deferred answer to `ticket` at node `i`, if the cell gave it.
    pub fn take_reply(
        &mut self,
        i: usize,
        ticket: u64,
    ) -> Option<Result<Value, (u16, &'static str, String)>> {
        self.nodes[i].replies.remove(&ticket)
    }

    /// Node `from` seals `kind`/`body` and it arrives at `to` (as if sent over their link,
    /// at once whatever the latency).
    pub fn inject(&mut self, from: usize, to: usize, kind: &str, body: Value) {
        let frame = self.seal(from, kind, body);
        self.inject_bytes(from, to, frame);
    }

    /// A frame sealed by node `from` now (not sent).
    pub fn seal(&self, from: usize, kind: &str, body: Value) -> Vec<u8> {
        self.nodes[from].host.seal_kind_body(kind, body)
    }

    /// Raw bytes arrive at `to` on `from`'s link (at once, whatever the latency).
    pub fn inject_bytes(&mut self, from: usize, to: usize, bytes: Vec<u8>) {
        self.queue.push_back((from, to, bytes));
        self.settle();
    }

    /// Move virtual time forward by `d`, event by event: frames due, tree ticks, cell
    /// timers. Under a paused tokio clock this takes no real time.
    pub async fn run_for(&mut self, d: Duration) {
        let end = tokio::time::Instant::now() + d;
        self.run_until_instant(end, |_| false).await;
    }

    /// Run until `done` holds (checked after every event) or `limit` of virtual time passed;
    /// returns whether it held.
    pub async fn run_until(&mut self, limit: Duration, done: impl FnMut(&Self) -> bool) -> bool {
        let end = tokio::time::Instant::now() + limit;
        self.run_until_instant(end, done).await
    }

    async fn run_until_instant(
        &mut self,
        end: tokio::time::Instant,
        mut done: impl FnMut(&Self) -> bool,
    ) -> bool {
        loop {
            self.timers();
            self.arrivals();
            self.settle();
            if done(self) {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= end {
                return false;
            }
            // Never a zero-length step: a timer asking for "now" again costs 100 µs of
            // virtual time, never a hot loop.
            let next = self
                .next_event()
                .map_or(end, |t| t.min(end))
                .max(now + Duration::from_micros(100));
            tokio::time::sleep_until(next).await;
        }
    }

    /// The next frame due or timer (tree tick, cell timeout) of any node.
    fn next_event(&self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let mut next = self.flight.peek().map(|Reverse((t, _))| *t);
        for n in &self.nodes {
            let mono = n.clock.mono_ms();
            let mut take = |ms: u64| {
                let t = now + Duration::from_millis(ms.saturating_sub(mono));
                next = Some(next.map_or(t, |x| x.min(t)));
            };
            take(n.next_tick);
            if let Some(t) = n.host.poll_timeout() {
                take(t.max(mono + 1));
            }
        }
        next
    }

    /// Frames in flight whose time has come go to the queue.
    fn arrivals(&mut self) {
        let now = tokio::time::Instant::now();
        while let Some(Reverse((due, seq))) = self.flight.peek().copied() {
            if due > now {
                break;
            }
            self.flight.pop();
            if let Some(f) = self.in_flight.remove(&seq) {
                self.queue.push_back(f);
            }
        }
    }

    fn timers(&mut self) {
        let tick = (self.heartbeat_ms / 10).clamp(10, 200);
        for n in &mut self.nodes {
            let now = n.clock.mono_ms();
            if now >= n.next_tick {
                n.next_tick = now + tick;
                n.host.handle_tick();
            }
            if n.host.poll_timeout().is_some_and(|t| t <= now) {
                n.host.handle_timeout();
            }
        }
    }

    /// Carry out and deliver until nothing moves (bounded).
    fn settle(&mut self) {
        for _ in 0..FRAMES_PER_STEP {
            for i in 0..self.nodes.len() {
                self.nodes[i].host.carry_out();
                // Blocking jobs run inline here: deterministic, one at a time (bounded, as a
                // cell could keep asking).
                for _ in 0..WORK_PER_STEP {
                    let Some(work) = self.nodes[i].host.poll_work() else {
                        break;
                    };
                    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                        .unwrap_or_else(|_| Box::new(crate::cell::WorkPanicked));
                    self.nodes[i].host.handle_work_done(done);
                    self.nodes[i].host.carry_out();
                }
                while let Some((ticket, r)) = self.nodes[i].host.poll_reply() {
                    self.nodes[i].replies.insert(ticket, r);
                }
                while let Some((to, frame)) = self.nodes[i].host.poll_transmit() {
                    if let Some(j) = self.route(i, &to) {
                        self.send(i, j, frame);
                    }
                }
            }
            let Some((from, to, bytes)) = self.queue.pop_front() else {
                return;
            };
            self.deliver(from, to, &bytes);
        }
    }

    /// Which node a target names; an address reached the first time answers with its key
    /// (what a completed dial tells the actor).
    fn route(&mut self, from: usize, to: &Target) -> Option<usize> {
        let j = match to {
            Target::Key(k) => self.nodes.iter().position(|n| n.key == *k)?,
            Target::Peer(p) => self.nodes.iter().position(|n| n.key == p.key)?,
            Target::Addr(a) => {
                let j = self.nodes.iter().position(|n| n.addr == *a)?;
                let key = self.nodes[j].key;
                self.nodes[from].host.tree.contact_answered(a, key);
                j
            }
        };
        (j != from && !self.nodes[from].cut.contains(&j)).then_some(j)
    }

    fn deliver(&mut self, from: usize, to: usize, bytes: &[u8]) {
        if self.nodes[to].cut.contains(&from) {
            return;
        }
        self.frames += 1;
        let link_key = self.nodes[from].key;
        let node = &mut self.nodes[to];
        let rx_local_us = node.clock.local_us();
        if crate::cell::is_binary_frame(bytes) {
            if let Err(code) = node.host.dispatch_binary(&link_key, bytes) {
                *node.rejected.entry(code).or_insert(0) += 1;
            }
            return;
        }
        let result = node.host.open(&link_key, bytes).and_then(|env| {
            if let Some(addr) = env.addr.as_ref() {
                node.host.tree.peer_addr_changed(&env.from, addr);
            }
            node.host.dispatch(&env, rx_local_us)
        });
        if let Err(code) = result {
            *node.rejected.entry(code).or_insert(0) += 1;
        }
    }
}
