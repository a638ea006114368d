//! The guard's own PostgreSQL connections: one per database (relation OIDs in `pg_locks` only
//! resolve inside their database), opened on first need, reconnected with backoff when they
//! break. Nothing here is on the forwarding path: a broken guard connection only makes the
//! guard report itself degraded. One connection itself is a [`GuardConnection`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;
use serde::Serialize;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Config, NoTls};

use crate::clock::ClockOffset;
pub use crate::connection::{GuardConnection, GuardTls};
use crate::dsn::CONNECT_TIMEOUT;
pub use crate::dsn::{dsn_tls, GUARD_APPLICATION_NAME, GUARD_OPTIONS};
use crate::error::{pg_error_text, GuardError};

/// First wait after a failed connect; doubles per failure up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A database with no live session for this long loses its guard connection, so a dropped or
/// unused database does not keep one (it would also block a plain `DROP DATABASE`).
const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// Connection state of one database, for health reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DbHealth {
    pub database: String,
    pub connected: bool,
    /// Whether the last connect or query succeeded.
    pub healthy: bool,
    /// The guard's own backend pid, while connected.
    pub backend_pid: Option<i32>,
    pub last_error: Option<String>,
    /// Connect attempts that failed in a row.
    pub consecutive_failures: u32,
    #[serde(skip)]
    pub last_error_at: Option<SystemTime>,
}

/// Whether a failed query counts against the guard's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blame {
    /// The guard's own statement failed: something is wrong with the guard (a permission, a
    /// server problem), and health says so.
    Guard,
    /// The query carried a value a client chose (a user name for `auth_query`): its failure
    /// is that client's problem, and only a lost connection or a timeout marks the guard
    /// down, or any client could switch the guard's health off.
    ClientInput,
}

/// All guard connections, keyed by database name.
#[derive(Debug)]
pub(crate) struct Connections {
    base: Config,
    tls: Option<GuardTls>,
    /// Prepared on every connection as it opens.
    statements: &'static [&'static str],
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// The superuser warning is given once, on the first connection that shows it.
    superuser_warned: AtomicBool,
}

#[derive(Debug)]
struct Slot {
    database: String,
    /// Serializes connect attempts; held only briefly once connected.
    link: tokio::sync::Mutex<Link>,
    /// What health reports read without waiting on `link`.
    status: Mutex<Status>,
}

#[derive(Debug, Default)]
struct Link {
    current: Option<Arc<GuardConnection>>,
    failures: u32,
    retry_at: Option<Instant>,
    generation: u64,
}

#[derive(Debug)]
struct Status {
    connected: bool,
    healthy: bool,
    backend_pid: Option<i32>,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    failures: u32,
    last_used: Instant,
    /// The server's clock offset as measured by the latest connection.
    clock_offset: ClockOffset,
    /// Which connection the fields describe, so a late "connection ended" from an old
    /// connection does not mark its successor down.
    generation: u64,
}

impl Slot {
    fn status(&self) -> MutexGuard<'_, Status> {
        match self.status.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn touch(&self) {
        self.status().last_used = Instant::now();
    }

    fn mark_ok(&self) {
        self.status().healthy = true;
    }

    fn mark_error(&self, error: String) {
        let mut s = self.status();
        s.healthy = false;
        s.last_error = Some(error);
        s.last_error_at = Some(SystemTime::now());
    }

    fn connection_ended(&self, generation: u64, error: Option<String>) {
        let mut s = self.status();
        if s.generation != generation {
            return;
        }
        s.connected = false;
        s.backend_pid = None;
        s.healthy = false;
        s.last_error = Some(match error {
            Some(e) => format!("guard connection closed: {e}"),
            None => "guard connection closed".to_owned(),
        });
        s.last_error_at = Some(SystemTime::now());
        tracing::warn!(
            database = %self.database,
            error = s.last_error.as_deref().unwrap_or_default(),
            "guard connection lost; will reconnect"
        );
    }
}

/// Whether `e` means the connection itself is gone, so a fresh one may succeed: closed, an
/// I/O error, or a FATAL from the server (a terminated guard backend answers the next query
/// with `FATAL 57P01` before the connection task notices the close).
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        return matches!(db.severity(), "FATAL" | "PANIC");
    }
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// Runs a connection's task, reporting its end to `slot`.
fn watch<C>(connection: C, slot: Arc<Slot>, generation: u64)
where
    C: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let error = connection.await.err().map(|e| pg_error_text(&e));
        slot.connection_ended(generation, error);
    });
}

fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_START.saturating_mul(1 << exp).min(BACKOFF_MAX)
}

