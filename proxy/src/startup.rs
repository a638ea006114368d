//! The first packets of a client connection, before the session pump takes over.
//!
//! A client opens with an untagged packet (`length: u32, code: u32, ...`): an SSLRequest
//! (answered 'S' when lockguard has a certificate for clients, the TLS handshake then being the
//! caller's, otherwise 'N'), a GSSENCRequest (always 'N'), a CancelRequest (forwarded as-is by
//! the caller), or the StartupMessage, whose user / database / application_name the session
//! records. After the StartupMessage, authentication is relayed (`auth.rs`) or pumped through.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{sqlstate, startup_code, MAX_STARTUP_PACKET, MIN_STARTUP_PACKET};

/// SSLRequest and GSSENCRequest a client may send before its StartupMessage (libpq sends at
/// most one of each).
const MAX_NEGOTIATIONS: usize = 2;

/// SSLRequest and GSSENCRequest are exactly a length and a code.
const ENCRYPTION_REQUEST_LEN: usize = 8;

/// What the client opened the connection for.
#[derive(Debug)]
pub enum FirstPacket {
    /// A new session.
    Startup(StartupMessage),
    /// A CancelRequest: the raw packet, to be forwarded to the server unchanged.
    Cancel(Vec<u8>),
    /// An SSLRequest while lockguard offers TLS: the caller answers 'S', does the handshake
    /// and reads the next packet over TLS.
    TlsRequested,
}

/// A StartupMessage, kept whole for forwarding, with the parameters lockguard records.
#[derive(Debug)]
pub struct StartupMessage {
    /// The packet exactly as received, length prefix included.
    pub raw: Vec<u8>,
    pub user: String,
    pub database: String,
    pub application_name: String,
}

/// Why startup ended before a session began.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The client broke the protocol; it gets this ErrorResponse before the close.
    #[error("{message}")]
    Rejected {
        sqlstate: &'static str,
        message: String,
    },
    /// The client went away, or the socket failed.
    #[error("client socket: {0}")]
    Io(#[from] io::Error),
}

impl StartupError {
    fn rejected(sqlstate: &'static str, message: impl Into<String>) -> Self {
        StartupError::Rejected {
            sqlstate,
            message: message.into(),
        }
    }
}

/// Reads packets until a StartupMessage or CancelRequest arrives, answering encryption requests
/// with 'N' on the way — except an SSLRequest when `offer_tls`, which is returned to the caller.
/// The caller bounds the whole exchange with `startup_timeout`.
pub async fn read_first_packet<S>(
    client: &mut S,
    offer_tls: bool,
) -> Result<FirstPacket, StartupError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut answered = 0;
    loop {
        let raw = read_packet(client).await?;
        let code = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
        match code {
            // Trailing bytes would be swallowed silently if this were answered.
            startup_code::SSL_REQUEST | startup_code::GSSENC_REQUEST
                if raw.len() != ENCRYPTION_REQUEST_LEN =>
            {
                return Err(StartupError::rejected(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!(
                        "lockguard: invalid length {} of an encryption request (must be {ENCRYPTION_REQUEST_LEN})",
                        raw.len()
                    ),
                ))
            }
            startup_code::SSL_REQUEST if offer_tls => return Ok(FirstPacket::TlsRequested),
            // Refused before answering: a client must not get an 'N' followed by an error.
            startup_code::SSL_REQUEST | startup_code::GSSENC_REQUEST
                if answered == MAX_NEGOTIATIONS =>
            {
                return Err(StartupError::rejected(
                    sqlstate::PROTOCOL_VIOLATION,
                    "lockguard: too many encryption requests before the startup packet",
                ))
            }
            startup_code::SSL_REQUEST | startup_code::GSSENC_REQUEST => {
                client.write_all(b"N").await?;
                answered += 1;
            }
            startup_code::CANCEL_REQUEST => return Ok(FirstPacket::Cancel(raw)),
            _ if code >> 16 == 3 => return parse_startup(raw).map(FirstPacket::Startup),
            _ => {
                return Err(StartupError::rejected(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!(
                        "lockguard: unsupported frontend protocol {}.{}: lockguard supports 3.x",
                        code >> 16,
                        code & 0xFFFF
                    ),
                ))
            }
        }
    }
}

/// Reads one untagged packet, length prefix included, refusing lengths outside the protocol's
/// bounds before reading the body.
async fn read_packet<S: AsyncRead + Unpin>(client: &mut S) -> Result<Vec<u8>, StartupError> {
    let mut len_bytes = [0u8; 4];
    client.read_exact(&mut len_bytes).await?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    if !(MIN_STARTUP_PACKET..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(StartupError::rejected(
            sqlstate::PROTOCOL_VIOLATION,
            format!(
                "lockguard: invalid startup packet length {len} \
                 (must be {MIN_STARTUP_PACKET} to {MAX_STARTUP_PACKET} bytes)"
            ),
        ));
    }
    let mut raw = vec![0u8; len];
    raw[..4].copy_from_slice(&len_bytes);
    client.read_exact(&mut raw[4..]).await?;
    Ok(raw)
}

