//! RELOAD (and SIGHUP): re-read the configuration file and apply what can change without a
//! restart, keeping every session. All checks that can fail run before anything changes, so a
//! bad file leaves the running configuration exactly as it was.

use std::collections::BTreeSet;

use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use super::commands::{AdminError, ConfigChange};
use super::config_view;
use lockguard_config::Config;

use super::Admin;
use crate::shared::{Change, Prepared};

impl Admin {
    /// Re-reads the file given at start (with the start's command-line flags on top) and
    /// applies the live settings: protected tables, guard timeouts and rules, dry_run, log
    /// level, TLS certificates, console users and the API token. Returns every setting the
    /// file changed, each marked applied or needing a restart.
    pub async fn reload(&self) -> Result<Vec<ConfigChange>, AdminError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let source = match &self.source {
            Some(source) if source.path.is_some() => source.clone(),
            _ => {
                return Err(AdminError::Unavailable(
                    "lockguard was started without --config: there is no file to re-read"
                        .to_owned(),
                ))
            }
        };
        let loaded = tokio::task::spawn_blocking(move || source.load())
            .await
            .map_err(|e| AdminError::Reload(format!("reading the file failed: {e}")))?;
        let file = loaded.map_err(|e| AdminError::Reload(e.to_string()))?;
        self.apply_live(&file)
    }

    /// RELOAD with `file` instead of the configuration file: applies its live settings, the
    /// same way, in the same one change (for a proxy built from a `Config` in code, and
    /// for tests).
    pub async fn reload_with(&self, file: Config) -> Result<Vec<ConfigChange>, AdminError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        // Checked as a file is when it is read.
        file.validate()
            .and_then(|()| file.check_secrets())
            .map_err(|e| AdminError::Reload(e.to_string()))?;
        self.apply_live(&file)
    }

    fn apply_live(&self, file: &Config) -> Result<Vec<ConfigChange>, AdminError> {
        // Everything fallible runs inside the change, before anything is stored: the log
        // filter, the certificates and the console's credentials. A failure leaves
        // everything as it was.
        let changed = self.in_force.change(|running| {
            let next = config_view::apply_live(running, file);
            if next.log.level != running.log.level {
                EnvFilter::try_new(&next.log.level).map_err(|e| {
                    AdminError::Reload(format!("log.level {:?}: {e}", next.log.level))
                })?;
            }
            Prepared::new(next)
                .map(|prepared| Change::Whole(Box::new(prepared)))
                .map_err(|e| AdminError::Reload(format!("{e:#}")))
        })?;
        let (running, next) = (&changed.before, &changed.after);

        if self.guard.is_some() {
            info!(
                protected_tables = ?next.guard.protected_tables,
                dry_run = next.guard.dry_run,
                "guard settings reloaded"
            );
        }
        if next.log.level != running.log.level {
            if let Some(reloader) = self.lock_reloader().clone() {
                if let Err(e) = reloader(&next.log.level) {
                    warn!(error = %e, "could not change the log level");
                }
            }
        }
        let changes = changes(running, file);
        info!(
            applied = ?changes.iter().filter(|c| c.live).map(|c| c.key.as_str()).collect::<Vec<_>>(),
            needs_restart = ?changes.iter().filter(|c| !c.live).map(|c| c.key.as_str()).collect::<Vec<_>>(),
            "configuration reloaded (TLS certificates re-read)"
        );
        Ok(changes)
    }
}

/// The settings whose value in `file` differs from `running`, secrets compared in full but
/// shown masked.
fn changes(
    running: &lockguard_config::Config,
    file: &lockguard_config::Config,
) -> Vec<ConfigChange> {
    let (old_raw, new_raw) = (config_view::raw(running), config_view::raw(file));
    let (old_shown, new_shown) = (config_view::flatten(running), config_view::flatten(file));
    let keys: BTreeSet<&String> = old_raw.keys().chain(new_raw.keys()).collect();
    keys.into_iter()
        .filter(|key| old_raw.get(*key) != new_raw.get(*key))
        .map(|key| ConfigChange {
            key: key.clone(),
            old: old_shown.get(key).cloned(),
            new: new_shown.get(key).cloned(),
            live: config_view::is_live(key),
        })
        .collect()
}
