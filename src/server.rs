//! Listeners, the outer shell and routing, reload and drain, in one place:
//! a reader learns the whole gateway from `public` (the shell every request
//! passes) and [`run`].
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::FutureExt;
use http::{Request, StatusCode, header};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::config::{Config, SecretSource};
use crate::error::GatewayError;
use crate::exchange::{REQUEST_ID, Surface};
use crate::gateway::{Gateway, Snapshot, StartError};
use crate::listener::{self, ConnLimits};
use crate::shutdown::{Stop, StopHandle, stop_pair};
use crate::surface::render_error;

/// The two bound sockets `run` serves on. Tests bind `127.0.0.1:0`.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(public: SocketAddr, admin: SocketAddr) -> std::io::Result<Listeners> {
        Ok(Listeners {
            public: TcpListener::bind(public).await?,
            admin: TcpListener::bind(admin).await?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("the {0} listener stopped unexpectedly")]
    Stopped(&'static str),
}

/// Runs the gateway until `stop` fires, then shuts down gracefully:
/// `/readyz` turns unready at once (so load balancers stop sending) and every
/// answer says the connection ends (`Connection: close`, HTTP/2 GOAWAY);
/// after `server.drain_delay` the listeners stop accepting, in-flight
/// requests get until `server.shutdown_grace` to finish, and the audit log is
/// flushed before returning.
pub async fn run(config: Config, listeners: Listeners, stop: Stop) -> Result<(), RunError> {
    run_with_reload(config, listeners, stop, None).await
}

/// Where a running gateway re-reads its config from, and how often it
/// checks the file for changes (SIGHUP reloads at once).
#[derive(Clone)]
pub struct ReloadSource {
    pub path: PathBuf,
    pub secrets: SecretSource,
    pub poll: Duration,
}

/// The admin listener serves a handful of scrapers and probes.
fn admin_limits(public: &ConnLimits) -> ConnLimits {
    ConnLimits {
        max_connections: 64,
        ..public.clone()
    }
}

/// Ships the audit file to `audit.webhook`, if configured. It is stopped
/// only after the listeners have drained (`stop`), so it sends what the last
/// requests wrote before the process exits.
fn start_audit_webhook(
    gateway: &Arc<Gateway>,
    stop: Stop,
) -> Result<Option<tokio::task::JoinHandle<()>>, RunError> {
    let config = gateway.snapshot().config.clone();
    if config.audit.webhook.is_none() {
        return Ok(None);
    }
    let client = crate::upstream::UpstreamClient::new(&crate::upstream::ClientSettings::of(
        &config.upstream,
    ))
    .map_err(crate::gateway::StartError::from)?;
    Ok(gateway
        .audit
        .start_webhook(&config.audit, client, gateway.metrics.clone(), stop))
}

/// What `serve` makes at start from the files a valid config names, made
/// without serving, as problems naming their key: the JWT keys (PEM and
/// JWKS files parsed against `auth.algorithms`) and the upstream client's
/// trust (`upstream.ca_file` parsed). `check-config` reports them too, so
/// that a config it calls ok is one `serve` starts with.
pub fn startup_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) =
        crate::auth::Authenticator::with_ca(&config.auth, config.upstream.ca_file.as_deref())
    {
        let text = e.to_string();
        problems.push(if text.starts_with("auth.") {
            text
        } else {
            format!("auth.keys: {text}")
        });
    }
    let client = crate::upstream::ClientSettings::of(&config.upstream);
    if let Err(e) = crate::upstream::UpstreamClient::new(&client) {
        problems.push(format!("upstream.ca_file: {e}"));
    }
    problems
}

