//! The registry knows which backend serves each client and in which transaction state it is,
//! and graceful shutdown behaves.

use std::time::Duration;

use guard_core::{Outcome, TxnState, UpstreamIdentity};
use lockguard_tests::cluster::{TestCluster, APPLICATION_NAME};
use lockguard_tests::guard_support::{self, app_role, BlockedLogin};
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::raw;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

/// Waits briefly for `record` to reach `want`; the client may see a reply before the proxy has
/// scanned the ReadyForQuery that ends it.
async fn settles_to(record: &guard_core::SessionRecord, want: TxnState) {
    let what = format!("the session to be {want}");
    guard_support::wait_for(Duration::from_secs(5), &what, || {
        let state = record.state();
        async move { state == want }
    })
    .await;
}

// Long because it walks one session through every state, each step where the last ended.
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

    // While a statement runs, the session is active: the statement waits on an advisory lock
    // (they are per database) held directly, and the state is read once PostgreSQL says the
    // backend waits on it.
    let admin = guard_support::connect(cluster, &db).await;
    admin
        .batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .expect("take the lock");
    let waiting = {
        let client = &client;
        async move {
            client
                .batch_execute("SELECT pg_advisory_lock(4242), pg_advisory_unlock(4242)")
                .await
        }
    };
    let observe = async {
        guard_support::wait_for(Duration::from_secs(10), "the statement to wait", || {
            let admin = &admin;
            async move {
                let waits = admin
                    .query_one(
                        "SELECT wait_event_type IS NOT DISTINCT FROM 'Lock' \
                         FROM pg_stat_activity WHERE pid = $1",
                        &[&pid],
                    )
                    .await
                    .expect("pg_stat_activity");
                waits.get::<_, bool>(0)
            }
        })
        .await;
        let seen = record.state();
        admin
            .batch_execute("SELECT pg_advisory_unlock(4242)")
            .await
            .expect("release the lock");
        seen
    };
    let (finished, seen) = tokio::join!(waiting, observe);
    finished.expect("the statement finished");
    assert_eq!(seen, TxnState::Active);
    settles_to(&record, TxnState::Idle).await;
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
    // New clients are no longer accepted: the listener closes once it has seen the shutdown
    // (a connection that races it may still be taken, so wait for the refusal itself)...
    guard_support::wait_for(
        Duration::from_secs(5),
        "the listener to close",
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;
    // ...and a login that PostgreSQL would accept is not served.
    if let Ok(mut late) = TcpStream::connect(addr).await {
        let startup = raw::startup_packet(
            raw::PROTOCOL_3_0,
            &[("user", cluster.superuser()), ("database", "postgres")],
        );
        let _ = late.write_all(&startup).await;
        let reply = raw::read_until_close(&mut late, Duration::from_secs(2)).await;
        assert!(
            reply.iter().all(|m| m.tag != b'Z'),
            "a client was served after shutdown began: {reply:?}"
        );
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

/// A proxy guarding `app.user_sessions` in a fresh guard test database, with a short in-flight
/// grace; plus a direct superuser connection to that database.
async fn guarded(prefix: &str) -> (TestProxy, String, tokio_postgres::Client) {
    let cluster = TestCluster::shared();
    let db = guard_support::guard_test_database(cluster, prefix).await;
    let admin = guard_support::connect(cluster, &db).await;
    let mut config = config_for(cluster);
    let role = guard_support::guard_config(cluster, &[]);
    config.guard.dsn = role.dsn;
    config.guard.password_env = role.password_env;
    config.guard.protected_tables = vec!["app.user_sessions".to_owned()];
    config.guard.inflight_grace = INFLIGHT_GRACE;
    config.guard.idle_in_transaction_timeout = Duration::ZERO;
    let proxy = TestProxy::start_with(config).await;
    (proxy, db, admin)
}

const INFLIGHT_GRACE: Duration = Duration::from_millis(500);

/// An autocommit statement that takes the protected row lock and then keeps running: an
/// UPDATE in a CTE, with the sleep in the outer query.
const LOCK_AND_SLEEP: &str = "WITH locked AS (UPDATE app.user_sessions SET token = 'busy' \
     WHERE id = 1 RETURNING id) SELECT pg_catalog.pg_sleep(30) FROM locked";

/// Waits until backend `pid` sleeps inside [`LOCK_AND_SLEEP`], so it holds its row: a waiter
/// started earlier could take the row first.
async fn wait_until_sleeping_on_the_row(admin: &tokio_postgres::Client, pid: i32) {
    guard_support::wait_for(
        Duration::from_secs(5),
        "the statement to hold its row and sleep",
        || async move {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_catalog.pg_stat_activity \
                     WHERE pid OPERATOR(pg_catalog.=) $1 AND wait_event OPERATOR(pg_catalog.=) 'PgSleep'",
                    &[&pid],
                )
                .await
                .expect("reading pg_stat_activity")
                .is_some()
        },
    )
    .await;
}

/// Parse, Bind, Execute and Sync of `sql` (unnamed statement and portal, no parameters).
fn extended_round(sql: &str) -> Vec<u8> {
    let mut round = raw::parse(sql, &[]);
    round.extend(raw::bind(&[], 0));
    round.extend(raw::execute());
    round.extend(raw::sync());
    round
}

/// A client runs [`LOCK_AND_SLEEP`] over the extended protocol, follows it with `stray`
/// (COPY-ending messages no COPY asked for, and Syncs), and vanishes. The server ignores a
/// CopyDone or CopyFail outside COPY IN, so the statement is still running: the waiter must be
/// freed by the guard's kill after the in-flight grace.
async fn stray_copy_end_keeps_the_statement_in_flight(prefix: &str, stray: &[Vec<u8>]) {
    let (proxy, db, admin) = guarded(prefix).await;
    let cluster = TestCluster::shared();
    let mut app = TcpStream::connect(proxy.addr).await.expect("connect");
    let login = raw::login(&mut app, app_role(cluster), &db).await;
    let pid = raw::backend_pid(&login);
    let record = proxy.session_of(pid).await;

    let mut bytes = extended_round(LOCK_AND_SLEEP);
    for m in stray {
        bytes.extend_from_slice(m);
    }
    let scanned = record.bytes_from_client() + bytes.len() as u64;
    app.write_all(&bytes).await.expect("send");
    // Until the proxy has scanned every byte sent, the state says nothing yet.
    guard_support::wait_for(
        Duration::from_secs(5),
        "the proxy to read the burst",
        || {
            let seen = record.bytes_from_client();
            async move { seen >= scanned }
        },
    )
    .await;
    assert_eq!(record.state(), TxnState::Active, "statement still running");
    wait_until_sleeping_on_the_row(&admin, pid).await;

    let waiter = BlockedLogin::start(cluster, &db, &admin).await;
    let dropped = std::time::Instant::now();
    drop(app);
    let proceeded = waiter
        .proceeds(INFLIGHT_GRACE + Duration::from_secs(1))
        .await;
    let released_after = proceeded - dropped;
    assert!(
        released_after >= INFLIGHT_GRACE - Duration::from_millis(50),
        "freed before the grace ended: {released_after:?}"
    );
    let guard = proxy.guard().expect("guard on");
    let event_for = || {
        guard
            .audit()
            .recent()
            .into_iter()
            .find(|e| e.backend_pid == pid)
    };
    // The waiter may go on the moment the backend dies, before the event is written.
    guard_support::wait_for(Duration::from_secs(2), "the kill's audit event", || {
        let found = event_for().is_some();
        async move { found }
    })
    .await;
    let event = event_for().expect("an audit event for the killed backend");
    assert_eq!(event.outcome, Outcome::Terminated, "{event:?}");
    assert_eq!(event.state, "active", "{event:?}");
}

#[tokio::test]
async fn a_stray_copy_fail_after_sync_does_not_end_a_running_statement() {
    let copy_fail = raw::message(raw::frontend::COPY_FAIL, b"stray\0");
    stray_copy_end_keeps_the_statement_in_flight("stray_copyfail", &[copy_fail]).await;
}

#[tokio::test]
async fn stray_syncs_and_copy_done_do_not_end_a_running_statement() {
    let sync = raw::sync();
    let copy_done = raw::message(raw::frontend::COPY_DONE, &[]);
    let copy_fail = raw::message(raw::frontend::COPY_FAIL, b"stray\0");
    stray_copy_end_keeps_the_statement_in_flight(
        "stray_copydone",
        &[sync.clone(), copy_done, sync, copy_fail],
    )
    .await;
}

/// Reads messages until one tagged `tag`; panics on EOF or after 10 s.
async fn read_until(stream: &mut TcpStream, tag: u8) -> Vec<raw::Received> {
    let mut seen = Vec::new();
    loop {
        let m = raw::read_message(stream, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("no {:?} message; got {seen:?}", char::from(tag)));
        let done = m.tag == tag;
        seen.push(m);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn copy_in_ended_every_way_leaves_the_session_idle() {
    let cluster = TestCluster::shared();
    let db = cluster.create_database("copy_ends").await;
    let proxy = TestProxy::start(cluster).await;
    let mut app = TcpStream::connect(proxy.addr).await.expect("connect");
    let login = raw::login(&mut app, app_role(cluster), &db).await;
    let pid = raw::backend_pid(&login);
    let record = proxy.session_of(pid).await;
    // Created directly: an ordinary role may not create tables in `public` (PostgreSQL 15+).
    let owner = guard_support::connect(cluster, &db).await;
    let grant = format!(
        "CREATE TABLE t (v int); GRANT INSERT, SELECT ON t TO \"{}\"",
        app_role(cluster)
    );
    owner.batch_execute(&grant).await.expect("create t");

    let copy = "COPY t FROM STDIN";
    let data = raw::message(raw::frontend::COPY_DATA, b"1\n");
    let copy_done = raw::message(raw::frontend::COPY_DONE, &[]);
    let copy_fail = raw::message(raw::frontend::COPY_FAIL, b"changed my mind\0");
    let sync = raw::sync();
    // (how the COPY starts, what the client sends once the server is in COPY IN)
    let cases: [(Vec<u8>, Vec<Vec<u8>>); 4] = [
        // Extended protocol as libpq runs it: the Sync after Execute is ignored during COPY IN.
        (
            extended_round(copy),
            vec![data.clone(), copy_done.clone(), sync.clone()],
        ),
        (
            extended_round(copy),
            vec![data.clone(), copy_fail.clone(), sync.clone()],
        ),
        // Simple Query: the copy's end brings ReadyForQuery; a Sync sent meanwhile is ignored.
        (
            raw::query(copy),
            vec![sync.clone(), data.clone(), copy_done],
        ),
        (raw::query(copy), vec![data, copy_fail]),
    ];
    for (start, rest) in cases {
        app.write_all(&start).await.expect("start the COPY");
        read_until(&mut app, b'G').await;
        app.write_all(&rest.concat()).await.expect("end the COPY");
        read_until(&mut app, b'Z').await;
        settles_to(&record, TxnState::Idle).await;
    }
    app.write_all(&raw::query("SELECT count(*) FROM t"))
        .await
        .expect("send");
    let rows = read_until(&mut app, b'Z').await;
    let row = rows.iter().find(|m| m.tag == b'D').expect("a row");
    assert!(row.body.ends_with(b"2"), "two COPYs succeeded: {row:?}");
    assert_eq!(record.state(), TxnState::Idle);
}

/// A raw session through `proxy` logged in to `db`, with its backend pid.
async fn raw_session(proxy: &TestProxy, db: &str) -> (TcpStream, i32) {
    let mut app = TcpStream::connect(proxy.addr).await.expect("connect");
    let login = raw::login(&mut app, app_role(TestCluster::shared()), db).await;
    let pid = raw::backend_pid(&login);
    (app, pid)
}

#[tokio::test]
async fn terminate_with_a_statement_in_flight_is_a_lost_client() {
    let (proxy, db, admin) = guarded("terminate_busy").await;
    let (mut app, pid) = raw_session(&proxy, &db).await;
    app.write_all(&raw::query(LOCK_AND_SLEEP))
        .await
        .expect("send");
    wait_until_sleeping_on_the_row(&admin, pid).await;
    let waiter = BlockedLogin::start(TestCluster::shared(), &db, &admin).await;

    // What PgBouncer does when its own client vanished mid-statement: Terminate, then close.
    app.write_all(&raw::terminate())
        .await
        .expect("send Terminate");
    let said_goodbye = std::time::Instant::now();
    drop(app);
    let proceeded = waiter
        .proceeds(INFLIGHT_GRACE + Duration::from_secs(1))
        .await;
    assert!(proceeded - said_goodbye >= INFLIGHT_GRACE - Duration::from_millis(50));
    let guard = proxy.guard().expect("guard on");
    guard_support::wait_for(Duration::from_secs(2), "the kill's audit event", || {
        let found = guard.audit().recent().iter().any(|e| e.backend_pid == pid);
        async move { found }
    })
    .await;
    let event = guard
        .audit()
        .recent()
        .into_iter()
        .find(|e| e.backend_pid == pid)
        .expect("the event just seen");
    assert_eq!(event.outcome, Outcome::Terminated, "{event:?}");
    assert_eq!(
        event.cause.as_deref(),
        Some("Terminate while busy: the client said goodbye with a statement in flight")
    );
}

#[tokio::test]
async fn terminate_while_idle_in_a_transaction_is_a_clean_goodbye() {
    let (proxy, db, admin) = guarded("terminate_idle").await;
    let (mut app, pid) = raw_session(&proxy, &db).await;
    app.write_all(&raw::query(
        "BEGIN; UPDATE app.user_sessions SET token = 'rolled back' WHERE id = 1",
    ))
    .await
    .expect("send");
    let reply = read_until(&mut app, b'Z').await;
    assert_eq!(reply.last().map(|m| m.body.clone()), Some(b"T".to_vec()));
    app.write_all(&raw::terminate())
        .await
        .expect("send Terminate");
    drop(app);

    // The backend reads the Terminate at once, rolls back and exits by itself; the session
    // ends without asking the guard.
    proxy.wait_for_sessions(0, Duration::from_secs(5)).await;
    guard_support::wait_for(Duration::from_secs(5), "the backend to exit", || {
        let admin = &admin;
        async move { !guard_support::backend_alive(admin, pid).await }
    })
    .await;
    let token: String = admin
        .query_one("SELECT token FROM app.user_sessions WHERE id = 1", &[])
        .await
        .expect("read the row")
        .get(0);
    assert_eq!(token, "token-1");
    assert!(proxy
        .guard()
        .expect("guard on")
        .audit()
        .recent()
        .iter()
        .all(|e| e.backend_pid != pid));
}
