//! Fuzzes `lockguard::startup::read_first_packet`, the first code to see a client's bytes.
//!
//! Input: byte 0's low 6 bits pick how many bytes each socket read returns (1..=63; 0 = as
//! many as asked), bit 0x40 makes the client patient (it sends each packet only after the
//! answer to the previous one, as libpq does, instead of everything at once) and the high bit
//! says whether lockguard offers TLS; the rest is what the client sends before closing. The
//! stream never blocks, so the future must finish in a single poll. Besides "no panic, no
//! hang", each outcome is checked:
//! - a StartupMessage or CancelRequest is exactly the bytes that followed the answered
//!   encryption requests, nothing more was read, and its length and code are legal;
//! - a TLS request is returned only when TLS is offered, right after the SSLRequest;
//! - the only bytes written back are 'N' answers to SSLRequests (when TLS is not offered) and
//!   GSSENCRequests, never two of the same kind in a row;
//! - bytes an impatient client sent after an answered request are refused (08P01);
//! - a rejection names a SQLSTATE lockguard uses and says it comes from lockguard;
//! - an I/O error happens only when the client's bytes ran out.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use lockguard::protocol::{sqlstate, startup_code, MAX_STARTUP_PACKET, MIN_STARTUP_PACKET};
use lockguard::startup::{read_first_packet, FirstPacket, Negotiation, StartupError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A client socket that hands out `input` `chunk` bytes at a time, then EOF, and records what
/// the proxy writes back.
struct ScriptedClient<'a> {
    input: &'a [u8],
    pos: usize,
    chunk: usize,
    /// How far the client has sent: the end of the packet it sent last (patient), or all.
    sent: usize,
    patient: bool,
    written: Vec<u8>,
}

impl ScriptedClient<'_> {
    /// Where the packet starting at `at` ends, by its length field (at least the field).
    fn packet_end(&self, at: usize) -> usize {
        match self.input.get(at..at + 4) {
            Some(len) => at.saturating_add((be32(len) as usize).max(4)),
            None => self.input.len(),
        }
        .min(self.input.len())
    }
}

