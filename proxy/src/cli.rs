//! Command line: `lockguard [--config FILE] [flags]` runs the proxy, `lockguard check-config FILE`
//! prints the effective configuration. Every flag has an environment variable
//! (`LOCKGUARD_LISTEN`, ...) because containers are configured through them: a flag beats its
//! variable, and both beat the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lockguard_config::{LogFormat, Overrides, Upstream};

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
    #[arg(long, value_name = "FILE", env = "LOCKGUARD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: OverrideFlags,
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
        overrides: OverrideFlags,
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
    /// Print a shell completion script, e.g. `lockguard completions bash >
    /// /usr/share/bash-completion/completions/lockguard`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `lockguard man > /usr/share/man/man1/lockguard.1`.
    Man {
        /// Instead, write lockguard.1 and a page per subcommand (lockguard-check-config.1, ...)
        /// into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// The command line as shells complete it. clap_complete offers hidden subcommands too, so this
/// rebuilds the top level with only the visible ones (`demo-app` is the demo's internal child).
pub fn completion_command() -> clap::Command {
    let full = <Cli as clap::CommandFactory>::command();
    let mut visible = clap::Command::new("lockguard")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = full.get_about() {
        visible = visible.about(about.clone());
    }
    visible
}

/// Settings that may be given on the command line; each replaces the file's value (also on
/// RELOAD, which re-reads the file and applies these again).
#[derive(Debug, Clone, Default, Args)]
pub struct OverrideFlags {
    /// Address clients connect to [default: 127.0.0.1:6432].
    #[arg(long, value_name = "ADDR", env = "LOCKGUARD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// PostgreSQL server: HOST:PORT, or a unix socket directory (/dir or /dir:PORT)
    /// [default: 127.0.0.1:5432].
    #[arg(long, value_name = "HOST:PORT|DIR", env = "LOCKGUARD_UPSTREAM")]
    pub upstream: Option<Upstream>,
    /// Log line format [default: text].
    #[arg(long, value_enum, env = "LOCKGUARD_LOG_FORMAT")]
    pub log_format: Option<LogFormatArg>,
    /// Log filter, e.g. "info" or "info,lockguard=debug" [default: info].
    #[arg(long, value_name = "FILTER", env = "LOCKGUARD_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Connection string of the guard's own role (enables the guard). --help never shows the
    /// variable's value: a DSN may carry a password.
    #[arg(
        long,
        value_name = "DSN",
        env = "LOCKGUARD_GUARD_DSN",
        hide_env_values = true
    )]
    pub guard_dsn: Option<String>,
    /// Protected table patterns (schema.table, schema.*, *.table, table, *); repeatable, and
    /// each value may list several separated by commas (the variable's way of giving more than
    /// one).
    #[arg(long = "protect", value_name = "PATTERN", env = "LOCKGUARD_PROTECT")]
    pub protect: Vec<String>,
    /// Terminate lock-holding sessions idle in a transaction longer than this ("0" = off).
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = parse_duration,
        env = "LOCKGUARD_IDLE_IN_TRANSACTION_TIMEOUT"
    )]
    pub idle_in_transaction_timeout: Option<Duration>,
    /// Terminate lock-holding sessions idle in a failed transaction longer than this ("0" = off).
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = parse_duration,
        env = "LOCKGUARD_FAILED_TRANSACTION_TIMEOUT"
    )]
    pub failed_transaction_timeout: Option<Duration>,
    /// Decide and record, but never terminate anything. The variable takes true/false, yes/no,
    /// on/off or 1/0; false leaves the file's setting.
    #[arg(
        long,
        env = "LOCKGUARD_DRY_RUN",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub dry_run: bool,
    /// Address of the admin console (psql) [default: 127.0.0.1:6433].
    #[arg(long, value_name = "ADDR", env = "LOCKGUARD_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Address of the admin HTTP endpoint (metrics, health, API) [default: 127.0.0.1:9930].
    #[arg(long, value_name = "ADDR", env = "LOCKGUARD_ADMIN_HTTP_LISTEN")]
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

/// Splits a comma-separated list of table patterns, leaving commas inside double-quoted
/// identifiers alone (an unquoted comma is never part of a pattern). Each piece is trimmed; an
/// empty one stays, for validation to reject.
fn split_list(list: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            // A doubled quote inside a quoted identifier toggles twice: still quoted.
            '"' => quoted = !quoted,
            ',' if !quoted => {
                pieces.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    pieces.push(&list[start..]);
    pieces.into_iter().map(|p| p.trim().to_owned()).collect()
}

impl OverrideFlags {
    /// The flags as the configuration's overrides (RELOAD applies them again).
    pub fn to_overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            upstream: self.upstream.clone(),
            log_format: self.log_format.map(|format| match format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            }),
            log_level: self.log_level.clone(),
            guard_dsn: self.guard_dsn.clone(),
            protected_tables: (!self.protect.is_empty())
                .then(|| self.protect.iter().flat_map(|v| split_list(v)).collect()),
            idle_in_transaction_timeout: self.idle_in_transaction_timeout,
            failed_transaction_timeout: self.failed_transaction_timeout,
            dry_run: self.dry_run,
            admin_listen: self.admin_listen,
            admin_http_listen: self.admin_http_listen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_list;

    #[test]
    fn a_pattern_list_splits_at_commas_outside_quotes() {
        assert_eq!(split_list("a.b, c.*"), ["a.b", "c.*"]);
        assert_eq!(
            split_list(r#""My, Schema"."a""b,c",d"#),
            [r#""My, Schema"."a""b,c""#, "d"]
        );
        assert_eq!(split_list("a.b,"), ["a.b", ""]);
    }
}
