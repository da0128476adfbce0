//! What-if replay: what would a new config have decided for the requests in
//! an audit log? `toastgate replay --config NEW.yaml AUDIT.jsonl...`
//!
//! Each request of the log (its records grouped by `request_id`) is judged
//! again under NEW, in recorded time order: the team and project, the allow
//! rules and constraints (on the `facts` its record carries), then the rate
//! limits, simulated exactly (GCRA on the recorded times, costs included;
//! across replicas, as one shared limit). The result is compared with what
//! the gateway decided then. Requests refused then for reasons a config does
//! not decide (authentication, a full disk, a Redis outage, a bad request,
//! ...) are counted apart, not compared.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::action::Action;
use crate::config::{Config, RateRule};
use crate::policy::{self, RequestFacts};

/// What the gateway decided, then or under the new config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// `policy:<reason>` or `rate_limit:<rule>`, and the detail.
    Refused {
        reason: String,
        detail: String,
    },
}

impl Verdict {
    fn allowed(&self) -> bool {
        matches!(self, Verdict::Allowed)
    }
}

/// One request as the log tells it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub request_id: String,
    pub time: String,
    pub team: String,
    pub project: String,
    pub action: Action,
    pub facts: Option<RequestFacts>,
    pub then: Verdict,
}

/// Why a request of the log is not compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skipped {
    /// Refused for a reason no config decides (auth, audit, Redis, input).
    NotAConfigDecision,
    /// Its record has no team, project or known Action (refused early).
    Incomplete,
    /// A constrained Action whose record carries no `facts` (older logs).
    NoFacts,
}

impl Skipped {
    fn label(self) -> &'static str {
        match self {
            Skipped::NotAConfigDecision => "refused for reasons a config does not decide",
            Skipped::Incomplete => "without team, project or Action",
            Skipped::NoFacts => "constrained Actions recorded without facts",
        }
    }
}

/// Reads the requests of `records` (every line of the audit files, in any
/// order): the last record of each request says what was decided.
pub fn requests(records: &[Value]) -> (Vec<Recorded>, BTreeMap<Skipped, u64>) {
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for r in records {
        let Some(id) = r["request_id"].as_str() else {
            continue;
        };
        // The `completed` record (written last) has the final decision.
        match by_id.get(id) {
            Some(seen) if seen["stage"] == "completed" => {}
            Some(_) if r["stage"] != "completed" => {}
            None => {
                order.push(id);
                by_id.insert(id, r);
            }
            Some(_) => {
                by_id.insert(id, r);
            }
        }
    }
    let mut out = Vec::new();
    let mut skipped: BTreeMap<Skipped, u64> = BTreeMap::new();
    for id in order {
        match recorded(by_id[id]) {
            Ok(r) => out.push(r),
            Err(s) => *skipped.entry(s).or_default() += 1,
        }
    }
    out.sort_by(|a, b| a.time.cmp(&b.time));
    (out, skipped)
}

fn recorded(r: &Value) -> Result<Recorded, Skipped> {
    let text = |k: &str| r[k].as_str().map(str::to_string);
    let (Some(request_id), Some(time), Some(team), Some(project)) = (
        text("request_id"),
        text("time"),
        text("team"),
        text("project"),
    ) else {
        return Err(Skipped::Incomplete);
    };
    let action = r["action"]
        .as_str()
        .and_then(Action::from_name)
        .ok_or(Skipped::Incomplete)?;
    let reason = text("reason").unwrap_or_default();
    let then = match r["decision"].as_str() {
        Some("allowed") => Verdict::Allowed,
        Some("refused") if reason.starts_with("policy:") || reason.starts_with("rate_limit:") => {
            Verdict::Refused {
                reason,
                detail: String::new(),
            }
        }
        Some("refused") => return Err(Skipped::NotAConfigDecision),
        _ => return Err(Skipped::Incomplete),
    };
    Ok(Recorded {
        request_id,
        time,
        team,
        project,
        action,
        facts: r.get("facts").map(RequestFacts::from_record),
        then,
    })
}

/// Whether `action` can be judged without facts (no constraint reads any).
fn needs_facts(action: Action) -> bool {
    matches!(
        action,
        Action::InstanceCreate | Action::InstanceResize | Action::InstanceUpdate
    )
}

/// GCRA state of every (team, rule) and the global budget, on recorded time.
#[derive(Default)]
struct Limits {
    /// Theoretical arrival time, in microseconds since the epoch.
    tat: HashMap<(String, String), i64>,
}

