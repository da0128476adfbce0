//! Accepting connections, for both listeners, plain or TLS: the one accept
//! loop and the one drain path.
//!
//! Nobody without a token can tie the gateway up:
//! - at most `server.max_connections` connections are open at once (by
//!   default below the process's file limit); at the cap the loop stops
//!   accepting, so further clients wait in the kernel's backlog instead of
//!   the process running out of descriptors, unless connections are
//!   parked (below): then the next client is accepted and the connection
//!   parked longest closes to give it its slot;
//! - accept errors (EMFILE and the like) back off from 5 ms to 1 s instead of
//!   spinning;
//! - a TLS handshake, and an HTTP/1.1 request head, must each complete
//!   within `server.header_read_timeout`, so a client dribbling a head is
//!   cut: the first head of a connection counted from its start (after the
//!   TLS handshake) or from a parked connection's first new byte; a later
//!   one, or an HTTP/1.1 answer the client does not take, by the
//!   connection's periodic check (every park interval), at most three park
//!   intervals late, counted from the later of the previous answer and the
//!   head's first byte (hyper's own head timer, armed and dropped for
//!   every request, is off);
//! - a connection (HTTP/2 included) must start its first request within
//!   `server.header_read_timeout` (after its TLS handshake, on TLS);
//! - an HTTP/1.1 connection idle between requests is parked one to two
//!   park intervals after its answer (1 s, or a quarter of
//!   `header_read_timeout` or half of `idle_timeout` if less; at least
//!   10 ms):
//!   taken back from hyper, its buffers freed (about 1 KiB stays, against
//!   11 in hyper's hands), it waits for its next bytes and is closed
//!   `server.idle_timeout` after its answer (about 2 s more at most with the
//!   defaults: parked connections are closed a generation at a time, by
//!   one sweep per listener, every park interval or a 64th of
//!   `idle_timeout` if more);
//! - an HTTP/2 connection with no request in flight and no new one for
//!   `server.idle_timeout` (checked twice per timeout, so at most 1.5 of
//!   them) is shut down gracefully, and dropped if still open, with nothing
//!   in flight, one more `idle_timeout` later (a client that stopped
//!   reading). Requests, not bytes, are counted: HTTP/2 PINGs keep bytes
//!   moving without asking for anything;
//! - HTTP/2 connections carry at most `server.http2_max_streams` concurrent
//!   streams and bounded header lists.
//!
//! Draining ([`serve`]'s `draining`): every HTTP/1.1 answer carries
//! `Connection: close`, HTTP/2 connections get a GOAWAY; once
//! `stop_accepting` fires, the loop stops, parked connections close and
//! open connections finish their in-flight requests (a TLS handshake still
//! in progress, with no request yet, is dropped).

mod conn_io;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use axum::response::Response;
use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Request, header};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::metrics::Metrics;
use crate::shutdown::Stop;
use conn_io::{ConnIo, Held, Hold, Protocol};

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

