//! shardTree: shard storage, as a cell (DNA 13350/13355/13340, k=25).
//!
//! - **The store**: the node's shard store (`<data>/shards.redb`, a [`borg_store::RedbStore`];
//!   in memory under `MemNet`), used only through blocking jobs off the actor ([`disk`]). Its
//!   budget is [`DEFAULT_BUDGET`] unless `BORG_SHARD_BUDGET_MB` says otherwise; a store that
//!   cannot be opened leaves the cell running with the error in its status (requests answer
//!   `unavailable`).
//! - **Members**: every node announces itself on the shard tree by broadcast (its address and
//!   an epoch) every [`ANNOUNCE_MS`]; each node keeps a bounded directory of them
//!   ([`borg_proto::shard::members::MemberDir`]: admission rate, probation, TTL).
//! - **Placement and repair**: a shard belongs on the top `r` members by rendezvous hashing
//!   ([`borg_proto::shard::placement`]); the repair planner
//!   ([`borg_proto::shard::repair::RepairPlanner`]) of every holder asks the others what they
//!   hold (`shard.has`), and the best-ranked holder pushes missing copies. A surplus copy is
//!   dropped only after all `r` are confirmed, and a grace period.
//! - **Transfers** ([`transfer`]): a push is an offer (`shard.offer`); the receiver pulls the
//!   shards it lacks with `Want` binary frames (a window of its choosing) and the holder
//!   answers with `Shard` frames; every shard is checked against its address before it is
//!   stored, and the receiver reports what it stored (`shard.stored`). A fetch is a request to
//!   be offered (`shard.ask`).
//! - The scrub re-hashes every stored shard periodically and drops corrupt ones; the planner
//!   then fetches them again.
//!
//! Envelope bodies and their bounds: [`wire`].

mod client;
pub mod disk;
mod transfer;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use borg_net::cell::{Cell, CellAction, CellError, CellInit, CellTime, Work, WorkDone};
use borg_proto::identity::PublicKey;
use borg_proto::shard::members::DirConfig;
use borg_proto::shard::repair::{RepairAction, RepairConfig, RepairPlanner};
use borg_proto::tree::TreeView;
use borg_store::{Address, ShardStore, StoreError, Usage};
use serde_json::{json, Value};

use crate::members::Membership;
use disk::{Done, Job, Place};
use transfer::Transfers;

/// The store's budget when none is configured: 1 GiB of shard bytes.
pub const DEFAULT_BUDGET: u64 = 1 << 30;
/// The environment variable that sets the budget, in MiB.
pub const BUDGET_ENV: &str = "BORG_SHARD_BUDGET_MB";
/// Set to `1`, this environment variable gives a local demo or test network timings of
/// seconds instead of minutes ([`ShardConfig::quick`]).
pub const QUICK_ENV: &str = "BORG_SHARD_QUICK";
/// The first scrub this long after start (ms), then every [`SCRUB_EVERY_MS`].
pub const FIRST_SCRUB_MS: u64 = 10 * 60 * 1000;
pub const SCRUB_EVERY_MS: u64 = 24 * 60 * 60 * 1000;
/// A member announces itself this often (ms) by default; the directory's TTL must be a few
/// times longer.
pub const ANNOUNCE_MS: u64 = 60_000;
/// Usage is read again at most this often (ms).
const USAGE_EVERY_MS: u64 = 10_000;
/// Jobs waiting for the disk at most; a request that would queue more is refused or retried.
/// Jobs a peer's message asks for (`shard.has`) may take half of it; the node's own (stores of
/// what it pulled, deletes, scrubs) are bounded by their own sources and always queue.
pub const MAX_JOBS_QUEUED: usize = 256;
/// Shards one node tracks at most (each costs the planner about 1 KB): offers beyond it are
/// refused, so a flood of tiny shards cannot exhaust memory.
pub const MAX_HELD_SHARDS: usize = 100_000;

