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

mod replication {
    use std::sync::Arc;
    use std::time::Duration;

    use borg_cells::shard::disk::Place;
    use borg_cells::shard::{ShardCell, ShardConfig};
    use borg_net::cell::{Cell, CellAction, CellError, CellTime, Work, WorkDone};
    use borg_net::node::mem::MemNet;
    use borg_proto::identity::PublicKey;
    use borg_proto::shard::members::DirConfig;
    use borg_proto::shard::placement::{holders, Members};
    use borg_proto::shard::repair::RepairConfig;
    use borg_proto::stream::frame::{Frame, Shard, Want};
    use borg_proto::tree::TreeView;
    use borg_store::{Address, MemStore, ShardStore};
    use rand::{rngs::StdRng, RngCore, SeedableRng};
    use serde_json::json;
    use serde_json::Value;

    use super::T0;

    /// Timings short enough for minutes of virtual time: announce every 10 s, members live
    /// 35 s without one, 2 s probation; surplus copies dropped 30 s after all 3 are confirmed.
    fn cfg() -> ShardConfig {
        ShardConfig {
            dir: DirConfig {
                ttl_ms: 35_000,
                probation_ms: 2_000,
                ..DirConfig::default()
            },
            repair: RepairConfig {
                new_check_ms: 3_000,
                recheck_ms: 10_000,
                query_retry_ms: 2_000,
                report_ttl_ms: 20_000,
                drop_grace_ms: 30_000,
                push_bytes_per_s: 64 << 20,
                ..RepairConfig::default()
            },
            announce_ms: 10_000,
            first_scrub_ms: borg_cells::shard::FIRST_SCRUB_MS,
        }
    }

    fn node(net: &mut MemNet, contacts: &[usize], store: Arc<MemStore>) -> usize {
        net.add("shardTree", T0, contacts, move |init| {
            Box::new(ShardCell::with(init, Place::Given(store), cfg())) as Box<dyn Cell>
        })
    }

    fn copies(stores: &[Arc<MemStore>], live: &[usize], a: &Address) -> Vec<usize> {
        live.iter()
            .copied()
            .filter(|&i| stores[i].has(a).unwrap())
            .collect()
    }

    /// Shards put on one node end up on exactly their three top-ranked members, checked
    /// against the bytes; the first node's surplus copies go after the grace period; when a
    /// holder disappears, its shards are copied to the next-ranked member.
    #[tokio::test(start_paused = true)]
    async fn shards_reach_their_three_placed_holders_and_heal_after_a_loss() {
        let mut net = MemNet::new(25, 1000);
        let stores: Vec<Arc<MemStore>> = (0..6).map(|_| Arc::new(MemStore::new(1 << 30))).collect();
        let mut rng = StdRng::seed_from_u64(3);
        let mut addrs = Vec::new();
        for len in [1usize, 4096, 100_000, 256 * 1024, 7] {
            let mut b = vec![0u8; len];
            rng.fill_bytes(&mut b);
            addrs.push(stores[0].put(&b).unwrap());
        }
        let first = node(&mut net, &[], stores[0].clone());
        for store in &stores[1..] {
            node(&mut net, &[first], store.clone());
        }
        let all: Vec<usize> = (0..6).collect();
        let keys: Vec<PublicKey> = all.iter().map(|&i| net.key(i)).collect();
        let keys_all = keys.clone();
        let placed = |keys: &[PublicKey], a: &Address| -> Vec<usize> {
            let m = Members::new(keys.iter().copied()).unwrap();
            let top = holders(a.as_bytes(), &m, 3).unwrap();
            let mut v: Vec<usize> = top
                .iter()
                .map(|k| keys_all.iter().position(|x| x == k).unwrap())
                .collect();
            v.sort();
            v
        };
        let want: Vec<Vec<usize>> = addrs.iter().map(|a| placed(&keys, a)).collect();
        let on_top = |net: &MemNet| {
            let _ = net;
            addrs
                .iter()
                .zip(&want)
                .all(|(a, w)| w.iter().all(|&i| stores[i].has(a).unwrap()))
        };
        assert!(
            net.run_until(Duration::from_secs(120), on_top).await,
            "not placed within 2 virtual minutes: {:?}",
            addrs
                .iter()
                .map(|a| copies(&stores, &all, a))
                .collect::<Vec<_>>()
        );
        // Every copy reads back right (the store re-hashes on get).
        for (a, w) in addrs.iter().zip(&want) {
            for &i in w {
                assert!(stores[i].get(a).unwrap().is_some());
            }
        }
        // The first node keeps its surplus copies until all three are confirmed, then a grace
        // period: afterwards exactly three copies of each.
        let exact = |_: &MemNet| {
            addrs
                .iter()
                .zip(&want)
                .all(|(a, w)| copies(&stores, &all, a) == *w)
        };
        assert!(
            net.run_until(Duration::from_secs(120), exact).await,
            "surplus not dropped: {:?} want {want:?}",
            addrs
                .iter()
                .map(|a| copies(&stores, &all, a))
                .collect::<Vec<_>>()
        );
        let st = net.status(first);
        assert!(st["repair"]["pushes"].as_u64().unwrap() >= 5, "{st}");

        // A holder of the first shard (not the tree root) goes silent.
        let gone = *want[0].iter().find(|&&i| i != first).unwrap();
        for i in 0..6 {
            if i != gone {
                net.set_cut(gone, i, true);
            }
        }
        let live: Vec<usize> = all.iter().copied().filter(|&i| i != gone).collect();
        let live_keys: Vec<PublicKey> = live.iter().map(|&i| net.key(i)).collect();
        let want_after: Vec<Vec<usize>> = addrs.iter().map(|a| placed(&live_keys, a)).collect();
        let healed = |_: &MemNet| {
            addrs
                .iter()
                .zip(&want_after)
                .all(|(a, w)| w.iter().all(|&i| stores[i].has(a).unwrap()))
        };
        let t = tokio::time::Instant::now();
        assert!(
            net.run_until(Duration::from_secs(180), healed).await,
            "not healed: {:?} want {want_after:?}",
            addrs
                .iter()
                .map(|a| copies(&stores, &live, a))
                .collect::<Vec<_>>()
        );
        println!(
            "healed {} shards after losing a holder in {:?} of virtual time",
            addrs.len(),
            t.elapsed()
        );
    }

