//! The guard, end to end through the proxy (the client-loss, in-flight and idle rules): an
//! orphaned session holding a lock on a protected table is terminated, the waiter proceeds, and
//! the audit says why; sessions that hold nothing protected are left alone.
//!
//! A check that nothing happened waits for the guard's decision first: the session's
//! deregistration (after a lost client the guard has judged it and the proxy has let it go) or
//! a sweep report (the sweep has judged an idle session and left it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use guard_core::{AuditEvent, LeaveReason, Outcome, SessionId, SweepReport};
use lockguard_config::{ClientLossAction, GuardConfig};
use lockguard_tests::app::App;
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{self, backend_alive, connect, wait_for, BlockedLogin};
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::raw;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

const PROTECTED: &str = "app.user_sessions";

/// A database with a protected and an unprotected table, a proxy guarding it, and a direct
/// superuser connection for setup and assertions.
struct Scene {
    db: String,
    proxy: TestProxy,
    admin: Client,
}

async fn scene(prefix: &str, configure: impl FnOnce(&mut GuardConfig)) -> Scene {
    let cluster = TestCluster::shared();
    let db = guard_support::guard_test_database(cluster, prefix).await;
    let admin = connect(cluster, &db).await;
    let mut config = config_for(cluster);
    // The guard's role and password as the other guard tests use them; the timings below.
    let role = guard_support::guard_config(cluster, &[]);
    config.guard.dsn = role.dsn;
    config.guard.password_env = role.password_env;
    config.guard.protected_tables = vec![PROTECTED.to_owned()];
    config.guard.sweep_interval = Duration::from_millis(100);
    config.guard.inflight_grace = Duration::from_millis(500);
    configure(&mut config.guard);
    let proxy = TestProxy::start_with(config).await;
    Scene { db, proxy, admin }
}

/// An application session of the scene's database through its proxy (an ordinary role: the
/// guard may not signal a superuser's backend).
async fn app(scene: &Scene) -> App {
    let user = guard_support::app_role(TestCluster::shared());
    App::connect(scene.proxy.addr, user, &scene.db).await
}

/// Starts the incident's login and waits until it is blocked on the lock.
async fn blocked_waiter(scene: &Scene) -> (JoinHandle<Instant>, i32) {
    let login = BlockedLogin::start(TestCluster::shared(), &scene.db, &scene.admin).await;
    (login.done, login.pid)
}

/// How long after `dropped` the waiter's UPDATE went through (panics if it is still blocked
/// after 5 s): the measure of "within a second of the drop".
async fn waiter_released_after(waiter: JoinHandle<Instant>, dropped: Instant) -> Duration {
    let proceeded = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter proceeds")
        .expect("waiter task");
    proceeded - dropped
}

async fn wait_until_gone(admin: &Client, pid: i32, timeout: Duration) {
    wait_for(timeout, &format!("backend {pid} to exit"), || async {
        !backend_alive(admin, pid).await
    })
    .await;
}

fn events_for(scene: &Scene, pid: i32) -> Vec<AuditEvent> {
    scene.proxy.audit_events(pid, |_| true)
}

async fn wait_for_event(scene: &Scene, pid: i32, timeout: Duration) -> AuditEvent {
    guard_support::wait_for_some(
        timeout,
        &format!("an audit event for backend {pid}"),
        || events_for(scene, pid).into_iter().next(),
    )
    .await
}

/// Waits until `pid` is running a statement that contains `text`.
async fn wait_until_running(admin: &Client, pid: i32, text: &str) {
    wait_for(
        Duration::from_secs(5),
        &format!("backend {pid} to run {text}"),
        || async {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity \
                     WHERE pid = $1 AND state = 'active' AND strpos(query, $2) > 0",
                    &[&pid, &text],
                )
                .await
                .expect("reading pg_stat_activity")
                .is_some()
        },
    )
    .await;
}

/// Waits until the proxy has let go of session `id`: the guard has judged its lost client and
/// the pump has closed its upstream socket, so nothing in lockguard will act on it any more.
async fn wait_until_deregistered(scene: &Scene, id: SessionId) {
    wait_for(
        Duration::from_secs(10),
        &format!("session {id} to be deregistered"),
        || std::future::ready(scene.proxy.registry().get(id).is_none()),
    )
    .await;
}

/// The next sweep report, or a panic after `limit`.
async fn next_sweep(
    reports: &mut tokio::sync::broadcast::Receiver<Arc<SweepReport>>,
    limit: Duration,
) -> Arc<SweepReport> {
    tokio::time::timeout(limit, reports.recv())
        .await
        .unwrap_or_else(|_| panic!("no sweep within {limit:?}"))
        .expect("the guard's sweep reports")
}

