//! Settings given outside the file (the command line and its environment variables), each
//! replacing the file's value. RELOAD re-reads the file and applies the same overrides again,
//! so they keep winning over it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::{Config, ConfigError, LogFormat, Upstream};

/// Values that replace the file's; `None` (and `dry_run: false`) leaves the file's setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `proxy.listen`.
    pub listen: Option<SocketAddr>,
    /// `proxy.upstream`.
    pub upstream: Option<Upstream>,
    /// `log.format`.
    pub log_format: Option<LogFormat>,
    /// `log.level`.
    pub log_level: Option<String>,
    /// `guard.dsn`.
    pub guard_dsn: Option<String>,
    /// `guard.protected_tables`, the whole list.
    pub protected_tables: Option<Vec<String>>,
    /// `guard.idle_in_transaction_timeout`.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// `guard.failed_transaction_timeout`.
    pub failed_transaction_timeout: Option<Duration>,
    /// `guard.dry_run = true`; false leaves the file's setting (a flag can only switch it on).
    pub dry_run: bool,
    /// `admin.listen`.
    pub admin_listen: Option<SocketAddr>,
    /// `admin.http_listen`.
    pub admin_http_listen: Option<SocketAddr>,
}

impl Overrides {
    /// Reads `file` ([`Config::load`]; the defaults without one), applies the overrides and
    /// validates the result: the configuration the proxy starts with and RELOAD re-reads.
    pub fn load(&self, file: Option<&Path>) -> Result<Config, ConfigError> {
        let config = match file {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        self.apply(config)
    }

    /// Applies the overrides to `config` and validates the result.
    pub fn apply(&self, mut config: Config) -> Result<Config, ConfigError> {
        if let Some(listen) = self.listen {
            config.proxy.listen = listen;
        }
        if let Some(upstream) = &self.upstream {
            config.proxy.upstream = upstream.clone();
        }
        if let Some(format) = self.log_format {
            config.log.format = format;
        }
        if let Some(level) = &self.log_level {
            config.log.level = level.clone();
        }
        if let Some(dsn) = &self.guard_dsn {
            config.guard.dsn = Some(dsn.clone());
        }
        if let Some(tables) = &self.protected_tables {
            config.guard.protected_tables = tables.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_the_files_values_and_leave_the_rest() {
        let file = Config::from_toml_str(
            "[guard]\nprotected_tables = [\"a.b\"]\ndry_run = true\n[log]\nlevel = \"debug\"\n",
        )
        .unwrap();
        let overrides = Overrides {
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            protected_tables: Some(vec!["c.*".to_owned()]),
            log_format: Some(LogFormat::Json),
            ..Overrides::default()
        };
        let config = overrides.apply(file.clone()).unwrap();
        assert_eq!(config.proxy.listen, overrides.listen.unwrap());
        assert_eq!(config.guard.protected_tables, ["c.*"]);
        assert_eq!(config.log.format, LogFormat::Json);
        // Not overridden: the file's values stay (dry_run false does not switch it off).
        assert_eq!(config.log.level, "debug");
        assert!(config.guard.dry_run);
        assert_eq!(Overrides::default().apply(file.clone()).unwrap(), file);
    }

    #[test]
    fn an_override_that_breaks_validation_is_an_error() {
        let overrides = Overrides {
            log_level: Some(String::new()),
            ..Overrides::default()
        };
        assert!(overrides.apply(Config::default()).is_err());
    }
}
