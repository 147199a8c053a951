//! Updates, the node side (issue 12; docs/OTA.md): the base cell's behaviour.
//!
//! Updates are a property of the node, not a service one of its cells offers, and every node
//! runs the base tree, so this is part of peerTreeNet (its kind prefix `release.`) rather
//! than a cell of its own: a release broadcast down the base tree reaches every node, with
//! no tree, ports or DNA of its own to join first.
//!
//! What it does now (the trust and gathering half; fetching and installing come next):
//! - **Trust root**: the image's ([`disk::image_root_path`]), or the newer head of the chain
//!   saved in `<data>/ota.json`. Without one the node takes no release at all.
//! - **Publish** (`release.publish` on the receptor, any key: the file speaks for itself): a
//!   release file with at least one valid maintainer approval is merged into the [`book`]
//!   and, when it brought something new, broadcast down the base tree as
//!   `{"release": <file>}` with every approval this node holds for it.
//! - **Gather**: every node merges the approvals of a release by manifest digest, whoever
//!   published them and wherever, so maintainers approve from anywhere and every node ends
//!   up with the union; a release counts as approved when k count (`borg_ota::verify`,
//!   with the time floor). Broadcast deliveries are merged and never re-broadcast (the tree
//!   already carries them everywhere).
//! - **Catch up**: when a tree neighbour appears (a restart, a new parent or child), each
//!   gathered release is offered to it (`release.offer`, accepted from tree neighbours only);
//!   an offer that taught the receiver something is broadcast from there, so a node that was
//!   down during a publish heals the network's view.
//! - **Audit**: every approval seen, every change of a release's count or verdict, roots and
//!   refusals go to the audit ring of [`OtaState`], shown by `release.log`
//!   (`borg release log`).
//! - **Persist**: state and gathered releases in the data dir, atomically ([`disk`]).
//!
//! Bounds, per source and in total: a release file at most 64 KiB with at most 64 approvals
//! (decode time); at most [`book::MAX_PENDING`] releases kept, at most
//! [`book::MAX_WAITING_PER_KEY`] below the threshold behind any one key, with at most one
//! approval per root key; signature checks at most [`book::VERIFY_PER_S`] a second in each of
//! three budgets (publishes, broadcasts, neighbours' offers), and none for status or reports;
//! an offer from a key that is not a tree neighbour is refused before it is parsed;
//! a node broadcasts a release only when it learned something new, so replaying a release
//! makes no traffic; the receptor's own per-IP rate and size bounds come first.

pub mod book;
pub mod disk;

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use borg_net::cell::{Cell, CellAction, CellError, CellInit, CellTime, Work, WorkDone};
use borg_net::clock::NetClock;
use borg_ota::state::AuditEvent;
use borg_ota::{Board, OtaState, ReleaseFile, Report, TrustedRoot, Version};
use borg_proto::identity::PublicKey;
use borg_proto::tree::{Target, TreeView};
use serde_json::{json, Value};

use book::{Book, BookError, Meter};

/// Timer period: floor, prune, save (ms).
const TICK_MS: u64 = 10_000;
/// The floor is saved when it rose this much since it was last saved (ms); a power cut
/// loses at most this much of it (the state is saved on every other change anyway).
const FLOOR_SAVE_STEP_MS: u64 = 3_600_000;
/// Every this often (ms) each gathered release is offered to the tree neighbours again, so a
/// broadcast a node dropped (its signature budget spent by a flood) reaches it anyway.
const RE_OFFER_MS: u64 = 600_000;
/// Audit entries `release.log` returns by default, and at most.
const LOG_DEFAULT: usize = 100;

/// Peer message: a gathered release offered to a tree neighbour.
pub const OFFER_KIND: &str = "release.offer";
/// Receptor kinds.
pub const PUBLISH_KIND: &str = "release.publish";
pub const LOG_KIND: &str = "release.log";
/// Receptor kind: one gathered release file (manifest and the approvals that verified here),
/// by manifest digest: what PID 1's installer judges again and installs.
pub const GET_KIND: &str = "release.get";

/// The trust root and the persisted state, when updates are enabled.
struct Trust {
    root: TrustedRoot,
    state: OtaState,
}

