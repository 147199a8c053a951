//! # borg-files: files of BorgIOS (ftreeFileMgr), sans-IO
//!
//! `put` of a file, in pieces a node's I/O layer strings together:
//!
//! 1. a random [`FileKey`] and 16-byte salt; [`encrypt_reader`] encrypts the plaintext one
//!    [`CHUNK`] at a time (ChaCha20-Poly1305 in the STREAM construction, [`chunk`]) into
//!    shards of at most 256 KiB, handing each to a sink (the shard store) with its address;
//! 2. [`wrap_key`] wraps the file key for the owner's encryption key (m/1', P-256 ECDH +
//!    HKDF-SHA256, [`keys`]);
//! 3. [`Manifest::new`] + [`seal_manifest`]: name, media type, size, plaintext SHA-256,
//!    created time, salt, shards in order and the wrapped key, signed by the owner's m/0' key
//!    as a `file.manifest` envelope. The [`FileId`] is the hash of its signed bytes.
//!
//! `get` is [`open_manifest`] (signature and every bound), [`unwrap_key`] with the owner's
//! m/1' key, then [`decrypt_to_writer`] (or [`Encryptor::decrypt_chunk`] per shard, in any
//! order). [`auth`] says who may store or delete a manifest: only its owner.
//!
//! Nothing here does I/O beyond the `Read`/`Write` handed in, reads a clock (times come in as
//! arguments) or draws randomness except from the RNG passed in.
//! docs/FILES-draft.md describes the format and what a holder of shards can learn.
#![forbid(unsafe_code)]

pub mod auth;
pub mod chunk;
mod error;
pub mod keys;
pub mod manifest;

pub use auth::{check_delete, check_store, delete_target, seal_delete, DELETE_KIND};
pub use chunk::{
    decrypt_to_writer, encrypt_reader, Encrypted, Encryptor, CHUNK, SALT_LEN, TAG_LEN,
};
pub use error::FilesError;
pub use keys::{unwrap_key, wrap_key, FileKey, UserKeys, WrappedKey, ENCRYPTION_KEY_PATH};
pub use manifest::{
    open_manifest, seal_manifest, FileId, Manifest, OpenedManifest, ShardRef, MANIFEST_KIND,
    MAX_CREATED_MS, MAX_FILE_SIZE, MAX_MEDIA_TYPE_BYTES, MAX_NAME_BYTES, MAX_SHARDS,
};
