//! The receiver: the pulling side of one get.
//!
//! Given a [`Plan`] (the shards of one file with their offsets), the holders of each shard in
//! preference order and a window, the [`Receiver`] says which `Want` to send to whom
//! ([`Receiver::poll_request`]), checks every answer and says what to write where
//! ([`WriteAt`]). It never writes itself and never reads a clock.
//!
//! Rules:
//! - **Window.** Requests outstanding plus shards handed out for writing and not yet confirmed
//!   never exceed `window_total`, so the receiver's memory (and the IO layer's write buffers)
//!   stays under `window_total` x 256 KiB. Per holder, outstanding requests never exceed that
//!   holder's current limit (start: `window_per_holder`).
//! - **Spread.** Each request goes to the eligible holder with the fewest strikes for that
//!   shard, then the fewest requests outstanding, then the earliest in preference order, so a
//!   get pulls from several holders at once.
//! - **Check before write.** A shard is handed out for writing only if it answers an outstanding
//!   request (stream, seq, holder all match) and its bytes have the planned length and hash to
//!   the planned address. A wrong answer excludes that holder for that shard and the shard is
//!   asked from the next one.
//! - **Timeouts.** A request unanswered after `timeout_ms` is a strike against that holder for
//!   that shard (after `max_strikes` it is not asked for that shard again) and halves that
//!   holder's limit (at least 1); every good shard raises it by one again (AIMD).
//! - **Missing / Close.** `Missing` excludes the holder for that shard; `Close` from a holder
//!   ends its part in this get and puts its outstanding requests back.
//! - **Failure.** A shard with no eligible holder left fails the get ([`Receiver::failed`]).
//! - **Done means on disk.** Only [`Receiver::handle_written`] (the IO layer's confirmation
//!   that the bytes reached the file) marks a shard done in the [`Progress`] record.
//! - **Strangers cost nothing.** A frame that answers no outstanding request (unsolicited,
//!   duplicate, late after a timeout, another stream) is dropped and counted.

use std::collections::{BTreeSet, HashMap};

use sha2::{Digest, Sha256};

use super::frame::{hex8, Addr, Close, Missing, Shard, Want, MAX_SHARD_LEN};
use super::progress::{Progress, MAX_PROGRESS_SHARDS};
use crate::identity::PublicKey;

/// Holders one shard may list at most.
pub const MAX_HOLDERS_PER_SHARD: usize = 16;
/// Pending shards [`Receiver::poll_request`] looks at per call for one whose holder has room.
/// Bounded so a call stays cheap; if none of them can go, some request is outstanding (a
/// holder is full only when it has requests out), and its answer or timeout frees room.
const LOOKAHEAD: usize = 256;

/// Errors of a get.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    #[error("bad plan: {0}")]
    BadPlan(String),
    #[error("bad receiver config: {0}")]
    BadConfig(&'static str),
    #[error("progress record does not belong to this plan")]
    ProgressMismatch,
    #[error("holder {holder} sent wrong bytes for shard {index} ({addr})")]
    BadShard {
        index: usize,
        addr: String,
        holder: String,
    },
    #[error("no holder left for shard {index} ({addr})")]
    NoHolder { index: usize, addr: String },
}

impl RecvError {
    pub fn code(&self) -> &'static str {
        match self {
            RecvError::BadPlan(_) => "bad_plan",
            RecvError::BadConfig(_) => "bad_config",
            RecvError::ProgressMismatch => "bad_progress",
            RecvError::BadShard { .. } => "bad_shard",
            RecvError::NoHolder { .. } => "no_holder",
        }
    }
}

/// One shard of a plan: where its bytes go in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanShard {
    pub addr: Addr,
    pub len: u32,
    pub offset: u64,
}

/// The shards of one file in file order, derived from its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    file_id: [u8; 32],
    shards: Vec<PlanShard>,
    total_bytes: u64,
}

