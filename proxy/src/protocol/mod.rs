//! The PostgreSQL v3 wire protocol, as far as lockguard reads or writes it itself. Everything
//! else passes through as bytes ([`crate::frame`] finds message boundaries without decoding).
//!
//! - [`frontend`]: what a client sends — message tags, and encoders for the messages lockguard
//!   writes as the server's client (SASL, SSLRequest) and tests write as a client;
//! - [`backend`]: what a server sends — message tags, authentication request codes, and the one
//!   writer of ErrorResponse / NoticeResponse and the reader of their fields;
//! - this module: the codes of the untagged startup packets, the SQLSTATEs lockguard answers
//!   with, and the length-prefixed framing every encoder above builds on ([`put_message`],
//!   [`put_packet`]).
//!
//! Where `postgres-protocol` (the crate tokio-postgres speaks through) has an encoder, the
//! frontend module uses it; what it lacks — any protocol version but 3.0, 3.2's long cancel
//! keys, GSSENCRequest, every backend message — is written here.

use bytes::{BufMut, BytesMut};

pub mod backend;
pub mod frontend;

pub use backend::{error_fields, error_response, fatal_error};

/// Request codes of the untagged packets a client may open a connection with.
pub mod startup_code {
    /// Protocol 3.0 StartupMessage (major 3 in the high 16 bits, minor 0 in the low).
    pub const PROTOCOL_3_0: u32 = 3 << 16;
    /// Protocol 3.2 StartupMessage (PostgreSQL 18: long cancel keys).
    pub const PROTOCOL_3_2: u32 = (3 << 16) | 2;
    pub const CANCEL_REQUEST: u32 = 80_877_102;
    pub const SSL_REQUEST: u32 = 80_877_103;
    pub const GSSENC_REQUEST: u32 = 80_877_104;
}

/// The one-byte answers to an SSLRequest or GSSENCRequest.
pub mod encryption_answer {
    /// Go ahead: the TLS (or GSSAPI) handshake follows.
    pub const ACCEPTED: u8 = b'S';
    /// Not here: the client may go on in plaintext or try the other kind.
    pub const DECLINED: u8 = b'N';
}

/// Smallest startup packet: length + code.
pub const MIN_STARTUP_PACKET: usize = 8;
/// Largest startup packet lockguard accepts (PostgreSQL uses the same bound).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// SQLSTATE codes lockguard itself answers with.
pub mod sqlstate {
    /// Malformed or unsupported startup.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// A protocol version lockguard does not speak (PostgreSQL's `ERRCODE_FEATURE_NOT_SUPPORTED`).
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// Upstream unreachable.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// `max_clients` reached.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// Session ended by lockguard (guard, operator, shutdown).
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// TLS or other policy refusal.
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// A wrong password (when lockguard checks it itself).
    pub const INVALID_PASSWORD: &str = "28P01";
}

/// A buffer messages are built in: `Vec<u8>` (tests, relayed authentication) or `BytesMut`
/// (what `postgres-protocol`'s encoders write into).
pub trait MessageBuf: BufMut + AsMut<[u8]> {
    /// Bytes written so far.
    fn written(&self) -> usize;
}

impl MessageBuf for Vec<u8> {
    fn written(&self) -> usize {
        self.len()
    }
}

impl MessageBuf for BytesMut {
    fn written(&self) -> usize {
        self.len()
    }
}

/// Appends a tagged message: `tag`, the length (counting itself), then what `body` writes.
pub fn put_message<B: MessageBuf>(out: &mut B, tag: u8, body: impl FnOnce(&mut B)) {
    out.put_u8(tag);
    put_packet(out, body);
}

/// Appends an untagged packet (the startup phase's: StartupMessage, SSLRequest,
/// CancelRequest...): the length (counting itself), then what `body` writes.
pub fn put_packet<B: MessageBuf>(out: &mut B, body: impl FnOnce(&mut B)) {
    let start = out.written();
    out.put_u32(0); // patched once the body is written
    body(out);
    // Messages lockguard writes are small; a length past u32 would be a bug, and saturating
    // keeps it from wrapping into a plausible one.
    let len = u32::try_from(out.written() - start).unwrap_or(u32::MAX);
    out.as_mut()[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// A tagged message with `body` as it is.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    put_message(&mut out, tag, |out| out.put_slice(body));
    out
}

/// An untagged packet: `code` (a protocol version or a request code), then `rest` as it is.
pub fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + rest.len());
    put_packet(&mut out, |out| {
        out.put_u32(code);
        out.put_slice(rest);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_count_themselves_but_not_the_tag() {
        assert_eq!(message(b'Q', b"x\0"), b"Q\0\0\0\x06x\0");
        assert_eq!(message(b'X', b""), b"X\0\0\0\x04");
        assert_eq!(
            packet(startup_code::SSL_REQUEST, &[]),
            [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]
        );
        assert_eq!(startup_code::PROTOCOL_3_0, 196_608);
    }

    #[test]
    fn messages_append_to_what_the_buffer_holds() {
        let mut out = BytesMut::from(&b"Z\0\0\0\x05I"[..]);
        put_message(&mut out, b'S', |_| {});
        assert_eq!(&out[..], b"Z\0\0\0\x05IS\0\0\0\x04");
    }
}
