//! The binary takes the open-files hard limit as its soft limit at start: every session holds
//! two descriptors, and container runtimes and shells default the soft limit to 1024.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts lockguard with the open-files limits `soft` / `hard`; returns it and its log lines.
fn start_with_limits(
    soft: u64,
    hard: u64,
    max_clients: usize,
) -> (Running, mpsc::Receiver<String>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lockguard"));
    command
        .args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"])
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let config = tempfile::NamedTempFile::new().expect("temp config");
    std::fs::write(
        config.path(),
        format!("[proxy]\nmax_clients = {max_clients}\n[admin]\nhttp_enabled = false\n"),
    )
    .expect("write config");
    command.arg("--config").arg(config.path());
    // SAFETY: setrlimit is async-signal-safe; it only lowers the child's own limits.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Running(command.spawn().expect("start lockguard"));
    // The file is read at start; keep it until the proxy is up.
    let stderr = child.0.stderr.take().expect("piped stderr");
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        let _config = config;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    (child, lines)
}

/// Lines up to and including the first one containing `what`.
fn lines_until(lines: &mpsc::Receiver<String>, what: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains(what);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no log line with {what:?}; saw:\n{}", seen.join("\n"));
}

/// The soft open-files limit of a running process, from /proc.
fn soft_limit(child: &Child) -> u64 {
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("soft limit in {line:?}"))
}

#[test]
fn the_soft_open_files_limit_is_raised_to_the_hard_limit() {
    let (child, lines) = start_with_limits(256, 4096, 1000);
    let seen = lines_until(&lines, "lockguard is accepting connections");
    assert!(
        seen.iter().any(|l| l.contains("open-files limit raised")
            && l.contains("\"from\":256")
            && l.contains("\"to\":4096")),
        "{seen:#?}"
    );
    assert_eq!(soft_limit(&child.0), 4096);
    // 1000 clients need about 3,000 descriptors: no warning.
    assert!(
        !seen.iter().any(|l| l.contains("below what max_clients")),
        "{seen:#?}"
    );
}

#[test]
fn a_hard_limit_too_low_for_max_clients_is_a_warning() {
    let (_child, lines) = start_with_limits(512, 512, 10_000);
    let seen = lines_until(&lines, "lockguard is accepting connections");
    assert!(
        seen.iter().any(|l| l.contains("below what max_clients")
            && l.contains("\"limit\":512")
            && l.contains("\"needed\":21024")),
        "{seen:#?}"
    );
}
