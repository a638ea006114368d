//! The config schema: one struct per TOML section, with the defaults an unconfigured proxy uses.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{TablePattern, Upstream};

/// `[proxy]`: how clients reach lockguard and how lockguard reaches PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address clients connect to. Default `127.0.0.1:6432`.
    pub listen: SocketAddr,
    /// The PostgreSQL server behind the proxy. Default `127.0.0.1:5432`.
    pub upstream: Upstream,
    /// Limit for opening the upstream connection. Default 5s; must be > 0.
    #[serde(with = "crate::duration")]
    pub connect_timeout: Duration,
    /// Limit for a client to finish startup/authentication. Default 10s; must be > 0.
    #[serde(with = "crate::duration")]
    pub startup_timeout: Duration,
    /// How long a graceful shutdown waits for sessions before closing them. Default 30s.
    #[serde(with = "crate::duration")]
    pub shutdown_timeout: Duration,
    /// Client sessions at once, counted from the end of their startup (authentication done,
    /// first ReadyForQuery); more are refused. Default 10000; must be > 0.
    pub max_clients: usize,
    /// Connections still in startup at once (TLS handshake, startup packet, authentication),
    /// counted apart from `max_clients`, so connections that never finish startup cannot take
    /// the slots of authenticated clients; more are refused at once. Default 2000; must be > 0.
    ///
    /// A connection in startup costs a socket and a small task, and once its StartupMessage
    /// is in, a PostgreSQL backend; a server admits a few hundred of those at once, so 2000
    /// leaves room for a whole fleet reconnecting while bounding a flood of silent sockets.
    pub max_startup_clients: usize,
    /// Idle time on a client connection before TCP keepalive probes start. A client host that
    /// vanished (power loss, network cut) sends no FIN; keepalive is how its session is
    /// noticed as lost, so the guard can release its locks. Default 10s; must be > 0.
    #[serde(with = "crate::duration")]
    pub client_keepalive_idle: Duration,
    /// Time between keepalive probes. Default 5s; must be > 0.
    #[serde(with = "crate::duration")]
    pub client_keepalive_interval: Duration,
    /// Unanswered probes before the connection counts as dead. Default 3; must be > 0.
    pub client_keepalive_count: u32,
    /// Data sent to the client and unacknowledged this long breaks the connection
    /// (TCP_USER_TIMEOUT, Linux). Default 30s; 0 = the kernel's default.
    #[serde(with = "crate::duration")]
    pub client_user_timeout: Duration,
    /// Threads that forward steady sessions (plain TCP or unix sockets, past startup) in an
    /// `epoll` loop of their own, which costs less CPU per round trip than the async runtime's
    /// tasks. Unset: one on up to two cores, else one per core; 0: the async runtime forwards
    /// everything. Read at start; RELOAD does not change it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarding_threads: Option<usize>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 6432)),
            upstream: Upstream::default(),
            connect_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            max_clients: 10_000,
            max_startup_clients: 2_000,
            client_keepalive_idle: Duration::from_secs(10),
            client_keepalive_interval: Duration::from_secs(5),
            client_keepalive_count: 3,
            client_user_timeout: Duration::from_secs(30),
            forwarding_threads: None,
        }
    }
}

/// Log line format, chosen by whoever collects the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[log]`: what the proxy logs and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Output format. Default `text`.
    pub format: LogFormat,
    /// A `tracing` EnvFilter directive such as `info,lockguard=debug`. Default `info`;
    /// must not be empty.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// What the guard does about a session whose client has gone away while it holds locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientLossAction {
    /// Terminate the orphaned backend so its locks are released.
    #[default]
    Terminate,
    /// Only log (and audit) it; useful while gaining confidence.
    Log,
}

