//! The one way the tests send an HTTP request and read its answer, to the
//! gateway (`Env`) or to the simulator directly (`sim::Sim`).

use reqwest::header::HeaderMap;
use serde_json::Value;

/// An answer: status, headers, and the body as JSON when it parses, as a
/// JSON string when it does not, `null` when it is empty.
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

/// Sends `req`; panics if nothing answers.
pub async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("an answer");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Answer {
        status,
        headers,
        body,
    }
}

/// `req` with each header of `headers` added (repeats included).
pub fn with_headers(
    mut req: reqwest::RequestBuilder,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req
}
