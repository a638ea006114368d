//! `[[guard.rules]]` against a real PostgreSQL, without the proxy (as `guard_core.rs`): direct
//! sessions play the application, hand-made session records the proxy's view of them, and the
//! guard's clock is moved past a timeout instead of sleeping through it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use guard_core::{
    ClientInfo, Guard, LeaveReason, ManualClock, Outcome, Registration, Registry, TxnStatus,
};
use lockguard_config::{Config, GuardConfig};
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{
    backend_alive, connect, guard_config, guard_test_database, DirectSession,
};

const HOUR: Duration = Duration::from_secs(3600);

/// The guard config of the test cluster with the flat idle timeouts at an hour and `rules`
/// (TOML `[[guard.rules]]` entries) added.
fn config_with_rules(cluster: &TestCluster, protected: &[&str], rules: &str) -> GuardConfig {
    let parsed = Config::from_toml_str(rules).expect("the rules parse");
    GuardConfig {
        idle_in_transaction_timeout: HOUR,
        failed_transaction_timeout: HOUR,
        rules: parsed.guard.rules,
        ..guard_config(cluster, protected)
    }
}

/// Registers `session` as the proxy would, with `application` as its application_name.
fn register(
    registry: &Arc<Registry>,
    session: &DirectSession,
    db: &str,
    application: &str,
) -> Registration {
    let registration = registry.register(
        ClientInfo {
            addr: SocketAddr::from(([127, 0, 0, 1], 40_000)),
            user: "app".into(),
            database: db.into(),
            application_name: application.into(),
        },
        session.upstream(),
    );
    let record = registration.record();
    record.set_backend_key(session.pid, &[0, 0, 0, 1]);
    record.ready_for_query(TxnStatus::Idle, false);
    registration
}

fn past(d: Duration) -> Duration {
    d + Duration::from_millis(1)
}

/// One test's world: its database, a superuser client on it, and a guard over `config` with a
/// registry and a clock the test moves.
struct Scene {
    cluster: &'static TestCluster,
    db: String,
    admin: tokio_postgres::Client,
    registry: Arc<Registry>,
    clock: ManualClock,
    guard: Arc<Guard>,
}

/// The scene of a test named `prefix`: its guard runs the test cluster's config with
/// `protected` and `rules` (see [`config_with_rules`]).
async fn scene(prefix: &str, protected: &[&str], rules: &str) -> Scene {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, prefix).await;
    let admin = connect(cluster, &db).await;
    let registry = Arc::new(Registry::new());
    let clock = ManualClock::new();
    let config = config_with_rules(cluster, protected, rules);
    let guard = Guard::with_clock(&config, None, Arc::clone(&registry), clock.clock())
        .expect("building the guard");
    Scene {
        cluster,
        db,
        admin,
        registry,
        clock,
        guard,
    }
}

impl Scene {
    /// A session registered as `application`, idle in a transaction holding `sql`'s row lock.
    async fn holder(&self, application: &str, sql: &str) -> (DirectSession, Registration) {
        let session = DirectSession::tcp(self.cluster, &self.db).await;
        let registration = register(&self.registry, &session, &self.db, application);
        session
            .run(registration.record(), sql, TxnStatus::InTransaction)
            .await
            .expect("taking the row lock");
        (session, registration)
    }
}

/// A "login" rule (5 s on `app.user_sessions`, with `login_extra` TOML lines) and a "scratch"
/// rule (60 s on `app.scratch`).
fn login_and_scratch_rules(login_extra: &str) -> String {
    format!(
        "[[guard.rules]]\nname = \"login\"\ntables = [\"app.user_sessions\"]\n\
         idle_in_transaction_timeout = \"5s\"\n{login_extra}\n\
         [[guard.rules]]\nname = \"scratch\"\ntables = [\"app.scratch\"]\n\
         idle_in_transaction_timeout = \"60s\"\n"
    )
}

const LOGIN_ROW: &str = "BEGIN; SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE";
const LOGIN_ROW_2: &str = "BEGIN; SELECT * FROM app.user_sessions WHERE id = 2 FOR UPDATE";
const SCRATCH_ROW: &str = "BEGIN; SELECT * FROM app.scratch WHERE id = 1 FOR UPDATE";

