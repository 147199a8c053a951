//! The signed envelope: the one message format, and the one way to verify it.
//!
//! ```text
//! {"v":1, "kind":"tree.join", "from":"<key>", "addr":"203.0.113.7:13300",
//!  "ts":1763765000123, "nonce":"<base64url of 12 random bytes>", "body":{...}, "sig":"<...>"}
//! ```
//!
//! `sig` is base64url (no padding) of the 64-byte r||s ECDSA P-256/SHA-256 signature, low-S,
//! over the RFC 8785 canonical bytes ([`crate::jcs`]) of the envelope object without `sig`.
//! `addr` is optional and is absent (not `null`) when there is none.
//!
//! [`open`] turns bytes into a [`Verified<Envelope>`], checking in this order:
//! 1. size: more than [`MAX_ENVELOPE_BYTES`] is [`EnvelopeError::TooLarge`], before parsing;
//! 2. syntax: strict JSON ([`crate::jcs::parse_strict`]: duplicate keys at any depth are
//!    refused), exactly the fields above with the right types, `v == 1`, canonical
//!    base64url for `from` (33-byte point), `nonce` (12 bytes) and `sig` (64 bytes);
//! 3. signature: low-S and valid for `from`;
//! 4. time: `|ts - now| <= MAX_CLOCK_SKEW_MS`, else [`EnvelopeError::Stale`];
//! 5. replay: `(from, nonce)` not seen before ([`ReplayCache`]).
//!
//! The signature is checked before the replay cache is touched, so forged envelopes cannot
//! fill the cache or burn a genuine sender's nonce. Nothing outside this module can build a
//! [`Verified`], so code that takes `Verified<Envelope>` cannot act on unchecked input.
//!
//! Because parsing normalizes values (see [`crate::jcs`]) and the canonical form is
//! injective on normalized values, an envelope that verifies means exactly what was signed:
//! re-encoding on the wire (whitespace, key order, escapes, `1.0` for `1`) cannot change the
//! [`Envelope`] that comes out.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::ops::Deref;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand_core::{CryptoRng, RngCore};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::identity::{PublicKey, SecretKey, SIGNATURE_LEN};
use crate::jcs;

/// The only envelope version.
pub const ENVELOPE_VERSION: u32 = 1;
/// Envelopes larger than this are refused before parsing.
pub const MAX_ENVELOPE_BYTES: usize = 1 << 20;
/// Largest accepted distance between `ts` and the receiver's network time.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;
/// Bytes of randomness in a nonce.
pub const NONCE_LEN: usize = 12;
/// A sensible [`ReplayCache`] size for one cell process: at the 60 s retention this absorbs
/// a sustained ~1600 envelopes per second, in about 10 MB.
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;
/// Part of a default [`ReplayCache`] kept for quiet senders: once only this much room is
/// left, senders holding [`QUIET_SENDER_ENTRIES`] or more are refused. An eighth (12,500
/// entries) holds about 50 quiet senders at their full share.
pub const DEFAULT_REPLAY_RESERVE: usize = DEFAULT_REPLAY_CAPACITY / 8;
/// Entries a "quiet" sender holds at most: 256 in the 60 s retention is a sustained ~4
/// envelopes per second, above a tree neighbour's heartbeats and orders (about one per
/// heartbeat) but far below a flood.
pub const QUIET_SENDER_ENTRIES: u32 = 256;
/// How long the replay cache remembers a nonce after its `ts`: twice the skew window, so a
/// receiver clock that steps back by up to [`MAX_CLOCK_SKEW_MS`] cannot reopen the window
/// for an envelope that was already forgotten.
pub const REPLAY_RETENTION_MS: u64 = 2 * MAX_CLOCK_SKEW_MS;

const FIELDS: [&str; 8] = ["v", "kind", "from", "addr", "ts", "nonce", "body", "sig"];

/// A signed message. Build one with [`seal`]; receive one with [`open`].
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub v: u32,
    pub kind: String,
    pub from: PublicKey,
    pub addr: Option<String>,
    pub ts: u64,
    pub nonce: String,
    pub body: Value,
    pub sig: String,
}

/// Proof that a value passed verification. Only this crate can construct one.
#[derive(Debug, Clone)]
pub struct Verified<T>(T);

impl<T> Verified<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(value)
    }

    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Verified<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> AsRef<T> for Verified<T> {
    fn as_ref(&self) -> &T {
        &self.0
    }
}

/// Which side of the window a stale timestamp is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skew {
    /// `ts` is ahead of the receiver's clock.
    Future,
    /// `ts` is behind the receiver's clock.
    Past,
}

impl fmt::Display for Skew {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Skew::Future => "in the future",
            Skew::Past => "in the past",
        })
    }
}

/// Why an envelope was refused. [`EnvelopeError::code`] is the wire error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is larger than {MAX_ENVELOPE_BYTES} bytes")]
    TooLarge,
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("signature does not verify for the sender key")]
    BadSignature,
    #[error("timestamp {ts} is {off_by_ms} ms {skew} of local time {now_ms} (limit {MAX_CLOCK_SKEW_MS} ms)")]
    Stale {
        ts: u64,
        now_ms: u64,
        off_by_ms: u64,
        skew: Skew,
    },
    /// The (from, nonce) pair was seen inside the replay window, or the replay cache is full
    /// (see [`ReplayCache`]).
    #[error("envelope was already received (replay), or the replay cache is full")]
    Replay,
    /// The replay cache is nearly full and this sender already holds more than a quiet
    /// sender's share of it: the flooder is refused, quiet senders still get through.
    #[error("sender is over its share of the replay cache; slow down")]
    RateLimited,
}

