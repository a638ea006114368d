//! lockguard with a real PgBouncer. The common deployment is app → PgBouncer → lockguard →
//! PostgreSQL: PgBouncer's server connections are lockguard's clients, so lockguard sees the
//! real BackendKeyData and maps every backend. Tested in `pool_mode = session` and
//! `transaction`: a killed app mid-statement (PgBouncer then sends Terminate on a busy server
//! connection), an app idle in its transaction, SHOW CLIENTS, and plain pgbench traffic.
//!
//! Put in *front* of PgBouncer, lockguard gets PgBouncer's own BackendKeyData and cannot map
//! backends; it must say so in its log.
//!
//! Skipped with a message when PgBouncer is not installed, except under `CI=true`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guard_core::{AuditEvent, Outcome, TxnState};
use lockguard::GuardHandle;
use lockguard_config::{Config, Upstream};
use lockguard_sandbox::named_rows;
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{self, app_role, wait_for, BlockedLogin};
use lockguard_tests::logs;
use lockguard_tests::pgbouncer::{self, PgBouncer, PgBouncerOptions, PoolMode};
use lockguard_tests::proxy::{config_for, TestProxy};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const PROTECTED: &str = "app.user_sessions";
const INFLIGHT_GRACE: Duration = Duration::from_millis(500);
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);

// ---- the chain ---------------------------------------------------------------------------

/// lockguard started in-process with its console, its log captured; stopped on drop.
struct Lockguard {
    proxy: TestProxy,
    console: SocketAddr,
    guard: GuardHandle,
}

impl Lockguard {
    /// lockguard forwarding to `upstream`, its guard (connected to the test cluster itself)
    /// protecting [`PROTECTED`], its console open to loopback logins.
    async fn start(upstream: Upstream) -> Lockguard {
        let cluster = TestCluster::shared();
        let mut config: Config = config_for(cluster);
        config.proxy.upstream = upstream;
        let role = guard_support::guard_config(cluster, &[]);
        config.guard.dsn = role.dsn;
        config.guard.password_env = role.password_env;
        config.guard.protected_tables = vec![PROTECTED.to_owned()];
        config.guard.inflight_grace = INFLIGHT_GRACE;
        config.guard.idle_in_transaction_timeout = IDLE_TIMEOUT;
        config.guard.sweep_interval = Duration::from_millis(100);
        config.admin.trust_loopback = true;
        config.admin.http_enabled = false;
        let proxy = TestProxy::options(config).capture_logs().start().await;
        Lockguard {
            console: proxy.console.expect("console enabled"),
            guard: proxy.guard().expect("guard configured").clone(),
            proxy,
        }
    }

    /// `SHOW CLIENTS` on the console, as (column → value) maps.
    async fn show_clients(&self) -> Vec<std::collections::HashMap<String, Option<String>>> {
        let console = connect(self.console, "ops", "lockguard").await;
        rows(&console, "SHOW CLIENTS").await
    }

    /// The audit event about backend `pid`, once recorded.
    async fn event_for(&self, pid: i32) -> AuditEvent {
        let find = || {
            self.guard
                .audit()
                .recent()
                .into_iter()
                .find(|e| e.backend_pid == pid)
        };
        wait_for(
            Duration::from_secs(3),
            &format!("an audit event for backend {pid}"),
            || {
                let found = find().is_some();
                async move { found }
            },
        )
        .await;
        find().expect("the event just seen")
    }
}

/// app → PgBouncer → lockguard → PostgreSQL, on a fresh guard test database.
struct Chain {
    db: String,
    /// Direct superuser connection to `db`, for setup and for watching locks.
    observer: Client,
    lockguard: Lockguard,
    bouncer: PgBouncer,
}

