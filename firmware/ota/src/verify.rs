//! The verification report: may this node install this release, and why (not)?
//!
//! [`verify`] looks at every approval and says whether it counts, in this order of checks:
//! the key is one of the trusted root's keys ([`ApprovalStatus::UnknownKey`]), the approval
//! names this manifest's digest ([`ApprovalStatus::WrongManifest`]), its signature verifies
//! ([`ApprovalStatus::BadSignature`]), it has not expired at the effective time
//! ([`ApprovalStatus::Expired`]), and its key was not counted already
//! ([`ApprovalStatus::DuplicateKey`]). Then it checks the release against the node and
//! collects every reason to refuse ([`Refusal`]); the release is approved only when there
//! is none.
//!
//! Time is `max(now_ms, floor)` (see [`crate::TimeFloor`]): a clock set back below what the
//! node has already seen cannot make an expired release or approval valid again.

use std::collections::BTreeSet;

use borg_proto::identity::PublicKey;
use serde::Serialize;

use crate::release::{Approval, Manifest};
use crate::root::TrustedRoot;
use crate::types::{Board, Sha256Hex, Version};

/// What the node knows about itself when it judges a release.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// Network time now (ms since the epoch).
    pub now_ms: u64,
    /// The persisted "latest time seen" floor (ms); the effective time is never below it.
    pub floor_ms: u64,
    /// The running version; `None` (a maintainer checking a file) skips the version rules.
    pub running: Option<Version>,
    /// This node's board; `None` skips the board rule.
    pub board: Option<Board>,
    /// Versions once seen and refused.
    pub refused: BTreeSet<Version>,
}

impl NodeView {
    pub fn effective_now_ms(&self) -> u64 {
        self.now_ms.max(self.floor_ms)
    }
}

/// Whether one approval counts, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ApprovalStatus {
    Counts,
    /// The key is not a maintainer key of the trusted root.
    UnknownKey,
    /// The approval is for another manifest (another digest).
    WrongManifest,
    /// The signature does not verify.
    BadSignature,
    /// The approval expired before the effective time.
    Expired {
        expires_ms: u64,
    },
    /// Valid, but this key has already been counted.
    DuplicateKey,
}

impl ApprovalStatus {
    pub fn code(&self) -> &'static str {
        match self {
            ApprovalStatus::Counts => "counts",
            ApprovalStatus::UnknownKey => "unknown_key",
            ApprovalStatus::WrongManifest => "wrong_manifest",
            ApprovalStatus::BadSignature => "bad_signature",
            ApprovalStatus::Expired { .. } => "expired",
            ApprovalStatus::DuplicateKey => "duplicate_key",
        }
    }

    /// A sentence for humans.
    pub fn explain(&self) -> String {
        match self {
            ApprovalStatus::Counts => "counts".into(),
            ApprovalStatus::UnknownKey => "does not count: not a maintainer key of the root".into(),
            ApprovalStatus::WrongManifest => {
                "does not count: it approves another manifest (digest differs)".into()
            }
            ApprovalStatus::BadSignature => "does not count: bad signature".into(),
            ApprovalStatus::Expired { expires_ms } => {
                format!("does not count: expired at {expires_ms} ms")
            }
            ApprovalStatus::DuplicateKey => {
                "does not count: duplicate key (this key was already counted)".into()
            }
        }
    }
}

/// One approval's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalCheck {
    pub key: PublicKey,
    #[serde(flatten)]
    pub status: ApprovalStatus,
}

/// A reason to refuse a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Refusal {
    /// This node's board is not among the release's boards.
    WrongBoard { board: Board },
    /// This version was seen and refused before; it never becomes installable again.
    RefusedBefore { version: Version },
    /// Not above the running version.
    Downgrade { running: Version, offered: Version },
    /// The running version is below the release's minimum.
    BadMinVersion { running: Version, min: Version },
    /// The release expired before the effective time.
    Expired {
        expires_ms: u64,
        effective_now_ms: u64,
    },
    /// Fewer than k approvals count.
    NotEnoughApprovals { counted: usize, threshold: u32 },
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::WrongBoard { .. } => "wrong_board",
            Refusal::RefusedBefore { .. } => "refused_before",
            Refusal::Downgrade { .. } => "downgrade",
            Refusal::BadMinVersion { .. } => "bad_min_version",
            Refusal::Expired { .. } => "expired",
            Refusal::NotEnoughApprovals { .. } => "not_enough_approvals",
        }
    }

    /// A sentence for humans.
    pub fn explain(&self) -> String {
        match self {
            Refusal::WrongBoard { board } => format!("not built for board {board}"),
            Refusal::RefusedBefore { version } => {
                format!("version {version} was refused before and stays refused")
            }
            Refusal::Downgrade { running, offered } => {
                format!("downgrade: {offered} is not above the running {running}")
            }
            Refusal::BadMinVersion { running, min } => {
                format!(
                    "the running {running} is below the minimum {min} this release updates from"
                )
            }
            Refusal::Expired {
                expires_ms,
                effective_now_ms,
            } => format!("expired at {expires_ms} ms; the time is {effective_now_ms} ms"),
            Refusal::NotEnoughApprovals { counted, threshold } => {
                format!("not enough approvals: {counted} of {threshold}")
            }
        }
    }
}

