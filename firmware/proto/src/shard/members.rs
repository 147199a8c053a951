//! The member directory one node keeps: which shardTree members exist, sans-IO.
//!
//! Learned from signed announcements (`key`, `addr`, `epoch`), which the I/O layer has already
//! verified (the key signed them). An entry lives while it is renewed within `ttl_ms`, leaves at
//! once when the tree reports the node dead, and is placement-eligible (part of [`Members`])
//! only after `probation_ms` of continuous presence.
//!
//! # Attack bounds (an outsider can mint keys for free)
//! - **No eviction by newcomers.** When the directory is full a new key is refused; a known entry
//!   leaves only by its own TTL expiring or by a reported death. A flood of fresh keys can fill
//!   free slots, never push out long-known members.
//! - **Admission rate.** At most `admit_per_window` new keys per `admit_window_ms` (renewals are
//!   free). A flood takes `max_members / admit_per_window` windows to fill the directory, and
//!   honest joiners compete with it only for new slots.
//! - **Probation.** A key counts for placement only after `probation_ms` of renewals, so a key
//!   ground to sit on top of a known shard address must be kept alive that long before any shard
//!   is pushed to it; a hit-and-run flood never receives data.
//! - **Replays.** An announcement whose epoch is not above the last one seen is ignored; after a
//!   reported death the key's epoch is remembered (a tombstone for `tombstone_ms`), so a replayed
//!   old announcement cannot bring the dead node back. A restarted node announces a higher epoch.
//!
//! What it does not stop: an attacker who keeps many keys alive past probation is a member like
//! any other (a Sybil); placement then gives it its share of shards. See docs/PLACEMENT.md.

use std::collections::{BTreeMap, HashMap};

use crate::identity::PublicKey;
use crate::shard::placement::{Members, MAX_MEMBERS};

/// The longest network address string kept (e.g. `[v6]:port` or a relay address).
pub const MAX_ADDR_LEN: usize = 128;

/// Directory limits and timings.
#[derive(Debug, Clone)]
pub struct DirConfig {
    pub ttl_ms: u64,
    pub probation_ms: u64,
    pub max_members: usize,
    pub admit_per_window: u32,
    pub admit_window_ms: u64,
    pub tombstone_ms: u64,
}

impl Default for DirConfig {
    fn default() -> Self {
        Self {
            ttl_ms: 5 * 60_000,
            probation_ms: 60_000,
            max_members: 4_096,
            admit_per_window: 64,
            admit_window_ms: 60_000,
            tombstone_ms: 30 * 60_000,
        }
    }
}

/// Why an announcement was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirError {
    #[error("address longer than {MAX_ADDR_LEN} bytes")]
    AddrTooLong,
    #[error("directory full")]
    Full,
    #[error("too many new members this window")]
    RateLimited,
    #[error("epoch not newer than the last one seen")]
    StaleEpoch,
}

impl DirError {
    /// The wire error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::AddrTooLong => "addr_too_long",
            Self::Full => "full",
            Self::RateLimited => "rate_limited",
            Self::StaleEpoch => "stale_epoch",
        }
    }
}

/// What an accepted announcement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    /// A new entry (on probation).
    Admitted,
    /// A known entry renewed.
    Renewed,
}

#[derive(Debug, Clone)]
struct Entry {
    addr: String,
    epoch: u64,
    since_ms: u64,
    last_ms: u64,
    placeable: bool,
}

/// The directory. `own` is always a member (never expires, no probation).
#[derive(Debug)]
pub struct MemberDir {
    cfg: DirConfig,
    own: PublicKey,
    entries: BTreeMap<PublicKey, Entry>,
    tombstones: HashMap<PublicKey, (u64, u64)>,
    window_start_ms: u64,
    admitted_in_window: u32,
    members: Members,
    version: u64,
}

impl MemberDir {
    pub fn new(cfg: DirConfig, own: PublicKey) -> Self {
        let members = Members::new([own]).unwrap_or_else(|_| Members::empty());
        let max_members = cfg.max_members.clamp(1, MAX_MEMBERS);
        Self {
            cfg: DirConfig { max_members, ..cfg },
            own,
            entries: BTreeMap::new(),
            tombstones: HashMap::new(),
            window_start_ms: 0,
            admitted_in_window: 0,
            members,
            version: 0,
        }
    }

