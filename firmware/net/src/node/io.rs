//! Connection tasks: the accept loop, one reader and one writer task per link, and the
//! inbound bounds they apply before a frame reaches the actor.

use super::*;

pub(super) async fn accept_loop(
    mut listener: Listener,
    ctx: LinkCtx,
    hub: Arc<RelayHub>,
    probes: Option<Arc<nat::ProbeCtx>>,
) {
    // Per cell: every cell of a node dials through this (base) port, so one budget for all
    // would let a node's own cells crowd each other out while they are not yet neighbours.
    let mut strangers: HashMap<&'static str, Arc<ConnLimiter>> = HashMap::new();
    loop {
        match listener.accept_incoming().await {
            Ok(Incoming::Peer(conn)) => {
                // Any tree port takes every cell's links; the ALPN says whose.
                let ctx = if conn.cell() == ctx.cell {
                    ctx.clone()
                } else if let Some(other) = ctx.router.get(conn.cell()) {
                    other
                } else {
                    tracing::debug!("link for a cell this node does not run: {}", conn.cell());
                    continue;
                };
                let key = conn.peer_key();
                let slot = if ctx.trusted.has_key(&key) {
                    None
                } else {
                    let limiter = strangers.entry(ctx.cell).or_insert_with(|| {
                        ConnLimiter::new(MAX_UNTRUSTED_LINKS_PER_IP, MAX_UNTRUSTED_LINKS, 0)
                    });
                    match limiter.try_acquire(conn.remote_addr().ip(), false) {
                        Ok(slot) => Some(slot),
                        Err(refusal) => {
                            let c = match refusal {
                                Refusal::PerIp => &ctx.counters.refused_per_ip,
                                Refusal::Total => &ctx.counters.refused_total,
                            };
                            NetCounters::bump(c, Door::Tree);
                            continue;
                        }
                    }
                };
                let remote_ip = conn.remote_addr().ip();
                let (mut reader, writer) = conn.into_split();
                if let Some(slot) = slot {
                    reader.hold(slot);
                }
                spawn_link(reader, writer, key, remote_ip, None, ctx.clone());
            }
            Ok(Incoming::Probe(conn)) => {
                if let Some(probe_ctx) = probes.clone() {
                    tokio::spawn(nat::answer_probe(probe_ctx, conn));
                }
            }
            Ok(Incoming::RelayConnect { tcp, target, from }) => {
                // Rate and waiting bounds per source IP before anything costs a signature
                // or a dial (issue 9 item 8).
                let admission = match hub.admit(from.ip(), std::time::Instant::now()) {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!("relay request from {from} refused: {e}");
                        continue;
                    }
                };
                let (tx, hub) = (ctx.tx.clone(), hub.clone());
                tokio::spawn(async move {
                    let (reply, rx) = oneshot::channel();
                    if tx
                        .send(Inbound::RelayRequest { target, reply })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let Ok(Some(token)) = rx.await else {
                        tracing::debug!("relay request from {from} for {} refused", target.short());
                        return;
                    };
                    if let Err(e) = hub.splice(token, tcp, Some(admission)).await {
                        tracing::debug!("relay {from} -> {}: {e}", target.short());
                    }
                });
            }
            Ok(Incoming::RelayAccept { tcp, token, .. }) => {
                hub.answer(&token, tcp);
            }
            Err(e) => {
                tracing::debug!("inbound connection refused: {e}");
                if matches!(
                    e,
                    TransportError::Handshake { .. } | TransportError::PeerKey { .. }
                ) {
                    // Never wait on the actor for this: a handshake flood must not queue up.
                    let _ = ctx.tx.try_send(Inbound::FrameError { code: "handshake" });
                }
            }
        }
    }
}

static LINK_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub(super) fn spawn_link_conn(conn: conn::PeerConn, dialed_addr: Option<String>, ctx: LinkCtx) {
    let key = conn.peer_key();
    let remote_ip = conn.remote_addr().ip();
    let (reader, writer) = conn.into_split();
    spawn_link(reader, writer, key, remote_ip, dialed_addr, ctx);
}

