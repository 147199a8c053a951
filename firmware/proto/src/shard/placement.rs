//! Rendezvous (highest-random-weight) placement: which members hold a shard.
//!
//! Every member `m` gets a score for every shard address `a`:
//!
//! ```text
//! score(a, m) = SHA-256( pad64("borg-place-v1" || sec1(m)) || a )
//! ```
//!
//! where `pad64` zero-pads to one 64-byte SHA-256 block. The `r` members with the highest scores
//! (compared as 32 big-endian bytes; equal scores, which SHA-256 makes practically impossible, are
//! ordered by the smaller key) are the shard's holders. Any node that knows the member set can
//! check a placement, and every node with the same member set computes the same holders.
//!
//! The padding is there for speed, not security: the first block depends only on the member, so
//! [`Members`] hashes it once per member and each score then costs a single SHA-256 compression
//! (the Pi 4 has no SHA instructions, so this halves the cost of a full re-ranking).

use std::cmp::Ordering;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::identity::PublicKey;

/// A shard address: the SHA-256 of its bytes.
pub type ShardAddr = [u8; 32];

/// The domain tag of the placement score (version 1 of the rule).
pub const PLACE_DOMAIN: &[u8] = b"borg-place-v1";
/// The largest member set a node keeps or ranks.
pub const MAX_MEMBERS: usize = 65_536;
/// The largest replica target.
pub const MAX_REPLICAS: usize = 16;

/// Errors from building a member set or asking for holders.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("member set of {0} keys exceeds the limit of {MAX_MEMBERS}")]
    TooManyMembers(usize),
    #[error("replica target {0} is outside 1..={MAX_REPLICAS}")]
    BadReplicas(usize),
}

impl PlaceError {
    /// The wire error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooManyMembers(_) => "too_many_members",
            Self::BadReplicas(_) => "bad_replicas",
        }
    }
}

/// A placement score: 32 bytes compared big-endian, higher is better.
pub type Score = [u8; 32];

/// One member with its score for one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranked {
    pub score: Score,
    pub key: PublicKey,
}

impl Ranked {
    /// Rank order: higher score first, then smaller key first. `Less` means "ranks before".
    pub fn rank_cmp(&self, other: &Self) -> Ordering {
        other
            .score
            .cmp(&self.score)
            .then_with(|| self.key.cmp(&other.key))
    }
}

fn first_block(node: &PublicKey) -> [u8; 64] {
    let mut block = [0u8; 64];
    block[..PLACE_DOMAIN.len()].copy_from_slice(PLACE_DOMAIN);
    block[PLACE_DOMAIN.len()..PLACE_DOMAIN.len() + 33].copy_from_slice(node.as_bytes());
    block
}

/// The placement score of `node` for `addr` (the rule in the module docs).
pub fn score(addr: &ShardAddr, node: &PublicKey) -> Score {
    let mut h = Sha256::new();
    h.update(first_block(node));
    h.update(addr);
    h.finalize().into()
}

/// A sorted, de-duplicated set of at most [`MAX_MEMBERS`] keys, with each member's first hash
/// block precomputed. Cloning is cheap (shared).
#[derive(Clone)]
pub struct Members {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Vec<PublicKey>,
    prepared: Vec<Sha256>,
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Members({} keys)", self.len())
    }
}

impl PartialEq for Members {
    fn eq(&self, other: &Self) -> bool {
        self.inner.keys == other.inner.keys
    }
}
impl Eq for Members {}

fn prepare(key: &PublicKey) -> Sha256 {
    let mut h = Sha256::new();
    h.update(first_block(key));
    h
}

impl Members {
    /// The empty set.
    pub fn empty() -> Self {
        Self {
            inner: Arc::new(Inner {
                keys: Vec::new(),
                prepared: Vec::new(),
            }),
        }
    }

    /// Build from any keys (sorted and de-duplicated here).
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Result<Self, PlaceError> {
        let mut keys: Vec<PublicKey> = keys.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.len() > MAX_MEMBERS {
            return Err(PlaceError::TooManyMembers(keys.len()));
        }
        let prepared = keys.iter().map(prepare).collect();
        Ok(Self {
            inner: Arc::new(Inner { keys, prepared }),
        })
    }

