//! `borg bench`: benchmarks that print figures.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Tree figures: simulated nodes and real processes on loopback.
    Tree(crate::bench_tree::TreeBenchArgs),
    /// Relay cost: connection setup, echo round trip and throughput, direct vs relayed.
    Relay(crate::bench_relay::RelayBenchArgs),
    /// Flood cost: CPU, memory and descriptors of a node under envelope and connection floods.
    Flood(crate::bench_flood::FloodBenchArgs),
    /// Network time: cronoTree vs chrony over a delayed chain of namespaces (root).
    Time(crate::bench_time::TimeBenchArgs),
    /// Storage: put/get throughput, 4 KiB files per second and node memory, on loopback,
    /// beside this machine's SHA-256 and TLS throughput.
    Store(crate::bench_store::StoreBenchArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Tree(args) => crate::bench_tree::run(args),
        BenchCommand::Relay(args) => crate::bench_relay::run(args),
        BenchCommand::Flood(args) => crate::bench_flood::run(args),
        BenchCommand::Time(args) => crate::bench_time::run(args),
        BenchCommand::Store(args) => crate::bench_store::run(args),
    }
}

/// Real `borg node` processes a bench starts, by index, with their data directories under
/// one temporary directory; all killed and the directory removed on drop.
pub(crate) struct NodeProcs {
    pub children: BTreeMap<usize, Child>,
    /// Environment given to every node.
    pub env: Vec<(String, String)>,
    exe: PathBuf,
    dir: PathBuf,
}

impl NodeProcs {
    /// A fresh set under the temporary directory `borg-bench-<tag>-<pid>`.
    pub fn new(tag: &str) -> Result<NodeProcs> {
        let exe = std::env::current_exe().context("locating the borg binary")?;
        let dir = std::env::temp_dir().join(format!("borg-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(NodeProcs {
            children: BTreeMap::new(),
            env: Vec::new(),
            exe,
            dir,
        })
    }

    /// Node `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}"))
    }

    /// Start node `i` listening on `ip`, joining `join` if given, with `extra` arguments; its
    /// output is discarded (warnings only).
    pub fn spawn(
        &mut self,
        i: usize,
        ip: Ipv4Addr,
        join: Option<Ipv4Addr>,
        extra: &[String],
    ) -> Result<&Child> {
        // BORG_BENCH_WRAP=heaptrack (or perf, valgrind...): run the nodes under a profiler.
        let mut cmd = match std::env::var_os("BORG_BENCH_WRAP") {
            Some(wrap) => {
                let mut c = Command::new(wrap);
                c.arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        cmd.args(["node", "--listen", &ip.to_string()])
            .args(extra)
            .arg("--data")
            .arg(self.data_dir(i));
        if let Some(j) = join {
            cmd.args(["--join", &j.to_string()]);
        }
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .env("BORG_LOG", "warn");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("starting a node")?;
        Ok(self.children.entry(i).insert_entry(child).into_mut())
    }
}

impl Drop for NodeProcs {
    fn drop(&mut self) {
        for c in self.children.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
