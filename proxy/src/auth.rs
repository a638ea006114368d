//! The authentication exchange, relayed message by message when the upstream connection is
//! TLS — so that channel binding can be taken off the table.
//!
//! Over TLS, PostgreSQL offers `SCRAM-SHA-256-PLUS`, which binds the SCRAM proof to the TLS
//! channel between client and server. With lockguard in the middle there are two channels, so a
//! client choosing `-PLUS` would always fail. lockguard removes the `-PLUS` mechanisms from
//! AuthenticationSASL; clients then use plain SCRAM-SHA-256, and a client that *requires*
//! channel binding gets its own clear "server did not offer channel binding" error.
//!
//! That leaves one case a relay cannot carry: a client on TLS that *could* bind announces it
//! with the gs2 flag `y` ("I support binding, but the server did not offer it"), and PostgreSQL,
//! itself on TLS, rejects that as a downgrade attack. The flag is covered by the client's proof,
//! so it cannot be rewritten in flight. Instead lockguard takes the user's stored SCRAM secret
//! (fetched by the guard with `guard.auth_query`), checks the client's proof itself, recovers
//! the ClientKey the proof demonstrates, and completes the upstream exchange with flag `n` and a
//! proof of its own ([`crate::scram`]). The password never passes through lockguard.
//!
//! PostgreSQL's authentication is strictly request/response, so the relay alternates: one
//! server message, and where it asks for one, one client message.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

use crate::protocol::{fatal_error, sqlstate};
use crate::scram::{self, ClientFinal, ClientFirst, ScramSecret};

/// Authentication messages are small (GSSAPI tokens are the largest, a few KiB).
const MAX_AUTH_MESSAGE: usize = 64 * 1024;

const AUTHENTICATION: u8 = b'R';
const ERROR_RESPONSE: u8 = b'E';
/// SASLInitialResponse and SASLResponse (the frontend's password-message family).
const PASSWORD_MESSAGE: u8 = b'p';

/// Authentication request codes (first int32 of an `R` message) after which the client answers.
const AUTH_CLEARTEXT_PASSWORD: u32 = 3;
const AUTH_MD5_PASSWORD: u32 = 5;
const AUTH_GSS: u32 = 7;
const AUTH_GSS_CONTINUE: u32 = 8;
const AUTH_SSPI: u32 = 9;
const AUTH_SASL: u32 = 10;
const AUTH_SASL_CONTINUE: u32 = 11;
const AUTH_SASL_FINAL: u32 = 12;
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
    #[error("the server broke off SCRAM: {0}")]
    ServerScram(String),
    #[error("client and server both sent a message at once during authentication")]
    Interleaved,
}

/// Looks up the stored SCRAM secret of the connecting user; the error says why there is none.
pub trait SecretLookup: FnOnce() -> Self::Fut {
    type Fut: Future<Output = Result<ScramSecret, String>>;
}

impl<F, Fut> SecretLookup for F
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<ScramSecret, String>>,
{
    type Fut = Fut;
}

/// Relays until AuthenticationOk or an error. `secret` is called only for a SCRAM client that
/// announces channel binding (see the module docs). See the module docs.
pub async fn relay_authentication<C, S, L>(
    client: &mut C,
    server: &mut S,
    secret: L,
) -> Result<AuthEnd, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    L: SecretLookup,
{
    let mut secret = Some(secret);
    let mut next_from_server = None;
    loop {
        let mut message = match next_from_server.take() {
            Some(message) => message,
            None => read_server(server).await?,
        };
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
                // Usually the client answers, but GSSAPI's last token (mutual authentication)
                // needs no answer: the server goes straight on to AuthenticationOk or an
                // error. So whichever side speaks first is next.
                let answer = match next_speaker(client, server).await? {
                    Spoke::Client(answer) => answer,
                    Spoke::Server(message) => {
                        next_from_server = Some(message);
                        continue;
                    }
                };
                if code == Some(AUTH_SASL) {
                    if let Some(initial) = binding_capable_scram(&answer) {
                        let Some(lookup) = secret.take() else {
                            return Err(AuthError::ServerScram("SASL offered twice".into()));
                        };
                        match lookup().await {
                            Ok(secret) => {
                                if let Some(end) =
                                    scram_on_behalf(client, server, initial, &secret).await?
                                {
                                    return Ok(end);
                                }
                                continue;
                            }
                            Err(reason) => {
                                // The reason (guard errors, role names) is for the operator,
                                // not for a client that has not authenticated.
                                warn!(
                                    %reason,
                                    "cannot check a channel-binding SCRAM client's proof: set \
                                     guard.dsn and a guard.auth_query the guard role may run"
                                );
                                let message = "lockguard: this client offers SCRAM channel \
                                     binding, which cannot cross lockguard to a TLS upstream, and \
                                     lockguard cannot check the login in the server's place (see \
                                     lockguard's log); connect with channel_binding=disable";
                                refuse(client, sqlstate::INVALID_AUTHORIZATION, message).await;
                                return Ok(AuthEnd::Refused);
                            }
                        }
                    }
                }
                server.write_all(&answer).await.map_err(AuthError::Server)?;
            }
            // SASLFinal, NegotiateProtocolVersion, notices: nothing to answer.
            _ => {}
        }
    }
}

