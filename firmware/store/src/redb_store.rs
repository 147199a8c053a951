//! [`RedbStore`]: shards in one redb file, each change its own durable transaction.
//!
//! Layout: table `shards` maps the 32 address bytes to the shard bytes; table `meta` holds
//! `stored_bytes`, the sum of the shard lengths, changed in the same write transaction as the
//! shards so the two can never disagree after a crash. Every write transaction commits with
//! immediate durability and quick repair (which implies redb's two-phase commit): `commit`
//! returns only after the data and then the commit slot have been fsynced, and reopening after
//! a crash does not walk the whole file.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};

use crate::{
    check_address, check_budget, check_size, Address, ScrubReport, ShardStore, StoreError, Usage,
};

const SHARDS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("shards");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const STORED_BYTES: &str = "stored_bytes";

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
        let store = RedbStore {
            db,
            path: path.to_path_buf(),
            budget,
        };
        store.init()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Create the tables and the byte counter on first open.
    fn init(&self) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        let fresh = {
            let shards = txn.open_table(SHARDS)?;
            let meta = txn.open_table(META)?;
            let has_counter = meta.get(STORED_BYTES)?.is_some();
            // A new database (or one missing its counter, never written by us): count.
            if has_counter {
                None
            } else {
                Some(sum_lengths(&shards)?)
            }
        };
        match fresh {
            Some(bytes) => {
                txn.open_table(META)?.insert(STORED_BYTES, bytes)?;
                txn.commit()?;
            }
            None => txn.abort()?,
        }
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
            let mut shards = txn.open_table(SHARDS)?;
            let mut meta = txn.open_table(META)?;
            let used = counter(&meta)?;
            let old_len = match shards.get(addr.as_bytes())? {
                // Content addressing: the same address means the same bytes, unless the stored
                // copy went bad, in which case the caller's good copy replaces it.
                Some(old) if old.value() == bytes => None,
                Some(old) => Some(old.value().len() as u64),
                None => Some(0),
            };
            match old_len {
                None => Decision::NoOp,
                Some(old_len) => {
                    let used = used.saturating_sub(old_len);
                    match check_budget(used, self.budget, bytes.len()) {
                        Err(e) => Decision::Refuse(e),
                        Ok(()) => {
                            shards.insert(addr.as_bytes(), bytes)?;
                            meta.insert(STORED_BYTES, used + bytes.len() as u64)?;
                            Decision::Write
                        }
                    }
                }
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

    /// In one transaction, remove those of `addrs` whose stored bytes (read again inside the
    /// transaction, as another thread may have replaced them) do not hash to their address,
    /// and add `fix` to the byte counter. Returns the addresses removed.
    fn remove_corrupt(&self, addrs: &[Address], fix: i128) -> Result<Vec<Address>, StoreError> {
        let txn = self.begin_write()?;
        let mut removed = Vec::new();
        {
            let mut shards = txn.open_table(SHARDS)?;
            let mut meta = txn.open_table(META)?;
            let mut bytes = i128::from(counter(&meta)?) + fix;
            for addr in addrs {
                let bad_len = match shards.get(addr.as_bytes())? {
                    Some(v) if !addr.matches(v.value()) => Some(v.value().len()),
                    _ => None,
                };
                if let Some(len) = bad_len {
                    shards.remove(addr.as_bytes())?;
                    bytes -= len as i128;
                    removed.push(*addr);
                }
            }
            let bytes = u64::try_from(bytes.max(0)).unwrap_or(u64::MAX);
            meta.insert(STORED_BYTES, bytes)?;
        }
        txn.commit()?;
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
        let bytes = {
            let txn = self.db.begin_read()?;
            let shards = txn.open_table(SHARDS)?;
            let Some(v) = shards.get(addr.as_bytes())? else {
                return Ok(None);
            };
            v.value().to_vec()
        };
        if addr.matches(&bytes) {
            return Ok(Some(bytes));
        }
        self.remove_corrupt(&[*addr], 0)?;
        Err(StoreError::Corrupt { addr: *addr })
    }

    fn has(&self, addr: &Address) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let shards = txn.open_table(SHARDS)?;
        Ok(shards.get(addr.as_bytes())?.is_some())
    }

    fn delete(&self, addr: &Address) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        let removed = {
            let mut shards = txn.open_table(SHARDS)?;
            let mut meta = txn.open_table(META)?;
            let old_len = shards
                .remove(addr.as_bytes())?
                .map(|v| v.value().len() as u64);
            if let Some(len) = old_len {
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
        let shards = txn.open_table(SHARDS)?;
        let meta = txn.open_table(META)?;
        Ok(Usage {
            shards: shards.len()?,
            bytes: counter(&meta)?,
            budget: self.budget,
        })
    }

    fn addresses(&self) -> Result<Vec<Address>, StoreError> {
        let txn = self.db.begin_read()?;
        let shards = txn.open_table(SHARDS)?;
        let mut all = Vec::new();
        for entry in shards.iter()? {
            let (k, _) = entry?;
            all.push(Address::from_bytes(k.value()));
        }
        // redb iterates in key order already; sorting keeps the promise independent of that.
        all.sort_unstable();
        Ok(all)
    }

    fn scrub(&self) -> Result<ScrubReport, StoreError> {
        let (checked, suspects, counted, sum) = {
            let txn = self.db.begin_read()?;
            let shards = txn.open_table(SHARDS)?;
            let meta = txn.open_table(META)?;
            let mut checked = 0u64;
            let mut sum = 0u64;
            let mut suspects = Vec::new();
            for entry in shards.iter()? {
                let (k, v) = entry?;
                let addr = Address::from_bytes(k.value());
                let bytes = v.value();
                checked += 1;
                sum += bytes.len() as u64;
                if !addr.matches(bytes) {
                    suspects.push(addr);
                }
            }
            (checked, suspects, counter(&meta)?, sum)
        };
        // The counter is kept in the same transactions as the shards, so it only disagrees
        // with them if its own page went bad; then it is set right from this snapshot.
        let fix = i128::from(sum) - i128::from(counted);
        let corrupt = if suspects.is_empty() && fix == 0 {
            Vec::new()
        } else {
            self.remove_corrupt(&suspects, fix)?
        };
        Ok(ScrubReport { checked, corrupt })
    }
}

fn counter(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64, StoreError> {
    Ok(meta.get(STORED_BYTES)?.map(|v| v.value()).unwrap_or(0))
}

fn sum_lengths(shards: &impl ReadableTable<[u8; 32], &'static [u8]>) -> Result<u64, StoreError> {
    let mut sum = 0u64;
    for entry in shards.iter()? {
        let (_, v) = entry?;
        sum += v.value().len() as u64;
    }
    Ok(sum)
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