impl Limits {
    /// The rules NEW applies to this request, in the gateway's order; the
    /// first that cannot take its cost refuses (earlier ones stay charged).
    fn decide(&mut self, config: &Config, r: &Recorded, now_us: i64) -> Verdict {
        let team_rules = config.teams.get(&r.team).map(|t| {
            t.rate_limits
                .iter()
                .filter(|rule| rule.actions.contains(&r.action))
        });
        let rules: Vec<(String, &RateRule)> = team_rules
            .into_iter()
            .flatten()
            .map(|rule| (format!("{}:{}", r.team, rule.name), rule))
            .chain(
                config
                    .rate_limit
                    .global
                    .iter()
                    .map(|g| ("global".to_string(), g)),
            )
            .collect();
        for (key, rule) in rules {
            let interval = us(rule.rate.per) / i64::from(rule.rate.count.max(1));
            let tau = interval * i64::from(rule.burst.max(1) - 1);
            let cost = i64::from(rule.cost_of(r.action));
            let slot = self.tat.entry((key, rule.name.clone())).or_insert(now_us);
            let tat = (*slot).max(now_us);
            let new_tat = tat + interval.max(1) * cost;
            if new_tat - now_us > tau + interval {
                return Verdict::Refused {
                    reason: format!("rate_limit:{}", rule.name),
                    detail: format!("over {}/{}s", rule.rate.count, rule.rate.per.as_secs()),
                };
            }
            *slot = new_tat;
        }
        Verdict::Allowed
    }
}

fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn time_us(rfc3339: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .map(|t| t.timestamp_micros())
}

/// One request whose decision differs.
#[derive(Debug, Clone)]
pub struct Change {
    pub request: Recorded,
    pub now: Verdict,
}

/// Everything the replay found.
#[derive(Debug, Default)]
pub struct Report {
    pub compared: u64,
    pub skipped: BTreeMap<Skipped, u64>,
    pub changes: Vec<Change>,
}

impl Report {
    pub fn newly_refused(&self) -> usize {
        self.changes.iter().filter(|c| !c.now.allowed()).count()
    }

    pub fn newly_allowed(&self) -> usize {
        self.changes.iter().filter(|c| c.now.allowed()).count()
    }
}

/// Judges every request again under `config`, in time order.
pub fn replay(config: &Config, records: &[Value]) -> Report {
    let (requests, mut skipped) = requests(records);
    let mut limits = Limits::default();
    let mut report = Report::default();
    for r in requests {
        if needs_facts(r.action) && r.facts.is_none() && constrained(config, &r.team) {
            *skipped.entry(Skipped::NoFacts).or_default() += 1;
            continue;
        }
        let Some(now_us) = time_us(&r.time) else {
            *skipped.entry(Skipped::Incomplete).or_default() += 1;
            continue;
        };
        let facts = r.facts.clone().unwrap_or_default();
        let now = match policy::authorize(config, &r.team, &r.project, r.action, &facts) {
            Err(refusal) => Verdict::Refused {
                reason: format!("policy:{}", refusal.reason()),
                detail: refusal.to_string(),
            },
            Ok(_) => limits.decide(config, &r, now_us),
        };
        report.compared += 1;
        if now.allowed() != r.then.allowed() {
            report.changes.push(Change { request: r, now });
        }
    }
    report.skipped = skipped;
    report
}

fn constrained(config: &Config, team: &str) -> bool {
    config.teams.get(team).is_some_and(|t| {
        t.constraints.flavors.is_some()
            || t.constraints.max_count.is_some()
            || t.constraints.name_prefix.is_some()
    })
}

