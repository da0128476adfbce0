//! Authorization: may this team do this Action on this project, with these
//! request facts? Deny by default; the Action catalog itself is
//! [`crate::action`].

use crate::action::Action;
use crate::config::Config;

/// Why a caller may not do what it asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("team `{team}` is not configured in toastgate")]
    UnknownTeam { team: String },
    #[error("team `{team}` may not use project `{project}`")]
    ProjectNotAllowed { team: String, project: String },
    #[error("team `{team}` may not do `{action}` on project `{project}`: no allow rule covers it")]
    ActionNotAllowed {
        team: String,
        action: Action,
        project: String,
    },
    #[error("team `{team}` may not do `{action}`: {reason}")]
    Constraint {
        team: String,
        action: Action,
        reason: String,
    },
}

impl Refusal {
    /// Bounded label for metrics and audit.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::UnknownTeam { .. } => "unknown_team",
            Refusal::ProjectNotAllowed { .. } => "project",
            Refusal::ActionNotAllowed { .. } => "action",
            Refusal::Constraint { .. } => "constraint",
        }
    }
}

/// One fact a constraint looks at: absent from the body, read, or present
/// but not readable the way the upstream would read it (then a constrained
/// team is refused rather than the constraint skipped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Fact<T> {
    #[default]
    Absent,
    Value(T),
    Unreadable(String),
}

/// What constraints look at, taken from the v2 body (the v1.0 surface
/// translates first, so both surfaces are judged on the same facts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub flavor: Fact<String>,
    pub count: Fact<i64>,
    pub name: Fact<String>,
}

impl RequestFacts {
    pub fn from_v2_body(action: Action, body: &serde_json::Value) -> RequestFacts {
        match action {
            Action::InstanceCreate => {
                let s = &body["server"];
                let counts = [count_fact(&s["min_count"]), count_fact(&s["max_count"])];
                let count =
                    if let Some(bad) = counts.iter().find(|c| matches!(c, Fact::Unreadable(_))) {
                        bad.clone()
                    } else {
                        let values = counts.iter().filter_map(|c| match c {
                            Fact::Value(v) => Some(*v),
                            _ => None,
                        });
                        Fact::Value(values.max().unwrap_or(1))
                    };
                RequestFacts {
                    flavor: flavor_fact(&s["flavorRef"]),
                    count,
                    name: name_fact(&s["name"]),
                }
            }
            Action::InstanceResize => RequestFacts {
                flavor: flavor_fact(&body["resize"]["flavorRef"]),
                ..Default::default()
            },
            Action::InstanceUpdate => RequestFacts {
                name: name_fact(&body["server"]["name"]),
                ..Default::default()
            },
            _ => RequestFacts::default(),
        }
    }
}

impl RequestFacts {
    /// The facts as an audit record carries them (absent ones left out;
    /// `{"unreadable": why}` for one the upstream could not read either).
    pub fn to_record(&self) -> Option<serde_json::Value> {
        fn put<T: Into<serde_json::Value> + Clone>(
            m: &mut serde_json::Map<String, serde_json::Value>,
            k: &str,
            f: &Fact<T>,
        ) {
            match f {
                Fact::Absent => {}
                Fact::Value(v) => {
                    m.insert(k.into(), v.clone().into());
                }
                Fact::Unreadable(why) => {
                    m.insert(k.into(), serde_json::json!({"unreadable": why}));
                }
            }
        }
        let mut m = serde_json::Map::new();
        put(&mut m, "flavor", &self.flavor);
        put(&mut m, "count", &self.count);
        put(&mut m, "name", &self.name);
        (!m.is_empty()).then_some(serde_json::Value::Object(m))
    }

    /// Back from [`RequestFacts::to_record`].
    pub fn from_record(v: &serde_json::Value) -> RequestFacts {
        fn fact<T>(
            v: &serde_json::Value,
            read: impl Fn(&serde_json::Value) -> Option<T>,
        ) -> Fact<T> {
            match v {
                serde_json::Value::Null => Fact::Absent,
                serde_json::Value::Object(m) if m.contains_key("unreadable") => {
                    Fact::Unreadable(m["unreadable"].as_str().unwrap_or_default().to_string())
                }
                other => read(other).map_or_else(
                    || Fact::Unreadable(format!("{other} in the record")),
                    Fact::Value,
                ),
            }
        }
        RequestFacts {
            flavor: fact(&v["flavor"], |x| x.as_str().map(str::to_string)),
            count: fact(&v["count"], serde_json::Value::as_i64),
            name: fact(&v["name"], |x| x.as_str().map(str::to_string)),
        }
    }
}

