//! The guard: gathers facts (registry + probe), asks the policy, has the enforcer carry the
//! verdict out, and records the evidence. The proxy calls it in two places — when a client
//! is lost and for operator kills — and runs its periodic sweep; the forwarding path never
//! waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use lockguard_config::{Config, Derived, GuardConfig, Live, TablePattern, UpstreamTlsMode};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::audit::{AuditEvent, AuditLog};
use crate::budget::{BudgetFinding, BudgetMemory};
use crate::clock::Clock;
use crate::connections::{Blame, Connections, DbHealth, GuardTls};
use crate::dsn;
use crate::enforcer::{self, Identity, RequiredState, Termination};
use crate::error::GuardError;
use crate::latency::ProbeTimer;
pub use crate::latency::{ProbeLatency, PROBE_BUCKETS};
use crate::lock_graph;
use crate::policy::{LeaveReason, RuleSet, Rules, Trigger};
use crate::probe::{self, BackendFacts};
use crate::registry::Registry;
use crate::session::{SessionId, SessionRecord, TxnState};

/// SQLSTATE sent to a live client whose backend the guard terminated (`admin_shutdown`, the
/// code PostgreSQL itself uses for `pg_terminate_backend`).
pub const KILL_SQLSTATE: &str = "57P01";

/// Upper bound of everything `on_client_lost` does: the pump keeps the upstream socket open
/// until it returns, so it must return even when PostgreSQL or the network is stuck.
pub const CLIENT_LOSS_DEADLINE: Duration = Duration::from_secs(5);
/// Upper bound of an operator kill, for the same reason on the admin port.
pub const OPERATOR_DEADLINE: Duration = Duration::from_secs(5);
/// Upper bound of one probe, or of one kill with its exit wait, on an open connection. Two
/// of them fit in [`CLIENT_LOSS_DEADLINE`], so a slow kill still ends up in the audit (as an
/// error) instead of being cut off by the caller's deadline.
pub(crate) const QUERY_DEADLINE: Duration = Duration::from_secs(2);
/// Floor for the sweep period, so a zero interval set in code cannot spin.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(10);
/// Sweep reports kept for a subscriber that has not read them yet.
const SWEEP_REPORTS: usize = 64;

/// The statements every guard connection prepares when it opens: the probe and the kill with
/// its lookup, so each is one round trip. Their SQL lives with the modules that run it.
pub const STATEMENTS: &[&str] = &[
    probe::PROBE_SQL,
    enforcer::KILL_SQL,
    enforcer::LOOKUP_SQL,
    enforcer::CANCEL_SQL,
    lock_graph::LOCK_GRAPH_SQL,
];

/// What the guard did about one session. The policy's [`Verdict`](crate::policy::Verdict)
/// says what the rules ask for; this says what came of it, with the recorded event (whose
/// [`Outcome`](crate::audit::Outcome) tells how an action ended) or why nothing could be judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The backend was left alone.
    Left(LeaveReason),
    /// The guard acted, or would have (dry-run, log-only); the event tells how it went.
    Acted(Box<AuditEvent>),
    /// The guard could not judge: no working connection to the database, or it was too slow.
    Unavailable(String),
}

/// Whether the guard can currently do its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
    /// Some guard connection is down or failing: traffic flows, kills in that database wait.
    Degraded,
}

/// Health report for the admin port and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuardHealth {
    pub status: HealthStatus,
    /// The most recent error of any guard connection, prefixed with its database.
    pub last_error: Option<String>,
    /// One entry per database the guard has needed a connection to.
    pub databases: Vec<DbHealth>,
}

/// What one sweep did ([`Guard::sweep_once`], in the `sweep` module).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Sessions idle past a timeout that were probed.
    pub candidates: usize,
    /// Events recorded by this sweep.
    pub events: Vec<AuditEvent>,
    /// Candidates left alone, and why.
    pub left: Vec<(SessionId, LeaveReason)>,
    /// Databases the guard could not probe, with the reason.
    pub errors: Vec<String>,
    /// Waiters past a blocking budget, and what the budget did about their holders.
    pub budget: Vec<BudgetFinding>,
}

/// The part of the guard's configuration that can change while it runs (RELOAD, `SET
/// dry_run`), parsed: derived from the configuration in force, read once per decision, never
/// locked on the forwarding path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The rules in match order, the flat keys' catch-all last.
    pub rules: RuleSet,
    /// Every table some rule names, parsed: what the probe keeps locks on.
    pub patterns: Vec<TablePattern>,
    /// How often the sweep runs (already floored at a small minimum).
    pub sweep_interval: Duration,
    /// `guard.auth_query`: fetches a user's stored password secret.
    pub auth_query: String,
}

