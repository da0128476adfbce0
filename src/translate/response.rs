//! v2 answers turned into the v1.0 shapes of the spec.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

/// What the v1.0 surface needs of a flavor (cached per project).
#[derive(Debug, Clone, PartialEq)]
pub struct FlavorInfo {
    pub name: String,
    pub vcpus: i64,
    pub ram: i64,
    pub disk: i64,
}

/// The v1.0 status of an instance, from the v2 `status` and
/// `OS-EXT-STS:task_state`. A task in progress says more than the status it
/// runs from (an ACTIVE server being stopped is POWERING_OFF).
pub fn v1_status(status: &str, task_state: Option<&str>) -> &'static str {
    if let Some(task) = task_state {
        let by_task = match task {
            "deleting" | "soft-deleting" => Some("DELETING"),
            "powering-off" => Some("POWERING_OFF"),
            "powering-on" => Some("POWERING_ON"),
            t if t.starts_with("reboot") => Some("REBOOTING"),
            t if t.starts_with("resize") => Some("RESIZING"),
            "migrating" => Some("MIGRATING"),
            "scheduling" | "block_device_mapping" | "networking" | "spawning" => Some("BUILD"),
            _ => None,
        };
        if let Some(s) = by_task {
            return s;
        }
    }
    match status {
        "BUILD" | "BUILDING" | "REBUILD" => "BUILD",
        "ACTIVE" | "RESCUE" | "RESCUED" => "ACTIVE",
        "SHUTOFF" | "STOPPED" | "PAUSED" | "SUSPENDED" | "SHELVED" | "SHELVED_OFFLOADED" => "STOP",
        "REBOOT" | "HARD_REBOOT" => "REBOOTING",
        "RESIZE" | "RESIZED" | "VERIFY_RESIZE" | "REVERT_RESIZE" => "RESIZING",
        "MIGRATING" => "MIGRATING",
        "DELETED" | "SOFT_DELETED" => "DELETING",
        _ => "ERROR",
    }
}

fn status_of(server: &Value) -> &'static str {
    v1_status(
        server["status"].as_str().unwrap_or("UNKNOWN"),
        server["OS-EXT-STS:task_state"].as_str(),
    )
}

/// What a brief listing reads of a v2 server (everything else is skipped
/// while parsing, never built).
#[derive(Debug, serde::Deserialize)]
pub struct BriefServer {
    #[serde(default)]
    id: Value,
    #[serde(default)]
    name: Value,
    #[serde(default)]
    status: Option<String>,
    #[serde(rename = "OS-EXT-STS:task_state", default)]
    task_state: Option<String>,
}

impl BriefServer {
    /// The same answer as [`instance_brief`] gives for the whole server.
    pub fn to_v1(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "status": v1_status(
                self.status.as_deref().unwrap_or("UNKNOWN"),
                self.task_state.as_deref()
            ),
        })
    }
}

/// `instances` (brief): id, name, status.
pub fn instance_brief(server: &Value) -> Value {
    json!({
        "id": server["id"],
        "name": server["name"],
        "status": status_of(server),
    })
}

/// v2 timestamps (`...Z` or `....ffffff`) in the v1.0 example's form,
/// `2017-05-16T02:17:50.166563`; null stays null.
pub fn v1_time(v: &Value) -> Value {
    let Some(s) = v.as_str().filter(|s| !s.is_empty()) else {
        return Value::Null;
    };
    match crate::upstream::token::parse_identity_time(s) {
        Some(t) => json!(t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()),
        None => json!(s),
    }
}

/// The root and additional volumes of a server, from its volume attachments
/// (the root is the one on `/dev/vda` or `/dev/sda`).
#[derive(Debug, Clone, Default)]
pub struct ServerVolumes {
    pub root: Option<String>,
    pub others: Vec<String>,
}

impl ServerVolumes {
    pub fn from_attachments(attachments: &Value) -> ServerVolumes {
        let mut out = ServerVolumes::default();
        for a in attachments["volumeAttachments"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(id) = a["volumeId"].as_str() else {
                continue;
            };
            let device = a["device"].as_str().unwrap_or_default();
            if out.root.is_none() && (device.ends_with("/vda") || device.ends_with("/sda")) {
                out.root = Some(id.to_string());
            } else {
                out.others.push(id.to_string());
            }
        }
        out
    }
}