impl Chain {
    /// `None` when PgBouncer is missing outside CI (the test is skipped).
    async fn start(test: &str, mode: PoolMode) -> Option<Chain> {
        let binary = pgbouncer::binary(test)?;
        let cluster = TestCluster::shared();
        let db = guard_support::guard_test_database(cluster, test).await;
        let observer = guard_support::connect(cluster, &db).await;
        let lockguard = Lockguard::start(Upstream::Tcp {
            host: cluster.host().to_owned(),
            port: cluster.port(),
        })
        .await;
        let bouncer = start_pgbouncer(binary, lockguard.proxy.addr, mode).await;
        Some(Chain {
            db,
            observer,
            lockguard,
            bouncer,
        })
    }

    /// An application connection through PgBouncer.
    async fn app(
        &self,
    ) -> (
        Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ) {
        let (client, connection) = app_config(self.bouncer.addr(), &self.db)
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connecting through PgBouncer: {e:?}\n--- PgBouncer log ---\n{}",
                    self.bouncer.log()
                )
            });
        (client, tokio::spawn(connection))
    }
}

/// Starts PgBouncer (off the runtime: it waits for the port) in front of `server`.
async fn start_pgbouncer(
    binary: std::path::PathBuf,
    server: SocketAddr,
    pool_mode: PoolMode,
) -> PgBouncer {
    let cluster = TestCluster::shared();
    // The superuser first: PgBouncer's admin. Apps log in as an ordinary role, since the
    // guard's role may not signal a superuser's backend.
    let superuser = cluster.superuser().to_owned();
    let app = app_role(cluster).to_owned();
    tokio::task::spawn_blocking(move || {
        PgBouncer::start(
            &binary,
            &PgBouncerOptions {
                server,
                pool_mode,
                users: &[superuser.as_str(), app.as_str()],
            },
        )
    })
    .await
    .expect("PgBouncer start task")
    .unwrap_or_else(|e| panic!("starting PgBouncer: {e}"))
}

fn app_config(addr: SocketAddr, db: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(app_role(TestCluster::shared()))
        .dbname(db)
        .application_name("pgbouncer-test-app")
        .connect_timeout(Duration::from_secs(10));
    config
}

async fn connect(addr: SocketAddr, user: &str, db: &str) -> Client {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(user)
        .dbname(db)
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = config
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr} as {user}: {e:?}"));
    tokio::spawn(connection);
    client
}

/// A simple query's rows as (column → value) maps.
async fn rows(
    client: &Client,
    sql: &str,
) -> Vec<std::collections::HashMap<String, Option<String>>> {
    let answer = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    named_rows(&answer)
        .into_iter()
        .map(|row| row.into_iter().collect())
        .collect()
}

