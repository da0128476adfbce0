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
//! - The shared HTTP/2 connection expires after `pool_idle_timeout` in which
//!   no call took it or ended on it, and is let go only once closed (a
//!   refused stream does not close it).
//!
//! Unlike hyper-util's: an HTTP/2 connection is pinged (every 30 s, 10 s
//! to answer), so one a middlebox dropped silently is found out; and
//! concurrent first requests are not gathered onto one new connection:
//! each connects, the last one is shared, the others close once their
//! request ends.
//!
//! And unlike hyper-util's, the connections are counted: at most
//! `upstream.max_connections` are open at once, idle or busy, so a flood
//! of callers cannot make the gateway open a socket per caller and run out
//! of descriptors. A connection holds its slot until its socket closes (the
//! slot lives in the connection's I/O task). A call that finds every slot
//! taken and no idle connection queues: for a freed slot (in turn), for a
//! connection put back or for an HTTP/2 connection to share (whichever
//! comes first; a call arriving just then may take a put-back connection
//! before it), at most `upstream.queue_timeout`; then it fails with
//! [`UpstreamError::Busy`], never having been sent.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
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

/// How many connections a pool may have open, how long a call waits for
/// one when all are busy, and where the pool reports both.
#[derive(Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub queue_timeout: Duration,
    /// Connections open now (`toastgate_upstream_connections`).
    pub open: prometheus::IntGauge,
    /// Calls that found every connection busy and queued
    /// (`toastgate_upstream_connection_waits_total`).
    pub waits: prometheus::IntCounter,
}

impl Limits {
    /// Limits reported to metrics registered nowhere (tests).
    pub fn unregistered(max_connections: usize, queue_timeout: Duration) -> Self {
        Limits {
            max_connections,
            queue_timeout,
            open: prometheus::IntGauge::new("open", "open").expect("a valid name"),
            waits: prometheus::IntCounter::new("waits", "waits").expect("a valid name"),
        }
    }
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
    /// One permit per connection that may be open; each open connection's
    /// I/O task holds one.
    slots: Arc<Semaphore>,
    limits: Limits,
    /// Calls queued for a connection: a connection put back wakes one.
    queued: AtomicUsize,
    put_back: Notify,
}

