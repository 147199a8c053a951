//! The repair planner of one node, sans-IO: keeps every shard it holds at `r` copies on the
//! shard's top-`r` members, and drops a surplus copy only once that is confirmed.
//!
//! Per held shard the planner caches the exact top-`r + spare` ranking and updates it
//! incrementally when the member set changes (a death costs no hashing, a join one hash per
//! held shard). A shard whose top-`r` or whose own rank changed is *dirty* and is evaluated:
//!
//! 1. **Ask.** Query every member ranked above this node and every top-`r` member (normally
//!    `r - 1` to `r` messages) unless a report younger than `report_ttl_ms` is at hand.
//! 2. **Coordinator rule.** This node acts only if no member ranked above it holds the shard:
//!    it is then the best-ranked holder, which is unique for one member set, so each missing
//!    copy is pushed by exactly one node. It pushes to every top-`r` member that lacks it,
//!    rate-limited by a token bucket of `push_bytes_per_s`.
//! 3. **Non-coordinators** re-check after `recheck_ms` (the coordinator may die mid-way).
//! 4. **Drop.** A node outside the top `r` keeps its copy (reads never prune) until all `r`
//!    top members confirm theirs, and that has stayed true for `drop_grace_ms`; the final
//!    confirmation is re-queried fresh just before [`RepairAction::Drop`].
//!
//! A scrub cursor walks the held shards round-robin within `scrub_bytes_per_s`; a copy the I/O
//! layer finds corrupt is reported with [`RepairPlanner::handle_corrupt`] and re-fetched from
//! the best-ranked holder.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::identity::PublicKey;
use crate::shard::placement::{Members, Ranked, ShardAddr, MAX_REPLICAS};

/// Planner timings and budgets.
#[derive(Debug, Clone)]
pub struct RepairConfig {
    /// Copies kept of every shard (`r`).
    pub replicas: usize,
    /// Ranks cached beyond `r` per shard.
    pub spare: usize,
    pub report_ttl_ms: u64,
    pub query_retry_ms: u64,
    pub recheck_ms: u64,
    /// A newly received shard is checked after this (catches a coordinator that died).
    pub new_check_ms: u64,
    pub drop_grace_ms: u64,
    pub push_bytes_per_s: u64,
    pub scrub_bytes_per_s: u64,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            replicas: 3,
            spare: 8,
            report_ttl_ms: 60_000,
            query_retry_ms: 2_000,
            recheck_ms: 30_000,
            new_check_ms: 30_000,
            drop_grace_ms: 10 * 60_000,
            push_bytes_per_s: 2 << 20,
            scrub_bytes_per_s: 1 << 20,
        }
    }
}

/// A bad configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepairError {
    #[error("replica target {0} is outside 1..={MAX_REPLICAS}")]
    BadReplicas(usize),
    #[error("push and scrub budgets must be above zero")]
    ZeroBudget,
}

impl RepairError {
    /// The wire error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadReplicas(_) => "bad_replicas",
            Self::ZeroBudget => "zero_budget",
        }
    }
}

/// What the I/O layer must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairAction {
    /// Ask `to` whether it holds `addr`; feed the answer to [`RepairPlanner::handle_report`].
    Query { addr: ShardAddr, to: PublicKey },
    /// Send our copy to `to`; report the outcome with [`RepairPlanner::handle_push_done`].
    Push {
        addr: ShardAddr,
        to: PublicKey,
        size: u64,
    },
    /// Our copy is gone (corrupt): get it from `from`, then call [`RepairPlanner::hold`].
    Fetch { addr: ShardAddr, from: PublicKey },
    /// Delete our surplus copy (`r` confirmed copies exist on the top-`r` members).
    Drop { addr: ShardAddr },
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairStats {
    pub queries: u64,
    pub pushes: u64,
    pub push_bytes: u64,
    pub fetches: u64,
    pub drops: u64,
    pub rerank_full: u64,
}

#[derive(Debug, Clone, Copy)]
struct Report {
    has: bool,
    at_ms: u64,
}

#[derive(Debug)]
struct Held {
    size: u64,
    have: bool,
    /// The best-ranked members for this shard, best first (keys only: the scores are
    /// recomputed when the member set changes, so 10,000 shards do not keep 32 bytes per rank).
    ranks: Vec<PublicKey>,
    reports: Vec<(PublicKey, Report)>,
    queried: Vec<(PublicKey, u64)>,
    pushing: Vec<PublicKey>,
    fetching: Option<(PublicKey, u64)>,
    surplus_since: Option<u64>,
    due: Option<u64>,
}

