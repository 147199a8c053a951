//! Adversarial inputs against real nodes: a forged signature, an altered body, a replayed
//! envelope, stale and future timestamps, an unknown kind, a frame signed by someone other than
//! the TLS peer, an oversized frame, garbage bytes (outside and inside TLS), and topology orders
//! from a node that is not entitled to give them. Each is rejected and counted in /metrics, and
//! the network keeps working: the tree stays whole and a broadcast still reaches everyone.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use borg_net::conn;
use borg_net::node::now_ms;
use borg_net::tls::TlsIdentity;
use borg_proto::envelope;
use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::tree::{Peer, Routed, TreeMsg};
use borg_tests::{metric, wait_for, Net};
use serde_json::json;
use tokio::io::AsyncWriteExt;

fn rejected(net: &Net, i: usize, reason: &str) -> u64 {
    metric(
        &net.metrics(i),
        &format!("borg_rejected_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0)
}

fn wait_rejected(net: &Net, i: usize, reason: &str, at_least: u64) {
    let got = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        (rejected(net, i, reason) >= at_least).then_some(())
    });
    assert!(
        got.is_some(),
        "reason {reason}: expected >= {at_least}, metrics:\n{}",
        net.metrics(i)
    );
}

fn tree_frame(key: &SecretKey, msg: &TreeMsg, ts: u64) -> Vec<u8> {
    let (kind, body) = msg.to_kind_body();
    envelope::seal(key, &kind, Some("127.9.9.9:13300"), ts, body).to_bytes()
}

#[test]
fn attacks_are_rejected_counted_and_the_network_keeps_working() {
    let mut net = Net::new(21, 1000, 2);
    net.spawn(0, None);
    net.wait_up(0);
    net.spawn(1, Some(0));
    net.spawn(2, Some(0));
    net.wait_tree(Duration::from_secs(30)).unwrap();
    let target = 1usize;
    let st = net.status(target).unwrap();
    let target_key = PublicKey::from_b64(st["public_key"].as_str().unwrap()).unwrap();
    let target_addr: SocketAddr = format!("{}:13300", net.ip(target)).parse().unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let attacker = SecretKey::generate();
    let identity = TlsIdentity::new(&attacker).unwrap();
    let me = Peer {
        key: attacker.public(),
        addr: "127.9.9.9:13300".into(),
        mon: String::new(),
    };

    rt.block_on(async {
        let mut c = conn::connect(target_addr, target_key, &identity, Duration::from_secs(5))
            .await
            .unwrap();
        let probe = TreeMsg::Probe {
            peer: me.clone(),
            nonce: 1,
        };

        // Forged signature: valid envelope, signature of another message.
        let good = envelope::seal(
            &attacker,
            "tree.probe",
            None,
            now_ms(),
            probe.to_kind_body().1,
        );
        let other = envelope::seal(&attacker, "tree.probe", None, now_ms(), json!({"x": 1}));
        let mut forged = good.clone();
        forged.sig = other.sig.clone();
        c.send(&forged.to_bytes()).await.unwrap();

        // Altered body after signing.
        let text = String::from_utf8(good.to_bytes()).unwrap();
        let tampered = text.replace("127.9.9.9:13300", "127.9.9.8:13300");
        assert_ne!(text, tampered);
        c.send(tampered.as_bytes()).await.unwrap();

        // Replay: the same valid envelope twice.
        let once = tree_frame(&attacker, &probe, now_ms());
        c.send(&once).await.unwrap();
        c.send(&once).await.unwrap();

        // Stale and future timestamps.
        c.send(&tree_frame(&attacker, &probe, now_ms() - 120_000))
            .await
            .unwrap();
        c.send(&tree_frame(&attacker, &probe, now_ms() + 120_000))
            .await
            .unwrap();

        // Unknown kind.
        let unknown = envelope::seal(&attacker, "tree.nope", None, now_ms(), json!({}));
        c.send(&unknown.to_bytes()).await.unwrap();

        // Signed by a key other than the TLS peer's.
        let stranger = SecretKey::generate();
        c.send(&tree_frame(&stranger, &probe, now_ms()))
            .await
            .unwrap();

        // Garbage inside a valid TLS frame.
        c.send(b"\x00\x01not json at all").await.unwrap();

        // Topology orders from a node that is not entitled: evict (only a parent may), an
        // attach routed in from a non-neighbour, and an adopt (only a grandparent may).
        let pos = st["position"].as_u64().unwrap();
        c.send(&tree_frame(&attacker, &TreeMsg::Evict { pos }, now_ms()))
            .await
            .unwrap();
        let attach = TreeMsg::Route {
            dest: pos,
            order: Routed::Attach {
                pos: pos * 2 + 1,
                peer: me.clone(),
                via: None,
            },
        };
        c.send(&tree_frame(&attacker, &attach, now_ms()))
            .await
            .unwrap();
        let adopt = TreeMsg::Adopt {
            parent_pos: 1,
            parent: me.clone(),
            seal: None,
        };
        c.send(&tree_frame(&attacker, &adopt, now_ms()))
            .await
            .unwrap();
        let dissolve = TreeMsg::Dissolve {
            contact: me.clone(),
        };
        c.send(&tree_frame(&attacker, &dissolve, now_ms()))
            .await
            .unwrap();

        // An oversized frame on a second connection: the header promises 8 MiB.
        let config = identity.client_config(target_key);
        let tcp = tokio::net::TcpStream::connect(target_addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(rustls::pki_types::ServerName::from(target_addr.ip()), tcp)
            .await
            .unwrap();
        tls.write_all(&(8u32 << 20).to_be_bytes()).await.unwrap();
        tls.write_all(&[0u8; 4096]).await.unwrap();
        tls.flush().await.unwrap();
        // Keep the first connection open until the node has read everything.
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(c);
    });

    // Garbage bytes that are not TLS at all.
    let mut raw = TcpStream::connect(target_addr).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01garbage")
        .unwrap();
    drop(raw);

    wait_rejected(&net, target, "bad_signature", 2);
    wait_rejected(&net, target, "replay", 1);
    wait_rejected(&net, target, "stale", 2);
    wait_rejected(&net, target, "unknown_kind", 1);
    wait_rejected(&net, target, "malformed", 1);
    wait_rejected(&net, target, "too_large", 1);
    wait_rejected(&net, target, "handshake", 1);
    // Stranger's frame + evict + routed attach + adopt + dissolve.
    wait_rejected(&net, target, "forbidden", 5);
    let unauthorized = metric(&net.metrics(target), "borg_tree_unauthorized_total").unwrap_or(0);
    assert!(
        unauthorized >= 4,
        "unauthorized orders counted: {unauthorized}"
    );

    // The network is unharmed: the same tree, and a broadcast reaches everyone once.
    net.check_tree().unwrap();
    let before = net.delivered();
    let out = net.broadcast(0, "still here");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        let now = net.delivered();
        now.iter().all(|(i, c)| *c == before[i] + 1).then_some(())
    });
    assert!(
        ok.is_some(),
        "broadcast after the attacks: {:?}",
        net.delivered()
    );
    assert_eq!(net.check_tree().unwrap().0, 3);
}

