//! Simulation tests of the tree protocol: joins, storms, crashes, partitions, broadcast.

use super::sim::{Sim, SimConfig};
use super::TreeConfig;
use serde_json::json;

const HB: u64 = 1000;

fn tree_cfg(k: u64) -> TreeConfig {
    TreeConfig::new(k, HB)
}

/// Node 0 starts alone; nodes 1..n join through node 0 (and a few random earlier nodes)
/// all at the same instant.
fn storm(n: usize, k: u64, cfg: SimConfig) -> Sim {
    let mut sim = Sim::new(cfg, tree_cfg(k));
    sim.add_node(&[]);
    for i in 1..n {
        let other = (i * 7919) % i;
        sim.add_node(&[0, other]);
    }
    sim.start(0);
    for i in 1..n {
        sim.start(i);
    }
    sim
}

fn converge(sim: &mut Sim, within_ms: u64) -> u64 {
    let deadline = sim.now + within_ms;
    match sim.run_until_converged(deadline) {
        Ok(t) => t,
        Err(e) => panic!("{e}; states {:?}", sim.states()),
    }
}

/// Converge, then let heartbeats carry the news to every level so every node's view is
/// current (a "stable" tree).
fn settle(sim: &mut Sim, within_ms: u64) -> u64 {
    let t = converge(sim, within_ms);
    let depth = sim.check_tree().unwrap().depth as u64;
    let until = sim.now + (depth + 2) * HB + 1;
    sim.run_until(until).unwrap();
    sim.check_tree().unwrap();
    sim.check_root_agreement().unwrap();
    t
}

#[test]
fn lone_node_is_a_working_root_of_one() {
    let mut sim = Sim::new(SimConfig::default(), tree_cfg(3));
    sim.add_node(&[]);
    sim.start(0);
    converge(&mut sim, 1);
    assert_eq!(sim.nodes[0].node.state().as_str(), "alone");
    let id = sim.broadcast_from(0, json!("hi"));
    assert_eq!(sim.delivery_count(&id), (1, 1));
}

#[test]
fn storm_of_200_with_safety_checked_after_every_event() {
    let cfg = SimConfig {
        check_every_event: true,
        ..SimConfig::default()
    };
    let mut sim = storm(200, 3, cfg);
    converge(&mut sim, 30 * HB);
    let s = sim.check_tree().unwrap();
    assert_eq!(s.size, 200);
}

#[test]
fn broadcast_takes_exactly_n_minus_1_transmissions_from_any_node() {
    let mut sim = storm(120, 4, SimConfig::default());
    converge(&mut sim, 30 * HB);
    for origin in [0usize, 17, 119] {
        let before = sim.stats.broadcast_transmissions;
        let id = sim.broadcast_from(origin, json!({"n": origin}));
        let t = sim.now + 2 * HB;
        sim.run_until(t).unwrap();
        assert_eq!(sim.delivery_count(&id), (120, 1), "every node exactly once");
        assert_eq!(sim.stats.broadcast_transmissions - before, 119);
    }
}

#[test]
fn leaf_branch_and_root_crashes_are_repaired() {
    let mut sim = storm(60, 3, SimConfig::default());
    settle(&mut sim, 30 * HB);
    let n = sim.alive_count() as u64;
    for pos in [n - 3, 3, 1] {
        let victim = sim.holder_of(pos).unwrap();
        sim.crash(victim);
        let took = settle(&mut sim, 20 * HB);
        assert!(took <= 2 * HB, "repair of position {pos} took {took} ms");
        let id = sim.broadcast_from(sim.holder_of(2).unwrap(), json!("after"));
        let t = sim.now + HB;
        sim.run_until(t).unwrap();
        assert_eq!(sim.delivery_count(&id).0, sim.alive_count());
    }
}

#[test]
fn silent_crashes_are_found_by_timeouts() {
    let cfg = SimConfig {
        loud_crashes: false,
        ..SimConfig::default()
    };
    let mut sim = storm(40, 3, cfg);
    converge(&mut sim, 30 * HB);
    for pos in [5, 1] {
        let v = sim.holder_of(pos).unwrap();
        sim.crash(v);
        converge(&mut sim, 30 * HB);
    }
}

#[test]
fn ten_percent_random_crash_is_repaired() {
    let mut sim = storm(300, 5, SimConfig::default());
    converge(&mut sim, 30 * HB);
    let mut victims: Vec<usize> = (0..300)
        .filter(|i| (i * 2654435761usize) % 10 == 3)
        .collect();
    victims.truncate(30);
    for v in victims {
        sim.crash(v);
    }
    converge(&mut sim, 120 * HB);
    assert_eq!(sim.check_tree().unwrap().size, 270);
}

#[test]
fn split_network_heals_into_one_tree() {
    let mut sim = storm(50, 3, SimConfig::default());
    converge(&mut sim, 30 * HB);
    sim.partition(|i| (i % 2) as u8);
    // Each half repairs into its own tree.
    let t = sim.now + 20 * HB;
    sim.run_until(t).unwrap();
    let roots = sim
        .nodes
        .iter()
        .filter(|n| n.node.view().position == Some(1))
        .count();
    assert!(
        roots >= 2,
        "both halves should be running as trees, got {roots} roots"
    );
    sim.heal();
    converge(&mut sim, 200 * HB);
}

