//! RELOAD (and SIGHUP): re-read the configuration file and apply what can change without a
//! restart, keeping every session. All checks that can fail run before anything changes, so a
//! bad file leaves the running configuration exactly as it was.

use std::collections::BTreeSet;
use std::sync::Arc;

use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use super::commands::{AdminError, ConfigChange};
use super::config_view;
use super::{Admin, Credentials};

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

        let running = self.config();
        let next = config_view::apply_live(&running, &file);
        // Everything fallible first.
        let credentials = Credentials::resolve(&next.admin).map_err(AdminError::Reload)?;
        let log_filter_changed = next.log.level != running.log.level;
        if log_filter_changed {
            EnvFilter::try_new(&next.log.level)
                .map_err(|e| AdminError::Reload(format!("log.level {:?}: {e}", next.log.level)))?;
        }
        // Certificates are re-read even when their paths did not change: renewal replaces
        // the files in place. On error the old ones stay.
        let console_tls = super::load_console_tls(&next.admin)
            .map_err(|e| AdminError::Reload(format!("{e:#}")))?;
        self.tls
            .reload(&next.tls)
            .map_err(|e| AdminError::Reload(format!("{e:#}")))?;

        // Apply.
        if let Some(guard) = &self.guard {
            guard.reconfigure(&next.guard);
        }
        if log_filter_changed {
            if let Some(reloader) = self.lock_reloader().clone() {
                if let Err(e) = reloader(&next.log.level) {
                    warn!(error = %e, "could not change the log level");
                }
            }
        }
        self.credentials.store(Arc::new(credentials));
        self.console_tls.store(Arc::new(console_tls));
        let changes = changes(&running, &file);
        self.config.store(Arc::new(next));
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
