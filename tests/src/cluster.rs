//! Throwaway PostgreSQL servers for the integration tests.
//!
//! The proxy can only be tested honestly against a real server, so every test binary gets one:
//! [`TestCluster::shared`] starts a cluster on first use (or points at an external server named
//! by `LOCKGUARD_TEST_PG*` env vars) and [`TestCluster::start`] gives a test its own cluster
//! when it needs to restart or break the server.
//!
//! # Cleanup
//!
//! Running the suite must leave no processes, ports or temp dirs behind, even when a test
//! panics or the test binary is killed. Three layers take care of that:
//!
//! 1. **`Drop`** of a [`TestCluster`] (private clusters, including during a panic's unwinding)
//!    sends SIGINT to the postmaster (fast shutdown), waits up to 10 s (then SIGKILL) and removes
//!    the temp dir.
//! 2. **`atexit`**: the shared cluster lives in a static whose `Drop` never runs, so the first
//!    call to [`TestCluster::shared`] registers a `libc::atexit` hook that does the same teardown
//!    synchronously when the test binary exits normally (libtest exits through `exit()` both when
//!    all tests pass and when some panicked).
//! 3. **A watchdog** for deaths that run no code at all (SIGKILL, abort, Ctrl-C): every owned
//!    cluster has a small `/bin/sh` process whose stdin is a pipe whose only write end belongs to
//!    the test process. When the test process dies, the kernel closes that end, the watchdog's
//!    `read` sees EOF, and it sends SIGINT (then SIGKILL after 10 s) to the postmaster named in
//!    `postmaster.pid` (only if that process's cwd is still our data dir, so a recycled pid is
//!    never hit) and removes the temp dir. Orderly teardown writes `disarm` to the pipe instead,
//!    and the watchdog exits without doing anything. The watchdog and the postmaster run in their
//!    own process groups, and the watchdog ignores SIGINT/SIGHUP/SIGQUIT, so a terminal Ctrl-C
//!    kills the test binary but not the watchdog that must clean up after it.
//!
//! `prctl(PR_SET_PDEATHSIG)` is deliberately not used: it fires when the *thread* that spawned
//! the child exits (libtest runs each test on its own thread, so the shared cluster would die
//! with the first test) and the kernel clears it when the child changes uid.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// Superuser of a throwaway cluster (`initdb -U postgres`), and the default for an external one.
pub const SUPERUSER: &str = "postgres";
/// A role whose password is stored as MD5 and that `pg_hba.conf` authenticates with `md5`, so
/// tests exercise the MD5 challenge through the proxy.
pub const MD5_USER: &str = "md5_user";
/// Password of [`MD5_USER`].
pub const MD5_PASSWORD: &str = "md5_pass";
/// A role whose password is stored as SCRAM and that `pg_hba.conf` authenticates with
/// `scram-sha-256`, so tests exercise SCRAM through the proxy.
pub const SCRAM_USER: &str = "scram_user";
/// Password of [`SCRAM_USER`].
pub const SCRAM_PASSWORD: &str = "scram_pass";
/// An ordinary login role without a password (`trust`), for tests that need a non-superuser.
pub const APP_USER: &str = "app_user";
/// `application_name` of every connection made through [`TestCluster::pg_config`], so the
/// harness's own sessions can be told apart in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "lockguard-tests";

/// Names an external server to use instead of starting one (host name or IP).
pub const ENV_PGHOST: &str = "LOCKGUARD_TEST_PGHOST";
/// Port of the external server (default 5432).
pub const ENV_PGPORT: &str = "LOCKGUARD_TEST_PGPORT";
/// Superuser of the external server (default `postgres`).
pub const ENV_PGUSER: &str = "LOCKGUARD_TEST_PGUSER";
/// Password of the external server's superuser (optional).
pub const ENV_PGPASSWORD: &str = "LOCKGUARD_TEST_PGPASSWORD";
/// Directory holding `postgres`, `initdb` and `pg_isready`, overriding discovery.
pub const ENV_PG_BIN: &str = "PG_BIN";

