//! Carries out a kill, proving in the same statement that the pid still belongs to the
//! session: a pid freed by a dead backend can be reused by another connection at any moment,
//! and signalling that one would be the worst thing lockguard could do.

use std::time::{Duration, SystemTime};

use crate::audit::Outcome;
use crate::connections::GuardConnection;
use crate::session::{SessionRecord, UpstreamIdentity};

/// Kill a TCP-connected backend only if its client port is our upstream socket's local port.
/// The optional state (and the time it began) makes the idle rules atomic too: a backend that
/// started a statement, or ended its transaction and began another, since the probe no longer
/// matches.
pub(crate) const KILL_BY_PORT_SQL: &str = "\
SELECT pg_catalog.pg_terminate_backend(a.pid)
FROM pg_catalog.pg_stat_activity a
WHERE a.pid = $1::int4 AND a.client_port = $2::int4
  AND ($3::text IS NULL OR a.state = $3::text)
  AND ($4::timestamptz IS NULL OR a.state_change = $4::timestamptz)
  AND ($5::timestamptz IS NULL OR a.backend_start = $5::timestamptz)";

/// Kill a unix-socket backend (`client_port = -1`) only if it started inside the window
/// around our session's start.
pub(crate) const KILL_BY_START_SQL: &str = "\
SELECT pg_catalog.pg_terminate_backend(a.pid)
FROM pg_catalog.pg_stat_activity a
WHERE a.pid = $1::int4 AND a.client_port = -1
  AND a.backend_start BETWEEN $2::timestamptz AND $3::timestamptz
  AND ($4::text IS NULL OR a.state = $4::text)
  AND ($5::timestamptz IS NULL OR a.state_change = $5::timestamptz)
  AND ($6::timestamptz IS NULL OR a.backend_start = $6::timestamptz)";

/// What a pid is now, to explain a kill that matched no row.
pub(crate) const LOOKUP_SQL: &str = "\
SELECT a.client_port, a.backend_start, a.state, a.state_change
FROM pg_catalog.pg_stat_activity a
WHERE a.pid = $1::int4";

/// How far before the session record's `connected_at` a unix-socket backend may have
/// started. The record is created right after the upstream connect returns, and the backend
/// is forked once the postmaster accepts, so it normally starts within milliseconds of it. A
/// generous lower bound costs no safety: a backend that reused our pid necessarily started
/// *after* ours did, so only the upper bound can let an impostor in.
pub const UNIX_START_BEFORE: Duration = Duration::from_secs(60);
/// How far after `connected_at` a unix-socket backend may have started: the postmaster's
/// accept latency under load. Kept short because it is the window in which a backend reusing
/// our pid would pass the check (our backend would have to die and its pid be recycled within
/// it); a slower start makes the kill fail safe as an identity mismatch.
pub const UNIX_START_AFTER: Duration = Duration::from_secs(10);

/// How long to wait for a terminated backend to leave `pg_stat_activity`, so callers (and
/// waiters) see the locks released when the kill returns.
const EXIT_WAIT: Duration = Duration::from_secs(1);
const EXIT_POLL: Duration = Duration::from_millis(20);

/// What proves a backend pid is still our session's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// TCP upstream: `pg_stat_activity.client_port` equals our local port. While our socket
    /// is open no other connection can have that port on our side.
    ClientPort(u16),
    /// Unix-socket upstream: PostgreSQL reports no port (`-1`), so the backend's start time
    /// must fall in this window around the session's start (see [`UNIX_START_BEFORE`]).
    /// Both clocks are the same machine's, since a unix socket is local.
    StartedBetween {
        earliest: SystemTime,
        latest: SystemTime,
    },
}

impl Identity {
    /// The identity of `session`'s backend.
    pub fn of(session: &SessionRecord) -> Identity {
        match session.upstream {
            UpstreamIdentity::Tcp(addr) => Identity::ClientPort(addr.port()),
            UpstreamIdentity::Unix => Identity::StartedBetween {
                earliest: session
                    .connected_at
                    .checked_sub(UNIX_START_BEFORE)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
                latest: session.connected_at + UNIX_START_AFTER,
            },
        }
    }

