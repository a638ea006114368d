//! The running configuration as `section.key = value` rows (for `SHOW CONFIG` and RELOAD's
//! report), with secrets masked, and the rule of what a RELOAD changes live.

use std::collections::BTreeMap;

use lockguard_config::{is_secret_key, Config};

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
    "guard.rules",
    "admin.auth_method",
    "admin.api_token",
    "admin.api_token_env",
    "admin.users",
    "admin.require_tls",
    // The console's certificates are re-read like the client side's.
    "admin.tls_cert",
    "admin.tls_key",
    // The TLS view is derived again as a whole: certificates re-read, modes replaced.
    "tls.client_cert",
    "tls.client_key",
    "tls.client_mode",
    "tls.upstream_mode",
    "tls.upstream_negotiation",
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
    g.rules = n.rules.clone();
    let (a, n) = (&mut out.admin, &new.admin);
    a.auth_method = n.auth_method;
    a.api_token = n.api_token.clone();
    a.api_token_env = n.api_token_env.clone();
    a.users = n.users.clone();
    a.require_tls = n.require_tls;
    a.tls_cert = n.tls_cert.clone();
    a.tls_key = n.tls_key.clone();
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
            // The connection string is shown, its password masked.
            ("guard.dsn", toml::Value::String(dsn)) => mask_dsn_password(dsn),
            (key, _) if is_secret_key(key) => MASK.to_owned(),
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

/// The DSN as the guard reads it, rendered back as a libpq key/value string with the password
/// replaced by [`MASK`]. It is parsed the guard's way (its TLS keys taken out, the rest by
/// tokio-postgres), so what is shown is what runs, in either form libpq accepts; a DSN that
/// does not parse is masked whole, since where its password is cannot be known.
fn mask_dsn_password(dsn: &str) -> String {
    let Ok((rest, tls)) = guard_core::dsn::split_tls(dsn) else {
        return MASK.to_owned();
    };
    let Ok(config) = rest.parse::<tokio_postgres::Config>() else {
        return MASK.to_owned();
    };
    let mut out = DsnText::default();
    connection_keys(&mut out, &config);
    if let Some(mode) = tls.mode {
        out.key("sslmode", toml_word(&mode));
    }
    let path = |p: &std::path::Path| p.display().to_string();
    out.key_opt("sslrootcert", tls.root_cert.as_deref().map(path));
    out.key_opt("sslcert", tls.cert.as_deref().map(path));
    out.key_opt("sslkey", tls.key.as_deref().map(path));
    out.0
}

/// Where, as whom and how long: the keys tokio-postgres keeps, each only when set (or, for
/// the ones with a default, when it differs from the default).
fn connection_keys(out: &mut DsnText, config: &tokio_postgres::Config) {
    use tokio_postgres::config::{Host, TargetSessionAttrs};
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let join = |items: Vec<String>| (!items.is_empty()).then(|| items.join(","));
    out.key_opt("host", join(hosts));
    out.key_opt(
        "hostaddr",
        join(
            config
                .get_hostaddrs()
                .iter()
                .map(|a| a.to_string())
                .collect(),
        ),
    );
    out.key_opt(
        "port",
        join(config.get_ports().iter().map(|p| p.to_string()).collect()),
    );
    out.key_opt("user", config.get_user().map(str::to_owned));
    if config.get_password().is_some() {
        out.key("password", MASK.to_owned());
    }
    out.key_opt("dbname", config.get_dbname().map(str::to_owned));
    out.key_opt("options", config.get_options().map(str::to_owned));
    out.key_opt(
        "application_name",
        config.get_application_name().map(str::to_owned),
    );
    let seconds = |d: &std::time::Duration| d.as_secs().to_string();
    out.key_opt("connect_timeout", config.get_connect_timeout().map(seconds));
    out.key_opt(
        "tcp_user_timeout",
        config.get_tcp_user_timeout().map(seconds),
    );
    if !config.get_keepalives() {
        out.key("keepalives", "0".to_owned());
    }
    if config.get_target_session_attrs() == TargetSessionAttrs::ReadWrite {
        out.key("target_session_attrs", "read-write".to_owned());
    }
}

/// A libpq key/value string being written: values quoted when they need it.
#[derive(Default)]
struct DsnText(String);