/// `[guard]`: the watcher that finds and ends orphaned lock-holding sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// libpq-style `key=value` connection string of the guard's own role; `None` disables the
    /// guard (the proxy then only forwards).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsn: Option<String>,
    /// Name of an environment variable holding the guard role's password, so the secret stays
    /// out of the file. Read by the guard, not here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Tables whose locks matter, as [`TablePattern`] strings. Empty means no table is
    /// protected, and the guard acts on nothing. Use [`GuardConfig::table_patterns`] to get them parsed.
    pub protected_tables: Vec<String>,
    /// What to do when a client disappears. Default `terminate`.
    pub on_client_loss: ClientLossAction,
    /// Time a statement that was in flight when the client vanished may still finish before
    /// the session counts as orphaned. Default 1s.
    #[serde(with = "crate::duration")]
    pub inflight_grace: Duration,
    /// End sessions idle inside a transaction longer than this. Default 60s; 0 = off.
    #[serde(with = "crate::duration")]
    pub idle_in_transaction_timeout: Duration,
    /// End sessions sitting in a failed (aborted) transaction longer than this. Default 10s;
    /// 0 = off.
    #[serde(with = "crate::duration")]
    pub failed_transaction_timeout: Duration,
    /// Act only when another session is actually waiting on the held lock. Default false.
    pub require_waiters: bool,
    /// How often the guard scans for victims. Default 1s; must be > 0.
    #[serde(with = "crate::duration")]
    pub sweep_interval: Duration,
    /// Decide and log, but never terminate anything. Default false.
    pub dry_run: bool,
    /// JSON-lines file recording every decision; `None` = no audit file.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_path")]
    pub audit_log: Option<PathBuf>,
    /// Query run over the guard's connection to fetch a user's stored password secret
    /// (`$1` = user name; one row, one text column in `pg_authid.rolpassword` form). Used
    /// only for a SCRAM client on TLS when the upstream is TLS too: such a client sends a
    /// channel-binding flag that PostgreSQL rejects across a TLS-terminating proxy, so lockguard
    /// checks the client's proof itself and logs in upstream with the key it proves.
    pub auth_query: String,
    /// `[[guard.rules]]`: per-table policies, matched in file order before the flat keys
    /// above, which act as the last, catch-all rule (see [`GuardConfig::effective_rules`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<crate::rules::GuardRule>,
}

/// Calls the lookup function `config/guard-setup.sql` creates (`lockguard setup-sql`): a
/// `SECURITY DEFINER` function owned by a superuser that returns a role's SCRAM secret, so the
/// guard role itself never needs to read `pg_authid`. Schema and argument type are spelled out:
/// the query runs with the guard's rights and must resolve to exactly that function.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT lockguard.scram_verifier($1::pg_catalog.text)";

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            dsn: None,
            password_env: None,
            protected_tables: Vec::new(),
            on_client_loss: ClientLossAction::Terminate,
            inflight_grace: Duration::from_secs(1),
            idle_in_transaction_timeout: Duration::from_secs(60),
            failed_transaction_timeout: Duration::from_secs(10),
            require_waiters: false,
            sweep_interval: Duration::from_secs(1),
            dry_run: false,
            audit_log: None,
            auth_query: DEFAULT_AUTH_QUERY.to_owned(),
            rules: Vec::new(),
        }
    }
}

/// Paths from the file are UTF-8; one set in code may not be, and printing it must not fail.
fn lossy_path<S: serde::Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match path {
        Some(p) => s.serialize_str(&p.to_string_lossy()),
        None => s.serialize_none(),
    }
}

impl GuardConfig {
    /// The guard role's password from `password_env`, when that is set: `Ok(None)` without
    /// it. An unset or empty variable is an error naming it.
    pub fn resolve_password(&self) -> Result<Option<String>, String> {
        match &self.password_env {
            Some(var) => secret_from_env(var, "guard.password_env").map(Some),
            None => Ok(None),
        }
    }

