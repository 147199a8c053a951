//! `borg bench tree`: the PeerTree figures recorded in docs/BENCHMARKS.md.
//!
//! Two parts: the deterministic simulation (virtual time; N simulated nodes) and real
//! `borg node` processes on loopback (each on its own 127.0.2.x, default ports). Figures are
//! printed, not asserted: targets are compared in the output and in docs/BENCHMARKS.md.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use borg_net::client;
use borg_proto::tree::geometry::tree_depth;
use borg_proto::tree::sim::{Sim, SimConfig};
use borg_proto::tree::TreeConfig;
use clap::Args;
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct TreeBenchArgs {
    /// Simulated nodes (0 to skip the simulation part).
    #[arg(long, default_value_t = 10_000)]
    sim: usize,
    /// Real `borg node` processes on loopback (0 to skip; needs 127.0.2.0/24 free).
    #[arg(long, default_value_t = 100)]
    procs: usize,
    /// Children per node.
    #[arg(long, default_value_t = 10)]
    max_children: u64,
    /// Heartbeat period of the real nodes, ms.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Broadcasts to time.
    #[arg(long, default_value_t = 20)]
    broadcasts: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(args: TreeBenchArgs) -> Result<()> {
    if args.sim > 0 {
        bench_sim(&args)?;
    }
    if args.procs > 0 {
        bench_procs(&args)?;
    }
    Ok(())
}

fn bench_sim(args: &TreeBenchArgs) -> Result<()> {
    let n = args.sim.max(2);
    let k = args.max_children;
    let hb = 1000;
    println!("== simulation: {n} nodes, k={k}, heartbeat {hb} ms, latency 1-20 ms per hop (virtual time)");
    let mut sim = Sim::new(SimConfig::default(), TreeConfig::new(k, hb));
    sim.add_node(&[]);
    for i in 1..n {
        sim.add_node(&[0, (i * 7919) % i]);
    }
    let wall = Instant::now();
    sim.start(0);
    for i in 1..n {
        sim.start(i);
    }
    let took = sim
        .run_until_converged(sim.now + 300_000)
        .map_err(|e| anyhow::anyhow!("storm did not converge: {e}"))?;
    let depth = tree_depth(n as u64, k);
    let per_join = sim.stats.topology_messages as f64 / (n - 1) as f64;
    println!(
        "join storm: {} simultaneous joins converged in {took} ms (virtual), depth {depth}; {per_join:.2} messages per join (target <= 4*depth+8 = {}); {:.1} s wall",
        n - 1,
        4 * depth + 8,
        wall.elapsed().as_secs_f64()
    );
    // Let the heartbeats settle, then time broadcasts from different nodes.
    let t = sim.now + (depth as u64 + 2) * hb;
    sim.run_until(t).map_err(anyhow::Error::msg)?;
    let mut times = Vec::new();
    let mut transmissions = Vec::new();
    for b in 0..args.broadcasts {
        let origin = (b * 7877 + 13) % n;
        let before = sim.stats.broadcast_transmissions;
        let start = sim.now;
        let id = sim.broadcast_from(origin, json!(b));
        let mut done = None;
        for _ in 0..5000 {
            let t = sim.now + 1;
            sim.run_until(t).map_err(anyhow::Error::msg)?;
            if sim.delivery_count(&id).0 == sim.alive_count() {
                done = Some(sim.now - start);
                break;
            }
        }
        let Some(d) = done else {
            bail!("broadcast {b} did not reach every node")
        };
        times.push(d as f64);
        transmissions.push(sim.stats.broadcast_transmissions - before);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "broadcast: completion p50 {:.0} ms, p99 {:.0} ms (virtual); transmissions per broadcast {:?} (target N-1 = {})",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        transmissions.iter().min().zip(transmissions.iter().max()),
        n - 1
    );
    for (what, pos) in [("leaf", n as u64 - 5), ("branch", 2u64), ("root", 1u64)] {
        let Some(victim) = sim.holder_of(pos) else {
            continue;
        };
        sim.crash(victim);
        let took = sim
            .run_until_converged(sim.now + 60_000)
            .map_err(|e| anyhow::anyhow!("{what} repair did not converge: {e}"))?;
        println!("repair after a {what} crash (position {pos}): {took} ms virtual (target <= 2 heartbeats = {} ms)", 2 * hb);
        let t = sim.now + (depth as u64 + 2) * hb;
        sim.run_until(t).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 2, (i / 250) as u8, (i % 250 + 2) as u8)
}

fn mon(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip(i)), 13310)
}

