//! The shard cell's disk: jobs on the [`ShardStore`] that run off the actor (each durable put
//! is two fsyncs), and what they return. The cell stays sans-IO: it builds a [`Job`], the
//! runtime runs [`Job::into_work`] on a blocking thread, and the [`Done`] comes back to
//! `handle_work_done`.

use std::path::PathBuf;
use std::sync::Arc;

use borg_net::cell::{Work, WorkDone};
use borg_proto::identity::PublicKey;
use borg_proto::stream::frame::Want;
use borg_store::{Address, MemStore, RedbStore, ScrubReport, ShardStore, StoreError, Usage};

/// Where the store lives: a redb file, memory, or a store the caller made (tests).
#[derive(Clone)]
pub enum Place {
    File { path: PathBuf, budget: u64 },
    Memory { budget: u64 },
    Given(Arc<dyn ShardStore>),
}

/// Which pull a received shard belongs to: (offerer, stream, index in the pull's plan).
pub type PullSlot = (PublicKey, u32, usize);

/// One piece of disk work.
pub enum Job {
    Open(Place),
    /// Every stored address and its length (to tell the repair planner what this node holds).
    List,
    /// Which of `addrs` are stored, with their lengths: to offer them to `to` on `stream`.
    Offer {
        to: PublicKey,
        stream: u32,
        addrs: Vec<Address>,
    },
    /// Store a shard a pull received (its bytes already hashed to `addr` by the receiver).
    Store {
        slot: PullSlot,
        addr: Address,
        bytes: Vec<u8>,
    },
    /// Read a shard for a peer's `Want`.
    Serve {
        to: PublicKey,
        want: Want,
    },
    Has {
        from: PublicKey,
        addrs: Vec<Address>,
    },
    Delete(Address),
    Usage,
    Scrub,
    /// Store a shard a client gave (`shard.put`), answering receptor request `ticket`.
    Put {
        ticket: u64,
        addr: Address,
        bytes: Vec<u8>,
    },
    /// Read a shard for clients (`shard.get`).
    Read(Address),
}

/// What a job gave.
pub enum Done {
    Opened(Result<Arc<dyn ShardStore>, StoreError>),
    Listed(Result<Vec<(Address, u64)>, StoreError>),
    Offer {
        to: PublicKey,
        stream: u32,
        result: Result<Vec<(Address, Option<u64>)>, StoreError>,
    },
    Stored {
        slot: PullSlot,
        addr: Address,
        len: u64,
        result: Result<(), StoreError>,
    },
    Served {
        to: PublicKey,
        want: Want,
        result: Result<Option<Vec<u8>>, StoreError>,
    },
    Has {
        from: PublicKey,
        result: Result<Vec<(Address, bool)>, StoreError>,
    },
    Deleted(Address, Result<(), StoreError>),
    Usage(Result<Usage, StoreError>),
    Scrubbed(Result<ScrubReport, StoreError>),
    Put {
        ticket: u64,
        addr: Address,
        len: u64,
        result: Result<(), StoreError>,
    },
    Read(Address, Result<Option<Vec<u8>>, StoreError>),
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
            Job::Open(Place::Given(s)) => Done::Opened(Ok(s)),
            Job::List => Done::Listed(need().and_then(|s| {
                let mut out = Vec::new();
                for a in s.addresses()? {
                    if let Some(len) = s.len_of(&a)? {
                        out.push((a, len));
                    }
                }
                Ok(out)
            })),
            Job::Offer { to, stream, addrs } => Done::Offer {
                to,
                stream,
                result: need().and_then(|s| {
                    addrs
                        .into_iter()
                        .map(|a| s.len_of(&a).map(|l| (a, l)))
                        .collect()
                }),
            },
            Job::Store { slot, addr, bytes } => Done::Stored {
                slot,
                addr,
                len: bytes.len() as u64,
                result: need().and_then(|s| s.put_at(&addr, &bytes)),
            },
            Job::Serve { to, want } => Done::Served {
                to,
                want,
                result: need().and_then(|s| s.get(&Address::from_bytes(want.addr))),
            },
            Job::Has { from, addrs } => Done::Has {
                from,
                result: need().and_then(|s| {
                    addrs
                        .into_iter()
                        .map(|a| s.has(&a).map(|h| (a, h)))
                        .collect()
                }),
            },
            Job::Delete(a) => Done::Deleted(a, need().and_then(|s| s.delete(&a))),
            Job::Usage => Done::Usage(need().and_then(|s| s.usage())),
            Job::Scrub => Done::Scrubbed(need().and_then(|s| s.scrub())),
            Job::Put {
                ticket,
                addr,
                bytes,
            } => Done::Put {
                ticket,
                addr,
                len: bytes.len() as u64,
                result: need().and_then(|s| s.put_at(&addr, &bytes)),
            },
            Job::Read(a) => Done::Read(a, need().and_then(|s| s.get(&a))),
        }
    }
}
