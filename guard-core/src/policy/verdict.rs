//! What the policy asks for ([`Verdict`]) and, when it asks for nothing, why
//! ([`LeaveReason`]).

use std::fmt;

use crate::session::TxnState;

/// The guard's decision for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Terminate the backend (verified by the enforcer).
    Terminate,
    /// Would terminate, but `dry_run` is on: record only.
    DryRun,
    /// Would terminate, but `on_client_loss = "log"`: record only.
    LogOnly,
    /// Nothing to do.
    Leave(LeaveReason),
}

/// Why the guard left a backend alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaveReason {
    /// No BackendKeyData seen yet.
    NoBackend,
    /// No transaction open and nothing in flight: PostgreSQL holds nothing for it.
    NoTransaction,
    /// The backend is not in `pg_stat_activity` any more.
    BackendGone,
    /// The pid now belongs to another connection.
    NotOurBackend,
    /// It holds no lock on a protected table: only those are worth a kill.
    NoProtectedLock,
    /// `require_waiters` is on and nobody waits behind it.
    NoWaiters,
    /// The rule for this trigger is switched off (timeout 0).
    RuleOff,
    /// The proxy's view changed since the session was picked (it sent a statement, or the
    /// transaction ended).
    StateChanged(TxnState),
    /// Not idle for longer than the timeout.
    NotIdleLongEnough,
    /// PostgreSQL says the backend is not idle in the expected way (it just started work).
    ServerState(String),
    /// Another kill of this session is already under way.
    KillInProgress,
}

impl fmt::Display for LeaveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaveReason::NoBackend => f.write_str("no backend pid known"),
            LeaveReason::NoTransaction => f.write_str("no transaction open"),
            LeaveReason::BackendGone => f.write_str("backend already gone"),
            LeaveReason::NotOurBackend => f.write_str("backend pid belongs to another connection"),
            LeaveReason::NoProtectedLock => f.write_str("holds no lock on a protected table"),
            LeaveReason::NoWaiters => f.write_str("nobody is waiting (require_waiters)"),
            LeaveReason::RuleOff => f.write_str("rule switched off"),
            LeaveReason::StateChanged(s) => write!(f, "session is now {s}"),
            LeaveReason::NotIdleLongEnough => f.write_str("not idle long enough"),
            LeaveReason::ServerState(s) => write!(f, "server reports the backend as {s:?}"),
            LeaveReason::KillInProgress => f.write_str("a kill is already under way"),
        }
    }
}

impl LeaveReason {
    /// Whether the same answer will hold for as long as the session stays in its current
    /// state, so the sweep need not ask again until the state changes. Waiters can appear at
    /// any time, and a server/proxy disagreement is a race, so those are asked again.
    pub fn stable_while_idle(&self) -> bool {
        matches!(
            self,
            LeaveReason::BackendGone
                | LeaveReason::NotOurBackend
                | LeaveReason::NoProtectedLock
                | LeaveReason::RuleOff
        )
    }
}
