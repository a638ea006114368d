//! The running `lockguard` and its signals: SIGTERM stops it cleanly, SIGHUP reloads the
//! configuration file (a broken file keeps the running configuration), and secrets a file
//! names are checked at start and never shown.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::SimpleQueryMessage;

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
    let (mut child, lines) = spawn_with_config(file.path());
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
    let out = run_ok(
        lockguard()
            .arg("check-config")
            .arg(file.path())
            .env(var, "a-password"),
    );
    // The effective configuration names the variable, never its value.
    assert!(!out.contains("a-password"));
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
    let (mut child, lines) = spawn_with_config(file.path());
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