impl Connections {
    /// Connections with `base`'s settings, over `tls` when given, each with `statements`
    /// prepared.
    pub(crate) fn new(
        base: Config,
        tls: Option<GuardTls>,
        statements: &'static [&'static str],
    ) -> Self {
        Connections {
            base,
            tls,
            statements,
            slots: Mutex::new(HashMap::new()),
            superuser_warned: AtomicBool::new(false),
        }
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        match self.slots.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn slot(&self, database: &str) -> Arc<Slot> {
        let mut slots = self.slots();
        let slot = slots.entry(database.to_owned()).or_insert_with(|| {
            Arc::new(Slot {
                database: database.to_owned(),
                link: tokio::sync::Mutex::new(Link::default()),
                status: Mutex::new(Status {
                    connected: false,
                    healthy: true,
                    backend_pid: None,
                    last_error: None,
                    last_error_at: None,
                    failures: 0,
                    last_used: Instant::now(),
                    clock_offset: ClockOffset::ZERO,
                    generation: 0,
                }),
            })
        });
        Arc::clone(slot)
    }

    /// The database the dsn names (libpq's default: the user name; else `postgres`), where
    /// the readiness check connects.
    pub(crate) fn home_database(&self) -> String {
        self.base
            .get_dbname()
            .or(self.base.get_user())
            .unwrap_or("postgres")
            .to_owned()
    }

    /// The open connection to `database`, connecting if there is none and the backoff allows.
    pub(crate) async fn get(&self, database: &str) -> Result<Arc<GuardConnection>, GuardError> {
        let slot = self.slot(database);
        slot.touch();
        let mut link = slot.link.lock().await;
        if let Some(conn) = &link.current {
            if !conn.is_closed() {
                return Ok(Arc::clone(conn));
            }
        }
        link.current = None;
        if let Some(retry_at) = link.retry_at {
            let now = Instant::now();
            if now < retry_at {
                let last = slot.status().last_error.clone().unwrap_or_default();
                return Err(GuardError::Unavailable {
                    database: database.to_owned(),
                    reason: format!("{last} (next attempt in {:?})", retry_at - now),
                });
            }
        }
        match self.connect(&slot, link.generation + 1).await {
            Ok(conn) => {
                link.generation += 1;
                link.failures = 0;
                link.retry_at = None;
                let conn = Arc::new(conn);
                link.current = Some(Arc::clone(&conn));
                let mut s = slot.status();
                s.generation = link.generation;
                s.connected = true;
                s.healthy = true;
                s.backend_pid = Some(conn.backend_pid());
                s.failures = 0;
                s.clock_offset = conn.clock_offset();
                drop(s);
                tracing::info!(
                    database,
                    guard_pid = conn.backend_pid(),
                    tls = self.tls.is_some(),
                    clock_offset_ms = conn.clock_offset().as_micros() / 1000,
                    "guard connected"
                );
                if conn.is_superuser() && !self.superuser_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        role = self.base.get_user().unwrap_or_default(),
                        "the guard's role is a superuser: it needs only pg_signal_backend, \
                         pg_read_all_stats and EXECUTE on the secret lookup function \
                         (`lockguard setup-sql` prints the SQL for such a role)"
                    );
                }
                Ok(conn)
            }
            Err(reason) => {
                link.failures += 1;
                let delay = backoff(link.failures);
                link.retry_at = Some(Instant::now() + delay);
                {
                    let mut s = slot.status();
                    s.connected = false;
                    s.backend_pid = None;
                    s.failures = link.failures;
                }
                slot.mark_error(reason.clone());
                tracing::warn!(
                    database,
                    error = %reason,
                    retry_in = ?delay,
                    "guard cannot connect; traffic is unaffected, kills wait for the guard"
                );
                Err(GuardError::Unavailable {
                    database: database.to_owned(),
                    reason,
                })
            }
        }
    }

    async fn connect(&self, slot: &Arc<Slot>, generation: u64) -> Result<GuardConnection, String> {
        let mut config = self.base.clone();
        config.dbname(&slot.database);
        let limit = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(CONNECT_TIMEOUT);
        let attempt = async {
            let client = match &self.tls {
                Some(tls) => {
                    config.ssl_mode(tls.ssl_mode());
                    let (client, connection) = config
                        .connect(tls.connector.clone())
                        .await
                        .map_err(|e| format!("{} (TLS: {})", pg_error_text(&e), tls.description))?;
                    watch(connection, Arc::clone(slot), generation);
                    client
                }
                None => {
                    config.ssl_mode(SslMode::Disable);
                    let (client, connection) =
                        config.connect(NoTls).await.map_err(|e| pg_error_text(&e))?;
                    watch(connection, Arc::clone(slot), generation);
                    client
                }
            };
            GuardConnection::prepare(client, self.statements)
                .await
                .map_err(|e| format!("preparing the guard statements: {}", pg_error_text(&e)))
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("connecting timed out after {limit:?}")),
        }
    }

    /// Runs `op` on the connection to `database`, giving it up to `deadline` (connecting is
    /// bounded separately, by the connect timeout, so a slow connect is not cut short and
    /// retried on every sweep). If the connection turns out to be gone (e.g. its backend was
    /// terminated), reconnects and tries once more: the guard's statements are safe to repeat
    /// because every kill re-verifies identity.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        database: &str,
        deadline: Duration,
        op: F,
    ) -> Result<T, GuardError>
    where
        F: Fn(Arc<GuardConnection>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.run_blaming(database, deadline, Blame::Guard, op).await
    }

    /// [`Connections::run`], with `blame` saying whether a failing query marks the guard down.
    pub(crate) async fn run_blaming<T, F, Fut>(
        &self,
        database: &str,
        deadline: Duration,
        blame: Blame,
        op: F,
    ) -> Result<T, GuardError>
    where
        F: Fn(Arc<GuardConnection>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut retried = false;
        loop {
            let conn = self.get(database).await?;
            let slot = self.slot(database);
            let result = match tokio::time::timeout(deadline, op(Arc::clone(&conn))).await {
                Ok(result) => result,
                Err(_) => {
                    let error = GuardError::Timeout {
                        database: database.to_owned(),
                        after: deadline,
                    };
                    slot.mark_error(error.to_string());
                    return Err(error);
                }
            };
            match result {
                Ok(value) => {
                    slot.mark_ok();
                    return Ok(value);
                }
                Err(e) if (connection_lost(&e) || conn.is_closed()) && !retried => {
                    retried = true;
                    tracing::info!(
                        database,
                        error = %pg_error_text(&e),
                        "guard connection was closed; reconnecting"
                    );
                    let mut link = slot.link.lock().await;
                    if link
                        .current
                        .as_ref()
                        .is_some_and(|current| Arc::ptr_eq(current, &conn))
                    {
                        link.current = None;
                    }
                }
                Err(e) => {
                    let message = pg_error_text(&e);
                    let lost = connection_lost(&e);
                    if lost || blame == Blame::Guard {
                        slot.mark_error(message.clone());
                    }
                    return Err(if lost {
                        GuardError::Unavailable {
                            database: database.to_owned(),
                            reason: message,
                        }
                    } else {
                        GuardError::Query {
                            database: database.to_owned(),
                            message,
                        }
                    });
                }
            }
        }
    }

    /// The server's clock offset in `database` as its latest connection measured it (zero
    /// before the first one).
    pub(crate) fn clock_offset(&self, database: &str) -> ClockOffset {
        self.slot(database).status().clock_offset
    }

    /// Records a failure that happened around a query (a timeout) for health reports.
    pub(crate) fn note_error(&self, database: &str, error: String) {
        self.slot(database).mark_error(error);
    }

    /// Periodic upkeep: reconnects broken connections of databases that still have sessions,
    /// and of the dsn's own database (the guard connects there at start, and readiness checks
    /// and secret lookups use it), so health recovers and the next sweep finds a working
    /// connection; closes those of databases nobody has used for a while.
    pub(crate) async fn maintain(&self, in_use: &HashSet<String>) {
        let slots: Vec<Arc<Slot>> = self.slots().values().cloned().collect();
        let home = self.home_database();
        let mut reconnect = Vec::new();
        for slot in slots {
            if in_use.contains(&slot.database) || slot.database == home {
                slot.touch();
                if !slot.status().connected {
                    reconnect.push(slot.database.clone());
                }
            } else if slot.status().last_used.elapsed() > IDLE_CLOSE {
                tracing::info!(database = %slot.database, "closing unused guard connection");
                self.slots().remove(&slot.database);
            }
        }
        // Failures are recorded in the slot's status by `get`.
        join_all(reconnect.iter().map(|db| self.get(db))).await;
    }

    /// Connection state per database, sorted by name.
    pub(crate) fn health(&self) -> Vec<DbHealth> {
        let slots: Vec<Arc<Slot>> = self.slots().values().cloned().collect();
        let mut out: Vec<DbHealth> = slots
            .iter()
            .map(|slot| {
                let s = slot.status();
                DbHealth {
                    database: slot.database.clone(),
                    connected: s.connected,
                    healthy: s.healthy,
                    backend_pid: s.backend_pid,
                    last_error: s.last_error.clone(),
                    consecutive_failures: s.failures,
                    last_error_at: s.last_error_at,
                }
            })
            .collect();
        out.sort_by(|a, b| a.database.cmp(&b.database));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), BACKOFF_START);
        assert_eq!(backoff(2), BACKOFF_START * 2);
        assert_eq!(backoff(3), BACKOFF_START * 4);
        assert_eq!(backoff(10), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
