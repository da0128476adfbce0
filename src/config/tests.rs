//! Unit tests of loading and validation: structure errors, semantic
//! problems and secret resolution, each reported with its key path.

use super::*;

use serde_json::{Map, Value, json};

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
fn verified_token_cache_is_bounded_and_may_be_off() {
    let with = |n: &str| {
        GOOD.replace(
            "  algorithms:",
            &format!("  verified_token_cache: {n}\n  algorithms:"),
        )
    };
    let p = problems(&with("1000001"), &secrets());
    assert_eq!(
        p,
        ["auth.verified_token_cache: must be at most 1000000"],
        "{p:?}"
    );
    let p = problems(&with("-1"), &secrets());
    assert!(
        p.len() == 1 && p[0].starts_with("auth.verified_token_cache: "),
        "{p:?}"
    );
    for n in ["0", "1000000"] {
        let config = Config::from_yaml(&with(n), &secrets(), None)
            .unwrap_or_else(|e| panic!("{n}: {:?}", e.problems()));
        assert_eq!(config.auth.verified_token_cache.to_string(), n);
    }
    let default = Config::from_yaml(GOOD, &secrets(), None).expect("GOOD loads");
    assert_eq!(default.auth.verified_token_cache, 10_000);
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

/// A temp folder for files the config names, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("toastgate-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The mapping at `path` (`teams.web-team.allow[0]`; "" is the top level).
fn mapping_at<'v>(config: &'v mut Value, path: &str) -> &'v mut Map<String, Value> {
    let mut at = config;
    for segment in path.split('.').filter(|s| !s.is_empty()) {
        let (key, index) = match segment.split_once('[') {
            Some((key, index)) => (key, index.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        at = &mut at[key];
        if let Some(index) = index {
            at = &mut at[index];
        }
    }
    at.as_object_mut()
        .unwrap_or_else(|| panic!("no mapping at `{path}`"))
}

#[test]
fn unknown_keys_are_refused_in_every_section_with_their_path() {
    let dir = TempDir::new();
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .and_then(|params| params.self_signed(&key))
        .expect("certificate");
    std::fs::write(dir.0.join("tls-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.0.join("tls-key.pem"), key.serialize_pem()).unwrap();
    // The load only checks that these exist.
    std::fs::write(dir.0.join("jwks.json"), r#"{"keys": []}"#).unwrap();
    std::fs::write(dir.0.join("idp.pem"), "").unwrap();

    // GOOD plus every optional section, so each place below exists. JSON is
    // YAML: rows edit this value and load its JSON text.
    let mut every: Value = serde_saphyr::from_str(GOOD).expect("GOOD is YAML");
    every["listen"]["tls"] = json!({"cert_file": "tls-cert.pem", "key_file": "tls-key.pem"});
    every["token"] = json!({"refresh_at": 0.8});
    every["server"] = json!({"body_limit_bytes": 4096});
    let team = &mut every["teams"]["web-team"];
    team["constraints"] = json!({"max_count": 2});
    team["rate_limits"] = json!([{"name": "reads", "actions": ["instance.read"], "rate": "10/s"}]);
    every["rate_limit"] = json!({
        "backend": "redis",
        "redis": {"url_env": "REDIS_URL", "tls": {"ca_file": "tls-cert.pem"}},
        "global": {"rate": "100/s"},
    });
    every["idempotency"] = json!({"window": "1h"});
    every["traces"] = json!({"otlp_endpoint": "http://collector:4318/v1/traces"});
    every["audit"] = json!({
        "file": {"path": "audit.log"},
        "webhook": {"url": "https://audit.example.com/in"},
        "rules": [{"actions": ["instance.read"], "level": "metadata"}],
    });
    let s = secrets().with_override("REDIS_URL", "rediss://127.0.0.1:6380");

    let check = |place: &str, reported: &str, keys: Option<&Value>| {
        let mut config = every.clone();
        if let Some(keys) = keys {
            config["auth"]["algorithms"] = json!(["RS256"]);
            config["auth"]["keys"] = keys.clone();
        }
        // Otherwise valid: without the extra key the config loads, so a
        // missing `deny_unknown_fields` fails the row.
        if let Err(e) = Config::from_yaml(&config.to_string(), &s, Some(&dir.0)) {
            panic!("{place}: the config without `bogus` should load:\n{e}");
        }
        mapping_at(&mut config, place).insert("bogus".to_string(), json!(1));
        let problems = match Config::from_yaml(&config.to_string(), &s, Some(&dir.0)) {
            Ok(_) => panic!("{place}: an unknown key was accepted"),
            Err(e) => e.problems(),
        };
        assert_eq!(problems.len(), 1, "{place}: {problems:?}");
        assert_eq!(problems[0].path, reported, "{place}: {problems:?}");
        assert!(
            problems[0].message.starts_with("unknown field `bogus`"),
            "{place}: {problems:?}"
        );
    };

    // Structs: the problem names the unknown key's own path.
    let structs = [
        "",
        "listen",
        "listen.tls",
        "upstream",
        "token",
        "server",
        "auth",
        "projects.web",
        "teams.web-team",
        "teams.web-team.allow[0]",
        "teams.web-team.constraints",
        "teams.web-team.rate_limits[0]",
        "rate_limit",
        "rate_limit.redis",
        "rate_limit.redis.tls",
        "rate_limit.global",
        "audit",
        "audit.file",
        "audit.webhook",
        "audit.rules[0]",
        "idempotency",
        "traces",
    ];
    for place in structs {
        let reported = format!("{place}.bogus");
        check(place, reported.trim_start_matches('.'), None);
    }

    // Internally tagged enums: serde reads a buffered copy of the mapping, so
    // the path names the enum. (The enum, where under it `bogus: 1` goes, the
    // `auth.keys` to use instead of GOOD's.)
    let jwks_url = json!({"type": "jwks_url", "url": "https://idp.example.com/jwks"});
    let jwks_file = json!({"type": "jwks_file", "path": "jwks.json"});
    let pem = json!({"type": "pem", "files": [{"path": "idp.pem"}]});
    let tagged = [
        ("auth.keys", "", None),
        ("auth.keys", "", Some(&jwks_url)),
        ("auth.keys", "", Some(&jwks_file)),
        ("auth.keys", "", Some(&pem)),
        ("auth.keys", "files[0]", Some(&pem)),
        ("projects.web.credentials", "", None),
        ("projects.batch.credentials", "", None),
    ];
    for (reported, under, keys) in tagged {
        let place = format!("{reported}.{under}");
        check(place.trim_end_matches('.'), reported, keys);
    }
}

#[test]
fn redis_tls_and_cluster_settings_are_checked_at_load() {
    let dir = TempDir::new();
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .and_then(|params| params.self_signed(&key))
        .expect("certificate");
    std::fs::write(dir.0.join("ca.pem"), cert.pem()).unwrap();
    std::fs::write(dir.0.join("client.pem"), cert.pem()).unwrap();
    std::fs::write(dir.0.join("client.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.0.join("not-pem.txt"), "hello").unwrap();
    let load = |url: &str, redis: Value| {
        let mut config: Value = serde_saphyr::from_str(GOOD).expect("GOOD is YAML");
        let mut block = json!({"url_env": "REDIS_URL"});
        block
            .as_object_mut()
            .unwrap()
            .extend(redis.as_object().unwrap().clone());
        config["rate_limit"] = json!({"backend": "redis", "redis": block});
        let s = secrets().with_override("REDIS_URL", url);
        Config::from_yaml(&config.to_string(), &s, Some(&dir.0)).map_err(|e| {
            e.problems()
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
        })
    };

    // Valid: TLS with a CA and a client certificate; a cluster seed.
    let ok = load(
        "rediss://:pw@127.0.0.1:6380",
        json!({"tls": {"ca_file": "ca.pem", "cert_file": "client.pem", "key_file": "client.key"}}),
    )
    .expect("valid");
    match &ok.rate_limit.backend {
        Backend::Redis {
            tls: Some(tls),
            cluster: false,
            ..
        } => {
            assert!(tls.root_cert.is_some() && tls.client.is_some());
            let shown = format!("{tls:?}");
            assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        }
        other => panic!("{other:?}"),
    }
    let cluster = load("redis://127.0.0.1:7000", json!({"cluster": true})).expect("valid");
    assert!(matches!(
        cluster.rate_limit.backend,
        Backend::Redis {
            cluster: true,
            tls: None,
            ..
        }
    ));

    // Each mistake is named by its key, and never echoes the URL.
    let rows: [(&str, Value, &str); 8] = [
        (
            "rediss://h:6379/#insecure",
            json!({}),
            "rate_limit.redis: `#insecure` (no server certificate check) is not supported",
        ),
        (
            "redis://h:6379",
            json!({"tls": {"ca_file": "ca.pem"}}),
            "rate_limit.redis.tls: is only used with a rediss:// URL",
        ),
        (
            "rediss://h:6379",
            json!({"tls": {"cert_file": "client.pem"}}),
            "rate_limit.redis.tls: `cert_file` and `key_file` go together",
        ),
        (
            "rediss://h:6379",
            json!({"tls": {"ca_file": "missing.pem"}}),
            "rate_limit.redis.tls.ca_file: cannot read certificate file",
        ),
        (
            "rediss://h:6379",
            json!({"tls": {"ca_file": "not-pem.txt"}}),
            "rate_limit.redis.tls.ca_file: cannot read certificate file",
        ),
        (
            "rediss://h:6379",
            json!({"tls": {"cert_file": "client.pem", "key_file": "ca.pem"}}),
            "rate_limit.redis.tls.key_file: cannot read key file",
        ),
        (
            "redis://:hunter2@h:notaport",
            json!({}),
            "rate_limit.redis: the Redis URL is not valid",
        ),
        (
            "redis://h:6379",
            json!({"key_prefix": "{tg}"}),
            "rate_limit.redis.key_prefix: must be non-empty, without braces",
        ),
    ];
    for (url, redis, expected) in rows {
        let problems = load(url, redis.clone()).expect_err(expected);
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "{url} {redis}: {problems:?}"
        );
        assert!(!problems.join(" ").contains("hunter2"), "{problems:?}");
    }
}

#[test]
fn every_structural_problem_is_reported_not_just_the_first() {
    let yaml = GOOD
        .replace(
            "listen: { public: \"127.0.0.1:8080\", admin: \"127.0.0.1:9090\" }",
            "listen: { public: \"127.0.0.1:8080\", admin: \"127.0.0.1:9090\", bogus: 1 }",
        )
        .replace("password_env: WEB_PW", "password: hunter2")
        .replace("algorithms: [HS256]", "algorithms: HS256")
        .replace(
            "    projects: [web]\n",
            "    projects: [web]\n    colour: blue\n",
        );
    let p = problems(&yaml, &secrets());
    let expected = [
        "listen.bogus: unknown field `bogus`",
        "projects.web.credentials: unknown field `password`",
        "auth.algorithms: invalid type: string \"HS256\", expected a sequence",
        "teams.web-team.colour: unknown field `colour`",
    ];
    assert_eq!(p.len(), expected.len(), "{p:#?}");
    for e in expected {
        assert!(
            p.iter().any(|p| p.starts_with(e)),
            "missing `{e}` in {p:#?}"
        );
    }
    assert!(!p.join(" ").contains("missing field"), "{p:#?}");

    // Several in one section: reported in the file's order.
    let yaml = GOOD.replace(
        "listen: { public: \"127.0.0.1:8080\", admin: \"127.0.0.1:9090\" }",
        "listen: { zz: 1, public: \"127.0.0.1:8080\", aa: 2, admin: \"127.0.0.1:9090\", mm: 3 }",
    );
    let p = problems(&yaml, &secrets());
    let fields: Vec<&str> = p.iter().map(|p| &p[..p.find(':').unwrap()]).collect();
    assert_eq!(fields, ["listen.zz", "listen.aa", "listen.mm"], "{p:#?}");

    // A missing required key is reported, and ends the search.
    let yaml = GOOD.replace("  audience: toastgate\n", "");
    let p = problems(&yaml, &secrets());
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("auth: missing field `audience`"), "{p:#?}");
}

#[test]
fn the_admin_listener_defaults_to_loopback_9090() {
    let yaml = GOOD.replace(", admin: \"127.0.0.1:9090\"", "");
    assert!(!yaml.contains("admin:"));
    let c = Config::from_yaml(&yaml, &secrets(), None).expect("valid");
    assert_eq!(c.listen.admin.to_string(), "127.0.0.1:9090");
}

#[test]
fn the_audit_webhook_needs_the_file_spool_and_a_backlog_rotation_keeps() {
    let dir = TempDir::new();
    let load = |audit: Value| {
        let mut config: Value = serde_saphyr::from_str(GOOD).expect("GOOD is YAML");
        config["audit"] = audit;
        let s = secrets().with_override("HOOK_TOKEN", "hook-secret-123");
        Config::from_yaml(&config.to_string(), &s, Some(&dir.0)).map_err(|e| {
            e.problems()
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
        })
    };
    let file = json!({"path": "audit.jsonl", "max_bytes": 1_000_000, "keep": 4});
    let ok = load(json!({"file": file, "webhook": {
        "url": "https://audit.example.com/ingest", "bearer_token_env": "HOOK_TOKEN",
    }}))
    .expect("valid");
    let hook = ok.audit.webhook.as_ref().expect("webhook");
    assert_eq!(
        hook.bearer_token.as_ref().unwrap().expose(),
        "hook-secret-123"
    );
    assert_eq!(
        (hook.batch_max, hook.timeout),
        (100, Duration::from_secs(5))
    );
    assert!(!format!("{ok:?}").contains("hook-secret-123"));
    assert_eq!(ok.audit.refusal_records, RefusalRecords::default());
    // A query is the receiver's business (a function key, a source tag).
    let queried = load(json!({"file": file, "webhook": {
        "url": "https://audit.example.com/ingest?source=toastgate"
    }}))
    .expect("valid");
    assert_eq!(
        queried.audit.webhook.unwrap().url,
        "https://audit.example.com/ingest?source=toastgate"
    );
    let limited = load(json!({"file": file, "refusal_records": {"rate": "2/m"}})).expect("valid");
    assert_eq!(
        limited.audit.refusal_records,
        RefusalRecords {
            rate: Rate {
                count: 2,
                per: Duration::from_secs(60)
            },
            burst: 2
        },
        "burst defaults to the rate's N"
    );

    let rows = [
        (
            json!({"stdout": true, "webhook": {"url": "https://a.example"}}),
            "audit.webhook: needs `audit.file`",
        ),
        (
            json!({"file": file, "webhook": {"url": "https://a.example", "max_backlog_bytes": 4_000_001}}),
            "audit.webhook.max_backlog_bytes: must be at most audit.file.max_bytes x keep (4000000)",
        ),
        (
            json!({"file": file, "webhook": {"url": "ftp://a.example"}}),
            "audit.webhook.url: `ftp://a.example` must be an http(s) URL with a host",
        ),
        (
            json!({"file": file, "webhook": {"url": "https://user:pw@a.example/in"}}),
            "audit.webhook.url: must not carry credentials",
        ),
        (
            json!({"file": file, "webhook": {"url": "https://a.example/in#x"}}),
            "audit.webhook.url: must not carry a fragment",
        ),
        (
            json!({"file": file, "webhook": {"url": "https://a.example", "batch_max": 0}}),
            "audit.webhook.batch_max: must be between 1 and 10000",
        ),
        (
            json!({"file": file, "webhook": {"url": "https://a.example", "bearer_token_env": "NOPE"}}),
            "audit.webhook.bearer_token_env: environment variable `NOPE` is not set",
        ),
        (
            json!({"file": file, "refusal_records": {"rate": "often"}}),
            "audit.refusal_records.rate: `often` is not a rate",
        ),
        (
            json!({"file": file, "refusal_records": {"rate": "5/s", "burst": 0}}),
            "audit.refusal_records.burst: must be at least 1",
        ),
    ];
    for (audit, expected) in rows {
        let problems = load(audit.clone()).expect_err(expected);
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "{audit}: {problems:?}"
        );
    }
}

#[test]
fn rate_rule_costs_are_checked_against_the_burst() {
    let with_costs = |costs: Value| {
        let mut config: Value = serde_saphyr::from_str(GOOD).expect("GOOD is YAML");
        config["teams"]["web-team"]["rate_limits"] = json!([{
            "name": "budget", "actions": ["*"], "rate": "10/h", "burst": 8, "costs": costs,
        }]);
        Config::from_yaml(&config.to_string(), &secrets(), None).map_err(|e| {
            e.problems()
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
        })
    };
    let ok = with_costs(json!([
        {"actions": ["instance.create"], "cost": 8},
        {"actions": ["instance.*"], "cost": 2},
    ]))
    .expect("valid");
    let rule = &ok.teams["web-team"].rate_limits[0];
    assert_eq!(rule.cost_of(Action::InstanceCreate), 8, "first match wins");
    assert_eq!(rule.cost_of(Action::InstanceReboot), 2);
    assert_eq!(rule.cost_of(Action::KeypairList), 1, "unlisted: 1");

    for (costs, expected) in [
        (
            json!([{"actions": ["read"], "cost": 9}]),
            "teams.web-team.rate_limits[0].costs[0].cost: must be between 1 and the rule's burst (8)",
        ),
        (
            json!([{"actions": ["read"], "cost": 0}]),
            "teams.web-team.rate_limits[0].costs[0].cost: must be between 1",
        ),
        (
            json!([{"actions": ["instance.explode"], "cost": 2}]),
            "teams.web-team.rate_limits[0].costs[0].actions[0]",
        ),
    ] {
        let problems = with_costs(costs.clone()).expect_err(expected);
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "{costs}: {problems:?}"
        );
    }
}

#[test]
fn traces_are_off_unless_an_endpoint_is_given_and_checked_when_it_is() {
    let load = |traces: Value| {
        let mut config: Value = serde_saphyr::from_str(GOOD).expect("GOOD is YAML");
        config["traces"] = traces;
        Config::from_yaml(&config.to_string(), &secrets(), None).map_err(|e| {
            e.problems()
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(load(json!({})).expect("valid").traces, None);
    let on = load(json!({"otlp_endpoint": "http://collector:4318/v1/traces"})).expect("valid");
    let t = on.traces.expect("on");
    assert_eq!(
        (t.service_name.as_str(), t.sample_ratio),
        ("toastgate", 1.0)
    );
    assert_eq!(t.batch_delay, Duration::from_secs(5));
    for (traces, expected) in [
        (json!({"service_name": "x"}), "traces: set `otlp_endpoint`"),
        (
            json!({"otlp_endpoint": "collector:4318"}),
            "traces.otlp_endpoint: `collector:4318` must be an http(s) URL",
        ),
        (
            json!({"otlp_endpoint": "https://u:secret@collector/v1/traces"}),
            "traces.otlp_endpoint: must not carry credentials",
        ),
        (
            json!({"otlp_endpoint": "http://c", "sample_ratio": 1.5}),
            "traces.sample_ratio: must be between 0 and 1",
        ),
        (
            json!({"otlp_endpoint": "http://c", "batch_delay": "0s"}),
            "traces.batch_delay",
        ),
    ] {
        let problems = load(traces.clone()).expect_err(expected);
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "{traces}: {problems:?}"
        );
    }
}

#[test]
fn upstream_urls_the_client_cannot_call_are_refused_with_their_key() {
    let compute = "https://kr1-api-instance.infrastructure.cloud.toast.com";
    let rows = [
        (
            "ftp://compute.example",
            "must be an http(s) URL with a host",
        ),
        (
            "https://compute.example/?q=1",
            "must not carry a query or fragment",
        ),
        (
            "https://user:zq9pw@compute.example",
            "must not carry credentials",
        ),
        // Characters the URL crate escapes and the HTTP client refuses.
        (
            "https://user:zq9p^w@compute.example",
            "must not carry credentials",
        ),
        (
            "https://user:zq9pä@compute.example",
            "must not carry credentials",
        ),
        (
            "ftp://user:zq9pw@compute.example",
            "must be an http(s) URL with a host",
        ),
        (
            "https://bücher.example",
            "is not a URL the HTTP client accepts",
        ),
    ];
    for (url, expected) in rows {
        let yaml = GOOD.replace(compute, url);
        let p = problems(&yaml, &secrets());
        assert_eq!(p.len(), 1, "{url}: {p:?}");
        assert!(p[0].starts_with("upstream.compute_url: "), "{url}: {p:?}");
        assert!(p[0].contains(expected), "{url}: {p:?}");
        assert!(!p[0].contains("zq9"), "a password is not repeated: {p:?}");
    }
    let yaml = GOOD.replace(compute, "http://127.0.0.1:8774/compute/");
    let c = Config::from_yaml(&yaml, &secrets(), None).expect("valid");
    assert_eq!(c.upstream.compute_url, "http://127.0.0.1:8774/compute");
}

#[test]
fn the_admin_listener_may_not_overlap_the_public_one() {
    let with_listen = |public: &str, admin: &str| {
        let mut config: Value = serde_saphyr::from_str(GOOD).expect("GOOD is YAML");
        config["listen"] = json!({"public": public, "admin": admin});
        problems(&config.to_string(), &secrets())
    };
    for (public, admin) in [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("127.0.0.1:8080", "0.0.0.0:8080"),
        ("[::]:8080", "127.0.0.1:8080"),
    ] {
        let problems = with_listen(public, admin);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("listen.admin: must differ from listen.public")),
            "{public} / {admin}: {problems:?}"
        );
    }
    for (public, admin) in [
        ("0.0.0.0:8080", "127.0.0.1:9090"),
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("0.0.0.0:8080", "[::1]:8080"),
    ] {
        assert_eq!(
            with_listen(public, admin),
            Vec::<String>::new(),
            "{public} / {admin}"
        );
    }
}

#[test]
fn upstream_connections_and_their_queue_wait_are_bounded_and_checked() {
    let with_upstream = |extra: Value| {
        let mut config: Value = serde_saphyr::from_str(GOOD).expect("GOOD is YAML");
        let upstream = config["upstream"].as_object_mut().expect("upstream");
        for (k, v) in extra.as_object().expect("an object") {
            upstream.insert(k.clone(), v.clone());
        }
        Config::from_yaml(&config.to_string(), &secrets(), None).map_err(|e| {
            e.problems()
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
        })
    };
    let set = with_upstream(json!({"max_connections": 8, "queue_timeout": "250ms"})).unwrap();
    assert_eq!(set.upstream.max_connections, 8);
    assert_eq!(set.upstream.queue_timeout, Duration::from_millis(250));

    // Defaults: 5 s, or half a shorter request timeout.
    let default = with_upstream(json!({})).unwrap();
    assert_eq!(default.upstream.queue_timeout, Duration::from_secs(5));
    assert!((16..=1024).contains(&default.upstream.max_connections));
    let short = with_upstream(json!({"request_timeout": "4s"})).unwrap();
    assert_eq!(short.upstream.queue_timeout, Duration::from_secs(2));

    let huge = with_upstream(json!({"max_connections": 1_000_001})).expect_err("too many");
    assert!(
        huge.iter()
            .any(|p| p == "upstream.max_connections: must be at most 1000000"),
        "{huge:?}"
    );
    // Beyond the open-file limit (where there is one) beside the listener's cap.
    let many = with_upstream(json!({"max_connections": 1_000_000}));
    match crate::listener::open_files_soft_limit() {
        Some(limit) if limit < 1_000_000 => {
            let problems = many.expect_err("beyond the open-file limit");
            let expected = format!(
                "and 128 for the admin listener and the rest exceeds this process's open-file limit ({limit})"
            );
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with("upstream.max_connections: ") && p.contains(&expected)),
                "{problems:?}"
            );
        }
        _ => assert!(many.is_ok(), "no open-file limit to exceed"),
    }

    for (extra, expected) in [
        (
            json!({"max_connections": 0}),
            "upstream.max_connections: must be greater than zero",
        ),
        (
            json!({"queue_timeout": "0s"}),
            "upstream.queue_timeout: must be greater than zero",
        ),
        (
            json!({"queue_timeout": "30s", "request_timeout": "30s"}),
            "upstream.queue_timeout: must be less than upstream.request_timeout (30s)",
        ),
    ] {
        let problems = with_upstream(extra.clone()).expect_err(expected);
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "{extra}: {problems:?}"
        );
    }
}
