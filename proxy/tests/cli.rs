//! The `lockguard` binary's command line (issue 2, acceptance 10, and signal handling).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn lockguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lockguard"))
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(text.as_bytes()).expect("write config");
    file
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let file = config_file("[proxy]\nlisten = \"127.0.0.1:7000\"\nconnect_timeout = \"2s\"\n");
    let out = lockguard()
        .args(["check-config"])
        .arg(file.path())
        .args(["--upstream", "/var/run/postgresql:5433"])
        .output()
        .expect("run lockguard");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("listen = \"127.0.0.1:7000\""), "{stdout}");
    assert!(stdout.contains("connect_timeout = \"2s\""), "{stdout}");
    // The flag overrides the file, and defaults are filled in.
    assert!(
        stdout.contains("upstream = \"/var/run/postgresql:5433\""),
        "{stdout}"
    );
    assert!(stdout.contains("max_clients = 10000"), "{stdout}");
}

#[test]
fn check_config_rejects_an_unknown_key_naming_it_and_its_line() {
    let file = config_file("[proxy]\nlisten = \"127.0.0.1:7000\"\nlisten_backlog = 5\n");
    let out = lockguard()
        .arg("check-config")
        .arg(file.path())
        .output()
        .expect("run lockguard");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen_backlog"), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");
}

#[test]
fn check_config_rejects_a_bad_duration_naming_the_key() {
    let file = config_file("[proxy]\nstartup_timeout = \"ten seconds\"\n");
    let out = lockguard()
        .arg("check-config")
        .arg(file.path())
        .output()
        .expect("run lockguard");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("startup_timeout"), "{stderr}");
    assert!(stderr.contains("ten seconds"), "{stderr}");
}

#[test]
fn check_config_rejects_bad_flags() {
    let file = config_file("");
    let out = lockguard()
        .arg("check-config")
        .arg(file.path())
        .args(["--idle-in-transaction-timeout", "soon"])
        .output()
        .expect("run lockguard");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("soon"));
}

#[test]
fn sigterm_stops_the_proxy_cleanly() {
    let mut child = lockguard()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--log-format",
            "json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockguard");
    // Give it time to install its signal handlers.
    std::thread::sleep(Duration::from_millis(500));
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "lockguard did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("output");
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "exit {status:?}: {logs}");
    // JSON logs: one object per line.
    let first = logs.lines().next().expect("some log lines");
    assert!(
        first.starts_with('{') && first.contains("\"level\""),
        "{first}"
    );
    assert!(logs.contains("lockguard stopped"), "{logs}");
}
