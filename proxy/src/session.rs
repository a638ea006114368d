//! The session pump: forwards one client's bytes to its PostgreSQL backend and back, and keeps
//! the session's record (backend pid, transaction state, last statement) current as messages
//! pass.
//!
//! Each direction reads whatever its socket has into a per-thread buffer, lets a
//! [`FrameScanner`] walk the message headers (updating the record from the few messages that
//! matter), and writes the same bytes on: one read and one write per burst of traffic. A session
//! owns no I/O buffer while idle; only when the other side is slow are the bytes it has not
//! taken yet kept in a session-owned backlog, and reading pauses until it is drained. Nothing is
//! allocated per message, nothing waits on a lock, and the guard is never consulted while
//! traffic flows. The directions run concurrently so a client that pipelines while the server
//! streams results never deadlocks the proxy. The rare events (a kill, shutdown, the startup
//! deadline) are watched by a future that is polled only when one of them wakes it.
//!
//! How a session ends decides what happens to its backend:
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

use std::cell::RefCell;
use std::ffi::CStr;
use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use guard_core::{SessionRecord, TxnState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::frame::{
    FrameError, FrameScanner, Interests, Message, CLIENT_INTERESTS, SERVER_INTERESTS,
};
use crate::protocol::{self, backend, frontend, sqlstate};
use crate::GuardHandle;

/// The per-thread read buffer every session borrows for one read and the write that follows.
/// Bigger reads mean fewer syscalls for large results; being per thread, its size costs idle
/// sessions nothing.
const SCRATCH_SIZE: usize = 64 * 1024;

/// Buffer of the rare reads that happen outside the forwarding loop (draining a lost client's
/// last statement).
const DISCARD_BUFFER_SIZE: usize = 8 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

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
    /// Terminate was sent with nothing in flight: an orderly goodbye.
    Goodbye,
    /// The client vanished without Terminate, or sent it while a statement was in flight.
    Lost(ClientLoss),
    /// The server stopped accepting what the client sent.
    ServerWriteFailed(io::Error),
}

/// How a client went away; becomes the trigger description in the guard's audit.
#[derive(Debug)]
enum ClientLoss {
    Eof,
    /// Terminate arrived while a statement was in flight.
    TerminateWhileBusy,
    ReadFailed(io::Error),
    WriteFailed(io::Error),
    ProtocolViolation(FrameError),
}

impl fmt::Display for ClientLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientLoss::Eof => f.write_str("client closed the connection without Terminate"),
            ClientLoss::TerminateWhileBusy => f.write_str(
                "Terminate while busy: the client said goodbye with a statement in flight",
            ),
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
    flow: Flow,
    track: ClientTrack,
}

/// What the client → server direction remembers between messages.
#[derive(Debug, Default)]
pub struct ClientTrack {
    /// Syncs sent since the last Execute or Query. If that command turns out to be a COPY FROM
    /// STDIN, the server ignores these Syncs, so they must not be counted as awaiting a reply.
    syncs_since_execute: u32,
    /// Set by Terminate.
    goodbye: Option<Goodbye>,
}

impl ClientTrack {
    /// The Terminate the client sent, if any.
    pub fn goodbye(&self) -> Option<Goodbye> {
        self.goodbye
    }
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
struct ServerSide {
    flow: Flow,
    /// The server sent a FATAL (or PANIC): its closing the connection is explained.
    sent_fatal: bool,
}

impl ServerSide {
    /// True when lockguard may append its own message to what the client has received.
    fn client_at_message_boundary(&self) -> bool {
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
        track: ClientTrack::default(),
    };
    let mut server = ServerSide {
        flow: Flow::new(&SERVER_INTERESTS),
        sent_fatal: false,
    };
    // Set once shutdown has begun: the server direction ends the session at its next idle
    // moment. A session-local flag, because asking the shared token takes its lock.
    let draining = AtomicBool::new(false);

