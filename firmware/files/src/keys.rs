//! The user's two keys, per-file keys, and the wrap of a file key for its owner.
//!
//! A user's phrase (+ passphrase) gives a BIP39 seed; SLIP-0010 P-256 derivation gives the
//! signing key at m/0' ([`borg_proto::mnemonic::user_key`]) and the encryption key at m/1'
//! (DESIGN.md section 3). The signing key signs manifests and deletes; the encryption key
//! only ever receives wrapped file keys.
//!
//! ## Key wrap (ECIES-style, one ephemeral key per wrap)
//!
//! ```text
//! e      = fresh random P-256 scalar,  E = e*G (33-byte compressed)
//! z      = x-coordinate of e*O          (O = the owner's m/1' public key, 33-byte compressed)
//! kek    = HKDF-SHA256(salt = "borgios/file-key-wrap", ikm = z,
//!                      info = "borgios file key wrap v1" || E || O), 32 bytes
//! ct     = ChaCha20-Poly1305(kek, nonce = 0^12, aad = "borgios file key wrap v1", file_key)
//! wrapped = {eph: E, ct}                 (ct is 32 + 16 = 48 bytes)
//! ```
//!
//! The all-zero nonce is safe because each `kek` encrypts exactly one message: `e` is fresh
//! for every wrap. Binding `E` and `O` into the HKDF info means a wrapped key opens only for
//! the recipient it was made for, and that the ephemeral point cannot be swapped.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::mnemonic::{self, MnemonicError};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use zeroize::Zeroize;

use crate::FilesError;

/// Derivation path of the user's encryption key.
pub const ENCRYPTION_KEY_PATH: &str = "m/1'";
/// Bytes of a file key.
pub const FILE_KEY_LEN: usize = 32;
/// Bytes of a wrapped file key's ciphertext: the key and a Poly1305 tag.
pub const WRAPPED_CT_LEN: usize = FILE_KEY_LEN + 16;
/// Version label of the wrap, in the HKDF info and the AEAD associated data.
const WRAP_LABEL: &[u8] = b"borgios file key wrap v1";
/// HKDF salt of the wrap (a fixed domain separator; the randomness is in `e`).
const WRAP_SALT: &[u8] = b"borgios/file-key-wrap";

/// A user's keys, derived from their recovery phrase. `Debug` shows the public keys only.
#[derive(Clone)]
pub struct UserKeys {
    signing: SecretKey,
    encryption: SecretKey,
}

impl fmt::Debug for UserKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UserKeys(signing={}, encryption={})",
            self.signing.public().short(),
            self.encryption.public().short()
        )
    }
}

impl UserKeys {
    /// The keys of `phrase` + `passphrase`: the signing key at m/0' (the same key as
    /// [`mnemonic::user_key`]) and the encryption key at m/1'.
    pub fn from_phrase(phrase: &str, passphrase: &str) -> Result<UserKeys, MnemonicError> {
        let phrase = mnemonic::parse_phrase(phrase)?;
        let mut seed = mnemonic::seed(&phrase, passphrase);
        let keys = UserKeys::from_seed(&seed);
        seed.zeroize();
        keys
    }

    /// The keys of a BIP39 seed (16 to 64 bytes).
    pub fn from_seed(seed: &[u8]) -> Result<UserKeys, MnemonicError> {
        let (signing, _) = mnemonic::derive_p256(seed, mnemonic::USER_KEY_PATH)?;
        let (encryption, _) = mnemonic::derive_p256(seed, ENCRYPTION_KEY_PATH)?;
        Ok(UserKeys {
            signing,
            encryption,
        })
    }

    /// From two existing keys (tests, or keys kept elsewhere).
    pub fn from_keys(signing: SecretKey, encryption: SecretKey) -> UserKeys {
        UserKeys {
            signing,
            encryption,
        }
    }

    /// The m/0' key: signs manifests and deletes. Its public key is the owner's name.
    pub fn signing(&self) -> &SecretKey {
        &self.signing
    }

    /// The m/1' key: opens wrapped file keys.
    pub fn encryption(&self) -> &SecretKey {
        &self.encryption
    }

    /// The owner's name: the m/0' public key.
    pub fn owner(&self) -> PublicKey {
        self.signing.public()
    }

    /// The m/1' public key, to which file keys are wrapped.
    pub fn encryption_public(&self) -> PublicKey {
        self.encryption.public()
    }
}

/// A per-file ChaCha20-Poly1305 key. Zeroed when dropped; `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct FileKey([u8; FILE_KEY_LEN]);