fn assert_protected_row_lock(event: &AuditEvent) {
    assert!(
        event
            .locks
            .iter()
            .any(|l| l.table == PROTECTED && l.mode == "RowShareLock"),
        "locks in the event: {:?}",
        event.locks
    );
}

/// Waits for the FATAL lockguard sends a live client it terminated.
async fn expect_lockguard_fatal(app: &mut App, timeout: Duration) -> String {
    let reply = raw::read_until_close(&mut app.stream, timeout).await;
    let last = reply
        .last()
        .unwrap_or_else(|| panic!("connection closed without a message"));
    assert_eq!(last.tag, b'E', "{reply:?}");
    let (code, message) = last.error_fields();
    assert_eq!(code, "57P01", "{message}");
    assert!(message.starts_with("lockguard: terminated"), "{message}");
    message
}

#[tokio::test]
async fn the_incident_a_vanished_client_holding_a_protected_row_lock_is_terminated() {
    let scene = scene("guard_incident", |_| {}).await;
    let mut app = app(&scene).await;
    app.lock_protected_row().await;
    let (waiter, waiter_pid) = blocked_waiter(&scene).await;

    let dropped = Instant::now();
    drop(app.stream); // a crash: no Terminate
    let released_after = waiter_released_after(waiter, dropped).await;
    assert!(
        released_after < Duration::from_secs(1),
        "released after {released_after:?}"
    );
    wait_until_gone(&scene.admin, app.pid, Duration::from_secs(2)).await;

    let event = wait_for_event(&scene, app.pid, Duration::from_secs(2)).await;
    assert_eq!(event.outcome, Outcome::Terminated, "{event:?}");
    assert_eq!(event.trigger, "client_loss");
    assert_protected_row_lock(&event);
    assert_eq!(event.waiter_pids, vec![waiter_pid]);
    assert!(
        event.last_statement.contains("FOR UPDATE"),
        "{}",
        event.last_statement
    );
    assert_eq!(event.database, scene.db);
}

/// After A's client was lost while A held the protected row with the login waiting: the
/// login proceeds, A's backend is gone, and the audit records the kill; returns the event.
async fn assert_lost_client_terminated(
    scene: &Scene,
    pid: i32,
    waiter: JoinHandle<Instant>,
) -> AuditEvent {
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter proceeds")
        .expect("waiter task");
    wait_until_gone(&scene.admin, pid, Duration::from_secs(2)).await;
    let event = wait_for_event(scene, pid, Duration::from_secs(2)).await;
    assert_eq!(event.outcome, Outcome::Terminated, "{event:?}");
    assert_eq!(event.trigger, "client_loss");
    assert_protected_row_lock(&event);
    event
}

#[tokio::test]
async fn a_client_whose_connection_is_reset_while_holding_a_protected_lock_is_terminated() {
    let scene = scene("guard_reset", |_| {}).await;
    let mut app = app(&scene).await;
    app.lock_protected_row().await;
    let (waiter, _) = blocked_waiter(&scene).await;

    // SO_LINGER 0: closing sends an RST instead of a FIN, as when a host drops a connection.
    socket2::SockRef::from(&app.stream)
        .set_linger(Some(Duration::ZERO))
        .expect("set SO_LINGER 0");
    drop(app.stream);

    let event = assert_lost_client_terminated(&scene, app.pid, waiter).await;
    let cause = event.cause.as_deref().unwrap_or_default();
    // The pump's ClientLoss::ReadFailed, carrying the OS error (ECONNRESET).
    assert!(
        cause.starts_with("client connection failed: ") && cause.contains("reset"),
        "cause: {cause:?}"
    );
}

#[tokio::test]
async fn a_client_that_breaks_the_protocol_while_holding_a_protected_lock_is_terminated() {
    let scene = scene("guard_violation", |_| {}).await;
    let mut app = app(&scene).await;
    app.lock_protected_row().await;
    let (waiter, _) = blocked_waiter(&scene).await;

    // A Query header claiming a 4 GiB body: no valid stream looks like this.
    app.stream
        .write_all(&[b'Q', 0xFF, 0xFF, 0xFF, 0xFF])
        .await
        .expect("send the broken header");
    let reply = raw::read_until_close(&mut app.stream, Duration::from_secs(5)).await;
    let last = reply.last().expect("lockguard says why it closes");
    assert_eq!(last.tag, b'E', "{reply:?}");
    assert_eq!(last.error_fields().0, "08P01", "{reply:?}");

    let event = assert_lost_client_terminated(&scene, app.pid, waiter).await;
    assert_eq!(
        event.cause.as_deref(),
        Some("client protocol violation: invalid message length 4294967295 for message type 'Q'")
    );
}

