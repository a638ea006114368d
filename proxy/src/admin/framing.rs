//! A length limit on what a console client may send, enforced on the bytes as they arrive.
//!
//! pgwire buffers a whole message before decoding it and accepts frames of up to 1 GiB, also
//! before authentication: a few unauthenticated connections declaring huge messages could
//! make the proxy buffer gigabytes. Admin commands are tiny, so [`LimitedFraming`] follows
//! the PostgreSQL framing of the client's byte stream — untagged startup packets (SSLRequest
//! and GSSENCRequest may come before the StartupMessage), then `tag, length, body` messages —
//! and fails the read as soon as a header declares more than the console accepts. Nothing
//! big is ever buffered: the declared length is checked before any of the body is read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::protocol::{startup_code, MAX_STARTUP_PACKET, MIN_STARTUP_PACKET};

/// Longest message (length field included) a console client may send after startup. The
/// longest admin command is a few dozen bytes; SCRAM messages are a few hundred.
pub const MAX_CONSOLE_MESSAGE: usize = 64 * 1024;

/// A header that declares a length the console does not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// A startup packet (or SSL/GSS request) outside `MIN_STARTUP_PACKET..=MAX_STARTUP_PACKET`.
    #[error(
        "invalid startup packet length {0} (must be {MIN_STARTUP_PACKET} to {MAX_STARTUP_PACKET} bytes)"
    )]
    StartupLength(u32),
    /// A message whose length is below 4 or above [`MAX_CONSOLE_MESSAGE`].
    #[error(
        "invalid message length {length} for message type {tag:?}: the admin console accepts \
         messages of at most {MAX_CONSOLE_MESSAGE} bytes",
        tag = char::from(*.tag)
    )]
    MessageLength { tag: u8, length: u32 },
}

impl FramingError {
    /// The framing error behind an I/O error from [`LimitedFraming`], if that is what it is.
    pub fn from_io(error: &io::Error) -> Option<FramingError> {
        error.get_ref()?.downcast_ref::<FramingError>().copied()
    }
}

/// Where the scanner is in the client's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Untagged packets: `length: u32, code: u32, ...`.
    Startup,
    /// `tag: u8, length: u32, ...`.
    Messages,
}

impl Phase {
    /// Bytes of header the scanner reads before it can judge a packet.
    fn header_len(self) -> usize {
        match self {
            // Length and request code: the code tells an SSL/GSS request (more untagged
            // packets follow) from the StartupMessage or CancelRequest (messages follow).
            Phase::Startup => MIN_STARTUP_PACKET,
            Phase::Messages => 5,
        }
    }
}

/// Follows packet boundaries in a byte stream split at arbitrary points, checking each
/// declared length.
#[derive(Debug)]
struct FrameLimit {
    phase: Phase,
    header: [u8; MIN_STARTUP_PACKET],
    header_have: usize,
    /// Body bytes of the current packet still to come.
    body_left: usize,
}

impl FrameLimit {
    fn new() -> FrameLimit {
        FrameLimit {
            phase: Phase::Startup,
            header: [0; MIN_STARTUP_PACKET],
            header_have: 0,
            body_left: 0,
        }
    }

    /// Accounts for `bytes`, the next bytes of the stream.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), FramingError> {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skip = self.body_left.min(bytes.len());
                self.body_left -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            let wanted = self.phase.header_len();
            let take = (wanted - self.header_have).min(bytes.len());
            self.header[self.header_have..self.header_have + take].copy_from_slice(&bytes[..take]);
            self.header_have += take;
            bytes = &bytes[take..];
            if self.header_have == wanted {
                self.header_have = 0;
                self.body_left = self.judge_header()?;
            }
        }
        Ok(())
    }

    /// Checks a complete header; returns how many body bytes follow it.
    fn judge_header(&mut self) -> Result<usize, FramingError> {
        let h = self.header;
        match self.phase {
            Phase::Startup => {
                let length = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let code = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                let size = length as usize;
                if !(MIN_STARTUP_PACKET..=MAX_STARTUP_PACKET).contains(&size) {
                    return Err(FramingError::StartupLength(length));
                }
                if !matches!(
                    code,
                    startup_code::SSL_REQUEST | startup_code::GSSENC_REQUEST
                ) {
                    self.phase = Phase::Messages;
                }
                Ok(size - MIN_STARTUP_PACKET)
            }
            Phase::Messages => {
                let tag = h[0];
                let length = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
                let size = length as usize;
                if !(4..=MAX_CONSOLE_MESSAGE).contains(&size) {
                    return Err(FramingError::MessageLength { tag, length });
                }
                Ok(size - 4)
            }
        }
    }
}

/// A client stream whose reads fail with a [`FramingError`] (as `InvalidData`) once the
/// client declares a packet longer than the console accepts. Writes pass through.
#[derive(Debug)]
pub struct LimitedFraming<S> {
    inner: S,
    limit: FrameLimit,
    /// Set once the limit was broken: every later read fails the same way.
    broken: Option<FramingError>,
}

impl<S> LimitedFraming<S> {
    /// Wraps a client stream that is at its very start (no byte read yet).
    pub fn new(inner: S) -> LimitedFraming<S> {
        LimitedFraming {
            inner,
            limit: FrameLimit::new(),
            broken: None,
        }
    }
}

