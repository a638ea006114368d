//! Helpers for testing the guard without the proxy: direct connections whose upstream
//! identity we know (so a hand-made [`SessionRecord`] can stand in for a proxied session),
//! a database with the incident's tables, and polling waits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guard_core::{ClientInfo, Registration, Registry, SessionRecord, TxnStatus, UpstreamIdentity};
use lockguard_config::GuardConfig;
use tokio_postgres::{Client, NoTls};

use crate::cluster::{TestCluster, APP_USER, ENV_PGPASSWORD, GUARD_USER};

/// Tables every guard test database has: `app.user_sessions` (the incident's login table,
/// protected in the tests) and `app.scratch` and `public.notes` (left unprotected), usable by
/// every role: the application sessions are not superusers (the guard may not signal those).
const SCHEMA_SQL: &str = "\
CREATE SCHEMA app;
CREATE TABLE app.user_sessions (id int PRIMARY KEY, token text NOT NULL);
INSERT INTO app.user_sessions SELECT g, 'token-' || g FROM generate_series(1, 10) g;
CREATE TABLE app.scratch (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
INSERT INTO app.scratch SELECT g FROM generate_series(1, 10) g;
CREATE TABLE public.notes (id int PRIMARY KEY, body text);
INSERT INTO public.notes VALUES (1, 'hello');
GRANT USAGE ON SCHEMA app TO PUBLIC;
GRANT ALL ON ALL TABLES IN SCHEMA app, public TO PUBLIC;
";

/// The role application sessions log in as: [`APP_USER`], an ordinary role, on an owned
/// cluster; the superuser on an external one (where the guard is the superuser too).
pub fn app_role(cluster: &TestCluster) -> &str {
    if cluster.is_owned() {
        APP_USER
    } else {
        cluster.superuser()
    }
}

/// The guard's role: [`GUARD_USER`], set up by `lockguard setup-sql`'s script without
/// superuser, on an owned cluster; the superuser on an external one.
pub fn guard_role(cluster: &TestCluster) -> &str {
    if cluster.is_owned() {
        GUARD_USER
    } else {
        cluster.superuser()
    }
}

/// A fresh database with the tables of [`SCHEMA_SQL`], so each test has its own locks.
pub async fn guard_test_database(cluster: &TestCluster, prefix: &str) -> String {
    let db = cluster.create_database(prefix).await;
    let client = connect(cluster, &db).await;
    client
        .batch_execute(SCHEMA_SQL)
        .await
        .unwrap_or_else(|e| panic!("creating the guard test schema in {db}: {e:?}"));
    db
}

/// A superuser connection to `db` over TCP (task spawned on the current runtime).
pub async fn connect(cluster: &TestCluster, db: &str) -> Client {
    connect_as(cluster, cluster.superuser(), db).await
}

/// A connection as `user` (a trusted role) to `db` over TCP.
pub async fn connect_as(cluster: &TestCluster, user: &str, db: &str) -> Client {
    let (client, connection) = cluster
        .pg_config(user, None, db)
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {db} as {user}: {e:?}"));
    tokio::spawn(connection);
    client
}

/// A direct application session that a test drives (as [`app_role`]), plus what the guard
/// needs to recognise it: the local address of its socket (PostgreSQL's `client_port`) and
/// its backend pid.
pub struct DirectSession {
    pub client: Client,
    /// Our end of the TCP connection; `None` for a unix socket.
    pub local_addr: Option<SocketAddr>,
    pub pid: i32,
    /// Resolves when the connection ends (e.g. its backend was terminated).
    pub closed: tokio::task::JoinHandle<()>,
}

impl DirectSession {
    /// Over TCP, opening the socket ourselves to learn its local port.
    pub async fn tcp(cluster: &TestCluster, db: &str) -> DirectSession {
        let stream = tokio::net::TcpStream::connect((cluster.host(), cluster.port()))
            .await
            .unwrap_or_else(|e| panic!("TCP connect to {}: {e}", cluster.port()));
        let local_addr = stream.local_addr().expect("local address of a TCP socket");
        let (client, connection) = cluster
            .pg_config(app_role(cluster), None, db)
            .connect_raw(stream, NoTls)
            .await
            .unwrap_or_else(|e| panic!("startup on {db}: {e:?}"));
        let closed = tokio::spawn(async move {
            let _ = connection.await;
        });
        Self::finish(client, Some(local_addr), closed).await
    }

    /// Over the owned cluster's unix socket; `None` for an external server.
    pub async fn unix(cluster: &TestCluster, db: &str) -> Option<DirectSession> {
        let dir = cluster.socket_dir()?;
        let path = dir.join(format!(".s.PGSQL.{}", cluster.port()));
        let stream = tokio::net::UnixStream::connect(&path)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()));
        let (client, connection) = cluster
            .pg_config(app_role(cluster), None, db)
            .connect_raw(stream, NoTls)
            .await
            .unwrap_or_else(|e| panic!("startup on {db} over a unix socket: {e:?}"));
        let closed = tokio::spawn(async move {
            let _ = connection.await;
        });
        Some(Self::finish(client, None, closed).await)
    }

    async fn finish(
        client: Client,
        local_addr: Option<SocketAddr>,
        closed: tokio::task::JoinHandle<()>,
    ) -> DirectSession {
        let pid = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pg_backend_pid")
            .get(0);
        DirectSession {
            client,
            local_addr,
            pid,
            closed,
        }
    }

    /// How the proxy would describe this session's upstream socket.
    pub fn upstream(&self) -> UpstreamIdentity {
        match self.local_addr {
            Some(addr) => UpstreamIdentity::Tcp(addr),
            None => UpstreamIdentity::Unix,
        }
    }

    /// Registers a record standing in for the proxy's, with the backend pid known and the
    /// session idle (as after authentication).
    pub fn register(&self, registry: &Arc<Registry>, db: &str) -> Registration {
        let registration = registry.register(
            ClientInfo {
                addr: SocketAddr::from(([127, 0, 0, 1], 40_000)),
                user: "app".into(),
                database: db.into(),
                application_name: "guard-test".into(),
            },
            self.upstream(),
        );
        let record = registration.record();
        record.set_backend_key(self.pid, &[0, 0, 0, 1]);
        record.ready_for_query(TxnStatus::Idle, false);
        registration
    }

    /// Runs `sql` (one simple query) and mirrors what the proxy's transaction tracker would
    /// publish: the statement, a statement in flight, and the transaction `status` PostgreSQL
    /// answers with (in a transaction, or failed after an error in one). tokio-postgres does not
    /// expose the status, so the test states what it expects.
    pub async fn run(
        &self,
        record: &SessionRecord,
        sql: &str,
        status: TxnStatus,
    ) -> Result<(), tokio_postgres::Error> {
        record.set_last_statement(sql.as_bytes());
        record.statement_started();
        let result = self.client.batch_execute(sql).await;
        record.ready_for_query(status, false);
        result
    }
}

