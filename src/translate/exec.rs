//! The v2 call(s) behind each v1.0 endpoint.
//!
//! [`plan`] validates the whole request first (nothing is sent for a request
//! that would be refused); [`execute`] then makes the calls through a
//! [`V2Caller`], which the gateway implements with the project's token.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use http::Method;
use serde_json::{Map, Value, json};

use super::request::{self, ServerAction};
use super::response::{self, FlavorInfo, ServerVolumes};
use crate::action::Action;
use crate::error::GatewayError;
use crate::router::V1Route;

/// An upstream v2 answer, body parsed.
#[derive(Debug, Clone)]
pub struct V2Answer {
    pub status: u16,
    pub body: Value,
    pub location: Option<String>,
}

/// An upstream v2 answer as received, for parsing into a shape of one's own
/// (a server list read for its brief fields need not become a whole tree).
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    pub bytes: bytes::Bytes,
    pub location: Option<String>,
}

impl RawAnswer {
    /// The body as a JSON value (`null` when empty). An error answer (4xx,
    /// 5xx) whose body is not JSON (a load balancer's HTML 503, a proxy's text 404)
    /// keeps its status, with a `null` body: the status is what the caller
    /// must learn (`10503`, `10404`), not that the body was unreadable.
    pub fn into_json(self) -> Result<V2Answer, GatewayError> {
        let body = if self.bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&self.bytes) {
                Ok(body) => body,
                Err(_) if self.status >= 400 => Value::Null,
                Err(_) => return Err(not_json(self.status)),
            }
        };
        Ok(V2Answer {
            status: self.status,
            body,
            location: self.location,
        })
    }

    /// A 2xx answer parsed as `T`, or the upstream's error with its Nova message.
    fn parse_ok<T: serde::de::DeserializeOwned>(self) -> Result<T, GatewayError> {
        if !(200..300).contains(&self.status) {
            return Err(expect_ok(self.into_json()?)
                .err()
                .unwrap_or_else(|| not_json(502)));
        }
        serde_json::from_slice(&self.bytes).map_err(|_| not_json(self.status))
    }
}

fn not_json(status: u16) -> GatewayError {
    GatewayError::UpstreamAnswer {
        status: 502,
        message: format!(
            "the upstream answered {status} with a body that is not the expected JSON"
        ),
    }
}

/// Calls the project's v2 API; `path` is relative to `/v2/{tenant}/`.
pub trait V2Caller: Sync {
    fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> impl Future<Output = Result<RawAnswer, GatewayError>> + Send;

    fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> impl Future<Output = Result<V2Answer, GatewayError>> + Send {
        async move { self.call_raw(method, path, body).await?.into_json() }
    }

    /// Flavor id -> details, cached per project.
    fn flavors(
        &self,
    ) -> impl Future<Output = Result<Arc<HashMap<String, FlavorInfo>>, GatewayError>> + Send;
}

/// A validated v1.0 request, ready to execute.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub action: Action,
    step: Step,
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Zones,
    Instances {
        id: Option<String>,
        detail: bool,
    },
    Create {
        v2: Value,
        name: String,
    },
    Delete {
        id: String,
    },
    Attach {
        instance: String,
        v2: Value,
    },
    Detach {
        instance: String,
        volume: String,
    },
    ServerAction {
        instance: String,
        action: ServerAction,
    },
    Flavors,
    Keypairs {
        name: Option<String>,
    },
    CreateKeypair {
        v2: Value,
    },
    DeleteKeypair {
        name: String,
    },
}

impl Plan {
    /// The v2 body this plan sends, for policy constraints.
    pub fn v2_body(&self) -> Option<&Value> {
        match &self.step {
            Step::Create { v2, .. } | Step::Attach { v2, .. } | Step::CreateKeypair { v2 } => {
                Some(v2)
            }
            Step::ServerAction { action, .. } => Some(&action.v2_body),
            _ => None,
        }
    }
}

