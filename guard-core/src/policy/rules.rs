//! The configured rules: what one rule asks for ([`Rules`]) and the ordered set of them the
//! guard matches each lock against ([`RuleSet`]).

use std::time::Duration;

use lockguard_config::{ClientLossAction, EffectiveRule, GuardConfig, NamePattern, TablePattern};

/// The configured rules, copied out of [`GuardConfig`] so the policy needs nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub on_client_loss: ClientLossAction,
    /// 0 = the idle-in-transaction rule is off.
    pub idle_in_transaction_timeout: Duration,
    /// 0 = the failed-transaction rule is off.
    pub failed_transaction_timeout: Duration,
    pub require_waiters: bool,
    pub dry_run: bool,
}

impl From<&GuardConfig> for Rules {
    fn from(c: &GuardConfig) -> Self {
        Rules {
            on_client_loss: c.on_client_loss,
            idle_in_transaction_timeout: c.idle_in_transaction_timeout,
            failed_transaction_timeout: c.failed_transaction_timeout,
            require_waiters: c.require_waiters,
            dry_run: c.dry_run,
        }
    }
}

impl From<&EffectiveRule> for Rules {
    fn from(r: &EffectiveRule) -> Self {
        Rules {
            on_client_loss: r.on_client_loss,
            idle_in_transaction_timeout: r.idle_in_transaction_timeout,
            failed_transaction_timeout: r.failed_transaction_timeout,
            require_waiters: r.require_waiters,
            dry_run: r.dry_run,
        }
    }
}

/// Who a session is, as far as the rules' matchers care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Who<'a> {
    pub database: &'a str,
    pub user: &'a str,
    pub application: &'a str,
}

impl<'a> Who<'a> {
    /// Who a proxied session's client is: its database, user and application_name.
    pub fn of(client: &'a crate::session::ClientInfo) -> Who<'a> {
        Who {
            database: &client.database,
            user: &client.user,
            application: &client.application_name,
        }
    }
}

/// Every rule in match order, the flat `[guard]` keys' catch-all last. A lock on a table
/// belongs to the first rule whose tables and session matchers select it (as pg_hba lines);
/// if that rule exempts the session, no rule judges the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<EffectiveRule>,
}

impl RuleSet {
    /// The rules of `config`.
    pub fn from_config(config: &GuardConfig) -> RuleSet {
        RuleSet {
            rules: config.effective_rules(),
        }
    }

    /// Every rule, in match order (the catch-all last).
    pub fn all(&self) -> &[EffectiveRule] {
        &self.rules
    }

    /// The flat keys' rule: what an operator kill and `SET dry_run` go by.
    pub fn catch_all(&self) -> &EffectiveRule {
        // `effective_rules` always ends with it; an empty set is only a default value.
        self.rules
            .last()
            .unwrap_or_else(|| unreachable!("a rule set has its catch-all"))
    }

    /// Whether no rule names any table: then nothing can be protected.
    pub fn protects_nothing(&self) -> bool {
        self.rules.iter().all(|r| r.tables.is_empty())
    }

    /// The rule that governs the lock on `schema.table` of session `who`: the first that
    /// selects both. `None` when no rule does, or when that rule exempts the session.
    pub fn governing(&self, who: Who<'_>, schema: &str, table: &str) -> Option<&EffectiveRule> {
        let rule = self.rules.iter().find(|r| {
            r.covers_table(schema, table)
                && r.matches_session(who.database, who.user, who.application)
        })?;
        (!rule.exempts(who.user, who.application)).then_some(rule)
    }

    /// The rules governing `who`'s locks on `tables` (`(schema, table)`, one per lock), each
    /// with how many of those locks it governs, in match order.
    pub fn governing_locks<'t>(
        &self,
        who: Who<'_>,
        tables: impl IntoIterator<Item = (&'t str, &'t str)>,
    ) -> Vec<(&EffectiveRule, usize)> {
        let mut governed: Vec<(&EffectiveRule, usize)> = Vec::new();
        for (schema, table) in tables {
            if let Some(rule) = self.governing(who, schema, table) {
                match governed.iter_mut().find(|(r, _)| r.name == rule.name) {
                    Some((_, n)) => *n += 1,
                    None => governed.push((rule, 1)),
                }
            }
        }
        governed.sort_by_key(|(r, _)| self.rules.iter().position(|x| x.name == r.name));
        governed
    }

    /// The rules that could govern some lock of `who` (its session matchers select it and
    /// it is not exempt): what the sweep uses to pick the sessions worth probing.
    pub fn for_session<'s>(&'s self, who: Who<'s>) -> impl Iterator<Item = &'s EffectiveRule> {
        self.rules.iter().filter(move |r| {
            !r.tables.is_empty()
                && r.matches_session(who.database, who.user, who.application)
                && !r.exempts(who.user, who.application)
        })
    }

    /// Whether any rule has a blocking budget.
    pub fn has_budget(&self) -> bool {
        self.rules.iter().any(|r| r.max_blocking.is_some())
    }

    /// The longest `inflight_grace` of the rules that could govern some lock of `who` (the
    /// flat value when none could). A rule whose every table an earlier rule selecting `who`
    /// already takes can govern none of its locks, so its grace does not count: a login rule
    /// with a short grace in front of a catch-all naming the same table is not lengthened by
    /// the catch-all's.
    pub fn inflight_grace_for(&self, who: Who<'_>) -> Duration {
        self.for_session(who)
            .filter(|rule| self.can_govern_some_table(rule, who))
            .map(|r| r.inflight_grace)
            .max()
            .unwrap_or(self.catch_all().inflight_grace)
    }

    /// Whether some table of `rule` is left to it by the rules before it that select `who`
    /// (first match wins, and an exempting rule takes a table too).
    fn can_govern_some_table(&self, rule: &EffectiveRule, who: Who<'_>) -> bool {
        let earlier: Vec<&TablePattern> = self
            .rules
            .iter()
            .take_while(|r| !std::ptr::eq(*r, rule))
            .filter(|r| r.matches_session(who.database, who.user, who.application))
            .flat_map(|r| &r.tables)
            .collect();
        rule.tables
            .iter()
            .any(|pattern| !earlier.iter().any(|by| selects_all_of(by, pattern)))
    }
}

