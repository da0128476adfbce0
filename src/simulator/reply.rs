//! The one place that turns a failure into what the client sees, plus the small helpers
//! every handler shares (JSON answers, query strings, timestamps, request bodies).

use axum::body::Body;
use axum::response::Response;
use chrono::{DateTime, NaiveDateTime, Utc};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

/// A failed compute request, rendered in Nova's fault format
/// (`{"<kind>":{"code":N,"message":".."}}`), except 401 which keystonemiddleware answers
/// in Keystone's `{"error":{..}}` format.
#[derive(Debug)]
pub(crate) enum Fault {
    BadRequest(String),
    Unauthorized,
    Forbidden(String),
    NotFound(String),
    MethodNotAllowed(&'static str),
    Conflict(String),
    TooLarge,
    UnsupportedMediaType,
}

pub(crate) fn bad(msg: impl Into<String>) -> Fault {
    Fault::BadRequest(msg.into())
}

pub(crate) fn not_found(msg: impl Into<String>) -> Fault {
    Fault::NotFound(msg.into())
}

pub(crate) fn conflict(msg: impl Into<String>) -> Fault {
    Fault::Conflict(msg.into())
}

pub(crate) const UNAUTHORIZED_MESSAGE: &str = "The request you have made requires authentication.";
pub(crate) const RESOURCE_NOT_FOUND: &str = "The resource could not be found.";

impl Fault {
    pub fn into_response(self) -> Response {
        let (status, kind, message) = match self {
            Fault::BadRequest(m) => (StatusCode::BAD_REQUEST, "badRequest", m),
            Fault::Unauthorized => {
                return keystone_error(StatusCode::UNAUTHORIZED, UNAUTHORIZED_MESSAGE);
            }
            Fault::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m),
            Fault::NotFound(m) => (StatusCode::NOT_FOUND, "itemNotFound", m),
            Fault::MethodNotAllowed(allow) => {
                let mut resp = json_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &json!({"badMethod": {"code": 405,
                        "message": "The method specified is not allowed for this resource."}}),
                );
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                return resp;
            }
            Fault::Conflict(m) => (StatusCode::CONFLICT, "conflictingRequest", m),
            Fault::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "overLimit",
                "Request is too large.".to_string(),
            ),
            Fault::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "badMediaType",
                "Unsupported Content-Type".to_string(),
            ),
        };
        json_response(
            status,
            &json!({ kind: {"code": status.as_u16(), "message": message} }),
        )
    }
}

/// Keystone's error body: `{"error":{"message","code","title"}}`.
pub(crate) fn keystone_error(status: StatusCode, message: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    json_response(
        status,
        &json!({"error": {"message": message, "code": status.as_u16(), "title": title}}),
    )
}

pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn empty_response(status: StatusCode) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    resp
}

pub(crate) type Reply = Result<Response, Fault>;

pub(crate) fn ok(value: Value) -> Reply {
    Ok(json_response(StatusCode::OK, &value))
}

// ---- request bodies -----------------------------------------------------------------

/// Parses a JSON request body; anything unreadable is Nova's "Malformed request body".
pub(crate) fn parse_body(body: &[u8]) -> Result<Value, Fault> {
    serde_json::from_slice::<Value>(body).map_err(|_| bad("Malformed request body"))
}

/// A short rendering of a JSON value for error messages, like Nova's `Value: ..`.
pub(crate) fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        let cut: String = s.chars().take(77).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// Nova's JSON-schema style message for a field with a bad value.
pub(crate) fn invalid_field(field: &str, value: &Value, why: &str) -> Fault {
    bad(format!(
        "Invalid input for field/attribute {field}. Value: {}. {why}",
        show(value)
    ))
}

pub(crate) fn required(field: &str) -> Fault {
    bad(format!("'{field}' is a required property"))
}

/// Reads an integer that may be sent as a JSON number or a numeric string (Nova accepts
/// both for counts and sizes).
pub(crate) fn int_like(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
}

