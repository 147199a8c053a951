//! Unit tests of the repair planner driven by hand (the simulation in `sim` drives many).

use proptest::prelude::*;

use super::placement::{Members, ShardAddr};
use super::repair::{RepairAction, RepairConfig, RepairPlanner};
use super::sim::{addr_of, keys};
use crate::identity::PublicKey;

const MIB: u64 = 1 << 20;

fn setup() -> (Members, ShardAddr, Vec<PublicKey>) {
    let m = Members::new(keys(21, 8)).expect("small");
    let a = addr_of(21, 0);
    let ranked: Vec<PublicKey> = m.top(&a, 8).into_iter().map(|x| x.key).collect();
    (m, a, ranked)
}

fn cfg() -> RepairConfig {
    RepairConfig {
        push_bytes_per_s: MIB,
        ..RepairConfig::default()
    }
}

fn queries(acts: &[RepairAction]) -> Vec<PublicKey> {
    acts.iter()
        .filter_map(|a| match a {
            RepairAction::Query { to, .. } => Some(*to),
            _ => None,
        })
        .collect()
}

#[test]
fn the_best_ranked_holder_pushes_each_missing_copy_once() {
    let (m, a, rk) = setup();
    let mut p = RepairPlanner::new(rk[0], cfg(), m).expect("cfg");
    p.hold_settled(a, 1000);
    assert_eq!(p.poll_timeout(), None, "a settled shard costs nothing");
    p.handle_hint(1_000, &a);
    let acts = p.poll_actions(1_000);
    assert_eq!(queries(&acts), vec![rk[1], rk[2]], "r - 1 queries");
    p.handle_report(1_050, &a, rk[1], true);
    p.handle_report(1_060, &a, rk[2], false);
    let acts = p.poll_actions(1_060);
    assert_eq!(
        acts,
        vec![RepairAction::Push {
            addr: a,
            to: rk[2],
            size: 1000
        }]
    );
    assert!(
        p.poll_actions(5_000).is_empty(),
        "no second push while one is in flight"
    );
    p.handle_push_done(6_000, &a, rk[2], true);
    assert!(p.poll_actions(6_000).is_empty());
    assert_eq!(p.poll_timeout(), None, "settled again");
}

#[test]
fn a_lower_ranked_holder_defers_to_the_one_above() {
    let (m, a, rk) = setup();
    let c = cfg();
    let mut p = RepairPlanner::new(rk[1], c.clone(), m).expect("cfg");
    p.hold_settled(a, 1000);
    p.handle_hint(0, &a);
    assert_eq!(queries(&p.poll_actions(0)), vec![rk[0], rk[2]]);
    p.handle_report(10, &a, rk[0], true);
    p.handle_report(10, &a, rk[2], false);
    assert!(
        p.poll_actions(10).is_empty(),
        "rank 0 holds it: not ours to push"
    );
    assert_eq!(p.poll_timeout(), Some(10 + c.recheck_ms));
    // The coordinator died without pushing: at the re-check we take over.
    p.set_members(20, p.members().apply(&[], &[rk[0]]).expect("small"));
    let acts = p.poll_actions(20);
    assert!(
        acts.contains(&RepairAction::Query { addr: a, to: rk[3] }),
        "{acts:?}"
    );
    p.handle_report(30, &a, rk[3], false);
    let acts = p.poll_actions(30);
    assert_eq!(
        acts,
        vec![
            RepairAction::Push {
                addr: a,
                to: rk[2],
                size: 1000
            },
            RepairAction::Push {
                addr: a,
                to: rk[3],
                size: 1000
            }
        ]
    );
}

#[test]
fn a_surplus_copy_is_dropped_only_after_grace_and_fresh_confirmation() {
    let (m, a, rk) = setup();
    let c = cfg();
    let mut p = RepairPlanner::new(rk[3], c.clone(), m).expect("cfg");
    p.hold(0, a, 1000);
    let t = c.new_check_ms;
    assert_eq!(queries(&p.poll_actions(t)), vec![rk[0], rk[1], rk[2]]);
    for k in &rk[..3] {
        p.handle_report(t, &a, *k, true);
    }
    assert!(
        p.poll_actions(t).is_empty(),
        "never drop before the grace period"
    );
    let t2 = t + c.drop_grace_ms;
    assert_eq!(p.poll_timeout(), Some(t2));
    // The confirmations are stale by then: ask again, drop only on fresh answers.
    assert_eq!(queries(&p.poll_actions(t2)).len(), 3);
    p.handle_report(t2 + 10, &a, rk[0], true);
    p.handle_report(t2 + 10, &a, rk[1], false); // lost its copy meanwhile
    p.handle_report(t2 + 10, &a, rk[2], true);
    let acts = p.poll_actions(t2 + 10);
    assert!(
        !acts.iter().any(|x| matches!(x, RepairAction::Drop { .. })),
        "{acts:?}"
    );
    assert!(p.holds(&a));
    p.handle_report(t2 + 20, &a, rk[1], true);
    assert!(
        p.poll_actions(t2 + 20).is_empty(),
        "the grace clock restarted"
    );
    let t3 = t2 + 20 + c.drop_grace_ms;
    let _ = p.poll_actions(t3);
    for k in &rk[..3] {
        p.handle_report(t3 + 5, &a, *k, true);
    }
    assert_eq!(p.poll_actions(t3 + 5), vec![RepairAction::Drop { addr: a }]);
    assert!(!p.holds(&a));
}

