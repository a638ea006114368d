//! The admin console (PostgreSQL protocol): SHOW, KILL, RELOAD and roles, against a real
//! cluster through an in-process proxy, with tokio-postgres and psql as the clients.

use std::collections::HashMap;

use lockguard_config::AdminAuthMethod;
use lockguard_tests::admin::*;
use lockguard_tests::guard_support::{backend_alive, wait_until_waiting};
use lockguard_tests::http::json;
use lockguard_tests::psql;
use tokio_postgres::error::SqlState;

/// The operator's view and kill, end to end: SHOW CLIENTS lists both proxied sessions with their real
/// pids and states (simple and extended protocol); SHOW LOCKS shows the protected lock and its
/// waiter; KILL ends exactly one backend, its client gets lockguard's 57P01, the waiter
/// proceeds, SHOW EVENTS and the termination counter record it; the HTTP API lists clients
/// and kills with the token only. One test on purpose, longer than most: each step reads the
/// state the previous one left (the lock, its waiter, the kill, the event it recorded).
#[tokio::test]
async fn console_lists_clients_and_kill_ends_exactly_one_backend() {
    let db = database("admin_kill").await;
    let running = start(admin_config(&["app.user_sessions"]), None).await;
    let checker = direct(&db).await;

    let mut holder = running.app(&db).await;
    holder.exec_ok("BEGIN").await;
    holder
        .exec_ok("UPDATE app.user_sessions SET token = 'x' WHERE id = 1")
        .await;
    let mut bystander = running.app(&db).await;
    bystander.exec_ok("SELECT 1").await;
    // Someone who needs the row: blocked until the holder's backend is gone.
    let waiter_client = direct(&db).await;
    let waiter_pid: i32 = waiter_client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let waiter = tokio::spawn(async move {
        waiter_client
            .execute("UPDATE app.user_sessions SET token = 'w' WHERE id = 1", &[])
            .await
    });
    wait_until_waiting(&checker, waiter_pid).await;

    let ops = console(&running, OPS).await.expect("ops logs in");
    let clients = rows(&ops, "show clients;").await;
    assert_eq!(clients.len(), 2, "{clients:?}");
    let row_of = |pid: i32| {
        clients
            .iter()
            .find(|r| r.get("backend_pid") == Some(&pid.to_string()))
            .unwrap_or_else(|| panic!("no row for backend {pid}: {clients:?}"))
            .clone()
    };
    let (holder_row, bystander_row) = (row_of(holder.pid), row_of(bystander.pid));
    assert_eq!(holder_row["state"], "idle in transaction");
    assert_eq!(bystander_row["state"], "idle");
    assert_eq!(holder_row["database"], db);
    assert_eq!(holder_row["client_addr"], "127.0.0.1");
    assert_eq!(holder_row["protected_locks"], "1");
    assert_eq!(holder_row["waiters"], "1");
    assert_eq!(bystander_row["protected_locks"], "0");
    assert!(holder_row.contains_key("xact_age_s") && !bystander_row.contains_key("xact_age_s"));
    assert!(holder_row["last_statement"].contains("UPDATE app.user_sessions"));
    // The flat [guard] keys are the catch-all rule, `default`; no lock, no rule.
    assert_eq!(holder_row["rules"], "default");
    assert!(!bystander_row.contains_key("rules"), "{bystander_row:?}");

    let locks = rows(&ops, "SHOW LOCKS").await;
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0]["backend_pid"], holder.pid.to_string());
    assert_eq!(locks[0]["table"], "app.user_sessions");
    assert_eq!(locks[0]["mode"], "RowExclusiveLock");
    assert_eq!(locks[0]["waiters"], "1");
    assert_eq!(locks[0]["rule"], "default");

    // The extended protocol, typed columns (binary results).
    let typed = ops
        .query("SHOW CLIENTS", &[])
        .await
        .expect("prepared SHOW CLIENTS");
    let mut by_pid: HashMap<i32, (i64, String)> = HashMap::new();
    for row in &typed {
        let pid: Option<i32> = row.get("backend_pid");
        by_pid.insert(pid.expect("backend pid"), (row.get("id"), row.get("state")));
    }
    let holder_id = by_pid[&holder.pid].0;
    assert_eq!(holder_id.to_string(), holder_row["id"]);
    assert_eq!(by_pid[&bystander.pid].1, "idle");
    let version = ops.prepare("SHOW VERSION").await.expect("prepare");
    assert_eq!(version.columns()[0].name(), "version");
    let v: String = ops.query_one(&version, &[]).await.expect("version").get(0);
    assert!(v.starts_with("lockguard "), "{v}");

    let before = running.metrics().await;
    assert_eq!(before.get(OPERATOR_KILLS), Some(&0.0), "{before:?}");
    assert_eq!(before.get("lockguard_clients_active"), Some(&2.0));
    assert_eq!(
        before.get("lockguard_clients{state=\"idle in transaction\"}"),
        Some(&1.0)
    );

    let answer = rows(&ops, &format!("KILL {holder_id}")).await;
    assert_eq!(answer.len(), 1, "{answer:?}");
    assert_eq!(answer[0]["outcome"], "terminated", "{answer:?}");
    assert_eq!(answer[0]["backend_pid"], holder.pid.to_string());

    let (code, message) = holder.farewell().await;
    assert_eq!(code, "57P01");
    assert!(
        message.starts_with("lockguard: terminated by operator"),
        "{message}"
    );
    assert!(message.contains("operator"), "{message}");
    assert!(
        !backend_alive(&checker, holder.pid).await,
        "the killed backend is gone"
    );
    assert!(
        backend_alive(&checker, bystander.pid).await,
        "the other survives"
    );
    bystander.exec_ok("SELECT 2").await;
    let updated = tokio::time::timeout(WAIT, waiter)
        .await
        .expect("the waiter proceeds")
        .expect("waiter task");
    assert_eq!(updated.expect("the waiter's update"), 1);

    let events = rows(&ops, "SHOW EVENTS").await;
    let newest = events.first().expect("an event");
    assert_eq!(newest["trigger"], "operator");
    assert_eq!(newest["outcome"], "terminated");
    assert_eq!(newest["backend_pid"], holder.pid.to_string());
    assert_eq!(newest["client_id"], holder_id.to_string());
    assert!(newest["cause"].contains("ops"), "{newest:?}");
    assert_eq!(newest["locks"], "RowExclusiveLock on app.user_sessions");

    let after = running.metrics().await;
    assert_eq!(after.get(OPERATOR_KILLS), Some(&1.0), "{after:?}");

    // The JSON API: the same table, the token guards it, and kill works over HTTP.
    let (status, _, _) = http(running.http, "GET", "/api/clients", None).await;
    assert_eq!(status, 401);
    let (status, _, _) = http(running.http, "GET", "/api/clients", Some("wrong")).await;
    assert_eq!(status, 403);
    let (status, _, body) = http(running.http, "GET", "/api/clients", Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let listed = json(&body);
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["backend_pid"], bystander.pid);
    let bystander_id = listed[0]["id"].as_u64().expect("numeric id");
    let (status, _, body) = http(running.http, "GET", "/api/events", Some(API_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)[0]["backend_pid"], holder.pid);

    let kill_path = format!("/api/clients/{bystander_id}/kill");
    let (status, headers, _) = http(running.http, "POST", &kill_path, None).await;
    assert_eq!(status, 401);
    assert_eq!(
        headers.get("www-authenticate").map(String::as_str),
        Some("Bearer")
    );
    let (status, _, _) = http(running.http, "POST", &kill_path, Some("nope")).await;
    assert_eq!(status, 403);
    assert!(
        backend_alive(&checker, bystander.pid).await,
        "refused kills do nothing"
    );
    let (status, _, body) = http(running.http, "POST", &kill_path, Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["outcome"], "terminated");
    let (code, _) = bystander.farewell().await;
    assert_eq!(code, "57P01");
    let (status, _, _) = http(running.http, "POST", &kill_path, Some(API_TOKEN)).await;
    assert_eq!(status, 404, "the session is gone");
    assert_eq!(running.metrics().await.get(OPERATOR_KILLS), Some(&2.0));

    // KILL PID of a backend lockguard does not serve.
    let answer = rows(&ops, "KILL PID 999999").await;
    assert_eq!(answer[0]["outcome"], "not_found");
}

