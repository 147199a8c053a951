//! Outsiders with fresh keys against network time, on real `borg node` processes: forged
//! `time.ans` (nonces nobody asked for), a `time.req` flood from several keys and links (each
//! answer costs the node a signature), and a stale tree message on the cronoTree link (the
//! nonce-fresh exemption is for `time.*` only). The node's time does not move, its answers stay
//! within the rate bound, the trees stay whole, a newcomer still joins and syncs during the
//! attack, and memory stays bounded.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use borg_net::conn;
use borg_proto::envelope;
use borg_tests::outsider::{self, Outsider};
use borg_tests::{metric, wait_for, Net};
use serde_json::json;

const CRONO_MON: u16 = 13398;
const RSS_BOUND_KIB: u64 = 64 * 1024;

fn synced_error_ms(net: &Net, i: usize) -> Option<f64> {
    let st = net.cell_status(i, CRONO_MON)?;
    (st["time"]["synced"] == true).then(|| st["time"]["system_offset_ms"].as_f64().unwrap())
}

#[test]
fn forged_answers_and_a_request_flood_do_not_move_time_or_stop_the_node() {
    let mut net = Net::new(33, 500, 3);
    net.spawn(0, None);
    net.wait_up(0);
    net.spawn(1, Some(0));
    net.spawn(2, Some(0));
    net.wait_tree(Duration::from_secs(30)).unwrap();
    wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        net.check_cell_tree(CRONO_MON, 3).ok().filter(|t| t.0 == 3)
    })
    .expect("cronoTree of 3");
    let victim = 1;
    wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        synced_error_ms(&net, victim).filter(|e| e.abs() < 20.0)
    })
    .expect("victim synced");
    let target = outsider::targets(&net)
        .into_iter()
        .find(|t| t.node == victim)
        .unwrap();

    // Eight outsiders, each with its own link to the victim's cronoTree: half through the
    // base port (routed by ALPN), half straight to the cronoTree port.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answers = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let attack = {
        let answers = answers.clone();
        let sent = sent.clone();
        let target = target.clone();
        rt.spawn(async move {
            let mut tasks = Vec::new();
            for o in 0..8u16 {
                let answers = answers.clone();
                let sent = sent.clone();
                let target = target.clone();
                tasks.push(tokio::spawn(async move {
                    let out = Outsider::new("127.33.9.9:13396");
                    let addr = if o % 2 == 0 {
                        target.addr
                    } else {
                        std::net::SocketAddr::new(target.addr.ip(), 13396)
                    };
                    let Ok(c) = conn::connect_cell(
                        addr,
                        Some(target.key),
                        "cronoTree",
                        &out.identity,
                        Duration::from_secs(5),
                    )
                    .await
                    else {
                        return;
                    };
                    let (mut r, mut w) = c.into_split();
                    let reader = tokio::spawn(async move {
                        while let Ok(Ok(Some(f))) =
                            tokio::time::timeout(Duration::from_secs(5), r.recv()).await
                        {
                            if let Ok(env) = envelope::verify_signature_only(&f) {
                                if env.into_inner().kind == "time.ans" {
                                    answers.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    });
                    for n in 0..300u32 {
                        let mut nonce = [0u8; 16];
                        nonce[..4].copy_from_slice(&n.to_le_bytes());
                        nonce[4..6].copy_from_slice(&o.to_le_bytes());
                        let b64 = borg_proto::crono::msg::Nonce::from_bytes(nonce).to_b64();
                        // A forged answer to a request nobody made, claiming the year 2000.
                        let forged = out.frame(
                            "time.ans",
                            json!({"nonce": b64, "rx_us": 946_684_800_000_000u64,
                                   "tx_us": 946_684_800_000_100u64, "stratum": 0,
                                   "synced": true, "err_us": 0}),
                        );
                        let req = out.frame("time.req", json!({ "nonce": b64 }));
                        if w.send(&forged).await.is_err() || w.send(&req).await.is_err() {
                            break;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    // A tree message a day old: the ts window still applies to it.
                    let stale = envelope::seal(
                        &out.key,
                        "tree.join",
                        Some(&out.peer.addr),
                        borg_net::node::now_ms() - 86_400_000,
                        json!({"peer": {"key": out.key.public().to_b64(), "addr": out.peer.addr, "mon": ""}}),
                    );
                    let _ = w.send(&stale.to_bytes()).await;
                    let _ = reader.await;
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };

    // During the attack a newcomer joins both trees and syncs.
    net.spawn_with(3, Some(victim), &["--clock-offset-s", "-1700000000"]);
    let newcomer = wait_for(Duration::from_secs(40), Duration::from_millis(200), || {
        synced_error_ms(&net, 3).filter(|e| e.abs() < 50.0)
    });
    assert!(
        newcomer.is_some(),
        "newcomer did not sync during the attack: {:?}",
        net.cell_status(3, CRONO_MON)
    );
    println!(
        "newcomer synced {:.1} ms from the network, {:.1} s into the attack",
        newcomer.unwrap_or_default(),
        started.elapsed().as_secs_f64()
    );
    rt.block_on(attack).unwrap();
    let secs = started.elapsed().as_secs_f64();
    let (n_sent, n_ans) = (
        sent.load(Ordering::Relaxed),
        answers.load(Ordering::Relaxed),
    );
    println!("sent {n_sent} forged answers and requests in {secs:.1} s; answered {n_ans}");
    assert!(n_sent >= 1000, "the attack did not get going: {n_sent}");
    // 200 answers a second at most (plus the saved-up second).
    assert!(
        (n_ans as f64) <= 200.0 * secs + 200.0,
        "{n_ans} answers in {secs:.1} s"
    );

    // Time did not move, the trees are whole, everything was counted.
    let err = synced_error_ms(&net, victim).expect("victim still synced");
    assert!(err.abs() < 20.0, "victim's time moved: {err} ms");
    net.wait_tree(Duration::from_secs(30)).unwrap();
    let crono = wait_for(Duration::from_secs(30), Duration::from_millis(200), || {
        net.check_cell_tree(CRONO_MON, 3).ok().filter(|t| t.0 == 4)
    });
    assert!(crono.is_some(), "cronoTree not whole after the attack");
    let st = net.cell_status(victim, CRONO_MON).unwrap();
    assert!(
        st["time"]["rejected"].as_u64().unwrap() >= n_sent / 2,
        "forged answers not counted: {st}"
    );
    let crono_m = borg_tests::http_get(
        std::net::SocketAddr::new(net.ip(victim).into(), CRONO_MON),
        "/metrics",
    )
    .unwrap();
    let forbidden = metric(&crono_m, "borg_rejected_total{reason=\"forbidden\"}").unwrap_or(0);
    assert!(
        forbidden >= n_sent / 2,
        "forged answers not counted: {forbidden}"
    );
    assert!(
        metric(&crono_m, "borg_time_answers_refused_total").unwrap_or(0) > 0 || n_ans >= n_sent,
        "neither all answered nor any refused"
    );
    let stale = metric(&crono_m, "borg_rejected_total{reason=\"stale\"}").unwrap_or(0);
    assert!(
        stale >= 1,
        "the stale tree message was not refused as stale"
    );
    let rss = outsider::max_rss_kib(&net);
    println!("largest RSS after the attack: {} KiB", rss);
    assert!(rss < RSS_BOUND_KIB, "RSS {rss} KiB");
}
