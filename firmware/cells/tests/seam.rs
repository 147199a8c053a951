//! The cell seam, end to end on loopback: a toy cell type registered in this test (one line in
//! its own registry, no edit to the runtime) gets its own tree on its DNA port, finds its peers
//! through the base tree, exchanges messages of its kind prefix, answers receptor kinds, and
//! shows up in the merged status, metrics and the base cell's `cells` list. Bulk bytes go as
//! binary frames over the cell's real TLS links (a 256 KiB frame answers each hello).
//!
//! Real processes' worth of parts (TLS, listeners, actors) in one test process; waits are
//! conditions with deadlines, never sleeps.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use borg_cells::{start_node_with, CellOptions, CellType};
use borg_net::cell::{
    Cell, CellAction, CellError, CellInit, CellTime, NoCell, Work, WorkDone, WorkPanicked,
    MAX_WORK_IN_FLIGHT,
};
use borg_net::client;
use borg_net::node::NodeHandle;
use borg_proto::dna;
use borg_proto::envelope;
use borg_proto::identity::{PublicKey, SecretKey};
use borg_proto::tree::{Target, TreeState, TreeView};
use serde_json::{json, Value};

/// The toy: says hello to its tree parent once joined, counts hellos and broadcasts, answers
/// `toy.count` and `toy.shout` at its receptor.
#[derive(Default)]
struct Toy {
    hellos: u64,
    broadcasts: u64,
    binary_bytes: u64,
    /// Blocking jobs: queued, done, panicked; how many ran at once at most.
    work: Vec<Work>,
    work_done: u64,
    work_panicked: u64,
    running: Arc<AtomicUsize>,
    max_running: Arc<AtomicUsize>,
    greeted: Option<PublicKey>,
    out: Vec<CellAction>,
}

impl Cell for Toy {
    fn kind_prefix(&self) -> &'static str {
        "toy."
    }
    fn receptor_kinds(&self) -> &'static [&'static str] {
        &["toy.count", "toy.shout", "toy.work"]
    }
    fn handle_tree(&mut self, _now: CellTime, view: &TreeView) {
        if view.state == TreeState::Joined {
            if let Some(p) = view.parent.as_ref() {
                if self.greeted != Some(p.peer.key) {
                    self.greeted = Some(p.peer.key);
                    self.out.push(CellAction::Send {
                        to: Target::Key(p.peer.key),
                        kind: "toy.hello".into(),
                        body: json!({"n": 1}),
                    });
                }
            }
        }
    }
    fn handle_broadcast(&mut self, _now: CellTime, _id: &str, _o: &PublicKey, payload: &Value) {
        if payload.get("toy").is_some() {
            self.broadcasts += 1;
        }
    }
    fn handle_message(
        &mut self,
        _now: CellTime,
        from: PublicKey,
        _rx: u64,
        kind: &str,
        body: &Value,
    ) -> Result<(), CellError> {
        match (kind, body.get("n").and_then(|n| n.as_u64())) {
            ("toy.hello", Some(1)) => {
                self.hellos += 1;
                // The size of a shard, back over the link the hello came on.
                let mut bytes = vec![0xA5; 256 * 1024];
                bytes[0] = 1;
                self.out.push(CellAction::SendBinary { to: from, bytes });
                Ok(())
            }
            _ => Err(CellError::malformed("toy.hello takes {\"n\":1}")),
        }
    }
    fn handle_binary(
        &mut self,
        _now: CellTime,
        _from: PublicKey,
        b: &[u8],
    ) -> Result<(), CellError> {
        if b[0] != 1 || b[1..].iter().any(|x| *x != 0xA5) {
            return Err(CellError::malformed("not a toy frame"));
        }
        self.binary_bytes += b.len() as u64;
        Ok(())
    }
    fn handle_request(
        &mut self,
        _now: CellTime,
        _from: &PublicKey,
        kind: &str,
        body: &Value,
    ) -> Result<Value, CellError> {
        match kind {
            "toy.count" => Ok(json!({"hellos": self.hellos, "broadcasts": self.broadcasts})),
            "toy.work" => {
                // n jobs that wait for the test's gate (stand-ins for fsyncs); the last panics.
                let n = body["n"].as_u64().unwrap_or(0);
                for i in 0..n {
                    let (running, max) = (self.running.clone(), self.max_running.clone());
                    self.work.push(Box::new(move || -> WorkDone {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        max.fetch_max(now, Ordering::SeqCst);
                        let (open, cv) = &GATE;
                        let guard = open.lock().unwrap();
                        let _ = cv.wait_timeout_while(guard, LIMIT, |open| !*open).unwrap();
                        running.fetch_sub(1, Ordering::SeqCst);
                        assert!(i + 1 < n, "the last toy job panics");
                        Box::new(i)
                    }));
                }
                Ok(json!({}))
            }
            _ => {
                self.out.push(CellAction::Broadcast {
                    payload: json!({"toy": "shout"}),
                });
                Ok(json!({}))
            }
        }
    }
    fn poll_action(&mut self, _now: CellTime) -> Option<CellAction> {
        self.out.pop()
    }
    fn poll_work(&mut self) -> Option<Work> {
        self.work.pop()
    }
    fn handle_work_done(&mut self, _now: CellTime, done: WorkDone) {
        if done.downcast_ref::<u64>().is_some() {
            self.work_done += 1;
        } else if done.downcast_ref::<WorkPanicked>().is_some() {
            self.work_panicked += 1;
        }
    }
    fn status(&self, _now: CellTime) -> Value {
        json!({
            "toy_hellos": self.hellos,
            "toy_broadcasts": self.broadcasts,
            "toy_binary_bytes": self.binary_bytes,
            "toy_work_done": self.work_done,
            "toy_work_panicked": self.work_panicked,
            "toy_work_running": self.running.load(Ordering::SeqCst),
            "toy_work_max_running": self.max_running.load(Ordering::SeqCst),
        })
    }
    fn metrics(&self, _now: CellTime) -> String {
        format!("borg_toy_hellos_total {}\n", self.hellos)
    }
}

