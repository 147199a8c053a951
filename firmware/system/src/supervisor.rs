//! The cell supervisor: one process per cell, restarted with capped exponential backoff.
//!
//! The supervisor never calls `wait` itself. PID 1 reaps every child with `waitpid(-1)` in one
//! place and hands each `(pid, status)` to [`Supervisor::on_exit`], which recognizes its own
//! cells by pid; everything else is an orphan the caller just logs. That way no reaper can steal
//! a cell's exit status.
//!
//! The restart policy is the pure function [`restart_delay`] (with [`RestartPolicy`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sys::{self, ExitStatus};

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The cell's data directory could not be prepared.
    #[error("cannot prepare data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The cell process could not be started.
    #[error("cannot start cell {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    /// Writing the state file failed.
    #[error("cannot write state file {path}: {source}")]
    StateFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delay after the first failure.
    pub base: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
    /// A run at least this long counts as healthy and resets the failure count.
    pub healthy_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            base: Duration::from_millis(500),
            max: Duration::from_secs(60),
            healthy_after: Duration::from_secs(30),
        }
    }
}

/// Consecutive failures after a run of `ran_for` that ended a streak of `previous` failures.
/// A long, healthy run starts a new streak.
pub fn next_failure_count(policy: &RestartPolicy, previous: u32, ran_for: Duration) -> u32 {
    if ran_for >= policy.healthy_after {
        1
    } else {
        previous.saturating_add(1)
    }
}

/// How long to wait before restarting after `failures` consecutive failures (1 = first):
/// `base * 2^(failures-1)`, capped at `max`. Zero failures means start now.
pub fn restart_delay(policy: &RestartPolicy, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let shift = (failures - 1).min(31);
    let factor = 1u32 << shift;
    policy
        .base
        .checked_mul(factor)
        .map_or(policy.max, |d| d.min(policy.max))
}

/// Bounds of the liveness check on a cell's monitor: a cell whose monitor stops answering is
/// frozen (blocked in write(2), deadlocked, stopped) and is killed so the normal restart path
/// brings it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Time a freshly started cell has to answer for the first time.
    pub startup: Duration,
    /// Longest a running cell may go without answering once it has answered.
    pub silence: Duration,
}

/// Default [`Liveness::startup`]: the base cell waits up to 60 s for a DHCP address before it
/// opens its monitor (borg-cells `wait_for_primary_ip`), plus 30 s for a slow Pi.
pub const LIVENESS_STARTUP: Duration = Duration::from_secs(90);

/// Default [`Liveness::silence`]: the monitor is polled every second with an 800 ms timeout,
/// so this is 30 missed polls in a row; a node merely busy with a flood still answers within
/// that, a frozen one never does.
pub const LIVENESS_SILENCE: Duration = Duration::from_secs(30);

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            startup: LIVENESS_STARTUP,
            silence: LIVENESS_SILENCE,
        }
    }
}

/// Is a cell started at `started_at` hung at `now`, given the last time its monitor answered
/// (`last_ok`, possibly from an earlier run of the cell)? Pure, for tests.
pub fn is_hung(
    live: &Liveness,
    started_at: Instant,
    last_ok: Option<Instant>,
    now: Instant,
) -> bool {
    match last_ok.filter(|t| *t >= started_at) {
        Some(t) => now.saturating_duration_since(t) > live.silence,
        None => now.saturating_duration_since(started_at) > live.startup,
    }
}

/// What to run for one cell.
#[derive(Debug, Clone)]
pub struct CellSpec {
    /// Cell type name (`peerTreeNet`, ...).
    pub name: String,
    /// Program to run (normally our own executable).
    pub program: PathBuf,
    /// Arguments (normally `cell NAME --data DIR [--join ..]`).
    pub args: Vec<String>,
    /// The cell's data directory (created and handed to the cell's user).
    pub data_dir: PathBuf,
    /// Run as this uid/gid (when we are root).
    pub user: Option<(u32, u32)>,
    /// Extra environment for the process.
    pub env: Vec<(String, String)>,
}

/// A cell's current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not started yet.
    Pending,
    /// Running.
    Running,
    /// Exited; waiting for the backoff delay to pass.
    Backoff,
    /// Stopped on purpose (shutdown).
    Stopped,
}

/// What the supervisor reports about one cell (console `cells`, state file, tests).
#[derive(Debug, Clone, Serialize)]
pub struct CellReport {
    /// Cell name.
    pub name: String,
    /// Phase.
    pub phase: Phase,
    /// Pid when running.
    pub pid: Option<i32>,
    /// Times the cell has been started.
    pub starts: u32,
    /// Times the cell was restarted after an exit.
    pub restarts: u32,
    /// Consecutive failures in the current streak.
    pub failures: u32,
    /// The last exit status.
    pub last_exit: Option<ExitStatus>,
    /// Milliseconds until the next restart attempt (in backoff).
    pub next_start_in_ms: Option<u64>,
    /// The last start error, if spawning failed.
    pub last_error: Option<String>,
    /// Times the cell was killed because its monitor stopped answering.
    pub hung_kills: u32,
}

