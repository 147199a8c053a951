//! PID 1 (and `borg up`): the init loop that ties mounts, networking, the supervisor, LEDs
//! and the console together.
//!
//! Boot order under PID 1 (`system = true`):
//! 1. block the signals we handle (every thread inherits the mask), ignore SIGPIPE,
//!    `reboot(RB_DISABLE_CAD)` so Ctrl-Alt-Del becomes SIGINT;
//! 2. mount /proc /sys /dev /dev/pts /dev/shm /run /tmp; load the kernel modules listed in
//!    `/lib/modules/borg/load-order`; read `borg.*` settings from `/proc/cmdline`;
//! 3. mount the data partition (formatting it only if blank; a damaged one is reported and the
//!    node runs on a RAM disk with the fault LED);
//! 4. raise the system clock to its floor (build time, saved network time: [`hwclock`]);
//!    node key (moved once from the old per-cell directory) -> host name; start the network,
//!    LED, console and node-watch threads (the node watch also sets the clock from network
//!    time and saves it);
//! 5. start the node (`borg node`, all cells in one process) and loop: wait for signals, reap
//!    every child with `waitpid(-1)`, hand statuses to the supervisor, restart the node when
//!    its backoff passes, and kill it when its peerTreeNet monitor stays silent past the
//!    liveness bound (it then restarts). Each round runs under `catch_unwind`: a bug that
//!    panics costs a round, not PID 1.
//!
//! SIGTERM/SIGPWR power off, SIGINT (Ctrl-Alt-Del) reboots: TERM the node (processes in
//! reverse order), grace, KILL, TERM/KILL everything else, save network time, sync, unmount
//! (or remount read-only), `reboot(2)`.
//! PID 1 never returns from [`run`]; outside PID 1 (`system = false`) it returns after the
//! cells have stopped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hwclock::{Keeper, TimeStatus};
use crate::leds::{self, LedDriver, NodeState};
use crate::state::Shared;
use crate::supervisor::{self, CellReport, CellSpec, Liveness, RestartPolicy, Supervisor};
use crate::sys::{self, signals, ExitStatus, RebootCmd, SignalSet};
use crate::{cmdline, console, monitor, mounts, net};

/// Errors that stop `borg up` (PID 1 never gives up; it logs and carries on).
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The data directory is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Signal setup failed.
    #[error("signal setup: {0}")]
    Signals(std::io::Error),
}

/// Where console I/O goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleIo {
    /// No console prompt.
    Off,
    /// stdin/stdout.
    Stdio,
    /// A terminal device such as `/dev/console`.
    Device(PathBuf),
}

/// Everything `run` needs. Built by the binary from its flags (and the kernel command line).
#[derive(Debug, Clone)]
pub struct InitConfig {
    /// Perform PID-1 system duties: mounts, modules, networking, data partition, reboot(2).
    pub system: bool,
    /// Data directory (on the appliance: the data partition's mount point).
    pub data_dir: PathBuf,
    /// Program run for each supervised process (normally our own executable).
    pub cell_program: PathBuf,
    /// Processes to supervise, in start order. Default: [`NODE`] alone, the one `borg node`
    /// process that hosts every cell. Any other name is a test stand-in, run as
    /// `cell NAME --data DATA/cells/NAME`.
    pub cells: Vec<String>,
    /// Contacts the node joins.
    pub join: Vec<String>,
    /// Listen address of the node (default [`DEFAULT_LISTEN`]).
    pub listen: Option<String>,
    /// LED backend spec (`auto`, `sysfs`, `gpio`, `sim:PATH`, `none`).
    pub leds: String,
    /// GPIO pins for the `gpio` backend.
    pub led_gpio: (u8, u8),
    /// Console prompt.
    pub console: ConsoleIo,
    /// Per-cell shutdown grace.
    pub grace: Duration,
    /// Restart policy.
    pub policy: RestartPolicy,
    /// Write cell reports here (JSON) whenever they change.
    pub state_file: Option<PathBuf>,
    /// Run cells as this uid/gid when we are root (None: as ourselves).
    pub cell_user: Option<(u32, u32)>,
    /// Run DHCP (system mode only).
    pub network: bool,
    /// Data partition device (system mode; None = probe [`mounts::DATA_CANDIDATES`]).
    pub data_device: Option<PathBuf>,
    /// mkfs command for a blank data partition.
    pub mkfs: Vec<String>,
    /// Monitor address of the base cell.
    pub monitor: SocketAddr,
    /// Restart the base cell when its monitor stops answering (None: never).
    pub liveness: Option<Liveness>,
    /// For tests: panic once in the main loop after the cells started, to show that PID 1
    /// survives a panic on its main thread.
    pub inject_panic: bool,
    /// The A/B slot this boot came from (None: not booted from an A/B disk).
    pub boot: Option<crate::slots::BootInfo>,
    /// How long a trial boot has to pass its health check.
    pub trial_within: Duration,
    /// Test only (`borg.fault=trial_hang`): the trial arms the watchdog and hangs.
    pub trial_hang: bool,
    /// Installs approved releases (the binary's, which has the network client); None: this
    /// PID 1 installs nothing.
    pub installer: Option<crate::update::Installer>,
    /// The node receptor the installer fetches through (`borg.update_via`).
    pub update_via: Option<String>,
}

