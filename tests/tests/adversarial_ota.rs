//! Updates against an outsider's fresh key, on 2 real `borg node` processes (127.71.0.x)
//! trusting a 2-of-3 maintainer root: the outsider publishes releases with its own
//! approvals, with approvals forged under maintainer key ids, with expired ones, oversized
//! and malformed files, a downgrade; it offers a genuine release over its own TLS link to
//! the base tree port. Every attempt is refused, nothing is kept, and replaying a genuine
//! release makes no new broadcast.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use borg_net::node::now_ms;
use borg_ota::release::ImageRef;
use borg_ota::{Approval, FetchId, Manifest, ReleaseFile, Root, Sha256Hex, SignedRoot};
use borg_proto::identity::SecretKey;
use borg_tests::outsider::{node_key, Outsider};
use borg_tests::{metric, wait_for, Net};
use serde_json::{json, Value};

const DAY: u64 = 86_400_000;

fn manifest(version: &str, notes: &str) -> Manifest {
    let sha256 = Sha256Hex::of(b"an image");
    Manifest {
        tag: Default::default(),
        version: version.parse().unwrap(),
        boards: vec![borg_ota::Board::new("qemu-virt").unwrap()],
        image: ImageRef { sha256, size: 8 },
        min_version: "0.0.1".parse().unwrap(),
        expires_ms: now_ms() + 30 * DAY,
        notes: notes.to_string(),
        fetch: FetchId::content(&sha256),
    }
}

fn release(m: &Manifest, approvals: Vec<Approval>) -> Value {
    serde_json::to_value(ReleaseFile {
        manifest: m.clone(),
        approvals,
    })
    .unwrap()
}

/// `release.publish` signed by `key` at node `i`: (HTTP status, answer or error object).
fn publish(
    rt: &tokio::runtime::Runtime,
    net: &Net,
    i: usize,
    key: &SecretKey,
    body: Value,
) -> (u16, Value) {
    let addr: SocketAddr = format!("{}:13305", net.ip(i)).parse().unwrap();
    borg_tests::outsider::receptor_call(rt, addr, key, "release.publish", body)
}

