//! The blocking budget against a real PostgreSQL: the wait-for graph the guard reads, and what
//! it does to a proxied session that keeps another waiting past a rule's `max_blocking`.

use std::time::{Duration, SystemTime};

use guard_core::{lock_graph, GuardConnection};
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{
    connect, guard_role, guard_test_database, wait_until_waiting, DirectSession,
};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

/// A connection as the guard's role, prepared like the guard's own.
async fn guard_connection(cluster: &TestCluster, db: &str) -> GuardConnection {
    let (client, connection) = cluster
        .pg_config(guard_role(cluster), None, db)
        .connect(NoTls)
        .await
        .expect("connecting as the guard role");
    tokio::spawn(connection);
    GuardConnection::prepare(client, guard_core::guard::STATEMENTS)
        .await
        .expect("preparing the guard statements")
}

/// A direct session whose `UPDATE` of row 1 runs in the background until it gets the row.
async fn updater(cluster: &TestCluster, db: &str) -> (i32, JoinHandle<Result<u64, String>>) {
    let s = DirectSession::tcp(cluster, db).await;
    let pid = s.pid;
    let handle = tokio::spawn(async move {
        s.client
            .execute("UPDATE app.user_sessions SET token = 'w' WHERE id = 1", &[])
            .await
            .map_err(|e| format!("{e:?}"))
    });
    (pid, handle)
}

#[tokio::test]
async fn the_lock_graph_shows_each_waiter_its_blockers_and_the_head_of_a_chain() {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, "budget_graph").await;
    let admin = connect(cluster, &db).await;
    let holder = DirectSession::tcp(cluster, &db).await;
    holder
        .client
        .batch_execute("BEGIN; SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE")
        .await
        .expect("lock row 1");
    let before = SystemTime::now();
    let (b, b_done) = updater(cluster, &db).await;
    wait_until_waiting(&admin, b).await;
    let (c, c_done) = updater(cluster, &db).await;
    wait_until_waiting(&admin, c).await;

    let conn = guard_connection(cluster, &db).await;
    let graph = lock_graph::read(&conn)
        .await
        .expect("reading the lock graph");
    let waiters: Vec<i32> = graph.waiters().iter().map(|w| w.pid).collect();
    assert_eq!(waiters, {
        let mut v = vec![b, c];
        v.sort_unstable();
        v
    });
    let wb = &graph.backends[&b];
    let wait = wb.waiting.as_ref().expect("b waits");
    assert_eq!(wait.blockers, vec![holder.pid], "{wb:?}");
    // B waits for the holder's transaction; the table is the one it updates.
    assert_eq!(
        wb.wanted_tables(),
        vec![("app".to_owned(), "user_sessions".to_owned())]
    );
    if cluster.server_major().await >= 14 {
        let since = wait.since.expect("waitstart on PostgreSQL 14+");
        assert!(since + Duration::from_secs(5) > before, "{since:?}");
        assert!(wb.waited(SystemTime::now()).is_some());
    }
    // C waits behind B (for the row's tuple lock), and through B for the holder.
    let wc = &graph.backends[&c];
    assert!(
        wc.waiting.as_ref().expect("c waits").blockers.contains(&b),
        "{wc:?}"
    );
    assert_eq!(graph.heads(c), vec![holder.pid]);
    assert_eq!(graph.heads(b), vec![holder.pid]);
    let head = &graph.backends[&holder.pid];
    assert!(head.waiting.is_none());
    assert_eq!(head.held_mode("app", "user_sessions"), Some("RowShareLock"));
    assert_eq!(
        head.client_port,
        holder.local_addr.map(|a| i32::from(a.port()))
    );
    assert_eq!(head.state.as_deref(), Some("idle in transaction"));

    holder
        .client
        .batch_execute("ROLLBACK")
        .await
        .expect("rollback");
    for done in [b_done, c_done] {
        let result = tokio::time::timeout(Duration::from_secs(10), done).await;
        assert!(matches!(result, Ok(Ok(Ok(1)))), "{result:?}");
    }
    let graph = lock_graph::read(&conn)
        .await
        .expect("reading the lock graph");
    assert!(graph.waiters().is_empty(), "{graph:?}");
}

// ---- The budget through the proxy --------------------------------------------------------

use std::sync::Arc;
use std::time::Instant;

