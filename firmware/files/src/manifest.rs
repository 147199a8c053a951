//! The file manifest: what a file is made of, signed by its owner; and the file id.
//!
//! A manifest is the body of an envelope of kind [`MANIFEST_KIND`] signed by the owner's m/0'
//! key (DESIGN.md section 4):
//!
//! ```text
//! {"v":1, "name":"photo.jpg", "type":"image/jpeg", "size":300000,
//!  "sha256":"<64 hex, plaintext>", "created":1763765000123, "chunk":262128,
//!  "salt":"<base64url 16 bytes>",
//!  "shards":[{"addr":"<64 hex>","len":262144}, {"addr":"...","len":37888}],
//!  "key":{"eph":"<base64url 33-byte point>","ct":"<base64url 48 bytes>"}}
//! ```
//!
//! Decoding ([`open_manifest`]) checks every bound, so a [`Manifest`] value always describes
//! a well-formed file: `1 <= name <= 255` bytes of UTF-8 without `/`, NUL or control
//! characters and not `.` or `..`; `type` is `token/token` in at most 127 bytes; `chunk` is
//! [`CHUNK`]; there are exactly `max(1, ceil(size / CHUNK))` shards, every one `CHUNK + 16`
//! bytes except the last, which is the rest plus 16; at most [`MAX_SHARDS`] shards, so
//! `size <= MAX_FILE_SIZE`; `created` is at most 2^53 - 1 (exact in every JSON parser).
//!
//! ## Size limit
//! In the canonical JSON a shard entry `{"addr":"<64 hex>","len":262144},` is 89 bytes;
//! everything else in the envelope is under 2 KiB even with the longest name of quotes
//! (each escaped to 2 bytes). With the 1 MiB envelope limit that leaves room for 11,758
//! entries; [`MAX_SHARDS`] is 11,500 (a test builds the worst case and checks it fits), so a
//! file is at most 11,500 x 262,128 = 3,014,472,000 bytes (about 2.8 GiB).
//!
//! ## File id
//! [`FileId`] is the SHA-256 of the envelope's [`Envelope::signed_bytes`]: the RFC 8785
//! canonical bytes of everything the signature covers (version, kind, owner, ts, nonce, the
//! whole manifest), and nothing else. Those bytes cannot change without breaking the
//! signature, and because parsing normalizes and the canonical form is injective
//! (borg_proto::jcs), every wire encoding of the same signed envelope has the same id. The
//! `sig` is deliberately left out: ECDSA signatures are not unique (the owner can make many
//! valid ones for the same bytes), and the id should name what was signed, not one of its
//! signatures. Anyone can recompute it: `sha256(jcs(envelope without "sig"))`.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use borg_proto::envelope::{self, Envelope, Verified, MAX_ENVELOPE_BYTES};
use borg_proto::identity::{PublicKey, SecretKey};
use borg_store::Address;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::chunk::{Encrypted, CHUNK, SALT_LEN, TAG_LEN};
use crate::keys::WrappedKey;
use crate::FilesError;

/// Envelope kind of a manifest.
pub const MANIFEST_KIND: &str = "file.manifest";
/// The only manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
/// Longest file name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest media type, in bytes.
pub const MAX_MEDIA_TYPE_BYTES: usize = 127;
/// Most shards in one manifest (see the module docs for why this fits in an envelope).
pub const MAX_SHARDS: usize = 11_500;
/// Largest file: [`MAX_SHARDS`] full chunks, 3,014,472,000 bytes.
pub const MAX_FILE_SIZE: u64 = MAX_SHARDS as u64 * CHUNK as u64;
/// Largest `created` time: integers up to 2^53 - 1 are exact in every JSON implementation.
pub const MAX_CREATED_MS: u64 = (1 << 53) - 1;

/// One shard of a file: its address and length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRef {
    pub addr: Address,
    pub len: u32,
}

/// The id of a file: SHA-256 of its manifest envelope's signed bytes (see the module docs).
/// Text form: 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId([u8; 32]);

impl FileId {
    /// The id of a manifest envelope.
    pub fn of(envelope: &Envelope) -> FileId {
        FileId(Sha256::digest(envelope.signed_bytes()).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The same 64-hex form as a shard address.
        fmt::Display::fmt(&Address::from_bytes(self.0), f)
    }
}

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileId({self})")
    }
}

impl FromStr for FileId {
    type Err = FilesError;

    fn from_str(text: &str) -> Result<FileId, FilesError> {
        let addr =
            Address::from_str(text).map_err(|e| FilesError::Malformed(format!("file id: {e}")))?;
        Ok(FileId(*addr.as_bytes()))
    }
}

