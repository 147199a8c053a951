//! What the actor publishes after every round: the `/status` snapshot (the host's tree and
//! cell fields plus links, ports and NAT), the base view for the node's other cells, the
//! probe candidates, and the neighbourhood that gets reserved slots and the neighbour rate.

use super::*;

impl Actor {
    /// Publish the snapshot, the base view, the probe candidates and the neighbourhood.
    pub(super) fn publish(&mut self) {
        let view = self.host.tree.view();
        let mut status = self.host.status(&view);
        if let Some(obj) = status.as_object_mut() {
            obj.insert("mon".into(), json!(self.cfg.mon.to_string()));
            obj.insert("recp".into(), json!(self.cfg.recp.to_string()));
            obj.insert("heartbeat_ms".into(), json!(self.cfg.heartbeat_ms));
            obj.insert("uptime_s".into(), json!(self.started.elapsed().as_secs()));
            obj.insert("connections".into(), json!(self.links.len()));
        }
        if self.cfg.base.is_none() {
            self.base_view_tx.send_if_modified(|old| {
                let new = BaseView {
                    state: Some(view.state),
                    size: view.size,
                    contacts: old.contacts.clone(),
                    root: view.root.clone(),
                    parent: view.parent.as_ref().map(|p| p.peer.clone()),
                    children: view.children.iter().map(|c| c.peer.clone()).collect(),
                };
                if *old != new {
                    *old = new;
                    true
                } else {
                    false
                }
            });
        }
        if let (Some(st), Some(obj)) = (self.nat_status.as_ref(), status.as_object_mut()) {
            if let Some(extra) = st.to_json().as_object() {
                for (k, v) in extra {
                    obj.insert(k.clone(), v.clone());
                }
            }
            obj.insert("relaying_for".into(), json!(self.relayed_for.len()));
            if let Some(n) = self.nat.as_ref() {
                let dropped = n
                    .probe_ctx
                    .beacons_dropped
                    .load(std::sync::atomic::Ordering::Relaxed);
                obj.insert("beacons_dropped".into(), json!(dropped));
                let unproven = n
                    .probe_ctx
                    .gateway_claims_unproven
                    .load(std::sync::atomic::Ordering::Relaxed);
                obj.insert("gateway_claims_unproven".into(), json!(unproven));
            }
            obj.insert(
                "relay_limited".into(),
                json!(self
                    .relay_hub
                    .limited_total
                    .load(std::sync::atomic::Ordering::Relaxed)),
            );
            obj.insert(
                "relay_splices_active".into(),
                json!(self
                    .relay_hub
                    .active
                    .load(std::sync::atomic::Ordering::Relaxed)),
            );
        }
        // Probe candidates: contacts and tree neighbours.
        let mut cands: Vec<(Option<PublicKey>, String)> = self
            .cfg
            .join
            .iter()
            .map(|a| (None, a.to_string()))
            .collect();
        let mut add = |p: &borg_proto::tree::Peer| cands.push((Some(p.key), p.addr.clone()));
        if let Some(r) = view.root.as_ref() {
            add(r);
        }
        if let Some(p) = view.parent.as_ref() {
            add(&p.peer);
        }
        for c in &view.children {
            add(&c.peer);
        }
        // The neighbourhood gets the reserved connection slots and the neighbour's rate.
        let mut keys = std::collections::HashSet::new();
        let mut ips = std::collections::HashSet::new();
        ips.insert(self.cfg.listen.ip());
        for (k, a) in cands.iter().skip(self.cfg.join.len()) {
            if let Some(k) = k {
                keys.insert(*k);
            }
            match a.parse::<PeerAddr>() {
                Ok(PeerAddr::Direct(sock)) => {
                    ips.insert(sock.ip());
                }
                Ok(PeerAddr::Relayed { relay, .. }) => {
                    ips.insert(relay.ip());
                }
                Err(_) => {}
            }
        }
        self.trusted.set(keys, ips);
        self.candidates.send_if_modified(|old| {
            if *old != cands {
                *old = cands;
                true
            } else {
                false
            }
        });
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.relay_splices = self.relay_hub.spliced_total.load(Relaxed);
        self.metrics.relay_failed = self.relay_hub.failed_total.load(Relaxed);
        self.metrics.relay_bytes = self.relay_hub.bytes_total.load(Relaxed);
        self.metrics.relay_limited = self.relay_hub.limited_total.load(Relaxed);
        let snap = Snapshot {
            status,
            tree: self.host.tree.stats.clone(),
            metrics: self.metrics.clone(),
            extra_metrics: self.host.cell_metrics(),
        };
        self.snapshot.send_replace(Arc::new(snap));
    }
}
