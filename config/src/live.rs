//! The configuration in force while lockguard runs: one [`Live`] handle shared by everything
//! that reads settings (the listener, the client tasks, the admin front ends, the guard), and
//! [`Derived`] views computed from it on demand.
//!
//! Readers load a snapshot (an `Arc<Config>`) without locking; a change stores a whole new
//! configuration, so a reader sees either the old one or the new one, never a mix. Load once
//! per connection or per decision, not per message.

use std::fmt;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::Config;

/// The configuration in force. Share it as `Arc<Live>`.
pub struct Live {
    current: ArcSwap<Config>,
}

impl Live {
    /// A handle whose configuration in force is `config`.
    pub fn new(config: Config) -> Live {
        Live {
            current: ArcSwap::from_pointee(config),
        }
    }

    /// The configuration in force now (a snapshot: later changes do not alter it).
    pub fn load(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Puts `config` in force; returns the snapshot now in force.
    pub fn store(&self, config: Config) -> Arc<Config> {
        let config = Arc::new(config);
        self.current.store(Arc::clone(&config));
        config
    }

    /// Puts `change(current)` in force, retrying if another change got in between, and
    /// returns the snapshots before and after. `change` may run more than once.
    pub fn update(&self, change: impl Fn(&Config) -> Config) -> (Arc<Config>, Arc<Config>) {
        let mut next = None;
        let previous = self.current.rcu(|current| {
            let config = Arc::new(change(current));
            next = Some(Arc::clone(&config));
            config
        });
        let next = next.unwrap_or_else(|| Arc::clone(&previous));
        (previous, next)
    }
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live")
            .field("current", &self.current.load())
            .finish()
    }
}

/// A view computed from the configuration in force (parsed patterns, rules, ...), kept until
/// the configuration changes: [`Derived::get`] recomputes it when the snapshot in force is
/// not the one it was computed from (compared by pointer; the cache keeps that snapshot
/// alive, so its address cannot be reused by a newer one). A view is therefore never stored
/// on its own and cannot disagree with the configuration for longer than it takes to read.
pub struct Derived<T> {
    derive: fn(&Config) -> T,
    cache: ArcSwapOption<(Arc<Config>, Arc<T>)>,
}

impl<T> Derived<T> {
    /// A view computed by `derive`.
    pub fn new(derive: fn(&Config) -> T) -> Derived<T> {
        Derived {
            derive,
            cache: ArcSwapOption::empty(),
        }
    }

    /// The view of the configuration in force in `live`, and whether it was computed afresh
    /// (the configuration changed since the last call).
    pub fn get(&self, live: &Live) -> (Arc<T>, bool) {
        let config = live.load();
        if let Some(cached) = &*self.cache.load() {
            if Arc::ptr_eq(&cached.0, &config) {
                return (Arc::clone(&cached.1), false);
            }
        }
        let view = Arc::new((self.derive)(&config));
        self.cache
            .store(Some(Arc::new((config, Arc::clone(&view)))));
        (view, true)
    }
}

impl<T: fmt::Debug> fmt::Debug for Derived<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cached = self.cache.load();
        f.debug_struct("Derived")
            .field("view", &cached.as_ref().map(|c| &c.1))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_view_follows_every_change_and_is_reused_in_between() {
        let live = Live::new(Config::default());
        let dry_run = Derived::new(|c: &Config| c.guard.dry_run);
        assert_eq!(dry_run.get(&live), (Arc::new(false), true));
        assert_eq!(dry_run.get(&live), (Arc::new(false), false), "cached");
        let (before, after) = live.update(|c| {
            let mut next = c.clone();
            next.guard.dry_run = true;
            next
        });
        assert!(!before.guard.dry_run && after.guard.dry_run);
        assert!(Arc::ptr_eq(&after, &live.load()));
        assert_eq!(dry_run.get(&live), (Arc::new(true), true));
        // An equal configuration stored anew is a new snapshot: recomputed, same value.
        live.store(Config::clone(&live.load()));
        assert_eq!(dry_run.get(&live), (Arc::new(true), true));
        assert_eq!(dry_run.get(&live), (Arc::new(true), false));
    }
}