impl FileKey {
    /// A fresh random key.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> FileKey {
        let mut key = [0u8; FILE_KEY_LEN];
        rng.fill_bytes(&mut key);
        FileKey(key)
    }

    pub fn from_bytes(bytes: [u8; FILE_KEY_LEN]) -> FileKey {
        FileKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; FILE_KEY_LEN] {
        &self.0
    }
}

impl Drop for FileKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileKey(redacted)")
    }
}

/// A file key wrapped for one recipient. The text form is
/// `{"eph":"<base64url 33-byte point>","ct":"<base64url 48 bytes>"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The ephemeral public key `E`.
    pub eph: PublicKey,
    /// The encrypted file key and its tag.
    pub ct: [u8; WRAPPED_CT_LEN],
}

/// Wrap `file_key` for the holder of the private key of `recipient` (the owner's m/1' key).
pub fn wrap_key<R: RngCore + CryptoRng>(
    rng: &mut R,
    file_key: &FileKey,
    recipient: &PublicKey,
) -> Result<WrappedKey, FilesError> {
    let recipient_point = to_p256(recipient)?;
    let eph_secret = p256::NonZeroScalar::random(rng);
    let eph_point = p256::PublicKey::from_secret_scalar(&eph_secret);
    let eph = PublicKey::from_sec1(eph_point.to_encoded_point(true).as_bytes())
        .map_err(|_| FilesError::Malformed("ephemeral point".into()))?;
    let shared = p256::ecdh::diffie_hellman(eph_secret, recipient_point.as_affine());
    let aead = kek(shared.raw_secret_bytes(), &eph, recipient);
    let ct = aead
        .encrypt(
            &[0u8; 12].into(),
            Payload {
                msg: file_key.as_bytes(),
                aad: WRAP_LABEL,
            },
        )
        .map_err(|_| FilesError::Malformed("key wrap failed".into()))?;
    let ct: [u8; WRAPPED_CT_LEN] = ct
        .try_into()
        .map_err(|_| FilesError::Malformed("key wrap length".into()))?;
    Ok(WrappedKey { eph, ct })
}

/// Open a wrapped key with the recipient's private key; [`FilesError::WrongKey`] if it was
/// wrapped for somebody else or altered.
pub fn unwrap_key(wrapped: &WrappedKey, recipient: &SecretKey) -> Result<FileKey, FilesError> {
    let eph_point = to_p256(&wrapped.eph)?;
    let shared = p256::ecdh::diffie_hellman(
        recipient.signing_key().as_nonzero_scalar(),
        eph_point.as_affine(),
    );
    let aead = kek(shared.raw_secret_bytes(), &wrapped.eph, &recipient.public());
    let mut plain = aead
        .decrypt(
            &[0u8; 12].into(),
            Payload {
                msg: &wrapped.ct,
                aad: WRAP_LABEL,
            },
        )
        .map_err(|_| FilesError::WrongKey)?;
    let mut key = [0u8; FILE_KEY_LEN];
    if plain.len() != FILE_KEY_LEN {
        plain.zeroize();
        return Err(FilesError::WrongKey);
    }
    key.copy_from_slice(&plain);
    plain.zeroize();
    Ok(FileKey(key))
}

