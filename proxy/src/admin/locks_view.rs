//! `GET /api/locks`: the wait-for graph of the protected tables, for the web page and for
//! scripts. Every proxied session is a node; every wait behind a proxied session's lock on a
//! protected table is an edge from the waiter to the holder, and a waiter that is not a
//! proxied session (psql on the server, a cron job) is an "outside" node, so the picture
//! shows who is stuck, not only who is guilty. Each holder carries the action the guard's
//! rules will take on it and when, computed from the settings in force.
//!
//! The edges come from the same shared, rate-limited probe as SHOW CLIENTS ([`super::probes`]),
//! so a page refreshing every second costs no more than any other reader.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use guard_core::policy::{Rules, TriggerKind};
use guard_core::{HeldLock, SessionRecord, TxnState};
use serde::Serialize;

use super::probes::Probed;
use super::Admin;

/// The name a holder's due action is reported under while the guard has one set of rules:
/// the flat `[guard]` settings, which act as the catch-all rule.
pub const DEFAULT_RULE: &str = "default";

/// The whole answer of `GET /api/locks`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LockGraph {
    /// Whether the guard is configured (without it there are no probes: no edges, no locks).
    pub guard_enabled: bool,
    /// Whether dry-run is on: due actions would only be recorded.
    pub dry_run: bool,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

/// A backend in the graph: a proxied session, or a waiter lockguard does not proxy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Node {
    /// `client:<id>` for a proxied session, `pid:<pid>` for an outside waiter.
    pub id: String,
    /// `client` or `outside`.
    pub kind: &'static str,
    pub client_id: Option<u64>,
    pub backend_pid: Option<i32>,
    /// `ip:port` of the client.
    pub client_addr: Option<String>,
    pub user: Option<String>,
    pub database: Option<String>,
    pub application_name: Option<String>,
    /// The proxy's view of the session (`idle in transaction`, ...).
    pub state: Option<String>,
    pub state_age_s: Option<f64>,
    pub xact_age_s: Option<f64>,
    /// Its granted locks on protected tables.
    pub locks: Vec<LockLabel>,
    /// What the guard will do to it and when, if a rule is counting down on it.
    pub due: Option<DueAction>,
}

/// A lock on a protected table.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LockLabel {
    /// `schema.table`.
    pub table: String,
    /// As `pg_locks.mode` spells it.
    pub mode: String,
}

impl From<&HeldLock> for LockLabel {
    fn from(lock: &HeldLock) -> Self {
        LockLabel {
            table: lock.qualified_table(),
            mode: lock.mode.clone(),
        }
    }
}

/// A wait: `waiter` is blocked behind `holder` (node ids), which holds `table` in `mode`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Edge {
    pub waiter: String,
    pub holder: String,
    pub table: String,
    pub mode: String,
}

/// The guard's next action on a holder: which rule, which trigger, what it will do, and in
/// how many seconds (0 when it is due at the next sweep).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DueAction {
    pub rule: String,
    pub trigger: &'static str,
    /// `terminate`, or `dry_run` when it would only be recorded.
    pub action: &'static str,
    pub in_s: f64,
}

/// What the idle rules will do to a session in `state` for `state_age` that holds
/// `protected_locks` locks on protected tables with `waiters` sessions behind it: `None`
/// when no rule is counting down on it (it is busy or outside a transaction, the rule is
/// off, it holds no protected lock, or nobody waits and the rules require a waiter).
pub fn due_action(
    rule: &str,
    rules: &Rules,
    state: TxnState,
    state_age: Duration,
    protected_locks: usize,
    waiters: usize,
) -> Option<DueAction> {
    let (trigger, timeout) = match state {
        TxnState::IdleInTransaction => (
            TriggerKind::IdleInTransaction,
            rules.idle_in_transaction_timeout,
        ),
        TxnState::IdleInFailedTransaction => (
            TriggerKind::FailedTransaction,
            rules.failed_transaction_timeout,
        ),
        _ => return None,
    };
    if timeout.is_zero() || protected_locks == 0 || (rules.require_waiters && waiters == 0) {
        return None;
    }
    Some(DueAction {
        rule: rule.to_owned(),
        trigger: trigger.name(),
        action: if rules.dry_run { "dry_run" } else { "terminate" },
        in_s: seconds(timeout.saturating_sub(state_age)),
    })
}

