//! # Network namespaces joined by a delaying switch, for the network-time tests
//!
//! This kernel may have no `sch_netem`, so `tc netem` cannot delay packets. Instead
//! `netem_hub.py` (next to this file) creates the namespaces `<prefix>-n0..n{N-1}`, gives each a
//! TAP device at `10.77.0.(10+i)/24` and switches Ethernet frames between the TAPs in user
//! space, holding each frame for two independent uniform delays of 7.5-12.5 ms (one per leg,
//! sender to switch and switch to receiver): every pair of namespaces sees 15-25 ms one way
//! (20 +- 5 ms), with jitter and reordering as netem would give. Neighbour entries are fixed
//! (no ARP round trip in front of a first packet). The switch runs at SCHED_FIFO when allowed,
//! so the machine's load does not add to the delays it draws.
//!
//! [`TimeNet::new`] starts the hub and returns once the namespaces are up; dropping the
//! [`TimeNet`] (also while a test panics) closes the hub's stdin, and the hub kills what runs in
//! its namespaces and deletes them. A test process killed with SIGKILL closes that pipe too, so
//! even then nothing is left behind. [`TimeNodes`] runs `borg node` processes in them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::{run_with_deadline, tool, Ns};
use crate::{borg_bin, wait_for};

/// The switch and namespace script.
pub fn hub_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/netem_hub.py")
}

/// cronoTree's DNA ports (net, receptor, monitor) and peerTreeNet's.
pub const CRONO_MON: u16 = 13398;
pub const NET_MON: u16 = 13310;
pub const NET_RECP: u16 = 13305;

