//! Helpers shared by the integration tests: build and find the `borg` binary, run real
//! `borg node` processes on their own loopback addresses, read their monitors, wait on
//! conditions with deadlines (never sleep-and-hope), and check a live tree's structure.
#![allow(clippy::unwrap_used)]

pub mod appliance;
pub mod cli;
pub mod natnet;
pub mod netns;
pub mod outsider;
pub mod qemu;
pub mod timenet;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Path of the `borg` binary, built once per test process.
pub fn borg_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "borg", "--bin", "borg"])
            .current_dir(&root)
            .status()
            .expect("running cargo build for the borg binary");
        assert!(status.success(), "cargo build -p borg failed");
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test> -> target/<profile>/borg
        let bin = exe.parent().unwrap().parent().unwrap().join("borg");
        assert!(bin.exists(), "borg binary not found at {}", bin.display());
        bin
    })
    .clone()
}

/// Start `borg node` in namespace `ns` listening on its IP, with its data dir `dir/name` and
/// its log `dir/name.log` (broadcast deliveries logged), joining through `join`, with `extra`
/// arguments and `env` added to its environment. Returns the child and the log's path.
pub fn spawn_ns_node(
    ns: &netns::Ns,
    dir: &Path,
    name: &str,
    join: &[String],
    extra: &[String],
    env: &[(String, String)],
) -> (Child, PathBuf) {
    let data = dir.join(name);
    let log = dir.join(format!("{name}.log"));
    let mut cmd = ns.command(borg_bin());
    cmd.arg("node")
        .args(["--listen", &ns.ip.to_string()])
        .arg("--data")
        .arg(&data)
        .args(extra);
    for j in join {
        cmd.args(["--join", j]);
    }
    let logf = std::fs::File::create(&log).expect("log file");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .env("BORG_LOG", "info,borg::delivered=debug")
        .envs(env.iter().map(|(k, v)| (k, v)));
    let child = cmd.spawn().expect("spawn borg node in namespace");
    (child, log)
}

/// Kill every node process (and reap it); if the test is failing, keep the logs in `dir`.
pub fn stop_nodes<'a>(children: impl Iterator<Item = &'a mut Child>, dir: &Path, tag: &str) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    if std::thread::panicking() {
        keep_logs(dir, tag);
    }
}

/// Wait until the log of every one of `names` (read by `log_of`) shows the delivery of a
/// broadcast whose text is `text` (the node logs "broadcast <id> from <key>: <text> cell=...");
/// how long it took, or the names still missing.
pub fn wait_logged_delivery(
    names: &[String],
    log_of: impl Fn(&str) -> String,
    text: &str,
    within: Duration,
) -> Result<Duration, Vec<String>> {
    let start = Instant::now();
    let needle = format!(": {text} ");
    let mut missing = Vec::new();
    let ok = wait_for(within, Duration::from_millis(100), || {
        missing = names
            .iter()
            .filter(|n| {
                !log_of(n)
                    .lines()
                    .any(|l| l.contains(" broadcast ") && l.contains(&needle))
            })
            .cloned()
            .collect();
        missing.is_empty().then_some(())
    });
    ok.map(|_| start.elapsed()).ok_or(missing)
}

/// Poll `cond` every `every` until it returns `Some` or `within` passes.
pub fn wait_for<T>(
    within: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// A blocking `GET path` on a monitor; `None` if it cannot be reached or does not say 200.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    Some(body.to_string())
}

