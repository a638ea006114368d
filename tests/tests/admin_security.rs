//! The admin ports under attack: DNS rebinding against the token-less HTTP API, empty
//! secrets, secrets echoed by configuration errors, and the console over TLS.

use std::net::SocketAddr;
use std::path::Path;

use lockguard::Proxy;
use lockguard_config::{AdminRole, AdminUser, Config};
use lockguard_tests::admin::{console_at, user, OPS, WAIT};
use lockguard_tests::certs::{CertFiles, TestCa};
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::http::Request;
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::{psql, raw, tls};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};
use tokio_postgres_rustls::MakeRustlsConnect;

// ---- setting up -------------------------------------------------------------------------

fn ops_user() -> AdminUser {
    user(OPS.0, OPS.1, AdminRole::Admin)
}

/// A config file for the test cluster: admin on free ports with the `ops` user, plus `extra`.
fn config_text(extra: &str) -> String {
    let cluster = TestCluster::shared();
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{host}:{port}\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n{extra}\n\
         [[admin.users]]\nname = \"{}\"\npassword = \"{}\"\nrole = \"admin\"\n",
        OPS.0,
        OPS.1,
        host = cluster.host(),
        port = cluster.port(),
    )
}

/// The text rows of a simple query, as `key` → `value` pairs of its first two columns
/// (empty where a row has fewer).
async fn pairs(client: &Client, sql: &str) -> Vec<(String, String)> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => {
                let cell = |i| row.try_get(i).ok().flatten().unwrap_or_default().to_owned();
                Some((cell(0), cell(1)))
            }
            _ => None,
        })
        .collect()
}

/// The error of a simple query that must fail.
async fn query_error(client: &Client, sql: &str) -> tokio_postgres::Error {
    client
        .simple_query(sql)
        .await
        .expect_err(&format!("{sql} must fail"))
}

fn code_of(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.as_db_error().map(|db| db.code())
}

