//! The `lockguard` binary's command line (issue 2, acceptance 10, and signal handling: SIGTERM
//! stops, SIGHUP reloads the configuration file).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
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

/// Every setting flag replaces the file's value; `--protect` replaces the whole list.
#[test]
fn every_flag_overrides_the_file() {
    let file = config_file(
        "[proxy]\nlisten = \"127.0.0.1:7000\"\n[log]\nformat = \"text\"\n\
         [guard]\nprotected_tables = [\"x.y\"]\nidle_in_transaction_timeout = \"30s\"\n\
         failed_transaction_timeout = \"20s\"\n[admin]\nlisten = \"127.0.0.1:6433\"\n",
    );
    let out = lockguard()
        .arg("check-config")
        .arg(file.path())
        .args(["--listen", "127.0.0.1:7001"])
        .args(["--log-format", "json"])
        .args(["--log-level", "info,lockguard=debug"])
        .args(["--guard-dsn", "host=127.0.0.1 user=guard"])
        .args(["--protect", "a.b", "--protect", "c.*"])
        .args(["--idle-in-transaction-timeout", "5s"])
        .args(["--failed-transaction-timeout", "0"])
        .arg("--dry-run")
        .args(["--admin-listen", "127.0.0.1:7433"])
        .args(["--admin-http-listen", "127.0.0.1:7930"])
        .output()
        .expect("run lockguard");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "listen = \"127.0.0.1:7001\"",
        "format = \"json\"",
        "level = \"info,lockguard=debug\"",
        "dsn = \"host=127.0.0.1 user=guard\"",
        "protected_tables = [\n    \"a.b\",\n    \"c.*\",\n]",
        "idle_in_transaction_timeout = \"5s\"",
        "failed_transaction_timeout = \"0s\"",
        "dry_run = true",
        "listen = \"127.0.0.1:7433\"",
        "http_listen = \"127.0.0.1:7930\"",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains("x.y"),
        "--protect keeps the file's list:\n{stdout}"
    );
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
            "--admin-http-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockguard");
    // Give it time to install its signal handlers.
    std::thread::sleep(Duration::from_millis(500));
    signal(&child, libc::SIGTERM);
    let status = exit_status_after_sigterm(&mut child);
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

