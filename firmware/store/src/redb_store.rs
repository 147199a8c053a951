//! [`RedbStore`]: shards in one redb file, each change its own durable transaction.
//!
//! Layout (format 1):
//! - `index`: address (32 bytes) -> shard length. Listing, `has` and the byte count read only
//!   this small table, never the shard bytes.
//! - `chunks`: (address, n) -> the n-th piece of the shard, [`CHUNK_BYTES`] each (the last one
//!   shorter; an empty shard has none). redb gives a value that does not fit a page a run of
//!   pages rounded up to a power of two, so a whole 256 KiB shard would take 512 KiB of file;
//!   pieces that just fit a 16 KiB run of pages waste almost nothing (docs/STORAGE.md has the numbers).
//! - `meta`: `stored_bytes`, the sum of the index lengths, and `format`.
//!
//! A put writes the index entry, all chunks and the counter in one write transaction, so after
//! a crash a shard is wholly there or not at all and the counter agrees. Every write commits
//! with immediate durability and quick repair (which implies redb's two-phase commit): `commit`
//! returns only after the data and then the commit slot have been fsynced, and reopening after
//! a crash does not walk the whole file.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    Table, TableDefinition, WriteTransaction,
};

use crate::{
    check_address, check_budget, check_size, Address, ScrubReport, ShardStore, StoreError, Usage,
};

const INDEX: TableDefinition<[u8; 32], u64> = TableDefinition::new("index");
const CHUNKS: TableDefinition<([u8; 32], u32), &[u8]> = TableDefinition::new("chunks");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const STORED_BYTES: &str = "stored_bytes";
const FORMAT: &str = "format";
const FORMAT_VERSION: u64 = 1;

/// Bytes per chunk: a leaf holding one chunk (4 bytes of page header, 4 of value length, 36
/// of key) fits a 16 KiB page with room to spare. Reading does not depend on this value
/// (a shard is whatever chunks it has, checked against its length and hash), so it can change
/// without a format change.
const CHUNK_BYTES: usize = 16 * 1024 - 64;

/// The first bytes of every redb file (redb's header, "inspired by PNG's magic number").
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// A [`ShardStore`] in one redb database file. One process may have the file open at a time
/// (redb locks it); within the process the store is shared by reference (`Send + Sync`).
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    budget: u64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// What a write transaction decided before it commits or aborts.
enum Decision {
    Write,
    NoOp,
    Refuse(StoreError),
}

impl RedbStore {
    /// Open the store at `path`, creating it if the file does not exist (or is empty), with a
    /// budget of `budget` shard bytes. The budget is not stored: a store reopened with a
    /// smaller budget than it holds keeps everything and refuses new shards until deletes
    /// bring it under. A file that is not a redb database is refused, not overwritten.
    pub fn open(path: impl AsRef<Path>, budget: u64) -> Result<RedbStore, StoreError> {
        let path = path.as_ref();
        check_is_redb(path)?;
        let db = Database::builder()
            .create(path)
            .map_err(|e| open_error(path, e))?;
        RedbStore::from_db(db, path.to_path_buf(), budget)
    }

    fn from_db(db: Database, path: PathBuf, budget: u64) -> Result<RedbStore, StoreError> {
        let store = RedbStore { db, path, budget };
        store.init()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Create the tables, the format mark and the byte counter on first open; refuse a
    /// database written in another format (or by another program).
    fn init(&self) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        let no_tables = txn.list_tables()?.next().is_none();
        let format = if no_tables {
            None
        } else {
            let meta = txn.open_table(META)?;
            let format = meta.get(FORMAT)?.map(|v| v.value());
            format
        };
        match format {
            Some(FORMAT_VERSION) => {
                txn.abort()?;
                return Ok(());
            }
            Some(other) => {
                return Err(StoreError::Db(format!(
                    "{} is shard store format {other}; this build reads format {FORMAT_VERSION}",
                    self.path.display()
                )))
            }
            None if no_tables => {}
            None => {
                // Someone else's redb database: leave it as it is.
                return Err(StoreError::Db(format!(
                    "{} is a redb database but not a shard store (it has no shard store format mark)",
                    self.path.display()
                )));
            }
        }
        txn.open_table(INDEX)?;
        txn.open_table(CHUNKS)?;
        let mut meta = txn.open_table(META)?;
        meta.insert(FORMAT, FORMAT_VERSION)?;
        meta.insert(STORED_BYTES, 0)?;
        drop(meta);
        txn.commit()?;
        Ok(())
    }

    fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        // Quick repair saves the allocator state with each commit and turns on two-phase
        // commit: a crash never leaves the primary commit slot pointing at half-written pages
        // (which the single-fsync protocol only rules out with a non-cryptographic checksum,
        // and our shards come from untrusted peers), and reopening does not scan the file.
        txn.set_quick_repair(true);
        Ok(txn)
    }

    fn insert(&self, addr: &Address, bytes: &[u8]) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        let decision = {
            let mut index = txn.open_table(INDEX)?;
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut meta = txn.open_table(META)?;
            let old_len = index.get(addr.as_bytes())?.map(|v| v.value());
            // Content addressing: the same address means the same bytes, unless the stored
            // copy went bad, in which case the caller's good copy replaces it.
            let replace = match old_len {
                None => true,
                Some(len) => !stored_equals(len, &chunks, addr, bytes)?,
            };
            if replace {
                let used = counter(&meta)?.saturating_sub(old_len.unwrap_or(0));
                match check_budget(used, self.budget, bytes.len()) {
                    Err(e) => Decision::Refuse(e),
                    Ok(()) => {
                        remove_chunks(&mut chunks, addr)?;
                        for (n, piece) in (0u32..).zip(bytes.chunks(CHUNK_BYTES)) {
                            chunks.insert((*addr.as_bytes(), n), piece)?;
                        }
                        index.insert(addr.as_bytes(), bytes.len() as u64)?;
                        meta.insert(STORED_BYTES, used + bytes.len() as u64)?;
                        Decision::Write
                    }
                }
            } else {
                Decision::NoOp
            }
        };
        match decision {
            Decision::Write => Ok(txn.commit()?),
            Decision::NoOp => Ok(txn.abort()?),
            Decision::Refuse(e) => {
                txn.abort()?;
                Err(e)
            }
        }
    }

    /// In one transaction, remove those of `addrs` whose stored shard (read again inside the
    /// transaction, as another thread may have replaced it) is not intact, remove chunks that
    /// have no index entry under `orphans`, and add `fix` to the byte counter. Returns the
    /// addresses removed.
    fn remove_corrupt(
        &self,
        addrs: &[Address],
        orphans: &[Address],
        fix: i128,
    ) -> Result<Vec<Address>, StoreError> {
        let txn = self.begin_write()?;
        let mut removed = Vec::new();
        {
            let mut index = txn.open_table(INDEX)?;
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut meta = txn.open_table(META)?;
            let mut bytes = i128::from(counter(&meta)?) + fix;
            for addr in addrs {
                let Some(len) = index.get(addr.as_bytes())?.map(|v| v.value()) else {
                    continue;
                };
                if read_shard(&index, &chunks, addr)?.is_none() {
                    index.remove(addr.as_bytes())?;
                    remove_chunks(&mut chunks, addr)?;
                    bytes -= i128::from(len);
                    removed.push(*addr);
                }
            }
            for addr in orphans {
                if index.get(addr.as_bytes())?.is_none() {
                    remove_chunks(&mut chunks, addr)?;
                    removed.push(*addr);
                }
            }
            let bytes = u64::try_from(bytes.max(0)).unwrap_or(u64::MAX);
            meta.insert(STORED_BYTES, bytes)?;
        }
        txn.commit()?;
        removed.sort_unstable();
        Ok(removed)
    }
}

