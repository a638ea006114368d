//! The one human sentence of an audit event ([`AuditEvent::summary`]); for a terminated live
//! client it is also the FATAL message the client receives.
//!
//! [`AuditEvent::summary`]: crate::audit::AuditEvent::summary

use std::time::Duration;

use lockguard_config::CATCH_ALL_RULE;

use crate::audit::{locks_text, BlockingEvidence, LockEvidence, Outcome};
use crate::policy::Trigger;
use crate::session::TxnState;

/// What the sentence is made of.
pub(crate) struct SummaryParts<'a> {
    pub outcome: Outcome,
    pub pid: i32,
    pub trigger: &'a Trigger,
    pub state: TxnState,
    pub state_age: Duration,
    pub locks: &'a [LockEvidence],
    pub waiters: usize,
    pub error: Option<&'a str>,
    /// The rules that applied; the flat keys' rule goes unnamed in the sentence.
    pub rules: &'a [String],
    /// The blocking budget's evidence, for its trigger.
    pub blocking: Option<&'a BlockingEvidence>,
}

/// One sentence for humans: `lockguard: terminated backend 1234: idle in transaction for
/// 2.1s holding RowShareLock on app.user_sessions; 1 session waiting`.
pub(crate) fn summary(p: SummaryParts<'_>) -> String {
    let cancel = p.blocking.is_some_and(|b| b.action == "cancel");
    let verb = match (p.outcome, p.trigger) {
        (Outcome::Terminated, _) => "terminated",
        (Outcome::Cancelled, _) => "cancelled the statement of",
        (Outcome::DryRun, _) if cancel => "would cancel the statement of (dry run)",
        (Outcome::DryRun, _) => "would terminate (dry run)",
        (Outcome::Logged, Trigger::BlockingBudget { .. }) => "would act on (blocking_action = log)",
        (Outcome::Logged, _) => "would terminate (on_client_loss = log)",
        _ if cancel => "did not cancel the statement of",
        _ => "did not terminate",
    };
    let age = p.state_age.as_secs_f64();
    let why = match p.trigger {
        Trigger::IdleInTransaction => format!("idle in transaction for {age:.1}s"),
        Trigger::FailedTransaction => format!("idle in failed transaction for {age:.1}s"),
        Trigger::ClientLoss { cause } => match p.state {
            TxnState::Active => {
                format!("client lost ({cause}) with a statement running for {age:.1}s")
            }
            _ => format!("client lost ({cause}) after {age:.1}s {}", p.state),
        },
        Trigger::Operator { reason } => {
            format!("{reason}, after {age:.1}s {}", p.state)
        }
        Trigger::BlockingBudget { waiter_pid, waited } => {
            let waited = waited.as_secs_f64();
            match p.blocking {
                Some(b) => format!(
                    "kept backend {waiter_pid} waiting {waited:.1}s for {} on {}, over the \
                     {:.1}s blocking budget,",
                    b.mode,
                    b.table,
                    Duration::from_millis(b.max_blocking_ms).as_secs_f64()
                ),
                None => format!("kept backend {waiter_pid} waiting {waited:.1}s,"),
            }
        }
    };
    let locks = if p.locks.is_empty() {
        "no protected lock".to_owned()
    } else {
        locks_text(p.locks)
    };
    let waiters = match p.waiters {
        0 => "no session waiting".to_owned(),
        1 => "1 session waiting".to_owned(),
        n => format!("{n} sessions waiting"),
    };
    // An operator's kill says so first: that is what the client's user needs to know.
    let mut text = match p.trigger {
        Trigger::Operator { .. } => format!(
            "lockguard: {verb} by operator: backend {}: {why} holding {locks}; {waiters}",
            p.pid
        ),
        _ => format!(
            "lockguard: {verb} backend {}: {why} holding {locks}; {waiters}",
            p.pid
        ),
    };
    let named: Vec<String> = p
        .rules
        .iter()
        .filter(|r| *r != CATCH_ALL_RULE)
        .map(|r| format!("{r:?}"))
        .collect();
    match named.len() {
        0 => {}
        1 => text.push_str(&format!("; rule {}", named[0])),
        _ => text.push_str(&format!("; rules {}", named.join(", "))),
    }
    match (p.outcome, p.error) {
        (Outcome::Error, Some(e)) => text.push_str(&format!(" (error: {e})")),
        (Outcome::NotPermitted, Some(e)) => text.push_str(&format!(" (not permitted: {e})")),
        (_, _) => {
            if let Some(words) = why_not(p.outcome) {
                text.push_str(&format!(" ({words})"));
            }
        }
    }
    text
}

