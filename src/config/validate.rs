//! From the file schema to the validated model: every rule checked, every
//! secret reference resolved, and *all* problems collected, each with the
//! key path it concerns.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::file::{
    AllowRuleFile, AuditFile, AuditWebhookFile, AuthFile, BackendKind, ConfigFile, ConstraintsFile,
    CredentialsFile, IdempotencyFile, KeysFile, ProjectFile, RateCostFile, RateLimitFile,
    RedisTlsFile, ServerFile, TeamFile, TlsFile, TokenFile, TracesFile, UpstreamFile,
};
use super::{
    AllowRule, Audit, AuditFileConfig, AuditLevel, AuditWebhook, Auth, Backend, Config,
    ConfigError, ConfigProblem, Constraints, Credentials, Idempotency, KeySource, Listen, Project,
    Rate, RateLimits, RateRule, RedisTls, RefusalRecords, SecretSource, Server, Team, TlsFiles,
    TokenKey, TokenPolicy, Upstream, parse_algorithm, parse_rate,
};
use crate::action::Action;
use crate::secret::Secret;

/// A bound on the verified-token cache: each entry holds a whole caller
/// token, so a mistyped extra digit should not become gigabytes.
const MAX_VERIFIED_TOKEN_CACHE: u64 = 1_000_000;

/// How long a compute call waits for a free connection, unless
/// `upstream.queue_timeout` says otherwise (and at most half of
/// `upstream.request_timeout`).
const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// Descriptors kept beside the public listener's and the compute
/// connections: the admin listener's 64 connections, and 64 for the rest
/// (standard streams, listening sockets, the audit file, Redis, identity,
/// JWKS, webhook and OTLP calls...).
const OTHER_DESCRIPTORS: usize = 128;

/// Beyond any file limit a process gets.
const MAX_UPSTREAM_CONNECTIONS: usize = 1_000_000;

/// The compute connections the open-file limit leaves beside the public
/// listener's cap and [`OTHER_DESCRIPTORS`]: between 16 and 1024, 1024
/// where the limit is unknown.
fn default_upstream_connections(file_limit: Option<usize>, listener_cap: usize) -> usize {
    file_limit
        .map_or(1024, |limit| {
            limit.saturating_sub(listener_cap.saturating_add(OTHER_DESCRIPTORS))
        })
        .clamp(16, 1024)
}

impl ConfigFile {
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
        // The same port on an overlapping address cannot be bound twice:
        // equal, or one of them unspecified (`0.0.0.0` covers its family,
        // `[::]` both, as Linux binds it dual-stack).
        let (p, a) = (listen.public.ip(), listen.admin.ip());
        let v6_any = |ip: std::net::IpAddr| ip.is_ipv6() && ip.is_unspecified();
        let overlapping = p == a
            || v6_any(p)
            || v6_any(a)
            || (p.is_ipv4() == a.is_ipv4() && (p.is_unspecified() || a.is_unspecified()));
        if overlapping && listen.public.port() == listen.admin.port() && listen.public.port() != 0 {
            v.problem("listen.admin", "must differ from listen.public");
        }
        let server = v.server(self.server);
        let upstream = v.upstream(self.upstream, server.max_connections);
        let token = v.token(self.token);
        let auth = v.auth(self.auth);
        let projects = v.projects(self.projects, &upstream);
        let teams = v.teams(self.teams, &projects);
        let rate_limit = v.rate_limit(self.rate_limit);
        let audit = v.audit(self.audit);
        let idempotency = v.idempotency(self.idempotency);
        let traces = v.traces(self.traces);
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
                idempotency,
                traces,
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

    /// A base URL (others are made from it): no query or fragment.
    fn url(&mut self, path: &str, text: &str) -> String {
        self.checked_url(path, text, Endpoint::Base)
    }

    /// A URL used as written (a webhook, an OTLP endpoint): a query is
    /// the receiver's business; still no fragment and no credentials.
    fn endpoint_url(&mut self, path: &str, text: &str) {
        self.checked_url(path, text, Endpoint::AsWritten);
    }

