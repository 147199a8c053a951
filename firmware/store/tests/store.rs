//! Budget, limits, persistence, corruption and open errors of the shard store.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use borg_store::{Address, MemStore, RedbStore, ShardStore, StoreError, MAX_SHARD_BYTES};
use rand::{rngs::StdRng, RngCore, SeedableRng};

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

/// Implementations under test, by name.
type Named = Vec<(&'static str, Box<dyn ShardStore>)>;

/// A fresh MemStore and a fresh RedbStore with `budget`, named, with the temp dir kept alive.
fn both(budget: u64) -> (tempfile::TempDir, Named) {
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(dir.path().join("shards.redb"), budget).unwrap();
    (
        dir,
        vec![
            ("MemStore", Box::new(MemStore::new(budget))),
            ("RedbStore", Box::new(redb)),
        ],
    )
}

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("shards.redb")
}

#[test]
fn size_limit_and_empty_shards() {
    let (_dir, stores) = both(u64::MAX);
    for (name, store) in &stores {
        let max = bytes(MAX_SHARD_BYTES, 1);
        let addr = store.put(&max).unwrap();
        assert_eq!(store.get(&addr).unwrap().unwrap(), max, "{name}");

        let over = bytes(MAX_SHARD_BYTES + 1, 2);
        let e = store.put(&over).unwrap_err();
        assert_eq!(
            e,
            StoreError::TooLarge {
                len: MAX_SHARD_BYTES + 1
            },
            "{name}"
        );
        assert_eq!((e.code(), e.http_status()), ("too_large", 413));
        let e = store.put_at(&Address::of(&over), &over).unwrap_err();
        assert_eq!(e.code(), "too_large", "{name}");
        assert!(!store.has(&Address::of(&over)).unwrap(), "{name}");

        let empty = store.put(b"").unwrap();
        assert_eq!(empty, Address::of(b""));
        assert_eq!(store.get(&empty).unwrap(), Some(Vec::new()), "{name}");
        let usage = store.usage().unwrap();
        assert_eq!(
            (usage.shards, usage.bytes),
            (2, MAX_SHARD_BYTES as u64),
            "{name}"
        );
    }
}

#[test]
fn delete_is_idempotent() {
    let (_dir, stores) = both(u64::MAX);
    for (name, store) in &stores {
        let a = store.put(b"shard").unwrap();
        store.delete(&a).unwrap();
        store.delete(&a).unwrap();
        store.delete(&Address::of(b"never stored")).unwrap();
        assert_eq!(store.get(&a).unwrap(), None, "{name}");
        assert_eq!(store.usage().unwrap().shards, 0, "{name}");
        assert_eq!(store.usage().unwrap().bytes, 0, "{name}");
    }
}

/// Fill to near the budget: the next shard that does not fit is refused with `full`, nothing
/// stored changes, a shard that fits exactly is still taken, and a delete makes room again.
#[test]
fn budget_refuses_when_full_and_keeps_everything() {
    let budget = 100_000;
    let (_dir, stores) = both(budget);
    for (name, store) in &stores {
        let mut stored = Vec::new();
        for i in 0..9 {
            let s = bytes(10_000, i);
            stored.push((store.put(&s).unwrap(), s));
        }
        let last = bytes(9_000, 100);
        stored.push((store.put(&last).unwrap(), last));
        let before = store.usage().unwrap();
        assert_eq!(before.bytes, 99_000, "{name}");

        let too_big = bytes(2_000, 200);
        let e = store.put(&too_big).unwrap_err();
        assert_eq!(
            e,
            StoreError::Full {
                used: 99_000,
                budget,
                wanted: 2_000
            },
            "{name}"
        );
        assert_eq!((e.code(), e.http_status()), ("full", 507));
        assert_eq!(
            store
                .put_at(&Address::of(&too_big), &too_big)
                .unwrap_err()
                .code(),
            "full",
            "{name}"
        );
        assert!(!store.has(&Address::of(&too_big)).unwrap(), "{name}");
        assert_eq!(store.usage().unwrap(), before, "{name}");
        for (addr, s) in &stored {
            assert_eq!(store.get(addr).unwrap().as_ref(), Some(s), "{name}");
        }
        // Re-storing a stored shard is not new data: it succeeds even when full.
        assert_eq!(store.put(&stored[0].1).unwrap(), stored[0].0, "{name}");

        // Exactly up to the budget is allowed.
        let exact = bytes(1_000, 300);
        store.put(&exact).unwrap();
        assert_eq!(store.usage().unwrap().bytes, budget, "{name}");
        assert_eq!(store.put(b"x").unwrap_err().code(), "full", "{name}");
        store.put(b"").unwrap(); // an empty shard always fits

        store.delete(&stored[3].0).unwrap();
        store.put(&too_big).unwrap();
        assert_eq!(
            store.usage().unwrap().bytes,
            budget - 10_000 + 2_000,
            "{name}"
        );
    }
}

