//! Who may store and delete a manifest: only its owner.
//!
//! A manifest is stored under its owner's key ([`check_store`]): the envelope's signer must
//! be that key. A delete is an envelope of kind [`DELETE_KIND`] with body `{"id":"<file id>"}`
//! signed by the owner ([`check_delete`]). Shards carry no owner: anyone may cache them,
//! because they are ciphertext addressed by their hash.
//!
//! A delete is live input: open it with [`borg_proto::envelope::open`] (time window and replay
//! cache), not with `verify_signature_only`, so that a captured delete cannot be replayed
//! later against a re-stored manifest.

use borg_proto::envelope::{self, Envelope, Verified};
use borg_proto::identity::{PublicKey, SecretKey};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use crate::manifest::{open_manifest, FileId, OpenedManifest};
use crate::FilesError;

/// Envelope kind of a delete.
pub const DELETE_KIND: &str = "file.delete";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteBody {
    id: FileId,
}

/// Sign a delete of file `id` as `owner` (the m/0' key) at time `ts`.
pub fn seal_delete<R: RngCore + CryptoRng>(
    rng: &mut R,
    owner: &SecretKey,
    id: &FileId,
    ts: u64,
) -> Envelope {
    let body = serde_json::json!({ "id": id.to_string() });
    envelope::seal_with_rng(rng, owner, DELETE_KIND, None, ts, body)
}

/// The file a verified delete envelope names (kind and body checked, signer not yet):
/// look up that file's owner, then call [`check_delete`].
pub fn delete_target(delete: &Verified<Envelope>) -> Result<FileId, FilesError> {
    if delete.kind != DELETE_KIND {
        return Err(FilesError::Malformed(format!(
            "a delete is of kind {DELETE_KIND:?}"
        )));
    }
    let body = DeleteBody::deserialize(&delete.body)
        .map_err(|e| FilesError::Malformed(crate::manifest::shorten(format!("delete: {e}"))))?;
    Ok(body.id)
}

/// The file id a delete names, if `manifest_owner` signed it; [`FilesError::Forbidden`] for
/// any other signer.
pub fn check_delete(
    manifest_owner: &PublicKey,
    delete: &Verified<Envelope>,
) -> Result<FileId, FilesError> {
    let id = delete_target(delete)?;
    if delete.from != *manifest_owner {
        return Err(FilesError::Forbidden(format!(
            "only the owner {} may delete file {id}",
            manifest_owner.short()
        )));
    }
    Ok(id)
}

/// Open a manifest that is to be stored under `key`: it must verify and be signed by `key`
/// ([`FilesError::Forbidden`] otherwise).
pub fn check_store(key: &PublicKey, manifest: &[u8]) -> Result<OpenedManifest, FilesError> {
    let opened = open_manifest(manifest)?;
    if opened.owner() != *key {
        return Err(FilesError::Forbidden(format!(
            "a manifest stored under {} must be signed by that key",
            key.short()
        )));
    }
    Ok(opened)
}
