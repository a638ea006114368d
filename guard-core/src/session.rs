//! One proxied client session as the guard and the admin port see it.
//!
//! The record is shared between the session's pump (which writes it as messages pass) and the
//! guard / admin (which read it). Everything the pump changes per message is an atomic, so the
//! forwarding path never waits on a lock; the few fields set once per session use `OnceLock`.

use std::ffi::CStr;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

use crate::clock;

/// Longest statement text kept for the audit trail, in bytes.
pub const MAX_STATEMENT_LEN: usize = 1024;

/// Identifies a session for the lifetime of the process (never reused).
pub type SessionId = u64;

/// Where the proxy's upstream socket of this session comes from, as PostgreSQL sees it.
///
/// This is how the enforcer proves a backend pid still belongs to this session before it
/// signals it: for TCP, `pg_stat_activity.client_port` of the backend must equal our local port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamIdentity {
    /// Our local address of the TCP connection to PostgreSQL.
    Tcp(SocketAddr),
    /// A unix-domain socket: PostgreSQL reports no client port, so the enforcer falls back to
    /// the backend's start time, captured while the session was certainly alive.
    Unix,
}

/// The transaction state of a session, as the last ReadyForQuery and in-flight work say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnState {
    /// Connected, authentication not finished yet (no ReadyForQuery seen).
    Startup,
    /// Outside a transaction, nothing in flight.
    Idle,
    /// A statement or a pipeline of messages is being processed.
    Active,
    /// Inside an open transaction block, waiting for the client.
    IdleInTransaction,
    /// Inside a failed transaction block (only ROLLBACK is accepted), waiting for the client.
    IdleInFailedTransaction,
}

impl TxnState {
    /// The name used by `pg_stat_activity.state` and by lockguard's admin output.
    pub fn as_str(self) -> &'static str {
        match self {
            TxnState::Startup => "startup",
            TxnState::Idle => "idle",
            TxnState::Active => "active",
            TxnState::IdleInTransaction => "idle in transaction",
            TxnState::IdleInFailedTransaction => "idle in transaction (aborted)",
        }
    }
}

impl std::fmt::Display for TxnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transaction block a session is in, as the server last said when it became ready for a
/// query. The proxy's transaction tracker reads it off the wire; the record stores only this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxnStatus {
    /// Outside a transaction block.
    Idle,
    /// Inside an open transaction block.
    InTransaction,
    /// Inside a failed transaction block: only ROLLBACK is accepted.
    Failed,
}

impl TxnStatus {
    fn encode(self) -> u8 {
        match self {
            TxnStatus::Idle => STATUS_IDLE,
            TxnStatus::InTransaction => STATUS_IN_TRANSACTION,
            TxnStatus::Failed => STATUS_FAILED,
        }
    }

    /// True inside a transaction block, failed or not.
    pub fn in_transaction(self) -> bool {
        self != TxnStatus::Idle
    }
}

/// [`TxnStatus`] as stored in an atomic; [`STATUS_NONE`] until the server was first ready.
const STATUS_NONE: u8 = 0;
const STATUS_IDLE: u8 = 1;
const STATUS_IN_TRANSACTION: u8 = 2;
const STATUS_FAILED: u8 = 3;

/// Who the client is: fixed once the startup packet has been read.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub addr: SocketAddr,
    pub user: String,
    pub database: String,
    pub application_name: String,
}

/// Backend identity from BackendKeyData: the pid serving this session and its cancel secret.
#[derive(Debug, Clone)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: Box<[u8]>,
}

/// Why the proxy is about to end a live session on purpose; the pump sends this to the client.
#[derive(Debug, Clone)]
pub struct KillNotice {
    /// SQLSTATE of the FATAL ErrorResponse sent to the client.
    pub sqlstate: &'static str,
    /// Full message, starting with `lockguard:`.
    pub message: String,
}

