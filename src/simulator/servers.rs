//! Servers: list/show/create/update/delete. The `action` endpoint is in `actions`, volume
//! attachments in `attachments`.
//!
//! Error statuses follow Nova: bad input 400, unknown server 404, wrong state 409
//! (`Cannot '<action key>' instance <id> while it is in vm_state|task_state <state>`),
//! quota 403.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderValue, StatusCode, header};
use regex::RegexBuilder;
use serde_json::{Map, Value, json};

use super::attachments::next_device;
use super::catalog::{self, Flavor, Network, OsType};
use super::compute::{Ctx, tenant_mut};
use super::reply::{
    Fault, Reply, add, bad, bool_like, conflict, empty_response, fmt_micro, fmt_z, int_like,
    invalid_field, json_response, next_link, not_found, ok, parse_body, parse_limit, parse_time,
    query_all, query_get, required,
};
use super::state::{
    Attachment, INSTANCE_QUOTA, Image, Nic, Op, Pending, Phase, Server, Tenant, VOLUME_QUOTA,
    VmState, Volume, World, random_mac,
};

pub(crate) fn instance_not_found(id: &str) -> Fault {
    not_found(format!("Instance {id} could not be found."))
}

pub(crate) fn find<'t>(tenant: &'t Tenant, id: &str) -> Result<&'t Server, Fault> {
    tenant.server(id).ok_or_else(|| instance_not_found(id))
}

pub(crate) fn find_mut<'t>(tenant: &'t mut Tenant, id: &str) -> Result<&'t mut Server, Fault> {
    tenant.server_mut(id).ok_or_else(|| instance_not_found(id))
}

/// The last path segment of an id-or-href reference (Nova accepts both).
pub(crate) fn ref_id(r: &str) -> &str {
    r.trim_end_matches('/').rsplit('/').next().unwrap_or(r)
}

// ---- representations ----------------------------------------------------------------

