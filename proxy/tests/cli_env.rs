//! The `LOCKGUARD_*` environment variables: each overrides the file, each flag beats its
//! variable, `--help` names them (never the DSN's value), and bad values are errors that
//! name them.

mod common;

use common::*;

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

/// Runs `check-config` on `ENV_TEST_FILE` with every variable set and `flags`; returns stdout.
fn check_config_with_every_variable(flags: &[&str]) -> String {
    let file = config_file(ENV_TEST_FILE);
    let mut command = lockguard_clean_env();
    command.arg("check-config").arg(file.path()).args(flags);
    for setting in ENV_SETTINGS {
        command.env(setting.variable, setting.env_value);
    }
    let ran = run(&mut command);
    assert!(ran.ok, "{}", ran.stderr);
    ran.stdout
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
    let ran = run(lockguard_clean_env().env("LOCKGUARD_CONFIG", from_env.path()));
    assert!(!ran.ok);
    assert!(ran.stderr.contains("alpha_key"), "{}", ran.stderr);

    let ran = run(lockguard_clean_env()
        .env("LOCKGUARD_CONFIG", from_env.path())
        .arg("--config")
        .arg(from_flag.path()));
    assert!(!ran.ok);
    let stderr = ran.stderr;
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
        let ran = check_config(file.path(), &[("LOCKGUARD_DRY_RUN", value)]);
        assert!(ran.ok, "{value}: {}", ran.stderr);
        assert!(ran.stdout.contains(expected), "{value}: {}", ran.stdout);
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
        let ran = check_config(file.path(), &[(variable, value)]);
        assert!(!ran.ok, "{variable}={value} was accepted");
        let named = value.rsplit(',').next().unwrap_or(value);
        assert!(
            ran.stderr.contains(named),
            "{variable}={value}: {}",
            ran.stderr
        );
    }
}

/// A list of patterns keeps a comma inside a quoted identifier.
#[test]
fn a_protect_list_keeps_commas_inside_quoted_names() {
    let file = config_file("");
    let list = r#""Odd, Schema".t, app.user_sessions"#;
    let ran = check_config(file.path(), &[("LOCKGUARD_PROTECT", list)]);
    assert!(ran.ok, "{}", ran.stderr);
    let stdout = ran.stdout;
    assert!(stdout.contains(r#"'"Odd, Schema".t'"#), "{stdout}");
    assert!(stdout.contains("\"app.user_sessions\""), "{stdout}");
}