/// The live state of one proxied session. Shared via `Arc` between its pump, the registry, the
/// guard and the admin port.
#[derive(Debug)]
pub struct SessionRecord {
    pub id: SessionId,
    pub client: ClientInfo,
    pub upstream: UpstreamIdentity,
    /// Wall-clock time the session was accepted, for humans.
    pub connected_at: SystemTime,
    backend: OnceLock<BackendKey>,
    /// Mirrors `backend.pid` for lock-free reads; 0 until BackendKeyData arrives.
    backend_pid: AtomicI32,
    /// The transaction block as last published ([`TxnStatus`] encoded), or [`STATUS_NONE`].
    status: AtomicU8,
    /// A statement is being processed: work was sent that the server has not yet answered
    /// with its readiness for a new query. Published by the proxy's transaction tracker.
    in_flight: AtomicBool,
    /// Clock ticks ([`clock::now_micros`]) when the current state began.
    state_since: AtomicU64,
    /// Clock ticks when the current transaction began; 0 outside a transaction.
    xact_since: AtomicU64,
    bytes_from_client: AtomicU64,
    bytes_from_server: AtomicU64,
    /// The last Query's / Parse's statement as sent: up to [`MAX_STATEMENT_LEN`] raw bytes
    /// from its start, its NUL terminator and what follows included. Written with `try_lock`
    /// by the pump (never waits, never allocates: the capacity is reserved); the text is cut
    /// out only when someone reads it, which is rare next to how often it is written.
    last_statement: Mutex<Vec<u8>>,
    /// Set by whoever decides to end this session (guard, operator); read by the pump.
    kill_notice: OnceLock<KillNotice>,
    /// Wakes the pump once `kill_notice` is set and the backend has been dealt with.
    kill_wakeup: Notify,
    /// Set before a kill is attempted, so the pump stops forwarding the backend's own
    /// termination message and sends ours instead.
    kill_pending: AtomicBool,
    /// Set once the guard has warned that PostgreSQL does not know this session's backend pid.
    unmapped_backend_noted: AtomicBool,
}

impl SessionRecord {
    /// A new session in `Startup` state.
    pub fn new(id: SessionId, client: ClientInfo, upstream: UpstreamIdentity) -> Self {
        SessionRecord {
            id,
            client,
            upstream,
            connected_at: SystemTime::now(),
            backend: OnceLock::new(),
            backend_pid: AtomicI32::new(0),
            status: AtomicU8::new(STATUS_NONE),
            in_flight: AtomicBool::new(false),
            state_since: AtomicU64::new(clock::now_micros()),
            xact_since: AtomicU64::new(0),
            bytes_from_client: AtomicU64::new(0),
            bytes_from_server: AtomicU64::new(0),
            last_statement: Mutex::new(Vec::with_capacity(MAX_STATEMENT_LEN)),
            kill_notice: OnceLock::new(),
            kill_wakeup: Notify::new(),
            kill_pending: AtomicBool::new(false),
            unmapped_backend_noted: AtomicBool::new(false),
        }
    }

    // ---- written by the pump ------------------------------------------------------------

    /// Records BackendKeyData. Only the first one counts (PostgreSQL sends one per session).
    pub fn set_backend_key(&self, pid: i32, secret: &[u8]) {
        if self
            .backend
            .set(BackendKey {
                pid,
                secret: secret.into(),
            })
            .is_ok()
        {
            self.backend_pid.store(pid, Ordering::Release);
        }
    }

    /// A statement went in flight: from now on the session is active. Called by the one
    /// tracker that writes this record, on the edge only.
    pub fn statement_started(&self) {
        if !self.in_flight.load(Ordering::Acquire) {
            self.state_since
                .store(clock::now_micros(), Ordering::Release);
            self.in_flight.store(true, Ordering::Release);
        }
    }

    /// The tracker found nothing in flight any more without the server saying it is ready
    /// (a COPY's end discounted the Syncs it swallowed). The state's clock keeps running from
    /// when the statement started: the server's readiness is what starts a new state.
    pub fn statement_settled(&self) {
        self.in_flight.store(false, Ordering::Release);
    }

    /// The server is ready for a query with the transaction block in `status`;
    /// `still_in_flight` says whether more work already sent awaits its answer (a pipeline).
    /// Starts a new state period either way, and the transaction's clock when a block opens.
    pub fn ready_for_query(&self, status: TxnStatus, still_in_flight: bool) {
        let now = clock::now_micros();
        let previous = self.status.load(Ordering::Acquire);
        let was_in_transaction = previous == STATUS_IN_TRANSACTION || previous == STATUS_FAILED;
        match (was_in_transaction, status.in_transaction()) {
            (false, true) => self.xact_since.store(now, Ordering::Release),
            (true, false) => self.xact_since.store(0, Ordering::Release),
            _ => {}
        }
        self.status.store(status.encode(), Ordering::Release);
        self.in_flight.store(still_in_flight, Ordering::Release);
        self.state_since.store(now, Ordering::Release);
    }

    /// Remembers the statement of a Query or Parse: `raw` starts with its text, which ends at
    /// the first NUL (or with `raw`). Only a prefix is kept; [`last_statement`] cuts the text
    /// out. Never waits: if a reader holds the lock this very moment, this statement is skipped.
    ///
    /// [`last_statement`]: SessionRecord::last_statement
    pub fn set_last_statement(&self, raw: &[u8]) {
        if let Ok(mut slot) = self.last_statement.try_lock() {
            slot.clear();
            slot.extend_from_slice(&raw[..raw.len().min(MAX_STATEMENT_LEN)]);
        }
    }

