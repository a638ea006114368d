//! The guard's own connection as an attacker sees it: the guard's SQL runs inside databases
//! other people own, so nothing they create there may run with the guard's rights; the guard
//! role is no superuser and says what it may not do; a client's bad input never marks the
//! guard down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use guard_core::{AuditEvent, Guard, HealthStatus, Outcome, Registry};
use lockguard_config::GuardConfig;
use lockguard_tests::cluster::{TestCluster, GUARD_USER};
use lockguard_tests::guard_support::{
    self, app_role, backend_alive, connect, guard_config, guard_config_as, guard_test_database,
    wait_for,
};
use lockguard_tests::proxy::{config_for, http_get, TestProxy};
use tokio_postgres::{Client, NoTls};

const PROTECTED: &str = "app.user_sessions";
const WAIT: Duration = Duration::from_secs(10);

/// A database owned by a fresh ordinary role (the attacker: no privilege but owning the
/// database, which in PostgreSQL 15 includes creating objects in its `public` schema), with
/// the guard tests' tables and a side table `public.calls` that anyone may write to: the
/// attacker's functions record there who ran them.
struct AttackedDatabase {
    db: String,
    attacker: String,
    /// The attacker's own connection to the database.
    attacker_client: Client,
    /// A superuser connection to the database, for observation.
    admin: Client,
}

async fn attacked_database(prefix: &str) -> Option<AttackedDatabase> {
    let cluster = TestCluster::shared();
    if !cluster.is_owned() {
        eprintln!("skipped: needs an owned cluster (roles are created)");
        return None;
    }
    let db = guard_test_database(cluster, prefix).await;
    let attacker = format!("attacker_{}", db.rsplit('_').next().unwrap_or("x"));
    let admin = connect(cluster, &db).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {attacker} LOGIN; ALTER DATABASE \"{db}\" OWNER TO {attacker};"
        ))
        .await
        .expect("create the attacker and give them the database");
    let (attacker_client, connection) = cluster
        .pg_config(&attacker, None, &db)
        .connect(NoTls)
        .await
        .expect("the attacker logs in");
    tokio::spawn(connection);
    attacker_client
        .batch_execute(
            "CREATE TABLE public.calls (who text NOT NULL, app text NOT NULL, what text NOT NULL);
             GRANT INSERT ON public.calls TO PUBLIC;",
        )
        .await
        .expect("the attacker's side table");
    Some(AttackedDatabase {
        db,
        attacker,
        attacker_client,
        admin,
    })
}

impl AttackedDatabase {
    /// `public.array_agg(text)`: an exact-type match that, on the database's default search
    /// path, wins over `pg_catalog.array_agg(anynonarray)`. Its state function records the
    /// call and tries to make the attacker a superuser (which works when a superuser runs it).
    async fn plant_array_agg(&self) {
        let sql = format!(
            "CREATE FUNCTION public.spy_agg(state text[], value text) RETURNS text[]
             LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.calls
                 VALUES (current_user, current_setting('application_name'), 'array_agg');
                 BEGIN
                     EXECUTE 'ALTER ROLE {attacker} SUPERUSER';
                 EXCEPTION WHEN insufficient_privilege THEN NULL;
                 END;
                 RETURN pg_catalog.array_append(state, value);
             END $$;
             CREATE AGGREGATE public.array_agg(text) (SFUNC = public.spy_agg, STYPE = text[]);",
            attacker = self.attacker
        );
        self.attacker_client
            .batch_execute(&sql)
            .await
            .expect("the attacker's array_agg");
    }

    /// `evil.=` on int4 and the database's search path pointing there first: every unqualified
    /// `=` on two int4 values in a new session of this database runs the attacker's function.
    async fn plant_operator(&self) {
        let sql = format!(
            "CREATE SCHEMA evil;
             GRANT USAGE ON SCHEMA evil TO PUBLIC;
             CREATE FUNCTION evil.spy_eq(a int4, b int4) RETURNS bool
             LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.calls
                 VALUES (current_user, current_setting('application_name'), '=');
                 RETURN a OPERATOR(pg_catalog.=) b;
             END $$;
             CREATE OPERATOR evil.= (LEFTARG = int4, RIGHTARG = int4, FUNCTION = evil.spy_eq);
             ALTER DATABASE \"{db}\" SET search_path = evil, pg_catalog;",
            db = self.db
        );
        self.attacker_client
            .batch_execute(&sql)
            .await
            .expect("the attacker's operator");
    }

