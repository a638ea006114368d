//! Protocol 3.2 (PostgreSQL 18) through lockguard: the server's 32-byte cancel key reaches the
//! client and its 44-byte CancelRequest reaches the server; the admin console and the guard
//! know a 3.2 session's backend; the version and `_pq_.` option negotiation a client starts
//! (libpq "greases" with 3.9999) is the server's, answered through lockguard as directly.
//!
//! Each test starts its own PostgreSQL 18 or later; without one it is skipped with the reason
//! (and fails under `CI=true`, where `.ci/install-postgres` provides it).

use std::time::Duration;

use guard_core::Outcome;
use lockguard_config::{AdminRole, AdminUser, Config};
use lockguard_tests::cluster::{installed_major_at_least, TestCluster};
use lockguard_tests::guard_support::{self, backend_alive, wait_for, BlockedLogin};
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::raw::{self, Received, PROTOCOL_3_2};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

/// What libpq sends to check that servers and proxies negotiate instead of failing.
const PROTOCOL_3_9999: u32 = (3 << 16) | 9999;
const WAIT: Duration = Duration::from_secs(10);
const OPS: (&str, &str) = ("ops", "ops-secret");
const PROTECTED: &str = "app.user_sessions";

/// A private PostgreSQL 18+ cluster, or `None` (reason printed) when none is installed.
fn cluster_with_protocol_3_2() -> Option<TestCluster> {
    let major = installed_major_at_least(18, "protocol 3.2")?;
    let cluster = TestCluster::start_major(major, &[])?
        .unwrap_or_else(|e| panic!("starting PostgreSQL {major}: {e}"));
    Some(cluster)
}

/// lockguard in-process (with its admin console when the config has one).
async fn start(config: Config) -> TestProxy {
    TestProxy::start_with(config).await
}

/// What a session learned at login.
struct Login {
    messages: Vec<Received>,
    pid: i32,
    key: Vec<u8>,
}

/// Sends a StartupMessage of `version` with `params` (plus user and database) and reads up
/// to the first ReadyForQuery.
async fn login(
    stream: &mut TcpStream,
    version: u32,
    cluster: &TestCluster,
    database: &str,
    params: &[(&str, &str)],
) -> Login {
    // An ordinary role: the guard's role may not signal a superuser's backend.
    let mut all = vec![
        ("user", guard_support::app_role(cluster)),
        ("database", database),
    ];
    all.extend_from_slice(params);
    stream
        .write_all(&raw::startup_packet(version, &all))
        .await
        .expect("send the startup packet");
    let mut messages = Vec::new();
    loop {
        let m = raw::read_message(stream, WAIT)
            .await
            .unwrap_or_else(|| panic!("login ended early: {messages:?}"));
        assert_ne!(m.tag, b'E', "login failed: {:?}", m.error_fields());
        let done = m.tag == b'Z';
        messages.push(m);
        if done {
            break;
        }
    }
    let key_data = messages
        .iter()
        .find(|m| m.tag == b'K')
        .expect("BackendKeyData");
    let pid = i32::from_be_bytes([
        key_data.body[0],
        key_data.body[1],
        key_data.body[2],
        key_data.body[3],
    ]);
    Login {
        pid,
        key: key_data.body[4..].to_vec(),
        messages,
    }
}

/// The NegotiateProtocolVersion of a login, if the server sent one.
fn negotiation(login: &Login) -> Option<&Received> {
    login.messages.iter().find(|m| m.tag == b'v')
}

/// Runs `sql` and returns the messages up to ReadyForQuery.
async fn exec(stream: &mut TcpStream, sql: &str) -> Vec<Received> {
    stream.write_all(&raw::query(sql)).await.expect("send");
    let mut seen = Vec::new();
    while let Some(m) = raw::read_message(stream, WAIT).await {
        let done = m.tag == b'Z';
        seen.push(m);
        if done {
            return seen;
        }
    }
    panic!("no ReadyForQuery for {sql:?}: {seen:?}");
}

