//! The token broker: one cloud token per project, obtained from either token
//! API of the spec, cached centrally and refreshed ahead of expiry.
//!
//! Behaviour, and why:
//! - The cache key is identity URL + tenant + user (never less), so a token
//!   is never reused for another user or another identity endpoint (for
//!   example after a reload that changes a project's credentials).
//! - A token's lifetime comes from the identity answer (`expires` minus
//!   `issued_at`, both from the server, so a skewed local clock does not
//!   matter), never from an assumed figure. It stops being handed out a small
//!   margin before it expires, so a request never leaves with a token that
//!   dies in flight.
//! - One slot per key holds the token, whether an identity call is in
//!   flight, and the last failure. There is only ever one identity call per
//!   key in flight, whoever started it (a request on a cold cache, the
//!   background refresher, a request after a 401): everybody else joins it.
//! - A request waits for identity only when no valid token exists and the
//!   last attempt did not fail (a cold start, or right after a 401). While
//!   identity is failing, requests are answered at once from the known
//!   failure (a prompt 503 + `Retry-After`) and at most one attempt runs in
//!   the background, never one timeout per request. Identity calls have their
//!   own deadline (`upstream.identity_timeout`).
//! - A background task per project refreshes at ~`refresh_at` of the lifetime
//!   (with jitter, so replicas do not refresh in lockstep) while the current
//!   token keeps serving; identity failures are retried with jittered backoff.
//!   It watches the slot, so a token replaced by anyone (say after a 401,
//!   with a shorter lifetime) moves its next refresh at once.
//! - An upstream 401 can arrive before `expires` (an API password change
//!   revokes tokens). [`TokenBroker::invalidate_if_current`] drops the token
//!   only if it is still the cached one — a late 401 for an old token never
//!   throws away a fresh one (keystoneauth's bug) — and the caller retries
//!   once; a second 401 is an error, never a loop (gophercloud's).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, Utc};
use rand::Rng;
use serde_json::json;
use tokio::sync::watch;

use super::{UpstreamClient, json_request};
use crate::config::{Credentials, Project, TokenPolicy, Upstream};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::shutdown::Stop;

pub use crate::config::TokenKey;

/// A cloud token as cached.
#[derive(Clone)]
pub struct UpstreamToken {
    pub id: Secret,
    /// `id` as the `X-Auth-Token` value every compute call sends, checked
    /// and marked sensitive once, when the token arrives.
    pub header: http::HeaderValue,
    /// Server-side expiry, for display.
    pub expires_at: DateTime<Utc>,
    /// Local instant after which this token is no longer handed out.
    pub usable_until: Instant,
    /// Local instant at which the background refresh starts.
    pub refresh_at: Instant,
}

impl std::fmt::Debug for UpstreamToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamToken")
            .field("id", &self.id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("identity service refused the project's credentials (HTTP {status})")]
    Rejected { status: u16 },
    #[error("identity service refused the project's credentials (resultCode {code})")]
    RejectedV1 { code: i64 },
    #[error("identity service unavailable: {0}")]
    Unavailable(String),
    #[error("identity service answered something unusable: {0}")]
    BadResponse(String),
}

impl IdentityError {
    /// Bounded label for metrics and `/readyz`.
    pub fn kind(&self) -> &'static str {
        match self {
            IdentityError::Rejected { .. } | IdentityError::RejectedV1 { .. } => "rejected",
            IdentityError::Unavailable(_) => "unavailable",
            IdentityError::BadResponse(_) => "bad_response",
        }
    }
}

/// Token state of one project, as shown by `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenStatus {
    pub project: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub refreshes: u64,
    pub failures: u64,
}

#[derive(Default, Clone)]
struct ProjectRecord {
    last_error: Option<String>,
    refreshes: u64,
    failures: u64,
}

/// What the broker knows about one key's token.
#[derive(Clone, Default)]
struct SlotState {
    token: Option<Arc<UpstreamToken>>,
    /// An identity call for this key is in flight.
    fetching: bool,
    /// The last attempt's failure; cleared by a success.
    failure: Option<Failure>,
    /// Failed attempts since the last success (for the backoff).
    failures_in_a_row: u32,
}

#[derive(Clone)]
struct Failure {
    error: IdentityError,
    /// No new attempt before this (jittered exponential backoff).
    retry_at: Instant,
}

impl SlotState {
    fn valid_token(&self, now: Instant) -> Option<&Arc<UpstreamToken>> {
        self.token.as_ref().filter(|t| now < t.usable_until)
    }
}

