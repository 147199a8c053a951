//! The appliance must not freeze (issue 9, items 9 and 10), shown against the real `borg`
//! supervisor with stand-in cells:
//! - a cell that floods its stderr while PID 1's console is a slow serial line keeps
//!   answering on its monitor; PID 1 drops and counts log lines instead of blocking (console
//!   `status` shows the counts), stays small and still stops in order on SIGTERM;
//! - a cell whose monitor stops answering (SIGSTOP: a black-box stand-in for a frozen cell)
//!   is killed and restarted within the liveness bound;
//! - a panic on PID 1's main thread does not end PID 1 (PID namespace, root);
//! - a configuration error leaves PID 1 up in its guard, which reaps orphans and still
//!   handles SIGTERM (PID namespace, root).
//!
//! Monitors of the stand-in cells listen on 127.60.0.x (this file's test subnet).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use borg_tests::appliance::{
    borg_bin, children_of, is_root, missing, send_signal, wait_exit, wait_for, which,
};

/// Stand-in base cell: one thread, like the real node's single-threaded runtime. It serves
/// the monitor contract and, with BORG_TEST_FLOOD=1, writes 50 log lines to stderr with a
/// plain blocking write(2) between requests. If its stderr pipe blocks, its monitor stops.
const CELL_PY: &str = r#"#!/usr/bin/env python3
import http.server, json, os
written = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"state": "root", "position": 1, "parent": None, "children": [],
                           "root": "k", "size": 1, "depth": 0, "public_key": "k",
                           "uptime_s": 1, "delivered_broadcasts": 0,
                           "written": written, "pid": os.getpid()}).encode()
        self.send_response(200 if self.path == "/status" else 404)
        self.send_header("content-length", str(len(body)))
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer.allow_reuse_address = True
srv = http.server.HTTPServer((os.environ["BORG_TEST_MON_IP"], 13310), H)
srv.timeout = 0.005
flood = os.environ.get("BORG_TEST_FLOOD") == "1"
line = ("flood line " + "x" * 190 + "\n").encode()
while True:
    srv.handle_request()
    if flood:
        for _ in range(50):
            os.write(2, line)
            written += len(line)
"#;

/// Bytes per second of a 115200-baud serial console (8N1: 10 bits per byte).
const SERIAL_BYTES_PER_SEC: usize = 11_520;

fn python_ok(test: &str) -> Option<PathBuf> {
    if which("python3").is_none() {
        missing(test, "needs python3 for the stand-in cell");
        return None;
    }
    match borg_bin() {
        Some(b) => Some(b),
        None => {
            missing(
                test,
                "no borg binary: run `cargo build -p borg` first or set BORG_BIN",
            );
            None
        }
    }
}

fn write_script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// `GET /status` from a stand-in monitor (HTTP/1.0 or 1.1), bounded by `timeout`.
fn status(addr: SocketAddr, timeout: Duration) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(s, "GET /status HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.take(1 << 20).read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.split_whitespace().nth(1).filter(|c| *c == "200")?;
    serde_json::from_str(body).ok()
}

