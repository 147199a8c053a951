//! `borg bench store`: storage figures on loopback. Starts N real `borg node` processes
//! (127.0.60.x, `BORG_SHARD_QUICK=1`), then times what a user runs: `borg put` of a random
//! file at one node, `borg get` of it at another, and many 4 KiB puts and gets; beside them,
//! in the same run, the ceilings of this machine: SHA-256 throughput and the bulk throughput of
//! one TLS link (the smaller one is the limit a get is compared with). Resident memory of the
//! nodes is read from /proc after the big file is stored and after the small ones.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use borg_net::client;
use clap::Args;
use rand::RngCore;
use serde_json::Value;
use sha2::{Digest, Sha256};

#[derive(Args, Debug)]
pub struct StoreBenchArgs {
    /// Node processes.
    #[arg(long, default_value_t = 6)]
    nodes: usize,
    /// MiB of the big file.
    #[arg(long, default_value_t = 64)]
    pub mebibytes: usize,
    /// 4 KiB files put and got for the small-file figures.
    #[arg(long, default_value_t = 40)]
    small: usize,
    /// Shards of 4 KiB (the same on every node) written into each node's store before it
    /// starts, for the memory figure of a node holding many (e.g. --nodes 3 --held 10000:
    /// with 3 members every node is a placed holder of each, so nothing moves).
    #[arg(long, default_value_t = 0)]
    held: usize,
    /// Instead of loopback: 3 holders and a client in network namespaces behind a slow, lossy
    /// switch, beside iperf3 on the same links (root; needs iproute2, python3, iperf3).
    #[arg(long)]
    netns: bool,
    /// With --netns: one-way delay through the switch (ms).
    #[arg(long, default_value_t = 40.0)]
    pub delay_ms: f64,
    /// With --netns: percent of frames lost (each way).
    #[arg(long, default_value_t = 1.0)]
    pub loss: f64,
    /// With --netns: every namespace's access link, each way (Mbit/s).
    #[arg(long, default_value_t = 100.0)]
    pub rate_mbit: f64,
    /// With --netns: seconds of each iperf3 run.
    #[arg(long, default_value_t = 15)]
    pub iperf_secs: u64,
}

fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 60, i as u8 + 2)
}

fn mon(i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(ip(i).into(), port)
}