impl Held {
    fn report(&self, key: &PublicKey, now: u64, ttl: u64) -> Option<bool> {
        self.reports
            .iter()
            .find(|(k, r)| k == key && now.saturating_sub(r.at_ms) < ttl)
            .map(|(_, r)| r.has)
    }
    fn set_report(&mut self, key: PublicKey, has: bool, now: u64) {
        self.queried.retain(|(k, _)| *k != key);
        match self.reports.iter_mut().find(|(k, _)| *k == key) {
            Some((_, r)) => *r = Report { has, at_ms: now },
            None => self.reports.push((key, Report { has, at_ms: now })),
        }
    }
}

/// The planner. See the module docs.
#[derive(Debug)]
pub struct RepairPlanner {
    cfg: RepairConfig,
    own: PublicKey,
    members: Members,
    held: BTreeMap<ShardAddr, Held>,
    due: BTreeSet<(u64, ShardAddr)>,
    tokens: i64,
    tokens_at_ms: u64,
    scrub_tokens: i64,
    scrub_at_ms: u64,
    scrub_cursor: Option<ShardAddr>,
    stats: RepairStats,
    #[cfg(test)]
    no_coordination: bool,
}

impl RepairPlanner {
    /// Test hook: act as if no member above ever held a shard (breaks the coordinator rule, so
    /// the simulation can show it catches duplicate pushes).
    #[cfg(test)]
    pub(crate) fn disable_coordination_for_tests(&mut self) {
        self.no_coordination = true;
    }

    pub fn new(own: PublicKey, cfg: RepairConfig, members: Members) -> Result<Self, RepairError> {
        if cfg.replicas == 0 || cfg.replicas > MAX_REPLICAS {
            return Err(RepairError::BadReplicas(cfg.replicas));
        }
        if cfg.push_bytes_per_s == 0 || cfg.scrub_bytes_per_s == 0 {
            return Err(RepairError::ZeroBudget);
        }
        Ok(Self {
            cfg,
            own,
            members,
            held: BTreeMap::new(),
            due: BTreeSet::new(),
            tokens: 0,
            tokens_at_ms: 0,
            scrub_tokens: 0,
            scrub_at_ms: 0,
            scrub_cursor: None,
            stats: RepairStats::default(),
            #[cfg(test)]
            no_coordination: false,
        })
    }

    fn depth(&self) -> usize {
        self.cfg.replicas + self.cfg.spare
    }

    fn schedule(&mut self, addr: ShardAddr, at: u64) {
        let Some(h) = self.held.get_mut(&addr) else {
            return;
        };
        if let Some(old) = h.due {
            if old <= at {
                return;
            }
            self.due.remove(&(old, addr));
        }
        h.due = Some(at);
        self.due.insert((at, addr));
    }

    fn top(&self, addr: &ShardAddr) -> Vec<PublicKey> {
        let mut ranks: Vec<PublicKey> = self
            .members
            .top(addr, self.depth())
            .into_iter()
            .map(|x| x.key)
            .collect();
        ranks.shrink_to_fit();
        ranks
    }

    fn new_held(&self, addr: &ShardAddr, size: u64) -> Held {
        Held {
            size,
            have: true,
            ranks: self.top(addr),
            reports: Vec::new(),
            queried: Vec::new(),
            pushing: Vec::new(),
            fetching: None,
            surplus_since: None,
            due: None,
        }
    }

    /// A shard is now stored here (a write, a push received, a fetch done). It is checked after
    /// `new_check_ms`.
    pub fn hold(&mut self, now_ms: u64, addr: ShardAddr, size: u64) {
        match self.held.get_mut(&addr) {
            Some(h) => {
                h.have = true;
                h.size = size;
                h.fetching = None;
            }
            None => {
                let h = self.new_held(&addr, size);
                self.held.insert(addr, h);
            }
        }
        self.schedule(addr, now_ms.saturating_add(self.cfg.new_check_ms));
    }

    /// A shard stored here whose `r` copies the caller knows exist (a write that got `r` acks):
    /// nothing is checked until the member set changes.
    pub fn hold_settled(&mut self, addr: ShardAddr, size: u64) {
        if !self.held.contains_key(&addr) {
            let h = self.new_held(&addr, size);
            self.held.insert(addr, h);
        }
    }