/// [`run`], plus config reload on SIGHUP and when the file changes.
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    stop: Stop,
    reload: Option<ReloadSource>,
) -> Result<(), RunError> {
    let drain_delay = config.server.drain_delay;
    let grace = config.server.shutdown_grace;
    let limits = ConnLimits::of(&config.server);
    let tls = config.listen.tls.clone();
    let gateway = Gateway::new(config)?;
    let draining = Arc::new(AtomicBool::new(false));
    let refreshers = Arc::new(std::sync::Mutex::new(spawn_token_refreshers(
        &gateway, &stop,
    )));
    gateway.snapshot().limiter.spawn_maintenance(stop.clone());
    tokio::spawn(gateway.clone().write_held_refusals_until(stop.clone()));
    let (webhook_handle, webhook_stop) = stop_pair();
    let shipper = start_audit_webhook(&gateway, webhook_stop)?;
    if let Some(source) = reload {
        tokio::spawn(reload_loop(
            gateway.clone(),
            source,
            stop.clone(),
            refreshers,
        ));
    }

    let acceptor = match &tls {
        Some(files) => {
            let cert = crate::tls::ReloadingCert::load(&files.cert_file, &files.key_file)?;
            tokio::spawn(cert.clone().watch(Duration::from_secs(2), stop.clone()));
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                cert.server_config()?,
            )))
        }
        None => None,
    };
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let (public_addr, admin_addr) = (addr(&listeners.public), addr(&listeners.admin));
    // Draining starts at `stop`; listeners stop accepting only after the drain delay.
    let (drain, drain_signal) = stop_pair();
    let (accepting, stop_accepting) = stop_pair();
    let mut public = tokio::spawn(listener::serve(
        listeners.public,
        acceptor,
        public_service(gateway.clone()),
        limits.clone(),
        Some(gateway.metrics.clone()),
        drain_signal,
        stop_accepting,
    ));
    // The admin listener outlives the public one, so probes see `/readyz`
    // answer 503 while the pod drains, and metrics are scraped to the end.
    let (admin_handle, admin_stop) = stop_pair();
    let (_admin_never_drains, admin_draining) = stop_pair();
    let mut admin = tokio::spawn(listener::serve(
        listeners.admin,
        None,
        {
            let admin = admin_app(AdminState {
                gateway: gateway.clone(),
                draining: draining.clone(),
            });
            move |_peer: SocketAddr| admin.clone()
        },
        admin_limits(&limits),
        None,
        admin_draining,
        admin_stop,
    ));

    // The one line that says the gateway is up, and where.
    tracing::info!(
        public = %public_addr,
        admin = %admin_addr,
        tls = tls.is_some(),
        version = env!("CARGO_PKG_VERSION"),
        commit = crate::metrics::COMMIT,
        "toastgate ready: serving (readiness at /readyz once a cloud token is held for every project)"
    );
    tokio::select! {
        _ = stop.stopped() => {}
        r = &mut public => return finished("public", r).and(Err(RunError::Stopped("public"))),
    }
    draining.store(true, Ordering::SeqCst);
    drain.stop();
    tracing::info!(
        ?drain_delay,
        ?grace,
        "draining: readiness off, finishing in-flight requests"
    );
    tokio::time::sleep(drain_delay).await;
    accepting.stop();
    let grace_ends = tokio::time::Instant::now() + grace;
    match tokio::time::timeout_at(grace_ends, &mut public).await {
        Ok(r) => finished("public", r)?,
        Err(_) => {
            tracing::warn!(
                ?grace,
                "in-flight requests did not finish within the shutdown grace; closing them"
            );
            public.abort();
        }
    }
    // Requests whose caller hung up go on in tasks of their own, an HTTP/2
    // stream's in hyper's: every request gets the same grace, wherever it
    // runs.
    if tokio::time::timeout_at(grace_ends, gateway.requests().all_finished())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "requests were still running when the shutdown grace ran out (callers that hung up, HTTP/2 streams); cut"
        );
    }
    admin_handle.stop();
    if tokio::time::timeout(Duration::from_secs(5), &mut admin)
        .await
        .is_err()
    {
        admin.abort();
    }
    // What the last refusals held back, written before the final flush.
    gateway.write_held_refusals(Duration::ZERO).await;
    if let Err(e) = gateway.audit.flush().await {
        tracing::error!(error = %e, "audit log flush failed at shutdown");
    }
    // The webhook sends what the last requests wrote; what it cannot send
    // in time stays in the file and goes out after the restart.
    webhook_handle.stop();
    if let Some(mut shipper) = shipper
        && tokio::time::timeout(Duration::from_secs(5), &mut shipper)
            .await
            .is_err()
    {
        tracing::warn!("audit webhook: records left unsent at shutdown are sent after the restart");
        shipper.abort();
    }
    // Blocking (it waits for the last export), and that export runs on
    // this runtime: off the runtime's threads.
    let traces = gateway.traces.clone();
    let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    tracing::info!("stopped");
    Ok(())
}

