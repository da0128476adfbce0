//! Typed configuration: the YAML file as written by the platform team
//! ([`ConfigFile`]) and the validated, secret-resolved form the gateway runs
//! on ([`Config`]).
//!
//! Loading is two steps so that every error names its exact key:
//! 1. structure: YAML -> generic value -> `ConfigFile` through
//!    `serde_path_to_error` (unknown keys are refused everywhere by
//!    `deny_unknown_fields`, so a typo never silently falls back to a default);
//! 2. meaning: [`ConfigFile::validate`] checks every rule and resolves every
//!    secret reference, collecting *all* problems, each with its key path.
//!
//! Secrets are never inline: only `*_env` (an environment variable name) or
//! `*_file` (a file path) references exist in the schema.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::action::Action;
use crate::secret::Secret;

/// Where `*_env` references are resolved. The process environment in
/// production; `demo` and tests add their own values without touching the
/// process environment.
#[derive(Clone, Default)]
pub struct SecretSource {
    overrides: HashMap<String, String>,
}

impl SecretSource {
    pub fn process_env() -> Self {
        Self::default()
    }

    pub fn with_override(mut self, name: &str, value: &str) -> Self {
        self.overrides.insert(name.to_string(), value.to_string());
        self
    }

    fn env(&self, name: &str) -> Option<String> {
        self.overrides
            .get(name)
            .cloned()
            .or_else(|| std::env::var(name).ok())
    }
}

/// One problem in a config file, with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_problems(.0))]
    Invalid(Vec<ConfigProblem>),
}

impl ConfigError {
    pub fn problems(&self) -> Vec<ConfigProblem> {
        match self {
            ConfigError::Read { path, source } => vec![ConfigProblem {
                path: String::new(),
                message: format!("cannot read {}: {source}", path.display()),
            }],
            ConfigError::Invalid(p) => p.clone(),
        }
    }
}

fn render_problems(problems: &[ConfigProblem]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    lines.join("\n")
}

// ---------------------------------------------------------------------------
// The file, as written.

#[derive(Debug, Deserialize)]
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    pub public: String,
    pub admin: String,
    /// TLS on the public listener (the admin listener stays plain HTTP on
    /// its private address).
    pub tls: Option<TlsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM certificate chain (leaf first); re-read when it changes.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1); re-read when it changes.
    pub key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// Keystone v2.0 base; toastgate calls `{identity_url}/v2.0/tokens`.
    pub identity_url: String,
    /// Compute v2 base; toastgate calls `{compute_url}/v2/{tenant_id}/...`.
    pub compute_url: String,
    /// v1.0 base for the appkey token API: `{compute_v1_url}/v1.0/appkeys/{appkey}/tokens`.
    pub compute_v1_url: Option<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Extra PEM CA bundle trusted on top of the built-in web PKI roots.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_host: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// Fraction of a token's lifetime after which it is refreshed in the background.
    #[serde(default = "default_refresh_at")]
    pub refresh_at: f64,
    /// +/- spread applied to `refresh_at`, so replicas do not refresh in lockstep.
    #[serde(default = "default_refresh_jitter")]
    pub refresh_jitter: f64,
    #[serde(default = "default_retry_min", with = "humantime_serde")]
    pub retry_min_backoff: Duration,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(default = "default_body_limit")]
    pub body_limit_bytes: usize,
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long /readyz reports unready while the listener
    /// still accepts, so load balancers stop routing here first.
    #[serde(default, with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Public base URL callers use (for `links[].href` and version documents).
    /// When absent, derived from the request's `Host` header.
    pub public_url: Option<String>,
}

