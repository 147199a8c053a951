//! Node and user identities: P-256 keys and their text form.
//!
//! A public key is written as base64url (no padding) of its 33-byte compressed SEC1 encoding;
//! that string is the node's name everywhere (envelopes, tree state, status output).
//! Signatures are 64-byte r||s ECDSA P-256/SHA-256, always low-S.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of a compressed SEC1 P-256 point.
pub const PUBLIC_KEY_LEN: usize = 33;
/// Length of an r||s signature.
pub const SIGNATURE_LEN: usize = 64;

/// Errors from parsing keys and signatures or from key files.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("not valid base64url: {0}")]
    Base64(String),
    #[error("public key must be a 33-byte compressed SEC1 point")]
    BadPublicKey,
    #[error("signature must be 64 bytes r||s")]
    BadSignatureEncoding,
    #[error("signature has a high S value")]
    HighS,
    #[error("signature does not verify")]
    BadSignature,
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
}

/// A P-256 public key in compressed form. Ordering is bytewise, used for deterministic
/// tie-breaks (e.g. which of two equal trees merges into the other).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    /// Parse the 33-byte compressed encoding; rejects points not on the curve.
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, IdentityError> {
        if bytes.len() != PUBLIC_KEY_LEN || !(bytes[0] == 2 || bytes[0] == 3) {
            return Err(IdentityError::BadPublicKey);
        }
        VerifyingKey::from_sec1_bytes(bytes).map_err(|_| IdentityError::BadPublicKey)?;
        let mut out = [0u8; PUBLIC_KEY_LEN];
        out.copy_from_slice(bytes);
        Ok(Self(out))
    }

    pub fn from_verifying_key(key: &VerifyingKey) -> Self {
        let point = key.to_encoded_point(true);
        let mut out = [0u8; PUBLIC_KEY_LEN];
        out.copy_from_slice(point.as_bytes());
        Self(out)
    }

    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }

    /// base64url without padding of the compressed point.
    pub fn to_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn from_b64(text: &str) -> Result<Self, IdentityError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|e| IdentityError::Base64(e.to_string()))?;
        Self::from_sec1(&bytes)
    }

    fn verifying_key(&self) -> Result<VerifyingKey, IdentityError> {
        VerifyingKey::from_sec1_bytes(&self.0).map_err(|_| IdentityError::BadPublicKey)
    }

    /// Verify a 64-byte r||s low-S signature over `msg` (SHA-256 inside ECDSA).
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), IdentityError> {
        let sig = Signature::from_slice(sig).map_err(|_| IdentityError::BadSignatureEncoding)?;
        if sig.normalize_s().is_some() {
            return Err(IdentityError::HighS);
        }
        self.verifying_key()?
            .verify(msg, &sig)
            .map_err(|_| IdentityError::BadSignature)
    }

    /// A short form for logs and drawings: the first 8 characters of the text form.
    pub fn short(&self) -> String {
        self.to_b64().chars().take(8).collect()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_b64())
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_b64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::from_b64(&text).map_err(serde::de::Error::custom)
    }
}

/// A private signing key (node or user). Never serialized except to its own key file.
#[derive(Clone)]
pub struct SecretKey {
    signing: SigningKey,
    public: PublicKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public={})", self.public.short())
    }
}

impl SecretKey {
    pub fn generate() -> Self {
        Self::from_signing_key(SigningKey::random(&mut rand_core::OsRng))
    }

    pub fn from_signing_key(signing: SigningKey) -> Self {
        let public = PublicKey::from_verifying_key(signing.verifying_key());
        Self { signing, public }
    }

