//! Client operations of ftreeFileMgr (receptor kinds, each signed by the owner):
//!
//! | kind | body | answer |
//! |---|---|---|
//! | `file.put` | `{manifest}` (the owner's `file.manifest` envelope as a string) | `{id, stored}` |
//! | `file.get` | `{id}` | `{id, manifest}` |
//! | `file.ls` | `{}` | `{files: [{id, name, media_type, size, created_ms, shards}], truncated}` |
//! | `file.rm` | `{delete}` (the owner's `file.delete` envelope as a string) | `{id, removed}` |
//!
//! The node asks the owner's index holders (itself included if it is one) and answers when
//! enough did: a put when 2 of 3 stored it (or every holder answered), a get at the first
//! manifest that verifies, a listing and a delete when every holder answered; at
//! [`OP_DEADLINE_MS`] with what it has. At most [`MAX_OPS`] operations at once.

use std::collections::{BTreeMap, HashMap};

use borg_files::{check_delete, check_store, delete_target, open_manifest, FileId};
use borg_net::cell::{CellAction, CellError};
use borg_proto::envelope;
use borg_proto::identity::PublicKey;
use serde_json::{json, Value};

use super::disk::{Job, Reply};
use super::{wire, FtreeCell};

pub const RECEPTOR_KINDS: &[&str] = &["file.put", "file.get", "file.ls", "file.rm"];
/// Client operations in progress at most.
pub const MAX_OPS: usize = 128;
/// An operation is answered with what it has after this long (ms).
pub const OP_DEADLINE_MS: u64 = 6_000;

#[derive(Debug)]
enum Kind {
    Put {
        id: FileId,
        acks: usize,
    },
    Get {
        owner: PublicKey,
        id: FileId,
    },
    List {
        files: BTreeMap<FileId, Value>,
        truncated: bool,
    },
    Rm {
        id: FileId,
        removed: bool,
    },
}

#[derive(Debug)]
struct Op {
    ticket: u64,
    deadline: u64,
    asked: Vec<PublicKey>,
    answered: Vec<PublicKey>,
    kind: Kind,
}

/// Operations waiting for index holders.
#[derive(Debug, Default)]
pub(super) struct Ops {
    ops: HashMap<u64, Op>,
    next_q: u64,
    done: u64,
    timed_out: u64,
}

impl Ops {
    pub(super) fn poll_timeout(&self) -> Option<u64> {
        self.ops.values().map(|o| o.deadline).min()
    }

    pub(super) fn status(&self) -> Value {
        json!({"in_progress": self.ops.len(), "done": self.done, "timed_out": self.timed_out})
    }
}

fn files_error(e: borg_files::FilesError) -> CellError {
    CellError {
        status: e.http_status(),
        code: e.code(),
        message: e.to_string(),
    }
}

/// Open an owner's delete envelope: (owner, file id). With `requester`, it must be the signer.
pub(super) fn open_delete(
    text: &str,
    requester: Option<&PublicKey>,
) -> Result<(PublicKey, FileId), CellError> {
    let delete = envelope::verify_signature_only(text.as_bytes())
        .map_err(|e| CellError::malformed(format!("delete: {e}")))?;
    let id = match requester {
        Some(r) => check_delete(r, &delete).map_err(files_error)?,
        None => delete_target(&delete).map_err(files_error)?,
    };
    Ok((delete.from, id))
}

fn unavailable(what: &str) -> CellError {
    CellError::unavailable(format!(
        "no index holder answered the {what} in time; try again"
    ))
}

impl FtreeCell {
    /// What this node lists for `owner`, at most [`wire::MAX_LIST`] (then truncated).
    pub(super) fn listing(&self, owner: &PublicKey) -> (Vec<Value>, bool) {
        let Some(files) = self.files.get(owner) else {
            return (Vec::new(), false);
        };
        let list = files
            .iter()
            .take(wire::MAX_LIST)
            .map(|(id, s)| wire::summary_json(id, s))
            .collect();
        (list, files.len() > wire::MAX_LIST)
    }

    fn new_op(&mut self, now: u64, ticket: u64, asked: Vec<PublicKey>, kind: Kind) -> u64 {
        self.ops.next_q += 1;
        let q = self.ops.next_q;
        self.ops.ops.insert(
            q,
            Op {
                ticket,
                deadline: now + OP_DEADLINE_MS,
                asked,
                answered: Vec::new(),
                kind,
            },
        );
        q
    }

