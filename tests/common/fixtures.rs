//! Gateway configs for the tests, built from files: the base config
//! `tests/fixtures/gateway.yaml` and small overlays under
//! `tests/fixtures/overlays/`, merged in order, then a last programmatic
//! overlay for what is only known at run time (temp paths, ports, URLs).
//!
//! Merging: maps merge key by key, recursively; anything else (a scalar, a
//! list) in the overlay replaces what the base has; a `null` in the overlay
//! removes the key (as in JSON Merge Patch, RFC 7396). The result is handed
//! to the gateway as JSON text, which is YAML.

use std::path::{Path, PathBuf};

use serde_json::Value;
use toastgate::config::{Config, ConfigError, SecretSource};

/// Stands for the simulator's base URL in fixture files.
pub const SIM_PLACEHOLDER: &str = "{SIM}";

/// `tests/fixtures/{name}`.
pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A YAML file parsed the way the gateway parses its config.
pub fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

/// Merges `overlay` onto `base` (see the module doc).
pub fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                if value.is_null() {
                    base.remove(&key);
                } else if let Some(existing) = base.get_mut(&key) {
                    merge(existing, value);
                } else {
                    base.insert(key, value);
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// `base` (a file) with each fixture named in `overlays` (relative to
/// tests/fixtures) merged onto it in order, then `extra`.
pub fn merged(base: &Path, overlays: &[&str], extra: Value) -> Value {
    let mut config = load(base);
    for overlay in overlays {
        merge(&mut config, load(&fixture_path(overlay)));
    }
    merge(&mut config, extra);
    config
}

/// The test gateway config (tests/fixtures/gateway.yaml) for a simulator
/// at `sim_url`, with `overlays` and then `extra` merged onto it.
pub fn gateway_config(sim_url: &str, overlays: &[&str], extra: Value) -> Value {
    let mut config = merged(&fixture_path("gateway.yaml"), overlays, extra);
    replace_in_strings(&mut config, SIM_PLACEHOLDER, sim_url);
    config
}

/// Where a config that is only parsed (no simulator) sends its upstream
/// calls: a closed port.
pub const NO_SIM: &str = "http://127.0.0.1:1";

/// The test gateway config with `overlays` and `extra`, parsed and
/// validated as the gateway does, for tests that start no simulator.
pub fn parse_config(
    overlays: &[&str],
    extra: Value,
    secrets: &SecretSource,
) -> Result<Config, ConfigError> {
    Config::from_yaml(
        &to_text(&gateway_config(NO_SIM, overlays, extra)),
        secrets,
        None,
    )
}

/// A merged config as the text of a config file (JSON, which is YAML).
pub fn to_text(config: &Value) -> String {
    serde_json::to_string_pretty(config).unwrap()
}

fn replace_in_strings(value: &mut Value, from: &str, to: &str) {
    match value {
        Value::String(s) => *s = s.replace(from, to),
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| replace_in_strings(v, from, to)),
        Value::Object(map) => map
            .values_mut()
            .for_each(|v| replace_in_strings(v, from, to)),
        _ => {}
    }
}