/// How long a fast shutdown may take before the postmaster is SIGKILLed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a starting server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How many fresh ports to try when the one picked gets taken before the server binds it.
const PORT_ATTEMPTS: usize = 5;
/// Unix socket paths are limited to 107 bytes; leave room for `/.s.PGSQL.65535`.
const MAX_SOCKET_DIR_LEN: usize = 90;

/// Replaces `pg_hba.conf` wholly: the two password roles must authenticate with their own
/// method over TCP (that is what the proxy tests are about), everything else is trusted.
const PG_HBA: &str = "\
# Written by the lockguard test harness.
local all all trust
host all md5_user 127.0.0.1/32 md5
host all scram_user 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
host all md5_user ::1/128 md5
host all scram_user ::1/128 scram-sha-256
host all all ::1/128 trust
";

/// Creates the test roles once, right after `initdb`. `password_encryption` is switched to md5
/// for the first role only, so its password is stored (and thus challenged) as MD5.
const SETUP_SQL: &str = "\
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD 'md5_pass';
SET password_encryption = 'scram-sha-256';
CREATE ROLE scram_user LOGIN PASSWORD 'scram_pass';
CREATE ROLE app_user LOGIN;
";

/// The watchdog (see the module docs). `$1` is the data dir, `$2` the temp dir to remove.
/// It blocks in `read` until the test process writes `disarm` (orderly teardown, nothing to do)
/// or dies (EOF: stop the postmaster, remove the temp dir).
const WATCHDOG_SCRIPT: &str = r#"trap '' INT HUP QUIT
IFS= read -r cmd
if [ "$cmd" = disarm ]; then exit 0; fi
alive() { [ "$(readlink "/proc/$1/cwd" 2>/dev/null)" = "$2" ]; }
pid=$(head -n 1 "$1/postmaster.pid" 2>/dev/null)
case "$pid" in ''|*[!0-9]*) pid= ;; esac
if [ -n "$pid" ] && alive "$pid" "$1"; then
  kill -INT "$pid" 2>/dev/null
  i=0
  while [ "$i" -lt 100 ] && alive "$pid" "$1"; do sleep 0.1; i=$((i + 1)); done
  if alive "$pid" "$1"; then kill -KILL "$pid" 2>/dev/null; sleep 0.2; fi
fi
rm -rf "$2"
"#;

/// A PostgreSQL server for the tests: either a throwaway cluster this process started, or an
/// external one named by env vars.
///
/// Owned clusters listen on `127.0.0.1:<random port>` and on a Unix socket in their temp dir,
/// trust every role except [`MD5_USER`]/[`SCRAM_USER`] over TCP, and are tuned for speed
/// (`fsync=off`, ...), so they must never hold data anyone cares about.
#[derive(Debug)]
pub struct TestCluster {
    host: String,
    port: u16,
    superuser: String,
    /// Only for external servers; owned clusters trust the superuser.
    superuser_password: Option<String>,
    /// `None` for an external server.
    owned: Option<Owned>,
}

/// What only a cluster started by this process has.
#[derive(Debug)]
struct Owned {
    bin: PathBuf,
    run_as: Option<RunAs>,
    /// The `lockguard-test-*` temp dir: socket dir, log file and parent of `data`.
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    state: Mutex<OwnedState>,
}

#[derive(Debug, Default)]
struct OwnedState {
    /// The running postmaster (a direct child of this process), if any.
    postmaster: Option<Child>,
    watchdog: Option<Child>,
    /// Set once teardown began: the cluster cannot be started again.
    torn_down: bool,
}