impl Settings {
    /// The live settings of `config`.
    pub fn from_config(config: &GuardConfig) -> Settings {
        Settings {
            rules: RuleSet::from_config(config),
            patterns: config
                .effective_rules()
                .into_iter()
                .flat_map(|r| r.tables)
                .fold(Vec::new(), |mut all, p| {
                    if !all.contains(&p) {
                        all.push(p);
                    }
                    all
                }),
            sweep_interval: config.sweep_interval.max(MIN_SWEEP_INTERVAL),
            auth_query: config.auth_query.clone(),
        }
    }
}

/// lockguard's guard. Build it once with [`Guard::new`], share the `Arc`.
#[derive(Debug)]
pub struct Guard {
    pub(crate) registry: Arc<Registry>,
    /// The configuration in force, shared with whoever changes it (the proxy's RELOAD and
    /// `SET dry_run`). The guard only reads it.
    live: Arc<Live>,
    /// Rules, protected tables, sweep period: `live`'s `[guard]`, parsed again whenever the
    /// configuration in force changes.
    settings: Derived<Settings>,
    pub(crate) connections: Connections,
    audit: AuditLog,
    probes: ProbeTimer,
    /// What the idle rules measure a session's time in its state with.
    pub(crate) clock: Clock,
    /// Sessions whose current state the sweep has already dealt with (value: the state's
    /// start), so a dry-run or a lock-free idle session is recorded or probed once, not on
    /// every tick.
    settled: Mutex<HashMap<SessionId, Instant>>,
    /// Every sweep's report, for whoever subscribed ([`Guard::sweep_reports`]).
    pub(crate) sweeps: broadcast::Sender<Arc<SweepReport>>,
    /// Waits the blocking budget has dealt with.
    pub(crate) budget: BudgetMemory,
}

impl Guard {
    /// Builds the guard with plaintext connections; does not connect yet (connections are
    /// opened per database on first need). Fails on a missing or invalid dsn, a dsn that asks
    /// for TLS, a missing password variable, or an audit log that cannot be opened.
    pub fn new(config: &GuardConfig, registry: Arc<Registry>) -> Result<Arc<Guard>, GuardError> {
        Self::with_tls(config, None, registry)
    }

    /// [`Guard::new`] with the guard's connections over `tls` (which the proxy builds from the
    /// dsn's `sslmode` or `[tls]`). Without `tls`, a dsn whose `sslmode` needs TLS is an
    /// error rather than a silent plaintext connection. Unix-socket hosts never use TLS.
    pub fn with_tls(
        config: &GuardConfig,
        tls: Option<GuardTls>,
        registry: Arc<Registry>,
    ) -> Result<Arc<Guard>, GuardError> {
        Self::with_clock(config, tls, registry, Clock::system())
    }

    /// [`Guard::with_tls`] measuring the sessions' idle time with `clock`: tests pass a
    /// [`crate::clock::ManualClock`]'s and move it past a timeout instead of sleeping.
    pub fn with_clock(
        config: &GuardConfig,
        tls: Option<GuardTls>,
        registry: Arc<Registry>,
        clock: Clock,
    ) -> Result<Arc<Guard>, GuardError> {
        let live = Live::new(Config {
            guard: config.clone(),
            ..Config::default()
        });
        Self::with_live(Arc::new(live), tls, registry, clock)
    }

    /// The guard of the configuration in force in `live`, which it follows from then on: its
    /// rules, protected tables and sweep period are those of the latest `[guard]` stored
    /// there. The connection settings (`dsn`, `password_env`) and `audit_log` are read once,
    /// here; `inflight_grace` whenever it is asked for.
    pub fn with_live(
        live: Arc<Live>,
        tls: Option<GuardTls>,
        registry: Arc<Registry>,
        clock: Clock,
    ) -> Result<Arc<Guard>, GuardError> {
        let start = live.load();
        let config = &start.guard;
        let (base, dsn_tls) = dsn::base_config(config)?;
        let tls = if dsn::only_unix_sockets(&base) {
            None
        } else {
            if tls.is_none()
                && dsn_tls.mode.is_some_and(|m| {
                    !matches!(m, UpstreamTlsMode::Disable | UpstreamTlsMode::Prefer)
                })
            {
                return Err(GuardError::TlsUnavailable);
            }
            tls
        };
        let audit = match &config.audit_log {
            Some(path) => AuditLog::with_file(path)?,
            None => AuditLog::in_memory(),
        };
        Ok(Arc::new(Guard {
            registry,
            live,
            settings: Derived::new(|config| Settings::from_config(&config.guard)),
            connections: Connections::new(base, tls, STATEMENTS),
            audit,
            probes: ProbeTimer::default(),
            clock,
            settled: Mutex::new(HashMap::new()),
            sweeps: broadcast::channel(SWEEP_REPORTS).0,
            budget: BudgetMemory::default(),
        }))
    }

