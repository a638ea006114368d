//! Loading, validation and printing, end to end through the TOML text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

pub(crate) fn parse_err(text: &str) -> ConfigError {
    match Config::from_toml_str(text) {
        Ok(c) => panic!("expected an error for:\n{text}\ngot {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn an_empty_file_gives_the_documented_defaults() {
    let c = Config::from_toml_str("").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(
        c.proxy.listen,
        "127.0.0.1:6432".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.proxy.upstream.to_string(), "127.0.0.1:5432");
    assert_eq!(c.proxy.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.proxy.startup_timeout, Duration::from_secs(10));
    assert_eq!(c.proxy.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.proxy.max_clients, 10_000);
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.log.level, "info");
    let g = &c.guard;
    assert_eq!(g.dsn, None);
    assert!(!g.enabled());
    assert_eq!(g.password_env, None);
    assert!(g.protected_tables.is_empty());
    assert_eq!(g.on_client_loss, ClientLossAction::Terminate);
    assert_eq!(g.inflight_grace, Duration::from_secs(1));
    assert_eq!(g.idle_in_transaction_timeout, Duration::from_secs(60));
    assert_eq!(g.failed_transaction_timeout, Duration::from_secs(10));
    assert!(!g.require_waiters);
    assert_eq!(g.sweep_interval, Duration::from_secs(1));
    assert!(!g.dry_run);
    assert_eq!(g.audit_log, None);
    c.validate().unwrap();
}

#[test]
fn a_partial_section_keeps_defaults_for_the_rest() {
    let c = Config::from_toml_str(
        r#"
[proxy]
startup_timeout = "500ms"
upstream = "/var/run/postgresql"

[guard]
dsn = "host=/var/run/postgresql user=lockguard"
protected_tables = ["public.sessions", "billing.*"]
on_client_loss = "log"
idle_in_transaction_timeout = "0"
failed_transaction_timeout = 0
"#,
    )
    .unwrap();
    assert_eq!(c.proxy.startup_timeout, Duration::from_millis(500));
    assert_eq!(c.proxy.connect_timeout, Duration::from_secs(5));
    assert_eq!(
        c.proxy.upstream.socket_path(),
        Some(PathBuf::from("/var/run/postgresql/.s.PGSQL.5432"))
    );
    assert!(c.guard.enabled());
    assert_eq!(c.guard.on_client_loss, ClientLossAction::Log);
    assert_eq!(c.guard.idle_in_transaction_timeout, Duration::ZERO);
    assert_eq!(c.guard.failed_transaction_timeout, Duration::ZERO);
    let patterns = c.guard.table_patterns();
    assert_eq!(patterns.len(), 2);
    assert!(patterns[0].matches("public", "sessions"));
    assert!(patterns[1].matches("billing", "invoices"));
}

#[test]
fn unknown_keys_are_rejected_naming_key_and_line_in_every_section() {
    for (text, key, line) in [
        ("bogus = 1\n", "bogus", 1),
        ("\n\n[bogus]\nx = 1\n", "bogus", 3),
        (
            "[proxy]\nlisten = \"0.0.0.0:6432\"\nlisten_addr = \"x\"\n",
            "proxy.listen_addr",
            3,
        ),
        (
            "[log]\nlevel = \"info\"\n\nfromat = \"json\"\n",
            "log.fromat",
            4,
        ),
        (
            "[guard]\ndry_run = true\nprotected_table = []\n",
            "guard.protected_table",
            3,
        ),
        ("proxy.max_client = 5\n", "proxy.max_client", 1),
    ] {
        let e = parse_err(text);
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Parse { .. }), "{msg}");
        assert_eq!(e.key(), Some(key), "{msg}");
        assert_eq!(e.line(), Some(line), "{msg}");
        let last = key.rsplit('.').next().unwrap_or(key);
        assert!(msg.contains(&format!("unknown field `{last}`")), "{msg}");
        assert!(msg.contains(&format!("line {line},")), "{msg}");
        assert!(msg.starts_with(&format!("{key}: ")), "{msg}");
    }
}