fn read_state(p: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

fn cell<'a>(state: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    state
        .as_array()?
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// `borg up` (or `borg init` in a namespace) with the console on stdin/stdout, read at full
/// speed, and stderr (the log: on the appliance the serial console) read at serial speed.
struct Supervised {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<Vec<u8>>>,
    seen: usize,
}

impl Supervised {
    fn spawn(mut cmd: Command, err_bytes_per_sec: usize) -> Self {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let mut so = child.stdout.take().unwrap();
        let o = Arc::clone(&out);
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = so.read(&mut b) {
                if n == 0 {
                    break;
                }
                o.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&b[..n]));
            }
        });
        let mut se = child.stderr.take().unwrap();
        let e = Arc::clone(&err);
        std::thread::spawn(move || {
            // A serial line: at most `err_bytes_per_sec`, in 10 slices a second. This pacing
            // is the device being simulated, not a wait for a condition.
            let slice = (err_bytes_per_sec / 10).max(1);
            let mut b = vec![0u8; slice];
            while let Ok(n) = se.read(&mut b) {
                if n == 0 {
                    break;
                }
                let mut g = e.lock().unwrap();
                // Keep the first 1 MiB only: the test looks for a few lines.
                if g.len() < 1 << 20 {
                    g.extend_from_slice(&b[..n]);
                }
                drop(g);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let stdin = child.stdin.take().unwrap();
        Supervised {
            child,
            stdin,
            out,
            err,
            seen: 0,
        }
    }

    fn err_text(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Type a console command and return the text up to and including the line holding
    /// `needle`.
    fn ask(&mut self, cmd: &str, needle: &str, within: Duration) -> Option<String> {
        writeln!(self.stdin, "{cmd}").ok()?;
        self.stdin.flush().ok()?;
        let start = self.seen;
        let got = wait_for(within, || {
            let t = self.out.lock().unwrap().clone();
            let rest = t.get(start..)?;
            let i = rest.find(needle)?;
            let eol = rest[i..].find('\n')? + i;
            Some((start + eol + 1, rest[..eol].to_string()))
        });
        let (end, text) = got?;
        self.seen = end;
        Some(text)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Kills a helper process when the test ends, whatever way it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `log:   dropped A (console too slow) B (cell over rate)` -> (A, B).
fn parse_dropped(text: &str) -> Option<(u64, u64)> {
    let l = text.lines().find(|l| l.starts_with("log:   dropped "))?;
    let w: Vec<&str> = l.split_whitespace().collect();
    Some((w.get(2)?.parse().ok()?, w.get(6)?.parse().ok()?))
}

fn up_command(borg: &Path, dir: &Path, script: &Path, mon_ip: &str) -> Command {
    let mut cmd = Command::new(borg);
    cmd.args(["up", "--console", "--cell-user", "root", "--cells", "node"])
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--cell-program")
        .arg(script)
        .arg("--state-file")
        .arg(dir.join("state.json"))
        .args(["--leds", "none", "--backoff-base-ms", "200"])
        .args(["--backoff-max-ms", "800", "--grace-ms", "1500"])
        .arg("--monitor")
        .arg(format!("{mon_ip}:13310"))
        .env("BORG_TEST_MON_IP", mon_ip)
        .env("BORG_LOG", "info");
    cmd
}

/// PID 1's resident memory under the flood stays below this (it holds a 64 KiB console
/// queue and a 400-line ring; everything beyond is dropped, not stored).
const FLOOD_RSS_LIMIT_KIB: u64 = 48 * 1024;

#[test]
fn flooding_cell_on_a_slow_console_keeps_answering_and_pid1_counts_drops() {
    let test = "flooding_cell_on_a_slow_console_keeps_answering_and_pid1_counts_drops";
    let Some(borg) = python_ok(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "cell.py", CELL_PY);
    let mon_ip = "127.60.0.2";
    let mon: SocketAddr = format!("{mon_ip}:13310").parse().unwrap();
    let mut cmd = up_command(&borg, dir.path(), &script, mon_ip);
    cmd.env("BORG_TEST_FLOOD", "1");
    let mut sup = Supervised::spawn(cmd, SERIAL_BYTES_PER_SEC);

    // The cell writes 4 MB of log (60 times the two pipe buffers between it and the serial
    // line) while its monitor keeps answering: no poll goes unanswered for long.
    let want_bytes = 4_000_000u64;
    let start = Instant::now();
    let mut last_ok = Instant::now();
    let mut worst_gap = Duration::ZERO;
    let mut peak_rss = 0;
    let flood_done = wait_for(Duration::from_secs(90), || {
        peak_rss = peak_rss.max(rss_kib(sup.child.id()).unwrap_or(0));
        let st = status(mon, Duration::from_secs(2));
        let now = Instant::now();
        match st {
            Some(v) => {
                worst_gap = worst_gap.max(now - last_ok);
                last_ok = now;
                let w = v["written"].as_u64().unwrap_or(0);
                (w >= want_bytes).then_some(w)
            }
            None => {
                // Before the first answer the cell is still starting.
                None
            }
        }
    });
    let took = start.elapsed();
    // PID 1 dropped lines rather than block: both counters move, and the console says so.
    let mut counts = None;
    let counted = wait_for(Duration::from_secs(60), || {
        let text = sup.ask("status", "log:   dropped ", Duration::from_secs(5))?;
        counts = parse_dropped(&text);
        counts.filter(|(console, rate)| *console > 0 && *rate > 0)
    });
    let still_answers = status(mon, Duration::from_secs(2));
    let rss = rss_kib(sup.child.id()).unwrap_or(0);
    peak_rss = peak_rss.max(rss);
    // The main loop is not stuck in a log write either: SIGTERM stops everything in order.
    send_signal(sup.child.id(), "TERM");
    let exit = wait_exit(&mut sup.child, Duration::from_secs(20));
    let log = sup.err_text();
    eprintln!(
        "flood: {want_bytes} B written by the cell in {took:?}, worst monitor gap {worst_gap:?}, \
         PID 1 dropped {counts:?} (console, rate), PID 1 peak RSS {peak_rss} KiB"
    );
    let written = flood_done.unwrap_or_else(|| {
        panic!(
            "the flooding cell stopped (monitor frozen or too slow); log head:\n{}",
            &log[..log.len().min(3000)]
        )
    });
    assert!(written >= want_bytes);
    assert!(
        worst_gap < Duration::from_secs(3),
        "monitor went unanswered for {worst_gap:?} during the flood"
    );
    assert!(
        counted.is_some(),
        "console does not report dropped lines: {counts:?}"
    );
    assert!(still_answers.is_some(), "monitor silent after the flood");
    assert!(
        peak_rss < FLOOD_RSS_LIMIT_KIB,
        "PID 1 RSS {peak_rss} KiB >= {FLOOD_RSS_LIMIT_KIB} KiB"
    );
    assert!(
        log.contains("writes too fast") || log.contains("console too slow"),
        "no drop note on the console"
    );
    let exit = exit.expect("borg up did not stop after SIGTERM during a flood");
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn a_frozen_cell_is_killed_and_restarted() {
    let test = "a_frozen_cell_is_killed_and_restarted";
    let Some(borg) = python_ok(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "cell.py", CELL_PY);
    let mon_ip = "127.60.0.3";
    let mon: SocketAddr = format!("{mon_ip}:13310").parse().unwrap();
    let state = dir.path().join("state.json");
    let silence = Duration::from_millis(3000);
    let mut cmd = up_command(&borg, dir.path(), &script, mon_ip);
    cmd.args(["--liveness-startup-ms", "20000"])
        .arg("--liveness-silence-ms")
        .arg(silence.as_millis().to_string());
    let mut sup = Supervised::spawn(cmd, 1 << 20);

    let first = wait_for(Duration::from_secs(30), || {
        status(mon, Duration::from_secs(1))?["pid"].as_u64()
    })
    .expect("stand-in cell monitor never answered");
    // PID 1 has seen it answer (node state logged) before we freeze it.
    let seen = wait_for(Duration::from_secs(10), || {
        sup.err_text().contains("node state: root").then_some(())
    });
    assert!(seen.is_some(), "PID 1 never saw the monitor answer");
    assert!(send_signal(first as u32, "STOP"), "SIGSTOP");
    let frozen_at = Instant::now();

    // Within the silence bound plus a few polls, PID 1 kills it and a new cell answers.
    let restarted = wait_for(silence + Duration::from_secs(15), || {
        let pid = status(mon, Duration::from_millis(500))?["pid"].as_u64()?;
        (pid != first).then_some(pid)
    });
    let back_after = frozen_at.elapsed();
    let st = read_state(&state);
    let c = st.as_ref().and_then(|s| cell(s, "node")).cloned();
    let table = sup.ask("cells", "node ", Duration::from_secs(5));
    send_signal(sup.child.id(), "TERM");
    let exit = wait_exit(&mut sup.child, Duration::from_secs(20));
    eprintln!("frozen cell: restarted {back_after:?} after SIGSTOP (silence bound {silence:?})");
    // Whatever happens, do not leave a stopped process behind.
    let _ = send_signal(first as u32, "KILL");

    let new_pid = restarted.expect("the frozen cell was never restarted");
    assert_ne!(new_pid, first);
    // The silence is counted from the last answer PID 1 saw, at most one poll (1 s) before
    // the freeze.
    assert!(
        back_after + Duration::from_millis(1500) >= silence,
        "restarted after {back_after:?}, well before the silence bound {silence:?}"
    );
    let c = c.expect("state file");
    assert_eq!(c["hung_kills"], 1, "{c}");
    assert_eq!(c["last_exit"], serde_json::json!({"signaled": 9}), "{c}");
    assert!(c["starts"].as_u64() >= Some(2), "{c}");
    let table = table.expect("console cells table");
    assert!(table.contains("monitor silent"), "{table}");
    assert!(exit.expect("borg up did not stop").success());
}

/// Stand-in cells for the PID 1 tests (as in appliance_pid1.rs).
const SH_CELL: &str = r#"#!/bin/sh
name="$2"
log="$BORG_TEST_LOG"
case "$name" in
  crasher)
    echo "start $name" >> "$log"
    exit 7 ;;
  *)
    trap 'echo "stop $name" >> "$log"; exit 0' TERM
    echo "start $name" >> "$log"
    while :; do sleep 0.05; done ;;
esac
"#;

fn ns_prerequisites(test: &str) -> Option<PathBuf> {
    if !is_root() {
        missing(test, "needs root (PID namespaces)");
        return None;
    }
    if which("unshare").is_none() {
        missing(test, "needs `unshare` (util-linux)");
        return None;
    }
    match borg_bin() {
        Some(b) => Some(b),
        None => {
            missing(
                test,
                "no borg binary: run `cargo build -p borg` first or set BORG_BIN",
            );
            None
        }
    }
}

fn ns_setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = write_script(dir.path(), "cell.sh", SH_CELL);
    let log = dir.path().join("cells.log");
    std::fs::write(&log, "").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
    (dir, script, log)
}

fn init_command(borg: &Path, dir: &Path, script: &Path, log: &Path) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(borg)
        .args(["init", "--no-system", "--cell-user", "1000:1000"])
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--cell-program")
        .arg(script)
        .arg("--state-file")
        .arg(dir.join("state.json"))
        .args(["--leds", "none", "--backoff-base-ms", "100"])
        .args(["--backoff-max-ms", "200", "--grace-ms", "1500"])
        // Nothing listens here: the stand-in cells have no monitor, and none is the base cell.
        .args(["--monitor", "127.60.0.4:13310"])
        .env("BORG_TEST_LOG", log)
        .env("BORG_LOG", "info");
    cmd
}

fn starts_of(log: &Path, name: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == format!("start {name}"))
        .count()
}