fn base(_: CellInit) -> Box<dyn Cell> {
    Box::new(NoCell)
}
fn toy(_: CellInit) -> Box<dyn Cell> {
    Box::new(Toy::default())
}

/// The toy borrows mailTree's DNA (ports 13393/13395/13394, k=25).
const TOY: dna::CellDna = dna::CELLS[5];
const REGISTRY: &[CellType] = &[
    CellType {
        dna: dna::PEER_TREE_NET,
        make: base,
    },
    CellType {
        dna: TOY,
        make: toy,
    },
];

const LIMIT: Duration = Duration::from_secs(20);

/// Closed until the test opens it: the toy's blocking jobs wait here.
static GATE: (std::sync::Mutex<bool>, std::sync::Condvar) =
    (std::sync::Mutex::new(false), std::sync::Condvar::new());

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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

async fn ask(recp: SocketAddr, kind: &str) -> (u16, Value) {
    ask_with(recp, kind, json!({})).await
}

async fn ask_with(recp: SocketAddr, kind: &str, body: Value) -> (u16, Value) {
    let key = SecretKey::generate();
    let env = envelope::seal(&key, kind, None, borg_net::node::now_ms(), body);
    let (status, body) = client::receptor_post(recp, env.to_bytes()).await.unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    (status, v)
}

