//! The shardTree cell over real TLS links on loopback: four whole nodes (base tree + shard
//! tree, each cell's runtime, listeners, actors) in this process. Shards put into one node's
//! redb store before it starts are offered and pulled as binary frames over the links until
//! each is on its three placed holders, and the first node drops its surplus copies.
//! Conditions with deadlines, never sleeps.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use borg_cells::shard::disk::Place;
use borg_cells::shard::{ShardCell, ShardConfig};
use borg_cells::{start_node_with, CellOptions, CellType};
use borg_net::cell::{Cell, CellInit, NoCell};
use borg_net::node::NodeHandle;
use borg_proto::dna;
use borg_proto::identity::PublicKey;
use borg_proto::shard::members::DirConfig;
use borg_proto::shard::placement::{holders, Members};
use borg_proto::shard::repair::RepairConfig;
use borg_store::{Address, RedbStore, ShardStore};

fn base(_: CellInit) -> Box<dyn Cell> {
    Box::new(NoCell)
}

/// The shard cell with timings for a test that runs in seconds.
fn shard(init: CellInit) -> Box<dyn Cell> {
    let dir = init.data_dir.clone().unwrap();
    let cfg = ShardConfig {
        dir: DirConfig {
            ttl_ms: 6_000,
            probation_ms: 500,
            ..DirConfig::default()
        },
        repair: RepairConfig {
            new_check_ms: 1_000,
            recheck_ms: 2_000,
            query_retry_ms: 1_000,
            report_ttl_ms: 3_000,
            drop_grace_ms: 3_000,
            push_bytes_per_s: 64 << 20,
            ..RepairConfig::default()
        },
        announce_ms: 1_000,
        first_scrub_ms: borg_cells::shard::FIRST_SCRUB_MS,
    };
    let place = Place::File {
        path: dir.join("shards.redb"),
        budget: 1 << 30,
    };
    Box::new(ShardCell::with(init, place, cfg))
}

const REGISTRY: &[CellType] = &[
    CellType {
        dna: dna::PEER_TREE_NET,
        make: base,
    },
    CellType {
        dna: dna::CELLS[1], // shardTree
        make: shard,
    },
];

async fn node(ip: &str, join: Option<&str>, dir: &tempfile::TempDir) -> Vec<Arc<NodeHandle>> {
    let ip: IpAddr = ip.parse().unwrap();
    let mut o = CellOptions::from_dna("peerTreeNet", ip, dir.path().to_path_buf()).unwrap();
    o.nat = false;
    o.heartbeat_ms = 200;
    o.join = join
        .map(|j| vec![SocketAddr::new(j.parse().unwrap(), 13300)])
        .unwrap_or_default();
    start_node_with(&o, REGISTRY).await.unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn shards_move_over_tls_links_to_their_placed_holders() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    // Three shards in the first node's store before it starts.
    let addrs: Vec<Address> = {
        let store = RedbStore::open(dirs[0].path().join("shards.redb"), 1 << 30).unwrap();
        [vec![1u8; 10], vec![2u8; 200_000], vec![3u8; 256 * 1024]]
            .iter()
            .map(|b| store.put(b).unwrap())
            .collect()
    };
    let ips = ["127.0.79.1", "127.0.79.2", "127.0.79.3", "127.0.79.4"];
    let mut nodes = vec![node(ips[0], None, &dirs[0]).await];
    for (i, ip) in ips.iter().enumerate().skip(1) {
        nodes.push(node(ip, Some(ips[0]), &dirs[i]).await);
    }
    let keys: Vec<PublicKey> = nodes
        .iter()
        .map(|n| PublicKey::from_b64(n[1].status()["public_key"].as_str().unwrap()).unwrap())
        .collect();
    let members = Members::new(keys.iter().copied()).unwrap();
    // How many of the shards each node should hold in the end.
    let mut want = [0u64; 4];
    for a in &addrs {
        for k in holders(a.as_bytes(), &members, 3).unwrap() {
            want[keys.iter().position(|x| *x == k).unwrap()] += 1;
        }
    }
    let held = |nodes: &[Vec<Arc<NodeHandle>>]| -> Vec<u64> {
        nodes
            .iter()
            .map(|n| n[1].status()["store"]["shards"].as_u64().unwrap_or(0))
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if held(&nodes) == want {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            for n in &nodes {
                eprintln!("{}", n[1].status());
            }
            panic!("shards held {:?}, want {want:?}", held(&nodes));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The shards crossed as binary frames, and nothing was refused on the way.
    let first = nodes[0][1].status();
    assert!(
        first["transfers"]["shards_out"].as_u64().unwrap() >= 1,
        "{first}"
    );
    for n in &nodes {
        let st = n[1].status();
        assert_eq!(st["transfers"]["bad_shards"], 0, "{st}");
    }
}
