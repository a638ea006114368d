//! The admin commands: the parser (a pure function, also run by a fuzz target), the result
//! tables with their stable column names, and the execution against the proxy's state. The
//! console sends every statement here; the HTTP endpoint runs the same commands and renders
//! the same tables as JSON.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use guard_core::{AuditEvent, GuardError, Outcome, SessionId, SessionRecord, Trigger};
use lockguard_config::AdminRole;

use super::probes::Probed;
use super::{config_view, Admin, Login};

/// The hint of every syntax error: all commands, as an operator types them.
pub const COMMANDS_HINT: &str = "admin commands: SHOW CLIENTS | SHOW LOCKS | SHOW EVENTS | \
SHOW STATS | SHOW CONFIG | SHOW VERSION | KILL <client_id> | KILL PID <backend_pid> | RELOAD | \
SET dry_run = on|off";

/// Longest piece of an unknown command quoted back in the error, in characters.
const MAX_ECHO: usize = 64;

/// One admin command, as parsed from the console (or built by the HTTP endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ShowClients,
    ShowLocks,
    ShowEvents,
    ShowStats,
    ShowConfig,
    ShowVersion,
    Kill(KillTarget),
    Reload,
    SetDryRun(bool),
}

/// Which session `KILL` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillTarget {
    /// `KILL <client_id>`: the `id` column of `SHOW CLIENTS`.
    Client(SessionId),
    /// `KILL PID <backend_pid>`: the PostgreSQL backend serving the session.
    Pid(i32),
}

impl fmt::Display for KillTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KillTarget::Client(id) => write!(f, "client {id}"),
            KillTarget::Pid(pid) => write!(f, "backend pid {pid}"),
        }
    }
}

/// Why an admin command was refused or failed. Each maps to a SQLSTATE for the console and an
/// HTTP status for the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// Not a command, or a malformed one.
    #[error("{0}")]
    Syntax(String),
    /// The command needs the `admin` role.
    #[error("permission denied: {command} needs role admin; user {user:?} has role {role}")]
    PermissionDenied {
        command: &'static str,
        user: String,
        role: &'static str,
    },
    /// The command cannot run in this setup (no guard, no config file to re-read).
    #[error("{0}")]
    Unavailable(String),
    /// RELOAD found a problem; nothing was changed.
    #[error("RELOAD failed, the running configuration is unchanged: {0}")]
    Reload(String),
}

impl AdminError {
    /// The SQLSTATE the console reports.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AdminError::Syntax(_) => "42601",
            AdminError::PermissionDenied { .. } => "42501",
            AdminError::Unavailable(_) => "55000",
            AdminError::Reload(_) => "F0000",
        }
    }

    /// A hint for the operator, where one helps.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            AdminError::Syntax(_) => Some(COMMANDS_HINT),
            _ => None,
        }
    }
}

fn syntax(message: impl Into<String>) -> AdminError {
    AdminError::Syntax(message.into())
}

/// `text` cut to [`MAX_ECHO`] characters, for quoting input back safely.
fn echo(text: &str) -> String {
    let mut out: String = text.chars().take(MAX_ECHO).collect();
    if text.chars().nth(MAX_ECHO).is_some() {
        out.push_str("...");
    }
    out
}

fn is(word: &str, keyword: &str) -> bool {
    word.eq_ignore_ascii_case(keyword)
}

