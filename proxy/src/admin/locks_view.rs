//! `GET /api/locks`: the wait-for graph of the protected tables, for the web page and for
//! scripts. Every proxied session is a node; every wait for a lock on a protected table is an
//! edge from the waiter to its blocker (`pg_blocking_pids`), and a backend in such a wait that
//! is not a proxied session (psql on the server, a cron job) is an "outside" node, so the
//! picture shows who is stuck, not only who is guilty. Each proxied holder carries the action
//! the guard's rules will take on it and when, computed from the settings in force.
//!
//! The sessions' own facts come from the shared, rate-limited probe of SHOW CLIENTS
//! ([`super::probes`]); the waits from the guard's wait-for graph of each database
//! ([`guard_core::lock_graph`]), read at most once per [`MIN_PROBE_INTERVAL`] per database
//! whoever asks, so a page refreshing every second costs no more than any other reader and
//! never queues reads ahead of a kill on the guard's connection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use guard_core::policy::{Rules, TriggerKind, Who};
use guard_core::{GraphBackend, Guard, HeldLock, Identity, SessionRecord, TxnState};
use lockguard_config::TablePattern;
use serde::Serialize;
use tokio::time::Instant;

use super::probes::{Probed, MIN_PROBE_INTERVAL};
use super::Admin;

/// The whole answer of `GET /api/locks`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LocksView {
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
    /// How long it has waited for a lock on a protected table (PostgreSQL 14+ says since
    /// when), if it waits.
    pub waited_s: Option<f64>,
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
        action: if rules.dry_run {
            "dry_run"
        } else {
            "terminate"
        },
        in_s: seconds(timeout.saturating_sub(state_age)),
    })
}

fn seconds(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

fn client_node_id(session: &SessionRecord) -> String {
    format!("client:{}", session.id)
}

fn outside_node_id(pid: i32) -> String {
    format!("pid:{pid}")
}

/// One database's wait-for graph as the guard read it, with the server's clock then.
type DatabaseGraph = Arc<(guard_core::LockGraph, SystemTime)>;

/// A database's last wait-for graph read (`None` when it failed) and when it started; locked
/// while a read runs, so readers queue (tokio's mutex is fair) and then find the read they
/// can share.
type GraphGate = tokio::sync::Mutex<Option<(Instant, Option<DatabaseGraph>)>>;

/// One gate per database for the wait-for graph reads, as [`super::probes::ProbeGates`] has
/// for the probes: one read at a time, at most one per [`MIN_PROBE_INTERVAL`], every reader
/// waiting shares the next read's answer, and no answer is older than its request.
#[derive(Default)]
pub struct GraphGates {
    gates: std::sync::Mutex<HashMap<String, Arc<GraphGate>>>,
    /// Reads started so far, for the tests that check the sharing.
    reads: std::sync::atomic::AtomicU64,
}

impl GraphGates {
    async fn read(&self, guard: &Guard, database: &str) -> Option<DatabaseGraph> {
        let asked = Instant::now();
        let gate = {
            let mut gates = match self.gates.lock() {
                Ok(gates) => gates,
                Err(poisoned) => poisoned.into_inner(),
            };
            Arc::clone(gates.entry(database.to_owned()).or_default())
        };
        let mut last = gate.lock().await;
        if let Some((started, graph)) = last.as_ref() {
            if *started >= asked {
                return graph.clone();
            }
            tokio::time::sleep_until(*started + MIN_PROBE_INTERVAL).await;
        }
        let started = Instant::now();
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A failed read counts against the rate like any other: readers of a database the
        // guard cannot reach get no edges, not a read each.
        let graph = match guard.wait_for_graph(database).await {
            Ok(graph) => Some(Arc::new(graph)),
            Err(e) => {
                tracing::debug!(database, error = %e, "wait-for graph read failed");
                None
            }
        };
        *last = Some((started, graph.clone()));
        graph
    }

    /// Forgets the gates of databases no session uses any more (none is in use by a reader).
    fn retain(&self, in_use: &HashSet<&str>) {
        let mut gates = match self.gates.lock() {
            Ok(gates) => gates,
            Err(poisoned) => poisoned.into_inner(),
        };
        gates.retain(|database, gate| {
            in_use.contains(database.as_str()) || Arc::strong_count(gate) > 1
        });
    }
}

/// A wait for a lock on a protected table, by pid: `waiter` is blocked behind `holder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidWait {
    pub waiter: i32,
    pub holder: i32,
    /// `schema.table`.
    pub table: String,
    /// The mode the holder holds the table in, else the mode the waiter asks for.
    pub mode: String,
}

