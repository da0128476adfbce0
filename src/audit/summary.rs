//! The redacted request summary of level `request` records.
//!
//! A whitelist: each Action copies only the fields it names, only as scalars
//! (a string, number, boolean or null; a field of any other shape becomes
//! `"[unexpected object]"` / `"[unexpected array]"`, so nothing nested is ever
//! copied blindly). Secrets are replaced by markers: `user_data` and
//! `personality` contents by `"[redacted: N bytes]"`, `adminPass` by
//! `"[redacted]"`; metadata by its keys; a keypair's `public_key` by
//! `public_key_provided`. Strings are cut at [`MAX_STRING`] characters and
//! lists at [`MAX_ITEMS`] entries, so a record stays small.

use serde_json::{Map, Value, json};

use crate::action::Action;

/// Longest string copied (characters); longer ones end in `...`.
pub const MAX_STRING: usize = 255;
/// Most entries copied from a list; the rest are counted in a last entry.
pub const MAX_ITEMS: usize = 32;

/// A redacted summary of a v2 request body for `action` (the v1.0 surface
/// passes its translated v2 body, so both surfaces summarise alike). `{}` for
/// Actions without a body; `{"malformed": ..}` when the body does not have the
/// expected shape.
pub fn summarize(action: Action, v2_body: &Value) -> Value {
    use Action::*;
    match action {
        InstanceCreate => under(v2_body, "server", server_create),
        InstanceUpdate => under(v2_body, "server", |o| pick(o, &["name"])),
        InstanceReboot => under(v2_body, "reboot", |o| pick(o, &["type"])),
        InstanceResize => under(v2_body, "resize", |o| {
            pick(o, &["flavorRef", "OS-DCF:diskConfig"])
        }),
        InstanceCreateImage => under(v2_body, "createImage", |o| {
            let mut out = pick(o, &["name"]);
            metadata_keys(o, &mut out);
            out
        }),
        InstanceAddSecurityGroup => under(v2_body, "addSecurityGroup", |o| pick(o, &["name"])),
        InstanceRemoveSecurityGroup => {
            under(v2_body, "removeSecurityGroup", |o| pick(o, &["name"]))
        }
        InstanceAddFloatingIp => under(v2_body, "addFloatingIp", |o| {
            pick(o, &["address", "fixed_address"])
        }),
        InstanceRemoveFloatingIp => under(v2_body, "removeFloatingIp", |o| pick(o, &["address"])),
        KeypairCreate => under(v2_body, "keypair", |o| {
            let mut out = pick(o, &["name", "type"]);
            let provided = o.get("public_key").is_some_and(|v| !v.is_null());
            out.insert("public_key_provided".into(), Value::Bool(provided));
            out
        }),
        VolumeAttach => under(v2_body, "volumeAttachment", |o| {
            pick(o, &["volumeId", "device", "delete_on_termination", "tag"])
        }),
        FlavorList | FlavorListDetail | FlavorGet | ZoneList | KeypairList | KeypairGet
        | KeypairDelete | InstanceList | InstanceListDetail | InstanceGet | InstanceDelete
        | InstanceStart | InstanceStop | VolumeAttachmentList | VolumeAttachmentGet
        | VolumeDetach => Value::Object(Map::new()),
    }
}

/// Ids of what a mutating Action produced, from the upstream's v2 answer
/// (both surfaces: the v1.0 translation sees the same v2 answers), for the
/// `result` of the completed record.
pub fn result_ids(action: Action, v2_answer: &Value, location: Option<&str>) -> Option<Value> {
    match action {
        Action::InstanceCreate => v2_answer["server"]["id"]
            .as_str()
            .map(|id| json!({"instance_id": id})),
        Action::InstanceCreateImage => v2_answer["image_id"]
            .as_str()
            .or_else(|| location.and_then(|l| l.rsplit('/').next()))
            .map(|id| json!({"image_id": id})),
        Action::KeypairCreate => v2_answer["keypair"]["name"]
            .as_str()
            .map(|n| json!({"keypair": n})),
        Action::VolumeAttach => v2_answer["volumeAttachment"]["id"]
            .as_str()
            .map(|id| json!({"attachment_id": id})),
        _ => None,
    }
}

