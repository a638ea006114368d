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
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::Poll;

use guard_core::{SessionRecord, TxnState};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use super::end::{finish, ClientEnd, ClientLoss, Ended, ServerEnd, SERVER_LAST_WORDS_TIMEOUT};
use super::flow::{Flow, Stopped, Watch};
use super::forwarder::PlainSockets;
use super::tracker::Tracker;
use super::wake::WakeGroup;
use super::SessionContext;
use crate::frame::{Message, CLIENT_INTERESTS, SERVER_INTERESTS};
use crate::protocol::{self, backend, frontend};

/// State of the client → server direction, kept across the pump's phases.
pub(super) struct ClientSide {
    pub(super) flow: Flow,
    /// Set by Terminate.
    pub(super) goodbye: Option<Goodbye>,
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

/// Everything a session's forwarding knows, which moves with the session to the forwarding
/// thread and back.
pub(super) struct Sides {
    pub(super) client: ClientSide,
    pub(super) server: ServerSide,
    pub(super) tracker: Tracker,
}

impl Sides {
    /// True when nothing but plain forwarding is under way: no backlog, no held bytes, no
    /// goodbye.
    fn steady(&self) -> bool {
        self.client.flow.is_clear() && self.server.flow.is_clear() && self.client.goodbye.is_none()
    }
}

/// The pump's sockets: what it forwards between, and, when they are plain sockets, what the
/// forwarding thread can carry.
pub trait Carry: Sized {
    type ClientRead: AsyncRead + Unpin;
    type ClientWrite: AsyncWrite + Unpin;
    type ServerRead: AsyncRead + Unpin;
    type ServerWrite: AsyncWrite + Unpin;

    /// The four halves, to forward between.
    #[allow(clippy::type_complexity)]
    fn halves(
        &mut self,
    ) -> (
        &mut Self::ClientRead,
        &mut Self::ClientWrite,
        &mut Self::ServerRead,
        &mut Self::ServerWrite,
    );

    /// What stays with the session while the forwarding thread has its sockets (the client's
    /// `max_clients` slot).
    type Left;

    /// Takes plain sockets out of tokio's reactor; `Ok(Err(self))` when they cannot be
    /// carried (TLS). An error loses them: they are closed.
    fn take_out(self) -> io::Result<Result<(PlainSockets, Self::Left), Self>>;

    /// Puts sockets the forwarding thread gave back into tokio's reactor again.
    fn put_back(sockets: PlainSockets, left: Self::Left) -> io::Result<Self>;