    let ended = {
        let client_to_server =
            client_to_server(&mut client, &mut client_read, &mut server_write, record);
        let server_to_client = server_to_client(
            &mut server,
            &mut server_read,
            &mut client_write,
            record,
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
) -> ClientEnd
where
    CR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let ClientSide { flow, track } = side;
    let mut watch = ClientWatch { record, track };
    let stopped = poll_fn(|cx| flow.poll_forward(cx, client, server, &mut watch)).await;
    let goodbye = match watch.track.goodbye {
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
    track: &'a mut ClientTrack,
}

impl Watch for ClientWatch<'_> {
    fn hold(&self) -> bool {
        false
    }

    fn count(&self, n: usize) {
        self.record.add_bytes_from_client(n);
    }

    fn on_message(&mut self, m: Message<'_>) {
        on_client_message(m, self.record, self.track);
    }

    fn stop(&self, _at_boundary: bool) -> bool {
        self.track.goodbye.is_some()
    }
}

/// Notes what a client message tells about the session. Public so that
/// `proxy/tests/no_alloc.rs` drives the pump's own per-message code.
pub fn on_client_message(m: Message<'_>, record: &SessionRecord, track: &mut ClientTrack) {
    let syncs_since_execute = &mut track.syncs_since_execute;
    match m.tag {
        frontend::QUERY => {
            record.set_last_statement(until_nul(m.body_prefix));
            record.sync_sent();
            *syncs_since_execute = 0;
        }
        frontend::PARSE => {
            // Body: statement name, NUL, query text, NUL, parameter types.
            let name = until_nul(m.body_prefix);
            let after_name = m.body_prefix.get(name.len() + 1..).unwrap_or_default();
            record.set_last_statement(until_nul(after_name));
        }
        frontend::EXECUTE => {
            record.execute_sent();
            *syncs_since_execute = 0;
        }
        frontend::SYNC => {
            record.sync_sent();
            *syncs_since_execute += 1;
        }
        frontend::FUNCTION_CALL => record.sync_sent(),
        frontend::COPY_DONE | frontend::COPY_FAIL => {
            // Counts only if the server entered COPY IN; a stray one changes nothing.
            record.copy_in_ended(*syncs_since_execute);
            *syncs_since_execute = 0;
        }
        frontend::TERMINATE if track.goodbye.is_none() => {
            track.goodbye = Some(if record.statement_in_flight() {
                Goodbye::WhileBusy
            } else {
                Goodbye::Idle
            });
        }
        _ => {}
    }
}

/// Server → client: forwards bytes, noting the backend key, transaction status and FATALs.
async fn server_to_client<SR, CW>(
    side: &mut ServerSide,
    server: &mut SR,
    client: &mut CW,
    record: &SessionRecord,
    draining: &AtomicBool,
) -> ServerEnd
where
    SR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    let ServerSide { flow, sent_fatal } = side;
    let mut watch = ServerWatch {
        record,
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
        on_server_message(m, self.record, self.sent_fatal);
    }