fn finished(
    which: &'static str,
    r: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<(), RunError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(RunError::Io(e)),
        Err(_) => Err(RunError::Stopped(which)),
    }
}

/// One refresher per project of the current config; the returned handle
/// stops them (on reload), and so does `stop` (on shutdown).
fn spawn_token_refreshers(gateway: &Arc<Gateway>, stop: &Stop) -> StopHandle {
    let (handle, generation) = stop_pair();
    let snap = gateway.snapshot();
    for project in snap.config.projects.values() {
        let broker = gateway.broker.clone();
        let project = project.clone();
        let generation = generation.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = broker.refresh_loop(project, generation) => {}
                _ = stop.stopped() => {}
            }
        });
    }
    handle
}

/// Reloads the config on SIGHUP and whenever the file's content changes.
async fn reload_loop(
    gateway: Arc<Gateway>,
    source: ReloadSource,
    stop: Stop,
    refreshers: Arc<std::sync::Mutex<StopHandle>>,
) {
    let mut hangup = hangup_signal();
    let mut applied = std::fs::read(&source.path).ok();
    // A changed file is applied only once two polls in a row read the same
    // bytes, so a file caught half-written is never loaded.
    let mut pending: Option<Vec<u8>> = None;
    loop {
        let (trigger, bytes) = tokio::select! {
            _ = stop.stopped() => return,
            _ = next_hangup(&mut hangup) => ("SIGHUP", std::fs::read(&source.path).ok()),
            _ = tokio::time::sleep(source.poll) => {
                let now = std::fs::read(&source.path).ok();
                if now == applied {
                    pending = None;
                    continue;
                }
                if now != pending {
                    pending = now;
                    continue;
                }
                ("file change", now)
            }
        };
        pending = None;
        applied = bytes.clone();
        reload_once(&gateway, &source, trigger, bytes, &stop, &refreshers);
    }
}

/// Validates the new file completely, then swaps it in atomically; an
/// invalid file leaves the running config untouched.
fn reload_once(
    gateway: &Arc<Gateway>,
    source: &ReloadSource,
    trigger: &str,
    bytes: Option<Vec<u8>>,
    stop: &Stop,
    refreshers: &std::sync::Mutex<StopHandle>,
) {
    let current = gateway.snapshot();
    let text = bytes
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            vec![format!(
                "cannot read {} as UTF-8 text",
                source.path.display()
            )]
        });
    let built = text
        .and_then(|text| {
            Config::from_yaml(&text, &source.secrets, source.path.parent()).map_err(|e| {
                e.problems()
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
            })
        })
        .and_then(|config| {
            Snapshot::rebuild(
                keep_restart_only_settings(config, &current.config),
                &current,
            )
            .map_err(|e| vec![e.to_string()])
        });
    match built {
        Ok(snapshot) => {
            snapshot.limiter.spawn_maintenance(stop.clone());
            gateway.swap(snapshot);
            if let Ok(mut handle) = refreshers.lock() {
                handle.stop();
                *handle = spawn_token_refreshers(gateway, stop);
            }
            gateway
                .metrics
                .config_reloads
                .with_label_values(&["success"])
                .inc();
            tracing::info!(trigger, path = %source.path.display(), "config reloaded");
        }
        Err(problems) => {
            gateway
                .metrics
                .config_reloads
                .with_label_values(&["failure"])
                .inc();
            for p in &problems {
                tracing::error!(trigger, problem = %p, "config reload refused; the running config stays");
            }
        }
    }
}