    /// A verified announcement from `key`.
    pub fn handle_announce(
        &mut self,
        now_ms: u64,
        key: PublicKey,
        addr: &str,
        epoch: u64,
    ) -> Result<Announced, DirError> {
        if addr.len() > MAX_ADDR_LEN {
            return Err(DirError::AddrTooLong);
        }
        if key == self.own {
            return Ok(Announced::Renewed);
        }
        if let Some(e) = self.entries.get_mut(&key) {
            if epoch < e.epoch {
                return Err(DirError::StaleEpoch);
            }
            e.epoch = epoch;
            e.last_ms = now_ms;
            if e.addr != addr {
                e.addr = addr.to_string();
            }
            return Ok(Announced::Renewed);
        }
        if let Some(&(dead_epoch, until)) = self.tombstones.get(&key) {
            if now_ms < until && epoch <= dead_epoch {
                return Err(DirError::StaleEpoch);
            }
        }
        // +1: the own key takes a slot of max_members.
        if self.entries.len() + 1 >= self.cfg.max_members {
            return Err(DirError::Full);
        }
        if now_ms.saturating_sub(self.window_start_ms) >= self.cfg.admit_window_ms {
            self.window_start_ms = now_ms;
            self.admitted_in_window = 0;
        }
        if self.admitted_in_window >= self.cfg.admit_per_window {
            return Err(DirError::RateLimited);
        }
        self.admitted_in_window += 1;
        self.tombstones.remove(&key);
        self.entries.insert(
            key,
            Entry {
                addr: addr.to_string(),
                epoch,
                since_ms: now_ms,
                last_ms: now_ms,
                placeable: self.cfg.probation_ms == 0,
            },
        );
        if self.cfg.probation_ms == 0 {
            self.rebuild();
        }
        Ok(Announced::Admitted)
    }

    /// The tree saw `key` die: remove it now. Returns whether it was known.
    pub fn handle_dead(&mut self, now_ms: u64, key: &PublicKey) -> bool {
        let Some(e) = self.entries.remove(key) else {
            return false;
        };
        self.tombstones.insert(
            *key,
            (e.epoch, now_ms.saturating_add(self.cfg.tombstone_ms)),
        );
        if e.placeable {
            self.rebuild();
        }
        true
    }

