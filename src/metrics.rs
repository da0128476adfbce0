//! Prometheus metrics: one registry, served on the admin listener at
//! `/metrics` in the text exposition format.
//!
//! Every label has a bounded set of values: teams come from the config (a
//! JWT naming any other team is counted as `unknown`), Actions from the
//! catalog, projects from the config, reasons and outcomes from fixed lists,
//! statuses from HTTP. Never ids, paths or raw client input.

use std::sync::OnceLock;
use std::time::Duration;

use crate::action::Action;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// How a request ended, for `toastgate_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered by the upstream with 2xx/3xx.
    Ok,
    /// The upstream refused it (4xx).
    UpstreamRejected,
    /// The upstream failed (5xx, unreachable, timeout).
    UpstreamError,
    /// Refused by the gateway: authentication.
    AuthRefused,
    /// Refused by the gateway: policy.
    PolicyRefused,
    /// Refused by the gateway: rate limit.
    RateLimited,
    /// The caller's request was malformed or unknown.
    BadRequest,
    /// The gateway itself failed (timeout, audit sink, internal).
    GatewayError,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::UpstreamRejected => "upstream_rejected",
            Outcome::UpstreamError => "upstream_error",
            Outcome::AuthRefused => "auth_refused",
            Outcome::PolicyRefused => "policy_refused",
            Outcome::RateLimited => "rate_limited",
            Outcome::BadRequest => "bad_request",
            Outcome::GatewayError => "gateway_error",
        }
    }
}

/// Every upstream call by what came of it, without the Action: few series,
/// all present from the start, so an error-ratio alert needs no fallbacks.
struct UpstreamOutcomes {
    /// One series per class, resolved once (in `CLASSES` order).
    series: Vec<prometheus::IntCounter>,
}

impl UpstreamOutcomes {
    /// The answer's status class, or the kind of failure.
    const CLASSES: [&'static str; 8] = [
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "timeout",
        "unreachable",
        "body",
        "busy",
    ];

    fn new(vec: IntCounterVec) -> Self {
        let series = Self::CLASSES
            .iter()
            .map(|class| vec.with_label_values(&[*class]))
            .collect();
        UpstreamOutcomes { series }
    }

    fn count(&self, answer: Result<http::StatusCode, &'static str>) {
        let class = match answer {
            Ok(status) => status_class(status.as_u16()),
            Err(kind) => kind,
        };
        // A failure kind not in the list would be a bug: counted as unreachable.
        let i = Self::CLASSES.iter().position(|c| *c == class).unwrap_or(5);
        self.series[i].inc();
    }
}

/// One answered request, for [`Metrics::observe_request`].
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub team: &'a str,
    pub surface: &'static str,
    /// `None` before the request's Action was known.
    pub action: Option<Action>,
    pub outcome: Outcome,
    /// The HTTP status the caller got.
    pub status: u16,
    pub took: Duration,
    /// Of `took`, the time spent waiting for upstream calls.
    pub upstream: Duration,
}

/// Series resolved once and then used directly: a labelled series costs a
/// hash of its labels and a lock on every `with_label_values`, and these are
/// touched by every request. One slot per Action, plus one for "none".
struct Resolved {
    in_flight: [OnceLock<IntGauge>; 2],
    overhead: [OnceLock<prometheus::Histogram>; 2],
    request_duration: [[OnceLock<prometheus::Histogram>; Action::ALL.len() + 1]; 2],
    upstream_duration: [OnceLock<prometheus::Histogram>; Action::ALL.len() + 1],
    /// `upstream_responses` of the statuses most answers have.
    upstream_responses:
        [[OnceLock<prometheus::IntCounter>; COMMON_STATUSES.len()]; Action::ALL.len() + 1],
}

/// The upstream statuses whose series are resolved once per Action.
const COMMON_STATUSES: [u16; 4] = [200, 201, 202, 204];

impl Default for Resolved {
    fn default() -> Self {
        Resolved {
            in_flight: Default::default(),
            overhead: Default::default(),
            request_duration: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            upstream_duration: std::array::from_fn(|_| OnceLock::new()),
            upstream_responses: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
        }
    }
}