/// The account the server binaries run as when this process is root (they refuse root).
#[derive(Debug, Clone)]
struct RunAs {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

static SHARED: OnceLock<Result<TestCluster, String>> = OnceLock::new();
static DB_COUNTER: AtomicU64 = AtomicU64::new(0);

impl TestCluster {
    /// Shared cluster for the whole test binary, started on first use: most tests only need a
    /// server and a private database ([`TestCluster::create_database`]), and starting one
    /// cluster per binary keeps the suite fast.
    ///
    /// Uses the external server named by `LOCKGUARD_TEST_PGHOST` (plus `LOCKGUARD_TEST_PGPORT`,
    /// `LOCKGUARD_TEST_PGUSER`, `LOCKGUARD_TEST_PGPASSWORD`) if set; note that the
    /// [`MD5_USER`]/[`SCRAM_USER`]/[`APP_USER`] roles exist only on owned clusters.
    ///
    /// Blocks (with `std::thread::sleep`, never `block_on`) while the server starts, so it may
    /// be called from inside a tokio runtime. Panics if the server cannot be started.
    pub fn shared() -> &'static TestCluster {
        let cluster = SHARED.get_or_init(|| {
            let started = match external_from_env() {
                Some(external) => external,
                None => TestCluster::start(&[]),
            };
            match started {
                Ok(cluster) => {
                    if cluster.owned.is_some() {
                        register_atexit_teardown();
                    }
                    Ok(cluster)
                }
                Err(e) => Err(e.to_string()),
            }
        });
        match cluster {
            Ok(cluster) => cluster,
            Err(msg) => panic!("the shared test PostgreSQL server could not be started: {msg}"),
        }
    }