/// The stored byte count is in the database, so a reopened store is as full as before; the
/// budget itself is whatever the store is opened with.
#[test]
fn budget_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 50_000;
    let shards: Vec<Vec<u8>> = (0..5).map(|i| bytes(9_000, i)).collect();
    {
        let store = RedbStore::open(db_path(&dir), budget).unwrap();
        for s in &shards {
            store.put(s).unwrap();
        }
    }
    let extra = bytes(6_000, 99);
    {
        let store = RedbStore::open(db_path(&dir), budget).unwrap();
        let usage = store.usage().unwrap();
        assert_eq!(
            (usage.shards, usage.bytes, usage.budget),
            (5, 45_000, budget)
        );
        let e = store.put(&extra).unwrap_err();
        assert_eq!(
            e,
            StoreError::Full {
                used: 45_000,
                budget,
                wanted: 6_000
            }
        );
    }
    {
        // A smaller budget than is stored: nothing is lost, nothing new fits.
        let store = RedbStore::open(db_path(&dir), 10_000).unwrap();
        for s in &shards {
            assert_eq!(store.get(&Address::of(s)).unwrap().as_ref(), Some(s));
        }
        assert_eq!(store.put(b"x").unwrap_err().code(), "full");
    }
    {
        let store = RedbStore::open(db_path(&dir), 60_000).unwrap();
        store.put(&extra).unwrap();
        assert_eq!(store.usage().unwrap().bytes, 51_000);
    }
}

#[test]
fn shards_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let shards: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"hello".to_vec(),
        bytes(MAX_SHARD_BYTES, 7),
        bytes(12_345, 8),
    ];
    let (addrs, usage) = {
        let store = RedbStore::open(db_path(&dir), u64::MAX).unwrap();
        for s in &shards {
            store.put(s).unwrap();
        }
        store.delete(&Address::of(b"hello")).unwrap();
        (store.addresses().unwrap(), store.usage().unwrap())
    };
    let store = RedbStore::open(db_path(&dir), u64::MAX).unwrap();
    assert_eq!(store.addresses().unwrap(), addrs);
    assert_eq!(store.usage().unwrap(), usage);
    assert_eq!(usage.shards, 3);
    for s in &shards {
        let want = (s.as_slice() != b"hello").then(|| s.clone());
        assert_eq!(store.get(&Address::of(s)).unwrap(), want);
    }
    assert_eq!(store.path(), db_path(&dir));
}

