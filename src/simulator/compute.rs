//! The compute API under `/v2/{tenantId}`: token check, routing, and the simple
//! resources (flavors, availability zones, key pairs, images). Servers, their actions and
//! volume attachments are in `servers`.

use std::sync::MutexGuard;

use axum::response::Response;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderMap, Method, StatusCode, header};
use serde_json::{Value, json};

use super::Shared;
use super::catalog::{self, Flavor};
use super::keys;
use super::reply::{
    self, Fault, Query, Reply, bad, conflict, empty_response, fmt_micro, fmt_z, next_link,
    not_found, ok, parse_body, parse_limit, query_get, required,
};
use super::state::{Image, KEYPAIR_QUOTA, Keypair, Tenant, World, lock};
use super::{actions, attachments, servers};

pub(crate) struct Request<'a> {
    pub method: &'a Method,
    pub tenant: &'a str,
    pub rest: &'a [&'a str],
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a Bytes,
}

/// What every compute handler gets: who is calling, when, and the request's inputs.
pub(crate) struct Ctx<'a> {
    pub shared: &'a Shared,
    pub tenant: &'a str,
    pub user_id: String,
    pub now: DateTime<Utc>,
    pub query: Query,
    pub body: &'a Bytes,
}

impl Ctx<'_> {
    /// The world, with every finished operation applied as of this request.
    pub fn world(&self) -> MutexGuard<'_, World> {
        let mut w = lock(&self.shared.world);
        w.settle(self.now);
        w
    }

    /// `<base>/v2/<tenant>/<collection>`.
    pub fn collection_url(&self, collection: &str) -> String {
        format!("{}/v2/{}/{collection}", self.shared.base, self.tenant)
    }

    /// The `self` and `bookmark` links of a resource.
    pub fn links(&self, collection: &str, id: &str) -> Value {
        json!([
            {"href": format!("{}/v2/{}/{collection}/{id}", self.shared.base, self.tenant),
             "rel": "self"},
            self.bookmark(collection, id)
        ])
    }

    /// The `bookmark` link of a resource (no version in the path).
    pub fn bookmark(&self, collection: &str, id: &str) -> Value {
        json!({"href": format!("{}/{}/{collection}/{id}", self.shared.base, self.tenant),
               "rel": "bookmark"})
    }
}

/// The calling tenant's state; it exists whenever a token for it does.
pub(crate) fn tenant_mut<'w>(world: &'w mut World, tenant: &str) -> Result<&'w mut Tenant, Fault> {
    world.tenants.get_mut(tenant).ok_or(Fault::Unauthorized)
}

pub(crate) fn handle(shared: &Shared, req: &Request<'_>) -> Response {
    match handle_inner(shared, req) {
        Ok(resp) => resp,
        Err(Fault::Unauthorized) => {
            // keystonemiddleware tells the client where to authenticate.
            let mut resp = Fault::Unauthorized.into_response();
            let challenge = format!("Keystone uri=\"{}/v2.0\"", shared.base);
            if let Ok(v) = http::HeaderValue::from_str(&challenge) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            resp
        }
        Err(fault) => fault.into_response(),
    }
}

fn is_json_content_type(v: &http::HeaderValue) -> bool {
    v.to_str().ok().is_some_and(|ct| {
        let essence = ct.split(';').next().unwrap_or("").trim();
        essence.eq_ignore_ascii_case("application/json")
    })
}

