//! The sockets a session pumps between: a client connection (plain TCP or TLS) and an upstream
//! connection (TCP, unix socket, or TLS over TCP), each splittable into a read and a write half
//! so both directions run at once.
//!
//! Plain sockets split into owned halves without any lock. A TLS stream is one state machine,
//! so its halves share it through `tokio::io::split` (an uncontended lock per poll).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::{tcp, unix, TcpStream, UnixStream};

type ClientTls = tokio_rustls::server::TlsStream<TcpStream>;
type UpstreamTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Implements `AsyncRead` for an enum whose variants each hold one reader.
macro_rules! delegate_read {
    ($ty:ident { $($variant:ident),+ }) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(inner) => Pin::new(inner).poll_read(cx, buf),)+
                }
            }
        }
    };
}

/// Implements `AsyncWrite` for an enum whose variants each hold one writer.
macro_rules! delegate_write {
    ($ty:ident { $($variant:ident),+ }) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(inner) => Pin::new(inner).poll_write(cx, buf),)+
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(inner) => Pin::new(inner).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(inner) => Pin::new(inner).poll_shutdown(cx),)+
                }
            }
        }
    };
}

/// A client connection after startup negotiation.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<ClientTls>),
}

pub enum ClientReader {
    Plain(tcp::OwnedReadHalf),
    Tls(ReadHalf<Box<ClientTls>>),
}

pub enum ClientWriter {
    Plain(tcp::OwnedWriteHalf),
    Tls(WriteHalf<Box<ClientTls>>),
}

delegate_read!(ClientStream { Plain, Tls });
delegate_write!(ClientStream { Plain, Tls });
delegate_read!(ClientReader { Plain, Tls });
delegate_write!(ClientWriter { Plain, Tls });

impl ClientStream {
    pub fn into_split(self) -> (ClientReader, ClientWriter) {
        match self {
            ClientStream::Plain(s) => {
                let (r, w) = s.into_split();
                (ClientReader::Plain(r), ClientWriter::Plain(w))
            }
            ClientStream::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (ClientReader::Tls(r), ClientWriter::Tls(w))
            }
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }
}

/// A connection to PostgreSQL.
pub enum UpstreamStream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<UpstreamTls>),
}

pub enum UpstreamReader {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    Tls(ReadHalf<Box<UpstreamTls>>),
}

pub enum UpstreamWriter {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    Tls(WriteHalf<Box<UpstreamTls>>),
}

delegate_read!(UpstreamStream { Tcp, Unix, Tls });
delegate_write!(UpstreamStream { Tcp, Unix, Tls });
delegate_read!(UpstreamReader { Tcp, Unix, Tls });
delegate_write!(UpstreamWriter { Tcp, Unix, Tls });

impl UpstreamStream {
    pub fn into_split(self) -> (UpstreamReader, UpstreamWriter) {
        match self {
            UpstreamStream::Tcp(s) => {
                let (r, w) = s.into_split();
                (UpstreamReader::Tcp(r), UpstreamWriter::Tcp(w))
            }
            UpstreamStream::Unix(s) => {
                let (r, w) = s.into_split();
                (UpstreamReader::Unix(r), UpstreamWriter::Unix(w))
            }
            UpstreamStream::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (UpstreamReader::Tls(r), UpstreamWriter::Tls(w))
            }
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, UpstreamStream::Tls(_))
    }
}

impl ClientReader {
    /// A plain TCP connection, which the forwarding thread can carry.
    pub fn is_plain(&self) -> bool {
        matches!(self, ClientReader::Plain(_))
    }
}

impl UpstreamReader {
    /// A plain TCP or unix-socket connection, which the forwarding thread can carry.
    pub fn is_plain(&self) -> bool {
        !matches!(self, UpstreamReader::Tls(_))
    }
}

/// The error of taking out halves that are not one plain socket's.
fn not_one_plain_socket() -> io::Error {
    io::Error::other("the halves are not those of one plain socket")
}

/// Joins plain halves into their socket and takes it out of tokio's reactor (non-blocking),
/// for the forwarding thread.
pub fn take_out_client(read: ClientReader, write: ClientWriter) -> io::Result<std::net::TcpStream> {
    match (read, write) {
        (ClientReader::Plain(r), ClientWriter::Plain(w)) => {
            r.reunite(w).map_err(|_| not_one_plain_socket())?.into_std()
        }
        _ => Err(not_one_plain_socket()),
    }
}

/// [`take_out_client`] for the upstream connection (TCP or unix socket).
pub fn take_out_upstream(
    read: UpstreamReader,
    write: UpstreamWriter,
) -> io::Result<crate::session::PlainUpstream> {
    use crate::session::PlainUpstream;
    match (read, write) {
        (UpstreamReader::Tcp(r), UpstreamWriter::Tcp(w)) => r
            .reunite(w)
            .map_err(|_| not_one_plain_socket())?
            .into_std()
            .map(PlainUpstream::Tcp),
        (UpstreamReader::Unix(r), UpstreamWriter::Unix(w)) => r
            .reunite(w)
            .map_err(|_| not_one_plain_socket())?
            .into_std()
            .map(PlainUpstream::Unix),
        _ => Err(not_one_plain_socket()),
    }
}

/// Puts a socket the forwarding thread gave back into tokio's reactor, split again.
pub fn put_back_client(socket: std::net::TcpStream) -> io::Result<(ClientReader, ClientWriter)> {
    Ok(ClientStream::Plain(TcpStream::from_std(socket)?).into_split())
}

/// [`put_back_client`] for the upstream connection.
pub fn put_back_upstream(
    socket: crate::session::PlainUpstream,
) -> io::Result<(UpstreamReader, UpstreamWriter)> {
    use crate::session::PlainUpstream;
    let stream = match socket {
        PlainUpstream::Tcp(s) => UpstreamStream::Tcp(TcpStream::from_std(s)?),
        PlainUpstream::Unix(s) => UpstreamStream::Unix(UnixStream::from_std(s)?),
    };
    Ok(stream.into_split())
}
