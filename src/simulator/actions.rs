//! `POST servers/{id}/action`: one action key per request, each with the spec's state
//! rules (a wrong state is Nova's 409 `Cannot '<action key>' instance <id> while it is in
//! vm_state|task_state <state>`), plus the legacy floating IP actions.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};

use super::catalog::{self, Flavor, OsType};
use super::compute::{Ctx, tenant_mut};
use super::reply::{
    Fault, Reply, add, bad, conflict, empty_response, invalid_field, json_response, not_found,
    parse_body, required,
};
use super::servers::{
    find, find_mut, get_string, parse_metadata, ref_id, req_string, validate_name,
};
use super::state::{IMAGE_QUOTA, Image, Op, Pending, Phase, Server, VmState, World};

/// Longest VERIFY_RESIZE window: the spec says TOAST confirms a resize by itself after
/// 1 s. A simulator with a shorter `action_delay` uses that instead, to keep tests fast.
const RESIZE_AUTO_CONFIRM: std::time::Duration = std::time::Duration::from_secs(1);

// ---- actions ------------------------------------------------------------------------

enum Action {
    Start,
    Stop,
    Reboot {
        hard: bool,
    },
    Resize {
        flavor: &'static Flavor,
        disk_config: Option<String>,
    },
    ConfirmResize,
    RevertResize,
    CreateImage {
        name: String,
        metadata: BTreeMap<String, String>,
    },
    AddSecurityGroup(String),
    RemoveSecurityGroup(String),
    AddFloatingIp {
        address: Ipv4Addr,
        fixed: Option<Ipv4Addr>,
    },
    RemoveFloatingIp(Ipv4Addr),
}

fn action_object<'v>(key: &str, arg: &'v Value) -> Result<&'v Map<String, Value>, Fault> {
    arg.as_object()
        .ok_or_else(|| invalid_field(key, arg, "It is not of type 'object'"))
}

fn ipv4_field(obj: &Map<String, Value>, key: &str) -> Result<Option<Ipv4Addr>, Fault> {
    match get_string(obj, key)? {
        None => Ok(None),
        Some(s) => s
            .parse::<Ipv4Addr>()
            .map(Some)
            .map_err(|_| invalid_field(key, &json!(s), "It is not a valid IPv4 address")),
    }
}

fn security_group_name(key: &str, arg: &Value) -> Result<String, Fault> {
    let Some(obj) = arg.as_object() else {
        return Err(bad("Missing parameter dict"));
    };
    match obj.get("name") {
        None => Err(bad("Security group not specified")),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(bad("Security group name cannot be empty")),
        Some(other) => Err(invalid_field(
            &format!("{key}.name"),
            other,
            "It is not of type 'string'",
        )),
    }
}

fn parse_action(key: &str, arg: &Value) -> Result<Action, Fault> {
    Ok(match key {
        "os-start" => Action::Start,
        "os-stop" => Action::Stop,
        "reboot" => {
            let obj = action_object(key, arg)?;
            let t = obj.get("type").ok_or_else(|| required("type"))?;
            match t.as_str().map(str::to_ascii_uppercase).as_deref() {
                Some("SOFT") => Action::Reboot { hard: false },
                Some("HARD") => Action::Reboot { hard: true },
                _ => {
                    return Err(invalid_field(
                        "type",
                        t,
                        "It is not one of ['SOFT', 'HARD']",
                    ));
                }
            }
        }
        "resize" => {
            let obj = action_object(key, arg)?;
            let flavor_ref = match obj.get("flavorRef") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(other) => {
                    return Err(invalid_field(
                        "flavorRef",
                        other,
                        "It is not of type 'string'",
                    ));
                }
                None => return Err(required("flavorRef")),
            };
            let flavor = catalog::flavor(ref_id(&flavor_ref))
                .ok_or_else(|| bad(format!("Flavor {flavor_ref} could not be found.")))?;
            let disk_config = match get_string(obj, "OS-DCF:diskConfig")? {
                None => None,
                Some(d @ ("AUTO" | "MANUAL")) => Some(d.to_string()),
                Some(_) => {
                    return Err(bad("OS-DCF:diskConfig must be either 'MANUAL' or 'AUTO'."));
                }
            };
            Action::Resize {
                flavor,
                disk_config,
            }
        }
        "confirmResize" => Action::ConfirmResize,
        "revertResize" => Action::RevertResize,
        "createImage" => {
            let obj = action_object(key, arg)?;
            let name = req_string(obj, "name")?.to_string();
            validate_name("name", &name)?;
            let metadata = parse_metadata("metadata", obj.get("metadata"))?;
            Action::CreateImage { name, metadata }
        }
        "addSecurityGroup" => Action::AddSecurityGroup(security_group_name(key, arg)?),
        "removeSecurityGroup" => Action::RemoveSecurityGroup(security_group_name(key, arg)?),
        "addFloatingIp" => {
            let obj = action_object(key, arg)?;
            let address = ipv4_field(obj, "address")?.ok_or_else(|| required("address"))?;
            let fixed = ipv4_field(obj, "fixed_address")?;
            Action::AddFloatingIp { address, fixed }
        }
        "removeFloatingIp" => {
            let obj = action_object(key, arg)?;
            let address = ipv4_field(obj, "address")?.ok_or_else(|| required("address"))?;
            Action::RemoveFloatingIp(address)
        }
        other => return Err(bad(format!("There is no such action: {other}"))),
    })
}

