//! `[[guard.rules]]`: parsing, inheritance from the flat keys, and the checks check-config
//! runs (unknown keys, empty matchers, rules an earlier one hides), each naming the line.

use std::time::Duration;

use super::*;

const TWO_RULES: &str = r#"
[guard]
protected_tables = ["app.*"]
idle_in_transaction_timeout = "30s"

[[guard.rules]]
name = "login"
tables = ["app.user_sessions"]
max_blocking = "5s"
exempt_applications = ["migrat*"]

[[guard.rules]]
name = "billing"
tables = ["billing.*"]
users = ["billing_*"]
idle_in_transaction_timeout = "60s"
blocking_action = "log"
max_blocking = "1m"
dry_run = true
"#;

fn rule_err(text: &str) -> ConfigError {
    match Config::from_toml_str(text) {
        Ok(c) => panic!("expected an error for:\n{text}\ngot {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn rules_come_in_file_order_before_the_flat_catch_all_and_inherit_its_keys() {
    let c = Config::from_toml_str(TWO_RULES).unwrap();
    let rules = c.guard.effective_rules();
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["login", "billing", CATCH_ALL_RULE]);
    let (login, billing, flat) = (&rules[0], &rules[1], &rules[2]);
    assert_eq!(login.idle_in_transaction_timeout, Duration::from_secs(30));
    assert_eq!(login.max_blocking, Some(Duration::from_secs(5)));
    assert_eq!(login.blocking_action, BlockingAction::Cancel);
    assert!(login.exempts("app", "migrate-v42") && !login.exempts("app", "web"));
    assert!(login.covers_table("app", "user_sessions") && !login.covers_table("app", "x"));
    assert_eq!(billing.idle_in_transaction_timeout, Duration::from_secs(60));
    assert_eq!(billing.blocking_action, BlockingAction::Log);
    assert!(billing.dry_run && !login.dry_run);
    assert!(
        billing.matches_session("any", "billing_app", "")
            && !billing.matches_session("any", "web", "")
    );
    assert!(flat.covers_table("app", "anything") && flat.max_blocking.is_none());
}

#[test]
fn a_config_without_rules_has_only_the_catch_all_with_the_flat_settings() {
    let c =
        Config::from_toml_str("[guard]\nprotected_tables = [\"app.t\"]\ndry_run = true\n").unwrap();
    let rules = c.guard.effective_rules();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].name, CATCH_ALL_RULE);
    assert!(rules[0].dry_run && rules[0].covers_table("app", "t"));
    assert!(rules[0].matches_session("d", "u", "a") && !rules[0].exempts("u", "a"));
}

#[test]
fn the_effective_config_prints_rules_that_parse_back_equal() {
    let c = Config::from_toml_str(TWO_RULES).unwrap();
    let printed = c.to_toml_string();
    assert!(printed.contains("[[guard.rules]]"), "{printed}");
    assert_eq!(Config::from_toml_str(&printed).unwrap(), c, "{printed}");
}

#[test]
fn an_unknown_rule_key_is_rejected_with_its_line() {
    let e = rule_err("[[guard.rules]]\nname = \"x\"\ntables = [\"t\"]\nmax_blockin = \"5s\"\n");
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.to_string().contains("max_blockin"), "{e}");
}

#[test]
fn empty_matchers_are_rejected_naming_key_and_line() {
    let cases = [
        ("tables = []\n", "guard.rules[0].tables", 3),
        ("tables = [\"t\"]\nusers = []\n", "guard.rules[0].users", 4),
        (
            "tables = [\"t\"]\ndatabases = [\"\"]\n",
            "guard.rules[0].databases[0]",
            4,
        ),
        (
            "tables = [\"t\"]\nexempt_applications = [\" \"]\n",
            "guard.rules[0].exempt_applications[0]",
            4,
        ),
        ("tables = [\"a.b.c.d\"]\n", "guard.rules[0].tables[0]", 3),
        (
            "tables = [\"t\"]\nmax_blocking = \"0s\"\n",
            "guard.rules[0].max_blocking",
            4,
        ),
        (
            "tables = [\"t\"]\nblocking_action = \"terminate\"\n",
            "guard.rules[0].blocking_action",
            4,
        ),
    ];
    for (body, key, line) in cases {
        let e = rule_err(&format!("[[guard.rules]]\nname = \"r\"\n{body}"));
        assert_eq!(e.key(), Some(key), "{body}: {e}");
        assert_eq!(e.line(), Some(line), "{body}: {e}");
    }
}

#[test]
fn names_must_be_present_unique_and_not_the_catch_alls() {
    let e = rule_err("[[guard.rules]]\nname = \"default\"\ntables = [\"t\"]\n");
    assert_eq!(e.key(), Some("guard.rules[0].name"), "{e}");
    let e = rule_err(
        "[[guard.rules]]\nname = \"a\"\ntables = [\"t\"]\n\n[[guard.rules]]\nname = \"a\"\ntables = [\"u\"]\n",
    );
    assert_eq!(e.key(), Some("guard.rules[1].name"), "{e}");
    assert_eq!(e.line(), Some(6), "{e}");
    let e = rule_err("[[guard.rules]]\ntables = [\"t\"]\n");
    assert!(e.to_string().contains("name"), "{e}");
}

#[test]
fn a_rule_hidden_by_an_earlier_one_is_rejected_with_its_line() {
    let shadowed = [
        // Every table of the schema, then one of them.
        ("tables = [\"app.*\"]", "tables = [\"app.user_sessions\"]"),
        // Any user, then some users.
        ("tables = [\"t\"]", "tables = [\"t\"]\nusers = [\"web\"]"),
        // A prefix glob, then a longer one.
        (
            "tables = [\"t\"]\napplications = [\"web*\"]",
            "tables = [\"t\"]\napplications = [\"web-1\", \"web-*\"]",
        ),
        // Exemptions do not matter: an exempt session still matches the first rule.
        (
            "tables = [\"t\"]\nexempt_users = [\"m\"]",
            "tables = [\"public.t\"]",
        ),
    ];
    for (first, second) in shadowed {
        let text = format!(
            "[[guard.rules]]\nname = \"first\"\n{first}\n\n[[guard.rules]]\nname = \"second\"\n{second}\n"
        );
        let e = rule_err(&text);
        assert_eq!(e.key(), Some("guard.rules[1].name"), "{text}\n{e}");
        let line = text.lines().position(|l| l == "name = \"second\"").unwrap() + 1;
        assert_eq!(e.line(), Some(line), "{e}");
        assert!(e.to_string().contains("\"first\""), "{e}");
    }
    let distinct = [
        ("tables = [\"app.user_sessions\"]", "tables = [\"app.*\"]"),
        ("tables = [\"t\"]\nusers = [\"web\"]", "tables = [\"t\"]"),
        (
            "tables = [\"t\"]\ndatabases = [\"a\"]",
            "tables = [\"t\"]\ndatabases = [\"b\"]",
        ),
        (
            "tables = [\"t\"]\napplications = [\"a?c\"]",
            "tables = [\"t\"]\napplications = [\"a*c\"]",
        ),
    ];
    for (first, second) in distinct {
        let text = format!(
            "[[guard.rules]]\nname = \"first\"\n{first}\n\n[[guard.rules]]\nname = \"second\"\n{second}\n"
        );
        Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{text}\n{e}"));
    }
}
