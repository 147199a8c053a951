//! Manifest decoding: valid manifests round-trip, every bound is refused, arbitrary input
//! never panics, the worst case fits in an envelope, and the file id is stable.
#![allow(clippy::unwrap_used)]

mod common;

use borg_files::{
    open_manifest, seal_manifest, Encrypted, FileId, Manifest, ShardRef, WrappedKey, CHUNK,
    MANIFEST_KIND, MAX_FILE_SIZE, MAX_SHARDS,
};
use borg_proto::envelope::{seal_with_rng, MAX_ENVELOPE_BYTES};
use borg_store::Address;
use common::*;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Sign `body` as a manifest of `owner()` and open it.
fn open_body(body: Value) -> Result<borg_files::OpenedManifest, borg_files::FilesError> {
    let env = seal_with_rng(
        &mut StdRng::seed_from_u64(1),
        owner().signing(),
        MANIFEST_KIND,
        None,
        NOW,
        body,
    );
    open_manifest(&env.to_bytes())
}

/// The body of a real 3-shard manifest (made once).
fn sample_body() -> Value {
    static BODY: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| {
        let mut rng = StdRng::seed_from_u64(2);
        let data = random_bytes(&mut rng, 2 * CHUNK + 10);
        put(3, &owner(), &data).manifest().to_body()
    });
    BODY.clone()
}

#[test]
fn a_valid_manifest_round_trips_and_its_id_is_the_signed_bytes_hash() {
    let mut rng = StdRng::seed_from_u64(4);
    let data = random_bytes(&mut rng, CHUNK + 1);
    let p = put(5, &owner(), &data);
    let opened = open_manifest(&p.envelope_bytes).unwrap();
    assert_eq!(opened.owner(), owner().owner());
    assert_eq!(opened.manifest().name(), "data.bin");
    assert_eq!(opened.manifest().media_type(), "application/octet-stream");
    assert_eq!(opened.manifest().created_ms(), NOW);
    assert_eq!(opened.manifest().shards().len(), 2);
    // The body re-decodes to the same manifest.
    assert_eq!(
        &Manifest::from_body(&opened.manifest().to_body()).unwrap(),
        opened.manifest()
    );
    // id = SHA-256 of the signed bytes; any JSON layout of the same envelope has the same id.
    let expected: [u8; 32] = Sha256::digest(opened.envelope().signed_bytes()).into();
    assert_eq!(opened.id().as_bytes(), &expected);
    let value: Value = serde_json::from_slice(&p.envelope_bytes).unwrap();
    let pretty = serde_json::to_vec_pretty(&value).unwrap();
    assert_ne!(pretty, p.envelope_bytes);
    assert_eq!(open_manifest(&pretty).unwrap().id(), opened.id());
    // The text form of the id round-trips.
    let text = opened.id().to_string();
    assert_eq!(text.len(), 64);
    assert_eq!(text.parse::<FileId>().unwrap(), opened.id());
    // Another seal of the same manifest (new nonce) is another id.
    let (id2, _) = seal_manifest(&mut rng, owner().signing(), opened.manifest(), NOW).unwrap();
    assert_ne!(id2, opened.id());
}

#[test]
fn tampering_or_another_kind_is_refused() {
    let p = put(6, &owner(), b"hello");
    let text = String::from_utf8(p.envelope_bytes.clone()).unwrap();
    let tampered = text.replace("data.bin", "data.biN");
    assert_eq!(
        open_manifest(tampered.as_bytes()).unwrap_err().code(),
        "bad_signature"
    );
    let env = seal_with_rng(
        &mut StdRng::seed_from_u64(1),
        owner().signing(),
        "file.other",
        None,
        NOW,
        p.manifest().to_body(),
    );
    assert_eq!(
        open_manifest(&env.to_bytes()).unwrap_err().code(),
        "malformed"
    );
    let huge = vec![b' '; MAX_ENVELOPE_BYTES + 1];
    assert_eq!(open_manifest(&huge).unwrap_err().code(), "too_large");
}

