//! A stateful, in-process fake of the TOAST (NHN Cloud) identity and Compute v2 APIs,
//! used by `toastgate demo` and by every integration test of the gateway.
//!
//! One listener serves:
//! - `GET /`: the identity version list of the spec;
//! - `POST /v2.0/tokens`: Keystone v2.0 password authentication;
//! - `POST|GET /v1.0/appkeys/{appkey}/tokens`: the v1.0 token API (HTTP 200 envelope);
//! - `/v2/{tenantId}/...`: every endpoint of the Compute v2 spec, with `X-Auth-Token`.
//!
//! Layout:
//! - `catalog`: the fixed flavors, images, networks, ports, zones and seeded volumes;
//! - `state`: the world, and the lazy state machine of servers;
//! - `identity`: both token APIs and the version list;
//! - `compute`: token check and routing of `/v2/{tenantId}`, flavors, zones, key pairs,
//!   images;
//! - `servers`: list/show/create/update/delete of servers;
//! - `actions`: `POST servers/{id}/action`;
//! - `attachments`: volume attachments;
//! - `keys`: key pair fingerprints and generation;
//! - `reply`: error bodies and the helpers every handler shares.
//!
//! Test hooks on [`SimHandle`]: identity outage, latency, error injection, token
//! revocation, and a record of every request received.

mod actions;
mod attachments;
mod catalog;
mod compute;
mod identity;
mod keys;
mod reply;
mod servers;
mod state;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

pub use catalog::{
    AVAILABILITY_ZONES, BATCH_VOLUMES, FLAVOR_C2_C2M2, FLAVOR_M2_C1M2, FLAVOR_M2_C2M4,
    FLAVOR_R2_C2M4, FLAVOR_T2_C1M1, FLAVOR_U2_C1M1, FLAVOR_U2_C2M4, FLAVOR_X1_C32M128,
    FLAVOR_X1_C32M256, IMAGE_CENTOS_7_8, IMAGE_UBUNTU_20_04, IMAGE_WINDOWS_2012_R2, NETWORK_VPC1,
    NETWORK_VPC2, PORT_VPC1_A, PORT_VPC1_B, SECURITY_GROUPS, SUBNET_VPC1, SUBNET_VPC2, WEB_VOLUMES,
    seeded_volume_ids,
};

use reply::{Fault, keystone_error};
use state::{World, lock};

// ---- demo accounts ------------------------------------------------------------------

pub const DEMO_WEB_TENANT_ID: &str = "6cdebe3eb0094910bc41f1d42ebe4cb7";
pub const DEMO_WEB_TENANT_NAME: &str = "web";
pub const DEMO_WEB_USER_ID: &str = "b6ab578c20c94306ac1f41ffc4415b29";
pub const DEMO_WEB_USERNAME: &str = "web-admin@example.com";
pub const DEMO_WEB_API_PASSWORD: &str = "demo-web-api-password";
pub const DEMO_WEB_APPKEY: &str = "WebAppKey0001";
pub const DEMO_WEB_ACCESS_KEY_ID: &str = "demo-web-access-key";
pub const DEMO_WEB_SECRET_ACCESS_KEY: &str = "demo-web-secret-key";

pub const DEMO_BATCH_TENANT_ID: &str = "9a1f3c5e7b2d4f6a8c0e1b3d5f7a9c2e";
pub const DEMO_BATCH_TENANT_NAME: &str = "batch";
pub const DEMO_BATCH_USER_ID: &str = "3f0a6c1e9b2d4e7f8a5c0d1e2f3a4b5c";
pub const DEMO_BATCH_USERNAME: &str = "batch-admin@example.com";
pub const DEMO_BATCH_API_PASSWORD: &str = "demo-batch-api-password";
pub const DEMO_BATCH_APPKEY: &str = "BatchAppKey002";
pub const DEMO_BATCH_ACCESS_KEY_ID: &str = "demo-batch-access-key";
pub const DEMO_BATCH_SECRET_ACCESS_KEY: &str = "demo-batch-secret-key";