    /// The protected tables, parsed. Entries that do not parse are skipped; a validated config
    /// (anything from [`crate::Config::load`] or [`crate::Config::from_toml_str`]) has none.
    pub fn table_patterns(&self) -> Vec<TablePattern> {
        self.protected_tables
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Whether the guard should run at all.
    pub fn enabled(&self) -> bool {
        self.dsn.is_some()
    }
}

/// Whether clients must use TLS (when lockguard has a certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    /// TLS when the client asks for it, plaintext otherwise.
    #[default]
    Allow,
    /// Plaintext clients are refused (FATAL 28000).
    Require,
}

/// TLS towards PostgreSQL, named like libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    /// Plaintext.
    #[default]
    Disable,
    /// TLS if the server offers it, without certificate checks; plaintext otherwise.
    Prefer,
    /// TLS or fail, without certificate checks.
    Require,
    /// TLS with a certificate signed by `upstream_ca`; the host name is not checked.
    VerifyCa,
    /// TLS with a certificate signed by `upstream_ca` and naming the upstream host.
    VerifyFull,
}

/// How lockguard starts TLS with PostgreSQL, named like libpq's `sslnegotiation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamNegotiation {
    /// An SSLRequest first, then the handshake if the server answers 'S' (every version).
    #[default]
    Postgres,
    /// The TLS handshake straight away, with ALPN `postgresql` (PostgreSQL 17 and later):
    /// one round trip less per connection. Needs `upstream_mode` `require` or stronger.
    Direct,
}

/// `[tls]`: encryption on the client side and towards PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain lockguard presents to clients; with `client_key`, enables TLS
    /// for clients (SSLRequest is answered 'S').
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_path")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_path")]
    pub client_key: Option<PathBuf>,
    /// `allow` (default) or `require`.
    pub client_mode: ClientTlsMode,
    /// `disable` (default), `prefer`, `require`, `verify-ca`, `verify-full`.
    pub upstream_mode: UpstreamTlsMode,
    /// `postgres` (default: SSLRequest first) or `direct` (TLS at once; servers >= 17).
    pub upstream_negotiation: UpstreamNegotiation,
    /// PEM CA certificate(s) the upstream's certificate must chain to (verify-ca/verify-full).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_path")]
    pub upstream_ca: Option<PathBuf>,
    /// PEM client certificate lockguard presents to PostgreSQL, if the server wants one.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_path")]
    pub upstream_cert: Option<PathBuf>,
    /// PEM private key of `upstream_cert`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_path")]
    pub upstream_key: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether lockguard accepts TLS from clients.
    pub fn serves_clients(&self) -> bool {
        self.client_cert.is_some() && self.client_key.is_some()
    }
}

/// What an admin-console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminRole {
    /// Every command: SHOW, KILL, RELOAD, SET.
    Admin,
    /// Read-only: SHOW commands only.
    #[default]
    Monitor,
}

impl AdminRole {
    /// The name used in the config file and in the console's output.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Admin => "admin",
            AdminRole::Monitor => "monitor",
        }
    }
}

/// How console users prove their password on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AdminAuthMethod {
    /// SCRAM-SHA-256 (what PostgreSQL uses by default since 14).
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// MD5 challenge-response, for old clients.
    #[serde(rename = "md5")]
    Md5,
}

/// One `[[admin.users]]` entry: a console login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminUser {
    /// Login name (the `user` of the connection string).
    pub name: String,
    /// The password, in the file. Exactly one of `password` and `password_env` is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Name of an environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// `admin` or `monitor`. Default `monitor`.
    #[serde(default)]
    pub role: AdminRole,
}

impl AdminUser {
    /// The password, reading `password_env` if that is how it is given. An empty password
    /// is an error (it would let anyone in). Errors name the variable, never the value.
    pub fn resolve_password(&self) -> Result<String, String> {
        let what = || format!("password_env of admin user {:?}", self.name);
        match (&self.password, &self.password_env) {
            (Some(p), _) if is_empty_secret(p) => Err(format!(
                "the password of admin user {:?} is empty",
                self.name
            )),
            (Some(p), _) => Ok(p.clone()),
            (None, Some(var)) => secret_from_env(var, &what()),
            (None, None) => Err(format!("admin user {:?} has no password", self.name)),
        }
    }
}

