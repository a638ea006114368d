//! Starts lockguard in-process, in front of a test cluster, on a free port.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Once};
use std::time::Duration;

use guard_core::{Registry, SessionRecord};
use lockguard::admin::{Admin, ConfigSource};
use lockguard::tls::Tls;
use lockguard::{GuardHandle, Proxy};
use lockguard_config::{Config, Upstream};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::cluster::{TestCluster, APPLICATION_NAME};

/// A running proxy. Dropping it stops the proxy at once.
pub struct TestProxy {
    pub addr: SocketAddr,
    /// The admin console, when it runs (it needs `[[admin.users]]` or `trust_loopback`).
    pub console: Option<SocketAddr>,
    /// The admin HTTP endpoint, when enabled (it is in [`config_for`]).
    pub http: Option<SocketAddr>,
    registry: Arc<Registry>,
    admin: Arc<Admin>,
    tls: Arc<Tls>,
    guard: Option<GuardHandle>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A config whose proxy listens on a free local port and forwards to `cluster` over TCP.
pub fn config_for(cluster: &TestCluster) -> Config {
    let mut config = Config::default();
    config.proxy.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.proxy.upstream = Upstream::Tcp {
        host: cluster.host().to_owned(),
        port: cluster.port(),
    };
    config.proxy.shutdown_timeout = Duration::from_secs(2);
    // Tests run side by side: admin endpoints, when enabled, take free ports too.
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.admin.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config
}

/// How to start a [`TestProxy`]: [`TestProxy::options`], then what differs, then `start`.
#[must_use]
pub struct ProxyOptions {
    config: Config,
    source: Option<ConfigSource>,
    capture_logs: bool,
}

impl ProxyOptions {
    /// RELOAD (and SIGHUP) re-read `source`.
    pub fn source(mut self, source: ConfigSource) -> Self {
        self.source = Some(source);
        self
    }

    /// The proxy's log goes to [`crate::logs`] (for the whole test binary: the first proxy
    /// started decides where logging goes).
    pub fn capture_logs(mut self) -> Self {
        self.capture_logs = true;
        self
    }

    pub async fn start(self) -> TestProxy {
        if self.capture_logs {
            crate::logs::capture();
        } else {
            init_test_logging();
        }
        let proxy = Proxy::bind_with_source(self.config, self.source)
            .await
            .expect("bind the proxy");
        TestProxy::run(proxy)
    }
}

/// Logs of the proxy go to the test output when `RUST_LOG` is set.
pub fn init_test_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

impl TestProxy {
    /// A proxy in front of `cluster` with the default settings.
    pub async fn start(cluster: &TestCluster) -> TestProxy {
        Self::start_with(config_for(cluster)).await
    }

    /// A proxy with `config` (see [`config_for`]).
    pub async fn start_with(config: Config) -> TestProxy {
        Self::options(config).start().await
    }

    /// A proxy with `config` and more to say about how it starts (see [`ProxyOptions`]).
    pub fn options(config: Config) -> ProxyOptions {
        ProxyOptions {
            config,
            source: None,
            capture_logs: false,
        }
    }

    /// A proxy started from the configuration file `file`, RELOAD re-reading it.
    pub async fn start_from_file(file: &Path) -> TestProxy {
        let source = ConfigSource {
            path: Some(file.to_owned()),
            overrides: Default::default(),
        };
        let config = source.load().expect("config file loads");
        Self::options(config).source(source).start().await
    }

    /// Runs a bound proxy in the background.
    fn run(proxy: Proxy) -> TestProxy {
        let addr = proxy.local_addr().expect("proxy address");
        let console = proxy.admin_console_addr();
        let http = proxy.admin_http_addr();
        let registry = proxy.registry();
        let admin = proxy.admin();
        let tls = proxy.tls();
        let guard = proxy.guard();
        let shutdown = proxy.shutdown_token();
        let hard_stop = proxy.hard_stop_token();
        let task = tokio::spawn(proxy.run());
        TestProxy {
            addr,
            console,
            http,
            registry,
            admin,
            tls,
            guard,
            shutdown,
            hard_stop,
            task: Some(task),
        }
    }

    /// The admin state (configuration in force, RELOAD).
    pub fn admin(&self) -> &Arc<Admin> {
        &self.admin
    }

    /// The TLS state, for certificate reloads.
    pub fn tls(&self) -> &Arc<Tls> {
        &self.tls
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn guard(&self) -> Option<&GuardHandle> {
        self.guard.as_ref()
    }

    /// The guard's recent audit events about backend `pid` that `keep` accepts, oldest first.
    pub fn audit_events(
        &self,
        pid: i32,
        keep: impl Fn(&guard_core::AuditEvent) -> bool,
    ) -> Vec<guard_core::AuditEvent> {
        self.guard()
            .expect("guard configured")
            .audit()
            .recent()
            .into_iter()
            .filter(|e| e.backend_pid == pid && keep(e))
            .collect()
    }

    /// Connection settings for `user` on `dbname` through the proxy.
    pub fn pg_config(
        &self,
        user: &str,
        password: Option<&str>,
        dbname: &str,
    ) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.addr.port())
            .user(user)
            .dbname(dbname)
            .application_name(APPLICATION_NAME)
            .connect_timeout(Duration::from_secs(10));
        if let Some(password) = password {
            config.password(password);
        }
        config
    }

    /// Connects through the proxy; the connection task is spawned.
    pub async fn connect(
        &self,
        user: &str,
        password: Option<&str>,
        dbname: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self
            .pg_config(user, password, dbname)
            .connect(NoTls)
            .await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Connects through the proxy as `user` (no password) and returns the client with its
    /// session's record, found by the backend pid the client reads.
    pub async fn connect_session(
        &self,
        user: &str,
        dbname: &str,
    ) -> (tokio_postgres::Client, Arc<SessionRecord>) {
        let client = self.connect(user, None, dbname).await.expect("connect");
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        let record = self.session_of(pid).await;
        (client, record)
    }

    /// The live session whose backend is `pid`, waiting briefly for the registry to catch up.
    pub async fn session_of(&self, pid: i32) -> Arc<SessionRecord> {
        for _ in 0..100 {
            if let Some(record) = self.registry.find_by_pid(pid) {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no session with backend pid {pid} in the registry");
    }

    /// Waits until the registry holds `n` sessions, or panics after `timeout`.
    pub async fn wait_for_sessions(&self, n: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.registry.len() != n {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "registry has {} sessions, expected {n} after {timeout:?}",
                    self.registry.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful shutdown, returning what `run` returned.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(anyhow::Error::from)?,
            None => Ok(()),
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.hard_stop.cancel();
    }
}

/// `GET path` on the admin HTTP endpoint at `addr` (HTTP/1.1, `Connection: close`): the status
/// code and the body. Panics if the endpoint does not answer within 10 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = crate::http::get(addr, path).await;
    (response.status, response.body)
}