async fn statuses(ids: &[usize]) -> BTreeMap<usize, Value> {
    let mut set = tokio::task::JoinSet::new();
    for &i in ids {
        set.spawn(async move { (i, client::status(mon(i)).await.ok()) });
    }
    let mut out = BTreeMap::new();
    while let Some(Ok((i, st))) = set.join_next().await {
        if let Some(st) = st {
            out.insert(i, st);
        }
    }
    out
}

/// Whether the statuses form one complete tree of `n`: positions 1..n, one root of size n.
fn complete(st: &BTreeMap<usize, Value>, n: usize) -> bool {
    if st.len() != n {
        return false;
    }
    let mut pos: Vec<u64> = st.values().filter_map(|s| s["position"].as_u64()).collect();
    pos.sort_unstable();
    let root_ok = st
        .values()
        .any(|s| s["position"] == 1 && s["size"] == n as u64);
    pos == (1..=n as u64).collect::<Vec<_>>()
        && root_ok
        && st
            .values()
            .all(|s| s["vacant"].as_array().is_some_and(|v| v.is_empty()))
}

fn proc_stat(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((rss_kb, ticks))
}

fn bench_procs(args: &TreeBenchArgs) -> Result<()> {
    let n = args.procs.max(2);
    let k = args.max_children;
    let hb = args.heartbeat_ms;
    let mut procs = crate::bench::NodeProcs::new("tree")?;
    let node_args = [
        "--max-children".to_string(),
        k.to_string(),
        "--heartbeat-ms".to_string(),
        hb.to_string(),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!("== {n} real `borg node` processes on 127.0.2.x (TLS 1.3, default ports), k={k}, heartbeat {hb} ms");
    procs.spawn(0, ip(0), None, &node_args)?;
    let up = Instant::now();
    while rt.block_on(client::status(mon(0))).is_err() {
        if up.elapsed() > Duration::from_secs(20) {
            bail!("first node did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Join storm: everyone else at once, through the root.
    let storm = Instant::now();
    for i in 1..n {
        procs.spawn(i, ip(i), Some(ip(0)), &node_args)?;
    }
    let ids: Vec<usize> = (0..n).collect();
    loop {
        let st = rt.block_on(statuses(&ids));
        if complete(&st, n) {
            break;
        }
        if storm.elapsed() > Duration::from_secs(120) {
            bail!("join storm of {n} processes did not converge in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let storm_s = storm.elapsed().as_secs_f64();
    let metrics = |ids: &[usize], name: &str| -> u64 {
        ids.iter()
            .filter_map(|&i| rt.block_on(client::monitor_get(mon(i), "/metrics")).ok())
            .filter_map(|m| {
                m.lines().find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
            })
            .sum()
    };
    let topo = metrics(&ids, "borg_tree_topology_sent_total ");
    let depth = tree_depth(n as u64, k);
    println!(
        "join storm: {} processes started at once, complete tree after {storm_s:.2} s (includes process start-up); {:.2} join/repair messages per join (target <= 4*depth+8 = {})",
        n - 1,
        topo as f64 / (n - 1) as f64,
        4 * depth + 8
    );
    // Idle RSS and CPU.
    let pids: Vec<u32> = procs.children.values().map(|c| c.id()).collect();
    let before: Vec<(u64, u64)> = pids.iter().filter_map(|p| proc_stat(*p)).collect();
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let after: Vec<(u64, u64)> = pids.iter().filter_map(|p| proc_stat(*p)).collect();
    let mut rss: Vec<f64> = after.iter().map(|(kb, _)| *kb as f64 / 1024.0).collect();
    rss.sort_by(|a, b| a.total_cmp(b));
    let hz = 100.0; // USER_HZ on Linux
    let cpu: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a.1.saturating_sub(b.1)) as f64 / hz / window.as_secs_f64() * 100.0)
        .collect();
    let cpu_mean = cpu.iter().sum::<f64>() / cpu.len().max(1) as f64;
    println!(
        "idle per node: RSS median {:.1} MiB, max {:.1} MiB (target < 20 MiB); CPU mean {cpu_mean:.2}% of one core over {} s",
        percentile(&rss, 0.5),
        rss.last().copied().unwrap_or(f64::NAN),
        window.as_secs()
    );
    // Broadcasts: completion time from the receptor request to the last node's delivery.
    let mut completion = Vec::new();
    let mut per_node = Vec::new();
    let mut tx = Vec::new();
    for b in 0..args.broadcasts {
        let origin = (b * 37 + 5) % n;
        let sent_before = metrics(&ids, "borg_tree_broadcast_sent_total ");
        let key = borg_proto::identity::SecretKey::generate();
        let t0 = borg_net::node::now_ms();
        let env = borg_proto::envelope::seal(
            &key,
            "broadcast",
            None,
            t0,
            json!({"text": format!("bench {b}")}),
        );
        let recp = SocketAddr::new(IpAddr::V4(ip(origin)), 13305);
        let (status, body) = rt.block_on(client::receptor_post(recp, env.to_bytes()))?;
        if status != 200 {
            bail!("broadcast refused: {}", String::from_utf8_lossy(&body));
        }
        let reply: Value = serde_json::from_slice(&body)?;
        let id = reply["body"]["id"].as_str().unwrap_or_default().to_string();
        let wait = Instant::now();
        let times = loop {
            let st = rt.block_on(statuses(&ids));
            let at: Vec<u64> = st
                .values()
                .filter(|s| s["last_broadcast"]["id"] == id.as_str())
                .filter_map(|s| s["last_broadcast"]["at_ms"].as_u64())
                .collect();
            if at.len() == n {
                break at;
            }
            if wait.elapsed() > Duration::from_secs(30) {
                bail!("broadcast {b} reached {} of {n} nodes", at.len());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let last = times.iter().max().copied().unwrap_or(t0);
        completion.push(last.saturating_sub(t0) as f64);
        per_node.extend(times.iter().map(|t| t.saturating_sub(t0) as f64));
        tx.push(metrics(&ids, "borg_tree_broadcast_sent_total ") - sent_before);
    }
    completion.sort_by(|a, b| a.total_cmp(b));
    per_node.sort_by(|a, b| a.total_cmp(b));
    println!(
        "broadcast ({} runs): completion p50 {:.0} ms, p99 {:.0} ms; per-node delivery p50 {:.0} ms, p99 {:.0} ms; transmissions per broadcast min {} max {} (target N-1 = {})",
        args.broadcasts,
        percentile(&completion, 0.5),
        percentile(&completion, 0.99),
        percentile(&per_node, 0.5),
        percentile(&per_node, 0.99),
        tx.iter().min().copied().unwrap_or(0),
        tx.iter().max().copied().unwrap_or(0),
        n - 1
    );
    // Repair after kill -9 of a branch node, then of the root.
    let mut alive: Vec<usize> = ids.clone();
    for (what, pos) in [("branch", 2u64), ("root", 1u64)] {
        let st = rt.block_on(statuses(&alive));
        let Some((&victim, _)) = st.iter().find(|(_, s)| s["position"] == pos) else {
            continue;
        };
        if let Some(mut c) = procs.children.remove(&victim) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let killed = Instant::now();
        alive.retain(|&i| i != victim);
        loop {
            let st = rt.block_on(statuses(&alive));
            if complete(&st, alive.len()) {
                break;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("{what} repair did not complete in 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        println!(
            "repair after kill -9 of a {what} node: {} ms to a complete tree (target <= 2 heartbeats = {} ms; polling adds up to ~100 ms)",
            killed.elapsed().as_millis(),
            2 * hb
        );
    }
    Ok(())
}
