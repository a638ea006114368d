//! Channel binding: what the client is offered (never `-PLUS`: two TLS channels cannot be
//! bound as one), which client announces it could bind, and how lockguard binds its own
//! exchange with the server.

use super::Login;
use crate::protocol::backend;
use crate::protocol::frontend::PASSWORD_MESSAGE;
use crate::scram;
use crate::upstream::ChannelBinding;

/// The SASL mechanism with channel binding.
pub(super) const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// How lockguard, as the server's SCRAM client, binds: the mechanism, the gs2 header and the
/// binding data its `c=` carries after the header.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct UpstreamGs2 {
    pub(super) mechanism: &'static str,
    pub(super) header: &'static str,
    pub(super) data: Vec<u8>,
}

/// The binding lockguard uses towards the server, or why it cannot complete the login safely.
pub(super) fn upstream_binding(login: &Login<'_>, offered: bool) -> Result<UpstreamGs2, String> {
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

/// A SASLInitialResponse choosing SCRAM-SHA-256 with gs2 flag `y`: its client-first data.
pub(super) fn binding_capable_scram(answer: &[u8]) -> Option<&[u8]> {
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

/// Whether an AuthenticationSASL lists `mechanism`.
pub(super) fn offers(message: &[u8], mechanism: &str) -> bool {
    message
        .get(9..)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .take_while(|name| !name.is_empty())
        .any(|name| name == mechanism.as_bytes())
}

/// AuthenticationSASL with every `-PLUS` (channel binding) mechanism removed.
pub(super) fn without_channel_binding(message: &[u8]) -> Vec<u8> {
    let mechanisms = message[9..]
        .split(|&b| b == 0)
        .take_while(|name| !name.is_empty())
        .filter(|name| !name.ends_with(b"-PLUS"));
    backend::authentication_sasl(mechanisms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testing::{login, sasl, unavailable, END_POINT};

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

    #[test]
    fn channel_binding_mechanisms_are_removed() {
        let offered = sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        assert_eq!(without_channel_binding(&offered), sasl(&["SCRAM-SHA-256"]));
        let plain = sasl(&["SCRAM-SHA-256"]);
        assert_eq!(without_channel_binding(&plain), plain);
    }
}
