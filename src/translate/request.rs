//! v1.0 request bodies: parsed strictly, validated completely, and turned
//! into the v2 body before anything is sent upstream.

use serde_json::{Map, Value, json};

use crate::action::Action;
use crate::body;
use crate::error::GatewayError;

/// Parses a JSON object body strictly ([`crate::body`]): `-8` when it is not
/// strict JSON, `-4` when it is missing or not an object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(GatewayError::Invalid(
            "a JSON request body is required".into(),
        ));
    }
    let value = body::parse_strict(body).map_err(|e| GatewayError::Json(e.to_string()))?;
    match value {
        Value::Object(m) => Ok(m),
        _ => Err(GatewayError::Invalid(
            "the request body must be a JSON object".into(),
        )),
    }
}

fn object<'a>(
    parent: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a Map<String, Value>, GatewayError> {
    match parent.get(key) {
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(GatewayError::Invalid(format!("`{path}` must be an object"))),
        None => Err(GatewayError::Invalid(format!("`{path}` is required"))),
    }
}

fn string(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
    max: usize,
) -> Result<String, GatewayError> {
    match optional_string(obj, key, path, max)? {
        Some(s) => Ok(s),
        None => Err(GatewayError::Invalid(format!("`{path}` is required"))),
    }
}

fn optional_string(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
    max: usize,
) -> Result<Option<String>, GatewayError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(GatewayError::Invalid(format!("`{path}` must not be empty")))
        }
        Some(Value::String(s)) if s.chars().count() > max => Err(GatewayError::Invalid(format!(
            "`{path}` is longer than {max} characters"
        ))),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(GatewayError::Invalid(format!("`{path}` must be a string"))),
    }
}

/// An integer given as a JSON number or, as the provider's own examples
/// write it, a numeric string.
fn optional_integer(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<i64>, GatewayError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| GatewayError::Invalid(format!("`{path}` must be an integer"))),
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| GatewayError::Invalid(format!("`{path}` must be an integer"))),
        Some(_) => Err(GatewayError::Invalid(format!(
            "`{path}` must be an integer"
        ))),
    }
}

fn array<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Vec<Value>>, GatewayError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(GatewayError::Invalid(format!("`{path}` must be an array"))),
    }
}

fn item_object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, GatewayError> {
    v.as_object()
        .ok_or_else(|| GatewayError::Invalid(format!("`{path}` must be an object")))
}

