//! The running configuration as `section.key = value` rows (for `SHOW CONFIG` and RELOAD's
//! report), with secrets masked, and the rule of what a RELOAD changes live.

use std::collections::BTreeMap;

use lockguard_config::Config;

/// Shown instead of a secret.
pub const MASK: &str = "********";

/// Keys a RELOAD applies without a restart. Everything else is reported as "needs restart"
/// when it differs in the file.
pub const LIVE_KEYS: &[&str] = &[
    "log.level",
    "guard.protected_tables",
    "guard.on_client_loss",
    "guard.idle_in_transaction_timeout",
    "guard.failed_transaction_timeout",
    "guard.require_waiters",
    "guard.sweep_interval",
    "guard.dry_run",
    "admin.auth_method",
    "admin.api_token",
    "admin.api_token_env",
    "admin.users",
    // Tls::reload re-reads certificates and modes as a whole.
    "tls.client_cert",
    "tls.client_key",
    "tls.client_mode",
    "tls.upstream_mode",
    "tls.upstream_ca",
    "tls.upstream_cert",
    "tls.upstream_key",
];

/// Whether `key` changes on RELOAD.
pub fn is_live(key: &str) -> bool {
    LIVE_KEYS.contains(&key)
}

/// `running` with the live settings of `new` copied over: what the process runs after a
/// RELOAD of `new`.
pub fn apply_live(running: &Config, new: &Config) -> Config {
    let mut out = running.clone();
    out.log.level = new.log.level.clone();
    let (g, n) = (&mut out.guard, &new.guard);
    g.protected_tables = n.protected_tables.clone();
    g.on_client_loss = n.on_client_loss;
    g.idle_in_transaction_timeout = n.idle_in_transaction_timeout;
    g.failed_transaction_timeout = n.failed_transaction_timeout;
    g.require_waiters = n.require_waiters;
    g.sweep_interval = n.sweep_interval;
    g.dry_run = n.dry_run;
    let (a, n) = (&mut out.admin, &new.admin);
    a.auth_method = n.auth_method;
    a.api_token = n.api_token.clone();
    a.api_token_env = n.api_token_env.clone();
    a.users = n.users.clone();
    out.tls = new.tls.clone();
    out
}

/// Every setting as `section.key` → its unmasked value, for comparing two configurations.
/// Unset optional keys are absent.
pub fn raw(config: &Config) -> BTreeMap<String, toml::Value> {
    let mut out = BTreeMap::new();
    let Ok(toml::Value::Table(root)) = toml::Value::try_from(config) else {
        return out;
    };
    for (section, body) in root {
        let toml::Value::Table(body) = body else {
            continue;
        };
        for (key, value) in body {
            out.insert(format!("{section}.{key}"), value);
        }
    }
    out
}

/// Every setting as `section.key` → display text, secrets masked. Unset optional keys are
/// absent.
pub fn flatten(config: &Config) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, value) in raw(config) {
        let text = match (name.as_str(), &value) {
            ("admin.users", toml::Value::Array(users)) => users_text(users),
            ("admin.api_token", _) => MASK.to_owned(),
            ("guard.dsn", toml::Value::String(dsn)) => mask_dsn_password(dsn),
            (_, toml::Value::String(s)) => s.clone(),
            (_, other) => other.to_string(),
        };
        out.insert(name, text);
    }
    // An empty user list is skipped when serializing; show it anyway.
    out.entry("admin.users".to_owned()).or_default();
    out
}

