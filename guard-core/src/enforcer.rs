//! Carries out a kill, proving in the same statement that the pid still belongs to the
//! session: a pid freed by a dead backend can be reused by another connection at any moment,
//! and signalling that one would be the worst thing lockguard could do.

use std::time::{Duration, SystemTime};

use tokio_postgres::error::SqlState;

use crate::audit::Outcome;
use crate::clock::ClockOffset;
use crate::connections::GuardConnection;
use crate::session::{SessionRecord, UpstreamIdentity};

/// The one statement behind [`KILL_SQL`] and [`CANCEL_SQL`]: `$function` (a `pg_catalog`
/// signalling function) applied to the backend only if it is still the one the guard observed.
macro_rules! signal_proven_backend_sql {
    ($function:literal) => {
        concat!(
            "SELECT pg_catalog.",
            $function,
            "(a.pid)
FROM pg_catalog.pg_stat_activity a
WHERE a.pid OPERATOR(pg_catalog.=) $1::pg_catalog.int4
  AND a.client_port OPERATOR(pg_catalog.=) $2::pg_catalog.int4
  AND a.backend_start OPERATOR(pg_catalog.>=) $3::pg_catalog.timestamptz
  AND a.backend_start OPERATOR(pg_catalog.<=) $4::pg_catalog.timestamptz
  AND ($5::pg_catalog.text IS NULL OR a.state OPERATOR(pg_catalog.=) $5::pg_catalog.text)
  AND ($6::pg_catalog.timestamptz IS NULL
       OR a.state_change OPERATOR(pg_catalog.=) $6::pg_catalog.timestamptz)
  AND ($7::pg_catalog.timestamptz IS NULL
       OR a.backend_start OPERATOR(pg_catalog.=) $7::pg_catalog.timestamptz)"
        )
    };
}

/// Kill a backend only if it is the one `Identity` describes: our upstream socket's local
/// port as `client_port` (`-1` for a unix socket) and a `backend_start` inside the window
/// around our session's connect. The optional state (and the time it began) makes the idle
/// rules atomic too: a backend that started a statement, or ended its transaction and began
/// another, since the probe no longer matches. The optional probed `backend_start` pins the
/// very process the probe saw.
///
/// Every function, operator and type is schema-qualified: the statement runs inside a
/// database whose owner may have created look-alikes (see `connections::GUARD_OPTIONS`).
pub(crate) const KILL_SQL: &str = signal_proven_backend_sql!("pg_terminate_backend");

/// [`KILL_SQL`] with `pg_cancel_backend`: the blocking budget's cancel of a holder's running
/// statement, proven the same way (and pinned to the very statement by its `state_change`).
pub(crate) const CANCEL_SQL: &str = signal_proven_backend_sql!("pg_cancel_backend");

/// What a pid is now, to explain a kill that matched no row.
pub(crate) const LOOKUP_SQL: &str = "\
SELECT a.client_port, a.backend_start, a.state, a.state_change
FROM pg_catalog.pg_stat_activity a
WHERE a.pid OPERATOR(pg_catalog.=) $1::pg_catalog.int4";

/// How far before the session record's `connected_at` its backend may have started. The
/// record is created right after the upstream connect returns, and the backend is forked once
/// the postmaster accepts, so it normally starts within milliseconds of it (a TLS handshake
/// later). A generous lower bound costs no safety: a backend that reused our pid necessarily
/// started *after* ours did, so only the upper bound can let an impostor in.
pub const START_BEFORE: Duration = Duration::from_secs(60);
/// How far after `connected_at` our backend may have started: the postmaster's accept latency
/// under load. Kept short because it is the window in which a backend reusing our pid (and,
/// over TCP, our port once our socket is closed) would pass the check; a slower start makes
/// the kill fail safe as an identity mismatch.
pub const START_AFTER: Duration = Duration::from_secs(10);

/// How long to wait for a terminated backend to leave `pg_stat_activity`, so callers (and
/// waiters) see the locks released when the kill returns.
const EXIT_WAIT: Duration = Duration::from_secs(1);
const EXIT_POLL: Duration = Duration::from_millis(20);

/// What proves a backend pid is still our session's backend: its `client_port` and a
/// `backend_start` window, on this machine's clock (the enforcer moves the window onto the
/// server's clock with the connection's measured [`ClockOffset`]).
///
/// The port alone is proof only while our socket is open; a record can outlive its backend
/// (the pump has not noticed yet), and a newer connection may get both the pid and the port
/// back. That one started after our session connected, so the start window rules it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// `pg_stat_activity.client_port`: our upstream socket's local port over TCP; `-1` for a
    /// unix socket, where PostgreSQL reports no port.
    pub client_port: i32,
    /// Earliest and latest `backend_start` that can be ours.
    pub earliest: SystemTime,
    pub latest: SystemTime,
}

