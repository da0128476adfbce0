//! The request path of the public listener, phase by phase.
//!
//! ```text
//! classify (surface, project, Action)     -> router / translate
//! authenticate (JWT -> team, subject)     -> auth
//! read body, resolve the Action           -> (here) / translate::exec::plan
//! authorize (allow rules, constraints)    -> policy        } admit()
//! rate limit (team rules, global budget)  -> ratelimit     }
//! audit "received" (mutating Actions)     -> audit         }
//! forward with the project's token        -> upstream + proxy / translate::exec
//! audit "completed", metrics, log line    -> finish()
//! ```
//! Each phase returns a `GatewayError` on refusal; `error.rs` alone decides
//! what the caller sees.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};

use crate::action::Action;
use crate::audit::{AuditLog, Stage};
use crate::auth::{AuthError, Authenticator, Identity};
use crate::config::{AuditLevel, Config, Project};
use crate::error::GatewayError;
use crate::exchange::{
    Ending, Exchange, Surface, gateway_ending, result_ids, upstream_ending, v1_ending,
};
use crate::metrics::Metrics;
use crate::policy;
use crate::proxy;
use crate::ratelimit::{Outcome as RateOutcome, RateLimiter};
use crate::router::{self, V2Kind};
use crate::translate::exec::{self, V2Answer, V2Caller};
use crate::translate::response::FlavorInfo;
use crate::translate::{self, V1Error, V1Route};
use crate::upstream::token::{TokenBroker, UpstreamToken};
use crate::upstream::{MAX_BUFFERED_BODY, UpstreamClient, read_body};

/// Flavors change rarely; instance details must not cost a flavor call each.
const FLAVOR_CACHE_TTL: Duration = Duration::from_secs(600);

/// What a reload swaps as one unit: the config and everything derived from it.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    /// JWTs verified recently, so a client reusing its token (the common
    /// case) does not pay a signature check per request. Per snapshot: a
    /// reload (new keys, new teams) starts empty.
    verified: VerifiedTokens,
    pub limiter: Arc<RateLimiter>,
}

impl Snapshot {
    pub fn build(config: Config) -> Result<Snapshot, StartError> {
        Ok(Snapshot {
            verified: VerifiedTokens::new(config.auth.leeway),
            auth: Authenticator::new(&config.auth)?,
            limiter: RateLimiter::new(&config)?,
            config: Arc::new(config),
        })
    }
}