fn handle_inner(shared: &Shared, req: &Request<'_>) -> Reply {
    let now = shared.now();
    // keystonemiddleware runs before routing: any path under /v2 needs a valid token.
    let token = req
        .headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .ok_or(Fault::Unauthorized)?;
    let user_id = {
        let world = lock(&shared.world);
        match world.tokens.get(token) {
            Some(t) if t.tenant_id == req.tenant && t.expires > now => t.user_id.clone(),
            _ => return Err(Fault::Unauthorized),
        }
    };
    if (*req.method == Method::POST || *req.method == Method::PUT)
        && !req.body.is_empty()
        && req
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|ct| !is_json_content_type(ct))
    {
        return Err(Fault::UnsupportedMediaType);
    }

    let ctx = Ctx {
        shared,
        tenant: req.tenant,
        user_id,
        now,
        query: reply::parse_query(req.query),
        body: req.body,
    };
    let m = req.method;
    let not_allowed = |allow: &'static str| Err(Fault::MethodNotAllowed(allow));
    match req.rest {
        ["flavors"] => match *m {
            Method::GET => list_flavors(&ctx, false),
            _ => not_allowed("GET"),
        },
        ["flavors", "detail"] => match *m {
            Method::GET => list_flavors(&ctx, true),
            _ => not_allowed("GET"),
        },
        ["flavors", id] => match *m {
            Method::GET => show_flavor(&ctx, id),
            _ => not_allowed("GET"),
        },
        ["os-availability-zone"] => match *m {
            Method::GET => availability_zones(),
            _ => not_allowed("GET"),
        },
        ["os-keypairs"] => match *m {
            Method::GET => list_keypairs(&ctx),
            Method::POST => create_keypair(&ctx),
            _ => not_allowed("GET, POST"),
        },
        ["os-keypairs", name] => match *m {
            Method::GET => show_keypair(&ctx, name),
            Method::DELETE => delete_keypair(&ctx, name),
            _ => not_allowed("GET, DELETE"),
        },
        ["images"] => match *m {
            Method::GET => list_images(&ctx, false),
            _ => not_allowed("GET"),
        },
        ["images", "detail"] => match *m {
            Method::GET => list_images(&ctx, true),
            _ => not_allowed("GET"),
        },
        ["images", id] => match *m {
            Method::GET => show_image(&ctx, id),
            _ => not_allowed("GET"),
        },
        ["servers"] => match *m {
            Method::GET => servers::list(&ctx, false),
            Method::POST => servers::create(&ctx),
            _ => not_allowed("GET, POST"),
        },
        ["servers", "detail"] => match *m {
            Method::GET => servers::list(&ctx, true),
            _ => not_allowed("GET"),
        },
        ["servers", id] => match *m {
            Method::GET => servers::show(&ctx, id),
            Method::PUT => servers::update(&ctx, id),
            Method::DELETE => servers::delete(&ctx, id),
            _ => not_allowed("GET, PUT, DELETE"),
        },
        ["servers", id, "action"] => match *m {
            Method::POST => actions::action(&ctx, id),
            _ => not_allowed("POST"),
        },
        ["servers", id, "os-volume_attachments"] => match *m {
            Method::GET => attachments::list_attachments(&ctx, id),
            Method::POST => attachments::attach(&ctx, id, None),
            _ => not_allowed("GET, POST"),
        },
        ["servers", id, "os-volume_attachments", volume] => match *m {
            Method::GET => attachments::show_attachment(&ctx, id, volume),
            Method::POST => attachments::attach(&ctx, id, Some(volume)),
            Method::DELETE => attachments::detach(&ctx, id, volume),
            _ => not_allowed("GET, POST, DELETE"),
        },
        _ => Err(not_found(reply::RESOURCE_NOT_FOUND)),
    }
}

// ---- flavors ------------------------------------------------------------------------

fn flavor_brief(ctx: &Ctx<'_>, f: &Flavor) -> Value {
    json!({"id": f.id, "links": ctx.links("flavors", f.id), "name": f.name})
}

/// Every field of the spec's flavor detail example (`swap` is `""` as there).
fn flavor_detail(ctx: &Ctx<'_>, f: &Flavor) -> Value {
    json!({
        "name": f.name,
        "links": ctx.links("flavors", f.id),
        "ram": f.ram,
        "OS-FLV-DISABLED:disabled": false,
        "vcpus": f.vcpus,
        "extra_specs": {"flavor_type": f.flavor_type},
        "swap": "",
        "os-flavor-access:is_public": true,
        "rxtx_factor": 1.0,
        "OS-FLV-EXT-DATA:ephemeral": 0,
        "disk": f.disk,
        "id": f.id
    })
}

fn int_filter(q: &Query, key: &str) -> Result<Option<u64>, Fault> {
    match query_get(q, key) {
        None => Ok(None),
        Some(raw) => raw
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| bad(format!("Invalid {key} filter [{raw}]"))),
    }
}

