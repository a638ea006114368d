//! The operator's port: a PostgreSQL-protocol console for `psql` ([`console`]) and an HTTP
//! endpoint for Prometheus, health probes and scripts ([`http`]). Both are thin: they parse
//! their protocol and call the one command layer, [`Admin`] ([`commands`]), so every answer
//! and every action exists once.
//!
//! - [`accept`]: how many connections each front end serves at once, and the turn-away;
//! - [`commands`]: the commands, their result tables and the actions (kill, ...);
//! - [`reload`]: RELOAD and SIGHUP;
//! - [`config_view`]: the running configuration as key/value rows, secrets masked, and what
//!   a RELOAD may change live;
//! - [`auth`]: SCRAM-SHA-256 and MD5 password checks for the console;
//! - [`framing`]: the length limits on what a console client sends;
//! - [`metrics`]: the Prometheus text rendering;
//! - [`probes`]: the readers' lock probes, shared and rate-limited per database;
//! - [`locks_view`]: the wait-for graph behind `GET /api/locks`;
//! - [`ui`]: the web page over the HTTP API.

pub mod accept;
pub mod auth;
pub mod commands;
pub mod config_view;
pub mod console;
pub mod framing;
pub mod http;
pub mod locks_view;
pub mod metrics;
pub mod probes;
pub mod reload;
pub mod ui;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use guard_core::Registry;
use lockguard_config::{AdminConfig, AdminRole, Config, ConfigError, Overrides};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::shared::InForce;
use crate::stats::ProxyStats;
use crate::GuardHandle;

pub use commands::{AdminError, Command, KillTarget, Table};

/// Where RELOAD (and SIGHUP) read the configuration from: the file given at start and the
/// command-line flags given at start, which keep overriding the file.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The `--config` file; without one, RELOAD has nothing to re-read and says so.
    pub path: Option<PathBuf>,
    /// The flags given at start.
    pub overrides: Overrides,
}

impl ConfigSource {
    /// Reads the file again and applies the flags, validating the result.
    pub fn load(&self) -> Result<Config, ConfigError> {
        self.overrides.load(self.path.as_deref())
    }
}

/// Changes the process's log filter (installed by `main`, which owns the subscriber).
pub type LogReloader = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Which front end a command came through (for logs and the audit trail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Console,
    Http,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Console => "admin console",
            Origin::Http => "HTTP API",
        })
    }
}

/// Who runs a command: a console user, or the holder of the HTTP API token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub role: AdminRole,
    pub origin: Origin,
}

impl Login {
    /// A console user.
    pub fn console(user: &str, role: AdminRole) -> Login {
        Login {
            user: user.to_owned(),
            role,
            origin: Origin::Console,
        }
    }

    /// A request that presented the HTTP API token.
    pub fn http_token() -> Login {
        Login {
            user: "api_token".to_owned(),
            role: AdminRole::Admin,
            origin: Origin::Http,
        }
    }
}

/// Console passwords and the API token, resolved from `[admin]` (environment variables
/// read): a view of the configuration in force, replaced with it.
#[derive(Debug, Default)]
pub struct Credentials {
    users: HashMap<String, (String, AdminRole)>,
    api_token: Option<String>,
}

impl Credentials {
    /// Resolves passwords and the token; errors name the missing variable.
    pub fn resolve(admin: &AdminConfig) -> Result<Credentials, String> {
        let mut users = HashMap::new();
        for user in &admin.users {
            users.insert(user.name.clone(), (user.resolve_password()?, user.role));
        }
        Ok(Credentials {
            users,
            api_token: admin.resolve_api_token()?,
        })
    }

    /// The password and login of `user`, if listed.
    pub fn user(&self, user: &str) -> Option<(String, Login)> {
        self.users
            .get(user)
            .map(|(password, role)| (password.clone(), Login::console(user, *role)))
    }

    /// The configured HTTP API token.
    pub fn api_token(&self) -> Option<&str> {
        self.api_token.as_deref()
    }
}

