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

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// Superuser of a sandbox (`initdb -U postgres`).
pub const SUPERUSER: &str = "postgres";
/// Directory holding `postgres` and `initdb`, overriding discovery.
pub const ENV_PG_BIN: &str = "PG_BIN";
/// Major version to run (e.g. `17`), found among the installed servers (see the module docs).
pub const ENV_PG_MAJOR: &str = "LOCKGUARD_TEST_PG_MAJOR";
/// Where `.ci/install-postgres` puts the builds of other majors (`<root>/<major>/bin`).
pub const ENV_PG_ROOT: &str = "LOCKGUARD_PG_ROOT";
/// Default of [`ENV_PG_ROOT`].
pub const DEFAULT_PG_ROOT: &str = "/opt/lockguard-pg";

/// How long a fast shutdown may take before the postmaster is SIGKILLed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a starting server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How many fresh ports to try when the one picked gets taken before the server binds it.
const PORT_ATTEMPTS: usize = 5;
/// Unix socket paths are limited to 107 bytes; leave room for `/.s.PGSQL.65535`.
const MAX_SOCKET_DIR_LEN: usize = 90;

/// Trust everyone, locally and over loopback: a sandbox holds nothing worth protecting.
pub const TRUST_ALL_HBA: &str = "\
local all all trust
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
";

/// The watchdog (see the module docs). `$1` is the data dir, `$2` the temp dir to remove.
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

/// The account the server binaries run as when this process is root (they refuse root).
#[derive(Debug, Clone)]
struct RunAs {
    uid: u32,
    gid: u32,
    home: PathBuf,
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
        sandbox.lock().watchdog = Some(sandbox.spawn_watchdog()?);
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
            disarm(&mut watchdog);
        }
    }

    /// Locks the state even if a panicking thread poisoned it: every field is updated by a
    /// single assignment, so it stays consistent.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

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
            .arg("lockguard-sandbox-watchdog")
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
            "{base_conf}\n# --- lockguard sandbox ---\n\
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
            // Try a connection only once the postmaster says it is ready (PostgreSQL >= 10
            // writes that into postmaster.pid, as `pg_ctl -w` relies on), so a port some other
            // program took is never mistaken for ours.
            let ready = self.pid_file_says_ready() && answers_startup(port);
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

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.teardown(true);
    }
}

/// Whether the server at `127.0.0.1:port` processes a startup packet: any authentication
/// request (`R`) means it does; an error (e.g. 57P03 "the database system is starting up"), a
/// refused connection or silence within a second means not yet.
fn answers_startup(port: u16) -> bool {
    let probe = || -> io::Result<bool> {
        let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.set_write_timeout(Some(Duration::from_secs(1)))?;
        let mut body = 196_608u32.to_be_bytes().to_vec(); // protocol 3.0
        for (name, value) in [("user", SUPERUSER), ("database", "postgres")] {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut packet = u32::try_from(body.len() + 4)
            .map_err(io::Error::other)?
            .to_be_bytes()
            .to_vec();
        packet.extend_from_slice(&body);
        stream.write_all(&packet)?;
        let mut first = [0u8; 1];
        std::io::Read::read_exact(&mut stream, &mut first)?;
        if first[0] == b'R' {
            // Terminate, so the backend does not log a client that vanished.
            let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
        }
        Ok(first[0] == b'R')
    };
    probe().unwrap_or(false)
}

fn has_server_binaries(dir: &Path) -> bool {
    ["postgres", "initdb"].iter().all(|b| dir.join(b).is_file())
}

/// The directory of an installed PostgreSQL `major`: Debian's `/usr/lib/postgresql/<major>/bin`,
/// else `<LOCKGUARD_PG_ROOT or /opt/lockguard-pg>/<major>/bin` (`.ci/install-postgres`).
pub fn installed_major(major: u32) -> Option<PathBuf> {
    let root = std::env::var_os(ENV_PG_ROOT)
        .filter(|root| !root.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_PG_ROOT), PathBuf::from);
    [
        PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
        root.join(major.to_string()).join("bin"),
    ]
    .into_iter()
    .find(|dir| has_server_binaries(dir))
}

/// The directory with `postgres` and `initdb`: `PG_BIN`, else the major named by
/// `LOCKGUARD_TEST_PG_MAJOR`, else `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`. The error says how to install them.
pub fn server_binaries() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND.get_or_init(find_server_binaries).clone()
}

fn find_server_binaries() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(ENV_PG_BIN) {
        let dir = PathBuf::from(dir);
        return if has_server_binaries(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "{ENV_PG_BIN}={} does not contain postgres and initdb",
                dir.display()
            ))
        };
    }
    if let Some(major) = std::env::var(ENV_PG_MAJOR).ok().filter(|m| !m.is_empty()) {
        let parsed: u32 = major.parse().map_err(|e| {
            format!("{ENV_PG_MAJOR}={major:?} is not a major version number such as 17: {e}")
        })?;
        return installed_major(parsed).ok_or_else(|| {
            format!(
                "{ENV_PG_MAJOR}={parsed}, but PostgreSQL {parsed} is not installed in \
                 /usr/lib/postgresql/{parsed}/bin nor in {}/{parsed}/bin; install it with \
                 `.ci/install-postgres {parsed}` (needs npm) or set PG_BIN to its directory.",
                std::env::var(ENV_PG_ROOT).unwrap_or_else(|_| DEFAULT_PG_ROOT.to_owned())
            )
        });
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
        "no PostgreSQL server binaries found (postgres, initdb). Install them \
         (Debian/Ubuntu: `sudo apt-get install -y postgresql`; Fedora: `sudo dnf install \
         postgresql-server`; macOS: `brew install postgresql`) or set PG_BIN to their directory."
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
        "running as root, but /etc/passwd has no `postgres` user to run initdb/postgres as (they \
         refuse root): install the server with `apt-get install -y postgresql`, which creates it, \
         or run as an unprivileged user",
    ))
}

/// Creates `<tmp>/<prefix>*`, owned by the server's account, and returns its canonical path
/// (the watchdog compares it with `/proc/<pid>/cwd`).
fn make_temp_dir(prefix: &str, run_as: Option<&RunAs>) -> io::Result<PathBuf> {
    let tmp = std::env::temp_dir();
    let root = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&tmp)
        .map_err(|e| ctx(e, format!("creating a {prefix}* dir in {}", tmp.display())))?
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
pub fn run_sql_blocking(config: tokio_postgres::Config, sql: &str) -> io::Result<()> {
    let sql = sql.to_owned();
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
                .batch_execute(&sql)
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
pub fn pg_error(e: &tokio_postgres::Error) -> String {
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

/// A quoted `postgresql.conf` value (quotes doubled, backslashes escaped).
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

fn ctx(e: io::Error, context: String) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_values_are_quoted() {
        assert_eq!(conf_quote(r"it's a\b"), r"'it''s a\\b'");
    }
}
