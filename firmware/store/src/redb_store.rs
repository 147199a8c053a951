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

/// redb's page cache. Its default (1 GiB) let a store holding 10,000 shards of 4 KiB take
/// 88 MB of resident memory; shards are read once per get or scrub and hashed, so a cache
/// buys little, and a Pi has other cells to run (`tests/figures.rs`).
const CACHE_BYTES: usize = 4 * 1024 * 1024;

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
            .set_cache_size(CACHE_BYTES)
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

    fn len_of(&self, addr: &Address) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(INDEX)?;
        Ok(index.get(addr.as_bytes())?.map(|v| v.value()))
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
mod tests;

#[cfg(test)]
mod power_loss;
