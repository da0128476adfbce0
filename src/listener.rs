//! Accepting connections, for both listeners, plain or TLS: the one accept
//! loop and the one drain path.
//!
//! Nobody without a token can tie the gateway up:
//! - at most `server.max_connections` connections are open at once (by
//!   default below the process's file limit); at the cap the loop stops
//!   accepting, so further clients wait in the kernel's backlog instead of
//!   the process running out of descriptors;
//! - accept errors (EMFILE and the like) back off from 5 ms to 1 s instead of
//!   spinning;
//! - a TLS handshake, and an HTTP/1.1 request head, must each complete
//!   within `server.header_read_timeout`; hyper counts that time from when
//!   it starts waiting for a request, so it also closes an HTTP/1.1
//!   connection left idle between requests;
//! - a connection (HTTP/2 included) must start its first request within
//!   `server.header_read_timeout` (after its TLS handshake, on TLS); one
//!   with no request in flight and no new one for `server.idle_timeout`
//!   (checked twice per timeout, so at most 1.5 of them) is shut down
//!   gracefully, and dropped if still open, with nothing in flight, one
//!   more `idle_timeout` later (a client that stopped reading). Requests,
//!   not bytes, are counted: HTTP/2 PINGs keep bytes moving without asking
//!   for anything;
//! - HTTP/2 connections carry at most `server.http2_max_streams` concurrent
//!   streams and bounded header lists.
//!
//! Draining ([`serve`]'s `draining`): every HTTP/1.1 answer carries
//! `Connection: close`, HTTP/2 connections get a GOAWAY; once
//! `stop_accepting` fires, the loop stops and open connections finish their
//! in-flight requests (a TLS handshake still in progress, with no request
//! yet, is dropped).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use std::convert::Infallible;

use axum::response::Response;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::metrics::Metrics;
use crate::shutdown::Stop;

/// The limits of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub http2_max_streams: u32,
}

impl ConnLimits {
    pub fn of(server: &crate::config::Server) -> ConnLimits {
        ConnLimits {
            max_connections: server.max_connections,
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            http2_max_streams: server.http2_max_streams,
        }
    }
}

/// The default connection cap: below the process's soft file limit (kept
/// for upstream connections, the audit log, config reads), at most 10,000.
pub fn default_max_connections() -> usize {
    open_files_soft_limit().map_or(1_024, cap_below)
}

/// A connection cap that leaves an eighth of `file_limit`, plus 64, for
/// everything else the process opens.
fn cap_below(file_limit: usize) -> usize {
    file_limit
        .saturating_sub(file_limit / 8 + 64)
        .clamp(16, 10_000)
}

/// The soft `RLIMIT_NOFILE`, read from `/proc/self/limits` (no unsafe code
/// needed); `None` where that file does not exist.
pub fn open_files_soft_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files_limit(&text)
}

fn parse_open_files_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        "unlimited" => Some(usize::MAX),
        n => n.parse().ok(),
    }
}

/// TLS for a listener: the acceptor (certificate reloads happen behind it).
pub type Tls = Option<tokio_rustls::TlsAcceptor>;

/// What a listener serves: a service per connection, made from the peer's
/// address.
pub trait MakeService: Send + Sync + 'static {
    type Service: tower::Service<Request<Incoming>, Response = Response, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static;
    fn for_peer(&self, peer: SocketAddr) -> Self::Service;
}

impl<F, S> MakeService for F
where
    F: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: tower::Service<Request<Incoming>, Response = Response, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
{
    type Service = S;
    fn for_peer(&self, peer: SocketAddr) -> S {
        self(peer)
    }
}

/// Serves `make` on `listener` until `stop_accepting`, then waits for the
/// open connections to finish their in-flight requests (the caller bounds
/// that wait). `metrics`, when given, counts open connections.
pub async fn serve<M: MakeService>(
    listener: TcpListener,
    tls: Tls,
    make: M,
    limits: ConnLimits,
    metrics: Option<Arc<Metrics>>,
    draining: Stop,
    stop_accepting: Stop,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let builder = Arc::new(http_builder(&limits));
    // The connection tasks belong to this loop: if it is dropped (the
    // shutdown grace ran out), they are aborted with it. Each is reaped as
    // it ends: a finished task keeps its whole allocation until then.
    let mut connections = tokio::task::JoinSet::new();
    let mut backoff = Duration::ZERO;
    loop {
        let slot = tokio::select! {
            _ = stop_accepting.stopped() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop_accepting.stopped() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = Duration::ZERO;
                    a
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS...: the next accept would fail
                    // the same way right now; wait instead of spinning.
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    if let Some(m) = &metrics {
                        m.accept_errors.inc();
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let conn = Connection {
            peer,
            tls: tls.clone(),
            service: make.for_peer(peer),
            builder: builder.clone(),
            limits: limits.clone(),
            draining: draining.clone(),
            shutdown: stop_accepting.clone(),
            metrics: metrics.clone(),
        };
        let metrics = metrics.clone();
        connections.spawn(async move {
            let _slot = slot;
            let _open = metrics.as_ref().map(|m| OpenConnection::new(m.clone()));
            conn.run(tcp).await;
        });
    }
    drop(listener);
    // Open connections finish their in-flight requests (the caller bounds
    // the wait).
    while connections.join_next().await.is_some() {}
    Ok(())
}

fn http_builder(limits: &ConnLimits) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(8192);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_streams)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(Some(64));
    builder
}

