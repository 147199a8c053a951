//! The trust root: maintainer keys and a threshold, versioned, rotated TUF-style.
//!
//! ```text
//! {"signed":{"type":"borg.ota.root","version":2,"threshold":2,"keys":["<key>",...]},
//!  "signatures":[{"key":"<key>","sig":"<base64url r||s>"},...]}
//! ```
//!
//! A signature covers the RFC 8785 canonical bytes of `signed` ([`Root::signed_bytes`]).
//! A [`TrustedRoot`] exists only by one of two paths:
//! - [`TrustedRoot::anchor`]: the root shipped in the image, which must carry k signatures
//!   of its own keys (it is trusted because it is in the image; the self-signature catches a
//!   root that its maintainers never agreed on or a typo in a key);
//! - [`TrustedRoot::rotate`]: version N+1 from a trusted version N, only when signed by k_N
//!   of version N's keys *and* k_{N+1} of its own (TUF 5.3.4). [`TrustedRoot::walk`] applies
//!   a chain one version at a time: no version may be skipped, none repeated.
//!
//! Counting ([`tally`]): a signature counts when its key is in the key set, the signature
//! verifies, and no earlier signature by the same key was counted. A key's id is its
//! compressed point (one encoding per key), so one key cannot be counted twice under two
//! ids. Roots have no expiry here: a node whose image root expired could never update
//! again; a compromised root is answered by rotating it (docs/OTA.md).

use std::collections::BTreeSet;

use borg_proto::identity::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};

use crate::types::SigBytes;
use crate::{bound, canonical, decode_json, type_tag, OtaError};
use crate::{MAX_DOC_BYTES, MAX_ROOT_KEYS, MAX_SIGNATURES};

type_tag!(RootTag, "borg.ota.root");

/// The signed part of a root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    #[serde(rename = "type")]
    pub tag: RootTag,
    /// 1 for the first root; each rotation adds one.
    pub version: u64,
    /// k: signatures needed, by distinct keys of [`Root::keys`].
    pub threshold: u32,
    /// The maintainer keys, no key twice.
    pub keys: Vec<PublicKey>,
}

impl Root {
    /// A checked root (see [`Root::check`]).
    pub fn new(version: u64, keys: Vec<PublicKey>, threshold: u32) -> Result<Self, OtaError> {
        let root = Self {
            tag: RootTag,
            version,
            threshold,
            keys,
        };
        root.check()?;
        Ok(root)
    }

    /// version >= 1, 1 to [`MAX_ROOT_KEYS`] distinct keys, 1 <= threshold <= keys.
    pub fn check(&self) -> Result<(), OtaError> {
        if self.version == 0 {
            return Err(OtaError::Malformed {
                what: "root",
                reason: "version starts at 1".into(),
            });
        }
        bound("root keys", self.keys.len(), MAX_ROOT_KEYS)?;
        let mut seen = BTreeSet::new();
        for key in &self.keys {
            if !seen.insert(key) {
                return Err(OtaError::Duplicate {
                    what: "root key",
                    item: key.to_b64(),
                });
            }
        }
        if self.threshold == 0 || self.threshold as usize > self.keys.len() {
            return Err(OtaError::BadThreshold {
                threshold: self.threshold,
                keys: self.keys.len(),
            });
        }
        Ok(())
    }

    /// What signatures cover: the canonical bytes of this object.
    pub fn signed_bytes(&self) -> Vec<u8> {
        canonical(self)
    }

    pub fn has_key(&self, key: &PublicKey) -> bool {
        self.keys.contains(key)
    }
}

/// One signature and the key it claims to be by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySig {
    pub key: PublicKey,
    pub sig: SigBytes,
}

/// A root and its signatures: the root file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRoot {
    pub signed: Root,
    pub signatures: Vec<KeySig>,
}

impl SignedRoot {
    /// A root with no signatures yet.
    pub fn unsigned(root: Root) -> Self {
        Self {
            signed: root,
            signatures: Vec::new(),
        }
    }

    /// Decode a root file: size, strict JSON, types, then the bounds and rules of
    /// [`Root::check`] and at most [`MAX_SIGNATURES`] signatures. Signatures are not
    /// verified here; that is [`TrustedRoot`]'s job.
    pub fn decode(bytes: &[u8]) -> Result<Self, OtaError> {
        let root: SignedRoot = decode_json("root", bytes, MAX_DOC_BYTES)?;
        bound("root signatures", root.signatures.len(), MAX_SIGNATURES)?;
        root.signed.check()?;
        Ok(root)
    }

