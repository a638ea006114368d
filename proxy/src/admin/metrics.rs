//! `GET /metrics`: the proxy's counters in the Prometheus text exposition format (version
//! 0.0.4). Rendered on each scrape from the same state the console shows, so there is no second
//! set of counters to keep in step.
//!
//! Written here rather than with `prometheus-client`: that crate writes only OpenMetrics
//! (counter families named without `_total`, a full stop added to each HELP, a `# EOF` line,
//! its own content type), which would change what scrapers and the shipped dashboard and
//! alerts read; and since every value is read from live state at each scrape, its model
//! (registered metric objects, or a custom collector around this same code) would replace
//! the forty lines of [`Exposition`] with more.

use std::collections::BTreeMap;
use std::fmt::Write;

use guard_core::policy::TriggerKind;
use guard_core::{HealthStatus, Outcome, TxnState};

use super::Admin;
use crate::stats::StatsSnapshot;
use crate::GuardHandle;

/// The `Content-Type` of the rendering.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every session state, so the per-state gauge shows zeros too.
const STATES: [TxnState; 5] = [
    TxnState::Startup,
    TxnState::Idle,
    TxnState::Active,
    TxnState::IdleInTransaction,
    TxnState::IdleInFailedTransaction,
];

/// Writes metric families: `# HELP`, `# TYPE`, then samples.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition: the proxy's own families, then the guard's when one is configured.
pub fn render(admin: &Admin) -> String {
    let mut m = Exposition { out: String::new() };
    let stats = admin.stats.snapshot(admin.registry());
    clients(&mut m, admin, &stats);
    traffic(&mut m, &stats);
    let guard = admin.guard();
    m.single(
        "lockguard_guard_enabled",
        "gauge",
        "1 when a guard is configured (guard.dsn).",
        u8::from(guard.is_some()),
    );
    if let Some(guard) = guard {
        guard_state(&mut m, guard);
        terminations(&mut m, guard);
        terminations_by_rule(&mut m, guard);
        probes(&mut m, guard);
    }
    m.out
}

/// Sessions now (total, by state, the limit) and the connection counters.
fn clients(m: &mut Exposition, admin: &Admin, stats: &StatsSnapshot) {
    let sessions = admin.registry().snapshot();
    m.single(
        "lockguard_clients_active",
        "gauge",
        "Proxied client sessions now.",
        sessions.len(),
    );
    // The limit beside the count, so an alert can say "near the limit" without knowing it.
    m.single(
        "lockguard_max_clients",
        "gauge",
        "Client sessions allowed at once (proxy.max_clients); more are refused.",
        admin.config().proxy.max_clients,
    );
    m.family(
        "lockguard_clients",
        "gauge",
        "Proxied client sessions now, by transaction state.",
    );
    let mut by_state: BTreeMap<&str, usize> = STATES.iter().map(|s| (s.as_str(), 0)).collect();
    for session in &sessions {
        *by_state.entry(session.state().as_str()).or_default() += 1;
    }
    for (state, n) in by_state {
        m.sample("lockguard_clients", &[("state", state)], n);
    }
    m.single(
        "lockguard_clients_accepted_total",
        "counter",
        "Client connections accepted.",
        stats.clients_accepted,
    );
    m.single(
        "lockguard_clients_refused_total",
        "counter",
        "Client connections refused because max_clients was reached.",
        stats.clients_refused,
    );
    m.single(
        "lockguard_startup_rejected_total",
        "counter",
        "Client connections whose startup packet was invalid.",
        stats.startup_rejected,
    );
    m.single(
        "lockguard_startup_timeouts_total",
        "counter",
        "Client connections that did not finish startup in time.",
        stats.startup_timeouts,
    );
}

