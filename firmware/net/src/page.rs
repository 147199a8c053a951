//! The node's own page: `GET /` on the monitor port, read-only HTML for a user on the LAN with
//! no serial cable (issue 13 item 5).
//!
//! Rendered on the server from the same JSON as `/status`, plus what PID 1 knows on the
//! appliance (the LED state and its recent log lines, from the file named by
//! [`APPLIANCE_FILE_ENV`]). No script, no external resource, no form: the page refreshes itself
//! every few seconds, and its Content-Security-Policy forbids everything but its own inline
//! style, so a peer-supplied string (a key, an address, a log line) can never run as code; and
//! every value is HTML-escaped anyway.

use serde_json::Value;

/// Environment variable naming the JSON file PID 1 keeps with its view of the appliance
/// (`{"led": "...", "log": ["..."], ...}`); unset off the appliance.
pub const APPLIANCE_FILE_ENV: &str = "BORG_APPLIANCE_FILE";
/// The page reads at most this much of that file.
pub const APPLIANCE_FILE_MAX: u64 = 64 * 1024;
/// Seconds between the page's own reloads.
pub const REFRESH_S: u32 = 5;
/// The headers the page is served with (besides its content type).
pub const HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
];
/// Log lines shown at most.
const LOG_LINES: usize = 30;
/// A shown string is cut at this many characters.
const MAX_FIELD: usize = 200;

