//! A new job's payload as the JSON text every store is handed.
//!
//! [`NewJob::new`](crate::NewJob::new) serializes the payload straight to
//! compact text, never to a [`Value`] tree: a SQL store sends text, and for
//! a small payload building the tree (an allocation per key and string,
//! and as many frees) costs more than the rest of an enqueue's client work.
//! The checks [`check_json`](crate::check_json) makes on a tree are made
//! here on the text: one quick pass, and a second only for a text that
//! may need it.

use std::fmt;

use serde_json::Value;
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::job::MAX_JSON_DEPTH;

/// A validated job's payload: compact JSON text that every store can hold
/// and read back (no `\u0000` in any string or key, no lone UTF-16
/// surrogate, at most [`MAX_JSON_DEPTH`] levels of nesting, no number
/// beyond `f64`'s range, no integer beyond 64 bits).
///
/// Only [`NewJob::validate`](crate::NewJob::validate) makes one. Two
/// payloads are equal when their texts are.
///
/// ```
/// use relayq_core::NewJob;
/// use serde_json::json;
///
/// let job = NewJob::new("send_email", &json!({"to": "ada@example.com"})).validate()?;
/// assert_eq!(job.payload.as_str(), r#"{"to":"ada@example.com"}"#);
/// assert_eq!(job.payload.to_value()?, json!({"to": "ada@example.com"}));
/// # Ok::<(), relayq_core::Error>(())
/// ```
#[derive(Clone)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// `raw` once it passed [`check_json_text`], as `field`.
    pub(crate) fn checked(field: &'static str, raw: Box<RawValue>) -> Result<Self> {
        check_json_text(field, raw.get())?;
        Ok(Self(raw))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The JSON text as serde_json's raw value, which serializes as is
    /// (for binding it as `json` without parsing it again).
    pub fn as_raw(&self) -> &RawValue {
        &self.0
    }

    /// The payload parsed into a tree, for stores that keep one.
    pub fn to_value(&self) -> Result<Value> {
        serde_json::from_str(self.as_str())
            .map_err(|e| Error::backend(format!("a checked payload did not parse: {e}")))
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Payload {}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Payload").field(&self.as_str()).finish()
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// [`check_json`](crate::check_json) on JSON text, which must be valid JSON
/// (serde_json's output): no `\u0000` escape in any string or key (nor a
/// raw NUL byte), no unpaired UTF-16 surrogate escape (serde_json
/// cannot read one back, nor can `jsonb` hold one), and no value nested
/// deeper than [`MAX_JSON_DEPTH`] levels, the top-level value being at
/// level 0, no number beyond `f64`'s range (a pre-serialized
/// [`RawValue`] is not range-checked, and serde_json cannot read one back),
/// and no integer beyond 64 bits (serde_json reads one back rounded).
pub(crate) fn check_json_text(field: &'static str, text: &str) -> Result<()> {
    let bytes = text.as_bytes();
    // Most payloads have no escape that could name a NUL or a surrogate,
    // fewer brackets than the depth allowed, and no number that could pass
    // `f64`'s range or 64 bits (that takes an exponent after a digit, or
    // 19 digits):
    // one pass over the bytes settles them, without reading the text a
    // token at a time.
    let (mut brackets, mut digits, mut suspect) = (0usize, 0usize, false);
    let mut previous = 0u8;
    for &byte in bytes {
        match byte {
            b'[' | b'{' => brackets += 1,
            b'0'..=b'9' => digits += 1,
            b'e' | b'E' if previous.is_ascii_digit() => suspect = true,
            b'u' if previous == b'\\' => suspect = true,
            0 => suspect = true,
            _ => {}
        }
        if !byte.is_ascii_digit() {
            digits = 0;
        }
        // 19 digits may pass 64 bits (`i64::MIN` has 19, `u64::MAX` 20).
        suspect |= digits >= 19;
        previous = byte;
    }
    if brackets <= MAX_JSON_DEPTH && !suspect {
        return Ok(());
    }
    // Arrays and objects open around the current position: a value that
    // starts here is that many levels down.
    let mut open = 0usize;
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' => {}
            b']' | b'}' => open = open.saturating_sub(1),
            _ if open > MAX_JSON_DEPTH => {
                return Err(Error::invalid(
                    field,
                    format!("nests deeper than {MAX_JSON_DEPTH} levels"),
                ));
            }
            b'[' | b'{' => open += 1,
            b'"' => {
                i = string_end(field, bytes, i + 1)?;
                continue;
            }
            b'-' | b'0'..=b'9' => {
                let end = bytes[i..]
                    .iter()
                    .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .map_or(bytes.len(), |n| i + n);
                let number = &text[i..end];
                // serde_json's own reading (it rounds differently from
                // `str::parse`: `1.7976931348623158e308` overflows there).
                let shown = || number.chars().take(32).collect::<String>();
                if serde_json::from_str::<f64>(number).is_err() {
                    return Err(Error::invalid(
                        field,
                        format!("number {} is beyond the range of f64", shown()),
                    ));
                }
                // serde_json reads an integer past 64 bits as an `f64`,
                // rounded: it would not read back as written.
                if !number.contains(['.', 'e', 'E'])
                    && number.parse::<i64>().is_err()
                    && number.parse::<u64>().is_err()
                {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "integer {} is beyond 64 bits (it would read back rounded)",
                            shown()
                        ),
                    ));
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The index just past the string whose contents start at `start`,
/// checking its escapes on the way.
fn string_end(field: &'static str, bytes: &[u8], start: usize) -> Result<usize> {
    let nul = || Error::invalid(field, "strings and keys must not contain NUL characters");
    let surrogate = || Error::invalid(field, "strings and keys must not hold a lone surrogate");
    let mut i = start;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b'"' => return Ok(i + 1),
            0 => return Err(nul()),
            b'\\' if bytes.get(i + 1) == Some(&b'u') => {
                let unit = hex4(bytes, i + 2);
                i += 6;
                match unit {
                    Some(0) => return Err(nul()),
                    Some(0xD800..=0xDBFF) => {
                        let low = (bytes.get(i..i + 2) == Some(b"\\u"))
                            .then(|| hex4(bytes, i + 2))
                            .flatten();
                        if !matches!(low, Some(0xDC00..=0xDFFF)) {
                            return Err(surrogate());
                        }
                        i += 6;
                    }
                    Some(0xDC00..=0xDFFF) => return Err(surrogate()),
                    _ => {}
                }
            }
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    // Valid JSON closes every string; text that does not is not valid JSON.
    Err(Error::invalid(
        field,
        "is not valid JSON: a string is not closed",
    ))
}

/// The four hex digits at `at`, as a UTF-16 code unit.
fn hex4(bytes: &[u8], at: usize) -> Option<u16> {
    let digits = std::str::from_utf8(bytes.get(at..at + 4)?).ok()?;
    u16::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check_json;
    use serde_json::json;

    /// What `check_json_text` says about the serialized value.
    fn text_verdict(value: &Value) -> Option<String> {
        check_json_text("payload", &value.to_string())
            .err()
            .map(|e| e.to_string())
    }

    fn nested(levels: usize, innermost: Value) -> Value {
        (0..levels).fold(innermost, |inner, i| {
            if i % 2 == 0 {
                json!([inner])
            } else {
                json!({ "k": inner })
            }
        })
    }

    #[test]
    fn numbers_beyond_f64_or_integers_beyond_64_bits_are_refused_and_the_rest_pass() {
        let long = format!("[{}]", "9".repeat(400));
        for bad in [
            "[1e400]",
            r#"{"n":-2E+309}"#,
            long.as_str(),
            "[123456789012345678901234567890]",
            "[18446744073709551616]",
            r#"{"n":-9223372036854775809}"#,
        ] {
            let err = check_json_text("payload", bad).expect_err(bad);
            assert_eq!(err.invalid_field(), Some("payload"), "{bad}");
        }
        for good in [
            "[1e300, -1.5e-400, 0.1, -0]",
            r#"{"e":"1e400","s":"9e999"}"#,
            "[18446744073709551615, -9223372036854775808]",
            "[1234567890123456789012345.5, 12345678901234567890123e2]",
            r#"{"digits":"123456789012345678901234567890"}"#,
        ] {
            check_json_text("payload", good).expect(good);
        }
    }

    #[test]
    fn agrees_with_the_tree_check() {
        let cases = [
            json!(null),
            json!("plain"),
            json!({"a": "x\u{0}y"}),
            json!({"x\u{0}": 1}),
            json!(["\\u0000 is text here, not an escape"]),
            json!({"a": [1, {"b": "\u{1F600} and \u{0}"}]}),
            nested(MAX_JSON_DEPTH, json!(1)),
            nested(MAX_JSON_DEPTH + 1, json!(1)),
            nested(MAX_JSON_DEPTH, json!([])),
            nested(MAX_JSON_DEPTH + 1, json!([])),
            nested(MAX_JSON_DEPTH + 1, json!({})),
            nested(MAX_JSON_DEPTH + 5, json!("deep")),
        ];
        for value in cases {
            assert_eq!(
                text_verdict(&value).is_some(),
                check_json("payload", &value).is_err(),
                "{value}"
            );
        }
    }

    #[test]
    fn an_escaped_nul_is_refused_and_names_the_field() {
        let err = check_json_text("payload", r#"{"a":"x\u0000"}"#).unwrap_err();
        assert_eq!(err.invalid_field(), Some("payload"));
        // A backslash before it makes it text, not an escape.
        check_json_text("payload", r#"{"a":"x\\u0000"}"#).unwrap();
    }

    #[test]
    fn surrogates_must_pair() {
        check_json_text("payload", r#"["\ud83d\ude00"]"#).unwrap();
        for lone in [
            r#"["\ud83d"]"#,
            r#"["\ude00"]"#,
            r#"["\ud83dx"]"#,
            r#"["\ud83d\u0041"]"#,
        ] {
            let err = check_json_text("payload", lone).unwrap_err();
            assert_eq!(err.invalid_field(), Some("payload"), "{lone}");
        }
    }

    #[test]
    fn equal_by_text_and_parses_back() {
        let raw = serde_json::value::to_raw_value(&json!({"n": 1})).unwrap();
        let a = Payload::checked("payload", raw.clone()).unwrap();
        let b = Payload::checked("payload", raw).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_value().unwrap(), json!({"n": 1}));
        assert_eq!(a.to_string(), r#"{"n":1}"#);
    }
}
