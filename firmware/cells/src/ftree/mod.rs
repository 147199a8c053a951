//! ftreeFileMgr: who owns which files, as a cell (DNA 13351/13381/13341, k=3).
//!
//! - **The index**: each node keeps owner-signed manifests (`file.manifest` envelopes, see
//!   `borg_files`) by (owner, file id) in `<data>/files.redb` ([`index`]), with tombstones of
//!   deleted files, and a summary of each in memory for listings.
//! - **Placement**: an owner's manifests live on the top [`INDEX_REPLICAS`] members by
//!   rendezvous hashing of `SHA-256("borg-owner-v1" || owner key)` over this tree's members
//!   (announced by broadcast, as the shard cell's); a node takes an owner's manifests only if
//!   it ranks within [`INDEX_REPLICAS`] + [`INDEX_SPARE`] for that owner.
//! - **Clients** ([`ops`]): `file.put`, `file.get`, `file.ls`, `file.rm` on the receptor, each
//!   signed by the owner; the receiving node asks the owner's holders (itself included when
//!   it is one) and answers when enough did.
//! - **Anti-entropy**: every holder periodically tells the owner's other holders which files
//!   it has (`file.sync`); they ask for the ones they lack (`file.need`) and pass on the
//!   owner's signed delete for the ones they know were deleted, so a holder that was down or
//!   newly ranked catches up and a deleted file does not come back.
//!
//! Only the owner's signature stores or deletes a manifest: every manifest and every delete is
//! checked against it wherever it arrives, whoever forwards it.

pub mod disk;
pub mod index;
mod ops;
pub mod wire;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use borg_files::{open_manifest, FileId};
use borg_net::cell::{Cell, CellAction, CellError, CellInit, CellTime, Work, WorkDone};
use borg_proto::identity::PublicKey;
use borg_proto::shard::members::DirConfig;
use borg_proto::tree::TreeView;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::members::Membership;
use disk::{Done, Job, Place, Reply};
use index::{Index, Known, PutOutcome, Summary};

/// Copies of each owner's index.
pub const INDEX_REPLICAS: usize = 3;
/// Ranks below the replicas that still take an owner's manifests (members come and go).
pub const INDEX_SPARE: usize = 2;
/// Files indexed on one node at most, and per owner.
pub const MAX_FILES: usize = 100_000;
pub const MAX_FILES_PER_OWNER: usize = 10_000;
/// Manifest bytes indexed on one node at most.
pub const MAX_INDEX_BYTES: usize = 512 << 20;
/// Disk jobs waiting at most; peers' requests may take half.
pub const MAX_JOBS_QUEUED: usize = 512;
/// Owners whose files are offered to co-holders per anti-entropy round.
const SYNC_OWNERS_PER_ROUND: usize = 64;

/// Timings.
#[derive(Debug, Clone)]
pub struct FtreeConfig {
    pub dir: DirConfig,
    pub announce_ms: u64,
    pub sync_ms: u64,
}

impl Default for FtreeConfig {
    fn default() -> Self {
        Self {
            dir: DirConfig::default(),
            announce_ms: 60_000,
            sync_ms: 5 * 60_000,
        }
    }
}

impl FtreeConfig {
    /// Timings of seconds for a demo or test network (`BORG_SHARD_QUICK=1`).
    pub fn quick() -> Self {
        Self {
            dir: DirConfig {
                ttl_ms: 8_000,
                probation_ms: 1_000,
                ..DirConfig::default()
            },
            announce_ms: 2_000,
            sync_ms: 3_000,
        }
    }

    pub fn from_env() -> Self {
        if std::env::var(crate::shard::QUICK_ENV).is_ok_and(|v| v.trim() == "1") {
            Self::quick()
        } else {
            Self::default()
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    indexed: u64,
    refused: u64,
    removed: u64,
    job_errors: u64,
    jobs_refused: u64,
    synced_out: u64,
    not_member: u64,
    bad_stored: usize,
}

/// The ftreeFileMgr cell.
pub struct FtreeCell {
    me: PublicKey,
    index: Option<Arc<Index>>,
    index_error: Option<String>,
    jobs: VecDeque<Job>,
    out: VecDeque<CellAction>,
    members: Membership,
    /// What is indexed here, by owner.
    files: BTreeMap<PublicKey, BTreeMap<FileId, Summary>>,
    n_files: usize,
    n_bytes: usize,
    ops: ops::Ops,
    next_sync: u64,
    sync_ms: u64,
    sync_cursor: Option<PublicKey>,
    stats: Stats,
}

/// The placement address of an owner's index.
pub fn owner_addr(owner: &PublicKey) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"borg-owner-v1");
    h.update(owner.as_bytes());
    h.finalize().into()
}