/// The waits of `graph` that are about protected tables: a waiter whose wanted tables
/// ([`GraphBackend::wanted_tables`]) include one `patterns` protect, behind each of its
/// blockers. The table named is one the blocker holds too when there is one (a row-lock
/// waiter waits on the holder's transaction id, which names no table).
pub fn protected_waits(graph: &guard_core::LockGraph, patterns: &[TablePattern]) -> Vec<PidWait> {
    let mut out = Vec::new();
    for waiter in graph.waiters() {
        let Some(wait) = &waiter.waiting else {
            continue;
        };
        let protected: Vec<(String, String)> = waiter
            .wanted_tables()
            .into_iter()
            .filter(|(schema, table)| patterns.iter().any(|p| p.matches(schema, table)))
            .collect();
        let Some(first) = protected.first() else {
            continue;
        };
        for &blocker in &wait.blockers {
            let holder = graph.backends.get(&blocker);
            let held = |(schema, table): &(String, String)| {
                holder.and_then(|h| h.held_mode(schema, table))
            };
            let (schema, table) = protected
                .iter()
                .find(|t| held(t).is_some())
                .unwrap_or(first);
            let mode = held(&(schema.clone(), table.clone())).unwrap_or(&wait.mode);
            out.push(PidWait {
                waiter: waiter.pid,
                holder: blocker,
                table: format!("{schema}.{table}"),
                mode: mode.to_owned(),
            });
        }
    }
    out
}

impl Admin {
    /// How many wait-for graph reads `GET /api/locks` has started (all databases).
    pub fn wait_graph_reads(&self) -> u64 {
        self.wait_graphs
            .reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The wait-for graph as it is now: per database in use, the shared probe and the
    /// wait-for graph read (both rate-limited), the databases concurrently.
    pub async fn locks_view(&self) -> LocksView {
        let sessions = self.registry.snapshot();
        let Some(guard) = &self.guard else {
            return build_view(&sessions, &Probed::new(), &[], &[], None);
        };
        let databases: HashSet<&str> = sessions
            .iter()
            .filter(|s| s.backend_pid().is_some())
            .map(|s| s.client.database.as_str())
            .collect();
        self.wait_graphs.retain(&databases);
        let reads = databases.iter().map(|database| async move {
            let (facts, graph) = tokio::join!(
                self.probes.probe(guard, &self.registry, database),
                self.wait_graphs.read(guard, database),
            );
            (facts, graph.map(|graph| (*database, graph)))
        });
        let mut probed = Probed::new();
        let mut graphs = Vec::new();
        for (facts, graph) in join_all(reads).await {
            probed.extend(facts.iter().map(|(pid, f)| (*pid, f.clone())));
            graphs.extend(graph);
        }
        let settings = guard.settings();
        // The one place that knows how the rules are organised: each protected lock belongs
        // to the first rule selecting its table and the session; the soonest action due under
        // any of them is the one shown.
        let due = |session: &SessionRecord, locks: &[HeldLock], waiters: usize| {
            let who = Who::of(&session.client);
            settings
                .rules
                .governing_locks(
                    who,
                    locks.iter().map(|l| (l.schema.as_str(), l.table.as_str())),
                )
                .into_iter()
                .filter_map(|(rule, held)| {
                    due_action(
                        &rule.name,
                        &Rules::from(rule),
                        session.state(),
                        session.state_age(),
                        held,
                        waiters,
                    )
                })
                .min_by(|a, b| a.in_s.total_cmp(&b.in_s))
        };
        let guard_view = GuardView {
            dry_run: settings.rules.catch_all().dry_run,
            due: &due,
        };
        build_view(
            &sessions,
            &probed,
            &graphs,
            &settings.patterns,
            Some(guard_view),
        )
    }
}

/// A holder's due action from its session, its protected locks and how many wait behind it.
type DueFor<'a> = &'a dyn Fn(&SessionRecord, &[HeldLock], usize) -> Option<DueAction>;

/// What the view needs of the guard's settings.
struct GuardView<'a> {
    dry_run: bool,
    due: DueFor<'a>,
}