struct Cell {
    spec: CellSpec,
    phase: Phase,
    pid: Option<i32>,
    started_at: Option<Instant>,
    starts: u32,
    restarts: u32,
    failures: u32,
    last_exit: Option<ExitStatus>,
    next_start: Option<Instant>,
    last_error: Option<String>,
    hung_kills: u32,
    /// SIGKILL already sent to the current run (for being hung).
    killed: bool,
}

/// The supervisor of all cells.
pub struct Supervisor {
    cells: Vec<Cell>,
    policy: RestartPolicy,
    stopping: bool,
    by_pid: BTreeMap<i32, usize>,
}

impl Supervisor {
    /// A supervisor for these cells, in start order.
    pub fn new(specs: Vec<CellSpec>, policy: RestartPolicy) -> Self {
        let cells = specs
            .into_iter()
            .map(|spec| Cell {
                spec,
                phase: Phase::Pending,
                pid: None,
                started_at: None,
                starts: 0,
                restarts: 0,
                failures: 0,
                last_exit: None,
                next_start: None,
                last_error: None,
                hung_kills: 0,
                killed: false,
            })
            .collect();
        Supervisor {
            cells,
            policy,
            stopping: false,
            by_pid: BTreeMap::new(),
        }
    }

    /// Start every cell that is pending or whose backoff has passed. Returns the earliest
    /// instant at which a further call has work to do.
    pub fn tick(&mut self, now: Instant) -> Option<Instant> {
        if self.stopping {
            return None;
        }
        let mut next: Option<Instant> = None;
        for i in 0..self.cells.len() {
            let due = match self.cells[i].phase {
                Phase::Pending => true,
                Phase::Backoff => self.cells[i].next_start.is_none_or(|t| t <= now),
                Phase::Running | Phase::Stopped => false,
            };
            if due {
                self.start(i, now);
            }
            if self.cells[i].phase == Phase::Backoff {
                if let Some(t) = self.cells[i].next_start {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
        }
        next
    }

    fn start(&mut self, i: usize, now: Instant) {
        let was_started = self.cells[i].starts > 0;
        match spawn(&self.cells[i].spec) {
            Ok(pid) => {
                let cell = &mut self.cells[i];
                cell.phase = Phase::Running;
                cell.pid = Some(pid);
                cell.started_at = Some(now);
                cell.starts += 1;
                if was_started {
                    cell.restarts += 1;
                }
                cell.next_start = None;
                cell.last_error = None;
                cell.killed = false;
                self.by_pid.insert(pid, i);
                tracing::info!(cell = %cell.spec.name, pid, "cell started");
            }
            Err(e) => {
                let cell = &mut self.cells[i];
                cell.failures = cell.failures.saturating_add(1);
                let delay = restart_delay(&self.policy, cell.failures);
                cell.phase = Phase::Backoff;
                cell.next_start = Some(now + delay);
                cell.last_error = Some(e.to_string());
                tracing::error!(cell = %cell.spec.name, error = %e, retry_in_ms = delay.as_millis() as u64, "cell failed to start");
            }
        }
    }

    /// Hand a reaped child's status to the supervisor. Returns the cell name if the pid was one
    /// of our cells (otherwise it was an orphan and the caller just logs it).
    pub fn on_exit(&mut self, pid: i32, status: ExitStatus, now: Instant) -> Option<String> {
        let i = self.by_pid.remove(&pid)?;
        let policy = self.policy;
        let stopping = self.stopping;
        let cell = &mut self.cells[i];
        let ran_for = cell
            .started_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        cell.pid = None;
        cell.last_exit = Some(status);
        if stopping {
            cell.phase = Phase::Stopped;
            tracing::info!(cell = %cell.spec.name, %status, "cell stopped");
        } else {
            cell.failures = next_failure_count(&policy, cell.failures, ran_for);
            let delay = restart_delay(&policy, cell.failures);
            cell.phase = Phase::Backoff;
            cell.next_start = Some(now + delay);
            tracing::warn!(cell = %cell.spec.name, %status, ran_ms = ran_for.as_millis() as u64,
                failures = cell.failures, restart_in_ms = delay.as_millis() as u64, "cell exited");
        }
        Some(cell.spec.name.clone())
    }

    /// Liveness check of cell `name`, whose monitor last answered at `last_ok`: if it is
    /// running and [`is_hung`], SIGKILL its process group (once per run) and return the pid.
    /// The exit then arrives through PID 1's reaper and the cell restarts with backoff.
    pub fn check_liveness(
        &mut self,
        name: &str,
        last_ok: Option<Instant>,
        live: &Liveness,
        now: Instant,
    ) -> Option<i32> {
        if self.stopping {
            return None;
        }
        let cell = self.cells.iter_mut().find(|c| c.spec.name == name)?;
        let (pid, started) = (cell.pid?, cell.started_at?);
        if cell.phase != Phase::Running || cell.killed || !is_hung(live, started, last_ok, now) {
            return None;
        }
        cell.killed = true;
        cell.hung_kills = cell.hung_kills.saturating_add(1);
        tracing::error!(cell = %name, pid, silent_ms = now.saturating_duration_since(last_ok.filter(|t| *t >= started).unwrap_or(started)).as_millis() as u64,
            "cell monitor stopped answering; killing the cell to restart it");
        signal_group(pid, sys::signals::SIGKILL);
        Some(pid)
    }

    /// Reports for every cell, in start order.
    pub fn report(&self, now: Instant) -> Vec<CellReport> {
        self.cells
            .iter()
            .map(|c| CellReport {
                name: c.spec.name.clone(),
                phase: c.phase,
                pid: c.pid,
                starts: c.starts,
                restarts: c.restarts,
                failures: c.failures,
                last_exit: c.last_exit,
                next_start_in_ms: match (c.phase, c.next_start) {
                    (Phase::Backoff, Some(t)) => {
                        Some(t.saturating_duration_since(now).as_millis() as u64)
                    }
                    _ => None,
                },
                last_error: c.last_error.clone(),
                hung_kills: c.hung_kills,
            })
            .collect()
    }

    /// True once every cell has stopped (or never ran).
    pub fn all_stopped(&self) -> bool {
        self.cells.iter().all(|c| c.pid.is_none())
    }

    /// Stop every cell in reverse start order: SIGTERM to the cell's process group, wait up to
    /// `grace` for it to exit, then SIGKILL. `wait_exits(timeout)` must block up to `timeout`
    /// for child exits and return every reaped `(pid, status)` (PID 1's single reaper).
    pub fn shutdown(
        &mut self,
        grace: Duration,
        wait_exits: &mut dyn FnMut(Duration) -> Vec<(i32, ExitStatus)>,
    ) {
        self.stopping = true;
        for c in self.cells.iter_mut() {
            if c.pid.is_none() {
                c.phase = Phase::Stopped;
            }
        }
        for i in (0..self.cells.len()).rev() {
            let Some(pid) = self.cells[i].pid else {
                continue;
            };
            let name = self.cells[i].spec.name.clone();
            tracing::info!(cell = %name, pid, "stopping cell (SIGTERM)");
            signal_group(pid, sys::signals::SIGTERM);
            let deadline = Instant::now() + grace;
            while self.cells[i].pid.is_some() {
                let now = Instant::now();
                if now >= deadline {
                    tracing::warn!(cell = %name, pid, "cell ignored SIGTERM; sending SIGKILL");
                    signal_group(pid, sys::signals::SIGKILL);
                    // After SIGKILL the exit is certain; wait for it without a deadline
                    // beyond a generous bound so a stuck D-state process cannot hang shutdown.
                    let hard = Instant::now() + Duration::from_secs(5);
                    while self.cells[i].pid.is_some() && Instant::now() < hard {
                        for (p, st) in wait_exits(Duration::from_millis(100)) {
                            self.on_exit(p, st, Instant::now());
                        }
                    }
                    break;
                }
                for (p, st) in wait_exits(deadline - now) {
                    self.on_exit(p, st, Instant::now());
                }
            }
            // Anything left in the group (grandchildren) goes too.
            signal_group(pid, sys::signals::SIGKILL);
        }
    }
}

fn signal_group(pid: i32, sig: i32) {
    // The cell leads its own process group (process_group(0) at spawn).
    if sys::kill(-pid, sig).is_err() {
        let _ = sys::kill(pid, sig);
    }
}

fn spawn(spec: &CellSpec) -> Result<i32, SupervisorError> {
    std::fs::create_dir_all(&spec.data_dir).map_err(|source| SupervisorError::DataDir {
        path: spec.data_dir.clone(),
        source,
    })?;
    let mut cmd = Command::new(&spec.program);
    // argv[0] "borg": the multi-call binary must not mistake a cell for init (it may be /init).
    cmd.arg0("borg")
        .args(&spec.args)
        .env("BORG_CELL", &spec.name)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some((uid, gid)) = spec.user {
        std::os::unix::fs::chown(&spec.data_dir, Some(uid), Some(gid)).map_err(|source| {
            SupervisorError::DataDir {
                path: spec.data_dir.clone(),
                source,
            }
        })?;
        // std drops supplementary groups (setgroups(0)) when changing uid as root.
        cmd.uid(uid).gid(gid);
    }
    let mut child = cmd.spawn().map_err(|source| SupervisorError::Spawn {
        name: spec.name.clone(),
        source,
    })?;
    let pid = child.id() as i32;
    if let Some(out) = child.stdout.take() {
        forward_lines(spec.name.clone(), out);
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(spec.name.clone(), err);
    }
    // Dropping `Child` neither waits nor kills: PID 1's reaper collects the status.
    drop(child);
    Ok(pid)
}

/// Forward a cell's output to our log on a thread of its own (see
/// [`crate::logring::forward_cell_output`]: bounded lines, rate-limited, never blocked by a
/// slow console).
fn forward_lines(name: String, stream: impl Read + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name(format!("log-{name}"))
        .spawn(move || crate::logring::forward_cell_output(&name, stream));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start log forwarder thread");
    }
}

/// Write the reports to `path` atomically (temp file + rename), for tests and tools.
pub fn write_state_file(
    path: &std::path::Path,
    reports: &[CellReport],
) -> Result<(), SupervisorError> {
    let err = |source| SupervisorError::StateFile {
        path: path.to_path_buf(),
        source,
    };
    let body = serde_json::to_vec_pretty(reports)
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> RestartPolicy {
        RestartPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
            healthy_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn delay_doubles_and_caps() {
        let p = p();
        assert_eq!(restart_delay(&p, 0), Duration::ZERO);
        assert_eq!(restart_delay(&p, 1), Duration::from_millis(100));
        assert_eq!(restart_delay(&p, 2), Duration::from_millis(200));
        assert_eq!(restart_delay(&p, 3), Duration::from_millis(400));
        assert_eq!(restart_delay(&p, 6), Duration::from_millis(3200));
        assert_eq!(restart_delay(&p, 7), Duration::from_secs(5));
        assert_eq!(restart_delay(&p, 40), Duration::from_secs(5));
        assert_eq!(restart_delay(&p, u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn healthy_run_resets_the_streak() {
        let p = p();
        assert_eq!(next_failure_count(&p, 0, Duration::from_millis(5)), 1);
        assert_eq!(next_failure_count(&p, 4, Duration::from_millis(5)), 5);
        assert_eq!(next_failure_count(&p, 4, Duration::from_secs(10)), 1);
        assert_eq!(next_failure_count(&p, u32::MAX, Duration::ZERO), u32::MAX);
    }

    #[test]
    fn delay_is_monotonic() {
        let p = RestartPolicy::default();
        let mut last = Duration::ZERO;
        for n in 0..100 {
            let d = restart_delay(&p, n);
            assert!(d >= last && d <= p.max);
            last = d;
        }
    }

    #[test]
    fn liveness_bounds() {
        let l = Liveness {
            startup: Duration::from_secs(10),
            silence: Duration::from_secs(3),
        };
        let t0 = Instant::now();
        let s = |x: u64| t0 + Duration::from_secs(x);
        // Never answered: hung only after the startup allowance.
        assert!(!is_hung(&l, t0, None, s(10)));
        assert!(is_hung(&l, t0, None, s(11)));
        // An answer from an earlier run does not count for this one.
        assert!(is_hung(&l, s(5), Some(s(4)), s(16)));
        assert!(!is_hung(&l, s(5), Some(s(4)), s(15)));
        // Answered: hung after the silence bound.
        assert!(!is_hung(&l, t0, Some(s(2)), s(5)));
        assert!(is_hung(&l, t0, Some(s(2)), s(6)));
    }

    #[test]
    fn unknown_pid_is_an_orphan() {
        let mut s = Supervisor::new(vec![], p());
        assert_eq!(
            s.on_exit(12345, ExitStatus::Exited(0), Instant::now()),
            None
        );
        assert!(s.all_stopped());
    }

    #[test]
    fn spawn_failure_goes_to_backoff() {
        let spec = CellSpec {
            name: "x".into(),
            program: "/nonexistent/borg-test-program".into(),
            args: vec![],
            data_dir: std::env::temp_dir().join("borg-sup-test-x"),
            user: None,
            env: vec![],
        };
        let mut s = Supervisor::new(vec![spec], p());
        let now = Instant::now();
        let next = s.tick(now);
        let r = s.report(now);
        assert_eq!(r[0].phase, Phase::Backoff);
        assert_eq!(r[0].failures, 1);
        assert!(r[0].last_error.is_some());
        assert_eq!(next, Some(now + Duration::from_millis(100)));
    }
}
