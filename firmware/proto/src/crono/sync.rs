//! The network-time state machine: one per node, shared by its cells.
//!
//! Quinn-proto style: `handle_*`/`set_*` take the local clock reading in, `poll_*` give
//! messages out, [`TimeSync::poll_timeout`] says when to call [`TimeSync::handle_timeout`].
//! Net time is `base_net + (local - base_local) * (1 + rate)` ([`Mapping`]); after the first
//! sync a correction only changes `rate` (a slew, bounded), except a forward jump of more than
//! the step threshold, so net time never goes backwards.

use std::collections::VecDeque;

use serde::Serialize;

use super::filter::{Filter, Sample};
use super::msg::{Nonce, TimeAns, TimeMsg, MAX_HOLD_US, MAX_STRATUM, MAX_WIRE_INT};
use crate::identity::PublicKey;

const PPB: i128 = 1_000_000_000;

/// Tunables; the defaults suit a LAN/Internet tree with tens of ms of latency.
#[derive(Debug, Clone, Copy)]
pub struct SyncConfig {
    /// Requests sent quickly after a parent change, `burst_gap_us` apart.
    pub burst: u32,
    pub burst_gap_us: u64,
    /// Poll interval until the sample window is full, then `poll_max_us`.
    pub poll_us: u64,
    pub poll_max_us: u64,
    /// Samples kept from the parent (at most 64).
    pub window: usize,
    /// Largest slew (rate change used to correct an offset), ppm.
    pub max_slew_ppm: i64,
    /// Largest slew for an offset error above `fast_slew_above_us`, ppm. A first estimate
    /// taken under load can be off by half a long round trip; at `max_slew_ppm` alone a
    /// 150 ms error backwards (which may not step) would take five minutes to slew out.
    pub fast_slew_ppm: i64,
    pub fast_slew_above_us: u64,
    /// Largest frequency correction (drift estimate), ppm. It must cover a parent that is
    /// itself slewing at `max_slew_ppm`, plus two oscillators of ±100 ppm.
    pub max_freq_ppm: i64,
    /// An offset is corrected over this time (or longer, at `max_slew_ppm`).
    pub slew_time_us: u64,
    /// A correction moving net time forward by more than this steps instead of slewing.
    pub step_us: u64,
    /// Bootstrap ends this long after its first answer, whatever else arrived.
    pub bootstrap_wait_us: u64,
    /// Bootstrap ends once this many distinct peers answered (and `bootstrap_settle_us` passed).
    pub bootstrap_min: usize,
    pub bootstrap_settle_us: u64,
    /// Outstanding requests (at most 16); the oldest is dropped for a new one.
    pub max_outstanding: usize,
    pub request_timeout_us: u64,
    /// Round trips longer than this are refused as samples.
    pub max_delay_us: u64,
    /// Error growth allowance for an unmeasured frequency error, ppm.
    pub drift_allowance_ppm: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            burst: 4,
            burst_gap_us: 250_000,
            poll_us: 1_000_000,
            poll_max_us: 1_000_000,
            window: 64,
            max_slew_ppm: 500,
            fast_slew_ppm: 50_000,
            fast_slew_above_us: 2_000,
            max_freq_ppm: 1000,
            slew_time_us: 3_000_000,
            step_us: 1_000_000,
            bootstrap_wait_us: 3_000_000,
            bootstrap_min: 3,
            bootstrap_settle_us: 500_000,
            max_outstanding: 16,
            request_timeout_us: 2_000_000,
            max_delay_us: 2_000_000,
            drift_allowance_ppm: 200,
        }
    }
}

/// Errors of [`TimeSync::handle_answer`]; each one is counted in `rejected`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("answer to no outstanding request")]
    UnknownNonce,
    #[error("answer from another key than the request went to")]
    WrongKey,
    #[error("answer after the request timed out")]
    TimedOut,
    #[error("second bootstrap answer from the same key")]
    DuplicatePeer,
    #[error("answerer is not synced")]
    NotSynced,
    #[error("round trip delay {0} µs is negative or too large")]
    BadDelay(i128),
    #[error("answer timestamps out of range")]
    OutOfRange,
}

