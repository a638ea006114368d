//! The first packets of a client connection, before the session pump takes over.
//!
//! A client opens either with a TLS ClientHello (direct TLS negotiation, PostgreSQL 17+; see
//! [`opens_with_tls_handshake`]) or with an untagged packet (`length: u32, code: u32, ...`): an
//! SSLRequest (answered 'S' when lockguard has a certificate for clients, the TLS handshake
//! then being the caller's, otherwise 'N'), a GSSENCRequest (always 'N'), a CancelRequest
//! (forwarded as-is by the caller), or the StartupMessage, whose user / database /
//! application_name the session records. After the StartupMessage, authentication is relayed
//! (`auth.rs`) or pumped through.
//!
//! Bad input gets what PostgreSQL's own startup code (`ProcessStartupPacket`) gives it, so a
//! client cannot tell lockguard from the server by its errors: an impossible length or a
//! packet cut short is logged and the connection closed without an answer; an unsupported
//! protocol, a repeated encryption request or data sent before the answer to one gets a
//! FATAL with PostgreSQL's SQLSTATE (in the old protocol's format for protocol 2 and below).

use std::io;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::protocol::{
    encryption_answer, sqlstate, startup_code, MAX_STARTUP_PACKET, MIN_STARTUP_PACKET,
};

/// The first byte of a TLS handshake record, i.e. of a ClientHello. Read as the first byte of
/// a startup packet's length it would announce hundreds of megabytes, so PostgreSQL (17+) and
/// lockguard take it as direct TLS negotiation.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What the client opened the connection for.
#[derive(Debug)]
pub enum FirstPacket {
    /// A new session.
    Startup(StartupMessage),
    /// A CancelRequest: the raw packet, to be forwarded to the server unchanged.
    Cancel(Vec<u8>),
    /// An SSLRequest while lockguard offers TLS: the caller answers 'S', does the handshake
    /// and reads the next packet over TLS with [`Negotiation::after_ssl_request`].
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
    /// The client broke the protocol; it gets this FATAL ErrorResponse before the close.
    #[error("{message}")]
    Rejected {
        sqlstate: &'static str,
        message: String,
    },
    /// A client asking for protocol 2 or older broke the protocol: PostgreSQL answers in
    /// that protocol's error format (`E`, the text, a NUL), see
    /// [`crate::protocol::backend::old_protocol_error`].
    #[error("{0}")]
    RejectedOldProtocol(String),
    /// The client broke the protocol where PostgreSQL closes without a word (it only logs
    /// why): the connection is closed without an answer, and this is the log line.
    #[error("{0}")]
    Dropped(String),
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

/// Which encryption requests a client may still make, tracked as PostgreSQL does: each of
/// SSLRequest and GSSENCRequest is answered once, a refused one may be followed by the other,
/// and a repeated one is not a request at all but an unsupported protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiation {
    /// An SSLRequest is answered 'S' (lockguard has a certificate, the connection is plain).
    offer_tls: bool,
    ssl_done: bool,
    gss_done: bool,
}

impl Negotiation {
    /// A new plaintext connection; `offer_tls` when lockguard has a certificate for clients.
    pub fn plaintext(offer_tls: bool) -> Self {
        Negotiation {
            offer_tls,
            ssl_done: false,
            gss_done: false,
        }
    }

    /// Inside TLS begun by an SSLRequest: any further encryption request is a violation.
    pub fn after_ssl_request() -> Self {
        Negotiation {
            offer_tls: false,
            ssl_done: true,
            gss_done: true,
        }
    }

    /// Inside TLS begun by a ClientHello: PostgreSQL still answers one SSLRequest ('N', TLS
    /// being in use already) and one GSSENCRequest.
    pub fn after_direct_tls() -> Self {
        Negotiation::plaintext(false)
    }
}

/// Whether the client opened with a TLS ClientHello rather than a startup packet, looking at
/// its first byte without consuming it. `None` when the client closed without sending
/// anything (PostgreSQL does not log that: health checks and port scanners do it).
pub async fn opens_with_tls_handshake(client: &TcpStream) -> io::Result<Option<bool>> {
    let mut first = [0u8; 1];
    match client.peek(&mut first).await? {
        0 => Ok(None),
        _ => Ok(Some(first[0] == TLS_HANDSHAKE_RECORD)),
    }
}

