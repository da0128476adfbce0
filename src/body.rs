//! Request bodies: read within a size limit and a deadline, then parsed
//! strictly, so that what the gateway judges is exactly what the upstream
//! will read.
//!
//! The rule (README, "Strict JSON"): a body is one JSON value as RFC 8259
//! defines it, and nothing else.
//! - No byte order mark, no trailing data after the value, no comments.
//! - No `NaN`, `Infinity` or other non-JSON literals; numbers must be finite
//!   (`1e999` is refused), and a whole number must fit in a 64-bit integer
//!   (`1e20` or a 25-digit integer is refused: Python's `json`, which the
//!   upstream uses, would read those exactly while a 64-bit float would not).
//! - No duplicate keys in any object: parsers disagree on which one wins, so
//!   a body with two `name`s could be judged by one and executed with the
//!   other.
//! - Strings are valid UTF-8 with valid escapes (no lone surrogates);
//!   nesting is at most 128 deep.
//!
//! What goes upstream is re-serialized from the parsed value
//! ([`to_upstream_bytes`]), never the caller's bytes.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::error::GatewayError;

/// Reads the whole request body, refusing more than `limit` bytes and a body
/// that has not fully arrived within `deadline`.
pub async fn read(body: Body, limit: usize, deadline: Duration) -> Result<Bytes, GatewayError> {
    // Most requests have no body: no timer, no collecting for them.
    if http_body::Body::is_end_stream(&body) {
        return Ok(Bytes::new());
    }
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Err(_) => Err(GatewayError::BodyTimeout(deadline)),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(GatewayError::BodyTooLarge(limit))
        }
        Ok(Err(e)) => Err(GatewayError::BadRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// Why a body is not strict JSON; the message says where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(String);

/// Parses `bytes` as one strict JSON value (see the module doc).
pub fn parse_strict(bytes: &[u8]) -> Result<Value, JsonError> {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Err(JsonError(
            "the body starts with a byte order mark (not allowed in JSON)".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue
        .deserialize(&mut de)
        .map_err(|e| JsonError(e.to_string()))?;
    de.end().map_err(|e| JsonError(e.to_string()))?;
    Ok(value)
}

/// The bytes sent upstream for a judged value.
pub fn to_upstream_bytes(value: &Value) -> Bytes {
    // Serializing a `Value` cannot fail: its keys are strings and its numbers finite.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// Builds a `serde_json::Value`, refusing what [`parse_strict`] refuses
/// beyond serde_json's own grammar checks.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

/// 2^63: whole numbers at or above it do not fit a 64-bit integer (serde_json
/// hands integers that do fit to `visit_i64`/`visit_u64`, everything else
/// to `visit_f64`).
const INTEGER_LIMIT: f64 = 9_223_372_036_854_775_808.0;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        // serde_json reads `-0` as the float -0.0 (to keep its sign), which
        // would go upstream as `-0.0`: a float where the upstream's Python
        // reads the integer 0. Zero is what was judged: zero goes (`-0.0`,
        // read alike, too).
        if v == 0.0 && v.is_sign_negative() {
            return Ok(Value::from(0));
        }
        if v.fract() == 0.0 && v.abs() >= INTEGER_LIMIT {
            return Err(E::custom(format!(
                "the number {v} is a whole number beyond 64 bits, which toastgate cannot forward exactly"
            )));
        }
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("numbers must be finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(StrictValue)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(A::Error::custom(format!(
                    "duplicate key `{}` in an object",
                    key.chars().take(64).collect::<String>()
                )));
            }
            let value = map.next_value_seed(StrictValue)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_json_refuses_what_parsers_disagree_on() {
        let refused: &[&[u8]] = &[
            br#"{"server":{"name":"evil"},"x":NaN}"#,
            br#"{"x":Infinity}"#,
            br#"{"x":-Infinity}"#,
            br#"{"x":1e999}"#,
            br#"{"x":1e20}"#,
            br#"{"x":123456789012345678901234}"#,
            b"\xEF\xBB\xBF{\"x\":1}",
            br#"{"x":1} {"y":2}"#,
            br#"{"x":1}garbage"#,
            br#"{"name":"a","name":"b"}"#,
            br#"{"server":{"name":"ok","name":"evil"}}"#,
            br#"[{"a":1,"a":1}]"#,
            br#"{"x":"\ud800"}"#,
            b"{\"x\":\"\xff\"}",
            br#"{'x':1}"#,
            br#"{"x":1,}"#,
            br#"{"x":01}"#,
            br#"// c
{"x":1}"#,
            b"",
        ];
        for body in refused {
            assert!(
                parse_strict(body).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(body)
            );
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(parse_strict(deep.as_bytes()).is_err(), "nesting is bounded");
    }

    #[test]
    fn strict_json_keeps_what_it_accepts_exactly() {
        let cases: &[(&[u8], Value)] = &[
            (br#"{"a":1}"#, json!({"a": 1})),
            (
                b" \n{\"a\" : [1, 2.5, -3, true, null]}\t\n",
                json!({"a": [1, 2.5, -3, true, null]}),
            ),
            (
                br#"{"n":9223372036854775807}"#,
                json!({"n": 9223372036854775807u64}),
            ),
            (
                br#"{"n":18446744073709551615}"#,
                json!({"n": 18446744073709551615u64}),
            ),
            (br#"{"n":-9223372036854775808}"#, json!({"n": i64::MIN})),
            (br#"{"n":2.0}"#, json!({"n": 2.0})),
            (br#"{"n":-0}"#, json!({"n": 0})),
            (br#"{"s":"\u00e9\ud83d\ude00"}"#, json!({"s": "é😀"})),
            (br#""just a string""#, json!("just a string")),
        ];
        for (body, want) in cases {
            let got = parse_strict(body).unwrap();
            assert_eq!(&got, want);
            // What goes upstream reads back as the same value.
            let sent = to_upstream_bytes(&got);
            assert_eq!(&serde_json::from_slice::<Value>(&sent).unwrap(), want);
        }
        assert_eq!(&to_upstream_bytes(&json!({"n": 2.0}))[..], br#"{"n":2.0}"#);
        let zero = parse_strict(br#"{"boot_index":-0}"#).unwrap();
        assert_eq!(&to_upstream_bytes(&zero)[..], br#"{"boot_index":0}"#);
        let zero = parse_strict(br#"{"x":0.0}"#).unwrap();
        assert_eq!(&to_upstream_bytes(&zero)[..], br#"{"x":0.0}"#);
        // serde_json reads `-0.0` as it reads `-0`: it goes as `0` too.
        let zero = parse_strict(br#"{"x":-0.0}"#).unwrap();
        assert_eq!(&to_upstream_bytes(&zero)[..], br#"{"x":0}"#);
    }

    /// A decimal goes upstream as the very double a correctly rounding
    /// parser (Python's `float`, Rust's `str::parse`) reads from the
    /// caller's text, never one a step away.
    #[test]
    fn decimals_reach_the_upstream_as_the_caller_wrote_them() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let digits = next() % 100_000_000_000_000_000;
            let exponent = (next() % 600) as i64 - 300;
            let text = format!("{digits}.{}e{exponent}", next() % 1000);
            let want: f64 = text.parse().unwrap();
            if !want.is_finite() || (want.fract() == 0.0 && want.abs() >= INTEGER_LIMIT) {
                continue;
            }
            let got = parse_strict(text.as_bytes()).unwrap();
            assert_eq!(got.as_f64(), Some(want), "{text}");
            let sent = to_upstream_bytes(&got);
            let resent: f64 = std::str::from_utf8(&sent).unwrap().parse().unwrap();
            assert_eq!(resent, want, "{text} went upstream as {sent:?}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = parse_strict(br#"{"a":1,"a":2}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate key `a`"), "{e}");
        let e = parse_strict(b"\xEF\xBB\xBF{}").unwrap_err();
        assert!(e.to_string().contains("byte order mark"), "{e}");
        let e = parse_strict(br#"{"a":NaN}"#).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }
}
