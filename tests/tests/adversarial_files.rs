//! Storage against an outsider's fresh key, on 3 real `borg node` processes (127.52.0.x,
//! `BORG_SHARD_QUICK=1`): an owner stores a small file through the receptors; a stranger then
//! tries to store the owner's manifest as their own, delete it, read it, list it, send shards
//! over the size limit, and speak the shard and file trees' peer messages over TLS without
//! being a member. Every attempt is refused (and counted), and the owner still gets the file.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use borg_files::{
    encrypt_reader, seal_delete, seal_manifest, wrap_key, FileKey, Manifest, UserKeys,
};
use borg_net::conn;
use borg_net::node::now_ms;
use borg_proto::envelope;
use borg_proto::identity::SecretKey;
use borg_tests::outsider::{node_key, receptor_call as call, Outsider};
use borg_tests::{wait_for, Net};
use serde_json::json;

const SHARD_MON: u16 = 13340;
const FTREE_MON: u16 = 13341;

/// Peer messages the storage cells of all 3 nodes refused as from a non-member.
fn not_member_refused(net: &Net) -> u64 {
    let of = |i: usize, mon: u16| {
        net.cell_status(i, mon).unwrap()["members"]["not_member_refused"]
            .as_u64()
            .unwrap()
    };
    (0..3).map(|i| of(i, FTREE_MON) + of(i, SHARD_MON)).sum()
}

/// Three nodes on 127.`subnet`.0.x with quick storage timings, once both storage cells have
/// their 3 members.
fn three_storage_nodes(subnet: u8) -> Net {
    let mut net = Net::new(subnet, 500, 3);
    net.env.push(("BORG_SHARD_QUICK".into(), "1".into()));
    net.spawn(0, None);
    net.wait_up(0);
    net.spawn(1, Some(0));
    net.spawn(2, Some(0));
    net.wait_tree(Duration::from_secs(60)).unwrap();
    wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
        (0..3)
            .all(|i| {
                net.cell_status(i, SHARD_MON).unwrap_or_default()["members"]["placeable"] == 3
                    && net.cell_status(i, FTREE_MON).unwrap_or_default()["members"]["placeable"]
                        == 3
            })
            .then_some(())
    })
    .expect("members never complete");
    net
}