    /// The rules and protected tables in force now. When the configuration in force changed
    /// since the last call, live sessions are judged afresh: the sweep forgets which ones it
    /// had already dealt with.
    pub fn settings(&self) -> Arc<Settings> {
        let (settings, fresh) = self.settings.get(&self.live);
        if fresh {
            self.settled().clear();
        }
        settings
    }

    /// The configuration the guard follows (read-only for the guard; whoever owns it stores
    /// changes there).
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// Probe latency so far.
    pub fn probe_latency(&self) -> ProbeLatency {
        self.probes.snapshot()
    }

    /// Opens (or reuses) the guard connection to the dsn's own database and runs a trivial
    /// query: the readiness check of the HTTP endpoint. Honours the reconnect backoff, so
    /// a probe storm cannot hammer a struggling server.
    pub async fn check_connection(&self) -> Result<(), GuardError> {
        let database = self.connections.home_database();
        self.connections
            .run(&database, QUERY_DEADLINE, |conn| async move {
                conn.client().simple_query("SELECT 1").await.map(|_| ())
            })
            .await
    }

    /// How long the pump waits for ReadyForQuery after losing a client with a statement in
    /// flight, before calling [`Guard::on_client_lost`] (the in-flight rule).
    pub fn inflight_grace(&self) -> Duration {
        self.live.load().guard.inflight_grace
    }

    /// The in-flight grace for `client`'s session: the longest `inflight_grace` of the rules
    /// that could govern its locks (the flat value when none could). The pump waits
    /// [`Guard::inflight_grace`] today; a per-rule grace needs it to ask this instead.
    pub fn inflight_grace_for(&self, client: &crate::session::ClientInfo) -> Duration {
        self.settings()
            .rules
            .inflight_grace_for(crate::policy::Who::of(client))
    }

    /// The parsed `protected_tables` in force now, for display on the admin port.
    pub fn protected_tables(&self) -> Vec<TablePattern> {
        self.settings().patterns.clone()
    }

    /// The flat `[guard]` keys' rule in force now (its `dry_run` is the operator's switch),
    /// for display on the admin port; [`Guard::settings`] has every rule.
    pub fn rules(&self) -> Rules {
        Rules::from(self.settings().rules.catch_all())
    }

    /// The evidence trail (ring of recent events).
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Ok, or degraded with the last error and per-database connection state.
    pub fn health(&self) -> GuardHealth {
        let databases = self.connections.health();
        let status = if databases.iter().all(|d| d.healthy) {
            HealthStatus::Ok
        } else {
            HealthStatus::Degraded
        };
        let last_error = databases
            .iter()
            .filter(|d| d.last_error.is_some())
            .max_by_key(|d| d.last_error_at)
            .and_then(|d| {
                d.last_error
                    .as_ref()
                    .map(|e| format!("database {:?}: {e}", d.database))
            });
        GuardHealth {
            status,
            last_error,
            databases,
        }
    }

