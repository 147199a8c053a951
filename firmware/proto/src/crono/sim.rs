//! Deterministic simulation of [`TimeSync`] nodes on a virtual clock: a tree given by parent
//! indices, each node with its own local clock (any offset, a drift in ppm, possible steps),
//! links with a one-way latency of `latency_us ± jitter_us`, random per message from one seed.
//! Nothing here sleeps or reads a clock.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::msg::{TimeAns, TimeMsg};
use super::{SyncConfig, TimeSync};
use crate::identity::{PublicKey, SecretKey};

/// xorshift64*: the simulation's only randomness.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn bytes(&mut self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        b[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        b
    }
    /// Uniform in [lo, hi].
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// One simulated node: its clock and its state machine.
#[derive(Debug, Clone)]
pub struct SimNode {
    pub key: PublicKey,
    pub sync: TimeSync,
    /// local = offset + true * (1 + drift_ppm / 1e6)
    pub offset_us: i64,
    pub drift_ppm: i64,
    pub parent: Option<usize>,
    pub joined: bool,
    /// Highest net time seen from this node so far.
    pub last_net: u64,
    pub backwards: u64,
}

impl SimNode {
    pub fn local(&self, t: u64) -> u64 {
        let t = i128::from(t);
        let l = i128::from(self.offset_us) + t + t * i128::from(self.drift_ppm) / 1_000_000;
        u64::try_from(l.max(0)).unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
enum Ev {
    Req {
        to: usize,
        from: usize,
        msg: TimeMsg,
    },
    Ans {
        to: usize,
        from: usize,
        ans: TimeAns,
    },
}

/// The simulated network.
#[derive(Debug)]
pub struct Sim {
    pub nodes: Vec<SimNode>,
    pub now: u64,
    pub latency_us: u64,
    pub jitter_us: u64,
    pub tick_us: u64,
    /// One-way latency = sum of this many independent uniform draws (each `latency/parts ±
    /// jitter/parts`): 1 = uniform, 2 = the netns hub's two hops (sender -> switch -> receiver).
    pub parts: u64,
    /// Configuration of nodes added after it is set.
    pub cfg: SyncConfig,
    /// Load spikes: this many frames in 1,000 are held up by an extra uniform 0..`spike_us`
    /// (a busy process or a segment stuck behind another), on either leg.
    pub spikes_per_1000: u64,
    pub spike_us: u64,
    rng: Rng,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Ev>>,
    seq: u64,
}

impl Sim {
    pub fn new(seed: u64) -> Self {
        Self {
            nodes: Vec::new(),
            now: 0,
            latency_us: 20_000,
            jitter_us: 5_000,
            tick_us: 10_000,
            parts: 1,
            cfg: SyncConfig::default(),
            spikes_per_1000: 0,
            spike_us: 0,
            rng: Rng::new(seed),
            queue: BinaryHeap::new(),
            events: Vec::new(),
            seq: 0,
        }
    }

    /// Add a node (not joined yet); returns its index.
    pub fn add(
        &mut self,
        offset_us: i64,
        drift_ppm: i64,
        parent: Option<usize>,
        floor: u64,
    ) -> usize {
        let key = SecretKey::generate().public();
        self.nodes.push(SimNode {
            key,
            sync: TimeSync::new(self.cfg, floor),
            offset_us,
            drift_ppm,
            parent,
            joined: false,
            last_net: 0,
            backwards: 0,
        });
        self.nodes.len() - 1
    }

    /// Join node `i` now: root if it has no parent, else set its parent; bootstrap from
    /// `contacts` first.
    pub fn join(&mut self, i: usize, contacts: &[usize]) {
        let l = self.nodes[i].local(self.now);
        for &c in contacts {
            let nonce = self.rng.bytes();
            let msg = self.nodes[i].sync.bootstrap_request(l, nonce);
            self.send(Ev::Req {
                to: c,
                from: i,
                msg,
            });
        }
        match self.nodes[i].parent {
            None => self.nodes[i].sync.set_root(l),
            Some(p) => {
                let key = self.nodes[p].key;
                self.nodes[i].sync.set_parent(l, Some(key));
            }
        }
        self.nodes[i].joined = true;
    }

    fn send(&mut self, ev: Ev) {
        let parts = self.parts.max(1);
        let (l, j) = (self.latency_us / parts, self.jitter_us / parts);
        let mut lat = (0..parts)
            .map(|_| self.rng.range(l - j, l + j))
            .sum::<u64>();
        if self.spikes_per_1000 > 0 && self.rng.range(0, 999) < self.spikes_per_1000 {
            lat += self.rng.range(0, self.spike_us);
        }
        self.seq += 1;
        self.events.push(Some(ev));
        self.queue
            .push(Reverse((self.now + lat, self.seq, self.events.len() - 1)));
    }

    /// Net time of node `i` at the current true time.
    pub fn net(&self, i: usize) -> u64 {
        let n = &self.nodes[i];
        n.sync.net_at(n.local(self.now))
    }

    fn check(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].joined || !self.nodes[i].sync.status(0).synced {
                continue;
            }
            let net = self.net(i);
            let n = &mut self.nodes[i];
            if net < n.last_net {
                n.backwards += 1;
            }
            n.last_net = n.last_net.max(net);
        }
    }

    /// Run until true time `until`, checking monotonicity at every event.
    pub fn run_until(&mut self, until: u64) {
        while self.now < until {
            let next_tick = self.now + self.tick_us;
            while let Some(&Reverse((t, _, idx))) = self.queue.peek() {
                if t > next_tick {
                    break;
                }
                self.queue.pop();
                self.now = t.max(self.now);
                if let Some(ev) = self.events[idx].take() {
                    self.deliver(ev);
                }
                self.check();
            }
            self.now = next_tick;
            for i in 0..self.nodes.len() {
                if !self.nodes[i].joined {
                    continue;
                }
                let l = self.nodes[i].local(self.now);
                if self.nodes[i].sync.poll_timeout().is_some_and(|d| d <= l) {
                    self.nodes[i].sync.handle_timeout(l);
                }
                let nonce = self.rng.bytes();
                if let Some((_, msg)) = self.nodes[i].sync.poll_transmit(l, nonce) {
                    if let Some(p) = self.nodes[i].parent {
                        self.send(Ev::Req {
                            to: p,
                            from: i,
                            msg,
                        });
                    }
                }
            }
            self.check();
            if self.events.len() > 4096 && self.queue.is_empty() {
                self.events.clear();
            }
        }
    }

    fn deliver(&mut self, ev: Ev) {
        match ev {
            Ev::Req { to, from, msg } => {
                let TimeMsg::Req { nonce } = msg else { return };
                let l = self.nodes[to].local(self.now);
                let ans = self.nodes[to].sync.answer(l, l, nonce);
                self.send(Ev::Ans {
                    to: from,
                    from: to,
                    ans,
                });
            }
            Ev::Ans { to, from, ans } => {
                let l = self.nodes[to].local(self.now);
                let key = self.nodes[from].key;
                let _ = self.nodes[to].sync.handle_answer(l, &key, &ans);
            }
        }
    }
}
