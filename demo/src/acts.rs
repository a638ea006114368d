//! The demo's three acts.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use guard_core::policy::TriggerKind;
use guard_core::Outcome;

use crate::app::AppProcess;
use crate::console::{column, Console};
use crate::sessions::{connect, hold_row_lock, server_says, wait_until_blocked, PendingLogin};
use crate::story::Story;
use crate::{Addresses, APP, LOGIN, LOGIN_SQL, PROTECTED_TABLE};

/// Act 1: the holder stays connected but silent; the idle rule ends it.
pub(crate) async fn idle_holder_through_lockguard(
    addrs: &Addresses,
    story: &Story,
) -> anyhow::Result<Duration> {
    story.act("Incident 1 — crashed app, connection left open (through lockguard)");
    let user_id = 42;
    let (app, app_connection) = connect(addrs.proxy, APP).await?;
    let app_pid = hold_row_lock(&app, user_id).await?;
    let idle_since = Instant::now();
    story.app(&format!(
        "{APP} (backend {app_pid}): BEGIN; UPDATE app.user_sessions SET token = 'new' \
         WHERE user_id = {user_id};"
    ));
    story.app(&format!(
        "{APP}: stack overflow in the request handler: the connection stays open, the \
         transaction never ends"
    ));
    let login = PendingLogin::start(addrs.proxy, user_id).await?;
    wait_until_blocked(addrs.postgres, login.pid, app_pid).await?;
    story.login(&format!(
        "{LOGIN} (backend {}): {} ... waiting, blocked by backend {app_pid}",
        login.pid,
        LOGIN_SQL.replace("$1", &user_id.to_string())
    ));
    let console = Console::connect(addrs.console).await?;
    story.console("SHOW CLIENTS", &console.row_of("SHOW CLIENTS", APP).await?);

    let login_started = login.started;
    let completed = login
        .finish(Duration::from_secs(30))
        .await?
        .ok_or_else(|| anyhow!("the login was still blocked after 30 s"))?;
    story.guard(&format!(
        "lockguard terminated backend {app_pid}: idle in transaction for {:.1} s while holding a \
         lock on {PROTECTED_TABLE} that {LOGIN} waited for",
        (completed - idle_since).as_secs_f64()
    ));
    match tokio::time::timeout(Duration::from_secs(5), app_connection).await {
        Ok(Ok(Err(e))) => story.app(&format!("{APP}'s connection was told: {}", server_says(&e))),
        _ => story.app(&format!("{APP}'s connection was closed")),
    }
    let waited = completed - login_started;
    story.login(&format!(
        "{LOGIN}: login completed after waiting {:.1} s",
        waited.as_secs_f64()
    ));
    story.console("SHOW EVENTS", &console.first_row("SHOW EVENTS").await?);
    story.result(&format!(
        "RESULT incident 1 (idle holder) with lockguard: the blocked login succeeded after {:.1} s",
        waited.as_secs_f64()
    ));
    Ok(waited)
}

