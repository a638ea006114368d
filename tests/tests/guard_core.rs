//! The guard against a real PostgreSQL, without the proxy: direct tokio-postgres sessions play
//! the application, hand-made session records play the proxy's view of them, and every test
//! checks what PostgreSQL says afterwards — who holds what, who waits, who is still alive.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use guard_core::enforcer::{self, RequiredState, START_AFTER};
use guard_core::guard::CLIENT_LOSS_DEADLINE;
use guard_core::{
    Decision, Guard, GuardConnection, HealthStatus, HeldLock, Identity, LeaveReason, ManualClock,
    Outcome, Registry, Termination, TxnStatus,
};
use lockguard_config::GuardConfig;
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{
    backend_alive, connect, guard_config, guard_role, guard_test_database, wait_for,
    wait_until_waiting, DirectSession,
};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

const LOCK_ROW: &str = "BEGIN; SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE";
const PROTECTED: &[&str] = &["app.user_sessions"];

fn lock(table: &str, mode: &str) -> HeldLock {
    let (schema, table) = table.split_once('.').expect("schema.table");
    HeldLock {
        schema: schema.into(),
        table: table.into(),
        mode: mode.into(),
    }
}

fn build_guard(config: &GuardConfig) -> (Arc<Guard>, Arc<Registry>) {
    let registry = Arc::new(Registry::new());
    let guard = Guard::new(config, Arc::clone(&registry)).expect("building the guard");
    (guard, registry)
}

/// A guard whose clock the test moves past a timeout instead of sleeping through it.
fn build_guard_with_clock(config: &GuardConfig) -> (Arc<Guard>, Arc<Registry>, ManualClock) {
    let registry = Arc::new(Registry::new());
    let clock = ManualClock::new();
    let guard = Guard::with_clock(config, None, Arc::clone(&registry), clock.clock())
        .expect("building the guard");
    (guard, registry, clock)
}