impl Plan {
    /// Shards laid end to end from offset 0. Refuses a shard over [`MAX_SHARD_LEN`] and more
    /// than [`MAX_PROGRESS_SHARDS`] shards.
    pub fn contiguous(
        file_id: [u8; 32],
        shards: impl IntoIterator<Item = (Addr, u32)>,
    ) -> Result<Self, RecvError> {
        let mut out = Vec::new();
        let mut offset = 0u64;
        for (addr, len) in shards {
            if out.len() == MAX_PROGRESS_SHARDS {
                return Err(RecvError::BadPlan(format!(
                    "more than {MAX_PROGRESS_SHARDS} shards"
                )));
            }
            if len as usize > MAX_SHARD_LEN {
                return Err(RecvError::BadPlan(format!(
                    "shard {} of {len} bytes",
                    out.len()
                )));
            }
            out.push(PlanShard { addr, len, offset });
            offset += u64::from(len);
        }
        Ok(Self {
            file_id,
            shards: out,
            total_bytes: offset,
        })
    }

    pub fn file_id(&self) -> &[u8; 32] {
        &self.file_id
    }

    pub fn shards(&self) -> &[PlanShard] {
        &self.shards
    }

    /// The file size, to pre-allocate.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
}

/// Window and timeout settings of a get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvConfig {
    /// Shards outstanding or awaiting their write, in total.
    pub window_total: usize,
    /// Requests outstanding to one holder (its starting limit).
    pub window_per_holder: usize,
    /// How long a request may stay unanswered.
    pub timeout_ms: u64,
    /// Timeouts of one holder for one shard before it is no longer asked for it.
    pub max_strikes: u8,
}

impl Default for RecvConfig {
    fn default() -> Self {
        Self {
            window_total: 16,
            window_per_holder: 8,
            timeout_ms: 10_000,
            max_strikes: 2,
        }
    }
}

/// Write `bytes` (already checked against the plan) at `offset`, then call
/// [`Receiver::handle_written`] with `index`.
#[derive(Clone, PartialEq, Eq)]
pub struct WriteAt {
    pub index: usize,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for WriteAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WriteAt(#{} @{} {}B)",
            self.index,
            self.offset,
            self.bytes.len()
        )
    }
}

/// Counters of one get.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecvStats {
    pub requests: u64,
    pub good: u64,
    pub bad: u64,
    pub missing: u64,
    pub timeouts: u64,
    pub closes: u64,
    /// Frames that answer no request ever made to that holder on this stream.
    pub unsolicited: u64,
    /// Frames answering a request that is no longer outstanding (duplicate or late).
    pub stale: u64,
}

/// What one holder did in this get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HolderStats {
    pub good: u64,
    pub bad: u64,
    pub missing: u64,
    pub timeouts: u64,
    /// Requests outstanding now.
    pub in_flight: usize,
    /// Its current limit on outstanding requests.
    pub limit: usize,
    pub closed: bool,
}

/// Shards done, bytes done, and the totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub done_shards: usize,
    pub done_bytes: u64,
    pub total_shards: usize,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    InFlight,
    Writing,
    Done,
    Failed,
}

/// A holder of one shard and its strikes for it (`EXCLUDED` = never ask again).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    holder: u32,
    strikes: u8,
}
const EXCLUDED: u8 = u8::MAX;

#[derive(Debug)]
struct Slot {
    state: State,
    candidates: Vec<Candidate>,
}

#[derive(Debug)]
struct Holder {
    key: PublicKey,
    stats: HolderStats,
}

#[derive(Debug, Clone, Copy)]
struct Request {
    index: usize,
    holder: u32,
    deadline: u64,
}

/// The pulling side of one get. See the module docs.
#[derive(Debug)]
pub struct Receiver {
    stream: u32,
    plan: Plan,
    cfg: RecvConfig,
    slots: Vec<Slot>,
    holders: Vec<Holder>,
    pending: BTreeSet<usize>,
    failed: BTreeSet<usize>,
    requests: HashMap<u32, Request>,
    deadlines: BTreeSet<(u64, u32)>,
    writing: usize,
    next_seq: u32,
    progress: Progress,
    done_bytes: u64,
    stats: RecvStats,
}

