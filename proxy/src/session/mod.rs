//! A proxied session: forwards one client's bytes to its PostgreSQL backend and back, and keeps
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
//!
//! The files of this folder, one idea each:
//! - `pump`: runs a session, its two directions and its rare events, and notes what each
//!   message tells about the session;
//! - `flow`: one direction's forwarding, with the backlog for a slow writer;
//! - `forwarder`: the forwarding thread, which carries steady sessions (plain sockets) in an
//!   `epoll` loop of its own and gives them back to the pump for anything else;
//! - `wake`: the wake-gating that polls each part of the pump only when it was woken;
//! - `tracker`: the transaction state machine (sync points, COPY IN, ReadyForQuery) that
//!   publishes the state to the session record;
//! - `end`: how a session ends and what that means for its backend;
//! - `span`: the session's tracing span, made only when the session logs.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::GuardHandle;

mod end;
mod flow;
mod forwarder;
mod pump;
mod span;
mod tracker;
mod wake;

/// A session record for the pump's and the tracker's unit tests.
#[cfg(test)]
fn test_record() -> guard_core::SessionRecord {
    let client = guard_core::ClientInfo {
        addr: "127.0.0.1:5000".parse().expect("address"),
        user: "u".into(),
        database: "d".into(),
        application_name: String::new(),
    };
    guard_core::SessionRecord::new(1, client, guard_core::UpstreamIdentity::Unix)
}

pub use end::farewell;
pub use forwarder::{Forwarder, PlainSockets, PlainUpstream};
pub use pump::{pump, Carry};
pub(crate) use span::session_event;
pub use span::SessionSpan;
// The per-message callbacks and the tracker are the pump's own; the allocation test drives them
// directly, so they are opened with the `testing` feature.
#[cfg(feature = "testing")]
pub use pump::{on_client_message, on_server_message, Goodbye};
#[cfg(feature = "testing")]
pub use tracker::Tracker;

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
    /// The session's span, made when the session first logs (the forwarding itself logs
    /// nothing).
    pub span: SessionSpan,
    /// The thread that forwards the session while it is steady, if there is one.
    pub forwarder: Option<Forwarder>,
}

#[cfg(feature = "testing")]
pub mod testing;
