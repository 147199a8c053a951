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
