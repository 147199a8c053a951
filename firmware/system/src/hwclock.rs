//! A fake hardware clock: a Raspberry Pi 4 has no RTC and boots at 1970-01-01, and signed
//! envelopes whose `ts` is more than 30 s from the peers' network time are refused.
//!
//! - At boot (data partition mounted, node not started yet): `floor = max(build time, time
//!   saved in DATA/nettime)`; a system clock below the floor is raised to it. The node reads
//!   the system clock once when it starts, so it starts from the floor, not from 1970.
//! - Once the node's monitor says `time.synced`, PID 1 sets `CLOCK_REALTIME` to network time
//!   whenever they differ by more than [`SET_THRESHOLD_MS`] (the node runs on the monotonic
//!   clock and does not step when the system clock is set).
//! - Network time is saved to `DATA/nettime` (temp file, fsync, rename, fsync of the
//!   directory) when the node first syncs, every [`SAVE_EVERY`] while synced and at orderly
//!   shutdown; never a value lower than the one saved.
//!
//! The decisions ([`floor_ms`], [`raise_to`], [`clock_target`], [`parse_nettime`]) are pure
//! functions; [`Keeper`] does the I/O. The only system call is [`sys::set_realtime_ms`].

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::sys;

/// File under the data directory that holds the last known network time.
pub const NETTIME_FILE: &str = "nettime";

/// First (and only) token of the file format: `borg-nettime-v1 <ms since epoch>\n`.
pub const NETTIME_MAGIC: &str = "borg-nettime-v1";

/// Set the system clock when it differs from network time by more than this.
pub const SET_THRESHOLD_MS: f64 = 500.0;

/// Save network time this often while the node is synced.
pub const SAVE_EVERY: Duration = Duration::from_secs(600);

/// No clock value at or beyond 2100-01-01 is believed (a corrupt file, a broken status):
/// raising the clock to the far future would be worse than leaving it.
pub const MAX_SANE_MS: u64 = 4_102_444_800_000;

/// The build time in ms since the epoch (`borg_proto::build::BUILD_UNIX_S`).
pub fn build_floor_ms() -> u64 {
    borg_proto::build::BUILD_UNIX_S.saturating_mul(1000)
}

/// The system clock (`CLOCK_REALTIME`) in ms since the epoch; 0 if it reads before 1970.
pub fn system_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The boot floor of the clock: the later of the build time and the saved network time.
pub fn floor_ms(build_ms: u64, saved_ms: Option<u64>) -> u64 {
    saved_ms.map_or(build_ms, |s| s.max(build_ms))
}

/// The value to raise the system clock to at boot, if it reads below the floor.
pub fn raise_to(system_ms: u64, floor_ms: u64) -> Option<u64> {
    (system_ms < floor_ms).then_some(floor_ms)
}

/// The contents of `DATA/nettime` for `ms`.
pub fn format_nettime(ms: u64) -> String {
    format!("{NETTIME_MAGIC} {ms}\n")
}

/// Parse `DATA/nettime` strictly: exactly `borg-nettime-v1 <digits>\n` (the newline may be
/// missing), the number at most 13 digits, without leading zeros, above 0 and below
/// [`MAX_SANE_MS`]. Anything else is an error, never a guess.
pub fn parse_nettime(bytes: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let body = text.strip_suffix('\n').unwrap_or(text);
    let digits = body
        .strip_prefix(NETTIME_MAGIC)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| format!("does not start with '{NETTIME_MAGIC} '"))?;
    if digits.is_empty() || digits.len() > 13 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad number {digits:?}"));
    }
    if digits.starts_with('0') {
        return Err(format!("bad number {digits:?} (leading zero)"));
    }
    let ms: u64 = digits
        .parse()
        .map_err(|_| format!("bad number {digits:?}"))?;
    if ms >= MAX_SANE_MS {
        return Err(format!("{ms} ms is past 2100"));
    }
    Ok(ms)
}

