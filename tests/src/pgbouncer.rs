//! A real PgBouncer for the tests of lockguard behind (and in front of) a connection pooler.
//!
//! [`PgBouncer::start`] writes an ini file and a userlist into a temp dir, starts the Debian
//! package's binary on a free port (as the `postgres` user when we are root: PgBouncer refuses
//! to run as root, like the server), and returns once it accepts connections. Dropping it kills
//! PgBouncer and removes the temp dir.
//!
//! PgBouncer runs under a small `/bin/sh` keeper whose stdin is a pipe from this process. On
//! drop we write `stop` to it and it kills PgBouncer; when the pipe just closes because the test
//! binary died without running any code, it kills PgBouncer and removes the temp dir too. So no
//! pooler outlives its test.
//!
//! [`binary`] decides whether the tests can run: without PgBouncer they are skipped with a
//! message, except under `CI=true`, where a missing PgBouncer is a failure.

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// Overrides where the PgBouncer binary is looked for.
pub const ENV_PGBOUNCER: &str = "LOCKGUARD_TEST_PGBOUNCER";

/// How long PgBouncer may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How many fresh ports to try when the one picked is taken before PgBouncer binds it.
const PORT_ATTEMPTS: usize = 5;

/// The keeper (see the module docs): `$1` is PgBouncer, `$2` its ini file, `$3` the temp dir.
/// A background job of a non-interactive shell reads /dev/null, so PgBouncer never sees the
/// pipe.
const KEEPER_SCRIPT: &str = r#"trap '' INT HUP QUIT
"$1" "$2" &
pid=$!
IFS= read -r cmd
kill -KILL "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
if [ "$cmd" != stop ]; then rm -rf "$3"; fi
exit 0
"#;

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection per client connection, for its whole life.
    Session,
    /// A server connection per transaction.
    Transaction,
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        })
    }
}

/// The PgBouncer binary, if there is one: `LOCKGUARD_TEST_PGBOUNCER`, else `pgbouncer` on
/// `PATH`, else the Debian package's `/usr/sbin/pgbouncer`.
///
/// When there is none, tests call this to decide: outside CI it prints why the test is
/// skipped and returns `None`; with `CI` set to `true` (or `1`) it panics, because CI must
/// run these tests (`.ci/run` installs the `pgbouncer` package).
pub fn binary(test: &str) -> Option<PathBuf> {
    if let Some(found) = find_binary() {
        return Some(found);
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let message = format!(
        "PgBouncer is not installed (looked at ${ENV_PGBOUNCER}, PATH and /usr/sbin/pgbouncer); \
         install it with `apt-get install -y pgbouncer`"
    );
    if ci {
        panic!("{message}: CI=true, so {test} must not be skipped");
    }
    eprintln!("skipped {test}: {message}");
    None
}

fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(ENV_PGBOUNCER) {
        // Named explicitly: that one or none.
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("pgbouncer"));
    let debian = ["/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer"].map(PathBuf::from);
    on_path.chain(debian).find(|p| p.is_file())
}

/// What PgBouncer is set up with.
#[derive(Debug, Clone)]
pub struct PgBouncerOptions<'a> {
    /// Where every database's server connections go (PostgreSQL, or lockguard in front of it).
    pub server: SocketAddr,
    pub pool_mode: PoolMode,
    /// Roles that may log in (with `auth_type = trust`, PgBouncer still wants them listed);
    /// the first is also PgBouncer's admin user.
    pub users: &'a [&'a str],
}

/// A running PgBouncer; killed, and its temp dir removed, on drop.
pub struct PgBouncer {
    addr: SocketAddr,
    /// Declared before `dir`: PgBouncer stops before its files go.
    _keeper: Keeper,
    dir: tempfile::TempDir,
}