/// `POST instances` -> `POST servers`.
///
/// Required: `name`, `image`, `flavor`, `networks` (non-empty), `keyName`.
/// Optional: `availabilityZone`, `count` (1..10, default 1), `volumes[0].size`
/// (the root volume, built from the image), `securityGroups`.
pub fn create_instance(body: &Map<String, Value>) -> Result<(Value, String), GatewayError> {
    let inst = object(body, "instance", "instance")?;
    const KNOWN: &[&str] = &[
        "name",
        "image",
        "flavor",
        "networks",
        "availabilityZone",
        "keyName",
        "count",
        "volumes",
        "securityGroups",
    ];
    if let Some(unknown) = inst.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(GatewayError::Invalid(format!(
            "unknown field `instance.{unknown}`"
        )));
    }
    let name = string(inst, "name", "instance.name", 255)?;
    let image = string(inst, "image", "instance.image", 64)?;
    let flavor = string(inst, "flavor", "instance.flavor", 64)?;
    let key_name = string(inst, "keyName", "instance.keyName", 255)?;
    let zone = optional_string(inst, "availabilityZone", "instance.availabilityZone", 255)?;
    let count = optional_integer(inst, "count", "instance.count")?.unwrap_or(1);
    if !(1..=10).contains(&count) {
        return Err(GatewayError::Invalid(format!(
            "`instance.count` must be between 1 and 10 (got {count})"
        )));
    }

    let networks = array(inst, "networks", "instance.networks")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            GatewayError::Invalid("`instance.networks` must list at least one network".into())
        })?;
    let mut v2_networks = Vec::new();
    for (i, n) in networks.iter().enumerate() {
        let n = item_object(n, &format!("instance.networks[{i}]"))?;
        let id = string(n, "id", &format!("instance.networks[{i}].id"), 64)?;
        v2_networks.push(json!({"uuid": id}));
    }

    let mut server = Map::new();
    server.insert("name".into(), json!(name));
    server.insert("imageRef".into(), json!(image));
    server.insert("flavorRef".into(), json!(flavor));
    server.insert("networks".into(), Value::Array(v2_networks));
    server.insert("key_name".into(), json!(key_name));
    server.insert("min_count".into(), json!(count));
    server.insert("max_count".into(), json!(count));
    if let Some(z) = zone {
        server.insert("availability_zone".into(), json!(z));
    }
    if let Some(volumes) = array(inst, "volumes", "instance.volumes")? {
        if volumes.len() > 1 {
            return Err(GatewayError::Invalid(
                "`instance.volumes` takes one entry, the root volume (attach more with the attachments API)".into(),
            ));
        }
        if let Some(v) = volumes.first() {
            let v = item_object(v, "instance.volumes[0]")?;
            let size =
                optional_integer(v, "size", "instance.volumes[0].size")?.ok_or_else(|| {
                    GatewayError::Invalid("`instance.volumes[0].size` is required".into())
                })?;
            if !(1..=1000).contains(&size) {
                return Err(GatewayError::Invalid(format!(
                    "`instance.volumes[0].size` must be between 1 and 1000 GB (got {size})"
                )));
            }
            server.insert(
                "block_device_mapping_v2".into(),
                json!([{
                    "uuid": image,
                    "boot_index": 0,
                    "volume_size": size,
                    "device_name": "vda",
                    "source_type": "image",
                    "destination_type": "volume",
                    "delete_on_termination": true
                }]),
            );
        }
    }
    if let Some(groups) = array(inst, "securityGroups", "instance.securityGroups")? {
        let mut v2_groups = Vec::new();
        for (i, g) in groups.iter().enumerate() {
            let g = item_object(g, &format!("instance.securityGroups[{i}]"))?;
            let name = string(
                g,
                "name",
                &format!("instance.securityGroups[{i}].name"),
                255,
            )?;
            v2_groups.push(json!({"name": name}));
        }
        server.insert("security_groups".into(), Value::Array(v2_groups));
    }
    Ok((json!({"server": Value::Object(server)}), name))
}

/// `POST instances/{id}/attachments` -> `POST servers/{id}/os-volume_attachments`.
pub fn attach(body: &Map<String, Value>) -> Result<(Value, String), GatewayError> {
    let a = object(body, "attachment", "attachment")?;
    let volume = string(a, "volumeId", "attachment.volumeId", 64)?;
    Ok((json!({"volumeAttachment": {"volumeId": volume}}), volume))
}

/// A server action, ready to send: its Action and the v2 action body.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerAction {
    pub action: Action,
    pub v2_body: Value,
    /// For `uploadImage`: the image name the answer repeats.
    pub image_name: Option<String>,
}