/// The local-to-net mapping, small and Copy so the I/O layer can publish it to every cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mapping {
    pub base_local: u64,
    pub base_net: u64,
    /// Rate correction in parts per billion.
    pub rate_ppb: i64,
    /// Net time never read below this (the value at the last re-basing).
    pub floor_net: u64,
}

impl Mapping {
    /// Net time at a local reading; monotone in `local`, never below `floor_net`.
    pub fn net_at(&self, local: u64) -> u64 {
        let net = self.line_at(local).max(i128::from(self.floor_net));
        u64::try_from(net.clamp(0, i128::from(u64::MAX))).unwrap_or(u64::MAX)
    }

    /// The mapping's line at `local`, without the floor: for a reading taken before the last
    /// re-basing it is what the clock showed then (the mapping is continuous at every
    /// re-basing, and its rate changed by at most a slew), where [`Mapping::net_at`] would
    /// return the floor.
    fn line_at(&self, local: u64) -> i128 {
        let dl = i128::from(local) - i128::from(self.base_local);
        i128::from(self.base_net) + dl + (dl * i128::from(self.rate_ppb)).div_euclid(PPB)
    }

    /// Net time at a past local reading (see `line_at`), at least 0.
    pub fn net_then(&self, local: u64) -> u64 {
        u64::try_from(self.line_at(local).clamp(0, i128::from(u64::MAX))).unwrap_or(u64::MAX)
    }
}

/// Where a node's time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TimeSource {
    Local,
    Bootstrap,
    Parent(PublicKey),
}

/// What `borg status` shows about network time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TimeStatus {
    pub synced: bool,
    /// net - local, µs.
    pub offset_us: i64,
    pub error_bound_us: u64,
    pub source: TimeSource,
    pub stratum: u8,
    pub samples: u64,
    pub rejected: u64,
    /// The frequency correction towards the parent, ppb (diagnostics).
    pub freq_ppb: i64,
    /// Sample windows restarted because a sample did not fit (diagnostics).
    pub restarts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Bootstrap,
    Parent,
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    nonce: Nonce,
    t1: u64,
    to: Option<PublicKey>,
    purpose: Purpose,
}

#[derive(Debug, Clone)]
enum Boot {
    Idle,
    Collecting {
        first_answer: Option<u64>,
        answers: Vec<(PublicKey, i128, u64, u8)>,
    },
    Done,
}

/// The sync state machine.
#[derive(Debug, Clone)]
pub struct TimeSync {
    cfg: SyncConfig,
    floor_us: u64,
    map: Mapping,
    last_local: u64,
    root: bool,
    parent: Option<PublicKey>,
    synced: bool,
    source: TimeSource,
    stratum: u8,
    /// Root reference: net - local the root keeps (0, or what it had when it became root).
    root_offset: i128,
    filter: Filter,
    /// Error bound at `err_at` (local), growing with the drift allowance after.
    err_us: u64,
    err_at: u64,
    /// Target offset at `err_at` the slew is heading to (for the residual in the bound).
    target: i128,
    slew_end: Option<u64>,
    outstanding: VecDeque<Outstanding>,
    expired: VecDeque<Nonce>,
    boot: Boot,
    next_poll: Option<u64>,
    burst_left: u32,
    n_samples: u64,
    n_rejected: u64,
}

impl TimeSync {
    pub fn new(mut cfg: SyncConfig, floor_us: u64) -> Self {
        cfg.max_outstanding = cfg.max_outstanding.clamp(1, 16);
        cfg.window = cfg.window.clamp(1, 64);
        cfg.max_slew_ppm = cfg.max_slew_ppm.clamp(1, 10_000);
        cfg.fast_slew_ppm = cfg.fast_slew_ppm.clamp(cfg.max_slew_ppm, 100_000);
        cfg.max_freq_ppm = cfg.max_freq_ppm.clamp(0, 10_000);
        cfg.slew_time_us = cfg.slew_time_us.max(1);
        Self {
            cfg,
            floor_us,
            map: Mapping {
                base_local: 0,
                base_net: floor_us,
                rate_ppb: 0,
                floor_net: floor_us,
            },
            last_local: 0,
            root: false,
            parent: None,
            synced: false,
            source: TimeSource::Local,
            stratum: MAX_STRATUM,
            root_offset: 0,
            filter: Filter::new(cfg.window, cfg.max_freq_ppm, cfg.drift_allowance_ppm),
            err_us: MAX_WIRE_INT,
            err_at: 0,
            target: 0,
            slew_end: None,
            outstanding: VecDeque::new(),
            expired: VecDeque::new(),
            boot: Boot::Idle,
            next_poll: None,
            burst_left: 0,
            n_samples: 0,
            n_rejected: 0,
        }
    }