/// [`guard_config`] with idle timeouts of an hour: no test sleeps through them, so a session
/// crosses one only when the test moves the guard's clock.
fn clocked_config(cluster: &TestCluster) -> GuardConfig {
    GuardConfig {
        idle_in_transaction_timeout: HOUR,
        failed_transaction_timeout: HOUR,
        ..guard_config(cluster, PROTECTED)
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// Just past `timeout`, for moving a [`ManualClock`] over it.
fn past(timeout: Duration) -> Duration {
    timeout + Duration::from_millis(1)
}

/// Session B: `UPDATE` of the row A locked, running in the background until A lets go.
/// Returns B's pid and the handle resolving to the UPDATE's result once it ran.
async fn blocked_update(cluster: &TestCluster, db: &str) -> (i32, JoinHandle<Result<u64, String>>) {
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
async fn assert_proceeds(b: JoinHandle<Result<u64, String>>, within: Duration) {
    match tokio::time::timeout(within, b).await {
        Ok(Ok(Ok(rows))) => assert_eq!(rows, 1),
        Ok(Ok(Err(e))) => panic!("the waiting UPDATE failed: {e}"),
        Ok(Err(e)) => panic!("the waiting task panicked: {e}"),
        Err(_) => panic!("the waiting UPDATE was still blocked after {within:?}"),
    }
}

/// A connection of the test's own as the guard's role, with the guard's statements, to hand
/// to the enforcer.
async fn enforcer_connection(cluster: &TestCluster, db: &str) -> GuardConnection {
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

fn acted(decision: Decision) -> guard_core::AuditEvent {
    match decision {
        Decision::Acted(event) => *event,
        other => panic!("expected the guard to act, got {other:?}"),
    }
}

#[tokio::test]
async fn probe_finds_a_row_lock_on_a_protected_table_and_the_session_waiting_behind_it() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_probe").await;
    let admin = connect(cluster, &db).await;
    let (guard, _) = build_guard(&guard_config(cluster, PROTECTED));

    let a = DirectSession::tcp(cluster, &db).await;
    a.client
        .batch_execute(&format!(
            "{LOCK_ROW}; SELECT count(*) FROM app.scratch; SELECT count(*) FROM public.notes"
        ))
        .await
        .unwrap();
    let (b_pid, b) = blocked_update(cluster, &db).await;
    wait_until_waiting(&admin, b_pid).await;

    let facts = guard.probe(&db, &[a.pid, b_pid]).await.unwrap();
    let holder = &facts[&a.pid];
    // Only the protected table survives the filter: app.scratch and public.notes are read
    // (AccessShareLock) but not protected.
    assert_eq!(
        holder.locks,
        vec![lock("app.user_sessions", "RowShareLock")]
    );
    assert_eq!(holder.waiters, vec![b_pid]);
    assert_eq!(holder.state.as_deref(), Some("idle in transaction"));
    let port = a.local_addr.expect("tcp").port();
    assert_eq!(holder.client_port, Some(i32::from(port)));
    // B holds its own RowExclusiveLock while it waits; nobody waits behind B.
    assert_eq!(
        facts[&b_pid].locks,
        vec![lock("app.user_sessions", "RowExclusiveLock")]
    );
    assert!(facts[&b_pid].waiters.is_empty());
    assert_eq!(facts[&b_pid].state.as_deref(), Some("active"));

    // Wider patterns pick up the other tables, each once, with the reader's lock mode.
    let (wide, _) = build_guard(&guard_config(cluster, &["app.*", "notes"]));
    let mut locks = wide.probe(&db, &[a.pid]).await.unwrap()[&a.pid]
        .locks
        .clone();
    locks.sort_by_key(HeldLock::qualified_table);
    assert_eq!(
        locks,
        vec![
            lock("app.scratch", "AccessShareLock"),
            lock("app.user_sessions", "RowShareLock"),
            lock("public.notes", "AccessShareLock"),
        ]
    );

    // A pid that is not a backend is simply absent.
    let none = guard.probe(&db, &[0x3fff_fff0]).await.unwrap();
    assert!(none.is_empty());

    a.client.batch_execute("ROLLBACK").await.unwrap();
    assert_proceeds(b, Duration::from_secs(5)).await;
}

// Long because it walks one backend through every refusal before the kill that succeeds: each
// step needs the same backend, still holding its lock, that the previous step left alive.
#[tokio::test]
async fn enforcer_with_a_stale_client_port_signals_nothing_and_the_right_port_terminates() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_enforce").await;
    let admin = connect(cluster, &db).await;
    let conn = enforcer_connection(cluster, &db).await;

    let a = DirectSession::tcp(cluster, &db).await;
    a.client.batch_execute(LOCK_ROW).await.unwrap();
    let port = a.local_addr.expect("tcp").port();
    let other_port = if port == u16::MAX { port - 1 } else { port + 1 };
    let stale = Identity::connected(i32::from(other_port), SystemTime::now());

    let outcome = enforcer::terminate_verified(&conn, a.pid, &stale, None, None)
        .await
        .unwrap();
    assert_eq!(outcome.outcome, Outcome::IdentityMismatch);
    assert_eq!(outcome.outcome.to_string(), "identity_mismatch");
    // Not signalled: the backend is there, its transaction still open and holding the row.
    assert!(backend_alive(&admin, a.pid).await);
    a.client
        .batch_execute("SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE")
        .await
        .expect("the session survived the stale kill");

    // The guard's own path gives the same answer.
    let (guard, _) = build_guard(&guard_config(cluster, PROTECTED));
    assert_eq!(
        guard
            .terminate_verified(&db, a.pid, &stale, None, None)
            .await
            .unwrap()
            .outcome,
        Outcome::IdentityMismatch
    );

    // The right port, but the idle rule's state check fails: the backend is idle in a
    // transaction, not in a failed one.
    let right = Identity::connected(i32::from(port), SystemTime::now());
    let outcome = enforcer::terminate_verified(
        &conn,
        a.pid,
        &right,
        None,
        Some(RequiredState::state("idle in transaction (aborted)")),
    )
    .await
    .unwrap();
    assert_eq!(
        outcome,
        Termination {
            outcome: Outcome::NoLongerIdle,
            detail: Some("idle in transaction".into())
        }
    );
    assert!(backend_alive(&admin, a.pid).await);

    // The probe saw one transaction; the session then committed it and opened another, idle
    // in the same state text. The kill must not hit the new transaction.
    let probed = guard.probe(&db, &[a.pid]).await.unwrap()[&a.pid].state_change;
    assert!(probed.is_some());
    a.client
        .batch_execute(&format!("COMMIT; {LOCK_ROW}"))
        .await
        .unwrap();
    let since_old = RequiredState {
        state: "idle in transaction",
        since: probed,
    };
    let outcome = enforcer::terminate_verified(&conn, a.pid, &right, None, Some(since_old))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Termination {
            outcome: Outcome::NoLongerIdle,
            detail: Some("idle in transaction".into())
        }
    );
    assert!(backend_alive(&admin, a.pid).await);
    let probe = guard.probe(&db, &[a.pid]).await.unwrap()[&a.pid].clone();
    let since_now = RequiredState {
        state: "idle in transaction",
        since: probe.state_change,
    };

    // Same pid, same port, but not the backend process the probe saw (one that reused the
    // pid and port after ours died would have started later): not signalled.
    let probed_start = probe
        .backend_start
        .expect("the guard role sees backend_start");
    let later = Some(probed_start + Duration::from_micros(1));
    let outcome = enforcer::terminate_verified(&conn, a.pid, &right, later, Some(since_now))
        .await
        .unwrap();
    assert_eq!(outcome.outcome, Outcome::IdentityMismatch);
    assert!(backend_alive(&admin, a.pid).await);

    let outcome =
        enforcer::terminate_verified(&conn, a.pid, &right, Some(probed_start), Some(since_now))
            .await
            .unwrap();
    assert_eq!(outcome.outcome, Outcome::Terminated);
    // terminate_verified waits for the backend to exit.
    assert!(!backend_alive(&admin, a.pid).await);
    assert!(a.client.batch_execute("SELECT 1").await.is_err());

    // Killing it again finds nothing; so does a pid that never existed.
    assert_eq!(
        enforcer::terminate_verified(&conn, a.pid, &right, None, None)
            .await
            .unwrap()
            .outcome,
        Outcome::AlreadyGone
    );
    assert_eq!(
        enforcer::terminate_verified(&conn, 0x3fff_fff0, &right, None, None)
            .await
            .unwrap()
            .outcome,
        Outcome::AlreadyGone
    );
}

/// A record can outlive its backend (the pump has not noticed yet); once our socket is
/// closed a newer connection may get both its pid and its port. Over TCP the port is then not
/// proof enough: the newer backend started after our session connected, so it is not ours.
#[tokio::test]
async fn a_tcp_record_that_outlived_its_backend_never_matches_a_newer_backend() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_outlived").await;
    let admin = connect(cluster, &db).await;
    let (guard, registry) = build_guard(&guard_config(cluster, PROTECTED));

    // The newer backend, with the pid and port the stale record names.
    let newer = DirectSession::tcp(cluster, &db).await;
    newer.client.batch_execute(LOCK_ROW).await.unwrap();
    let registration = newer.register(&registry, &db);
    let mut stale = guard_core::SessionRecord::new(
        registration.record().id + 1_000_000,
        registration.record().client.clone(),
        newer.upstream(),
    );
    // Our session connected long before that backend started.
    stale.connected_at = SystemTime::now() - Duration::from_secs(3600);
    let identity = Identity::of(&stale);

    assert_eq!(
        guard
            .terminate_verified(&db, newer.pid, &identity, None, None)
            .await
            .unwrap()
            .outcome,
        Outcome::IdentityMismatch
    );
    assert!(backend_alive(&admin, newer.pid).await);
    newer
        .client
        .batch_execute("SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE")
        .await
        .expect("the newer session survived the stale record's kill");

    // Its own record (connected just now) is its identity.
    let own = Identity::of(registration.record());
    assert_eq!(
        guard
            .terminate_verified(&db, newer.pid, &own, None, None)
            .await
            .unwrap()
            .outcome,
        Outcome::Terminated
    );
    assert!(!backend_alive(&admin, newer.pid).await);
}