/// The report for people: totals, then per team and Action, with examples.
pub fn render(report: &Report, examples: usize) -> String {
    let mut out = String::new();
    let skipped: u64 = report.skipped.values().sum();
    let _ = writeln!(
        out,
        "compared {} request(s); {} newly refused, {} newly allowed",
        report.compared,
        report.newly_refused(),
        report.newly_allowed()
    );
    if skipped > 0 {
        let parts: Vec<String> = report
            .skipped
            .iter()
            .map(|(s, n)| format!("{n} {}", s.label()))
            .collect();
        let _ = writeln!(out, "not compared: {}", parts.join(", "));
    }
    let mut groups: BTreeMap<(String, &'static str, bool), Vec<&Change>> = BTreeMap::new();
    for c in &report.changes {
        groups
            .entry((
                c.request.team.clone(),
                c.request.action.name(),
                c.now.allowed(),
            ))
            .or_default()
            .push(c);
    }
    for ((team, action, allowed), changes) in groups {
        let direction = if allowed {
            "refused -> allowed"
        } else {
            "allowed -> refused"
        };
        let _ = writeln!(
            out,
            "\nteam {team}, {action}: {} {direction}",
            changes.len()
        );
        for c in changes.iter().take(examples) {
            let why = match (&c.now, &c.request.then) {
                (Verdict::Refused { reason, detail }, _) => format!("now {reason}: {detail}"),
                (Verdict::Allowed, Verdict::Refused { reason, .. }) => format!("was {reason}"),
                (Verdict::Allowed, Verdict::Allowed) => String::new(),
            };
            let _ = writeln!(
                out,
                "  {} {} project {}: {why}",
                c.request.time, c.request.request_id, c.request.project
            );
        }
        if changes.len() > examples {
            let _ = writeln!(out, "  ... and {} more", changes.len() - examples);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretSource;
    use serde_json::json;

    /// web-team: everything on `web`, at most 2 instances per create, and
    /// `budget` 10 an hour (burst 10) where a create costs 4.
    const NEW: &str = r#"
listen: { public: "127.0.0.1:8080" }
upstream: { identity_url: "https://id.example", compute_url: "https://compute.example" }
auth: { issuer: i, audience: a, algorithms: [HS256], keys: { type: hs_secret, secret_env: JWT } }
projects:
  web: { tenant_id: 6cdebe3eb0094910bc41f1d42ebe4cb7, appkey: A1, credentials: { type: keystone, username: u, password_env: PW } }
teams:
  web-team:
    projects: [web]
    allow: [{ actions: ["*"] }]
    constraints: { max_count: 2 }
    rate_limits:
      - { name: budget, actions: ["*"], rate: 10/h, burst: 10, costs: [{ actions: [instance.create], cost: 4 }] }
"#;

    fn record(id: &str, secs: u32, action: &str, facts: Option<Value>, decision: &str) -> Value {
        let mut r = json!({
            "time": format!("2026-11-30T10:00:{secs:02}.000000Z"), "request_id": id,
            "stage": "completed", "team": "web-team", "project": "web",
            "action": action, "decision": decision,
        });
        if let Some(f) = facts {
            r["facts"] = f;
        }
        r
    }

    #[test]
    fn policy_constraints_and_weighted_limits_in_recorded_time_order() {
        // Secrets are never needed to judge.
        let config = Config::from_yaml(NEW, &SecretSource::offline(), None).expect("valid");
        let records = vec![
            // Out of order in the file: replayed by time.
            record(
                "c",
                3,
                "instance.create",
                Some(json!({"count": 1})),
                "allowed",
            ),
            record(
                "a",
                1,
                "instance.create",
                Some(json!({"count": 1})),
                "allowed",
            ),
            record(
                "b",
                2,
                "instance.create",
                Some(json!({"count": 3})),
                "allowed",
            ),
            record("d", 4, "keypair.create", None, "allowed"),
            record(
                "e",
                5,
                "instance.create",
                Some(json!({"count": 1})),
                "allowed",
            ),
            record("f", 6, "instance.create", None, "allowed"),
            json!({"time": "2026-11-30T10:00:07.000000Z", "request_id": "g", "stage": "completed",
                   "decision": "refused", "reason": "auth:expired"}),
            record("h", 8, "keypair.create", None, "refused"),
        ];
        let mut h = records.last().cloned().unwrap();
        h["reason"] = json!("audit_unavailable");
        let mut records = records;
        *records.last_mut().unwrap() = h;

        let report = replay(&config, &records);
        let changed: Vec<(&str, String)> = report
            .changes
            .iter()
            .map(|c| {
                let reason = match &c.now {
                    Verdict::Refused { reason, .. } => reason.clone(),
                    Verdict::Allowed => "allowed".into(),
                };
                (c.request.request_id.as_str(), reason)
            })
            .collect();
        // a: 4 of 10; b: over max_count; c: 8 of 10; d: 9; e: 4 more do not fit.
        assert_eq!(
            changed,
            [
                ("b", "policy:constraint".to_string()),
                ("e", "rate_limit:budget".to_string())
            ]
        );
        assert_eq!(report.compared, 5);
        assert_eq!(report.skipped[&Skipped::NoFacts], 1, "f");
        assert_eq!(report.skipped[&Skipped::Incomplete], 1, "g has no team");
        assert_eq!(report.skipped[&Skipped::NotAConfigDecision], 1, "h");
        let text = render(&report, 3);
        assert!(
            text.contains("compared 5 request(s); 2 newly refused, 0 newly allowed"),
            "{text}"
        );
        assert!(
            text.contains("team web-team, instance.create: 2 allowed -> refused"),
            "{text}"
        );
    }

    #[test]
    fn the_completed_record_says_what_was_decided() {
        let config = Config::from_yaml(NEW, &SecretSource::offline(), None).expect("valid");
        let mut received = record("x", 1, "keypair.create", None, "allowed");
        received["stage"] = json!("received");
        let mut completed = record("x", 2, "keypair.create", None, "refused");
        completed["reason"] = json!("policy:action");
        let (requests, _) = requests(&[completed.clone(), received.clone()]);
        assert_eq!(requests.len(), 1);
        assert!(!requests[0].then.allowed());
        let report = replay(&config, &[received, completed]);
        assert_eq!(report.newly_allowed(), 1);
    }
}
