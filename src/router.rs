//! Route classification for both surfaces: which project, which route,
//! which Action, and the query string judged against what the spec defines.
//!
//! Pure functions over method, path and query, so every route of the spec
//! is unit-tested here. A path that maps to no route is refused, never
//! forwarded; so is a query parameter the spec does not define for the
//! route (tenant-scoping ones such as `all_tenants`, `project_id` and
//! `tenant_id` never pass). The query that goes upstream is rebuilt from the
//! judged parameters, never copied from the caller.

use http::Method;
use serde_json::Value;

use crate::action::Action;
use crate::error::{GatewayError, RouteError};
use crate::upstream::compute::ComputeBase;

/// A classified v2 request: `/v2/{project}/{rest}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Route<'a> {
    /// The `{project}` segment as the caller wrote it (alias or tenant id).
    pub project: &'a str,
    /// Everything after the project segment, without a leading slash.
    pub rest: &'a str,
    pub kind: V2Kind,
    /// The instance / keypair / volume the request is about, for audit.
    pub target: Option<&'a str>,
    /// The judged query, re-encoded (empty when there is none).
    pub query: String,
}

impl V2Route<'_> {
    /// Where the judged request goes: the same route under the project's
    /// real tenant, with the judged query.
    pub fn upstream_uri(
        &self,
        base: &ComputeBase,
        tenant_id: &str,
    ) -> Result<http::Uri, GatewayError> {
        let tail: &[&str] = if self.query.is_empty() {
            &[self.rest]
        } else {
            &[self.rest, "?", &self.query]
        };
        base.uri(tenant_id, tail)
            .map_err(|_| GatewayError::BadRequest("the request path is not a valid URI".into()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V2Kind {
    Action(Action),
    /// `POST servers/{id}/action`: the Action is the body's single key.
    ServerAction,
}

impl V2Kind {
    fn describe(self) -> String {
        match self {
            V2Kind::Action(a) => format!("`{a}`"),
            V2Kind::ServerAction => "server actions".to_string(),
        }
    }
}

/// The query parameters the v2 spec defines for each Action (README, next
/// to the Action catalog). Everything else is refused.
pub fn v2_query_params(action: Action) -> &'static [QueryParam] {
    use Action::*;
    use QueryKind::*;
    const FLAVORS: &[QueryParam] = &[
        ("minDisk", Count),
        ("minRam", Count),
        ("limit", Count),
        ("marker", Id),
        // Not in the spec, but stock clients send it (openstacksdk on
        // every flavor list, novaclient when finding a flavor by name).
        ("is_public", AdminFilter),
    ];
    const SERVERS: &[QueryParam] = &[
        ("changes-since", Time),
        ("image", Id),
        ("flavor", Id),
        ("name", Text),
        ("status", Word),
        ("limit", Count),
        ("marker", Id),
    ];
    const ATTACHMENTS: &[QueryParam] = &[("limit", Count), ("offset", Count)];
    match action {
        FlavorList | FlavorListDetail => FLAVORS,
        InstanceList | InstanceListDetail => SERVERS,
        VolumeAttachmentList => ATTACHMENTS,
        _ => &[],
    }
}

/// Classifies a v2 request: `path` is the part after `/v2/`; the query is
/// judged against the route's Action.
pub fn classify_v2<'a>(
    method: &Method,
    path: &'a str,
    query: Option<&str>,
) -> Result<V2Route<'a>, GatewayError> {
    let route = classify_v2_path(method, path)?;
    let accepted = match route.kind {
        V2Kind::Action(a) => v2_query_params(a),
        V2Kind::ServerAction => &[],
    };
    let query =
        judge_query(query, accepted, || route.kind.describe()).map_err(GatewayError::BadRequest)?;
    Ok(V2Route { query, ..route })
}

/// The methods a request's route would take, for a 405's `Allow`; only
/// asked when `method` is not one of them.
const METHODS: [Method; 4] = [Method::GET, Method::POST, Method::PUT, Method::DELETE];

fn allowed_methods(takes: impl Fn(&Method) -> bool) -> String {
    let allowed: Vec<&str> = METHODS
        .iter()
        .filter(|m| takes(m))
        .map(Method::as_str)
        .collect();
    allowed.join(", ")
}

fn classify_v2_path<'a>(method: &Method, path: &'a str) -> Result<V2Route<'a>, RouteError> {
    match route_v2(method, path) {
        Err(RouteError::MethodNotAllowed {
            method,
            path: shown,
            ..
        }) => Err(RouteError::MethodNotAllowed {
            method,
            path: shown,
            allowed: allowed_methods(|m| route_v2(m, path).is_ok()),
        }),
        routed => routed,
    }
}

/// `s` before and after its first `/`. A loop over bytes: on a path's
/// few bytes, `str`'s char searcher costs more to set up than to run
/// (callgrind: about 120 instructions per search, three per request).
fn split_at_slash(s: &str) -> Option<(&str, &str)> {
    let i = s.bytes().position(|b| b == b'/')?;
    Some((&s[..i], &s[i + 1..]))
}

/// `s.split('/')`, by [`split_at_slash`].
fn segments(s: &str) -> impl Iterator<Item = &str> {
    let mut left = Some(s);
    std::iter::from_fn(move || {
        let s = left?;
        match split_at_slash(s) {
            Some((segment, after)) => {
                left = Some(after);
                Some(segment)
            }
            None => {
                left = None;
                Some(s)
            }
        }
    })
}

