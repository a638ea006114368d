//! The TLS part of `guard.dsn`. tokio-postgres knows `sslmode` only as disable / prefer /
//! require and no certificate files at all, so lockguard takes libpq's TLS keys (`sslmode`
//! with `verify-ca` / `verify-full`, `sslrootcert`, `sslcert`, `sslkey`) out of the dsn before
//! tokio-postgres sees it, and the proxy turns them into a rustls configuration.
//!
//! Errors never quote a value: the dsn may hold a password.
//!
//! `base_config` turns the rest into the settings every guard connection starts from.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lockguard_config::{GuardConfig, UpstreamTlsMode};
use tokio_postgres::config::Host;
use tokio_postgres::Config;

use crate::error::{pg_error_text, GuardError};

/// `application_name` of guard connections unless the dsn sets one, so operators (and the
/// tests) can tell them apart in `pg_stat_activity`.
pub const GUARD_APPLICATION_NAME: &str = "lockguard-guard";

/// Limit for opening a guard connection and preparing its statements, unless the dsn sets
/// `connect_timeout`.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Startup options of every guard connection, after whatever `options` the dsn has (a later
/// `-c` wins, and startup options beat `ALTER DATABASE/ROLE ... SET`).
///
/// The guard's SQL runs inside the clients' databases, whose owners can create functions,
/// aggregates and operators: with the database's own `search_path` an owner's
/// `public.array_agg(text)` or `evil.=` would run with the guard role's rights. So the path is
/// only `pg_catalog` (and `pg_temp`, last, where nobody else can create anything), and every
/// name in the guard's statements is qualified besides.
///
/// A guard query the client side gave up on must not keep running server-side, queueing the
/// kills behind it on the same connection: hence the statement timeout.
pub const GUARD_OPTIONS: &str = "-c search_path=pg_catalog,pg_temp -c statement_timeout=5s";

/// The keys lockguard handles itself.
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// What the dsn says about TLS; `None` where it says nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DsnTls {
    /// `sslmode`; libpq's `allow` counts as `prefer` (TLS when the server offers it).
    pub mode: Option<UpstreamTlsMode>,
    /// `sslrootcert`: CA certificate(s) the server's certificate must chain to.
    pub root_cert: Option<PathBuf>,
    /// `sslcert` / `sslkey`: the client certificate the guard presents.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl DsnTls {
    /// Whether the dsn mentions TLS at all (then it, not `[tls]`, decides the guard's TLS).
    pub fn is_set(&self) -> bool {
        self.mode.is_some() || self.root_cert.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// `dsn` without the TLS keys (for tokio-postgres), and what they said.
pub fn split_tls(dsn: &str) -> Result<(String, DsnTls), String> {
    let mut tls = DsnTls::default();
    let rest = if let Some(url) = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|prefix| dsn.strip_prefix(prefix).map(|rest| (prefix, rest)))
    {
        split_url(url.0, url.1, &mut tls)?
    } else {
        split_key_values(dsn, &mut tls)?
    };
    Ok((rest, tls))
}

fn record(tls: &mut DsnTls, key: &str, value: String) -> Result<(), String> {
    match key {
        "sslmode" => {
            tls.mode = Some(match value.as_str() {
                "disable" => UpstreamTlsMode::Disable,
                "allow" | "prefer" => UpstreamTlsMode::Prefer,
                "require" => UpstreamTlsMode::Require,
                "verify-ca" => UpstreamTlsMode::VerifyCa,
                "verify-full" => UpstreamTlsMode::VerifyFull,
                _ => {
                    return Err(
                        "invalid sslmode: expected disable, allow, prefer, require, \
                                verify-ca or verify-full"
                            .to_owned(),
                    )
                }
            })
        }
        "sslrootcert" => tls.root_cert = Some(PathBuf::from(value)),
        "sslcert" => tls.cert = Some(PathBuf::from(value)),
        "sslkey" => tls.key = Some(PathBuf::from(value)),
        _ => {}
    }
    Ok(())
}