/// The backend holding a granted RowExclusiveLock on the protected table of the observer's
/// database, once there is one.
async fn protected_row_holder(observer: &Client) -> i32 {
    let query = "SELECT l.pid FROM pg_catalog.pg_locks l \
                 JOIN pg_catalog.pg_class c ON c.oid = l.relation \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE l.granted AND l.mode = 'RowExclusiveLock' \
                   AND n.nspname = 'app' AND c.relname = 'user_sessions' \
                   AND l.database = (SELECT oid FROM pg_catalog.pg_database \
                                     WHERE datname = pg_catalog.current_database())";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(row) = observer
            .query_opt(query, &[])
            .await
            .expect("reading pg_locks")
        {
            return row.get(0);
        }
        assert!(
            Instant::now() < deadline,
            "no backend took the protected row lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens a transaction that updates protected row `id` and returns its backend's pid (one
/// simple query, so in transaction mode PgBouncer keeps one server connection for it).
async fn begin_holding_row(app: &Client, id: i32) -> i32 {
    let replies = app
        .simple_query(&format!(
            "BEGIN; UPDATE {PROTECTED} SET token = 'held' WHERE id = {id}; \
             SELECT pg_catalog.pg_backend_pid()"
        ))
        .await
        .expect("the app's transaction");
    replies
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .and_then(|pid| pid.parse().ok())
        .expect("the app's backend pid")
}

// ---- an app killed mid-statement -----------------------------------------------------------

/// The incident behind PgBouncer: an app process runs `BEGIN; UPDATE ...; SELECT pg_sleep(30)`
/// and is killed with SIGKILL. PgBouncer closes its busy server connection with Terminate;
/// lockguard must treat that as a lost client, so the waiter is freed within the in-flight
/// grace + 1 s, and the audit says why.
async fn killed_app_mid_statement(test: &str, mode: PoolMode) {
    let Some(chain) = Chain::start(test, mode).await else {
        return;
    };
    let cluster = TestCluster::shared();
    let sql =
        format!("BEGIN; UPDATE {PROTECTED} SET token = 'app' WHERE id = 1; SELECT pg_sleep(30)");
    let mut app = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-p", &chain.bouncer.port().to_string()])
        .args(["-U", app_role(cluster), "-d", &chain.db, "-c", &sql])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("running psql as the app (postgresql-client): {e}"));

    let holder = protected_row_holder(&chain.observer).await;
    // lockguard knows PgBouncer's server connection by its real backend.
    let session = chain
        .lockguard
        .proxy
        .registry()
        .find_by_pid(holder)
        .unwrap_or_else(|| panic!("lockguard has no session for backend {holder}"));
    assert_eq!(session.state(), TxnState::Active);
    let waiter = BlockedLogin::start(cluster, &chain.db, &chain.observer).await;

    app.kill().expect("SIGKILL the app");
    let killed = Instant::now();
    let _ = app.wait();
    let proceeded = waiter
        .proceeds(INFLIGHT_GRACE + Duration::from_secs(1))
        .await;
    let freed_after = proceeded - killed;
    assert!(
        freed_after >= INFLIGHT_GRACE - Duration::from_millis(50),
        "freed before the in-flight grace ended: {freed_after:?}"
    );

    let event = chain.lockguard.event_for(holder).await;
    assert_eq!(event.outcome, Outcome::Terminated, "{event:?}");
    assert_eq!(event.trigger, "client_loss");
    let cause = event.cause.as_deref().unwrap_or_default();
    assert!(
        cause.starts_with("Terminate while busy"),
        "cause: {cause:?}"
    );
    assert!(
        event.locks.iter().any(|l| l.table == PROTECTED),
        "{:?}",
        event.locks
    );
    assert!(event.last_statement.contains("pg_sleep(30)"), "{event:?}");
}

#[tokio::test]
async fn session_mode_an_app_killed_mid_statement_is_freed_after_the_inflight_grace() {
    killed_app_mid_statement("pgb_session_killed", PoolMode::Session).await;
}

#[tokio::test]
async fn transaction_mode_an_app_killed_mid_statement_is_freed_after_the_inflight_grace() {
    killed_app_mid_statement("pgb_txn_killed", PoolMode::Transaction).await;
}

// ---- an app idle in its transaction --------------------------------------------------------

/// An app (alive, connected through PgBouncer) leaves its transaction open holding the
/// protected row: at the idle timeout lockguard terminates the backend, the waiter proceeds,
/// and the app gets an error.
async fn idle_app_in_transaction(test: &str, mode: PoolMode) {
    let Some(chain) = Chain::start(test, mode).await else {
        return;
    };
    let (app, connection) = chain.app().await;
    let pid = begin_holding_row(&app, 1).await;
    let idle_since = Instant::now();
    let waiter = BlockedLogin::start(TestCluster::shared(), &chain.db, &chain.observer).await;

    let proceeded = waiter.proceeds(IDLE_TIMEOUT + Duration::from_secs(2)).await;
    let freed_after = proceeded - idle_since;
    assert!(
        freed_after >= IDLE_TIMEOUT && freed_after < IDLE_TIMEOUT + Duration::from_secs(1),
        "freed {freed_after:?} after the app went idle (timeout {IDLE_TIMEOUT:?})"
    );

    // The app hears of it: its connection ends with lockguard's FATAL, passed on by PgBouncer.
    let ended = tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the app's connection ends")
        .expect("connection task");
    let error = ended.expect_err("the app's connection ends with an error");
    let db_error = error.as_db_error().expect("a FATAL from the server side");
    assert_eq!(db_error.code().code(), "57P01", "{error:?}");
    assert!(
        db_error.message().starts_with("lockguard: terminated"),
        "{error:?}"
    );
    app.batch_execute("SELECT 1")
        .await
        .expect_err("the app's next statement fails");

    let event = chain.lockguard.event_for(pid).await;
    assert_eq!(event.trigger, "idle_in_transaction", "{event:?}");
    assert_eq!(event.outcome, Outcome::Terminated, "{event:?}");
}

#[tokio::test]
async fn session_mode_an_app_idle_in_its_transaction_is_freed_at_the_idle_timeout_and_told() {
    idle_app_in_transaction("pgb_session_idle", PoolMode::Session).await;
}

#[tokio::test]
async fn transaction_mode_an_app_idle_in_its_transaction_is_freed_at_the_idle_timeout_and_told() {
    idle_app_in_transaction("pgb_txn_idle", PoolMode::Transaction).await;
}

// ---- SHOW CLIENTS --------------------------------------------------------------------------

/// Three apps, each in a transaction holding a protected row (so each has a server connection
/// of its own, in either mode): lockguard's SHOW CLIENTS lists exactly PgBouncer's server
/// connections (its SHOW SERVERS), each with the real backend pid and its lock.
async fn show_clients_lists_server_connections(test: &str, mode: PoolMode) {
    let Some(chain) = Chain::start(test, mode).await else {
        return;
    };
    let mut apps = Vec::new();
    let mut app_pids = BTreeSet::new();
    for id in 1..=3 {
        let (app, _connection) = chain.app().await;
        app_pids.insert(begin_holding_row(&app, id).await);
        apps.push(app);
    }

    let pgbouncer_console = connect(
        chain.bouncer.addr(),
        TestCluster::shared().superuser(),
        "pgbouncer",
    )
    .await;
    let servers: BTreeSet<i32> = rows(&pgbouncer_console, "SHOW SERVERS")
        .await
        .iter()
        .filter_map(|r| r.get("remote_pid").cloned().flatten())
        .filter_map(|pid| pid.parse().ok())
        .collect();
    assert_eq!(servers, app_pids, "PgBouncer's server connections");

    let clients = chain.lockguard.show_clients().await;
    let listed: BTreeSet<i32> = clients
        .iter()
        .filter_map(|r| r.get("backend_pid").cloned().flatten())
        .filter_map(|pid| pid.parse().ok())
        .collect();
    assert_eq!(listed, servers, "SHOW CLIENTS: {clients:?}");
    for row in &clients {
        let get = |column: &str| row.get(column).cloned().flatten();
        assert_eq!(get("client_addr").as_deref(), Some("127.0.0.1"), "{row:?}");
        assert_eq!(
            get("state").as_deref(),
            Some("idle in transaction"),
            "{row:?}"
        );
        assert_eq!(get("protected_locks").as_deref(), Some("1"), "{row:?}");
    }
    drop(apps);
}

#[tokio::test]
async fn session_mode_show_clients_lists_pgbouncer_server_connections_with_backend_pids() {
    show_clients_lists_server_connections("pgb_session_show", PoolMode::Session).await;
}

#[tokio::test]
async fn transaction_mode_show_clients_lists_pgbouncer_server_connections_with_backend_pids() {
    show_clients_lists_server_connections("pgb_txn_show", PoolMode::Transaction).await;
}

// ---- normal traffic ------------------------------------------------------------------------

/// pgbench's TPC-B-like load through the chain for a few seconds, 4 clients: no errors, and
/// lockguard touched nothing.
async fn pgbench_through_the_chain(test: &str, mode: PoolMode) {
    let Some(chain) = Chain::start(test, mode).await else {
        return;
    };
    let cluster = TestCluster::shared();
    let direct_port = cluster.port().to_string();
    let chain_port = chain.bouncer.port().to_string();
    let user = cluster.superuser().to_owned();
    let db = chain.db.clone();
    let pgbench = move |port: &str, args: &[&str]| {
        let output = Command::new("pgbench")
            .args(["-h", "127.0.0.1", "-p", port, "-U", &user])
            .args(args)
            .arg(&db)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running pgbench (postgresql-client): {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "pgbench {args:?}: {text}");
        text
    };
    let report = tokio::task::spawn_blocking(move || {
        pgbench(&direct_port, &["-i", "-q", "-s", "1"]);
        pgbench(&chain_port, &["-c", "4", "-j", "2", "-T", "3", "-n"])
    })
    .await
    .expect("pgbench task");

    let processed = report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next())
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no transaction count in:\n{report}"));
    assert!(processed > 0, "{report}");
    assert!(
        report.contains("number of failed transactions: 0 "),
        "{report}"
    );
    assert!(
        chain
            .lockguard
            .guard
            .audit()
            .recent()
            .iter()
            .all(|e| e.database != chain.db),
        "lockguard acted on pgbench's sessions"
    );
}