#[test]
fn pid1_survives_a_panic_on_its_main_thread() {
    let test = "pid1_survives_a_panic_on_its_main_thread";
    let Some(borg) = ns_prerequisites(test) else {
        return;
    };
    let (dir, script, log) = ns_setup();
    let mut cmd = init_command(&borg, dir.path(), &script, &log);
    cmd.args(["--cells", "steady,crasher", "--inject-panic", "--console"]);
    let mut init = Supervised::spawn(cmd, 1 << 20);
    let panicked = wait_for(Duration::from_secs(20), || {
        init.err_text()
            .contains("PID 1 main loop caught a panic")
            .then_some(())
    });
    // After the panic PID 1 still supervises: the crasher keeps being restarted ...
    let before = starts_of(&log, "crasher");
    let restarts = wait_for(Duration::from_secs(20), || {
        (starts_of(&log, "crasher") >= before + 3).then_some(())
    });
    let alive = init.child.try_wait().unwrap().is_none();
    // ... the console still answers and shows the fault ...
    let st = init.ask("status", "log:   dropped ", Duration::from_secs(10));
    let fault = wait_for(Duration::from_secs(5), || {
        init.out
            .lock()
            .unwrap()
            .contains("fault: PID 1 main loop panicked")
            .then_some(())
    })
    .is_some();
    // ... and SIGTERM still stops the cells in order and ends the namespace cleanly.
    let pid1 = wait_for(Duration::from_secs(5), || {
        children_of(init.child.id()).first().map(|c| c.0)
    });
    if let Some(p) = pid1 {
        send_signal(p, "TERM");
    }
    let exit = wait_exit(&mut init.child, Duration::from_secs(20));
    let text = init.err_text();
    assert!(panicked.is_some(), "no panic was caught; log:\n{text}");
    assert!(alive, "PID 1 exited after the panic; log:\n{text}");
    assert!(
        restarts.is_some(),
        "no restarts after the panic; log:\n{text}"
    );
    assert!(st.is_some(), "console silent after the panic");
    assert!(fault, "console does not show the panic as a fault");
    assert!(pid1.is_some(), "init not found in the namespace");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("stop steady"),
        "steady cell was not stopped in order"
    );
    let exit = exit.expect("init did not exit after SIGTERM");
    assert!(exit.success(), "{exit:?}; log:\n{text}");
}