/// Reads a boolean sent as a JSON bool, 0/1, or "true"/"false"/"1"/"0".
pub(crate) fn bool_like(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_i64() {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

// ---- query strings ------------------------------------------------------------------

pub(crate) type Query = Vec<(String, String)>;

pub(crate) fn parse_query(raw: Option<&str>) -> Query {
    match raw {
        Some(q) => url::form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
        None => Vec::new(),
    }
}

pub(crate) fn query_get<'a>(q: &'a Query, key: &str) -> Option<&'a str> {
    q.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

pub(crate) fn query_all<'a>(q: &'a Query, key: &str) -> Vec<&'a str> {
    q.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Nova's osapi max_limit.
pub(crate) const MAX_LIMIT: usize = 1000;

/// `limit` as Nova reads it: a non-negative integer, capped at 1000.
pub(crate) fn parse_limit(q: &Query) -> Result<Option<usize>, Fault> {
    match query_get(q, "limit") {
        None => Ok(None),
        Some(raw) => match raw.trim().parse::<i64>() {
            Ok(n) if n < 0 => Err(bad("limit param must be positive")),
            Ok(n) => Ok(Some(usize::try_from(n).unwrap_or(MAX_LIMIT).min(MAX_LIMIT))),
            Err(_) => Err(bad("limit param must be an integer")),
        },
    }
}

pub(crate) fn parse_offset(q: &Query) -> Result<usize, Fault> {
    match query_get(q, "offset") {
        None => Ok(0),
        Some(raw) => match raw.trim().parse::<i64>() {
            Ok(n) if n < 0 => Err(bad("offset param must be positive")),
            Ok(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            Err(_) => Err(bad("offset param must be an integer")),
        },
    }
}

/// The `next` link Nova adds when a page is full: the request's own query with `marker`
/// replaced by the last id of the page (and moved to the end).
pub(crate) fn next_link(collection_url: &str, q: &Query, last_id: &str) -> Value {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in q.iter().filter(|(k, _)| k != "marker") {
        ser.append_pair(k, v);
    }
    ser.append_pair("marker", last_id);
    json!({"href": format!("{collection_url}?{}", ser.finish()), "rel": "next"})
}

// ---- paths --------------------------------------------------------------------------

/// Splits a request path into percent-decoded segments. `None` when a segment is not
/// valid UTF-8 after decoding (such a path matches no route).
pub(crate) fn path_segments(path: &str) -> Option<Vec<String>> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    if trimmed.is_empty() {
        return Some(Vec::new());
    }
    trimmed.split('/').map(percent_decode).collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

// ---- time ---------------------------------------------------------------------------

/// `yyyy-mm-ddTHH:MM:SSZ` (server created/updated, token expires).
pub(crate) fn fmt_z(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `yyyy-mm-ddTHH:MM:SS.ssssss` (launched_at, keypair created_at, token issued_at).
pub(crate) fn fmt_micro(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

/// `t + d`, saturating instead of overflowing on absurd durations.
pub(crate) fn add(t: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Parses `changes-since`: RFC 3339, or an ISO 8601 date-time without offset (UTC), or
/// a bare date.
pub(crate) fn parse_time(raw: &str) -> Option<DateTime<Utc>> {
    let raw = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(raw, fmt) {
            return Some(t.and_utc());
        }
    }
    chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_segments() {
        assert_eq!(
            path_segments("/v2/t/os-keypairs/my%20key").unwrap(),
            vec!["v2", "t", "os-keypairs", "my key"]
        );
        assert_eq!(path_segments("/").unwrap(), Vec::<String>::new());
        assert_eq!(path_segments("/a%2").unwrap(), vec!["a%2"]);
        assert_eq!(path_segments("/a%zz%").unwrap(), vec!["a%zz%"]);
        assert!(path_segments("/%ff").is_none());
    }

    #[test]
    fn parses_times() {
        assert!(parse_time("2020-02-25T01:22:24Z").is_some());
        assert!(parse_time("2020-02-25T01:22:24.123+09:00").is_some());
        assert!(parse_time("2020-02-25T01:22:24").is_some());
        assert!(parse_time("2020-02-25").is_some());
        assert!(parse_time("yesterday").is_none());
    }
}