/// `instances-detail`: the v1.0 instance built from a v2 server.
pub fn instance_detail(
    server: &Value,
    flavors: &HashMap<String, FlavorInfo>,
    volumes: &ServerVolumes,
) -> Value {
    let flavor_id = server["flavor"]["id"].as_str().unwrap_or_default();
    let flavor = flavors.get(flavor_id);
    let root_size = match flavor {
        // Local-disk flavors (u2) carry the root disk size themselves.
        Some(f) if f.disk > 0 => json!(f.disk),
        _ => server["metadata"]["volume_size"]
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
            .map(Value::from)
            .unwrap_or(Value::Null),
    };
    let attachments: Vec<Value> = volumes
        .others
        .iter()
        .map(|id| json!({"id": id, "name": Value::Null, "size": Value::Null}))
        .collect();
    json!({
        "addresses": addresses(&server["addresses"]),
        "availabilityZone": server["OS-EXT-AZ:availability_zone"],
        "flavor": {
            "id": flavor_id,
            "name": flavor.map(|f| json!(f.name)).unwrap_or(Value::Null),
            "cpu": flavor.map(|f| json!(f.vcpus)).unwrap_or(Value::Null),
            "ram": flavor.map(|f| json!(f.ram)).unwrap_or(Value::Null),
        },
        "status": status_of(server),
        "id": server["id"],
        "name": server["name"],
        "image": server["image"]["id"].as_str().unwrap_or_default(),
        "metadata": if server["metadata"].is_object() { server["metadata"].clone() } else { json!({}) },
        "keyName": server["key_name"],
        "volumes": {
            "root": {"size": root_size},
            "attachments": attachments,
        },
        "securityGroups": security_groups(&server["security_groups"]),
        "launchedAt": v1_time(&server["OS-SRV-USG:launched_at"]),
        "createdAt": v1_time(&server["created"]),
        "updatedAt": v1_time(&server["updated"]),
    })
}

/// One entry per NIC (fixed address), with the floating address that shares
/// its MAC, as the v1.0 API shows them.
fn addresses(v2: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    let Some(networks) = v2.as_object() else {
        return out;
    };
    for entries in networks.values() {
        let entries = entries.as_array().map(Vec::as_slice).unwrap_or_default();
        for fixed in entries
            .iter()
            .filter(|e| e["OS-EXT-IPS:type"] != "floating")
        {
            let mac = &fixed["OS-EXT-IPS-MAC:mac_addr"];
            let floating = entries
                .iter()
                .find(|e| {
                    e["OS-EXT-IPS:type"] == "floating" && &e["OS-EXT-IPS-MAC:mac_addr"] == mac
                })
                .map(|e| e["addr"].clone())
                .unwrap_or(Value::Null);
            out.push(json!({
                "macAddress": mac,
                "ipAddress": fixed["addr"],
                "version": fixed["version"],
                "floatingIpAddress": floating,
            }));
        }
    }
    out
}

/// Nova lists a group once per port; the v1.0 API lists each group once.
fn security_groups(v2: &Value) -> Vec<Value> {
    let mut seen: Vec<&str> = Vec::new();
    for g in v2.as_array().into_iter().flatten() {
        if let Some(n) = g["name"].as_str()
            && !seen.contains(&n)
        {
            seen.push(n);
        }
    }
    seen.into_iter().map(|n| json!({"name": n})).collect()
}