use guard_core::{AuditEvent, BudgetVerdict, Outcome, SweepReport};
use lockguard_config::Config;
use lockguard_tests::app::App;
use lockguard_tests::guard_support::{self, backend_alive};
use lockguard_tests::proxy::{config_for, http_get, TestProxy};
use lockguard_tests::raw;
use tokio_postgres::Client;

const BUDGET: Duration = Duration::from_secs(1);
const SWEEP: Duration = Duration::from_millis(100);

/// A database, a proxy guarding `app.user_sessions` with rule `login` (`rule_extra` adds
/// keys to it; the budget is [`BUDGET`]), and a direct superuser connection.
struct Scene {
    db: String,
    proxy: TestProxy,
    admin: Client,
}

async fn scene(prefix: &str, rule_extra: &str) -> Scene {
    let cluster = TestCluster::shared();
    let db = guard_test_database(cluster, prefix).await;
    let admin = connect(cluster, &db).await;
    let rules = Config::from_toml_str(&format!(
        "[[guard.rules]]\nname = \"login\"\ntables = [\"app.user_sessions\"]\n\
         max_blocking = \"{}ms\"\n{rule_extra}\n",
        BUDGET.as_millis()
    ))
    .expect("the rule parses");
    let mut config = config_for(cluster);
    let role = guard_support::guard_config(cluster, &[]);
    config.guard.dsn = role.dsn;
    config.guard.password_env = role.password_env;
    // Only the budget acts in these tests: the idle rules would take an hour.
    config.guard.idle_in_transaction_timeout = Duration::from_secs(3600);
    config.guard.failed_transaction_timeout = Duration::from_secs(3600);
    config.guard.sweep_interval = SWEEP;
    config.guard.rules = rules.guard.rules;
    let proxy = TestProxy::start_with(config).await;
    Scene { db, proxy, admin }
}

async fn app(scene: &Scene) -> App {
    let user = guard_support::app_role(TestCluster::shared());
    App::connect(scene.proxy.addr, user, &scene.db).await
}

/// Reads the holder's answer to the statement it sent: every message up to ReadyForQuery.
async fn answer(app: &mut App, within: Duration) -> Vec<raw::Received> {
    let mut seen = Vec::new();
    while let Some(m) = raw::read_message(&mut app.stream, within).await {
        let done = m.tag == b'Z';
        seen.push(m);
        if done {
            return seen;
        }
    }
    panic!("no ReadyForQuery within {within:?}: {seen:?}");
}

/// The budget events about backend `pid` so far.
fn budget_events(scene: &Scene, pid: i32) -> Vec<AuditEvent> {
    scene
        .proxy
        .audit_events(pid, |e| e.trigger == "blocking_budget")
}

async fn wait_for_budget_event(scene: &Scene, pid: i32) -> AuditEvent {
    guard_support::wait_for_some(
        Duration::from_secs(10),
        &format!("a blocking-budget event for backend {pid}"),
        || budget_events(scene, pid).into_iter().next(),
    )
    .await
}

/// Waits for a sweep report whose budget part says something about `waiter`.
async fn budget_finding_for(
    reports: &mut tokio::sync::broadcast::Receiver<Arc<SweepReport>>,
    waiter: i32,
) -> guard_core::BudgetFinding {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let report = tokio::time::timeout(left, reports.recv())
            .await
            .unwrap_or_else(|_| panic!("no budget finding for backend {waiter} within 10s"))
            .expect("the guard's sweep reports");
        if let Some(f) = report.budget.iter().find(|f| f.waiter_pid == waiter) {
            return f.clone();
        }
    }
}

/// How long a waiter may take in all: its budget, a sweep, and half a second for the
/// cancel and the server.
fn allowed_wait() -> Duration {
    BUDGET + SWEEP + Duration::from_millis(500)
}

/// A direct `UPDATE` of row 1 that waits; returns its pid and the instant it started waiting.
async fn waiting_updater(scene: &Scene) -> (i32, Instant, JoinHandle<Result<u64, String>>) {
    let cluster = TestCluster::shared();
    let started = Instant::now();
    let (pid, done) = updater(cluster, &scene.db).await;
    wait_until_waiting(&scene.admin, pid).await;
    (pid, started, done)
}

async fn assert_updated_within(
    done: JoinHandle<Result<u64, String>>,
    started: Instant,
    limit: Duration,
) -> Duration {
    let result = tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("the waiting UPDATE went through")
        .expect("the waiter task");
    let took = started.elapsed();
    assert_eq!(result, Ok(1));
    assert!(
        took <= limit,
        "the waiter waited {took:?}, allowed {limit:?}"
    );
    took
}

