//! `borg init` (PID 1 on the appliance) and `borg up` (the same supervisor on a laptop).
//!
//! Thin glue: parse flags, set up tracing (console + the in-memory log ring the console's
//! `log` command reads), build a [`borg_system::init::InitConfig`], call
//! [`borg_system::init::run`]. Also [`argv0_dispatch`] for the multi-call binary: invoked as
//! `/init`, or as PID 1 without an explicit subcommand, it behaves as `borg init`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use borg_system::init::{self, ConsoleIo, InitConfig};
use borg_system::supervisor::RestartPolicy;

/// Flags shared by `init` and `up`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CellFlags {
    /// Contact IP:PORT the node joins (repeatable). On the appliance also `borg.join=`.
    #[arg(long = "join", value_name = "IP:PORT")]
    pub join: Vec<String>,
    /// Address the node listens on (default 0.0.0.0).
    #[arg(long, value_name = "IP")]
    pub listen: Option<String>,
    /// Status LEDs: auto, sysfs, gpio, sim:PATH, none.
    #[arg(long, value_name = "BACKEND")]
    pub leds: Option<String>,
    /// BCM pins STATUS,POWER for --leds gpio.
    #[arg(long, value_name = "S,P")]
    pub led_gpio: Option<String>,
    /// Grace period per supervised process at shutdown (ms) before SIGKILL.
    #[arg(long, value_name = "MS")]
    pub grace_ms: Option<u64>,
    /// Write the supervisor's cell reports (JSON) to this file whenever they change.
    #[arg(long, value_name = "FILE")]
    pub state_file: Option<PathBuf>,
    /// Run the node as this user when root: NAME (from /etc/passwd), UID:GID, or "root".
    /// Default: user "borg", else 1000:1000.
    #[arg(long, value_name = "USER")]
    pub cell_user: Option<String>,
    /// Program started for each supervised process (default: this executable). For tests.
    #[arg(long, value_name = "PATH", hide = true)]
    pub cell_program: Option<PathBuf>,
    /// Processes to supervise, comma-separated (default: `node`, the one `borg node` process
    /// hosting every cell; other names run `PROGRAM cell NAME --data DATA/cells/NAME`). Tests.
    #[arg(long, value_name = "A,B", hide = true, value_delimiter = ',')]
    pub cells: Option<Vec<String>>,
    /// First restart delay (ms); doubles per consecutive failure.
    #[arg(long, value_name = "MS", hide = true)]
    pub backoff_base_ms: Option<u64>,
    /// Restart delay cap (ms).
    #[arg(long, value_name = "MS", hide = true)]
    pub backoff_max_ms: Option<u64>,
    /// Monitor address of the node's peerTreeNet (default 127.0.0.1:13310).
    #[arg(long, value_name = "IP:PORT", hide = true)]
    pub monitor: Option<std::net::SocketAddr>,
    /// Liveness: ms a fresh node has to answer on its monitor before it is restarted
    /// (0 turns the liveness check off).
    #[arg(long, value_name = "MS", hide = true)]
    pub liveness_startup_ms: Option<u64>,
    /// Liveness: ms the node's monitor may stay silent before the node is restarted.
    #[arg(long, value_name = "MS", hide = true)]
    pub liveness_silence_ms: Option<u64>,
    /// For tests: panic once in PID 1's main loop (PID 1 must carry on).
    #[arg(long, hide = true)]
    pub inject_panic: bool,
}

/// `borg init`: PID 1 of the appliance.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct InitArgs {
    /// Skip system duties (mounts, networking, data partition, reboot): for tests in a PID
    /// namespace. Reaping, signals, supervisor and ordered shutdown stay the same.
    #[arg(long)]
    pub no_system: bool,
    /// Data directory (system mode: the data partition is mounted at /data).
    #[arg(long, default_value = "/data")]
    pub data: PathBuf,
    /// Serve the `borg> ` prompt on stdin/stdout (default in system mode: /dev/console).
    #[arg(long)]
    pub console: bool,
    #[command(flatten)]
    pub cells: CellFlags,
}

