//! The compute API's connections. Every compute call goes to one origin
//! (`upstream.compute_url`), so this pool has no key to look up: it is a
//! locked stack of idle HTTP/1.1 connections and, when TLS negotiates
//! HTTP/2, one shared HTTP/2 connection.
//!
//! Why not hyper-util's pool, which the identity, JWKS, OTLP and webhook
//! calls still use: per request it hashes its `(scheme, authority)` key with
//! SipHash one byte at a time, three times (3.3k of 72k instructions for a
//! 15-byte host in `bench/callgrind.sh`, three times that for the provider's
//! 47-byte host names), and its checkout and return cost about 4k more.
//!
//! What it keeps of hyper-util's behaviour:
//! - `Host` on HTTP/1.1 only, made once (the port only when it is not the
//!   scheme's default); on HTTP/2, `:authority` alone, since some servers
//!   refuse a `host` next to it.
//! - HTTP/1.1 connections carry one request at a time and are reused most
//!   recently used first (the least likely to have been closed by the
//!   upstream meanwhile), at most `upstream.pool_max_idle_per_host` idle
//!   ones, each for at most `upstream.pool_idle_timeout`.
//! - A request that was never written, because the reused connection had
//!   closed, is sent again on a new connection. A request that was written
//!   is never sent again: it may have been performed.
//! - A connection whose exchange did not finish (a timeout, a body too
//!   large, an error) is closed, never reused.
//! - The shared HTTP/2 connection expires after `pool_idle_timeout` without
//!   a request, and is let go only once closed (a refused stream does not
//!   close it).
//!
//! Unlike hyper-util's: an HTTP/2 connection is pinged (every 30 s, 10 s
//! to answer), so one a middlebox dropped silently is found out; and
//! concurrent first requests are not gathered onto one new connection:
//! each connects, the last one is shared, the others close once their
//! request ends.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::ServiceExt as _;

use super::{Connector, UpstreamError, error_chain, read_body};

type Body = Full<Bytes>;

/// An HTTP/2 connection is pinged this often, and closed when a ping goes
/// unanswered this long.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections to one origin.
pub struct OriginPool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    /// `scheme://authority/`, what the connector dials.
    origin: Uri,
    /// `Host` of every HTTP/1.1 request.
    host: HeaderValue,
    max_idle: usize,
    idle_timeout: Duration,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    /// Idle HTTP/1.1 connections and when each was put back; the last is
    /// the most recently used.
    h1: Vec<(http1::SendRequest<Body>, Instant)>,
    /// The HTTP/2 connection every request shares, once there is one, and
    /// when a request last took it (it expires like an idle HTTP/1.1
    /// connection).
    h2: Option<(http2::SendRequest<Body>, Instant)>,
}

/// A connection for one request.
enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl std::fmt::Debug for OriginPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginPool")
            .field("origin", &self.inner.origin)
            .finish_non_exhaustive()
    }
}

