//! Throwaway PostgreSQL clusters, started from the locally installed server binaries: for
//! `lockguard demo` and for the integration tests (which wrap this in their `TestCluster`).
//!
//! A sandbox listens on `127.0.0.1:<free port>` and on a Unix socket in its temp dir, is tuned
//! for speed (`fsync=off`, ...) and so must never hold data anyone cares about.
//!
//! # Cleanup
//!
//! A sandbox must leave no process, port or temp dir behind, even when its owner panics or is
//! killed:
//!
//! 1. **`Drop`** sends SIGINT to the postmaster (fast shutdown), waits up to 10 s (then
//!    SIGKILL) and removes the temp dir.
//! 2. [`Sandbox::teardown`] does the same for owners whose `Drop` never runs (a `static`
//!    cleaned up from an `atexit` hook).
//! 3. **A watchdog** for deaths that run no code at all (SIGKILL, abort, Ctrl-C): a small
//!    `/bin/sh` process whose stdin is a pipe whose only write end belongs to this process.
//!    When this process dies, the kernel closes that end, the watchdog's `read` sees EOF, and
//!    it sends SIGINT (then SIGKILL after 10 s) to the postmaster named in `postmaster.pid`
//!    (only if that process's cwd is still our data dir, so a recycled pid is never hit) and
//!    removes the temp dir. Orderly teardown writes `disarm` to the pipe instead. The watchdog
//!    and the postmaster run in their own process groups, and the watchdog ignores
//!    SIGINT/SIGHUP/SIGQUIT, so a terminal Ctrl-C kills the owner but not the watchdog that
//!    must clean up after it.
//!
//! `prctl(PR_SET_PDEATHSIG)` is deliberately not used: it fires when the *thread* that spawned
//! the child exits and the kernel clears it when the child changes uid.
//!
//! The server binaries refuse to run as root; when this process is root they run as the
//! `postgres` account.
//!
//! # Which PostgreSQL
//!
//! `PG_BIN` names the directory of `postgres` and `initdb` outright. Otherwise
//! `LOCKGUARD_TEST_PG_MAJOR=<major>` picks an installed major version: Debian's
//! `/usr/lib/postgresql/<major>/bin`, else `<LOCKGUARD_PG_ROOT or /opt/lockguard-pg>/<major>/bin`,
//! where `.ci/install-postgres` puts the builds pinned in `.ci/postgres-versions`. Without
//! either, `pg_config --bindir` or the newest Debian server is used. Nothing here needs
//! `pg_isready` (the npm builds lack it): readiness is the postmaster's own `ready` status
//! plus an answered startup packet.

mod account;
mod discovery;
mod postmaster;
mod setup;
mod sql;
mod watchdog;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use account::{lookup_run_as, RunAs};
use postmaster::{log_tail, stop_child, SHUTDOWN_GRACE};
use setup::{free_port, make_temp_dir, PORT_ATTEMPTS};

pub use discovery::{
    installed_major, server_binaries, DEFAULT_PG_ROOT, ENV_PG_BIN, ENV_PG_MAJOR, ENV_PG_ROOT,
};
pub use sql::{named_rows, pg_error, run_sql_blocking};

/// Superuser of a sandbox (`initdb -U postgres`).
pub const SUPERUSER: &str = "postgres";

/// Trust everyone, locally and over loopback: a sandbox holds nothing worth protecting.
pub const TRUST_ALL_HBA: &str = "\
local all all trust
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
";

/// How to set up a sandbox.
#[derive(Debug, Clone, Copy)]
pub struct SandboxOptions<'a> {
    /// Prefix of the temp dir's name (e.g. `lockguard-demo-`).
    pub temp_prefix: &'a str,
    /// The whole `pg_hba.conf`.
    pub pg_hba: &'a str,
    /// Extra `postgresql.conf` settings as (name, value); they come last, so they override the
    /// defaults (e.g. `("max_connections", "20")`).
    pub settings: &'a [(&'a str, &'a str)],
    /// SQL run once as the superuser right after the first start (roles, schemas, data).
    pub setup_sql: &'a str,
}

/// A running throwaway cluster; stopped and removed on drop.
#[derive(Debug)]
pub struct Sandbox {
    port: u16,
    bin: PathBuf,
    run_as: Option<RunAs>,
    /// The temp dir: socket dir, log file and parent of `data`.
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The running postmaster (a direct child of this process), if any.
    postmaster: Option<Child>,
    watchdog: Option<Child>,
    /// Set once teardown began: the cluster cannot be started again.
    torn_down: bool,
}

impl Sandbox {
    /// Runs `initdb`, starts the server on a free port and runs `setup_sql`. Blocks (with
    /// `std::thread::sleep`, never `block_on`) while the server starts, so it may be called
    /// from inside a tokio runtime.
    pub fn start(options: SandboxOptions<'_>) -> io::Result<Sandbox> {
        let bin = server_binaries().map_err(io::Error::other)?;
        Sandbox::start_with(&bin, options)
    }

