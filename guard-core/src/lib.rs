//! lockguard's brain, with no client sockets: the registry of live sessions and their state
//! (`session`, `registry`), and the guard that probes their locks, judges them and terminates
//! orphaned backends.
//!
//! The guard's parts, in the order a decision flows through them:
//! - [`connections`]: one guard connection per database, lazy, reconnected with backoff;
//! - [`probe`]: granted locks on protected tables, waiters and `pg_stat_activity` facts of a
//!   set of backends, in one round trip;
//! - [`policy`]: the rules, as a pure function from facts to a verdict;
//! - [`enforcer`]: `pg_terminate_backend` verified against the session's identity in the
//!   same statement;
//! - [`audit`]: the evidence of every kill, to tracing, a ring and a JSON-lines file;
//! - [`guard`]: ties them together for the proxy (client loss, sweep, operator kill).
//!
//! [`setup`] renders the SQL that gives the guard a role with just the privileges it needs;
//! [`dsn`] reads the dsn's TLS keys, which tokio-postgres does not know.

pub mod audit;
pub mod clock;
pub mod connections;
pub mod dsn;
pub mod enforcer;
pub mod error;
pub mod guard;
pub mod policy;
pub mod probe;
pub mod registry;
pub mod session;
pub mod setup;

pub use audit::{AuditEvent, AuditLog, LockEvidence, Outcome};
pub use clock::ClockOffset;
pub use connections::{DbHealth, GuardConnection, GuardTls};
pub use enforcer::{Identity, KillOutcome, RequiredState};
pub use error::GuardError;
pub use guard::{Decision, Guard, GuardHealth, HealthStatus, SweepReport, KILL_SQLSTATE};
pub use policy::{LeaveReason, Trigger, Verdict};
pub use probe::{BackendFacts, HeldLock};
pub use registry::{Registration, Registry};
pub use session::{
    BackendKey, ClientInfo, KillNotice, SessionId, SessionRecord, TxnState, TxnStatus,
    UpstreamIdentity,
};
