//! Network time with real `borg node` processes on loopback: nodes whose clocks are faked far
//! off (a Pi 4 without RTC boots at 1970; another runs an hour ahead) learn network time from
//! their contacts, join the base tree and the cronoTree, and exchange broadcasts. All processes
//! share the host's CLOCK_REALTIME, so each node's true error is `time.system_offset_ms`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use borg_tests::{wait_for, Net};

const CRONO_MON: u16 = 13398;

#[test]
fn nodes_with_clocks_at_1970_and_an_hour_ahead_join_sync_and_broadcast() {
    let mut net = Net::new(31, 500, 3);
    net.spawn(0, None);
    net.wait_up(0);
    let started = Instant::now();
    // A chain of contacts: each newcomer knows only the node started before it.
    net.spawn_with(1, Some(0), &["--clock-offset-s", "-1700000000"]);
    net.spawn_with(2, Some(1), &["--clock-offset-s", "3600"]);
    net.spawn_with(3, Some(2), &["--clock-offset-s", "-1700000000"]);
    net.spawn_with(4, Some(0), &["--clock-offset-s", "-86400"]);
    let took = net
        .wait_tree(Duration::from_secs(40))
        .unwrap_or_else(|e| panic!("no base tree: {e}"));
    println!(
        "base tree of 5 after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let _ = took;

    // The cronoTree spans every node too, and every node is synced.
    let mut last = String::new();
    let (size, depth) = wait_for(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || match net.check_cell_tree(CRONO_MON, 3) {
            Ok(v) => Some(v),
            Err(e) => {
                last = e;
                None
            }
        },
    )
    .unwrap_or_else(|| panic!("no cronoTree of 5: {last}"));
    assert_eq!(size, 5);
    println!("cronoTree of 5, depth {depth}");

    // Each node's network time is close to the true time (the root's clock is the host's).
    let errors = wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        let errs: Vec<f64> = (0..5)
            .map(|i| {
                let st = net.cell_status(i, CRONO_MON).unwrap_or_default();
                if st["time"]["synced"] != true {
                    return f64::INFINITY;
                }
                st["time"]["system_offset_ms"]
                    .as_f64()
                    .unwrap_or(f64::INFINITY)
            })
            .collect();
        errs.iter().all(|e| e.abs() < 20.0).then_some(errs)
    })
    .unwrap_or_else(|| {
        let all: Vec<_> = (0..5).map(|i| net.cell_status(i, CRONO_MON)).collect();
        panic!("not every node synced within 20 ms of true time: {all:?}")
    });
    println!("error vs true time per node (ms): {errors:?}");
    for i in 0..5 {
        let st = net.status(i).unwrap();
        assert_eq!(st["time"]["synced"], true, "node {i}: {st}");
        let names: Vec<&str> = st["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["peerTreeNet", "cronoTree", "shardTree", "ftreeFileMgr"],
            "node {i}"
        );
        let m = net.metrics(i);
        assert!(m.contains("borg_time_synced 1"), "node {i}: {m}");
    }

    // Network time never went back: two readings a second apart only grow.
    let first: Vec<u64> = (0..5)
        .map(|i| {
            net.cell_status(i, CRONO_MON).unwrap()["time"]["now_ms"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let later = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        let v: Vec<u64> = (0..5)
            .map(|i| {
                net.cell_status(i, CRONO_MON).unwrap()["time"]["now_ms"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        v.iter()
            .zip(&first)
            .all(|(b, a)| *b >= a + 1000)
            .then_some(v)
    });
    assert!(later.is_some(), "network time stalled or went back");

    // A broadcast from the node that booted at 1970 reaches everyone exactly once.
    let before = net.delivered();
    let out = net.broadcast(3, "hello from 1970");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        let now = net.delivered();
        now.iter().all(|(i, c)| *c == before[i] + 1).then_some(())
    });
    assert!(
        all.is_some(),
        "not delivered everywhere: {:?}",
        net.delivered()
    );
}
