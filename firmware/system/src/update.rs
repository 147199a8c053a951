//! PID 1's updater: install a release the network approved into the inactive slot, then boot
//! it on trial (docs/OTA.md "Installing"). The trial itself is [`crate::trial`].
//!
//! Every [`CHECK_EVERY`], if this boot came from an A/B disk and is not itself a trial, the
//! updater reads the base cell's `update` status. When a release there is approved, it
//! marks the appliance `updating` (LED pattern) and calls the [`Installer`] the binary gave it
//! (`borg init` passes `borg`'s installer, which has the network client): it fetches the
//! release file from the node, judges it again against the image's trust root (PID 1 does
//! not take the unprivileged node's word for it), fetches the image into the inactive slot's
//! partition and verifies it by reading it back. Only then does the updater ask for a trial
//! boot (Pi: `reboot(2)` with `0 tryboot`; QEMU: the `tryboot.txt` sector) and reboot. A
//! failed install changes nothing the firmware reads; it is retried after a backoff, at most
//! [`MAX_TRIES`] times per release and boot.
//!
//! **A failed trial is remembered**: before asking for the trial the updater writes
//! `<data>/update-trial` (the release's manifest digest and version); the trial removes it
//! when it commits. A boot of the committed slot that finds it knows the trial of that
//! release failed (health check, watchdog, power cut): it adds the digest to
//! `<data>/update-failed` (at most [`MAX_FAILED`], oldest dropped) and never installs that
//! release again, so a bad release costs one trial, not a loop of them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use borg_ota::autoboot::{other_slot, slot_name};
use serde_json::Value;

use crate::slots::{self, BootInfo};
use crate::state::Shared;

/// How often the updater looks at the node's status.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Installs of one release tried per boot before the updater leaves it alone.
pub const MAX_TRIES: u32 = 3;
/// Wait after a failed install, doubled each time.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Releases whose trial failed, remembered.
pub const MAX_FAILED: usize = 64;
const TRIAL_MARKER: &str = "update-trial";
const FAILED_FILE: &str = "update-failed";

/// The trial marker's path in `data`.
pub fn trial_marker(data: &Path) -> PathBuf {
    data.join(TRIAL_MARKER)
}

/// Manifest digests whose trial failed.
pub fn failed(data: &Path) -> Vec<String> {
    std::fs::read_to_string(data.join(FAILED_FILE))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect()
}

/// Write `data/name` so that a crash leaves the old or the new bytes.
fn write_durably(data: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let tmp = data.join(format!("{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, data.join(name))?;
    std::fs::File::open(data)?.sync_all()
}

/// `<data>/update-trial`: the release the updater asked a trial of, the slot it went to,
/// whether the node was in a tree with others then, and whether the trial began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialMarker {
    pub manifest: String,
    pub version: String,
    /// The partition the release was written to.
    pub target: u8,
    /// The node was joined to others before the update: the trial must be too, not alone.
    pub was_joined: bool,
    /// The trial boot of `target` began (written by the trial itself).
    pub started: bool,
}

impl TrialMarker {
    fn text(&self) -> String {
        format!(
            "{} {} {} {} {}\n",
            self.manifest,
            self.version,
            self.target,
            if self.was_joined { "joined" } else { "alone" },
            if self.started { "started" } else { "requested" }
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let w: Vec<&str> = text.split_whitespace().collect();
        let [manifest, version, target, joined, state] = w[..] else {
            return None;
        };
        Some(Self {
            manifest: manifest.to_string(),
            version: version.to_string(),
            target: target.parse().ok()?,
            was_joined: joined == "joined",
            started: state == "started",
        })
    }

    /// The marker in `data`, if there is a readable one.
    pub fn read(data: &Path) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(trial_marker(data)).ok()?)
    }

    /// Write it durably.
    pub fn write(&self, data: &Path) -> std::io::Result<()> {
        write_durably(data, TRIAL_MARKER, &self.text())
    }
}