/// The keeper shell; closing its stdin makes it kill PgBouncer.
struct Keeper {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl PgBouncer {
    /// Starts `binary` (from [`binary`]) with `options` and waits until it accepts
    /// connections. Blocks (`std::thread::sleep` between connection attempts), so call it
    /// from `spawn_blocking` or before the runtime is busy.
    pub fn start(binary: &Path, options: &PgBouncerOptions<'_>) -> io::Result<PgBouncer> {
        let run_as = run_as()?;
        let dir = tempfile::Builder::new()
            .prefix("lockguard-pgbouncer-")
            .tempdir()?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| ctx(e, format!("chown {} to postgres", dir.path().display())))?;
        }
        let userlist = dir.path().join("userlist.txt");
        let users: String = options
            .users
            .iter()
            .map(|u| format!("\"{u}\" \"\"\n"))
            .collect();
        fs::write(&userlist, users).map_err(|e| ctx(e, format!("{}", userlist.display())))?;

        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let ini = dir.path().join("pgbouncer.ini");
            fs::write(&ini, ini_text(options, port, dir.path()))
                .map_err(|e| ctx(e, format!("{}", ini.display())))?;
            let log = dir.path().join("pgbouncer.log");
            let _ = fs::remove_file(&log);
            let mut command = Command::new("/bin/sh");
            command
                .arg("-c")
                .arg(KEEPER_SCRIPT)
                .arg("lockguard-test-pgbouncer")
                .arg(binary)
                .arg(&ini)
                .arg(dir.path())
                .current_dir(dir.path())
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Out of the terminal's process group: a Ctrl-C kills the test binary, and the
                // closed pipe then stops PgBouncer.
                .process_group(0);
            if let Some((uid, gid)) = run_as {
                command.uid(uid).gid(gid);
            }
            let mut child = command
                .spawn()
                .map_err(|e| ctx(e, "spawning the PgBouncer keeper /bin/sh".to_owned()))?;
            let stdin = child.stdin.take();
            let mut keeper = Keeper { child, stdin };
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            match wait_ready(&mut keeper, addr, dir.path()) {
                Ok(()) => {
                    return Ok(PgBouncer {
                        addr,
                        _keeper: keeper,
                        dir,
                    })
                }
                Err(e) => {
                    drop(keeper);
                    if !read_log(dir.path()).contains("Address already in use") {
                        return Err(e);
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("PgBouncer did not start")))
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// PgBouncer's log so far (empty if it wrote none).
    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }
}

fn read_log(dir: &Path) -> String {
    fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
}

/// Waits until PgBouncer accepts a TCP connection on `addr`; fails early when its log has a
/// FATAL or the keeper is gone.
fn wait_ready(keeper: &mut Keeper, addr: SocketAddr, dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        let log = read_log(dir);
        if log.contains("FATAL") || keeper.child.try_wait()?.is_some() {
            return Err(io::Error::other(format!(
                "PgBouncer did not start on {addr}:\n{log}"
            )));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "PgBouncer was not accepting connections on {addr} after {READY_TIMEOUT:?}:\n{log}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Tells the keeper to stop PgBouncer (the temp dir is ours to remove) and reaps it, killing
/// it too if it does not finish within a few seconds.
impl Drop for Keeper {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            // If the keeper is gone already the write fails; reaping it is all that is left.
            let _ = stdin.write_all(b"stop\n");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ini_text(options: &PgBouncerOptions<'_>, port: u16, dir: &Path) -> String {
    let admin = options.users.first().copied().unwrap_or("postgres");
    format!(
        "; Written by the lockguard test harness.\n\
         [databases]\n\
         * = host={host} port={server_port}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {dir}/userlist.txt\n\
         admin_users = {admin}\n\
         pool_mode = {mode}\n\
         max_client_conn = 200\n\
         default_pool_size = 20\n\
         logfile = {dir}/pgbouncer.log\n\
         ignore_startup_parameters = extra_float_digits,options\n",
        host = options.server.ip(),
        server_port = options.server.port(),
        dir = dir.display(),
        mode = options.pool_mode,
    )
}

/// When we are root, the `postgres` account's uid and gid: PgBouncer refuses to run as root.
fn run_as() -> io::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").map_err(io::Error::other)?;
    // SAFETY: an all-zero passwd is a valid value to be overwritten by getpwnam_r.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer is valid for the call, `buf` is as long as we say; getpwnam_r is
    // the reentrant form, safe while other tests' threads look up users too.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(ctx(
            io::Error::from_raw_os_error(rc),
            "looking up the postgres user".to_owned(),
        ));
    }
    if found.is_null() {
        return Err(io::Error::other(
            "running as root, but there is no `postgres` user to run PgBouncer as (it refuses \
             root): install the server with `apt-get install -y postgresql`, or run as an \
             unprivileged user",
        ));
    }
    Ok(Some((entry.pw_uid, entry.pw_gid)))
}

/// A port that was free a moment ago. Racy by nature; [`PgBouncer::start`] retries.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

fn ctx(e: io::Error, context: String) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}
