//! The releases a node is gathering approvals for, sans-IO: what is kept, what is merged,
//! what is refused, and the bounds.
//!
//! A release is kept only when it carries at least one **valid, unexpired approval by a
//! maintainer key** of the trusted root, and is a candidate for this node (not expired, above
//! the running version, not refused before, for this board when the board is known). So a
//! stranger can neither store a manifest here nor make the network carry one: only what a
//! maintainer signed gets in, and it is kept with only the approvals that verify (one per
//! key: a later approval by the same key replaces an earlier one that expires sooner).
//! Approvals of one release arriving from anywhere (published at another node, gossiped,
//! offered by a neighbour) are merged by manifest digest.
//!
//! Every approval in the book had its signature checked once, when it came in; reports are
//! made without checking it again ([`borg_ota::verify::verify_with`]), so showing the status
//! costs no ECDSA.
//!
//! Bounds:
//! - at most [`MAX_PENDING`] releases. **Fewer than k keys cannot fill it:** a key may stand
//!   behind at most [`MAX_WAITING_PER_KEY`] releases still below the threshold, and when the
//!   book is full the release with the fewest approvals (then the lowest version) goes, and
//!   only for one with more approvals (or as many and a higher version);
//! - at most one approval per root key per release;
//! - signature checks per second, in separate budgets for what comes from the receptor
//!   (`release.publish`, any key), from broadcasts and from tree neighbours' offers
//!   ([`Meter`]), [`VERIFY_PER_S`] each (burst [`VERIFY_BURST`]): a stranger flooding one door
//!   costs this node a bounded share of a core and cannot starve the other two; beyond it an
//!   offer is refused as `busy` and nothing is changed.

use std::collections::{BTreeMap, BTreeSet};

use borg_ota::verify::{verify_with, NodeView, Refusal, Report};
use borg_ota::{Approval, ReleaseFile, Sha256Hex, TrustedRoot};
use borg_proto::identity::PublicKey;

/// Releases gathered at once.
pub const MAX_PENDING: usize = 16;
/// Releases below the threshold one maintainer key may stand behind at once.
pub const MAX_WAITING_PER_KEY: usize = 2;
/// Approval signatures checked per second, per [`Meter`].
pub const VERIFY_PER_S: u32 = 200;
/// Signature checks that may be saved up, per [`Meter`] (one release file from a maintainer,
/// plus the offers of a few neighbours after a restart).
pub const VERIFY_BURST: u32 = 400;

/// Which signature budget an offer spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meter {
    /// `release.publish` on the receptor (any key).
    Publish,
    /// A broadcast down the base tree.
    Gossip,
    /// A tree neighbour's `release.offer`.
    Neighbour,
    /// The node's own saved releases at start: no budget.
    Saved,
}

/// One release and the approvals gathered for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// The manifest and only approvals that verified for it (one per maintainer key).
    pub file: ReleaseFile,
    /// When this node first saw it (network ms).
    pub first_seen_ms: u64,
    /// When k approvals first counted here (network ms).
    pub approved_at_ms: Option<u64>,
}

/// What an offer changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    pub digest: Sha256Hex,
    /// The release was not known here before.
    pub new_release: bool,
    /// Approvals that verified and were not held before (or replace one expiring sooner).
    pub added: Vec<Approval>,
    /// A release with fewer approvals left to make room.
    pub evicted: Option<Sha256Hex>,
}

impl Merged {
    pub fn changed(&self) -> bool {
        self.new_release || !self.added.is_empty()
    }
}

/// Why an offer was refused; nothing was kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookError {
    #[error(
        "no approval in it is a valid, unexpired approval of this manifest by a maintainer key \
         of root version {root_version}: only maintainer-approved releases are kept or passed on"
    )]
    NoApproval { root_version: u64 },
    #[error("this node will not install it: {}", .0.explain())]
    NotForThisNode(Refusal),
    #[error(
        "{MAX_PENDING} releases are already being gathered here, none with fewer approvals \
         (or as many and a lower version)"
    )]
    Full,
    #[error(
        "its approving keys already stand behind {MAX_WAITING_PER_KEY} releases each that are \
         still below the threshold here"
    )]
    KeyBusy,
    #[error("too many signature checks right now ({VERIFY_PER_S}/s); try again in a second")]
    Busy,
}

