//! The evidence trail: every kill (or would-be kill) becomes an [`AuditEvent`], written to the
//! log at WARN, kept in a bounded in-memory ring for the admin port, and appended to the
//! optional JSON-lines file.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::GuardError;

/// Events kept in memory for the admin port.
pub const RING_CAPACITY: usize = 1000;

/// Lines waiting for the audit file writer; beyond this the newest are dropped (and logged)
/// rather than letting a stuck disk grow memory without bound.
const FILE_QUEUE: usize = 4096;

/// One granted lock on a protected table, as evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockEvidence {
    /// `schema.table`.
    pub table: String,
    /// Lock mode as `pg_locks.mode` spells it, e.g. `RowShareLock`.
    pub mode: String,
}

impl fmt::Display for LockEvidence {
    /// `RowShareLock on app.user_sessions`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.mode, self.table)
    }
}

/// Locks as one line, e.g. `RowShareLock on app.user_sessions, AccessShareLock on app.scratch`;
/// empty for none.
pub fn locks_text(locks: &[LockEvidence]) -> String {
    locks
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// How a decision ended. One spelling everywhere a machine reads it: [`Outcome::as_str`] is
/// the snake_case identifier of the JSON events, the `outcome` columns of `SHOW EVENTS` and
/// `KILL`, the `outcome` label of `lockguard_terminations_total` and the log field. Sentences
/// for humans (an event's summary) say it in words of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The verified `pg_terminate_backend` signalled the backend.
    Terminated,
    /// The pid was no longer in `pg_stat_activity`: nothing left to kill.
    AlreadyGone,
    /// The pid exists but is not this session's backend any more (client port / start time
    /// differ): nothing was signalled.
    IdentityMismatch,
    /// Between the probe and the kill the backend started working (it is no longer idle), so
    /// the idle rule no longer applies: nothing was signalled.
    NoLongerIdle,
    /// PostgreSQL refused the guard's signal: the backend belongs to a superuser, which
    /// `pg_signal_backend` does not cover. Nothing was signalled; see `error`.
    NotPermitted,
    /// `dry_run`: the guard would have terminated it.
    DryRun,
    /// `on_client_loss = "log"` or `blocking_action = "log"`: the guard would have acted.
    Logged,
    /// The blocking budget's verified `pg_cancel_backend` signalled the holder's running
    /// statement; the session lives on.
    Cancelled,
    /// The kill could not be attempted or failed; see `error`.
    Error,
}

impl Outcome {
    /// Every outcome, in a stable order (for metrics that list zeros too).
    pub const ALL: [Outcome; 9] = [
        Outcome::Terminated,
        Outcome::AlreadyGone,
        Outcome::IdentityMismatch,
        Outcome::NoLongerIdle,
        Outcome::NotPermitted,
        Outcome::DryRun,
        Outcome::Logged,
        Outcome::Error,
        Outcome::Cancelled,
    ];

    /// The outcome's one spelling, as serde writes it: `terminated`, `already_gone`,
    /// `identity_mismatch`, `no_longer_idle`, `not_permitted`, `dry_run`, `logged`, `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Terminated => "terminated",
            Outcome::AlreadyGone => "already_gone",
            Outcome::IdentityMismatch => "identity_mismatch",
            Outcome::NoLongerIdle => "no_longer_idle",
            Outcome::NotPermitted => "not_permitted",
            Outcome::DryRun => "dry_run",
            Outcome::Logged => "logged",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One decision that killed, or would have killed, a backend, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    /// When the decision was carried out, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// `client_loss`, `idle_in_transaction`, `failed_transaction`, `operator` or
    /// `blocking_budget`.
    pub trigger: String,
    /// Every rule whose verdict was due, the one that decided first. Empty for an operator
    /// kill of a session holding nothing protected.
    pub rules: Vec<String>,
    /// For the blocking budget: the waiter it freed and the lock in between.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocking: Option<BlockingEvidence>,
    /// How the client was lost, or the operator's reason.
    pub cause: Option<String>,
    pub session_id: u64,
    pub client_addr: String,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub backend_pid: i32,
    /// Granted locks on protected tables at decision time.
    pub locks: Vec<LockEvidence>,
    /// Number of sessions blocked behind the backend.
    pub waiters: usize,
    pub waiter_pids: Vec<i32>,
    /// The session's state as the proxy saw it (`idle in transaction`, ...).
    pub state: String,
    /// Time in that state, in milliseconds.
    pub idle_ms: u64,
    /// Age of the open transaction, in milliseconds, if one is open.
    pub xact_ms: Option<u64>,
    /// Truncated text of the session's last statement.
    pub last_statement: String,
    pub outcome: Outcome,
    /// What went wrong, when `outcome` is `error` or `not_permitted`.
    pub error: Option<String>,
    pub dry_run: bool,
    /// One human sentence; for a terminated live client, the message it was sent.
    pub summary: String,
}