/// Validates `route` with its `body` into a plan, or refuses it. The Action
/// is the route's ([`V1Route::action`]), or for the action endpoint the
/// body's.
pub fn plan(route: &V1Route, body: &[u8]) -> Result<Plan, GatewayError> {
    let id = |s: &str, what: &str| checked_id(s, what);
    let step = match route {
        V1Route::Zones => Step::Zones,
        V1Route::Instances { id: i } | V1Route::InstancesDetail { id: i } => Step::Instances {
            id: i.as_deref().map(|s| id(s, "id")).transpose()?,
            detail: matches!(route, V1Route::InstancesDetail { .. }),
        },
        V1Route::CreateInstance => {
            let (v2, name) = request::create_instance(&request::parse_object(body)?)?;
            Step::Create { v2, name }
        }
        V1Route::DeleteInstance { id: i } => Step::Delete { id: id(i, "id")? },
        V1Route::Attach { instance } => {
            let (v2, _) = request::attach(&request::parse_object(body)?)?;
            Step::Attach {
                instance: id(instance, "instanceId")?,
                v2,
            }
        }
        V1Route::Detach { instance, volume } => Step::Detach {
            instance: id(instance, "instanceId")?,
            volume: id(volume, "volumeId")?,
        },
        V1Route::InstanceAction { instance } => Step::ServerAction {
            instance: id(instance, "instanceId")?,
            action: request::server_action(&request::parse_object(body)?)?,
        },
        V1Route::Flavors => Step::Flavors,
        V1Route::Keypairs { name } => Step::Keypairs {
            name: name.as_deref().map(keypair_name).transpose()?,
        },
        V1Route::CreateKeypair => Step::CreateKeypair {
            v2: request::create_keypair(&request::parse_object(body)?)?,
        },
        V1Route::DeleteKeypair { name } => Step::DeleteKeypair {
            name: keypair_name(name)?,
        },
    };
    let action = match (&step, route.action()) {
        (Step::ServerAction { action, .. }, _) => action.action,
        (_, Some(action)) => action,
        (_, None) => {
            return Err(GatewayError::Internal(
                "a v1.0 route without an Action".into(),
            ));
        }
    };
    if !route_takes_body(route) && !body.iter().all(u8::is_ascii_whitespace) {
        return Err(GatewayError::Invalid(
            "this API takes no request body".into(),
        ));
    }
    Ok(Plan { action, step })
}

fn route_takes_body(route: &V1Route) -> bool {
    matches!(
        route,
        V1Route::CreateInstance
            | V1Route::Attach { .. }
            | V1Route::InstanceAction { .. }
            | V1Route::CreateKeypair
    )
}

/// A keypair name as Nova allows them (letters, digits, spaces, `_`, `-`),
/// so that nothing but a keypair name can end up in the upstream path.
fn keypair_name(name: &str) -> Result<String, GatewayError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '_' | '-'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(GatewayError::Invalid(
            "`name` is not a valid keypair name (letters, digits, spaces, `_`, `-`)".into(),
        ))
    }
}

/// An id that goes into an upstream path segment.
fn checked_id(s: &str, what: &str) -> Result<String, GatewayError> {
    if crate::router::is_plain(s) {
        Ok(s.to_string())
    } else {
        Err(GatewayError::Invalid(format!("`{what}` is not a valid id")))
    }
}

