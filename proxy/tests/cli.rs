//! The `lockguard` binary's command line: flags, variables and the file, `check-config`, the
//! generated help, and signal handling (SIGTERM stops, SIGHUP reloads the configuration file).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio_postgres::SimpleQueryMessage;

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
    let lines = log_lines(&mut child);
    // The stop signals' handlers are installed before the proxy says it accepts.
    let (accepting, before) = wait_for_log(&lines, &["lockguard is accepting connections"]);
    signal(&child, libc::SIGTERM);
    let status = exit_status_after_sigterm(&mut child);
    // The reader thread ends at the closed pipe: these are all the remaining lines.
    let after: Vec<String> = lines.iter().collect();
    let logs = [before, vec![accepting], after].concat().join("\n");
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

/// The `listen` field of a JSON log line.
fn logged_address(line: &str) -> SocketAddr {
    let fields: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    fields["listen"]
        .as_str()
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line}"))
}

/// Waits up to 10 s until the admin console's SHOW CONFIG gives `key` the value `value`: the
/// running configuration, which RELOAD replaces last.
fn wait_for_console_setting(console: SocketAddr, key: &str, value: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::Config::new()
            .host(console.ip().to_string())
            .port(console.port())
            .user("admin")
            .dbname("lockguard")
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect to the admin console");
        tokio::spawn(connection);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let shown = client
                .simple_query("SHOW CONFIG")
                .await
                .expect("SHOW CONFIG")
                .into_iter()
                .find_map(|message| match message {
                    SimpleQueryMessage::Row(row) if row.get("key") == Some(key) => {
                        row.get("value").map(str::to_owned)
                    }
                    _ => None,
                });
            if shown.as_deref() == Some(value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "SHOW CONFIG still shows {key} = {shown:?}, not {value:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn sighup_reloads_the_file_and_a_broken_file_keeps_the_running_config() {
    let config = |protected: &str, level: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n\
             [log]\nformat = \"json\"\nlevel = \"{level}\"\n\
             [guard]\nprotected_tables = [\"{protected}\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
             trust_loopback = true\n"
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
    // SIGHUP's handler is installed before anything is served.
    let (serving, _) = wait_for_log(&lines, &["admin console is accepting connections"]);
    let console = logged_address(&serving);

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
    // That reload's own line, logged before the level changed; then its end, seen on the
    // console, before the file changes again under it.
    wait_for_log(&lines, &["SIGHUP received"]);
    wait_for_console_setting(console, "log.level", "warn");
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

// ---- environment variables, completions and the manual page --------------------------------

/// A setting given through its environment variable and through its flag: the value each way
/// and the line `check-config` prints for it. The variable's value differs from the flag's
/// and from the file's (see `ENV_TEST_FILE`), so each line shows which source won.
struct EnvSetting {
    variable: &'static str,
    env_value: &'static str,
    env_line: &'static str,
    flag: &'static [&'static str],
    flag_line: &'static str,
}

/// Every setting flag and its variable.
const ENV_SETTINGS: &[EnvSetting] = &[
    EnvSetting {
        variable: "LOCKGUARD_LISTEN",
        env_value: "127.0.0.1:7101",
        env_line: "listen = \"127.0.0.1:7101\"",
        flag: &["--listen", "127.0.0.1:7201"],
        flag_line: "listen = \"127.0.0.1:7201\"",
    },
    EnvSetting {
        variable: "LOCKGUARD_UPSTREAM",
        env_value: "db.example:5433",
        env_line: "upstream = \"db.example:5433\"",
        flag: &["--upstream", "/run/postgresql:5434"],
        flag_line: "upstream = \"/run/postgresql:5434\"",
    },
    EnvSetting {
        variable: "LOCKGUARD_LOG_FORMAT",
        env_value: "json",
        env_line: "format = \"json\"",
        flag: &["--log-format", "text"],
        flag_line: "format = \"text\"",
    },
    EnvSetting {
        variable: "LOCKGUARD_LOG_LEVEL",
        env_value: "warn,lockguard=debug",
        env_line: "level = \"warn,lockguard=debug\"",
        flag: &["--log-level", "error"],
        flag_line: "level = \"error\"",
    },
    EnvSetting {
        variable: "LOCKGUARD_GUARD_DSN",
        env_value: "host=10.0.0.1 user=from_env",
        env_line: "dsn = \"host=10.0.0.1 user=from_env\"",
        flag: &["--guard-dsn", "host=10.0.0.2 user=from_flag"],
        flag_line: "dsn = \"host=10.0.0.2 user=from_flag\"",
    },
    EnvSetting {
        variable: "LOCKGUARD_PROTECT",
        env_value: "env.one, env.*",
        env_line: "protected_tables = [\n    \"env.one\",\n    \"env.*\",\n]",
        flag: &["--protect", "flag.one"],
        flag_line: "protected_tables = [\"flag.one\"]",
    },
    EnvSetting {
        variable: "LOCKGUARD_IDLE_IN_TRANSACTION_TIMEOUT",
        env_value: "7s",
        env_line: "idle_in_transaction_timeout = \"7s\"",
        flag: &["--idle-in-transaction-timeout", "8s"],
        flag_line: "idle_in_transaction_timeout = \"8s\"",
    },
    EnvSetting {
        variable: "LOCKGUARD_FAILED_TRANSACTION_TIMEOUT",
        env_value: "0",
        env_line: "failed_transaction_timeout = \"0s\"",
        flag: &["--failed-transaction-timeout", "9s"],
        flag_line: "failed_transaction_timeout = \"9s\"",
    },
    // The flag can only switch dry-run on, so here the variable says "off" and the flag wins;
    // `a_dry_run_variable_takes_the_usual_spellings` covers switching it on.
    EnvSetting {
        variable: "LOCKGUARD_DRY_RUN",
        env_value: "off",
        env_line: "dry_run = false",
        flag: &["--dry-run"],
        flag_line: "dry_run = true",
    },
    EnvSetting {
        variable: "LOCKGUARD_ADMIN_LISTEN",
        env_value: "127.0.0.1:7433",
        env_line: "listen = \"127.0.0.1:7433\"",
        flag: &["--admin-listen", "127.0.0.1:7533"],
        flag_line: "listen = \"127.0.0.1:7533\"",
    },
    EnvSetting {
        variable: "LOCKGUARD_ADMIN_HTTP_LISTEN",
        env_value: "127.0.0.1:7930",
        env_line: "http_listen = \"127.0.0.1:7930\"",
        flag: &["--admin-http-listen", "127.0.0.1:7931"],
        flag_line: "http_listen = \"127.0.0.1:7931\"",
    },
];

/// A file whose values differ from every variable's and flag's (dry-run aside: it is off
/// here, the variable keeps it off).
const ENV_TEST_FILE: &str =
    "[proxy]\nlisten = \"127.0.0.1:7001\"\nupstream = \"file.example:5432\"\n\
    [log]\nformat = \"text\"\nlevel = \"info\"\n\
    [guard]\ndsn = \"host=10.0.0.3 user=from_file\"\nprotected_tables = [\"file.one\"]\n\
    idle_in_transaction_timeout = \"30s\"\nfailed_transaction_timeout = \"20s\"\n\
    [admin]\nlisten = \"127.0.0.1:6433\"\nhttp_listen = \"127.0.0.1:9930\"\n";

/// `lockguard` with none of its variables inherited from the test's own environment.
fn lockguard_clean_env() -> Command {
    let mut command = lockguard();
    command.env_remove("LOCKGUARD_CONFIG");
    for setting in ENV_SETTINGS {
        command.env_remove(setting.variable);
    }
    command
}

/// Runs `check-config` on `ENV_TEST_FILE` with every variable set and `flags`; returns stdout.
fn check_config_with_every_variable(flags: &[&str]) -> String {
    let file = config_file(ENV_TEST_FILE);
    let mut command = lockguard_clean_env();
    command.arg("check-config").arg(file.path()).args(flags);
    for setting in ENV_SETTINGS {
        command.env(setting.variable, setting.env_value);
    }
    let out = command.output().expect("run lockguard");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_setting_variable_overrides_the_file() {
    let stdout = check_config_with_every_variable(&[]);
    for setting in ENV_SETTINGS {
        assert!(
            stdout.contains(setting.env_line),
            "{} did not apply: missing {:?} in:\n{stdout}",
            setting.variable,
            setting.env_line
        );
    }
    for from_file in [
        "listen = \"127.0.0.1:7001\"",
        "file.example",
        "from_file",
        "file.one",
        "level = \"info\"",
        "format = \"text\"",
        "idle_in_transaction_timeout = \"30s\"",
        "failed_transaction_timeout = \"20s\"",
        "listen = \"127.0.0.1:6433\"",
        "listen = \"127.0.0.1:9930\"",
    ] {
        assert!(
            !stdout.contains(from_file),
            "the file's {from_file:?} survived:\n{stdout}"
        );
    }
}

#[test]
fn every_flag_beats_its_variable() {
    let flags: Vec<&str> = ENV_SETTINGS
        .iter()
        .flat_map(|s| s.flag.iter().copied())
        .collect();
    let stdout = check_config_with_every_variable(&flags);
    for setting in ENV_SETTINGS {
        assert!(
            stdout.contains(setting.flag_line),
            "the flag did not beat {}: missing {:?} in:\n{stdout}",
            setting.variable,
            setting.flag_line
        );
        assert!(
            !stdout.contains(setting.env_line),
            "{} beat its flag: {:?} in:\n{stdout}",
            setting.variable,
            setting.env_line
        );
    }
}

#[test]
fn help_names_every_variable_and_hides_the_dsn_value() {
    let secret = "password=hunter2";
    for args in [&["--help"][..], &["check-config", "--help"]] {
        let out = lockguard_clean_env()
            .args(args)
            .env("LOCKGUARD_GUARD_DSN", format!("host=db {secret}"))
            .env("LOCKGUARD_LISTEN", "127.0.0.1:7101")
            .output()
            .expect("run lockguard");
        // clap wraps long lines at its own width: compare with the words rejoined.
        let help = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(out.status.success(), "{args:?}: {help}");
        for setting in ENV_SETTINGS {
            assert!(
                help.contains(&format!("[env: {}", setting.variable)),
                "{args:?} does not name {}:\n{help}",
                setting.variable
            );
        }
        // Other variables' values are shown (that is how a user sees what is in force)...
        assert!(
            help.contains("[env: LOCKGUARD_LISTEN=127.0.0.1:7101]"),
            "{help}"
        );
        // ...but not the DSN's, which may carry a password.
        assert!(!help.contains(secret), "{args:?} shows the DSN:\n{help}");
    }
    let out = lockguard_clean_env()
        .arg("--help")
        .output()
        .expect("run lockguard");
    assert!(String::from_utf8_lossy(&out.stdout).contains("[env: LOCKGUARD_CONFIG"));
}

/// LOCKGUARD_CONFIG names the file the proxy reads, and --config beats it: each file has an
/// unknown key, and the error names the one read.
#[test]
fn lockguard_config_names_the_file_and_the_flag_beats_it() {
    let from_env = config_file("[proxy]\nalpha_key = 1\n");
    let from_flag = config_file("[proxy]\nbeta_key = 1\n");
    let out = lockguard_clean_env()
        .env("LOCKGUARD_CONFIG", from_env.path())
        .output()
        .expect("run lockguard");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("alpha_key"), "{stderr}");

    let out = lockguard_clean_env()
        .env("LOCKGUARD_CONFIG", from_env.path())
        .arg("--config")
        .arg(from_flag.path())
        .output()
        .expect("run lockguard");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("beta_key") && !stderr.contains("alpha_key"),
        "{stderr}"
    );
}

