//! Merges: probing lost neighbours and contacts, and deciding on evidence, not on one
//! peer's word, that our tree is the smaller one and must dissolve into another.
//!
//! Rules (issue 9, item 1):
//! - A probe carries a fresh nonce; an answer is acted on only if it repeats the nonce of a
//!   probe we sent (to that key, when we knew it) and is still within its answer time.
//! - Only a root speaks for its tree's size, and only in answer to our own probe of it.
//! - A root's size is believed only with a second witness: the root must have been named
//!   by another key that answered our probe as a member of that tree (a lone root, size 1,
//!   has no members to name it). A size beyond [`MAX_TREE_SIZE`], or one that grew faster
//!   than [`MAX_SIZE_GROWTH_PER_S`] since that root last answered us, is not believed.

use super::{LostPeer, Peer, PublicKey, Routed, Target, TreeMsg, TreeNode};

/// Probes waiting for an answer, at most: every lost peer and contact once, plus the roots
/// they name and the root's own re-probes before a merge.
pub(super) const MAX_PROBES_OUT: usize = 64;
/// The largest tree size a probe answer may claim. Far above any real cell (the simulation
/// goes to 10,000 nodes), far below where position arithmetic could come near `u64::MAX`.
pub const MAX_TREE_SIZE: u64 = 1 << 24;
/// How fast a foreign tree's size may grow between two answers of its root, in nodes per
/// second (plus the tree's fan-out): a root assigns positions one join at a time, and a join
/// storm of 10,000 nodes converges in about 10 s.
pub const MAX_SIZE_GROWTH_PER_S: u64 = 2_000;
/// Foreign roots whose last claimed size we remember (for the growth bound).
pub(super) const MAX_FOREIGN_ROOTS: usize = 16;

/// How long a key we knew as part of our own tree (our root, a child) stays a witness for
/// itself after we lost it: as long as the lost neighbour is probed (40 tries, backing off to
/// 8 probe intervals), so a tree split by a long link failure merges back once it heals.
pub(super) const FORMER_MS: u64 = 10 * 60 * 1000;
/// Former neighbours remembered, at most.
pub(super) const MAX_FORMER: usize = 16;

/// A key that was part of our tree until we lost it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Former {
    pub until: u64,
}

/// A probe we sent and the answer we expect.
#[derive(Debug, Clone)]
pub(super) struct ProbeOut {
    pub nonce: u64,
    /// The key we expect to answer, when we know it.
    pub key: Option<PublicKey>,
    /// Until when an answer is taken.
    pub until: u64,
    /// Whether the answering root has a witness: a member of its tree named it, or (for our
    /// root's own re-probe) a member of our tree checked it.
    pub witnessed: bool,
}

/// What a foreign root last told us about its tree's size.
#[derive(Debug, Clone, Copy)]
pub(super) struct ForeignClaim {
    pub size: u64,
    pub at: u64,
}

impl TreeNode {
    pub(super) fn remember_lost(&mut self, peer: Option<Peer>, addr: String, now: u64) {
        if addr.is_empty() || addr == self.me.addr {
            return;
        }
        self.lost.retain(|l| l.addr != addr);
        if self.lost.len() >= super::MAX_LOST {
            self.lost.remove(0);
        }
        self.lost.push(LostPeer {
            peer,
            addr,
            next_probe: now + self.cfg.probe_every_ms(),
            tries: 0,
        });
    }

    pub(super) fn probe_tick(&mut self, now: u64) {
        if !self.is_member() {
            return;
        }
        self.probes_out.retain(|p| p.until > now);
        let base = self.cfg.probe_every_ms();
        let mut sends = Vec::new();
        for l in self.lost.iter_mut() {
            if now >= l.next_probe {
                l.tries += 1;
                let backoff = base.saturating_mul(1u64 << l.tries.min(3));
                l.next_probe = now + backoff;
                let target = match &l.peer {
                    Some(p) => Target::Peer(p.clone()),
                    None => Target::Addr(l.addr.clone()),
                };
                sends.push(target);
            }
        }
        self.lost.retain(|l| l.tries < super::MAX_PROBE_TRIES);
        for t in sends {
            self.send_probe(now, t, false);
        }
    }

    /// Send a probe with a fresh nonce and remember what answer we expect.
    pub(super) fn send_probe(&mut self, now: u64, to: Target, witnessed: bool) {
        let key = match &to {
            Target::Peer(p) => Some(p.key),
            Target::Key(k) => Some(*k),
            Target::Addr(_) => None,
        };
        if key == Some(self.me.key) {
            return;
        }
        let nonce = self.next_rand();
        if self.probes_out.len() >= MAX_PROBES_OUT {
            self.probes_out.remove(0);
        }
        self.probes_out.push(ProbeOut {
            nonce,
            key,
            until: now + self.cfg.join_timeout_ms(),
            witnessed,
        });
        let peer = self.me.clone();
        self.send(to, TreeMsg::Probe { peer, nonce });
    }

    /// Answer a probe over the connection it came on (never dial an address a probe names).
    pub(super) fn on_probe(&mut self, from: PublicKey, nonce: u64) {
        let root = if self.is_member() {
            self.root.clone()
        } else {
            None
        };
        self.send(
            Target::Key(from),
            TreeMsg::ProbeAck {
                root,
                size: self.size,
                peer: self.me.clone(),
                re: nonce,
            },
        );
    }

