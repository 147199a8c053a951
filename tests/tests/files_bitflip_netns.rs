//! A bit flipped in transit between a holder and a client (issue 11 item 7).
//!
//! ```text
//!   h0, h1, h2: one `borg node` each (203.0.113.20-22), so each holds every shard
//!   c (203.0.113.30): the client; in c, iptables DNATs its connections to h0's shard port
//!   to a relay (c:14350) that forwards them to h0 and flips one bit of what h0 sends
//! ```
//!
//! The file is put at h0; then `borg get` runs in c. h0's stream reaches the client through
//! the relay, which flips one bit 200,000 bytes into h0's answer (inside the first shard
//! frame). TLS refuses the altered record, so the client's link to h0 fails; the shards it was
//! waiting for from h0 are asked from h1 and h2. Asserts: the relay carried h0's stream and
//! flipped the bit; the get succeeds, streamed entirely from the holders, and the file is
//! byte for byte what was put.
//! Set `BORG_NETNS_TESTS=0` to skip (needs root, iproute2, iptables, python3).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use borg_tests::natnet::NsNodes;
use borg_tests::netns::{self, run_with_deadline, Topology};
use borg_tests::{borg_bin, wait_for};
use rand::RngCore;
use serde_json::Value;

const SHARD_MON: u16 = 13340;
const RELAY_PORT: u16 = 14350;
/// The relay's own connections to h0 leave from this port: the DNAT rule skips them.
const RELAY_SOURCE_PORT: u16 = 14351;
const FLIP_AT: usize = 200_000;

/// One TCP relay: accepts on `listen`, connects to `target` from `source_port`, copies both
/// ways, and flips the lowest bit of byte `flip_at` of what the target sends (once).
const RELAY: &str = r#"
import socket, sys, threading
lip, lport, tip, tport, sport, flip_at = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((lip, lport))
srv.listen(8)
print("ready", flush=True)
flipped = [False]
def pipe(a, b, flip):
    seen = 0
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            if flip and not flipped[0] and seen <= flip_at < seen + len(d):
                d = bytearray(d)
                d[flip_at - seen] ^= 1
                flipped[0] = True
                print("flipped", flush=True)
            seen += len(d)
            b.sendall(d)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    print("closed", seen, flush=True)
while True:
    c, _ = srv.accept()
    print("accepted", flush=True)
    u = socket.socket()
    u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    u.bind((lip, sport))
    u.connect((tip, tport))
    threading.Thread(target=pipe, args=(c, u, False), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c, True), daemon=True).start()
"#;

#[test]
fn a_bit_flipped_in_transit_is_refused_and_the_shards_come_from_the_other_holders() {
    if !netns::enabled() {
        return;
    }
    let mut topo = Topology::new("bitflip");
    topo.internet(Ipv4Addr::new(203, 0, 113, 0));
    let hosts: Vec<_> = (0..3)
        .map(|i| topo.public_host(&format!("h{i}"), Ipv4Addr::new(203, 0, 113, 20 + i)))
        .collect();
    let client = topo.public_host("c", Ipv4Addr::new(203, 0, 113, 30));
    let mut nodes = NsNodes::new("bitflip", 500, 25);
    nodes.extra.push("--no-nat".into());
    nodes.env.push(("BORG_SHARD_QUICK".into(), "1".into()));
    nodes.spawn_answering("h0", &hosts[0], &[]);
    let contact = vec![hosts[0].ip.to_string()];
    nodes.spawn("h1", &hosts[1], &contact);
    nodes.spawn("h2", &hosts[2], &contact);
    wait_for(Duration::from_secs(60), Duration::from_millis(300), || {
        ["h0", "h1", "h2"]
            .iter()
            .all(|n| {
                nodes.cell_status(n, SHARD_MON).unwrap_or_default()["members"]["placeable"] == 3
            })
            .then_some(())
    })
    .expect("the shard tree never had its 3 members");

    // A 3 MB file put at h0, until each holder has all of its shards.
    let dir = tempfile::tempdir().unwrap();
    let phrase = dir.path().join("phrase");
    let id = Command::new(borg_bin())
        .args(["id", "new", "--json"])
        .output()
        .unwrap();
    let id: Value = serde_json::from_slice(&id.stdout).unwrap();
    std::fs::write(&phrase, id["phrase"].as_str().unwrap()).unwrap();
    let mut data = vec![0u8; 3_000_000];
    rand::thread_rng().fill_bytes(&mut data);
    let src = dir.path().join("src.bin");
    std::fs::write(&src, &data).unwrap();
    let borg_in = |ns: &netns::Ns, args: &[&str]| -> Value {
        let mut cmd = ns.command(borg_bin());
        cmd.args(args)
            .args(["--phrase-file", phrase.to_str().unwrap(), "--json"]);
        let out = run_with_deadline(&mut cmd, None, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("borg {}: {e}", args[0]));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let h0 = hosts[0].ip.to_string();
    let put = borg_in(&hosts[0], &["put", "--node", &h0, src.to_str().unwrap()]);
    let n_shards = put["shards"].as_u64().unwrap();
    wait_for(Duration::from_secs(60), Duration::from_millis(300), || {
        ["h0", "h1", "h2"]
            .iter()
            .all(|n| {
                nodes.cell_status(n, SHARD_MON).unwrap_or_default()["store"]["shards"] == n_shards
            })
            .then_some(())
    })
    .expect("the holders never had every shard");

    // The relay in c, and c's connections to h0's shard port sent to it.
    let c_ip = client.ip.to_string();
    let mut relay = client
        .command("python3")
        .args(["-c", RELAY, &c_ip, &RELAY_PORT.to_string(), &h0, "13350"])
        .args([&RELAY_SOURCE_PORT.to_string(), &FLIP_AT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = relay.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("ready"),
        "the relay did not start"
    );
    client.run(
        "iptables-legacy",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &h0,
            "--dport",
            "13350",
            "!",
            "--sport",
            &RELAY_SOURCE_PORT.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{c_ip}:{RELAY_PORT}"),
        ],
    );

    let out = dir.path().join("out.bin");
    let got = borg_in(
        &client,
        &[
            "get",
            "--node",
            &h0,
            put["id"].as_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    println!("get through the flipping relay: {got}");
    let _ = relay.kill();
    let _ = relay.wait();
    let lines: Vec<String> = rx.try_iter().collect();
    println!("relay: {lines:?}");
    assert!(
        lines.iter().any(|l| l == "accepted"),
        "the client's link to h0 did not go through the relay"
    );
    assert!(
        lines.iter().any(|l| l == "flipped"),
        "the relay never flipped a bit (h0 sent less than {FLIP_AT} bytes)"
    );
    assert!(
        std::fs::read(&out).unwrap() == data,
        "the file came back different"
    );
    assert_eq!(got["streamed"], n_shards, "{got}");
    assert_eq!(got["via_node"], 0, "{got}");
}