/// Settings the running process cannot change (sockets and their
/// connection limits, the drain timings, the upstream client and token
/// broker, the audit sink) keep their running values until the next
/// restart, so a reload never leaves a half-applied mix; a change to them is
/// logged.
fn keep_restart_only_settings(mut new: Config, running: &Config) -> Config {
    let changed = |what: &str| {
        tracing::warn!(
            section = what,
            "changed in the config: takes effect at the next restart"
        )
    };
    if new.listen != running.listen {
        changed("listen");
    }
    if new.upstream != running.upstream {
        changed("upstream");
    }
    if new.token != running.token {
        changed("token");
    }
    if new.audit.file != running.audit.file
        || new.audit.stdout != running.audit.stdout
        || new.audit.webhook != running.audit.webhook
        || new.audit.refusal_records != running.audit.refusal_records
    {
        changed("audit sinks");
    }
    if new.idempotency != running.idempotency {
        changed("idempotency");
    }
    if new.traces != running.traces {
        changed("traces");
    }
    if ConnLimits::of(&new.server) != ConnLimits::of(&running.server) {
        changed("server connection limits");
    }
    if (new.server.drain_delay, new.server.shutdown_grace)
        != (running.server.drain_delay, running.server.shutdown_grace)
    {
        changed("server drain timings");
    }
    let server = &running.server;
    new.server.max_connections = server.max_connections;
    new.server.header_read_timeout = server.header_read_timeout;
    new.server.idle_timeout = server.idle_timeout;
    new.server.http2_max_streams = server.http2_max_streams;
    new.server.drain_delay = server.drain_delay;
    new.server.shutdown_grace = server.shutdown_grace;
    new.listen = running.listen.clone();
    new.upstream = running.upstream.clone();
    new.token = running.token.clone();
    new.audit.file = running.audit.file.clone();
    new.audit.stdout = running.audit.stdout;
    new.audit.webhook = running.audit.webhook.clone();
    new.audit.refusal_records = running.audit.refusal_records.clone();
    new.idempotency = running.idempotency;
    new.traces = running.traces.clone();
    new
}

#[cfg(unix)]
fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(unix)]
async fn next_hangup(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Option<()> {
    None
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Option<()>) {
    std::future::pending().await
}

/// The public listener's service for one connection (its peer's address
/// goes into the audit records).
fn public_service(gateway: Arc<Gateway>) -> impl listener::MakeService {
    move |peer: SocketAddr| {
        let gateway = gateway.clone();
        tower::service_fn(move |req| {
            public(gateway.clone(), peer, req).map(Ok::<_, std::convert::Infallible>)
        })
    }
}

/// The outer shell every request of the public listener passes, then
/// routing, in one function (connection limits and timeouts are below it,
/// in [`listener`]). Order, and why:
/// 1. request id: always the gateway's own (whatever the caller sent),
///    set before anything logs, echoed on the answer;
/// 2. sensitive headers: the caller's credentials are marked before any
///    layer could record them;
/// 3. a trace span for whatever the request logs;
/// 4. panic catch: a bug answers 500 in the caller's surface, never a
///    dropped connection.
///
/// Everything that needs the Action runs as the phases of
/// [`Gateway::handle`], in a fixed, readable order. (Written by hand rather
/// than as a router and tower layers: measured, those cost more per request
/// than all of these steps together; see bench/README.md.)
async fn public(gateway: Arc<Gateway>, peer: SocketAddr, req: Request<Incoming>) -> Response {
    let (mut parts, body) = req.into_parts();
    let request_id = new_request_id();
    parts.headers.insert(REQUEST_ID, request_id.clone());
    mark_credentials_sensitive(&mut parts.headers);
    decode_unreserved_escapes(&mut parts.uri);
    drop_v1_url_prefix(&mut parts.uri);
    let surface = Surface::of_path(parts.uri.path());
    let span = tracing::debug_span!("request", method = %parts.method, path = %parts.uri.path());
    let req = Request::from_parts(parts, Body::new(body));
    let routed = AssertUnwindSafe(route(gateway, peer, req))
        .catch_unwind()
        .instrument(span);
    let mut resp = match routed.await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::error!("a request handler panicked");
            render_error(
                surface,
                &GatewayError::Internal("unexpected failure; see the gateway log".into()),
            )
        }
    };
    resp.headers_mut().insert(REQUEST_ID, request_id);
    resp
}

