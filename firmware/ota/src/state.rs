//! What a node keeps across restarts for updates, and the time floor.
//!
//! [`OtaState`] holds the head of the trusted root chain, the running version, the versions
//! once seen and refused (at most [`MAX_REFUSED`]), the [`TimeFloor`], and an audit ring of
//! the last [`MAX_AUDIT`] events (roots trusted or refused, releases seen, refusals,
//! installs). It encodes to canonical JSON; [`OtaState::decode`] bounds every list.
//!
//! **Writing it** is the I/O layer's job, and must survive a power cut at any instant:
//! write the bytes to `ota.json.tmp` in the same directory, `fsync` the file, `rename` it
//! over `ota.json`, then `fsync` the directory. A crash leaves either the old or the new
//! state, never a mix. On the FAT boot partition rename is not atomic, so the state lives
//! on the data partition (ext4).
//!
//! **The floor.** [`TimeFloor::observe`] raises the floor to the network time the node has
//! seen; the effective time is `max(now, floor)`. Expiry is judged at the effective time, so
//! a node whose clock is set back (no RTC, a forged NTP answer, a peer lying) cannot be fed
//! a release or an approval that had already expired. Only trusted times may be observed:
//! the image's build time at first start and the network time agreed by cronoTree, never one
//! peer's claim; a floor pushed far into the future would make every release look expired.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::root::{SignedRoot, TrustedRoot};
use crate::types::{Board, Sha256Hex, Version};
use crate::verify::{NodeView, Refusal, Report};
use crate::{bound, canonical, decode_json, type_tag, OtaError};
use crate::{MAX_AUDIT, MAX_REFUSED, MAX_SIGNATURES, MAX_STATE_BYTES};

type_tag!(StateTag, "borg.ota.state");

/// The latest trusted time seen (ms since the epoch). Never goes down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TimeFloor(u64);

impl TimeFloor {
    pub fn new(floor_ms: u64) -> Self {
        Self(floor_ms)
    }

    /// Raise the floor to `now_ms` if it is later; returns the effective time.
    pub fn observe(&mut self, now_ms: u64) -> u64 {
        self.0 = self.0.max(now_ms);
        self.0
    }

    /// `max(now_ms, floor)`, without raising the floor.
    pub fn effective(&self, now_ms: u64) -> u64 {
        self.0.max(now_ms)
    }

    pub fn get(&self) -> u64 {
        self.0
    }
}

/// A short machine code (`[a-z_]{1,32}`), e.g. a refusal reason. Bounded on decode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Code(String);

