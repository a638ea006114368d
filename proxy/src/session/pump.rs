//! The session pump: runs a session's two directions and its rare events in one task, and
//! notes what each message tells about the session.
//!
//! The directions run concurrently so a client that pipelines while the server streams results
//! never deadlocks the proxy; each is a [`Flow`] (one read, one scan, one write per burst of
//! traffic). Nothing is allocated per message, nothing waits on a lock, and the guard is never
//! consulted while traffic flows. The rare events (a kill, shutdown, the startup deadline) are
//! watched by a future that is polled only when one of them wakes it (see [`WakeGroup`]).

use std::ffi::CStr;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use guard_core::{SessionRecord, TxnState};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use super::end::{finish, ClientEnd, ClientLoss, Ended, ServerEnd, SERVER_LAST_WORDS_TIMEOUT};
use super::flow::{Flow, Stopped, Watch};
use super::tracker::Tracker;
use super::wake::WakeGroup;
use super::SessionContext;
use crate::frame::{Message, CLIENT_INTERESTS, SERVER_INTERESTS};
use crate::protocol::{self, backend, frontend};

/// State of the client → server direction, kept across the pump's phases.
struct ClientSide {
    flow: Flow,
    /// Set by Terminate.
    goodbye: Option<Goodbye>,
}

/// When the client sent Terminate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goodbye {
    /// With nothing in flight: the backend reads it at once and ends.
    Idle,
    /// With a statement in flight: the backend reads it only once the statement is done.
    WhileBusy,
}

/// State of the server → client direction, kept across the pump's phases.
pub(super) struct ServerSide {
    pub(super) flow: Flow,
    /// The server sent a FATAL (or PANIC): its closing the connection is explained.
    pub(super) sent_fatal: bool,
}

impl ServerSide {
    /// True when lockguard may append its own message to what the client has received.
    pub(super) fn client_at_message_boundary(&self) -> bool {
        self.flow.written_to_boundary()
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
        flow: Flow::new(&CLIENT_INTERESTS),
        goodbye: None,
    };
    let mut server = ServerSide {
        flow: Flow::new(&SERVER_INTERESTS),
        sent_fatal: false,
    };
    let tracker = Tracker::new();
    // Set once shutdown has begun: the server direction ends the session at its next idle
    // moment. A session-local flag, because asking the shared token takes its lock.
    let draining = AtomicBool::new(false);

    let ended = {
        let client_to_server = client_to_server(
            &mut client,
            &mut client_read,
            &mut server_write,
            record,
            &tracker,
        );
        let server_to_client = server_to_client(
            &mut server,
            &mut server_read,
            &mut client_write,
            record,
            &tracker,
            &draining,
        );
        let events = session_events(record, ctx, &draining);
        tokio::pin!(client_to_server, server_to_client, events);
        // Each part is polled only when its own waker fired: traffic in one direction does not
        // poll the other direction's socket, nor the rare events.
        let parts = WakeGroup::new();
        let mut client_to_server = parts.gate(client_to_server);
        let mut server_to_client = parts.gate(server_to_client);
        let mut events = parts.gate(events);
        let first = poll_fn(|cx| {
            parts.register(cx);
            if let Poll::Ready(end) = client_to_server.poll_if_woken() {
                return Poll::Ready(Ended::Client(end));
            }
            if let Poll::Ready(end) = server_to_client.poll_if_woken() {
                return Poll::Ready(Ended::Server(end));
            }
            events.poll_if_woken()
        })
        .await;
        match first {
            // The server refused our write; it usually said why first.
            Ended::Client(ClientEnd::ServerWriteFailed(e)) => {
                let last_words = poll_fn(|cx| {
                    parts.register(cx);
                    server_to_client.poll_if_woken()
                });
                match tokio::time::timeout(SERVER_LAST_WORDS_TIMEOUT, last_words).await {
                    Ok(end) => Ended::Server(end),
                    Err(_) => Ended::Server(ServerEnd::ReadFailed(e)),
                }
            }
            ended => ended,
        }
    };
    finish(
        ended,
        &mut server,
        server_read,
        client_write,
        server_write,
        record,
        &tracker,
        ctx,
    )
    .instrument(ctx.span.clone())
    .await;
}

/// Waits for what ends a session from outside its traffic: a kill, the startup deadline, the
/// proxy's shutdown. Polled only when one of them wakes it (see [`WakeGroup`]), because polling
/// tokio's `Notify` or a `CancellationToken` takes a lock each time.
async fn session_events(
    record: &SessionRecord,
    ctx: &SessionContext,
    draining: &AtomicBool,
) -> Ended {
    let startup_timer = tokio::time::sleep_until(ctx.startup_deadline);
    tokio::pin!(startup_timer);
    let mut startup_watched = true;
    loop {
        tokio::select! {
            _ = record.killed() => return Ended::Killed,
            _ = &mut startup_timer, if startup_watched => {
                if record.state() == TxnState::Startup {
                    return Ended::StartupTimeout;
                }
                startup_watched = false;
            }
            _ = ctx.shutdown.cancelled(), if !draining.load(Ordering::Relaxed) => {
                // Idle sessions close now; busy ones when their current work is done (the
                // server direction watches for the ReadyForQuery that makes them idle).
                draining.store(true, Ordering::Relaxed);
                if matches!(record.state(), TxnState::Idle | TxnState::Startup) {
                    return Ended::Drained;
                }
            }
            _ = ctx.hard_stop.cancelled() => return Ended::HardStop,
        }
    }
}