/// Roles: monitors cannot KILL (or RELOAD, or SET), wrong passwords are refused for
/// SCRAM and MD5 logins, an unknown command is 42601 with the command list as hint.
#[tokio::test]
async fn roles_passwords_and_unknown_commands() {
    let running = start(admin_config(&[]), None).await;

    let watcher = console(&running, WATCHER).await.expect("watcher logs in");
    assert!(rows(&watcher, "SHOW CLIENTS").await.is_empty());
    for command in ["KILL 1", "KILL PID 1234", "RELOAD", "SET dry_run = on"] {
        let e = watcher.simple_query(command).await.expect_err(command);
        assert_eq!(
            code_of(&e),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{command}: {e:?}"
        );
    }
    // The session carries on after an error.
    assert_eq!(rows(&watcher, "SHOW VERSION").await.len(), 1);

    for bad in [(OPS.0, "wrong"), (WATCHER.0, OPS.1), ("nobody", "x")] {
        let e = console(&running, bad).await.expect_err("wrong password");
        assert_eq!(
            code_of(&e),
            Some(&SqlState::INVALID_PASSWORD),
            "{bad:?}: {e:?}"
        );
    }

    let ops = console(&running, OPS).await.expect("ops logs in");
    let e = ops
        .simple_query("SELECT 1")
        .await
        .expect_err("not a command");
    let db = e.as_db_error().expect("ErrorResponse");
    assert_eq!(db.code(), &SqlState::SYNTAX_ERROR);
    assert!(
        db.hint()
            .is_some_and(|h| h.contains("SHOW CLIENTS") && h.contains("KILL")),
        "{db:?}"
    );
    let e = ops
        .prepare("DROP TABLE x")
        .await
        .expect_err("not a command");
    assert_eq!(code_of(&e), Some(&SqlState::SYNTAX_ERROR));

    let set = rows(&ops, "SET dry_run = on").await;
    assert_eq!(
        (set[0]["value"].as_str(), set[0]["previous"].as_str()),
        ("on", "off")
    );
    let config = rows(&ops, "SHOW CONFIG").await;
    let dry_run = config
        .iter()
        .find(|r| r["key"] == "guard.dry_run")
        .expect("dry_run row");
    assert_eq!(dry_run["value"], "true");
    let token = config
        .iter()
        .find(|r| r["key"] == "admin.api_token")
        .expect("token row");
    assert_ne!(token["value"], API_TOKEN, "secrets are masked");
    assert!(running.admin.guard().expect("guard").rules().dry_run);

    // Password-less admin logins on loopback when trusted; without a token the API is
    // read-only.
    let mut trusting = admin_config(&[]);
    trusting.admin.users.clear();
    trusting.admin.trust_loopback = true;
    trusting.admin.api_token = None;
    let trusting = start(trusting, None).await;
    let anyone = console(&trusting, ("anyone", ""))
        .await
        .expect("trusted login");
    assert_eq!(rows(&anyone, "KILL 12345").await[0]["outcome"], "not_found");
    let (status, _, body) = http(trusting.http, "GET", "/api/clients", None).await;
    assert_eq!((status, body.as_str()), (200, "[]"));
    let (status, _, _) = http(trusting.http, "POST", "/api/clients/1/kill", None).await;
    assert_eq!(status, 403);

    // MD5 on the wire.
    let mut md5 = admin_config(&[]);
    md5.admin.auth_method = AdminAuthMethod::Md5;
    let md5 = start(md5, None).await;
    let ops = console(&md5, OPS).await.expect("md5 login");
    assert!(!rows(&ops, "SHOW STATS").await.is_empty());
    let e = console(&md5, (OPS.0, "wrong"))
        .await
        .expect_err("wrong md5 password");
    assert_eq!(code_of(&e), Some(&SqlState::INVALID_PASSWORD), "{e:?}");
}

