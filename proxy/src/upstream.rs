//! Opening the connection to PostgreSQL for one client session, with TLS when
//! `[tls] upstream_mode` asks for it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use guard_core::UpstreamIdentity;
use lockguard_config::{Upstream, UpstreamNegotiation, UpstreamTlsMode};
use rustls_pki_types::ServerName;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use x509_cert::der::asn1::{Any, ContextSpecific};
use x509_cert::der::oid::db::rfc5912::{
    DSA_WITH_SHA_1, DSA_WITH_SHA_224, DSA_WITH_SHA_256, ECDSA_WITH_SHA_224, ECDSA_WITH_SHA_256,
    ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512, ID_RSASSA_PSS, ID_SHA_1, ID_SHA_224, ID_SHA_256,
    ID_SHA_384, ID_SHA_512, MD_5_WITH_RSA_ENCRYPTION, SHA_1_WITH_RSA_ENCRYPTION,
    SHA_224_WITH_RSA_ENCRYPTION, SHA_256_WITH_RSA_ENCRYPTION, SHA_384_WITH_RSA_ENCRYPTION,
    SHA_512_WITH_RSA_ENCRYPTION,
};
use x509_cert::der::oid::ObjectIdentifier;
use x509_cert::der::{Decode, Reader, TagNumber};
use x509_cert::spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;

use crate::net::{self, Liveness};
use crate::protocol::{encryption_answer, frontend};
use crate::stats::ConnectFailure;
use crate::stream::UpstreamStream;
use crate::tls::UpstreamTls;

impl UpstreamStream {
    /// How PostgreSQL sees this connection, for the guard's identity check before a kill.
    pub fn identity(&self) -> io::Result<UpstreamIdentity> {
        match self {
            UpstreamStream::Tcp(s) => Ok(UpstreamIdentity::Tcp(s.local_addr()?)),
            UpstreamStream::Tls(s) => Ok(UpstreamIdentity::Tcp(s.get_ref().0.local_addr()?)),
            UpstreamStream::Unix(_) => Ok(UpstreamIdentity::Unix),
        }
    }

    /// What a SCRAM exchange lockguard completes itself can be bound to on this connection;
    /// `None` when it is not TLS. `tls` is the setting the connection was opened with (it says
    /// whether the certificate was verified).
    pub fn channel_binding(&self, tls: Option<&UpstreamTls>) -> Option<ChannelBinding> {
        let UpstreamStream::Tls(stream) = self else {
            return None;
        };
        let certificate_verified = tls.is_some_and(|tls| {
            matches!(
                tls.mode,
                UpstreamTlsMode::VerifyCa | UpstreamTlsMode::VerifyFull
            )
        });
        let end_point = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or_else(|| "the server presented no certificate".to_owned())
            .and_then(|certificate| tls_server_end_point(certificate));
        Some(match end_point {
            Ok(hash) => ChannelBinding::EndPoint(hash),
            Err(reason) => ChannelBinding::Unavailable {
                reason,
                certificate_verified,
            },
        })
    }
}

/// lockguard's TLS connection to the server as SCRAM channel binding (RFC 5802) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelBinding {
    /// `tls-server-end-point` data (RFC 5929): the hash of the certificate the server
    /// presented. A relay that terminates TLS shows its own certificate, so a proof bound to
    /// this hash fails at the real server.
    EndPoint(Vec<u8>),
    /// The certificate yields no binding data (its signature algorithm names no hash, as with
    /// Ed25519; PostgreSQL cannot bind to such a certificate either). `certificate_verified`:
    /// `upstream_mode` checked it against a CA, so the peer is the server anyway.
    Unavailable {
        reason: String,
        certificate_verified: bool,
    },
}

/// RFC 5929's `tls-server-end-point` for a DER certificate, as PostgreSQL computes it: the
/// certificate hashed with the hash of its signature algorithm, SHA-256 when that is MD5 or
/// SHA-1. The error says why a certificate has none.
pub fn tls_server_end_point(certificate: &[u8]) -> Result<Vec<u8>, String> {
    let parsed = Certificate::from_der(certificate)
        .map_err(|e| format!("the server certificate cannot be parsed: {e}"))?;
    let hash = end_point_hash(&parsed.signature_algorithm)?;
    Ok(hash.digest(certificate))
}