/// Percent-encodes a path segment (keypair names may hold spaces).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs the plan; returns the payload fields next to `header`.
pub async fn execute(plan: &Plan, v2: &impl V2Caller) -> Result<Map<String, Value>, GatewayError> {
    let mut out = Map::new();
    match &plan.step {
        Step::Zones => {
            let a = expect_ok(v2.call(Method::GET, "os-availability-zone", None).await?)?;
            out.insert("zones".into(), Value::Array(response::zones(&a.body)));
        }
        Step::Instances { id, detail } => {
            let instances = match (id, detail) {
                (Some(id), _) => {
                    let mut a =
                        expect_ok(v2.call(Method::GET, &format!("servers/{id}"), None).await?)?;
                    let server = a
                        .body
                        .get_mut("server")
                        .map(Value::take)
                        .unwrap_or_default();
                    if *detail {
                        let found = detail_instances(v2, vec![server]).await?;
                        if found.is_empty() {
                            return Err(GatewayError::UpstreamAnswer {
                                status: 404,
                                message: format!("Instance {id} could not be found."),
                            });
                        }
                        found
                    } else {
                        vec![response::instance_brief(&server)]
                    }
                }
                (None, true) => detail_instances(v2, list_all_servers::<Value>(v2).await?).await?,
                // Only id, name and status are read: no tree of every field.
                (None, false) => list_all_servers::<response::BriefServer>(v2)
                    .await?
                    .iter()
                    .map(response::BriefServer::to_v1)
                    .collect(),
            };
            out.insert("instances".into(), Value::Array(instances));
        }
        Step::Create { v2: body, name } => {
            let a = expect_ok(v2.call(Method::POST, "servers", Some(body.clone())).await?)?;
            let id = &a.body["server"]["id"];
            let name = match id.as_str() {
                Some(id) if body["server"]["min_count"].as_u64() > Some(1) => {
                    tokio::time::timeout(READ_BACK_TIMEOUT, name_given_upstream(v2, id))
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or_else(|| name.clone())
                }
                _ => name.clone(),
            };
            out.insert(
                "instance".into(),
                json!({"id": id, "name": name, "status": "BUILD"}),
            );
        }
        Step::Delete { id } => {
            expect_ok(
                v2.call(Method::DELETE, &format!("servers/{id}"), None)
                    .await?,
            )?;
        }
        Step::Attach { instance, v2: body } => {
            let path = format!("servers/{instance}/os-volume_attachments");
            let a = expect_ok(v2.call(Method::POST, &path, Some(body.clone())).await?)?;
            out.insert("attachment".into(), response::attachment(&a.body));
        }
        Step::Detach { instance, volume } => {
            let path = format!("servers/{instance}/os-volume_attachments/{volume}");
            expect_ok(v2.call(Method::DELETE, &path, None).await?)?;
        }
        Step::ServerAction { instance, action } => {
            let path = format!("servers/{instance}/action");
            let a = expect_ok(
                v2.call(Method::POST, &path, Some(action.v2_body.clone()))
                    .await?,
            )?;
            if let Some(name) = &action.image_name {
                out.insert(
                    "createdImage".into(),
                    json!({"id": created_image_id(&a), "name": name}),
                );
            }
        }
        Step::Flavors => {
            let a = expect_ok(v2.call(Method::GET, "flavors/detail", None).await?)?;
            let flavors: Vec<Value> = a.body["flavors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(response::flavor)
                .collect();
            out.insert("flavors".into(), Value::Array(flavors));
        }
        Step::Keypairs { name: None } => {
            let a = expect_ok(v2.call(Method::GET, "os-keypairs", None).await?)?;
            let list: Vec<Value> = a.body["keypairs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|k| response::keypair(&k["keypair"], false))
                .collect();
            out.insert("keypairs".into(), Value::Array(list));
        }
        Step::Keypairs { name: Some(name) } => {
            let path = format!("os-keypairs/{}", segment(name));
            let a = expect_ok(v2.call(Method::GET, &path, None).await?)?;
            out.insert(
                "keypairs".into(),
                json!([response::keypair(&a.body["keypair"], true)]),
            );
        }
        Step::CreateKeypair { v2: body } => {
            let a = expect_ok(
                v2.call(Method::POST, "os-keypairs", Some(body.clone()))
                    .await?,
            )?;
            out.insert(
                "keypair".into(),
                response::created_keypair(&a.body["keypair"]),
            );
        }
        Step::DeleteKeypair { name } => {
            let path = format!("os-keypairs/{}", segment(name));
            expect_ok(v2.call(Method::DELETE, &path, None).await?)?;
        }
    }
    Ok(out)
}

/// One page of `GET servers/detail`, its servers read as `S`.
#[derive(serde::Deserialize)]
struct ServersPage<S> {
    #[serde(default = "Vec::new")]
    servers: Vec<S>,
    #[serde(default)]
    servers_links: Vec<PageLink>,
}

#[derive(serde::Deserialize)]
struct PageLink {
    #[serde(default)]
    rel: Option<String>,
    #[serde(default)]
    href: Option<String>,
}

/// Every server, following `servers_links` (bounded, so a misbehaving
/// upstream cannot keep us paging forever).
async fn list_all_servers<S: serde::de::DeserializeOwned>(
    v2: &impl V2Caller,
) -> Result<Vec<S>, GatewayError> {
    let mut servers = Vec::new();
    let mut path = "servers/detail".to_string();
    for _ in 0..100 {
        let page: ServersPage<S> = v2.call_raw(Method::GET, &path, None).await?.parse_ok()?;
        let empty = page.servers.is_empty();
        servers.extend(page.servers);
        let next = page
            .servers_links
            .into_iter()
            .find(|l| l.rel.as_deref() == Some("next"))
            .and_then(|l| l.href)
            .and_then(|href| href.split_once('?').map(|(_, q)| q.to_string()));
        match next {
            Some(q) if !empty => path = format!("servers/detail?{q}"),
            _ => return Ok(servers),
        }
    }
    Err(GatewayError::UpstreamAnswer {
        status: 502,
        message: "the upstream server list did not end after 100 pages".into(),
    })
}

/// v1.0 details: flavors from the cache, root/other volumes from each
/// server's attachments (fetched concurrently, a few at a time). A server
/// deleted between the list and its attachments' lookup is left out, as a
/// list made a moment later would.
async fn detail_instances(
    v2: &impl V2Caller,
    servers: Vec<Value>,
) -> Result<Vec<Value>, GatewayError> {
    let flavors = with_unlisted_flavors(v2, v2.flavors().await?, &servers).await;
    let with_volumes: Vec<Option<String>> = servers.iter().map(volume_backed_id).collect();
    let volumes: Vec<Result<Option<ServerVolumes>, GatewayError>> =
        futures_util::stream::iter(with_volumes)
            .map(|id| server_volumes(v2, id))
            .buffered(8)
            .collect()
            .await;
    let mut details = Vec::with_capacity(servers.len());
    for (server, volumes) in servers.iter().zip(volumes) {
        if let Some(volumes) = volumes? {
            details.push(response::instance_detail(server, &flavors, &volumes));
        }
    }
    Ok(details)
}

/// The cached flavor list, plus each flavor a server uses that it lacks (a
/// flavor added since the list was cached, or one not listed), read by id
/// once per request. One that cannot be read stays out: its fields are
/// `null` rather than the whole answer an error.
async fn with_unlisted_flavors(
    v2: &impl V2Caller,
    listed: Arc<HashMap<String, FlavorInfo>>,
    servers: &[Value],
) -> Arc<HashMap<String, FlavorInfo>> {
    let mut unlisted: Vec<String> = servers
        .iter()
        .filter_map(|s| s["flavor"]["id"].as_str())
        .filter(|id| !listed.contains_key(*id))
        .map(str::to_string)
        .collect();
    if unlisted.is_empty() {
        return listed;
    }
    unlisted.sort_unstable();
    unlisted.dedup();
    let read: Vec<Option<(String, FlavorInfo)>> = futures_util::stream::iter(unlisted)
        .map(|id| read_flavor(v2, id))
        .buffered(4)
        .collect()
        .await;
    let mut all = (*listed).clone();
    all.extend(read.into_iter().flatten());
    Arc::new(all)
}

async fn read_flavor(v2: &impl V2Caller, id: String) -> Option<(String, FlavorInfo)> {
    let a = v2
        .call(Method::GET, &format!("flavors/{}", segment(&id)), None)
        .await
        .ok()?;
    if a.status != 200 {
        return None;
    }
    response::flavor_info(&a.body["flavor"])
}

/// The id of a server that has volumes attached (only those need a lookup).
fn volume_backed_id(server: &Value) -> Option<String> {
    let attached = server["os-extended-volumes:volumes_attached"]
        .as_array()
        .is_some_and(|a| !a.is_empty());
    server["id"]
        .as_str()
        .filter(|_| attached)
        .map(str::to_string)
}

/// A server's volumes; `None` if the server is gone (404).
async fn server_volumes(
    v2: &impl V2Caller,
    id: Option<String>,
) -> Result<Option<ServerVolumes>, GatewayError> {
    let Some(id) = id else {
        return Ok(Some(ServerVolumes::default()));
    };
    let a = v2
        .call(
            Method::GET,
            &format!("servers/{id}/os-volume_attachments"),
            None,
        )
        .await?;
    // Nova's own "not found" only: a 404 from anything else in the way
    // (a proxy, a path the upstream does not serve) still fails the list.
    if a.status == 404 && a.body.get("itemNotFound").is_some() {
        return Ok(None);
    }
    Ok(Some(ServerVolumes::from_attachments(&expect_ok(a)?.body)))
}

/// The created image's id: the body's `image_id` (microversion 2.45+), else
/// the last segment of `Location`.
fn created_image_id(a: &V2Answer) -> Value {
    if let Some(id) = a.body["image_id"].as_str() {
        return json!(id);
    }
    a.location
        .as_deref()
        .and_then(|l| l.rsplit('/').next())
        .map(Value::from)
        .unwrap_or(Value::Null)
}

/// How long a create of several instances waits to read back the name of
/// the one it answers: short, since the instances exist by then and the
/// request's own time must not run out on a nicety.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(2);

/// The name the upstream gave an instance created with others (Nova
/// suffixes the requested one: `{name}-1`, `{name}-2`, ...). `None` if it
/// cannot be read (nor within [`READ_BACK_TIMEOUT`]): the instances exist
/// by then, so the create still answers success, with the requested name,
/// rather than an error a client would retry into more instances.
async fn name_given_upstream(v2: &impl V2Caller, id: &str) -> Option<String> {
    let a = v2
        .call(Method::GET, &format!("servers/{id}"), None)
        .await
        .ok()?;
    if !(200..300).contains(&a.status) {
        return None;
    }
    a.body["server"]["name"].as_str().map(str::to_string)
}

/// A 2xx answer, or the upstream's error with its Nova message.
fn expect_ok(a: V2Answer) -> Result<V2Answer, GatewayError> {
    if (200..300).contains(&a.status) {
        return Ok(a);
    }
    let message = a
        .body
        .as_object()
        .and_then(|o| o.values().next())
        .and_then(|fault| fault["message"].as_str())
        .unwrap_or("no Nova error message")
        .to_string();
    Err(GatewayError::UpstreamAnswer {
        status: a.status,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A canned status for a call that never answers.
    const HANGS: u16 = 0;
    /// A canned status for a call never sent: no upstream connection free.
    const BUSY: u16 = 1;

    /// An upstream of canned answers by path (404 for any other path), and
    /// the paths it was asked for.
    struct Canned(
        HashMap<&'static str, (u16, Value)>,
        std::sync::Mutex<Vec<String>>,
    );

    fn canned(answers: HashMap<&'static str, (u16, Value)>) -> Canned {
        Canned(answers, Default::default())
    }

    impl V2Caller for Canned {
        async fn call_raw(
            &self,
            _method: Method,
            path: &str,
            _body: Option<Value>,
        ) -> Result<RawAnswer, GatewayError> {
            self.1.lock().unwrap().push(path.to_string());
            let (status, body) = self.0.get(path).cloned().unwrap_or((
                404,
                json!({"itemNotFound": {"code": 404, "message": "not found"}}),
            ));
            if status == HANGS {
                std::future::pending::<()>().await;
            }
            if status == BUSY {
                return Err(GatewayError::Upstream(
                    crate::upstream::UpstreamError::Busy {
                        max_connections: 1,
                        waited: Duration::from_secs(1),
                    },
                ));
            }
            Ok(RawAnswer {
                status,
                bytes: serde_json::to_vec(&body).unwrap().into(),
                location: None,
            })
        }

        async fn flavors(&self) -> Result<Arc<HashMap<String, FlavorInfo>>, GatewayError> {
            Ok(Arc::default())
        }
    }

    fn server_with_a_volume(id: &str) -> Value {
        json!({"id": id, "name": id, "status": "ACTIVE", "flavor": {"id": "f"},
               "os-extended-volumes:volumes_attached": [{"id": format!("{id}-root")}]})
    }

    #[tokio::test]
    async fn a_create_of_several_answers_the_name_read_back_or_else_the_requested_one() {
        let create = plan(
            &V1Route::CreateInstance,
            br#"{"instance": {"name": "multi", "image": "i", "flavor": "f", "networks": [{"id": "n"}],
                              "keyName": "k", "count": 2, "volumes": [{"size": 20}]}}"#,
        )
        .unwrap();
        let upstream = |read_back: (u16, Value)| {
            canned(HashMap::from([
                ("servers", (202, json!({"server": {"id": "s1"}}))),
                ("servers/s1", read_back),
            ]))
        };
        let answered = |out: Map<String, Value>| out["instance"].clone();
        let read = upstream((200, json!({"server": {"id": "s1", "name": "multi-1"}})));
        assert_eq!(
            answered(execute(&create, &read).await.unwrap()),
            json!({"id": "s1", "name": "multi-1", "status": "BUILD"})
        );
        // The instances exist: a read back that fails, hangs or finds no
        // connection free still answers success, with the requested name.
        for read_back in [
            (500, json!({"computeFault": {"code": 500}})),
            (HANGS, json!({})),
            (BUSY, json!({})),
        ] {
            let out = execute(&create, &upstream(read_back)).await.unwrap();
            assert_eq!(
                answered(out),
                json!({"id": "s1", "name": "multi", "status": "BUILD"})
            );
        }
    }

    #[tokio::test]
    async fn a_flavor_missing_from_the_cached_list_is_read_by_id() {
        let on = |id: &str, flavor: &str| json!({"id": id, "name": id, "status": "ACTIVE", "flavor": {"id": flavor}});
        let upstream = canned(HashMap::from([
            (
                "servers/detail",
                (
                    200,
                    json!({"servers": [on("s1", "new"), on("s2", "new"), on("s3", "gone")]}),
                ),
            ),
            (
                "flavors/new",
                (
                    200,
                    json!({"flavor": {"id": "new", "name": "m9.c2m8", "vcpus": 2, "ram": 8192, "disk": 0}}),
                ),
            ),
        ]));
        let list = plan(&V1Route::InstancesDetail { id: None }, b"").unwrap();
        let out = execute(&list, &upstream).await.unwrap();
        let flavors: Vec<&Value> = out["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| &i["flavor"])
            .collect();
        let new = json!({"id": "new", "name": "m9.c2m8", "cpu": 2, "ram": 8192});
        // A flavor that cannot be read either: its fields are null, the
        // list is still answered.
        let gone = json!({"id": "gone", "name": null, "cpu": null, "ram": null});
        assert_eq!(flavors, [&new, &new, &gone]);
        let asked = upstream.1.lock().unwrap().clone();
        assert_eq!(asked, ["servers/detail", "flavors/gone", "flavors/new"]);
    }

    #[tokio::test]
    async fn a_server_deleted_while_its_details_are_read_is_left_out() {
        let attachments = |id: &str| {
            json!({"volumeAttachments": [{"id": format!("{id}-root"), "volumeId": format!("{id}-root"),
                                          "serverId": id, "device": "/dev/vda"}]})
        };
        let upstream = canned(HashMap::from([
            (
                "servers/detail",
                (
                    200,
                    json!({"servers": [server_with_a_volume("s1"), server_with_a_volume("s2")]}),
                ),
            ),
            ("servers/s1/os-volume_attachments", (200, attachments("s1"))),
            (
                "servers/s2",
                (200, json!({"server": server_with_a_volume("s2")})),
            ),
            // s2 is deleted after the list: its attachments are not found.
        ]));
        let list = plan(&V1Route::InstancesDetail { id: None }, b"").unwrap();
        let out = execute(&list, &upstream).await.unwrap();
        let ids: Vec<&Value> = out["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| &i["id"])
            .collect();
        assert_eq!(ids, [&json!("s1")]);

        let one = plan(
            &V1Route::InstancesDetail {
                id: Some("s2".into()),
            },
            b"",
        )
        .unwrap();
        match execute(&one, &upstream).await {
            Err(GatewayError::UpstreamAnswer {
                status: 404,
                message,
            }) => {
                assert!(message.contains("s2"), "{message}")
            }
            other => panic!("{other:?}"),
        }

        // A 404 that is not Nova's own "not found" still fails the list.
        let mut misrouted = upstream.0.clone();
        misrouted.insert(
            "servers/s2/os-volume_attachments",
            (404, json!({"message": "no route"})),
        );
        assert!(execute(&list, &canned(misrouted)).await.is_err());
        // Any other failure of a lookup still fails the list.
        let mut failing = upstream.0.clone();
        failing.insert(
            "servers/s2/os-volume_attachments",
            (
                500,
                json!({"computeFault": {"code": 500, "message": "boom"}}),
            ),
        );
        assert!(execute(&list, &canned(failing)).await.is_err());
    }

    #[test]
    fn plans_validate_before_anything_is_sent() {
        let p = plan(&V1Route::CreateInstance, br#"{"instance":{"name":"x"}}"#);
        assert!(matches!(p, Err(GatewayError::Invalid(_))));
        assert!(matches!(
            plan(&V1Route::CreateInstance, b"{oops"),
            Err(GatewayError::Json(_))
        ));
        assert!(matches!(
            plan(&V1Route::Zones, br#"{"x":1}"#),
            Err(GatewayError::Invalid(_))
        ));
        assert!(matches!(
            plan(&V1Route::DeleteInstance { id: "..".into() }, b""),
            Err(GatewayError::Invalid(_))
        ));
        let p = plan(
            &V1Route::InstanceAction {
                instance: "abc".into(),
            },
            br#"{"action":"reboot","parameters":{"type":"SOFT"}}"#,
        )
        .unwrap();
        assert_eq!(p.action, Action::InstanceReboot);
    }

    #[test]
    fn keypair_names_in_queries_are_validated() {
        for bad in ["../servers/x", "a/b", "", "k%2e"] {
            let route = V1Route::DeleteKeypair { name: bad.into() };
            assert!(
                matches!(plan(&route, b""), Err(GatewayError::Invalid(_))),
                "{bad}"
            );
            let route = V1Route::Keypairs {
                name: Some(bad.into()),
            };
            assert!(
                matches!(plan(&route, b""), Err(GatewayError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(
            plan(
                &V1Route::DeleteKeypair {
                    name: "my key".into()
                },
                b""
            )
            .is_ok()
        );
    }

    #[test]
    fn keypair_names_are_encoded_in_paths() {
        assert_eq!(segment("my key/x"), "my%20key%2Fx");
        assert_eq!(segment("k-1_a"), "k-1_a");
    }

    #[test]
    fn upstream_errors_carry_the_nova_message() {
        let e = expect_ok(V2Answer {
            status: 409,
            body: json!({"conflictingRequest": {"code": 409, "message": "Cannot 'os-start' instance x"}}),
            location: None,
        })
        .unwrap_err();
        match e {
            GatewayError::UpstreamAnswer { status, message } => {
                assert_eq!(status, 409);
                assert_eq!(message, "Cannot 'os-start' instance x");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn image_id_from_body_or_location() {
        let a = V2Answer {
            status: 202,
            body: json!({"image_id": "img-1"}),
            location: None,
        };
        assert_eq!(created_image_id(&a), json!("img-1"));
        let a = V2Answer {
            status: 202,
            body: Value::Null,
            location: Some("https://x/v2/t/images/img-2".into()),
        };
        assert_eq!(created_image_id(&a), json!("img-2"));
    }

    /// An error answer keeps its status whatever its body is; only a
    /// success the gateway cannot read is the gateway's 502.
    #[test]
    fn an_error_answer_without_json_keeps_its_status() {
        let raw = |status: u16, body: &'static str| RawAnswer {
            status,
            bytes: bytes::Bytes::from_static(body.as_bytes()),
            location: None,
        };
        let status_of = |e: GatewayError| match e {
            GatewayError::UpstreamAnswer { status, message } => (status, message),
            other => panic!("{other:?}"),
        };
        let html = "<html><body>503 Service Unavailable</body></html>";
        let e = expect_ok(raw(503, html).into_json().unwrap()).unwrap_err();
        assert_eq!(status_of(e), (503, "no Nova error message".to_string()));
        let e = raw(404, "Not Found").parse_ok::<Value>().unwrap_err();
        assert_eq!(status_of(e).0, 404);
        let e = raw(504, "gateway timeout").parse_ok::<Value>().unwrap_err();
        assert_eq!(e.result_code(), 10504);

        let e = raw(200, "<html>").into_json().unwrap_err();
        assert_eq!(status_of(e).0, 502);
        // A redirect is no answer of the API's: the gateway's 502 too.
        let e = raw(301, "<html>Moved</html>").into_json().unwrap_err();
        assert_eq!(status_of(e).0, 502);
        let e = raw(200, "<html>").parse_ok::<Value>().unwrap_err();
        assert_eq!(status_of(e).0, 502);
    }
}
