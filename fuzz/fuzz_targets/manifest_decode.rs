//! Fuzz the file manifest decoder: arbitrary bytes into `open_manifest` must verify and decode
//! or fail cleanly. Random bytes almost never carry a valid signature, so a second path signs
//! the input (as a JSON body) with a fixed key and decodes that, reaching the manifest rules.
//! Whatever decodes must respect the bounds and re-encode to the same body.
#![no_main]

use std::sync::OnceLock;

use borg_files::{open_manifest, Manifest, CHUNK, MAX_SHARDS, MAX_NAME_BYTES, MANIFEST_KIND};
use borg_proto::envelope::seal_with_rng;
use borg_proto::identity::SecretKey;
use libfuzzer_sys::fuzz_target;

fn key() -> &'static SecretKey {
    static KEY: OnceLock<SecretKey> = OnceLock::new();
    KEY.get_or_init(|| SecretKey::from_scalar_bytes(&[7; 32]).expect("7..7 is a valid scalar"))
}

fn check(manifest: &Manifest) {
    let n = manifest.shards().len();
    assert!(n >= 1 && n <= MAX_SHARDS);
    assert_eq!(n as u64, manifest.size().div_ceil(CHUNK as u64).max(1));
    assert!(manifest.shards()[..n - 1].iter().all(|s| s.len as usize == CHUNK + 16));
    assert!(!manifest.name().is_empty() && manifest.name().len() <= MAX_NAME_BYTES);
    let body = manifest.to_body();
    assert_eq!(&Manifest::from_body(&body).expect("re-encoded manifest decodes"), manifest);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(opened) = open_manifest(data) {
        check(opened.manifest());
    }
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let env = seal_with_rng(&mut rand::rngs::OsRng, key(), MANIFEST_KIND, None, 0, body);
    if let Ok(opened) = open_manifest(&env.to_bytes()) {
        check(opened.manifest());
        assert_eq!(opened.manifest().to_body(), env.body);
    }
});
