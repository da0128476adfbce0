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
//!
//! Layout: this module holds the validated model and the public helpers;
//! `file` the schema as written (serde attributes, defaults) and its parse;
//! `validate` the rules that turn one into the other.

mod file;
mod validate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::action::Action;
use crate::secret::Secret;

// The schema types keep the public paths they had before the split.
pub use file::{
    AllowRuleFile, AuditFile, AuditFileSink, AuditRuleFile, AuditWebhookFile, AuthFile,
    BackendKind, ConfigFile, ConstraintsFile, CredentialsFile, GlobalRateFile, KeysFile,
    ListenFile, OneOrMany, PemKeyFile, ProjectFile, RateLimitFile, RateRuleFile, RedisFile,
    RedisTlsFile, ServerFile, TeamFile, TlsFile, TokenFile, UpstreamFile,
};

/// Where `*_env` references are resolved. The process environment in
/// production; `demo` and tests add their own values without touching the
/// process environment.
#[derive(Clone, Default)]
pub struct SecretSource {
    overrides: HashMap<String, String>,
    /// Judging rules only (`toastgate replay`): no secret is resolved and no
    /// file the config names is read; each secret is a placeholder.
    offline: bool,
}

impl SecretSource {
    pub fn process_env() -> Self {
        Self::default()
    }

    /// For tools that judge a config's rules without running it: secrets
    /// and the files the config names (keys, certificates) are not needed,
    /// so a config change can be checked where they are not (CI).
    pub fn offline() -> Self {
        SecretSource {
            offline: true,
            ..Self::default()
        }
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
    pub idempotency: Idempotency,
    /// Span export; None: off.
    pub traces: Option<TraceExport>,
}

/// How spans leave: the OTLP/HTTP endpoint and what the exporter needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceExport {
    pub endpoint: String,
    pub service_name: String,
    pub sample_ratio: f64,
    pub batch_delay: Duration,
}

/// `Idempotency-Key` settings (the idempotency module uses them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Idempotency {
    pub window: Duration,
    pub max_entries: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub identity_url: String,
    pub compute_url: String,
    pub compute_v1_url: Option<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub identity_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub max_connections: usize,
    pub queue_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
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
    pub body_read_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub http2_max_streams: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Auth {
    pub issuer: String,
    pub audience: Vec<String>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub team_claim: String,
    pub leeway: Duration,
    /// Capacity of the verified-token cache (0: verify every request).
    pub verified_token_cache: u64,
    pub keys: KeySource,
}

#[derive(Debug, Clone, PartialEq)]
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
    /// What identifies this project's cloud token (made once, at load).
    pub token_key: TokenKey,
}

/// What identifies a cloud token: where it comes from and for whom. Never
/// less, so a token is never reused for another user or another identity
/// endpoint (for example after a reload that changes the credentials).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenKey {
    pub identity_url: String,
    pub tenant_id: String,
    pub user: String,
}

impl TokenKey {
    pub fn of(upstream: &Upstream, tenant_id: &str, credentials: &Credentials) -> TokenKey {
        match credentials {
            Credentials::Keystone { username, .. } => TokenKey {
                identity_url: upstream.identity_url.clone(),
                tenant_id: tenant_id.to_string(),
                user: username.clone(),
            },
            Credentials::Appkey {
                appkey,
                access_key_id,
                ..
            } => TokenKey {
                identity_url: format!(
                    "{}/v1.0/appkeys/{appkey}",
                    upstream.compute_v1_url.as_deref().unwrap_or_default()
                ),
                tenant_id: tenant_id.to_string(),
                user: access_key_id.clone(),
            },
        }
    }
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
    /// Units one request of an Action takes (Actions not listed: 1).
    pub costs: BTreeMap<Action, u32>,
}

impl RateRule {
    /// What one request of `action` takes from this rule's budget.
    pub fn cost_of(&self, action: Action) -> u32 {
        self.costs.get(&action).copied().unwrap_or(1)
    }
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
    pub webhook: Option<AuditWebhook>,
    pub fail_closed: bool,
    pub rules: Vec<(BTreeSet<Action>, AuditLevel)>,
    pub refusal_records: RefusalRecords,
}

/// Refusal records written per caller (a team, or all callers without a
/// valid JWT together), GCRA; the rest are counted (`suppressed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalRecords {
    pub rate: Rate,
    pub burst: u32,
}

impl Default for RefusalRecords {
    /// 10 a second, 100 at once: far above what a caller's honest mistakes
    /// produce, far below what a flood would write.
    fn default() -> Self {
        RefusalRecords {
            rate: Rate {
                count: 10,
                per: Duration::from_secs(1),
            },
            burst: 100,
        }
    }
}

/// Shipping the audit file's records to an HTTP receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditWebhook {
    pub url: String,
    pub bearer_token: Option<Secret>,
    pub batch_max: usize,
    pub timeout: Duration,
    pub max_backlog_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditFileConfig {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub keep: u32,
    pub fsync: FsyncPolicy,
}

/// When written records are forced to disk.
#[derive(Debug, Deserialize, schemars::JsonSchema, Default, Clone, Copy, PartialEq, Eq)]
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

/// How much of a request is recorded (after Kubernetes' audit levels).
#[derive(
    Debug,
    Deserialize,
    schemars::JsonSchema,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum AuditLevel {
    /// Not recorded (refusals are recorded all the same).
    None,
    /// Who, what, on what, outcome.
    Metadata,
    /// Metadata plus a redacted summary of the request body.
    Request,
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
        cluster: bool,
        /// Read and checked at load (`check-config` and `serve` agree).
        tls: Option<RedisTls>,
    },
}

/// PEM contents for a `rediss://` connection.
#[derive(Clone)]
pub struct RedisTls {
    /// The CA bundle to trust instead of the system's roots.
    pub root_cert: Option<Vec<u8>>,
    /// Client certificate chain and its private key (a secret).
    pub client: Option<(Vec<u8>, Secret)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("root_cert", &self.root_cert.as_ref().map(|_| "<pem>"))
            .field(
                "client",
                &self
                    .client
                    .as_ref()
                    .map(|_| "<certificate and [redacted] key>"),
            )
            .finish()
    }
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
mod tests;

/// The JSON Schema (draft 2020-12) of the config file, generated from the
/// types it is read into: what editors use to complete and check it
/// (`toastgate check-config --schema`). Values are checked further at load.
pub fn json_schema() -> String {
    let mut schema = schemars::schema_for!(ConfigFile);
    schema.insert(
        "title".into(),
        serde_json::Value::from("toastgate configuration"),
    );
    serde_json::to_string_pretty(&schema).expect("a schema is JSON")
}