/// Marks the caller's credentials sensitive (every value of
/// `Authorization`, `X-Auth-Token` and `Cookie`): what is sensitive never
/// reaches a log or a debug print of the headers. One pass over the few
/// headers a request has, not a hashed look-up per name (three on every
/// request, nearly always of names that are absent).
fn mark_credentials_sensitive(headers: &mut http::HeaderMap) {
    // A `static`, not a `const`: a `const` array would be built and dropped
    // on every call (as in `proxy::is_hop_by_hop`).
    static CREDENTIALS: [header::HeaderName; 3] = [
        header::AUTHORIZATION,
        crate::upstream::X_AUTH_TOKEN,
        header::COOKIE,
    ];
    for (name, value) in headers.iter_mut() {
        if CREDENTIALS.contains(name) {
            value.set_sensitive(true);
        }
    }
}

/// The v1.0 spec's URLs begin with `/compute`
/// (`https://api-compute.cloud.toast.com/compute/v1.0/appkeys/...`): a
/// script whose base URL only had its host swapped for toastgate's is
/// served as if it had dropped it.
const V1_URL_PREFIX: &str = "/compute";

fn drop_v1_url_prefix(uri: &mut http::Uri) {
    let Some(rest) = uri.path().strip_prefix(V1_URL_PREFIX) else {
        return;
    };
    if rest != "/v1.0" && !rest.starts_with("/v1.0/") {
        return;
    }
    let rest = rest.to_string();
    replace_path(uri, &rest);
}

/// Percent-encoded unreserved characters (letters, digits, `-._~`) written
/// plainly, as RFC 3986 (6.2.2.2) says an equivalent URI is: the upstream
/// decodes them before it routes, so the gateway must judge the path the
/// upstream will act on. Otherwise `servers/%64etail` would be judged as
/// reading one server (`%64etail`) and run upstream as `servers/detail`,
/// another Action. Every other escape (`%20`, `%2F`, ...) is left as it is.
fn decode_unreserved_escapes(uri: &mut http::Uri) {
    let path = uri.path();
    if !path.contains('%') {
        return;
    }
    let bytes = path.as_bytes();
    let mut plain = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
        match decoded {
            Some(b) => {
                plain.push(b);
                i += 3;
            }
            None => {
                plain.push(bytes[i]);
                i += 1;
            }
        }
    }
    // Only ASCII bytes were replaced by ASCII bytes: still UTF-8.
    if plain.len() != bytes.len()
        && let Ok(plain) = String::from_utf8(plain)
    {
        replace_path(uri, &plain);
    }
}

/// `uri` with its path replaced, its query kept.
fn replace_path(uri: &mut http::Uri, path: &str) {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    // A valid path (a piece of one, or one with unreserved escapes decoded)
    // and a valid query make a valid whole: the parse cannot fail, and if
    // it did, the request would be left as it came (and not found).
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = http::uri::PathAndQuery::try_from(path_and_query).ok();
    if let Ok(replaced) = http::Uri::from_parts(parts) {
        *uri = replaced;
    }
}

