//! The trial boot of a new slot: health check, then commit, or fall back (docs/OTA.md).
//!
//! When the firmware booted a slot on trial (tryboot), PID 1:
//! 1. arms the watchdog, if there is one (`/dev/watchdog`: bcm2835-wdt on the Pi; under QEMU
//!    the kernel's softdog, as Debian's cloud kernel has no i6300esb driver: it catches a hung
//!    PID 1, not a hung kernel), and pets it from this thread only, so a PID 1 (or, on the Pi,
//!    a kernel) that hangs stops petting and the board resets; a reset boots the committed slot
//!    again, since the firmware's tryboot request is one-shot;
//! 2. waits, within `borg.trial_s` (default [`DEFAULT_TRIAL`]), until the node is healthy for
//!    [`STABLE_CHECKS`] checks in a row ([`judge`]: the node process runs, the base cell's
//!    monitor answers with a tree state, and every cell it hosts answers);
//! 3. healthy: commits the slot by rewriting `autoboot.txt`'s one sector in place
//!    ([`crate::slots`]), then disarms the watchdog; from now on the firmware boots this slot;
//! 4. not healthy in time, or the commit failed: reboots. The firmware boots the committed
//!    (old) slot: the fall back needs no write at all.
//!
//! A power cut at any moment leaves the committed slot as it was (before the sector write)
//! or the new one committed (after it): never a slot that is neither.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use borg_ota::autoboot::{other_slot, slot_name, AutoBoot};
use serde_json::Value;

use crate::slots::{self, BootInfo};
use crate::state::Shared;

/// How long a trial boot has to become healthy, unless `borg.trial_s` says otherwise: TCG
/// emulation boots in about 10 s and a node joins within a minute; a Pi is faster.
pub const DEFAULT_TRIAL: Duration = Duration::from_secs(180);
/// Consecutive healthy checks (one a second) before the slot is committed.
pub const STABLE_CHECKS: u32 = 3;
const CHECK_EVERY: Duration = Duration::from_secs(1);
const WATCHDOG: &str = "/dev/watchdog";

/// Is the node healthy? `node_running`: the supervisor runs the node process; `status`: the
/// base cell's `/status`, if its monitor answered. Err says what is missing.
pub fn judge(node_running: bool, status: Option<&Value>, must_join: bool) -> Result<(), String> {
    if !node_running {
        return Err("the node process is not running".into());
    }
    let s = status.ok_or("the base cell's monitor does not answer")?;
    let state = s["state"].as_str().unwrap_or("");
    if !matches!(state, "joined" | "root" | "alone") {
        return Err(format!("the base cell is {state:?}, not in a tree yet"));
    }
    // A node that had company before the update must find it again: a release that breaks
    // networking must not be committed just because a node alone looks healthy.
    if must_join && state == "alone" {
        return Err("the node is alone; before the update it was in a tree with others".into());
    }
    let cells = s["cells"]
        .as_array()
        .ok_or("the base cell lists no cells")?;
    if let Some(c) = cells.iter().find(|c| {
        !matches!(
            c["state"].as_str(),
            Some("joined" | "root" | "alone" | "joining")
        )
    }) {
        return Err(format!(
            "cell {} does not answer ({})",
            c["name"].as_str().unwrap_or("?"),
            c["state"]
        ));
    }
    Ok(())
}

/// The hardware watchdog, armed while open; petted by writes. Closing it after writing `V`
/// (the magic close) disarms it, unless the kernel was built with nowayout.
struct Watchdog(std::fs::File);

impl Watchdog {
    fn arm() -> Option<Self> {
        match std::fs::OpenOptions::new().write(true).open(WATCHDOG) {
            Ok(f) => Some(Self(f)),
            Err(e) => {
                tracing::warn!("update: no hardware watchdog ({WATCHDOG}: {e}); a hung trial boot is ended only by a power cycle");
                None
            }
        }
    }

    fn pet(&mut self) {
        let _ = self.0.write_all(b"\0");
    }

    fn disarm(mut self) {
        let _ = self.0.write_all(b"V");
    }
}

/// Commit the slot this boot came from: one sector of `autoboot.txt`.
pub fn commit(info: &BootInfo) -> Result<(), slots::SlotError> {
    let at = slots::sector_file(&info.disk, slots::AUTOBOOT)?;
    // Only ever replace a valid autoboot.txt: a sector that is not one is not ours to write.
    let old = slots::read_sector(&info.disk, at)?;
    AutoBoot::parse(&old).map_err(|e| slots::SlotError::Layout {
        path: info.disk.clone(),
        reason: format!("autoboot.txt does not parse ({e}); not writing over it"),
    })?;
    slots::write_sector(
        &info.disk,
        at,
        &AutoBoot::committed(info.partition).render(),
    )
}

/// What `autoboot.txt` on the boot disk says now (for the log and the console).
pub fn committed(disk: &Path) -> Result<AutoBoot, String> {
    let at = slots::sector_file(disk, slots::AUTOBOOT).map_err(|e| e.to_string())?;
    let bytes = slots::read_sector(disk, at).map_err(|e| e.to_string())?;
    AutoBoot::parse(&bytes).map_err(|e| e.to_string())
}