/// Nova's state check: the vm_state first, then the task_state.
pub(crate) fn require_state(
    s: &Server,
    ph: &Phase,
    action: &str,
    vms: &[VmState],
    tasks: &[Option<&str>],
) -> Result<(), Fault> {
    if !vms.contains(&ph.vm) {
        return Err(conflict(format!(
            "Cannot '{action}' instance {} while it is in vm_state {}",
            s.id,
            ph.vm.as_str()
        )));
    }
    if !tasks.contains(&ph.task) {
        return Err(conflict(format!(
            "Cannot '{action}' instance {} while it is in task_state {}",
            s.id,
            ph.task.unwrap_or("None")
        )));
    }
    Ok(())
}

/// Actions that do not depend on the power state are refused only while deleting.
fn require_not_deleting(s: &Server, action: &str) -> Result<(), Fault> {
    if s.is_deleting() {
        return Err(conflict(format!(
            "Cannot '{action}' instance {} while it is in task_state deleting",
            s.id
        )));
    }
    Ok(())
}

pub(crate) fn accepted() -> Reply {
    Ok(empty_response(StatusCode::ACCEPTED))
}

/// `POST servers/{id}/action`: exactly one action key.
pub(crate) fn action(ctx: &Ctx<'_>, id: &str) -> Reply {
    let body = parse_body(ctx.body)?;
    let Value::Object(obj) = &body else {
        return Err(bad("Malformed request body"));
    };
    if obj.len() != 1 {
        return Err(bad(format!(
            "Malformed request body: an action body must have exactly one key, found {}",
            obj.len()
        )));
    }
    let Some((key, arg)) = obj.iter().next() else {
        return Err(bad("Malformed request body"));
    };
    let parsed = parse_action(key, arg)?;

    let mut guard = ctx.world();
    let world: &mut World = &mut guard;
    let action_delay = ctx.shared.action_delay;
    let pending = |op: Op| Pending {
        op,
        start: ctx.now,
        end: add(ctx.now, action_delay),
    };
    let tenant = tenant_mut(world, ctx.tenant)?;
    let s = find_mut(tenant, id)?;
    let ph = s.phase(ctx.now);
    use VmState::{Active, Error, Resized, Stopped};

    match parsed {
        Action::Start => {
            require_state(s, &ph, key, &[Stopped], &[None])?;
            s.pending = Some(pending(Op::Start));
            s.updated = ctx.now;
            accepted()
        }
        Action::Stop => {
            require_state(s, &ph, key, &[Active, Error], &[None])?;
            s.pending = Some(pending(Op::Stop));
            s.updated = ctx.now;
            accepted()
        }
        Action::Reboot { hard: false } => {
            require_state(s, &ph, key, &[Active], &[None])?;
            s.pending = Some(pending(Op::Reboot { hard: false }));
            s.updated = ctx.now;
            accepted()
        }
        Action::Reboot { hard: true } => {
            require_state(
                s,
                &ph,
                key,
                &[Active, Stopped, Error],
                &[None, Some("rebooting"), Some("reboot_started_hard")],
            )?;
            s.pending = Some(pending(Op::Reboot { hard: true }));
            s.updated = ctx.now;
            accepted()
        }
        Action::Resize {
            flavor,
            disk_config,
        } => {
            require_state(s, &ph, key, &[Active, Stopped], &[None])?;
            let current = catalog::flavor(&s.flavor_id);
            if flavor.id == s.flavor_id {
                return Err(bad("When resizing, instances must change flavor!"));
            }
            let volume_backed = s.attachments.iter().any(|a| a.root);
            if !volume_backed {
                if flavor.disk == 0 {
                    return Err(bad("Resize to zero disk flavor is not allowed."));
                }
                if current.is_some_and(|c| flavor.disk < c.disk) {
                    return Err(bad("Resizing to a smaller disk flavor is not allowed."));
                }
            }
            let os = image_os(s);
            if os == Some(OsType::Windows) && (flavor.is_local_disk() || flavor.ram < 2048) {
                return Err(bad(format!(
                    "Windows images cannot run on flavor {} (needs at least 2 GB of RAM and \
                     a non-u2 flavor).",
                    flavor.name
                )));
            }
            let verify_from = add(ctx.now, action_delay);
            let end = add(verify_from, action_delay.min(RESIZE_AUTO_CONFIRM));
            if let Some(d) = disk_config {
                s.disk_config = d;
            }
            s.pending = Some(Pending {
                op: Op::Resize {
                    new_flavor: flavor.id.to_string(),
                    verify_from,
                    back_to: ph.vm,
                },
                start: ctx.now,
                end,
            });
            s.updated = ctx.now;
            accepted()
        }
        Action::ConfirmResize => {
            require_state(s, &ph, key, &[Resized], &[None])?;
            if let Some(Pending {
                op:
                    Op::Resize {
                        new_flavor,
                        verify_from,
                        back_to,
                    },
                ..
            }) = s.pending.take()
            {
                s.flavor_id = new_flavor;
                s.vm = back_to;
                s.launched_at = Some(verify_from);
            }
            s.updated = ctx.now;
            Ok(empty_response(StatusCode::NO_CONTENT))
        }
        Action::RevertResize => {
            require_state(s, &ph, key, &[Resized], &[None])?;
            if let Some(Pending {
                op: Op::Resize { back_to, .. },
                ..
            }) = s.pending.take()
            {
                s.pending = Some(pending(Op::RevertResize {
                    shown_flavor: ph.flavor_id.clone(),
                    back_to,
                }));
            }
            s.updated = ctx.now;
            accepted()
        }
        Action::CreateImage { name, metadata } => {
            require_state(s, &ph, key, &[Active, Stopped], &[None])?;
            let flavor_name = catalog::flavor(&ph.flavor_id).map_or("unknown", |f| f.name);
            if !flavor_name.starts_with("u2.") {
                return Err(bad(format!(
                    "Only u2 instances can create an image with this API; instance {id} uses \
                     flavor {flavor_name}."
                )));
            }
            create_image(ctx, world, id, name, metadata)
        }
        Action::AddSecurityGroup(name) => {
            require_not_deleting(s, key)?;
            if s.security_groups.contains(&name) {
                return Err(bad(format!(
                    "Security group {name} is already associated with the instance {id}"
                )));
            }
            let known = tenant.security_groups.contains(&name);
            let s = find_mut(tenant, id)?;
            if !known {
                return Err(not_found(format!("Security group {name} not found.")));
            }
            s.security_groups.push(name);
            s.updated = ctx.now;
            accepted()
        }
        Action::RemoveSecurityGroup(name) => {
            require_not_deleting(s, key)?;
            let has = s.security_groups.contains(&name);
            let known = tenant.security_groups.contains(&name);
            let s = find_mut(tenant, id)?;
            if !known {
                return Err(not_found(format!("Security group {name} not found.")));
            }
            if !has {
                return Err(not_found(format!(
                    "Security group {name} not associated with the instance {id}"
                )));
            }
            s.security_groups.retain(|g| *g != name);
            s.updated = ctx.now;
            accepted()
        }
        Action::AddFloatingIp { address, fixed } => {
            require_not_deleting(s, key)?;
            add_floating_ip(ctx, world, id, address, fixed)
        }
        Action::RemoveFloatingIp(address) => {
            require_not_deleting(s, key)?;
            remove_floating_ip(ctx, world, id, address)
        }
    }
}