impl Receiver {
    /// A get of `plan` on stream `stream`; `holders[i]` are the holders of shard `i` in
    /// preference order. With `resume`, shards it marks done are not fetched again; a record
    /// of another plan is refused with [`RecvError::ProgressMismatch`] (start over).
    pub fn new(
        stream: u32,
        plan: Plan,
        holders: Vec<Vec<PublicKey>>,
        cfg: RecvConfig,
        resume: Option<Progress>,
    ) -> Result<Self, RecvError> {
        if cfg.window_total == 0 || cfg.window_per_holder == 0 {
            return Err(RecvError::BadConfig("windows must be at least 1"));
        }
        if cfg.max_strikes == 0 || cfg.max_strikes == EXCLUDED {
            return Err(RecvError::BadConfig("max_strikes must be in 1..255"));
        }
        let n = plan.shards.len();
        if holders.len() != n {
            return Err(RecvError::BadPlan(format!(
                "{} holder lists for {n} shards",
                holders.len()
            )));
        }
        let progress = match resume {
            Some(p) if p.file_id() == plan.file_id() && p.total() == n => p,
            Some(_) => return Err(RecvError::ProgressMismatch),
            None => {
                Progress::new(plan.file_id, n).map_err(|e| RecvError::BadPlan(e.to_string()))?
            }
        };
        let mut index_of: HashMap<PublicKey, u32> = HashMap::new();
        let mut table: Vec<Holder> = Vec::new();
        let mut slots = Vec::with_capacity(n);
        let mut pending = BTreeSet::new();
        let mut failed = BTreeSet::new();
        let mut done_bytes = 0;
        for (i, keys) in holders.into_iter().enumerate() {
            if keys.len() > MAX_HOLDERS_PER_SHARD {
                return Err(RecvError::BadPlan(format!(
                    "shard {i} lists {} holders, more than {MAX_HOLDERS_PER_SHARD}",
                    keys.len()
                )));
            }
            let mut candidates: Vec<Candidate> = Vec::with_capacity(keys.len());
            for key in keys {
                let next = table.len() as u32;
                let h = *index_of.entry(key).or_insert(next);
                if h == next {
                    table.push(Holder {
                        key,
                        stats: HolderStats {
                            limit: cfg.window_per_holder,
                            ..HolderStats::default()
                        },
                    });
                }
                if !candidates.iter().any(|c| c.holder == h) {
                    candidates.push(Candidate {
                        holder: h,
                        strikes: 0,
                    });
                }
            }
            let state = if progress.is_done(i) {
                done_bytes += u64::from(plan.shards[i].len);
                State::Done
            } else if candidates.is_empty() {
                failed.insert(i);
                State::Failed
            } else {
                pending.insert(i);
                State::Pending
            };
            slots.push(Slot { state, candidates });
        }
        Ok(Self {
            stream,
            plan,
            cfg,
            slots,
            holders: table,
            pending,
            failed,
            requests: HashMap::new(),
            deadlines: BTreeSet::new(),
            writing: 0,
            next_seq: 0,
            progress,
            done_bytes,
            stats: RecvStats::default(),
        })
    }

