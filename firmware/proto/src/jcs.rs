//! RFC 8785 JSON Canonicalization Scheme (JCS), and the strict parser for signed JSON.
//!
//! Signatures cover the canonical bytes of a JSON value, so two parties that hold the same
//! value produce the same bytes regardless of key order, whitespace or escaping on the wire.
//!
//! ## Canonical form ([`to_string`], [`to_vec`])
//! - No whitespace. Object members sorted by the UTF-16 code units of their names; arrays keep
//!   their order.
//! - Strings as ECMAScript `JSON.stringify` writes them: `\"` `\\` `\b` `\f` `\n` `\r` `\t`,
//!   other control characters as `\u00xx` (lowercase hex), everything else as literal UTF-8.
//! - Floating-point numbers as ECMAScript `Number.prototype.toString` (via `ryu-js`):
//!   `4.5`, `0.002`, `1e+30`, `-0` is `0`.
//! - Integers (`serde_json` i64/u64) are printed exactly. For |n| <= 2^53 this is what
//!   RFC 8785 prescribes. **Deliberate departure:** above 2^53 RFC 8785 would first round
//!   the integer to a double, which would make e.g. 9007199254740993 and 9007199254740992
//!   sign identically; we print the exact digits instead so distinct integers never share a
//!   signature. Peers that hold numbers as doubles (JavaScript) must keep integers within
//!   ±2^53 to interoperate; nothing in our protocol needs more.
//!
//! ## Strict parsing ([`parse_strict`])
//! `serde_json::Value` silently keeps the last of two duplicate keys, which lets a signed
//! message mean different things to different parsers. [`parse_strict`] is a small hand
//! parser for RFC 8259 JSON that rejects duplicate keys at any depth (compared after escape
//! decoding), lone surrogates, raw control characters, a byte-order mark, nesting deeper
//! than [`MAX_DEPTH`] and numbers beyond the double range. It never panics and never
//! recurses deeper than [`MAX_DEPTH`].
//!
//! Numbers come out normalized (see [`normalize`]): a number whose value is an integer
//! that fits i64/u64 becomes that integer, whether written `1`, `1.0` or `1e0`; other
//! numbers become the correctly rounded double. On normalized values the canonical form is
//! injective and `parse_strict(to_string(v)) == v`, so "verifies" and "means the same" agree.

use serde_json::{Map, Number, Value};

/// Deepest nesting of arrays and objects [`parse_strict`] accepts.
pub const MAX_DEPTH: usize = 128;

/// Why [`parse_strict`] refused its input. Offsets are byte offsets into the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JcsError {
    #[error("not valid UTF-8 at byte {0}")]
    Utf8(usize),
    #[error("byte {offset}: {reason}")]
    Syntax { offset: usize, reason: &'static str },
    #[error("byte {offset}: duplicate object key {key:?}")]
    DuplicateKey { offset: usize, key: String },
    #[error("byte {offset}: nested deeper than {MAX_DEPTH} levels")]
    TooDeep { offset: usize },
    #[error("byte {offset}: number is outside the range of a double")]
    NumberOutOfRange { offset: usize },
}

/// The canonical (RFC 8785) text of `value`.
pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