/// The public routes: the version documents, the two surfaces, and a
/// not-found answer in the surface the path belongs to.
async fn route(gateway: Arc<Gateway>, peer: SocketAddr, req: Request<Body>) -> Response {
    let path = req.uri().path();
    let get = req.method() == http::Method::GET;
    match path {
        "/" if get => versions(&gateway, req, false),
        "/v2" | "/v2/" if get => versions(&gateway, req, true),
        "/" | "/v2" | "/v2/" => no_route(&req, RouteKind::BadMethod).v2_response(),
        p if p.starts_with("/v2/") => gateway.handle(Surface::V2, req, Some(peer)).await,
        p if p.starts_with("/v1.0/appkeys/") => gateway.handle(Surface::V1, req, Some(peer)).await,
        p if p == "/v1.0" || p.starts_with("/v1.0/") => {
            no_route(&req, RouteKind::NotFound).v1_response()
        }
        _ => no_route(&req, RouteKind::NotFound).v2_response(),
    }
}

/// `GET /` and `GET /v2/`: version discovery, no credential needed.
fn versions(gateway: &Gateway, req: Request<Body>, single: bool) -> Response {
    let (parts, _) = req.into_parts();
    let base = gateway.public_base(&gateway.snapshot().config, &parts, &[]);
    let doc = if single {
        crate::proxy::version_document(&base)
    } else {
        crate::proxy::versions_document(&base)
    };
    axum::Json(doc).into_response()
}

enum RouteKind {
    NotFound,
    BadMethod,
}

fn no_route(req: &Request<Body>, kind: RouteKind) -> GatewayError {
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    GatewayError::NoRoute(match kind {
        RouteKind::NotFound => crate::error::RouteError::NotFound { method, path },
        RouteKind::BadMethod => crate::error::RouteError::MethodNotAllowed {
            method,
            path,
            allowed: "GET".to_string(),
        },
    })
}

/// A UUID v4 request id from the thread-local generator: no system call per
/// request (`Uuid::new_v4` asks the kernel each time).
fn new_request_id() -> http::HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut buf);
    http::HeaderValue::from_str(text).unwrap_or_else(|_| http::HeaderValue::from_static("-"))
}

#[derive(Clone)]
struct AdminState {
    gateway: Arc<Gateway>,
    draining: Arc<AtomicBool>,
}

/// The admin listener: health and readiness (metrics join here). Nothing a
/// team can reach; bind it to a private address.
fn admin_app(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.gateway.metrics.render(),
    )
        .into_response()
}

