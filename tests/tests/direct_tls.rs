//! Direct TLS negotiation (PostgreSQL 17+, libpq's `sslnegotiation=direct`): a client that
//! opens with a TLS ClientHello instead of an SSLRequest. With a certificate lockguard accepts
//! it when the client negotiates ALPN `postgresql` and refuses it otherwise; without one it
//! closes without an answer and says why in its log, as PostgreSQL without TLS does. Towards
//! the server, `[tls] upstream_negotiation = "direct"` starts TLS at once against 17+.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use lockguard_config::{ClientTlsMode, Config, UpstreamNegotiation, UpstreamTlsMode};
use lockguard_tests::cluster::{installed_major_at_least, TestCluster};
use lockguard_tests::guard_support::wait_for;
use lockguard_tests::logs;
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::raw;
use lockguard_tests::tls::{self, trusting, Pki, ServerTls};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

// ---- setting up -------------------------------------------------------------------------

/// A proxy whose log the tests read.
async fn start(config: Config) -> TestProxy {
    TestProxy::options(config).capture_logs().start().await
}

/// Waits for a log line about `client` containing `needle`, and returns it.
async fn log_line(client: SocketAddr, needle: &str) -> String {
    logs::line_about(client, needle, WAIT).await
}

/// A rustls client trusting `ca` that offers `alpn` (nothing when empty).
fn client_config(ca: &Path, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = trusting(ca);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// The bytes of a ClientHello offering `alpn`, to send over a plain socket.
fn client_hello(ca: &Path, alpn: &[&[u8]]) -> Vec<u8> {
    let name = ServerName::try_from("localhost").expect("name");
    let mut conn =
        rustls::ClientConnection::new(client_config(ca, alpn), name).expect("client connection");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("ClientHello");
    hello
}

/// Every byte the peer sends until it closes (or `WAIT` passes, which fails the test).
async fn everything_until_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut all))
        .await
        .expect("the connection is closed")
        .ok();
    all
}

/// A `psql` binary (the Debian client; any version, since libpq comes from `LD_LIBRARY_PATH`).
fn psql_binary() -> Option<PathBuf> {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin/psql"))
        .find(|psql| psql.is_file());
    if found.is_none() {
        eprintln!("skipped: psql is not installed (Debian: apt-get install postgresql-client)");
    }
    found
}

/// libpq 18's directory (`<npm build>/lib`): psql linked against it speaks
/// `sslnegotiation=direct` and `max_protocol_version=3.2`.
fn libpq_18() -> Option<PathBuf> {
    let major = installed_major_at_least(18, "libpq 18 (sslnegotiation=direct)")?;
    let bin = lockguard_sandbox::installed_major(major)?;
    let lib = bin.parent()?.join("lib");
    lib.join("libpq.so.5").exists().then_some(lib).or_else(|| {
        panic!(
            "PostgreSQL {major} in {} has no lib/libpq.so.5",
            bin.display()
        )
    })
}

// ---- the tests --------------------------------------------------------------------------

#[tokio::test]
async fn libpq_18_with_sslnegotiation_direct_connects_through_lockguard() {
    let (Some(psql), Some(libpq)) = (psql_binary(), libpq_18()) else {
        return;
    };
    let cluster = TestCluster::shared();
    let pki = Pki::new("lockguard direct TLS test CA");
    let proxy = start(pki.client_tls(config_for(cluster), ClientTlsMode::Allow)).await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} dbname=postgres sslmode=verify-full sslrootcert={} \
         sslnegotiation=direct max_protocol_version=3.2",
        proxy.addr.port(),
        cluster.superuser(),
        pki.ca_file.display()
    );
    let output = tokio::task::spawn_blocking(move || {
        Command::new(psql)
            .env("LD_LIBRARY_PATH", libpq)
            .env("PGCONNECT_TIMEOUT", "10")
            .args(["-X", "-A", "-t", &conninfo])
            .args(["-c", "SELECT 'direct ' || 40 + 2", "-c", "\\conninfo"])
            .stdin(std::process::Stdio::null())
            .output()
    })
    .await
    .expect("psql task")
    .expect("run psql");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "psql: {stderr}");
    assert!(stdout.contains("direct 42"), "{stdout}");
    assert!(stdout.contains("SSL connection"), "{stdout}");
}

/// A direct-TLS login with ALPN `postgresql` over a raw socket, up to ReadyForQuery.
async fn raw_direct_login(
    addr: SocketAddr,
    ca: &Path,
    user: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(client_config(ca, &[b"postgresql"]));
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("direct TLS handshake with ALPN postgresql");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    tls.write_all(&raw::startup_packet(
        raw::PROTOCOL_3_0,
        &[("user", user), ("database", "postgres")],
    ))
    .await
    .expect("startup over TLS");
    loop {
        let m = raw::read_message(&mut tls, WAIT)
            .await
            .expect("the login is answered");
        assert_ne!(m.tag, b'E', "{:?}", m.error_fields());
        if m.tag == b'Z' {
            return tls;
        }
    }
}

