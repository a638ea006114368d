//! The few pieces of the PostgreSQL v3 wire protocol that lockguard reads or writes itself.
//! Everything else passes through as bytes.

use bytes::{BufMut, BytesMut};

/// Message type bytes sent by the client (frontend).
pub mod frontend {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const EXECUTE: u8 = b'E';
    pub const SYNC: u8 = b'S';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const TERMINATE: u8 = b'X';
}

/// Message type bytes sent by the server (backend).
pub mod backend {
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const COPY_IN_RESPONSE: u8 = b'G';
}

/// Request codes of the untagged packets a client may open a connection with.
pub mod startup_code {
    /// Protocol 3.0 StartupMessage.
    pub const PROTOCOL_3_0: u32 = 196_608;
    pub const CANCEL_REQUEST: u32 = 80_877_102;
    pub const SSL_REQUEST: u32 = 80_877_103;
    pub const GSSENC_REQUEST: u32 = 80_877_104;
}

/// Smallest startup packet: length + code.
pub const MIN_STARTUP_PACKET: usize = 8;
/// Largest startup packet lockguard accepts (PostgreSQL uses the same bound).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// SQLSTATE codes lockguard itself answers with.
pub mod sqlstate {
    /// Malformed or unsupported startup.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
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

/// Encodes an ErrorResponse with severity FATAL, the given SQLSTATE and message.
pub fn fatal_error(sqlstate: &str, message: &str) -> BytesMut {
    error_response("FATAL", sqlstate, message)
}

/// Encodes an ErrorResponse. Field values must not contain NUL bytes; any that do are cut there.
pub fn error_response(severity: &str, sqlstate: &str, message: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(32 + message.len());
    out.put_u8(backend::ERROR_RESPONSE);
    out.put_u32(0); // patched below
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        out.put_u8(field);
        out.put_slice(value.split('\0').next().unwrap_or_default().as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

/// Fields of an ErrorResponse / NoticeResponse body, in order: (field type, value).
pub fn error_fields(body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let (&kind, tail) = rest.split_first()?;
        if kind == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        let value = &tail[..end];
        rest = &tail[end + 1..];
        Some((kind, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trips_through_the_field_reader() {
        let msg = fatal_error("08006", "lockguard: could not reach upstream");
        assert_eq!(msg[0], b'E');
        let len = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]) as usize;
        assert_eq!(len, msg.len() - 1);
        let fields: Vec<_> = error_fields(&msg[5..]).collect();
        assert_eq!(
            fields,
            vec![
                (b'S', &b"FATAL"[..]),
                (b'V', b"FATAL"),
                (b'C', b"08006"),
                (b'M', b"lockguard: could not reach upstream")
            ]
        );
    }
}