/// Shared state of the public and admin listeners.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    pub broker: Arc<TokenBroker>,
    pub metrics: Arc<Metrics>,
    pub audit: AuditLog,
    client: UpstreamClient,
    /// Flavor details per tenant, for the v1.0 instance details (cpu, ram).
    flavors: moka::future::Cache<String, Arc<HashMap<String, FlavorInfo>>>,
    /// Scheme the public listener speaks, for links when no public_url is set.
    scheme: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Auth(#[from] crate::auth::AuthSetupError),
    #[error("{0}")]
    Client(#[from] crate::upstream::ClientSetupError),
    #[error("{0}")]
    RateLimit(#[from] crate::ratelimit::RateLimitSetupError),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
}

impl Gateway {
    pub fn new(config: Config) -> Result<Arc<Gateway>, StartError> {
        let tls = config.listen.tls.is_some();
        let metrics = Arc::new(Metrics::new());
        let client = UpstreamClient::new(&config.upstream)?;
        let broker = Arc::new(TokenBroker::new(
            client.clone(),
            config.upstream.clone(),
            config.token.clone(),
            metrics.clone(),
        ));
        let audit = if config.audit.enabled() {
            AuditLog::open(&config.audit)?
        } else {
            tracing::warn!(
                "no audit sink configured (audit.file / audit.stdout): instance actions are not recorded"
            );
            AuditLog::disabled()
        };
        Ok(Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(Snapshot::build(config)?),
            broker,
            metrics,
            audit,
            client,
            flavors: moka::future::Cache::builder()
                .max_capacity(1_000)
                .time_to_live(FLAVOR_CACHE_TTL)
                .build(),
            scheme: if tls { "https" } else { "http" },
        }))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the running config; requests already in flight finish on the
    /// snapshot they started with.
    pub fn swap(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The base URL callers reach the gateway at.
    fn public_base(&self, config: &Config, headers: &HeaderMap) -> String {
        if let Some(url) = &config.server.public_url {
            return url.clone();
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| is_plausible_host(h))
            .unwrap_or("localhost");
        format!("{}://{host}", self.scheme)
    }

    /// `GET /` and `GET /v2/`: version discovery, no credential needed.
    pub fn versions(&self, headers: &HeaderMap, single: bool) -> Response {
        let snap = self.snapshot();
        let base = self.public_base(&snap.config, headers);
        let doc = if single {
            proxy::version_document(&base)
        } else {
            proxy::versions_document(&base)
        };
        axum::Json(doc).into_response()
    }

    /// Everything under `/v2/{project}/...`.
    ///
    /// Runs in its own task: once a request is admitted it is seen through
    /// to its "completed" audit record and metrics even if the caller hangs
    /// up half way (the upstream call may already have been made).
    pub async fn handle_v2(self: Arc<Self>, req: Request<Body>) -> Response {
        match tokio::spawn(self.serve_v2(req)).await {
            Ok(resp) => resp,
            Err(_) => GatewayError::Internal("the request task failed; see the gateway log".into())
                .v2_response(),
        }
    }

    /// `/v2/...` bounded by the request timeout.
    async fn serve_v2(self: Arc<Self>, req: Request<Body>) -> Response {
        let snap = self.snapshot();
        let (parts, body) = req.into_parts();
        let mut x = Exchange::start(Surface::V2, &parts);
        let _in_flight = InFlight::new(&self.metrics, Surface::V2);
        let limit = snap.config.server.request_timeout;
        let result = match tokio::time::timeout(limit, self.v2(&snap, &mut x, parts, body)).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::Timeout(limit)),
        };
        let (mut resp, ending) = match result {
            Ok(resp) => {
                let ending = upstream_ending(resp.status().as_u16());
                (resp, ending)
            }
            Err(e) => {
                let ending = gateway_ending(&e);
                (e.v2_response(), ending)
            }
        };
        self.finish(&snap, &x, &ending, &mut resp).await;
        resp
    }

    async fn v2(
        &self,
        snap: &Snapshot,
        x: &mut Exchange,
        parts: http::request::Parts,
        body: Body,
    ) -> Result<Response, GatewayError> {
        let config = &snap.config;
        let path = parts.uri.path().strip_prefix("/v2/").unwrap_or("");
        let route = router::classify_v2(&parts.method, path)?;
        if let V2Kind::Action(a) = route.kind {
            x.action = Some(a);
        }
        x.target = route.target.map(str::to_string);

        let identity = self.authenticate(snap, x, &parts.headers).await?;
        let project = config
            .project(route.project)
            .ok_or_else(|| GatewayError::UnknownProject(route.project.to_string()))?
            .clone();
        x.project = Some(project.alias.clone());

        let body = read_request_body(body, config.server.body_limit_bytes).await?;
        let action = match route.kind {
            V2Kind::Action(a) => a,
            V2Kind::ServerAction => server_action(&body)?,
        };
        x.action = Some(action);
        if action.is_mutating() && !body.is_empty() {
            x.v2_body = serde_json::from_slice(&body).ok();
        }
        let facts = x
            .v2_body
            .as_ref()
            .map(|b| policy::RequestFacts::from_v2_body(action, b))
            .unwrap_or_default();
        self.admit(snap, x, &identity, &project, action, &facts)
            .await?;

        let base = self.public_base(config, &parts.headers);
        let gateway_project_base = format!("{base}/v2/{}", route.project);
        let upstream_url = format!(
            "{}/v2/{}/{}{}",
            config.upstream.compute_url,
            project.tenant_id,
            route.rest,
            parts
                .uri
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        );
        let forward = Forward {
            method: parts.method.clone(),
            url: upstream_url,
            headers: proxy::upstream_request_headers(&parts.headers),
            body,
        };
        let resp = self.forward_with_token(&project, &forward, action).await?;
        x.upstream_status = Some(resp.status().as_u16());
        self.respond(resp, &project, &gateway_project_base, x).await
    }

    /// Everything under `/v1.0/appkeys/{appkey}/...`: always HTTP 200 with
    /// the `header` envelope. Its own task, like [`Gateway::handle_v2`].
    pub async fn handle_v1(self: Arc<Self>, req: Request<Body>) -> Response {
        match tokio::spawn(self.serve_v1(req)).await {
            Ok(resp) => resp,
            Err(_) => translate::envelope_error(&V1Error::Gateway(GatewayError::Internal(
                "the request task failed; see the gateway log".into(),
            ))),
        }
    }

    /// `/v1.0/...` bounded by the request timeout.
    async fn serve_v1(self: Arc<Self>, req: Request<Body>) -> Response {
        let snap = self.snapshot();
        let (parts, body) = req.into_parts();
        let mut x = Exchange::start(Surface::V1, &parts);
        let _in_flight = InFlight::new(&self.metrics, Surface::V1);
        let limit = snap.config.server.request_timeout;
        let result = match tokio::time::timeout(limit, self.v1(&snap, &mut x, parts, body)).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::Timeout(limit).into()),
        };
        let (mut resp, ending) = match result {
            Ok(payload) => (
                translate::envelope_ok(payload),
                upstream_ending(x.upstream_status.unwrap_or(200)),
            ),
            Err(e) => {
                let ending = v1_ending(&e);
                (translate::envelope_error(&e), ending)
            }
        };
        self.finish(&snap, &x, &ending, &mut resp).await;
        resp
    }

    async fn v1(
        &self,
        snap: &Snapshot,
        x: &mut Exchange,
        parts: http::request::Parts,
        body: Body,
    ) -> Result<serde_json::Map<String, serde_json::Value>, V1Error> {
        let config = &snap.config;
        let path = parts
            .uri
            .path()
            .strip_prefix("/v1.0/appkeys/")
            .unwrap_or("");
        let request = translate::classify_v1(&parts.method, path, parts.uri.query())?;
        // The token API is refused outright: caller-supplied cloud keys are
        // never read, let alone forwarded.
        if request.route == V1Route::Token {
            return Err(V1Error::TokenApi);
        }
        x.action = request.route.action();
        x.target = request.route.target().map(str::to_string);
        let identity = self.authenticate(snap, x, &parts.headers).await?;
        let project = config
            .project_by_appkey(&request.appkey)
            .ok_or_else(|| GatewayError::UnknownProject(format!("appkey {}", request.appkey)))?
            .clone();
        x.project = Some(project.alias.clone());
        let body = read_request_body(body, config.server.body_limit_bytes).await?;
        let plan = exec::plan(&request.route, &body)?;
        x.action = Some(plan.action);
        x.v2_body = plan.v2_body().cloned();
        let facts = x
            .v2_body
            .as_ref()
            .map(|b| policy::RequestFacts::from_v2_body(plan.action, b))
            .unwrap_or_default();
        self.admit(snap, x, &identity, &project, plan.action, &facts)
            .await?;
        let caller = ProjectCaller {
            gateway: self,
            project: &project,
            compute_url: &config.upstream.compute_url,
            action: plan.action,
            last_status: std::sync::Mutex::new(None),
        };
        let payload = exec::execute(&plan, &caller).await;
        x.upstream_status = caller.last_status.lock().ok().and_then(|s| *s);
        let payload = payload?;
        x.result = v1_result_ids(plan.action, &payload);
        Ok(payload)
    }

    async fn authenticate(
        &self,
        snap: &Snapshot,
        x: &mut Exchange,
        headers: &HeaderMap,
    ) -> Result<Identity, GatewayError> {
        match snap.verified.authenticate(&snap.auth, headers).await {
            Ok(identity) => {
                x.team = Some(identity.team.clone());
                x.subject = identity.subject.clone();
                Ok(identity)
            }
            Err(e) => {
                if let GatewayError::Unauthenticated(a) = &e {
                    self.metrics
                        .auth_failures
                        .with_label_values(&[a.reason()])
                        .inc();
                }
                Err(e)
            }
        }
    }

    /// Everything between knowing the Action and calling the upstream, in
    /// order: policy, rate limits, then the "received" audit record of a
    /// mutating Action (an action must never happen unrecorded, so when that
    /// record cannot be written the request stops here, fail-closed).
    async fn admit(
        &self,
        snap: &Snapshot,
        x: &mut Exchange,
        identity: &Identity,
        project: &Project,
        action: Action,
        facts: &policy::RequestFacts,
    ) -> Result<(), GatewayError> {
        let config = &snap.config;
        if let Err(refusal) =
            policy::authorize(config, &identity.team, &project.alias, action, facts)
        {
            self.metrics
                .policy_refusals
                .with_label_values(&[x.team_label(config), refusal.reason()])
                .inc();
            return Err(refusal.into());
        }

        let decision = snap.limiter.check(&identity.team, action).await;
        if decision.degraded {
            self.metrics
                .ratelimit_degraded
                .with_label_values(&["fail_open"])
                .inc();
        }
        let outcome = decision.outcome.clone();
        x.rate = Some(decision);
        match outcome {
            RateOutcome::Allowed => {}
            RateOutcome::Limited { rule, retry_after } => {
                self.metrics
                    .ratelimit_refusals
                    .with_label_values(&[x.team_label(config), &rule])
                    .inc();
                return Err(GatewayError::RateLimited { rule, retry_after });
            }
            RateOutcome::Unavailable { rule, .. } => {
                self.metrics
                    .ratelimit_degraded
                    .with_label_values(&["fail_closed"])
                    .inc();
                return Err(GatewayError::RateLimitUnavailable { rule });
            }
        }

        let level = config.audit.level_for(action);
        if action.is_mutating() && level != AuditLevel::None && self.audit.is_enabled() {
            let record = x.audit_record(Stage::Received, level, None);
            // The failure's detail (a file path) is logged by write_audit,
            // never shown to the caller.
            if self.write_audit(record).await.is_err() && config.audit.fail_closed {
                return Err(GatewayError::AuditUnavailable(
                    "the audit sink is not writable".into(),
                ));
            }
        }
        Ok(())
    }

    /// After the answer is known and before it leaves: the "completed" audit
    /// record, the metrics, one log line, the rate-limit headers.
    async fn finish(&self, snap: &Snapshot, x: &Exchange, ending: &Ending, resp: &mut Response) {
        if let Some(rate) = &x.rate {
            rate.apply_headers(resp.headers_mut());
        }
        let status = resp.status().as_u16();
        let config = &snap.config;
        let level = x.audit_level(config);
        // Refusals are always recorded, at least at metadata level.
        let level = if ending.refused {
            level.max(AuditLevel::Metadata)
        } else {
            level
        };
        if level != AuditLevel::None && self.audit.is_enabled() {
            let _ = self
                .write_audit(x.audit_record(Stage::Completed, level, Some(ending)))
                .await;
        }
        let took = x.started.elapsed();
        self.metrics.observe_request(
            x.team_label(config),
            x.surface.label(),
            x.action_label(),
            ending.outcome,
            took,
        );
        tracing::info!(
            request_id = %x.request_id,
            surface = x.surface.label(),
            team = x.team.as_deref().unwrap_or("-"),
            action = x.action_label(),
            project = x.project.as_deref().unwrap_or("-"),
            status,
            upstream_status = x.upstream_status.unwrap_or(0),
            outcome = ending.outcome.label(),
            reason = ending.reason.as_deref().unwrap_or("-"),
            latency_ms = took.as_secs_f64() * 1000.0,
            "request"
        );
    }

    async fn write_audit(
        &self,
        record: crate::audit::AuditRecord,
    ) -> Result<(), crate::audit::AuditError> {
        let result = self.audit.write(record).await;
        let label = if result.is_ok() { "written" } else { "failed" };
        self.metrics.audit_records.with_label_values(&[label]).inc();
        if let Err(e) = &result {
            tracing::error!(error = %e, "audit record could not be written");
        }
        result
    }

    /// Sends `forward` with the project's token; on a 401, drops that token
    /// (if still current) and retries exactly once with a fresh one.
    async fn forward_with_token(
        &self,
        project: &Project,
        forward: &Forward,
        action: Action,
    ) -> Result<Response<hyper::body::Incoming>, GatewayError> {
        let token = self.token(project).await?;
        let resp = self.send_timed(forward.request(&token)?, action).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        drop(resp);
        self.broker.invalidate_if_current(project, &token).await;
        let token = self.token(project).await?;
        let resp = self.send_timed(forward.request(&token)?, action).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            self.broker.invalidate_if_current(project, &token).await;
            return Err(GatewayError::UpstreamUnauthorized(project.alias.clone()));
        }
        Ok(resp)
    }

    async fn send_timed(
        &self,
        req: Request<Full<Bytes>>,
        action: Action,
    ) -> Result<Response<hyper::body::Incoming>, GatewayError> {
        let started = std::time::Instant::now();
        let resp = self.client.send(req).await?;
        self.metrics
            .observe_upstream(action.name(), resp.status().as_u16(), started.elapsed());
        Ok(resp)
    }

    async fn token(&self, project: &Project) -> Result<Arc<UpstreamToken>, GatewayError> {
        self.broker
            .current_token(project)
            .await
            .map_err(|source| GatewayError::TokenUnavailable {
                project: project.alias.clone(),
                source,
            })
    }

    /// Turns the upstream answer into the caller's: hop-by-hop headers out,
    /// links pointed back at the gateway, other bodies streamed through.
    async fn respond(
        &self,
        resp: Response<hyper::body::Incoming>,
        project: &Project,
        gateway_project_base: &str,
        x: &mut Exchange,
    ) -> Result<Response, GatewayError> {
        let (mut parts, body) = resp.into_parts();
        let location = parts
            .headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        proxy::strip_hop_by_hop(&mut parts.headers);
        if let Some(loc) = parts
            .headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            && let Some(new) =
                proxy::rewrite_location(loc, &project.tenant_id, gateway_project_base)
            && let Ok(v) = HeaderValue::from_str(&new)
        {
            parts.headers.insert(header::LOCATION, v);
        }
        if !is_json(&parts.headers) {
            if let Some(action) = x.action.filter(|a| a.is_mutating()) {
                x.result = result_ids(action, &serde_json::Value::Null, location.as_deref());
            }
            return Ok(Response::from_parts(parts, Body::new(body)));
        }
        let bytes = read_body(body, MAX_BUFFERED_BODY, self.client.request_timeout()).await?;
        if let Some(action) = x.action.filter(|a| a.is_mutating()) {
            let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            x.result = result_ids(action, &value, location.as_deref());
        }
        let bytes = match proxy::rewrite_links(&bytes, &project.tenant_id, gateway_project_base) {
            Some(rewritten) => Bytes::from(rewritten),
            None => bytes,
        };
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(Response::from_parts(parts, Body::from(bytes)))
    }
}