    /// Called by the session pump after the client vanished (and, with a statement in
    /// flight, after waiting up to [`Guard::inflight_grace`] for ReadyForQuery): the
    /// client-loss and in-flight rules, which leave alone a session that holds no protected
    /// lock. Returns within [`CLIENT_LOSS_DEADLINE`]; the pump closes the upstream socket
    /// afterwards whatever the decision.
    pub async fn on_client_lost(&self, session: &Arc<SessionRecord>, cause: &str) -> Decision {
        let Some(pid) = session.backend_pid() else {
            return Decision::Left(LeaveReason::NoBackend);
        };
        // Outside a transaction with nothing in flight PostgreSQL holds nothing for the
        // session, and closing the socket is all it takes: no need to ask.
        if !matches!(
            session.state(),
            TxnState::Active | TxnState::IdleInTransaction | TxnState::IdleInFailedTransaction
        ) {
            return Decision::Left(LeaveReason::NoTransaction);
        }
        if self.settings().patterns.is_empty() {
            return Decision::Left(LeaveReason::NoProtectedLock);
        }
        let trigger = Trigger::ClientLoss {
            cause: cause.to_owned(),
        };
        let database = &session.client.database;
        let work = async {
            match self.probe(database, &[pid]).await {
                Ok(facts) => self.act(session, pid, trigger, facts.get(&pid)).await,
                Err(e) => Decision::Unavailable(e.to_string()),
            }
        };
        let decision = match tokio::time::timeout(CLIENT_LOSS_DEADLINE, work).await {
            Ok(decision) => decision,
            Err(_) => {
                let error = format!("guard gave up after {CLIENT_LOSS_DEADLINE:?}");
                self.connections.note_error(database, error.clone());
                Decision::Unavailable(error)
            }
        };
        match &decision {
            Decision::Left(reason) => tracing::debug!(
                session_id = session.id,
                backend_pid = pid,
                cause,
                %reason,
                "client lost; backend left alone"
            ),
            Decision::Unavailable(error) => tracing::error!(
                session_id = session.id,
                backend_pid = pid,
                database = %database,
                cause,
                %error,
                "client lost with a transaction open or a statement in flight, but the guard \
                 cannot check its locks"
            ),
            Decision::Acted(_) => {}
        }
        decision
    }

    /// Operator kill from the admin port: terminates the session's backend whether or not it
    /// holds protected locks, verified like every kill, with the live client told why.
    /// Honours `dry_run`. Returns the recorded event (its outcome says what happened).
    pub async fn kill_session(
        &self,
        session: &Arc<SessionRecord>,
        reason: &str,
    ) -> Result<AuditEvent, GuardError> {
        let pid = session
            .backend_pid()
            .ok_or(GuardError::NoBackend(session.id))?;
        let database = &session.client.database;
        let trigger = Trigger::Operator {
            reason: reason.to_owned(),
        };
        let work = async {
            let facts = self.probe(database, &[pid]).await?;
            match self.act(session, pid, trigger, facts.get(&pid)).await {
                Decision::Acted(event) => Ok(*event),
                Decision::Left(_) => Err(GuardError::KillInProgress(session.id)),
                Decision::Unavailable(reason) => Err(GuardError::Unavailable {
                    database: database.clone(),
                    reason,
                }),
            }
        };
        tokio::time::timeout(OPERATOR_DEADLINE, work)
            .await
            .map_err(|_| GuardError::Timeout {
                database: database.clone(),
                after: OPERATOR_DEADLINE,
            })?
    }

    /// Probes `pids` in `database` over the guard's connection: their granted locks on
    /// protected tables, the pids waiting behind them, and their `pg_stat_activity` state.
    pub async fn probe(
        &self,
        database: &str,
        pids: &[i32],
    ) -> Result<HashMap<i32, BackendFacts>, GuardError> {
        let settings = self.settings();
        let patterns = &settings.patterns;
        let started = Instant::now();
        let result = self
            .connections
            .run(database, QUERY_DEADLINE, |conn| async move {
                probe::probe(&conn, pids, patterns).await
            })
            .await;
        self.probes.record(started.elapsed(), result.is_ok());
        if let Ok(facts) = &result {
            self.warn_unmapped_backends(pids, facts);
        }
        result
    }

    /// A session whose backend pid PostgreSQL does not know, or knows as another
    /// connection's, is not connected to PostgreSQL directly: a pooler between lockguard and
    /// the server (PgBouncer) hands out BackendKeyData of its own, and the guard can neither
    /// see nor terminate that session's backend. Says so once per session rather than
    /// failing silently. A backend whose `client_port` the guard role may not read is not
    /// judged (that has its own warning).
    fn warn_unmapped_backends(&self, pids: &[i32], facts: &HashMap<i32, BackendFacts>) {
        for &pid in pids {
            let Some(session) = self.registry.find_by_pid(pid) else {
                continue;
            };
            let unmapped = match facts.get(&pid) {
                None => true,
                Some(f) => {
                    f.client_port.is_some()
                        && !Identity::of(&session).matches(f.client_port, f.backend_start)
                }
            };
            if unmapped && !session.kill_pending() && session.note_unmapped_backend() {
                tracing::warn!(
                    session_id = session.id,
                    backend_pid = pid,
                    database = %session.client.database,
                    "PostgreSQL has no backend {pid} connected from this session's upstream \
                     socket: lockguard is probably not connected to PostgreSQL directly. A \
                     connection pooler (e.g. PgBouncer) between lockguard and PostgreSQL \
                     hands out its own BackendKeyData, so the guard cannot see or terminate \
                     this session's backend; put lockguard between the pooler and PostgreSQL"
                );
            }
        }
    }