/// The audit log holds client addresses and statements: a new file is owner-only, one
/// readable by others is tightened, and a symlink planted at the path is refused, its target
/// untouched.
#[tokio::test]
async fn the_audit_log_is_owner_only_and_a_planted_symlink_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = TestCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;

    let fresh = dir.path().join("audit.jsonl");
    let config = GuardConfig {
        audit_log: Some(fresh.clone()),
        ..guard_config(cluster, PROTECTED)
    };
    build_guard(&config);
    assert_eq!(mode(&fresh), 0o600);

    let loose = dir.path().join("loose.jsonl");
    std::fs::write(&loose, "{}\n").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    build_guard(&GuardConfig {
        audit_log: Some(loose.clone()),
        ..config.clone()
    });
    assert_eq!(mode(&loose), 0o600);
    assert_eq!(std::fs::read_to_string(&loose).unwrap(), "{}\n");

    let target = dir.path().join("victim");
    std::fs::write(&target, "precious\n").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    let planted = dir.path().join("planted.jsonl");
    std::os::unix::fs::symlink(&target, &planted).unwrap();
    let err = Guard::new(
        &GuardConfig {
            audit_log: Some(planted.clone()),
            ..config.clone()
        },
        Arc::new(Registry::new()),
    )
    .expect_err("a symlink at the audit path");
    let message = err.to_string();
    assert!(
        message.contains(&planted.display().to_string()) && message.contains("symbolic link"),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    assert_eq!(mode(&target), 0o644);

    // A dangling one would have created its target: refused as well, nothing created.
    let nowhere = dir.path().join("would-be-created");
    let dangling = dir.path().join("dangling.jsonl");
    std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
    assert!(Guard::new(
        &GuardConfig {
            audit_log: Some(dangling),
            ..config
        },
        Arc::new(Registry::new()),
    )
    .is_err());
    assert!(!nowhere.exists());
}