fn seconds(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

fn client_node_id(session: &SessionRecord) -> String {
    format!("client:{}", session.id)
}

impl Admin {
    /// The wait-for graph as it is now: one probe per database in use (shared with the other
    /// readers), the databases concurrently.
    pub async fn lock_graph(&self) -> LockGraph {
        let sessions = self.registry.snapshot();
        let Some(guard) = &self.guard else {
            return build_graph(&sessions, &Probed::new(), None);
        };
        let databases: HashSet<&str> = sessions
            .iter()
            .filter(|s| s.backend_pid().is_some())
            .map(|s| s.client.database.as_str())
            .collect();
        let probes = databases
            .iter()
            .map(|database| self.probes.probe(guard, &self.registry, database));
        let mut probed = Probed::new();
        for facts in join_all(probes).await {
            probed.extend(facts.iter().map(|(pid, f)| (*pid, f.clone())));
        }
        let settings = guard.settings();
        build_graph(&sessions, &probed, Some(&settings.rules))
    }
}

/// The graph of `sessions` from what the probe saw; `rules` is `None` without a guard.
fn build_graph(
    sessions: &[Arc<SessionRecord>],
    probed: &Probed,
    rules: Option<&Rules>,
) -> LockGraph {
    let by_pid: HashMap<i32, &Arc<SessionRecord>> = sessions
        .iter()
        .filter_map(|s| Some((s.backend_pid()?, s)))
        .collect();
    let mut nodes = Vec::with_capacity(sessions.len());
    let mut edges = Vec::new();
    // Outside waiters, once each however many holders they wait for; sorted for a stable page.
    let mut outside: BTreeMap<i32, Node> = BTreeMap::new();
    for session in sessions {
        let facts = session.backend_pid().and_then(|pid| probed.get(&pid));
        let locks: Vec<LockLabel> = facts
            .map(|f| f.locks.iter().map(LockLabel::from).collect())
            .unwrap_or_default();
        let waiters = facts.map_or(0, |f| f.waiters.len());
        let due = rules.and_then(|rules| {
            due_action(
                DEFAULT_RULE,
                rules,
                session.state(),
                session.state_age(),
                locks.len(),
                waiters,
            )
        });
        let id = client_node_id(session);
        if let Some(facts) = facts.filter(|f| !f.locks.is_empty()) {
            // The label: what the holder has on the protected tables (a row-lock waiter waits
            // on the holder's transaction id, which names no table).
            let table = join(facts.locks.iter().map(HeldLock::qualified_table));
            let mode = join(facts.locks.iter().map(|l| l.mode.clone()));
            for &waiter_pid in &facts.waiters {
                let waiter = match by_pid.get(&waiter_pid) {
                    Some(waiter) => client_node_id(waiter),
                    None => {
                        outside
                            .entry(waiter_pid)
                            .or_insert_with(|| outside_node(waiter_pid, &session.client.database));
                        format!("pid:{waiter_pid}")
                    }
                };
                edges.push(Edge {
                    waiter,
                    holder: id.clone(),
                    table: table.clone(),
                    mode: mode.clone(),
                });
            }
        }
        nodes.push(Node {
            id,
            kind: "client",
            client_id: Some(session.id),
            backend_pid: session.backend_pid(),
            client_addr: Some(session.client.addr.to_string()),
            user: Some(session.client.user.clone()),
            database: Some(session.client.database.clone()),
            application_name: Some(session.client.application_name.clone()),
            state: Some(session.state().as_str().to_owned()),
            state_age_s: Some(seconds(session.state_age())),
            xact_age_s: session.xact_age().map(seconds),
            locks,
            due,
        });
    }
    nodes.extend(outside.into_values());
    LockGraph {
        guard_enabled: rules.is_some(),
        dry_run: rules.is_some_and(|r| r.dry_run),
        nodes,
        edges,
    }
}

fn outside_node(pid: i32, database: &str) -> Node {
    Node {
        id: format!("pid:{pid}"),
        kind: "outside",
        client_id: None,
        backend_pid: Some(pid),
        client_addr: None,
        user: None,
        database: Some(database.to_owned()),
        application_name: None,
        state: None,
        state_age_s: None,
        xact_age_s: None,
        locks: Vec::new(),
        due: None,
    }
}

/// Distinct values in first-seen order, comma-separated.
fn join(values: impl Iterator<Item = String>) -> String {
    let mut seen: Vec<String> = Vec::new();
    for value in values {
        if !seen.contains(&value) {
            seen.push(value);
        }
    }
    seen.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockguard_config::ClientLossAction;

    fn rules() -> Rules {
        Rules {
            on_client_loss: ClientLossAction::Terminate,
            idle_in_transaction_timeout: Duration::from_secs(30),
            failed_transaction_timeout: Duration::from_secs(10),
            require_waiters: false,
            dry_run: false,
        }
    }

    #[test]
    fn an_idle_holder_of_a_protected_lock_is_due_for_termination_when_its_timeout_runs_out() {
        let due = due_action(
            DEFAULT_RULE,
            &rules(),
            TxnState::IdleInTransaction,
            Duration::from_millis(12_500),
            1,
            0,
        );
        assert_eq!(
            due,
            Some(DueAction {
                rule: "default".into(),
                trigger: "idle_in_transaction",
                action: "terminate",
                in_s: 17.5,
            })
        );
        let overdue = due_action(
            "login",
            &rules(),
            TxnState::IdleInFailedTransaction,
            Duration::from_secs(60),
            2,
            1,
        )
        .unwrap();
        assert_eq!(
            (overdue.rule.as_str(), overdue.trigger, overdue.in_s),
            ("login", "failed_transaction", 0.0)
        );
    }

    #[test]
    fn no_action_is_due_for_a_busy_lock_free_or_unblocking_session_or_with_the_rule_off() {
        let age = Duration::from_secs(5);
        for state in [TxnState::Active, TxnState::Idle, TxnState::Startup] {
            assert_eq!(due_action("d", &rules(), state, age, 1, 1), None);
        }
        let idle = TxnState::IdleInTransaction;
        assert_eq!(due_action("d", &rules(), idle, age, 0, 1), None);
        let off = Rules {
            idle_in_transaction_timeout: Duration::ZERO,
            ..rules()
        };
        assert_eq!(due_action("d", &off, idle, age, 1, 1), None);
        let needs_waiters = Rules {
            require_waiters: true,
            ..rules()
        };
        assert_eq!(due_action("d", &needs_waiters, idle, age, 1, 0), None);
        assert!(due_action("d", &needs_waiters, idle, age, 1, 1).is_some());
        let dry = Rules {
            dry_run: true,
            ..rules()
        };
        assert_eq!(
            due_action("d", &dry, idle, age, 1, 0).map(|d| d.action),
            Some("dry_run")
        );
    }
}
