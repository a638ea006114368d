//! What made the guard look at a session, and the `pg_stat_activity` states the idle rules
//! expect.

use std::fmt;
use std::time::Duration;

/// `pg_stat_activity.state` of a backend idle inside a transaction.
pub const SERVER_IDLE_IN_TRANSACTION: &str = "idle in transaction";
/// `pg_stat_activity.state` of a backend idle inside a failed transaction.
pub const SERVER_IDLE_IN_FAILED_TRANSACTION: &str = "idle in transaction (aborted)";

/// What made the guard look at a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The client vanished, or said Terminate with a statement in flight (the client-loss rules:
    /// at once when idle in a transaction, after `inflight_grace` when busy); `cause` says how,
    /// for the audit.
    ClientLoss { cause: String },
    /// The sweep found the session idle in a transaction past the timeout (the idle-in-transaction rule).
    IdleInTransaction,
    /// The sweep found the session idle in a failed transaction past the timeout (the failed-transaction rule).
    FailedTransaction,
    /// An operator asked for the kill on the admin port.
    Operator { reason: String },
    /// The sweep found backend `waiter_pid` waiting `waited` (past a rule's `max_blocking`) for
    /// a lock this session holds, directly or at the head of a wait chain (the blocking
    /// budget).
    BlockingBudget { waiter_pid: i32, waited: Duration },
}

/// Which kind of [`Trigger`] it is, without its free text: what counters and tables are
/// keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TriggerKind {
    ClientLoss,
    IdleInTransaction,
    FailedTransaction,
    Operator,
    BlockingBudget,
}

impl TriggerKind {
    /// Every kind, in a stable order (so counters list zeros too).
    pub const ALL: [TriggerKind; 5] = [
        TriggerKind::ClientLoss,
        TriggerKind::IdleInTransaction,
        TriggerKind::FailedTransaction,
        TriggerKind::Operator,
        TriggerKind::BlockingBudget,
    ];

    /// Stable name used in audit events, logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            TriggerKind::ClientLoss => "client_loss",
            TriggerKind::IdleInTransaction => "idle_in_transaction",
            TriggerKind::FailedTransaction => "failed_transaction",
            TriggerKind::Operator => "operator",
            TriggerKind::BlockingBudget => "blocking_budget",
        }
    }
}

impl Trigger {
    /// Which kind of trigger this is.
    pub fn kind(&self) -> TriggerKind {
        match self {
            Trigger::ClientLoss { .. } => TriggerKind::ClientLoss,
            Trigger::IdleInTransaction => TriggerKind::IdleInTransaction,
            Trigger::FailedTransaction => TriggerKind::FailedTransaction,
            Trigger::Operator { .. } => TriggerKind::Operator,
            Trigger::BlockingBudget { .. } => TriggerKind::BlockingBudget,
        }
    }

    /// Stable name used in audit events and logs.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The free-text part: how the client was lost, or the operator's reason.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Trigger::ClientLoss { cause } => Some(cause),
            Trigger::Operator { reason } => Some(reason),
            _ => None,
        }
    }

    /// The `pg_stat_activity.state` the backend must still be in for the kill to be right, if
    /// the trigger depends on it (the idle rules: a session that just started a statement is
    /// not idle any more).
    pub fn required_server_state(&self) -> Option<&'static str> {
        match self {
            Trigger::IdleInTransaction => Some(SERVER_IDLE_IN_TRANSACTION),
            Trigger::FailedTransaction => Some(SERVER_IDLE_IN_FAILED_TRANSACTION),
            _ => None,
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.detail() {
            Some(detail) => write!(f, "{} ({detail})", self.name()),
            None => f.write_str(self.name()),
        }
    }
}