#[tokio::test]
async fn unix_socket_backend_is_identified_by_its_start_time() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_unix").await;
    let Some(a) = DirectSession::unix(cluster, &db).await else {
        eprintln!("skipped: an external server has no unix socket we know of");
        return;
    };
    let admin = connect(cluster, &db).await;
    let conn = enforcer_connection(cluster, &db).await;
    let registry = Arc::new(Registry::new());
    let registration = a.register(&registry, &db);
    let record = registration.record();

    // A window that ended before this backend started: a reused pid, not ours.
    let long_ago = record.connected_at - 4 * START_AFTER;
    let stale = Identity {
        client_port: -1,
        earliest: long_ago - START_AFTER,
        latest: long_ago,
    };
    assert_eq!(
        enforcer::terminate_verified(&conn, a.pid, &stale, None, None)
            .await
            .unwrap()
            .outcome,
        Outcome::IdentityMismatch
    );
    assert!(backend_alive(&admin, a.pid).await);

    // A TCP identity never matches a unix-socket backend (client_port is -1).
    assert_eq!(
        enforcer::terminate_verified(
            &conn,
            a.pid,
            &Identity::connected(5432, SystemTime::now()),
            None,
            None
        )
        .await
        .unwrap()
        .outcome,
        Outcome::IdentityMismatch
    );

    let ours = Identity::of(record);
    assert_eq!(
        enforcer::terminate_verified(&conn, a.pid, &ours, None, None)
            .await
            .unwrap()
            .outcome,
        Outcome::Terminated
    );
    assert!(!backend_alive(&admin, a.pid).await);
}

#[tokio::test]
async fn lost_client_holding_a_protected_row_lock_is_terminated_and_the_waiter_proceeds() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_lost").await;
    let admin = connect(cluster, &db).await;
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_path = audit_dir.path().join("audit.jsonl");
    let config = GuardConfig {
        audit_log: Some(audit_path.clone()),
        ..guard_config(cluster, PROTECTED)
    };
    let (guard, registry) = build_guard(&config);

    let a = DirectSession::tcp(cluster, &db).await;
    let registration = a.register(&registry, &db);
    let record = registration.record();
    a.run(record, LOCK_ROW, TxnStatus::InTransaction)
        .await
        .unwrap();
    let (b_pid, b) = blocked_update(cluster, &db).await;
    wait_until_waiting(&admin, b_pid).await;

    let lost_at = Instant::now();
    let event = acted(guard.on_client_lost(record, "eof without Terminate").await);
    assert_proceeds(b, Duration::from_secs(1).saturating_sub(lost_at.elapsed())).await;
    assert!(!backend_alive(&admin, a.pid).await);

    assert_eq!(event.outcome, Outcome::Terminated);
    assert_eq!(event.trigger, "client_loss");
    assert_eq!(event.cause.as_deref(), Some("eof without Terminate"));
    assert_eq!(event.backend_pid, a.pid);
    assert_eq!(event.session_id, record.id);
    assert_eq!(event.database, db);
    assert_eq!(event.state, "idle in transaction");
    assert_eq!(event.locks.len(), 1);
    assert_eq!(event.locks[0].table, "app.user_sessions");
    assert_eq!(event.locks[0].mode, "RowShareLock");
    assert_eq!((event.waiters, event.waiter_pids.clone()), (1, vec![b_pid]));
    assert!(event.last_statement.contains("FOR UPDATE"), "{event:?}");
    assert!(event.xact_ms.is_some() && !event.dry_run);
    assert!(
        event.summary.starts_with(&format!(
            "lockguard: terminated backend {}: client lost (eof without Terminate)",
            a.pid
        )),
        "{}",
        event.summary
    );
    assert_eq!(guard.audit().recent(), vec![event.clone()]);

    // The same event lands in the JSON-lines file (written by a background thread).
    let mut line = None;
    wait_for(Duration::from_secs(5), "the audit file line", || {
        line = std::fs::read_to_string(&audit_path)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_owned));
        std::future::ready(line.is_some())
    })
    .await;
    let json: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
    assert_eq!(json["backend_pid"], a.pid);
    assert_eq!(json["outcome"], "terminated");
    assert_eq!(json["locks"][0]["table"], "app.user_sessions");
    assert_eq!(json["locks"][0]["mode"], "RowShareLock");
    assert_eq!(json["waiter_pids"][0], b_pid);
}

