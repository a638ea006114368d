//! The admin console: a PostgreSQL-protocol server (built on `pgwire`) so operators use `psql`
//! and drivers. It authenticates console users ([`super::auth`]), parses each statement with
//! [`Command::parse`] and answers with the command's table. The simple and the extended query
//! protocol are both accepted; statements take no parameters. It speaks TLS when it has a
//! certificate (`admin.tls_cert`, else `[tls] client_cert`), and with `admin.require_tls`
//! refuses plaintext logins.
//!
//! Before a login the console is open to anyone who can reach it, so what a connection can
//! cost is bounded: at most [`MAX_CONSOLE_CONNECTIONS`] at once, `proxy.startup_timeout` to
//! log in, messages of at most [`super::framing::MAX_CONSOLE_MESSAGE`] bytes, and SCRAM's key
//! derivation off the runtime thread ([`super::auth`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgwire::api::auth::{AuthDriver, DefaultServerParameterProvider, StartupHandler};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::{ClientInfo, DefaultClient, PgWireConnectionState, PgWireServerHandlers};
use pgwire::error::{ErrorInfo, PgWireError};
use pgwire::messages::response::{GssEncResponse, SslResponse};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage, SslNegotiationMetaMessage};
use pgwire::tokio::server::{process_error, process_message, PgWireMessageServerCodec};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::accept::{serve_connections, Admission};
use crate::admin::commands::Command;
use crate::admin::framing::{FramingError, LimitedFraming};
use crate::admin::Admin;
use crate::protocol::{self, sqlstate};
use crate::stream::ClientStream;

mod login;
mod queries;

use login::Startup;
use queries::{CommandParser, Queries};

/// Most console connections served at once; more are refused with 53300. Operators need a
/// handful; the bound keeps unauthenticated connections from piling up.
pub const MAX_CONSOLE_CONNECTIONS: usize = 64;

/// The socket pgwire speaks over: the client's bytes (plain or TLS) checked against the
/// console's length limits ([`LimitedFraming`]).
type ConsoleSocket = Framed<LimitedFraming<ClientStream>, PgWireMessageServerCodec<Command>>;

/// A console socket at its start, before any byte was read.
fn console_socket(stream: ClientStream, peer: SocketAddr) -> ConsoleSocket {
    let secure = stream.is_tls();
    Framed::new(
        LimitedFraming::new(stream),
        PgWireMessageServerCodec::new(DefaultClient::new(peer, secure)),
    )
}

