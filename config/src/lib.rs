//! lockguard's configuration: the TOML schema, its defaults, validation, and the
//! effective-config printer behind `lockguard check-config`.
//!
//! Every section and key is optional (an empty file is a valid config) and unknown keys are
//! errors, so a typo never silently falls back to a default. Durations are humantime strings
//! such as `"10s"`, `"500ms"` or `"1m"`. Errors name the file, the key path and the line.

#![warn(missing_docs)]

mod duration;
mod error;
mod live;
mod overrides;
mod rules;
mod secret;
mod sections;
mod table_pattern;
mod upstream;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use error::ConfigError;
use error::{KeyPath, Seg};
pub use live::{Derived, Live};
pub use overrides::Overrides;
pub use rules::{BlockingAction, EffectiveRule, GuardRule, NameGlob, CATCH_ALL_RULE};
pub use secret::{is_secret_key, SECRET_KEYS};
use sections::is_empty_secret;
pub use sections::{
    AdminAuthMethod, AdminConfig, AdminRole, AdminUser, ClientLossAction, ClientTlsMode,
    GuardConfig, LogConfig, LogFormat, ProxyConfig, TlsConfig, UpstreamNegotiation,
    UpstreamTlsMode, DEFAULT_AUTH_QUERY,
};
pub use table_pattern::{NamePattern, TablePattern, TablePatternError};
pub use upstream::{Upstream, UpstreamParseError, DEFAULT_PG_PORT};

/// The whole configuration file: one field per `[section]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[proxy]`: listening, upstream, connection limits.
    pub proxy: ProxyConfig,
    /// `[log]`: log format and filter.
    pub log: LogConfig,
    /// `[guard]`: orphaned-lock detection and termination.
    pub guard: GuardConfig,
    /// `[tls]`: encryption towards clients and towards PostgreSQL.
    pub tls: TlsConfig,
    /// `[admin]`: the operator's console and the HTTP endpoint.
    pub admin: AdminConfig,
}