/// Every field of the spec's server example.
pub(crate) fn detail(ctx: &Ctx<'_>, s: &Server) -> Value {
    let ph = s.phase(ctx.now);
    let mut addresses = Map::new();
    for nic in &s.nics {
        let entry = addresses
            .entry(nic.network_name.to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = entry {
            list.push(json!({
                "OS-EXT-IPS-MAC:mac_addr": nic.mac,
                "version": 4,
                "addr": nic.ip.to_string(),
                "OS-EXT-IPS:type": "fixed"
            }));
            if let Some(f) = nic.floating {
                list.push(json!({
                    "OS-EXT-IPS-MAC:mac_addr": nic.mac,
                    "version": 4,
                    "addr": f.to_string(),
                    "OS-EXT-IPS:type": "floating"
                }));
            }
        }
    }
    // Not yet scheduled (or gone): no host.
    let host_id = if ph.task == Some("scheduling") || s.vm == VmState::Deleted {
        String::new()
    } else {
        s.host_id()
    };
    let mut attached: Vec<&Attachment> = s.attachments.iter().collect();
    attached.sort_by(|a, b| a.device.cmp(&b.device));
    let volumes: Vec<Value> = attached
        .iter()
        .map(|a| json!({"id": a.volume_id}))
        .collect();
    let groups: Vec<Value> = s
        .security_groups
        .iter()
        .map(|n| json!({"name": n}))
        .collect();

    let mut m = Map::new();
    m.insert("status".into(), json!(ph.status));
    m.insert("updated".into(), json!(fmt_z(s.updated)));
    m.insert("hostId".into(), json!(host_id));
    m.insert("addresses".into(), Value::Object(addresses));
    m.insert("links".into(), ctx.links("servers", &s.id));
    m.insert("key_name".into(), json!(s.key_name));
    m.insert(
        "image".into(),
        json!({"id": s.image_id, "links": [ctx.bookmark("images", &s.image_id)]}),
    );
    m.insert("OS-EXT-STS:task_state".into(), json!(ph.task));
    m.insert("OS-EXT-STS:vm_state".into(), json!(ph.vm.as_str()));
    m.insert(
        "OS-SRV-USG:launched_at".into(),
        json!(s.launched_at.map(fmt_micro)),
    );
    m.insert(
        "flavor".into(),
        json!({"id": ph.flavor_id, "links": [ctx.bookmark("flavors", &ph.flavor_id)]}),
    );
    m.insert("id".into(), json!(s.id));
    m.insert("security_groups".into(), Value::Array(groups));
    m.insert(
        "OS-SRV-USG:terminated_at".into(),
        json!(s.terminated_at.map(fmt_micro)),
    );
    m.insert("OS-EXT-AZ:availability_zone".into(), json!(s.az));
    m.insert("user_id".into(), json!(s.user_id));
    m.insert("name".into(), json!(s.name));
    m.insert("created".into(), json!(fmt_z(s.created)));
    m.insert("tenant_id".into(), json!(s.tenant_id));
    m.insert("OS-DCF:diskConfig".into(), json!(s.disk_config));
    m.insert(
        "os-extended-volumes:volumes_attached".into(),
        Value::Array(volumes),
    );
    m.insert("accessIPv4".into(), json!(""));
    m.insert("accessIPv6".into(), json!(""));
    m.insert("progress".into(), json!(0));
    m.insert("OS-EXT-STS:power_state".into(), json!(ph.power));
    m.insert("config_drive".into(), json!(""));
    m.insert("metadata".into(), json!(s.metadata));
    Value::Object(m)
}

fn brief(ctx: &Ctx<'_>, s: &Server) -> Value {
    json!({"id": s.id, "links": ctx.links("servers", &s.id), "name": s.name})
}

// ---- list / show --------------------------------------------------------------------

/// `GET servers[/detail]`, newest first, with Nova's filters. `changes-since` also
/// returns servers deleted since then (status `DELETED`), as Nova does.
pub(crate) fn list(ctx: &Ctx<'_>, with_detail: bool) -> Reply {
    let q = &ctx.query;
    let limit = parse_limit(q)?;
    let since = match query_get(q, "changes-since") {
        Some(raw) => Some(
            parse_time(raw).ok_or_else(|| bad(format!("Invalid changes-since value: {raw}")))?,
        ),
        None => None,
    };
    let name_re = match query_get(q, "name") {
        Some(p) => Some(
            RegexBuilder::new(p)
                .size_limit(1 << 20)
                .build()
                .map_err(|_| bad(format!("Invalid regular expression in name filter: {p}")))?,
        ),
        None => None,
    };
    let image = query_get(q, "image").map(ref_id);
    let flavor = query_get(q, "flavor").map(ref_id);
    let statuses: Vec<String> = query_all(q, "status")
        .iter()
        .map(|s| s.trim().to_ascii_uppercase())
        .collect();

    let mut world = ctx.world();
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    let marker_seq = match query_get(q, "marker") {
        Some(m) => Some(
            tenant
                .servers
                .iter()
                .chain(tenant.tombstones.iter())
                .find(|s| s.id == m)
                .map(|s| s.seq)
                .ok_or_else(|| bad(format!("marker [{m}] not found")))?,
        ),
        None => None,
    };
    let mut all: Vec<&Server> = tenant.servers.iter().collect();
    if since.is_some() {
        all.extend(tenant.tombstones.iter());
    }
    all.sort_by_key(|s| std::cmp::Reverse(s.seq));
    let mut items: Vec<&Server> = all
        .into_iter()
        .filter(|s| {
            let ph: Phase = s.phase(ctx.now);
            since.is_none_or(|t| s.updated >= t)
                && name_re.as_ref().is_none_or(|re| re.is_match(&s.name))
                && image.is_none_or(|i| s.image_id == i)
                && flavor.is_none_or(|f| ph.flavor_id == f)
                && (statuses.is_empty() || statuses.iter().any(|st| st == ph.status))
                && marker_seq.is_none_or(|m| s.seq < m)
        })
        .collect();
    if let Some(l) = limit {
        items.truncate(l);
    }
    let list: Vec<Value> = items
        .iter()
        .map(|s| {
            if with_detail {
                detail(ctx, s)
            } else {
                brief(ctx, s)
            }
        })
        .collect();
    let mut body = json!({ "servers": list });
    if let (Some(l), Some(last)) = (limit, items.last())
        && l > 0
        && items.len() == l
    {
        let coll = if with_detail {
            "servers/detail"
        } else {
            "servers"
        };
        body["servers_links"] = json!([next_link(&ctx.collection_url(coll), q, &last.id)]);
    }
    ok(body)
}

pub(crate) fn show(ctx: &Ctx<'_>, id: &str) -> Reply {
    let mut world = ctx.world();
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    let s = find(tenant, id)?;
    ok(json!({"server": detail(ctx, s)}))
}

// ---- create -------------------------------------------------------------------------

/// Keys Nova's create schema knows (anything else is a 400, which catches typos in a
/// gateway's translation).
const CREATE_KEYS: &[&str] = &[
    "name",
    "imageRef",
    "flavorRef",
    "networks",
    "availability_zone",
    "key_name",
    "min_count",
    "max_count",
    "block_device_mapping_v2",
    "metadata",
    "user_data",
    "security_groups",
    "personality",
    "OS-DCF:diskConfig",
    "config_drive",
    "adminPass",
    "accessIPv4",
    "accessIPv6",
    "description",
    "return_reservation_id",
    "tags",
];

pub(crate) fn get_string<'v>(
    obj: &'v Map<String, Value>,
    key: &str,
) -> Result<Option<&'v str>, Fault> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(invalid_field(key, other, "It is not of type 'string'")),
    }
}