impl<S> LimitedFraming<S> {
    /// The wrapped stream, e.g. to start TLS on it after an SSLRequest.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

fn invalid(error: FramingError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

impl<S: AsyncRead + Unpin> AsyncRead for LimitedFraming<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.broken {
            return Poll::Ready(Err(invalid(error)));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Err(error) = this.limit.feed(&buf.filled()[before..]) {
                    // Hand nothing of this read on: the caller must not buffer toward it.
                    buf.set_filled(before);
                    this.broken = Some(error);
                    return Poll::Ready(Err(invalid(error)));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LimitedFraming<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{message as tagged, packet as untagged};
    use tokio::io::AsyncReadExt;

    fn header(tag: u8, length: u32) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&length.to_be_bytes());
        v
    }

    /// A login as psql sends it: SSLRequest, GSSENCRequest, StartupMessage, then messages.
    fn session() -> Vec<u8> {
        let mut s = untagged(startup_code::SSL_REQUEST, &[]);
        s.extend(untagged(startup_code::GSSENC_REQUEST, &[]));
        s.extend(untagged(
            startup_code::PROTOCOL_3_0,
            b"user\0ops\0database\0lockguard\0\0",
        ));
        s.extend(tagged(b'p', &[b'x'; 300]));
        s.extend(tagged(b'Q', b"SHOW CLIENTS\0"));
        s.extend(tagged(b'Q', &vec![b' '; MAX_CONSOLE_MESSAGE - 5]));
        s.extend(tagged(b'S', &[]));
        s.extend(tagged(b'X', &[]));
        s
    }

    fn feed_in_chunks(stream: &[u8], chunk: usize) -> Result<(), FramingError> {
        let mut limit = FrameLimit::new();
        for part in stream.chunks(chunk) {
            limit.feed(part)?;
        }
        assert_eq!(
            (limit.header_have, limit.body_left),
            (0, 0),
            "ends at a boundary"
        );
        Ok(())
    }

    #[test]
    fn a_normal_session_passes_whatever_the_split() {
        let stream = session();
        for chunk in [1, 2, 3, 5, 7, 8, 13, 64, 4096, stream.len()] {
            assert_eq!(feed_in_chunks(&stream, chunk), Ok(()), "chunk {chunk}");
        }
    }

    #[test]
    fn a_huge_message_is_refused_at_its_header() {
        let mut stream = untagged(startup_code::PROTOCOL_3_0, b"user\0ops\0\0");
        stream.extend(header(b'Q', 500_000_000));
        for chunk in [1, 3, 4096] {
            assert_eq!(
                feed_in_chunks(&stream, chunk),
                Err(FramingError::MessageLength {
                    tag: b'Q',
                    length: 500_000_000
                }),
                "chunk {chunk}"
            );
        }
        let mut just_over = untagged(startup_code::PROTOCOL_3_0, b"user\0ops\0\0");
        just_over.extend(header(b'p', MAX_CONSOLE_MESSAGE as u32 + 1));
        assert!(feed_in_chunks(&just_over, 1).is_err());
        let mut too_short = untagged(startup_code::PROTOCOL_3_0, b"user\0ops\0\0");
        too_short.extend(header(b'Q', 3));
        assert!(feed_in_chunks(&too_short, 1).is_err());
    }

    #[test]
    fn startup_packets_are_bounded_like_the_proxys() {
        let mut big = (MAX_STARTUP_PACKET as u32 + 1).to_be_bytes().to_vec();
        big.extend_from_slice(&startup_code::PROTOCOL_3_0.to_be_bytes());
        assert_eq!(
            feed_in_chunks(&big, 2),
            Err(FramingError::StartupLength(MAX_STARTUP_PACKET as u32 + 1))
        );
        // A huge packet after an SSLRequest is still a startup packet.
        let mut after_ssl = untagged(startup_code::SSL_REQUEST, &[]);
        after_ssl.extend_from_slice(&1_000_000u32.to_be_bytes());
        after_ssl.extend_from_slice(&startup_code::PROTOCOL_3_0.to_be_bytes());
        assert_eq!(
            feed_in_chunks(&after_ssl, 5),
            Err(FramingError::StartupLength(1_000_000))
        );
        // A TLS ClientHello sent straight away reads as an absurd length.
        assert!(feed_in_chunks(&[0x16, 3, 1, 2, 0, 1, 0, 0], 8).is_err());
        let tiny = [0, 0, 0, 4, 0, 0, 0, 0];
        assert_eq!(
            feed_in_chunks(&tiny, 8),
            Err(FramingError::StartupLength(4))
        );
    }

    #[tokio::test]
    async fn reads_fail_with_the_framing_error_and_hand_on_nothing_of_that_read() {
        let mut stream = untagged(startup_code::PROTOCOL_3_0, b"user\0ops\0\0");
        let startup_len = stream.len();
        stream.extend(header(b'Q', 500_000_000));
        stream.extend(vec![b'x'; 1000]);
        let mut reader = LimitedFraming::new(&stream[..]);
        let mut first = vec![0u8; startup_len];
        reader
            .read_exact(&mut first)
            .await
            .expect("the startup packet");
        let mut rest = Vec::new();
        let error = reader.read_to_end(&mut rest).await.expect_err("too long");
        assert!(rest.is_empty(), "{} bytes handed on", rest.len());
        assert_eq!(
            FramingError::from_io(&error),
            Some(FramingError::MessageLength {
                tag: b'Q',
                length: 500_000_000
            })
        );
        let again = reader.read(&mut [0u8; 16]).await.expect_err("stays broken");
        assert!(FramingError::from_io(&again).is_some());
    }
}
