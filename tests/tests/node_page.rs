//! The node's own page (issue 13 item 5): `GET /` on the monitor port of a real node under
//! a real `borg up` (PID 1's supervisor without the system duties), on loopback.
//!
//! It shows the node's state, tree, time and cells, and what only PID 1 knows: the LED state
//! and PID 1's recent log lines (passed through the file named by `BORG_APPLIANCE_FILE`). It is
//! served with a Content-Security-Policy that forbids scripts. A node started on its own (no
//! PID 1) says it has no appliance LEDs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use borg_tests::appliance::{
    borg_bin, is_root, missing, send_signal, wait_exit, wait_for, Console,
};

/// `GET /` on `addr`: (head, body) of a 200 answer.
fn get_page(addr: SocketAddr) -> Option<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| (head.to_ascii_lowercase(), body.to_string()))
}

#[test]
fn the_node_page_shows_state_leds_and_pid1_log_under_up() {
    let test = "the_node_page_shows_state_leds_and_pid1_log_under_up";
    let Some(borg) = borg_bin() else {
        missing(test, "no borg binary: run `cargo build -p borg` first");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.62.0.2";
    let mon: SocketAddr = format!("{ip}:13310").parse().unwrap();
    let mut cmd = Command::new(&borg);
    cmd.arg("up");
    if is_root() {
        cmd.args(["--cell-user", "root"]);
    }
    cmd.arg("--data")
        .arg(dir.path().join("data"))
        .args(["--leds", "none", "--listen", ip, "--monitor"])
        .arg(mon.to_string())
        .env("BORG_LOG", "info");
    let mut up = Console::spawn(cmd).unwrap();
    // PID 1's view reaches the page within a few seconds of the node answering.
    let page = wait_for(Duration::from_secs(30), || {
        if let Ok(Some(status)) = up.child.try_wait() {
            panic!("borg up exited ({status}):\n{}", up.text());
        }
        let (head, body) = get_page(mon)?;
        body.contains("LEDs</th><td>alone").then_some((head, body))
    });
    let Some((head, body)) = page else {
        panic!(
            "no page with the LED state; last page:\n{:?}\nup:\n{}",
            get_page(mon),
            up.text()
        );
    };
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    for needle in [
        "<span class=\"state\">alone</span>",
        "peerTreeNet",
        "cronoTree",
        "Network time",
        // A line only PID 1 logs.
        "starting cells",
    ] {
        assert!(body.contains(needle), "missing {needle:?} in\n{body}");
    }
    assert!(!body.contains("<script"), "{body}");

    send_signal(up.child.id(), "TERM");
    assert!(
        wait_exit(&mut up.child, Duration::from_secs(20)).is_some(),
        "borg up did not stop:\n{}",
        up.text()
    );

    // A node on its own: the same page, without PID 1's part.
    let ip = "127.62.0.3";
    let mon: SocketAddr = format!("{ip}:13310").parse().unwrap();
    let data = dir.path().join("alone");
    let mut cmd = Command::new(&borg);
    cmd.args(["node", "--no-nat", "--listen", ip, "--data"])
        .arg(&data)
        .env_remove("BORG_APPLIANCE_FILE");
    let mut node = Console::spawn(cmd).unwrap();
    let body = wait_for(Duration::from_secs(20), || {
        if let Ok(Some(status)) = node.child.try_wait() {
            panic!("borg node exited ({status}):\n{}", node.text());
        }
        get_page(mon).map(|(_, b)| b)
    })
    .expect("the lone node's page");
    assert!(body.contains("not running under PID 1"), "{body}");
    assert!(body.contains("None here"), "{body}");
}
