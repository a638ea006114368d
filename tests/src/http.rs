//! A minimal HTTP/1.1 client for lockguard's admin endpoint: one request per connection
//! (`Connection: close`), the whole answer read, a chunked body decoded. Tests need exact
//! control of the request line and headers (the `Host` of a DNS-rebinding page, a missing
//! token), which is why this is written out rather than taken from an HTTP client crate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long an answer may take before the test fails.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// An answer: status, headers (names lower-cased) and the body, de-chunked.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Response {
    /// The body as JSON; panics (showing the body) if it is not.
    pub fn json(&self) -> serde_json::Value {
        json(&self.body)
    }
}

/// One request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The `Host` header; `None` addresses the endpoint by its IP, as a scraper does.
    pub host: Option<&'a str>,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<&'a str>,
}

impl<'a> Request<'a> {
    pub fn new(method: &'a str, path: &'a str) -> Request<'a> {
        Request {
            method,
            path,
            host: None,
            token: None,
        }
    }

    pub fn get(path: &'a str) -> Request<'a> {
        Request::new("GET", path)
    }

    pub fn host(self, host: &'a str) -> Request<'a> {
        Request {
            host: Some(host),
            ..self
        }
    }

    pub fn token(self, token: Option<&'a str>) -> Request<'a> {
        Request { token, ..self }
    }

    /// Sends the request on a fresh connection to `addr` and reads the whole answer; panics
    /// if there is none within 10 s or it is not HTTP.
    pub async fn send(self, addr: SocketAddr) -> Response {
        let what = format!("{} {}", self.method, self.path);
        let host = self.host.map_or_else(|| addr.to_string(), str::to_owned);
        let auth = self
            .token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{} {} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.method, self.path
        );
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = tokio::time::timeout(ANSWER_WITHIN, exchange)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within {ANSWER_WITHIN:?}"))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        parse_response(&answer).unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

/// `GET path` addressed by IP, without a token.
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    Request::get(path).send(addr).await
}

/// Status line, headers, body (de-chunked when the answer says so).
pub fn parse_response(answer: &[u8]) -> Result<Response, String> {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&answer[..split]).map_err(|_| "headers not UTF-8")?;
    let body = &answer[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {status_line:?}"))?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    let body = String::from_utf8(body).map_err(|_| "body not UTF-8")?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// The payload of a chunked body, up to its last (empty) chunk.
pub fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("no chunk size line")?;
        let size = std::str::from_utf8(&body[..line_end])
            .ok()
            .and_then(|size| usize::from_str_radix(size.trim(), 16).ok())
            .ok_or("chunk size not hex")?;
        let rest = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("chunk shorter than its size")?;
        out.extend_from_slice(chunk);
        body = rest[size..]
            .strip_prefix(b"\r\n")
            .ok_or("no CRLF after a chunk")?;
    }
}

/// `body` as JSON; panics (showing the body) if it is not.
pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_answer_is_decoded() {
        let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let response = parse_response(answer).expect("parses");
        assert_eq!(response.status, 200);
        assert_eq!(response.body, "abcde");
    }

    #[test]
    fn a_truncated_chunk_is_an_error() {
        assert!(dechunk(b"5\r\nab").is_err());
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
