//! One accepted client connection, from its first byte to the end of its session: startup,
//! then either a forwarded cancel request or a session pumped to its upstream backend.

use std::net::SocketAddr;
use std::sync::Arc;

use guard_core::ClientInfo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::auth::{self, AuthEnd};
use crate::protocol::sqlstate;
use crate::scram::ScramSecret;
use crate::session::{self, farewell, SessionContext};
use crate::startup::{self, FirstPacket, Negotiation, StartupError, StartupMessage};
use crate::stream::ClientStream;
use crate::{tls, upstream};
use crate::{GuardHandle, Shared};

/// Serves one client connection. `slot` is its share of `max_clients`; `None` means the proxy
/// is full and the client is told so once it has said what it wants (cancel requests are still
/// served: they free capacity rather than use it).
pub(crate) async fn serve(
    tcp: TcpStream,
    addr: SocketAddr,
    shared: Arc<Shared>,
    slot: Option<OwnedSemaphorePermit>,
) {
    let startup_deadline = Instant::now() + shared.proxy.startup_timeout;
    // The startup phase's futures (TLS handshakes, the upstream connect, the authentication
    // relay) are boxed: inline, their several KB of state would stay in every session's task
    // for its whole life, though only the pump's state is needed after startup.
    let negotiated =
        tokio::time::timeout_at(startup_deadline, Box::pin(negotiate(tcp, addr, &shared))).await;
    let (mut stream, first) = match negotiated {
        Ok(Some(negotiated)) => negotiated,
        Ok(None) => return,
        Err(_) => {
            shared.stats.startup_timed_out();
            info!(client = %addr, "no startup packet within startup_timeout; closing");
            return;
        }
    };
    match first {
        FirstPacket::Cancel(packet) => Box::pin(forward_cancel(&packet, &shared)).await,
        // Only returned by `read_first_packet` when TLS is offered, which `negotiate` handles.
        FirstPacket::TlsRequested => {}
        FirstPacket::Startup(_) if slot.is_none() => {
            shared.stats.client_refused();
            warn!(client = %addr, max_clients = shared.proxy.max_clients, "refusing client: proxy is full");
            let message = format!(
                "lockguard: too many clients already (max_clients = {})",
                shared.proxy.max_clients
            );
            farewell(&mut stream, sqlstate::TOO_MANY_CONNECTIONS, &message).await;
        }
        FirstPacket::Startup(_) if !stream.is_tls() && shared.tls.clients_must_use_tls() => {
            shared.stats.startup_rejected();
            info!(client = %addr, "refusing plaintext client: TLS is required");
            farewell(
                &mut stream,
                sqlstate::INVALID_AUTHORIZATION,
                "lockguard: TLS is required (connect with sslmode=require)",
            )
            .await;
        }
        FirstPacket::Startup(startup) => {
            run_session(stream, addr, startup, startup_deadline, &shared).await;
            drop(slot);
        }
    }
}

/// Reads the client's first packets, doing the TLS handshake if it asks for one (with an
/// SSLRequest, or directly with a ClientHello) and lockguard has a certificate. `None` when
/// the connection ended (already logged and answered).
async fn negotiate(
    mut tcp: TcpStream,
    addr: SocketAddr,
    shared: &Shared,
) -> Option<(ClientStream, FirstPacket)> {
    let acceptor = shared.tls.client_acceptor();
    match startup::opens_with_tls_handshake(&tcp).await {
        Ok(Some(true)) => return direct_tls(tcp, acceptor, addr, shared).await,
        Ok(Some(false)) => {}
        Ok(None) => return None,
        Err(e) => {
            debug!(client = %addr, error = %e, "client left during startup");
            return None;
        }
    }
    let first = read_first(
        &mut tcp,
        Negotiation::plaintext(acceptor.is_some()),
        addr,
        shared,
    )
    .await?;
    let (FirstPacket::TlsRequested, Some(acceptor)) = (&first, acceptor) else {
        return Some((ClientStream::Plain(tcp), first));
    };
    if let Err(e) = tcp.write_all(b"S").await {
        debug!(client = %addr, error = %e, "client left during TLS negotiation");
        return None;
    }
    let mut tls = match acceptor.accept(tcp).await {
        Ok(tls) => ClientStream::Tls(Box::new(tls)),
        Err(e) => {
            shared.stats.startup_rejected();
            warn!(client = %addr, error = %e, "client TLS handshake failed");
            return None;
        }
    };
    let first = read_first(&mut tls, Negotiation::after_ssl_request(), addr, shared).await?;
    Some((tls, first))
}