impl Identity {
    /// The identity of `session`'s backend.
    pub fn of(session: &SessionRecord) -> Identity {
        let client_port = match session.upstream {
            UpstreamIdentity::Tcp(addr) => i32::from(addr.port()),
            UpstreamIdentity::Unix => -1,
        };
        Identity::connected(client_port, session.connected_at)
    }

    /// A backend with this `client_port` whose session connected at `connected_at`.
    pub fn connected(client_port: i32, connected_at: SystemTime) -> Identity {
        Identity {
            client_port,
            earliest: connected_at
                .checked_sub(START_BEFORE)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            latest: connected_at + START_AFTER,
        }
    }

    /// The same identity with its window on the server's clock.
    pub fn on_server_clock(&self, offset: ClockOffset) -> Identity {
        Identity {
            earliest: offset.to_server(self.earliest),
            latest: offset.to_server(self.latest),
            ..*self
        }
    }

    /// Whether a backend with this `client_port` and `backend_start` is ours. Unknown values
    /// (a guard role without `pg_read_all_stats` sees NULLs) never match.
    pub fn matches(&self, client_port: Option<i32>, backend_start: Option<SystemTime>) -> bool {
        client_port == Some(self.client_port)
            && backend_start.is_some_and(|start| self.earliest <= start && start <= self.latest)
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

/// What a verified kill found: how it ended, in the audit's terms, and the server's word on
/// why nothing was signalled when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    /// [`Outcome::Terminated`] (ours, signalled), [`Outcome::AlreadyGone`] (no such pid),
    /// [`Outcome::IdentityMismatch`] (another connection's: not signalled),
    /// [`Outcome::NoLongerIdle`] (ours but no longer in the required state: not signalled) or
    /// [`Outcome::NotPermitted`] (PostgreSQL refused the signal, SQLSTATE 42501:
    /// `pg_signal_backend` does not cover a superuser's backends, nor, without it, another
    /// role's).
    pub outcome: Outcome,
    /// For `NotPermitted`, the server's refusal and what the guard role lacks; for
    /// `NoLongerIdle`, the backend's state now (`active`), when visible.
    pub detail: Option<String>,
}

impl Termination {
    fn plain(outcome: Outcome) -> Termination {
        Termination {
            outcome,
            detail: None,
        }
    }
}

/// Terminates `pid` if, at that very moment, it is the backend `identity` describes (and, if
/// given, in the `required` state per `pg_stat_activity`). Identity and kill are one
/// statement; a second read happens only when nothing was killed, to say why. `identity` is
/// on this machine's clock; the connection's measured offset moves it onto the server's.
///
/// `probed_start` is the `backend_start` the guard's probe saw for this pid, when there was a
/// probe: the kill then hits only that very backend process. Between the probe and the kill
/// our backend may die (an operator, a server timeout) and its pid and, once our socket is
/// closed, its client port be handed to a new connection; that one started later. Both
/// values come from the server's clock, so no clock skew is involved.
///
/// After a successful signal, waits up to a second for the backend to exit so its locks are
/// gone when this returns. A refused signal (a superuser's backend) is
/// [`Outcome::NotPermitted`], not an error.
pub async fn terminate_verified(
    conn: &GuardConnection,
    pid: i32,
    identity: &Identity,
    probed_start: Option<SystemTime>,
    required: Option<RequiredState<'_>>,
) -> Result<Termination, tokio_postgres::Error> {
    signal_verified(
        conn,
        Signal::Terminate,
        pid,
        identity,
        probed_start,
        required,
    )
    .await
}

/// Which signal a verified statement sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Terminate,
    /// For the blocking budget: cancels the running statement if, at that moment, the
    /// backend is the one `identity` describes in the `required` state (`active` since the
    /// probed `state_change`: that very statement). A signalled cancel is
    /// [`Outcome::Cancelled`]; the session lives on, and its client gets the server's 57014.
    Cancel,
}