    /// A fresh private cluster, for tests that restart or break the server. `settings` are
    /// extra `postgresql.conf` settings as (name, value); they come last, so they override the
    /// harness defaults (e.g. `("max_connections", "20")`).
    ///
    /// Panics if no PostgreSQL server binaries can be found (with install instructions).
    pub fn start(settings: &[(&str, &str)]) -> io::Result<TestCluster> {
        for (name, _) in settings {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid postgresql.conf setting name {name:?}"),
                ));
            }
        }
        let bin = pg_bin_dir();
        let run_as = lookup_run_as()?;
        let root = make_temp_dir(run_as.as_ref())?;
        let owned = Owned {
            bin,
            run_as,
            data: root.join("data"),
            log: root.join("postgres.log"),
            root,
            state: Mutex::new(OwnedState::default()),
        };
        // From here on, dropping `cluster` (on any error below) stops what was started and
        // removes the temp dir.
        let mut cluster = TestCluster {
            host: Ipv4Addr::LOCALHOST.to_string(),
            port: 0,
            superuser: SUPERUSER.to_owned(),
            superuser_password: None,
            owned: Some(owned),
        };
        let owned = cluster
            .owned
            .as_ref()
            .ok_or_else(|| io::Error::other("unreachable: cluster is owned"))?;
        lock(&owned.state).watchdog = Some(owned.spawn_watchdog()?);
        owned.initdb()?;
        let base_conf = fs::read_to_string(owned.data.join("postgresql.conf")).map_err(|e| {
            ctx(
                e,
                format!(
                    "reading {}/postgresql.conf written by initdb",
                    owned.data.display()
                ),
            )
        })?;
        let hba = owned.data.join("pg_hba.conf");
        fs::write(&hba, PG_HBA).map_err(|e| ctx(e, format!("writing {}", hba.display())))?;

        let mut attempt = 0;
        let port = loop {
            attempt += 1;
            let port = free_port()?;
            owned.write_conf(&base_conf, port, settings)?;
            match owned.spawn_ready(port) {
                Ok(postmaster) => {
                    lock(&owned.state).postmaster = Some(postmaster);
                    break port;
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < PORT_ATTEMPTS => {
                    tracing::debug!(
                        port,
                        "port got taken before PostgreSQL bound it; trying another"
                    );
                }
                Err(e) => return Err(e),
            }
        };
        cluster.port = port;
        run_sql_blocking(cluster.pg_config(SUPERUSER, None, "postgres"), SETUP_SQL)
            .map_err(|e| ctx(e, "creating the test roles".to_owned()))?;
        tracing::info!(
            port,
            dir = %cluster.socket_dir().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
            "started throwaway PostgreSQL cluster"
        );
        Ok(cluster)
    }

    /// Host to connect to over TCP: `127.0.0.1` for an owned cluster.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// TCP port of the server.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory of the owned cluster's Unix socket (`.s.PGSQL.<port>`), for tests of
    /// Unix-socket upstreams; `None` for an external server.
    pub fn socket_dir(&self) -> Option<&Path> {
        self.owned.as_ref().map(|o| o.root.as_path())
    }

    /// Data directory of an owned cluster (removed on drop), e.g. to check cleanup.
    pub fn data_dir(&self) -> Option<&Path> {
        self.owned.as_ref().map(|o| o.data.as_path())
    }

    /// The server log of an owned cluster, to read when a test fails mysteriously.
    pub fn log_path(&self) -> Option<&Path> {
        self.owned.as_ref().map(|o| o.log.as_path())
    }

    /// Whether this process started the server (and so may restart it and relies on the
    /// harness roles and `pg_hba.conf`).
    pub fn is_owned(&self) -> bool {
        self.owned.is_some()
    }

    /// Name of the superuser (`postgres` unless an external server says otherwise).
    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    /// Connection settings for `user` on `dbname` over TCP, with `application_name`
    /// [`APPLICATION_NAME`]. If `password` is `None` and `user` is the superuser, the external
    /// server's superuser password (if any) is used.
    pub fn pg_config(
        &self,
        user: &str,
        password: Option<&str>,
        dbname: &str,
    ) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host.as_str())
            .port(self.port)
            .user(user)
            .dbname(dbname)
            .application_name(APPLICATION_NAME)
            .connect_timeout(Duration::from_secs(10));
        let fallback = if user == self.superuser {
            self.superuser_password.as_deref()
        } else {
            None
        };
        if let Some(password) = password.or(fallback) {
            config.password(password);
        }
        config
    }

    /// Connects as the superuser to the `postgres` database over TCP, for test setup and
    /// assertions; the connection task is spawned on the current tokio runtime. Panics (with
    /// the server's message) if that fails, since no test can go on without it.
    pub async fn connect_admin(&self) -> tokio_postgres::Client {
        let config = self.pg_config(&self.superuser, None, "postgres");
        let (client, connection) = config.connect(NoTls).await.unwrap_or_else(|e| {
            panic!(
                "connecting to PostgreSQL at {}:{} as {}: {}{}",
                self.host,
                self.port,
                self.superuser,
                pg_error(&e),
                self.log_hint()
            )
        });
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
        client
    }

    /// Creates an empty database named `<prefix>_<pid>_<n>_<random>` (prefix reduced to
    /// `[a-z0-9_]`) and returns its name, so tests sharing a server do not see each other's
    /// tables. The databases are not dropped: they die with the throwaway cluster.
    pub async fn create_database(&self, prefix: &str) -> String {
        let name = unique_db_name(prefix);
        let client = self.connect_admin().await;
        if let Err(e) = client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
        {
            panic!(
                "CREATE DATABASE {name}: {}{}",
                pg_error(&e),
                self.log_hint()
            );
        }
        name
    }

    /// Stops the server (fast shutdown) and starts it again on the same port and data dir, for
    /// tests of how the proxy survives a server restart. Owned clusters only.
    pub fn restart(&self) -> io::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Stops the server with a fast shutdown (SIGINT to the postmaster; SIGKILL after 10 s)
    /// and waits for it, keeping the data dir for [`TestCluster::start_again`]. Doing nothing
    /// if it is already stopped. Owned clusters only.
    pub fn stop(&self) -> io::Result<()> {
        let owned = self.owned()?;
        let mut state = lock(&owned.state);
        if state.torn_down {
            return Err(io::Error::other("the test cluster was already torn down"));
        }
        match state.postmaster.take() {
            Some(mut postmaster) => stop_child(&mut postmaster, SHUTDOWN_GRACE)
                .map_err(|e| ctx(e, format!("stopping PostgreSQL on port {}", self.port))),
            None => Ok(()),
        }
    }

    /// Starts a stopped server again on the same port and data dir and waits until it accepts
    /// connections. Fails if it is running, or if the port was taken meanwhile. Owned clusters
    /// only.
    pub fn start_again(&self) -> io::Result<()> {
        let owned = self.owned()?;
        let mut state = lock(&owned.state);
        if state.torn_down {
            return Err(io::Error::other("the test cluster was already torn down"));
        }
        if let Some(postmaster) = state.postmaster.as_mut() {
            if postmaster.try_wait()?.is_none() {
                return Err(io::Error::other(format!(
                    "PostgreSQL on port {} is already running",
                    self.port
                )));
            }
        }
        state.postmaster = Some(owned.spawn_ready(self.port)?);
        Ok(())
    }

    fn owned(&self) -> io::Result<&Owned> {
        self.owned.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "not an owned cluster: the external server at {}:{} is not ours to stop",
                    self.host, self.port
                ),
            )
        })
    }

    fn log_hint(&self) -> String {
        match &self.owned {
            Some(owned) => format!(
                "\n--- tail of {} ---\n{}",
                owned.log.display(),
                log_tail(&owned.log, 0)
            ),
            None => String::new(),
        }
    }

    /// Stops the postmaster, removes the temp dir and disarms the watchdog; idempotent.
    /// `wait_for_lock` is false from the `atexit` hook, which must not deadlock on a lock held
    /// by a thread that will never run again (the watchdog cleans up then).
    fn teardown(&self, wait_for_lock: bool) {
        let Some(owned) = &self.owned else { return };
        let mut state = if wait_for_lock {
            lock(&owned.state)
        } else {
            match owned.state.try_lock() {
                Ok(state) => state,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            }
        };
        if state.torn_down {
            return;
        }
        state.torn_down = true;
        if let Some(mut postmaster) = state.postmaster.take() {
            if let Err(e) = stop_child(&mut postmaster, SHUTDOWN_GRACE) {
                tracing::warn!(error = %e, port = self.port, "stopping the test PostgreSQL failed");
            }
        }
        if let Err(e) = fs::remove_dir_all(&owned.root) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(error = %e, dir = %owned.root.display(), "removing the test cluster dir failed");
            }
        }
        if let Some(mut watchdog) = state.watchdog.take() {
            disarm(&mut watchdog);
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.teardown(true);
    }
}