/// How the cell is set up.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub dir: DirConfig,
    pub repair: RepairConfig,
    pub announce_ms: u64,
    /// The first scrub this long after start (ms), then every [`SCRUB_EVERY_MS`].
    pub first_scrub_ms: u64,
}

impl ShardConfig {
    /// Timings for a demo or test network on one machine: members placeable after 1 s, new
    /// shards checked after 1 s, surplus copies dropped after 5 s, pushes at 64 MiB/s.
    pub fn quick() -> Self {
        Self {
            dir: DirConfig {
                ttl_ms: 8_000,
                probation_ms: 1_000,
                ..DirConfig::default()
            },
            repair: RepairConfig {
                new_check_ms: 1_000,
                recheck_ms: 3_000,
                query_retry_ms: 1_000,
                report_ttl_ms: 4_000,
                drop_grace_ms: 5_000,
                push_bytes_per_s: 64 << 20,
                ..RepairConfig::default()
            },
            announce_ms: 2_000,
            first_scrub_ms: 5_000,
        }
    }

    /// [`ShardConfig::quick`] if [`QUICK_ENV`] is `1`, else the default.
    pub fn from_env() -> Self {
        if std::env::var(QUICK_ENV).is_ok_and(|v| v.trim() == "1") {
            Self::quick()
        } else {
            Self::default()
        }
    }
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            dir: DirConfig::default(),
            repair: RepairConfig::default(),
            announce_ms: ANNOUNCE_MS,
            first_scrub_ms: FIRST_SCRUB_MS,
        }
    }
}

/// Counters shown in status and metrics.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    scrubs: u64,
    corrupt_found: u64,
    job_errors: u64,
    jobs_refused: u64,
    announcements: u64,
    announcements_refused: u64,
    stored: u64,
    store_refused: u64,
    dropped: u64,
    not_member: u64,
}

/// The shardTree cell.
pub struct ShardCell {
    me: PublicKey,
    /// Ranks of a shard within which this node takes it (r + the planner's spare).
    depth: usize,
    /// Copies kept of every shard (`r`).
    replicas: usize,
    store: Option<Arc<dyn ShardStore>>,
    store_error: Option<String>,
    jobs: VecDeque<Job>,
    out: VecDeque<CellAction>,
    usage: Option<Usage>,
    next_usage: u64,
    next_scrub: u64,
    members: Membership,
    dir_version: u64,
    planner: RepairPlanner,
    transfers: Transfers,
    clients: client::Clients,
    stats: Stats,
}