impl BookError {
    /// Wire code and HTTP status (DESIGN.md section 5).
    pub fn code(&self) -> (&'static str, u16) {
        match self {
            BookError::NoApproval { .. } => ("forbidden", 403),
            BookError::NotForThisNode(_) => ("refused", 409),
            BookError::Full | BookError::KeyBusy => ("full", 409),
            BookError::Busy => ("unavailable", 503),
        }
    }
}

/// A token bucket of signature checks.
#[derive(Debug, Clone)]
struct Budget {
    tokens: u32,
    refilled_ms: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            tokens: VERIFY_BURST,
            refilled_ms: 0,
        }
    }
}

impl Budget {
    fn take(&mut self, mono_ms: u64, n: u32) -> bool {
        let elapsed = mono_ms.saturating_sub(self.refilled_ms);
        let add = elapsed.saturating_mul(VERIFY_PER_S as u64) / 1000;
        if add > 0 {
            self.tokens = (self.tokens as u64 + add).min(VERIFY_BURST as u64) as u32;
            self.refilled_ms = mono_ms;
        }
        if self.tokens < n {
            return false;
        }
        self.tokens -= n;
        true
    }
}

/// The releases being gathered, by manifest digest.
#[derive(Debug, Clone, Default)]
pub struct Book {
    releases: BTreeMap<Sha256Hex, Pending>,
    budgets: [Budget; 3],
}

/// Refusals that mean the release is of no use to this node whatever approvals come.
fn not_for_this_node(report: &Report) -> Option<Refusal> {
    report
        .refusals
        .iter()
        .find(|r| !matches!(r, Refusal::NotEnoughApprovals { .. }))
        .cloned()
}

/// A report on approvals whose signatures were checked when they came in.
fn checked_report(root: &TrustedRoot, file: &ReleaseFile, node: &NodeView) -> Report {
    verify_with(root, &file.manifest, &file.approvals, node, |_| true)
}

impl Book {
    pub fn iter(&self) -> impl Iterator<Item = (&Sha256Hex, &Pending)> {
        self.releases.iter()
    }

    pub fn len(&self) -> usize {
        self.releases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.releases.is_empty()
    }

    pub fn get(&self, digest: &Sha256Hex) -> Option<&Pending> {
        self.releases.get(digest)
    }

    /// Judge one gathered release now (no signature is checked again).
    pub fn report(
        &self,
        root: &TrustedRoot,
        digest: &Sha256Hex,
        node: &NodeView,
    ) -> Option<Report> {
        let p = self.releases.get(digest)?;
        Some(checked_report(root, &p.file, node))
    }

    /// Releases below the threshold that `key` approves here.
    fn waiting_behind(&self, root: &TrustedRoot, key: &PublicKey) -> usize {
        self.releases
            .values()
            .filter(|p| {
                p.file.approvals.len() < root.threshold() as usize
                    && p.file.approvals.iter().any(|a| a.key == *key)
            })
            .count()
    }

