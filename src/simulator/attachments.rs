//! Volume attachments: `servers/{id}/os-volume_attachments[/{volumeId}]`.

use serde_json::{Value, json};

use super::actions::{accepted, require_state};
use super::compute::{Ctx, tenant_mut};
use super::reply::{
    self, Fault, Reply, bad, invalid_field, not_found, ok, parse_body, parse_limit, parse_offset,
    required,
};
use super::servers::{find, find_mut, req_string};
use super::state::{Attachment, VmState};

// ---- volume attachments -------------------------------------------------------------

fn attachment_json(server_id: &str, a: &Attachment) -> Value {
    json!({
        "device": a.device,
        "id": a.volume_id,
        "serverId": server_id,
        "volumeId": a.volume_id
    })
}

/// The first free `/dev/vdX` after the root `/dev/vda`.
pub(crate) fn next_device(attachments: &[Attachment]) -> Option<String> {
    (b'b'..=b'z')
        .map(|c| format!("/dev/vd{}", c as char))
        .find(|d| !attachments.iter().any(|a| &a.device == d))
}

pub(crate) fn list_attachments(ctx: &Ctx<'_>, id: &str) -> Reply {
    let limit = parse_limit(&ctx.query)?;
    let offset = parse_offset(&ctx.query)?;
    let mut world = ctx.world();
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    let s = find(tenant, id)?;
    let mut atts: Vec<&Attachment> = s.attachments.iter().collect();
    atts.sort_by(|a, b| a.device.cmp(&b.device));
    let list: Vec<Value> = atts
        .into_iter()
        .skip(offset)
        .take(limit.unwrap_or(reply::MAX_LIMIT))
        .map(|a| attachment_json(id, a))
        .collect();
    ok(json!({"volumeAttachments": list}))
}

fn not_attached(id: &str, volume: &str) -> Fault {
    not_found(format!("Volume {volume} is not attached to instance {id}."))
}

pub(crate) fn show_attachment(ctx: &Ctx<'_>, id: &str, volume: &str) -> Reply {
    let mut world = ctx.world();
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    let s = find(tenant, id)?;
    match s.attachments.iter().find(|a| a.volume_id == volume) {
        Some(a) => ok(json!({"volumeAttachment": attachment_json(id, a)})),
        None => Err(not_attached(id, volume)),
    }
}

/// `POST servers/{id}/os-volume_attachments[/{volumeId}]`. A volume that is already in
/// use answers 400 ("Invalid volume"), as Nova does.
pub(crate) fn attach(ctx: &Ctx<'_>, id: &str, path_volume: Option<&str>) -> Reply {
    let body = parse_body(ctx.body)?;
    let att = match body.get("volumeAttachment") {
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(invalid_field(
                "volumeAttachment",
                other,
                "It is not of type 'object'",
            ));
        }
        None => return Err(required("volumeAttachment")),
    };
    if let Some(extra) = att.keys().find(|k| {
        !matches!(
            k.as_str(),
            "volumeId" | "device" | "tag" | "delete_on_termination"
        )
    }) {
        return Err(bad(format!(
            "Invalid input for field/attribute volumeAttachment. Additional properties are not \
             allowed ('{extra}' was unexpected)"
        )));
    }
    let volume = req_string(att, "volumeId")?.to_string();
    if volume.is_empty() {
        return Err(invalid_field("volumeId", &json!(volume), "'' is too short"));
    }
    match att.get("device") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(other) => return Err(invalid_field("device", other, "It is not of type 'string'")),
    }
    if let Some(p) = path_volume
        && p != volume
    {
        return Err(bad(format!(
            "The volume id in the path ({p}) does not match volumeAttachment.volumeId \
             ({volume})."
        )));
    }

    let mut world = ctx.world();
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    let s = find(tenant, id)?;
    let ph = s.phase(ctx.now);
    require_state(
        s,
        &ph,
        "attach_volume",
        &[VmState::Active, VmState::Stopped],
        &[None],
    )?;
    let device = next_device(&s.attachments)
        .ok_or_else(|| bad("No free disk device names for prefix 'vd'"))?;
    let v = tenant
        .volumes
        .iter_mut()
        .find(|v| v.id == volume)
        .ok_or_else(|| not_found(format!("Volume {volume} could not be found.")))?;
    if v.attached_to.is_some() {
        return Err(bad(format!(
            "Invalid volume: volume '{volume}' status must be 'available'. Currently in 'in-use'"
        )));
    }
    v.attached_to = Some(id.to_string());
    let s = find_mut(tenant, id)?;
    let a = Attachment {
        volume_id: volume,
        device,
        root: false,
        delete_on_termination: false,
    };
    let out = attachment_json(id, &a);
    s.attachments.push(a);
    ok(json!({ "volumeAttachment": out }))
}

/// `DELETE servers/{id}/os-volume_attachments/{volumeId}`: 202; the root volume cannot
/// be detached (400).
pub(crate) fn detach(ctx: &Ctx<'_>, id: &str, volume: &str) -> Reply {
    let mut world = ctx.world();
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    let s = find(tenant, id)?;
    let ph = s.phase(ctx.now);
    let Some(a) = s.attachments.iter().find(|a| a.volume_id == volume) else {
        return Err(not_attached(id, volume));
    };
    if a.root {
        return Err(bad("Cannot detach a root device volume"));
    }
    require_state(
        s,
        &ph,
        "detach_volume",
        &[VmState::Active, VmState::Stopped],
        &[None],
    )?;
    let s = find_mut(tenant, id)?;
    s.attachments.retain(|a| a.volume_id != volume);
    if let Some(v) = tenant.volumes.iter_mut().find(|v| v.id == volume) {
        v.attached_to = None;
    }
    accepted()
}