#[test]
fn pushes_stay_within_the_byte_budget() {
    let (m, _, _) = setup();
    let own = m.keys()[0];
    let mut p = RepairPlanner::new(own, cfg(), m.clone()).expect("cfg");
    let mut addrs = Vec::new();
    for i in 0..1_000 {
        let a = addr_of(22, i);
        if m.top(&a, 3)[0].key == own {
            p.hold_settled(a, MIB / 4);
            p.handle_hint(0, &a);
            addrs.push(a);
        }
    }
    assert!(addrs.len() > 80, "more work than 20 s of budget");
    let mut pushed = 0u64;
    for t in (0..=20_000).step_by(100) {
        for act in p.poll_actions(t) {
            match act {
                RepairAction::Query { addr, to } => p.handle_report(t, &addr, to, false),
                RepairAction::Push { size, .. } => pushed += size,
                _ => {}
            }
        }
        // At most the rate plus one second of burst (and one shard of debt).
        assert!(pushed <= MIB * t / 1000 + MIB + MIB / 4, "{pushed} by {t}");
    }
    assert!(pushed >= MIB * 19, "the budget is used: {pushed}");
}

#[test]
fn corrupt_copy_is_fetched_from_the_best_holder() {
    let (m, a, rk) = setup();
    let mut p = RepairPlanner::new(rk[2], cfg(), m).expect("cfg");
    p.hold_settled(a, 1000);
    p.handle_corrupt(0, &a);
    assert!(!p.holds(&a));
    assert_eq!(queries(&p.poll_actions(0)), vec![rk[0], rk[1]]);
    p.handle_report(5, &a, rk[0], false);
    p.handle_report(5, &a, rk[1], true);
    assert_eq!(
        p.poll_actions(5),
        vec![RepairAction::Fetch {
            addr: a,
            from: rk[1]
        }]
    );
    p.hold(100, a, 1000);
    assert!(p.holds(&a));
}

#[test]
fn bad_config_is_refused() {
    let (m, _, rk) = setup();
    let e = RepairPlanner::new(
        rk[0],
        RepairConfig {
            replicas: 0,
            ..cfg()
        },
        m.clone(),
    );
    assert_eq!(e.map(|_| ()).map_err(|e| e.code()), Err("bad_replicas"));
    let e = RepairPlanner::new(
        rk[0],
        RepairConfig {
            push_bytes_per_s: 0,
            ..cfg()
        },
        m,
    );
    assert_eq!(e.map(|_| ()).map_err(|e| e.code()), Err("zero_budget"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The incrementally updated ranking cache always equals a fresh ranking's prefix.
    #[test]
    fn cached_ranking_matches_a_fresh_one(ops in proptest::collection::vec((any::<bool>(), 0usize..60), 1..40)) {
        let pool = keys(23, 60);
        let own = pool[0];
        let mut m = Members::new(pool[..20].iter().copied()).expect("small");
        let mut p = RepairPlanner::new(own, RepairConfig::default(), m.clone()).expect("cfg");
        let addrs: Vec<ShardAddr> = (0..16).map(|i| addr_of(24, i)).collect();
        for a in &addrs {
            p.hold_settled(*a, 1);
        }
        for (add, i) in ops {
            let k = pool[i];
            if k == own { continue; }
            m = if add { m.apply(&[k], &[]) } else { m.apply(&[], &[k]) }.expect("small");
            p.set_members(0, m.clone());
            for a in &addrs {
                let cached = p.ranks_of(a).expect("held");
                let fresh: Vec<_> = m.top(a, cached.len()).into_iter().map(|x| x.key).collect();
                prop_assert_eq!(&cached, &fresh);
                prop_assert!(cached.len() >= 4.min(m.len()));
            }
        }
    }
}

/// Reports from keys the shard's ranking does not name and we never asked are ignored: a
/// stranger cannot grow the planner's memory or steer it with "has" answers.
#[test]
fn reports_from_strangers_are_ignored() {
    let (m, a, rk) = setup();
    let mut p = RepairPlanner::new(rk[0], cfg(), m).expect("cfg");
    p.hold_settled(a, 1000);
    p.handle_hint(1_000, &a);
    let acts = p.poll_actions(1_000);
    assert_eq!(queries(&acts), vec![rk[1], rk[2]]);
    // 500 fresh keys each say they lack it: nothing changes, no push to any of them.
    for stranger in keys(99, 500) {
        p.handle_report(1_010, &a, stranger, false);
    }
    p.handle_report(1_050, &a, rk[1], true);
    p.handle_report(1_060, &a, rk[2], true);
    let acts = p.poll_actions(1_060);
    assert!(
        acts.iter().all(|x| !matches!(x, RepairAction::Push { .. })),
        "{acts:?}"
    );
}