fn message_of(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|db| db.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// One HTTP/1.1 request with exactly the Host header given: (status, body).
async fn http_with_host(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    token: Option<&str>,
) -> (u16, String) {
    let response = Request::new(method, path)
        .host(host)
        .token(token)
        .send(addr)
        .await;
    (response.status, response.body)
}

// ---- DNS rebinding ------------------------------------------------------------------------

/// A page served from attacker.example, its name re-pointed at the endpoint, sends
/// `Host: attacker.example`: without a token every route that shows data or acts answers
/// 421 and nothing of the sessions; addressed by IP or as localhost it is served.
#[tokio::test]
async fn without_a_token_the_http_api_answers_only_requests_addressed_to_an_ip_or_localhost() {
    const STATEMENT: &str = "SELECT 'rebinding-canary'::text";
    let cluster = TestCluster::shared();
    let config = config_for(cluster);
    assert!(config.admin.api_token.is_none());
    let running = TestProxy::start_with(config).await;
    let http = running.http.expect("HTTP enabled");
    let mut app = TcpStream::connect(running.addr).await.expect("connect");
    raw::login(&mut app, cluster.superuser(), "postgres").await;
    app.write_all(&raw::query(STATEMENT)).await.expect("query");
    while let Some(m) = raw::read_message(&mut app, WAIT).await {
        if m.tag == b'Z' {
            break;
        }
    }

    for host in [
        "attacker.example",
        "attacker.example:9930",
        "localhost.attacker.example",
    ] {
        for (method, path) in [
            ("GET", "/api/clients"),
            ("GET", "/api/events"),
            ("GET", "/metrics"),
            ("GET", "/readyz"),
            ("POST", "/api/clients/1/kill"),
            ("GET", "/no/such/route"),
        ] {
            let (status, body) = http_with_host(http, method, path, host, None).await;
            assert_eq!(status, 421, "{method} {path} for {host}: {body}");
            assert!(!body.contains("rebinding-canary"), "{body}");
        }
    }
    // The liveness probe answers a constant; it stays open.
    let (status, _) = http_with_host(http, "GET", "/healthz", "attacker.example", None).await;
    assert_eq!(status, 200);

    let by_ip = http.to_string();
    for host in [
        by_ip.as_str(),
        "localhost",
        "localhost:1234",
        "[::1]:9930",
        "127.0.0.1",
    ] {
        let (status, body) = http_with_host(http, "GET", "/api/clients", host, None).await;
        assert_eq!(status, 200, "{host}: {body}");
        assert!(body.contains("rebinding-canary"), "{host}: {body}");
    }
}

/// With a token the API needs it (a rebinding page has none), so the Host is not checked:
/// scrapers may use any name.
#[tokio::test]
async fn with_a_token_the_host_is_not_checked() {
    const TOKEN: &str = "a-token-for-the-host-test";
    let mut config = config_for(TestCluster::shared());
    config.admin.api_token = Some(TOKEN.to_owned());
    let running = TestProxy::start_with(config).await;
    let http = running.http.expect("HTTP enabled");
    let (status, body) = http_with_host(
        http,
        "GET",
        "/api/clients",
        "lockguard.internal",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_with_host(http, "GET", "/api/clients", "lockguard.internal", None).await;
    assert_eq!(status, 401);
    let (status, _) = http_with_host(http, "GET", "/metrics", "lockguard.internal", None).await;
    assert_eq!(status, 200);
}

// ---- empty secrets ------------------------------------------------------------------------

/// Sets `var` to `value` for this process. Each test uses its own variable names.
fn set_env(var: &str, value: &str) {
    // SAFETY (edition 2024 terms): every variable set here is read by one test only.
    std::env::set_var(var, value);
}

/// A console user, the API token or the guard password given by an empty variable stops
/// the start with an error naming the variable; before, an empty console password let
/// anyone log in with an empty password.
#[tokio::test]
async fn an_empty_secret_variable_stops_the_start_naming_it() {
    let cluster = TestCluster::shared();
    let empty = "LOCKGUARD_ADMIN_SECURITY_TEST_EMPTY_AT_START";
    set_env(empty, "");
    let with = |change: &dyn Fn(&mut Config)| {
        let mut config = config_for(cluster);
        config.admin.users = vec![ops_user()];
        change(&mut config);
        config
    };
    let cases: [(&str, Config); 3] = [
        (
            "admin.users[1].password_env",
            with(&|c| {
                c.admin.users.push(AdminUser {
                    name: "intruder".to_owned(),
                    password: None,
                    password_env: Some(empty.to_owned()),
                    role: AdminRole::Admin,
                })
            }),
        ),
        (
            "admin.api_token_env",
            with(&|c| c.admin.api_token_env = Some(empty.to_owned())),
        ),
        (
            "guard.password_env",
            with(&|c| {
                c.guard.dsn = Some(format!(
                    "host={} port={} user={} dbname=postgres",
                    cluster.host(),
                    cluster.port(),
                    cluster.superuser()
                ));
                c.guard.password_env = Some(empty.to_owned());
            }),
        ),
    ];
    for (key, config) in cases {
        let started = Proxy::bind(config).await;
        let Err(e) = started else {
            let proxy = started.expect("started");
            let console_addr = proxy.admin_console_addr().expect("console");
            let _stop = proxy.hard_stop_token().drop_guard();
            let _shutdown = proxy.shutdown_token().drop_guard();
            tokio::spawn(proxy.run());
            let empty_login = console_at(console_addr, ("intruder", "")).await.is_ok();
            panic!(
                "{key}: started with an empty secret (login with an empty password: {empty_login})"
            );
        };
        let text = format!("{e:#}");
        assert!(text.contains(empty), "{key}: {text}");
        assert!(text.contains(key), "{key}: {text}");
        assert!(text.contains("empty"), "{key}: {text}");
    }
}

/// RELOAD of a file whose new console user's password variable is empty is refused (ERROR
/// F0000 naming the variable) and changes nothing: that user cannot log in with an empty
/// password, the running users and token stay.
#[tokio::test]
async fn reload_refuses_an_empty_secret_variable_and_keeps_the_running_config() {
    let empty = "LOCKGUARD_ADMIN_SECURITY_TEST_EMPTY_ON_RELOAD";
    set_env(empty, "");
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    std::fs::write(file.path(), config_text("")).expect("write config");
    let running = TestProxy::start_from_file(file.path()).await;
    let console_addr = running.console.expect("console");
    let ops = console_at(console_addr, OPS).await.expect("ops logs in");

    for extra in [
        format!(
            "[[admin.users]]\nname = \"intruder\"\npassword_env = \"{empty}\"\nrole = \"admin\"\n"
        ),
        String::new(),
    ] {
        let text = if extra.is_empty() {
            config_text(&format!("api_token_env = \"{empty}\""))
        } else {
            format!("{}{extra}", config_text(""))
        };
        std::fs::write(file.path(), text).expect("write config");
        let e = query_error(&ops, "RELOAD").await;
        assert_eq!(code_of(&e), Some(&SqlState::CONFIG_FILE_ERROR), "{e:?}");
        let message = message_of(&e);
        assert!(message.contains(empty), "{message}");
        assert!(message.contains("empty"), "{message}");
    }
    assert!(
        console_at(console_addr, ("intruder", "")).await.is_err(),
        "a user with an empty password logged in"
    );
    let config = pairs(&ops, "SHOW CONFIG").await;
    let value = |key: &str| {
        config
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(value("admin.users").as_deref(), Some("ops (admin)"));
    assert_eq!(value("admin.api_token_env"), None);
}

// ---- secrets in configuration errors ------------------------------------------------------

/// A malformed line holding a secret: RELOAD's error names the line and the key and shows
/// nothing of the value.
#[tokio::test]
async fn reload_errors_name_the_line_and_key_of_a_broken_secret_but_not_its_value() {
    const SECRET: &str = "s3cr3t-reload-token";
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    std::fs::write(file.path(), config_text("")).expect("write config");
    let running = TestProxy::start_from_file(file.path()).await;
    let ops = console_at(running.console.expect("console"), OPS)
        .await
        .expect("ops logs in");
    for broken in [
        // Unterminated string; a bare word; a number where a string belongs.
        format!("api_token = \"{SECRET}"),
        format!("api_token = {SECRET}"),
        "api_token = 5550001234".to_owned(),
    ] {
        let text = config_text(&broken);
        let line = text
            .lines()
            .position(|l| l.starts_with("api_token"))
            .expect("the line")
            + 1;
        std::fs::write(file.path(), &text).expect("write config");
        let e = query_error(&ops, "RELOAD").await;
        assert_eq!(code_of(&e), Some(&SqlState::CONFIG_FILE_ERROR), "{e:?}");
        let message = message_of(&e);
        assert!(!message.contains(SECRET), "{message}");
        assert!(!message.contains("5550001234"), "{message}");
        assert!(message.contains(&format!("line {line}")), "{message}");
        assert!(message.contains("api_token"), "{message}");
    }
}

// ---- the console over TLS -----------------------------------------------------------------

/// The certificate a TLS handshake after an SSLRequest to `addr` presents.
async fn presented_certificate(addr: SocketAddr, ca: &Path) -> Vec<u8> {
    tls::presented_certificate(addr, tls::trusting(ca), "127.0.0.1").await
}

/// A console session over TLS verified against `ca`.
async fn console_over_tls(addr: SocketAddr, ca: &Path) -> Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(addr.port())
        .user(OPS.0)
        .password(OPS.1)
        .dbname("lockguard")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(WAIT)
        .connect(MakeRustlsConnect::new(tls::trusting(ca)))
        .await
        .expect("console login over TLS");
    tokio::spawn(conn);
    client
}

fn psql_conninfo(console: SocketAddr, sslmode: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={} password={} dbname=lockguard sslmode={sslmode}",
        console.port(),
        OPS.0,
        OPS.1
    )
}

/// psql with sslmode=require logs in to the console over TLS (the console's own
/// certificate) and runs a command; with `admin.require_tls` a plaintext login is refused
/// with a FATAL that says why.
#[tokio::test]
async fn psql_uses_the_console_over_tls_and_require_tls_refuses_plaintext() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new("console CA");
    let ca_file = ca.write_ca(dir.path(), "ca.crt");
    let files = ca.issue(dir.path(), "console", &["127.0.0.1"]);
    let mut config = config_for(TestCluster::shared());
    config.admin.users = vec![ops_user()];
    config.admin.require_tls = true;
    config.admin.tls_cert = Some(files.cert.clone());
    config.admin.tls_key = Some(files.key.clone());
    let running = TestProxy::start_with(config).await;
    let console_addr = running.console.expect("console");
    assert_eq!(
        presented_certificate(console_addr, &ca_file).await,
        files.der
    );

    let mut raw_plain = TcpStream::connect(console_addr).await.expect("connect");
    raw_plain
        .write_all(&raw::startup_packet(
            raw::PROTOCOL_3_0,
            &[("user", OPS.0), ("database", "lockguard")],
        ))
        .await
        .expect("startup");
    let reply = raw::read_until_close(&mut raw_plain, WAIT).await;
    let (code, message) = reply.first().expect("an ErrorResponse").error_fields();
    assert_eq!((reply[0].tag, code.as_str()), (b'E', "28000"), "{message}");
    assert!(message.contains("TLS is required"), "{message}");
    let e = console_at(console_addr, OPS)
        .await
        .expect_err("plaintext login refused");
    assert!(message_of(&e).contains("TLS is required"), "{e:?}");
    let over_tls = console_over_tls(console_addr, &ca_file).await;
    assert_eq!(pairs(&over_tls, "SHOW VERSION").await.len(), 1);

    let Some(out) = psql::run(&[
        psql_conninfo(console_addr, "require").as_str(),
        "-A",
        "-t",
        "-c",
        "\\conninfo",
        "-c",
        "SHOW VERSION",
    ])
    .await
    else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "psql failed: {stderr}");
    assert!(stdout.contains("SSL connection"), "{stdout}");
    assert!(stdout.contains("lockguard"), "{stdout}");

    let out = psql::run(&[
        psql_conninfo(console_addr, "disable").as_str(),
        "-c",
        "SHOW VERSION",
    ])
    .await
    .expect("psql ran before");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "plaintext psql logged in");
    assert!(stderr.contains("TLS is required"), "{stderr}");
}

