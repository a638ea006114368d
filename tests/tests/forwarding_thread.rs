//! The forwarding thread carries steady sessions and gives them back for their end; with
//! `forwarding_threads = 0` the async runtime forwards everything. (Under the test hooks a
//! session moves at its first ReadyForQuery, so every other integration test runs its sessions
//! through the thread too; these tests show that it does.)
//!
//! Its own test binary: the message observer is one per process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockguard::session::testing::{observe_messages, Observation};
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support;
use lockguard_tests::prometheus;
use lockguard_tests::proxy::{config_for, TestProxy};
use tokio::sync::OnceCell;

/// A session id whose next client message scanned on the forwarding thread makes the observer
/// panic there (0: none): the way a test makes the thread fail.
static PANIC_ON_THREAD_FOR: AtomicU64 = AtomicU64::new(0);

/// Every observation of this process, in the order the pumps scanned the messages.
fn observations() -> &'static Mutex<Vec<Observation>> {
    static SEEN: std::sync::OnceLock<Arc<Mutex<Vec<Observation>>>> = std::sync::OnceLock::new();
    SEEN.get_or_init(|| {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        assert!(observe_messages(move |o| {
            // Before taking the lock, so the panic leaves it unpoisoned.
            if o.on_forwarding_thread
                && o.from_client
                && o.session == PANIC_ON_THREAD_FOR.load(Ordering::SeqCst)
            {
                PANIC_ON_THREAD_FOR.store(0, Ordering::SeqCst);
                panic!("the test makes the forwarding thread fail");
            }
            if let Ok(mut seen) = sink.lock() {
                seen.push(o);
            }
        }));
        seen
    })
}

/// Session ids are per proxy, and each test starts its own: the tests take turns, each with
/// the observations cleared.
async fn take_turn() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let turn = TURN.lock().await;
    observations().lock().expect("observations").clear();
    turn
}

/// The observations of one session.
fn of_session(session: u64) -> Vec<Observation> {
    observations()
        .lock()
        .expect("observations")
        .iter()
        .filter(|o| o.session == session)
        .copied()
        .collect()
}

async fn database() -> &'static str {
    static DB: OnceCell<String> = OnceCell::const_new();
    DB.get_or_init(|| async {
        TestCluster::shared()
            .create_database("forwarding_thread")
            .await
    })
    .await
}

const SERVER_READY_FOR_QUERY: u8 = b'Z';

const CARRIED_GAUGE: &str = "lockguard_sessions_on_forwarding_threads";

/// The sessions the proxy's forwarding threads carry now, by its metrics.
async fn carried_now(proxy: &TestProxy) -> Option<f64> {
    let metrics = prometheus::scrape(proxy.http.expect("HTTP admin port")).await;
    metrics.get(CARRIED_GAUGE).copied()
}

#[tokio::test]
async fn a_steady_session_is_forwarded_by_the_thread_and_ends_as_usual() {
    let _turn = take_turn().await;
    let cluster = TestCluster::shared();
    let db = database().await;
    let proxy = TestProxy::start(cluster).await;
    let (client, record) = proxy.connect_session(cluster.superuser(), db).await;
    let session = record.id;
    // A result far bigger than the socket buffers: the client falls behind, the thread gives
    // the session back with a backlog, the pump drains it, and the session moves again.
    let rows = client
        .query(
            "SELECT i, repeat('x', 1000) FROM generate_series(1, 20000) AS i",
            &[],
        )
        .await
        .expect("big result");
    assert_eq!(rows.len(), 20_000);
    for (n, row) in rows.iter().enumerate() {
        assert_eq!(row.get::<_, i32>(0), i32::try_from(n + 1).expect("small"));
        assert_eq!(row.get::<_, String>(1).len(), 1000);
    }
    client.batch_execute("SELECT 1").await.expect("select");

    let seen = of_session(session);
    let first_ready = seen
        .iter()
        .position(|o| !o.from_client && o.tag == SERVER_READY_FOR_QUERY)
        .expect("the session's first ReadyForQuery");
    assert!(
        seen[..=first_ready].iter().all(|o| !o.on_forwarding_thread),
        "startup is forwarded by the session's task"
    );
    let carried = &seen[first_ready + 1..];
    assert!(
        carried
            .iter()
            .any(|o| o.from_client && o.on_forwarding_thread),
        "the client's statements went through the forwarding thread: {carried:?}"
    );
    assert!(
        carried
            .iter()
            .any(|o| !o.from_client && o.on_forwarding_thread),
        "the server's answers went through the forwarding thread"
    );
    // Idle after its answer, the session stays on the thread, and the metrics say so.
    assert_eq!(carried_now(&proxy).await, Some(1.0));

    // The session comes back for its end: an orderly goodbye leaves no session behind.
    drop(client);
    proxy.wait_for_sessions(0, Duration::from_secs(5)).await;
    assert_eq!(carried_now(&proxy).await, Some(0.0));
}