/// What the blocking budget saw: who waited, for what, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockingEvidence {
    pub waiter_pid: i32,
    pub waiter_user: Option<String>,
    pub waiter_application: Option<String>,
    /// How long the waiter had waited, in milliseconds, when the guard acted.
    pub waited_ms: u64,
    /// The rule's `max_blocking`, in milliseconds.
    pub max_blocking_ms: u64,
    /// `schema.table` the wait is about.
    pub table: String,
    /// The mode the waiter asked for, with the lock's type (`ShareLock (transactionid)`).
    pub mode: String,
    /// The holder's mode on `table`, when it holds one itself (a chain's head may not).
    pub holder_mode: Option<String>,
    /// `cancel` or `terminate`: what the rule's `blocking_action` chose for this holder.
    pub action: String,
}

/// Where events go. Cheap to call from async code: the ring is a short critical section and
/// the file is written by its own thread.
#[derive(Debug)]
pub struct AuditLog {
    ring: Mutex<VecDeque<AuditEvent>>,
    recorded: AtomicU64,
    /// Events per (trigger, outcome) since start, for metrics.
    counts: Mutex<BTreeMap<(String, Outcome), u64>>,
    /// Events per (rule, trigger, outcome) since start, for metrics.
    rule_counts: Mutex<BTreeMap<(String, String, Outcome), u64>>,
    file: Option<FileSink>,
}

#[derive(Debug)]
struct FileSink {
    path: PathBuf,
    lines: SyncSender<String>,
}

impl AuditLog {
    /// A log with only the tracing and ring sinks.
    pub fn in_memory() -> Self {
        AuditLog {
            ring: Mutex::new(VecDeque::with_capacity(RING_CAPACITY)),
            recorded: AtomicU64::new(0),
            counts: Mutex::new(BTreeMap::new()),
            rule_counts: Mutex::new(BTreeMap::new()),
            file: None,
        }
    }

    /// A log that also appends JSON lines to `path` (created if missing). The file is opened
    /// here, once, so a wrong path fails at startup rather than at the first kill. See
    /// [`open_audit_file`] for what is refused.
    pub fn with_file(path: &Path) -> Result<Self, GuardError> {
        let file = open_audit_file(path).map_err(|source| GuardError::AuditLog {
            path: path.to_owned(),
            source,
        })?;
        let (lines, queue) = mpsc::sync_channel(FILE_QUEUE);
        let writer_path = path.to_owned();
        std::thread::Builder::new()
            .name("lockguard-audit".into())
            .spawn(move || write_lines(file, &writer_path, queue))
            .map_err(|source| GuardError::AuditLog {
                path: path.to_owned(),
                source,
            })?;
        Ok(AuditLog {
            file: Some(FileSink {
                path: path.to_owned(),
                lines,
            }),
            ..Self::in_memory()
        })
    }