    /// A receptor request of [`RECEPTOR_KINDS`] from `from` (the owner).
    pub(super) fn client_request(
        &mut self,
        now: u64,
        from: PublicKey,
        kind: &str,
        body: &Value,
        ticket: u64,
    ) -> Result<Option<Value>, CellError> {
        let bad = |e: wire::WireError| CellError::malformed(e.0);
        if self.ops.ops.len() >= MAX_OPS {
            return Err(CellError::unavailable(
                "too many file operations in progress here; try again",
            ));
        }
        let holders = self.holders(&from);
        let others: Vec<PublicKey> = holders.iter().copied().filter(|k| *k != self.me).collect();
        let local = holders.contains(&self.me);
        match kind {
            "file.put" => {
                let text = wire::envelope_field(body, "manifest").map_err(bad)?;
                let opened = check_store(&from, text.as_bytes()).map_err(files_error)?;
                let id = opened.id();
                let q = self.new_op(now, ticket, holders, Kind::Put { id, acks: 0 });
                for to in &others {
                    self.send(to, "file.index", json!({"q": q, "manifest": text}));
                }
                if local {
                    if let Err(e) = self.index_manifest(text, Reply::Op(q)) {
                        self.op_indexed(q, self.me, false);
                        tracing::debug!("indexing here: {e}");
                    }
                }
            }
            "file.get" => {
                let id = wire::id_of(body).map_err(bad)?;
                let kind = Kind::Get { owner: from, id };
                let q = self.new_op(now, ticket, holders, kind);
                let ask = json!({"q": q, "owner": from.to_b64(), "id": id.to_string()});
                for to in &others {
                    self.send(to, "file.fetch", ask.clone());
                }
                if local {
                    self.job(Job::Get {
                        owner: from,
                        id,
                        reply: Reply::Op(q),
                    });
                }
            }
            "file.ls" => {
                let kind = Kind::List {
                    files: BTreeMap::new(),
                    truncated: false,
                };
                let q = self.new_op(now, ticket, holders, kind);
                for to in &others {
                    self.send(to, "file.list", json!({"q": q, "owner": from.to_b64()}));
                }
                if local {
                    let (files, truncated) = self.listing(&from);
                    let body = json!({"files": files, "truncated": truncated});
                    self.op_listed(q, self.me, &body);
                }
            }
            "file.rm" => {
                let text = wire::envelope_field(body, "delete").map_err(bad)?;
                let (owner, id) = open_delete(text, Some(&from))?;
                let kind = Kind::Rm { id, removed: false };
                let q = self.new_op(now, ticket, holders, kind);
                for to in &others {
                    self.send(to, "file.unindex", json!({"q": q, "delete": text}));
                }
                if local {
                    self.job(Job::Remove {
                        owner,
                        id,
                        delete: text.as_bytes().to_vec(),
                        reply: Reply::Op(q),
                    });
                }
            }
            _ => {
                return Err(CellError::unknown_kind(format!(
                    "ftreeFileMgr answers {}, not {kind:?}",
                    RECEPTOR_KINDS.join(", ")
                )))
            }
        }
        Ok(None)
    }

    /// A holder's answer to one of our operations (`q` 0 answers anti-entropy: ignored).
    pub(super) fn op_answer(
        &mut self,
        from: PublicKey,
        kind: &str,
        body: &Value,
    ) -> Result<(), CellError> {
        let q = wire::q_of(body).map_err(|e| CellError::malformed(e.0))?;
        if q == 0 {
            return Ok(());
        }
        let Some(op) = self.ops.ops.get(&q) else {
            // Late (answered at the deadline) or never asked: nothing to do.
            return Ok(());
        };
        if !op.asked.contains(&from) || op.answered.contains(&from) {
            return Err(CellError::forbidden("an answer nobody asked for"));
        }
        match kind {
            "file.indexed" => {
                let ok = body.get("ok").and_then(Value::as_bool).unwrap_or(false);
                self.op_indexed(q, from, ok);
            }
            "file.fetched" => {
                let text = wire::envelope_field(body, "manifest")
                    .ok()
                    .map(str::to_string);
                self.op_fetched(q, from, text);
            }
            "file.listed" => self.op_listed(q, from, body),
            "file.unindexed" => {
                let removed = body
                    .get("removed")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                self.op_removed(q, from, removed);
            }
            _ => {}
        }
        Ok(())
    }

    fn answered(&mut self, q: u64, who: PublicKey) -> Option<&mut Op> {
        let op = self.ops.ops.get_mut(&q)?;
        if op.answered.contains(&who) {
            return None;
        }
        op.answered.push(who);
        Some(op)
    }