impl FtreeCell {
    pub fn new(init: CellInit) -> Self {
        let place = match &init.data_dir {
            Some(dir) => Place::File(dir.join("files.redb")),
            None => Place::Memory,
        };
        Self::with(init, place, FtreeConfig::from_env())
    }

    pub fn boxed(init: CellInit) -> Box<dyn Cell> {
        Box::new(Self::new(init))
    }

    pub fn with(init: CellInit, place: Place, cfg: FtreeConfig) -> Self {
        let now = init.clock.mono_ms();
        let mut jobs = VecDeque::new();
        jobs.push_back(Job::Open(place));
        Self {
            me: init.key,
            index: None,
            index_error: None,
            jobs,
            out: VecDeque::new(),
            members: Membership::new(
                cfg.dir.clone(),
                init.key,
                init.clock.now_ms(),
                now,
                cfg.announce_ms,
            ),
            files: BTreeMap::new(),
            n_files: 0,
            n_bytes: 0,
            ops: ops::Ops::default(),
            next_sync: now + cfg.sync_ms,
            sync_ms: cfg.sync_ms.max(1000),
            sync_cursor: None,
            stats: Stats::default(),
        }
    }

    fn ready(&self) -> Result<(), CellError> {
        if self.index.is_some() {
            return Ok(());
        }
        Err(CellError::unavailable(match &self.index_error {
            Some(e) => format!("the file index could not be opened: {e}"),
            None => "the file index is still opening".into(),
        }))
    }

    /// Queue a job a peer asked for, within half the queue; false (counted) if no room.
    fn job_peer(&mut self, job: Job) -> bool {
        if self.jobs.len() >= MAX_JOBS_QUEUED / 2 {
            self.stats.jobs_refused += 1;
            return false;
        }
        self.jobs.push_back(job);
        true
    }

    /// Queue a job of a client operation (bounded by the number of operations).
    fn job(&mut self, job: Job) {
        self.jobs.push_back(job);
    }

    /// The owner's index holders: the top [`INDEX_REPLICAS`] members; this node alone while it
    /// knows no members.
    fn holders(&self, owner: &PublicKey) -> Vec<PublicKey> {
        let top = self
            .members
            .dir
            .members()
            .top(&owner_addr(owner), INDEX_REPLICAS);
        if top.is_empty() {
            return vec![self.me];
        }
        top.into_iter().map(|r| r.key).collect()
    }

    /// Whether this node takes `owner`'s manifests.
    fn takes(&self, owner: &PublicKey) -> bool {
        let members = self.members.dir.members();
        if members.len() <= INDEX_REPLICAS + INDEX_SPARE {
            return true;
        }
        members
            .top(&owner_addr(owner), INDEX_REPLICAS + INDEX_SPARE)
            .iter()
            .any(|r| r.key == self.me)
    }

    fn is_member(&self, key: &PublicKey) -> bool {
        self.members.dir.members().contains(key)
    }

    fn send(&mut self, to: &PublicKey, kind: &str, body: Value) {
        self.out.push_back(CellAction::Send {
            to: self.members.target(to),
            kind: kind.into(),
            body,
        });
    }

    /// Whether one more manifest of `owner` of `bytes` fits the bounds.
    fn fits(&self, owner: &PublicKey, bytes: usize) -> bool {
        let of_owner = self.files.get(owner).map_or(0, BTreeMap::len);
        self.n_files < MAX_FILES
            && of_owner < MAX_FILES_PER_OWNER
            && self.n_bytes + bytes <= MAX_INDEX_BYTES
    }

    fn remember(&mut self, owner: PublicKey, id: FileId, summary: Summary) {
        let bytes = summary.bytes;
        if self
            .files
            .entry(owner)
            .or_default()
            .insert(id, summary)
            .is_none()
        {
            self.n_files += 1;
            self.n_bytes += bytes;
        }
    }

