//! Raw-socket helpers for tests that speak (or break) the wire protocol by hand.
//!
//! Messages are built with lockguard's own protocol module (`lockguard::protocol`), which
//! re-exports `postgres-protocol`'s frontend encoders: tests, benches and the proxy build
//! messages one way.

use std::fmt::Debug;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use lockguard::protocol::frontend::{cancel_request, startup_message as startup_packet};
pub use lockguard::protocol::startup_code::{
    CANCEL_REQUEST, GSSENC_REQUEST, PROTOCOL_3_0, PROTOCOL_3_2, SSL_REQUEST,
};
pub use lockguard::protocol::{backend, frontend, message, packet};

/// Sends an SSLRequest or a GSSENCRequest (`code`) and returns the one-byte answer.
pub async fn encryption_request(stream: &mut TcpStream, code: u32) -> u8 {
    stream
        .write_all(&frontend::encryption_request(code))
        .await
        .expect("send the encryption request");
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    answer[0]
}

/// The bytes one of `postgres-protocol`'s encoders (re-exported in
/// `lockguard::protocol::frontend`) writes, e.g. `encode(|b| frontend::sync(b))`. Panics on
/// what the encoder refuses (a NUL inside a string): a test's own input.
pub fn encode<E: Debug>(write: impl FnOnce(&mut BytesMut) -> Result<(), E>) -> Vec<u8> {
    let mut buf = BytesMut::new();
    write(&mut buf).expect("encode a test message");
    buf.to_vec()
}

/// A simple Query message.
pub fn query(sql: &str) -> Vec<u8> {
    encode(|b| frontend::query(sql, b))
}

/// Parse of `sql` as the unnamed statement, its parameters typed by `param_types` (OIDs).
pub fn parse(sql: &str, param_types: &[u32]) -> Vec<u8> {
    encode(|b| frontend::parse("", sql, param_types.iter().copied(), b))
}

/// Bind of the unnamed statement to the unnamed portal, with `params` and the results in
/// `format` (0 text, 1 binary; text is sent as no format codes at all, as libpq does).
pub fn bind(params: &[&[u8]], format: i16) -> Vec<u8> {
    let formats = if format == 0 { vec![] } else { vec![format] };
    let mut buf = BytesMut::new();
    let written = frontend::bind(
        "",
        "",
        formats.iter().copied(),
        params.iter().copied(),
        |value, buf| {
            buf.extend_from_slice(value);
            Ok(frontend::IsNull::No)
        },
        formats.iter().copied(),
        &mut buf,
    );
    assert!(written.is_ok(), "encode a Bind");
    buf.to_vec()
}

/// Describe of the unnamed portal.
pub fn describe_portal() -> Vec<u8> {
    encode(|b| frontend::describe(b'P', "", b))
}

/// Execute of the unnamed portal, all rows.
pub fn execute() -> Vec<u8> {
    encode(|b| frontend::execute("", 0, b))
}

/// A Sync message.
pub fn sync() -> Vec<u8> {
    message(frontend::SYNC, &[])
}

/// A Flush message.
pub fn flush() -> Vec<u8> {
    message(frontend::FLUSH, &[])
}

/// A Terminate message.
pub fn terminate() -> Vec<u8> {
    message(frontend::TERMINATE, &[])
}

/// One message read from the server side of a raw connection.
#[derive(Debug, Clone)]
pub struct Received {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Received {
    /// SQLSTATE and message of an ErrorResponse / NoticeResponse.
    pub fn error_fields(&self) -> (String, String) {
        let mut code = String::new();
        let mut text = String::new();
        let mut rest = &self.body[..];
        while let Some((&kind, tail)) = rest.split_first() {
            if kind == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            let value = String::from_utf8_lossy(&tail[..end]).into_owned();
            match kind {
                b'C' => code = value,
                b'M' => text = value,
                _ => {}
            }
            rest = tail.get(end + 1..).unwrap_or_default();
        }
        (code, text)
    }
}

/// Reads one message; `None` on EOF, a reset or `timeout`.
pub async fn read_message<R: AsyncRead + Unpin>(
    stream: &mut R,
    timeout: Duration,
) -> Option<Received> {
    tokio::time::timeout(timeout, read_next(stream))
        .await
        .ok()
        .flatten()
}

/// Reads one message; `None` on EOF or a reset.
async fn read_next<R: AsyncRead + Unpin>(stream: &mut R) -> Option<Received> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    stream.read_exact(&mut body).await.ok()?;
    Some(Received {
        tag: header[0],
        body,
    })
}

/// Reads messages until the connection closes (EOF or a reset) and returns them. Panics if
/// it is still open after `timeout`: callers use it to show that the peer closed it.
pub async fn read_until_close<R: AsyncRead + Unpin>(
    stream: &mut R,
    timeout: Duration,
) -> Vec<Received> {
    let mut all = Vec::new();
    let read_all = async {
        while let Some(message) = read_next(stream).await {
            all.push(message);
        }
    };
    let closed = tokio::time::timeout(timeout, read_all).await.is_ok();
    assert!(
        closed,
        "connection still open after {timeout:?}; received: {all:?}"
    );
    all
}

/// True if the peer closed the connection within `timeout` (EOF or reset), discarding data.
pub async fn closed_within<R: AsyncRead + Unpin>(stream: &mut R, timeout: Duration) -> bool {
    let wait = async {
        let mut sink = [0u8; 1024];
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.is_ok()
}

/// Logs in with trust authentication and reads up to the first ReadyForQuery.
pub async fn login(stream: &mut TcpStream, user: &str, database: &str) -> Vec<Received> {
    stream
        .write_all(&startup_packet(
            PROTOCOL_3_0,
            &[("user", user), ("database", database)],
        ))
        .await
        .expect("send startup");
    let mut seen = Vec::new();
    loop {
        let m = read_message(stream, Duration::from_secs(10))
            .await
            .expect("server answered the startup");
        let tag = m.tag;
        if tag == backend::ERROR_RESPONSE {
            panic!("login failed: {:?}", m.error_fields());
        }
        seen.push(m);
        if tag == backend::READY_FOR_QUERY {
            return seen;
        }
    }
}

/// The backend pid in the BackendKeyData of a [`login`]'s answer.
pub fn backend_pid(login: &[Received]) -> i32 {
    let key = login
        .iter()
        .find(|m| m.tag == b'K')
        .expect("BackendKeyData");
    let pid = key.body.get(..4).expect("a pid in BackendKeyData");
    i32::from_be_bytes([pid[0], pid[1], pid[2], pid[3]])
}