impl Command {
    /// Parses one console statement: keywords in any case, words separated by any
    /// whitespace, one optional trailing semicolon. Never panics, whatever the input.
    pub fn parse(text: &str) -> Result<Command, AdminError> {
        let body = text.trim();
        let body = body.strip_suffix(';').unwrap_or(body);
        // `SET dry_run=on`: the `=` may touch its neighbours.
        let spaced = body.replace('=', " = ");
        let words: Vec<&str> = spaced.split_whitespace().collect();
        match words.as_slice() {
            [] => Err(syntax("empty admin command")),
            [show, what] if is(show, "SHOW") => Self::parse_show(what),
            [show, ..] if is(show, "SHOW") => Err(syntax(format!(
                "SHOW takes one word, not {:?}",
                echo(body)
            ))),
            [kill, id] if is(kill, "KILL") => id
                .parse::<SessionId>()
                .map(|id| Command::Kill(KillTarget::Client(id)))
                .map_err(|_| {
                    syntax(format!(
                        "KILL needs a client id (the id column of SHOW CLIENTS) or PID <backend_pid>, not {:?}",
                        echo(id)
                    ))
                }),
            [kill, pid, number] if is(kill, "KILL") && is(pid, "PID") => number
                .parse::<i32>()
                .ok()
                .filter(|pid| *pid > 0)
                .map(|pid| Command::Kill(KillTarget::Pid(pid)))
                .ok_or_else(|| {
                    syntax(format!(
                        "KILL PID needs a backend pid (a positive number), not {:?}",
                        echo(number)
                    ))
                }),
            [kill, ..] if is(kill, "KILL") => Err(syntax(
                "KILL needs a client id (KILL 7) or a backend pid (KILL PID 12345)",
            )),
            [reload] if is(reload, "RELOAD") => Ok(Command::Reload),
            [set, name, to, value]
                if is(set, "SET") && is(name, "dry_run") && (*to == "=" || is(to, "TO")) =>
            {
                parse_switch(value).map(Command::SetDryRun).ok_or_else(|| {
                    syntax(format!("SET dry_run takes on or off, not {:?}", echo(value)))
                })
            }
            [set, ..] if is(set, "SET") => Err(syntax(
                "the only setting that can be SET is dry_run: SET dry_run = on|off",
            )),
            _ => Err(syntax(format!("unknown admin command {:?}", echo(body)))),
        }
    }

    fn parse_show(what: &str) -> Result<Command, AdminError> {
        let command = match what.to_ascii_uppercase().as_str() {
            "CLIENTS" => Command::ShowClients,
            "LOCKS" => Command::ShowLocks,
            "EVENTS" => Command::ShowEvents,
            "STATS" => Command::ShowStats,
            "CONFIG" => Command::ShowConfig,
            "VERSION" => Command::ShowVersion,
            _ => {
                return Err(syntax(format!(
                    "unknown SHOW {:?}; SHOW CLIENTS, LOCKS, EVENTS, STATS, CONFIG or VERSION",
                    echo(what)
                )))
            }
        };
        Ok(command)
    }

    /// The command's name, as in messages and the command tag.
    pub fn name(&self) -> &'static str {
        match self {
            Command::ShowClients => "SHOW CLIENTS",
            Command::ShowLocks => "SHOW LOCKS",
            Command::ShowEvents => "SHOW EVENTS",
            Command::ShowStats => "SHOW STATS",
            Command::ShowConfig => "SHOW CONFIG",
            Command::ShowVersion => "SHOW VERSION",
            Command::Kill(_) => "KILL",
            Command::Reload => "RELOAD",
            Command::SetDryRun(_) => "SET",
        }
    }

    /// Whether only the `admin` role may run it (everything but SHOW).
    pub fn needs_admin(&self) -> bool {
        matches!(
            self,
            Command::Kill(_) | Command::Reload | Command::SetDryRun(_)
        )
    }

    /// The columns of the command's result, known before it runs (the extended protocol
    /// describes a statement before executing it).
    pub fn columns(&self) -> &'static [Column] {
        match self {
            Command::ShowClients => CLIENTS,
            Command::ShowLocks => LOCKS,
            Command::ShowEvents => EVENTS,
            Command::ShowStats => STATS,
            Command::ShowConfig => CONFIG,
            Command::ShowVersion => VERSION,
            Command::Kill(_) => KILL,
            Command::Reload => RELOAD,
            Command::SetDryRun(_) => SET,
        }
    }

    /// The command tag the console sends (`SHOW`, `KILL`, ...).
    pub fn tag(&self) -> &'static str {
        self.name().split(' ').next().unwrap_or("SHOW")
    }
}

/// `on` / `off` and the other spellings PostgreSQL accepts for a boolean setting.
fn parse_switch(value: &str) -> Option<bool> {
    let value = value
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .unwrap_or(value);
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

// ---- result tables ---------------------------------------------------------------------

/// The type of a result column (PostgreSQL's `text`, `int4`, `int8`, `float8`, `bool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Text,
    Int4,
    Int8,
    Float8,
    Bool,
}

/// A result column: its documented name and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub kind: ColumnType,
}

const fn col(name: &'static str, kind: ColumnType) -> Column {
    Column { name, kind }
}

use ColumnType::{Bool, Float8, Int4, Int8, Text};