    /// Merge `file` in: keep its approvals that verify and are new (or outlast the held one
    /// by the same key), if the release is (or becomes) worth keeping. `mono_ms` paces the
    /// signature budget of `meter`; `net_ms` stamps it.
    pub fn offer(
        &mut self,
        root: &TrustedRoot,
        node: &NodeView,
        file: &ReleaseFile,
        mono_ms: u64,
        net_ms: u64,
        meter: Meter,
    ) -> Result<Merged, BookError> {
        let digest = file.manifest.digest();
        let now = node.effective_now_ms();
        let held: BTreeMap<PublicKey, u64> = self
            .releases
            .get(&digest)
            .map(|p| {
                p.file
                    .approvals
                    .iter()
                    .map(|a| (a.key, a.expires_ms))
                    .collect()
            })
            .unwrap_or_default();
        // Cheap filters first, one candidate per key: only these cost a signature check.
        let mut seen = BTreeSet::new();
        let candidates: Vec<&Approval> = file
            .approvals
            .iter()
            .filter(|a| {
                a.manifest == digest
                    && root.keys().contains(&a.key)
                    && now <= a.expires_ms
                    && held.get(&a.key).is_none_or(|old| *old < a.expires_ms)
                    && seen.insert(a.key)
            })
            .collect();
        if candidates.is_empty() {
            if self.releases.contains_key(&digest) {
                return Ok(Merged {
                    digest,
                    new_release: false,
                    added: Vec::new(),
                    evicted: None,
                });
            }
            return Err(BookError::NoApproval {
                root_version: root.version(),
            });
        }
        let budget = match meter {
            Meter::Publish => Some(0),
            Meter::Gossip => Some(1),
            Meter::Neighbour => Some(2),
            Meter::Saved => None,
        };
        if let Some(b) = budget {
            if !self.budgets[b].take(mono_ms, candidates.len() as u32) {
                return Err(BookError::Busy);
            }
        }
        let added: Vec<Approval> = candidates
            .into_iter()
            .filter(|a| a.signature_valid())
            .cloned()
            .collect();
        let mut evicted = None;
        let new_release = !self.releases.contains_key(&digest);
        if new_release {
            if added.is_empty() {
                return Err(BookError::NoApproval {
                    root_version: root.version(),
                });
            }
            let fresh = ReleaseFile {
                manifest: file.manifest.clone(),
                approvals: added.clone(),
            };
            let report = checked_report(root, &fresh, node);
            if let Some(refusal) = not_for_this_node(&report) {
                return Err(BookError::NotForThisNode(refusal));
            }
            if !report.approved
                && added
                    .iter()
                    .all(|a| self.waiting_behind(root, &a.key) >= MAX_WAITING_PER_KEY)
            {
                return Err(BookError::KeyBusy);
            }
            if self.releases.len() >= MAX_PENDING {
                let weight = |n: usize, p: &ReleaseFile| (n, p.manifest.version);
                let victim = self
                    .releases
                    .iter()
                    .min_by_key(|(_, p)| weight(p.file.approvals.len(), &p.file))
                    .map(|(d, p)| (*d, weight(p.file.approvals.len(), &p.file)));
                match victim {
                    Some((d, w)) if w < weight(added.len(), &fresh) => {
                        self.releases.remove(&d);
                        evicted = Some(d);
                    }
                    _ => return Err(BookError::Full),
                }
            }
            self.releases.insert(
                digest,
                Pending {
                    file: ReleaseFile {
                        manifest: file.manifest.clone(),
                        approvals: Vec::new(),
                    },
                    first_seen_ms: net_ms,
                    approved_at_ms: None,
                },
            );
        }
        if let Some(p) = self.releases.get_mut(&digest) {
            for a in &added {
                p.file.approvals.retain(|old| old.key != a.key);
                p.file.approvals.push(a.clone());
            }
        }
        Ok(Merged {
            digest,
            new_release,
            added,
            evicted,
        })
    }

    /// Mark `digest` approved at `net_ms` if it was not yet; true the first time.
    pub fn mark_approved(&mut self, digest: &Sha256Hex, net_ms: u64) -> bool {
        match self.releases.get_mut(digest) {
            Some(p) if p.approved_at_ms.is_none() => {
                p.approved_at_ms = Some(net_ms);
                true
            }
            _ => false,
        }
    }