/// One accepted connection, before its protocol is known.
struct Connection<S> {
    peer: SocketAddr,
    tls: Tls,
    service: S,
    builder: Arc<Builder<TokioExecutor>>,
    limits: ConnLimits,
    draining: Stop,
    /// The listener stopped accepting: finish in-flight requests and close.
    shutdown: Stop,
    metrics: Option<Arc<Metrics>>,
}

impl<S> Connection<S>
where
    S: tower::Service<Request<Incoming>, Response = Response, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
{
    async fn run(self, tcp: TcpStream) {
        match self.tls.clone() {
            None => self.serve_http(tcp).await,
            // Boxed: with the handshake and a TLS stream's connection
            // inline, every connection's task, idle keep-alive ones
            // included, was sized for TLS (6.4 KiB against a plain
            // connection's 2.5 KiB).
            Some(acceptor) => Box::pin(self.serve_tls(acceptor, tcp)).await,
        }
    }

    async fn serve_tls(self, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream) {
        // A client that never finishes its handshake must not hold a slot;
        // one still shaking hands when the listener stops has no request in
        // flight, so the drain does not wait for it.
        let handshake = tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(tcp));
        let outcome = tokio::select! {
            outcome = handshake => outcome,
            _ = self.shutdown.stopped() => return,
        };
        let failure = match outcome {
            Ok(Ok(tls)) => return self.serve_http(tls).await,
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                "error"
            }
            Err(_) => {
                tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                "timeout"
            }
        };
        if let Some(m) = &self.metrics {
            m.tls_handshake_failures.with_label_values(&[failure]).inc();
        }
    }

    /// Serves one connection until it ends, or until it is judged idle or
    /// stuck. Idleness is counted in requests, not bytes: HTTP/2 control
    /// frames (PING, WINDOW_UPDATE) keep bytes moving without asking for
    /// anything.
    /// - the first request must start within `header_read_timeout` of the
    ///   connection (HTTP/1 and HTTP/2 alike, protocol detection included);
    /// - no request in flight and no new one for `idle_timeout` (checked
    ///   twice per timeout, so between 1 and 1.5 of them): a graceful shutdown (a request in
    ///   flight is still answered; HTTP/2 gets a GOAWAY);
    /// - a connection still open, with no request in flight, `idle_timeout`
    ///   after its graceful shutdown (a client that stopped reading its
    ///   answer) is dropped; a request in flight is bounded by
    ///   `server.request_timeout` instead.
    async fn serve_http<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let state = Arc::new(ConnState::default());
        let answered = state.clone();
        let draining = self.draining.clone();
        let service = TowerToHyperService::new(self.service.clone().map_response(
            move |mut resp: Response| {
                // Draining: HTTP/1.1 clients learn from the answer itself
                // that this connection ends, instead of racing its close.
                if draining.is_stopped() && !answered.http2.load(Ordering::Relaxed) {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            },
        ));
        // Counted the moment hyper hands the request over (an HTTP/2 stream's
        // future runs later, in a task of its own), until answered or
        // abandoned: a request in flight keeps its connection from being
        // judged idle.
        let counted = state.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            counted.saw_request(req.version());
            let in_flight = InFlight::start(counted.clone());
            // A combinator, not an async block: hyper boxes this future
            // once per connection, and an async block holding the inner
            // future would be stored twice its size (1.6 KiB more per
            // idle connection, measured).
            hyper::service::Service::call(&service, req).map(move |answer| {
                drop(in_flight);
                answer
            })
        });
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let idle = self.limits.idle_timeout;
        let check = tokio::time::sleep(self.limits.header_read_timeout);
        tokio::pin!(check);
        // Draining: an HTTP/2 connection gets its GOAWAY as soon as both are
        // true, whichever comes first (HTTP/1.1 is told by `Connection:
        // close` on its answers instead).
        let draining_http2 = async {
            self.draining.stopped().await;
            state.until_http2().await;
        };
        tokio::pin!(draining_http2);
        let stop = self.shutdown.stopped();
        tokio::pin!(stop);
        let control = Arc::new(ControlWake::default());
        let control_waker = Waker::from(control.clone());
        let mut seen = (0, 0);
        let mut quiet_checks = 0;
        let mut first_check = true;
        let mut shut_down = false;
        loop {
            // After any event (a timer reset among them), every control
            // future is polled once, and then only when one of them wakes.
            control.fired.store(true, Ordering::Relaxed);
            let event = std::future::poll_fn(|cx| {
                if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                    return Poll::Ready(ConnEvent::Ended(result));
                }
                if !control.take_fired(cx.waker()) {
                    return Poll::Pending;
                }
                let mut control_cx = Context::from_waker(&control_waker);
                // Idle HTTP/1.1 connections close now, busy ones after their
                // answer; HTTP/2 gets a GOAWAY.
                if !shut_down
                    && (stop.as_mut().poll(&mut control_cx).is_ready()
                        || draining_http2.as_mut().poll(&mut control_cx).is_ready())
                {
                    return Poll::Ready(ConnEvent::Stop);
                }
                match check.as_mut().poll(&mut control_cx) {
                    Poll::Ready(()) => Poll::Ready(ConnEvent::Check),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            let shut_down_now = match event {
                ConnEvent::Ended(result) => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                ConnEvent::Stop => true,
                ConnEvent::Check => {
                    let requests = state.started.load(Ordering::Relaxed);
                    let finished = state.finished.load(Ordering::Relaxed);
                    let busy = finished != requests;
                    if shut_down {
                        if !busy {
                            tracing::debug!(%peer, "connection still open after its shutdown; dropped");
                            return;
                        }
                        check.as_mut().reset(tokio::time::Instant::now() + idle);
                        continue;
                    }
                    if first_check && requests == 0 {
                        tracing::debug!(%peer, "no request within header_read_timeout; closed");
                        return;
                    }
                    first_check = false;
                    // Quiet: nothing started or finished since the last
                    // check, and nothing in flight.
                    let now = (requests, finished);
                    quiet_checks = if now == seen && !busy {
                        quiet_checks + 1
                    } else {
                        0
                    };
                    seen = now;
                    if quiet_checks >= 2 {
                        tracing::debug!(%peer, "idle connection closed");
                        true
                    } else {
                        let next = (idle / 2).max(Duration::from_millis(50));
                        check.as_mut().reset(tokio::time::Instant::now() + next);
                        false
                    }
                }
            };
            if shut_down_now {
                conn.as_mut().graceful_shutdown();
                shut_down = true;
                // A client still holding the connection, with nothing in
                // flight, `idle_timeout` from now is dropped.
                check.as_mut().reset(tokio::time::Instant::now() + idle);
            }
        }
    }
}