    pub fn stream(&self) -> u32 {
        self.stream
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The next request to send, if the window has room and some pending shard has a holder
    /// with room. Call until `None` after every event.
    pub fn poll_request(&mut self, now_ms: u64) -> Option<(PublicKey, Want)> {
        if self.requests.len() + self.writing >= self.cfg.window_total {
            return None;
        }
        let (index, holder) = self
            .pending
            .iter()
            .take(LOOKAHEAD)
            .find_map(|&i| self.pick_holder(i).map(|h| (i, h)))?;
        self.pending.remove(&index);
        self.slots[index].state = State::InFlight;
        // Requests per shard are bounded (holders x strikes) and shards by
        // MAX_PROGRESS_SHARDS, so in practice seq does not wrap within one get; if it did,
        // only the stale/unsolicited split of the counters would blur.
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let deadline = now_ms.saturating_add(self.cfg.timeout_ms);
        self.requests.insert(
            seq,
            Request {
                index,
                holder,
                deadline,
            },
        );
        self.deadlines.insert((deadline, seq));
        let h = &mut self.holders[holder as usize];
        h.stats.in_flight += 1;
        self.stats.requests += 1;
        let want = Want {
            stream: self.stream,
            seq,
            addr: self.plan.shards[index].addr,
        };
        Some((h.key, want))
    }

    /// An answer from `from`. `Ok(Some(write))`: write it, then [`Self::handle_written`].
    /// `Ok(None)`: dropped (answers nothing outstanding; counted). `Err(BadShard)`: the holder
    /// sent wrong bytes; they are dropped and the shard is asked elsewhere.
    pub fn handle_shard(
        &mut self,
        _now_ms: u64,
        from: &PublicKey,
        shard: Shard,
    ) -> Result<Option<WriteAt>, RecvError> {
        let Some(req) = self.take_request(from, shard.stream, shard.seq) else {
            return Ok(None);
        };
        let planned = self.plan.shards[req.index];
        let ok = shard.addr == planned.addr
            && shard.bytes.len() == planned.len as usize
            && Sha256::digest(&shard.bytes)[..] == planned.addr[..];
        let holder = &mut self.holders[req.holder as usize];
        if !ok {
            holder.stats.bad += 1;
            self.stats.bad += 1;
            let err = RecvError::BadShard {
                index: req.index,
                addr: hex8(&planned.addr),
                holder: holder.key.short(),
            };
            self.exclude(req.index, req.holder);
            self.requeue(req.index);
            return Err(err);
        }
        holder.stats.good += 1;
        holder.stats.limit = (holder.stats.limit + 1).min(self.cfg.window_per_holder);
        self.stats.good += 1;
        self.slots[req.index].state = State::Writing;
        self.writing += 1;
        Ok(Some(WriteAt {
            index: req.index,
            offset: planned.offset,
            bytes: shard.bytes,
        }))
    }

    /// `from` does not have the shard: ask the next holder.
    pub fn handle_missing(&mut self, _now_ms: u64, from: &PublicKey, missing: Missing) {
        let Some(req) = self.take_request(from, missing.stream, missing.seq) else {
            return;
        };
        if missing.addr != self.plan.shards[req.index].addr {
            // Answers our request about another address: a broken or lying holder.
            self.holders[req.holder as usize].stats.bad += 1;
            self.stats.bad += 1;
        } else {
            self.holders[req.holder as usize].stats.missing += 1;
            self.stats.missing += 1;
        }
        self.exclude(req.index, req.holder);
        self.requeue(req.index);
    }

    /// `from` closed the stream: it is not asked again in this get; its outstanding requests
    /// go to other holders.
    pub fn handle_close(&mut self, from: &PublicKey, close: Close) {
        if close.stream != self.stream {
            self.stats.unsolicited += 1;
            return;
        }
        let Some(h) = self.holders.iter().position(|h| h.key == *from) else {
            self.stats.unsolicited += 1;
            return;
        };
        self.stats.closes += 1;
        self.holders[h].stats.closed = true;
        let mine: Vec<u32> = self
            .requests
            .iter()
            .filter(|(_, r)| r.holder as usize == h)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in mine {
            if let Some(req) = self.requests.remove(&seq) {
                self.deadlines.remove(&(req.deadline, seq));
                self.holders[h].stats.in_flight -= 1;
                self.requeue(req.index);
            }
        }
        // Pending shards whose only holder was this one have failed now.
        let orphans: Vec<usize> = self
            .pending
            .iter()
            .copied()
            .filter(|&i| !self.has_eligible(i))
            .collect();
        for i in orphans {
            self.pending.remove(&i);
            self.slots[i].state = State::Failed;
            self.failed.insert(i);
        }
    }

    /// Expire every request whose deadline is `<= now_ms`; each is asked again (from another
    /// holder if one is eligible). Returns how many expired.
    pub fn handle_timeout(&mut self, now_ms: u64) -> usize {
        let mut expired = 0;
        while let Some(&(deadline, seq)) = self.deadlines.first() {
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop_first();
            let Some(req) = self.requests.remove(&seq) else {
                continue;
            };
            expired += 1;
            self.stats.timeouts += 1;
            let holder = &mut self.holders[req.holder as usize];
            holder.stats.in_flight -= 1;
            holder.stats.timeouts += 1;
            holder.stats.limit = (holder.stats.limit / 2).max(1);
            if let Some(c) = self.slots[req.index]
                .candidates
                .iter_mut()
                .find(|c| c.holder == req.holder)
            {
                c.strikes = c.strikes.saturating_add(1).min(self.cfg.max_strikes);
            }
            self.requeue(req.index);
        }
        expired
    }

    /// The IO layer wrote shard `index` (from a [`WriteAt`]) to the file. Only now is it done.
    /// Returns false (and changes nothing) if `index` was not awaiting its write.
    pub fn handle_written(&mut self, index: usize) -> bool {
        match self.slots.get(index).map(|s| s.state) {
            Some(State::Writing) => {
                self.slots[index].state = State::Done;
                self.writing -= 1;
                self.progress.set_done(index);
                self.done_bytes += u64::from(self.plan.shards[index].len);
                true
            }
            _ => false,
        }
    }

    /// The earliest deadline among outstanding requests: call [`Self::handle_timeout`] then.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// Every shard is written.
    pub fn is_done(&self) -> bool {
        self.progress.done_count() == self.plan.shards.len()
    }

    /// The first shard (lowest index) with no holder left, if any: the get cannot complete.
    pub fn failed(&self) -> Option<RecvError> {
        let &index = self.failed.first()?;
        Some(RecvError::NoHolder {
            index,
            addr: hex8(&self.plan.shards[index].addr),
        })
    }

    pub fn progress(&self) -> Counts {
        Counts {
            done_shards: self.progress.done_count(),
            done_bytes: self.done_bytes,
            total_shards: self.plan.shards.len(),
            total_bytes: self.plan.total_bytes,
        }
    }

    /// The record to persist for resume (see `progress` for how to write it safely).
    pub fn progress_record(&self) -> &Progress {
        &self.progress
    }

    pub fn stats(&self) -> &RecvStats {
        &self.stats
    }

    pub fn holder_stats(&self, key: &PublicKey) -> Option<HolderStats> {
        self.holders.iter().find(|h| h.key == *key).map(|h| h.stats)
    }

    /// Requests outstanding now.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Shards handed out for writing and not yet confirmed.
    pub fn writing(&self) -> usize {
        self.writing
    }

    /// The outstanding request `seq` if `from` is the holder it went to on this stream;
    /// otherwise count the frame as unsolicited or stale and return `None`.
    fn take_request(&mut self, from: &PublicKey, stream: u32, seq: u32) -> Option<Request> {
        let matches = stream == self.stream
            && self
                .requests
                .get(&seq)
                .is_some_and(|r| self.holders[r.holder as usize].key == *from);
        if !matches {
            if stream == self.stream && seq < self.next_seq && !self.requests.contains_key(&seq) {
                self.stats.stale += 1;
            } else {
                self.stats.unsolicited += 1;
            }
            return None;
        }
        let req = self.requests.remove(&seq)?;
        self.deadlines.remove(&(req.deadline, seq));
        self.holders[req.holder as usize].stats.in_flight -= 1;
        Some(req)
    }

    fn exclude(&mut self, index: usize, holder: u32) {
        if let Some(c) = self.slots[index]
            .candidates
            .iter_mut()
            .find(|c| c.holder == holder)
        {
            c.strikes = EXCLUDED;
        }
    }

    fn eligible(&self, c: &Candidate) -> bool {
        c.strikes < self.cfg.max_strikes && !self.holders[c.holder as usize].stats.closed
    }

    fn has_eligible(&self, index: usize) -> bool {
        self.slots[index]
            .candidates
            .iter()
            .any(|c| self.eligible(c))
    }

    /// Put a shard whose request ended without a good answer back to pending, or fail it.
    fn requeue(&mut self, index: usize) {
        if self.has_eligible(index) {
            self.slots[index].state = State::Pending;
            self.pending.insert(index);
        } else {
            self.slots[index].state = State::Failed;
            self.failed.insert(index);
        }
    }

    /// The best holder with room for shard `index`: fewest strikes, then fewest outstanding,
    /// then preference order.
    fn pick_holder(&self, index: usize) -> Option<u32> {
        self.slots[index]
            .candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| self.eligible(c))
            .filter(|(_, c)| {
                let s = &self.holders[c.holder as usize].stats;
                s.in_flight < s.limit
            })
            .min_by_key(|(pos, c)| {
                (
                    c.strikes,
                    self.holders[c.holder as usize].stats.in_flight,
                    *pos,
                )
            })
            .map(|(_, c)| c.holder)
    }
}
