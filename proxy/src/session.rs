//! The session pump: forwards one client's bytes to its PostgreSQL backend and back, and keeps
//! the session's record (backend pid, transaction state, last statement) current as messages
//! pass.
//!
//! Each direction is a loop that reads into a buffer owned by the session, lets a
//! [`FrameScanner`] walk the message headers (updating the record from the few messages that
//! matter), and writes the same bytes on. Nothing is allocated per message, nothing waits on a
//! lock, and the guard is never consulted while traffic flows. The directions run concurrently
//! so a client that pipelines while the server streams results never deadlocks the proxy.
//!
//! How a session ends decides what happens to its backend:
//! - the client said goodbye (Terminate) → the server ends the backend itself;
//! - the client vanished → wait for an in-flight statement up to `inflight_grace`, then, if a
//!   transaction is still open, hand the session to the guard before closing the upstream;
//! - the server closed → the client gets the server's FATAL, or lockguard's 08006 if there was
//!   none;
//! - the guard or an operator killed it → the client gets lockguard's explanation (57P01).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use guard_core::{SessionRecord, TxnState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::frame::{FrameError, FrameScanner, Message, CLIENT_INTERESTS, SERVER_INTERESTS};
use crate::protocol::{self, backend, frontend, sqlstate};
use crate::GuardHandle;

/// Read buffer per direction. Large messages stream through in pieces of this size.
const BUFFER_SIZE: usize = 8 * 1024;

/// How long a farewell ErrorResponse may take to reach a client before the socket is just closed:
/// a client that stopped reading must not hold the session open.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// After the server stops accepting our writes, how long to keep reading it for the FATAL that
/// explains why.
const SERVER_LAST_WORDS_TIMEOUT: Duration = Duration::from_secs(1);

/// What a session's pump needs from the proxy around it.
pub struct SessionContext {
    pub guard: Option<GuardHandle>,
    pub inflight_grace: Duration,
    /// Authentication must have finished (first ReadyForQuery) by then.
    pub startup_deadline: Instant,
    pub startup_timeout: Duration,
    /// Cancelled when the proxy starts shutting down: idle sessions close, busy ones finish.
    pub shutdown: CancellationToken,
    /// Cancelled when `shutdown_timeout` has passed: every session closes now.
    pub hard_stop: CancellationToken,
}

/// Why the client side of a session ended.
#[derive(Debug)]
enum ClientEnd {
    /// Terminate was sent: an orderly goodbye.
    Goodbye,
    /// The client vanished without Terminate.
    Lost(ClientLoss),
    /// The server stopped accepting what the client sent.
    ServerWriteFailed(io::Error),
}

/// How a client went away; becomes the trigger description in the guard's audit.
#[derive(Debug)]
enum ClientLoss {
    Eof,
    ReadFailed(io::Error),
    WriteFailed(io::Error),
    ProtocolViolation(FrameError),
}

impl fmt::Display for ClientLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientLoss::Eof => f.write_str("client closed the connection without Terminate"),
            ClientLoss::ReadFailed(e) => write!(f, "client connection failed: {e}"),
            ClientLoss::WriteFailed(e) => write!(f, "writing to the client failed: {e}"),
            ClientLoss::ProtocolViolation(e) => write!(f, "client protocol violation: {e}"),
        }
    }
}

/// Why the server side of a session ended.
#[derive(Debug)]
enum ServerEnd {
    Closed,
    ReadFailed(io::Error),
    ProtocolViolation(FrameError),
    ClientWriteFailed(io::Error),
    /// A kill announced by the guard was carried out.
    Killed,
    /// Shutdown is under way and the session just became idle.
    Drained,
}

/// How the pump loop ended.
enum Ended {
    Client(ClientEnd),
    Server(ServerEnd),
    Killed,
    StartupTimeout,
    Drained,
    HardStop,
}

/// State of the client → server direction, kept across the pump's phases.
struct ClientSide {
    scanner: FrameScanner,
    buf: Box<[u8]>,
    /// Syncs sent since the last Execute or Query. If that command turns out to be a COPY FROM
    /// STDIN, the server ignores these Syncs, so they must not be counted as awaiting a reply.
    syncs_since_execute: u32,
    said_goodbye: bool,
}

/// State of the server → client direction, kept across the pump's phases.
struct ServerSide {
    scanner: FrameScanner,
    buf: Box<[u8]>,
    /// The server sent a FATAL (or PANIC): its closing the connection is explained.
    sent_fatal: bool,
    /// A write to the client is in progress; if the pump stops now, the client holds part of a
    /// message and must not be sent another.
    writing: bool,
}

