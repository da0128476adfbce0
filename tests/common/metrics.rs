//! Reading a Prometheus text exposition (the admin listener's /metrics).

use std::time::Duration;

/// The value of the unlabelled series `name`; panics if there is none.
pub fn value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// The sum over every series of `name`, labelled or not (0 if none).
pub fn sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The /metrics text of the admin listener at `admin` (a base URL).
pub async fn fetch(http: &reqwest::Client, admin: &str) -> String {
    http.get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Reads /metrics up to `tries` times, `every` apart, until it contains
/// `needle`; says whether it did.
pub async fn eventually_contains(
    http: &reqwest::Client,
    admin: &str,
    needle: &str,
    tries: usize,
    every: Duration,
) -> bool {
    for _ in 0..tries {
        if fetch(http, admin).await.contains(needle) {
            return true;
        }
        tokio::time::sleep(every).await;
    }
    false
}

/// What the requests on `surface` took in all, and the gateway's own part of
/// it: the sums of `toastgate_request_duration_seconds` (every Action) and
/// `toastgate_gateway_overhead_seconds`.
pub fn duration_and_overhead(metrics: &str, surface: &str) -> (f64, f64) {
    let label = format!(r#"surface="{surface}""#);
    let sum_of = |family: &str| -> f64 {
        let prefix = format!("{family}_sum{{");
        metrics
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (
        sum_of("toastgate_request_duration_seconds"),
        sum_of("toastgate_gateway_overhead_seconds"),
    )
}

/// Waits (at most 20 s) until the unlabelled gauge `name` reads `value`;
/// says whether it did.
pub async fn gauge_becomes(http: &reqwest::Client, admin: &str, name: &str, value: u32) -> bool {
    let needle = format!("\n{name} {value}\n");
    eventually_contains(http, admin, &needle, 200, Duration::from_millis(100)).await
}