pub(crate) fn req_string<'v>(obj: &'v Map<String, Value>, key: &str) -> Result<&'v str, Fault> {
    get_string(obj, key)?.ok_or_else(|| required(key))
}

pub(crate) fn validate_name(field: &str, name: &str) -> Result<(), Fault> {
    let len = name.chars().count();
    if len == 0 {
        return Err(invalid_field(field, &json!(name), "'' is too short"));
    }
    if len > 255 {
        return Err(invalid_field(
            field,
            &json!(name),
            "It is longer than 255 characters",
        ));
    }
    if name.trim() != name {
        return Err(invalid_field(
            field,
            &json!(name),
            "It has leading or trailing whitespace",
        ));
    }
    Ok(())
}

/// Metadata: string keys 1-255, string values <= 255, at most 128 items.
pub(crate) fn parse_metadata(
    field: &str,
    v: Option<&Value>,
) -> Result<BTreeMap<String, String>, Fault> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(o)) => o,
        Some(other) => return Err(invalid_field(field, other, "It is not of type 'object'")),
    };
    if obj.len() > 128 {
        return Err(Fault::Forbidden(
            "Quota exceeded for metadata_items: Requested more than 128.".into(),
        ));
    }
    let mut out = BTreeMap::new();
    for (k, val) in obj {
        let klen = k.chars().count();
        if klen == 0 || klen > 255 {
            return Err(bad(format!(
                "Invalid input for field/attribute {field}. Metadata keys must be 1 to 255 \
                 characters long"
            )));
        }
        let Value::String(s) = val else {
            return Err(invalid_field(field, val, "Metadata values must be strings"));
        };
        if s.chars().count() > 255 {
            return Err(bad(format!(
                "Invalid input for field/attribute {field}. The value of metadata key '{k}' \
                 is longer than 255 characters"
            )));
        }
        out.insert(k.clone(), s.clone());
    }
    Ok(out)
}

#[derive(Debug)]
enum NetRequest {
    Network(&'static Network),
    Port(String),
    FixedIp(Ipv4Addr),
}

fn parse_networks(v: Option<&Value>) -> Result<Vec<NetRequest>, Fault> {
    let list = match v {
        None | Some(Value::Null) => return Err(required("networks")),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(invalid_field(
                "networks",
                other,
                "It is not of type 'array'",
            ));
        }
    };
    if list.is_empty() {
        return Err(bad(
            "Invalid input for field/attribute networks. At least one network is required",
        ));
    }
    let mut out = Vec::new();
    for entry in list {
        let Value::Object(obj) = entry else {
            return Err(invalid_field(
                "networks",
                entry,
                "It is not of type 'object'",
            ));
        };
        if let Some(extra) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "uuid" | "port" | "fixed_ip" | "subnet" | "tag"))
        {
            return Err(bad(format!(
                "Invalid input for field/attribute networks. Additional properties are not \
                 allowed ('{extra}' was unexpected)"
            )));
        }
        let given: Vec<&str> = ["uuid", "port", "fixed_ip", "subnet"]
            .into_iter()
            .filter(|k| obj.contains_key(*k))
            .collect();
        if given.len() != 1 {
            return Err(bad(
                "Each networks entry must specify exactly one of uuid, port, fixed_ip or subnet",
            ));
        }
        let key = given[0];
        let val = get_string(obj, key)?.unwrap_or_default();
        out.push(match key {
            "uuid" => NetRequest::Network(
                catalog::network_by_id(val)
                    .ok_or_else(|| bad(format!("Network {val} could not be found.")))?,
            ),
            "subnet" => NetRequest::Network(
                catalog::network_by_subnet(val)
                    .ok_or_else(|| bad(format!("Subnet {val} could not be found.")))?,
            ),
            "port" => NetRequest::Port(val.to_string()),
            _ => NetRequest::FixedIp(val.parse::<Ipv4Addr>().map_err(|_| {
                invalid_field("fixed_ip", &json!(val), "It is not a valid IPv4 address")
            })?),
        });
    }
    Ok(out)
}

