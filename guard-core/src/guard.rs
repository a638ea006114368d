//! The guard: gathers facts (registry + probe), asks the policy, has the enforcer carry the
//! verdict out, and records the evidence. The proxy calls it in two places — when a client
//! is lost and for operator kills — and runs its periodic sweep; the forwarding path never
//! waits for it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use futures_util::future::join_all;
use lockguard_config::{GuardConfig, TablePattern, UpstreamTlsMode};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::audit::{locks_text, rfc3339_utc, AuditEvent, AuditLog, LockEvidence, Outcome};
use crate::connections::{self, Blame, Connections, DbHealth, GuardTls};
use crate::enforcer::{self, Identity, KillOutcome, RequiredState};
use crate::error::GuardError;
use crate::policy::{self, LeaveReason, Rules, Trigger, Verdict};
use crate::probe::{self, BackendFacts};
use crate::registry::Registry;
use crate::session::{KillNotice, SessionId, SessionRecord, TxnState};

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
const QUERY_DEADLINE: Duration = Duration::from_secs(2);
/// Upper bound of one verified kill, reconnect and retry included.
const KILL_DEADLINE: Duration = Duration::from_secs(5);
/// Floor for the sweep period, so a zero interval set in code cannot spin.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(10);

/// What the guard did about one session.
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

/// What one sweep did.
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
}

/// The part of the guard's configuration that can change while it runs (RELOAD, `SET
/// dry_run`): read once per decision, swapped whole, never locked on the forwarding path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub rules: Rules,
    /// The protected tables, parsed.
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
            rules: Rules::from(config),
            patterns: config.table_patterns(),
            sweep_interval: config.sweep_interval.max(MIN_SWEEP_INTERVAL),
            auth_query: config.auth_query.clone(),
        }
    }
}

/// Upper bounds (seconds) of the probe latency histogram's buckets.
pub const PROBE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Probe round trips, timed, for the metrics endpoint. Lock-free: one atomic add per bucket.
#[derive(Debug, Default)]
struct ProbeTimer {
    /// Non-cumulative: `buckets[i]` counts probes in `(PROBE_BUCKETS[i-1], PROBE_BUCKETS[i]]`;
    /// the last slot counts those above every bound.
    buckets: [AtomicU64; PROBE_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
    errors: AtomicU64,
}

/// A copy of the probe latency histogram.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeLatency {
    /// Cumulative counts, one per [`PROBE_BUCKETS`] bound (Prometheus `le` buckets).
    pub cumulative: Vec<u64>,
    /// All probes (the `+Inf` bucket).
    pub count: u64,
    /// Total time spent probing, in seconds.
    pub sum_seconds: f64,
    /// Probes that failed (included in the counts above).
    pub errors: u64,
}

