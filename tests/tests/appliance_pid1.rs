//! PID-1 semantics of `borg init`, in a PID namespace (`unshare --pid --fork --mount-proc`),
//! with stand-in cells (shell scripts) instead of the real node:
//! - orphaned grandchildren are re-parented to borg and reaped (no zombies left);
//! - a cell's exit status is recorded correctly (the single reaper does not steal it);
//! - a crashing cell is restarted with exponential backoff;
//! - SIGTERM stops the cells in reverse order (TERM, grace, KILL) and init exits;
//! - cells run as the unprivileged user;
//! - the LED simulator shows the state.
//!
//! Needs root and `unshare` (util-linux); skips with a message otherwise. `borg up` (no
//! namespace, no root) is tested the same way at the end, with a stand-in node monitor: node
//! state, network time and the node's cells on the console, network time saved to
//! DATA/nettime at the orderly stop.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use borg_tests::appliance::{
    borg_bin, children_of, is_root, missing, send_signal, wait_exit, wait_for, which,
};

const CELL_SCRIPT: &str = r#"#!/bin/sh
# Stand-in cell: called as `<script> cell NAME --data DIR ...`. Each cell installs its TERM
# handling before it logs "start", so the test knows a logged cell is ready to be stopped.
name="$2"
log="$BORG_TEST_LOG"
now() { date +%s%N; }
case "$name" in
  crasher)
    echo "start $name $(now) uid=$(id -u)" >> "$log"
    exit 7 ;;
  stubborn)
    trap '' TERM
    echo "start $name $(now) uid=$(id -u)" >> "$log"
    while :; do sleep 0.05; done ;;
  orphans)
    trap 'echo "stop $name $(now)" >> "$log"; exit 0' TERM
    echo "start $name $(now) uid=$(id -u)" >> "$log"
    # Five grandchildren whose parent (a subshell) exits at once: they are re-parented to
    # the nearest subreaper/PID 1, which must reap them.
    for i in 1 2 3 4 5; do ( sleep 0.4 & ) ; done
    while :; do sleep 0.05; done ;;
  *)
    trap 'echo "stop $name $(now)" >> "$log"; exit 0' TERM
    echo "start $name $(now) uid=$(id -u)" >> "$log"
    while :; do sleep 0.05; done ;;
esac
"#;

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    log: PathBuf,
    state: PathBuf,
    leds: PathBuf,
    script: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    // Cells run as uid 1000: they must reach their data dirs and the log.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let script = root.join("cell.sh");
    std::fs::write(&script, CELL_SCRIPT).expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let log = root.join("cells.log");
    std::fs::write(&log, "").expect("log");
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    Setup {
        state: root.join("state.json"),
        leds: root.join("leds"),
        log,
        script,
        root,
        _dir: dir,
    }
}

fn base_args(s: &Setup, cells: &str) -> Vec<String> {
    [
        "--data",
        &s.root.join("data").to_string_lossy(),
        "--cell-program",
        &s.script.to_string_lossy(),
        "--cells",
        cells,
        "--state-file",
        &s.state.to_string_lossy(),
        "--leds",
        &format!("sim:{}", s.leds.display()),
        "--backoff-base-ms",
        "200",
        "--backoff-max-ms",
        "800",
        "--grace-ms",
        "1500",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

fn cell<'a>(state: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    state
        .as_array()?
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
}

fn read_state(p: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

fn log_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn starts_of(log: &[String], name: &str) -> Vec<u128> {
    log.iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("start") && w.next() == Some(name))
                .then(|| w.next().and_then(|t| t.parse().ok()))
                .flatten()
        })
        .collect()
}

