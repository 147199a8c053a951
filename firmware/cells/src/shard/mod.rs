//! shardTree: shard storage, as a cell (DNA 13350/13355/13340, k=25).
//!
//! What is built so far: the node's shard store (`<data>/shards.redb`, a
//! [`borg_store::RedbStore`]; in memory under `MemNet`) opened and used only through blocking
//! jobs off the actor ([`disk`]), its usage in `/status` and `/metrics`, a `shard.stat`
//! receptor kind, and a periodic scrub that re-hashes every stored shard and drops corrupt ones.
//!
//! The store's budget is [`DEFAULT_BUDGET`] unless `BORG_SHARD_BUDGET_MB` says otherwise.
//! A store that cannot be opened (another process has it, not a store file) leaves the cell
//! running with the error in its status; its requests answer `unavailable`.

pub mod disk;

use std::collections::VecDeque;
use std::sync::Arc;

use borg_net::cell::{Cell, CellAction, CellError, CellInit, CellTime, Work, WorkDone};
use borg_proto::identity::PublicKey;
use borg_store::{ShardStore, Usage};
use serde_json::{json, Value};

use disk::{Done, Job, Place};

/// The store's budget when none is configured: 1 GiB of shard bytes.
pub const DEFAULT_BUDGET: u64 = 1 << 30;
/// The environment variable that sets the budget, in MiB.
pub const BUDGET_ENV: &str = "BORG_SHARD_BUDGET_MB";
/// The first scrub this long after start (ms), then every [`SCRUB_EVERY_MS`].
pub const FIRST_SCRUB_MS: u64 = 10 * 60 * 1000;
pub const SCRUB_EVERY_MS: u64 = 24 * 60 * 60 * 1000;
/// Usage is read again at most this often (ms).
const USAGE_EVERY_MS: u64 = 10_000;

/// The shardTree cell.
pub struct ShardCell {
    store: Option<Arc<dyn ShardStore>>,
    /// Why the store is not open, if it failed.
    store_error: Option<String>,
    jobs: VecDeque<Job>,
    out: VecDeque<CellAction>,
    usage: Option<Usage>,
    next_usage: u64,
    next_scrub: u64,
    scrubs: u64,
    corrupt_found: u64,
    job_errors: u64,
}

impl ShardCell {
    pub fn new(init: CellInit) -> Self {
        let budget = std::env::var(BUDGET_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(DEFAULT_BUDGET, |mb| mb.saturating_mul(1 << 20));
        let place = match init.data_dir {
            Some(dir) => Place::File {
                path: dir.join("shards.redb"),
                budget,
            },
            None => Place::Memory { budget },
        };
        let now = init.clock.mono_ms();
        let mut jobs = VecDeque::new();
        jobs.push_back(Job::Open(place));
        Self {
            store: None,
            store_error: None,
            jobs,
            out: VecDeque::new(),
            usage: None,
            next_usage: now,
            next_scrub: now + FIRST_SCRUB_MS,
            scrubs: 0,
            corrupt_found: 0,
            job_errors: 0,
        }
    }

    pub fn boxed(init: CellInit) -> Box<dyn Cell> {
        Box::new(Self::new(init))
    }

    fn store_ready(&self) -> Result<(), CellError> {
        if self.store.is_some() {
            return Ok(());
        }
        Err(CellError {
            status: 503,
            code: "unavailable",
            message: match &self.store_error {
                Some(e) => format!("the shard store could not be opened: {e}"),
                None => "the shard store is still opening".into(),
            },
        })
    }
}

impl Cell for ShardCell {
    fn kind_prefix(&self) -> &'static str {
        "shard."
    }