/// `flavors` of the v1.0 API from v2 `flavors/detail`.
pub fn flavor(v2: &Value) -> Value {
    let name = v2["name"].as_str().unwrap_or_default();
    let disk = v2["disk"].as_i64().unwrap_or(0);
    // Local-disk flavors have a fixed root disk; volume-backed ones take a
    // root volume of 10 GB to 1 TB (the spec's limits).
    let (min_volume, max_volume) = if disk > 0 { (disk, disk) } else { (10, 1000) };
    json!({
        "disabled": v2["OS-FLV-DISABLED:disabled"].as_bool().unwrap_or(false),
        "ephemeral": v2["OS-FLV-EXT-DATA:ephemeral"].as_i64().unwrap_or(0),
        "type": flavor_type(v2["extra_specs"]["flavor_type"].as_str(), name),
        "minVolumeSize": min_volume,
        "maxVolumeSize": max_volume,
        "id": v2["id"],
        "name": name,
        "isPublic": v2["os-flavor-access:is_public"].as_bool().unwrap_or(true),
        "ram": v2["ram"],
        "vcpus": v2["vcpus"],
    })
}

/// One of the v1.0 spec's three types: `general`, `compute`, `memory`.
pub fn flavor_type(extra_spec: Option<&str>, name: &str) -> &'static str {
    match extra_spec {
        Some("compute") => return "compute",
        Some("memory") => return "memory",
        Some("general") => return "general",
        _ => {}
    }
    match name.chars().next() {
        Some('c') => "compute",
        Some('r') => "memory",
        _ => "general",
    }
}

pub fn flavor_info(v2: &Value) -> Option<(String, FlavorInfo)> {
    Some((
        v2["id"].as_str()?.to_string(),
        FlavorInfo {
            name: v2["name"].as_str().unwrap_or_default().to_string(),
            vcpus: v2["vcpus"].as_i64().unwrap_or(0),
            ram: v2["ram"].as_i64().unwrap_or(0),
            disk: v2["disk"].as_i64().unwrap_or(0),
        },
    ))
}

pub fn zones(v2: &Value) -> Vec<Value> {
    v2["availabilityZoneInfo"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|z| json!({"zoneName": z["zoneName"], "zoneState": {"available": z["zoneState"]["available"]}}))
        .collect()
}

/// A keypair of the v1.0 list; `createdAt` only for a lookup by name.
pub fn keypair(v2: &Value, with_created_at: bool) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), v2["name"].clone());
    m.insert("publicKey".into(), v2["public_key"].clone());
    m.insert("fingerprint".into(), v2["fingerprint"].clone());
    if with_created_at {
        m.insert("createdAt".into(), v2["created_at"].clone());
    }
    Value::Object(m)
}

/// The answer to a keypair creation; `privateKey` only when generated.
pub fn created_keypair(v2: &Value) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), v2["name"].clone());
    m.insert("publicKey".into(), v2["public_key"].clone());
    if let Some(private) = v2.get("private_key").filter(|p| p.is_string()) {
        m.insert("privateKey".into(), private.clone());
    }
    m.insert("fingerprint".into(), v2["fingerprint"].clone());
    Value::Object(m)
}

