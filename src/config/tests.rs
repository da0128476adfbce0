//! Unit tests of loading and validation: structure errors, semantic
//! problems and secret resolution, each reported with its key path.

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