impl ServerSide {
    /// True when lockguard may append its own message to what the client has received.
    fn client_at_message_boundary(&self) -> bool {
        !self.writing && self.scanner.at_boundary()
    }
}

/// Runs one session to its end. The halves are the two directions of the client and upstream
/// sockets.
pub async fn pump<CR, CW, SR, SW>(
    mut client_read: CR,
    mut client_write: CW,
    mut server_read: SR,
    mut server_write: SW,
    record: &Arc<SessionRecord>,
    ctx: &SessionContext,
) where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let mut client = ClientSide {
        scanner: FrameScanner::new(&CLIENT_INTERESTS),
        buf: vec![0; BUFFER_SIZE].into_boxed_slice(),
        syncs_since_execute: 0,
        said_goodbye: false,
    };
    let mut server = ServerSide {
        scanner: FrameScanner::new(&SERVER_INTERESTS),
        buf: vec![0; BUFFER_SIZE].into_boxed_slice(),
        sent_fatal: false,
        writing: false,
    };

    let ended = {
        let client_to_server =
            client_to_server(&mut client, &mut client_read, &mut server_write, record);
        let server_to_client = server_to_client(
            &mut server,
            &mut server_read,
            &mut client_write,
            record,
            &ctx.shutdown,
        );
        tokio::pin!(client_to_server, server_to_client);
        let startup_timer = tokio::time::sleep_until(ctx.startup_deadline);
        tokio::pin!(startup_timer);
        let mut startup_watched = true;
        let mut draining = false;
        loop {
            tokio::select! {
                end = &mut client_to_server => {
                    break match end {
                        // The server refused our write; it usually said why first.
                        ClientEnd::ServerWriteFailed(e) => {
                            match tokio::time::timeout(SERVER_LAST_WORDS_TIMEOUT, &mut server_to_client).await {
                                Ok(end) => Ended::Server(end),
                                Err(_) => Ended::Server(ServerEnd::ReadFailed(e)),
                            }
                        }
                        end => Ended::Client(end),
                    };
                }
                end = &mut server_to_client => break Ended::Server(end),
                _ = record.killed() => break Ended::Killed,
                _ = &mut startup_timer, if startup_watched => {
                    if record.state() == TxnState::Startup {
                        break Ended::StartupTimeout;
                    }
                    startup_watched = false;
                }
                _ = ctx.shutdown.cancelled(), if !draining => {
                    // Idle sessions close now; busy ones when their current work is done (the
                    // server loop watches for the ReadyForQuery that makes them idle).
                    draining = true;
                    if matches!(record.state(), TxnState::Idle | TxnState::Startup) {
                        break Ended::Drained;
                    }
                }
                _ = ctx.hard_stop.cancelled() => break Ended::HardStop,
            }
        }
    };

    match ended {
        Ended::Client(ClientEnd::Goodbye) => {
            debug!("client said goodbye");
            let _ = server_write.shutdown().await;
        }
        Ended::Client(ClientEnd::Lost(loss)) => {
            if let ClientLoss::ProtocolViolation(e) = &loss {
                warn!(error = %e, "client broke the protocol; closing its session");
                // The client may still be listening; tell it why (it gets nothing else).
                if server.client_at_message_boundary() {
                    let msg = format!("lockguard: invalid message from client: {e}");
                    farewell(&mut client_write, sqlstate::PROTOCOL_VIOLATION, &msg).await;
                }
            }
            after_client_loss(loss, &mut server, &mut server_read, record, ctx).await;
        }
        Ended::Client(ClientEnd::ServerWriteFailed(e))
        | Ended::Server(ServerEnd::ReadFailed(e)) => {
            info!(error = %e, "upstream connection failed");
            upstream_gone(&server, &mut client_write).await;
        }
        Ended::Server(ServerEnd::Closed) => {
            debug!("server closed the connection");
            upstream_gone(&server, &mut client_write).await;
        }
        Ended::Server(ServerEnd::ProtocolViolation(e)) => {
            warn!(error = %e, "server stream is not valid protocol; closing the session");
            if server.client_at_message_boundary() {
                let msg = format!("lockguard: invalid message from server: {e}");
                farewell(&mut client_write, sqlstate::PROTOCOL_VIOLATION, &msg).await;
            }
        }
        Ended::Server(ServerEnd::ClientWriteFailed(e)) => {
            after_client_loss(
                ClientLoss::WriteFailed(e),
                &mut server,
                &mut server_read,
                record,
                ctx,
            )
            .await;
        }
        Ended::Server(ServerEnd::Killed) | Ended::Killed => {
            if let Some(notice) = record.kill_notice() {
                if server.client_at_message_boundary() {
                    farewell(&mut client_write, notice.sqlstate, &notice.message).await;
                }
            }
        }
        Ended::StartupTimeout => {
            info!(timeout = ?ctx.startup_timeout, "client did not finish startup in time");
            if server.client_at_message_boundary() {
                let msg = format!(
                    "lockguard: startup did not complete within {:?}",
                    ctx.startup_timeout
                );
                farewell(&mut client_write, sqlstate::PROTOCOL_VIOLATION, &msg).await;
            }
        }
        Ended::Server(ServerEnd::Drained) | Ended::Drained | Ended::HardStop => {
            if server.client_at_message_boundary() {
                farewell(
                    &mut client_write,
                    sqlstate::ADMIN_SHUTDOWN,
                    "lockguard: the proxy is shutting down",
                )
                .await;
            }
        }
    }
}

