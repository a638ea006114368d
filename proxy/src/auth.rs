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
//! the ClientKey the proof demonstrates, and completes the upstream exchange with a proof of its
//! own ([`crate::scram`]). The password never passes through lockguard.
//!
//! Upstream, lockguard is then the SCRAM client, and it binds like one: when the server offers
//! `SCRAM-SHA-256-PLUS`, the proof is bound to lockguard's own TLS channel (the hash of the
//! certificate the server presented, `tls-server-end-point`), so a relay that terminates TLS with
//! a certificate of its own cannot carry the login to the real server; when the server does not
//! offer it, lockguard says `y`, and a real server that supports binding refuses — which catches
//! a relay that struck `-PLUS` from the list.
//!
//! A wrong proof is not answered by lockguard alone: the server is sent a proof that cannot
//! match, so it sees (and delays, logs, counts) the failed login as it would directly, and the
//! client gets the server's own refusal.
//!
//! PostgreSQL's authentication is strictly request/response, so the relay alternates: one
//! server message, and where it asks for one, one client message.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::warn;

use bytes::BytesMut;

use crate::protocol::backend::{self, auth_request, AUTHENTICATION, ERROR_RESPONSE};
use crate::protocol::frontend::{self, PASSWORD_MESSAGE};
use crate::protocol::{fatal_error, sqlstate};
use crate::scram::{self, ClientFinal, ClientFirst, ScramSecret};
use crate::upstream::ChannelBinding;

/// Authentication messages are small (GSSAPI tokens are the largest, a few KiB).
const MAX_AUTH_MESSAGE: usize = 64 * 1024;

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

/// The longest role name PostgreSQL keeps (NAMEDATALEN - 1 bytes).
const MAX_ROLE_NAME_BYTES: usize = 63;

/// The role PostgreSQL will authenticate for a startup packet's `user`, for looking up its
/// secret. The server cuts an over-long name to its first 63 bytes — by bytes, not characters
/// (its startup packet handling, unlike SQL identifiers) — and looks that up. `None` when the cut
/// falls inside a character: no role name, stored in valid UTF-8, can match those bytes.
pub fn role_name(user: &str) -> Option<&str> {
    if user.len() <= MAX_ROLE_NAME_BYTES {
        return Some(user);
    }
    user.get(..MAX_ROLE_NAME_BYTES)
}

/// One client's login, as the relay needs to know it.
#[derive(Debug, Clone)]
pub struct Login<'a> {
    /// The client's address, for the log.
    pub client: SocketAddr,
    /// The user name from the client's startup packet, as sent.
    pub user: &'a str,
    /// What lockguard's own TLS connection to the server lets it bind a SCRAM exchange to.
    pub upstream: ChannelBinding,
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