impl ShardStore for RedbStore {
    fn put(&self, bytes: &[u8]) -> Result<Address, StoreError> {
        check_size(bytes)?;
        let addr = Address::of(bytes);
        self.insert(&addr, bytes)?;
        Ok(addr)
    }

    fn put_at(&self, addr: &Address, bytes: &[u8]) -> Result<(), StoreError> {
        check_size(bytes)?;
        check_address(addr, bytes)?;
        self.insert(addr, bytes)
    }

    fn get(&self, addr: &Address) -> Result<Option<Vec<u8>>, StoreError> {
        let found = {
            let txn = self.db.begin_read()?;
            let index = txn.open_table(INDEX)?;
            if index.get(addr.as_bytes())?.is_none() {
                return Ok(None);
            }
            read_shard(&index, &txn.open_table(CHUNKS)?, addr)?
        };
        match found {
            Some(bytes) => Ok(Some(bytes)),
            None => {
                self.remove_corrupt(&[*addr], &[], 0)?;
                Err(StoreError::Corrupt { addr: *addr })
            }
        }
    }

    fn has(&self, addr: &Address) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(INDEX)?;
        Ok(index.get(addr.as_bytes())?.is_some())
    }

    fn delete(&self, addr: &Address) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        let removed = {
            let mut index = txn.open_table(INDEX)?;
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut meta = txn.open_table(META)?;
            let old_len = index.remove(addr.as_bytes())?.map(|v| v.value());
            if let Some(len) = old_len {
                remove_chunks(&mut chunks, addr)?;
                let used = counter(&meta)?;
                meta.insert(STORED_BYTES, used.saturating_sub(len))?;
            }
            old_len.is_some()
        };
        if removed {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(())
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(INDEX)?;
        let meta = txn.open_table(META)?;
        Ok(Usage {
            shards: index.len()?,
            bytes: counter(&meta)?,
            budget: self.budget,
        })
    }

    fn addresses(&self) -> Result<Vec<Address>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(INDEX)?;
        let mut all = Vec::new();
        for entry in index.iter()? {
            let (k, _) = entry?;
            all.push(Address::from_bytes(k.value()));
        }
        // redb iterates in key order already; sorting keeps the promise independent of that.
        all.sort_unstable();
        Ok(all)
    }

    fn scrub(&self) -> Result<ScrubReport, StoreError> {
        let (checked, suspects, orphans, counted, sum) = {
            let txn = self.db.begin_read()?;
            let index = txn.open_table(INDEX)?;
            let chunks = txn.open_table(CHUNKS)?;
            let meta = txn.open_table(META)?;
            let mut checked = 0u64;
            let mut sum = 0u64;
            let mut expected_chunks = 0u64;
            let mut suspects = Vec::new();
            for entry in index.iter()? {
                let (k, v) = entry?;
                let addr = Address::from_bytes(k.value());
                let len = v.value();
                checked += 1;
                sum = sum.saturating_add(len);
                expected_chunks = expected_chunks.saturating_add(len.div_ceil(CHUNK_BYTES as u64));
                if read_shard(&index, &chunks, &addr)?.is_none() {
                    suspects.push(addr);
                }
            }
            // Chunks of no indexed shard (only a damaged index page could leave them) waste
            // space; they are looked for only when the chunk count says some exist.
            let orphans = if chunks.len()? == expected_chunks {
                Vec::new()
            } else {
                orphan_chunks(&index, &chunks)?
            };
            (checked, suspects, orphans, counter(&meta)?, sum)
        };
        // The counter is kept in the same transactions as the index, so it only disagrees
        // with it if its own page went bad; then it is set right from this snapshot.
        let fix = i128::from(sum) - i128::from(counted);
        let corrupt = if suspects.is_empty() && orphans.is_empty() && fix == 0 {
            Vec::new()
        } else {
            self.remove_corrupt(&suspects, &orphans, fix)?
        };
        Ok(ScrubReport { checked, corrupt })
    }
}