#[test]
fn every_bound_is_refused() {
    let good = sample_body();
    assert!(open_body(good.clone()).is_ok());
    let last = good["shards"][2].clone();
    // Set the member at `path` (a JSON pointer's parts; the last may be a new key).
    let set = |path: &[&str], v: Value| {
        let mut b = good.clone();
        let parent = format!("/{}", path[..path.len() - 1].join("/"));
        let at = if path.len() == 1 {
            &mut b
        } else {
            b.pointer_mut(&parent).unwrap()
        };
        at[path[path.len() - 1]] = v;
        b
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        ("empty name", set(&["name"], json!("")), "malformed"),
        (
            "long name",
            set(&["name"], json!("a".repeat(256))),
            "malformed",
        ),
        ("slash", set(&["name"], json!("a/b")), "malformed"),
        ("nul", set(&["name"], json!("a\u{0}b")), "malformed"),
        ("newline", set(&["name"], json!("a\nb")), "malformed"),
        ("c1 control", set(&["name"], json!("a\u{85}b")), "malformed"),
        ("dot", set(&["name"], json!(".")), "malformed"),
        ("dotdot", set(&["name"], json!("..")), "malformed"),
        ("no subtype", set(&["type"], json!("text")), "malformed"),
        ("empty subtype", set(&["type"], json!("text/")), "malformed"),
        (
            "space in type",
            set(&["type"], json!("text/plain; charset=utf-8")),
            "malformed",
        ),
        ("two slashes", set(&["type"], json!("a/b/c")), "malformed"),
        (
            "long type",
            set(&["type"], json!(format!("a/{}", "b".repeat(126)))),
            "malformed",
        ),
        ("version", set(&["v"], json!(2)), "malformed"),
        ("chunk", set(&["chunk"], json!(1024)), "malformed"),
        (
            "size too small",
            set(&["size"], json!(CHUNK * 2)),
            "malformed",
        ),
        (
            "size too big",
            set(&["size"], json!(CHUNK * 3 + 1)),
            "malformed",
        ),
        (
            "size beyond max",
            set(&["size"], json!(MAX_FILE_SIZE + 1)),
            "too_large",
        ),
        ("negative size", set(&["size"], json!(-1)), "malformed"),
        (
            "middle len",
            set(&["shards", "1", "len"], json!(CHUNK)),
            "malformed",
        ),
        (
            "last len",
            set(&["shards", "2", "len"], json!(27)),
            "malformed",
        ),
        (
            "shard extra field",
            set(&["shards", "0", "x"], json!(1)),
            "malformed",
        ),
        (
            "bad addr",
            set(&["shards", "0", "addr"], json!("00")),
            "malformed",
        ),
        (
            "sha256 upper",
            set(&["sha256"], json!("A".repeat(64))),
            "malformed",
        ),
        (
            "sha256 short",
            set(&["sha256"], json!("a".repeat(62))),
            "malformed",
        ),
        ("salt length", set(&["salt"], json!("AAAA")), "malformed"),
        (
            "salt padding",
            set(&["salt"], json!("AAAAAAAAAAAAAAAAAAAAAA==")),
            "malformed",
        ),
        ("created", set(&["created"], json!(1u64 << 53)), "malformed"),
        ("key ct", set(&["key", "ct"], json!("AAAA")), "malformed"),
        ("key eph", set(&["key", "eph"], json!("AAAA")), "malformed"),
        ("key extra", set(&["key", "x"], json!(1)), "malformed"),
        ("unknown field", set(&["extra"], json!(1)), "malformed"),
        ("body not object", json!([1, 2]), "malformed"),
    ];
    for (what, body, code) in cases {
        let err = open_body(body)
            .err()
            .unwrap_or_else(|| panic!("{what} was accepted"));
        assert_eq!(err.code(), code, "{what}: {err}");
    }
    // Dropping a shard, adding one, and reordering are also refused where sizes tell.
    let mut b = good.clone();
    b["shards"].as_array_mut().unwrap().pop();
    assert_eq!(open_body(b).unwrap_err().code(), "malformed");
    let mut b = good.clone();
    b["shards"].as_array_mut().unwrap().push(last.clone());
    assert_eq!(open_body(b).unwrap_err().code(), "malformed");
    let mut b = good.clone();
    b["shards"].as_array_mut().unwrap().swap(1, 2);
    assert_eq!(open_body(b).unwrap_err().code(), "malformed");
    // Longest name (255 bytes of multi-byte UTF-8) and type are fine.
    let name = "é".repeat(127) + "x";
    assert_eq!(name.len(), 255);
    assert!(open_body(set(&["name"], json!(name))).is_ok());
    assert!(open_body(set(&["type"], json!(format!("a/{}", "b".repeat(125))))).is_ok());
}

/// The largest manifest the bounds allow: MAX_SHARDS shards, longest name made of
/// characters that JSON escapes, longest type. It must fit in one envelope.
#[test]
fn the_worst_case_manifest_fits_in_an_envelope() {
    let mut rng = StdRng::seed_from_u64(7);
    let shards = vec![
        ShardRef {
            addr: Address::of(b"x"),
            len: (CHUNK + 16) as u32,
        };
        MAX_SHARDS
    ];
    let encrypted = Encrypted {
        size: MAX_FILE_SIZE,
        sha256: [0xab; 32],
        shards,
    };
    let wrapped = wrap(&mut rng);
    let name = "\"".repeat(255);
    let media = format!("{}/{}", "a".repeat(63), "b".repeat(63));
    let manifest =
        Manifest::new(&name, &media, (1 << 53) - 1, [0xff; 16], encrypted, wrapped).unwrap();
    let (id, env) = seal_manifest(&mut rng, owner().signing(), &manifest, u64::MAX).unwrap();
    let bytes = env.to_bytes();
    assert!(bytes.len() <= MAX_ENVELOPE_BYTES, "{} bytes", bytes.len());
    let opened = open_manifest(&bytes).unwrap();
    assert_eq!(opened.id(), id);
    assert_eq!(opened.manifest(), &manifest);
    // The per-entry cost the limit is computed from.
    let entry = serde_json::to_string(&manifest.shards()[0]).unwrap();
    assert_eq!(entry.len() + 1, 89, "{entry}");
    let spare = MAX_ENVELOPE_BYTES - bytes.len();
    eprintln!(
        "worst-case manifest envelope: {} bytes, {spare} spare",
        bytes.len()
    );
    assert_eq!(MAX_FILE_SIZE, 3_014_472_000);

    // One more shard is refused at decode (and by Manifest::new).
    let mut body = manifest.to_body();
    let first = body["shards"][0].clone();
    body["shards"].as_array_mut().unwrap().push(first);
    body["size"] = json!(MAX_FILE_SIZE + CHUNK as u64);
    assert_eq!(open_body(body).unwrap_err().code(), "too_large");
}

