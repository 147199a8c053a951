//! The node's clock: one network-time source per node, shared by all its cells.
//!
//! Two readings:
//! - **local**: the node's own free-running clock in µs since the Unix epoch: the system
//!   clock read once at start (plus a test-only offset, `--clock-offset-s`), advanced by the
//!   monotonic clock (`tokio::time::Instant`, so actor tests run with paused time). It never
//!   steps, not even when PID 1 sets the system clock.
//! - **network**: what every envelope `ts` and every ±30 s window check uses. Until the
//!   cronoTree cell has synced, it is the local clock raised to the floor (the build time or
//!   the last saved network time, whichever is later: a Pi 4 without RTC boots at 1970). Once
//!   synced it is the mapping the cronoTree cell publishes ([`NetClock::set_mapping`]).
//!
//! Network time never goes backwards in a process: every reading is at least the previous
//! one ([`NetClock::now_us`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use borg_proto::crono::{TimeSource, TimeStatus};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Maps a local reading (µs) to network time (µs).
pub type MappingFn = Box<dyn Fn(u64) -> u64 + Send + Sync>;

/// The shared clock of one node (all its cells hold an `Arc` of it).
pub struct NetClock {
    start: tokio::time::Instant,
    start_local_us: u64,
    floor_us: u64,
    mapping: Mutex<Option<MappingFn>>,
    last_us: AtomicU64,
    /// Set once a time cell has synced network time (bootstrap, parent or root).
    synced: AtomicBool,
    /// Set when a time cell runs in this node: cells wait (bounded) for it before joining.
    has_source: AtomicBool,
    /// What the time cell last reported (shown as `time` in every cell's status).
    status: Mutex<Option<TimeStatus>>,
}

impl std::fmt::Debug for NetClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetClock")
            .field("local_us", &self.local_us())
            .field("floor_us", &self.floor_us)
            .finish_non_exhaustive()
    }
}

/// The system clock in µs since the Unix epoch (0 if it reads before 1970).
pub fn system_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The system clock in ms since the Unix epoch: for clients outside any node (the CLI, tests),
/// which sign their requests with their own clock.
pub fn system_ms() -> u64 {
    system_us() / 1000
}

impl NetClock {
    /// A clock whose local reading starts at the system clock plus `offset_s` seconds, with
    /// network time never below `floor_us`.
    pub fn new(offset_s: i64, floor_us: u64) -> Arc<Self> {
        let sys = i128::from(system_us());
        let local = (sys + i128::from(offset_s) * 1_000_000).clamp(0, i128::from(u64::MAX >> 1));
        Self::starting_at(local as u64, floor_us)
    }

    /// A clock whose local reading starts at `local_us` now (tests).
    pub fn starting_at(local_us: u64, floor_us: u64) -> Arc<Self> {
        Arc::new(Self {
            start: tokio::time::Instant::now(),
            start_local_us: local_us,
            floor_us,
            mapping: Mutex::new(None),
            last_us: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            has_source: AtomicBool::new(false),
            status: Mutex::new(None),
        })
    }

    /// The local reading now (µs).
    pub fn local_us(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.start_local_us.saturating_add(elapsed)
    }

    /// The local reading in ms: monotonic, never steps. Timers (heartbeats, repairs, probe
    /// rounds) run on this, so a network-time correction never fires them all at once.
    pub fn mono_ms(&self) -> u64 {
        self.local_us() / 1000
    }

    /// The floor network time never goes below.
    pub fn floor_us(&self) -> u64 {
        self.floor_us
    }

    /// Network time at the local reading `local` without the never-backwards clamp.
    pub fn net_at(&self, local: u64) -> u64 {
        let mapped = match self.mapping.lock() {
            Ok(m) => m.as_ref().map(|f| f(local)),
            // A panic while holding the lock left the last mapping in place; still use it.
            Err(p) => p.into_inner().as_ref().map(|f| f(local)),
        };
        match mapped {
            Some(net) => net.max(self.floor_us),
            None => {
                // Unsynced: the local clock, but a clock below the floor runs from the floor.
                if self.start_local_us >= self.floor_us {
                    local
                } else {
                    self.floor_us
                        .saturating_add(local.saturating_sub(self.start_local_us))
                }
            }
        }
    }

    /// Network time now (µs); never less than an earlier reading in this process.
    pub fn now_us(&self) -> u64 {
        let t = self.net_at(self.local_us());
        let prev = self.last_us.fetch_max(t, Ordering::AcqRel);
        t.max(prev)
    }

    /// Network time now (ms), for envelope `ts`.
    pub fn now_ms(&self) -> u64 {
        self.now_us() / 1000
    }