/// Resident memory (VmRSS) of process `pid` in KiB, 0 if it is gone.
pub fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The value of a Prometheus counter line `name{labels} value` (labels given exactly).
pub fn metric(text: &str, name_and_labels: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// One `borg node` process.
pub struct NodeProc {
    pub ip: Ipv4Addr,
    pub child: Child,
    pub data: PathBuf,
    pub log: PathBuf,
}

/// A network of real node processes, each on its own 127.X.Y.Z with the default ports.
pub struct Net {
    pub subnet: u8,
    pub heartbeat_ms: u64,
    pub max_children: u64,
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<usize, NodeProc>,
    /// Environment given to every node process.
    pub env: Vec<(String, String)>,
}

impl Net {
    /// `subnet` keeps concurrently running tests apart (127.subnet.0.x).
    pub fn new(subnet: u8, heartbeat_ms: u64, max_children: u64) -> Self {
        Self {
            subnet,
            heartbeat_ms,
            max_children,
            dir: tempfile::tempdir().unwrap(),
            nodes: BTreeMap::new(),
            env: Vec::new(),
        }
    }

    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(127, self.subnet, (i / 250) as u8, (i % 250 + 2) as u8)
    }

    pub fn mon(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.ip(i).into(), 13310)
    }

    /// Start node `i`, joining through node `join` if given. Its data dir persists across
    /// restarts (same key).
    pub fn spawn(&mut self, i: usize, join: Option<usize>) {
        self.spawn_with(i, join, &[]);
    }

    /// [`Net::spawn`] with extra `borg node` arguments (e.g. a clock offset).
    pub fn spawn_with(&mut self, i: usize, join: Option<usize>, extra: &[&str]) {
        let ip = self.ip(i);
        let data = self.dir.path().join(format!("n{i}"));
        let log = self.dir.path().join(format!("n{i}.log"));
        let mut cmd = Command::new(borg_bin());
        cmd.arg("node")
            .arg("--listen")
            .arg(ip.to_string())
            .arg("--data")
            .arg(&data)
            .arg("--max-children")
            .arg(self.max_children.to_string())
            .arg("--heartbeat-ms")
            .arg(self.heartbeat_ms.to_string());
        if let Some(j) = join {
            cmd.arg("--join").arg(self.ip(j).to_string());
        }
        cmd.args(extra);
        let logf = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::null())
            .stderr(logf)
            .env("BORG_LOG", "info");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        self.nodes.insert(
            i,
            NodeProc {
                ip,
                child,
                data,
                log,
            },
        );
    }

    /// Wait until node `i`'s monitor answers.
    pub fn wait_up(&self, i: usize) {
        let mon = self.mon(i);
        wait_for(Duration::from_secs(20), Duration::from_millis(20), || {
            http_get(mon, "/status")
        })
        .unwrap_or_else(|| panic!("node {i} monitor never came up; log:\n{}", self.log_of(i)));
    }

    /// `kill -9` node `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut n) = self.nodes.remove(&i) {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("n{i}.log"))).unwrap_or_default()
    }

    pub fn status(&self, i: usize) -> Option<Value> {
        serde_json::from_str(&http_get(self.mon(i), "/status")?).ok()
    }

    pub fn metrics(&self, i: usize) -> String {
        http_get(self.mon(i), "/metrics").unwrap_or_default()
    }

    /// `/status` of the cell of node `i` whose monitor is on `mon_port`.
    pub fn cell_status(&self, i: usize, mon_port: u16) -> Option<Value> {
        let mon = SocketAddr::new(self.ip(i).into(), mon_port);
        serde_json::from_str(&http_get(mon, "/status")?).ok()
    }

    /// [`Net::check_tree`] for the cell whose monitor is on `mon_port` (k = `k`).
    pub fn check_cell_tree(&self, mon_port: u16, k: u64) -> Result<(usize, u64), String> {
        check_tree_statuses(
            k,
            self.nodes
                .keys()
                .map(|&i| (i.to_string(), self.cell_status(i, mon_port))),
        )
    }

    /// Check the live tree: every running node answers, positions 1..N are each held once,
    /// one root whose size is N, parents and children agree both ways, everyone names the
    /// root. Returns (N, depth) or what is wrong.
    pub fn check_tree(&self) -> Result<(usize, u64), String> {
        check_tree_statuses(
            self.max_children,
            self.nodes.keys().map(|&i| (i.to_string(), self.status(i))),
        )
    }

    /// Wait until [`Net::check_tree`] passes; returns how long it took.
    pub fn wait_tree(&self, within: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let mut last = String::new();
        let trace = std::env::var_os("BORG_TEST_TRACE").is_some();
        let ok = wait_for(within, Duration::from_millis(25), || {
            match self.check_tree() {
                Ok(_) => Some(()),
                Err(e) => {
                    if trace && e != last {
                        eprintln!("  {:?}: {e}", start.elapsed());
                    }
                    last = e;
                    None
                }
            }
        });
        match ok {
            Some(()) => Ok(start.elapsed()),
            None => Err(last),
        }
    }

    /// Index of the node at tree position `pos`.
    pub fn holder_of(&self, pos: u64) -> Option<usize> {
        self.nodes
            .keys()
            .copied()
            .find(|&i| self.status(i).and_then(|s| s["position"].as_u64()) == Some(pos))
    }

    /// Run `borg broadcast` against node `i`'s receptor.
    pub fn broadcast(&self, i: usize, text: &str) -> std::process::Output {
        Command::new(borg_bin())
            .args(["broadcast", "--node", &self.ip(i).to_string(), text])
            .output()
            .unwrap()
    }

    /// Sum of `delivered_broadcasts` per node.
    pub fn delivered(&self) -> BTreeMap<usize, u64> {
        self.nodes
            .keys()
            .map(|&i| {
                (
                    i,
                    self.status(i)
                        .and_then(|s| s["delivered_broadcasts"].as_u64())
                        .unwrap_or(0),
                )
            })
            .collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in self.nodes.values_mut() {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
        if std::thread::panicking() {
            keep_logs(self.dir.path(), &self.subnet.to_string());
        }
    }
}