/// Without a certificate of its own the console offers the client side's; RELOAD picks up
/// a certificate of its own and later replacements of its files, as the client side does;
/// an unreadable key is refused and the certificate in force stays. A TLS console session
/// from before carries on throughout.
#[tokio::test]
async fn the_console_certificate_follows_the_config_and_reload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new("console reload CA");
    let ca_file = ca.write_ca(dir.path(), "ca.crt");
    let client_side = ca.issue(dir.path(), "client-side", &["127.0.0.1"]);
    let first = ca.issue(dir.path(), "first", &["127.0.0.1"]);
    let second = ca.issue(dir.path(), "second", &["127.0.0.1"]);
    let (live_cert, live_key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    let install = |files: &CertFiles| {
        std::fs::copy(&files.cert, &live_cert).expect("copy certificate");
        std::fs::copy(&files.key, &live_key).expect("copy key");
    };
    install(&first);
    let tls_section = format!(
        "[tls]\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
        client_side.cert.display(),
        client_side.key.display()
    );
    let own = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        live_cert.display(),
        live_key.display()
    );
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    let write = |admin_extra: &str| {
        std::fs::write(
            file.path(),
            format!("{}{tls_section}", config_text(admin_extra)),
        )
        .expect("write config");
    };
    write("");
    let running = TestProxy::start_from_file(file.path()).await;
    let console_addr = running.console.expect("console");
    assert_eq!(
        presented_certificate(console_addr, &ca_file).await,
        client_side.der
    );
    let before = console_over_tls(console_addr, &ca_file).await;

    write(&own);
    let changes = pairs(&before, "RELOAD").await;
    assert!(
        changes.iter().any(|(key, _)| key == "admin.tls_cert"),
        "{changes:?}"
    );
    assert_eq!(
        presented_certificate(console_addr, &ca_file).await,
        first.der
    );

    install(&second);
    pairs(&before, "RELOAD").await;
    assert_eq!(
        presented_certificate(console_addr, &ca_file).await,
        second.der
    );

    std::fs::write(&live_key, "not a key").expect("break the key");
    let e = query_error(&before, "RELOAD").await;
    assert_eq!(code_of(&e), Some(&SqlState::CONFIG_FILE_ERROR), "{e:?}");
    assert!(message_of(&e).contains("admin.tls_cert"), "{e:?}");
    assert_eq!(
        presented_certificate(console_addr, &ca_file).await,
        second.der
    );
    assert_eq!(pairs(&before, "SHOW VERSION").await.len(), 1);
}