#[tokio::test]
async fn two_rules_terminate_each_holder_at_its_own_time_and_spare_the_exempt_application() {
    let s = scene(
        "rules_two",
        &[],
        &login_and_scratch_rules(r#"exempt_applications = ["migrat*"]"#),
    )
    .await;

    let (login, login_reg) = s.holder("web", LOGIN_ROW).await;
    let (scratch, scratch_reg) = s.holder("web", SCRATCH_ROW).await;
    let (migration, migration_reg) = s.holder("migrate-7", LOGIN_ROW_2).await;

    // Past the login rule's 5 s: only its holder goes.
    s.clock.advance(past(Duration::from_secs(5)));
    let report = s.guard.sweep_once().await;
    assert_eq!(report.events.len(), 1, "{report:?}");
    let event = &report.events[0];
    assert_eq!(event.backend_pid, login.pid);
    assert_eq!(event.outcome, Outcome::Terminated);
    assert_eq!(event.rules, vec!["login".to_owned()]);
    assert!(
        event.summary.contains("rule \"login\""),
        "{}",
        event.summary
    );
    let notice = login_reg
        .record()
        .kill_notice()
        .expect("the client is told");
    assert!(
        notice.message.contains("rule \"login\""),
        "{}",
        notice.message
    );
    assert!(report
        .left
        .contains(&(scratch_reg.record().id, LeaveReason::NotIdleLongEnough)));
    assert!(!backend_alive(&s.admin, login.pid).await);
    assert!(backend_alive(&s.admin, scratch.pid).await);
    assert!(backend_alive(&s.admin, migration.pid).await);

    // Past the scratch rule's 60 s: its holder goes; the exempt migration never does.
    s.clock.advance(Duration::from_secs(55));
    let report = s.guard.sweep_once().await;
    let pids: Vec<i32> = report.events.iter().map(|e| e.backend_pid).collect();
    assert_eq!(pids, vec![scratch.pid], "{report:?}");
    assert_eq!(report.events[0].rules, vec!["scratch".to_owned()]);
    assert!(
        report
            .left
            .contains(&(migration_reg.record().id, LeaveReason::NoProtectedLock)),
        "{report:?}"
    );
    assert!(!backend_alive(&s.admin, scratch.pid).await);
    assert!(backend_alive(&s.admin, migration.pid).await);
    s.clock.advance(HOUR);
    assert!(s.guard.sweep_once().await.events.is_empty());
    assert!(backend_alive(&s.admin, migration.pid).await);
}

#[tokio::test]
async fn a_session_under_two_rules_is_judged_by_each_and_the_due_one_acts() {
    let s = scene(
        "rules_both",
        &[],
        &login_and_scratch_rules(r#"dry_run = true"#),
    )
    .await;
    let both = "BEGIN; SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE; \
                SELECT * FROM app.scratch WHERE id = 1 FOR UPDATE";
    let (session, _reg) = s.holder("web", both).await;

    // Only the dry-run rule is due: a record, nothing killed.
    s.clock.advance(past(Duration::from_secs(5)));
    let report = s.guard.sweep_once().await;
    assert_eq!(report.events.len(), 1, "{report:?}");
    assert_eq!(report.events[0].outcome, Outcome::DryRun);
    assert_eq!(report.events[0].rules, vec!["login".to_owned()]);
    assert!(backend_alive(&s.admin, session.pid).await);

    // Both due: the stricter verdict (terminate) wins and both rules are named.
    s.clock.advance(Duration::from_secs(60));
    let report = s.guard.sweep_once().await;
    assert_eq!(report.events.len(), 1, "{report:?}");
    let event = &report.events[0];
    assert_eq!(event.outcome, Outcome::Terminated);
    assert_eq!(event.rules, vec!["scratch".to_owned(), "login".to_owned()]);
    assert_eq!(event.locks.len(), 2, "{event:?}");
    assert!(!backend_alive(&s.admin, session.pid).await);
}

#[tokio::test]
async fn reload_adds_changes_and_removes_a_rule_while_sessions_are_open() {
    let s = scene("rules_reload", &["app.user_sessions"], "").await;
    let flat = config_with_rules(s.cluster, &["app.user_sessions"], "");
    let (first, _first_reg) = s.holder("web", LOGIN_ROW).await;
    s.clock.advance(Duration::from_secs(10));
    assert!(s.guard.sweep_once().await.events.is_empty());

    // Added: a 5 s rule for the login table applies to the session already open.
    let fast = "[[guard.rules]]\nname = \"fast\"\ntables = [\"app.user_sessions\"]\n\
                idle_in_transaction_timeout = \"5s\"\n";
    reload_guard(
        &s.guard,
        &config_with_rules(s.cluster, &["app.user_sessions"], fast),
    );
    let report = s.guard.sweep_once().await;
    assert_eq!(report.events.len(), 1, "{report:?}");
    assert_eq!(report.events[0].backend_pid, first.pid);
    assert_eq!(report.events[0].rules, vec!["fast".to_owned()]);
    assert!(!backend_alive(&s.admin, first.pid).await);

    // Changed to an hour: the next holder, already 10 s idle by the guard's clock, stays.
    let (second, _second_reg) = s.holder("web", LOGIN_ROW).await;
    reload_guard(
        &s.guard,
        &config_with_rules(
            s.cluster,
            &["app.user_sessions"],
            &fast.replace("\"5s\"", "\"1h\""),
        ),
    );
    let report = s.guard.sweep_once().await;
    assert!(report.events.is_empty(), "{report:?}");
    assert!(backend_alive(&s.admin, second.pid).await);

    // Removed, with the flat timeout at 5 s: the catch-all acts, under its own name.
    reload_guard(
        &s.guard,
        &GuardConfig {
            idle_in_transaction_timeout: Duration::from_secs(5),
            ..flat.clone()
        },
    );
    let report = s.guard.sweep_once().await;
    assert_eq!(report.events.len(), 1, "{report:?}");
    assert_eq!(report.events[0].backend_pid, second.pid);
    assert_eq!(report.events[0].rules, vec!["default".to_owned()]);
    assert!(
        !report.events[0].summary.contains("rule"),
        "{}",
        report.events[0].summary
    );
    assert!(!backend_alive(&s.admin, second.pid).await);
}

// ---- The rules on the admin port ---------------------------------------------------------

use lockguard_tests::admin::{self, OPS};
use lockguard_tests::http::Request;

const LOGIN_RULE: &str = "\n[[guard.rules]]\nname = \"login\"\ntables = [\"app.user_sessions\"]\n\
                          idle_in_transaction_timeout = \"1h\"\nmax_blocking = \"5s\"\n";

#[tokio::test]
async fn show_rules_and_api_rules_list_each_rule_its_settings_and_sessions_and_reload_changes_them()
{
    let db = admin::database("rules_show").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("lockguard.toml");
    let text = admin::config_text("\"app.*\"", LOGIN_RULE);
    std::fs::write(&file, &text).expect("write config");
    let running = admin::start_from_file(&file).await;
    // Holds a login row: the login rule (an hour idle) governs it, not the flat 300 ms.
    let mut holder = running.app(&db).await;
    holder.lock_protected_row().await;
    let ops = admin::console(&running, OPS).await.expect("console login");

    let rules = admin::rows(&ops, "SHOW RULES").await;
    let names: Vec<&str> = rules.iter().map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["login", "default"], "{rules:?}");
    let login = &rules[0];
    assert_eq!(login["position"], "1");
    assert_eq!(login["tables"], "app.user_sessions");
    assert_eq!(login["idle_in_transaction_timeout"], "1h");
    assert_eq!(login["max_blocking"], "5s");
    assert_eq!(login["blocking_action"], "cancel");
    assert_eq!(login["dry_run"], "f");
    assert_eq!(login["sessions"], "1");
    assert_eq!(login["holding"], "1");
    let flat = &rules[1];
    assert_eq!(flat["tables"], "app.*");
    assert_eq!(flat["idle_in_transaction_timeout"], "300ms");
    assert!(!flat.contains_key("max_blocking"), "{flat:?}");
    assert_eq!(flat["holding"], "0");
    assert!(backend_alive(&admin::direct(&db).await, holder.pid).await);
    // SHOW CLIENTS and SHOW LOCKS name the rule that governs the holder's lock.
    let clients = admin::rows(&ops, "SHOW CLIENTS").await;
    let holder_row = clients
        .iter()
        .find(|r| r["backend_pid"] == holder.pid.to_string())
        .expect("the holder's row");
    assert_eq!(holder_row["rules"], "login", "{holder_row:?}");
    let locks = admin::rows(&ops, "SHOW LOCKS").await;
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0]["rule"], "login", "{locks:?}");

    let response = Request::get("/api/rules")
        .token(Some(admin::API_TOKEN))
        .send(running.http)
        .await;
    // A file config has no token: the API is read-only and answers anyone local.
    assert_eq!(response.status, 200, "{}", response.body);
    let json = response.json();
    assert_eq!(json[0]["name"], "login", "{json}");
    assert_eq!(json[0]["holding"], 1, "{json}");
    assert_eq!(json[1]["name"], "default", "{json}");

    // RELOAD: the rule becomes dry-run, and a new one appears before it.
    let changed = format!(
        "{}\n[[guard.rules]]\nname = \"billing\"\ntables = [\"app.scratch\"]\n{}dry_run = true\n",
        admin::config_text("\"app.*\"", ""),
        LOGIN_RULE.trim_start()
    );
    std::fs::write(&file, &changed).expect("rewrite config");
    admin::rows(&ops, "RELOAD").await;
    let rules = admin::rows(&ops, "SHOW RULES").await;
    let names: Vec<&str> = rules.iter().map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["billing", "login", "default"], "{rules:?}");
    assert_eq!(rules[1]["dry_run"], "t");

    // The operator's switch covers every rule, whatever the rule says of its own.
    for (set, shown) in [("off", "f"), ("on", "t")] {
        admin::rows(&ops, &format!("SET dry_run = {set}")).await;
        let rules = admin::rows(&ops, "SHOW RULES").await;
        assert!(rules.iter().all(|r| r["dry_run"] == shown), "{rules:?}");
    }

    // An operator's kill of the holder: SHOW EVENTS names the rule governing its lock.
    admin::rows(&ops, "SET dry_run = off").await;
    admin::rows(&ops, &format!("KILL {}", holder_row["id"])).await;
    let events = admin::rows(&ops, "SHOW EVENTS").await;
    let event = events
        .iter()
        .find(|e| e["backend_pid"] == holder.pid.to_string())
        .expect("the kill's event");
    assert_eq!(event["rules"], "login", "{event:?}");
}

/// What RELOAD does to the guard: puts `config` in force (the guard derives its rules from it).
fn reload_guard(guard: &Guard, config: &GuardConfig) {
    guard.live().update(|running| lockguard_config::Config {
        guard: config.clone(),
        ..running.clone()
    });
}
