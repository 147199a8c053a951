//! A bitmap of `n` flags as text: `ceil(n / 8)` bytes in lowercase hex, flag `i` in bit
//! `i % 8` (from the low bit) of byte `i / 8`. One encoding, so one parser: used by the
//! shard cell's `shard.opened` answer and by `borg get`'s saved progress.

/// Pack flags into bytes.
pub fn pack(flags: &[bool]) -> Vec<u8> {
    let mut bytes = vec![0u8; flags.len().div_ceil(8)];
    for (i, _) in flags.iter().enumerate().filter(|(_, f)| **f) {
        bytes[i / 8] |= 1 << (i % 8);
    }
    bytes
}

/// The first `n` flags of `bytes` (missing bytes read as clear).
pub fn unpack(bytes: &[u8], n: usize) -> Vec<bool> {
    (0..n)
        .map(|i| bytes.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
        .collect()
}

/// Bytes as lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a bitmap of `n` flags: exactly `ceil(n / 8) * 2` lowercase hex digits, no
/// bit set past flag `n - 1`. Anything else is `None`.
pub fn from_hex(text: &str, n: usize) -> Option<Vec<u8>> {
    let t = text.as_bytes();
    if t.len() != n.div_ceil(8) * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = t
        .chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect::<Option<Vec<u8>>>()?;
    if !n.is_multiple_of(8) && bytes.last().is_some_and(|b| b >> (n % 8) != 0) {
        return None;
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strict_text() {
        assert_eq!(from_hex("05", 3), Some(vec![5]));
        assert_eq!(from_hex("0F", 4), None, "uppercase");
        assert_eq!(from_hex("10", 4), None, "a bit past the last flag");
        assert_eq!(from_hex("0", 4), None);
        assert_eq!(from_hex("", 0), Some(vec![]));
        assert_eq!(to_hex(&pack(&[true, false, true])), "05");
    }

    proptest! {
        #[test]
        fn round_trip(flags in proptest::collection::vec(any::<bool>(), 0..100)) {
            let text = to_hex(&pack(&flags));
            let bytes = from_hex(&text, flags.len()).unwrap();
            prop_assert_eq!(unpack(&bytes, flags.len()), flags);
        }

        #[test]
        fn never_panics(text in "\\PC{0,40}", n in 0usize..200) {
            let _ = from_hex(&text, n);
        }
    }
}