#[tokio::test]
async fn a_direct_client_hello_without_alpn_postgresql_is_refused() {
    let cluster = TestCluster::shared();
    let pki = Pki::new("lockguard direct TLS test CA");
    let proxy = start(pki.client_tls(config_for(cluster), ClientTlsMode::Allow)).await;

    // With ALPN postgresql the same handshake leads to a session: the refusals below are
    // about ALPN, not about direct TLS as such.
    drop(raw_direct_login(proxy.addr, &pki.ca_file, cluster.superuser()).await);

    // No ALPN at all: the handshake completes (TLS cannot refuse it), then lockguard closes
    // without a protocol byte.
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let local = tcp.local_addr().expect("local address");
    let connector = tokio_rustls::TlsConnector::from(client_config(&pki.ca_file, &[]));
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("the handshake itself completes");
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    // Whatever a client sends then is not read as a startup packet.
    let _ = tls
        .write_all(&raw::startup_packet(
            raw::PROTOCOL_3_0,
            &[("user", cluster.superuser()), ("database", "postgres")],
        ))
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer))
        .await
        .expect("the connection is closed");
    assert!(answer.is_empty(), "answered {answer:?}");
    let line = log_line(local, "without ALPN").await;
    assert!(line.contains("postgresql"), "{line}");

    // ALPN offered, but not postgresql: refused in the handshake itself.
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let connector =
        tokio_rustls::TlsConnector::from(client_config(&pki.ca_file, &[b"http/1.1", b"h2"]));
    let name = ServerName::try_from("localhost").expect("name");
    let err = connector
        .connect(name, tcp)
        .await
        .expect_err("no common application protocol");
    assert!(err.to_string().contains("NoApplicationProtocol"), "{err:?}");
}

#[tokio::test]
async fn without_a_certificate_a_direct_client_hello_is_closed_unanswered_and_logged() {
    let cluster = TestCluster::shared();
    let pki = Pki::new("lockguard direct TLS test CA");
    let proxy = start(config_for(cluster)).await;
    let hello = client_hello(&pki.ca_file, &[b"postgresql"]);
    assert_eq!(hello[0], 0x16, "a TLS handshake record");

    let mut direct = TcpStream::connect((cluster.host(), cluster.port()))
        .await
        .expect("connect directly");
    direct.write_all(&hello).await.expect("ClientHello");
    let server_answer = everything_until_close(&mut direct).await;

    let mut through = TcpStream::connect(proxy.addr).await.expect("connect");
    let local = through.local_addr().expect("local address");
    through.write_all(&hello).await.expect("ClientHello");
    let answer = everything_until_close(&mut through).await;
    assert_eq!(
        answer, server_answer,
        "lockguard answers as PostgreSQL does"
    );
    assert!(answer.is_empty(), "{answer:?}");
    let line = log_line(local, "refusing a direct TLS connection").await;
    assert!(line.contains("no certificate for clients"), "{line}");

    // An ordinary client is unaffected.
    let mut plain = TcpStream::connect(proxy.addr).await.expect("connect");
    raw::login(&mut plain, cluster.superuser(), "postgres").await;
}

/// A cluster of `major` with ssl=on (certificate for `localhost`) that logs how each TLS
/// connection was negotiated.
fn tls_cluster(major: u32, pki: &Pki) -> (TestCluster, tempfile::TempDir) {
    let negotiation: &[(&str, &str)] = if major >= 17 {
        &[("trace_connection_negotiation", "on")]
    } else {
        &[]
    };
    ServerTls::signed_by(pki)
        .start_major(major, negotiation)
        .expect("an installed major")
}

fn direct_upstream(cluster: &TestCluster, pki: &Pki) -> Config {
    let mut config = config_for(cluster);
    config.proxy.upstream = lockguard_config::Upstream::Tcp {
        host: "localhost".to_owned(),
        port: cluster.port(),
    };
    config.tls.upstream_mode = UpstreamTlsMode::VerifyFull;
    config.tls.upstream_ca = Some(pki.ca_file.clone());
    config.tls.upstream_negotiation = UpstreamNegotiation::Direct;
    config
}

#[tokio::test]
async fn upstream_negotiation_direct_starts_tls_at_once_with_a_postgres_17_server() {
    let Some(major) = installed_major_at_least(17, "upstream_negotiation = \"direct\"") else {
        return;
    };
    let pki = Pki::new("lockguard direct TLS test CA");
    let (cluster, _server_dir) = tls_cluster(major, &pki);
    let proxy = start(direct_upstream(&cluster, &pki)).await;
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(proxy.addr.port())
        .user(cluster.superuser())
        .dbname("postgres")
        .connect_timeout(WAIT)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("a plaintext client through lockguard");
    tokio::spawn(connection);
    let ssl: bool = tls::upstream_is_tls(&client).await;
    assert!(ssl, "lockguard's connection to the server is not TLS");
    // The server says how: a direct handshake, no SSLRequest.
    let log_path = cluster.log_path().expect("an owned cluster").to_owned();
    wait_for(WAIT, "the server to log a direct TLS connection", || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move { log.contains("direct SSL connection accepted") }
    })
    .await;
    let log = std::fs::read_to_string(&log_path).expect("server log");
    assert!(!log.contains("SSLRequest accepted"), "{log}");

    // Against a server older than 17 the client gets lockguard's explanation.
    let Some(old) = [16, 15, 14]
        .into_iter()
        .find(|m| lockguard_sandbox::installed_major(*m).is_some())
    else {
        eprintln!("skipped the pre-17 half: no PostgreSQL 14-16 installed");
        return;
    };
    let (old_cluster, _old_dir) = tls_cluster(old, &pki);
    let proxy = start(direct_upstream(&old_cluster, &pki)).await;
    let err = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(proxy.addr.port())
        .user(old_cluster.superuser())
        .dbname("postgres")
        .connect_timeout(WAIT)
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("PostgreSQL before 17 does not take a direct ClientHello");
    let db_err = err.as_db_error().expect("lockguard's ErrorResponse");
    assert_eq!(db_err.code().code(), "08006");
    assert!(
        db_err.message().contains("upstream_negotiation"),
        "{}",
        db_err.message()
    );
}