    /// Net time at a local reading.
    pub fn net_at(&self, local_us: u64) -> u64 {
        self.map.net_at(local_us)
    }

    pub fn mapping(&self) -> Mapping {
        self.map
    }

    /// Before anything else: the local clock must not go backwards; if it did (a stepped
    /// wall clock under the caller), re-base so net time stalls instead, and let the
    /// reference (root) slew it back.
    fn observe(&mut self, now: u64) {
        if self.last_local == 0 && self.map.base_local == 0 {
            // First reading: start at max(floor, local).
            self.map = Mapping {
                base_local: now,
                base_net: now.max(self.floor_us),
                rate_ppb: 0,
                floor_net: now.max(self.floor_us),
            };
        } else if now < self.last_local {
            let held = self.map.net_at(self.last_local);
            self.map = Mapping {
                base_local: now,
                base_net: held,
                rate_ppb: self.map.rate_ppb,
                floor_net: held,
            };
            self.slew_end = Some(now);
        }
        self.last_local = now;
    }

    fn offset_now(&self, now: u64) -> i128 {
        i128::from(self.map.net_at(now)) - i128::from(now)
    }

    fn rebase(&mut self, now: u64, net: u64, rate_ppb: i64) {
        let bound = (self.cfg.max_freq_ppm + self.cfg.fast_slew_ppm) * 1000;
        self.map = Mapping {
            base_local: now,
            base_net: net,
            rate_ppb: rate_ppb.clamp(-bound, bound),
            floor_net: net,
        };
    }

    /// Steer the mapping towards `target` (net - local at `now`) with frequency `freq`.
    fn steer(&mut self, now: u64, target: i128, freq: i64) {
        let cur = self.map.net_at(now);
        let e = target - self.offset_now(now);
        let step_to = u64::try_from((i128::from(now) + target).clamp(0, i128::from(MAX_WIRE_INT)))
            .unwrap_or(0)
            .max(self.floor_us);
        self.target = target;
        self.err_at = now;
        if !self.synced || e > i128::from(self.cfg.step_us) {
            // The first correction may go either way; later ones only forward.
            self.rebase(now, step_to, freq);
            self.slew_end = None;
            self.synced = true;
            return;
        }
        let max = if e.unsigned_abs() > u128::from(self.cfg.fast_slew_above_us) {
            i128::from(self.cfg.fast_slew_ppm) * 1000
        } else {
            i128::from(self.cfg.max_slew_ppm) * 1000
        };
        let tau = i128::from(self.cfg.slew_time_us);
        let slew = (e * PPB / tau).clamp(-max, max);
        let slew_i64 = i64::try_from(slew).unwrap_or(0);
        self.rebase(now, cur, freq.saturating_add(slew_i64));
        self.slew_end = if slew == 0 {
            None
        } else {
            let dur = (e * PPB / slew).clamp(0, i128::from(MAX_WIRE_INT));
            Some(now.saturating_add(u64::try_from(dur).unwrap_or(0)))
        };
    }

    /// Tree change: our parent (None = no parent; see also [`TimeSync::set_root`]).
    pub fn set_parent(&mut self, now_local: u64, parent: Option<PublicKey>) {
        self.observe(now_local);
        if parent == self.parent && parent.is_some() {
            return;
        }
        if parent.is_some() {
            self.root = false;
        }
        self.parent = parent;
        self.filter.clear();
        self.outstanding.retain(|o| o.purpose == Purpose::Bootstrap);
        self.burst_left = self.cfg.burst;
        self.next_poll = parent.map(|_| now_local);
    }

    /// We are the tree root, or alone: our reference is the local clock.
    pub fn set_root(&mut self, now_local: u64) {
        self.observe(now_local);
        self.parent = None;
        self.filter.clear();
        self.next_poll = None;
        self.outstanding.retain(|o| o.purpose == Purpose::Bootstrap);
        if !self.root {
            self.root = true;
            self.root_offset = if self.synced {
                self.offset_now(now_local)
            } else {
                (i128::from(self.floor_us) - i128::from(now_local)).max(0)
            };
        }
        self.root_steer(now_local);
    }