/// The hashes `tls-server-end-point` may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndPointHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl EndPointHash {
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            EndPointHash::Sha224 => Sha224::digest(data).to_vec(),
            EndPointHash::Sha256 => Sha256::digest(data).to_vec(),
            EndPointHash::Sha384 => Sha384::digest(data).to_vec(),
            EndPointHash::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    /// The hash to use for a signature made with the hash `oid`; RFC 5929 upgrades SHA-1.
    fn for_hash(oid: ObjectIdentifier) -> Option<EndPointHash> {
        match oid {
            ID_SHA_1 | ID_SHA_256 => Some(EndPointHash::Sha256),
            ID_SHA_224 => Some(EndPointHash::Sha224),
            ID_SHA_384 => Some(EndPointHash::Sha384),
            ID_SHA_512 => Some(EndPointHash::Sha512),
            _ => None,
        }
    }
}

/// ecdsa-with-SHA1 (ANSI X9.62), missing from the OID database.
const ECDSA_WITH_SHA_1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.1");

fn end_point_hash(algorithm: &AlgorithmIdentifierOwned) -> Result<EndPointHash, String> {
    let hash = match algorithm.oid {
        MD_5_WITH_RSA_ENCRYPTION
        | SHA_1_WITH_RSA_ENCRYPTION
        | ECDSA_WITH_SHA_1
        | DSA_WITH_SHA_1 => EndPointHash::Sha256,
        SHA_224_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_224 | DSA_WITH_SHA_224 => EndPointHash::Sha224,
        SHA_256_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_256 | DSA_WITH_SHA_256 => EndPointHash::Sha256,
        SHA_384_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_384 => EndPointHash::Sha384,
        SHA_512_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_512 => EndPointHash::Sha512,
        ID_RSASSA_PSS => pss_hash(algorithm.parameters.as_ref())?,
        other => {
            return Err(format!(
                "the server certificate's signature algorithm {other} names no hash to bind with"
            ))
        }
    };
    Ok(hash)
}

/// The hash an RSASSA-PSS signature uses: the `hashAlgorithm` field (`[0]`, SHA-1 when
/// absent) of its parameters (RFC 4055).
fn pss_hash(parameters: Option<&Any>) -> Result<EndPointHash, String> {
    let parameters = parameters.ok_or("an RSASSA-PSS certificate without parameters")?;
    let hash = parameters
        .sequence(|reader| {
            let hash = ContextSpecific::<AlgorithmIdentifierOwned>::decode_explicit(
                reader,
                TagNumber::N0,
            )?;
            // The mask generation, salt length and trailer fields do not matter here.
            while !reader.is_finished() {
                reader.decode::<Any>()?;
            }
            Ok(hash.map(|field| field.value.oid))
        })
        .map_err(|e| format!("the server certificate's RSASSA-PSS parameters: {e}"))?
        .unwrap_or(ID_SHA_1);
    EndPointHash::for_hash(hash).ok_or_else(|| {
        format!("the server certificate's RSASSA-PSS hash {hash} is not one to bind with")
    })
}

/// Why connecting to the upstream failed. The variant is the `reason` label of
/// `lockguard_upstream_connect_errors_total` ([`ConnectError::reason`]); the text says where
/// and why, ready to be shown to the client.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing listens there (or the socket file is missing).
    #[error("could not connect to upstream {upstream}: {error}")]
    Refused { upstream: String, error: io::Error },
    /// No answer within `connect_timeout` (or the kernel gave up first).
    #[error("could not connect to upstream {upstream}: {detail}")]
    Timeout { upstream: String, detail: String },
    /// The SSLRequest or the TLS handshake failed, or the server refused TLS.
    #[error("could not connect to upstream {upstream}: {detail}")]
    Tls { upstream: String, detail: String },
    /// The upstream host name did not resolve.
    #[error("could not connect to upstream {upstream}: {error}")]
    Dns { upstream: String, error: io::Error },
    #[error("could not connect to upstream {upstream}: {detail}")]
    Other { upstream: String, detail: String },
}

impl ConnectError {
    /// The metric's label for this failure.
    pub fn reason(&self) -> ConnectFailure {
        match self {
            ConnectError::Refused { .. } => ConnectFailure::Refused,
            ConnectError::Timeout { .. } => ConnectFailure::Timeout,
            ConnectError::Tls { .. } => ConnectFailure::Tls,
            ConnectError::Dns { .. } => ConnectFailure::Dns,
            ConnectError::Other { .. } => ConnectFailure::Other,
        }
    }
}

/// A [`ConnectError`] before it is told which upstream it concerns.
#[derive(Debug)]
enum Cause {
    Refused(io::Error),
    Timeout(String),
    Tls(String),
    Dns(io::Error),
    Other(String),
}

