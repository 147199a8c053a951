//! ftreeFileMgr's disk jobs on the [`Index`], run off the actor like the shard cell's.

use std::path::PathBuf;
use std::sync::Arc;

use borg_files::FileId;
use borg_net::cell::{Work, WorkDone};
use borg_proto::identity::PublicKey;

use super::index::{Index, IndexError, Known, PutOutcome, Summary};

/// Where the index lives.
#[derive(Debug, Clone)]
pub enum Place {
    File(PathBuf),
    Memory,
}

/// Who gets the outcome of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// This node's part of client operation `q`.
    Op(u64),
    /// Peer `to` asked, with `q`.
    Peer(PublicKey, u64),
    /// A manifest `to` lacks (anti-entropy): send it as `file.index`.
    Sync(PublicKey),
}

pub enum Job {
    Open(Place),
    Put {
        owner: PublicKey,
        id: FileId,
        bytes: Vec<u8>,
        summary: Summary,
        reply: Reply,
    },
    Get {
        owner: PublicKey,
        id: FileId,
        reply: Reply,
    },
    Remove {
        owner: PublicKey,
        id: FileId,
        delete: Vec<u8>,
        reply: Reply,
    },
    Check {
        from: PublicKey,
        owner: PublicKey,
        ids: Vec<FileId>,
    },
}

#[allow(clippy::type_complexity)]
pub enum Done {
    Opened(Result<(Arc<Index>, Vec<(PublicKey, FileId, Summary)>, usize), IndexError>),
    Put {
        owner: PublicKey,
        id: FileId,
        summary: Summary,
        reply: Reply,
        result: Result<PutOutcome, IndexError>,
    },
    Got {
        reply: Reply,
        result: Result<Option<Vec<u8>>, IndexError>,
    },
    Removed {
        owner: PublicKey,
        id: FileId,
        reply: Reply,
        result: Result<bool, IndexError>,
    },
    Checked {
        from: PublicKey,
        owner: PublicKey,
        result: Result<Vec<(FileId, Known)>, IndexError>,
    },
}

impl Job {
    /// The closure the runtime runs; `index` is `None` only for `Open`.
    pub fn into_work(self, index: Option<Arc<Index>>) -> Work {
        Box::new(move || -> WorkDone { Box::new(self.run(index)) })
    }

    fn run(self, index: Option<Arc<Index>>) -> Done {
        let need = || index.clone().ok_or_else(|| IndexError("not open".into()));
        match self {
            Job::Open(place) => Done::Opened((|| {
                let index = match place {
                    Place::File(path) => Index::open(&path)?,
                    Place::Memory => Index::memory(),
                };
                let (all, bad) = index.load()?;
                Ok((Arc::new(index), all, bad))
            })()),
            Job::Put {
                owner,
                id,
                bytes,
                summary,
                reply,
            } => Done::Put {
                owner,
                id,
                summary,
                reply,
                result: need().and_then(|i| i.put(&owner, &id, &bytes)),
            },
            Job::Get { owner, id, reply } => Done::Got {
                reply,
                result: need().and_then(|i| i.get(&owner, &id)),
            },
            Job::Remove {
                owner,
                id,
                delete,
                reply,
            } => Done::Removed {
                owner,
                id,
                reply,
                result: need().and_then(|i| i.remove(&owner, &id, &delete)),
            },
            Job::Check { from, owner, ids } => Done::Checked {
                from,
                owner,
                result: need().and_then(|i| i.check(&owner, &ids)),
            },
        }
    }
}