/// Reads packets until a StartupMessage or CancelRequest arrives, answering encryption requests
/// as `negotiation` allows on the way; an SSLRequest that may be answered 'S' is returned to the
/// caller instead. The caller bounds the whole exchange with `startup_timeout`.
pub async fn read_first_packet<S>(
    client: &mut S,
    negotiation: Negotiation,
) -> Result<FirstPacket, StartupError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Negotiation {
        offer_tls,
        mut ssl_done,
        mut gss_done,
    } = negotiation;
    loop {
        let raw = read_packet(client).await?;
        let code = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
        match code {
            // Any bytes after the code are ignored, as PostgreSQL does.
            startup_code::SSL_REQUEST if !ssl_done && offer_tls => {
                return Ok(FirstPacket::TlsRequested)
            }
            startup_code::SSL_REQUEST if !ssl_done => {
                decline(client, "SSL request").await?;
                (ssl_done, gss_done) = (true, false);
            }
            startup_code::GSSENC_REQUEST if !gss_done => {
                decline(client, "GSSAPI encryption request").await?;
                (ssl_done, gss_done) = (false, true);
            }
            startup_code::CANCEL_REQUEST => return Ok(FirstPacket::Cancel(raw)),
            _ if code >> 16 == 3 => return parse_startup(raw).map(FirstPacket::Startup),
            // Includes a repeated SSLRequest / GSSENCRequest: PostgreSQL reads its code
            // (1234.5679 / 1234.5680) as a protocol version then.
            _ => {
                let message = format!(
                    "lockguard: unsupported frontend protocol {}.{}: lockguard supports protocol 3",
                    code >> 16,
                    code & 0xFFFF
                );
                return Err(if code >> 16 < 3 {
                    StartupError::RejectedOldProtocol(message)
                } else {
                    StartupError::rejected(sqlstate::FEATURE_NOT_SUPPORTED, message)
                });
            }
        }
    }
}

/// Answers an encryption request with 'N'. Bytes that arrived together with the request were
/// sent before the client saw the answer — a client bug or an injection by someone in the
/// middle — and get PostgreSQL's FATAL after the 'N'.
async fn decline<S>(client: &mut S, request: &str) -> Result<(), StartupError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let early_data = has_data_ready(client).await;
    client.write_all(&[encryption_answer::DECLINED]).await?;
    if early_data {
        return Err(StartupError::rejected(
            sqlstate::PROTOCOL_VIOLATION,
            format!("lockguard: received unencrypted data after {request}"),
        ));
    }
    Ok(())
}

/// Whether the client has already sent more bytes (consuming at most one of them). Never waits.
async fn has_data_ready<S: AsyncRead + Unpin>(client: &mut S) -> bool {
    let mut byte = [0u8; 1];
    std::future::poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut byte);
        match Pin::new(&mut *client).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => Poll::Ready(!buf.filled().is_empty()),
            Poll::Ready(Err(_)) | Poll::Pending => Poll::Ready(false),
        }
    })
    .await
}