impl AsyncRead for ScriptedClient<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos == self.input.len() {
            return Poll::Ready(Ok(())); // EOF: the client closed
        }
        if self.pos == self.sent {
            return Poll::Pending; // the patient client waits for an answer
        }
        let n = self.chunk.min(self.sent - self.pos).min(buf.remaining());
        let start = self.pos;
        buf.put_slice(&self.input[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ScriptedClient<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(buf);
        if self.patient {
            for _ in buf {
                self.sent = self.packet_end(self.sent);
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// The checks for one fuzz input.
pub fn check(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let offer_tls = control & 0x80 != 0;
    let patient = control & 0x40 != 0;
    let chunk = usize::from(control & 0x3F);
    let mut client = ScriptedClient {
        input,
        pos: 0,
        chunk: if chunk == 0 { usize::MAX } else { chunk },
        sent: input.len(),
        patient,
        written: Vec::new(),
    };
    if patient {
        client.sent = client.packet_end(0);
    }
    let negotiation = Negotiation::plaintext(offer_tls);
    let outcome = {
        let mut future = std::pin::pin!(read_first_packet(&mut client, negotiation));
        let mut cx = Context::from_waker(Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(outcome) => outcome,
            Poll::Pending => panic!("read_first_packet waits for bytes beyond a whole packet"),
        }
    };

    assert!(
        client.written.iter().all(|&b| b == b'N'),
        "{:?}",
        client.written
    );
    let after_negotiation = answered_requests(input, &client.written, offer_tls);
    let sent_early = !patient && !client.written.is_empty() && after_negotiation < input.len();

    check_outcome(
        outcome,
        &client,
        input,
        offer_tls,
        after_negotiation,
        sent_early,
    );
}

/// Checks that every request answered (`written`, one 'N' each) was an SSLRequest or a
/// GSSENCRequest, alternating in kind; returns where the bytes after them start.
fn answered_requests(input: &[u8], written: &[u8], offer_tls: bool) -> usize {
    // Every answered request was an SSLRequest/GSSENCRequest, alternating in kind.
    let mut after_negotiation = 0;
    let mut previous = None;
    for _ in written {
        let request = &input[after_negotiation..];
        let len = be32(request) as usize;
        assert!(
            (8..=MAX_STARTUP_PACKET).contains(&len),
            "answered length {len}"
        );
        let code = be32(&request[4..]);
        assert!(
            code == startup_code::GSSENC_REQUEST
                || (code == startup_code::SSL_REQUEST && !offer_tls),
            "answered 'N' to request {code}"
        );
        assert_ne!(
            previous,
            Some(code),
            "answered the same request twice in a row"
        );
        previous = Some(code);
        after_negotiation += len;
    }
    after_negotiation
}

/// Checks what `read_first_packet` made of the input against the bytes it consumed.
fn check_outcome(
    outcome: Result<FirstPacket, StartupError>,
    client: &ScriptedClient<'_>,
    input: &[u8],
    offer_tls: bool,
    after_negotiation: usize,
    sent_early: bool,
) {
    match outcome {
        Ok(FirstPacket::TlsRequested) => {
            assert!(offer_tls, "TLS requested although none is offered");
            let request = &input[after_negotiation..];
            let len = be32(request) as usize;
            assert!(len >= 8);
            assert_eq!(be32(&request[4..]), startup_code::SSL_REQUEST);
            assert_eq!(
                client.pos,
                after_negotiation + len,
                "read past the SSLRequest"
            );
            assert!(!sent_early, "data sent before an answer was accepted");
        }
        Ok(first) => {
            assert!(!sent_early, "data sent before an answer was accepted");
            let raw = match &first {
                FirstPacket::Startup(msg) => {
                    assert!(!msg.user.is_empty());
                    assert!(!msg.database.is_empty());
                    assert_eq!(be32(&msg.raw[4..]) >> 16, 3);
                    &msg.raw
                }
                FirstPacket::Cancel(raw) => {
                    assert_eq!(be32(&raw[4..]), startup_code::CANCEL_REQUEST);
                    raw
                }
                FirstPacket::TlsRequested => unreachable!("matched above"),
            };
            let len = be32(raw) as usize;
            assert_eq!(len, raw.len());
            assert!((MIN_STARTUP_PACKET..=MAX_STARTUP_PACKET).contains(&len));
            assert_eq!(
                raw.as_slice(),
                &input[after_negotiation..after_negotiation + len]
            );
            assert_eq!(
                client.pos,
                after_negotiation + len,
                "read past the first packet: those bytes belong to the session"
            );
        }
        Err(StartupError::Rejected {
            sqlstate: code,
            message,
        }) => {
            assert!(
                [
                    sqlstate::PROTOCOL_VIOLATION,
                    sqlstate::INVALID_AUTHORIZATION,
                    "0A000"
                ]
                .contains(&code),
                "{code}"
            );
            assert!(message.starts_with("lockguard: "), "{message}");
            assert!(client.pos <= input.len());
            if sent_early {
                assert_eq!(code, sqlstate::PROTOCOL_VIOLATION, "{message}");
            }
        }
        Err(StartupError::RejectedOldProtocol(message)) => {
            assert!(!sent_early, "data sent before an answer was accepted");
            assert!(
                message.starts_with("lockguard: unsupported frontend protocol"),
                "{message}"
            );
            assert!(be32(&input[after_negotiation + 4..]) >> 16 < 3);
        }
        Err(StartupError::Dropped(reason)) => {
            assert!(!sent_early, "data sent before an answer was accepted");
            assert!(!reason.is_empty());
            assert!(client.pos <= input.len());
        }
        Err(StartupError::Io(e)) => {
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
            assert_eq!(client.pos, input.len(), "I/O error with input left: {e}");
        }
    }
}
