//! The config file as written: every key, its type and default, with
//! `deny_unknown_fields` wherever keys are named, so that a typo is an error
//! rather than a silent default. [`ConfigFile::parse`] reads YAML into it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;

use super::{AuditLevel, ConfigError, ConfigProblem, FsyncPolicy};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: ListenFile,
    pub upstream: UpstreamFile,
    #[serde(default)]
    pub token: TokenFile,
    #[serde(default)]
    pub server: ServerFile,
    pub auth: AuthFile,
    pub projects: BTreeMap<String, ProjectFile>,
    pub teams: BTreeMap<String, TeamFile>,
    #[serde(default)]
    pub rate_limit: RateLimitFile,
    #[serde(default)]
    pub audit: AuditFile,
    #[serde(default)]
    pub idempotency: IdempotencyFile,
    #[serde(default)]
    pub traces: TracesFile,
}

/// Spans over OTLP; off unless `otlp_endpoint` is set. W3C trace context
/// is continued and passed upstream either way.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TracesFile {
    /// OTLP/HTTP traces URL, e.g. `http://otel-collector:4318/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans (default `toastgate`).
    pub service_name: Option<String>,
    /// Share of new traces sampled, 0 to 1 (default 1); a caller's sampled
    /// flag is followed.
    pub sample_ratio: Option<f64>,
    /// How often batches are sent (default 5s).
    #[schemars(with = "Option<String>")]
    #[serde(default, with = "humantime_serde")]
    pub batch_delay: Option<std::time::Duration>,
}

/// `Idempotency-Key` on the creating Actions (always on; clients opt in by
/// sending the header).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyFile {
    /// How long an answer is kept for repeats of its key.
    #[schemars(with = "String")]
    #[serde(default = "default_idempotency_window", with = "humantime_serde")]
    pub window: std::time::Duration,
    /// Keys kept in process (without Redis) at most; the oldest go first.
    #[serde(default = "default_idempotency_entries")]
    pub max_entries: u64,
}

impl Default for IdempotencyFile {
    fn default() -> Self {
        IdempotencyFile {
            window: default_idempotency_window(),
            max_entries: default_idempotency_entries(),
        }
    }
}

fn default_idempotency_window() -> std::time::Duration {
    std::time::Duration::from_secs(24 * 3600)
}
fn default_idempotency_entries() -> u64 {
    100_000
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    pub public: String,
    /// `/metrics`, `/healthz`, `/readyz`: a private address (default
    /// 127.0.0.1:9090), never the public port.
    #[serde(default = "default_admin_listen")]
    pub admin: String,
    /// TLS on the public listener (the admin listener stays plain HTTP on
    /// its private address).
    pub tls: Option<TlsFile>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM certificate chain (leaf first); re-read when it changes.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1); re-read when it changes.
    pub key_file: PathBuf,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// Keystone v2.0 base; toastgate calls `{identity_url}/v2.0/tokens`.
    pub identity_url: String,
    /// Compute v2 base; toastgate calls `{compute_url}/v2/{tenant_id}/...`.
    pub compute_url: String,
    /// v1.0 base for the appkey token API: `{compute_v1_url}/v1.0/appkeys/{appkey}/tokens`.
    pub compute_v1_url: Option<String>,
    #[schemars(with = "String")]
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// One compute call: the answer's head and whole body.
    #[schemars(with = "String")]
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// One identity call (either token API). Short: while identity hangs,
    /// callers get a prompt 503, and only one call is ever in flight.
    #[schemars(with = "String")]
    #[serde(default = "default_identity_timeout", with = "humantime_serde")]
    pub identity_timeout: Duration,
    /// Extra PEM CA bundle trusted on top of the built-in web PKI roots and
    /// the system store (compute, identity and JWKS calls alike).
    pub ca_file: Option<PathBuf>,
    #[schemars(with = "String")]
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_host: usize,
    /// Compute API connections open at once, idle or busy. Default: what
    /// the open-file limit leaves beside `server.max_connections` and 128
    /// more (the admin listener's and the rest), between 16 and 1024.
    pub max_connections: Option<usize>,
    /// How long a compute call waits for a connection when all
    /// `max_connections` are busy before it fails (503, never sent).
    /// Default 5 s, or half of `request_timeout` if that is less.
    #[schemars(with = "Option<String>")]
    #[serde(default, with = "humantime_serde")]
    pub queue_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// Fraction of a token's lifetime after which it is refreshed in the background.
    #[serde(default = "default_refresh_at")]
    pub refresh_at: f64,
    /// +/- spread applied to `refresh_at`, so replicas do not refresh in lockstep.
    #[serde(default = "default_refresh_jitter")]
    pub refresh_jitter: f64,
    #[schemars(with = "String")]
    #[serde(default = "default_retry_min", with = "humantime_serde")]
    pub retry_min_backoff: Duration,
    #[schemars(with = "String")]
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max_backoff: Duration,
}