#[derive(Debug)]
struct Bdm {
    boot_index: Option<i64>,
    source: String,
    destination: String,
    size: Option<i64>,
    uuid: Option<String>,
    delete_on_termination: bool,
}

fn parse_bdms(v: Option<&Value>) -> Result<Vec<Bdm>, Fault> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(invalid_field(
                "block_device_mapping_v2",
                other,
                "It is not of type 'array'",
            ));
        }
    };
    let mut out = Vec::new();
    for entry in list {
        let Value::Object(obj) = entry else {
            return Err(invalid_field(
                "block_device_mapping_v2",
                entry,
                "It is not of type 'object'",
            ));
        };
        let boot_index = match obj.get("boot_index") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                int_like(v)
                    .ok_or_else(|| invalid_field("boot_index", v, "It is not of type 'integer'"))?,
            ),
        };
        let source = get_string(obj, "source_type")?
            .ok_or_else(|| required("source_type"))?
            .to_string();
        if !matches!(source.as_str(), "blank" | "snapshot" | "volume" | "image") {
            return Err(invalid_field(
                "source_type",
                &json!(source),
                "It is not one of ['blank', 'snapshot', 'volume', 'image']",
            ));
        }
        let destination = get_string(obj, "destination_type")?
            .unwrap_or("volume")
            .to_string();
        if !matches!(destination.as_str(), "local" | "volume") {
            return Err(invalid_field(
                "destination_type",
                &json!(destination),
                "It is not one of ['local', 'volume']",
            ));
        }
        let size =
            match obj.get("volume_size") {
                None | Some(Value::Null) => None,
                Some(v) => Some(int_like(v).ok_or_else(|| {
                    invalid_field("volume_size", v, "It is not of type 'integer'")
                })?),
            };
        let uuid = get_string(obj, "uuid")?.map(str::to_string);
        let delete_on_termination = match obj.get("delete_on_termination") {
            None | Some(Value::Null) => false,
            Some(v) => bool_like(v).ok_or_else(|| {
                invalid_field("delete_on_termination", v, "It is not of type 'boolean'")
            })?,
        };
        out.push(Bdm {
            boot_index,
            source,
            destination,
            size,
            uuid,
            delete_on_termination,
        });
    }
    Ok(out)
}

/// Everything `POST servers` asked for, validated as far as possible without the world.
struct CreateRequest {
    name: String,
    image_ref: String,
    flavor: &'static Flavor,
    key_name: String,
    networks: Vec<NetRequest>,
    az: String,
    count: usize,
    boot: Option<Bdm>,
    data_bdms: Vec<Bdm>,
    metadata: BTreeMap<String, String>,
    security_groups: Vec<String>,
    disk_config: String,
}

