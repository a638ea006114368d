//! Judging a session under every rule that governs one of its locks: each rule decides with
//! its own settings ([`super::decide`]), and the strictest verdict that is due wins.

use super::{decide, Facts, LeaveReason, RuleSet, Rules, Trigger, Verdict, Who};

/// What every rule that governs a session's protected locks asks for together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruling {
    /// The strictest verdict that is due (terminate over log-only over dry-run), or why
    /// nothing is.
    pub verdict: Verdict,
    /// The rules whose verdict was due, the deciding one first; for an operator kill, every
    /// rule governing one of its locks.
    pub rules: Vec<String>,
}

/// Judges a session holding protected locks on `tables` (`(schema, table)`, one per lock)
/// under every rule that governs one of them: each rule decides with its own settings and the
/// locks it governs; the strictest verdict that is due wins. An operator kill goes by the
/// flat keys' rule (for `dry_run`), whatever the locks.
pub fn decide_by_rules<'t>(
    trigger: &Trigger,
    facts: &Facts<'_>,
    tables: impl IntoIterator<Item = (&'t str, &'t str)>,
    who: Who<'_>,
    set: &RuleSet,
) -> Ruling {
    let governed = set.governing_locks(who, tables);
    let catch_all = Rules::from(set.catch_all());
    if matches!(trigger, Trigger::Operator { .. }) || governed.is_empty() {
        let facts = Facts {
            protected_locks: governed.iter().map(|(_, n)| n).sum(),
            ..facts.clone()
        };
        let verdict = match decide(trigger, &facts, &catch_all) {
            // No rule governs any of its locks: how long it has been idle does not matter.
            Verdict::Leave(LeaveReason::NotIdleLongEnough) if governed.is_empty() => {
                Verdict::Leave(LeaveReason::NoProtectedLock)
            }
            verdict => verdict,
        };
        let rules = match verdict {
            Verdict::Leave(_) => Vec::new(),
            _ => governed.iter().map(|(r, _)| r.name.clone()).collect(),
        };
        return Ruling { verdict, rules };
    }
    let verdicts: Vec<(&str, Verdict)> = governed
        .iter()
        .map(|(rule, n)| {
            let facts = Facts {
                protected_locks: *n,
                ..facts.clone()
            };
            (
                rule.name.as_str(),
                decide(trigger, &facts, &Rules::from(*rule)),
            )
        })
        .collect();
    let rank = |v: &Verdict| match v {
        Verdict::Terminate => 3,
        Verdict::LogOnly => 2,
        Verdict::DryRun => 1,
        Verdict::Leave(_) => 0,
    };
    let strictest = verdicts.iter().map(|(_, v)| rank(v)).max().unwrap_or(0);
    if strictest == 0 {
        // The sweep asks again only if some rule may change its mind while the session
        // stays as it is.
        let reason = verdicts
            .iter()
            .filter_map(|(_, v)| match v {
                Verdict::Leave(reason) => Some(reason),
                _ => None,
            })
            .find(|r| !r.stable_while_idle())
            .or_else(|| {
                verdicts.iter().find_map(|(_, v)| match v {
                    Verdict::Leave(reason) => Some(reason),
                    _ => None,
                })
            })
            .cloned()
            .unwrap_or(LeaveReason::NoProtectedLock);
        return Ruling {
            verdict: Verdict::Leave(reason),
            rules: Vec::new(),
        };
    }
    let deciding = verdicts
        .iter()
        .position(|(_, v)| rank(v) == strictest)
        .unwrap_or(0);
    let mut rules = vec![verdicts[deciding].0.to_owned()];
    rules.extend(
        verdicts
            .iter()
            .enumerate()
            .filter(|(i, (_, v))| *i != deciding && rank(v) > 0)
            .map(|(_, (name, _))| (*name).to_owned()),
    );
    Ruling {
        verdict: verdicts[deciding].1.clone(),
        rules,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::tests::{holder, lost};

    fn rule_set(text: &str) -> RuleSet {
        RuleSet::from_config(&lockguard_config::Config::from_toml_str(text).unwrap().guard)
    }

    const WHO: Who<'static> = Who {
        database: "d",
        user: "web",
        application: "api",
    };

    const TWO_RULES: &str = r#"
        [guard]
        protected_tables = ["app.*"]
        idle_in_transaction_timeout = "1h"
        [[guard.rules]]
        name = "login"
        tables = ["app.user_sessions"]
        idle_in_transaction_timeout = "5s"
        [[guard.rules]]
        name = "billing"
        tables = ["app.invoices"]
        idle_in_transaction_timeout = "60s"
        dry_run = true
    "#;

    #[test]
    fn each_rule_judges_its_own_locks_with_its_own_timeout() {
        let set = rule_set(TWO_RULES);
        let idle = |secs| Facts {
            state_age: Duration::from_secs(secs),
            ..holder()
        };
        let login = [("app", "user_sessions")];
        let billing = [("app", "invoices")];
        let r = decide_by_rules(&Trigger::IdleInTransaction, &idle(6), login, WHO, &set);
        assert_eq!(
            (r.verdict, r.rules),
            (Verdict::Terminate, vec!["login".to_owned()])
        );
        let r = decide_by_rules(&Trigger::IdleInTransaction, &idle(6), billing, WHO, &set);
        assert_eq!(r.verdict, Verdict::Leave(LeaveReason::NotIdleLongEnough));
        let r = decide_by_rules(&Trigger::IdleInTransaction, &idle(61), billing, WHO, &set);
        assert_eq!(
            (r.verdict, r.rules),
            (Verdict::DryRun, vec!["billing".to_owned()])
        );
        // Other tables of the schema are the catch-all's, an hour.
        let r = decide_by_rules(
            &Trigger::IdleInTransaction,
            &idle(61),
            [("app", "x")],
            WHO,
            &set,
        );
        assert_eq!(r.verdict, Verdict::Leave(LeaveReason::NotIdleLongEnough));
    }

    #[test]
    fn the_strictest_due_verdict_wins_and_every_due_rule_is_listed() {
        let set = rule_set(TWO_RULES);
        let facts = Facts {
            state_age: Duration::from_secs(61),
            ..holder()
        };
        let both = [("app", "invoices"), ("app", "user_sessions")];
        let r = decide_by_rules(&Trigger::IdleInTransaction, &facts, both, WHO, &set);
        assert_eq!(r.verdict, Verdict::Terminate);
        assert_eq!(r.rules, vec!["login".to_owned(), "billing".to_owned()]);
        // Only the dry-run rule due: a record.
        let facts = Facts {
            state_age: Duration::from_secs(3),
            ..holder()
        };
        let r = decide_by_rules(&Trigger::IdleInTransaction, &facts, both, WHO, &set);
        assert_eq!(r.verdict, Verdict::Leave(LeaveReason::NotIdleLongEnough));
    }

    #[test]
    fn an_exempt_session_holding_only_its_rules_tables_is_left_alone() {
        let set = rule_set(
            "[guard]\nprotected_tables = [\"app.*\"]\n[[guard.rules]]\nname = \"login\"\n\
             tables = [\"app.user_sessions\"]\nexempt_applications = [\"migrat*\"]\n",
        );
        let migration = Who {
            application: "migrator",
            ..WHO
        };
        let r = decide_by_rules(
            &lost(),
            &holder(),
            [("app", "user_sessions")],
            migration,
            &set,
        );
        assert_eq!(r.verdict, Verdict::Leave(LeaveReason::NoProtectedLock));
        let r = decide_by_rules(&lost(), &holder(), [("app", "user_sessions")], WHO, &set);
        assert_eq!(
            (r.verdict, r.rules),
            (Verdict::Terminate, vec!["login".to_owned()])
        );
    }
}