/// Largest request body accepted (413 beyond).
pub const BODY_LIMIT: usize = 1024 * 1024;
/// Most requests kept by [`SimHandle::requests`] (oldest dropped first), so a long demo
/// does not grow without bound.
pub const RECORDED_REQUESTS_KEPT: usize = 10_000;
/// Most request-body bytes kept by [`SimHandle::requests`] (oldest requests dropped
/// first).
pub const RECORDED_BODY_BYTES_KEPT: usize = 64 * 1024 * 1024;

/// One cloud account = one tenant.
#[derive(Clone, Debug)]
pub struct SimAccount {
    /// 32 hex chars.
    pub tenant_id: String,
    pub tenant_name: String,
    /// 32 hex chars.
    pub user_id: String,
    /// Keystone v2.0 login (TOAST ID / email).
    pub username: String,
    /// The separate API password used by Keystone v2.0.
    pub api_password: String,
    /// The v1.0 appkey of this tenant's project.
    pub appkey: String,
    /// v1.0 token API: User Access Key ID.
    pub access_key_id: String,
    /// v1.0 token API: Secret Access Key.
    pub secret_access_key: String,
}

impl SimAccount {
    /// The `web` demo account (the spec's tenant).
    pub fn demo_web() -> SimAccount {
        SimAccount {
            tenant_id: DEMO_WEB_TENANT_ID.into(),
            tenant_name: DEMO_WEB_TENANT_NAME.into(),
            user_id: DEMO_WEB_USER_ID.into(),
            username: DEMO_WEB_USERNAME.into(),
            api_password: DEMO_WEB_API_PASSWORD.into(),
            appkey: DEMO_WEB_APPKEY.into(),
            access_key_id: DEMO_WEB_ACCESS_KEY_ID.into(),
            secret_access_key: DEMO_WEB_SECRET_ACCESS_KEY.into(),
        }
    }

