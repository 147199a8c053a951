//! Bodies of ftreeFileMgr's peer messages and their bounds, parsed before anything is done
//! with them. Every request carries `q`, a number the asker picks and the answer echoes.
//!
//! | kind | body | answer |
//! |---|---|---|
//! | `file.index` | `{q, manifest}` | `file.indexed {q, id, ok, code?}` |
//! | `file.fetch` | `{q, owner, id}` | `file.fetched {q, manifest \| null}` |
//! | `file.list` | `{q, owner}` | `file.listed {q, files, truncated}` |
//! | `file.unindex` | `{q, delete}` | `file.unindexed {q, id, removed}` |
//! | `file.sync` | `{owner, ids}` | `file.need {owner, ids}` + `file.unindex` for deleted ids |

use borg_files::FileId;
use borg_proto::envelope::MAX_ENVELOPE_BYTES;
use borg_proto::identity::PublicKey;
use serde_json::{json, Value};

use super::index::Summary;

/// Files listed in one `file.listed` at most (a listing of more is `truncated`).
pub const MAX_LIST: usize = 1_000;
/// File ids in one `file.sync` or `file.need` at most.
pub const MAX_SYNC_IDS: usize = 256;

/// A body that breaks the rules: the text says which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

fn bad(text: impl Into<String>) -> WireError {
    WireError(text.into())
}

pub fn q_of(body: &Value) -> Result<u64, WireError> {
    body.get("q")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("needs q (a number)"))
}

/// An envelope carried as a string field (a manifest, a delete), bounded.
pub fn envelope_field<'a>(body: &'a Value, name: &str) -> Result<&'a str, WireError> {
    let text = body
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("needs {name} (an envelope as a string)")))?;
    if text.len() > MAX_ENVELOPE_BYTES {
        return Err(bad(format!("{name} is over {MAX_ENVELOPE_BYTES} bytes")));
    }
    Ok(text)
}

pub fn owner_of(body: &Value) -> Result<PublicKey, WireError> {
    let text = body
        .get("owner")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("needs owner (a public key)"))?;
    if text.len() > 64 {
        return Err(bad("owner is too long"));
    }
    PublicKey::from_b64(text).map_err(|e| bad(format!("owner: {e}")))
}

pub fn id_of(body: &Value) -> Result<FileId, WireError> {
    let text = body
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("needs id (64 hex)"))?;
    text.parse::<FileId>().map_err(|e| bad(format!("id: {e}")))
}

pub fn ids_of(body: &Value) -> Result<Vec<FileId>, WireError> {
    let list = body
        .get("ids")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("needs ids (a list)"))?;
    if list.len() > MAX_SYNC_IDS {
        return Err(bad(format!("more than {MAX_SYNC_IDS} ids")));
    }
    list.iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| bad("an id is not a string"))?
                .parse::<FileId>()
                .map_err(|e| bad(format!("id: {e}")))
        })
        .collect()
}

pub fn ids_body(owner: &PublicKey, ids: &[FileId]) -> Value {
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    json!({ "owner": owner.to_b64(), "ids": ids })
}

/// One listed file as the receptor and `file.listed` show it.
pub fn summary_json(id: &FileId, s: &Summary) -> Value {
    json!({
        "id": id.to_string(), "name": s.name, "media_type": s.media_type, "size": s.size,
        "created_ms": s.created_ms, "shards": s.shards,
    })
}

/// The files of a `file.listed` (each checked for shape; at most [`MAX_LIST`]).
pub fn parse_listed(body: &Value) -> Result<Vec<(FileId, Value)>, WireError> {
    let files = body
        .get("files")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("needs files (a list)"))?;
    if files.len() > MAX_LIST {
        return Err(bad(format!("more than {MAX_LIST} files")));
    }
    files
        .iter()
        .map(|f| {
            let id = id_of(f)?;
            let name = f.get("name").and_then(Value::as_str).unwrap_or("");
            let media = f.get("media_type").and_then(Value::as_str).unwrap_or("");
            if name.len() > borg_files::MAX_NAME_BYTES
                || media.len() > borg_files::MAX_MEDIA_TYPE_BYTES
            {
                return Err(bad("a listed name or media type is too long"));
            }
            let n = |k: &str| f.get(k).and_then(Value::as_u64).unwrap_or(0);
            Ok((
                id,
                json!({
                    "id": id.to_string(), "name": name, "media_type": media,
                    "size": n("size"), "created_ms": n("created_ms"), "shards": n("shards"),
                }),
            ))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bounds_hold() {
        let ids: Vec<String> = (0..=MAX_SYNC_IDS).map(|_| "00".repeat(32)).collect();
        assert!(ids_of(&json!({ "ids": ids })).is_err());
        assert!(ids_of(&json!({ "ids": ["zz"] })).is_err());
        let big = "x".repeat(MAX_ENVELOPE_BYTES + 1);
        assert!(envelope_field(&json!({ "manifest": big }), "manifest").is_err());
        assert!(owner_of(&json!({ "owner": "a".repeat(65) })).is_err());
        let files: Vec<Value> = (0..=MAX_LIST)
            .map(|_| json!({"id": "00".repeat(32)}))
            .collect();
        assert!(parse_listed(&json!({ "files": files })).is_err());
    }

    proptest! {
        /// No body, however odd, makes a parser panic.
        #[test]
        fn parsers_never_panic(text in ".{0,200}", n in any::<u64>()) {
            let bodies = [
                json!({"q": n, "owner": text, "id": text, "ids": [text], "manifest": text}),
                json!({"files": [{"id": text, "name": text}]}),
                json!(text),
            ];
            for b in &bodies {
                let _ = q_of(b);
                let _ = owner_of(b);
                let _ = id_of(b);
                let _ = ids_of(b);
                let _ = envelope_field(b, "manifest");
                let _ = parse_listed(b);
            }
        }
    }
}