/// Reads one untagged packet, length prefix included, refusing lengths outside the protocol's
/// bounds before reading the body. A connection closed before its first byte is an `Io` error
/// (nothing worth logging: health checks do that); one cut short later is `Dropped`.
async fn read_packet<S: AsyncRead + Unpin>(client: &mut S) -> Result<Vec<u8>, StartupError> {
    let incomplete = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            StartupError::Dropped("incomplete startup packet".to_owned())
        } else {
            StartupError::Io(e)
        }
    };
    // Every packet is at least its length and a code (8 bytes), so the first read takes up to
    // 8 bytes at once without reading into the next packet (which, after an SSLRequest, may be
    // a TLS ClientHello that is not ours to consume).
    let mut header = [0u8; HEADER_LEN];
    let first = client.read(&mut header).await?;
    if first == 0 {
        return Err(StartupError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    if first < 4 {
        client
            .read_exact(&mut header[first..4])
            .await
            .map_err(incomplete)?;
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if !(MIN_STARTUP_PACKET..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(StartupError::Dropped(format!(
            "invalid startup packet length {len} (must be {MIN_STARTUP_PACKET} to \
             {MAX_STARTUP_PACKET} bytes); closing without an answer, as PostgreSQL does"
        )));
    }
    let mut raw = vec![0u8; len];
    let have = first.max(4);
    raw[..have].copy_from_slice(&header[..have]);
    client
        .read_exact(&mut raw[have..])
        .await
        .map_err(incomplete)?;
    Ok(raw)
}

/// What the first read of a packet takes at most: the length and the code.
const HEADER_LEN: usize = 8;
const _: () = assert!(MIN_STARTUP_PACKET >= HEADER_LEN);

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
    use crate::protocol::frontend::{encryption_request as request, startup_message};
    use crate::protocol::packet;

    fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
        startup_message(startup_code::PROTOCOL_3_0, params)
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

    /// Plays a client that sends each packet of `script` only after reading the one-byte
    /// answer to the previous one (as libpq does), against `read_first_packet`. Returns its
    /// result and every byte lockguard wrote.
    async fn converse(
        negotiation: Negotiation,
        script: &[Vec<u8>],
    ) -> (Result<FirstPacket, StartupError>, Vec<u8>) {
        let (mut client, mut proxy) = tokio::io::duplex(16 * 1024);
        let client_side = async move {
            let mut answers = Vec::new();
            for (i, packet) in script.iter().enumerate() {
                if client.write_all(packet).await.is_err() {
                    break;
                }
                let is_request = packet.len() >= 8
                    && matches!(
                        u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]),
                        startup_code::SSL_REQUEST | startup_code::GSSENC_REQUEST
                    );
                if is_request && i + 1 < script.len() {
                    let mut answer = [0u8; 1];
                    if client.read_exact(&mut answer).await.is_err() {
                        break;
                    }
                    answers.push(answer[0]);
                }
            }
            client.shutdown().await.expect("close the client's side");
            client
                .read_to_end(&mut answers)
                .await
                .expect("read the rest");
            answers
        };
        let proxy_side = async move {
            let result = read_first_packet(&mut proxy, negotiation).await;
            drop(proxy);
            result
        };
        tokio::join!(proxy_side, client_side)
    }

    fn startup_user(first: &Result<FirstPacket, StartupError>) -> Option<&str> {
        match first {
            Ok(FirstPacket::Startup(msg)) => Some(msg.user.as_str()),
            _ => None,
        }
    }

    fn sqlstate_of(result: &Result<FirstPacket, StartupError>) -> Option<&'static str> {
        match result {
            Err(StartupError::Rejected { sqlstate, .. }) => Some(sqlstate),
            _ => None,
        }
    }

    #[tokio::test]
    async fn ssl_request_is_declined_then_startup_read() {
        let startup = startup_packet(&[("user", "bob"), ("database", "app")]);
        let (first, answers) = converse(
            Negotiation::plaintext(false),
            &[request(startup_code::SSL_REQUEST), startup],
        )
        .await;
        assert_eq!(answers, b"N");
        assert_eq!(startup_user(&first), Some("bob"), "{first:?}");
    }

    #[tokio::test]
    async fn a_refused_request_may_be_followed_by_the_other_kind_as_often_as_postgres_allows() {
        let startup = startup_packet(&[("user", "bob")]);
        let (first, answers) = converse(
            Negotiation::plaintext(false),
            &[
                request(startup_code::GSSENC_REQUEST),
                request(startup_code::SSL_REQUEST),
                request(startup_code::GSSENC_REQUEST),
                startup,
            ],
        )
        .await;
        assert_eq!(answers, b"NNN");
        assert_eq!(startup_user(&first), Some("bob"), "{first:?}");
    }

    #[tokio::test]
    async fn a_repeated_encryption_request_is_an_unsupported_protocol() {
        for code in [startup_code::SSL_REQUEST, startup_code::GSSENC_REQUEST] {
            let (first, answers) = converse(
                Negotiation::plaintext(false),
                &[request(code), request(code)],
            )
            .await;
            assert_eq!(answers, b"N");
            assert_eq!(
                sqlstate_of(&first),
                Some(sqlstate::FEATURE_NOT_SUPPORTED),
                "{first:?}"
            );
        }
        // Inside TLS begun by an SSLRequest, no request is answered at all.
        for code in [startup_code::SSL_REQUEST, startup_code::GSSENC_REQUEST] {
            let (first, answers) =
                converse(Negotiation::after_ssl_request(), &[request(code)]).await;
            assert_eq!(answers, b"");
            assert_eq!(
                sqlstate_of(&first),
                Some(sqlstate::FEATURE_NOT_SUPPORTED),
                "{first:?}"
            );
        }
        // Inside direct TLS, one SSLRequest is still answered 'N'.
        let startup = startup_packet(&[("user", "bob")]);
        let (first, answers) = converse(
            Negotiation::after_direct_tls(),
            &[request(startup_code::SSL_REQUEST), startup],
        )
        .await;
        assert_eq!(answers, b"N");
        assert_eq!(startup_user(&first), Some("bob"), "{first:?}");
    }

    #[tokio::test]
    async fn data_sent_before_the_answer_to_a_request_is_refused_after_the_answer() {
        for code in [startup_code::SSL_REQUEST, startup_code::GSSENC_REQUEST] {
            let mut pipelined = request(code);
            pipelined.extend_from_slice(&startup_packet(&[("user", "mallory")]));
            let (first, answers) = converse(Negotiation::plaintext(false), &[pipelined]).await;
            assert_eq!(answers, b"N");
            assert_eq!(
                sqlstate_of(&first),
                Some(sqlstate::PROTOCOL_VIOLATION),
                "{first:?}"
            );
        }
    }

    #[tokio::test]
    async fn bytes_after_an_encryption_request_code_are_ignored_as_postgres_does() {
        let request = packet(startup_code::SSL_REQUEST, b"xx");
        let (first, _) =
            converse(Negotiation::plaintext(true), std::slice::from_ref(&request)).await;
        assert!(matches!(first, Ok(FirstPacket::TlsRequested)), "{first:?}");
        let startup = startup_packet(&[("user", "bob")]);
        let (first, answers) = converse(Negotiation::plaintext(false), &[request, startup]).await;
        assert_eq!(answers, b"N");
        assert_eq!(startup_user(&first), Some("bob"), "{first:?}");
    }

    #[tokio::test]
    async fn absurd_lengths_are_dropped_without_an_answer_before_reading_a_body() {
        for len in [0u32, 4, 7, 10_001, 0xFFFF_FFFF] {
            let (first, answers) =
                converse(Negotiation::plaintext(false), &[len.to_be_bytes().to_vec()]).await;
            assert!(
                matches!(first, Err(StartupError::Dropped(_))),
                "length {len}: {first:?}"
            );
            assert_eq!(answers, b"", "length {len}");
        }
    }

    #[tokio::test]
    async fn packets_cut_short_are_dropped_and_silence_is_just_a_close() {
        let (first, _) = converse(Negotiation::plaintext(false), &[]).await;
        assert!(matches!(first, Err(StartupError::Io(_))), "{first:?}");
        for cut in [vec![0u8, 0], vec![0, 0, 0, 100, 0, 3, 0, 0]] {
            let (first, answers) = converse(Negotiation::plaintext(false), &[cut]).await;
            assert!(matches!(first, Err(StartupError::Dropped(_))), "{first:?}");
            assert_eq!(answers, b"");
        }
    }

    #[tokio::test]
    async fn unsupported_protocols_are_refused_in_the_format_postgres_uses() {
        let packet = |code: u32| startup_message(code, &[("user", "bob")]);
        let (first, _) = converse(Negotiation::plaintext(false), &[packet(2 << 16)]).await;
        assert!(
            matches!(first, Err(StartupError::RejectedOldProtocol(_))),
            "{first:?}"
        );
        let (first, _) = converse(Negotiation::plaintext(false), &[packet(1234 << 16)]).await;
        assert_eq!(
            sqlstate_of(&first),
            Some(sqlstate::FEATURE_NOT_SUPPORTED),
            "{first:?}"
        );
    }
}
