//! lockguard's brain, with no client sockets: the registry of live sessions and their state
//! (`session`, `registry`), and the guard that probes their locks, judges them and terminates
//! orphaned backends.
//!
//! The guard's parts, in the order a decision flows through them:
//! - [`connections`]: one guard connection ([`GuardConnection`]) per database, lazy,
//!   reconnected with backoff;
//! - [`probe`]: granted locks on protected tables, waiters and `pg_stat_activity` facts of a
//!   set of backends, in one round trip;
//! - [`lock_graph`]: the database's wait-for graph (waiters, their blockers, since when),
//!   which the blocking budget judges;
//! - [`policy`]: the rules, as a pure function from facts to a verdict;
//! - [`enforcer`]: `pg_terminate_backend` verified against the session's identity in the
//!   same statement;
//! - [`audit`]: the evidence of every kill, to tracing, a ring and a JSON-lines file, each
//!   event with one human sentence (`summary`);
//! - [`guard`]: ties them together for the proxy (client loss, operator kill), judging each
//!   probed session in one place (`judge`), with the periodic sweep for the idle rules
//!   (`sweep`), the kill claim that holds a session's output
//!   back while its backend is killed (`claim`) and the probe latency histogram ([`latency`]).
//!
//! [`clock`] is the process clock session records are stamped with, and the guard's
//! [`Clock`], which tests move forward instead of sleeping past a timeout; [`setup`] renders
//! the SQL that gives the guard a role with just the privileges it needs; [`dsn`] reads the
//! dsn's TLS keys, which tokio-postgres does not know.
//!
//! The modules depend on each other in one direction: `guard` and `sweep` on everything else;
//! `probe` and `enforcer` own their SQL and run it on a [`GuardConnection`]; `connections`
//! knows none of its users.

pub mod audit;
mod claim;
pub mod clock;
mod connection;
pub mod connections;
pub mod dsn;
pub mod enforcer;
pub mod error;
pub mod guard;
mod judge;
pub mod latency;
pub mod lock_graph;
pub mod policy;
pub mod probe;
pub mod registry;
pub mod session;
pub mod setup;
#[cfg(test)]
mod sql_check;
mod summary;
mod sweep;

pub use audit::{AuditEvent, AuditLog, LockEvidence, Outcome};
pub use clock::{Clock, ClockOffset, ManualClock};
pub use connections::{DbHealth, GuardConnection, GuardTls};
pub use enforcer::{Identity, RequiredState, Termination};
pub use error::GuardError;
pub use guard::{Decision, Guard, GuardHealth, HealthStatus, SweepReport, KILL_SQLSTATE};
pub use latency::ProbeLatency;
pub use lock_graph::{GraphBackend, LockGraph, RelationLock, Wait};
pub use policy::{LeaveReason, Trigger, Verdict};
pub use probe::{BackendFacts, HeldLock};
pub use registry::{Registration, Registry};
pub use session::{
    BackendKey, ClientInfo, KillNotice, SessionId, SessionRecord, TxnState, TxnStatus,
    UpstreamIdentity,
};
