//! The shardTree cell's store, through the runtime: opened by a blocking job off the actor,
//! usage in status and at the `shard.stat` receptor kind, a scrub on virtual time; and on a
//! real data directory, a store another process holds is an error in status, never a crash.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use borg_cells::shard::{ShardCell, FIRST_SCRUB_MS};
use borg_net::cell::CellInit;
use borg_net::clock::NetClock;
use borg_net::node::mem::MemNet;
use serde_json::json;

/// 2026-12-01 in µs.
const T0: u64 = 1_796_083_200_000_000;

#[tokio::test(start_paused = true)]
async fn the_store_opens_off_the_actor_and_is_scrubbed_on_time() {
    let mut net = MemNet::new(25, 1000);
    let a = net.add("shardTree", T0, &[], ShardCell::boxed);
    let b = net.add("shardTree", T0, &[a], ShardCell::boxed);
    assert!(
        net.run_until(Duration::from_secs(10), |n| n.status(b)["state"]
            == "joined")
            .await
    );
    let st = net.status(a);
    assert_eq!(st["store"]["open"], true, "{st}");
    assert_eq!(
        st["store"]["budget"],
        borg_cells::shard::DEFAULT_BUDGET,
        "{st}"
    );
    let r = net.request(a, net.key(b), "shard.stat", json!({})).unwrap();
    assert_eq!(r["shards"], 0);
    assert_eq!(net.status(a)["store"]["scrubs"], 0);
    net.run_for(Duration::from_millis(FIRST_SCRUB_MS + 1000))
        .await;
    assert_eq!(net.status(a)["store"]["scrubs"], 1, "{}", net.status(a));
    assert!(net.metrics(a).contains("borg_shard_scrubs_total 1"));
}

#[test]
fn a_store_another_process_holds_is_an_error_in_status_and_requests_say_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    // Held open here, as another process would.
    let _held = borg_store::RedbStore::open(dir.path().join("shards.redb"), 1 << 20).unwrap();
    let mut cell = ShardCell::new(CellInit {
        name: "shardTree",
        key: borg_proto::identity::SecretKey::generate().public(),
        clock: NetClock::starting_at(T0, 0),
        contacts: vec![],
        data_dir: Some(dir.path().to_path_buf()),
    });
    use borg_net::cell::{Cell, CellTime};
    let now = CellTime {
        mono_ms: 0,
        local_us: T0,
        net_ms: T0 / 1000,
    };
    let work = cell.poll_work().unwrap();
    cell.handle_work_done(now, work());
    let st = cell.status(now);
    assert_eq!(st["store"]["open"], false);
    assert!(
        st["store"]["error"].as_str().unwrap().contains("open"),
        "{st}"
    );
    let err = cell
        .handle_request(
            now,
            &borg_proto::identity::SecretKey::generate().public(),
            "shard.stat",
            &json!({}),
        )
        .unwrap_err();
    assert_eq!((err.status, err.code), (503, "unavailable"));
    assert!(
        err.message.contains("could not be opened"),
        "{}",
        err.message
    );
}