/// [`classify_v2_path`] without the `Allow` list of a 405.
fn route_v2<'a>(method: &Method, path: &'a str) -> Result<V2Route<'a>, RouteError> {
    let not_found = || RouteError::NotFound {
        method: method.to_string(),
        path: format!("/v2/{path}"),
    };
    let path = path.strip_suffix('/').unwrap_or(path);
    let (project, rest) = split_at_slash(path).unwrap_or((path, ""));
    if !is_safe_segment(project) {
        return Err(not_found());
    }
    // No route has more than four segments after the project: eight are
    // read without an allocation, and a longer path is no route at all.
    let mut read = [""; 8];
    let mut count = 0;
    if !rest.is_empty() {
        for segment in segments(rest) {
            if count == read.len() || !is_safe_segment(segment) {
                return Err(not_found());
            }
            read[count] = segment;
            count += 1;
        }
    }
    let m = method;
    let (action, target): (Option<Action>, Option<&'a str>) = match &read[..count] {
        ["flavors"] => pick(m, &[(Method::GET, Action::FlavorList)]),
        ["flavors", "detail"] => pick(m, &[(Method::GET, Action::FlavorListDetail)]),
        // Not a section of the spec, but the target of every flavor's own
        // `links` in its answers, and what stock clients read a flavor by.
        ["flavors", id] => with_target(pick(m, &[(Method::GET, Action::FlavorGet)]), id),
        ["os-availability-zone"] => pick(m, &[(Method::GET, Action::ZoneList)]),
        ["os-keypairs"] => pick(
            m,
            &[
                (Method::GET, Action::KeypairList),
                (Method::POST, Action::KeypairCreate),
            ],
        ),
        ["os-keypairs", name] => with_target(
            pick(
                m,
                &[
                    (Method::GET, Action::KeypairGet),
                    (Method::DELETE, Action::KeypairDelete),
                ],
            ),
            name,
        ),
        ["servers"] => pick(
            m,
            &[
                (Method::GET, Action::InstanceList),
                (Method::POST, Action::InstanceCreate),
            ],
        ),
        ["servers", "detail"] => pick(m, &[(Method::GET, Action::InstanceListDetail)]),
        ["servers", id] => with_target(
            pick(
                m,
                &[
                    (Method::GET, Action::InstanceGet),
                    (Method::PUT, Action::InstanceUpdate),
                    (Method::DELETE, Action::InstanceDelete),
                ],
            ),
            id,
        ),
        ["servers", id, "action"] => {
            if m == Method::POST {
                return Ok(V2Route {
                    project,
                    rest,
                    kind: V2Kind::ServerAction,
                    target: Some(id),
                    query: String::new(),
                });
            }
            return Err(RouteError::MethodNotAllowed {
                method: m.to_string(),
                path: format!("/v2/{path}"),
                allowed: String::new(),
            });
        }
        ["servers", id, "os-volume_attachments"] => with_target(
            pick(
                m,
                &[
                    (Method::GET, Action::VolumeAttachmentList),
                    (Method::POST, Action::VolumeAttach),
                ],
            ),
            id,
        ),
        ["servers", _id, "os-volume_attachments", volume] => with_target(
            pick(
                m,
                &[
                    (Method::GET, Action::VolumeAttachmentGet),
                    (Method::POST, Action::VolumeAttach),
                    (Method::DELETE, Action::VolumeDetach),
                ],
            ),
            volume,
        ),
        _ => return Err(not_found()),
    };
    match action {
        Some(a) => Ok(V2Route {
            project,
            rest,
            kind: V2Kind::Action(a),
            target,
            query: String::new(),
        }),
        None => Err(RouteError::MethodNotAllowed {
            method: m.to_string(),
            path: format!("/v2/{path}"),
            allowed: String::new(),
        }),
    }
}

/// Resolves a v2 request's Action and judges its body: routes without a
/// body take none, routes with one take one strict JSON object of the shape
/// the spec gives (the top-level key the upstream reads). Returns the parsed
/// body, which is what goes upstream.
pub fn judge_v2_body(kind: V2Kind, body: &[u8]) -> Result<(Action, Option<Value>), GatewayError> {
    let action = match kind {
        V2Kind::ServerAction => return judge_server_action(body),
        V2Kind::Action(a) => a,
    };
    let top = match action {
        Action::InstanceCreate | Action::InstanceUpdate => "server",
        Action::KeypairCreate => "keypair",
        Action::VolumeAttach => "volumeAttachment",
        _ if body.is_empty() => return Ok((action, None)),
        _ => return Err(bad(format!("`{action}` takes no request body"))),
    };
    let value = json_object(body)?;
    // Scheduler hints sit next to `server` on create, as Nova reads them.
    const HINTS: &[&str] = &["os:scheduler_hints", "OS-SCH-HNT:scheduler_hints"];
    for (key, v) in value.as_object().into_iter().flatten() {
        if key == top {
            if !v.is_object() {
                return Err(bad(format!("`{key}` must be a JSON object")));
            }
        } else if !(action == Action::InstanceCreate && HINTS.contains(&key.as_str())) {
            return Err(bad(format!(
                "unexpected top-level key `{}` (the body of `{action}` is {{\"{top}\": {{...}}}})",
                shown(key)
            )));
        }
    }
    if value.get(top).is_none() {
        return Err(bad(format!("the body of `{action}` needs `{top}`")));
    }
    Ok((action, Some(value)))
}

/// `POST servers/{id}/action`: the body's single key names the Action.
fn judge_server_action(body: &[u8]) -> Result<(Action, Option<Value>), GatewayError> {
    let value = json_object(body)?;
    let mut keys = value.as_object().into_iter().flat_map(|o| o.keys());
    match (keys.next(), keys.next()) {
        (Some(key), None) => match Action::from_v2_server_action(key) {
            Some(a) => Ok((a, Some(value))),
            None => Err(bad(format!(
                "toastgate does not support the server action `{}`",
                shown(key)
            ))),
        },
        _ => Err(bad(
            "the action body must have exactly one key, the action name".into(),
        )),
    }
}

