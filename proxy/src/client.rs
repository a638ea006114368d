//! One accepted client connection, from its first byte to the end of its session: startup,
//! then either a forwarded cancel request or a session pumped to its upstream backend.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use guard_core::{ClientInfo, KillNotice, SessionRecord, TxnState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument, Level};

use crate::auth::{self, AuthEnd};
use crate::protocol::{backend, encryption_answer, sqlstate};
use crate::scram::ScramSecret;
use crate::session::{self, farewell, session_event, PlainSockets, SessionContext, SessionSpan};
use crate::startup::{self, FirstPacket, Negotiation, StartupError, StartupMessage};
use crate::stats::ProxyStats;
use crate::stream::{
    self, ClientReader, ClientStream, ClientWriter, UpstreamReader, UpstreamStream, UpstreamWriter,
};
use crate::tls::UpstreamTls;
use crate::{tls, upstream};
use crate::{GuardHandle, Shared};

/// Serves one client connection. `startup` is its share of `max_startup_clients`, held until
/// its startup is over; the session then needs a share of `max_clients` ([`SlotHandover`]).
/// When `max_clients` is already full the client is told so once it has said what it wants
/// (cancel requests are still served: they free capacity rather than use it).
pub(crate) async fn serve(
    tcp: TcpStream,
    addr: SocketAddr,
    shared: Arc<Shared>,
    startup: OwnedSemaphorePermit,
) {
    let startup_deadline = Instant::now() + shared.config().proxy.startup_timeout;
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
        // Full already: say so before connecting upstream. (A slot taken while this client
        // authenticates is caught when its startup ends, see `SlotHandover`.)
        FirstPacket::Startup(_) if shared.clients.available_permits() == 0 => {
            shared.stats.client_refused();
            warn!(client = %addr, max_clients = shared.config().proxy.max_clients, "refusing client: proxy is full");
            farewell(
                &mut stream,
                sqlstate::TOO_MANY_CONNECTIONS,
                &too_many_clients(&shared),
            )
            .await;
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
        FirstPacket::Startup(message) => {
            let handover = SlotHandover {
                startup,
                clients: Arc::clone(&shared.clients),
                max_clients: shared.config().proxy.max_clients,
                stats: Arc::clone(&shared.stats),
            };
            run_session(stream, addr, message, startup_deadline, &shared, handover).await;
        }
    }
}

/// What a client refused for `max_clients` is told.
fn too_many_clients(shared: &Shared) -> String {
    too_many_clients_message(shared.config().proxy.max_clients)
}

fn too_many_clients_message(max_clients: usize) -> String {
    format!("lockguard: too many clients already (max_clients = {max_clients})")
}