/// PID 1's view, read from the file named by [`APPLIANCE_FILE_ENV`] (bounded); `None` off the
/// appliance or if the file is missing or not JSON.
pub fn appliance_view() -> Option<Value> {
    use std::io::Read;
    let path = std::env::var_os(APPLIANCE_FILE_ENV)?;
    let file = std::fs::File::open(path).ok()?;
    let mut text = Vec::new();
    file.take(APPLIANCE_FILE_MAX).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Escape text for HTML element content and quoted attribute values; cut long values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_FIELD) + 8);
    for (i, c) in text.chars().enumerate() {
        if i == MAX_FIELD {
            out.push('…');
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as page text: strings as they are, null as a dash, others as JSON.
fn txt(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::String(s) => esc(s),
        other => esc(&other.to_string()),
    }
}

fn row(out: &mut String, name: &str, value: String) {
    out.push_str(&format!(
        "<tr><th scope=\"row\">{name}</th><td>{value}</td></tr>\n"
    ));
}

fn peer(v: &Value) -> String {
    if v.is_null() {
        return "–".into();
    }
    let pos = v
        .get("pos")
        .map(|p| format!("#{} ", txt(p)))
        .unwrap_or_default();
    // Its own page, when its monitor address is a real socket address (so the link can only
    // be http://IP:PORT/, whatever the peer wrote).
    let page = v["mon"]
        .as_str()
        .and_then(|m| m.parse::<std::net::SocketAddr>().ok())
        .map(|m| format!(" (<a href=\"http://{m}/\">its page</a>)"))
        .unwrap_or_default();
    format!(
        "{pos}<code>{}</code> at {}{page}",
        txt(&v["key"]).chars().take(12).collect::<String>(),
        txt(&v["addr"])
    )
}

/// The page for `status` (this node's `/status`) and PID 1's view if there is one.
pub fn render(status: &Value, appliance: Option<&Value>) -> String {
    let state = status["state"].as_str().unwrap_or("unknown");
    let mut out = String::with_capacity(8 * 1024);
    out.push_str(&format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\n\
         <title>BorgIOS node: {}</title>\n<style>\n\
         body{{font-family:system-ui,sans-serif;margin:1rem;max-width:48rem;line-height:1.4}}\n\
         table{{border-collapse:collapse;width:100%;margin-bottom:1rem}}\n\
         th,td{{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #ddd;vertical-align:top;overflow-wrap:anywhere}}\n\
         th{{width:11rem;font-weight:600}}\n\
         pre{{background:#f4f4f4;padding:.5rem;overflow-x:auto;font-size:.85rem}}\n\
         .state{{display:inline-block;padding:.1rem .6rem;border-radius:1rem;background:#e8eefc}}\n\
         </style></head><body>\n<main>\n",
        esc(state)
    ));
    out.push_str(&format!(
        "<h1>BorgIOS node <span class=\"state\">{}</span></h1>\n",
        esc(state)
    ));
    out.push_str(&format!(
        "<p>Read-only; this page reloads every {REFRESH_S} s. The same as JSON: \
         <a href=\"/status\">/status</a>, metrics: <a href=\"/metrics\">/metrics</a>.</p>\n"
    ));

    out.push_str("<h2>Node</h2>\n<table>\n");
    row(
        &mut out,
        "Public key",
        format!("<code>{}</code>", txt(&status["public_key"])),
    );
    row(&mut out, "Address", txt(&status["addr"]));
    row(
        &mut out,
        "Up for",
        format!("{} s", txt(&status["uptime_s"])),
    );
    if let Some(a) = appliance {
        row(&mut out, "LEDs", txt(&a["led"]));
    } else {
        row(
            &mut out,
            "LEDs",
            "– (not running under PID 1: no appliance LEDs)".into(),
        );
    }
    out.push_str("</table>\n");

    out.push_str("<h2>Tree (peerTreeNet)</h2>\n<table>\n");
    row(&mut out, "Position", txt(&status["position"]));
    row(&mut out, "Depth", txt(&status["depth"]));
    row(&mut out, "Tree size", txt(&status["size"]));
    row(&mut out, "Parent", peer(&status["parent"]));
    row(&mut out, "Root", peer(&status["root"]));
    let children = status["children"].as_array().cloned().unwrap_or_default();
    row(
        &mut out,
        "Children",
        if children.is_empty() {
            "none".into()
        } else {
            children.iter().map(peer).collect::<Vec<_>>().join("<br>")
        },
    );
    out.push_str("</table>\n");

    out.push_str("<h2>Reachability</h2>\n<table>\n");
    if status.get("nat_role").is_some() {
        row(&mut out, "NAT role", txt(&status["nat_role"]));
        row(&mut out, "Why", txt(&status["nat_reason"]));
        row(
            &mut out,
            "Advertised address",
            txt(&status["advertised_addr"]),
        );
        row(&mut out, "Port mapping", txt(&status["mapping"]["state"]));
        row(&mut out, "Router", txt(&status["router"]));
    } else {
        row(&mut out, "NAT role", "– (reachability is off)".into());
    }
    out.push_str("</table>\n");

    out.push_str("<h2>Network time</h2>\n<table>\n");
    let t = &status["time"];
    row(&mut out, "Synced", txt(&t["synced"]));
    row(&mut out, "Stratum", txt(&t["stratum"]));
    row(&mut out, "Source", txt(&t["source"]));
    row(
        &mut out,
        "Error bound",
        format!("{} ms", txt(&t["error_bound_ms"])),
    );
    out.push_str("</table>\n");

    out.push_str("<h2>Cells</h2>\n<table>\n<tr><th scope=\"col\">Cell</th><th scope=\"col\">State, position, size</th></tr>\n");
    for c in status["cells"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "<tr><td>{}</td><td>{} · #{} of {} · net {}</td></tr>\n",
            txt(&c["name"]),
            txt(&c["state"]),
            txt(&c["position"]),
            txt(&c["size"]),
            txt(&c["net"])
        ));
    }
    out.push_str("</table>\n");

    out.push_str("<h2>Recent log lines</h2>\n");
    match appliance.and_then(|a| a["log"].as_array()) {
        Some(lines) if !lines.is_empty() => {
            out.push_str("<pre>");
            let skip = lines.len().saturating_sub(LOG_LINES);
            for l in lines.iter().skip(skip) {
                out.push_str(&esc(l.as_str().unwrap_or("")));
                out.push('\n');
            }
            out.push_str("</pre>\n");
        }
        _ => out.push_str("<p>None here: PID 1 keeps the log on the appliance (and its serial console's <code>log</code> command shows it).</p>\n"),
    }
    out.push_str("</main>\n</body></html>\n");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> Value {
        json!({
            "state": "joined", "public_key": "AytO609yhoFqj172Av5tE3H4WVBfjg7RCgb__ZceL7-N",
            "addr": "192.168.1.20:13300", "uptime_s": 42, "position": 3, "depth": 1, "size": 5,
            "parent": {"pos": 1, "key": "Akey1", "addr": "192.168.1.10:13300", "mon": "192.168.1.10:13310"},
            "root": {"key": "Akey1", "addr": "192.168.1.10:13300"},
            "children": [],
            "nat_role": "gateway", "nat_reason": "mapped by UPnP", "advertised_addr": "203.0.113.7:13300",
            "mapping": {"state": "mapped"}, "router": "192.168.1.1",
            "time": {"synced": true, "stratum": 2, "source": "Akey1", "error_bound_ms": 1.5},
            "cells": [{"name": "peerTreeNet", "state": "joined", "position": 3, "size": 5, "net": "192.168.1.20:13300"},
                      {"name": "cronoTree", "state": "joined", "position": 2, "size": 5, "net": "192.168.1.20:13396"}],
        })
    }

    #[test]
    fn the_page_shows_state_tree_nat_time_cells_leds_and_log() {
        let app = json!({"led": "joined", "log": ["boot ok", "node started"]});
        let page = render(&status(), Some(&app));
        for needle in [
            "<span class=\"state\">joined</span>",
            "192.168.1.20:13300",
            "gateway",
            "203.0.113.7:13300",
            "Stratum</th><td>2",
            "cronoTree",
            "LEDs</th><td>joined",
            "node started",
            "http-equiv=\"refresh\"",
            "<a href=\"http://192.168.1.10:13310/\">its page</a>",
        ] {
            assert!(page.contains(needle), "missing {needle:?} in\n{page}");
        }
        let off = render(&status(), None);
        assert!(off.contains("not running under PID 1"));
    }

    #[test]
    fn peer_supplied_strings_cannot_become_markup() {
        let mut st = status();
        st["parent"]["addr"] = json!("<script>alert(1)</script>");
        st["root"]["mon"] = json!("javascript:alert(1)//1.2.3.4:5");
        st["cells"][0]["name"] = json!("\"><img src=x onerror=alert(1)>");
        let app = json!({"led": "x", "log": ["</pre><script>evil()</script>"]});
        let page = render(&st, Some(&app));
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("javascript:"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    }

    #[test]
    fn odd_status_shapes_still_render() {
        for st in [
            json!(null),
            json!({}),
            json!({"cells": 5, "children": "x", "time": []}),
        ] {
            let page = render(&st, Some(&json!([1, 2])));
            assert!(page.starts_with("<!doctype html>"));
            assert!(page.ends_with("</html>\n"));
        }
        let long = "a".repeat(10_000);
        assert!(esc(&long).chars().count() <= MAX_FIELD + 1);
    }
}