/// Accepts console connections until `stop` is cancelled, then closes the open ones.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    let handlers = Arc::new(Handlers::new(Arc::clone(&admin)));
    let message = format!(
        "lockguard: too many admin console connections (at most {MAX_CONSOLE_CONNECTIONS})"
    );
    let admission = Admission {
        name: "admin console",
        limit: MAX_CONSOLE_CONNECTIONS,
        // 53300, as PostgreSQL's "too many clients".
        refusal: protocol::fatal_error(sqlstate::TOO_MANY_CONNECTIONS, &message).to_vec(),
    };
    let stopping = stop.clone();
    serve_connections(listener, admission, stop, move |socket, peer| {
        // Like the proxy's clients: this long to get through startup and authentication.
        let login_deadline = admin.config().proxy.startup_timeout;
        let handlers = Arc::clone(&handlers);
        let stop = stopping.clone();
        async move {
            debug!(%peer, "admin console connection");
            tokio::select! {
                served = serve_connection(socket, peer, &handlers, login_deadline) => {
                    if let Err(e) = served {
                        debug!(%peer, error = %e, "admin console connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {}
            }
        }
    })
    .await;
}

/// Serves one console connection: what `pgwire::tokio::process_socket` does, over a socket
/// that enforces the console's message limits, with the login bounded by `login_deadline`.
/// The console answers encryption requests and enforces `admin.require_tls` itself
/// ([`intercept`]); pgwire handles the rest.
async fn serve_connection(
    socket: TcpStream,
    peer: SocketAddr,
    handlers: &Handlers,
    login_deadline: Duration,
) -> Result<(), PgWireError> {
    let mut socket = console_socket(ClientStream::Plain(socket), peer);
    let copy = handlers.copy_handler();
    let cancel = handlers.cancel_handler();
    let deadline = tokio::time::sleep(login_deadline);
    tokio::pin!(deadline);
    loop {
        let Some(message) = next_message(&mut socket, peer, deadline.as_mut()).await? else {
            return Ok(());
        };
        let message = match intercept(socket, message, peer, handlers).await? {
            Intercepted::Pass(passed, message) => {
                socket = passed;
                message
            }
            Intercepted::Answered(answered) => {
                socket = answered;
                continue;
            }
            Intercepted::Close => return Ok(()),
        };
        let is_extended_query = match socket.state() {
            PgWireConnectionState::CopyInProgress(extended) => extended,
            _ => message.is_extended_query(),
        };
        let is_cancel_request = matches!(message, PgWireFrontendMessage::CancelRequest(_));
        let processed = process_message(
            message,
            &mut socket,
            Arc::clone(&handlers.startup),
            Arc::clone(&handlers.queries),
            Arc::clone(&handlers.queries),
            Arc::clone(&copy),
            Arc::clone(&cancel),
        )
        .await;
        if let Err(e) = processed {
            // A FATAL error ends the session, as in PostgreSQL.
            let fatal = e.is_fatal();
            process_error(&mut socket, e, is_extended_query).await?;
            if fatal {
                return Ok(());
            }
        }
        if is_cancel_request {
            return Ok(());
        }
    }
}

/// The client's next message; `None` when the connection should end quietly (the client
/// left, or did not log in by `deadline`). A message over the console's length limit is
/// answered with a FATAL naming the limit before the error is returned.
async fn next_message(
    socket: &mut ConsoleSocket,
    peer: SocketAddr,
    deadline: std::pin::Pin<&mut tokio::time::Sleep>,
) -> Result<Option<PgWireFrontendMessage>, PgWireError> {
    let logging_in = matches!(
        socket.state(),
        PgWireConnectionState::AwaitingSslRequest
            | PgWireConnectionState::AwaitingStartup
            | PgWireConnectionState::AuthenticationInProgress
    );
    let next = if logging_in {
        tokio::select! {
            next = socket.next() => next,
            _ = deadline => {
                info!(%peer, "admin console connection did not log in within startup_timeout; closing");
                return Ok(None);
            }
        }
    } else {
        socket.next().await
    };
    match next {
        None => Ok(None),
        Some(Ok(message)) => Ok(Some(message)),
        Some(Err(PgWireError::IoError(e))) => {
            if let Some(framing) = FramingError::from_io(&e) {
                info!(%peer, error = %framing, "admin console connection closed");
                let fatal = ErrorInfo::new(
                    "FATAL".to_owned(),
                    sqlstate::PROTOCOL_VIOLATION.to_owned(),
                    format!("lockguard admin console: {framing}"),
                );
                socket
                    .send(PgWireBackendMessage::ErrorResponse(fatal.into()))
                    .await?;
            }
            Err(PgWireError::IoError(e))
        }
        Some(Err(e)) => Err(e),
    }
}

/// What the console did with a message before pgwire sees it.
enum Intercepted {
    /// Not the console's: pgwire processes it.
    Pass(ConsoleSocket, PgWireFrontendMessage),
    /// Answered here (an encryption request); the socket may now be TLS.
    Answered(ConsoleSocket),
    /// The connection ends here.
    Close,
}

/// The messages the console answers itself: an SSLRequest gets TLS when the console has a
/// certificate (its own or the client side's), 'N' otherwise; GSS encryption is always
/// declined; with `admin.require_tls`, a plaintext login is refused.
async fn intercept(
    mut socket: ConsoleSocket,
    message: PgWireFrontendMessage,
    peer: SocketAddr,
    handlers: &Handlers,
) -> Result<Intercepted, PgWireError> {
    match message {
        PgWireFrontendMessage::SslNegotiation(SslNegotiationMetaMessage::PostgresSsl(_)) => {
            let acceptor = match socket.get_ref().get_ref() {
                // Inside TLS, the request is not repeated; pgwire's state no longer
                // expects one, so this is only reachable on the plain socket.
                ClientStream::Tls(_) => None,
                ClientStream::Plain(_) => handlers.startup.admin.console_tls_acceptor(),
            };
            let Some(acceptor) = acceptor else {
                socket
                    .send(PgWireBackendMessage::SslResponse(SslResponse::Refuse))
                    .await?;
                return Ok(Intercepted::Answered(socket));
            };
            Ok(match start_tls(socket, peer, acceptor).await {
                Some(tls) => Intercepted::Answered(tls),
                None => Intercepted::Close,
            })
        }
        PgWireFrontendMessage::SslNegotiation(SslNegotiationMetaMessage::PostgresGss(_)) => {
            socket
                .send(PgWireBackendMessage::GssEncResponse(GssEncResponse::Refuse))
                .await?;
            Ok(Intercepted::Answered(socket))
        }
        PgWireFrontendMessage::SslNegotiation(SslNegotiationMetaMessage::None) => {
            // The startup packet (or a cancel request) is next; it is still buffered.
            socket.set_state(PgWireConnectionState::AwaitingStartup);
            Ok(Intercepted::Answered(socket))
        }
        // The client is leaving; some wait for the server to close first.
        PgWireFrontendMessage::Terminate(_) => Ok(Intercepted::Close),
        PgWireFrontendMessage::Startup(_)
            if !socket.get_ref().get_ref().is_tls()
                && handlers.startup.admin.config().admin.require_tls =>
        {
            info!(%peer, "admin console login refused: TLS is required");
            let fatal = ErrorInfo::new(
                "FATAL".to_owned(),
                sqlstate::INVALID_AUTHORIZATION.to_owned(),
                "lockguard admin console: TLS is required (admin.require_tls); connect \
                 with sslmode=require"
                    .to_owned(),
            );
            socket
                .send(PgWireBackendMessage::ErrorResponse(fatal.into()))
                .await?;
            Ok(Intercepted::Close)
        }
        message => Ok(Intercepted::Pass(socket, message)),
    }
}

/// Answers 'S' to an SSLRequest and runs the TLS handshake; the console socket over TLS, or
/// `None` when the connection ends here (the reason logged).
async fn start_tls(
    socket: ConsoleSocket,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
) -> Option<ConsoleSocket> {
    let mut socket = socket;
    if let Err(e) = socket
        .send(PgWireBackendMessage::SslResponse(SslResponse::Accept))
        .await
    {
        debug!(%peer, error = %e, "admin console client left during TLS negotiation");
        return None;
    }
    let parts = socket.into_parts();
    if !parts.read_buf.is_empty() {
        // Bytes sent before the handshake would count as if they came over TLS.
        warn!(%peer, "admin console client sent data after its SSLRequest, before TLS; closing");
        return None;
    }
    let ClientStream::Plain(tcp) = parts.io.into_inner() else {
        return None;
    };
    match acceptor.accept(tcp).await {
        Ok(tls) => {
            let mut socket = console_socket(ClientStream::Tls(Box::new(tls)), peer);
            socket.set_state(PgWireConnectionState::AwaitingStartup);
            Some(socket)
        }
        Err(e) => {
            warn!(%peer, error = %e, "admin console TLS handshake failed");
            None
        }
    }
}

/// The pgwire handlers of the console.
struct Handlers {
    startup: Arc<Startup>,
    queries: Arc<Queries>,
}

impl Handlers {
    fn new(admin: Arc<Admin>) -> Handlers {
        let mut parameters = DefaultServerParameterProvider::default();
        // Clients read the major version from here; name what they are talking to.
        parameters.server_version = format!("16.0 ({})", crate::admin::commands::version());
        parameters.is_superuser = false;
        Handlers {
            startup: Arc::new(Startup {
                admin: Arc::clone(&admin),
                driver: AuthDriver::new(parameters),
            }),
            queries: Arc::new(Queries {
                admin,
                parser: Arc::new(CommandParser),
            }),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.queries)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.queries)
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.startup)
    }
}
