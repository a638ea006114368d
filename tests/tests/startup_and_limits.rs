//! Startup, authentication, limits and hostile input (issue 2, acceptance 5, 7 and 8).

use std::net::TcpListener as StdListener;
use std::time::{Duration, Instant};

use lockguard_config::Upstream;
use lockguard_tests::cluster::{TestCluster, MD5_PASSWORD, MD5_USER, SCRAM_PASSWORD, SCRAM_USER};
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::raw;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

const PROTOCOL_3_0: u32 = 196_608;

async fn ask(client: &Client, sql: &str) -> String {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

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

#[tokio::test]
async fn upstream_down_gives_connection_failure() {
    let cluster = TestCluster::shared();
    let mut config = config_for(cluster);
    config.proxy.upstream = Upstream::Tcp {
        host: "127.0.0.1".into(),
        port: dead_port(),
    };
    let proxy = TestProxy::start_with(config).await;
    let err = proxy
        .connect(cluster.superuser(), None, "postgres")
        .await
        .expect_err("connecting to a dead upstream fails");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err:?}"));
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE);
    assert!(
        db.message()
            .starts_with("lockguard: could not connect to upstream"),
        "{}",
        db.message()
    );
    assert!(proxy.registry().is_empty());
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

#[tokio::test]
async fn hostile_input_is_refused_while_a_normal_client_keeps_working() {
    let cluster = TestCluster::shared();
    let mut config = config_for(cluster);
    config.proxy.startup_timeout = Duration::from_secs(1);
    let proxy = TestProxy::start_with(config).await;
    let normal = proxy
        .connect(cluster.superuser(), None, "postgres")
        .await
        .expect("normal client");
    let normal_keeps_working = async {
        for i in 0..40i32 {
            let v: i32 = normal
                .query_one("SELECT $1::int4", &[&i])
                .await
                .expect("normal query")
                .get(0);
            assert_eq!(v, i);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    let hostile = async {
        let connect = || TcpStream::connect(proxy.addr);

        // Random garbage (an HTTP request): its first bytes read as an absurd length.
        let mut s = connect().await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: lockguard\r\n\r\n")
            .await
            .expect("write");
        let reply = raw::read_until_close(&mut s, Duration::from_secs(3)).await;
        assert_eq!(reply.len(), 1, "garbage: {reply:?}");
        assert_eq!(reply[0].tag, b'E');
        assert_eq!(reply[0].error_fields().0, "08P01");

        // Truly random bytes: an error or a close at the startup deadline, never a hang.
        let mut s = connect().await.expect("connect");
        let noise: Vec<u8> = (0..512).map(|_| rand::random::<u8>()).collect();
        let _ = s.write_all(&noise).await;
        assert!(
            raw::closed_within(&mut s, Duration::from_secs(3)).await,
            "random bytes: still open"
        );

        // A length field of 0xFFFFFFFF.
        let mut s = connect().await.expect("connect");
        s.write_all(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 3, 0, 0])
            .await
            .expect("write");
        let reply = raw::read_until_close(&mut s, Duration::from_secs(3)).await;
        assert_eq!(
            reply.first().map(|m| m.error_fields().0),
            Some("08P01".to_owned())
        );
        assert!(reply[0]
            .error_fields()
            .1
            .contains("invalid startup packet length"));

        // A 1 MB startup packet: refused from its length, before the body is read.
        let mut s = connect().await.expect("connect");
        let mut big = raw::startup_packet(
            PROTOCOL_3_0,
            &[("user", "x"), ("options", &"y".repeat(1 << 20))],
        );
        big.truncate(1 << 20);
        let (mut reader, mut writer) = s.split();
        let send = async {
            let _ = writer.write_all(&big).await;
        };
        let read = raw::read_message(&mut reader, Duration::from_secs(3));
        let (_, reply) = tokio::join!(send, read);
        let reply = reply.expect("an ErrorResponse for the 1 MB packet");
        assert_eq!(reply.error_fields().0, "08P01");

        // A client that connects and says nothing: closed at the startup deadline.
        let mut s = connect().await.expect("connect");
        let t = Instant::now();
        assert!(
            raw::closed_within(&mut s, Duration::from_secs(3)).await,
            "silent client: still open"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "closed too early: {:?}",
            t.elapsed()
        );

        // A logged-in client that sends a message with an impossible length.
        let mut s = connect().await.expect("connect");
        raw::login(&mut s, cluster.superuser(), "postgres").await;
        s.write_all(&[b'Q', 0xFF, 0xFF, 0xFF, 0xFF])
            .await
            .expect("write");
        let reply = raw::read_until_close(&mut s, Duration::from_secs(3)).await;
        let last = reply.last().expect("an error before the close");
        assert_eq!(last.error_fields().0, "08P01", "{reply:?}");
    };
    tokio::join!(normal_keeps_working, hostile);
    assert_eq!(ask(&normal, "SELECT 'survived'::text").await, "survived");
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

#[tokio::test]
async fn ssl_request_is_declined_and_protocol_3_2_is_passed_through() {
    let cluster = TestCluster::shared();
    let proxy = TestProxy::start(cluster).await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    // SSLRequest, answered 'N'; then a 3.2 startup, which PostgreSQL 15 negotiates down itself.
    s.write_all(&[0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F])
        .await
        .expect("ssl request");
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut answer)
        .await
        .expect("answer");
    assert_eq!(&answer, b"N");
    s.write_all(&raw::startup_packet(
        196_610,
        &[("user", cluster.superuser()), ("database", "postgres")],
    ))
    .await
    .expect("startup 3.2");
    let mut seen = Vec::new();
    while let Some(m) = raw::read_message(&mut s, Duration::from_secs(5)).await {
        let tag = m.tag;
        seen.push(tag);
        if tag == b'Z' || tag == b'E' {
            break;
        }
    }
    assert_eq!(
        seen.last(),
        Some(&b'Z'),
        "login with 3.2 failed: {:?}",
        String::from_utf8_lossy(&seen)
    );
    assert!(seen.contains(&b'K'));
}
