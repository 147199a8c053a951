//! Links and queues: sending a sealed frame to a key, a peer or an address, the bounded
//! queues for peers not yet connected, and dials.

use super::*;

impl Actor {
    pub(super) fn send_frame(&mut self, to: Target, frame: Vec<u8>) {
        if frame.len() > MAX_FRAME {
            // Never queued, so it can never take a link down.
            self.counters
                .oversize_outbound
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        match to {
            Target::Key(key) => {
                if self.links.contains_key(&key) {
                    self.write(&key, frame);
                }
            }
            Target::Peer(peer) => {
                if self.links.contains_key(&peer.key) {
                    self.write(&peer.key, frame);
                    return;
                }
                self.queue_pending(peer.key, frame);
                // The freshest address is the one the peer itself signed last.
                let addr = self.peer_addrs.get(&peer.key).cloned().unwrap_or(peer.addr);
                self.dial(Some(peer.key), addr);
            }
            Target::Addr(addr) => {
                let room = self.pending_addr.len() < MAX_PENDING_ADDRS
                    || self.pending_addr.contains_key(&addr);
                if !room || self.pending_bytes + frame.len() > PENDING_BYTES_TOTAL {
                    self.metrics.dropped_outbound += 1;
                    return;
                }
                let q = self.pending_addr.entry(addr.clone()).or_default();
                if q.frames.len() < OUTBOUND_QUEUE
                    && q.bytes + frame.len() <= PENDING_BYTES_PER_PEER
                {
                    q.bytes += frame.len();
                    self.pending_bytes += frame.len();
                    q.frames.push_back(frame);
                } else {
                    self.metrics.dropped_outbound += 1;
                }
                self.dial(None, addr);
            }
        }
    }

    /// Keep `frame` for when a link to `key` is up, within the per-peer and total byte
    /// budgets: the oldest frames for that peer go first.
    pub(super) fn queue_pending(&mut self, key: PublicKey, frame: Vec<u8>) {
        let q = self.pending.entry(key).or_default();
        while !q.frames.is_empty()
            && (q.frames.len() >= OUTBOUND_QUEUE
                || q.bytes + frame.len() > PENDING_BYTES_PER_PEER
                || self.pending_bytes + frame.len() > PENDING_BYTES_TOTAL)
        {
            if let Some(old) = q.frames.pop_front() {
                q.bytes -= old.len();
                self.pending_bytes -= old.len();
                self.metrics.dropped_outbound += 1;
            }
        }
        if self.pending_bytes + frame.len() > PENDING_BYTES_TOTAL {
            self.metrics.dropped_outbound += 1;
            return;
        }
        q.bytes += frame.len();
        self.pending_bytes += frame.len();
        q.frames.push_back(frame);
    }

    pub(super) fn write(&mut self, key: &PublicKey, frame: Vec<u8>) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(link) = self.links.get(key) else {
            return;
        };
        let len = frame.len();
        if link.queued.load(Relaxed) + len > LINK_OUTBOUND_BYTES {
            self.metrics.dropped_outbound += 1;
            return;
        }
        link.queued.fetch_add(len, Relaxed);
        match link.writer.try_send(frame) {
            Ok(()) => self.metrics.frames_out += 1,
            Err(mpsc::error::TrySendError::Full(_)) => {
                link.queued.fetch_sub(len, Relaxed);
                self.metrics.dropped_outbound += 1;
            }
            Err(mpsc::error::TrySendError::Closed(frame)) => {
                self.links.remove(key);
                self.queue_pending(*key, frame);
            }
        }
    }

    pub(super) fn dial(&mut self, key: Option<PublicKey>, addr: String) {
        let now = Instant::now();
        if let Some(started) = self.dialing.get(&addr) {
            if now.duration_since(*started) < DIAL_TIMEOUT + Duration::from_millis(100) {
                return;
            }
        }
        let Ok(parsed) = addr.parse::<PeerAddr>() else {
            return;
        };
        // A node on our own LAN is dialed there, never through a relay (or a router hairpin).
        let lan = key
            .or(match parsed {
                PeerAddr::Relayed { target, .. } => Some(target),
                PeerAddr::Direct(_) => None,
            })
            .and_then(|k| self.lan_addrs.get(&k).map(|a| (k, *a)));
        let route = match (lan, parsed) {
            (Some((k, a)), _) => (Some(k), PeerAddr::Direct(a)),
            (None, PeerAddr::Relayed { relay, target }) => {
                if key.is_some_and(|k| k != target) {
                    return;
                }
                self.metrics.relayed_dials += 1;
                (Some(target), PeerAddr::Relayed { relay, target })
            }
            (None, direct) => (key, direct),
        };
        self.dialing.insert(addr.clone(), now);
        self.metrics.dials += 1;
        let identity = self.identity.clone();
        let tx = self.tx.clone();
        let Some(ctx) = self.link_ctx.clone() else {
            return;
        };
        tokio::spawn(async move {
            let cell = ctx.cell;
            let result = match route {
                (_, PeerAddr::Relayed { relay, target }) => {
                    conn::connect_via_cell(relay, target, cell, &identity, DIAL_TIMEOUT).await
                }
                (k, PeerAddr::Direct(sock)) => {
                    conn::connect_cell(sock, k, cell, &identity, DIAL_TIMEOUT).await
                }
            };
            match result {
                Ok(c) => spawn_link_conn(c, Some(addr), ctx),
                Err(e) => {
                    tracing::debug!("dial {addr} failed: {e}");
                    let _ = tx.send(Inbound::DialFailed { key, addr }).await;
                }
            }
        });
    }
}
