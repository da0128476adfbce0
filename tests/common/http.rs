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

/// Reads one HTTP/1.1 answer off a raw connection (`Content-Length`
/// framing, which every gateway answer has): its status and body. Panics
/// if the connection closes first or nothing comes within 30 s.
pub async fn read_http1_answer<R>(conn: &mut R) -> (u16, Vec<u8>)
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let read = async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let n = conn.read_until(b'\n', &mut head).await.unwrap();
            assert!(
                n > 0,
                "the connection closed mid-answer: {}",
                String::from_utf8_lossy(&head)
            );
        }
        let head = String::from_utf8(head).expect("an ASCII head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head}"));
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no Content-Length in {head}"));
        let mut body = vec![0; length];
        conn.read_exact(&mut body).await.unwrap();
        (status, body)
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .expect("an answer within 30 s")
}

/// Sends `request` (raw HTTP/1.1) on `conn` and reads its answer, which
/// must be a 200: the body.
pub async fn served<S>(conn: &mut tokio::io::BufReader<S>, request: &str) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    conn.get_mut().write_all(request.as_bytes()).await.unwrap();
    let (status, body) = read_http1_answer(conn).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    body
}