/// Client → server: forwards bytes, noting statements, sync points and the goodbye.
async fn client_to_server<CR, SW>(
    side: &mut ClientSide,
    client: &mut CR,
    server: &mut SW,
    record: &SessionRecord,
) -> ClientEnd
where
    CR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    loop {
        let n = match client.read(&mut side.buf).await {
            Ok(0) if side.said_goodbye => return ClientEnd::Goodbye,
            Ok(0) => return ClientEnd::Lost(ClientLoss::Eof),
            Ok(n) => n,
            Err(e) => return ClientEnd::Lost(ClientLoss::ReadFailed(e)),
        };
        record.add_bytes_from_client(n);
        let syncs = &mut side.syncs_since_execute;
        let said_goodbye = &mut side.said_goodbye;
        let scanned = side.scanner.feed(&side.buf[..n], |m| {
            on_client_message(m, record, syncs, said_goodbye)
        });
        if let Err(e) = scanned {
            return ClientEnd::Lost(ClientLoss::ProtocolViolation(e));
        }
        if let Err(e) = server.write_all(&side.buf[..n]).await {
            return ClientEnd::ServerWriteFailed(e);
        }
        if side.said_goodbye {
            // Nothing may follow Terminate; the server closes once it has read it.
            return ClientEnd::Goodbye;
        }
    }
}

fn on_client_message(
    m: Message<'_>,
    record: &SessionRecord,
    syncs_since_execute: &mut u32,
    said_goodbye: &mut bool,
) {
    match m.tag {
        frontend::QUERY => {
            record.set_last_statement(until_nul(m.body_prefix));
            record.sync_sent();
            *syncs_since_execute = 0;
        }
        frontend::PARSE => {
            // Body: statement name, NUL, query text, NUL, parameter types.
            let after_name = m
                .body_prefix
                .iter()
                .position(|&b| b == 0)
                .map_or(&[][..], |end| &m.body_prefix[end + 1..]);
            record.set_last_statement(until_nul(after_name));
        }
        frontend::EXECUTE => *syncs_since_execute = 0,
        frontend::SYNC => {
            record.sync_sent();
            *syncs_since_execute += 1;
        }
        frontend::FUNCTION_CALL => record.sync_sent(),
        frontend::COPY_DONE | frontend::COPY_FAIL => {
            record.syncs_ignored(*syncs_since_execute);
            *syncs_since_execute = 0;
        }
        frontend::TERMINATE => *said_goodbye = true,
        _ => {}
    }
}

/// Server → client: forwards bytes, noting the backend key, transaction status and FATALs.
async fn server_to_client<SR, CW>(
    side: &mut ServerSide,
    server: &mut SR,
    client: &mut CW,
    record: &SessionRecord,
    shutdown: &CancellationToken,
) -> ServerEnd
where
    SR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    loop {
        let n = match server.read(&mut side.buf).await {
            Ok(0) => return ServerEnd::Closed,
            Ok(n) => n,
            Err(e) => return ServerEnd::ReadFailed(e),
        };
        if record.kill_pending() {
            // The guard is terminating this backend: hold these bytes (likely the backend's
            // own FATAL) until it is known whether the client gets them or lockguard's notice.
            if record.kill_resolved().await.is_some() {
                return ServerEnd::Killed;
            }
        }
        record.add_bytes_from_server(n);
        let sent_fatal = &mut side.sent_fatal;
        let scanned = side
            .scanner
            .feed(&side.buf[..n], |m| on_server_message(m, record, sent_fatal));
        if let Err(e) = scanned {
            return ServerEnd::ProtocolViolation(e);
        }
        side.writing = true;
        if let Err(e) = client.write_all(&side.buf[..n]).await {
            return ServerEnd::ClientWriteFailed(e);
        }
        side.writing = false;
        if shutdown.is_cancelled() && record.state() == TxnState::Idle && side.scanner.at_boundary()
        {
            return ServerEnd::Drained;
        }
    }
}