/// `{"action": NAME, "parameters": {...}}` -> the v2 action body.
pub fn server_action(body: &Map<String, Value>) -> Result<ServerAction, GatewayError> {
    let name = match body.get("action") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(GatewayError::Invalid("`action` must be a string".into())),
        None => return Err(GatewayError::Invalid("`action` is required".into())),
    };
    let empty = Map::new();
    let params = match body.get("parameters") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(GatewayError::Invalid(
                "`parameters` must be an object".into(),
            ));
        }
    };
    let p = |key: &str| string(params, key, &format!("parameters.{key}"), 255);
    let (action, v2_body, image_name) = match name {
        "start" => (Action::InstanceStart, json!({"os-start": null}), None),
        "stop" => (Action::InstanceStop, json!({"os-stop": null}), None),
        "reboot" => {
            let kind = p("type")?;
            if kind != "SOFT" && kind != "HARD" {
                return Err(GatewayError::Invalid(format!(
                    "`parameters.type` must be SOFT or HARD (got `{kind}`)"
                )));
            }
            (
                Action::InstanceReboot,
                json!({"reboot": {"type": kind}}),
                None,
            )
        }
        "resize" => {
            let flavor = p("flavor")?;
            // The spec: with the provider's images diskConfig must be AUTO.
            (
                Action::InstanceResize,
                json!({"resize": {"flavorRef": flavor, "OS-DCF:diskConfig": "AUTO"}}),
                None,
            )
        }
        "uploadImage" => {
            let image = p("name")?;
            (
                Action::InstanceCreateImage,
                json!({"createImage": {"name": image, "metadata": {}}}),
                Some(image),
            )
        }
        "addFloatingIp" => {
            let address = ipv4(&p("address")?, "parameters.address")?;
            let fixed = ipv4(&p("ipAddress")?, "parameters.ipAddress")?;
            (
                Action::InstanceAddFloatingIp,
                json!({"addFloatingIp": {"address": address, "fixed_address": fixed}}),
                None,
            )
        }
        "removeFloatingIp" => {
            let address = ipv4(&p("address")?, "parameters.address")?;
            (
                Action::InstanceRemoveFloatingIp,
                json!({"removeFloatingIp": {"address": address}}),
                None,
            )
        }
        "addSecurityGroup" => (
            Action::InstanceAddSecurityGroup,
            json!({"addSecurityGroup": {"name": p("name")?}}),
            None,
        ),
        "removeSecurityGroup" => (
            Action::InstanceRemoveSecurityGroup,
            json!({"removeSecurityGroup": {"name": p("name")?}}),
            None,
        ),
        other => {
            return Err(GatewayError::NotSupported(format!(
                "unknown action `{other}`; supported: start, stop, reboot, resize, uploadImage, addFloatingIp, removeFloatingIp, addSecurityGroup, removeSecurityGroup"
            )));
        }
    };
    Ok(ServerAction {
        action,
        v2_body,
        image_name,
    })
}

fn ipv4(s: &str, path: &str) -> Result<String, GatewayError> {
    s.parse::<std::net::Ipv4Addr>()
        .map(|ip| ip.to_string())
        .map_err(|_| GatewayError::Invalid(format!("`{path}` must be an IPv4 address (got `{s}`)")))
}