    /// Records an event in every sink. Never fails: a sink that cannot take it logs why.
    pub fn record(&self, event: AuditEvent) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
        {
            let mut counts = match self.counts.lock() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            *counts
                .entry((event.trigger.clone(), event.outcome))
                .or_default() += 1;
        }
        {
            let mut counts = match self.rule_counts.lock() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            for rule in &event.rules {
                *counts
                    .entry((rule.clone(), event.trigger.clone(), event.outcome))
                    .or_default() += 1;
            }
        }
        trace_event(&event);
        if let Some(sink) = &self.file {
            match serde_json::to_string(&event) {
                Ok(line) => match sink.lines.try_send(line) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => tracing::error!(
                        path = %sink.path.display(),
                        session_id = event.session_id,
                        "audit log writer is behind; event not written to the file"
                    ),
                    Err(TrySendError::Disconnected(_)) => tracing::error!(
                        path = %sink.path.display(),
                        session_id = event.session_id,
                        "audit log writer has stopped; event not written to the file"
                    ),
                },
                Err(e) => tracing::error!(error = %e, "cannot serialize audit event"),
            }
        }
        let mut ring = match self.ring.lock() {
            Ok(ring) => ring,
            Err(poisoned) => poisoned.into_inner(),
        };
        if ring.len() == RING_CAPACITY {
            ring.pop_front();
        }
        ring.push_back(event);
    }

    /// The last (up to [`RING_CAPACITY`]) events, oldest first.
    pub fn recent(&self) -> Vec<AuditEvent> {
        let ring = match self.ring.lock() {
            Ok(ring) => ring,
            Err(poisoned) => poisoned.into_inner(),
        };
        ring.iter().cloned().collect()
    }

    /// Events recorded since start, including those the ring has dropped.
    pub fn total_recorded(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// Events recorded since start per (rule, trigger, outcome), sorted; an event that names
    /// several rules counts for each. Triples never seen are absent.
    pub fn counts_by_rule(&self) -> Vec<(String, String, Outcome, u64)> {
        let counts = match self.rule_counts.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        counts
            .iter()
            .map(|((rule, trigger, outcome), n)| (rule.clone(), trigger.clone(), *outcome, *n))
            .collect()
    }

    /// Events recorded since start per (trigger, outcome), sorted; pairs never seen are
    /// absent.
    pub fn counts(&self) -> Vec<(String, Outcome, u64)> {
        let counts = match self.counts.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        counts
            .iter()
            .map(|((trigger, outcome), n)| (trigger.clone(), *outcome, *n))
            .collect()
    }
}

/// Opens the audit file for appending. The events hold client addresses and statements, so a
/// new file is created `0600`, and an existing one readable by others is tightened to that.
/// A symlink at `path` is refused (`O_NOFOLLOW`) rather than followed: whoever could plant
/// one would otherwise have lockguard append to (or create) a file of their choosing. So is
/// anything but a regular file (`O_NONBLOCK` keeps a FIFO from blocking the open).
pub fn open_audit_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::new(
                    e.kind(),
                    "it is a symbolic link, which lockguard does not follow for its audit log",
                )
            } else {
                e
            }
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        // fchmod on the descriptor we hold: no path lookup for anyone to race.
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
        tracing::warn!(
            path = %path.display(),
            was = format!("{:o}", mode & 0o777),
            "audit log was readable by others; its mode is now owner-only"
        );
    }
    Ok(file)
}

/// The writer thread: one line per event, in order; a failed write is logged, not fatal.
fn write_lines(mut file: File, path: &Path, queue: mpsc::Receiver<String>) {
    // Ends when the AuditLog (the only sender) is dropped, after draining what was queued.
    for mut line in queue {
        line.push('\n');
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::error!(path = %path.display(), error = %e, "writing the audit log failed");
        }
    }
}

fn trace_event(e: &AuditEvent) {
    let locks = locks_text(&e.locks);
    tracing::warn!(
        target: "lockguard::audit",
        trigger = %e.trigger,
        rules = %e.rules.join(","),
        cause = e.cause.as_deref().unwrap_or(""),
        outcome = %e.outcome,
        dry_run = e.dry_run,
        session_id = e.session_id,
        backend_pid = e.backend_pid,
        client_addr = %e.client_addr,
        user = %e.user,
        database = %e.database,
        application_name = %e.application_name,
        locks = %locks,
        waiters = e.waiters,
        waiter_pids = ?e.waiter_pids,
        state = %e.state,
        idle_ms = e.idle_ms,
        xact_ms = ?e.xact_ms,
        last_statement = %e.last_statement,
        error = e.error.as_deref().unwrap_or(""),
        blocking = ?e.blocking,
        "{}",
        e.summary
    );
}