/// One key's state; every change is published, so waiters and the
/// refresher wake on it.
struct Slot {
    state: watch::Sender<SlotState>,
}

pub struct TokenBroker {
    /// foldhash: the keys are config strings, not attacker-chosen, and this
    /// map is read on every request.
    slots: RwLock<HashMap<TokenKey, Arc<Slot>, foldhash::fast::RandomState>>,
    client: UpstreamClient,
    upstream: Upstream,
    policy: TokenPolicy,
    records: Mutex<BTreeMap<String, ProjectRecord>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for TokenBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slots = self.slots.read().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("TokenBroker")
            .field("slots", &slots)
            .finish_non_exhaustive()
    }
}

impl TokenBroker {
    pub fn new(
        client: UpstreamClient,
        upstream: Upstream,
        policy: TokenPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        TokenBroker {
            slots: RwLock::new(HashMap::default()),
            client,
            upstream,
            policy,
            records: Mutex::new(BTreeMap::new()),
            metrics,
        }
    }

    fn slot(&self, project: &Project) -> Arc<Slot> {
        let key = &project.token_key;
        if let Some(slot) = self.slots.read().ok().and_then(|s| s.get(key).cloned()) {
            return slot;
        }
        let mut slots = match self.slots.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        slots
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    state: watch::Sender::new(SlotState::default()),
                })
            })
            .clone()
    }

    /// `project`'s token if it is valid at `now`, without waiting: the
    /// request path's usual case, `now` a clock reading it already has.
    /// Otherwise [`TokenBroker::current_token`] says what to do.
    pub fn valid_token_at(&self, project: &Project, now: Instant) -> Option<Arc<UpstreamToken>> {
        self.slot(project).state.borrow().valid_token(now).cloned()
    }

    /// The token to use for `project` now. Waits only when there is no
    /// valid token and nothing is known to be failing (then for the one
    /// identity call in flight); during an identity outage it answers the
    /// known failure at once.
    pub async fn current_token(
        self: &Arc<Self>,
        project: &Arc<Project>,
    ) -> Result<Arc<UpstreamToken>, IdentityError> {
        let slot = self.slot(project);
        let mut seen = slot.state.subscribe();
        let mut waited = false;
        loop {
            let now = Instant::now();
            {
                let state = seen.borrow_and_update();
                if let Some(token) = state.valid_token(now) {
                    return Ok(token.clone());
                }
                if let Some(failure) = &state.failure {
                    // Known to be failing: answer now; keep at most one
                    // attempt going in the background, paced by the backoff.
                    let (error, due) = (failure.error.clone(), failure.retry_at);
                    drop(state);
                    if now >= due {
                        self.start_fetch(&slot, project);
                    }
                    return Err(error);
                }
            }
            self.start_fetch(&slot, project);
            if !waited {
                waited = true;
                self.metrics
                    .token_waits
                    .with_label_values(&[&project.alias])
                    .inc();
            }
            // The fetch has its own deadline and always publishes its end;
            // the bound here only guards against a lost wake-up.
            let bound = self.upstream.identity_timeout + Duration::from_secs(1);
            match tokio::time::timeout(bound, seen.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => {
                    return Err(IdentityError::Unavailable(
                        "no answer from the identity service in time".into(),
                    ));
                }
            }
        }
    }

    /// Starts the identity call for `project` unless one is in flight.
    fn start_fetch(self: &Arc<Self>, slot: &Arc<Slot>, project: &Arc<Project>) {
        let started = slot.state.send_if_modified(|s| {
            if s.fetching {
                false
            } else {
                s.fetching = true;
                true
            }
        });
        if !started {
            return;
        }
        let broker = self.clone();
        let slot = slot.clone();
        let project = project.clone();
        // The identity call's span is a child of the request that started
        // the fetch (none when the refresher did).
        let trace = opentelemetry::Context::current();
        let fetch = async move {
            // Should this task end without publishing (a panic), the slot
            // must not stay "in flight" for ever.
            let guard = FetchGuard {
                slot: slot.clone(),
                retry_after: broker.policy.retry_min_backoff,
                armed: true,
            };
            let deadline = broker.upstream.identity_timeout;
            let result = match tokio::time::timeout(deadline, broker.fetch(&project)).await {
                Ok(r) => r,
                Err(_) => {
                    let e = IdentityError::Unavailable(format!(
                        "no answer within {deadline:?} (upstream.identity_timeout)"
                    ));
                    broker.record(&project, &Err(e.clone()));
                    Err(e)
                }
            };
            let mut guard = guard;
            guard.armed = false;
            slot.state.send_modify(|s| {
                s.fetching = false;
                match result {
                    Ok(token) => {
                        s.token = Some(token);
                        s.failure = None;
                        s.failures_in_a_row = 0;
                    }
                    Err(error) => {
                        s.failures_in_a_row = s.failures_in_a_row.saturating_add(1);
                        let unit = rand::rng().random_range(0.0..=1.0);
                        let delay = backoff_delay(&broker.policy, s.failures_in_a_row, unit);
                        s.failure = Some(Failure {
                            error,
                            retry_at: Instant::now() + delay,
                        });
                    }
                }
            });
        };
        tokio::spawn(opentelemetry::context::FutureExt::with_context(
            fetch, trace,
        ));
    }

    /// Drops `failed` if it is still the cached token for `project`. Returns
    /// whether it was dropped.
    pub fn invalidate_if_current(&self, project: &Project, failed: &UpstreamToken) -> bool {
        let slot = self.slot(project);
        let dropped = slot.state.send_if_modified(|s| {
            if s.token.as_ref().is_some_and(|t| t.id == failed.id) {
                s.token = None;
                true
            } else {
                false
            }
        });
        if dropped {
            tracing::warn!(project = %project.alias, "upstream refused the cached token before its expiry; dropped it");
        }
        dropped
    }

    /// The token state of `project`, from what is known now (no identity call).
    pub fn status(&self, project: &Project) -> TokenStatus {
        let rec = self
            .records
            .lock()
            .map(|r| r.get(&project.alias).cloned().unwrap_or_default())
            .unwrap_or_default();
        let slot = self.slot(project);
        let state = slot.state.borrow();
        let valid = state.valid_token(Instant::now());
        TokenStatus {
            project: project.alias.clone(),
            state: if valid.is_some() { "valid" } else { "absent" },
            expires_at: valid.map(|t| t.expires_at.to_rfc3339()),
            last_error: rec.last_error,
            refreshes: rec.refreshes,
            failures: rec.failures,
        }
    }

    /// Keeps `project`'s token fresh until `stop` resolves. It sleeps until
    /// the next attempt is due (the token's refresh point; after a failure,
    /// the backoff) and wakes early whenever the slot changes, so a token
    /// replaced by a request (after a 401) reschedules it at once.
    pub async fn refresh_loop(self: Arc<Self>, project: Arc<Project>, stop: Stop) {
        let slot = self.slot(&project);
        let mut seen = slot.state.subscribe();
        loop {
            let due = {
                let state = seen.borrow_and_update();
                next_attempt(&state, Instant::now())
            };
            let sleep = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.stopped() => return,
                changed = seen.changed() => if changed.is_err() { return },
                _ = sleep => self.start_fetch(&slot, &project),
            }
        }
    }

    /// One identity call for `project`.
    async fn fetch(&self, project: &Project) -> Result<Arc<UpstreamToken>, IdentityError> {
        let result = match &project.credentials {
            Credentials::Keystone { username, password } => {
                self.fetch_keystone(project, username, password).await
            }
            Credentials::Appkey {
                appkey,
                access_key_id,
                secret_access_key,
            } => {
                self.fetch_appkey(appkey, access_key_id, secret_access_key)
                    .await
            }
        };
        self.record(project, &result);
        match &result {
            Ok(t) => {
                tracing::info!(project = %project.alias, expires_at = %t.expires_at, "obtained upstream token")
            }
            Err(e) => tracing::warn!(project = %project.alias, error = %e, "identity call failed"),
        }
        result.map(Arc::new)
    }

    fn record(&self, project: &Project, result: &Result<UpstreamToken, IdentityError>) {
        let alias = project.alias.as_str();
        match result {
            Ok(t) => {
                self.metrics
                    .token_refreshes
                    .with_label_values(&[alias, "success"])
                    .inc();
                self.metrics
                    .token_expiry
                    .with_label_values(&[alias])
                    .set(t.expires_at.timestamp());
            }
            Err(e) => {
                self.metrics
                    .token_refreshes
                    .with_label_values(&[alias, "failure"])
                    .inc();
                self.metrics
                    .identity_errors
                    .with_label_values(&[alias, e.kind()])
                    .inc();
            }
        }
        if let Ok(mut records) = self.records.lock() {
            let rec = records.entry(project.alias.clone()).or_default();
            match result {
                Ok(_) => {
                    rec.refreshes += 1;
                    rec.last_error = None;
                }
                Err(e) => {
                    rec.failures += 1;
                    rec.last_error = Some(e.to_string());
                }
            }
        }
    }

    async fn fetch_keystone(
        &self,
        project: &Project,
        username: &str,
        password: &Secret,
    ) -> Result<UpstreamToken, IdentityError> {
        let url = format!("{}/v2.0/tokens", self.upstream.identity_url);
        let body = json!({"auth": {
            "tenantId": project.tenant_id,
            "passwordCredentials": {"username": username, "password": password.expose()},
        }});
        let sent = Instant::now();
        let (status, value) = self.identity_post(&url, &body).await?;
        if status != 200 {
            return Err(if status == 401 || status == 403 || status == 400 {
                IdentityError::Rejected { status }
            } else {
                IdentityError::Unavailable(format!("HTTP {status}"))
            });
        }
        token_from_access(&self.policy, &value, sent)
    }

    async fn fetch_appkey(
        &self,
        appkey: &str,
        access_key_id: &str,
        secret: &Secret,
    ) -> Result<UpstreamToken, IdentityError> {
        let base = self.upstream.compute_v1_url.as_deref().unwrap_or_default();
        let url = format!("{base}/v1.0/appkeys/{appkey}/tokens");
        let body = json!({"auth": {"username": access_key_id, "password": secret.expose()}});
        let sent = Instant::now();
        let (status, value) = self.identity_post(&url, &body).await?;
        if status != 200 {
            return Err(IdentityError::Unavailable(format!("HTTP {status}")));
        }
        let header = &value["header"];
        if header["isSuccessful"] != serde_json::Value::Bool(true) {
            let code = header["resultCode"].as_i64().unwrap_or(-1);
            // 5xx-family result codes are the service's own trouble, not ours.
            return Err(if (50500..50600).contains(&code) {
                IdentityError::Unavailable(format!("resultCode {code}"))
            } else {
                IdentityError::RejectedV1 { code }
            });
        }
        token_from_access(&self.policy, &value, sent)
    }

    async fn identity_post(
        &self,
        url: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value), IdentityError> {
        let mut req = json_request(http::Method::POST, url, body)
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        let span = crate::traces::CallSpan::start(|| ("identity token".into(), Vec::new()));
        span.inject(req.headers_mut());
        let resp = match self
            .client
            .send_buffered(req, 1024 * 1024, self.upstream.identity_timeout)
            .await
        {
            Ok(resp) => resp,
            Err(e) => {
                span.end(Err(e.kind()));
                return Err(IdentityError::Unavailable(e.to_string()));
            }
        };
        let status = resp.status().as_u16();
        span.end(Ok(status));
        let value = serde_json::from_slice(resp.body()).unwrap_or(serde_json::Value::Null);
        Ok((status, value))
    }
}