/// `SHOW CLIENTS` and `GET /api/clients`.
pub const CLIENTS: &[Column] = &[
    col("id", Int8),
    col("client_addr", Text),
    col("client_port", Int4),
    col("user", Text),
    col("database", Text),
    col("application_name", Text),
    col("backend_pid", Int4),
    col("state", Text),
    col("xact_age_s", Float8),
    col("state_age_s", Float8),
    col("protected_locks", Int4),
    col("waiters", Int4),
    col("last_statement", Text),
];

/// `SHOW LOCKS`: one row per protected lock held by a proxied session.
pub const LOCKS: &[Column] = &[
    col("client_id", Int8),
    col("backend_pid", Int4),
    col("table", Text),
    col("mode", Text),
    col("waiters", Int4),
];

/// `SHOW EVENTS` and `GET /api/events`: the audit ring, newest first.
pub const EVENTS: &[Column] = &[
    col("time", Text),
    col("client_id", Int8),
    col("backend_pid", Int4),
    col("trigger", Text),
    col("cause", Text),
    col("outcome", Text),
    col("locks", Text),
    col("waiters", Int4),
    col("state", Text),
    col("idle_ms", Int8),
    col("xact_ms", Int8),
    col("user", Text),
    col("database", Text),
    col("client_addr", Text),
    col("application_name", Text),
    col("last_statement", Text),
    col("error", Text),
    col("summary", Text),
];

/// `SHOW STATS`: one counter per row.
pub const STATS: &[Column] = &[col("name", Text), col("value", Int8)];

/// `SHOW CONFIG`: every setting, secrets masked, and whether RELOAD changes it.
pub const CONFIG: &[Column] = &[col("key", Text), col("value", Text), col("live", Bool)];

/// `SHOW VERSION`.
pub const VERSION: &[Column] = &[col("version", Text)];

/// `KILL`: what happened.
pub const KILL: &[Column] = &[
    col("client_id", Int8),
    col("backend_pid", Int4),
    col("outcome", Text),
    col("detail", Text),
];

/// `RELOAD`: each setting the file changed, and whether it took effect.
pub const RELOAD: &[Column] = &[
    col("key", Text),
    col("old_value", Text),
    col("new_value", Text),
    col("status", Text),
];

/// `SET dry_run`.
pub const SET: &[Column] = &[col("name", Text), col("value", Text), col("previous", Text)];

/// One cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Value {
    fn text(s: impl Into<String>) -> Value {
        Value::Text(s.into())
    }

    fn opt_text(s: Option<impl Into<String>>) -> Value {
        s.map_or(Value::Null, |s| Value::Text(s.into()))
    }

    fn int(n: impl TryInto<i64>) -> Value {
        n.try_into().map_or(Value::Null, Value::Int)
    }

    fn opt_int(n: Option<impl TryInto<i64>>) -> Value {
        n.map_or(Value::Null, Value::int)
    }

    /// Seconds with millisecond precision.
    fn seconds(d: Duration) -> Value {
        Value::Float(d.as_millis() as f64 / 1000.0)
    }
}

/// A command's answer: a result set with the command's columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub tag: &'static str,
    pub columns: &'static [Column],
    pub rows: Vec<Vec<Value>>,
}

impl Table {
    fn new(command: &Command) -> Table {
        Table {
            tag: command.tag(),
            columns: command.columns(),
            rows: Vec::new(),
        }
    }

    fn with_rows(command: &Command, rows: Vec<Vec<Value>>) -> Table {
        Table {
            rows,
            ..Table::new(command)
        }
    }

    /// The rows as JSON objects keyed by column name (the HTTP API's form).
    pub fn to_json(&self) -> serde_json::Value {
        let rows = self
            .rows
            .iter()
            .map(|row| {
                let object = self
                    .columns
                    .iter()
                    .zip(row)
                    .map(|(column, value)| {
                        let json = match value {
                            Value::Null => serde_json::Value::Null,
                            Value::Text(s) => serde_json::Value::from(s.as_str()),
                            Value::Int(n) => serde_json::Value::from(*n),
                            Value::Float(x) => serde_json::Value::from(*x),
                            Value::Bool(b) => serde_json::Value::from(*b),
                        };
                        (column.name.to_owned(), json)
                    })
                    .collect();
                serde_json::Value::Object(object)
            })
            .collect();
        serde_json::Value::Array(rows)
    }
}

