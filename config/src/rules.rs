//! `[[guard.rules]]`: per-table guard policies, matched in file order like pg_hba lines. The
//! flat `[guard]` keys are the last rule, so a config without rules means what it always did.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sections::{ClientLossAction, GuardConfig};
use crate::table_pattern::{NamePattern, TablePattern};

/// The name of the rule the flat `[guard]` keys make; no `[[guard.rules]]` entry may take it.
pub const CATCH_ALL_RULE: &str = "default";

/// What the blocking budget does to a proxied session that keeps a waiter past `max_blocking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockingAction {
    /// Cancel the holder's running statement (its transaction aborts and frees its locks);
    /// terminate a holder that is idle in its transaction, which has no statement to cancel.
    #[default]
    Cancel,
    /// Terminate the holder's backend.
    Terminate,
    /// Record only.
    Log,
}

impl BlockingAction {
    /// The spelling of the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockingAction::Cancel => "cancel",
            BlockingAction::Terminate => "terminate",
            BlockingAction::Log => "log",
        }
    }
}

/// One `[[guard.rules]]` entry as written. A setting it leaves out takes the flat `[guard]`
/// key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardRule {
    /// Shown in audit events, the client's FATAL text, SHOW RULES and metrics labels.
    pub name: String,
    /// The tables this rule is about, as `protected_tables` patterns. Required, not empty.
    pub tables: Vec<String>,
    /// Databases (globs: `*` any run, `?` one character); absent = every database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub databases: Option<Vec<String>>,
    /// Login users (globs); absent = every user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
    /// `application_name` values (globs); absent = every application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applications: Option<Vec<String>>,
    /// Users this rule matches but never acts on: their locks on the rule's tables are left
    /// alone, and no later rule judges them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exempt_users: Vec<String>,
    /// Applications this rule matches but never acts on (as `exempt_users`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exempt_applications: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::duration::option"
    )]
    /// As `guard.idle_in_transaction_timeout`, for this rule's tables.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// As `guard.failed_transaction_timeout`, for this rule's tables.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::duration::option"
    )]
    pub failed_transaction_timeout: Option<Duration>,
    /// As `guard.on_client_loss`, for this rule's tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_client_loss: Option<ClientLossAction>,
    /// As `guard.inflight_grace`, for this rule's tables.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::duration::option"
    )]
    pub inflight_grace: Option<Duration>,
    /// As `guard.require_waiters`, for this rule's tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_waiters: Option<bool>,
    /// As `guard.dry_run`, for this rule's tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    /// The blocking budget: no session waits longer than this for a lock on the rule's tables
    /// held by a proxied session. Absent = no budget.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::duration::option"
    )]
    pub max_blocking: Option<Duration>,
    /// What the budget does to the holder: `cancel` (default), `terminate` or `log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocking_action: Option<BlockingAction>,
}

/// A name glob of a rule (`databases`, `users`, `applications`, the exemptions): `*` matches
/// any run of characters, `?` one character, everything else itself, case-exact as
/// PostgreSQL stores names. Small enough not to warrant a glob crate (those match paths).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NameGlob(String);

impl NameGlob {
    /// The glob as written.
    pub fn new(glob: &str) -> NameGlob {
        NameGlob(glob.to_owned())
    }

    /// Whether `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        fn go(p: &[char], n: &[char]) -> bool {
            match p.split_first() {
                None => n.is_empty(),
                Some(('*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
                Some(('?', rest)) => !n.is_empty() && go(rest, &n[1..]),
                Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
            }
        }
        let p: Vec<char> = self.0.chars().collect();
        let n: Vec<char> = name.chars().collect();
        go(&p, &n)
    }

    /// Whether every name `other` selects, this selects too (conservatively: `false` when
    /// unsure), for finding rules an earlier one hides.
    fn covers(&self, other: &NameGlob) -> bool {
        let wild = |s: &str| s.contains(['*', '?']);
        if self.0 == "*" || self.0 == other.0 {
            return true;
        }
        if !wild(&other.0) {
            return self.matches(&other.0);
        }
        // `prefix*` covers any glob starting with that prefix.
        match self.0.strip_suffix('*') {
            Some(prefix) if !wild(prefix) => other.0.starts_with(prefix),
            _ => false,
        }
    }
}