    /// Whether a backend with this `client_port` and `backend_start` is ours. Unknown values
    /// (a guard role without `pg_read_all_stats` sees NULLs) never match.
    pub fn matches(&self, client_port: Option<i32>, backend_start: Option<SystemTime>) -> bool {
        match *self {
            Identity::ClientPort(port) => client_port == Some(i32::from(port)),
            Identity::StartedBetween { earliest, latest } => {
                client_port == Some(-1)
                    && backend_start.is_some_and(|start| earliest <= start && start <= latest)
            }
        }
    }
}

/// The state a backend must still be in for an idle rule's kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequiredState<'a> {
    /// `pg_stat_activity.state`, e.g. `idle in transaction`.
    pub state: &'a str,
    /// `pg_stat_activity.state_change` as the probe saw it, when known.
    pub since: Option<SystemTime>,
}

impl<'a> RequiredState<'a> {
    /// Just the state, whenever it began.
    pub fn state(state: &'a str) -> RequiredState<'a> {
        RequiredState { state, since: None }
    }
}

/// What a verified kill found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillOutcome {
    /// The backend was ours and has been signalled.
    Terminated,
    /// No backend with this pid exists.
    AlreadyGone,
    /// A backend with this pid exists but is another connection's: not signalled.
    IdentityMismatch,
    /// The backend is ours but no longer in the required state (it started working): not
    /// signalled. `state` is what it is now.
    NoLongerIdle { state: Option<String> },
}

impl KillOutcome {
    /// The audit outcome this kill result is recorded as.
    pub fn outcome(&self) -> Outcome {
        match self {
            KillOutcome::Terminated => Outcome::Terminated,
            KillOutcome::AlreadyGone => Outcome::AlreadyGone,
            KillOutcome::IdentityMismatch => Outcome::IdentityMismatch,
            KillOutcome::NoLongerIdle { .. } => Outcome::NoLongerIdle,
        }
    }
}

/// Terminates `pid` if, at that very moment, it is the backend `identity` describes (and, if
/// given, in the `required` state per `pg_stat_activity`). Identity and kill are one
/// statement; a second read happens only when nothing was killed, to say why.
///
/// `probed_start` is the `backend_start` the guard's probe saw for this pid, when there was a
/// probe: the kill then hits only that very backend process. Between the probe and the kill
/// our backend may die (an operator, a server timeout) and its pid and, once our socket is
/// closed, its client port be handed to a new connection; that one started later. Both
/// values come from the server's clock, so no clock skew is involved.
///
/// After a successful signal, waits up to a second for the backend to exit so its locks are
/// gone when this returns.
pub async fn terminate_verified(
    conn: &GuardConnection,
    pid: i32,
    identity: &Identity,
    probed_start: Option<SystemTime>,
    required: Option<RequiredState<'_>>,
) -> Result<KillOutcome, tokio_postgres::Error> {
    let client = conn.client();
    let required_state = required.map(|r| r.state);
    let required_since = required.and_then(|r| r.since);
    let rows = match *identity {
        Identity::ClientPort(port) => {
            client
                .query(
                    &conn.kill_by_port,
                    &[
                        &pid,
                        &i32::from(port),
                        &required_state,
                        &required_since,
                        &probed_start,
                    ],
                )
                .await?
        }
        Identity::StartedBetween { earliest, latest } => {
            client
                .query(
                    &conn.kill_by_start,
                    &[
                        &pid,
                        &earliest,
                        &latest,
                        &required_state,
                        &required_since,
                        &probed_start,
                    ],
                )
                .await?
        }
    };
    let signalled = match rows.first() {
        Some(row) => row.try_get::<_, Option<bool>>(0)?.unwrap_or(false),
        None => false,
    };
    if signalled {
        wait_for_exit(conn, pid, identity).await;
        return Ok(KillOutcome::Terminated);
    }
    // Nothing signalled (no row matched, or pg_terminate_backend said the process was gone):
    // find out which case it was.
    let Some(row) = client.query_opt(&conn.lookup, &[&pid]).await? else {
        return Ok(KillOutcome::AlreadyGone);
    };
    let client_port: Option<i32> = row.try_get(0)?;
    let backend_start: Option<SystemTime> = row.try_get(1)?;
    let state: Option<String> = row.try_get(2)?;
    let state_change: Option<SystemTime> = row.try_get(3)?;
    if !identity.matches(client_port, backend_start)
        || probed_start.is_some() && backend_start != probed_start
    {
        return Ok(KillOutcome::IdentityMismatch);
    }
    if required_state.is_some() && state.as_deref() != required_state
        || required_since.is_some() && state_change != required_since
    {
        return Ok(KillOutcome::NoLongerIdle { state });
    }
    // Ours, in the right state, yet not signalled: pg_terminate_backend raced with its exit.
    Ok(KillOutcome::AlreadyGone)
}