    fn stop(&self, at_boundary: bool) -> bool {
        self.draining.load(Ordering::Relaxed)
            && at_boundary
            && self.record.state() == TxnState::Idle
    }
}

/// Notes what a server message tells about the session. Public so that
/// `proxy/tests/no_alloc.rs` drives the pump's own per-message code.
pub fn on_server_message(m: Message<'_>, record: &SessionRecord, sent_fatal: &mut bool) {
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
        backend::COPY_IN_RESPONSE => record.copy_in_started(),
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

/// What a direction does with the bytes passing through it.
trait Watch {
    /// True when freshly read bytes must be held back, unscanned and unwritten.
    fn hold(&self) -> bool;
    /// Counts bytes read.
    fn count(&self, n: usize);
    /// Called for each message the direction's scanner reports.
    fn on_message(&mut self, m: Message<'_>);
    /// Asked whenever everything read so far has been written: true ends the direction.
    /// `at_boundary` says whether that is a message boundary.
    fn stop(&self, at_boundary: bool) -> bool;
}

/// How a direction's forwarding stopped.
enum Stopped {
    Eof,
    ReadFailed(io::Error),
    WriteFailed(io::Error),
    Invalid(FrameError),
    /// [`Watch::hold`] asked to hold bytes: they wait in the backlog, unscanned.
    Held,
    /// [`Watch::stop`] said so.
    Stop,
}

/// One direction's forwarding state.
struct Flow {
    scanner: FrameScanner,
    /// Bytes read but not yet taken by the writer (it was slow), from `backlog_start` on; or,
    /// when `held`, bytes held back whole. Unallocated in the common case and freed once
    /// drained, so idle sessions keep no buffer.
    backlog: Vec<u8>,
    backlog_start: usize,
    held: bool,
    /// The writer took bytes it may still buffer (TLS): flush before reading more.
    unflushed: bool,
}

impl Flow {
    fn new(interests: &'static Interests) -> Flow {
        Flow {
            scanner: FrameScanner::new(interests),
            backlog: Vec::new(),
            backlog_start: 0,
            held: false,
            unflushed: false,
        }
    }

    /// True when what the writer has been given ends at a message boundary.
    fn written_to_boundary(&self) -> bool {
        self.scanner.at_boundary() && (self.held || self.backlog_start == self.backlog.len())
    }

    /// Forwards from `reader` to `writer` until either has nothing more to do for now
    /// (`Pending`) or forwarding stops. Per burst of traffic: one read into the thread's
    /// scratch buffer, one scan, one write.
    fn poll_forward<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        watch: &mut impl Watch,
    ) -> Poll<Stopped>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if let Err(e) = ready!(self.poll_drain(cx, writer)) {
                return Poll::Ready(Stopped::WriteFailed(e));
            }
            if watch.stop(self.scanner.at_boundary()) {
                return Poll::Ready(Stopped::Stop);
            }
            let step = with_scratch(|scratch| {
                let mut buf = ReadBuf::new(scratch);
                match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Stopped::ReadFailed(e))),
                    Poll::Ready(Ok(())) => {
                        Poll::Ready(self.pass_on(cx, buf.filled(), writer, watch))
                    }
                }
            });
            if let Some(stopped) = ready!(step) {
                return Poll::Ready(stopped);
            }
        }
    }

    /// Scans freshly read `data` and hands it to `writer`; what the writer does not take now
    /// goes to the backlog. `Some` when forwarding stops.
    fn pass_on<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
        writer: &mut W,
        watch: &mut impl Watch,
    ) -> Option<Stopped> {
        if data.is_empty() {
            return Some(Stopped::Eof);
        }
        if watch.hold() {
            self.backlog.extend_from_slice(data);
            self.held = true;
            return Some(Stopped::Held);
        }
        watch.count(data.len());
        if let Err(e) = self.scanner.feed(data, |m| watch.on_message(m)) {
            return Some(Stopped::Invalid(e));
        }
        self.unflushed = true;
        let taken = match Pin::new(&mut *writer).poll_write(cx, data) {
            Poll::Ready(Ok(0)) => {
                return Some(Stopped::WriteFailed(io::ErrorKind::WriteZero.into()))
            }
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Some(Stopped::WriteFailed(e)),
            Poll::Pending => 0,
        };
        if taken < data.len() {
            self.backlog.extend_from_slice(&data[taken..]);
        }
        None
    }

    /// Writes the backlog, then flushes. `Ready(Ok)` once the writer has everything.
    fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
    ) -> Poll<io::Result<()>> {
        while self.backlog_start < self.backlog.len() {
            let rest = &self.backlog[self.backlog_start..];
            match ready!(Pin::new(&mut *writer).poll_write(cx, rest)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.backlog_start += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if !self.backlog.is_empty() {
            // A slow peer is rare: give the memory back rather than keep it per session.
            self.backlog = Vec::new();
            self.backlog_start = 0;
        }
        if self.unflushed {
            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Lets held bytes go on after all: counts and scans them; the next
    /// [`poll_forward`](Self::poll_forward) writes them.
    fn release_held(&mut self, watch: &mut impl Watch) -> Result<(), FrameError> {
        self.held = false;
        watch.count(self.backlog.len());
        self.unflushed = true;
        self.scanner.feed(&self.backlog, |m| watch.on_message(m))
    }
}

/// Runs `f` with this thread's scratch buffer. A session polls one direction at a time and
/// neither socket calls back into the pump, so the buffer is always free; should that ever
/// change, `f` gets a fresh buffer rather than a panic.
fn with_scratch<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut vec![0; DISCARD_BUFFER_SIZE]),
    })
}

/// The parts of one task (the pump's two directions and its rare events), each polled only
/// after its own waker fired (or on the first poll), so a part with nothing to do costs nothing
/// while another is busy. The task's waker is registered once per poll of the task, for all
/// parts.
struct WakeGroup {
    task: Arc<AtomicWaker>,
}

/// One part of a [`WakeGroup`].
struct WakeGated<F> {
    future: F,
    gate: Arc<Gate>,
    waker: Waker,
}

