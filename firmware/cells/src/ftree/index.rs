//! The durable manifest index of one ftreeFileMgr node: (owner, file id) -> the owner-signed
//! manifest envelope, and tombstones of deleted files so that a deleted manifest cannot be
//! put back by replaying it. One redb file (`<data>/files.redb`, each change its own durable
//! transaction, as the shard store), or memory for in-process tests. Blocking: the cell runs
//! every call as a job off its actor.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use borg_files::{open_manifest, FileId};
use borg_proto::identity::{PublicKey, PUBLIC_KEY_LEN};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

type Key = ([u8; PUBLIC_KEY_LEN], [u8; 32]);

const MANIFESTS: TableDefinition<Key, &[u8]> = TableDefinition::new("manifests");
/// Tombstones: the owner-signed delete envelope, the proof passed on to holders that missed it.
const DELETED: TableDefinition<Key, &[u8]> = TableDefinition::new("deleted");

/// redb's page cache here: manifests are read once per get.
const CACHE_BYTES: usize = 2 * 1024 * 1024;

/// An index failure (the disk or the database).
#[derive(Debug, Clone, thiserror::Error)]
#[error("manifest index: {0}")]
pub struct IndexError(pub String);

fn db_err(e: impl std::fmt::Display) -> IndexError {
    IndexError(e.to_string())
}

/// What storing a manifest did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    /// The same file was indexed already.
    Had,
    /// The file was deleted: its manifest is not taken back.
    Deleted,
}

/// A manifest as a listing shows it (kept in memory for every indexed file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub name: String,
    pub media_type: String,
    pub size: u64,
    pub created_ms: u64,
    pub shards: usize,
    /// Bytes of the stored manifest envelope.
    pub bytes: usize,
}

impl Summary {
    /// The summary of a manifest that [`open_manifest`] accepted.
    pub fn of(m: &borg_files::Manifest, bytes: usize) -> Summary {
        Summary {
            name: m.name().to_string(),
            media_type: m.media_type().to_string(),
            size: m.size(),
            created_ms: m.created_ms(),
            shards: m.shards().len(),
            bytes,
        }
    }
}

enum Backend {
    Redb(Database),
    Memory(Mutex<MemIndex>),
}

#[derive(Default)]
struct MemIndex {
    manifests: BTreeMap<Key, Vec<u8>>,
    deleted: BTreeMap<Key, Vec<u8>>,
}

/// What this node knows of one file ([`Index::check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    Have,
    Missing,
    /// Deleted: the owner's delete envelope.
    Deleted(Vec<u8>),
}

/// The index (see the module docs).
pub struct Index {
    backend: Backend,
}

fn key(owner: &PublicKey, id: &FileId) -> Key {
    (*owner.as_bytes(), *id.as_bytes())
}

impl Index {
    /// Open (or create) the index file at `path`.
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(db_err)?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        {
            tx.open_table(MANIFESTS).map_err(db_err)?;
            tx.open_table(DELETED).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(Index {
            backend: Backend::Redb(db),
        })
    }

    /// An index in memory (tests).
    pub fn memory() -> Index {
        Index {
            backend: Backend::Memory(Mutex::new(MemIndex::default())),
        }
    }

