//! SCRAM on the client's behalf: for a client that announces it could bind (gs2 flag `y`),
//! lockguard checks the client's proof against the stored secret and proves the same
//! ClientKey to the server over an exchange bound to its own TLS channel.

use std::io;
use std::ops::ControlFlow;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::warn;

use super::binding::{upstream_binding, UpstreamGs2};
use super::message::{read_client, read_server};
use super::{AuthEnd, AuthError, Login, SecretLookup};
use crate::protocol::backend::{self, auth_request, AUTHENTICATION, ERROR_RESPONSE};
use crate::protocol::frontend::{self, PASSWORD_MESSAGE};
use crate::protocol::{fatal_error, sqlstate};
use crate::scram::{self, ClientFinal, ClientFirst, ScramSecret};

/// Completes the SCRAM exchange of a binding-capable client in the server's place (see the
/// module docs). `Some(end)` when that ended the authentication; `None` when the server
/// accepted and the relay goes on.
pub(super) async fn scram_on_behalf<C, S, L>(
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
        let first = ClientFirst::parse(self.client_first_data).map_err(protocol_error)?;
        let server_first = match self.exchange_first(client, server, &first).await? {
            ControlFlow::Continue(server_first) => server_first,
            ControlFlow::Break(end) => return Ok(Some(end)),
        };

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

        let signatures = Signatures {
            upstream: &upstream_auth_message,
            client: &client_auth_message,
        };
        self.finish(client, server, client_key.is_some(), signatures)
            .await
    }

    /// Opens the upstream exchange with the client's nonce under lockguard's own gs2 header,
    /// and passes the server-first message on to the client. Continues with server-first;
    /// breaks when the server refused instead.
    async fn exchange_first<C, S>(
        &self,
        client: &mut C,
        server: &mut S,
        first: &ClientFirst<'_>,
    ) -> Result<ControlFlow<AuthEnd, String>, AuthError>
    where
        C: AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
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
            return forward_refusal(client, &server_first_message)
                .await
                .map(ControlFlow::Break);
        };
        let server_first = std::str::from_utf8(server_first)
            .map_err(|_| AuthError::ServerScram("server-first is not UTF-8".into()))?
            .to_owned();
        client
            .write_all(&server_first_message)
            .await
            .map_err(AuthError::Client)?;
        Ok(ControlFlow::Continue(server_first))
    }

    /// Reads the server's verdict on lockguard's proof and answers the client: the server's
    /// refusal, lockguard's own when the client's proof was wrong, or the client's SASLFinal
    /// once the server has proved it knows the same secret.
    async fn finish<C, S>(
        &self,
        client: &mut C,
        server: &mut S,
        client_proof_valid: bool,
        signatures: Signatures<'_>,
    ) -> Result<Option<AuthEnd>, AuthError>
    where
        C: AsyncWrite + Unpin,
        S: AsyncRead + Unpin,
    {
        let server_final_message = read_server(server).await?;
        if !client_proof_valid {
            if server_final_message[0] == ERROR_RESPONSE {
                return forward_refusal(client, &server_final_message)
                    .await
                    .map(Some);
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
            return forward_refusal(client, &server_final_message)
                .await
                .map(Some);
        };
        // The server proves it knows the same secret; the client gets the proof for its own
        // exchange.
        let keys = &self.secret.keys;
        let expected = format!(
            "v={}",
            scram::base64(&keys.server_signature(signatures.upstream))
        );
        if !scram::constant_time_eq(server_final, expected.as_bytes()) {
            return Err(AuthError::ServerScram(
                "the server's SCRAM signature does not match the stored secret".into(),
            ));
        }
        let client_final = format!(
            "v={}",
            scram::base64(&keys.server_signature(signatures.client))
        );
        let reply = backend::authentication(auth_request::SASL_FINAL, client_final.as_bytes());
        client.write_all(&reply).await.map_err(AuthError::Client)?;
        Ok(None)
    }
}

/// The two AuthMessages the exchange signs: lockguard's with the server, the client's with
/// lockguard.
struct Signatures<'a> {
    upstream: &'a str,
    client: &'a str,
}

/// The client broke the SCRAM protocol.
fn protocol_error(what: String) -> AuthError {
    AuthError::Client(io::Error::new(io::ErrorKind::InvalidData, what))
}

/// The server's answer was not the next SCRAM step: pass it on (an ErrorResponse, normally)
/// and end.
async fn forward_refusal<C: AsyncWrite + Unpin>(
    client: &mut C,
    message: &[u8],
) -> Result<AuthEnd, AuthError> {
    if message[0] != ERROR_RESPONSE {
        return Err(AuthError::ServerScram(format!(
            "unexpected message {:?} during SCRAM",
            char::from(message[0])
        )));
    }
    client.write_all(message).await.map_err(AuthError::Client)?;
    Ok(AuthEnd::Refused)
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::auth::testing::{
        expect, login, read_one, refusal, sasl, sasl_initial, sasl_response, END_POINT,
    };
    use crate::auth::{relay_authentication, AuthEnd, AuthError};
    use crate::protocol::backend::{auth_request, authentication as auth};
    use crate::scram::{self, ScramKeys, ScramSecret};

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
}
