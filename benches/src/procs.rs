//! The processes a benchmark run starts besides PostgreSQL: lockguard and PgBouncer.
//!
//! Each is a [`Server`]: started with its own generated configuration in a temp dir, waited
//! for until it accepts TCP connections, and stopped (SIGTERM, then SIGKILL) when dropped, so a
//! failing run leaves nothing behind.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a proxy may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped proxy may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running proxy process listening on `127.0.0.1:port`.
pub struct Server {
    name: &'static str,
    child: Child,
    port: u16,
    log: PathBuf,
    /// Holds the configuration and log; removed on drop.
    dir: Option<tempfile::TempDir>,
}

impl Server {
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the process (as dropping it does) and hands over its directory, which holds
    /// what it wrote on its way out (callgrind's counts).
    pub fn stop(mut self) -> Option<tempfile::TempDir> {
        self.shutdown();
        self.dir.take()
    }

    /// Resident set size from `/proc/PID/status` (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid())
    }

    /// CPU time (user + system, all threads) the process has used so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time(self.pid())
    }

    /// The last lines of the process's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn spawn(
        name: &'static str,
        mut command: Command,
        port: u16,
        dir: tempfile::TempDir,
        log: PathBuf,
    ) -> anyhow::Result<Server> {
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        let mut server = Server {
            name,
            child,
            port,
            log,
            dir: Some(dir),
        };
        server.wait_until_listening()?;
        Ok(server)
    }

    fn wait_until_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited during startup ({status}):\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on port {} within {START_TIMEOUT:?}:\n{}",
                    self.name,
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Server {
    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; reaps the process.
    fn shutdown(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: `pid` is our unreaped child, so it cannot name another process.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// How a proxy process is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrap {
    /// As it is.
    Native,
    /// Under `valgrind --tool=callgrind`, which writes its counts to `callgrind.out` in the
    /// process's directory when it exits.
    Callgrind,
}

impl Wrap {
    fn command(self, bin: &Path, dir: &Path) -> Command {
        match self {
            Wrap::Native => Command::new(bin),
            Wrap::Callgrind => {
                let mut command = Command::new("valgrind");
                command
                    .arg("--tool=callgrind")
                    .arg(format!(
                        "--callgrind-out-file={}",
                        dir.join("callgrind.out").display()
                    ))
                    .arg(bin);
                command
            }
        }
    }
}

/// How a proxy reaches PostgreSQL.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// TCP to `127.0.0.1:port`.
    Tcp(u16),
    /// The unix socket `dir/.s.PGSQL.port`.
    Unix { dir: PathBuf, port: u16 },
}

impl Upstream {
    /// lockguard's `proxy.upstream` value.
    fn lockguard_value(&self) -> String {
        match self {
            Upstream::Tcp(port) => format!("127.0.0.1:{port}"),
            Upstream::Unix { dir, port } => format!("{}:{port}", dir.display()),
        }
    }

    /// PgBouncer's `host=… port=…` of a database entry.
    fn pgbouncer_value(&self) -> String {
        match self {
            Upstream::Tcp(port) => format!("host=127.0.0.1 port={port}"),
            Upstream::Unix { dir, port } => format!("host={} port={port}", dir.display()),
        }
    }
}

/// Settings of the lockguard under test that the scenarios depend on.
#[derive(Debug, Clone)]
pub struct LockguardSettings {
    pub protected_table: String,
    pub idle_in_transaction_timeout: Duration,
    pub sweep_interval: Duration,
    pub inflight_grace: Duration,
    /// `proxy.forwarding_threads`; `None` leaves lockguard's default.
    pub forwarding_threads: Option<usize>,
}