/// Summarises the object under `key`; `{}` when the body has nothing there
/// at all (a bodiless request), a marker when it has the wrong shape.
fn under(
    body: &Value,
    key: &str,
    f: impl FnOnce(&Map<String, Value>) -> Map<String, Value>,
) -> Value {
    match body.get(key) {
        Some(Value::Object(o)) => Value::Object(f(o)),
        Some(Value::Null) => Value::Object(Map::new()),
        None if body.is_null() => Value::Object(Map::new()),
        _ => json!({ "malformed": format!("expected an object under `{key}`") }),
    }
}

/// The scalar fields `keys` of `o` that are present.
fn pick(o: &Map<String, Value>, keys: &[&str]) -> Map<String, Value> {
    let mut out = Map::new();
    for k in keys {
        if let Some(v) = o.get(*k) {
            out.insert((*k).to_string(), scalar(v));
        }
    }
    out
}

/// A copy of a scalar; a marker for anything nested.
fn scalar(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(cut(s)),
        Value::Null | Value::Bool(_) | Value::Number(_) => v.clone(),
        Value::Array(_) => Value::String("[unexpected array]".into()),
        Value::Object(_) => Value::String("[unexpected object]".into()),
    }
}

fn cut(s: &str) -> String {
    if s.chars().count() <= MAX_STRING {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(MAX_STRING).collect();
        c.push_str("...");
        c
    }
}

/// `"[redacted: N bytes]"` for a string, `"[redacted]"` for anything else.
fn redacted(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(format!("[redacted: {} bytes]", s.len())),
        _ => Value::String("[redacted]".into()),
    }
}

/// Maps the first [`MAX_ITEMS`] entries of a list; a lone non-list value is
/// taken as one entry.
fn list(v: &Value, f: impl Fn(&Value) -> Value) -> Value {
    match v {
        Value::Array(items) => {
            let mut out: Vec<Value> = items.iter().take(MAX_ITEMS).map(&f).collect();
            if items.len() > MAX_ITEMS {
                out.push(Value::String(format!("[{} more]", items.len() - MAX_ITEMS)));
            }
            Value::Array(out)
        }
        other => scalar(other),
    }
}

fn entry(v: &Value, keys: &[&str]) -> Value {
    match v {
        Value::Object(o) => Value::Object(pick(o, keys)),
        other => scalar(other),
    }
}

/// `metadata_keys`: the keys of a `metadata` object, never its values.
fn metadata_keys(o: &Map<String, Value>, out: &mut Map<String, Value>) {
    match o.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let mut list: Vec<Value> = keys
                .iter()
                .take(MAX_ITEMS)
                .map(|k| Value::String(cut(k)))
                .collect();
            if keys.len() > MAX_ITEMS {
                list.push(Value::String(format!("[{} more]", keys.len() - MAX_ITEMS)));
            }
            out.insert("metadata_keys".into(), Value::Array(list));
        }
        Some(other) => {
            out.insert("metadata_keys".into(), scalar_marker(other));
        }
    }
}

/// A marker naming the shape of a value that is never copied.
fn scalar_marker(v: &Value) -> Value {
    Value::String(
        match v {
            Value::Array(_) => "[unexpected array]",
            Value::Object(_) => "[unexpected object]",
            _ => "[unexpected value]",
        }
        .into(),
    )
}

