//! Issue 12, multi-process: ten real `borg node` processes trusting one 3-of-4 maintainer
//! root. Three maintainers publish their approvals at three different nodes; every node
//! gathers all three and reports the release approved. With k-1 approvals no node does. A
//! release signed only by an outsider is refused and kept nowhere. A node that was down
//! during the k-th approval catches up from its tree neighbour when it comes back, with what
//! it had gathered before its crash still on disk.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use borg_tests::cli::{borg, ok, text};
use borg_tests::{wait_for, Net};
use serde_json::Value;

const N: usize = 10;

/// Node `i`'s view of the release with manifest digest `digest`: (counted, approved).
fn gathered(net: &Net, i: usize, digest: &str) -> Option<(u64, bool)> {
    let s = net.status(i)?;
    let p = s["update"]["pending"]
        .as_array()?
        .iter()
        .find(|p| p["manifest"] == digest)?
        .clone();
    Some((p["counted"].as_u64()?, p["approved"] == true))
}

/// Wait until every running node reports `want` for `digest`; panics with the views.
fn wait_all(net: &Net, digest: &str, want: (u64, bool), within: Duration) -> Duration {
    let start = Instant::now();
    let done = wait_for(within, Duration::from_millis(20), || {
        net.nodes
            .keys()
            .all(|&i| gathered(net, i, digest) == Some(want))
            .then_some(())
    });
    if done.is_none() {
        let views: Vec<_> = net
            .nodes
            .keys()
            .map(|&i| (i, gathered(net, i, digest)))
            .collect();
        panic!("not every node reached {want:?} within {within:?}: {views:?}");
    }
    start.elapsed()
}

#[test]
fn three_maintainers_approve_from_three_nodes_and_every_node_gathers_the_release() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for k in ["a", "b", "c", "d", "outsider"] {
        ok(d, &["release", "keygen", "--out", k]);
    }
    ok(
        d,
        &[
            "release",
            "root-init",
            "--keys",
            "a.pub,b.pub,c.pub,d.pub",
            "--threshold",
            "3",
            "--out",
            "root.json",
        ],
    );
    for k in ["a", "b", "c"] {
        ok(d, &["release", "root-sign", "root.json", "--key", k]);
    }
    std::fs::write(d.join("img"), vec![7u8; 65_536]).unwrap();
    let out = ok(
        d,
        &[
            "release",
            "create",
            "--image",
            "img",
            "--version",
            "0.2.0",
            "--board",
            "qemu-virt,rpi4",
            "--min-version",
            "0.1.0",
            "--expires-days",
            "30",
            "--out",
            "m.json",
        ],
    );
    let digest = out.rsplit("manifest ").next().unwrap().trim().to_string();
    assert_eq!(digest.len(), 64, "{out}");
    // Each maintainer approves their own copy, as they would on their own machine.
    for k in ["a", "b", "c", "outsider"] {
        std::fs::copy(d.join("m.json"), d.join(format!("{k}.json"))).unwrap();
        ok(d, &["release", "approve", &format!("{k}.json"), "--key", k]);
    }

    let mut net = Net::new(70, 500, 3);
    net.env.push((
        "BORG_OTA_ROOT".into(),
        d.join("root.json").display().to_string(),
    ));
    net.spawn(0, None);
    net.wait_up(0);
    for i in 1..N {
        net.spawn(i, Some(i / 3));
    }
    net.wait_tree(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("no tree: {e}"));
    for i in 0..N {
        let u = net.status(i).unwrap()["update"].clone();
        assert_eq!(u["enabled"], true, "node {i}: {u}");
        assert_eq!(
            (u["threshold"].as_u64(), u["maintainers"].as_u64()),
            (Some(3), Some(4))
        );
        assert_eq!(u["phase"], "idle", "node {i}: {u}");
    }
    let ip = |i: usize| format!("127.70.0.{}", i + 2);
    assert_eq!(ip(3), net.ip(3).to_string());

    // An outsider's approval: refused where it is published, and kept nowhere.
    let o = borg(
        d,
        &["release", "publish", "outsider.json", "--node", &ip(5)],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("403 forbidden"), "{}", text(&o));

    // k-1 = 2 maintainers, at two different nodes: every node gathers both, none approves.
    ok(d, &["release", "publish", "a.json", "--node", &ip(1)]);
    ok(d, &["release", "publish", "b.json", "--node", &ip(4)]);
    wait_all(&net, &digest, (2, false), Duration::from_secs(20));
    for i in 0..N {
        let u = net.status(i).unwrap()["update"].clone();
        assert_eq!(u["phase"], "gathering", "node {i}: {u}");
        let held = u["pending"].as_array().unwrap().len();
        assert_eq!(held, 1, "node {i} holds only the maintainers' release: {u}");
    }

    // Node 9 goes down before the k-th approval.
    net.kill9(N - 1);
    // The third maintainer publishes at a third node: every running node approves.
    let start = Instant::now();
    ok(d, &["release", "publish", "c.json", "--node", &ip(7)]);
    wait_all(&net, &digest, (3, true), Duration::from_secs(20));
    eprintln!(
        "figure: k-th approval to all {} running nodes approved: {} ms",
        net.nodes.len(),
        start.elapsed().as_millis()
    );
    for i in net.nodes.keys() {
        let u = net.status(*i).unwrap()["update"].clone();
        assert_eq!(u["phase"], "approved", "node {i}: {u}");
    }

    // Node 9 comes back: it still has the two approvals it saved, and learns the third from
    // its new tree neighbour.
    net.spawn(N - 1, Some(0));
    net.wait_up(N - 1);
    let first = wait_for(Duration::from_secs(10), Duration::from_millis(10), || {
        gathered(&net, N - 1, &digest)
    });
    assert!(
        matches!(first, Some((2, false)) | Some((3, true))),
        "node 9 after restart: {first:?}"
    );
    wait_all(&net, &digest, (3, true), Duration::from_secs(30));

    // Its audit log survived the kill and shows each approval once.
    let log = ok(d, &["release", "log", "--node", &ip(N - 1), "--json"]);
    let log: Value = serde_json::from_str(&log).unwrap();
    let seen: Vec<&str> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"]["event"] == "approval_seen")
        .filter_map(|e| e["event"]["key"].as_str())
        .collect();
    let key = |k: &str| std::fs::read_to_string(d.join(format!("{k}.pub"))).unwrap();
    for k in ["a", "b", "c"] {
        assert_eq!(
            seen.iter().filter(|s| **s == key(k).trim()).count(),
            1,
            "approval by {k} in node 9's log: {log}"
        );
    }
    let human = ok(d, &["release", "log", "--node", &ip(1)]);
    assert!(human.contains("release 0.2.0"), "{human}");
    assert!(human.contains("3 of 3 approvals, approved"), "{human}");
}
