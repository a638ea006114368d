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
//!
//! The files: [`relay`] carries the exchange between the two sides; [`binding`] decides what
//! channel binding is offered, announced and used; [`on_behalf`] runs SCRAM in the server's
//! place towards a binding-capable client and in the client's place towards the server;
//! [`message`] reads one whole authentication message from either side.

mod binding;
mod message;
mod on_behalf;
mod relay;
#[cfg(test)]
mod testing;

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use crate::scram::ScramSecret;
use crate::upstream::ChannelBinding;

pub use relay::relay_authentication;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
