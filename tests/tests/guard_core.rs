//! The guard against a real PostgreSQL, without the proxy: direct tokio-postgres sessions play
//! the application, hand-made session records play the proxy's view of them, and every test
//! checks what PostgreSQL says afterwards — who holds what, who waits, who is still alive.
//! Here: operator kills, the audit log's file, and the guard's own connection (reconnecting,
//! an unreachable database). The probe and identification, lost clients and the sweep have
//! files of their own (`guard_core_identity.rs`, `guard_core_client_loss.rs`,
//! `guard_core_sweep.rs`).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guard_core::guard::CLIENT_LOSS_DEADLINE;
use guard_core::{Decision, Guard, HealthStatus, Outcome, Registry, TxnStatus};
use lockguard_config::GuardConfig;
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::direct_guard::*;
use lockguard_tests::guard_support::{backend_alive, guard_config, wait_for};

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
async fn operator_kill_terminates_without_protected_locks_and_tells_the_client() {
    let Scene { cluster, db, admin } = Scene::new("guard_operator").await;
    let (guard, registry) = build_guard(&guard_config(cluster, PROTECTED));

    let (a, registration) = registered(cluster, &registry, &db, "SELECT 1", TxnStatus::Idle).await;
    let record = registration.record();

    let event = guard
        .kill_session(record, "requested by ops")
        .await
        .expect("operator kill");
    assert_eq!(event.outcome, Outcome::Terminated);
    assert_eq!(event.trigger, "operator");
    assert!(event.locks.is_empty());
    let notice = record.kill_notice().expect("the client is told");
    assert_told(
        notice,
        &format!(
            "lockguard: terminated by operator: backend {}: requested by ops, after",
            a.pid
        ),
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
    let Scene { cluster, db, admin } = Scene::new("guard_reconnect").await;
    let (guard, registry) = build_guard(&guard_config(cluster, PROTECTED));

    let (a, registration) =
        registered(cluster, &registry, &db, LOCK_ROW, TxnStatus::InTransaction).await;
    let record = registration.record();
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
    let Scene { cluster, db, admin } = Scene::new("guard_down").await;
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

    let (a, registration) =
        registered(cluster, &registry, &db, LOCK_ROW, TxnStatus::InTransaction).await;
    let record = registration.record();

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