/// The canonical (RFC 8785) UTF-8 bytes of `value`: what gets signed.
pub fn to_vec(value: &Value) -> Vec<u8> {
    to_string(value).into_bytes()
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (key, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, key);
                out.push(':');
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(f) = n.as_f64() {
        // serde_json numbers are always finite, so this is never "NaN" or "Infinity".
        out.push_str(ryu_js::Buffer::new().format(f));
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let b = u32::from(c) as usize;
                out.push_str("\\u00");
                out.push(char::from(HEX[b >> 4]));
                out.push(char::from(HEX[b & 0xf]));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Rewrite every number into its normal form: an integral value that fits i64/u64 becomes
/// that integer (so `1.0` and `1` are the same value); everything else stays a double.
/// [`parse_strict`] output is already normalized.
pub fn normalize(value: &mut Value) {
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                if let Some(normal) = normal_number(f) {
                    *n = normal;
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize),
        Value::Object(map) => map.values_mut().for_each(normalize),
        Value::Null | Value::Bool(_) | Value::String(_) => {}
    }
}

/// The normal form of a double; `None` for NaN and infinities.
fn normal_number(f: f64) -> Option<Number> {
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    if !f.is_finite() {
        return None;
    }
    if f.fract() == 0.0 {
        // Integral doubles in these ranges convert exactly.
        if (0.0..TWO_64).contains(&f) {
            return Some(Number::from(f as u64));
        }
        if (-TWO_63..0.0).contains(&f) {
            return Some(Number::from(f as i64));
        }
    }
    Number::from_f64(f)
}

/// Parse one JSON text strictly (see the module docs). Surrounding whitespace is allowed.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, JcsError> {
    let text = std::str::from_utf8(bytes).map_err(|e| JcsError::Utf8(e.valid_up_to()))?;
    let mut parser = Parser { text, pos: 0 };
    if text.starts_with('\u{feff}') {
        return Err(parser.syntax("byte-order mark is not allowed"));
    }
    parser.skip_ws();
    let value = parser.value(0)?;
    parser.skip_ws();
    if parser.pos != text.len() {
        return Err(parser.syntax("unexpected data after the JSON value"));
    }
    Ok(value)
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn syntax(&self, reason: &'static str) -> JcsError {
        JcsError::Syntax {
            offset: self.pos,
            reason,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect_byte(&mut self, byte: u8, reason: &'static str) -> Result<(), JcsError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.syntax(reason))
        }
    }

    /// A value; `depth` is the number of arrays/objects around it.
    fn value(&mut self, depth: usize) -> Result<Value, JcsError> {
        match self.peek() {
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Value::String),
            Some(b'-' | b'0'..=b'9') => self.number().map(Value::Number),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            Some(_) => Err(self.syntax("expected a JSON value")),
            None => Err(self.syntax("unexpected end of input")),
        }
    }

    fn literal(&mut self, word: &'static str, value: Value) -> Result<Value, JcsError> {
        if self.text.as_bytes()[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.syntax("expected true, false or null"))
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, JcsError> {
        if depth > MAX_DEPTH {
            return Err(JcsError::TooDeep { offset: self.pos });
        }
        self.pos += 1; // '{'
        let mut map = Map::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.syntax("expected a string key"));
            }
            let key_offset = self.pos;
            let key = self.string()?;
            self.skip_ws();
            self.expect_byte(b':', "expected ':' after an object key")?;
            self.skip_ws();
            let item = self.value(depth)?;
            if map.contains_key(&key) {
                return Err(JcsError::DuplicateKey {
                    offset: key_offset,
                    key: shorten(&key),
                });
            }
            map.insert(key, item);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(map));
                }
                _ => return Err(self.syntax("expected ',' or '}' in an object")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, JcsError> {
        if depth > MAX_DEPTH {
            return Err(JcsError::TooDeep { offset: self.pos });
        }
        self.pos += 1; // '['
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_ws();
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.syntax("expected ',' or ']' in an array")),
            }
        }
    }

    fn string(&mut self) -> Result<String, JcsError> {
        self.pos += 1; // opening quote
        let mut out = String::new();
        let mut run_start = self.pos;
        loop {
            let Some(b) = self.peek() else {
                return Err(self.syntax("unterminated string"));
            };
            match b {
                b'"' => {
                    out.push_str(&self.text[run_start..self.pos]);
                    self.pos += 1;
                    return Ok(out);
                }
                b'\\' => {
                    out.push_str(&self.text[run_start..self.pos]);
                    self.pos += 1;
                    let c = self.escape()?;
                    out.push(c);
                    run_start = self.pos;
                }
                0x00..=0x1f => return Err(self.syntax("control character in a string")),
                // Everything else, including multi-byte UTF-8, is copied as a run. Runs end
                // only at ASCII bytes, so the slices are always on char boundaries.
                _ => self.pos += 1,
            }
        }
    }

    /// After a backslash: one escape, or a surrogate pair of `\u` escapes.
    fn escape(&mut self) -> Result<char, JcsError> {
        let Some(b) = self.peek() else {
            return Err(self.syntax("unterminated escape"));
        };
        self.pos += 1;
        let c = match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4()?;
                let code = match first {
                    0xd800..=0xdbff => {
                        if !self.text.as_bytes()[self.pos..].starts_with(b"\\u") {
                            return Err(self.syntax("lone UTF-16 surrogate"));
                        }
                        self.pos += 2;
                        let second = self.hex4()?;
                        if !(0xdc00..=0xdfff).contains(&second) {
                            return Err(self.syntax("lone UTF-16 surrogate"));
                        }
                        0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00)
                    }
                    0xdc00..=0xdfff => return Err(self.syntax("lone UTF-16 surrogate")),
                    other => other,
                };
                char::from_u32(code).ok_or_else(|| self.syntax("invalid \\u escape"))?
            }
            _ => return Err(self.syntax("invalid escape")),
        };
        Ok(c)
    }

    fn hex4(&mut self) -> Result<u32, JcsError> {
        let digits = self
            .text
            .as_bytes()
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.syntax("\\u needs four hex digits"))?;
        let mut code = 0u32;
        for &d in digits {
            let v = char::from(d)
                .to_digit(16)
                .ok_or_else(|| self.syntax("\\u needs four hex digits"))?;
            code = code * 16 + v;
        }
        self.pos += 4;
        Ok(code)
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<Number, JcsError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.syntax("expected a digit")),
        }
        let mut integer_syntax = true;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.syntax("expected a digit after '.'"));
            }
            integer_syntax = false;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.syntax("expected a digit in the exponent"));
            }
            integer_syntax = false;
        }
        let literal = &self.text[start..self.pos];
        if integer_syntax {
            if let Ok(u) = literal.parse::<u64>() {
                return Ok(Number::from(u));
            }
            if let Ok(i) = literal.parse::<i64>() {
                return Ok(Number::from(i));
            }
        }
        // Rust's float parsing is correctly rounded, so the sender's shortest round-trip
        // text always comes back as the same double.
        literal
            .parse::<f64>()
            .ok()
            .and_then(normal_number)
            .ok_or(JcsError::NumberOutOfRange { offset: start })
    }
}