/// A flavor id as Nova reads `flavorRef`: an id, or a link whose last path
/// segment is the id. Anything with a query or fragment is not read at all.
fn flavor_fact(v: &serde_json::Value) -> Fact<String> {
    match v {
        serde_json::Value::Null => Fact::Absent,
        serde_json::Value::String(s) if s.contains(['?', '#']) || s.trim().is_empty() => {
            Fact::Unreadable(format!("flavorRef `{s}` is not a plain flavor id or link"))
        }
        serde_json::Value::String(s) => {
            let id = s.trim_end_matches('/').rsplit('/').next().unwrap_or(s);
            Fact::Value(id.to_string())
        }
        other => Fact::Unreadable(format!("flavorRef {other} is not a string")),
    }
}

/// `min_count` / `max_count`: integers, integral numbers (`2.0`) or numeric
/// strings, as Nova accepts them.
fn count_fact(v: &serde_json::Value) -> Fact<i64> {
    match v {
        serde_json::Value::Null => Fact::Absent,
        serde_json::Value::Number(n) => match n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 1e12)
                .map(|f| f as i64)
        }) {
            Some(c) => Fact::Value(c),
            None => Fact::Unreadable(format!("count {n} is not an integer")),
        },
        serde_json::Value::String(s) => match s.trim().parse() {
            Ok(c) => Fact::Value(c),
            Err(_) => Fact::Unreadable(format!("count `{s}` is not an integer")),
        },
        other => Fact::Unreadable(format!("count {other} is not an integer")),
    }
}

fn name_fact(v: &serde_json::Value) -> Fact<String> {
    match v {
        serde_json::Value::Null => Fact::Absent,
        serde_json::Value::String(s) => Fact::Value(s.clone()),
        other => Fact::Unreadable(format!("name {other} is not a string")),
    }
}

/// Why an action is allowed: the rule that allows it (described only when
/// asked: the request path needs only the yes).
#[derive(Debug, Clone, Copy)]
pub struct Allowed<'c> {
    team: &'c str,
    rule: &'c crate::config::AllowRule,
}

impl Allowed<'_> {
    /// `teams.<team>.allow[<i>] (actions: ...)`.
    pub fn rule(&self) -> String {
        format!(
            "teams.{}.allow[{}] (actions: {})",
            self.team,
            self.rule.index,
            self.rule.patterns.join(", ")
        )
    }
}

/// Deny by default: the team must exist, the project must be the team's,
/// an allow rule must cover the Action on that project, and the request must
/// meet the team's constraints.
pub fn authorize<'c>(
    config: &'c Config,
    team: &str,
    project: &str,
    action: Action,
    facts: &RequestFacts,
) -> Result<Allowed<'c>, Refusal> {
    let Some((team_name, t)) = config.teams.get_key_value(team) else {
        return Err(Refusal::UnknownTeam {
            team: team.to_string(),
        });
    };
    if !t.projects.iter().any(|p| p == project) {
        return Err(Refusal::ProjectNotAllowed {
            team: team.to_string(),
            project: project.to_string(),
        });
    }
    let rule = t
        .allow
        .iter()
        .find(|r| {
            r.actions.contains(&action)
                && r.projects
                    .as_ref()
                    .is_none_or(|ps| ps.iter().any(|p| p == project))
        })
        .ok_or_else(|| Refusal::ActionNotAllowed {
            team: team.to_string(),
            action,
            project: project.to_string(),
        })?;
    check_constraints(t, action, facts)?;
    Ok(Allowed {
        team: team_name,
        rule,
    })
}