const HUB_READY: Duration = Duration::from_secs(30);
const CLI_DEADLINE: Duration = Duration::from_secs(10);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Round-trip figures of UDP echoes through the switch.
#[derive(Debug, Clone, Copy)]
pub struct Rtt {
    pub sent: u64,
    pub received: u64,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Namespaces joined by the delaying switch.
pub struct TimeNet {
    hub: Child,
    stdin: Option<ChildStdin>,
    pub nodes: Vec<Ns>,
    names: Vec<String>,
}

impl TimeNet {
    /// `n` namespaces named after `tag`, joined by the switch.
    pub fn new(tag: &str, n: usize) -> TimeNet {
        let tag: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect();
        let prefix = format!(
            "bt{}t{}-{tag}",
            std::process::id() % 10_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = Command::new(tool("python3"));
        cmd.arg(hub_script())
            .args(["net", "--prefix", &prefix, "--nodes", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut hub = cmd.spawn().expect("starting netem_hub.py (python3)");
        let stdin = hub.stdin.take();
        let stdout = hub.stdout.take().expect("hub stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut net = TimeNet {
            hub,
            stdin,
            nodes: Vec::new(),
            names: Vec::new(),
        };
        let line = rx
            .recv_timeout(HUB_READY)
            .unwrap_or_else(|_| panic!("netem_hub.py not ready within {HUB_READY:?}"));
        let ready: Value = serde_json::from_str(&line).expect("hub's ready line");
        let names: Vec<String> = ready["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect();
        let ips: Vec<Ipv4Addr> = ready["ips"]
            .as_array()
            .expect("ips")
            .iter()
            .map(|v| v.as_str().unwrap_or_default().parse().expect("an address"))
            .collect();
        net.names.clone_from(&names);
        net.nodes = names
            .into_iter()
            .zip(ips)
            .map(|(name, ip)| Ns { name, ip })
            .collect();
        assert_eq!(net.nodes.len(), n);
        net
    }

    /// 300 UDP echoes (one each 5 ms) from namespace `from` to namespace `to`.
    pub fn rtt(&self, from: usize, to: usize) -> Rtt {
        let dst = &self.nodes[to];
        let port = "7777";
        let mut server = dst.command(tool("python3"));
        server
            .arg(hub_script())
            .args(["echo-server", &dst.ip.to_string(), port, "--secs", "10"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut server = server.spawn().expect("echo server");
        let mut first = String::new();
        if let Some(out) = server.stdout.as_mut() {
            let _ = BufReader::new(out).read_line(&mut first);
        }
        assert!(first.contains("listening"), "echo server: {first:?}");
        let mut ping = self.nodes[from].command(tool("python3"));
        ping.arg(hub_script())
            .args(["ping", &dst.ip.to_string(), port, "--count", "300"]);
        let out = run_with_deadline(&mut ping, None, Duration::from_secs(20)).expect("ping");
        let _ = server.kill();
        let _ = server.wait();
        let v: Value = serde_json::from_slice(&out.stdout).expect("ping's JSON line");
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        Rtt {
            sent: v["sent"].as_u64().unwrap_or(0),
            received: v["received"].as_u64().unwrap_or(0),
            min_ms: f("min_ms"),
            p50_ms: f("p50_ms"),
            p99_ms: f("p99_ms"),
            max_ms: f("max_ms"),
        }
    }
}

impl Drop for TimeNet {
    fn drop(&mut self) {
        // EOF on its stdin: the hub kills what is left in its namespaces and deletes them.
        self.stdin = None;
        let exited = wait_for(Duration::from_secs(20), Duration::from_millis(20), || {
            self.hub.try_wait().ok().flatten()
        });
        if exited.is_none() {
            let _ = self.hub.kill();
            let _ = self.hub.wait();
        }
        for ns in &self.names {
            if Path::new("/run/netns").join(ns).exists() {
                let mut del = Command::new(tool("ip"));
                del.args(["netns", "del", ns]);
                let _ = run_with_deadline(&mut del, None, CLI_DEADLINE);
            }
        }
    }
}

/// A `borg node` process in a namespace.
pub struct TimeNode {
    pub ns: Ns,
    pub child: Child,
    pub log: PathBuf,
    pub started: Instant,
}

/// `borg node` processes by name; logs kept on failure.
pub struct TimeNodes {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<String, TimeNode>,
    tag: String,
}

impl TimeNodes {
    pub fn new(tag: &str) -> TimeNodes {
        TimeNodes {
            dir: tempfile::tempdir().expect("temp dir"),
            nodes: BTreeMap::new(),
            tag: tag.to_string(),
        }
    }

    /// Start node `name` in `ns` on its address, joining `join` (IP or IP:PORT), with `extra`
    /// arguments (e.g. `--clock-offset-s`).
    pub fn spawn(&mut self, name: &str, ns: &Ns, join: &[String], extra: &[String]) {
        let (child, log) = crate::spawn_ns_node(ns, self.dir.path(), name, join, extra, &[]);
        self.nodes.insert(
            name.to_string(),
            TimeNode {
                ns: ns.clone(),
                child,
                log,
                started: Instant::now(),
            },
        );
    }

    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Panics, with its log, if any node process has exited.
    pub fn assert_alive(&mut self) {
        let mut dead = None;
        for (name, n) in &mut self.nodes {
            if let Ok(Some(status)) = n.child.try_wait() {
                dead = Some((name.clone(), status));
                break;
            }
        }
        if let Some((name, status)) = dead {
            panic!(
                "node {name} exited ({status}); log:\n{}",
                self.log_of(&name)
            );
        }
    }

    /// `borg status --json --node IP:port` of node `name`, run in its namespace.
    pub fn status(&self, name: &str, port: u16) -> Option<Value> {
        let n = self.nodes.get(name)?;
        let mut cmd = n.ns.command(borg_bin());
        cmd.args(["status", "--json", "--node", &format!("{}:{port}", n.ns.ip)]);
        let out = run_with_deadline(&mut cmd, None, CLI_DEADLINE).ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `borg broadcast` through node `name`'s peerTreeNet receptor; panics if it fails.
    pub fn broadcast(&self, name: &str, text: &str) {
        let n = &self.nodes[name];
        let mut cmd = n.ns.command(borg_bin());
        cmd.args([
            "broadcast",
            "--node",
            &format!("{}:{NET_RECP}", n.ns.ip),
            text,
        ]);
        if let Err(e) = run_with_deadline(&mut cmd, None, CLI_DEADLINE) {
            panic!("broadcast via {name}: {e}");
        }
    }

    /// Wait until every node logged the delivery of a broadcast whose text is `text`.
    pub fn wait_delivered(&self, text: &str, within: Duration) -> Result<Duration, Vec<String>> {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        crate::wait_logged_delivery(&names, |n| self.log_of(n), text, within)
    }
}

impl Drop for TimeNodes {
    fn drop(&mut self) {
        let children = self.nodes.values_mut().map(|n| &mut n.child);
        crate::stop_nodes(children, self.dir.path(), &self.tag);
    }
}

/// The `q` quantile (0..=1) of `v` (sorted in place); NaN if empty.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}
