//! The transaction tracker: the one place that reads a session's transaction state off the
//! wire.
//!
//! It counts the client's sync points (Query, Sync, FunctionCall) against the server's
//! ReadyForQuery, notes an Execute not yet followed by Sync, and follows COPY IN, where the
//! server ignores Syncs. From that it publishes to the session record only what the guard
//! and the admin port need: the transaction block the server last reported, whether a
//! statement is in flight, and when each began. guard-core knows no protocol bytes.
//!
//! A statement is in flight while a sync point sent has not been answered by ReadyForQuery,
//! or an Execute has been sent with no Sync after it yet (the server runs it at once, in an
//! implicit transaction that holds its locks until the Sync). Syncs the server swallows
//! during COPY IN are taken off the count when the client ends that COPY, and only if the
//! server's CopyInResponse was seen: a CopyDone or CopyFail outside COPY IN is ignored by the
//! server, so the client's word alone never makes a running statement look finished. A COPY
//! started by Execute leaves that Execute unsynced again when it ends (its Syncs were
//! swallowed).
//!
//! Known limit: a client that pipelines a COPY's data and end before the server's
//! CopyInResponse has arrived (libpq waits for it) is tracked as if the COPY had not begun:
//! the swallowed Syncs stay counted and the session keeps looking busy, so the idle rules do
//! not act on it (a lost client is still handed to the guard). Likewise a Query or
//! FunctionCall the server skips after an error in an extended-protocol batch (until its
//! Sync) stays counted.
//!
//! Both directions of a session's pump write the tracker, from the same task and never at the
//! same time: its fields are atomics only so that the task may move between threads, and they
//! are read and written with plain loads and stores, no read-modify-write.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};

use guard_core::{SessionRecord, TxnStatus};

use crate::protocol::{backend, frontend};

/// One session's transaction state machine. See the module documentation.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Sync points sent but not yet answered by ReadyForQuery.
    pending: AtomicU32,
    /// An Execute was sent with no sync point after it yet.
    unsynced_execute: AtomicBool,
    /// The server sent CopyInResponse and, as far as the proxy has seen, is still in COPY IN
    /// mode: only then does it ignore Syncs, and only then does a CopyDone or CopyFail end
    /// anything.
    copy_in: AtomicBool,
    /// The last Execute or Query was an Execute: if it started a COPY IN, the Syncs the server
    /// swallowed leave it unsynced again once the COPY ends.
    command_was_execute: AtomicBool,
    /// Syncs sent since the last Execute or Query. If that command turns out to be a COPY FROM
    /// STDIN, the server ignores these Syncs, so they must not be counted as awaiting a reply.
    syncs_since_command: AtomicU32,
    /// Whether a statement is in flight, as last published to the record.
    published_in_flight: AtomicBool,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// True while a statement is in flight (see the module documentation).
    pub fn in_flight(&self) -> bool {
        self.pending.load(Relaxed) > 0 || self.unsynced_execute.load(Relaxed)
    }

    /// Follows a message the client sent (its tag is all that matters here) and publishes the
    /// state to `record` if it changed.
    pub fn client_message(&self, tag: u8, record: &SessionRecord) {
        match tag {
            frontend::QUERY => {
                self.sync_point();
                self.syncs_since_command.store(0, Relaxed);
                self.command_was_execute.store(false, Relaxed);
            }
            frontend::EXECUTE => {
                self.unsynced_execute.store(true, Relaxed);
                self.syncs_since_command.store(0, Relaxed);
                self.command_was_execute.store(true, Relaxed);
            }
            frontend::SYNC => {
                self.sync_point();
                let syncs = self.syncs_since_command.load(Relaxed);
                self.syncs_since_command
                    .store(syncs.saturating_add(1), Relaxed);
            }
            frontend::FUNCTION_CALL => self.sync_point(),
            frontend::COPY_DONE | frontend::COPY_FAIL => {
                // Counts only if the server entered COPY IN; a stray one changes nothing.
                if self.copy_in.load(Relaxed) {
                    self.copy_in.store(false, Relaxed);
                    let ignored = self.syncs_since_command.load(Relaxed);
                    let pending = self.pending.load(Relaxed);
                    self.pending.store(pending.saturating_sub(ignored), Relaxed);
                    // An Execute's COPY leaves its implicit transaction open until a Sync the
                    // server does not swallow.
                    if self.command_was_execute.load(Relaxed) {
                        self.unsynced_execute.store(true, Relaxed);
                    }
                }
                self.syncs_since_command.store(0, Relaxed);
            }
            _ => return,
        }
        self.publish_in_flight(record);
    }

    /// Follows a message the server sent (`body_prefix` is the start of its body) and
    /// publishes the state to `record` when the server became ready for a query.
    pub fn server_message(&self, tag: u8, body_prefix: &[u8], record: &SessionRecord) {
        match tag {
            backend::READY_FOR_QUERY => {
                // Whatever COPY IN there was has ended (with CopyDone, CopyFail or an error).
                self.copy_in.store(false, Relaxed);
                // Saturating: the first ReadyForQuery after authentication answers no sync of
                // ours.
                let pending = self.pending.load(Relaxed).saturating_sub(1);
                self.pending.store(pending, Relaxed);
                match body_prefix.first().copied().and_then(status_of) {
                    Some(status) => {
                        let in_flight = self.in_flight();
                        self.published_in_flight.store(in_flight, Relaxed);
                        record.ready_for_query(status, in_flight);
                    }
                    // Not a status PostgreSQL sends: count the answer, keep the old state.
                    None => self.publish_in_flight(record),
                }
            }
            backend::COPY_IN_RESPONSE => self.copy_in.store(true, Relaxed),
            _ => {}
        }
    }

    /// A message the server answers with ReadyForQuery (unless it is swallowed by COPY IN).
    fn sync_point(&self) {
        self.unsynced_execute.store(false, Relaxed);
        let pending = self.pending.load(Relaxed);
        self.pending.store(pending.saturating_add(1), Relaxed);
    }

    /// Tells the record when a statement went in flight or settled without the server being
    /// ready; on the edges only, so steady traffic writes nothing shared.
    fn publish_in_flight(&self, record: &SessionRecord) {
        let in_flight = self.in_flight();
        if in_flight != self.published_in_flight.load(Relaxed) {
            self.published_in_flight.store(in_flight, Relaxed);
            if in_flight {
                record.statement_started();
            } else {
                record.statement_settled();
            }
        }
    }
}