/// Whether every table `pattern` selects, `by` selects too.
fn selects_all_of(by: &TablePattern, pattern: &TablePattern) -> bool {
    let side = |by: &NamePattern, pattern: &NamePattern| match (by, pattern) {
        (NamePattern::Any, _) => true,
        (NamePattern::Exact(a), NamePattern::Exact(b)) => a == b,
        (NamePattern::Exact(_), NamePattern::Any) => false,
    };
    side(&by.schema, &pattern.schema) && side(&by.table, &pattern.table)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules of `login_rule_and_more` (TOML that goes on inside a `[[guard.rules]]` entry
    /// named "login" for `app.user_sessions`) with every `app` table protected.
    fn set(login_rule_and_more: &str) -> RuleSet {
        let text = format!(
            "[guard]\nprotected_tables = [\"app.*\"]\n\
             [[guard.rules]]\nname = \"login\"\ntables = [\"app.user_sessions\"]\n\
             {login_rule_and_more}"
        );
        let config = lockguard_config::Config::from_toml_str(&text).expect("config");
        RuleSet::from_config(&config.guard)
    }

    const WHO: Who<'static> = Who {
        database: "shop",
        user: "web",
        application: "api",
    };

    #[test]
    fn the_first_rule_selecting_table_and_session_governs_the_lock() {
        let rules = set(r#"
            users = ["web"]
            [[guard.rules]]
            name = "billing"
            tables = ["billing.*"]
        "#);
        let name = |who, s, t| rules.governing(who, s, t).map(|r| r.name.clone());
        assert_eq!(name(WHO, "app", "user_sessions").as_deref(), Some("login"));
        assert_eq!(name(WHO, "billing", "invoices").as_deref(), Some("billing"));
        assert_eq!(name(WHO, "app", "orders").as_deref(), Some("default"));
        assert_eq!(name(WHO, "public", "notes"), None);
        // Another user's lock on the login table falls through to the catch-all.
        let other = Who {
            user: "batch",
            ..WHO
        };
        assert_eq!(
            name(other, "app", "user_sessions").as_deref(),
            Some("default")
        );
    }

    #[test]
    fn an_exempt_session_is_judged_by_no_later_rule() {
        let rules = set(r#"
            exempt_applications = ["migrat*"]
        "#);
        let migration = Who {
            application: "migrate-42",
            ..WHO
        };
        assert!(rules.governing(migration, "app", "user_sessions").is_none());
        // Its locks on other tables are still the catch-all's.
        assert!(rules.governing(migration, "app", "orders").is_some());
        assert_eq!(rules.for_session(migration).count(), 1);
        assert_eq!(rules.for_session(WHO).count(), 2);
    }

    #[test]
    fn the_inflight_grace_is_the_longest_of_the_rules_that_can_still_govern_a_table() {
        let grace = |protected: &str, login: &str| {
            let text = format!(
                "[guard]\nprotected_tables = [{protected}]\ninflight_grace = \"1h\"\n\
                 [[guard.rules]]\nname = \"login\"\ntables = [\"app.user_sessions\"]\n\
                 inflight_grace = \"200ms\"\n{login}"
            );
            let config = lockguard_config::Config::from_toml_str(&text).expect("config");
            RuleSet::from_config(&config.guard).inflight_grace_for(WHO)
        };
        // The catch-all names only the login rule's table: it can govern nothing.
        assert_eq!(
            grace("\"app.user_sessions\"", ""),
            Duration::from_millis(200)
        );
        // It has other tables too: its hour counts.
        assert_eq!(grace("\"app.*\"", ""), Duration::from_secs(3600));
        // The login rule does not select this session: the catch-all takes the table.
        assert_eq!(
            grace("\"app.user_sessions\"", "users = [\"admin\"]\n"),
            Duration::from_secs(3600)
        );
    }
}
