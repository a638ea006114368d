//! The blocking budget: no session waits longer than a rule's `max_blocking` for a lock on the
//! rule's tables held by a proxied session. Each sweep reads every database's wait-for graph
//! ([`crate::lock_graph`]); for a waiter past the budget it follows the chain to the head that
//! holds what everyone behind it needs, and if that head is one of lockguard's sessions, cancels
//! its statement or terminates it (per `blocking_action`), proving its identity in the same
//! statement as every kill. A head that is not lockguard's is never touched.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use lockguard_config::{BlockingAction, EffectiveRule};

use crate::audit::{AuditEvent, BlockingEvidence, LockEvidence, Outcome};
use crate::claim::KillClaim;
use crate::enforcer::{self, Identity, RequiredState, Signal, Termination};
use crate::guard::{Guard, Settings, KILL_SQLSTATE, QUERY_DEADLINE};
use crate::judge::millis;
use crate::lock_graph::{self, GraphBackend, LockGraph};
use crate::policy::{Trigger, Who, SERVER_IDLE_IN_FAILED_TRANSACTION, SERVER_IDLE_IN_TRANSACTION};
use crate::session::{KillNotice, SessionRecord};

/// What the budget found about one waiter past a budget, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetFinding {
    pub database: String,
    pub waiter_pid: i32,
    /// The head of the wait chain the budget looked at.
    pub holder_pid: i32,
    pub rule: String,
    pub waited: Duration,
    pub verdict: BudgetVerdict,
}

/// The budget's decision about one holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetVerdict {
    /// The holder is not a session of this lockguard: never acted on.
    NotOurs,
    /// Acted on (or recorded, for `log` and dry-run) earlier, and nothing changed since.
    AlreadyHandled,
    /// The event recorded now; its outcome says what happened.
    Acted(Box<AuditEvent>),
}

/// Waits the budget already dealt with: (database, waiter, its waitstart, holder, the holder's
/// `state_change`). A holder that changed state since (a cancel that left it idle in a failed
/// transaction still holding its locks) is judged again; a `log` or dry-run record is made
/// once per wait.
#[derive(Debug, Default)]
pub(crate) struct BudgetMemory {
    handled: Mutex<HashSet<Handled>>,
}

type Handled = (String, i32, Option<SystemTime>, i32, Option<SystemTime>);

impl BudgetMemory {
    fn lock(&self) -> MutexGuard<'_, HashSet<Handled>> {
        match self.handled.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// What one holder is asked to endure, found for one waiter.
struct Overdue<'g> {
    waiter: &'g GraphBackend,
    holder: &'g GraphBackend,
    waited: Duration,
    table: (String, String),
}

impl Guard {
    /// One pass of the budget over `database`: reads its wait-for graph and acts on every
    /// proxied head keeping a waiter past its rule's budget.
    pub(crate) async fn enforce_budget(
        &self,
        database: &str,
        settings: &Settings,
    ) -> Result<Vec<BudgetFinding>, String> {
        let graph = self
            .connections
            .run(database, QUERY_DEADLINE, |conn| async move {
                lock_graph::read(&conn).await
            })
            .await
            .map_err(|e| e.to_string())?;
        let now = self
            .connections
            .clock_offset(database)
            .to_server(SystemTime::now());
        self.forget_finished_waits(database, &graph);
        let mut findings = Vec::new();
        for waiter in graph.waiters() {
            let Some(waited) = waiter.waited(now) else {
                continue;
            };
            for head in graph.heads(waiter.pid) {
                let Some(holder) = graph.backends.get(&head) else {
                    continue;
                };
                let session = self.proxied_session(database, holder);
                let holder_who = match &session {
                    Some(s) => Who::of(&s.client),
                    None => Who {
                        database,
                        user: holder.user.as_deref().unwrap_or_default(),
                        application: holder.application.as_deref().unwrap_or_default(),
                    },
                };
                let Some((rule, table)) = budget_rule(settings, holder_who, waiter, holder) else {
                    continue;
                };
                if rule.max_blocking.is_none_or(|budget| waited <= budget) {
                    continue;
                }
                let verdict = match session {
                    None => BudgetVerdict::NotOurs,
                    Some(session) => {
                        let overdue = Overdue {
                            waiter,
                            holder,
                            waited,
                            table,
                        };
                        self.act_on_holder(database, &session, rule, &overdue).await
                    }
                };
                findings.push(BudgetFinding {
                    database: database.to_owned(),
                    waiter_pid: waiter.pid,
                    holder_pid: head,
                    rule: rule.name.clone(),
                    waited,
                    verdict,
                });
            }
        }
        Ok(findings)
    }

