//! Logins that lockguard completes itself (a binding-capable SCRAM client on TLS in front of a
//! TLS upstream) against the attacks a review tried: a man in the middle on the upstream link,
//! password guessing that PostgreSQL should see, and over-long user names.
//!
//! Every test runs its own PostgreSQL with ssl=on (and `auth_delay` where it matters); the
//! clients are tokio-postgres over TLS with channel binding `prefer`, as libpq's default is.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guard_core::HealthStatus;
use lockguard_config::{ClientTlsMode, Config, Upstream, UpstreamTlsMode};
use lockguard_tests::cluster::{TestCluster, PG_HBA, SCRAM_PASSWORD, SCRAM_USER};
use lockguard_tests::guard_support::{guard_config, wait_for};
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::tls::{provider, trusting, AnyCertificate, Pki, ServerTls};
use lockguard_tests::{logs, raw};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::config::{ChannelBinding, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

/// lockguard with TLS towards its clients, `upstream_mode` towards `upstream_port` on
/// 127.0.0.1 (the cluster itself, or a relay in front of it), and a guard reading SCRAM
/// secrets from `cluster` directly.
fn lockguard_config(
    cluster: &TestCluster,
    pki: &Pki,
    upstream_port: u16,
    mode: UpstreamTlsMode,
) -> Config {
    let mut config = pki.client_tls(config_for(cluster), ClientTlsMode::Allow);
    config.proxy.upstream = Upstream::Tcp {
        host: "127.0.0.1".to_owned(),
        port: upstream_port,
    };
    config.tls.upstream_mode = mode;
    config.guard = guard_config(cluster, &[]);
    config
}

/// What every test here starts from: lockguard's log captured, a CA, and a private PostgreSQL
/// with ssl=on serving a certificate it signed.
struct TlsSetup {
    pki: Pki,
    cluster: TestCluster,
    _server_dir: tempfile::TempDir,
}

impl TlsSetup {
    /// `None` (the test is skipped) where the harness cannot start a private cluster.
    fn start(settings: &[(&str, &str)]) -> Option<TlsSetup> {
        Self::serving(ServerTls::signed_by, settings)
    }

    /// [`TlsSetup::start`] with the server's TLS files made by `server`.
    fn serving(
        server: impl FnOnce(&Pki) -> ServerTls,
        settings: &[(&str, &str)],
    ) -> Option<TlsSetup> {
        logs::capture();
        let pki = Pki::new("lockguard auth test CA");
        let (cluster, server_dir) = server(&pki).start(settings, PG_HBA);
        if !cluster.is_owned() {
            eprintln!("skipped: needs an owned cluster");
            return None;
        }
        Some(TlsSetup {
            pki,
            cluster,
            _server_dir: server_dir,
        })
    }

    /// lockguard in front of `upstream_port` (the cluster, or a relay), TLS required upstream.
    async fn lockguard(&self, upstream_port: u16) -> TestProxy {
        let config = lockguard_config(
            &self.cluster,
            &self.pki,
            upstream_port,
            UpstreamTlsMode::Require,
        );
        TestProxy::start_with(config).await
    }

    /// [`login`] through `proxy`, trusting this setup's CA.
    async fn login(
        &self,
        proxy: &TestProxy,
        user: &str,
        password: &str,
        db: &str,
    ) -> (Result<Client, tokio_postgres::Error>, SocketAddr) {
        login(proxy, &self.pki.ca_file, user, password, db).await
    }
}

/// Logs in through lockguard over TLS with channel binding `prefer` (so the client announces
/// that it could bind), returning the outcome and the client's own address as lockguard sees
/// it.
async fn login(
    proxy: &TestProxy,
    ca: &Path,
    user: &str,
    password: &str,
    db: &str,
) -> (Result<Client, tokio_postgres::Error>, SocketAddr) {
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let local = stream.local_addr().expect("local address");
    let mut config = tokio_postgres::Config::new();
    config
        .user(user)
        .password(password)
        .dbname(db)
        .ssl_mode(SslMode::Require)
        .channel_binding(ChannelBinding::Prefer);
    let tls = MakeTlsConnect::<TcpStream>::make_tls_connect(
        &mut MakeRustlsConnect::new(trusting(ca)),
        "127.0.0.1",
    )
    .expect("TLS connector");
    let attempt = tokio::time::timeout(Duration::from_secs(20), config.connect_raw(stream, tls))
        .await
        .expect("the login ends in time");
    let outcome = attempt.map(|(client, connection)| {
        tokio::spawn(connection);
        client
    });
    (outcome, local)
}

async fn current_user(client: &Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("current_user")
        .get(0)
}

fn sqlstate(err: &tokio_postgres::Error) -> Option<&SqlState> {
    err.as_db_error().map(|e| e.code())
}

// ---------------------------------------------------------------------------------------------
// A man in the middle of the upstream link.

/// What a relay between lockguard and PostgreSQL saw of one connection.
#[derive(Debug, Default)]
struct Transcript {
    /// SASL mechanisms lockguard chose (SASLInitialResponse).
    mechanisms: Vec<String>,
    /// PostgreSQL sent AuthenticationOk through the relay: the relay holds a logged-in session.
    authenticated: bool,
    /// Query and Parse messages that passed after the startup packet.
    queries: usize,
}

/// A TLS-terminating relay in front of the server on `server_port`: it answers lockguard's
/// SSLRequest with `S`, shows its own self-signed certificate, opens its own TLS connection to
/// PostgreSQL and passes the decrypted bytes both ways, as an attacker on the network path
/// would. The handle yields what it saw of the one connection it serves.
async fn man_in_the_middle(server_port: u16) -> (SocketAddr, tokio::task::JoinHandle<Transcript>) {
    let own = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let key = PrivateKeyDer::Pkcs8(own.signing_key.serialize_der().into());
    let server_side = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![own.cert.der().clone()], key)
        .expect("relay certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_side));
    let client_side = AnyCertificate::client_config(Arc::default());
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_side));

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("relay address");
    let relay = tokio::spawn(async move {
        let (mut victim, _) = listener.accept().await.expect("lockguard connects");
        let mut request = [0u8; 8];
        victim.read_exact(&mut request).await.expect("SSLRequest");
        victim.write_all(b"S").await.expect("answer S");
        let victim = acceptor
            .accept(victim)
            .await
            .expect("TLS towards lockguard");

        let mut server = TcpStream::connect(("127.0.0.1", server_port))
            .await
            .expect("connect to PostgreSQL");
        assert_eq!(
            raw::encryption_request(&mut server, raw::SSL_REQUEST).await,
            b'S'
        );
        let name = ServerName::try_from("localhost").expect("name");
        let server = connector
            .connect(name, server)
            .await
            .expect("TLS towards PostgreSQL");

        let (victim_read, victim_write) = tokio::io::split(victim);
        let (server_read, server_write) = tokio::io::split(server);
        let (from_lockguard, from_server) = tokio::join!(
            pass_on(victim_read, server_write),
            pass_on(server_read, victim_write)
        );
        read_transcript(&from_lockguard, &from_server)
    });
    (addr, relay)
}

