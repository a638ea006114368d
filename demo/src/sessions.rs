//! The demo's PostgreSQL sessions: the app holding a row lock, the login waiting for it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use lockguard_sandbox::{pg_error, SUPERUSER};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

use crate::{APP, APP_ROLE, LOGIN, LOGIN_SQL};

/// "FATAL 57P01: message" for a server error, the error otherwise.
pub(crate) fn server_says(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Connects as the superuser with `application_name`; the connection task is returned so the
/// caller can see how it ended.
pub(crate) async fn connect(
    addr: SocketAddr,
    application_name: &str,
) -> anyhow::Result<(Client, JoinHandle<Result<(), tokio_postgres::Error>>)> {
    let (client, connection) = tokio_postgres::Config::new()
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(match application_name {
            APP | LOGIN => APP_ROLE,
            _ => SUPERUSER,
        })
        .dbname("postgres")
        .application_name(application_name)
        .connect_timeout(Duration::from_secs(10))
        .connect(NoTls)
        .await
        .map_err(|e| {
            anyhow!(
                "connecting to {addr} as {application_name}: {}",
                pg_error(&e)
            )
        })?;
    Ok((client, tokio::spawn(connection)))
}

/// `BEGIN; UPDATE ... WHERE user_id = $1`, leaving the transaction open. Returns the backend pid.
pub(crate) async fn hold_row_lock(client: &Client, user_id: i32) -> anyhow::Result<i32> {
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|e| anyhow!("asking the backend pid: {}", pg_error(&e)))?
        .get(0);
    client
        .batch_execute(&format!(
            "BEGIN; UPDATE app.user_sessions SET token = 'new' WHERE user_id = {user_id}"
        ))
        .await
        .map_err(|e| anyhow!("taking the row lock: {}", pg_error(&e)))?;
    Ok(pid)
}

/// A login statement running in the background.
pub(crate) struct PendingLogin {
    pub(crate) pid: i32,
    cancel: tokio_postgres::CancelToken,
    pub(crate) started: Instant,
    done: JoinHandle<Result<Instant, tokio_postgres::Error>>,
}

impl PendingLogin {
    pub(crate) async fn start(addr: SocketAddr, user_id: i32) -> anyhow::Result<PendingLogin> {
        let (client, _connection) = connect(addr, LOGIN).await?;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(|e| anyhow!("asking the backend pid: {}", pg_error(&e)))?
            .get(0);
        let cancel = client.cancel_token();
        let done = tokio::spawn(async move {
            client.execute(LOGIN_SQL, &[&user_id]).await?;
            Ok(Instant::now())
        });
        Ok(PendingLogin {
            pid,
            cancel,
            started: Instant::now(),
            done,
        })
    }

    /// Waits up to `limit` for the login: `Some(completed_at)`, or `None` if it is still
    /// blocked (it is then cancelled).
    pub(crate) async fn finish(self, limit: Duration) -> anyhow::Result<Option<Instant>> {
        match tokio::time::timeout(limit, self.done).await {
            Err(_) => {
                let _ = self.cancel.cancel_query(NoTls).await;
                Ok(None)
            }
            Ok(Err(e)) => Err(anyhow!("the login task failed: {e}")),
            Ok(Ok(Err(e))) => Err(anyhow!("the login failed: {}", pg_error(&e))),
            Ok(Ok(Ok(at))) => Ok(Some(at)),
        }
    }
}

/// Waits until `pg_blocking_pids(waiter)` names `holder`.
pub(crate) async fn wait_until_blocked(
    postgres: SocketAddr,
    waiter: i32,
    holder: i32,
) -> anyhow::Result<()> {
    let (observer, _connection) = connect(postgres, "lockguard-demo").await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let blocked: bool = observer
            .query_one("SELECT $2 = ANY(pg_blocking_pids($1))", &[&waiter, &holder])
            .await
            .map_err(|e| anyhow!("reading pg_blocking_pids: {}", pg_error(&e)))?
            .get(0);
        if blocked {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("backend {waiter} never waited for backend {holder}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
