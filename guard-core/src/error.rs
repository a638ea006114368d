//! Errors of the guard, with enough context to act on without reading the code.

use std::path::PathBuf;
use std::time::Duration;

use crate::session::SessionId;

/// Why the guard could not be built or could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// `Guard::new` needs `guard.dsn`; without it the proxy should not build a guard at all.
    #[error("guard.dsn is not set: the guard is disabled")]
    NoDsn,
    /// `guard.dsn` is not a valid libpq connection string.
    #[error("invalid guard.dsn: {0}")]
    InvalidDsn(String),
    /// The dsn's `sslmode` needs TLS but the guard was built without a TLS configuration.
    #[error(
        "guard.dsn asks for TLS (sslmode require, verify-ca or verify-full) but the guard has no \
         TLS configuration"
    )]
    TlsUnavailable,
    /// `guard.password_env` names a variable that is not set (or is not UTF-8).
    #[error("environment variable {var} (guard.password_env) is not set or not valid UTF-8")]
    PasswordEnv { var: String },
    /// The audit log file could not be opened for appending.
    #[error("opening the audit log {}: {source}", path.display())]
    AuditLog {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No guard connection to this database right now (connect failed, or waiting out the
    /// backoff after a failure).
    #[error("guard connection to database {database:?} unavailable: {reason}")]
    Unavailable { database: String, reason: String },
    /// A guard query failed on a working connection (permissions, server error).
    #[error("guard query in database {database:?} failed: {message}")]
    Query { database: String, message: String },
    /// A guard round trip took too long; the guard gives up rather than stall its caller.
    #[error("guard work on database {database:?} timed out after {after:?}")]
    Timeout { database: String, after: Duration },
    /// The session has not received BackendKeyData, so there is no backend to act on.
    #[error("session {0} has no backend pid yet")]
    NoBackend(SessionId),
    /// Another kill of this session (sweep, operator, client loss) is already under way.
    #[error("session {0} is already being terminated")]
    KillInProgress(SessionId),
}

/// A tokio-postgres error as one line: its own Display is terse ("db error", "error
/// communicating with the server"), the useful part is in the source.
pub(crate) fn pg_error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}