fn parse_create(body: &Value) -> Result<CreateRequest, Fault> {
    let srv = match body.get("server") {
        Some(Value::Object(o)) => o,
        Some(other) => return Err(invalid_field("server", other, "It is not of type 'object'")),
        None => return Err(required("server")),
    };
    if let Some(extra) = srv.keys().find(|k| !CREATE_KEYS.contains(&k.as_str())) {
        return Err(bad(format!(
            "Invalid input for field/attribute server. Additional properties are not allowed \
             ('{extra}' was unexpected)"
        )));
    }
    let name = req_string(srv, "name")?.to_string();
    validate_name("name", &name)?;

    let flavor_ref = req_string(srv, "flavorRef")?;
    let flavor = catalog::flavor(ref_id(flavor_ref))
        .ok_or_else(|| bad(format!("Flavor {flavor_ref} could not be found.")))?;

    let key_name = req_string(srv, "key_name")?.to_string();
    let networks = parse_networks(srv.get("networks"))?;

    let az = match get_string(srv, "availability_zone")? {
        Some(z) if catalog::AVAILABILITY_ZONES.contains(&z) => z.to_string(),
        Some(_) => return Err(bad("The requested availability zone is not available")),
        None => catalog::AVAILABILITY_ZONES[0].to_string(),
    };

    let count_of = |key: &str| -> Result<Option<i64>, Fault> {
        match srv.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match int_like(v) {
                Some(n) if n >= 1 => Ok(Some(n)),
                Some(_) => Err(invalid_field(key, v, "It must be 1 or greater")),
                None => Err(invalid_field(key, v, "It is not of type 'integer'")),
            },
        }
    };
    let min_count = count_of("min_count")?.unwrap_or(1);
    let max_count = count_of("max_count")?.unwrap_or(min_count);
    if max_count < min_count {
        return Err(bad("min_count must be <= max_count"));
    }
    if max_count > INSTANCE_QUOTA as i64 {
        return Err(Fault::Forbidden(format!(
            "Quota exceeded for instances: Requested {max_count}, but the limit is \
             {INSTANCE_QUOTA} instances"
        )));
    }
    let count = usize::try_from(max_count).unwrap_or(1);
    if count > 1
        && networks
            .iter()
            .any(|n| matches!(n, NetRequest::Port(_) | NetRequest::FixedIp(_)))
    {
        return Err(bad(
            "Multiple instances cannot be created with a port or a fixed IP in networks",
        ));
    }

    let bdms = parse_bdms(srv.get("block_device_mapping_v2"))?;
    let (mut boots, data_bdms): (Vec<Bdm>, Vec<Bdm>) =
        bdms.into_iter().partition(|b| b.boot_index == Some(0));
    if boots.len() > 1 {
        return Err(bad(
            "Boot sequence for the instance and image/block device mapping combination is not \
             valid: more than one boot_index 0",
        ));
    }
    let boot = boots.pop();
    if let Some(b) = &boot {
        if b.source != "image" {
            return Err(bad(
                "The root volume (boot_index 0) must have source_type 'image'",
            ));
        }
        if b.destination == "volume" && b.size.is_none_or(|s| s <= 0) {
            return Err(bad(
                "Images with destination_type 'volume' need to have a non-zero size specified",
            ));
        }
    }
    let image_ref = match (
        get_string(srv, "imageRef")?.filter(|s| !s.is_empty()),
        &boot,
    ) {
        (Some(r), Some(Bdm { uuid: Some(u), .. })) if ref_id(r) != u => {
            return Err(bad(format!(
                "imageRef {r} and the boot block device mapping image {u} differ"
            )));
        }
        (Some(r), _) => ref_id(r).to_string(),
        (None, Some(Bdm { uuid: Some(u), .. })) => u.clone(),
        (None, _) => return Err(required("imageRef")),
    };
    let root_is_volume = boot.as_ref().is_some_and(|b| b.destination == "volume");
    if !flavor.is_local_disk() && !root_is_volume {
        return Err(bad(format!(
            "Flavor {} has no local disk: block_device_mapping_v2 with a boot_index 0 entry \
             (source_type 'image', destination_type 'volume', volume_size) is required",
            flavor.name
        )));
    }
    for b in &data_bdms {
        match (b.source.as_str(), b.destination.as_str()) {
            ("blank", "volume") => {
                if b.size.is_none_or(|s| !(1..=2000).contains(&s)) {
                    return Err(bad(
                        "Block Device Mapping is Invalid: blank volumes need a volume_size \
                         between 1 and 2000",
                    ));
                }
            }
            ("volume", "volume") => {
                if b.uuid.is_none() {
                    return Err(bad(
                        "Block Device Mapping is Invalid: source_type 'volume' needs a uuid",
                    ));
                }
                if count > 1 {
                    return Err(bad(
                        "Cannot attach one or more volumes to multiple instances",
                    ));
                }
            }
            (s, d) => {
                return Err(bad(format!(
                    "Block Device Mapping is Invalid: source_type '{s}' with destination_type \
                     '{d}' is not supported for additional volumes"
                )));
            }
        }
    }
    if data_bdms.len() > 24 {
        return Err(bad("Block Device Mapping is Invalid: too many volumes"));
    }

    let metadata = parse_metadata("metadata", srv.get("metadata"))?;

    match srv.get("user_data") {
        None | Some(Value::Null) => {}
        Some(Value::String(u)) => {
            if u.len() > 65535 {
                return Err(bad(
                    "User data too large. User data must be no larger than 65535 bytes once \
                     base64 encoded.",
                ));
            }
            if STANDARD.decode(u.as_bytes()).is_err() {
                return Err(bad("User data needs to be valid base 64."));
            }
        }
        Some(other) => {
            return Err(invalid_field(
                "user_data",
                other,
                "It is not of type 'string'",
            ));
        }
    }

    match srv.get("personality") {
        None | Some(Value::Null) => {}
        Some(Value::Array(files)) => {
            if files.len() > 5 {
                return Err(Fault::Forbidden("Personality file limit exceeded".into()));
            }
            for f in files {
                let Value::Object(o) = f else {
                    return Err(invalid_field(
                        "personality",
                        f,
                        "It is not of type 'object'",
                    ));
                };
                let path = req_string(o, "path")?;
                if path.is_empty() || path.chars().count() > 255 {
                    return Err(bad("Personality file path must be 1 to 255 characters"));
                }
                let content = match get_string(o, "contents")? {
                    Some(c) => c,
                    None => req_string(o, "content")?,
                };
                if STANDARD.decode(content.as_bytes()).is_err() {
                    return Err(bad(format!(
                        "Personality content for {path} cannot be decoded"
                    )));
                }
            }
        }
        Some(other) => {
            return Err(invalid_field(
                "personality",
                other,
                "It is not of type 'array'",
            ));
        }
    }

    let security_groups = match srv.get("security_groups") {
        None | Some(Value::Null) => vec!["default".to_string()],
        Some(Value::Array(list)) => {
            let mut names: Vec<String> = Vec::new();
            for g in list {
                let name = g
                    .as_object()
                    .and_then(|o| o.get("name"))
                    .and_then(Value::as_str)
                    .filter(|n| !n.trim().is_empty())
                    .ok_or_else(|| {
                        invalid_field("security_groups", g, "Each entry needs a name")
                    })?;
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
            if names.is_empty() {
                names.push("default".into());
            }
            names
        }
        Some(other) => {
            return Err(invalid_field(
                "security_groups",
                other,
                "It is not of type 'array'",
            ));
        }
    };

    let disk_config = match get_string(srv, "OS-DCF:diskConfig")? {
        None => "MANUAL".to_string(),
        Some(d @ ("AUTO" | "MANUAL")) => d.to_string(),
        Some(_) => return Err(bad("OS-DCF:diskConfig must be either 'MANUAL' or 'AUTO'.")),
    };

    Ok(CreateRequest {
        name,
        image_ref,
        flavor,
        key_name,
        networks,
        az,
        count,
        boot,
        data_bdms,
        metadata,
        security_groups,
        disk_config,
    })
}

