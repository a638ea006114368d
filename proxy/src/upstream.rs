//! Opening the connection to PostgreSQL for one client session, with TLS when
//! `[tls] upstream_mode` asks for it.

use std::io;
use std::time::Duration;

use guard_core::UpstreamIdentity;
use lockguard_config::{Upstream, UpstreamNegotiation, UpstreamTlsMode};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::net::{self, Liveness};
use crate::protocol::startup_code;
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
}

/// Connects to `upstream` within `timeout`, negotiating TLS over TCP when `tls` is set (unix
/// sockets stay plaintext, as with libpq). The error says where and why, ready to be shown to
/// the client.
pub async fn connect(
    upstream: &Upstream,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
) -> Result<UpstreamStream, String> {
    let attempt = async {
        match upstream {
            Upstream::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| e.to_string())?;
                net::tune_tcp(&stream, &Liveness::UPSTREAM).map_err(|e| e.to_string())?;
                match tls {
                    Some(tls) => negotiate_tls(stream, host, tls).await,
                    None => Ok(UpstreamStream::Tcp(stream)),
                }
            }
            Upstream::Unix { .. } => {
                let path = upstream
                    .socket_path()
                    .ok_or("no socket path for a unix upstream")?;
                let stream = UnixStream::connect(path).await.map_err(|e| e.to_string())?;
                Ok(UpstreamStream::Unix(stream))
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(format!("could not connect to upstream {upstream}: {e}")),
        Err(_) => Err(format!(
            "could not connect to upstream {upstream}: timed out after {:.1}s",
            timeout.as_secs_f64()
        )),
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
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8u32.to_be_bytes());
    request[4..].copy_from_slice(&startup_code::SSL_REQUEST.to_be_bytes());
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
        b'S' => {
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| format!("invalid server name {host:?} for TLS: {e}"))?;
            let stream = tls
                .connector
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            Ok(UpstreamStream::Tls(Box::new(stream)))
        }
        b'N' if tls.mode == UpstreamTlsMode::Prefer => Ok(UpstreamStream::Tcp(stream)),
        b'N' => Err(format!(
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