    /// Like [`Sandbox::start`], with the server binaries in `bin` (e.g. from
    /// [`installed_major`]) rather than the ones discovery picks.
    pub fn start_with(bin: &Path, options: SandboxOptions<'_>) -> io::Result<Sandbox> {
        for (name, _) in options.settings {
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
        let bin = bin.to_path_buf();
        let run_as = lookup_run_as()?;
        let root = make_temp_dir(options.temp_prefix, run_as.as_ref())?;
        // From here on, dropping `sandbox` (on any error below) stops what was started and
        // removes the temp dir.
        let mut sandbox = Sandbox {
            port: 0,
            bin,
            run_as,
            data: root.join("data"),
            log: root.join("postgres.log"),
            root,
            state: Mutex::new(State::default()),
        };
        sandbox.lock().watchdog = Some(watchdog::spawn(&sandbox.data, &sandbox.root)?);
        sandbox.initdb()?;
        let conf = sandbox.data.join("postgresql.conf");
        let base_conf = fs::read_to_string(&conf)
            .map_err(|e| ctx(e, format!("reading {} written by initdb", conf.display())))?;
        let hba = sandbox.data.join("pg_hba.conf");
        fs::write(&hba, options.pg_hba)
            .map_err(|e| ctx(e, format!("writing {}", hba.display())))?;

        let mut attempt = 0;
        sandbox.port = loop {
            attempt += 1;
            let port = free_port()?;
            sandbox.write_conf(&base_conf, port, options.settings)?;
            match sandbox.spawn_ready(port) {
                Ok(postmaster) => {
                    sandbox.lock().postmaster = Some(postmaster);
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
        if !options.setup_sql.is_empty() {
            run_sql_blocking(sandbox.pg_config(SUPERUSER, "postgres"), options.setup_sql)
                .map_err(|e| ctx(e, "running the sandbox's setup SQL".to_owned()))?;
        }
        tracing::debug!(port = sandbox.port, dir = %sandbox.root.display(), "started a throwaway PostgreSQL");
        Ok(sandbox)
    }

    /// Host to connect to over TCP.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// TCP port of the server.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory of the Unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// Data directory (removed on drop).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Directory of the server binaries in use (`pgbench`, `psql` may sit beside them).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The server's major version, from the `PG_VERSION` file initdb wrote (e.g. 17).
    pub fn major_version(&self) -> io::Result<u32> {
        let path = self.data.join("PG_VERSION");
        let text =
            fs::read_to_string(&path).map_err(|e| ctx(e, format!("reading {}", path.display())))?;
        text.trim().parse().map_err(|e| {
            io::Error::other(format!("{} holds {:?}: {e}", path.display(), text.trim()))
        })
    }

    /// Connection settings for `user` on `dbname` over TCP.
    pub fn pg_config(&self, user: &str, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host())
            .port(self.port)
            .user(user)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// Stops the server with a fast shutdown (SIGINT to the postmaster; SIGKILL after 10 s)
    /// and waits for it, keeping the data dir for [`Sandbox::start_again`]. Does nothing if it
    /// is already stopped.
    pub fn stop(&self) -> io::Result<()> {
        let mut state = self.lock();
        if state.torn_down {
            return Err(io::Error::other("the sandbox was already torn down"));
        }
        match state.postmaster.take() {
            Some(mut postmaster) => stop_child(&mut postmaster, SHUTDOWN_GRACE)
                .map_err(|e| ctx(e, format!("stopping PostgreSQL on port {}", self.port))),
            None => Ok(()),
        }
    }

    /// Starts a stopped server again on the same port and data dir and waits until it accepts
    /// connections. Fails if it is running, or if the port was taken meanwhile.
    pub fn start_again(&self) -> io::Result<()> {
        let mut state = self.lock();
        if state.torn_down {
            return Err(io::Error::other("the sandbox was already torn down"));
        }
        if let Some(postmaster) = state.postmaster.as_mut() {
            if postmaster.try_wait()?.is_none() {
                return Err(io::Error::other(format!(
                    "PostgreSQL on port {} is already running",
                    self.port
                )));
            }
        }
        state.postmaster = Some(self.spawn_ready(self.port)?);
        Ok(())
    }

    /// Stops the server and starts it again.
    pub fn restart(&self) -> io::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// The last 40 lines of the server log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 0)
    }

    /// Stops the postmaster, removes the temp dir and disarms the watchdog; idempotent.
    /// `wait_for_lock` false is for `atexit` hooks, which must not deadlock on a lock held by
    /// a thread that will never run again (the watchdog cleans up then).
    pub fn teardown(&self, wait_for_lock: bool) {
        let mut state = if wait_for_lock {
            self.lock()
        } else {
            match self.state.try_lock() {
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
                tracing::warn!(error = %e, port = self.port, "stopping the sandbox PostgreSQL failed");
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.root) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(error = %e, dir = %self.root.display(), "removing the sandbox dir failed");
            }
        }
        if let Some(mut watchdog) = state.watchdog.take() {
            watchdog::disarm(&mut watchdog);
        }
    }

    /// Locks the state even if a panicking thread poisoned it: every field is updated by a
    /// single assignment, so it stays consistent.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.teardown(true);
    }
}

fn ctx(e: io::Error, context: String) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}