#[tokio::test]
async fn lost_client_without_a_protected_lock_is_left_alone() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_unprot").await;
    let admin = connect(cluster, &db).await;
    let config = clocked_config(cluster);
    let (guard, registry, clock) = build_guard_with_clock(&config);

    // A row lock on an unprotected table, with someone waiting for it.
    let a = DirectSession::tcp(cluster, &db).await;
    let registration = a.register(&registry, &db);
    let record = registration.record();
    a.run(
        record,
        "BEGIN; SELECT * FROM app.scratch WHERE id = 1 FOR UPDATE",
        TxnStatus::InTransaction,
    )
    .await
    .unwrap();
    let decision = guard.on_client_lost(record, "connection reset").await;
    assert_eq!(decision, Decision::Left(LeaveReason::NoProtectedLock));
    assert!(backend_alive(&admin, a.pid).await);

    // Idle past the timeout it is left alone too, and, since an idle session cannot take new
    // locks, probed only once while it stays in that state.
    clock.advance(past(config.idle_in_transaction_timeout));
    let report = guard.sweep_once().await;
    assert_eq!(report.left, vec![(record.id, LeaveReason::NoProtectedLock)]);
    assert_eq!(guard.sweep_once().await.candidates, 0);
    assert!(backend_alive(&admin, a.pid).await);

    // Outside a transaction the guard does not even ask PostgreSQL.
    a.run(record, "ROLLBACK", TxnStatus::Idle).await.unwrap();
    let decision = guard.on_client_lost(record, "connection reset").await;
    assert_eq!(decision, Decision::Left(LeaveReason::NoTransaction));
    assert!(backend_alive(&admin, a.pid).await);
    assert!(guard.audit().recent().is_empty());
}

#[tokio::test]
async fn dry_run_records_a_would_be_kill_once_and_kills_nothing() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_dry").await;
    let admin = connect(cluster, &db).await;
    let config = GuardConfig {
        dry_run: true,
        ..clocked_config(cluster)
    };
    let (guard, registry, clock) = build_guard_with_clock(&config);

    let a = DirectSession::tcp(cluster, &db).await;
    let registration = a.register(&registry, &db);
    let record = registration.record();
    a.run(record, LOCK_ROW, TxnStatus::InTransaction)
        .await
        .unwrap();

    let event = acted(guard.on_client_lost(record, "eof without Terminate").await);
    assert_eq!(event.outcome, Outcome::DryRun);
    assert!(event.dry_run);
    assert!(
        event
            .summary
            .starts_with("lockguard: would terminate (dry run)"),
        "{}",
        event.summary
    );
    assert!(
        !record.kill_pending(),
        "dry-run must not hold back the session"
    );
    assert!(backend_alive(&admin, a.pid).await);

    // The sweep, past the idle timeout, records its would-be kill once, not every tick.
    assert_eq!(
        guard.sweep_once().await.candidates,
        0,
        "not idle long enough yet"
    );
    clock.advance(past(config.idle_in_transaction_timeout));
    let first = guard.sweep_once().await;
    assert_eq!(first.events.len(), 1, "{first:?}");
    assert_eq!(first.events[0].outcome, Outcome::DryRun);
    assert_eq!(first.events[0].trigger, "idle_in_transaction");
    let second = guard.sweep_once().await;
    assert!(second.events.is_empty(), "{second:?}");
    assert_eq!(guard.audit().recent().len(), 2);

    assert!(backend_alive(&admin, a.pid).await);
    a.client
        .batch_execute("SELECT 1")
        .await
        .expect("untouched by the dry run");
}