impl OriginPool {
    /// A pool for `origin` (`scheme://authority/`). Within a tokio runtime,
    /// a task closes connections left idle past `idle_timeout` (it ends with
    /// the pool).
    pub fn new(connector: Connector, origin: Uri, max_idle: usize, idle_timeout: Duration) -> Self {
        let inner = Arc::new(Inner {
            connector,
            host: host_header(&origin),
            origin,
            max_idle,
            idle_timeout,
            idle: Mutex::new(Idle::default()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(close_expired(Arc::downgrade(&inner)));
        }
        OriginPool { inner }
    }

    /// Sends `req` (an absolute URI of this origin) and
    /// reads the whole answer, the body up to `max_body` bytes. The caller
    /// bounds the time: dropping this future closes the connection.
    pub async fn send_buffered(
        &self,
        req: Request<Body>,
        max_body: usize,
    ) -> Result<Response<Bytes>, UpstreamError> {
        let (resp, h1) = self.send(req).await?;
        let (parts, body) = resp.into_parts();
        let bytes = read_body(body, max_body).await?;
        // Only now, with the answer read whole, can the connection carry
        // another request.
        if let Some(sender) = h1 {
            self.inner.put_back(sender);
        }
        Ok(Response::from_parts(parts, bytes))
    }

    /// The answer's head, and the HTTP/1.1 connection it came on (to be put
    /// back once its body is read). `req` carries no `Host`: it is added
    /// here, for HTTP/1.1 only.
    async fn send(
        &self,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Option<http1::SendRequest<Body>>), UpstreamError> {
        let absolute = req.uri().clone();
        // Set when a shared HTTP/2 connection handed the request back but
        // does not say it closed: the next turn connects anew rather than
        // take that connection again.
        let mut only_new = false;
        loop {
            let pooled = if only_new {
                None
            } else {
                self.inner.checkout()
            };
            let (sender, reused) = match pooled {
                Some(sender) => (sender, true),
                // Boxed: connecting (TLS, either handshake) is a future
                // of kilobytes, and every request's future would carry
                // (and move) that room.
                None => (Box::pin(self.inner.connect()).await?, false),
            };
            let unsent = match sender {
                Sender::H1(mut tx) => {
                    // On HTTP/1.1 the request line carries the path only.
                    *req.uri_mut() = origin_form(&absolute);
                    req.headers_mut()
                        .insert(header::HOST, self.inner.host.clone());
                    match tx.ready().await {
                        Err(e) => Unsent::Request(Box::new(req), e),
                        Ok(()) => match tx.try_send_request(req).await {
                            Ok(resp) => return Ok((resp, Some(tx))),
                            Err(e) => Unsent::from(e),
                        },
                    }
                }
                Sender::H2(mut tx) => {
                    *req.uri_mut() = absolute.clone();
                    req.headers_mut().remove(header::HOST);
                    let result = match tx.ready().await {
                        Err(e) => Unsent::Request(Box::new(req), e),
                        Ok(()) => match tx.try_send_request(req).await {
                            Ok(resp) => return Ok((resp, None)),
                            Err(e) => Unsent::from(e),
                        },
                    };
                    // A closed shared connection is let go: the next
                    // request opens another. (A failed stream alone does
                    // not close it.)
                    if !self.inner.forget_h2_if_closed() {
                        only_new = true;
                    }
                    result
                }
            };
            match unsent {
                // A reused connection closed before the request went out:
                // again on the next one (each turn takes one idle
                // connection, so this ends with a new connection at worst).
                Unsent::Request(back, _) if reused => req = *back,
                Unsent::Request(_, e) | Unsent::Sent(e) => {
                    return Err(UpstreamError::Unreachable(error_chain(&e)));
                }
            }
        }
    }
}

/// A request that did not get an answer: not written (and handed back), or
/// written.
enum Unsent {
    Request(Box<Request<Body>>, hyper::Error),
    Sent(hyper::Error),
}

impl From<hyper::client::conn::TrySendError<Request<Body>>> for Unsent {
    fn from(mut e: hyper::client::conn::TrySendError<Request<Body>>) -> Self {
        match e.take_message() {
            Some(back) => Unsent::Request(Box::new(back), e.into_error()),
            None => Unsent::Sent(e.into_error()),
        }
    }
}

impl Inner {
    /// The shared HTTP/2 connection, else the most recently used idle
    /// HTTP/1.1 connection that is neither closed nor expired.
    fn checkout(&self) -> Option<Sender> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((h2, last_used)) = &mut idle.h2 {
            if self.usable(h2.is_closed(), *last_used, now) {
                *last_used = now;
                return Some(Sender::H2(h2.clone()));
            }
            // Requests in flight on it keep it open until they end.
            idle.h2 = None;
        }
        while let Some((tx, since)) = idle.h1.pop() {
            if self.usable(tx.is_closed(), since, now) {
                return Some(Sender::H1(tx));
            }
        }
        None
    }

    fn put_back(&self, tx: http1::SendRequest<Body>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.h1.len() < self.max_idle {
            idle.h1.push((tx, Instant::now()));
        }
    }

    /// Whether the shared HTTP/2 connection is closed (then let go), or
    /// there is none any more.
    fn forget_h2_if_closed(&self) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        match &idle.h2 {
            Some((h2, _)) if !h2.is_closed() => false,
            _ => {
                idle.h2 = None;
                true
            }
        }
    }

    /// A new connection, HTTP/2 if TLS negotiated it (then shared from now
    /// on), else HTTP/1.1; its I/O runs in a task of its own.
    async fn connect(&self) -> Result<Sender, UpstreamError> {
        let unreachable =
            |e: &(dyn std::error::Error + 'static)| UpstreamError::Unreachable(error_chain(e));
        let io = self
            .connector
            .clone()
            .oneshot(self.origin.clone())
            .await
            .map_err(|e| unreachable(&*e))?;
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // A connection a middlebox dropped without a word would
                // otherwise fail every call on it until TCP gives up.
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .keep_alive_while_idle(true)
                .handshake(io)
                .await
                .map_err(|e| unreachable(&e))?;
            tokio::spawn(run_connection(conn));
            // With no idle connections allowed, none is shared either.
            if self.max_idle > 0 {
                self.idle.lock().unwrap_or_else(PoisonError::into_inner).h2 =
                    Some((tx.clone(), Instant::now()));
            }
            Ok(Sender::H2(tx))
        } else {
            let (tx, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| unreachable(&e))?;
            tokio::spawn(run_connection(conn));
            Ok(Sender::H1(tx))
        }
    }

    /// Whether a connection idle (or, for HTTP/2, last taken) `since` may
    /// still be handed out: open, and not idle for `idle_timeout`.
    fn usable(&self, closed: bool, since: Instant, now: Instant) -> bool {
        !closed && now.duration_since(since) < self.idle_timeout
    }

    fn close_expired(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.h1
            .retain(|(tx, since)| self.usable(tx.is_closed(), *since, now));
        if idle
            .h2
            .as_ref()
            .is_some_and(|(tx, since)| !self.usable(tx.is_closed(), *since, now))
        {
            idle.h2 = None;
        }
    }
}

async fn run_connection<F>(conn: F)
where
    F: std::future::Future<Output = hyper::Result<()>>,
{
    if let Err(e) = conn.await {
        tracing::debug!(error = %error_chain(&e), "upstream connection ended");
    }
}

