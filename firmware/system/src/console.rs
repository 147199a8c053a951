//! The serial console: a small diagnostics prompt (`borg> `). No login shell, no way to run
//! programs: only the read-only commands below plus `reboot` and `poweroff`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::time::Duration;

use crate::hwclock::{self, TimeStatus};
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
    /// The supervised node process and the cells it hosts.
    Cells,
    /// System clock, network time, clock settings, saved network time.
    Time,
    /// Network details.
    Net,
    /// The last N log lines.
    Log(usize),
    /// LED state and backend.
    Leds,
    /// Updates: running version, trust root, releases being gathered and their approvals.
    Update,
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
  cells      the node process (pid, restarts, last exit) and its cells (state, size, ports)
  time       system clock, network time sync, clock settings, saved network time
  net        interface, DHCP lease, router, NAT role, port mapping, relay
  log [N]    last N log lines (default 20)
  leds       LED state and backend
  update     running version, trust root, releases seen and their approvals
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
        ("time" | "date", None) => Command::Time,
        ("net", None) => Command::Net,
        ("log", None) => Command::Log(20),
        ("log", Some(n)) => match n.parse() {
            Ok(n) => Command::Log(n),
            Err(_) => Command::Unknown(line.trim().to_string()),
        },
        ("leds", None) => Command::Leds,
        ("update" | "updates", None) => Command::Update,
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
        "state={} position={} size={} depth={} children={} nat={} time={}",
        g("state"),
        g("position"),
        g("size"),
        g("depth"),
        g("children"),
        g("nat_role"),
        TimeStatus::from_status(v).map_or("-".into(), |t| t.summary())
    )
}

/// The cells the node hosts, from the `cells` array of peerTreeNet's status.
fn node_cells_table(v: &serde_json::Value) -> String {
    let Some(cells) = v.get("cells").and_then(|c| c.as_array()) else {
        return "(the node reports no cells)".into();
    };
    let g = |c: &serde_json::Value, k: &str| match c.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    };
    let mut o = format!(
        "{:<14} {:<8} {:>5}  {:<21} {:<21} {}",
        "CELL", "STATE", "SIZE", "NET", "RECEPTOR", "MONITOR"
    );
    for c in cells {
        let _ = write!(
            o,
            "\n{:<14} {:<8} {:>5}  {:<21} {:<21} {}",
            g(c, "name"),
            g(c, "state"),
            g(c, "size"),
            g(c, "net"),
            g(c, "recp"),
            g(c, "mon")
        );
    }
    if cells.is_empty() {
        o.push_str("\n(no cells)");
    }
    o
}