fn pending(net: &Net, i: usize) -> usize {
    net.status(i).unwrap()["update"]["pending"]
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn an_outsider_cannot_store_forge_or_amplify_releases() {
    let maintainers: Vec<SecretKey> = (0..3).map(|_| SecretKey::generate()).collect();
    let mut root = SignedRoot::unsigned(
        Root::new(1, maintainers.iter().map(|k| k.public()).collect(), 2).unwrap(),
    );
    for k in &maintainers {
        root.sign(k);
    }
    let tmp = tempfile::tempdir().unwrap();
    let root_path = tmp.path().join("root.json");
    std::fs::write(&root_path, root.encode()).unwrap();

    let mut net = Net::new(71, 500, 3);
    net.env
        .push(("BORG_OTA_ROOT".into(), root_path.display().to_string()));
    net.spawn(0, None);
    net.wait_up(0);
    net.spawn(1, Some(0));
    net.wait_tree(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no tree: {e}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let outsider = SecretKey::generate();
    let m = manifest("0.2.0", "");
    let genuine = Approval::sign(&maintainers[0], &m, m.expires_ms);

    let refused = |body: Value, status: u16, code: &str, what: &str| {
        let (st, v) = publish(&rt, &net, 1, &outsider, body);
        assert_eq!(
            (st, v["error"].as_str()),
            (status, Some(code)),
            "{what}: {v}"
        );
    };
    // Its own approval; approvals forged under each maintainer's key id; an expired one.
    refused(
        json!({"release": release(&m, vec![Approval::sign(&outsider, &m, m.expires_ms)])}),
        403,
        "forbidden",
        "the outsider's own approval",
    );
    let forged: Vec<Approval> = maintainers
        .iter()
        .map(|k| {
            let mut a = Approval::sign(&outsider, &m, m.expires_ms);
            a.key = k.public();
            a
        })
        .collect();
    refused(
        json!({"release": release(&m, forged)}),
        403,
        "forbidden",
        "forged approvals",
    );
    let stale = Approval::sign(&maintainers[1], &m, now_ms() - DAY);
    refused(
        json!({"release": release(&m, vec![stale])}),
        403,
        "forbidden",
        "an expired approval",
    );
    // A genuine approval of another manifest does not carry over to a changed one.
    let changed = manifest("0.2.0", "changed after approval");
    refused(
        json!({"release": release(&changed, vec![genuine.clone()])}),
        403,
        "forbidden",
        "an approval of another manifest",
    );
    // Malformed and oversized files are refused at decode time.
    refused(json!({}), 400, "malformed", "no release");
    refused(
        json!({"release": release(&manifest("0.2.0", &"x".repeat(5000)), vec![])}),
        400,
        "malformed",
        "notes over 4096 bytes",
    );
    refused(
        json!({"release": {"junk": "y".repeat(100_000)}}),
        400,
        "malformed",
        "100 kB of junk",
    );
    // A maintainer-approved downgrade is refused by this node.
    let old = manifest("0.0.1", "");
    refused(
        json!({"release": release(&old, vec![Approval::sign(&maintainers[0], &old, old.expires_ms)])}),
        409,
        "refused",
        "a downgrade",
    );
    assert_eq!((pending(&net, 0), pending(&net, 1)), (0, 0));

    // A genuine release offered by the outsider over its own TLS link to the base tree: it
    // is not a tree neighbour, so the offer is refused before it is read.
    let key1 = node_key(&net, 1);
    let forbidden = |net: &Net| {
        metric(&net.metrics(1), "borg_rejected_total{reason=\"forbidden\"}").unwrap_or(0)
    };
    let before = forbidden(&net);
    let out = Outsider::new("127.71.0.250:13300");
    rt.block_on(async {
        let addr: SocketAddr = format!("{}:13300", net.ip(1)).parse().unwrap();
        let mut c = borg_net::conn::connect(addr, key1, &out.identity, Duration::from_secs(5))
            .await
            .unwrap();
        let body = json!({"release": release(&m, vec![genuine.clone()])});
        c.send(&out.frame("release.offer", body)).await.unwrap();
    });
    wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        (forbidden(&net) > before).then_some(())
    })
    .expect("the outsider's release.offer was not refused");
    assert_eq!(metric(&net.metrics(1), "borg_ota_offers_in_total"), Some(0));
    assert_eq!(pending(&net, 1), 0);

    // Anyone may hand a node a genuine release (the approvals speak for it), once: the
    // replay is taken, changes nothing and is not broadcast again.
    let delivered = |net: &Net| {
        net.status(0).unwrap()["delivered_broadcasts"]
            .as_u64()
            .unwrap()
    };
    let d0 = delivered(&net);
    let body = json!({"release": release(&m, vec![genuine.clone()])});
    let (st, v) = publish(&rt, &net, 1, &outsider, body.clone());
    assert_eq!(
        (st, v["broadcast"].as_bool(), v["added"].as_u64()),
        (200, Some(true), Some(1)),
        "{v}"
    );
    wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        (pending(&net, 0) == 1).then_some(())
    })
    .expect("node 0 never gathered the genuine release");
    for _ in 0..5 {
        let (st, v) = publish(&rt, &net, 1, &outsider, body.clone());
        assert_eq!(
            (st, v["broadcast"].as_bool(), v["added"].as_u64()),
            (200, Some(false), Some(0)),
            "{v}"
        );
    }
    // A further broadcast would be delivered within milliseconds; a text broadcast sent now
    // must be the only new delivery at node 0.
    let mark = net.broadcast(1, "marker");
    assert!(mark.status.success());
    wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        (delivered(&net) >= d0 + 2).then_some(())
    })
    .expect("the release and the marker were not delivered");
    assert_eq!(delivered(&net), d0 + 2, "the replays made broadcasts");
    let u = net.status(0).unwrap()["update"].clone();
    assert_eq!(u["pending"][0]["counted"], 1, "{u}");
    assert_eq!(u["pending"][0]["approved"], false, "{u}");
}