// ---- execution -------------------------------------------------------------------------

/// What a KILL found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillResult {
    /// The guard decided; its audit event's outcome (`terminated`, `dry_run`,
    /// `identity_mismatch`, `already_gone`, `not_permitted`, `error`, ...).
    Audited(Outcome),
    /// No live session matches.
    NotFound,
    /// The session has no backend yet (still authenticating).
    NoBackend,
    /// Another kill of this session is under way.
    InProgress,
    /// The guard could not act (its connection is down, or it was too slow).
    Failed,
}

impl KillResult {
    /// The `outcome` column, spelled like [`Outcome::as_str`].
    pub fn as_str(&self) -> &'static str {
        match self {
            KillResult::Audited(outcome) => outcome.as_str(),
            KillResult::NotFound => "not_found",
            KillResult::NoBackend => "no_backend",
            KillResult::InProgress => "kill_in_progress",
            KillResult::Failed => "error",
        }
    }
}

/// The answer to a KILL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillReport {
    pub client_id: Option<SessionId>,
    pub backend_pid: Option<i32>,
    pub result: KillResult,
    /// The audit event's summary, or why nothing happened.
    pub detail: String,
}

impl KillReport {
    fn row(&self) -> Vec<Value> {
        vec![
            Value::opt_int(self.client_id),
            Value::opt_int(self.backend_pid),
            Value::text(self.result.as_str()),
            Value::text(&self.detail),
        ]
    }
}

/// One setting a RELOAD found different in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    pub key: String,
    /// Display values, secrets masked; `None` when unset.
    pub old: Option<String>,
    pub new: Option<String>,
    /// Applied now (true) or only after a restart (false).
    pub live: bool,
}

impl ConfigChange {
    fn row(&self) -> Vec<Value> {
        vec![
            Value::text(&self.key),
            Value::opt_text(self.old.clone()),
            Value::opt_text(self.new.clone()),
            Value::text(if self.live {
                "applied"
            } else {
                "needs restart"
            }),
        ]
    }
}

/// How long a readiness answer is reused (counted from the start of its check).
pub const READINESS_REUSE: Duration = Duration::from_secs(1);

/// Whether the proxy can serve: upstream reachable, guard connected (when configured).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// `null` when fine, otherwise why not.
    pub upstream_error: Option<String>,
    /// Whether the guard is configured at all.
    pub guard_enabled: bool,
    pub guard_error: Option<String>,
}

impl Admin {
    /// Runs `command` for `login`: the single entry point of both front ends.
    pub async fn execute(&self, command: &Command, login: &Login) -> Result<Table, AdminError> {
        if command.needs_admin() && login.role != AdminRole::Admin {
            return Err(AdminError::PermissionDenied {
                command: command.name(),
                user: login.user.clone(),
                role: login.role.as_str(),
            });
        }
        let rows = match command {
            Command::ShowClients => self.clients_rows().await,
            Command::ShowLocks => self.lock_rows().await,
            Command::ShowEvents => self.events().iter().map(event_row).collect(),
            Command::ShowStats => self.stats_rows(),
            Command::ShowConfig => config_rows(&self.config()),
            Command::ShowVersion => vec![vec![Value::text(version())]],
            Command::Kill(target) => vec![self.kill(*target, login).await?.row()],
            Command::Reload => self.reload().await?.iter().map(ConfigChange::row).collect(),
            Command::SetDryRun(on) => vec![self.set_dry_run(*on)?],
        };
        Ok(Table::with_rows(command, rows))
    }