    /// The `batch` demo account.
    pub fn demo_batch() -> SimAccount {
        SimAccount {
            tenant_id: DEMO_BATCH_TENANT_ID.into(),
            tenant_name: DEMO_BATCH_TENANT_NAME.into(),
            user_id: DEMO_BATCH_USER_ID.into(),
            username: DEMO_BATCH_USERNAME.into(),
            api_password: DEMO_BATCH_API_PASSWORD.into(),
            appkey: DEMO_BATCH_APPKEY.into(),
            access_key_id: DEMO_BATCH_ACCESS_KEY_ID.into(),
            secret_access_key: DEMO_BATCH_SECRET_ACCESS_KEY.into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub accounts: Vec<SimAccount>,
    /// Lifetime of issued tokens; default 1 h.
    pub token_lifetime: Duration,
    /// BUILD -> ACTIVE; default 3 s.
    pub build_delay: Duration,
    /// Every other transition (stop, start, reboot, resize, createImage, delete);
    /// default 1 s.
    pub action_delay: Duration,
    /// Base of every `links[].href` and catalog URL; default `http://{bound addr}`.
    pub public_url: Option<String>,
    /// The clock stands still unless [`SimHandle::advance`] moves it (tests
    /// that watch transitional states); default false (the wall clock).
    pub manual_clock: bool,
}

impl SimConfig {
    /// The two demo accounts with the default delays.
    pub fn demo() -> Self {
        SimConfig {
            accounts: vec![SimAccount::demo_web(), SimAccount::demo_batch()],
            token_lifetime: Duration::from_secs(3600),
            build_delay: Duration::from_secs(3),
            action_delay: Duration::from_secs(1),
            public_url: None,
            manual_clock: false,
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self::demo()
    }
}

/// The next `times` compute requests whose path contains `path_contains` (and whose
/// method is `method`, when set) are answered with `status` and `body` verbatim.
#[derive(Clone, Debug)]
pub struct ErrorInjection {
    pub method: Option<Method>,
    pub path_contains: String,
    pub status: u16,
    pub body: String,
    pub times: u32,
}

/// One request as the simulator received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub query: Option<String>,
    /// Every header, names lower-case, values lossily decoded.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl RecordedRequest {
    /// The first value of a header (name matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Shared {
    /// The simulator's clock: the wall clock (or, with `manual_clock`, the
    /// start time) plus what tests advanced it by.
    pub(crate) fn now(&self) -> chrono::DateTime<chrono::Utc> {
        let offset = chrono::Duration::milliseconds(self.clock_offset_ms.load(Ordering::SeqCst));
        match self.frozen_at {
            Some(start) => start + offset,
            None => chrono::Utc::now() + offset,
        }
    }
}

/// State shared by the server task and every handle.
pub(crate) struct Shared {
    pub accounts: Vec<SimAccount>,
    pub token_lifetime: Duration,
    pub build_delay: Duration,
    pub action_delay: Duration,
    /// Base of links, without a trailing slash.
    pub base: String,
    pub addr: SocketAddr,
    pub world: Mutex<World>,
    identity_calls: AtomicU64,
    pub outage: AtomicBool,
    latency: Mutex<Duration>,
    /// While true, compute requests are recorded and then wait (test hook).
    hold: tokio::sync::watch::Sender<bool>,
    /// Added to the clock for every simulated time (test hook: moves
    /// builds, actions and token expiry forward without waiting).
    clock_offset_ms: std::sync::atomic::AtomicI64,
    /// `manual_clock`: the clock stands at this instant (plus the offset).
    frozen_at: Option<chrono::DateTime<chrono::Utc>>,
    injections: Mutex<Vec<ErrorInjection>>,
    requests: Mutex<Recorded>,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Set once the server has ended: its listener is closed and every
    /// connection it accepted is closed.
    stopped: tokio::sync::watch::Sender<bool>,
}

pub struct Simulator;

impl Simulator {
    /// Serves on an already-bound listener until [`SimHandle::shutdown`]. Dropping every
    /// handle does not stop it.
    pub async fn start(
        listener: tokio::net::TcpListener,
        config: SimConfig,
    ) -> std::io::Result<SimHandle> {
        let addr = listener.local_addr()?;
        let base = config
            .public_url
            .as_deref()
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| format!("http://{addr}"));
        let (shutdown, mut shutdown_rx) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            world: Mutex::new(World::new(&config.accounts)),
            accounts: config.accounts,
            token_lifetime: config.token_lifetime,
            build_delay: config.build_delay,
            action_delay: config.action_delay,
            base,
            addr,
            identity_calls: AtomicU64::new(0),
            outage: AtomicBool::new(false),
            latency: Mutex::new(Duration::ZERO),
            hold: tokio::sync::watch::Sender::new(false),
            clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
            frozen_at: config.manual_clock.then(chrono::Utc::now),
            injections: Mutex::new(Vec::new()),
            requests: Mutex::new(Recorded::default()),
            shutdown,
            stopped: tokio::sync::watch::Sender::new(false),
        });
        let app = Router::new()
            .fallback(dispatch)
            .with_state(Arc::clone(&shared));
        let ended = Arc::clone(&shared);
        tokio::spawn(async move {
            let stop = async move {
                // An error means the sender is gone, which cannot happen while `shared`
                // (which owns it) is alive in this task; treat it as a stop.
                let _ = shutdown_rx.wait_for(|stop| *stop).await;
            };
            if let Err(err) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::warn!(%err, "simulator server stopped with an error");
            }
            ended.stopped.send_replace(true);
        });
        Ok(SimHandle { shared })
    }
}

