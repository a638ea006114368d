//! What a PostgreSQL server sends: message tags, authentication request codes, and the
//! messages lockguard writes in the server's place (errors, authentication requests it
//! rewrites or completes).
//!
//! `postgres-protocol` only parses backend messages (and not protocol 3.2's BackendKeyData or
//! NegotiateProtocolVersion), so these encoders are lockguard's own.

use bytes::{BufMut, BytesMut};

use super::{put_message, MessageBuf};

pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const DATA_ROW: u8 = b'D';
pub const ERROR_RESPONSE: u8 = b'E';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const READY_FOR_QUERY: u8 = b'Z';

/// Authentication request codes: the first int32 of an [`AUTHENTICATION`] message.
pub mod auth_request {
    pub const OK: u32 = 0;
    pub const CLEARTEXT_PASSWORD: u32 = 3;
    pub const MD5_PASSWORD: u32 = 5;
    pub const GSS: u32 = 7;
    pub const GSS_CONTINUE: u32 = 8;
    pub const SSPI: u32 = 9;
    pub const SASL: u32 = 10;
    pub const SASL_CONTINUE: u32 = 11;
    pub const SASL_FINAL: u32 = 12;
}

/// Field types of ErrorResponse and NoticeResponse.
pub mod field {
    /// Severity, possibly localized.
    pub const SEVERITY: u8 = b'S';
    /// Severity, never localized (PostgreSQL 9.6+).
    pub const SEVERITY_NONLOCALIZED: u8 = b'V';
    pub const SQLSTATE: u8 = b'C';
    pub const MESSAGE: u8 = b'M';
}

/// An Authentication message: request `code`, then its data as it is.
pub fn authentication(code: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + data.len());
    put_message(&mut out, AUTHENTICATION, |out| {
        out.put_u32(code);
        out.put_slice(data);
    });
    out
}

/// AuthenticationSASL offering `mechanisms`, in that order.
pub fn authentication_sasl<'a>(mechanisms: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_message(&mut out, AUTHENTICATION, |out| {
        out.put_u32(auth_request::SASL);
        for name in mechanisms {
            out.put_slice(name);
            out.put_u8(0);
        }
        out.put_u8(0);
    });
    out
}

/// Appends an ErrorResponse or NoticeResponse (`tag`) with `fields` in order. Values must not
/// contain NUL bytes; any that do are cut there, so one value cannot forge the next field.
pub fn put_fields<B: MessageBuf>(out: &mut B, tag: u8, fields: &[(u8, &str)]) {
    put_message(out, tag, |out| {
        for &(kind, value) in fields {
            out.put_u8(kind);
            out.put_slice(value.split('\0').next().unwrap_or_default().as_bytes());
            out.put_u8(0);
        }
        out.put_u8(0);
    });
}

/// Encodes an ErrorResponse with severity FATAL, the given SQLSTATE and message.
pub fn fatal_error(sqlstate: &str, message: &str) -> BytesMut {
    error_response("FATAL", sqlstate, message)
}

/// Encodes an ErrorResponse. Field values must not contain NUL bytes; any that do are cut there.
pub fn error_response(severity: &str, sqlstate: &str, message: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(32 + message.len());
    put_fields(
        &mut out,
        ERROR_RESPONSE,
        &[
            (field::SEVERITY, severity),
            (field::SEVERITY_NONLOCALIZED, severity),
            (field::SQLSTATE, sqlstate),
            (field::MESSAGE, message),
        ],
    );
    out
}

/// An error in the format of protocol 2 and older, which PostgreSQL uses to refuse a client
/// asking for such a version: `E`, then `FATAL:  <message>\n` NUL-terminated (no length).
pub fn old_protocol_error(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 10);
    out.push(ERROR_RESPONSE);
    out.extend_from_slice(b"FATAL:  ");
    out.extend(message.bytes().filter(|&b| b != 0));
    out.extend_from_slice(b"\n\0");
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

    #[test]
    fn a_nul_in_a_value_cannot_start_a_field_of_its_own() {
        let msg = fatal_error("08006", "cut here\0Cforged");
        let fields: Vec<_> = error_fields(&msg[5..]).collect();
        assert_eq!(fields[3], (b'M', &b"cut here"[..]));
        assert_eq!(fields.len(), 4);
    }

    #[test]
    fn authentication_requests_carry_their_code_first() {
        assert_eq!(
            authentication(auth_request::SASL_FINAL, b"v=x"),
            b"R\0\0\0\x0b\0\0\0\x0cv=x"
        );
        assert_eq!(
            authentication_sasl([&b"SCRAM-SHA-256"[..]]),
            b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"
        );
    }

    #[test]
    fn old_protocol_errors_drop_nuls_so_the_text_stays_one_string() {
        assert_eq!(old_protocol_error("no\0pe"), b"EFATAL:  nope\n\0".to_vec());
    }
}