    /// The shard is no longer stored here and should not be.
    pub fn forget(&mut self, addr: &ShardAddr) {
        if let Some(h) = self.held.remove(addr) {
            if let Some(t) = h.due {
                self.due.remove(&(t, *addr));
            }
        }
    }

    /// Is `addr` stored here (and not known corrupt)?
    pub fn holds(&self, addr: &ShardAddr) -> bool {
        self.held.get(addr).is_some_and(|h| h.have)
    }

    /// The cached ranking of `addr` (tests check it against a fresh one).
    #[cfg(test)]
    pub(crate) fn ranks_of(&self, addr: &ShardAddr) -> Option<Vec<PublicKey>> {
        self.held.get(addr).map(|h| h.ranks.clone())
    }

    /// Number of shards tracked (held or being re-fetched).
    pub fn tracked(&self) -> usize {
        self.held.len()
    }

    pub fn stats(&self) -> RepairStats {
        self.stats
    }

    pub fn members(&self) -> &Members {
        &self.members
    }

    /// The member set changed: update cached rankings, mark changed shards dirty (due now).
    pub fn set_members(&mut self, now_ms: u64, members: Members) {
        let (removed, added) = self.members.diff(&members);
        self.members = members;
        if removed.is_empty() && added.is_empty() {
            return;
        }
        let removed: HashSet<PublicKey> = removed.into_iter().collect();
        let (r, depth, own) = (self.cfg.replicas, self.depth(), self.own);
        let mut dirty = Vec::new();
        for (addr, h) in self.held.iter_mut() {
            let old_top: Vec<PublicKey> = h.ranks.iter().take(r).copied().collect();
            let old_pos = h.ranks.iter().position(|x| *x == own);
            h.ranks.retain(|x| !removed.contains(x));
            let covers_all = h.ranks.len() + added.len() == self.members.len();
            if !added.is_empty() {
                let members = &self.members;
                let ranked = |key: &PublicKey| Ranked {
                    score: members.score_of(addr, key),
                    key: *key,
                };
                let mut ranks: Vec<Ranked> = h.ranks.iter().map(ranked).collect();
                for k in &added {
                    let cand = ranked(k);
                    let before_last = ranks.last().is_none_or(|l| cand.rank_cmp(l).is_lt());
                    if covers_all || before_last {
                        let pos = ranks.partition_point(|b| b.rank_cmp(&cand).is_lt());
                        ranks.insert(pos, cand);
                    }
                }
                ranks.truncate(depth);
                h.ranks = ranks.into_iter().map(|x| x.key).collect();
            }
            h.ranks.truncate(depth);
            if h.ranks.len() < (r + 1).min(self.members.len()) {
                h.ranks = self
                    .members
                    .top(addr, depth)
                    .into_iter()
                    .map(|x| x.key)
                    .collect();
                self.stats.rerank_full += 1;
            }
            h.ranks.shrink_to_fit();
            h.reports.retain(|(k, _)| !removed.contains(k));
            h.queried.retain(|(k, _)| !removed.contains(k));
            let new_top: Vec<PublicKey> = h.ranks.iter().take(r).copied().collect();
            let new_pos = h.ranks.iter().position(|x| *x == own);
            if new_top != old_top || new_pos != old_pos {
                dirty.push(*addr);
            }
        }
        for a in dirty {
            self.schedule(a, now_ms);
        }
    }

    /// `from` answered a query (or a reader told us) whether it holds `addr`.
    pub fn handle_report(&mut self, now_ms: u64, addr: &ShardAddr, from: PublicKey, has: bool) {
        let Some(h) = self.held.get_mut(addr) else {
            return;
        };
        // Only answers from nodes this shard's ranking or our own questions name: a report
        // from anyone else would grow `reports` without bound and is ignored.
        let relevant = h.ranks.contains(&from)
            || h.queried.iter().any(|(k, _)| *k == from)
            || h.pushing.contains(&from);
        if !relevant {
            return;
        }
        h.set_report(from, has, now_ms);
        if has {
            h.pushing.retain(|k| *k != from);
        }
        if h.queried.is_empty() {
            self.schedule(*addr, now_ms);
        }
    }