/// How long the main loop pauses after a caught panic before its next round, so a bug that
/// panics on every round costs a few log lines a second instead of a busy CPU.
pub const PANIC_PAUSE: Duration = Duration::from_millis(200);

impl InitConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: PathBuf, cell_program: PathBuf) -> Self {
        InitConfig {
            system: false,
            data_dir,
            cell_program,
            cells: vec![NODE.to_string()],
            join: vec![],
            listen: None,
            leds: "auto".into(),
            led_gpio: leds::DEFAULT_GPIO_PINS,
            console: ConsoleIo::Off,
            grace: Duration::from_secs(5),
            policy: RestartPolicy::default(),
            state_file: None,
            cell_user: None,
            network: true,
            data_device: None,
            mkfs: default_mkfs(),
            monitor: monitor::base_monitor(),
            liveness: Some(Liveness::default()),
            inject_panic: false,
            boot: None,
            trial_within: crate::trial::DEFAULT_TRIAL,
            trial_hang: false,
            installer: None,
            update_via: None,
        }
    }

    /// Apply `borg.*` kernel command-line settings on top of the flags.
    pub fn apply_cmdline(&mut self, c: &cmdline::Cmdline) {
        self.join.extend(c.join.iter().cloned());
        if let Some(l) = &c.listen {
            self.listen = Some(l.clone());
            if let Some(m) = monitor_for_listen(l) {
                self.monitor = m;
            }
        }
        if let Some(l) = &c.leds {
            self.leds = l.clone();
        }
        if let Some(p) = c.led_gpio.as_deref().and_then(leds::parse_gpio_pins) {
            self.led_gpio = p;
        }
        if let Some(ms) = c.grace_ms {
            self.grace = Duration::from_millis(ms);
        }
        if let Some(d) = &c.data {
            self.data_device = Some(PathBuf::from(d));
        }
        if c.net.as_deref() == Some("off") {
            self.network = false;
        }
        self.boot = crate::slots::BootInfo::read(c);
        if let Some(s) = c.trial_s {
            self.trial_within = Duration::from_secs(s);
        }
        if c.fault.as_deref() == Some("node") {
            // Test only: a slot whose node cannot start (the trial must fall back).
            tracing::warn!("borg.fault=node: the node process will not start");
            self.cell_program = PathBuf::from("/nonexistent/borg.fault=node");
        }
        self.trial_hang = c.fault.as_deref() == Some("trial_hang");
        if let Some(v) = &c.update_via {
            self.update_via = Some(v.clone());
        }
    }
}

/// Where the base cell's monitor answers when the cell listens on `listen` (an IP): that IP,
/// unless it is unspecified (0.0.0.0 / ::, then loopback, the default). The node-watch and
/// the liveness check must poll the monitor where it is, or a healthy cell looks frozen.
pub fn monitor_for_listen(listen: &str) -> Option<SocketAddr> {
    let ip: std::net::IpAddr = listen.parse().ok()?;
    (!ip.is_unspecified()).then(|| SocketAddr::new(ip, borg_proto::dna::PEER_TREE_NET.mon_port))
}

/// The mkfs command for a blank data partition: e2fsprogs' mkfs.ext4 if the image has it
/// (buildroot images), else busybox's mke2fs (the offline QEMU image).
pub fn default_mkfs() -> Vec<String> {
    for p in ["/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext4"] {
        if Path::new(p).exists() {
            return vec![p.to_string(), "-q".to_string()];
        }
    }
    vec!["/bin/busybox".to_string(), "mke2fs".to_string()]
}

/// Supervisor name of the one node process (`borg node`, every cell in one process).
pub const NODE: &str = "node";

/// Listen address of the node when none is given: every address (the node advertises the
/// one DHCP gave it; its monitors stay reachable on 127.0.0.1).
pub const DEFAULT_LISTEN: &str = "0.0.0.0";

/// Data directory of a supervised process: `DATA/node` for the node (its key is
/// `DATA/node/node.key`), `DATA/cells/NAME` for a test stand-in.
pub fn process_data_dir(data_dir: &Path, name: &str) -> PathBuf {
    if name == NODE {
        data_dir.join(NODE)
    } else {
        data_dir.join("cells").join(name)
    }
}