fn on_server_message(m: Message<'_>, record: &SessionRecord, sent_fatal: &mut bool) {
    match m.tag {
        backend::BACKEND_KEY_DATA => {
            if let Some((pid, secret)) = m.body_prefix.split_first_chunk::<4>() {
                record.set_backend_key(i32::from_be_bytes(*pid), secret);
            }
        }
        backend::READY_FOR_QUERY => {
            if let Some(&status) = m.body_prefix.first() {
                record.ready_for_query(status);
            }
        }
        backend::ERROR_RESPONSE => {
            let severity = protocol::error_fields(m.body_prefix)
                .find(|(kind, _)| *kind == b'S')
                .map(|(_, value)| value);
            if matches!(severity, Some(b"FATAL" | b"PANIC")) {
                *sent_fatal = true;
            }
        }
        _ => {}
    }
}

/// The client is gone. If a statement was running, give it `inflight_grace` to finish (reading
/// and discarding its output, so its ReadyForQuery is seen). If a transaction is then still
/// open, the guard decides whether the backend holds protected locks and must be terminated;
/// otherwise closing the upstream socket is enough (PostgreSQL rolls back on EOF).
async fn after_client_loss<SR: AsyncRead + Unpin>(
    loss: ClientLoss,
    server: &mut ServerSide,
    server_read: &mut SR,
    record: &Arc<SessionRecord>,
    ctx: &SessionContext,
) {
    if record.statement_in_flight() {
        let drained = tokio::time::timeout(
            ctx.inflight_grace,
            discard_until_ready(server, server_read, record),
        )
        .await;
        debug!(
            finished = drained.is_ok(),
            "waited for the in-flight statement"
        );
    }
    let state = record.state();
    if !(record.in_transaction() || state == TxnState::Active) {
        debug!(cause = %loss, %state, "client lost outside a transaction");
        return;
    }
    info!(cause = %loss, %state, pid = record.backend_pid(), "client lost inside a transaction");
    if let Some(guard) = &ctx.guard {
        guard.on_client_lost(record, &loss.to_string()).await;
    }
}

/// Reads the server until it is ready for a new query (or closes), keeping the record current.
async fn discard_until_ready<SR: AsyncRead + Unpin>(
    side: &mut ServerSide,
    server: &mut SR,
    record: &SessionRecord,
) {
    while record.statement_in_flight() {
        let n = match server.read(&mut side.buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let sent_fatal = &mut side.sent_fatal;
        if side
            .scanner
            .feed(&side.buf[..n], |m| on_server_message(m, record, sent_fatal))
            .is_err()
        {
            return;
        }
    }
}

/// The upstream connection ended. PostgreSQL normally says why with a FATAL, which the client
/// already has; if it did not, the client gets lockguard's 08006 rather than a bare close.
async fn upstream_gone<CW: AsyncWrite + Unpin>(server: &ServerSide, client: &mut CW) {
    if !server.sent_fatal && server.client_at_message_boundary() {
        farewell(
            client,
            sqlstate::CONNECTION_FAILURE,
            "lockguard: the server closed the connection unexpectedly",
        )
        .await;
    }
}

/// Sends a FATAL ErrorResponse and closes the client's write side, within a short deadline.
pub async fn farewell<W: AsyncWrite + Unpin>(client: &mut W, sqlstate: &str, message: &str) {
    let packet = protocol::fatal_error(sqlstate, message);
    let send = async {
        client.write_all(&packet).await?;
        client.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(FAREWELL_TIMEOUT, send)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    {
        debug!(error = %e, "could not deliver the closing error to the client");
    }
}

fn until_nul(bytes: &[u8]) -> &[u8] {
    match bytes.iter().position(|&b| b == 0) {
        Some(end) => &bytes[..end],
        None => bytes,
    }
}