impl fmt::Display for NameGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A rule with every setting resolved (the flat `[guard]` keys filling the gaps) and its
/// patterns parsed: what the guard judges with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveRule {
    /// The rule's name ([`CATCH_ALL_RULE`] for the flat keys).
    pub name: String,
    /// The tables it is about.
    pub tables: Vec<TablePattern>,
    /// Empty = any.
    pub databases: Vec<NameGlob>,
    /// Empty = any.
    pub users: Vec<NameGlob>,
    /// Empty = any.
    pub applications: Vec<NameGlob>,
    /// Users it matches but never acts on.
    pub exempt_users: Vec<NameGlob>,
    /// Applications it matches but never acts on.
    pub exempt_applications: Vec<NameGlob>,
    /// What a lost client's lock-holding backend gets.
    pub on_client_loss: ClientLossAction,
    /// How long a lost client's statement may still finish.
    pub inflight_grace: Duration,
    /// 0 = off.
    pub idle_in_transaction_timeout: Duration,
    /// 0 = off.
    pub failed_transaction_timeout: Duration,
    /// Act on idle holders only when someone waits.
    pub require_waiters: bool,
    /// Record, never act.
    pub dry_run: bool,
    /// The blocking budget, if any.
    pub max_blocking: Option<Duration>,
    /// What the budget does to the holder.
    pub blocking_action: BlockingAction,
}

impl EffectiveRule {
    /// Whether the rule is about `schema.table`.
    pub fn covers_table(&self, schema: &str, table: &str) -> bool {
        self.tables.iter().any(|p| p.matches(schema, table))
    }

    /// Whether the rule's `databases`, `users` and `applications` select the session.
    pub fn matches_session(&self, database: &str, user: &str, application: &str) -> bool {
        let any = |globs: &[NameGlob], name: &str| {
            globs.is_empty() || globs.iter().any(|g| g.matches(name))
        };
        any(&self.databases, database)
            && any(&self.users, user)
            && any(&self.applications, application)
    }

    /// Whether the session is exempt from this rule (it matches, and nothing acts on it).
    pub fn exempts(&self, user: &str, application: &str) -> bool {
        self.exempt_users.iter().any(|g| g.matches(user))
            || self
                .exempt_applications
                .iter()
                .any(|g| g.matches(application))
    }

    /// Whether every (table, database, user, application) `later` matches, this rule matches
    /// first: `later` can never apply.
    pub fn shadows(&self, later: &EffectiveRule) -> bool {
        fn name_covers(a: &NamePattern, b: &NamePattern) -> bool {
            matches!(a, NamePattern::Any) || a == b
        }
        fn globs_cover(a: &[NameGlob], b: &[NameGlob]) -> bool {
            if a.is_empty() {
                return true;
            }
            !b.is_empty() && b.iter().all(|q| a.iter().any(|p| p.covers(q)))
        }
        later.tables.iter().all(|q| {
            self.tables
                .iter()
                .any(|p| name_covers(&p.schema, &q.schema) && name_covers(&p.table, &q.table))
        }) && globs_cover(&self.databases, &later.databases)
            && globs_cover(&self.users, &later.users)
            && globs_cover(&self.applications, &later.applications)
    }
}

impl GuardConfig {
    /// Every rule in match order: the `[[guard.rules]]` entries, then the flat keys' catch-all
    /// (named [`CATCH_ALL_RULE`], its tables `protected_tables`). Patterns that do not parse are
    /// skipped; a validated config has none.
    pub fn effective_rules(&self) -> Vec<EffectiveRule> {
        let globs = |list: &[String]| list.iter().map(|g| NameGlob::new(g)).collect::<Vec<_>>();
        let mut out: Vec<EffectiveRule> = self
            .rules
            .iter()
            .map(|r| EffectiveRule {
                name: r.name.clone(),
                tables: r.tables.iter().filter_map(|p| p.parse().ok()).collect(),
                databases: globs(r.databases.as_deref().unwrap_or_default()),
                users: globs(r.users.as_deref().unwrap_or_default()),
                applications: globs(r.applications.as_deref().unwrap_or_default()),
                exempt_users: globs(&r.exempt_users),
                exempt_applications: globs(&r.exempt_applications),
                on_client_loss: r.on_client_loss.unwrap_or(self.on_client_loss),
                inflight_grace: r.inflight_grace.unwrap_or(self.inflight_grace),
                idle_in_transaction_timeout: r
                    .idle_in_transaction_timeout
                    .unwrap_or(self.idle_in_transaction_timeout),
                failed_transaction_timeout: r
                    .failed_transaction_timeout
                    .unwrap_or(self.failed_transaction_timeout),
                require_waiters: r.require_waiters.unwrap_or(self.require_waiters),
                dry_run: r.dry_run.unwrap_or(self.dry_run),
                max_blocking: r.max_blocking,
                blocking_action: r.blocking_action.unwrap_or_default(),
            })
            .collect();
        out.push(EffectiveRule {
            name: CATCH_ALL_RULE.to_owned(),
            tables: self.table_patterns(),
            databases: Vec::new(),
            users: Vec::new(),
            applications: Vec::new(),
            exempt_users: Vec::new(),
            exempt_applications: Vec::new(),
            on_client_loss: self.on_client_loss,
            inflight_grace: self.inflight_grace,
            idle_in_transaction_timeout: self.idle_in_transaction_timeout,
            failed_transaction_timeout: self.failed_transaction_timeout,
            require_waiters: self.require_waiters,
            dry_run: self.dry_run,
            max_blocking: None,
            blocking_action: BlockingAction::default(),
        });
        out
    }

