//! Keys from a JWKS URL: fetched lazily, cached for `cache_ttl`, refetched
//! on an unknown `kid` at most once per `min_refetch_interval`, one fetch in
//! flight at a time, refreshed in the background once stale; the last good
//! set keeps serving while the identity provider is unreachable.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::Full;
use jsonwebtoken::Algorithm;

use super::keys::{KeySet, parse_jwks};
use super::{AuthError, AuthSetupError};
use crate::upstream::{ClientSettings, UpstreamClient};

/// Whole-fetch deadline for the JWKS URL (connect, TLS, headers and body).
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document we accept.
const JWKS_MAX_BYTES: usize = 1024 * 1024;
/// Sentinel for "never attempted" in [`RemoteJwks::last_attempt_ms`].
const NEVER: u64 = u64::MAX;

pub(super) struct RemoteJwks {
    uri: http::Uri,
    /// The URL without credentials, for logs.
    shown_url: String,
    cache_ttl: Duration,
    min_refetch_ms: u64,
    algorithms: Vec<Algorithm>,
    client: UpstreamClient,
    epoch: Instant,
    /// The last good key set, swapped atomically: no lock on the request path.
    current: ArcSwapOption<KeySet>,
    /// Completed fetch attempts (good or failed): lets waiters see that the
    /// fetch they queued behind already happened.
    generation: AtomicU64,
    /// Start of the last fetch attempt, in ms since `epoch` ([`NEVER`] if none).
    last_attempt_ms: AtomicU64,
    /// Single-flight: held by the one task fetching.
    flight: tokio::sync::Mutex<()>,
}