/// Starts the lockguard binary `bin` in front of `upstream` with the guard enabled (connecting
/// as the superuser `pg_user` to `127.0.0.1:pg_port`). Logging stays at its default level, as
/// an operator would run it.
pub fn start_lockguard(
    bin: &Path,
    upstream: &Upstream,
    pg_port: u16,
    pg_user: &str,
    settings: &LockguardSettings,
    wrap: Wrap,
) -> anyhow::Result<Server> {
    let dir = tempfile::Builder::new()
        .prefix("lockguard-bench-")
        .tempdir()?;
    let port = free_port()?;
    // The HTTP endpoint stays on, as in production, on a port of its own: the default one may
    // be taken by another lockguard on this machine.
    let http_port = free_port()?;
    let forwarding_threads = settings
        .forwarding_threads
        .map_or(String::new(), |n| format!("forwarding_threads = {n}\n"));
    let config = format!(
        "[proxy]\n\
         listen = \"127.0.0.1:{port}\"\n\
         upstream = \"{upstream}\"\n\
         shutdown_timeout = \"1s\"\n\
         {forwarding_threads}\
         \n\
         [admin]\n\
         http_listen = \"127.0.0.1:{http_port}\"\n\
         \n\
         [guard]\n\
         dsn = \"host=127.0.0.1 port={pg_port} user={pg_user} dbname=postgres\"\n\
         protected_tables = [\"{table}\"]\n\
         idle_in_transaction_timeout = \"{idle}\"\n\
         sweep_interval = \"{sweep}\"\n\
         inflight_grace = \"{grace}\"\n",
        upstream = upstream.lockguard_value(),
        table = settings.protected_table,
        idle = humantime::format_duration(settings.idle_in_transaction_timeout),
        sweep = humantime::format_duration(settings.sweep_interval),
        grace = humantime::format_duration(settings.inflight_grace),
    );
    let config_path = dir.path().join("lockguard.toml");
    fs::write(&config_path, config)?;
    let log = dir.path().join("lockguard.log");
    let mut command = wrap.command(bin, dir.path());
    command.arg("--config").arg(&config_path);
    Server::spawn("lockguard", command, port, dir, log)
}

/// Starts PgBouncer in session mode in front of `upstream`, trusting `pg_user`, with pools big
/// enough for `max_sessions` clients. When running as root it runs as the `postgres` account
/// (PgBouncer refuses root).
pub fn start_pgbouncer(
    bin: &Path,
    upstream: &Upstream,
    pg_user: &str,
    max_sessions: usize,
    wrap: Wrap,
) -> anyhow::Result<Server> {
    let run_as = postgres_account_if_root()?;
    let dir = tempfile::Builder::new()
        .prefix("lockguard-bench-pgbouncer-")
        .tempdir()?;
    let port = free_port()?;
    let userlist = dir.path().join("userlist.txt");
    fs::write(&userlist, format!("\"{pg_user}\" \"\"\n"))?;
    let log = dir.path().join("pgbouncer.log");
    let config = format!(
        "[databases]\n\
         * = {upstream}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {userlist}\n\
         pool_mode = session\n\
         max_client_conn = {clients}\n\
         default_pool_size = {clients}\n\
         log_connections = 0\n\
         log_disconnections = 0\n",
        upstream = upstream.pgbouncer_value(),
        userlist = userlist.display(),
        clients = max_sessions + 50,
    );
    let config_path = dir.path().join("pgbouncer.ini");
    fs::write(&config_path, config)?;
    let mut command = wrap.command(bin, dir.path());
    command.arg(&config_path);
    if let Some((uid, gid)) = run_as {
        for path in [dir.path(), &userlist, &config_path] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        }
        command.uid(uid).gid(gid);
    }
    Server::spawn("pgbouncer", command, port, dir, log)
}

/// A port that was free a moment ago.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// `VmRSS` of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// User + system CPU time of process `pid` (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; the fields after it are plain numbers.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `after_name` starts at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("no CPU times in /proc/{pid}/stat"))
    };
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).unwrap_or(100).max(1);
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_micros(total * 1_000_000 / per_second))
}

/// The first `name` found on `PATH` or in `extra_dirs`.
pub fn find_program(name: &str, extra_dirs: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// uid and gid of the `postgres` account when this process is root; `None` otherwise.
fn postgres_account_if_root() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == "postgres" {
            return Ok(Some((fields[2].parse()?, fields[3].parse()?)));
        }
    }
    bail!("running as root but there is no `postgres` account to run PgBouncer as")
}