#[tokio::test]
async fn a_busy_holder_past_the_budget_has_its_statement_cancelled_and_stays_usable() {
    let scene = scene("budget_cancel", "").await;
    let mut holder = app(&scene).await;
    holder.exec_ok("BEGIN").await;
    holder
        .exec_ok("UPDATE app.user_sessions SET token = 'held' WHERE id = 1")
        .await;
    holder.send("SELECT pg_sleep(60)").await;
    let (waiter, started, done) = waiting_updater(&scene).await;

    assert_updated_within(done, started, allowed_wait()).await;
    // The holder's client got the server's cancel, and its session goes on.
    let reply = answer(&mut holder, Duration::from_secs(10)).await;
    let error = reply
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no error for the cancelled statement: {reply:?}"));
    assert_eq!(
        error.error_fields().0,
        "57014",
        "{:?}",
        error.error_fields()
    );
    holder.exec_ok("ROLLBACK").await;
    holder.exec_ok("SELECT 1").await;
    assert!(backend_alive(&scene.admin, holder.pid).await);

    let event = wait_for_budget_event(&scene, holder.pid).await;
    assert_eq!(event.outcome, Outcome::Cancelled, "{event:?}");
    assert_eq!(event.rules, vec!["login".to_owned()]);
    let evidence = event.blocking.as_ref().expect("the budget's evidence");
    assert_eq!(evidence.waiter_pid, waiter);
    assert_eq!(evidence.table, "app.user_sessions");
    assert_eq!(evidence.action, "cancel");
    assert_eq!(evidence.holder_mode.as_deref(), Some("RowExclusiveLock"));
    assert!(
        evidence.waited_ms > BUDGET.as_millis() as u64,
        "{evidence:?}"
    );
    assert!(
        event.summary.contains("rule \"login\""),
        "{}",
        event.summary
    );
    let (status, metrics) = http_get(scene.proxy.http.expect("HTTP endpoint"), "/metrics").await;
    assert_eq!(status, 200);
    let series = "lockguard_rule_terminations_total{rule=\"login\",\
                  trigger=\"blocking_budget\",outcome=\"cancelled\"} 1";
    assert!(metrics.contains(series), "{metrics}");
}

#[tokio::test]
async fn an_idle_holder_past_the_budget_is_terminated_with_the_rule_in_its_fatal() {
    let scene = scene("budget_idle", "").await;
    let mut holder = app(&scene).await;
    holder.lock_protected_row().await;
    let (_waiter, started, done) = waiting_updater(&scene).await;

    assert_updated_within(done, started, allowed_wait()).await;
    let (code, message) = holder.farewell().await;
    assert_eq!(code, "57P01", "{message}");
    assert!(
        message.starts_with("lockguard: terminated backend"),
        "{message}"
    );
    assert!(message.contains("rule \"login\""), "{message}");
    let event = wait_for_budget_event(&scene, holder.pid).await;
    assert_eq!(event.outcome, Outcome::Terminated);
    assert_eq!(
        event.blocking.as_ref().map(|b| b.action.as_str()),
        Some("terminate")
    );
}

#[tokio::test]
async fn in_a_chain_only_the_proxied_head_is_acted_on() {
    let scene = scene("budget_chain", "").await;
    // A (proxied, busy) holds row 1; B (proxied too) waits for A; C (direct) waits behind B.
    let mut a = app(&scene).await;
    a.exec_ok("BEGIN").await;
    a.exec_ok("SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE")
        .await;
    a.send("SELECT pg_sleep(60)").await;
    let user = guard_support::app_role(TestCluster::shared());
    let b_client = scene
        .proxy
        .connect(user, None, &scene.db)
        .await
        .expect("B connects through the proxy");
    let b: i32 = b_client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("B's pid")
        .get(0);
    let started = Instant::now();
    let b_done = tokio::spawn(async move {
        b_client
            .execute("UPDATE app.user_sessions SET token = 'b' WHERE id = 1", &[])
            .await
            .map_err(|e| format!("{e:?}"))
    });
    wait_until_waiting(&scene.admin, b).await;
    let (c, _, c_done) = waiting_updater(&scene).await;

    // B's and C's updates both go through: A was cancelled, B was not touched.
    assert_updated_within(b_done, started, allowed_wait()).await;
    assert_updated_within(c_done, started, allowed_wait() + Duration::from_secs(1)).await;
    let reply = answer(&mut a, Duration::from_secs(10)).await;
    assert!(reply
        .iter()
        .any(|m| m.tag == b'E' && m.error_fields().0 == "57014"));
    let acted: Vec<i32> = scene
        .proxy
        .guard()
        .expect("guard")
        .audit()
        .recent()
        .iter()
        .filter(|e| e.trigger == "blocking_budget" && e.outcome != Outcome::AlreadyGone)
        .map(|e| e.backend_pid)
        .collect();
    assert!(
        acted.iter().all(|pid| *pid == a.pid),
        "acted on {acted:?}; A={}, B={b}, C={c}",
        a.pid
    );
    assert!(acted.contains(&a.pid));
}