/// The command line of a supervised process. The node:
/// `node --listen IP --data DATA/node [--join IP:PORT]...`; a test stand-in:
/// `cell NAME --data DATA/cells/NAME`.
pub fn cell_args(cfg: &InitConfig, name: &str) -> Vec<String> {
    let dir = process_data_dir(&cfg.data_dir, name)
        .to_string_lossy()
        .into_owned();
    if name != NODE {
        return vec!["cell".into(), name.into(), "--data".into(), dir];
    }
    let mut a = vec![
        "node".to_string(),
        "--listen".to_string(),
        cfg.listen.clone().unwrap_or_else(|| DEFAULT_LISTEN.into()),
        "--data".to_string(),
        dir,
    ];
    for j in &cfg.join {
        a.push("--join".into());
        a.push(j.clone());
    }
    a
}

/// Where the node key lived before the node hosted every cell in one process: the data
/// directory of the `borg cell peerTreeNet` process.
pub fn old_key_path(data_dir: &Path) -> PathBuf {
    data_dir
        .join("cells")
        .join(borg_proto::dna::PEER_TREE_NET.name)
        .join(borg_proto::identity::NODE_KEY_FILE)
}

/// Move the node key once from the old per-cell directory to `DATA/node`, so the node keeps
/// its identity (and host name) across the upgrade. Only when `DATA/node` has no key yet; the
/// copy is written to a temp file, fsynced and renamed into place (then the directory is
/// fsynced), so a power cut leaves either no new key or a whole one. The old file stays, for
/// an older image booted from the other slot. Returns whether a key was copied.
pub fn migrate_node_key(data_dir: &Path) -> std::io::Result<bool> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let new_dir = process_data_dir(data_dir, NODE);
    let new = new_dir.join(borg_proto::identity::NODE_KEY_FILE);
    let old = old_key_path(data_dir);
    if new.exists() || !old.is_file() {
        return Ok(false);
    }
    let bytes = std::fs::read(&old)?;
    std::fs::create_dir_all(&new_dir)?;
    let tmp = new_dir.join("node.key.tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &new)?;
    std::fs::File::open(&new_dir)?.sync_all()?;
    Ok(true)
}

/// Host name from the node's public key: `borg-` + 8 hex digits of the key.
pub fn hostname_for(key: &borg_proto::identity::PublicKey) -> String {
    let b = key.as_bytes();
    let hex: String = b
        .iter()
        .skip(1)
        .take(4)
        .map(|x| format!("{x:02x}"))
        .collect();
    format!("borg-{hex}")
}

/// Log panics instead of dying silently; PID 1 code paths also avoid unwrap entirely. Only
/// through the log (never a direct, blocking write to a console that may be stuck).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string();
        tracing::error!(panic = %msg, "BUG: panic (PID 1 carries on)");
    }));
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) {
    let n = name.to_string();
    if let Err(e) = std::thread::Builder::new().name(n.clone()).spawn(move || {
        // A panicking helper thread must never take PID 1 down.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
            tracing::error!(thread = %n, "thread panicked and stopped");
        }
    }) {
        tracing::error!(thread = %name, error = %e, "cannot start thread");
    }
}

