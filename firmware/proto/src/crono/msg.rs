//! Typed network-time messages. Each travels as the `kind` and `body` of a signed envelope;
//! decoding is strict (unknown kinds and fields are errors, every integer is bounded).
//!
//! - `time.req`: "what time is it?", with a fresh 16-byte nonce.
//! - `time.ans`: the answer, echoing the nonce, with the answerer's network time when the
//!   request arrived (`rx_us`) and when the answer left (`tx_us`), its stratum, whether it is
//!   synced and its own error bound.
//!
//! Freshness comes from the nonce (one use, from the requester's table of outstanding
//! requests), not from the envelope `ts` window, so the exchange works while a clock is wrong.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Length of a request nonce in bytes.
pub const NONCE_LEN: usize = 16;
/// Largest integer a message may carry (2^53: exact in every JSON implementation).
pub const MAX_WIRE_INT: u64 = 1 << 53;
/// Largest time an answerer may take between receiving a request and answering (10 s).
pub const MAX_HOLD_US: u64 = 10_000_000;
/// Largest stratum (16 = "unsynchronised" in NTP terms).
pub const MAX_STRATUM: u8 = 16;

/// Every kind this module decodes.
pub const KINDS: &[&str] = &["time.req", "time.ans"];

/// Whether an envelope kind belongs to network time (prefix `time.`). Unknown `time.*` kinds
/// still belong here: [`TimeMsg::from_kind_body`] refuses them with `UnknownKind`.
pub fn is_time_kind(kind: &str) -> bool {
    kind.starts_with("time.")
}

/// Errors decoding a time message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeMsgError {
    #[error("not a time message kind: {0:?}")]
    UnknownKind(String),
    #[error("malformed {kind}: {reason}")]
    Malformed { kind: String, reason: String },
    #[error("time.ans field {field} out of range: {reason}")]
    OutOfRange { field: &'static str, reason: String },
}

/// A request nonce: 16 caller-supplied random bytes, base64url without padding on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nonce([u8; NONCE_LEN]);

impl Nonce {
    /// The caller supplies the bytes from a cryptographic RNG (nonces must be unpredictable).
    pub fn from_bytes(bytes: [u8; NONCE_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; NONCE_LEN] {
        &self.0
    }

    pub fn to_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// Exactly 16 bytes of base64url without padding.
    pub fn from_b64(text: &str) -> Option<Self> {
        // 16 bytes are 22 characters; refuse anything longer before decoding it.
        if text.len() != 22 {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        let arr: [u8; NONCE_LEN] = bytes.try_into().ok()?;
        Some(Self(arr))
    }
}

impl std::fmt::Debug for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nonce({})", self.to_b64())
    }
}

impl Serialize for Nonce {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_b64())
    }
}

impl<'de> Deserialize<'de> for Nonce {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Nonce::from_b64(&text)
            .ok_or_else(|| serde::de::Error::custom("nonce must be 16 bytes of base64url"))
    }
}

/// The answer to a [`TimeMsg::Req`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeAns {
    /// The request's nonce, echoed.
    pub nonce: Nonce,
    /// Answerer's network time (µs since the epoch) when the request arrived.
    pub rx_us: u64,
    /// Answerer's network time when the answer left; `rx_us <= tx_us <= rx_us + 10 s`.
    pub tx_us: u64,
    /// Hops from the reference (0 = the root's local clock), at most 16.
    pub stratum: u8,
    /// Whether the answerer's time is synced (bootstrapped, from a parent, or root).
    pub synced: bool,
    /// The answerer's own error bound in µs.
    pub err_us: u64,
}