    fn forget(&mut self, owner: &PublicKey, id: &FileId) {
        if let Some(files) = self.files.get_mut(owner) {
            if let Some(s) = files.remove(id) {
                self.n_files -= 1;
                self.n_bytes = self.n_bytes.saturating_sub(s.bytes);
            }
            if files.is_empty() {
                self.files.remove(owner);
            }
        }
    }

    /// A manifest to index here (from a client's node or a co-holder): checked, bounded,
    /// then written; the outcome goes to `reply`.
    fn index_manifest(&mut self, text: &str, reply: Reply) -> Result<FileId, CellError> {
        let opened = open_manifest(text.as_bytes())
            .map_err(|e| CellError::malformed(format!("manifest: {e}")))?;
        let (owner, id) = (opened.owner(), opened.id());
        if !self.takes(&owner) {
            return Err(CellError::forbidden(
                "this node does not hold that owner's files",
            ));
        }
        if !self.fits(&owner, text.len()) {
            return Err(CellError {
                status: 507,
                code: "full",
                message: "this node's file index is full".into(),
            });
        }
        let job = Job::Put {
            owner,
            id,
            bytes: text.as_bytes().to_vec(),
            summary: Summary::of(opened.manifest(), text.len()),
            reply,
        };
        match reply {
            Reply::Op(_) => self.job(job),
            _ => {
                if !self.job_peer(job) {
                    return Err(busy());
                }
            }
        }
        Ok(id)
    }

    /// Send each co-holder of the next owners the ids indexed here.
    fn sync_round(&mut self, now: u64) {
        self.next_sync = now + self.sync_ms;
        let owners: Vec<PublicKey> = match self.sync_cursor {
            Some(c) => self
                .files
                .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                .map(|(k, _)| *k)
                .take(SYNC_OWNERS_PER_ROUND)
                .collect(),
            None => self
                .files
                .keys()
                .copied()
                .take(SYNC_OWNERS_PER_ROUND)
                .collect(),
        };
        self.sync_cursor = if owners.len() < SYNC_OWNERS_PER_ROUND {
            None
        } else {
            owners.last().copied()
        };
        for owner in owners {
            let ids: Vec<FileId> = self
                .files
                .get(&owner)
                .map(|f| f.keys().copied().collect())
                .unwrap_or_default();
            for to in self.holders(&owner) {
                if to == self.me {
                    continue;
                }
                for chunk in ids.chunks(wire::MAX_SYNC_IDS) {
                    self.stats.synced_out += 1;
                    self.send(&to, "file.sync", wire::ids_body(&owner, chunk));
                }
            }
        }
    }