/// libpq's `key = value` form: values are bare (up to whitespace) or single-quoted, and a
/// backslash escapes the next character in both.
fn split_key_values(dsn: &str, tls: &mut DsnTls) -> Result<String, String> {
    let mut kept = String::with_capacity(dsn.len());
    let mut chars = dsn.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            if chars.peek().is_some() {
                return Err("a dsn entry has no keyword before '='".to_owned());
            }
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("missing '=' after the dsn keyword {key:?}"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated quoted value of {key:?}")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Err(format!("missing value of {key:?}"));
            }
        }
        if TLS_KEYS.contains(&key.as_str()) {
            record(tls, &key, value)?;
        } else {
            if !kept.is_empty() {
                kept.push(' ');
            }
            kept.push_str(&key);
            kept.push_str("='");
            for c in value.chars() {
                if c == '\\' || c == '\'' {
                    kept.push('\\');
                }
                kept.push(c);
            }
            kept.push('\'');
        }
    }
    Ok(kept)
}

/// The URL form: only the query string (`?sslmode=...&...`) can carry the TLS keys.
fn split_url(prefix: &str, rest: &str, tls: &mut DsnTls) -> Result<String, String> {
    let Some((base, query)) = rest.split_once('?') else {
        return Ok(format!("{prefix}{rest}"));
    };
    let mut kept: Vec<&str> = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param
            .split_once('=')
            .ok_or_else(|| "a dsn URL parameter has no '='".to_owned())?;
        if TLS_KEYS.contains(&key) {
            record(tls, key, percent_decode(value)?)?;
        } else {
            kept.push(param);
        }
    }
    Ok(if kept.is_empty() {
        format!("{prefix}{base}")
    } else {
        format!("{prefix}{base}?{}", kept.join("&"))
    })
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "invalid percent-encoding in a dsn URL parameter".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a dsn URL parameter is not UTF-8".to_owned())
}

/// The TLS settings `guard.dsn` carries (libpq's `sslmode`, `sslrootcert`, `sslcert`,
/// `sslkey`), for the proxy to build the guard's [`GuardTls`](crate::GuardTls) from.
pub fn dsn_tls(guard: &GuardConfig) -> Result<DsnTls, GuardError> {
    let dsn = guard.dsn.as_deref().ok_or(GuardError::NoDsn)?;
    Ok(split_tls(dsn).map_err(GuardError::InvalidDsn)?.1)
}

/// Builds the connection settings every per-database connection starts from, and what the
/// dsn says about TLS.
pub(crate) fn base_config(guard: &GuardConfig) -> Result<(Config, DsnTls), GuardError> {
    let dsn = guard.dsn.as_deref().ok_or(GuardError::NoDsn)?;
    let (dsn, tls) = split_tls(dsn).map_err(GuardError::InvalidDsn)?;
    let mut config =
        Config::from_str(&dsn).map_err(|e| GuardError::InvalidDsn(pg_error_text(&e)))?;
    if let Some(var) = &guard.password_env {
        let password =
            std::env::var(var).map_err(|_| GuardError::PasswordEnv { var: var.clone() })?;
        config.password(password);
    }
    if config.get_application_name().is_none() {
        config.application_name(GUARD_APPLICATION_NAME);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let options = match config.get_options() {
        Some(options) if !options.trim().is_empty() => format!("{options} {GUARD_OPTIONS}"),
        _ => GUARD_OPTIONS.to_owned(),
    };
    config.options(options);
    // A dead network path should fail the guard's queries in seconds, not hours.
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(10));
    }
    Ok((config, tls))
}

