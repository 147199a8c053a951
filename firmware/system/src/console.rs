//! The serial console: a small diagnostics prompt (`borg> `). No login shell, no way to run
//! programs: only the read-only commands below plus `reboot` and `poweroff`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::time::Duration;

use crate::state::{Shared, Snapshot};

/// The prompt.
pub const PROMPT: &str = "borg> ";

/// A console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Overview: version, uptime, network, node state.
    Status,
    /// The node's place in the base tree.
    Tree,
    /// The supervised cells.
    Cells,
    /// Network details.
    Net,
    /// The last N log lines.
    Log(usize),
    /// LED state and backend.
    Leds,
    /// Orderly reboot.
    Reboot,
    /// Orderly power-off.
    Poweroff,
    /// List commands.
    Help,
    /// Empty line.
    Empty,
    /// Anything else.
    Unknown(String),
}

/// What the console asks PID 1 to do after answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Nothing.
    None,
    /// Reboot.
    Reboot,
    /// Power off.
    Poweroff,
}

const HELP: &str = "\
commands:
  status     version, uptime, network and node state
  tree       this node's place in the base tree (peerTreeNet)
  cells      supervised cells: state, pid, restarts, last exit
  net        interface, DHCP lease, router, NAT role, port mapping, relay
  log [N]    last N log lines (default 20)
  leds       LED state and backend
  reboot     orderly reboot
  poweroff   orderly power-off
  help       this list";

/// Parse one input line.
pub fn parse(line: &str) -> Command {
    let mut words = line.split_whitespace();
    let Some(cmd) = words.next() else {
        return Command::Empty;
    };
    let arg = words.next();
    match (cmd.to_ascii_lowercase().as_str(), arg) {
        ("status", None) => Command::Status,
        ("tree", None) => Command::Tree,
        ("cells", None) => Command::Cells,
        ("net", None) => Command::Net,
        ("log", None) => Command::Log(20),
        ("log", Some(n)) => match n.parse() {
            Ok(n) => Command::Log(n),
            Err(_) => Command::Unknown(line.trim().to_string()),
        },
        ("leds", None) => Command::Leds,
        ("reboot", None) => Command::Reboot,
        ("poweroff" | "halt" | "shutdown", None) => Command::Poweroff,
        ("help" | "?", _) => Command::Help,
        _ => Command::Unknown(line.trim().to_string()),
    }
}

fn uptime(s: &Snapshot) -> String {
    let t = s.started.elapsed().as_secs();
    format!("{}h{:02}m{:02}s", t / 3600, t / 60 % 60, t % 60)
}

/// This process's resident set size in KiB (VmRSS), for `status` and the benchmarks.
pub fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn node_line(v: &serde_json::Value) -> String {
    let g = |k: &str| match v.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(serde_json::Value::Array(a)) => format!("{}", a.len()),
        Some(x) => x.to_string(),
    };
    format!(
        "state={} position={} size={} depth={} children={} nat={}",
        g("state"),
        g("position"),
        g("size"),
        g("depth"),
        g("children"),
        g("nat_role")
    )
}

/// The reachability part of the base cell's status, for `net`.
fn nat_lines(v: &serde_json::Value) -> String {
    let g = |k: &str| match v.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    };
    let m = &v["mapping"];
    let ms = |k: &str| m.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_string();
    let mut o = String::new();
    let _ = writeln!(o, "nat role:  {} ({})", g("nat_role"), g("nat_reason"));
    let _ = writeln!(
        o,
        "external:  {}  nat type {}  advertised {}",
        g("external_addr"),
        g("nat_type"),
        g("advertised_addr")
    );
    let _ = writeln!(
        o,
        "mapping:   {} {} {} {}",
        ms("state"),
        ms("protocol"),
        ms("external"),
        ms("reason")
    );
    let relay = v["relay"]["addr"].as_str().unwrap_or("-");
    let lan = v["lan_peers"].as_array().map_or(0, |a| a.len());
    let _ = write!(
        o,
        "relay:     {relay}  relaying for {}  LAN nodes heard {lan}",
        g("relaying_for")
    );
    o
}