/// A handle on a running simulator; cheap to clone.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://{bound addr}` (not `public_url`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Calls (successful or failed) to `POST /v2.0/tokens` and
    /// `POST /v1.0/appkeys/{appkey}/tokens`.
    pub fn identity_calls(&self) -> u64 {
        self.shared.identity_calls.load(Ordering::SeqCst)
    }

    /// While on, both token APIs fail: Keystone with 503, v1.0 with resultCode 50503.
    /// Tokens already issued stay valid on the compute API.
    pub fn set_identity_outage(&self, on: bool) {
        self.shared.outage.store(on, Ordering::SeqCst);
    }

    /// Delay added before every response.
    pub fn set_latency(&self, d: Duration) {
        *lock(&self.shared.latency) = d;
    }

    /// While on, compute requests are recorded, then held unanswered until it
    /// is turned off again: a test can act at the exact point where the
    /// upstream has the request and the gateway waits for the answer.
    pub fn hold_compute(&self, on: bool) {
        self.shared.hold.send_replace(on);
    }

    /// Moves the simulator's clock forward by `by`: builds and actions that
    /// would have finished by then have finished, tokens age. Lets a test
    /// see every transitional state, and then the next one, without depending
    /// on how fast the machine runs.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.shared.clock_offset_ms.fetch_add(ms, Ordering::SeqCst);
    }

    /// Queues an injected error (see [`ErrorInjection`]); earlier injections match first.
    pub fn inject_error(&self, e: ErrorInjection) {
        if e.times > 0 {
            lock(&self.shared.injections).push(e);
        }
    }

    /// Like an API password change: every token issued so far is now refused (401).
    pub fn revoke_all_tokens(&self) {
        lock(&self.shared.world).tokens.clear();
    }

    /// Every request received (identity and compute), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).list.iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        let mut rec = lock(&self.shared.requests);
        rec.list.clear();
        rec.body_bytes = 0;
    }

    /// Stops accepting connections and ends the server task once in-flight requests
    /// are answered.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// [`Self::shutdown`], then waits until the server has ended: its
    /// listener and every connection it accepted are closed, so the next
    /// call to it fails. Without the wait, a pooled connection can still
    /// carry a call in the moment before the server closes it.
    pub async fn stop(&self) {
        self.shutdown();
        let mut stopped = self.shared.stopped.subscribe();
        // The sender lives in `shared`, which `self` keeps alive.
        let _ = stopped.wait_for(|ended| *ended).await;
    }

    /// Test hook (not part of the spec): puts a server into `ERROR` (vm_state error, no
    /// task), as a failed operation would. Returns false if no such server exists.
    pub fn fail_server(&self, server_id: &str) -> bool {
        let mut world = lock(&self.shared.world);
        world.settle(self.shared.now());
        for tenant in world.tenants.values_mut() {
            if let Some(s) = tenant.server_mut(server_id) {
                s.pending = None;
                s.vm = state::VmState::Error;
                s.updated = self.shared.now();
                return true;
            }
        }
        false
    }
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

// ---- the request pipeline -----------------------------------------------------------

/// Every request: read the body (413 past the limit), record it, wait the configured
/// latency, answer an injected error if one matches (compute only), else route; compute
/// answers get the microversion and request-id headers.
async fn dispatch(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let is_compute = path.starts_with("/v2/");
    let is_identity = path == "/v2.0/tokens" || identity::is_v1_token_path(&path);
    if is_identity && parts.method == Method::POST {
        shared.identity_calls.fetch_add(1, Ordering::SeqCst);
    }

    let (body, too_large) = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => (b, false),
        Err(_) => (Bytes::new(), true),
    };
    record(&shared, &parts.method, &path, &query, &parts.headers, &body);
    if is_compute {
        let mut held = shared.hold.subscribe();
        let _ = held.wait_for(|on| !*on).await;
    }

    let latency = *lock(&shared.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let mut resp = if too_large {
        if path == "/v2.0/tokens" {
            keystone_error(StatusCode::PAYLOAD_TOO_LARGE, "Request is too large.")
        } else if is_identity {
            identity::envelope_error(identity::codes::MALFORMED, "Request body is too large.")
        } else {
            Fault::TooLarge.into_response()
        }
    } else if let Some(injected) = is_compute
        .then(|| take_injection(&shared, &parts.method, &path))
        .flatten()
    {
        injected
    } else {
        route(
            &shared,
            &parts.method,
            &path,
            query.as_deref(),
            &parts.headers,
            &body,
        )
    };

    if is_compute {
        add_compute_headers(&parts.headers, resp.headers_mut());
    }
    resp
}