/// Run the `borg` CLI (this binary); its stdout as JSON.
fn borg(args: &[&str]) -> Result<Value> {
    let exe = std::env::current_exe().context("locating the borg binary")?;
    let out = Command::new(exe).args(args).output()?;
    if !out.status.success() {
        bail!(
            "borg {} failed: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Run the `borg` CLI like [`borg`], sampling the nodes' RSS every 50 ms meanwhile: its
/// JSON and the largest RSS seen (MiB).
fn borg_sampling_rss(procs: &crate::bench::NodeProcs, args: &[&str]) -> Result<(Value, f64)> {
    let exe = std::env::current_exe().context("locating the borg binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut peak = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("borg {} did not end within 30 min", args[0]);
        }
        for c in procs.children.values() {
            peak = peak.max(rss_mib(c.id()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "borg {} failed: {}",
            args[0],
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((serde_json::from_slice(&out.stdout)?, peak))
}

/// Write the same `count` random 4 KiB shards into the stores of nodes 0..n (before they
/// start), one thread per store.
fn seed_stores(procs: &crate::bench::NodeProcs, n: usize, count: usize) -> Result<()> {
    use borg_store::{RedbStore, ShardStore};
    let mut seed = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut seed);
    std::thread::scope(|s| {
        let jobs: Vec<_> = (0..n)
            .map(|i| {
                let dir = procs.data_dir(i);
                s.spawn(move || -> Result<()> {
                    std::fs::create_dir_all(&dir)?;
                    let store = RedbStore::open(dir.join("shards.redb"), 1 << 30)?;
                    for k in 0..count {
                        let mut b = vec![0u8; 4096];
                        b[..32].copy_from_slice(&seed);
                        b[32..40].copy_from_slice(&(k as u64).to_le_bytes());
                        store.put(&b)?;
                    }
                    Ok(())
                })
            })
            .collect();
        jobs.into_iter().try_for_each(|j| {
            j.join()
                .map_err(|_| anyhow::anyhow!("a seeding thread panicked"))?
        })
    })
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn sha256_mib_s() -> f64 {
    let buf = vec![0x5au8; 16 << 20];
    let t = Instant::now();
    let mut h = Sha256::new();
    for _ in 0..8 {
        h.update(&buf);
    }
    let _ = h.finalize();
    128.0 / t.elapsed().as_secs_f64()
}

pub fn run(args: StoreBenchArgs) -> Result<()> {
    if args.netns {
        return crate::bench_store_netns::run(&args);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let n = args.nodes.max(3);
    let mut procs = crate::bench::NodeProcs::new("store")?;
    procs.env.push(("BORG_SHARD_QUICK".into(), "1".into()));
    if args.held > 0 {
        let t = Instant::now();
        seed_stores(&procs, n, args.held)?;
        println!(
            "seeded {} shards of 4 KiB into each of {n} stores in {:.1} s",
            args.held,
            t.elapsed().as_secs_f64()
        );
    }
    let none: [String; 1] = ["--no-nat".into()];
    procs.spawn(0, ip(0), None, &none)?;
    let up = Instant::now();
    while rt.block_on(client::status(mon(0, 13310))).is_err() {
        if up.elapsed() > Duration::from_secs(20) {
            bail!("the first node did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 1..n {
        procs.spawn(i, ip(i), Some(ip(0)), &none)?;
    }
    let placeable = |i: usize| -> u64 {
        rt.block_on(client::status(mon(i, 13340)))
            .ok()
            .and_then(|s| s["members"]["placeable"].as_u64())
            .unwrap_or(0)
    };
    while (0..n).any(|i| placeable(i) < n as u64) {
        if up.elapsed() > Duration::from_secs(90) {
            bail!("the shard tree did not form");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "== store on loopback: {n} node processes, all placeable after {:.1} s",
        up.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir()?;
    let phrase = dir.path().join("phrase");
    let id = borg(&["id", "new", "--json"])?;
    std::fs::write(&phrase, id["phrase"].as_str().unwrap_or_default())?;
    let ph = phrase.to_str().context("temp path")?;
    let big = dir.path().join("big.bin");
    let mut data = vec![0u8; args.mebibytes << 20];
    rand::thread_rng().fill_bytes(&mut data);
    std::fs::write(&big, &data)?;
    drop(data);
    let mib = args.mebibytes as f64;

    let node = |i: usize| ip(i).to_string();
    let t = Instant::now();
    let put = borg(&[
        "put",
        "--node",
        &node(1),
        big.to_str().context("path")?,
        "--phrase-file",
        ph,
        "--json",
    ])?;
    let put_s = t.elapsed().as_secs_f64();
    let file_id = put["id"].as_str().unwrap_or_default().to_string();
    let out = dir.path().join("big.out");
    let rss_held: Vec<f64> = procs.children.values().map(|c| rss_mib(c.id())).collect();
    let t = Instant::now();
    let (got, rss_streaming) = borg_sampling_rss(
        &procs,
        &[
            "get",
            "--node",
            &node(n - 1),
            &file_id,
            "-o",
            out.to_str().context("path")?,
            "--phrase-file",
            ph,
            "--json",
        ],
    )?;
    let get_s = t.elapsed().as_secs_f64();
    let rss_big: Vec<f64> = procs.children.values().map(|c| rss_mib(c.id())).collect();

    let small_dir = dir.path().join("small");
    std::fs::create_dir_all(&small_dir)?;
    let mut ids = Vec::new();
    let t = Instant::now();
    for k in 0..args.small {
        let f = small_dir.join(format!("s{k}"));
        let mut b = vec![0u8; 4096];
        rand::thread_rng().fill_bytes(&mut b);
        std::fs::write(&f, b)?;
        let v = borg(&[
            "put",
            "--node",
            &node(k % n),
            f.to_str().context("path")?,
            "--phrase-file",
            ph,
            "--json",
        ])?;
        ids.push(v["id"].as_str().unwrap_or_default().to_string());
    }
    let small_put_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (k, id) in ids.iter().enumerate() {
        let o = small_dir.join(format!("o{k}"));
        borg(&[
            "get",
            "--node",
            &node((k + 1) % n),
            id,
            "-o",
            o.to_str().context("path")?,
            "--phrase-file",
            ph,
            "--json",
        ])?;
    }
    let small_get_s = t.elapsed().as_secs_f64();
    let rss_small: Vec<f64> = procs.children.values().map(|c| rss_mib(c.id())).collect();

    let sha = sha256_mib_s();
    let tls = rt.block_on(crate::bench_relay::tls_link_mib_s(256))?;
    let limit = sha.min(tls);
    let get_mib_s = mib / get_s;
    println!(
        "put  {mib:.0} MiB ({} shards): {put_s:.1} s = {:.1} MiB/s",
        put["shards"],
        mib / put_s
    );
    println!(
        "get  {mib:.0} MiB at another node: {get_s:.1} s = {get_mib_s:.1} MiB/s (lowest replica count seen {})",
        got["min_replicas"]
    );
    println!(
        "this machine: SHA-256 {sha:.0} MiB/s, one TLS link {tls:.0} MiB/s; get = {:.1}% of the smaller (target >= 50%)",
        100.0 * get_mib_s / limit
    );
    println!(
        "4 KiB files: {:.1} puts/s, {:.1} gets/s ({} each, one `borg` process per operation)",
        args.small as f64 / small_put_s,
        args.small as f64 / small_get_s,
        args.small
    );
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "node RSS (largest of {n}): {:.1} MiB holding the big file{}, {:.1} MiB at most while \
         streaming it (sampled every 50 ms), {:.1} MiB after, {:.1} MiB after the small files",
        max(&rss_held),
        if args.held > 0 {
            format!(" and {} seeded shards", args.held)
        } else {
            String::new()
        },
        rss_streaming,
        max(&rss_big),
        max(&rss_small)
    );
    Ok(())
}
