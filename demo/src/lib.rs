//! `lockguard demo`: the orphaned-lock incident and its cure, played against a throwaway
//! PostgreSQL with nothing to configure.
//!
//! Three acts, narrated as a timeline:
//! 1. through lockguard, an app session updates a user's row in `app.user_sessions` and then
//!    goes silent inside its transaction (the crashed-handler case); a login for that user
//!    blocks until the guard's idle rule ends the holder;
//! 2. through lockguard, a separate app *process* holding the row lock dies abruptly; the
//!    login proceeds as soon as the proxy sees the connection drop, and the guard's audit
//!    event for that backend (read on the admin console) shows it terminated it;
//! 3. act 1 again on a direct connection: the login is still blocked after the same wait.
//!
//! Each act ends with a `RESULT` line; the integration test checks those.
//!
//! The proxy itself is handed in by the `lockguard` binary (see [`run`]): this crate cannot
//! depend on the `lockguard` library, whose package holds the binary that runs the demo.

mod acts;
mod app;
mod console;
mod sessions;
mod story;

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use lockguard_config::Config;
use lockguard_sandbox::{Sandbox, SandboxOptions, SUPERUSER, TRUST_ALL_HBA};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use acts::{crashed_process_through_lockguard, idle_holder_through_lockguard, without_lockguard};
use story::Story;

pub use app::app_process;

/// The table the demo protects: where a login records its session.
pub const PROTECTED_TABLE: &str = "app.user_sessions";

const SETUP_SQL: &str = "\
CREATE SCHEMA app;
CREATE TABLE app.user_sessions (
    user_id    int PRIMARY KEY,
    token      text,
    last_login timestamptz
);
INSERT INTO app.user_sessions (user_id, token)
    SELECT id, md5(id::text) FROM generate_series(1, 100) AS id;
CREATE ROLE app LOGIN;
GRANT USAGE ON SCHEMA app TO app;
GRANT SELECT, UPDATE ON app.user_sessions TO app;
";

/// The role the demo's application and login sessions use: an ordinary one, as in production
/// (the guard's role may not signal a superuser's backend).
const APP_ROLE: &str = "app";
/// The guard's role, created by the same script `lockguard setup-sql` prints: no superuser.
const GUARD_ROLE: &str = "lockguard";

const APP: &str = "app-server";
const LOGIN: &str = "login-service";

/// The login every act waits on.
const LOGIN_SQL: &str = "UPDATE app.user_sessions SET last_login = now() WHERE user_id = $1";

/// How long act 2 looks for the guard's audit event after the login was freed.
const EVENT_WAIT: Duration = Duration::from_secs(3);

/// How to run the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// After the acts, keep cluster, proxy and console up until Ctrl-C.
    pub keep_running: bool,
    /// ANSI colours; `None` decides from the terminal and `NO_COLOR`.
    pub color: Option<bool>,
    /// The guard's `idle_in_transaction_timeout` in the demo.
    pub idle_timeout: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            keep_running: false,
            color: None,
            idle_timeout: Duration::from_secs(3),
        }
    }
}

/// A running lockguard proxy, as the demo's `start_proxy` hands it back.
pub struct RunningProxy {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// The admin console's address.
    pub console: SocketAddr,
    /// Cancel to begin a graceful shutdown.
    pub shutdown: CancellationToken,
    /// Cancel to close every session at once.
    pub hard_stop: CancellationToken,
    /// The proxy's run, which ends once it has stopped.
    pub running: JoinHandle<anyhow::Result<()>>,
}

/// Runs the demo; `start_proxy` binds and starts lockguard with the demo's configuration.
/// Ctrl-C stops it and cleans up.
pub async fn run<Start, Started>(options: DemoOptions, start_proxy: Start) -> anyhow::Result<()>
where
    Start: FnOnce(Config) -> Started,
    Started: Future<Output = anyhow::Result<RunningProxy>>,
{
    let color = options.color.unwrap_or_else(|| {
        std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
    });
    let story = Story::new(color);
    tokio::select! {
        result = play(&options, &story, start_proxy) => result,
        _ = tokio::signal::ctrl_c() => {
            story.note("interrupted: stopping PostgreSQL and removing its files");
            Ok(())
        }
    }
    // Leaving `play` drops the sandbox (cluster stopped, temp dir removed) and the proxy.
}