impl EnvelopeError {
    /// The error code used on the wire (`{"error":"<code>",...}`) and in metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::TooLarge => "too_large",
            EnvelopeError::Malformed(_) => "malformed",
            EnvelopeError::BadSignature => "bad_signature",
            EnvelopeError::Stale { .. } => "stale",
            EnvelopeError::Replay => "replay",
            EnvelopeError::RateLimited => "rate_limited",
        }
    }
}

impl Envelope {
    /// The envelope as a JSON object, without `sig`: the object whose canonical form is signed.
    fn unsigned_value(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("v".into(), Value::from(self.v));
        map.insert("kind".into(), Value::from(self.kind.as_str()));
        map.insert("from".into(), Value::from(self.from.to_b64()));
        if let Some(addr) = &self.addr {
            map.insert("addr".into(), Value::from(addr.as_str()));
        }
        map.insert("ts".into(), Value::from(self.ts));
        map.insert("nonce".into(), Value::from(self.nonce.as_str()));
        map.insert("body".into(), self.body.clone());
        map
    }

    /// The bytes the signature covers: RFC 8785 canonical JSON of the envelope without `sig`.
    pub fn signed_bytes(&self) -> Vec<u8> {
        jcs::to_vec(&Value::Object(self.unsigned_value()))
    }

    /// The wire form: compact JSON. We emit the canonical form, so the bytes are
    /// deterministic, but receivers accept any key order and whitespace.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut map = self.unsigned_value();
        map.insert("sig".into(), Value::from(self.sig.as_str()));
        jcs::to_vec(&Value::Object(map))
    }
}

/// Sign a new envelope with a fresh random nonce from the OS.
///
/// Numbers in `body` are normalized first ([`jcs::normalize`]: `1.0` becomes `1`), so the
/// returned envelope equals what [`open`] will return for it. `seal` does not check the
/// limits that [`open`] enforces ([`MAX_ENVELOPE_BYTES`], nesting up to [`jcs::MAX_DEPTH`]);
/// a caller that builds bodies from outside data should check `to_bytes().len()`.
pub fn seal(key: &SecretKey, kind: &str, addr: Option<&str>, ts: u64, body: Value) -> Envelope {
    seal_with_rng(&mut rand_core::OsRng, key, kind, addr, ts, body)
}

/// [`seal`] with an explicit nonce source (deterministic tests and simulations).
pub fn seal_with_rng<R: RngCore + CryptoRng>(
    rng: &mut R,
    key: &SecretKey,
    kind: &str,
    addr: Option<&str>,
    ts: u64,
    mut body: Value,
) -> Envelope {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    jcs::normalize(&mut body);
    let mut envelope = Envelope {
        v: ENVELOPE_VERSION,
        kind: kind.to_string(),
        from: key.public(),
        addr: addr.map(str::to_string),
        ts,
        nonce: URL_SAFE_NO_PAD.encode(nonce),
        body,
        sig: String::new(),
    };
    envelope.sig = URL_SAFE_NO_PAD.encode(key.sign(&envelope.signed_bytes()));
    envelope
}

/// Verify an envelope received from the network at network time `now_ms`: size, syntax,
/// signature, time window, then replay (see the module docs for the exact order).
pub fn open(
    bytes: &[u8],
    now_ms: u64,
    replay: &mut ReplayCache,
) -> Result<Verified<Envelope>, EnvelopeError> {
    open_with(bytes, now_ms, replay, |_| false)
}

/// [`open`], except that kinds for which `nonce_fresh` is true skip the time window and the
/// replay cache: their freshness comes from a request nonce echoed in a signed answer (network
/// time requests, which must work while this node's clock or the sender's is wrong). The cell
/// handling such a kind must match every answer to an outstanding nonce of its own.
pub fn open_with(
    bytes: &[u8],
    now_ms: u64,
    replay: &mut ReplayCache,
    nonce_fresh: impl Fn(&str) -> bool,
) -> Result<Verified<Envelope>, EnvelopeError> {
    let envelope = verify_signature_only(bytes)?.into_inner();
    if nonce_fresh(&envelope.kind) {
        return Ok(Verified::new(envelope));
    }
    check_time(envelope.ts, now_ms)?;
    match replay.check(&envelope.from, &envelope.nonce, envelope.ts, now_ms) {
        ReplayCheck::Fresh => {}
        ReplayCheck::Replay | ReplayCheck::Full => return Err(EnvelopeError::Replay),
        ReplayCheck::OverShare => return Err(EnvelopeError::RateLimited),
    }
    Ok(Verified::new(envelope))
}

/// Verify size, syntax and signature only: no clock, no replay cache.
///
/// For envelopes that are *stored or forwarded* rather than received live: an envelope
/// kept in a ledger or manifest, re-checked when read back, or one embedded in another
/// message as evidence. Its `ts` may be old and its nonce may have been seen, and that is
/// fine, because the question is only "did `from` sign exactly this". Never use this for
/// live input: it accepts replays.
pub fn verify_signature_only(bytes: &[u8]) -> Result<Verified<Envelope>, EnvelopeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge);
    }
    let (envelope, sig) = decode(bytes)?;
    envelope
        .from
        .verify(&envelope.signed_bytes(), &sig)
        .map_err(|_| EnvelopeError::BadSignature)?;
    Ok(Verified::new(envelope))
}

