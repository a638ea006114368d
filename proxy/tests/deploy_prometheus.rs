//! The Prometheus alert rules through `promtool` (and their unit tests), and every series the
//! alerts and the Grafana dashboard name, scraped from a running lockguard.
//!
//! A test whose tool is missing is skipped with a message, except under `CI=true`, where it
//! fails. The deployment tests live with the binary because only a package's own tests get
//! its path.

mod deploy_support;

use std::collections::BTreeSet;
use std::process::Command;

use lockguard_sandbox::TRUST_ALL_HBA;
use serde_json::Value;

use deploy_support::*;

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = require("promtool", "apt-get install prometheus") else {
        return;
    };
    let dir = repo().join("deploy/prometheus");
    let checked = run(Command::new(&promtool)
        .args(["check", "rules", "lockguard-rules.yaml"])
        .current_dir(&dir));
    let checked = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    let tested = run(Command::new(&promtool)
        .args(["test", "rules", "lockguard-rules.test.yaml"])
        .current_dir(&dir));
    assert!(
        String::from_utf8_lossy(&tested.stdout).contains("SUCCESS"),
        "{tested:?}"
    );
}

/// Aggregations, functions' keywords and set operators: PromQL words that are not series
/// (besides the [`LABEL_LISTS`] words).
const PROMQL_WORDS: &[&str] = &[
    "sum", "min", "max", "avg", "count", "and", "or", "unless", "bool", "offset",
];
/// Words followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The series a PromQL expression names: every identifier that is not a function call, a
/// keyword, a label name (inside `{}` or a `by (...)` list), a string, a number or a duration.
fn series_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening character to its closing one, over quoted strings.
    let skip_to = |mut i: usize, close: char| {
        while i < chars.len() && chars[i] != close {
            if matches!(chars[i], '"' | '\'' | '`') {
                let quote = chars[i];
                i += 1;
                while i < chars.len() && chars[i] != quote {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_to(i + 1, c);
        } else if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c.is_ascii_digit() || c == '$' {
            // Numbers, durations, Grafana variables.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "._".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if LABEL_LISTS.contains(&word.as_str()) && next == Some(&'(') {
                let open = i + chars[i..].iter().position(|c| *c == '(').unwrap_or(0);
                i = skip_to(open + 1, ')');
            } else if next != Some(&'(')
                && !PROMQL_WORDS.contains(&word.as_str())
                && !LABEL_LISTS.contains(&word.as_str())
            {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn series_names_finds_the_series_and_nothing_else() {
    let expr = r#"sum by (le, instance) (rate(a_bucket{job="x", le=~"0.5|b_total"}[$__rate_interval]))
        / on (instance) group_left b_total > 0.9 unless c:d offset 5m and up{job="lockguard"} == bool 1
        or histogram_quantile(0.99, e_seconds_bucket) * 1e3"#;
    let found: Vec<String> = series_names(expr).into_iter().collect();
    assert_eq!(
        found,
        ["a_bucket", "b_total", "c:d", "e_seconds_bucket", "up"]
    );
}

/// Every PromQL expression of the alert rules and the dashboard (panels, nested rows and the
/// templating queries), with where it comes from.
fn expressions_in_rules_and_dashboard() -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    let rules = yaml("deploy/prometheus/lockguard-rules.yaml");
    for group in at(&rules, "/groups").as_array().expect("groups") {
        for rule in at(group, "/rules").as_array().expect("rules") {
            exprs.push((
                format!("alert {}", text(rule, "/alert")),
                text(rule, "/expr").to_owned(),
            ));
        }
    }
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/lockguard-dashboard.json")).expect("JSON");
    fn panels(list: &Value, exprs: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("a target's expr");
                exprs.push((format!("panel {}", panel["title"]), expr.to_owned()));
            }
            panels(&panel["panels"], exprs);
        }
    }
    panels(at(&dashboard, "/panels"), &mut exprs);
    for variable in at(&dashboard, "/templating/list").as_array().expect("list") {
        if variable["type"] != "query" {
            continue;
        }
        // label_values(SELECTOR, LABEL): only the selector names a series.
        let query = text(variable, "/query/query");
        let selector = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','))
            .map_or(query, |(selector, _)| selector);
        exprs.push((
            format!("variable {}", variable["name"]),
            selector.to_owned(),
        ));
    }
    exprs
}

/// The sample names of a Prometheus text exposition.
fn scraped_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn every_series_the_alerts_and_the_dashboard_use_is_exported() {
    let sandbox = start_sandbox(TRUST_ALL_HBA, "SELECT 1");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("lockguard.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:{port}\"\n\
             [log]\nformat = \"json\"\n\
             [guard]\ndsn = \"host=127.0.0.1 port={port} user=postgres dbname=postgres\"\n\
             protected_tables = [\"app.user_sessions\"]\n\
             [admin]\nhttp_listen = \"127.0.0.1:0\"\n",
            port = sandbox.port()
        ),
    )
    .expect("write the config");
    let mut command = Command::new(env!("CARGO_BIN_EXE_lockguard"));
    command.arg("--config").arg(&config);
    let lockguard = Running::start(command);
    let http = lockguard.address_of("admin HTTP endpoint is accepting connections");
    let (status, exposition) = http_get(http, "/metrics");
    assert_eq!(status, 200, "{exposition}");
    let exported = scraped_names(&exposition);
    // The families this test was written against, so a scrape that lost the guard's part
    // cannot pass by naming nothing.
    for family in [
        "lockguard_max_clients",
        "lockguard_guard_up",
        "lockguard_probe_duration_seconds_bucket",
    ] {
        assert!(exported.contains(family), "{family} not in:\n{exposition}");
    }

    let exprs = expressions_in_rules_and_dashboard();
    assert!(exprs.len() > 20, "too few expressions found: {exprs:?}");
    let mut missing = Vec::new();
    for (source, expr) in &exprs {
        let names = series_names(expr);
        assert!(!names.is_empty(), "{source} names no series: {expr}");
        // `up` is Prometheus's own series about the scrape.
        for name in names.iter().filter(|n| *n != "up") {
            if !exported.contains(name) {
                missing.push(format!("{source}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "series not exported by /metrics:\n{}\nexported: {exported:?}",
        missing.join("\n")
    );
}