    /// The live session of this lockguard whose backend `holder` is: same database, pid, and
    /// the identity proof of every kill (upstream port and start window).
    fn proxied_session(
        &self,
        database: &str,
        holder: &GraphBackend,
    ) -> Option<std::sync::Arc<SessionRecord>> {
        let session = self.registry.find_by_pid(holder.pid)?;
        let offset = self.connections.clock_offset(database);
        let ours = session.client.database == database
            && Identity::of(&session)
                .on_server_clock(offset)
                .matches(holder.client_port, holder.backend_start);
        ours.then_some(session)
    }

    fn forget_finished_waits(&self, database: &str, graph: &LockGraph) {
        let live: HashSet<(i32, Option<SystemTime>)> = graph
            .waiters()
            .iter()
            .map(|w| (w.pid, w.waiting.as_ref().and_then(|x| x.since)))
            .collect();
        self.budget
            .lock()
            .retain(|(db, pid, since, _, _)| db != database || live.contains(&(*pid, *since)));
    }

    async fn act_on_holder(
        &self,
        database: &str,
        session: &SessionRecord,
        rule: &EffectiveRule,
        o: &Overdue<'_>,
    ) -> BudgetVerdict {
        let key: Handled = (
            database.to_owned(),
            o.waiter.pid,
            o.waiter.waiting.as_ref().and_then(|w| w.since),
            o.holder.pid,
            o.holder.state_change,
        );
        if session.kill_pending() || self.budget.lock().contains(&key) {
            return BudgetVerdict::AlreadyHandled;
        }
        let idle = matches!(
            o.holder.state.as_deref(),
            Some(SERVER_IDLE_IN_TRANSACTION | SERVER_IDLE_IN_FAILED_TRANSACTION)
        );
        // An idle holder has no statement to cancel: ending it is the only way to free the
        // waiter.
        let terminate = rule.blocking_action == BlockingAction::Terminate || idle;
        let trigger = Trigger::BlockingBudget {
            waiter_pid: o.waiter.pid,
            waited: o.waited,
        };
        let evidence = blocking_evidence(o, rule, terminate);
        let locks = held_locks(o);
        let rules = [rule.name.clone()];
        let record = |outcome: Outcome, error: Option<String>| {
            self.event_with(
                session,
                o.holder.pid,
                &trigger,
                vec![o.waiter.pid],
                &rules,
                locks.clone(),
                Some(evidence.clone()),
                outcome,
                error,
            )
        };
        let event = if rule.dry_run {
            record(Outcome::DryRun, None)
        } else if rule.blocking_action == BlockingAction::Log {
            record(Outcome::Logged, None)
        } else {
            let required = o.holder.state.as_deref().map(|state| RequiredState {
                state,
                since: o.holder.state_change,
            });
            let identity = Identity::of(session);
            if terminate {
                let Some(claim) = KillClaim::acquire(session).await else {
                    return BudgetVerdict::AlreadyHandled;
                };
                let result = self
                    .terminate_verified(
                        database,
                        o.holder.pid,
                        &identity,
                        o.holder.backend_start,
                        required,
                    )
                    .await;
                let (outcome, error) = outcome_of(result);
                let event = record(outcome, error);
                if outcome == Outcome::Terminated {
                    claim.finish(KillNotice {
                        sqlstate: KILL_SQLSTATE,
                        message: event.summary.clone(),
                    });
                }
                event
            } else {
                let result = self
                    .cancel_verified(database, o.holder, identity, required)
                    .await;
                let (outcome, error) = outcome_of(result);
                record(outcome, error)
            }
        };
        if event.outcome != Outcome::Error {
            self.budget.lock().insert(key);
        }
        self.audit().record(event.clone());
        BudgetVerdict::Acted(Box::new(event))
    }

    /// Cancels `holder`'s running statement if it is still the backend `identity` describes
    /// in the `required` state.
    async fn cancel_verified(
        &self,
        database: &str,
        holder: &GraphBackend,
        identity: Identity,
        required: Option<RequiredState<'_>>,
    ) -> Result<Termination, crate::GuardError> {
        let (pid, start) = (holder.pid, holder.backend_start);
        self.connections
            .run(database, QUERY_DEADLINE, |conn| async move {
                let cancel = Signal::Cancel;
                enforcer::signal_verified(&conn, cancel, pid, &identity, start, required).await
            })
            .await
    }
}

/// What the audit event says about the wait that ran over its budget.
fn blocking_evidence(o: &Overdue<'_>, rule: &EffectiveRule, terminate: bool) -> BlockingEvidence {
    let wait = o.waiter.waiting.as_ref();
    BlockingEvidence {
        waiter_pid: o.waiter.pid,
        waiter_user: o.waiter.user.clone(),
        waiter_application: o.waiter.application.clone(),
        waited_ms: millis(o.waited),
        max_blocking_ms: millis(rule.max_blocking.unwrap_or_default()),
        table: format!("{}.{}", o.table.0, o.table.1),
        mode: wait.map_or_else(String::new, |w| format!("{} ({})", w.mode, w.locktype)),
        holder_mode: o
            .holder
            .held_mode(&o.table.0, &o.table.1)
            .map(str::to_owned),
        action: if terminate { "terminate" } else { "cancel" }.to_owned(),
    }
}