/// Upstream connects, cancels, sessions and bytes forwarded.
fn traffic(m: &mut Exposition, stats: &StatsSnapshot) {
    m.family(
        "lockguard_upstream_connect_errors_total",
        "counter",
        "Failed attempts to connect to PostgreSQL, by reason (refused, timeout, tls, dns, other).",
    );
    for (reason, n) in stats.upstream_connect_errors_by_reason {
        m.sample(
            "lockguard_upstream_connect_errors_total",
            &[("reason", reason.as_str())],
            n,
        );
    }
    m.single(
        "lockguard_cancel_requests_total",
        "counter",
        "Cancel requests forwarded to PostgreSQL.",
        stats.cancel_requests,
    );
    m.single(
        "lockguard_sessions_on_forwarding_threads",
        "gauge",
        "Sessions the forwarding threads carry now; the async runtime forwards the rest.",
        stats.sessions_on_forwarding_threads,
    );
    m.single(
        "lockguard_sessions_started_total",
        "counter",
        "Sessions that reached PostgreSQL.",
        stats.sessions_started,
    );
    m.family(
        "lockguard_bytes_total",
        "counter",
        "Bytes forwarded, by direction.",
    );
    m.sample(
        "lockguard_bytes_total",
        &[("direction", "client_to_server")],
        stats.bytes_from_clients,
    );
    m.sample(
        "lockguard_bytes_total",
        &[("direction", "server_to_client")],
        stats.bytes_from_servers,
    );
}

/// Whether the guard's connections work and whether it only records.
fn guard_state(m: &mut Exposition, guard: &GuardHandle) {
    let up = guard.health().status == HealthStatus::Ok;
    m.single(
        "lockguard_guard_up",
        "gauge",
        "1 when every guard connection works, 0 when the guard is degraded.",
        u8::from(up),
    );
    m.single(
        "lockguard_guard_dry_run",
        "gauge",
        "1 when the guard only records what it would terminate.",
        u8::from(guard.rules().dry_run),
    );
}

/// Every trigger × outcome pair, zeros included, from the audit log's counts.
fn terminations(m: &mut Exposition, guard: &GuardHandle) {
    m.family(
        "lockguard_terminations_total",
        "counter",
        "Guard decisions to terminate a backend, by trigger and outcome.",
    );
    let counts = guard.audit().counts();
    for trigger in TriggerKind::ALL.map(TriggerKind::name) {
        for outcome in Outcome::ALL {
            let n: u64 = counts
                .iter()
                .filter(|(t, o, _)| t == trigger && *o == outcome)
                .map(|(_, _, n)| n)
                .sum();
            m.sample(
                "lockguard_terminations_total",
                &[("trigger", trigger), ("outcome", outcome.as_str())],
                n,
            );
        }
    }
}

/// The same decisions with the guard rule that made them (`default` for the flat `[guard]`
/// keys): an event naming several rules counts for each. Only pairs seen so far are listed,
/// since the rules change on RELOAD; the family without `rule` above keeps its zeros.
fn terminations_by_rule(m: &mut Exposition, guard: &GuardHandle) {
    m.family(
        "lockguard_rule_terminations_total",
        "counter",
        "Guard decisions by rule, trigger and outcome (terminations, cancels and records).",
    );
    for (rule, trigger, outcome, n) in guard.audit().counts_by_rule() {
        m.sample(
            "lockguard_rule_terminations_total",
            &[
                ("rule", rule.as_str()),
                ("trigger", trigger.as_str()),
                ("outcome", outcome.as_str()),
            ],
            n,
        );
    }
}

/// The lock probes' latency histogram and failures.
fn probes(m: &mut Exposition, guard: &GuardHandle) {
    let latency = guard.probe_latency();
    m.family(
        "lockguard_probe_duration_seconds",
        "histogram",
        "Time of the guard's lock probes (one round trip per database).",
    );
    for (bound, count) in guard_core::guard::PROBE_BUCKETS
        .iter()
        .zip(&latency.cumulative)
    {
        m.sample(
            "lockguard_probe_duration_seconds_bucket",
            &[("le", &bound.to_string())],
            count,
        );
    }
    m.sample(
        "lockguard_probe_duration_seconds_bucket",
        &[("le", "+Inf")],
        latency.count,
    );
    m.sample(
        "lockguard_probe_duration_seconds_sum",
        &[],
        latency.sum_seconds,
    );
    m.sample("lockguard_probe_duration_seconds_count", &[], latency.count);
    m.single(
        "lockguard_probe_errors_total",
        "counter",
        "Guard lock probes that failed.",
        latency.errors,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
    }
}