/// Who sent the next message after an authentication request.
enum Spoke {
    Client(Vec<u8>),
    Server(Vec<u8>),
}

/// Waits for a whole message from either side. The other side must not have begun one: in a
/// well-formed exchange only one side speaks at a time.
async fn next_speaker<C, S>(client: &mut C, server: &mut S) -> Result<Spoke, AuthError>
where
    C: AsyncRead + Unpin,
    S: AsyncRead + Unpin,
{
    let (mut from_client, mut from_server) = (Vec::new(), Vec::new());
    let spoke = tokio::select! {
        answer = read_client_into(client, &mut from_client) => Spoke::Client(answer?),
        message = read_server_into(server, &mut from_server) => Spoke::Server(message?),
    };
    if !from_client.is_empty() || !from_server.is_empty() {
        return Err(AuthError::Interleaved);
    }
    Ok(spoke)
}

/// A SASLInitialResponse choosing SCRAM-SHA-256 with gs2 flag `y`: its client-first data.
fn binding_capable_scram(answer: &[u8]) -> Option<&[u8]> {
    if answer.first() != Some(&PASSWORD_MESSAGE) {
        return None;
    }
    let body = answer.get(5..)?;
    let name_end = body.iter().position(|&b| b == 0)?;
    if &body[..name_end] != scram::SCRAM_SHA_256.as_bytes() {
        return None;
    }
    let len_at = name_end + 1;
    let len = i32::from_be_bytes(body.get(len_at..len_at + 4)?.try_into().ok()?);
    let data = body.get(len_at + 4..len_at + 4 + usize::try_from(len).ok()?)?;
    data.starts_with(b"y,").then_some(data)
}

/// Carries one SCRAM exchange in the server's place towards the client and the client's place
/// towards the server. `Some(end)` when it ended the authentication; `None` when the server
/// accepted and the relay goes on (AuthenticationOk and what follows).
async fn scram_on_behalf<C, S>(
    client: &mut C,
    server: &mut S,
    client_first_data: &[u8],
    secret: &ScramSecret,
) -> Result<Option<AuthEnd>, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let protocol_error =
        |what: String| AuthError::Client(io::Error::new(io::ErrorKind::InvalidData, what));
    let first = ClientFirst::parse(client_first_data).map_err(protocol_error)?;
    // Upstream, lockguard is a client that cannot bind (it has no use for it: the upstream
    // channel is lockguard's own), so the flag is `n` and `c=` is "n,," in base64.
    let upstream_gs2 = "n,,";
    let mut upstream_first = upstream_gs2.as_bytes().to_vec();
    upstream_first.extend_from_slice(first.bare.as_bytes());
    server
        .write_all(&sasl_message(Some(scram::SCRAM_SHA_256), &upstream_first))
        .await
        .map_err(AuthError::Server)?;

    let server_first_message = read_server(server).await?;
    let Some(server_first) = sasl_payload(&server_first_message, AUTH_SASL_CONTINUE) else {
        return forward_refusal(client, &server_first_message).await;
    };
    let server_first = std::str::from_utf8(server_first)
        .map_err(|_| AuthError::ServerScram("server-first is not UTF-8".into()))?
        .to_owned();
    client
        .write_all(&server_first_message)
        .await
        .map_err(AuthError::Client)?;

    let final_message = read_client(client).await?;
    let final_data = final_message
        .get(5..)
        .filter(|_| final_message[0] == PASSWORD_MESSAGE)
        .ok_or_else(|| protocol_error("expected a SASLResponse".into()))?;
    let fin = ClientFinal::parse(final_data).map_err(protocol_error)?;
    if fin.channel_binding != scram::base64(first.gs2_header.as_bytes())
        || !server_first.starts_with(&format!("r={},", fin.nonce))
    {
        return Err(protocol_error(
            "client-final does not match the exchange".into(),
        ));
    }
    let client_auth_message = scram::auth_message(first.bare, &server_first, fin.without_proof);
    let Some(client_key) = secret
        .keys
        .recover_client_key(&client_auth_message, &fin.proof)
    else {
        info!("SCRAM proof checked by lockguard is wrong: password authentication failed");
        refuse(
            client,
            sqlstate::INVALID_PASSWORD,
            "password authentication failed",
        )
        .await;
        return Ok(Some(AuthEnd::Refused));
    };

    let upstream_without_proof = match fin.without_proof.split_once(',') {
        Some((_, rest)) => format!("c={},{rest}", scram::base64(upstream_gs2.as_bytes())),
        None => return Err(protocol_error("client-final has no nonce".into())),
    };
    let upstream_auth_message =
        scram::auth_message(first.bare, &server_first, &upstream_without_proof);
    let proof = secret
        .keys
        .client_proof(&client_key, &upstream_auth_message);
    let upstream_final = format!("{upstream_without_proof},p={}", scram::base64(&proof));
    server
        .write_all(&sasl_message(None, upstream_final.as_bytes()))
        .await
        .map_err(AuthError::Server)?;

    let server_final_message = read_server(server).await?;
    let Some(server_final) = sasl_payload(&server_final_message, AUTH_SASL_FINAL) else {
        return forward_refusal(client, &server_final_message).await;
    };
    // The server proves it knows the same secret; the client gets the proof for its own
    // exchange.
    let expected = format!(
        "v={}",
        scram::base64(&secret.keys.server_signature(&upstream_auth_message))
    );
    if !scram::constant_time_eq(server_final, expected.as_bytes()) {
        return Err(AuthError::ServerScram(
            "the server's SCRAM signature does not match the stored secret".into(),
        ));
    }
    let client_final = format!(
        "v={}",
        scram::base64(&secret.keys.server_signature(&client_auth_message))
    );
    let mut reply = vec![AUTHENTICATION, 0, 0, 0, 0];
    reply.extend_from_slice(&AUTH_SASL_FINAL.to_be_bytes());
    reply.extend_from_slice(client_final.as_bytes());
    patch_length(&mut reply);
    client.write_all(&reply).await.map_err(AuthError::Client)?;
    Ok(None)
}