#[tokio::test]
async fn sweep_terminates_a_session_idle_in_transaction_and_tells_its_client() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_sweep").await;
    let admin = connect(cluster, &db).await;
    let config = clocked_config(cluster);
    let (guard, registry, clock) = build_guard_with_clock(&config);

    let a = DirectSession::tcp(cluster, &db).await;
    let registration = a.register(&registry, &db);
    let record = Arc::clone(registration.record());
    a.run(&record, LOCK_ROW, TxnStatus::InTransaction)
        .await
        .unwrap();
    let (b_pid, b) = blocked_update(cluster, &db).await;
    wait_until_waiting(&admin, b_pid).await;

    let shutdown = CancellationToken::new();
    let sweeper = tokio::spawn(Arc::clone(&guard).run_sweeper(shutdown.clone()));
    let mut sweeps = guard.sweep_reports();
    // A sweep before the timeout passes the session over.
    let early = sweeps.recv().await.expect("a sweep report");
    assert_eq!(early.candidates, 0, "{early:?}");
    assert!(!record.kill_pending());
    clock.advance(past(config.idle_in_transaction_timeout));

    let notice = tokio::time::timeout(Duration::from_secs(5), record.killed())
        .await
        .expect("the sweep did not kill the idle session");
    assert_eq!(notice.sqlstate, "57P01");
    assert!(
        notice.message.starts_with(&format!(
            "lockguard: terminated backend {}: idle in transaction for ",
            a.pid
        )),
        "{}",
        notice.message
    );
    assert!(
        notice
            .message
            .ends_with("holding RowShareLock on app.user_sessions; 1 session waiting"),
        "{}",
        notice.message
    );
    assert_proceeds(b, Duration::from_secs(2)).await;
    assert!(!backend_alive(&admin, a.pid).await);

    let events = guard.audit().recent();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].trigger, "idle_in_transaction");
    assert_eq!(events[0].outcome, Outcome::Terminated);
    assert_eq!(events[0].summary, notice.message);
    assert!(events[0].idle_ms >= config.idle_in_transaction_timeout.as_millis() as u64);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), sweeper)
        .await
        .expect("the sweeper stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn require_waiters_spares_an_idle_holder_until_someone_waits() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_waiters").await;
    let admin = connect(cluster, &db).await;
    let config = GuardConfig {
        require_waiters: true,
        ..clocked_config(cluster)
    };
    let (guard, registry, clock) = build_guard_with_clock(&config);

    let a = DirectSession::tcp(cluster, &db).await;
    let registration = a.register(&registry, &db);
    let record = registration.record();
    a.run(record, LOCK_ROW, TxnStatus::InTransaction)
        .await
        .unwrap();
    clock.advance(past(config.idle_in_transaction_timeout));

    for _ in 0..3 {
        let report = guard.sweep_once().await;
        assert_eq!(report.candidates, 1);
        assert!(report.events.is_empty(), "{report:?}");
        assert_eq!(report.left, vec![(record.id, LeaveReason::NoWaiters)]);
    }
    assert!(backend_alive(&admin, a.pid).await);
    assert!(!record.kill_pending());

    // Now someone needs the row: the next sweep acts.
    let (b_pid, b) = blocked_update(cluster, &db).await;
    wait_until_waiting(&admin, b_pid).await;
    let report = guard.sweep_once().await;
    assert_eq!(report.events.len(), 1, "{report:?}");
    assert_eq!(report.events[0].outcome, Outcome::Terminated);
    assert_eq!(report.events[0].waiter_pids, vec![b_pid]);
    assert_proceeds(b, Duration::from_secs(2)).await;
    assert_eq!(
        record.kill_notice().map(|n| n.sqlstate),
        Some("57P01"),
        "the live client gets lockguard's notice"
    );
}