impl Owned {
    /// A command for one of the server binaries, run as `postgres` when we are root.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(&self.root)
            .stdin(Stdio::null())
            .env_remove("PGDATA");
        if let Some(run_as) = &self.run_as {
            // With `uid` set (and no explicit groups), std also calls `setgroups(0, NULL)` in
            // the child before `setuid`, so root's supplementary groups are dropped.
            cmd.uid(run_as.uid)
                .gid(run_as.gid)
                .env("HOME", &run_as.home);
        }
        cmd
    }

    fn spawn_watchdog(&self) -> io::Result<Child> {
        Command::new("/bin/sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("lockguard-test-watchdog")
            .arg(&self.data)
            .arg(&self.root)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| ctx(e, "spawning the cleanup watchdog /bin/sh".to_owned()))
    }

    fn initdb(&self) -> io::Result<()> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data).args([
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        let output = cmd
            .output()
            .map_err(|e| ctx(e, format!("running {:?}", cmd)))?;
        if output.status.success() {
            return Ok(());
        }
        let hint = if self.run_as.is_some() {
            format!(
                " (the `postgres` user must be able to traverse every parent of {})",
                self.root.display()
            )
        } else {
            String::new()
        };
        Err(io::Error::other(format!(
            "initdb failed ({}){hint}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }

    /// Rewrites `postgresql.conf` as initdb left it plus our settings (later lines win).
    fn write_conf(&self, base_conf: &str, port: u16, settings: &[(&str, &str)]) -> io::Result<()> {
        let socket_dir = self.root.to_str().ok_or_else(|| {
            io::Error::other(format!("temp dir {} is not UTF-8", self.root.display()))
        })?;
        let mut conf = format!(
            "{base_conf}\n# --- lockguard test harness ---\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = {}\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 300\n\
             shared_buffers = '32MB'\n\
             logging_collector = off\n\
             log_destination = 'stderr'\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             password_encryption = 'scram-sha-256'\n",
            conf_quote(socket_dir)
        );
        for (name, value) in settings {
            conf.push_str(&format!("{name} = {}\n", conf_quote(value)));
        }
        let path = self.data.join("postgresql.conf");
        fs::write(&path, conf).map_err(|e| ctx(e, format!("writing {}", path.display())))
    }

    /// Starts the postmaster (stderr to the log file) and waits until it accepts connections.
    /// Fails with `ErrorKind::AddrInUse` if it exited because the port was taken.
    fn spawn_ready(&self, port: u16) -> io::Result<Child> {
        let log_start = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| ctx(e, format!("opening {}", self.log.display())))?;
        if let Some(run_as) = &self.run_as {
            std::os::unix::fs::chown(&self.log, Some(run_as.uid), Some(run_as.gid))
                .map_err(|e| ctx(e, format!("chown {}", self.log.display())))?;
        }
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data)
            .stdout(
                log.try_clone()
                    .map_err(|e| ctx(e, "duplicating the log file handle".to_owned()))?,
            )
            .stderr(log)
            .process_group(0);
        let mut postmaster = cmd
            .spawn()
            .map_err(|e| ctx(e, format!("spawning {:?}", cmd)))?;
        match self.wait_ready(&mut postmaster, port, log_start) {
            Ok(()) => Ok(postmaster),
            Err(e) => {
                let _ = stop_child(&mut postmaster, Duration::ZERO);
                Err(e)
            }
        }
    }

    /// Whether `postmaster.pid` exists with status `ready` (its 8th line).
    fn pid_file_says_ready(&self) -> bool {
        fs::read_to_string(self.data.join("postmaster.pid")).is_ok_and(|pid_file| {
            pid_file
                .lines()
                .nth(7)
                .is_some_and(|status| status.trim() == "ready")
        })
    }

    fn wait_ready(&self, postmaster: &mut Child, port: u16, log_start: u64) -> io::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let port_arg = port.to_string();
        loop {
            if let Some(status) = postmaster.try_wait()? {
                let tail = log_tail(&self.log, log_start);
                let kind = if tail.contains("Address already in use") {
                    io::ErrorKind::AddrInUse
                } else {
                    io::ErrorKind::Other
                };
                return Err(io::Error::new(
                    kind,
                    format!(
                        "PostgreSQL on port {port} exited during startup ({status}); log:\n{tail}"
                    ),
                ));
            }
            // Ask pg_isready only once the postmaster says it is ready (PostgreSQL >= 10 writes
            // that into postmaster.pid, as `pg_ctl -w` relies on): pg_isready itself would hang
            // for its 2 s minimum timeout on a port some other program took and never answers.
            let ready = self.pid_file_says_ready()
                && Command::new(self.bin.join("pg_isready"))
                    .args([
                        "-q",
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port_arg,
                        "-U",
                        SUPERUSER,
                        "-d",
                        "postgres",
                        "-t",
                        "1",
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map_err(|e| ctx(e, format!("running {}/pg_isready", self.bin.display())))?
                    .success();
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "PostgreSQL on port {port} did not accept connections within {READY_TIMEOUT:?}; log:\n{}",
                        log_tail(&self.log, log_start)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The external server named by `LOCKGUARD_TEST_PGHOST`, if set.
fn external_from_env() -> Option<io::Result<TestCluster>> {
    let host = std::env::var(ENV_PGHOST).ok().filter(|h| !h.is_empty())?;
    let port = match std::env::var(ENV_PGPORT) {
        Ok(port) => match port.parse() {
            Ok(port) => port,
            Err(e) => return Some(Err(io::Error::other(format!("{ENV_PGPORT}={port:?}: {e}")))),
        },
        Err(_) => 5432,
    };
    Some(Ok(TestCluster {
        host,
        port,
        superuser: std::env::var(ENV_PGUSER).unwrap_or_else(|_| SUPERUSER.to_owned()),
        superuser_password: std::env::var(ENV_PGPASSWORD).ok(),
        owned: None,
    }))
}

extern "C" fn teardown_shared_at_exit() {
    if let Some(Ok(cluster)) = SHARED.get() {
        cluster.teardown(false);
    }
}

fn register_atexit_teardown() {
    // SAFETY: registers a plain `extern "C" fn` with no arguments; it never unwinds (teardown
    // reports errors through tracing instead of panicking).
    if unsafe { libc::atexit(teardown_shared_at_exit) } != 0 {
        tracing::warn!("atexit registration failed; the watchdog will clean up the shared cluster");
    }
}

/// Finds the directory with `postgres`, `initdb` and `pg_isready`: `PG_BIN`, else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`. Panics with install
/// instructions if there is none, since no test can run without a server.
fn pg_bin_dir() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| find_pg_bin().unwrap_or_else(|msg| panic!("{msg}")))
        .clone()
}

fn has_server_binaries(dir: &Path) -> bool {
    ["postgres", "initdb", "pg_isready"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

fn find_pg_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(ENV_PG_BIN) {
        let dir = PathBuf::from(dir);
        return if has_server_binaries(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "{ENV_PG_BIN}={} does not contain postgres, initdb and pg_isready",
                dir.display()
            ))
        };
    }
    if let Ok(output) = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
    {
        if output.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
        }
    }
    let newest = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .max();
    newest.map(|(_, bin)| bin).ok_or_else(|| {
        "no PostgreSQL server binaries found (postgres, initdb, pg_isready): the lockguard tests start a \
         throwaway cluster. Install them with `apt-get install -y postgresql`, or set PG_BIN to their \
         directory, or set LOCKGUARD_TEST_PGHOST (and _PGPORT, _PGUSER, _PGPASSWORD) to use an existing server."
            .to_owned()
    })
}

/// When we are root, the `postgres` account from `/etc/passwd`, since initdb/postgres refuse
/// to run as root; `None` otherwise (they run as the current user).
fn lookup_run_as() -> io::Result<Option<RunAs>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd =
        fs::read_to_string("/etc/passwd").map_err(|e| ctx(e, "reading /etc/passwd".to_owned()))?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 6 && fields[0] == "postgres" {
            let parse = |s: &str| {
                s.parse::<u32>().map_err(|e| {
                    io::Error::other(format!("bad id in /etc/passwd line {line:?}: {e}"))
                })
            };
            return Ok(Some(RunAs {
                uid: parse(fields[2])?,
                gid: parse(fields[3])?,
                home: PathBuf::from(fields[5]),
            }));
        }
    }
    Err(io::Error::other(
        "running as root, but /etc/passwd has no `postgres` user to run initdb/postgres as (they refuse \
         root): install the server with `apt-get install -y postgresql`, which creates it, or run the \
         tests as an unprivileged user",
    ))
}

