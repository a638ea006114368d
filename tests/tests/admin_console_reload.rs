//! The admin console's changes to the running configuration: RELOAD (protected tables,
//! console users, TLS certificates, every live key at once) and SET dry_run, each checked
//! against what SHOW CONFIG shows and what the guard then does. Split from admin_console.rs,
//! which covers the console's views, kills and roles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lockguard_tests::admin::*;
use lockguard_tests::guard_support::backend_alive;
use lockguard_tests::http::json;
use lockguard_tests::tls;
use tokio_postgres::error::SqlState;

/// Live reload: RELOAD after editing `protected_tables` in the file makes the guard act on
/// the new table, with no client reconnecting; an invalid file is refused and changes nothing.
#[tokio::test]
async fn reload_makes_the_guard_protect_a_new_table_without_reconnecting() {
    let db = database("admin_reload").await;
    let checker = direct(&db).await;
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    let write_config = |protected: &str| {
        std::fs::write(file.path(), config_text(protected, "")).expect("write config");
    };
    write_config("\"app.user_sessions\"");
    let running = start_from_file(file.path()).await;
    let ops = console(&running, OPS).await.expect("ops logs in");

    let mut holder = running.app(&db).await;
    holder.exec_ok("BEGIN").await;
    holder
        .exec_ok("SELECT * FROM app.scratch WHERE id = 1 FOR UPDATE")
        .await;
    let mut other = running.app(&db).await;
    other.exec_ok("SELECT 1").await;
    // Not protected: the guard sees no protected lock, and the holder stays.
    assert!(rows(&ops, "SHOW LOCKS").await.is_empty());

    // A broken file: refused, nothing changes.
    std::fs::write(file.path(), "[guard]\nprotected_tables = [\n").expect("write");
    let e = ops.simple_query("RELOAD").await.expect_err("invalid file");
    assert_eq!(code_of(&e), Some(&SqlState::CONFIG_FILE_ERROR), "{e:?}");
    let kept = rows(&ops, "SHOW CONFIG").await;
    let protected = kept
        .iter()
        .find(|r| r["key"] == "guard.protected_tables")
        .expect("protected_tables row");
    assert!(
        protected["value"].contains("app.user_sessions"),
        "{protected:?}"
    );
    assert!(backend_alive(&checker, holder.pid).await);

    write_config("\"app.scratch\"");
    let changes = rows(&ops, "RELOAD").await;
    let change = changes
        .iter()
        .find(|r| r["key"] == "guard.protected_tables")
        .unwrap_or_else(|| panic!("{changes:?}"));
    assert_eq!(change["status"], "applied");
    assert!(change["new_value"].contains("app.scratch"), "{change:?}");

    // The guard now judges the lock on app.scratch: the idle rule ends the holder's session.
    let (code, message) = holder.farewell().await;
    assert_eq!(code, "57P01");
    assert!(message.contains("app.scratch"), "{message}");
    assert!(!backend_alive(&checker, holder.pid).await);
    // The other session, connected before the reload, carries on.
    other.exec_ok("SELECT 2").await;
    let events = rows(&ops, "SHOW EVENTS").await;
    assert_eq!(events[0]["trigger"], "idle_in_transaction");
    assert!(events[0]["locks"].contains("app.scratch"), "{events:?}");
}