/// `GET flavors[/detail]`: minDisk/minRam keep flavors with at least that much (Nova's
/// `>=`), in flavor id order; `marker` is the last id of the previous page.
fn list_flavors(ctx: &Ctx<'_>, detail: bool) -> Reply {
    let q = &ctx.query;
    let min_disk = int_filter(q, "minDisk")?;
    let min_ram = int_filter(q, "minRam")?;
    let limit = parse_limit(q)?;
    let mut items: Vec<&Flavor> = catalog::flavors_sorted()
        .into_iter()
        .filter(|f| min_disk.is_none_or(|d| u64::from(f.disk) >= d))
        .filter(|f| min_ram.is_none_or(|r| u64::from(f.ram) >= r))
        .collect();
    if let Some(marker) = query_get(q, "marker") {
        if catalog::flavor(marker).is_none() {
            return Err(bad(format!("marker [{marker}] not found")));
        }
        items.retain(|f| f.id > marker);
    }
    if let Some(l) = limit {
        items.truncate(l);
    }
    let render = |f: &&Flavor| {
        if detail {
            flavor_detail(ctx, f)
        } else {
            flavor_brief(ctx, f)
        }
    };
    let mut body = json!({"flavors": items.iter().map(render).collect::<Vec<_>>()});
    if let (Some(l), Some(last)) = (limit, items.last())
        && l > 0
        && items.len() == l
    {
        let coll = if detail { "flavors/detail" } else { "flavors" };
        body["flavors_links"] = json!([next_link(&ctx.collection_url(coll), q, last.id)]);
    }
    ok(body)
}

fn show_flavor(ctx: &Ctx<'_>, id: &str) -> Reply {
    match catalog::flavor(id) {
        Some(f) => ok(json!({"flavor": flavor_detail(ctx, f)})),
        None => Err(not_found(format!("Flavor {id} could not be found."))),
    }
}

// ---- availability zones -------------------------------------------------------------

fn availability_zones() -> Reply {
    let zones: Vec<Value> = catalog::AVAILABILITY_ZONES
        .iter()
        .map(|z| json!({"zoneState": {"available": true}, "hosts": null, "zoneName": z}))
        .collect();
    ok(json!({"availabilityZoneInfo": zones}))
}

// ---- key pairs ----------------------------------------------------------------------

fn list_keypairs(ctx: &Ctx<'_>) -> Reply {
    let mut world = ctx.world();
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    let mut pairs: Vec<&Keypair> = tenant.keypairs.iter().collect();
    pairs.sort_by(|a, b| a.name.cmp(&b.name));
    let list: Vec<Value> = pairs
        .iter()
        .map(|k| {
            json!({"keypair": {
                "public_key": k.public_key,
                "name": k.name,
                "fingerprint": k.fingerprint
            }})
        })
        .collect();
    ok(json!({"keypairs": list}))
}

fn keypair_not_found(ctx: &Ctx<'_>, name: &str) -> Fault {
    not_found(format!("Keypair {name} not found for user {}", ctx.user_id))
}

fn show_keypair(ctx: &Ctx<'_>, name: &str) -> Reply {
    let mut world = ctx.world();
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    let Some(k) = tenant.keypairs.iter().find(|k| k.name == name) else {
        return Err(keypair_not_found(ctx, name));
    };
    ok(json!({"keypair": {
        "public_key": k.public_key,
        "user_id": ctx.user_id,
        "name": k.name,
        "deleted": false,
        "created_at": fmt_micro(k.created_at),
        "updated_at": null,
        "fingerprint": k.fingerprint,
        "deleted_at": null,
        "id": k.id
    }}))
}