/// `KILL PID` ends the session whose backend has that pid: outcome `terminated`, its client
/// gets 57P01 naming the operator, the other sessions carry on. SHOW EVENTS lists the kills
/// newest first; SHOW STATS counts them and the sessions' traffic.
#[tokio::test]
async fn kill_pid_ends_one_session_and_events_and_stats_record_it() {
    let db = database("admin_kill_pid").await;
    let running = start(admin_config(&[]), None).await;
    let checker = direct(&db).await;
    let mut first = running.app(&db).await;
    let mut second = running.app(&db).await;
    let mut third = running.app(&db).await;
    for app in [&mut first, &mut second, &mut third] {
        app.exec_ok("SELECT 1").await;
    }
    let ops = console(&running, OPS).await.expect("ops logs in");
    assert_eq!(stats(&ops).await["terminations.operator"], 0);

    let answer = rows(&ops, &format!("KILL PID {}", first.pid)).await;
    assert_eq!(answer.len(), 1, "{answer:?}");
    assert_eq!(answer[0]["outcome"], "terminated", "{answer:?}");
    assert_eq!(answer[0]["backend_pid"], first.pid.to_string());
    let (code, message) = first.farewell().await;
    assert_eq!(code, "57P01");
    assert!(
        message.starts_with("lockguard: terminated by operator")
            && message.contains(&format!("KILL by {}", OPS.0)),
        "{message}"
    );
    assert!(!backend_alive(&checker, first.pid).await, "killed backend");
    for app in [&mut second, &mut third] {
        assert!(
            backend_alive(&checker, app.pid).await,
            "other backends live"
        );
        app.exec_ok("SELECT 2").await;
    }

    let counters = stats(&ops).await;
    assert_eq!(counters["terminations.operator"], 1, "{counters:?}");
    assert_eq!(counters["clients_accepted"], 3, "{counters:?}");
    assert_eq!(counters["sessions_started"], 3, "{counters:?}");
    assert!(counters["bytes_from_clients"] > 0, "{counters:?}");
    assert!(counters["bytes_from_servers"] > 0, "{counters:?}");

    let answer = rows(&ops, &format!("KILL PID {}", second.pid)).await;
    assert_eq!(answer[0]["outcome"], "terminated", "{answer:?}");
    assert_eq!(second.farewell().await.0, "57P01");
    let events = rows(&ops, "SHOW EVENTS").await;
    let pids: Vec<&str> = events.iter().map(|e| e["backend_pid"].as_str()).collect();
    assert_eq!(
        pids,
        [second.pid.to_string(), first.pid.to_string()],
        "newest first: {events:?}"
    );
    assert!(
        events.iter().all(|e| e["trigger"] == "operator"),
        "{events:?}"
    );
    assert_eq!(stats(&ops).await["terminations.operator"], 2);
    third.exec_ok("SELECT 3").await;
}

