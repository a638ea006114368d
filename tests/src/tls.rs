//! TLS for the tests: a CA with lockguard's certificate, clients that trust it, a verifier that
//! accepts (and records) any certificate, and PostgreSQL clusters serving TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockguard_config::{ClientTlsMode, Config};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_postgres::config::{ChannelBinding, SslMode};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::certs::{hand_to_postgres, CertFiles, TestCa};
use crate::cluster::TestCluster;
use crate::proxy::TestProxy;
use crate::raw;

/// The crypto provider lockguard uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client configuration trusting only `ca`.
pub fn trusting(ca: &Path) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("parse CA")).expect("add CA");
    }
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Connects to the proxy at `addr` with sslmode=require, trusting only `ca`, and `binding` as
/// the client's channel binding (tokio-postgres' default is `Prefer`, which on TLS makes SCRAM
/// announce binding support, like libpq). The connection task is spawned.
pub async fn connect(
    addr: SocketAddr,
    ca: &Path,
    (user, password): (&str, Option<&str>),
    db: &str,
    binding: ChannelBinding,
) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(addr.port())
        .user(user)
        .dbname(db)
        .ssl_mode(SslMode::Require)
        .channel_binding(binding)
        .connect_timeout(Duration::from_secs(10));
    if let Some(password) = password {
        config.password(password);
    }
    let (client, connection) = config.connect(MakeRustlsConnect::new(trusting(ca))).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Connects through `proxy` over TLS, trusting `ca`, with channel binding `prefer` (as libpq).
pub async fn connect_tls(
    proxy: &TestProxy,
    ca: &Path,
    user: &str,
    password: Option<&str>,
    db: &str,
) -> Result<Client, tokio_postgres::Error> {
    connect(proxy.addr, ca, (user, password), db, ChannelBinding::Prefer).await
}

/// Whether the backend serving `client` was reached over TLS (through lockguard: whether
/// lockguard's upstream connection is TLS), as `pg_stat_ssl` says.
pub async fn upstream_is_tls(client: &Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_catalog.pg_stat_ssl WHERE pid = pg_catalog.pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

/// The certificate the server at `addr` presents in a TLS handshake after an SSLRequest, to a
/// client with `config` asking for `name`.
pub async fn presented_certificate(addr: SocketAddr, config: ClientConfig, name: &str) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(
        raw::encryption_request(&mut tcp, raw::SSL_REQUEST).await,
        b'S',
        "TLS offered"
    );
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (_, session) = tls.get_ref();
    session.peer_certificates().expect("a certificate")[0].to_vec()
}

/// Certificates for one test: a CA, and lockguard's own certificate for 127.0.0.1 and
/// localhost, in a temp dir that lives as long as this.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: TestCa,
    pub ca_file: PathBuf,
    pub proxy_cert: CertFiles,
}

impl Pki {
    /// A CA named `name` and lockguard's certificate.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new(name);
        let ca_file = ca.write_ca(dir.path(), "ca.crt");
        let proxy_cert = ca.issue(dir.path(), "proxy", &["127.0.0.1", "localhost"]);
        Pki {
            dir,
            ca,
            ca_file,
            proxy_cert,
        }
    }

    /// `config` with lockguard serving TLS to its clients (with its certificate) in `mode`.
    pub fn client_tls(&self, mut config: Config, mode: ClientTlsMode) -> Config {
        config.tls.client_cert = Some(self.proxy_cert.cert.clone());
        config.tls.client_key = Some(self.proxy_cert.key.clone());
        config.tls.client_mode = mode;
        config
    }
}

/// Accepts any server certificate and keeps the last one presented: for a client that is the
/// attacker (it does not care whom it talks to), or that only wants to see the certificate.
#[derive(Debug, Default)]
pub struct AnyCertificate {
    seen: Mutex<Option<Vec<u8>>>,
}

impl AnyCertificate {
    /// The DER of the last certificate a server presented.
    pub fn seen(&self) -> Option<Vec<u8>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A client configuration that accepts any certificate and records it in `verifier`.
    pub fn client_config(verifier: Arc<AnyCertificate>) -> ClientConfig {
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth()
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The files a PostgreSQL serves TLS with, in a temp dir of their own that the server's account
/// may read; the dir must outlive the cluster.
pub struct ServerTls {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `ssl_ca_file`: client certificates signed by this CA are trusted.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// A certificate for `localhost` signed by `pki`'s CA.
    pub fn signed_by(pki: &Pki) -> ServerTls {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = pki.ca.issue(dir.path(), "server", &["localhost"]);
        hand_to_postgres(dir.path());
        ServerTls {
            dir,
            cert: server.cert,
            key: server.key,
            client_ca: None,
        }
    }

    /// Certificate and key files already written into `dir`.
    pub fn from_files(dir: tempfile::TempDir, cert: PathBuf, key: PathBuf) -> ServerTls {
        hand_to_postgres(dir.path());
        ServerTls {
            dir,
            cert,
            key,
            client_ca: None,
        }
    }

    /// Also trusts client certificates signed by `pki`'s CA.
    pub fn trusting_clients_of(mut self, pki: &Pki) -> ServerTls {
        let ca = pki.ca.write_ca(self.dir.path(), "client-ca.crt");
        hand_to_postgres(self.dir.path());
        self.client_ca = Some(ca);
        self
    }

    /// A private cluster with ssl=on, `pg_hba` as its whole `pg_hba.conf` and `settings` in
    /// postgresql.conf as well.
    pub fn start(
        self,
        settings: &[(&str, &str)],
        pg_hba: &str,
    ) -> (TestCluster, tempfile::TempDir) {
        let cluster = self.with_settings(settings, |all| TestCluster::start_with_hba(all, pg_hba));
        (cluster.expect("start a cluster with ssl=on"), self.dir)
    }

    /// [`ServerTls::start`] with PostgreSQL `major` and the default `pg_hba.conf`; `None`
    /// when that major is not installed.
    pub fn start_major(
        self,
        major: u32,
        settings: &[(&str, &str)],
    ) -> Option<(TestCluster, tempfile::TempDir)> {
        let cluster = self.with_settings(settings, |all| TestCluster::start_major(major, all))?;
        let cluster =
            cluster.unwrap_or_else(|e| panic!("starting PostgreSQL {major} with ssl=on: {e}"));
        Some((cluster, self.dir))
    }

    /// Calls `start` with the TLS settings followed by `extra`.
    fn with_settings<T>(
        &self,
        extra: &[(&str, &str)],
        start: impl FnOnce(&[(&str, &str)]) -> T,
    ) -> T {
        let cert = self.cert.to_string_lossy().into_owned();
        let key = self.key.to_string_lossy().into_owned();
        let ca = self
            .client_ca
            .as_ref()
            .map(|ca| ca.to_string_lossy().into_owned());
        let mut all = vec![
            ("ssl", "on"),
            ("ssl_cert_file", cert.as_str()),
            ("ssl_key_file", key.as_str()),
        ];
        if let Some(ca) = &ca {
            all.push(("ssl_ca_file", ca.as_str()));
        }
        all.extend_from_slice(extra);
        start(&all)
    }
}