#[test]
fn pid1_config_error_keeps_reaping_and_handling_signals() {
    let test = "pid1_config_error_keeps_reaping_and_handling_signals";
    let Some(borg) = ns_prerequisites(test) else {
        return;
    };
    if which("nsenter").is_none() {
        missing(test, "needs `nsenter` (util-linux)");
        return;
    }
    let (dir, script, log) = ns_setup();
    let mut cmd = init_command(&borg, dir.path(), &script, &log);
    // Two equal pins: a configuration error.
    cmd.args(["--cells", "steady", "--led-gpio", "5,5"]);
    let mut init = Supervised::spawn(cmd, 1 << 20);
    let guarded = wait_for(Duration::from_secs(20), || {
        init.err_text().contains("PID 1 guard").then_some(())
    });
    let pid1 = wait_for(Duration::from_secs(5), || {
        children_of(init.child.id()).first().map(|c| c.0)
    });
    let text = init.err_text();
    assert!(
        guarded.is_some(),
        "PID 1 did not enter its guard; log:\n{text}"
    );
    let pid1 = pid1.expect("PID 1 left the namespace");
    // An orphan inside the namespace is adopted by PID 1 and reaped.
    let orphan = Command::new("nsenter")
        .args(["--target", &pid1.to_string(), "--pid", "--"])
        .args(["sh", "-c", "(sleep 2 &); exit 0"])
        .status()
        .unwrap();
    assert!(orphan.success());
    let adopted = wait_for(Duration::from_secs(5), || {
        children_of(pid1)
            .iter()
            .any(|c| c.2 == "sleep")
            .then_some(())
    });
    let reaped = adopted.and_then(|_| {
        wait_for(Duration::from_secs(10), || {
            children_of(pid1)
                .iter()
                .all(|c| c.2 != "sleep")
                .then_some(())
        })
    });
    let still_up = init.child.try_wait().unwrap().is_none();
    send_signal(pid1, "TERM");
    let exit = wait_exit(&mut init.child, Duration::from_secs(10));
    let text = init.err_text();
    assert!(
        adopted.is_some(),
        "orphan not adopted by PID 1: {:?}",
        children_of(pid1)
    );
    assert!(
        reaped.is_some(),
        "orphan left as a zombie: {:?}",
        children_of(pid1)
    );
    assert!(still_up, "PID 1 exited on the configuration error");
    assert!(text.contains("--led-gpio"), "error not logged:\n{text}");
    // No cell ran (the configuration was refused), and SIGTERM ended the guard.
    assert_eq!(starts_of(&log, "steady"), 0);
    let exit = exit.expect("guard ignored SIGTERM");
    assert!(
        !exit.success(),
        "the configuration error is still the exit status"
    );
}

