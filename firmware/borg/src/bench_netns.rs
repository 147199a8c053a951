//! What the network benchmarks share: `netem_hub.py` (tests/src, embedded here), the
//! user-space switch between network namespaces that gives every link its delay, loss and
//! rate (this kernel has no sch_netem), and processes run inside those namespaces.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub(crate) const HUB: &str = include_str!("../../../tests/src/netem_hub.py");

/// Run `cmd` to completion within `within`; its stdout.
pub(crate) fn run_bounded(cmd: &mut Command, within: Duration) -> Result<String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| what.clone())?;
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                o.read_to_string(&mut out)?;
            }
            if !status.success() {
                bail!("{what}: {status}");
            }
            return Ok(out);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what}: still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The running switch and its namespaces; on drop it kills what runs in them and deletes them.
pub(crate) struct Hub {
    child: Child,
    stdin: Option<ChildStdin>,
    pub names: Vec<String>,
    pub ips: Vec<String>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        // EOF: the hub kills what runs in its namespaces and deletes them.
        self.stdin = None;
        for _ in 0..1000 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Processes started in the namespaces, killed on drop (before the hub goes).
pub(crate) struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

pub(crate) fn have(program: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(program).is_file())
}

/// Start the switch with `n` namespaces; `opts` are more `netem_hub.py net` options
/// (`--leg-ms`, `--loss`, `--rate-mbit`, ...).
pub(crate) fn start_hub(dir: &Path, n: usize, opts: &[String]) -> Result<Hub> {
    let script = dir.join("netem_hub.py");
    std::fs::write(&script, HUB)?;
    let prefix = format!("bb{}", std::process::id() % 100_000);
    let mut child = Command::new("python3")
        .arg(&script)
        .args(["net", "--prefix", &prefix, "--nodes", &n.to_string()])
        .args(opts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting netem_hub.py")?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().context("hub stdout")?;
    let mut hub = Hub {
        child,
        stdin,
        names: Vec::new(),
        ips: Vec::new(),
    };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).context("the hub's ready line")?;
    let strs = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    hub.names = strs("namespaces");
    hub.ips = strs("ips");
    if hub.names.len() != n {
        bail!("hub did not come up: {line}");
    }
    Ok(hub)
}