impl ShardCell {
    pub fn new(init: CellInit) -> Self {
        let budget = std::env::var(BUDGET_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(DEFAULT_BUDGET, |mb| mb.saturating_mul(1 << 20));
        let place = match &init.data_dir {
            Some(dir) => Place::File {
                path: dir.join("shards.redb"),
                budget,
            },
            None => Place::Memory { budget },
        };
        Self::with(init, place, ShardConfig::from_env())
    }

    pub fn boxed(init: CellInit) -> Box<dyn Cell> {
        Box::new(Self::new(init))
    }

    /// A cell on `place` with `cfg` (tests give a store they keep a handle on, and short
    /// timings).
    pub fn with(init: CellInit, place: Place, cfg: ShardConfig) -> Self {
        let now = init.clock.mono_ms();
        let me = init.key;
        // The invariant: the default and test configurations have 1..=16 replicas and
        // non-zero budgets; a bad one is a programming error caught by every test.
        let members = Membership::new(
            cfg.dir.clone(),
            me,
            init.clock.now_ms(),
            now,
            cfg.announce_ms,
        );
        let planner = RepairPlanner::new(me, cfg.repair.clone(), members.dir.members().clone())
            .unwrap_or_else(|e| panic!("shard repair configuration: {e}"));
        let mut jobs = VecDeque::new();
        jobs.push_back(Job::Open(place));
        Self {
            me,
            depth: cfg.repair.replicas + cfg.repair.spare,
            replicas: cfg.repair.replicas,
            store: None,
            store_error: None,
            jobs,
            out: VecDeque::new(),
            usage: None,
            next_usage: now,
            next_scrub: now + cfg.first_scrub_ms,
            members,
            dir_version: 0,
            planner,
            transfers: Transfers::new(),
            clients: client::Clients::default(),
            stats: Stats::default(),
        }
    }

    fn store_ready(&self) -> Result<(), CellError> {
        if self.store.is_some() {
            return Ok(());
        }
        Err(CellError::unavailable(match &self.store_error {
            Some(e) => format!("the shard store could not be opened: {e}"),
            None => "the shard store is still opening".into(),
        }))
    }

    /// Queue a disk job a peer asked for within its share of [`MAX_JOBS_QUEUED`]; false
    /// (counted) if there is no room.
    fn job(&mut self, job: Job) -> bool {
        let room = match job {
            Job::Has { .. } => MAX_JOBS_QUEUED / 2,
            _ => MAX_JOBS_QUEUED,
        };
        if self.jobs.len() >= room {
            self.stats.jobs_refused += 1;
            return false;
        }
        self.jobs.push_back(job);
        true
    }

    /// Queue the node's own disk job (a store of what it pulled, a delete, a scrub, a usage
    /// read): never dropped; their sources bound them.
    fn job_always(&mut self, job: Job) {
        self.jobs.push_back(job);
    }

    /// A placement-eligible member of this shard tree (announced, past probation).
    fn is_member(&self, key: &PublicKey) -> bool {
        self.members.dir.members().contains(key)
    }

    fn not_member(&mut self) -> CellError {
        self.stats.not_member += 1;
        CellError::forbidden("only members of this shard tree may ask that")
    }

    /// Read the usage again within a second (after a store or a delete), not at once for
    /// every one of a burst.
    fn usage_soon(&mut self, now: u64) {
        self.next_usage = self.next_usage.min(now + 1000);
    }

    fn send(&mut self, to: &PublicKey, kind: &str, body: Value) {
        self.out.push_back(CellAction::Send {
            to: self.members.target(to),
            kind: kind.into(),
            body,
        });
    }

    /// The member set changed: tell the planner.
    fn sync_members(&mut self, now: u64) {
        if self.members.dir.version() != self.dir_version {
            self.dir_version = self.members.dir.version();
            self.planner
                .set_members(now, self.members.dir.members().clone());
        }
    }

    /// Carry out what the planner decided.
    fn run_planner(&mut self, now: u64) {
        self.sync_members(now);
        if self.store.is_none() {
            return;
        }
        let mut queries: HashMap<PublicKey, Vec<[u8; 32]>> = HashMap::new();
        let mut pushes: HashMap<PublicKey, Vec<[u8; 32]>> = HashMap::new();
        let mut asks: HashMap<PublicKey, Vec<[u8; 32]>> = HashMap::new();
        for action in self.planner.poll_actions(now) {
            match action {
                RepairAction::Query { addr, to } => queries.entry(to).or_default().push(addr),
                RepairAction::Push { addr, to, .. } => pushes.entry(to).or_default().push(addr),
                RepairAction::Fetch { addr, from } => asks.entry(from).or_default().push(addr),
                RepairAction::Drop { addr } => {
                    self.job_always(Job::Delete(Address::from_bytes(addr)));
                    self.stats.dropped += 1;
                }
            }
        }
        for (to, addrs) in queries {
            for chunk in addrs.chunks(wire::MAX_QUERY_ADDRS) {
                self.send(&to, "shard.has", wire::has_body(chunk));
            }
        }
        for (to, addrs) in asks {
            for chunk in addrs.chunks(wire::MAX_OFFER_SHARDS) {
                self.send(&to, "shard.ask", wire::has_body(chunk));
            }
        }
        for (to, addrs) in pushes {
            for chunk in addrs.chunks(wire::MAX_OFFER_SHARDS) {
                self.offer(now, to, chunk.to_vec());
            }
        }
    }

    fn handle_done(&mut self, now: CellTime, done: Done) {
        let ms = now.mono_ms;
        match done {
            Done::Opened(Ok(store)) => {
                self.store = Some(store);
                self.store_error = None;
                self.job_always(Job::Usage);
                self.job_always(Job::List);
            }
            Done::Opened(Err(e)) => {
                tracing::error!("shard store: {e}");
                self.store_error = Some(e.to_string());
            }
            Done::Listed(Ok(addrs)) => {
                for (a, len) in addrs {
                    self.planner.hold(ms, *a.as_bytes(), len);
                }
            }
            Done::Offer { to, stream, result } => self.offer_looked_up(ms, to, stream, result),
            Done::Usage(Ok(u)) => self.usage = Some(u),
            Done::Scrubbed(Ok(report)) => {
                self.stats.scrubs += 1;
                self.stats.corrupt_found += report.corrupt.len() as u64;
                for a in &report.corrupt {
                    tracing::warn!("scrub: shard {a} was corrupt and was removed");
                    self.planner.handle_corrupt(ms, a.as_bytes());
                }
                self.job_always(Job::Usage);
            }
            Done::Deleted(a, Ok(())) => {
                self.planner.forget(a.as_bytes());
                self.usage_soon(ms);
            }
            Done::Has {
                from,
                result: Ok(answers),
            } => {
                let answers: Vec<([u8; 32], bool)> =
                    answers.iter().map(|(a, h)| (*a.as_bytes(), *h)).collect();
                self.send(&from, "shard.have", wire::have_body(&answers));
            }
            Done::Stored {
                slot,
                addr,
                len,
                result,
            } => {
                let ok = match result {
                    Ok(()) => {
                        self.stats.stored += 1;
                        self.planner.hold(ms, *addr.as_bytes(), len);
                        self.usage_soon(ms);
                        self.client_shard_arrived(&addr);
                        true
                    }
                    Err(e) => {
                        self.stats.store_refused += 1;
                        tracing::debug!("storing shard {addr}: {e}");
                        false
                    }
                };
                self.transfers.written(ms, slot, ok);
                self.pump(ms);
            }
            Done::Served { to, want, result } => {
                if let Err(StoreError::Corrupt { addr }) = &result {
                    self.found_corrupt(ms, addr);
                }
                self.transfers
                    .served(to, want, result.ok().flatten(), &mut self.out);
                self.pump(ms);
            }
            Done::Put {
                ticket,
                addr,
                len,
                result,
            } => self.client_put_done(ms, ticket, addr, len, result),
            Done::Read(addr, result) => self.client_read_done(ms, addr, result),
            Done::Listed(Err(e))
            | Done::Usage(Err(e))
            | Done::Scrubbed(Err(e))
            | Done::Deleted(_, Err(e))
            | Done::Has { result: Err(e), .. } => {
                self.stats.job_errors += 1;
                log_store_error(&e);
            }
        }
    }
}

impl ShardCell {
    /// A read found our copy of `addr` corrupt (the store removed it): fetch it again.
    fn found_corrupt(&mut self, now: u64, addr: &Address) {
        tracing::warn!("shard {addr} was corrupt on disk and was removed; fetching it again");
        self.stats.corrupt_found += 1;
        self.planner.handle_corrupt(now, addr.as_bytes());
        self.usage_soon(now);
    }
}

fn log_store_error(e: &StoreError) {
    tracing::warn!("shard store: {e}");
}

impl Cell for ShardCell {
    fn kind_prefix(&self) -> &'static str {
        "shard."
    }