    /// Terminates the backend of one session through the guard's verified kill; the live
    /// client is told why (57P01) and an audit event is recorded.
    pub async fn kill(&self, target: KillTarget, login: &Login) -> Result<KillReport, AdminError> {
        let guard = self.guard.as_ref().ok_or_else(|| {
            AdminError::Unavailable(
                "KILL needs the guard, which is disabled (set guard.dsn)".to_owned(),
            )
        })?;
        let session = match target {
            KillTarget::Client(id) => self.registry.get(id),
            KillTarget::Pid(pid) => self.registry.find_by_pid(pid),
        };
        let Some(session) = session else {
            return Ok(KillReport {
                client_id: match target {
                    KillTarget::Client(id) => Some(id),
                    KillTarget::Pid(_) => None,
                },
                backend_pid: match target {
                    KillTarget::Pid(pid) => Some(pid),
                    KillTarget::Client(_) => None,
                },
                result: KillResult::NotFound,
                detail: format!("no live session with {target}"),
            });
        };
        let reason = format!("KILL by {} on the {}", login.user, login.origin);
        tracing::info!(
            session_id = session.id,
            backend_pid = session.backend_pid(),
            user = %login.user,
            origin = %login.origin,
            "operator kill requested"
        );
        let (result, detail) = match guard.kill_session(&session, &reason).await {
            Ok(event) => (KillResult::Audited(event.outcome), event.summary),
            Err(e @ GuardError::NoBackend(_)) => (KillResult::NoBackend, e.to_string()),
            Err(e @ GuardError::KillInProgress(_)) => (KillResult::InProgress, e.to_string()),
            Err(e) => (KillResult::Failed, e.to_string()),
        };
        Ok(KillReport {
            client_id: Some(session.id),
            backend_pid: session.backend_pid(),
            result,
            detail,
        })
    }

    /// The audit ring, newest first (empty without a guard).
    pub fn events(&self) -> Vec<AuditEvent> {
        let mut events = self
            .guard
            .as_ref()
            .map(|g| g.audit().recent())
            .unwrap_or_default();
        events.reverse();
        events
    }

    /// Upstream reachable (a TCP or unix-socket connect) and, with a guard, its connection
    /// to the dsn's database working. One check at a time, and its answer is reused for
    /// [`READINESS_REUSE`]: every upstream connect forks a PostgreSQL backend, and frequent
    /// probes (or a flood of them) should not cost one each.
    pub async fn readiness(&self) -> Readiness {
        let mut last = self.last_readiness.lock().await;
        if let Some((started, readiness)) = last.as_ref() {
            if started.elapsed() < READINESS_REUSE {
                return readiness.clone();
            }
        }
        let started = tokio::time::Instant::now();
        let readiness = self.check_readiness().await;
        *last = Some((started, readiness.clone()));
        readiness
    }

    async fn check_readiness(&self) -> Readiness {
        let config = self.config();
        let upstream =
            crate::upstream::connect(&config.proxy.upstream, None, config.proxy.connect_timeout);
        let guard = async {
            match &self.guard {
                Some(guard) => guard.check_connection().await.map_err(|e| e.to_string()),
                None => Ok(()),
            }
        };
        let (upstream, guard) = tokio::join!(upstream, guard);
        let upstream_error = upstream.err();
        let guard_error = guard.err();
        Readiness {
            ready: upstream_error.is_none() && guard_error.is_none(),
            upstream_error,
            guard_enabled: self.guard.is_some(),
            guard_error,
        }
    }

    fn set_dry_run(&self, on: bool) -> Result<Vec<Value>, AdminError> {
        let guard = self.guard.as_ref().ok_or_else(|| {
            AdminError::Unavailable(
                "the guard is disabled (set guard.dsn): no dry_run to switch".to_owned(),
            )
        })?;
        let previous = guard.set_dry_run(on);
        // Keep SHOW CONFIG truthful: the running configuration now has this value.
        self.config.rcu(|current| {
            let mut next = lockguard_config::Config::clone(current);
            next.guard.dry_run = on;
            next
        });
        let word = |b: bool| if b { "on" } else { "off" };
        Ok(vec![
            Value::text("dry_run"),
            Value::text(word(on)),
            Value::text(word(previous)),
        ])
    }

    /// Live facts of the backends of `sessions`: one shared, rate-limited probe per
    /// database ([`super::probes`]), the databases concurrently. A database the guard cannot
    /// reach is left out (its sessions show NULL).
    async fn probe(&self, sessions: &[Arc<SessionRecord>]) -> Probed {
        let Some(guard) = &self.guard else {
            return Probed::new();
        };
        let databases: HashSet<&str> = sessions
            .iter()
            .filter(|s| s.backend_pid().is_some())
            .map(|s| s.client.database.as_str())
            .collect();
        self.probes.retain(&databases);
        let probes = databases
            .iter()
            .map(|database| self.probes.probe(guard, &self.registry, database));
        let mut probed = Probed::new();
        for facts in join_all(probes).await {
            probed.extend(facts.iter().map(|(pid, f)| (*pid, f.clone())));
        }
        probed
    }