/// Copies until either end stops, returning what passed.
async fn pass_on<R, W>(mut from: R, mut to: W) -> Vec<u8>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
    seen
}

/// Tagged messages in `bytes` (what is left after the last whole one is ignored).
fn messages(mut bytes: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if len < 4 || bytes.len() < 1 + len {
            break;
        }
        out.push((bytes[0], &bytes[5..1 + len]));
        bytes = &bytes[1 + len..];
    }
    out
}

fn read_transcript(from_lockguard: &[u8], from_server: &[u8]) -> Transcript {
    let mut transcript = Transcript::default();
    // The startup packet has no tag: skip it by its length.
    let startup_len = from_lockguard
        .get(..4)
        .map_or(0, |l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
    for (tag, body) in messages(from_lockguard.get(startup_len..).unwrap_or_default()) {
        match tag {
            b'p' if transcript.mechanisms.is_empty() => {
                let name_end = body.iter().position(|&b| b == 0).unwrap_or(0);
                transcript
                    .mechanisms
                    .push(String::from_utf8_lossy(&body[..name_end]).into_owned());
            }
            b'Q' | b'P' => transcript.queries += 1,
            _ => {}
        }
    }
    transcript.authenticated = messages(from_server)
        .iter()
        .any(|(tag, body)| *tag == b'R' && *body == [0, 0, 0, 0]);
    transcript
}

/// With `upstream_mode = require` lockguard takes any certificate, so the relay gets between
/// lockguard and PostgreSQL. Because lockguard binds the SCRAM exchange it completes to its
/// own TLS channel (SCRAM-SHA-256-PLUS, tls-server-end-point), PostgreSQL sees that the
/// channel is not the one it terminates and refuses: the relay never holds a logged-in
/// session. Without the relay the same login succeeds, so the binding lockguard computes is
/// the one PostgreSQL expects.
#[tokio::test]
async fn a_relay_with_its_own_certificate_cannot_take_over_a_login_lockguard_completes() {
    let Some(setup) = TlsSetup::start(&[]) else {
        return;
    };
    let direct = setup.lockguard(setup.cluster.port()).await;
    let (client, _) = setup
        .login(&direct, SCRAM_USER, SCRAM_PASSWORD, "postgres")
        .await;
    let client = client.expect("the login succeeds without a relay in between");
    assert_eq!(current_user(&client).await, SCRAM_USER);
    drop(client);

    let (relay_addr, relay) = man_in_the_middle(setup.cluster.port()).await;
    let behind_relay = setup.lockguard(relay_addr.port()).await;
    let (attempt, _) = setup
        .login(&behind_relay, SCRAM_USER, SCRAM_PASSWORD, "postgres")
        .await;
    if let Ok(client) = &attempt {
        // What the relay could now do in the user's name.
        let _ = client.simple_query("SELECT 'through the relay'").await;
    }
    let outcome = attempt.map(|_| "logged in");
    let transcript = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("the relay's connection ends")
        .expect("relay task");
    assert_eq!(
        transcript.mechanisms,
        ["SCRAM-SHA-256-PLUS"],
        "{transcript:?}"
    );
    assert!(
        !transcript.authenticated && transcript.queries == 0,
        "the relay holds a logged-in session: {transcript:?}"
    );
    let err = outcome.expect_err("the login through the relay fails");
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("channel binding")),
        "{err:?}"
    );
}

