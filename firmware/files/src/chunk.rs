//! Chunked authenticated encryption of a file: one chunk is one shard.
//!
//! The construction is STREAM (Hoang, Reyhanitabar, Rogaway, Vizár 2015), as age uses it,
//! over ChaCha20-Poly1305 with a random per-file key:
//!
//! ```text
//! nonce(i, last) = i as 11-byte big-endian || (0x01 if last else 0x00)      (12 bytes)
//! aad            = "borgios file chunk v1" || salt                            (21 + 16 bytes)
//! shard_i        = ChaCha20-Poly1305(file_key, nonce(i, i == n-1), aad, plain_i)
//! ```
//!
//! Every plaintext chunk is [`CHUNK`] bytes except the last, which is 0..=[`CHUNK`] bytes
//! (an empty file is one empty last chunk), so every shard is at most
//! [`borg_store::MAX_SHARD_BYTES`]. Because the position is in the nonce, a chunk moved to
//! another index fails; because only the final chunk is sealed with the last flag, dropping
//! chunks from the end (truncation) or appending after it fails; because the salt is in the
//! associated data, a chunk of another file fails even under the same key. Each chunk
//! opens on its own given its index, so readers can fetch shards in any order and uploads
//! can resume at any chunk.
//!
//! **Nonce reuse rule.** A (file key, index) pair must never encrypt two different
//! plaintexts: that would reveal their XOR and let the Poly1305 key be recovered. A resumed
//! upload therefore re-encrypts the chunks already sent and checks that they give the same
//! shard addresses ([`encrypt_reader`] with `done`), *before* sending anything new; a
//! difference means the file changed, and the upload must start over with a new key.

use std::io::{ErrorKind, Read, Write};

use borg_store::{Address, StoreError, MAX_SHARD_BYTES};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use sha2::{Digest, Sha256};

use crate::keys::FileKey;
use crate::manifest::{Manifest, ShardRef, MAX_SHARDS};
use crate::FilesError;

/// Bytes of a Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Plaintext bytes in every chunk but the last: a full chunk encrypts to exactly one
/// largest shard.
pub const CHUNK: usize = MAX_SHARD_BYTES - TAG_LEN;
/// Bytes of the per-file salt bound into every chunk.
pub const SALT_LEN: usize = 16;
/// Largest chunk index the 11-byte counter could hold is far beyond [`MAX_SHARDS`]; the
/// manifest bound is the one that applies.
const AAD_LABEL: &[u8] = b"borgios file chunk v1";

/// Encrypts and decrypts the chunks of one file. The cipher zeroizes its key on drop.
pub struct Encryptor {
    aead: ChaCha20Poly1305,
    aad: [u8; AAD_LABEL.len() + SALT_LEN],
}

impl Encryptor {
    pub fn new(key: &FileKey, salt: &[u8; SALT_LEN]) -> Encryptor {
        let mut aad = [0u8; AAD_LABEL.len() + SALT_LEN];
        aad[..AAD_LABEL.len()].copy_from_slice(AAD_LABEL);
        aad[AAD_LABEL.len()..].copy_from_slice(salt);
        Encryptor {
            aead: ChaCha20Poly1305::new(key.as_bytes().into()),
            aad,
        }
    }

    /// The shard bytes of chunk `index` (`plain.len() + 16` bytes). At most [`CHUNK`] bytes
    /// of plaintext, else [`FilesError::TooLarge`].
    pub fn encrypt_chunk(
        &self,
        index: u64,
        is_last: bool,
        plain: &[u8],
    ) -> Result<Vec<u8>, FilesError> {
        let mut buf = Vec::with_capacity(plain.len() + TAG_LEN);
        buf.extend_from_slice(plain);
        self.encrypt_in_place(index, is_last, &mut buf)?;
        Ok(buf)
    }

    /// [`Encryptor::encrypt_chunk`] in place: `buf` holds the plaintext and gets the tag
    /// appended (give it [`TAG_LEN`] spare capacity to avoid a reallocation).
    pub fn encrypt_in_place(
        &self,
        index: u64,
        is_last: bool,
        buf: &mut Vec<u8>,
    ) -> Result<(), FilesError> {
        if buf.len() > CHUNK {
            return Err(FilesError::TooLarge(format!(
                "a chunk holds at most {CHUNK} bytes, not {}",
                buf.len()
            )));
        }
        self.aead
            .encrypt_in_place(&nonce(index, is_last).into(), &self.aad, buf)
            // Only fails for messages longer than ChaCha20's 256 GiB, excluded above.
            .map_err(|_| FilesError::TooLarge("chunk".into()))
    }

    /// The plaintext of shard bytes `cipher` at `index`; [`FilesError::Corrupt`] if they are
    /// not exactly what this key and salt sealed at that index with that last flag.
    pub fn decrypt_chunk(
        &self,
        index: u64,
        is_last: bool,
        cipher: &[u8],
    ) -> Result<Vec<u8>, FilesError> {
        if cipher.len() < TAG_LEN || cipher.len() > MAX_SHARD_BYTES {
            return Err(FilesError::Corrupt { index });
        }
        let mut buf = cipher.to_vec();
        self.aead
            .decrypt_in_place(&nonce(index, is_last).into(), &self.aad, &mut buf)
            .map_err(|_| FilesError::Corrupt { index })?;
        Ok(buf)
    }
}