    async fn clients_rows(&self) -> Vec<Vec<Value>> {
        let sessions = self.registry.snapshot();
        let probed = self.probe(&sessions).await;
        sessions
            .iter()
            .map(|s| {
                let facts = s.backend_pid().and_then(|pid| probed.get(&pid));
                vec![
                    Value::int(s.id),
                    Value::text(s.client.addr.ip().to_string()),
                    Value::int(s.client.addr.port()),
                    Value::text(&s.client.user),
                    Value::text(&s.client.database),
                    Value::text(&s.client.application_name),
                    Value::opt_int(s.backend_pid()),
                    Value::text(s.state().as_str()),
                    s.xact_age().map_or(Value::Null, Value::seconds),
                    Value::seconds(s.state_age()),
                    Value::opt_int(facts.map(|f| f.locks.len())),
                    Value::opt_int(facts.map(|f| f.waiters.len())),
                    Value::text(s.last_statement()),
                ]
            })
            .collect()
    }

    async fn lock_rows(&self) -> Vec<Vec<Value>> {
        let sessions = self.registry.snapshot();
        let probed = self.probe(&sessions).await;
        let mut rows = Vec::new();
        for s in &sessions {
            let Some(facts) = s.backend_pid().and_then(|pid| probed.get(&pid)) else {
                continue;
            };
            for lock in &facts.locks {
                rows.push(vec![
                    Value::int(s.id),
                    Value::int(facts.pid),
                    Value::text(lock.qualified_table()),
                    Value::text(&lock.mode),
                    Value::int(facts.waiters.len()),
                ]);
            }
        }
        rows
    }

    fn stats_rows(&self) -> Vec<Vec<Value>> {
        let stats = self.stats.snapshot(&self.registry);
        let mut rows: Vec<(String, u64)> = vec![
            ("clients_accepted".into(), stats.clients_accepted),
            ("clients_refused".into(), stats.clients_refused),
            ("clients_active".into(), self.registry.len() as u64),
            ("startup_rejected".into(), stats.startup_rejected),
            ("startup_timeouts".into(), stats.startup_timeouts),
            (
                "upstream_connect_errors".into(),
                stats.upstream_connect_errors,
            ),
            ("cancel_requests".into(), stats.cancel_requests),
            ("sessions_started".into(), stats.sessions_started),
            ("sessions_ended".into(), stats.sessions_ended),
            ("bytes_from_clients".into(), stats.bytes_from_clients),
            ("bytes_from_servers".into(), stats.bytes_from_servers),
        ];
        if let Some(guard) = &self.guard {
            let latency = guard.probe_latency();
            rows.push(("probes".into(), latency.count));
            rows.push(("probe_errors".into(), latency.errors));
            rows.push((
                "probe_time_us".into(),
                (latency.sum_seconds * 1e6).round() as u64,
            ));
            let counts = guard.audit().counts();
            for trigger in trigger_names() {
                let terminated = counts
                    .iter()
                    .filter(|(t, o, _)| t == trigger && *o == Outcome::Terminated)
                    .map(|(_, _, n)| n)
                    .sum();
                rows.push((format!("terminations.{trigger}"), terminated));
            }
            for (trigger, outcome, n) in counts {
                rows.push((format!("events.{trigger}.{}", outcome.as_str()), n));
            }
        }
        rows.into_iter()
            .map(|(name, value)| vec![Value::text(name), Value::int(value)])
            .collect()
    }
}

/// Every trigger's name, in a stable order, so counters show zeros too.
pub fn trigger_names() -> [&'static str; 4] {
    [
        Trigger::ClientLoss {
            cause: String::new(),
        }
        .name(),
        Trigger::IdleInTransaction.name(),
        Trigger::FailedTransaction.name(),
        Trigger::Operator {
            reason: String::new(),
        }
        .name(),
    ]
}

/// `lockguard <version>`.
pub fn version() -> String {
    format!("lockguard {}", env!("CARGO_PKG_VERSION"))
}

fn event_row(e: &AuditEvent) -> Vec<Value> {
    let locks = guard_core::audit::locks_text(&e.locks);
    vec![
        Value::text(&e.time),
        Value::int(e.session_id),
        Value::int(e.backend_pid),
        Value::text(&e.trigger),
        Value::opt_text(e.cause.clone()),
        Value::text(e.outcome.as_str()),
        Value::text(locks),
        Value::int(e.waiters),
        Value::text(&e.state),
        Value::int(e.idle_ms),
        Value::opt_int(e.xact_ms),
        Value::text(&e.user),
        Value::text(&e.database),
        Value::text(&e.client_addr),
        Value::text(&e.application_name),
        Value::text(&e.last_statement),
        Value::opt_text(e.error.clone()),
        Value::text(&e.summary),
    ]
}