#[test]
fn a_bad_duration_names_key_line_and_reason() {
    let e = parse_err("[proxy]\nlisten = \"127.0.0.1:6432\"\nstartup_timeout = \"ten seconds\"\n");
    let msg = e.to_string();
    assert_eq!(e.key(), Some("proxy.startup_timeout"));
    assert_eq!(e.line(), Some(3));
    assert!(
        msg.starts_with("proxy.startup_timeout: TOML parse error at line 3, column 19"),
        "{msg}"
    );
    assert!(msg.contains("startup_timeout = \"ten seconds\""), "{msg}");
    assert!(
        msg.contains("invalid duration \"ten seconds\": expected number at 0"),
        "{msg}"
    );

    let e = parse_err("[guard]\nsweep_interval = 5\n");
    assert_eq!(e.key(), Some("guard.sweep_interval"));
    assert!(e.to_string().contains("add a unit, e.g. \"5s\""), "{e}");

    let e = parse_err("[guard]\ninflight_grace = \"1 fortnight\"\n");
    assert!(
        e.to_string().contains("unknown time unit \"fortnight\""),
        "{e}"
    );
}

#[test]
fn wrong_types_and_bad_enum_values_name_the_key() {
    for (text, key) in [
        ("[proxy]\nmax_clients = \"many\"\n", "proxy.max_clients"),
        ("[proxy]\nlisten = \"localhost\"\n", "proxy.listen"),
        ("[proxy]\nupstream = \"db.internal\"\n", "proxy.upstream"),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        (
            "[guard]\non_client_loss = \"kill\"\n",
            "guard.on_client_loss",
        ),
        ("[guard]\ndry_run = \"yes\"\n", "guard.dry_run"),
    ] {
        let e = parse_err(text);
        assert_eq!(e.key(), Some(key), "{e}");
        assert_eq!(e.line(), Some(2), "{e}");
    }
    let e = parse_err("[proxy]\nupstream = \"db.internal\"\n");
    assert!(e.to_string().contains("missing port"), "{e}");
}

#[test]
fn syntax_errors_report_the_line() {
    let e = parse_err("[proxy]\nlisten = \n");
    assert_eq!(e.line(), Some(2), "{e}");
    assert!(e.to_string().contains("line 2"), "{e}");
}

#[test]
fn validation_errors_name_key_path_and_line() {
    for (text, key, line) in [
        (
            "[proxy]\nconnect_timeout = \"0s\"\n",
            "proxy.connect_timeout",
            2,
        ),
        (
            "\n[proxy]\n\nstartup_timeout = \"0\"\n",
            "proxy.startup_timeout",
            4,
        ),
        ("[proxy]\nmax_clients = 0\n", "proxy.max_clients", 2),
        ("[log]\nlevel = \"  \"\n", "log.level", 2),
        (
            "[guard]\nsweep_interval = \"0ms\"\n",
            "guard.sweep_interval",
            2,
        ),
        ("[guard]\ndsn = \"\"\n", "guard.dsn", 2),
        ("[guard]\naudit_log = \"\"\n", "guard.audit_log", 2),
    ] {
        let e = parse_err(text);
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e}");
        assert_eq!(e.key(), Some(key), "{e}");
        assert_eq!(e.line(), Some(line), "{e}");
        assert!(
            e.to_string().starts_with(&format!("line {line}: {key}: ")),
            "{e}"
        );
    }
    let e = parse_err("[proxy]\nstartup_timeout = \"0s\"\n");
    assert_eq!(
        e.to_string(),
        "line 2: proxy.startup_timeout: must be greater than 0"
    );
}

#[test]
fn a_bad_protected_table_names_its_index_and_line() {
    let e = parse_err(
        "[guard]\nprotected_tables = [\n  \"public.sessions\",\n  \"billing.*\",\n  \"a.b.c\",\n]\n",
    );
    assert_eq!(e.key(), Some("guard.protected_tables[2]"));
    assert_eq!(e.line(), Some(5));
    let msg = e.to_string();
    assert!(
        msg.starts_with("line 5: guard.protected_tables[2]: invalid table pattern \"a.b.c\""),
        "{msg}"
    );
}

#[test]
fn validate_on_a_config_built_in_code_names_the_key_without_a_line() {
    let mut c = Config::default();
    c.guard.protected_tables = vec!["ok".into(), "\"open".into()];
    let e = c.validate().unwrap_err();
    assert_eq!(e.key(), Some("guard.protected_tables[1]"));
    assert_eq!(e.line(), None);
    assert!(c.guard.table_patterns().len() == 1);
}

