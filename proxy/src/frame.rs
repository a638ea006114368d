//! Finds message boundaries in a byte stream without buffering messages.
//!
//! After startup every PostgreSQL message is `tag: u8, length: u32 (including itself), body`.
//! The pump reads whatever the socket has, hands the bytes to a [`FrameScanner`], and writes the
//! same bytes on unchanged. The scanner only walks headers: it jumps over bodies it does not care
//! about, and for the few message types the proxy needs it reports a bounded prefix of the body:
//! straight from the caller's bytes when the prefix is there whole (the common case), else
//! copied into a small buffer of its own until the rest arrives. Messages may be split across
//! reads at any byte; the scanner keeps the little state needed to resume.

use crate::protocol::{backend, frontend};

/// What the scanner does with one message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interest {
    /// Jump over the body.
    Skip,
    /// Report the message once its first `n` body bytes (or the whole body, if shorter) are seen.
    Capture(u16),
}

/// A message the scanner reports: its tag, full body length, and a prefix of its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub tag: u8,
    pub body_len: u32,
    /// The first bytes of the body, at most the capture size of this tag.
    pub body_prefix: &'a [u8],
}

/// The stream does not follow the protocol; the session must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid message length {length} for message type {:?}", char::from(*tag))]
pub struct FrameError {
    pub tag: u8,
    pub length: u32,
}

/// PostgreSQL itself refuses messages over 1 GB; anything longer is a corrupt stream.
const MAX_MESSAGE_LEN: u32 = 0x4000_0000 + 4;
const HEADER_LEN: usize = 5;

/// Which messages a direction reports, and how much of their bodies.
pub struct Interests {
    table: [Interest; 256],
}

impl Interests {
    const fn new() -> Self {
        Interests {
            table: [Interest::Skip; 256],
        }
    }

    const fn with(mut self, tag: u8, capture: u16) -> Self {
        self.table[tag as usize] = Interest::Capture(capture);
        self
    }
}

/// Statement text kept from Query / Parse; the record truncates to 1 KiB, Parse carries a
/// statement name before the text.
const STATEMENT_CAPTURE: u16 = 1024 + 128;

/// Client → server: statements, sync points, copy ends, and the goodbye.
pub static CLIENT_INTERESTS: Interests = Interests::new()
    .with(frontend::QUERY, STATEMENT_CAPTURE)
    .with(frontend::PARSE, STATEMENT_CAPTURE)
    .with(frontend::EXECUTE, 0)
    .with(frontend::SYNC, 0)
    .with(frontend::FUNCTION_CALL, 0)
    .with(frontend::COPY_DONE, 0)
    .with(frontend::COPY_FAIL, 0)
    .with(frontend::TERMINATE, 0);

/// Server → client: backend identity, transaction status, errors, the start of COPY IN.
pub static SERVER_INTERESTS: Interests = Interests::new()
    // pid (4) + secret key: 4 bytes in protocol 3.0, up to 256 in 3.2.
    .with(backend::BACKEND_KEY_DATA, 4 + 256)
    .with(backend::READY_FOR_QUERY, 1)
    // Severity and SQLSTATE come first in practice.
    .with(backend::ERROR_RESPONSE, 64)
    .with(backend::COPY_IN_RESPONSE, 0);

/// Incremental framer for one direction of one session. See the module docs.
pub struct FrameScanner {
    interests: &'static Interests,
    header: [u8; HEADER_LEN],
    header_len: usize,
    in_body: bool,
    tag: u8,
    body_len: u32,
    /// Body bytes of the current message not yet passed.
    remaining: u32,
    /// Prefix bytes still wanted for the current message (0 when not capturing).
    capture_want: usize,
    /// A prefix that straddles two reads. Usually the prefix arrives whole and is reported
    /// straight from the caller's bytes, so this stays unallocated (idle sessions are small).
    capture: Vec<u8>,
}

impl FrameScanner {
    /// A scanner that starts at a message boundary.
    pub fn new(interests: &'static Interests) -> Self {
        FrameScanner {
            interests,
            header: [0; HEADER_LEN],
            header_len: 0,
            in_body: false,
            tag: 0,
            body_len: 0,
            remaining: 0,
            capture_want: 0,
            capture: Vec::new(),
        }
    }