    fn handle_done(&mut self, done: Done) {
        match done {
            Done::Opened(Ok((index, all, bad))) => {
                self.index = Some(index);
                self.stats.bad_stored = bad;
                for (owner, id, s) in all {
                    self.remember(owner, id, s);
                }
            }
            Done::Opened(Err(e)) => {
                tracing::error!("file index: {e}");
                self.index_error = Some(e.to_string());
            }
            Done::Put {
                owner,
                id,
                summary,
                reply,
                result,
            } => {
                let ok = match &result {
                    Ok(PutOutcome::Stored) => {
                        self.stats.indexed += 1;
                        self.remember(owner, id, summary);
                        Ok(())
                    }
                    Ok(PutOutcome::Had) => Ok(()),
                    Ok(PutOutcome::Deleted) => Err("deleted"),
                    Err(e) => {
                        self.stats.job_errors += 1;
                        tracing::warn!("{e}");
                        Err("io")
                    }
                };
                match reply {
                    Reply::Op(q) => self.op_indexed(q, self.me, ok.is_ok()),
                    Reply::Peer(to, q) => {
                        let mut body = json!({"q": q, "id": id.to_string(), "ok": ok.is_ok()});
                        if let Err(code) = ok {
                            body["code"] = json!(code);
                        }
                        self.send(&to, "file.indexed", body);
                    }
                    Reply::Sync(_) => {}
                }
            }
            Done::Got { reply, result } => {
                let found = match result {
                    Ok(v) => v,
                    Err(e) => {
                        self.stats.job_errors += 1;
                        tracing::warn!("{e}");
                        None
                    }
                };
                let text = found.and_then(|b| String::from_utf8(b).ok());
                match reply {
                    Reply::Op(q) => self.op_fetched(q, self.me, text),
                    Reply::Peer(to, q) => {
                        self.send(&to, "file.fetched", json!({"q": q, "manifest": text}));
                    }
                    Reply::Sync(to) => {
                        if let Some(text) = text {
                            self.send(&to, "file.index", json!({"q": 0, "manifest": text}));
                        }
                    }
                }
            }
            Done::Removed {
                owner,
                id,
                reply,
                result,
            } => {
                let removed = match result {
                    Ok(r) => r,
                    Err(e) => {
                        self.stats.job_errors += 1;
                        tracing::warn!("{e}");
                        false
                    }
                };
                if removed {
                    self.stats.removed += 1;
                    self.forget(&owner, &id);
                }
                match reply {
                    Reply::Op(q) => self.op_removed(q, self.me, removed),
                    Reply::Peer(to, q) => {
                        let body = json!({"q": q, "id": id.to_string(), "removed": removed});
                        self.send(&to, "file.unindexed", body);
                    }
                    Reply::Sync(_) => {}
                }
            }
            Done::Checked {
                from,
                owner,
                result,
            } => match result {
                Ok(known) => {
                    let mut need = Vec::new();
                    for (id, k) in known {
                        match k {
                            Known::Missing => need.push(id),
                            Known::Deleted(proof) => {
                                let delete = String::from_utf8_lossy(&proof).into_owned();
                                self.send(&from, "file.unindex", json!({"q": 0, "delete": delete}));
                            }
                            Known::Have => {}
                        }
                    }
                    if !need.is_empty() {
                        self.send(&from, "file.need", wire::ids_body(&owner, &need));
                    }
                }
                Err(e) => {
                    self.stats.job_errors += 1;
                    tracing::warn!("{e}");
                }
            },
        }
    }
}

fn busy() -> CellError {
    CellError::unavailable("the file index is busy; try again")
}

