//! The `[admin]` section: its defaults, its users and the rules on who may log in how.

use std::net::SocketAddr;

use super::*;
use crate::tests::parse_err;

#[test]
fn admin_defaults_listen_on_loopback_with_the_console_off() {
    let c = Config::default();
    let a = &c.admin;
    assert_eq!(a.listen, "127.0.0.1:6433".parse::<SocketAddr>().unwrap());
    assert_eq!(
        a.http_listen,
        "127.0.0.1:9930".parse::<SocketAddr>().unwrap()
    );
    assert!(a.http_enabled);
    assert!(!a.trust_loopback);
    assert_eq!(a.auth_method, AdminAuthMethod::ScramSha256);
    assert!(a.users.is_empty());
    assert!(!a.console_enabled(), "no users, no trust: no console");
    assert_eq!(a.resolve_api_token(), Ok(None));
}

#[test]
fn admin_users_parse_print_and_parse_back_equal() {
    let c = Config::from_toml_str(
        r#"
[admin]
listen = "127.0.0.1:7433"
http_listen = "0.0.0.0:7930"
auth_method = "md5"
api_token = "s3cret"

[[admin.users]]
name = "ops"
password = "pw"
role = "admin"

[[admin.users]]
name = "grafana"
password_env = "LOCKGUARD_TEST_MONITOR_PW"
"#,
    )
    .unwrap();
    let a = &c.admin;
    assert!(a.console_enabled());
    assert_eq!(a.auth_method, AdminAuthMethod::Md5);
    assert_eq!(a.users.len(), 2);
    assert_eq!(a.users[0].role, AdminRole::Admin);
    assert_eq!(
        a.users[1].role,
        AdminRole::Monitor,
        "monitor is the default role"
    );
    assert_eq!(a.users[0].resolve_password(), Ok("pw".to_owned()));
    let missing = a.users[1].resolve_password().unwrap_err();
    assert!(missing.contains("LOCKGUARD_TEST_MONITOR_PW"), "{missing}");
    let text = c.to_toml_string();
    assert!(text.contains("[[admin.users]]"), "{text}");
    assert_eq!(Config::from_toml_str(&text).unwrap(), c, "{text}");
    let defaults = Config::default().to_toml_string();
    assert!(defaults.contains("[admin]"), "{defaults}");
    assert!(defaults.contains("admin console is disabled"), "{defaults}");
    assert_eq!(Config::from_toml_str(&defaults).unwrap(), Config::default());
}

#[test]
fn admin_rules_name_the_offending_key() {
    for (text, key) in [
        (
            "[admin]\nlisten = \"0.0.0.0:6433\"\ntrust_loopback = true\n",
            "admin.trust_loopback",
        ),
        ("[admin]\nlisten = \"127.0.0.1:6432\"\n", "admin.listen"),
        (
            "[admin]\nhttp_listen = \"127.0.0.1:6433\"\ntrust_loopback = true\n",
            "admin.http_listen",
        ),
        ("[admin]\napi_token = \" \"\n", "admin.api_token"),
        (
            "[admin]\napi_token = \"x\"\napi_token_env = \"Y\"\n",
            "admin.api_token_env",
        ),
        ("[[admin.users]]\nname = \"a\"\n", "admin.users[0].password"),
        (
            "[[admin.users]]\nname = \"a\"\npassword = \"p\"\npassword_env = \"P\"\n",
            "admin.users[0].password_env",
        ),
        (
            "[[admin.users]]\nname = \"a\"\npassword = \"p\"\n[[admin.users]]\nname = \"a\"\npassword = \"q\"\n",
            "admin.users[1].name",
        ),
        (
            "[[admin.users]]\nname = \"a\"\npassword = \"p\"\nrole = \"root\"\n",
            "admin.users[0].role",
        ),
        ("[admin]\nauth_method = \"plain\"\n", "admin.auth_method"),
    ] {
        let err = parse_err(text);
        assert_eq!(err.key(), Some(key), "{text}\n{err}");
        // A missing key has no line of its own.
        if !key.ends_with("[0].password") {
            assert!(err.line().is_some(), "{text}\n{err}");
        }
    }
    // Loopback trust is fine, and so is an IPv6 loopback.
    Config::from_toml_str("[admin]\nlisten = \"[::1]:6433\"\ntrust_loopback = true\n").unwrap();
}