fn check_time(ts: u64, now_ms: u64) -> Result<(), EnvelopeError> {
    let (off_by_ms, skew) = if ts >= now_ms {
        (ts - now_ms, Skew::Future)
    } else {
        (now_ms - ts, Skew::Past)
    };
    if off_by_ms > MAX_CLOCK_SKEW_MS {
        return Err(EnvelopeError::Stale {
            ts,
            now_ms,
            off_by_ms,
            skew,
        });
    }
    Ok(())
}

fn malformed(message: impl Into<String>) -> EnvelopeError {
    EnvelopeError::Malformed(message.into())
}

/// Cut attacker-chosen text short before it goes into an error message.
fn shorten(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

/// Parse and type-check, without verifying the signature.
fn decode(bytes: &[u8]) -> Result<(Envelope, [u8; SIGNATURE_LEN]), EnvelopeError> {
    let value = jcs::parse_strict(bytes).map_err(|e| malformed(e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(malformed("an envelope is a JSON object"));
    };
    if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(malformed(format!("unknown field {:?}", shorten(unknown))));
    }
    let mut take = |name: &'static str| {
        map.remove(name)
            .ok_or_else(|| malformed(format!("missing field {name:?}")))
    };

    let v = take("v")?
        .as_u64()
        .ok_or_else(|| malformed("\"v\" must be an integer"))?;
    if v != u64::from(ENVELOPE_VERSION) {
        return Err(malformed(format!("unsupported envelope version {v}")));
    }
    let kind = string_field(take("kind")?, "kind")?;
    let from_text = string_field(take("from")?, "from")?;
    let from = PublicKey::from_b64(&from_text).map_err(|e| malformed(format!("\"from\": {e}")))?;
    let ts = take("ts")?
        .as_u64()
        .ok_or_else(|| malformed("\"ts\" must be a non-negative integer (ms since the epoch)"))?;
    let nonce = string_field(take("nonce")?, "nonce")?;
    decode_b64::<NONCE_LEN>(&nonce, "nonce")?;
    let body = take("body")?;
    let sig_text = string_field(take("sig")?, "sig")?;
    let sig = decode_b64::<SIGNATURE_LEN>(&sig_text, "sig")?;
    let addr = match map.remove("addr") {
        None => None,
        Some(value) => Some(string_field(value, "addr")?),
    };
    let envelope = Envelope {
        v: ENVELOPE_VERSION,
        kind,
        from,
        addr,
        ts,
        nonce,
        body,
        sig: sig_text,
    };
    Ok((envelope, sig))
}

fn string_field(value: Value, name: &'static str) -> Result<String, EnvelopeError> {
    match value {
        Value::String(s) => Ok(s),
        _ => Err(malformed(format!("{name:?} must be a string"))),
    }
}

/// Decode canonical unpadded base64url of exactly `N` bytes. The decoder refuses padding and
/// non-zero trailing bits, so each byte string has exactly one accepted text form.
fn decode_b64<const N: usize>(text: &str, name: &'static str) -> Result<[u8; N], EnvelopeError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|e| malformed(format!("{name:?} is not base64url without padding: {e}")))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| malformed(format!("{name:?} must be {N} bytes, not {}", b.len())))
}

/// Remembers `(from, nonce)` pairs for [`REPLAY_RETENTION_MS`] after their `ts`.
///
/// Envelopes outside the ±[`MAX_CLOCK_SKEW_MS`] window are refused as stale anyway, so a
/// pair only has to be remembered while its `ts` could still pass the window. Memory is
/// bounded by `capacity` entries of a 32-byte digest, an expiry time and the sender each.
///
/// **When full, the cache fails closed:** new pairs are refused (reported as
/// [`EnvelopeError::Replay`]) until entries expire, rather than evicting unexpired entries,
/// which would let an attacker who floods the cache replay older envelopes. So that one
/// flooding sender cannot lock everybody else out, the last `reserve` entries are kept for
/// quiet senders: once the cache is that full, a sender already holding
/// [`QUIET_SENDER_ENTRIES`] or more is refused ([`ReplayCheck::OverShare`], reported as
/// [`EnvelopeError::RateLimited`]) while the others still get in. Keys are free to make, so
/// the transport must still rate-limit connections; this only makes a flood cost the
/// flooder first.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    reserve: usize,
    /// Digest of (from, nonce) -> (time after which the entry may be forgotten, sender).
    seen: HashMap<[u8; 32], (u64, PublicKey)>,
    /// The same entries ordered by expiry, earliest first.
    expiry: BinaryHeap<Reverse<(u64, [u8; 32])>>,
    /// Entries held per sender.
    per_sender: HashMap<PublicKey, u32>,
}

/// What [`ReplayCache::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayCheck {
    /// Not seen before; now recorded.
    Fresh,
    /// Seen before inside the window.
    Replay,
    /// The reserve is reached and this sender is not quiet.
    OverShare,
    /// No room at all.
    Full,
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self::with_reserve(DEFAULT_REPLAY_CAPACITY, DEFAULT_REPLAY_RESERVE)
    }
}

impl ReplayCache {
    /// A cache of `capacity` entries with no reserve for quiet senders.
    pub fn new(capacity: usize) -> Self {
        Self::with_reserve(capacity, 0)
    }

    /// A cache of `capacity` entries whose last `reserve` are kept for quiet senders.
    pub fn with_reserve(capacity: usize, reserve: usize) -> Self {
        Self {
            capacity,
            reserve: reserve.min(capacity),
            seen: HashMap::new(),
            expiry: BinaryHeap::new(),
            per_sender: HashMap::new(),
        }
    }