/// Creates `<tmp>/lockguard-test-*`, owned by the server's account, and returns its canonical
/// path (the watchdog compares it with `/proc/<pid>/cwd`).
fn make_temp_dir(run_as: Option<&RunAs>) -> io::Result<PathBuf> {
    let tmp = std::env::temp_dir();
    let root = tempfile::Builder::new()
        .prefix("lockguard-test-")
        .tempdir_in(&tmp)
        .map_err(|e| {
            ctx(
                e,
                format!("creating a lockguard-test-* dir in {}", tmp.display()),
            )
        })?
        .keep();
    let checked = (|| {
        let root = fs::canonicalize(&root)
            .map_err(|e| ctx(e, format!("canonicalizing {}", root.display())))?;
        if root.as_os_str().len() > MAX_SOCKET_DIR_LEN {
            return Err(io::Error::other(format!(
                "temp dir {} is too long for a Unix socket path; set TMPDIR to a shorter directory",
                root.display()
            )));
        }
        if let Some(run_as) = run_as {
            std::os::unix::fs::chown(&root, Some(run_as.uid), Some(run_as.gid))
                .map_err(|e| ctx(e, format!("chown {} to the postgres user", root.display())))?;
        }
        Ok(root)
    })();
    if checked.is_err() {
        let _ = fs::remove_dir_all(&root);
    }
    checked
}