/// The transaction status byte of ReadyForQuery.
fn status_of(byte: u8) -> Option<TxnStatus> {
    match byte {
        b'I' => Some(TxnStatus::Idle),
        b'T' => Some(TxnStatus::InTransaction),
        b'E' => Some(TxnStatus::Failed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use guard_core::TxnState;

    use super::*;
    use crate::session::test_record as record;

    fn client(t: &Tracker, r: &SessionRecord, tags: &[u8]) {
        for &tag in tags {
            t.client_message(tag, r);
        }
    }

    fn ready(t: &Tracker, r: &SessionRecord, status: &[u8]) {
        t.server_message(backend::READY_FOR_QUERY, status, r);
    }

    #[test]
    fn state_follows_ready_for_query_and_sync_points() {
        let (t, r) = (Tracker::new(), record());
        assert_eq!(r.state(), TxnState::Startup);
        ready(&t, &r, b"I");
        assert_eq!(r.state(), TxnState::Idle);
        client(&t, &r, &[frontend::QUERY]);
        assert_eq!(r.state(), TxnState::Active);
        ready(&t, &r, b"T");
        assert_eq!(r.state(), TxnState::IdleInTransaction);
        assert!(r.xact_age().is_some());
        client(&t, &r, &[frontend::FUNCTION_CALL]);
        ready(&t, &r, b"E");
        assert_eq!(r.state(), TxnState::IdleInFailedTransaction);
        client(&t, &r, &[frontend::SYNC]);
        ready(&t, &r, b"I");
        assert_eq!(r.state(), TxnState::Idle);
        assert!(r.xact_age().is_none());
    }

    #[test]
    fn an_execute_without_sync_is_active_until_its_sync_is_answered() {
        let (t, r) = (Tracker::new(), record());
        ready(&t, &r, b"I");
        client(&t, &r, &[frontend::EXECUTE]);
        assert_eq!(r.state(), TxnState::Active);
        client(&t, &r, &[frontend::EXECUTE, frontend::SYNC]);
        assert_eq!(r.state(), TxnState::Active);
        ready(&t, &r, b"I");
        assert_eq!(r.state(), TxnState::Idle);
        assert!(!t.in_flight());
    }

    #[test]
    fn pipelined_sync_points_stay_active_until_the_last_answer() {
        let (t, r) = (Tracker::new(), record());
        ready(&t, &r, b"I");
        client(&t, &r, &[frontend::SYNC, frontend::QUERY]);
        ready(&t, &r, b"T");
        assert_eq!(r.state(), TxnState::Active);
        assert!(r.in_transaction());
        ready(&t, &r, b"T");
        assert_eq!(r.state(), TxnState::IdleInTransaction);
    }

    #[test]
    fn copy_ends_count_only_after_the_server_started_copy_in() {
        let (t, r) = (Tracker::new(), record());
        ready(&t, &r, b"I");
        // Execute of a long statement, its Sync, then a CopyFail no COPY asked for.
        client(
            &t,
            &r,
            &[frontend::EXECUTE, frontend::SYNC, frontend::COPY_FAIL],
        );
        assert_eq!(r.state(), TxnState::Active, "a stray CopyFail ends nothing");
        ready(&t, &r, b"I");
        assert_eq!(r.state(), TxnState::Idle);

        // COPY FROM STDIN over the extended protocol, as libpq runs it: the server ignores the
        // Sync after Execute; CopyDone and the next Sync get the one ReadyForQuery.
        client(&t, &r, &[frontend::EXECUTE, frontend::SYNC]);
        t.server_message(backend::COPY_IN_RESPONSE, b"", &r);
        client(&t, &r, &[frontend::COPY_DONE]);
        assert!(t.in_flight(), "the COPY's transaction waits for a Sync");
        client(&t, &r, &[frontend::SYNC]);
        assert_eq!(r.state(), TxnState::Active);
        ready(&t, &r, b"I");
        assert_eq!(r.state(), TxnState::Idle);

        // A COPY that ended with an error and ReadyForQuery: a late CopyDone is stray again.
        client(&t, &r, &[frontend::QUERY]);
        t.server_message(backend::COPY_IN_RESPONSE, b"", &r);
        ready(&t, &r, b"I");
        client(&t, &r, &[frontend::SYNC, frontend::COPY_DONE]);
        assert!(t.in_flight());
        assert!(r.statement_in_flight());
    }

    #[test]
    fn an_unknown_ready_status_is_counted_but_changes_no_state() {
        let (t, r) = (Tracker::new(), record());
        ready(&t, &r, b"T");
        client(&t, &r, &[frontend::QUERY]);
        ready(&t, &r, b"?");
        assert!(!t.in_flight());
        assert_eq!(r.state(), TxnState::IdleInTransaction);
    }
}