/// Copy the `*.log` files of a failed test to `/tmp/borg-test-logs-<tag>` (the temp dir goes
/// away) for the developer and the CI output.
pub fn keep_logs(dir: &Path, tag: &str) {
    let keep = std::env::temp_dir().join(format!("borg-test-logs-{tag}"));
    let _ = std::fs::create_dir_all(&keep);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
            }
        }
    }
    eprintln!("node logs kept in {}", keep.display());
}

/// Check a live tree from its nodes' `/status` documents (`None`: the node did not answer):
/// positions 1..N are each held once, one root whose size is N, parents and children agree
/// both ways, everyone names the root. Returns (N, depth) or what is wrong.
pub fn check_tree_statuses(
    k: u64,
    statuses: impl Iterator<Item = (String, Option<Value>)>,
) -> Result<(usize, u64), String> {
    let mut by_pos: BTreeMap<u64, (String, Value)> = BTreeMap::new();
    for (i, st) in statuses {
        let st = st.ok_or(format!("node {i} does not answer"))?;
        let pos = st["position"]
            .as_u64()
            .ok_or(format!("node {i} has no position ({})", st["state"]))?;
        if let Some((other, _)) = by_pos.insert(pos, (i.clone(), st)) {
            return Err(format!("position {pos} held by nodes {other} and {i}"));
        }
    }
    let n = by_pos.len() as u64;
    if by_pos.keys().copied().collect::<Vec<_>>() != (1..=n).collect::<Vec<_>>() {
        return Err(format!(
            "positions {:?} are not 1..{n}",
            by_pos.keys().collect::<Vec<_>>()
        ));
    }
    let root_key = by_pos[&1].1["public_key"].clone();
    if by_pos[&1].1["size"].as_u64() != Some(n) {
        return Err(format!("root says size {} of {n}", by_pos[&1].1["size"]));
    }
    let mut depth = 0;
    for (&pos, (i, st)) in &by_pos {
        if st["root"]["key"] != root_key {
            return Err(format!("node {i} at {pos} names another root"));
        }
        if pos > 1 {
            let parent = (pos - 2) / k + 1;
            if st["parent"]["pos"].as_u64() != Some(parent)
                || st["parent"]["key"] != by_pos[&parent].1["public_key"]
            {
                return Err(format!("node at {pos} has the wrong parent"));
            }
        }
        let want: Vec<(u64, Value)> = ((pos - 1) * k + 2..=pos * k + 1)
            .filter(|c| *c <= n)
            .map(|c| (c, by_pos[&c].1["public_key"].clone()))
            .collect();
        let have: Vec<(u64, Value)> = st["children"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| (c["pos"].as_u64().unwrap_or(0), c["key"].clone()))
                    .collect()
            })
            .unwrap_or_default();
        if want != have {
            return Err(format!(
                "node at {pos} lists children {:?}",
                have.iter().map(|c| c.0).collect::<Vec<_>>()
            ));
        }
        depth = depth.max(st["depth"].as_u64().unwrap_or(0));
    }
    Ok((n as usize, depth))
}