#[tokio::test]
async fn sweep_terminates_a_failed_subtransaction_that_keeps_its_locks() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_failed").await;
    let admin = connect(cluster, &db).await;
    let config = GuardConfig {
        idle_in_transaction_timeout: Duration::ZERO,
        ..clocked_config(cluster)
    };
    let (guard, registry, clock) = build_guard_with_clock(&config);

    let a = DirectSession::tcp(cluster, &db).await;
    let registration = a.register(&registry, &db);
    let record = registration.record();
    a.run(record, LOCK_ROW, TxnStatus::InTransaction)
        .await
        .unwrap();
    // An error after a savepoint leaves the outer transaction's locks held in state E.
    let err = a
        .run(record, "SAVEPOINT s; SELECT 1 / 0", TxnStatus::Failed)
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"));
    let (b_pid, b) = blocked_update(cluster, &db).await;
    wait_until_waiting(&admin, b_pid).await;

    assert_eq!(
        guard.sweep_once().await.candidates,
        0,
        "not idle long enough yet"
    );
    clock.advance(past(config.failed_transaction_timeout));
    let report = guard.sweep_once().await;
    assert_eq!(report.events.len(), 1, "{report:?}");
    let event = &report.events[0];
    assert_eq!(event.trigger, "failed_transaction");
    assert_eq!(event.state, "idle in transaction (aborted)");
    assert_eq!(event.outcome, Outcome::Terminated);
    assert!(
        event.summary.contains("idle in failed transaction for"),
        "{}",
        event.summary
    );
    assert_proceeds(b, Duration::from_secs(2)).await;
    assert!(!backend_alive(&admin, a.pid).await);
}

#[tokio::test]
async fn sweep_leaves_a_backend_that_is_busy_or_not_ours() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_busy").await;
    let admin = connect(cluster, &db).await;
    let config = clocked_config(cluster);
    let (guard, registry, clock) = build_guard_with_clock(&config);

    // A: the proxy's record says idle in transaction, but the server is already running a
    // statement (the client sent it just as the sweep looked): not idle, not killed.
    let a = DirectSession::tcp(cluster, &db).await;
    let a_registration = a.register(&registry, &db);
    let a_record = a_registration.record();
    a.run(a_record, LOCK_ROW, TxnStatus::InTransaction)
        .await
        .unwrap();

    // C: a record whose upstream port is not the backend's (the pid was reused, say).
    let c = DirectSession::tcp(cluster, &db).await;
    c.client
        .batch_execute("BEGIN; SELECT * FROM app.user_sessions WHERE id = 2 FOR UPDATE")
        .await
        .unwrap();
    let c_registration = registry.register(
        a_record.client.clone(),
        guard_core::UpstreamIdentity::Tcp("127.0.0.1:1".parse().unwrap()),
    );
    let c_record = c_registration.record();
    c_record.set_backend_key(c.pid, &[0; 4]);
    c_record.statement_started();
    c_record.ready_for_query(guard_core::TxnStatus::InTransaction, false);

    clock.advance(past(config.idle_in_transaction_timeout));
    let a_pid = a.pid;
    let busy = tokio::spawn(async move {
        a.client
            .batch_execute("SELECT pg_sleep(1.5)")
            .await
            .map(|_| a)
    });
    wait_for(Duration::from_secs(5), "A to be active", || async {
        admin
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&a_pid],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;

    let probes_before = guard.probe_latency().count;
    let report = guard.sweep_once().await;
    assert_eq!(report.candidates, 2);
    // Both candidates share a database: one probe round trip covers them.
    assert_eq!(guard.probe_latency().count, probes_before + 1);
    assert!(report.events.is_empty(), "{report:?}");
    let mut left = report.left.clone();
    left.sort_by_key(|(id, _)| *id);
    assert_eq!(
        left,
        vec![
            (a_record.id, LeaveReason::ServerState("active".into())),
            (c_record.id, LeaveReason::NotOurBackend),
        ]
    );
    assert!(!a_record.kill_pending() && !c_record.kill_pending());
    let a = busy
        .await
        .unwrap()
        .expect("A's statement finished undisturbed");
    a.client.batch_execute("ROLLBACK").await.unwrap();
    assert!(backend_alive(&admin, c.pid).await);
    c.client.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn operator_kill_terminates_without_protected_locks_and_tells_the_client() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_operator").await;
    let admin = connect(cluster, &db).await;
    let (guard, registry) = build_guard(&guard_config(cluster, PROTECTED));

    let a = DirectSession::tcp(cluster, &db).await;
    let registration = a.register(&registry, &db);
    let record = registration.record();
    a.run(record, "SELECT 1", TxnStatus::Idle).await.unwrap();

    let event = guard
        .kill_session(record, "requested by ops")
        .await
        .expect("operator kill");
    assert_eq!(event.outcome, Outcome::Terminated);
    assert_eq!(event.trigger, "operator");
    assert!(event.locks.is_empty());
    let notice = record.kill_notice().expect("the client is told");
    assert_eq!(notice.sqlstate, "57P01");
    assert!(
        notice.message.starts_with(&format!(
            "lockguard: terminated by operator: backend {}: requested by ops, after",
            a.pid
        )),
        "{}",
        notice.message
    );
    assert!(!backend_alive(&admin, a.pid).await);

    // A second kill of the same session finds nothing to kill (already gone) or refuses
    // because the first is still recorded as under way.
    match guard.kill_session(record, "again").await {
        Ok(event) => assert_eq!(event.outcome, Outcome::AlreadyGone),
        Err(e) => assert!(e.to_string().contains("already being terminated"), "{e}"),
    }
}