    /// This set with `added` joined and `removed` taken out, reusing the prepared hash state of
    /// members that stay (a death costs no hashing).
    pub fn apply(&self, added: &[PublicKey], removed: &[PublicKey]) -> Result<Self, PlaceError> {
        let mut add: Vec<PublicKey> = added
            .iter()
            .filter(|k| !self.contains(k) && !removed.contains(k))
            .copied()
            .collect();
        add.sort_unstable();
        add.dedup();
        let mut rem: Vec<PublicKey> = removed.to_vec();
        rem.sort_unstable();
        let total = self.len() + add.len();
        let mut keys = Vec::with_capacity(total);
        let mut prepared = Vec::with_capacity(total);
        let (mut i, mut j) = (0, 0);
        let old = &self.inner;
        while i < old.keys.len() || j < add.len() {
            let take_old = j >= add.len() || (i < old.keys.len() && old.keys[i] < add[j]);
            if take_old {
                if rem.binary_search(&old.keys[i]).is_err() {
                    keys.push(old.keys[i]);
                    prepared.push(old.prepared[i].clone());
                }
                i += 1;
            } else {
                keys.push(add[j]);
                prepared.push(prepare(&add[j]));
                j += 1;
            }
        }
        if keys.len() > MAX_MEMBERS {
            return Err(PlaceError::TooManyMembers(keys.len()));
        }
        Ok(Self {
            inner: Arc::new(Inner { keys, prepared }),
        })
    }

    pub fn len(&self) -> usize {
        self.inner.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.keys.is_empty()
    }

    pub fn contains(&self, key: &PublicKey) -> bool {
        self.inner.keys.binary_search(key).is_ok()
    }

    /// The keys, sorted.
    pub fn keys(&self) -> &[PublicKey] {
        &self.inner.keys
    }

    /// Keys in `self` but not in `other`, and keys in `other` but not in `self` (both sorted).
    pub fn diff(&self, other: &Members) -> (Vec<PublicKey>, Vec<PublicKey>) {
        let (a, b) = (self.keys(), other.keys());
        let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) if x == y => {
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x < y => {
                    only_a.push(*x);
                    i += 1;
                }
                (Some(x), None) => {
                    only_a.push(*x);
                    i += 1;
                }
                (_, Some(y)) => {
                    only_b.push(*y);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        (only_a, only_b)
    }

    fn score_at(&self, idx: usize, addr: &ShardAddr) -> Score {
        let mut h = self.inner.prepared[idx].clone();
        h.update(addr);
        h.finalize().into()
    }

    /// The score of member `key` for `addr` (the same value as [`score`]).
    pub fn score_of(&self, addr: &ShardAddr, key: &PublicKey) -> Score {
        match self.inner.keys.binary_search(key) {
            Ok(idx) => self.score_at(idx, addr),
            Err(_) => score(addr, key),
        }
    }

    /// The `l` best-ranked members for `addr`, best first (fewer if the set is smaller).
    /// O(N log l) hashing-bound: one SHA-256 compression per member.
    pub fn top(&self, addr: &ShardAddr, l: usize) -> Vec<Ranked> {
        let mut best: Vec<Ranked> = Vec::with_capacity(l + 1);
        if l == 0 {
            return best;
        }
        for (idx, key) in self.inner.keys.iter().enumerate() {
            let cand = Ranked {
                score: self.score_at(idx, addr),
                key: *key,
            };
            if best.len() == l {
                if let Some(last) = best.last() {
                    if cand.rank_cmp(last) != Ordering::Less {
                        continue;
                    }
                }
                best.pop();
            }
            let pos = best.partition_point(|b| b.rank_cmp(&cand) == Ordering::Less);
            best.insert(pos, cand);
        }
        best
    }
}

/// The `r` holders of `addr` among `members`, best first: the nodes a get asks (O(r) messages).
pub fn holders(
    addr: &ShardAddr,
    members: &Members,
    r: usize,
) -> Result<Vec<PublicKey>, PlaceError> {
    if r == 0 || r > MAX_REPLICAS {
        return Err(PlaceError::BadReplicas(r));
    }
    Ok(members.top(addr, r).into_iter().map(|x| x.key).collect())
}

/// [`holders`] for many addresses, sharing the per-member precomputation.
pub fn holders_many<'a>(
    addrs: impl IntoIterator<Item = &'a ShardAddr>,
    members: &Members,
    r: usize,
) -> Result<Vec<Vec<PublicKey>>, PlaceError> {
    addrs.into_iter().map(|a| holders(a, members, r)).collect()
}