/// A request ready to go upstream, replayable (its body is buffered).
struct Forward {
    method: Method,
    url: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Forward {
    fn request(&self, token: &UpstreamToken) -> Result<Request<Full<Bytes>>, GatewayError> {
        let uri: Uri = self
            .url
            .parse()
            .map_err(|_| GatewayError::BadRequest("the request path is not a valid URI".into()))?;
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(uri)
            .body(Full::new(self.body.clone()))
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        *req.headers_mut() = self.headers.clone();
        let mut value = HeaderValue::from_str(token.id.expose()).map_err(|_| {
            GatewayError::Internal("upstream token is not a valid header value".into())
        })?;
        value.set_sensitive(true);
        req.headers_mut().insert("x-auth-token", value);
        Ok(req)
    }
}

/// The caller's JWT: `Authorization: Bearer <jwt>`, or the bare JWT in
/// `X-Auth-Token` as unmodified OpenStack/TOAST clients send it.
pub fn caller_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| AuthError::Malformed)?;
        let (scheme, token) = v.split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed);
        }
        return Ok(token.trim());
    }
    if let Some(v) = headers.get("x-auth-token") {
        return v.to_str().map(str::trim).map_err(|_| AuthError::Malformed);
    }
    Err(AuthError::Missing)
}

/// Successfully verified JWTs, for at most a minute and never past their
/// own `exp` (plus the configured leeway, as the verifier allows). Only
/// successes are kept, keyed by the whole token, so a cached answer is
/// exactly what verifying again would say, minus a key removed from a JWKS
/// in the last minute.
struct VerifiedTokens {
    cache: moka::sync::Cache<String, (Identity, i64)>,
    leeway_secs: i64,
}