fn record(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &Option<String>,
    headers: &HeaderMap,
    body: &Bytes,
) {
    let rec = RecordedRequest {
        method: method.as_str().to_string(),
        path: path.to_string(),
        query: query.clone(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.clone(),
    };
    let mut rec_log = lock(&shared.requests);
    rec_log.body_bytes += rec.body.len();
    rec_log.list.push_back(rec);
    while rec_log.list.len() > RECORDED_REQUESTS_KEPT
        || (rec_log.body_bytes > RECORDED_BODY_BYTES_KEPT && rec_log.list.len() > 1)
    {
        if let Some(old) = rec_log.list.pop_front() {
            rec_log.body_bytes -= old.body.len();
        }
    }
}

/// The request log, bounded in count and in body bytes.
#[derive(Default)]
struct Recorded {
    list: VecDeque<RecordedRequest>,
    body_bytes: usize,
}

fn take_injection(shared: &Shared, method: &Method, path: &str) -> Option<Response> {
    let mut injections = lock(&shared.injections);
    let idx = injections.iter().position(|e| {
        path.contains(e.path_contains.as_str()) && e.method.as_ref().is_none_or(|m| m == method)
    })?;
    let inj = &mut injections[idx];
    let status = StatusCode::from_u16(inj.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = inj.body.clone();
    inj.times = inj.times.saturating_sub(1);
    if inj.times == 0 {
        injections.remove(idx);
    }
    drop(injections);

    let content_type =
        if !body.is_empty() && serde_json::from_str::<serde_json::Value>(&body).is_ok() {
            "application/json"
        } else {
            "text/plain; charset=utf-8"
        };
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Some(resp)
}

const API_VERSION: &str = "openstack-api-version";
const NOVA_API_VERSION: &str = "x-openstack-nova-api-version";

/// Echoes the requested microversion (Nova answers with the version it used), or 2.1;
/// each header is derived from the other when only one was sent.
fn add_compute_headers(req: &HeaderMap, out: &mut HeaderMap) {
    let asked = req
        .get(API_VERSION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let asked_legacy = req
        .get(NOVA_API_VERSION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (modern, legacy) = match (asked, asked_legacy) {
        (Some(m), Some(l)) => (m, l),
        (Some(m), None) => {
            let l = m
                .trim()
                .strip_prefix("compute")
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| m.clone());
            (m, l)
        }
        (None, Some(l)) => (format!("compute {}", l.trim()), l),
        (None, None) => ("compute 2.1".to_string(), "2.1".to_string()),
    };
    if let Ok(v) = HeaderValue::from_str(&modern) {
        out.insert(API_VERSION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&legacy) {
        out.insert(NOVA_API_VERSION, v);
    }
    out.insert(
        header::VARY,
        HeaderValue::from_static("OpenStack-API-Version, X-OpenStack-Nova-API-Version"),
    );
    let request_id = format!("req-{}", uuid::Uuid::new_v4());
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        out.insert("x-compute-request-id", v.clone());
        out.insert("x-openstack-request-id", v);
    }
}

fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let Some(segments) = reply::path_segments(path) else {
        return reply::not_found(reply::RESOURCE_NOT_FOUND).into_response();
    };
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segs.as_slice() {
        [] => match *method {
            Method::GET => identity::versions(shared),
            _ => identity_method_not_allowed("GET"),
        },
        ["v2.0", "tokens"] => match *method {
            Method::POST => identity::keystone_tokens(shared, body),
            _ => identity_method_not_allowed("POST"),
        },
        ["v1.0", "appkeys", appkey, "tokens"] => match *method {
            Method::POST => identity::v1_issue(shared, appkey, body),
            Method::GET => identity::v1_info(shared, appkey, query),
            _ => identity_method_not_allowed("GET, POST"),
        },
        ["v2", tenant, rest @ ..] => compute::handle(
            shared,
            &compute::Request {
                method,
                tenant,
                rest,
                query,
                headers,
                body,
            },
        ),
        _ => reply::not_found(reply::RESOURCE_NOT_FOUND).into_response(),
    }
}

fn identity_method_not_allowed(allow: &'static str) -> Response {
    let mut resp = keystone_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "The method specified is not allowed for this resource.",
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}