/// The key-encryption cipher for the shared secret `z` between `eph` and `recipient`.
fn kek(z: &[u8], eph: &PublicKey, recipient: &PublicKey) -> ChaCha20Poly1305 {
    let hk = Hkdf::<Sha256>::new(Some(WRAP_SALT), z);
    let mut okm = [0u8; 32];
    let mut info = Vec::with_capacity(WRAP_LABEL.len() + 66);
    info.extend_from_slice(WRAP_LABEL);
    info.extend_from_slice(eph.as_bytes());
    info.extend_from_slice(recipient.as_bytes());
    // Invariant: 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
    hk.expand(&info, &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    let aead = ChaCha20Poly1305::new(&okm.into());
    okm.zeroize();
    aead
}

fn to_p256(key: &PublicKey) -> Result<p256::PublicKey, FilesError> {
    // PublicKey is only ever built from a checked point, so this fails only if that changes.
    p256::PublicKey::from_sec1_bytes(key.as_bytes())
        .map_err(|_| FilesError::Malformed("public key is not a P-256 point".into()))
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WrappedKeyWire {
    eph: PublicKey,
    ct: String,
}

impl Serialize for WrappedKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WrappedKeyWire {
            eph: self.eph,
            ct: URL_SAFE_NO_PAD.encode(self.ct),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for WrappedKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = WrappedKeyWire::deserialize(d)?;
        let ct = crate::manifest::decode_b64::<WRAPPED_CT_LEN>(&wire.ct, "key.ct")
            .map_err(serde::de::Error::custom)?;
        Ok(WrappedKey { eph: wire.eph, ct })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const PHRASE: &str = "abandon abandon abandon abandon abandon abandon abandon abandon \
                          abandon abandon abandon abandon abandon abandon abandon abandon \
                          abandon abandon abandon abandon abandon abandon abandon art";

    #[test]
    fn user_keys_m0_is_the_user_key_and_m1_differs_deterministically() {
        let a = UserKeys::from_phrase(PHRASE, "").unwrap();
        let b = UserKeys::from_phrase(PHRASE, "").unwrap();
        assert_eq!(a.owner(), mnemonic::user_key(PHRASE, "").unwrap().public());
        assert_ne!(a.owner(), a.encryption_public());
        assert_eq!(a.encryption_public(), b.encryption_public());
        assert_eq!(a.encryption().scalar_bytes(), b.encryption().scalar_bytes());
        // The passphrase changes both keys.
        let c = UserKeys::from_phrase(PHRASE, "TREZOR").unwrap();
        assert_ne!(c.owner(), a.owner());
        assert_ne!(c.encryption_public(), a.encryption_public());
        assert!(UserKeys::from_phrase("abandon", "").is_err());
    }

    #[test]
    fn wrap_round_trip_and_other_recipient_fails() {
        let mut rng = StdRng::seed_from_u64(1);
        let owner = UserKeys::from_phrase(PHRASE, "").unwrap();
        let other = UserKeys::from_phrase(PHRASE, "other").unwrap();
        let key = FileKey::generate(&mut rng);
        let wrapped = wrap_key(&mut rng, &key, &owner.encryption_public()).unwrap();
        assert_eq!(unwrap_key(&wrapped, owner.encryption()).unwrap(), key);
        // Another user, and the owner's own signing key, cannot open it.
        assert_eq!(
            unwrap_key(&wrapped, other.encryption()),
            Err(FilesError::WrongKey)
        );
        assert_eq!(
            unwrap_key(&wrapped, owner.signing()),
            Err(FilesError::WrongKey)
        );
        // Two wraps of the same key differ (fresh ephemeral key each time).
        let again = wrap_key(&mut rng, &key, &owner.encryption_public()).unwrap();
        assert_ne!(again, wrapped);
        assert_eq!(unwrap_key(&again, owner.encryption()).unwrap(), key);
    }

    #[test]
    fn altered_wrap_fails() {
        let mut rng = StdRng::seed_from_u64(2);
        let owner = UserKeys::from_phrase(PHRASE, "").unwrap();
        let key = FileKey::generate(&mut rng);
        let wrapped = wrap_key(&mut rng, &key, &owner.encryption_public()).unwrap();
        for bit in 0..WRAPPED_CT_LEN * 8 {
            let mut bad = wrapped.clone();
            bad.ct[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                unwrap_key(&bad, owner.encryption()),
                Err(FilesError::WrongKey)
            );
        }
        // Swapping the ephemeral point for another valid one fails too.
        let other = wrap_key(&mut rng, &key, &owner.encryption_public()).unwrap();
        let swapped = WrappedKey {
            eph: other.eph,
            ..wrapped.clone()
        };
        assert_eq!(
            unwrap_key(&swapped, owner.encryption()),
            Err(FilesError::WrongKey)
        );
    }

    #[test]
    fn wrapped_key_text_form_round_trips_and_is_strict() {
        let mut rng = StdRng::seed_from_u64(3);
        let owner = UserKeys::from_phrase(PHRASE, "").unwrap();
        let key = FileKey::generate(&mut rng);
        let wrapped = wrap_key(&mut rng, &key, &owner.encryption_public()).unwrap();
        let json = serde_json::to_value(&wrapped).unwrap();
        assert_eq!(json["ct"].as_str().unwrap().len(), 64);
        let back: WrappedKey = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, wrapped);
        let mut extra = json.clone();
        extra["x"] = 1.into();
        assert!(serde_json::from_value::<WrappedKey>(extra).is_err());
        let mut short = json;
        short["ct"] = "AAAA".into();
        assert!(serde_json::from_value::<WrappedKey>(short).is_err());
    }

    #[test]
    fn file_key_debug_is_redacted() {
        assert_eq!(
            format!("{:?}", FileKey::from_bytes([7; 32])),
            "FileKey(redacted)"
        );
    }
}