/// Why a kill that was attempted signalled nothing, in words (the outcome's identifier is for
/// machines; this sentence is for the person reading the log or the client's error).
fn why_not(outcome: Outcome) -> Option<&'static str> {
    match outcome {
        Outcome::AlreadyGone => Some("already gone"),
        Outcome::IdentityMismatch => Some("identity mismatch"),
        Outcome::NoLongerIdle => Some("no longer idle"),
        Outcome::NotPermitted => Some("not permitted"),
        Outcome::Terminated
        | Outcome::Cancelled
        | Outcome::DryRun
        | Outcome::Logged
        | Outcome::Error => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(
        outcome: Outcome,
        trigger: &'a Trigger,
        locks: &'a [LockEvidence],
    ) -> SummaryParts<'a> {
        SummaryParts {
            outcome,
            pid: 1234,
            trigger,
            state: TxnState::IdleInTransaction,
            state_age: Duration::from_millis(2100),
            locks,
            waiters: 1,
            error: None,
            rules: &[],
            blocking: None,
        }
    }

    #[test]
    fn kill_message_names_trigger_table_mode_idle_time_and_waiters() {
        let locks = [LockEvidence {
            table: "app.user_sessions".to_owned(),
            mode: "RowShareLock".to_owned(),
        }];
        let text = summary(parts(
            Outcome::Terminated,
            &Trigger::IdleInTransaction,
            &locks,
        ));
        assert_eq!(
            text,
            "lockguard: terminated backend 1234: idle in transaction for 2.1s holding \
             RowShareLock on app.user_sessions; 1 session waiting"
        );
    }

    #[test]
    fn non_kills_say_so() {
        let trigger = Trigger::ClientLoss {
            cause: "connection reset".into(),
        };
        let dry = summary(parts(Outcome::DryRun, &trigger, &[]));
        assert!(
            dry.starts_with(
                "lockguard: would terminate (dry run) backend 1234: client lost (connection reset)"
            ),
            "{dry}"
        );
        assert!(dry.contains("holding no protected lock"), "{dry}");
        let mismatch = summary(parts(Outcome::IdentityMismatch, &trigger, &[]));
        assert!(mismatch.ends_with("(identity mismatch)"), "{mismatch}");
        let gone = summary(parts(Outcome::AlreadyGone, &trigger, &[]));
        assert!(gone.ends_with("(already gone)"), "{gone}");
        let refused = summary(SummaryParts {
            error: Some("must be a superuser"),
            ..parts(Outcome::NotPermitted, &trigger, &[])
        });
        assert!(
            refused.ends_with("(not permitted: must be a superuser)"),
            "{refused}"
        );
        let err = summary(SummaryParts {
            error: Some("boom"),
            waiters: 3,
            ..parts(Outcome::Error, &trigger, &[])
        });
        assert!(err.contains("3 sessions waiting (error: boom)"), "{err}");
    }

    #[test]
    fn a_named_rule_is_named_and_the_catch_all_is_not() {
        let locks = [LockEvidence {
            table: "app.user_sessions".to_owned(),
            mode: "RowShareLock".to_owned(),
        }];
        let named = ["login".to_owned(), "default".to_owned()];
        let text = summary(SummaryParts {
            rules: &named,
            ..parts(Outcome::Terminated, &Trigger::IdleInTransaction, &locks)
        });
        assert!(
            text.ends_with("1 session waiting; rule \"login\""),
            "{text}"
        );
        let only_default = ["default".to_owned()];
        let text = summary(SummaryParts {
            rules: &only_default,
            ..parts(Outcome::Terminated, &Trigger::IdleInTransaction, &locks)
        });
        assert!(text.ends_with("1 session waiting"), "{text}");
    }

    #[test]
    fn a_budget_cancel_names_the_waiter_the_wait_and_the_budget() {
        let locks = [LockEvidence {
            table: "app.user_sessions".to_owned(),
            mode: "RowExclusiveLock".to_owned(),
        }];
        let evidence = BlockingEvidence {
            waiter_pid: 99,
            waiter_user: Some("web".into()),
            waiter_application: None,
            waited_ms: 5200,
            max_blocking_ms: 5000,
            table: "app.user_sessions".into(),
            mode: "ShareLock (transactionid)".into(),
            holder_mode: Some("RowExclusiveLock".into()),
            action: "cancel".into(),
        };
        let trigger = Trigger::BlockingBudget {
            waiter_pid: 99,
            waited: Duration::from_millis(5200),
        };
        let rules = ["login".to_owned()];
        let text = summary(SummaryParts {
            rules: &rules,
            blocking: Some(&evidence),
            state: TxnState::Active,
            ..parts(Outcome::Cancelled, &trigger, &locks)
        });
        assert_eq!(
            text,
            "lockguard: cancelled the statement of backend 1234: kept backend 99 waiting 5.2s \
             for ShareLock (transactionid) on app.user_sessions, over the 5.0s blocking budget, \
             holding RowExclusiveLock on app.user_sessions; 1 session waiting; rule \"login\""
        );
    }
}