#[tokio::test]
async fn a_blocker_that_is_not_proxied_is_never_acted_on() {
    let scene = scene("budget_direct", "").await;
    let cluster = TestCluster::shared();
    let holder = DirectSession::tcp(cluster, &scene.db).await;
    holder
        .client
        .batch_execute("BEGIN; SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE")
        .await
        .expect("lock row 1");
    // A proxied session is needed for the guard to look at this database at all.
    let _proxied = app(&scene).await;
    let mut reports = scene.proxy.guard().expect("guard").sweep_reports();
    let (waiter, _, done) = waiting_updater(&scene).await;

    let finding = budget_finding_for(&mut reports, waiter).await;
    assert_eq!(finding.holder_pid, holder.pid);
    assert_eq!(finding.verdict, BudgetVerdict::NotOurs);
    assert!(finding.waited > BUDGET);
    assert!(backend_alive(&scene.admin, holder.pid).await);
    assert!(guard_support::is_waiting(&scene.admin, waiter).await);
    assert!(budget_events(&scene, holder.pid).is_empty());
    holder
        .client
        .batch_execute("ROLLBACK")
        .await
        .expect("rollback");
    assert_eq!(done.await.expect("waiter task"), Ok(1));
}

/// `log` and dry-run: the decision is recorded once, and nothing is signalled.
async fn recorded_only(prefix: &str, rule_extra: &str, expected: Outcome) {
    let scene = scene(prefix, rule_extra).await;
    let mut holder = app(&scene).await;
    holder.exec_ok("BEGIN").await;
    holder
        .exec_ok("SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE")
        .await;
    holder.send("SELECT pg_sleep(60)").await;
    let mut reports = scene.proxy.guard().expect("guard").sweep_reports();
    let (waiter, _, done) = waiting_updater(&scene).await;

    let event = wait_for_budget_event(&scene, holder.pid).await;
    assert_eq!(event.outcome, expected, "{event:?}");
    assert_eq!(event.blocking.as_ref().map(|b| b.waiter_pid), Some(waiter));
    // The next sweeps see the same wait and say it was dealt with: no second record.
    let finding = budget_finding_for(&mut reports, waiter).await;
    let finding = match finding.verdict {
        BudgetVerdict::Acted(_) => budget_finding_for(&mut reports, waiter).await,
        _ => finding,
    };
    assert_eq!(finding.verdict, BudgetVerdict::AlreadyHandled);
    assert_eq!(budget_events(&scene, holder.pid).len(), 1);
    assert!(backend_alive(&scene.admin, holder.pid).await);
    assert!(guard_support::is_waiting(&scene.admin, waiter).await);
    // The holder's statement was never cancelled: it is still running.
    let state: String = scene
        .admin
        .query_one(
            "SELECT state FROM pg_stat_activity WHERE pid = $1",
            &[&holder.pid],
        )
        .await
        .expect("holder's state")
        .get(0);
    assert_eq!(state, "active");
    scene
        .admin
        .query_one("SELECT pg_cancel_backend($1)", &[&holder.pid])
        .await
        .expect("the test ends the holder's statement itself");
    answer(&mut holder, Duration::from_secs(10)).await;
    holder.exec_ok("ROLLBACK").await;
    assert_eq!(done.await.expect("waiter task"), Ok(1));
}

#[tokio::test]
async fn blocking_action_log_only_records() {
    recorded_only("budget_log", "blocking_action = \"log\"", Outcome::Logged).await;
}

#[tokio::test]
async fn a_dry_run_rule_only_records_what_the_budget_would_do() {
    recorded_only("budget_dry", "dry_run = true", Outcome::DryRun).await;
}