impl Default for ServerFile {
    fn default() -> Self {
        ServerFile {
            request_timeout: default_request_timeout(),
            body_limit_bytes: default_body_limit(),
            shutdown_grace: default_shutdown_grace(),
            drain_delay: Duration::ZERO,
            public_url: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub issuer: String,
    pub audience: OneOrMany,
    pub algorithms: Vec<String>,
    #[serde(default = "default_team_claim")]
    pub team_claim: String,
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    pub keys: KeysFile,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
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
        #[serde(default = "default_jwks_ttl", with = "humantime_serde")]
        cache_ttl: Duration,
        #[serde(default = "default_jwks_refetch", with = "humantime_serde")]
        min_refetch_interval: Duration,
    },
    /// A JWKS document on disk.
    JwksFile { path: PathBuf },
    /// Public keys as PEM files (RSA, EC or Ed25519), optionally bound to a `kid`.
    Pem { files: Vec<PemKeyFile> },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PemKeyFile {
    pub path: PathBuf,
    pub kid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    pub tenant_id: String,
    pub appkey: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    pub credentials: CredentialsFile,
}

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRuleFile {
    /// Action names, groups (`instance.read`), prefixes (`keypair.*`) or `*`.
    pub actions: Vec<String>,
    /// A subset of the team's projects; all of them when absent.
    pub projects: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstraintsFile {
    /// Flavor ids allowed for instance.create and instance.resize.
    pub flavors: Option<Vec<String>>,
    /// Largest `count` / `max_count` of one instance.create.
    pub max_count: Option<u32>,
    /// Instance names (create, rename) must start with this.
    pub name_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateRuleFile {
    pub name: String,
    pub actions: Vec<String>,
    /// `N/s`, `N/m` or `N/h` (also `second`, `minute`, `hour`).
    pub rate: String,
    /// Requests allowed at once on top of the steady rate; default: N.
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    /// `redis://[:password@]host:port/db` (may hold a password: by reference).
    pub url_env: Option<String>,
    pub url_file: Option<PathBuf>,
    /// Longest wait for one decision before the failure mode applies.
    #[serde(default = "default_redis_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Replicas sharing the limits; a fail-open fallback allows limit/replicas locally.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalRateFile {
    pub rate: String,
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// JSON Lines file sink (hash-chained, rotated by size).
    pub file: Option<AuditFileSink>,
    /// Also write every record to standard output.
    #[serde(default)]
    pub stdout: bool,
    /// Refuse mutating requests when no sink can write (recommended).
    #[serde(default = "default_true")]
    pub fail_closed: bool,
    /// Audit level per Action pattern, first match wins. Default: mutating
    /// Actions at `request`, reads not recorded.
    #[serde(default)]
    pub rules: Vec<AuditRuleFile>,
}

impl Default for AuditFile {
    fn default() -> Self {
        AuditFile {
            file: None,
            stdout: false,
            fail_closed: true,
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
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

/// When written records are forced to disk.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Before the request that wrote it is answered (group commit).
    #[default]
    Always,
    /// At most once a second.
    Interval,
    /// Left to the operating system.
    Never,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRuleFile {
    pub actions: Vec<String>,
    pub level: AuditLevel,
}

/// How much of a request is recorded (after Kubernetes' audit levels).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditLevel {
    /// Not recorded (refusals are recorded all the same).
    None,
    /// Who, what, on what, outcome.
    Metadata,
    /// Metadata plus a redacted summary of the request body.
    Request,
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

// ---------------------------------------------------------------------------
// The validated config the gateway runs on.

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub upstream: Upstream,
    pub token: TokenPolicy,
    pub server: Server,
    pub auth: Auth,
    pub projects: BTreeMap<String, Arc<Project>>,
    pub teams: BTreeMap<String, Team>,
    pub rate_limit: RateLimits,
    pub audit: Audit,
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub identity_url: String,
    pub compute_url: String,
    pub compute_v1_url: Option<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

#[derive(Debug, Clone)]
pub struct TokenPolicy {
    pub refresh_at: f64,
    pub refresh_jitter: f64,
    pub retry_min_backoff: Duration,
    pub retry_max_backoff: Duration,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub request_timeout: Duration,
    pub body_limit_bytes: usize,
    pub shutdown_grace: Duration,
    pub drain_delay: Duration,
    pub public_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Auth {
    pub issuer: String,
    pub audience: Vec<String>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub team_claim: String,
    pub leeway: Duration,
    pub keys: KeySource,
}

#[derive(Debug, Clone)]
pub enum KeySource {
    HsSecret(Secret),
    JwksUrl {
        url: String,
        cache_ttl: Duration,
        min_refetch_interval: Duration,
    },
    JwksFile(PathBuf),
    Pem(Vec<(PathBuf, Option<String>)>),
}

#[derive(Debug, Clone)]
pub struct Project {
    pub alias: String,
    pub tenant_id: String,
    pub appkey: Option<String>,
    pub region: String,
    pub credentials: Credentials,
}

#[derive(Debug, Clone)]
pub enum Credentials {
    Keystone {
        username: String,
        password: Secret,
    },
    Appkey {
        appkey: String,
        access_key_id: String,
        secret_access_key: Secret,
    },
}

#[derive(Debug, Clone)]
pub struct Team {
    pub name: String,
    pub projects: Vec<String>,
    pub allow: Vec<AllowRule>,
    pub constraints: Constraints,
    pub rate_limits: Vec<RateRule>,
}

#[derive(Debug, Clone)]
pub struct AllowRule {
    /// Position under `teams.<team>.allow`, to name the rule in explanations.
    pub index: usize,
    pub patterns: Vec<String>,
    pub actions: BTreeSet<Action>,
    pub projects: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct Constraints {
    pub flavors: Option<Vec<String>>,
    pub max_count: Option<u32>,
    pub name_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

#[derive(Debug, Clone)]
pub struct RateRule {
    pub name: String,
    pub actions: BTreeSet<Action>,
    pub rate: Rate,
    pub burst: u32,
}

#[derive(Debug, Clone)]
pub struct RateLimits {
    pub backend: Backend,
    pub global: Option<RateRule>,
    pub fail_open: BTreeSet<Action>,
}

#[derive(Debug, Clone)]
pub struct Audit {
    pub file: Option<AuditFileConfig>,
    pub stdout: bool,
    pub fail_closed: bool,
    pub rules: Vec<(BTreeSet<Action>, AuditLevel)>,
}

#[derive(Debug, Clone)]
pub struct AuditFileConfig {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub keep: u32,
    pub fsync: FsyncPolicy,
}

impl Audit {
    /// The level an Action is recorded at: the first matching rule, else
    /// `request` for mutating Actions and `none` for reads.
    pub fn level_for(&self, action: Action) -> AuditLevel {
        self.rules
            .iter()
            .find(|(actions, _)| actions.contains(&action))
            .map(|(_, level)| *level)
            .unwrap_or(if action.is_mutating() {
                AuditLevel::Request
            } else {
                AuditLevel::None
            })
    }

    pub fn enabled(&self) -> bool {
        self.file.is_some() || self.stdout
    }
}

#[derive(Debug, Clone)]
pub enum Backend {
    Local,
    Redis {
        url: Secret,
        timeout: Duration,
        replicas: u32,
        key_prefix: String,
    },
}

impl Config {
    /// Reads, parses and validates `path`, resolving secrets from `secrets`.
    pub fn load(path: &Path, secrets: &SecretSource) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text, secrets, path.parent())
    }

    /// Parses and validates YAML text. Relative `*_file` paths are resolved
    /// against `base_dir` (the config file's folder) when given.
    pub fn from_yaml(
        text: &str,
        secrets: &SecretSource,
        base_dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let file = ConfigFile::parse(text)?;
        file.validate(secrets, base_dir)
    }

    /// The project a `{project}` path segment names: an alias or a tenant id.
    pub fn project(&self, alias_or_tenant: &str) -> Option<&Arc<Project>> {
        self.projects.get(alias_or_tenant).or_else(|| {
            self.projects
                .values()
                .find(|p| p.tenant_id == alias_or_tenant)
        })
    }

    /// The project whose appkey is `appkey` (the v1.0 surface).
    pub fn project_by_appkey(&self, appkey: &str) -> Option<&Arc<Project>> {
        self.projects
            .values()
            .find(|p| p.appkey.as_deref() == Some(appkey))
    }
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
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Invalid(vec![ConfigProblem {
                path: if path == "." { String::new() } else { path },
                message: e.into_inner().to_string(),
            }])
        })
    }

    pub fn validate(
        self,
        secrets: &SecretSource,
        base_dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let mut v = Validator {
            problems: Vec::new(),
            secrets,
            base_dir,
        };
        let tls = self.listen.tls.map(|t| v.tls(t));
        let listen = Listen {
            public: v.socket_addr("listen.public", &self.listen.public),
            admin: v.socket_addr("listen.admin", &self.listen.admin),
            tls,
        };
        if listen.public == listen.admin && listen.public.port() != 0 {
            v.problem("listen.admin", "must differ from listen.public");
        }
        let upstream = v.upstream(self.upstream);
        let token = v.token(self.token);
        let server = v.server(self.server);
        let auth = v.auth(self.auth);
        let projects = v.projects(self.projects, &upstream);
        let teams = v.teams(self.teams, &projects);
        let rate_limit = v.rate_limit(self.rate_limit);
        let audit = v.audit(self.audit);
        if v.problems.is_empty() {
            Ok(Config {
                listen,
                upstream,
                token,
                server,
                auth,
                projects,
                teams,
                rate_limit,
                audit,
            })
        } else {
            Err(ConfigError::Invalid(v.problems))
        }
    }
}

struct Validator<'a> {
    problems: Vec<ConfigProblem>,
    secrets: &'a SecretSource,
    base_dir: Option<&'a Path>,
}

impl Validator<'_> {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(ConfigProblem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn socket_addr(&mut self, path: &str, text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|_| {
            self.problem(
                path,
                format!("`{text}` is not an address like 0.0.0.0:8080 or [::]:8080"),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }

    fn url(&mut self, path: &str, text: &str) -> String {
        match url::Url::parse(text) {
            Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && u.has_host() => {
                if u.query().is_some() || u.fragment().is_some() {
                    self.problem(path, "must not carry a query or fragment");
                }
                text.trim_end_matches('/').to_string()
            }
            Ok(_) => {
                self.problem(path, format!("`{text}` must be an http(s) URL with a host"));
                String::new()
            }
            Err(e) => {
                self.problem(path, format!("`{text}` is not a URL: {e}"));
                String::new()
            }
        }
    }

    fn resolve_path(&self, p: &Path) -> PathBuf {
        match self.base_dir {
            Some(base) if p.is_relative() => base.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// Resolves exactly one of `{name}_env` / `{name}_file` into a secret.
    fn secret(
        &mut self,
        path: &str,
        name: &str,
        env: Option<String>,
        file: Option<PathBuf>,
    ) -> Secret {
        let value = match (env, file) {
            (Some(_), Some(_)) => {
                self.problem(
                    path,
                    format!("give only one of `{name}_env` and `{name}_file`"),
                );
                None
            }
            (None, None) => {
                self.problem(
                    path,
                    format!(
                        "`{name}_env` or `{name}_file` is required (secrets are never written inline)"
                    ),
                );
                None
            }
            (Some(var), None) => match self.secrets.env(&var) {
                Some(val) => Some(val),
                None => {
                    self.problem(
                        format!("{path}.{name}_env"),
                        format!("environment variable `{var}` is not set"),
                    );
                    None
                }
            },
            (None, Some(file)) => {
                let full = self.resolve_path(&file);
                match std::fs::read_to_string(&full) {
                    // A trailing newline is an artefact of how secret files are written.
                    Ok(val) => Some(val.trim_end_matches(['\n', '\r']).to_string()),
                    Err(e) => {
                        self.problem(
                            format!("{path}.{name}_file"),
                            format!("cannot read `{}`: {e}", full.display()),
                        );
                        None
                    }
                }
            }
        };
        match value {
            Some(v) if v.is_empty() => {
                self.problem(path, format!("`{name}` resolves to an empty value"));
                Secret::new("")
            }
            Some(v) => Secret::new(v),
            None => Secret::new(""),
        }
    }

    fn positive(&mut self, path: &str, d: Duration) -> Duration {
        if d.is_zero() {
            self.problem(path, "must be greater than zero");
        }
        d
    }

    fn tls(&mut self, t: TlsFile) -> TlsFiles {
        let files = TlsFiles {
            cert_file: self.resolve_path(&t.cert_file),
            key_file: self.resolve_path(&t.key_file),
        };
        if let Err(e) = crate::tls::load_certified_key(&files.cert_file, &files.key_file) {
            let key = match e {
                crate::tls::TlsError::Key(..) => "listen.tls.key_file",
                _ => "listen.tls.cert_file",
            };
            self.problem(key, e.to_string());
        }
        files
    }

    fn require_public_key_algorithms(&mut self, hmac_algorithms: usize) {
        if hmac_algorithms > 0 {
            self.problem(
                "auth.keys.type",
                "HS* algorithms need `type: hs_secret` keys",
            );
        }
    }

    fn upstream(&mut self, u: UpstreamFile) -> Upstream {
        let compute_v1_url = u
            .compute_v1_url
            .as_deref()
            .map(|t| self.url("upstream.compute_v1_url", t));
        if let Some(ca) = &u.ca_file
            && !self.resolve_path(ca).is_file()
        {
            self.problem(
                "upstream.ca_file",
                format!("`{}` is not a readable file", ca.display()),
            );
        }
        Upstream {
            identity_url: self.url("upstream.identity_url", &u.identity_url),
            compute_url: self.url("upstream.compute_url", &u.compute_url),
            compute_v1_url,
            connect_timeout: self.positive("upstream.connect_timeout", u.connect_timeout),
            request_timeout: self.positive("upstream.request_timeout", u.request_timeout),
            ca_file: u.ca_file.map(|p| self.resolve_path(&p)),
            pool_idle_timeout: u.pool_idle_timeout,
            pool_max_idle_per_host: u.pool_max_idle_per_host,
        }
    }

    fn token(&mut self, t: TokenFile) -> TokenPolicy {
        if !(0.1..=0.95).contains(&t.refresh_at) {
            self.problem("token.refresh_at", "must be between 0.1 and 0.95");
        }
        if !(0.0..=0.2).contains(&t.refresh_jitter) || t.refresh_at + t.refresh_jitter >= 1.0 {
            self.problem(
                "token.refresh_jitter",
                "must be between 0 and 0.2, and refresh_at + refresh_jitter must stay below 1",
            );
        }
        if t.retry_min_backoff > t.retry_max_backoff {
            self.problem(
                "token.retry_min_backoff",
                "must not exceed token.retry_max_backoff",
            );
        }
        TokenPolicy {
            refresh_at: t.refresh_at,
            refresh_jitter: t.refresh_jitter,
            retry_min_backoff: self.positive("token.retry_min_backoff", t.retry_min_backoff),
            retry_max_backoff: t.retry_max_backoff,
        }
    }

    fn server(&mut self, s: ServerFile) -> Server {
        if s.body_limit_bytes == 0 {
            self.problem("server.body_limit_bytes", "must be greater than zero");
        }
        let public_url = s
            .public_url
            .as_deref()
            .map(|u| self.url("server.public_url", u));
        Server {
            request_timeout: self.positive("server.request_timeout", s.request_timeout),
            body_limit_bytes: s.body_limit_bytes,
            shutdown_grace: s.shutdown_grace,
            drain_delay: s.drain_delay,
            public_url,
        }
    }

    fn auth(&mut self, a: AuthFile) -> Auth {
        use jsonwebtoken::Algorithm as A;
        if a.issuer.trim().is_empty() {
            self.problem("auth.issuer", "must not be empty");
        }
        let audience = a.audience.into_vec();
        if audience.is_empty() || audience.iter().any(|s| s.trim().is_empty()) {
            self.problem("auth.audience", "must name at least one non-empty audience");
        }
        if a.team_claim.trim().is_empty() {
            self.problem("auth.team_claim", "must not be empty");
        }
        if a.leeway > Duration::from_secs(300) {
            self.problem("auth.leeway", "must be at most 5m");
        }
        let mut algorithms = Vec::new();
        if a.algorithms.is_empty() {
            self.problem("auth.algorithms", "list at least one algorithm");
        }
        for (i, name) in a.algorithms.iter().enumerate() {
            match parse_algorithm(name) {
                Some(alg) => algorithms.push(alg),
                None => self.problem(
                    format!("auth.algorithms[{i}]"),
                    format!(
                        "`{name}` is not allowed; use one of HS256 HS384 HS512 RS256 RS384 RS512 ES256 ES384 EdDSA"
                    ),
                ),
            }
        }
        let hmac = algorithms
            .iter()
            .filter(|a| matches!(a, A::HS256 | A::HS384 | A::HS512))
            .count();
        // Mixing a shared secret with public-key algorithms is the classic
        // algorithm-confusion setup (a public key used as an HMAC key).
        if hmac > 0 && hmac < algorithms.len() {
            self.problem(
                "auth.algorithms",
                "do not mix HS* with public-key algorithms (algorithm confusion)",
            );
        }
        let keys = match a.keys {
            KeysFile::HsSecret {
                secret_env,
                secret_file,
            } => {
                if hmac == 0 && !algorithms.is_empty() {
                    self.problem(
                        "auth.keys.type",
                        "hs_secret keys need HS256/HS384/HS512 algorithms",
                    );
                }
                let s = self.secret("auth.keys", "secret", secret_env, secret_file);
                if !s.is_empty() && s.expose().len() < 32 {
                    self.problem("auth.keys", "the HS secret must be at least 32 bytes long");
                }
                KeySource::HsSecret(s)
            }
            KeysFile::JwksUrl {
                url,
                cache_ttl,
                min_refetch_interval,
            } => {
                self.require_public_key_algorithms(hmac);
                KeySource::JwksUrl {
                    url: self.url("auth.keys.url", &url),
                    cache_ttl: self.positive("auth.keys.cache_ttl", cache_ttl),
                    min_refetch_interval,
                }
            }
            KeysFile::JwksFile { path } => {
                self.require_public_key_algorithms(hmac);
                let full = self.resolve_path(&path);
                if !full.is_file() {
                    self.problem(
                        "auth.keys.path",
                        format!("`{}` is not a readable file", path.display()),
                    );
                }
                KeySource::JwksFile(full)
            }
            KeysFile::Pem { files } => {
                self.require_public_key_algorithms(hmac);
                if files.is_empty() {
                    self.problem("auth.keys.files", "list at least one PEM file");
                }
                let mut out = Vec::new();
                for (i, f) in files.into_iter().enumerate() {
                    let full = self.resolve_path(&f.path);
                    if !full.is_file() {
                        self.problem(
                            format!("auth.keys.files[{i}].path"),
                            format!("`{}` is not a readable file", f.path.display()),
                        );
                    }
                    out.push((full, f.kid));
                }
                KeySource::Pem(out)
            }
        };
        Auth {
            issuer: a.issuer,
            audience,
            algorithms,
            team_claim: a.team_claim,
            leeway: a.leeway,
            keys,
        }
    }

    fn projects(
        &mut self,
        projects: BTreeMap<String, ProjectFile>,
        upstream: &Upstream,
    ) -> BTreeMap<String, Arc<Project>> {
        if projects.is_empty() {
            self.problem("projects", "configure at least one project");
        }
        let mut tenants: HashMap<String, String> = HashMap::new();
        let mut appkeys: HashMap<String, String> = HashMap::new();
        let mut out = BTreeMap::new();
        for (alias, p) in projects {
            let at = format!("projects.{alias}");
            if !valid_name(&alias) {
                self.problem(
                    &at,
                    "a project alias uses letters, digits, `-` and `_` only",
                );
            }
            if p.tenant_id.is_empty() || !p.tenant_id.chars().all(|c| c.is_ascii_alphanumeric()) {
                self.problem(
                    format!("{at}.tenant_id"),
                    "must be the alphanumeric tenant id",
                );
            }
            if let Some(other) = tenants.insert(p.tenant_id.clone(), alias.clone()) {
                self.problem(
                    format!("{at}.tenant_id"),
                    format!(
                        "tenant `{}` is already used by project `{other}`",
                        p.tenant_id
                    ),
                );
            }
            if let Some(appkey) = &p.appkey {
                if appkey.is_empty() || !appkey.chars().all(|c| c.is_ascii_alphanumeric()) {
                    self.problem(format!("{at}.appkey"), "must be the alphanumeric appkey");
                }
                if let Some(other) = appkeys.insert(appkey.clone(), alias.clone()) {
                    self.problem(
                        format!("{at}.appkey"),
                        format!("appkey is already used by project `{other}`"),
                    );
                }
            }
            let credentials = match p.credentials {
                CredentialsFile::Keystone {
                    username,
                    password_env,
                    password_file,
                } => {
                    if username.trim().is_empty() {
                        self.problem(format!("{at}.credentials.username"), "must not be empty");
                    }
                    let password = self.secret(
                        &format!("{at}.credentials"),
                        "password",
                        password_env,
                        password_file,
                    );
                    Credentials::Keystone { username, password }
                }
                CredentialsFile::Appkey {
                    access_key_id,
                    secret_access_key_env,
                    secret_access_key_file,
                } => {
                    if access_key_id.trim().is_empty() {
                        self.problem(
                            format!("{at}.credentials.access_key_id"),
                            "must not be empty",
                        );
                    }
                    if upstream.compute_v1_url.is_none() {
                        self.problem(
                            format!("{at}.credentials.type"),
                            "appkey credentials need upstream.compute_v1_url (the v1.0 token API)",
                        );
                    }
                    let appkey = match &p.appkey {
                        Some(k) => k.clone(),
                        None => {
                            self.problem(
                                format!("{at}.appkey"),
                                "is required with appkey credentials (the token API is per appkey)",
                            );
                            String::new()
                        }
                    };
                    let secret_access_key = self.secret(
                        &format!("{at}.credentials"),
                        "secret_access_key",
                        secret_access_key_env,
                        secret_access_key_file,
                    );
                    Credentials::Appkey {
                        appkey,
                        access_key_id,
                        secret_access_key,
                    }
                }
            };
            out.insert(
                alias.clone(),
                Arc::new(Project {
                    alias,
                    tenant_id: p.tenant_id,
                    appkey: p.appkey,
                    region: p.region,
                    credentials,
                }),
            );
        }
        out
    }

    fn teams(
        &mut self,
        teams: BTreeMap<String, TeamFile>,
        projects: &BTreeMap<String, Arc<Project>>,
    ) -> BTreeMap<String, Team> {
        if teams.is_empty() {
            self.problem("teams", "configure at least one team");
        }
        let mut out = BTreeMap::new();
        for (name, t) in teams {
            let at = format!("teams.{name}");
            if !valid_name(&name) {
                self.problem(&at, "a team name uses letters, digits, `-` and `_` only");
            }
            if t.projects.is_empty() {
                self.problem(format!("{at}.projects"), "list at least one project");
            }
            for (i, p) in t.projects.iter().enumerate() {
                if !projects.contains_key(p) {
                    self.problem(
                        format!("{at}.projects[{i}]"),
                        format!("unknown project `{p}` (not under `projects`)"),
                    );
                }
            }
            let allow = self.allow_rules(&at, t.allow, &t.projects);
            let constraints = t
                .constraints
                .map(|c| self.constraints(&format!("{at}.constraints"), c))
                .unwrap_or_default();
            let mut names = BTreeSet::new();
            let mut rate_limits = Vec::new();
            for (i, r) in t.rate_limits.into_iter().enumerate() {
                let path = format!("{at}.rate_limits[{i}]");
                if !names.insert(r.name.clone()) {
                    self.problem(
                        format!("{path}.name"),
                        format!("rule `{}` is defined twice", r.name),
                    );
                }
                if !valid_name(&r.name) || r.name == "global" {
                    self.problem(
                        format!("{path}.name"),
                        "use letters, digits, `-` and `_` (and not `global`, the upstream budget)",
                    );
                }
                let actions = self.action_patterns(&format!("{path}.actions"), &r.actions);
                let rate = self.rate(&format!("{path}.rate"), &r.rate);
                let burst = self.burst(&format!("{path}.burst"), r.burst, &rate);
                rate_limits.push(RateRule {
                    name: r.name,
                    actions,
                    rate,
                    burst,
                });
            }
            out.insert(
                name.clone(),
                Team {
                    name,
                    projects: t.projects,
                    allow,
                    constraints,
                    rate_limits,
                },
            );
        }
        out
    }
}

impl Validator<'_> {
    fn allow_rules(
        &mut self,
        at: &str,
        rules: Vec<AllowRuleFile>,
        team_projects: &[String],
    ) -> Vec<AllowRule> {
        let mut out = Vec::new();
        for (i, r) in rules.into_iter().enumerate() {
            let path = format!("{at}.allow[{i}]");
            let actions = self.action_patterns(&format!("{path}.actions"), &r.actions);
            if let Some(projects) = &r.projects {
                for (j, p) in projects.iter().enumerate() {
                    if !team_projects.contains(p) {
                        self.problem(
                            format!("{path}.projects[{j}]"),
                            format!("`{p}` is not one of this team's projects"),
                        );
                    }
                }
            }
            out.push(AllowRule {
                index: i,
                patterns: r.actions,
                actions,
                projects: r.projects,
            });
        }
        out
    }

    /// Resolves Action patterns; an unknown name or group is an error.
    fn action_patterns(&mut self, path: &str, patterns: &[String]) -> BTreeSet<Action> {
        if patterns.is_empty() {
            self.problem(path, "list at least one Action, group or `*`");
        }
        let mut out = BTreeSet::new();
        for (i, p) in patterns.iter().enumerate() {
            match crate::action::resolve_pattern(p) {
                Some(set) => out.extend(set),
                None => self.problem(
                    format!("{path}[{i}]"),
                    format!("unknown Action or group `{p}` (see `toastgate explain --list`)"),
                ),
            }
        }
        out
    }

    fn constraints(&mut self, at: &str, c: ConstraintsFile) -> Constraints {
        if let Some(f) = &c.flavors
            && f.is_empty()
        {
            self.problem(
                format!("{at}.flavors"),
                "list at least one flavor id, or remove the key",
            );
        }
        if c.max_count == Some(0) {
            self.problem(format!("{at}.max_count"), "must be at least 1");
        }
        if let Some(p) = &c.name_prefix
            && p.is_empty()
        {
            self.problem(format!("{at}.name_prefix"), "must not be empty");
        }
        Constraints {
            flavors: c.flavors,
            max_count: c.max_count,
            name_prefix: c.name_prefix,
        }
    }

    fn rate(&mut self, path: &str, text: &str) -> Rate {
        match parse_rate(text) {
            Some(r) => r,
            None => {
                self.problem(
                    path,
                    format!("`{text}` is not a rate like 20/s, 100/m or 30/h"),
                );
                Rate {
                    count: 1,
                    per: Duration::from_secs(1),
                }
            }
        }
    }

    fn burst(&mut self, path: &str, burst: Option<u32>, rate: &Rate) -> u32 {
        match burst {
            Some(0) => {
                self.problem(path, "must be at least 1");
                1
            }
            Some(b) => b,
            None => rate.count.max(1),
        }
    }

    fn audit(&mut self, a: AuditFile) -> Audit {
        let file = a.file.map(|f| {
            if f.max_bytes < 4096 {
                self.problem("audit.file.max_bytes", "must be at least 4096");
            }
            let path = self.resolve_path(&f.path);
            match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => self.problem(
                    "audit.file.path",
                    format!("folder `{}` does not exist", dir.display()),
                ),
                _ => {}
            }
            AuditFileConfig {
                path,
                max_bytes: f.max_bytes,
                keep: f.keep,
                fsync: f.fsync,
            }
        });
        let mut rules = Vec::new();
        for (i, r) in a.rules.into_iter().enumerate() {
            let actions = self.action_patterns(&format!("audit.rules[{i}].actions"), &r.actions);
            let mutating: Vec<&str> = actions
                .iter()
                .filter(|a| a.is_mutating())
                .map(|a| a.name())
                .collect();
            if r.level == AuditLevel::None && !mutating.is_empty() {
                self.problem(
                    format!("audit.rules[{i}].level"),
                    format!(
                        "`none` is not allowed for mutating Actions ({})",
                        mutating.join(", ")
                    ),
                );
            }
            rules.push((actions, r.level));
        }
        Audit {
            file,
            stdout: a.stdout,
            fail_closed: a.fail_closed,
            rules,
        }
    }

    fn rate_limit(&mut self, r: RateLimitFile) -> RateLimits {
        let fail_open = self.action_patterns("rate_limit.fail_open", &r.fail_open);
        let global = r.global.map(|g| {
            let rate = self.rate("rate_limit.global.rate", &g.rate);
            let burst = self.burst("rate_limit.global.burst", g.burst, &rate);
            RateRule {
                name: "global".to_string(),
                actions: Action::ALL.iter().copied().collect(),
                rate,
                burst,
            }
        });
        let backend = match (r.backend, r.redis) {
            (BackendKind::Local, None) => Backend::Local,
            (BackendKind::Local, Some(_)) => {
                self.problem("rate_limit.redis", "is only used with `backend: redis`");
                Backend::Local
            }
            (BackendKind::Redis, None) => {
                self.problem("rate_limit.redis", "is required with `backend: redis`");
                Backend::Local
            }
            (BackendKind::Redis, Some(redis)) => {
                let url = self.secret("rate_limit.redis", "url", redis.url_env, redis.url_file);
                let scheme_ok =
                    url.expose().starts_with("redis://") || url.expose().starts_with("rediss://");
                if !url.is_empty() && !scheme_ok {
                    // Never echo the value: it may hold a password.
                    self.problem("rate_limit.redis", "the Redis URL must start with redis://");
                }
                if redis.replicas == 0 {
                    self.problem("rate_limit.redis.replicas", "must be at least 1");
                }
                if redis.timeout.is_zero() || redis.timeout > Duration::from_secs(2) {
                    self.problem("rate_limit.redis.timeout", "must be between 1ms and 2s");
                }
                Backend::Redis {
                    url,
                    timeout: redis.timeout,
                    replicas: redis.replicas.max(1),
                    key_prefix: redis.key_prefix,
                }
            }
        };
        RateLimits {
            backend,
            global,
            fail_open,
        }
    }
}

/// `N/s`, `N/m`, `N/h` (or `second`, `sec`, `minute`, `min`, `hour`).
pub fn parse_rate(text: &str) -> Option<Rate> {
    let (count, unit) = text.trim().split_once('/')?;
    let count: u32 = count.trim().parse().ok().filter(|c| *c > 0)?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return None,
    };
    Some(Rate { count, per })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub fn parse_algorithm(name: &str) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm as A;
    Some(match name {
        "HS256" => A::HS256,
        "HS384" => A::HS384,
        "HS512" => A::HS512,
        "RS256" => A::RS256,
        "RS384" => A::RS384,
        "RS512" => A::RS512,
        "ES256" => A::ES256,
        "ES384" => A::ES384,
        "EdDSA" => A::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen: { public: "127.0.0.1:8080", admin: "127.0.0.1:9090" }
upstream:
  identity_url: https://api-identity.cloud.toast.com
  compute_url: https://kr1-api-instance.infrastructure.cloud.toast.com
  compute_v1_url: https://api-compute.cloud.toast.com/compute
auth:
  issuer: https://idp.example.com
  audience: toastgate
  algorithms: [HS256]
  keys: { type: hs_secret, secret_env: JWT_SECRET }
projects:
  web:
    tenant_id: 6cdebe3eb0094910bc41f1d42ebe4cb7
    appkey: WebAppKey0001
    credentials: { type: keystone, username: a@example.com, password_env: WEB_PW }
  batch:
    tenant_id: 9a1f3c5e7b2d4f6a8c0e1b3d5f7a9c2e
    appkey: BatchAppKey002
    credentials: { type: appkey, access_key_id: AK, secret_access_key_env: BATCH_SK }
teams:
  web-team:
    projects: [web]
    allow: [{ actions: [instance.read, "keypair.*"] }]
"#;

    fn secrets() -> SecretSource {
        SecretSource::default()
            .with_override("JWT_SECRET", "0123456789abcdef0123456789abcdef")
            .with_override("WEB_PW", "pw")
            .with_override("BATCH_SK", "sk")
    }

    fn problems(yaml: &str, s: &SecretSource) -> Vec<String> {
        match Config::from_yaml(yaml, s, None) {
            Ok(_) => vec![],
            Err(e) => e.problems().iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn good_config_loads_and_resolves_secrets() {
        let c = Config::from_yaml(GOOD, &secrets(), None).expect("valid");
        assert_eq!(c.projects.len(), 2);
        match &c.projects["web"].credentials {
            Credentials::Keystone { password, .. } => assert_eq!(password.expose(), "pw"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            c.project("9a1f3c5e7b2d4f6a8c0e1b3d5f7a9c2e").unwrap().alias,
            "batch"
        );
        assert_eq!(c.project_by_appkey("WebAppKey0001").unwrap().alias, "web");
        assert_eq!(c.upstream.request_timeout, Duration::from_secs(30));
    }

    #[test]
    fn debug_of_config_shows_no_secret() {
        let c = Config::from_yaml(GOOD, &secrets(), None).expect("valid");
        let shown = format!("{c:?}");
        assert!(!shown.contains("0123456789abcdef"));
        assert!(!shown.contains("\"pw\""));
    }

    #[test]
    fn unknown_key_names_its_path() {
        let yaml = GOOD.replace("password_env: WEB_PW", "password: hunter2");
        let p = problems(&yaml, &secrets());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("projects.web.credentials"), "{p:?}");
        assert!(p[0].contains("unknown field `password`"), "{p:?}");
    }

    #[test]
    fn wrong_type_names_its_path() {
        let yaml = GOOD.replace("projects: [web]", "projects: web");
        let yaml = yaml.replace(
            "    allow: [{ actions: [instance.read, \"keypair.*\"] }]\n",
            "",
        );
        let p = problems(&yaml, &secrets());
        assert!(p[0].starts_with("teams.web-team.projects"), "{p:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_path() {
        let yaml = GOOD
            .replace("[HS256]", "[HS256, none]")
            .replace("projects: [web]", "projects: [web, nope]")
            .replace("https://idp.example.com", "\"\"");
        let p = problems(&yaml, &SecretSource::default().with_override("WEB_PW", "x"));
        let joined = p.join("\n");
        assert!(
            joined.contains("auth.algorithms[1]: `none` is not allowed"),
            "{joined}"
        );
        assert!(
            joined.contains("teams.web-team.projects[1]: unknown project `nope`"),
            "{joined}"
        );
        assert!(
            joined.contains("auth.issuer: must not be empty"),
            "{joined}"
        );
        assert!(
            joined.contains("auth.keys.secret_env: environment variable `JWT_SECRET` is not set"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "projects.batch.credentials.secret_access_key_env: environment variable `BATCH_SK` is not set"
            ),
            "{joined}"
        );
    }

    #[test]
    fn mixing_hmac_and_public_key_algorithms_is_refused() {
        let yaml = GOOD.replace("[HS256]", "[HS256, RS256]");
        let p = problems(&yaml, &secrets());
        assert!(p.iter().any(|m| m.contains("algorithm confusion")), "{p:?}");
    }

    #[test]
    fn short_hs_secret_is_refused() {
        let s = secrets().with_override("JWT_SECRET", "short");
        let p = problems(GOOD, &s);
        assert!(p.iter().any(|m| m.contains("at least 32 bytes")), "{p:?}");
    }

    #[test]
    fn duplicate_tenant_and_missing_secret_reference() {
        let yaml = GOOD
            .replace(
                "9a1f3c5e7b2d4f6a8c0e1b3d5f7a9c2e",
                "6cdebe3eb0094910bc41f1d42ebe4cb7",
            )
            .replace(", password_env: WEB_PW", "");
        let p = problems(&yaml, &secrets()).join("\n");
        assert!(p.contains("is already used by project"), "{p}");
        assert!(
            p.contains("projects.web.credentials: `password_env` or `password_file` is required"),
            "{p}"
        );
    }

    #[test]
    fn bad_yaml_and_empty_file_are_clear() {
        assert!(problems("listen: [", &secrets())[0].contains("not valid YAML"));
        assert!(problems("", &secrets())[0].contains("empty"));
    }
}
