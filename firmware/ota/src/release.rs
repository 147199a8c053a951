//! Release manifests and their approvals: the release file a maintainer creates, approves
//! and a node verifies.
//!
//! ```text
//! {"manifest":{"type":"borg.ota.release","version":"1.4.0","boards":["rpi4","rpi5"],
//!              "image":{"sha256":"<64 hex>","size":73400320},"min_version":"1.2.0",
//!              "expires_ms":1767225600000,"notes":"...","fetch":"sha256:<64 hex>"},
//!  "approvals":[{"key":"<key>","manifest":"<64 hex>","expires_ms":...,"sig":"<...>"},...]}
//! ```
//!
//! The manifest's digest ([`Manifest::digest`]) is SHA-256 of its RFC 8785 canonical bytes.
//! An approval is detached: it names the manifest digest it approves and its own expiry, and
//! its signature covers the canonical bytes of
//! `{"type":"borg.ota.approval","manifest":"<digest>","expires_ms":N}`. Detached approvals
//! can travel alone (maintainers approve from anywhere, nodes gather them as they arrive),
//! and a manifest changed in any byte of meaning has another digest, so approvals of the
//! original no longer apply to it.

use std::collections::BTreeSet;
use std::io::Read;

use borg_proto::identity::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};

use crate::types::{Board, FetchId, Sha256Hex, SigBytes, Version};
use crate::{bound, canonical, decode_json, type_tag, OtaError};
use crate::{MAX_BOARDS, MAX_DOC_BYTES, MAX_IMAGE_SIZE, MAX_NOTES_BYTES, MAX_SIGNATURES};

type_tag!(ReleaseTag, "borg.ota.release");
type_tag!(ApprovalTag, "borg.ota.approval");

/// The image a release installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    pub sha256: Sha256Hex,
    pub size: u64,
}

/// What maintainers approve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(rename = "type")]
    pub tag: ReleaseTag,
    pub version: Version,
    /// Boards this image runs on; 1 to [`MAX_BOARDS`], no board twice.
    pub boards: Vec<Board>,
    pub image: ImageRef,
    /// The oldest running version that may update to this one (<= `version`).
    pub min_version: Version,
    /// After this (ms since the epoch, network time) the release is never installed.
    pub expires_ms: u64,
    /// At most [`MAX_NOTES_BYTES`] bytes of UTF-8.
    pub notes: String,
    /// What to ask the network for to fetch the image.
    pub fetch: FetchId,
}

impl Manifest {
    /// The rules decoding enforces beyond types: bounds, no duplicate board, image size at
    /// most [`MAX_IMAGE_SIZE`], `min_version <= version`.
    pub fn check(&self) -> Result<(), OtaError> {
        bound("release boards", self.boards.len(), MAX_BOARDS)?;
        if self.boards.is_empty() {
            return Err(OtaError::Malformed {
                what: "release",
                reason: "no board".into(),
            });
        }
        let mut seen = BTreeSet::new();
        for board in &self.boards {
            if !seen.insert(board) {
                return Err(OtaError::Duplicate {
                    what: "board",
                    item: board.to_string(),
                });
            }
        }
        bound("release notes bytes", self.notes.len(), MAX_NOTES_BYTES)?;
        if self.image.size > MAX_IMAGE_SIZE {
            return Err(OtaError::OverBound {
                what: "image size",
                len: usize::try_from(self.image.size).unwrap_or(usize::MAX),
                max: usize::try_from(MAX_IMAGE_SIZE).unwrap_or(usize::MAX),
            });
        }
        if self.min_version > self.version {
            return Err(OtaError::MinAboveVersion {
                min: self.min_version,
                version: self.version,
            });
        }
        Ok(())
    }

    /// SHA-256 of the canonical bytes: what approvals name.
    pub fn digest(&self) -> Sha256Hex {
        Sha256Hex::of(&canonical(self))
    }

    pub fn targets(&self, board: &Board) -> bool {
        self.boards.contains(board)
    }
}

#[derive(Serialize)]
struct ApprovalStatement {
    #[serde(rename = "type")]
    tag: ApprovalTag,
    manifest: Sha256Hex,
    expires_ms: u64,
}

