//! The guard without the proxy, when a client is lost: direct sessions play
//! the application, hand-made session records play the proxy's view of them, and every test
//! checks what PostgreSQL says afterwards — who holds what, who waits, who is still alive.

use std::time::{Duration, Instant};

use guard_core::{Decision, LeaveReason, Outcome, TxnStatus};
use lockguard_config::GuardConfig;
use lockguard_tests::direct_guard::*;
use lockguard_tests::guard_support::{backend_alive, guard_config, wait_for, wait_until_waiting};

#[tokio::test]
async fn lost_client_holding_a_protected_row_lock_is_terminated_and_the_waiter_proceeds() {
    let Scene { cluster, db, admin } = Scene::new("guard_lost").await;
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_path = audit_dir.path().join("audit.jsonl");
    let config = GuardConfig {
        audit_log: Some(audit_path.clone()),
        ..guard_config(cluster, PROTECTED)
    };
    let (guard, registry) = build_guard(&config);

    let (a, registration) =
        registered(cluster, &registry, &db, LOCK_ROW, TxnStatus::InTransaction).await;
    let record = registration.record();
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
    let Scene { cluster, db, admin } = Scene::new("guard_unprot").await;
    let config = clocked_config(cluster);
    let (guard, registry, clock) = build_guard_with_clock(&config);

    // A row lock on an unprotected table, with someone waiting for it.
    let (a, registration) = registered(
        cluster,
        &registry,
        &db,
        "BEGIN; SELECT * FROM app.scratch WHERE id = 1 FOR UPDATE",
        TxnStatus::InTransaction,
    )
    .await;
    let record = registration.record();
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