#[tokio::test]
async fn a_3_2_session_gets_the_servers_32_byte_key_and_its_44_byte_cancel_stops_the_query() {
    let Some(cluster) = cluster_with_protocol_3_2() else {
        return;
    };
    let proxy = start(config_for(&cluster)).await;
    let admin = cluster.connect_admin().await;

    let mut session = TcpStream::connect(proxy.addr).await.expect("connect");
    let login = login(&mut session, PROTOCOL_3_2, &cluster, "postgres", &[]).await;
    assert!(negotiation(&login).is_none(), "3.2 needs no negotiation");
    assert_eq!(login.key.len(), 32, "the server's 3.2 key, whole");

    session
        .write_all(&raw::query("SELECT pg_sleep(60)"))
        .await
        .expect("send the long query");
    let pid = login.pid;
    wait_for(WAIT, "pg_sleep to run", || {
        let admin = &admin;
        async move {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' \
                     AND query LIKE '%pg_sleep%'",
                    &[&pid],
                )
                .await
                .expect("pg_stat_activity")
                .is_some()
        }
    })
    .await;

    let packet = raw::cancel_request(pid, &login.key);
    assert_eq!(packet.len(), 44);
    let mut canceller = TcpStream::connect(proxy.addr).await.expect("connect");
    canceller.write_all(&packet).await.expect("cancel request");
    let answer = raw::read_until_close(&mut canceller, WAIT).await;
    assert!(answer.is_empty(), "a cancel gets no answer: {answer:?}");

    // The query ends with the server's "canceling statement due to user request", long before
    // its 60 s.
    let mut seen = Vec::new();
    loop {
        let m = raw::read_message(&mut session, WAIT)
            .await
            .unwrap_or_else(|| panic!("the query was not cancelled: {seen:?}"));
        let done = m.tag == b'Z';
        seen.push(m);
        if done {
            break;
        }
    }
    let error = seen
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no error: {seen:?}"));
    assert_eq!(
        error.error_fields().0,
        "57014",
        "{:?}",
        error.error_fields()
    );
    let after = exec(&mut session, "SELECT 1").await;
    assert!(after.iter().all(|m| m.tag != b'E'), "{after:?}");
}