    /// Counts bytes read from the client.
    pub fn add_bytes_from_client(&self, n: usize) {
        self.bytes_from_client
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts bytes read from the server.
    pub fn add_bytes_from_server(&self, n: usize) {
        self.bytes_from_server
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    // ---- read by the guard and the admin port ------------------------------------------

    /// Backend pid, once BackendKeyData has been seen.
    pub fn backend_pid(&self) -> Option<i32> {
        match self.backend_pid.load(Ordering::Acquire) {
            0 => None,
            pid => Some(pid),
        }
    }

    /// Backend pid and cancel secret, once BackendKeyData has been seen.
    pub fn backend_key(&self) -> Option<&BackendKey> {
        self.backend.get()
    }

    /// The session's transaction state now.
    pub fn state(&self) -> TxnState {
        if self.statement_in_flight() {
            return TxnState::Active;
        }
        match self.status.load(Ordering::Acquire) {
            STATUS_IDLE => TxnState::Idle,
            STATUS_IN_TRANSACTION => TxnState::IdleInTransaction,
            STATUS_FAILED => TxnState::IdleInFailedTransaction,
            _ => TxnState::Startup,
        }
    }

    /// The transaction block as the server last said, `None` before it was first ready.
    pub fn txn_status(&self) -> Option<TxnStatus> {
        match self.status.load(Ordering::Acquire) {
            STATUS_IDLE => Some(TxnStatus::Idle),
            STATUS_IN_TRANSACTION => Some(TxnStatus::InTransaction),
            STATUS_FAILED => Some(TxnStatus::Failed),
            _ => None,
        }
    }

    /// True while the server last said a transaction block is open (failed or not), whether
    /// or not a statement is running in it now.
    pub fn in_transaction(&self) -> bool {
        self.txn_status().is_some_and(TxnStatus::in_transaction)
    }

    /// True while a statement is being processed (sent, not yet answered), as the proxy's
    /// transaction tracker last published.
    pub fn statement_in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Acquire)
    }

    /// How long the session has been in its current state.
    pub fn state_age(&self) -> Duration {
        clock::since_micros(self.state_since.load(Ordering::Acquire))
    }

    /// How long the current transaction has been open, if one is.
    pub fn xact_age(&self) -> Option<Duration> {
        match self.xact_since.load(Ordering::Acquire) {
            0 => None,
            t => Some(clock::since_micros(t)),
        }
    }

    /// When the session entered its current state.
    pub fn state_since(&self) -> Instant {
        clock::instant_of_micros(self.state_since.load(Ordering::Acquire))
    }

    pub fn bytes_from_client(&self) -> u64 {
        self.bytes_from_client.load(Ordering::Relaxed)
    }

    pub fn bytes_from_server(&self) -> u64 {
        self.bytes_from_server.load(Ordering::Relaxed)
    }

    /// A copy of the last statement text (may be empty): up to its NUL, at most
    /// [`MAX_STATEMENT_LEN`] bytes, cut to the part that is valid UTF-8 (a tail cut
    /// mid-character, or text that is not UTF-8, is left out).
    pub fn last_statement(&self) -> String {
        let raw = match self.last_statement.lock() {
            Ok(raw) => raw,
            Err(poisoned) => poisoned.into_inner(),
        };
        let text = CStr::from_bytes_until_nul(&raw).map_or(&raw[..], CStr::to_bytes);
        let valid = match std::str::from_utf8(text) {
            Ok(s) => s,
            // The prefix up to the error is valid UTF-8 by definition.
            Err(e) => std::str::from_utf8(&text[..e.valid_up_to()]).unwrap_or_default(),
        };
        valid.to_owned()
    }

    /// Notes that PostgreSQL does not know this session's backend pid (as ours); true the
    /// first time only, so the warning is logged once per session.
    pub fn note_unmapped_backend(&self) -> bool {
        !self.unmapped_backend_noted.swap(true, Ordering::AcqRel)
    }

    // ---- ending a live session on purpose -----------------------------------------------

    /// Announces that the backend is about to be terminated: from now on the pump swallows
    /// what the backend sends, so the client sees lockguard's explanation, not a bare FATAL.
    /// Returns false if another kill is already under way.
    pub fn begin_kill(&self) -> bool {
        !self.kill_pending.swap(true, Ordering::AcqRel)
    }

    /// Withdraws [`begin_kill`](Self::begin_kill) when the kill did not happen (dry-run, identity
    /// mismatch, error): the session carries on untouched.
    pub fn abort_kill(&self) {
        self.kill_pending.store(false, Ordering::Release);
        self.kill_wakeup.notify_waiters();
    }

    /// True between `begin_kill` and the end of the session (or `abort_kill`).
    pub fn kill_pending(&self) -> bool {
        self.kill_pending.load(Ordering::Acquire)
    }

    /// Hands the pump the message to send and wakes it; the pump then closes both sockets.
    pub fn finish_kill(&self, notice: KillNotice) {
        let _ = self.kill_notice.set(notice);
        self.kill_wakeup.notify_waiters();
    }

