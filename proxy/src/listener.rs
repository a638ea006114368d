//! Accepting clients, and the proxy's lifetime: bind, serve until shutdown, drain, stop. The
//! admin port (console and HTTP) is bound and served alongside.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use guard_core::clock::Clock;
use guard_core::{Guard, Registry};
use lockguard_config::{Config, Live};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admin::{Admin, AdminListeners, ConfigSource};
use crate::client;
use crate::net::{self, Liveness};
use crate::session::Forwarder;
use crate::shared::{GuardHandle, InForce, Prepared, Shared};
use crate::stats::ProxyStats;
use crate::tls::{self, Tls};

/// Connections beyond `max_startup_clients` that may be told at once that the proxy is full;
/// past this a connection is closed without a word, so a flood cannot pile up tasks.
const MAX_PENDING_REFUSALS: usize = 256;

/// At most one log line per this interval about connections refused for
/// `max_startup_clients`: a flood must not turn into a flood of log lines.
const STARTUP_REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Back-off after a failed accept (out of file descriptors, ...), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How long the admin port may take to close its connections once the proxy has stopped.
const ADMIN_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// A bound, not yet running proxy. Tests start it in-process; `main` runs it until a signal.
pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
    guard_stop: CancellationToken,
    admin: Arc<Admin>,
    admin_listeners: AdminListeners,
}

impl Proxy {
    /// Binds the listening sockets (clients, admin console, admin HTTP) and builds the guard
    /// (which connects lazily). RELOAD has no file to re-read; see [`Proxy::bind_with_source`].
    pub async fn bind(config: Config) -> anyhow::Result<Proxy> {
        Self::bind_with_source(config, None).await
    }

    /// Like [`Proxy::bind`], with RELOAD (and SIGHUP) re-reading `source`.
    pub async fn bind_with_source(
        config: Config,
        source: Option<ConfigSource>,
    ) -> anyhow::Result<Proxy> {
        config.validate().context("invalid configuration")?;
        // Also for a configuration built in code: an empty secret would let anyone in.
        config.check_secrets().context("invalid configuration")?;
        let listener = TcpListener::bind(config.proxy.listen)
            .await
            .with_context(|| format!("could not listen on {}", config.proxy.listen))?;
        // The one configuration in force, with its views; the guard follows the same handle.
        let in_force = Arc::new(InForce::new(Prepared::new(config)?));
        let config = in_force.config();
        let registry = Arc::new(Registry::new());
        let guard = if config.guard.enabled() {
            Some(new_guard(in_force.live(), Arc::clone(&registry))?)
        } else {
            None
        };
        let stats: Arc<ProxyStats> = Arc::default();
        let admin = Arc::new(Admin::new(
            Arc::clone(&in_force),
            source,
            Arc::clone(&registry),
            guard.clone(),
            Arc::clone(&stats),
        ));
        let admin_listeners = AdminListeners::bind(&config.admin).await?;
        let forwarders = start_forwarders(config.proxy.forwarding_threads, &stats)?;
        let shared = Shared {
            forwarders,
            startups: Arc::new(Semaphore::new(config.proxy.max_startup_clients)),
            clients: Arc::new(Semaphore::new(config.proxy.max_clients)),
            refusals: Arc::new(Semaphore::new(MAX_PENDING_REFUSALS)),
            tls: Arc::clone(in_force.tls()),
            in_force,
            registry,
            guard,
            shutdown: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            stats,
        };
        Ok(Proxy {
            listener,
            shared: Arc::new(shared),
            guard_stop: CancellationToken::new(),
            admin,
            admin_listeners,
        })
    }