impl RemoteJwks {
    pub(super) fn new(
        url: &str,
        cache_ttl: Duration,
        min_refetch_interval: Duration,
        algorithms: &[Algorithm],
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, AuthSetupError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| AuthSetupError::JwksUrl("is not a valid URL"))?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s,
            _ => return Err(AuthSetupError::JwksUrl("must be an http or https URL")),
        };
        let Some(authority) = uri.authority() else {
            return Err(AuthSetupError::JwksUrl("must name a host"));
        };
        if authority.as_str().contains('@') {
            return Err(AuthSetupError::JwksUrl("must not embed credentials"));
        }
        let shown_url = format!("{scheme}://{authority}{}", uri.path());
        if scheme == "http" && !is_loopback(authority.host()) {
            tracing::warn!(
                url = %shown_url,
                "the JWKS URL is plain http: anyone on the path can substitute signing keys"
            );
        }
        // The one HTTPS client builder (the same roots as every upstream
        // call, `upstream.ca_file` included). Fetches are minutes apart: no
        // connection pooling, so a restarted IdP never meets a stale pooled
        // connection.
        let client = UpstreamClient::new(&ClientSettings {
            ca_file,
            connect_timeout: JWKS_FETCH_TIMEOUT,
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle_per_host: 0,
        })
        .map_err(|e| AuthSetupError::HttpClient(e.to_string()))?;
        Ok(RemoteJwks {
            uri,
            shown_url,
            cache_ttl,
            min_refetch_ms: u64::try_from(min_refetch_interval.as_millis()).unwrap_or(u64::MAX),
            algorithms: algorithms.to_vec(),
            client,
            epoch: Instant::now(),
            current: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            last_attempt_ms: AtomicU64::new(NEVER),
            flight: tokio::sync::Mutex::new(()),
        })
    }

    fn state(&self) -> (u64, Option<Arc<KeySet>>) {
        let generation = self.generation.load(Ordering::Acquire);
        // Generation first: a reader that sees generation N also sees the
        // set stored before N was published.
        (generation, self.current.load_full())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Whether the rate limit allows a fetch now.
    fn may_fetch(&self) -> bool {
        let last = self.last_attempt_ms.load(Ordering::Acquire);
        last == NEVER || self.now_ms().saturating_sub(last) >= self.min_refetch_ms
    }

    /// The key set to verify a token naming `kid` with.
    pub(super) async fn key_set_for(
        self: &Arc<Self>,
        kid: Option<&str>,
    ) -> Result<Arc<KeySet>, AuthError> {
        let (generation, current) = self.state();
        let Some(set) = current else {
            return self
                .refresh(generation)
                .await
                .ok_or(AuthError::KeysUnavailable);
        };
        if let Some(kid) = kid
            && !set.has_kid(kid)
        {
            // Maybe the IdP rotated keys: refetch (rate-limited, single-flight).
            return Ok(self.refresh(generation).await.unwrap_or(set));
        }
        if set.fetched_at.elapsed() >= self.cache_ttl {
            // Serve the cached set now; refresh it off the request path.
            self.refresh_in_background(generation);
        }
        Ok(set)
    }

    /// Fetches unless another fetch completed since `seen` or the rate limit
    /// forbids it, then returns the current set. The fetch runs in its own
    /// task so that a cancelled request cannot abandon it half-way.
    async fn refresh(self: &Arc<Self>, seen: u64) -> Option<Arc<KeySet>> {
        if self.generation.load(Ordering::Acquire) == seen && self.may_fetch() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    // A failed join (runtime shutting down) leaves the cache as is.
                    let _ = runtime.spawn(Arc::clone(self).refresh_task(seen)).await;
                }
                // The HTTP client and its timeouts need Tokio: no fetch without it.
                Err(_) => tracing::warn!("no Tokio runtime: the JWKS cannot be fetched"),
            }
        }
        self.state().1
    }

    fn refresh_in_background(self: &Arc<Self>, seen: u64) {
        if self.generation.load(Ordering::Acquire) == seen
            && self.may_fetch()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            drop(runtime.spawn(Arc::clone(self).refresh_task(seen)));
        }
    }

    async fn refresh_task(self: Arc<Self>, seen: u64) {
        let _flight = self.flight.lock().await;
        if self.generation.load(Ordering::Acquire) != seen || !self.may_fetch() {
            return;
        }
        self.last_attempt_ms.store(self.now_ms(), Ordering::Release);
        match self.fetch().await {
            Ok(set) => {
                tracing::info!(url = %self.shown_url, keys = set.keys.len(), "fetched JWKS");
                self.current.store(Some(Arc::new(set)));
            }
            Err(reason) => tracing::warn!(
                url = %self.shown_url,
                error = %reason,
                "JWKS fetch failed; the last good key set (if any) stays in use"
            ),
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let request = http::Request::get(self.uri.clone())
            .header(
                http::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .header(
                http::header::USER_AGENT,
                concat!("toastgate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let response = self
            .client
            .send_buffered(request, JWKS_MAX_BYTES, JWKS_FETCH_TIMEOUT)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP status {status}"));
        }
        let body = response.into_body();
        let keys = parse_jwks(&body, &self.algorithms)?;
        if keys.is_empty() {
            return Err(
                "the document holds no signature key usable with the configured algorithms"
                    .to_string(),
            );
        }
        Ok(KeySet::new(keys))
    }
}

impl fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwksUrl")
            .field("url", &self.shown_url)
            .field("cache_ttl", &self.cache_ttl)
            .field("cached", &self.state().1)
            .finish()
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::convert::Infallible;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use jsonwebtoken::AlgorithmFamily;
    use serde_json::{Value, json};

    use crate::auth::test_support::*;
    use crate::auth::{AuthError, Authenticator};
    use crate::config::{Auth, KeySource};

    /// A tiny identity provider serving a JWKS document and counting hits.
    struct TestIdp {
        url: String,
        hits: Arc<AtomicUsize>,
        document: Arc<Mutex<String>>,
        down: Arc<AtomicBool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestIdp {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TestIdp {
        async fn start(document: Value, delay: Duration) -> TestIdp {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let hits = Arc::new(AtomicUsize::new(0));
            let document = Arc::new(Mutex::new(document.to_string()));
            let down = Arc::new(AtomicBool::new(false));
            let (h, d, is_down) = (Arc::clone(&hits), Arc::clone(&document), Arc::clone(&down));
            let task = tokio::spawn(async move {
                // Dropping the set (when this task is aborted) closes every
                // connection.
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    if is_down.load(Ordering::SeqCst) {
                        // Down: hang up at once. The listener stays bound, so
                        // no other test's server can take over the port.
                        drop(stream);
                        continue;
                    }
                    let (h, d) = (Arc::clone(&h), Arc::clone(&d));
                    let service = hyper::service::service_fn(move |_request| {
                        let (h, d) = (Arc::clone(&h), Arc::clone(&d));
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let body = d.lock().unwrap().clone();
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    connections.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            TestIdp {
                url: format!("http://{addr}/jwks"),
                hits,
                document,
                down,
                task,
            }
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        fn serve(&self, document: Value) {
            *self.document.lock().unwrap() = document.to_string();
        }

        fn go_down(&self) {
            self.down.store(true, Ordering::SeqCst);
        }
    }

    fn url_cfg(url: &str, cache_ttl: Duration, min_refetch_interval: Duration) -> Auth {
        cfg(
            vec![Algorithm::RS256, Algorithm::ES256],
            KeySource::JwksUrl {
                url: url.to_string(),
                cache_ttl,
                min_refetch_interval,
            },
        )
    }

    #[tokio::test]
    async fn jwks_url_caches_refetches_rate_limits_rotates_and_survives_outages() {
        let k = keys();
        let interval = Duration::from_millis(1000);
        let pause = interval + Duration::from_millis(150);
        let idp = TestIdp::start(
            json!({"keys": [jwk(&k.rsa, AlgorithmFamily::Rsa, "k1")]}),
            Duration::ZERO,
        )
        .await;
        let auth =
            Authenticator::new(&url_cfg(&idp.url, Duration::from_secs(600), interval)).unwrap();
        // Tokens are signed up front so the timed phases stay short.
        let t1 = sign(Algorithm::RS256, Some("k1"), &claims("t"), &k.rsa);
        let t2 = sign(Algorithm::ES256, Some("k2"), &claims("t"), &k.ec);
        let flood: Vec<String> = (0..40)
            .map(|i| {
                sign(
                    Algorithm::ES256,
                    Some(&format!("junk-{i}")),
                    &claims("t"),
                    &k.ec,
                )
            })
            .collect();
        assert_eq!(idp.hits(), 0, "construction must not fetch");

        // First use fetches once; afterwards the cache serves.
        assert_eq!(auth.authenticate(&t1).await, Ok(identity("t")));
        assert_eq!(idp.hits(), 1);
        for _ in 0..5 {
            assert_eq!(auth.authenticate(&t1).await, Ok(identity("t")));
        }
        assert_eq!(idp.hits(), 1);

        // Unknown kid right after a fetch: rate-limited, no fetch.
        assert_eq!(auth.authenticate(&t2).await, Err(AuthError::UnknownKey));
        assert_eq!(idp.hits(), 1);

        // Once the interval has passed, an unknown kid triggers one refetch...
        tokio::time::sleep(pause).await;
        assert_eq!(auth.authenticate(&t2).await, Err(AuthError::UnknownKey));
        assert_eq!(idp.hits(), 2);
        // ...and a flood of garbage kids within the interval triggers none.
        for token in &flood {
            assert_eq!(auth.authenticate(token).await, Err(AuthError::UnknownKey));
        }
        assert_eq!(idp.hits(), 2);

        // Key rotation: the new kid is picked up by the next allowed refetch.
        idp.serve(json!({"keys": [
            jwk(&k.rsa, AlgorithmFamily::Rsa, "k1"),
            jwk(&k.ec, AlgorithmFamily::Ec, "k2"),
        ]}));
        assert_eq!(auth.authenticate(&t2).await, Err(AuthError::UnknownKey));
        assert_eq!(idp.hits(), 2);
        tokio::time::sleep(pause).await;
        assert_eq!(auth.authenticate(&t2).await, Ok(identity("t")));
        assert_eq!(idp.hits(), 3);
        assert_eq!(auth.authenticate(&t1).await, Ok(identity("t")));
        assert_eq!(idp.hits(), 3);

        // The IdP goes away: the last good set keeps serving.
        idp.go_down();
        tokio::time::sleep(pause).await;
        assert_eq!(
            auth.authenticate(&flood[0]).await,
            Err(AuthError::UnknownKey)
        );
        assert_eq!(auth.authenticate(&t1).await, Ok(identity("t")));
        assert_eq!(auth.authenticate(&t2).await, Ok(identity("t")));
        assert_eq!(idp.hits(), 3, "a down server serves nothing");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jwks_url_concurrent_misses_share_one_fetch() {
        let k = keys();
        let idp = TestIdp::start(
            json!({"keys": [jwk(&k.rsa, AlgorithmFamily::Rsa, "k1")]}),
            Duration::from_millis(200),
        )
        .await;
        let auth = Arc::new(
            Authenticator::new(&url_cfg(&idp.url, Duration::from_secs(600), Duration::ZERO))
                .unwrap(),
        );
        let token = Arc::new(sign(Algorithm::RS256, Some("k1"), &claims("t"), &k.rsa));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (auth, token) = (Arc::clone(&auth), Arc::clone(&token));
                tokio::spawn(async move { auth.authenticate(&token).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Ok(identity("t")));
        }
        assert_eq!(idp.hits(), 1);
    }

    #[tokio::test]
    async fn jwks_url_refreshes_after_ttl_and_serves_stale_keys_on_failure() {
        let k = keys();
        let ttl = Duration::from_millis(300);
        let idp = TestIdp::start(
            json!({"keys": [jwk(&k.rsa, AlgorithmFamily::Rsa, "k1")]}),
            Duration::ZERO,
        )
        .await;
        let auth = Authenticator::new(&url_cfg(&idp.url, ttl, Duration::ZERO)).unwrap();
        let token = sign(Algorithm::RS256, Some("k1"), &claims("t"), &k.rsa);
        assert_eq!(auth.authenticate(&token).await, Ok(identity("t")));
        assert_eq!(idp.hits(), 1);
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        // Stale: served at once, refreshed in the background.
        assert_eq!(auth.authenticate(&token).await, Ok(identity("t")));
        let deadline = Instant::now() + Duration::from_secs(5);
        while idp.hits() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(idp.hits(), 2);
        idp.go_down();
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        for _ in 0..3 {
            assert_eq!(auth.authenticate(&token).await, Ok(identity("t")));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn jwks_url_without_keys_is_keys_unavailable() {
        let k = keys();
        let token = sign(Algorithm::RS256, Some("k1"), &claims("t"), &k.rsa);
        // Nothing listens on port 1 (and no test binds it).
        let auth = Authenticator::new(&url_cfg(
            "http://127.0.0.1:1/jwks",
            Duration::from_secs(600),
            Duration::from_secs(30),
        ))
        .unwrap();
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::KeysUnavailable)
        );
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::KeysUnavailable)
        );

        // Not JSON, and too large: both fail the fetch.
        let idp = TestIdp::start(json!("not a jwks"), Duration::ZERO).await;
        let auth = Authenticator::new(&url_cfg(&idp.url, Duration::from_secs(600), Duration::ZERO))
            .unwrap();
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::KeysUnavailable)
        );
        idp.serve(json!({
            "keys": [jwk(&k.rsa, AlgorithmFamily::Rsa, "k1")],
            "padding": "x".repeat(JWKS_MAX_BYTES),
        }));
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::KeysUnavailable)
        );
        assert_eq!(idp.hits(), 2);
        // Fixed document: served.
        idp.serve(json!({"keys": [jwk(&k.rsa, AlgorithmFamily::Rsa, "k1")]}));
        assert_eq!(auth.authenticate(&token).await, Ok(identity("t")));
    }
}