/// Extracts the parameters lockguard records from a StartupMessage (`name\0value\0 ... \0`).
fn parse_startup(raw: Vec<u8>) -> Result<StartupMessage, StartupError> {
    let malformed = || {
        StartupError::rejected(
            sqlstate::PROTOCOL_VIOLATION,
            "lockguard: malformed startup packet",
        )
    };
    let mut user = None;
    let mut database = None;
    let mut application_name = String::new();
    let mut rest = &raw[8..];
    loop {
        let (name, after_name) = split_cstr(rest).ok_or_else(malformed)?;
        if name.is_empty() {
            // The terminating empty name must end the packet.
            if !after_name.is_empty() {
                return Err(malformed());
            }
            break;
        }
        let (value, after_value) = split_cstr(after_name).ok_or_else(malformed)?;
        let value = String::from_utf8_lossy(value).into_owned();
        match name {
            b"user" => user = Some(value),
            b"database" => database = Some(value),
            b"application_name" => application_name = value,
            _ => {}
        }
        rest = after_value;
    }
    let user = user.filter(|u| !u.is_empty()).ok_or_else(|| {
        StartupError::rejected(
            sqlstate::INVALID_AUTHORIZATION,
            "lockguard: no user name specified in startup packet",
        )
    })?;
    // Like PostgreSQL: the database defaults to the user name.
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    Ok(StartupMessage {
        raw,
        user,
        database,
        application_name,
    })
}

/// Splits a NUL-terminated string off the front of `bytes`.
fn split_cstr(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|&b| b == 0)?;
    Some((&bytes[..end], &bytes[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = startup_code::PROTOCOL_3_0.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut raw = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        raw.extend_from_slice(&body);
        raw
    }

    #[test]
    fn startup_parameters_are_recorded_and_database_defaults_to_user() {
        let msg = parse_startup(startup_packet(&[
            ("user", "alice"),
            ("application_name", "web"),
        ]))
        .expect("valid packet");
        assert_eq!(msg.user, "alice");
        assert_eq!(msg.database, "alice");
        assert_eq!(msg.application_name, "web");
    }

    #[test]
    fn missing_user_and_truncated_packets_are_rejected() {
        assert!(matches!(
            parse_startup(startup_packet(&[("database", "db")])),
            Err(StartupError::Rejected { .. })
        ));
        let mut truncated = startup_packet(&[("user", "alice")]);
        truncated.truncate(truncated.len() - 3);
        assert!(matches!(
            parse_startup(truncated),
            Err(StartupError::Rejected { .. })
        ));
    }

    #[tokio::test]
    async fn ssl_request_is_declined_then_startup_read() {
        let (mut client, mut proxy) = tokio::io::duplex(1024);
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&startup_code::SSL_REQUEST.to_be_bytes());
        client.write_all(&ssl).await.expect("write");
        client
            .write_all(&startup_packet(&[("user", "bob"), ("database", "app")]))
            .await
            .expect("write");
        let first = read_first_packet(&mut proxy, false).await.expect("startup");
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).await.expect("answer");
        assert_eq!(&answer, b"N");
        match first {
            FirstPacket::Startup(msg) => {
                assert_eq!((msg.user.as_str(), msg.database.as_str()), ("bob", "app"))
            }
            other => panic!("expected a startup message, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_third_encryption_request_is_refused_without_an_answer() {
        let (mut client, mut proxy) = tokio::io::duplex(1024);
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&startup_code::SSL_REQUEST.to_be_bytes());
        client.write_all(&ssl.repeat(3)).await.expect("write");
        let result = read_first_packet(&mut proxy, false).await;
        assert!(
            matches!(result, Err(StartupError::Rejected { .. })),
            "{result:?}"
        );
        drop(proxy);
        let mut answers = Vec::new();
        client.read_to_end(&mut answers).await.expect("read");
        assert_eq!(answers, b"NN");
    }

    #[tokio::test]
    async fn an_encryption_request_with_trailing_bytes_is_refused() {
        for offer_tls in [false, true] {
            let (mut client, mut proxy) = tokio::io::duplex(1024);
            let mut request = 10u32.to_be_bytes().to_vec();
            request.extend_from_slice(&startup_code::SSL_REQUEST.to_be_bytes());
            request.extend_from_slice(b"xx");
            client.write_all(&request).await.expect("write");
            let result = read_first_packet(&mut proxy, offer_tls).await;
            assert!(
                matches!(result, Err(StartupError::Rejected { .. })),
                "{result:?}"
            );
        }
    }

    #[tokio::test]
    async fn absurd_lengths_are_rejected_before_reading_a_body() {
        for len in [0u32, 4, 7, 10_001, 0xFFFF_FFFF] {
            let (mut client, mut proxy) = tokio::io::duplex(64);
            client.write_all(&len.to_be_bytes()).await.expect("write");
            let result = read_first_packet(&mut proxy, false).await;
            assert!(
                matches!(result, Err(StartupError::Rejected { .. })),
                "length {len}: {result:?}"
            );
        }
    }
}