impl DsnText {
    fn key(&mut self, key: &str, value: String) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        self.0.push_str(key);
        self.0.push('=');
        let bare = !value.is_empty()
            && !value
                .chars()
                .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
        if bare {
            self.0.push_str(&value);
            return;
        }
        self.0.push('\'');
        for c in value.chars() {
            if c == '\\' || c == '\'' {
                self.0.push('\\');
            }
            self.0.push(c);
        }
        self.0.push('\'');
    }

    fn key_opt(&mut self, key: &str, value: Option<String>) {
        if let Some(value) = value {
            self.key(key, value);
        }
    }
}

/// A setting's word as the configuration file spells it (`verify-full`).
fn toml_word(value: &impl serde::Serialize) -> String {
    match toml::Value::try_from(value) {
        Ok(toml::Value::String(word)) => word,
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked() {
        let config = Config::from_toml_str(
            r#"
[guard]
dsn = "host=db user=lg password='it\\'s secret' dbname=postgres"
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
            format!("host=x password={MASK}")
        );
        assert_eq!(
            mask_dsn_password("host=x password = abc"),
            format!("host=x password={MASK}")
        );
        assert_eq!(
            mask_dsn_password("host=x user=passwordless"),
            "host=x user=passwordless"
        );
    }

    #[test]
    fn dsn_masking_hides_every_password_of_a_key_value_string() {
        let shown = mask_dsn_password("password=a host=x password='b c' user=u");
        assert_eq!(shown, format!("host=x user=u password={MASK}"));
    }

    #[test]
    fn dsn_values_are_shown_quoted_where_libpq_needs_it() {
        assert_eq!(
            mask_dsn_password(
                r"host=/run/pg dbname='my db' application_name='it\'s' sslmode=verify-full sslrootcert='/etc/ca dir/ca.crt'"
            ),
            r"host=/run/pg dbname='my db' application_name='it\'s' sslmode=verify-full sslrootcert='/etc/ca dir/ca.crt'"
        );
    }

    #[test]
    fn dsn_masking_hides_the_password_of_a_uri_userinfo() {
        assert_eq!(
            mask_dsn_password("postgresql://lg:s3cret@db/postgres"),
            format!("host=db port=5432 user=lg password={MASK} dbname=postgres")
        );
        assert_eq!(
            mask_dsn_password("postgres://lg:s%33cr%40t@db:5433,db2/postgres?sslmode=require"),
            format!("host=db,db2 port=5433,5432 user=lg password={MASK} dbname=postgres sslmode=require")
        );
        // A user without a password, and no userinfo at all, show no password.
        assert_eq!(
            mask_dsn_password("postgresql://lg@db/postgres"),
            "host=db port=5432 user=lg dbname=postgres"
        );
        assert_eq!(
            mask_dsn_password("postgresql://[::1]:5432/postgres?application_name=lockguard"),
            "host=::1 port=5432 dbname=postgres application_name=lockguard"
        );
    }

    #[test]
    fn dsn_masking_hides_the_password_query_parameter_of_a_uri() {
        assert_eq!(
            mask_dsn_password("postgres://db/postgres?password=s3cret"),
            format!("host=db port=5432 password={MASK} dbname=postgres")
        );
        assert_eq!(
            mask_dsn_password(
                "postgresql://lg@db/postgres?sslmode=disable&password=s%33cret&user=lg"
            ),
            format!("host=db port=5432 user=lg password={MASK} dbname=postgres sslmode=disable")
        );
    }

    #[test]
    fn a_dsn_that_does_not_parse_is_masked_whole() {
        for broken in [
            "host=db password='it''s secret'",
            "host=db password='unterminated",
            "postgresql://db?%70assword=a&pass%77ord=b&passwords=c",
            "nonsense",
        ] {
            assert_eq!(mask_dsn_password(broken), MASK, "{broken}");
        }
        // Malformed to the eye, but this is how the guard reads it: shown so, masked.
        assert_eq!(
            mask_dsn_password("postgres://u:p?password=z@db"),
            format!("host=db port=5432 user=u password={MASK}")
        );
    }

    #[test]
    fn show_config_masks_a_uri_dsn() {
        let config = Config::from_toml_str(
            "[guard]\ndsn = \"postgresql://lg:s3cret@db/postgres?password=other\"\n",
        )
        .unwrap();
        let flat = flatten(&config);
        assert_eq!(
            flat["guard.dsn"],
            format!("host=db port=5432 user=lg password={MASK} dbname=postgres")
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
