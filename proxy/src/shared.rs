//! What the listener hands every client task: the configuration, the limits, the guard, the
//! stop signals and the counters.

use std::sync::Arc;
use std::time::Duration;

use guard_core::{Guard, Registry};
use lockguard_config::ProxyConfig;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::stats::ProxyStats;
use crate::tls::Tls;

/// What every client task shares with the listener.
pub(crate) struct Shared {
    pub proxy: ProxyConfig,
    pub inflight_grace: Duration,
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
    pub tls: Arc<Tls>,
}

/// The guard as the proxy holds it.
pub type GuardHandle = Arc<Guard>;
