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
//! - Cold cache: any number of concurrent requests cause exactly one identity
//!   call (moka's `try_get_with` is single-flight per key).
//! - A background task per project refreshes at ~`refresh_at` of the lifetime
//!   (with jitter, so replicas do not refresh in lockstep) while the current
//!   token keeps serving; identity failures are retried with jittered backoff
//!   until the current token runs out.
//! - An upstream 401 can arrive before `expires` (an API password change
//!   revokes tokens). [`TokenBroker::invalidate_if_current`] drops the token
//!   only if it is still the cached one — a late 401 for an old token never
//!   throws away a fresh one (keystoneauth's bug) — and the caller retries
//!   once; a second 401 is an error, never a loop (gophercloud's).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, Utc};
use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;
use rand::Rng;
use serde_json::json;

use super::{UpstreamClient, UpstreamError, json_request};
use crate::config::{Credentials, Project, TokenPolicy, Upstream};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::shutdown::Stop;

/// What identifies a token: where it came from and for whom.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenKey {
    pub identity_url: String,
    pub tenant_id: String,
    pub user: String,
}

/// A cloud token as cached.
#[derive(Clone)]
pub struct UpstreamToken {
    pub id: Secret,
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

struct TokenExpiry;

impl Expiry<TokenKey, Arc<UpstreamToken>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        value: &Arc<UpstreamToken>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.usable_until.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &TokenKey,
        value: &Arc<UpstreamToken>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.usable_until.saturating_duration_since(updated_at))
    }
}

pub struct TokenBroker {
    cache: Cache<TokenKey, Arc<UpstreamToken>>,
    client: UpstreamClient,
    upstream: Upstream,
    policy: TokenPolicy,
    identity_calls: AtomicU64,
    records: Mutex<BTreeMap<String, ProjectRecord>>,
    /// The last identity failure per key, answered again for a short while
    /// so that, once a token has expired during an outage, each wave of
    /// requests does not cause another identity call.
    recent_failures: Mutex<HashMap<TokenKey, (Instant, IdentityError)>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for TokenBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBroker")
            .field("tokens", &self.cache.entry_count())
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
            cache: Cache::builder()
                .max_capacity(10_000)
                .expire_after(TokenExpiry)
                .build(),
            client,
            upstream,
            policy,
            identity_calls: AtomicU64::new(0),
            records: Mutex::new(BTreeMap::new()),
            recent_failures: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn key_for(&self, project: &Project) -> TokenKey {
        match &project.credentials {
            Credentials::Keystone { username, .. } => TokenKey {
                identity_url: self.upstream.identity_url.clone(),
                tenant_id: project.tenant_id.clone(),
                user: username.clone(),
            },
            Credentials::Appkey {
                appkey,
                access_key_id,
                ..
            } => TokenKey {
                identity_url: format!(
                    "{}/v1.0/appkeys/{appkey}",
                    self.upstream.compute_v1_url.as_deref().unwrap_or_default()
                ),
                tenant_id: project.tenant_id.clone(),
                user: access_key_id.clone(),
            },
        }
    }

    /// Identity calls made so far (both token APIs).
    pub fn identity_calls(&self) -> u64 {
        self.identity_calls.load(Ordering::Relaxed)
    }

    /// The token to use for `project` now: cached, or fetched once for all
    /// concurrent callers.
    pub async fn current_token(
        &self,
        project: &Project,
    ) -> Result<Arc<UpstreamToken>, IdentityError> {
        let key = self.key_for(project);
        if let Some(token) = self.cache.get(&key).await {
            return Ok(token);
        }
        if let Ok(failures) = self.recent_failures.lock()
            && let Some((until, e)) = failures.get(&key)
            && Instant::now() < *until
        {
            return Err(e.clone());
        }
        let result = self
            .cache
            .try_get_with(key.clone(), self.fetch(project))
            .await;
        match result {
            Ok(token) => Ok(token),
            Err(e) => {
                let e = (*e).clone();
                if let Ok(mut failures) = self.recent_failures.lock() {
                    failures.insert(
                        key,
                        (Instant::now() + self.policy.retry_min_backoff, e.clone()),
                    );
                }
                Err(e)
            }
        }
    }