/// Builds a token from `{"access":{"token":{"id","expires","issued_at"}}}`,
/// the shape both token APIs share. Its life is counted from when the
/// identity call was `sent`, not from when the answer came: the token may
/// have been issued any time in between, and a slow answer must not
/// stretch it past its real end.
fn token_from_access(
    policy: &TokenPolicy,
    value: &serde_json::Value,
    sent: Instant,
) -> Result<UpstreamToken, IdentityError> {
    let token = &value["access"]["token"];
    let id = token["id"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| IdentityError::BadResponse("no access.token.id".into()))?;
    let expires = token["expires"]
        .as_str()
        .and_then(parse_identity_time)
        .ok_or_else(|| IdentityError::BadResponse("no parseable access.token.expires".into()))?;
    let mut header = http::HeaderValue::from_str(id).map_err(|_| {
        IdentityError::BadResponse("access.token.id is not a valid header value".into())
    })?;
    header.set_sensitive(true);
    let issued = token["issued_at"].as_str().and_then(parse_identity_time);
    let lifetime = lifetime(issued, expires, Utc::now())
        .ok_or_else(|| IdentityError::BadResponse("token already expired when issued".into()))?;
    let usable_for = lifetime.saturating_sub(expiry_margin(lifetime));
    // Never at or past the end of the usable window (a short token with
    // a late `refresh_at` would otherwise make callers wait).
    let refresh_after = refresh_after(lifetime, policy, rand::rng().random_range(-1.0..=1.0))
        .min(usable_for.mul_f64(0.9));
    Ok(UpstreamToken {
        id: Secret::new(id),
        header,
        expires_at: expires,
        usable_until: sent + usable_for,
        refresh_at: sent + refresh_after,
    })
}

