//! Probes for the admin readers (`SHOW CLIENTS`, `SHOW LOCKS`, `GET /api/clients`), shared
//! and rate-limited.
//!
//! A probe is a `pg_locks` round trip over the guard's single connection to a database, the
//! connection its kills also use, and the HTTP readers need no password when no API token is
//! set. So per database there is one probe at a time, started at most once every
//! [`MIN_PROBE_INTERVAL`], and every reader waiting shares the next probe's answer: a flood of
//! readers costs a few probes a second, never a queue of probes ahead of a kill.
//!
//! A reader is only ever given a probe that started after it asked, so an answer is never
//! older than its request (an operator who takes a lock and then runs `SHOW LOCKS` sees it);
//! the price under load is a wait of up to one interval.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use guard_core::{BackendFacts, Guard, Registry};
use tokio::time::Instant;

/// Shortest time between the starts of two probes of one database for the admin readers.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// Live facts of backends, by pid.
pub type Probed = HashMap<i32, BackendFacts>;

/// One gate per database a proxied session uses.
#[derive(Default)]
pub struct ProbeGates {
    gates: std::sync::Mutex<HashMap<String, Arc<Gate>>>,
}

/// A database's last probe; its lock is held while a probe runs, so waiters queue (tokio's
/// mutex is fair) and then find the probe they can share.
#[derive(Default)]
struct Gate {
    last: tokio::sync::Mutex<Option<Probe>>,
}

struct Probe {
    started: Instant,
    facts: Arc<Probed>,
}

impl ProbeGates {
    /// The facts of every live session's backend in `database`, from a probe that started
    /// after this call. A probe that fails answers empty (the readers show NULL), and counts
    /// against the rate like any other.
    pub async fn probe(&self, guard: &Guard, registry: &Registry, database: &str) -> Arc<Probed> {
        let asked = Instant::now();
        let gate = self.gate(database);
        let mut last = gate.last.lock().await;
        if let Some(probe) = last.as_ref() {
            if probe.started >= asked {
                return Arc::clone(&probe.facts);
            }
            tokio::time::sleep_until(probe.started + MIN_PROBE_INTERVAL).await;
        }
        let started = Instant::now();
        // Everyone waiting behind this probe asked before it started: cover every session
        // of the database as it is now, whichever sessions they saw.
        let pids: Vec<i32> = registry
            .snapshot()
            .iter()
            .filter(|s| s.client.database == database)
            .filter_map(|s| s.backend_pid())
            .collect();
        let facts = if pids.is_empty() {
            Probed::new()
        } else {
            guard.probe(database, &pids).await.unwrap_or_else(|e| {
                tracing::debug!(database, error = %e, "admin probe failed");
                Probed::new()
            })
        };
        let facts = Arc::new(facts);
        *last = Some(Probe {
            started,
            facts: Arc::clone(&facts),
        });
        facts
    }

    /// Forgets the gates of databases no session uses any more (none is in use by a reader).
    pub fn retain(&self, in_use: &HashSet<&str>) {
        self.lock().retain(|database, gate| {
            in_use.contains(database.as_str()) || Arc::strong_count(gate) > 1
        });
    }

    fn gate(&self, database: &str) -> Arc<Gate> {
        let mut gates = self.lock();
        Arc::clone(gates.entry(database.to_owned()).or_default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Gate>>> {
        match self.gates.lock() {
            Ok(gates) => gates,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}