/// The spec's rules for Windows images and for root volume sizes.
fn check_image_fit(
    image: &Image,
    flavor: &Flavor,
    names: &[String],
    root_gb: Option<i64>,
) -> Result<(), Fault> {
    if image.os_type == OsType::Windows {
        if flavor.is_local_disk() {
            return Err(bad("Windows images cannot be used with u2 flavors."));
        }
        if flavor.ram < 2048 {
            return Err(bad(format!(
                "Windows images need at least 2 GB of RAM; flavor {} has {} MB.",
                flavor.name, flavor.ram
            )));
        }
        if let Some(n) = names.iter().find(|n| n.chars().count() > 15) {
            return Err(bad(format!(
                "The name of a Windows instance must be 15 characters or fewer: {n}"
            )));
        }
    } else if flavor.ram < image.min_ram {
        return Err(bad(format!(
            "Flavor's memory is too small for requested image {}.",
            image.id
        )));
    }
    if let Some(size) = root_gb {
        let min = image.os_type.min_root_gb().max(image.min_disk);
        if size < i64::from(min) || size > i64::from(catalog::MAX_ROOT_GB) {
            return Err(bad(format!(
                "The root volume size must be between {min} and {} GB for image {}; got {size}.",
                catalog::MAX_ROOT_GB,
                image.id
            )));
        }
    }
    Ok(())
}

/// Picks a free fixed IP on `net`, not in `used` nor `taken`.
fn free_ip(net: &Network, used: &HashSet<Ipv4Addr>, taken: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    net.allocatable()
        .find(|ip| !used.contains(ip) && !taken.contains(ip))
}