/// The `time` object of a cell monitor's `/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeStatus {
    /// Network time is synced.
    pub synced: bool,
    /// Network time minus the node's local clock.
    pub offset_ms: f64,
    /// Error bound of network time (`null` before the first sync).
    pub error_bound_ms: Option<f64>,
    /// `local`, `bootstrap` or the parent's key.
    pub source: String,
    /// Hops from the time root (`null` before the first sync).
    pub stratum: Option<u8>,
    /// Network time when the snapshot was made (ms since the epoch).
    pub now_ms: u64,
    /// Network time minus the system clock when the snapshot was made.
    pub system_offset_ms: Option<f64>,
}

impl TimeStatus {
    /// Read `v["time"]` of a monitor status. None when the field is missing or malformed
    /// (a wrong type is never taken for a value). `stratum` and `error_bound_ms` may be
    /// `null` only while unsynced.
    pub fn from_status(v: &serde_json::Value) -> Option<TimeStatus> {
        let t = v.get("time")?.as_object()?;
        let f = |k: &str| t.get(k).and_then(|x| x.as_f64()).filter(|x| x.is_finite());
        let nullable = |k: &str| -> Option<Option<&serde_json::Value>> {
            match t.get(k) {
                None | Some(serde_json::Value::Null) => Some(None),
                Some(x) => Some(Some(x)),
            }
        };
        let bound = match nullable("error_bound_ms")? {
            None => None,
            Some(x) => Some(x.as_f64().filter(|x| x.is_finite())?),
        };
        let stratum = match nullable("stratum")? {
            None => None,
            Some(x) => Some(u8::try_from(x.as_u64()?).ok()?),
        };
        let synced = t.get("synced")?.as_bool()?;
        if synced && (bound.is_none() || stratum.is_none()) {
            return None;
        }
        Some(TimeStatus {
            synced,
            offset_ms: f("offset_ms")?,
            error_bound_ms: bound,
            source: t.get("source")?.as_str()?.to_string(),
            stratum,
            now_ms: t.get("now_ms")?.as_u64()?,
            system_offset_ms: f("system_offset_ms"),
        })
    }

    /// One word for the console: `synced s2 ±1.2ms` or `unsynced`.
    pub fn summary(&self) -> String {
        match (self.synced, self.stratum, self.error_bound_ms) {
            (true, Some(s), Some(b)) => format!("synced s{s} ±{b:.1}ms"),
            (true, ..) => "synced".to_string(),
            (false, ..) => "unsynced".to_string(),
        }
    }
}

/// Should the system clock be set, and to what (ms since the epoch)? Pure.
///
/// - only from a synced status;
/// - not from a snapshot made before our last setting (`now_ms` at or below the network time
///   we set then): its `system_offset_ms` predates the step and would apply it twice;
/// - only when the system clock is off by more than [`SET_THRESHOLD_MS`];
/// - never below `floor` (the build time) nor past [`MAX_SANE_MS`].
///
/// The target is `system now + system_offset_ms` (the node's own difference between its
/// network time and the system clock, which does not age with the snapshot); without that
/// field, `now_ms` (the snapshot's network time, older by the poll's latency).
pub fn clock_target(
    t: &TimeStatus,
    system_ms: u64,
    last_set_net_ms: Option<u64>,
    floor: u64,
) -> Option<u64> {
    if !t.synced || last_set_net_ms.is_some_and(|l| t.now_ms <= l) {
        return None;
    }
    let target = match t.system_offset_ms {
        Some(off) => {
            if off.abs() <= SET_THRESHOLD_MS {
                return None;
            }
            let v = system_ms as f64 + off;
            if !(0.0..MAX_SANE_MS as f64).contains(&v) {
                return None;
            }
            v.round() as u64
        }
        None => {
            if (t.now_ms as f64 - system_ms as f64).abs() <= SET_THRESHOLD_MS {
                return None;
            }
            t.now_ms
        }
    };
    (target >= floor && target < MAX_SANE_MS).then_some(target)
}

/// `ms` since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, proleptic Gregorian).
pub fn utc_string(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut o = String::new();
    let _ = write!(
        o,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    );
    o
}

