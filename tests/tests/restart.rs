//! Upstream restart under traffic: PostgreSQL is stopped with a fast
//! shutdown and started again while clients keep working through the proxy. Clients get
//! errors, never hangs; new connections succeed once the server is back; and the guard
//! reconnects by itself: its health returns to ok and an operator kill works again. Also the
//! guard's own database hanging: traffic does not wait for the guard (the failure stance: a broken guard never holds up forwarding).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guard_core::{HealthStatus, Outcome};
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{self, backend_alive, wait_for, BlockedLogin};
use lockguard_tests::proxy::{config_for, TestProxy};
use tokio_postgres::error::SqlState;

const PROTECTED: &str = "app.user_sessions";
const WORKERS: usize = 8;
/// Every single connect or query must end — with a result or an error — within this.
/// Generous for two loaded cores, yet far from "hangs".
const BOUND: Duration = Duration::from_secs(20);

/// Where the server is in its restart, as the workers record it.
const UP: u8 = 0;
const DOWN: u8 = 1;
const BACK: u8 = 2;

/// What the traffic saw, per phase (`UP`, `DOWN`, `BACK`).
#[derive(Debug, Default)]
struct Seen {
    ok: [usize; 3],
    errors: [usize; 3],
    hangs: Vec<String>,
    /// The workers that got an error while the server was down.
    failed_while_down: HashSet<usize>,
    /// A few error messages, for the failure report.
    samples: Vec<String>,
}

/// The server's SQLSTATE and message when there is one (tokio-postgres' Display is terse).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// One client that queries through the proxy until `stop`, reconnecting after every error.
async fn worker(
    id: usize,
    proxy: Arc<TestProxy>,
    user: String,
    db: String,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let record = |ok: bool, what: Option<String>| {
        let phase = usize::from(phase.load(Ordering::SeqCst));
        let mut seen = seen.lock().expect("tally");
        if ok {
            seen.ok[phase] += 1;
        } else {
            seen.errors[phase] += 1;
            if phase == usize::from(DOWN) {
                seen.failed_while_down.insert(id);
            }
            if seen.samples.len() < 10 {
                seen.samples.extend(what);
            }
        }
    };
    let mut client = None;
    while !stop.load(Ordering::SeqCst) {
        let Some(connected) = client.as_ref() else {
            match tokio::time::timeout(BOUND, proxy.connect(&user, None, &db)).await {
                Ok(Ok(c)) => client = Some(c),
                Ok(Err(e)) => {
                    record(
                        false,
                        Some(format!("worker {id} connect: {}", describe(&e))),
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => {
                    let hang = format!("worker {id}: connect hung for {BOUND:?}");
                    seen.lock().expect("tally").hangs.push(hang);
                }
            }
            continue;
        };
        let step = tokio::time::timeout(
            BOUND,
            connected.query_one("SELECT pg_sleep(0.02)::text || $1::text", &[&"x"]),
        )
        .await;
        match step {
            Ok(Ok(_)) => record(true, None),
            Ok(Err(e)) => {
                record(false, Some(format!("worker {id} query: {}", describe(&e))));
                client = None;
            }
            Err(_) => {
                let hang = format!("worker {id}: a query hung for {BOUND:?}");
                seen.lock().expect("tally").hangs.push(hang);
                client = None;
            }
        }
    }
}

// Long because one restart under one traffic run is observed phase by phase, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_under_traffic_gives_errors_not_hangs_and_everything_recovers() {
    let cluster = Arc::new(
        tokio::task::block_in_place(|| TestCluster::start(&[])).expect("a private cluster"),
    );
    let db = guard_support::guard_test_database(&cluster, "restart").await;
    let mut config = config_for(&cluster);
    config.guard = guard_support::guard_config(&cluster, &[PROTECTED]);
    // Only the operator kill below may end a session here.
    config.guard.idle_in_transaction_timeout = Duration::ZERO;
    config.guard.failed_transaction_timeout = Duration::ZERO;
    let proxy = Arc::new(TestProxy::start_with(config).await);
    let guard = proxy.guard().expect("guard configured").clone();
    // The guard has a working connection to the database before the restart.
    guard.probe(&db, &[0]).await.expect("the guard probes");
    assert_eq!(guard.health().status, HealthStatus::Ok);

    let phase = Arc::new(AtomicU8::new(UP));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let workers: Vec<_> = (0..WORKERS)
        .map(|id| {
            tokio::spawn(worker(
                id,
                Arc::clone(&proxy),
                cluster.superuser().to_owned(),
                db.clone(),
                Arc::clone(&phase),
                Arc::clone(&stop),
                Arc::clone(&seen),
            ))
        })
        .collect();
    let ok_so_far = || seen.lock().expect("tally").ok.iter().sum::<usize>();
    wait_for(Duration::from_secs(30), "traffic to flow", || async {
        ok_so_far() >= 4 * WORKERS
    })
    .await;

    // Fast shutdown under traffic.
    phase.store(DOWN, Ordering::SeqCst);
    let stopping = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .expect("join")
        .expect("fast shutdown");

    // While it is down, a new client is refused with an error at once, not left waiting.
    let refused = tokio::time::timeout(BOUND, proxy.connect(cluster.superuser(), None, &db))
        .await
        .expect("connecting while the server is down hung")
        .expect_err("connecting while the server is down");
    assert_eq!(
        refused.code(),
        Some(&SqlState::CONNECTION_FAILURE),
        "{refused:?}"
    );
    // The guard notices that it lost its connection.
    wait_for(
        Duration::from_secs(10),
        "the guard to report itself degraded",
        || async { guard.health().status == HealthStatus::Degraded },
    )
    .await;
    // The outage reaches every client as an error, not a hang, before the server comes back.
    wait_for(
        BOUND,
        "every worker to get an error while the server is down",
        || async { seen.lock().expect("tally").failed_while_down.len() == WORKERS },
    )
    .await;

    let starting = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || starting.start_again())
        .await
        .expect("join")
        .expect("start the server again");
    phase.store(BACK, Ordering::SeqCst);

    // New connections succeed at once.
    let fresh = tokio::time::timeout(BOUND, proxy.connect(cluster.superuser(), None, &db))
        .await
        .expect("connecting after the restart hung")
        .expect("connecting after the restart");
    let one: i32 = fresh
        .query_one("SELECT 1", &[])
        .await
        .expect("a query after the restart")
        .get(0);
    assert_eq!(one, 1);
    // The traffic recovers: every worker reconnects and works again.
    let back_before = seen.lock().expect("tally").ok[usize::from(BACK)];
    wait_for(
        Duration::from_secs(30),
        "the traffic to recover",
        || async { seen.lock().expect("tally").ok[usize::from(BACK)] >= back_before + 4 * WORKERS },
    )
    .await;

    // The guard reconnects by itself (its sweep keeps the connections of databases in use).
    wait_for(
        Duration::from_secs(30),
        "the guard's health to return to ok",
        || async { guard.health().status == HealthStatus::Ok },
    )
    .await;
    let health = guard.health();
    assert!(
        health
            .databases
            .iter()
            .any(|d| d.database == db && d.connected),
        "{health:?}"
    );

    // ... and kills again: an operator kill of a session holding a protected lock that a
    // login waits for.
    let app = proxy
        .connect(guard_support::app_role(&cluster), None, &db)
        .await
        .expect("connect the application");
    let app_pid: i32 = app
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    app.batch_execute("BEGIN; SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE")
        .await
        .expect("lock a protected row");
    let admin = guard_support::connect(&cluster, &db).await;
    let login = BlockedLogin::start(&cluster, &db, &admin).await;
    let record = proxy.session_of(app_pid).await;
    let event = guard
        .kill_session(&record, "restart test")
        .await
        .expect("the operator kill after the restart");
    assert_eq!(event.outcome, Outcome::Terminated, "{event:?}");
    login.proceeds(BOUND).await;
    assert!(!backend_alive(&admin, app_pid).await);

    stop.store(true, Ordering::SeqCst);
    for w in workers {
        tokio::time::timeout(BOUND * 2, w)
            .await
            .expect("a worker ends")
            .expect("worker task");
    }
    let seen = seen.lock().expect("tally");
    eprintln!("traffic: {seen:?}");
    assert!(seen.hangs.is_empty(), "{:?}", seen.hangs);
    assert!(
        seen.errors[usize::from(DOWN)] + seen.errors[usize::from(BACK)] > 0,
        "the restart went unnoticed by every client: {seen:?}"
    );
    assert!(seen.ok[usize::from(BACK)] > 0, "{seen:?}");
}