/// How a trial runs: its bound, and (tests only, `borg.fault=trial_hang`) a PID 1 that arms
/// the watchdog and then hangs, to show that the watchdog ends such a trial.
#[derive(Debug, Clone)]
pub struct TrialOptions {
    pub within: Duration,
    pub hang: bool,
    /// The data partition: the updater's trial marker is removed on commit.
    pub data: std::path::PathBuf,
}

/// Log the boot slot, and run the trial if this is one (on its own thread). `reboot` asks
/// PID 1 for an orderly reboot.
pub fn start(
    info: BootInfo,
    shared: &Shared,
    monitor: SocketAddr,
    opts: TrialOptions,
    reboot: fn(),
) {
    let slot = info.slot();
    match committed(&info.disk) {
        Ok(a) => tracing::info!(
            "boot: slot {slot} (partition {}){}; committed slot {}",
            info.partition,
            if info.tryboot { " on trial" } else { "" },
            slot_name(a.boot_partition)
        ),
        Err(e) => tracing::warn!("boot: slot {slot}; cannot read autoboot.txt: {e}"),
    }
    shared.lock().slot = Some(format!(
        "{slot} (partition {}){}",
        info.partition,
        if info.tryboot { ", on trial" } else { "" }
    ));
    if !info.tryboot {
        return;
    }
    let sh = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("trial".into())
        .spawn(move || run(info, sh, monitor, opts, reboot));
    if let Err(e) = spawned {
        // Without the thread nothing commits: the next boot falls back by itself.
        tracing::error!("update: cannot start the trial thread: {e}");
    }
}

fn run(info: BootInfo, shared: Shared, monitor: SocketAddr, opts: TrialOptions, reboot: fn()) {
    let within = opts.within;
    let slot = info.slot();
    let old = slot_name(other_slot(info.partition));
    tracing::info!(
        "update: trial boot of slot {slot}: health check within {} s",
        within.as_secs()
    );
    shared.lock().updating = true;
    // The updater's marker: note that the trial began (so a fall back is remembered as a
    // failed trial), and whether the node must be joined to others to count as healthy.
    let mut must_join = false;
    if let Some(mut m) = crate::update::TrialMarker::read(&opts.data) {
        if m.target == info.partition {
            must_join = m.was_joined;
            m.started = true;
            if let Err(e) = m.write(&opts.data) {
                tracing::warn!("update: cannot note the trial's start: {e}");
            }
        }
    }
    let mut wd = Watchdog::arm();
    if opts.hang {
        tracing::warn!("borg.fault=trial_hang: the trial stops here, the watchdog is not petted");
        let _keep = wd;
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let start = Instant::now();
    let mut good = 0;
    let mut why = String::from("no check yet");
    while start.elapsed() < within {
        if let Some(w) = wd.as_mut() {
            w.pet();
        }
        let running = shared
            .lock()
            .cells
            .iter()
            .any(|c| c.phase == crate::supervisor::Phase::Running);
        let status = crate::monitor::status(monitor, Duration::from_millis(1500)).ok();
        match judge(running, status.as_ref(), must_join) {
            Ok(()) => good += 1,
            Err(e) => {
                good = 0;
                why = e;
            }
        }
        if good >= STABLE_CHECKS {
            match commit(&info) {
                Ok(()) => {
                    tracing::info!(
                        "update: slot {slot} passed the health check in {} s; committed",
                        start.elapsed().as_secs()
                    );
                    if let Some(w) = wd.take() {
                        w.disarm();
                    }
                    crate::update::clear_marker(&opts.data);
                    let mut s = shared.lock();
                    s.updating = false;
                    s.slot = Some(format!("{slot} (partition {}), committed", info.partition));
                    return;
                }
                Err(e) => {
                    why = format!("commit failed: {e}");
                    break;
                }
            }
        }
        std::thread::sleep(CHECK_EVERY);
    }
    tracing::error!("update: slot {slot} failed its trial ({why}); rebooting into slot {old}");
    reboot();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn healthy_only_with_the_process_the_tree_and_every_cell() {
        let good = json!({"state": "joined", "cells": [
            {"name": "peerTreeNet", "state": "joined"}, {"name": "cronoTree", "state": "root"}]});
        assert_eq!(judge(true, Some(&good), true), Ok(()));
        assert!(judge(false, Some(&good), false)
            .unwrap_err()
            .contains("not running"));
        assert!(judge(true, None, false)
            .unwrap_err()
            .contains("does not answer"));
        let joining = json!({"state": "joining", "cells": []});
        assert!(judge(true, Some(&joining), false).is_err());
        let dead_cell = json!({"state": "root", "cells": [
            {"name": "shardTree", "state": null}]});
        assert!(judge(true, Some(&dead_cell), false)
            .unwrap_err()
            .contains("shardTree"));
        assert!(judge(true, Some(&json!({"state": "alone"})), false).is_err());
        let alone = json!({"state": "alone", "cells": [{"name": "cronoTree", "state": "alone"}]});
        assert_eq!(judge(true, Some(&alone), false), Ok(()));
        assert!(judge(true, Some(&alone), true)
            .unwrap_err()
            .contains("alone"));
    }
}