/// The STREAM nonce: 11-byte big-endian counter, then the last-chunk flag.
fn nonce(index: u64, is_last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(is_last);
    n
}

/// What [`encrypt_reader`] produced: the facts a manifest records about the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encrypted {
    /// Plaintext bytes read.
    pub size: u64,
    /// SHA-256 of the plaintext.
    pub sha256: [u8; 32],
    /// The shards in order.
    pub shards: Vec<ShardRef>,
}

/// Encrypt everything `reader` yields, one [`CHUNK`] at a time (memory: one chunk buffer),
/// handing each shard to `sink(address, bytes)` in order, e.g. `|a, b| store.put_at(a, b)`.
///
/// `done` resumes an interrupted upload: the shards already sent, in order. Their chunks are
/// re-read and re-encrypted and must give the same addresses ([`FilesError::Changed`]
/// otherwise, before anything is handed to `sink`); they are not handed to `sink` again.
/// Pass `&[]` for a new upload. Files over [`crate::MAX_FILE_SIZE`] are refused with
/// [`FilesError::TooLarge`] once the limit is crossed.
pub fn encrypt_reader<R, S>(
    mut reader: R,
    key: &FileKey,
    salt: &[u8; SALT_LEN],
    done: &[ShardRef],
    mut sink: S,
) -> Result<Encrypted, FilesError>
where
    R: Read,
    S: FnMut(&Address, &[u8]) -> Result<(), StoreError>,
{
    let enc = Encryptor::new(key, salt);
    let mut hasher = Sha256::new();
    let mut shards = Vec::new();
    let mut size = 0u64;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + TAG_LEN);
    // A byte read ahead to learn whether a full chunk was the last one.
    let mut carry: Option<u8> = None;
    for index in 0u64.. {
        buf.clear();
        buf.extend(carry.take());
        let filled = fill(&mut reader, &mut buf, CHUNK)?;
        let is_last = filled < CHUNK || {
            let mut one = [0u8; 1];
            let got = read_retrying(&mut reader, &mut one)?;
            carry = (got == 1).then_some(one[0]);
            got == 0
        };
        if shards.len() >= MAX_SHARDS {
            return Err(FilesError::TooLarge(format!(
                "files are at most {} bytes",
                crate::MAX_FILE_SIZE
            )));
        }
        hasher.update(&buf);
        size += buf.len() as u64;
        enc.encrypt_in_place(index, is_last, &mut buf)?;
        let shard = ShardRef {
            addr: Address::of(&buf),
            len: buf.len() as u32,
        };
        match done.get(shards.len()) {
            Some(sent) if *sent != shard => return Err(FilesError::Changed { index }),
            Some(_) => {}
            None => sink(&shard.addr, &buf)?,
        }
        shards.push(shard);
        if is_last {
            break;
        }
    }
    if done.len() > shards.len() {
        return Err(FilesError::Changed {
            index: shards.len() as u64,
        });
    }
    Ok(Encrypted {
        size,
        sha256: hasher.finalize().into(),
        shards,
    })
}

/// Decrypt the file `manifest` describes into `out`, fetching shard `i` with
/// `fetch(i, &shard_ref)` (in order; fetch from any store or peer). Each shard must hash to
/// its address ([`FilesError::Mismatch`]) and open under the key ([`FilesError::Corrupt`]);
/// at the end the size and the plaintext SHA-256 must match the manifest.
///
/// Plaintext is written chunk by chunk as it is authenticated, so on an error `out` may hold
/// a prefix of the file: every chunk written was genuine, but the caller must discard a
/// partial result.
pub fn decrypt_to_writer<W, F>(
    manifest: &Manifest,
    key: &FileKey,
    mut fetch: F,
    mut out: W,
) -> Result<(), FilesError>
where
    W: Write,
    F: FnMut(usize, &ShardRef) -> Result<Vec<u8>, FilesError>,
{
    let enc = Encryptor::new(key, manifest.salt());
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let n = manifest.shards().len();
    for (i, shard) in manifest.shards().iter().enumerate() {
        let bytes = fetch(i, shard)?;
        if bytes.len() != shard.len as usize || !shard.addr.matches(&bytes) {
            return Err(FilesError::Mismatch(format!(
                "shard {i} is not the bytes of {}",
                shard.addr
            )));
        }
        let plain = enc.decrypt_chunk(i as u64, i + 1 == n, &bytes)?;
        hasher.update(&plain);
        size += plain.len() as u64;
        out.write_all(&plain)?;
    }
    if size != manifest.size() || <[u8; 32]>::from(hasher.finalize()) != *manifest.sha256() {
        return Err(FilesError::Mismatch(
            "plaintext size or SHA-256 differs from the manifest".into(),
        ));
    }
    Ok(())
}

/// Read until `buf` holds `want` bytes or the reader ends; returns `buf.len()`.
fn fill<R: Read>(reader: &mut R, buf: &mut Vec<u8>, want: usize) -> Result<usize, FilesError> {
    let mut filled = buf.len();
    buf.resize(want, 0);
    while filled < want {
        let got = read_retrying(reader, &mut buf[filled..])?;
        if got == 0 {
            break;
        }
        filled += got;
    }
    buf.truncate(filled);
    Ok(filled)
}

fn read_retrying<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, FilesError> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => return other.map_err(FilesError::from),
        }
    }
}