impl Config {
    /// Parses and validates config text. Used for files and for tests; errors carry the line.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Self::parse(text, None)
    }

    /// Reads, parses and validates a config file, and reads the secrets it names from the
    /// environment ([`Config::check_secrets`]); every error names `path`. This is what the
    /// proxy's start, `lockguard check-config` and RELOAD load.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let config = Self::parse(&text, Some(path))?;
        match config.secret_violation() {
            Some((key, message)) => Err(invalid(&key, message, Some(path.to_owned()), Some(&text))),
            None => Ok(config),
        }
    }

    /// Reads every secret given by environment variable (`guard.password_env`,
    /// `admin.api_token_env`, each admin user's `password_env`) and fails, naming the key and
    /// the variable, when one is unset or empty: an empty password or token would let anyone
    /// in. [`Config::load`] calls it; call it yourself for a `Config` built in code.
    pub fn check_secrets(&self) -> Result<(), ConfigError> {
        match self.secret_violation() {
            None => Ok(()),
            Some((path, message)) => Err(invalid(&path, message, None, None)),
        }
    }

    /// The first secret variable that is unset or empty, as (key path, message).
    fn secret_violation(&self) -> Option<(Vec<Seg>, String)> {
        let key = |section: &str, name: &str| vec![Seg::from(section), Seg::from(name)];
        if let Err(message) = self.guard.resolve_password() {
            return Some((key("guard", "password_env"), message));
        }
        if self.admin.api_token.is_none() {
            if let Err(message) = self.admin.resolve_api_token() {
                return Some((key("admin", "api_token_env"), message));
            }
        }
        for (i, user) in self.admin.users.iter().enumerate() {
            if user.password.is_none() {
                if let Err(message) = user.resolve_password() {
                    let path = vec![
                        Seg::from("admin"),
                        Seg::from("users"),
                        Seg::Index(i),
                        Seg::from("password_env"),
                    ];
                    return Some((path, message));
                }
            }
        }
        None
    }

    fn parse(text: &str, file: Option<&Path>) -> Result<Config, ConfigError> {
        let file = file.map(Path::to_path_buf);
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::parse(e, text, file.clone()))?;
        match config.first_violation() {
            Some((path, message)) => Err(invalid(&path, message, file, Some(text))),
            None => Ok(config),
        }
    }

    /// Checks the rules serde cannot express (non-zero timeouts, parseable table patterns, ...).
    /// The loaders call it; call it yourself after building or changing a `Config` in code.
    /// Errors from here carry the key path but no line (there is no source text).
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.first_violation() {
            None => Ok(()),
            Some((path, message)) => Err(invalid(&path, message, None, None)),
        }
    }

    /// The first broken rule, as (key path, message), section by section in file order.
    fn first_violation(&self) -> Option<(Vec<Seg>, String)> {
        self.proxy
            .violation()
            .or_else(|| self.log_violation())
            .or_else(|| self.guard.violation())
            .or_else(|| self.tls.violation())
            .or_else(|| self.admin_violation())
    }

    fn log_violation(&self) -> Option<(Vec<Seg>, String)> {
        let l = &self.log;
        if l.level.trim().is_empty() {
            return Some((
                key("log", "level"),
                "must not be empty (e.g. \"info\" or \"info,lockguard=debug\")".to_owned(),
            ));
        }
        None
    }

    /// The rules of `[admin]`.
    fn admin_violation(&self) -> Option<(Vec<Seg>, String)> {
        let a = &self.admin;
        let key = |name: &str| vec![Seg::from("admin"), Seg::from(name)];
        if a.trust_loopback && !a.listen.ip().is_loopback() {
            return Some((
                key("trust_loopback"),
                format!(
                    "needs a loopback listen address (admin.listen is {}); configure [[admin.users]] instead",
                    a.listen
                ),
            ));
        }
        if a.tls_cert.is_some() != a.tls_key.is_some() {
            let missing = if a.tls_cert.is_some() {
                "tls_key"
            } else {
                "tls_cert"
            };
            return Some((
                key(missing),
                "tls_cert and tls_key must be set together".to_owned(),
            ));
        }
        if !a.listen.ip().is_loopback() && !a.require_tls {
            return Some((
                key("require_tls"),
                format!(
                    "must be true when admin.listen ({}) is not a loopback address: console \
                     passwords and commands would otherwise cross the network in plaintext",
                    a.listen
                ),
            ));
        }
        if a.require_tls && a.own_tls().is_none() && !self.tls.serves_clients() {
            return Some((
                key("require_tls"),
                "needs a certificate: set admin.tls_cert and admin.tls_key, or [tls] \
                 client_cert and client_key"
                    .to_owned(),
            ));
        }
        let same_socket =
            |x: std::net::SocketAddr, y: std::net::SocketAddr| x.port() != 0 && x == y;
        if same_socket(a.listen, self.proxy.listen) {
            return Some((key("listen"), "must differ from proxy.listen".to_owned()));
        }
        if a.http_enabled && same_socket(a.http_listen, self.proxy.listen) {
            return Some((
                key("http_listen"),
                "must differ from proxy.listen".to_owned(),
            ));
        }
        if a.http_enabled && a.console_enabled() && same_socket(a.http_listen, a.listen) {
            return Some((
                key("http_listen"),
                "must differ from admin.listen".to_owned(),
            ));
        }
        if a.api_token.is_some() && a.api_token_env.is_some() {
            return Some((
                key("api_token_env"),
                "set either api_token or api_token_env, not both".to_owned(),
            ));
        }
        if a.api_token.as_deref().is_some_and(is_empty_secret) {
            return Some((
                key("api_token"),
                "must not be empty; remove the key to disable the token".to_owned(),
            ));
        }
        if a.api_token_env
            .as_deref()
            .is_some_and(|v| v.trim().is_empty())
        {
            return Some((
                key("api_token_env"),
                "must name an environment variable; remove the key if unused".to_owned(),
            ));
        }
        a.users
            .iter()
            .enumerate()
            .find_map(|(i, user)| user_violation(&a.users[..i], i, user))
    }

    /// The effective configuration as TOML, every key present with defaults filled in, for
    /// `lockguard check-config`. Unset optional keys appear as comments. Parsing the output
    /// gives back an equal `Config`.
    pub fn to_toml_string(&self) -> String {
        let mut out = String::from("# lockguard effective configuration (defaults filled in)\n");
        push_section(&mut out, "proxy", &self.proxy, &[]);
        push_section(&mut out, "log", &self.log, &[]);
        let g = &self.guard;
        let unset = [
            (g.dsn.is_none(), "dsn is not set: the guard is disabled"),
            (g.password_env.is_none(), "password_env is not set"),
            (g.audit_log.is_none(), "audit_log is not set: no audit file"),
        ];
        let mut guard = g.clone();
        let rules = std::mem::take(&mut guard.rules);
        push_section(&mut out, "guard", &guard, &unset);
        // `[[guard.rules]]` entries: an array of tables, after the section's plain keys.
        for rule in &rules {
            push_section(&mut out, "[guard.rules]", rule, &[]);
        }
        let t = &self.tls;
        let unset = [(
            !t.serves_clients(),
            "client_cert/client_key are not set: clients connect in plaintext",
        )];
        push_section(&mut out, "tls", t, &unset);
        let mut admin = self.admin.clone();
        let users = std::mem::take(&mut admin.users);
        let unset = [
            (
                !admin.console_enabled(),
                "no [[admin.users]] and trust_loopback is off: the admin console is disabled",
            ),
            (
                admin.api_token.is_none() && admin.api_token_env.is_none(),
                "no api_token configured: the HTTP API is read-only",
            ),
        ];
        push_section(&mut out, "admin", &admin, &unset);
        // `[[admin.users]]` entries: an array of tables, after the section's plain keys.
        for user in &users {
            push_section(&mut out, "[admin.users]", user, &[]);
        }
        out
    }
}