/// A body that must be one strict JSON object.
fn json_object(body: &[u8]) -> Result<Value, GatewayError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad("this request needs a JSON body".into()));
    }
    let value = crate::body::parse_strict(body).map_err(|e| GatewayError::Json(e.to_string()))?;
    if !value.is_object() {
        return Err(bad("the request body must be a JSON object".into()));
    }
    Ok(value)
}

fn bad(message: String) -> GatewayError {
    GatewayError::BadRequest(message)
}

/// A caller-supplied name, cut short for an error message.
fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

fn pick<'a>(m: &Method, table: &[(Method, Action)]) -> (Option<Action>, Option<&'a str>) {
    (table.iter().find(|(tm, _)| tm == m).map(|(_, a)| *a), None)
}

fn with_target<'a>(
    found: (Option<Action>, Option<&'a str>),
    target: &'a str,
) -> (Option<Action>, Option<&'a str>) {
    (found.0, Some(target))
}

/// Longest path segment, as the upstream reads it (decoded): 255 characters
/// (a key pair's name, at most, upstream).
const MAX_SEGMENT_CHARS: usize = 255;

/// A path segment that cannot escape its place once the upstream decodes it:
/// not empty, not `.`/`..` (raw or percent-encoded), no encoded slash or NUL;
/// its length judged as the upstream reads it, decoded (a name of spaces is
/// three times longer encoded, one of Hangul nine times).
fn is_safe_segment(s: &str) -> bool {
    // Encoded, a character takes at most 12 bytes (4 UTF-8 bytes as %XX).
    if s.is_empty() || s.len() > 12 * MAX_SEGMENT_CHARS {
        return false;
    }
    // The common case (ids, route words) holds none of `%`, `.`, `\`: no
    // decoding to worry about, no copy to make.
    if !s.bytes().any(|b| matches!(b, b'%' | b'.' | b'\\')) {
        return s.len() <= MAX_SEGMENT_CHARS || s.chars().count() <= MAX_SEGMENT_CHARS;
    }
    let decoded = percent_encoding::percent_decode_str(s).decode_utf8_lossy();
    if decoded.chars().count() > MAX_SEGMENT_CHARS {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    let decoded_dots = lower.replace("%2e", ".");
    if decoded_dots == "." || decoded_dots == ".." {
        return false;
    }
    !(lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") || s.contains('\\'))
}

/// A query parameter the spec defines, and what its value may be.
pub type QueryParam = (&'static str, QueryKind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    /// A non-negative integer (`limit`, `minDisk`, ...).
    Count,
    /// An id (`marker`, `image`, `flavor`, `id`, `volumeId`).
    Id,
    /// A timestamp (`changes-since`).
    Time,
    /// A status name.
    Word,
    /// Free text (`name`: Nova reads it as a regular expression).
    Text,
    /// A filter Nova reads only for administrators (`is_public`: a
    /// boolean as Nova spells it, or `none`). Judged, then left out of the
    /// query that goes upstream: for a project's user, as toastgate's cloud
    /// credentials are, Nova answers the same whatever its value, and the
    /// spec does not define it.
    AdminFilter,
}

impl QueryKind {
    fn check(self, value: &str) -> Result<(), &'static str> {
        let ok = match self {
            QueryKind::Count => {
                !value.is_empty() && value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit())
            }
            QueryKind::Id => is_plain(value),
            QueryKind::Time => {
                !value.is_empty()
                    && value.len() <= 64
                    && value.bytes().all(|b| {
                        b.is_ascii_digit()
                            || matches!(b, b'-' | b':' | b'.' | b'+' | b'T' | b'Z' | b' ')
                    })
            }
            QueryKind::Word => {
                !value.is_empty()
                    && value.len() <= 32
                    && value.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_')
            }
            QueryKind::Text => value.chars().count() <= 255 && !value.chars().any(char::is_control),
            // oslo's bool_from_string(strict=True) spellings, and Nova's `none`.
            QueryKind::AdminFilter => [
                "none", "1", "t", "true", "on", "y", "yes", "0", "f", "false", "off", "n", "no",
            ]
            .iter()
            .any(|word| value.eq_ignore_ascii_case(word)),
        };
        if ok {
            Ok(())
        } else {
            Err(match self {
                QueryKind::Count => "a non-negative integer",
                QueryKind::Id => "an id (letters, digits, `-`, `_`, `.`)",
                QueryKind::Time => "a timestamp such as 2024-01-31T12:00:00Z",
                QueryKind::Word => "a status name",
                QueryKind::Text => "text of at most 255 characters, no control characters",
                QueryKind::AdminFilter => "true, false or none",
            })
        }
    }

    /// Whether a judged parameter of this kind goes upstream.
    fn forwarded(self) -> bool {
        !matches!(self, QueryKind::AdminFilter)
    }
}

/// Judges a query string against the parameters a route accepts and
/// re-encodes it: unknown or repeated parameters and ill-formed values are
/// refused with a message naming the parameter.
/// `what` names the caller of the refusal; only called when refusing (it
/// formats a string, and most requests carry no query at all).
fn judge_query(
    query: Option<&str>,
    accepted: &[QueryParam],
    what: impl Fn() -> String,
) -> Result<String, String> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(String::new());
    };
    let mut seen: Vec<String> = Vec::new();
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(name), Some(value)) = (form_decode(name), form_decode(value)) else {
            let shown: String = pair.chars().take(64).collect();
            return Err(format!(
                "query parameter `{shown}` is not valid UTF-8 once percent-decoded"
            ));
        };
        let shown: String = name.chars().take(64).collect();
        let Some((_, kind)) = accepted.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = accepted.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "query parameter `{shown}` is not accepted by {} (accepted: {})",
                what(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ));
        };
        if seen.contains(&name) {
            return Err(format!("query parameter `{shown}` is given more than once"));
        }
        kind.check(&value)
            .map_err(|want| format!("query parameter `{shown}` must be {want}"))?;
        seen.push(name.to_string());
        if kind.forwarded() {
            out.append_pair(&name, &value);
        }
    }
    Ok(out.finish())
}

