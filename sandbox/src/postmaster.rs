//! The postmaster's life: spawned with its log, ready once it says so and answers a startup
//! packet, stopped with a fast shutdown.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::{ctx, Sandbox, SUPERUSER};

/// How long a fast shutdown may take before the postmaster is SIGKILLed.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long a starting server may take to accept connections.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl Sandbox {
    /// Starts the postmaster (stderr to the log file) and waits until it accepts connections.
    /// Fails with `ErrorKind::AddrInUse` if it exited because the port was taken.
    pub(crate) fn spawn_ready(&self, port: u16) -> io::Result<Child> {
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

/// SIGINT (PostgreSQL's fast shutdown), up to `grace` to exit, then SIGKILL; always reaps.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) -> io::Result<()> {
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

/// The last 40 lines the server logged since byte `from`.
pub(crate) fn log_tail(log: &Path, from: u64) -> String {
    let bytes = match fs::read(log) {
        Ok(bytes) => bytes,
        Err(e) => return format!("(cannot read {}: {e})", log.display()),
    };
    let from = usize::try_from(from).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[from..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