/// Act 2: the holder's whole process dies; the proxy sees the connection drop. PostgreSQL
/// would also release the lock once the proxy closes the upstream socket, so the login
/// completing proves nothing by itself: the guard's audit event for the backend is the
/// evidence the narration rests on.
pub(crate) async fn crashed_process_through_lockguard(
    addrs: &Addresses,
    story: &Story,
) -> anyhow::Result<()> {
    story.act("Incident 2 — crashed app process (through lockguard)");
    let user_id = 7;
    let proxy = addrs.proxy;
    let mut app = tokio::task::spawn_blocking(move || AppProcess::spawn(proxy, user_id))
        .await
        .context("the app process task failed")??;
    story.app(&format!(
        "{APP} process {} (backend {}): BEGIN; UPDATE app.user_sessions SET token = 'new' \
         WHERE user_id = {user_id};",
        app.os_pid(),
        app.backend_pid
    ));
    let login = PendingLogin::start(addrs.proxy, user_id).await?;
    wait_until_blocked(addrs.postgres, login.pid, app.backend_pid).await?;
    story.login(&format!(
        "{LOGIN} (backend {}): login for user {user_id} ... waiting, blocked by backend {}",
        login.pid, app.backend_pid
    ));
    let console = Console::connect(addrs.console).await?;
    story.app(&format!(
        "kill -9 {}: the app process dies; its kernel closes the socket",
        app.os_pid()
    ));
    app.kill();
    let crashed = Instant::now();
    let completed = login
        .finish(Duration::from_secs(10))
        .await?
        .ok_or_else(|| anyhow!("the login was still blocked 10 s after the crash"))?;
    let after = completed.saturating_duration_since(crashed);
    let event = console.event_about(app.backend_pid).await?;
    let verdict = event.as_deref().map(ClientLossVerdict::of);
    match (&event, &verdict) {
        (Some(row), Some(ClientLossVerdict::Terminated { locks })) => story.guard(&format!(
            "lockguard saw the connection drop inside a transaction holding {locks} and \
             terminated backend {}",
            column(row, "backend_pid").unwrap_or_default()
        )),
        (Some(row), _) => story.problem(&format!(
            "lockguard's event for backend {} is trigger {}, outcome {}: not a termination \
             on client loss",
            app.backend_pid,
            column(row, "trigger").unwrap_or_default(),
            column(row, "outcome").unwrap_or_default()
        )),
        (None, _) => story.problem(&format!(
            "SHOW EVENTS has no event for backend {}: lockguard did not terminate it (the lock \
             went away because PostgreSQL rolls back a transaction whose connection closes)",
            app.backend_pid
        )),
    }
    story.login(&format!(
        "{LOGIN}: login completed {} ms after the crash",
        after.as_millis()
    ));
    if let Some(row) = &event {
        story.console("SHOW EVENTS", row);
    }
    let evidence = match verdict {
        Some(ClientLossVerdict::Terminated { .. }) => format!(
            "; lockguard terminated backend {} on client loss",
            app.backend_pid
        ),
        _ => format!(
            ", but lockguard recorded no client-loss termination of backend {}",
            app.backend_pid
        ),
    };
    story.result(&format!(
        "RESULT incident 2 (crashed process) with lockguard: the blocked login succeeded {} ms \
         after the crash{evidence}",
        after.as_millis()
    ));
    Ok(())
}

/// What an audit event row says about a lost client's backend.
enum ClientLossVerdict {
    /// Trigger `client_loss`, outcome `terminated`; `locks` as the event lists them.
    Terminated { locks: String },
    /// Anything else.
    Other,
}

impl ClientLossVerdict {
    fn of(row: &[(String, String)]) -> ClientLossVerdict {
        let client_loss = TriggerKind::ClientLoss.name();
        if column(row, "trigger") == Some(client_loss)
            && column(row, "outcome") == Some(Outcome::Terminated.as_str())
        {
            ClientLossVerdict::Terminated {
                locks: column(row, "locks").unwrap_or_default().to_owned(),
            }
        } else {
            ClientLossVerdict::Other
        }
    }
}

/// Act 3: act 1 on a direct connection.
pub(crate) async fn without_lockguard(
    addrs: &Addresses,
    story: &Story,
    wait: Duration,
) -> anyhow::Result<()> {
    story.act("The same incident 1 without lockguard (direct connection to PostgreSQL)");
    let user_id = 43;
    let (app, _app_connection) = connect(addrs.postgres, APP).await?;
    let app_pid = hold_row_lock(&app, user_id).await?;
    story.app(&format!(
        "{APP} (backend {app_pid}): BEGIN; UPDATE app.user_sessions ... WHERE user_id = \
         {user_id}; then silence"
    ));
    let login = PendingLogin::start(addrs.postgres, user_id).await?;
    wait_until_blocked(addrs.postgres, login.pid, app_pid).await?;
    story.login(&format!(
        "{LOGIN} (backend {}): login for user {user_id} ... waiting",
        login.pid
    ));
    let started = login.started;
    if let Some(completed) = login.finish(wait).await? {
        bail!(
            "without lockguard the login completed after {:.1} s: something else ended the holder",
            (completed - started).as_secs_f64()
        );
    }
    story.problem(&format!(
        "{LOGIN}: still blocked after {:.1} s. Without lockguard an operator has to find backend \
         {app_pid} in pg_locks and run pg_terminate_backend({app_pid}); stopping the login now",
        wait.as_secs_f64()
    ));
    drop(app);
    story.result(&format!(
        "RESULT without lockguard: the login was still blocked after {:.1} s",
        wait.as_secs_f64()
    ));
    Ok(())
}