/// Every command answers with the columns README.md documents, in that order (with rows or
/// without).
#[tokio::test]
async fn every_command_answers_its_documented_columns() {
    let file = tempfile::NamedTempFile::new().expect("temp config file");
    std::fs::write(file.path(), config_text("", "")).expect("write config");
    let running = start_from_file(file.path()).await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    let documented: &[(&str, &[&str])] = &[
        (
            "SHOW CLIENTS",
            &[
                "id",
                "client_addr",
                "client_port",
                "user",
                "database",
                "application_name",
                "backend_pid",
                "state",
                "xact_age_s",
                "state_age_s",
                "protected_locks",
                "waiters",
                "last_statement",
                "rules",
            ],
        ),
        (
            "SHOW LOCKS",
            &[
                "client_id",
                "backend_pid",
                "table",
                "mode",
                "waiters",
                "rule",
            ],
        ),
        (
            "SHOW EVENTS",
            &[
                "time",
                "client_id",
                "backend_pid",
                "trigger",
                "cause",
                "outcome",
                "locks",
                "waiters",
                "state",
                "idle_ms",
                "xact_ms",
                "user",
                "database",
                "client_addr",
                "application_name",
                "last_statement",
                "error",
                "summary",
                "rules",
            ],
        ),
        ("SHOW STATS", &["name", "value"]),
        ("SHOW CONFIG", &["key", "value", "live"]),
        ("SHOW VERSION", &["version"]),
        (
            "KILL 999999",
            &["client_id", "backend_pid", "outcome", "detail"],
        ),
        (
            "KILL PID 999999",
            &["client_id", "backend_pid", "outcome", "detail"],
        ),
        ("RELOAD", &["key", "old_value", "new_value", "status"]),
        ("SET dry_run = off", &["name", "value", "previous"]),
    ];
    for (command, expected) in documented {
        assert_eq!(column_names(&ops, command).await, *expected, "{command}");
    }
}

/// The real psql runs SHOW CLIENTS against the console.
#[tokio::test]
async fn psql_runs_show_clients() {
    let db = database("admin_psql").await;
    let running = start(admin_config(&[]), None).await;
    let app = running.app(&db).await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} password={} dbname=lockguard",
        running.console.port(),
        OPS.0,
        OPS.1
    );
    let Some(out) = psql::run(&[conninfo.as_str(), "-A", "-c", "SHOW CLIENTS"]).await else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "psql failed: {stderr}");
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some(
            "id|client_addr|client_port|user|database|application_name|backend_pid|state|\
             xact_age_s|state_age_s|protected_locks|waiters|last_statement|rules"
        ),
        "{stdout}"
    );
    let row = lines.next().expect("one client row");
    let fields: Vec<&str> = row.split('|').collect();
    assert_eq!(fields[4], db, "{row}");
    assert_eq!(fields[6], app.pid.to_string(), "{row}");
    assert_eq!(fields[7], "idle", "{row}");
    assert_eq!(lines.next(), Some("(1 row)"), "{stdout}");
}