/// A shard of a pattern that cannot occur elsewhere in the file, so it can be found on disk.
fn distinctive(len: usize, tag: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0u32;
    while out.len() < len {
        out.extend_from_slice(b"BORG-CORRUPT-ME-");
        out.push(tag);
        out.extend_from_slice(&i.to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Flip one byte in the middle of every copy of `shard` in the file at `path` (redb writes
/// pages copy-on-write, so an older copy may linger in a free page). Returns how many copies.
fn flip_on_disk(path: &Path, shard: &[u8]) -> usize {
    let mut file = std::fs::read(path).unwrap();
    let probe = &shard[shard.len() / 2 - 16..shard.len() / 2 + 16];
    let mut copies = 0;
    let mut at = 0;
    while let Some(i) = file[at..].windows(probe.len()).position(|w| w == probe) {
        let i = at + i;
        file[i + 7] ^= 0x5a;
        copies += 1;
        at = i + probe.len();
    }
    std::fs::write(path, &file).unwrap();
    copies
}

/// A byte flipped inside a stored shard in the database file is never handed out: `get`
/// reports it corrupt and drops it, it can be stored again, and scrub finds such damage too.
#[test]
fn corruption_on_disk_is_detected_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let victim = distinctive(64 * 1024, b'a');
    let victim2 = distinctive(200_000, b'b');
    let others: Vec<Vec<u8>> = (0..4).map(|i| bytes(30_000, i)).collect();
    {
        let store = RedbStore::open(&path, u64::MAX).unwrap();
        for s in &others {
            store.put(s).unwrap();
        }
        store.put(&victim).unwrap();
        store.put(&victim2).unwrap();
    }
    assert!(
        flip_on_disk(&path, &victim) >= 1,
        "victim not found in the file"
    );
    assert!(
        flip_on_disk(&path, &victim2) >= 1,
        "victim2 not found in the file"
    );

    let store = RedbStore::open(&path, u64::MAX).unwrap();
    let before = store.usage().unwrap();
    match store.get(&Address::of(&victim)) {
        Err(StoreError::Corrupt { addr }) => assert_eq!(addr, Address::of(&victim)),
        Ok(Some(b)) => panic!("corrupt shard returned (right bytes: {})", b == victim),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(
        !store.has(&Address::of(&victim)).unwrap(),
        "corrupt entry kept"
    );
    assert_eq!(store.get(&Address::of(&victim)).unwrap(), None);
    let after = store.usage().unwrap();
    assert_eq!(after.shards, before.shards - 1);
    assert_eq!(after.bytes, before.bytes - victim.len() as u64);

    // Scrub finds the other damaged shard and nothing else.
    let report = store.scrub().unwrap();
    assert_eq!(report.checked, 5);
    assert_eq!(report.corrupt, vec![Address::of(&victim2)]);
    assert_eq!(store.usage().unwrap().shards, 4);
    for s in &others {
        assert_eq!(store.get(&Address::of(s)).unwrap().as_ref(), Some(s));
    }
    assert!(store.scrub().unwrap().corrupt.is_empty());

    // Fetched again from elsewhere, the shards go back in.
    store.put_at(&Address::of(&victim), &victim).unwrap();
    store.put(&victim2).unwrap();
    assert_eq!(
        store.get(&Address::of(&victim)).unwrap(),
        Some(victim.clone())
    );
    assert_eq!(
        store.get(&Address::of(&victim2)).unwrap(),
        Some(victim2.clone())
    );
    assert_eq!(
        store.usage().unwrap().bytes,
        (4 * 30_000 + victim.len() + victim2.len()) as u64
    );
}

/// A put of the right bytes over a stored copy that went bad replaces it (instead of being
/// taken as a duplicate), without counting the shard twice.
#[test]
fn put_heals_a_bad_copy() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let victim = distinctive(40_000, b'c');
    RedbStore::open(&path, u64::MAX)
        .unwrap()
        .put(&victim)
        .unwrap();
    assert!(flip_on_disk(&path, &victim) >= 1);
    let store = RedbStore::open(&path, u64::MAX).unwrap();
    store.put(&victim).unwrap();
    assert_eq!(
        store.get(&Address::of(&victim)).unwrap(),
        Some(victim.clone())
    );
    assert_eq!(store.usage().unwrap().bytes, victim.len() as u64);
    assert!(store.scrub().unwrap().corrupt.is_empty());

    let mem = MemStore::new(u64::MAX);
    let a = mem.put(&victim).unwrap();
    assert!(mem.tamper(&a, b"bad".to_vec()));
    mem.put(&victim).unwrap();
    assert_eq!(mem.get(&a).unwrap(), Some(victim.clone()));
    assert_eq!(mem.usage().unwrap().bytes, victim.len() as u64);
}

#[test]
fn memstore_corruption_is_detected() {
    let mem = MemStore::new(u64::MAX);
    let a = mem.put(b"good bytes").unwrap();
    let b = mem.put(b"other good bytes").unwrap();
    let c = mem.put(b"third").unwrap();
    assert!(mem.tamper(&a, b"evil bytes".to_vec()));
    assert!(mem.tamper(&b, b"evil".to_vec()));
    assert!(!mem.tamper(&Address::of(b"absent"), Vec::new()));
    assert_eq!(mem.get(&a).unwrap_err(), StoreError::Corrupt { addr: a });
    assert!(!mem.has(&a).unwrap());
    let report = mem.scrub().unwrap();
    assert_eq!((report.checked, report.corrupt), (2, vec![b]));
    assert_eq!(mem.addresses().unwrap(), vec![c]);
    assert_eq!(mem.usage().unwrap().bytes, 5);
}

#[test]
fn open_refuses_a_file_that_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    let text = b"these are my notes, not a database\n".repeat(100);
    std::fs::write(&path, &text).unwrap();
    let e = RedbStore::open(&path, u64::MAX).unwrap_err();
    assert_eq!(e.code(), "io");
    assert!(e.to_string().contains("not a redb database"), "{e}");
    assert!(e.to_string().contains("notes.txt"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), text, "the file was changed");

    // A file shorter than the magic number is not a store either.
    std::fs::write(&path, b"re").unwrap();
    assert!(RedbStore::open(&path, u64::MAX).is_err());

    // An empty file is a new store.
    let empty = dir.path().join("empty.redb");
    std::fs::write(&empty, b"").unwrap();
    RedbStore::open(&empty, u64::MAX)
        .unwrap()
        .put(b"x")
        .unwrap();

    // A directory that does not exist is an I/O error naming the path.
    let e = RedbStore::open(dir.path().join("no/such/dir/s.redb"), 1).unwrap_err();
    assert_eq!(e.code(), "io");
    assert!(e.to_string().contains("no/such/dir"), "{e}");
}

#[test]
fn second_open_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = RedbStore::open(db_path(&dir), u64::MAX).unwrap();
    let e = RedbStore::open(db_path(&dir), u64::MAX).unwrap_err();
    assert!(e.to_string().contains("already open"), "{e}");
}

/// Threads racing to fill the store never take it over the budget, and each accepted shard
/// is there afterwards.
#[test]
fn concurrent_puts_respect_the_budget() {
    let (_dir, stores) = both(250_000);
    for (name, store) in stores {
        let store: Arc<dyn ShardStore> = Arc::from(store);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let mut ok = Vec::new();
                    for i in 0..10 {
                        match store.put(&bytes(10_000, t * 100 + i)) {
                            Ok(a) => ok.push(a),
                            Err(e) => assert_eq!(e.code(), "full"),
                        }
                    }
                    ok
                })
            })
            .collect();
        let mut accepted: Vec<Address> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        accepted.sort();
        assert_eq!(accepted.len(), 25, "{name}");
        assert_eq!(store.addresses().unwrap(), accepted, "{name}");
        assert_eq!(store.usage().unwrap().bytes, 250_000, "{name}");
    }
}