impl Serialize for FileId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FileId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        FileId::from_str(&text).map_err(serde::de::Error::custom)
    }
}

/// A checked manifest: every value of this type satisfies the rules in the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    name: String,
    media_type: String,
    size: u64,
    sha256: [u8; 32],
    created_ms: u64,
    salt: [u8; SALT_LEN],
    shards: Vec<ShardRef>,
    key: WrappedKey,
}

impl Manifest {
    /// A manifest for an encrypted file, checked against every rule.
    pub fn new(
        name: &str,
        media_type: &str,
        created_ms: u64,
        salt: [u8; SALT_LEN],
        encrypted: Encrypted,
        key: WrappedKey,
    ) -> Result<Manifest, FilesError> {
        let manifest = Manifest {
            name: name.to_string(),
            media_type: media_type.to_string(),
            size: encrypted.size,
            sha256: encrypted.sha256,
            created_ms,
            salt,
            shards: encrypted.shards,
            key,
        };
        manifest.check()?;
        Ok(manifest)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn media_type(&self) -> &str {
        &self.media_type
    }
    /// Plaintext bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// SHA-256 of the plaintext.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }
    pub fn created_ms(&self) -> u64 {
        self.created_ms
    }
    pub fn salt(&self) -> &[u8; SALT_LEN] {
        &self.salt
    }
    pub fn shards(&self) -> &[ShardRef] {
        &self.shards
    }
    /// The file key, wrapped for the owner's m/1' key.
    pub fn wrapped_key(&self) -> &WrappedKey {
        &self.key
    }

    fn check(&self) -> Result<(), FilesError> {
        check_name(&self.name)?;
        check_media_type(&self.media_type)?;
        if self.created_ms > MAX_CREATED_MS {
            return Err(malformed("\"created\" is beyond 2^53 - 1"));
        }
        if self.size > MAX_FILE_SIZE {
            return Err(FilesError::TooLarge(format!(
                "files are at most {MAX_FILE_SIZE} bytes, this one is {}",
                self.size
            )));
        }
        if self.shards.len() > MAX_SHARDS {
            return Err(FilesError::TooLarge(format!(
                "a manifest lists at most {MAX_SHARDS} shards"
            )));
        }
        let chunk = CHUNK as u64;
        let expected = self.size.div_ceil(chunk).max(1);
        if self.shards.len() as u64 != expected {
            return Err(malformed(format!(
                "{} bytes take {expected} shards, the manifest lists {}",
                self.size,
                self.shards.len()
            )));
        }
        let last_plain = self.size - (expected - 1) * chunk;
        for (i, shard) in self.shards.iter().enumerate() {
            let want = if i + 1 == self.shards.len() {
                last_plain + TAG_LEN as u64
            } else {
                chunk + TAG_LEN as u64
            };
            if u64::from(shard.len) != want {
                return Err(malformed(format!(
                    "shard {i} must be {want} bytes, the manifest says {}",
                    shard.len
                )));
            }
        }
        Ok(())
    }
}

fn malformed(message: impl Into<String>) -> FilesError {
    FilesError::Malformed(shorten(message.into()))
}

/// Cut an error message short: serde quotes attacker-chosen text (unknown field names,
/// strings of the wrong shape), which must not make a 1 MiB error.
pub(crate) fn shorten(mut text: String) -> String {
    const MAX: usize = 200;
    if let Some((end, _)) = text.char_indices().nth(MAX) {
        text.truncate(end);
        text.push_str("...");
    }
    text
}

fn check_name(name: &str) -> Result<(), FilesError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(malformed(format!(
            "a file name is 1 to {MAX_NAME_BYTES} bytes, not {}",
            name.len()
        )));
    }
    if name == "." || name == ".." {
        return Err(malformed("a file name is not \".\" or \"..\""));
    }
    if name.chars().any(|c| c == '/' || c.is_control()) {
        return Err(malformed(
            "a file name has no '/', NUL or other control characters",
        ));
    }
    Ok(())
}