/// `POST servers`: validates everything, then creates `max_count` servers in BUILD and
/// answers the first, exactly like the spec's example (plus a `Location` header).
pub(crate) fn create(ctx: &Ctx<'_>) -> Reply {
    let body = parse_body(ctx.body)?;
    let req = parse_create(&body)?;
    let names: Vec<String> = if req.count > 1 {
        (1..=req.count)
            .map(|i| format!("{}-{i}", req.name))
            .collect()
    } else {
        vec![req.name.clone()]
    };

    let mut guard = ctx.world();
    let world: &mut World = &mut guard;

    let image = world
        .image(ctx.tenant, &req.image_ref)
        .ok_or_else(|| bad(format!("Image {} could not be found.", req.image_ref)))?;
    if ctx.now < image.ready_at {
        return Err(bad(format!("Image {} is not active.", req.image_ref)));
    }
    let root_gb = req
        .boot
        .as_ref()
        .filter(|b| b.destination == "volume")
        .and_then(|b| b.size);
    check_image_fit(image, req.flavor, &names, root_gb)?;
    let image_id = image.id.clone();
    let image_metadata = image.metadata.clone();

    // Addresses for every server, decided before anything changes.
    let mut taken: HashSet<Ipv4Addr> = HashSet::new();
    let mut plans: Vec<Vec<Nic>> = Vec::new();
    for _ in 0..req.count {
        let mut nics = Vec::new();
        for n in &req.networks {
            let nic = match n {
                NetRequest::Network(net) => {
                    let ip = free_ip(net, &world.used_ips, &taken).ok_or_else(|| {
                        bad(format!(
                            "No more IP addresses available on network {}.",
                            net.name
                        ))
                    })?;
                    Nic {
                        network_name: net.name,
                        mac: random_mac(),
                        ip,
                        floating: None,
                        port_id: None,
                    }
                }
                NetRequest::FixedIp(ip) => {
                    let net = catalog::network_for_ip(*ip).ok_or_else(|| {
                        bad(format!("Fixed IP {ip} does not belong to any network."))
                    })?;
                    if world.used_ips.contains(ip) || taken.contains(ip) {
                        return Err(bad(format!("Fixed IP address {ip} is already in use.")));
                    }
                    Nic {
                        network_name: net.name,
                        mac: random_mac(),
                        ip: *ip,
                        floating: None,
                        port_id: None,
                    }
                }
                NetRequest::Port(pid) => {
                    let port = world
                        .ports
                        .iter()
                        .find(|p| p.id == pid)
                        .ok_or_else(|| bad(format!("Port id {pid} could not be found.")))?;
                    if port.device.is_some() {
                        return Err(conflict(format!("Port {pid} is still in use.")));
                    }
                    let net = catalog::network_by_id(port.network)
                        .ok_or_else(|| bad(format!("Port id {pid} could not be found.")))?;
                    Nic {
                        network_name: net.name,
                        mac: port.mac.to_string(),
                        ip: port.ip,
                        floating: None,
                        port_id: Some(port.id),
                    }
                }
            };
            if nic.port_id.is_none() {
                taken.insert(nic.ip);
            }
            nics.push(nic);
        }
        plans.push(nics);
    }

    let tenant = tenant_mut(world, ctx.tenant)?;
    if !tenant.keypairs.iter().any(|k| k.name == req.key_name) {
        return Err(bad("Invalid key_name provided."));
    }
    if let Some(g) = req
        .security_groups
        .iter()
        .find(|g| !tenant.security_groups.contains(g))
    {
        return Err(bad(format!(
            "Security group {g} not found for project {}.",
            ctx.tenant
        )));
    }
    if tenant.servers.len() + req.count > INSTANCE_QUOTA {
        return Err(Fault::Forbidden(format!(
            "Quota exceeded for instances: Requested {}, but already used {} of {} instances",
            req.count,
            tenant.servers.len(),
            INSTANCE_QUOTA
        )));
    }
    let new_volumes = req.count
        * (usize::from(req.boot.as_ref().is_some_and(|b| b.destination == "volume"))
            + req.data_bdms.iter().filter(|b| b.source == "blank").count());
    if tenant.volumes.len() + new_volumes > VOLUME_QUOTA {
        return Err(Fault::Forbidden(format!(
            "Quota exceeded for volumes: Requested {new_volumes}, but already used {} of \
             {VOLUME_QUOTA} volumes",
            tenant.volumes.len()
        )));
    }
    for b in req.data_bdms.iter().filter(|b| b.source == "volume") {
        let uuid = b.uuid.as_deref().unwrap_or_default();
        match tenant.volumes.iter().find(|v| v.id == uuid) {
            None => return Err(bad(format!("Volume {uuid} could not be found."))),
            Some(v) if v.attached_to.is_some() => {
                return Err(bad(format!(
                    "Invalid volume: volume '{uuid}' status must be 'available'. Currently in \
                     'in-use'"
                )));
            }
            Some(_) => {}
        }
    }

    // Commit.
    let mut metadata = image_metadata;
    metadata.extend(req.metadata.clone());
    let build_end = add(ctx.now, ctx.shared.build_delay);
    let mut first_id = String::new();
    let mut new_servers = Vec::new();
    for (name, nics) in names.into_iter().zip(plans) {
        let id = uuid::Uuid::new_v4().to_string();
        let mut attachments = Vec::new();
        if let Some(b) = req.boot.as_ref().filter(|b| b.destination == "volume") {
            let vol = uuid::Uuid::new_v4().to_string();
            tenant.volumes.push(Volume {
                id: vol.clone(),
                attached_to: Some(id.clone()),
            });
            attachments.push(Attachment {
                volume_id: vol,
                device: "/dev/vda".into(),
                root: true,
                delete_on_termination: b.delete_on_termination,
            });
        }
        for b in &req.data_bdms {
            let vol = match b.source.as_str() {
                "volume" => b.uuid.clone().unwrap_or_default(),
                _ => {
                    let vol = uuid::Uuid::new_v4().to_string();
                    tenant.volumes.push(Volume {
                        id: vol.clone(),
                        attached_to: None,
                    });
                    vol
                }
            };
            if let Some(v) = tenant.volumes.iter_mut().find(|v| v.id == vol) {
                v.attached_to = Some(id.clone());
            }
            let device = next_device(&attachments).unwrap_or_else(|| "/dev/vdz".into());
            attachments.push(Attachment {
                volume_id: vol,
                device,
                root: false,
                delete_on_termination: b.delete_on_termination,
            });
        }
        if first_id.is_empty() {
            first_id = id.clone();
        }
        new_servers.push((id, name, nics, attachments));
    }
    for (id, name, nics, attachments) in new_servers {
        let seq = world.take_seq();
        for nic in &nics {
            match nic.port_id {
                Some(pid) => {
                    if let Some(p) = world.ports.iter_mut().find(|p| p.id == pid) {
                        p.device = Some(id.clone());
                    }
                }
                None => {
                    world.used_ips.insert(nic.ip);
                }
            }
        }
        let host = format!("{}-compute-{:02}", req.az, seq % 3 + 1);
        let server = Server {
            seq,
            id,
            name,
            tenant_id: ctx.tenant.to_string(),
            user_id: ctx.user_id.clone(),
            image_id: image_id.clone(),
            flavor_id: req.flavor.id.to_string(),
            key_name: Some(req.key_name.clone()),
            az: req.az.clone(),
            host,
            created: ctx.now,
            updated: ctx.now,
            launched_at: None,
            terminated_at: None,
            security_groups: req.security_groups.clone(),
            metadata: metadata.clone(),
            nics,
            attachments,
            disk_config: req.disk_config.clone(),
            vm: VmState::Building,
            power: 0,
            pending: Some(Pending {
                op: Op::Build,
                start: ctx.now,
                end: build_end,
            }),
        };
        tenant_mut(world, ctx.tenant)?.servers.push(server);
    }
    drop(guard);

    let links = ctx.links("servers", &first_id);
    let location = format!("{}/{first_id}", ctx.collection_url("servers"));
    let groups: Vec<Value> = req
        .security_groups
        .iter()
        .map(|n| json!({"name": n}))
        .collect();
    let mut resp = json_response(
        StatusCode::ACCEPTED,
        &json!({"server": {
            "security_groups": groups,
            "OS-DCF:diskConfig": req.disk_config,
            "id": first_id,
            "links": links
        }}),
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

// ---- update / delete ----------------------------------------------------------------

/// `PUT servers/{id}`: only `name` can change; answers the full server.
pub(crate) fn update(ctx: &Ctx<'_>, id: &str) -> Reply {
    let body = parse_body(ctx.body)?;
    let srv = match body.get("server") {
        Some(Value::Object(o)) => o,
        Some(other) => return Err(invalid_field("server", other, "It is not of type 'object'")),
        None => return Err(required("server")),
    };
    if let Some(extra) = srv.keys().find(|k| k.as_str() != "name") {
        return Err(bad(format!(
            "Invalid input for field/attribute server. Additional properties are not allowed \
             ('{extra}' was unexpected)"
        )));
    }
    let name = get_string(srv, "name")?;
    if let Some(n) = name {
        validate_name("name", n)?;
    }
    let mut world = ctx.world();
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    let s = find_mut(tenant, id)?;
    if let Some(n) = name {
        s.name = n.to_string();
        s.updated = ctx.now;
    }
    ok(json!({"server": detail(ctx, s)}))
}

/// `DELETE servers/{id}`: 204; the server shows task `deleting` for `action_delay`,
/// then is gone.
pub(crate) fn delete(ctx: &Ctx<'_>, id: &str) -> Reply {
    let mut world = ctx.world();
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    let s = find_mut(tenant, id)?;
    if !s.is_deleting() {
        s.pending = Some(Pending {
            op: Op::Delete,
            start: ctx.now,
            end: add(ctx.now, ctx.shared.action_delay),
        });
        s.updated = ctx.now;
    }
    // With no delay the deletion is already complete.
    world.settle(ctx.now);
    Ok(empty_response(StatusCode::NO_CONTENT))
}