impl Code {
    pub fn new(text: &str) -> Result<Self, OtaError> {
        let ok = !text.is_empty()
            && text.len() <= 32
            && text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        if !ok {
            return Err(OtaError::Malformed {
                what: "code",
                reason: "must be 1 to 32 of [a-z_]".into(),
            });
        }
        Ok(Self(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Code {
    type Error = OtaError;
    fn try_from(text: String) -> Result<Self, OtaError> {
        Self::new(&text)
    }
}

impl From<Code> for String {
    fn from(c: Code) -> String {
        c.0
    }
}

/// A version refused for good, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefusedVersion {
    pub version: Version,
    pub reason: Code,
    pub at_ms: u64,
}

/// Something worth remembering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuditEvent {
    RootTrusted {
        version: u64,
    },
    RootRefused {
        version: u64,
        reason: Code,
    },
    ReleaseSeen {
        version: Version,
        manifest: Sha256Hex,
        counted: u64,
        threshold: u32,
        verdict: Code,
    },
    /// A maintainer's valid approval of a release arrived (published here, or gossiped).
    ApprovalSeen {
        version: Version,
        manifest: Sha256Hex,
        key: borg_proto::identity::PublicKey,
    },
    Refused {
        version: Version,
        reason: Code,
    },
    Installed {
        version: Version,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub at_ms: u64,
    pub event: AuditEvent,
}

/// A node's persisted update state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtaState {
    #[serde(rename = "type")]
    pub tag: StateTag,
    /// Head of the trusted root chain.
    pub root: SignedRoot,
    pub running: Version,
    /// Sorted by version, no version twice, at most [`MAX_REFUSED`].
    pub refused: Vec<RefusedVersion>,
    pub floor: TimeFloor,
    /// Oldest first, at most [`MAX_AUDIT`].
    pub audit: VecDeque<AuditEntry>,
}

fn code(text: &str) -> Code {
    // Callers pass our own `code()` strings, which are all [a-z_]{1,32}.
    Code::new(text).unwrap_or_else(|_| Code("unknown".into()))
}

impl OtaState {
    /// First start: the image's root, the image's version, the build time as the floor.
    pub fn new(root: &TrustedRoot, running: Version, floor_ms: u64) -> Self {
        Self {
            tag: StateTag,
            root: root.signed_root().clone(),
            running,
            refused: Vec::new(),
            floor: TimeFloor::new(floor_ms),
            audit: VecDeque::new(),
        }
    }

    /// Decode with every list bounded; the root must pass [`crate::Root::check`].
    pub fn decode(bytes: &[u8]) -> Result<Self, OtaError> {
        let state: OtaState = decode_json("ota state", bytes, MAX_STATE_BYTES)?;
        bound("state refused versions", state.refused.len(), MAX_REFUSED)?;
        bound("state audit entries", state.audit.len(), MAX_AUDIT)?;
        bound(
            "root signatures",
            state.root.signatures.len(),
            MAX_SIGNATURES,
        )?;
        state.root.signed.check()?;
        // Sorted and unique: `is_refused` and `refuse` binary-search it.
        if let Some(pair) = state
            .refused
            .windows(2)
            .find(|w| w[0].version >= w[1].version)
        {
            return Err(OtaError::Malformed {
                what: "ota state",
                reason: format!(
                    "refused versions must be strictly increasing ({} then {})",
                    pair[0].version, pair[1].version
                ),
            });
        }
        Ok(state)
    }

    pub fn encode(&self) -> Vec<u8> {
        canonical(self)
    }

    /// The root to trust now: the image's if it is newer than the stored head (a new image
    /// ships a newer root), else the stored head, which must still carry k of its own
    /// signatures (the chain that led to it was checked before it was stored).
    pub fn trusted_root(&self, image_root: &TrustedRoot) -> Result<TrustedRoot, OtaError> {
        if image_root.version() >= self.root.signed.version {
            return Ok(image_root.clone());
        }
        TrustedRoot::anchor(&self.root)
    }

    /// Walk `chain` from `current`; on success the new head is stored. Audited either way.
    pub fn advance_root(
        &mut self,
        current: &TrustedRoot,
        chain: &[crate::SignedRoot],
        now_ms: u64,
    ) -> Result<TrustedRoot, OtaError> {
        match current.walk(chain) {
            Ok(head) => {
                self.root = head.signed_root().clone();
                self.audit(
                    now_ms,
                    AuditEvent::RootTrusted {
                        version: head.version(),
                    },
                );
                Ok(head)
            }
            Err(e) => {
                let version = chain.last().map_or(0, |r| r.signed.version);
                self.audit(
                    now_ms,
                    AuditEvent::RootRefused {
                        version,
                        reason: code(e.code()),
                    },
                );
                Err(e)
            }
        }
    }

    /// Raise the floor (see [`TimeFloor`]); returns the effective time.
    pub fn observe_time(&mut self, now_ms: u64) -> u64 {
        self.floor.observe(now_ms)
    }

    /// What [`crate::verify()`] needs from this state.
    pub fn node_view(&self, now_ms: u64, board: Option<Board>) -> NodeView {
        NodeView {
            now_ms,
            floor_ms: self.floor.get(),
            running: Some(self.running),
            board,
            refused: self.refused.iter().map(|r| r.version).collect(),
        }
    }

    /// Record a report in the audit log. A release that k maintainers approved but that
    /// expired is refused for good (time does not go back). Reports below the threshold
    /// never refuse a version: anyone can make such a manifest, and must not be able to
    /// block a future release by sending an expired one with its number.
    pub fn note_report(&mut self, report: &Report, now_ms: u64) {
        self.audit(
            now_ms,
            AuditEvent::ReleaseSeen {
                version: report.version,
                manifest: report.manifest,
                counted: report.counted as u64,
                threshold: report.threshold,
                verdict: code(report.verdict_code()),
            },
        );
        let expired = report
            .refusals
            .iter()
            .any(|r| matches!(r, Refusal::Expired { .. }));
        if report.signed_by_threshold() && expired {
            self.refuse(report.version, "expired", now_ms);
        }
    }

    /// Refuse `version` for good (e.g. its trial boot failed). When the set is full, the
    /// lowest version goes: after dropping those at or below the running one (the downgrade
    /// rule already refuses them), the lowest is the one least likely to be offered again.
    pub fn refuse(&mut self, version: Version, reason: &str, now_ms: u64) {
        self.audit(
            now_ms,
            AuditEvent::Refused {
                version,
                reason: code(reason),
            },
        );
        if let Err(at) = self.refused.binary_search_by(|r| r.version.cmp(&version)) {
            self.refused.insert(
                at,
                RefusedVersion {
                    version,
                    reason: code(reason),
                    at_ms: now_ms,
                },
            );
        }
        if self.refused.len() > MAX_REFUSED {
            let running = self.running;
            self.refused.retain(|r| r.version > running);
        }
        while self.refused.len() > MAX_REFUSED {
            self.refused.remove(0);
        }
    }

    /// The node now runs `version` (after a committed install).
    pub fn set_running(&mut self, version: Version, now_ms: u64) {
        self.running = version;
        self.audit(now_ms, AuditEvent::Installed { version });
    }

    pub fn is_refused(&self, version: &Version) -> bool {
        self.refused
            .binary_search_by(|r| r.version.cmp(version))
            .is_ok()
    }

    /// Append to the audit ring, dropping the oldest beyond [`MAX_AUDIT`]; an event equal to
    /// the last one is not repeated (a release re-verified as approvals arrive).
    pub fn audit(&mut self, at_ms: u64, event: AuditEvent) {
        if self.audit.back().is_some_and(|last| last.event == event) {
            return;
        }
        self.audit.push_back(AuditEntry { at_ms, event });
        while self.audit.len() > MAX_AUDIT {
            self.audit.pop_front();
        }
    }
}
