//! Network time (cronoTree) over a delaying network (issue 10).
//!
//! ```text
//!   n0 (root, clock right)        every link 20 +- 5 ms one way (netem_hub.py, user space)
//!   n1..n13 join n0; clocks alternately -1,700,000,000 s (a Pi at 1970) and +3600 s
//! ```
//!
//! Real `borg node` processes (peerTreeNet and cronoTree in one process), each in its own
//! namespace behind the delaying switch of `borg_tests::timenet`. cronoTree has k = 3 from
//! its DNA (`--max-children` sets peerTreeNet's k only), so 14 nodes fill positions 1..14 and
//! position 14 is three hops below the root: 1 + 3 + 9 + 1. The nodes start with wildly wrong
//! clocks (`--clock-offset-s`). All namespaces share the host's CLOCK_REALTIME,
//! so each node's true error is observable: `time.system_offset_ms` (network time minus
//! CLOCK_REALTIME) of a node minus the root's.
//!
//! Asserts: the switch delays as claimed (300 UDP echoes); every node synced within
//! [`SYNC_WITHIN`]; cronoTree reaches stratum 3; after [`SETTLE`], over [`SAMPLE`] of samples,
//! every node's |error vs root| <= [`BOUND_MS`], every stratum's p99 <= [`P99_MS`], and network time (`now_ms`) never goes
//! backwards; a broadcast through peerTreeNet reaches every node. Prints per-stratum error
//! p50/p99 and join-to-synced times. `BORG_TIME_SETTLE_SECS` and `BORG_TIME_SAMPLE_SECS` change
//! the settling and sampling times.
//! Set `BORG_NETNS_TESTS=0` to skip (needs root, iproute2, python3).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use borg_tests::netns;
use borg_tests::timenet::{quantile, TimeNet, TimeNodes, CRONO_MON};
use borg_tests::wait_for;

const NODES: usize = 14;

/// Node i's clock error at start: the root's is right, the others are wildly wrong.
fn clock_offset_s(i: usize) -> i64 {
    match i {
        0 => 0,
        i if i % 2 == 1 => -1_700_000_000,
        _ => 3600,
    }
}
const UP_WITHIN: Duration = Duration::from_secs(20);
const SYNC_WITHIN: Duration = Duration::from_secs(60);
const SHAPE_WITHIN: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(90);
const SAMPLE: Duration = Duration::from_secs(60);
const DELIVER_WITHIN: Duration = Duration::from_secs(15);
/// What the real system must keep, at every node and in every sample, vs the root, once
/// settled (worst seen since the window-mean filter: 3.7 ms, docs/BENCHMARKS.md; before it,
/// 8-33 ms).
const BOUND_MS: f64 = 12.0;
/// Every stratum's p99 |error vs root| (the issue's target is 1 ms at 3 hops; measured
/// 0.6-3.5 ms, docs/BENCHMARKS.md; before the window-mean filter 3-33 ms): the margin is for a
/// loaded CI machine.
const P99_MS: f64 = 6.0;

fn name(i: usize) -> String {
    format!("n{i}")
}

