//! `borg bench store --netns` (root): a get over a slow, lossy link, beside iperf3 on the
//! same link in the same run.
//!
//! `netem_hub.py` makes 4 namespaces: n0..n2 run one `borg node` each (so every shard has
//! its 3 holders there), n3 is the client. Every namespace has an access link of
//! `--rate-mbit` each way to a switch that delays every frame `--delay-ms` one way and loses
//! `--loss` percent of them (netem's model; this kernel has no sch_netem). The file is put at
//! n0 (its replication crosses the links); the client in n3 then gets it from the three
//! holders, and iperf3 measures the same path (`-R`: the holder's side sends), one stream and
//! four, with cubic and with BBR.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::RngCore;
use serde_json::Value;

use crate::bench_netns::{have, in_ns, run_bounded, start_hub, Procs};
use crate::bench_store::StoreBenchArgs;

const SHARD_MON: u16 = 13340;

pub fn run(args: &StoreBenchArgs) -> Result<()> {
    for p in ["ip", "python3", "iperf3"] {
        if !have(p) {
            bail!("borg bench store --netns needs {p} (ci/setup.sh installs iproute2, python3, iperf3)");
        }
    }
    let exe = std::env::current_exe().context("locating the borg binary")?;
    let dir = std::env::temp_dir().join(format!("borg-bench-storenet-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = bench(args, &exe, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `borg status --json` of the monitor at `ip:port`, run inside `ns`.
fn status(exe: &Path, ns: &str, ip: &str, port: u16) -> Option<Value> {
    let mut cmd = in_ns(ns, exe);
    cmd.args(["status", "--json", "--node", &format!("{ip}:{port}")]);
    serde_json::from_str(&run_bounded(&mut cmd, Duration::from_secs(5)).ok()?).ok()
}

/// Wait for `ok`, polling every 500 ms, at most `within`.
fn wait(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Result<Duration> {
    let t = Instant::now();
    while !ok() {
        if t.elapsed() > within {
            bail!("{what}: not after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(t.elapsed())
}

/// One iperf3 run from `client_ns` against the server at `ip` (the server sends: `-R`);
/// received Mbit/s.
fn iperf(client_ns: &str, ip: &str, streams: usize, cc: &str, secs: u64) -> Result<f64> {
    let mut cmd = in_ns(client_ns, "iperf3");
    cmd.args(["-c", ip, "-R", "-J", "-C", cc]).args([
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
    ]);
    let out = run_bounded(&mut cmd, Duration::from_secs(secs + 30))?;
    let v: Value = serde_json::from_str(&out).context("iperf3's JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e6)
        .context("no sum_received in iperf3's output")
}

fn bench(args: &StoreBenchArgs, exe: &Path, dir: &Path) -> Result<()> {
    let leg = args.delay_ms / 2.0;
    let hub_opts: Vec<String> = [
        "--leg-ms".to_string(),
        format!("{leg}:{leg}"),
        "--loss".into(),
        args.loss.to_string(),
        "--rate-mbit".into(),
        args.rate_mbit.to_string(),
        "--seed".into(),
        "11".into(),
    ]
    .into();
    let hub = start_hub(dir, 4, &hub_opts)?;
    let (names, ips) = (hub.names.clone(), hub.ips.clone());
    let client = &names[3];
    println!(
        "== store over namespaces: 3 holders + 1 client; every access link {} Mbit/s each way, \
         {} ms one way through the switch ({} ms RTT), {}% of frames lost",
        args.rate_mbit,
        args.delay_ms,
        2.0 * args.delay_ms,
        args.loss
    );

    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        let mut c = in_ns(&names[i], exe);
        c.args(["node", "--listen", &ips[i], "--no-nat", "--data"])
            .arg(dir.join(format!("node{i}")));
        if i > 0 {
            c.args(["--join", &ips[0]]);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("node{i}.log")))?)
            .env("BORG_LOG", "warn")
            .env("BORG_SHARD_QUICK", "1");
        procs.0.push(c.spawn().context("starting a node")?);
    }
    let placeable = |i: usize| {
        status(exe, &names[i], &ips[i], SHARD_MON)
            .and_then(|s| s["members"]["placeable"].as_u64())
            .unwrap_or(0)
    };
    let took = wait("the shard tree", Duration::from_secs(120), || {
        (0..3).all(|i| placeable(i) == 3)
    })?;
    println!("3 nodes placeable after {:.1} s", took.as_secs_f64());

    let phrase = dir.join("phrase");
    let mut idc = std::process::Command::new(exe);
    idc.args(["id", "new", "--json"]);
    let id: Value = serde_json::from_str(&run_bounded(&mut idc, Duration::from_secs(10))?)?;
    std::fs::write(&phrase, id["phrase"].as_str().unwrap_or_default())?;
    let big = dir.join("big.bin");
    let mut data = vec![0u8; args.mebibytes << 20];
    rand::thread_rng().fill_bytes(&mut data);
    std::fs::write(&big, &data)?;
    drop(data);
    let mib = args.mebibytes as f64;

    // Put at n0 (its receptor is local there); the copies cross the links.
    let t = Instant::now();
    let mut put = in_ns(&names[0], exe);
    put.args(["put", "--node", &ips[0]])
        .arg(&big)
        .arg("--phrase-file")
        .arg(&phrase)
        .arg("--json");
    let put: Value = serde_json::from_str(&run_bounded(&mut put, Duration::from_secs(1800))?)?;
    let put_s = t.elapsed().as_secs_f64();
    let n_shards = put["shards"].as_u64().unwrap_or(0);
    let file_id = put["id"].as_str().unwrap_or_default().to_string();
    let held = |i: usize| {
        status(exe, &names[i], &ips[i], SHARD_MON)
            .and_then(|s| s["store"]["shards"].as_u64())
            .unwrap_or(0)
    };
    let copies = wait("3 copies", Duration::from_secs(1800), || {
        (0..3).all(|i| held(i) >= n_shards)
    })?;
    println!(
        "put {mib:.0} MiB ({n_shards} shards) at n0: {put_s:.1} s; all on the 3 holders {:.1} s later",
        copies.as_secs_f64()
    );

    // iperf3 on the same path, server (sender) in n0, client in n3.
    let mut server = in_ns(&names[0], "iperf3");
    server
        .args(["-s", "-B", &ips[0]])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    procs.0.push(server.spawn().context("starting iperf3 -s")?);
    std::thread::sleep(Duration::from_millis(500));
    let mut best = 0.0f64;
    for cc in ["cubic", "bbr"] {
        for streams in [1, 4] {
            let mbit = iperf(client, &ips[0], streams, cc, args.iperf_secs)?;
            best = best.max(mbit);
            println!("iperf3 -R -C {cc} -P {streams}: {mbit:.1} Mbit/s");
        }
    }

    // The get, from n3, through n0's receptor for the manifest and the locate.
    for run in 1..=2 {
        let out = dir.join(format!("out{run}.bin"));
        let t = Instant::now();
        let mut get = in_ns(client, exe);
        get.args(["get", "--node", &ips[0], &file_id, "-o"])
            .arg(&out)
            .arg("--phrase-file")
            .arg(&phrase)
            .arg("--json");
        let got: Value = serde_json::from_str(&run_bounded(&mut get, Duration::from_secs(1800))?)?;
        let s = t.elapsed().as_secs_f64();
        let mbit = mib * 8.0 * 1.048_576 / s;
        println!(
            "borg get {mib:.0} MiB in n3 (run {run}): {s:.1} s = {mbit:.1} Mbit/s = {:.0}% of the \
             {} Mbit/s link, {:.0}% of the best iperf3 ({best:.1}); {} streamed from {} holders, \
             {} via the node",
            100.0 * mbit / args.rate_mbit,
            args.rate_mbit,
            100.0 * mbit / best,
            got["streamed"],
            got["holders"],
            got["via_node"]
        );
        if let Some(ss) = got["stream_seconds"].as_f64().filter(|s| *s > 0.0) {
            let smbit = mib * 8.0 * 1.048_576 / ss;
            println!(
                "  of which locating, opening and streaming: {ss:.1} s = {smbit:.1} Mbit/s \
                 ({:.0}% of the link; the rest: start, manifest, final check and rename)",
                100.0 * smbit / args.rate_mbit
            );
        }
        let _ = std::fs::remove_file(&out);
    }
    drop(procs);
    drop(hub);
    Ok(())
}
