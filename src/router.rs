//! Route classification: which surface, which project, which Action.
//!
//! Pure functions over method and path, so every route of the spec is
//! unit-tested here. A path that maps to no Action is refused by the caller of
//! these functions, never forwarded.

use http::Method;

use crate::action::Action;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V2Kind {
    Action(Action),
    /// `POST servers/{id}/action`: the Action is the body's single key.
    ServerAction,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such route: {method} {path}")]
    NotFound { method: String, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
}

/// Classifies a path below `/v2/` (`path` is the part after `/v2/`).
pub fn classify_v2<'a>(method: &Method, path: &'a str) -> Result<V2Route<'a>, RouteError> {
    let not_found = || RouteError::NotFound {
        method: method.to_string(),
        path: format!("/v2/{path}"),
    };
    let path = path.strip_suffix('/').unwrap_or(path);
    let (project, rest) = path.split_once('/').unwrap_or((path, ""));
    if !is_safe_segment(project) {
        return Err(not_found());
    }
    let segments: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('/').collect()
    };
    if segments.iter().any(|s| !is_safe_segment(s)) {
        return Err(not_found());
    }
    let m = method;
    let (action, target): (Option<Action>, Option<&'a str>) = match segments.as_slice() {
        ["flavors"] => pick(m, &[(Method::GET, Action::FlavorList)]),
        ["flavors", "detail"] => pick(m, &[(Method::GET, Action::FlavorListDetail)]),
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
                });
            }
            return Err(RouteError::MethodNotAllowed {
                method: m.to_string(),
                path: format!("/v2/{path}"),
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
        }),
        None => Err(RouteError::MethodNotAllowed {
            method: m.to_string(),
            path: format!("/v2/{path}"),
        }),
    }
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

/// A path segment that cannot escape its place once the upstream decodes it:
/// not empty, not `.`/`..` (raw or percent-encoded), no encoded slash or NUL.
fn is_safe_segment(s: &str) -> bool {
    if s.is_empty() || s.len() > 255 {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    let decoded_dots = lower.replace("%2e", ".");
    if decoded_dots == "." || decoded_dots == ".." {
        return false;
    }
    !(lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") || s.contains('\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(m: Method, p: &str) -> Action {
        match classify_v2(&m, p).unwrap().kind {
            V2Kind::Action(a) => a,
            V2Kind::ServerAction => panic!("server action"),
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
        let r = classify_v2(&Method::POST, &action_path).unwrap();
        assert_eq!(r.kind, V2Kind::ServerAction);
        assert_eq!(r.target, Some(s));
        assert_eq!(r.project, t);
    }

    #[test]
    fn targets_and_rest_are_extracted() {
        let r = classify_v2(
            &Method::DELETE,
            "web/servers/abc/os-volume_attachments/vol1",
        )
        .unwrap();
        assert_eq!(r.project, "web");
        assert_eq!(r.rest, "servers/abc/os-volume_attachments/vol1");
        assert_eq!(r.target, Some("vol1"));
        let r = classify_v2(&Method::GET, "web/servers/").unwrap();
        assert_eq!(r.rest, "servers");
    }

    #[test]
    fn unknown_routes_and_methods_are_refused() {
        assert!(matches!(
            classify_v2(&Method::GET, "web/os-hypervisors"),
            Err(RouteError::NotFound { .. })
        ));
        assert!(matches!(
            classify_v2(&Method::GET, "web"),
            Err(RouteError::NotFound { .. })
        ));
        assert!(matches!(
            classify_v2(&Method::PATCH, "web/servers/x"),
            Err(RouteError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            classify_v2(&Method::GET, "web/servers/x/action"),
            Err(RouteError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            classify_v2(&Method::DELETE, "web/flavors"),
            Err(RouteError::MethodNotAllowed { .. })
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
            assert!(classify_v2(&Method::GET, p).is_err(), "{p}");
        }
    }
}