impl ProbeTimer {
    fn record(&self, elapsed: Duration, ok: bool) {
        let secs = elapsed.as_secs_f64();
        let slot = PROBE_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(PROBE_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(micros(elapsed), Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> ProbeLatency {
        let mut running = 0;
        let cumulative = self.buckets[..PROBE_BUCKETS.len()]
            .iter()
            .map(|b| {
                running += b.load(Ordering::Relaxed);
                running
            })
            .collect();
        ProbeLatency {
            cumulative,
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// lockguard's guard. Build it once with [`Guard::new`], share the `Arc`.
#[derive(Debug)]
pub struct Guard {
    registry: Arc<Registry>,
    /// Rules, protected tables, sweep period: replaced whole by [`Guard::reconfigure`].
    settings: ArcSwap<Settings>,
    inflight_grace: Duration,
    connections: Connections,
    audit: AuditLog,
    probes: ProbeTimer,
    /// Sessions whose current state the sweep has already dealt with (value: the state's
    /// start), so a dry-run or a lock-free idle session is recorded or probed once, not on
    /// every tick.
    settled: Mutex<HashMap<SessionId, Instant>>,
}

/// A session picked by the sweep.
struct Candidate {
    session: Arc<SessionRecord>,
    pid: i32,
    trigger: Trigger,
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
        let (base, dsn_tls) = connections::base_config(config)?;
        let tls = if connections::only_unix_sockets(&base) {
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
            settings: ArcSwap::from_pointee(Settings::from_config(config)),
            inflight_grace: config.inflight_grace,
            connections: Connections::new(base, tls),
            audit,
            probes: ProbeTimer::default(),
            settled: Mutex::new(HashMap::new()),
        }))
    }

    /// The rules and protected tables in force now.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// Applies the live part of a new guard configuration (RELOAD): protected tables,
    /// `on_client_loss`, both timeouts, `require_waiters`, `dry_run`, `sweep_interval`. Live
    /// sessions are judged afresh under the new rules on the next sweep. The connection
    /// settings (`dsn`, `password_env`), `audit_log` and `inflight_grace` are fixed at start.
    pub fn reconfigure(&self, config: &GuardConfig) {
        self.settings.store(Arc::new(Settings::from_config(config)));
        self.settled().clear();
        tracing::info!(
            protected_tables = ?config.protected_tables,
            dry_run = config.dry_run,
            "guard settings reloaded"
        );
    }

    /// Switches dry-run on or off (the console's `SET dry_run`); returns the previous value.
    pub fn set_dry_run(&self, on: bool) -> bool {
        let mut previous = false;
        self.settings.rcu(|current| {
            previous = current.rules.dry_run;
            let mut next = Settings::clone(current);
            next.rules.dry_run = on;
            next
        });
        if previous != on {
            self.settled().clear();
            tracing::warn!(dry_run = on, "guard dry-run switched by an operator");
        }
        previous
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
    /// flight, before calling [`Guard::on_client_lost`] (rule 2).
    pub fn inflight_grace(&self) -> Duration {
        self.inflight_grace
    }

    /// The parsed `protected_tables` in force now, for display on the admin port.
    pub fn protected_tables(&self) -> Vec<TablePattern> {
        self.settings.load().patterns.clone()
    }

    /// The rules in force now, for display on the admin port.
    pub fn rules(&self) -> Rules {
        self.settings.load().rules.clone()
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

    /// Runs the periodic sweep (rules 3 and 4) until `shutdown` is cancelled.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            // Read each time: RELOAD may change the period.
            let period = self.settings.load().sweep_interval;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(period) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.sweep_once() => {}
            }
        }
        tracing::debug!("guard sweeper stopped");
    }

    /// One pass of the sweep: every session idle in a (failed) transaction past its timeout
    /// is probed — one round trip per database — judged and, if the rules say so, terminated.
    pub async fn sweep_once(&self) -> SweepReport {
        let sessions = self.registry.snapshot();
        let in_use: HashSet<String> = sessions.iter().map(|s| s.client.database.clone()).collect();
        self.connections.maintain(&in_use).await;

        let settings = self.settings();
        let mut groups: HashMap<String, Vec<Candidate>> = HashMap::new();
        {
            let mut settled = self.settled();
            let live: HashMap<SessionId, Instant> =
                sessions.iter().map(|s| (s.id, s.state_since())).collect();
            settled.retain(|id, since| live.get(id) == Some(since));
            // Without protected tables no idle session can qualify: do not even probe.
            if settings.patterns.is_empty() {
                return SweepReport::default();
            }
            for session in sessions {
                if session.kill_pending() || settled.contains_key(&session.id) {
                    continue;
                }
                let Some(pid) = session.backend_pid() else {
                    continue;
                };
                let Some(trigger) = idle_trigger(&settings.rules, &session) else {
                    continue;
                };
                groups
                    .entry(session.client.database.clone())
                    .or_default()
                    .push(Candidate {
                        session,
                        pid,
                        trigger,
                    });
            }
        }
        let candidates = groups.values().map(Vec::len).sum();
        let per_db = join_all(
            groups
                .into_iter()
                .map(|(database, list)| self.sweep_database(database, list)),
        )
        .await;
        let mut report = SweepReport {
            candidates,
            ..SweepReport::default()
        };
        for db in per_db {
            report.events.extend(db.events);
            report.left.extend(db.left);
            report.errors.extend(db.errors);
        }
        report
    }

    async fn sweep_database(&self, database: String, candidates: Vec<Candidate>) -> SweepReport {
        let pids: Vec<i32> = candidates.iter().map(|c| c.pid).collect();
        let facts = match self.probe(&database, &pids).await {
            Ok(facts) => facts,
            Err(e) => {
                tracing::warn!(
                    database = %database,
                    sessions = candidates.len(),
                    error = %e,
                    "guard sweep could not probe; will retry"
                );
                return SweepReport {
                    errors: vec![e.to_string()],
                    ..SweepReport::default()
                };
            }
        };
        let mut report = SweepReport::default();
        for c in candidates {
            let since = c.session.state_since();
            let decision = self
                .act(&c.session, c.pid, c.trigger, facts.get(&c.pid))
                .await;
            let settle = match &decision {
                Decision::Left(reason) => reason.stable_while_idle(),
                // A failed kill is retried on the next tick; anything else is final for
                // this state of the session.
                Decision::Acted(event) => event.outcome != Outcome::Error,
                Decision::Unavailable(_) => false,
            };
            if settle {
                self.settled().insert(c.session.id, since);
            }
            match decision {
                Decision::Acted(event) => report.events.push(*event),
                Decision::Left(reason) => report.left.push((c.session.id, reason)),
                Decision::Unavailable(error) => report.errors.push(error),
            }
        }
        report
    }

    /// Called by the session pump after the client vanished (and, with a statement in
    /// flight, after waiting up to [`Guard::inflight_grace`] for ReadyForQuery): rules 1, 2
    /// and 5. Returns within [`CLIENT_LOSS_DEADLINE`]; the pump closes the upstream socket
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
        if self.settings.load().patterns.is_empty() {
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
    ) -> Result<KillOutcome, GuardError> {
        self.connections
            .run(database, QUERY_DEADLINE, |conn| async move {
                enforcer::terminate_verified(&conn, pid, identity, probed_start, required).await
            })
            .await
    }

    /// Judges one probed session and carries the verdict out.
    async fn act(
        &self,
        session: &SessionRecord,
        pid: i32,
        trigger: Trigger,
        facts: Option<&BackendFacts>,
    ) -> Decision {
        // On the server's clock, which `backend_start` is read from.
        let identity = Identity::of(session);
        let server_identity =
            identity.on_server_clock(self.connections.clock_offset(&session.client.database));
        let state = session.state();
        let policy_facts = policy::Facts {
            state,
            state_age: session.state_age(),
            backend_present: facts.is_some(),
            identity_matches: facts
                .is_some_and(|f| server_identity.matches(f.client_port, f.backend_start)),
            server_state: facts.and_then(|f| f.state.as_deref()),
            protected_locks: facts.map_or(0, |f| f.locks.len()),
            waiters: facts.map_or(0, |f| f.waiters.len()),
        };
        if facts.is_some_and(|f| f.state.is_none()) {
            tracing::warn!(
                backend_pid = pid,
                "pg_stat_activity hides this backend's state from the guard role; grant it \
                 pg_read_all_stats (and pg_signal_backend)"
            );
        }
        let rules = self.settings.load().rules.clone();
        let event = match policy::decide(&trigger, &policy_facts, &rules) {
            Verdict::Leave(reason) => return Decision::Left(reason),
            Verdict::DryRun => {
                let event = self.event(session, pid, &trigger, facts, Outcome::DryRun, None);
                self.audit.record(event.clone());
                return Decision::Acted(Box::new(event));
            }
            Verdict::LogOnly => {
                let event = self.event(session, pid, &trigger, facts, Outcome::Logged, None);
                self.audit.record(event.clone());
                return Decision::Acted(Box::new(event));
            }
            Verdict::Terminate => {
                let Some(claim) = KillClaim::acquire(session).await else {
                    return Decision::Left(LeaveReason::KillInProgress);
                };
                // The idle rules judged a state that may have ended since the probe.
                if trigger.required_server_state().is_some() && session.state() != state {
                    return Decision::Left(LeaveReason::StateChanged(session.state()));
                }
                let required = trigger.required_server_state().map(|state| RequiredState {
                    state,
                    since: facts.and_then(|f| f.state_change),
                });
                // Bounded: while the claim is held the session's output is held back.
                let killed = tokio::time::timeout(
                    KILL_DEADLINE,
                    self.terminate_verified(
                        &session.client.database,
                        pid,
                        &identity,
                        facts.and_then(|f| f.backend_start),
                        required,
                    ),
                )
                .await;
                let (outcome, error) = match killed {
                    Ok(Ok(KillOutcome::NotPermitted { reason })) => {
                        tracing::warn!(
                            session_id = session.id,
                            backend_pid = pid,
                            user = %session.client.user,
                            %reason,
                            "the guard may not terminate this backend; it keeps running"
                        );
                        (Outcome::NotPermitted, Some(reason))
                    }
                    Ok(Ok(k)) => (k.outcome(), None),
                    Ok(Err(e)) => (Outcome::Error, Some(e.to_string())),
                    Err(_) => (
                        Outcome::Error,
                        Some(format!("the kill did not finish within {KILL_DEADLINE:?}")),
                    ),
                };
                let event = self.event(session, pid, &trigger, facts, outcome, error);
                if outcome == Outcome::Terminated {
                    claim.finish(KillNotice {
                        sqlstate: KILL_SQLSTATE,
                        message: event.summary.clone(),
                    });
                }
                // Otherwise dropping the claim withdraws the kill: the session carries on.
                event
            }
        };
        self.audit.record(event.clone());
        Decision::Acted(Box::new(event))
    }

    fn event(
        &self,
        session: &SessionRecord,
        pid: i32,
        trigger: &Trigger,
        facts: Option<&BackendFacts>,
        outcome: Outcome,
        error: Option<String>,
    ) -> AuditEvent {
        let locks: Vec<_> = facts
            .map(|f| f.locks.iter().map(|l| l.evidence()).collect())
            .unwrap_or_default();
        let waiter_pids = facts.map(|f| f.waiters.clone()).unwrap_or_default();
        let state = session.state();
        let state_age = session.state_age();
        let summary = summary(SummaryParts {
            outcome,
            pid,
            trigger,
            state,
            state_age,
            locks: &locks,
            waiters: waiter_pids.len(),
            error: error.as_deref(),
        });
        AuditEvent {
            time: rfc3339_utc(SystemTime::now()),
            trigger: trigger.name().to_owned(),
            cause: trigger.detail().map(str::to_owned),
            session_id: session.id,
            client_addr: session.client.addr.to_string(),
            user: session.client.user.clone(),
            database: session.client.database.clone(),
            application_name: session.client.application_name.clone(),
            backend_pid: pid,
            locks,
            waiters: waiter_pids.len(),
            waiter_pids,
            state: state.as_str().to_owned(),
            idle_ms: millis(state_age),
            xact_ms: session.xact_age().map(millis),
            last_statement: session.last_statement(),
            outcome,
            error,
            dry_run: outcome == Outcome::DryRun,
            summary,
        }
    }

    fn settled(&self) -> MutexGuard<'_, HashMap<SessionId, Instant>> {
        match self.settled.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Which idle rule, if any, the session has crossed by the proxy's clock.
fn idle_trigger(rules: &Rules, session: &SessionRecord) -> Option<Trigger> {
    let (trigger, timeout) = match session.state() {
        TxnState::IdleInTransaction => (
            Trigger::IdleInTransaction,
            rules.idle_in_transaction_timeout,
        ),
        TxnState::IdleInFailedTransaction => {
            (Trigger::FailedTransaction, rules.failed_transaction_timeout)
        }
        _ => return None,
    };
    (!timeout.is_zero() && session.state_age() > timeout).then_some(trigger)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Holds a session's `begin_kill` for the duration of one kill; dropping it without
/// [`KillClaim::finish`] withdraws the kill, so a cancelled or failed kill (timeout, identity
/// mismatch, error) never leaves the pump holding back the server's bytes.
struct KillClaim<'a> {
    session: &'a SessionRecord,
    finished: bool,
}

impl<'a> KillClaim<'a> {
    /// Claims the session, waiting out a kill already under way: if that one ends the
    /// session there is nothing left to do (`None`); if it was withdrawn, claim it now.
    async fn acquire(session: &'a SessionRecord) -> Option<KillClaim<'a>> {
        if !session.begin_kill() {
            session.kill_resolved().await?;
            if !session.begin_kill() {
                return None;
            }
        }
        Some(KillClaim {
            session,
            finished: false,
        })
    }

    fn finish(mut self, notice: KillNotice) {
        self.finished = true;
        self.session.finish_kill(notice);
    }
}

impl Drop for KillClaim<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.session.abort_kill();
        }
    }
}

struct SummaryParts<'a> {
    outcome: Outcome,
    pid: i32,
    trigger: &'a Trigger,
    state: TxnState,
    state_age: Duration,
    locks: &'a [LockEvidence],
    waiters: usize,
    error: Option<&'a str>,
}

