//! Command line: `lockguard [--config FILE] [flags]` runs the proxy, `lockguard check-config FILE`
//! prints the effective configuration. Flags override the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lockguard_config::{Config, ConfigError, LogFormat, Upstream};

#[derive(Debug, Parser)]
#[command(
    name = "lockguard",
    version,
    about = "PostgreSQL proxy that terminates orphaned, lock-holding sessions"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file (see config/lockguard.example.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: Overrides,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration file and print the effective configuration.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Play the orphaned-lock incident and its cure against a throwaway PostgreSQL.
    Demo {
        /// Afterwards keep PostgreSQL, lockguard and the admin console running (Ctrl-C stops).
        #[arg(long)]
        keep_running: bool,
        /// Never colour the output (also when NO_COLOR is set or stdout is not a terminal).
        #[arg(long)]
        no_color: bool,
    },
    /// Print the SQL that sets up the guard's role without superuser (pg_signal_backend,
    /// pg_read_all_stats, and a SECURITY DEFINER lookup of SCRAM secrets); run it as a
    /// superuser in the database guard.dsn names.
    SetupSql {
        /// The guard's login role (created if missing).
        #[arg(long, value_name = "NAME", default_value = guard_core::setup::DEFAULT_ROLE)]
        role: String,
        /// Schema of the lookup function (created if missing; must belong to a superuser).
        #[arg(long, value_name = "NAME", default_value = guard_core::setup::DEFAULT_SCHEMA)]
        schema: String,
    },
    /// The demo's crashing app process (started by `demo`).
    #[command(hide = true)]
    DemoApp {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        user_id: i32,
    },
}

/// Settings that may be given on the command line; each replaces the file's value (also on
/// RELOAD, which re-reads the file and applies these again).
#[derive(Debug, Clone, Default, Args)]
pub struct Overrides {
    /// Address clients connect to [default: 127.0.0.1:6432].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// PostgreSQL server: HOST:PORT, or a unix socket directory (/dir or /dir:PORT)
    /// [default: 127.0.0.1:5432].
    #[arg(long, value_name = "HOST:PORT|DIR")]
    pub upstream: Option<Upstream>,
    /// Log line format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormatArg>,
    /// Log filter, e.g. "info" or "info,lockguard=debug" [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Connection string of the guard's own role (enables the guard).
    #[arg(long, value_name = "DSN")]
    pub guard_dsn: Option<String>,
    /// Protected table pattern (schema.table, schema.*, *.table, table, *); repeatable.
    #[arg(long = "protect", value_name = "PATTERN")]
    pub protect: Vec<String>,
    /// Terminate lock-holding sessions idle in a transaction longer than this ("0" = off).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_in_transaction_timeout: Option<Duration>,
    /// Terminate lock-holding sessions idle in a failed transaction longer than this ("0" = off).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub failed_transaction_timeout: Option<Duration>,
    /// Decide and record, but never terminate anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Address of the admin console (psql) [default: 127.0.0.1:6433].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Address of the admin HTTP endpoint (metrics, health, API) [default: 127.0.0.1:9930].
    #[arg(long, value_name = "ADDR")]
    pub admin_http_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{e}; write it like \"10s\", \"500ms\" or \"1m\""))
}

impl Overrides {
    /// Applies the flags to `config` and validates the result.
    pub fn apply(&self, mut config: Config) -> Result<Config, ConfigError> {
        if let Some(listen) = self.listen {
            config.proxy.listen = listen;
        }
        if let Some(upstream) = &self.upstream {
            config.proxy.upstream = upstream.clone();
        }
        if let Some(format) = self.log_format {
            config.log.format = match format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
        if let Some(level) = &self.log_level {
            config.log.level = level.clone();
        }
        if let Some(dsn) = &self.guard_dsn {
            config.guard.dsn = Some(dsn.clone());
        }
        if !self.protect.is_empty() {
            config.guard.protected_tables = self.protect.clone();
        }
        if let Some(timeout) = self.idle_in_transaction_timeout {
            config.guard.idle_in_transaction_timeout = timeout;
        }
        if let Some(timeout) = self.failed_transaction_timeout {
            config.guard.failed_transaction_timeout = timeout;
        }
        if self.dry_run {
            config.guard.dry_run = true;
        }
        if let Some(listen) = self.admin_listen {
            config.admin.listen = listen;
        }
        if let Some(listen) = self.admin_http_listen {
            config.admin.http_listen = listen;
        }
        config.validate()?;
        Ok(config)
    }
}

/// Reads the file (if any) and applies the flags.
pub fn effective_config(
    file: Option<&std::path::Path>,
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let config = match file {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    overrides.apply(config)
}
