//! What the deployment tests share: the tools that check the files (skipped with a message
//! when missing, except under `CI=true`), reading the files, and a running lockguard.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use lockguard_sandbox::{Sandbox, SandboxOptions};
use serde_json::Value;

pub const WAIT: Duration = Duration::from_secs(20);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The workspace's target directory, where this test binary's `lockguard` was built.
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_lockguard"))
        .ancestors()
        .nth(2)
        .expect("target/<profile>/lockguard")
        .to_path_buf()
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The path of `tool` on PATH.
pub fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// `tool`'s path; without it the test is skipped with a message, or fails under `CI=true`.
pub fn require(tool: &str, install: &str) -> Option<PathBuf> {
    let found = on_path(tool);
    if found.is_none() {
        assert!(!in_ci(), "{tool} is missing and CI=true: {install}");
        eprintln!("SKIPPED: {tool} is not installed ({install})");
    }
    found
}

/// Runs `command`, panicking with its output unless it succeeds.
pub fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("could not run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

pub fn read(path: impl AsRef<Path>) -> String {
    let path = repo().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn yaml(path: &str) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `value[pointer]`, panicking with the pointer when it is missing.
pub fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in {value:#}"))
}

pub fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    at(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string"))
}

pub fn number(value: &Value, pointer: &str) -> u64 {
    at(value, pointer)
        .as_u64()
        .unwrap_or_else(|| panic!("{pointer} is not a number"))
}

// ---- a running lockguard ----------------------------------------------------------------

/// A lockguard process logging JSON lines; killed on drop.
pub struct Running {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<Value>,
    /// Events received while waiting for another one.
    events: Mutex<Vec<Value>>,
}

impl Running {
    pub fn start(mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (sender, lines) = mpsc::channel();
        let collected = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<Value>(&line) {
                    let _ = sender.send(event);
                }
                collected.lock().expect("logs").push(line);
            }
        });
        Running {
            child,
            logs,
            lines,
            events: Mutex::new(Vec::new()),
        }
    }

    /// The `listen` address of the log event `message`, logged before or within `WAIT`.
    pub fn address_of(&self, message: &str) -> SocketAddr {
        let mut events = self.events.lock().expect("events");
        let find = |event: &Value| {
            (event["message"] == message)
                .then(|| event["listen"].as_str().and_then(|a| a.parse().ok()))
                .flatten()
        };
        if let Some(addr) = events.iter().find_map(find) {
            return addr;
        }
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(event) = self.lines.recv_timeout(left) else {
                break;
            };
            if let Some(addr) = find(&event) {
                return addr;
            }
            events.push(event);
        }
        panic!("no {message:?} in the log:\n{}", self.logs())
    }

    pub fn logs(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over HTTP/1.0 (so the body is not chunked): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect to the HTTP endpoint");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

pub fn start_sandbox(pg_hba: &str, setup_sql: &str) -> Sandbox {
    Sandbox::start(SandboxOptions {
        temp_prefix: "lockguard-deploy-",
        pg_hba,
        settings: &[],
        setup_sql,
    })
    .expect("start a throwaway PostgreSQL")
}

pub fn read_path(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