#[test]
fn a_dry_run_variable_takes_the_usual_spellings() {
    let file = config_file("");
    for (value, expected) in [
        ("true", "dry_run = true"),
        ("yes", "dry_run = true"),
        ("1", "dry_run = true"),
        ("on", "dry_run = true"),
        ("false", "dry_run = false"),
        ("0", "dry_run = false"),
    ] {
        let out = lockguard_clean_env()
            .arg("check-config")
            .arg(file.path())
            .env("LOCKGUARD_DRY_RUN", value)
            .output()
            .expect("run lockguard");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{value}: {stdout}");
        assert!(stdout.contains(expected), "{value}: {stdout}");
    }
}

#[test]
fn an_invalid_variable_is_an_error_naming_the_value() {
    let file = config_file("");
    for (variable, value) in [
        ("LOCKGUARD_IDLE_IN_TRANSACTION_TIMEOUT", "soon"),
        ("LOCKGUARD_DRY_RUN", "maybe"),
        ("LOCKGUARD_LISTEN", "nowhere"),
        ("LOCKGUARD_PROTECT", "a.b,c d"),
    ] {
        let out = lockguard_clean_env()
            .arg("check-config")
            .arg(file.path())
            .env(variable, value)
            .output()
            .expect("run lockguard");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{variable}={value} was accepted");
        let named = value.rsplit(',').next().unwrap_or(value);
        assert!(stderr.contains(named), "{variable}={value}: {stderr}");
    }
}

