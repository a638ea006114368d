//! The authentication exchange, relayed message by message when the upstream connection is
//! TLS — so that channel binding can be taken off the table.
//!
//! Over TLS, PostgreSQL offers `SCRAM-SHA-256-PLUS`, which binds the SCRAM proof to the TLS
//! channel between client and server. With lockguard in the middle there are two channels, so a
//! client choosing `-PLUS` would always fail. lockguard removes the `-PLUS` mechanisms from
//! AuthenticationSASL; clients then use plain SCRAM-SHA-256, and a client that *requires*
//! channel binding gets its own clear "server did not offer channel binding" error.
//!
//! PostgreSQL's authentication is strictly request/response, so the relay alternates: one
//! server message, and where it asks for one, one client message.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Authentication messages are small (GSSAPI tokens are the largest, a few KiB).
const MAX_AUTH_MESSAGE: usize = 64 * 1024;

const AUTHENTICATION: u8 = b'R';
const ERROR_RESPONSE: u8 = b'E';

/// Authentication request codes (first int32 of an `R` message) after which the client answers.
const AUTH_CLEARTEXT_PASSWORD: u32 = 3;
const AUTH_MD5_PASSWORD: u32 = 5;
const AUTH_GSS: u32 = 7;
const AUTH_GSS_CONTINUE: u32 = 8;
const AUTH_SSPI: u32 = 9;
const AUTH_SASL: u32 = 10;
const AUTH_SASL_CONTINUE: u32 = 11;
const AUTH_OK: u32 = 0;

/// How the relayed authentication ended.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthEnd {
    /// AuthenticationOk was forwarded: the session continues in the pump.
    Authenticated,
    /// The server refused (its ErrorResponse was forwarded) and will close.
    Refused,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("client: {0}")]
    Client(io::Error),
    #[error("server: {0}")]
    Server(io::Error),
    #[error("{0} sent an authentication message of {1} bytes")]
    TooLong(&'static str, usize),
}

/// Relays until AuthenticationOk or an error. See the module docs.
pub async fn relay_authentication<C, S>(
    client: &mut C,
    server: &mut S,
) -> Result<AuthEnd, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let mut message = read_message(server, "server").await.map_err(|e| match e {
            ReadError::Io(e) => AuthError::Server(e),
            ReadError::TooLong(n) => AuthError::TooLong("the server", n),
        })?;
        let tag = message[0];
        let code = (tag == AUTHENTICATION && message.len() >= 9)
            .then(|| u32::from_be_bytes([message[5], message[6], message[7], message[8]]));
        if code == Some(AUTH_SASL) {
            message = without_channel_binding(&message);
        }
        client
            .write_all(&message)
            .await
            .map_err(AuthError::Client)?;
        match (tag, code) {
            (ERROR_RESPONSE, _) => return Ok(AuthEnd::Refused),
            (_, Some(AUTH_OK)) => return Ok(AuthEnd::Authenticated),
            (
                _,
                Some(
                    AUTH_CLEARTEXT_PASSWORD
                    | AUTH_MD5_PASSWORD
                    | AUTH_GSS
                    | AUTH_GSS_CONTINUE
                    | AUTH_SSPI
                    | AUTH_SASL
                    | AUTH_SASL_CONTINUE,
                ),
            ) => {
                let answer = read_message(client, "client").await.map_err(|e| match e {
                    ReadError::Io(e) => AuthError::Client(e),
                    ReadError::TooLong(n) => AuthError::TooLong("the client", n),
                })?;
                server.write_all(&answer).await.map_err(AuthError::Server)?;
            }
            // SASLFinal, NegotiateProtocolVersion, notices: nothing to answer.
            _ => {}
        }
    }
}

enum ReadError {
    Io(io::Error),
    TooLong(usize),
}

async fn read_message<R: AsyncRead + Unpin>(
    from: &mut R,
    _who: &'static str,
) -> Result<Vec<u8>, ReadError> {
    let mut header = [0u8; 5];
    from.read_exact(&mut header).await.map_err(ReadError::Io)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=MAX_AUTH_MESSAGE).contains(&len) {
        return Err(ReadError::TooLong(len));
    }
    let mut message = vec![0u8; 1 + len];
    message[..5].copy_from_slice(&header);
    from.read_exact(&mut message[5..])
        .await
        .map_err(ReadError::Io)?;
    Ok(message)
}

/// AuthenticationSASL with every `-PLUS` (channel binding) mechanism removed.
fn without_channel_binding(message: &[u8]) -> Vec<u8> {
    let mechanisms = message[9..]
        .split(|&b| b == 0)
        .take_while(|name| !name.is_empty())
        .filter(|name| !name.ends_with(b"-PLUS"));
    let mut out = vec![AUTHENTICATION, 0, 0, 0, 0];
    out.extend_from_slice(&AUTH_SASL.to_be_bytes());
    for name in mechanisms {
        out.extend_from_slice(name);
        out.push(0);
    }
    out.push(0);
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sasl(mechanisms: &[&str]) -> Vec<u8> {
        let mut body = AUTH_SASL.to_be_bytes().to_vec();
        for m in mechanisms {
            body.extend_from_slice(m.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = vec![AUTHENTICATION];
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn channel_binding_mechanisms_are_removed() {
        let offered = sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        assert_eq!(without_channel_binding(&offered), sasl(&["SCRAM-SHA-256"]));
        let plain = sasl(&["SCRAM-SHA-256"]);
        assert_eq!(without_channel_binding(&plain), plain);
    }

    #[tokio::test]
    async fn scram_exchange_is_relayed_until_authentication_ok() {
        let (mut client, mut client_side) = tokio::io::duplex(4096);
        let (mut server, mut server_side) = tokio::io::duplex(4096);
        let relay =
            tokio::spawn(
                async move { relay_authentication(&mut client_side, &mut server_side).await },
            );
        let msg = |tag: u8, body: &[u8]| {
            let mut m = vec![tag];
            m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            m.extend_from_slice(body);
            m
        };
        server
            .write_all(&sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
            .await
            .unwrap();
        let mut seen = vec![0u8; sasl(&["SCRAM-SHA-256"]).len()];
        client.read_exact(&mut seen).await.unwrap();
        assert_eq!(seen, sasl(&["SCRAM-SHA-256"]));
        let initial = msg(b'p', b"SCRAM-SHA-256\0\0\0\0\x04abcd");
        client.write_all(&initial).await.unwrap();
        let mut forwarded = vec![0u8; initial.len()];
        server.read_exact(&mut forwarded).await.unwrap();
        assert_eq!(forwarded, initial);
        server
            .write_all(&msg(b'R', &AUTH_OK.to_be_bytes()))
            .await
            .unwrap();
        assert_eq!(relay.await.unwrap().unwrap(), AuthEnd::Authenticated);
    }
}
