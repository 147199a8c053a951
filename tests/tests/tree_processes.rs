//! Twenty real `borg node` processes over TLS on loopback, each on its own 127.x address with
//! the default ports: they form one tree, a broadcast reaches every node exactly once, and
//! kill -9 of a leaf, a branch node and the root are each repaired within two heartbeats; a
//! killed node that restarts rejoins.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use borg_tests::Net;

const HB_MS: u64 = 1000;
const N: usize = 20;

#[test]
fn twenty_processes_form_a_tree_broadcast_and_repair() {
    let mut net = Net::new(20, HB_MS, 3);
    net.spawn(0, None);
    net.wait_up(0);
    for i in 1..N {
        // Join through various earlier nodes, not only the root.
        net.spawn(i, Some(i / 3));
    }
    net.wait_tree(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no tree: {e}"));
    let (size, depth) = net.check_tree().unwrap();
    assert_eq!((size, depth), (N, 3));

    // A broadcast from a leaf reaches every node exactly once.
    let before = net.delivered();
    let out = net.broadcast(N - 1, "hello, tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all_once = borg_tests::wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        let now = net.delivered();
        now.iter().all(|(i, c)| *c == before[i] + 1).then_some(now)
    });
    assert!(
        all_once.is_some(),
        "not every node delivered exactly once: {:?}",
        net.delivered()
    );
    for i in net.nodes.keys() {
        let m = net.metrics(*i);
        assert_eq!(
            borg_tests::metric(&m, "borg_broadcast_duplicates_total"),
            Some(0),
            "node {i}"
        );
    }

    // kill -9 a leaf, a branch node and the root; each is repaired within two heartbeats.
    let limit = Duration::from_millis(2 * HB_MS);
    for (what, pos) in [("leaf", 15u64), ("branch", 3), ("root", 1)] {
        let victim = net.holder_of(pos).unwrap();
        net.kill9(victim);
        let took = net
            .wait_tree(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{what} kill not repaired: {e}"));
        eprintln!("{what} (position {pos}) repaired in {took:?}");
        assert!(
            took <= limit,
            "{what} repair took {took:?}, more than two heartbeats"
        );
    }

    // Root knowledge travels with the heartbeats; then a broadcast reaches all 17.
    let survivor = *net.nodes.keys().next().unwrap();
    let before = net.delivered();
    let out = net.broadcast(survivor, "after the repairs");
    assert!(out.status.success());
    let all_once = borg_tests::wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        let now = net.delivered();
        now.iter().all(|(i, c)| *c == before[i] + 1).then_some(())
    });
    assert!(
        all_once.is_some(),
        "after repairs: {:?} vs {:?}",
        net.delivered(),
        before
    );

    // A killed node that restarts (same key, same address) rejoins.
    let back = 3usize;
    assert!(!net.nodes.contains_key(&back) || net.holder_of(1) != Some(back));
    let contact = *net.nodes.keys().next().unwrap();
    if !net.nodes.contains_key(&back) {
        net.spawn(back, Some(contact));
    }
    net.wait_tree(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("restart not rejoined: {e}"));
    assert_eq!(net.check_tree().unwrap().0, net.nodes.len());
}
