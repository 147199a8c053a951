//! Prometheus text for `/metrics`.

use super::*;

/// Render Prometheus text for a snapshot and the counters kept outside the actor.
pub fn render_metrics(s: &Snapshot, net: &NetCounters) -> String {
    let mut out = String::new();
    let t = &s.tree;
    let m = &s.metrics;
    out.push_str("# HELP borg_rejected_total Messages rejected, by reason.\n# TYPE borg_rejected_total counter\n");
    for code in [
        "malformed",
        "bad_signature",
        "stale",
        "replay",
        "too_large",
        "unknown_kind",
        "forbidden",
        "handshake",
        "rate_limited",
        "timeout",
    ] {
        let v = m.rejected.get(code).copied().unwrap_or(0);
        out.push_str(&format!("borg_rejected_total{{reason=\"{code}\"}} {v}\n"));
    }
    let counters: [(&str, &str, u64); 14] = [
        ("borg_frames_in_total", "Frames received.", m.frames_in),
        ("borg_frames_out_total", "Frames sent.", m.frames_out),
        ("borg_dials_total", "Outbound connection attempts.", m.dials),
        (
            "borg_dial_failures_total",
            "Failed outbound connections.",
            m.dial_failures,
        ),
        (
            "borg_outbound_dropped_total",
            "Frames dropped from full queues.",
            m.dropped_outbound,
        ),
        (
            "borg_tree_topology_sent_total",
            "Join/repair messages sent.",
            t.sent_topology,
        ),
        (
            "borg_tree_heartbeats_sent_total",
            "Heartbeats sent.",
            t.sent_heartbeat,
        ),
        (
            "borg_tree_broadcast_sent_total",
            "Broadcast transmissions sent.",
            t.sent_broadcast,
        ),
        (
            "borg_broadcasts_delivered_total",
            "Broadcasts delivered here.",
            t.delivered_broadcasts,
        ),
        (
            "borg_broadcast_duplicates_total",
            "Duplicate broadcasts dropped.",
            t.duplicate_broadcasts,
        ),
        (
            "borg_tree_unauthorized_total",
            "Topology orders refused: sender not entitled.",
            t.rejected_unauthorized,
        ),
        (
            "borg_tree_joins_assigned_total",
            "Positions assigned (root).",
            t.joins_assigned,
        ),
        (
            "borg_tree_repairs_ordered_total",
            "Moves ordered (root).",
            t.repairs_ordered,
        ),
        (
            "borg_broadcast_origin_invalid_total",
            "Broadcasts whose origin envelope did not verify.",
            t.rejected_broadcast_origin,
        ),
    ];
    for (name, help, v) in counters {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    let relay_counters: [(&str, &str, u64); 7] = [
        (
            "borg_relay_limited_total",
            "Relay requests refused by the per-IP rate or the waiting bounds.",
            m.relay_limited,
        ),
        (
            "borg_relay_splices_total",
            "Connections spliced for relayed nodes.",
            m.relay_splices,
        ),
        (
            "borg_relay_failed_total",
            "Relay requests whose node did not connect back.",
            m.relay_failed,
        ),
        (
            "borg_relay_bytes_total",
            "Bytes forwarded for relayed nodes (closed splices).",
            m.relay_bytes,
        ),
        (
            "borg_relay_registrations_total",
            "Nodes that registered with this node as their relay.",
            m.relay_registrations,
        ),
        (
            "borg_relay_refused_total",
            "Relay registrations or requests refused.",
            m.relay_refused,
        ),
        (
            "borg_relayed_dials_total",
            "Outbound connections made through a relay.",
            m.relayed_dials,
        ),
    ];
    for (name, help, v) in relay_counters {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    if let Some(role) = s.status.get("nat_role").and_then(|v| v.as_str()) {
        out.push_str("# HELP borg_nat_role The node's NAT role (1 for the current one).\n# TYPE borg_nat_role gauge\n");
        for r in ["probing", "public", "gateway", "relayed", "local"] {
            out.push_str(&format!(
                "borg_nat_role{{role=\"{r}\"}} {}\n",
                u8::from(r == role)
            ));
        }
    }
    out.push_str(&format!(
        "# HELP borg_links_closed_total Node-to-node links that closed.\n# TYPE borg_links_closed_total counter\nborg_links_closed_total {}\n",
        m.links_closed
    ));
    let links = s
        .status
        .get("connections")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    out.push_str(&format!("# HELP borg_links Node-to-node links open now.\n# TYPE borg_links gauge\nborg_links {links}\n"));
    out.push_str(&net.render());
    let size = s.status.get("size").and_then(|v| v.as_u64()).unwrap_or(0);
    out.push_str(&format!("# HELP borg_tree_size Tree size as this node knows it.\n# TYPE borg_tree_size gauge\nborg_tree_size {size}\n"));
    out.push_str(&time_metrics(&s.status));
    out.push_str(&s.extra_metrics);
    out
}

/// Network time as every cell shows it (the node's one clock).
fn time_metrics(status: &Value) -> String {
    let t = &status["time"];
    let f = |k: &str| t[k].as_f64().unwrap_or(0.0) / 1000.0;
    let mut out = String::new();
    let gauges = [
        (
            "borg_time_synced",
            "1 once network time is synced.",
            if t["synced"].as_bool() == Some(true) {
                1.0
            } else {
                0.0
            },
        ),
        (
            "borg_time_offset_seconds",
            "Network time minus the node's local clock.",
            f("offset_ms"),
        ),
        (
            "borg_time_error_bound_seconds",
            "Bound on the error of network time against the root.",
            f("error_bound_ms"),
        ),
        (
            "borg_time_stratum",
            "Hops from the time root (16: none).",
            t["stratum"].as_f64().unwrap_or(16.0),
        ),
    ];
    for (name, help, v) in gauges {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
        ));
    }
    for (name, help, key) in [
        (
            "borg_time_samples_total",
            "Time answers taken as samples.",
            "samples",
        ),
        (
            "borg_time_rejected_total",
            "Time answers refused (unknown nonce, wrong key, late, out of range).",
            "rejected",
        ),
    ] {
        let v = t[key].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    out
}