#[tokio::test]
async fn session_mode_pgbench_through_pgbouncer_and_lockguard_has_no_errors() {
    pgbench_through_the_chain("pgb_session_bench", PoolMode::Session).await;
}

#[tokio::test]
async fn transaction_mode_pgbench_through_pgbouncer_and_lockguard_has_no_errors() {
    pgbench_through_the_chain("pgb_txn_bench", PoolMode::Transaction).await;
}

// ---- lockguard in front of PgBouncer ---------------------------------------------------------

/// app → lockguard → PgBouncer → PostgreSQL: the BackendKeyData lockguard sees is PgBouncer's
/// own, so no backend can be mapped. The first probe that covers the session (here SHOW
/// CLIENTS) makes lockguard say so in its log, once per session.
#[tokio::test]
async fn in_front_of_pgbouncer_lockguard_logs_that_it_cannot_map_backends() {
    let test = "pgb_in_front";
    let Some(binary) = pgbouncer::binary(test) else {
        return;
    };
    let cluster = TestCluster::shared();
    let db = guard_support::guard_test_database(cluster, test).await;
    let server = SocketAddr::new(
        cluster.host().parse().expect("the cluster's host is an IP"),
        cluster.port(),
    );
    let bouncer = start_pgbouncer(binary, server, PoolMode::Session).await;
    let lockguard = Lockguard::start(Upstream::Tcp {
        host: "127.0.0.1".to_owned(),
        port: bouncer.port(),
    })
    .await;
    let app = connect_app(lockguard.proxy.addr, &db).await;
    let real_pid: i32 = app
        .query_one("SELECT pg_catalog.pg_backend_pid()", &[])
        .await
        .expect("the app's backend pid")
        .get(0);
    let sessions = lockguard.proxy.registry().snapshot();
    let [session] = sessions.as_slice() else {
        panic!("one session expected, got {}", sessions.len());
    };
    assert_ne!(
        session.backend_pid(),
        Some(real_pid),
        "PgBouncer handed out the real pid"
    );

    let marker = format!("session_id={}", session.id);
    let needles = [
        "probably not connected to PostgreSQL directly",
        "PgBouncer",
        marker.as_str(),
    ];
    lockguard.show_clients().await;
    assert_eq!(
        logs::lines_with(&needles).len(),
        1,
        "captured log:\n{}",
        logs::all()
    );
    // Once per session: the next probe (SHOW CLIENTS waits for a fresh one) says nothing new.
    lockguard.show_clients().await;
    assert_eq!(logs::lines_with(&needles).len(), 1);
    drop(app);
}

async fn connect_app(addr: SocketAddr, db: &str) -> Client {
    let (client, connection) = app_config(addr, db)
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting through lockguard to PgBouncer: {e:?}"));
    tokio::spawn(connection);
    client
}