#[derive(Debug, Default)]
struct Stats {
    published: u64,
    gossiped: u64,
    offered_in: u64,
    refused: u64,
    busy: u64,
    save_errors: u64,
}

/// The update cell (the base cell's behaviour).
pub struct OtaCell {
    me: PublicKey,
    clock: Arc<NetClock>,
    data_dir: Option<PathBuf>,
    board: Option<Board>,
    trust: Result<Trust, String>,
    book: Book,
    out: VecDeque<CellAction>,
    /// Tree neighbours already offered our releases, and their addresses.
    neighbours: BTreeSet<PublicKey>,
    neighbour_peers: Vec<borg_proto::tree::Peer>,
    next_re_offer: u64,
    dirty: bool,
    saving: bool,
    floor_saved: u64,
    last_error: Option<String>,
    next_tick: u64,
    stats: Stats,
}

impl std::fmt::Debug for OtaCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtaCell")
            .field("me", &self.me.short())
            .finish_non_exhaustive()
    }
}

/// The version of the software this binary is.
pub fn image_version() -> Version {
    // The workspace version is MAJOR.MINOR.PATCH (Cargo requires semver; we add no suffix),
    // so it parses; 0.0.0 would only make every release look newer, never older.
    borg_proto::build::VERSION
        .parse()
        .unwrap_or(Version::new(0, 0, 0))
}

impl OtaCell {
    pub fn new(init: CellInit) -> Self {
        let root_path = disk::image_root_path();
        let mut last_error = None;
        let trust = disk::read_image_root(&root_path)
            .and_then(|signed| TrustedRoot::anchor(&signed).map_err(|e| e.to_string()))
            .map(|image_root| {
                let floor = borg_proto::build::BUILD_UNIX_S * 1000;
                let saved = match &init.data_dir {
                    Some(dir) => disk::read_state(dir).unwrap_or_else(|e| {
                        tracing::warn!("update state unreadable, starting afresh: {e}");
                        last_error = Some(e);
                        None
                    }),
                    None => None,
                };
                let mut state =
                    saved.unwrap_or_else(|| OtaState::new(&image_root, image_version(), floor));
                let root = match state.trusted_root(&image_root) {
                    Ok(r) => r,
                    Err(e) => {
                        last_error = Some(format!("saved trust root: {e}; using the image's"));
                        image_root.clone()
                    }
                };
                if root.version() != state.root.signed.version {
                    let now = state.floor.get();
                    state.root = root.signed_root().clone();
                    state.audit(
                        now,
                        AuditEvent::RootTrusted {
                            version: root.version(),
                        },
                    );
                }
                if state.running != image_version() {
                    let now = state.floor.get();
                    state.set_running(image_version(), now);
                }
                Trust { root, state }
            });
        if let Err(e) = &trust {
            tracing::info!("updates disabled: {e}");
        }
        let mut cell = Self {
            me: init.key,
            clock: init.clock,
            data_dir: init.data_dir,
            board: disk::detect_board(),
            trust,
            book: Book::default(),
            out: VecDeque::new(),
            neighbours: BTreeSet::new(),
            neighbour_peers: Vec::new(),
            next_re_offer: RE_OFFER_MS,
            dirty: false,
            saving: false,
            floor_saved: 0,
            last_error,
            next_tick: 0,
            stats: Stats::default(),
        };
        if let (Some(dir), Ok(_)) = (cell.data_dir.clone(), &cell.trust) {
            match disk::read_pending(&dir) {
                Ok(files) => {
                    let t = CellTime::of(&cell.clock);
                    for f in files {
                        let _ = cell.accept(t, &f, Meter::Saved);
                    }
                }
                Err(e) => cell.last_error = Some(e),
            }
        }
        if let Ok(t) = &cell.trust {
            cell.floor_saved = t.state.floor.get();
        }
        cell
    }

    /// The registry's constructor.
    pub fn boxed(init: CellInit) -> Box<dyn Cell> {
        Box::new(Self::new(init))
    }

    fn trust(&self) -> Result<&Trust, CellError> {
        self.trust
            .as_ref()
            .map_err(|e| CellError::unavailable(format!("this node takes no releases: {e}")))
    }