/// Nova's key pair name rule: 1-255 characters from `[A-Za-z0-9 _-]`.
fn validate_keypair_name(name: &str) -> Result<(), Fault> {
    let len = name.chars().count();
    if !(1..=255).contains(&len) {
        return Err(bad(
            "Keypair data is invalid: Keypair name must be string and between 1 and 255 \
             characters long",
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '_' || c == '-')
    {
        return Err(bad(
            "Keypair data is invalid: Keypair name contains unsafe characters",
        ));
    }
    Ok(())
}

/// `POST os-keypairs`: imports `public_key`, or generates a pair and returns the private
/// key once (`private_key`), as Nova does. 200 as in microversion 2.1.
fn create_keypair(ctx: &Ctx<'_>) -> Reply {
    let body = parse_body(ctx.body)?;
    let kp = match body.get("keypair") {
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(reply::invalid_field(
                "keypair",
                other,
                "It is not of type 'object'",
            ));
        }
        None => return Err(required("keypair")),
    };
    if let Some(extra) = kp
        .keys()
        .find(|k| !matches!(k.as_str(), "name" | "public_key" | "type" | "user_id"))
    {
        return Err(bad(format!(
            "Invalid input for field/attribute keypair. Additional properties are not \
             allowed ('{extra}' was unexpected)"
        )));
    }
    let name = match kp.get("name") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(reply::invalid_field(
                "name",
                other,
                "It is not of type 'string'",
            ));
        }
        None => return Err(required("name")),
    };
    validate_keypair_name(&name)?;
    let imported = match kp.get("public_key") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(reply::invalid_field(
                "public_key",
                other,
                "It is not of type 'string'",
            ));
        }
    };
    let (public_key, private_key, fingerprint) = match imported {
        Some(pk) => {
            let fp = keys::fingerprint(&pk).map_err(bad)?;
            (pk, None, fp)
        }
        None => {
            let (public, private, fp) = keys::generate();
            (public, Some(private), fp)
        }
    };

    let mut world = ctx.world();
    let id = world.next_keypair_id;
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    if tenant.keypairs.iter().any(|k| k.name == name) {
        return Err(conflict(format!("Key pair '{name}' already exists.")));
    }
    if tenant.keypairs.len() >= KEYPAIR_QUOTA {
        return Err(Fault::Forbidden(
            "Quota exceeded, too many key pairs.".into(),
        ));
    }
    tenant.keypairs.push(Keypair {
        id,
        name: name.clone(),
        public_key: public_key.clone(),
        fingerprint: fingerprint.clone(),
        created_at: ctx.now,
    });
    world.next_keypair_id += 1;
    drop(world);

    let mut out = json!({
        "fingerprint": fingerprint,
        "name": name,
        "public_key": public_key,
        "user_id": ctx.user_id
    });
    if let Some(private) = private_key {
        out["private_key"] = Value::String(private);
    }
    ok(json!({"keypair": out}))
}

fn delete_keypair(ctx: &Ctx<'_>, name: &str) -> Reply {
    let mut world = ctx.world();
    let tenant = tenant_mut(&mut world, ctx.tenant)?;
    let before = tenant.keypairs.len();
    tenant.keypairs.retain(|k| k.name != name);
    if tenant.keypairs.len() == before {
        return Err(keypair_not_found(ctx, name));
    }
    Ok(empty_response(StatusCode::ACCEPTED))
}

// ---- images (Nova's image proxy; not in the spec, but createImage's Location points
// here) -------------------------------------------------------------------------------

pub(crate) fn image_detail(ctx: &Ctx<'_>, img: &Image) -> Value {
    let ready = ctx.now >= img.ready_at;
    let mut v = json!({
        "id": img.id,
        "name": img.name,
        "status": if ready { "ACTIVE" } else { "SAVING" },
        "progress": if ready { 100 } else { 50 },
        "minDisk": img.min_disk,
        "minRam": img.min_ram,
        "metadata": img.metadata,
        "created": fmt_z(img.created),
        "updated": fmt_z(if ready { img.ready_at } else { img.created }),
        "OS-EXT-IMG-SIZE:size": img.size,
        "links": ctx.links("images", &img.id)
    });
    if let Some(sid) = &img.server_id {
        v["server"] = json!({"id": sid, "links": ctx.links("servers", sid)});
    }
    v
}

fn list_images(ctx: &Ctx<'_>, detail: bool) -> Reply {
    let world = ctx.world();
    let mut imgs: Vec<&Image> = world
        .images
        .iter()
        .filter(|i| i.visible_to(ctx.tenant))
        .collect();
    imgs.sort_by(|a, b| b.created.cmp(&a.created).then(a.name.cmp(&b.name)));
    let list: Vec<Value> = imgs
        .iter()
        .map(|i| {
            if detail {
                image_detail(ctx, i)
            } else {
                json!({"id": i.id, "links": ctx.links("images", &i.id), "name": i.name})
            }
        })
        .collect();
    ok(json!({"images": list}))
}

fn show_image(ctx: &Ctx<'_>, id: &str) -> Reply {
    let world = ctx.world();
    match world.image(ctx.tenant, id) {
        Some(img) => ok(json!({"image": image_detail(ctx, img)})),
        None => Err(not_found("Image not found.")),
    }
}
