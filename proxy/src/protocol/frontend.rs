//! What a PostgreSQL client sends: message tags, and encoders for the messages lockguard
//! writes as the server's client and tests write as an application.
//!
//! The tagged messages come from `postgres-protocol` (re-exported here, so the whole workspace
//! builds them one way); the startup-phase packets it cannot write — any protocol version but
//! 3.0, GSSENCRequest, protocol 3.2's long cancel keys — are lockguard's own.

use bytes::BufMut;

pub use postgres_protocol::message::frontend::{
    bind, close, copy_done, copy_fail, describe, execute, flush, parse, password_message, query,
    sasl_initial_response, sasl_response, ssl_request, sync, terminate, BindError, CopyData,
};
pub use postgres_protocol::IsNull;

use super::{packet, put_packet, startup_code};

pub const BIND: u8 = b'B';
pub const COPY_DONE: u8 = b'c';
pub const COPY_DATA: u8 = b'd';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const COPY_FAIL: u8 = b'f';
pub const FUNCTION_CALL: u8 = b'F';
pub const FLUSH: u8 = b'H';
pub const PARSE: u8 = b'P';
/// PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse share this tag.
pub const PASSWORD_MESSAGE: u8 = b'p';
pub const QUERY: u8 = b'Q';
pub const SYNC: u8 = b'S';
pub const TERMINATE: u8 = b'X';

/// A StartupMessage asking for protocol `version` (e.g. [`startup_code::PROTOCOL_3_0`]) with
/// `params` (`user`, `database`, ...) in order.
pub fn startup_message(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_packet(&mut out, |out| {
        out.put_u32(version);
        for (name, value) in params {
            out.put_slice(name.as_bytes());
            out.put_u8(0);
            out.put_slice(value.as_bytes());
            out.put_u8(0);
        }
        out.put_u8(0);
    });
    out
}

/// An SSLRequest or GSSENCRequest: a packet of its `code` alone.
pub fn encryption_request(code: u32) -> Vec<u8> {
    packet(code, &[])
}

/// A CancelRequest for backend `pid` with its secret `key` (4 bytes in protocol 3.0, up to 256
/// in 3.2).
pub fn cancel_request(pid: i32, key: &[u8]) -> Vec<u8> {
    let mut rest = pid.to_be_bytes().to_vec();
    rest.extend_from_slice(key);
    packet(startup_code::CANCEL_REQUEST, &rest)
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    #[test]
    fn a_startup_message_ends_with_an_empty_name() {
        let startup = startup_message(startup_code::PROTOCOL_3_0, &[("user", "u")]);
        assert_eq!(startup, b"\0\0\0\x10\0\x03\0\0user\0u\0\0");
    }

    #[test]
    fn cancel_requests_carry_keys_of_any_length() {
        let short = cancel_request(42, &[1, 2, 3, 4]);
        let mut expected = BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(42, 0x0102_0304, &mut expected);
        assert_eq!(short, expected.to_vec());
        let long = cancel_request(42, &[7; 32]);
        assert_eq!(long.len(), 12 + 32);
        assert_eq!(long[..4], 44u32.to_be_bytes());
    }

    #[test]
    fn our_ssl_request_matches_postgres_protocol() {
        let mut expected = BytesMut::new();
        ssl_request(&mut expected);
        assert_eq!(
            encryption_request(startup_code::SSL_REQUEST),
            expected.to_vec()
        );
    }
}