    /// Raise the floor to network time once cronoTree agreed on it.
    fn observe_time(&mut self, now: CellTime) {
        if !self.clock.is_synced() {
            return;
        }
        if let Ok(t) = &mut self.trust {
            let floor = t.state.observe_time(now.net_ms);
            if floor >= self.floor_saved + FLOOR_SAVE_STEP_MS {
                self.dirty = true;
            }
        }
    }

    /// Merge a release file from `source`; its effect on that release as JSON.
    fn accept(
        &mut self,
        now: CellTime,
        file: &ReleaseFile,
        source: Meter,
    ) -> Result<Value, CellError> {
        self.observe_time(now);
        let board = self.board.clone();
        let Ok(trust) = &mut self.trust else {
            return Err(self
                .trust()
                .err()
                .unwrap_or_else(|| CellError::unavailable("")));
        };
        let view = trust.state.node_view(now.net_ms, board);
        let merged =
            match self
                .book
                .offer(&trust.root, &view, file, now.mono_ms, now.net_ms, source)
            {
                Ok(m) => m,
                Err(e) => {
                    if e == BookError::Busy {
                        self.stats.busy += 1;
                    } else {
                        self.stats.refused += 1;
                    }
                    let (code, status) = e.code();
                    return Err(CellError {
                        status,
                        code,
                        message: e.to_string(),
                    });
                }
            };
        let version = file.manifest.version;
        // What was saved was audited when it first arrived.
        let fresh = source != Meter::Saved;
        for a in merged.added.iter().filter(|_| fresh) {
            trust.state.audit(
                now.net_ms,
                AuditEvent::ApprovalSeen {
                    version,
                    manifest: merged.digest,
                    key: a.key,
                },
            );
        }
        let report = self
            .book
            .report(&trust.root, &merged.digest, &view)
            .ok_or_else(|| CellError::unavailable("the release left the book"))?;
        if merged.changed() && fresh {
            trust.state.note_report(&report, now.net_ms);
            self.dirty = true;
        }
        if report.approved && self.book.mark_approved(&merged.digest, now.net_ms) {
            tracing::info!(
                "release {version} ({}) approved: {} of {} maintainer approvals",
                merged.digest.short(),
                report.counted,
                report.threshold
            );
        }
        let pass_on = merged.changed() && matches!(source, Meter::Publish | Meter::Neighbour);
        if pass_on {
            if let Some(p) = self.book.get(&merged.digest) {
                self.out.push_back(CellAction::Broadcast {
                    payload: json!({ "release": p.file }),
                });
            }
        }
        Ok(json!({
            "version": version.to_string(),
            "manifest": merged.digest.to_string(),
            "new_release": merged.new_release,
            "added": merged.added.len(),
            "counted": report.counted,
            "threshold": report.threshold,
            "approved": report.approved,
            "verdict": report.verdict_code(),
            "broadcast": pass_on,
        }))
    }

    fn decode_release(body: &Value) -> Result<ReleaseFile, CellError> {
        let release = body
            .get("release")
            .ok_or_else(|| CellError::malformed("the body needs \"release\": a release file"))?;
        // The envelope is at most 1 MiB, so this text is too; decode bounds it to 64 KiB.
        ReleaseFile::decode(release.to_string().as_bytes())
            .map_err(|e| CellError::malformed(e.to_string()))
    }

    fn pending_json(&self, trust: &Trust, now: CellTime) -> Vec<Value> {
        let view = trust.state.node_view(now.net_ms, self.board.clone());
        self.book
            .iter()
            .filter_map(|(d, p)| {
                let r: Report = self.book.report(&trust.root, d, &view)?;
                Some(json!({
                    "version": p.file.manifest.version.to_string(),
                    "manifest": d.to_string(),
                    "boards": p.file.manifest.boards,
                    "image": {"sha256": p.file.manifest.image.sha256.to_string(),
                              "size": p.file.manifest.image.size},
                    "expires_ms": p.file.manifest.expires_ms,
                    "counted": r.counted,
                    "threshold": r.threshold,
                    "approved": r.approved,
                    "verdict": r.verdict_code(),
                    "approvals": r.approvals,
                    "first_seen_ms": p.first_seen_ms,
                    "approved_at_ms": p.approved_at_ms,
                }))
            })
            .collect()
    }