fn server_create(o: &Map<String, Value>) -> Map<String, Value> {
    let mut out = pick(
        o,
        &[
            "name",
            "imageRef",
            "flavorRef",
            "availability_zone",
            "key_name",
            "min_count",
            "max_count",
            "OS-DCF:diskConfig",
            "config_drive",
        ],
    );
    if let Some(n) = o.get("networks") {
        out.insert(
            "networks".into(),
            list(n, |e| {
                entry(e, &["uuid", "port", "fixed_ip", "subnet", "tag"])
            }),
        );
    }
    if let Some(b) = o.get("block_device_mapping_v2") {
        out.insert(
            "block_device_mapping_v2".into(),
            list(b, |e| {
                entry(
                    e,
                    &[
                        "boot_index",
                        "source_type",
                        "destination_type",
                        "volume_size",
                        "uuid",
                        "delete_on_termination",
                        "volume_type",
                    ],
                )
            }),
        );
    }
    if let Some(g) = o.get("security_groups") {
        out.insert(
            "security_groups".into(),
            list(g, |e| match e {
                Value::Object(m) => m.get("name").map_or(Value::Null, scalar),
                other => scalar(other),
            }),
        );
    }
    metadata_keys(o, &mut out);
    if let Some(u) = o.get("user_data").filter(|v| !v.is_null()) {
        out.insert("user_data".into(), redacted(u));
    }
    if let Some(p) = o.get("personality").filter(|v| !v.is_null()) {
        out.insert(
            "personality".into(),
            list(p, |f| match f {
                Value::Object(m) => {
                    let mut e = pick(m, &["path"]);
                    if let Some(c) = m.get("contents").or_else(|| m.get("content")) {
                        e.insert("contents".into(), redacted(c));
                    }
                    Value::Object(e)
                }
                other => scalar_marker(other),
            }),
        );
    }
    if o.get("adminPass").is_some_and(|v| !v.is_null()) {
        out.insert("adminPass".into(), Value::String("[redacted]".into()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_ids_per_action() {
        assert_eq!(
            result_ids(
                Action::InstanceCreate,
                &json!({"server": {"id": "s1"}}),
                None
            ),
            Some(json!({"instance_id": "s1"}))
        );
        assert_eq!(
            result_ids(
                Action::InstanceCreateImage,
                &Value::Null,
                Some("http://x/images/i9")
            ),
            Some(json!({"image_id": "i9"}))
        );
        assert_eq!(result_ids(Action::InstanceReboot, &Value::Null, None), None);
    }

    #[test]
    fn server_actions_copy_their_safe_parameters() {
        assert_eq!(
            summarize(Action::InstanceReboot, &json!({"reboot": {"type": "HARD"}})),
            json!({"type": "HARD"})
        );
        assert_eq!(
            summarize(
                Action::InstanceResize,
                &json!({"resize": {"flavorRef": "f-2", "OS-DCF:diskConfig": "AUTO", "x": "y"}})
            ),
            json!({"flavorRef": "f-2", "OS-DCF:diskConfig": "AUTO"})
        );
        assert_eq!(
            summarize(
                Action::InstanceCreateImage,
                &json!({"createImage": {"name": "snap", "metadata": {"k": "SECRET-VALUE"}}})
            ),
            json!({"name": "snap", "metadata_keys": ["k"]})
        );
        assert_eq!(
            summarize(
                Action::InstanceAddFloatingIp,
                &json!({"addFloatingIp": {"address": "203.0.113.5"}})
            ),
            json!({"address": "203.0.113.5"})
        );
        assert_eq!(
            summarize(
                Action::InstanceRemoveSecurityGroup,
                &json!({"removeSecurityGroup": {"name": "web"}})
            ),
            json!({"name": "web"})
        );
        assert_eq!(
            summarize(Action::InstanceStart, &json!({"os-start": null})),
            json!({})
        );
        assert_eq!(summarize(Action::InstanceDelete, &Value::Null), json!({}));
        assert_eq!(
            summarize(
                Action::VolumeAttach,
                &json!({"volumeAttachment": {"volumeId": "v-1"}})
            ),
            json!({"volumeId": "v-1"})
        );
    }

    #[test]
    fn odd_shapes_never_copy_nested_values() {
        let s = summarize(
            Action::InstanceReboot,
            &json!({"reboot": {"type": {"secret": "NESTED-SECRET"}}}),
        );
        assert_eq!(s, json!({"type": "[unexpected object]"}));
        let s = summarize(Action::InstanceCreate, &json!({"server": "NESTED-SECRET"}));
        assert!(s["malformed"].is_string());
        assert!(!s.to_string().contains("NESTED-SECRET"));
        let s = summarize(Action::InstanceCreate, &json!([1, 2]));
        assert!(s["malformed"].is_string());
    }

    #[test]
    fn long_strings_and_lists_are_bounded() {
        let long = "n".repeat(10_000);
        let nets: Vec<Value> = (0..100)
            .map(|i| json!({"uuid": format!("net-{i}")}))
            .collect();
        let s = summarize(
            Action::InstanceCreate,
            &json!({"server": {"name": long, "networks": nets}}),
        );
        assert_eq!(s["name"].as_str().unwrap().chars().count(), MAX_STRING + 3);
        let n = s["networks"].as_array().unwrap();
        assert_eq!(n.len(), MAX_ITEMS + 1);
        assert_eq!(n[MAX_ITEMS], json!("[68 more]"));
    }
}