/// `POST keypairs` -> `POST os-keypairs`.
pub fn create_keypair(body: &Map<String, Value>) -> Result<Value, GatewayError> {
    let k = object(body, "keypair", "keypair")?;
    let name = string(k, "name", "keypair.name", 255)?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '_' | '-'))
    {
        return Err(GatewayError::Invalid(
            "`keypair.name` may contain letters, digits, spaces, `_` and `-` only".into(),
        ));
    }
    let mut kp = Map::new();
    kp.insert("name".into(), json!(name));
    if let Some(public) = optional_string(k, "publicKey", "keypair.publicKey", 16 * 1024)? {
        kp.insert("public_key".into(), json!(public));
    }
    Ok(json!({"keypair": Value::Object(kp)}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn full_create() -> Value {
        json!({"instance": {
            "name": "web-01", "image": "img-1", "flavor": "fl-1",
            "networks": [{"id": "net-1"}], "availabilityZone": "kr-pub-a",
            "keyName": "key-1", "count": 2, "volumes": [{"size": 50}],
            "securityGroups": [{"name": "default"}, {"name": "web"}]
        }})
    }

    #[test]
    fn create_maps_every_field() {
        let (v2, name) = create_instance(&obj(full_create())).unwrap();
        assert_eq!(name, "web-01");
        assert_eq!(
            v2,
            json!({"server": {
                "name": "web-01", "imageRef": "img-1", "flavorRef": "fl-1",
                "networks": [{"uuid": "net-1"}], "key_name": "key-1",
                "min_count": 2, "max_count": 2, "availability_zone": "kr-pub-a",
                "block_device_mapping_v2": [{
                    "uuid": "img-1", "boot_index": 0, "volume_size": 50, "device_name": "vda",
                    "source_type": "image", "destination_type": "volume", "delete_on_termination": true
                }],
                "security_groups": [{"name": "default"}, {"name": "web"}]
            }})
        );
    }

    #[test]
    fn create_accepts_numeric_strings_as_the_spec_examples_write_them() {
        let mut b = full_create();
        b["instance"]["count"] = json!("3");
        b["instance"]["volumes"][0]["size"] = json!("20");
        let (v2, _) = create_instance(&obj(b)).unwrap();
        assert_eq!(v2["server"]["max_count"], 3);
        assert_eq!(
            v2["server"]["block_device_mapping_v2"][0]["volume_size"],
            20
        );
    }

    #[test]
    fn create_refuses_each_bad_field_with_its_path() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("name", Value::Null, "`instance.name` is required"),
            ("name", json!(5), "`instance.name` must be a string"),
            ("name", json!("   "), "must not be empty"),
            ("image", Value::Null, "`instance.image` is required"),
            ("flavor", json!(["x"]), "`instance.flavor` must be a string"),
            ("keyName", Value::Null, "`instance.keyName` is required"),
            ("networks", json!([]), "at least one network"),
            (
                "networks",
                json!("net-1"),
                "`instance.networks` must be an array",
            ),
            (
                "networks",
                json!([{"uuid": "x"}]),
                "`instance.networks[0].id` is required",
            ),
            ("count", json!(0), "between 1 and 10"),
            ("count", json!(11), "between 1 and 10"),
            (
                "count",
                json!("many"),
                "`instance.count` must be an integer",
            ),
            ("count", json!(1.5), "`instance.count` must be an integer"),
            (
                "volumes",
                json!([{"size": "big"}]),
                "`instance.volumes[0].size` must be an integer",
            ),
            (
                "volumes",
                json!([{}]),
                "`instance.volumes[0].size` is required",
            ),
            (
                "volumes",
                json!([{"size": 10}, {"size": 20}]),
                "takes one entry",
            ),
            (
                "securityGroups",
                json!([{"nom": "x"}]),
                "`instance.securityGroups[0].name` is required",
            ),
            ("bogus", json!(1), "unknown field `instance.bogus`"),
        ];
        for (key, value, want) in cases {
            let mut b = full_create();
            if value.is_null() {
                b["instance"].as_object_mut().unwrap().remove(key);
            } else {
                b["instance"][key] = value.clone();
            }
            match create_instance(&obj(b)) {
                Err(GatewayError::Invalid(m)) => assert!(m.contains(want), "{key}={value}: {m}"),
                other => panic!("{key}={value}: {other:?}"),
            }
        }
        assert!(
            matches!(create_instance(&obj(json!({}))), Err(GatewayError::Invalid(m)) if m.contains("`instance` is required"))
        );
    }

    #[test]
    fn every_action_maps_to_its_v2_body() {
        let cases = [
            (
                json!({"action": "start"}),
                Action::InstanceStart,
                json!({"os-start": null}),
            ),
            (
                json!({"action": "stop"}),
                Action::InstanceStop,
                json!({"os-stop": null}),
            ),
            (
                json!({"action": "reboot", "parameters": {"type": "HARD"}}),
                Action::InstanceReboot,
                json!({"reboot": {"type": "HARD"}}),
            ),
            (
                json!({"action": "resize", "parameters": {"flavor": "f2"}}),
                Action::InstanceResize,
                json!({"resize": {"flavorRef": "f2", "OS-DCF:diskConfig": "AUTO"}}),
            ),
            (
                json!({"action": "uploadImage", "parameters": {"name": "img"}}),
                Action::InstanceCreateImage,
                json!({"createImage": {"name": "img", "metadata": {}}}),
            ),
            (
                json!({"action": "addFloatingIp", "parameters": {"address": "1.2.3.4", "ipAddress": "192.168.0.10"}}),
                Action::InstanceAddFloatingIp,
                json!({"addFloatingIp": {"address": "1.2.3.4", "fixed_address": "192.168.0.10"}}),
            ),
            (
                json!({"action": "removeFloatingIp", "parameters": {"address": "1.2.3.4"}}),
                Action::InstanceRemoveFloatingIp,
                json!({"removeFloatingIp": {"address": "1.2.3.4"}}),
            ),
            (
                json!({"action": "addSecurityGroup", "parameters": {"name": "web"}}),
                Action::InstanceAddSecurityGroup,
                json!({"addSecurityGroup": {"name": "web"}}),
            ),
            (
                json!({"action": "removeSecurityGroup", "parameters": {"name": "web"}}),
                Action::InstanceRemoveSecurityGroup,
                json!({"removeSecurityGroup": {"name": "web"}}),
            ),
        ];
        for (body, action, v2) in cases {
            let a = server_action(&obj(body.clone())).unwrap();
            assert_eq!(a.action, action, "{body}");
            assert_eq!(a.v2_body, v2, "{body}");
        }
    }

    #[test]
    fn bad_actions_are_refused_before_anything_is_sent() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({}), "`action` is required"),
            (json!({"action": 1}), "`action` must be a string"),
            (json!({"action": "reboot"}), "`parameters.type` is required"),
            (
                json!({"action": "reboot", "parameters": {"type": "soft"}}),
                "SOFT or HARD",
            ),
            (
                json!({"action": "resize", "parameters": []}),
                "`parameters` must be an object",
            ),
            (
                json!({"action": "addFloatingIp", "parameters": {"address": "x", "ipAddress": "1.1.1.1"}}),
                "IPv4",
            ),
            (
                json!({"action": "uploadImage", "parameters": {"name": 3}}),
                "must be a string",
            ),
        ];
        for (body, want) in cases {
            match server_action(&obj(body.clone())) {
                Err(GatewayError::Invalid(m)) => assert!(m.contains(want), "{body}: {m}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(
            server_action(&obj(json!({"action": "lock"}))),
            Err(GatewayError::NotSupported(_))
        ));
    }

    #[test]
    fn keypair_and_attach_bodies() {
        assert_eq!(
            create_keypair(&obj(
                json!({"keypair": {"name": "k1", "publicKey": "ssh-rsa AAA"}})
            ))
            .unwrap(),
            json!({"keypair": {"name": "k1", "public_key": "ssh-rsa AAA"}})
        );
        assert_eq!(
            create_keypair(&obj(json!({"keypair": {"name": "k1"}}))).unwrap(),
            json!({"keypair": {"name": "k1"}})
        );
        assert!(create_keypair(&obj(json!({"keypair": {"name": "a/b"}}))).is_err());
        assert!(create_keypair(&obj(json!({"keypair": "k1"}))).is_err());
        assert_eq!(
            attach(&obj(json!({"attachment": {"volumeId": "v1"}})))
                .unwrap()
                .0,
            json!({"volumeAttachment": {"volumeId": "v1"}})
        );
        assert!(attach(&obj(json!({"attachment": {}}))).is_err());
    }

    #[test]
    fn json_errors_are_distinguished_from_invalid_parameters() {
        assert!(matches!(
            parse_object(b"{not json"),
            Err(GatewayError::Json(_))
        ));
        assert!(matches!(
            parse_object(b"[1]"),
            Err(GatewayError::Invalid(_))
        ));
        assert!(matches!(parse_object(b""), Err(GatewayError::Invalid(_))));
        assert!(parse_object(br#"{"a":1}"#).is_ok());
        assert!(matches!(
            parse_object(br#"{"a":1,"a":2}"#),
            Err(GatewayError::Json(_))
        ));
        assert!(matches!(
            parse_object(br#"{"instance":{"count":NaN}}"#),
            Err(GatewayError::Json(_))
        ));
    }
}