/// The index of a surface label in [`Resolved`].
fn surface_slot(surface: &str) -> usize {
    usize::from(surface != "v2")
}

/// The index of an Action label in [`Resolved`] ("none" last).
fn action_slot(action: Option<Action>) -> usize {
    // The enum's discriminants are its positions in `Action::ALL` (a test
    // checks it).
    action.map_or(Action::ALL.len(), |a| a as usize)
}

pub struct Metrics {
    registry: Registry,
    resolved: Resolved,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub overhead: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub ratelimit_redis: prometheus::Histogram,
    pub upstream_responses: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    /// `toastgate_upstream_outcomes_total` by class, every class from the start.
    upstream_outcomes: UpstreamOutcomes,
    pub token_waits: IntCounterVec,
    pub token_refreshes: IntCounterVec,
    pub token_expiry: IntGaugeVec,
    pub identity_errors: IntCounterVec,
    pub ratelimit_refusals: IntCounterVec,
    pub ratelimit_degraded: IntCounterVec,
    pub policy_refusals: IntCounterVec,
    pub auth_failures: IntCounterVec,
    /// `toastgate_auth_cache_total`, both results resolved once.
    auth_cache: [prometheus::IntCounter; 2],
    pub audit_records: IntCounterVec,
    pub audit_webhook_batches: IntCounterVec,
    pub audit_webhook_records: prometheus::IntCounter,
    pub audit_webhook_backlog: IntGauge,
    pub in_flight: IntGaugeVec,
    pub open_connections: IntGauge,
    pub parked_connections: IntGauge,
    pub upstream_connections: IntGauge,
    pub upstream_connection_waits: prometheus::IntCounter,
    pub accept_errors: prometheus::IntCounter,
    pub tls_handshake_failures: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub up_since: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// From 100 µs (a request the gateway answers itself) to 30 s (the longest
/// upstream deadline).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The gateway's own time and a Redis round trip: tens of microseconds to
/// the 2 s ceiling of `rate_limit.redis.timeout`.
const FINE_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.0,
];

/// A Redis round trip: the fine buckets, with more around a loopback round
/// trip's millisecond (its p99 is read against 1 ms).
const REDIS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
];

/// The commit toastgate was built from (build.rs; `unknown` outside git).
pub const COMMIT: &str = env!("TOASTGATE_COMMIT");

/// Time one request spent waiting for the upstream (its compute calls, the
/// identity call one of them waited for, a flavor list another request was
/// loading): the rest of its duration is the gateway's own. The v1.0
/// surface makes several calls at once, so this is the time at least one
/// was in flight (the union of their intervals), never their sum, which
/// can exceed the request's whole duration.
#[derive(Debug, Default)]
pub struct UpstreamWait(std::sync::Mutex<WaitState>);

#[derive(Debug, Default)]
struct WaitState {
    in_flight: u32,
    /// When `in_flight` last rose from zero.
    busy_since: Option<std::time::Instant>,
    /// Busy periods that have ended.
    total: Duration,
}

impl UpstreamWait {
    /// One wait begins now; it ends when the guard is dropped.
    pub fn start(&self) -> WaitGuard<'_> {
        self.start_at(std::time::Instant::now())
    }

    /// One wait begins at `now` (a clock reading the caller already has);
    /// it ends with [`WaitGuard::end_at`], or when the guard is dropped.
    pub fn start_at(&self, now: std::time::Instant) -> WaitGuard<'_> {
        let mut state = self.lock();
        if state.in_flight == 0 {
            state.busy_since = Some(now);
        }
        state.in_flight += 1;
        WaitGuard {
            wait: self,
            ended: false,
        }
    }

    fn end_at(&self, now: std::time::Instant) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0
            && let Some(since) = state.busy_since.take()
        {
            state.total += now.saturating_duration_since(since);
        }
    }

    /// The time waited so far (a busy period still open counted up to now).
    pub fn get(&self) -> Duration {
        let state = self.lock();
        let open = match state.busy_since {
            Some(since) if state.in_flight > 0 => since.elapsed(),
            _ => Duration::ZERO,
        };
        state.total + open
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WaitState> {
        // The state stays consistent under a panic: every update is whole.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One wait in progress (see [`UpstreamWait::start`]).
pub struct WaitGuard<'a> {
    wait: &'a UpstreamWait,
    ended: bool,
}

impl WaitGuard<'_> {
    /// The wait ended at `now` (a clock reading the caller already has).
    pub fn end_at(mut self, now: std::time::Instant) {
        self.ended = true;
        self.wait.end_at(now);
    }
}