fn prerequisites(test: &str, need_root: bool) -> Option<PathBuf> {
    if need_root && !is_root() {
        missing(test, "needs root (PID namespaces, setuid to the cell user)");
        return None;
    }
    if need_root && which("unshare").is_none() {
        missing(test, "needs `unshare` (util-linux)");
        return None;
    }
    if which("date").is_none() || which("id").is_none() || which("sleep").is_none() {
        missing(test, "needs date, id and sleep (coreutils)");
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

/// Find the `borg` process that unshare --fork started (PID 1 inside the namespace).
fn init_pid(unshare_pid: u32) -> Option<u32> {
    wait_for(Duration::from_secs(5), || {
        children_of(unshare_pid).first().map(|c| c.0)
    })
}

#[test]
fn pid1_reaps_orphans_records_status_and_backs_off() {
    let test = "pid1_reaps_orphans_records_status_and_backs_off";
    let Some(borg) = prerequisites(test, true) else {
        return;
    };
    let s = setup();
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(&borg)
        .args(["init", "--no-system", "--cell-user", "1000:1000"])
        .args(base_args(&s, "orphans,crasher"))
        .env("BORG_TEST_LOG", &s.log);
    let mut child = cmd.spawn().expect("spawn unshare");
    let init = init_pid(child.id()).expect("borg init started inside the namespace");

    // Orphans are re-parented to our init (we see `sleep` children of it) ...
    let saw_orphan = wait_for(Duration::from_secs(10), || {
        children_of(init)
            .iter()
            .any(|c| c.2 == "sleep")
            .then_some(())
    });
    // ... and reaped: no zombie child of init survives for long.
    let crasher_done = wait_for(Duration::from_secs(20), || {
        let st = read_state(&s.state)?;
        let c = cell(&st, "crasher")?;
        (c["restarts"].as_u64()? >= 3).then(|| c.clone())
    });
    let no_zombies = wait_for(Duration::from_secs(5), || {
        let z: Vec<_> = children_of(init)
            .into_iter()
            .filter(|c| c.1 == 'Z' && c.2 == "sleep")
            .collect();
        z.is_empty().then_some(())
    });
    let leds = std::fs::read_to_string(&s.leds).unwrap_or_default();

    send_signal(init, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20));
    if status.is_none() {
        let _ = child.kill();
    }

    assert!(
        saw_orphan.is_some(),
        "orphans never showed up as children of init"
    );
    let c = crasher_done.expect("crasher was not restarted 3 times within 20 s");
    assert_eq!(c["last_exit"], serde_json::json!({"exited": 7}), "{c}");
    // Backoff: 200, 400, 800 (cap) ms between starts (give 60 ms slack below, none needed above).
    let log = log_lines(&s.log);
    let starts = starts_of(&log, "crasher");
    assert!(starts.len() >= 4, "{log:?}");
    let gaps: Vec<u128> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]) / 1_000_000)
        .collect();
    for (i, want) in [200u128, 400, 800].iter().enumerate() {
        assert!(
            gaps[i] + 60 >= *want,
            "gap {i} = {} ms, want >= {want} ({gaps:?})",
            gaps[i]
        );
        assert!(
            gaps[i] < want + 1500,
            "gap {i} = {} ms, far above {want} ({gaps:?})",
            gaps[i]
        );
    }
    if gaps.len() > 3 {
        assert!(gaps[3] + 60 >= 800 && gaps[3] < 2300, "capped gap {gaps:?}");
    }
    // Cells ran as the unprivileged user.
    assert!(
        log.iter()
            .filter(|l| l.starts_with("start"))
            .all(|l| l.ends_with("uid=1000")),
        "{log:?}"
    );
    assert!(
        no_zombies.is_some(),
        "zombie orphans left: {:?}",
        children_of(init)
    );
    assert!(leds.starts_with("state=alone"), "LED simulator: {leds:?}");
    let status = status.expect("init did not exit after SIGTERM");
    assert!(status.success(), "init exit status {status:?}");
}