impl TimeAns {
    fn check(&self) -> Result<(), TimeMsgError> {
        let range = |field, reason: &str| TimeMsgError::OutOfRange {
            field,
            reason: reason.to_string(),
        };
        for (field, v) in [
            ("rx_us", self.rx_us),
            ("tx_us", self.tx_us),
            ("err_us", self.err_us),
        ] {
            if v > MAX_WIRE_INT {
                return Err(range(field, "above 2^53"));
            }
        }
        if self.tx_us < self.rx_us {
            return Err(range("tx_us", "before rx_us"));
        }
        if self.tx_us - self.rx_us > MAX_HOLD_US {
            return Err(range("tx_us", "more than 10 s after rx_us"));
        }
        if self.stratum > MAX_STRATUM {
            return Err(range("stratum", "above 16"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", deny_unknown_fields)]
pub enum TimeMsg {
    #[serde(rename = "time.req")]
    Req { nonce: Nonce },
    #[serde(rename = "time.ans")]
    Ans(TimeAns),
}

/// Body of a request, decoded on its own so unknown fields are refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReqBody {
    nonce: Nonce,
}

impl TimeMsg {
    /// Split into an envelope's `kind` and `body`.
    pub fn to_kind_body(&self) -> (String, Value) {
        crate::envelope::split_kind_body(self)
    }

    /// Decode from an envelope's `kind` and `body`, strictly.
    pub fn from_kind_body(kind: &str, body: &Value) -> Result<Self, TimeMsgError> {
        let malformed = |e: serde_json::Error| TimeMsgError::Malformed {
            kind: kind.to_string(),
            reason: e.to_string(),
        };
        match kind {
            "time.req" => {
                let b = ReqBody::deserialize(body).map_err(malformed)?;
                Ok(TimeMsg::Req { nonce: b.nonce })
            }
            "time.ans" => {
                let ans = TimeAns::deserialize(body).map_err(malformed)?;
                ans.check()?;
                Ok(TimeMsg::Ans(ans))
            }
            _ => Err(TimeMsgError::UnknownKind(kind.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn ans() -> TimeAns {
        TimeAns {
            nonce: Nonce::from_bytes([7; 16]),
            rx_us: 1_763_765_000_123_456,
            tx_us: 1_763_765_000_124_000,
            stratum: 2,
            synced: true,
            err_us: 1234,
        }
    }

    #[test]
    fn both_messages_round_trip() {
        for m in [
            TimeMsg::Req {
                nonce: Nonce::from_bytes([0xff; 16]),
            },
            TimeMsg::Ans(ans()),
        ] {
            let (kind, body) = m.to_kind_body();
            assert!(KINDS.contains(&kind.as_str()));
            assert!(is_time_kind(&kind));
            assert_eq!(TimeMsg::from_kind_body(&kind, &body), Ok(m));
        }
        let (_, body) = TimeMsg::Req {
            nonce: Nonce::from_bytes([0; 16]),
        }
        .to_kind_body();
        assert_eq!(body, json!({"nonce": "AAAAAAAAAAAAAAAAAAAAAA"}));
    }

    #[test]
    fn strict_decoding() {
        let n = Nonce::from_bytes([1; 16]).to_b64();
        assert!(matches!(
            TimeMsg::from_kind_body("time.what", &json!({"nonce": n})),
            Err(TimeMsgError::UnknownKind(_))
        ));
        assert!(matches!(
            TimeMsg::from_kind_body("tree.join", &json!({})),
            Err(TimeMsgError::UnknownKind(_))
        ));
        assert!(!is_time_kind("tree.join"));
        assert!(TimeMsg::from_kind_body("time.req", &json!({"nonce": n})).is_ok());
        assert!(TimeMsg::from_kind_body("time.req", &json!({"nonce": n, "x": 1})).is_err());
        assert!(TimeMsg::from_kind_body("time.req", &json!({})).is_err());
        // 15 and 17 bytes, padding, standard alphabet.
        for bad in [
            URL_SAFE_NO_PAD.encode([1u8; 15]),
            URL_SAFE_NO_PAD.encode([1u8; 17]),
            format!("{n}=="),
            "+/+/+/+/+/+/+/+/+/+/+/".to_string(),
        ] {
            assert!(TimeMsg::from_kind_body("time.req", &json!({ "nonce": bad })).is_err());
        }
        let good = serde_json::to_value(ans()).unwrap();
        assert!(TimeMsg::from_kind_body("time.ans", &good).is_ok());
        let with = |field: &str, v: Value| {
            let mut b = good.clone();
            b[field] = v;
            TimeMsg::from_kind_body("time.ans", &b)
        };
        assert!(with("extra", json!(1)).is_err());
        assert!(with("rx_us", json!(-1)).is_err());
        assert!(with("rx_us", json!(1.5)).is_err());
        assert!(with("err_us", json!(MAX_WIRE_INT + 1)).is_err());
        assert!(with("err_us", json!(MAX_WIRE_INT)).is_ok());
        assert!(with("stratum", json!(17)).is_err());
        assert!(with("stratum", json!(256)).is_err());
        assert!(with("synced", json!(1)).is_err());
        // tx before rx, and a hold of more than 10 s.
        assert!(with("tx_us", json!(ans().rx_us - 1)).is_err());
        assert!(with("tx_us", json!(ans().rx_us + MAX_HOLD_US)).is_ok());
        assert!(with("tx_us", json!(ans().rx_us + MAX_HOLD_US + 1)).is_err());
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("err_us");
        assert!(TimeMsg::from_kind_body("time.ans", &missing).is_err());
    }

    proptest! {
        #[test]
        fn answers_round_trip(
            bytes in any::<[u8; 16]>(),
            rx in 0..=MAX_WIRE_INT - MAX_HOLD_US,
            hold in 0..=MAX_HOLD_US,
            stratum in 0..=MAX_STRATUM,
            synced in any::<bool>(),
            err in 0..=MAX_WIRE_INT,
        ) {
            let m = TimeMsg::Ans(TimeAns { nonce: Nonce::from_bytes(bytes), rx_us: rx, tx_us: rx + hold, stratum, synced, err_us: err });
            let (kind, body) = m.to_kind_body();
            prop_assert_eq!(TimeMsg::from_kind_body(&kind, &body), Ok(m));
            let r = TimeMsg::Req { nonce: Nonce::from_bytes(bytes) };
            let (kind, body) = r.to_kind_body();
            prop_assert_eq!(TimeMsg::from_kind_body(&kind, &body), Ok(r));
        }

        #[test]
        fn decoding_never_panics(kind in prop::sample::select(vec!["time.req", "time.ans", "time.x", ""]), body in ".{0,200}") {
            let value = serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body));
            if let Ok(m) = TimeMsg::from_kind_body(kind, &value) {
                let (k, b) = m.to_kind_body();
                prop_assert_eq!(TimeMsg::from_kind_body(&k, &b), Ok(m));
            }
        }

        #[test]
        fn arbitrary_json_answers_never_panic(v in crate::jcs::tests::arb_json(), nums in prop::collection::vec(any::<i64>(), 3), stratum in any::<i32>()) {
            let _ = TimeMsg::from_kind_body("time.ans", &v);
            let _ = TimeMsg::from_kind_body("time.req", &v);
            let body = json!({"nonce": Nonce::from_bytes([3; 16]).to_b64(), "rx_us": nums[0], "tx_us": nums[1], "stratum": stratum, "synced": true, "err_us": nums[2]});
            if let Ok(TimeMsg::Ans(a)) = TimeMsg::from_kind_body("time.ans", &body) {
                prop_assert!(a.tx_us >= a.rx_us && a.tx_us - a.rx_us <= MAX_HOLD_US && a.stratum <= MAX_STRATUM);
            }
        }
    }
}