/// How long a token lives, by the server's own clock when it says when the
/// token was issued; by ours otherwise.
fn lifetime(
    issued: Option<DateTime<Utc>>,
    expires: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<Duration> {
    let start = issued.unwrap_or(now);
    (expires - start).to_std().ok().filter(|d| !d.is_zero())
}

/// A token is not handed out during the last part of its life, so that a
/// request never leaves with a token that expires in flight.
fn expiry_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(30))
}

/// When to refresh: `refresh_at` of the lifetime, moved by up to
/// `refresh_jitter` of it (`unit` in -1..=1).
fn refresh_after(lifetime: Duration, policy: &TokenPolicy, unit: f64) -> Duration {
    let fraction = (policy.refresh_at + policy.refresh_jitter * unit).clamp(0.05, 0.95);
    lifetime.mul_f64(fraction)
}

/// Parses the identity services' timestamps: `2017-05-16T03:17:50Z`,
/// `2017-05-16T02:17:50.166563` (no zone: UTC) and RFC 3339 with an offset.
pub fn parse_identity_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    let trimmed = s.trim_end_matches('Z');
    NaiveDateTime::parse_from_str(trimmed, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|n| n.and_utc())
}

/// Publishes the end of an identity call that ended without publishing it.
struct FetchGuard {
    slot: Arc<Slot>,
    retry_after: Duration,
    armed: bool,
}