/// The holder's granted locks on the table the waiter waits for.
fn held_locks(o: &Overdue<'_>) -> Vec<LockEvidence> {
    o.holder
        .relations
        .iter()
        .filter(|r| r.granted && r.schema == o.table.0 && r.table == o.table.1)
        .map(|r| LockEvidence {
            table: format!("{}.{}", r.schema, r.table),
            mode: r.mode.clone(),
        })
        .collect()
}

fn outcome_of(result: Result<Termination, crate::GuardError>) -> (Outcome, Option<String>) {
    match result {
        Ok(t) if t.outcome == Outcome::NotPermitted => (t.outcome, t.detail),
        Ok(t) => (t.outcome, None),
        Err(e) => (Outcome::Error, Some(e.to_string())),
    }
}

/// The rule whose budget covers `waiter`'s wait on a lock of `holder` (`who` is the holder's
/// session): the first of the waiter's wanted tables whose governing rule has a budget. Of
/// those tables, the ones the holder itself holds count first: a waiter that already wrote
/// one protected table and now waits for a row of another is waiting for the other. A
/// chain's head may hold none of them (it blocks the waiter's blocker); then all count.
fn budget_rule<'s>(
    settings: &'s Settings,
    who: Who<'_>,
    waiter: &GraphBackend,
    holder: &GraphBackend,
) -> Option<(&'s EffectiveRule, (String, String))> {
    let wanted = waiter.wanted_tables();
    let held: Vec<(String, String)> = wanted
        .iter()
        .filter(|(schema, table)| holder.held_mode(schema, table).is_some())
        .cloned()
        .collect();
    let tables = if held.is_empty() { wanted } else { held };
    tables.into_iter().find_map(|(schema, table)| {
        let rule = settings.rules.governing(who, &schema, &table)?;
        rule.max_blocking?;
        Some((rule, (schema, table)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock_graph::{RelationLock, Wait};

    fn backend(pid: i32, relations: &[&str], wait: Option<Wait>) -> GraphBackend {
        GraphBackend {
            pid,
            user: Some("web".into()),
            application: Some("api".into()),
            relations: relations
                .iter()
                .map(|table| RelationLock {
                    schema: "app".into(),
                    table: (*table).into(),
                    mode: "RowExclusiveLock".into(),
                    granted: true,
                })
                .collect(),
            waiting: wait,
            ..GraphBackend::default()
        }
    }

    fn row_wait(blocker: i32) -> Option<Wait> {
        Some(Wait {
            locktype: "transactionid".into(),
            mode: "ShareLock".into(),
            since: None,
            blockers: vec![blocker],
            table: None,
        })
    }

    const WHO: Who<'static> = Who {
        database: "d",
        user: "web",
        application: "api",
    };

    fn settings() -> Settings {
        let config = lockguard_config::Config::from_toml_str(
            "[guard]\nprotected_tables = [\"app.scratch\"]\n[[guard.rules]]\nname = \"login\"\n\
             tables = [\"app.user_sessions\"]\nmax_blocking = \"5s\"\n\
             exempt_applications = [\"migrat*\"]\n",
        )
        .unwrap();
        Settings::from_config(&config.guard)
    }

    #[test]
    fn the_budget_follows_the_table_the_holder_holds() {
        let settings = settings();
        // The waiter wrote the login table earlier and now waits for a scratch row: the
        // holder holds only scratch, which has no budget.
        let waiter = backend(2, &["user_sessions", "scratch"], row_wait(1));
        let holder = backend(1, &["scratch"], None);
        assert!(budget_rule(&settings, WHO, &waiter, &holder).is_none());
        // Waiting for a login row the holder holds: the login rule's budget.
        let holder = backend(1, &["user_sessions"], None);
        let (rule, table) = budget_rule(&settings, WHO, &waiter, &holder).expect("a budget");
        assert_eq!(rule.name, "login");
        assert_eq!(table, ("app".to_owned(), "user_sessions".to_owned()));
        // A chain's head holding none of the waiter's tables: the waiter's tables decide.
        let head = backend(1, &["orders"], None);
        assert!(budget_rule(&settings, WHO, &waiter, &head).is_some());
        // An exempt holder is never the budget's.
        let migration = Who {
            application: "migrate-7",
            ..WHO
        };
        assert!(budget_rule(&settings, migration, &waiter, &holder).is_none());
    }
}