fn check_constraints(
    team: &crate::config::Team,
    action: Action,
    facts: &RequestFacts,
) -> Result<(), Refusal> {
    let c = &team.constraints;
    let refuse = |reason: String| {
        Err(Refusal::Constraint {
            team: team.name.clone(),
            action,
            reason,
        })
    };
    let creates = action == Action::InstanceCreate;
    if let Some(allowed) = &c.flavors
        && matches!(action, Action::InstanceCreate | Action::InstanceResize)
    {
        match &facts.flavor {
            Fact::Value(f) if allowed.iter().any(|a| a == f) => {}
            Fact::Value(f) => {
                return refuse(format!(
                    "flavor `{f}` is not among the team's allowed flavors ({})",
                    allowed.join(", ")
                ));
            }
            Fact::Absent => {
                return refuse(
                    "the request names no flavor, so the team's flavor list cannot be checked"
                        .into(),
                );
            }
            Fact::Unreadable(why) => return refuse(why.clone()),
        }
    }
    if let Some(max) = c.max_count
        && creates
    {
        match &facts.count {
            Fact::Value(n) if *n > i64::from(max) => {
                return refuse(format!("count {n} exceeds the team's maximum of {max}"));
            }
            Fact::Unreadable(why) => return refuse(why.clone()),
            _ => {}
        }
    }
    if let Some(prefix) = &c.name_prefix
        && matches!(action, Action::InstanceCreate | Action::InstanceUpdate)
    {
        match &facts.name {
            Fact::Value(n) if !n.starts_with(prefix.as_str()) => {
                return refuse(format!("instance name `{n}` must start with `{prefix}`"));
            }
            Fact::Absent if creates => {
                return refuse(
                    "the request names no instance, so the name prefix cannot be checked".into(),
                );
            }
            Fact::Unreadable(why) => return refuse(why.clone()),
            _ => {}
        }
    }
    Ok(())
}

/// `toastgate explain`: the decision and the rule behind it, in words.
pub fn explain(config: &Config, team: &str, action: &str, project: &str) -> String {
    let Some(action) = Action::from_name(action) else {
        return format!(
            "unknown Action `{action}`; known Actions: {}",
            catalog_listing()
        );
    };
    let project = config
        .project(project)
        .map(|p| p.alias.clone())
        .unwrap_or_else(|| project.to_string());
    match authorize(config, team, &project, action, &RequestFacts::default()) {
        Ok(allowed) => {
            let mut text = format!(
                "ALLOWED: team `{team}` may do `{action}` on project `{project}`, by {}",
                allowed.rule()
            );
            if let Some(t) = config.teams.get(team) {
                let c = &t.constraints;
                let mut notes = Vec::new();
                if let Some(f) = &c.flavors {
                    notes.push(format!("flavors limited to {}", f.join(", ")));
                }
                if let Some(m) = c.max_count {
                    notes.push(format!("count at most {m}"));
                }
                if let Some(p) = &c.name_prefix {
                    notes.push(format!("names must start with `{p}`"));
                }
                if !notes.is_empty()
                    && matches!(
                        action,
                        Action::InstanceCreate | Action::InstanceResize | Action::InstanceUpdate
                    )
                {
                    text.push_str(&format!("\n  constraints: {}", notes.join("; ")));
                }
                let limits: Vec<String> = t
                    .rate_limits
                    .iter()
                    .filter(|r| r.actions.contains(&action))
                    .map(|r| {
                        format!(
                            "`{}` {}/{}s burst {}",
                            r.name,
                            r.rate.count,
                            r.rate.per.as_secs(),
                            r.burst
                        )
                    })
                    .collect();
                if !limits.is_empty() {
                    text.push_str(&format!("\n  rate limits: {}", limits.join(", ")));
                }
            }
            text
        }
        Err(refusal) => format!("DENIED: {refusal}"),
    }
}