    fn mem(&self) -> Option<std::sync::MutexGuard<'_, MemIndex>> {
        match &self.backend {
            // A poisoned lock means a test thread panicked mid-call; the map is still whole.
            Backend::Memory(m) => Some(m.lock().unwrap_or_else(|p| p.into_inner())),
            Backend::Redb(_) => None,
        }
    }

    /// Store `bytes` (a manifest already opened and checked) under (`owner`, `id`).
    pub fn put(
        &self,
        owner: &PublicKey,
        id: &FileId,
        bytes: &[u8],
    ) -> Result<PutOutcome, IndexError> {
        let k = key(owner, id);
        if let Some(mut m) = self.mem() {
            if m.deleted.contains_key(&k) {
                return Ok(PutOutcome::Deleted);
            }
            if m.manifests.contains_key(&k) {
                return Ok(PutOutcome::Had);
            }
            m.manifests.insert(k, bytes.to_vec());
            return Ok(PutOutcome::Stored);
        }
        let Backend::Redb(db) = &self.backend else {
            return Err(IndexError("no backend".into()));
        };
        let mut tx = db.begin_write().map_err(db_err)?;
        tx.set_durability(Durability::Immediate).map_err(db_err)?;
        let outcome = {
            let deleted = tx.open_table(DELETED).map_err(db_err)?;
            let mut manifests = tx.open_table(MANIFESTS).map_err(db_err)?;
            if deleted.get(k).map_err(db_err)?.is_some() {
                PutOutcome::Deleted
            } else if manifests.get(k).map_err(db_err)?.is_some() {
                PutOutcome::Had
            } else {
                manifests.insert(k, bytes).map_err(db_err)?;
                PutOutcome::Stored
            }
        };
        if outcome == PutOutcome::Stored {
            tx.commit().map_err(db_err)?;
        } else {
            tx.abort().map_err(db_err)?;
        }
        Ok(outcome)
    }

    /// The manifest of (`owner`, `id`), if indexed here.
    pub fn get(&self, owner: &PublicKey, id: &FileId) -> Result<Option<Vec<u8>>, IndexError> {
        let k = key(owner, id);
        if let Some(m) = self.mem() {
            return Ok(m.manifests.get(&k).cloned());
        }
        let Backend::Redb(db) = &self.backend else {
            return Err(IndexError("no backend".into()));
        };
        let tx = db.begin_read().map_err(db_err)?;
        let t = tx.open_table(MANIFESTS).map_err(db_err)?;
        Ok(t.get(k).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// Delete (`owner`, `id`) and keep `delete` (the owner's signed delete, already checked)
    /// as its tombstone; whether a manifest was removed. A delete of a file not indexed here
    /// changes nothing (so deletes cannot fill the tombstones).
    pub fn remove(
        &self,
        owner: &PublicKey,
        id: &FileId,
        delete: &[u8],
    ) -> Result<bool, IndexError> {
        let k = key(owner, id);
        if let Some(mut m) = self.mem() {
            if m.manifests.remove(&k).is_none() {
                return Ok(false);
            }
            m.deleted.insert(k, delete.to_vec());
            return Ok(true);
        }
        let Backend::Redb(db) = &self.backend else {
            return Err(IndexError("no backend".into()));
        };
        let mut tx = db.begin_write().map_err(db_err)?;
        tx.set_durability(Durability::Immediate).map_err(db_err)?;
        let removed = {
            let mut manifests = tx.open_table(MANIFESTS).map_err(db_err)?;
            let r = manifests.remove(k).map_err(db_err)?.is_some();
            if r {
                let mut deleted = tx.open_table(DELETED).map_err(db_err)?;
                deleted.insert(k, delete).map_err(db_err)?;
            }
            r
        };
        if removed {
            tx.commit().map_err(db_err)?;
        } else {
            tx.abort().map_err(db_err)?;
        }
        Ok(removed)
    }

    /// What this node knows of each of `ids` of `owner`.
    pub fn check(
        &self,
        owner: &PublicKey,
        ids: &[FileId],
    ) -> Result<Vec<(FileId, Known)>, IndexError> {
        if let Some(m) = self.mem() {
            return Ok(ids
                .iter()
                .map(|id| {
                    let k = key(owner, id);
                    let known = match (m.deleted.get(&k), m.manifests.contains_key(&k)) {
                        (Some(d), _) => Known::Deleted(d.clone()),
                        (None, true) => Known::Have,
                        (None, false) => Known::Missing,
                    };
                    (*id, known)
                })
                .collect());
        }
        let Backend::Redb(db) = &self.backend else {
            return Err(IndexError("no backend".into()));
        };
        let tx = db.begin_read().map_err(db_err)?;
        let manifests = tx.open_table(MANIFESTS).map_err(db_err)?;
        let deleted = tx.open_table(DELETED).map_err(db_err)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let k = key(owner, id);
            let known = if let Some(d) = deleted.get(k).map_err(db_err)? {
                Known::Deleted(d.value().to_vec())
            } else if manifests.get(k).map_err(db_err)?.is_some() {
                Known::Have
            } else {
                Known::Missing
            };
            out.push((*id, known));
        }
        Ok(out)
    }

    /// Every indexed file with its summary (read once at start; a stored manifest that no
    /// longer opens is skipped and reported in the count of the second value).
    #[allow(clippy::type_complexity)]
    pub fn load(&self) -> Result<(Vec<(PublicKey, FileId, Summary)>, usize), IndexError> {
        let mut out = Vec::new();
        let mut bad = 0;
        let mut take = |bytes: &[u8]| match open_manifest(bytes) {
            Ok(m) => out.push((m.owner(), m.id(), Summary::of(m.manifest(), bytes.len()))),
            Err(_) => bad += 1,
        };
        if let Some(m) = self.mem() {
            for v in m.manifests.values() {
                take(v);
            }
        } else if let Backend::Redb(db) = &self.backend {
            let tx = db.begin_read().map_err(db_err)?;
            let t = tx.open_table(MANIFESTS).map_err(db_err)?;
            for row in t.iter().map_err(db_err)? {
                let (_, v) = row.map_err(db_err)?;
                take(v.value());
            }
        }
        Ok((out, bad))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use borg_files::{encrypt_reader, seal_manifest, wrap_key, FileKey, Manifest, UserKeys};
    use borg_proto::identity::SecretKey;

    /// A real manifest of a small file (a test helper for the cell's tests too).
    pub(crate) fn manifest(user: &UserKeys, name: &str) -> (FileId, Vec<u8>) {
        let mut rng = rand::thread_rng();
        let key = FileKey::generate(&mut rng);
        let salt = [2u8; 16];
        let enc = encrypt_reader(&b"abc"[..], &key, &salt, &[], |_, _| Ok(())).unwrap();
        let wrapped = wrap_key(&mut rng, &key, &user.encryption_public()).unwrap();
        let m = Manifest::new(name, "text/plain", 1_700_000_000_000, salt, enc, wrapped).unwrap();
        let (id, env) = seal_manifest(&mut rng, user.signing(), &m, 1_700_000_000_000).unwrap();
        (id, env.to_bytes())
    }

    fn check(index: &Index) {
        let user = UserKeys::from_keys(SecretKey::generate(), SecretKey::generate());
        let (id, bytes) = manifest(&user, "a.txt");
        let owner = user.owner();
        assert_eq!(index.put(&owner, &id, &bytes).unwrap(), PutOutcome::Stored);
        assert_eq!(index.put(&owner, &id, &bytes).unwrap(), PutOutcome::Had);
        assert_eq!(index.get(&owner, &id).unwrap().unwrap(), bytes);
        let (all, bad) = index.load().unwrap();
        assert_eq!((all.len(), bad), (1, 0));
        assert_eq!(all[0].2.name, "a.txt");
        assert_eq!(index.check(&owner, &[id]).unwrap()[0].1, Known::Have);
        assert!(index.remove(&owner, &id, b"proof").unwrap());
        assert_eq!(
            index.check(&owner, &[id]).unwrap()[0].1,
            Known::Deleted(b"proof".to_vec())
        );
        assert_eq!(index.get(&owner, &id).unwrap(), None);
        assert_eq!(
            index.put(&owner, &id, &bytes).unwrap(),
            PutOutcome::Deleted,
            "a deleted manifest is not taken back"
        );
        assert!(!index.remove(&owner, &id, b"proof").unwrap());
    }

    #[test]
    fn put_get_remove_and_tombstones_in_memory_and_on_disk() {
        check(&Index::memory());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("files.redb");
        check(&Index::open(&path).unwrap());
        // Reopened: the tombstone is still there.
        let user = UserKeys::from_keys(SecretKey::generate(), SecretKey::generate());
        let (id, bytes) = manifest(&user, "b.txt");
        {
            let index = Index::open(&path).unwrap();
            index.put(&user.owner(), &id, &bytes).unwrap();
        }
        let index = Index::open(&path).unwrap();
        assert_eq!(index.load().unwrap().0.len(), 1);
    }
}