/// The shard under `addr` if it is intact: its chunks, joined, have the indexed length and
/// hash to `addr`. `None` if it is not indexed or not intact.
fn read_shard(
    index: &impl ReadableTable<[u8; 32], u64>,
    chunks: &impl ReadableTable<([u8; 32], u32), &'static [u8]>,
    addr: &Address,
) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(len) = index.get(addr.as_bytes())?.map(|v| v.value()) else {
        return Ok(None);
    };
    let Ok(len) = usize::try_from(len) else {
        return Ok(None);
    };
    if len > crate::MAX_SHARD_BYTES {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(len);
    let a = *addr.as_bytes();
    for (expect, entry) in (0u32..).zip(chunks.range((a, 0u32)..=(a, u32::MAX))?) {
        let (k, v) = entry?;
        let piece = v.value();
        // A missing piece, or a shard longer than indexed: not intact.
        if k.value().1 != expect || bytes.len() + piece.len() > len {
            return Ok(None);
        }
        bytes.extend_from_slice(piece);
    }
    Ok((bytes.len() == len && addr.matches(&bytes)).then_some(bytes))
}

/// Whether the shard stored under `addr` with indexed length `len` is exactly `bytes`
/// (which the caller has checked hash to `addr`, so no hashing is needed here).
fn stored_equals(
    len: u64,
    chunks: &impl ReadableTable<([u8; 32], u32), &'static [u8]>,
    addr: &Address,
    bytes: &[u8],
) -> Result<bool, StoreError> {
    if len != bytes.len() as u64 {
        return Ok(false);
    }
    let a = *addr.as_bytes();
    let mut at = 0usize;
    for (expect, entry) in (0u32..).zip(chunks.range((a, 0u32)..=(a, u32::MAX))?) {
        let (k, v) = entry?;
        let piece = v.value();
        if k.value().1 != expect || bytes.get(at..at + piece.len()) != Some(piece) {
            return Ok(false);
        }
        at += piece.len();
    }
    Ok(at == bytes.len())
}

/// Remove every chunk stored under `addr`.
fn remove_chunks(
    chunks: &mut Table<'_, ([u8; 32], u32), &'static [u8]>,
    addr: &Address,
) -> Result<(), StoreError> {
    let a = *addr.as_bytes();
    let mut keys = Vec::new();
    for entry in chunks.range((a, 0u32)..=(a, u32::MAX))? {
        keys.push(entry?.0.value().1);
    }
    for n in keys {
        chunks.remove((a, n))?;
    }
    Ok(())
}

/// Addresses that have chunks but no index entry.
fn orphan_chunks(
    index: &impl ReadableTable<[u8; 32], u64>,
    chunks: &impl ReadableTable<([u8; 32], u32), &'static [u8]>,
) -> Result<Vec<Address>, StoreError> {
    let mut orphans: Vec<Address> = Vec::new();
    for entry in chunks.iter()? {
        let (k, _) = entry?;
        let addr = Address::from_bytes(k.value().0);
        if orphans.last() != Some(&addr) && index.get(addr.as_bytes())?.is_none() {
            orphans.push(addr);
        }
    }
    Ok(orphans)
}

fn counter(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64, StoreError> {
    Ok(meta.get(STORED_BYTES)?.map(|v| v.value()).unwrap_or(0))
}

/// Refuse a file that exists, is not empty and does not start with redb's magic number, with
/// an error that says so (redb itself would report a corrupted database, or worse, repair it).
fn check_is_redb(path: &Path) -> Result<(), StoreError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::Io(format!("{}: {e}", path.display()))),
    };
    let mut head = Vec::with_capacity(REDB_MAGIC.len());
    (&mut file)
        .take(REDB_MAGIC.len() as u64)
        .read_to_end(&mut head)
        .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
    if head.is_empty() || head == REDB_MAGIC {
        return Ok(());
    }
    Err(StoreError::Db(format!(
        "{} is not a shard store: it is not a redb database (no redb magic number at the start)",
        path.display()
    )))
}