/// Polls until our backend is no longer listed (or another connection has its pid).
async fn wait_for_exit(conn: &GuardConnection, pid: i32, identity: &Identity) {
    let deadline = tokio::time::Instant::now() + EXIT_WAIT;
    while tokio::time::Instant::now() < deadline {
        match conn.client().query_opt(&conn.lookup, &[&pid]).await {
            Ok(None) => return,
            Ok(Some(row)) => {
                let port = row.try_get::<_, Option<i32>>(0).ok().flatten();
                let start = row.try_get::<_, Option<SystemTime>>(1).ok().flatten();
                if !identity.matches(port, start) {
                    return;
                }
            }
            // The kill is done; a failing read only means we cannot watch it finish.
            Err(_) => return,
        }
        tokio::time::sleep(EXIT_POLL).await;
    }
    tracing::debug!(pid, "terminated backend still listed after {EXIT_WAIT:?}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::ClientInfo;

    fn session(upstream: UpstreamIdentity) -> SessionRecord {
        SessionRecord::new(
            1,
            ClientInfo {
                addr: "127.0.0.1:5000".parse().unwrap(),
                user: "u".into(),
                database: "d".into(),
                application_name: String::new(),
            },
            upstream,
        )
    }

    #[test]
    fn tcp_identity_is_our_local_port() {
        let s = session(UpstreamIdentity::Tcp("127.0.0.1:40123".parse().unwrap()));
        let id = Identity::of(&s);
        assert_eq!(id, Identity::ClientPort(40123));
        assert!(id.matches(Some(40123), None));
        assert!(!id.matches(Some(40124), None));
        assert!(!id.matches(Some(-1), Some(SystemTime::now())));
        assert!(!id.matches(None, None));
    }

    #[test]
    fn unix_identity_is_a_start_time_window() {
        let s = session(UpstreamIdentity::Unix);
        let id = Identity::of(&s);
        let at = s.connected_at;
        assert!(id.matches(Some(-1), Some(at)));
        assert!(id.matches(Some(-1), Some(at - Duration::from_millis(500))));
        assert!(id.matches(Some(-1), Some(at + Duration::from_secs(2))));
        // Started long after our session: a backend that reused the pid.
        assert!(!id.matches(
            Some(-1),
            Some(at + UNIX_START_AFTER + Duration::from_secs(1))
        ));
        assert!(!id.matches(
            Some(-1),
            Some(at - UNIX_START_BEFORE - Duration::from_secs(1))
        ));
        // A TCP client, or unknown values, never match a unix identity.
        assert!(!id.matches(Some(5432), Some(at)));
        assert!(!id.matches(Some(-1), None));
    }

    #[test]
    fn kill_outcomes_map_to_audit_outcomes() {
        assert_eq!(KillOutcome::Terminated.outcome(), Outcome::Terminated);
        assert_eq!(
            KillOutcome::IdentityMismatch.outcome().to_string(),
            "identity mismatch"
        );
        assert_eq!(KillOutcome::AlreadyGone.outcome().as_str(), "already gone");
    }
}
