//! The one human sentence of an audit event ([`AuditEvent::summary`]); for a terminated live
//! client it is also the FATAL message the client receives.
//!
//! [`AuditEvent::summary`]: crate::audit::AuditEvent::summary

use std::time::Duration;

use crate::audit::{locks_text, LockEvidence, Outcome};
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
}

/// One sentence for humans: `lockguard: terminated backend 1234: idle in transaction for
/// 2.1s holding RowShareLock on app.user_sessions; 1 session waiting`.
pub(crate) fn summary(p: SummaryParts<'_>) -> String {
    let verb = match p.outcome {
        Outcome::Terminated => "terminated",
        Outcome::DryRun => "would terminate (dry run)",
        Outcome::Logged => "would terminate (on_client_loss = log)",
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
        Outcome::Terminated | Outcome::DryRun | Outcome::Logged | Outcome::Error => None,
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
}