#[test]
fn pid1_sigterm_stops_cells_in_reverse_order() {
    let test = "pid1_sigterm_stops_cells_in_reverse_order";
    let Some(borg) = prerequisites(test, true) else {
        return;
    };
    let s = setup();
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(&borg)
        .args(["init", "--no-system", "--cell-user", "1000:1000"])
        .args(base_args(&s, "stubborn,alpha,beta,gamma"))
        .env("BORG_TEST_LOG", &s.log);
    let mut child = cmd.spawn().expect("spawn unshare");
    let init = init_pid(child.id()).expect("borg init started inside the namespace");
    let running = wait_for(Duration::from_secs(10), || {
        let st = read_state(&s.state)?;
        st.as_array()?
            .iter()
            .all(|c| c["phase"] == "running")
            .then_some(())
    });
    // Wait until every cell has installed its TERM trap (its start line is logged after).
    let logged = wait_for(Duration::from_secs(10), || {
        let l = log_lines(&s.log);
        ["stubborn", "alpha", "beta", "gamma"]
            .iter()
            .all(|n| !starts_of(&l, n).is_empty())
            .then_some(())
    });
    send_signal(init, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20));
    if status.is_none() {
        let _ = child.kill();
    }
    assert!(running.is_some() && logged.is_some(), "cells did not start");
    let status = status.expect("init did not exit after SIGTERM");
    assert!(status.success(), "{status:?}");
    let stops: Vec<String> = log_lines(&s.log)
        .iter()
        .filter_map(|l| {
            l.strip_prefix("stop ")
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_string)
        })
        .collect();
    assert_eq!(stops, vec!["gamma", "beta", "alpha"], "reverse order");
    let st = read_state(&s.state).expect("state");
    for n in ["alpha", "beta", "gamma"] {
        let c = cell(&st, n).expect("cell");
        assert_eq!(c["phase"], "stopped", "{c}");
        assert_eq!(c["last_exit"], serde_json::json!({"exited": 0}), "{c}");
    }
    let stub = cell(&st, "stubborn").expect("cell");
    assert_eq!(
        stub["last_exit"],
        serde_json::json!({"signaled": 9}),
        "TERM ignored -> KILL: {stub}"
    );
}

#[test]
fn up_supervises_without_root() {
    let test = "up_supervises_without_root";
    let Some(borg) = prerequisites(test, false) else {
        return;
    };
    let s = setup();
    let mut cmd = Command::new(&borg);
    cmd.arg("up")
        .args(["--cell-user", "root"])
        .args(base_args(&s, "orphans,crasher"))
        .env("BORG_TEST_LOG", &s.log);
    let mut child = cmd.spawn().expect("spawn borg up");
    let me = child.id();
    // As a child subreaper, `borg up` adopts and reaps orphans as init would.
    let saw_orphan = wait_for(Duration::from_secs(5), || {
        children_of(me).iter().any(|c| c.2 == "sleep").then_some(())
    });
    let restarted = wait_for(Duration::from_secs(20), || {
        let st = read_state(&s.state)?;
        let c = cell(&st, "crasher")?;
        (c["restarts"].as_u64()? >= 2).then(|| c.clone())
    });
    let no_zombies = wait_for(Duration::from_secs(5), || {
        (!children_of(me).iter().any(|c| c.1 == 'Z')).then_some(())
    });
    send_signal(me, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20));
    if status.is_none() {
        let _ = child.kill();
    }
    let c = restarted.expect("crasher not restarted");
    assert_eq!(c["last_exit"], serde_json::json!({"exited": 7}));
    assert!(saw_orphan.is_some(), "orphans not adopted by borg up");
    assert!(no_zombies.is_some(), "zombies left under borg up");
    assert!(status.expect("borg up did not exit").success());
    let st = read_state(&s.state).expect("state");
    assert_eq!(cell(&st, "orphans").expect("cell")["phase"], "stopped");
}

const MONITOR_SCRIPT: &str = r#"#!/usr/bin/env python3
# Stand-in node: serves peerTreeNet's monitor contract (GET /status JSON, with the network
# time of the node and the cells it hosts) on $BORG_TEST_MON_PORT. Its network time runs
# one day ahead of the system clock.
import http.server, json, os, time
DAY_MS = 86400000
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        now_ms = int(time.time() * 1000) + DAY_MS
        body = json.dumps({"state": "root", "position": 1, "parent": None, "children": [],
                           "root": "k", "size": 1, "depth": 0, "public_key": "k",
                           "uptime_s": 1, "delivered_broadcasts": 0,
                           "time": {"synced": True, "offset_ms": 0.5, "error_bound_ms": 1.25,
                                    "source": "bootstrap", "stratum": 2, "now_ms": now_ms,
                                    "system_offset_ms": float(DAY_MS)},
                           "cells": [{"name": "peerTreeNet", "state": "root", "size": 1,
                                      "net": "127.0.0.1:13300", "recp": "127.0.0.1:13305",
                                      "mon": "127.0.0.1:13310"},
                                     {"name": "cronoTree", "state": "root", "size": 1,
                                      "net": "127.0.0.1:13396", "recp": "127.0.0.1:13397",
                                      "mon": "127.0.0.1:13398"}]}).encode()
        self.send_response(200 if self.path == "/status" else 404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["BORG_TEST_MON_PORT"])), H).serve_forever()