#[tokio::test(flavor = "current_thread")]
async fn a_toy_cell_registered_in_one_line_runs_its_own_tree_and_doors() {
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = node("127.0.77.1", None, &da).await;
    let b = node("127.0.77.2", Some("127.0.77.1"), &db).await;
    let c = node("127.0.77.3", Some("127.0.77.2"), &dc).await;
    assert_eq!(a.len(), 2, "base + toy");

    // The toy's own tree forms through the base tree, on the toy's DNA port.
    let ok = tokio::time::timeout(
        LIMIT,
        until("a toy tree of 3", || {
            (a[1].status()["size"] == 3
                && a[1].status()["state"] == "root"
                && [&b, &c].iter().all(|n| n[1].status()["state"] == "joined"))
            .then_some(())
        }),
    )
    .await;
    if ok.is_err() {
        for n in [&a, &b, &c] {
            eprintln!("{}\n{}", n[0].status(), n[1].status());
        }
        panic!("no toy tree of 3");
    }
    for n in [&b, &c] {
        let st = n[1].status();
        assert_eq!(st["cell"], TOY.name);
        assert_eq!(st["state"], "joined", "{st}");
        assert!(st["addr"].as_str().unwrap().ends_with(":13393"), "{st}");
    }
    // Messages of its kind prefix reached the cell (both children greet the root).
    until("two hellos at the toy root", || {
        (a[1].status()["toy_hellos"] == 2).then_some(())
    })
    .await;
    // Each hello was answered by one 256 KiB binary frame over the same TLS link.
    until("a binary frame at each child", || {
        [&b, &c]
            .iter()
            .all(|n| n[1].status()["toy_binary_bytes"] == 256 * 1024)
            .then_some(())
    })
    .await;
    assert_eq!(a[1].status()["toy_binary_bytes"], 0);

    // Receptor kinds of the cell; unknown kinds name what the cell knows.
    let recp = SocketAddr::new("127.0.77.1".parse().unwrap(), TOY.recp_port);
    let (status, v) = ask(recp, "toy.count").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["body"]["hellos"], 2, "{v}");
    let (status, v) = ask(recp, "toy.nope").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("unknown_kind")),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("toy.count"), "{v}");
    // The base receptor does not know the toy's kinds.
    let base_recp = SocketAddr::new("127.0.77.1".parse().unwrap(), 13305);
    let (status, _) = ask(base_recp, "toy.count").await;
    assert_eq!(status, 400);

    // A broadcast the cell starts goes down the toy tree to every node's cell.
    let recp_c = SocketAddr::new("127.0.77.3".parse().unwrap(), TOY.recp_port);
    assert_eq!(ask(recp_c, "toy.shout").await.0, 200);
    until("the toy broadcast on every node", || {
        [&a, &b, &c]
            .iter()
            .all(|n| n[1].status()["toy_broadcasts"] == 1)
            .then_some(())
    })
    .await;

    // Merged status and metrics.
    let mon = SocketAddr::new("127.0.77.1".parse().unwrap(), TOY.mon_port);
    let metrics = client::monitor_get(mon, "/metrics").await.unwrap();
    assert!(metrics.contains("borg_toy_hellos_total 2"), "{metrics}");
    assert!(metrics.contains("borg_tree_size 3"), "{metrics}");
    let st = client::status(SocketAddr::new("127.0.77.1".parse().unwrap(), 13310))
        .await
        .unwrap();
    let cells: Vec<&str> = st["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cells, ["peerTreeNet", TOY.name], "{st}");
    assert_eq!(
        st["time"]["synced"], false,
        "no time cell in this registry: {st}"
    );

    // Blocking work runs off the actor: 12 jobs that wait for a gate. While they wait, exactly
    // MAX_WORK_IN_FLIGHT of them run and the cell still answers its receptor (an actor waiting
    // on a job would never answer). Opened, all come back; the panicking one as WorkPanicked.
    assert_eq!(ask_with(recp, "toy.work", json!({"n": 12})).await.0, 200);
    until("the jobs in flight", || {
        (a[1].status()["toy_work_running"] == MAX_WORK_IN_FLIGHT as u64).then_some(())
    })
    .await;
    let (status, v) = ask(recp, "toy.count").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(a[1].status()["toy_work_done"], 0);
    {
        let (open, cv) = &GATE;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
    until("12 jobs back", || {
        let st = a[1].status();
        (st["toy_work_done"] == 11 && st["toy_work_panicked"] == 1).then_some(())
    })
    .await;
    assert_eq!(
        a[1].status()["toy_work_max_running"],
        MAX_WORK_IN_FLIGHT as u64
    );
    assert_eq!(ask(recp, "toy.count").await.0, 200);
}