fn push_section<T: Serialize>(out: &mut String, name: &str, section: &T, notes: &[(bool, &str)]) {
    // Sections are flat structs of strings, numbers, booleans and string arrays, all of which
    // TOML can represent; failure here would be a bug in this crate's types.
    let body = toml::to_string_pretty(section)
        .unwrap_or_else(|e| panic!("config section [{name}] must serialize to TOML: {e}"));
    out.push_str(&format!("\n[{name}]\n{body}"));
    for (_, note) in notes.iter().filter(|(show, _)| *show) {
        out.push_str(&format!("# {note}\n"));
    }
}

/// The error for a broken rule at `path`: with the file it came from, and the line when the
/// source text is known (a `Config` built in code has none).
fn invalid(
    path: &[Seg],
    message: String,
    file: Option<PathBuf>,
    text: Option<&str>,
) -> ConfigError {
    ConfigError::Invalid {
        file,
        key: KeyPath(path).to_string(),
        line: text.and_then(|text| error::line_of_path(text, path)),
        message,
    }
}

/// The first broken rule of `[[admin.users]]` entry `i`, `before` being the entries above it.
fn user_violation(before: &[AdminUser], i: usize, user: &AdminUser) -> Option<(Vec<Seg>, String)> {
    let at = |name: &str| {
        vec![
            Seg::from("admin"),
            Seg::from("users"),
            Seg::Index(i),
            Seg::from(name),
        ]
    };
    if user.name.trim().is_empty() {
        return Some((at("name"), "must not be empty".to_owned()));
    }
    if before.iter().any(|u| u.name == user.name) {
        return Some((at("name"), format!("user {:?} is listed twice", user.name)));
    }
    match (&user.password, &user.password_env) {
        (Some(_), Some(_)) => {
            return Some((
                at("password_env"),
                "set either password or password_env, not both".to_owned(),
            ))
        }
        (None, None) => {
            return Some((
                at("password"),
                "each admin user needs password or password_env".to_owned(),
            ))
        }
        (Some(p), None) if is_empty_secret(p) => {
            return Some((
                at("password"),
                "must not be empty: an empty password would let anyone in".to_owned(),
            ))
        }
        (None, Some(v)) if v.trim().is_empty() => {
            return Some((
                at("password_env"),
                "must name an environment variable".to_owned(),
            ))
        }
        _ => {}
    }
    None
}

/// The path of `section.name`.
fn key(section: &str, name: &str) -> Vec<Seg> {
    vec![Seg::from(section), Seg::from(name)]
}

/// The message of a key that must be greater than 0.
fn positive() -> String {
    "must be greater than 0".to_owned()
}

