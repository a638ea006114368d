//! One guard connection: opened by [`crate::connections`], it reads what the guard needs to
//! know about its own session, prepares its users' statements, and runs them. TLS for it is a
//! [`GuardTls`].

use std::fmt;
use std::time::SystemTime;

use lockguard_config::UpstreamTlsMode;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::clock::ClockOffset;

/// What the guard learns about its own session when it connects: its pid, whether its role is
/// a superuser (it should not be), and the server's clock.
const SESSION_SQL: &str = "\
SELECT pg_catalog.pg_backend_pid(),
       pg_catalog.current_setting('is_superuser'),
       pg_catalog.clock_timestamp()";

/// An open guard connection with the statements of its users prepared, so a probe or a kill
/// is a single round trip. The SQL belongs to the modules that use it (`probe`, `enforcer`);
/// this one only prepares and runs it.
#[derive(Debug)]
pub struct GuardConnection {
    client: Client,
    backend_pid: i32,
    superuser: bool,
    clock_offset: ClockOffset,
    /// Prepared at connect, looked up by their text.
    prepared: Vec<(&'static str, Statement)>,
}

impl GuardConnection {
    /// Reads the session's facts and prepares `statements` on an open connection whose task
    /// is already running. Public so tests can hand the enforcer a connection of their own
    /// (with [`crate::guard::STATEMENTS`]).
    pub async fn prepare(
        client: Client,
        statements: &[&'static str],
    ) -> Result<Self, tokio_postgres::Error> {
        let sent = SystemTime::now();
        let session = client.query_one(SESSION_SQL, &[]).await?;
        let received = SystemTime::now();
        let server_now: SystemTime = session.try_get(2)?;
        let superuser: String = session.try_get(1)?;
        let prepared =
            futures_util::future::try_join_all(statements.iter().map(|sql| client.prepare(sql)))
                .await?;
        Ok(GuardConnection {
            backend_pid: session.try_get(0)?,
            superuser: superuser == "on",
            clock_offset: ClockOffset::measure(sent, received, server_now),
            client,
            prepared: statements.iter().copied().zip(prepared).collect(),
        })
    }

    /// Runs `sql` with `params`, as the statement prepared at connect when it was one of them
    /// (one round trip), else as a one-off.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        match self.prepared(sql) {
            Some(statement) => self.client.query(statement, params).await,
            None => self.client.query(sql, params).await,
        }
    }

    /// [`GuardConnection::query`] for at most one row.
    pub async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        match self.prepared(sql) {
            Some(statement) => self.client.query_opt(statement, params).await,
            None => self.client.query_opt(sql, params).await,
        }
    }

    fn prepared(&self, sql: &str) -> Option<&Statement> {
        self.prepared
            .iter()
            .find(|(text, _)| *text == sql)
            .map(|(_, statement)| statement)
    }

    /// The underlying client, for ad-hoc queries on the guard's connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The pid of the guard's own backend.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// True once the connection has ended; the guard then opens a new one.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Whether the guard's role is a superuser (it needs no such thing).
    pub fn is_superuser(&self) -> bool {
        self.superuser
    }

    /// How far the server's clock was ahead of ours when this connection opened.
    pub fn clock_offset(&self) -> ClockOffset {
        self.clock_offset
    }
}

/// TLS for the guard's connections, resolved by the proxy from the dsn's `sslmode` (or, when
/// the dsn says nothing about TLS, `[tls] upstream_mode`) with the same rustls configuration
/// code as its own upstream connections.
#[derive(Clone)]
pub struct GuardTls {
    mode: UpstreamTlsMode,
    /// Where the certificate check comes from, for error messages (`verify-full against
    /// /etc/lockguard/ca.crt`).
    pub(crate) description: String,
    pub(crate) connector: MakeRustlsConnect,
}

impl GuardTls {
    /// TLS in `mode` (anything but `disable`) with `config`, whose certificate verifier must
    /// already implement the mode; `description` says so in error messages.
    pub fn new(mode: UpstreamTlsMode, description: String, config: rustls::ClientConfig) -> Self {
        GuardTls {
            mode,
            description,
            connector: MakeRustlsConnect::new(config),
        }
    }

    /// `prefer` falls back to plaintext when the server has no TLS; every other mode fails.
    pub(crate) fn ssl_mode(&self) -> SslMode {
        match self.mode {
            UpstreamTlsMode::Disable | UpstreamTlsMode::Prefer => SslMode::Prefer,
            UpstreamTlsMode::Require | UpstreamTlsMode::VerifyCa | UpstreamTlsMode::VerifyFull => {
                SslMode::Require
            }
        }
    }
}

impl fmt::Debug for GuardTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardTls")
            .field("mode", &self.mode)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_sql_is_schema_qualified() {
        crate::sql_check::assert_schema_qualified(SESSION_SQL);
    }
}