    /// A push of ours finished (`ok`: the receiver stored it).
    pub fn handle_push_done(&mut self, now_ms: u64, addr: &ShardAddr, to: PublicKey, ok: bool) {
        let Some(h) = self.held.get_mut(addr) else {
            return;
        };
        h.pushing.retain(|k| *k != to);
        let at = if ok {
            h.set_report(to, true, now_ms);
            now_ms
        } else {
            now_ms.saturating_add(self.cfg.query_retry_ms)
        };
        self.schedule(*addr, at);
    }

    /// Copies of `addr` this node knows of now: its own (if stored) and the fresh `has`
    /// reports of others; 0 for a shard it does not track.
    pub fn copies(&self, now_ms: u64, addr: &ShardAddr) -> usize {
        self.held.get(addr).map_or(0, |h| {
            let others = h
                .reports
                .iter()
                .filter(|(k, r)| {
                    *k != self.own
                        && r.has
                        && now_ms.saturating_sub(r.at_ms) < self.cfg.report_ttl_ms
                })
                .count();
            others + usize::from(h.have)
        })
    }

    /// A reader counted fewer than `r` copies of `addr`: check it now.
    pub fn handle_hint(&mut self, now_ms: u64, addr: &ShardAddr) {
        self.schedule(*addr, now_ms);
    }

    /// The scrub found our copy of `addr` corrupt (the I/O layer deleted it): re-fetch it.
    pub fn handle_corrupt(&mut self, now_ms: u64, addr: &ShardAddr) {
        if let Some(h) = self.held.get_mut(addr) {
            h.have = false;
            h.pushing.clear();
            h.fetching = None;
            self.schedule(*addr, now_ms);
        }
    }