pub fn attachment(v2: &Value) -> Value {
    let a = &v2["volumeAttachment"];
    json!({"device": a["device"], "id": a["id"], "volumeId": a["volumeId"]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_brief_server_reads_as_the_whole_one_does() {
        for server in [
            json!({"id": "s1", "name": "web-1", "status": "ACTIVE", "OS-EXT-STS:task_state": null, "flavor": {"id": "f"}}),
            json!({"id": "s2", "name": "web-2", "status": "ACTIVE", "OS-EXT-STS:task_state": "rebooting"}),
            json!({"id": "s3", "name": "web-3", "status": "SHUTOFF"}),
            json!({"id": "s4", "status": "WEIRD"}),
        ] {
            let brief: BriefServer = serde_json::from_value(server.clone()).unwrap();
            assert_eq!(brief.to_v1(), instance_brief(&server), "{server}");
        }
    }

    #[test]
    fn status_table_row_by_row() {
        let rows: &[(&str, Option<&str>, &str)] = &[
            ("BUILD", None, "BUILD"),
            ("BUILD", Some("scheduling"), "BUILD"),
            ("BUILD", Some("spawning"), "BUILD"),
            ("ACTIVE", None, "ACTIVE"),
            ("ACTIVE", Some("powering-off"), "POWERING_OFF"),
            ("SHUTOFF", Some("powering-on"), "POWERING_ON"),
            ("SHUTOFF", None, "STOP"),
            ("ACTIVE", Some("rebooting"), "REBOOTING"),
            ("REBOOT", Some("rebooting"), "REBOOTING"),
            ("HARD_REBOOT", Some("reboot_started_hard"), "REBOOTING"),
            ("REBOOT", None, "REBOOTING"),
            ("HARD_REBOOT", None, "REBOOTING"),
            ("RESIZE", Some("resize_migrating"), "RESIZING"),
            ("RESIZE", None, "RESIZING"),
            ("VERIFY_RESIZE", None, "RESIZING"),
            ("REVERT_RESIZE", None, "RESIZING"),
            ("ACTIVE", Some("migrating"), "MIGRATING"),
            ("MIGRATING", None, "MIGRATING"),
            ("ACTIVE", Some("deleting"), "DELETING"),
            ("SHUTOFF", Some("deleting"), "DELETING"),
            ("ERROR", Some("deleting"), "DELETING"),
            ("DELETED", None, "DELETING"),
            ("ERROR", None, "ERROR"),
            ("UNKNOWN", None, "ERROR"),
            ("PAUSED", None, "STOP"),
            ("SUSPENDED", None, "STOP"),
            ("ACTIVE", Some("image_snapshot"), "ACTIVE"),
            ("SHUTOFF", Some("image_uploading"), "STOP"),
        ];
        for (status, task, want) in rows {
            assert_eq!(v1_status(status, *task), *want, "{status} / {task:?}");
        }
    }

    fn spec_server() -> Value {
        json!({
            "status": "ACTIVE", "updated": "2020-02-25T01:22:24Z",
            "addresses": {"vpc2": [
                {"OS-EXT-IPS-MAC:mac_addr": "fa:16:3e:54:a7:64", "version": 4, "addr": "172.16.0.40", "OS-EXT-IPS:type": "fixed"},
                {"OS-EXT-IPS-MAC:mac_addr": "fa:16:3e:54:a7:64", "version": 4, "addr": "133.186.1.2", "OS-EXT-IPS:type": "floating"}
            ], "vpc3": [
                {"OS-EXT-IPS-MAC:mac_addr": "fa:16:3e:00:00:01", "version": 4, "addr": "10.0.0.5", "OS-EXT-IPS:type": "fixed"}
            ]},
            "key_name": "access-key",
            "image": {"id": "8b9f8d47-b89b-45af-b1d6-3f7ce7e06a11"},
            "OS-EXT-STS:task_state": null, "OS-EXT-STS:vm_state": "active",
            "OS-SRV-USG:launched_at": "2020-02-25T01:22:23.000000",
            "flavor": {"id": "35a73b57-58a7-434d-aa08-5249aaa95b3e"},
            "id": "aaf2778b-ea03-4ccc-8b1b-92f4b686c3ec",
            "security_groups": [{"name": "default"}, {"name": "default"}, {"name": "web"}],
            "OS-EXT-AZ:availability_zone": "kr-pub-b",
            "name": "Web-Server", "created": "2020-02-25T01:15:46Z",
            "os-extended-volumes:volumes_attached": [{"id": "root-vol"}, {"id": "data-vol"}],
            "metadata": {"os_type": "Windows", "volume_size": "50"}
        })
    }

    #[test]
    fn detail_follows_the_v1_shape_field_by_field() {
        let mut flavors = HashMap::new();
        flavors.insert(
            "35a73b57-58a7-434d-aa08-5249aaa95b3e".to_string(),
            FlavorInfo {
                name: "m2.c2m4".into(),
                vcpus: 2,
                ram: 4096,
                disk: 0,
            },
        );
        let volumes = ServerVolumes {
            root: Some("root-vol".into()),
            others: vec!["data-vol".into()],
        };
        let d = instance_detail(&spec_server(), &flavors, &volumes);
        assert_eq!(
            d["addresses"],
            json!([
                {"macAddress": "fa:16:3e:54:a7:64", "ipAddress": "172.16.0.40", "version": 4, "floatingIpAddress": "133.186.1.2"},
                {"macAddress": "fa:16:3e:00:00:01", "ipAddress": "10.0.0.5", "version": 4, "floatingIpAddress": null}
            ])
        );
        assert_eq!(d["availabilityZone"], "kr-pub-b");
        assert_eq!(
            d["flavor"],
            json!({"id": "35a73b57-58a7-434d-aa08-5249aaa95b3e", "name": "m2.c2m4", "cpu": 2, "ram": 4096})
        );
        assert_eq!(d["status"], "ACTIVE");
        assert_eq!(d["image"], "8b9f8d47-b89b-45af-b1d6-3f7ce7e06a11");
        assert_eq!(d["keyName"], "access-key");
        assert_eq!(
            d["volumes"],
            json!({"root": {"size": 50}, "attachments": [{"id": "data-vol", "name": null, "size": null}]})
        );
        assert_eq!(
            d["securityGroups"],
            json!([{"name": "default"}, {"name": "web"}])
        );
        assert_eq!(d["launchedAt"], "2020-02-25T01:22:23.000000");
        assert_eq!(d["createdAt"], "2020-02-25T01:15:46.000000");
        assert_eq!(d["updatedAt"], "2020-02-25T01:22:24.000000");
        assert_eq!(d["metadata"]["os_type"], "Windows");
        assert_eq!(
            instance_brief(&spec_server()),
            json!({"id": "aaf2778b-ea03-4ccc-8b1b-92f4b686c3ec", "name": "Web-Server", "status": "ACTIVE"})
        );
    }

    #[test]
    fn root_volume_is_the_one_on_vda() {
        let v = ServerVolumes::from_attachments(&json!({"volumeAttachments": [
            {"device": "/dev/vdb", "volumeId": "data"},
            {"device": "/dev/vda", "volumeId": "root"}
        ]}));
        assert_eq!(v.root.as_deref(), Some("root"));
        assert_eq!(v.others, vec!["data".to_string()]);
    }

    #[test]
    fn flavor_from_spec_detail_example() {
        let v2 = json!({
            "name": "x1.c32m256", "ram": 262144, "OS-FLV-DISABLED:disabled": false, "vcpus": 32,
            "extra_specs": {"flavor_type": "performance"}, "swap": "", "os-flavor-access:is_public": true,
            "rxtx_factor": 1.0, "OS-FLV-EXT-DATA:ephemeral": 0, "disk": 0,
            "id": "97604802-a090-43fa-a5ce-c7cfd737fbba"
        });
        assert_eq!(
            flavor(&v2),
            json!({"disabled": false, "ephemeral": 0, "type": "general", "minVolumeSize": 10, "maxVolumeSize": 1000,
                   "id": "97604802-a090-43fa-a5ce-c7cfd737fbba", "name": "x1.c32m256", "isPublic": true,
                   "ram": 262144, "vcpus": 32})
        );
        assert_eq!(flavor_type(None, "c2.c2m2"), "compute");
        assert_eq!(flavor_type(None, "r2.c2m4"), "memory");
        assert_eq!(flavor_type(Some("memory"), "x"), "memory");
        let local = json!({"name": "u2.c1m1", "disk": 20, "id": "u"});
        assert_eq!(flavor(&local)["minVolumeSize"], 20);
    }

    #[test]
    fn keypairs_and_zones() {
        let kp = json!({"name": "k", "public_key": "ssh-rsa A", "fingerprint": "aa:bb", "created_at": "2020-02-07T03:46:48.000000", "private_key": "-----BEGIN"});
        assert_eq!(
            keypair(&kp, false),
            json!({"name": "k", "publicKey": "ssh-rsa A", "fingerprint": "aa:bb"})
        );
        assert_eq!(
            keypair(&kp, true)["createdAt"],
            "2020-02-07T03:46:48.000000"
        );
        assert_eq!(created_keypair(&kp)["privateKey"], "-----BEGIN");
        assert!(
            created_keypair(&json!({"name": "k"}))
                .get("privateKey")
                .is_none()
        );
        let z = json!({"availabilityZoneInfo": [{"zoneState": {"available": true}, "hosts": null, "zoneName": "kr-pub-a"}]});
        assert_eq!(
            zones(&z),
            vec![json!({"zoneName": "kr-pub-a", "zoneState": {"available": true}})]
        );
    }
}
