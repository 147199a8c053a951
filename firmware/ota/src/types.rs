//! Small parsed types: each constructor refuses what it cannot represent, and serde goes
//! through the same constructors, so a decoded value is always a valid one.
//!
//! - [`Version`]: `MAJOR.MINOR.PATCH`, three u64s, canonical text only (no leading zeros, no
//!   sign, no suffix), so one version has one spelling and one signed byte string.
//! - [`Board`]: `[a-z0-9-]{1,32}`, e.g. `rpi4`, `rpi5`, `qemu-virt`.
//! - [`Sha256Hex`]: 64 lowercase hex digits.
//! - [`FetchId`]: what a node asks the network for to fetch the image (opaque here).
//! - [`SigBytes`]: a 64-byte r||s signature, base64url without padding on the wire.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use borg_proto::identity::SIGNATURE_LEN;
use serde::{Deserialize, Serialize};

use crate::{OtaError, MAX_BOARD_LEN, MAX_FETCH_ID_LEN};

fn malformed(what: &'static str, reason: impl Into<String>) -> OtaError {
    OtaError::Malformed {
        what,
        reason: reason.into(),
    }
}

/// A release version. Ordered by (major, minor, patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub const fn new(major: u64, minor: u64, patch: u64) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }
}

impl FromStr for Version {
    type Err = OtaError;

