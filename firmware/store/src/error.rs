//! The one error type of the store, with its wire codes and HTTP statuses in one place.

use crate::{Address, MAX_SHARD_BYTES};

/// Why a store operation failed. [`StoreError::code`] is the wire error code and
/// [`StoreError::http_status`] the status a server answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The shard is larger than [`MAX_SHARD_BYTES`].
    #[error("shard is {len} bytes, more than the limit of {MAX_SHARD_BYTES}")]
    TooLarge { len: usize },
    /// `put_at` was given bytes that do not hash to the address.
    #[error("shard bytes hash to {actual}, not to the address {expected} they were given for")]
    WrongAddress { expected: Address, actual: Address },
    /// Storing the shard would take the stored bytes over the budget; nothing was changed.
    #[error("shard store is full: {used} of {budget} bytes used, {wanted} more wanted")]
    Full { used: u64, budget: u64, wanted: u64 },
    /// The stored bytes no longer hash to their address. They were not returned, and the entry
    /// was removed so that the shard can be fetched again.
    #[error(
        "stored shard {addr} was corrupt (its bytes no longer hash to its address) and was removed"
    )]
    Corrupt { addr: Address },
    /// The file system failed (open, create, read, write, fsync).
    #[error("shard store I/O error: {0}")]
    Io(String),
    /// The database refused or failed (locked by another process, not a database, damaged).
    #[error("shard store database error: {0}")]
    Db(String),
}

impl StoreError {
    /// The error code used on the wire (`{"error":"<code>",...}`) and in metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::TooLarge { .. } => "too_large",
            StoreError::WrongAddress { .. } => "wrong_address",
            StoreError::Full { .. } => "full",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::Io(_) | StoreError::Db(_) => "io",
        }
    }

    /// The HTTP status for this error when it answers a request: 413 Content Too Large,
    /// 400 Bad Request, 507 Insufficient Storage, 500 for our own failures.
    pub fn http_status(&self) -> u16 {
        match self {
            StoreError::TooLarge { .. } => 413,
            StoreError::WrongAddress { .. } => 400,
            StoreError::Full { .. } => 507,
            StoreError::Corrupt { .. } | StoreError::Io(_) | StoreError::Db(_) => 500,
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> StoreError {
        StoreError::Io(e.to_string())
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}

from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses() {
        let a = Address::of(b"x");
        let cases = [
            (StoreError::TooLarge { len: 1 }, "too_large", 413),
            (
                StoreError::WrongAddress {
                    expected: a,
                    actual: a,
                },
                "wrong_address",
                400,
            ),
            (
                StoreError::Full {
                    used: 1,
                    budget: 2,
                    wanted: 3,
                },
                "full",
                507,
            ),
            (StoreError::Corrupt { addr: a }, "corrupt", 500),
            (StoreError::Io("disk".into()), "io", 500),
            (StoreError::Db("db".into()), "io", 500),
        ];
        for (e, code, status) in cases {
            assert_eq!((e.code(), e.http_status()), (code, status), "{e}");
        }
    }
}
