//! The releases a node is gathering approvals for, sans-IO: what is kept, what is merged,
//! what is refused, and the bounds.
//!
//! A release is kept only when it carries at least one **valid, unexpired approval by a
//! maintainer key** of the trusted root, and is a candidate for this node (not expired, above
//! the running version, not refused before, for this board when the board is known). So a
//! stranger can neither store a manifest here nor make the network carry one: only what a
//! maintainer signed gets in, and it is kept with only the approvals that verify (one per
//! key). Approvals of one release arriving from anywhere (published at another node,
//! gossiped, offered by a neighbour) are merged by manifest digest.
//!
//! Bounds: at most [`MAX_PENDING`] releases (when full, a newer version evicts the lowest);
//! at most one approval per root key (at most 32); signature checks at most
//! [`VERIFY_PER_S`] a second (burst [`VERIFY_BURST`]) for everything that arrives, so a
//! flood of forged approvals under maintainer key ids costs this node a bounded share of a
//! core; beyond it an offer is refused as `busy` and nothing is changed.

use std::collections::{BTreeMap, BTreeSet};

use borg_ota::verify::{NodeView, Refusal, Report};
use borg_ota::{verify, Approval, ReleaseFile, Sha256Hex, TrustedRoot};

/// Releases gathered at once.
pub const MAX_PENDING: usize = 8;
/// Approval signatures checked per second, all sources together.
pub const VERIFY_PER_S: u32 = 200;
/// Signature checks that may be saved up (a burst: one release file from a maintainer, plus
/// the offers of a few neighbours after a restart).
pub const VERIFY_BURST: u32 = 400;

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
    /// Approvals that verified and were not held before.
    pub added: Vec<Approval>,
    /// A release of a lower version left to make room.
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
        "{MAX_PENDING} releases of higher versions are already being gathered here; the \
         lowest is {lowest}"
    )]
    Full { lowest: String },
    #[error("too many signature checks right now ({VERIFY_PER_S}/s); try again in a second")]
    Busy,
}

