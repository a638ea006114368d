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
    "admin.auth_method",
    "admin.api_token",
    "admin.api_token_env",
    "admin.users",
    "admin.require_tls",
    // The console's certificates are re-read like the client side's.
    "admin.tls_cert",
    "admin.tls_key",
    // Tls::reload re-reads certificates and modes as a whole.
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

/// The DSN with every password replaced by [`MASK`], in either form libpq accepts: a
/// `postgres[ql]://` URI (userinfo and the `password` query parameter) or a key/value string.
fn mask_dsn_password(dsn: &str) -> String {
    match URI_SCHEMES
        .iter()
        .find_map(|scheme| dsn.strip_prefix(scheme).map(|rest| (scheme, rest)))
    {
        Some((scheme, rest)) => format!("{scheme}{}", mask_uri_passwords(rest)),
        None => mask_keyword_passwords(dsn),
    }
}

/// The prefixes libpq reads a connection string as a URI by.
const URI_SCHEMES: [&str; 2] = ["postgresql://", "postgres://"];

/// Masks the password of a URI (after its scheme) in `user:password@` and in every
/// `password=` query parameter, the name possibly percent-encoded. Where the two readings
/// of a malformed URI disagree, both are masked.
fn mask_uri_passwords(rest: &str) -> String {
    let mut secrets: Vec<std::ops::Range<usize>> = Vec::new();
    // libpq looks for the userinfo's '@' before the first '/'; taking the last '@' there
    // hides a password that itself holds a raw '@'.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    if let Some(at) = rest[..authority_end].rfind('@') {
        if let Some(colon) = rest[..at].find(':') {
            secrets.push(colon + 1..at);
        }
    }
    if let Some(question) = rest.find('?') {
        let mut start = question + 1;
        for parameter in rest[start..].split('&') {
            if let Some((name, _)) = parameter.split_once('=') {
                if percent_decode(name) == "password" {
                    secrets.push(start + name.len() + 1..start + parameter.len());
                }
            }
            start += parameter.len() + 1;
        }
    }
    secrets.sort_by_key(|range| range.start);
    let mut out = String::with_capacity(rest.len());
    let mut shown = 0;
    for secret in secrets {
        if secret.end <= shown {
            continue;
        }
        let from = secret.start.max(shown);
        out.push_str(&rest[shown..from]);
        if secret.start >= shown {
            out.push_str(MASK);
        }
        shown = secret.end;
    }
    out.push_str(&rest[shown..]);
    out
}

/// `%XX` sequences decoded (invalid ones kept as they are), for comparing parameter names.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces the value of every `password=...` in a libpq key/value string.
fn mask_keyword_passwords(dsn: &str) -> String {
    let mut out = String::with_capacity(dsn.len());
    let mut rest = dsn;
    while let Some(value_start) = find_key(rest, "password") {
        let end = keyword_value_end(rest, value_start);
        out.push_str(&rest[..value_start]);
        out.push_str(MASK);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Byte offset just past the key/value-string value starting at `start`: a quoted value
/// up to its closing quote, otherwise up to the next whitespace.
fn keyword_value_end(dsn: &str, start: usize) -> usize {
    let bytes = dsn.as_bytes();
    let mut end = start;
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
    end.min(dsn.len())
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
    fn dsn_masking_hides_every_password_of_a_key_value_string() {
        assert_eq!(
            mask_dsn_password("password=a host=x password='b c' user=u"),
            format!("password={MASK} host=x password={MASK} user=u")
        );
    }

    #[test]
    fn dsn_masking_hides_the_password_of_a_uri_userinfo() {
        assert_eq!(
            mask_dsn_password("postgresql://lg:s3cret@db/postgres"),
            format!("postgresql://lg:{MASK}@db/postgres")
        );
        assert_eq!(
            mask_dsn_password("postgres://lg:s%33cr%40t@db:5433,db2/postgres?sslmode=require"),
            format!("postgres://lg:{MASK}@db:5433,db2/postgres?sslmode=require")
        );
        // A raw '@' in the password: everything up to the host's '@' is hidden.
        assert_eq!(
            mask_dsn_password("postgresql://lg:p@ss@db"),
            format!("postgresql://lg:{MASK}@db")
        );
        // A user without a password, and no userinfo at all, stay as they are.
        for plain in [
            "postgresql://lg@db/postgres",
            "postgresql://db/postgres",
            "postgresql://[::1]:5432/postgres?application_name=lockguard",
            "postgresql://",
        ] {
            assert_eq!(mask_dsn_password(plain), plain);
        }
    }

    #[test]
    fn dsn_masking_hides_the_password_query_parameter_of_a_uri() {
        assert_eq!(
            mask_dsn_password("postgres://db/postgres?password=s3cret"),
            format!("postgres://db/postgres?password={MASK}")
        );
        assert_eq!(
            mask_dsn_password(
                "postgresql://lg@db/postgres?sslmode=disable&password=s%33cret&user=lg"
            ),
            format!("postgresql://lg@db/postgres?sslmode=disable&password={MASK}&user=lg")
        );
        // The parameter's name percent-encoded, and given twice.
        assert_eq!(
            mask_dsn_password("postgresql://db?%70assword=a&pass%77ord=b&passwords=c"),
            format!("postgresql://db?%70assword={MASK}&pass%77ord={MASK}&passwords=c")
        );
        // An '@' inside the parameter's value is not taken for userinfo left visible.
        assert_eq!(
            mask_dsn_password("postgres://db?password=a@b"),
            format!("postgres://db?password={MASK}")
        );
        // Both forms at once, overlapping in a malformed URI.
        assert_eq!(
            mask_dsn_password("postgres://u:p?password=z@db"),
            format!("postgres://u:{MASK}")
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
            format!("postgresql://lg:{MASK}@db/postgres?password={MASK}")
        );
    }

    #[test]
    fn percent_decoding_keeps_invalid_sequences() {
        assert_eq!(percent_decode("pass%77ord"), "password");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%C3%A9"), "é");
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
