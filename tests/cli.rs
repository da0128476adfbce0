//! The command line as a user runs it: check-config, mint-token, demo.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fixtures;
use common::process::{BIN, assert_success, spawn_toastgate, toastgate};
use common::tempdir::TempDir;
use serde_json::json;

/// config/demo.yaml with the fixture `overlay` merged onto it, as
/// `config.yaml` in a fresh folder (kept while the folder lives; the demo's
/// relative secret files are not there).
fn demo_with(overlay: &str) -> (TempDir, String) {
    let config = fixtures::merged(Path::new("config/demo.yaml"), &[overlay], json!({}));
    let dir = TempDir::new("cli");
    let path = dir.join("config.yaml");
    std::fs::write(&path, fixtures::to_text(&config)).unwrap();
    (dir, path.to_str().unwrap().to_string())
}

#[test]
fn check_config_accepts_the_demo_config() {
    let out = toastgate(["check-config", "--config", "config/demo.yaml"]);
    assert_success(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn check_config_accepts_the_example_config_with_its_secrets_set() {
    let out = Command::new(BIN)
        .args(["check-config", "--config", "config/toastgate.example.yaml"])
        .env("TOASTGATE_WEB_API_PASSWORD", "x")
        .env("TOASTGATE_BATCH_SECRET_ACCESS_KEY", "y")
        .env(
            "TOASTGATE_JWT_HS_SECRET",
            "0123456789abcdef0123456789abcdef",
        )
        .output()
        .unwrap();
    assert_success(&out);
}

#[test]
fn check_config_lists_every_problem_with_its_key_path() {
    let (_dir, path) = demo_with("overlays/demo-broken.yaml");
    let out = toastgate(["check-config", "--config", &path]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "auth.algorithms[1]: `none` is not allowed",
        "teams.batch-team.projects[1]: unknown project `nope`",
        "projects.web.credentials.password_env: environment variable `TOASTGATE_TEST_UNSET_VAR` is not set",
        "auth.keys.secret_env: environment variable `TOASTGATE_TEST_UNSET_JWT` is not set",
        "projects.batch.credentials.secret_access_key_file: cannot read",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}

#[test]
fn check_config_names_the_path_of_an_unknown_key_and_refuses_inline_secrets() {
    let (_dir, path) = demo_with("overlays/demo-inline-password.yaml");
    let out = toastgate(["check-config", "--config", &path]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("projects.web.credentials"), "{text}");
    assert!(text.contains("unknown field `password`"), "{text}");
    assert!(!text.contains("hunter2"), "the inline secret was echoed");
}

/// Key and CA files are parsed as `serve` parses them at start: a file that
/// is there but holds no usable key or certificate is a problem named by
/// its key, not an `ok` followed by a gateway that will not start.
#[test]
fn check_config_parses_the_key_and_ca_files_serve_loads() {
    let dir = TempDir::new("cli-files");
    let secrets = dir.join("demo-secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    for entry in std::fs::read_dir("config/demo-secrets").unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), secrets.join(entry.file_name())).unwrap();
    }
    let key = dir.join("not-a-key.pem");
    std::fs::write(&key, "this is not a PEM public key\n").unwrap();
    let ca = dir.join("not-a-ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let config = fixtures::merged(
        Path::new("config/demo.yaml"),
        &[],
        json!({
            "auth": {"algorithms": ["ES256"], "keys": {
                "type": "pem", "secret_file": null, "files": [{"path": key}]
            }},
            "upstream": {"ca_file": ca},
        }),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, fixtures::to_text(&config)).unwrap();
    let out = toastgate(["check-config", "--config", path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("auth.keys: key file"), "{text}");
    assert!(
        text.contains("upstream.ca_file: cannot read CA file"),
        "{text}"
    );
    assert!(!text.lines().any(|l| l.trim() == "ok"), "{text}");
}

#[test]
fn check_config_on_a_missing_file_says_so() {
    let out = toastgate(["check-config", "--config", "/nonexistent/toastgate.yaml"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cannot read /nonexistent/toastgate.yaml")
    );
}

#[test]
fn mint_token_prints_only_a_jwt_and_refuses_unknown_teams() {
    let out = toastgate([
        "mint-token",
        "--config",
        "config/demo.yaml",
        "--team",
        "web-team",
        "--ttl",
        "5m",
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.trim();
    assert_eq!(stdout.lines().count(), 1);
    assert_eq!(token.split('.').count(), 3, "{token}");

    let out = toastgate([
        "mint-token",
        "--config",
        "config/demo.yaml",
        "--team",
        "ghosts",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("team `ghosts` is not in the config"));
}

#[test]
fn demo_runs_the_gateway_on_the_simulator_and_its_curl_lines_work() {
    let mut child = spawn_toastgate(
        [
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--sim-listen",
            "127.0.0.1:0",
        ],
        Stdio::piped(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut gateway = None;
    let mut token = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("gateway") {
            gateway = Some(rest.trim().to_string());
        }
        if let Some(rest) = line.trim().strip_prefix("TOKEN_WEB_TEAM=") {
            token = Some(rest.to_string());
        }
        if line.contains("Ctrl-C stops") || Instant::now() > deadline {
            break;
        }
    }
    let gateway = gateway.expect("demo prints the gateway address");
    let token = token.expect("demo prints a token for web-team");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let mut status = 0;
        for _ in 0..50 {
            match http
                .get(format!("{gateway}/v2/web/flavors"))
                .bearer_auth(&token)
                .send()
                .await
            {
                Ok(r) => {
                    status = r.status().as_u16();
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert_eq!(status, 200);
        let r = http
            .post(format!("{gateway}/v2/web/os-keypairs"))
            .header("X-Auth-Token", &token)
            .json(&serde_json::json!({"keypair": {"name": "demo-key"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let r = http
            .get(format!("{gateway}/v2/batch/flavors"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "web-team may not use batch");
    });
}

/// `toastgate explain` on the demo config: may batch-team do `action` on batch?
fn explain_batch_team(action: &str) -> Output {
    toastgate([
        "explain",
        "--config",
        "config/demo.yaml",
        "--team",
        "batch-team",
        "--action",
        action,
        "--project",
        "batch",
    ])
}

#[test]
fn explain_says_which_rule_allows_or_why_not() {
    let out = explain_batch_team("instance.reboot");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("ALLOWED") && text.contains("teams.batch-team.allow[0]"),
        "{text}"
    );

    let out = explain_batch_team("instance.delete");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("DENIED: team `batch-team` may not do `instance.delete` on project `batch`"),
        "{text}"
    );

    let out = toastgate(["explain", "--config", "config/demo.yaml", "--list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("instance.power: instance.start, instance.stop, instance.reboot"),
        "{text}"
    );
}

/// `check-config --schema` prints a JSON Schema that a standard validator
/// (python3-jsonschema, Draft 2020-12) accepts as a schema, that every
/// shipped config satisfies, and that refuses what `check-config` refuses
/// structurally. (Needs python3 with `jsonschema`: .ci/run installs it.)
#[test]
fn the_config_schema_accepts_the_shipped_configs_and_refuses_mistakes() {
    let out = toastgate(["check-config", "--schema"]);
    assert_success(&out);
    let dir = TempDir::new("schema");
    std::fs::write(dir.join("schema.json"), &out.stdout).unwrap();

    let yaml = |path: &str| -> serde_json::Value {
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let mut bad_key = yaml("config/demo.yaml");
    bad_key["listen"]["bogus"] = json!(1);
    let mut bad_type = yaml("config/demo.yaml");
    bad_type["teams"]["web-team"]["projects"] = json!("web");
    let mut bad_variant = yaml("config/demo.yaml");
    bad_variant["rate_limit"] = json!({"backend": "memcached"});
    let cases = [
        ("demo", yaml("config/demo.yaml"), true),
        ("example", yaml("config/toastgate.example.yaml"), true),
        ("fixture", yaml("tests/fixtures/gateway.yaml"), true),
        ("bad_key", bad_key, false),
        ("bad_type", bad_type, false),
        ("bad_variant", bad_variant, false),
    ];
    let mut args = vec![dir.join("schema.json").display().to_string()];
    for (name, doc, _) in &cases {
        let path = dir.join(&format!("{name}.json"));
        std::fs::write(&path, doc.to_string()).unwrap();
        args.push(path.display().to_string());
    }
    let script = r#"
import json, sys
try:
    import jsonschema
except ImportError:
    sys.exit("python3 module `jsonschema` missing: apt-get install python3-jsonschema (.ci/run does)")
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
for path in sys.argv[2:]:
    errors = list(validator.iter_errors(json.load(open(path))))
    print("valid" if not errors else "invalid: " + errors[0].message)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&args)
        .output()
        .expect("python3 runs");
    assert_success(&out);
    let verdicts: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(verdicts.len(), cases.len(), "{verdicts:?}");
    for ((name, _, valid), verdict) in cases.iter().zip(&verdicts) {
        assert_eq!(verdict == "valid", *valid, "{name}: {verdict}");
    }
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_toastgate()"),
        ("zsh", "#compdef toastgate"),
        ("fish", "complete -c toastgate"),
    ] {
        let out = toastgate(["completions", shell]);
        assert_success(&out);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(
            text.contains("check-config") && text.contains("schema"),
            "{shell}"
        );
    }
    let out = toastgate(["completions", "tcsh"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'tcsh'"));
}