/// Remove the trial marker (durably).
pub fn clear_marker(data: &Path) {
    match std::fs::remove_file(trial_marker(data)) {
        Ok(()) => {
            let _ = std::fs::File::open(data).and_then(|d| d.sync_all());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("update: cannot remove the trial marker: {e}"),
    }
}

/// On a boot that is not a trial (booted from `partition`): did the last trial fail? Only a
/// trial that began and did not commit counts (we booted another slot than it went to); a
/// trial that was asked for but never began (a power cut before the reboot) is forgotten,
/// and the install simply runs again; one that committed but could not remove its marker
/// is forgotten too.
fn note_failed_trial(data: &Path, partition: u8) {
    let Some(m) = TrialMarker::read(data) else {
        clear_marker(data);
        return;
    };
    if !m.started || m.target == partition {
        clear_marker(data);
        return;
    }
    tracing::error!(
        "update: the trial of release {} failed (this boot is the committed slot); \
         it will not be installed again",
        m.version
    );
    let mut list = failed(data);
    if !list.contains(&m.manifest) {
        list.push(m.manifest.clone());
    }
    let keep = list.len().saturating_sub(MAX_FAILED);
    let text: String = list[keep..].iter().map(|m| format!("{m}\n")).collect();
    if let Err(e) = write_durably(data, FAILED_FILE, &text) {
        tracing::error!("update: cannot record the failed trial: {e}");
        return;
    }
    clear_marker(data);
}

/// Set when the next reboot must be the Pi firmware's trial boot.
static TRYBOOT_NEXT: AtomicBool = AtomicBool::new(false);

/// Whether PID 1's coming restart must be `reboot(2)` with `0 tryboot`.
pub fn tryboot_next() -> bool {
    TRYBOOT_NEXT.load(Ordering::SeqCst)
}

/// What the installer is asked to do.
#[derive(Debug, Clone)]
pub struct InstallJob {
    /// The release's manifest digest (hex), as the node's status names it.
    pub manifest: String,
    pub version: String,
    /// The boot disk, and the inactive slot's partition on it (byte offset and length).
    pub disk: PathBuf,
    pub offset: u64,
    pub len: u64,
    /// The node receptor to fetch through (`borg.update_via`; default the local node).
    pub via: Option<String>,
}

/// Fetch, judge, write and verify; Err is a sentence for the log.
pub type Installer = fn(&InstallJob) -> Result<(), String>;

/// The approved releases in a base status, highest version first: (manifest, version).
pub fn approved(status: &Value) -> Vec<(String, String)> {
    let Some(pending) = status["update"]["pending"].as_array() else {
        return Vec::new();
    };
    let mut out: Vec<(borg_ota::Version, String)> = pending
        .iter()
        .filter(|p| p["approved"] == true)
        .filter_map(|p| {
            let v: borg_ota::Version = p["version"].as_str()?.parse().ok()?;
            Some((v, p["manifest"].as_str()?.to_string()))
        })
        .collect();
    out.sort_by(|a, b| b.cmp(a));
    out.into_iter().map(|(v, m)| (m, v.to_string())).collect()
}

/// Installs tried this boot: per release, how many and when the next may start.
#[derive(Debug, Default)]
struct Attempts(Vec<(String, u32, Instant)>);

impl Attempts {
    /// The first of `candidates` that may be tried now, with its try number.
    fn pick(&self, candidates: &[(String, String)], now: Instant) -> Option<(String, String, u32)> {
        candidates
            .iter()
            .find_map(|(m, v)| match self.0.iter().find(|(am, _, _)| am == m) {
                None => Some((m.clone(), v.clone(), 1)),
                Some((_, n, next)) if *n < MAX_TRIES && *next <= now => {
                    Some((m.clone(), v.clone(), n + 1))
                }
                Some(_) => None,
            })
    }

    /// Try `n` of `manifest` failed at `now`: the next waits [`RETRY_AFTER`] doubled.
    fn failed(&mut self, manifest: &str, n: u32, now: Instant) {
        let next = now + RETRY_AFTER * 2u32.pow(n.saturating_sub(1).min(8));
        match self.0.iter_mut().find(|(m, _, _)| m == manifest) {
            Some(e) => *e = (manifest.to_string(), n, next),
            None => {
                // Bounded: the node reports at most 16 releases; keep the newest 64 entries.
                if self.0.len() >= 64 {
                    self.0.remove(0);
                }
                self.0.push((manifest.to_string(), n, next))
            }
        }
    }
}

/// What the updater needs besides the boot slot.
#[derive(Debug, Clone)]
pub struct UpdaterConfig {
    pub monitor: SocketAddr,
    pub installer: Installer,
    pub via: Option<String>,
    /// The data partition (trial marker, failed releases).
    pub data: PathBuf,
}

/// Start the updater thread (only on an A/B boot that is not a trial).
pub fn start(info: BootInfo, shared: &Shared, cfg: UpdaterConfig, reboot: fn()) {
    if info.tryboot {
        return;
    }
    note_failed_trial(&cfg.data, info.partition);
    let sh = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("updater".into())
        .spawn(move || run(info, sh, cfg, reboot));
    if let Err(e) = spawned {
        tracing::error!("update: cannot start the updater: {e}");
    }
}

fn run(info: BootInfo, shared: Shared, cfg: UpdaterConfig, reboot: fn()) {
    let UpdaterConfig {
        monitor,
        installer,
        via,
        data,
    } = cfg;
    let target = other_slot(info.partition);
    let mut attempts = Attempts::default();
    loop {
        std::thread::sleep(CHECK_EVERY);
        let Ok(status) = crate::monitor::status(monitor, Duration::from_millis(1500)) else {
            continue;
        };
        // A release that failed (its install this boot, or its trial ever) does not block a
        // lower one: the highest release that may be tried now goes.
        let gone = failed(&data);
        let candidates: Vec<_> = approved(&status)
            .into_iter()
            .filter(|(m, _)| !gone.contains(m))
            .collect();
        let Some((manifest, version, n)) = attempts.pick(&candidates, Instant::now()) else {
            continue;
        };
        let (offset, len) = match slots::partition(&info.disk, target) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("update: no slot {} to install into: {e}", slot_name(target));
                return;
            }
        };
        tracing::info!(
            "update: release {version} is approved; installing it into slot {} (try {n} of {MAX_TRIES})",
            slot_name(target)
        );
        {
            let mut s = shared.lock();
            s.updating = true;
            s.slot = Some(format!(
                "{} (partition {}), installing {version} into slot {}",
                info.slot(),
                info.partition,
                slot_name(target)
            ));
        }
        let job = InstallJob {
            manifest: manifest.clone(),
            version: version.clone(),
            disk: info.disk.clone(),
            offset,
            len,
            via: via.clone(),
        };
        let marker = TrialMarker {
            manifest: manifest.clone(),
            version: version.clone(),
            target,
            was_joined: status["state"] == "joined" || status["state"] == "root",
            started: false,
        };
        let result = installer(&job)
            .and_then(|()| {
                marker
                    .write(&data)
                    .map_err(|e| format!("writing the trial marker: {e}"))
            })
            .and_then(|()| request_trial(&info));
        match result {
            Ok(()) => {
                tracing::info!(
                    "update: release {version} written to slot {} and verified; rebooting to try it",
                    slot_name(target)
                );
                reboot();
                return;
            }
            Err(e) => {
                tracing::error!("update: installing release {version} failed: {e}");
                attempts.failed(&manifest, n, Instant::now());
                let mut s = shared.lock();
                s.updating = false;
                s.slot = Some(format!(
                    "{} (partition {}); last install failed: {e}",
                    info.slot(),
                    info.partition
                ));
            }
        }
    }
}