/// What woke a connection's task and needs its attention.
enum ConnEvent<E> {
    /// The connection ended (its output).
    Ended(Result<(), E>),
    /// Shutdown, or draining an HTTP/2 connection: shut it down gracefully.
    Stop,
    /// The idle check's timer fired.
    Check,
}

/// The waker a connection's control futures (shutdown, drain, idle check)
/// are polled with. It wakes the connection's task and notes that it did, so
/// that the task polls them only then: a request wakes the task several
/// times (the request's bytes, the upstream's answer), and each poll of a
/// watch and a timer costs more than the flag.
#[derive(Default)]
struct ControlWake {
    fired: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl ControlWake {
    /// Registers the task to wake, then says whether a control future woke
    /// it since the last call (in that order, so a wake between the two is
    /// not lost: it sets the flag and wakes the task registered).
    fn take_fired(&self, task: &Waker) -> bool {
        self.task.register(task);
        self.fired.swap(false, Ordering::AcqRel)
    }
}

impl std::task::Wake for ControlWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// What the service of one connection has seen.
#[derive(Default)]
struct ConnState {
    /// Requests started on the connection.
    started: AtomicU64,
    /// Requests answered or abandoned.
    finished: AtomicU64,
    /// It speaks HTTP/2.
    http2: AtomicBool,
    /// Told when `http2` turns true.
    http2_seen: tokio::sync::Notify,
}

impl ConnState {
    fn saw_request(&self, version: Version) {
        if version == Version::HTTP_2 && !self.http2.swap(true, Ordering::Relaxed) {
            // A permit is kept if nobody waits yet.
            self.http2_seen.notify_one();
        }
    }

    /// Resolves once the connection is known to speak HTTP/2.
    async fn until_http2(&self) {
        if !self.http2.load(Ordering::Relaxed) {
            self.http2_seen.notified().await;
        }
    }
}

/// One request in flight on a connection, however its future ends.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(state: Arc<ConnState>) -> Self {
        state.started.fetch_add(1, Ordering::Relaxed);
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// Keeps the open-connections gauge right however the connection ends.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.open_connections.inc();
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 1048576              files     \n";
        assert_eq!(parse_open_files_limit(text), Some(1024));
        assert_eq!(
            parse_open_files_limit("Max open files  unlimited  unlimited  files"),
            Some(usize::MAX)
        );
        assert_eq!(parse_open_files_limit("nothing here"), None);
    }

    #[test]
    fn the_default_cap_stays_below_the_file_limit() {
        assert_eq!(cap_below(1024), 832);
        assert_eq!(cap_below(256), 160);
        assert_eq!(cap_below(1_048_576), 10_000);
        assert_eq!(cap_below(usize::MAX), 10_000);
        assert!(default_max_connections() >= 16);
        if let Some(limit) = open_files_soft_limit() {
            assert!(default_max_connections() < limit);
        }
    }
}
