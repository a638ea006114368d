//! Raw-socket helpers for tests that speak (or break) the wire protocol by hand.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A StartupMessage for `user` on `database` with protocol `version` (3.0 = 196608).
pub fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (name, value) in params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// SSLRequest's code.
pub const SSL_REQUEST: u32 = 80_877_103;
/// GSSENCRequest's code.
pub const GSSENC_REQUEST: u32 = 80_877_104;

/// Sends an SSLRequest or a GSSENCRequest (`code`) and returns the one-byte answer.
pub async fn encryption_request(stream: &mut TcpStream, code: u32) -> u8 {
    let mut request = 8u32.to_be_bytes().to_vec();
    request.extend_from_slice(&code.to_be_bytes());
    stream
        .write_all(&request)
        .await
        .expect("send the encryption request");
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    answer[0]
}

/// A tagged message.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A simple Query message.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
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
            196_608,
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
        if tag == b'E' {
            panic!("login failed: {:?}", m.error_fields());
        }
        seen.push(m);
        if tag == b'Z' {
            return seen;
        }
    }
}