#[tokio::test]
async fn a_statement_that_reached_idle_before_the_grace_ended_is_not_killed() {
    // A grace far longer than the statement, so only the rule is tested, not the timing.
    let scene = scene("guard_reached_idle", |g| {
        g.inflight_grace = Duration::from_secs(5);
    })
    .await;
    let mut app = app(&scene).await;
    app.exec("BEGIN").await;
    let reply = app
        .exec("UPDATE app.user_sessions SET token = 'committed-by-a' WHERE id = 1")
        .await;
    assert!(reply.iter().all(|m| m.tag != b'E'), "{reply:?}");

    // One simple Query that ends the transaction, sent just before the client vanishes.
    app.send("SELECT pg_sleep(0.3); COMMIT").await;
    drop(app.stream);

    // Once ReadyForQuery (I) arrived the proxy just closes the upstream socket and the
    // backend exits on its own.
    wait_until_gone(&scene.admin, app.pid, Duration::from_secs(5)).await;
    let token: String = scene
        .admin
        .query_one("SELECT token FROM app.user_sessions WHERE id = 1", &[])
        .await
        .expect("read the row")
        .get(0);
    assert_eq!(token, "committed-by-a", "the COMMIT was lost");
    assert!(
        events_for(&scene, app.pid).is_empty(),
        "{:?}",
        events_for(&scene, app.pid)
    );
}