/// Ask the firmware for one trial boot of the other slot: on the Pi the reboot itself
/// carries it; under the QEMU stand-in it is the `tryboot.txt` sector.
fn request_trial(info: &BootInfo) -> Result<(), String> {
    if std::path::Path::new("/proc/device-tree/chosen/bootloader/partition").exists() {
        TRYBOOT_NEXT.store(true, Ordering::SeqCst);
        return Ok(());
    }
    let at = slots::sector_file(&info.disk, slots::TRYBOOT).map_err(|e| e.to_string())?;
    let old = slots::read_sector(&info.disk, at).map_err(|e| e.to_string())?;
    if !old.starts_with(b"tryboot=") {
        return Err("tryboot.txt does not hold a tryboot flag; not writing over it".into());
    }
    slots::write_sector(&info.disk, at, &borg_ota::autoboot::tryboot_flag(true))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_highest_approved_release_that_may_be_tried_is_chosen() {
        let s = json!({"update": {"pending": [
            {"version": "0.3.0", "manifest": "c", "approved": false},
            {"version": "0.2.0", "manifest": "b", "approved": true},
            {"version": "0.10.0", "manifest": "d", "approved": true},
        ]}});
        let all = approved(&s);
        assert_eq!(
            all,
            vec![("d".into(), "0.10.0".into()), ("b".into(), "0.2.0".into())]
        );
        assert!(approved(&json!({"update": {"enabled": false}})).is_empty());
        assert!(approved(&json!({})).is_empty());
        // A release that failed waits its backoff; the next one goes meanwhile.
        let mut a = Attempts::default();
        let t = Instant::now();
        assert_eq!(a.pick(&all, t), Some(("d".into(), "0.10.0".into(), 1)));
        a.failed("d", 1, t);
        assert_eq!(a.pick(&all, t), Some(("b".into(), "0.2.0".into(), 1)));
        assert_eq!(
            a.pick(&all, t + RETRY_AFTER),
            Some(("d".into(), "0.10.0".into(), 2))
        );
        a.failed("d", MAX_TRIES, t);
        a.failed("b", MAX_TRIES, t);
        assert_eq!(
            a.pick(&all, t + RETRY_AFTER * 1000),
            None,
            "at most MAX_TRIES each"
        );
    }

    #[test]
    fn only_a_trial_that_began_and_did_not_commit_counts_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let m = TrialMarker {
            manifest: "ab".repeat(32),
            version: "0.2.0".into(),
            target: 3,
            was_joined: true,
            started: false,
        };
        assert_eq!(TrialMarker::parse(&m.text()), Some(m.clone()));
        note_failed_trial(d, 2);
        assert!(failed(d).is_empty(), "no marker, no failure");
        // Asked for, never began (power cut before the reboot): forgotten.
        m.write(d).unwrap();
        note_failed_trial(d, 2);
        assert!(failed(d).is_empty());
        assert!(!trial_marker(d).exists());
        // Began and committed, marker left behind: forgotten.
        let started = TrialMarker {
            started: true,
            ..m.clone()
        };
        started.write(d).unwrap();
        note_failed_trial(d, 3);
        assert!(failed(d).is_empty());
        // Began, and we are back on the other slot: failed, remembered once.
        for _ in 0..2 {
            started.write(d).unwrap();
            note_failed_trial(d, 2);
        }
        assert_eq!(failed(d), vec!["ab".repeat(32)]);
        assert!(!trial_marker(d).exists());
    }
}