#[test]
fn load_names_the_file_in_read_parse_and_validation_errors() {
    let dir = std::env::temp_dir().join(format!("lockguard-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let missing = dir.join("missing.toml");
    let e = Config::load(&missing).unwrap_err();
    assert!(e
        .to_string()
        .starts_with(&format!("cannot read config file {}", missing.display())));

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[guard]\nsweep_interval = \"soon\"\n").unwrap();
    let e = Config::load(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}: guard.sweep_interval: TOML parse error at line 2",
            bad.display()
        )),
        "{e}"
    );

    let invalid = dir.join("invalid.toml");
    std::fs::write(&invalid, "[proxy]\nmax_clients = 0\n").unwrap();
    let e = Config::load(&invalid).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: line 2: proxy.max_clients: must be greater than 0",
            invalid.display()
        )
    );

    let good = dir.join("good.toml");
    std::fs::write(&good, "[log]\nformat = \"json\"\n").unwrap();
    assert_eq!(Config::load(&good).unwrap().log.format, LogFormat::Json);

    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_effective_config_lists_every_key_and_parses_back_equal() {
    let defaults = Config::default();
    let text = defaults.to_toml_string();
    for key in [
        "listen",
        "upstream",
        "connect_timeout",
        "startup_timeout",
        "shutdown_timeout",
        "max_clients",
        "format",
        "level",
        "protected_tables",
        "on_client_loss",
        "inflight_grace",
        "idle_in_transaction_timeout",
        "failed_transaction_timeout",
        "require_waiters",
        "sweep_interval",
        "dry_run",
        "dsn",
        "password_env",
        "audit_log",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    assert_eq!(Config::from_toml_str(&text).unwrap(), defaults, "{text}");

    let custom = Config::from_toml_str(
        r#"
[proxy]
listen = "[::]:7432"
upstream = "/tmp/pg dir:5433"
connect_timeout = "1m 30s"
startup_timeout = "250ms"
shutdown_timeout = "0s"
max_clients = 7
[log]
format = "json"
level = "info,lockguard=debug"
[guard]
dsn = "host=localhost user='lock guard' password='it''s'"
password_env = "LOCKGUARD_PW"
protected_tables = ['"My Schema"."Odd.Name"', "public.sessions", "*"]
on_client_loss = "log"
inflight_grace = "1500ms"
idle_in_transaction_timeout = "2h"
failed_transaction_timeout = "0"
require_waiters = true
sweep_interval = "100ms"
dry_run = true
audit_log = "/var/log/lockguard/audit.jsonl"
"#,
    )
    .unwrap();
    let text = custom.to_toml_string();
    assert_eq!(Config::from_toml_str(&text).unwrap(), custom, "{text}");
    assert!(text.contains("connect_timeout = \"1m 30s\""), "{text}");
    assert!(text.contains("inflight_grace = \"1s 500ms\""), "{text}");
    assert!(!text.contains("is not set"), "{text}");
}

#[test]
fn the_example_file_parses_and_shows_the_defaults() {
    let example = Config::from_toml_str(include_str!("../lockguard.example.toml"))
        .unwrap_or_else(|e| panic!("example config must parse:\n{e}"));
    assert_eq!(example.proxy, ProxyConfig::default());
    assert_eq!(example.log, LogConfig::default());
    assert_eq!(
        example.guard.dsn.as_deref(),
        Some("host=127.0.0.1 port=5432 user=lockguard dbname=postgres")
    );
    assert_eq!(
        example.guard.protected_tables,
        ["public.sessions", "billing.*"]
    );
    assert_eq!(
        example.guard.idle_in_transaction_timeout,
        Duration::from_secs(60)
    );
    assert_eq!(example.guard.sweep_interval, Duration::from_secs(1));
    assert_eq!(example.admin, AdminConfig::default());
}

#[test]
fn client_keepalive_settings_parse_and_must_be_positive() {
    let c = Config::from_toml_str(
        "[proxy]\nclient_keepalive_idle = \"2s\"\nclient_keepalive_interval = \"1s\"\nclient_keepalive_count = 2\nclient_user_timeout = \"0\"\n",
    )
    .expect("valid keepalive settings");
    assert_eq!(c.proxy.client_keepalive_idle, Duration::from_secs(2));
    assert_eq!(c.proxy.client_keepalive_count, 2);
    assert_eq!(c.proxy.client_user_timeout, Duration::ZERO);
    for (text, key) in [
        (
            "[proxy]\nclient_keepalive_count = 0\n",
            "proxy.client_keepalive_count",
        ),
        (
            "[proxy]\nclient_keepalive_idle = \"0s\"\n",
            "proxy.client_keepalive_idle",
        ),
    ] {
        assert_eq!(parse_err(text).key(), Some(key), "{text}");
    }
}

#[test]
fn tls_settings_parse_and_are_checked_together() {
    let c = Config::from_toml_str(
        "[tls]\nclient_cert = \"/etc/lg/cert.pem\"\nclient_key = \"/etc/lg/key.pem\"\nclient_mode = \"require\"\nupstream_mode = \"verify-full\"\nupstream_ca = \"/etc/lg/ca.pem\"\n",
    )
    .expect("valid tls settings");
    assert!(c.tls.serves_clients());
    assert_eq!(c.tls.client_mode, ClientTlsMode::Require);
    assert_eq!(c.tls.upstream_mode, UpstreamTlsMode::VerifyFull);
    let round_trip = Config::from_toml_str(&c.to_toml_string()).expect("round trip");
    assert_eq!(round_trip, c);
    for (text, key) in [
        ("[tls]\nclient_cert = \"/c.pem\"\n", "tls.client_key"),
        ("[tls]\nclient_mode = \"require\"\n", "tls.client_mode"),
        ("[tls]\nupstream_mode = \"verify-ca\"\n", "tls.upstream_ca"),
        ("[tls]\nupstream_key = \"/k.pem\"\n", "tls.upstream_cert"),
        (
            "[tls]\nupstream_mode = \"verify_full\"\n",
            "tls.upstream_mode",
        ),
    ] {
        assert_eq!(parse_err(text).key(), Some(key), "{text}");
    }
}

pub(crate) fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "lockguard-config-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn startup_slots_and_console_tls_settings_are_checked() {
    let c = Config::from_toml_str(
        "[proxy]\nmax_startup_clients = 5\n[admin]\nlisten = \"0.0.0.0:6433\"\nrequire_tls = true\n\
         tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n",
    )
    .expect("valid");
    assert_eq!(c.proxy.max_startup_clients, 5);
    assert!(c.admin.require_tls);
    assert_eq!(Config::from_toml_str(&c.to_toml_string()).unwrap(), c);
    assert_eq!(Config::default().proxy.max_startup_clients, 2000);
    // The client-side certificate is enough for the console.
    Config::from_toml_str(
        "[tls]\nclient_cert = \"/c.pem\"\nclient_key = \"/k.pem\"\n[admin]\nrequire_tls = true\n",
    )
    .expect("console TLS from [tls]");
    for (text, key) in [
        (
            "[proxy]\nmax_startup_clients = 0\n",
            "proxy.max_startup_clients",
        ),
        ("[admin]\nlisten = \"0.0.0.0:6433\"\n", "admin.require_tls"),
        ("[admin]\nlisten = \"10.1.2.3:6433\"\n", "admin.require_tls"),
        ("[admin]\nrequire_tls = true\n", "admin.require_tls"),
        ("[admin]\ntls_cert = \"/c.pem\"\n", "admin.tls_key"),
        ("[admin]\ntls_key = \"/k.pem\"\n", "admin.tls_cert"),
    ] {
        let e = parse_err(text);
        assert_eq!(e.key(), Some(key), "{text}\n{e}");
        // A key missing from the file has no line of its own.
        let missing = !text.contains(key.rsplit('.').next().unwrap_or(key));
        assert_eq!(e.line().is_some(), !missing, "{text}\n{e}");
    }
}

#[test]
fn direct_upstream_negotiation_needs_a_mode_that_insists_on_tls() {
    assert_eq!(
        Config::default().tls.upstream_negotiation,
        UpstreamNegotiation::Postgres
    );
    let c = Config::from_toml_str(
        "[tls]\nupstream_mode = \"require\"\nupstream_negotiation = \"direct\"\n",
    )
    .expect("direct with require");
    assert_eq!(c.tls.upstream_negotiation, UpstreamNegotiation::Direct);
    assert_eq!(Config::from_toml_str(&c.to_toml_string()).unwrap(), c);
    for text in [
        "[tls]\nupstream_negotiation = \"direct\"\n",
        "[tls]\nupstream_mode = \"prefer\"\nupstream_negotiation = \"direct\"\n",
        "[tls]\nupstream_mode = \"require\"\nupstream_negotiation = \"alpn\"\n",
    ] {
        assert_eq!(
            parse_err(text).key(),
            Some("tls.upstream_negotiation"),
            "{text}"
        );
    }
}