/// [`terminate_verified`] with the choice of signal.
pub(crate) async fn signal_verified(
    conn: &GuardConnection,
    signal: Signal,
    pid: i32,
    identity: &Identity,
    probed_start: Option<SystemTime>,
    required: Option<RequiredState<'_>>,
) -> Result<Termination, tokio_postgres::Error> {
    let sql = match signal {
        Signal::Terminate => KILL_SQL,
        Signal::Cancel => CANCEL_SQL,
    };
    let identity = identity.on_server_clock(conn.clock_offset());
    let required_state = required.map(|r| r.state);
    let required_since = required.and_then(|r| r.since);
    let killed = conn
        .query(
            sql,
            &[
                &pid,
                &identity.client_port,
                &identity.earliest,
                &identity.latest,
                &required_state,
                &required_since,
                &probed_start,
            ],
        )
        .await;
    let rows = match killed {
        Ok(rows) => rows,
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            // PostgreSQL 15 says "must be a superuser to terminate superuser process"; newer
            // versions put the superuser part in the detail.
            let (message, detail) = e.as_db_error().map_or(("permission denied", None), |db| {
                (db.message(), db.detail())
            });
            let superuser = format!("{message} {}", detail.unwrap_or_default())
                .to_ascii_lowercase()
                .contains("superuser");
            let why = if superuser {
                "the guard role's pg_signal_backend cannot signal a superuser's backend"
            } else {
                "the guard role needs pg_signal_backend (see lockguard setup-sql)"
            };
            return Ok(Termination {
                outcome: Outcome::NotPermitted,
                detail: Some(format!("{message}: {why}")),
            });
        }
        Err(e) => return Err(e),
    };
    let signalled = match rows.first() {
        Some(row) => row.try_get::<_, Option<bool>>(0)?.unwrap_or(false),
        None => false,
    };
    if signalled {
        if signal == Signal::Cancel {
            return Ok(Termination::plain(Outcome::Cancelled));
        }
        wait_for_exit(conn, pid, &identity).await;
        return Ok(Termination::plain(Outcome::Terminated));
    }
    // Nothing signalled (no row matched, or pg_terminate_backend said the process was gone):
    // find out which case it was.
    let Some(row) = conn.query_opt(LOOKUP_SQL, &[&pid]).await? else {
        return Ok(Termination::plain(Outcome::AlreadyGone));
    };
    let client_port: Option<i32> = row.try_get(0)?;
    let backend_start: Option<SystemTime> = row.try_get(1)?;
    let state: Option<String> = row.try_get(2)?;
    let state_change: Option<SystemTime> = row.try_get(3)?;
    if !identity.matches(client_port, backend_start)
        || probed_start.is_some() && backend_start != probed_start
    {
        return Ok(Termination::plain(Outcome::IdentityMismatch));
    }
    if required_state.is_some() && state.as_deref() != required_state
        || required_since.is_some() && state_change != required_since
    {
        return Ok(Termination {
            outcome: Outcome::NoLongerIdle,
            detail: state,
        });
    }
    // Ours, in the right state, yet not signalled: pg_terminate_backend raced with its exit.
    Ok(Termination::plain(Outcome::AlreadyGone))
}

/// Polls until our backend is no longer listed (or another connection has its pid).
async fn wait_for_exit(conn: &GuardConnection, pid: i32, identity: &Identity) {
    let deadline = tokio::time::Instant::now() + EXIT_WAIT;
    while tokio::time::Instant::now() < deadline {
        match conn.query_opt(LOOKUP_SQL, &[&pid]).await {
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
    use crate::sql_check::assert_schema_qualified;

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
    fn tcp_identity_is_our_local_port_and_a_start_window() {
        let s = session(UpstreamIdentity::Tcp("127.0.0.1:40123".parse().unwrap()));
        let id = Identity::of(&s);
        let at = s.connected_at;
        assert_eq!(id.client_port, 40123);
        assert!(id.matches(Some(40123), Some(at)));
        assert!(!id.matches(Some(40124), Some(at)));
        assert!(!id.matches(Some(-1), Some(at)));
        // Without pg_read_all_stats the guard sees NULLs: never ours.
        assert!(!id.matches(Some(40123), None));
        assert!(!id.matches(None, None));
        // Our port, but a backend that started well after we connected: a newer connection
        // that got our pid and port back after our backend died.
        assert!(!id.matches(Some(40123), Some(at + START_AFTER + Duration::from_secs(1))));
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
        assert!(!id.matches(Some(-1), Some(at + START_AFTER + Duration::from_secs(1))));
        assert!(!id.matches(Some(-1), Some(at - START_BEFORE - Duration::from_secs(1))));
        // A TCP client, or unknown values, never match a unix identity.
        assert!(!id.matches(Some(5432), Some(at)));
        assert!(!id.matches(Some(-1), None));
    }

    #[test]
    fn the_window_moves_onto_the_server_clock() {
        let s = session(UpstreamIdentity::Tcp("127.0.0.1:40123".parse().unwrap()));
        let at = s.connected_at;
        // The server's clock runs a minute ahead: our backend started at `at` by our clock,
        // which the server calls `at + 60s`.
        let sent = SystemTime::now();
        let ahead = ClockOffset::measure(sent, sent, sent + Duration::from_secs(60));
        let local = Identity::of(&s);
        let server = local.on_server_clock(ahead);
        let seen_by_server = Some(at + Duration::from_secs(60));
        assert!(!local.matches(Some(40123), seen_by_server));
        assert!(server.matches(Some(40123), seen_by_server));
    }

    #[test]
    fn the_kill_sql_is_schema_qualified() {
        assert_schema_qualified(KILL_SQL);
        assert_schema_qualified(CANCEL_SQL);
        assert_schema_qualified(LOOKUP_SQL);
    }
}
