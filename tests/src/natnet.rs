//! Real `borg node` processes inside the namespaces of a [`crate::netns::Topology`]: start,
//! stop (SIGTERM) and kill (SIGKILL) them, read their status with `borg status --json` run in
//! their namespace, broadcast through their receptor, and check the tree they form.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::{run_with_deadline, Ns};
use crate::{borg_bin, check_tree_statuses, wait_for};

/// One node process in a namespace.
pub struct NsNode {
    pub ns: Ns,
    pub child: Child,
    pub log: PathBuf,
}

/// Nodes by name, with their logs in one directory (kept on failure).
pub struct NsNodes {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<String, NsNode>,
    pub heartbeat_ms: u64,
    pub max_children: u64,
    pub tag: String,
    /// More `borg node` arguments and environment for every node.
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
}

const CLI_DEADLINE: Duration = Duration::from_secs(10);

impl NsNodes {
    pub fn new(tag: &str, heartbeat_ms: u64, max_children: u64) -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            nodes: BTreeMap::new(),
            heartbeat_ms,
            max_children,
            tag: tag.to_string(),
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Start node `name` in `ns`, listening on the namespace's address, joining through
    /// `join` (addresses). Its data dir (key) persists across restarts.
    pub fn spawn(&mut self, name: &str, ns: &Ns, join: &[String]) {
        let mut extra = vec![
            "--max-children".to_string(),
            self.max_children.to_string(),
            "--heartbeat-ms".to_string(),
            self.heartbeat_ms.to_string(),
        ];
        extra.extend(self.extra.iter().cloned());
        let (child, log) = crate::spawn_ns_node(ns, self.dir.path(), name, join, &extra, &self.env);
        self.nodes.insert(
            name.to_string(),
            NsNode {
                ns: ns.clone(),
                child,
                log,
            },
        );
    }

    /// [`NsNodes::spawn`], then wait (bounded) until its status answers.
    pub fn spawn_answering(&mut self, name: &str, ns: &Ns, join: &[String]) {
        self.spawn(name, ns, join);
        wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
            self.status(name)
        })
        .unwrap_or_else(|| panic!("{name} never answered"));
    }

    /// SIGKILL: no chance to clean up (the router keeps its mapping until the lease ends).
    pub fn kill9(&mut self, name: &str) {
        if let Some(mut n) = self.nodes.remove(name) {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }

    /// SIGTERM and wait (bounded) for the orderly exit; returns whether it exited in time.
    pub fn stop(&mut self, name: &str, within: Duration) -> bool {
        let Some(mut n) = self.nodes.remove(name) else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &n.child.id().to_string()])
            .status();
        let exited = wait_for(within, Duration::from_millis(50), || {
            n.child.try_wait().ok().flatten()
        });
        if exited.is_none() {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
        exited.is_some()
    }

    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// `borg status --json` of node `name`, run in its namespace.
    pub fn status(&self, name: &str) -> Option<Value> {
        self.cell_status(name, 13310)
    }

    /// `borg status --json` of the cell whose monitor is on `mon_port` in node `name`.
    pub fn cell_status(&self, name: &str, mon_port: u16) -> Option<Value> {
        let n = self.nodes.get(name)?;
        let mut cmd = n.ns.command(borg_bin());
        let node = format!("{}:{mon_port}", n.ns.ip);
        cmd.args(["status", "--json", "--node", &node]);
        let out = run_with_deadline(&mut cmd, None, CLI_DEADLINE).ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The monitor's `/metrics` text of node `name`, fetched in its namespace (curl).
    pub fn metrics(&self, name: &str) -> String {
        let Some(n) = self.nodes.get(name) else {
            return String::new();
        };
        let mut cmd = n.ns.command("curl");
        cmd.args([
            "-s",
            "-m",
            "5",
            &format!("http://{}:13310/metrics", n.ns.ip),
        ]);
        run_with_deadline(&mut cmd, None, CLI_DEADLINE)
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    pub fn role(&self, name: &str) -> Option<String> {
        self.status(name)?["nat_role"].as_str().map(String::from)
    }

    /// Wait until every node reports the role `want(name)` names; returns the roles seen last.
    pub fn wait_roles(
        &self,
        within: Duration,
        want: impl Fn(&str) -> &'static str,
    ) -> Result<Duration, BTreeMap<String, String>> {
        let start = Instant::now();
        let mut last = BTreeMap::new();
        let ok = wait_for(within, Duration::from_millis(200), || {
            last = self
                .nodes
                .keys()
                .map(|n| (n.clone(), self.role(n).unwrap_or_else(|| "?".into())))
                .collect();
            last.iter().all(|(n, r)| r == want(n)).then_some(())
        });
        ok.map(|_| start.elapsed()).ok_or(last)
    }

    pub fn check_tree(&self) -> Result<(usize, u64), String> {
        check_tree_statuses(
            self.max_children,
            self.nodes.keys().map(|n| (n.clone(), self.status(n))),
        )
    }

    /// [`Self::check_tree`] for the tree of the cell whose monitor is on `mon_port` (k = `k`).
    pub fn check_cell_tree(&self, mon_port: u16, k: u64) -> Result<(usize, u64), String> {
        check_tree_statuses(
            k,
            self.nodes
                .keys()
                .map(|n| (n.clone(), self.cell_status(n, mon_port))),
        )
    }

    /// Wait until [`Self::check_tree`] passes; how long it took, or the last problem.
    pub fn wait_tree(&self, within: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let mut last = String::new();
        let ok = wait_for(within, Duration::from_millis(200), || {
            match self.check_tree() {
                Ok(_) => Some(()),
                Err(e) => {
                    last = e;
                    None
                }
            }
        });
        ok.map(|_| start.elapsed()).ok_or(last)
    }

    /// `borg broadcast` through node `name`'s receptor; panics if the command fails.
    pub fn broadcast(&self, name: &str, text: &str) {
        let n = &self.nodes[name];
        let mut cmd = n.ns.command(borg_bin());
        cmd.args(["broadcast", "--node", &n.ns.ip.to_string(), text]);
        let out = run_with_deadline(&mut cmd, None, CLI_DEADLINE).expect("borg broadcast");
        assert!(
            out.status.success(),
            "broadcast via {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Wait until every node logged the delivery of a broadcast whose text is `text`.
    pub fn wait_delivered(&self, text: &str, within: Duration) -> Result<Duration, Vec<String>> {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        crate::wait_logged_delivery(&names, |n| self.log_of(n), text, within)
    }
}

impl Drop for NsNodes {
    fn drop(&mut self) {
        let children = self.nodes.values_mut().map(|n| &mut n.child);
        crate::stop_nodes(children, self.dir.path(), &self.tag);
    }
}