/// One name or value of an `application/x-www-form-urlencoded` query
/// (`+` is a space), decoded; `None` when the bytes it spells are not
/// UTF-8 (refused rather than passed on with U+FFFD in their place).
fn form_decode(raw: &str) -> Option<String> {
    let spaced = raw.replace('+', " ");
    let decoded = percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()?;
    Some(decoded.into_owned())
}

/// A classified v1.0 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Request {
    pub appkey: String,
    pub route: V1Route,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V1Route {
    Zones,
    /// `GET instances[?id=]`: brief.
    Instances {
        id: Option<String>,
    },
    /// `GET instances-detail[?id=]`.
    InstancesDetail {
        id: Option<String>,
    },
    CreateInstance,
    DeleteInstance {
        id: String,
    },
    Attach {
        instance: String,
    },
    Detach {
        instance: String,
        volume: String,
    },
    /// `POST instances/{id}/action`: the Action comes from the body.
    InstanceAction {
        instance: String,
    },
    Flavors,
    Keypairs {
        name: Option<String>,
    },
    CreateKeypair,
    DeleteKeypair {
        name: String,
    },
}

impl V1Route {
    /// The Action of this route; `None` for the action endpoint (decided by
    /// its body). The one route -> Action table of the v1.0 surface.
    pub fn action(&self) -> Option<Action> {
        Some(match self {
            V1Route::Zones => Action::ZoneList,
            V1Route::Instances { id: Some(_) } | V1Route::InstancesDetail { id: Some(_) } => {
                Action::InstanceGet
            }
            V1Route::Instances { id: None } => Action::InstanceList,
            V1Route::InstancesDetail { id: None } => Action::InstanceListDetail,
            V1Route::CreateInstance => Action::InstanceCreate,
            V1Route::DeleteInstance { .. } => Action::InstanceDelete,
            V1Route::Attach { .. } => Action::VolumeAttach,
            V1Route::Detach { .. } => Action::VolumeDetach,
            V1Route::Flavors => Action::FlavorListDetail,
            V1Route::Keypairs { name: None } => Action::KeypairList,
            V1Route::Keypairs { name: Some(_) } => Action::KeypairGet,
            V1Route::CreateKeypair => Action::KeypairCreate,
            V1Route::DeleteKeypair { .. } => Action::KeypairDelete,
            V1Route::InstanceAction { .. } => return None,
        })
    }

    /// The instance / keypair / volume concerned, for audit.
    pub fn target(&self) -> Option<&str> {
        match self {
            V1Route::Instances { id } | V1Route::InstancesDetail { id } => id.as_deref(),
            V1Route::DeleteInstance { id } => Some(id),
            V1Route::Attach { instance } | V1Route::InstanceAction { instance } => Some(instance),
            V1Route::Detach { instance, .. } => Some(instance),
            V1Route::Keypairs { name } => name.as_deref(),
            V1Route::DeleteKeypair { name } => Some(name),
            _ => None,
        }
    }
}

/// Classifies a v1.0 request: `path` is the part after `/v1.0/appkeys/`.
/// The token API is refused here, outright: caller-supplied cloud keys are
/// never read, let alone forwarded.
pub fn classify_v1(
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<V1Request, GatewayError> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let no_route = || RouteError::NotFound {
        method: method.to_string(),
        path: format!("/v1.0/appkeys/{path}"),
    };
    let mut segments = path.split('/');
    let appkey = segments
        .next()
        .filter(|a| is_plain(a))
        .ok_or_else(no_route)?;
    let rest: Vec<&str> = segments.collect();
    if rest.iter().any(|s| !is_plain(s)) {
        return Err(no_route().into());
    }
    if rest.as_slice() == ["tokens"] {
        return Err(GatewayError::TokenApi);
    }
    // The route first: a query on a path or method the API does not have is
    // answered as such (-5 / -7), not as an unaccepted parameter (-4).
    let Some(accepted) = v1_endpoint_query_params(method, &rest) else {
        if is_known_path(&rest) {
            return Err(RouteError::MethodNotAllowed {
                method: method.to_string(),
                path: format!("/v1.0/appkeys/{{appkey}}/{}", rest.join("/")),
                allowed: allowed_methods(|m| v1_endpoint_query_params(m, &rest).is_some()),
            }
            .into());
        }
        return Err(no_route().into());
    };
    let judged =
        judge_query(query, accepted, || "this v1.0 API".into()).map_err(GatewayError::Invalid)?;
    let q = |name: &str| query_param(&judged, name);
    let required = |name: &str| {
        q(name).ok_or_else(|| {
            GatewayError::Invalid(format!("the `{name}` query parameter is required"))
        })
    };
    let m = method.clone();
    let route = match (m, rest.as_slice()) {
        (Method::GET, ["availability-zones"]) => V1Route::Zones,
        (Method::GET, ["instances"]) => V1Route::Instances { id: q("id") },
        (Method::GET, ["instances-detail"]) => V1Route::InstancesDetail { id: q("id") },
        (Method::POST, ["instances"]) => V1Route::CreateInstance,
        (Method::DELETE, ["instances"]) => V1Route::DeleteInstance {
            id: required("id")?,
        },
        (Method::POST, ["instances", id, "attachments"]) => V1Route::Attach {
            instance: id.to_string(),
        },
        (Method::DELETE, ["instances", id, "attachments"]) => V1Route::Detach {
            instance: id.to_string(),
            volume: required("volumeId")?,
        },
        (Method::POST, ["instances", id, "action"]) => V1Route::InstanceAction {
            instance: id.to_string(),
        },
        (Method::GET, ["flavors"]) => V1Route::Flavors,
        (Method::GET, ["keypairs"]) => V1Route::Keypairs { name: q("name") },
        (Method::POST, ["keypairs"]) => V1Route::CreateKeypair,
        (Method::DELETE, ["keypairs"]) => V1Route::DeleteKeypair {
            name: required("name")?,
        },
        // Every endpoint of `v1_endpoint_query_params` has its arm above (a
        // unit test holds the two together).
        _ => return Err(no_route().into()),
    };
    Ok(V1Request {
        appkey: appkey.to_string(),
        route,
    })
}