/// The wake-up flag of a [`WakeGated`] part, and the task to wake with it.
struct Gate {
    woken: AtomicBool,
    task: Arc<AtomicWaker>,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl WakeGroup {
    fn new() -> Self {
        WakeGroup {
            task: Arc::new(AtomicWaker::new()),
        }
    }

    fn gate<F: Future + Unpin>(&self, future: F) -> WakeGated<F> {
        let gate = Arc::new(Gate {
            woken: AtomicBool::new(true),
            task: Arc::clone(&self.task),
        });
        let waker = Waker::from(Arc::clone(&gate));
        WakeGated {
            future,
            gate,
            waker,
        }
    }

    /// To be called at the start of every poll of the task, before its parts are polled: a
    /// part woken from then on wakes the task again.
    fn register(&self, cx: &Context<'_>) {
        self.task.register(cx.waker());
    }
}

impl<F: Future + Unpin> WakeGated<F> {
    /// Polls the part if its waker fired since its last poll. The group must have been
    /// registered in this poll of the task.
    fn poll_if_woken(&mut self) -> Poll<F::Output> {
        if !self.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut self.future).poll(&mut Context::from_waker(&self.waker))
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
) {
    let flow = &mut side.flow;
    let sent_fatal = &mut side.sent_fatal;
    if flow.held {
        // Held bytes were never scanned; the scanner must see them to stay in step.
        flow.held = false;
        if flow
            .scanner
            .feed(&flow.backlog, |m| on_server_message(m, record, sent_fatal))
            .is_err()
        {
            return;
        }
    }
    flow.backlog = Vec::new();
    flow.backlog_start = 0;
    let mut buf = vec![0; DISCARD_BUFFER_SIZE];
    while record.statement_in_flight() {
        let n = match server.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if flow
            .scanner
            .feed(&buf[..n], |m| on_server_message(m, record, sent_fatal))
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

/// The bytes before the first NUL (all of them if there is none). `CStr` finds the NUL a word
/// at a time, which matters because every Query's text is searched.
fn until_nul(bytes: &[u8]) -> &[u8] {
    CStr::from_bytes_until_nul(bytes).map_or(bytes, CStr::to_bytes)
}

#[cfg(test)]
mod tests {
    use guard_core::{ClientInfo, UpstreamIdentity};

    use super::*;

    fn record() -> SessionRecord {
        let client = ClientInfo {
            addr: "127.0.0.1:5000".parse().unwrap(),
            user: "u".into(),
            database: "d".into(),
            application_name: String::new(),
        };
        SessionRecord::new(1, client, UpstreamIdentity::Unix)
    }

    fn message(tag: u8, body: &[u8]) -> Message<'_> {
        Message {
            tag,
            body_len: body.len() as u32,
            body_prefix: body,
        }
    }

    fn client_message(record: &SessionRecord, tag: u8, body: &[u8]) {
        on_client_message(message(tag, body), record, &mut ClientTrack::default());
    }

    #[test]
    fn terminate_is_a_goodbye_only_with_nothing_in_flight() {
        let r = record();
        r.ready_for_query(b'T');
        let mut idle = ClientTrack::default();
        on_client_message(message(frontend::TERMINATE, b""), &r, &mut idle);
        assert_eq!(idle.goodbye(), Some(Goodbye::Idle));

        let mut busy = ClientTrack::default();
        on_client_message(
            message(frontend::QUERY, b"SELECT pg_sleep(30)\0"),
            &r,
            &mut busy,
        );
        on_client_message(message(frontend::TERMINATE, b""), &r, &mut busy);
        assert_eq!(busy.goodbye(), Some(Goodbye::WhileBusy));
    }

    #[test]
    fn copy_ends_count_only_after_the_server_started_copy_in() {
        let r = record();
        r.ready_for_query(b'I');
        let mut track = ClientTrack::default();
        let mut sent_fatal = false;
        for tag in [frontend::EXECUTE, frontend::SYNC, frontend::COPY_FAIL] {
            on_client_message(message(tag, b""), &r, &mut track);
        }
        assert_eq!(r.state(), TxnState::Active, "a stray CopyFail ends nothing");
        on_server_message(message(backend::READY_FOR_QUERY, b"I"), &r, &mut sent_fatal);
        assert_eq!(r.state(), TxnState::Idle);

        // COPY FROM STDIN over the extended protocol, as libpq runs it.
        for tag in [frontend::EXECUTE, frontend::SYNC] {
            on_client_message(message(tag, b""), &r, &mut track);
        }
        on_server_message(message(backend::COPY_IN_RESPONSE, b""), &r, &mut sent_fatal);
        for tag in [frontend::COPY_DONE, frontend::SYNC] {
            on_client_message(message(tag, b""), &r, &mut track);
        }
        on_server_message(message(backend::READY_FOR_QUERY, b"I"), &r, &mut sent_fatal);
        assert_eq!(r.state(), TxnState::Idle);
    }

    #[test]
    fn statements_are_read_from_query_and_parse() {
        let r = record();
        client_message(&r, frontend::QUERY, b"SELECT 1\0");
        assert_eq!(r.last_statement(), "SELECT 1");
        client_message(
            &r,
            frontend::PARSE,
            b"stmt_1\0SELECT $1::int\0\0\x01\0\0\0\x17",
        );
        assert_eq!(r.last_statement(), "SELECT $1::int");
        client_message(&r, frontend::PARSE, b"\0UPDATE t SET a = 1\0\0\0");
        assert_eq!(r.last_statement(), "UPDATE t SET a = 1");
        // A prefix cut before any NUL (a name longer than the capture) yields no text.
        client_message(&r, frontend::PARSE, b"endless_name");
        assert_eq!(r.last_statement(), "");
    }
}