    /// Drops `failed` if it is still the cached token for `project`. Returns
    /// whether it was dropped.
    pub async fn invalidate_if_current(&self, project: &Project, failed: &UpstreamToken) -> bool {
        let key = self.key_for(project);
        let failed_id = failed.id.clone();
        let result = self
            .cache
            .entry(key)
            .and_compute_with(|entry| async move {
                match entry {
                    Some(e) if e.value().id == failed_id => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
        let dropped = matches!(result, moka::ops::compute::CompResult::Removed(_));
        if dropped {
            tracing::warn!(project = %project.alias, "upstream refused the cached token before its expiry; dropped it");
        }
        dropped
    }

    /// The token currently cached for `project`, without fetching.
    pub async fn cached(&self, project: &Project) -> Option<Arc<UpstreamToken>> {
        self.cache.get(&self.key_for(project)).await
    }

    pub fn status(&self, project: &Project, cached: Option<&UpstreamToken>) -> TokenStatus {
        let rec = self
            .records
            .lock()
            .map(|r| r.get(&project.alias).cloned().unwrap_or_default())
            .unwrap_or_default();
        let valid = cached.filter(|t| t.usable_until > Instant::now());
        TokenStatus {
            project: project.alias.clone(),
            state: if valid.is_some() { "valid" } else { "absent" },
            expires_at: valid.map(|t| t.expires_at.to_rfc3339()),
            last_error: rec.last_error,
            refreshes: rec.refreshes,
            failures: rec.failures,
        }
    }

    /// Keeps `project`'s token fresh until `stop` resolves: waits for the
    /// refresh point of the current token, then replaces it, retrying with
    /// backoff while it is still usable.
    pub async fn refresh_loop(self: Arc<Self>, project: Arc<Project>, stop: Stop) {
        let mut backoff = Backoff::new(&self.policy);
        loop {
            let current = match self.current_token(&project).await {
                Ok(t) => {
                    backoff.reset();
                    t
                }
                Err(_) => {
                    if stop.sleep(backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            };
            let wait = current.refresh_at.saturating_duration_since(Instant::now());
            if stop.sleep(wait).await {
                return;
            }
            // A 401 may already have replaced the token; then start over
            // from the new one instead of refreshing early.
            match self.cached(&project).await {
                Some(now_cached) if now_cached.id == current.id => {}
                _ => continue,
            }
            loop {
                match self.fetch(&project).await {
                    Ok(fresh) => {
                        self.cache.insert(self.key_for(&project), fresh).await;
                        backoff.reset();
                        break;
                    }
                    Err(_) if Instant::now() < current.usable_until => {
                        if stop.sleep(backoff.next_delay()).await {
                            return;
                        }
                    }
                    // Expired without a replacement: fall back to the cold
                    // path, which requests share (single-flight).
                    Err(_) => break,
                }
            }
        }
    }

    /// One identity call for `project`.
    async fn fetch(&self, project: &Project) -> Result<Arc<UpstreamToken>, IdentityError> {
        self.identity_calls.fetch_add(1, Ordering::Relaxed);
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
        let (status, value) = self.identity_post(&url, &body).await?;
        if status != 200 {
            return Err(if status == 401 || status == 403 || status == 400 {
                IdentityError::Rejected { status }
            } else {
                IdentityError::Unavailable(format!("HTTP {status}"))
            });
        }
        self.token_from_access(&value)
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
        self.token_from_access(&value)
    }

    async fn identity_post(
        &self,
        url: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value), IdentityError> {
        let req = json_request(http::Method::POST, url, body)
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        let resp = self
            .client
            .send_buffered(req, 1024 * 1024)
            .await
            .map_err(|e: UpstreamError| IdentityError::Unavailable(e.to_string()))?;
        let status = resp.status().as_u16();
        let value = serde_json::from_slice(resp.body()).unwrap_or(serde_json::Value::Null);
        Ok((status, value))
    }

    /// Builds a token from `{"access":{"token":{"id","expires","issued_at"}}}`,
    /// the shape both token APIs share.
    fn token_from_access(&self, value: &serde_json::Value) -> Result<UpstreamToken, IdentityError> {
        let token = &value["access"]["token"];
        let id = token["id"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| IdentityError::BadResponse("no access.token.id".into()))?;
        let expires = token["expires"]
            .as_str()
            .and_then(parse_identity_time)
            .ok_or_else(|| {
                IdentityError::BadResponse("no parseable access.token.expires".into())
            })?;
        let issued = token["issued_at"].as_str().and_then(parse_identity_time);
        let received = Instant::now();
        let lifetime = lifetime(issued, expires, Utc::now()).ok_or_else(|| {
            IdentityError::BadResponse("token already expired when issued".into())
        })?;
        let margin = expiry_margin(lifetime);
        let refresh_after =
            refresh_after(lifetime, &self.policy, rand::rng().random_range(-1.0..=1.0));
        Ok(UpstreamToken {
            id: Secret::new(id),
            expires_at: expires,
            usable_until: received + lifetime.saturating_sub(margin),
            refresh_at: received + refresh_after,
        })
    }
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

/// Jittered exponential backoff ("equal jitter": half fixed, half random).
struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(policy: &TokenPolicy) -> Self {
        Backoff {
            min: policy.retry_min_backoff,
            max: policy.retry_max_backoff,
            attempt: 0,
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_delay(&mut self) -> Duration {
        let exp = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = exp / 2;
        half + half.mul_f64(rand::rng().random_range(0.0..=1.0))
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
        let mut b = Backoff::new(&policy());
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[7] >= Duration::from_secs(1) && d[7] <= Duration::from_secs(2));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
