//! The guard without the proxy, finding locks and telling backends apart: direct sessions play
//! the application, hand-made session records play the proxy's view of them, and every test
//! checks what PostgreSQL says afterwards — who holds what, who waits, who is still alive.
//! Here: the probe, and a record matched to its backend only (a stale client port, a backend
//! that outlived its record, a Unix-socket backend by its start time).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use guard_core::enforcer::{self, RequiredState, START_AFTER};
use guard_core::{GuardConnection, HeldLock, Identity, Outcome, Registry, Termination};
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::direct_guard::*;
use lockguard_tests::guard_support::{
    backend_alive, connect, guard_config, guard_test_database, wait_until_waiting, DirectSession,
};

#[tokio::test]
async fn probe_finds_a_row_lock_on_a_protected_table_and_the_session_waiting_behind_it() {
    let Scene { cluster, db, admin } = Scene::new("guard_probe").await;
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

/// The enforcer's verified kill of `pid`, as it answered.
async fn kill(
    conn: &GuardConnection,
    pid: i32,
    identity: &Identity,
    probed_start: Option<SystemTime>,
    required: Option<RequiredState<'_>>,
) -> Termination {
    enforcer::terminate_verified(conn, pid, identity, probed_start, required)
        .await
        .expect("the enforcer's query")
}

/// The idle rule's refusal: the backend is no longer idle in a failed transaction.
fn no_longer_idle() -> Termination {
    Termination {
        outcome: Outcome::NoLongerIdle,
        detail: Some("idle in transaction".into()),
    }
}

// Long because it walks one backend through every refusal before the kill that succeeds: each
// step needs the same backend, still holding its lock, that the previous step left alive.
#[tokio::test]
async fn enforcer_with_a_stale_client_port_signals_nothing_and_the_right_port_terminates() {
    let Scene { cluster, db, admin } = Scene::new("guard_enforce").await;
    let conn = enforcer_connection(cluster, &db).await;

    let a = DirectSession::tcp(cluster, &db).await;
    a.client.batch_execute(LOCK_ROW).await.unwrap();
    let port = a.local_addr.expect("tcp").port();
    let other_port = if port == u16::MAX { port - 1 } else { port + 1 };
    let stale = Identity::connected(i32::from(other_port), SystemTime::now());

    let outcome = kill(&conn, a.pid, &stale, None, None).await;
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
    let outcome = kill(
        &conn,
        a.pid,
        &right,
        None,
        Some(RequiredState::state("idle in transaction (aborted)")),
    )
    .await;
    assert_eq!(outcome, no_longer_idle());
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
    let outcome = kill(&conn, a.pid, &right, None, Some(since_old)).await;
    assert_eq!(outcome, no_longer_idle());
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
    let outcome = kill(&conn, a.pid, &right, later, Some(since_now)).await;
    assert_eq!(outcome.outcome, Outcome::IdentityMismatch);
    assert!(backend_alive(&admin, a.pid).await);

    let outcome = kill(&conn, a.pid, &right, Some(probed_start), Some(since_now)).await;
    assert_eq!(outcome.outcome, Outcome::Terminated);
    // terminate_verified waits for the backend to exit.
    assert!(!backend_alive(&admin, a.pid).await);
    assert!(a.client.batch_execute("SELECT 1").await.is_err());

    // Killing it again finds nothing; so does a pid that never existed.
    assert_eq!(
        kill(&conn, a.pid, &right, None, None).await.outcome,
        Outcome::AlreadyGone
    );
    assert_eq!(
        kill(&conn, 0x3fff_fff0, &right, None, None).await.outcome,
        Outcome::AlreadyGone
    );
}

/// A record can outlive its backend (the pump has not noticed yet); once our socket is
/// closed a newer connection may get both its pid and its port. Over TCP the port is then not
/// proof enough: the newer backend started after our session connected, so it is not ours.
#[tokio::test]
async fn a_tcp_record_that_outlived_its_backend_never_matches_a_newer_backend() {
    let Scene { cluster, db, admin } = Scene::new("guard_outlived").await;
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