"#;

#[test]
fn up_shows_node_state_on_leds_and_console() {
    let test = "up_shows_node_state_on_leds_and_console";
    let Some(borg) = prerequisites(test, false) else {
        return;
    };
    if which("python3").is_none() {
        missing(test, "needs python3 for the stand-in monitor");
        return;
    }
    let s = setup();
    let script = s.root.join("mon.py");
    std::fs::write(&script, MONITOR_SCRIPT).expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // A free port for the stand-in monitor.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut args = base_args(&s, "node");
    let i = args
        .iter()
        .position(|a| a == "--cell-program")
        .expect("flag")
        + 1;
    args[i] = script.to_string_lossy().into_owned();
    let mut cmd = Command::new(&borg);
    cmd.args(["up", "--console", "--cell-user", "root", "--monitor"])
        .arg(format!("127.0.0.1:{port}"))
        .args(args)
        .env("BORG_TEST_MON_PORT", port.to_string());
    let mut c = borg_tests::appliance::Console::spawn(cmd).expect("borg up");
    let r = c.expect("node state: root", Duration::from_secs(20));
    let leds = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&s.leds)
            .ok()
            .filter(|t| t.starts_with("state=root"))
    });
    c.send("status").expect("type");
    let st = c
        .expect("node:  state=root", Duration::from_secs(10))
        .and_then(|_| c.expect("\n", Duration::from_secs(10)));
    c.send("cells").expect("type");
    let cells = c
        .expect("cronoTree", Duration::from_secs(10))
        .and_then(|t| c.expect("\n", Duration::from_secs(10)).map(|r| t + &r));
    c.send("time").expect("type");
    let time = c
        .expect("saved:", Duration::from_secs(10))
        .and_then(|t| c.expect("\n", Duration::from_secs(10)).map(|r| t + &r));
    c.send("bogus").expect("type");
    let bad = c.expect("Type 'help'", Duration::from_secs(10));
    let before_stop = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    c.send("poweroff").expect("type");
    let exit = wait_exit(&mut c.child, Duration::from_secs(20));
    r.expect("node state logged");
    assert!(leds.is_some(), "LED simulator never showed root");
    let st = st.expect("status");
    assert!(st.contains("position=1 size=1 depth=0"), "{st}");
    assert!(st.contains("time=synced s2 ±1.2ms"), "{st}");
    let cells = cells.expect("cells");
    assert!(cells.contains("PROCESS"), "{cells}");
    assert!(cells.contains("node           running"), "{cells}");
    assert!(
        cells.contains("cronoTree      root         1  127.0.0.1:13396"),
        "{cells}"
    );
    let time = time.expect("time");
    assert!(time.contains("network:   synced s2"), "{time}");
    // `borg up` is not PID 1 of an appliance: it never sets the host's clock.
    assert!(time.contains("set:       not by this process"), "{time}");
    bad.expect("helpful message for bad input");
    assert!(exit.expect("borg up exits after poweroff").success());
    // Network time (a day ahead here) was saved at the orderly stop, strictly in the format.
    let saved = std::fs::read_to_string(s.root.join("data/nettime")).expect("DATA/nettime");
    let ms: u64 = saved
        .strip_prefix("borg-nettime-v1 ")
        .and_then(|r| r.strip_suffix('\n'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad nettime file {saved:?}"));
    let day = 86_400_000;
    assert!(
        ms >= before_stop + day - 5_000 && ms <= before_stop + day + 60_000,
        "saved {ms}, expected about {}",
        before_stop + day
    );
}