/// A list of patterns keeps a comma inside a quoted identifier.
#[test]
fn a_protect_list_keeps_commas_inside_quoted_names() {
    let file = config_file("");
    let out = lockguard_clean_env()
        .arg("check-config")
        .arg(file.path())
        .env("LOCKGUARD_PROTECT", r#""Odd, Schema".t, app.user_sessions"#)
        .output()
        .expect("run lockguard");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#"'"Odd, Schema".t'"#), "{stdout}");
    assert!(stdout.contains("\"app.user_sessions\""), "{stdout}");
}

#[test]
fn completion_scripts_cover_the_subcommands_and_flags() {
    for (shell, marker) in [
        ("bash", "complete -F _lockguard"),
        ("zsh", "#compdef lockguard"),
        ("fish", "complete -c lockguard"),
    ] {
        let out = lockguard_clean_env()
            .args(["completions", shell])
            .output()
            .expect("run lockguard");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}: {script}");
        for expected in [
            marker,
            "check-config",
            "completions",
            "upstream",
            "admin-http-listen",
            "idle-in-transaction-timeout",
        ] {
            assert!(script.contains(expected), "{shell} lacks {expected:?}");
        }
        assert!(
            !script.contains("demo-app"),
            "{shell} offers the hidden demo-app"
        );
    }
    let out = lockguard_clean_env()
        .args(["completions", "tcsh"])
        .output()
        .expect("run lockguard");
    assert!(!out.status.success());
}