/// Run init. With `system = true` this is PID 1 and never returns.
pub fn run(mut cfg: InitConfig) -> Result<(), InitError> {
    let pid1 = sys::getpid() == 1;
    let signals = SignalSet::init_set();
    signals.block().map_err(InitError::Signals)?;
    sys::ignore_sigpipe();
    tracing::info!(
        version = borg_proto::build::VERSION,
        pid = sys::getpid(),
        system = cfg.system,
        "borg init starting"
    );

    let mut faults = vec![];
    let mut data_note = String::from("(directory)");
    if cfg.system {
        let mount_errors = mounts::mount_system();
        if let Err(e) = sys::ensure_stdio(Path::new("/dev/console")) {
            tracing::warn!(error = %e, "no console for stdio");
        }
        for e in mount_errors {
            tracing::warn!(error = %e, "early mount");
        }
        if let Err(e) = sys::reboot(RebootCmd::DisableCad) {
            tracing::warn!(error = %e, "cannot disable Ctrl-Alt-Del");
        }
        let (n, errs) = mounts::load_modules(Path::new("/lib/modules/borg/load-order"));
        if n > 0 {
            tracing::info!(modules = n, "kernel modules loaded");
        }
        for e in errs {
            tracing::warn!(error = %e, "kernel module");
        }
        let c = cmdline::read();
        cfg.apply_cmdline(&c);
        let (note, fault) = prepare_data(&mut cfg);
        data_note = note;
        if let Some(f) = fault {
            faults.push(f);
        }
    } else if let Err(e) = sys::set_child_subreaper() {
        tracing::warn!(error = %e, "cannot become child subreaper; orphans go to the real init");
    }
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| InitError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;

    // The clock floor before anything reads the clock for long: the node reads it once when
    // it starts. Only PID 1 of the appliance sets the clock; `borg up` only keeps nettime.
    let keeper = Keeper::boot(&cfg.data_dir, cfg.system && pid1);
    let clock_info = keeper.info();
    let keeper = Arc::new(Mutex::new(keeper));

    // Node identity lives in the node's data dir, so the node and the host name agree.
    match migrate_node_key(&cfg.data_dir) {
        Ok(true) => tracing::info!(
            from = %old_key_path(&cfg.data_dir).display(),
            "node key moved to the node's data directory"
        ),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot move the node key from the old cell directory")
        }
    }
    let base_dir = process_data_dir(&cfg.data_dir, NODE);
    let hostname = match std::fs::create_dir_all(&base_dir)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            borg_proto::identity::SecretKey::load_or_create(&base_dir).map_err(|e| e.to_string())
        }) {
        Ok(k) => {
            if let Some((uid, gid)) = cell_user(&cfg) {
                let _ = std::os::unix::fs::chown(&base_dir, Some(uid), Some(gid));
                let _ = std::os::unix::fs::chown(base_dir.join("node.key"), Some(uid), Some(gid));
            }
            hostname_for(&k.public())
        }
        Err(e) => {
            tracing::error!(error = %e, "node key");
            faults.push(format!("node key: {e}"));
            "borg-unknown".to_string()
        }
    };
    if cfg.system {
        match sys::sethostname(&hostname) {
            Ok(()) => tracing::info!(%hostname, "host name set"),
            Err(e) => tracing::warn!(error = %e, "sethostname"),
        }
    }

    let shared = Shared::new(
        hostname.clone(),
        cfg.data_dir.to_string_lossy().into_owned(),
    );
    {
        let mut s = shared.lock();
        s.data_note = data_note;
        s.faults = faults;
        s.clock = clock_info;
    }
    let net_enabled = cfg.system && cfg.network;
    if net_enabled {
        let sh = shared.clone();
        let hn = hostname.clone();
        spawn_thread("net", move || net::run(sh, hn));
    } else {
        let mut s = shared.lock();
        s.net.note = Some("networking managed by the host".into());
    }
    start_leds(&cfg, &shared, net_enabled);
    start_appliance_file(appliance_file(&cfg), &shared);
    start_node_watch(&shared, cfg.monitor, keeper.clone());
    start_console(&cfg, &shared);
    if let Some(boot) = cfg.boot.clone() {
        let opts = crate::trial::TrialOptions {
            within: cfg.trial_within,
            hang: cfg.trial_hang,
            data: cfg.data_dir.clone(),
        };
        crate::trial::start(boot.clone(), &shared, cfg.monitor, opts, || {
            request_shutdown(console::Request::Reboot)
        });
        if let Some(installer) = cfg.installer {
            let ucfg = crate::update::UpdaterConfig {
                monitor: cfg.monitor,
                installer,
                via: cfg.update_via.clone(),
                data: cfg.data_dir.clone(),
            };
            crate::update::start(boot, &shared, ucfg, || {
                request_shutdown(console::Request::Reboot)
            });
        }
    }

    let specs: Vec<CellSpec> = cfg
        .cells
        .iter()
        .map(|name| CellSpec {
            name: name.clone(),
            program: cfg.cell_program.clone(),
            args: cell_args(&cfg, name),
            data_dir: process_data_dir(&cfg.data_dir, name),
            user: cell_user(&cfg),
            env: vec![(
                APPLIANCE_FILE_ENV.to_string(),
                appliance_file(&cfg).display().to_string(),
            )],
        })
        .collect();
    let mut sup = Supervisor::new(specs, cfg.policy);
    let mut last_reports = String::new();
    shared.lock().booted = true;
    tracing::info!(processes = ?cfg.cells, "starting cells");

    let base = NODE;
    let mut inject_panic = cfg.inject_panic;
    let request = loop {
        // A panic in one round (a bug) must not unwind out of PID 1: catch it, log it (the
        // panic hook did), pause briefly and go on with the same supervisor state.
        let round = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let now = Instant::now();
            if let Some(live) = &cfg.liveness {
                let last_ok = shared.lock().monitor_ok_at;
                sup.check_liveness(base, last_ok, live, now);
            }
            let next = sup.tick(now);
            publish(&shared, &sup, &cfg, &mut last_reports);
            if std::mem::take(&mut inject_panic) {
                panic!("injected panic in PID 1's main loop (--inject-panic)");
            }
            let wait = next
                .map_or(Duration::from_millis(500), |t| {
                    t.saturating_duration_since(Instant::now())
                })
                .clamp(Duration::from_millis(1), Duration::from_millis(500));
            let sig = signals.wait(wait);
            reap_all(&mut sup);
            match sig {
                Some(s) if s == signals::SIGTERM || s == signals::SIGPWR => {
                    Some(RebootCmd::PowerOff)
                }
                Some(s) if s == signals::SIGINT => Some(RebootCmd::Restart),
                Some(s) if s == signals::SIGCHLD || s == signals::SIGHUP => None,
                Some(s) => {
                    tracing::debug!(signal = s, "ignored signal");
                    None
                }
                None => None,
            }
        }));
        match round {
            Ok(Some(req)) => break req,
            Ok(None) => {}
            Err(_) => {
                tracing::error!("PID 1 main loop caught a panic; carrying on");
                let fault = "PID 1 main loop panicked (see log)";
                let mut s = shared.lock();
                if !s.faults.iter().any(|f| f == fault) {
                    s.faults.push(fault.into());
                }
                drop(s);
                std::thread::sleep(PANIC_PAUSE);
            }
        }
    };

    // Orderly shutdown.
    tracing::info!(action = ?request, "shutting down");
    shared.lock().stopping = true;
    let mut wait_exits = |timeout: Duration| -> Vec<(i32, ExitStatus)> {
        let mut out = drain();
        if out.is_empty() {
            let _ = signals.wait(timeout);
            out = drain();
        }
        out
    };
    sup.shutdown(cfg.grace, &mut wait_exits);
    publish(&shared, &sup, &cfg, &mut last_reports);
    tracing::info!("all cells stopped");
    // The node is gone: its last synced status plus the monotonic time since is network time.
    {
        let mut k = match keeper.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        k.save();
        shared.lock().clock = k.info();
    }
    if pid1 {
        // Everything else (orphans, helpers) gets TERM, a short grace, then KILL.
        let _ = sys::kill(-1, signals::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let _ = wait_exits(Duration::from_millis(100));
            if !has_children() {
                break;
            }
        }
        let _ = sys::kill(-1, signals::SIGKILL);
        let _ = wait_exits(Duration::from_millis(100));
    }
    if cfg.system {
        sys::sync();
        match mounts::release_data(Path::new("/data")) {
            Ok(()) => tracing::info!("data partition released"),
            Err(e) => tracing::warn!(error = %e, "data partition still mounted read-write"),
        }
        sys::sync();
        let request = if request == RebootCmd::Restart && crate::update::tryboot_next() {
            RebootCmd::TryBoot
        } else {
            request
        };
        tracing::info!(action = ?request, "reboot(2)");
        let _ = sys::reboot(request);
        // reboot(2) failed: PID 1 must not exit. Stay alive and keep reaping.
        tracing::error!("reboot(2) failed; halting in place");
        loop {
            let _ = signals.wait(Duration::from_secs(60));
            let _ = drain();
        }
    }
    if pid1 {
        // PID 1 of a namespace without system duties (tests): exiting ends the namespace.
        tracing::info!("init (no-system) exiting");
    }
    Ok(())
}