    /// The next time [`Self::poll_actions`] has work.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.due.first().map(|&(t, _)| t)
    }

    fn refill(&mut self, now: u64) {
        let dt = now.saturating_sub(self.tokens_at_ms);
        let burst = self.cfg.push_bytes_per_s as i64;
        let add = (dt as i128 * self.cfg.push_bytes_per_s as i128 / 1000).min(i64::MAX as i128);
        self.tokens = (self.tokens as i128 + add).min(burst as i128) as i64;
        self.tokens_at_ms = now.max(self.tokens_at_ms);
    }

    fn tokens_ready_at(&self, now: u64) -> u64 {
        let need = (1 - self.tokens).max(0) as u64;
        now + (need * 1000).div_ceil(self.cfg.push_bytes_per_s)
    }

    /// Evaluate every shard due by `now_ms`; the actions to carry out.
    pub fn poll_actions(&mut self, now_ms: u64) -> Vec<RepairAction> {
        self.refill(now_ms);
        let mut out = Vec::new();
        while let Some(&(t, addr)) = self.due.first() {
            if t > now_ms {
                break;
            }
            self.due.remove(&(t, addr));
            if let Some(h) = self.held.get_mut(&addr) {
                h.due = None;
            }
            self.evaluate(now_ms, addr, &mut out);
        }
        out
    }

    fn evaluate(&mut self, now: u64, addr: ShardAddr, out: &mut Vec<RepairAction>) {
        let (r, ttl, retry, own) = (
            self.cfg.replicas,
            self.cfg.report_ttl_ms,
            self.cfg.query_retry_ms,
            self.own,
        );
        let Some(h) = self.held.get_mut(&addr) else {
            return;
        };
        let n_top = r.min(h.ranks.len());
        let my_pos = h.ranks.iter().position(|x| *x == own);
        let limit = my_pos.map_or(h.ranks.len(), |p| p.max(n_top));
        // 1. Ask whoever we lack a fresh answer from.
        let mut unknown = false;
        for &x in &h.ranks[..limit] {
            if x == own || h.report(&x, now, ttl).is_some() {
                continue;
            }
            unknown = true;
            let asked_at = h.queried.iter().find(|(k, _)| *k == x).map(|q| q.1);
            if asked_at.is_none_or(|t| now.saturating_sub(t) >= retry) {
                h.queried.retain(|(k, _)| *k != x);
                h.queried.push((x, now));
                out.push(RepairAction::Query { addr, to: x });
                self.stats.queries += 1;
            }
        }
        if !h.have {
            // Re-fetch from the best-ranked member known to hold it.
            let from = h.ranks[..limit]
                .iter()
                .find(|x| **x != own && h.report(x, now, ttl) == Some(true))
                .copied();
            let stuck = h
                .fetching
                .is_none_or(|(_, t)| now.saturating_sub(t) >= retry * 4);
            match from {
                Some(from) if stuck => {
                    h.fetching = Some((from, now));
                    out.push(RepairAction::Fetch { addr, from });
                    self.stats.fetches += 1;
                    self.schedule(addr, now + retry * 4);
                }
                _ => self.schedule(addr, now + retry),
            }
            return;
        }
        if unknown {
            self.schedule(addr, now + retry);
            return;
        }
        // 2. Everyone that matters has a fresh answer.
        let above_has = h.ranks[..my_pos.unwrap_or(h.ranks.len())]
            .iter()
            .any(|x| h.report(x, now, ttl) == Some(true));
        let missing: Vec<PublicKey> = h.ranks[..n_top]
            .iter()
            .filter(|x| **x != own && h.report(x, now, ttl) == Some(false))
            .copied()
            .collect();
        if missing.is_empty() {
            if my_pos.is_some_and(|p| p < n_top) {
                h.surplus_since = None;
                // Settled: give back what the queries took (most shards stay here for good).
                h.queried.clear();
                h.queried.shrink_to_fit();
                h.reports.shrink_to_fit();
                return;
            }
            let since = *h.surplus_since.get_or_insert(now);
            let drop_at = since.saturating_add(self.cfg.drop_grace_ms);
            if now >= drop_at {
                out.push(RepairAction::Drop { addr });
                self.stats.drops += 1;
                self.forget(&addr);
            } else {
                self.schedule(addr, drop_at);
            }
            return;
        }
        h.surplus_since = None;
        #[cfg(test)]
        let above_has = above_has && !self.no_coordination;
        if above_has {
            self.schedule(addr, now + self.cfg.recheck_ms);
            return;
        }
        // 3. We are the coordinator: push each missing copy once, within the budget.
        let size = h.size;
        let mut blocked = false;
        for to in missing {
            if h.pushing.contains(&to) {
                continue;
            }
            if self.tokens <= 0 {
                blocked = true;
                break;
            }
            self.tokens -= size as i64;
            h.pushing.push(to);
            out.push(RepairAction::Push { addr, to, size });
            self.stats.pushes += 1;
            self.stats.push_bytes += size;
        }
        let at = if blocked {
            self.tokens_ready_at(now)
        } else {
            now + self.cfg.recheck_ms
        };
        self.schedule(addr, at);
    }

    /// Held shards to re-hash now (round-robin, within `scrub_bytes_per_s`). Report a bad one
    /// with [`Self::handle_corrupt`].
    pub fn scrub_due(&mut self, now_ms: u64) -> Vec<ShardAddr> {
        let dt = now_ms.saturating_sub(self.scrub_at_ms);
        self.scrub_at_ms = now_ms.max(self.scrub_at_ms);
        let cap = self.cfg.scrub_bytes_per_s as i64;
        let add = (dt as i128 * self.cfg.scrub_bytes_per_s as i128 / 1000).min(cap as i128);
        self.scrub_tokens = (self.scrub_tokens as i128 + add).min(cap as i128) as i64;
        let mut out = Vec::new();
        let mut seen = 0;
        while self.scrub_tokens > 0 && seen < self.held.len() {
            let next = match self.scrub_cursor {
                Some(c) => self
                    .held
                    .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                    .next(),
                None => None,
            }
            .or_else(|| self.held.iter().next());
            let Some((addr, h)) = next else { break };
            let addr = *addr;
            seen += 1;
            self.scrub_cursor = Some(addr);
            if h.have {
                self.scrub_tokens -= h.size as i64;
                out.push(addr);
            }
        }
        out
    }
}

/// What a read learned about the copies of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaCount {
    /// Copies confirmed on the shard's top-`r` members.
    pub placed: usize,
    /// Copies confirmed anywhere.
    pub total: usize,
    pub target: usize,
}

impl ReplicaCount {
    /// Below target: the reader hints the best-ranked holder ([`RepairPlanner::handle_hint`]).
    pub fn below_target(&self) -> bool {
        self.placed < self.target
    }
}

/// Count the copies a read saw: `reports` are (node, has) answers from the nodes it asked.
pub fn replica_count(
    holders: &[PublicKey],
    target: usize,
    reports: &[(PublicKey, bool)],
) -> ReplicaCount {
    let mut yes: Vec<PublicKey> = reports.iter().filter(|r| r.1).map(|r| r.0).collect();
    yes.sort_unstable();
    yes.dedup();
    ReplicaCount {
        placed: yes.iter().filter(|k| holders.contains(k)).count(),
        total: yes.len(),
        target,
    }
}