    /// The next time [`Self::handle_timeout`] has work (an expiry or a probation end).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.entries
            .values()
            .map(|e| {
                let expiry = e.last_ms.saturating_add(self.cfg.ttl_ms);
                if e.placeable {
                    expiry
                } else {
                    expiry.min(e.since_ms.saturating_add(self.cfg.probation_ms))
                }
            })
            .chain(self.tombstones.values().map(|&(_, until)| until))
            .min()
    }

    /// Expire unrenewed entries, promote those past probation, forget old tombstones.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let ttl = self.cfg.ttl_ms;
        let mut changed = false;
        self.entries.retain(|_, e| {
            let keep = now_ms < e.last_ms.saturating_add(ttl);
            changed |= !keep && e.placeable;
            keep
        });
        for e in self.entries.values_mut() {
            if !e.placeable && now_ms >= e.since_ms.saturating_add(self.cfg.probation_ms) {
                e.placeable = true;
                changed = true;
            }
        }
        self.tombstones.retain(|_, &mut (_, until)| now_ms < until);
        if changed {
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        let keys = self
            .entries
            .iter()
            .filter(|(_, e)| e.placeable)
            .map(|(k, _)| *k)
            .chain([self.own]);
        // The count is bounded by max_members <= MAX_MEMBERS, so this cannot fail.
        if let Ok(m) = Members::new(keys) {
            self.members = m;
            self.version += 1;
        }
    }

    /// The placement-eligible members (own key included).
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// Bumped on every change of [`Self::members`].
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Known entries, on probation or not (own key excluded).
    pub fn known(&self) -> usize {
        self.entries.len()
    }

    /// This node's own key (always a member).
    pub fn own(&self) -> PublicKey {
        self.own
    }

    /// The last address `key` announced.
    pub fn addr_of(&self, key: &PublicKey) -> Option<&str> {
        self.entries.get(key).map(|e| e.addr.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::sim::sim_key;

    fn k(i: usize) -> PublicKey {
        sim_key(11, i).public()
    }

    fn cfg() -> DirConfig {
        DirConfig {
            ttl_ms: 10_000,
            probation_ms: 1_000,
            max_members: 50,
            admit_per_window: 10,
            admit_window_ms: 1_000,
            tombstone_ms: 60_000,
        }
    }

    #[test]
    fn probation_then_member_then_expiry() {
        let mut d = MemberDir::new(cfg(), k(0));
        assert_eq!(
            d.handle_announce(0, k(1), "a:1", 1),
            Ok(Announced::Admitted)
        );
        assert_eq!(d.members().len(), 1, "on probation");
        assert_eq!(d.poll_timeout(), Some(1_000));
        d.handle_timeout(1_000);
        assert!(d.members().contains(&k(1)));
        let v = d.version();
        assert_eq!(
            d.handle_announce(5_000, k(1), "a:2", 1),
            Ok(Announced::Renewed)
        );
        assert_eq!(d.addr_of(&k(1)), Some("a:2"));
        d.handle_timeout(14_999);
        assert!(d.members().contains(&k(1)));
        d.handle_timeout(15_000);
        assert!(!d.members().contains(&k(1)));
        assert!(d.version() > v);
    }

    #[test]
    fn death_removes_at_once_and_replays_cannot_revive() {
        let mut d = MemberDir::new(
            DirConfig {
                probation_ms: 0,
                ..cfg()
            },
            k(0),
        );
        d.handle_announce(0, k(1), "a", 3).expect("admit");
        assert!(d.members().contains(&k(1)));
        assert!(d.handle_dead(10, &k(1)));
        assert!(!d.members().contains(&k(1)));
        assert_eq!(
            d.handle_announce(20, k(1), "a", 3),
            Err(DirError::StaleEpoch)
        );
        assert_eq!(d.handle_announce(20, k(1), "a", 4), Ok(Announced::Admitted));
        assert_eq!(
            d.handle_announce(30, k(1), "a", 2).map_err(|e| e.code()),
            Err("stale_epoch")
        );
    }

    #[test]
    fn a_flood_of_fresh_keys_never_evicts_known_members() {
        let mut d = MemberDir::new(cfg(), k(0));
        let mut now = 0;
        for i in 1..=20 {
            d.handle_announce(now, k(i), "h", 1).expect("admit");
            now += 100; // 10 per second: exactly the admission rate
        }
        d.handle_timeout(now + 1_000);
        assert_eq!(d.members().len(), 21);
        // The attacker floods 1,000 fresh keys over 100 s while the honest 20 keep renewing.
        let (mut full, mut limited, mut admitted) = (0, 0, 0);
        for j in 0..1_000usize {
            now += 100;
            match d.handle_announce(now, k(1_000 + j), "evil", 1) {
                Ok(_) => admitted += 1,
                Err(DirError::Full) => full += 1,
                Err(DirError::RateLimited) => limited += 1,
                Err(e) => panic!("unexpected {e}"),
            }
            if j % 20 == 0 {
                for i in 1..=20 {
                    d.handle_announce(now, k(i), "h", 1)
                        .expect("renewal is always taken");
                }
                // The attacker renews what it got in, too.
                for a in 0..=j {
                    let _ = d.handle_announce(now, k(1_000 + a), "evil", 1);
                }
            }
            d.handle_timeout(now);
        }
        assert_eq!(
            admitted, 29,
            "only the free slots fill: 50 - 1 own - 20 honest"
        );
        assert!(full > 900 && limited == 0, "full {full} limited {limited}");
        for i in 1..=20 {
            assert!(d.members().contains(&k(i)), "honest member {i} kept");
        }
        assert_eq!(d.known(), 49);
    }

    #[test]
    fn admission_is_rate_limited_per_window() {
        let mut d = MemberDir::new(cfg(), k(0));
        for i in 1..=10 {
            d.handle_announce(0, k(i), "h", 1).expect("admit");
        }
        assert_eq!(
            d.handle_announce(500, k(11), "h", 1),
            Err(DirError::RateLimited)
        );
        assert_eq!(
            d.handle_announce(1_000, k(11), "h", 1),
            Ok(Announced::Admitted)
        );
        assert_eq!(
            d.handle_announce(1_000, k(12), &"x".repeat(129), 1),
            Err(DirError::AddrTooLong)
        );
    }
}
