//! A window on the transaction tracker for tests (feature `testing`): an observer called after
//! every message the pump has scanned (the ones it looks at), in the order it scanned them,
//! with the state the tracker then published.
//! Reading the record from a test instead would race with the pump, which may be several
//! messages further by the time the client sees one.

use std::sync::OnceLock;

use guard_core::{SessionId, SessionRecord, TxnStatus};

use super::tracker::Tracker;
use crate::frame::Message;

/// What the tracker said right after a server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub session: SessionId,
    /// True for a message from the client, false for one from the server.
    pub from_client: bool,
    /// The message's tag.
    pub tag: u8,
    /// The first byte of its body, if any (ReadyForQuery's transaction status).
    pub first_byte: Option<u8>,
    /// Whether a statement was in flight, as the tracker and the record say.
    pub in_flight: bool,
    pub record_in_flight: bool,
    /// The transaction block as published to the record.
    pub status: Option<TxnStatus>,
    /// Whether a forwarding thread scanned it (not the async runtime).
    pub on_forwarding_thread: bool,
}

type Observer = Box<dyn Fn(Observation) + Send + Sync>;

static OBSERVER: OnceLock<Observer> = OnceLock::new();

/// Installs the process's one observer; false if one was installed already.
pub fn observe_messages(observer: impl Fn(Observation) + Send + Sync + 'static) -> bool {
    OBSERVER.set(Box::new(observer)).is_ok()
}

pub(super) fn after_message(
    record: &SessionRecord,
    tracker: &Tracker,
    from_client: bool,
    m: &Message<'_>,
) {
    if let Some(observer) = OBSERVER.get() {
        observer(Observation {
            session: record.id,
            from_client,
            tag: m.tag,
            first_byte: m.body_prefix.first().copied(),
            in_flight: tracker.in_flight(),
            record_in_flight: record.statement_in_flight(),
            status: record.txn_status(),
            on_forwarding_thread: std::thread::current().name()
                == Some(super::forwarder::THREAD_NAME),
        });
    }
}