    /// Install the mapping from local to network time (the cronoTree cell does, whenever its
    /// estimate changes). Readings stay monotone across the switch.
    ///
    /// The first mapping may move network time back (a clock that ran ahead of the network
    /// until the first sync): only synced readings never go backwards.
    pub fn set_mapping(&self, f: MappingFn) {
        if !self.is_synced() {
            self.last_us.store(0, Ordering::Release);
        }
        match self.mapping.lock() {
            Ok(mut m) => *m = Some(f),
            Err(p) => *p.into_inner() = Some(f),
        }
    }

    /// A time cell runs in this node (it will publish a mapping).
    pub fn expect_source(&self) {
        self.has_source.store(true, Ordering::Release);
    }

    /// Whether a time cell runs in this node.
    pub fn has_source(&self) -> bool {
        self.has_source.load(Ordering::Acquire)
    }

    /// Whether network time is synced (a time cell said so).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The time cell's report: its status, and whether network time is now synced.
    pub fn publish_status(&self, status: TimeStatus) {
        self.synced.store(status.synced, Ordering::Release);
        match self.status.lock() {
            Ok(mut s) => *s = Some(status),
            Err(p) => *p.into_inner() = Some(status),
        }
    }

    /// The `time` object of every cell's status: sync state, offset (network minus local
    /// clock), error bound, source, stratum, network time now and its offset from the system
    /// clock (in tests all processes share CLOCK_REALTIME, so that shows the true error).
    pub fn status_json(&self) -> Value {
        let st = match self.status.lock() {
            Ok(s) => *s,
            Err(p) => *p.into_inner(),
        };
        let now_us = self.now_us();
        let offset_us = i128::from(now_us) - i128::from(self.local_us());
        let sys_off = self.system_offset_us();
        let ms = |us: i128| us as f64 / 1000.0;
        let (source, stratum, bound, samples, rejected, freq_ppm, restarts) = match st {
            Some(st) => (
                match st.source {
                    TimeSource::Local => "local".to_string(),
                    TimeSource::Bootstrap => "bootstrap".to_string(),
                    TimeSource::Parent(k) => k.to_b64(),
                },
                json!(st.stratum),
                json!(ms(i128::from(st.error_bound_us))),
                st.samples,
                st.rejected,
                st.freq_ppb as f64 / 1000.0,
                st.restarts,
            ),
            None => ("local".to_string(), Value::Null, Value::Null, 0, 0, 0.0, 0),
        };
        json!({
            "synced": self.is_synced(),
            "offset_ms": ms(offset_us),
            "error_bound_ms": bound,
            "source": source,
            "stratum": stratum,
            "now_ms": now_us / 1000,
            "system_offset_ms": ms(i128::from(sys_off)),
            "samples": samples,
            "rejected": rejected,
            "freq_ppm": freq_ppm,
            "window_restarts": restarts,
        })
    }

    /// Network time minus the system clock, in µs (observability: in tests every process
    /// shares the host's CLOCK_REALTIME, so this shows each node's true offset).
    pub fn system_offset_us(&self) -> i64 {
        let net = i128::from(self.now_us());
        let sys = i128::from(system_us());
        (net - sys).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn unsynced_clock_below_the_floor_runs_from_the_floor() {
        let c = NetClock::starting_at(1_000, 5_000_000);
        assert_eq!(c.now_us(), 5_000_000);
        tokio::time::advance(std::time::Duration::from_millis(3)).await;
        assert_eq!(c.now_us(), 5_003_000);
        assert_eq!(c.local_us(), 4_000);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_mapping_may_go_back_later_ones_do_not() {
        let c = NetClock::starting_at(10_000_000, 0);
        assert_eq!(c.now_us(), 10_000_000);
        c.set_mapping(Box::new(|l| l.saturating_sub(4_000_000)));
        assert_eq!(c.now_us(), 6_000_000, "unsynced time is only a guess");
        c.publish_status(synced());
        assert!(c.is_synced());
        c.set_mapping(Box::new(|l| l.saturating_sub(5_000_000)));
        assert_eq!(c.now_us(), 6_000_000, "synced time is clamped");
    }

    fn synced() -> TimeStatus {
        TimeStatus {
            synced: true,
            offset_us: 0,
            error_bound_us: 0,
            source: TimeSource::Local,
            stratum: 0,
            samples: 0,
            rejected: 0,
            freq_ppb: 0,
            restarts: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_mapping_that_goes_back_does_not_move_readings_back() {
        let c = NetClock::starting_at(10_000_000, 0);
        c.publish_status(synced());
        let before = c.now_us();
        c.set_mapping(Box::new(|l| l.saturating_sub(1_000_000)));
        assert_eq!(c.now_us(), before, "clamped at the last reading");
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        assert_eq!(c.now_us(), 11_000_000);
        c.set_mapping(Box::new(|l| l + 5_000_000));
        assert_eq!(c.now_us(), 17_000_000);
    }

    #[test]
    fn offset_moves_the_local_clock() {
        let c = NetClock::new(-1_700_000_000, 0);
        let expect = system_us() - 1_700_000_000_000_000;
        assert!(c.local_us().abs_diff(expect) < 5_000_000);
    }
}