/// Keys in error messages are cut short: an attacker controls them.
fn shorten(key: &str) -> String {
    const MAX: usize = 64;
    if key.len() <= MAX {
        return key.to_string();
    }
    let mut end = MAX;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &key[..end])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn canon(text: &str) -> String {
        to_string(&parse_strict(text.as_bytes()).unwrap())
    }

    /// RFC 8785 section 3.2.2 (primitive data types), as in cyberphone's values.json.
    #[test]
    fn rfc8785_values_example() {
        let input = r#"{
  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]
}"#;
        let expected = r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#;
        assert_eq!(canon(input), expected);
    }

    /// RFC 8785 section 3.2.3 (sorting of properties), as in cyberphone's weird.json.
    #[test]
    fn rfc8785_sorting_example() {
        let input = r#"{
  "\u20ac": "Euro Sign",
  "\r": "Carriage Return",
  "\u000a": "Newline",
  "1": "One",
  "\u0080": "Control\u007f",
  "\ud83d\ude02": "Smiley",
  "\u00f6": "Latin Small Letter O With Diaeresis",
  "\ufb33": "Hebrew Letter Dalet With Dagesh",
  "</script>": "Browser Challenge"
}"#;
        let expected = "{\"\\n\":\"Newline\",\"\\r\":\"Carriage Return\",\"1\":\"One\",\
                        \"</script>\":\"Browser Challenge\",\"\u{80}\":\"Control\u{7f}\",\
                        \"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\
                        \"\u{20ac}\":\"Euro Sign\",\"\u{1f602}\":\"Smiley\",\
                        \"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}";
        assert_eq!(canon(input), expected);
    }

    /// The other cyberphone/json-canonicalization test files.
    #[test]
    fn cyberphone_testdata() {
        assert_eq!(
            canon(r#"[ 56, { "d": true, "10": null, "1": [ ] } ]"#),
            r#"[56,{"1":[],"10":null,"d":true}]"#
        );
        assert_eq!(
            canon(
                r#"{ "1": {"f": {"f": "hi","F": 5} ,"\n": 56.0}, "10": { }, "": "empty",
                     "a": { }, "111": [ {"e": "yes","E": "no" } ], "A": { } }"#
            ),
            r#"{"":"empty","1":{"\n":56,"f":{"F":5,"f":"hi"}},"10":{},"111":[{"E":"no","e":"yes"}],"A":{},"a":{}}"#
        );
        assert_eq!(
            canon(
                r#"{ "peach": "This sorting order", "péché": "is wrong according to French",
                     "pêche": "but canonicalization MUST", "sin": "ignore locale" }"#
            ),
            r#"{"peach":"This sorting order","péché":"is wrong according to French","pêche":"but canonicalization MUST","sin":"ignore locale"}"#
        );
        // No Unicode normalization: A + combining ring stays two code points.
        assert_eq!(
            canon(r#"{ "Unnormalized Unicode":"A\u030a" }"#),
            "{\"Unnormalized Unicode\":\"A\u{30a}\"}"
        );
    }

    /// RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical text.
    #[test]
    fn rfc8785_appendix_b_numbers() {
        let table: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for (bits, expected) in table {
            let f = f64::from_bits(*bits);
            let value = Value::Number(Number::from_f64(f).unwrap());
            assert_eq!(to_string(&value), *expected, "{bits:016x}");
            // Parsing the canonical text and normalizing gives a value with the same text.
            assert_eq!(canon(expected), *expected, "{bits:016x}");
        }
    }

    #[test]
    fn integers_print_exactly_and_floats_normalize() {
        assert_eq!(to_string(&json!(u64::MAX)), "18446744073709551615");
        assert_eq!(to_string(&json!(i64::MIN)), "-9223372036854775808");
        assert_eq!(to_string(&json!(9007199254740993u64)), "9007199254740993");
        assert_eq!(canon("1.0"), "1");
        assert_eq!(canon("-0"), "0");
        assert_eq!(canon("-0.0"), "0");
        assert_eq!(canon("1e2"), "100");
    }

    #[test]
    fn normalized_numbers_are_one_value() {
        let one = parse_strict(b"1").unwrap();
        for text in ["1.0", "1e0", "10e-1", "0.1e1", "1.00000000000000000001"] {
            assert_eq!(parse_strict(text.as_bytes()).unwrap(), one, "{text}");
        }
        // 2^60 written as a double is the exact integer, not ES's rounded digits.
        assert_eq!(
            parse_strict(b"1152921504606846976.0").unwrap(),
            json!(1152921504606846976u64)
        );
        let mut v = json!({"a": [1.0, 2.5, -3.0, 1e300]});
        normalize(&mut v);
        assert_eq!(v, json!({"a": [1, 2.5, -3, 1e300]}));
        // Beyond u64 / i64 an integer literal becomes the nearest double.
        assert_eq!(
            parse_strict(b"18446744073709551616").unwrap(),
            json!(18446744073709551616.0)
        );
        assert_eq!(
            to_string(&parse_strict(b"18446744073709551616").unwrap()),
            "18446744073709552000"
        );
    }

    #[test]
    fn strict_parser_rejects_what_it_must() {
        let bad: &[&[u8]] = &[
            b"",
            b" ",
            b"{",
            b"{\"a\":1,}",
            b"[1,]",
            b"[1 2]",
            b"01",
            b"1.",
            b".5",
            b"1e",
            b"+1",
            b"-",
            b"NaN",
            b"Infinity",
            b"1e400",
            b"-1e400",
            b"tru",
            b"nul",
            b"\"abc",
            b"\"a\x01b\"",
            b"\"\\x\"",
            b"\"\\u12\"",
            b"\"\\ud800\"",
            b"\"\\ud800\\u0041\"",
            b"\"\\udc00\"",
            b"\xef\xbb\xbf{}",
            b"\"\xff\"",
            b"{} {}",
            b"{\"a\" 1}",
            b"{1:2}",
            b"'a'",
        ];
        for input in bad {
            assert!(
                parse_strict(input).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert!(matches!(
            parse_strict(b"1e400"),
            Err(JcsError::NumberOutOfRange { offset: 0 })
        ));
        assert!(matches!(parse_strict(b"\"\xff\""), Err(JcsError::Utf8(1))));
    }

    #[test]
    fn duplicate_keys_are_rejected_at_any_depth() {
        for input in [
            r#"{"a":1,"a":1}"#,
            r#"{"a":1,"b":2,"a":3}"#,
            r#"{"x":{"a":1,"a":2}}"#,
            r#"[{"k":[{"a":null,"a":null}]}]"#,
            r#"{"a":1,"\u0061":2}"#,
            r#"{"\ud83d\ude02":1,"😂":2}"#,
        ] {
            assert!(
                matches!(
                    parse_strict(input.as_bytes()),
                    Err(JcsError::DuplicateKey { .. })
                ),
                "{input}"
            );
        }
        let long = format!("{{\"{0}\":1,\"{0}\":2}}", "k".repeat(10_000));
        let err = parse_strict(long.as_bytes()).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn depth_limit() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse_strict(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(matches!(
            parse_strict(deep.as_bytes()),
            Err(JcsError::TooDeep { .. })
        ));
        let very_deep = "[{\"a\":".repeat(500_000);
        assert!(parse_strict(very_deep.as_bytes()).is_err());
    }

    #[test]
    fn escapes_and_whitespace() {
        assert_eq!(
            canon(" \t\r\n{ \"a\" : [ \"\\b\\f\\n\\r\\t\\u001f\\u007f\\/\" ] } \n"),
            "{\"a\":[\"\\b\\f\\n\\r\\t\\u001f\u{7f}/\"]}"
        );
        assert_eq!(to_string(&json!("\u{0}\u{1e}")), r#""\u0000\u001e""#);
        assert_eq!(to_string(&json!("\u{2028}é")), "\"\u{2028}é\"");
    }

    /// Arbitrary JSON values: strings, integers, doubles, nested arrays and objects.
    pub(crate) fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<u64>().prop_map(|u| json!(u)),
            any::<f64>()
                .prop_filter_map("finite", Number::from_f64)
                .prop_map(Value::Number),
            ".*".prop_map(Value::String),
            "[a-z\\\\\"\u{0}-\u{1f}\u{7f}-\u{ff}\u{fb33}\u{1f602}]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn canonical_text_parses_back_to_the_normalized_value(mut v in arb_json()) {
            normalize(&mut v);
            let text = to_string(&v);
            let back = parse_strict(text.as_bytes()).unwrap();
            prop_assert_eq!(&back, &v);
            prop_assert_eq!(to_string(&back), text);
        }

        #[test]
        fn canonical_form_ignores_serde_json_layout(mut v in arb_json()) {
            normalize(&mut v);
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            let compact = serde_json::to_string(&v).unwrap();
            prop_assert_eq!(canon(&pretty), to_string(&v));
            prop_assert_eq!(canon(&compact), to_string(&v));
        }

        #[test]
        fn parse_strict_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_strict(&bytes);
        }

        #[test]
        fn parse_strict_never_panics_on_jsonish_text(text in "[\\[\\]{}\",:0-9eE.+\\-\\\\u a-fnrt]{0,64}") {
            if let Ok(v) = parse_strict(text.as_bytes()) {
                let canonical = to_string(&v);
                prop_assert_eq!(parse_strict(canonical.as_bytes()).unwrap(), v);
            }
        }
    }
}
