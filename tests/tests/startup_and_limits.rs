//! Startup, authentication and limits: passwords and upstream failures reach the client as
//! PostgreSQL words them, `max_clients` and `max_startup_clients` refuse at once, and a stuck
//! login meets its deadline. What the first packet may be (and hostile ones) is in
//! `startup_packets.rs`.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::{Duration, Instant};

use lockguard_config::Upstream;
use lockguard_tests::cluster::{TestCluster, MD5_PASSWORD, MD5_USER, SCRAM_PASSWORD, SCRAM_USER};
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::query::ask;
use lockguard_tests::raw::{self, PROTOCOL_3_0};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_postgres::error::{DbError, Severity, SqlState};
use tokio_postgres::{Client, NoTls};

#[tokio::test]
async fn md5_and_scram_users_log_in_and_wrong_passwords_get_postgres_error() {
    let cluster = TestCluster::shared();
    if !cluster.is_owned() {
        eprintln!("skipped: the password roles exist only on an owned cluster");
        return;
    }
    let db = cluster.create_database("auth").await;
    let proxy = TestProxy::start(cluster).await;
    for (user, password) in [(MD5_USER, MD5_PASSWORD), (SCRAM_USER, SCRAM_PASSWORD)] {
        let client = proxy
            .connect(user, Some(password), &db)
            .await
            .unwrap_or_else(|e| panic!("{user} through the proxy: {e:?}"));
        assert_eq!(ask(&client, "SELECT current_user::text").await, user);

        let direct = cluster
            .pg_config(user, Some("wrong"), &db)
            .connect(NoTls)
            .await
            .err()
            .expect("direct login with a wrong password fails");
        let proxied = proxy
            .connect(user, Some("wrong"), &db)
            .await
            .expect_err("proxied login with a wrong password fails");
        let (d, p) = (
            direct.as_db_error().expect("server error"),
            proxied.as_db_error().expect("server error"),
        );
        assert_eq!(p.code(), &SqlState::INVALID_PASSWORD, "{user}: {proxied:?}");
        assert_eq!((p.code(), p.message()), (d.code(), d.message()));
    }
    proxy.wait_for_sessions(0, Duration::from_secs(5)).await;
}

/// A closed local port: bind, note the port, close.
fn dead_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Logs in through `proxy` (whose upstream cannot be reached) and checks the answer is a FATAL
/// 08006 ErrorResponse saying lockguard could not reach the upstream; returns it.
async fn expect_upstream_failure(proxy: &TestProxy, user: &str) -> DbError {
    let err = proxy
        .connect(user, None, "postgres")
        .await
        .expect_err("connecting to an unreachable upstream fails");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err:?}"))
        .clone();
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE);
    // 'S' (localised) and 'V' (never localised) both say FATAL: the session cannot go on.
    assert_eq!(db.severity(), "FATAL");
    assert_eq!(db.parsed_severity(), Some(Severity::Fatal));
    assert!(
        db.message()
            .starts_with("lockguard: could not connect to upstream"),
        "{}",
        db.message()
    );
    assert!(proxy.registry().is_empty());
    db
}

#[tokio::test]
async fn upstream_down_gives_connection_failure() {
    let cluster = TestCluster::shared();
    let mut config = config_for(cluster);
    config.proxy.upstream = Upstream::Tcp {
        host: "127.0.0.1".into(),
        port: dead_port(),
    };
    let proxy = TestProxy::start_with(config).await;
    let db = expect_upstream_failure(&proxy, cluster.superuser()).await;
    assert!(
        db.message().to_lowercase().contains("refused"),
        "the reason is missing: {}",
        db.message()
    );
}

/// A listener on 127.0.0.1 whose accept queue is full, so the kernel drops further SYNs and
/// a connect to it never completes; `None` if the queue could not be seen to fill. The
/// returned connections keep the queue full.
async fn listener_that_never_completes_a_connect(
) -> Option<(TcpListener, Vec<TcpStream>, SocketAddr)> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).ok()?;
    let addr = socket.local_addr().ok()?;
    // Backlog 0: Linux queues one connection, then drops SYNs until it is accepted.
    let listener = socket.listen(0).ok()?;
    let mut queued = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => queued.push(stream),
            Ok(Err(_)) => return None,
            Err(_) => return Some((listener, queued, addr)),
        }
    }
    None
}

#[tokio::test]
async fn upstream_that_never_answers_the_connect_gives_a_timeout_failure() {
    let Some((_listener, _queued, addr)) = listener_that_never_completes_a_connect().await else {
        eprintln!("skipped: this kernel completes connects beyond a full accept queue");
        return;
    };
    let cluster = TestCluster::shared();
    let mut config = config_for(cluster);
    config.proxy.upstream = Upstream::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    config.proxy.connect_timeout = Duration::from_secs(1);
    let proxy = TestProxy::start_with(config).await;
    let db = expect_upstream_failure(&proxy, cluster.superuser()).await;
    assert!(
        db.message().contains("timed out"),
        "the reason is missing: {}",
        db.message()
    );
}