/// Client → server: forwards bytes, noting statements, sync points and the goodbye.
async fn client_to_server<CR, SW>(
    side: &mut ClientSide,
    client: &mut CR,
    server: &mut SW,
    record: &SessionRecord,
    tracker: &Tracker,
) -> ClientEnd
where
    CR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let ClientSide { flow, goodbye } = side;
    let mut watch = ClientWatch {
        record,
        tracker,
        goodbye,
    };
    let stopped = poll_fn(|cx| flow.poll_forward(cx, client, server, &mut watch)).await;
    let goodbye = match watch.goodbye {
        Some(Goodbye::Idle) => ClientEnd::Goodbye,
        // The backend keeps running, and keeps its locks, until the statement ends.
        Some(Goodbye::WhileBusy) => ClientEnd::Lost(ClientLoss::TerminateWhileBusy),
        None => ClientEnd::Lost(ClientLoss::Eof),
    };
    match stopped {
        // Nothing may follow Terminate; the server closes once it has read it.
        Stopped::Stop | Stopped::Eof => goodbye,
        Stopped::ReadFailed(e) => ClientEnd::Lost(ClientLoss::ReadFailed(e)),
        Stopped::Invalid(e) => ClientEnd::Lost(ClientLoss::ProtocolViolation(e)),
        Stopped::WriteFailed(e) => ClientEnd::ServerWriteFailed(e),
        // The client side never holds bytes back.
        Stopped::Held => ClientEnd::Lost(ClientLoss::Eof),
    }
}

/// What the client → server direction notes as messages pass.
struct ClientWatch<'a> {
    record: &'a SessionRecord,
    tracker: &'a Tracker,
    goodbye: &'a mut Option<Goodbye>,
}

impl Watch for ClientWatch<'_> {
    fn hold(&self) -> bool {
        false
    }

    fn count(&self, n: usize) {
        self.record.add_bytes_from_client(n);
    }

    fn on_message(&mut self, m: Message<'_>) {
        on_client_message(m, self.record, self.tracker, self.goodbye);
    }

    fn stop(&self, _at_boundary: bool) -> bool {
        self.goodbye.is_some()
    }
}

/// Notes what a client message tells about the session: its statement text, its effect on the
/// transaction state (through `tracker`), and a Terminate (into `goodbye`). Public so that
/// `proxy/tests/no_alloc.rs` drives the pump's own per-message code.
pub fn on_client_message(
    m: Message<'_>,
    record: &SessionRecord,
    tracker: &Tracker,
    goodbye: &mut Option<Goodbye>,
) {
    match m.tag {
        // The record finds the text's end (its NUL) only when someone reads it.
        frontend::QUERY => record.set_last_statement(m.body_prefix),
        frontend::PARSE => {
            // Body: statement name, NUL, query text, NUL, parameter types.
            let name = until_nul(m.body_prefix);
            let after_name = m.body_prefix.get(name.len() + 1..).unwrap_or_default();
            record.set_last_statement(after_name);
        }
        frontend::TERMINATE if goodbye.is_none() => {
            *goodbye = Some(if tracker.in_flight() {
                Goodbye::WhileBusy
            } else {
                Goodbye::Idle
            });
        }
        _ => {}
    }
    tracker.client_message(m.tag, record);
    #[cfg(feature = "testing")]
    super::testing::after_message(record, tracker, true, &m);
}

/// Server → client: forwards bytes, noting the backend key, transaction status and FATALs.
async fn server_to_client<SR, CW>(
    side: &mut ServerSide,
    server: &mut SR,
    client: &mut CW,
    record: &SessionRecord,
    tracker: &Tracker,
    draining: &AtomicBool,
) -> ServerEnd
where
    SR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    let ServerSide { flow, sent_fatal } = side;
    let mut watch = ServerWatch {
        record,
        tracker,
        sent_fatal,
        draining,
    };
    loop {
        match poll_fn(|cx| flow.poll_forward(cx, server, client, &mut watch)).await {
            Stopped::Held => {
                // The guard is terminating this backend: these bytes (likely the backend's own
                // FATAL) wait until it is known whether the client gets them or lockguard's
                // notice.
                if record.kill_resolved().await.is_some() {
                    return ServerEnd::Killed;
                }
                if let Err(e) = flow.release_held(&mut watch) {
                    return ServerEnd::ProtocolViolation(e);
                }
            }
            Stopped::Stop => return ServerEnd::Drained,
            Stopped::Eof => return ServerEnd::Closed,
            Stopped::ReadFailed(e) => return ServerEnd::ReadFailed(e),
            Stopped::Invalid(e) => return ServerEnd::ProtocolViolation(e),
            Stopped::WriteFailed(e) => return ServerEnd::ClientWriteFailed(e),
        }
    }
}