#[test]
fn lossy_network_still_converges() {
    let cfg = SimConfig {
        loss_ppm: 5_000,
        ..SimConfig::default()
    };
    let mut sim = storm(100, 4, cfg);
    converge(&mut sim, 120 * HB);
    let v = sim.holder_of(7).unwrap();
    sim.crash(v);
    converge(&mut sim, 120 * HB);
}

#[test]
fn killed_node_that_restarts_rejoins() {
    let mut sim = storm(20, 3, SimConfig::default());
    converge(&mut sim, 30 * HB);
    let v = sim.holder_of(6).unwrap();
    sim.crash(v);
    converge(&mut sim, 20 * HB);
    sim.restart(v, &[0]);
    converge(&mut sim, 20 * HB);
    assert_eq!(sim.check_tree().unwrap().size, 20);
}

#[test]
fn join_costs_stay_within_4_depth_plus_8() {
    let mut sim = Sim::new(SimConfig::default(), tree_cfg(4));
    sim.add_node(&[]);
    sim.start(0);
    converge(&mut sim, HB);
    for i in 1..200usize {
        sim.add_node(&[(i * 31) % i]);
        let before = sim.stats.topology_messages;
        sim.start(i);
        converge(&mut sim, 10 * HB);
        let cost = sim.stats.topology_messages - before;
        let budget = Sim::join_budget(i as u64 + 1, 4);
        assert!(cost <= budget, "join {i} cost {cost} > {budget}");
    }
}

#[test]
fn storm_of_10000_simultaneous_joins_reaches_one_complete_tree() {
    let mut sim = storm(10_000, 10, SimConfig::default());
    let took = converge(&mut sim, 120 * HB);
    let s = sim.check_tree().unwrap();
    assert_eq!(s.size, 10_000);
    assert_eq!(s.depth, 4);
    let per_join = sim.stats.topology_messages as f64 / 9_999.0;
    let budget = Sim::join_budget(10_000, 10) as f64;
    assert!(
        per_join <= budget,
        "{per_join:.1} messages per join > {budget}"
    );
    eprintln!("10k storm: converged in {took} ms virtual, {per_join:.2} msgs/join");
}

#[test]
fn ten_percent_of_2000_crashing_at_once_is_repaired() {
    let mut sim = storm(2000, 10, SimConfig::default());
    settle(&mut sim, 30 * HB);
    for v in (0..2000).filter(|i| (i * 2654435761usize) % 10 == 7) {
        sim.crash(v);
    }
    converge(&mut sim, 120 * HB);
    assert_eq!(sim.check_tree().unwrap().size, 1800);
}

#[test]
fn repairs_hold_across_seeds() {
    for seed in 2..10u64 {
        let cfg = SimConfig {
            seed,
            ..SimConfig::default()
        };
        let mut sim = storm(40, 3, cfg);
        settle(&mut sim, 30 * HB);
        for pos in [30u64, 2, 1] {
            let victim = sim.holder_of(pos).unwrap();
            sim.crash(victim);
            let took = settle(&mut sim, 30 * HB);
            assert!(
                took <= 2 * HB,
                "seed {seed}: repair of {pos} took {took} ms"
            );
        }
        for v in [5usize, 11, 17, 23] {
            sim.crash(v);
        }
        converge(&mut sim, 60 * HB);
    }
}

#[test]
fn separate_trees_that_meet_on_a_lan_merge_into_one() {
    // Two groups that started with no contact between them (two LANs' trees), then one node
    // of each hears the other's beacon.
    let mut sim = Sim::new(SimConfig::default(), tree_cfg(2));
    sim.add_node(&[]);
    for _ in 1..5 {
        sim.add_node(&[0]);
    }
    sim.add_node(&[]);
    for _ in 6..9 {
        sim.add_node(&[5]);
    }
    for i in 0..9 {
        sim.start(i);
    }
    let t = sim.now + 10 * HB;
    sim.run_until(t).unwrap();
    let roots = sim
        .nodes
        .iter()
        .filter(|n| n.node.view().position == Some(1))
        .count();
    assert_eq!(roots, 2, "two separate trees before they meet");
    sim.meet(7, 3);
    sim.meet(3, 7);
    settle(&mut sim, 60 * HB);
    assert_eq!(sim.check_tree().unwrap().size, 9);
    let id = sim.broadcast_from(8, json!("across"));
    let t = sim.now + 5 * HB;
    sim.run_until(t).unwrap();
    assert_eq!(sim.delivery_count(&id), (9, 1));
}

#[test]
fn a_changed_address_reaches_the_neighbours_records() {
    let mut sim = storm(7, 2, SimConfig::default());
    settle(&mut sim, 30 * HB);
    let child = sim.holder_of(4).unwrap();
    let parent = sim.holder_of(2).unwrap();
    let key = sim.nodes[child].key;
    sim.nodes[parent].node.peer_addr_changed(&key, "sim:moved");
    let view = sim.nodes[parent].node.view();
    let rec = view.children.iter().find(|c| c.peer.key == key).unwrap();
    assert_eq!(rec.peer.addr, "sim:moved");
    sim.nodes[child].node.set_my_addr("sim:moved".into());
    assert_eq!(sim.nodes[child].node.me().addr, "sim:moved");
}