/// One maintainer's signature over a manifest digest, valid until `expires_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub key: PublicKey,
    pub manifest: Sha256Hex,
    pub expires_ms: u64,
    pub sig: SigBytes,
}

impl Approval {
    /// Approve `manifest` with `key` until `expires_ms`.
    pub fn sign(key: &SecretKey, manifest: &Manifest, expires_ms: u64) -> Self {
        let statement = ApprovalStatement {
            tag: ApprovalTag,
            manifest: manifest.digest(),
            expires_ms,
        };
        Self {
            key: key.public(),
            manifest: statement.manifest,
            expires_ms,
            sig: SigBytes(key.sign(&canonical(&statement))),
        }
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        canonical(&ApprovalStatement {
            tag: ApprovalTag,
            manifest: self.manifest,
            expires_ms: self.expires_ms,
        })
    }

    /// Does the signature verify for `key`? (Says nothing about whether the key counts.)
    pub fn signature_valid(&self) -> bool {
        self.key.verify(&self.signed_bytes(), &self.sig.0).is_ok()
    }
}

/// A manifest and the approvals gathered for it: the release file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseFile {
    pub manifest: Manifest,
    pub approvals: Vec<Approval>,
}

impl ReleaseFile {
    /// Decode: size, strict JSON, types, [`Manifest::check`], at most [`MAX_SIGNATURES`]
    /// approvals. Approvals are not verified here; that is [`crate::verify()`]'s job.
    pub fn decode(bytes: &[u8]) -> Result<Self, OtaError> {
        let file: ReleaseFile = decode_json("release", bytes, MAX_DOC_BYTES)?;
        bound("release approvals", file.approvals.len(), MAX_SIGNATURES)?;
        file.manifest.check()?;
        Ok(file)
    }

    /// Canonical JSON; `decode(encode(f)) == f`.
    pub fn encode(&self) -> Vec<u8> {
        canonical(self)
    }

    /// Append an approval. Returns whether `approval.key` had approved this file before (the
    /// duplicate is kept, and will not count twice). Refused beyond [`MAX_SIGNATURES`].
    pub fn add_approval(&mut self, approval: Approval) -> Result<bool, OtaError> {
        bound(
            "release approvals",
            self.approvals.len() + 1,
            MAX_SIGNATURES,
        )?;
        let before = self.approvals.iter().any(|a| a.key == approval.key);
        self.approvals.push(approval);
        Ok(before)
    }
}