    /// Consumes the sockets for the session's end: server read, client write, server write.
    fn into_end(self) -> (Self::ServerRead, Self::ClientWrite, Self::ServerWrite);
}

/// ReadyForQuery messages a session must have seen before the forwarding thread takes it: a
/// session that only authenticates, runs one statement and leaves (`pgbench -C`) would pay for
/// the move and gain nothing.
#[cfg(not(feature = "testing"))]
const CARRY_AFTER_READY_FOR_QUERY: u32 = 3;
/// With the test hooks on, sessions move at their first ReadyForQuery, so that every
/// integration test's sessions run through the forwarding thread.
#[cfg(feature = "testing")]
const CARRY_AFTER_READY_FOR_QUERY: u32 = 1;

/// Runs one session to its end, forwarding between `sockets`; hands the session to
/// `ctx.forwarder` while it is steady.
pub async fn pump<S: Carry>(mut sockets: S, record: &Arc<SessionRecord>, ctx: &SessionContext) {
    let mut sides = Sides {
        client: ClientSide {
            flow: Flow::new(&CLIENT_INTERESTS),
            goodbye: None,
        },
        server: ServerSide {
            flow: Flow::new(&SERVER_INTERESTS),
            sent_fatal: false,
        },
        tracker: Tracker::new(),
    };
    // Set once shutdown has begun: the server direction ends the session at its next idle
    // moment. A session-local flag, because asking the shared token takes its lock.
    let draining = AtomicBool::new(false);
    // ReadyForQuery messages seen, and how many must have been before the next move to the
    // forwarding thread (none without one).
    let ready_count = AtomicU32::new(0);
    let mut carry_at = if ctx.forwarder.is_some() {
        CARRY_AFTER_READY_FOR_QUERY
    } else {
        u32::MAX
    };
    let mut resumed = (None, None);
    let ended = loop {
        let run = forward(
            &mut sides,
            &mut sockets,
            record,
            ctx,
            &draining,
            &ready_count,
            carry_at,
            std::mem::take(&mut resumed),
        )
        .await;
        let Some(ended) = run else {
            // Steady enough to carry, as far as the record tells; the sides say for sure.
            let seen = ready_count.load(Ordering::Relaxed);
            carry_at = seen.saturating_add(1);
            let Some(forwarder) = ctx.forwarder.as_ref().filter(|_| sides.steady()) else {
                continue;
            };
            if !forwarder.is_alive() {
                carry_at = u32::MAX;
                continue;
            }
            let (plain, left) = match sockets.take_out() {
                Ok(Ok(taken)) => taken,
                Ok(Err(not_plain)) => {
                    sockets = not_plain;
                    carry_at = u32::MAX;
                    continue;
                }
                Err(e) => {
                    warn_lost(record, &e);
                    return;
                }
            };
            let Some(back) = forwarder.carry(plain, sides, record, ctx).await else {
                warn_lost(
                    record,
                    &io::Error::other("the forwarding thread failed on it, or is gone"),
                );
                return;
            };
            sides = back.sides;
            resumed = (back.client_stopped, back.server_stopped);
            sockets = match S::put_back(back.sockets, left) {
                Ok(sockets) => sockets,
                Err(e) => {
                    warn_lost(record, &e);
                    return;
                }
            };
            continue;
        };
        break ended;
    };
    let (server_read, client_write, server_write) = sockets.into_end();
    // A goodbye logs only at debug (`finish` says so itself); any other end may log at info,
    // from here or from the guard, so it runs inside the session's span.
    let goodbye = matches!(ended, Ended::Client(ClientEnd::Goodbye));
    let finishing = finish(
        ended,
        &mut sides.server,
        server_read,
        client_write,
        server_write,
        record,
        &sides.tracker,
        ctx,
    );
    if goodbye {
        finishing.await;
    } else {
        finishing.instrument(ctx.span.get().clone()).await;
    }
}

/// A session whose sockets could not be moved between tokio and the forwarding thread ends with
/// them closed: its backend sees the end of its connection, as if the client had vanished.
fn warn_lost(record: &SessionRecord, e: &io::Error) {
    tracing::error!(
        session = record.id,
        client = %record.client.addr,
        error = %e,
        "session closed: its sockets could not be moved to or from the forwarding thread"
    );
}

/// Forwards in this task until the session ends (`Some`), or until it is steady with
/// `carry_at` ReadyForQuery messages seen (`None`). `resumed`: how each direction stopped on
/// the forwarding thread, if it did.
#[allow(clippy::too_many_arguments)]
async fn forward<S: Carry>(
    sides: &mut Sides,
    sockets: &mut S,
    record: &Arc<SessionRecord>,
    ctx: &SessionContext,
    draining: &AtomicBool,
    ready_count: &AtomicU32,
    carry_at: u32,
    resumed: (Option<Stopped>, Option<Stopped>),
) -> Option<Ended> {
    let (client_read, client_write, server_read, server_write) = sockets.halves();
    let Sides {
        client,
        server,
        tracker,
    } = sides;
    let client_to_server = client_to_server(
        client,
        client_read,
        server_write,
        record,
        tracker,
        resumed.0,
    );
    let server_to_client = server_to_client(
        server,
        server_read,
        client_write,
        record,
        tracker,
        draining,
        ready_count,
        resumed.1,
    );
    let events = session_events(record, ctx, draining);
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
            return Poll::Ready(Some(Ended::Client(end)));
        }
        if let Poll::Ready(end) = server_to_client.poll_if_woken() {
            return Poll::Ready(Some(Ended::Server(end)));
        }
        if let Poll::Ready(end) = events.poll_if_woken() {
            return Poll::Ready(Some(end));
        }
        // Both directions wait for their sockets: a moment to move to the forwarding thread.
        if ready_count.load(Ordering::Relaxed) >= carry_at
            && !draining.load(Ordering::Relaxed)
            && !record.kill_pending()
        {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await;
    Some(match first? {
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
    })
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
    resumed: Option<Stopped>,
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
    let stopped = match resumed {
        Some(stopped) => stopped,
        None => poll_fn(|cx| flow.poll_forward(cx, client, server, &mut watch)).await,
    };
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
pub(super) struct ClientWatch<'a> {
    pub(super) record: &'a SessionRecord,
    pub(super) tracker: &'a Tracker,
    pub(super) goodbye: &'a mut Option<Goodbye>,
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
#[allow(clippy::too_many_arguments)]
async fn server_to_client<SR, CW>(
    side: &mut ServerSide,
    server: &mut SR,
    client: &mut CW,
    record: &SessionRecord,
    tracker: &Tracker,
    draining: &AtomicBool,
    ready_count: &AtomicU32,
    mut resumed: Option<Stopped>,
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
        ready_count: Some(ready_count),
    };
    loop {
        let stopped = match resumed.take() {
            Some(stopped) => stopped,
            None => poll_fn(|cx| flow.poll_forward(cx, server, client, &mut watch)).await,
        };
        match stopped {
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
pub(super) struct ServerWatch<'a> {
    pub(super) record: &'a SessionRecord,
    pub(super) tracker: &'a Tracker,
    pub(super) sent_fatal: &'a mut bool,
    pub(super) draining: &'a AtomicBool,
    /// Counts ReadyForQuery messages, for the move to the forwarding thread.
    pub(super) ready_count: Option<&'a AtomicU32>,
}

impl Watch for ServerWatch<'_> {
    fn hold(&self) -> bool {
        self.record.kill_pending()
    }

    fn count(&self, n: usize) {
        self.record.add_bytes_from_server(n);
    }

    fn on_message(&mut self, m: Message<'_>) {
        if m.tag == backend::READY_FOR_QUERY {
            // Only this task writes it: a plain load and store, no locked read-modify-write.
            if let Some(count) = self.ready_count {
                count.store(
                    count.load(Ordering::Relaxed).saturating_add(1),
                    Ordering::Relaxed,
                );
            }
        }
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
