//! The shard cell's disk: jobs on the [`ShardStore`] that run off the actor (each durable put
//! is two fsyncs), and what they return. The cell stays sans-IO: it builds a [`Job`], the
//! runtime runs [`Job::into_work`] on a blocking thread, and the [`Done`] comes back to
//! `handle_work_done`.

use std::path::PathBuf;
use std::sync::Arc;

use borg_net::cell::{Work, WorkDone};
use borg_store::{Address, MemStore, RedbStore, ScrubReport, ShardStore, StoreError, Usage};

/// Where the store lives: a redb file, or memory (in-memory tests).
#[derive(Debug, Clone)]
pub enum Place {
    File { path: PathBuf, budget: u64 },
    Memory { budget: u64 },
}

/// One piece of disk work.
pub enum Job {
    Open(Place),
    Put { addr: Address, bytes: Vec<u8> },
    Get(Address),
    Has(Vec<Address>),
    Usage,
    Scrub,
}

/// What a job gave.
pub enum Done {
    Opened(Result<Arc<dyn ShardStore>, StoreError>),
    Put {
        addr: Address,
        result: Result<(), StoreError>,
    },
    Got {
        addr: Address,
        result: Result<Option<Vec<u8>>, StoreError>,
    },
    Has(Result<Vec<(Address, bool)>, StoreError>),
    Usage(Result<Usage, StoreError>),
    Scrubbed(Result<ScrubReport, StoreError>),
}

impl Job {
    /// The closure the runtime runs on a blocking thread. `store` is `None` only for `Open`.
    pub fn into_work(self, store: Option<Arc<dyn ShardStore>>) -> Work {
        Box::new(move || -> WorkDone { Box::new(self.run(store)) })
    }

    fn run(self, store: Option<Arc<dyn ShardStore>>) -> Done {
        let need = || {
            store
                .clone()
                .ok_or_else(|| StoreError::Io("the store is not open".into()))
        };
        match self {
            Job::Open(Place::File { path, budget }) => Done::Opened(
                RedbStore::open(&path, budget).map(|s| Arc::new(s) as Arc<dyn ShardStore>),
            ),
            Job::Open(Place::Memory { budget }) => {
                Done::Opened(Ok(Arc::new(MemStore::new(budget)) as Arc<dyn ShardStore>))
            }
            Job::Put { addr, bytes } => Done::Put {
                addr,
                result: need().and_then(|s| s.put_at(&addr, &bytes)),
            },
            Job::Get(addr) => Done::Got {
                addr,
                result: need().and_then(|s| s.get(&addr)),
            },
            Job::Has(addrs) => Done::Has(need().and_then(|s| {
                addrs
                    .into_iter()
                    .map(|a| s.has(&a).map(|h| (a, h)))
                    .collect()
            })),
            Job::Usage => Done::Usage(need().and_then(|s| s.usage())),
            Job::Scrub => Done::Scrubbed(need().and_then(|s| s.scrub())),
        }
    }
}