/// What a listener serves: a connection's service, made from the peer's
/// address each time hyper is given the connection (when it opens, and
/// when it wakes from parking).
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
    let slots = Arc::new(Slots {
        semaphore: Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)),
        metrics: metrics.clone(),
    });
    let shared = Arc::new(Listener {
        make,
        shared: ListenerShared {
            tls,
            builders: HttpBuilders::new(&limits),
            draining,
            shutdown: stop_accepting.clone(),
            metrics: metrics.clone(),
            parked: ParkedSet::new(&limits),
            limits,
        },
    });
    let parked = &shared.parked;
    // The connection tasks belong to this loop: if it is dropped (the
    // shutdown grace ran out), they are aborted with it. Each is reaped as
    // it ends: a finished task keeps its whole allocation until then. The
    // sweep of parked connections is one of them, until the loop stops.
    let mut connections = tokio::task::JoinSet::new();
    let sweep = connections.spawn(sweep_parked(shared.clone()));
    let mut backoff = Duration::ZERO;
    'accept: loop {
        // A slot first, the client then; but at the cap, with connections
        // parked, the next client is accepted and a parked (idle)
        // connection gives its slot up for it, as nginx reuses idle
        // keep-alive connections (the one parked longest closes).
        let reclaiming = slots.semaphore.available_permits() == 0 && parked.any();
        let slot = if reclaiming {
            None
        } else {
            tokio::select! {
                _ = stop_accepting.stopped() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                slot = slots.semaphore.acquire() => match slot {
                    Ok(slot) => Some(slot),
                    Err(_) => break,
                },
                // At the cap, this may be a slot to reclaim: look again.
                _ = parked.newly_parked.notified() => continue,
            }
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
        // Slots may have freed while it waited to be accepted: a parked
        // connection closes only if none has.
        let slot = match slot
            .map(Ok)
            .unwrap_or_else(|| slots.semaphore.try_acquire())
        {
            Ok(slot) => slot,
            Err(tokio::sync::TryAcquireError::Closed) => break,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                parked.reclaim_one();
                loop {
                    tokio::select! {
                        _ = stop_accepting.stopped() => break 'accept,
                        slot = slots.semaphore.acquire() => match slot {
                            Ok(slot) => {
                                // Freed some other way: the ask, if still
                                // open, is withdrawn.
                                parked.take_want();
                                break slot;
                            }
                            Err(_) => break 'accept,
                        },
                        // Nobody may have been asked to close (none was
                        // parked when asked, or the one asked closed on
                        // its own): ask again, the one parked longest now
                        // (one asked already and still closing takes the
                        // want; a call too many wakes one that goes back
                        // to waiting).
                        _ = parked.newly_parked.notified() => {
                            if parked.is_wanted() {
                                parked.ask_oldest();
                            } else {
                                parked.reclaim_one();
                            }
                        }
                    }
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let conn = Connection {
            peer,
            listener: shared.clone(),
        };
        connections.spawn(conn.run(tcp, Slot::taken(&slots, slot)));
    }
    drop(listener);
    // Parked connections close; no more sweeps.
    sweep.abort();
    parked.close_all();
    // Open connections finish their in-flight requests (the caller bounds
    // the wait).
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Closes parked connections whose idle time is up, a generation per
/// sweep interval, until the listener stops accepting.
async fn sweep_parked<M>(listener: Arc<Listener<M>>) {
    // Each sweep at least `width` after the last one as it ran: a late
    // sweep (a busy runtime) makes a generation longer, never a later one
    // shorter, so no connection is closed before its idle time is up.
    loop {
        tokio::select! {
            _ = listener.shutdown.stopped() => return,
            _ = tokio::time::sleep(listener.parked.width) => {}
        }
        listener.parked.sweep();
    }
}

/// hyper's connection builders, one per protocol, configured once per
/// listener.
struct HttpBuilders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl HttpBuilders {
    fn new(limits: &ConnLimits) -> HttpBuilders {
        // Never `pipeline_flush`: with it, hyper's flush skips writing while
        // unparsed bytes are buffered, and a connection could be parked
        // with part of an answer unsent (parking relies on hyper's shutdown
        // flushing everything first).
        let mut http1 = http1::Builder::new();
        // No header-read timeout in hyper: it arms a timer for every
        // request head and drops it when the head is read (a timer-wheel
        // insert and removal, an allocation and a clock read per request).
        // The connection's periodic check cuts a head that does not come
        // instead (`serve_with_hyper`): the first request's within
        // `header_read_timeout` of the connection or its wake, a later one
        // within it of being found unfinished.
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(None::<Duration>)
            .max_buf_size(8192);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.http2_max_streams)
            .max_header_list_size(64 * 1024)
            .max_pending_accept_reset_streams(Some(64));
        HttpBuilders { http1, http2 }
    }
}

/// What every connection of a listener shares (one pointer in each
/// connection's task).
struct ListenerShared {
    tls: Tls,
    builders: HttpBuilders,
    limits: ConnLimits,
    draining: Stop,
    /// The listener stopped accepting: finish in-flight requests and close.
    shutdown: Stop,
    metrics: Option<Arc<Metrics>>,
    parked: ParkedSet,
}

/// A listener: what its connections share, and what makes their service.
struct Listener<M> {
    shared: ListenerShared,
    make: M,
}

impl<M> std::ops::Deref for Listener<M> {
    type Target = ListenerShared;
    fn deref(&self) -> &ListenerShared {
        &self.shared
    }
}

/// One accepted connection, before its protocol is known. Its service is
/// made each time hyper is given the connection (at the start, and when
/// it wakes from parking), not kept: a parked connection's task holds only
/// what it needs to wait.
struct Connection<M> {
    peer: SocketAddr,
    listener: Arc<Listener<M>>,
}

impl<M: MakeService> Connection<M> {
    /// The connection's whole life, as the one future its task runs. Not
    /// an `async fn`: a generator holding this `match` would keep room for
    /// `self`, the stream and the unboxed TLS future besides the one it
    /// awaits (4.0 KiB per connection, measured, against 1.4 KiB for the
    /// plain future alone then).
    fn run(self, tcp: TcpStream, slot: Slot) -> impl Future<Output = ()> + Send {
        match self.listener.tls.clone() {
            // The stream to close is closed after the connection's future
            // is gone: its timer and control futures would otherwise be
            // kept beside the close, in every connection's task.
            None => {
                futures_util::future::Either::Left(self.serve_http(tcp, slot).then(close_stream))
            }
            // Boxed: with the handshake and a TLS stream's connection
            // inline, every connection's task, idle keep-alive ones
            // included, was sized for TLS.
            Some(acceptor) => {
                futures_util::future::Either::Right(Box::pin(self.serve_tls(acceptor, tcp, slot)))
            }
        }
    }

    async fn serve_tls(self, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream, slot: Slot) {
        // A client that never finishes its handshake must not hold a slot;
        // one still shaking hands when the listener stops has no request in
        // flight, so the drain does not wait for it.
        let handshake = tokio::time::timeout(
            self.listener.limits.header_read_timeout,
            acceptor.accept(tcp),
        );
        let outcome = tokio::select! {
            outcome = handshake => outcome,
            _ = self.listener.shutdown.stopped() => return,
        };
        let failure = match outcome {
            Ok(Ok(tls)) => return close_stream(self.serve_http(tls, slot).await).await,
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                "error"
            }
            Err(_) => {
                tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                "timeout"
            }
        };
        if let Some(m) = &self.listener.metrics {
            m.tls_handshake_failures.with_label_values(&[failure]).inc();
        }
    }

    /// Serves one connection until it ends, or until it is judged idle or
    /// stuck. Idleness is counted in requests, not bytes: HTTP/2 control
    /// frames (PING, WINDOW_UPDATE) keep bytes moving without asking for
    /// anything.
    /// - the first request must start within `header_read_timeout` of the
    ///   connection (HTTP/1 and HTTP/2 alike, protocol detection included),
    ///   and within it (or `idle_timeout`, if less) of a parked
    ///   connection's wake;
    /// - an HTTP/1.1 connection with nothing in flight and no new request
    ///   for a park interval (below) is parked: taken back from hyper, its
    ///   buffers freed, waiting for its next bytes; `idle_timeout` after
    ///   its last answer (see [`ConnLimits::park_sweep`]), it is closed;
    /// - an HTTP/2 connection with no request in flight and no new one for
    ///   `idle_timeout` (checked twice per timeout, so between 1 and 1.5 of
    ///   them) gets a graceful shutdown (a request in flight is still
    ///   answered, GOAWAY);
    /// - a connection still open, with no request in flight, `idle_timeout`
    ///   after its graceful shutdown (a client that stopped reading its
    ///   answer) is dropped; a request in flight is bounded by
    ///   `server.request_timeout` instead.
    ///
    /// hyper's part is boxed, and freed while the connection is parked: a
    /// parked connection's task holds only its stream, its peer, one
    /// pointer to its listener, its place in the parked set and its
    /// generation's wait: 280 bytes, measured in a release build on
    /// x86_64 (1,376 before hyper's part was boxed). With tokio's task
    /// header and trailer (96 bytes, and 8 for the stage's tag), 128-byte
    /// aligned, that is a 384-byte allocation, and 8 bytes more would make
    /// it 512: the slot and the service are kept out of the task for that
    /// (in the stream's [`Hold`], and made anew at each wake), and unread
    /// bytes are boxed.
    ///
    /// Not an `async fn`: rustc keeps an `async fn`'s arguments twice, as
    /// passed and as moved into its body (rust-lang/rust#62958; 256 bytes
    /// more here, measured). For the same reason `wait_parked` borrows the
    /// stream: moved into it, the stream would be kept twice while parked.
    fn serve_http<I>(mut self, io: I, slot: Slot) -> impl Future<Output = Option<ConnIo<I>>> + Send
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut io = ConnIo::new(io, Arc::new(Hold::with_slot(slot)));
        async move {
            let mut woken = false;
            loop {
                io = match Box::pin(self.serve_with_hyper(io, woken)).await {
                    Served::Ended(io) => return io,
                    Served::Parked(io) => io,
                };
                match self.wait_parked(&mut io).await {
                    Unparked::Woke => woken = true,
                    Unparked::Close => return Some(io),
                    Unparked::Closed => return None,
                }
            }
        }
    }

    /// hyper serves the connection (from its first bytes, or from the bytes
    /// that woke it) until it ends, or until it is idle and parked.
    async fn serve_with_hyper<I>(&mut self, io: ConnIo<I>, woken: bool) -> Served<I>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let state = Arc::new(ConnState::default());
        let answered = state.clone();
        let told_to_close = self.listener.draining.clone();
        let service = TowerToHyperService::new(self.listener.make.for_peer(peer).map_response(
            move |mut resp: Response| {
                // Draining: HTTP/1.1 clients learn from the answer itself
                // that this connection ends, instead of racing its close.
                if told_to_close.is_stopped() && !answered.http2.load(Ordering::Relaxed) {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            },
        ));
        // Counted the moment hyper hands the request over (an HTTP/2 stream's
        // future runs later, in a task of its own), until its answer's body
        // is sent or the request is abandoned: a request in flight keeps its
        // connection from being judged idle (or parked).
        let counted = state.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_flight = InFlight::start(counted.clone());
            // A combinator, not an async block: hyper boxes this future
            // once per connection, and an async block holding the inner
            // future would be stored twice its size (1.6 KiB more per
            // idle connection, measured).
            hyper::service::Service::call(&service, req).map(move |answer| {
                answer.map(|resp| resp.map(|body| TrackedBody::new(body, in_flight)))
            })
        });
        let hold = io.hold().clone();
        let mut segments = Segments {
            builders: &self.listener.builders,
            service,
            state: &state,
        };
        // A woken connection speaks HTTP/1.1 (only those are parked), and
        // the bytes that woke it come first.
        let mut phase = if woken {
            Phase::serve(io, Protocol::Http1, segments.service.clone(), &segments)
        } else {
            Phase::Detecting {
                io,
                head: [0; 24],
                filled: 0,
            }
        };
        // Every park interval from the start: an idle HTTP/1.1 connection
        // is parked within two of them, and a head that does not come is
        // cut by these checks (hyper's own head timer is off).
        let check = tokio::time::sleep(self.listener.limits.park_interval());
        tokio::pin!(check);
        // Draining: an HTTP/2 connection gets its GOAWAY (polled for HTTP/2
        // only; HTTP/1.1 is told by `Connection: close` on its answers
        // instead).
        let draining = self.listener.draining.stopped();
        tokio::pin!(draining);
        let stop = self.listener.shutdown.stopped();
        tokio::pin!(stop);
        let control = Arc::new(ControlWake::default());
        let control_waker = Waker::from(control.clone());
        let mut seen = (0, 0);
        // Since when nothing has started or finished (until the first
        // request: since the connection opened or woke).
        let mut quiet_since = tokio::time::Instant::now();
        // Parking needs a request answered since the connection started,
        // woke or resumed: bytes that wake a parked connection (or that
        // hyper gives back when parked mid-head) start the head's time
        // anew, and a client dribbling a head must not restart it forever.
        let mut park_from = 1;
        let mut shut_down = false;
        // Answers the client has yet to take, and since when none of them
        // has been taken: a client that stops reading (a full socket, an
        // HTTP/2 window it never opens) would hold its answers, and so the
        // connection, forever.
        let mut answers_taken = 0;
        let mut untaken_since: Option<tokio::time::Instant> = None;
        loop {
            // After any event (a timer reset among them), every control
            // future is polled once, and then only when one of them wakes.
            control.fired.store(true, Ordering::Relaxed);
            let event = std::future::poll_fn(|cx| {
                // Borrowed mutably: a shared borrow held across the await would
                // need the service to be `Sync`.
                if let Poll::Ready(event) = phase.poll(cx, &mut segments) {
                    return Poll::Ready(ConnEvent::Phase(event));
                }
                if !control.take_fired(cx.waker()) {
                    return Poll::Pending;
                }
                let mut control_cx = Context::from_waker(&control_waker);
                // Idle HTTP/1.1 connections close now, busy ones after their
                // answer; HTTP/2 gets a GOAWAY.
                if !shut_down
                    && (stop.as_mut().poll(&mut control_cx).is_ready()
                        || (matches!(phase, Phase::Http2(_))
                            && draining.as_mut().poll(&mut control_cx).is_ready()))
                {
                    return Poll::Ready(ConnEvent::Stop);
                }
                match check.as_mut().poll(&mut control_cx) {
                    Poll::Ready(()) => Poll::Ready(ConnEvent::Check),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            let requests = state.started.load(Ordering::Relaxed);
            let shut_down_now = match event {
                ConnEvent::Phase(PhaseEvent::Ended(result)) => {
                    log_end(&peer, result);
                    return Served::Ended(None);
                }
                ConnEvent::Phase(PhaseEvent::Closed(result)) => {
                    log_end(&peer, result);
                    return Served::Ended(None);
                }
                ConnEvent::Phase(PhaseEvent::Detected) => continue,
                ConnEvent::Stop if phase.is_detecting() => return Served::Ended(None),
                ConnEvent::Stop => true,
                ConnEvent::Check => {
                    let finished = state.finished.load(Ordering::Relaxed);
                    let busy = finished != requests;
                    // Seen untaken at two checks `idle_timeout` apart, with
                    // none taken in between: closed.
                    let taken = state.answers_done.load(Ordering::Relaxed);
                    let untaken = taken != state.answers.load(Ordering::Relaxed);
                    match untaken_since {
                        _ if !untaken => untaken_since = None,
                        Some(since) if taken == answers_taken => {
                            if since.elapsed() >= self.listener.limits.idle_timeout {
                                tracing::debug!(%peer, "answers not taken within idle_timeout; closed");
                                return Served::Ended(None);
                            }
                        }
                        _ => untaken_since = Some(tokio::time::Instant::now()),
                    }
                    answers_taken = taken;
                    if shut_down {
                        if !busy {
                            tracing::debug!(%peer, "connection still open after its shutdown; dropped");
                            return Served::Ended(None);
                        }
                        check
                            .as_mut()
                            .reset(tokio::time::Instant::now() + self.listener.limits.idle_timeout);
                        continue;
                    }
                    if requests == 0 {
                        let limits = &self.listener.limits;
                        // A woken connection was idle already: no longer
                        // than `idle_timeout` either.
                        let allowed = if woken {
                            limits.header_read_timeout.min(limits.idle_timeout)
                        } else {
                            limits.header_read_timeout
                        };
                        let waited = quiet_since.elapsed();
                        if waited >= allowed {
                            tracing::debug!(%peer, "no request within header_read_timeout; closed");
                            return Served::Ended(None);
                        }
                        let next = limits.park_interval().min(allowed - waited);
                        check.as_mut().reset(tokio::time::Instant::now() + next);
                        continue;
                    }
                    // Quiet: nothing started or finished since the last
                    // check, and nothing in flight.
                    let now = (requests, finished);
                    let quiet = now == seen && !busy;
                    if !quiet {
                        seen = now;
                        quiet_since = tokio::time::Instant::now();
                    }
                    let parkable = quiet && requests >= park_from;
                    match phase.park_if_http1(parkable, &hold, &segments) {
                        Parking::Parked(io) => {
                            tracing::debug!(%peer, "idle connection parked");
                            return Served::Parked(io);
                        }
                        Parking::Resumed => {
                            tracing::debug!(
                                %peer,
                                "idle connection had part of a request head; served again at once"
                            );
                            park_from = requests + 1;
                            quiet_since = tokio::time::Instant::now();
                            check.as_mut().reset(
                                tokio::time::Instant::now() + self.listener.limits.park_interval(),
                            );
                            continue;
                        }
                        Parking::Ended(result) => {
                            log_end(&peer, result);
                            return Served::Ended(None);
                        }
                        Parking::Close(io) => {
                            tracing::debug!(%peer, "connection ended by hyper in a message; closed");
                            return Served::Ended(Some(io));
                        }
                        // hyper was not idle after all: it finishes what it
                        // is doing and closes (keep-alive is off now).
                        Parking::Busy => true,
                        // hyper's own head timer is off (a timer armed and
                        // dropped per request); this check and the first
                        // request's above do its work. Quiet that long, an
                        // HTTP/1.1 connection is cut if it holds a head
                        // found unfinished at the last try to park
                        // (`park_from` past the requests), or an answer it
                        // cannot send (a client that stopped reading: not
                        // parkable, and nothing in flight to count as
                        // untaken).
                        Parking::NotNow
                            if quiet
                                && matches!(phase, Phase::Http1(_))
                                && (park_from > requests || hold.is_write_blocked())
                                && quiet_since.elapsed()
                                    >= self.listener.limits.header_read_timeout =>
                        {
                            tracing::debug!(%peer, "no request head (or an answer not taken) within header_read_timeout; closed");
                            return Served::Ended(None);
                        }
                        Parking::NotNow
                            if quiet
                                && quiet_since.elapsed() >= self.listener.limits.idle_timeout =>
                        {
                            tracing::debug!(%peer, "idle connection closed");
                            true
                        }
                        Parking::NotNow => {
                            let next = match phase {
                                Phase::Http1(_) => self.listener.limits.park_interval(),
                                _ => (self.listener.limits.idle_timeout / 2)
                                    .max(Duration::from_millis(50)),
                            };
                            check.as_mut().reset(tokio::time::Instant::now() + next);
                            false
                        }
                    }
                }
            };
            if shut_down_now {
                phase.graceful_shutdown();
                shut_down = true;
                // A client still holding the connection, with nothing in
                // flight, `idle_timeout` from now is dropped.
                check
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.listener.limits.idle_timeout);
            }
        }
    }

    /// A parked connection waits for its next bytes (read into the stack,
    /// then handed to a new hyper connection first), and is closed when
    /// the sweep closes its generation (its idle time is up), at shutdown,
    /// or when the listener, at its cap, wants its slot (the one parked
    /// longest first).
    async fn wait_parked<I>(&mut self, io: &mut ConnIo<I>) -> Unparked
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let parked = &self.listener.parked;
        let counted = ParkedConnection::new(&self.listener);
        let wait = counted.wait();
        tokio::pin!(wait);
        let closed = loop {
            let event = std::future::poll_fn(|cx| {
                let mut first = [0u8; WAKE_READ];
                let mut buf = ReadBuf::new(&mut first);
                match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                    Poll::Ready(Err(e)) => return Poll::Ready(ParkEvent::Closed(Err(e))),
                    Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                        return Poll::Ready(ParkEvent::Closed(Ok(())));
                    }
                    Poll::Ready(Ok(())) => {
                        let read = Bytes::copy_from_slice(buf.filled());
                        return Poll::Ready(ParkEvent::Woke(read));
                    }
                    Poll::Pending => {}
                }
                let told = wait.as_mut().poll(cx).is_ready();
                // Checked once the wait above is registered: the listener
                // (or the sweep) marks, then wakes every connection waiting.
                if parked.is_closing() {
                    return Poll::Ready(ParkEvent::Stop);
                }
                if parked.is_expired(counted.generation) {
                    return Poll::Ready(ParkEvent::Idle);
                }
                if told {
                    return Poll::Ready(ParkEvent::Reclaimed);
                }
                Poll::Pending
            })
            .await;
            match event {
                // Out of the listener's reach again.
                ParkEvent::Woke(read) => {
                    io.unread(read);
                    // A call to give a slot up that came with the bytes
                    // goes to whoever is parked longest now: dropped, the
                    // wait would pass it on only within its generation,
                    // perhaps to nobody.
                    let told = wait
                        .as_mut()
                        .poll(&mut Context::from_waker(Waker::noop()))
                        .is_ready();
                    drop(counted);
                    if told && parked.is_wanted() {
                        parked.ask_oldest();
                    }
                    return Unparked::Woke;
                }
                ParkEvent::Closed(result) => {
                    log_end(&self.peer, result);
                    break Unparked::Closed;
                }
                ParkEvent::Stop => break Unparked::Close,
                ParkEvent::Idle => {
                    tracing::debug!(peer = %self.peer, "idle connection closed");
                    break Unparked::Close;
                }
                ParkEvent::Reclaimed if parked.take_want() => {
                    tracing::debug!(peer = %self.peer, "parked connection closed: the listener is at max_connections");
                    return Unparked::Close;
                }
                // Not needed after all: wait for the next call.
                ParkEvent::Reclaimed => wait.set(counted.wait()),
            }
        };
        // A parked connection closing for any other reason frees a slot
        // too: one fewer for the listener to ask for.
        parked.take_want();
        closed
    }
}