/// The admin command layer: everything the console and the HTTP endpoint can show or do.
/// Built by [`crate::Proxy::bind`]; shared by both front ends and by `main` (SIGHUP).
pub struct Admin {
    registry: Arc<Registry>,
    guard: Option<GuardHandle>,
    stats: Arc<ProxyStats>,
    /// The configuration in force (the start configuration with every live change, RELOAD
    /// and `SET dry_run`, applied) and its views: the one the proxy and the guard read too.
    in_force: Arc<InForce>,
    /// Where RELOAD reads the configuration from; `None` when built from a `Config` alone.
    source: Option<ConfigSource>,
    log_reloader: std::sync::Mutex<Option<LogReloader>>,
    /// One RELOAD at a time.
    reload_lock: tokio::sync::Mutex<()>,
    /// The readers' probes, shared so that a flood of them cannot crowd out the guard.
    probes: probes::ProbeGates,
    /// The wait-for graph reads of `GET /api/locks`, shared the same way.
    wait_graphs: locks_view::GraphGates,
    /// The last readiness check and when it started; see [`Admin::readiness`].
    last_readiness: tokio::sync::Mutex<Option<(tokio::time::Instant, commands::Readiness)>>,
}

impl Admin {
    /// The command layer over a proxy's state.
    pub(crate) fn new(
        in_force: Arc<InForce>,
        source: Option<ConfigSource>,
        registry: Arc<Registry>,
        guard: Option<GuardHandle>,
        stats: Arc<ProxyStats>,
    ) -> Admin {
        Admin {
            registry,
            guard,
            stats,
            in_force,
            source,
            log_reloader: std::sync::Mutex::new(None),
            reload_lock: tokio::sync::Mutex::new(()),
            probes: probes::ProbeGates::default(),
            wait_graphs: locks_view::GraphGates::default(),
            last_readiness: tokio::sync::Mutex::new(None),
        }
    }

    /// Lets RELOAD change the log filter.
    pub fn set_log_reloader(&self, reloader: LogReloader) {
        *self.lock_reloader() = Some(reloader);
    }

    fn lock_reloader(&self) -> std::sync::MutexGuard<'_, Option<LogReloader>> {
        match self.log_reloader.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.in_force.config()
    }

    /// Console passwords and the API token in force.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.in_force.credentials()
    }

    /// All live sessions.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The guard, when configured.
    pub fn guard(&self) -> Option<&GuardHandle> {
        self.guard.as_ref()
    }

    /// What the console answers an SSLRequest with: its own certificate, else the client
    /// side's, else nothing (the request is declined).
    pub fn console_tls_acceptor(&self) -> Option<TlsAcceptor> {
        self.in_force.tls().console_acceptor()
    }
}

/// The bound admin sockets of a proxy, not yet serving.
pub(crate) struct AdminListeners {
    pub console: Option<TcpListener>,
    pub http: Option<TcpListener>,
}

impl AdminListeners {
    /// Binds what `[admin]` asks for. The console is skipped (with a log line saying why)
    /// when nobody could log in; a bind failure is an error, like the proxy's own listener.
    pub async fn bind(admin: &AdminConfig) -> anyhow::Result<AdminListeners> {
        let console = if admin.console_enabled() {
            Some(
                TcpListener::bind(admin.listen).await.with_context(|| {
                    format!("could not listen on admin.listen {}", admin.listen)
                })?,
            )
        } else {
            // The default configuration: worth a line, not a warning.
            info!(
                listen = %admin.listen,
                "admin console disabled: no [[admin.users]] configured and trust_loopback is off"
            );
            None
        };
        let http = if admin.http_enabled {
            Some(
                TcpListener::bind(admin.http_listen)
                    .await
                    .with_context(|| {
                        format!(
                            "could not listen on admin.http_listen {}",
                            admin.http_listen
                        )
                    })?,
            )
        } else {
            None
        };
        Ok(AdminListeners { console, http })
    }

    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves both until `stop` is cancelled.
    pub async fn serve(self, admin: Arc<Admin>, stop: CancellationToken) {
        let mut tasks = Vec::new();
        if let Some(listener) = self.console {
            if let Ok(addr) = listener.local_addr() {
                info!(listen = %addr, "admin console is accepting connections");
            }
            tasks.push(tokio::spawn(console::serve(
                listener,
                Arc::clone(&admin),
                stop.clone(),
            )));
        }
        if let Some(listener) = self.http {
            if let Ok(addr) = listener.local_addr() {
                info!(listen = %addr, "admin HTTP endpoint is accepting connections");
            }
            tasks.push(tokio::spawn(http::serve(
                listener,
                Arc::clone(&admin),
                stop.clone(),
            )));
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}