/// Refuses a connection over `max_startup_clients` at once: FATAL 53300, then close. It is
/// not asked for its startup packet, which a silent connection would never send.
pub(crate) async fn refuse_startup(tcp: TcpStream, max_startup_clients: usize) {
    let message = format!(
        "lockguard: too many connections are still starting up (max_startup_clients = \
         {max_startup_clients}); try again"
    );
    let answer = backend::fatal_error(sqlstate::TOO_MANY_CONNECTIONS, &message);
    crate::admin::accept::turn_away(tcp, &answer).await;
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
    if let Err(e) = tcp.write_all(&[encryption_answer::ACCEPTED]).await {
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
            let answer = backend::old_protocol_error(&message);
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
/// `handover` moves the session from its startup slot to a `max_clients` slot.
async fn run_session(
    mut client: ClientStream,
    addr: SocketAddr,
    startup: StartupMessage,
    startup_deadline: Instant,
    shared: &Shared,
    handover: SlotHandover,
) {
    let upstream_tls = shared.tls.upstream();
    let connected = Box::pin(upstream::connect(
        &shared.config().proxy.upstream,
        upstream_tls.as_ref(),
        shared.config().proxy.connect_timeout,
    ))
    .await;
    let mut upstream = match connected {
        Ok(upstream) => upstream,
        Err(reason) => {
            shared.stats.upstream_connect_failed(reason.reason());
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
    let ctx = SessionContext {
        guard: shared.guard.clone(),
        inflight_grace: shared.config().guard.inflight_grace,
        startup_deadline,
        startup_timeout: shared.config().proxy.startup_timeout,
        shutdown: shared.shutdown.clone(),
        hard_stop: shared.hard_stop.clone(),
        span: SessionSpan::new(record.id, addr),
        forwarder: shared.forwarder_for(record.id),
    };
    let authenticated = authenticate(
        &mut client,
        &mut upstream,
        addr,
        record,
        &startup.raw,
        upstream_tls.as_ref(),
        startup_deadline,
        shared,
        &ctx.span,
    )
    .await;
    if !authenticated {
        return;
    }
    let (client_read, client_write) = client.into_split();
    let client_write = handover.watch(client_write, record);
    let (server_read, server_write) = upstream.into_split();
    let sockets = SessionSockets {
        client_read,
        client_write,
        server_read,
        server_write,
    };
    session::pump(sockets, record, &ctx).await;
    shared
        .stats
        .session_ended(record.bytes_from_client(), record.bytes_from_server());
    session_event!(
        ctx.span,
        Level::DEBUG,
        bytes_from_client = record.bytes_from_client(),
        bytes_from_server = record.bytes_from_server(),
        "session ended"
    );
}

/// Sends the StartupMessage upstream and relays the authentication exchange (SCRAM on the
/// client's behalf where the server's exchange cannot be relayed as is), within the startup
/// deadline. False: the session ends here, the reason logged in `span`.
#[allow(clippy::too_many_arguments)] // the parts of a session still being put together; a struct would only move the list
async fn authenticate(
    client: &mut ClientStream,
    upstream: &mut UpstreamStream,
    addr: SocketAddr,
    record: &SessionRecord,
    startup_raw: &[u8],
    upstream_tls: Option<&UpstreamTls>,
    startup_deadline: Instant,
    shared: &Shared,
    span: &SessionSpan,
) -> bool {
    session_event!(
        span,
        Level::DEBUG,
        user = %record.client.user,
        database = %record.client.database,
        client_tls = client.is_tls(),
        upstream_tls = upstream.is_tls(),
        "session started"
    );
    if let Err(e) = upstream.write_all(startup_raw).await {
        session_event!(span, Level::WARN, error = %e, "could not send the startup packet upstream");
        return false;
    }
    let Some(binding) = upstream.channel_binding(upstream_tls) else {
        return true;
    };
    let login = auth::Login {
        client: addr,
        user: &record.client.user,
        upstream: binding,
    };
    // Relayed logins (an upstream TLS connection) are the rarer path: the span is made for it,
    // so what the exchange logs on the way is the session's.
    let relayed = tokio::time::timeout_at(
        startup_deadline,
        Box::pin(auth::relay_authentication(client, upstream, &login, || {
            scram_secret(shared.guard.as_ref(), &record.client.user)
        })),
    )
    .instrument(span.get().clone())
    .await;
    match relayed {
        Ok(Ok(AuthEnd::Authenticated)) => true,
        Ok(Ok(AuthEnd::Refused)) => {
            session_event!(span, Level::DEBUG, "authentication refused by the server");
            false
        }
        Ok(Err(e)) => {
            session_event!(span, Level::INFO, error = %e, "authentication exchange failed");
            false
        }
        Err(_) => {
            session_event!(
                span,
                Level::INFO,
                "client did not finish authentication within startup_timeout"
            );
            false
        }
    }
}

/// The stored SCRAM secret of `user`, read by the guard (see [`auth`] for when it is needed).
/// A role without one gets a mock secret, so the client learns no more than PostgreSQL would
/// tell it ("password authentication failed"). The error is for the log only.
///
/// The secret is looked up under the name PostgreSQL will authenticate (an over-long name cut
/// to 63 bytes): a longer one would only make the lookup fail, and the name is the client's.
async fn scram_secret(guard: Option<&GuardHandle>, user: &str) -> Result<ScramSecret, String> {
    let guard = guard.ok_or("no guard.dsn is configured")?;
    let Some(role) = auth::role_name(user) else {
        debug!(
            ?user,
            "the server cuts this name inside a character: mock authentication"
        );
        return Ok(ScramSecret::mock());
    };
    match guard.password_secret(role).await {
        Ok(stored) => Ok(stored
            .as_deref()
            .and_then(ScramSecret::parse)
            .unwrap_or_else(|| {
                debug!(
                    ?user,
                    "no SCRAM secret stored for this role: mock authentication"
                );
                ScramSecret::mock()
            })),
        Err(e) => Err(e.to_string()),
    }
}

/// Passes a CancelRequest to the server unchanged. The server answers by closing the
/// connection once it has handled the request; waiting for that keeps the client's view of
/// "cancel sent" the same as with a direct connection.
async fn forward_cancel(packet: &[u8], shared: &Shared) {
    let config = shared.config();
    let timeout = config.proxy.connect_timeout;
    let tls = shared.tls.upstream();
    let mut upstream = match upstream::connect(&config.proxy.upstream, tls.as_ref(), timeout).await
    {
        Ok(upstream) => upstream,
        Err(reason) => {
            shared.stats.upstream_connect_failed(reason.reason());
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

/// Moves a session from its `max_startup_clients` slot to a `max_clients` slot at the end of
/// its startup: once the server has sent BackendKeyData (it does so only after a successful
/// authentication) or its first ReadyForQuery. Until then a connection counts only against
/// the startup cap, so connections that never finish startup cannot take the slots of
/// authenticated clients.
pub(crate) struct SlotHandover {
    startup: OwnedSemaphorePermit,
    clients: Arc<Semaphore>,
    /// For what the client is told when `max_clients` filled up while it authenticated
    /// (formatted then only: every connection carries this).
    max_clients: usize,
    stats: Arc<ProxyStats>,
}

impl SlotHandover {
    /// Wraps the session's client writer: the pump's writes to the client are the first
    /// thing that runs after it has noted a server message, so the end of startup is seen
    /// there at once, at the cost of one branch per write afterwards.
    fn watch<W>(self, writer: W, record: &Arc<SessionRecord>) -> SlotWatch<W> {
        SlotWatch {
            inner: writer,
            pending: Some((self, Arc::clone(record))),
            _client_slot: None,
        }
    }
}

/// A session's sockets as the pump forwards between them.
struct SessionSockets {
    client_read: ClientReader,
    client_write: SlotWatch<ClientWriter>,
    server_read: UpstreamReader,
    server_write: UpstreamWriter,
}

impl session::Carry for SessionSockets {
    type ClientRead = ClientReader;
    type ClientWrite = SlotWatch<ClientWriter>;
    type ServerRead = UpstreamReader;
    type ServerWrite = UpstreamWriter;
    type Left = SlotWatch<()>;

    fn halves(
        &mut self,
    ) -> (
        &mut ClientReader,
        &mut SlotWatch<ClientWriter>,
        &mut UpstreamReader,
        &mut UpstreamWriter,
    ) {
        (
            &mut self.client_read,
            &mut self.client_write,
            &mut self.server_read,
            &mut self.server_write,
        )
    }

    fn take_out(self) -> std::io::Result<Result<(PlainSockets, SlotWatch<()>), Self>> {
        // The slot moves only on a write the pump makes: it must have moved by now.
        if !(self.client_read.is_plain()
            && self.server_read.is_plain()
            && self.client_write.pending.is_none())
        {
            return Ok(Err(self));
        }
        let (client_write, left) = self.client_write.replace_inner(());
        let client = stream::take_out_client(self.client_read, client_write)?;
        let server = stream::take_out_upstream(self.server_read, self.server_write)?;
        Ok(Ok((PlainSockets { client, server }, left)))
    }

    fn put_back(sockets: PlainSockets, left: SlotWatch<()>) -> std::io::Result<Self> {
        let (client_read, client_write) = stream::put_back_client(sockets.client)?;
        let (server_read, server_write) = stream::put_back_upstream(sockets.server)?;
        Ok(SessionSockets {
            client_read,
            client_write: left.replace_inner(client_write).1,
            server_read,
            server_write,
        })
    }

    fn into_end(self) -> (UpstreamReader, SlotWatch<ClientWriter>, UpstreamWriter) {
        (self.server_read, self.client_write, self.server_write)
    }
}

/// Whether a session's startup is over, from what the pump has noted in its record.
fn startup_over(record: &SessionRecord) -> bool {
    // A client pipelining a query during startup makes `state()` say Active, which must not
    // count; BackendKeyData or a ReadyForQuery status cannot be forged by the client.
    record.backend_pid().is_some()
        || matches!(
            record.state(),
            TxnState::Idle | TxnState::IdleInTransaction | TxnState::IdleInFailedTransaction
        )
}

/// The client writer of a session still holding its startup slot; see [`SlotHandover`]. The
/// `max_clients` slot it takes is released with it, when the pump ends.
struct SlotWatch<W> {
    inner: W,
    pending: Option<(SlotHandover, Arc<SessionRecord>)>,
    _client_slot: Option<OwnedSemaphorePermit>,
}

impl<W> SlotWatch<W> {
    /// Swaps the writer, keeping the slot: for the time the forwarding thread has the socket.
    fn replace_inner<V>(self, inner: V) -> (W, SlotWatch<V>) {
        let SlotWatch {
            inner: old,
            pending,
            _client_slot,
        } = self;
        let watch = SlotWatch {
            inner,
            pending,
            _client_slot,
        };
        (old, watch)
    }

    fn check(&mut self) {
        let Some((_, record)) = &self.pending else {
            return;
        };
        if !startup_over(record) {
            return;
        }
        let Some((handover, record)) = self.pending.take() else {
            return;
        };
        drop(handover.startup);
        match handover.clients.try_acquire_owned() {
            Ok(slot) => self._client_slot = Some(slot),
            Err(_) => {
                // Rare: the last slots went while this client authenticated (it was checked
                // before connecting upstream). Ended as a kill, so the pump delivers the
                // FATAL at a message boundary and closes both sockets.
                handover.stats.client_refused();
                warn!(
                    session = record.id,
                    client = %record.client.addr,
                    user = %record.client.user,
                    "refusing client after its startup: max_clients was reached meanwhile"
                );
                if record.begin_kill() {
                    record.finish_kill(KillNotice {
                        sqlstate: sqlstate::TOO_MANY_CONNECTIONS,
                        message: too_many_clients_message(handover.max_clients),
                    });
                }
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SlotWatch<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.pending.is_some() {
            self.check();
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.pending.is_some() {
            self.check();
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use guard_core::UpstreamIdentity;

    use super::*;

    fn record() -> SessionRecord {
        SessionRecord::new(
            1,
            ClientInfo {
                addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
                user: "u".into(),
                database: "d".into(),
                application_name: String::new(),
            },
            UpstreamIdentity::Unix,
        )
    }

    /// What the client sends cannot end its startup; only what the server says after a
    /// successful authentication can.
    #[test]
    fn startup_ends_with_backend_key_data_or_ready_for_query_not_with_client_queries() {
        let pipelined = record();
        pipelined.statement_started();
        assert_eq!(pipelined.state(), TxnState::Active);
        assert!(!startup_over(&pipelined));
        pipelined.set_backend_key(4242, &[1, 2, 3, 4]);
        assert!(startup_over(&pipelined));

        let ready = record();
        assert!(!startup_over(&ready));
        ready.ready_for_query(guard_core::TxnStatus::Idle, false);
        assert!(startup_over(&ready));
    }
}