impl Drop for WaitGuard<'_> {
    /// Not ended by [`WaitGuard::end_at`] (the call was dropped, or
    /// returned early): it ends now.
    fn drop(&mut self) {
        if !self.ended {
            self.wait.end_at(std::time::Instant::now());
        }
    }
}

/// `2xx` .. `5xx`: the class of the HTTP status a caller was answered.
fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            registered(&registry, HistogramVec::new(opts, labels))
        };
        let up_since = registered(
            &registry,
            IntGauge::new(
                "toastgate_start_time_seconds",
                "Unix time at which this toastgate process started.",
            ),
        );
        up_since.set(chrono::Utc::now().timestamp());
        let open_connections = registered(
            &registry,
            IntGauge::new(
                "toastgate_open_connections",
                "Connections open on the public listener (at most server.max_connections).",
            ),
        );
        let parked_connections = registered(
            &registry,
            IntGauge::new(
                "toastgate_parked_connections",
                "Open HTTP/1.1 connections on the public listener idle between requests and parked: held without hyper's buffers until their next request or server.idle_timeout.",
            ),
        );
        let upstream_connections = registered(
            &registry,
            IntGauge::new(
                "toastgate_upstream_connections",
                "Connections open to the compute API, idle or busy (at most upstream.max_connections).",
            ),
        );
        let upstream_connection_waits = registered(
            &registry,
            prometheus::IntCounter::new(
                "toastgate_upstream_connection_waits_total",
                "Compute API calls that found all upstream.max_connections connections busy and queued for one (at most upstream.queue_timeout).",
            ),
        );
        let accept_errors = registered(
            &registry,
            prometheus::IntCounter::new(
                "toastgate_accept_errors_total",
                "Failed accepts on the public listener (EMFILE and the like); each backs off.",
            ),
        );
        let ratelimit_redis = registered(
            &registry,
            prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "toastgate_ratelimit_redis_seconds",
                    "Rate-limit decisions sent to Redis: the script call's round trip (timeouts included).",
                )
                .buckets(REDIS_BUCKETS.to_vec()),
            ),
        );
        // The process's CPU, memory and file descriptors (`process_*`).
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric registered once");
        let audit_webhook_records = registered(
            &registry,
            prometheus::IntCounter::new(
                "toastgate_audit_webhook_records_total",
                "Audit records delivered to the audit webhook (at least once).",
            ),
        );
        let audit_webhook_backlog = registered(
            &registry,
            IntGauge::new(
                "toastgate_audit_webhook_backlog_bytes",
                "Bytes of the audit file not yet delivered to the audit webhook.",
            ),
        );
        let m = Metrics {
            resolved: Resolved::default(),
            audit_webhook_records,
            audit_webhook_backlog,
            audit_webhook_batches: counter(
                "toastgate_audit_webhook_batches_total",
                "Batches POSTed to the audit webhook, by result (sent, failed).",
                &["result"],
            ),
            open_connections,
            parked_connections,
            upstream_connections,
            upstream_connection_waits,
            accept_errors,
            tls_handshake_failures: counter(
                "toastgate_tls_handshake_failures_total",
                "TLS handshakes on the public listener that failed (reason=error) or did not complete within server.header_read_timeout (reason=timeout).",
                &["reason"],
            ),
            requests: counter(
                "toastgate_requests_total",
                "Requests by team, surface, Action, outcome and the class of the answered HTTP status.",
                &["team", "surface", "action", "outcome", "status_class"],
            ),
            request_duration: histogram(
                "toastgate_request_duration_seconds",
                "Time from request received to response ready, by surface and Action.",
                &["surface", "action"],
                LATENCY_BUCKETS,
            ),
            overhead: histogram(
                "toastgate_gateway_overhead_seconds",
                "A request's duration minus its time waiting for upstream calls (compute and identity): the gateway's own time, by surface.",
                &["surface"],
                FINE_BUCKETS,
            ),
            upstream_duration: histogram(
                "toastgate_upstream_request_duration_seconds",
                "Time waiting for the upstream compute API, by Action.",
                &["action"],
                LATENCY_BUCKETS,
            ),
            ratelimit_redis,
            upstream_responses: counter(
                "toastgate_upstream_responses_total",
                "Upstream compute API answers by Action and HTTP status.",
                &["action", "status"],
            ),
            upstream_errors: counter(
                "toastgate_upstream_errors_total",
                "Upstream compute API calls that got no answer, by Action and kind (timeout, unreachable, body, busy: not sent, every connection busy).",
                &["action", "kind"],
            ),
            upstream_outcomes: UpstreamOutcomes::new(counter(
                "toastgate_upstream_outcomes_total",
                "Upstream compute API calls by outcome: the answer's status class (2xx..5xx) or the failure (timeout, unreachable, body, busy).",
                &["class"],
            )),
            token_waits: counter(
                "toastgate_token_waits_total",
                "Requests that had to wait for an identity call (no valid cloud token cached), by project.",
                &["project"],
            ),
            token_refreshes: counter(
                "toastgate_token_refreshes_total",
                "Identity calls for project tokens, by project and result.",
                &["project", "result"],
            ),
            token_expiry: gauge(
                "toastgate_token_expiry_timestamp_seconds",
                "Unix time at which each project's current cloud token expires.",
                &["project"],
            ),
            identity_errors: counter(
                "toastgate_identity_errors_total",
                "Failed identity calls by project and kind (rejected, unavailable, bad_response).",
                &["project", "kind"],
            ),
            ratelimit_refusals: counter(
                "toastgate_ratelimit_refusals_total",
                "Requests refused by a rate limit, by team and rule (`global` = the upstream budget).",
                &["team", "rule"],
            ),
            ratelimit_degraded: counter(
                "toastgate_ratelimit_degraded_total",
                "Rate-limit decisions made without Redis, by mode (fail_open = local fallback, fail_closed = refused).",
                &["mode"],
            ),
            policy_refusals: counter(
                "toastgate_policy_refusals_total",
                "Requests refused by policy, by team and reason (unknown_team, project, action, constraint).",
                &["team", "reason"],
            ),
            auth_failures: counter(
                "toastgate_auth_failures_total",
                "Caller authentication failures by reason.",
                &["reason"],
            ),
            auth_cache: {
                let vec = counter(
                    "toastgate_auth_cache_total",
                    "Caller tokens found in the verified-token cache (hit) or verified anew (miss).",
                    &["result"],
                );
                ["hit", "miss"].map(|result| vec.with_label_values(&[result]))
            },
            audit_records: counter(
                "toastgate_audit_records_total",
                "Audit records by result (written, failed, suppressed).",
                &["result"],
            ),
            in_flight: gauge(
                "toastgate_in_flight_requests",
                "Requests being processed, by surface.",
                &["surface"],
            ),
            config_reloads: counter(
                "toastgate_config_reloads_total",
                "Configuration reloads by result (success, failure).",
                &["result"],
            ),
            build_info: gauge(
                "toastgate_build_info",
                "Build information; the value is always 1.",
                &["version", "commit"],
            ),
            up_since,
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), COMMIT])
            .set(1);
        // Series that alerts use exist from the start: `increase()` over a
        // series that appears with its first event misses that event.
        for mode in ["fail_open", "fail_closed"] {
            m.ratelimit_degraded.with_label_values(&[mode]).inc_by(0);
        }
        for result in ["written", "failed", "suppressed"] {
            m.audit_records.with_label_values(&[result]).inc_by(0);
        }
        for result in ["success", "failure"] {
            m.config_reloads.with_label_values(&[result]).inc_by(0);
        }
        for reason in ["error", "timeout"] {
            m.tls_handshake_failures
                .with_label_values(&[reason])
                .inc_by(0);
        }
        m
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Series a config's projects use in alerts, at zero (startup and reload).
    pub fn init_projects<'a>(&self, projects: impl IntoIterator<Item = &'a str>) {
        for project in projects {
            for result in ["success", "failure"] {
                self.token_refreshes
                    .with_label_values(&[project, result])
                    .inc_by(0);
            }
        }
    }

    /// One answered request: `took` in all, of which `upstream` waiting for
    /// upstream calls.
    pub fn observe_request(&self, request: &Observed<'_>) {
        let surface = request.surface;
        let action = crate::action::label(request.action);
        self.requests
            .with_label_values(&[
                request.team,
                surface,
                action,
                request.outcome.label(),
                status_class(request.status),
            ])
            .inc();
        self.resolved.request_duration[surface_slot(surface)][action_slot(request.action)]
            .get_or_init(|| self.request_duration.with_label_values(&[surface, action]))
            .observe(request.took.as_secs_f64());
        self.resolved.overhead[surface_slot(surface)]
            .get_or_init(|| self.overhead.with_label_values(&[surface]))
            .observe(request.took.saturating_sub(request.upstream).as_secs_f64());
    }

    /// One look-up in the verified-token cache.
    pub fn observe_auth_cache(&self, hit: bool) {
        self.auth_cache[usize::from(!hit)].inc();
    }

    /// One upstream attempt: its answer's status, or the kind of failure
    /// (a bounded label).
    pub fn observe_upstream(
        &self,
        action: Action,
        answer: Result<http::StatusCode, &'static str>,
        took: Duration,
    ) {
        let slot = action_slot(Some(action));
        self.resolved.upstream_duration[slot]
            .get_or_init(|| self.upstream_duration.with_label_values(&[action.name()]))
            .observe(took.as_secs_f64());
        self.upstream_outcomes.count(answer);
        match answer {
            Ok(status) => match COMMON_STATUSES.iter().position(|&s| s == status.as_u16()) {
                Some(common) => self.resolved.upstream_responses[slot][common]
                    .get_or_init(|| {
                        self.upstream_responses
                            .with_label_values(&[action.name(), status.as_str()])
                    })
                    .inc(),
                None => self
                    .upstream_responses
                    .with_label_values(&[action.name(), status.as_str()])
                    .inc(),
            },
            Err(kind) => self
                .upstream_errors
                .with_label_values(&[action.name(), kind])
                .inc(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// `metric`, registered in `registry`. The definitions are fixed in the
/// code and each is registered once: a failure is a bug, found at start-up.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

/// Counts a request in `toastgate_in_flight_requests` until dropped,
/// however the request ends.
pub struct InFlight<'a>(&'a IntGauge);

impl<'a> InFlight<'a> {
    pub fn new(metrics: &'a Metrics, surface: &'static str) -> Self {
        let gauge = metrics.resolved.in_flight[surface_slot(surface)]
            .get_or_init(|| metrics.in_flight.with_label_values(&[surface]));
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_slot_is_its_position_in_the_catalog() {
        for (position, action) in Action::ALL.iter().enumerate() {
            assert_eq!(action_slot(Some(*action)), position, "{action}");
        }
        assert_eq!(action_slot(None), Action::ALL.len());
    }

    #[test]
    fn renders_families_with_help_and_type() {
        let m = Metrics::new();
        m.observe_request(&Observed {
            team: "web-team",
            surface: "v2",
            action: Some(Action::InstanceList),
            outcome: Outcome::Ok,
            status: 200,
            took: Duration::from_millis(3),
            upstream: Duration::from_millis(2),
        });
        m.observe_upstream(
            Action::InstanceList,
            Ok(http::StatusCode::OK),
            Duration::from_millis(2),
        );
        m.observe_upstream(
            Action::InstanceList,
            Ok(http::StatusCode::OK),
            Duration::from_millis(2),
        );
        m.observe_upstream(
            Action::InstanceList,
            Ok(http::StatusCode::CONFLICT),
            Duration::from_millis(2),
        );
        m.observe_upstream(Action::InstanceList, Err("timeout"), Duration::from_secs(1));
        let text = m.render();
        assert!(text.contains("# TYPE toastgate_requests_total counter"));
        assert!(text.contains(
            r#"toastgate_requests_total{action="instance.list",outcome="ok",status_class="2xx",surface="v2",team="web-team"} 1"#
        ));
        // A common status through its resolved series, another directly.
        assert!(text.contains(
            r#"toastgate_upstream_responses_total{action="instance.list",status="200"} 2"#
        ));
        assert!(text.contains(
            r#"toastgate_upstream_responses_total{action="instance.list",status="409"} 1"#
        ));
        assert!(text.contains(
            r#"toastgate_upstream_errors_total{action="instance.list",kind="timeout"} 1"#
        ));
        assert!(text.contains("# TYPE toastgate_request_duration_seconds histogram"));
        // 3 ms in all, 2 ms of it upstream: 1 ms is the gateway's.
        assert!(
            text.contains(
                r#"toastgate_gateway_overhead_seconds_bucket{surface="v2",le="0.0005"} 0"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"toastgate_gateway_overhead_seconds_bucket{surface="v2",le="0.001"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(&format!(
            r#"toastgate_build_info{{commit="{COMMIT}",version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains(r#"toastgate_ratelimit_degraded_total{mode="fail_closed"} 0"#));
        for (class, n) in [
            ("2xx", 2),
            ("4xx", 1),
            ("timeout", 1),
            ("5xx", 0),
            ("unreachable", 0),
        ] {
            let line = format!(r#"toastgate_upstream_outcomes_total{{class="{class}"}} {n}"#);
            assert!(text.contains(&line), "{line}");
        }
    }

    #[test]
    fn status_classes() {
        let classes: Vec<&str> = [101, 200, 204, 302, 400, 429, 500, 503]
            .into_iter()
            .map(status_class)
            .collect();
        assert_eq!(
            classes,
            ["1xx", "2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "5xx"]
        );
    }

    /// With the caller's clock readings: exactly the union of the
    /// intervals, whatever the order the waits end in.
    #[test]
    fn upstream_waits_at_given_instants_count_their_union() {
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let wait = UpstreamWait::default();
        let first = wait.start_at(at(0));
        let second = wait.start_at(at(10));
        first.end_at(at(20));
        second.end_at(at(50));
        assert_eq!(wait.get(), Duration::from_millis(50));
        // A separate wait later adds its own length only.
        wait.start_at(at(100)).end_at(at(107));
        assert_eq!(wait.get(), Duration::from_millis(57));
        // One ended by dropping it (a call cancelled) ends at the clock's
        // now, which is past every instant above.
        let started = std::time::Instant::now();
        drop(wait.start_at(started));
        let dropped = wait.get() - Duration::from_millis(57);
        assert!(dropped <= started.elapsed(), "{dropped:?}");
    }

    #[test]
    fn overlapping_upstream_waits_count_once() {
        let wait = UpstreamWait::default();
        assert_eq!(wait.get(), Duration::ZERO);
        let outer_start = std::time::Instant::now();
        let first = wait.start();
        let second = wait.start();
        std::thread::sleep(Duration::from_millis(30));
        drop(first);
        assert!(wait.get() >= Duration::from_millis(30), "still in flight");
        drop(second);
        let outer = outer_start.elapsed();
        let waited = wait.get();
        // Summed, two waits of at least 30 ms each would exceed the
        // interval both lie in (unless this thread stalled for 30 ms
        // between the two drops); as a union they never can.
        assert!(
            waited >= Duration::from_millis(30) && waited <= outer,
            "waited {waited:?} within {outer:?}"
        );
        // Nothing in flight: the total stays put.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(wait.get(), waited);
        // A later, separate wait adds to it.
        drop(wait.start());
        assert!(wait.get() >= waited);
    }
}