/// Ready when the config is loaded, the gateway is not draining, and a
/// valid token is held for every project. Answered at once from what the
/// token broker knows (its refreshers obtain the tokens), never by waiting
/// for the identity service.
async fn readyz(State(state): State<AdminState>) -> Response {
    let snap = state.gateway.snapshot();
    let broker = &state.gateway.broker;
    let mut ready = !state.draining.load(Ordering::SeqCst);
    let projects: Vec<_> = snap
        .config
        .projects
        .values()
        .map(|project| broker.status(project))
        .collect();
    ready &= projects.iter().all(|p| p.state == "valid");
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "draining": state.draining.load(Ordering::SeqCst),
        "config": "loaded",
        "tokens": projects,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretSource;
    use std::path::Path;

    /// The demo config with `server` set to `server` (the demo has none).
    fn demo_with(server: serde_json::Value) -> Config {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.yaml");
        let yaml = std::fs::read_to_string(&path).unwrap();
        let mut doc: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
        doc["server"] = server;
        let yaml = serde_json::to_string(&doc).unwrap();
        Config::from_yaml(&yaml, &SecretSource::process_env(), path.parent())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_value_of_a_credential_header_is_marked_sensitive_and_nothing_else() {
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer one"),
            ("accept", "application/json"),
            ("authorization", "Bearer two"),
            ("x-auth-token", "secret-token"),
            ("cookie", "session=s"),
            ("x-openstack-request-id", "req-1"),
        ] {
            headers.append(
                header::HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            );
        }
        mark_credentials_sensitive(&mut headers);
        for (name, value) in &headers {
            let credential = matches!(name.as_str(), "authorization" | "x-auth-token" | "cookie");
            assert_eq!(value.is_sensitive(), credential, "{name}");
        }
        let shown = format!("{headers:?}");
        for secret in ["Bearer one", "Bearer two", "secret-token", "session=s"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert_eq!(headers.len(), 6, "values are marked, none dropped");
    }

    #[test]
    fn a_reload_applies_request_settings_and_keeps_connection_settings_until_restart() {
        let running = demo_with(serde_json::json!({}));
        let edited = demo_with(serde_json::json!({
            "request_timeout": "7s", "idle_timeout": "7s", "max_connections": 7,
            "http2_max_streams": 7, "header_read_timeout": "7s", "drain_delay": "7s",
            "shutdown_grace": "7s",
        }));
        let mut edited = edited;
        edited.idempotency.window = Duration::from_secs(7);
        let applied = keep_restart_only_settings(edited, &running);
        assert_eq!(
            applied.idempotency, running.idempotency,
            "the store is built once"
        );
        assert_eq!(applied.server.request_timeout, Duration::from_secs(7));
        assert_eq!(
            ConnLimits::of(&applied.server),
            ConnLimits::of(&running.server)
        );
        assert_eq!(applied.server.drain_delay, running.server.drain_delay);
        assert_eq!(applied.server.shutdown_grace, running.server.shutdown_grace);
        assert_ne!(running.server.request_timeout, Duration::from_secs(7));
        assert_ne!(running.server.idle_timeout, Duration::from_secs(7));
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_no_other() {
        let decoded = |uri: &str| {
            let mut uri: http::Uri = uri.parse().unwrap();
            decode_unreserved_escapes(&mut uri);
            uri.to_string()
        };
        assert_eq!(
            decoded("/v2/web/servers/%64etail"),
            "/v2/web/servers/detail"
        );
        assert_eq!(
            decoded("/v2/web/servers/%44ETAIL"),
            "/v2/web/servers/DETAIL"
        );
        assert_eq!(
            decoded("/v2/%77eb/os-keypairs/a%2Db%5Fc%2ed%7E?x=%64"),
            "/v2/web/os-keypairs/a-b_c.d~?x=%64",
            "the query is the query judge's to decode"
        );
        for kept in [
            "/v2/web/os-keypairs/my%20key",
            "/v2/web/servers/a%2Fb",
            "/v2/web/servers/%00",
            "/v2/web/servers/%",
            "/v2/web/servers/%6",
            "/v2/web/servers/%zz",
            "/v2/web/servers/%C3%A9",
            "/v2/web/servers/detail",
        ] {
            assert_eq!(decoded(kept), kept);
        }
        // Dot segments come out as such (and the router refuses them).
        assert_eq!(decoded("/v2/web/servers/%2e%2E"), "/v2/web/servers/..");
        // Decoded once, as the upstream decodes: `%2564` is `%64`, an id.
        assert_eq!(
            decoded("/v2/web/servers/%2564etail"),
            "/v2/web/servers/%2564etail"
        );
    }

    #[test]
    fn the_v1_spec_url_prefix_is_dropped_and_nothing_else_is() {
        let stripped = |uri: &str| {
            let mut uri: http::Uri = uri.parse().unwrap();
            drop_v1_url_prefix(&mut uri);
            uri.to_string()
        };
        assert_eq!(
            stripped("/compute/v1.0/appkeys/K/instances?id=a%20b"),
            "/v1.0/appkeys/K/instances?id=a%20b"
        );
        assert_eq!(
            stripped("/compute/v1.0/appkeys/K/flavors"),
            "/v1.0/appkeys/K/flavors"
        );
        assert_eq!(
            stripped("http://gw:8080/compute/v1.0/appkeys/K/flavors"),
            "http://gw:8080/v1.0/appkeys/K/flavors"
        );
        assert_eq!(stripped("/compute/v1.0"), "/v1.0");
        for kept in [
            "/compute",
            "/compute/",
            "/compute/v2/web/flavors",
            "/compute/v1.00/appkeys/K/flavors",
            "/computev1.0/appkeys/K/flavors",
            "/v1.0/appkeys/K/flavors",
            "/v2/web/compute/v1.0/x",
        ] {
            assert_eq!(stripped(kept), kept);
        }
    }
}