#[test]
fn the_manual_page_documents_flags_variables_and_subcommands() {
    let out = lockguard_clean_env()
        .arg("man")
        .output()
        .expect("run lockguard");
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{page}");
    assert!(page.contains(".TH lockguard 1"), "{page}");
    // roff writes a hyphen as `\-`.
    for expected in [
        r"\-\-upstream",
        r"\-\-admin\-http\-listen",
        "LOCKGUARD_UPSTREAM",
        "LOCKGUARD_CONFIG",
        r"lockguard\-check\-config(1)",
        r"lockguard\-completions(1)",
    ] {
        assert!(page.contains(expected), "the page lacks {expected:?}");
    }
    assert!(
        !page.contains(r"demo\-app"),
        "the page lists the hidden demo-app"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let out = lockguard_clean_env()
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run lockguard");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read the man dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert_eq!(
        pages,
        [
            "lockguard-check-config.1",
            "lockguard-completions.1",
            "lockguard-demo.1",
            "lockguard-man.1",
            "lockguard-setup-sql.1",
            "lockguard.1"
        ]
    );
    let check_config =
        std::fs::read_to_string(dir.path().join("lockguard-check-config.1")).expect("read page");
    assert!(check_config.contains("LOCKGUARD_PROTECT"), "{check_config}");
}

/// `lockguard setup-sql` prints the shipped script for the role and schema asked for, with the
/// names quoted as identifiers (a hostile name stays one identifier).
#[test]
fn setup_sql_prints_the_guard_role_script_with_quoted_names() {
    let out = lockguard_clean_env()
        .arg("setup-sql")
        .output()
        .expect("run lockguard");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sql = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "pg_signal_backend",
        "pg_read_all_stats",
        "SECURITY DEFINER",
        "scram_verifier",
        "REVOKE",
    ] {
        assert!(sql.contains(expected), "{expected} missing:\n{sql}");
    }
    let out = lockguard_clean_env()
        .args([
            "setup-sql",
            "--role",
            "guard\"; DROP TABLE x; --",
            "--schema",
            "lg",
        ])
        .output()
        .expect("run lockguard");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sql = String::from_utf8_lossy(&out.stdout);
    assert!(sql.contains("\"guard\"\"; DROP TABLE x; --\""), "{sql}");
    assert!(!sql.contains("\"guard\"; DROP"), "{sql}");
}