    /// Canonical JSON; `decode(encode(r)) == r`.
    pub fn encode(&self) -> Vec<u8> {
        canonical(self)
    }

    /// Add `key`'s signature; a signature already there by the same key is replaced, so
    /// signing twice never leaves two entries. Returns true if the key had signed before.
    pub fn sign(&mut self, key: &SecretKey) -> bool {
        let sig = KeySig {
            key: key.public(),
            sig: SigBytes(key.sign(&self.signed.signed_bytes())),
        };
        match self.signatures.iter_mut().find(|s| s.key == sig.key) {
            Some(old) => {
                *old = sig;
                true
            }
            None => {
                self.signatures.push(sig);
                false
            }
        }
    }

    /// Count this root's signatures against a key set and threshold.
    pub fn tally(&self, keys: &[PublicKey], threshold: u32) -> Tally {
        tally(
            keys,
            threshold,
            &self.signed.signed_bytes(),
            &self.signatures,
        )
    }
}

/// Why a signature counts or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SigStatus {
    Counted,
    /// The key is not in the key set being counted.
    UnknownKey,
    /// The signature does not verify for its key (or is high-S).
    BadSignature,
    /// Valid, but this key was already counted.
    DuplicateKey,
}

impl SigStatus {
    pub fn code(self) -> &'static str {
        match self {
            SigStatus::Counted => "counted",
            SigStatus::UnknownKey => "unknown_key",
            SigStatus::BadSignature => "bad_signature",
            SigStatus::DuplicateKey => "duplicate_key",
        }
    }
}

/// The result of counting signatures against one key set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// One entry per signature, in order.
    pub statuses: Vec<(PublicKey, SigStatus)>,
    /// Distinct keys whose signature counted.
    pub counted: usize,
    pub threshold: u32,
}

impl Tally {
    pub fn met(&self) -> bool {
        self.counted >= self.threshold as usize
    }
}

/// Count `sigs` over `msg` against `keys`: each distinct key of the set with a valid
/// signature counts once. A bad signature by a key does not stop a later good one by the
/// same key from counting.
pub fn tally(keys: &[PublicKey], threshold: u32, msg: &[u8], sigs: &[KeySig]) -> Tally {
    let mut counted = BTreeSet::new();
    let statuses = sigs
        .iter()
        .map(|s| {
            let status = if !keys.contains(&s.key) {
                SigStatus::UnknownKey
            } else if s.key.verify(msg, &s.sig.0).is_err() {
                SigStatus::BadSignature
            } else if !counted.insert(s.key) {
                SigStatus::DuplicateKey
            } else {
                SigStatus::Counted
            };
            (s.key, status)
        })
        .collect();
    Tally {
        statuses,
        counted: counted.len(),
        threshold,
    }
}

/// A root this node trusts. Only [`TrustedRoot::anchor`] and [`TrustedRoot::rotate`]
/// make one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedRoot {
    signed: SignedRoot,
}

impl TrustedRoot {
    /// Trust the root shipped in the image, if k of its own keys signed it.
    pub fn anchor(root: &SignedRoot) -> Result<Self, OtaError> {
        root.signed.check()?;
        let own = root.tally(&root.signed.keys, root.signed.threshold);
        if !own.met() {
            return Err(OtaError::RootThreshold {
                version: root.signed.version,
                by: "its own",
                counted: own.counted,
                threshold: own.threshold,
            });
        }
        Ok(Self {
            signed: root.clone(),
        })
    }

    /// Both counts for a candidate next root: (by this root's keys, by its own keys).
    pub fn rotation_tallies(&self, next: &SignedRoot) -> (Tally, Tally) {
        let old = next.tally(&self.signed.signed.keys, self.signed.signed.threshold);
        let new = next.tally(&next.signed.keys, next.signed.threshold);
        (old, new)
    }

    /// Trust `next` if it is exactly the next version and signed by k of this root's keys
    /// and k of its own.
    pub fn rotate(&self, next: &SignedRoot) -> Result<Self, OtaError> {
        next.signed.check()?;
        let trusted = self.version();
        if trusted.checked_add(1) != Some(next.signed.version) {
            return Err(OtaError::RootVersion {
                trusted,
                got: next.signed.version,
            });
        }
        let (old, new) = self.rotation_tallies(next);
        for (by, t) in [("the previous root's", old), ("its own", new)] {
            if !t.met() {
                return Err(OtaError::RootThreshold {
                    version: next.signed.version,
                    by,
                    counted: t.counted,
                    threshold: t.threshold,
                });
            }
        }
        Ok(Self {
            signed: next.clone(),
        })
    }

