//! White-box tests: damage the tables directly, as a failing disk or a bug could.
#![allow(clippy::unwrap_used)]
use super::*;
use redb::TableHandle;

fn store() -> (tempfile::TempDir, RedbStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("s.redb"), u64::MAX).unwrap();
    (dir, store)
}

fn shard(len: usize, tag: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
}

/// Change the tables directly, bypassing every rule.
fn surgery(
    store: &RedbStore,
    f: impl FnOnce(
        &mut Table<'_, ([u8; 32], u32), &'static [u8]>,
        &mut Table<'_, [u8; 32], u64>,
        &mut Table<'_, &'static str, u64>,
    ),
) {
    let txn = store.db.begin_write().unwrap();
    {
        let mut chunks = txn.open_table(CHUNKS).unwrap();
        let mut index = txn.open_table(INDEX).unwrap();
        let mut meta = txn.open_table(META).unwrap();
        f(&mut chunks, &mut index, &mut meta);
    }
    txn.commit().unwrap();
}

fn chunk_count(store: &RedbStore) -> u64 {
    let txn = store.db.begin_read().unwrap();
    let chunks = txn.open_table(CHUNKS).unwrap();
    chunks.len().unwrap()
}

#[test]
fn shards_are_stored_in_chunks() {
    let (_dir, store) = store();
    store.put(&shard(3 * CHUNK_BYTES + 1, 1)).unwrap();
    store.put(&shard(CHUNK_BYTES, 2)).unwrap();
    store.put(b"").unwrap();
    assert_eq!(chunk_count(&store), 4 + 1);
    store
        .delete(&Address::of(&shard(3 * CHUNK_BYTES + 1, 1)))
        .unwrap();
    assert_eq!(chunk_count(&store), 1);
}

#[test]
fn a_missing_or_extra_chunk_is_corrupt() {
    let (_dir, store) = store();
    let a = store.put(&shard(40_000, 1)).unwrap();
    let b = store.put(&shard(40_000, 2)).unwrap();
    let keep = store.put(&shard(100, 3)).unwrap();
    surgery(&store, |chunks, _, _| {
        chunks.remove((*a.as_bytes(), 1)).unwrap();
        chunks
            .insert((*b.as_bytes(), 3), b"tail".as_slice())
            .unwrap();
    });
    assert_eq!(store.get(&a), Err(StoreError::Corrupt { addr: a }));
    assert_eq!(store.get(&b), Err(StoreError::Corrupt { addr: b }));
    assert_eq!(store.addresses().unwrap(), vec![keep]);
    assert_eq!(
        chunk_count(&store),
        1,
        "chunks of removed shards left behind"
    );
    assert_eq!(store.usage().unwrap().bytes, 100);
    // Re-fetched, they go back in whole.
    store.put(&shard(40_000, 1)).unwrap();
    assert_eq!(store.get(&a).unwrap().unwrap(), shard(40_000, 1));
}

#[test]
fn a_wrong_indexed_length_is_corrupt() {
    let (_dir, store) = store();
    let a = store.put(&shard(20_000, 1)).unwrap();
    surgery(&store, |_, index, _| {
        index.insert(a.as_bytes(), 19_999).unwrap();
    });
    assert_eq!(store.scrub().unwrap().corrupt, vec![a]);
    assert_eq!(chunk_count(&store), 0);
    assert_eq!(store.usage().unwrap().bytes, 0);
}

#[test]
fn scrub_removes_orphan_chunks_and_fixes_the_counter() {
    let (_dir, store) = store();
    let a = store.put(&shard(50_000, 1)).unwrap();
    let orphan = Address::of(b"no index entry");
    surgery(&store, |chunks, _, meta| {
        chunks
            .insert((*orphan.as_bytes(), 0), b"lost".as_slice())
            .unwrap();
        meta.insert(STORED_BYTES, 7).unwrap();
    });
    let report = store.scrub().unwrap();
    assert_eq!(report.checked, 1);
    assert_eq!(report.corrupt, vec![orphan]);
    assert_eq!(chunk_count(&store), 50_000u64.div_ceil(CHUNK_BYTES as u64));
    assert_eq!(store.usage().unwrap().bytes, 50_000);
    assert_eq!(store.get(&a).unwrap().unwrap(), shard(50_000, 1));
    assert_eq!(
        store.scrub().unwrap(),
        ScrubReport {
            checked: 1,
            corrupt: vec![]
        }
    );
}

#[test]
fn other_formats_and_foreign_databases_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = RedbStore::open(&path, 1).unwrap();
    surgery(&store, |_, _, meta| {
        meta.insert(FORMAT, 2).unwrap();
    });
    drop(store);
    let e = RedbStore::open(&path, 1).unwrap_err();
    assert!(e.to_string().contains("format 2"), "{e}");

    let other = dir.path().join("other.redb");
    {
        let db = Database::create(&other).unwrap();
        let txn = db.begin_write().unwrap();
        let def: TableDefinition<&str, &str> = TableDefinition::new("settings");
        txn.open_table(def).unwrap().insert("k", "v").unwrap();
        txn.commit().unwrap();
    }
    let e = RedbStore::open(&other, 1).unwrap_err();
    assert!(e.to_string().contains("not a shard store"), "{e}");
    let db = Database::create(&other).unwrap();
    let names: Vec<String> = db
        .begin_read()
        .unwrap()
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    assert_eq!(
        names,
        vec!["settings".to_string()],
        "the foreign database was changed"
    );
}

/// Chunking keeps the pages a shard takes close to its size (a whole 256 KiB value would
/// take a 512 KiB run of pages).
#[test]
fn pages_used_stay_close_to_the_bytes_stored() {
    let (_dir, store) = store();
    let mut total = 0u64;
    for i in 0..24u32 {
        let len = (i as usize * 11_113) % (crate::MAX_SHARD_BYTES + 1);
        let mut s = shard(len, i as u8);
        s.extend_from_slice(&i.to_le_bytes());
        total += s.len() as u64;
        store.put(&s).unwrap();
    }
    store.put(&shard(crate::MAX_SHARD_BYTES, 99)).unwrap();
    total += crate::MAX_SHARD_BYTES as u64;
    let txn = store.db.begin_write().unwrap();
    let stats = txn.stats().unwrap();
    // In base pages (a run of 2^k pages counts 2^k), all tables and redb's own included.
    let allocated = stats.allocated_pages() * stats.page_size() as u64;
    txn.abort().unwrap();
    let ratio = allocated as f64 / total as f64;
    eprintln!("allocated pages: {ratio:.3} times the shard bytes");
    assert!(
        ratio < 1.12,
        "allocated pages take {ratio:.2} times the shard bytes"
    );
}
