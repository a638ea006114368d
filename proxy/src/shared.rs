//! What the listener hands every client task (the configuration in force, the limits, the
//! guard, the stop signals and the counters), and [`InForce`]: the configuration in force,
//! the views derived from it, and the one function that changes it.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use arc_swap::ArcSwap;
use guard_core::{Guard, Registry};
use lockguard_config::{Config, GuardConfig, Live};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::admin::Credentials;
use crate::session::Forwarder;
use crate::stats::ProxyStats;
use crate::tls::{Tls, TlsState};

/// What every client task shares with the listener.
pub(crate) struct Shared {
    /// The configuration in force; a client task loads it once per use, never per message.
    pub in_force: Arc<InForce>,
    pub registry: Arc<Registry>,
    pub guard: Option<GuardHandle>,
    /// One permit per connection still in startup (`max_startup_clients`).
    pub startups: Arc<Semaphore>,
    /// One permit per client session past its startup (`max_clients`).
    pub clients: Arc<Semaphore>,
    /// Permits for connections being told the proxy is full.
    pub refusals: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    pub hard_stop: CancellationToken,
    pub stats: Arc<ProxyStats>,
    /// `in_force`'s TLS view (the same handle), named here for the client tasks.
    pub tls: Arc<Tls>,
    /// The threads that forward steady sessions; empty when the runtime forwards everything.
    pub forwarders: Vec<Forwarder>,
}

impl Shared {
    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.in_force.config()
    }

    /// The forwarding thread a session goes to when it is steady (sessions spread over the
    /// threads by id).
    pub fn forwarder_for(&self, session: u64) -> Option<Forwarder> {
        let n = u64::try_from(self.forwarders.len())
            .ok()
            .filter(|&n| n > 0)?;
        let index = usize::try_from(session % n).ok()?;
        self.forwarders.get(index).cloned()
    }
}

/// The guard as the proxy holds it.
pub type GuardHandle = Arc<Guard>;

/// The one configuration in force, read by the listener, the client tasks, the admin front
/// ends and the guard (which holds the same [`Live`] handle), with the views of it that take
/// files or the environment to compute: the TLS configurations and the console credentials.
/// The guard derives its own parsed rules from the configuration on its next read.
///
/// [`InForce::change`] is the only way to put a configuration in force: RELOAD and `SET
/// dry_run` both go through it, so the configuration and every view of it change together.
pub struct InForce {
    live: Arc<Live>,
    tls: Arc<Tls>,
    credentials: ArcSwap<Credentials>,
    /// One change at a time, so a change computed from the configuration in force is not
    /// lost to another one stored in between.
    changing: Mutex<()>,
}

/// A configuration with the views derived from it, every fallible step (certificate files,
/// password variables) already done: putting it in force cannot fail.
pub struct Prepared {
    config: Config,
    tls: TlsState,
    credentials: Credentials,
}

impl Prepared {
    /// Reads what `config` names: certificates (even from unchanged paths: renewal replaces
    /// the files in place) and the console's passwords and API token. Errors name the file
    /// or the variable.
    pub fn new(config: Config) -> anyhow::Result<Prepared> {
        let tls = TlsState::load(&config)?;
        let credentials = Credentials::resolve(&config.admin)
            .map_err(anyhow::Error::msg)
            .context("admin configuration")?;
        Ok(Prepared {
            config,
            tls,
            credentials,
        })
    }
}

/// What [`InForce::change`] puts in force.
pub enum Change {
    /// A whole new configuration, its views included.
    Whole(Box<Prepared>),
    /// A new `[guard]` section, the rest as it is: no view the proxy holds derives from it.
    Guard(Box<GuardConfig>),
    /// Nothing to change: the configuration in force stays the same snapshot, so nothing
    /// derived from it is computed again.
    Unchanged,
}

/// The configuration before and after a change.
pub struct Changed {
    pub before: Arc<Config>,
    pub after: Arc<Config>,
}

impl InForce {
    /// `start` in force.
    pub fn new(start: Prepared) -> InForce {
        InForce {
            live: Arc::new(Live::new(start.config)),
            tls: Arc::new(Tls::new(start.tls)),
            credentials: ArcSwap::from_pointee(start.credentials),
            changing: Mutex::new(()),
        }
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.live.load()
    }

    /// The handle the guard follows.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// The TLS view.
    pub fn tls(&self) -> &Arc<Tls> {
        &self.tls
    }

    /// Console passwords and the API token in force.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.credentials.load_full()
    }

    /// Puts in force what `change` makes of the configuration in force, or nothing if it
    /// fails. The views go in first, so whoever sees the new configuration finds its views.
    pub fn change<E>(
        &self,
        change: impl FnOnce(&Config) -> Result<Change, E>,
    ) -> Result<Changed, E> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.live.load();
        let next = match change(&before)? {
            Change::Unchanged => {
                return Ok(Changed {
                    after: Arc::clone(&before),
                    before,
                })
            }
            Change::Whole(prepared) => {
                let prepared = *prepared;
                self.tls.install(prepared.tls);
                self.credentials.store(Arc::new(prepared.credentials));
                prepared.config
            }
            Change::Guard(guard) => Config {
                guard: *guard,
                ..Config::clone(&before)
            },
        };
        let after = self.live.store(next);
        Ok(Changed { before, after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_change_that_succeeds_is_put_in_force_and_a_guard_change_keeps_the_views() {
        let in_force = InForce::new(Prepared::new(Config::default()).expect("defaults"));
        let start = in_force.config();
        let credentials = in_force.credentials();

        let refused = in_force.change(|_| Err::<Change, _>("refused"));
        assert!(refused.is_err());
        assert!(Arc::ptr_eq(&start, &in_force.config()), "nothing stored");

        let changed = in_force
            .change(|running| {
                Ok::<_, ()>(Change::Guard(Box::new(GuardConfig {
                    dry_run: true,
                    ..running.guard.clone()
                })))
            })
            .expect("a guard change");
        assert!(Arc::ptr_eq(&changed.before, &start));
        assert!(Arc::ptr_eq(&changed.after, &in_force.config()));
        assert!(in_force.config().guard.dry_run);
        assert_eq!(
            Config {
                guard: start.guard.clone(),
                ..Config::clone(&in_force.config())
            },
            *start,
            "only [guard] changed"
        );
        assert!(
            Arc::ptr_eq(&credentials, &in_force.credentials()),
            "views kept"
        );

        let same = in_force
            .change(|_| Ok::<_, ()>(Change::Unchanged))
            .expect("no change");
        assert!(Arc::ptr_eq(&same.before, &same.after));
        assert!(Arc::ptr_eq(&same.after, &in_force.config()));
    }
}