/// The server's answer was not the next SCRAM step: pass it on (an ErrorResponse, normally)
/// and end.
async fn forward_refusal<C: AsyncWrite + Unpin>(
    client: &mut C,
    message: &[u8],
) -> Result<Option<AuthEnd>, AuthError> {
    if message[0] != ERROR_RESPONSE {
        return Err(AuthError::ServerScram(format!(
            "unexpected message {:?} during SCRAM",
            char::from(message[0])
        )));
    }
    client.write_all(message).await.map_err(AuthError::Client)?;
    Ok(Some(AuthEnd::Refused))
}

async fn refuse<C: AsyncWrite + Unpin>(client: &mut C, code: &str, message: &str) {
    // The client may already be gone; there is nobody else to tell.
    let _ = client.write_all(&fatal_error(code, message)).await;
    let _ = client.flush().await;
}

/// The body of an Authentication message with request `code`.
fn sasl_payload(message: &[u8], code: u32) -> Option<&[u8]> {
    (message[0] == AUTHENTICATION && message.get(5..9) == Some(&code.to_be_bytes()[..]))
        .then(|| &message[9..])
}

/// A SASLInitialResponse (with a mechanism) or SASLResponse (without).
fn sasl_message(mechanism: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut out = vec![PASSWORD_MESSAGE, 0, 0, 0, 0];
    if let Some(mechanism) = mechanism {
        out.extend_from_slice(mechanism.as_bytes());
        out.push(0);
        out.extend_from_slice(&(data.len() as i32).to_be_bytes());
    }
    out.extend_from_slice(data);
    patch_length(&mut out);
    out
}

fn patch_length(message: &mut [u8]) {
    let len = (message.len() - 1) as u32;
    message[1..5].copy_from_slice(&len.to_be_bytes());
}

async fn read_server<S: AsyncRead + Unpin>(server: &mut S) -> Result<Vec<u8>, AuthError> {
    read_server_into(server, &mut Vec::new()).await
}

async fn read_client<C: AsyncRead + Unpin>(client: &mut C) -> Result<Vec<u8>, AuthError> {
    read_client_into(client, &mut Vec::new()).await
}

async fn read_server_into<S: AsyncRead + Unpin>(
    server: &mut S,
    partial: &mut Vec<u8>,
) -> Result<Vec<u8>, AuthError> {
    let read = read_message_into(server, partial).await;
    read.map_err(|e| e.into_auth_error("the server", AuthError::Server))
}

async fn read_client_into<C: AsyncRead + Unpin>(
    client: &mut C,
    partial: &mut Vec<u8>,
) -> Result<Vec<u8>, AuthError> {
    let read = read_message_into(client, partial).await;
    read.map_err(|e| e.into_auth_error("the client", AuthError::Client))
}