/// A guard config for the test cluster, logging in as [`guard_role`] (no superuser),
/// protecting `protected`, with short timeouts so tests run quickly. The superuser password
/// of an external server comes through `password_env`, as an operator would pass it.
pub fn guard_config(cluster: &TestCluster, protected: &[&str]) -> GuardConfig {
    guard_config_as(cluster, guard_role(cluster), protected)
}

/// [`guard_config`] with the guard logging in as `role` (the superuser, for the tests that
/// show what a superuser guard would have done).
pub fn guard_config_as(cluster: &TestCluster, role: &str, protected: &[&str]) -> GuardConfig {
    let password_env = std::env::var(ENV_PGPASSWORD)
        .ok()
        .filter(|_| role == cluster.superuser())
        .map(|_| ENV_PGPASSWORD.to_owned());
    GuardConfig {
        dsn: Some(format!(
            "host={} port={} user={role} dbname=postgres",
            cluster.host(),
            cluster.port(),
        )),
        password_env,
        protected_tables: protected.iter().map(|p| (*p).to_owned()).collect(),
        inflight_grace: Duration::from_millis(200),
        idle_in_transaction_timeout: Duration::from_millis(300),
        failed_transaction_timeout: Duration::from_millis(300),
        sweep_interval: Duration::from_millis(100),
        ..GuardConfig::default()
    }
}

/// Whether `pid` is in `pg_stat_activity`.
pub async fn backend_alive(admin: &Client, pid: i32) -> bool {
    admin
        .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .await
        .expect("reading pg_stat_activity")
        .is_some()
}

/// Whether `pid` waits for a lock now.
pub async fn is_waiting(admin: &Client, pid: i32) -> bool {
    admin
        .query_opt(
            "SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted",
            &[&pid],
        )
        .await
        .expect("reading pg_locks")
        .is_some()
}

/// Waits until `pid` waits for a lock.
pub async fn wait_until_waiting(admin: &Client, pid: i32) {
    wait_for(
        Duration::from_secs(10),
        "a backend to wait for a lock",
        || is_waiting(admin, pid),
    )
    .await;
}

/// The login of the incident: its own direct connection updates row 1 of
/// `app.user_sessions` and waits behind whoever holds that row.
pub struct BlockedLogin {
    pub pid: i32,
    /// Resolves with the moment the UPDATE returned (panics if it failed).
    pub done: tokio::task::JoinHandle<Instant>,
}

impl BlockedLogin {
    /// Starts the login in `db` and returns once PostgreSQL shows it waiting for a lock
    /// (read over `observer`).
    pub async fn start(cluster: &TestCluster, db: &str, observer: &Client) -> BlockedLogin {
        let login = connect(cluster, db).await;
        let pid: i32 = login
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("the login's backend pid")
            .get(0);
        let done = tokio::spawn(async move {
            login
                .execute(
                    "UPDATE app.user_sessions SET token = 'login' WHERE id = 1",
                    &[],
                )
                .await
                .expect("the login's update");
            Instant::now()
        });
        wait_until_waiting(observer, pid).await;
        BlockedLogin { pid, done }
    }

    /// Waits up to `limit` for the login to go through; returns when it did.
    pub async fn proceeds(self, limit: Duration) -> Instant {
        tokio::time::timeout(limit, self.done)
            .await
            .unwrap_or_else(|_| panic!("the login was still blocked after {limit:?}"))
            .expect("the login task")
    }
}

/// Polls `check` every 20 ms until it is true; panics naming `what` after `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `find` like [`wait_for`] until it finds something, and returns that.
pub async fn wait_for_some<T, F>(limit: Duration, what: &str, mut find: F) -> T
where
    F: FnMut() -> Option<T>,
{
    let mut found = None;
    wait_for(limit, what, || {
        found = find();
        std::future::ready(found.is_some())
    })
    .await;
    found.expect("found by wait_for")
}