/// Whether every host of `config` is a unix socket, where PostgreSQL speaks no TLS (libpq
/// ignores `sslmode` there too).
pub(crate) fn only_unix_sockets(config: &Config) -> bool {
    let hosts = config.get_hosts();
    !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Unix(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_keys_are_taken_out_and_the_rest_is_kept_verbatim() {
        let (rest, tls) = split_tls(
            "host=db.example port=5432 user=lockguard sslmode=verify-full \
             sslrootcert='/etc/ca dir/ca.crt' password='it\\'s \\\\ x' dbname=postgres \
             sslcert=/c.crt sslkey = /c.key",
        )
        .unwrap();
        assert_eq!(
            tls,
            DsnTls {
                mode: Some(UpstreamTlsMode::VerifyFull),
                root_cert: Some("/etc/ca dir/ca.crt".into()),
                cert: Some("/c.crt".into()),
                key: Some("/c.key".into()),
            }
        );
        assert!(tls.is_set());
        // What is left parses as the same settings for tokio-postgres.
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_user(), Some("lockguard"));
        assert_eq!(config.get_dbname(), Some("postgres"));
        assert_eq!(config.get_ports(), &[5432]);
        assert_eq!(config.get_password(), Some(&b"it's \\ x"[..]));
    }

    #[test]
    fn a_dsn_without_tls_keys_says_nothing() {
        let (rest, tls) = split_tls("host=/run/postgresql user=x").unwrap();
        assert!(!tls.is_set());
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_user(), Some("x"));
        let (rest, tls) = split_tls("").unwrap();
        assert_eq!((rest.as_str(), tls.is_set()), ("", false));
    }

    #[test]
    fn urls_carry_tls_keys_in_their_query() {
        let (rest, tls) = split_tls(
            "postgresql://lockguard:pw@db:5433/postgres?sslmode=require&application_name=x&sslrootcert=%2Fca.crt",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgresql://lockguard:pw@db:5433/postgres?application_name=x"
        );
        assert_eq!(tls.mode, Some(UpstreamTlsMode::Require));
        assert_eq!(tls.root_cert, Some("/ca.crt".into()));
        let (rest, tls) = split_tls("postgres://db/app?sslmode=allow").unwrap();
        assert_eq!(rest, "postgres://db/app");
        assert_eq!(tls.mode, Some(UpstreamTlsMode::Prefer));
    }

    #[test]
    fn malformed_dsns_are_errors_that_quote_no_value() {
        for dsn in [
            "host=x sslmode=sometimes",
            "host=x password='secret",
            "host=x =secret",
            "host=x user",
            "postgres://db/app?sslmode=%zz",
        ] {
            let err = split_tls(dsn).unwrap_err();
            assert!(
                !err.contains("secret") && !err.contains("sometimes"),
                "{err}"
            );
        }
    }

    #[test]
    fn base_config_fills_in_guard_defaults() {
        let guard = GuardConfig {
            dsn: Some("host=127.0.0.1 port=5999 user=lg dbname=postgres".into()),
            ..GuardConfig::default()
        };
        let (c, tls) = base_config(&guard).unwrap();
        assert_eq!(c.get_application_name(), Some(GUARD_APPLICATION_NAME));
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(c.get_ports(), &[5999]);
        assert_eq!(c.get_options(), Some(GUARD_OPTIONS));
        assert!(!tls.is_set());
    }

    #[test]
    fn the_guard_search_path_comes_after_the_dsn_options_so_it_wins() {
        let guard = GuardConfig {
            dsn: Some(
                "host=db user=lg sslmode=verify-full options='-c search_path=evil -c work_mem=1MB'"
                    .into(),
            ),
            ..GuardConfig::default()
        };
        let (c, tls) = base_config(&guard).unwrap();
        assert_eq!(
            c.get_options(),
            Some(
                "-c search_path=evil -c work_mem=1MB -c search_path=pg_catalog,pg_temp \
                 -c statement_timeout=5s"
            )
        );
        assert_eq!(tls.mode, Some(UpstreamTlsMode::VerifyFull));
        assert_eq!(dsn_tls(&guard).unwrap(), tls);
        assert!(!only_unix_sockets(&c));
        let unix = Config::from_str("host=/run/postgresql user=lg").unwrap();
        assert!(only_unix_sockets(&unix));
    }

    #[test]
    fn base_config_takes_the_password_from_password_env() {
        // A name no other test uses: tests run on threads of one process.
        let var = "LOCKGUARD_TEST_GUARD_PASSWORD_BASE_CONFIG";
        std::env::set_var(var, "s3cret pass");
        let guard = GuardConfig {
            dsn: Some("host=127.0.0.1 user=lg password=from-dsn".into()),
            password_env: Some(var.into()),
            ..GuardConfig::default()
        };
        let (c, _) = base_config(&guard).unwrap();
        assert_eq!(c.get_password(), Some(&b"s3cret pass"[..]));
    }

    #[test]
    fn base_config_reports_bad_input() {
        let none = GuardConfig::default();
        assert!(matches!(base_config(&none), Err(GuardError::NoDsn)));
        let bad = GuardConfig {
            dsn: Some("host=x port=notaport".into()),
            ..GuardConfig::default()
        };
        assert!(matches!(base_config(&bad), Err(GuardError::InvalidDsn(_))));
        let missing_env = GuardConfig {
            dsn: Some("host=x".into()),
            password_env: Some("LOCKGUARD_TEST_SURELY_UNSET_VARIABLE".into()),
            ..GuardConfig::default()
        };
        assert!(matches!(
            base_config(&missing_env),
            Err(GuardError::PasswordEnv { .. })
        ));
    }
}