impl Default for TokenFile {
    fn default() -> Self {
        TokenFile {
            refresh_at: default_refresh_at(),
            refresh_jitter: default_refresh_jitter(),
            retry_min_backoff: default_retry_min(),
            retry_max_backoff: default_retry_max(),
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    #[schemars(with = "String")]
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(default = "default_body_limit")]
    pub body_limit_bytes: usize,
    #[schemars(with = "String")]
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long /readyz reports unready while the listener
    /// still accepts, so load balancers stop routing here first.
    #[schemars(with = "String")]
    #[serde(default, with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Public base URL callers use (for `links[].href` and version documents).
    /// When absent, derived from the request's `Host` header.
    pub public_url: Option<String>,
    /// A request body must have fully arrived within this.
    #[schemars(with = "String")]
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A TLS handshake and an HTTP/1.1 request head must complete within
    /// this: the handshake and a connection's first request counted from
    /// the connection (or a parked connection's first new byte), a later
    /// head (or an answer the client does not take) from the later of the
    /// previous answer and the head's first byte, by the gateway's check
    /// of the connection every park interval: cut at most three park
    /// intervals late.
    #[schemars(with = "String")]
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight and no new one
    /// for this long is closed (HTTP/1.1: parked meanwhile; HTTP/2: a
    /// GOAWAY). Requests are counted, not bytes.
    #[schemars(with = "String")]
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most connections open at once on the public listener; further
    /// clients wait in the kernel's backlog. Default: below the process's
    /// file limit, at most 10,000.
    pub max_connections: Option<usize>,
    /// Most concurrent streams per HTTP/2 connection.
    #[serde(default = "default_http2_max_streams")]
    pub http2_max_streams: u32,
}

impl Default for ServerFile {
    fn default() -> Self {
        ServerFile {
            request_timeout: default_request_timeout(),
            body_limit_bytes: default_body_limit(),
            shutdown_grace: default_shutdown_grace(),
            drain_delay: Duration::ZERO,
            public_url: None,
            body_read_timeout: default_body_read_timeout(),
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: None,
            http2_max_streams: default_http2_max_streams(),
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub issuer: String,
    pub audience: OneOrMany,
    pub algorithms: Vec<String>,
    #[serde(default = "default_team_claim")]
    pub team_claim: String,
    #[schemars(with = "String")]
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// How many verified caller tokens are remembered (each for at most a
    /// minute, never past its `exp` plus `leeway`); 0 verifies every request.
    #[serde(default = "default_verified_token_cache")]
    pub verified_token_cache: u64,
    pub keys: KeysFile,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeysFile {
    /// Shared HMAC secret (HS256/384/512).
    HsSecret {
        secret_env: Option<String>,
        secret_file: Option<PathBuf>,
    },
    /// A JWKS document fetched over HTTPS, cached, refetched on unknown `kid`.
    JwksUrl {
        url: String,
        #[schemars(with = "String")]
        #[serde(default = "default_jwks_ttl", with = "humantime_serde")]
        cache_ttl: Duration,
        #[schemars(with = "String")]
        #[serde(default = "default_jwks_refetch", with = "humantime_serde")]
        min_refetch_interval: Duration,
    },
    /// A JWKS document on disk.
    JwksFile { path: PathBuf },
    /// Public keys as PEM files (RSA, EC or Ed25519), optionally bound to a `kid`.
    Pem { files: Vec<PemKeyFile> },
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PemKeyFile {
    pub path: PathBuf,
    pub kid: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    pub tenant_id: String,
    pub appkey: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    pub credentials: CredentialsFile,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CredentialsFile {
    /// Keystone v2.0 `POST {identity}/v2.0/tokens` with the account's API password.
    Keystone {
        username: String,
        password_env: Option<String>,
        password_file: Option<PathBuf>,
    },
    /// v1.0 `POST {compute_v1}/v1.0/appkeys/{appkey}/tokens` with a user access key.
    Appkey {
        access_key_id: String,
        secret_access_key_env: Option<String>,
        secret_access_key_file: Option<PathBuf>,
    },
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TeamFile {
    pub projects: Vec<String>,
    /// Deny by default: a team may do only what a rule here allows.
    #[serde(default)]
    pub allow: Vec<AllowRuleFile>,
    #[serde(default)]
    pub constraints: Option<ConstraintsFile>,
    #[serde(default)]
    pub rate_limits: Vec<RateRuleFile>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowRuleFile {
    /// Action names, groups (`instance.read`), prefixes (`keypair.*`) or `*`.
    pub actions: Vec<String>,
    /// A subset of the team's projects; all of them when absent.
    pub projects: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConstraintsFile {
    /// Flavor ids allowed for instance.create and instance.resize.
    pub flavors: Option<Vec<String>>,
    /// Largest `count` / `max_count` of one instance.create.
    pub max_count: Option<u32>,
    /// Instance names (create, rename) must start with this.
    pub name_prefix: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateRuleFile {
    pub name: String,
    pub actions: Vec<String>,
    /// `N/s`, `N/m` or `N/h` (also `second`, `minute`, `hour`).
    pub rate: String,
    /// What a request of some Actions costs from the budget (first match
    /// wins; every other Action costs 1).
    #[serde(default)]
    pub costs: Vec<RateCostFile>,
    /// Requests allowed at once on top of the steady rate; default: N.
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    #[serde(default)]
    pub backend: BackendKind,
    pub redis: Option<RedisFile>,
    /// The upstream budget of all teams together.
    pub global: Option<GlobalRateFile>,
    /// Actions (patterns as in `allow`) that fall back to a local limiter
    /// when Redis cannot answer; every other Action is refused then.
    #[serde(default = "default_fail_open")]
    pub fail_open: Vec<String>,
}

impl Default for RateLimitFile {
    fn default() -> Self {
        RateLimitFile {
            backend: BackendKind::Local,
            redis: None,
            global: None,
            fail_open: default_fail_open(),
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    /// `redis://[:password@]host:port/db` (may hold a password: by reference).
    pub url_env: Option<String>,
    pub url_file: Option<PathBuf>,
    /// Longest wait for one decision before the failure mode applies.
    #[schemars(with = "String")]
    #[serde(default = "default_redis_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Replicas sharing the limits; a fail-open fallback allows limit/replicas locally.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// The URL names one node of a Redis Cluster; the others are discovered.
    #[serde(default)]
    pub cluster: bool,
    /// Certificates for a `rediss://` URL (default: the system's and the web
    /// PKI roots, no client certificate).
    pub tls: Option<RedisTlsFile>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisTlsFile {
    /// PEM bundle of the CA(s) that signed the Redis servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for Redis servers that require one, with `key_file`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GlobalRateFile {
    pub rate: String,
    pub burst: Option<u32>,
    /// As in a team rule: what a request of some Actions costs.
    #[serde(default)]
    pub costs: Vec<RateCostFile>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateCostFile {
    /// Action names, groups, prefixes or `*`, as in `allow`.
    pub actions: Vec<String>,
    /// Units of the budget one request takes: 1 to the rule's burst.
    pub cost: u32,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// JSON Lines file sink (hash-chained, rotated by size).
    pub file: Option<AuditFileSink>,
    /// Also write every record to standard output.
    #[serde(default)]
    pub stdout: bool,
    /// Ship the file's records to an HTTP receiver (needs `file`: the
    /// durable spool the webhook is fed from).
    pub webhook: Option<AuditWebhookFile>,
    /// Refuse mutating requests when no sink can write (recommended).
    #[serde(default = "default_true")]
    pub fail_closed: bool,
    /// Audit level per Action pattern, first match wins. Default: mutating
    /// Actions at `request`, reads not recorded.
    #[serde(default)]
    pub rules: Vec<AuditRuleFile>,
    /// Refusal records written per caller (a team; callers without a valid
    /// JWT count as one); the others are counted in the next one written
    /// (`suppressed`). Default: 10/s, burst 100.
    pub refusal_records: Option<RefusalRecordsFile>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RefusalRecordsFile {
    /// `N/s`, `N/m` or `N/h`.
    pub rate: String,
    /// Written at once before the rate applies (default: the rate's N).
    pub burst: Option<u32>,
}

impl Default for AuditFile {
    fn default() -> Self {
        AuditFile {
            file: None,
            stdout: false,
            webhook: None,
            fail_closed: true,
            rules: Vec::new(),
            refusal_records: None,
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditWebhookFile {
    /// `https://...` (or `http://` on a private network): batches are POSTed here.
    pub url: String,
    /// Optional `Authorization: Bearer` token (by reference).
    pub bearer_token_env: Option<String>,
    pub bearer_token_file: Option<PathBuf>,
    /// Most records per POST.
    #[serde(default = "default_webhook_batch")]
    pub batch_max: usize,
    /// One POST, answer included.
    #[schemars(with = "String")]
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Unsent bytes in the spool beyond which mutating requests are refused
    /// (nothing is ever rotated away unsent). Default: 64 MiB, or half of
    /// what the file's rotation keeps (`max_bytes` x `keep`) if less.
    pub max_backlog_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditFileSink {
    pub path: PathBuf,
    #[serde(default = "default_audit_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept besides the current one.
    #[serde(default = "default_audit_keep")]
    pub keep: u32,
    #[serde(default)]
    pub fsync: FsyncPolicy,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditRuleFile {
    pub actions: Vec<String>,
    pub level: AuditLevel,
}

fn default_webhook_batch() -> usize {
    100
}
fn default_webhook_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_admin_listen() -> String {
    "127.0.0.1:9090".to_string()
}
fn default_true() -> bool {
    true
}
fn default_audit_max_bytes() -> u64 {
    100 * 1024 * 1024
}
fn default_audit_keep() -> u32 {
    10
}

fn default_fail_open() -> Vec<String> {
    vec!["read".to_string()]
}
fn default_redis_timeout() -> Duration {
    Duration::from_millis(50)
}
fn default_replicas() -> u32 {
    1
}
fn default_key_prefix() -> String {
    "toastgate".to_string()
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_identity_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_http2_max_streams() -> u32 {
    100
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(90)
}
fn default_pool_max_idle() -> usize {
    256
}
fn default_refresh_at() -> f64 {
    0.8
}
fn default_refresh_jitter() -> f64 {
    0.05
}
fn default_retry_min() -> Duration {
    Duration::from_millis(500)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_body_limit() -> usize {
    1024 * 1024
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_team_claim() -> String {
    "team".to_string()
}
fn default_verified_token_cache() -> u64 {
    10_000
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_jwks_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_jwks_refetch() -> Duration {
    Duration::from_secs(30)
}
fn default_region() -> String {
    "KR1".to_string()
}

impl ConfigFile {
    pub fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        // YAML -> JSON value first: serde_path_to_error then reports the key
        // path of a structural error (unknown key, wrong type) precisely.
        let value: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| {
            ConfigError::Invalid(vec![ConfigProblem {
                path: String::new(),
                message: format!("not valid YAML: {e}"),
            }])
        })?;
        if value.is_null() {
            return Err(ConfigError::Invalid(vec![ConfigProblem {
                path: String::new(),
                message: "the config file is empty".to_string(),
            }]));
        }
        structural_problems(value).map_err(ConfigError::Invalid)
    }
}

/// How many structural problems one check reports at most.
const MAX_STRUCTURAL_PROBLEMS: usize = 50;

/// Deserializes `value`; on failure, reports every structural problem, not
/// just the first. serde stops at the first one, so each top-level section
/// (and each project and team) is read on its own, and within one, the key
/// of a problem is taken out and the rest read again. A missing required key
/// cannot be taken out: it ends the search in its section (as does the
/// "missing" error that taking out a required key causes, not reported).
fn structural_problems(value: serde_json::Value) -> Result<ConfigFile, Vec<ConfigProblem>> {
    let first = match serde_path_to_error::deserialize::<_, ConfigFile>(value.clone()) {
        Ok(file) => return Ok(file),
        Err(e) => problem_of(String::new(), e),
    };
    let Some(sections) = value.as_object() else {
        return Err(vec![first]);
    };
    let mut problems = Vec::new();
    for (key, section) in sections {
        let found = match key.as_str() {
            "listen" => section_problems::<ListenFile>(key, section),
            "upstream" => section_problems::<UpstreamFile>(key, section),
            "token" => section_problems::<TokenFile>(key, section),
            "server" => section_problems::<ServerFile>(key, section),
            "auth" => section_problems::<AuthFile>(key, section),
            "projects" => entry_problems::<ProjectFile>(key, section),
            "teams" => entry_problems::<TeamFile>(key, section),
            "rate_limit" => section_problems::<RateLimitFile>(key, section),
            "audit" => section_problems::<AuditFile>(key, section),
            "idempotency" => section_problems::<IdempotencyFile>(key, section),
            "traces" => section_problems::<TracesFile>(key, section),
            other => vec![ConfigProblem {
                path: other.to_string(),
                message: format!(
                    "unknown field `{other}`, expected one of {}",
                    SECTIONS.map(|s| format!("`{s}`")).join(", ")
                ),
            }],
        };
        problems.extend(found);
    }
    for required in ["listen", "upstream", "auth", "projects", "teams"] {
        if !sections.contains_key(required) {
            problems.push(ConfigProblem {
                path: String::new(),
                message: format!("missing field `{required}`"),
            });
        }
    }
    if problems.is_empty() {
        problems.push(first);
    }
    Err(problems)
}

/// The top-level keys of the config file.
const SECTIONS: [&str; 11] = [
    "listen",
    "upstream",
    "token",
    "server",
    "auth",
    "projects",
    "teams",
    "rate_limit",
    "audit",
    "idempotency",
    "traces",
];

fn problem_of(prefix: String, e: serde_path_to_error::Error<serde_json::Error>) -> ConfigProblem {
    let inner = e.path().to_string();
    let path = match (prefix.is_empty(), inner == ".") {
        (_, true) => prefix,
        (true, false) => inner,
        (false, false) => format!("{prefix}.{inner}"),
    };
    ConfigProblem {
        path,
        message: e.into_inner().to_string(),
    }
}

/// Every problem of a map section, entry by entry (`projects.web`, ...).
fn entry_problems<T: serde::de::DeserializeOwned>(
    key: &str,
    section: &serde_json::Value,
) -> Vec<ConfigProblem> {
    match section.as_object() {
        Some(entries) => entries
            .iter()
            .flat_map(|(name, entry)| section_problems::<T>(&format!("{key}.{name}"), entry))
            .collect(),
        None => section_problems::<BTreeMap<String, T>>(key, section),
    }
}

/// Every problem of one section read as `T`, its paths under `prefix`.
fn section_problems<T: serde::de::DeserializeOwned>(
    prefix: &str,
    section: &serde_json::Value,
) -> Vec<ConfigProblem> {
    let mut value = section.clone();
    let mut problems: Vec<ConfigProblem> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    while problems.len() < MAX_STRUCTURAL_PROBLEMS {
        let e = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(_) => break,
            Err(e) => e,
        };
        let inner = e.path().to_string();
        let inner = if inner == "." { String::new() } else { inner };
        let problem = problem_of(prefix.to_string(), e);
        if let Some(field) = missing_field(&problem.message) {
            let full = if inner.is_empty() {
                field.to_string()
            } else {
                format!("{inner}.{field}")
            };
            // Our own doing: the key was taken out for a problem reported.
            if !removed.contains(&full) {
                problems.push(problem);
            }
            break;
        }
        problems.push(problem);
        if !remove_at(&mut value, &inner) {
            break;
        }
        removed.push(inner);
    }
    problems
}

/// `x` of serde's "missing field `x`".
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .split_once('`')
        .map(|(field, _)| field)
}

/// Takes the key at `path` (`a.b[2].c`, as serde_path_to_error prints it)
/// out of `doc`. False if there is no such key (or `path` is the whole
/// document, or ends at an array element).
fn remove_at(doc: &mut serde_json::Value, path: &str) -> bool {
    let mut segments: Vec<(&str, Option<usize>)> = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        match part.split_once('[') {
            Some((key, rest)) => {
                let index = rest.trim_end_matches(']').parse().ok();
                if index.is_none() {
                    return false;
                }
                segments.push((key, None));
                segments.push(("", index));
            }
            None => segments.push((part, None)),
        }
    }
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut at = doc;
    for (key, index) in parents {
        let next = match index {
            Some(i) => at.get_mut(*i),
            None => at.get_mut(*key),
        };
        match next {
            Some(v) => at = v,
            None => return false,
        }
    }
    // An array element is not taken out: the elements after it would move
    // and later problems would name the wrong index. A member is shifted
    // out, not swapped: the next problem found is the next in the file.
    match (last, at) {
        ((key, None), serde_json::Value::Object(map)) => map.shift_remove(*key).is_some(),
        _ => false,
    }
}
