//! Reading one whole authentication message from either side, cancel-safe and never past the
//! message's end.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::AuthError;

/// Authentication messages are small (GSSAPI tokens are the largest, a few KiB).
const MAX_AUTH_MESSAGE: usize = 64 * 1024;

pub(super) async fn read_server<S: AsyncRead + Unpin>(
    server: &mut S,
) -> Result<Vec<u8>, AuthError> {
    read_server_into(server, &mut Vec::new()).await
}

pub(super) async fn read_client<C: AsyncRead + Unpin>(
    client: &mut C,
) -> Result<Vec<u8>, AuthError> {
    read_client_into(client, &mut Vec::new()).await
}

pub(super) async fn read_server_into<S: AsyncRead + Unpin>(
    server: &mut S,
    partial: &mut Vec<u8>,
) -> Result<Vec<u8>, AuthError> {
    let read = read_message_into(server, partial).await;
    read.map_err(|e| e.into_auth_error("the server", AuthError::Server))
}

pub(super) async fn read_client_into<C: AsyncRead + Unpin>(
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
