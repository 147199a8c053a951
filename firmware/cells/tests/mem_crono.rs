//! cronoTree through the node runtime, in memory with paused time (issue 10): the real
//! `CronoCell` on `borg_net::node::mem::MemNet` hosts (tree, envelopes with their ±30 s
//! window and replay cache, nonce-fresh time kinds), no sockets, no sleeps.
//!
//! A node whose clock reads 1970 (a Pi 4 without RTC) joins a root whose clock is right: its
//! first tree messages are stale to the root, its time requests are not (nonce-fresh); it
//! syncs from the bootstrap, then its tree join goes through, and it follows the root as its
//! parent, with network time never going backwards.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use borg_cells::crono::CronoCell;
use borg_net::node::mem::MemNet;

/// 2026-12-01 in µs.
const T0: u64 = 1_796_083_200_000_000;

#[tokio::test(start_paused = true)]
async fn a_node_at_1970_syncs_joins_and_follows_in_memory() {
    let mut net = MemNet::new(3, 1000);
    let root = net.add("cronoTree", T0, &[], CronoCell::boxed);
    let pi = net.add("cronoTree", 5_000_000, &[root], CronoCell::boxed);
    let (rc, pc) = (net.clock(root), net.clock(pi));
    let synced_and_joined = |n: &MemNet| {
        let st = n.status(pi);
        st["state"] == "joined" && st["time"]["synced"] == true && st["time"]["stratum"] == 1
    };
    assert!(
        net.run_until(Duration::from_secs(30), synced_and_joined)
            .await,
        "{}",
        net.status(pi)
    );
    let st = net.status(pi);
    assert_eq!(st["time"]["source"], net.key(root).to_b64(), "{st}");
    // Its early tree messages were stale to the root; the time exchange was not.
    assert!(net.rejected(root, "stale") > 0);
    assert_eq!(net.rejected(root, "forbidden"), 0);
    // Frames arrive in the same virtual instant here: network times agree to the µs scale.
    let mut last = pc.now_us();
    for _ in 0..60 {
        net.run_for(Duration::from_secs(1)).await;
        let (r, p) = (rc.now_us(), pc.now_us());
        assert!(p >= last, "network time went back: {last} -> {p}");
        last = p;
        assert!(r.abs_diff(p) < 1_000, "root {r} vs pi {p}");
    }
    assert!(net.metrics(root).contains("borg_time_answers_total"));
}

/// Three hops of 20 ± 5 ms links (two uniform parts each way), eight nodes at clocks from
/// 1970 to an hour ahead, through the runtime on virtual time: every node's network time
/// ends within a millisecond or two of the root's and never goes backwards. (The figures for
/// the same links in network namespaces are in docs/BENCHMARKS.md.)
#[tokio::test(start_paused = true)]
async fn three_hops_of_delayed_links_sync_within_a_few_milliseconds() {
    let mut net = MemNet::new(2, 1000);
    net.set_latency(Duration::from_millis(20), Duration::from_millis(5), 7);
    let root = net.add("cronoTree", T0, &[], CronoCell::boxed);
    let offsets: [i64; 7] = [
        -1_700_000_000,
        3_600,
        -1_700_000_000,
        -5,
        1_200,
        -1_700_000_000,
        30,
    ];
    for off in offsets {
        let local = T0 as i64 + off * 1_000_000;
        net.add("cronoTree", local as u64, &[root], CronoCell::boxed);
    }
    let n = net.len();
    let all_in = |net: &MemNet| {
        (1..n).all(|i| {
            let st = net.status(i);
            st["state"] == "joined" && st["time"]["synced"] == true
        })
    };
    assert!(
        net.run_until(Duration::from_secs(60), all_in).await,
        "{:?}",
        (0..n)
            .map(|i| net.status(i)["time"].clone())
            .collect::<Vec<_>>()
    );
    let depth = |net: &MemNet, i: usize| net.status(i)["depth"].as_u64().unwrap_or(0);
    assert_eq!((0..n).map(|i| depth(&net, i)).max(), Some(3));
    // Settle, then sample once a second for a minute.
    net.run_for(Duration::from_secs(120)).await;
    let clocks: Vec<_> = (0..n).map(|i| net.clock(i)).collect();
    let mut last = vec![0u64; n];
    let mut worst = [0u64; 4];
    for _ in 0..60 {
        net.run_for(Duration::from_secs(1)).await;
        let r = clocks[root].now_us();
        for i in 1..n {
            let t = clocks[i].now_us();
            assert!(t >= last[i], "node {i} went back");
            last[i] = t;
            let d = depth(&net, i) as usize;
            worst[d] = worst[d].max(t.abs_diff(r));
        }
    }
    println!(
        "mem_crono: worst |net - root| by depth 1..3 over 60 s: {:?} µs",
        &worst[1..]
    );
    for (d, w) in worst.iter().enumerate().skip(1) {
        assert!(*w < 3_000, "depth {d}: {w} µs");
    }
}
