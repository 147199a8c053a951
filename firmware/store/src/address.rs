//! Shard addresses: the SHA-256 of a shard's bytes, written as 64 lowercase hex characters.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// The address of a shard: the SHA-256 of its stored bytes.
///
/// Two shards with the same bytes have the same address, so storing one twice is a no-op, and
/// bytes fetched from anyone can be checked against the address they were asked for. The text
/// form (Display, FromStr, serde) is 64 lowercase hex characters; parsing is strict.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address([u8; 32]);

impl Address {
    /// Length of the text form.
    pub const HEX_LEN: usize = 64;

    /// The address of `bytes`.
    pub fn of(bytes: &[u8]) -> Address {
        Address(Sha256::digest(bytes).into())
    }

    /// An address from its 32 raw bytes (no hashing: the caller says these are a SHA-256).
    pub const fn from_bytes(bytes: [u8; 32]) -> Address {
        Address(bytes)
    }

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `bytes` hash to this address.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        Address::of(bytes) == *self
    }
}

/// Why a text address was refused. [`AddressError::code`] is the wire error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("shard address must be 64 hex characters, got {0}")]
    Length(usize),
    #[error("shard address has a character other than 0-9 a-f at byte {0}")]
    NotHex(usize),
}

impl AddressError {
    /// The error code used on the wire (`{"error":"<code>",...}`) and in metrics labels.
    pub fn code(&self) -> &'static str {
        "bad_address"
    }

    /// The HTTP status for this error when it answers a request.
    pub fn http_status(&self) -> u16 {
        400
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; Address::HEX_LEN];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
        }
        // Every byte of `out` comes from HEX, which is ASCII.
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl FromStr for Address {
    type Err = AddressError;

    /// Exactly 64 characters of `0-9a-f`; uppercase, whitespace and prefixes are refused, so
    /// one address has one text form.
    fn from_str(s: &str) -> Result<Address, AddressError> {
        let s = s.as_bytes();
        if s.len() != Address::HEX_LEN {
            return Err(AddressError::Length(s.len()));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let hi = nibble(s[2 * i]).ok_or(AddressError::NotHex(2 * i))?;
            let lo = nibble(s[2 * i + 1]).ok_or(AddressError::NotHex(2 * i + 1))?;
            *byte = (hi << 4) | lo;
        }
        Ok(Address(out))
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Address, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Address;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a shard address (64 lowercase hex characters)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Address, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn empty_shard_has_the_sha256_of_nothing() {
        assert_eq!(
            Address::of(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            Address::of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn strict_parse() {
        let good = Address::of(b"abc").to_string();
        assert_eq!(good.parse::<Address>().unwrap(), Address::of(b"abc"));
        // "ba7816bf...": the first letter is refused in uppercase.
        assert_eq!(
            good.to_uppercase().parse::<Address>(),
            Err(AddressError::NotHex(0))
        );
        assert_eq!("".parse::<Address>(), Err(AddressError::Length(0)));
        assert_eq!(
            format!("{good} ").parse::<Address>(),
            Err(AddressError::Length(65))
        );
        assert_eq!(
            format!("0x{}", &good[2..]).parse::<Address>(),
            Err(AddressError::NotHex(1))
        );
        // A multi-byte character: refused by length or by byte, never a panic.
        let e = format!("é{}", &good[2..]).parse::<Address>().unwrap_err();
        assert_eq!(e, AddressError::NotHex(0));
        assert_eq!(e.code(), "bad_address");
        assert_eq!(e.http_status(), 400);
    }

    #[test]
    fn serde_is_the_hex_string() {
        let a = Address::of(b"shard");
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"{a}\""));
        assert_eq!(serde_json::from_str::<Address>(&json).unwrap(), a);
        assert!(serde_json::from_str::<Address>("\"abc\"").is_err());
        assert!(serde_json::from_str::<Address>("[1,2,3]").is_err());
    }
}