impl Cause {
    /// A failed connect or socket call, by what the system said.
    fn io(error: io::Error) -> Cause {
        match error.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => Cause::Refused(error),
            io::ErrorKind::TimedOut => Cause::Timeout(error.to_string()),
            _ => Cause::Other(error.to_string()),
        }
    }

    fn at(self, upstream: &Upstream) -> ConnectError {
        let upstream = upstream.to_string();
        match self {
            Cause::Refused(error) => ConnectError::Refused { upstream, error },
            Cause::Timeout(detail) => ConnectError::Timeout { upstream, detail },
            Cause::Tls(detail) => ConnectError::Tls { upstream, detail },
            Cause::Dns(error) => ConnectError::Dns { upstream, error },
            Cause::Other(detail) => ConnectError::Other { upstream, detail },
        }
    }
}

/// Connects to `upstream` within `timeout`, negotiating TLS over TCP when `tls` is set (unix
/// sockets stay plaintext, as with libpq).
pub async fn connect(
    upstream: &Upstream,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
) -> Result<UpstreamStream, ConnectError> {
    let attempt = async {
        match upstream {
            Upstream::Tcp { host, port } => {
                let stream = match host.parse::<IpAddr>() {
                    Ok(ip) => TcpStream::connect((ip, *port)).await,
                    Err(_) => {
                        // Resolved apart from the connect, so a name that does not resolve
                        // is told from a server that does not answer.
                        let addresses: Vec<SocketAddr> =
                            tokio::net::lookup_host((host.as_str(), *port))
                                .await
                                .map_err(Cause::Dns)?
                                .collect();
                        TcpStream::connect(&addresses[..]).await
                    }
                }
                .map_err(Cause::io)?;
                net::tune_tcp(&stream, &Liveness::UPSTREAM).map_err(Cause::io)?;
                match tls {
                    Some(tls) => negotiate_tls(stream, host, tls).await.map_err(Cause::Tls),
                    None => Ok(UpstreamStream::Tcp(stream)),
                }
            }
            Upstream::Unix { .. } => {
                let path = upstream
                    .socket_path()
                    .ok_or_else(|| Cause::Other("no socket path for a unix upstream".into()))?;
                let stream = UnixStream::connect(path).await.map_err(Cause::io)?;
                Ok(UpstreamStream::Unix(stream))
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(cause)) => Err(cause.at(upstream)),
        Err(_) => Err(
            Cause::Timeout(format!("timed out after {:.1}s", timeout.as_secs_f64())).at(upstream),
        ),
    }
}

/// SSLRequest, then a TLS handshake if the server agrees; or, with `upstream_negotiation =
/// "direct"`, the handshake at once.
async fn negotiate_tls(
    mut stream: TcpStream,
    host: &str,
    tls: &UpstreamTls,
) -> Result<UpstreamStream, String> {
    if tls.negotiation == UpstreamNegotiation::Direct {
        return direct_tls(stream, host, tls).await;
    }
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    stream
        .write_all(&request)
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(|e| format!("no answer to SSLRequest: {e}"))?;
    match answer[0] {
        encryption_answer::ACCEPTED => {
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| format!("invalid server name {host:?} for TLS: {e}"))?;
            let stream = tls
                .connector
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            Ok(UpstreamStream::Tls(Box::new(stream)))
        }
        encryption_answer::DECLINED if tls.mode == UpstreamTlsMode::Prefer => {
            Ok(UpstreamStream::Tcp(stream))
        }
        encryption_answer::DECLINED => Err(format!(
            "the server does not support TLS, but upstream_mode is {:?}",
            tls.mode
        )),
        other => Err(format!(
            "unexpected answer {other:#04x} to SSLRequest (not a PostgreSQL server?)"
        )),
    }
}

