//! The shard cell's envelope bodies (kind prefix `shard.`), parsed with their bounds at decode
//! time. Bulk bytes never travel here: they move as binary stream frames
//! (`borg_proto::stream::frame`) on the same link.
//!
//! | kind | body | meaning |
//! |---|---|---|
//! | `shard.has` | `{"addrs": [hex, ...]}` | do you hold these? (repair queries) |
//! | `shard.have` | `{"addrs": [[hex, bool], ...]}` | the answer |
//! | `shard.offer` | `{"stream": u32, "shards": [[hex, len], ...]}` | I hold these for you: pull them with `Want` frames on `stream` |
//! | `shard.stored` | `{"stream": u32, "stored": [hex, ...], "failed": [hex, ...]}` | what the pull of an offer stored |
//! | `shard.ask` | `{"addrs": [hex, ...]}` | offer me these (a fetch): answered by a `shard.offer` of those held and a `shard.have` of those not |
//! | `shard.open` | `{"stream": u32, "addrs": [hex, ...]}` | from any key (a client's get): let me pull these with `Want` frames on `stream` |
//! | `shard.opened` | `{"stream": u32, "held": hex}` | the answer: bit `i` (of byte `i / 8`, from its low bit) set if `addrs[i]` is held here; a refused open is a binary `Close busy` instead |
//!
//! Receptor kind `shard.locate` `{"addrs": [hex, ...]}` is answered
//! `{"holders": [{"key", "addr"}, ...], "ranks": [[i, ...], ...]}`: for each address the
//! members best placed to hold it, best first, as indices into `holders`.
//!
//! Broadcast payload on the shard tree: `{"member": {"addr": "ip:port", "epoch": u64}}`.

use borg_proto::bitmap;
use serde_json::{json, Value};

use borg_proto::shard::placement::ShardAddr;

/// Addresses in one `shard.has` / `shard.have` at most.
pub const MAX_QUERY_ADDRS: usize = 256;
/// Shards in one offer at most.
pub const MAX_OFFER_SHARDS: usize = 64;
/// Shards one `shard.open` names at most (a client opens a stream per batch).
pub const MAX_OPEN_ADDRS: usize = crate::shard::transfer::MAX_CLIENT_STREAM_SHARDS;
/// Addresses one `shard.locate` asks about at most.
pub const MAX_LOCATE_ADDRS: usize = 256;
/// The longest advertised address kept from a member announcement.
pub const MAX_ADDR_LEN: usize = 128;

/// Why a body was refused (always the `malformed` wire code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

fn bad(what: impl Into<String>) -> WireError {
    WireError(what.into())
}

/// Lower-case hex of an address.
pub fn hex(addr: &ShardAddr) -> String {
    addr.iter().map(|b| format!("{b:02x}")).collect()
}

/// An address from exactly 64 lower-case hex digits.
pub fn parse_addr(v: &Value) -> Result<ShardAddr, WireError> {
    let s = v
        .as_str()
        .ok_or_else(|| bad("an address must be a string"))?;
    let b = s.as_bytes();
    if b.len() != 64 {
        return Err(bad("an address is 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let d = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        match (d(pair[0]), d(pair[1])) {
            (Some(h), Some(l)) => out[i] = h << 4 | l,
            _ => return Err(bad("an address is lower-case hex")),
        }
    }
    Ok(out)
}

fn array<'a>(v: &'a Value, field: &str, max: usize) -> Result<&'a Vec<Value>, WireError> {
    let a = v
        .get(field)
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("`{field}` must be a list")))?;
    if a.len() > max {
        return Err(bad(format!(
            "`{field}` lists {} items, at most {max}",
            a.len()
        )));
    }
    Ok(a)
}

fn stream_of(v: &Value) -> Result<u32, WireError> {
    v.get("stream")
        .and_then(Value::as_u64)
        .and_then(|s| u32::try_from(s).ok())
        .ok_or_else(|| bad("`stream` must be a u32"))
}

/// `shard.has`.
pub fn parse_has(body: &Value) -> Result<Vec<ShardAddr>, WireError> {
    array(body, "addrs", MAX_QUERY_ADDRS)?
        .iter()
        .map(parse_addr)
        .collect()
}

pub fn has_body(addrs: &[ShardAddr]) -> Value {
    json!({"addrs": addrs.iter().map(hex).collect::<Vec<_>>()})
}