/// Read `DIR/nettime`. `Ok(None)` if there is none; `Err` (to be logged and ignored) if it
/// cannot be read or is corrupt.
pub fn load_nettime(dir: &Path) -> Result<Option<u64>, String> {
    let path = dir.join(NETTIME_FILE);
    let mut bytes = Vec::new();
    match std::fs::File::open(&path) {
        Ok(f) => {
            use std::io::Read as _;
            // The file is one short line; a huge one is corrupt by definition.
            f.take(64)
                .read_to_end(&mut bytes)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    parse_nettime(&bytes)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Write `DIR/nettime` atomically: temp file, fsync, rename, fsync of the directory.
pub fn save_nettime(dir: &Path, ms: u64) -> std::io::Result<()> {
    let path = dir.join(NETTIME_FILE);
    let tmp = dir.join(format!("{NETTIME_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format_nettime(ms).as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// What [`Keeper`] reports for the console (`time` command).
#[derive(Debug, Clone, Default)]
pub struct ClockInfo {
    /// The boot floor (ms since the epoch).
    pub floor_ms: u64,
    /// The system clock was raised to the floor at boot (from this value).
    pub raised_from_ms: Option<u64>,
    /// Network time last saved to (or read from) DATA/nettime.
    pub saved_ms: Option<u64>,
    /// Times the system clock was set from network time.
    pub sets: u32,
    /// The last such setting: (system clock before, after).
    pub last_set: Option<(u64, u64)>,
    /// The system clock is set by us (PID 1 of the appliance).
    pub sets_clock: bool,
    /// A problem with the nettime file (corrupt, cannot write).
    pub note: Option<String>,
}

/// The clock keeper of PID 1: boot floor, setting the clock, saving network time.
#[derive(Debug)]
pub struct Keeper {
    dir: PathBuf,
    build_ms: u64,
    set_clock: bool,
    info: ClockInfo,
    /// Network time we last set the system clock to.
    last_set_net: Option<u64>,
    /// The last synced status: network time and when we received it.
    last_synced: Option<(u64, Instant)>,
    last_save: Option<Instant>,
}

impl Keeper {
    /// Read `DIR/nettime` and, with `set_clock`, raise the system clock to the floor. Never
    /// fails: a corrupt file is logged and ignored, a failed `clock_settime` is logged.
    pub fn boot(dir: &Path, set_clock: bool) -> Keeper {
        Self::boot_with(dir, set_clock, build_floor_ms())
    }

    /// [`Keeper::boot`] with another build time (tests).
    pub fn boot_with(dir: &Path, set_clock: bool, build_ms: u64) -> Keeper {
        let mut info = ClockInfo {
            sets_clock: set_clock,
            ..ClockInfo::default()
        };
        let saved = match load_nettime(dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "saved network time ignored (corrupt)");
                info.note = Some(format!("nettime ignored: {e}"));
                None
            }
        };
        info.saved_ms = saved;
        info.floor_ms = floor_ms(build_ms, saved);
        if set_clock {
            let now = system_now_ms();
            if let Some(to) = raise_to(now, info.floor_ms) {
                match sys::set_realtime_ms(to) {
                    Ok(()) => {
                        tracing::info!(
                            from = %utc_string(now),
                            to = %utc_string(to),
                            source = if saved.is_some_and(|s| s >= build_ms) { "saved network time" } else { "build time" },
                            "clock raised to its floor"
                        );
                        info.raised_from_ms = Some(now);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot raise the clock to its floor"),
                }
            }
        }
        Keeper {
            dir: dir.to_path_buf(),
            build_ms,
            set_clock,
            info,
            last_set_net: None,
            last_synced: None,
            last_save: None,
        }
    }

    /// What the console shows.
    pub fn info(&self) -> ClockInfo {
        self.info.clone()
    }

    /// Network time now, from the last synced status and the monotonic time since.
    pub fn network_now_ms(&self) -> Option<u64> {
        self.last_synced
            .map(|(ms, at)| ms.saturating_add(at.elapsed().as_millis() as u64))
    }

    /// A monitor status arrived at `received`: set the clock if needed and save network time
    /// when it is due.
    pub fn on_status(&mut self, t: &TimeStatus, received: Instant) {
        if !t.synced {
            return;
        }
        self.last_synced = Some((t.now_ms, received));
        if self.set_clock {
            let now = system_now_ms();
            if let Some(to) = clock_target(t, now, self.last_set_net, self.build_ms) {
                match sys::set_realtime_ms(to) {
                    Ok(()) => {
                        tracing::info!(
                            stratum = t.stratum.unwrap_or(u8::MAX),
                            error_bound_ms = t.error_bound_ms.unwrap_or(f64::NAN),
                            "clock set from network time: {} -> {} ({:+} ms)",
                            utc_string(now),
                            utc_string(to),
                            to as i64 - now as i64
                        );
                        // Network time at the moment of the step is the target itself.
                        self.last_set_net = Some(to);
                        self.info.sets = self.info.sets.saturating_add(1);
                        self.info.last_set = Some((now, to));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot set the clock from network time");
                        // Do not retry every second: wait for a newer snapshot.
                        self.last_set_net = Some(t.now_ms);
                    }
                }
            }
        }
        if self.last_save.is_none_or(|s| s.elapsed() >= SAVE_EVERY) {
            self.last_save = Some(Instant::now());
            self.save();
        }
    }

    /// Save network time now (orderly shutdown; periodic saves call this too). Does nothing
    /// when the node never synced or the value would not be above the saved one.
    pub fn save(&mut self) {
        let Some(ms) = self.network_now_ms() else {
            return;
        };
        if self.info.saved_ms.is_some_and(|s| ms <= s) || ms >= MAX_SANE_MS {
            return;
        }
        match save_nettime(&self.dir, ms) {
            Ok(()) => {
                tracing::debug!(at = %utc_string(ms), "network time saved");
                self.info.saved_ms = Some(ms);
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.dir.display(), "cannot save network time");
                self.info.note = Some(format!("cannot save nettime: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(synced: bool, now_ms: u64, off: Option<f64>) -> TimeStatus {
        TimeStatus {
            synced,
            offset_ms: 0.0,
            error_bound_ms: Some(1.25),
            source: "bootstrap".into(),
            stratum: Some(2),
            now_ms,
            system_offset_ms: off,
        }
    }

    const BUILD: u64 = 1_796_083_200_000;

    #[test]
    fn floor_is_the_later_of_build_and_saved() {
        assert_eq!(floor_ms(BUILD, None), BUILD);
        assert_eq!(floor_ms(BUILD, Some(BUILD - 1)), BUILD);
        assert_eq!(floor_ms(BUILD, Some(BUILD + 5)), BUILD + 5);
        // A Pi 4 boots at 1970: raised. A clock already past the floor is left alone.
        assert_eq!(raise_to(0, BUILD), Some(BUILD));
        assert_eq!(raise_to(BUILD - 1, BUILD), Some(BUILD));
        assert_eq!(raise_to(BUILD, BUILD), None);
        assert_eq!(raise_to(BUILD + 1, BUILD), None);
    }

    #[test]
    fn nettime_round_trips_and_is_strict() {
        assert_eq!(parse_nettime(format_nettime(BUILD).as_bytes()), Ok(BUILD));
        assert_eq!(parse_nettime(b"borg-nettime-v1 1796083200000"), Ok(BUILD));
        for bad in [
            &b""[..],
            b"\n",
            b"1796083200000\n",
            b"borg-nettime-v1\n",
            b"borg-nettime-v1 \n",
            b"borg-nettime-v1  1796083200000\n",
            b"borg-nettime-v1 1796083200000\n\n",
            b"borg-nettime-v1 1796083200000 \n",
            b"borg-nettime-v1 +1796083200000\n",
            b"borg-nettime-v1 -1\n",
            b"borg-nettime-v1 0\n",
            b"borg-nettime-v1 01796083200000\n",
            b"borg-nettime-v1 17960832000001\n",
            b"borg-nettime-v1 9999999999999\n",
            b"borg-nettime-v1 1.5\n",
            b"borg-nettime-v2 1796083200000\n",
            b"\xff\xfe",
            b"\0\0\0\0\0\0\0\0",
        ] {
            assert!(
                parse_nettime(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn nettime_parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            let _ = parse_nettime(&bytes);
        }

        #[test]
        fn nettime_round_trips(ms in 1u64..MAX_SANE_MS) {
            proptest::prop_assert_eq!(parse_nettime(format_nettime(ms).as_bytes()), Ok(ms));
        }
    }

    #[test]
    fn clock_is_set_only_from_a_fresh_synced_status_off_by_more_than_the_threshold() {
        let sys = BUILD + 10_000;
        // Unsynced: never.
        assert_eq!(
            clock_target(&ts(false, sys + 10_000, Some(10_000.0)), sys, None, BUILD),
            None
        );
        // Within 500 ms: left alone.
        assert_eq!(
            clock_target(&ts(true, sys + 400, Some(400.0)), sys, None, BUILD),
            None
        );
        assert_eq!(
            clock_target(&ts(true, sys - 500, Some(-500.0)), sys, None, BUILD),
            None
        );
        // Off by more: system now + the node's system offset.
        assert_eq!(
            clock_target(
                &ts(true, sys + 86_400_000, Some(86_400_000.4)),
                sys,
                None,
                BUILD
            ),
            Some(sys + 86_400_000)
        );
        assert_eq!(
            clock_target(&ts(true, sys - 2_000, Some(-2_000.0)), sys, None, BUILD),
            Some(sys - 2_000)
        );
        // The offset, not the (older) snapshot time, decides the target.
        assert_eq!(
            clock_target(&ts(true, sys + 5_000, Some(6_000.0)), sys, None, BUILD),
            Some(sys + 6_000)
        );
        // Without system_offset_ms: the snapshot's network time.
        assert_eq!(
            clock_target(&ts(true, sys + 9_000, None), sys, None, BUILD),
            Some(sys + 9_000)
        );
        assert_eq!(
            clock_target(&ts(true, sys + 100, None), sys, None, BUILD),
            None
        );
        // A snapshot made before our last step (its offset predates it) is not applied twice.
        let set_to = sys + 86_400_000;
        assert_eq!(
            clock_target(
                &ts(true, set_to - 700, Some(86_400_000.0)),
                set_to,
                Some(set_to),
                BUILD
            ),
            None
        );
        assert_eq!(
            clock_target(
                &ts(true, set_to, Some(86_400_000.0)),
                set_to,
                Some(set_to),
                BUILD
            ),
            None
        );
        // A later one that still disagrees is applied.
        assert_eq!(
            clock_target(
                &ts(true, set_to + 1_000, Some(900.0)),
                set_to + 1_000,
                Some(set_to),
                BUILD
            ),
            Some(set_to + 1_900)
        );
        // Never below the build time, never past 2100.
        assert_eq!(
            clock_target(&ts(true, 5_000, Some(-(sys as f64))), sys, None, BUILD),
            None
        );
        assert_eq!(
            clock_target(&ts(true, sys, Some(MAX_SANE_MS as f64)), sys, None, BUILD),
            None
        );
        assert_eq!(
            clock_target(&ts(true, sys, Some(f64::NAN)), sys, None, BUILD),
            None
        );
    }

    #[test]
    fn time_status_parses_the_contract_and_refuses_wrong_types() {
        let v = serde_json::json!({"state":"joined","time":{"synced":true,"offset_ms":-3.5,
            "error_bound_ms":1.2,"source":"bootstrap","stratum":2,"now_ms":1796083200123u64,
            "system_offset_ms":-12.25}});
        let t = TimeStatus::from_status(&v).unwrap();
        assert!(t.synced);
        assert_eq!(t.stratum, Some(2));
        assert_eq!(t.now_ms, 1_796_083_200_123);
        assert_eq!(t.system_offset_ms, Some(-12.25));
        assert_eq!(t.summary(), "synced s2 ±1.2ms");
        let mut u = t.clone();
        u.synced = false;
        assert_eq!(u.summary(), "unsynced");
        assert_eq!(
            TimeStatus::from_status(&serde_json::json!({"state":"root"})),
            None
        );
        let bad = serde_json::json!({"time":{"synced":"yes","offset_ms":0,"error_bound_ms":1,
            "source":"local","stratum":0,"now_ms":1}});
        assert_eq!(TimeStatus::from_status(&bad), None);
        let bad = serde_json::json!({"time":{"synced":true,"offset_ms":0,"error_bound_ms":1,
            "source":"local","stratum":300,"now_ms":1}});
        assert_eq!(TimeStatus::from_status(&bad), None);
        let no_sys = serde_json::json!({"time":{"synced":false,"offset_ms":0,"error_bound_ms":1,
            "source":"local","stratum":0,"now_ms":-1}});
        assert_eq!(TimeStatus::from_status(&no_sys), None);
        // Before the first sync the node reports null stratum and error bound.
        let unsynced = serde_json::json!({"time":{"synced":false,"offset_ms":0.0,
            "error_bound_ms":null,"source":"local","stratum":null,"now_ms":1796083200000u64,
            "system_offset_ms":0.0,"samples":0,"rejected":0}});
        let u = TimeStatus::from_status(&unsynced).unwrap();
        assert_eq!((u.stratum, u.error_bound_ms), (None, None));
        assert_eq!(u.summary(), "unsynced");
        // ... but a synced status without them is malformed.
        let mut bad = unsynced.clone();
        bad["time"]["synced"] = serde_json::Value::Bool(true);
        assert_eq!(TimeStatus::from_status(&bad), None);
    }

    #[test]
    fn utc_strings() {
        assert_eq!(utc_string(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_string(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc_string(1_796_083_200_000), "2026-12-01T00:00:00.000Z");
        assert_eq!(utc_string(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn keeper_loads_saves_and_never_goes_down() {
        let dir = tempfile::tempdir().unwrap();
        // No file: floor = build time.
        let k = Keeper::boot_with(dir.path(), false, BUILD);
        assert_eq!(k.info().floor_ms, BUILD);
        assert_eq!(k.info().saved_ms, None);
        // A corrupt file is reported and ignored.
        std::fs::write(dir.path().join(NETTIME_FILE), b"garbage").unwrap();
        let k = Keeper::boot_with(dir.path(), false, BUILD);
        assert_eq!(k.info().floor_ms, BUILD);
        assert!(k.info().note.unwrap().contains("nettime ignored"));
        // A saved time later than the build raises the floor.
        save_nettime(dir.path(), BUILD + 3_600_000).unwrap();
        assert!(!dir.path().join("nettime.tmp").exists());
        let mut k = Keeper::boot_with(dir.path(), false, BUILD);
        assert_eq!(k.info().floor_ms, BUILD + 3_600_000);
        // Never synced: nothing to save.
        k.save();
        assert_eq!(load_nettime(dir.path()), Ok(Some(BUILD + 3_600_000)));
        // Synced but earlier than the saved value: the file keeps the larger one.
        k.on_status(&ts(true, BUILD + 60_000, Some(0.0)), Instant::now());
        assert_eq!(load_nettime(dir.path()), Ok(Some(BUILD + 3_600_000)));
        // Later: saved at once (first sync), then only when due or at shutdown.
        let mut k = Keeper::boot_with(dir.path(), false, BUILD);
        k.on_status(&ts(true, BUILD + 7_200_000, Some(0.0)), Instant::now());
        let first = load_nettime(dir.path()).unwrap().unwrap();
        assert!(first >= BUILD + 7_200_000, "{first}");
        k.on_status(&ts(true, BUILD + 9_000_000, Some(0.0)), Instant::now());
        assert_eq!(load_nettime(dir.path()), Ok(Some(first)));
        k.save();
        assert!(load_nettime(dir.path()).unwrap().unwrap() >= BUILD + 9_000_000);
        // An unsynced status changes nothing.
        k.on_status(&ts(false, BUILD + 99_000_000, Some(0.0)), Instant::now());
        k.save();
        assert!(load_nettime(dir.path()).unwrap().unwrap() < BUILD + 99_000_000);
    }
}
