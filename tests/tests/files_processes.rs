//! Files across 20 real `borg node` processes on loopback (127.51.0.x), driven by the `borg`
//! CLI a user runs: `borg put` a 20 MB file at one node, `borg get` it at another, kill -9 two
//! holders and get it again while the network re-replicates to 3 copies, corrupt a stored
//! shard and watch the scrub repair it, refuse a stranger's delete, and resume an interrupted
//! get. Nodes run with `BORG_SHARD_QUICK=1` (timings of seconds). Every wait is a condition
//! with a deadline that also fails at once if a node process died.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use borg_files::{open_manifest, FileId, UserKeys};
use borg_proto::envelope;
use borg_proto::identity::PublicKey;
use borg_proto::shard::placement::{holders, Members, ShardAddr};
use borg_tests::{borg_bin, wait_for, Net};
use serde_json::Value;

const N: usize = 20;
const SHARD_MON: u16 = 13340;
const FTREE_MON: u16 = 13341;
const FILE_BYTES: usize = 20_000_000;

fn borg(args: &[&str]) -> Output {
    Command::new(borg_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "borg failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Panic if a node process has exited.
fn all_alive(net: &mut Net) {
    for (i, n) in net.nodes.iter_mut() {
        if let Ok(Some(st)) = n.child.try_wait() {
            panic!(
                "node {i} exited ({st}); log:\n{}",
                std::fs::read_to_string(&n.log).unwrap_or_default()
            );
        }
    }
}

/// Shards stored on each live node.
fn shards_held(net: &Net) -> Vec<(usize, u64)> {
    net.nodes
        .keys()
        .map(|&i| {
            let st = net.cell_status(i, SHARD_MON).unwrap_or_default();
            (i, st["store"]["shards"].as_u64().unwrap_or(0))
        })
        .collect()
}

fn total(held: &[(usize, u64)]) -> u64 {
    held.iter().map(|h| h.1).sum()
}

/// Wait until the live nodes hold exactly 3 copies of each of `n_shards` shards (surplus
/// copies dropped, missing ones re-made) and that stays so for 2 s.
fn wait_three_copies(net: &mut Net, n_shards: u64, within: Duration) -> Duration {
    let start = Instant::now();
    let mut stable_since: Option<Instant> = None;
    loop {
        all_alive(net);
        let held = shards_held(net);
        if total(&held) == 3 * n_shards {
            let s = *stable_since.get_or_insert_with(Instant::now);
            if s.elapsed() >= Duration::from_secs(2) {
                return start.elapsed();
            }
        } else {
            stable_since = None;
        }
        if start.elapsed() > within {
            panic!(
                "copies held {held:?} (total {}), want {}",
                total(&held),
                3 * n_shards
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn phrase_file(dir: &Path, name: &str) -> PathBuf {
    // `borg id new --json` makes a fresh phrase; the test keeps it in its own directory.
    let phrase = json_of(&borg(&["id", "new", "--json"]))["phrase"]
        .as_str()
        .unwrap()
        .to_string();
    let p = dir.join(name);
    std::fs::write(&p, phrase).unwrap();
    p
}

#[test]
fn put_get_kill_holders_repair_and_resume_across_20_processes() {
    let mut net = Net::new(51, 500, 4);
    net.env.push(("BORG_SHARD_QUICK".into(), "1".into()));
    net.spawn(0, None);
    net.wait_up(0);
    for i in 1..N {
        net.spawn(i, Some(i.saturating_sub(1) / 3));
    }
    net.wait_tree(Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("no base tree: {e}"));
    // Every node knows every member of the shard and file trees.
    let up = Instant::now();
    wait_for(Duration::from_secs(90), Duration::from_millis(250), || {
        all_alive(&mut net);
        (0..N)
            .all(|i| {
                let s = net.cell_status(i, SHARD_MON).unwrap_or_default();
                let f = net.cell_status(i, FTREE_MON).unwrap_or_default();
                s["members"]["placeable"] == N && f["members"]["placeable"] == N
            })
            .then_some(())
    })
    .unwrap_or_else(|| {
        let p: Vec<Value> = (0..N)
            .map(|i| net.cell_status(i, SHARD_MON).unwrap_or_default()["members"].clone())
            .collect();
        panic!("members never complete: {p:?}")
    });
    println!(
        "all {N} nodes placeable after {:.1} s",
        up.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir().unwrap();
    let owner = phrase_file(dir.path(), "owner.phrase");
    let stranger = phrase_file(dir.path(), "stranger.phrase");
    let owner_s = owner.to_str().unwrap();
    let data: Vec<u8> = {
        use rand::RngCore;
        let mut v = vec![0u8; FILE_BYTES];
        rand::thread_rng().fill_bytes(&mut v);
        v
    };
    let src = dir.path().join("photo.bin");
    std::fs::write(&src, &data).unwrap();

    // Put at node 3.
    let t = Instant::now();
    let put = json_of(&borg(&[
        "put",
        "--node",
        &net.ip(3).to_string(),
        src.to_str().unwrap(),
        "--phrase-file",
        owner_s,
        "--json",
    ]));
    let id = put["id"].as_str().unwrap().to_string();
    let n_shards = put["shards"].as_u64().unwrap();
    println!(
        "put {FILE_BYTES} bytes as {n_shards} shards in {:.1} s: {id}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(n_shards, FILE_BYTES.div_ceil(262_128) as u64);
    let took = wait_three_copies(&mut net, n_shards, Duration::from_secs(120));
    println!("3 copies of every shard after {:.1} s", took.as_secs_f64());

    // Get at node 12: the same bytes.
    let out1 = dir.path().join("out1.bin");
    let t = Instant::now();
    let got = json_of(&borg(&[
        "get",
        "--node",
        &net.ip(12).to_string(),
        &id,
        "-o",
        out1.to_str().unwrap(),
        "--phrase-file",
        owner_s,
        "--json",
    ]));
    println!("get in {:.1} s: {got}", t.elapsed().as_secs_f64());
    assert!(
        std::fs::read(&out1).unwrap() == data,
        "the file came back different"
    );
    assert!(
        got["min_replicas"].as_u64().unwrap() >= 2,
        "the read saw too few copies: {got}"
    );
    // Streamed from the holders themselves (shard.locate, shard.open, binary frames).
    assert_eq!(got["streamed"], n_shards, "{got}");
    assert_eq!(got["via_node"], 0, "{got}");
    assert!(got["holders"].as_u64().unwrap() >= 3, "{got}");

    // The owner lists it; a stranger neither sees it nor can delete it.
    let ls = json_of(&borg(&[
        "ls",
        "--node",
        &net.ip(7).to_string(),
        "--phrase-file",
        owner_s,
        "--json",
    ]));
    let files = ls["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{ls}");
    assert_eq!(files[0]["id"], id.as_str());
    assert_eq!(files[0]["size"], FILE_BYTES as u64);
    let rm = borg(&[
        "rm",
        "--node",
        &net.ip(7).to_string(),
        &id,
        "--phrase-file",
        stranger.to_str().unwrap(),
        "--json",
    ]);
    let ls_stranger = json_of(&borg(&[
        "ls",
        "--node",
        &net.ip(8).to_string(),
        "--phrase-file",
        stranger.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(
        ls_stranger["files"].as_array().unwrap().len(),
        0,
        "{ls_stranger}"
    );
    assert!(!rm.status.success(), "a stranger's delete was accepted");
    let ls = json_of(&borg(&[
        "ls",
        "--node",
        &net.ip(9).to_string(),
        "--phrase-file",
        owner_s,
        "--json",
    ]));
    assert_eq!(
        ls["files"].as_array().unwrap().len(),
        1,
        "a stranger's delete removed the file: {ls}"
    );

    // The getter's cached copies are dropped again.
    wait_three_copies(&mut net, n_shards, Duration::from_secs(60));
    // kill -9 two of the three placed holders of the file's first shard: that shard is down
    // to one copy, and the next get goes through a node that never held it.
    let first = first_shard(&net.ip(6).to_string(), &owner, &id);
    let keys: Vec<(usize, PublicKey)> = (0..N)
        .map(|i| {
            let st = net.cell_status(i, SHARD_MON).unwrap();
            (
                i,
                PublicKey::from_b64(st["public_key"].as_str().unwrap()).unwrap(),
            )
        })
        .collect();
    let members = Members::new(keys.iter().map(|k| k.1)).unwrap();
    let placed: Vec<usize> = holders(&first, &members, 3)
        .unwrap()
        .iter()
        .map(|h| keys.iter().find(|k| k.1 == *h).unwrap().0)
        .collect();
    let (a, b) = (placed[0], placed[1]);
    // The next get goes through a node that holds none of shard 0.
    let getter = (0..N).find(|i| !placed.contains(i)).unwrap();
    println!("shard 0 is placed on nodes {placed:?}; killing {a} and {b}");
    net.kill9(a);
    net.kill9(b);
    let out2 = dir.path().join("out2.bin");
    let t = Instant::now();
    // Through the node (--via-node): it fetches each shard from the surviving holders.
    let via = json_of(&borg(&[
        "get",
        "--node",
        &net.ip(getter).to_string(),
        &id,
        "-o",
        out2.to_str().unwrap(),
        "--phrase-file",
        owner_s,
        "--json",
        "--via-node",
    ]));
    assert_eq!(via["via_node"], n_shards, "{via}");
    println!(
        "get with two holders dead in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(std::fs::read(&out2).unwrap() == data);
    let took = wait_three_copies(&mut net, n_shards, Duration::from_secs(120));
    println!(
        "back to 3 copies of every shard {:.1} s after the get",
        took.as_secs_f64()
    );

    // Later steps use nodes still alive.
    let live: Vec<usize> = net.nodes.keys().copied().filter(|&i| i != getter).collect();
    let live_ips: Vec<String> = live.iter().map(|&i| net.ip(i).to_string()).collect();
    let ip_of = |k: usize| live_ips[k % live_ips.len()].clone();

    // An interrupted get resumes without fetching again what it had.
    let out3 = dir.path().join("out3.bin");
    let state = dir.path().join("out3.bin.part.state");
    let mut child = Command::new(borg_bin())
        .args([
            "get",
            "--node",
            &ip_of(1),
            &id,
            "-o",
            out3.to_str().unwrap(),
            "--phrase-file",
            owner_s,
            "--json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(60), Duration::from_millis(5), || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the get ended ({st}) before it could be interrupted");
        }
        // Saved progress with at least one chunk done (a bitmap in hex).
        let st: Value = serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
        st["done"].as_str()?.chars().any(|c| c != '0').then_some(())
    })
    .expect("the get never saved its progress");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out3.exists(), "an interrupted get left a finished file");
    let resumed = json_of(&borg(&[
        "get",
        "--node",
        &ip_of(2),
        &id,
        "-o",
        out3.to_str().unwrap(),
        "--phrase-file",
        owner_s,
        "--json",
    ]));
    println!("resumed get: {resumed}");
    let skipped = resumed["skipped"].as_u64().unwrap();
    assert!(
        skipped >= 1,
        "nothing was kept from the interrupted get: {resumed}"
    );
    assert_eq!(
        skipped + resumed["fetched"].as_u64().unwrap(),
        n_shards,
        "{resumed}"
    );
    assert!(std::fs::read(&out3).unwrap() == data);

    // A shard corrupted on one holder's disk is found by the scrub and fetched again.
    wait_three_copies(&mut net, n_shards, Duration::from_secs(60));
    let victim = shards_held(&net).into_iter().max_by_key(|h| h.1).unwrap().0;
    let before = net.cell_status(victim, SHARD_MON).unwrap()["store"]["shards"]
        .as_u64()
        .unwrap();
    net.kill9(victim);
    let db = net
        .dir
        .path()
        .join(format!("n{victim}"))
        .join("shards.redb");
    corrupt_one_shard(&db);
    // Rejoin through a node that is still alive (node 0 may be one of the holders killed above).
    let seed = net.nodes.keys().copied().find(|&i| i != victim);
    net.spawn(victim, seed);
    net.wait_up(victim);
    let st = wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
        all_alive(&mut net);
        let st = net.cell_status(victim, SHARD_MON)?;
        let healed = st["store"]["corrupt_found"] == 1
            && st["store"]["shards"] == before
            && st["repair"]["fetches"].as_u64() >= Some(1);
        healed.then_some(st)
    })
    .unwrap_or_else(|| {
        panic!(
            "the corrupt shard was not replaced: {:?}",
            net.cell_status(victim, SHARD_MON)
        )
    });
    println!(
        "the corrupt shard was found (by a read or the scrub) and fetched again: {}",
        st["store"]
    );

    // The owner deletes the file: no listing shows it any more.
    let rm = json_of(&borg(&[
        "rm",
        "--node",
        &ip_of(3),
        &id,
        "--phrase-file",
        owner_s,
        "--json",
    ]));
    assert_eq!(rm["removed"], true, "{rm}");
    let ls = json_of(&borg(&[
        "ls",
        "--node",
        &ip_of(4),
        "--phrase-file",
        owner_s,
        "--json",
    ]));
    assert_eq!(ls["files"].as_array().unwrap().len(), 0, "{ls}");
}

/// The address of the first shard of file `id`, from its manifest (`file.get` as the owner).
fn first_shard(node_ip: &str, phrase: &Path, id: &str) -> ShardAddr {
    let words = std::fs::read_to_string(phrase).unwrap();
    let user = UserKeys::from_phrase(words.trim(), "").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let req = envelope::seal(
        user.signing(),
        "file.get",
        None,
        now,
        serde_json::json!({ "id": id }),
    );
    let addr = format!("{node_ip}:13381").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt
        .block_on(borg_net::client::receptor_post(addr, req.to_bytes()))
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer = envelope::verify_signature_only(&body).unwrap();
    let text = answer.body["manifest"].as_str().unwrap();
    let m = open_manifest(text.as_bytes()).unwrap();
    assert_eq!(m.id(), id.parse::<FileId>().unwrap());
    *m.manifest().shards()[0].addr.as_bytes()
}

/// Flip one byte of one stored shard inside a (closed) redb store file.
fn corrupt_one_shard(db: &Path) {
    use borg_store::{RedbStore, ShardStore};
    let bytes = {
        let store = RedbStore::open(db, 1 << 30).unwrap();
        let addr = store.addresses().unwrap()[0];
        store.get(&addr).unwrap().unwrap()
    };
    let mut raw = std::fs::read(db).unwrap();
    let needle = &bytes[100..164];
    // redb writes copy-on-write pages, so a stale copy of the bytes may sit in a freed page
    // too: flip the byte in every copy, so that the live one is surely hit.
    let hits: Vec<usize> = raw
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert!(!hits.is_empty(), "shard bytes not found in the file");
    for at in hits {
        raw[at + 10] ^= 0x01;
    }
    std::fs::write(db, raw).unwrap();
}