    fn root_steer(&mut self, now: u64) {
        if !self.root || matches!(self.boot, Boot::Collecting { .. }) {
            return;
        }
        if !self.synced {
            self.root_offset = (i128::from(self.floor_us) - i128::from(now)).max(0);
        }
        self.source = TimeSource::Local;
        self.stratum = 0;
        self.err_us = 0;
        let e = self.root_offset - self.offset_now(now);
        if !self.synced || e != 0 {
            self.steer(now, self.root_offset, 0);
        }
    }

    fn push_outstanding(&mut self, o: Outstanding) {
        while self.outstanding.len() >= self.cfg.max_outstanding {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back(o);
    }

    /// A bootstrap request for one contact (call once per contact, with fresh random bytes).
    pub fn bootstrap_request(&mut self, now_local: u64, nonce_bytes: [u8; 16]) -> TimeMsg {
        self.observe(now_local);
        if !matches!(self.boot, Boot::Collecting { .. }) {
            self.boot = Boot::Collecting {
                first_answer: None,
                answers: Vec::new(),
            };
        }
        let nonce = Nonce::from_bytes(nonce_bytes);
        self.push_outstanding(Outstanding {
            nonce,
            t1: now_local,
            to: None,
            purpose: Purpose::Bootstrap,
        });
        TimeMsg::Req { nonce }
    }

    /// The next request to the parent, if one is due.
    pub fn poll_transmit(
        &mut self,
        now_local: u64,
        nonce_bytes: [u8; 16],
    ) -> Option<(PublicKey, TimeMsg)> {
        self.observe(now_local);
        let parent = self.parent?;
        if now_local < self.next_poll? {
            return None;
        }
        let gap = if self.burst_left > 0 {
            self.burst_left -= 1;
            self.cfg.burst_gap_us
        } else if self.filter.is_full() {
            self.cfg.poll_max_us
        } else {
            self.cfg.poll_us
        };
        self.next_poll = Some(now_local.saturating_add(gap));
        let nonce = Nonce::from_bytes(nonce_bytes);
        self.push_outstanding(Outstanding {
            nonce,
            t1: now_local,
            to: Some(parent),
            purpose: Purpose::Parent,
        });
        Some((parent, TimeMsg::Req { nonce }))
    }

    /// An answer arrived from `from` at `now_local`.
    pub fn handle_answer(
        &mut self,
        now_local: u64,
        from: &PublicKey,
        ans: &TimeAns,
    ) -> Result<(), SyncError> {
        self.handle_answer_at(now_local, now_local, from, ans)
    }

    /// An answer that was read off the link at `t4_local` is handled at `now_local` (the I/O
    /// layer stamps frames as they arrive; a timer may have run in between, so `t4_local` can
    /// be older than readings already seen without the local clock having gone back).
    pub fn handle_answer_at(
        &mut self,
        now_local: u64,
        t4_local: u64,
        from: &PublicKey,
        ans: &TimeAns,
    ) -> Result<(), SyncError> {
        self.observe(now_local);
        let r = self.accept(t4_local.min(now_local), from, ans);
        if r.is_err() {
            self.n_rejected = self.n_rejected.saturating_add(1);
        }
        r
    }

    fn accept(&mut self, now: u64, from: &PublicKey, ans: &TimeAns) -> Result<(), SyncError> {
        let Some(i) = self.outstanding.iter().position(|o| o.nonce == ans.nonce) else {
            if self.expired.contains(&ans.nonce) {
                return Err(SyncError::TimedOut);
            }
            return Err(SyncError::UnknownNonce);
        };
        let o = self.outstanding[i];
        if o.to.is_some_and(|k| k != *from) {
            return Err(SyncError::WrongKey);
        }
        if o.purpose == Purpose::Bootstrap {
            if let Boot::Collecting { answers, .. } = &self.boot {
                if answers.iter().any(|a| a.0 == *from) {
                    return Err(SyncError::DuplicatePeer);
                }
            }
        }
        self.outstanding.remove(i);
        if now.saturating_sub(o.t1) > self.cfg.request_timeout_us {
            return Err(SyncError::TimedOut);
        }
        if ans.tx_us < ans.rx_us
            || ans.tx_us - ans.rx_us > MAX_HOLD_US
            || ans.tx_us > MAX_WIRE_INT
            || ans.err_us > MAX_WIRE_INT
            || ans.stratum > MAX_STRATUM
        {
            return Err(SyncError::OutOfRange);
        }
        if !ans.synced {
            return Err(SyncError::NotSynced);
        }
        let (t1, t2, t3, t4) = (
            i128::from(o.t1),
            i128::from(ans.rx_us),
            i128::from(ans.tx_us),
            i128::from(now),
        );
        let delay = (t4 - t1) - (t3 - t2);
        if delay < 0 || delay > i128::from(self.cfg.max_delay_us) {
            return Err(SyncError::BadDelay(delay));
        }
        let s = Sample {
            t: (t1 + t4) / 2,
            up: t2 - t1,
            lo: t3 - t4,
            perr: ans.err_us,
            stratum: ans.stratum,
        };
        self.n_samples = self.n_samples.saturating_add(1);
        match o.purpose {
            Purpose::Bootstrap => {
                if let Boot::Collecting {
                    first_answer,
                    answers,
                } = &mut self.boot
                {
                    first_answer.get_or_insert(now);
                    let half = u64::try_from((s.up - s.lo) / 2).unwrap_or(0);
                    answers.push((
                        *from,
                        (s.up + s.lo) / 2,
                        half.saturating_add(ans.err_us),
                        ans.stratum,
                    ));
                }
                self.boot_check(now);
            }
            Purpose::Parent => {
                self.filter.add(s);
                self.parent_steer(now);
            }
        }
        Ok(())
    }

    fn parent_steer(&mut self, now: u64) {
        if matches!(self.boot, Boot::Collecting { .. }) {
            return; // the first correction comes from the bootstrap
        }
        let Some((est, lo, up)) = self.filter.offset_at(i128::from(now)) else {
            return;
        };
        let (Some(parent), Some((perr, pstratum))) = (self.parent, self.filter.parent_err()) else {
            return;
        };
        // The estimate lies inside the bounds: its error is at most the larger distance to
        // either bound.
        let half = u64::try_from((est - lo).max(up - est).max(0)).unwrap_or(u64::MAX);
        let age = u64::try_from(self.filter.span()).unwrap_or(0);
        self.steer(now, est, self.filter.freq_ppb());
        self.err_us = perr
            .saturating_add(half)
            .saturating_add(age.saturating_mul(self.cfg.drift_allowance_ppm) / 1_000_000)
            .saturating_add(100);
        self.source = TimeSource::Parent(parent);
        self.stratum = pstratum.saturating_add(1).min(MAX_STRATUM);
    }

    fn boot_check(&mut self, now: u64) {
        let Boot::Collecting {
            first_answer,
            answers,
        } = &self.boot
        else {
            return;
        };
        let pending = self
            .outstanding
            .iter()
            .any(|o| o.purpose == Purpose::Bootstrap);
        let done = match first_answer {
            None => !pending, // every request timed out
            Some(first) => {
                !pending
                    || now >= first.saturating_add(self.cfg.bootstrap_wait_us)
                    || (answers.len() >= self.cfg.bootstrap_min
                        && now >= first.saturating_add(self.cfg.bootstrap_settle_us))
            }
        };
        if !done {
            return;
        }
        let mut answers = answers.clone();
        self.boot = Boot::Done;
        if answers.is_empty() {
            self.root_steer(now);
            return;
        }
        answers.sort_by_key(|a| a.1);
        let n = answers.len();
        let (a, b) = (answers[(n - 1) / 2], answers[n / 2]);
        let median = (a.1 + b.1).div_euclid(2);
        let bound = (a.1 - median)
            .unsigned_abs()
            .max((b.1 - median).unsigned_abs());
        let bound = u64::try_from(bound).unwrap_or(u64::MAX);
        self.steer(now, median, self.filter.freq_ppb());
        self.err_us = bound.saturating_add(a.2.max(b.2));
        self.source = TimeSource::Bootstrap;
        self.stratum = a.3.max(b.3).saturating_add(1).min(MAX_STRATUM);
        if self.root {
            self.root_offset = median;
            self.source = TimeSource::Local;
            self.stratum = 0;
            self.err_us = 0;
        } else {
            self.parent_steer(now);
        }
    }

    /// Our answer to a request received at `rx_local` and sent at `tx_local`.
    pub fn answer(&mut self, rx_local: u64, tx_local: u64, nonce: Nonce) -> TimeAns {
        self.observe(rx_local.max(tx_local));
        // The request may have been read before the mapping was last re-based (a sample from
        // our parent handled in between): `net_at` would give the floor, a later time than
        // the clock showed, which shortens the asker's round trip and biases its offset.
        let rx = self.map.net_then(rx_local).min(MAX_WIRE_INT);
        let tx = self
            .map
            .net_at(tx_local)
            .clamp(rx, rx.saturating_add(MAX_HOLD_US))
            .min(MAX_WIRE_INT);
        TimeAns {
            nonce,
            rx_us: rx,
            tx_us: tx.max(rx),
            stratum: self.stratum,
            synced: self.synced,
            err_us: self.error_bound(tx_local).min(MAX_WIRE_INT),
        }
    }

    fn error_bound(&self, now: u64) -> u64 {
        if !self.synced {
            return MAX_WIRE_INT;
        }
        if self.root && self.source == TimeSource::Local {
            return 0;
        }
        let age = now.saturating_sub(self.err_at);
        let drift = age.saturating_mul(self.cfg.drift_allowance_ppm) / 1_000_000;
        let target_now = self.target + i128::from(age) * i128::from(self.filter.freq_ppb()) / PPB;
        let residual =
            u64::try_from((target_now - self.offset_now(now)).unsigned_abs()).unwrap_or(u64::MAX);
        self.err_us
            .saturating_add(drift)
            .saturating_add(residual)
            .min(MAX_WIRE_INT)
    }

    /// Timers: expire requests, end the bootstrap or a slew.
    pub fn handle_timeout(&mut self, now_local: u64) {
        self.observe(now_local);
        let timeout = self.cfg.request_timeout_us;
        while let Some(i) = self
            .outstanding
            .iter()
            .position(|o| now_local.saturating_sub(o.t1) > timeout)
        {
            if let Some(o) = self.outstanding.remove(i) {
                if self.expired.len() >= 16 {
                    self.expired.pop_front();
                }
                self.expired.push_back(o.nonce);
            }
        }
        self.boot_check(now_local);
        if self.slew_end.is_some_and(|t| now_local >= t) {
            self.slew_end = None;
            let net = self.map.net_at(now_local);
            self.rebase(now_local, net, self.filter.freq_ppb());
            if self.root {
                self.root_steer(now_local);
            } else if !self.filter.is_empty() {
                self.parent_steer(now_local);
            }
        } else if self.root {
            self.root_steer(now_local);
        }
    }

    /// Next local deadline at which to call [`TimeSync::handle_timeout`] / `poll_transmit`.
    pub fn poll_timeout(&self) -> Option<u64> {
        let timeout = self.cfg.request_timeout_us;
        let mut next = self.next_poll;
        let mut take = |t: Option<u64>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        take(self.slew_end);
        for o in &self.outstanding {
            take(Some(o.t1.saturating_add(timeout).saturating_add(1)));
        }
        if let Boot::Collecting {
            first_answer: Some(f),
            answers,
        } = &self.boot
        {
            // The settle deadline only matters once enough answers are in; before that it
            // would be a deadline in the past, asked for again and again.
            if answers.len() >= self.cfg.bootstrap_min {
                take(Some(f.saturating_add(self.cfg.bootstrap_settle_us)));
            }
            take(Some(f.saturating_add(self.cfg.bootstrap_wait_us)));
        }
        next
    }

    pub fn status(&self, now_local: u64) -> TimeStatus {
        let off = self
            .offset_now(now_local)
            .clamp(i128::from(i64::MIN), i128::from(i64::MAX));
        TimeStatus {
            synced: self.synced,
            offset_us: i64::try_from(off).unwrap_or(0),
            error_bound_us: self.error_bound(now_local),
            source: self.source,
            stratum: self.stratum,
            samples: self.n_samples,
            rejected: self.n_rejected,
            freq_ppb: self.filter.freq_ppb(),
            restarts: self.filter.restarts(),
        }
    }
}