/// Every Action and group, for `toastgate explain --list`.
pub fn catalog_listing() -> String {
    let mut out = String::from("Actions:\n");
    for a in Action::ALL {
        out.push_str(&format!(
            "  {}{}\n",
            a.name(),
            if a.is_mutating() { "  (mutating)" } else { "" }
        ));
    }
    out.push_str("Groups:\n  *  read  write  <prefix>.*\n");
    for (g, actions) in crate::action::GROUPS {
        let names: Vec<&str> = actions.iter().map(|a| a.name()).collect();
        out.push_str(&format!("  {g}: {}\n", names.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(teams: &str) -> Config {
        let yaml = format!(
            r#"
listen: {{ public: "127.0.0.1:0", admin: "127.0.0.1:0" }}
upstream: {{ identity_url: "http://127.0.0.1:1", compute_url: "http://127.0.0.1:1" }}
auth:
  issuer: i
  audience: a
  algorithms: [HS256]
  keys: {{ type: hs_secret, secret_env: S }}
projects:
  web: {{ tenant_id: t1, credentials: {{ type: keystone, username: u, password_env: P }} }}
  db: {{ tenant_id: t2, credentials: {{ type: keystone, username: u, password_env: P }} }}
teams:
{teams}
"#
        );
        let secrets = crate::config::SecretSource::default()
            .with_override("S", "0123456789abcdef0123456789abcdef")
            .with_override("P", "p");
        Config::from_yaml(&yaml, &secrets, None).expect("valid test config")
    }

    fn decide<'c>(
        c: &'c Config,
        team: &str,
        project: &str,
        action: Action,
    ) -> Result<Allowed<'c>, Refusal> {
        authorize(c, team, project, action, &RequestFacts::default())
    }

    #[test]
    fn allow_deny_table_per_group() {
        let c = config(
            r#"
  readers: { projects: [web, db], allow: [{ actions: [read] }] }
  operators:
    projects: [web, db]
    allow:
      - { actions: [instance.read, instance.power], projects: [web] }
      - { actions: ["keypair.*"] }
  nobody: { projects: [web] }
  admins: { projects: [web], allow: [{ actions: ["*"] }] }
"#,
        );
        let table: &[(&str, &str, Action, bool)] = &[
            ("readers", "web", Action::InstanceList, true),
            ("readers", "db", Action::FlavorListDetail, true),
            ("readers", "web", Action::KeypairGet, true),
            ("readers", "web", Action::InstanceReboot, false),
            ("readers", "web", Action::KeypairCreate, false),
            ("operators", "web", Action::InstanceReboot, true),
            ("operators", "web", Action::InstanceStop, true),
            ("operators", "web", Action::InstanceGet, true),
            ("operators", "db", Action::InstanceReboot, false),
            ("operators", "web", Action::InstanceDelete, false),
            ("operators", "web", Action::InstanceCreate, false),
            ("operators", "db", Action::KeypairDelete, true),
            ("operators", "web", Action::VolumeAttach, false),
            ("nobody", "web", Action::InstanceList, false),
            ("admins", "web", Action::InstanceDelete, true),
            ("admins", "web", Action::VolumeDetach, true),
            ("admins", "db", Action::InstanceList, false),
            ("ghosts", "web", Action::InstanceList, false),
        ];
        for (team, project, action, allowed) in table {
            let got = decide(&c, team, project, *action);
            assert_eq!(got.is_ok(), *allowed, "{team} {project} {action}: {got:?}");
        }
        assert_eq!(
            decide(&c, "operators", "web", Action::InstanceReboot)
                .unwrap()
                .rule(),
            "teams.operators.allow[0] (actions: instance.read, instance.power)"
        );
        assert_eq!(
            decide(&c, "ghosts", "web", Action::InstanceList)
                .unwrap_err()
                .reason(),
            "unknown_team"
        );
        assert_eq!(
            decide(&c, "admins", "db", Action::InstanceList)
                .unwrap_err()
                .reason(),
            "project"
        );
        let e = decide(&c, "readers", "web", Action::InstanceReboot).unwrap_err();
        assert_eq!(e.reason(), "action");
        assert_eq!(
            e.to_string(),
            "team `readers` may not do `instance.reboot` on project `web`: no allow rule covers it"
        );
    }

    #[test]
    fn constraints_on_flavor_count_and_name() {
        let c = config(
            r#"
  batch:
    projects: [web]
    allow: [{ actions: ["*"] }]
    constraints: { flavors: [f-small], max_count: 2, name_prefix: batch- }
"#,
        );
        let create = |flavor: &str, count: i64, name: &str| {
            let body = serde_json::json!({"server": {"flavorRef": flavor, "max_count": count, "min_count": 1, "name": name}});
            authorize(
                &c,
                "batch",
                "web",
                Action::InstanceCreate,
                &RequestFacts::from_v2_body(Action::InstanceCreate, &body),
            )
        };
        assert!(create("f-small", 2, "batch-1").is_ok());
        assert!(
            create("https://x/flavors/f-small", 1, "batch-1").is_ok(),
            "flavorRef as a link"
        );
        let e = create("f-big", 1, "batch-1").unwrap_err();
        assert!(e.to_string().contains("flavor `f-big` is not among"), "{e}");
        assert!(
            create("f-small", 3, "batch-1")
                .unwrap_err()
                .to_string()
                .contains("count 3 exceeds the team's maximum of 2")
        );
        assert!(
            create("f-small", 1, "web-1")
                .unwrap_err()
                .to_string()
                .contains("must start with `batch-`")
        );
        let resize = serde_json::json!({"resize": {"flavorRef": "f-big"}});
        assert!(
            authorize(
                &c,
                "batch",
                "web",
                Action::InstanceResize,
                &RequestFacts::from_v2_body(Action::InstanceResize, &resize)
            )
            .is_err()
        );
        let rename = serde_json::json!({"server": {"name": "other"}});
        assert!(
            authorize(
                &c,
                "batch",
                "web",
                Action::InstanceUpdate,
                &RequestFacts::from_v2_body(Action::InstanceUpdate, &rename)
            )
            .is_err()
        );
        assert!(
            decide(&c, "batch", "web", Action::InstanceReboot).is_ok(),
            "constraints concern create/resize/rename only"
        );
    }

    #[test]
    fn config_refuses_unknown_actions_with_the_key_path() {
        let secrets = crate::config::SecretSource::default()
            .with_override("S", "0123456789abcdef0123456789abcdef")
            .with_override("P", "p");
        let yaml = r#"
listen: { public: "127.0.0.1:0", admin: "127.0.0.1:0" }
upstream: { identity_url: "http://127.0.0.1:1", compute_url: "http://127.0.0.1:1" }
auth: { issuer: i, audience: a, algorithms: [HS256], keys: { type: hs_secret, secret_env: S } }
projects:
  web: { tenant_id: t1, credentials: { type: keystone, username: u, password_env: P } }
teams:
  t:
    projects: [web]
    allow: [{ actions: [instance.read, instance.explode], projects: [db] }]
    rate_limits: [{ name: r, actions: [bogus.*], rate: 5/fortnight }]
rate_limit: { fail_open: [nope] }
"#;
        let problems: Vec<String> = Config::from_yaml(yaml, &secrets, None)
            .unwrap_err()
            .problems()
            .iter()
            .map(|p| p.to_string())
            .collect();
        let all = problems.join("\n");
        assert!(
            all.contains("teams.t.allow[0].actions[1]: unknown Action or group `instance.explode`"),
            "{all}"
        );
        assert!(
            all.contains("teams.t.allow[0].projects[0]: `db` is not one of this team's projects"),
            "{all}"
        );
        assert!(
            all.contains("teams.t.rate_limits[0].actions[0]: unknown Action or group `bogus.*`"),
            "{all}"
        );
        assert!(
            all.contains("teams.t.rate_limits[0].rate: `5/fortnight` is not a rate"),
            "{all}"
        );
        assert!(
            all.contains("rate_limit.fail_open[0]: unknown Action or group `nope`"),
            "{all}"
        );
    }

    #[test]
    fn explain_names_the_rule_or_the_reason() {
        let c = config(
            r#"
  ops:
    projects: [web]
    allow: [{ actions: [instance.power] }]
    rate_limits: [{ name: power, actions: [instance.power], rate: 10/m, burst: 2 }]
"#,
        );
        let yes = explain(&c, "ops", "instance.reboot", "web");
        assert!(yes.starts_with("ALLOWED"), "{yes}");
        assert!(yes.contains("teams.ops.allow[0]"), "{yes}");
        assert!(yes.contains("`power` 10/60s burst 2"), "{yes}");
        let no = explain(&c, "ops", "instance.delete", "web");
        assert!(
            no.starts_with("DENIED") && no.contains("no allow rule covers it"),
            "{no}"
        );
        assert!(
            explain(&c, "ops", "instance.reboot", "t1").starts_with("ALLOWED"),
            "tenant id works too"
        );
        assert!(explain(&c, "ops", "instance.zap", "web").contains("unknown Action"));
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn facts_round_trip_through_the_audit_record() {
        let body = serde_json::json!({"server": {"flavorRef": "https://x/flavors/f1",
            "max_count": "3", "name": 7}});
        let facts = RequestFacts::from_v2_body(Action::InstanceCreate, &body);
        let record = facts.to_record().expect("some facts");
        assert_eq!(record["flavor"], "f1");
        assert_eq!(record["count"], 3);
        assert!(record["name"]["unreadable"].is_string());
        assert_eq!(RequestFacts::from_record(&record), facts);
        assert_eq!(RequestFacts::default().to_record(), None);
    }
}