#[tokio::test]
async fn on_client_loss_log_records_the_loss_and_leaves_the_backend_running() {
    let scene = scene("guard_loss_log", |g| {
        g.on_client_loss = ClientLossAction::Log;
    })
    .await;
    let mut app = app(&scene).await;
    app.lock_protected_row().await;
    // Mid statement: after the grace the proxy closes the upstream socket, which a sleeping
    // backend does not notice, so only a kill would end it.
    app.send("SELECT pg_sleep(60)").await;
    wait_until_running(&scene.admin, app.pid, "pg_sleep").await;
    let session = scene.proxy.session_of(app.pid).await.id;
    drop(app.stream);

    let event = wait_for_event(&scene, app.pid, Duration::from_secs(5)).await;
    assert_eq!(event.outcome, Outcome::Logged, "{event:?}");
    assert_eq!(event.trigger, "client_loss");
    assert_protected_row_lock(&event);
    wait_until_deregistered(&scene, session).await;
    assert!(
        backend_alive(&scene.admin, app.pid).await,
        "backend {} was terminated although on_client_loss = log",
        app.pid
    );
    assert_eq!(events_for(&scene, app.pid).len(), 1);

    scene
        .admin
        .execute("SELECT pg_terminate_backend($1)", &[&app.pid])
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn a_client_that_vanishes_mid_statement_is_terminated_after_the_grace() {
    let scene = scene("guard_inflight", |_| {}).await;
    let mut app = app(&scene).await;
    app.lock_protected_row().await;
    app.send("SELECT pg_sleep(60)").await;
    let (waiter, _) = blocked_waiter(&scene).await;

    let dropped = Instant::now();
    drop(app.stream);
    let proceeded = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter proceeds")
        .expect("waiter task");
    // Grace (500 ms here) plus the probe and the kill.
    let released_after = proceeded - dropped;
    assert!(
        released_after >= Duration::from_millis(450),
        "{released_after:?}"
    );
    assert!(
        released_after < Duration::from_millis(1500),
        "{released_after:?}"
    );
    wait_until_gone(&scene.admin, app.pid, Duration::from_secs(2)).await;
    let event = wait_for_event(&scene, app.pid, Duration::from_secs(2)).await;
    assert_eq!(event.outcome, Outcome::Terminated);
    assert_protected_row_lock(&event);
}

/// The in-flight grace is the rule's: the flat one is an hour, the login table's rule gives a
/// vanished client's statement 200 ms.
#[tokio::test]
async fn a_rules_inflight_grace_decides_how_long_a_vanished_clients_statement_may_run() {
    let scene = scene("guard_rule_grace", |g| {
        g.inflight_grace = Duration::from_secs(3600);
        g.rules = vec![serde_json::from_value(serde_json::json!({
            "name": "login",
            "tables": [PROTECTED],
            "inflight_grace": "200ms",
        }))
        .expect("a rule")];
    })
    .await;
    let mut app = app(&scene).await;
    app.lock_protected_row().await;
    app.send("SELECT pg_sleep(60)").await;
    wait_until_running(&scene.admin, app.pid, "pg_sleep").await;
    drop(app.stream);

    let event = wait_for_event(&scene, app.pid, Duration::from_secs(5)).await;
    assert_eq!(event.outcome, Outcome::Terminated, "{event:?}");
    assert_eq!(event.rules, vec!["login".to_owned()], "{event:?}");
    wait_until_gone(&scene.admin, app.pid, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_pipelining_client_that_vanishes_before_its_sync_is_terminated() {
    let scene = scene("guard_pipeline", |_| {}).await;
    let mut app = app(&scene).await;
    // Parse/Bind/Execute/Flush with no Sync: PostgreSQL runs the UPDATE at once in an implicit
    // transaction that keeps its row lock until a Sync that will never come.
    let mut pipeline = raw::parse(
        "UPDATE app.user_sessions SET token = 'pipe' WHERE id = 1",
        &[],
    );
    pipeline.extend(raw::bind(&[], 0));
    pipeline.extend(raw::execute());
    pipeline.extend(raw::flush());
    app.stream
        .write_all(&pipeline)
        .await
        .expect("send pipeline");
    loop {
        let m = raw::read_message(&mut app.stream, Duration::from_secs(5))
            .await
            .expect("the UPDATE completes");
        assert_ne!(m.tag, b'E', "{:?}", m.error_fields());
        if m.tag == b'C' {
            break;
        }
    }
    let (waiter, _) = blocked_waiter(&scene).await;

    drop(app.stream);
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter proceeds")
        .expect("waiter task");
    wait_until_gone(&scene.admin, app.pid, Duration::from_secs(2)).await;
    let event = wait_for_event(&scene, app.pid, Duration::from_secs(2)).await;
    assert_eq!(event.outcome, Outcome::Terminated, "{event:?}");
    assert_eq!(event.trigger, "client_loss");
}

#[tokio::test]
async fn a_vanished_client_holding_only_unprotected_locks_is_left_alone() {
    let scene = scene("guard_unprotected", |_| {}).await;
    let mut app = app(&scene).await;
    app.exec("BEGIN").await;
    app.exec("SELECT * FROM app.scratch WHERE id = 1 FOR UPDATE")
        .await;
    app.send("SELECT pg_sleep(60)").await;
    wait_until_running(&scene.admin, app.pid, "pg_sleep").await;
    let session = scene.proxy.session_of(app.pid).await.id;
    drop(app.stream);

    wait_until_deregistered(&scene, session).await;
    assert!(
        backend_alive(&scene.admin, app.pid).await,
        "backend {} was terminated although it held no protected lock",
        app.pid
    );
    assert!(events_for(&scene, app.pid).is_empty());
    // Clean up the sleeper.
    scene
        .admin
        .execute("SELECT pg_terminate_backend($1)", &[&app.pid])
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn idle_in_transaction_past_the_timeout_with_a_waiter_is_terminated_and_told_why() {
    let scene = scene("guard_idle", |g| {
        g.idle_in_transaction_timeout = Duration::from_secs(1);
    })
    .await;
    let mut app = app(&scene).await;
    app.lock_protected_row().await;
    let (waiter, _) = blocked_waiter(&scene).await;

    let message = expect_lockguard_fatal(&mut app, Duration::from_secs(5)).await;
    assert!(message.contains(PROTECTED), "{message}");
    assert!(message.contains("RowShareLock"), "{message}");
    assert!(message.contains("idle in transaction"), "{message}");
    tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("the waiter proceeds")
        .expect("waiter task");
    wait_until_gone(&scene.admin, app.pid, Duration::from_secs(2)).await;
    let event = wait_for_event(&scene, app.pid, Duration::from_secs(1)).await;
    assert_eq!(event.trigger, "idle_in_transaction");
    assert_eq!(event.outcome, Outcome::Terminated);
    assert_eq!(event.waiters, 1);
}

#[tokio::test]
async fn require_waiters_spares_an_idle_holder_nobody_waits_for() {
    let scene = scene("guard_nowaiter", |g| {
        g.idle_in_transaction_timeout = Duration::from_millis(500);
        g.require_waiters = true;
    })
    .await;
    let mut app = app(&scene).await;
    let session = scene.proxy.session_of(app.pid).await.id;
    let mut sweeps = scene.proxy.guard().expect("guard").sweep_reports();
    app.lock_protected_row().await;
    // The sweep judges the holder past its timeout and leaves it: nobody waits.
    loop {
        let report = next_sweep(&mut sweeps, Duration::from_secs(5)).await;
        assert!(
            report.events.iter().all(|e| e.backend_pid != app.pid),
            "{report:?}"
        );
        if report.left.contains(&(session, LeaveReason::NoWaiters)) {
            break;
        }
    }
    let reply = app.exec("SELECT 1").await;
    assert!(reply.iter().all(|m| m.tag != b'E'), "{reply:?}");
    let reply = app.exec("COMMIT").await;
    assert_eq!(reply.last().map(|m| m.body.clone()), Some(b"I".to_vec()));
    assert!(events_for(&scene, app.pid).is_empty());
}

#[tokio::test]
async fn a_failed_transaction_still_holding_a_protected_lock_is_terminated() {
    let scene = scene("guard_failed", |g| {
        g.failed_transaction_timeout = Duration::from_secs(1);
    })
    .await;
    let mut app = app(&scene).await;
    app.lock_protected_row().await;
    // An error inside a savepoint leaves the outer transaction's locks held in state E (a
    // failed top-level transaction would have released them).
    app.exec("SAVEPOINT nested").await;
    let reply = app.exec("SELECT 1/0").await;
    assert_eq!(reply.last().map(|m| m.body.clone()), Some(b"E".to_vec()));

    let message = expect_lockguard_fatal(&mut app, Duration::from_secs(5)).await;
    assert!(message.contains(PROTECTED), "{message}");
    wait_until_gone(&scene.admin, app.pid, Duration::from_secs(2)).await;
    let event = wait_for_event(&scene, app.pid, Duration::from_secs(1)).await;
    assert_eq!(event.trigger, "failed_transaction");
    assert_eq!(event.outcome, Outcome::Terminated);
}

#[tokio::test]
async fn dry_run_records_but_never_terminates() {
    let scene = scene("guard_dryrun", |g| {
        g.idle_in_transaction_timeout = Duration::from_millis(500);
        g.dry_run = true;
    })
    .await;
    let mut app = app(&scene).await;
    let mut sweeps = scene.proxy.guard().expect("guard").sweep_reports();
    app.lock_protected_row().await;
    // The sweep that records the would-be kill, then a whole sweep after it: neither kills.
    let event = loop {
        let report = next_sweep(&mut sweeps, Duration::from_secs(5)).await;
        if let Some(event) = report.events.iter().find(|e| e.backend_pid == app.pid) {
            break event.clone();
        }
    };
    assert_eq!(event.outcome, Outcome::DryRun);
    assert!(event.dry_run);
    assert_protected_row_lock(&event);
    let after = next_sweep(&mut sweeps, Duration::from_secs(5)).await;
    assert!(after.events.is_empty(), "{after:?}");
    assert!(backend_alive(&scene.admin, app.pid).await);
    let reply = app.exec("COMMIT").await;
    assert!(reply.iter().all(|m| m.tag != b'E'), "{reply:?}");
}

#[tokio::test]
async fn traffic_survives_a_killed_guard_connection_and_the_guard_recovers() {
    let scene = scene("guard_recover", |_| {}).await;
    // Warm the guard up: one incident makes it open its connection to the database.
    let mut first = app(&scene).await;
    first.lock_protected_row().await;
    drop(first.stream);
    wait_for_event(&scene, first.pid, Duration::from_secs(3)).await;

    let killed = scene
        .admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&guard_core::connections::GUARD_APPLICATION_NAME],
        )
        .await
        .expect("kill the guard's connections");
    assert!(!killed.is_empty(), "the guard had no connection to kill");

    // Proxied traffic is unaffected.
    let client = scene
        .proxy
        .connect(
            guard_support::app_role(TestCluster::shared()),
            None,
            &scene.db,
        )
        .await
        .expect("connect through the proxy");
    for i in 0..20i32 {
        let v: i32 = client
            .query_one("SELECT $1::int4", &[&i])
            .await
            .expect("query")
            .get(0);
        assert_eq!(v, i);
    }

    // The incident is handled again once the guard has reconnected.
    let mut app = app(&scene).await;
    app.lock_protected_row().await;
    let (waiter, _) = blocked_waiter(&scene).await;
    let dropped = Instant::now();
    drop(app.stream);
    let released_after = waiter_released_after(waiter, dropped).await;
    assert!(
        released_after < Duration::from_secs(1),
        "released after {released_after:?}"
    );
    let event = wait_for_event(&scene, app.pid, Duration::from_secs(3)).await;
    assert_eq!(event.outcome, Outcome::Terminated);
}
