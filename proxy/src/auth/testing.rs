//! What the auth modules' unit tests share: a login, message builders and timed reads.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::message::read_server;
use super::Login;
use crate::protocol::backend::{self, ERROR_RESPONSE};
use crate::protocol::frontend;
use crate::protocol::message as msg;
use crate::upstream::ChannelBinding;

pub(super) const END_POINT: [u8; 32] = [0xab; 32];

pub(super) fn login() -> Login<'static> {
    Login {
        client: SocketAddr::from(([127, 0, 0, 1], 40000)),
        user: "alice",
        upstream: ChannelBinding::EndPoint(END_POINT.to_vec()),
    }
}

pub(super) fn unavailable(certificate_verified: bool) -> Login<'static> {
    Login {
        upstream: ChannelBinding::Unavailable {
            reason: "an Ed25519 certificate".into(),
            certificate_verified,
        },
        ..login()
    }
}

pub(super) async fn read_one<R: AsyncRead + Unpin>(from: &mut R) -> Vec<u8> {
    let read = tokio::time::timeout(Duration::from_secs(5), read_server(from));
    match read.await {
        Ok(Ok(message)) => message,
        Ok(Err(e)) => panic!("reading a message: {e}"),
        Err(_) => panic!("no message in time"),
    }
}

pub(super) fn sasl_initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    frontend::sasl_initial_response(mechanism, data, &mut out).unwrap();
    out.to_vec()
}

pub(super) fn sasl_response(data: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    frontend::sasl_response(data, &mut out).unwrap();
    out.to_vec()
}

pub(super) fn refusal() -> Vec<u8> {
    msg(
        ERROR_RESPONSE,
        b"SFATAL\0C28P01\0Mpassword authentication failed\0\0",
    )
}

pub(super) fn sasl(mechanisms: &[&str]) -> Vec<u8> {
    backend::authentication_sasl(mechanisms.iter().map(|m| m.as_bytes()))
}

pub(super) async fn expect<R: AsyncRead + Unpin>(from: &mut R, expected: &[u8]) {
    let mut seen = vec![0u8; expected.len()];
    tokio::time::timeout(Duration::from_secs(5), from.read_exact(&mut seen))
        .await
        .expect("relayed in time")
        .unwrap();
    assert_eq!(seen, expected);
}