#[test]
fn a_stranger_cannot_store_delete_read_or_list_anothers_files() {
    let net = three_storage_nodes(52);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shard_recp = |i: usize| SocketAddr::new(net.ip(i).into(), 13355);
    let file_recp = |i: usize| SocketAddr::new(net.ip(i).into(), 13381);

    // The owner stores a one-shard file.
    let owner = UserKeys::from_keys(SecretKey::generate(), SecretKey::generate());
    let mut rng = rand::thread_rng();
    let fkey = FileKey::generate(&mut rng);
    let salt = [7u8; 16];
    let mut shards = Vec::new();
    let enc = encrypt_reader(&b"the owner's secret"[..], &fkey, &salt, &[], |a, b| {
        shards.push((*a, b.to_vec()));
        Ok(())
    })
    .unwrap();
    let wrapped = wrap_key(&mut rng, &fkey, &owner.encryption_public()).unwrap();
    let m = Manifest::new("secret.txt", "text/plain", now_ms(), salt, enc, wrapped).unwrap();
    let (id, env) = seal_manifest(&mut rng, owner.signing(), &m, now_ms()).unwrap();
    let manifest_text = String::from_utf8(env.to_bytes()).unwrap();
    let (addr, bytes) = &shards[0];
    let (st, v) = call(
        &rt,
        shard_recp(0),
        owner.signing(),
        "shard.put",
        json!({"data": URL_SAFE_NO_PAD.encode(bytes)}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["addr"], addr.to_string());
    let (st, v) = call(
        &rt,
        file_recp(0),
        owner.signing(),
        "file.put",
        json!({"manifest": manifest_text}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["id"], id.to_string());

    let stranger = SecretKey::generate();
    // Storing the owner's manifest as the stranger's request: refused.
    let (st, v) = call(
        &rt,
        file_recp(1),
        &stranger,
        "file.put",
        json!({"manifest": manifest_text}),
    );
    assert_eq!((st, v["error"].as_str()), (403, Some("forbidden")), "{v}");
    // A delete signed by the stranger removes nothing of the owner's.
    let del = seal_delete(&mut rng, &stranger, &id, now_ms());
    let del_text = String::from_utf8(del.to_bytes()).unwrap();
    let (st, v) = call(
        &rt,
        file_recp(1),
        &stranger,
        "file.rm",
        json!({"delete": del_text}),
    );
    assert_eq!((st, v["removed"].as_bool()), (200, Some(false)), "{v}");
    // The owner's own delete, sent by the stranger: the requester is not its signer.
    let owner_del = seal_delete(&mut rng, owner.signing(), &id, now_ms());
    let owner_del_text = String::from_utf8(owner_del.to_bytes()).unwrap();
    let (st, v) = call(
        &rt,
        file_recp(2),
        &stranger,
        "file.rm",
        json!({"delete": owner_del_text}),
    );
    assert_eq!((st, v["error"].as_str()), (403, Some("forbidden")), "{v}");
    // Reading and listing act on the requester's own files only.
    let (st, _) = call(
        &rt,
        file_recp(2),
        &stranger,
        "file.get",
        json!({"id": id.to_string()}),
    );
    assert_eq!(st, 404);
    let (st, v) = call(&rt, file_recp(2), &stranger, "file.ls", json!({}));
    assert_eq!(
        (st, v["files"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );
    // Shards over the limit and malformed addresses.
    let big = URL_SAFE_NO_PAD.encode(vec![0u8; 256 * 1024 + 1]);
    let (st, v) = call(
        &rt,
        shard_recp(1),
        &stranger,
        "shard.put",
        json!({"data": big}),
    );
    assert_eq!((st, v["error"].as_str()), (413, Some("too_large")), "{v}");
    let (st, v) = call(
        &rt,
        shard_recp(1),
        &stranger,
        "shard.get",
        json!({"addr": "zz"}),
    );
    assert_eq!((st, v["error"].as_str()), (400, Some("malformed")), "{v}");

    // The trees' peer messages from a non-member, over TLS to each cell's own port.
    let out = Outsider::new("127.52.0.250:13351");
    let key1 = node_key(&net, 1);
    let refused_before = not_member_refused(&net);
    rt.block_on(async {
        let mut c = link(&net, &out, key1, 13351, "ftreeFileMgr").await;
        let owner_b64 = owner.owner().to_b64();
        for (kind, body) in [
            ("file.index", json!({"q": 1, "manifest": manifest_text})),
            ("file.unindex", json!({"q": 2, "delete": owner_del_text})),
            (
                "file.fetch",
                json!({"q": 3, "owner": owner_b64, "id": id.to_string()}),
            ),
            ("file.list", json!({"q": 4, "owner": owner_b64})),
            (
                "file.sync",
                json!({"owner": owner_b64, "ids": [id.to_string()]}),
            ),
        ] {
            c.send(&out.frame(kind, body)).await.unwrap();
        }
        let mut c = link(&net, &out, key1, 13350, "shardTree").await;
        let a = URL_SAFE_NO_PAD.encode(addr.as_bytes());
        for (kind, body) in [
            ("shard.ask", json!({"addrs": [a]})),
            ("shard.has", json!({"addrs": [a]})),
        ] {
            c.send(&out.frame(kind, body)).await.unwrap();
        }
    });
    let refused = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        let n = not_member_refused(&net);
        (n >= refused_before + 7).then_some(n - refused_before)
    })
    .expect("the outsider's peer messages were not all refused as from a non-member");
    println!("{refused} peer messages from the outsider refused");

    // The owner's file is still there, whole, on every node.
    for i in 0..3 {
        let (st, v) = call(
            &rt,
            file_recp(i),
            owner.signing(),
            "file.get",
            json!({"id": id.to_string()}),
        );
        assert_eq!(st, 200, "node {i}: {v}");
        assert_eq!(v["manifest"], manifest_text.as_str());
        let (st, v) = call(&rt, file_recp(i), owner.signing(), "file.ls", json!({}));
        assert_eq!(
            (st, v["files"].as_array().map(Vec::len)),
            (200, Some(1)),
            "{v}"
        );
        let (st, v) = call(
            &rt,
            shard_recp(i),
            owner.signing(),
            "shard.get",
            json!({"addr": addr.to_string()}),
        );
        assert_eq!(st, 200, "node {i}: {v}");
        assert_eq!(
            URL_SAFE_NO_PAD.decode(v["data"].as_str().unwrap()).unwrap(),
            *bytes
        );
    }
}

/// The outsider's TLS link to node 1's tree port `port` for `cell` (pinned to `key1`).
async fn link(
    net: &Net,
    out: &Outsider,
    key1: borg_proto::identity::PublicKey,
    port: u16,
    cell: &'static str,
) -> conn::PeerConn {
    let addr: SocketAddr = format!("{}:{port}", net.ip(1)).parse().unwrap();
    conn::connect_cell(
        addr,
        Some(key1),
        cell,
        &out.identity,
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

/// Read frames from `c` until `pick` takes one, for at most 10 s.
async fn next_frame<T>(c: &mut conn::PeerConn, mut pick: impl FnMut(&[u8]) -> Option<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let bytes = c.recv().await.unwrap().expect("the node closed the link");
            if let Some(t) = pick(&bytes) {
                return t;
            }
        }
    })
    .await
    .expect("no such frame within 10 s")
}

/// Client streams (`shard.open`, then `Want` frames) are open to any key, because a shard's
/// address is the capability to read its ciphertext; but a stranger's fresh key gets only
/// what it names and holds at most 4 of them open at a node.
#[test]
fn a_strangers_client_streams_serve_only_what_it_names_within_the_bounds() {
    use borg_proto::stream::frame::{CloseCode, Frame, Want};
    let net = three_storage_nodes(53);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Anyone stores a shard at node 0; with 3 members every node ends up holding it.
    let out = Outsider::new("127.0.0.1:9");
    let bytes: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    let (st, v) = call(
        &rt,
        SocketAddr::new(net.ip(0).into(), 13355),
        &out.key,
        "shard.put",
        json!({"data": URL_SAFE_NO_PAD.encode(&bytes)}),
    );
    assert_eq!(st, 200, "{v}");
    let addr: [u8; 32] = *borg_store::Address::of(&bytes).as_bytes();
    wait_for(Duration::from_secs(30), Duration::from_millis(200), || {
        (net.cell_status(1, SHARD_MON)?["store"]["shards"] == 1).then_some(())
    })
    .expect("node 1 never held the shard");
    let other = [0x42u8; 32];
    let hexa = |a: &[u8; 32]| a.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let key1 = node_key(&net, 1);

    rt.block_on(async {
        let mut c = link(&net, &out, key1, 13350, "shardTree").await;
        // A Want on a stream never opened: closed, no bytes.
        let want = |stream, seq, addr| Frame::Want(Want { stream, seq, addr }).encode();
        c.send(&want(99, 0, addr)).await.unwrap();
        let code = next_frame(&mut c, |b| match Frame::decode(b) {
            Ok(Frame::Close(x)) if x.stream == 99 => Some(x.code),
            Ok(Frame::Shard(_)) => panic!("a shard on a stream nobody opened"),
            _ => None,
        })
        .await;
        assert_eq!(code, CloseCode::UnknownStream);
        // Four streams open; the answer says which named shard is held here.
        for stream in 1..=4u32 {
            let body = json!({"stream": stream, "addrs": [hexa(&addr), hexa(&other)]});
            c.send(&out.frame("shard.open", body)).await.unwrap();
            let held = next_frame(&mut c, |b| {
                let env = envelope::verify_signature_only(b).ok()?;
                (env.kind == "shard.opened" && env.body["stream"] == stream)
                    .then(|| env.body["held"].clone())
            })
            .await;
            assert_eq!(held, "01", "stream {stream}: only the first shard is held");
        }
        // A fifth from the same key: refused.
        let body = json!({"stream": 5, "addrs": [hexa(&addr)]});
        c.send(&out.frame("shard.open", body)).await.unwrap();
        let code = next_frame(&mut c, |b| match Frame::decode(b) {
            Ok(Frame::Close(x)) if x.stream == 5 => Some(x.code),
            _ => None,
        })
        .await;
        assert_eq!(code, CloseCode::Busy);
        // On an open stream: the named, held shard comes back whole; the other is Missing,
        // and so is a shard the stream did not name.
        c.send(&want(1, 7, addr)).await.unwrap();
        c.send(&want(1, 8, other)).await.unwrap();
        c.send(&want(2, 9, [0x17; 32])).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            let f = next_frame(&mut c, |b| Frame::decode(b).ok()).await;
            got.push(f);
        }
        for f in got {
            match f {
                Frame::Shard(s) => {
                    assert_eq!((s.stream, s.seq, s.addr), (1, 7, addr));
                    assert_eq!(s.bytes, bytes);
                }
                Frame::Missing(m) => assert!(m.seq == 8 || m.seq == 9, "{m:?}"),
                f => panic!("unexpected {f:?}"),
            }
        }
    });
    let st = net.cell_status(1, SHARD_MON).unwrap();
    let t = &st["transfers"];
    assert_eq!(t["client_streams"], 4, "{t}");
    assert!(t["client_streams_refused"].as_u64().unwrap() >= 1, "{t}");
    assert_eq!(t["shards_out"], 1, "{t}");
}