impl Cell for FtreeCell {
    fn kind_prefix(&self) -> &'static str {
        "file."
    }

    fn receptor_kinds(&self) -> &'static [&'static str] {
        ops::RECEPTOR_KINDS
    }

    fn handle_tree(&mut self, now: CellTime, view: &TreeView) {
        self.members.handle_tree(now.mono_ms, view, &mut self.out);
    }

    fn handle_broadcast(&mut self, now: CellTime, _id: &str, origin: &PublicKey, payload: &Value) {
        let _ = self.members.handle_broadcast(now.mono_ms, origin, payload);
    }

    fn handle_message(
        &mut self,
        _now: CellTime,
        from: PublicKey,
        _rx: u64,
        kind: &str,
        body: &Value,
    ) -> Result<(), CellError> {
        let bad = |e: wire::WireError| CellError::malformed(e.0);
        // Answers to our own requests are matched to the operation that asked.
        match kind {
            "file.indexed" | "file.fetched" | "file.listed" | "file.unindexed" => {
                return self.op_answer(from, kind, body);
            }
            _ => {}
        }
        self.ready()?;
        if !self.is_member(&from) {
            self.stats.not_member += 1;
            return Err(CellError::forbidden(
                "only members of this tree may ask that",
            ));
        }
        match kind {
            "file.index" => {
                let q = wire::q_of(body).map_err(bad)?;
                let text = wire::envelope_field(body, "manifest").map_err(bad)?;
                if let Err(e) = self.index_manifest(text, Reply::Peer(from, q)) {
                    self.stats.refused += 1;
                    if q != 0 {
                        self.send(
                            &from,
                            "file.indexed",
                            json!({"q": q, "ok": false, "code": e.code}),
                        );
                    }
                    return Err(e);
                }
            }
            "file.fetch" => {
                let q = wire::q_of(body).map_err(bad)?;
                let owner = wire::owner_of(body).map_err(bad)?;
                let id = wire::id_of(body).map_err(bad)?;
                let reply = Reply::Peer(from, q);
                if !self.job_peer(Job::Get { owner, id, reply }) {
                    return Err(busy());
                }
            }
            "file.list" => {
                let q = wire::q_of(body).map_err(bad)?;
                let owner = wire::owner_of(body).map_err(bad)?;
                let (files, truncated) = self.listing(&owner);
                self.send(
                    &from,
                    "file.listed",
                    json!({"q": q, "files": files, "truncated": truncated}),
                );
            }
            "file.unindex" => {
                let q = wire::q_of(body).map_err(bad)?;
                let text = wire::envelope_field(body, "delete").map_err(bad)?;
                let (owner, id) = ops::open_delete(text, None)?;
                let job = Job::Remove {
                    owner,
                    id,
                    delete: text.as_bytes().to_vec(),
                    reply: Reply::Peer(from, q),
                };
                if !self.job_peer(job) {
                    return Err(busy());
                }
            }
            "file.sync" => {
                let owner = wire::owner_of(body).map_err(bad)?;
                let ids = wire::ids_of(body).map_err(bad)?;
                if self.takes(&owner) && !self.job_peer(Job::Check { from, owner, ids }) {
                    return Err(busy());
                }
            }
            "file.need" => {
                let owner = wire::owner_of(body).map_err(bad)?;
                let ids = wire::ids_of(body).map_err(bad)?;
                for id in ids {
                    // Only what we hold, and only to a holder of that owner.
                    let held = self.files.get(&owner).is_some_and(|f| f.contains_key(&id));
                    if held && self.holders(&owner).contains(&from) {
                        let reply = Reply::Sync(from);
                        if !self.job_peer(Job::Get { owner, id, reply }) {
                            break;
                        }
                    }
                }
            }
            other => {
                return Err(CellError::unknown_kind(format!(
                    "ftreeFileMgr does not take {other:?}"
                )))
            }
        }
        Ok(())
    }

    fn handle_request_later(
        &mut self,
        now: CellTime,
        from: &PublicKey,
        kind: &str,
        body: &Value,
        ticket: u64,
    ) -> Result<Option<Value>, CellError> {
        self.ready()?;
        self.client_request(now.mono_ms, *from, kind, body, ticket)
    }

    fn poll_work(&mut self) -> Option<Work> {
        let job = self.jobs.pop_front()?;
        Some(job.into_work(self.index.clone()))
    }

    fn handle_work_done(&mut self, _now: CellTime, done: WorkDone) {
        match done.downcast::<Done>() {
            Ok(done) => self.handle_done(*done),
            Err(_) => self.stats.job_errors += 1,
        }
    }

    fn handle_timeout(&mut self, now: CellTime) {
        let ms = now.mono_ms;
        self.members.handle_timeout(ms, &mut self.out);
        if ms >= self.next_sync && self.index.is_some() {
            self.sync_round(ms);
        }
        self.ops_timeout(ms);
    }

    fn poll_timeout(&self) -> Option<u64> {
        let t = self.members.poll_timeout().min(self.next_sync);
        Some(self.ops.poll_timeout().map_or(t, |x| t.min(x)))
    }

    fn poll_action(&mut self, _now: CellTime) -> Option<CellAction> {
        self.out.pop_front()
    }

    fn status(&self, _now: CellTime) -> Value {
        let s = &self.stats;
        json!({
            "index": {
                "open": self.index.is_some(),
                "error": self.index_error,
                "owners": self.files.len(),
                "files": self.n_files,
                "bytes": self.n_bytes,
                "indexed": s.indexed,
                "refused": s.refused,
                "removed": s.removed,
                "job_errors": s.job_errors,
                "jobs_refused": s.jobs_refused,
                "unreadable": s.bad_stored,
                "sync_messages": s.synced_out,
            },
            "members": {
                "placeable": self.members.dir.members().len(),
                "known": self.members.dir.known(),
                "not_member_refused": s.not_member,
            },
            "clients": self.ops.status(),
        })
    }

    fn metrics(&self, _now: CellTime) -> String {
        format!(
            "borg_ftree_files {}\nborg_ftree_owners {}\nborg_ftree_index_bytes {}\n\
             borg_ftree_indexed_total {}\nborg_ftree_removed_total {}\nborg_ftree_members {}\n",
            self.n_files,
            self.files.len(),
            self.n_bytes,
            self.stats.indexed,
            self.stats.removed,
            self.members.dir.members().len(),
        )
    }
}