fn open_error(path: &Path, e: DatabaseError) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen => StoreError::Db(format!(
            "{} is already open (is another borg process using this data directory?)",
            path.display()
        )),
        DatabaseError::Storage(redb::StorageError::Io(io)) => {
            StoreError::Io(format!("{}: {io}", path.display()))
        }
        e => StoreError::Db(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
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
}

#[cfg(test)]
mod power_loss {
    //! Power loss, simulated below redb: a disk that keeps what was fsynced, and at the cut
    //! keeps a random part of what was written since (each 512-byte sector of each write
    //! independently, in any order), as a real disk with a write cache may.
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::{rngs::StdRng, seq::SliceRandom, Rng, RngCore, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};
    use std::io;
    use std::sync::{Arc, Mutex};

    const SECTOR: usize = 512;

    #[derive(Debug, Default)]
    struct Disk {
        /// What the running process sees.
        current: Vec<u8>,
        /// What survives a power cut for sure: the image at the last fsync.
        durable: Vec<u8>,
        /// Writes since the last fsync.
        pending: Vec<(usize, Vec<u8>)>,
        ops: u64,
        cut_at: u64,
    }

    #[derive(Debug, Clone)]
    struct FlakyDisk(Arc<Mutex<Disk>>);

    impl FlakyDisk {
        fn new(image: Vec<u8>) -> FlakyDisk {
            FlakyDisk(Arc::new(Mutex::new(Disk {
                current: image.clone(),
                durable: image,
                cut_at: u64::MAX,
                ..Disk::default()
            })))
        }

        fn disk(&self) -> std::sync::MutexGuard<'_, Disk> {
            self.0.lock().unwrap()
        }

        /// Cut the power after `n` more writes or syncs.
        fn cut_after(&self, n: u64) {
            let mut d = self.disk();
            d.cut_at = d.ops + n;
        }

        fn is_cut(&self) -> bool {
            let d = self.disk();
            d.ops >= d.cut_at
        }