    /// Calls of the attacker's functions made by the guard's connections.
    async fn calls_by_the_guard(&self) -> Vec<(String, String)> {
        self.admin
            .query(
                "SELECT who, what FROM public.calls WHERE app = $1",
                &[&guard_core::connections::GUARD_APPLICATION_NAME],
            )
            .await
            .expect("reading the side table")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    async fn attacker_is_superuser(&self) -> bool {
        self.admin
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = $1",
                &[&self.attacker],
            )
            .await
            .expect("reading pg_roles")
            .get(0)
    }
}

/// A proxy in front of the shared cluster whose guard logs in with `guard` and protects
/// `app.user_sessions`; the idle rule starts off, so the test decides when the sweep acts.
async fn proxy_with_guard(guard: GuardConfig) -> TestProxy {
    let mut config = config_for(TestCluster::shared());
    config.guard = GuardConfig {
        idle_in_transaction_timeout: Duration::ZERO,
        ..guard
    };
    TestProxy::start_with(config).await
}

/// An application session through the proxy, as `user`, holding a row lock on the protected
/// table in an open transaction; returns it with its backend pid.
async fn holder(proxy: &TestProxy, user: &str, db: &str) -> (Client, i32) {
    let client = proxy
        .connect(user, None, db)
        .await
        .expect("the application connects through lockguard");
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("backend pid")
        .get(0);
    client
        .batch_execute("BEGIN; UPDATE app.user_sessions SET token = 'held' WHERE id = 1")
        .await
        .expect("lock a protected row");
    (client, pid)
}

/// `GET /api/clients` (anonymous: no token is configured) probes the session's locks; returns
/// its `protected_locks`.
async fn protected_locks_via_api(proxy: &TestProxy, pid: i32) -> Option<i64> {
    let http = proxy.http.expect("the admin HTTP endpoint runs");
    let (status, body) = http_get(http, "/api/clients").await;
    assert_eq!(status, 200, "{body}");
    let clients: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let client = clients
        .as_array()
        .expect("an array")
        .iter()
        .find(|c| c["backend_pid"] == pid)
        .unwrap_or_else(|| panic!("backend {pid} not in {body}"))
        .clone();
    client["protected_locks"].as_i64()
}

/// Turns the idle rule on and waits for the guard's audit event about `pid`.
async fn idle_rule_event(proxy: &TestProxy, guard_config: &GuardConfig, pid: i32) -> AuditEvent {
    let guard = proxy.guard().expect("guard configured");
    guard.live().update(|running| lockguard_config::Config {
        guard: GuardConfig {
            idle_in_transaction_timeout: Duration::from_millis(200),
            ..guard_config.clone()
        },
        ..running.clone()
    });
    let mut found = None;
    wait_for(WAIT, "the idle rule's audit event", || {
        found = guard
            .audit()
            .recent()
            .into_iter()
            .find(|e| e.backend_pid == pid);
        std::future::ready(found.is_some())
    })
    .await;
    found.expect("an event")
}

/// Runs one attack end to end: the attacker's objects are in place, an application session
/// through lockguard sits idle in a transaction holding a protected lock, the HTTP API and then
/// the sweep probe it. The probe must still work (the API sees the lock, the sweep terminates
/// the holder with its audit event) and the guard must never have run the attacker's code.
async fn attack_through_lockguard(scene: &AttackedDatabase, guard: GuardConfig) {
    let proxy = proxy_with_guard(guard.clone()).await;
    let (app, pid) = holder(&proxy, app_role(TestCluster::shared()), &scene.db).await;

    assert_eq!(protected_locks_via_api(&proxy, pid).await, Some(1));
    let event = idle_rule_event(&proxy, &guard, pid).await;
    assert_eq!(event.outcome, Outcome::Terminated, "{event:?}");
    assert_eq!(event.trigger, "idle_in_transaction");
    assert!(
        event.locks.iter().any(|l| l.table == PROTECTED),
        "{event:?}"
    );
    wait_for(WAIT, "the holder's backend to exit", || async {
        !backend_alive(&scene.admin, pid).await
    })
    .await;
    assert!(app.batch_execute("SELECT 1").await.is_err());

    assert_eq!(scene.calls_by_the_guard().await, Vec::new());
    assert!(!scene.attacker_is_superuser().await);
}

#[tokio::test]
async fn a_database_owners_array_agg_never_runs_in_the_guards_probe() {
    let Some(scene) = attacked_database("sec_agg").await else {
        return;
    };
    scene.plant_array_agg().await;
    let cluster = TestCluster::shared();
    attack_through_lockguard(&scene, guard_config(cluster, &[PROTECTED])).await;
}

/// The escalation of the report, closed: were the guard a superuser, the attacker's aggregate
/// would have made them one.
#[tokio::test]
async fn a_database_owners_array_agg_cannot_make_them_superuser_through_a_superuser_guard() {
    let Some(scene) = attacked_database("sec_agg_su").await else {
        return;
    };
    scene.plant_array_agg().await;
    let cluster = TestCluster::shared();
    let guard = guard_config_as(cluster, cluster.superuser(), &[PROTECTED]);
    attack_through_lockguard(&scene, guard).await;
}

