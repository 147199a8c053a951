//! # borg-ota: who may ship software to a BorgIOS node, decided without I/O
//!
//! The trust logic of over-the-air updates (issue 12 items 1-3; docs/OTA.md):
//!
//! - [`root`]: the **trust root**, TUF-shaped: maintainer P-256 keys and a threshold k,
//!   versioned. Version N+1 is trusted only when signed by k of version N's keys *and* k of
//!   its own ([`TrustedRoot::rotate`]); a node walks the chain in order ([`TrustedRoot::walk`]).
//! - [`release`]: the **release manifest** (version, boards, image digest and size, minimum
//!   version to update from, expiry, notes, fetch id) and **approvals**: detached signatures
//!   by maintainer keys over the manifest's SHA-256 (of its RFC 8785 canonical bytes).
//! - [`verify`](mod@verify): the **report**: which approvals count and why the others do
//!   not, the count against k, and the verdict with every reason for refusal.
//! - [`state`]: what a node persists ([`OtaState`]: root chain head, running version,
//!   refused versions, the [`TimeFloor`], an audit ring) and its encode/decode.
//! - [`types`]: the small parsed types (versions, boards, digests, signatures).
//!
//! Everything is sans-IO: time comes in as `now_ms`, files are read and written by the
//! caller (the `borg release` CLI, later the node's update cell). The one helper that
//! touches bytes from outside, [`release::image_digest`], takes any [`std::io::Read`].
//!
//! Keys count by distinct key: a key's id *is* its 33-byte compressed point, which has
//! exactly one encoding, so no two ids can name one key (unlike python-tuf's
//! GHSA-r7vq-6425-j94w, where one key under two key ids was counted twice).
//!
//! Every signed object carries a `"type"` member (`borg.ota.root`, `borg.ota.approval`,
//! `borg.ota.release`) and no `"v"`/`"kind"` member, so its canonical bytes can never be the
//! bytes of another kind of OTA object nor of a network envelope (domain separation).
#![forbid(unsafe_code)]

pub mod autoboot;
pub mod chunks;
pub mod release;
pub mod root;
pub mod state;
pub mod types;
pub mod verify;

pub use release::{Approval, Manifest, ReleaseFile};
pub use root::{KeySig, Root, SignedRoot, Tally, TrustedRoot};
pub use state::{AuditEntry, AuditEvent, OtaState, TimeFloor};
pub use types::{Board, FetchId, Sha256Hex, SigBytes, Version};
pub use verify::{verify, ApprovalCheck, ApprovalStatus, NodeView, Refusal, Report};

/// Largest encoded root or release file accepted, checked before parsing.
pub const MAX_DOC_BYTES: usize = 64 * 1024;
/// Largest encoded [`OtaState`] accepted, checked before parsing.
pub const MAX_STATE_BYTES: usize = 1024 * 1024;
/// Most maintainer keys in one root.
pub const MAX_ROOT_KEYS: usize = 32;
/// Most signatures on a root, and most approvals on a release.
pub const MAX_SIGNATURES: usize = 64;
/// Most boards one release targets.
pub const MAX_BOARDS: usize = 8;
/// Longest board name (bytes).
pub const MAX_BOARD_LEN: usize = 32;
/// Longest release notes (bytes of UTF-8).
pub const MAX_NOTES_BYTES: usize = 4096;
/// Longest fetch id (bytes).
pub const MAX_FETCH_ID_LEN: usize = 128;
/// Largest image a release may announce: 16 GiB (a Pi slot is far smaller).
pub const MAX_IMAGE_SIZE: u64 = 16 << 30;
/// Most refused versions a node remembers.
pub const MAX_REFUSED: usize = 256;
/// Most audit entries a node keeps (a ring: the oldest go first).
pub const MAX_AUDIT: usize = 512;

/// Everything that can go wrong in this crate. Decoding errors come first: anything from
/// outside is refused at decode time, before any signature is looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtaError {
    #[error("{what} is {len} bytes, more than the {max} allowed")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what}: {len} is more than the {max} allowed")]
    OverBound {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} appears twice: {item}")]
    Duplicate { what: &'static str, item: String },
    #[error("threshold {threshold} is impossible with {keys} keys (need 1 <= k <= keys)")]
    BadThreshold { threshold: u32, keys: usize },
    #[error("root version {got} cannot follow version {trusted}; roots are walked one version at a time")]
    RootVersion { trusted: u64, got: u64 },
    #[error("root version {version}: {counted} of {threshold} signatures by {by} keys")]
    RootThreshold {
        version: u64,
        by: &'static str,
        counted: usize,
        threshold: u32,
    },
    #[error("minimum version {min} is above the release version {version}")]
    MinAboveVersion { min: Version, version: Version },
    #[error("reading the image: {0}")]
    Io(String),
}

impl OtaError {
    /// The error code used on the wire and in the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            OtaError::TooLarge { .. } => "too_large",
            OtaError::Malformed { .. } => "malformed",
            OtaError::OverBound { .. } => "over_bound",
            OtaError::Duplicate { .. } => "duplicate",
            OtaError::BadThreshold { .. } => "bad_threshold",
            OtaError::RootVersion { .. } => "root_version",
            OtaError::RootThreshold { .. } => "root_threshold",
            OtaError::MinAboveVersion { .. } => "bad_min_version",
            OtaError::Io(_) => "io",
        }
    }
}

/// Check a count against its bound.
pub(crate) fn bound(what: &'static str, len: usize, max: usize) -> Result<(), OtaError> {
    if len > max {
        return Err(OtaError::OverBound { what, len, max });
    }
    Ok(())
}

/// Size check, strict JSON (duplicate keys refused at any depth), then typed decoding.
pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, OtaError> {
    if bytes.len() > max {
        return Err(OtaError::TooLarge {
            what,
            len: bytes.len(),
            max,
        });
    }
    let value = borg_proto::jcs::parse_strict(bytes).map_err(|e| OtaError::Malformed {
        what,
        reason: e.to_string(),
    })?;
    serde_json::from_value(value).map_err(|e| OtaError::Malformed {
        what,
        reason: e.to_string(),
    })
}

/// RFC 8785 canonical bytes of a serializable value.
pub(crate) fn canonical<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own types (strings, u64s, arrays, structs) into a Value cannot fail:
    // no maps with non-string keys, no floats.
    let value = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
    borg_proto::jcs::to_vec(&value)
}

/// A `"type"` member: serializes as its fixed text and refuses any other on decode.
macro_rules! type_tag {
    ($name:ident, $text:expr) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name;

        impl $name {
            pub const TEXT: &'static str = $text;
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str($text)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                if text == $text {
                    Ok($name)
                } else {
                    Err(serde::de::Error::custom(concat!(
                        "\"type\" must be \"",
                        $text,
                        "\""
                    )))
                }
            }
        }
    };
}
pub(crate) use type_tag;