fn config_rows(config: &lockguard_config::Config) -> Vec<Vec<Value>> {
    config_view::flatten(config)
        .into_iter()
        .map(|(key, value)| {
            let live = config_view::is_live(&key);
            vec![Value::Text(key), Value::Text(value), Value::Bool(live)]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_in_any_case_with_an_optional_semicolon() {
        assert_eq!(Command::parse("SHOW CLIENTS"), Ok(Command::ShowClients));
        assert_eq!(
            Command::parse("  show\tclients ;  "),
            Ok(Command::ShowClients)
        );
        assert_eq!(Command::parse("Show Locks;"), Ok(Command::ShowLocks));
        assert_eq!(Command::parse("show events"), Ok(Command::ShowEvents));
        assert_eq!(Command::parse("SHOW STATS"), Ok(Command::ShowStats));
        assert_eq!(Command::parse("show config"), Ok(Command::ShowConfig));
        assert_eq!(Command::parse("SHOW VERSION;"), Ok(Command::ShowVersion));
        assert_eq!(
            Command::parse("kill 42"),
            Ok(Command::Kill(KillTarget::Client(42)))
        );
        assert_eq!(
            Command::parse("KILL pid 1234;"),
            Ok(Command::Kill(KillTarget::Pid(1234)))
        );
        assert_eq!(Command::parse("reload"), Ok(Command::Reload));
        assert_eq!(
            Command::parse("SET dry_run = on"),
            Ok(Command::SetDryRun(true))
        );
        assert_eq!(
            Command::parse("set DRY_RUN=off;"),
            Ok(Command::SetDryRun(false))
        );
        assert_eq!(
            Command::parse("SET dry_run TO 'true'"),
            Ok(Command::SetDryRun(true))
        );
    }

    #[test]
    fn anything_else_is_a_syntax_error_with_the_command_list() {
        for bad in [
            "",
            ";",
            "SELECT 1",
            "SHOW",
            "SHOW POOLS",
            "SHOW CLIENTS EXTRA",
            "KILL",
            "KILL -1",
            "KILL PID 0",
            "KILL PID x",
            "KILL 1 2 3",
            "RELOAD NOW",
            "SET dry_run = maybe",
            "SET statement_timeout = 0",
            "SHOW CLIENTS;;",
        ] {
            let err = Command::parse(bad).expect_err(bad);
            assert_eq!(err.sqlstate(), "42601", "{bad}");
            assert_eq!(err.hint(), Some(COMMANDS_HINT), "{bad}");
        }
    }

    #[test]
    fn unknown_input_is_echoed_bounded_and_never_panics() {
        let long = "é".repeat(1000);
        let AdminError::Syntax(message) = Command::parse(&long).unwrap_err() else {
            panic!("not a syntax error");
        };
        assert!(message.chars().count() < 120, "{message}");
        for weird in [
            "\u{0}",
            "=",
            "= = =",
            "SET =",
            "KILL PID",
            "\u{feff}SHOW CLIENTS",
        ] {
            let _ = Command::parse(weird);
        }
    }

    #[test]
    fn only_show_is_allowed_to_monitors() {
        assert!(!Command::ShowClients.needs_admin());
        assert!(Command::Kill(KillTarget::Pid(1)).needs_admin());
        assert!(Command::Reload.needs_admin());
        assert!(Command::SetDryRun(true).needs_admin());
    }

    #[test]
    fn tables_render_as_json_objects() {
        let table = Table::with_rows(
            &Command::Kill(KillTarget::Client(3)),
            vec![vec![
                Value::Int(3),
                Value::Null,
                Value::text("not_found"),
                Value::text("no live session with client 3"),
            ]],
        );
        assert_eq!(table.tag, "KILL");
        assert_eq!(
            table.to_json(),
            serde_json::json!([{
                "client_id": 3,
                "backend_pid": null,
                "outcome": "not_found",
                "detail": "no live session with client 3",
            }])
        );
    }
}