    /// Apply `chain` in order, one version at a time; the first failure stops the walk and
    /// nothing of it is trusted (the caller keeps `self`).
    pub fn walk(&self, chain: &[SignedRoot]) -> Result<Self, OtaError> {
        let mut head = self.clone();
        for next in chain {
            head = head.rotate(next)?;
        }
        Ok(head)
    }

    pub fn root(&self) -> &Root {
        &self.signed.signed
    }

    pub fn signed_root(&self) -> &SignedRoot {
        &self.signed
    }

    pub fn version(&self) -> u64 {
        self.signed.signed.version
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.signed.signed.keys
    }

    pub fn threshold(&self) -> u32 {
        self.signed.signed.threshold
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic maintainer keys: scalar = i + 1.
    pub(crate) fn key(i: u8) -> SecretKey {
        let mut scalar = [0u8; 32];
        scalar[31] = i + 1;
        scalar[0] = 0x42;
        SecretKey::from_scalar_bytes(&scalar).expect("small scalars are valid")
    }

    pub(crate) fn signed_by(root: Root, signers: &[u8]) -> SignedRoot {
        let mut s = SignedRoot::unsigned(root);
        for &i in signers {
            s.sign(&key(i));
        }
        s
    }

    fn pubs(ids: &[u8]) -> Vec<PublicKey> {
        ids.iter().map(|&i| key(i).public()).collect()
    }

    pub(crate) fn root_v1() -> TrustedRoot {
        let root = Root::new(1, pubs(&[0, 1, 2]), 2).unwrap();
        TrustedRoot::anchor(&signed_by(root, &[0, 1])).unwrap()
    }

    #[test]
    fn anchor_needs_k_of_its_own_keys() {
        let root = Root::new(1, pubs(&[0, 1, 2]), 2).unwrap();
        let one = signed_by(root.clone(), &[0]);
        let err = TrustedRoot::anchor(&one).unwrap_err();
        assert_eq!(err.code(), "root_threshold");
        assert!(err.to_string().contains("1 of 2"), "{err}");
        // A signature by an outsider does not help.
        let mut outsider = one.clone();
        outsider.sign(&key(9));
        assert!(TrustedRoot::anchor(&outsider).is_err());
        assert!(TrustedRoot::anchor(&signed_by(root, &[0, 2])).is_ok());
    }

    #[test]
    fn a_duplicate_signature_by_one_key_counts_once() {
        let root = Root::new(1, pubs(&[0, 1, 2]), 2).unwrap();
        let mut s = signed_by(root, &[0]);
        // sign() would replace; push a second copy by hand, as an attacker would.
        let copy = s.signatures[0].clone();
        s.signatures.push(copy.clone());
        s.signatures.push(copy);
        let t = s.tally(&s.signed.keys.clone(), 2);
        assert_eq!(t.counted, 1);
        assert_eq!(
            t.statuses.iter().map(|x| x.1).collect::<Vec<_>>(),
            [
                SigStatus::Counted,
                SigStatus::DuplicateKey,
                SigStatus::DuplicateKey
            ]
        );
        assert!(TrustedRoot::anchor(&s).is_err());
    }

    #[test]
    fn signing_twice_replaces_and_bad_signatures_do_not_count() {
        let root = Root::new(1, pubs(&[0, 1]), 2).unwrap();
        let mut s = signed_by(root, &[0]);
        assert!(s.sign(&key(0)));
        assert_eq!(s.signatures.len(), 1);
        // A forged signature for key 1 (key 0's bytes) is a bad signature.
        s.signatures.push(KeySig {
            key: key(1).public(),
            sig: s.signatures[0].sig,
        });
        let t = s.tally(&s.signed.keys.clone(), 2);
        assert_eq!(t.statuses[1].1, SigStatus::BadSignature);
        assert_eq!(t.counted, 1);
        // Signed bytes change with any field, so a signature does not carry over.
        let mut other = s.clone();
        other.signed.threshold = 1;
        assert_eq!(other.tally(&other.signed.keys.clone(), 1).counted, 0);
    }

    #[test]
    fn rotation_needs_both_thresholds() {
        let v1 = root_v1();
        // v2 replaces key 2 by keys 3, 4 and asks 3 of 4.
        let v2 = Root::new(2, pubs(&[0, 1, 3, 4]), 3).unwrap();
        // Old threshold only (keys 0, 1 are also new keys: 2 of 3 new): refused.
        let only_old = signed_by(v2.clone(), &[0, 1]);
        let err = v1.rotate(&only_old).unwrap_err();
        assert_eq!(err.code(), "root_threshold");
        assert!(err.to_string().contains("its own"), "{err}");
        // New threshold only (3, 4 and 0: 3 of 4 new, 1 of 2 old): refused.
        let only_new = signed_by(v2.clone(), &[3, 4, 0]);
        let err = v1.rotate(&only_new).unwrap_err();
        assert!(err.to_string().contains("previous root"), "{err}");
        // Both: accepted.
        let both = signed_by(v2, &[0, 1, 3]);
        let v2t = v1.rotate(&both).unwrap();
        assert_eq!(v2t.version(), 2);
        assert_eq!(v2t.threshold(), 3);
    }

    #[test]
    fn the_chain_is_walked_in_order_without_skips_or_repeats() {
        let v1 = root_v1();
        let v2 = signed_by(Root::new(2, pubs(&[0, 1, 2]), 2).unwrap(), &[0, 1]);
        let v3 = signed_by(Root::new(3, pubs(&[1, 2, 3]), 2).unwrap(), &[1, 2]);
        assert_eq!(v1.walk(&[v2.clone(), v3.clone()]).unwrap().version(), 3);
        // Skipping v2: refused even though v3 carries k of v1's keys too.
        let err = v1.walk(std::slice::from_ref(&v3)).unwrap_err();
        assert_eq!(err, OtaError::RootVersion { trusted: 1, got: 3 });
        // Out of order, repeated, or going back: refused.
        assert!(v1.walk(&[v3.clone(), v2.clone()]).is_err());
        assert!(v1.walk(&[v2.clone(), v2.clone()]).is_err());
        let v2t = v1.rotate(&v2).unwrap();
        let v1_again = v2t.root().clone();
        let mut back = signed_by(Root::new(1, v1_again.keys, 2).unwrap(), &[0, 1]);
        back.signed.version = 1;
        assert_eq!(v2t.rotate(&back).unwrap_err().code(), "root_version");
    }

    #[test]
    fn decode_refuses_bad_roots() {
        let good = signed_by(Root::new(1, pubs(&[0, 1, 2]), 2).unwrap(), &[0, 1]);
        let bytes = good.encode();
        assert_eq!(SignedRoot::decode(&bytes).unwrap(), good);
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            f(&mut v);
            SignedRoot::decode(&serde_json::to_vec(&v).unwrap())
        };
        let e = edit(&|v| v["signed"]["threshold"] = 4.into()).unwrap_err();
        assert_eq!(e.code(), "bad_threshold");
        let e = edit(&|v| v["signed"]["threshold"] = 0.into()).unwrap_err();
        assert_eq!(e.code(), "bad_threshold");
        let e = edit(&|v| v["signed"]["type"] = "borg.ota.release".into()).unwrap_err();
        assert_eq!(e.code(), "malformed");
        let e = edit(&|v| v["signed"]["extra"] = 1.into()).unwrap_err();
        assert_eq!(e.code(), "malformed");
        let k0 = key(0).public().to_b64();
        let e = edit(&|v| v["signed"]["keys"][1] = k0.clone().into()).unwrap_err();
        assert_eq!(e.code(), "duplicate");
        // Bounds: keys and signatures.
        let many: Vec<PublicKey> = (0..=MAX_ROOT_KEYS as u8).map(|i| key(i).public()).collect();
        let e = edit(&|v| v["signed"]["keys"] = serde_json::to_value(&many).unwrap()).unwrap_err();
        assert_eq!(e.code(), "over_bound");
        assert!(e.to_string().contains("root keys"), "{e}");
        let sig = serde_json::to_value(&good.signatures[0]).unwrap();
        let sigs = vec![sig; MAX_SIGNATURES + 1];
        let e = edit(&|v| v["signatures"] = sigs.clone().into()).unwrap_err();
        assert_eq!(e.code(), "over_bound");
        assert_eq!(
            SignedRoot::decode(&vec![b' '; MAX_DOC_BYTES + 1])
                .unwrap_err()
                .code(),
            "too_large"
        );
    }
}