/// The view of `sessions` from what the probes and the graphs saw; `guard` is `None` without
/// a guard.
fn build_view(
    sessions: &[Arc<SessionRecord>],
    probed: &Probed,
    graphs: &[(&str, DatabaseGraph)],
    patterns: &[TablePattern],
    guard: Option<GuardView<'_>>,
) -> LocksView {
    let by_pid: HashMap<i32, &Arc<SessionRecord>> = sessions
        .iter()
        .filter_map(|s| Some((s.backend_pid()?, s)))
        .collect();
    let mut edges = Vec::new();
    let mut waited: HashMap<String, f64> = HashMap::new();
    // Backends in a protected wait that are not proxied sessions, once each.
    let mut outside: BTreeMap<i32, Node> = BTreeMap::new();
    for (database, graph) in graphs {
        let (graph, server_now) = &**graph;
        let mut id_of = |backend: Option<&GraphBackend>, pid: i32| -> String {
            let proxied = by_pid.get(&pid).filter(|s| {
                // The pid is this session's backend unless PostgreSQL shows another
                // connection under it (when the guard may read `client_port` at all).
                backend.is_none_or(|b| {
                    b.client_port.is_none()
                        || Identity::of(s).matches(b.client_port, b.backend_start)
                })
            });
            match proxied {
                Some(session) => client_node_id(session),
                None => {
                    outside
                        .entry(pid)
                        .or_insert_with(|| outside_node(pid, database, backend));
                    outside_node_id(pid)
                }
            }
        };
        for wait in protected_waits(graph, patterns) {
            let waiter_backend = graph.backends.get(&wait.waiter);
            let waiter = id_of(waiter_backend, wait.waiter);
            let holder = id_of(graph.backends.get(&wait.holder), wait.holder);
            if let Some(d) = waiter_backend.and_then(|b| b.waited(*server_now)) {
                waited.insert(waiter.clone(), seconds(d));
            }
            edges.push(Edge {
                waiter,
                holder,
                table: wait.table,
                mode: wait.mode,
            });
        }
    }
    let mut nodes: Vec<Node> = sessions
        .iter()
        .map(|session| {
            let facts = session.backend_pid().and_then(|pid| probed.get(&pid));
            let locks: Vec<LockLabel> = facts
                .map(|f| f.locks.iter().map(LockLabel::from).collect())
                .unwrap_or_default();
            let due = guard.as_ref().and_then(|g| match facts {
                Some(f) => (g.due)(session, &f.locks, f.waiters.len()),
                None => (g.due)(session, &[], 0),
            });
            let id = client_node_id(session);
            Node {
                waited_s: waited.get(&id).copied(),
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
            }
        })
        .collect();
    nodes.extend(outside.into_values().map(|mut node| {
        node.waited_s = waited.get(&node.id).copied();
        node
    }));
    LocksView {
        guard_enabled: guard.is_some(),
        dry_run: guard.is_some_and(|g| g.dry_run),
        nodes,
        edges,
    }
}

/// A backend that is not a proxied session, with what `pg_stat_activity` says of it.
fn outside_node(pid: i32, database: &str, backend: Option<&GraphBackend>) -> Node {
    Node {
        id: outside_node_id(pid),
        kind: "outside",
        client_id: None,
        backend_pid: Some(pid),
        client_addr: None,
        user: backend.and_then(|b| b.user.clone()),
        database: Some(database.to_owned()),
        application_name: backend.and_then(|b| b.application.clone()),
        state: backend.and_then(|b| b.state.clone()),
        state_age_s: None,
        xact_age_s: None,
        locks: Vec::new(),
        due: None,
        waited_s: None,
    }
}

#[cfg(test)]
mod tests;