enum ReadError {
    Io(io::Error),
    TooLong(usize),
}

impl ReadError {
    /// The error as the side (`peer`, and its I/O error variant) it came from.
    fn into_auth_error(self, peer: &'static str, io: fn(io::Error) -> AuthError) -> AuthError {
        match self {
            ReadError::Io(e) => io(e),
            ReadError::TooLong(n) => AuthError::TooLong(peer, n),
        }
    }
}

/// Reads one whole message. Cancel-safe: the bytes read so far are kept in `partial`, so a
/// read dropped in a `select!` loses nothing. Never reads past the message's end — what
/// follows AuthenticationOk (BackendKeyData above all) belongs to the pump.
async fn read_message_into<R: AsyncRead + Unpin>(
    from: &mut R,
    partial: &mut Vec<u8>,
) -> Result<Vec<u8>, ReadError> {
    let mut chunk = [0u8; 1024];
    loop {
        let total = match partial.get(1..5) {
            Some(&[a, b, c, d]) => {
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                if !(4..=MAX_AUTH_MESSAGE).contains(&len) {
                    return Err(ReadError::TooLong(len));
                }
                1 + len
            }
            _ => 5,
        };
        if partial.len() == total {
            return Ok(std::mem::take(partial));
        }
        let wanted = (total - partial.len()).min(chunk.len());
        let n = from
            .read(&mut chunk[..wanted])
            .await
            .map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        partial.extend_from_slice(&chunk[..n]);
    }
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
    patch_length(&mut out);
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
        let relay = tokio::spawn(async move {
            let no_secret = || async { Err::<ScramSecret, _>("not needed".to_owned()) };
            relay_authentication(&mut client_side, &mut server_side, no_secret).await
        });
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

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn auth(code: u32, data: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(data);
        msg(AUTHENTICATION, &body)
    }

    async fn expect<R: AsyncRead + Unpin>(from: &mut R, expected: &[u8]) {
        let mut seen = vec![0u8; expected.len()];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            from.read_exact(&mut seen),
        )
        .await
        .expect("relayed in time")
        .unwrap();
        assert_eq!(seen, expected);
    }

    /// GSSAPI's last server token (mutual authentication) gets no answer from the client: the
    /// server goes straight on to AuthenticationOk, and the relay must not wait for the
    /// client. What follows AuthenticationOk stays unread for the pump.
    #[tokio::test]
    async fn gssapi_exchange_ends_without_a_client_answer_to_the_last_token() {
        let (mut client, mut client_side) = tokio::io::duplex(4096);
        let (mut server, mut server_side) = tokio::io::duplex(4096);
        let relay = tokio::spawn(async move {
            let no_secret = || async { Err::<ScramSecret, _>("not needed".to_owned()) };
            let end = relay_authentication(&mut client_side, &mut server_side, no_secret).await;
            (end, server_side)
        });
        server.write_all(&auth(AUTH_GSS, b"")).await.unwrap();
        expect(&mut client, &auth(AUTH_GSS, b"")).await;
        let first_token = msg(PASSWORD_MESSAGE, &[7u8; 3000]);
        client.write_all(&first_token).await.unwrap();
        expect(&mut server, &first_token).await;

        // A token that needs an answer: the client's one is forwarded.
        server
            .write_all(&auth(AUTH_GSS_CONTINUE, b"more"))
            .await
            .unwrap();
        expect(&mut client, &auth(AUTH_GSS_CONTINUE, b"more")).await;
        let second_token = msg(PASSWORD_MESSAGE, b"second");
        client.write_all(&second_token).await.unwrap();
        expect(&mut server, &second_token).await;

        // The last token, then AuthenticationOk and the session's first messages at once.
        let key_data = msg(b'K', &[0, 0, 0, 42, 1, 2, 3, 4]);
        let mut burst = auth(AUTH_GSS_CONTINUE, b"mutual");
        burst.extend_from_slice(&auth(AUTH_OK, b""));
        burst.extend_from_slice(&key_data);
        server.write_all(&burst).await.unwrap();
        expect(&mut client, &auth(AUTH_GSS_CONTINUE, b"mutual")).await;
        expect(&mut client, &auth(AUTH_OK, b"")).await;
        let (end, mut server_side) = tokio::time::timeout(std::time::Duration::from_secs(5), relay)
            .await
            .expect("the relay ends without a client answer")
            .unwrap();
        assert_eq!(end.unwrap(), AuthEnd::Authenticated);
        expect(&mut server_side, &key_data).await;
    }
}
