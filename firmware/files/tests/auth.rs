//! Only the owner may store a manifest under their key or delete it.
#![allow(clippy::unwrap_used)]

mod common;

use borg_files::{check_delete, check_store, delete_target, seal_delete, FileId, DELETE_KIND};
use borg_proto::envelope::{open, seal_with_rng, ReplayCache};
use common::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

#[test]
fn the_owner_may_delete_and_nobody_else() {
    let p = put(1, &owner(), b"secret");
    let id = p.opened.id();
    let mut rng = StdRng::seed_from_u64(2);
    let mut replay = ReplayCache::new(16);

    let by_owner = seal_delete(&mut rng, owner().signing(), &id, NOW);
    let verified = open(&by_owner.to_bytes(), NOW, &mut replay).unwrap();
    assert_eq!(delete_target(&verified).unwrap(), id);
    assert_eq!(check_delete(&p.opened.owner(), &verified).unwrap(), id);
    // The same delete again is a replay, refused by the live envelope check.
    assert!(open(&by_owner.to_bytes(), NOW, &mut replay).is_err());

    let by_stranger = seal_delete(&mut rng, stranger().signing(), &id, NOW);
    let verified = open(&by_stranger.to_bytes(), NOW, &mut replay).unwrap();
    assert_eq!(delete_target(&verified).unwrap(), id);
    let err = check_delete(&p.opened.owner(), &verified).unwrap_err();
    assert_eq!((err.code(), err.http_status()), ("forbidden", 403));

    // The owner's m/1' encryption key is not the owner either.
    let by_enc_key = seal_delete(&mut rng, owner().encryption(), &id, NOW);
    let verified = open(&by_enc_key.to_bytes(), NOW, &mut replay).unwrap();
    assert_eq!(
        check_delete(&p.opened.owner(), &verified)
            .unwrap_err()
            .code(),
        "forbidden"
    );
}

#[test]
fn malformed_deletes_are_refused() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut replay = ReplayCache::new(16);
    let id: FileId = "ab".repeat(32).parse().unwrap();
    let cases = [
        ("file.remove", json!({ "id": id.to_string() })),
        (DELETE_KIND, json!({ "id": id.to_string(), "also": 1 })),
        (DELETE_KIND, json!({ "id": "AB".repeat(32) })),
        (DELETE_KIND, json!({ "id": "ab" })),
        (DELETE_KIND, json!({})),
        (DELETE_KIND, json!(null)),
    ];
    for (kind, body) in cases {
        let env = seal_with_rng(&mut rng, owner().signing(), kind, None, NOW, body.clone());
        let verified = open(&env.to_bytes(), NOW, &mut replay).unwrap();
        let err = check_delete(&owner().owner(), &verified).unwrap_err();
        assert_eq!(err.code(), "malformed", "{kind} {body}: {err}");
    }
}

#[test]
fn a_manifest_is_stored_only_under_its_signer() {
    let p = put(4, &owner(), b"mine");
    let opened = check_store(&owner().owner(), &p.envelope_bytes).unwrap();
    assert_eq!(opened.id(), p.opened.id());
    let err = check_store(&stranger().owner(), &p.envelope_bytes).unwrap_err();
    assert_eq!(err.code(), "forbidden");
    // A stranger's own manifest is theirs, and is not storable under the owner's key.
    let theirs = put(5, &stranger(), b"theirs");
    assert!(check_store(&stranger().owner(), &theirs.envelope_bytes).is_ok());
    assert_eq!(
        check_store(&owner().owner(), &theirs.envelope_bytes)
            .unwrap_err()
            .code(),
        "forbidden"
    );
    // A forged signer is a bad signature, not forbidden.
    let text = String::from_utf8(p.envelope_bytes.clone()).unwrap();
    let forged = text.replace(&owner().owner().to_b64(), &stranger().owner().to_b64());
    assert_eq!(
        check_store(&stranger().owner(), forged.as_bytes())
            .unwrap_err()
            .code(),
        "bad_signature"
    );
}

#[test]
fn a_stranger_cannot_rewrap_the_file_key_for_themselves() {
    // Shards and manifest in hand, a stranger cannot unwrap the file key...
    let p = put(6, &owner(), b"not yours");
    let wrapped = p.manifest().wrapped_key();
    assert_eq!(
        borg_files::unwrap_key(wrapped, stranger().encryption())
            .unwrap_err()
            .code(),
        "wrong_key"
    );
    // ...and a manifest they write with their own key wrapped in it is signed by them, so it
    // is not the owner's file (another id, another owner).
    let mut body = p.manifest().to_body();
    let mut rng = StdRng::seed_from_u64(7);
    let their_key = borg_files::FileKey::generate(&mut rng);
    let rewrapped =
        borg_files::wrap_key(&mut rng, &their_key, &stranger().encryption_public()).unwrap();
    body["key"] = serde_json::to_value(&rewrapped).unwrap();
    let env = seal_with_rng(
        &mut rng,
        stranger().signing(),
        borg_files::MANIFEST_KIND,
        None,
        NOW,
        body,
    );
    let opened = borg_files::open_manifest(&env.to_bytes()).unwrap();
    assert_ne!(opened.id(), p.opened.id());
    assert_eq!(opened.owner(), stranger().owner());
    // And their key does not open the owner's shards.
    let enc = borg_files::Encryptor::new(&their_key, p.manifest().salt());
    assert_eq!(
        enc.decrypt_chunk(0, true, &p.shard(0)).unwrap_err().code(),
        "corrupt"
    );
}