/// One sentence for humans; for a terminated live client it is the FATAL message it gets:
/// `lockguard: terminated backend 1234: idle in transaction for 2.1s holding RowShareLock on
/// app.user_sessions; 1 session waiting`.
fn summary(p: SummaryParts<'_>) -> String {
    let verb = match p.outcome {
        Outcome::Terminated => "terminated",
        Outcome::DryRun => "would terminate (dry run)",
        Outcome::Logged => "would terminate (on_client_loss = log)",
        _ => "did not terminate",
    };
    let age = p.state_age.as_secs_f64();
    let why = match p.trigger {
        Trigger::IdleInTransaction => format!("idle in transaction for {age:.1}s"),
        Trigger::FailedTransaction => format!("idle in failed transaction for {age:.1}s"),
        Trigger::ClientLoss { cause } => match p.state {
            TxnState::Active => {
                format!("client lost ({cause}) with a statement running for {age:.1}s")
            }
            _ => format!("client lost ({cause}) after {age:.1}s {}", p.state),
        },
        Trigger::Operator { reason } => {
            format!("{reason}, after {age:.1}s {}", p.state)
        }
    };
    let locks = if p.locks.is_empty() {
        "no protected lock".to_owned()
    } else {
        locks_text(p.locks)
    };
    let waiters = match p.waiters {
        0 => "no session waiting".to_owned(),
        1 => "1 session waiting".to_owned(),
        n => format!("{n} sessions waiting"),
    };
    // An operator's kill says so first: that is what the client's user needs to know.
    let mut text = match p.trigger {
        Trigger::Operator { .. } => format!(
            "lockguard: {verb} by operator: backend {}: {why} holding {locks}; {waiters}",
            p.pid
        ),
        _ => format!(
            "lockguard: {verb} backend {}: {why} holding {locks}; {waiters}",
            p.pid
        ),
    };
    match (p.outcome, p.error) {
        (Outcome::Error, Some(e)) => text.push_str(&format!(" (error: {e})")),
        (Outcome::NotPermitted, Some(e)) => text.push_str(&format!(" (not permitted: {e})")),
        (
            Outcome::AlreadyGone
            | Outcome::IdentityMismatch
            | Outcome::NoLongerIdle
            | Outcome::NotPermitted,
            _,
        ) => text.push_str(&format!(" ({})", p.outcome)),
        _ => {}
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(
        outcome: Outcome,
        trigger: &'a Trigger,
        locks: &'a [LockEvidence],
    ) -> SummaryParts<'a> {
        SummaryParts {
            outcome,
            pid: 1234,
            trigger,
            state: TxnState::IdleInTransaction,
            state_age: Duration::from_millis(2100),
            locks,
            waiters: 1,
            error: None,
        }
    }

    #[test]
    fn kill_message_names_trigger_table_mode_idle_time_and_waiters() {
        let locks = [LockEvidence {
            table: "app.user_sessions".to_owned(),
            mode: "RowShareLock".to_owned(),
        }];
        let text = summary(parts(
            Outcome::Terminated,
            &Trigger::IdleInTransaction,
            &locks,
        ));
        assert_eq!(
            text,
            "lockguard: terminated backend 1234: idle in transaction for 2.1s holding \
             RowShareLock on app.user_sessions; 1 session waiting"
        );
    }

    #[test]
    fn non_kills_say_so() {
        let trigger = Trigger::ClientLoss {
            cause: "connection reset".into(),
        };
        let dry = summary(parts(Outcome::DryRun, &trigger, &[]));
        assert!(
            dry.starts_with(
                "lockguard: would terminate (dry run) backend 1234: client lost (connection reset)"
            ),
            "{dry}"
        );
        assert!(dry.contains("holding no protected lock"), "{dry}");
        let mismatch = summary(parts(Outcome::IdentityMismatch, &trigger, &[]));
        assert!(mismatch.ends_with("(identity mismatch)"), "{mismatch}");
        let err = summary(SummaryParts {
            error: Some("boom"),
            waiters: 3,
            ..parts(Outcome::Error, &trigger, &[])
        });
        assert!(err.contains("3 sessions waiting (error: boom)"), "{err}");
    }

    #[test]
    fn settings_change_live_and_dry_run_can_be_flipped() {
        let config = GuardConfig {
            dsn: Some("host=127.0.0.1 port=1 user=x".into()),
            protected_tables: vec!["app.user_sessions".into()],
            ..GuardConfig::default()
        };
        let guard = Guard::new(&config, Arc::new(Registry::new())).unwrap();
        assert_eq!(guard.protected_tables().len(), 1);
        assert!(!guard.rules().dry_run);
        guard.reconfigure(&GuardConfig {
            protected_tables: vec!["app.*".into(), "billing.invoices".into()],
            idle_in_transaction_timeout: Duration::from_secs(5),
            sweep_interval: Duration::ZERO,
            ..config.clone()
        });
        let settings = guard.settings();
        assert_eq!(settings.patterns.len(), 2);
        assert!(settings.patterns[0].matches("app", "anything"));
        assert_eq!(
            settings.rules.idle_in_transaction_timeout,
            Duration::from_secs(5)
        );
        assert_eq!(settings.sweep_interval, MIN_SWEEP_INTERVAL);
        assert!(!guard.set_dry_run(true), "was off");
        assert!(guard.rules().dry_run);
        assert_eq!(guard.protected_tables().len(), 2, "dry_run leaves the rest");
        assert!(guard.set_dry_run(false), "was on");
    }

    #[test]
    fn probe_latency_is_a_cumulative_histogram() {
        let timer = ProbeTimer::default();
        timer.record(Duration::from_micros(500), true);
        timer.record(Duration::from_millis(30), true);
        timer.record(Duration::from_secs(9), false);
        let h = timer.snapshot();
        assert_eq!(h.count, 3);
        assert_eq!(h.errors, 1);
        assert_eq!(h.cumulative.len(), PROBE_BUCKETS.len());
        assert_eq!(h.cumulative[0], 1, "<= 1ms");
        assert_eq!(h.cumulative[5], 2, "<= 50ms");
        assert_eq!(*h.cumulative.last().unwrap(), 2, "9s is above every bound");
        assert!((h.sum_seconds - 9.0305).abs() < 1e-6, "{}", h.sum_seconds);
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