/// The OS family of a server's image, from the image properties copied into its
/// metadata at creation.
fn image_os(s: &Server) -> Option<OsType> {
    s.metadata.get("os_type").map(|t| {
        if t.eq_ignore_ascii_case("windows") {
            OsType::Windows
        } else {
            OsType::Linux
        }
    })
}

fn create_image(
    ctx: &Ctx<'_>,
    world: &mut World,
    server_id: &str,
    name: String,
    user_metadata: BTreeMap<String, String>,
) -> Reply {
    let owned = world
        .images
        .iter()
        .filter(|i| i.owner.as_deref() == Some(ctx.tenant))
        .count();
    if owned >= IMAGE_QUOTA {
        return Err(Fault::Forbidden("Quota exceeded for images.".into()));
    }
    let tenant = tenant_mut(world, ctx.tenant)?;
    let s = find_mut(tenant, server_id)?;
    let source_image = s.image_id.clone();
    let ready_at = add(ctx.now, ctx.shared.action_delay);
    s.pending = Some(Pending {
        op: Op::Snapshot,
        start: ctx.now,
        end: ready_at,
    });
    s.updated = ctx.now;
    let (os_type, min_disk, min_ram, size, mut metadata) =
        match world.image(ctx.tenant, &source_image) {
            Some(src) => (
                src.os_type,
                src.min_disk,
                src.min_ram,
                src.size,
                src.metadata.clone(),
            ),
            None => (OsType::Linux, 0, 0, 0, BTreeMap::new()),
        };
    metadata.insert("image_type".into(), "snapshot".into());
    metadata.insert("instance_uuid".into(), server_id.to_string());
    metadata.insert("base_image_ref".into(), source_image);
    metadata.insert("image_name".into(), name.clone());
    metadata.extend(user_metadata);
    let image_id = uuid::Uuid::new_v4().to_string();
    world.images.push(Image {
        id: image_id.clone(),
        name,
        os_type,
        min_disk,
        min_ram,
        size,
        metadata,
        owner: Some(ctx.tenant.to_string()),
        created: ctx.now,
        ready_at,
        server_id: Some(server_id.to_string()),
    });
    let location = format!("{}/{image_id}", ctx.collection_url("images"));
    let mut resp: Response = json_response(StatusCode::ACCEPTED, &json!({"image_id": image_id}));
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// Legacy `addFloatingIp`: the address goes on the NIC of `fixed_address` (or the first
/// NIC). An address already on another server of the tenant moves, as in Nova; one that
/// belongs to another tenant is not found.
fn add_floating_ip(
    ctx: &Ctx<'_>,
    world: &mut World,
    id: &str,
    address: Ipv4Addr,
    fixed: Option<Ipv4Addr>,
) -> Reply {
    let previous = world.floating.get(&address).cloned();
    if let Some((t, _)) = &previous
        && t != ctx.tenant
    {
        return Err(not_found(format!(
            "Floating IP not found for address {address}."
        )));
    }
    let tenant = tenant_mut(world, ctx.tenant)?;
    let s = find(tenant, id)?;
    let nic_idx = match fixed {
        Some(f) => s
            .nics
            .iter()
            .position(|n| n.ip == f)
            .ok_or_else(|| bad("Specified fixed address not assigned to instance"))?,
        None => {
            if s.nics.is_empty() {
                return Err(bad("Instance has no fixed IP address to associate with"));
            }
            0
        }
    };
    if let Some(existing) = s.nics[nic_idx].floating {
        if existing == address {
            return accepted();
        }
        return Err(bad(format!(
            "Fixed IP {} already has floating IP {existing}.",
            s.nics[nic_idx].ip
        )));
    }
    if let Some((_, old_server)) = &previous
        && let Some(old) = tenant.server_mut(old_server)
    {
        for nic in old.nics.iter_mut().filter(|n| n.floating == Some(address)) {
            nic.floating = None;
        }
        old.updated = ctx.now;
    }
    let s = find_mut(tenant, id)?;
    s.nics[nic_idx].floating = Some(address);
    s.updated = ctx.now;
    world
        .floating
        .insert(address, (ctx.tenant.to_string(), id.to_string()));
    accepted()
}

/// Legacy `removeFloatingIp`: 400 when the address is not associated with this server
/// (Nova answers 409 when it is associated with another one of the tenant's servers).
fn remove_floating_ip(ctx: &Ctx<'_>, world: &mut World, id: &str, address: Ipv4Addr) -> Reply {
    match world.floating.get(&address).cloned() {
        Some((t, sid)) if t == ctx.tenant && sid == id => {
            world.floating.remove(&address);
            let tenant = tenant_mut(world, ctx.tenant)?;
            let s = find_mut(tenant, id)?;
            for nic in s.nics.iter_mut().filter(|n| n.floating == Some(address)) {
                nic.floating = None;
            }
            s.updated = ctx.now;
            accepted()
        }
        Some((t, _)) if t == ctx.tenant => Err(conflict(format!(
            "Floating IP {address} is not associated with instance {id}."
        ))),
        _ => Err(bad(format!(
            "Floating IP {address} is not associated with instance {id}."
        ))),
    }
}