/// Direct TLS negotiation (PostgreSQL 17+, libpq's `sslnegotiation=direct`): the client opened
/// with a ClientHello. As PostgreSQL does, it is refused without an answer unless lockguard has
/// a certificate and the client negotiated ALPN `postgresql`; then the startup proceeds inside
/// TLS as after an SSLRequest.
async fn direct_tls(
    tcp: TcpStream,
    acceptor: Option<TlsAcceptor>,
    addr: SocketAddr,
    shared: &Shared,
) -> Option<(ClientStream, FirstPacket)> {
    let Some(acceptor) = acceptor else {
        shared.stats.startup_rejected();
        warn!(
            client = %addr,
            "refusing a direct TLS connection (the client sent a TLS ClientHello without an \
             SSLRequest): lockguard has no certificate for clients ([tls] client_cert and \
             client_key)"
        );
        return None;
    };
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            shared.stats.startup_rejected();
            warn!(client = %addr, error = %e, "client TLS handshake failed (direct TLS)");
            return None;
        }
    };
    if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN_POSTGRESQL) {
        shared.stats.startup_rejected();
        warn!(
            client = %addr,
            "refusing a direct TLS connection without ALPN protocol \"postgresql\" (as \
             PostgreSQL does, so that TLS meant for another service is not taken for ours)"
        );
        return None;
    }
    let mut tls = ClientStream::Tls(Box::new(tls));
    let first = read_first(&mut tls, Negotiation::after_direct_tls(), addr, shared).await?;
    Some((tls, first))
}

async fn read_first<S>(
    stream: &mut S,
    negotiation: Negotiation,
    addr: SocketAddr,
    shared: &Shared,
) -> Option<FirstPacket>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match startup::read_first_packet(stream, negotiation).await {
        Ok(first) => Some(first),
        Err(StartupError::Rejected { sqlstate, message }) => {
            shared.stats.startup_rejected();
            warn!(client = %addr, "{message}");
            farewell(stream, sqlstate, &message).await;
            None
        }
        Err(StartupError::RejectedOldProtocol(message)) => {
            shared.stats.startup_rejected();
            warn!(client = %addr, "{message}");
            let answer = startup::old_protocol_error(&message);
            let send = async {
                stream.write_all(&answer).await?;
                stream.shutdown().await
            };
            if let Err(e) = send.await {
                debug!(client = %addr, error = %e, "could not deliver the closing error");
            }
            None
        }
        Err(StartupError::Dropped(reason)) => {
            shared.stats.startup_rejected();
            info!(client = %addr, "{reason}");
            None
        }
        Err(StartupError::Io(e)) => {
            debug!(client = %addr, error = %e, "client left during startup");
            None
        }
    }
}