    /// Drop releases no longer of use here (expired, at or below the running version,
    /// refused): returns their digests and the refusal that dropped each.
    pub fn prune(&mut self, root: &TrustedRoot, node: &NodeView) -> Vec<(Sha256Hex, Refusal)> {
        let mut gone = Vec::new();
        for (d, p) in &self.releases {
            if let Some(r) = not_for_this_node(&checked_report(root, &p.file, node)) {
                gone.push((*d, r));
            }
        }
        for (d, _) in &gone {
            self.releases.remove(d);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use borg_ota::release::ImageRef;
    use borg_ota::{FetchId, Manifest, Root, SignedRoot, Version};
    use borg_proto::identity::SecretKey;

    const NOW: u64 = 1_800_000_000_000;
    const DAY: u64 = 86_400_000;

    fn root(keys: &[SecretKey], k: u32) -> TrustedRoot {
        let mut r = SignedRoot::unsigned(
            Root::new(1, keys.iter().map(|k| k.public()).collect(), k).unwrap(),
        );
        for key in keys {
            r.sign(key);
        }
        TrustedRoot::anchor(&r).unwrap()
    }

    fn manifest(version: &str) -> Manifest {
        let sha256: Sha256Hex = "ab".repeat(32).parse().unwrap();
        Manifest {
            tag: Default::default(),
            version: version.parse().unwrap(),
            boards: vec![borg_ota::Board::new("qemu-virt").unwrap()],
            image: ImageRef { sha256, size: 1000 },
            min_version: "0.1.0".parse().unwrap(),
            expires_ms: NOW + 30 * DAY,
            notes: String::new(),
            fetch: FetchId::content(&sha256),
        }
    }

    fn file(m: &Manifest, by: &[&SecretKey]) -> ReleaseFile {
        ReleaseFile {
            manifest: m.clone(),
            approvals: by
                .iter()
                .map(|k| Approval::sign(k, m, m.expires_ms))
                .collect(),
        }
    }

    fn view() -> NodeView {
        NodeView {
            now_ms: NOW,
            floor_ms: 0,
            running: Some("0.1.0".parse::<Version>().unwrap()),
            board: None,
            refused: Default::default(),
        }
    }

    fn keys(n: usize) -> Vec<SecretKey> {
        (0..n).map(|_| SecretKey::generate()).collect()
    }

    #[test]
    fn approvals_from_three_places_merge_into_one_approved_release() {
        let ks = keys(5);
        let r = root(&ks, 3);
        let m = manifest("0.2.0");
        let mut book = Book::default();
        for (i, k) in ks.iter().take(3).enumerate() {
            let merged = book
                .offer(&r, &view(), &file(&m, &[k]), 0, NOW, Meter::Publish)
                .unwrap();
            assert_eq!(merged.new_release, i == 0);
            assert_eq!(merged.added.len(), 1);
            let report = book.report(&r, &merged.digest, &view()).unwrap();
            assert_eq!(report.counted, i + 1);
            assert_eq!(report.approved, i == 2, "approved only with the k-th");
        }
        // The same approvals again change nothing and cost no signature check.
        let again = book
            .offer(
                &r,
                &view(),
                &file(&m, &[&ks[0], &ks[1]]),
                0,
                NOW,
                Meter::Publish,
            )
            .unwrap();
        assert!(!again.changed());
    }

    #[test]
    fn a_strangers_manifest_is_not_kept_nor_a_forged_approval_counted() {
        let ks = keys(3);
        let r = root(&ks, 2);
        let m = manifest("0.2.0");
        let stranger = SecretKey::generate();
        let mut book = Book::default();
        let e = book
            .offer(&r, &view(), &file(&m, &[&stranger]), 0, NOW, Meter::Publish)
            .unwrap_err();
        assert!(matches!(e, BookError::NoApproval { .. }));
        assert!(book.is_empty());
        // A maintainer's key id with a signature by someone else.
        let mut forged = Approval::sign(&stranger, &m, m.expires_ms);
        forged.key = ks[0].public();
        let f = ReleaseFile {
            manifest: m.clone(),
            approvals: vec![forged],
        };
        assert!(matches!(
            book.offer(&r, &view(), &f, 0, NOW, Meter::Publish),
            Err(BookError::NoApproval { .. })
        ));
        // An approval of another manifest does not count for this one.
        let other = manifest("0.3.0");
        let f = ReleaseFile {
            manifest: m.clone(),
            approvals: vec![Approval::sign(&ks[0], &other, other.expires_ms)],
        };
        assert!(book.offer(&r, &view(), &f, 0, NOW, Meter::Publish).is_err());
        assert!(book.is_empty());
    }

    #[test]
    fn one_key_twice_counts_once() {
        let ks = keys(3);
        let r = root(&ks, 2);
        let m = manifest("0.2.0");
        let mut book = Book::default();
        let f = file(&m, &[&ks[0], &ks[0]]);
        let merged = book.offer(&r, &view(), &f, 0, NOW, Meter::Publish).unwrap();
        assert_eq!(merged.added.len(), 1);
        let report = book.report(&r, &merged.digest, &view()).unwrap();
        assert_eq!(report.counted, 1);
        assert!(!report.approved);
    }

    #[test]
    fn downgrades_expired_and_refused_releases_are_not_kept() {
        let ks = keys(2);
        let r = root(&ks, 1);
        let mut book = Book::default();
        let old = manifest("0.1.0");
        assert!(matches!(
            book.offer(&r, &view(), &file(&old, &[&ks[0]]), 0, NOW, Meter::Publish),
            Err(BookError::NotForThisNode(Refusal::Downgrade { .. }))
        ));
        let mut expired = manifest("0.2.0");
        expired.expires_ms = NOW - 1;
        let f = ReleaseFile {
            manifest: expired.clone(),
            approvals: vec![Approval::sign(&ks[0], &expired, NOW + DAY)],
        };
        assert!(matches!(
            book.offer(&r, &view(), &f, 0, NOW, Meter::Publish),
            Err(BookError::NotForThisNode(Refusal::Expired { .. }))
        ));
        // A clock set back does not help: the floor holds.
        let mut behind = view();
        behind.now_ms = NOW - 10 * DAY;
        behind.floor_ms = NOW;
        assert!(book.offer(&r, &behind, &f, 0, NOW, Meter::Publish).is_err());
        let m = manifest("0.3.0");
        let mut refused = view();
        refused.refused.insert(m.version);
        assert!(matches!(
            book.offer(&r, &refused, &file(&m, &[&ks[0]]), 0, NOW, Meter::Publish),
            Err(BookError::NotForThisNode(Refusal::RefusedBefore { .. }))
        ));
        assert!(book.is_empty());
    }

    #[test]
    fn the_book_is_bounded_and_a_newer_release_evicts_the_lowest() {
        let ks = keys(1);
        let r = root(&ks, 1);
        let mut book = Book::default();
        for i in 0..MAX_PENDING {
            let m = manifest(&format!("0.{}.0", i + 2));
            book.offer(&r, &view(), &file(&m, &[&ks[0]]), 0, NOW, Meter::Saved)
                .unwrap();
        }
        let low = manifest("0.1.5");
        assert!(matches!(
            book.offer(&r, &view(), &file(&low, &[&ks[0]]), 0, NOW, Meter::Saved),
            Err(BookError::Full)
        ));
        let high = manifest("1.0.0");
        let merged = book
            .offer(&r, &view(), &file(&high, &[&ks[0]]), 0, NOW, Meter::Saved)
            .unwrap();
        assert_eq!(merged.evicted, Some(manifest("0.2.0").digest()));
        assert_eq!(book.len(), MAX_PENDING);
    }

    #[test]
    fn fewer_than_k_keys_cannot_fill_the_book() {
        let ks = keys(3);
        let r = root(&ks, 3);
        let mut book = Book::default();
        // One stolen key: two releases waiting behind it, then no more.
        for v in ["9.0.0", "9.0.1"] {
            book.offer(
                &r,
                &view(),
                &file(&manifest(v), &[&ks[0]]),
                0,
                NOW,
                Meter::Publish,
            )
            .unwrap();
        }
        let e = book
            .offer(
                &r,
                &view(),
                &file(&manifest("9.0.2"), &[&ks[0]]),
                0,
                NOW,
                Meter::Publish,
            )
            .unwrap_err();
        assert_eq!(e, BookError::KeyBusy);
        // A genuine release still gets in and gathers its approvals.
        let m = manifest("0.2.0");
        book.offer(&r, &view(), &file(&m, &[&ks[1]]), 0, NOW, Meter::Publish)
            .unwrap();
        let merged = book
            .offer(
                &r,
                &view(),
                &file(&m, &[&ks[0], &ks[2]]),
                0,
                NOW,
                Meter::Publish,
            )
            .unwrap();
        assert!(book.report(&r, &merged.digest, &view()).unwrap().approved);
    }

    #[test]
    fn when_full_the_release_with_fewest_approvals_goes() {
        let ks = keys(MAX_PENDING);
        let r = root(&ks, 2);
        let mut book = Book::default();
        for (i, k) in ks.iter().enumerate() {
            let m = manifest(&format!("5.{i}.0"));
            book.offer(&r, &view(), &file(&m, &[k]), 0, NOW, Meter::Saved)
                .unwrap();
        }
        // An approved release (2 approvals) evicts a one-approval one, whatever its version.
        let m = manifest("0.2.0");
        let merged = book
            .offer(
                &r,
                &view(),
                &file(&m, &[&ks[0], &ks[1]]),
                0,
                NOW,
                Meter::Saved,
            )
            .unwrap();
        assert!(merged.evicted.is_some());
        assert_eq!(book.len(), MAX_PENDING);
    }

    #[test]
    fn a_renewed_approval_replaces_one_that_expires_sooner() {
        let ks = keys(2);
        let r = root(&ks, 2);
        let m = manifest("0.2.0");
        let mut book = Book::default();
        let short = ReleaseFile {
            manifest: m.clone(),
            approvals: vec![Approval::sign(&ks[0], &m, NOW + 1000)],
        };
        book.offer(&r, &view(), &short, 0, NOW, Meter::Publish)
            .unwrap();
        let renewed = book
            .offer(&r, &view(), &file(&m, &[&ks[0]]), 0, NOW, Meter::Publish)
            .unwrap();
        assert_eq!(renewed.added.len(), 1);
        let p = book.get(&renewed.digest).unwrap();
        assert_eq!(p.file.approvals.len(), 1);
        assert_eq!(p.file.approvals[0].expires_ms, m.expires_ms);
        // The older one again changes nothing.
        assert!(!book
            .offer(&r, &view(), &short, 0, NOW, Meter::Publish)
            .unwrap()
            .changed());
    }

    #[test]
    fn signature_checks_are_metered() {
        let ks = keys(32);
        let r = root(&ks, 32);
        let m = manifest("0.2.0");
        let stranger = SecretKey::generate();
        // Forged approvals under every maintainer key id: 32 checks each time.
        let forged: Vec<Approval> = ks
            .iter()
            .map(|k| {
                let mut a = Approval::sign(&stranger, &m, m.expires_ms);
                a.key = k.public();
                a
            })
            .collect();
        let f = ReleaseFile {
            manifest: m.clone(),
            approvals: forged,
        };
        let mut book = Book::default();
        let mut busy_at = None;
        for i in 0..100 {
            if let Err(BookError::Busy) = book.offer(&r, &view(), &f, 0, NOW, Meter::Publish) {
                busy_at = Some(i);
                break;
            }
        }
        assert_eq!(busy_at, Some((VERIFY_BURST / 32) as usize));
        // Broadcasts and neighbours have budgets of their own.
        assert!(matches!(
            book.offer(&r, &view(), &f, 0, NOW, Meter::Neighbour),
            Err(BookError::NoApproval { .. })
        ));
        // A second later the budget has refilled by VERIFY_PER_S.
        assert!(matches!(
            book.offer(&r, &view(), &f, 1000, NOW, Meter::Publish),
            Err(BookError::NoApproval { .. })
        ));
    }

    #[test]
    fn prune_drops_what_the_node_now_runs() {
        let ks = keys(1);
        let r = root(&ks, 1);
        let m = manifest("0.2.0");
        let mut book = Book::default();
        book.offer(&r, &view(), &file(&m, &[&ks[0]]), 0, NOW, Meter::Publish)
            .unwrap();
        assert!(book.prune(&r, &view()).is_empty());
        let mut after = view();
        after.running = Some("0.2.0".parse().unwrap());
        let gone = book.prune(&r, &after);
        assert_eq!(gone.len(), 1);
        assert!(book.is_empty());
    }
}
