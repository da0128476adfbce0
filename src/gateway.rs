//! The request pipeline: one sequence of phases, written once for both
//! surfaces, over one per-request context ([`Exchange`]).
//!
//! ```text
//! classify      surface, project, route, judged query   -> router
//! authenticate  exactly one credential -> caller        -> auth
//! read          the body, within its limit and deadline -> body
//! judge         parse strictly, resolve the Action      -> router (v2) / translate::exec (v1.0)
//! admit         allow rules and constraints             -> policy
//!               team quotas, then the upstream budget   -> ratelimit
//!               audit "received" (mutating; fail closed) -> audit
//! execute       v2: forward exactly what was judged     -> upstream::compute + proxy
//!               v1.0: the translated v2 call(s)          -> translate
//! finish        audit "completed", metrics, one log line, the answer in the caller's surface
//! ```
//!
//! Why phases and not tower layers: the Action (which every concern after
//! authentication speaks) can depend on the request body, so the concerns
//! must run after the body is read and judged, in this order, on one shared
//! context. The outer concerns that do not need the Action (request id,
//! sensitive headers, a trace span, panics) are one shell function in the
//! server module, connection limits are in the listener. The surface supplies only what differs: classification,
//! judging and rendering ([`crate::surface`]).
//! Each phase returns a [`GatewayError`] on refusal; `error.rs` alone decides
//! what the caller sees.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderMap, Request};
use serde_json::Value;

use crate::action::Action;
use crate::audit::refusals::{NO_TEAM, RefusalSampler};
use crate::audit::{AuditLog, Owed, Stage};
use crate::auth::{Authenticator, CacheOutcome, Identity, VerifiedTokens};
use crate::body;
use crate::config::{AuditLevel, Config, KeySource, Project};
use crate::error::{Ending, GatewayError};
use crate::exchange::{Exchange, Judged, Surface};
use crate::idempotency::{self, Claim, IdempotencyStore, Refused};
use crate::metrics::{InFlight, Metrics, Outcome};
use crate::policy;
use crate::proxy;
use crate::ratelimit::{Outcome as RateOutcome, RateLimiter};
use crate::surface::{Answer, JudgedRequest, Route, render_error};
use crate::translate::api::{FlavorCache, ProjectApi};
use crate::translate::exec::{self, Plan};
use crate::upstream::UpstreamClient;
use crate::upstream::compute::{Compute, ComputeBase, Forward};
use crate::upstream::token::TokenBroker;

/// What a reload swaps as one unit: the config and everything derived from it.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub auth: Arc<Authenticator>,
    /// JWTs verified recently (per snapshot: a reload starts empty).
    verified: VerifiedTokens,
    pub limiter: Arc<RateLimiter>,
}

impl Snapshot {
    pub fn build(config: Config) -> Result<Snapshot, StartError> {
        let auth = Authenticator::with_ca(&config.auth, config.upstream.ca_file.as_deref())?;
        Snapshot::with_auth(config, Arc::new(auth))
    }

    /// A reload's snapshot. A JWKS URL's fetched key set carries over when
    /// `auth` and `upstream.ca_file` are unchanged: a new, empty one would
    /// lock every caller out if the IdP is down at that moment, which the
    /// running gateway survives on the keys it holds. Key files (PEM,
    /// JWKS file, HS secret) are read again: a reload is how a rotated one
    /// takes effect.
    pub fn rebuild(config: Config, previous: &Snapshot) -> Result<Snapshot, StartError> {
        let keeps_remote_keys = matches!(config.auth.keys, KeySource::JwksUrl { .. })
            && config.auth == previous.config.auth
            && config.upstream.ca_file == previous.config.upstream.ca_file;
        if keeps_remote_keys {
            let auth = previous.auth.clone();
            return Snapshot::with_auth(config, auth);
        }
        Snapshot::build(config)
    }