/// Broadcasts an outsider sends to a real node under the supervisor.
const OUTSIDER_BROADCASTS: usize = 200;
/// Text length of each: 200 x 2 KB is six times what the two pipes between the cell and a
/// stuck console hold, and 35 s of a 115200-baud line.
const OUTSIDER_TEXT_BYTES: usize = 2000;
/// The outsider sends just under the receptor's per-IP request rate (one source address), so
/// that every request is accepted and what paces it is the node, not the rate limit.
const OUTSIDER_RATE: f64 = (borg_net::serve::RECEPTOR_RATE - 2) as f64;
/// All of them are accepted within this. At the outsider's pace they take about 11 s; a node
/// whose log writes wait for the serial line needs 30 s or more (400 KB at 11.5 KB/s, less
/// the pipe buffers).
const OUTSIDER_ACCEPT_WITHIN: Duration = Duration::from_secs(20);
/// The real cell's resident memory during the flood stays below this.
const NODE_RSS_LIMIT_KIB: u64 = 96 * 1024;

#[test]
fn real_node_under_a_broadcast_flood_on_a_slow_console_keeps_working() {
    let test = "real_node_under_a_broadcast_flood_on_a_slow_console_keeps_working";
    let Some(borg) = borg_bin() else {
        missing(test, "no borg binary: run `cargo build -p borg` first");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.61.0.2";
    let mon: SocketAddr = format!("{ip}:13310").parse().unwrap();
    let recp: SocketAddr = format!("{ip}:13305").parse().unwrap();
    let mut cmd = Command::new(&borg);
    cmd.args(["up", "--cell-user", "root"])
        .arg("--data")
        .arg(dir.path().join("data"))
        .arg("--state-file")
        .arg(dir.path().join("state.json"))
        .args(["--leds", "none", "--listen", ip, "--monitor"])
        .arg(mon.to_string())
        .env("BORG_LOG", "info");
    let mut sup = Supervised::spawn(cmd, SERIAL_BYTES_PER_SEC);
    let up = wait_for(Duration::from_secs(30), || {
        status(mon, Duration::from_secs(1))
    });
    assert!(
        up.is_some(),
        "node never answered; log:\n{}",
        sup.err_text()
    );
    let cell_pid = wait_for(Duration::from_secs(5), || {
        let st = read_state(&dir.path().join("state.json"))?;
        cell(&st, "node")?["pid"].as_u64()
    })
    .expect("cell pid") as u32;

    // The outsider: its own fresh key, many broadcasts with long texts, as fast as the
    // receptor lets one address send, on one thread, while this thread polls the monitor.
    let sender = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let key = borg_proto::identity::SecretKey::generate();
        let text = "b".repeat(OUTSIDER_TEXT_BYTES);
        let start = Instant::now();
        let mut ok = 0;
        for i in 0..OUTSIDER_BROADCASTS {
            // Load pacing (not a wait for a condition): request i leaves at i / rate.
            let due = start + Duration::from_secs_f64(i as f64 / OUTSIDER_RATE);
            if let Some(ahead) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(ahead);
            }
            let env = borg_proto::envelope::seal(
                &key,
                "broadcast",
                None,
                borg_net::node::now_ms(),
                serde_json::json!({ "text": text }),
            );
            if let Ok((200, _)) = rt.block_on(borg_net::client::receptor_post(recp, env.to_bytes()))
            {
                ok += 1;
            }
        }
        (ok, start.elapsed())
    });
    let mut worst_gap = Duration::ZERO;
    let mut last_ok = Instant::now();
    let mut peak_rss = 0;
    let done = wait_for(Duration::from_secs(120), || {
        peak_rss = peak_rss.max(rss_kib(cell_pid).unwrap_or(0));
        if status(mon, Duration::from_secs(2)).is_some() {
            worst_gap = worst_gap.max(last_ok.elapsed());
            last_ok = Instant::now();
        }
        sender.is_finished().then_some(())
    });
    assert!(done.is_some(), "the outsider's broadcasts never finished");
    let (accepted, took) = sender.join().unwrap();
    let delivered = wait_for(Duration::from_secs(20), || {
        let d = status(mon, Duration::from_secs(2))?["delivered_broadcasts"].as_u64()?;
        (d >= accepted as u64).then_some(d)
    });

    // A newcomer still joins: the tree of two is whole.
    let k = u64::from(borg_proto::dna::PEER_TREE_NET.max_children);
    let new_ip = "127.61.0.3";
    let new_mon: SocketAddr = format!("{new_ip}:13310").parse().unwrap();
    let new_log = std::fs::File::create(dir.path().join("newcomer.log")).unwrap();
    let newcomer = Command::new(&borg)
        .args(["node", "--listen", new_ip, "--join", ip])
        .arg("--data")
        .arg(dir.path().join("newcomer"))
        .args(["--max-children", &k.to_string(), "--heartbeat-ms", "1000"])
        .stdout(Stdio::null())
        .stderr(new_log)
        .spawn()
        .unwrap();
    let _newcomer = KillOnDrop(newcomer);
    let join_start = Instant::now();
    let whole = wait_for(Duration::from_secs(30), || {
        borg_tests::check_tree_statuses(
            k,
            [
                (
                    "supervised".to_string(),
                    status(mon, Duration::from_secs(2)),
                ),
                (
                    "newcomer".to_string(),
                    status(new_mon, Duration::from_secs(2)),
                ),
            ]
            .into_iter(),
        )
        .ok()
    });
    let joined_in = join_start.elapsed();
    send_signal(sup.child.id(), "TERM");
    let exit = wait_exit(&mut sup.child, Duration::from_secs(20));
    eprintln!(
        "broadcast flood: {accepted}/{OUTSIDER_BROADCASTS} accepted in {took:?}, worst monitor \
         gap {worst_gap:?}, cell peak RSS {peak_rss} KiB, delivered {delivered:?}, newcomer \
         joined in {joined_in:?}"
    );
    assert_eq!(
        accepted, OUTSIDER_BROADCASTS,
        "receptor refused or timed out"
    );
    assert!(
        took < OUTSIDER_ACCEPT_WITHIN,
        "the node took {took:?} for {OUTSIDER_BROADCASTS} broadcasts: paced by its log"
    );
    assert!(
        worst_gap < Duration::from_secs(3),
        "monitor unanswered for {worst_gap:?} during the flood"
    );
    assert!(delivered.is_some(), "not every broadcast was delivered");
    assert!(
        peak_rss < NODE_RSS_LIMIT_KIB,
        "cell RSS {peak_rss} KiB >= {NODE_RSS_LIMIT_KIB} KiB"
    );
    assert_eq!(whole, Some((2, 1)), "newcomer did not join a whole tree");
    assert!(exit.expect("borg up did not stop").success());
}