impl ProxyConfig {
    /// The first broken rule of `[proxy]`.
    fn violation(&self) -> Option<(Vec<Seg>, String)> {
        let p = self;
        if p.connect_timeout.is_zero() {
            return Some((key("proxy", "connect_timeout"), positive()));
        }
        if p.startup_timeout.is_zero() {
            return Some((key("proxy", "startup_timeout"), positive()));
        }
        if p.max_clients == 0 {
            return Some((key("proxy", "max_clients"), positive()));
        }
        if p.max_startup_clients == 0 {
            return Some((key("proxy", "max_startup_clients"), positive()));
        }
        if p.client_keepalive_idle.is_zero() {
            return Some((key("proxy", "client_keepalive_idle"), positive()));
        }
        if p.client_keepalive_interval.is_zero() {
            return Some((key("proxy", "client_keepalive_interval"), positive()));
        }
        if p.client_keepalive_count == 0 {
            return Some((key("proxy", "client_keepalive_count"), positive()));
        }
        None
    }
}

impl GuardConfig {
    /// The first broken rule of `[guard]`.
    fn violation(&self) -> Option<(Vec<Seg>, String)> {
        let g = self;
        if g.dsn.as_deref().is_some_and(|d| d.trim().is_empty()) {
            return Some((
                key("guard", "dsn"),
                "must not be empty; remove the key to disable the guard".to_owned(),
            ));
        }
        if g.password_env
            .as_deref()
            .is_some_and(|v| v.trim().is_empty())
        {
            return Some((
                key("guard", "password_env"),
                "must name an environment variable; remove the key if unused".to_owned(),
            ));
        }
        for (i, pattern) in g.protected_tables.iter().enumerate() {
            if let Err(e) = pattern.parse::<TablePattern>() {
                let mut path = key("guard", "protected_tables");
                path.push(Seg::Index(i));
                return Some((path, e.to_string()));
            }
        }
        if let Some((i, name, sub, message)) = g.rule_violation() {
            let mut path = vec![
                Seg::from("guard"),
                Seg::from("rules"),
                Seg::Index(i),
                Seg::from(name),
            ];
            path.extend(sub.map(Seg::Index));
            return Some((path, message));
        }
        if g.sweep_interval.is_zero() {
            return Some((key("guard", "sweep_interval"), positive()));
        }
        if g.audit_log
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Some((
                key("guard", "audit_log"),
                "must be a file path; remove the key to disable the audit log".to_owned(),
            ));
        }
        None
    }
}

impl TlsConfig {
    /// The first broken rule of `[tls]`.
    fn violation(&self) -> Option<(Vec<Seg>, String)> {
        let t = self;
        if t.client_cert.is_some() != t.client_key.is_some() {
            let missing = if t.client_cert.is_some() {
                "client_key"
            } else {
                "client_cert"
            };
            return Some((
                key("tls", missing),
                "client_cert and client_key must be set together".to_owned(),
            ));
        }
        if t.client_mode == ClientTlsMode::Require && !t.serves_clients() {
            return Some((
                key("tls", "client_mode"),
                "\"require\" needs client_cert and client_key".to_owned(),
            ));
        }
        if matches!(
            t.upstream_mode,
            UpstreamTlsMode::VerifyCa | UpstreamTlsMode::VerifyFull
        ) && t.upstream_ca.is_none()
        {
            return Some((
                key("tls", "upstream_ca"),
                "must be set when upstream_mode is verify-ca or verify-full".to_owned(),
            ));
        }
        if t.upstream_negotiation == UpstreamNegotiation::Direct
            && matches!(
                t.upstream_mode,
                UpstreamTlsMode::Disable | UpstreamTlsMode::Prefer
            )
        {
            // Like libpq: a direct handshake has no plaintext fallback to prefer, and a
            // server without TLS would only see garbage.
            return Some((
                key("tls", "upstream_negotiation"),
                "\"direct\" needs upstream_mode \"require\", \"verify-ca\" or \"verify-full\""
                    .to_owned(),
            ));
        }
        if t.upstream_cert.is_some() != t.upstream_key.is_some() {
            let missing = if t.upstream_cert.is_some() {
                "upstream_key"
            } else {
                "upstream_cert"
            };
            return Some((
                key("tls", missing),
                "upstream_cert and upstream_key must be set together".to_owned(),
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_admin;
#[cfg(test)]
mod tests_rules;
#[cfg(test)]
mod tests_secrets;