/// Connects upstream, registers the session, forwards the StartupMessage and pumps.
async fn run_session(
    mut client: ClientStream,
    addr: SocketAddr,
    startup: StartupMessage,
    startup_deadline: Instant,
    shared: &Shared,
) {
    let upstream_tls = shared.tls.upstream();
    let connected = Box::pin(upstream::connect(
        &shared.proxy.upstream,
        upstream_tls.as_ref(),
        shared.proxy.connect_timeout,
    ))
    .await;
    let mut upstream = match connected {
        Ok(upstream) => upstream,
        Err(reason) => {
            shared.stats.upstream_connect_failed();
            warn!(client = %addr, user = %startup.user, database = %startup.database, "{reason}");
            let message = format!("lockguard: {reason}");
            farewell(&mut client, sqlstate::CONNECTION_FAILURE, &message).await;
            return;
        }
    };
    let identity = match upstream.identity() {
        Ok(identity) => identity,
        Err(e) => {
            warn!(error = %e, "upstream socket has no local address");
            let message = format!("lockguard: upstream socket failed: {e}");
            farewell(&mut client, sqlstate::CONNECTION_FAILURE, &message).await;
            return;
        }
    };
    let registration = shared.registry.register(
        ClientInfo {
            addr,
            user: startup.user,
            database: startup.database,
            application_name: startup.application_name,
        },
        identity,
    );
    let record = registration.record();
    shared.stats.session_started();
    let span = tracing::info_span!("session", id = record.id, client = %addr);
    let ctx = SessionContext {
        guard: shared.guard.clone(),
        inflight_grace: shared.inflight_grace,
        startup_deadline,
        startup_timeout: shared.proxy.startup_timeout,
        shutdown: shared.shutdown.clone(),
        hard_stop: shared.hard_stop.clone(),
    };
    async {
        debug!(
            user = %record.client.user,
            database = %record.client.database,
            client_tls = client.is_tls(),
            upstream_tls = upstream.is_tls(),
            "session started"
        );
        if let Err(e) = upstream.write_all(&startup.raw).await {
            warn!(error = %e, "could not send the startup packet upstream");
            return;
        }
        if upstream.is_tls() {
            let relayed = tokio::time::timeout_at(
                startup_deadline,
                Box::pin(auth::relay_authentication(
                    &mut client,
                    &mut upstream,
                    || scram_secret(shared.guard.as_ref(), &record.client.user),
                )),
            )
            .await;
            match relayed {
                Ok(Ok(AuthEnd::Authenticated)) => {}
                Ok(Ok(AuthEnd::Refused)) => {
                    debug!("authentication refused by the server");
                    return;
                }
                Ok(Err(e)) => {
                    info!(error = %e, "authentication exchange failed");
                    return;
                }
                Err(_) => {
                    info!("client did not finish authentication within startup_timeout");
                    return;
                }
            }
        }
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = upstream.into_split();
        session::pump(
            client_read,
            client_write,
            server_read,
            server_write,
            record,
            &ctx,
        )
        .await;
        shared
            .stats
            .session_ended(record.bytes_from_client(), record.bytes_from_server());
        debug!(
            bytes_from_client = record.bytes_from_client(),
            bytes_from_server = record.bytes_from_server(),
            "session ended"
        );
    }
    .instrument(span)
    .await;
}

/// The stored SCRAM secret of `user`, read by the guard (see [`auth`] for when it is needed).
/// A role without one gets a mock secret, so the client learns no more than PostgreSQL would
/// tell it ("password authentication failed"). The error is for the log only.
async fn scram_secret(guard: Option<&GuardHandle>, user: &str) -> Result<ScramSecret, String> {
    let guard = guard.ok_or("no guard.dsn is configured")?;
    match guard.password_secret(user).await {
        Ok(stored) => Ok(stored
            .as_deref()
            .and_then(ScramSecret::parse)
            .unwrap_or_else(|| {
                debug!(%user, "no SCRAM secret stored for this role: mock authentication");
                ScramSecret::mock()
            })),
        Err(e) => Err(e.to_string()),
    }
}

/// Passes a CancelRequest to the server unchanged. The server answers by closing the
/// connection once it has handled the request; waiting for that keeps the client's view of
/// "cancel sent" the same as with a direct connection.
async fn forward_cancel(packet: &[u8], shared: &Shared) {
    let timeout = shared.proxy.connect_timeout;
    let tls = shared.tls.upstream();
    let mut upstream = match upstream::connect(&shared.proxy.upstream, tls.as_ref(), timeout).await
    {
        Ok(upstream) => upstream,
        Err(reason) => {
            shared.stats.upstream_connect_failed();
            warn!("cancel request not delivered: {reason}");
            return;
        }
    };
    let delivered = deliver(&mut upstream, packet);
    match tokio::time::timeout(timeout, delivered).await {
        Ok(Ok(())) => {
            shared.stats.cancel_forwarded();
            debug!("cancel request forwarded");
        }
        Ok(Err(e)) => warn!(error = %e, "cancel request not delivered"),
        Err(_) => warn!("cancel request: server did not close the connection in time"),
    }
}

async fn deliver<S>(server: &mut S, packet: &[u8]) -> std::io::Result<()>
where
    S: AsyncReadExt + AsyncWriteExt + Unpin,
{
    server.write_all(packet).await?;
    let mut sink = [0u8; 64];
    while server.read(&mut sink).await? > 0 {}
    Ok(())
}