impl Drop for FetchGuard {
    fn drop(&mut self) {
        if self.armed {
            let retry_at = Instant::now() + self.retry_after;
            self.slot.state.send_modify(|s| {
                s.fetching = false;
                s.failures_in_a_row = s.failures_in_a_row.saturating_add(1);
                s.failure = Some(Failure {
                    error: IdentityError::Unavailable(
                        "the identity call failed unexpectedly".into(),
                    ),
                    retry_at,
                });
            });
        }
    }
}

/// Jittered exponential backoff ("equal jitter": half fixed, half random)
/// after `failures` failed attempts in a row (1 or more).
fn backoff_delay(policy: &TokenPolicy, failures: u32, unit: f64) -> Duration {
    let exp = policy
        .retry_min_backoff
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(policy.retry_max_backoff);
    let half = exp / 2;
    half + half.mul_f64(unit.clamp(0.0, 1.0))
}

/// When the background refresher should next call identity, from what the
/// slot knows: never while a call is in flight; after a failure, when its
/// backoff ends; otherwise at the token's refresh point, or now when there is
/// no usable token.
fn next_attempt(state: &SlotState, now: Instant) -> Option<Instant> {
    if state.fetching {
        return None;
    }
    if let Some(f) = &state.failure {
        return Some(f.retry_at);
    }
    match state.valid_token(now) {
        Some(token) => Some(token.refresh_at),
        None => Some(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> TokenPolicy {
        TokenPolicy {
            refresh_at: 0.8,
            refresh_jitter: 0.05,
            retry_min_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_token_is_kept_with_its_header_value_and_an_unsendable_one_is_refused() {
        let access = |id: &str| {
            json!({"access": {"token": {
                "id": id,
                "issued_at": "2017-05-16T02:17:50Z",
                "expires": "2017-05-16T03:17:50Z",
            }}})
        };
        let token =
            token_from_access(&policy(), &access("f94a9f1ac6a2418c"), Instant::now()).unwrap();
        assert_eq!(token.header, "f94a9f1ac6a2418c");
        assert!(token.header.is_sensitive(), "never shown by Debug");
        assert_eq!(token.id.expose(), "f94a9f1ac6a2418c");
        for id in ["zq9\nzq9", "zq9\u{7f}zq9", ""] {
            match token_from_access(&policy(), &access(id), Instant::now()) {
                Err(IdentityError::BadResponse(why)) => {
                    assert!(!why.contains("zq9"), "the token is not echoed: {why}")
                }
                other => panic!("{id:?}: {other:?}"),
            }
        }
    }

    /// A one-hour token whose answer took 20 s is usable until 30 s before
    /// an hour after the call was sent (the margin), not after it answered.
    #[test]
    fn a_token_lives_from_when_its_identity_call_was_sent() {
        let answer = json!({"access": {"token": {
            "id": "f94a9f1ac6a2418c",
            "issued_at": "2017-05-16T02:17:50Z",
            "expires": "2017-05-16T03:17:50Z",
        }}});
        let sent = Instant::now() - Duration::from_secs(20);
        let token = token_from_access(&policy(), &answer, sent).unwrap();
        assert_eq!(token.usable_until, sent + Duration::from_secs(3570));
        assert!(token.refresh_at >= sent + Duration::from_secs(2700));
        assert!(token.refresh_at <= sent + Duration::from_secs(3060));
    }

    #[test]
    fn parses_both_identity_time_formats() {
        let a = parse_identity_time("2017-05-16T03:17:50Z").unwrap();
        let b = parse_identity_time("2017-05-16T02:17:50.166563").unwrap();
        assert_eq!(a.to_rfc3339(), "2017-05-16T03:17:50+00:00");
        assert_eq!((a - b).num_milliseconds(), 3_599_833);
        assert!(parse_identity_time("yesterday").is_none());
    }

    #[test]
    fn lifetime_uses_server_clock_when_issued_at_is_given() {
        let issued = parse_identity_time("2017-05-16T02:17:50Z");
        let expires = parse_identity_time("2017-05-16T03:17:50Z").unwrap();
        // Our clock is years ahead; the server's own figures still give 1h.
        assert_eq!(
            lifetime(issued, expires, Utc::now()),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            lifetime(None, expires, Utc::now()),
            None,
            "expired by our clock"
        );
    }

    #[test]
    fn refresh_point_is_within_the_jitter_band() {
        let l = Duration::from_secs(3600);
        assert_eq!(refresh_after(l, &policy(), 0.0), Duration::from_secs(2880));
        assert_eq!(refresh_after(l, &policy(), -1.0), Duration::from_secs(2700));
        assert_eq!(refresh_after(l, &policy(), 1.0), Duration::from_secs(3060));
        assert!(refresh_after(l, &policy(), 1.0) < l - expiry_margin(l));
    }

    #[test]
    fn margin_is_bounded() {
        assert_eq!(
            expiry_margin(Duration::from_secs(3600)),
            Duration::from_secs(30)
        );
        assert_eq!(
            expiry_margin(Duration::from_secs(10)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = policy();
        assert_eq!(backoff_delay(&p, 1, 0.0), Duration::from_millis(50));
        assert_eq!(backoff_delay(&p, 1, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(&p, 3, 1.0), Duration::from_millis(400));
        assert_eq!(backoff_delay(&p, 8, 0.0), Duration::from_secs(1));
        assert_eq!(backoff_delay(&p, 40, 1.0), Duration::from_secs(2));
    }

    fn token(now: Instant, refresh_in: u64, usable_for: u64) -> Arc<UpstreamToken> {
        Arc::new(UpstreamToken {
            id: Secret::new("t"),
            header: http::HeaderValue::from_static("t"),
            expires_at: Utc::now(),
            usable_until: now + Duration::from_secs(usable_for),
            refresh_at: now + Duration::from_secs(refresh_in),
        })
    }

    #[test]
    fn the_refresher_follows_the_slot() {
        let now = Instant::now();
        let empty = SlotState::default();
        assert_eq!(next_attempt(&empty, now), Some(now), "no token: now");
        let fresh = SlotState {
            token: Some(token(now, 80, 90)),
            ..SlotState::default()
        };
        assert_eq!(
            next_attempt(&fresh, now),
            Some(now + Duration::from_secs(80)),
            "a valid token: at its refresh point"
        );
        let replaced = SlotState {
            token: Some(token(now, 8, 9)),
            ..fresh.clone()
        };
        assert_eq!(
            next_attempt(&replaced, now),
            Some(now + Duration::from_secs(8)),
            "a replaced token moves the refresh point"
        );
        let in_flight = SlotState {
            fetching: true,
            ..SlotState::default()
        };
        assert_eq!(next_attempt(&in_flight, now), None, "one call at a time");
        let failing = SlotState {
            token: Some(token(now, 0, 5)),
            failure: Some(Failure {
                error: IdentityError::Unavailable("down".into()),
                retry_at: now + Duration::from_secs(2),
            }),
            failures_in_a_row: 1,
            ..SlotState::default()
        };
        assert_eq!(
            next_attempt(&failing, now),
            Some(now + Duration::from_secs(2)),
            "after a failure: the backoff"
        );
    }
}