fn net_lines(s: &Snapshot) -> String {
    let n = &s.net;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "interface: {} ({}) link {}",
        n.iface.as_deref().unwrap_or("-"),
        n.mac.as_deref().unwrap_or("-"),
        if n.link { "up" } else { "down" }
    );
    let _ = writeln!(
        o,
        "address:   {}  router {}  dhcp {}  lease left {}s  server {}",
        n.addr.as_deref().unwrap_or("-"),
        n.router.as_deref().unwrap_or("-"),
        if n.dhcp_state.is_empty() {
            "-"
        } else {
            &n.dhcp_state
        },
        n.lease_left_s.map_or("-".into(), |x| x.to_string()),
        n.server.as_deref().unwrap_or("-"),
    );
    let _ = write!(
        o,
        "dns:       {}  leases {}",
        if n.dns.is_empty() {
            "-".into()
        } else {
            n.dns.join(" ")
        },
        n.leases
    );
    if let Some(note) = &n.note {
        let _ = write!(o, "\nnote:      {note}");
    }
    o
}

fn cells_table(s: &Snapshot) -> String {
    let mut o = format!(
        "{:<14} {:<8} {:>7} {:>6} {:>8}  {}",
        "CELL", "PHASE", "PID", "STARTS", "RESTARTS", "LAST EXIT"
    );
    for c in &s.cells {
        let phase = serde_json::to_value(c.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut last = c.last_exit.map_or("-".into(), |e| e.to_string());
        if let Some(ms) = c.next_start_in_ms {
            let _ = write!(last, " (restart in {ms} ms)");
        }
        if let Some(err) = &c.last_error {
            let _ = write!(last, " [{err}]");
        }
        if c.hung_kills > 0 {
            let _ = write!(last, " (killed {}x: monitor silent)", c.hung_kills);
        }
        let _ = write!(
            o,
            "\n{:<14} {:<8} {:>7} {:>6} {:>8}  {}",
            c.name,
            phase,
            c.pid.map_or("-".into(), |p| p.to_string()),
            c.starts,
            c.restarts,
            last
        );
    }
    if s.cells.is_empty() {
        o.push_str("\n(no cells)");
    }
    o
}

/// Answer a command. `monitor` is the base cell's monitor address.
pub fn execute(cmd: &Command, shared: &Shared, monitor: SocketAddr) -> (String, Request) {
    let s = shared.get();
    let query = || crate::monitor::status(monitor, Duration::from_millis(1500));
    match cmd {
        Command::Empty => (String::new(), Request::None),
        Command::Help => (HELP.to_string(), Request::None),
        Command::Status => {
            let node = match query() {
                Ok(v) => node_line(&v),
                Err(e) => format!("unavailable ({e})"),
            };
            let dropped = crate::logring::dropped();
            let text = format!(
                "borg {} pid {} rss {} KiB uptime {} host {}\nnet:   {} via {} (link {}, dhcp {})\ndata:  {} {}\nleds:  {} ({})\nlog:   dropped {} (console too slow) {} (cell over rate)\nnode:  {}{}",
                env!("CARGO_PKG_VERSION"),
                crate::sys::getpid(),
                rss_kib().map_or("?".into(), |k| k.to_string()),
                uptime(&s),
                s.hostname,
                s.net.addr.as_deref().unwrap_or("no address"),
                s.net.router.as_deref().unwrap_or("-"),
                if s.net.link { "up" } else { "down" },
                if s.net.dhcp_state.is_empty() { "-" } else { &s.net.dhcp_state },
                s.data_dir,
                s.data_note,
                s.led.name(),
                s.led_backend,
                dropped.console,
                dropped.rate,
                node,
                if s.faults.is_empty() {
                    String::new()
                } else {
                    format!("\nfault: {}", s.faults.join("; "))
                }
            );
            (text, Request::None)
        }
        Command::Tree => match query() {
            Ok(v) => {
                let mut o = String::new();
                for k in [
                    "state",
                    "position",
                    "parent",
                    "children",
                    "root",
                    "size",
                    "depth",
                    "public_key",
                ] {
                    let val = v.get(k).map_or("-".into(), |x| match x {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    });
                    let _ = writeln!(o, "{k:<11} {val}");
                }
                (o.trim_end().to_string(), Request::None)
            }
            Err(e) => (format!("tree unavailable: {e}"), Request::None),
        },
        Command::Cells => (cells_table(&s), Request::None),
        Command::Net => {
            let nat = match query() {
                Ok(v) => nat_lines(&v),
                Err(e) => format!("nat role:  unavailable ({e})"),
            };
            (format!("{}{nat}", net_lines(&s)), Request::None)
        }
        Command::Log(n) => (crate::logring::tail(*n).join("\n"), Request::None),
        Command::Leds => (
            format!(
                "state {} backend {}\npatterns: booting=fast blink, no_link=power LED slow blink, \
                 no_address=1 flash/s, alone=2 flashes/2s, joined=on, root=on with blip, \
                 updating=alternating, fault=power LED fast blink",
                s.led.name(),
                s.led_backend
            ),
            Request::None,
        ),
        Command::Reboot => ("rebooting...".into(), Request::Reboot),
        Command::Poweroff => ("powering off...".into(), Request::Poweroff),
        Command::Unknown(w) => (
            format!("unknown command '{w}'. Type 'help' for the list of commands."),
            Request::None,
        ),
    }
}

/// Serve the prompt on a line-oriented stream until it ends. `on_request` is called for
/// `reboot`/`poweroff`.
pub fn serve(
    input: impl std::io::Read,
    mut output: impl Write,
    shared: &Shared,
    monitor: SocketAddr,
    on_request: &dyn Fn(Request),
) {
    let mut reader = BufReader::new(input);
    let mut line = String::new();
    loop {
        let _ = output.write_all(PROMPT.as_bytes());
        let _ = output.flush();
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        let cmd = parse(&line);
        // A bug in one command must not take the console down with it.
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            execute(&cmd, shared, monitor)
        }));
        let (text, req) = answer.unwrap_or_else(|_| {
            (
                "internal error (logged); the console is still here".to_string(),
                Request::None,
            )
        });
        if !text.is_empty() {
            let _ = output.write_all(text.as_bytes());
            let _ = output.write_all(b"\n");
            let _ = output.flush();
        }
        if req != Request::None {
            on_request(req);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse("status\n"), Command::Status);
        assert_eq!(parse("  STATUS  "), Command::Status);
        assert_eq!(parse("log"), Command::Log(20));
        assert_eq!(parse("log 5"), Command::Log(5));
        assert_eq!(parse("log x"), Command::Unknown("log x".into()));
        assert_eq!(parse(""), Command::Empty);
        assert_eq!(parse("sh"), Command::Unknown("sh".into()));
        assert_eq!(parse("status now"), Command::Unknown("status now".into()));
        assert_eq!(parse("poweroff"), Command::Poweroff);
        assert_eq!(parse("?"), Command::Help);
    }

    #[test]
    fn serves_a_session() {
        let shared = Shared::new("borg-test".into(), "/data".into());
        let input = b"help\nbogus\ncells\nstatus\nreboot\n".as_slice();
        let mut out = Vec::new();
        let reqs = std::sync::Mutex::new(vec![]);
        // Nothing listens on port 1: status must say the node is unavailable, not hang.
        let mon = SocketAddr::from(([127, 0, 0, 1], 1));
        serve(input, &mut out, &shared, mon, &|r| {
            reqs.lock().unwrap().push(r)
        });
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(PROMPT));
        assert!(text.contains("poweroff   orderly power-off"));
        assert!(text.contains("unknown command 'bogus'. Type 'help'"));
        assert!(text.contains("(no cells)"));
        assert!(text.contains("node:  unavailable"));
        assert!(text.contains("host borg-test"));
        assert!(text.contains("log:   dropped "), "{text}");
        assert_eq!(*reqs.lock().unwrap(), vec![Request::Reboot]);
    }

    #[test]
    fn node_line_formats_the_contract_fields() {
        let v = serde_json::json!({"state":"root","position":1,"parent":null,"children":[],
            "root":"k","size":1,"depth":0,"nat_role":"gateway"});
        assert_eq!(
            node_line(&v),
            "state=root position=1 size=1 depth=0 children=0 nat=gateway"
        );
    }

    #[test]
    fn nat_lines_show_role_mapping_and_relay() {
        let v = serde_json::json!({"nat_role":"relayed","nat_reason":"relayed by the gateway of this LAN",
            "external_addr":"11.0.0.2:13300/Akey","nat_type":"endpoint_independent",
            "advertised_addr":"11.0.0.2:13300/Akey",
            "mapping":{"state":"none","protocol":null,"external":null,"reason":null},
            "relay":{"key":"Ag","addr":"11.0.0.2:13300","dial":"10.0.1.10:13300"},
            "relaying_for":0,"lan_peers":[{"key":"Ag","addr":"10.0.1.10:13300","role":"gateway"}]});
        let text = nat_lines(&v);
        assert!(
            text.contains("nat role:  relayed (relayed by the gateway of this LAN)"),
            "{text}"
        );
        assert!(
            text.contains("external:  11.0.0.2:13300/Akey  nat type endpoint_independent"),
            "{text}"
        );
        assert!(text.contains("mapping:   none"), "{text}");
        assert!(
            text.contains("relay:     11.0.0.2:13300  relaying for 0  LAN nodes heard 1"),
            "{text}"
        );
    }
}