#[test]
fn network_time_over_three_delayed_hops() {
    if !netns::enabled() {
        return;
    }
    borg_tests::borg_bin();
    let net = TimeNet::new("time", NODES);

    // The network does what it claims: 4 legs of 7.5-12.5 ms per round trip.
    let rtt = net.rtt(0, NODES - 1);
    println!(
        "FIGURES switch RTT n0<->n{}: {} of {} echoes, min {:.1} / p50 {:.1} / p99 {:.1} / max {:.1} ms",
        NODES - 1,
        rtt.received,
        rtt.sent,
        rtt.min_ms,
        rtt.p50_ms,
        rtt.p99_ms,
        rtt.max_ms
    );
    assert!(rtt.received >= 290, "echoes lost: {rtt:?}");
    assert!(
        rtt.min_ms >= 29.0 && (35.0..=46.0).contains(&rtt.p50_ms),
        "the switch does not delay 20 +- 5 ms each way: {rtt:?}"
    );

    let mut nodes = TimeNodes::new("time");
    // The root first; once its cronoTree monitor answers, everyone else at once through it.
    for (i, ns) in net.nodes.iter().enumerate() {
        let join: Vec<String> = if i == 0 {
            Vec::new()
        } else {
            vec![net.nodes[0].ip.to_string()]
        };
        let extra: Vec<String> = ["--no-nat", "--clock-offset-s"]
            .iter()
            .map(ToString::to_string)
            .chain([clock_offset_s(i).to_string()])
            .collect();
        nodes.spawn(&name(i), ns, &join, &extra);
        if i == 0 {
            let up = wait_for(UP_WITHIN, Duration::from_millis(50), || {
                nodes.assert_alive();
                nodes.status(&name(0), CRONO_MON)
            });
            assert!(
                up.is_some(),
                "n0: cronoTree monitor silent; log:\n{}",
                nodes.log_of(&name(0))
            );
        }
    }

    // Every node synced.
    let mut synced_after: BTreeMap<String, Duration> = BTreeMap::new();
    let all = wait_for(SYNC_WITHIN, Duration::from_millis(100), || {
        nodes.assert_alive();
        for i in 0..NODES {
            let n = name(i);
            if synced_after.contains_key(&n) {
                continue;
            }
            if let Some(st) = nodes.status(&n, CRONO_MON) {
                if st["time"]["synced"] == true {
                    synced_after.insert(n.clone(), nodes.nodes[&n].started.elapsed());
                }
            }
        }
        (synced_after.len() == NODES).then_some(())
    });
    let last: Vec<String> = (0..NODES)
        .map(|i| {
            nodes
                .status(&name(i), CRONO_MON)
                .map(|s| s["time"].to_string())
                .unwrap_or_else(|| "no answer".into())
        })
        .collect();
    assert!(
        all.is_some(),
        "not every node synced within {SYNC_WITHIN:?}: {last:#?}"
    );
    for (n, d) in &synced_after {
        println!("FIGURES {n}: start -> synced {:.2} s", d.as_secs_f64());
    }

    // The shape: every node takes its time from its cronoTree parent (stratum = depth, after
    // a first time from the bootstrap median), and the deepest is three hops down.
    let shaped_at = Instant::now();
    let mut stratum: BTreeMap<String, u64> = BTreeMap::new();
    let mut lines: Vec<String> = Vec::new();
    let shaped = wait_for(SHAPE_WITHIN, Duration::from_millis(200), || {
        nodes.assert_alive();
        stratum.clear();
        lines.clear();
        let mut ok = true;
        let mut positions = std::collections::BTreeSet::new();
        for i in 0..NODES {
            let st = nodes.status(&name(i), CRONO_MON)?;
            let s = st["time"]["stratum"].as_u64();
            lines.push(format!(
                "  n{i}: cronoTree position {} depth {} stratum {} source {}",
                st["position"], st["depth"], st["time"]["stratum"], st["time"]["source"]
            ));
            ok &= s.is_some() && st["depth"].as_u64() == s;
            if let Some(p) = st["position"].as_u64() {
                positions.insert(p);
            }
            stratum.insert(name(i), s.unwrap_or(u64::MAX));
        }
        // A settled tree: positions 1..=N each held once (during a repair two nodes can
        // briefly claim one position, and the deepest may not be placed yet).
        ok &= positions.len() == NODES && positions.iter().copied().eq(1..=NODES as u64);
        ok.then_some(())
    });
    println!("{}", lines.join("\n"));
    assert!(
        shaped.is_some(),
        "not every node follows its cronoTree parent (stratum = depth) within {SHAPE_WITHIN:?}"
    );
    println!(
        "FIGURES every node follows its parent (stratum = depth) {:.2} s after all synced",
        shaped_at.elapsed().as_secs_f64()
    );
    assert!(
        stratum.values().any(|s| *s == 3),
        "no node at stratum 3: {stratum:?}"
    );
    let root = stratum
        .iter()
        .find(|(_, s)| **s == 0)
        .map(|(n, _)| n.clone())
        .expect("a node at stratum 0");

    // Settle, then sample: the error vs the root, and network time never backwards.
    let secs = |var: &str, default: Duration| {
        std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(default, Duration::from_secs)
    };
    let sample = secs("BORG_TIME_SAMPLE_SECS", SAMPLE);
    let settle = secs("BORG_TIME_SETTLE_SECS", SETTLE);
    let settle_end = Instant::now() + settle;
    let end = settle_end + sample;
    let mut last_now: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    // (seconds into the sample window, |error|) per stratum: does the error still shrink?
    let mut trend: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    let mut bounds: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    let mut worst: Option<(f64, String)> = None;
    // Samples whose true error exceeded the error bound the node itself reported.
    let mut over_own_bound = 0u32;
    let mut rounds = 0u32;
    // Bounded: each round is at least 200 ms.
    while Instant::now() < end {
        let round_start = Instant::now();
        nodes.assert_alive();
        let snap: BTreeMap<String, serde_json::Value> = (0..NODES)
            .filter_map(|i| Some((name(i), nodes.status(&name(i), CRONO_MON)?)))
            .collect();
        for (n, st) in &snap {
            let now = st["time"]["now_ms"].as_u64().unwrap();
            if let Some(prev) = last_now.insert(n.clone(), now) {
                assert!(now >= prev, "{n}: network time went back {prev} -> {now}");
            }
        }
        if Instant::now() >= settle_end {
            let Some(root_off) = snap
                .get(&root)
                .and_then(|s| s["time"]["system_offset_ms"].as_f64())
            else {
                continue;
            };
            rounds += 1;
            for (n, st) in &snap {
                if *n == root {
                    continue;
                }
                assert_eq!(st["time"]["synced"], true, "{n} lost sync: {}", st["time"]);
                let err = st["time"]["system_offset_ms"].as_f64().unwrap() - root_off;
                let s = stratum[n];
                errors.entry(s).or_default().push(err.abs());
                let at = Instant::now().saturating_duration_since(settle_end);
                trend
                    .entry(s)
                    .or_default()
                    .push((at.as_secs_f64(), err.abs()));
                if let Some(b) = st["time"]["error_bound_ms"].as_f64() {
                    bounds.entry(s).or_default().push(b);
                    if err.abs() > b {
                        over_own_bound += 1;
                    }
                }
                if worst.as_ref().is_none_or(|(w, _)| err.abs() > *w) {
                    worst = Some((err.abs(), format!("{n} (stratum {s}): {err:+.3} ms")));
                }
            }
        }
        let spent = round_start.elapsed();
        if spent < Duration::from_millis(200) {
            std::thread::sleep(Duration::from_millis(200) - spent);
        }
    }
    println!(
        "FIGURES {rounds} sample rounds over {} s after {} s settling; |error vs root| per stratum:",
        sample.as_secs(),
        settle.as_secs()
    );
    let mut p99s = Vec::new();
    for (s, v) in &mut errors {
        p99s.push((*s, quantile(v, 0.99)));
        let b = bounds
            .get_mut(s)
            .map(|b| quantile(b, 0.5))
            .unwrap_or(f64::NAN);
        println!(
            "FIGURES   stratum {s}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} samples; error bound p50 {b:.3} ms)",
            quantile(v, 0.5),
            quantile(v, 0.99),
            quantile(v, 1.0),
            v.len()
        );
    }
    let quarter = sample.as_secs_f64() / 4.0;
    for (s, v) in &trend {
        let mut first: Vec<f64> = v.iter().filter(|x| x.0 < quarter).map(|x| x.1).collect();
        let mut last: Vec<f64> = v
            .iter()
            .filter(|x| x.0 >= 3.0 * quarter)
            .map(|x| x.1)
            .collect();
        println!(
            "FIGURES   stratum {s}: p50 in the first quarter {:.3} ms, in the last quarter {:.3} ms",
            quantile(&mut first, 0.5),
            quantile(&mut last, 0.5)
        );
    }
    let (w, at) = worst.expect("samples");
    println!("FIGURES worst: {at}; samples beyond the node's own error bound: {over_own_bound}");
    assert!(rounds >= 10, "only {rounds} sample rounds");
    assert!(w <= BOUND_MS, "error {at} beyond {BOUND_MS} ms");
    for (s, p99) in p99s {
        assert!(
            p99 <= P99_MS,
            "stratum {s}: p99 {p99:.3} ms beyond {P99_MS} ms"
        );
    }

    // Broadcast through peerTreeNet from the deepest node reaches everyone.
    let leaf = name(NODES - 1);
    nodes.broadcast(&leaf, "time-netns-hello");
    let took = nodes
        .wait_delivered("time-netns-hello", DELIVER_WITHIN)
        .unwrap_or_else(|missing| panic!("not delivered at {missing:?}"));
    println!(
        "FIGURES broadcast from {leaf} delivered everywhere within {} ms",
        took.as_millis()
    );
    drop(nodes);
    drop(net);
}
