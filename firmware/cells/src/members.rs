//! What the storage cells (shardTree, ftreeFileMgr) share about their members: each node
//! announces itself on its cell's tree by broadcast (its address and an epoch) once it is in
//! the tree and every `announce_ms`, and keeps a bounded directory of the announcements
//! ([`MemberDir`]: admission rate, probation, TTL) from which placement ranks members.

use std::collections::VecDeque;

use borg_net::cell::CellAction;
use borg_proto::identity::PublicKey;
use borg_proto::shard::members::{DirConfig, DirError, MemberDir};
use borg_proto::tree::{Peer, Target, TreeState, TreeView};
use serde_json::Value;

use crate::shard::wire::{member_payload, parse_member};

/// A cell's member directory and its own announcements.
pub struct Membership {
    pub dir: MemberDir,
    my_addr: Option<String>,
    in_tree: bool,
    /// Network time at start: a restarted node announces a higher epoch than before.
    epoch: u64,
    next_announce: u64,
    announce_ms: u64,
}

impl Membership {
    pub fn new(cfg: DirConfig, me: PublicKey, epoch: u64, now: u64, announce_ms: u64) -> Self {
        Self {
            dir: MemberDir::new(cfg, me),
            my_addr: None,
            in_tree: false,
            epoch,
            next_announce: now,
            announce_ms: announce_ms.max(1000),
        }
    }

    /// The address `key` announced, or this node's own tree address for its own key.
    pub fn addr_of(&self, key: &PublicKey) -> Option<&str> {
        if *key == self.me() {
            return self.my_addr.as_deref();
        }
        self.dir.addr_of(key)
    }

    fn me(&self) -> PublicKey {
        self.dir.own()
    }

    /// The cell's tree changed: announce at once on joining it.
    pub fn handle_tree(&mut self, now: u64, view: &TreeView, out: &mut VecDeque<CellAction>) {
        self.my_addr = Some(view.addr.clone());
        let in_tree = matches!(view.state, TreeState::Joined | TreeState::Root)
            || (view.state == TreeState::Alone && view.position.is_some());
        if in_tree && !self.in_tree {
            self.in_tree = true;
            self.announce(now, out);
        }
        self.in_tree = in_tree;
    }

    /// A broadcast of the cell's tree: `None` if it is not an announcement, else whether the
    /// directory took it.
    pub fn handle_broadcast(
        &mut self,
        now: u64,
        origin: &PublicKey,
        payload: &Value,
    ) -> Option<Result<(), DirError>> {
        let (addr, epoch) = parse_member(payload)?;
        Some(
            self.dir
                .handle_announce(now, *origin, &addr, epoch)
                .map(|_| ()),
        )
    }

    /// Announce when due; expire the directory's entries.
    pub fn handle_timeout(&mut self, now: u64, out: &mut VecDeque<CellAction>) {
        if now >= self.next_announce {
            self.announce(now, out);
        }
        if self.dir.poll_timeout().is_some_and(|t| t <= now) {
            self.dir.handle_timeout(now);
        }
    }

    /// The next time [`Membership::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> u64 {
        self.dir
            .poll_timeout()
            .map_or(self.next_announce, |t| t.min(self.next_announce))
    }

    /// Where to send to `key`: the member's announced address, else only over an open link.
    pub fn target(&self, key: &PublicKey) -> Target {
        match self.dir.addr_of(key) {
            Some(addr) => Target::Peer(Peer {
                key: *key,
                mon: addr.to_string(),
                addr: addr.to_string(),
            }),
            None => Target::Key(*key),
        }
    }

    fn announce(&mut self, now: u64, out: &mut VecDeque<CellAction>) {
        self.next_announce = now + self.announce_ms;
        if let (true, Some(addr)) = (self.in_tree, self.my_addr.as_deref()) {
            out.push_back(CellAction::Broadcast {
                payload: member_payload(addr, self.epoch),
            });
        }
    }
}
