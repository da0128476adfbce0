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
//! - a TLS handshake, and an HTTP/1.1 request head, must complete within
//!   `server.header_read_timeout`; hyper counts that time from when it starts
//!   waiting for a request, so it also closes an HTTP/1.1 connection left
//!   idle between requests;
//! - a connection with no bytes in either direction for
//!   `server.idle_timeout` (checked twice per timeout, so at most 1.5 of
//!   them) is shut down gracefully (HTTP/2 included; a request in flight
//!   still gets its answer);
//! - HTTP/2 connections carry at most `server.http2_max_streams` concurrent
//!   streams and bounded header lists.
//!
//! Draining ([`serve`]'s `draining`): every HTTP/1.1 answer carries
//! `Connection: close`, HTTP/2 connections get a GOAWAY; once
//! `stop_accepting` fires, the loop stops and open connections finish their
//! in-flight requests.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use std::convert::Infallible;

use axum::response::Response;
use http::{HeaderValue, Request, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS) as u32;
    let slots = Arc::new(Semaphore::new(max as usize));
    let builder = Arc::new(http_builder(&limits));
    let mut backoff = Duration::ZERO;
    loop {
        let slot = tokio::select! {
            _ = stop_accepting.stopped() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop_accepting.stopped() => break,
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
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _open = metrics.as_ref().map(|m| OpenConnection::new(m.clone()));
            conn.run(tcp).await;
        });
    }
    drop(listener);
    // Every connection holds a slot until it ends: all slots back means all
    // connections have finished their in-flight requests.
    let _all = slots.acquire_many(max).await;
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
}

impl<S> Connection<S>
where
    S: tower::Service<Request<Incoming>, Response = Response, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
{
    async fn run(self, tcp: TcpStream) {
        let activity = Arc::new(Activity::new());
        let io = Tracked {
            inner: tcp,
            activity: activity.clone(),
        };
        match self.tls.clone() {
            None => self.serve_http(io, activity).await,
            Some(acceptor) => {
                // A client that never finishes its handshake must not hold a slot.
                let handshake = acceptor.accept(io);
                match tokio::time::timeout(self.limits.header_read_timeout, handshake).await {
                    Ok(Ok(tls)) => self.serve_http(tls, activity).await,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(peer = %self.peer, "TLS handshake timed out"),
                }
            }
        }
    }

    async fn serve_http<I>(self, io: I, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let http2 = Arc::new(AtomicBool::new(false));
        let seen_h2 = http2.clone();
        let draining = self.draining.clone();
        let service = self
            .service
            .clone()
            .map_request(move |req: Request<Incoming>| {
                if req.version() == Version::HTTP_2 {
                    seen_h2.store(true, Ordering::Relaxed);
                }
                req
            })
            .map_response(move |mut resp: Response| {
                // Draining: HTTP/1.1 clients learn from the answer itself
                // that this connection ends, instead of racing its close.
                if draining.is_stopped() {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            });
        let conn = self
            .builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        tokio::pin!(conn);
        // Checked twice per idle_timeout: a connection is closed once two
        // checks in a row saw no bytes move, i.e. after between 1 and 1.5
        // idle_timeouts of silence (no clock read per read or write).
        let check_every = (self.limits.idle_timeout / 2).max(Duration::from_millis(50));
        let mut quiet_checks = 0;
        let mut shut_down = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = self.shutdown.stopped(), if !shut_down => {
                    // Idle HTTP/1.1 connections close now, busy ones after
                    // their answer; HTTP/2 gets a GOAWAY.
                    conn.as_mut().graceful_shutdown();
                    shut_down = true;
                }
                _ = self.draining.stopped(), if !shut_down && http2.load(Ordering::Relaxed) => {
                    // HTTP/2: GOAWAY; streams in flight finish.
                    conn.as_mut().graceful_shutdown();
                    shut_down = true;
                }
                _ = tokio::time::sleep(check_every), if !shut_down => {
                    if activity.take() {
                        quiet_checks = 0;
                    } else {
                        quiet_checks += 1;
                    }
                    if quiet_checks >= 2 {
                        tracing::debug!(%peer, "idle connection closed");
                        conn.as_mut().graceful_shutdown();
                        shut_down = true;
                    }
                }
            }
        }
    }
}

/// Whether bytes moved on a connection since the idle check last looked.
struct Activity(AtomicBool);

impl Activity {
    fn new() -> Self {
        Activity(AtomicBool::new(true))
    }

    fn touch(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether bytes moved since the last call.
    fn take(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

/// A socket that notes when bytes move, for the idle timeout.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