    fn finish(&mut self, q: u64, result: Result<Value, CellError>) {
        if let Some(op) = self.ops.ops.remove(&q) {
            self.ops.done += 1;
            self.out.push_back(CellAction::Reply {
                ticket: op.ticket,
                result,
            });
        }
    }

    pub(super) fn op_indexed(&mut self, q: u64, who: PublicKey, ok: bool) {
        let Some(op) = self.answered(q, who) else {
            return;
        };
        let Kind::Put { id, acks } = &mut op.kind else {
            return;
        };
        *acks += usize::from(ok);
        let (id, acks) = (*id, *acks);
        let need = op.asked.len().min(2);
        if acks >= need || op.answered.len() == op.asked.len() {
            let result = if acks > 0 {
                Ok(json!({"id": id.to_string(), "stored": acks}))
            } else {
                Err(unavailable("put"))
            };
            self.finish(q, result);
        }
    }

    pub(super) fn op_fetched(&mut self, q: u64, who: PublicKey, text: Option<String>) {
        let Some(op) = self.answered(q, who) else {
            return;
        };
        let Kind::Get { owner, id } = op.kind else {
            return;
        };
        let all = op.answered.len() == op.asked.len();
        // Only a manifest that verifies and is the one asked for counts.
        let good = text.filter(|t| {
            open_manifest(t.as_bytes()).is_ok_and(|m| m.owner() == owner && m.id() == id)
        });
        if let Some(text) = good {
            self.finish(q, Ok(json!({"id": id.to_string(), "manifest": text})));
        } else if all {
            self.finish(q, Err(not_found(&id)));
        }
    }

    pub(super) fn op_listed(&mut self, q: u64, who: PublicKey, body: &Value) {
        let parsed = wire::parse_listed(body);
        let Some(op) = self.answered(q, who) else {
            return;
        };
        let Kind::List { files, truncated } = &mut op.kind else {
            return;
        };
        if let Ok(list) = parsed {
            for (id, v) in list {
                if files.len() < wire::MAX_LIST {
                    files.insert(id, v);
                }
            }
            *truncated |= body.get("truncated").and_then(Value::as_bool) == Some(true);
        }
        if op.answered.len() == op.asked.len() {
            self.finish_list(q);
        }
    }

    fn finish_list(&mut self, q: u64) {
        let Some(op) = self.ops.ops.get_mut(&q) else {
            return;
        };
        let Kind::List { files, truncated } = &mut op.kind else {
            return;
        };
        let mut list: Vec<Value> = std::mem::take(files).into_values().collect();
        list.sort_by_key(|v| std::cmp::Reverse(v["created_ms"].as_u64().unwrap_or(0)));
        let body = json!({"files": list, "truncated": *truncated, "holders": op.answered.len()});
        self.finish(q, Ok(body));
    }

    pub(super) fn op_removed(&mut self, q: u64, who: PublicKey, removed: bool) {
        let Some(op) = self.answered(q, who) else {
            return;
        };
        let Kind::Rm { id, removed: any } = &mut op.kind else {
            return;
        };
        *any |= removed;
        let (id, any) = (*id, *any);
        if op.answered.len() == op.asked.len() {
            self.finish(q, Ok(json!({"id": id.to_string(), "removed": any})));
        }
    }

    /// Answer operations past their deadline with what they have.
    pub(super) fn ops_timeout(&mut self, now: u64) {
        let late: Vec<u64> = self
            .ops
            .ops
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(q, _)| *q)
            .collect();
        for q in late {
            self.ops.timed_out += 1;
            let Some(op) = self.ops.ops.get(&q) else {
                continue;
            };
            let some = !op.answered.is_empty();
            let result = match &op.kind {
                Kind::Put { id, acks } if *acks > 0 => {
                    Ok(json!({"id": id.to_string(), "stored": acks}))
                }
                Kind::Put { .. } => Err(unavailable("put")),
                Kind::Get { id, .. } => Err(not_found(id)),
                Kind::List { .. } if some => {
                    self.finish_list(q);
                    continue;
                }
                Kind::List { .. } => Err(unavailable("listing")),
                Kind::Rm { id, removed } if some => {
                    Ok(json!({"id": id.to_string(), "removed": removed}))
                }
                Kind::Rm { .. } => Err(unavailable("delete")),
            };
            self.finish(q, result);
        }
    }
}

fn not_found(id: &FileId) -> CellError {
    CellError::not_found(format!("no index holder has file {id} of yours"))
}
