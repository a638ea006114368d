//! The relay of the server's authentication exchange: one server message, and where it asks
//! for one, one client message, until AuthenticationOk or an error.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::binding::{binding_capable_scram, offers, without_channel_binding, SCRAM_SHA_256_PLUS};
use super::message::{read_client_into, read_server, read_server_into};
use super::on_behalf::scram_on_behalf;
use super::{AuthEnd, AuthError, Login, SecretLookup};
use crate::protocol::backend::{auth_request, AUTHENTICATION, ERROR_RESPONSE};

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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::auth::testing::{expect, login, sasl, sasl_initial};
    use crate::protocol::backend::{authentication as auth, BACKEND_KEY_DATA};
    use crate::protocol::frontend::PASSWORD_MESSAGE;
    use crate::protocol::message as msg;
    use crate::scram::ScramSecret;

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