    fn receptor_kinds(&self) -> &'static [&'static str] {
        &["shard.stat"]
    }

    fn handle_message(
        &mut self,
        _now: CellTime,
        _from: PublicKey,
        _rx: u64,
        kind: &str,
        _body: &Value,
    ) -> Result<(), CellError> {
        Err(CellError {
            status: 400,
            code: "unknown_kind",
            message: format!("shardTree does not take {kind:?} yet"),
        })
    }

    fn handle_request(
        &mut self,
        _now: CellTime,
        _from: &PublicKey,
        kind: &str,
        _body: &Value,
    ) -> Result<Value, CellError> {
        match kind {
            "shard.stat" => {
                self.store_ready()?;
                let u = self.usage.unwrap_or_default();
                Ok(json!({"shards": u.shards, "bytes": u.bytes, "budget": u.budget}))
            }
            _ => Err(CellError {
                status: 400,
                code: "unknown_kind",
                message: format!("shardTree answers shard.stat, not {kind:?}"),
            }),
        }
    }

    fn poll_work(&mut self) -> Option<Work> {
        let job = self.jobs.pop_front()?;
        Some(job.into_work(self.store.clone()))
    }

    fn handle_work_done(&mut self, _now: CellTime, done: WorkDone) {
        let Ok(done) = done.downcast::<Done>() else {
            // A job panicked (WorkPanicked): counted; the store stays as it was.
            self.job_errors += 1;
            return;
        };
        match *done {
            Done::Opened(Ok(store)) => {
                self.store = Some(store);
                self.store_error = None;
                self.jobs.push_back(Job::Usage);
            }
            Done::Opened(Err(e)) => {
                tracing::error!("shard store: {e}");
                self.store_error = Some(e.to_string());
            }
            Done::Usage(Ok(u)) => self.usage = Some(u),
            Done::Scrubbed(Ok(report)) => {
                self.scrubs += 1;
                self.corrupt_found += report.corrupt.len() as u64;
                for a in &report.corrupt {
                    tracing::warn!("scrub: shard {a} was corrupt and was removed");
                }
                self.jobs.push_back(Job::Usage);
            }
            Done::Usage(Err(e)) | Done::Scrubbed(Err(e)) => {
                self.job_errors += 1;
                tracing::warn!("shard store: {e}");
            }
            Done::Put { .. } | Done::Got { .. } | Done::Has(_) => {}
        }
    }

    fn handle_timeout(&mut self, now: CellTime) {
        if self.store.is_none() {
            return;
        }
        if now.mono_ms >= self.next_usage {
            self.next_usage = now.mono_ms + USAGE_EVERY_MS;
            self.jobs.push_back(Job::Usage);
        }
        if now.mono_ms >= self.next_scrub {
            self.next_scrub = now.mono_ms + SCRUB_EVERY_MS;
            self.jobs.push_back(Job::Scrub);
        }
    }

    fn poll_timeout(&self) -> Option<u64> {
        self.store.as_ref()?;
        Some(self.next_usage.min(self.next_scrub))
    }

    fn poll_action(&mut self, _now: CellTime) -> Option<CellAction> {
        self.out.pop_front()
    }

    fn status(&self, _now: CellTime) -> Value {
        let u = self.usage.unwrap_or_default();
        json!({
            "store": {
                "open": self.store.is_some(),
                "error": self.store_error,
                "shards": u.shards,
                "bytes": u.bytes,
                "budget": u.budget,
                "scrubs": self.scrubs,
                "corrupt_found": self.corrupt_found,
            }
        })
    }

    fn metrics(&self, _now: CellTime) -> String {
        let u = self.usage.unwrap_or_default();
        format!(
            "borg_shard_store_open {}\nborg_shard_store_shards {}\nborg_shard_store_bytes {}\n\
             borg_shard_store_budget_bytes {}\nborg_shard_scrubs_total {}\n\
             borg_shard_corrupt_found_total {}\nborg_shard_job_errors_total {}\n",
            u8::from(self.store.is_some()),
            u.shards,
            u.bytes,
            u.budget,
            self.scrubs,
            self.corrupt_found,
            self.job_errors
        )
    }
}
