//! lockguard: a PostgreSQL wire-protocol proxy that terminates orphaned, lock-holding sessions.
//!
//! The path of a byte, module by module:
//! - [`listener`] accepts a client (and owns the proxy's lifetime: bind, run, drain);
//! - [`client`] serves that connection: [`startup`] reads its first packets (with [`tls`]
//!   when the client asks), [`upstream`] connects to PostgreSQL, [`auth`] relays the
//!   authentication when the upstream is TLS; [`stream`] names the sockets involved;
//! - [`session`] pumps bytes both ways, with [`frame`] finding message boundaries and
//!   [`protocol`] naming the few messages lockguard reads or writes;
//! - the session's record lives in `guard_core`'s registry, where the guard watches it;
//! - [`admin`] is the operator's port: a psql console and HTTP metrics/health/API.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod client;
pub mod demo;
pub mod frame;
pub mod listener;
pub mod log_format;
pub mod net;
pub mod protocol;
pub mod sandbox;
pub mod scram;
pub mod secret;
pub mod session;
pub mod startup;
pub mod stats;
pub mod stream;
pub mod tls;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use guard_core::{Guard, Registry};
use lockguard_config::{GuardConfig, ProxyConfig, TlsConfig};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use listener::Proxy;

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
    pub stats: Arc<stats::ProxyStats>,
    pub tls: Arc<tls::Tls>,
}

/// The guard as the proxy holds it.
pub type GuardHandle = Arc<Guard>;

/// The guard, with its connections over TLS as the dsn's `sslmode` or `[tls]` says.
fn new_guard(
    config: &GuardConfig,
    tls: &TlsConfig,
    registry: Arc<Registry>,
) -> anyhow::Result<GuardHandle> {
    let guard_tls = tls::guard_tls(config, tls)?;
    Guard::with_tls(config, guard_tls, registry).context("could not set up the guard")
}

async fn run_guard(guard: GuardHandle, stop: CancellationToken) {
    // Connect once right away, so a wrong role, password or certificate (and a superuser
    // guard role) shows in the log at start rather than at the first kill. A failure is
    // logged by the connection code and retried with backoff; traffic does not wait for it.
    let _ = guard.check_connection().await;
    guard.run_sweeper(stop).await;
}
