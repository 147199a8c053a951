//! `borg bench time`: cronoTree against chrony over the same delayed tree of namespaces.
//!
//! `netem_hub.py` (tests/src, embedded here) creates namespaces n0..n13 (for 3 hops: the
//! smallest tree with k = 3 that deep has 1 + 3 + 9 + 1 nodes) joined by a user-space switch
//! that delays every frame 15-25 ms one way (two uniform legs of 7.5-12.5 ms; the kernel may
//! lack sch_netem). In each namespace run, side by side and started together: one `borg node`
//! (peerTreeNet + cronoTree, joining n0; cronoTree fills positions 1..14 breadth-first) and one
//! chronyd (`-x`: it never touches the shared clock; n0 is `local stratum 1`, chronyd i uses
//! chronyd (i-1)/3 as its only server: the same k = 3 tree).
//!
//! All namespaces share CLOCK_REALTIME, so each side's true error is observable:
//! - ours: `time.system_offset_ms` of a node minus the root's, from the monitors;
//! - chrony's: with `-x` chronyd keeps its correction in software and serves corrected time, so
//!   an SNTP query to the chronyd of the same namespace over loopback (delay ~0.1 ms) gives
//!   its served time minus CLOCK_REALTIME; minus the root chronyd's. Also printed: chrony's own
//!   estimate of its offset (`chronyc tracking`, "Last offset").
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench_netns::{have, in_ns, run_bounded, start_hub, Procs};
use clap::Args;
use serde_json::Value;

const CRONO_MON: u16 = 13398;

/// Node i's clock error at start (as in tests/tests/time_netns.rs): the root's is right, the
/// others alternately at 1970 and an hour ahead. chronyd's clocks cannot be set wrong (-x on
/// a shared clock), so chrony starts with right clocks.
fn clock_offset_s(i: usize) -> i64 {
    match i {
        0 => 0,
        i if i % 2 == 1 => -1_700_000_000,
        _ => 3600,
    }
}

#[derive(Args, Debug)]
pub struct TimeBenchArgs {
    /// Hops below the root; the tree is the smallest k = 3 tree that deep (3 hops: 14 nodes).
    #[arg(long, default_value_t = 3)]
    hops: usize,
    /// Seconds of sampling after everything synced and settled.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Seconds of settling between "all synced" and sampling (cronoTree's frequency estimate
    /// takes six 16 s blocks; chrony gets the same time).
    #[arg(long, default_value_t = 90)]
    settle: u64,
    /// chrony's poll interval, log2 seconds (minpoll = maxpoll), e.g. 0 = 1 s, -2 = 250 ms.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    chrony_poll: i32,
    /// Only the chrony side (to check the namespaces and chrony without cronoTree).
    #[arg(long)]
    chrony_only: bool,
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[(((v.len() - 1) as f64) * q).round() as usize]
}