fn is_known_path(segs: &[&str]) -> bool {
    matches!(
        segs,
        ["availability-zones"]
            | ["instances"]
            | ["instances-detail"]
            | ["instances", _, "attachments"]
            | ["instances", _, "action"]
            | ["flavors"]
            | ["keypairs"]
    )
}

/// The v1.0 endpoints (method and path after the appkey) and the query
/// parameters the spec defines for each; `None`: not an endpoint.
fn v1_endpoint_query_params(method: &Method, rest: &[&str]) -> Option<&'static [QueryParam]> {
    use QueryKind::Id;
    match (method.as_str(), rest) {
        ("GET" | "DELETE", ["instances"]) | ("GET", ["instances-detail"]) => Some(&[("id", Id)]),
        ("DELETE", ["instances", _, "attachments"]) => Some(&[("volumeId", Id)]),
        ("GET" | "DELETE", ["keypairs"]) => Some(&[("name", QueryKind::Text)]),
        ("GET", ["availability-zones"] | ["flavors"])
        | ("POST", ["instances"] | ["keypairs"])
        | ("POST", ["instances", _, "attachments" | "action"]) => Some(&[]),
        _ => None,
    }
}

/// A path segment or id that can be placed into an upstream path as is.
pub fn is_plain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A decoded query parameter; empty values count as absent.
fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::GatewayError;

    fn action(m: Method, p: &str) -> Action {
        match classify_v2(&m, p, None).unwrap().kind {
            V2Kind::Action(a) => a,
            V2Kind::ServerAction => panic!("server action"),
        }
    }

    /// A key pair's name is judged as long as the upstream reads it: 255
    /// characters, however long encoded (a space is 3 bytes, a Hangul
    /// syllable 9).
    #[test]
    fn a_segment_is_as_long_as_it_is_decoded() {
        let keypair = |name: &str| {
            let path = format!("web/os-keypairs/{name}");
            matches!(
                classify_v2(&Method::GET, &path, None),
                Ok(V2Route {
                    kind: V2Kind::Action(Action::KeypairGet),
                    ..
                })
            )
        };
        let hangul = "%ED%95%9C";
        for (name, fits) in [
            ("%20".repeat(200), true),
            (hangul.repeat(MAX_SEGMENT_CHARS), true),
            (hangul.repeat(MAX_SEGMENT_CHARS + 1), false),
            (format!("{}{}", "%20".repeat(200), "k".repeat(56)), false),
            ("k".repeat(MAX_SEGMENT_CHARS), true),
            ("k".repeat(MAX_SEGMENT_CHARS + 1), false),
        ] {
            assert_eq!(keypair(&name), fits, "{} bytes", name.len());
        }
    }

    #[test]
    fn every_v2_route_of_the_spec_has_its_action() {
        let t = "6cdebe3eb0094910bc41f1d42ebe4cb7";
        let s = "aaf2778b-ea03-4ccc-8b1b-92f4b686c3ec";
        let v = "a07f71dc-8151-4e7d-a0cc-cd24a3f11113";
        let cases = [
            (Method::GET, format!("{t}/flavors"), Action::FlavorList),
            (
                Method::GET,
                format!("{t}/flavors/detail"),
                Action::FlavorListDetail,
            ),
            (
                Method::GET,
                format!("{t}/os-availability-zone"),
                Action::ZoneList,
            ),
            (Method::GET, format!("{t}/os-keypairs"), Action::KeypairList),
            (
                Method::POST,
                format!("{t}/os-keypairs"),
                Action::KeypairCreate,
            ),
            (
                Method::GET,
                format!("{t}/os-keypairs/kp"),
                Action::KeypairGet,
            ),
            (
                Method::DELETE,
                format!("{t}/os-keypairs/kp"),
                Action::KeypairDelete,
            ),
            (Method::GET, format!("{t}/servers"), Action::InstanceList),
            (Method::POST, format!("{t}/servers"), Action::InstanceCreate),
            (
                Method::GET,
                format!("{t}/servers/detail"),
                Action::InstanceListDetail,
            ),
            (Method::GET, format!("{t}/servers/{s}"), Action::InstanceGet),
            (
                Method::PUT,
                format!("{t}/servers/{s}"),
                Action::InstanceUpdate,
            ),
            (
                Method::DELETE,
                format!("{t}/servers/{s}"),
                Action::InstanceDelete,
            ),
            (
                Method::GET,
                format!("{t}/servers/{s}/os-volume_attachments"),
                Action::VolumeAttachmentList,
            ),
            (
                Method::POST,
                format!("{t}/servers/{s}/os-volume_attachments"),
                Action::VolumeAttach,
            ),
            (
                Method::GET,
                format!("{t}/servers/{s}/os-volume_attachments/{v}"),
                Action::VolumeAttachmentGet,
            ),
            (
                Method::POST,
                format!("{t}/servers/{s}/os-volume_attachments/{v}"),
                Action::VolumeAttach,
            ),
            (
                Method::DELETE,
                format!("{t}/servers/{s}/os-volume_attachments/{v}"),
                Action::VolumeDetach,
            ),
        ];
        for (m, p, want) in cases {
            assert_eq!(action(m.clone(), &p), want, "{m} {p}");
        }
        let action_path = format!("{t}/servers/{s}/action");
        let r = classify_v2(&Method::POST, &action_path, None).unwrap();
        assert_eq!(r.kind, V2Kind::ServerAction);
        assert_eq!(r.target, Some(s));
        assert_eq!(r.project, t);
    }

    #[test]
    fn targets_and_rest_are_extracted() {
        let r = classify_v2(
            &Method::DELETE,
            "web/servers/abc/os-volume_attachments/vol1",
            None,
        )
        .unwrap();
        assert_eq!(r.project, "web");
        assert_eq!(r.rest, "servers/abc/os-volume_attachments/vol1");
        assert_eq!(r.target, Some("vol1"));
        let r = classify_v2(&Method::GET, "web/servers/", None).unwrap();
        assert_eq!(r.rest, "servers");
    }

    #[test]
    fn unknown_routes_and_methods_are_refused() {
        assert!(matches!(
            classify_v2(&Method::GET, "web/os-hypervisors", None),
            Err(GatewayError::NoRoute(RouteError::NotFound { .. }))
        ));
        assert!(matches!(
            classify_v2(&Method::GET, "web", None),
            Err(GatewayError::NoRoute(RouteError::NotFound { .. }))
        ));
        assert!(matches!(
            classify_v2(&Method::PATCH, "web/servers/x", None),
            Err(GatewayError::NoRoute(RouteError::MethodNotAllowed { .. }))
        ));
        assert!(matches!(
            classify_v2(&Method::GET, "web/servers/x/action", None),
            Err(GatewayError::NoRoute(RouteError::MethodNotAllowed { .. }))
        ));
        assert!(matches!(
            classify_v2(&Method::DELETE, "web/flavors", None),
            Err(GatewayError::NoRoute(RouteError::MethodNotAllowed { .. }))
        ));
    }

    #[test]
    fn path_tricks_are_refused() {
        for p in [
            "web/servers/..",
            "web/servers/%2e%2E",
            "web/servers/a%2Fb",
            "web//servers",
            "../web/servers",
            "web/servers/x%00",
            "web/os-keypairs/a\\b",
        ] {
            assert!(classify_v2(&Method::GET, p, None).is_err(), "{p}");
        }
    }

    fn route(m: Method, p: &str, q: Option<&str>) -> V1Route {
        classify_v1(&m, p, q).unwrap().route
    }

    #[test]
    fn every_v1_endpoint_classifies_with_its_action() {
        let k = "AppKey1";
        let cases = [
            (
                Method::GET,
                "availability-zones",
                None,
                V1Route::Zones,
                Some(Action::ZoneList),
            ),
            (
                Method::GET,
                "instances",
                None,
                V1Route::Instances { id: None },
                Some(Action::InstanceList),
            ),
            (
                Method::GET,
                "instances",
                Some("id=abc"),
                V1Route::Instances {
                    id: Some("abc".into()),
                },
                Some(Action::InstanceGet),
            ),
            (
                Method::GET,
                "instances-detail",
                None,
                V1Route::InstancesDetail { id: None },
                Some(Action::InstanceListDetail),
            ),
            (
                Method::POST,
                "instances",
                None,
                V1Route::CreateInstance,
                Some(Action::InstanceCreate),
            ),
            (
                Method::DELETE,
                "instances",
                Some("id=abc"),
                V1Route::DeleteInstance { id: "abc".into() },
                Some(Action::InstanceDelete),
            ),
            (
                Method::POST,
                "instances/abc/attachments",
                None,
                V1Route::Attach {
                    instance: "abc".into(),
                },
                Some(Action::VolumeAttach),
            ),
            (
                Method::DELETE,
                "instances/abc/attachments",
                Some("volumeId=v1"),
                V1Route::Detach {
                    instance: "abc".into(),
                    volume: "v1".into(),
                },
                Some(Action::VolumeDetach),
            ),
            (
                Method::POST,
                "instances/abc/action",
                None,
                V1Route::InstanceAction {
                    instance: "abc".into(),
                },
                None,
            ),
            (
                Method::GET,
                "flavors",
                None,
                V1Route::Flavors,
                Some(Action::FlavorListDetail),
            ),
            (
                Method::GET,
                "keypairs",
                None,
                V1Route::Keypairs { name: None },
                Some(Action::KeypairList),
            ),
            (
                Method::GET,
                "keypairs",
                Some("name=k1"),
                V1Route::Keypairs {
                    name: Some("k1".into()),
                },
                Some(Action::KeypairGet),
            ),
            (
                Method::POST,
                "keypairs",
                None,
                V1Route::CreateKeypair,
                Some(Action::KeypairCreate),
            ),
            (
                Method::DELETE,
                "keypairs",
                Some("name=k%201"),
                V1Route::DeleteKeypair { name: "k 1".into() },
                Some(Action::KeypairDelete),
            ),
        ];
        for (m, p, q, want, action) in cases {
            let got = route(m.clone(), &format!("{k}/{p}"), q);
            assert_eq!(got, want, "{m} {p}");
            assert_eq!(got.action(), action, "{m} {p}");
        }
    }

    #[test]
    fn missing_required_query_and_unknown_paths() {
        assert!(matches!(
            classify_v1(&Method::DELETE, "k/instances", None),
            Err(GatewayError::Invalid(m)) if m.contains("`id`")
        ));
        assert!(matches!(
            classify_v1(&Method::DELETE, "k/keypairs", Some("name=")),
            Err(GatewayError::Invalid(_))
        ));
        assert!(matches!(
            classify_v1(&Method::GET, "k/volumes", None),
            Err(GatewayError::NoRoute(RouteError::NotFound { .. }))
        ));
        assert!(matches!(
            classify_v1(&Method::PUT, "k/instances", None),
            Err(GatewayError::NoRoute(RouteError::MethodNotAllowed { .. }))
        ));
        assert!(matches!(
            classify_v1(&Method::GET, "k/instances/../x/action", None),
            Err(GatewayError::NoRoute(RouteError::NotFound { .. }))
        ));
        assert!(matches!(
            classify_v1(&Method::GET, "", None),
            Err(GatewayError::NoRoute(RouteError::NotFound { .. }))
        ));
        for (m, q) in [(Method::POST, None), (Method::GET, Some("id=x"))] {
            assert!(matches!(
                classify_v1(&m, "k/tokens", q),
                Err(GatewayError::TokenApi)
            ));
        }
        // The route is decided before the query is judged: a query does not
        // turn "no such API" (-5) or "not supported" (-7) into "invalid
        // parameter" (-4).
        assert!(matches!(
            classify_v1(&Method::GET, "k/volumes", Some("id=x")),
            Err(GatewayError::NoRoute(RouteError::NotFound { .. }))
        ));
        assert!(matches!(
            classify_v1(&Method::PUT, "k/instances", Some("id=x")),
            Err(GatewayError::NoRoute(RouteError::MethodNotAllowed { allowed, .. }))
                if allowed == "GET, POST, DELETE"
        ));
        assert!(matches!(
            classify_v1(&Method::GET, "k/availability-zones", Some("id=x")),
            Err(GatewayError::Invalid(m)) if m.contains("`id`")
        ));
    }

    /// Every endpoint with a query list has its route, and every method of
    /// a known path without one is "not supported".
    #[test]
    fn every_v1_endpoint_has_its_route() {
        let paths = [
            "availability-zones",
            "instances",
            "instances-detail",
            "instances/i-1/attachments",
            "instances/i-1/action",
            "flavors",
            "keypairs",
        ];
        let methods = [Method::GET, Method::POST, Method::PUT, Method::DELETE];
        let mut endpoints = 0;
        for path in paths {
            let rest: Vec<&str> = path.split('/').collect();
            for m in &methods {
                let query = match (m.as_str(), path) {
                    ("DELETE", "instances") => Some("id=i-1"),
                    ("DELETE", "instances/i-1/attachments") => Some("volumeId=v-1"),
                    ("DELETE", "keypairs") => Some("name=k"),
                    _ => None,
                };
                let classified = classify_v1(m, &format!("k/{path}"), query);
                if v1_endpoint_query_params(m, &rest).is_some() {
                    endpoints += 1;
                    assert!(classified.is_ok(), "{m} {path}: {classified:?}");
                } else {
                    assert!(
                        matches!(
                            classified,
                            Err(GatewayError::NoRoute(RouteError::MethodNotAllowed { .. }))
                        ),
                        "{m} {path}: {classified:?}"
                    );
                }
            }
        }
        assert_eq!(endpoints, 12, "the v1.0 spec's endpoints");
    }

    #[test]
    fn queries_pass_only_as_the_spec_defines_them() {
        let ok = |m: Method, p: &str, q: &str| classify_v2(&m, p, Some(q)).map(|r| r.query);
        assert_eq!(
            ok(
                Method::GET,
                "web/servers/detail",
                "limit=2&marker=abc-1&name=web.%2A&status=ACTIVE"
            )
            .unwrap(),
            "limit=2&marker=abc-1&name=web.*&status=ACTIVE"
        );
        assert_eq!(ok(Method::GET, "web/servers/detail", "").unwrap(), "");
        // `+` is a space; UTF-8 passes whole; empty pairs are nothing.
        assert_eq!(
            ok(
                Method::GET,
                "web/servers/detail",
                "name=a+b%20%C3%A9&&limit=1"
            )
            .unwrap(),
            "name=a+b+%C3%A9&limit=1"
        );
        assert_eq!(
            ok(Method::GET, "web/flavors/detail", "minDisk=20&minRam=1024").unwrap(),
            "minDisk=20&minRam=1024"
        );
        assert_eq!(
            ok(
                Method::GET,
                "web/servers/s1/os-volume_attachments",
                "limit=1&offset=2"
            )
            .unwrap(),
            "limit=1&offset=2"
        );
        assert_eq!(
            ok(
                Method::GET,
                "web/servers",
                "changes-since=2024-01-31T12:00:00Z"
            )
            .unwrap(),
            "changes-since=2024-01-31T12%3A00%3A00Z"
        );
        let refused = [
            (Method::GET, "web/servers/detail", "all_tenants=1"),
            (Method::GET, "web/servers/detail", "project_id=other"),
            (Method::GET, "web/servers/detail", "tenant_id=other"),
            (Method::GET, "web/servers/detail", "limit=1&limit=2"),
            (Method::GET, "web/servers/detail", "limit=-1"),
            (Method::GET, "web/servers/detail", "limit=ten"),
            (Method::GET, "web/servers/detail", "marker=../x"),
            (Method::GET, "web/servers/detail", "name=a%0Ab"),
            (Method::GET, "web/servers/detail", "status=ACTIVE%3BDROP"),
            (Method::GET, "web/servers/s1", "limit=1"),
            (Method::GET, "web/os-keypairs", "user_id=admin"),
            (Method::GET, "web/os-availability-zone", "x=1"),
            (Method::POST, "web/servers/s1/action", "x=1"),
            (Method::DELETE, "web/servers/s1", "force=1"),
            (Method::GET, "web/flavors", "is_public=maybe"),
            (Method::GET, "web/flavors", "is_public=None&is_public=true"),
            (Method::GET, "web/servers/detail", "is_public=true"),
            // Bytes that are not UTF-8: refused, not sent on as U+FFFD.
            (Method::GET, "web/servers/detail", "name=%FF"),
            (Method::GET, "web/servers/detail", "name=web%C3"),
            (Method::GET, "web/servers/detail", "%FFname=x"),
        ];
        for (m, p, q) in refused {
            match classify_v2(&m, p, Some(q)) {
                Err(GatewayError::BadRequest(msg)) => {
                    assert!(msg.contains("query parameter"), "{msg}")
                }
                other => panic!("{m} {p}?{q}: {other:?}"),
            }
        }
    }

    #[test]
    fn is_public_is_judged_as_nova_spells_it_and_never_forwarded() {
        let query = |p: &str, q: &str| classify_v2(&Method::GET, p, Some(q)).map(|r| r.query);
        for value in [
            "None", "none", "true", "False", "1", "0", "yes", "OFF", "t", "n",
        ] {
            for path in ["web/flavors", "web/flavors/detail"] {
                assert_eq!(query(path, &format!("is_public={value}")).unwrap(), "");
            }
        }
        assert_eq!(
            query("web/flavors/detail", "minRam=512&is_public=None&limit=3").unwrap(),
            "minRam=512&limit=3"
        );
        for value in ["", "maybe", "truee", "2", "none%00"] {
            match query("web/flavors", &format!("is_public={value}")) {
                Err(GatewayError::BadRequest(msg)) => {
                    assert!(
                        msg.contains("`is_public` must be true, false or none"),
                        "{msg}"
                    )
                }
                other => panic!("is_public={value}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_action_has_its_query_list() {
        for a in Action::ALL {
            let params = v2_query_params(*a);
            assert!(
                params
                    .iter()
                    .all(|(n, _)| !matches!(*n, "all_tenants" | "project_id" | "tenant_id")),
                "{a}"
            );
            if a.is_mutating() {
                assert!(params.is_empty(), "{a} takes no query");
            }
        }
    }

    #[test]
    fn v1_queries_pass_only_as_the_spec_defines_them() {
        assert!(matches!(
            classify_v1(&Method::GET, "k/instances", Some("id=abc&all_tenants=1")),
            Err(GatewayError::Invalid(m)) if m.contains("`all_tenants`")
        ));
        assert!(matches!(
            classify_v1(&Method::GET, "k/flavors", Some("minDisk=1")),
            Err(GatewayError::Invalid(_))
        ));
        assert!(matches!(
            classify_v1(&Method::DELETE, "k/instances", Some("id=a&id=b")),
            Err(GatewayError::Invalid(m)) if m.contains("more than once")
        ));
        assert!(matches!(
            classify_v1(&Method::DELETE, "k/instances", Some("id=..%2Fx")),
            Err(GatewayError::Invalid(_))
        ));
    }

    #[test]
    fn v2_bodies_are_judged_strictly() {
        let create = V2Kind::Action(Action::InstanceCreate);
        let (a, v) = judge_v2_body(create, br#"{"server":{"name":"x"}}"#).unwrap();
        assert_eq!(a, Action::InstanceCreate);
        assert_eq!(v.unwrap()["server"]["name"], "x");
        let (a, _) = judge_v2_body(V2Kind::ServerAction, br#"{"reboot":{"type":"HARD"}}"#).unwrap();
        assert_eq!(a, Action::InstanceReboot);
        assert_eq!(
            judge_v2_body(V2Kind::Action(Action::InstanceGet), b"").unwrap(),
            (Action::InstanceGet, None)
        );
        let refused: &[(V2Kind, &[u8])] = &[
            (create, br#"{"server":{"name":"evil"},"x":NaN}"#),
            (create, br#"{"server":{"name":"a","name":"b"}}"#),
            (create, b"\xEF\xBB\xBF{\"server\":{}}"),
            (create, br#"{"server":{}} trailing"#),
            (create, br#"{"server":{},"servers":[]}"#),
            (create, br#"{"server":"x"}"#),
            (create, br#"[]"#),
            (create, b""),
            (create, br#"{}"#),
            (
                V2Kind::Action(Action::InstanceUpdate),
                br#"{"server":{"name":"x"},"x":1e999}"#,
            ),
            (V2Kind::Action(Action::InstanceGet), br#"{"x":1}"#),
            (V2Kind::Action(Action::InstanceDelete), b"x"),
            (V2Kind::ServerAction, br#"{}"#),
            (V2Kind::ServerAction, br#"[]"#),
            (V2Kind::ServerAction, br#"not json"#),
            (V2Kind::ServerAction, br#"{"os-stop":null,"os-start":null}"#),
            (V2Kind::ServerAction, br#"{"lock":null}"#),
        ];
        for (kind, body) in refused {
            match judge_v2_body(*kind, body) {
                Err(GatewayError::BadRequest(_) | GatewayError::Json(_)) => {}
                other => panic!("{kind:?} {:?}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
        assert!(
            judge_v2_body(
                create,
                br#"{"server":{"name":"x"},"os:scheduler_hints":{}}"#
            )
            .is_ok()
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// The byte loops split as `str` does, empty segments included.
        #[test]
        fn segments_split_as_str_does(s in "[a/é]{0,12}") {
            proptest::prop_assert_eq!(segments(&s).collect::<Vec<_>>(), s.split('/').collect::<Vec<_>>());
            proptest::prop_assert_eq!(split_at_slash(&s), s.split_once('/'));
        }

        /// Any method, path and query: classified or refused, never a panic;
        /// what classifies builds a valid upstream URI.
        #[test]
        fn any_request_line_is_classified_or_refused(
            method in proptest::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
            segments in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("web".to_string()),
                    proptest::strategy::Just("servers".to_string()),
                    proptest::strategy::Just("detail".to_string()),
                    proptest::strategy::Just("action".to_string()),
                    proptest::strategy::Just("os-keypairs".to_string()),
                    proptest::strategy::Just("os-volume_attachments".to_string()),
                    proptest::strategy::Just("instances".to_string()),
                    proptest::strategy::Just("keypairs".to_string()),
                    "[ -~]{0,12}",
                ],
                0..6,
            ),
            query in proptest::option::of("[ -~]{0,40}"),
        ) {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let path = segments.join("/");
            if let Ok(route) = classify_v2(&method, &path, query.as_deref()) {
                let base = ComputeBase::parse("https://compute.example").unwrap();
                let _ = route.upstream_uri(&base, "tenant");
            }
            let _ = classify_v1(&method, &path, query.as_deref());
        }
    }
}