/// Relays until AuthenticationOk or an error, over a TLS connection to the server. `secret` is
/// called only for a SCRAM client that announces channel binding (see the module docs).
pub async fn relay_authentication<C, S, L>(
    client: &mut C,
    server: &mut S,
    login: &Login<'_>,
    secret: L,
) -> Result<AuthEnd, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    L: SecretLookup,
{
    let mut secret = Some(secret);
    let mut next_from_server = None;
    let mut binding_offered = false;
    loop {
        let mut message = match next_from_server.take() {
            Some(message) => message,
            None => read_server(server).await?,
        };
        let tag = message[0];
        let code = (tag == AUTHENTICATION && message.len() >= 9)
            .then(|| u32::from_be_bytes([message[5], message[6], message[7], message[8]]));
        if code == Some(auth_request::SASL) {
            binding_offered = offers(&message, SCRAM_SHA_256_PLUS);
            message = without_channel_binding(&message);
        }
        client
            .write_all(&message)
            .await
            .map_err(AuthError::Client)?;
        match (tag, code) {
            (ERROR_RESPONSE, _) => return Ok(AuthEnd::Refused),
            (_, Some(auth_request::OK)) => return Ok(AuthEnd::Authenticated),
            // The requests after which the client answers.
            (
                _,
                Some(
                    auth_request::CLEARTEXT_PASSWORD
                    | auth_request::MD5_PASSWORD
                    | auth_request::GSS
                    | auth_request::GSS_CONTINUE
                    | auth_request::SSPI
                    | auth_request::SASL
                    | auth_request::SASL_CONTINUE,
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
                if code == Some(auth_request::SASL) {
                    if let Some(initial) = binding_capable_scram(&answer) {
                        let Some(lookup) = secret.take() else {
                            return Err(AuthError::ServerScram("SASL offered twice".into()));
                        };
                        let on_behalf = scram_on_behalf(
                            client,
                            server,
                            login,
                            binding_offered,
                            initial,
                            lookup,
                        );
                        match on_behalf.await? {
                            Some(end) => return Ok(end),
                            None => continue,
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

/// Completes the SCRAM exchange of a binding-capable client in the server's place (see the
/// module docs). `Some(end)` when that ended the authentication; `None` when the server
/// accepted and the relay goes on.
async fn scram_on_behalf<C, S, L>(
    client: &mut C,
    server: &mut S,
    login: &Login<'_>,
    binding_offered: bool,
    client_first_data: &[u8],
    lookup: L,
) -> Result<Option<AuthEnd>, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    L: SecretLookup,
{
    let upstream = match upstream_binding(login, binding_offered) {
        Ok(upstream) => upstream,
        Err(reason) => {
            warn!(
                %reason,
                user = ?login.user,
                client = %login.client,
                "cannot complete a SCRAM login bound to the upstream TLS connection"
            );
            let message = "lockguard: cannot bind this login to lockguard's TLS connection to \
                 the server (see lockguard's log)";
            refuse(client, sqlstate::INVALID_AUTHORIZATION, message).await;
            return Ok(Some(AuthEnd::Refused));
        }
    };
    let secret = match lookup().await {
        Ok(secret) => secret,
        Err(reason) => {
            // The reason (guard errors, role names) is for the operator, not for a client that
            // has not authenticated.
            warn!(
                %reason,
                "cannot check a channel-binding SCRAM client's proof: set guard.dsn and a \
                 guard.auth_query the guard role may run"
            );
            let message = "lockguard: this client offers SCRAM channel binding, which cannot \
                 cross lockguard to a TLS upstream, and lockguard cannot check the login in the \
                 server's place (see lockguard's log); connect with channel_binding=disable";
            refuse(client, sqlstate::INVALID_AUTHORIZATION, message).await;
            return Ok(Some(AuthEnd::Refused));
        }
    };
    let exchange = OnBehalf {
        login,
        upstream,
        client_first_data,
        secret: &secret,
    };
    exchange.run(client, server).await
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

/// The SASL mechanism with channel binding.
const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// How lockguard, as the server's SCRAM client, binds: the mechanism, the gs2 header and the
/// binding data its `c=` carries after the header.
#[derive(Debug, PartialEq, Eq)]
struct UpstreamGs2 {
    mechanism: &'static str,
    header: &'static str,
    data: Vec<u8>,
}

/// The binding lockguard uses towards the server, or why it cannot complete the login safely.
fn upstream_binding(login: &Login<'_>, offered: bool) -> Result<UpstreamGs2, String> {
    let plain = |header| UpstreamGs2 {
        mechanism: scram::SCRAM_SHA_256,
        header,
        data: Vec::new(),
    };
    match (&login.upstream, offered) {
        (ChannelBinding::EndPoint(hash), true) => Ok(UpstreamGs2 {
            mechanism: SCRAM_SHA_256_PLUS,
            header: "p=tls-server-end-point,,",
            data: hash.clone(),
        }),
        // "I could bind, but you did not offer it": a server that can bind refuses, so a relay
        // that struck -PLUS from the list gets nowhere.
        (_, false) => Ok(plain("y,,")),
        // Nothing to bind to, but the certificate was checked against a CA: the peer is the
        // server, which is what binding would have proved.
        (
            ChannelBinding::Unavailable {
                certificate_verified: true,
                ..
            },
            true,
        ) => Ok(plain("n,,")),
        (
            ChannelBinding::Unavailable {
                reason,
                certificate_verified: false,
            },
            true,
        ) => Err(format!(
            "{reason}; without channel binding a relay with a certificate of its own could take \
             the login over, and upstream_mode does not verify the server certificate: set \
             upstream_mode = verify-full (or verify-ca) with upstream_ca"
        )),
    }
}

/// One SCRAM exchange carried in the server's place towards the client and in the client's
/// place towards the server.
struct OnBehalf<'a> {
    login: &'a Login<'a>,
    upstream: UpstreamGs2,
    client_first_data: &'a [u8],
    secret: &'a ScramSecret,
}

impl OnBehalf<'_> {
    /// `Some(end)` when it ended the authentication; `None` when the server accepted and the
    /// relay goes on (AuthenticationOk and what follows).
    async fn run<C, S>(self, client: &mut C, server: &mut S) -> Result<Option<AuthEnd>, AuthError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let protocol_error =
            |what: String| AuthError::Client(io::Error::new(io::ErrorKind::InvalidData, what));
        let first = ClientFirst::parse(self.client_first_data).map_err(protocol_error)?;
        let mut upstream_first = self.upstream.header.as_bytes().to_vec();
        upstream_first.extend_from_slice(first.bare.as_bytes());
        let mut initial = BytesMut::new();
        frontend::sasl_initial_response(self.upstream.mechanism, &upstream_first, &mut initial)
            .map_err(AuthError::Server)?;
        server
            .write_all(&initial)
            .await
            .map_err(AuthError::Server)?;

        let server_first_message = read_server(server).await?;
        let Some(server_first) = sasl_payload(&server_first_message, auth_request::SASL_CONTINUE)
        else {
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
        let keys = &self.secret.keys;
        let client_auth_message = scram::auth_message(first.bare, &server_first, fin.without_proof);
        let client_key = keys.recover_client_key(&client_auth_message, &fin.proof);

        let Some((_, nonce_and_rest)) = fin.without_proof.split_once(',') else {
            return Err(protocol_error("client-final has no nonce".into()));
        };
        let mut binding = self.upstream.header.as_bytes().to_vec();
        binding.extend_from_slice(&self.upstream.data);
        let upstream_without_proof = format!("c={},{nonce_and_rest}", scram::base64(&binding));
        let upstream_auth_message =
            scram::auth_message(first.bare, &server_first, &upstream_without_proof);
        let proof = match &client_key {
            Some(client_key) => keys.client_proof(client_key, &upstream_auth_message),
            // A wrong password still reaches the server as a failed login, with a proof that
            // cannot match: its auth_delay, its log and whatever watches that log see it as
            // they would see a direct client.
            None => {
                warn!(
                    user = ?self.login.user,
                    client = %self.login.client,
                    "SCRAM login failed: wrong password or no such role (lockguard checked the \
                     proof; the server is sent a failing one so it sees the attempt too)"
                );
                rand::random()
            }
        };
        let upstream_final = format!("{upstream_without_proof},p={}", scram::base64(&proof));
        let mut response = BytesMut::new();
        frontend::sasl_response(upstream_final.as_bytes(), &mut response)
            .map_err(AuthError::Server)?;
        server
            .write_all(&response)
            .await
            .map_err(AuthError::Server)?;

        let server_final_message = read_server(server).await?;
        if client_key.is_none() {
            if server_final_message[0] == ERROR_RESPONSE {
                return forward_refusal(client, &server_final_message).await;
            }
            // Only a server that does not check proofs accepts that one; the client's proof
            // was wrong all the same.
            let message = format!(
                "password authentication failed for user \"{}\"",
                self.login.user
            );
            refuse(client, sqlstate::INVALID_PASSWORD, &message).await;
            return Ok(Some(AuthEnd::Refused));
        }
        let Some(server_final) = sasl_payload(&server_final_message, auth_request::SASL_FINAL)
        else {
            return forward_refusal(client, &server_final_message).await;
        };
        // The server proves it knows the same secret; the client gets the proof for its own
        // exchange.
        let expected = format!(
            "v={}",
            scram::base64(&keys.server_signature(&upstream_auth_message))
        );
        if !scram::constant_time_eq(server_final, expected.as_bytes()) {
            return Err(AuthError::ServerScram(
                "the server's SCRAM signature does not match the stored secret".into(),
            ));
        }
        let client_final = format!(
            "v={}",
            scram::base64(&keys.server_signature(&client_auth_message))
        );
        let reply = backend::authentication(auth_request::SASL_FINAL, client_final.as_bytes());
        client.write_all(&reply).await.map_err(AuthError::Client)?;
        Ok(None)
    }
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

/// Whether an AuthenticationSASL lists `mechanism`.
fn offers(message: &[u8], mechanism: &str) -> bool {
    message
        .get(9..)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .take_while(|name| !name.is_empty())
        .any(|name| name == mechanism.as_bytes())
}

/// AuthenticationSASL with every `-PLUS` (channel binding) mechanism removed.
fn without_channel_binding(message: &[u8]) -> Vec<u8> {
    let mechanisms = message[9..]
        .split(|&b| b == 0)
        .take_while(|name| !name.is_empty())
        .filter(|name| !name.ends_with(b"-PLUS"));
    backend::authentication_sasl(mechanisms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::{authentication as auth, BACKEND_KEY_DATA};
    use crate::protocol::message as msg;
    use crate::scram::ScramKeys;

    const END_POINT: [u8; 32] = [0xab; 32];

    fn login() -> Login<'static> {
        Login {
            client: SocketAddr::from(([127, 0, 0, 1], 40000)),
            user: "alice",
            upstream: ChannelBinding::EndPoint(END_POINT.to_vec()),
        }
    }

    fn unavailable(certificate_verified: bool) -> Login<'static> {
        Login {
            upstream: ChannelBinding::Unavailable {
                reason: "an Ed25519 certificate".into(),
                certificate_verified,
            },
            ..login()
        }
    }

    #[test]
    fn role_names_are_cut_to_63_bytes_as_the_server_cuts_them() {
        assert_eq!(role_name("alice"), Some("alice"));
        let exact = "x".repeat(63);
        assert_eq!(role_name(&exact), Some(exact.as_str()));
        let long = format!("{exact}yyyy");
        assert_eq!(role_name(&long), Some(exact.as_str()));
        // "a" and 31 two-byte characters fill 63 bytes; what follows is cut.
        let role = format!("a{}", "é".repeat(31));
        assert_eq!(role_name(&format!("{role}üüü")), Some(role.as_str()));
        // 63 bytes end inside the 32nd "é": no role has that name.
        assert_eq!(role_name(&"é".repeat(50)), None);
    }

    #[test]
    fn the_upstream_exchange_binds_when_the_server_offers_binding() {
        assert_eq!(
            upstream_binding(&login(), true),
            Ok(UpstreamGs2 {
                mechanism: SCRAM_SHA_256_PLUS,
                header: "p=tls-server-end-point,,",
                data: END_POINT.to_vec(),
            })
        );
        // Not offered: "I could have bound", which a server that can bind refuses.
        for login in [login(), unavailable(false), unavailable(true)] {
            let gs2 = upstream_binding(&login, false).expect("not offered");
            assert_eq!((gs2.mechanism, gs2.header), (scram::SCRAM_SHA_256, "y,,"));
        }
        // Offered, but the certificate gives nothing to bind to: only a verified certificate
        // makes an unbound login safe.
        let gs2 = upstream_binding(&unavailable(true), true).expect("verified certificate");
        assert_eq!((gs2.mechanism, gs2.header), (scram::SCRAM_SHA_256, "n,,"));
        let refused = upstream_binding(&unavailable(false), true).expect_err("unverified");
        assert!(refused.contains("Ed25519") && refused.contains("verify-full"));
    }

    async fn read_one<R: AsyncRead + Unpin>(from: &mut R) -> Vec<u8> {
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), read_server(from));
        match read.await {
            Ok(Ok(message)) => message,
            Ok(Err(e)) => panic!("reading a message: {e}"),
            Err(_) => panic!("no message in time"),
        }
    }

    fn sasl_initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        frontend::sasl_initial_response(mechanism, data, &mut out).unwrap();
        out.to_vec()
    }

    fn sasl_response(data: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        frontend::sasl_response(data, &mut out).unwrap();
        out.to_vec()
    }

    /// Plays a binding-capable client and a PostgreSQL offering SCRAM-SHA-256-PLUS around
    /// the relay, with the client's password `password` (the stored one is "pencil"). Returns
    /// what the client finally received and how the relay ended.
    async fn exchange_with_binding(password: &str) -> (Vec<u8>, Result<AuthEnd, AuthError>) {
        let salt = b"0123456789abcdef".to_vec();
        let keys = ScramKeys::from_password("pencil", &salt, 4096);
        let secret = ScramSecret {
            iterations: 4096,
            salt: salt.clone(),
            keys: keys.clone(),
        };
        let (mut client, mut client_side) = tokio::io::duplex(4096);
        let (mut server, mut server_side) = tokio::io::duplex(4096);
        let relay = tokio::spawn(async move {
            let lookup = || async move { Ok::<_, String>(secret) };
            relay_authentication(&mut client_side, &mut server_side, &login(), lookup).await
        });

        server
            .write_all(&sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
            .await
            .unwrap();
        expect(&mut client, &sasl(&["SCRAM-SHA-256"])).await;
        client
            .write_all(&sasl_initial("SCRAM-SHA-256", b"y,,n=,r=clientnonce"))
            .await
            .unwrap();

        // Upstream: bound to the server certificate lockguard saw.
        let upstream_first = read_one(&mut server).await;
        assert_eq!(
            upstream_first,
            sasl_initial(
                "SCRAM-SHA-256-PLUS",
                b"p=tls-server-end-point,,n=,r=clientnonce"
            )
        );
        let server_first = format!("r=clientnonceSERVER,s={},i=4096", scram::base64(&salt));
        let continue_message = auth(auth_request::SASL_CONTINUE, server_first.as_bytes());
        server.write_all(&continue_message).await.unwrap();
        expect(&mut client, &continue_message).await;

        // The client proves `password` for its own exchange (c= repeats its "y,,").
        let client_without_proof = "c=eSws,r=clientnonceSERVER";
        let client_auth =
            scram::auth_message("n=,r=clientnonce", &server_first, client_without_proof);
        let salted = scram::salted_password(password.as_bytes(), &salt, 4096);
        let client_key = scram::hmac(&salted, b"Client Key");
        let proof = keys.client_proof(&client_key, &client_auth);
        let client_final = format!("{client_without_proof},p={}", scram::base64(&proof));
        client
            .write_all(&sasl_response(client_final.as_bytes()))
            .await
            .unwrap();

        // What reaches the server is bound to the certificate hash; the server checks the
        // proof as PostgreSQL does.
        let upstream_final = read_one(&mut server).await;
        let upstream_final = std::str::from_utf8(&upstream_final[5..])
            .unwrap()
            .to_owned();
        let mut binding = b"p=tls-server-end-point,,".to_vec();
        binding.extend_from_slice(&END_POINT);
        let upstream_without_proof = format!("c={},r=clientnonceSERVER", scram::base64(&binding));
        let (without_proof, upstream_proof) = upstream_final.rsplit_once(",p=").unwrap();
        assert_eq!(without_proof, upstream_without_proof);
        let upstream_auth =
            scram::auth_message("n=,r=clientnonce", &server_first, &upstream_without_proof);
        let upstream_proof =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, upstream_proof)
                .unwrap();
        if keys
            .recover_client_key(&upstream_auth, &upstream_proof)
            .is_some()
        {
            let signature = keys.server_signature(&upstream_auth);
            let server_final = format!("v={}", scram::base64(&signature));
            server
                .write_all(&auth(auth_request::SASL_FINAL, server_final.as_bytes()))
                .await
                .unwrap();
            let client_final = format!("v={}", scram::base64(&keys.server_signature(&client_auth)));
            expect(
                &mut client,
                &auth(auth_request::SASL_FINAL, client_final.as_bytes()),
            )
            .await;
            server
                .write_all(&auth(auth_request::OK, b""))
                .await
                .unwrap();
        } else {
            server.write_all(&refusal()).await.unwrap();
        }
        let mut received = vec![0u8; 64];
        let n = client.read(&mut received).await.unwrap();
        received.truncate(n);
        let end = relay.await.unwrap();
        (received, end)
    }

    fn refusal() -> Vec<u8> {
        msg(
            ERROR_RESPONSE,
            b"SFATAL\0C28P01\0Mpassword authentication failed\0\0",
        )
    }

    #[tokio::test]
    async fn a_login_lockguard_completes_is_bound_to_the_upstream_certificate() {
        let (received, end) = exchange_with_binding("pencil").await;
        assert_eq!(received, auth(auth_request::OK, b""));
        assert_eq!(end.unwrap(), AuthEnd::Authenticated);
    }

    #[tokio::test]
    async fn a_wrong_password_reaches_the_server_and_its_refusal_is_forwarded() {
        let (received, end) = exchange_with_binding("not pencil").await;
        assert_eq!(received, refusal());
        assert_eq!(end.unwrap(), AuthEnd::Refused);
    }

    fn sasl(mechanisms: &[&str]) -> Vec<u8> {
        backend::authentication_sasl(mechanisms.iter().map(|m| m.as_bytes()))
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
            relay_authentication(&mut client_side, &mut server_side, &login(), no_secret).await
        });
        server
            .write_all(&sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
            .await
            .unwrap();
        let mut seen = vec![0u8; sasl(&["SCRAM-SHA-256"]).len()];
        client.read_exact(&mut seen).await.unwrap();
        assert_eq!(seen, sasl(&["SCRAM-SHA-256"]));
        let initial = sasl_initial("SCRAM-SHA-256", b"abcd");
        client.write_all(&initial).await.unwrap();
        let mut forwarded = vec![0u8; initial.len()];
        server.read_exact(&mut forwarded).await.unwrap();
        assert_eq!(forwarded, initial);
        server
            .write_all(&auth(auth_request::OK, b""))
            .await
            .unwrap();
        assert_eq!(relay.await.unwrap().unwrap(), AuthEnd::Authenticated);
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
            let end =
                relay_authentication(&mut client_side, &mut server_side, &login(), no_secret).await;
            (end, server_side)
        });
        server
            .write_all(&auth(auth_request::GSS, b""))
            .await
            .unwrap();
        expect(&mut client, &auth(auth_request::GSS, b"")).await;
        let first_token = msg(PASSWORD_MESSAGE, &[7u8; 3000]);
        client.write_all(&first_token).await.unwrap();
        expect(&mut server, &first_token).await;

        // A token that needs an answer: the client's one is forwarded.
        server
            .write_all(&auth(auth_request::GSS_CONTINUE, b"more"))
            .await
            .unwrap();
        expect(&mut client, &auth(auth_request::GSS_CONTINUE, b"more")).await;
        let second_token = msg(PASSWORD_MESSAGE, b"second");
        client.write_all(&second_token).await.unwrap();
        expect(&mut server, &second_token).await;

        // The last token, then AuthenticationOk and the session's first messages at once.
        let key_data = msg(BACKEND_KEY_DATA, &[0, 0, 0, 42, 1, 2, 3, 4]);
        let mut burst = auth(auth_request::GSS_CONTINUE, b"mutual");
        burst.extend_from_slice(&auth(auth_request::OK, b""));
        burst.extend_from_slice(&key_data);
        server.write_all(&burst).await.unwrap();
        expect(&mut client, &auth(auth_request::GSS_CONTINUE, b"mutual")).await;
        expect(&mut client, &auth(auth_request::OK, b"")).await;
        let (end, mut server_side) = tokio::time::timeout(std::time::Duration::from_secs(5), relay)
            .await
            .expect("the relay ends without a client answer")
            .unwrap();
        assert_eq!(end.unwrap(), AuthEnd::Authenticated);
        expect(&mut server_side, &key_data).await;
    }
}