    /// The stored password secret of `user` (`pg_authid.rolpassword` form), fetched with
    /// `guard.auth_query` over the guard's connection to its own database (roles are
    /// cluster-wide, and a database name chosen by an unauthenticated client must not open
    /// guard connections). `None` when the query finds no row or a NULL (no password). Used by
    /// the proxy to authenticate a SCRAM client itself where a relayed exchange cannot succeed.
    ///
    /// `user` comes from an unauthenticated client: a query that fails for it is an error for
    /// that login only and leaves the guard's health alone.
    pub async fn password_secret(&self, user: &str) -> Result<Option<String>, GuardError> {
        let settings = self.settings();
        let query = settings.auth_query.as_str();
        let database = self.connections.home_database();
        self.connections
            .run_blaming(
                &database,
                QUERY_DEADLINE,
                Blame::ClientInput,
                |conn| async move {
                    let row = conn.client().query_opt(query, &[&user]).await?;
                    Ok(row.and_then(|row| row.try_get::<_, Option<String>>(0).ok().flatten()))
                },
            )
            .await
    }

    /// Terminates `pid` in `database` if it matches `identity` (and, if given, the probed
    /// `backend_start` and the `required` state), over the guard's connection. The building
    /// block of every kill; public so the identity check can be exercised directly.
    pub async fn terminate_verified(
        &self,
        database: &str,
        pid: i32,
        identity: &Identity,
        probed_start: Option<SystemTime>,
        required: Option<RequiredState<'_>>,
    ) -> Result<Termination, GuardError> {
        self.connections
            .run(database, QUERY_DEADLINE, |conn| async move {
                enforcer::terminate_verified(&conn, pid, identity, probed_start, required).await
            })
            .await
    }

    /// The sweep's record of sessions already dealt with in their current state.
    pub(crate) fn settled(&self) -> MutexGuard<'_, HashMap<SessionId, Instant>> {
        match self.settled.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_the_configuration_in_force() {
        let config = GuardConfig {
            dsn: Some("host=127.0.0.1 port=1 user=x".into()),
            protected_tables: vec!["app.user_sessions".into()],
            ..GuardConfig::default()
        };
        let guard = Guard::new(&config, Arc::new(Registry::new())).unwrap();
        assert_eq!(guard.protected_tables().len(), 1);
        assert!(!guard.rules().dry_run);
        guard.settled().insert(7, Instant::now());
        guard.live().update(|current| {
            let mut next = current.clone();
            next.guard.protected_tables = vec!["app.*".into(), "billing.invoices".into()];
            next.guard.idle_in_transaction_timeout = Duration::from_secs(5);
            next.guard.sweep_interval = Duration::ZERO;
            next
        });
        let settings = guard.settings();
        assert_eq!(settings.patterns.len(), 2);
        assert!(settings.patterns[0].matches("app", "anything"));
        assert_eq!(
            settings.rules.catch_all().idle_in_transaction_timeout,
            Duration::from_secs(5)
        );
        assert_eq!(settings.sweep_interval, MIN_SWEEP_INTERVAL);
        assert!(guard.settled().is_empty(), "judged afresh after a change");
        assert!(
            Arc::ptr_eq(&settings, &guard.settings()),
            "parsed once per change"
        );
        guard.live().update(|current| {
            let mut next = current.clone();
            next.guard.dry_run = true;
            next
        });
        assert!(guard.rules().dry_run);
        assert_eq!(guard.protected_tables().len(), 2, "dry_run leaves the rest");
    }

    #[test]
    fn guard_needs_a_dsn_and_starts_healthy() {
        let registry = Arc::new(Registry::new());
        let none = Guard::new(&GuardConfig::default(), Arc::clone(&registry));
        assert!(matches!(none, Err(GuardError::NoDsn)));
        let config = GuardConfig {
            dsn: Some("host=127.0.0.1 port=1 user=x".into()),
            protected_tables: vec!["app.user_sessions".into()],
            inflight_grace: Duration::from_millis(250),
            ..GuardConfig::default()
        };
        let guard = Guard::new(&config, registry).unwrap();
        assert_eq!(guard.inflight_grace(), Duration::from_millis(250));
        let health = guard.health();
        assert_eq!(health.status, HealthStatus::Ok);
        assert!(health.databases.is_empty() && health.last_error.is_none());
    }
}