#[tokio::test]
async fn show_clients_names_the_backend_of_a_3_2_session() {
    let Some(cluster) = cluster_with_protocol_3_2() else {
        return;
    };
    let mut config = config_for(&cluster);
    config.admin.users = vec![AdminUser {
        name: OPS.0.to_owned(),
        password: Some(OPS.1.to_owned()),
        password_env: None,
        role: AdminRole::Admin,
    }];
    let proxy = start(config).await;
    let mut session = TcpStream::connect(proxy.addr).await.expect("connect");
    let app = "protocol-3-2-client";
    let login = login(
        &mut session,
        PROTOCOL_3_2,
        &cluster,
        "postgres",
        &[("application_name", app)],
    )
    .await;
    assert_eq!(login.key.len(), 32);

    // The server's own view of that session's backend.
    let admin = cluster.connect_admin().await;
    let server_pid: i32 = admin
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .expect("the session in pg_stat_activity")
        .get(0);
    assert_eq!(login.pid, server_pid);

    let console = proxy.console.expect("console enabled");
    let (ops, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(console.port())
        .user(OPS.0)
        .password(OPS.1)
        .dbname("lockguard")
        .connect_timeout(WAIT)
        .connect(NoTls)
        .await
        .expect("admin console");
    tokio::spawn(connection);
    let rows = ops.query("SHOW CLIENTS", &[]).await.expect("SHOW CLIENTS");
    let pids: Vec<Option<i32>> = rows.iter().map(|row| row.get("backend_pid")).collect();
    assert_eq!(pids, vec![Some(server_pid)]);
}

#[tokio::test]
async fn a_3_2_session_idle_in_transaction_on_a_protected_table_is_terminated() {
    let Some(cluster) = cluster_with_protocol_3_2() else {
        return;
    };
    let db = guard_support::guard_test_database(&cluster, "proto32_guard").await;
    let observer = guard_support::connect(&cluster, &db).await;
    let mut config = config_for(&cluster);
    config.guard = guard_support::guard_config(&cluster, &[PROTECTED]);
    config.guard.idle_in_transaction_timeout = Duration::from_secs(1);
    let proxy = start(config).await;

    let mut app = TcpStream::connect(proxy.addr).await.expect("connect");
    let login = login(&mut app, PROTOCOL_3_2, &cluster, &db, &[]).await;
    assert_eq!(login.key.len(), 32);
    for sql in [
        "BEGIN",
        "SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE",
    ] {
        let reply = exec(&mut app, sql).await;
        assert!(reply.iter().all(|m| m.tag != b'E'), "{sql}: {reply:?}");
    }
    let waiter = BlockedLogin::start(&cluster, &db, &observer).await;

    let reply = raw::read_until_close(&mut app, WAIT).await;
    let last = reply.last().expect("a FATAL before the close");
    let (code, message) = last.error_fields();
    assert_eq!(code, "57P01", "{message}");
    assert!(message.contains("idle in transaction"), "{message}");
    waiter.proceeds(Duration::from_secs(5)).await;
    assert!(!backend_alive(&observer, login.pid).await);

    let guard = proxy.guard().expect("guard configured");
    let event_of_session = || {
        guard
            .audit()
            .recent()
            .into_iter()
            .find(|e| e.backend_pid == login.pid)
    };
    wait_for(WAIT, "the audit event of the 3.2 session", || async {
        event_of_session().is_some()
    })
    .await;
    let event = event_of_session().expect("the audit event");
    assert_eq!(event.trigger, "idle_in_transaction");
    assert_eq!(event.outcome, Outcome::Terminated);
}

/// Logs in with `version` and `params` directly and through lockguard; returns both logins.
async fn both_ways(
    cluster: &TestCluster,
    proxy: &TestProxy,
    version: u32,
    params: &[(&str, &str)],
) -> [(Login, TcpStream); 2] {
    let mut direct = TcpStream::connect((cluster.host(), cluster.port()))
        .await
        .expect("connect directly");
    let direct_login = login(&mut direct, version, cluster, "postgres", params).await;
    let mut proxied = TcpStream::connect(proxy.addr).await.expect("connect");
    let proxied_login = login(&mut proxied, version, cluster, "postgres", params).await;
    [(direct_login, direct), (proxied_login, proxied)]
}

/// NegotiateProtocolVersion's body: newest minor version the server supports, then the
/// options it did not recognise.
fn negotiated(m: &Received) -> (u32, Vec<String>) {
    let newest = u32::from_be_bytes([m.body[0], m.body[1], m.body[2], m.body[3]]);
    let names = m.body[8..]
        .split(|&b| b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect();
    (newest, names)
}

#[tokio::test]
async fn a_3_9999_startup_gets_the_servers_negotiation_through_lockguard_and_works() {
    let Some(cluster) = cluster_with_protocol_3_2() else {
        return;
    };
    let proxy = start(config_for(&cluster)).await;
    let [(direct, _), (proxied, mut session)] =
        both_ways(&cluster, &proxy, PROTOCOL_3_9999, &[]).await;
    let direct_v = negotiation(&direct).expect("the server negotiates 3.9999 down");
    let proxied_v = negotiation(&proxied).expect("NegotiateProtocolVersion through lockguard");
    assert_eq!(proxied_v.body, direct_v.body);
    assert_eq!(negotiated(proxied_v), (PROTOCOL_3_2, vec![]));
    assert_eq!(proxied.key.len(), 32, "the session runs 3.2");
    let reply = exec(&mut session, "SELECT 'after negotiation'").await;
    assert!(
        reply
            .iter()
            .any(|m| m.tag == b'D' && m.body.ends_with(b"after negotiation")),
        "{reply:?}"
    );
}

#[tokio::test]
async fn pq_protocol_options_reach_the_server_which_lists_the_unknown_ones() {
    let Some(cluster) = cluster_with_protocol_3_2() else {
        return;
    };
    let proxy = start(config_for(&cluster)).await;
    let options = [("_pq_.lockguard_test", "on"), ("_pq_.another", "1")];
    let [(direct, _), (proxied, mut session)] =
        both_ways(&cluster, &proxy, PROTOCOL_3_2, &options).await;
    let direct_v = negotiation(&direct).expect("the server lists unknown options");
    let proxied_v = negotiation(&proxied).expect("NegotiateProtocolVersion through lockguard");
    assert_eq!(proxied_v.body, direct_v.body);
    assert_eq!(
        negotiated(proxied_v),
        (
            PROTOCOL_3_2,
            vec!["_pq_.lockguard_test".to_owned(), "_pq_.another".to_owned()]
        )
    );
    let reply = exec(&mut session, "SELECT 1").await;
    assert!(reply.iter().all(|m| m.tag != b'E'), "{reply:?}");
}