#[tokio::test]
async fn unix_socket_upstream_works() {
    let cluster = TestCluster::shared();
    let Some(dir) = cluster.socket_dir() else {
        eprintln!("skipped: external server without a known socket directory");
        return;
    };
    let mut config = config_for(cluster);
    config.proxy.upstream = Upstream::Unix {
        dir: dir.to_owned(),
        port: cluster.port(),
    };
    let proxy = TestProxy::start_with(config).await;
    let client = proxy
        .connect(cluster.superuser(), None, "postgres")
        .await
        .expect("connect via a unix-socket upstream");
    assert_eq!(ask(&client, "SELECT 'over unix'::text").await, "over unix");
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        proxy.session_of(pid).await.upstream,
        guard_core::UpstreamIdentity::Unix
    );
}

#[tokio::test]
async fn max_clients_refuses_with_53300_and_frees_slots() {
    let cluster = TestCluster::shared();
    let mut config = config_for(cluster);
    config.proxy.max_clients = 2;
    let proxy = TestProxy::start_with(config).await;
    let su = cluster.superuser();
    let first = proxy
        .connect(su, None, "postgres")
        .await
        .expect("first client");
    let second = proxy
        .connect(su, None, "postgres")
        .await
        .expect("second client");
    let err = proxy
        .connect(su, None, "postgres")
        .await
        .expect_err("third client is refused");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    assert_eq!(
        ask(&second, "SELECT 'still fine'::text").await,
        "still fine"
    );
    drop(first);
    proxy.wait_for_sessions(1, Duration::from_secs(5)).await;
    // The slot is released once the session task ends.
    let mut third = None;
    for _ in 0..50 {
        if let Ok(c) = proxy.connect(su, None, "postgres").await {
            third = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let third = third.expect("a slot frees up when a client leaves");
    assert_eq!(ask(&third, "SELECT 'third'::text").await, "third");
}

/// Opens `n` connections to `addr` that never send a byte.
async fn silent_sockets(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(
            TcpStream::connect(addr)
                .await
                .expect("connect a silent socket"),
        );
    }
    sockets
}

/// Connects as the superuser, retrying while the proxy refuses with 53300 (a slot is freed
/// when the proxy notices a closed connection), up to `WAIT_FOR_SLOT`.
async fn connect_once_a_slot_frees(proxy: &TestProxy) -> Client {
    const WAIT_FOR_SLOT: Duration = Duration::from_secs(10);
    let deadline = Instant::now() + WAIT_FOR_SLOT;
    loop {
        match proxy
            .connect(TestCluster::shared().superuser(), None, "postgres")
            .await
        {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no slot freed within {WAIT_FOR_SLOT:?}: {e:?}"),
        }
    }
}

/// Connections that never finish startup count against their own cap, not `max_clients`:
/// more silent sockets than `max_clients` leave every client slot to authenticated
/// clients, and `max_clients` still bounds those.
#[tokio::test]
async fn silent_sockets_cannot_take_the_slots_of_authenticated_clients() {
    let cluster = TestCluster::shared();
    let su = cluster.superuser();
    let mut config = config_for(cluster);
    config.proxy.max_clients = 3;
    let proxy = TestProxy::start_with(config).await;
    let first = proxy
        .connect(su, None, "postgres")
        .await
        .expect("first client");
    // Accepted in order: all of them before the clients below.
    let _silent = silent_sockets(proxy.addr, 5).await;
    let second = proxy
        .connect(su, None, "postgres")
        .await
        .expect("an authenticated client gets in beside five silent sockets");
    let third = proxy
        .connect(su, None, "postgres")
        .await
        .expect("third client");
    let err = proxy
        .connect(su, None, "postgres")
        .await
        .expect_err("a fourth authenticated client is over max_clients");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    let message = err.as_db_error().map(|db| db.message()).unwrap_or_default();
    assert!(message.contains("max_clients = 3"), "{err:?}");
    for client in [&first, &second, &third] {
        assert_eq!(ask(client, "SELECT 'working'::text").await, "working");
    }
}

/// With `max_startup_clients` connections in startup, the next is told at once (53300,
/// naming the setting) without being asked for a startup packet; sessions past startup
/// carry on, and once a startup slot frees an authenticated client gets in.
#[tokio::test]
async fn connections_over_max_startup_clients_are_refused_at_once() {
    const STARTUPS: usize = 3;
    let cluster = TestCluster::shared();
    let mut config = config_for(cluster);
    config.proxy.max_startup_clients = STARTUPS;
    // Long enough that a refusal "at once" cannot be the startup deadline.
    config.proxy.startup_timeout = Duration::from_secs(30);
    let proxy = TestProxy::start_with(config).await;
    let connected = proxy
        .connect(cluster.superuser(), None, "postgres")
        .await
        .expect("a session before the silent sockets");
    let mut silent = silent_sockets(proxy.addr, STARTUPS).await;

    let mut over = TcpStream::connect(proxy.addr).await.expect("connect");
    let t = Instant::now();
    let reply = raw::read_until_close(&mut over, Duration::from_secs(5)).await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let (code, message) = reply.first().expect("an ErrorResponse").error_fields();
    assert_eq!(reply[0].tag, b'E', "{reply:?}");
    assert_eq!(code, "53300", "{message}");
    assert!(
        message.contains(&format!("max_startup_clients = {STARTUPS}")),
        "{message}"
    );

    assert_eq!(
        ask(&connected, "SELECT 'still here'::text").await,
        "still here"
    );
    let err = proxy
        .connect(cluster.superuser(), None, "postgres")
        .await
        .expect_err("no startup slot is free");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");

    drop(silent.pop());
    let newcomer = connect_once_a_slot_frees(&proxy).await;
    assert_eq!(ask(&newcomer, "SELECT 'in'::text").await, "in");
    // Past its startup the newcomer no longer holds a startup slot: one is free again.
    let another = connect_once_a_slot_frees(&proxy).await;
    assert_eq!(ask(&another, "SELECT 'in too'::text").await, "in too");
}

/// A client checked against `max_clients` before it connected upstream, whose slot went to
/// another client while it typed its password, is told so right after its startup (FATAL
/// 53300) and closed; the other client carries on.
#[tokio::test]
async fn a_client_whose_slot_went_while_it_authenticated_is_refused_after_startup() {
    let cluster = TestCluster::shared();
    if !cluster.is_owned() {
        eprintln!("skipped: needs the md5 role of an owned cluster");
        return;
    }
    let mut config = config_for(cluster);
    config.proxy.max_clients = 1;
    let proxy = TestProxy::start_with(config).await;
    let mut slow = TcpStream::connect(proxy.addr).await.expect("connect");
    slow.write_all(&raw::startup_packet(
        PROTOCOL_3_0,
        &[("user", MD5_USER), ("database", "postgres")],
    ))
    .await
    .expect("startup");
    let request = raw::read_message(&mut slow, Duration::from_secs(10))
        .await
        .expect("a password request");
    assert_eq!(request.tag, b'R');
    assert_eq!(
        request.body[..4],
        raw::backend::auth_request::MD5_PASSWORD.to_be_bytes(),
        "AuthenticationMD5Password"
    );
    let salt = &request.body[4..8];

    let fast = proxy
        .connect(cluster.superuser(), None, "postgres")
        .await
        .expect("the fast client takes the only slot");
    let answer = lockguard::admin::auth::md5_response(MD5_USER, MD5_PASSWORD, salt);
    let password = raw::encode(|b| raw::frontend::password_message(answer.as_bytes(), b));
    slow.write_all(&password).await.expect("password");
    let reply = raw::read_until_close(&mut slow, Duration::from_secs(10)).await;
    let tags: Vec<u8> = reply.iter().map(|m| m.tag).collect();
    assert!(tags.contains(&b'Z'), "authenticated: {reply:?}");
    let last = reply.last().expect("messages");
    assert_eq!(last.tag, b'E', "{reply:?}");
    let (code, message) = last.error_fields();
    assert_eq!(code, "53300", "{message}");
    assert!(message.contains("max_clients = 1"), "{message}");
    assert_eq!(ask(&fast, "SELECT 'kept'::text").await, "kept");
    proxy.wait_for_sessions(1, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_client_stuck_in_authentication_is_closed_at_the_deadline() {
    let cluster = TestCluster::shared();
    if !cluster.is_owned() {
        eprintln!("skipped: needs the md5 role of an owned cluster");
        return;
    }
    let mut config = config_for(cluster);
    config.proxy.startup_timeout = Duration::from_secs(1);
    let proxy = TestProxy::start_with(config).await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&raw::startup_packet(
        PROTOCOL_3_0,
        &[("user", MD5_USER), ("database", "postgres")],
    ))
    .await
    .expect("startup");
    // The server asks for a password; the client never answers.
    let t = Instant::now();
    let reply = raw::read_until_close(&mut s, Duration::from_secs(5)).await;
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "not closed at the deadline"
    );
    assert_eq!(reply.first().map(|m| m.tag), Some(b'R'), "{reply:?}");
    assert_eq!(
        reply.last().map(|m| m.error_fields().0),
        Some("08P01".to_owned())
    );
    proxy.wait_for_sessions(0, Duration::from_secs(5)).await;
}
