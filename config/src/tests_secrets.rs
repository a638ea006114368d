//! Secrets in the file and in the environment: never shown in an error, never empty, and a
//! variable that names one must be set.

use super::*;
use crate::tests::{parse_err, tempfile_dir};

/// A malformed line holding a secret: the error names the line and the key, and shows
/// nothing of the value — not in its text, not in its Debug form (what a panic or `{:?}`
/// prints), whatever the kind of mistake.
#[test]
fn parse_errors_never_show_a_secret_value() {
    for (text, key, line) in [
        // Unterminated string.
        ("[admin]\napi_token = \"s3cr3t-token\n", "api_token", 2),
        // A bare word instead of a string.
        (
            "[admin]\nlisten = \"127.0.0.1:1\"\napi_token = s3cr3t-token\n",
            "api_token",
            3,
        ),
        // The wrong type: serde quotes the value it got.
        ("[admin]\napi_token = 5551234987\n", "admin.api_token", 2),
        // Junk after the value.
        (
            "[[admin.users]]\nname = \"ops\"\npassword = \"s3cr3t\" junk\n",
            "password",
            3,
        ),
        // The password inside the guard's connection string.
        ("[guard]\ndsn = \"host=db password=s3cr3t\n", "dsn", 2),
        // A misspelt secret key is unknown: its value is not shown either.
        (
            "[admin]\napi_tokn = \"s3cr3t-token\"\n",
            "admin.api_tokn",
            2,
        ),
        // An inline table holding a secret, broken elsewhere on the line.
        (
            "admin = { api_token = \"s3cr3t\", bogus = 1 }\n",
            "admin.bogus",
            1,
        ),
        // The same secret twice.
        (
            "[admin]\napi_token = \"s3cr3t\"\napi_token = \"s3cr3t\"\n",
            "api_token",
            3,
        ),
    ] {
        let e = parse_err(text);
        let shown = e.to_string();
        let debug = format!("{e:?}");
        for secret in ["s3cr3t", "5551234987"] {
            assert!(
                !shown.contains(secret),
                "{text:?} shows the secret:\n{shown}"
            );
            assert!(
                !debug.contains(secret),
                "{text:?} shows the secret:\n{debug}"
            );
        }
        assert_eq!(e.line(), Some(line), "{text:?}: {shown}");
        assert!(shown.contains(&format!("line {line}")), "{text:?}: {shown}");
        assert!(shown.contains(key), "{text:?} does not name {key}: {shown}");
    }
}

/// The source line is still shown for mistakes in ordinary keys.
#[test]
fn parse_errors_in_ordinary_keys_show_the_line() {
    let e = parse_err("[proxy]\nstartup_timeout = \"ten seconds\"\nconnect_timeout = 5s\n");
    let shown = e.to_string();
    assert!(shown.contains("connect_timeout = 5s"), "{shown}");
}

#[test]
fn secrets_in_the_file_must_not_be_empty() {
    for (text, key) in [
        ("[admin]\napi_token = \"\"\n", "admin.api_token"),
        ("[admin]\napi_token = \" \\n\"\n", "admin.api_token"),
        (
            "[[admin.users]]\nname = \"ops\"\npassword = \"\"\n",
            "admin.users[0].password",
        ),
        (
            "[[admin.users]]\nname = \"ops\"\npassword = \"  \"\n",
            "admin.users[0].password",
        ),
    ] {
        let e = parse_err(text);
        assert_eq!(e.key(), Some(key), "{text}\n{e}");
        assert!(e.to_string().contains("empty"), "{e}");
    }
}

/// Secrets given by environment variable are read by `Config::load` (start, check-config,
/// RELOAD): unset or empty is an error naming the variable and the key's line.
#[test]
fn load_refuses_unset_or_empty_secret_variables_naming_them() {
    let empty = "LOCKGUARD_CONFIG_TEST_EMPTY_SECRET";
    let blank = "LOCKGUARD_CONFIG_TEST_BLANK_SECRET";
    let good = "LOCKGUARD_CONFIG_TEST_GOOD_SECRET";
    let unset = "LOCKGUARD_CONFIG_TEST_SURELY_UNSET_SECRET";
    // SAFETY (edition 2024 terms): these variables are used by this test only.
    std::env::set_var(empty, "");
    std::env::set_var(blank, " \n");
    std::env::set_var(good, "a-password");
    std::env::remove_var(unset);
    let dir = tempfile_dir();
    let file = dir.join("secrets.toml");
    for (text, key, line) in [
        (
            format!("[guard]\npassword_env = \"{empty}\"\n"),
            "guard.password_env",
            2,
        ),
        (
            format!("[guard]\npassword_env = \"{unset}\"\n"),
            "guard.password_env",
            2,
        ),
        (
            format!("[admin]\napi_token_env = \"{blank}\"\n"),
            "admin.api_token_env",
            2,
        ),
        (
            format!(
                "[[admin.users]]\nname = \"a\"\npassword_env = \"{good}\"\n\
                 [[admin.users]]\nname = \"b\"\n\npassword_env = \"{empty}\"\n"
            ),
            "admin.users[1].password_env",
            7,
        ),
    ] {
        std::fs::write(&file, &text).expect("write config");
        let e = Config::load(&file).expect_err(&text);
        let shown = e.to_string();
        assert_eq!(e.key(), Some(key), "{text}\n{shown}");
        assert_eq!(e.line(), Some(line), "{text}\n{shown}");
        let var = [empty, blank, unset]
            .into_iter()
            .find(|v| text.contains(v))
            .expect("a variable");
        assert!(shown.contains(var), "{shown}");
        // Pure parsing does not read the environment.
        Config::from_toml_str(&text).expect("parses without the environment");
        assert!(Config::from_toml_str(&text)
            .unwrap()
            .check_secrets()
            .is_err());
    }
    std::fs::write(
        &file,
        format!("[admin]\napi_token_env = \"{good}\"\n[guard]\npassword_env = \"{good}\"\n"),
    )
    .expect("write config");
    let c = Config::load(&file).expect("set variables load");
    assert_eq!(
        c.admin.resolve_api_token(),
        Ok(Some("a-password".to_owned()))
    );
    assert_eq!(
        c.guard.resolve_password(),
        Ok(Some("a-password".to_owned()))
    );
    let _ = std::fs::remove_dir_all(dir);
}
