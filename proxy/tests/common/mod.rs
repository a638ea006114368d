//! What the command-line test binaries share: running `lockguard`, its configuration file,
//! and watching a running one's log and exit.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn lockguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lockguard"))
}

pub fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(text.as_bytes()).expect("write config");
    file
}

/// `lockguard` with none of its variables (`LOCKGUARD_*`) inherited from the test's own
/// environment.
pub fn lockguard_clean_env() -> Command {
    let mut command = lockguard();
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LOCKGUARD_") {
            command.env_remove(name);
        }
    }
    command
}

/// What a finished `lockguard` run printed, and whether it succeeded.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(out: Output) -> Ran {
        Ran {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `command` to its end.
pub fn run(command: &mut Command) -> Ran {
    command.output().expect("run lockguard").into()
}

/// Runs `command`, which must succeed, and returns what it printed on stdout.
pub fn run_ok(command: &mut Command) -> String {
    let ran = run(command);
    assert!(ran.ok, "{}", ran.stderr);
    ran.stdout
}

/// Starts `lockguard --config <file>`, its log read line by line.
pub fn spawn_with_config(file: &Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = lockguard()
        .arg("--config")
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockguard");
    let lines = log_lines(&mut child);
    (child, lines)
}

/// `lockguard check-config <file>` with `variables` set and none other inherited.
pub fn check_config(file: &Path, variables: &[(&str, &str)]) -> Ran {
    let mut command = lockguard_clean_env();
    command.arg("check-config").arg(file);
    for (name, value) in variables {
        command.env(name, value);
    }
    run(&mut command)
}

/// Sends `signal` to the child.
pub fn signal(child: &Child, signal: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// Waits up to 10 s for the child, signalled with SIGTERM, to exit.
pub fn exit_status_after_sigterm(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "lockguard did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The child's stderr, line by line, read on a thread.
pub fn log_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

/// Waits for a log line containing every one of `parts`; returns it and the lines before it.
/// Panics with what was seen.
pub fn wait_for_log(lines: &mpsc::Receiver<String>, parts: &[&str]) -> (String, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if parts.iter().all(|p| line.contains(p)) => return (line, seen),
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("no log line with {parts:?}; saw:\n{}", seen.join("\n"));
}

/// The `listen` field of a JSON log line.
pub fn logged_address(line: &str) -> SocketAddr {
    let fields: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    fields["listen"]
        .as_str()
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line}"))
}

/// Waits up to 10 s for a child that is expected to exit by itself; SIGTERM if it does not.
pub fn exit_status_after_sigterm_or_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(child, libc::SIGTERM);
    exit_status_after_sigterm(child)
}

/// Runs `lockguard` with `args` and `var` set to `value` (or unset); it must fail at once.
/// Returns its stderr.
pub fn fails_with_env(args: &[&std::ffi::OsStr], var: &str, value: Option<&str>) -> String {
    let mut command = lockguard();
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match value {
        Some(value) => command.env(var, value),
        None => command.env_remove(var),
    };
    let mut child = command.spawn().expect("run lockguard");
    let status = exit_status_after_sigterm_or_exit(&mut child);
    let output = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !status.success(),
        "{args:?} with {var}={value:?} succeeded: {stderr}"
    );
    stderr
}