    fn checked_url(&mut self, path: &str, text: &str, kind: Endpoint) -> String {
        // Problems quote the URL, unless it may hold a password.
        let shown = if text.contains('@') {
            "the URL (not repeated: it holds an `@`, maybe credentials)".to_string()
        } else {
            format!("`{text}`")
        };
        match url::Url::parse(text) {
            Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && u.has_host() => {
                if u.fragment().is_some() || (kind == Endpoint::Base && u.query().is_some()) {
                    self.problem(
                        path,
                        match kind {
                            Endpoint::Base => "must not carry a query or fragment",
                            Endpoint::AsWritten => "must not carry a fragment",
                        },
                    );
                }
                if !u.username().is_empty() || u.password().is_some() {
                    self.problem(path, "must not carry credentials (user or password)");
                } else if text.parse::<http::Uri>().is_err() {
                    // What the URL crate accepts, the HTTP client may not (a
                    // non-ASCII host, say): refused here rather than on
                    // every request.
                    self.problem(
                        path,
                        format!("{shown} is not a URL the HTTP client accepts (non-ASCII or unescaped characters?)"),
                    );
                }
                text.trim_end_matches('/').to_string()
            }
            Ok(_) => {
                self.problem(path, format!("{shown} must be an http(s) URL with a host"));
                String::new()
            }
            Err(e) => {
                self.problem(path, format!("{shown} is not a URL: {e}"));
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
        if self.secrets.offline && (env.is_some() || file.is_some()) {
            // Shaped like what the checks below expect of a real one.
            return Secret::new(match name {
                "url" => "redis://offline.invalid:6379/0",
                _ => "offline-placeholder-0123456789abcdef0123456789abcdef",
            });
        }
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
        if !self.secrets.offline
            && let Err(e) = crate::tls::load_certified_key(&files.cert_file, &files.key_file)
        {
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

    fn upstream(&mut self, u: UpstreamFile, listener_cap: usize) -> Upstream {
        let compute_v1_url = u
            .compute_v1_url
            .as_deref()
            .map(|t| self.url("upstream.compute_v1_url", t));
        if let Some(ca) = &u.ca_file
            && !self.secrets.offline
            && !self.resolve_path(ca).is_file()
        {
            self.problem(
                "upstream.ca_file",
                format!("`{}` is not a readable file", ca.display()),
            );
        }
        let file_limit = crate::listener::open_files_soft_limit();
        let max_connections = match u.max_connections {
            Some(0) => {
                self.problem("upstream.max_connections", "must be greater than zero");
                1
            }
            Some(n) if n > MAX_UPSTREAM_CONNECTIONS => {
                self.problem(
                    "upstream.max_connections",
                    format!("must be at most {MAX_UPSTREAM_CONNECTIONS}"),
                );
                MAX_UPSTREAM_CONNECTIONS
            }
            Some(n) => {
                if let Some(limit) = file_limit
                    && listener_cap
                        .saturating_add(n)
                        .saturating_add(OTHER_DESCRIPTORS)
                        > limit
                {
                    self.problem(
                        "upstream.max_connections",
                        format!(
                            "{n} with server.max_connections ({listener_cap}) and {OTHER_DESCRIPTORS} for the admin listener and the rest exceeds this process's open-file limit ({limit}): the gateway would run out of descriptors first"
                        ),
                    );
                }
                n
            }
            None => default_upstream_connections(file_limit, listener_cap),
        };
        let queue_timeout = match u.queue_timeout {
            Some(t) => {
                let t = self.positive("upstream.queue_timeout", t);
                if t >= u.request_timeout {
                    self.problem(
                        "upstream.queue_timeout",
                        format!(
                            "must be less than upstream.request_timeout ({:?}): a call that waited that long has no time left to run",
                            u.request_timeout
                        ),
                    );
                }
                t
            }
            None => DEFAULT_QUEUE_TIMEOUT.min(u.request_timeout / 2),
        };
        Upstream {
            identity_url: self.url("upstream.identity_url", &u.identity_url),
            compute_url: self.url("upstream.compute_url", &u.compute_url),
            compute_v1_url,
            max_connections,
            queue_timeout,
            connect_timeout: self.positive("upstream.connect_timeout", u.connect_timeout),
            request_timeout: self.positive("upstream.request_timeout", u.request_timeout),
            identity_timeout: self.positive("upstream.identity_timeout", u.identity_timeout),
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
        let max_connections = match s.max_connections {
            Some(0) => {
                self.problem("server.max_connections", "must be greater than zero");
                1
            }
            Some(n) => {
                if let Some(limit) = crate::listener::open_files_soft_limit()
                    && n >= limit
                {
                    self.problem(
                        "server.max_connections",
                        format!("{n} is not below this process's open-file limit ({limit}): the gateway would run out of descriptors first"),
                    );
                }
                n
            }
            None => crate::listener::default_max_connections(),
        };
        if s.http2_max_streams == 0 {
            self.problem("server.http2_max_streams", "must be greater than zero");
        }
        Server {
            request_timeout: self.positive("server.request_timeout", s.request_timeout),
            body_limit_bytes: s.body_limit_bytes,
            shutdown_grace: s.shutdown_grace,
            drain_delay: s.drain_delay,
            public_url,
            body_read_timeout: self.positive("server.body_read_timeout", s.body_read_timeout),
            header_read_timeout: self.positive("server.header_read_timeout", s.header_read_timeout),
            idle_timeout: self.positive("server.idle_timeout", s.idle_timeout),
            max_connections,
            http2_max_streams: s.http2_max_streams,
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
        if a.verified_token_cache > MAX_VERIFIED_TOKEN_CACHE {
            self.problem(
                "auth.verified_token_cache",
                format!("must be at most {MAX_VERIFIED_TOKEN_CACHE}"),
            );
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
                if !self.secrets.offline && !full.is_file() {
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
                    if !self.secrets.offline && !full.is_file() {
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
            verified_token_cache: a.verified_token_cache,
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
            let token_key = TokenKey::of(upstream, &p.tenant_id, &credentials);
            out.insert(
                alias.clone(),
                Arc::new(Project {
                    alias,
                    tenant_id: p.tenant_id,
                    appkey: p.appkey,
                    region: p.region,
                    credentials,
                    token_key,
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
                let costs = self.costs(&path, r.costs, burst);
                rate_limits.push(RateRule {
                    name: r.name,
                    actions,
                    rate,
                    burst,
                    costs,
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
                Some(dir)
                    if !self.secrets.offline && !dir.as_os_str().is_empty() && !dir.is_dir() =>
                {
                    self.problem(
                        "audit.file.path",
                        format!("folder `{}` does not exist", dir.display()),
                    )
                }
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
        let webhook = a.webhook.map(|w| self.audit_webhook(w, file.as_ref()));
        let refusal_records = match a.refusal_records {
            Some(r) => {
                let rate = self.rate("audit.refusal_records.rate", &r.rate);
                let burst = self.burst("audit.refusal_records.burst", r.burst, &rate);
                RefusalRecords { rate, burst }
            }
            None => RefusalRecords::default(),
        };
        Audit {
            file,
            stdout: a.stdout,
            webhook,
            fail_closed: a.fail_closed,
            rules,
            refusal_records,
        }
    }

    fn rate_limit(&mut self, r: RateLimitFile) -> RateLimits {
        let fail_open = self.action_patterns("rate_limit.fail_open", &r.fail_open);
        let global = r.global.map(|g| {
            let rate = self.rate("rate_limit.global.rate", &g.rate);
            let burst = self.burst("rate_limit.global.burst", g.burst, &rate);
            let costs = self.costs("rate_limit.global", g.costs, burst);
            RateRule {
                name: "global".to_string(),
                actions: Action::ALL.iter().copied().collect(),
                rate,
                burst,
                costs,
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
                let tls_url = url.expose().starts_with("rediss://");
                let scheme_ok = url.expose().starts_with("redis://") || tls_url;
                if !url.is_empty() && !scheme_ok {
                    // Never echo the value: it may hold a password.
                    self.problem(
                        "rate_limit.redis",
                        "the Redis URL must start with redis:// or rediss:// (TLS)",
                    );
                } else if !url.is_empty() {
                    match redis::IntoConnectionInfo::into_connection_info(url.expose()) {
                        // The redis crate's parse errors are static text, never the input.
                        Err(e) => self.problem(
                            "rate_limit.redis",
                            format!(
                                "the Redis URL is not valid: {}",
                                e.detail().unwrap_or("malformed")
                            ),
                        ),
                        Ok(info)
                            if matches!(
                                info.addr(),
                                redis::ConnectionAddr::TcpTls { insecure: true, .. }
                            ) =>
                        {
                            self.problem(
                                "rate_limit.redis",
                                "`#insecure` (no server certificate check) is not supported: \
                                 name the server's CA in `tls.ca_file`",
                            )
                        }
                        Ok(_) => {}
                    }
                }
                let key_prefix_ok = !redis.key_prefix.is_empty()
                    && !redis.key_prefix.contains(['{', '}'])
                    && !redis
                        .key_prefix
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control());
                if !key_prefix_ok {
                    self.problem(
                        "rate_limit.redis.key_prefix",
                        "must be non-empty, without braces (toastgate adds the cluster hash tag) or spaces",
                    );
                }
                let tls = match redis.tls {
                    Some(_) if !url.is_empty() && !tls_url => {
                        self.problem("rate_limit.redis.tls", "is only used with a rediss:// URL");
                        None
                    }
                    Some(t) => self.redis_tls(t),
                    None => None,
                };
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
                    cluster: redis.cluster,
                    tls,
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

impl Validator<'_> {
    /// Cost per Action, first match wins. A cost over the burst could
    /// never be paid: refused here rather than refusing every such request.
    fn costs(&mut self, path: &str, costs: Vec<RateCostFile>, burst: u32) -> BTreeMap<Action, u32> {
        let mut out = BTreeMap::new();
        for (i, c) in costs.into_iter().enumerate() {
            let at = format!("{path}.costs[{i}]");
            if c.cost == 0 || c.cost > burst {
                self.problem(
                    format!("{at}.cost"),
                    format!("must be between 1 and the rule's burst ({burst})"),
                );
            }
            for action in self.action_patterns(&format!("{at}.actions"), &c.actions) {
                out.entry(action).or_insert(c.cost.clamp(1, burst.max(1)));
            }
        }
        out
    }

    fn traces(&mut self, t: TracesFile) -> Option<super::TraceExport> {
        let Some(endpoint) = t.otlp_endpoint else {
            if t.service_name.is_some() || t.sample_ratio.is_some() || t.batch_delay.is_some() {
                self.problem(
                    "traces",
                    "set `otlp_endpoint` to export spans (the other keys configure it)",
                );
            }
            return None;
        };
        // The shared URL checks (no credentials, one the client accepts);
        // the endpoint is used as written.
        self.endpoint_url("traces.otlp_endpoint", &endpoint);
        let sample_ratio = t.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            self.problem("traces.sample_ratio", "must be between 0 and 1");
        }
        let batch_delay = t.batch_delay.unwrap_or(Duration::from_secs(5));
        if batch_delay.is_zero() || batch_delay > Duration::from_secs(60) {
            self.problem("traces.batch_delay", "must be between 1ms and 60s");
        }
        let service_name = t.service_name.unwrap_or_else(|| "toastgate".to_string());
        if service_name.trim().is_empty() {
            self.problem("traces.service_name", "must not be empty");
        }
        Some(super::TraceExport {
            endpoint,
            service_name,
            sample_ratio,
            batch_delay,
        })
    }

    fn idempotency(&mut self, i: IdempotencyFile) -> Idempotency {
        if i.window < Duration::from_secs(1) || i.window > Duration::from_secs(7 * 24 * 3600) {
            self.problem("idempotency.window", "must be between 1s and 7 days");
        }
        if i.max_entries == 0 {
            self.problem("idempotency.max_entries", "must be at least 1");
        }
        Idempotency {
            window: i.window,
            max_entries: i.max_entries,
        }
    }

    fn audit_webhook(
        &mut self,
        w: AuditWebhookFile,
        file: Option<&AuditFileConfig>,
    ) -> AuditWebhook {
        // What rotation keeps: a backlog beyond it would be deleted unsent.
        let kept = file.map(|f| f.max_bytes.saturating_mul(u64::from(f.keep)));
        let max_backlog_bytes = w
            .max_backlog_bytes
            .unwrap_or_else(|| (64 * 1024 * 1024).min(kept.unwrap_or(0) / 2));
        match kept {
            None => self.problem(
                "audit.webhook",
                "needs `audit.file`: the durable spool the webhook is fed from",
            ),
            Some(0) => self.problem(
                "audit.file.keep",
                "must be at least 1 with `audit.webhook` (rotated files hold what is not sent yet)",
            ),
            Some(kept) if max_backlog_bytes > kept => self.problem(
                "audit.webhook.max_backlog_bytes",
                format!(
                    "must be at most audit.file.max_bytes x keep ({kept}): rotation would delete records not yet sent"
                ),
            ),
            Some(_) => {}
        }
        // The shared URL checks (no credentials: the token goes in
        // `bearer_token_*`; one the client accepts); used as written.
        self.endpoint_url("audit.webhook.url", &w.url);
        if w.batch_max == 0 || w.batch_max > 10_000 {
            self.problem("audit.webhook.batch_max", "must be between 1 and 10000");
        }
        if w.timeout.is_zero() {
            self.problem("audit.webhook.timeout", "must be positive");
        }
        let bearer_token = match (w.bearer_token_env, w.bearer_token_file) {
            (None, None) => None,
            (env, file) => Some(self.secret("audit.webhook", "bearer_token", env, file)),
        };
        AuditWebhook {
            url: w.url,
            bearer_token,
            batch_max: w.batch_max,
            timeout: w.timeout,
            max_backlog_bytes,
        }
    }

    /// Reads the Redis TLS files now, so that a bad file is a config problem
    /// naming its key rather than a connection failure later.
    fn redis_tls(&mut self, t: RedisTlsFile) -> Option<RedisTls> {
        if self.secrets.offline {
            return Some(RedisTls {
                root_cert: None,
                client: None,
            });
        }
        let root_cert = t.ca_file.and_then(|ca| {
            let path = self.resolve_path(&ca);
            match crate::tls::read_certificates(&path) {
                Ok(_) => std::fs::read(&path).ok(),
                Err(e) => {
                    self.problem("rate_limit.redis.tls.ca_file", e.to_string());
                    None
                }
            }
        });
        let client = match (t.cert_file, t.key_file) {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                self.problem(
                    "rate_limit.redis.tls",
                    "`cert_file` and `key_file` go together (a client certificate and its key)",
                );
                None
            }
            (Some(cert), Some(key)) => {
                let (cert, key) = (self.resolve_path(&cert), self.resolve_path(&key));
                match crate::tls::load_certified_key(&cert, &key) {
                    Ok(_) => match (std::fs::read(&cert), std::fs::read_to_string(&key)) {
                        (Ok(c), Ok(k)) => Some((c, Secret::new(k))),
                        _ => {
                            self.problem(
                                "rate_limit.redis.tls",
                                "the client certificate files could not be read",
                            );
                            None
                        }
                    },
                    Err(e) => {
                        let key_name = match e {
                            crate::tls::TlsError::Key(..) => "rate_limit.redis.tls.key_file",
                            _ => "rate_limit.redis.tls.cert_file",
                        };
                        self.problem(key_name, e.to_string());
                        None
                    }
                }
            }
        };
        Some(RedisTls { root_cert, client })
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// What a URL in the config is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// A base the gateway appends paths to.
    Base,
    /// Called exactly as written.
    AsWritten,
}

#[cfg(test)]
mod tests {
    use super::default_upstream_connections;

    #[test]
    fn compute_connections_default_to_what_the_file_limit_leaves() {
        // A soft limit of 1024: the listener's default cap (832) leaves 64.
        assert_eq!(default_upstream_connections(Some(1024), 832), 64);
        // Docker's 1048576: the listener's 10,000, and the 1024 ceiling.
        assert_eq!(default_upstream_connections(Some(1_048_576), 10_000), 1024);
        // Nothing left (an explicit listener cap near the limit): the floor.
        assert_eq!(default_upstream_connections(Some(1024), 1000), 16);
        assert_eq!(default_upstream_connections(None, 10_000), 1024);
        assert_eq!(
            default_upstream_connections(Some(usize::MAX), usize::MAX),
            16
        );
    }
}
