//! The guard's rules (client loss, in flight, idle in transaction, failed transaction, operator
//! kill; only protected locks count) as one pure function: what happened + what the probe saw
//! → a verdict.
//!
//! Nothing here touches the network or the clock, so every rule is unit tested; the guard
//! gathers the facts and carries the verdict out.

mod rules;
mod ruling;
mod trigger;
mod verdict;

use std::time::Duration;

pub use rules::{RuleSet, Rules, Who};
pub use ruling::{decide_by_rules, Ruling};
pub use trigger::{
    Trigger, TriggerKind, SERVER_IDLE_IN_FAILED_TRANSACTION, SERVER_IDLE_IN_TRANSACTION,
};
pub use verdict::{LeaveReason, Verdict};

use lockguard_config::ClientLossAction;

use crate::session::TxnState;

/// What the proxy and the probe know about the session at decision time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts<'a> {
    /// The session's state as the proxy saw it (ReadyForQuery + in-flight).
    pub state: TxnState,
    /// How long the session has been in `state`.
    pub state_age: Duration,
    /// Whether the backend pid is in `pg_stat_activity` at all.
    pub backend_present: bool,
    /// Whether the backend's `client_port` / `backend_start` say it is still this session's
    /// backend (false when the pid was reused by another connection).
    pub identity_matches: bool,
    /// `pg_stat_activity.state` of the backend, when visible.
    pub server_state: Option<&'a str>,
    /// Granted relation locks on protected tables.
    pub protected_locks: usize,
    /// Sessions blocked behind this backend.
    pub waiters: usize,
}
/// Applies the guard's rules to one session.
pub fn decide(trigger: &Trigger, facts: &Facts<'_>, rules: &Rules) -> Verdict {
    let act = if rules.dry_run {
        Verdict::DryRun
    } else {
        Verdict::Terminate
    };
    match trigger {
        // The operator decides; the enforcer still verifies identity. The blocking budget
        // has judged the wait already (and chooses between cancel and terminate itself).
        Trigger::Operator { .. } | Trigger::BlockingBudget { .. } => act,
        Trigger::ClientLoss { .. } => {
            // The in-flight rule is the pump's part: after the grace, a statement still in
            // flight (Active) may hold locks even outside a transaction block, so it is judged
            // like a lost client inside a transaction.
            if !matches!(
                facts.state,
                TxnState::Active | TxnState::IdleInTransaction | TxnState::IdleInFailedTransaction
            ) {
                return Verdict::Leave(LeaveReason::NoTransaction);
            }
            if let Some(reason) = backend_check(facts) {
                return Verdict::Leave(reason);
            }
            if facts.protected_locks == 0 {
                return Verdict::Leave(LeaveReason::NoProtectedLock);
            }
            match (rules.dry_run, rules.on_client_loss) {
                (true, _) => Verdict::DryRun,
                (false, ClientLossAction::Log) => Verdict::LogOnly,
                (false, ClientLossAction::Terminate) => Verdict::Terminate,
            }
        }
        Trigger::IdleInTransaction => idle_rule(
            facts,
            rules,
            TxnState::IdleInTransaction,
            rules.idle_in_transaction_timeout,
            SERVER_IDLE_IN_TRANSACTION,
            act,
        ),
        Trigger::FailedTransaction => idle_rule(
            facts,
            rules,
            TxnState::IdleInFailedTransaction,
            rules.failed_transaction_timeout,
            SERVER_IDLE_IN_FAILED_TRANSACTION,
            act,
        ),
    }
}

fn backend_check(facts: &Facts<'_>) -> Option<LeaveReason> {
    if !facts.backend_present {
        Some(LeaveReason::BackendGone)
    } else if !facts.identity_matches {
        Some(LeaveReason::NotOurBackend)
    } else {
        None
    }
}

/// The idle-in-transaction and failed-transaction rules: idle past the timeout in the expected state, on both sides of the proxy,
/// holding a protected lock (and blocking someone, with `require_waiters`).
fn idle_rule(
    facts: &Facts<'_>,
    rules: &Rules,
    expected: TxnState,
    timeout: Duration,
    expected_server: &str,
    act: Verdict,
) -> Verdict {
    if timeout.is_zero() {
        return Verdict::Leave(LeaveReason::RuleOff);
    }
    if facts.state != expected {
        return Verdict::Leave(LeaveReason::StateChanged(facts.state));
    }
    if facts.state_age <= timeout {
        return Verdict::Leave(LeaveReason::NotIdleLongEnough);
    }
    if let Some(reason) = backend_check(facts) {
        return Verdict::Leave(reason);
    }
    if facts.server_state != Some(expected_server) {
        return Verdict::Leave(LeaveReason::ServerState(
            facts.server_state.unwrap_or("unknown").to_owned(),
        ));
    }
    if facts.protected_locks == 0 {
        return Verdict::Leave(LeaveReason::NoProtectedLock);
    }
    if rules.require_waiters && facts.waiters == 0 {
        return Verdict::Leave(LeaveReason::NoWaiters);
    }
    act
}