/// What the server → client direction notes as messages pass.
struct ServerWatch<'a> {
    record: &'a SessionRecord,
    tracker: &'a Tracker,
    sent_fatal: &'a mut bool,
    draining: &'a AtomicBool,
}

impl Watch for ServerWatch<'_> {
    fn hold(&self) -> bool {
        self.record.kill_pending()
    }

    fn count(&self, n: usize) {
        self.record.add_bytes_from_server(n);
    }

    fn on_message(&mut self, m: Message<'_>) {
        on_server_message(m, self.record, self.tracker, self.sent_fatal);
    }

    fn stop(&self, at_boundary: bool) -> bool {
        self.draining.load(Ordering::Relaxed)
            && at_boundary
            && self.record.state() == TxnState::Idle
    }
}

/// Notes what a server message tells about the session: the backend key, the transaction state
/// (through `tracker`) and whether the server sent a FATAL. Public so that
/// `proxy/tests/no_alloc.rs` drives the pump's own per-message code.
pub fn on_server_message(
    m: Message<'_>,
    record: &SessionRecord,
    tracker: &Tracker,
    sent_fatal: &mut bool,
) {
    match m.tag {
        backend::BACKEND_KEY_DATA => {
            if let Some((pid, secret)) = m.body_prefix.split_first_chunk::<4>() {
                record.set_backend_key(i32::from_be_bytes(*pid), secret);
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
    tracker.server_message(m.tag, m.body_prefix, record);
    #[cfg(feature = "testing")]
    super::testing::after_message(record, tracker, false, &m);
}

/// The bytes before the first NUL (all of them if there is none). `CStr` finds the NUL a word
/// at a time; only a Parse's statement name (short) is searched on the forwarding path.
fn until_nul(bytes: &[u8]) -> &[u8] {
    CStr::from_bytes_until_nul(bytes).map_or(bytes, CStr::to_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::test_record as record;

    fn message(tag: u8, body: &[u8]) -> Message<'_> {
        Message {
            tag,
            body_len: body.len() as u32,
            body_prefix: body,
        }
    }

    fn client_message(record: &SessionRecord, tracker: &Tracker, tag: u8, body: &[u8]) {
        on_client_message(message(tag, body), record, tracker, &mut None);
    }

    #[test]
    fn terminate_is_a_goodbye_only_with_nothing_in_flight() {
        let (r, t) = (record(), Tracker::new());
        on_server_message(message(backend::READY_FOR_QUERY, b"T"), &r, &t, &mut false);
        let mut idle = None;
        on_client_message(message(frontend::TERMINATE, b""), &r, &t, &mut idle);
        assert_eq!(idle, Some(Goodbye::Idle));

        let mut busy = None;
        client_message(&r, &t, frontend::QUERY, b"SELECT pg_sleep(30)\0");
        on_client_message(message(frontend::TERMINATE, b""), &r, &t, &mut busy);
        assert_eq!(busy, Some(Goodbye::WhileBusy));
    }

    #[test]
    fn a_fatal_from_the_server_is_noted_and_an_error_is_not() {
        let (r, t) = (record(), Tracker::new());
        let mut sent_fatal = false;
        let error = b"SERROR\0C42601\0Msyntax\0\0";
        on_server_message(
            message(backend::ERROR_RESPONSE, error),
            &r,
            &t,
            &mut sent_fatal,
        );
        assert!(!sent_fatal);
        let fatal = b"SFATAL\0C57P01\0Mterminating\0\0";
        on_server_message(
            message(backend::ERROR_RESPONSE, fatal),
            &r,
            &t,
            &mut sent_fatal,
        );
        assert!(sent_fatal);
    }

    #[test]
    fn statements_are_read_from_query_and_parse() {
        let (r, t) = (record(), Tracker::new());
        client_message(&r, &t, frontend::QUERY, b"SELECT 1\0");
        assert_eq!(r.last_statement(), "SELECT 1");
        client_message(
            &r,
            &t,
            frontend::PARSE,
            b"stmt_1\0SELECT $1::int\0\0\x01\0\0\0\x17",
        );
        assert_eq!(r.last_statement(), "SELECT $1::int");
        client_message(&r, &t, frontend::PARSE, b"\0UPDATE t SET a = 1\0\0\0");
        assert_eq!(r.last_statement(), "UPDATE t SET a = 1");
        // A prefix cut before any NUL (a name longer than the capture) yields no text.
        client_message(&r, &t, frontend::PARSE, b"endless_name");
        assert_eq!(r.last_statement(), "");
    }
}