/// The `time` command: the system clock, network time from the node, what PID 1 did.
fn time_lines(s: &Snapshot, system_ms: u64) -> String {
    let c = &s.clock;
    let mut o = String::new();
    let _ = writeln!(o, "system:    {}", hwclock::utc_string(system_ms));
    match &s.time {
        Some(t) => {
            // A status made before our last setting of the clock shows the offset we removed.
            let stale = c.last_set.is_some_and(|(_, to)| t.now_ms <= to);
            let sys = match t.system_offset_ms {
                Some(_) if stale => "system clock set since".to_string(),
                Some(x) => format!("system clock {:+.1} ms from it", -x),
                None => "system clock offset unknown".to_string(),
            };
            let _ = writeln!(
                o,
                "network:   {} source {} offset {:+.1} ms, {sys}",
                t.summary(),
                t.source,
                t.offset_ms,
            );
        }
        None => {
            let _ = writeln!(o, "network:   unknown (node not answering)");
        }
    }
    let _ = writeln!(
        o,
        "floor:     {}{}",
        hwclock::utc_string(c.floor_ms),
        c.raised_from_ms.map_or(String::new(), |f| format!(
            " (clock raised from {} at boot)",
            hwclock::utc_string(f)
        ))
    );
    let set = if !c.sets_clock {
        "not by this process (not PID 1 of the appliance)".to_string()
    } else {
        match c.last_set {
            Some((from, to)) => format!(
                "{}x from network time, last {} -> {}",
                c.sets,
                hwclock::utc_string(from),
                hwclock::utc_string(to)
            ),
            None => "not yet from network time".to_string(),
        }
    };
    let _ = write!(
        o,
        "set:       {set}\nsaved:     {}",
        c.saved_ms.map_or("never".into(), hwclock::utc_string)
    );
    if let Some(n) = &c.note {
        let _ = write!(o, "\nnote:      {n}");
    }
    o
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

/// The `update` part of the base cell's status, for `update`.
fn update_lines(v: &serde_json::Value) -> String {
    let u = &v["update"];
    let g = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    if u.is_null() {
        return "update: the node does not report updates".into();
    }
    if u["enabled"] != true {
        return format!(
            "running:   {}\nupdates:   off ({})",
            g(&u["running"]),
            g(&u["reason"])
        );
    }
    let mut o = String::new();
    let _ = writeln!(
        o,
        "running:   {}  board {}  phase {}",
        g(&u["running"]),
        g(&u["board"]),
        g(&u["phase"])
    );
    let _ = write!(
        o,
        "root:      version {}, {} of {} maintainers must approve",
        g(&u["root_version"]),
        g(&u["threshold"]),
        g(&u["maintainers"])
    );
    let pending = u["pending"].as_array().cloned().unwrap_or_default();
    for p in &pending {
        let _ = write!(
            o,
            "\nrelease:   {} manifest {:.12}: {} of {} approvals, {}",
            g(&p["version"]),
            g(&p["manifest"]),
            g(&p["counted"]),
            g(&p["threshold"]),
            g(&p["verdict"])
        );
    }
    if pending.is_empty() {
        o.push_str("\nrelease:   none seen");
    }
    if !u["last_error"].is_null() {
        let _ = write!(o, "\nerror:     {}", g(&u["last_error"]));
    }
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
        "PROCESS", "PHASE", "PID", "STARTS", "RESTARTS", "LAST EXIT"
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
        o.push_str("\n(no processes)");
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
                borg_proto::build::VERSION,
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
        Command::Cells => {
            let cells = match query() {
                Ok(v) => node_cells_table(&v),
                Err(e) => format!("cells unavailable ({e})"),
            };
            (format!("{}\n{cells}", cells_table(&s)), Request::None)
        }
        Command::Time => (time_lines(&s, hwclock::system_now_ms()), Request::None),
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
        Command::Update => {
            let slot = format!(
                "slot:      {}\n",
                s.slot
                    .as_deref()
                    .unwrap_or("- (not booted from an A/B disk)")
            );
            match query() {
                Ok(v) => (format!("{slot}{}", update_lines(&v)), Request::None),
                Err(e) => (format!("{slot}update unavailable: {e}"), Request::None),
            }
        }
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
        assert!(text.contains("(no processes)"));
        assert!(text.contains("cells unavailable"), "{text}");
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
            "state=root position=1 size=1 depth=0 children=0 nat=gateway time=-"
        );
        let v = serde_json::json!({"state":"joined","position":3,"size":2,"depth":1,
            "children":[],"nat_role":"public","time":{"synced":true,"offset_ms":0.4,
            "error_bound_ms":1.24,"source":"Akey","stratum":2,"now_ms":1796083200000u64,
            "system_offset_ms":0.1}});
        assert_eq!(
            node_line(&v),
            "state=joined position=3 size=2 depth=1 children=0 nat=public time=synced s2 ±1.2ms"
        );
        let mut u = v.clone();
        u["time"]["synced"] = serde_json::Value::Bool(false);
        assert!(
            node_line(&u).ends_with(" time=unsynced"),
            "{}",
            node_line(&u)
        );
    }

    #[test]
    fn update_shows_the_root_and_each_release_with_its_count() {
        let v = serde_json::json!({"update": {"enabled": true, "running": "0.1.0",
            "board": null, "phase": "gathering", "root_version": 1, "threshold": 3,
            "maintainers": 4, "last_error": null,
            "pending": [{"version": "0.2.0", "manifest": "ab".repeat(32), "counted": 2,
                         "threshold": 3, "verdict": "not_enough_approvals"}]}});
        let t = update_lines(&v);
        assert_eq!(
            t,
            "running:   0.1.0  board -  phase gathering\n\
             root:      version 1, 3 of 4 maintainers must approve\n\
             release:   0.2.0 manifest abababababab: 2 of 3 approvals, not_enough_approvals"
        );
        let off = serde_json::json!({"update": {"enabled": false, "running": "0.1.0",
            "reason": "no trust root at /etc/borg/ota-root.json"}});
        assert!(update_lines(&off).contains("updates:   off (no trust root"));
        assert_eq!(parse("update"), Command::Update);
    }

    #[test]
    fn cells_lists_the_process_and_the_node_cells() {
        let shared = Shared::new("borg-test".into(), "/data".into());
        shared.lock().cells = vec![crate::supervisor::CellReport {
            name: "node".into(),
            phase: crate::supervisor::Phase::Running,
            pid: Some(42),
            starts: 1,
            restarts: 0,
            failures: 0,
            last_exit: None,
            next_start_in_ms: None,
            last_error: None,
            hung_kills: 0,
        }];
        let t = cells_table(&shared.get());
        assert!(t.starts_with("PROCESS"), "{t}");
        assert!(
            t.contains("\nnode           running       42      1        0  -"),
            "{t}"
        );
        let v = serde_json::json!({"cells":[
            {"name":"peerTreeNet","state":"joined","size":5,"net":"10.0.2.15:13300",
             "recp":"10.0.2.15:13305","mon":"10.0.2.15:13310"},
            {"name":"cronoTree","state":"root","size":1,"net":"10.0.2.15:13396",
             "recp":13397,"mon":null}]});
        let t = node_cells_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[0].starts_with("CELL           STATE     SIZE  NET"),
            "{t}"
        );
        assert_eq!(
            lines[1],
            "peerTreeNet    joined       5  10.0.2.15:13300       10.0.2.15:13305       10.0.2.15:13310"
        );
        assert_eq!(
            lines[2],
            "cronoTree      root         1  10.0.2.15:13396       13397                 -"
        );
        assert_eq!(
            node_cells_table(&serde_json::json!({"state":"root"})),
            "(the node reports no cells)"
        );
    }

    #[test]
    fn time_shows_clock_sync_and_saves() {
        let shared = Shared::new("borg-test".into(), "/data".into());
        let t = time_lines(&shared.get(), 1_796_083_200_000);
        assert!(
            t.starts_with("system:    2026-12-01T00:00:00.000Z\n"),
            "{t}"
        );
        assert!(t.contains("network:   unknown"), "{t}");
        assert!(t.contains("saved:     never"), "{t}");
        {
            let mut s = shared.lock();
            s.time = Some(TimeStatus {
                synced: true,
                offset_ms: 2.0,
                error_bound_ms: Some(0.8),
                source: "bootstrap".into(),
                stratum: Some(1),
                now_ms: 1_796_083_200_000,
                system_offset_ms: Some(-3.0),
            });
            s.clock = hwclock::ClockInfo {
                floor_ms: 1_796_000_000_000,
                raised_from_ms: Some(0),
                saved_ms: Some(1_796_083_100_000),
                sets: 1,
                last_set: Some((1_796_000_000_000, 1_796_083_000_000)),
                sets_clock: true,
                note: None,
            };
        }
        let t = time_lines(&shared.get(), 1_796_083_200_000);
        assert!(
            t.contains("network:   synced s1 ±0.8ms source bootstrap offset +2.0 ms, system clock +3.0 ms from it"),
            "{t}"
        );
        assert!(
            t.contains("(clock raised from 1970-01-01T00:00:00.000Z at boot)"),
            "{t}"
        );
        assert!(
            t.contains("set:       1x from network time, last 2026-"),
            "{t}"
        );
        // A status from before that setting does not show the offset it removed.
        shared.lock().time.as_mut().unwrap().now_ms = 1_796_083_000_000;
        let t = time_lines(&shared.get(), 1_796_083_200_000);
        assert!(
            t.contains("offset +2.0 ms, system clock set since\n"),
            "{t}"
        );
        assert!(t.contains("saved:     2026-11-30T23:58:20.000Z"), "{t}");
        assert_eq!(parse("time"), Command::Time);
        assert_eq!(parse("date"), Command::Time);
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
