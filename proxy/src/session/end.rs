//! How a session ends, and what that means for its backend.
//!
//! - the client said goodbye (Terminate) with nothing in flight → the server ends the backend
//!   itself;
//! - the client vanished, or sent Terminate while a statement was still in flight → wait for
//!   that statement up to `inflight_grace`, then, if a transaction is still open or the
//!   statement still runs, hand the session to the guard before closing the upstream. A busy
//!   backend reads the Terminate only when its statement ends, so for its locks such a
//!   goodbye is a lost client: PgBouncer sends exactly that when its own client vanishes
//!   mid-statement, and drivers do from `close()` after a timeout;
//! - the server closed → the client gets the server's FATAL, or lockguard's 08006 if there was
//!   none;
//! - the guard or an operator killed it → the client gets lockguard's explanation (57P01).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use guard_core::{SessionRecord, TxnState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn, Level};

use super::flow::DISCARD_BUFFER_SIZE;
use super::pump::{on_server_message, ServerSide};
use super::tracker::Tracker;
use super::{session_event, SessionContext};
use crate::frame::FrameError;
use crate::protocol::{self, sqlstate};

/// How long a farewell ErrorResponse may take to reach a client before the socket is just closed:
/// a client that stopped reading must not hold the session open.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// After the server stops accepting our writes, how long to keep reading it for the FATAL that
/// explains why.
pub(super) const SERVER_LAST_WORDS_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the client side of a session ended.
#[derive(Debug)]
pub(super) enum ClientEnd {
    /// Terminate was sent with nothing in flight: an orderly goodbye.
    Goodbye,
    /// The client vanished without Terminate, or sent it while a statement was in flight.
    Lost(ClientLoss),
    /// The server stopped accepting what the client sent.
    ServerWriteFailed(io::Error),
}

/// How a client went away; becomes the trigger description in the guard's audit.
#[derive(Debug, thiserror::Error)]
pub(super) enum ClientLoss {
    #[error("client closed the connection without Terminate")]
    Eof,
    /// Terminate arrived while a statement was in flight.
    #[error("Terminate while busy: the client said goodbye with a statement in flight")]
    TerminateWhileBusy,
    #[error("client connection failed: {0}")]
    ReadFailed(io::Error),
    #[error("writing to the client failed: {0}")]
    WriteFailed(io::Error),
    #[error("client protocol violation: {0}")]
    ProtocolViolation(FrameError),
}