/// A port that was free a moment ago. Racy by nature; callers retry on `AddrInUse`.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| ctx(e, "binding 127.0.0.1:0".to_owned()))?;
    Ok(listener.local_addr()?.port())
}

/// SIGINT (PostgreSQL's fast shutdown), up to `grace` to exit, then SIGKILL; always reaps.
fn stop_child(child: &mut Child, grace: Duration) -> io::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|e| io::Error::other(format!("pid {}: {e}", child.id())))?;
    // SAFETY: `pid` is our unreaped child, so it cannot have been recycled for another process.
    if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(ctx(e, format!("sending SIGINT to {pid}")));
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait()?.is_none() {
        if !grace.is_zero() {
            tracing::warn!(
                pid,
                "PostgreSQL ignored fast shutdown for {grace:?}; killing it"
            );
        }
        child
            .kill()
            .map_err(|e| ctx(e, format!("SIGKILL to {pid}")))?;
        child.wait()?;
    }
    Ok(())
}

/// Tells the watchdog that teardown was orderly, and reaps it.
fn disarm(watchdog: &mut Child) {
    if let Some(mut stdin) = watchdog.stdin.take() {
        // If the watchdog is already gone the write fails with EPIPE; nothing left to do then.
        let _ = stdin.write_all(b"disarm\n");
    }
    let _ = watchdog.wait();
}

