//! TLS on both sides: terminating clients' TLS with lockguard's certificate, and speaking TLS to
//! PostgreSQL as `[tls] upstream_mode` says (named after libpq's `sslmode`) — for client
//! sessions and, unless its dsn says otherwise, for the guard's own connection.
//!
//! The rustls configurations are derived from the configuration in force (`[tls]`, and
//! `[admin]`'s own certificate for the console) when it is put in force, because that reads
//! files and can fail: [`TlsState::load`] runs before anything changes, and the one place that
//! puts a configuration in force installs the state with it. Connections read it once each
//! (never per message), so new certificates never touch live sessions.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use guard_core::GuardTls;
use lockguard_config::{
    AdminConfig, ClientTlsMode, Config, GuardConfig, TlsConfig, UpstreamNegotiation,
    UpstreamTlsMode,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The ALPN protocol name of the PostgreSQL protocol over TLS (PostgreSQL 17+). lockguard
/// offers it to clients, so libpq 17+ (which always sends it) negotiates it in both ways of
/// starting TLS, and requires it of a direct TLS connection; it sends it to a server it
/// negotiates TLS with directly.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// lockguard's TLS state, shared by all connections: the [`TlsState`] of the configuration
/// in force.
pub struct Tls {
    current: ArcSwap<TlsState>,
}

/// The TLS side of one configuration: what clients and console clients are offered, and how
/// PostgreSQL is reached.
#[derive(Clone)]
pub struct TlsState {
    client: Option<TlsAcceptor>,
    client_mode: ClientTlsMode,
    upstream: Option<UpstreamTls>,
    /// What the console answers an SSLRequest with: its own certificate, else the client
    /// side's, else nothing.
    console: Option<TlsAcceptor>,
}

/// How to reach PostgreSQL over TLS.
#[derive(Clone)]
pub struct UpstreamTls {
    pub mode: UpstreamTlsMode,
    /// SSLRequest first, or the handshake at once (`[tls] upstream_negotiation`).
    pub negotiation: UpstreamNegotiation,
    pub connector: TlsConnector,
}

impl TlsState {
    /// Reads the certificates `config` names (`[tls]`, and `admin.tls_cert` / `admin.tls_key`
    /// for the console). Certificates are read every time, even from unchanged paths: renewal
    /// replaces the files in place. Errors name the file.
    pub fn load(config: &Config) -> anyhow::Result<TlsState> {
        let client = client_acceptor(&config.tls).context("TLS configuration")?;
        let console = match console_acceptor(&config.admin)? {
            Some(own) => Some(own),
            None => client.clone(),
        };
        Ok(TlsState {
            client,
            client_mode: config.tls.client_mode,
            upstream: upstream_tls(&config.tls).context("TLS configuration")?,
            console,
        })
    }
}

impl Tls {
    /// Holds `state` until [`Tls::install`] replaces it.
    pub(crate) fn new(state: TlsState) -> Tls {
        Tls {
            current: ArcSwap::from_pointee(state),
        }
    }

    /// Puts a new state in force: only the proxy's one configuration change does this, with
    /// the state of the configuration it puts in force. New connections use the new
    /// certificates; established sessions keep theirs.
    pub(crate) fn install(&self, state: TlsState) {
        self.current.store(Arc::new(state));
    }

    /// The acceptor for client TLS, if lockguard has a certificate.
    pub fn client_acceptor(&self) -> Option<TlsAcceptor> {
        self.current.load().client.clone()
    }

    /// True when plaintext clients must be refused.
    pub fn clients_must_use_tls(&self) -> bool {
        self.current.load().client_mode == ClientTlsMode::Require
    }

    /// TLS settings for the upstream, unless `upstream_mode = disable`.
    pub fn upstream(&self) -> Option<UpstreamTls> {
        self.current.load().upstream.clone()
    }

    /// The acceptor for the admin console's TLS, if it has a certificate (its own, else the
    /// client side's).
    pub fn console_acceptor(&self) -> Option<TlsAcceptor> {
        self.current.load().console.clone()
    }
}

/// The console's own certificate and key, when `[admin]` names them. Errors name the files.
fn console_acceptor(admin: &AdminConfig) -> anyhow::Result<Option<TlsAcceptor>> {
    let Some((cert, key)) = admin.own_tls() else {
        return Ok(None);
    };
    // The console is a TLS server like the client side: the same loader, with only the
    // certificate set.
    let config = TlsConfig {
        client_cert: Some(cert.clone()),
        client_key: Some(key.clone()),
        ..TlsConfig::default()
    };
    client_acceptor(&config).context("admin.tls_cert / admin.tls_key")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "no certificate found in {}",
        path.display()
    );
    Ok(certs)
}

fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading the private key in {}", path.display()))
}

fn client_acceptor(config: &TlsConfig) -> anyhow::Result<Option<TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&config.client_cert, &config.client_key) else {
        return Ok(None);
    };
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .with_context(|| format!("{} does not match {}", key.display(), cert.display()))?;
    // A client offering ALPN without `postgresql` is refused in the handshake (alert
    // no_application_protocol), as PostgreSQL does; a client offering none is accepted.
    server.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