async fn play<Start, Started>(
    options: &DemoOptions,
    story: &Story,
    start_proxy: Start,
) -> anyhow::Result<()>
where
    Start: FnOnce(Config) -> Started,
    Started: Future<Output = anyhow::Result<RunningProxy>>,
{
    story.title("lockguard demo: an orphaned lock on app.user_sessions, and its cure");
    story.note("starting a throwaway PostgreSQL from the installed server binaries ...");
    let guard_setup = guard_core::setup::setup_sql(GUARD_ROLE, GUARD_ROLE)
        .map_err(|e| anyhow!("the guard role's setup SQL: {e}"))?;
    let setup_sql = format!("{SETUP_SQL}\n{guard_setup}");
    let sandbox = tokio::task::spawn_blocking(move || {
        Sandbox::start(SandboxOptions {
            temp_prefix: "lockguard-demo-",
            pg_hba: TRUST_ALL_HBA,
            settings: &[],
            setup_sql: &setup_sql,
        })
    })
    .await
    .context("the sandbox task failed")??;
    let sandbox = Arc::new(sandbox);

    let proxy = start_proxy(demo_config(&sandbox, options.idle_timeout))
        .await
        .context("starting lockguard")?;
    let addrs = Addresses {
        postgres: SocketAddr::from(([127, 0, 0, 1], sandbox.port())),
        proxy: proxy.listen,
        console: proxy.console,
    };
    story.note(&format!(
        "PostgreSQL on {}; lockguard on {} protecting {PROTECTED_TABLE} \
         (idle_in_transaction_timeout = {}s); admin console on {}",
        addrs.postgres,
        addrs.proxy,
        options.idle_timeout.as_secs_f64(),
        addrs.console
    ));

    let acts = async {
        let first = idle_holder_through_lockguard(&addrs, story).await?;
        crashed_process_through_lockguard(&addrs, story).await?;
        without_lockguard(&addrs, story, first + Duration::from_secs(2)).await
    };
    let result = acts.await;
    if result.is_ok() && options.keep_running {
        keep_running(&addrs, story).await;
    }
    proxy.shutdown.cancel();
    proxy.hard_stop.cancel();
    let _ = proxy.running.await;
    drop(sandbox);
    result
}

/// Where everything listens.
struct Addresses {
    postgres: SocketAddr,
    proxy: SocketAddr,
    console: SocketAddr,
}

fn demo_config(sandbox: &Sandbox, idle_timeout: Duration) -> Config {
    let mut config = Config::default();
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    config.proxy.listen = loopback(0);
    config.proxy.upstream = lockguard_config::Upstream::Tcp {
        host: sandbox.host().to_owned(),
        port: sandbox.port(),
    };
    config.proxy.shutdown_timeout = Duration::from_secs(1);
    config.guard.dsn = Some(format!(
        "host={} port={} user={GUARD_ROLE} dbname=postgres",
        sandbox.host(),
        sandbox.port()
    ));
    config.guard.protected_tables = vec![PROTECTED_TABLE.to_owned()];
    config.guard.idle_in_transaction_timeout = idle_timeout;
    config.guard.sweep_interval = Duration::from_millis(250);
    config.admin.listen = loopback(0);
    config.admin.trust_loopback = true;
    config.admin.http_listen = loopback(0);
    config
}

async fn keep_running(addrs: &Addresses, story: &Story) {
    story.act("Still running: explore with psql (Ctrl-C stops everything and cleans up)");
    story.note(&format!(
        "through lockguard:  psql \"host=127.0.0.1 port={} user={SUPERUSER} dbname=postgres\"",
        addrs.proxy.port()
    ));
    story.note(&format!(
        "admin console:      psql \"host=127.0.0.1 port={} user=admin dbname=lockguard\"  (try SHOW CLIENTS;)",
        addrs.console.port()
    ));
    story.note(&format!(
        "PostgreSQL direct:  psql \"host=127.0.0.1 port={} user={SUPERUSER} dbname=postgres\"",
        addrs.postgres.port()
    ));
    let _ = tokio::signal::ctrl_c().await;
    story.note("stopping");
}