/// `ops (admin), grafana (monitor)`: names and roles, never passwords.
fn users_text(users: &[toml::Value]) -> String {
    users
        .iter()
        .filter_map(|u| {
            let name = u.get("name")?.as_str()?;
            let role = u.get("role").and_then(|r| r.as_str()).unwrap_or("monitor");
            Some(format!("{name} ({role})"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Replaces the value of `password=...` in a libpq key/value string.
fn mask_dsn_password(dsn: &str) -> String {
    let Some(start) = find_key(dsn, "password") else {
        return dsn.to_owned();
    };
    let value_start = start;
    let bytes = dsn.as_bytes();
    let mut end = value_start;
    if bytes.get(end) == Some(&b'\'') {
        end += 1;
        while end < bytes.len() {
            match bytes[end] {
                b'\\' => end += 2,
                // A doubled quote is not libpq syntax, but masking past it errs on the
                // side of hiding the secret.
                b'\'' if bytes.get(end + 1) == Some(&b'\'') => end += 2,
                b'\'' => {
                    end += 1;
                    break;
                }
                _ => end += 1,
            }
        }
    } else {
        while end < bytes.len() && !bytes[end].is_ascii_whitespace() {
            end += 1;
        }
    }
    let end = end.min(dsn.len());
    format!("{}{MASK}{}", &dsn[..value_start], &dsn[end..])
}

/// Byte offset of the value of `key=` in a libpq key/value string.
fn find_key(dsn: &str, key: &str) -> Option<usize> {
    let mut search = 0;
    while let Some(found) = dsn[search..].find(key) {
        let at = search + found;
        let before_ok = at == 0 || dsn.as_bytes()[at - 1].is_ascii_whitespace();
        let rest = &dsn[at + key.len()..];
        let trimmed = rest.trim_start();
        if before_ok && trimmed.starts_with('=') {
            let after_eq = &trimmed[1..];
            let value = after_eq.trim_start();
            return Some(dsn.len() - value.len());
        }
        search = at + key.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked() {
        let config = Config::from_toml_str(
            r#"
[guard]
dsn = "host=db user=lg password='it''s secret' dbname=postgres"
[admin]
api_token = "tok"
[[admin.users]]
name = "ops"
password = "pw"
role = "admin"
"#,
        )
        .unwrap();
        let flat = flatten(&config);
        assert_eq!(flat["admin.api_token"], MASK);
        assert_eq!(flat["admin.users"], "ops (admin)");
        assert_eq!(
            flat["guard.dsn"],
            format!("host=db user=lg password={MASK} dbname=postgres")
        );
        assert_eq!(flat["proxy.listen"], "127.0.0.1:6432");
        assert_eq!(flat["guard.dry_run"], "false");
        let text = format!("{flat:?}");
        assert!(!text.contains("pw\"") && !text.contains("secret") && !text.contains("tok\""));
    }

    #[test]
    fn dsn_masking_handles_the_forms_libpq_accepts() {
        assert_eq!(
            mask_dsn_password("password=abc host=x"),
            format!("password={MASK} host=x")
        );
        assert_eq!(
            mask_dsn_password("host=x password = abc"),
            format!("host=x password = {MASK}")
        );
        assert_eq!(
            mask_dsn_password("host=x user=passwordless"),
            "host=x user=passwordless"
        );
    }

    #[test]
    fn every_live_key_is_applied_and_nothing_else() {
        let running = Config::default();
        let new = Config::from_toml_str(
            r#"
[proxy]
listen = "127.0.0.1:7000"
[log]
level = "debug"
format = "json"
[guard]
dsn = "host=x"
protected_tables = ["app.t"]
on_client_loss = "log"
idle_in_transaction_timeout = "5s"
failed_transaction_timeout = "6s"
require_waiters = true
sweep_interval = "2s"
dry_run = true
inflight_grace = "3s"
[admin]
auth_method = "md5"
api_token_env = "TOKEN"
listen = "127.0.0.1:7001"
[[admin.users]]
name = "ops"
password = "pw"
"#,
        )
        .unwrap();
        let applied = apply_live(&running, &new);
        let (before, after, wanted) = (flatten(&running), flatten(&applied), flatten(&new));
        for key in wanted.keys() {
            let changed = before.get(key) != after.get(key);
            let differs = before.get(key) != wanted.get(key);
            if is_live(key) {
                assert_eq!(after.get(key), wanted.get(key), "{key} should be applied");
            } else if differs {
                assert!(!changed, "{key} needs a restart but was applied");
            }
        }
        assert_eq!(after["guard.dry_run"], "true");
        assert_eq!(after["proxy.listen"], "127.0.0.1:6432");
        assert!(!after.contains_key("guard.dsn"));
    }
}