/// An open connection's share of `upstream.max_connections`, given back
/// when its I/O task ends (its socket closed).
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: prometheus::IntGauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, open: &prometheus::IntGauge) -> Slot {
        open.inc();
        Slot {
            _permit: permit,
            open: open.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// What a queued call got.
enum Turn {
    Idle(Sender),
    Slot(OwnedSemaphorePermit),
}

/// Counts a call among the queued while it waits.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Queued(count)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Idle {
    /// Idle HTTP/1.1 connections and when each was put back; the last is
    /// the most recently used.
    h1: Vec<(http1::SendRequest<Body>, Instant)>,
    /// The HTTP/2 connection every request shares, once there is one.
    h2: Option<SharedH2>,
    /// The id the next HTTP/2 connection gets.
    next_h2_id: u64,
}

/// The shared HTTP/2 connection.
struct SharedH2 {
    tx: http2::SendRequest<Body>,
    /// When a call last took it or ended on it: it expires like an idle
    /// HTTP/1.1 connection.
    last_used: Instant,
    /// Which connection this is, for the calls that took it: one that
    /// fails or ends must not be mistaken for a newer one in its place.
    id: u64,
}

/// A connection for one request.
enum Sender {
    H1(http1::SendRequest<Body>),
    /// A clone of an HTTP/2 connection's handle, and the connection's id.
    H2(http2::SendRequest<Body>, u64),
}

/// The connection an answer came on, once its head is in.
enum Used {
    /// To be put back once the body is read.
    H1(http1::SendRequest<Body>),
    /// The HTTP/2 connection's id.
    H2(u64),
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
    pub fn new(
        connector: Connector,
        origin: Uri,
        max_idle: usize,
        idle_timeout: Duration,
        limits: Limits,
    ) -> Self {
        let inner = Arc::new(Inner {
            connector,
            host: host_header(&origin),
            origin,
            max_idle,
            idle_timeout,
            idle: Mutex::new(Idle::default()),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            queued: AtomicUsize::new(0),
            put_back: Notify::new(),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(close_expired(Arc::downgrade(&inner)));
        }
        OriginPool { inner }
    }

    /// Sends `req` (an absolute URI of this origin) and
    /// reads the whole answer, the body up to `max_body` bytes. The caller
    /// bounds the time: dropping this future closes the connection.
    ///
    /// `started` is the caller's reading of the clock as the call began,
    /// taken as "now" by the first look for an idle connection; the answer
    /// comes with the instant its body was read whole (when the connection
    /// went back to the pool). A clock read costs tens of nanoseconds on a
    /// virtual machine, and a call would otherwise read it five times.
    pub async fn send_buffered(
        &self,
        req: Request<Body>,
        max_body: usize,
        started: Instant,
    ) -> Result<(Response<Bytes>, Instant), UpstreamError> {
        let (resp, used) = self.send(req, started).await?;
        let (parts, body) = resp.into_parts();
        let bytes = read_body(body, max_body).await?;
        let ended = Instant::now();
        match used {
            // Only now, with the answer read whole, can the connection
            // carry another request.
            Used::H1(tx) => self.inner.put_back(tx, ended),
            Used::H2(id) => self.inner.h2_call_ended(id, ended),
        }
        Ok((Response::from_parts(parts, bytes), ended))
    }

    /// The answer's head, and the connection it came on. `req` carries no
    /// `Host`: it is added here, for HTTP/1.1 only.
    async fn send(
        &self,
        mut req: Request<Body>,
        started: Instant,
    ) -> Result<(Response<Incoming>, Used), UpstreamError> {
        let absolute = req.uri().clone();
        // Set when a shared HTTP/2 connection handed the request back but
        // does not say it closed: the next turn connects anew rather than
        // take that connection again.
        let mut only_new = false;
        // Counted in the waits once, however many turns this call takes.
        let mut queued_before = false;
        // The first turn looks at once; a later one after a wait.
        let mut first_turn = Some(started);
        loop {
            let now = first_turn.take().unwrap_or_else(Instant::now);
            let pooled = if only_new {
                None
            } else {
                self.inner.checkout(now)
            };
            let turn = match pooled {
                Some(sender) => Turn::Idle(sender),
                None => match self.inner.slots.clone().try_acquire_owned() {
                    Ok(permit) => Turn::Slot(permit),
                    // Boxed, as rarely taken as connecting.
                    Err(_) => {
                        if !std::mem::replace(&mut queued_before, true) {
                            self.inner.limits.waits.inc();
                        }
                        Box::pin(self.inner.queue(only_new)).await?
                    }
                },
            };
            let (sender, reused) = match turn {
                Turn::Idle(sender) => (sender, true),
                // Boxed: connecting (TLS, either handshake) is a future
                // of kilobytes, and every request's future would carry
                // (and move) that room.
                Turn::Slot(permit) => (Box::pin(self.inner.connect(permit)).await?, false),
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
                            Ok(resp) => return Ok((resp, Used::H1(tx))),
                            Err(e) => Unsent::from(e),
                        },
                    }
                }
                Sender::H2(mut tx, id) => {
                    *req.uri_mut() = absolute.clone();
                    req.headers_mut().remove(header::HOST);
                    let result = match tx.ready().await {
                        Err(e) => Unsent::Request(Box::new(req), e),
                        Ok(()) => match tx.try_send_request(req).await {
                            Ok(resp) => return Ok((resp, Used::H2(id))),
                            Err(e) => Unsent::from(e),
                        },
                    };
                    only_new = !self.inner.after_h2_unsent(id);
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
    /// Waits for a free slot (in turn) or, unless `only_new`, a connection
    /// put back or shared, at most `queue_timeout`.
    async fn queue(&self, only_new: bool) -> Result<Turn, UpstreamError> {
        let _queued = Queued::enter(&self.queued);
        let waited = Instant::now();
        // Made once: the call keeps its place in the semaphore's queue
        // however many times a put-back connection wakes it for nothing.
        let slot = self.slots.clone().acquire_owned();
        let expired = tokio::time::sleep(self.limits.queue_timeout);
        tokio::pin!(slot, expired);
        loop {
            let put_back = self.put_back.notified();
            tokio::pin!(put_back);
            if !only_new {
                // Enabled before looking, so a connection put back (or an
                // HTTP/2 one shared) between the look and the wait still
                // wakes this call.
                put_back.as_mut().enable();
                if let Some(sender) = self.checkout(Instant::now()) {
                    return Ok(Turn::Idle(sender));
                }
            }
            tokio::select! {
                biased;
                permit = &mut slot => {
                    // The semaphore is never closed.
                    let permit = permit.map_err(|_| self.busy(waited))?;
                    // A connection that came meanwhile (an HTTP/2 one
                    // another call opened) is better than one more.
                    if !only_new && let Some(sender) = self.checkout(Instant::now()) {
                        return Ok(Turn::Idle(sender));
                    }
                    return Ok(Turn::Slot(permit));
                }
                () = &mut put_back, if !only_new => {}
                () = &mut expired => return Err(self.busy(waited)),
            }
        }
    }

    fn busy(&self, waited: Instant) -> UpstreamError {
        UpstreamError::Busy {
            max_connections: self.limits.max_connections,
            waited: waited.elapsed(),
        }
    }

    /// The shared HTTP/2 connection, else the most recently used idle
    /// HTTP/1.1 connection that is neither closed nor expired at `now`.
    fn checkout(&self, now: Instant) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(shared) = &mut idle.h2 {
            if self.usable(shared.tx.is_closed(), shared.last_used, now) {
                shared.last_used = now;
                return Some(Sender::H2(shared.tx.clone(), shared.id));
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

    /// An HTTP/1.1 connection whose answer was read whole at `now`.
    fn put_back(&self, tx: http1::SendRequest<Body>, now: Instant) {
        if tx.is_closed() {
            return;
        }
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.h1.len() >= self.max_idle {
                // Dropped, closing: its slot goes to a queued call.
                return;
            }
            idle.h1.push((tx, now));
        }
        if self.queued.load(Ordering::SeqCst) > 0 {
            self.put_back.notify_one();
        }
    }

    /// A call on HTTP/2 connection `id` ended at `now`: its idle time
    /// counts from then, if it is still the shared one.
    fn h2_call_ended(&self, id: u64, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(shared) = idle.h2.as_mut().filter(|shared| shared.id == id) {
            shared.last_used = now;
        }
    }

    /// HTTP/2 connection `id` handed a request back unsent: if it is the
    /// shared one and closed, it is let go (the next turn opens another; a
    /// refused stream alone does not close it). Whether the next turn may
    /// take the shared connection: not when that is still `id`, open (it
    /// would hand the request back again). Another connection in its place
    /// is judged by the checkout like any.
    fn after_h2_unsent(&self, id: u64) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        match &idle.h2 {
            Some(shared) if shared.id == id => {
                if shared.tx.is_closed() {
                    idle.h2 = None;
                    true
                } else {
                    false
                }
            }
            _ => true,
        }
    }

    /// A new connection, HTTP/2 if TLS negotiated it (then shared from now
    /// on), else HTTP/1.1; its I/O runs in a task of its own, which holds
    /// the connection's slot (from `permit`) until the socket closes.
    async fn connect(&self, permit: OwnedSemaphorePermit) -> Result<Sender, UpstreamError> {
        let slot = Slot::new(permit, &self.limits.open);
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
            tokio::spawn(run_connection(conn, slot));
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let id = idle.next_h2_id;
            idle.next_h2_id += 1;
            // With no idle connections allowed, none is shared either.
            if self.max_idle > 0 {
                idle.h2 = Some(SharedH2 {
                    tx: tx.clone(),
                    last_used: Instant::now(),
                    id,
                });
                drop(idle);
                // Every queued call can go on this one connection.
                self.put_back.notify_waiters();
            }
            Ok(Sender::H2(tx, id))
        } else {
            let (tx, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| unreachable(&e))?;
            tokio::spawn(run_connection(conn, slot));
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
            .is_some_and(|shared| !self.usable(shared.tx.is_closed(), shared.last_used, now))
        {
            idle.h2 = None;
        }
    }
}

async fn run_connection<F>(conn: F, slot: Slot)
where
    F: std::future::Future<Output = hyper::Result<()>>,
{
    if let Err(e) = conn.await {
        tracing::debug!(error = %error_chain(&e), "upstream connection ended");
    }
    drop(slot);
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
        pool_with_idle_timeout(origin, Duration::from_secs(90))
    }

    fn pool_with_idle_timeout(origin: &Uri, idle_timeout: Duration) -> OriginPool {
        let client = super::super::UpstreamClient::new(&super::super::ClientSettings {
            ca_file: None,
            connect_timeout: Duration::from_secs(3),
            pool_idle_timeout: idle_timeout,
            pool_max_idle_per_host: 8,
        })
        .unwrap();
        client.origin_pool(
            origin.clone(),
            Limits::unregistered(64, Duration::from_secs(5)),
        )
    }

    /// An HTTP/2 connection to a server of its own (in memory), which
    /// answers `h2`, after `slow` for a path ending in `/slow`; and how many
    /// requests that server answered.
    async fn h2_connection(slow: Duration) -> (http2::SendRequest<Body>, Arc<AtomicUsize>) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let answered = Arc::new(AtomicUsize::new(0));
        let count = answered.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            count.fetch_add(1, Ordering::SeqCst);
            let delay = if req.uri().path().ends_with("/slow") {
                slow
            } else {
                Duration::ZERO
            };
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, std::convert::Infallible>(Response::new(Body::from("h2")))
            }
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(theirs), service),
        );
        let (tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(ours))
            .await
            .unwrap();
        tokio::spawn(conn);
        (tx, answered)
    }

    /// Makes `tx` the pool's shared HTTP/2 connection; its id.
    fn share(pool: &OriginPool, tx: http2::SendRequest<Body>) -> u64 {
        let mut idle = pool.inner.idle.lock().unwrap();
        let id = idle.next_h2_id;
        idle.next_h2_id += 1;
        idle.h2 = Some(SharedH2 {
            tx,
            last_used: Instant::now(),
            id,
        });
        id
    }

    fn shared_id(pool: &OriginPool) -> Option<u64> {
        pool.inner.idle.lock().unwrap().h2.as_ref().map(|s| s.id)
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

    /// Idle time counts from when the last call ended, not from when it
    /// began: a connection whose 2 s call ended 1.5 s ago is still shared
    /// with a 3 s idle timeout (counted from the call's start, it would
    /// have expired, and the next call would have connected anew).
    #[tokio::test]
    async fn a_shared_http2_connection_idles_from_when_its_last_call_ended() {
        let (origin, answered_by_origin) = origin().await;
        let pool = pool_with_idle_timeout(&origin, Duration::from_secs(3));
        let (tx, answered_on_h2) = h2_connection(Duration::from_secs(2)).await;
        share(&pool, tx);
        let slow = || {
            let mut req = request(&origin);
            *req.uri_mut() = format!("{origin}v2/t/slow").parse().unwrap();
            req
        };
        let resp = pool
            .send_buffered(slow(), 1024, Instant::now())
            .await
            .unwrap()
            .0;
        assert_eq!(resp.body(), "h2");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let resp = pool
            .send_buffered(request(&origin), 1024, Instant::now())
            .await
            .unwrap()
            .0;
        assert_eq!(resp.body(), "h2", "the shared connection, not a new one");
        assert_eq!(answered_on_h2.load(Ordering::SeqCst), 2);
        assert_eq!(answered_by_origin.load(Ordering::SeqCst), 0);
    }

    /// A request handed back unsent by an HTTP/2 connection: the pool lets
    /// that connection go if it closed, takes the shared one next unless
    /// that is the same connection still open, and never lets go of a
    /// newer connection in its place.
    #[tokio::test]
    async fn an_unsent_http2_request_lets_go_of_its_own_connection_only() {
        let (origin, _) = origin().await;
        let pool = pool_for(&origin);

        // Still open: kept, and the next turn connects anew.
        let (older, _) = h2_connection(Duration::ZERO).await;
        let older = share(&pool, older);
        let (open, _) = h2_connection(Duration::ZERO).await;
        let id = share(&pool, open);
        assert!(!pool.inner.after_h2_unsent(id));
        assert_eq!(shared_id(&pool), Some(id));

        // An older connection's failure: the newer one stays and is taken.
        assert!(pool.inner.after_h2_unsent(older));
        assert_eq!(shared_id(&pool), Some(id));

        // Closed: let go, and the next turn connects anew.
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(
                TokioIo::new(theirs),
                hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Body::from("h2")))
                }),
            ),
        );
        let (closing, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(ours))
            .await
            .unwrap();
        tokio::spawn(conn);
        let id = share(&pool, closing.clone());
        server.abort();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !closing.is_closed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the connection closed");
        assert!(pool.inner.after_h2_unsent(id));
        assert_eq!(shared_id(&pool), None);
    }

    #[tokio::test]
    async fn a_request_not_yet_written_on_a_dead_connection_goes_on_a_new_one() {
        let (origin, answered) = origin().await;
        let pool = pool_for(&origin);
        dead_idle_connection(&pool, Duration::from_millis(50)).await;
        let resp = pool
            .send_buffered(request(&origin), 1024, Instant::now())
            .await
            .unwrap()
            .0;
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
            .send_buffered(request(&origin), 1024, Instant::now())
            .await
            .unwrap_err();
        assert!(matches!(e, UpstreamError::Unreachable(_)), "{e}");
        assert_eq!(answered.load(Ordering::SeqCst), 0, "not sent again");
    }
}