/// `tchar` of RFC 9110 section 5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_media_type(media_type: &str) -> Result<(), FilesError> {
    let ok = media_type.len() <= MAX_MEDIA_TYPE_BYTES
        && match media_type.split_once('/') {
            Some((a, b)) => {
                !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(is_tchar)
            }
            None => false,
        };
    if !ok {
        return Err(malformed(format!(
            "a media type is type/subtype of RFC 9110 token characters, at most \
             {MAX_MEDIA_TYPE_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The wire form of the manifest body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestWire {
    v: u32,
    name: String,
    #[serde(rename = "type")]
    media_type: String,
    size: u64,
    sha256: String,
    created: u64,
    chunk: u64,
    salt: String,
    shards: Vec<ShardRef>,
    key: WrappedKey,
}

impl Manifest {
    fn to_wire(&self) -> ManifestWire {
        ManifestWire {
            v: MANIFEST_VERSION,
            name: self.name.clone(),
            media_type: self.media_type.clone(),
            size: self.size,
            sha256: Address::from_bytes(self.sha256).to_string(),
            created: self.created_ms,
            chunk: CHUNK as u64,
            salt: URL_SAFE_NO_PAD.encode(self.salt),
            shards: self.shards.clone(),
            key: self.key.clone(),
        }
    }

    fn from_wire(wire: ManifestWire) -> Result<Manifest, FilesError> {
        if wire.v != MANIFEST_VERSION {
            return Err(malformed(format!(
                "unsupported manifest version {}",
                wire.v
            )));
        }
        if wire.chunk != CHUNK as u64 {
            return Err(malformed(format!("\"chunk\" must be {CHUNK}")));
        }
        let sha256 =
            Address::from_str(&wire.sha256).map_err(|e| malformed(format!("\"sha256\": {e}")))?;
        let salt = decode_b64::<SALT_LEN>(&wire.salt, "salt")?;
        let manifest = Manifest {
            name: wire.name,
            media_type: wire.media_type,
            size: wire.size,
            sha256: *sha256.as_bytes(),
            created_ms: wire.created,
            salt,
            shards: wire.shards,
            key: wire.key,
        };
        manifest.check()?;
        Ok(manifest)
    }

    /// The manifest as the JSON body of its envelope.
    pub fn to_body(&self) -> serde_json::Value {
        // Invariant: the wire struct has only strings, integers, arrays and string-keyed
        // objects, which always serialize to a JSON value.
        serde_json::to_value(self.to_wire()).expect("a manifest always serializes to JSON")
    }

    /// Decode and check an envelope body (without its envelope).
    pub fn from_body(body: &serde_json::Value) -> Result<Manifest, FilesError> {
        let wire =
            ManifestWire::deserialize(body).map_err(|e| malformed(format!("manifest: {e}")))?;
        Manifest::from_wire(wire)
    }
}

/// Decode canonical unpadded base64url of exactly `N` bytes.
pub(crate) fn decode_b64<const N: usize>(text: &str, name: &str) -> Result<[u8; N], FilesError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|e| malformed(format!("{name:?} is not base64url without padding: {e}")))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| malformed(format!("{name:?} must be {N} bytes, not {}", b.len())))
}

/// Sign `manifest` as `owner` (the m/0' key) at time `ts`; returns the envelope and its id.
/// [`FilesError::TooLarge`] if the envelope would exceed the envelope limit (cannot happen
/// for a checked manifest; checked anyway).
pub fn seal_manifest<R: RngCore + CryptoRng>(
    rng: &mut R,
    owner: &SecretKey,
    manifest: &Manifest,
    ts: u64,
) -> Result<(FileId, Envelope), FilesError> {
    let envelope = envelope::seal_with_rng(rng, owner, MANIFEST_KIND, None, ts, manifest.to_body());
    if envelope.to_bytes().len() > MAX_ENVELOPE_BYTES {
        return Err(FilesError::TooLarge("manifest envelope over 1 MiB".into()));
    }
    Ok((FileId::of(&envelope), envelope))
}

/// A manifest whose envelope verified. Only [`open_manifest`] makes one.
#[derive(Debug, Clone)]
pub struct OpenedManifest {
    id: FileId,
    manifest: Manifest,
    envelope: Verified<Envelope>,
}

impl OpenedManifest {
    pub fn id(&self) -> FileId {
        self.id
    }
    /// The owner: the key that signed the manifest.
    pub fn owner(&self) -> PublicKey {
        self.envelope.from
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// The verified envelope, to store or forward as is.
    pub fn envelope(&self) -> &Verified<Envelope> {
        &self.envelope
    }
}

/// Verify and decode a stored or received manifest envelope: size (1 MiB), syntax and the
/// owner's signature (signature only: a stored manifest is old by nature, so no clock and
/// no replay cache), then the kind and every rule of the body.
pub fn open_manifest(bytes: &[u8]) -> Result<OpenedManifest, FilesError> {
    let envelope = envelope::verify_signature_only(bytes)?;
    if envelope.kind != MANIFEST_KIND {
        return Err(malformed(format!(
            "a manifest is of kind {MANIFEST_KIND:?}"
        )));
    }
    let manifest = Manifest::from_body(&envelope.body)?;
    Ok(OpenedManifest {
        id: FileId::of(&envelope),
        manifest,
        envelope,
    })
}