#[test]
fn receptor_and_monitor_refuse_bad_requests_with_clear_errors() {
    let mut net = Net::new(22, 1000, 2);
    net.spawn(0, None);
    net.wait_up(0);
    let recp: SocketAddr = format!("{}:13305", net.ip(0)).parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = SecretKey::generate();
    let post = |body: Vec<u8>| {
        rt.block_on(borg_net::client::receptor_post(recp, body))
            .unwrap()
    };

    // ping answers with an envelope signed by the node, re = our nonce.
    let ping = envelope::seal(&key, "ping", None, now_ms(), json!({}));
    let (status, body) = post(ping.to_bytes());
    assert_eq!(status, 200);
    let reply = envelope::verify_signature_only(&body).unwrap();
    assert_eq!(reply.body["re"], ping.nonce.as_str());
    assert_eq!(reply.body["cell"], "peerTreeNet");
    assert_eq!(
        reply.from.to_b64(),
        net.status(0).unwrap()["public_key"].as_str().unwrap()
    );

    let expect = |(status, body): (u16, Vec<u8>), code: u16, error: &str| {
        assert_eq!(status, code, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], error);
        assert!(!v["message"].as_str().unwrap().is_empty());
    };
    expect(post(b"{not json".to_vec()), 400, "malformed");
    expect(post(ping.to_bytes()), 409, "replay");
    let stale = envelope::seal(&key, "ping", None, now_ms() - 60_000, json!({}));
    expect(post(stale.to_bytes()), 409, "stale");
    let unknown = envelope::seal(&key, "launch.missiles", None, now_ms(), json!({}));
    expect(post(unknown.to_bytes()), 400, "unknown_kind");
    let mut forged = envelope::seal(&key, "ping", None, now_ms(), json!({}));
    forged.body = json!({"changed": true});
    expect(post(forged.to_bytes()), 401, "bad_signature");
    expect(post(vec![b' '; (1 << 20) + 10]), 413, "too_large");

    // The monitor is read-only.
    let mut s = TcpStream::connect(net.mon(0)).unwrap();
    s.write_all(
        b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    // And the node still answers.
    assert_eq!(net.status(0).unwrap()["state"], "alone");
}