/// The whole answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub version: Version,
    pub manifest: Sha256Hex,
    pub root_version: u64,
    pub effective_now_ms: u64,
    pub approvals: Vec<ApprovalCheck>,
    /// Distinct maintainer keys whose approval counts.
    pub counted: usize,
    /// Distinct maintainer keys with a valid signature on this manifest, expired or not:
    /// did k maintainers ever approve exactly this release?
    pub signed: usize,
    pub threshold: u32,
    /// Every reason to refuse; empty when approved.
    pub refusals: Vec<Refusal>,
    pub approved: bool,
}

impl Report {
    /// `approved`, or the code of the first refusal.
    pub fn verdict_code(&self) -> &'static str {
        self.refusals.first().map_or("approved", Refusal::code)
    }

    /// Did k maintainers sign exactly this release (expired approvals included, whatever
    /// this node thinks of it)? Only such releases may be remembered as refused; see
    /// [`crate::OtaState::note_report`].
    pub fn signed_by_threshold(&self) -> bool {
        self.signed >= self.threshold as usize
    }
}

/// Judge `manifest` with `approvals` against the trusted root and the node's view.
pub fn verify(
    root: &TrustedRoot,
    manifest: &Manifest,
    approvals: &[Approval],
    node: &NodeView,
) -> Report {
    verify_with(root, manifest, approvals, node, Approval::signature_valid)
}

/// [`verify`] with the signature check given: a caller that keeps only approvals whose
/// signature it already checked (a node's book of releases) passes `|_| true` and pays no
/// ECDSA for a report; everything else in the report is checked as in [`verify`].
pub fn verify_with(
    root: &TrustedRoot,
    manifest: &Manifest,
    approvals: &[Approval],
    node: &NodeView,
    signature_valid: impl Fn(&Approval) -> bool,
) -> Report {
    let now = node.effective_now_ms();
    let digest = manifest.digest();
    let mut counted = BTreeSet::new();
    let mut signed = BTreeSet::new();
    let checks: Vec<ApprovalCheck> = approvals
        .iter()
        .map(|a| {
            let status = if !root.keys().contains(&a.key) {
                ApprovalStatus::UnknownKey
            } else if a.manifest != digest {
                ApprovalStatus::WrongManifest
            } else if !signature_valid(a) {
                ApprovalStatus::BadSignature
            } else {
                signed.insert(a.key);
                if now > a.expires_ms {
                    ApprovalStatus::Expired {
                        expires_ms: a.expires_ms,
                    }
                } else if !counted.insert(a.key) {
                    ApprovalStatus::DuplicateKey
                } else {
                    ApprovalStatus::Counts
                }
            };
            ApprovalCheck { key: a.key, status }
        })
        .collect();

    let mut refusals = Vec::new();
    if let Some(board) = &node.board {
        if !manifest.targets(board) {
            refusals.push(Refusal::WrongBoard {
                board: board.clone(),
            });
        }
    }
    if node.refused.contains(&manifest.version) {
        refusals.push(Refusal::RefusedBefore {
            version: manifest.version,
        });
    }
    if let Some(running) = node.running {
        if manifest.version <= running {
            refusals.push(Refusal::Downgrade {
                running,
                offered: manifest.version,
            });
        }
        if running < manifest.min_version {
            refusals.push(Refusal::BadMinVersion {
                running,
                min: manifest.min_version,
            });
        }
    }
    if now > manifest.expires_ms {
        refusals.push(Refusal::Expired {
            expires_ms: manifest.expires_ms,
            effective_now_ms: now,
        });
    }
    if counted.len() < root.threshold() as usize {
        refusals.push(Refusal::NotEnoughApprovals {
            counted: counted.len(),
            threshold: root.threshold(),
        });
    }
    Report {
        version: manifest.version,
        manifest: digest,
        root_version: root.version(),
        effective_now_ms: now,
        approved: refusals.is_empty(),
        approvals: checks,
        counted: counted.len(),
        signed: signed.len(),
        threshold: root.threshold(),
        refusals,
    }
}