/// Direct TLS negotiation (PostgreSQL 17+): the ClientHello is the first thing the server
/// sees, with ALPN `postgresql` (set on the connector), saving the SSLRequest's round trip.
async fn direct_tls(
    stream: TcpStream,
    host: &str,
    tls: &UpstreamTls,
) -> Result<UpstreamStream, String> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| format!("invalid server name {host:?} for TLS: {e}"))?;
    let stream = tls.connector.connect(name, stream).await.map_err(|e| {
        format!(
            "TLS handshake failed: {e} (upstream_negotiation is \"direct\", which needs \
             PostgreSQL 17 or later with ssl = on)"
        )
    })?;
    Ok(UpstreamStream::Tls(Box::new(stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `upstream_mode = "require"` over an SSLRequest.
    fn require_tls() -> UpstreamTls {
        let settings = crate::tls::ServerTlsSettings {
            mode: UpstreamTlsMode::Require,
            ca: None,
            cert: None,
            key: None,
            ca_key: "tls.upstream_ca",
        };
        let config = crate::tls::client_config(&settings).expect("client config");
        UpstreamTls {
            mode: UpstreamTlsMode::Require,
            negotiation: UpstreamNegotiation::Postgres,
            connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
        }
    }

    fn tcp(host: &str, port: u16) -> Upstream {
        Upstream::Tcp {
            host: host.to_owned(),
            port,
        }
    }

    #[tokio::test]
    async fn a_port_nobody_listens_on_is_a_refused_connect_named_in_the_error() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("address").port();
        drop(closed);
        let error = connect(&tcp("127.0.0.1", port), None, Duration::from_secs(5))
            .await
            .err()
            .expect("nothing listens there");
        assert_eq!(error.reason(), ConnectFailure::Refused);
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("could not connect to upstream 127.0.0.1:{port}: ")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_missing_socket_file_is_a_refused_connect() {
        let dir = tempfile::tempdir().expect("temp dir");
        let upstream: Upstream = format!("{}:5432", dir.path().display())
            .parse()
            .expect("unix upstream");
        let error = connect(&upstream, None, Duration::from_secs(5))
            .await
            .err()
            .expect("no socket there");
        assert_eq!(error.reason(), ConnectFailure::Refused);
    }

    #[tokio::test]
    async fn a_server_that_never_answers_the_ssl_request_is_a_timeout() {
        // Accepts (the kernel does) but never answers: the connect deadline decides.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = silent.local_addr().expect("address").port();
        let tls = require_tls();
        let error = connect(
            &tcp("127.0.0.1", port),
            Some(&tls),
            Duration::from_millis(200),
        )
        .await
        .err()
        .expect("no answer");
        assert_eq!(error.reason(), ConnectFailure::Timeout);
        assert!(
            error.to_string().ends_with("timed out after 0.2s"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_server_that_declines_tls_when_it_is_required_is_a_tls_failure() {
        let declining = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = declining.local_addr().expect("address").port();
        let server = tokio::spawn(async move {
            let (mut socket, _) = declining.accept().await.expect("accept");
            let mut request = [0u8; 8];
            socket.read_exact(&mut request).await.expect("SSLRequest");
            socket
                .write_all(&[encryption_answer::DECLINED])
                .await
                .expect("answer");
            socket
        });
        let tls = require_tls();
        let error = connect(&tcp("127.0.0.1", port), Some(&tls), Duration::from_secs(5))
            .await
            .err()
            .expect("TLS refused");
        assert_eq!(error.reason(), ConnectFailure::Tls);
        drop(server.await.expect("server"));
    }

    fn self_signed(algorithm: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(algorithm).expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .self_signed(&key)
            .expect("certificate")
            .der()
            .to_vec()
    }

    #[test]
    fn the_end_point_hash_is_the_certificate_signature_hash() {
        let p256 = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            tls_server_end_point(&p256),
            Ok(Sha256::digest(&p256).to_vec())
        );
        let p384 = self_signed(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            tls_server_end_point(&p384),
            Ok(Sha384::digest(&p384).to_vec())
        );
        // A signature without a separate hash gives nothing to bind to.
        let ed25519 = self_signed(&rcgen::PKCS_ED25519);
        let err = tls_server_end_point(&ed25519).expect_err("Ed25519");
        assert!(err.contains("names no hash"), "{err}");
        assert!(tls_server_end_point(b"not a certificate").is_err());
    }

    fn pss(parameters: &[u8]) -> Result<EndPointHash, String> {
        let parameters = Any::from_der(parameters).expect("DER");
        end_point_hash(&AlgorithmIdentifierOwned {
            oid: ID_RSASSA_PSS,
            parameters: Some(parameters),
        })
    }

    #[test]
    fn rsassa_pss_certificates_bind_with_the_hash_in_their_parameters() {
        // As `openssl req -sigopt rsa_padding_mode:pss -sha384` writes them: hash SHA-384,
        // MGF1 with SHA-384, salt length 206.
        let mut sha384: Vec<u8> = vec![
            0x30, 0x35, 0xa0, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03,
            0x04, 0x02, 0x02, 0x05, 0x00, 0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48,
            0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
            0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0xa2, 0x04, 0x02, 0x02, 0x00, 0xce,
        ];
        assert_eq!(pss(&sha384), Ok(EndPointHash::Sha384));
        // The hash OID's last arc 2 -> 3: SHA-512.
        sha384[16] = 0x03;
        assert_eq!(pss(&sha384), Ok(EndPointHash::Sha512));
        // No hashAlgorithm: the default, SHA-1, which binding upgrades to SHA-256.
        assert_eq!(pss(&[0x30, 0x00]), Ok(EndPointHash::Sha256));
        assert!(pss(&[0x05, 0x00]).is_err());
    }
}