/// SHA-256 and length of an image, read in 64 KiB pieces (bounded memory whatever the size).
pub fn image_digest(mut reader: impl Read) -> Result<(Sha256Hex, u64), OtaError> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(OtaError::Io(e.to_string())),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((Sha256Hex::from_bytes(hasher.finalize().into()), size))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::root::tests::key;

    pub(crate) fn manifest(version: Version) -> Manifest {
        let digest = Sha256Hex::of(b"image bytes");
        Manifest {
            tag: ReleaseTag,
            version,
            boards: vec![
                Board::new("rpi4").unwrap(),
                Board::new("qemu-virt").unwrap(),
            ],
            image: ImageRef {
                sha256: digest,
                size: 11,
            },
            min_version: Version::new(1, 0, 0),
            expires_ms: 2_000_000_000_000,
            notes: "fixes".into(),
            fetch: FetchId::content(&digest),
        }
    }

    #[test]
    fn approvals_bind_the_manifest_digest_and_their_expiry() {
        let m = manifest(Version::new(1, 2, 0));
        let a = Approval::sign(&key(0), &m, 1_900_000_000_000);
        assert!(a.signature_valid());
        assert_eq!(a.manifest, m.digest());
        let mut longer = a.clone();
        longer.expires_ms += 1;
        assert!(!longer.signature_valid());
        let mut other = a.clone();
        other.manifest = manifest(Version::new(1, 2, 1)).digest();
        assert!(!other.signature_valid());
        let mut stolen = a.clone();
        stolen.key = key(1).public();
        assert!(!stolen.signature_valid());
    }

    #[test]
    fn every_field_changes_the_digest() {
        let m = manifest(Version::new(1, 2, 0));
        let d = m.digest();
        let mut changes: Vec<Manifest> = Vec::new();
        let mut c = m.clone();
        c.version = Version::new(1, 2, 1);
        changes.push(c);
        let mut c = m.clone();
        c.boards.pop();
        changes.push(c);
        let mut c = m.clone();
        c.image.size += 1;
        changes.push(c);
        let mut c = m.clone();
        c.image.sha256 = Sha256Hex::of(b"other");
        changes.push(c);
        let mut c = m.clone();
        c.min_version = Version::new(0, 9, 0);
        changes.push(c);
        let mut c = m.clone();
        c.expires_ms += 1;
        changes.push(c);
        let mut c = m.clone();
        c.notes.push('!');
        changes.push(c);
        let mut c = m.clone();
        c.fetch = FetchId::new("stream:7").unwrap();
        changes.push(c);
        for c in changes {
            assert_ne!(c.digest(), d, "{c:?}");
        }
    }

    #[test]
    fn decode_round_trip_and_refusals() {
        let m = manifest(Version::new(1, 2, 0));
        let mut file = ReleaseFile {
            manifest: m.clone(),
            approvals: vec![],
        };
        assert!(!file
            .add_approval(Approval::sign(&key(0), &m, m.expires_ms))
            .unwrap());
        assert!(file
            .add_approval(Approval::sign(&key(0), &m, m.expires_ms))
            .unwrap());
        let bytes = file.encode();
        assert_eq!(ReleaseFile::decode(&bytes).unwrap(), file);
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            f(&mut v);
            ReleaseFile::decode(&serde_json::to_vec(&v).unwrap())
        };
        let code = |r: Result<ReleaseFile, OtaError>| r.unwrap_err().code();
        // Notes: exactly the bound is fine, one byte more is refused.
        assert!(edit(&|v| v["manifest"]["notes"] = "n".repeat(MAX_NOTES_BYTES).into()).is_ok());
        let e = edit(&|v| v["manifest"]["notes"] = "n".repeat(MAX_NOTES_BYTES + 1).into());
        assert_eq!(code(e), "over_bound");
        // Boards: count bound, none, duplicates.
        let boards: Vec<String> = (0..=MAX_BOARDS).map(|i| format!("b{i}")).collect();
        let e = edit(&|v| v["manifest"]["boards"] = boards.clone().into());
        assert_eq!(code(e), "over_bound");
        let e = edit(&|v| v["manifest"]["boards"] = serde_json::json!([]));
        assert_eq!(code(e), "malformed");
        let e = edit(&|v| v["manifest"]["boards"] = serde_json::json!(["rpi4", "rpi4"]));
        assert_eq!(code(e), "duplicate");
        // Approvals count bound.
        let one = serde_json::to_value(&file.approvals[0]).unwrap();
        let e = edit(&|v| v["approvals"] = vec![one.clone(); MAX_SIGNATURES + 1].into());
        assert_eq!(code(e), "over_bound");
        // min_version above version, huge image, unknown field, wrong type tag.
        let e = edit(&|v| v["manifest"]["min_version"] = "9.0.0".into());
        assert_eq!(code(e), "bad_min_version");
        let e = edit(&|v| v["manifest"]["image"]["size"] = (MAX_IMAGE_SIZE + 1).into());
        assert_eq!(code(e), "over_bound");
        let e = edit(&|v| v["manifest"]["extra"] = 1.into());
        assert_eq!(code(e), "malformed");
        let e = edit(&|v| v["manifest"]["type"] = "borg.ota.root".into());
        assert_eq!(code(e), "malformed");
        // Duplicate JSON keys are refused (strict parsing), not "last one wins".
        let text = String::from_utf8(bytes.clone()).unwrap();
        let dup = text.replacen("\"notes\":", "\"notes\":\"x\",\"notes\":", 1);
        assert_eq!(code(ReleaseFile::decode(dup.as_bytes())), "malformed");
    }

    #[test]
    fn image_digest_streams() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (d, n) = image_digest(&data[..]).unwrap();
        assert_eq!(n, 200_000);
        assert_eq!(d, Sha256Hex::of(&data));
    }
}