pub fn run(args: TimeBenchArgs) -> Result<()> {
    for p in ["ip", "chronyd", "chronyc", "python3"] {
        if !have(p) {
            bail!("borg bench time needs {p} (ci/setup.sh installs iproute2, chrony, python3)");
        }
    }
    if args.hops == 0 || args.hops > 4 {
        bail!("--hops must be 1..=4 (cronoTree has k = 3: 4 hops take 41 nodes)");
    }
    let exe = std::env::current_exe().context("locating the borg binary")?;
    let dir = std::env::temp_dir().join(format!("borg-bench-time-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // chronyd refuses a command socket in a directory others can read.
    std::process::Command::new("chmod")
        .arg("0700")
        .arg(&dir)
        .status()?;
    let result = bench(&args, &exe, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn chrony_conf(dir: &Path, i: usize, upstream: Option<&str>, poll: i32) -> Result<PathBuf> {
    let conf = dir.join(format!("chrony{i}.conf"));
    let mut text = match upstream {
        None => "local stratum 1\n".to_string(),
        Some(up) => format!("server {up} iburst minpoll {poll} maxpoll {poll}\n"),
    };
    text.push_str(&format!(
        "allow all\ncmdport 0\npidfile {d}/chrony{i}.pid\nbindcmdaddress {d}/chrony{i}.sock\n",
        d = dir.display()
    ));
    std::fs::write(&conf, text)?;
    Ok(conf)
}

/// chronyd's served time minus CLOCK_REALTIME in namespace `ns` (SNTP over loopback), and
/// whether it is synchronised (leap indicator not 3).
fn chrony_offset(script: &Path, ns: &str) -> Option<(f64, bool)> {
    let mut cmd = in_ns(ns, "python3");
    cmd.arg(script).args(["sntp", "127.0.0.1"]);
    let out = run_bounded(&mut cmd, Duration::from_secs(5)).ok()?;
    let v: Value = serde_json::from_str(out.trim()).ok()?;
    Some((v["offset_ms"].as_f64()?, v["leap"].as_u64()? != 3))
}

/// chronyd's own estimate ("Last offset", ms) from `chronyc tracking`.
fn chrony_last_offset(sock: &Path) -> Option<f64> {
    let mut cmd = Command::new("chronyc");
    cmd.arg("-h").arg(sock).arg("tracking");
    let out = run_bounded(&mut cmd, Duration::from_secs(5)).ok()?;
    let line = out.lines().find(|l| l.starts_with("Last offset"))?;
    let v = line.split(':').nth(1)?.split_whitespace().next()?;
    v.parse::<f64>().ok().map(|s| s * 1000.0)
}

fn borg_time(exe: &Path, ns: &str, ip: &str) -> Option<Value> {
    let mut cmd = in_ns(ns, exe);
    cmd.args(["status", "--json", "--node", &format!("{ip}:{CRONO_MON}")]);
    let out = run_bounded(&mut cmd, Duration::from_secs(5)).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    Some(v["time"].clone())
}

/// Depth of 0-based node `i` in a breadth-first tree with k = 3 (position i + 1).
fn depth_of(i: usize) -> usize {
    let (mut d, mut first, mut width) = (0, 0, 1);
    while i >= first + width {
        first += width;
        width *= 3;
        d += 1;
    }
    d
}

/// (p50, p99) of `v`.
fn p50_p99(v: &mut [f64]) -> (f64, f64) {
    (quantile(v, 0.5), quantile(v, 0.99))
}

// Node i indexes several parallel vectors (namespaces, addresses, samples).
#[allow(clippy::needless_range_loop)]
fn bench(args: &TimeBenchArgs, exe: &Path, dir: &Path) -> Result<()> {
    // cronoTree's k is 3: the smallest tree with a node `hops` below the root.
    let n = (3usize.pow(args.hops as u32) - 1) / 2 + 1;
    let deepest = n - 1;
    let hub = start_hub(dir, n, &[])?;
    let script = dir.join("netem_hub.py");
    let (names, ips) = (hub.names.clone(), hub.ips.clone());

    // The network: 300 UDP echoes root <-> deepest.
    let mut echo = in_ns(&names[deepest], "python3");
    echo.arg(&script)
        .args(["echo-server", &ips[deepest], "7777", "--secs", "10"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
    let mut echo = Procs(vec![echo.spawn()?]);
    if let Some(out) = echo.0[0].stdout.as_mut() {
        let mut l = String::new();
        BufReader::new(out).read_line(&mut l)?;
    }
    let mut ping = in_ns(&names[0], "python3");
    ping.arg(&script).args(["ping", &ips[deepest], "7777"]);
    let rtt = run_bounded(&mut ping, Duration::from_secs(20))?;
    drop(echo);
    println!(
        "network: {n} namespaces, every link 20 +- 5 ms one way (user-space switch, two legs U(7.5, 12.5) ms)"
    );
    println!(
        "  RTT n0 <-> n{deepest} over 300 UDP echoes: {}",
        rtt.trim()
    );

    // Both systems start at the same moment. chrony gets the same k = 3 tree: chronyd i uses
    // chronyd (i - 1) / 3 as its only server.
    let mut procs = Procs(Vec::new());
    let started = Instant::now();
    for i in 0..n {
        let conf = chrony_conf(
            dir,
            i,
            (i > 0).then(|| ips[(i - 1) / 3].as_str()),
            args.chrony_poll,
        )?;
        let mut c = in_ns(&names[i], "chronyd");
        c.args(["-x", "-d", "-u", "root", "-f"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("chrony{i}.log")))?);
        procs.0.push(c.spawn().context("starting chronyd")?);
    }
    let borg_nodes = if args.chrony_only { 0 } else { n };
    for i in 0..borg_nodes {
        let mut c = in_ns(&names[i], exe);
        c.args(["node", "--listen", &ips[i], "--data"])
            .arg(dir.join(format!("node{i}")))
            .arg("--no-nat")
            .args(["--clock-offset-s", &clock_offset_s(i).to_string()]);
        if i > 0 {
            c.args(["--join", &ips[0]]);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("node{i}.log")))?)
            .env("BORG_LOG", "warn");
        procs.0.push(c.spawn().context("starting borg node")?);
        if i == 0 {
            // The others join through the root: wait for its cronoTree monitor.
            let deadline = Instant::now() + Duration::from_secs(20);
            while borg_time(exe, &names[0], &ips[0]).is_none() {
                if Instant::now() > deadline {
                    bail!("the root node never answered");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    // Until everyone on both sides synced (at most 120 s).
    // One poller per namespace, so the sync times are not paced by a serial poll of all.
    let deadline = started + Duration::from_secs(120);
    let firsts: Vec<(Option<f64>, Option<f64>)> = std::thread::scope(|sc| {
        let pollers: Vec<_> = (0..n)
            .map(|i| {
                let (names, ips, script) = (&names, &ips, &script);
                sc.spawn(move || {
                    let (mut ours, mut chr) = (None, None);
                    while (ours.is_none() && i < borg_nodes || chr.is_none())
                        && Instant::now() < deadline
                    {
                        if ours.is_none()
                            && i < borg_nodes
                            && borg_time(exe, &names[i], &ips[i])
                                .is_some_and(|t| t["synced"] == true)
                        {
                            ours = Some(started.elapsed().as_secs_f64());
                        }
                        if chr.is_none() && chrony_offset(script, &names[i]).is_some_and(|(_, s)| s)
                        {
                            chr = Some(started.elapsed().as_secs_f64());
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    (ours, chr)
                })
            })
            .collect();
        pollers
            .into_iter()
            .map(|h| h.join().unwrap_or((None, None)))
            .collect()
    });
    let ours_sync: BTreeMap<usize, f64> = firsts
        .iter()
        .enumerate()
        .filter_map(|(i, f)| Some((i, f.0?)))
        .collect();
    let chrony_sync: BTreeMap<usize, f64> = firsts
        .iter()
        .enumerate()
        .filter_map(|(i, f)| Some((i, f.1?)))
        .collect();
    if ours_sync.len() < borg_nodes || chrony_sync.len() < n {
        bail!("not all synced after 120 s: ours {ours_sync:?}, chrony {chrony_sync:?}");
    }
    std::thread::sleep(Duration::from_secs(args.settle));

    // Sample, by hop: ours by the stratum a node reports, chrony by its place in its tree.
    let mut ours: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut chrony: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut chrony_est: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut stratum: BTreeMap<usize, usize> = BTreeMap::new();
    // Per node: its signed errors and its last `time` object (diagnostics).
    let mut per_node: BTreeMap<usize, (Vec<f64>, Value)> = BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(args.secs);
    let mut rounds = 0;
    while Instant::now() < end {
        let round = Instant::now();
        // All namespaces at once: a round is one snapshot, not a serial sweep.
        type Sample = (Option<Value>, Option<(f64, bool)>, Option<f64>);
        let got: Vec<Sample> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..n)
                .map(|i| {
                    let (names, ips, script) = (&names, &ips, &script);
                    sc.spawn(move || {
                        let t = (i < borg_nodes)
                            .then(|| borg_time(exe, &names[i], &ips[i]))
                            .flatten();
                        let c = chrony_offset(script, &names[i]);
                        let e = chrony_last_offset(&dir.join(format!("chrony{i}.sock")));
                        (t, c, e)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or((None, None, None)))
                .collect()
        });
        let t: Vec<Option<Value>> = got.iter().map(|g| g.0.clone()).collect();
        let c: Vec<Option<(f64, bool)>> = got.iter().map(|g| g.1).collect();
        let root_ours = t
            .iter()
            .flatten()
            .find(|v| v["stratum"] == 0)
            .and_then(|v| v["system_offset_ms"].as_f64());
        let root_chrony = c[0].map(|x| x.0);
        for i in 0..n {
            if let (Some(r), Some(v)) = (root_ours, t.get(i).and_then(Option::as_ref)) {
                let s = v["stratum"].as_u64().map(|s| s as usize);
                if let (Some(o), Some(s)) = (v["system_offset_ms"].as_f64(), s) {
                    stratum.insert(i, s);
                    if s > 0 {
                        ours.entry(s).or_default().push((o - r).abs());
                        let e = per_node
                            .entry(i)
                            .or_insert_with(|| (Vec::new(), Value::Null));
                        e.0.push(o - r);
                        e.1 = v.clone();
                    }
                }
            }
            if i == 0 {
                continue;
            }
            if let (Some(r), Some((o, _))) = (root_chrony, c[i]) {
                chrony.entry(depth_of(i)).or_default().push((o - r).abs());
            }
            if let Some(e) = got[i].2 {
                chrony_est.entry(depth_of(i)).or_default().push(e.abs());
            }
        }
        rounds += 1;
        if let Some(rest) = Duration::from_millis(500).checked_sub(round.elapsed()) {
            std::thread::sleep(rest);
        }
    }

    println!(
        "sampled {rounds} rounds over {} s after {} s settling; chrony poll 2^{} s; |error vs root| in ms",
        args.secs, args.settle, args.chrony_poll
    );
    println!(
        "{:>3} | {:>17} | {:>17} | {:>17} | {:>9} {:>9} | {:>13}",
        "hop",
        "ours p50 / p99",
        "chrony p50 / p99",
        "chrony est. p50/99",
        "ours sync",
        "chr sync",
        "ours/chrony"
    );
    // Sync time of a hop: when the last node at that hop first reported synced.
    let last_at = |m: &BTreeMap<usize, f64>, hop: usize, depth: &dyn Fn(usize) -> Option<usize>| {
        m.iter()
            .filter(|(i, _)| depth(**i) == Some(hop))
            .map(|(_, t)| *t)
            .fold(f64::NAN, f64::max)
    };
    for hop in 1..=args.hops {
        let (o50, o99) = p50_p99(ours.get_mut(&hop).map_or(&mut [][..], |v| &mut v[..]));
        let (c50, c99) = p50_p99(chrony.get_mut(&hop).map_or(&mut [][..], |v| &mut v[..]));
        let (e50, e99) = p50_p99(chrony_est.get_mut(&hop).map_or(&mut [][..], |v| &mut v[..]));
        let ours_at = last_at(&ours_sync, hop, &|i| stratum.get(&i).copied());
        let chr_at = last_at(&chrony_sync, hop, &|i| Some(depth_of(i)));
        println!(
            "{hop:>3} | {o50:>7.3} / {o99:>7.3} | {c50:>7.3} / {c99:>7.3} | {e50:>7.3} / {e99:>7.3} | {ours_at:>7.2} s {chr_at:>7.2} s | {:>5.2} / {:>5.2}",
            o50 / c50,
            o99 / c99
        );
    }
    println!(
        "(sync: seconds from the common start until the last node of that hop synced; root: ours {:.2} s, chrony {:.2} s)",
        ours_sync.get(&0).copied().unwrap_or(f64::NAN),
        chrony_sync.get(&0).copied().unwrap_or(f64::NAN)
    );
    // Per node: what to look at when a hop's figures are off.
    for (i, (errs, t)) in &mut per_node {
        let mean = errs.iter().sum::<f64>() / errs.len().max(1) as f64;
        let (p50, _) = p50_p99(&mut errs.iter().map(|e| e.abs()).collect::<Vec<_>>());
        println!(
            "  n{i}: stratum {}, error mean {mean:+.3} ms, |error| p50 {p50:.3} ms; freq {} ppm, window restarts {}, samples {}, rejected {}, bound {} ms",
            t["stratum"], t["freq_ppm"], t["window_restarts"], t["samples"], t["rejected"], t["error_bound_ms"]
        );
    }
    drop(procs);
    drop(hub);
    Ok(())
}