/// The 0-based rank of `node` for `addr` (0 = best), or `None` if it is not a member. O(N).
pub fn rank_of(addr: &ShardAddr, members: &Members, node: &PublicKey) -> Option<usize> {
    if !members.contains(node) {
        return None;
    }
    let me = Ranked {
        score: members.score_of(addr, node),
        key: *node,
    };
    let better = (0..members.len())
        .filter(|&i| {
            let other = Ranked {
                score: members.score_at(i, addr),
                key: members.keys()[i],
            };
            other.rank_cmp(&me) == Ordering::Less
        })
        .count();
    Some(better)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::sim::sim_key;

    fn keys(n: usize) -> Vec<PublicKey> {
        (0..n).map(|i| sim_key(7, i).public()).collect()
    }

    fn addr(i: u64) -> ShardAddr {
        Sha256::digest(i.to_le_bytes()).into()
    }

    #[test]
    fn prepared_score_equals_plain_score() {
        let ks = keys(20);
        let m = Members::new(ks.clone()).expect("small");
        for (i, k) in ks.iter().enumerate() {
            let a = addr(i as u64);
            assert_eq!(m.score_of(&a, k), score(&a, k));
        }
        // The rule written out by hand: one padded block, then the address.
        let mut buf = [0u8; 96];
        buf[..13].copy_from_slice(b"borg-place-v1");
        buf[13..46].copy_from_slice(ks[0].as_bytes());
        buf[64..].copy_from_slice(&addr(0));
        let want: Score = Sha256::digest(buf).into();
        assert_eq!(score(&addr(0), &ks[0]), want);
    }

    #[test]
    fn holders_are_the_top_scores_and_independent_of_input_order() {
        let ks = keys(50);
        let m1 = Members::new(ks.clone()).expect("small");
        let mut rev = ks.clone();
        rev.reverse();
        rev.extend_from_slice(&ks[..10]); // duplicates
        let m2 = Members::new(rev).expect("small");
        assert_eq!(m1, m2);
        for i in 0..100 {
            let a = addr(i);
            let h = holders(&a, &m1, 3).expect("r ok");
            assert_eq!(h, holders(&a, &m2, 3).expect("r ok"));
            let mut all: Vec<Ranked> = ks
                .iter()
                .map(|k| Ranked {
                    score: score(&a, k),
                    key: *k,
                })
                .collect();
            all.sort_by(|x, y| x.rank_cmp(y));
            let want: Vec<PublicKey> = all[..3].iter().map(|x| x.key).collect();
            assert_eq!(h, want);
            for (rank, x) in all.iter().enumerate().take(5) {
                assert_eq!(rank_of(&a, &m1, &x.key), Some(rank));
            }
        }
    }

    #[test]
    fn bad_replicas_and_non_members() {
        let m = Members::new(keys(5)).expect("small");
        assert_eq!(holders(&addr(1), &m, 0), Err(PlaceError::BadReplicas(0)));
        assert_eq!(
            holders(&addr(1), &m, 17).map_err(|e| e.code()),
            Err("bad_replicas")
        );
        assert_eq!(holders(&addr(1), &m, 9).expect("r ok").len(), 5);
        assert_eq!(rank_of(&addr(1), &m, &sim_key(8, 0).public()), None);
    }

    #[test]
    fn apply_matches_a_fresh_build_and_diff_inverts_it() {
        let ks = keys(40);
        let m = Members::new(ks[..30].iter().copied()).expect("small");
        let added = &ks[30..];
        let removed = &ks[..5];
        let n = m.apply(added, removed).expect("small");
        let fresh = Members::new(ks[5..].iter().copied()).expect("small");
        assert_eq!(n, fresh);
        for i in 0..20 {
            assert_eq!(n.top(&addr(i), 5), fresh.top(&addr(i), 5));
        }
        let (gone, new) = m.diff(&n);
        let mut want_gone = removed.to_vec();
        want_gone.sort();
        let mut want_new = added.to_vec();
        want_new.sort();
        assert_eq!((gone, new), (want_gone, want_new));
    }

    #[test]
    fn tie_breaks_by_smaller_key() {
        let ks = keys(2);
        let (a, b) = (ks[0].min(ks[1]), ks[0].max(ks[1]));
        let x = Ranked {
            score: [5; 32],
            key: a,
        };
        let y = Ranked {
            score: [5; 32],
            key: b,
        };
        assert_eq!(x.rank_cmp(&y), Ordering::Less);
        let z = Ranked {
            score: [6; 32],
            key: b,
        };
        assert_eq!(z.rank_cmp(&x), Ordering::Less);
    }
}