pub(super) fn spawn_link(
    mut reader: conn::PeerReader,
    writer: PeerWriter,
    key: PublicKey,
    remote_ip: IpAddr,
    dialed_addr: Option<String>,
    ctx: LinkCtx,
) {
    let id = LINK_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (wtx, wrx) = mpsc::channel::<Vec<u8>>(OUTBOUND_QUEUE);
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(write_loop(
        writer,
        wrx,
        queued.clone(),
        ctx.counters.clone(),
    ));
    tokio::spawn(async move {
        let tx2 = ctx.tx.clone();
        if tx2
            .send(Inbound::Connected {
                key,
                id,
                writer: wtx,
                queued,
                dialed_addr,
                remote_ip,
            })
            .await
            .is_err()
        {
            return;
        }
        let link_budget = Arc::new(Semaphore::new(LINK_INBOUND_BYTES / BUDGET_UNIT));
        let trusted_at_start = ctx.trusted.has_key(&key);
        let (rate, burst) = if trusted_at_start {
            (TRUSTED_LINK_RATE, TRUSTED_LINK_BURST)
        } else {
            (UNTRUSTED_LINK_RATE, UNTRUSTED_LINK_BURST)
        };
        let mut bucket = Bucket::new(rate, burst, std::time::Instant::now());
        let mut binary_bucket = Bucket::new(
            TRUSTED_LINK_RATE,
            TRUSTED_LINK_BURST,
            std::time::Instant::now(),
        );
        let mut upgraded = trusted_at_start;
        let mut stalled = false;
        let mut idle_periods = 0u32;
        let slot = reader.take_slot();
        let evicted = async {
            match slot.as_ref() {
                Some(slot) => slot.evicted().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(evicted);
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(FRAME_STALL, reader.recv()) => next,
                () = &mut evicted => break,
            };
            let got = match next {
                Ok(got) => got,
                Err(_) => {
                    let trusted = ctx.trusted.has_key(&key);
                    if reader.frame_in_progress() {
                        if stalled {
                            tracing::debug!("{}: half-sent frame stalled", key.short());
                            let _ = tx2.try_send(Inbound::FrameError { code: "timeout" });
                            break;
                        }
                        stalled = true;
                    } else if !trusted {
                        idle_periods += 1;
                        if idle_periods >= UNTRUSTED_IDLE_PERIODS {
                            break;
                        }
                    }
                    continue;
                }
            };
            stalled = false;
            idle_periods = 0;
            match got {
                Ok(Some(bytes)) => {
                    let rx_local_us = ctx.clock.local_us();
                    if !upgraded && ctx.trusted.has_key(&key) {
                        // Became a neighbour: the neighbour's rate from now on.
                        bucket = Bucket::new(
                            TRUSTED_LINK_RATE,
                            TRUSTED_LINK_BURST,
                            std::time::Instant::now(),
                        );
                        upgraded = true;
                    }
                    // Binary stream frames need no signature check and are bounded by the
                    // cell's own stream limits: they draw on the neighbours' rate, so a
                    // client's Wants are not held to a stranger's 100 envelopes a second.
                    let b = if crate::cell::is_binary_frame(&bytes) {
                        &mut binary_bucket
                    } else {
                        &mut bucket
                    };
                    let wait = b.take_or_wait(std::time::Instant::now());
                    if !wait.is_zero() {
                        NetCounters::bump(&ctx.counters.rate_limited, Door::Tree);
                        tokio::time::sleep(wait).await;
                    }
                    let units = u32::try_from(bytes.len() / BUDGET_UNIT + 1).unwrap_or(u32::MAX);
                    let Ok(link) = link_budget.clone().acquire_many_owned(units).await else {
                        break;
                    };
                    let Ok(node) = ctx.node_budget.clone().acquire_many_owned(units).await else {
                        break;
                    };
                    let ev = Inbound::Frame {
                        key,
                        bytes,
                        rx_local_us,
                        _budget: InboundBudget {
                            _link: link,
                            _node: node,
                        },
                    };
                    if tx2.send(ev).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let code = match e {
                        FrameError::TooLarge { .. } => "too_large",
                        _ => "malformed",
                    };
                    let _ = tx2.send(Inbound::FrameError { code }).await;
                    break;
                }
            }
        }
        let _ = tx2.send(Inbound::Closed { key, id }).await;
    });
}

/// Write queued frames in order. A frame the framing refuses as too large is dropped and
/// counted; the link stays up for the next one. Any other error ends the link.
pub(super) async fn write_loop(
    mut writer: PeerWriter,
    mut rx: mpsc::Receiver<Vec<u8>>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    counters: Arc<NetCounters>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    while let Some(frame) = rx.recv().await {
        let res = writer.send(&frame).await;
        queued.fetch_sub(frame.len(), Relaxed);
        match res {
            Ok(()) => {}
            Err(FrameError::TooLarge { .. }) => {
                counters.oversize_outbound.fetch_add(1, Relaxed);
            }
            Err(_) => break,
        }
    }
    let _ = writer.shutdown().await;
}