    /// Record `(from, nonce)` and return true if it was not seen before (the envelope may be
    /// accepted); return false if it is a replay or there is no room for it (see
    /// [`ReplayCache::check`]).
    pub fn check_and_insert(
        &mut self,
        from: &PublicKey,
        nonce: &str,
        ts: u64,
        now_ms: u64,
    ) -> bool {
        self.check(from, nonce, ts, now_ms) == ReplayCheck::Fresh
    }

    /// Record `(from, nonce)` if it is new and there is room for this sender. Expired
    /// entries are dropped first, so a full cache frees up as time passes.
    pub fn check(&mut self, from: &PublicKey, nonce: &str, ts: u64, now_ms: u64) -> ReplayCheck {
        self.prune(now_ms);
        let key = Self::digest(from, nonce);
        if self.seen.contains_key(&key) {
            return ReplayCheck::Replay;
        }
        if self.seen.len() >= self.capacity {
            return ReplayCheck::Full;
        }
        let held = self.per_sender.get(from).copied().unwrap_or(0);
        if self.seen.len() >= self.capacity - self.reserve
            && self.reserve > 0
            && held >= QUIET_SENDER_ENTRIES
        {
            return ReplayCheck::OverShare;
        }
        let expires = ts.saturating_add(REPLAY_RETENTION_MS);
        self.seen.insert(key, (expires, *from));
        self.expiry.push(Reverse((expires, key)));
        *self.per_sender.entry(*from).or_insert(0) += 1;
        ReplayCheck::Fresh
    }

    /// Entries currently remembered (including any not yet pruned).
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries `from` holds now.
    pub fn held_by(&self, from: &PublicKey) -> u32 {
        self.per_sender.get(from).copied().unwrap_or(0)
    }

    /// True when no new pair can be accepted until something expires.
    pub fn is_full(&self) -> bool {
        self.seen.len() >= self.capacity
    }

    /// Forget entries whose expiry is before `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        while let Some(Reverse((expires, key))) = self.expiry.peek().copied() {
            if expires >= now_ms {
                break;
            }
            self.expiry.pop();
            if let Some((_, sender)) = self.seen.remove(&key) {
                if let Some(n) = self.per_sender.get_mut(&sender) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.per_sender.remove(&sender);
                    }
                }
            }
        }
    }

    /// The public key has a fixed length, so `from || nonce` is unambiguous.
    fn digest(from: &PublicKey, nonce: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(from.as_bytes());
        hasher.update(nonce.as_bytes());
        hasher.finalize().into()
    }
}

/// Split a message type serialized as `{"kind": .., "body": ..}` (serde's adjacent tagging)
/// into an envelope's `kind` and `body`. Shared by the tree and reachability messages.
pub fn split_kind_body<T: serde::Serialize>(msg: &T) -> (String, serde_json::Value) {
    match serde_json::to_value(msg) {
        Ok(serde_json::Value::Object(mut map)) => {
            let kind = match map.remove("kind") {
                Some(serde_json::Value::String(s)) => s,
                _ => String::new(),
            };
            let body = map.remove("body").unwrap_or(serde_json::Value::Null);
            (kind, body)
        }
        // Plain data types serialize to an object; anything else has no kind.
        _ => (String::new(), serde_json::Value::Null),
    }
}