    /// True when the bytes fed so far end exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        !self.in_body && self.header_len == 0
    }

    /// Scans `data`, calling `on_message` for each interesting message as soon as its captured
    /// prefix is complete. Returns an error on a length the protocol does not allow; the scanner
    /// must not be used after that.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        mut on_message: impl FnMut(Message<'_>),
    ) -> Result<(), FrameError> {
        loop {
            if self.in_body {
                if self.capture_want > 0 {
                    let take = self.capture_want.min(data.len());
                    self.capture.extend_from_slice(&data[..take]);
                    self.capture_want -= take;
                    self.remaining -= take as u32;
                    data = &data[take..];
                    if self.capture_want > 0 {
                        return Ok(());
                    }
                    on_message(Message {
                        tag: self.tag,
                        body_len: self.body_len,
                        body_prefix: &self.capture,
                    });
                }
                let skip = (self.remaining as usize).min(data.len());
                self.remaining -= skip as u32;
                data = &data[skip..];
                if self.remaining > 0 {
                    return Ok(());
                }
                self.in_body = false;
            }
            if data.is_empty() {
                return Ok(());
            }

            // At a header. Fast path: the whole header is in this chunk.
            let (tag, length) = if self.header_len == 0 && data.len() >= HEADER_LEN {
                let header = [data[0], data[1], data[2], data[3], data[4]];
                data = &data[HEADER_LEN..];
                split_header(header)
            } else {
                let take = (HEADER_LEN - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                self.header_len += take;
                data = &data[take..];
                if self.header_len < HEADER_LEN {
                    return Ok(());
                }
                self.header_len = 0;
                split_header(self.header)
            };
            if !(4..=MAX_MESSAGE_LEN).contains(&length) {
                return Err(FrameError { tag, length });
            }
            let body_len = length - 4;
            self.remaining = body_len;
            self.in_body = body_len > 0;
            if let Interest::Capture(n) = self.interests.table[tag as usize] {
                let want = (n as usize).min(body_len as usize);
                if data.len() >= want {
                    // The whole prefix is here: report it without copying.
                    on_message(Message {
                        tag,
                        body_len,
                        body_prefix: &data[..want],
                    });
                } else {
                    self.tag = tag;
                    self.body_len = body_len;
                    self.capture.clear();
                    self.capture.reserve(want);
                    self.capture_want = want;
                }
            }
        }
    }
}

fn split_header(header: [u8; HEADER_LEN]) -> (u8, u32) {
    (
        header[0],
        u32::from_be_bytes([header[1], header[2], header[3], header[4]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message as msg;

    type Seen = Vec<(u8, u32, Vec<u8>)>;

    fn scan_in_chunks(interests: &'static Interests, stream: &[u8], chunk: usize) -> Seen {
        let mut scanner = FrameScanner::new(interests);
        let mut seen = Vec::new();
        for part in stream.chunks(chunk) {
            scanner
                .feed(part, |m| {
                    seen.push((m.tag, m.body_len, m.body_prefix.to_vec()))
                })
                .unwrap();
        }
        assert!(scanner.at_boundary());
        seen
    }

    fn server_stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(msg(b'R', &[0, 0, 0, 0]));
        s.extend(msg(b'K', &[0, 0, 0x30, 0x39, 1, 2, 3, 4]));
        s.extend(msg(b'Z', b"I"));
        for i in 0..50u8 {
            s.extend(msg(b'D', &vec![i; i as usize * 7]));
        }
        s.extend(msg(b'E', b"SERROR\0C42601\0Msyntax\0\0"));
        s.extend(msg(b'Z', b"T"));
        s
    }

    #[test]
    fn reports_the_same_messages_however_the_stream_is_split() {
        let stream = server_stream();
        let whole = scan_in_chunks(&SERVER_INTERESTS, &stream, stream.len());
        let tags: Vec<u8> = whole.iter().map(|m| m.0).collect();
        assert_eq!(tags, b"KZEZ");
        assert_eq!(whole[0].2, [0, 0, 0x30, 0x39, 1, 2, 3, 4]);
        assert_eq!(whole[1].2, b"I");
        assert_eq!(whole[3].2, b"T");
        for chunk in [1, 2, 3, 4, 5, 6, 7, 13, 64, 1000] {
            assert_eq!(scan_in_chunks(&SERVER_INTERESTS, &stream, chunk), whole);
        }
    }

    #[test]
    fn captures_only_a_bounded_prefix_of_a_long_statement() {
        let query = "SELECT '".to_string() + &"x".repeat(10_000) + "'\0";
        let mut stream = msg(b'Q', query.as_bytes());
        stream.extend(msg(b'X', b""));
        for chunk in [1, 100, stream.len()] {
            let seen = scan_in_chunks(&CLIENT_INTERESTS, &stream, chunk);
            assert_eq!(seen.len(), 2);
            assert_eq!(seen[0].0, b'Q');
            assert_eq!(seen[0].1 as usize, query.len());
            assert_eq!(seen[0].2.len(), STATEMENT_CAPTURE as usize);
            assert_eq!(seen[1], (b'X', 0, vec![]));
        }
    }

    #[test]
    fn rejects_impossible_lengths() {
        for length in [0u32, 3, 0xFFFF_FFFF] {
            let mut stream = vec![b'Q'];
            stream.extend_from_slice(&length.to_be_bytes());
            let mut scanner = FrameScanner::new(&CLIENT_INTERESTS);
            let err = scanner.feed(&stream, |_| {}).unwrap_err();
            assert_eq!(err.length, length);
        }
    }

    #[test]
    fn the_error_names_the_length_and_the_message_type() {
        let err = FrameError {
            tag: b'Q',
            length: 3,
        };
        assert_eq!(
            err.to_string(),
            "invalid message length 3 for message type 'Q'"
        );
    }

    #[test]
    fn empty_bodies_are_reported_at_once() {
        let stream = [msg(b'S', b""), msg(b'S', b"")].concat();
        let seen = scan_in_chunks(&CLIENT_INTERESTS, &stream, 5);
        assert_eq!(seen.len(), 2);
    }
}