/// The never-exit guard of PID 1, for when [`run`] could not run or returned with an error:
/// keep reaping every child and keep handling signals. SIGTERM/SIGPWR power off and SIGINT
/// reboots (with `system`: sync and `reboot(2)`, staying here if that fails). Without
/// `system` (PID 1 of a test namespace) those signals return, which ends the namespace.
pub fn guard(system: bool) {
    let signals = SignalSet::init_set();
    if let Err(e) = signals.block() {
        tracing::error!(error = %e, "guard: cannot block signals");
    }
    sys::ignore_sigpipe();
    tracing::error!(system, "PID 1 guard: reaping and handling signals only");
    loop {
        // A panic here (a bug) must not end PID 1 either.
        let sig = std::panic::catch_unwind(|| {
            let sig = signals.wait(Duration::from_secs(1));
            for (pid, status) in drain() {
                tracing::debug!(pid, %status, "guard reaped");
            }
            sig
        })
        .unwrap_or_else(|_| {
            std::thread::sleep(PANIC_PAUSE);
            None
        });
        let request = match sig {
            Some(s) if s == signals::SIGTERM || s == signals::SIGPWR => RebootCmd::PowerOff,
            Some(s) if s == signals::SIGINT => RebootCmd::Restart,
            _ => continue,
        };
        if !system {
            tracing::info!(action = ?request, "guard: leaving (no system duties)");
            return;
        }
        let _ = sys::kill(-1, signals::SIGTERM);
        sys::sync();
        tracing::info!(action = ?request, "guard: reboot(2)");
        if let Err(e) = sys::reboot(request) {
            tracing::error!(error = %e, "guard: reboot(2) failed; staying up");
        }
    }
}

fn cell_user(cfg: &InitConfig) -> Option<(u32, u32)> {
    if sys::getuid() == 0 {
        cfg.cell_user
    } else {
        None
    }
}