    /// The notice set by [`finish_kill`](Self::finish_kill), if any.
    pub fn kill_notice(&self) -> Option<&KillNotice> {
        self.kill_notice.get()
    }

    /// Resolves once [`finish_kill`](Self::finish_kill) has been called.
    pub async fn killed(&self) -> &KillNotice {
        loop {
            let wakeup = self.kill_wakeup.notified();
            tokio::pin!(wakeup);
            // Register before checking, so a notify between the check and the await is not lost.
            wakeup.as_mut().enable();
            if let Some(notice) = self.kill_notice.get() {
                return notice;
            }
            wakeup.await;
        }
    }

    /// Waits until a kill under way is either carried out (returns the notice) or withdrawn
    /// (returns `None`). Returns at once when no kill is pending.
    pub async fn kill_resolved(&self) -> Option<&KillNotice> {
        loop {
            let wakeup = self.kill_wakeup.notified();
            tokio::pin!(wakeup);
            wakeup.as_mut().enable();
            if let Some(notice) = self.kill_notice.get() {
                return Some(notice);
            }
            if !self.kill_pending() {
                return None;
            }
            wakeup.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SessionRecord {
        SessionRecord::new(
            1,
            ClientInfo {
                addr: "127.0.0.1:5000".parse().unwrap(),
                user: "u".into(),
                database: "d".into(),
                application_name: String::new(),
            },
            UpstreamIdentity::Unix,
        )
    }

    #[test]
    fn state_follows_what_the_tracker_publishes() {
        let r = record();
        assert_eq!(r.state(), TxnState::Startup);
        assert_eq!(r.txn_status(), None);
        r.ready_for_query(TxnStatus::Idle, false);
        assert_eq!(r.state(), TxnState::Idle);
        r.statement_started();
        assert_eq!(r.state(), TxnState::Active);
        assert!(r.statement_in_flight());
        r.ready_for_query(TxnStatus::InTransaction, false);
        assert_eq!(r.state(), TxnState::IdleInTransaction);
        assert!(r.xact_age().is_some());
        r.statement_started();
        r.ready_for_query(TxnStatus::Failed, false);
        assert_eq!(r.state(), TxnState::IdleInFailedTransaction);
        assert!(r.in_transaction());
        r.statement_started();
        r.ready_for_query(TxnStatus::Idle, false);
        assert_eq!(r.state(), TxnState::Idle);
        assert!(r.xact_age().is_none());
    }

    #[test]
    fn a_ready_server_with_more_work_queued_stays_active() {
        let r = record();
        r.ready_for_query(TxnStatus::Idle, false);
        r.statement_started();
        r.ready_for_query(TxnStatus::InTransaction, true);
        assert_eq!(r.state(), TxnState::Active);
        assert!(r.in_transaction());
        r.ready_for_query(TxnStatus::InTransaction, false);
        assert_eq!(r.state(), TxnState::IdleInTransaction);
    }

    #[test]
    fn a_settled_statement_keeps_the_clock_of_its_start() {
        let r = record();
        r.ready_for_query(TxnStatus::Idle, false);
        r.statement_started();
        let started = r.state_since();
        r.statement_started();
        assert_eq!(r.state_since(), started, "only the edge starts the clock");
        r.statement_settled();
        assert_eq!(r.state(), TxnState::Idle);
        assert_eq!(r.state_since(), started);
    }

    #[test]
    fn last_statement_is_truncated_on_a_char_boundary() {
        let r = record();
        let mut text = "a".repeat(MAX_STATEMENT_LEN - 1);
        text.push('é'); // two bytes, straddles the limit
        r.set_last_statement(text.as_bytes());
        assert_eq!(r.last_statement().len(), MAX_STATEMENT_LEN - 1);
    }

    #[test]
    fn last_statement_ends_at_its_nul_and_skips_what_is_not_utf8() {
        let r = record();
        r.set_last_statement(b"SELECT 1\0\0\x01\0\0\0\x17");
        assert_eq!(r.last_statement(), "SELECT 1");
        r.set_last_statement(b"SELECT 'ok' \xff\xfe\0");
        assert_eq!(r.last_statement(), "SELECT 'ok' ");
        r.set_last_statement(b"no terminator in the prefix");
        assert_eq!(r.last_statement(), "no terminator in the prefix");
        r.set_last_statement(b"");
        assert_eq!(r.last_statement(), "");
    }

    #[test]
    fn backend_key_is_set_once() {
        let r = record();
        r.set_backend_key(42, &[1, 2, 3, 4]);
        r.set_backend_key(43, &[5]);
        assert_eq!(r.backend_pid(), Some(42));
        assert_eq!(&*r.backend_key().unwrap().secret, &[1, 2, 3, 4]);
    }
}