    fn from_str(text: &str) -> Result<Self, OtaError> {
        let bad = || {
            malformed(
                "version",
                format!("{:?} is not MAJOR.MINOR.PATCH", short(text)),
            )
        };
        let mut parts = text.split('.');
        let mut next = || -> Result<u64, OtaError> {
            let part = parts.next().ok_or_else(bad)?;
            let canonical = !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_digit())
                && (part == "0" || !part.starts_with('0'));
            if !canonical {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        let version = Version::new(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(version)
    }
}

impl TryFrom<String> for Version {
    type Error = OtaError;
    fn try_from(text: String) -> Result<Self, OtaError> {
        text.parse()
    }
}

impl From<Version> for String {
    fn from(v: Version) -> String {
        v.to_string()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A board name a release targets.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Board(String);

impl Board {
    pub fn new(text: &str) -> Result<Self, OtaError> {
        let ok = !text.is_empty()
            && text.len() <= MAX_BOARD_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(malformed(
                "board",
                format!("{:?} is not 1 to {MAX_BOARD_LEN} of [a-z0-9-]", short(text)),
            ));
        }
        Ok(Self(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Board {
    type Error = OtaError;
    fn try_from(text: String) -> Result<Self, OtaError> {
        Self::new(&text)
    }
}

impl From<Board> for String {
    fn from(b: Board) -> String {
        b.0
    }
}

impl fmt::Display for Board {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SHA-256 digest as 64 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Hex([u8; 32]);

impl Sha256Hex {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(data).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 12 hex digits, for humans.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_string()
    }
}

impl FromStr for Sha256Hex {
    type Err = OtaError;
    fn from_str(text: &str) -> Result<Self, OtaError> {
        let bad = || malformed("sha256", "must be 64 lowercase hex digits");
        if text.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            let (Some(hi), Some(lo)) = (digit(pair[0]), digit(pair[1])) else {
                return Err(bad());
            };
            out[i] = hi << 4 | lo;
        }
        Ok(Self(out))
    }
}

impl TryFrom<String> for Sha256Hex {
    type Error = OtaError;
    fn try_from(text: String) -> Result<Self, OtaError> {
        text.parse()
    }
}

impl From<Sha256Hex> for String {
    fn from(d: Sha256Hex) -> String {
        d.to_string()
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What a node asks for to fetch the image: e.g. `sha256:<digest>` (content-addressed,
/// the default) or a stream id. Opaque to the trust logic; bounded and printable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FetchId(String);

impl FetchId {
    pub fn new(text: &str) -> Result<Self, OtaError> {
        let ok = !text.is_empty()
            && text.len() <= MAX_FETCH_ID_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b));
        if !ok {
            return Err(malformed(
                "fetch id",
                format!("must be 1 to {MAX_FETCH_ID_LEN} of [A-Za-z0-9._:/-]"),
            ));
        }
        Ok(Self(text.to_string()))
    }

    /// The content address of an image: `sha256:<digest>`.
    pub fn content(digest: &Sha256Hex) -> Self {
        Self(format!("sha256:{digest}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for FetchId {
    type Error = OtaError;
    fn try_from(text: String) -> Result<Self, OtaError> {
        Self::new(&text)
    }
}

impl From<FetchId> for String {
    fn from(f: FetchId) -> String {
        f.0
    }
}

/// A 64-byte r||s ECDSA P-256 signature; base64url without padding on the wire, and only
/// the canonical spelling of it (so one signature has one text).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SigBytes(pub [u8; SIGNATURE_LEN]);

impl fmt::Debug for SigBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigBytes({}..)", &String::from(*self)[..8])
    }
}

impl TryFrom<String> for SigBytes {
    type Error = OtaError;
    fn try_from(text: String) -> Result<Self, OtaError> {
        let bad = || malformed("signature", "must be base64url of 64 bytes");
        let bytes = URL_SAFE_NO_PAD.decode(&text).map_err(|_| bad())?;
        let bytes: [u8; SIGNATURE_LEN] = bytes.try_into().map_err(|_| bad())?;
        if URL_SAFE_NO_PAD.encode(bytes) != text {
            return Err(bad());
        }
        Ok(Self(bytes))
    }
}

impl From<SigBytes> for String {
    fn from(s: SigBytes) -> String {
        URL_SAFE_NO_PAD.encode(s.0)
    }
}

/// Cut attacker-chosen text short before it goes into an error message.
pub(crate) fn short(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_canonical_text_only_and_order_numerically() {
        assert_eq!("1.2.3".parse::<Version>().unwrap(), Version::new(1, 2, 3));
        assert_eq!("0.0.0".parse::<Version>().unwrap(), Version::new(0, 0, 0));
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "01.2.3",
            "1.02.3",
            "1.2.-3",
            "+1.2.3",
            "1.2.3-rc1",
            "1..3",
            " 1.2.3",
            "1.2.18446744073709551616",
        ] {
            let err = bad.parse::<Version>().unwrap_err();
            assert_eq!(err.code(), "malformed", "{bad:?}");
        }
        assert!(Version::new(1, 10, 0) > Version::new(1, 9, 99));
        assert!(Version::new(2, 0, 0) > Version::new(1, 99, 99));
        let v: Version = serde_json::from_str("\"4.5.6\"").unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"4.5.6\"");
    }

    #[test]
    fn boards_digests_fetch_ids_and_signatures_refuse_bad_text() {
        assert!(Board::new("qemu-virt").is_ok());
        for bad in ["", "RPI4", "rpi 4", "rpi_4", &"a".repeat(33)] {
            assert!(Board::new(bad).is_err(), "{bad:?}");
        }
        let d = Sha256Hex::of(b"abc");
        assert_eq!(
            d.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<Sha256Hex>().unwrap(), d);
        assert!(d.to_string().to_uppercase().parse::<Sha256Hex>().is_err());
        assert!("ab".parse::<Sha256Hex>().is_err());
        assert!(FetchId::new("sha256:abc").is_ok());
        assert!(FetchId::new("a b").is_err());
        assert!(FetchId::new(&"a".repeat(MAX_FETCH_ID_LEN + 1)).is_err());
        let sig = SigBytes([7u8; 64]);
        let text = String::from(sig);
        assert_eq!(SigBytes::try_from(text.clone()).unwrap(), sig);
        assert!(SigBytes::try_from(format!("{text}=")).is_err());
        assert!(SigBytes::try_from("AAAA".to_string()).is_err());
    }
}
