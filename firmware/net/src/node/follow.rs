//! The reachability follower: the actor follows the reachability task's decision
//! (advertised address, relay registration, LAN shortcuts) and answers relay orders.

use super::*;

impl Actor {
    // ----- reachability -------------------------------------------------------------------

    /// The reachability task decided something: advertise the new address, follow the
    /// relay, and hand LAN nodes to the tree.
    pub(super) fn start_tree(&mut self, why: &str) {
        if self.join_after.take().is_some() {
            tracing::info!(cell = %self.cfg.cell, "joining as {} ({why})", self.host.my_addr);
            self.host.tree.start(self.cfg.clock.mono_ms());
        }
    }

    pub(super) fn on_nat_status(&mut self, st: Arc<NatStatus>) {
        let now = self.cfg.clock.mono_ms();
        // Only the base cell maps, registers with relays and relays; the others follow it.
        let base = self.cfg.base.is_none();
        let advertise = if base {
            st.decision.advertise.to_string()
        } else {
            self.cell_addr(&st)
        };
        if advertise != self.host.my_addr {
            tracing::info!(cell = %self.cfg.cell, "advertising {advertise} ({})", st.decision.role);
            self.host.set_my_addr(advertise);
        }
        let relay = st
            .decision
            .relay
            .filter(|_| base && st.decision.role == Role::Relayed);
        match (relay, self.my_relay) {
            (Some(r), Some((cur, _))) if r == cur => {}
            (Some(r), _) => {
                self.my_relay = Some((r, 0));
                self.relay_tick();
            }
            (None, _) => self.my_relay = None,
        }
        let port = self.cfg.listen.port();
        let lan_addr = |a: SocketAddr| {
            if base {
                a
            } else {
                SocketAddr::new(a.ip(), port)
            }
        };
        self.lan_addrs = st
            .lan
            .iter()
            .map(|p| (p.key, lan_addr(p.lan_addr)))
            .collect();
        // Only the base tree meets LAN nodes: the other cells follow the base tree (joining
        // and merging through it, `router.rs`), so they never form LAN-only trees of their own.
        for p in st.lan.iter().filter(|_| base) {
            let stale = self
                .met
                .get(&p.key)
                .is_none_or(|at| now.saturating_sub(*at) > 60_000);
            if stale {
                self.met.insert(p.key, now);
                self.host.tree.meet(
                    now,
                    borg_proto::tree::Peer {
                        key: p.key,
                        addr: lan_addr(p.lan_addr).to_string(),
                        mon: String::new(),
                    },
                );
            }
        }
        let decided = st.decision.role != Role::Probing;
        self.nat_status = Some(st);
        if decided {
            self.wait_for_role = false;
            if !self.wait_for_time {
                self.start_tree("NAT role known");
            }
        }
    }

    /// Keep our registration with our relay fresh; forget expired ones we hold.
    pub(super) fn relay_tick(&mut self) {
        let now = self.cfg.clock.mono_ms();
        self.relayed_for.retain(|_, until| *until > now);
        self.met
            .retain(|_, at| now.saturating_sub(*at) <= MET_RETENTION_MS);
        let Some((relay, last)) = self.my_relay else {
            return;
        };
        if now.saturating_sub(last) < RELAY_RENEW_MS && last != 0 {
            return;
        }
        self.my_relay = Some((relay, now));
        let peer = borg_proto::tree::Peer {
            key: relay.key,
            addr: relay.dial.to_string(),
            mon: String::new(),
        };
        let frame = self.seal_reach(&ReachMsg::RelayRegister {});
        self.send_frame(Target::Peer(peer), frame);
    }

    pub(super) fn open_relay(&mut self, target: PublicKey) -> Option<String> {
        let now = self.cfg.clock.mono_ms();
        let registered = self.relayed_for.get(&target).is_some_and(|u| *u > now);
        if !registered || !self.links.contains_key(&target) {
            self.metrics.relay_refused += 1;
            return None;
        }
        let token = nat::relay_token();
        let frame = self.seal_reach(&ReachMsg::RelayOpen {
            token: token.clone(),
        });
        self.write(&target, frame);
        Some(token)
    }

    pub(super) fn on_reach_frame(&mut self, from: PublicKey, kind: &str, body: &Value) {
        let msg = match ReachMsg::from_kind_body(kind, body) {
            Ok(m) => m,
            Err(_) => return self.reject("malformed"),
        };
        let my_role = self.nat_status.as_ref().map(|s| s.decision.role);
        match msg {
            ReachMsg::RelayRegister {} => {
                // Only a node others can reach relays, and only for so many, and only so
                // many from one IP (fresh keys are free: issue 9 item 8).
                let can = matches!(my_role, Some(Role::Public | Role::Gateway));
                let known = self.relayed_for.contains_key(&from);
                let ip = self.links.get(&from).map(|l| l.remote_ip);
                let from_ip = self
                    .relayed_for
                    .keys()
                    .filter(|k| ip.is_some() && self.links.get(k).map(|l| l.remote_ip) == ip)
                    .count();
                if !can
                    || ip.is_none()
                    || (!known
                        && (self.relayed_for.len() >= MAX_RELAYED || from_ip >= MAX_RELAYED_PER_IP))
                {
                    self.metrics.relay_refused += 1;
                    return;
                }
                if self
                    .relayed_for
                    .insert(from, self.cfg.clock.mono_ms() + RELAY_REGISTRATION_MS)
                    .is_none()
                {
                    self.metrics.relay_registrations += 1;
                    tracing::info!(cell = %self.cfg.cell, "relaying for {}", from.short());
                }
            }
            ReachMsg::RelayOpen { token } => {
                let Some((relay, _)) = self.my_relay.filter(|(r, _)| r.key == from) else {
                    return self.reject("forbidden");
                };
                let identity = self.identity.clone();
                let Some(ctx) = self.link_ctx.clone() else {
                    return;
                };
                tokio::spawn(async move {
                    match conn::accept_via(relay.dial, &token, &identity, DIAL_TIMEOUT).await {
                        Ok(c) => match ctx.router.get(c.cell()) {
                            // Relayed links arrive at the base cell; the ALPN names the cell.
                            Some(cell_ctx) => spawn_link_conn(c, None, cell_ctx),
                            None => tracing::debug!("relayed link for a cell we do not run"),
                        },
                        Err(e) => tracing::debug!("answering relay {}: {e}", relay.dial),
                    }
                });
            }
            // Probe messages travel on probe connections only.
            _ => self.reject("forbidden"),
        }
    }

    pub(super) fn seal_reach(&self, msg: &ReachMsg) -> Vec<u8> {
        let (kind, body) = msg.to_kind_body();
        self.host.seal_kind_body(&kind, body)
    }
}

/// The next reachability status, or `None` once the task is gone (never, if there is none).
pub(super) async fn nat_changed(
    rx: Option<&mut watch::Receiver<Arc<NatStatus>>>,
) -> Option<Arc<NatStatus>> {
    match rx {
        Some(rx) => {
            rx.changed().await.ok()?;
            Some(rx.borrow_and_update().clone())
        }
        None => std::future::pending().await,
    }
}
