//! Judging one probed session and carrying the verdict out: the policy's verdict, the verified
//! kill under a claim on the session, and the audit event with its evidence. Client loss, the
//! sweep and operator kills all end here.

use std::time::{Duration, SystemTime};

use crate::audit::{rfc3339_utc, AuditEvent, BlockingEvidence, Outcome};
use crate::claim::KillClaim;
use crate::enforcer::{Identity, RequiredState, Termination};
use crate::guard::{Decision, Guard, KILL_SQLSTATE};
use crate::policy::{self, LeaveReason, Trigger, Verdict, Who};
use crate::probe::BackendFacts;
use crate::session::{KillNotice, SessionRecord};
use crate::summary::{summary, SummaryParts};

/// Upper bound of one verified kill, reconnect and retry included.
const KILL_DEADLINE: Duration = Duration::from_secs(5);

impl Guard {
    /// Judges one probed session and carries the verdict out.
    pub(crate) async fn act(
        &self,
        session: &SessionRecord,
        pid: i32,
        trigger: Trigger,
        facts: Option<&BackendFacts>,
    ) -> Decision {
        // On the server's clock, which `backend_start` is read from.
        let server_identity = Identity::of(session)
            .on_server_clock(self.connections.clock_offset(&session.client.database));
        let state = session.state();
        let policy_facts = policy::Facts {
            state,
            state_age: self.clock.age(session.state_age()),
            backend_present: facts.is_some(),
            identity_matches: facts
                .is_some_and(|f| server_identity.matches(f.client_port, f.backend_start)),
            server_state: facts.and_then(|f| f.state.as_deref()),
            protected_locks: facts.map_or(0, |f| f.locks.len()),
            waiters: facts.map_or(0, |f| f.waiters.len()),
        };
        if facts.is_some_and(|f| f.state.is_none()) {
            tracing::warn!(
                backend_pid = pid,
                "pg_stat_activity hides this backend's state from the guard role; grant it \
                 pg_read_all_stats (and pg_signal_backend)"
            );
        }
        let settings = self.settings();
        let tables = facts
            .map(|f| f.locks.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|l| (l.schema.as_str(), l.table.as_str()));
        let ruling = policy::decide_by_rules(
            &trigger,
            &policy_facts,
            tables,
            Who::of(&session.client),
            &settings.rules,
        );
        let rules = ruling.rules;
        let event = match ruling.verdict {
            Verdict::Leave(reason) => return Decision::Left(reason),
            Verdict::DryRun => {
                self.event(session, pid, &trigger, facts, &rules, Outcome::DryRun, None)
            }
            Verdict::LogOnly => {
                self.event(session, pid, &trigger, facts, &rules, Outcome::Logged, None)
            }
            Verdict::Terminate => {
                let Some(claim) = KillClaim::acquire(session).await else {
                    return Decision::Left(LeaveReason::KillInProgress);
                };
                // The idle rules judged a state that may have ended since the probe.
                if trigger.required_server_state().is_some() && session.state() != state {
                    return Decision::Left(LeaveReason::StateChanged(session.state()));
                }
                let (outcome, error) = self.kill(session, pid, &trigger, facts).await;
                let event = self.event(session, pid, &trigger, facts, &rules, outcome, error);
                if outcome == Outcome::Terminated {
                    claim.finish(KillNotice {
                        sqlstate: KILL_SQLSTATE,
                        message: event.summary.clone(),
                    });
                }
                // Otherwise dropping the claim withdraws the kill: the session carries on.
                event
            }
        };
        self.audit().record(event.clone());
        Decision::Acted(Box::new(event))
    }

    /// The verified kill of a claimed session's backend, bounded by [`KILL_DEADLINE`] (while
    /// the claim is held the session's output is held back). Returns how it ended and, for an
    /// error or a refusal, why.
    async fn kill(
        &self,
        session: &SessionRecord,
        pid: i32,
        trigger: &Trigger,
        facts: Option<&BackendFacts>,
    ) -> (Outcome, Option<String>) {
        let required = trigger.required_server_state().map(|state| RequiredState {
            state,
            since: facts.and_then(|f| f.state_change),
        });
        let killed = tokio::time::timeout(
            KILL_DEADLINE,
            self.terminate_verified(
                &session.client.database,
                pid,
                &Identity::of(session),
                facts.and_then(|f| f.backend_start),
                required,
            ),
        )
        .await;
        match killed {
            Ok(Ok(Termination {
                outcome: Outcome::NotPermitted,
                detail,
            })) => {
                let reason = detail.unwrap_or_default();
                tracing::warn!(
                    session_id = session.id,
                    backend_pid = pid,
                    user = %session.client.user,
                    %reason,
                    "the guard may not terminate this backend; it keeps running"
                );
                (Outcome::NotPermitted, Some(reason))
            }
            Ok(Ok(report)) => (report.outcome, None),
            Ok(Err(e)) => (Outcome::Error, Some(e.to_string())),
            Err(_) => (
                Outcome::Error,
                Some(format!("the kill did not finish within {KILL_DEADLINE:?}")),
            ),
        }
    }

    /// The audit event of a decision about `session` under `rules`, with the evidence the
    /// probe found (its locks that some rule governs).
    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        session: &SessionRecord,
        pid: i32,
        trigger: &Trigger,
        facts: Option<&BackendFacts>,
        rules: &[String],
        outcome: Outcome,
        error: Option<String>,
    ) -> AuditEvent {
        let settings = self.settings();
        let who = Who::of(&session.client);
        let locks: Vec<_> = facts
            .map(|f| {
                f.locks
                    .iter()
                    .filter(|l| settings.rules.governing(who, &l.schema, &l.table).is_some())
                    .map(|l| l.evidence())
                    .collect()
            })
            .unwrap_or_default();
        let waiter_pids = facts.map(|f| f.waiters.clone()).unwrap_or_default();
        self.event_with(
            session,
            pid,
            trigger,
            waiter_pids,
            rules,
            locks,
            None,
            outcome,
            error,
        )
    }

    /// [`Guard::event`] with the locks given, and the blocking budget's evidence.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn event_with(
        &self,
        session: &SessionRecord,
        pid: i32,
        trigger: &Trigger,
        waiter_pids: Vec<i32>,
        rules: &[String],
        locks: Vec<crate::audit::LockEvidence>,
        blocking: Option<BlockingEvidence>,
        outcome: Outcome,
        error: Option<String>,
    ) -> AuditEvent {
        let state = session.state();
        let state_age = self.clock.age(session.state_age());
        let summary = summary(SummaryParts {
            outcome,
            pid,
            trigger,
            state,
            state_age,
            locks: &locks,
            waiters: waiter_pids.len(),
            error: error.as_deref(),
            rules,
            blocking: blocking.as_ref(),
        });
        AuditEvent {
            time: rfc3339_utc(SystemTime::now()),
            trigger: trigger.name().to_owned(),
            rules: rules.to_vec(),
            blocking,
            cause: trigger.detail().map(str::to_owned),
            session_id: session.id,
            client_addr: session.client.addr.to_string(),
            user: session.client.user.clone(),
            database: session.client.database.clone(),
            application_name: session.client.application_name.clone(),
            backend_pid: pid,
            locks,
            waiters: waiter_pids.len(),
            waiter_pids,
            state: state.as_str().to_owned(),
            idle_ms: millis(state_age),
            xact_ms: session.xact_age().map(|age| millis(self.clock.age(age))),
            last_statement: session.last_statement(),
            outcome,
            error,
            dry_run: outcome == Outcome::DryRun,
            summary,
        }
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