/// The guard's own database hangs (it accepts connections and never answers): forwarding never
/// waits for the guard, and a client lost inside a transaction still frees its locks once the
/// guard gives up on it, because the proxy then closes the upstream connection.
#[tokio::test]
async fn a_hanging_guard_database_never_holds_up_traffic() {
    let cluster = TestCluster::shared();
    let db = guard_support::guard_test_database(cluster, "guard_hangs").await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_port = silent.local_addr().expect("address").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let mut config = config_for(cluster);
    config.guard = guard_support::guard_config(cluster, &[PROTECTED]);
    config.guard.dsn = Some(format!(
        "host=127.0.0.1 port={silent_port} user={} dbname=postgres",
        guard_support::guard_role(cluster)
    ));
    let proxy = TestProxy::start_with(config).await;

    // Every query answers long before any guard deadline (the guard's connect alone would
    // wait 5 s here).
    let app = proxy
        .connect(cluster.superuser(), None, &db)
        .await
        .expect("connect through the proxy");
    for i in 0..50 {
        let started = std::time::Instant::now();
        let n: i32 = app
            .query_one("SELECT $1::int4", &[&i])
            .await
            .expect("query")
            .get(0);
        assert_eq!(n, i);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "query {i} took {:?}: forwarding waited for the guard",
            started.elapsed()
        );
    }

    // A client lost while holding a protected row lock: the guard cannot check it, gives up
    // after its deadline, and the closed upstream connection makes PostgreSQL roll back.
    app.batch_execute("BEGIN; UPDATE app.user_sessions SET token = 'held' WHERE id = 1")
        .await
        .expect("lock a protected row");
    let admin = guard_support::connect(cluster, &db).await;
    let login = BlockedLogin::start(cluster, &db, &admin).await;
    drop(app);
    login
        .proceeds(guard_core::guard::CLIENT_LOSS_DEADLINE + Duration::from_secs(5))
        .await;
    proxy.wait_for_sessions(0, BOUND).await;
}