/// Whether a secret counts as empty: nothing, or only white space (a variable filled from a
/// file often ends with a newline).
pub(crate) fn is_empty_secret(value: &str) -> bool {
    value.trim().is_empty()
}

/// The non-empty value of environment variable `var`; `what` names the key that names it.
pub(crate) fn secret_from_env(var: &str, what: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(value) if is_empty_secret(&value) => Err(format!(
            "environment variable {var} ({what}) is empty; an empty secret is refused"
        )),
        Ok(value) => Ok(value),
        Err(std::env::VarError::NotPresent) => {
            Err(format!("environment variable {var} ({what}) is not set"))
        }
        Err(std::env::VarError::NotUnicode(_)) => Err(format!(
            "environment variable {var} ({what}) is not valid UTF-8"
        )),
    }
}

/// `[admin]`: the operator's console (PostgreSQL protocol, for `psql`) and the HTTP endpoint
/// (Prometheus metrics, health probes, JSON API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin console. Default `127.0.0.1:6433`. The console starts only when
    /// `users` is not empty, or `trust_loopback` is on.
    pub listen: SocketAddr,
    /// Allow password-less console logins, as role `admin`; a listed user still needs their
    /// password. Only valid when `listen` is a loopback address. Default false.
    pub trust_loopback: bool,
    /// `scram-sha-256` (default) or `md5`.
    pub auth_method: AdminAuthMethod,
    /// Whether the HTTP endpoint runs. Default true.
    pub http_enabled: bool,
    /// Address of the HTTP endpoint. Default `127.0.0.1:9930`.
    pub http_listen: SocketAddr,
    /// Bearer token for the HTTP API (`/api/...`). Without one, the API is read-only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token: Option<String>,
    /// Name of an environment variable holding the API token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token_env: Option<String>,
    /// Refuse console logins that do not use TLS (FATAL 28000). Required when `listen` is
    /// not a loopback address; needs a certificate (`tls_cert`/`tls_key`, or `[tls]`
    /// `client_cert`/`client_key`). Default false.
    pub require_tls: bool,
    /// PEM certificate chain of the console; with `tls_key`, the console answers SSLRequest
    /// with it. Without them it uses `[tls]` `client_cert`/`client_key`, when set.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_path")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_path")]
    pub tls_key: Option<PathBuf>,
    /// Console logins (`[[admin.users]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<AdminUser>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 6433)),
            trust_loopback: false,
            auth_method: AdminAuthMethod::ScramSha256,
            http_enabled: true,
            http_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9930)),
            api_token: None,
            api_token_env: None,
            require_tls: false,
            tls_cert: None,
            tls_key: None,
            users: Vec::new(),
        }
    }
}

impl AdminConfig {
    /// Whether the console should start: someone can log in.
    pub fn console_enabled(&self) -> bool {
        !self.users.is_empty() || self.trust_loopback
    }

    /// The API token, reading `api_token_env` if that is how it is given; `Ok(None)` when no
    /// token is configured. An empty token is an error. Errors name the variable, never the
    /// value.
    pub fn resolve_api_token(&self) -> Result<Option<String>, String> {
        match (&self.api_token, &self.api_token_env) {
            (Some(t), _) if is_empty_secret(t) => Err("admin.api_token is empty".to_owned()),
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(var)) => secret_from_env(var, "admin.api_token_env").map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The console's own certificate and key, when both are set.
    pub fn own_tls(&self) -> Option<(&PathBuf, &PathBuf)> {
        self.tls_cert.as_ref().zip(self.tls_key.as_ref())
    }
}