/// RELOAD applies to console users already logged in: a demoted admin may only SHOW from the
/// next command on, and a removed user's session ends with FATAL 28000.
#[tokio::test]
async fn reload_demotes_and_removes_logged_in_console_users() {
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    let write_config = |watcher: Option<&str>| {
        let extra = watcher
            .map(|role| {
                format!(
                    "[[admin.users]]\nname = \"{}\"\npassword = \"{}\"\nrole = \"{role}\"\n",
                    WATCHER.0, WATCHER.1
                )
            })
            .unwrap_or_default();
        std::fs::write(file.path(), config_text("\"app.user_sessions\"", &extra))
            .expect("write config");
    };
    write_config(Some("admin"));
    let running = start_from_file(file.path()).await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    let watcher = console(&running, WATCHER).await.expect("watcher logs in");
    rows(&watcher, "SET dry_run = off").await;

    write_config(Some("monitor"));
    rows(&ops, "RELOAD").await;
    let e = watcher
        .simple_query("SET dry_run = off")
        .await
        .expect_err("a monitor may not change settings");
    assert_eq!(
        code_of(&e),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{e:?}"
    );
    assert_eq!(rows(&watcher, "SHOW VERSION").await.len(), 1);

    write_config(None);
    rows(&ops, "RELOAD").await;
    let e = watcher
        .simple_query("SHOW VERSION")
        .await
        .expect_err("a removed user's session ends");
    assert_eq!(
        code_of(&e),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{e:?}"
    );
    let message = e.as_db_error().map(|db| db.message()).unwrap_or_default();
    assert!(message.contains("no longer configured"), "{e:?}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !watcher.is_closed() {
        assert!(tokio::time::Instant::now() < deadline, "session kept open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        console(&running, WATCHER).await.is_err(),
        "login refused too"
    );
    assert_eq!(rows(&ops, "SHOW VERSION").await.len(), 1);
}

async fn presented_certificate(addr: SocketAddr, ca: &std::path::Path) -> Vec<u8> {
    tls::presented_certificate(addr, tls::trusting(ca), "127.0.0.1").await
}

/// Certificate rotation through the admin port: RELOAD re-reads certificate files replaced in place; new
/// connections get the new certificate, a session from before carries on; an unreadable key
/// is refused and the old certificate stays.
#[tokio::test]
async fn reload_re_reads_tls_certificates() {
    let db = database("admin_tls").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = lockguard_tests::certs::TestCa::new("admin reload CA");
    let ca_file = ca.write_ca(dir.path(), "ca.crt");
    let first = ca.issue(dir.path(), "first", &["127.0.0.1"]);
    let second = ca.issue(dir.path(), "second", &["127.0.0.1"]);
    let (live_cert, live_key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    let install = |files: &lockguard_tests::certs::CertFiles| {
        std::fs::copy(&files.cert, &live_cert).expect("copy certificate");
        std::fs::copy(&files.key, &live_key).expect("copy key");
    };
    install(&first);
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    let tls = format!(
        "[tls]\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
        live_cert.display(),
        live_key.display()
    );
    std::fs::write(file.path(), config_text("", &tls)).expect("write config");
    let running = start_from_file(file.path()).await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    let mut before = running.app(&db).await;
    assert_eq!(
        presented_certificate(running.addr, &ca_file).await,
        first.der
    );

    install(&second);
    rows(&ops, "RELOAD").await;
    assert_eq!(
        presented_certificate(running.addr, &ca_file).await,
        second.der
    );
    before.exec_ok("SELECT 1").await;

    std::fs::write(&live_key, "not a key").expect("break the key");
    let e = ops.simple_query("RELOAD").await.expect_err("broken key");
    assert_eq!(code_of(&e), Some(&SqlState::CONFIG_FILE_ERROR), "{e:?}");
    assert_eq!(
        presented_certificate(running.addr, &ca_file).await,
        second.der
    );
    before.exec_ok("SELECT 2").await;
}

/// The value SHOW CONFIG shows for `key`.
async fn shown(ops: &tokio_postgres::Client, key: &str) -> String {
    rows(ops, "SHOW CONFIG")
        .await
        .into_iter()
        .find(|r| r["key"] == key)
        .unwrap_or_else(|| panic!("no SHOW CONFIG row for {key}"))["value"]
        .clone()
}

/// Waits for the guard's audit event about backend `pid` and returns it.
async fn event_about(running: &Running, pid: i32) -> guard_core::AuditEvent {
    let guard = running.admin.guard().expect("guard configured");
    let mut found = None;
    lockguard_tests::guard_support::wait_for(WAIT, "the guard's event", || {
        found = guard
            .audit()
            .recent()
            .into_iter()
            .rev()
            .find(|e| e.backend_pid == pid);
        std::future::ready(found.is_some())
    })
    .await;
    found.expect("an event")
}

/// `SET dry_run` changes the one configuration in force: SHOW CONFIG shows it and the guard
/// acts on it (the idle rule records instead of killing); switched off again, the same idle
/// session is judged afresh and terminated.
#[tokio::test]
async fn set_dry_run_changes_what_show_config_shows_and_what_the_guard_does() {
    let db = database("admin_dry_run").await;
    let checker = direct(&db).await;
    let mut config = admin_config(&["app.user_sessions"]);
    config.guard.idle_in_transaction_timeout = Duration::from_millis(200);
    let running = start(config, None).await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    let guard = running.admin.guard().expect("guard configured");

    rows(&ops, "SET dry_run = on").await;
    assert_eq!(shown(&ops, "guard.dry_run").await, "true");
    assert!(running.admin.config().guard.dry_run);
    assert!(
        guard.rules().dry_run,
        "the guard reads the same configuration"
    );

    let mut holder = running.app(&db).await;
    holder.lock_protected_row().await;
    let event = event_about(&running, holder.pid).await;
    assert_eq!(event.outcome, guard_core::Outcome::DryRun, "{event:?}");
    assert!(event.dry_run);
    assert!(
        backend_alive(&checker, holder.pid).await,
        "dry-run kills nothing"
    );

    rows(&ops, "SET dry_run = off").await;
    assert_eq!(shown(&ops, "guard.dry_run").await, "false");
    let (code, message) = holder.farewell().await;
    assert_eq!(code, "57P01", "{message}");
    let event = event_about(&running, holder.pid).await;
    assert_eq!(event.outcome, guard_core::Outcome::Terminated, "{event:?}");
    assert!(!backend_alive(&checker, holder.pid).await);
}

/// RELOAD swaps the one configuration in force: after a file that protects another table in
/// dry-run, SHOW CONFIG, the HTTP API's events and the guard's own decisions all agree; a
/// file whose certificate cannot be read changes none of them. One test on purpose: the
/// failed reload must leave exactly the state the good one made.
#[tokio::test]
async fn reload_changes_config_and_guard_together_and_a_failed_reload_changes_neither() {
    let db = database("admin_one_config").await;
    let checker = direct(&db).await;
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    let write = |protected: &str, dry_run: bool, extra: &str| {
        let text = config_text(protected, extra).replacen(
            "[guard]\n",
            &format!("[guard]\ndry_run = {dry_run}\n"),
            1,
        );
        std::fs::write(file.path(), text).expect("write config");
    };
    write("\"app.user_sessions\"", false, "");
    let running = start_from_file(file.path()).await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    let guard = running.admin.guard().expect("guard configured");

    write("\"app.scratch\"", true, "");
    rows(&ops, "RELOAD").await;
    assert_eq!(shown(&ops, "guard.dry_run").await, "true");
    assert!(shown(&ops, "guard.protected_tables")
        .await
        .contains("app.scratch"));
    let config = running.admin.config();
    assert!(config.guard.dry_run);
    assert_eq!(config.guard.protected_tables, ["app.scratch"]);
    let settings = guard.settings();
    assert!(settings.rules.catch_all().dry_run);
    assert!(settings
        .patterns
        .iter()
        .any(|p| p.matches("app", "scratch")));
    assert!(!settings
        .patterns
        .iter()
        .any(|p| p.matches("app", "user_sessions")));

    // The guard acts on the new table, in dry-run.
    let mut first = running.app(&db).await;
    first.exec_ok("BEGIN").await;
    first
        .exec_ok("SELECT * FROM app.scratch WHERE id = 1 FOR UPDATE")
        .await;
    let event = event_about(&running, first.pid).await;
    assert_eq!(event.outcome, guard_core::Outcome::DryRun, "{event:?}");
    assert!(
        event.locks.iter().any(|l| l.table == "app.scratch"),
        "{event:?}"
    );
    let (status, _, body) = http(running.http, "GET", "/api/events", Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let events = json(&body);
    let listed = events
        .as_array()
        .expect("an array")
        .iter()
        .find(|e| e["backend_pid"] == first.pid)
        .unwrap_or_else(|| panic!("no event for {} in {body}", first.pid));
    assert_eq!(listed["outcome"], "dry_run", "{listed}");
    assert!(backend_alive(&checker, first.pid).await);

    // Back to the first table, out of dry-run, with a certificate that does not exist:
    // refused before anything changes.
    let missing = file.path().with_extension("missing");
    write(
        "\"app.user_sessions\"",
        false,
        &format!(
            "[tls]\nclient_cert = \"{0}.crt\"\nclient_key = \"{0}.key\"\n",
            missing.display()
        ),
    );
    let e = ops
        .simple_query("RELOAD")
        .await
        .expect_err("missing certificate");
    assert_eq!(code_of(&e), Some(&SqlState::CONFIG_FILE_ERROR), "{e:?}");
    assert!(
        Arc::ptr_eq(&config, &running.admin.config()),
        "the configuration in force is the same one"
    );
    assert!(Arc::ptr_eq(&settings, &guard.settings()));
    assert_eq!(shown(&ops, "guard.dry_run").await, "true");
    assert!(shown(&ops, "guard.protected_tables")
        .await
        .contains("app.scratch"));
    assert!(
        !rows(&ops, "SHOW CONFIG")
            .await
            .iter()
            .any(|r| r["key"] == "tls.client_cert"),
        "no client certificate in force"
    );

    // And the guard still decides by it: a second holder of the scratch row (once the first
    // lets go) is recorded in dry-run, not terminated.
    first.exec_ok("ROLLBACK").await;
    let mut second = running.app(&db).await;
    second.exec_ok("BEGIN").await;
    second
        .exec_ok("SELECT * FROM app.scratch WHERE id = 1 FOR UPDATE")
        .await;
    let event = event_about(&running, second.pid).await;
    assert_eq!(event.outcome, guard_core::Outcome::DryRun, "{event:?}");
    assert!(backend_alive(&checker, second.pid).await);
}