/// Runs `sql` as one simple-query batch on a throwaway current-thread runtime in its own OS
/// thread, so it works whether or not the caller is inside a tokio runtime.
fn run_sql_blocking(config: tokio_postgres::Config, sql: &'static str) -> io::Result<()> {
    let worker = std::thread::spawn(move || -> io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ctx(e, "building a tokio runtime".to_owned()))?;
        runtime.block_on(async {
            let (client, connection) = config
                .connect(NoTls)
                .await
                .map_err(|e| io::Error::other(format!("connecting: {}", pg_error(&e))))?;
            let connection = tokio::spawn(connection);
            client
                .batch_execute(sql)
                .await
                .map_err(|e| io::Error::other(pg_error(&e)))?;
            drop(client);
            let _ = connection.await;
            Ok(())
        })
    });
    worker
        .join()
        .map_err(|_| io::Error::other("the SQL worker thread panicked"))?
}

/// The server's own message when there is one (tokio-postgres' Display can be terse).
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The last 40 lines the server logged since byte `from`.
fn log_tail(log: &Path, from: u64) -> String {
    let bytes = match fs::read(log) {
        Ok(bytes) => bytes,
        Err(e) => return format!("(cannot read {}: {e})", log.display()),
    };
    let from = usize::try_from(from).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[from..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn unique_db_name(prefix: &str) -> String {
    let mut prefix: String = prefix
        .chars()
        .take(20)
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if !prefix.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        prefix.insert_str(0, "db_");
    }
    let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed);
    // At most 23 + 1 + 7 + 1 + 20 + 1 + 8 = 61 bytes, under PostgreSQL's 63-byte limit.
    format!(
        "{prefix}_{}_{n}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A quoted `postgresql.conf` value (quotes doubled, backslashes escaped).
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

fn ctx(e: io::Error, context: String) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

/// Locks `state` even if a panicking test poisoned it: the state stays consistent because
/// every field is updated by a single assignment.
fn lock(state: &Mutex<OwnedState>) -> MutexGuard<'_, OwnedState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_names_are_valid_identifiers() {
        let name = unique_db_name("Proxy-Test with a very long prefix indeed");
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}"
        );
        assert!(unique_db_name("9lives").starts_with("db_9lives_"));
        assert_ne!(unique_db_name("x"), unique_db_name("x"));
    }

    #[test]
    fn conf_values_are_quoted() {
        assert_eq!(conf_quote(r"it's a\b"), r"'it''s a\\b'");
    }
}
