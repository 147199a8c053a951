//! [`MemStore`]: the shard store rules in memory, for tests of other crates.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::{
    check_address, check_budget, check_size, Address, ScrubReport, ShardStore, StoreError, Usage,
};

/// A [`ShardStore`] in a `HashMap` behind a `Mutex`, with the same rules as
/// [`RedbStore`](crate::RedbStore): budget, size limit, re-hash on read, scrub. Nothing
/// survives the process.
#[derive(Debug)]
pub struct MemStore {
    inner: Mutex<Inner>,
    budget: u64,
}

#[derive(Debug, Default)]
struct Inner {
    shards: HashMap<Address, Vec<u8>>,
    bytes: u64,
}

impl Inner {
    fn remove(&mut self, addr: &Address) {
        if let Some(old) = self.shards.remove(addr) {
            self.bytes = self.bytes.saturating_sub(old.len() as u64);
        }
    }
}

impl MemStore {
    /// An empty store that holds at most `budget` shard bytes.
    pub fn new(budget: u64) -> MemStore {
        MemStore {
            inner: Mutex::new(Inner::default()),
            budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change to Inner completes without a panic point in between, so a poisoned
        // lock still guards consistent state.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// For tests: replace the bytes stored under `addr` without any check, as a failing disk
    /// would. Returns whether a shard was stored there. The byte count follows the new length.
    pub fn tamper(&self, addr: &Address, bytes: Vec<u8>) -> bool {
        let mut inner = self.lock();
        let new_len = bytes.len() as u64;
        match inner.shards.get_mut(addr) {
            Some(slot) => {
                let old_len = std::mem::replace(slot, bytes).len() as u64;
                inner.bytes = inner.bytes.saturating_sub(old_len) + new_len;
                true
            }
            None => false,
        }
    }

    fn insert(&self, addr: Address, bytes: &[u8]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let old_len = match inner.shards.get(&addr) {
            // Content addressing: the same address means the same bytes, unless the stored
            // copy went bad, in which case the caller's good copy replaces it.
            Some(old) if old.as_slice() == bytes => return Ok(()),
            Some(old) => old.len() as u64,
            None => 0,
        };
        let used = inner.bytes.saturating_sub(old_len);
        check_budget(used, self.budget, bytes.len())?;
        inner.shards.insert(addr, bytes.to_vec());
        inner.bytes = used + bytes.len() as u64;
        Ok(())
    }
}

impl ShardStore for MemStore {
    fn put(&self, bytes: &[u8]) -> Result<Address, StoreError> {
        check_size(bytes)?;
        let addr = Address::of(bytes);
        self.insert(addr, bytes)?;
        Ok(addr)
    }

    fn put_at(&self, addr: &Address, bytes: &[u8]) -> Result<(), StoreError> {
        check_size(bytes)?;
        check_address(addr, bytes)?;
        self.insert(*addr, bytes)
    }

    fn get(&self, addr: &Address) -> Result<Option<Vec<u8>>, StoreError> {
        let mut inner = self.lock();
        let Some(bytes) = inner.shards.get(addr) else {
            return Ok(None);
        };
        if addr.matches(bytes) {
            return Ok(Some(bytes.clone()));
        }
        inner.remove(addr);
        Err(StoreError::Corrupt { addr: *addr })
    }

    fn has(&self, addr: &Address) -> Result<bool, StoreError> {
        Ok(self.lock().shards.contains_key(addr))
    }

    fn len_of(&self, addr: &Address) -> Result<Option<u64>, StoreError> {
        Ok(self.lock().shards.get(addr).map(|b| b.len() as u64))
    }

    fn delete(&self, addr: &Address) -> Result<(), StoreError> {
        self.lock().remove(addr);
        Ok(())
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        let inner = self.lock();
        Ok(Usage {
            shards: inner.shards.len() as u64,
            bytes: inner.bytes,
            budget: self.budget,
        })
    }

    fn addresses(&self) -> Result<Vec<Address>, StoreError> {
        let mut all: Vec<Address> = self.lock().shards.keys().copied().collect();
        all.sort_unstable();
        Ok(all)
    }

    fn scrub(&self) -> Result<ScrubReport, StoreError> {
        let mut inner = self.lock();
        let mut corrupt: Vec<Address> = inner
            .shards
            .iter()
            .filter(|(addr, bytes)| !addr.matches(bytes))
            .map(|(addr, _)| *addr)
            .collect();
        corrupt.sort_unstable();
        let checked = inner.shards.len() as u64;
        for addr in &corrupt {
            inner.remove(addr);
        }
        Ok(ScrubReport { checked, corrupt })
    }
}