#[tokio::test]
async fn a_database_owners_operator_on_the_database_search_path_never_runs_in_guard_sql() {
    let Some(scene) = attacked_database("sec_op").await else {
        return;
    };
    scene.plant_operator().await;
    let cluster = TestCluster::shared();
    // The trap is armed: any new session of the database that compares two int4 runs it.
    let bystander = guard_support::connect_as(cluster, app_role(cluster), &scene.db).await;
    bystander
        .batch_execute("SELECT count(*) FROM app.user_sessions WHERE id = 1")
        .await
        .expect("a bystander's query");
    let armed: i64 = scene
        .admin
        .query_one("SELECT count(*) FROM public.calls WHERE what = '='", &[])
        .await
        .expect("count")
        .get(0);
    assert!(armed > 0, "the planted operator does not run at all");

    attack_through_lockguard(&scene, guard_config(cluster, &[PROTECTED])).await;
}

/// `pg_signal_backend` does not cover superusers' backends: the guard's kill is refused, the
/// audit says so with its own outcome and a clear reason, and the backend keeps running.
#[tokio::test]
async fn a_superusers_backend_cannot_be_terminated_and_the_audit_says_not_permitted() {
    let cluster = TestCluster::shared();
    if !cluster.is_owned() {
        eprintln!("skipped: needs the harness's non-superuser guard role");
        return;
    }
    let db = guard_test_database(cluster, "sec_su_holder").await;
    let admin = connect(cluster, &db).await;
    let guard = guard_config(cluster, &[PROTECTED]);
    let proxy = proxy_with_guard(guard.clone()).await;
    let (app, pid) = holder(&proxy, cluster.superuser(), &db).await;

    let event = idle_rule_event(&proxy, &guard, pid).await;
    assert_eq!(event.outcome, Outcome::NotPermitted, "{event:?}");
    assert_eq!(event.outcome.to_string(), "not_permitted");
    let reason = event.error.as_deref().expect("the reason");
    assert!(
        reason.contains("superuser") && reason.contains("pg_signal_backend"),
        "{reason}"
    );
    assert!(
        event
            .summary
            .starts_with("lockguard: did not terminate backend")
            && event.summary.contains("not permitted"),
        "{}",
        event.summary
    );
    // Not signalled, not held back: the session carries on, and its transaction with it.
    assert!(backend_alive(&admin, pid).await);
    let record = proxy.session_of(pid).await;
    assert!(!record.kill_pending());
    app.batch_execute("UPDATE app.user_sessions SET token = 'still mine' WHERE id = 1")
        .await
        .expect("the superuser's session still works");
    // Decided once for this idle stretch, not retried on every sweep.
    let guard_handle = proxy.guard().expect("guard");
    assert!(guard_handle.sweep_once().await.events.is_empty());
    app.batch_execute("ROLLBACK").await.expect("rollback");
}