/// Sends `signal` to the child.
fn signal(child: &Child, signal: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// Waits up to 10 s for the child, signalled with SIGTERM, to exit.
fn exit_status_after_sigterm(child: &mut Child) -> ExitStatus {
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
fn log_lines(child: &mut Child) -> mpsc::Receiver<String> {
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
fn wait_for_log(lines: &mpsc::Receiver<String>, parts: &[&str]) -> (String, Vec<String>) {
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

#[test]
fn sighup_reloads_the_file_and_a_broken_file_keeps_the_running_config() {
    let config = |protected: &str, level: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n\
             [log]\nformat = \"json\"\nlevel = \"{level}\"\n\
             [guard]\nprotected_tables = [\"{protected}\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n"
        )
    };
    let file = config_file(&config("app.before", "info"));
    let mut child = lockguard()
        .arg("--config")
        .arg(file.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockguard");
    let lines = log_lines(&mut child);
    wait_for_log(&lines, &["lockguard is accepting connections"]);

    std::fs::write(file.path(), config("app.after", "info")).expect("rewrite config");
    signal(&child, libc::SIGHUP);
    wait_for_log(
        &lines,
        &["configuration reloaded", "guard.protected_tables"],
    );

    let broken = "[guard]\nprotected_tables = [\n";
    std::fs::write(file.path(), broken).expect("break config");
    signal(&child, libc::SIGHUP);
    let (failed, before) = wait_for_log(&lines, &["SIGHUP reload failed"]);
    assert!(failed.contains("unchanged"), "{failed}");
    assert!(
        before.iter().any(|l| l.contains("SIGHUP received")),
        "info lines are logged: {before:?}"
    );

    // The log level changes live: at "warn" the reload's info lines are gone, its warning is
    // still there.
    std::fs::write(file.path(), config("app.after", "warn")).expect("rewrite config");
    signal(&child, libc::SIGHUP);
    // Lets that reload finish (pending signals would coalesce) and drops its lines, logged
    // partly before the level changed.
    std::thread::sleep(Duration::from_secs(1));
    let _: Vec<String> = lines.try_iter().collect();
    std::fs::write(file.path(), broken).expect("break config");
    signal(&child, libc::SIGHUP);
    let (_, before) = wait_for_log(&lines, &["SIGHUP reload failed"]);
    assert!(
        !before.iter().any(|l| l.contains("SIGHUP received")),
        "info lines are filtered out: {before:?}"
    );

    // Still serving: SIGTERM stops it cleanly.
    signal(&child, libc::SIGTERM);
    let status = exit_status_after_sigterm(&mut child);
    assert!(status.success(), "exit {status:?}");
}

/// A config file whose only console user takes its password from `var`.
fn config_with_password_env(var: &str) -> tempfile::NamedTempFile {
    config_file(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         [[admin.users]]\nname = \"ops\"\npassword_env = \"{var}\"\nrole = \"admin\"\n"
    ))
}

/// Runs `lockguard` with `args` and `var` set to `value` (or unset); it must fail at once.
/// Returns its stderr.
fn fails_with_env(args: &[&std::ffi::OsStr], var: &str, value: Option<&str>) -> String {
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

/// Waits up to 10 s for a child that is expected to exit by itself; SIGTERM if it does not.
fn exit_status_after_sigterm_or_exit(child: &mut Child) -> ExitStatus {
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

/// An admin password given by an empty (or unset) environment variable is a configuration
/// error naming the variable, in `check-config` and at start: an empty password would let
/// anyone log in.
#[test]
fn check_config_and_start_refuse_an_empty_secret_variable_naming_it() {
    let var = "LOCKGUARD_CLI_TEST_ADMIN_PASSWORD";
    let file = config_with_password_env(var);
    for value in [Some(""), Some(" \n"), None] {
        let check = fails_with_env(
            &["check-config".as_ref(), file.path().as_os_str()],
            var,
            value,
        );
        let start = fails_with_env(&["--config".as_ref(), file.path().as_os_str()], var, value);
        for stderr in [check, start] {
            assert!(stderr.contains(var), "{stderr}");
            assert!(stderr.contains("admin.users[0].password_env"), "{stderr}");
            assert!(stderr.contains("line 9"), "{stderr}");
        }
    }
    let out = lockguard()
        .arg("check-config")
        .arg(file.path())
        .env(var, "a-password")
        .output()
        .expect("run lockguard");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The effective configuration names the variable, never its value.
    assert!(!String::from_utf8_lossy(&out.stdout).contains("a-password"));
}

/// A malformed line holding a secret: `check-config`, a failed start and a failed SIGHUP
/// reload each name the line and the key, and none shows the value.
#[test]
fn a_malformed_secret_line_is_named_but_never_shown() {
    const SECRET: &str = "s3cr3t-cli-token";
    let good = "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n\
                [admin]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n";
    let broken = format!("{good}api_token = \"{SECRET}\n");
    let file = config_file(&broken);
    let check = fails_with_env(
        &["check-config".as_ref(), file.path().as_os_str()],
        "LOCKGUARD_CLI_TEST_UNUSED",
        None,
    );
    let start = fails_with_env(
        &["--config".as_ref(), file.path().as_os_str()],
        "LOCKGUARD_CLI_TEST_UNUSED",
        None,
    );
    for stderr in [&check, &start] {
        assert!(!stderr.contains(SECRET), "{stderr}");
        assert!(stderr.contains("line 7"), "{stderr}");
        assert!(stderr.contains("admin.api_token"), "{stderr}");
    }

    std::fs::write(file.path(), good).expect("write a good config");
    let mut child = lockguard()
        .arg("--config")
        .arg(file.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockguard");
    let lines = log_lines(&mut child);
    wait_for_log(&lines, &["lockguard is accepting connections"]);
    std::fs::write(file.path(), &broken).expect("break the config");
    signal(&child, libc::SIGHUP);
    let (failed, before) = wait_for_log(&lines, &["SIGHUP reload failed"]);
    assert!(failed.contains("line 7"), "{failed}");
    assert!(failed.contains("admin.api_token"), "{failed}");
    for line in before.iter().chain([&failed]) {
        assert!(!line.contains(SECRET), "{line}");
    }
    signal(&child, libc::SIGTERM);
    let status = exit_status_after_sigterm(&mut child);
    assert!(status.success(), "exit {status:?}");
}