/// `t` as RFC 3339 in UTC with milliseconds, e.g. `2026-11-03T09:15:02.417Z`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    // humantime formats the years 1970 to 9999 and panics outside them; a clock that far off
    // is clamped rather than allowed to take the guard down.
    let last = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    humantime::format_rfc3339_millis(t.clamp(UNIX_EPOCH, last)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(
            rfc3339_utc(at(1_700_000_000, 999)),
            "2023-11-14T22:13:20.999Z"
        );
        assert_eq!(
            rfc3339_utc(at(4_107_542_399, 0)),
            "2100-02-28T23:59:59.000Z"
        );
        assert_eq!(
            rfc3339_utc(at(4_107_542_400, 0)),
            "2100-03-01T00:00:00.000Z"
        );
        // Out of the formatter's range: clamped, not a panic.
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_utc(at(300_000_000_000, 0)),
            "9999-12-31T23:59:59.000Z"
        );
    }

    #[test]
    fn an_outcome_is_spelled_the_same_in_json_text_and_as_str() {
        for outcome in Outcome::ALL {
            let json = serde_json::to_value(outcome).unwrap();
            assert_eq!(json, outcome.as_str(), "{outcome:?}");
            assert_eq!(outcome.to_string(), outcome.as_str());
        }
        assert_eq!(Outcome::IdentityMismatch.as_str(), "identity_mismatch");
        assert_eq!(Outcome::DryRun.as_str(), "dry_run");
    }

    pub(crate) fn event(session_id: u64) -> AuditEvent {
        AuditEvent {
            time: rfc3339_utc(SystemTime::now()),
            trigger: "idle_in_transaction".into(),
            rules: vec!["default".into()],
            blocking: None,
            cause: None,
            session_id,
            client_addr: "127.0.0.1:5000".into(),
            user: "app".into(),
            database: "db".into(),
            application_name: "ui".into(),
            backend_pid: 1234,
            locks: vec![LockEvidence {
                table: "app.user_sessions".into(),
                mode: "RowShareLock".into(),
            }],
            waiters: 1,
            waiter_pids: vec![1235],
            state: "idle in transaction".into(),
            idle_ms: 2100,
            xact_ms: Some(2500),
            last_statement: "SELECT 1".into(),
            outcome: Outcome::Terminated,
            error: None,
            dry_run: false,
            summary: "lockguard: terminated backend 1234".into(),
        }
    }

    /// Every event is also a WARN log line carrying its evidence as fields.
    #[test]
    fn every_event_is_logged_at_warn_with_its_evidence() {
        #[derive(Clone, Default)]
        struct Captured(std::sync::Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::with_default(subscriber, || AuditLog::in_memory().record(event(7)));
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        for expected in [
            " WARN ",
            "lockguard::audit",
            "lockguard: terminated backend 1234",
            "trigger=idle_in_transaction",
            "outcome=terminated",
            "session_id=7",
            "backend_pid=1234",
            "locks=RowShareLock on app.user_sessions",
            "waiter_pids=[1235]",
            "last_statement=SELECT 1",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from {text:?}"
            );
        }
    }

    #[test]
    fn ring_keeps_the_last_thousand() {
        let log = AuditLog::in_memory();
        for id in 0..(RING_CAPACITY as u64 + 5) {
            log.record(event(id));
        }
        let recent = log.recent();
        assert_eq!(recent.len(), RING_CAPACITY);
        assert_eq!(recent[0].session_id, 5);
        assert_eq!(
            recent.last().map(|e| e.session_id),
            Some(RING_CAPACITY as u64 + 4)
        );
        assert_eq!(log.total_recorded(), RING_CAPACITY as u64 + 5);
        assert_eq!(
            log.counts(),
            [(
                "idle_in_transaction".to_owned(),
                Outcome::Terminated,
                RING_CAPACITY as u64 + 5
            )]
        );
    }

    #[test]
    fn file_gets_one_json_object_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::with_file(&path).unwrap();
        log.record(event(1));
        log.record(event(2));
        // Dropping the log ends the writer thread after it drained the queue.
        drop(log);
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&path).unwrap();
            if text.lines().count() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["session_id"], 1);
        assert_eq!(lines[1]["outcome"], "terminated");
        assert_eq!(lines[1]["locks"][0]["table"], "app.user_sessions");
        assert_eq!(lines[1]["locks"][0]["mode"], "RowShareLock");
    }

    #[test]
    fn an_unwritable_path_fails_at_open() {
        let err = AuditLog::with_file(Path::new("/nonexistent-dir/audit.jsonl")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-dir/audit.jsonl"),
            "{err}"
        );
    }
}
