//! The registry knows which backend serves each client and in which transaction state it is
//! (issue 2, acceptance 6), and graceful shutdown behaves.

use std::time::Duration;

use guard_core::{TxnState, UpstreamIdentity};
use lockguard_tests::cluster::{TestCluster, APPLICATION_NAME};
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::raw;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

/// Waits briefly for `record` to reach `want`; the client may see a reply before the proxy has
/// scanned the ReadyForQuery that ends it.
async fn settles_to(record: &guard_core::SessionRecord, want: TxnState) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while record.state() != want && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(record.state(), want);
}

#[tokio::test]
async fn registry_tracks_pid_identity_and_transaction_state() {
    let cluster = TestCluster::shared();
    let db = cluster.create_database("state").await;
    let proxy = TestProxy::start(cluster).await;
    let client = proxy
        .connect(cluster.superuser(), None, &db)
        .await
        .expect("connect");
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let record = proxy.session_of(pid).await;
    assert_eq!(record.backend_pid(), Some(pid));
    assert_eq!(record.client.user, cluster.superuser());
    assert_eq!(record.client.database, db);
    assert_eq!(record.client.application_name, APPLICATION_NAME);
    assert!(record.backend_key().is_some_and(|k| !k.secret.is_empty()));

    // The proxy's local port of the upstream socket is what PostgreSQL sees as client_port:
    // the guard's identity check depends on it.
    let admin = cluster.connect_admin().await;
    let port: i32 = admin
        .query_one(
            "SELECT client_port FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .expect("client_port")
        .get(0);
    match record.upstream {
        UpstreamIdentity::Tcp(local) => assert_eq!(i32::from(local.port()), port),
        other => panic!("expected a TCP upstream, got {other:?}"),
    }

    assert_eq!(record.state(), TxnState::Idle);
    assert_eq!(record.xact_age(), None);
    client.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(record.state(), TxnState::IdleInTransaction);
    assert!(record.xact_age().is_some());
    client
        .batch_execute("SELECT 1/0")
        .await
        .expect_err("division by zero");
    // tokio-postgres returns at the ErrorResponse; the ReadyForQuery behind it may still be in
    // flight through the proxy.
    settles_to(&record, TxnState::IdleInFailedTransaction).await;
    assert_eq!(record.last_statement(), "SELECT 1/0");
    client.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(record.state(), TxnState::Idle);
    assert_eq!(record.xact_age(), None);

    // Extended protocol: a statement is recorded from Parse; the state follows Sync.
    client.batch_execute("BEGIN").await.expect("begin");
    let _ = client
        .query("SELECT $1::text", &[&"extended"])
        .await
        .expect("query");
    settles_to(&record, TxnState::IdleInTransaction).await;
    assert_eq!(record.last_statement(), "SELECT $1::text");
    client.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(record.state(), TxnState::Idle);

    // While a statement runs, the session is active.
    let sleeper = {
        let client = &client;
        async move { client.batch_execute("SELECT pg_sleep(0.5)").await }
    };
    let observe = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        record.state()
    };
    let (slept, seen) = tokio::join!(sleeper, observe);
    slept.expect("sleep");
    assert_eq!(seen, TxnState::Active);
    assert_eq!(record.state(), TxnState::Idle);
    assert!(record.bytes_from_client() > 0 && record.bytes_from_server() > 0);

    drop(client);
    proxy.wait_for_sessions(0, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn graceful_shutdown_closes_idle_sessions_and_waits_for_busy_ones() {
    let cluster = TestCluster::shared();
    let mut config = config_for(cluster);
    config.proxy.shutdown_timeout = Duration::from_secs(3);
    let proxy = TestProxy::start_with(config).await;
    let addr = proxy.addr;

    // An idle session, and one inside a transaction.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    raw::login(&mut idle, cluster.superuser(), "postgres").await;
    let busy = proxy
        .connect(cluster.superuser(), None, "postgres")
        .await
        .expect("connect");
    busy.batch_execute("BEGIN").await.expect("begin");

    let stopping = tokio::spawn(proxy.shutdown());
    // The idle session is told and closed at once.
    let reply = raw::read_until_close(&mut idle, Duration::from_secs(2)).await;
    let (code, message) = reply.last().expect("a goodbye").error_fields();
    assert_eq!(code, "57P01");
    assert!(message.starts_with("lockguard:"), "{message}");
    // New clients are no longer accepted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = TcpStream::connect(addr).await;
    if let Ok(mut s) = refused {
        let _ = s
            .write_all(&raw::startup_packet(196_608, &[("user", "x")]))
            .await;
        assert!(raw::closed_within(&mut s, Duration::from_secs(2)).await);
    }
    // The busy session may finish its transaction; once idle it is closed too.
    busy.batch_execute("SELECT 1; COMMIT")
        .await
        .expect("finish the transaction");
    let after = busy
        .batch_execute("SELECT 1")
        .await
        .expect_err("closed after its transaction");
    assert!(
        after.is_closed() || after.code() == Some(&SqlState::ADMIN_SHUTDOWN),
        "{after:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("proxy stopped in time")
        .expect("join")
        .expect("run returned Ok");
}

#[tokio::test]
async fn shutdown_timeout_closes_sessions_that_stay_in_a_transaction() {
    let cluster = TestCluster::shared();
    let mut config = config_for(cluster);
    config.proxy.shutdown_timeout = Duration::from_secs(1);
    let proxy = TestProxy::start_with(config).await;
    let mut stuck = TcpStream::connect(proxy.addr).await.expect("connect");
    raw::login(&mut stuck, cluster.superuser(), "postgres").await;
    stuck.write_all(&raw::query("BEGIN")).await.expect("begin");
    while let Some(m) = raw::read_message(&mut stuck, Duration::from_secs(5)).await {
        if m.tag == b'Z' {
            assert_eq!(m.body, b"T");
            break;
        }
    }
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(proxy.shutdown());
    let reply = raw::read_until_close(&mut stuck, Duration::from_secs(4)).await;
    let (code, _) = reply.last().expect("messages").error_fields();
    assert_eq!(code, "57P01", "{reply:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    tokio::time::timeout(Duration::from_secs(3), stopping)
        .await
        .expect("stopped")
        .expect("join")
        .expect("ok");
}