/// The inverse of [`split_kind_body`]: decode `kind` + `body` strictly; the error is serde's.
pub fn join_kind_body<T: serde::de::DeserializeOwned>(
    kind: &str,
    body: &serde_json::Value,
) -> Result<T, String> {
    let mut map = serde_json::Map::new();
    map.insert("kind".into(), serde_json::Value::String(kind.to_string()));
    map.insert("body".into(), body.clone());
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jcs::tests::arb_json;
    use p256::ecdsa::Signature;
    use proptest::prelude::*;
    use rand_core::{CryptoRng, RngCore};
    use serde_json::json;

    const NOW: u64 = 1_763_765_000_123;

    /// Deterministic "random" bytes for reproducible envelopes.
    struct CountingRng(u8);

    impl RngCore for CountingRng {
        fn next_u32(&mut self) -> u32 {
            rand_core::impls::next_u32_via_fill(self)
        }
        fn next_u64(&mut self) -> u64 {
            rand_core::impls::next_u64_via_fill(self)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                *b = self.0;
                self.0 = self.0.wrapping_add(1);
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    impl CryptoRng for CountingRng {}

    fn key(n: u8) -> SecretKey {
        SecretKey::from_scalar_bytes(&[n; 32]).unwrap()
    }

    fn sample() -> Envelope {
        seal(
            &key(7),
            "tree.join",
            Some("203.0.113.7:13300"),
            NOW,
            json!({"position": 12, "cell": "peerTreeNet", "tags": ["a", "b"]}),
        )
    }

    fn open_fresh(bytes: &[u8]) -> Result<Verified<Envelope>, EnvelopeError> {
        open(bytes, NOW, &mut ReplayCache::new(16))
    }

    /// The envelope as a JSON object, for tests that edit fields.
    fn as_map(env: &Envelope) -> Map<String, Value> {
        match serde_json::from_slice(&env.to_bytes()).unwrap() {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    fn bytes_of(map: &Map<String, Value>) -> Vec<u8> {
        serde_json::to_vec(map).unwrap()
    }

    fn assert_malformed(bytes: &[u8], needle: &str) {
        match open_fresh(bytes) {
            Err(EnvelopeError::Malformed(msg)) => {
                assert!(msg.contains(needle), "{msg:?} should mention {needle:?}")
            }
            other => panic!(
                "expected Malformed({needle}), got {other:?} for {}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    #[test]
    fn round_trip() {
        let env = sample();
        let opened = open_fresh(&env.to_bytes()).unwrap();
        assert_eq!(*opened, env);
        assert_eq!(opened.as_ref().kind, "tree.join");
        assert_eq!(opened.into_inner(), env);

        let no_addr = seal(&key(8), "ping", None, NOW, Value::Null);
        let text = String::from_utf8(no_addr.to_bytes()).unwrap();
        assert!(!text.contains("addr"), "{text}");
        assert_eq!(*open_fresh(text.as_bytes()).unwrap(), no_addr);
    }

    #[test]
    fn wire_format_is_exactly_the_design() {
        let env = seal_with_rng(
            &mut CountingRng(0),
            &key(1),
            "tree.join",
            Some("203.0.113.7:13300"),
            1_763_765_000_123,
            json!({"z": 1, "a": [true, null, 2.5], "é": "x\ny"}),
        );
        let from = key(1).public().to_b64();
        assert_eq!(env.nonce, "AAECAwQFBgcICQoL");
        assert_eq!(
            String::from_utf8(env.signed_bytes()).unwrap(),
            format!(
                "{{\"addr\":\"203.0.113.7:13300\",\"body\":{{\"a\":[true,null,2.5],\"z\":1,\"é\":\"x\\ny\"}},\
                 \"from\":\"{from}\",\"kind\":\"tree.join\",\"nonce\":\"AAECAwQFBgcICQoL\",\
                 \"ts\":1763765000123,\"v\":1}}"
            )
        );
        // sig is base64url r||s over exactly those bytes, low-S, checkable with the identity API.
        let sig = URL_SAFE_NO_PAD.decode(&env.sig).unwrap();
        assert_eq!(sig.len(), 64);
        key(1).public().verify(&env.signed_bytes(), &sig).unwrap();
        // RFC 6979 signatures are deterministic, so the whole envelope is reproducible.
        let again = seal_with_rng(
            &mut CountingRng(0),
            &key(1),
            "tree.join",
            Some("203.0.113.7:13300"),
            1_763_765_000_123,
            json!({"z": 1, "a": [true, null, 2.5], "é": "x\ny"}),
        );
        assert_eq!(again.to_bytes(), env.to_bytes());
    }

    #[test]
    fn any_json_layout_of_a_signed_envelope_verifies() {
        let env = sample();
        let map = as_map(&env);
        let pretty = serde_json::to_vec_pretty(&map).unwrap();
        assert_eq!(*open_fresh(&pretty).unwrap(), env);
        // Escaping a character differently is the same string.
        let escaped = String::from_utf8(env.to_bytes())
            .unwrap()
            .replace("\"kind\"", "\"\\u006bind\"");
        assert_eq!(*open_fresh(escaped.as_bytes()).unwrap(), env);
    }

    #[test]
    fn seal_normalizes_numbers() {
        let env = seal(&key(2), "k", None, NOW, json!({"n": 1.0, "f": 0.5}));
        assert_eq!(env.body, json!({"n": 1, "f": 0.5}));
        assert_eq!(*open_fresh(&env.to_bytes()).unwrap(), env);
    }

    #[test]
    fn every_required_field_missing_is_malformed() {
        let map = as_map(&sample());
        for field in ["v", "kind", "from", "ts", "nonce", "body", "sig"] {
            let mut m = map.clone();
            m.remove(field);
            assert_malformed(&bytes_of(&m), &format!("missing field \"{field}\""));
        }
    }

    #[test]
    fn ill_typed_and_unknown_fields_are_malformed() {
        let map = as_map(&sample());
        let cases: &[(&str, Value, &str)] = &[
            ("v", json!("1"), "\"v\" must be an integer"),
            ("v", json!(2), "unsupported envelope version 2"),
            ("v", json!(0), "unsupported envelope version 0"),
            ("v", json!(-1), "\"v\" must be an integer"),
            ("kind", json!(5), "\"kind\" must be a string"),
            ("from", json!(null), "\"from\" must be a string"),
            ("from", json!("abc"), "\"from\""),
            ("addr", json!(null), "\"addr\" must be a string"),
            ("addr", json!(13300), "\"addr\" must be a string"),
            ("ts", json!(-1), "\"ts\" must be a non-negative integer"),
            ("ts", json!(1.5), "\"ts\" must be a non-negative integer"),
            ("ts", json!("1763765000123"), "\"ts\" must be"),
            ("nonce", json!(12), "\"nonce\" must be a string"),
            ("sig", json!([]), "\"sig\" must be a string"),
            ("extra", json!(1), "unknown field \"extra\""),
        ];
        for (field, value, needle) in cases {
            let mut m = map.clone();
            m.insert((*field).into(), value.clone());
            assert_malformed(&bytes_of(&m), needle);
        }
        assert_malformed(b"[]", "JSON object");
        assert_malformed(b"null", "JSON object");
        assert_malformed(b"", "end of input");
        assert_malformed(b"{\"v\":1", "");
    }

    #[test]
    fn bad_base64_is_malformed() {
        let env = sample();
        let map = as_map(&env);
        let other_key_b64 = key(9).public().to_b64();
        let cases: Vec<(&str, String, &str)> = vec![
            ("nonce", "AAECAwQFBgcICQo".into(), "\"nonce\""), // 15 chars
            (
                "nonce",
                "AAECAwQFBgcICQoLDA".into(),
                "\"nonce\" must be 12 bytes",
            ),
            (
                "nonce",
                "AAECAwQFBgcICQo=".into(),
                "\"nonce\" is not base64url",
            ),
            (
                "nonce",
                "AAECAwQFBgcICQo+".into(),
                "\"nonce\" is not base64url",
            ),
            (
                "nonce",
                "AAECAwQF BgcICQoL".into(),
                "\"nonce\" is not base64url",
            ),
            ("sig", env.sig[..80].to_string(), "\"sig\""),
            ("sig", format!("{}==", env.sig), "\"sig\" is not base64url"),
            (
                "sig",
                env.sig.replace('-', "+").replace('_', "/") + "!",
                "\"sig\"",
            ),
            ("from", other_key_b64[..43].to_string(), "\"from\""),
            ("from", format!("{other_key_b64}="), "\"from\""),
            ("from", URL_SAFE_NO_PAD.encode([4u8; 33]), "\"from\""),
        ];
        for (field, text, needle) in cases {
            let mut m = map.clone();
            m.insert(field.into(), Value::from(text));
            assert_malformed(&bytes_of(&m), needle);
        }
        // 86 characters carry 516 bits: the 4 spare bits of a 64-byte sig must be zero.
        let mut sig = env.sig.clone();
        let last = sig.pop().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let idx = alphabet.find(last).unwrap();
        sig.push(alphabet.as_bytes()[idx ^ 1] as char);
        let mut m = map.clone();
        m.insert("sig".into(), Value::from(sig));
        assert_malformed(&bytes_of(&m), "\"sig\" is not base64url");
    }

    #[test]
    fn duplicate_keys_are_malformed_at_any_depth() {
        let text = String::from_utf8(sample().to_bytes()).unwrap();
        let top = text.replacen('{', "{\"v\":1,", 1);
        assert_malformed(top.as_bytes(), "duplicate object key \"v\"");
        let top_last = text.replacen("\"ts\":", "\"kind\":\"tree.leave\",\"ts\":", 1);
        assert_malformed(top_last.as_bytes(), "duplicate object key \"kind\"");
        let nested = text.replacen("\"cell\":", "\"position\":13,\"cell\":", 1);
        assert_malformed(nested.as_bytes(), "duplicate object key \"position\"");
        let escaped = text.replacen("\"cell\":", "\"\\u0063ell\":1,\"cell\":", 1);
        assert_malformed(escaped.as_bytes(), "duplicate object key \"cell\"");
    }

    #[test]
    fn high_s_is_rejected() {
        let env = sample();
        let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(&env.sig).unwrap()).unwrap();
        let high = Signature::from_scalars(sig.r().to_bytes(), (-*sig.s()).to_bytes()).unwrap();
        assert!(
            high.normalize_s().is_some(),
            "negated s must be the high twin"
        );
        let forged = Envelope {
            sig: URL_SAFE_NO_PAD.encode(high.to_bytes()),
            ..env.clone()
        };
        assert_eq!(
            open_fresh(&forged.to_bytes()).unwrap_err(),
            EnvelopeError::BadSignature
        );
        // The low-S original is fine.
        assert!(open_fresh(&env.to_bytes()).is_ok());
    }

    #[test]
    fn wrong_key_and_tampering_are_bad_signatures() {
        let env = sample();
        let cases = [
            Envelope {
                from: key(9).public(),
                ..env.clone()
            },
            Envelope {
                kind: "tree.leave".into(),
                ..env.clone()
            },
            Envelope {
                addr: None,
                ..env.clone()
            },
            Envelope {
                addr: Some("203.0.113.8:13300".into()),
                ..env.clone()
            },
            Envelope {
                ts: env.ts + 1,
                ..env.clone()
            },
            Envelope {
                nonce: URL_SAFE_NO_PAD.encode([9u8; 12]),
                ..env.clone()
            },
            Envelope {
                body: json!({"position": 13, "cell": "peerTreeNet", "tags": ["a", "b"]}),
                ..env.clone()
            },
            Envelope {
                sig: URL_SAFE_NO_PAD.encode([1u8; 64]),
                ..env.clone()
            },
            Envelope {
                sig: URL_SAFE_NO_PAD.encode([0u8; 64]),
                ..env.clone()
            },
        ];
        for forged in cases {
            assert_eq!(
                open_fresh(&forged.to_bytes()).unwrap_err(),
                EnvelopeError::BadSignature,
                "{forged:?}"
            );
        }
    }

    #[test]
    fn stale_past_and_future() {
        let env = sample();
        let bytes = env.to_bytes();
        let mut cache = ReplayCache::new(16);
        match open(&bytes, NOW + MAX_CLOCK_SKEW_MS + 1, &mut cache) {
            Err(
                e @ EnvelopeError::Stale {
                    skew: Skew::Past,
                    off_by_ms: 30_001,
                    ..
                },
            ) => {
                assert!(e.to_string().contains("30001 ms in the past"), "{e}");
                assert_eq!(e.code(), "stale");
            }
            other => panic!("{other:?}"),
        }
        match open(&bytes, NOW - MAX_CLOCK_SKEW_MS - 1, &mut cache) {
            Err(
                e @ EnvelopeError::Stale {
                    skew: Skew::Future, ..
                },
            ) => assert!(e.to_string().contains("in the future"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Stale envelopes never reach the replay cache.
        assert!(cache.is_empty());
        // The window is inclusive at both ends.
        assert!(open(&bytes, NOW + MAX_CLOCK_SKEW_MS, &mut ReplayCache::new(4)).is_ok());
        assert!(open(&bytes, NOW - MAX_CLOCK_SKEW_MS, &mut ReplayCache::new(4)).is_ok());
        // Extreme values do not overflow.
        let far = seal(&key(3), "k", None, u64::MAX, Value::Null);
        assert!(matches!(
            open(&far.to_bytes(), 0, &mut cache),
            Err(EnvelopeError::Stale {
                skew: Skew::Future,
                ..
            })
        ));
        assert!(matches!(
            open(&bytes, u64::MAX, &mut cache),
            Err(EnvelopeError::Stale {
                skew: Skew::Past,
                ..
            })
        ));
    }

    #[test]
    fn replay_is_rejected_and_forgeries_do_not_poison_the_cache() {
        let env = sample();
        let mut cache = ReplayCache::new(16);
        // A forgery reusing the genuine nonce arrives first.
        let forged = Envelope {
            body: json!("evil"),
            ..env.clone()
        };
        assert_eq!(
            open(&forged.to_bytes(), NOW, &mut cache).unwrap_err(),
            EnvelopeError::BadSignature
        );
        assert!(cache.is_empty());
        assert!(open(&env.to_bytes(), NOW, &mut cache).is_ok());
        let again = open(&env.to_bytes(), NOW + 5, &mut cache).unwrap_err();
        assert_eq!(again, EnvelopeError::Replay);
        assert_eq!(again.code(), "replay");
        // Re-encoding the same envelope differently is still the same (from, nonce).
        let pretty = serde_json::to_vec_pretty(&as_map(&env)).unwrap();
        assert_eq!(
            open(&pretty, NOW, &mut cache).unwrap_err(),
            EnvelopeError::Replay
        );
        // A new envelope from the same sender is fine; so is the same nonce from someone else.
        assert!(open(&sample().to_bytes(), NOW, &mut cache).is_ok());
        let other = Envelope {
            from: key(9).public(),
            ..env.clone()
        };
        let other = Envelope {
            sig: URL_SAFE_NO_PAD.encode(key(9).sign(&other.signed_bytes())),
            ..other
        };
        assert!(open(&other.to_bytes(), NOW, &mut cache).is_ok());
        // verify_signature_only neither consults nor fills the cache.
        let len = cache.len();
        assert!(verify_signature_only(&env.to_bytes()).is_ok());
        assert_eq!(cache.len(), len);
    }

    #[test]
    fn too_large() {
        assert_eq!(
            open_fresh(&vec![b' '; MAX_ENVELOPE_BYTES + 1]).unwrap_err(),
            EnvelopeError::TooLarge
        );
        // A genuine envelope just over the limit is refused; just under is accepted.
        let make = |len: usize| seal(&key(4), "k", None, NOW, Value::from("x".repeat(len)));
        let overhead = make(0).to_bytes().len();
        let fits = make(MAX_ENVELOPE_BYTES - overhead);
        assert_eq!(fits.to_bytes().len(), MAX_ENVELOPE_BYTES);
        assert!(open_fresh(&fits.to_bytes()).is_ok());
        let over = make(MAX_ENVELOPE_BYTES - overhead + 1);
        assert_eq!(
            open_fresh(&over.to_bytes()).unwrap_err(),
            EnvelopeError::TooLarge
        );
        assert_eq!(
            verify_signature_only(&over.to_bytes()).unwrap_err().code(),
            "too_large"
        );
    }

    #[test]
    fn error_codes() {
        let stale = EnvelopeError::Stale {
            ts: 0,
            now_ms: 0,
            off_by_ms: 0,
            skew: Skew::Past,
        };
        let codes: Vec<&str> = [
            EnvelopeError::TooLarge,
            EnvelopeError::Malformed(String::new()),
            EnvelopeError::BadSignature,
            stale,
            EnvelopeError::Replay,
        ]
        .iter()
        .map(EnvelopeError::code)
        .collect();
        assert_eq!(
            codes,
            ["too_large", "malformed", "bad_signature", "stale", "replay"]
        );
    }

    #[test]
    fn replay_cache_expires_entries_and_fails_closed_when_full() {
        let a = key(5).public();
        let mut cache = ReplayCache::new(2);
        assert!(cache.check_and_insert(&a, "n1", NOW, NOW));
        assert!(!cache.check_and_insert(&a, "n1", NOW, NOW));
        assert!(cache.check_and_insert(&a, "n2", NOW + 10_000, NOW));
        assert!(cache.is_full());
        // Full: a fresh pair is refused rather than evicting an unexpired one.
        assert!(!cache.check_and_insert(&a, "n3", NOW, NOW + 1));
        assert!(!cache.check_and_insert(&a, "n1", NOW, NOW + 1));
        // Entries are kept for the whole retention period after their ts...
        let n1_gone = NOW + REPLAY_RETENTION_MS + 1;
        assert!(!cache.check_and_insert(&a, "n1", NOW, n1_gone - 1));
        // ...then forgotten, which frees room.
        assert!(cache.check_and_insert(&a, "n3", n1_gone, n1_gone));
        assert_eq!(cache.len(), 2);
        assert!(!cache.check_and_insert(&a, "n2", NOW, n1_gone));
        cache.prune(u64::MAX);
        assert!(cache.is_empty());
        assert!(!ReplayCache::new(0).check_and_insert(&a, "n", NOW, NOW));
        assert_eq!(ReplayCache::default().capacity(), DEFAULT_REPLAY_CAPACITY);
    }

    #[test]
    fn a_flooding_sender_is_refused_before_quiet_ones_are() {
        let (flooder, quiet) = (key(7).public(), key(8).public());
        let mut cache = ReplayCache::with_reserve(1000, 300);
        let mut refused_at = None;
        for i in 0..2000u64 {
            match cache.check(&flooder, &format!("f{i}"), NOW, NOW) {
                ReplayCheck::Fresh => {}
                ReplayCheck::OverShare => {
                    refused_at = Some(i);
                    break;
                }
                other => panic!("flooder got {other:?} at {i}"),
            }
        }
        // The flooder filled the cache up to the reserve and no further.
        assert_eq!(refused_at, Some(700));
        assert_eq!(cache.held_by(&flooder), 700);
        // A quiet sender still gets its share of the reserve, then is refused too.
        for i in 0..QUIET_SENDER_ENTRIES {
            assert_eq!(
                cache.check(&quiet, &format!("q{i}"), NOW, NOW),
                ReplayCheck::Fresh
            );
        }
        assert_eq!(
            cache.check(&quiet, "one more", NOW, NOW),
            ReplayCheck::OverShare
        );
        // Replays stay replays, and entries expire for everyone.
        assert_eq!(cache.check(&quiet, "q0", NOW, NOW), ReplayCheck::Replay);
        let later = NOW + REPLAY_RETENTION_MS + 1;
        assert_eq!(
            cache.check(&flooder, "fresh", later, later),
            ReplayCheck::Fresh
        );
        assert_eq!(cache.held_by(&quiet), 0);
        assert_eq!(cache.held_by(&flooder), 1);
    }

    #[test]
    fn replay_cache_memory_is_bounded_under_a_flood() {
        let a = key(6).public();
        let mut cache = ReplayCache::new(1000);
        let mut accepted = 0;
        for i in 0..100_000u64 {
            let now = NOW + i; // 100 s of traffic at 1000 envelopes per second
            if cache.check_and_insert(&a, &i.to_string(), now, now) {
                accepted += 1;
            }
            assert!(cache.len() <= 1000);
            assert!(cache.expiry.len() <= 1000);
        }
        assert!(accepted >= 1000);
    }

    /// Exhaustive over positions: every byte, four different flips each. The only accepted
    /// changes are semantically invisible ones (`e` -> `E` in `1.5e-7`), which open to the
    /// identical envelope.
    #[test]
    fn every_single_byte_flip_is_rejected_or_invisible() {
        let env = seal(
            &key(12),
            "tree.join",
            Some("[2001:db8::1]:13300"),
            NOW,
            json!({"x": 1.5e-7, "s": "a\"b\\c\u{1}é😂", "n": [-1, 0, null, true]}),
        );
        let original = env.to_bytes();
        let mut invisible = 0;
        for i in 0..original.len() {
            for xor in [0x01u8, 0x20, 0x80, 0xff] {
                let mut bytes = original.clone();
                bytes[i] ^= xor;
                if let Ok(opened) = open(&bytes, NOW, &mut ReplayCache::new(4)) {
                    assert_eq!(*opened, env, "flip {xor:#x} at {i}");
                    invisible += 1;
                }
            }
        }
        assert_eq!(invisible, 1, "only e -> E in the exponent");
    }

    fn arb_envelope_parts() -> impl Strategy<Value = (String, Option<String>, u64, Value)> {
        (
            ".{0,20}",
            proptest::option::of("[0-9.:a-f\\[\\]]{0,30}"),
            any::<u64>(),
            arb_json(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn prop_seal_open_round_trip((kind, addr, ts, body) in arb_envelope_parts()) {
            let key = SecretKey::generate();
            let env = seal(&key, &kind, addr.as_deref(), ts, body);
            let opened = open(&env.to_bytes(), ts, &mut ReplayCache::new(4)).unwrap();
            prop_assert_eq!(&*opened, &env);
            prop_assert_eq!(opened.from, key.public());
        }

        /// Changing any single byte of a sealed envelope is rejected, except for changes that
        /// leave the decoded envelope identical (e.g. `e` -> `E` in a number's exponent). The
        /// flipped text is never accepted as a different envelope.
        #[test]
        fn prop_single_byte_change_never_yields_a_different_envelope(
            body in arb_json(),
            index in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let env = seal(&key(11), "tree.join", Some("203.0.113.7:13300"), NOW, body);
            let mut bytes = env.to_bytes();
            let i = index.index(bytes.len());
            bytes[i] ^= xor;
            if let Ok(opened) = open(&bytes, NOW, &mut ReplayCache::new(4)) {
                prop_assert_eq!(&*opened, &env);
            }
        }

        #[test]
        fn prop_open_never_panics_on_arbitrary_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
            now in any::<u64>(),
        ) {
            let _ = open(&bytes, now, &mut ReplayCache::new(4));
        }

        /// Structured mutations of a real envelope (cut, splice, insert) reach deeper into the
        /// decoder than random bytes; none may panic or be accepted as a different envelope.
        #[test]
        fn prop_open_never_panics_on_mutated_envelopes(
            cut in any::<prop::sample::Index>(),
            len in 0usize..16,
            insert in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            let env = sample();
            let mut bytes = env.to_bytes();
            let at = cut.index(bytes.len());
            let end = (at + len).min(bytes.len());
            bytes.splice(at..end, insert);
            if let Ok(opened) = open(&bytes, NOW, &mut ReplayCache::new(4)) {
                prop_assert_eq!(&*opened, &env);
            }
        }
    }
}