/// Why the server side of a session ended.
#[derive(Debug)]
pub(super) enum ServerEnd {
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
pub(super) enum Ended {
    Client(ClientEnd),
    Server(ServerEnd),
    Killed,
    StartupTimeout,
    Drained,
    HardStop,
}

/// Acts on how the pump loop ended: tells the client why where it may still listen, and hands
/// a lost client's session to the guard. A flat match over every way a session ends, which
/// reads best whole.
#[allow(clippy::too_many_arguments)]
pub(super) async fn finish<SR, CW, SW>(
    ended: Ended,
    server: &mut ServerSide,
    mut server_read: SR,
    mut client_write: CW,
    mut server_write: SW,
    record: &Arc<SessionRecord>,
    tracker: &Tracker,
    ctx: &SessionContext,
) where
    SR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SW: AsyncWrite + Unpin,
{
    match ended {
        Ended::Client(ClientEnd::Goodbye) => {
            session_event!(ctx.span, Level::DEBUG, "client said goodbye");
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
            after_client_loss(loss, server, &mut server_read, record, tracker, ctx).await;
        }
        Ended::Client(ClientEnd::ServerWriteFailed(e))
        | Ended::Server(ServerEnd::ReadFailed(e)) => {
            info!(error = %e, "upstream connection failed");
            upstream_gone(server, &mut client_write).await;
        }
        Ended::Server(ServerEnd::Closed) => {
            debug!("server closed the connection");
            upstream_gone(server, &mut client_write).await;
        }
        Ended::Server(ServerEnd::ProtocolViolation(e)) => {
            warn!(error = %e, "server stream is not valid protocol; closing the session");
            if server.client_at_message_boundary() {
                let msg = format!("lockguard: invalid message from server: {e}");
                farewell(&mut client_write, sqlstate::PROTOCOL_VIOLATION, &msg).await;
            }
        }
        Ended::Server(ServerEnd::ClientWriteFailed(e)) => {
            let loss = ClientLoss::WriteFailed(e);
            after_client_loss(loss, server, &mut server_read, record, tracker, ctx).await;
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

/// The client is gone. If a statement was running, give it `inflight_grace` to finish (reading
/// and discarding its output, so its ReadyForQuery is seen). If a transaction is then still
/// open, the guard decides whether the backend holds protected locks and must be terminated;
/// otherwise closing the upstream socket is enough (PostgreSQL rolls back on EOF).
async fn after_client_loss<SR: AsyncRead + Unpin>(
    loss: ClientLoss,
    server: &mut ServerSide,
    server_read: &mut SR,
    record: &Arc<SessionRecord>,
    tracker: &Tracker,
    ctx: &SessionContext,
) {
    if tracker.in_flight() {
        // The grace of the rules that could govern this session's locks, read now: RELOAD
        // may have changed them since the session started.
        let grace = ctx.guard.as_ref().map_or(ctx.inflight_grace, |guard| {
            guard.inflight_grace_for(&record.client)
        });
        let drained = tokio::time::timeout(
            grace,
            discard_until_ready(server, server_read, record, tracker),
        )
        .await;
        debug!(
            finished = drained.is_ok(),
            "waited for the in-flight statement"
        );
    }
    let state = record.state();
    let pid = record.backend_pid();
    match (record.in_transaction(), state == TxnState::Active) {
        (false, false) => {
            debug!(cause = %loss, %state, "client lost with nothing in flight, outside a transaction");
            return;
        }
        (false, true) => {
            info!(cause = %loss, %state, pid, "client lost with a statement in flight");
        }
        (true, false) => info!(cause = %loss, %state, pid, "client lost inside a transaction"),
        (true, true) => info!(
            cause = %loss,
            %state,
            pid,
            "client lost inside a transaction with a statement in flight"
        ),
    }
    if let Some(guard) = &ctx.guard {
        // Boxed: the guard's future (a probe and a terminate over the guard connection) is
        // kilobytes, and inline it would enlarge every session's task for its whole life.
        Box::pin(guard.on_client_lost(record, &loss.to_string())).await;
    }
}

/// Reads the server until it is ready for a new query (or closes), keeping the record current.
/// What the client was not given any more is dropped.
async fn discard_until_ready<SR: AsyncRead + Unpin>(
    side: &mut ServerSide,
    server: &mut SR,
    record: &SessionRecord,
    tracker: &Tracker,
) {
    let flow = &mut side.flow;
    let sent_fatal = &mut side.sent_fatal;
    if flow.held {
        // Held bytes were never scanned; the scanner must see them to stay in step.
        flow.held = false;
        if flow
            .scanner
            .feed(&flow.backlog, |m| {
                on_server_message(m, record, tracker, sent_fatal)
            })
            .is_err()
        {
            return;
        }
    }
    flow.backlog = Vec::new();
    flow.backlog_start = 0;
    let mut buf = vec![0; DISCARD_BUFFER_SIZE];
    while tracker.in_flight() {
        let n = match server.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if flow
            .scanner
            .feed(&buf[..n], |m| {
                on_server_message(m, record, tracker, sent_fatal)
            })
            .is_err()
        {
            return;
        }
    }
}

/// The upstream connection ended. PostgreSQL normally says why with a FATAL, which the client
/// already has; if it did not, the client gets lockguard's 08006 rather than a bare close.
pub(super) async fn upstream_gone<CW: AsyncWrite + Unpin>(server: &ServerSide, client: &mut CW) {
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
