//! The `lockguard` binary's command line: flags and the file, `check-config`, completions, the
//! manual page and `setup-sql`. The environment variables are in `cli_env.rs`, signals and a
//! running proxy in `cli_signals.rs`.

mod common;

use common::*;

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
    let ran = check_config(file.path(), &[]);
    assert!(!ran.ok);
    assert!(ran.stderr.contains("listen_backlog"), "{}", ran.stderr);
    assert!(ran.stderr.contains("line 3"), "{}", ran.stderr);
}

#[test]
fn check_config_rejects_a_bad_duration_naming_the_key() {
    let file = config_file("[proxy]\nstartup_timeout = \"ten seconds\"\n");
    let ran = check_config(file.path(), &[]);
    assert!(!ran.ok);
    assert!(ran.stderr.contains("startup_timeout"), "{}", ran.stderr);
    assert!(ran.stderr.contains("ten seconds"), "{}", ran.stderr);
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
    run_ok(lockguard_clean_env().args(["man", "--dir"]).arg(dir.path()));
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
    let out = run_ok(lockguard_clean_env().arg("setup-sql"));
    let sql = out;
    for expected in [
        "pg_signal_backend",
        "pg_read_all_stats",
        "SECURITY DEFINER",
        "scram_verifier",
        "REVOKE",
    ] {
        assert!(sql.contains(expected), "{expected} missing:\n{sql}");
    }
    let out = run_ok(lockguard_clean_env().args([
        "setup-sql",
        "--role",
        "guard\"; DROP TABLE x; --",
        "--schema",
        "lg",
    ]));
    let sql = out;
    assert!(sql.contains("\"guard\"\"; DROP TABLE x; --\""), "{sql}");
    assert!(!sql.contains("\"guard\"; DROP"), "{sql}");
}