/// The same main loop runs `borg up`: a panic there is survived too (no root needed, so this
/// also runs where the PID-namespace tests skip).
#[test]
fn up_survives_a_panic_in_its_main_loop() {
    let test = "up_survives_a_panic_in_its_main_loop";
    let Some(borg) = borg_bin() else {
        missing(test, "no borg binary: run `cargo build -p borg` first");
        return;
    };
    let (dir, script, log) = ns_setup();
    let mut cmd = Command::new(&borg);
    cmd.args(["up", "--console", "--cell-user", "root", "--inject-panic"])
        .args(["--cells", "steady,crasher", "--data"])
        .arg(dir.path().join("data"))
        .arg("--cell-program")
        .arg(&script)
        .args(["--leds", "none", "--backoff-base-ms", "100"])
        .args(["--backoff-max-ms", "200", "--grace-ms", "1500"])
        .args(["--monitor", "127.60.0.5:13310"])
        .env("BORG_TEST_LOG", &log)
        .env("BORG_LOG", "info");
    let mut up = Supervised::spawn(cmd, 1 << 20);
    let panicked = wait_for(Duration::from_secs(20), || {
        up.err_text()
            .contains("PID 1 main loop caught a panic")
            .then_some(())
    });
    let before = starts_of(&log, "crasher");
    let restarts = wait_for(Duration::from_secs(20), || {
        (starts_of(&log, "crasher") >= before + 3).then_some(())
    });
    let alive = up.child.try_wait().unwrap().is_none();
    send_signal(up.child.id(), "TERM");
    let exit = wait_exit(&mut up.child, Duration::from_secs(20));
    let text = up.err_text();
    assert!(panicked.is_some(), "no panic was caught; log:\n{text}");
    assert!(alive, "borg up exited after the panic; log:\n{text}");
    assert!(
        restarts.is_some(),
        "no restarts after the panic; log:\n{text}"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("stop steady"),
        "steady cell was not stopped in order"
    );
    assert!(exit.expect("borg up did not stop").success());
}