impl BookError {
    /// Wire code and HTTP status (DESIGN.md section 5).
    pub fn code(&self) -> (&'static str, u16) {
        match self {
            BookError::NoApproval { .. } => ("forbidden", 403),
            BookError::NotForThisNode(_) => ("refused", 409),
            BookError::Full { .. } => ("full", 409),
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
#[derive(Debug, Clone)]
pub struct Book {
    releases: BTreeMap<Sha256Hex, Pending>,
    budget: Budget,
}

impl Default for Book {
    fn default() -> Self {
        Self {
            releases: BTreeMap::new(),
            budget: Budget {
                tokens: VERIFY_BURST,
                refilled_ms: 0,
            },
        }
    }
}

/// Refusals that mean the release is of no use to this node whatever approvals come.
fn not_for_this_node(report: &Report) -> Option<Refusal> {
    report
        .refusals
        .iter()
        .find(|r| !matches!(r, Refusal::NotEnoughApprovals { .. }))
        .cloned()
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

    /// Judge one gathered release now.
    pub fn report(
        &self,
        root: &TrustedRoot,
        digest: &Sha256Hex,
        node: &NodeView,
    ) -> Option<Report> {
        let p = self.releases.get(digest)?;
        Some(verify(root, &p.file.manifest, &p.file.approvals, node))
    }

    /// Merge `file` in: keep its approvals that verify and are new, if the release is (or
    /// becomes) worth keeping. `mono_ms` paces the signature budget; `net_ms` stamps it.
    /// `unmetered` skips the budget (the node's own saved releases at start).
    pub fn offer(
        &mut self,
        root: &TrustedRoot,
        node: &NodeView,
        file: &ReleaseFile,
        mono_ms: u64,
        net_ms: u64,
        unmetered: bool,
    ) -> Result<Merged, BookError> {
        let digest = file.manifest.digest();
        let now = node.effective_now_ms();
        let held: BTreeSet<_> = self
            .releases
            .get(&digest)
            .map(|p| p.file.approvals.iter().map(|a| a.key).collect())
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
                    && !held.contains(&a.key)
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
        if !unmetered && !self.budget.take(mono_ms, candidates.len() as u32) {
            return Err(BookError::Busy);
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
            let report = verify(root, &file.manifest, &added, node);
            if let Some(refusal) = not_for_this_node(&report) {
                return Err(BookError::NotForThisNode(refusal));
            }
            if self.releases.len() >= MAX_PENDING {
                let lowest = self
                    .releases
                    .iter()
                    .min_by_key(|(_, p)| p.file.manifest.version)
                    .map(|(d, p)| (*d, p.file.manifest.version));
                match lowest {
                    Some((d, v)) if v < file.manifest.version => {
                        self.releases.remove(&d);
                        evicted = Some(d);
                    }
                    Some((_, v)) => {
                        return Err(BookError::Full {
                            lowest: v.to_string(),
                        })
                    }
                    None => {}
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
            p.file.approvals.extend(added.iter().cloned());
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
            let report = verify(root, &p.file.manifest, &p.file.approvals, node);
            if let Some(r) = not_for_this_node(&report) {
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
                .offer(&r, &view(), &file(&m, &[k]), 0, NOW, false)
                .unwrap();
            assert_eq!(merged.new_release, i == 0);
            assert_eq!(merged.added.len(), 1);
            let report = book.report(&r, &merged.digest, &view()).unwrap();
            assert_eq!(report.counted, i + 1);
            assert_eq!(report.approved, i == 2, "approved only with the k-th");
        }
        // The same approvals again change nothing and cost no signature check.
        let again = book
            .offer(&r, &view(), &file(&m, &[&ks[0], &ks[1]]), 0, NOW, false)
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
            .offer(&r, &view(), &file(&m, &[&stranger]), 0, NOW, false)
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
            book.offer(&r, &view(), &f, 0, NOW, false),
            Err(BookError::NoApproval { .. })
        ));
        // An approval of another manifest does not count for this one.
        let other = manifest("0.3.0");
        let f = ReleaseFile {
            manifest: m.clone(),
            approvals: vec![Approval::sign(&ks[0], &other, other.expires_ms)],
        };
        assert!(book.offer(&r, &view(), &f, 0, NOW, false).is_err());
        assert!(book.is_empty());
    }

    #[test]
    fn one_key_twice_counts_once() {
        let ks = keys(3);
        let r = root(&ks, 2);
        let m = manifest("0.2.0");
        let mut book = Book::default();
        let f = file(&m, &[&ks[0], &ks[0]]);
        let merged = book.offer(&r, &view(), &f, 0, NOW, false).unwrap();
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
            book.offer(&r, &view(), &file(&old, &[&ks[0]]), 0, NOW, false),
            Err(BookError::NotForThisNode(Refusal::Downgrade { .. }))
        ));
        let mut expired = manifest("0.2.0");
        expired.expires_ms = NOW - 1;
        let f = ReleaseFile {
            manifest: expired.clone(),
            approvals: vec![Approval::sign(&ks[0], &expired, NOW + DAY)],
        };
        assert!(matches!(
            book.offer(&r, &view(), &f, 0, NOW, false),
            Err(BookError::NotForThisNode(Refusal::Expired { .. }))
        ));
        // A clock set back does not help: the floor holds.
        let mut behind = view();
        behind.now_ms = NOW - 10 * DAY;
        behind.floor_ms = NOW;
        assert!(book.offer(&r, &behind, &f, 0, NOW, false).is_err());
        let m = manifest("0.3.0");
        let mut refused = view();
        refused.refused.insert(m.version);
        assert!(matches!(
            book.offer(&r, &refused, &file(&m, &[&ks[0]]), 0, NOW, false),
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
            book.offer(&r, &view(), &file(&m, &[&ks[0]]), 0, NOW, true)
                .unwrap();
        }
        let low = manifest("0.1.5");
        assert!(matches!(
            book.offer(&r, &view(), &file(&low, &[&ks[0]]), 0, NOW, true),
            Err(BookError::Full { .. })
        ));
        let high = manifest("1.0.0");
        let merged = book
            .offer(&r, &view(), &file(&high, &[&ks[0]]), 0, NOW, true)
            .unwrap();
        assert_eq!(merged.evicted, Some(manifest("0.2.0").digest()));
        assert_eq!(book.len(), MAX_PENDING);
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
            if let Err(BookError::Busy) = book.offer(&r, &view(), &f, 0, NOW, false) {
                busy_at = Some(i);
                break;
            }
        }
        assert_eq!(busy_at, Some((VERIFY_BURST / 32) as usize));
        // A second later the budget has refilled by VERIFY_PER_S.
        assert!(matches!(
            book.offer(&r, &view(), &f, 1000, NOW, false),
            Err(BookError::NoApproval { .. })
        ));
    }

    #[test]
    fn prune_drops_what_the_node_now_runs() {
        let ks = keys(1);
        let r = root(&ks, 1);
        let m = manifest("0.2.0");
        let mut book = Book::default();
        book.offer(&r, &view(), &file(&m, &[&ks[0]]), 0, NOW, false)
            .unwrap();
        assert!(book.prune(&r, &view()).is_empty());
        let mut after = view();
        after.running = Some("0.2.0".parse().unwrap());
        let gone = book.prune(&r, &after);
        assert_eq!(gone.len(), 1);
        assert!(book.is_empty());
    }
}