        /// The image a restart finds: the durable one plus a random part of the rest.
        fn after_cut(&self, rng: &mut StdRng) -> Vec<u8> {
            let d = self.disk();
            let mut image = d.durable.clone();
            let mut pending: Vec<&(usize, Vec<u8>)> = d.pending.iter().collect();
            pending.shuffle(rng);
            for (offset, data) in pending {
                for (i, sector) in data.chunks(SECTOR).enumerate() {
                    if rng.gen_bool(0.5) {
                        let at = offset + i * SECTOR;
                        if image.len() < at + sector.len() {
                            image.resize(at + sector.len(), 0);
                        }
                        image[at..at + sector.len()].copy_from_slice(sector);
                    }
                }
            }
            image
        }
    }

    fn cut() -> io::Error {
        io::Error::other("power cut")
    }

    impl Disk {
        fn tick(&mut self) -> io::Result<()> {
            if self.ops >= self.cut_at {
                return Err(cut());
            }
            self.ops += 1;
            Ok(())
        }
    }

    impl redb::StorageBackend for FlakyDisk {
        fn len(&self) -> io::Result<u64> {
            Ok(self.disk().current.len() as u64)
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            let d = self.disk();
            let at = offset as usize;
            let src = d
                .current
                .get(at..at + out.len())
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
            out.copy_from_slice(src);
            Ok(())
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            let mut d = self.disk();
            d.tick()?;
            // File length changes are taken as durable at once (the file system journals them).
            d.current.resize(len as usize, 0);
            d.durable.resize(len as usize, 0);
            Ok(())
        }

        fn sync_data(&self) -> io::Result<()> {
            let mut d = self.disk();
            d.tick()?;
            d.durable = d.current.clone();
            d.pending.clear();
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            let mut d = self.disk();
            d.tick()?;
            let at = offset as usize;
            if d.current.len() < at + data.len() {
                d.current.resize(at + data.len(), 0);
            }
            d.current[at..at + data.len()].copy_from_slice(data);
            d.pending.push((at, data.to_vec()));
            Ok(())
        }
    }

    fn open(disk: &FlakyDisk) -> Result<RedbStore, StoreError> {
        let db = Database::builder().create_with_backend(disk.clone())?;
        RedbStore::from_db(db, PathBuf::from("flaky"), u64::MAX)
    }

    fn random_shard(rng: &mut StdRng) -> Vec<u8> {
        let len = if rng.gen_bool(0.3) {
            rng.gen_range(0..100)
        } else {
            rng.gen_range(0..=crate::MAX_SHARD_BYTES / 2)
        };
        let mut s = vec![0u8; len];
        rng.fill_bytes(&mut s);
        s
    }

    /// Cut the power at a random write or fsync during puts and deletes, many times: after
    /// the restart every put and delete that returned is there, the one in flight is wholly
    /// there or not at all, no shard reads back wrong, the counter matches, scrub is clean.
    #[test]
    fn power_cut_at_any_write_loses_nothing_acknowledged() {
        let seed: u64 = rand::random();
        eprintln!("power cut test seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let mut cut_during_op = 0;
        for trial in 0..60 {
            let disk = FlakyDisk::new(Vec::new());
            let store = open(&disk).unwrap();
            let mut present: BTreeMap<Address, usize> = BTreeMap::new();
            for _ in 0..3 {
                let s = random_shard(&mut rng);
                present.insert(store.put(&s).unwrap(), s.len());
            }
            let mut gone = BTreeSet::new();
            disk.cut_after(rng.gen_range(1..120));
            for _ in 0..10 {
                if !present.is_empty() && rng.gen_bool(0.3) {
                    let keys: Vec<Address> = present.keys().copied().collect();
                    let addr = keys[rng.gen_range(0..keys.len())];
                    // Cut during the delete: it may or may not have happened.
                    present.remove(&addr);
                    if store.delete(&addr).is_err() {
                        break;
                    }
                    gone.insert(addr);
                } else {
                    let s = random_shard(&mut rng);
                    match store.put(&s) {
                        Ok(a) => {
                            present.insert(a, s.len());
                            gone.remove(&a);
                        }
                        Err(_) => break,
                    }
                }
            }
            if disk.is_cut() {
                cut_during_op += 1;
            }
            drop(store);
            let image = disk.after_cut(&mut rng);

            let store = open(&FlakyDisk::new(image))
                .unwrap_or_else(|e| panic!("trial {trial}: restart after power cut: {e}"));
            let addrs = store.addresses().unwrap();
            let mut bytes = 0u64;
            for addr in &addrs {
                match store.get(addr) {
                    Ok(Some(b)) => bytes += b.len() as u64,
                    other => panic!("trial {trial}: shard {addr} after power cut: {other:?}"),
                }
            }
            assert_eq!(
                store.usage().unwrap().bytes,
                bytes,
                "trial {trial}: counter"
            );
            for (addr, len) in &present {
                assert_eq!(
                    store.get(addr).unwrap().map(|b| b.len()),
                    Some(*len),
                    "trial {trial}: acknowledged put lost"
                );
            }
            for addr in &gone {
                assert!(
                    !store.has(addr).unwrap(),
                    "trial {trial}: deleted shard is back"
                );
            }
            let extra = addrs.iter().filter(|a| !present.contains_key(a)).count();
            assert!(extra <= 1, "trial {trial}: {extra} unknown shards");
            assert!(store.scrub().unwrap().corrupt.is_empty(), "trial {trial}");
        }
        eprintln!("{cut_during_op} of 60 power cuts hit an operation");
        assert!(
            cut_during_op >= 30,
            "only {cut_during_op} of 60 cuts hit an operation"
        );
    }
}