    fn with_auth(config: Config, auth: Arc<Authenticator>) -> Result<Snapshot, StartError> {
        Ok(Snapshot {
            verified: VerifiedTokens::new(config.auth.leeway, config.auth.verified_token_cache),
            auth,
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
    /// Refusal records held to `audit.refusal_records` per caller.
    refusals: RefusalSampler,
    /// Every request inside the gateway (shutdown waits for them).
    requests: Arc<Requests>,
    compute: Compute,
    flavors: FlavorCache,
    /// `Idempotency-Key` answers (in process; on Redis when the limits are).
    idempotency: IdempotencyStore,
    /// Trace context in and out; spans over OTLP when configured.
    pub traces: crate::traces::Traces,
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
    #[error("traces: {0}")]
    Traces(String),
    #[error("upstream.compute_url: {0}")]
    ComputeUrl(#[from] crate::upstream::compute::InvalidComputeUrl),
}

/// What admission decided, short of a refusal.
enum Admitted {
    /// Go upstream.
    Proceed,
    /// Answered before under this request's `Idempotency-Key`.
    Replay(crate::idempotency::Stored),
}

impl Gateway {
    pub fn new(config: Config) -> Result<Arc<Gateway>, StartError> {
        let metrics = Arc::new(Metrics::new());
        metrics.init_projects(config.projects.keys().map(String::as_str));
        let client = UpstreamClient::new(&crate::upstream::ClientSettings::of(&config.upstream))?;
        let traces = match &config.traces {
            None => crate::traces::Traces::off(),
            Some(settings) => {
                let http = crate::upstream::OtlpHttp {
                    client: client.clone(),
                    runtime: tokio::runtime::Handle::try_current()
                        .map_err(|_| StartError::Traces("traces need a tokio runtime".into()))?,
                };
                crate::traces::Traces::export(settings, http, crate::audit::replica_name())
                    .map_err(StartError::Traces)?
            }
        };
        let broker = Arc::new(TokenBroker::new(
            client.clone(),
            config.upstream.clone(),
            config.token.clone(),
            metrics.clone(),
        ));
        let compute = Compute::new(
            client,
            ComputeBase::parse(&config.upstream.compute_url)?,
            broker.clone(),
            metrics.clone(),
            &config.upstream,
        );
        let audit = if config.audit.enabled() {
            AuditLog::open(&config.audit)?
        } else {
            tracing::warn!(
                "no audit sink configured (audit.file / audit.stdout): instance actions are not recorded"
            );
            AuditLog::disabled()
        };
        let idempotency =
            IdempotencyStore::new(config.idempotency.window, config.idempotency.max_entries);
        let refusals = RefusalSampler::new(&config.audit.refusal_records);
        Ok(Arc::new(Gateway {
            idempotency,
            traces,
            scheme: if config.listen.tls.is_some() {
                "https"
            } else {
                "http"
            },
            snapshot: ArcSwap::from_pointee(Snapshot::build(config)?),
            broker,
            metrics,
            refusals,
            requests: Arc::default(),
            audit,
            compute,
            flavors: FlavorCache::default(),
        }))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the running config; requests already in flight finish on the
    /// snapshot they started with.
    pub fn swap(&self, snapshot: Snapshot) {
        self.metrics
            .init_projects(snapshot.config.projects.keys().map(String::as_str));
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The base URL callers reach the gateway at (for links), followed by
    /// `tail`.
    pub fn public_base(&self, config: &Config, parts: &Parts, tail: &[&str]) -> String {
        proxy::public_base(
            config.server.public_url.as_deref(),
            self.scheme,
            &parts.headers,
            parts.uri.authority().map(|a| a.as_str()),
            tail,
        )
    }

    /// Every request of either surface. Runs in the connection's task, and
    /// moves to a task of its own if the caller hangs up half way: once
    /// admitted, a request is seen through to its "completed" audit record
    /// and metrics (the upstream call may already have been made).
    pub async fn handle(
        self: Arc<Self>,
        surface: Surface,
        req: Request<Body>,
        client: Option<SocketAddr>,
    ) -> Response {
        let trace =
            self.traces
                .request_context(req.headers(), req.method().as_str(), req.uri().path());
        let counted = self.requests.start();
        let request = self.serve(surface, req, client);
        // Boxed once, wrapper included: it is moved whole only into the
        // box, and a hang-up moves just the pointer into a task.
        let request: Pin<Box<dyn Future<Output = Response> + Send>> = match trace {
            Some(trace) => Box::pin(opentelemetry::context::FutureExt::with_context(
                request, trace,
            )),
            None => Box::pin(request),
        };
        match (SeenThrough {
            request: Some(request),
            counted: Some(counted),
        })
        .await
        {
            Some(resp) => resp,
            None => {
                tracing::error!("a request panicked (a bug): answered 500");
                render_error(
                    surface,
                    &GatewayError::Internal("the request failed; see the gateway log".into()),
                )
            }
        }
    }

    async fn serve(
        self: Arc<Self>,
        surface: Surface,
        req: Request<Body>,
        client: Option<SocketAddr>,
    ) -> Response {
        let snap = self.snapshot();
        let (parts, body) = req.into_parts();
        let mut x = Exchange::start(surface, &parts, client);
        let _in_flight = InFlight::new(&self.metrics, surface.label());
        let limit = snap.config.server.request_timeout;
        // Counted from the exchange's start (its clock read, not another).
        let deadline = crate::upstream::deadline(x.started, limit);
        // Boxed: an awaited future is stored in its caller's future, and
        // rustc keeps room for it twice (rust-lang/rust#62958), so unboxed
        // phases made this future 61 KiB, copied whole on every move.
        let phases = Box::pin(self.phases(&snap, &mut x, parts, body));
        let answer = tokio::time::timeout_at(deadline, phases)
            .await
            .unwrap_or(Err(GatewayError::Timeout(limit)));
        self.finish(&snap, &mut x, answer).await
    }

    /// The phases, in order. Each records what it learned in `x`.
    async fn phases(
        &self,
        snap: &Snapshot,
        x: &mut Exchange,
        parts: Parts,
        body: Body,
    ) -> Result<Answer, GatewayError> {
        let config = &snap.config;
        let route = Route::classify(x.surface, &parts)?;
        x.action = route.action();
        x.target = route.target();

        x.caller = Some(self.authenticate(snap, &parts.headers).await?);
        x.idempotency_key =
            idempotency::parse_key(&parts.headers).map_err(GatewayError::IdempotencyKey)?;
        let project = route.project(config)?;
        x.project = Some(project.clone());

        let bytes = body::read(
            body,
            config.server.body_limit_bytes,
            config.server.body_read_timeout,
        )
        .await?;
        let judged = route.judge(&bytes)?;
        x.action = Some(judged.action());
        x.judged = Some(Judged::new(judged.action(), judged.v2_body().cloned()));

        if let Admitted::Replay(stored) = self.admit(snap, x).await? {
            x.replayed = true;
            x.upstream_status = None;
            x.result = stored.result.clone();
            return Ok(Answer::Replayed(stored));
        }

        match judged {
            JudgedRequest::V2 {
                route,
                action,
                body,
            } => {
                let base = self.public_base(config, &parts, &["/v2/", route.project]);
                let forward = Forward {
                    method: parts.method.clone(),
                    uri: route.upstream_uri(self.compute.base(), &project.tenant_id)?,
                    headers: proxy::upstream_request_headers(&parts.headers, body.is_some()),
                    body: body
                        .as_ref()
                        .map(body::to_upstream_bytes)
                        .unwrap_or_default(),
                };
                self.forward(x, &project, action, &forward, &base).await
            }
            JudgedRequest::V1(plan) => self.translate(x, &project, &plan).await,
        }
    }

    async fn authenticate(
        &self,
        snap: &Snapshot,
        headers: &HeaderMap,
    ) -> Result<Identity, GatewayError> {
        let (result, cache) = snap.verified.authenticate(&snap.auth, headers).await;
        if let Some(cache) = cache {
            self.metrics.observe_auth_cache(cache == CacheOutcome::Hit);
        }
        if let Err(a) = &result {
            self.metrics
                .auth_failures
                .with_label_values(&[a.reason()])
                .inc();
        }
        Ok(result?)
    }

    /// Everything between knowing the Action and calling the upstream, in
    /// order: policy, rate limits, then the "received" audit record of a
    /// mutating Action (an action must never happen unrecorded, so when that
    /// record cannot be written the request stops here, fail-closed).
    async fn admit(&self, snap: &Snapshot, x: &mut Exchange) -> Result<Admitted, GatewayError> {
        let config = &snap.config;
        let (Some(caller), Some(project), Some(action), Some(judged)) =
            (&x.caller, &x.project, x.action, &x.judged)
        else {
            return Err(GatewayError::Internal(
                "admitted before being judged".into(),
            ));
        };
        if let Err(refusal) =
            policy::authorize(config, &caller.team, &project.alias, action, &judged.facts)
        {
            self.metrics
                .policy_refusals
                .with_label_values(&[x.team_label(config), refusal.reason()])
                .inc();
            return Err(refusal.into());
        }
        // After policy (a caller learns nothing of keys it may not use),
        // before the rate limit (a replay costs no budget).
        if let Some(key) = &x.idempotency_key {
            let fingerprint = idempotency::fingerprint(
                x.surface.label(),
                action,
                &project.alias,
                judged.v2_body.as_ref(),
            );
            // Boxed, like the audit write below: only some requests take
            // this path, and an awaited future is stored twice in its
            // caller's (rust-lang/rust#62958), so every request's future
            // would carry (and copy) room for it.
            match Box::pin(self.claim_key(snap, &caller.team, action, key, &fingerprint)).await? {
                Some(Claim::First(ticket)) => x.idempotency_ticket = Some(ticket),
                Some(Claim::Replay(stored)) => return Ok(Admitted::Replay(stored)),
                None => {}
            }
        }

        let decision = snap.limiter.check(&caller.team, action).await;
        if let Some(round_trip) = decision.redis_round_trip {
            self.metrics
                .ratelimit_redis
                .observe(round_trip.as_secs_f64());
        }
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
            let deadline = config.server.request_timeout;
            let written = Box::pin(self.write_audit(record, Owed::No, deadline)).await;
            x.received_recorded = written.is_ok();
            if let Err(e) = written
                && config.audit.fail_closed
            {
                let why = match e {
                    crate::audit::AuditError::Backlog => {
                        "the audit webhook's receiver is behind (its unsent backlog is full)"
                    }
                    _ => "the audit sink is not writable",
                };
                return Err(GatewayError::AuditUnavailable(why.into()));
            }
        }
        Ok(Admitted::Proceed)
    }

    /// The idempotency decision for `key`: None when the Action is a read
    /// (the key means nothing there, and is not forwarded).
    async fn claim_key(
        &self,
        snap: &Snapshot,
        team: &str,
        action: Action,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<Claim>, GatewayError> {
        if !idempotency::creates(action) {
            if action.is_mutating() {
                return Err(GatewayError::IdempotencyKey(format!(
                    "{} does not create anything; the header is honoured on instance.create, keypair.create and instance.create_image",
                    action.name()
                )));
            }
            return Ok(None);
        }
        let redis = match (&snap.config.rate_limit.backend, snap.limiter.redis()) {
            (crate::config::Backend::Redis { key_prefix, .. }, Some(backend)) => {
                Some((backend, key_prefix.as_str()))
            }
            _ => None,
        };
        let hold = idempotency::running_hold(snap.config.server.request_timeout);
        match self
            .idempotency
            .claim(redis, team, key, fingerprint, hold)
            .await
        {
            Ok(claim) => Ok(Some(claim)),
            Err(Refused::InFlight) => Err(GatewayError::IdempotencyInFlight),
            Err(Refused::Mismatch) => Err(GatewayError::IdempotencyMismatch),
            Err(Refused::Unavailable) => Err(GatewayError::IdempotencyUnavailable),
        }
    }

    /// v2: sends exactly what was judged (the re-serialized body, the judged
    /// query) with the project's token, and passes the answer back with its
    /// links pointed at the gateway (`gateway_base`).
    async fn forward(
        &self,
        x: &mut Exchange,
        project: &Arc<Project>,
        action: Action,
        forward: &Forward,
        gateway_base: &str,
    ) -> Result<Answer, GatewayError> {
        let resp = self
            .compute
            .call(project, forward, action, &x.upstream_wait)
            .await?;
        x.upstream_status = Some(resp.status().as_u16());
        if action.is_mutating() && resp.status().is_success() && proxy::is_json(resp.headers()) {
            let location = resp.headers().get(http::header::LOCATION);
            let location = location.and_then(|l| l.to_str().ok());
            let value = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
            x.result = crate::audit::result_ids(action, &value, location);
        }
        Ok(Answer::V2(proxy::answer(
            resp,
            &project.tenant_id,
            gateway_base,
        )))
    }

    /// v1.0: runs the plan's v2 call(s) and answers the v1.0 shape.
    async fn translate(
        &self,
        x: &mut Exchange,
        project: &Arc<Project>,
        plan: &Plan,
    ) -> Result<Answer, GatewayError> {
        let api = ProjectApi {
            compute: &self.compute,
            flavors: &self.flavors,
            project,
            action: plan.action,
            learned: Default::default(),
            waited: &x.upstream_wait,
        };
        // Boxed: the plan's calls would add 13 KiB to every request's future.
        let payload = Box::pin(exec::execute(plan, &api)).await;
        let learned = api.learned();
        x.upstream_status = learned.status;
        x.result = learned.result;
        x.mutation_sent = learned.mutation_sent;
        Ok(Answer::V1(payload?))
    }

    /// After the answer is known and before it leaves: the "completed" audit
    /// record, the rate-limit headers, the metrics and one log line.
    async fn finish(
        &self,
        snap: &Snapshot,
        x: &mut Exchange,
        answer: Result<Answer, GatewayError>,
    ) -> Response {
        let config = &snap.config;
        // Nothing went upstream: the key is free for a retry.
        let not_performed =
            matches!(&answer, Err(e) if e.is_refusal() || e.never_sent() && !x.mutation_sent);
        let (mut resp, mut ending) = match answer {
            Ok(a) => {
                let resp = a.into_response();
                // A replay: judged by the status it gives again.
                let ending = Ending::upstream(x.upstream_status.unwrap_or(resp.status().as_u16()));
                (resp, ending)
            }
            Err(e) => (render_error(x.surface, &e), Ending::from(&e)),
        };
        // Refusals are always recorded, at least at metadata level.
        let level = x.audit_level(config);
        let level = if ending.refused {
            level.max(AuditLevel::Metadata)
        } else {
            level
        };
        if level != AuditLevel::None && self.audit.is_enabled() {
            // Boxed (see `admit`): reads are not audited by default.
            let owed = if x.received_recorded {
                Owed::Yes
            } else {
                Owed::No
            };
            let record = x.audit_record(Stage::Completed, level, Some(&ending));
            // A refusal's record may be held back (counted in the caller's
            // next one): refusals cost the refused nothing to send.
            let record = if ending.refused {
                self.refusals.admit(x.team().unwrap_or(NO_TEAM), record)
            } else {
                Some(record)
            };
            let written = match record {
                Some(record) => {
                    Box::pin(self.write_audit(record, owed, config.server.request_timeout))
                        .await
                        .is_ok()
                }
                // Held back: counted once a record carries it.
                None => false,
            };
            // A mutating Action is never answered as a success without its
            // completed record (it ran: say so, with what it produced).
            let succeeded = ending.outcome == Outcome::Ok;
            if !written
                && succeeded
                && x.action.is_some_and(|a| a.is_mutating())
                && config.audit.fail_closed
            {
                let e = GatewayError::AuditIncomplete {
                    upstream_status: x.upstream_status.unwrap_or(0),
                    result: x.result.clone(),
                };
                // The one place the action is recorded now: say so loudly.
                tracing::error!(
                    request_id = %x.request_id(),
                    team = x.team().unwrap_or("-"),
                    action = x.action_label(),
                    target = x.target.as_deref().unwrap_or("-"),
                    result = %x.result.as_ref().map(|r| r.to_string()).unwrap_or_default(),
                    "an action ran upstream but its completed audit record could not be written"
                );
                resp = render_error(x.surface, &e);
                ending = Ending::from(&e);
            }
        }
        if let Some(rate) = &x.rate {
            rate.apply_headers(resp.headers_mut());
        }
        let took = x.started.elapsed();
        crate::traces::finish_request(
            || {
                vec![
                    opentelemetry::KeyValue::new("toastgate.surface", x.surface.label()),
                    opentelemetry::KeyValue::new(
                        "toastgate.team",
                        x.team_label(config).to_string(),
                    ),
                    opentelemetry::KeyValue::new(
                        "toastgate.project",
                        x.project
                            .as_ref()
                            .map_or("-".to_string(), |p| p.alias.clone()),
                    ),
                    opentelemetry::KeyValue::new("toastgate.action", x.action_label()),
                    opentelemetry::KeyValue::new("toastgate.outcome", ending.outcome.label()),
                ]
            },
            resp.status().as_u16(),
            matches!(
                ending.outcome,
                Outcome::GatewayError | Outcome::UpstreamError
            ),
        );
        self.metrics.observe_request(&crate::metrics::Observed {
            team: x.team_label(config),
            surface: x.surface.label(),
            action: x.action,
            outcome: ending.outcome,
            status: resp.status().as_u16(),
            took,
            upstream: x.upstream_wait.get(),
        });
        x.log_line(&ending, resp.status().as_u16(), took);
        // Boxed (see `admit`): only requests with an idempotency key.
        match x.idempotency_ticket.take() {
            Some(ticket) if not_performed => {
                Box::pin(self.idempotency.release(ticket)).await;
                resp
            }
            Some(ticket) => {
                Box::pin(self.keep_answer(x.surface, ticket, resp, x.result.clone())).await
            }
            None => resp,
        }
    }

    /// Keeps the answer the caller gets for repeats of its key.
    async fn keep_answer(
        &self,
        surface: crate::exchange::Surface,
        ticket: crate::idempotency::Ticket,
        resp: Response,
        result: Option<Value>,
    ) -> Response {
        let (parts, body) = resp.into_parts();
        let bytes = match axum::body::to_bytes(body, usize::MAX).await {
            Ok(b) => b,
            Err(e) => {
                // The action may have run: the key is not freed (repeats
                // meet the running marker, 409, until it expires).
                tracing::warn!(error = %e, "idempotency: the answer could not be read to keep it");
                drop(ticket);
                return render_error(
                    surface,
                    &GatewayError::Internal("the answer could not be read".into()),
                );
            }
        };
        match crate::idempotency::Stored::new(parts.status.as_u16(), &parts.headers, &bytes, result)
        {
            Some(stored) => self.idempotency.complete(ticket, stored).await,
            None => {
                // Too large to keep: repeats meet the running marker (409)
                // until it expires, never a second run.
                tracing::warn!("idempotency: an answer too large to keep");
            }
        }
        Response::from_parts(parts, axum::body::Body::from(bytes))
    }

    /// Every request inside the gateway, on its connection or not
    /// (shutdown waits for them).
    pub fn requests(&self) -> &Requests {
        &self.requests
    }

    /// Writes the held-back refusal records of callers quiet for `quiet`
    /// (every caller's, with zero: at shutdown), each carrying the count of
    /// the others held back.
    pub async fn write_held_refusals(&self, quiet: std::time::Duration) {
        let deadline = self.snapshot().config.server.request_timeout;
        for record in self.refusals.drain(quiet) {
            let _ = Box::pin(self.write_audit(record, Owed::No, deadline)).await;
        }
    }

    /// Every second, the held-back refusal records of callers quiet for a
    /// second, until `stop`.
    pub async fn write_held_refusals_until(self: Arc<Self>, stop: crate::shutdown::Stop) {
        const EVERY: std::time::Duration = std::time::Duration::from_secs(1);
        while !stop.sleep(EVERY).await {
            self.write_held_refusals(EVERY).await;
        }
    }

    /// Writes one record, waiting at most `deadline` for the writer to
    /// confirm it: a hung disk must not hang the request (the "completed"
    /// record is written after the request's own deadline has been spent).
    async fn write_audit(
        &self,
        record: crate::audit::AuditRecord,
        owed: Owed,
        deadline: std::time::Duration,
    ) -> Result<(), crate::audit::AuditError> {
        // The refusals this record stands for besides itself: counted apart,
        // so that written and suppressed add up to every record made.
        if let Some(held_back) = record.suppressed {
            self.metrics
                .audit_records
                .with_label_values(&["suppressed"])
                .inc_by(held_back);
        }
        let result = tokio::time::timeout(deadline, self.audit.write(record, owed))
            .await
            .unwrap_or(Err(crate::audit::AuditError::NotConfirmed(deadline)));
        let label = if result.is_ok() { "written" } else { "failed" };
        self.metrics.audit_records.with_label_values(&[label]).inc();
        // The sink logs when it starts failing and when it recovers; one line
        // per record would repeat that for every request of an outage.
        if let Err(e) = &result {
            tracing::debug!(error = %e, "audit record could not be written");
        }
        result
    }
}

/// A request's future, polled where it is awaited (the connection's task,
/// no task spawned per request). Dropped before it is done (the caller hung
/// up), it goes on in a task of its own, as a spawned request did before:
/// outside a runtime it is dropped, and a runtime shutting down cancels the
/// new task at once (shutdown first waits for every request: [`Requests`]).
/// A panic ends it as `None`.
struct SeenThrough {
    request: Option<Pin<Box<dyn Future<Output = Response> + Send>>>,
    counted: Option<Counted>,
}

/// Every request inside the gateway, on its connection or, once its caller
/// hung up, in a task of its own: counted, so that shutdown waits for them
/// all. A connection's end is not its requests' end: an HTTP/2 stream's
/// request runs in a task of hyper's, one whose caller hung up in one of
/// ours, each to its `completed` audit record.
#[derive(Debug, Default)]
pub struct Requests {
    running: std::sync::atomic::AtomicUsize,
    /// Someone waits in [`Requests::all_finished`]: only then does the last
    /// request to end notify (no lock taken per request otherwise).
    waiting: std::sync::atomic::AtomicBool,
    finished: tokio::sync::Notify,
}

/// One request, counted until dropped: answered, finished in a task of its
/// own, or cancelled.
struct Counted(Arc<Requests>);

impl Requests {
    fn start(self: &Arc<Self>) -> Counted {
        self.running
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Counted(self.clone())
    }

    /// Resolves once no request is running.
    pub async fn all_finished(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.waiting.store(true, SeqCst);
        loop {
            // Made before the count is read: a last request ending in
            // between notifies it.
            let finished = self.finished.notified();
            if self.running.load(SeqCst) == 0 {
                return;
            }
            finished.await;
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.0.running.fetch_sub(1, SeqCst) == 1 && self.0.waiting.load(SeqCst) {
            self.0.finished.notify_waiters();
        }
    }
}

impl Future for SeenThrough {
    type Output = Option<Response>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Response>> {
        let Some(request) = self.request.as_mut() else {
            return Poll::Ready(None);
        };
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| request.as_mut().poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(resp)) => {
                self.request = None;
                Poll::Ready(Some(resp))
            }
            Err(_) => {
                self.request = None;
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for SeenThrough {
    fn drop(&mut self) {
        if let Some(request) = self.request.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // Still counted while it goes on.
            let counted = self.counted.take();
            runtime.spawn(async move {
                let _counted = counted;
                request.await
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Response {
        Response::new(Body::empty())
    }

    fn seen_through(
        request: Pin<Box<dyn Future<Output = Response> + Send>>,
        requests: &Arc<Requests>,
    ) -> SeenThrough {
        SeenThrough {
            request: Some(request),
            counted: Some(requests.start()),
        }
    }

    #[tokio::test]
    async fn a_request_is_answered_where_it_is_awaited_and_a_panic_is_none() {
        let requests = Arc::default();
        let answered = seen_through(Box::pin(async { ok() }), &requests).await;
        assert_eq!(answered.map(|r| r.status()), Some(http::StatusCode::OK));
        let panicked = seen_through(
            Box::pin(async {
                if std::hint::black_box(true) {
                    panic!("a bug");
                }
                ok()
            }),
            &requests,
        )
        .await;
        assert!(panicked.is_none());
    }

    /// Shutdown waits for every request, not only those whose caller hung
    /// up: an HTTP/2 stream's runs in hyper's task, which outlives its
    /// connection's.
    #[tokio::test]
    async fn every_request_is_counted_until_it_ends() {
        let requests: Arc<Requests> = Arc::default();
        assert!(futures_util::poll!(Box::pin(requests.all_finished())).is_ready());
        let (one, two) = (requests.start(), requests.start());
        let mut all_finished = Box::pin(requests.all_finished());
        assert!(futures_util::poll!(&mut all_finished).is_pending());
        drop(one);
        assert!(futures_util::poll!(&mut all_finished).is_pending());
        drop(two);
        tokio::time::timeout(std::time::Duration::from_secs(10), all_finished)
            .await
            .expect("told when the last one ended");
    }

    #[tokio::test]
    async fn a_request_dropped_half_way_goes_on_in_a_task_of_its_own() {
        let (go_on, wait) = tokio::sync::oneshot::channel::<()>();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let requests: Arc<Requests> = Arc::default();
        let mut request = seen_through(
            Box::pin(async move {
                let _ = wait.await;
                let _ = done.send(());
                ok()
            }),
            &requests,
        );
        // Polled once, then the caller goes away.
        let polled = futures_util::poll!(&mut request);
        assert!(polled.is_pending());
        drop(request);
        // Counted while it runs on its own: shutdown waits for it.
        let mut all_finished = Box::pin(requests.all_finished());
        assert!(futures_util::poll!(&mut all_finished).is_pending());
        go_on.send(()).expect("the request is still alive");
        tokio::time::timeout(std::time::Duration::from_secs(10), finished)
            .await
            .expect("the request finished")
            .expect("the request ran to its end");
        tokio::time::timeout(std::time::Duration::from_secs(10), all_finished)
            .await
            .expect("counted off once finished");
    }
}