/// The harness's guard role is what `lockguard setup-sql` creates: no superuser, the two
/// predefined roles, and EXECUTE on the lookup function, which hands out SCRAM secrets only.
#[tokio::test]
async fn the_setup_sql_gives_the_guard_role_exactly_its_privileges() {
    let cluster = TestCluster::shared();
    if !cluster.is_owned() {
        eprintln!("skipped: needs an owned cluster");
        return;
    }
    let admin = cluster.connect_admin().await;
    let row = admin
        .query_one(
            "SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls,
                    pg_has_role(r.oid, 'pg_signal_backend', 'MEMBER'),
                    pg_has_role(r.oid, 'pg_read_all_stats', 'MEMBER'),
                    has_function_privilege(r.oid, 'lockguard.scram_verifier(text)', 'EXECUTE'),
                    has_function_privilege('public', 'lockguard.scram_verifier(text)', 'EXECUTE')
             FROM pg_roles r WHERE r.rolname = $1",
            &[&GUARD_USER],
        )
        .await
        .expect("the guard role exists");
    let flags: Vec<bool> = (0..8).map(|i| row.get(i)).collect();
    assert_eq!(
        flags,
        vec![false, false, false, false, true, true, true, false],
        "superuser, createrole, createdb, bypassrls, signal, read stats, execute, public execute"
    );

    // Through the guard: a SCRAM role's secret, nothing for an md5 role (an md5 hash is as
    // good as the password), and pg_authid itself stays closed.
    let guard_client = guard_support::connect_as(cluster, GUARD_USER, "postgres").await;
    let secret = |user: &'static str| {
        let guard_client = &guard_client;
        async move {
            guard_client
                .query_one(lockguard_config::DEFAULT_AUTH_QUERY, &[&user])
                .await
                .expect("the default auth_query")
                .get::<_, Option<String>>(0)
        }
    };
    let scram = secret(lockguard_tests::cluster::SCRAM_USER).await;
    assert!(scram.is_some_and(|s| s.starts_with("SCRAM-SHA-256$")));
    assert_eq!(secret(lockguard_tests::cluster::MD5_USER).await, None);
    let denied = guard_client
        .query("SELECT rolpassword FROM pg_catalog.pg_authid", &[])
        .await
        .expect_err("pg_authid is not readable by the guard role");
    assert_eq!(denied.code().map(|c| c.code()), Some("42501"));

    // Running the script again changes nothing and fails nothing; odd names are quoted.
    let again = guard_core::setup::setup_sql(GUARD_USER, "lockguard").expect("render");
    admin.batch_execute(&again).await.expect("the script again");
    let odd = guard_core::setup::setup_sql("guard \"odd\" 'role'", "odd schema")
        .expect("render odd names");
    admin
        .batch_execute(&odd)
        .await
        .expect("the script with odd names");
    let odd_ok: bool = admin
        .query_one(
            "SELECT has_function_privilege('guard \"odd\" ''role''', \
             '\"odd schema\".scram_verifier(text)', 'EXECUTE')",
            &[],
        )
        .await
        .expect("privilege check")
        .get(0);
    assert!(odd_ok);

    // A schema someone else owns is refused rather than trusted.
    admin
        .batch_execute("CREATE ROLE squatter; CREATE SCHEMA squatted AUTHORIZATION squatter")
        .await
        .expect("a squatted schema");
    let squatted = guard_core::setup::setup_sql(GUARD_USER, "squatted").expect("render");
    let err = admin
        .batch_execute(&squatted)
        .await
        .expect_err("a schema owned by a non-superuser");
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("not owned by a superuser")),
        "{err:?}"
    );
}

/// A tracing writer that keeps what is logged, to check a warning was given.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

/// Connecting as a superuser draws a warning naming the setup SQL; the harness's guard role
/// does not.
#[tokio::test]
async fn a_superuser_guard_role_is_warned_about_when_the_guard_connects() {
    let cluster = TestCluster::shared();
    if !cluster.is_owned() {
        eprintln!("skipped: needs the harness's non-superuser guard role");
        return;
    }
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let _scope = tracing::subscriber::set_default(subscriber);

    let registry = Arc::new(Registry::new());
    let ordinary = Guard::new(&guard_config(cluster, &[]), Arc::clone(&registry)).expect("guard");
    ordinary.check_connection().await.expect("connects");
    assert!(!logs.text().contains("superuser"), "{}", logs.text());

    let superuser = guard_config_as(cluster, cluster.superuser(), &[]);
    let guard = Guard::new(&superuser, registry).expect("guard");
    guard.check_connection().await.expect("connects");
    let text = logs.text();
    assert!(
        text.contains("WARN") && text.contains("is a superuser") && text.contains("setup-sql"),
        "{text}"
    );
}

/// A user name is client input: an `auth_query` that fails for one (here a 100-byte name sent
/// as type `name`, which PostgreSQL refuses as too long) fails that login only, and leaves the
/// guard's health — and so `/readyz` and `lockguard_guard_up` — as it was.
#[tokio::test]
async fn an_auth_query_failing_for_a_clients_user_name_leaves_the_guard_up() {
    let cluster = TestCluster::shared();
    let long_name = "x".repeat(100);
    let config = GuardConfig {
        auth_query: "SELECT lockguard.scram_verifier($1::pg_catalog.name::pg_catalog.text)".into(),
        ..guard_config(cluster, &[])
    };
    let guard = Guard::new(&config, Arc::new(Registry::new())).expect("guard");
    guard.check_connection().await.expect("connects");
    let err = guard
        .password_secret(&long_name)
        .await
        .expect_err("a 100-byte name does not fit type name");
    assert!(err.to_string().contains("too long"), "{err}");
    let health = guard.health();
    assert_eq!(health.status, HealthStatus::Ok, "{health:?}");
    assert!(health.last_error.is_none(), "{health:?}");
    assert!(health.databases.iter().all(|d| d.healthy), "{health:?}");

    // The default query takes the name as text: no error at all, just no such role.
    if cluster.is_owned() {
        let default =
            Guard::new(&guard_config(cluster, &[]), Arc::new(Registry::new())).expect("guard");
        assert_eq!(
            default.password_secret(&long_name).await.expect("lookup"),
            None
        );
        assert_eq!(default.health().status, HealthStatus::Ok);
    }
}