    /// A shard cell that never answers a Want (to inject the answers by hand).
    struct Mute(ShardCell);

    impl Cell for Mute {
        fn kind_prefix(&self) -> &'static str {
            self.0.kind_prefix()
        }
        fn handle_tree(&mut self, now: CellTime, view: &TreeView) {
            self.0.handle_tree(now, view)
        }
        fn handle_broadcast(&mut self, now: CellTime, id: &str, o: &PublicKey, p: &Value) {
            self.0.handle_broadcast(now, id, o, p)
        }
        fn handle_message(
            &mut self,
            now: CellTime,
            from: PublicKey,
            rx: u64,
            kind: &str,
            body: &Value,
        ) -> Result<(), CellError> {
            self.0.handle_message(now, from, rx, kind, body)
        }
        fn handle_binary(&mut self, _: CellTime, _: PublicKey, _: &[u8]) -> Result<(), CellError> {
            Ok(())
        }
        fn poll_work(&mut self) -> Option<Work> {
            self.0.poll_work()
        }
        fn handle_work_done(&mut self, now: CellTime, done: WorkDone) {
            self.0.handle_work_done(now, done)
        }
        fn handle_timeout(&mut self, now: CellTime) {
            self.0.handle_timeout(now)
        }
        fn poll_timeout(&self) -> Option<u64> {
            self.0.poll_timeout()
        }
        fn poll_action(&mut self, now: CellTime) -> Option<CellAction> {
            self.0.poll_action(now)
        }
    }

    /// An outsider's frames and messages: a Want for a stream nobody offered gets a Close and
    /// no bytes; a Shard nobody asked for is counted and not stored; an offer, ask or query
    /// from a key that is not a member is refused; and from a member, a pull that receives
    /// wrong bytes refuses them and stores nothing.
    #[tokio::test(start_paused = true)]
    async fn frames_nobody_asked_for_and_wrong_bytes_are_refused() {
        let mut net = MemNet::new(25, 1000);
        let store = Arc::new(MemStore::new(1 << 30));
        let a = node(&mut net, &[], store.clone());
        // A member whose cell never answers a Want, and an outsider that runs only the tree.
        let x = net.add("shardTree", T0, &[a], |init| {
            Box::new(Mute(ShardCell::with(
                init,
                Place::Memory { budget: 1 << 30 },
                cfg(),
            ))) as Box<dyn Cell>
        });
        let y = net.add("shardTree", T0, &[a], |_| {
            Box::new(borg_net::cell::NoCell) as Box<dyn Cell>
        });
        // Announcements (every 10 s) and probation (2 s): x becomes a member of a's directory.
        net.run_for(Duration::from_secs(15)).await;
        assert_eq!(
            net.status(a)["members"]["placeable"],
            2,
            "{}",
            net.status(a)
        );

        let want = Frame::Want(Want {
            stream: 2,
            seq: 0,
            addr: [7u8; 32],
        });
        net.inject_bytes(y, a, want.encode());
        let st = net.status(a);
        assert_eq!(st["transfers"]["closes_out"], 1, "{st}");
        assert_eq!(st["transfers"]["shards_out"], 0, "{st}");

        let bytes = b"the real bytes".to_vec();
        let addr = Address::of(&bytes);
        let stray = Frame::Shard(Shard {
            stream: 9,
            seq: 0,
            addr: *addr.as_bytes(),
            bytes: bytes.clone(),
        });
        net.inject_bytes(y, a, stray.encode());
        assert_eq!(net.status(a)["transfers"]["unsolicited"], 1);
        assert!(!store.has(&addr).unwrap());

        let hex: String = addr.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        // The outsider's offer, ask and query are refused: it is not a member.
        let offer = |stream: u32| json!({"stream": stream, "shards": [[hex, bytes.len()]]});
        net.inject(y, a, "shard.offer", offer(5));
        net.inject(y, a, "shard.ask", json!({"addrs": [hex]}));
        net.inject(y, a, "shard.has", json!({"addrs": [hex]}));
        let st = net.status(a);
        assert_eq!(st["transfers"]["pulls"], 0, "{st}");
        assert_eq!(st["members"]["not_member_refused"], 3, "{st}");
        assert_eq!(net.rejected(a, "forbidden"), 3);

        // The member offers it (on its side's stream parity); a pulls; the answer (injected
        // as x) carries other bytes.
        let stream = if net.key(x) > net.key(a) { 5 } else { 4 };
        net.inject(x, a, "shard.offer", offer(stream));
        assert_eq!(net.status(a)["transfers"]["pulls"], 1);
        let wrong = Frame::Shard(Shard {
            stream,
            seq: 0,
            addr: *addr.as_bytes(),
            bytes: b"the wrong bytes".to_vec(),
        });
        net.inject_bytes(x, a, wrong.encode());
        net.run_for(Duration::from_secs(1)).await;
        let st = net.status(a);
        assert_eq!(st["transfers"]["bad_shards"], 1, "{st}");
        assert!(!store.has(&addr).unwrap());
        // The only holder was struck off for this shard: the pull is over.
        assert_eq!(st["transfers"]["pulls_open"], 0, "{st}");
    }
}