    fn receptor_kinds(&self) -> &'static [&'static str] {
        &["shard.stat", "shard.put", "shard.get", "shard.locate"]
    }

    fn handle_tree(&mut self, now: CellTime, view: &TreeView) {
        self.members.handle_tree(now.mono_ms, view, &mut self.out);
    }

    fn handle_broadcast(&mut self, now: CellTime, _id: &str, origin: &PublicKey, payload: &Value) {
        match self.members.handle_broadcast(now.mono_ms, origin, payload) {
            Some(Ok(())) => self.stats.announcements += 1,
            Some(Err(_)) => self.stats.announcements_refused += 1,
            None => return,
        }
        self.run_planner(now.mono_ms);
    }

    fn handle_message(
        &mut self,
        now: CellTime,
        from: PublicKey,
        _rx: u64,
        kind: &str,
        body: &Value,
    ) -> Result<(), CellError> {
        let ms = now.mono_ms;
        let bad = |e: wire::WireError| CellError::malformed(e.0);
        match kind {
            "shard.has" => {
                self.store_ready()?;
                if !self.is_member(&from) {
                    return Err(self.not_member());
                }
                let addrs = wire::parse_has(body).map_err(bad)?;
                let addrs = addrs.into_iter().map(Address::from_bytes).collect();
                if !self.job(Job::Has { from, addrs }) {
                    return Err(busy());
                }
            }
            "shard.have" => {
                if !self.is_member(&from) {
                    return Err(self.not_member());
                }
                for (addr, has) in wire::parse_have(body).map_err(bad)? {
                    self.planner.handle_report(ms, &addr, from, has);
                }
                self.run_planner(ms);
            }
            "shard.offer" => {
                self.store_ready()?;
                if !self.is_member(&from) {
                    return Err(self.not_member());
                }
                let (stream, shards) = wire::parse_offer(body).map_err(bad)?;
                self.accept_offer(ms, from, stream, shards)?;
            }
            "shard.stored" => {
                let (stream, stored, failed) = wire::parse_stored(body).map_err(bad)?;
                for (addr, ok) in self
                    .transfers
                    .offer_answered(from, stream, &stored, &failed)
                {
                    self.planner.handle_push_done(ms, &addr, from, ok);
                }
                self.run_planner(ms);
            }
            "shard.ask" => {
                self.store_ready()?;
                if !self.is_member(&from) {
                    return Err(self.not_member());
                }
                let addrs = wire::parse_ask(body).map_err(bad)?;
                self.offer(ms, from, addrs);
            }
            "shard.open" => {
                // Any key: an address is the capability to read a shard (its bytes are
                // ciphertext), and the stream's bounds are the client-stream ones.
                self.store_ready()?;
                let (stream, addrs) = wire::parse_open(body).map_err(bad)?;
                self.open_client_stream(ms, from, stream, addrs);
            }
            other => {
                return Err(CellError::unknown_kind(format!(
                    "shardTree does not take {other:?}"
                )))
            }
        }
        Ok(())
    }

    fn handle_binary(
        &mut self,
        now: CellTime,
        from: PublicKey,
        bytes: &[u8],
    ) -> Result<(), CellError> {
        self.on_frame(now.mono_ms, from, bytes)
    }

    fn handle_request(
        &mut self,
        _now: CellTime,
        _from: &PublicKey,
        kind: &str,
        body: &Value,
    ) -> Result<Value, CellError> {
        match kind {
            "shard.stat" => {
                self.store_ready()?;
                let u = self.usage.unwrap_or_default();
                Ok(json!({
                    "shards": u.shards, "bytes": u.bytes, "budget": u.budget,
                    "members": self.members.dir.members().len(), "held": self.planner.tracked(),
                }))
            }
            "shard.locate" => self.locate(body),
            _ => Err(CellError::unknown_kind(format!(
                "shardTree answers shard.stat, shard.put, shard.get and shard.locate, not \
                 {kind:?}"
            ))),
        }
    }

    fn handle_request_later(
        &mut self,
        now: CellTime,
        from: &PublicKey,
        kind: &str,
        body: &Value,
        ticket: u64,
    ) -> Result<Option<Value>, CellError> {
        match kind {
            "shard.put" | "shard.get" => self.client_request(now.mono_ms, kind, body, ticket),
            _ => self.handle_request(now, from, kind, body).map(Some),
        }
    }

    fn poll_work(&mut self) -> Option<Work> {
        let job = self.jobs.pop_front()?;
        Some(job.into_work(self.store.clone()))
    }

    fn handle_work_done(&mut self, now: CellTime, done: WorkDone) {
        match done.downcast::<Done>() {
            Ok(done) => self.handle_done(now, *done),
            // A job panicked (WorkPanicked): counted; the store stays as it was.
            Err(_) => self.stats.job_errors += 1,
        }
        self.run_planner(now.mono_ms);
    }

    fn handle_timeout(&mut self, now: CellTime) {
        let ms = now.mono_ms;
        self.members.handle_timeout(ms, &mut self.out);
        self.transfers_timeout(ms);
        self.clients_timeout(ms);
        if self.store.is_some() {
            if ms >= self.next_usage {
                self.next_usage = ms + USAGE_EVERY_MS;
                self.job_always(Job::Usage);
            }
            if ms >= self.next_scrub {
                self.next_scrub = ms + SCRUB_EVERY_MS;
                self.job_always(Job::Scrub);
            }
        }
        self.run_planner(ms);
    }

    fn poll_timeout(&self) -> Option<u64> {
        let mut t = self.members.poll_timeout();
        for x in [
            self.planner.poll_timeout(),
            self.transfers.poll_timeout(),
            self.clients.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        {
            t = t.min(x);
        }
        if self.store.is_some() {
            t = t.min(self.next_usage).min(self.next_scrub);
        }
        Some(t)
    }

    fn poll_action(&mut self, _now: CellTime) -> Option<CellAction> {
        self.out.pop_front()
    }

    fn status(&self, _now: CellTime) -> Value {
        let u = self.usage.unwrap_or_default();
        let r = self.planner.stats();
        let s = &self.stats;
        json!({
            "store": {
                "open": self.store.is_some(),
                "error": self.store_error,
                "shards": u.shards,
                "bytes": u.bytes,
                "budget": u.budget,
                "scrubs": s.scrubs,
                "corrupt_found": s.corrupt_found,
            },
            "members": {
                "placeable": self.members.dir.members().len(),
                "known": self.members.dir.known(),
                "announcements": s.announcements,
                "refused": s.announcements_refused,
                "not_member_refused": s.not_member,
            },
            "repair": {
                "held": self.planner.tracked(),
                "queries": r.queries,
                "pushes": r.pushes,
                "push_bytes": r.push_bytes,
                "fetches": r.fetches,
                "drops": r.drops,
                "stored": s.stored,
                "store_refused": s.store_refused,
            },
            "transfers": self.transfers.status(),
            "clients": self.clients.status(),
        })
    }

    fn metrics(&self, _now: CellTime) -> String {
        let u = self.usage.unwrap_or_default();
        let r = self.planner.stats();
        let s = &self.stats;
        format!(
            "borg_shard_store_open {}\nborg_shard_store_shards {}\nborg_shard_store_bytes {}\n\
             borg_shard_store_budget_bytes {}\nborg_shard_scrubs_total {}\n\
             borg_shard_corrupt_found_total {}\nborg_shard_job_errors_total {}\n\
             borg_shard_jobs_refused_total {}\nborg_shard_members {}\n\
             borg_shard_pushes_total {}\nborg_shard_fetches_total {}\nborg_shard_drops_total {}\n\
             borg_shard_stored_total {}\n{}",
            u8::from(self.store.is_some()),
            u.shards,
            u.bytes,
            u.budget,
            s.scrubs,
            s.corrupt_found,
            s.job_errors,
            s.jobs_refused,
            self.members.dir.members().len(),
            r.pushes,
            r.fetches,
            r.drops,
            s.stored,
            self.transfers.metrics(),
        )
    }
}

fn busy() -> CellError {
    CellError::unavailable("the shard store is busy; try again")
}