#[tokio::test]
async fn guard_reconnects_after_its_own_backend_is_terminated() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_reconnect").await;
    let admin = connect(cluster, &db).await;
    let (guard, registry) = build_guard(&guard_config(cluster, PROTECTED));

    let a = DirectSession::tcp(cluster, &db).await;
    let registration = a.register(&registry, &db);
    let record = registration.record();
    a.run(record, LOCK_ROW, TxnStatus::InTransaction)
        .await
        .unwrap();
    let guard_pid = |guard: &Guard| {
        guard
            .health()
            .databases
            .iter()
            .find(|d| d.database == db)
            .and_then(|d| d.backend_pid)
    };

    assert_eq!(
        guard.probe(&db, &[a.pid]).await.unwrap()[&a.pid]
            .locks
            .len(),
        1
    );
    let first = guard_pid(&guard).expect("connected");
    assert_eq!(guard.health().status, HealthStatus::Ok);

    // Kill it and probe at once: the probe notices the closed connection and reconnects.
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    assert_eq!(
        guard.probe(&db, &[a.pid]).await.unwrap()[&a.pid]
            .locks
            .len(),
        1
    );
    let second = guard_pid(&guard).expect("reconnected");
    assert_ne!(first, second);

    // Kill it and wait: health reports the loss, then the sweep's upkeep reconnects.
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&second])
        .await
        .unwrap();
    wait_for(Duration::from_secs(5), "health to report the loss", || {
        std::future::ready(guard.health().status == HealthStatus::Degraded)
    })
    .await;
    let health = guard.health();
    assert!(
        health
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("closed")),
        "{health:?}"
    );
    guard.sweep_once().await;
    assert_eq!(
        guard.health().status,
        HealthStatus::Ok,
        "{:?}",
        guard.health()
    );
    let third = guard_pid(&guard).expect("reconnected by the sweep");
    assert!(third != first && third != second);

    // And the guard still does its job: the lost client's backend is terminated.
    let event = acted(guard.on_client_lost(record, "eof without Terminate").await);
    assert_eq!(event.outcome, Outcome::Terminated);
    assert!(!backend_alive(&admin, a.pid).await);
}

#[tokio::test]
async fn unreachable_guard_database_degrades_fast_and_touches_nothing() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "guard_down").await;
    let admin = connect(cluster, &db).await;
    // A port nobody listens on: the guard's connections fail, the session does not care.
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = GuardConfig {
        dsn: Some(format!(
            "host=127.0.0.1 port={closed_port} user=postgres dbname=postgres"
        )),
        ..guard_config(cluster, PROTECTED)
    };
    let (guard, registry) = build_guard(&config);

    let a = DirectSession::tcp(cluster, &db).await;
    let registration = a.register(&registry, &db);
    let record = registration.record();
    a.run(record, LOCK_ROW, TxnStatus::InTransaction)
        .await
        .unwrap();

    let started = Instant::now();
    let decision = guard.on_client_lost(record, "connection reset").await;
    assert!(matches!(decision, Decision::Unavailable(_)), "{decision:?}");
    assert!(started.elapsed() < CLIENT_LOSS_DEADLINE);
    // Within the backoff the guard answers at once instead of hammering the server.
    let started = Instant::now();
    assert!(guard.probe(&db, &[a.pid]).await.is_err());
    assert!(started.elapsed() < Duration::from_millis(100));

    let health = guard.health();
    assert_eq!(health.status, HealthStatus::Degraded);
    assert!(health.last_error.is_some(), "{health:?}");
    assert_eq!(health.databases.len(), 1);
    assert!(!health.databases[0].connected);
    assert!(health.databases[0].consecutive_failures >= 1);

    assert!(backend_alive(&admin, a.pid).await);
    assert!(!record.kill_pending());
    a.client.batch_execute("ROLLBACK").await.unwrap();
}