/// Logs how a connection ended, if with an error (at debug: a client's
/// reset is no news).
fn log_end<E: std::fmt::Display>(peer: &SocketAddr, result: Result<(), E>) {
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// How hyper's part of a connection ended.
enum Served<I> {
    /// The connection ended; a stream taken back from hyper is to be shut
    /// down.
    Ended(Option<ConnIo<I>>),
    /// Idle, taken back from hyper: to be parked.
    Parked(ConnIo<I>),
}

/// How a parked connection's wait ended.
enum Unparked {
    /// Its next bytes came (put back on the stream, to be read first).
    Woke,
    /// Closed by the gateway: the stream is to be shut down.
    Close,
    /// Closed by the client, or failed.
    Closed,
}

/// What woke a parked connection's task.
enum ParkEvent {
    Woke(Bytes),
    Closed(std::io::Result<()>),
    Stop,
    Idle,
    Reclaimed,
}

impl ConnLimits {
    /// The park interval: an HTTP/1.1 connection with nothing started or
    /// finished for one interval, checked every interval (so one to two of
    /// them after its answer), is parked. Short, since an idle connection
    /// in hyper's hands holds its buffers (16 KiB); within a quarter of
    /// `header_read_timeout` (a head that does not come is cut by these
    /// checks, at most three intervals late) and half of `idle_timeout`; at
    /// least 10 ms.
    fn park_interval(&self) -> Duration {
        PARK_AFTER
            .min(self.header_read_timeout / 4)
            .min(self.idle_timeout / 2)
            .max(Duration::from_millis(10))
    }

    /// The parked connections' sweep interval (the park interval, or a
    /// 64th of `idle_timeout` if more) and how many sweeps a connection
    /// stays parked. Counted from its last answer, it is closed after
    /// `idle_timeout` (it parks a park interval after that answer at the
    /// earliest, and a sweep does not close a generation before every
    /// connection in it has been parked for the rest), and at most a park
    /// interval and two sweep intervals more (2 s with the defaults, where
    /// the time parked is a whole number of sweeps), plus however late the
    /// sweeps ran on a busy runtime.
    fn park_sweep(&self) -> (Duration, u64) {
        let parked_for = self.idle_timeout.saturating_sub(self.park_interval());
        let width = self
            .park_interval()
            .max(self.idle_timeout / MAX_GENERATIONS);
        // Parked at the end of a generation's interval at the latest, a
        // connection is closed `lifetime` sweeps after that interval
        // starts: one for its own generation, the rest for its idle time.
        let sweeps = parked_for.as_nanos().div_ceil(width.as_nanos());
        (
            width,
            u64::try_from(sweeps).unwrap_or(u64::MAX).saturating_add(1),
        )
    }
}

const PARK_AFTER: Duration = Duration::from_secs(1);

/// How long closing a parked connection may take (a TLS close_notify).
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Closes a connection taken back from hyper: its stream is shut down (a
/// TLS stream sends its close_notify), briefly.
async fn close_stream<I: AsyncWrite + Unpin>(io: Option<ConnIo<I>>) {
    if let Some(mut io) = io {
        let _ = tokio::time::timeout(CLOSE_WAIT, io.shutdown()).await;
    }
}

/// What a connection's segments of hyper are made from.
struct Segments<'a, H> {
    builders: &'a HttpBuilders,
    service: H,
    state: &'a ConnState,
}

/// hyper's stream over a connection.
type HyperIo<I> = TokioIo<ConnIo<I>>;

/// Where a connection is.
enum Phase<I, H>
where
    H: HttpService<Incoming>,
{
    /// Reading the first bytes, to tell HTTP/1.x from HTTP/2.
    Detecting {
        io: ConnIo<I>,
        head: [u8; 24],
        filled: usize,
    },
    Http1(Pin<Box<http1::Connection<HyperIo<I>, H>>>),
    Http2(Pin<Box<http2::Connection<HyperIo<I>, H, TokioExecutor>>>),
    /// Between two of the above, never polled.
    Moving,
}

/// What polling a connection's phase came to.
enum PhaseEvent {
    /// The protocol is known; hyper now serves the connection.
    Detected,
    /// hyper's connection ended.
    Ended(hyper::Result<()>),
    /// The client closed (or the stream failed) before its protocol was
    /// known.
    Closed(std::io::Result<()>),
}

/// What an attempt to park came to.
enum Parking<I> {
    /// Idle, taken back from hyper whole.
    Parked(ConnIo<I>),
    /// hyper was idle but had read part of a next request: served again at
    /// once, those bytes first.
    Resumed,
    Ended(hyper::Result<()>),
    /// hyper ended the connection; its stream is to be shut down.
    Close(ConnIo<I>),
    Busy,
    /// Not an HTTP/1.1 connection with hyper, or not to be parked (not
    /// quiet, or no request since it started or woke).
    NotNow,
}

/// A parked connection's first bytes are read into this much stack.
const WAKE_READ: usize = 512;

impl<I, H> Phase<I, H>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: HttpService<Incoming, ResBody = TrackedBody, Error = Infallible> + Clone + Send + 'static,
    H::Future: Send + 'static,
{
    fn poll(&mut self, cx: &mut Context<'_>, segments: &mut Segments<'_, H>) -> Poll<PhaseEvent> {
        match self {
            Phase::Detecting { io, head, filled } => loop {
                let mut buf = ReadBuf::new(&mut head[*filled..]);
                if let Err(e) = ready!(Pin::new(&mut *io).poll_read(cx, &mut buf)) {
                    return Poll::Ready(PhaseEvent::Closed(Err(e)));
                }
                let n = buf.filled().len();
                if n == 0 {
                    return Poll::Ready(PhaseEvent::Closed(Ok(())));
                }
                *filled += n;
                let Some(protocol) = conn_io::protocol_of(&head[..*filled]) else {
                    continue;
                };
                let read = Bytes::copy_from_slice(&head[..*filled]);
                *self = match std::mem::replace(self, Phase::Moving) {
                    Phase::Detecting { mut io, .. } => {
                        io.unread(read);
                        Phase::serve(io, protocol, segments.service.clone(), segments)
                    }
                    other => other,
                };
                return Poll::Ready(PhaseEvent::Detected);
            },
            Phase::Http1(conn) => conn.as_mut().poll(cx).map(PhaseEvent::Ended),
            Phase::Http2(conn) => conn.as_mut().poll(cx).map(PhaseEvent::Ended),
            Phase::Moving => Poll::Pending,
        }
    }

    fn serve(io: ConnIo<I>, protocol: Protocol, service: H, segments: &Segments<'_, H>) -> Self {
        let io = TokioIo::new(io);
        match protocol {
            Protocol::Http1 => Phase::Http1(Box::pin(
                segments.builders.http1.serve_connection(io, service),
            )),
            Protocol::Http2 => {
                segments.state.mark_http2();
                Phase::Http2(Box::pin(
                    segments.builders.http2.serve_connection(io, service),
                ))
            }
        }
    }

    fn is_detecting(&self) -> bool {
        matches!(self, Phase::Detecting { .. })
    }

    fn graceful_shutdown(&mut self) {
        match self {
            Phase::Http1(conn) => conn.as_mut().graceful_shutdown(),
            Phase::Http2(conn) => conn.as_mut().graceful_shutdown(),
            Phase::Detecting { .. } | Phase::Moving => {}
        }
    }

    /// Takes an HTTP/1.1 connection back from hyper if hyper is idle.
    ///
    /// hyper says whether it is idle only by what a graceful shutdown does:
    /// an idle connection ends at once (asking for its stream to be shut
    /// down); a busy one first finishes its message. So the stream is held
    /// (no bytes move either way), hyper is told to shut down and polled
    /// once: if it asked for the shutdown in that poll without trying to
    /// move a byte, it was idle, and the connection is taken back whole,
    /// with whatever hyper had read and not parsed; if it asked after
    /// trying, it ended the connection inside a message, and the stream is
    /// shut down; if it did not ask, it was busy, and it finishes and
    /// closes (its keep-alive is off).
    fn park_if_http1(
        &mut self,
        parkable: bool,
        hold: &Hold,
        segments: &Segments<'_, H>,
    ) -> Parking<I> {
        let Phase::Http1(conn) = self else {
            return Parking::NotNow;
        };
        // hyper still sending an answer the client has not read is not
        // idle: tried now, it would finish that answer and close (its
        // keep-alive off), where waiting keeps the connection.
        if !parkable || hold.is_write_blocked() {
            return Parking::NotNow;
        }
        hold.start();
        conn.as_mut().graceful_shutdown();
        let polled = conn.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        let held = hold.end();
        match polled {
            Poll::Pending => Parking::Busy,
            // Taken back whole: parked (the phase is left `Moving`, hyper's
            // part ends), or served again at once if hyper had read part of
            // a next request.
            Poll::Ready(Ok(())) if held == Held::Idle => {
                match std::mem::replace(self, Phase::Moving) {
                    Phase::Http1(conn) => {
                        let parts = Pin::into_inner(conn).into_parts();
                        let mut io = parts.io.into_inner();
                        io.unread(parts.read_buf);
                        if io.has_unread() {
                            *self = Phase::serve(io, Protocol::Http1, parts.service, segments);
                            Parking::Resumed
                        } else {
                            Parking::Parked(io)
                        }
                    }
                    other => {
                        *self = other;
                        Parking::NotNow
                    }
                }
            }
            // It ended the connection in a message (a request body it
            // would not drain): the stream is shut down, never parked (the
            // rest of that body would be read as a request).
            Poll::Ready(Ok(())) if held == Held::EndedInMessage => {
                match std::mem::replace(self, Phase::Moving) {
                    Phase::Http1(conn) => {
                        Parking::Close(Pin::into_inner(conn).into_parts().io.into_inner())
                    }
                    _ => Parking::Ended(Ok(())),
                }
            }
            Poll::Ready(result) => Parking::Ended(result),
        }
    }
}

/// What woke a connection's task and needs its attention.
enum ConnEvent {
    /// The connection's phase moved on, or ended.
    Phase(PhaseEvent),
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
    /// Answers handed to hyper, and those hyper is done with (sent in
    /// full, or dropped): the difference is what the client has yet to
    /// take.
    answers: AtomicU64,
    answers_done: AtomicU64,
    /// It speaks HTTP/2 (its answers never say `Connection: close`).
    http2: AtomicBool,
}

impl ConnState {
    fn mark_http2(&self) {
        self.http2.store(true, Ordering::Relaxed);
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

/// An answer's body, counted in flight until hyper is done with it (sent
/// in full, or dropped): a connection still sending an answer is not idle.
pub struct TrackedBody {
    body: axum::body::Body,
    in_flight: InFlight,
}

impl TrackedBody {
    fn new(body: axum::body::Body, in_flight: InFlight) -> TrackedBody {
        in_flight.0.answers.fetch_add(1, Ordering::Relaxed);
        TrackedBody { body, in_flight }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.in_flight
            .0
            .answers_done
            .fetch_add(1, Ordering::Relaxed);
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A listener's parked connections: how many, the call that closes the
/// one parked longest when the accept loop needs its slot, the sweep that
/// closes those parked for their idle time, and the call that closes them
/// all at shutdown.
///
/// Connections park in generations, one per sweep interval, and a
/// generation is closed all at once when its idle time is up: one timer per
/// listener instead of one per parked connection (a timer is over 100
/// bytes in every parked connection's task, and an entry in the timer
/// wheel put in and taken out at each park).
struct ParkedSet {
    count: std::sync::atomic::AtomicUsize,
    /// Slots the accept loop waits for: a parked connection that closes,
    /// for whatever reason, takes one off, and one told to close by a
    /// reclaim closes only if one is still wanted (a notification can
    /// outlive its need: passed on by a connection that woke, or kept by
    /// `Notify` with nobody waiting).
    wanted: std::sync::atomic::AtomicUsize,
    /// A ring of generations: generation `g` is in `generations[g % len]`,
    /// and `len` is one more than `lifetime`, so the slot a generation is
    /// closed from is never the one connections park in.
    generations: Box<[Generation]>,
    /// The generation connections park in now (the sweep advances it).
    current: AtomicU64,
    /// Every generation below this one is to close.
    expired_below: AtomicU64,
    /// Sweeps a connection stays parked for: it is closed by the sweep
    /// that makes its generation this much older than the current one.
    lifetime: u64,
    /// The sweep interval.
    width: Duration,
    /// The listener stopped: parked connections close.
    closing: AtomicBool,
    /// Told each time a connection parks (the accept loop, at the cap,
    /// looks again).
    newly_parked: tokio::sync::Notify,
}

/// The connections parked within one sweep interval.
#[derive(Default)]
struct Generation {
    /// Waited on by this generation's connections, in the order they
    /// parked: told one at a time to give a slot up, all at once to close
    /// when their idle time is up or at shutdown.
    wait: tokio::sync::Notify,
    parked: std::sync::atomic::AtomicUsize,
}

/// At most this many generations (and sweeps) in a parked connection's
/// idle time: with a long `idle_timeout`, a sweep interval is a 64th of it.
const MAX_GENERATIONS: u32 = 64;

impl ParkedSet {
    fn new(limits: &ConnLimits) -> ParkedSet {
        let (width, lifetime) = limits.park_sweep();
        ParkedSet {
            count: Default::default(),
            wanted: Default::default(),
            generations: (0..=lifetime).map(|_| Generation::default()).collect(),
            current: AtomicU64::new(0),
            expired_below: AtomicU64::new(0),
            lifetime,
            width,
            closing: AtomicBool::new(false),
            newly_parked: Default::default(),
        }
    }

    fn generation(&self, g: u64) -> &Generation {
        // The ring has at most MAX_GENERATIONS + 2 slots: the index fits.
        &self.generations[(g % self.generations.len() as u64) as usize]
    }

    fn any(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    fn is_expired(&self, g: u64) -> bool {
        g < self.expired_below.load(Ordering::SeqCst)
    }

    fn is_wanted(&self) -> bool {
        self.wanted.load(Ordering::Relaxed) > 0
    }

    /// One sweep: the next generation starts, and the one whose idle time
    /// is now up is told to close (the mark first, then the wake: each
    /// connection checks the mark once its wait is registered).
    fn sweep(&self) {
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(expired) = now.checked_sub(self.lifetime) {
            self.expired_below.store(expired + 1, Ordering::SeqCst);
            self.generation(expired).wait.notify_waiters();
        }
    }

    /// Every parked connection closes (the listener stopped).
    fn close_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for generation in &self.generations {
            generation.wait.notify_waiters();
        }
    }

    /// Asks the connection parked longest, if any is parked, to close.
    fn reclaim_one(&self) {
        if self.any() {
            self.wanted.fetch_add(1, Ordering::Relaxed);
            self.ask_oldest();
        }
    }

    /// Tells the oldest generation not yet closed with a connection parked
    /// to give one up (its connection parked longest wakes first). With
    /// none parked just now, nobody is told: the accept loop asks again
    /// when the next one parks.
    fn ask_oldest(&self) {
        let now = self.current.load(Ordering::SeqCst);
        let oldest = self
            .expired_below
            .load(Ordering::SeqCst)
            .max(now.saturating_sub(self.lifetime));
        if let Some(generation) = (oldest..=now)
            .map(|g| self.generation(g))
            .find(|g| g.parked.load(Ordering::Relaxed) > 0)
        {
            generation.wait.notify_one();
        }
    }

    /// A parked connection closes, or the accept loop got a slot another
    /// way: one slot fewer wanted, if any was. Says whether one was.
    fn take_want(&self) -> bool {
        self.wanted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// One parked connection, counted (and in the gauge) however it ends or
/// wakes, with the generation it parked in.
struct ParkedConnection<'a> {
    listener: &'a ListenerShared,
    generation: u64,
}

impl<'a> ParkedConnection<'a> {
    fn new(listener: &'a ListenerShared) -> Self {
        let parked = &listener.parked;
        let generation = parked.current.load(Ordering::SeqCst);
        parked
            .generation(generation)
            .parked
            .fetch_add(1, Ordering::Relaxed);
        parked.count.fetch_add(1, Ordering::Relaxed);
        parked.newly_parked.notify_one();
        if let Some(m) = &listener.metrics {
            m.parked_connections.inc();
        }
        ParkedConnection {
            listener,
            generation,
        }
    }

    /// What ends its wait: a call to give its slot up, its generation's
    /// close, or the listener's.
    fn wait(&self) -> tokio::sync::futures::Notified<'a> {
        self.listener
            .parked
            .generation(self.generation)
            .wait
            .notified()
    }
}

impl Drop for ParkedConnection<'_> {
    fn drop(&mut self) {
        let parked = &self.listener.parked;
        parked
            .generation(self.generation)
            .parked
            .fetch_sub(1, Ordering::Relaxed);
        parked.count.fetch_sub(1, Ordering::Relaxed);
        if let Some(m) = &self.listener.metrics {
            m.parked_connections.dec();
        }
    }
}

/// A listener's connection slots (`server.max_connections`), and the
/// open-connections gauge they keep.
struct Slots {
    semaphore: Semaphore,
    metrics: Option<Arc<Metrics>>,
}

/// One connection's slot, given back (and the gauge lowered) however the
/// connection ends, once its stream is closed: it is kept in the
/// connection's [`Hold`], whose last holder is the stream.
struct Slot(Arc<Slots>);

impl Slot {
    fn taken(slots: &Arc<Slots>, permit: tokio::sync::SemaphorePermit<'_>) -> Slot {
        // Given back by `drop`, with the gauge, in one place.
        permit.forget();
        if let Some(m) = &slots.metrics {
            m.open_connections.inc();
        }
        Slot(slots.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.semaphore.add_permits(1);
        if let Some(m) = &self.0.metrics {
            m.open_connections.dec();
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
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

    fn limits(header_read_timeout: Duration, idle_timeout: Duration) -> ConnLimits {
        ConnLimits {
            max_connections: 2,
            header_read_timeout,
            idle_timeout,
            http2_max_streams: 1,
        }
    }

    #[test]
    fn the_sweep_closes_a_parked_connection_no_sooner_than_its_idle_time() {
        let secs = Duration::from_secs;
        // The defaults: a sweep a second, closed by the 60th after parking.
        assert_eq!(limits(secs(10), secs(60)).park_sweep(), (secs(1), 60));
        // A long idle time: a 64th of it per sweep, not 3,600 generations.
        let (width, lifetime) = limits(secs(10), secs(3600)).park_sweep();
        assert_eq!((width, lifetime), (secs(3600) / 64, 65));
        for (header, idle) in [
            (secs(10), secs(60)),
            (secs(1), secs(2)),
            (Duration::from_millis(40), secs(7)),
            (secs(60), Duration::from_millis(15)),
            (secs(10), secs(3600)),
            (secs(10), secs(86_400 * 30)),
        ] {
            let l = limits(header, idle);
            let (width, lifetime) = l.park_sweep();
            let parked_for = idle.saturating_sub(l.park_interval());
            // Parked at the end of its generation's interval, it still
            // waits out the rest of its idle time...
            assert!(
                width * (lifetime as u32 - 1) >= parked_for,
                "{header:?} {idle:?}"
            );
            // ...and at most two sweeps more.
            assert!(
                width * lifetime as u32 <= parked_for + 2 * width,
                "{header:?} {idle:?}"
            );
            assert!(
                lifetime <= u64::from(MAX_GENERATIONS) + 2,
                "{header:?} {idle:?}"
            );
        }
    }

    fn listener(limits: ConnLimits) -> ListenerShared {
        let (_, draining) = crate::shutdown::stop_pair();
        let (_, shutdown) = crate::shutdown::stop_pair();
        ListenerShared {
            tls: None,
            builders: HttpBuilders::new(&limits),
            parked: ParkedSet::new(&limits),
            limits,
            draining,
            shutdown,
            metrics: None,
        }
    }

    fn is_told<F: Future + Unpin>(wait: &mut F) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(wait).poll(&mut cx).is_ready()
    }

    type Wait<'a> = Pin<Box<tokio::sync::futures::Notified<'a>>>;

    /// A connection parked in the current generation, its wait registered
    /// and not told yet.
    fn park(l: &ListenerShared) -> (ParkedConnection<'_>, Wait<'_>) {
        let conn = ParkedConnection::new(l);
        let mut wait = Box::pin(conn.wait());
        assert!(!is_told(&mut wait), "told as it parked");
        (conn, wait)
    }

    #[tokio::test]
    async fn a_parked_generation_is_told_to_close_by_the_sweep_that_ends_its_idle_time() {
        let l = listener(limits(Duration::from_secs(10), Duration::from_secs(60)));
        let (first, mut first_wait) = park(&l);
        l.parked.sweep();
        let (second, mut second_wait) = park(&l);
        assert_eq!(l.parked.count.load(Ordering::Relaxed), 2);
        for _ in 1..l.parked.lifetime - 1 {
            l.parked.sweep();
        }
        assert!(!is_told(&mut first_wait), "closed a sweep early");
        assert!(!l.parked.is_expired(first.generation));
        l.parked.sweep();
        assert!(is_told(&mut first_wait));
        assert!(l.parked.is_expired(first.generation));
        assert!(!is_told(&mut second_wait), "the next generation closed too");
        assert!(!l.parked.is_expired(second.generation));
        l.parked.sweep();
        assert!(is_told(&mut second_wait));
        assert!(l.parked.is_expired(second.generation));
        drop((first, second));
        assert!(!l.parked.any());
    }

    #[tokio::test]
    async fn a_reclaim_asks_the_connection_parked_longest() {
        let l = listener(limits(Duration::from_secs(10), Duration::from_secs(60)));
        let (older, mut older_wait) = park(&l);
        let (old, mut old_wait) = park(&l);
        l.parked.sweep();
        let (_young, mut young_wait) = park(&l);
        for wait in [&mut older_wait, &mut old_wait, &mut young_wait] {
            assert!(!is_told(wait));
        }
        l.parked.reclaim_one();
        assert!(is_told(&mut older_wait));
        assert!(!is_told(&mut old_wait) && !is_told(&mut young_wait));
        assert!(l.parked.take_want());
        drop((older_wait, older));
        // The older generation is asked first while anyone is in it.
        l.parked.reclaim_one();
        assert!(is_told(&mut old_wait));
        assert!(!is_told(&mut young_wait));
        assert!(l.parked.take_want());
        drop((old_wait, old));
        l.parked.reclaim_one();
        assert!(is_told(&mut young_wait));
    }

    #[tokio::test]
    async fn a_reclaim_skips_generations_already_closed() {
        let l = listener(limits(Duration::from_secs(10), Duration::from_secs(60)));
        let (closing, closing_wait) = park(&l);
        for _ in 0..l.parked.lifetime {
            l.parked.sweep();
        }
        // Told to close, and not gone yet.
        assert!(l.parked.is_expired(closing.generation));
        let (young, mut young_wait) = park(&l);
        l.parked.reclaim_one();
        assert!(
            is_told(&mut young_wait),
            "the call went to a closed generation"
        );
        drop((closing_wait, closing, young_wait, young));
        // Nobody parked: nobody told, and nothing kept for the next one.
        assert!(l.parked.take_want());
        l.parked.ask_oldest();
        let (_next, mut next_wait) = park(&l);
        assert!(
            !is_told(&mut next_wait),
            "a call kept for nobody woke the next to park"
        );
    }

    #[tokio::test]
    async fn at_shutdown_every_generation_is_told() {
        let l = listener(limits(Duration::from_secs(10), Duration::from_secs(60)));
        let mut parked = Vec::new();
        for _ in 0..3 {
            let (conn, wait) = park(&l);
            parked.push((conn, wait));
            l.parked.sweep();
        }
        l.parked.close_all();
        assert!(l.parked.is_closing());
        for (_, wait) in &mut parked {
            assert!(is_told(wait));
        }
    }

    /// Reads one HTTP/1.1 answer with a `content-length` off `client`.
    async fn read_answer(client: &mut tokio::io::DuplexStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "the answer was cut");
            got.extend_from_slice(&buf[..n]);
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .expect("a content-length")
                .parse()
                .unwrap();
            if got.len() >= end + 4 + length {
                return got;
            }
        }
    }

    /// The stream of a TLS connection whose socket is full: writes are
    /// taken (into the TLS session's buffer), flushes wait while `held`.
    /// (Its `Pending` wakes nobody: the tests poll by hand.)
    struct BufferingStream {
        io: tokio::io::DuplexStream,
        held: Arc<AtomicBool>,
    }

    impl AsyncRead for BufferingStream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for BufferingStream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            if self.held.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    /// A client that has not read its answer for a while must not lose its
    /// connection to parking: hyper, with bytes it cannot send yet, is
    /// left alone (not told to shut down), and parked once the client has
    /// read everything.
    #[tokio::test]
    async fn a_connection_whose_answer_is_unread_is_parked_only_after_it_is_read() {
        let (client, server) = tokio::io::duplex(4096);
        unread_answer_then_parked(server, client, || {}).await;
    }

    /// The same over a stream that takes writes and blocks its flushes, as
    /// a TLS stream does when its socket is full.
    #[tokio::test]
    async fn an_answer_taken_but_not_flushed_is_parked_only_after_the_flush() {
        let (client, server) = tokio::io::duplex(1024 * 1024);
        let held = Arc::new(AtomicBool::new(true));
        let io = BufferingStream {
            io: server,
            held: held.clone(),
        };
        unread_answer_then_parked(io, client, move || held.store(false, Ordering::Relaxed)).await;
    }

    /// hyper serves one request on `io` with a 256 KiB answer that it
    /// cannot send in full until `release` (and `client` reads); parking
    /// is not tried until then, and parks the connection whole after.
    async fn unread_answer_then_parked<I>(
        io: I,
        mut client: tokio::io::DuplexStream,
        release: impl FnOnce(),
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        const ANSWER: usize = 256 * 1024;
        let hold = Arc::new(Hold::default());
        let state = Arc::new(ConnState::default());
        let builders = HttpBuilders::new(&ConnLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            http2_max_streams: 1,
        });
        let counted = state.clone();
        let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
            let body = TrackedBody::new(
                axum::body::Body::from(vec![b'x'; ANSWER]),
                InFlight::start(counted.clone()),
            );
            std::future::ready(Ok::<_, Infallible>(http::Response::new(body)))
        });
        let mut segments = Segments {
            builders: &builders,
            service: service.clone(),
            state: &state,
        };
        let io = ConnIo::new(io, hold.clone());
        let mut phase = Phase::serve(io, Protocol::Http1, service, &segments);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();

        // hyper has the whole answer (its body is done) and cannot send it.
        let blocked = async {
            loop {
                std::future::poll_fn(|cx| {
                    let _ = phase.poll(cx, &mut segments);
                    Poll::Ready(())
                })
                .await;
                if hold.is_write_blocked() && state.finished.load(Ordering::Relaxed) == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), blocked)
            .await
            .expect("hyper never blocked on the unread answer");
        assert!(matches!(
            phase.park_if_http1(true, &hold, &segments),
            Parking::NotNow
        ));

        // The client reads it all; hyper, idle again, is parked whole.
        release();
        let answer = tokio::select! {
            answer = read_answer(&mut client) => answer,
            _ = std::future::poll_fn(|cx| phase.poll(cx, &mut segments)) => {
                panic!("hyper ended the connection")
            }
        };
        assert!(answer.ends_with(&[b'x'; 64]));
        assert!(!String::from_utf8_lossy(&answer[..200]).contains("connection: close"));
        std::future::poll_fn(|cx| {
            let _ = phase.poll(cx, &mut segments);
            Poll::Ready(())
        })
        .await;
        assert!(!hold.is_write_blocked());
        assert!(matches!(
            phase.park_if_http1(true, &hold, &segments),
            Parking::Parked(_)
        ));
    }
}
