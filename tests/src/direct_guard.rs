//! The guard against a real PostgreSQL without the proxy: building one (with a clock the test
//! moves), hand-made locks, and sessions that wait behind one another.

use std::sync::Arc;
use std::time::Duration;

use guard_core::{
    Decision, Guard, GuardConnection, HeldLock, KillNotice, ManualClock, Registration, Registry,
    TxnStatus,
};
use lockguard_config::GuardConfig;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

use crate::cluster::TestCluster;
use crate::guard_support::{connect, guard_config, guard_role, guard_test_database, DirectSession};

pub const LOCK_ROW: &str = "BEGIN; SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE";
pub const PROTECTED: &[&str] = &["app.user_sessions"];

pub fn lock(table: &str, mode: &str) -> HeldLock {
    let (schema, table) = table.split_once('.').expect("schema.table");
    HeldLock {
        schema: schema.into(),
        table: table.into(),
        mode: mode.into(),
    }
}

pub fn build_guard(config: &GuardConfig) -> (Arc<Guard>, Arc<Registry>) {
    let registry = Arc::new(Registry::new());
    let guard = Guard::new(config, Arc::clone(&registry)).expect("building the guard");
    (guard, registry)
}

/// A guard whose clock the test moves past a timeout instead of sleeping through it.
pub fn build_guard_with_clock(config: &GuardConfig) -> (Arc<Guard>, Arc<Registry>, ManualClock) {
    let registry = Arc::new(Registry::new());
    let clock = ManualClock::new();
    let guard = Guard::with_clock(config, None, Arc::clone(&registry), clock.clock())
        .expect("building the guard");
    (guard, registry, clock)
}

/// [`guard_config`] with idle timeouts of an hour: no test sleeps through them, so a session
/// crosses one only when the test moves the guard's clock.
pub fn clocked_config(cluster: &TestCluster) -> GuardConfig {
    GuardConfig {
        idle_in_transaction_timeout: HOUR,
        failed_transaction_timeout: HOUR,
        ..guard_config(cluster, PROTECTED)
    }
}

pub const HOUR: Duration = Duration::from_secs(3600);

/// Just past `timeout`, for moving a [`ManualClock`] over it.
pub fn past(timeout: Duration) -> Duration {
    timeout + Duration::from_millis(1)
}

/// Session B: `UPDATE` of the row A locked, running in the background until A lets go.
/// Returns B's pid and the handle resolving to the UPDATE's result once it ran.
pub async fn blocked_update(
    cluster: &TestCluster,
    db: &str,
) -> (i32, JoinHandle<Result<u64, String>>) {
    let b = DirectSession::tcp(cluster, db).await;
    let pid = b.pid;
    let handle = tokio::spawn(async move {
        b.client
            .execute("UPDATE app.user_sessions SET token = 'b' WHERE id = 1", &[])
            .await
            .map_err(|e| format!("{e:?}"))
    });
    (pid, handle)
}

/// Waits for B's UPDATE to finish and checks it succeeded.
pub async fn assert_proceeds(b: JoinHandle<Result<u64, String>>, within: Duration) {
    match tokio::time::timeout(within, b).await {
        Ok(Ok(Ok(rows))) => assert_eq!(rows, 1),
        Ok(Ok(Err(e))) => panic!("the waiting UPDATE failed: {e}"),
        Ok(Err(e)) => panic!("the waiting task panicked: {e}"),
        Err(_) => panic!("the waiting UPDATE was still blocked after {within:?}"),
    }
}

/// A connection of the test's own as the guard's role, with the guard's statements, to hand
/// to the enforcer.
pub async fn enforcer_connection(cluster: &TestCluster, db: &str) -> GuardConnection {
    let (client, connection) = cluster
        .pg_config(guard_role(cluster), None, db)
        .connect(NoTls)
        .await
        .expect("connecting the enforcer");
    tokio::spawn(connection);
    GuardConnection::prepare(client, guard_core::guard::STATEMENTS)
        .await
        .expect("preparing the guard statements")
}

pub fn acted(decision: Decision) -> guard_core::AuditEvent {
    match decision {
        Decision::Acted(event) => *event,
        other => panic!("expected the guard to act, got {other:?}"),
    }
}

/// Where most of these tests start: a fresh guard test database on the shared cluster and a
/// superuser connection to it for looking at what PostgreSQL says.
pub struct Scene {
    pub cluster: &'static TestCluster,
    pub db: String,
    pub admin: Client,
}

impl Scene {
    /// `prefix` names the database.
    pub async fn new(prefix: &str) -> Scene {
        let cluster = TestCluster::shared();
        let db = guard_test_database(cluster, prefix).await;
        let admin = connect(cluster, &db).await;
        Scene { cluster, db, admin }
    }
}

/// A direct session on `db`, registered with `registry` as the proxy would, that has run `sql`
/// and is now in `status` (e.g. [`LOCK_ROW`] and in a transaction).
pub async fn registered(
    cluster: &TestCluster,
    registry: &Arc<Registry>,
    db: &str,
    sql: &str,
    status: TxnStatus,
) -> (DirectSession, Registration) {
    let session = DirectSession::tcp(cluster, db).await;
    let registration = session.register(registry, db);
    session
        .run(registration.record(), sql, status)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    (session, registration)
}

/// The client was told of its termination as PostgreSQL tells it (57P01), in a message that
/// starts with `prefix`.
pub fn assert_told(notice: &KillNotice, prefix: &str) {
    assert_eq!(notice.sqlstate, "57P01", "{notice:?}");
    assert!(notice.message.starts_with(prefix), "{}", notice.message);
}