fn has_children() -> bool {
    // With no children, waitpid reports ECHILD, which reap_one maps to None; we look at /proc
    // instead to tell "none exited yet" from "none left".
    let me = sys::getpid().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()).any(|e| {
                std::fs::read_to_string(e.path().join("stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(") ")
                            .map(|(_, r)| r.split(' ').nth(1) == Some(me.as_str()))
                    })
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

fn drain() -> Vec<(i32, ExitStatus)> {
    let mut out = vec![];
    loop {
        match sys::reap_one() {
            Ok(Some(x)) => out.push(x),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "waitpid");
                break;
            }
        }
    }
    out
}

/// Reap every exited child; supervised cells get their status, orphans are just collected.
fn reap_all(sup: &mut Supervisor) {
    for (pid, status) in drain() {
        if sup.on_exit(pid, status, Instant::now()).is_none() {
            tracing::debug!(pid, %status, "reaped orphan");
        }
    }
}

fn publish(shared: &Shared, sup: &Supervisor, cfg: &InitConfig, last: &mut String) {
    let reports: Vec<CellReport> = sup.report(Instant::now());
    // Compare without the countdown, which changes every tick.
    let key = serde_json::to_string(
        &reports
            .iter()
            .map(|r| (&r.name, r.phase, r.pid, r.starts, r.last_exit))
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    shared.lock().cells = reports.clone();
    if key != *last {
        *last = key;
        if let Some(p) = &cfg.state_file {
            if let Err(e) = supervisor::write_state_file(p, &reports) {
                tracing::warn!(error = %e, "state file");
            }
        }
    }
}

/// Find and mount the data partition at /data. Returns (note, fault).
fn prepare_data(cfg: &mut InitConfig) -> (String, Option<String>) {
    let target = PathBuf::from("/data");
    let candidates: Vec<PathBuf> = match &cfg.data_device {
        // `borg.data=/dev/a,/dev/b`: the first that appears.
        Some(d) => d
            .to_string_lossy()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect(),
        None => mounts::DATA_CANDIDATES.iter().map(PathBuf::from).collect(),
    };
    let fallback = |cfg: &mut InitConfig, why: String| {
        let ram = PathBuf::from("/run/borg-data");
        let _ = std::fs::create_dir_all(&ram);
        cfg.data_dir = ram;
        (format!("RAM only: {why}"), Some(why))
    };
    let Some(dev) = mounts::wait_for_device(&candidates, Duration::from_secs(5)) else {
        let why = format!(
            "no data device ({})",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        tracing::error!("{why}; data kept in RAM");
        return fallback(cfg, why);
    };
    match mounts::mount_data(&dev, &target, &cfg.mkfs) {
        Ok(outcome) => {
            cfg.data_dir = target;
            let note = match outcome {
                mounts::DataOutcome::Mounted(d) => format!("mounted {}", d.display()),
                mounts::DataOutcome::Formatted(d) => {
                    format!("formatted blank {} and mounted", d.display())
                }
            };
            tracing::info!(device = %dev.display(), "data partition: {note}");
            (note, None)
        }
        Err(e) => {
            tracing::error!(error = %e, "data partition; data kept in RAM until fixed");
            fallback(cfg, e.to_string())
        }
    }
}

fn start_leds(cfg: &InitConfig, shared: &Shared, net_enabled: bool) {
    let backend = match leds::open_backend(&cfg.leds, cfg.led_gpio) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "LEDs unavailable");
            Box::new(leds::NoLeds)
        }
    };
    let mut driver = LedDriver::new(backend);
    shared.lock().led_backend = driver.backend_name();
    let sh = shared.clone();
    let base = NODE;
    spawn_thread("leds", move || {
        let start = Instant::now();
        let mut logged_err = false;
        let mut last_state = None;
        loop {
            let (inputs, stopping) = {
                let s = sh.lock();
                let crash_loop = s.cells.iter().any(|c| c.name == base && c.failures >= 5);
                (
                    leds::Inputs {
                        booted: s.booted,
                        link: !net_enabled || s.net.link,
                        address: !net_enabled || s.net.addr.is_some(),
                        node: s.node,
                        updating: s.updating,
                        fault: !s.faults.is_empty() || crash_loop,
                    },
                    s.stopping,
                )
            };
            let state = if stopping {
                leds::LedState::Booting
            } else {
                leds::state_for(&inputs)
            };
            if last_state != Some(state) {
                tracing::info!(state = state.name(), "LED state");
                last_state = Some(state);
            }
            sh.lock().led = state;
            if let Err(e) = driver.render(state, start.elapsed().as_millis() as u64) {
                if !logged_err {
                    tracing::warn!(error = %e, "LED write failed");
                    logged_err = true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// The environment variable that tells the node where PID 1's view is (the node's page,
/// `GET /` on its monitor, shows it). The same name as `borg_net::page::APPLIANCE_FILE_ENV`
/// (this crate does not depend on borg-net; the `borg` binary's tests check they agree).
pub const APPLIANCE_FILE_ENV: &str = "BORG_APPLIANCE_FILE";

/// Where PID 1 keeps its view for the node's page: tmpfs on the appliance (rewritten as the
/// log moves; never the SD card), the data directory under `borg up`.
pub fn appliance_file(cfg: &InitConfig) -> PathBuf {
    if cfg.system {
        PathBuf::from("/run/borg/appliance.json")
    } else {
        cfg.data_dir.join("appliance.json")
    }
}

/// Log lines PID 1 puts in its view, and the characters kept of each.
pub const APPLIANCE_LOG_LINES: usize = 30;
pub const APPLIANCE_LINE_CHARS: usize = 512;
/// How often the view is refreshed (written only when it changed).
pub const APPLIANCE_FILE_EVERY: Duration = Duration::from_secs(1);

/// PID 1's view for the node's page: LED state and backend, and the last log lines.
pub fn appliance_view(shared: &Shared) -> serde_json::Value {
    let (led, backend) = {
        let s = shared.lock();
        (s.led.name(), s.led_backend.clone())
    };
    serde_json::json!({
        "led": led,
        "led_backend": backend,
        // Each line cut to 512 characters, so the file stays well under what the page reads
        // (64 KiB) even when every character is escaped.
        "log": crate::logring::tail(APPLIANCE_LOG_LINES)
            .into_iter()
            .map(|l| l.chars().take(APPLIANCE_LINE_CHARS).collect::<String>())
            .collect::<Vec<_>>(),
    })
}

fn start_appliance_file(path: PathBuf, shared: &Shared) {
    let sh = shared.clone();
    spawn_thread("appliance-file", move || {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension("tmp");
        let mut last = String::new();
        let mut logged_err = false;
        loop {
            let text = appliance_view(&sh).to_string();
            if text != last {
                let written =
                    std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &path));
                match written {
                    Ok(()) => last = text,
                    Err(e) if !logged_err => {
                        tracing::warn!(error = %e, path = %path.display(), "appliance view file");
                        logged_err = true;
                    }
                    Err(_) => {}
                }
            }
            std::thread::sleep(APPLIANCE_FILE_EVERY);
        }
    });
}

/// How often the node-watch thread polls the base cell's monitor.
pub const NODE_WATCH_EVERY: Duration = Duration::from_millis(1000);

/// Timeout of one monitor poll: a loopback HTTP answer takes milliseconds; a cell that needs
/// longer counts as not answering this round (the liveness bound allows many such rounds).
pub const NODE_WATCH_TIMEOUT: Duration = Duration::from_millis(800);

/// Poll the node's peerTreeNet monitor, log node-state transitions (the console shows when
/// the node becomes root or joins) and hand its network time to the clock keeper.
fn start_node_watch(shared: &Shared, addr: SocketAddr, keeper: Arc<Mutex<Keeper>>) {
    let sh = shared.clone();
    spawn_thread("node-watch", move || {
        let mut last: Option<NodeState> = None;
        let mut last_sync: Option<bool> = None;
        loop {
            let st = monitor::status(addr, NODE_WATCH_TIMEOUT).ok();
            let received = Instant::now();
            let time = st.as_ref().and_then(TimeStatus::from_status);
            let synced = time.as_ref().map(|t| t.synced);
            if synced.is_some() && synced != last_sync {
                if let Some(t) = &time {
                    tracing::info!(source = %t.source, offset_ms = t.offset_ms, "network time: {}", t.summary());
                }
                last_sync = synced;
            }
            let clock = time.as_ref().map(|t| {
                let mut k = match keeper.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                k.on_status(t, received);
                k.info()
            });
            let node = st
                .as_ref()
                .and_then(|v| v.get("state"))
                .and_then(|s| s.as_str())
                .and_then(NodeState::parse);
            if node != last {
                if let (Some(n), Some(v)) = (node, &st) {
                    tracing::info!(
                        position = %v.get("position").map_or("-".into(), |x| x.to_string()),
                        size = %v.get("size").map_or("-".into(), |x| x.to_string()),
                        "node state: {}",
                        format!("{n:?}").to_lowercase()
                    );
                } else {
                    tracing::info!("node state: unknown (monitor not answering)");
                }
                last = node;
            }
            {
                let mut s = sh.lock();
                s.node = node;
                if st.is_some() {
                    s.monitor_ok_at = Some(Instant::now());
                }
                s.time = time;
                if let Some(c) = clock {
                    s.clock = c;
                }
            }
            std::thread::sleep(NODE_WATCH_EVERY);
        }
    });
}

fn request_shutdown(r: console::Request) {
    let sig = match r {
        console::Request::Reboot => signals::SIGINT,
        console::Request::Poweroff => signals::SIGTERM,
        console::Request::None => return,
    };
    if let Err(e) = sys::kill(sys::getpid(), sig) {
        tracing::error!(error = %e, "cannot signal init");
    }
}

fn start_console(cfg: &InitConfig, shared: &Shared) {
    let sh = shared.clone();
    let mon = cfg.monitor;
    match cfg.console.clone() {
        ConsoleIo::Off => {}
        ConsoleIo::Stdio => spawn_thread("console", move || {
            console::serve(
                std::io::stdin(),
                std::io::stdout(),
                &sh,
                mon,
                &request_shutdown,
            );
        }),
        ConsoleIo::Device(path) => spawn_thread("console", move || loop {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(sys::O_NOCTTY)
                .open(&path);
            match f.and_then(|r| r.try_clone().map(|w| (r, w))) {
                Ok((r, w)) => console::serve(r, w, &sh, mon, &request_shutdown),
                Err(e) => {
                    tracing::warn!(error = %e, console = %path.display(), "console unavailable")
                }
            }
            // The console closed (or could not open): try again shortly.
            std::thread::sleep(Duration::from_secs(2));
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_is_one_process_with_the_contract_args() {
        let mut cfg = InitConfig::new("/data".into(), "/init".into());
        assert_eq!(cfg.cells, vec![NODE]);
        assert_eq!(
            cell_args(&cfg, NODE),
            vec!["node", "--listen", "0.0.0.0", "--data", "/data/node"]
        );
        cfg.join = vec!["10.0.2.2:13300".into(), "10.0.2.3:13300".into()];
        cfg.listen = Some("10.0.2.15".into());
        assert_eq!(
            cell_args(&cfg, NODE),
            vec![
                "node",
                "--listen",
                "10.0.2.15",
                "--data",
                "/data/node",
                "--join",
                "10.0.2.2:13300",
                "--join",
                "10.0.2.3:13300"
            ]
        );
        assert_eq!(
            process_data_dir(Path::new("/data"), NODE),
            Path::new("/data/node")
        );
        // Test stand-ins keep the per-cell layout.
        assert_eq!(
            cell_args(&cfg, "steady"),
            vec!["cell", "steady", "--data", "/data/cells/steady"]
        );
    }

    #[test]
    fn the_node_key_moves_once_from_the_old_cell_directory() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        // Nothing to move on a fresh disk.
        assert!(!migrate_node_key(d.path()).unwrap());
        let old_dir = d.path().join("cells/peerTreeNet");
        std::fs::create_dir_all(&old_dir).unwrap();
        let key = borg_proto::identity::SecretKey::load_or_create(&old_dir).unwrap();
        assert!(migrate_node_key(d.path()).unwrap());
        let new_dir = d.path().join("node");
        let moved = borg_proto::identity::SecretKey::load_or_create(&new_dir).unwrap();
        assert_eq!(moved.public(), key.public(), "identity kept");
        let mode = std::fs::metadata(new_dir.join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!new_dir.join("node.key.tmp").exists());
        // Once only: an existing new key is never overwritten.
        std::fs::remove_file(old_dir.join("node.key")).unwrap();
        borg_proto::identity::SecretKey::load_or_create(&old_dir).unwrap();
        assert!(!migrate_node_key(d.path()).unwrap());
        let still = borg_proto::identity::SecretKey::load_or_create(&new_dir).unwrap();
        assert_eq!(still.public(), key.public());
    }

    #[test]
    fn cmdline_overrides() {
        let mut cfg = InitConfig::new("/data".into(), "/init".into());
        cfg.apply_cmdline(&cmdline::parse(
            "borg.join=1.2.3.4:5 borg.leds=none borg.led_gpio=5,6 borg.net=off borg.grace_ms=10",
        ));
        assert_eq!(cfg.join, vec!["1.2.3.4:5"]);
        assert_eq!(cfg.leds, "none");
        assert_eq!(cfg.led_gpio, (5, 6));
        assert!(!cfg.network);
        assert_eq!(cfg.grace, Duration::from_millis(10));
    }

    #[test]
    fn monitor_follows_the_listen_address() {
        let mut cfg = InitConfig::new("/data".into(), "/init".into());
        assert_eq!(cfg.monitor, monitor::base_monitor());
        cfg.apply_cmdline(&cmdline::parse("borg.listen=0.0.0.0"));
        assert_eq!(cfg.monitor, monitor::base_monitor());
        cfg.apply_cmdline(&cmdline::parse("borg.listen=10.1.2.3"));
        assert_eq!(cfg.monitor, "10.1.2.3:13310".parse().unwrap());
        assert_eq!(monitor_for_listen("not an ip"), None);
    }

    #[test]
    fn hostname_is_stable_and_valid() {
        let k = borg_proto::identity::SecretKey::generate().public();
        let h = hostname_for(&k);
        assert_eq!(h, hostname_for(&k));
        assert_eq!(h.len(), 13);
        assert!(h
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }
}