/// tls-server-end-point hashes the server certificate with the hash of its signature
/// algorithm: SHA-384 for an ECDSA P-384 certificate. PostgreSQL computes the same, so the
/// login succeeds.
#[tokio::test]
async fn channel_binding_matches_postgres_for_a_sha384_certificate() {
    let p384 = |_: &Pki| {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384 key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed P-384 certificate");
        let (cert_file, key_file) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::write(&cert_file, cert.pem()).expect("write certificate");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        ServerTls::from_files(dir, cert_file, key_file)
    };
    let Some(setup) = TlsSetup::serving(p384, &[]) else {
        return;
    };
    let proxy = setup.lockguard(setup.cluster.port()).await;
    let (client, _) = setup
        .login(&proxy, SCRAM_USER, SCRAM_PASSWORD, "postgres")
        .await;
    let client = client.expect("bound login with a SHA-384 server certificate");
    assert_eq!(current_user(&client).await, SCRAM_USER);
}

// ---------------------------------------------------------------------------------------------
// Password guessing.

const AUTH_DELAY: Duration = Duration::from_millis(2000);

/// A wrong password that lockguard itself detects still reaches PostgreSQL as a failed
/// attempt: `auth_delay` holds each answer back as it would for a direct client, the server
/// log names the user, and lockguard warns with the user and the client's address.
#[tokio::test]
async fn wrong_passwords_lockguard_detects_still_reach_postgres_as_failed_logins() {
    let delay_ms = AUTH_DELAY.as_millis().to_string();
    let Some(setup) = TlsSetup::start(&[
        ("shared_preload_libraries", "auth_delay"),
        ("auth_delay.milliseconds", delay_ms.as_str()),
    ]) else {
        return;
    };
    let server_log = setup.cluster.log_path().expect("an owned cluster's log");
    let proxy = setup.lockguard(setup.cluster.port()).await;

    const GUESSES: u32 = 3;
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 0..GUESSES {
        let guess = format!("guess-{i}");
        let (attempt, local) = setup.login(&proxy, SCRAM_USER, &guess, "postgres").await;
        let err = attempt.expect_err("a wrong password is refused");
        assert_eq!(sqlstate(&err), Some(&SqlState::INVALID_PASSWORD), "{err:?}");
        clients.push(local);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= AUTH_DELAY * GUESSES,
        "{GUESSES} wrong guesses took {elapsed:?}: PostgreSQL's auth_delay of {AUTH_DELAY:?} \
         was not applied to each"
    );

    let failure = format!("password authentication failed for user \"{SCRAM_USER}\"");
    let failed_logins = || {
        let log = std::fs::read_to_string(server_log).unwrap_or_default();
        log.matches(&failure).count()
    };
    wait_for(
        Duration::from_secs(10),
        &format!("the server to log {GUESSES} failed logins"),
        || {
            let logged = failed_logins() >= GUESSES as usize;
            async move { logged }
        },
    )
    .await;

    for client in clients {
        let client = client.to_string();
        let warnings = logs::lines_with(&["WARN", &client, SCRAM_USER]);
        assert!(
            !warnings.is_empty(),
            "no warning names {SCRAM_USER} and {client}; lockguard logged:\n{}",
            logs::lines_with(&[&client]).join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Over-long user names.

/// The database whose logins these tests make PostgreSQL check with scram-sha-256 (the
/// harness trusts every other role).
const NAMES_DB: &str = "lg_names";

/// Requires scram-sha-256 for every login to [`NAMES_DB`] over TCP, and waits until the server
/// applies it (a login as `probe_role` without a password stops working).
async fn require_scram_for_names_db(cluster: &TestCluster, probe_role: &str) {
    let hba = cluster
        .data_dir()
        .expect("owned cluster")
        .join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    let rule = format!(
        "host {NAMES_DB} all 127.0.0.1/32 scram-sha-256\nhost {NAMES_DB} all ::1/128 scram-sha-256\n"
    );
    std::fs::write(&hba, format!("{rule}{old}")).expect("write pg_hba.conf");
    let admin = cluster.connect_admin().await;
    admin
        .batch_execute("SELECT pg_catalog.pg_reload_conf()")
        .await
        .expect("reload");
    let scram_required = || async {
        let login = cluster.pg_config(probe_role, None, NAMES_DB);
        login.connect(tokio_postgres::NoTls).await.is_err()
    };
    wait_for(
        Duration::from_secs(10),
        "pg_hba.conf to be reloaded",
        scram_required,
    )
    .await;
}

/// A client may send a user name longer than PostgreSQL's 63-byte names. PostgreSQL cuts it
/// to its first 63 bytes; lockguard looks the stored secret up under the same name, so the
/// login works as it would directly, a wrong password gets the usual 28P01, and the guard's
/// lookup never fails on the length ("identifier too long") nor degrades the guard.
#[tokio::test]
async fn an_overlong_user_name_is_looked_up_as_postgres_truncates_it() {
    let Some(setup) = TlsSetup::start(&[]) else {
        return;
    };
    let cluster = &setup.cluster;
    // 63 bytes: "a" and 31 two-byte characters.
    let role: String = std::iter::once('a')
        .chain(std::iter::repeat_n('é', 31))
        .collect();
    assert_eq!(role.len(), 63);
    // 100 bytes that start with the role's name.
    let long_name: String = role
        .chars()
        .chain(std::iter::repeat_n('ü', 18))
        .chain(std::iter::once('z'))
        .collect();
    assert_eq!(long_name.len(), 100);
    // 100 bytes whose 63rd byte is the middle of a character: no role has that name.
    let cut_mid_character = "é".repeat(50);

    let admin = cluster.connect_admin().await;
    for statement in [
        format!("CREATE DATABASE {NAMES_DB}"),
        format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'name_pass'"),
    ] {
        admin.batch_execute(&statement).await.expect(&statement);
    }
    require_scram_for_names_db(cluster, &role).await;

    let proxy = setup.lockguard(cluster.port()).await;
    let (client, _) = setup.login(&proxy, &long_name, "name_pass", NAMES_DB).await;
    let client = client.expect("a 100-byte name logs in as the role of its first 63 bytes");
    assert_eq!(current_user(&client).await, role);
    drop(client);

    let (attempt, _) = setup.login(&proxy, &long_name, "wrong", NAMES_DB).await;
    let err = attempt.expect_err("a wrong password is refused");
    assert_eq!(sqlstate(&err), Some(&SqlState::INVALID_PASSWORD), "{err:?}");

    // PostgreSQL looks up the cut bytes, finds no role and refuses as for a wrong password;
    // lockguard does not look such a name up at all.
    let (attempt, _) = setup.login(&proxy, &cut_mid_character, "x", NAMES_DB).await;
    let err = attempt.expect_err("no such role");
    assert_eq!(sqlstate(&err), Some(&SqlState::INVALID_PASSWORD), "{err:?}");

    let guard = proxy.guard().expect("guard configured");
    let health = guard.health();
    assert_eq!(health.status, HealthStatus::Ok, "{:?}", health.last_error);
}