    /// The first broken `[[guard.rules]]` entry, as (index, key, message).
    pub(crate) fn rule_violation(&self) -> Option<(usize, &'static str, Option<usize>, String)> {
        let effective = self.effective_rules();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.name.trim().is_empty() {
                return Some((i, "name", None, "must not be empty".to_owned()));
            }
            if rule.name == CATCH_ALL_RULE {
                return Some((
                    i,
                    "name",
                    None,
                    format!("{CATCH_ALL_RULE:?} is the name of the flat [guard] keys' rule"),
                ));
            }
            if self.rules[..i].iter().any(|r| r.name == rule.name) {
                return Some((
                    i,
                    "name",
                    None,
                    format!("rule {:?} is named twice", rule.name),
                ));
            }
            if rule.tables.is_empty() {
                return Some((
                    i,
                    "tables",
                    None,
                    "must name at least one table pattern".to_owned(),
                ));
            }
            for (j, pattern) in rule.tables.iter().enumerate() {
                if let Err(e) = pattern.parse::<TablePattern>() {
                    return Some((i, "tables", Some(j), e.to_string()));
                }
            }
            if let Some((key, j, message)) = matcher_violation(rule) {
                return Some((i, key, j, message));
            }
            if rule.max_blocking.is_some_and(|d| d.is_zero()) {
                return Some((
                    i,
                    "max_blocking",
                    None,
                    "must be greater than 0; remove the key for no budget".to_owned(),
                ));
            }
            if rule.blocking_action.is_some() && rule.max_blocking.is_none() {
                return Some((
                    i,
                    "blocking_action",
                    None,
                    "needs max_blocking: without a budget there is nothing to act on".to_owned(),
                ));
            }
            if let Some(earlier) = effective[..i].iter().find(|e| e.shadows(&effective[i])) {
                return Some((
                    i,
                    "name",
                    None,
                    format!(
                        "rule {:?} can never apply: the earlier rule {:?} matches every table, \
                         database, user and application it does (rules match in file order, \
                         first match wins)",
                        rule.name, earlier.name
                    ),
                ));
            }
        }
        None
    }
}

/// The first empty matcher list or empty pattern of `rule`, as (key, index, message).
fn matcher_violation(rule: &GuardRule) -> Option<(&'static str, Option<usize>, String)> {
    let matchers = [
        ("databases", rule.databases.as_deref(), "database"),
        ("users", rule.users.as_deref(), "user"),
        ("applications", rule.applications.as_deref(), "application"),
    ];
    for (key, list, what) in matchers {
        match list {
            Some([]) => {
                return Some((
                    key,
                    None,
                    format!("an empty list matches nothing; remove the key to match every {what}"),
                ))
            }
            Some(list) => {
                if let Some(j) = list.iter().position(|g| g.trim().is_empty()) {
                    return Some((key, Some(j), "must not be empty".to_owned()));
                }
            }
            None => {}
        }
    }
    for (key, list) in [
        ("exempt_users", &rule.exempt_users),
        ("exempt_applications", &rule.exempt_applications),
    ] {
        if let Some(j) = list.iter().position(|g| g.trim().is_empty()) {
            return Some((key, Some(j), "must not be empty".to_owned()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs_single_characters_and_exact_names() {
        let g = NameGlob::new("migrat*");
        assert!(g.matches("migrate") && g.matches("migrations") && !g.matches("Migrate"));
        assert!(NameGlob::new("app?").matches("app1") && !NameGlob::new("app?").matches("app"));
        assert!(NameGlob::new("*").matches(""));
        assert!(NameGlob::new("a*b*c").matches("aXbYc") && !NameGlob::new("a*b*c").matches("ab"));
    }

    #[test]
    fn glob_cover_is_conservative() {
        let star = NameGlob::new("*");
        assert!(star.covers(&NameGlob::new("anything*")));
        assert!(NameGlob::new("app*").covers(&NameGlob::new("app-web")));
        assert!(NameGlob::new("app*").covers(&NameGlob::new("app-*")));
        assert!(!NameGlob::new("app-web").covers(&NameGlob::new("app*")));
        assert!(!NameGlob::new("a?c").covers(&NameGlob::new("a*c")));
    }
}