impl VerifiedTokens {
    fn new(leeway: Duration) -> VerifiedTokens {
        VerifiedTokens {
            cache: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            leeway_secs: leeway.as_secs() as i64,
        }
    }

    async fn authenticate(
        &self,
        auth: &Authenticator,
        headers: &HeaderMap,
    ) -> Result<Identity, GatewayError> {
        let token = caller_token(headers)?;
        let now = chrono::Utc::now().timestamp();
        if let Some((identity, valid_until)) = self.cache.get(token)
            && now < valid_until
        {
            return Ok(identity);
        }
        let identity = auth.authenticate(token).await?;
        if let Some(exp) = jwt_exp(token) {
            self.cache.insert(
                token.to_string(),
                (identity.clone(), exp.saturating_add(self.leeway_secs)),
            );
        }
        Ok(identity)
    }
}

/// The `exp` claim of a token that has just been verified.
fn jwt_exp(token: &str) -> Option<i64> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["exp"].as_i64()
}

async fn read_request_body(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(GatewayError::BodyTooLarge(limit))
        }
        Err(e) => Err(GatewayError::BadRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// `POST servers/{id}/action`: the body's single key names the Action.
fn server_action(body: &[u8]) -> Result<Action, GatewayError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::BadRequest(format!("the action body is not valid JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| GatewayError::BadRequest("the action body must be a JSON object".into()))?;
    let mut keys = obj.keys();
    match (keys.next(), keys.next()) {
        (Some(key), None) => Action::from_v2_server_action(key).ok_or_else(|| {
            GatewayError::BadRequest(format!(
                "toastgate does not support the server action `{key}`"
            ))
        }),
        _ => Err(GatewayError::BadRequest(
            "the action body must have exactly one key, the action name".into(),
        )),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Host header values are echoed into links: accept only host[:port].
fn is_plausible_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// Ids of what a v1.0 mutating call produced, from its v1.0 answer.
fn v1_result_ids(
    action: Action,
    payload: &serde_json::Map<String, serde_json::Value>,
) -> Option<serde_json::Value> {
    let pick = |v: &serde_json::Value, key: &str| v.as_str().map(|s| serde_json::json!({ key: s }));
    match action {
        Action::InstanceCreate => pick(&payload.get("instance")?["id"], "instance_id"),
        Action::InstanceCreateImage => pick(&payload.get("createdImage")?["id"], "image_id"),
        Action::KeypairCreate => pick(&payload.get("keypair")?["name"], "keypair"),
        Action::VolumeAttach => pick(&payload.get("attachment")?["id"], "attachment_id"),
        _ => None,
    }
}

/// Keeps the in-flight gauge right however the request ends.
struct InFlight<'a> {
    metrics: &'a Metrics,
    surface: Surface,
}

impl<'a> InFlight<'a> {
    fn new(metrics: &'a Metrics, surface: Surface) -> Self {
        metrics
            .in_flight
            .with_label_values(&[surface.label()])
            .inc();
        InFlight { metrics, surface }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics
            .in_flight
            .with_label_values(&[self.surface.label()])
            .dec();
    }
}

/// The v2 API of one project, as the v1.0 translation calls it.
struct ProjectCaller<'a> {
    gateway: &'a Gateway,
    project: &'a Project,
    compute_url: &'a str,
    action: Action,
    /// The status of the last upstream answer, for audit and metrics.
    last_status: std::sync::Mutex<Option<u16>>,
}

impl V2Caller for ProjectCaller<'_> {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<V2Answer, V1Error> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let body = match body {
            Some(v) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Bytes::from(
                    serde_json::to_vec(&v).map_err(|e| GatewayError::Internal(e.to_string()))?,
                )
            }
            None => Bytes::new(),
        };
        let forward = Forward {
            method,
            url: format!("{}/v2/{}/{path}", self.compute_url, self.project.tenant_id),
            headers,
            body,
        };
        let resp = self
            .gateway
            .forward_with_token(self.project, &forward, self.action)
            .await?;
        let status = resp.status().as_u16();
        if let Ok(mut last) = self.last_status.lock() {
            *last = Some(status);
        }
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = read_body(
            resp.into_body(),
            MAX_BUFFERED_BODY,
            self.gateway.client.request_timeout(),
        )
        .await?;
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| V1Error::Upstream {
                status: 502,
                message: format!("the upstream answered {status} with a body that is not JSON"),
            })?
        };
        Ok(V2Answer {
            status,
            body,
            location,
        })
    }

    async fn flavors(&self) -> Result<Arc<HashMap<String, FlavorInfo>>, V1Error> {
        let load = async {
            let a = self.call(Method::GET, "flavors/detail", None).await?;
            if a.status != 200 {
                return Err(V1Error::Upstream {
                    status: a.status,
                    message: "could not list flavors".into(),
                });
            }
            let map: HashMap<String, FlavorInfo> = a.body["flavors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(translate::response::flavor_info)
                .collect();
            Ok(Arc::new(map))
        };
        self.gateway
            .flavors
            .try_get_with(self.project.tenant_id.clone(), load)
            .await
            .map_err(|e: Arc<V1Error>| V1Error::Upstream {
                status: 502,
                message: format!("flavor details unavailable: {e}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_token_from_either_header() {
        let mut h = HeaderMap::new();
        assert!(matches!(caller_token(&h), Err(AuthError::Missing)));
        h.insert("x-auth-token", HeaderValue::from_static("abc"));
        assert_eq!(caller_token(&h).unwrap(), "abc");
        h.insert("authorization", HeaderValue::from_static("Bearer xyz"));
        assert_eq!(caller_token(&h).unwrap(), "xyz", "Authorization wins");
        h.insert(
            "authorization",
            HeaderValue::from_static("Basic dXNlcjpwYXNz"),
        );
        assert!(matches!(caller_token(&h), Err(AuthError::Malformed)));
    }

    #[test]
    fn server_action_body_selects_the_action() {
        assert_eq!(
            server_action(br#"{"os-stop": null}"#).unwrap(),
            Action::InstanceStop
        );
        assert_eq!(
            server_action(br#"{"reboot": {"type": "HARD"}}"#).unwrap(),
            Action::InstanceReboot
        );
        for bad in [
            &b"{}"[..],
            b"[]",
            b"not json",
            br#"{"os-stop":null,"os-start":null}"#,
            br#"{"lock":null}"#,
        ] {
            assert!(matches!(
                server_action(bad),
                Err(GatewayError::BadRequest(_))
            ));
        }
    }

    #[test]
    fn host_header_is_checked_before_it_goes_into_links() {
        assert!(is_plausible_host("gw.example.com:8080"));
        assert!(is_plausible_host("[::1]:8080"));
        assert!(!is_plausible_host("evil.com/\"><script>"));
        assert!(!is_plausible_host(""));
    }
}