/// `borg up`: run the node under the supervisor on an ordinary machine.
#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Data directory; the node keeps its key and state in DATA/node, network time in
    /// DATA/nettime.
    #[arg(long)]
    pub data: PathBuf,
    /// Serve the `borg> ` prompt on stdin/stdout.
    #[arg(long)]
    pub console: bool,
    #[command(flatten)]
    pub cells: CellFlags,
}

/// Multi-call dispatch: `Some(args)` when this process must act as `borg init` because it was
/// started as `init`/`/init`, or as PID 1 without an explicit `init`/`up` subcommand (the
/// kernel passes stray command-line words as arguments, so they are ignored).
pub fn argv0_dispatch() -> Option<InitArgs> {
    let args: Vec<String> = std::env::args().collect();
    let pid1 = std::process::id() == 1;
    decide_dispatch(&args, pid1)
}

fn decide_dispatch(args: &[String], pid1: bool) -> Option<InitArgs> {
    let name = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
        .unwrap_or_default();
    let explicit = matches!(args.get(1).map(String::as_str), Some("init" | "up"));
    if explicit {
        return None;
    }
    if name == "init" || pid1 {
        return Some(InitArgs {
            data: PathBuf::from("/data"),
            ..InitArgs::default()
        });
    }
    None
}

fn setup_tracing(filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(|| borg_system::logring::TeeWriter)
        .try_init();
}

fn parse_user(spec: Option<&str>) -> anyhow::Result<Option<(u32, u32)>> {
    let spec = spec.unwrap_or("borg");
    if spec == "root" || spec == "0:0" {
        return Ok(None);
    }
    if let Some((u, g)) = spec.split_once(':') {
        return Ok(Some((
            u.parse().context("bad uid in --cell-user")?,
            g.parse().context("bad gid in --cell-user")?,
        )));
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == spec {
            return Ok(Some((f[2].parse()?, f[3].parse()?)));
        }
    }
    if spec == "borg" {
        return Ok(Some((1000, 1000)));
    }
    anyhow::bail!("unknown user '{spec}' for --cell-user")
}

fn config(data: PathBuf, flags: &CellFlags) -> anyhow::Result<InitConfig> {
    let program = match &flags.cell_program {
        Some(p) => p.clone(),
        // Before /proc is mounted (PID 1) current_exe fails: use argv[0] when it is an
        // absolute path (init=/usr/bin/borg on buildroot images), else /init (initramfs).
        None => std::env::current_exe().unwrap_or_else(|_| {
            std::env::args()
                .next()
                .map(PathBuf::from)
                .filter(|p| p.is_absolute() && p.exists())
                .unwrap_or_else(|| PathBuf::from("/init"))
        }),
    };
    let mut cfg = InitConfig::new(data, program);
    cfg.join = flags.join.clone();
    cfg.listen = flags.listen.clone();
    if let Some(l) = &flags.leds {
        cfg.leds = l.clone();
    }
    if let Some(p) = &flags.led_gpio {
        cfg.led_gpio = borg_system::leds::parse_gpio_pins(p)
            .context("--led-gpio wants two different BCM pins, e.g. 17,27")?;
    }
    if let Some(ms) = flags.grace_ms {
        cfg.grace = Duration::from_millis(ms);
    }
    cfg.state_file = flags.state_file.clone();
    cfg.cell_user = parse_user(flags.cell_user.as_deref())?;
    if let Some(c) = &flags.cells {
        cfg.cells = c.iter().filter(|s| !s.is_empty()).cloned().collect();
    }
    let d = RestartPolicy::default();
    cfg.policy = RestartPolicy {
        base: flags.backoff_base_ms.map_or(d.base, Duration::from_millis),
        max: flags.backoff_max_ms.map_or(d.max, Duration::from_millis),
        healthy_after: d.healthy_after,
    };
    if let Some(m) = flags
        .monitor
        .or_else(|| flags.listen.as_deref().and_then(init::monitor_for_listen))
    {
        cfg.monitor = m;
    }
    let live = cfg.liveness.unwrap_or_default();
    cfg.liveness = match flags.liveness_startup_ms {
        Some(0) => None,
        s => Some(borg_system::supervisor::Liveness {
            startup: s.map_or(live.startup, Duration::from_millis),
            silence: flags
                .liveness_silence_ms
                .map_or(live.silence, Duration::from_millis),
        }),
    };
    cfg.inject_panic = flags.inject_panic;
    Ok(cfg)
}