/// `shard.have`.
pub fn parse_have(body: &Value) -> Result<Vec<(ShardAddr, bool)>, WireError> {
    array(body, "addrs", MAX_QUERY_ADDRS)?
        .iter()
        .map(|pair| match pair.as_array().map(Vec::as_slice) {
            Some([a, Value::Bool(h)]) => Ok((parse_addr(a)?, *h)),
            _ => Err(bad("`addrs` holds [address, bool] pairs")),
        })
        .collect()
}

pub fn have_body(answers: &[(ShardAddr, bool)]) -> Value {
    json!({"addrs": answers.iter().map(|(a, h)| json!([hex(a), h])).collect::<Vec<_>>()})
}

/// `shard.offer`: (stream, [(address, length)]).
pub fn parse_offer(body: &Value) -> Result<(u32, Vec<(ShardAddr, u32)>), WireError> {
    let stream = stream_of(body)?;
    let shards = array(body, "shards", MAX_OFFER_SHARDS)?
        .iter()
        .map(|pair| match pair.as_array().map(Vec::as_slice) {
            Some([a, len]) => {
                let len = len
                    .as_u64()
                    .filter(|l| *l <= borg_proto::stream::MAX_SHARD_LEN as u64)
                    .ok_or_else(|| bad("a shard length is at most 256 KiB"))?;
                Ok((parse_addr(a)?, len as u32))
            }
            _ => Err(bad("`shards` holds [address, length] pairs")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if shards.is_empty() {
        return Err(bad("an offer names at least one shard"));
    }
    Ok((stream, shards))
}

pub fn offer_body(stream: u32, shards: &[(ShardAddr, u32)]) -> Value {
    json!({"stream": stream, "shards": shards.iter().map(|(a, l)| json!([hex(a), l])).collect::<Vec<_>>()})
}

/// `shard.stored`: (stream, stored, failed).
pub fn parse_stored(body: &Value) -> Result<(u32, Vec<ShardAddr>, Vec<ShardAddr>), WireError> {
    let stream = stream_of(body)?;
    let list = |f| -> Result<Vec<ShardAddr>, WireError> {
        array(body, f, MAX_OFFER_SHARDS)?
            .iter()
            .map(parse_addr)
            .collect()
    };
    Ok((stream, list("stored")?, list("failed")?))
}

pub fn stored_body(stream: u32, stored: &[ShardAddr], failed: &[ShardAddr]) -> Value {
    json!({
        "stream": stream,
        "stored": stored.iter().map(hex).collect::<Vec<_>>(),
        "failed": failed.iter().map(hex).collect::<Vec<_>>(),
    })
}

/// `shard.ask`.
pub fn parse_ask(body: &Value) -> Result<Vec<ShardAddr>, WireError> {
    array(body, "addrs", MAX_OFFER_SHARDS)?
        .iter()
        .map(parse_addr)
        .collect()
}

/// `addrs`: 1..=`max` addresses.
fn some_addrs(body: &Value, max: usize) -> Result<Vec<ShardAddr>, WireError> {
    let addrs = array(body, "addrs", max)?
        .iter()
        .map(parse_addr)
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(bad("`addrs` names at least one shard"));
    }
    Ok(addrs)
}

/// `shard.open`: (stream, addresses), at most [`MAX_OPEN_ADDRS`], at least one.
pub fn parse_open(body: &Value) -> Result<(u32, Vec<ShardAddr>), WireError> {
    let stream = stream_of(body)?;
    Ok((stream, some_addrs(body, MAX_OPEN_ADDRS)?))
}

pub fn open_body(stream: u32, addrs: &[ShardAddr]) -> Value {
    json!({"stream": stream, "addrs": addrs.iter().map(hex).collect::<Vec<_>>()})
}

pub fn opened_body(stream: u32, held: &[bool]) -> Value {
    json!({"stream": stream, "held": bitmap::to_hex(&bitmap::pack(held))})
}

/// `shard.opened` for a stream of `n` shards: (stream, held flags).
pub fn parse_opened(body: &Value, n: usize) -> Result<(u32, Vec<bool>), WireError> {
    let stream = stream_of(body)?;
    let bytes = body
        .get("held")
        .and_then(Value::as_str)
        .and_then(|t| bitmap::from_hex(t, n))
        .ok_or_else(|| {
            bad(format!(
                "`held` must be {} lowercase hex digits, no bit past shard {n}",
                n.div_ceil(8) * 2
            ))
        })?;
    Ok((stream, bitmap::unpack(&bytes, n)))
}

/// `shard.locate` (receptor): addresses, at most [`MAX_LOCATE_ADDRS`], at least one.
pub fn parse_locate(body: &Value) -> Result<Vec<ShardAddr>, WireError> {
    some_addrs(body, MAX_LOCATE_ADDRS)
}

/// A member announcement broadcast: (addr, epoch).
pub fn parse_member(payload: &Value) -> Option<(String, u64)> {
    let m = payload.get("member")?;
    let addr = m.get("addr")?.as_str()?;
    if addr.len() > MAX_ADDR_LEN || addr.parse::<std::net::SocketAddr>().is_err() {
        return None;
    }
    Some((addr.to_string(), m.get("epoch")?.as_u64()?))
}

pub fn member_payload(addr: &str, epoch: u64) -> Value {
    json!({"member": {"addr": addr, "epoch": epoch}})
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bodies_round_trip() {
        let a = [0xabu8; 32];
        assert_eq!(parse_has(&has_body(&[a])).unwrap(), vec![a]);
        assert_eq!(
            parse_have(&have_body(&[(a, true)])).unwrap(),
            vec![(a, true)]
        );
        assert_eq!(
            parse_offer(&offer_body(7, &[(a, 5)])).unwrap(),
            (7, vec![(a, 5)])
        );
        assert_eq!(
            parse_stored(&stored_body(7, &[a], &[])).unwrap(),
            (7, vec![a], vec![])
        );
        assert_eq!(parse_open(&open_body(9, &[a])).unwrap(), (9, vec![a]));
        let held = [true, false, false, true, false, false, false, false, true];
        assert_eq!(
            parse_opened(&opened_body(3, &held), held.len()).unwrap(),
            (3, held.to_vec())
        );
        assert!(parse_opened(&opened_body(3, &held), 8).is_err());
        assert!(parse_opened(&json!({"stream": 3, "held": "zz"}), 4).is_err());
        assert_eq!(parse_locate(&json!({"addrs": [hex(&a)]})).unwrap(), vec![a]);
        assert_eq!(
            parse_member(&member_payload("10.0.0.1:13350", 9)),
            Some(("10.0.0.1:13350".into(), 9))
        );
    }

    #[test]
    fn bounds_are_refused() {
        let a = hex(&[1u8; 32]);
        let many: Vec<Value> = (0..=MAX_QUERY_ADDRS).map(|_| json!(a)).collect();
        assert!(parse_has(&json!({"addrs": many})).is_err());
        let many: Vec<Value> = (0..=MAX_OPEN_ADDRS).map(|_| json!(a)).collect();
        assert!(parse_open(&json!({"stream": 1, "addrs": many})).is_err());
        assert!(parse_open(&json!({"stream": 1, "addrs": []})).is_err());
        assert!(parse_locate(&json!({"addrs": []})).is_err());
        let many: Vec<Value> = (0..=MAX_LOCATE_ADDRS).map(|_| json!(a)).collect();
        assert!(parse_locate(&json!({"addrs": many})).is_err());
        let big = json!({"stream": 1, "shards": [[a, 256 * 1024 + 1]]});
        assert!(parse_offer(&big).is_err());
        assert!(parse_offer(&json!({"stream": 1, "shards": []})).is_err());
        assert!(parse_offer(&json!({"stream": 1u64 << 33, "shards": [[a, 1]]})).is_err());
        assert!(parse_addr(&json!(hex(&[0xab; 32]).to_uppercase())).is_err());
        assert!(parse_addr(&json!(hex(&[0xab; 32]))).is_ok());
        assert!(parse_member(&json!({"member": {"addr": "not an address", "epoch": 1}})).is_none());
    }

    proptest! {
        #[test]
        fn any_json_never_panics(s in ".{0,200}", n in any::<u64>()) {
            for body in [json!({"addrs": [s.clone()]}), json!({"stream": n, "shards": [[s.clone(), n]]}),
                         json!({"stream": n, "stored": [s.clone()], "failed": []}),
                         json!({"stream": n, "addrs": [s.clone()]}),
                         json!({"stream": n, "held": s.clone()}),
                         json!({"member": {"addr": s.clone(), "epoch": n}}), json!(s.clone())] {
                let _ = parse_has(&body);
                let _ = parse_have(&body);
                let _ = parse_offer(&body);
                let _ = parse_stored(&body);
                let _ = parse_ask(&body);
                let _ = parse_open(&body);
                let _ = parse_locate(&body);
                let _ = parse_opened(&body, (n % 2000) as usize);
                let _ = parse_member(&body);
            }
        }
    }
}
