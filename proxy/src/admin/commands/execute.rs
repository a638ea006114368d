//! Running a command against the proxy's state: the guard's verified kill, the audit ring,
//! the probes behind SHOW CLIENTS and SHOW LOCKS, the counters, readiness.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use guard_core::guard::Settings;
use guard_core::policy::{TriggerKind, Who};
use guard_core::{AuditEvent, GuardError, HeldLock, Outcome, SessionId, SessionRecord};
use lockguard_config::{AdminRole, GuardConfig};

use super::error::AdminError;
use super::parse::{Command, KillTarget};
use super::schema::{Table, Value};
use crate::admin::probes::Probed;
use crate::admin::{config_view, Admin, Login};
use crate::shared::Change;

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
            Command::ShowRules => self.rule_rows().await,
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
        let upstream_error = upstream.err().map(|e| e.to_string());
        let guard_error = guard.err();
        Readiness {
            ready: upstream_error.is_none() && guard_error.is_none(),
            upstream_error,
            guard_enabled: self.guard.is_some(),
            guard_error,
        }
    }

    fn set_dry_run(&self, on: bool) -> Result<Vec<Value>, AdminError> {
        self.guard.as_ref().ok_or_else(|| {
            AdminError::Unavailable(
                "the guard is disabled (set guard.dsn): no dry_run to switch".to_owned(),
            )
        })?;
        // The guard follows the configuration in force, and SHOW CONFIG shows it: one store.
        // The switch covers every rule: a rule's own `dry_run` gives way to the flat key until
        // the next RELOAD restores the file's.
        let changed = self.in_force.change(|running| -> Result<_, AdminError> {
            let guard = &running.guard;
            Ok(
                if guard.dry_run == on && guard.rules.iter().all(|r| r.dry_run.is_none()) {
                    Change::Unchanged
                } else {
                    let mut next = GuardConfig {
                        dry_run: on,
                        ..guard.clone()
                    };
                    for rule in &mut next.rules {
                        rule.dry_run = None;
                    }
                    Change::Guard(Box::new(next))
                },
            )
        })?;
        let previous = changed.before.guard.dry_run;
        if previous != on {
            tracing::warn!(dry_run = on, "guard dry-run switched by an operator");
        }
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
        let settings = self.guard.as_ref().map(|g| g.settings());
        sessions
            .iter()
            .map(|s| {
                let facts = s.backend_pid().and_then(|pid| probed.get(&pid));
                let rules = settings.as_ref().zip(facts).and_then(|(settings, facts)| {
                    let governed = settings.rules.governing_locks(
                        Who::of(&s.client),
                        facts
                            .locks
                            .iter()
                            .map(|l| (l.schema.as_str(), l.table.as_str())),
                    );
                    let names: Vec<&str> = governed.iter().map(|(r, _)| r.name.as_str()).collect();
                    (!names.is_empty()).then(|| names.join(", "))
                });
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
                    Value::opt_text(rules),
                ]
            })
            .collect()
    }

    /// `SHOW RULES`: each rule with its settings, the sessions its matchers select (and do
    /// not exempt), and the sessions the probe finds holding a lock it governs.
    async fn rule_rows(&self) -> Vec<Vec<Value>> {
        let Some(guard) = &self.guard else {
            return Vec::new();
        };
        let settings = guard.settings();
        let sessions = self.registry.snapshot();
        let probed = self.probe(&sessions).await;
        let list = |items: Vec<String>| (!items.is_empty()).then(|| items.join(", "));
        let globs =
            |g: &[lockguard_config::NameGlob]| list(g.iter().map(ToString::to_string).collect());
        let duration = |d: Duration| humantime::format_duration(d).to_string();
        settings
            .rules
            .all()
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let selected = sessions
                    .iter()
                    .filter(|s| {
                        let w = Who::of(&s.client);
                        rule.matches_session(w.database, w.user, w.application)
                            && !rule.exempts(w.user, w.application)
                    })
                    .count();
                let holding = sessions
                    .iter()
                    .filter(|s| {
                        let facts = s.backend_pid().and_then(|pid| probed.get(&pid));
                        facts.is_some_and(|f| {
                            f.locks.iter().any(|l| {
                                settings
                                    .rules
                                    .governing(Who::of(&s.client), &l.schema, &l.table)
                                    .is_some_and(|r| r.name == rule.name)
                            })
                        })
                    })
                    .count();
                vec![
                    Value::int(i + 1),
                    Value::text(&rule.name),
                    Value::opt_text(list(rule.tables.iter().map(ToString::to_string).collect())),
                    Value::opt_text(globs(&rule.databases)),
                    Value::opt_text(globs(&rule.users)),
                    Value::opt_text(globs(&rule.applications)),
                    Value::opt_text(globs(&rule.exempt_users)),
                    Value::opt_text(globs(&rule.exempt_applications)),
                    Value::text(duration(rule.idle_in_transaction_timeout)),
                    Value::text(duration(rule.failed_transaction_timeout)),
                    Value::text(match rule.on_client_loss {
                        lockguard_config::ClientLossAction::Terminate => "terminate",
                        lockguard_config::ClientLossAction::Log => "log",
                    }),
                    Value::text(duration(rule.inflight_grace)),
                    Value::Bool(rule.require_waiters),
                    Value::Bool(rule.dry_run),
                    Value::opt_text(rule.max_blocking.map(duration)),
                    Value::opt_text(rule.max_blocking.map(|_| rule.blocking_action.as_str())),
                    Value::int(selected),
                    Value::int(holding),
                ]
            })
            .collect()
    }

    async fn lock_rows(&self) -> Vec<Vec<Value>> {
        let sessions = self.registry.snapshot();
        let probed = self.probe(&sessions).await;
        let settings = self.guard.as_ref().map(|g| g.settings());
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
                    Value::opt_text(
                        settings
                            .as_ref()
                            .and_then(|settings| governing(settings, s, lock))
                            .map(str::to_owned),
                    ),
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
            (
                "sessions_on_forwarding_threads".into(),
                stats.sessions_on_forwarding_threads,
            ),
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
            for trigger in TriggerKind::ALL.map(TriggerKind::name) {
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
        Value::text(e.rules.join(", ")),
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

/// The name of the rule that governs `lock` of session `s` (none when no rule selects it or
/// the rule exempts the session).
fn governing<'a>(settings: &'a Settings, s: &SessionRecord, lock: &HeldLock) -> Option<&'a str> {
    settings
        .rules
        .governing(Who::of(&s.client), &lock.schema, &lock.table)
        .map(|rule| rule.name.as_str())
}