/// `borg init`. As PID 1 in system mode this never returns: a configuration error, an error
/// from [`init::run`] or a panic anywhere in it ends in [`init::guard`], which keeps reaping
/// and handling signals (PID 1 exiting panics the kernel).
pub fn run_init(args: InitArgs) -> anyhow::Result<()> {
    setup_tracing(&std::env::var("BORG_LOG").unwrap_or_else(|_| "info".into()));
    init::install_panic_hook();
    let pid1 = std::process::id() == 1;
    let system = !args.no_system;
    let result = std::panic::catch_unwind(|| -> anyhow::Result<()> {
        let mut cfg = config(args.data.clone(), &args.cells).context("configuration")?;
        cfg.system = system;
        cfg.console = if args.console {
            ConsoleIo::Stdio
        } else if cfg.system {
            ConsoleIo::Device(PathBuf::from("/dev/console"))
        } else {
            ConsoleIo::Off
        };
        if cfg.system && args.cells.leds.is_none() {
            cfg.leds = "auto".into();
        }
        cfg.installer = Some(crate::update_install::install);
        init::run(cfg)?;
        Ok(())
    })
    .unwrap_or_else(|_| Err(anyhow::anyhow!("init panicked")));
    // PID 1 must not exit: in system mode never, and after a failure not even in a test
    // namespace (where an orderly SIGTERM stop may end it).
    if pid1 && (system || result.is_err()) {
        if let Err(e) = &result {
            tracing::error!("borg init: {e:#}; PID 1 stays up");
        }
        init::guard(system);
    }
    result
}

/// `borg up`: the supervisor without system duties (no mounts, networking or reboot).
pub fn run_up(args: UpArgs) -> anyhow::Result<()> {
    setup_tracing(&std::env::var("BORG_LOG").unwrap_or_else(|_| "info".into()));
    init::install_panic_hook();
    let mut cfg = config(args.data.clone(), &args.cells)?;
    cfg.system = false;
    if args.cells.leds.is_none() {
        cfg.leds = "none".into();
    }
    cfg.console = if args.console {
        ConsoleIo::Stdio
    } else {
        ConsoleIo::Off
    };
    init::run(cfg)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn dispatch_rules() {
        assert!(decide_dispatch(&v(&["/init"]), true).is_some());
        assert!(decide_dispatch(&v(&["/init", "quiet"]), true).is_some());
        assert!(decide_dispatch(&v(&["init"]), false).is_some());
        assert!(decide_dispatch(&v(&["/sbin/borg"]), true).is_some());
        // Explicit subcommands win, even as PID 1 of a namespace.
        assert!(decide_dispatch(&v(&["borg", "init", "--no-system"]), true).is_none());
        assert!(decide_dispatch(&v(&["/init", "up", "--data", "x"]), true).is_none());
        // The node runs as `borg node ...` (argv0 "borg"), never as init.
        assert!(decide_dispatch(&v(&["borg", "node", "--listen", "0.0.0.0"]), false).is_none());
        assert!(decide_dispatch(&v(&["borg", "cell", "peerTreeNet"]), false).is_none());
        assert!(decide_dispatch(&v(&["/usr/bin/borg", "status"]), false).is_none());
    }

    #[test]
    fn users_parse() {
        assert_eq!(parse_user(Some("root")).unwrap(), None);
        assert_eq!(parse_user(Some("12:34")).unwrap(), Some((12, 34)));
        assert!(parse_user(Some("x:y")).is_err());
        assert!(parse_user(Some("no-such-user-here")).is_err());
    }
}