    /// The address clients connect to (useful when binding port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// All live sessions.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.shared.registry)
    }

    /// The guard, when one is configured.
    pub fn guard(&self) -> Option<GuardHandle> {
        self.shared.guard.clone()
    }

    /// TLS state: the view of the configuration in force that RELOAD replaces.
    pub fn tls(&self) -> Arc<Tls> {
        Arc::clone(&self.shared.tls)
    }

    /// Proxy-wide counters.
    pub fn stats(&self) -> Arc<ProxyStats> {
        Arc::clone(&self.shared.stats)
    }

    /// The admin command layer (what the console and HTTP run; `main` reloads through it on
    /// SIGHUP).
    pub fn admin(&self) -> Arc<Admin> {
        Arc::clone(&self.admin)
    }

    /// The admin console's address, when it is enabled (useful when binding port 0).
    pub fn admin_console_addr(&self) -> Option<SocketAddr> {
        self.admin_listeners.console_addr()
    }

    /// The admin HTTP endpoint's address, when it is enabled.
    pub fn admin_http_addr(&self) -> Option<SocketAddr> {
        self.admin_listeners.http_addr()
    }

    /// Cancel to begin a graceful shutdown: stop accepting, let sessions finish for
    /// `shutdown_timeout`, then close the rest.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Cancel to close every session at once (a second signal during shutdown).
    pub fn hard_stop_token(&self) -> CancellationToken {
        self.shared.hard_stop.clone()
    }

    /// Serves clients until the shutdown token is cancelled, then drains and returns.
    pub async fn run(self) -> anyhow::Result<()> {
        let Proxy {
            listener,
            shared,
            guard_stop,
            admin,
            admin_listeners,
        } = self;
        let sessions = TaskTracker::new();
        // The proxy section needs a restart to change: read once.
        let config = shared.config();
        let client_liveness = Liveness::for_clients(&config.proxy);
        if let Some(guard) = &shared.guard {
            tokio::spawn(run_guard(Arc::clone(guard), guard_stop.clone()));
        }
        // The admin port outlives the drain, so operators can watch (and kill) the sessions
        // that are still finishing.
        let admin_stop = CancellationToken::new();
        let mut admin_task = tokio::spawn(admin_listeners.serve(admin, admin_stop.clone()));
        info!(
            listen = %listener.local_addr().context("listener address")?,
            upstream = %config.proxy.upstream,
            guard = shared.guard.is_some(),
            "lockguard is accepting connections"
        );
        let mut startup_refusals = RefusalLog::default();
        loop {
            let (stream, addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
                _ = shared.shutdown.cancelled() => break,
            };
            shared.stats.client_accepted();
            if let Err(e) = net::tune_tcp(&stream, &client_liveness) {
                debug!(client = %addr, error = %e, "could not set socket options");
            }
            // Every connection starts in a startup slot; the session takes a `max_clients`
            // slot once its startup is over (see `client::serve`), so connections that never
            // get there cannot crowd out authenticated clients.
            let Ok(startup) = Arc::clone(&shared.startups).try_acquire_owned() else {
                shared.stats.client_refused();
                startup_refusals.note(addr, config.proxy.max_startup_clients);
                // Told at once, without waiting for a startup packet that may never come,
                // within the bounded refusal budget.
                if let Ok(refusing) = Arc::clone(&shared.refusals).try_acquire_owned() {
                    let max = config.proxy.max_startup_clients;
                    sessions.spawn(async move {
                        client::refuse_startup(stream, max).await;
                        drop(refusing);
                    });
                }
                continue;
            };
            let shared = Arc::clone(&shared);
            // Boxed before spawning: the session's future is a few KiB, and the spawn path
            // moves it several times (about 5,000 instructions of copying per connection).
            sessions.spawn(Box::pin(client::serve(stream, addr, shared, startup)));
        }
        drop(listener);
        sessions.close();
        let timeout = config.proxy.shutdown_timeout;
        info!(
            sessions = sessions.len(),
            ?timeout,
            "shutting down: no longer accepting clients"
        );
        tokio::select! {
            _ = sessions.wait() => {}
            _ = tokio::time::sleep(timeout) => {
                info!(sessions = sessions.len(), "shutdown timeout reached: closing remaining sessions");
                shared.hard_stop.cancel();
            }
            _ = shared.hard_stop.cancelled() => {}
        }
        sessions.wait().await;
        guard_stop.cancel();
        admin_stop.cancel();
        if tokio::time::timeout(ADMIN_STOP_TIMEOUT, &mut admin_task)
            .await
            .is_err()
        {
            admin_task.abort();
        }
        info!("lockguard stopped");
        Ok(())
    }
}

/// The guard following the configuration in force in `live`, with its connections over TLS
/// as the dsn's `sslmode` or `[tls]` says (fixed at start, like the dsn).
fn new_guard(live: &Arc<Live>, registry: Arc<Registry>) -> anyhow::Result<GuardHandle> {
    let config = live.load();
    let guard_tls = tls::guard_tls(&config.guard, &config.tls)?;
    Guard::with_live(Arc::clone(live), guard_tls, registry, Clock::system())
        .context("could not set up the guard")
}

async fn run_guard(guard: GuardHandle, stop: CancellationToken) {
    // Connect once right away, so a wrong role, password or certificate (and a superuser
    // guard role) shows in the log at start rather than at the first kill. A failure is
    // logged by the connection code and retried with backoff; traffic does not wait for it.
    let _ = guard.check_connection().await;
    guard.run_sweeper(stop).await;
}

/// Logs refusals for `max_startup_clients` at most once per
/// [`STARTUP_REFUSAL_LOG_INTERVAL`], with how many there were since the last line.
#[derive(Default)]
struct RefusalLog {
    last: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn note(&mut self, client: SocketAddr, max_startup_clients: usize) {
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < STARTUP_REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        warn!(
            %client,
            max_startup_clients,
            refused = self.unlogged,
            "refusing connections: too many still in startup"
        );
        self.last = Some(now);
        self.unlogged = 0;
    }
}

/// Threads of each of the proxy's two pools (the runtime's workers, the forwarding threads):
/// one on up to two cores, where a second would only wake the first across cores and compete
/// with PostgreSQL for them (measured: README, "Benchmarks"); one per core beyond.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores <= 2 {
        1
    } else {
        cores
    }
}

/// Starts the forwarding threads: `configured`, or [`default_threads`].
fn start_forwarders(
    configured: Option<usize>,
    stats: &Arc<ProxyStats>,
) -> anyhow::Result<Vec<Forwarder>> {
    let count = configured.unwrap_or_else(default_threads);
    (0..count)
        .map(|_| Forwarder::start(Arc::clone(stats)).context("could not start a forwarding thread"))
        .collect()
}