#[cfg(test)]
mod tests {
    use lockguard_config::GuardConfig;

    use super::*;

    fn rules() -> Rules {
        Rules {
            on_client_loss: ClientLossAction::Terminate,
            idle_in_transaction_timeout: Duration::from_secs(60),
            failed_transaction_timeout: Duration::from_secs(10),
            require_waiters: false,
            dry_run: false,
        }
    }

    /// A backend that holds one protected lock and blocks one session, idle in transaction for
    /// two minutes on both sides of the proxy.
    pub(super) fn holder() -> Facts<'static> {
        Facts {
            state: TxnState::IdleInTransaction,
            state_age: Duration::from_secs(120),
            backend_present: true,
            identity_matches: true,
            server_state: Some(SERVER_IDLE_IN_TRANSACTION),
            protected_locks: 1,
            waiters: 1,
        }
    }

    pub(super) fn lost() -> Trigger {
        Trigger::ClientLoss {
            cause: "eof without Terminate".into(),
        }
    }

    #[test]
    fn client_loss_in_a_transaction_holding_a_protected_lock_terminates() {
        assert_eq!(decide(&lost(), &holder(), &rules()), Verdict::Terminate);
        // Waiters and the idle timeout do not matter for the client-loss rule.
        let facts = Facts {
            waiters: 0,
            state_age: Duration::ZERO,
            ..holder()
        };
        let r = Rules {
            require_waiters: true,
            ..rules()
        };
        assert_eq!(decide(&lost(), &facts, &r), Verdict::Terminate);
    }

    #[test]
    fn client_loss_in_a_failed_subtransaction_terminates() {
        let facts = Facts {
            state: TxnState::IdleInFailedTransaction,
            server_state: Some(SERVER_IDLE_IN_FAILED_TRANSACTION),
            ..holder()
        };
        assert_eq!(decide(&lost(), &facts, &rules()), Verdict::Terminate);
    }

    #[test]
    fn client_loss_with_a_statement_still_in_flight_after_the_grace_terminates() {
        let facts = Facts {
            state: TxnState::Active,
            server_state: Some("active"),
            ..holder()
        };
        assert_eq!(decide(&lost(), &facts, &rules()), Verdict::Terminate);
    }

    #[test]
    fn client_loss_outside_a_transaction_is_left_alone() {
        for state in [TxnState::Idle, TxnState::Startup] {
            let facts = Facts { state, ..holder() };
            assert_eq!(
                decide(&lost(), &facts, &rules()),
                Verdict::Leave(LeaveReason::NoTransaction)
            );
        }
    }

    #[test]
    fn without_a_protected_lock_nothing_is_killed() {
        let facts = Facts {
            protected_locks: 0,
            ..holder()
        };
        for trigger in [
            lost(),
            Trigger::IdleInTransaction,
            Trigger::FailedTransaction,
        ] {
            let facts = if trigger == Trigger::FailedTransaction {
                Facts {
                    state: TxnState::IdleInFailedTransaction,
                    server_state: Some(SERVER_IDLE_IN_FAILED_TRANSACTION),
                    ..facts.clone()
                }
            } else {
                facts.clone()
            };
            assert_eq!(
                decide(&trigger, &facts, &rules()),
                Verdict::Leave(LeaveReason::NoProtectedLock),
                "{trigger}"
            );
        }
    }

    #[test]
    fn gone_or_reused_backends_are_left_alone() {
        let gone = Facts {
            backend_present: false,
            server_state: None,
            ..holder()
        };
        let reused = Facts {
            identity_matches: false,
            ..holder()
        };
        for trigger in [lost(), Trigger::IdleInTransaction] {
            assert_eq!(
                decide(&trigger, &gone, &rules()),
                Verdict::Leave(LeaveReason::BackendGone)
            );
            assert_eq!(
                decide(&trigger, &reused, &rules()),
                Verdict::Leave(LeaveReason::NotOurBackend)
            );
        }
    }

    #[test]
    fn client_loss_in_log_mode_only_logs_and_dry_run_wins() {
        let log = Rules {
            on_client_loss: ClientLossAction::Log,
            ..rules()
        };
        assert_eq!(decide(&lost(), &holder(), &log), Verdict::LogOnly);
        let both = Rules {
            dry_run: true,
            ..log
        };
        assert_eq!(decide(&lost(), &holder(), &both), Verdict::DryRun);
        // The log mode is about client loss only; the idle rules still terminate.
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &holder(), &log),
            Verdict::Terminate
        );
    }

    #[test]
    fn idle_in_transaction_past_the_timeout_terminates() {
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &holder(), &rules()),
            Verdict::Terminate
        );
    }

    #[test]
    fn idle_not_long_enough_or_rule_off_is_left_alone() {
        let young = Facts {
            state_age: Duration::from_secs(60),
            ..holder()
        };
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &young, &rules()),
            Verdict::Leave(LeaveReason::NotIdleLongEnough)
        );
        let off = Rules {
            idle_in_transaction_timeout: Duration::ZERO,
            ..rules()
        };
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &holder(), &off),
            Verdict::Leave(LeaveReason::RuleOff)
        );
    }

    #[test]
    fn idle_rule_needs_both_sides_to_agree_the_session_is_idle() {
        // The client sent a statement after the sweep picked the session.
        let proxy_active = Facts {
            state: TxnState::Active,
            ..holder()
        };
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &proxy_active, &rules()),
            Verdict::Leave(LeaveReason::StateChanged(TxnState::Active))
        );
        // The server already started working on it.
        let server_active = Facts {
            server_state: Some("active"),
            ..holder()
        };
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &server_active, &rules()),
            Verdict::Leave(LeaveReason::ServerState("active".into()))
        );
        // State not visible (guard role lacks pg_read_all_stats): do not guess.
        let hidden = Facts {
            server_state: None,
            ..holder()
        };
        assert!(matches!(
            decide(&Trigger::IdleInTransaction, &hidden, &rules()),
            Verdict::Leave(LeaveReason::ServerState(_))
        ));
    }

    #[test]
    fn require_waiters_spares_a_holder_nobody_waits_for() {
        let r = Rules {
            require_waiters: true,
            ..rules()
        };
        let alone = Facts {
            waiters: 0,
            ..holder()
        };
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &alone, &r),
            Verdict::Leave(LeaveReason::NoWaiters)
        );
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &holder(), &r),
            Verdict::Terminate
        );
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &alone, &rules()),
            Verdict::Terminate
        );
    }

    #[test]
    fn failed_transaction_rule_uses_its_own_timeout_and_state() {
        let failed = Facts {
            state: TxnState::IdleInFailedTransaction,
            state_age: Duration::from_secs(11),
            server_state: Some(SERVER_IDLE_IN_FAILED_TRANSACTION),
            ..holder()
        };
        assert_eq!(
            decide(&Trigger::FailedTransaction, &failed, &rules()),
            Verdict::Terminate
        );
        // 11s is past the failed timeout (10s) but not the idle one (60s).
        let idle = Facts {
            state: TxnState::IdleInTransaction,
            server_state: Some(SERVER_IDLE_IN_TRANSACTION),
            ..failed.clone()
        };
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &idle, &rules()),
            Verdict::Leave(LeaveReason::NotIdleLongEnough)
        );
        // A failed transaction is not "idle in transaction" for the idle-in-transaction rule,
        // and vice versa.
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &failed, &rules()),
            Verdict::Leave(LeaveReason::StateChanged(TxnState::IdleInFailedTransaction))
        );
        let off = Rules {
            failed_transaction_timeout: Duration::ZERO,
            ..rules()
        };
        assert_eq!(
            decide(&Trigger::FailedTransaction, &failed, &off),
            Verdict::Leave(LeaveReason::RuleOff)
        );
    }

    #[test]
    fn dry_run_turns_every_kill_into_a_record() {
        let r = Rules {
            dry_run: true,
            ..rules()
        };
        assert_eq!(
            decide(&Trigger::IdleInTransaction, &holder(), &r),
            Verdict::DryRun
        );
        let operator = Trigger::Operator {
            reason: "stuck".into(),
        };
        assert_eq!(decide(&operator, &holder(), &r), Verdict::DryRun);
    }

    #[test]
    fn operator_kill_needs_no_protected_lock() {
        let facts = Facts {
            protected_locks: 0,
            waiters: 0,
            state: TxnState::Idle,
            server_state: Some("idle"),
            ..holder()
        };
        let operator = Trigger::Operator {
            reason: "requested".into(),
        };
        assert_eq!(decide(&operator, &facts, &rules()), Verdict::Terminate);
    }

    #[test]
    fn rules_come_from_the_config() {
        let config = GuardConfig {
            on_client_loss: ClientLossAction::Log,
            require_waiters: true,
            dry_run: true,
            ..GuardConfig::default()
        };
        let r = Rules::from(&config);
        assert_eq!(r.on_client_loss, ClientLossAction::Log);
        assert!(r.require_waiters && r.dry_run);
        assert_eq!(r.idle_in_transaction_timeout, Duration::from_secs(60));
        assert_eq!(r.failed_transaction_timeout, Duration::from_secs(10));
    }
}