    /// From a 32-byte big-endian scalar; fails for zero or values >= the group order.
    pub fn from_scalar_bytes(bytes: &[u8; 32]) -> Option<Self> {
        SigningKey::from_slice(bytes)
            .ok()
            .map(Self::from_signing_key)
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The 32-byte scalar (for key files and certificate generation only).
    pub fn scalar_bytes(&self) -> [u8; 32] {
        self.signing.to_bytes().into()
    }

    /// Sign `msg` with ECDSA P-256/SHA-256; the result is always low-S.
    pub fn sign(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        let sig: Signature = self.signing.sign(msg);
        let sig = sig.normalize_s().unwrap_or(sig);
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(&sig.to_bytes());
        out
    }

    /// Load the node key from `dir/node.key`, creating it (mode 0600) on first start.
    /// A present but unreadable or corrupt file is an error: the identity is never silently
    /// replaced, because peers know the node by this key.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let path = dir.join(NODE_KEY_FILE);
        match fs::read(&path) {
            Ok(bytes) => Self::parse_key_file(&path, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                key.write_key_file(&path)?;
                Ok(key)
            }
            Err(e) => Err(IdentityError::KeyFile {
                path,
                reason: e.to_string(),
            }),
        }
    }

    fn parse_key_file(path: &Path, bytes: &[u8]) -> Result<Self, IdentityError> {
        let bad = |reason: &str| IdentityError::KeyFile {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?;
        let line = text
            .lines()
            .find(|l| l.starts_with(KEY_FILE_PREFIX))
            .ok_or_else(|| bad("no 'borg-node-key-v1:' line; the file is corrupt"))?;
        let scalar = URL_SAFE_NO_PAD
            .decode(line[KEY_FILE_PREFIX.len()..].trim())
            .map_err(|_| bad("key is not valid base64url; the file is corrupt"))?;
        let scalar: [u8; 32] = scalar
            .try_into()
            .map_err(|_| bad("key is not 32 bytes; the file is corrupt"))?;
        Self::from_scalar_bytes(&scalar).ok_or_else(|| bad("key is not a valid P-256 scalar"))
    }

    fn write_key_file(&self, path: &Path) -> Result<(), IdentityError> {
        let err = |e: std::io::Error| IdentityError::KeyFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(err)?;
        }
        // Write to a temporary file and rename, so a power cut never leaves a half key.
        let tmp = path.with_extension("key.tmp");
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(&tmp).map_err(err)?;
        let body = format!(
            "# BorgIOS node key. Never share this file.\n{KEY_FILE_PREFIX}{}\n",
            URL_SAFE_NO_PAD.encode(self.scalar_bytes())
        );
        file.write_all(body.as_bytes()).map_err(err)?;
        file.sync_all().map_err(err)?;
        fs::rename(&tmp, path).map_err(err)?;
        if let Some(parent) = path.parent() {
            if let Ok(d) = fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// File name of the node key inside the data dir.
pub const NODE_KEY_FILE: &str = "node.key";
const KEY_FILE_PREFIX: &str = "borg-node-key-v1:";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_round_trip_and_text_form() {
        let key = SecretKey::generate();
        let sig = key.sign(b"hello");
        key.public().verify(b"hello", &sig).unwrap();
        assert!(key.public().verify(b"hellO", &sig).is_err());
        let text = key.public().to_b64();
        assert_eq!(text.len(), 44);
        assert_eq!(PublicKey::from_b64(&text).unwrap(), key.public());
    }

    #[test]
    fn high_s_is_rejected() {
        let key = SecretKey::generate();
        let sig = key.sign(b"m");
        let parsed = Signature::from_slice(&sig).unwrap();
        // s' = n - s verifies mathematically but is the high-S twin.
        let (r, s) = (parsed.r(), parsed.s());
        let high = Signature::from_scalars(r.to_bytes(), (-*s).to_bytes()).unwrap();
        let err = key.public().verify(b"m", &high.to_bytes()).unwrap_err();
        assert!(matches!(err, IdentityError::HighS));
    }

    #[test]
    fn key_file_created_0600_reloaded_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecretKey::load_or_create(dir.path()).unwrap();
        let b = SecretKey::load_or_create(dir.path()).unwrap();
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(NODE_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        fs::write(dir.path().join(NODE_KEY_FILE), "garbage").unwrap();
        let err = SecretKey::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        // The corrupt file is left in place for the operator, not replaced.
        assert_eq!(
            fs::read_to_string(dir.path().join(NODE_KEY_FILE)).unwrap(),
            "garbage"
        );
    }
}