/// Every `idle_timeout` (at least every second), drops the connections
/// idle for longer, until the pool is gone.
async fn close_expired(pool: Weak<Inner>) {
    let Some(period) = pool
        .upgrade()
        .map(|p| p.idle_timeout.max(Duration::from_secs(1)))
    else {
        return;
    };
    loop {
        tokio::time::sleep(period).await;
        match pool.upgrade() {
            Some(inner) => inner.close_expired(),
            None => return,
        }
    }
}

/// `Host` for `origin` as hyper-util's client writes it: the port only when
/// it is not the scheme's default.
fn host_header(origin: &Uri) -> HeaderValue {
    let default_port = if origin.scheme() == Some(&http::uri::Scheme::HTTPS) {
        443
    } else {
        80
    };
    let host = match (origin.host(), origin.port_u16()) {
        (Some(host), Some(port)) if port != default_port => format!("{host}:{port}"),
        (Some(host), _) => host.to_string(),
        (None, _) => String::new(),
    };
    HeaderValue::from_str(&host).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `/path?query` of an absolute URI, as an HTTP/1.1 request line carries it.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(path.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        None => Uri::default(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[test]
    fn the_request_line_carries_path_and_query_only() {
        let uri: Uri = "https://compute.example:8774/v2/t/servers/detail?limit=1"
            .parse()
            .unwrap();
        assert_eq!(origin_form(&uri), "/v2/t/servers/detail?limit=1");
        assert_eq!(
            origin_form(&"https://compute.example".parse().unwrap()),
            "/"
        );
    }

    #[test]
    fn host_is_written_as_the_client_would() {
        for (origin, host) in [
            ("https://compute.example/", "compute.example"),
            ("https://compute.example:443/", "compute.example"),
            ("https://compute.example:8443/", "compute.example:8443"),
            ("http://127.0.0.1:8774/", "127.0.0.1:8774"),
            ("http://127.0.0.1:80/", "127.0.0.1"),
            ("http://[::1]:80/", "[::1]"),
            ("https://[::1]:8443/", "[::1]:8443"),
        ] {
            assert_eq!(host_header(&origin.parse().unwrap()), host, "{origin}");
        }
    }

    /// A server answering every request `ok`, and how many it answered.
    async fn origin() -> (Uri, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let answered = Arc::new(AtomicUsize::new(0));
        let count = answered.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let count = count.clone();
                let service = hyper::service::service_fn(move |_req| {
                    count.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<_, std::convert::Infallible>(Response::new(Body::from("ok"))) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        (uri, answered)
    }

    fn pool_for(origin: &Uri) -> OriginPool {
        let client = super::super::UpstreamClient::new(&super::super::ClientSettings {
            ca_file: None,
            connect_timeout: Duration::from_secs(3),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 8,
        })
        .unwrap();
        client.origin_pool(origin.clone())
    }

    fn request(origin: &Uri) -> Request<Body> {
        let mut req = Request::new(Body::from(""));
        *req.uri_mut() = format!("{origin}v2/t/flavors").parse().unwrap();
        req
    }

    fn idle(pool: &OriginPool, tx: http1::SendRequest<Body>) {
        pool.inner
            .idle
            .lock()
            .unwrap()
            .h1
            .push((tx, Instant::now()));
    }

    /// An idle connection in `pool` whose peer has already gone, which
    /// the pool cannot know yet: its I/O task starts only after `delay`.
    async fn dead_idle_connection(pool: &OriginPool, delay: Duration) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        drop(theirs);
        let (tx, conn) = http1::handshake(TokioIo::new(ours)).await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = conn.await;
        });
        idle(pool, tx);
    }

    #[tokio::test]
    async fn a_request_not_yet_written_on_a_dead_connection_goes_on_a_new_one() {
        let (origin, answered) = origin().await;
        let pool = pool_for(&origin);
        dead_idle_connection(&pool, Duration::from_millis(50)).await;
        let resp = pool.send_buffered(request(&origin), 1024).await.unwrap();
        assert_eq!(resp.body(), "ok");
        assert_eq!(answered.load(Ordering::SeqCst), 1);
        // The new connection was put back, the dead one was not.
        assert_eq!(pool.inner.idle.lock().unwrap().h1.len(), 1);
    }

    #[tokio::test]
    async fn a_request_written_to_a_connection_that_then_fails_is_not_sent_again() {
        let (origin, answered) = origin().await;
        let pool = pool_for(&origin);
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let (tx, conn) = http1::handshake(TokioIo::new(ours)).await.unwrap();
        tokio::spawn(conn);
        // The peer reads the request, then goes without answering.
        tokio::spawn(async move {
            let mut buf = vec![0; 4096];
            let _ = theirs.read(&mut buf).await;
        });
        idle(&pool, tx);
        let e = pool
            .send_buffered(request(&origin), 1024)
            .await
            .unwrap_err();
        assert!(matches!(e, UpstreamError::Unreachable(_)), "{e}");
        assert_eq!(answered.load(Ordering::SeqCst), 0, "not sent again");
    }
}