fn upstream_tls(config: &TlsConfig) -> anyhow::Result<Option<UpstreamTls>> {
    let mode = config.upstream_mode;
    if mode == UpstreamTlsMode::Disable {
        return Ok(None);
    }
    let mut client = client_config(&ServerTlsSettings {
        mode,
        ca: config.upstream_ca.as_deref(),
        cert: config.upstream_cert.as_deref(),
        key: config.upstream_key.as_deref(),
        ca_key: "upstream_ca",
    })?;
    if config.upstream_negotiation == UpstreamNegotiation::Direct {
        // PostgreSQL refuses a direct handshake without it.
        client.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    }
    Ok(Some(UpstreamTls {
        mode,
        negotiation: config.upstream_negotiation,
        connector: TlsConnector::from(Arc::new(client)),
    }))
}

/// How lockguard speaks TLS to a PostgreSQL server: the proxy's upstream connections and the
/// guard's own connection both build their rustls configuration from this, with
/// [`client_config`].
pub struct ServerTlsSettings<'a> {
    pub mode: UpstreamTlsMode,
    /// CA certificate(s) the server's certificate must chain to (`verify-ca`, `verify-full`).
    pub ca: Option<&'a Path>,
    /// Client certificate and key to present, when both are set.
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    /// The setting that names `ca`, for the error when it is missing.
    pub ca_key: &'a str,
}

/// The rustls client configuration for `settings`: libpq's `sslmode` semantics (`prefer` and
/// `require` encrypt without checking the server, `verify-ca` checks the chain, `verify-full`
/// the chain and the host name). `settings.mode` must not be `disable`.
pub fn client_config(settings: &ServerTlsSettings<'_>) -> anyhow::Result<ClientConfig> {
    let mode = settings.mode;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match mode {
        UpstreamTlsMode::Disable | UpstreamTlsMode::Prefer | UpstreamTlsMode::Require => {
            // Like libpq: encryption without authentication of the server.
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCertificate(provider())))
        }
        UpstreamTlsMode::VerifyCa | UpstreamTlsMode::VerifyFull => {
            let ca_path = settings.ca.with_context(|| {
                format!(
                    "{} is required for verify-ca and verify-full",
                    settings.ca_key
                )
            })?;
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca_path)? {
                roots
                    .add(cert)
                    .with_context(|| format!("CA certificate in {}", ca_path.display()))?;
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .context("building the upstream certificate verifier")?;
            if mode == UpstreamTlsMode::VerifyCa {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            } else {
                builder.with_webpki_verifier(webpki)
            }
        }
    };
    Ok(match (settings.cert, settings.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .with_context(|| format!("{} does not match {}", key.display(), cert.display()))?,
        _ => builder.with_no_client_auth(),
    })
}

/// libpq's spelling of a mode.
fn mode_name(mode: UpstreamTlsMode) -> &'static str {
    match mode {
        UpstreamTlsMode::Disable => "disable",
        UpstreamTlsMode::Prefer => "prefer",
        UpstreamTlsMode::Require => "require",
        UpstreamTlsMode::VerifyCa => "verify-ca",
        UpstreamTlsMode::VerifyFull => "verify-full",
    }
}

/// TLS for the guard's own connections, which carry the kills and, for SCRAM over TLS, every
/// user's stored secret. A dsn with any TLS key (`sslmode`, `sslrootcert`, `sslcert`,
/// `sslkey`) decides alone, as it would for libpq (no `sslmode` there means `prefer`, and
/// `require` with an `sslrootcert` checks the chain, like `verify-ca`); a dsn without any
/// follows `[tls]` exactly as the proxy's own upstream connections do. `None`: plaintext.
pub fn guard_tls(guard: &GuardConfig, tls: &TlsConfig) -> anyhow::Result<Option<GuardTls>> {
    let dsn = guard_core::connections::dsn_tls(guard).context("guard.dsn")?;
    let (mode, ca, cert, key, source, ca_key) = if dsn.is_set() {
        anyhow::ensure!(
            dsn.cert.is_some() == dsn.key.is_some(),
            "guard.dsn: sslcert and sslkey go together"
        );
        let mode = match (dsn.mode, &dsn.root_cert) {
            (None, _) => UpstreamTlsMode::Prefer,
            (Some(UpstreamTlsMode::Require), Some(_)) => UpstreamTlsMode::VerifyCa,
            (Some(mode), _) => mode,
        };
        (
            mode,
            dsn.root_cert,
            dsn.cert,
            dsn.key,
            "guard.dsn",
            "sslrootcert in guard.dsn",
        )
    } else {
        (
            tls.upstream_mode,
            tls.upstream_ca.clone(),
            tls.upstream_cert.clone(),
            tls.upstream_key.clone(),
            "[tls] upstream_mode",
            "[tls] upstream_ca",
        )
    };
    if mode == UpstreamTlsMode::Disable {
        return Ok(None);
    }
    let config = client_config(&ServerTlsSettings {
        mode,
        ca: ca.as_deref(),
        cert: cert.as_deref(),
        key: key.as_deref(),
        ca_key,
    })
    .context("the guard's TLS settings")?;
    let checked = match (mode, &ca) {
        (UpstreamTlsMode::VerifyCa | UpstreamTlsMode::VerifyFull, Some(ca)) => {
            format!("the server's certificate checked against {}", ca.display())
        }
        _ => "the server's certificate not checked".to_owned(),
    };
    let description = format!("sslmode {} from {source}, {checked}", mode_name(mode));
    Ok(Some(GuardTls::new(mode, description, config)))
}

/// `prefer` / `require`: any certificate is accepted (signatures are still checked, so the
/// handshake itself is sound).
#[derive(Debug)]
struct AnyServerCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to `upstream_ca`; the name in the certificate is not
/// checked (libpq semantics).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