fn wrap(rng: &mut StdRng) -> WrappedKey {
    let key = borg_files::FileKey::generate(rng);
    borg_files::wrap_key(rng, &key, &owner().encryption_public()).unwrap()
}

#[test]
fn manifest_new_refuses_what_decode_refuses() {
    let mut rng = StdRng::seed_from_u64(8);
    let enc = |size: u64, n: usize| Encrypted {
        size,
        sha256: [0; 32],
        shards: vec![
            ShardRef {
                addr: Address::of(b""),
                len: 16 + size as u32,
            };
            n
        ],
    };
    let w = wrap(&mut rng);
    assert!(Manifest::new("ok", "a/b", 0, [0; 16], enc(0, 1), w.clone()).is_ok());
    assert!(Manifest::new("a/b", "a/b", 0, [0; 16], enc(0, 1), w.clone()).is_err());
    assert!(Manifest::new("ok", "ab", 0, [0; 16], enc(0, 1), w.clone()).is_err());
    assert!(Manifest::new("ok", "a/b", 0, [0; 16], enc(0, 2), w.clone()).is_err());
    assert!(Manifest::new("ok", "a/b", 0, [0; 16], enc(0, 0), w.clone()).is_err());
    assert!(Manifest::new("ok", "a/b", 1 << 53, [0; 16], enc(0, 1), w).is_err());
}

/// JSON values of small depth with manifest-like keys, to reach deep into the decoder.
fn arb_value() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec![
        "v", "name", "type", "size", "sha256", "created", "chunk", "salt", "shards", "key", "addr",
        "len", "eph", "ct", "x",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(Value::from(CHUNK)),
        Just(Value::from(CHUNK + 16)),
        "[a-zA-Z0-9/._\"-]{0,70}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..10).prop_map(|m| Value::Object(
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        prop_assert!(open_manifest(&bytes).is_err());
    }

    #[test]
    fn arbitrary_signed_bodies_never_panic(body in arb_value()) {
        // A random body almost never is a manifest; when it is, it must re-encode to itself.
        if let Ok(opened) = open_body(body.clone()) {
            prop_assert_eq!(opened.manifest().to_body(), body);
        }
    }

    #[test]
    fn mutated_valid_manifests_never_panic(edits in prop::collection::vec((0usize..10, arb_value()), 1..3)) {
        let keys = ["v", "name", "type", "size", "sha256", "created", "chunk", "salt", "shards", "key"];
        let mut body = sample_body();
        for (k, v) in &edits {
            body[keys[*k]] = v.clone();
        }
        if let Ok(opened) = open_body(body.clone()) {
            prop_assert_eq!(opened.manifest().to_body(), body);
        }
    }

    #[test]
    fn valid_manifests_round_trip(size in 0u64..(4 * CHUNK as u64), name in "[^/\\x00-\\x1f\\x7f-\\x9f]{1,60}", created in 0u64..=((1u64 << 53) - 1), seed in any::<u64>()) {
        prop_assume!(name != "." && name != ".." && name.len() <= 255);
        let mut rng = StdRng::seed_from_u64(seed);
        let n = size.div_ceil(CHUNK as u64).max(1) as usize;
        let mut shards = vec![ShardRef { addr: Address::of(&seed.to_le_bytes()), len: (CHUNK + 16) as u32 }; n];
        shards[n - 1].len = (size - (n as u64 - 1) * CHUNK as u64 + 16) as u32;
        let enc = Encrypted { size, sha256: [7; 32], shards };
        let m = Manifest::new(&name, "text/plain", created, [1; 16], enc, wrap(&mut rng)).unwrap();
        let (id, env) = seal_manifest(&mut rng, owner().signing(), &m, NOW).unwrap();
        let opened = open_manifest(&env.to_bytes()).unwrap();
        prop_assert_eq!(opened.id(), id);
        prop_assert_eq!(opened.manifest(), &m);
    }
}

#[test]
fn error_messages_stay_short() {
    let mut body = sample_body();
    body["x".repeat(100_000).as_str()] = json!(1);
    let err = open_body(body).unwrap_err();
    assert_eq!(err.code(), "malformed");
    assert!(
        err.to_string().len() < 300,
        "{} bytes",
        err.to_string().len()
    );
}
