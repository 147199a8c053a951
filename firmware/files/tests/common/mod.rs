//! Shared fixtures: deterministic users and a whole `put` into a memory store.
#![allow(dead_code, clippy::unwrap_used)]

use borg_files::{
    encrypt_reader, open_manifest, seal_manifest, wrap_key, FileKey, Manifest, OpenedManifest,
    UserKeys, SALT_LEN,
};
use borg_store::{MemStore, ShardStore};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

pub const PHRASE: &str = "abandon abandon abandon abandon abandon abandon abandon abandon \
                          abandon abandon abandon abandon abandon abandon abandon abandon \
                          abandon abandon abandon abandon abandon abandon abandon art";
pub const NOW: u64 = 1_763_765_000_123;

/// The owner's keys (derived once: PBKDF2 is slow in test builds).
pub fn owner() -> UserKeys {
    static KEYS: std::sync::LazyLock<UserKeys> =
        std::sync::LazyLock::new(|| UserKeys::from_phrase(PHRASE, "").unwrap());
    KEYS.clone()
}

pub fn stranger() -> UserKeys {
    UserKeys::from_phrase(PHRASE, "stranger").unwrap()
}

pub fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    data
}

/// Everything a `put` produces.
pub struct Put {
    pub key: FileKey,
    pub salt: [u8; SALT_LEN],
    pub envelope_bytes: Vec<u8>,
    pub opened: OpenedManifest,
    pub store: MemStore,
}

impl Put {
    pub fn manifest(&self) -> &Manifest {
        self.opened.manifest()
    }
    pub fn shard(&self, i: usize) -> Vec<u8> {
        let addr = self.manifest().shards()[i].addr;
        self.store.get(&addr).unwrap().unwrap()
    }
}

/// Encrypt `data` into a fresh memory store and seal its manifest as `user`.
pub fn put(seed: u64, user: &UserKeys, data: &[u8]) -> Put {
    let mut rng = StdRng::seed_from_u64(seed);
    let key = FileKey::generate(&mut rng);
    let mut salt = [0u8; SALT_LEN];
    rng.fill_bytes(&mut salt);
    let store = MemStore::new(u64::MAX);
    let encrypted = encrypt_reader(data, &key, &salt, &[], |a, b| store.put_at(a, b)).unwrap();
    let wrapped = wrap_key(&mut rng, &key, &user.encryption_public()).unwrap();
    let manifest = Manifest::new(
        "data.bin",
        "application/octet-stream",
        NOW,
        salt,
        encrypted,
        wrapped,
    )
    .unwrap();
    let (id, env) = seal_manifest(&mut rng, user.signing(), &manifest, NOW).unwrap();
    let envelope_bytes = env.to_bytes();
    let opened = open_manifest(&envelope_bytes).unwrap();
    assert_eq!(opened.id(), id);
    Put {
        key,
        salt,
        envelope_bytes,
        opened,
        store,
    }
}