    pub(super) fn on_probe_ack(
        &mut self,
        from: PublicKey,
        root: Option<Peer>,
        size: u64,
        peer: Peer,
        re: u64,
    ) {
        let now = self.now;
        let Some(ix) = self
            .probes_out
            .iter()
            .position(|p| p.nonce == re && p.until > now && p.key.is_none_or(|k| k == from))
        else {
            return self.reject_unauthorized("probe answer to no probe of ours");
        };
        let asked = self.probes_out.remove(ix);
        if peer.key != from || !self.is_member() {
            return;
        }
        let Some(their_root) = root else {
            return;
        };
        let my_root = self.root.as_ref().map(|r| r.key);
        if my_root == Some(their_root.key) {
            // Same tree: nothing to merge; stop probing this one.
            self.lost.retain(|l| l.addr != peer.addr);
            return;
        }
        if peer.key != their_root.key {
            // Only a root speaks for its tree's size; ask it, with this member as the
            // witness that the root is real (a stale answer naming a dead root simply goes
            // unanswered).
            if their_root.key != self.me.key {
                self.send_probe(now, Target::Peer(their_root), true);
            }
            return;
        }
        // A root that was part of our own tree (our root, or our child) until lately is its own
        // witness (its size still has to keep within the growth bound from what we knew of
        // our tree then): a tree split by a long link failure merges back.
        let witnessed = asked.witnessed || self.former_witness(now, &their_root.key);
        if !self.believable_size(now, &their_root.key, size, witnessed) {
            return self.reject_invalid("unbelievable tree size in a probe answer");
        }
        if !self.should_merge_into(size, &their_root.key) {
            return;
        }
        if self.pos == 1 {
            return self.dissolve(now, peer);
        }
        let order = Routed::Merge {
            contact: peer,
            their_size: size,
            their_root: their_root.key,
        };
        self.route(now, 1, order);
    }

    /// Remember `key` as lost from our tree (of our current size), for [`FORMER_MS`].
    pub(super) fn remember_former(&mut self, key: PublicKey, now: u64) {
        if key == self.me.key {
            return;
        }
        self.former.retain(|_, f| f.until > now);
        make_room(&mut self.former, &key, MAX_FORMER, |f| f.until);
        self.former.insert(
            key,
            Former {
                until: now.saturating_add(FORMER_MS),
            },
        );
        // What we knew of our tree then is where the growth bound of its claims starts.
        if !self.foreign.contains_key(&key) && self.foreign.len() < MAX_FOREIGN_ROOTS {
            let size = self.size.max(1);
            self.foreign.insert(key, ForeignClaim { size, at: now });
        }
    }

    /// Whether `root` was part of our tree until lately.
    fn former_witness(&self, now: u64, root: &PublicKey) -> bool {
        self.former.get(root).is_some_and(|f| f.until > now)
    }

    /// Whether a foreign root's claimed `size` may be believed: bounded, witnessed (unless it
    /// is a root of one), and not grown faster than a tree can grow since it last answered.
    fn believable_size(&mut self, now: u64, root: &PublicKey, size: u64, witnessed: bool) -> bool {
        if size == 0 || size > MAX_TREE_SIZE || (size > 1 && !witnessed) {
            return false;
        }
        let ok = match self.foreign.get(root) {
            Some(prev) if size > prev.size => {
                let secs = now.saturating_sub(prev.at) / 1000 + 1;
                let allowed = MAX_SIZE_GROWTH_PER_S
                    .saturating_mul(secs)
                    .saturating_add(self.cfg.max_children);
                size - prev.size <= allowed
            }
            _ => true,
        };
        make_room(&mut self.foreign, root, MAX_FOREIGN_ROOTS, |c| c.at);
        // Remember the claim either way: an inflated answer does not reset the bound.
        let keep = match self.foreign.get(root) {
            Some(prev) if !ok => prev.size,
            _ => size,
        };
        self.foreign.insert(
            *root,
            ForeignClaim {
                size: keep,
                at: now,
            },
        );
        ok
    }

    /// Whether our tree is the smaller one and must merge into theirs. Ties in size are
    /// broken by the root keys, so of two trees exactly one merges.
    pub(super) fn should_merge_into(&self, their_size: u64, their_root: &PublicKey) -> bool {
        let my_root = self.root.as_ref().map(|r| r.key);
        if my_root == Some(*their_root) || *their_root == self.me.key {
            return false;
        }
        (their_size, Some(*their_root)) > (self.size, my_root)
    }
}

/// Before inserting `key` into `map` (at most `cap` entries): if it is new and the map is
/// full, drop the entry with the smallest `age` key.
fn make_room<V>(
    map: &mut std::collections::BTreeMap<PublicKey, V>,
    key: &PublicKey,
    cap: usize,
    age: impl Fn(&V) -> u64,
) {
    if map.contains_key(key) || map.len() < cap {
        return;
    }
    if let Some(oldest) = map.iter().min_by_key(|(_, v)| age(v)).map(|(k, _)| *k) {
        map.remove(&oldest);
    }
}
