//! The guard's periodic sweep: the idle-in-transaction and failed-transaction rules. Every
//! session idle in a (failed) transaction past its timeout is probed — one round trip per
//! database — judged, and terminated if the rules say so.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::audit::Outcome;
use crate::clock::Clock;
use crate::guard::{Decision, Guard, Settings, SweepReport};
use crate::policy::{RuleSet, Trigger, Who};
use crate::probe::BackendFacts;
use crate::session::{SessionId, SessionRecord, TxnState};

/// A session picked by the sweep.
struct Candidate {
    session: Arc<SessionRecord>,
    pid: i32,
    trigger: Trigger,
}

impl Guard {
    /// Runs the periodic sweep (the idle-in-transaction and failed-transaction rules) until
    /// `shutdown` is cancelled.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            // Read each time: RELOAD may change the period.
            let period = self.settings().sweep_interval;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(period) => {}
                // A test moved the guard's clock: sessions may have crossed a timeout now.
                _ = self.clock.advanced() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.sweep_once() => {}
            }
        }
        tracing::debug!("guard sweeper stopped");
    }

    /// Every sweep's report from now on, as it finishes: what a test waits for to know the
    /// guard has judged (and left alone) a session. A subscriber that falls behind by more
    /// than a few dozen sweeps loses the oldest (`RecvError::Lagged`).
    pub fn sweep_reports(&self) -> broadcast::Receiver<Arc<SweepReport>> {
        self.sweeps.subscribe()
    }

    /// One pass of the sweep: every session idle in a (failed) transaction past its timeout
    /// is probed — one round trip per database — judged and, if the rules say so, terminated.
    pub async fn sweep_once(&self) -> SweepReport {
        let report = self.sweep().await;
        if self.sweeps.receiver_count() > 0 {
            // Nobody listening is the normal case, and not an error.
            let _ = self.sweeps.send(Arc::new(report.clone()));
        }
        report
    }

    async fn sweep(&self) -> SweepReport {
        let sessions = self.registry.snapshot();
        let in_use: HashSet<String> = sessions.iter().map(|s| s.client.database.clone()).collect();
        self.connections.maintain(&in_use).await;

        let settings = self.settings();
        let mut groups: HashMap<String, Vec<Candidate>> = HashMap::new();
        {
            let mut settled = self.settled();
            let live: HashMap<SessionId, Instant> =
                sessions.iter().map(|s| (s.id, s.state_since())).collect();
            settled.retain(|id, since| live.get(id) == Some(since));
            // Without protected tables no idle session can qualify: do not even probe.
            if settings.patterns.is_empty() {
                return SweepReport::default();
            }
            for session in sessions {
                if session.kill_pending() || settled.contains_key(&session.id) {
                    continue;
                }
                let Some(pid) = session.backend_pid() else {
                    continue;
                };
                let Some(trigger) = idle_trigger(&settings.rules, &self.clock, &session) else {
                    continue;
                };
                groups
                    .entry(session.client.database.clone())
                    .or_default()
                    .push(Candidate {
                        session,
                        pid,
                        trigger,
                    });
            }
        }
        let candidates = groups.values().map(Vec::len).sum();
        let budgets = async {
            if !settings.rules.has_budget() {
                return Vec::new();
            }
            let settings = &settings;
            join_all(in_use.iter().map(|database| async move {
                match self.enforce_budget(database, settings).await {
                    Ok(findings) => findings,
                    Err(error) => {
                        tracing::warn!(
                            database = %database,
                            %error,
                            "blocking budget could not read the lock graph; will retry"
                        );
                        Vec::new()
                    }
                }
            }))
            .await
            .into_iter()
            .flatten()
            .collect()
        };
        let (per_db, budget) = futures_util::future::join(
            join_all(
                groups
                    .into_iter()
                    .map(|(database, list)| self.sweep_database(database, list)),
            ),
            budgets,
        )
        .await;
        let mut report = SweepReport {
            candidates,
            ..SweepReport::default()
        };
        for finding in &budget {
            if let crate::budget::BudgetVerdict::Acted(event) = &finding.verdict {
                report.events.push((**event).clone());
            }
        }
        report.budget = budget;
        for db in per_db {
            report.events.extend(db.events);
            report.left.extend(db.left);
            report.errors.extend(db.errors);
        }
        report
    }

    async fn sweep_database(&self, database: String, candidates: Vec<Candidate>) -> SweepReport {
        let pids: Vec<i32> = candidates.iter().map(|c| c.pid).collect();
        let facts = match self.probe(&database, &pids).await {
            Ok(facts) => facts,
            Err(e) => {
                tracing::warn!(
                    database = %database,
                    sessions = candidates.len(),
                    error = %e,
                    "guard sweep could not probe; will retry"
                );
                return SweepReport {
                    errors: vec![e.to_string()],
                    ..SweepReport::default()
                };
            }
        };
        let mut report = SweepReport::default();
        for c in candidates {
            let since = c.session.state_since();
            let decision = self
                .act(&c.session, c.pid, c.trigger, facts.get(&c.pid))
                .await;
            let settle = match &decision {
                Decision::Left(reason) => reason.stable_while_idle(),
                // A failed kill is retried on the next tick; anything else is final for
                // this state of the session, unless a rule that has not spoken yet (a longer
                // timeout than the dry-run or log-only one that did) may still come due.
                Decision::Acted(event) => {
                    event.outcome != Outcome::Error
                        && governing_rules(&self.settings(), &c.session, facts.get(&c.pid))
                            .iter()
                            .all(|rule| event.rules.contains(rule))
                }
                Decision::Unavailable(_) => false,
            };
            if settle {
                self.settled().insert(c.session.id, since);
            }
            match decision {
                Decision::Acted(event) => report.events.push(*event),
                Decision::Left(reason) => report.left.push((c.session.id, reason)),
                Decision::Unavailable(error) => report.errors.push(error),
            }
        }
        report
    }
}

/// Which idle rule, if any, the session has crossed by the guard's clock: the shortest
/// timeout of the rules that could govern its locks (which locks it holds, and so which rules
/// judge it, the probe tells).
fn idle_trigger(rules: &RuleSet, clock: &Clock, session: &SessionRecord) -> Option<Trigger> {
    let (trigger, failed) = match session.state() {
        TxnState::IdleInTransaction => (Trigger::IdleInTransaction, false),
        TxnState::IdleInFailedTransaction => (Trigger::FailedTransaction, true),
        _ => return None,
    };
    let shortest = rules
        .for_session(Who::of(&session.client))
        .map(|r| {
            if failed {
                r.failed_transaction_timeout
            } else {
                r.idle_in_transaction_timeout
            }
        })
        .filter(|t| !t.is_zero())
        .min()?;
    (clock.age(session.state_age()) > shortest).then_some(trigger)
}

/// The names of the rules that govern some protected lock the probe found on `session`.
fn governing_rules(
    settings: &Settings,
    session: &SessionRecord,
    facts: Option<&BackendFacts>,
) -> Vec<String> {
    let locks = facts.map(|f| f.locks.as_slice()).unwrap_or_default();
    settings
        .rules
        .governing_locks(
            Who::of(&session.client),
            locks.iter().map(|l| (l.schema.as_str(), l.table.as_str())),
        )
        .into_iter()
        .map(|(rule, _)| rule.name.clone())
        .collect()
}
