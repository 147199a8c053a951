//! # borg-store: the shard store of BorgIOS
//!
//! Data in the network lives as shards: byte strings of at most [`MAX_SHARD_BYTES`], each
//! named by its [`Address`], the SHA-256 of its bytes. This crate keeps a node's shards on its
//! disk. It knows nothing of manifests, peers or replication; it only promises that
//!
//! - a shard it hands out hashes to the address it was asked for (every read re-hashes; bytes
//!   that do not match are never returned, the entry is dropped and [`StoreError::Corrupt`]
//!   tells the caller to fetch it again),
//! - a put that returned `Ok` survives kill -9 and power loss (each put is its own durable
//!   redb transaction, fsynced before it returns),
//! - the stored bytes never exceed the budget it was opened with ([`StoreError::Full`]).
//!
//! - [`ShardStore`]: the trait the rest of the node uses (object-safe, `Send + Sync`).
//! - [`RedbStore`]: the on-disk store, one redb file.
//! - [`MemStore`]: the same rules in memory, for tests of other crates.
//! - [`Address`], [`StoreError`], [`Usage`], [`ScrubReport`].
//!
//! docs/STORAGE.md explains the durability and corruption rules in prose.
#![forbid(unsafe_code)]

mod address;
mod error;
mod mem;
mod redb_store;

pub use address::{Address, AddressError};
pub use error::StoreError;
pub use mem::MemStore;
pub use redb_store::RedbStore;

/// The largest shard a store accepts: 256 KiB.
pub const MAX_SHARD_BYTES: usize = 256 * 1024;

/// How full a store is. `bytes` counts shard bytes only, not the database's own overhead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Usage {
    /// Number of shards stored.
    pub shards: u64,
    /// Sum of the stored shards' lengths.
    pub bytes: u64,
    /// The most `bytes` may reach.
    pub budget: u64,
}

/// What a [`ShardStore::scrub`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ScrubReport {
    /// Shards whose bytes were read and hashed.
    pub checked: u64,
    /// Shards whose bytes did not hash to their address; they have been removed.
    pub corrupt: Vec<Address>,
}

/// A store of content-addressed shards.
///
/// All methods are synchronous and may block on disk I/O (an async caller runs them on a
/// blocking thread). Every method that changes the store has finished durably when it returns.
pub trait ShardStore: Send + Sync {
    /// Store `bytes` and return their address. Storing bytes that are already stored changes
    /// nothing and succeeds (also when the store is full).
    fn put(&self, bytes: &[u8]) -> Result<Address, StoreError>;

    /// Store `bytes` under `addr`, refusing them with [`StoreError::WrongAddress`] (and storing
    /// nothing) unless they hash to `addr`. For shards fetched from a peer by address.
    fn put_at(&self, addr: &Address, bytes: &[u8]) -> Result<(), StoreError>;

    /// The shard's bytes, re-hashed on this read: `Ok(None)` if it is not stored,
    /// [`StoreError::Corrupt`] (and the entry is removed) if the stored bytes do not match.
    fn get(&self, addr: &Address) -> Result<Option<Vec<u8>>, StoreError>;

    /// Whether a shard is stored under `addr` (its bytes are not read or checked).
    fn has(&self, addr: &Address) -> Result<bool, StoreError>;

    /// The stored length of the shard under `addr` (from the index; the bytes are not read),
    /// `None` if it is not stored.
    fn len_of(&self, addr: &Address) -> Result<Option<u64>, StoreError>;

    /// Remove a shard; removing one that is not stored succeeds.
    fn delete(&self, addr: &Address) -> Result<(), StoreError>;

    /// Shard count, stored bytes and budget.
    fn usage(&self) -> Result<Usage, StoreError>;

    /// Every stored address, sorted.
    fn addresses(&self) -> Result<Vec<Address>, StoreError>;

    /// Read and hash every shard; remove and report those that do not match their address.
    fn scrub(&self) -> Result<ScrubReport, StoreError>;
}

/// The budget rule, shared by the implementations: `wanted` more bytes fit if `used + wanted`
/// stays within `budget`.
fn check_budget(used: u64, budget: u64, wanted: usize) -> Result<(), StoreError> {
    let wanted = wanted as u64;
    match used.checked_add(wanted) {
        Some(total) if total <= budget => Ok(()),
        _ => Err(StoreError::Full {
            used,
            budget,
            wanted,
        }),
    }
}

/// The size rule, shared by the implementations.
fn check_size(bytes: &[u8]) -> Result<(), StoreError> {
    if bytes.len() > MAX_SHARD_BYTES {
        return Err(StoreError::TooLarge { len: bytes.len() });
    }
    Ok(())
}

/// The address rule of `put_at`, shared by the implementations.
fn check_address(addr: &Address, bytes: &[u8]) -> Result<(), StoreError> {
    let actual = Address::of(bytes);
    if actual != *addr {
        return Err(StoreError::WrongAddress {
            expected: *addr,
            actual,
        });
    }
    Ok(())
}