    fn log(&self, now: CellTime, body: &Value) -> Result<Value, CellError> {
        let trust = self.trust()?;
        let limit = match body.get("limit") {
            None => LOG_DEFAULT,
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=borg_ota::MAX_AUDIT).contains(&(*n as usize)))
                .ok_or_else(|| {
                    CellError::malformed(format!("limit must be 1 to {}", borg_ota::MAX_AUDIT))
                })? as usize,
        };
        let audit = &trust.state.audit;
        let entries: Vec<_> = audit
            .iter()
            .skip(audit.len().saturating_sub(limit))
            .collect();
        Ok(json!({
            "running": trust.state.running.to_string(),
            "root_version": trust.root.version(),
            "threshold": trust.root.threshold(),
            "floor_ms": trust.state.floor.get(),
            "entries": entries,
            "pending": self.pending_json(trust, now),
        }))
    }

    fn offer_to(&mut self, peer: borg_proto::tree::Peer) {
        for (_, p) in self.book.iter() {
            self.out.push_back(CellAction::Send {
                to: Target::Peer(peer.clone()),
                kind: OFFER_KIND.to_string(),
                body: json!({ "release": p.file }),
            });
        }
    }
}

impl Cell for OtaCell {
    fn kind_prefix(&self) -> &'static str {
        "release."
    }

    fn receptor_kinds(&self) -> &'static [&'static str] {
        &[PUBLISH_KIND, LOG_KIND, GET_KIND]
    }

    fn handle_tree(&mut self, _now: CellTime, view: &TreeView) {
        let now: BTreeSet<PublicKey> = view
            .parent
            .iter()
            .chain(view.children.iter())
            .map(|p| p.peer.key)
            .collect();
        let fresh: Vec<_> = view
            .parent
            .iter()
            .chain(view.children.iter())
            .filter(|p| !self.neighbours.contains(&p.peer.key))
            .map(|p| p.peer.clone())
            .collect();
        self.neighbours = now;
        self.neighbour_peers = view
            .parent
            .iter()
            .chain(view.children.iter())
            .map(|p| p.peer.clone())
            .collect();
        for peer in fresh {
            self.offer_to(peer);
        }
    }

    fn handle_broadcast(&mut self, now: CellTime, _id: &str, origin: &PublicKey, payload: &Value) {
        if *origin == self.me || payload.get("release").is_none() {
            return;
        }
        self.stats.gossiped += 1;
        let result =
            Self::decode_release(payload).and_then(|f| self.accept(now, &f, Meter::Gossip));
        if let Err(e) = result {
            tracing::debug!("release broadcast from {}: {e}", origin.short());
        }
    }

    fn handle_message(
        &mut self,
        now: CellTime,
        from: PublicKey,
        _rx_local_us: u64,
        kind: &str,
        body: &Value,
    ) -> Result<(), CellError> {
        if kind != OFFER_KIND {
            return Err(CellError::unknown_kind(format!("no peer message {kind:?}")));
        }
        if !self.neighbours.contains(&from) {
            return Err(CellError::forbidden(
                "releases are offered by tree neighbours only",
            ));
        }
        self.stats.offered_in += 1;
        let file = Self::decode_release(body)?;
        self.accept(now, &file, Meter::Neighbour).map(|_| ())
    }

    fn handle_request(
        &mut self,
        now: CellTime,
        _from: &PublicKey,
        kind: &str,
        body: &Value,
    ) -> Result<Value, CellError> {
        match kind {
            PUBLISH_KIND => {
                self.trust()?;
                let file = Self::decode_release(body)?;
                let answer = self.accept(now, &file, Meter::Publish)?;
                self.stats.published += 1;
                Ok(answer)
            }
            LOG_KIND => self.log(now, body),
            GET_KIND => {
                self.trust()?;
                let digest: borg_ota::Sha256Hex = body
                    .get("manifest")
                    .and_then(Value::as_str)
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| CellError::malformed("the body needs \"manifest\": 64 hex"))?;
                let p = self.book.get(&digest).ok_or_else(|| {
                    CellError::not_found("no such release is being gathered here")
                })?;
                Ok(json!({ "release": p.file }))
            }
            other => Err(CellError::unknown_kind(format!("no request {other:?}"))),
        }
    }

    fn poll_work(&mut self) -> Option<Work> {
        if !self.dirty || self.saving {
            return None;
        }
        let dir = self.data_dir.clone()?;
        let trust = self.trust.as_ref().ok()?;
        self.dirty = false;
        self.saving = true;
        self.floor_saved = trust.state.floor.get();
        let pending = disk::pending_bytes(self.book.iter().map(|(_, p)| &p.file));
        Some(disk::save_job(dir, trust.state.encode(), pending))
    }

    fn handle_work_done(&mut self, _now: CellTime, done: WorkDone) {
        self.saving = false;
        match done.downcast::<disk::Saved>() {
            Ok(saved) => {
                if let Err(e) = saved.0 {
                    tracing::warn!("{e}");
                    self.stats.save_errors += 1;
                    self.last_error = Some(e);
                    // Try again at the next tick.
                    self.dirty = true;
                }
            }
            Err(_) => {
                self.stats.save_errors += 1;
                self.dirty = true;
            }
        }
    }

    fn handle_timeout(&mut self, now: CellTime) {
        if now.mono_ms < self.next_tick {
            return;
        }
        self.next_tick = now.mono_ms + TICK_MS;
        self.observe_time(now);
        if now.mono_ms >= self.next_re_offer {
            self.next_re_offer = now.mono_ms + RE_OFFER_MS;
            for peer in self.neighbour_peers.clone() {
                self.offer_to(peer);
            }
        }
        let board = self.board.clone();
        if let Ok(trust) = &mut self.trust {
            let view = trust.state.node_view(now.net_ms, board);
            for (digest, why) in self.book.prune(&trust.root, &view) {
                tracing::info!("release {} dropped: {}", digest.short(), why.explain());
                self.dirty = true;
            }
        }
    }

    fn poll_timeout(&self) -> Option<u64> {
        Some(self.next_tick)
    }

    fn poll_action(&mut self, _now: CellTime) -> Option<CellAction> {
        self.out.pop_front()
    }

    fn status(&self, now: CellTime) -> Value {
        let update = match &self.trust {
            Err(reason) => json!({
                "enabled": false,
                "reason": reason,
                "running": image_version().to_string(),
                "phase": "disabled",
            }),
            Ok(t) => {
                let pending = self.pending_json(t, now);
                let approved = pending.iter().any(|p| p["approved"] == true);
                json!({
                    "enabled": true,
                    "running": t.state.running.to_string(),
                    "board": self.board.as_ref().map(|b| b.to_string()),
                    "root_version": t.root.version(),
                    "threshold": t.root.threshold(),
                    "maintainers": t.root.keys().len(),
                    "floor_ms": t.state.floor.get(),
                    "phase": if approved { "approved" } else if pending.is_empty() { "idle" } else { "gathering" },
                    // PID 1 installs an approved release on an A/B appliance (docs/OTA.md).
                    "pending": pending,
                    "last_error": self.last_error,
                })
            }
        };
        json!({ "update": update })
    }

    fn metrics(&self, now: CellTime) -> String {
        let approved = match &self.trust {
            Ok(t) => {
                let view = t.state.node_view(now.net_ms, self.board.clone());
                self.book
                    .iter()
                    .filter(|(d, _)| {
                        self.book
                            .report(&t.root, d, &view)
                            .is_some_and(|r| r.approved)
                    })
                    .count()
            }
            Err(_) => 0,
        };
        let s = &self.stats;
        format!(
            "borg_ota_pending_releases {}\nborg_ota_approved_releases {approved}\n\
             borg_ota_published_total {}\nborg_ota_gossiped_total {}\nborg_ota_offers_in_total {}\n\
             borg_ota_refused_total {}\nborg_ota_busy_total {}\nborg_ota_save_errors_total {}\n",
            self.book.len(),
            s.published,
            s.gossiped,
            s.offered_in,
            s.refused,
            s.busy,
            s.save_errors,
        )
    }
}
