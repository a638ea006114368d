//! TLS towards the clients: they connect with sslmode=require (plaintext is refused where TLS
//! is required), certificates reload without dropping sessions, and broken handshakes hurt
//! nobody else. lockguard's own TLS towards PostgreSQL is in `tls_upstream.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lockguard_config::ClientTlsMode;
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::query::ask;
use lockguard_tests::tls::{self, connect_tls, AnyCertificate, Pki};
use lockguard_tests::{psql, raw};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn tls_clients_work_and_required_tls_refuses_plaintext() {
    let cluster = TestCluster::shared();
    let pki = Pki::new("lockguard test CA");
    let proxy =
        TestProxy::start_with(pki.client_tls(config_for(cluster), ClientTlsMode::Require)).await;
    let su = cluster.superuser();

    let client = connect_tls(&proxy, &pki.ca_file, su, None, "postgres")
        .await
        .expect("TLS client through the proxy");
    assert_eq!(ask(&client, "SELECT 'over tls'::text").await, "over tls");
    let rows: i64 = client
        .query_one("SELECT count(*) FROM generate_series(1, 100000)", &[])
        .await
        .expect("bigger result over TLS")
        .get(0);
    assert_eq!(rows, 100_000);

    let mut plain = tokio_postgres::Config::new();
    plain
        .host("127.0.0.1")
        .port(proxy.addr.port())
        .user(su)
        .dbname("postgres")
        .ssl_mode(SslMode::Disable);
    let err = plain
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("plaintext client refused");
    assert_eq!(err.code(), Some(&SqlState::from_code("28000")), "{err:?}");

    let conninfo = format!(
        "host=127.0.0.1 port={} user={su} dbname=postgres sslmode=verify-full sslrootcert={}",
        proxy.addr.port(),
        pki.ca_file.display()
    );
    let psql_args = [
        conninfo.as_str(),
        "-A",
        "-t",
        "-c",
        "SELECT 40 + 2",
        "-c",
        "\\conninfo",
    ];
    if let Some(out) = psql::run(&psql_args).await {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("42"), "{stdout}");
        assert!(stdout.contains("SSL connection"), "{stdout}");
    }
}

/// The certificate lockguard presents to a new client.
async fn presented_certificate(addr: std::net::SocketAddr) -> Vec<u8> {
    let config = AnyCertificate::client_config(Arc::default());
    tls::presented_certificate(addr, config, "localhost").await
}

#[tokio::test]
async fn reloading_certificates_affects_new_connections_only() {
    let cluster = TestCluster::shared();
    let pki = Pki::new("lockguard test CA");
    let config = pki.client_tls(config_for(cluster), ClientTlsMode::Allow);
    let proxy = TestProxy::start_with(config.clone()).await;
    assert_eq!(presented_certificate(proxy.addr).await, pki.proxy_cert.der);
    let existing = connect_tls(&proxy, &pki.ca_file, cluster.superuser(), None, "postgres")
        .await
        .expect("session before the reload");

    // Replace the files in place, as certificate renewal does, then reload.
    let renewed = pki.ca.issue(pki.dir.path(), "renewed", &["127.0.0.1"]);
    std::fs::copy(&renewed.cert, &pki.proxy_cert.cert).expect("replace cert");
    std::fs::copy(&renewed.key, &pki.proxy_cert.key).expect("replace key");
    proxy
        .admin()
        .reload_with(config.clone())
        .await
        .expect("reload");

    assert_eq!(presented_certificate(proxy.addr).await, renewed.der);
    assert_eq!(
        ask(&existing, "SELECT 'still here'::text").await,
        "still here"
    );

    // A broken file is refused and the working certificate kept.
    std::fs::write(&pki.proxy_cert.key, "not a key").expect("break key");
    assert!(proxy.admin().reload_with(config.clone()).await.is_err());
    assert_eq!(presented_certificate(proxy.addr).await, renewed.der);
}

#[tokio::test]
async fn broken_and_stalled_handshakes_are_cut_without_hurting_others() {
    let cluster = TestCluster::shared();
    let pki = Pki::new("lockguard test CA");
    let mut config = pki.client_tls(config_for(cluster), ClientTlsMode::Allow);
    config.proxy.startup_timeout = Duration::from_secs(1);
    let proxy = TestProxy::start_with(config).await;
    let healthy = connect_tls(&proxy, &pki.ca_file, cluster.superuser(), None, "postgres")
        .await
        .expect("healthy TLS session");

    // Garbage instead of a ClientHello.
    let mut garbage = TcpStream::connect(proxy.addr).await.expect("connect");
    assert_eq!(
        raw::encryption_request(&mut garbage, raw::SSL_REQUEST).await,
        b'S'
    );
    garbage
        .write_all(b"\x16\x03\x01\x00\x05hello, this is not TLS at all")
        .await
        .expect("garbage");
    assert!(raw::closed_within(&mut garbage, Duration::from_secs(3)).await);

    // A client that starts TLS and never finishes the handshake: cut at the deadline.
    let mut stalled = TcpStream::connect(proxy.addr).await.expect("connect");
    raw::encryption_request(&mut stalled, raw::SSL_REQUEST).await;
    let started = Instant::now();
    assert!(raw::closed_within(&mut stalled, Duration::from_secs(4)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );

    assert_eq!(
        ask(&healthy, "SELECT 'unaffected'::text").await,
        "unaffected"
    );
}
