//! The guard without the proxy, its sweep and its rules: direct sessions play
//! the application, hand-made session records play the proxy's view of them, and every test
//! checks what PostgreSQL says afterwards — who holds what, who waits, who is still alive.

use std::sync::Arc;
use std::time::Duration;

use guard_core::{LeaveReason, Outcome, TxnStatus};
use lockguard_config::GuardConfig;
use lockguard_tests::direct_guard::*;
use lockguard_tests::guard_support::{backend_alive, wait_for, wait_until_waiting, DirectSession};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn dry_run_records_a_would_be_kill_once_and_kills_nothing() {
    let Scene { cluster, db, admin } = Scene::new("guard_dry").await;
    let config = GuardConfig {
        dry_run: true,
        ..clocked_config(cluster)
    };
    let (guard, registry, clock) = build_guard_with_clock(&config);

    let (a, registration) =
        registered(cluster, &registry, &db, LOCK_ROW, TxnStatus::InTransaction).await;
    let record = registration.record();

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
    let Scene { cluster, db, admin } = Scene::new("guard_sweep").await;
    let config = clocked_config(cluster);
    let (guard, registry, clock) = build_guard_with_clock(&config);

    let (a, registration) =
        registered(cluster, &registry, &db, LOCK_ROW, TxnStatus::InTransaction).await;
    let record = Arc::clone(registration.record());
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
    assert_told(
        notice,
        &format!(
            "lockguard: terminated backend {}: idle in transaction for ",
            a.pid
        ),
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
    let Scene { cluster, db, admin } = Scene::new("guard_waiters").await;
    let config = GuardConfig {
        require_waiters: true,
        ..clocked_config(cluster)
    };
    let (guard, registry, clock) = build_guard_with_clock(&config);

    let (a, registration) =
        registered(cluster, &registry, &db, LOCK_ROW, TxnStatus::InTransaction).await;
    let record = registration.record();
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
    let Scene { cluster, db, admin } = Scene::new("guard_failed").await;
    let config = GuardConfig {
        idle_in_transaction_timeout: Duration::ZERO,
        ..clocked_config(cluster)
    };
    let (guard, registry, clock) = build_guard_with_clock(&config);

    let (a, registration) =
        registered(cluster, &registry, &db, LOCK_ROW, TxnStatus::InTransaction).await;
    let record = registration.record();
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
    let Scene { cluster, db, admin } = Scene::new("guard_busy").await;
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
