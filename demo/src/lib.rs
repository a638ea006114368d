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

use std::future::Future;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use guard_core::policy::TriggerKind;
use guard_core::Outcome;
use lockguard_config::Config;
use lockguard_sandbox::{pg_error, Sandbox, SandboxOptions, SUPERUSER, TRUST_ALL_HBA};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

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

/// Act 1: the holder stays connected but silent; the idle rule ends it.
async fn idle_holder_through_lockguard(
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
    let login = Login::start(addrs.proxy, user_id).await?;
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
async fn crashed_process_through_lockguard(addrs: &Addresses, story: &Story) -> anyhow::Result<()> {
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
    let login = Login::start(addrs.proxy, user_id).await?;
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

/// The value of column `name` in a console row.
fn column<'a>(row: &'a [(String, String)], name: &str) -> Option<&'a str> {
    row.iter()
        .find(|(column, _)| column == name)
        .map(|(_, value)| value.as_str())
}

/// Act 3: act 1 on a direct connection.
async fn without_lockguard(addrs: &Addresses, story: &Story, wait: Duration) -> anyhow::Result<()> {
    story.act("The same incident 1 without lockguard (direct connection to PostgreSQL)");
    let user_id = 43;
    let (app, _app_connection) = connect(addrs.postgres, APP).await?;
    let app_pid = hold_row_lock(&app, user_id).await?;
    story.app(&format!(
        "{APP} (backend {app_pid}): BEGIN; UPDATE app.user_sessions ... WHERE user_id = \
         {user_id}; then silence"
    ));
    let login = Login::start(addrs.postgres, user_id).await?;
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

/// "FATAL 57P01: message" for a server error, the error otherwise.
fn server_says(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Connects as the superuser with `application_name`; the connection task is returned so the
/// caller can see how it ended.
async fn connect(
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
async fn hold_row_lock(client: &Client, user_id: i32) -> anyhow::Result<i32> {
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
struct Login {
    pid: i32,
    cancel: tokio_postgres::CancelToken,
    started: Instant,
    done: JoinHandle<Result<Instant, tokio_postgres::Error>>,
}

impl Login {
    async fn start(addr: SocketAddr, user_id: i32) -> anyhow::Result<Login> {
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
        Ok(Login {
            pid,
            cancel,
            started: Instant::now(),
            done,
        })
    }

    /// Waits up to `limit` for the login: `Some(completed_at)`, or `None` if it is still
    /// blocked (it is then cancelled).
    async fn finish(self, limit: Duration) -> anyhow::Result<Option<Instant>> {
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
async fn wait_until_blocked(postgres: SocketAddr, waiter: i32, holder: i32) -> anyhow::Result<()> {
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

/// The admin console, as psql would use it.
struct Console {
    client: Client,
}

impl Console {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Console> {
        let (client, _connection) = connect(addr, "lockguard-demo").await?;
        Ok(Console { client })
    }

    async fn rows(&self, command: &str) -> anyhow::Result<Vec<Vec<(String, String)>>> {
        let messages = self
            .client
            .simple_query(command)
            .await
            .map_err(|e| anyhow!("admin console {command}: {}", pg_error(&e)))?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    row.columns()
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            (
                                c.name().to_owned(),
                                row.get(i).unwrap_or_default().to_owned(),
                            )
                        })
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    /// The row of `command` whose `application_name` is `application`.
    async fn row_of(
        &self,
        command: &str,
        application: &str,
    ) -> anyhow::Result<Vec<(String, String)>> {
        self.rows(command)
            .await?
            .into_iter()
            .find(|row| {
                row.iter()
                    .any(|(name, value)| name == "application_name" && value == application)
            })
            .ok_or_else(|| anyhow!("{command} shows no client named {application}"))
    }

    /// The newest `SHOW EVENTS` row about `backend_pid`. The guard records its event right
    /// after the kill, which may be a moment after the freed login completes, so this waits
    /// up to [`EVENT_WAIT`] before concluding there is none.
    async fn event_about(&self, backend_pid: i32) -> anyhow::Result<Option<Vec<(String, String)>>> {
        let pid = backend_pid.to_string();
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            let found = self
                .rows("SHOW EVENTS")
                .await?
                .into_iter()
                .find(|row| column(row, "backend_pid") == Some(pid.as_str()));
            if found.is_some() || Instant::now() > deadline {
                return Ok(found);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn first_row(&self, command: &str) -> anyhow::Result<Vec<(String, String)>> {
        self.rows(command)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("{command} returned no rows"))
    }
}

/// The app of act 2: this binary run as `lockguard demo-app`, so that killing it is a real
/// process crash.
struct AppProcess {
    child: Child,
    backend_pid: i32,
}

impl AppProcess {
    fn spawn(proxy: SocketAddr, user_id: i32) -> anyhow::Result<AppProcess> {
        let exe = std::env::current_exe().context("finding the lockguard executable")?;
        let child = Command::new(exe)
            .args(["demo-app", "--addr", &proxy.to_string()])
            .args(["--user-id", &user_id.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the demo app process")?;
        // From here on, dropping `app` kills the child.
        let mut app = AppProcess {
            child,
            backend_pid: 0,
        };
        let mut line = String::new();
        if let Some(stdout) = app.child.stdout.take() {
            BufReader::new(stdout)
                .read_line(&mut line)
                .context("reading from the demo app process")?;
        }
        app.backend_pid = line
            .trim()
            .strip_prefix("holding ")
            .and_then(|pid| pid.parse().ok())
            .ok_or_else(|| anyhow!("the demo app process did not take its lock ({line:?})"))?;
        Ok(app)
    }

    fn os_pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AppProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `lockguard demo-app`: connect to `addr`, take the row lock of `user_id` in an open
/// transaction, say `holding <backend pid>` on stdout, and wait to be killed.
pub async fn app_process(addr: SocketAddr, user_id: i32) -> anyhow::Result<()> {
    let (client, connection) = connect(addr, APP).await?;
    let pid = hold_row_lock(&client, user_id).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "holding {pid}")?;
    stdout.flush()?;
    let _ = connection.await;
    bail!("the connection ended before the process was killed")
}

/// The narration: a timeline with elapsed time, coloured by who speaks.
struct Story {
    start: Instant,
    color: bool,
}

impl Story {
    fn new(color: bool) -> Story {
        Story {
            start: Instant::now(),
            color,
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn line(&self, code: &str, text: &str) {
        let at = format!("[+{:6.2}s]", self.start.elapsed().as_secs_f64());
        println!("{} {}", self.paint("2", &at), self.paint(code, text));
    }

    fn title(&self, text: &str) {
        println!("{}", self.paint("1", &format!("== {text}")));
    }

    fn act(&self, text: &str) {
        println!();
        println!("{}", self.paint("1;4", text));
    }

    fn note(&self, text: &str) {
        self.line("0", text);
    }

    fn app(&self, text: &str) {
        self.line("33", text);
    }

    fn login(&self, text: &str) {
        self.line("36", text);
    }

    fn guard(&self, text: &str) {
        self.line("32;1", text);
    }

    fn problem(&self, text: &str) {
        self.line("31;1", text);
    }

    fn console(&self, command: &str, row: &[(String, String)]) {
        self.line("35", &format!("admin console> {command}"));
        for (name, value) in row.iter().filter(|(_, v)| !v.is_empty()) {
            println!("{:14}{name:>18} | {value}", "");
        }
    }

    fn result(&self, text: &str) {
        println!("{}", self.paint("1", text));
    }
}