#[tokio::test]
async fn with_no_forwarding_threads_the_runtime_forwards_everything() {
    let _turn = take_turn().await;
    let cluster = TestCluster::shared();
    let db = database().await;
    let mut config = config_for(cluster);
    config.proxy.forwarding_threads = Some(0);
    let proxy = TestProxy::start_with(config).await;
    let (client, record) = proxy.connect_session(cluster.superuser(), db).await;
    let session = record.id;
    for _ in 0..3 {
        client.batch_execute("SELECT 1").await.expect("select");
    }
    let seen = of_session(session);
    let readies = seen
        .iter()
        .filter(|o| !o.from_client && o.tag == SERVER_READY_FOR_QUERY)
        .count();
    assert!(readies >= 4, "the statements were observed: {seen:?}");
    assert!(seen.iter().all(|o| !o.on_forwarding_thread));
    assert_eq!(carried_now(&proxy).await, Some(0.0));
}

#[tokio::test]
async fn a_carried_client_that_vanishes_in_a_transaction_has_its_locks_released() {
    let _turn = take_turn().await;
    let cluster = TestCluster::shared();
    let db = database().await;
    let owner = guard_support::connect(cluster, db).await;
    owner
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS carried_locks (id int PRIMARY KEY); \
             INSERT INTO carried_locks VALUES (1) ON CONFLICT DO NOTHING",
        )
        .await
        .expect("table");
    let proxy = TestProxy::start(cluster).await;
    let (client, record) = proxy.connect_session(cluster.superuser(), db).await;
    let session = record.id;
    client
        .batch_execute("BEGIN; SELECT * FROM carried_locks WHERE id = 1 FOR UPDATE")
        .await
        .expect("lock the row");
    assert!(
        of_session(session)
            .iter()
            .any(|o| o.from_client && o.on_forwarding_thread),
        "the session was on the forwarding thread when its client went"
    );
    // The client's process dies: its socket closes without a Terminate. The thread gives the
    // session back at the end of the stream, and the pump ends it as a lost client: the
    // upstream closes, the backend rolls back, the row is free.
    drop(client);
    guard_support::wait_for(Duration::from_secs(10), "the row to be free", || async {
        owner
            .batch_execute("SELECT * FROM carried_locks WHERE id = 1 FOR UPDATE NOWAIT")
            .await
            .is_ok()
    })
    .await;
    proxy.wait_for_sessions(0, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_panic_while_forwarding_one_session_closes_that_session_only() {
    let _turn = take_turn().await;
    let cluster = TestCluster::shared();
    let db = database().await;
    let proxy = TestProxy::start(cluster).await;
    let (victim, victim_record) = proxy.connect_session(cluster.superuser(), db).await;
    let (other, other_record) = proxy.connect_session(cluster.superuser(), db).await;
    victim.batch_execute("SELECT 1").await.expect("select");
    other.batch_execute("SELECT 1").await.expect("select");
    assert_eq!(carried_now(&proxy).await, Some(2.0), "both on the thread");

    // Forwarding the victim's next statement panics on the thread.
    PANIC_ON_THREAD_FOR.store(victim_record.id, Ordering::SeqCst);
    victim
        .batch_execute("SELECT 2")
        .await
        .expect_err("the session whose forwarding failed is closed");
    proxy.wait_for_sessions(1, Duration::from_secs(5)).await;

    // The thread goes on: the other session is still forwarded by it, and so is a new one.
    observations().lock().expect("observations").clear();
    other
        .batch_execute("SELECT 3")
        .await
        .expect("the other session goes on");
    let (newcomer, newcomer_record) = proxy.connect_session(cluster.superuser(), db).await;
    newcomer
        .batch_execute("SELECT 4")
        .await
        .expect("a new session works");
    newcomer
        .batch_execute("SELECT 5")
        .await
        .expect("a new session works");
    for session in [other_record.id, newcomer_record.id] {
        assert!(
            of_session(session)
                .iter()
                .any(|o| o.from_client && o.on_forwarding_thread),
            "session {session} is forwarded by the thread"
        );
    }
    assert_eq!(carried_now(&proxy).await, Some(2.0));
}
