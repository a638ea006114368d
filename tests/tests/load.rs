//! Load: 2,000 concurrent clients through the proxy run a mix of short
//! transactions — extended-protocol commits, multi-statement simple-protocol commits,
//! rollbacks, transactions failed by an expected error, and reads of their own writes — for
//! `LOCKGUARD_LOAD_SECS` seconds (default 60). No client may see an unexpected error (a
//! protocol error, a closed connection, a hang), and the rows in the table must be exactly
//! those whose commits the clients saw acknowledged.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::resources::raise_open_files_limit;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

const CLIENTS: usize = 2_000;
/// How long the clients run, in seconds.
const ENV_LOAD_SECS: &str = "LOCKGUARD_LOAD_SECS";
const DEFAULT_LOAD_SECS: u64 = 60;
/// Connections opened at once while the clients log in.
const CONNECT_PARALLELISM: usize = 64;
/// Any single operation slower than this counts as a hang. Generous: 2,000 backends share two
/// cores.
const OPERATION_LIMIT: Duration = Duration::from_secs(60);
/// Unexpected errors quoted in the failure message.
const ERRORS_SHOWN: usize = 10;

/// What one client saw.
#[derive(Debug, Default)]
struct Tally {
    /// Rows whose commit was acknowledged.
    committed_rows: i64,
    commits: u64,
    rollbacks: u64,
    expected_errors: u64,
    reads: u64,
    unexpected: Vec<String>,
}

/// The mix of transactions, picked at random per iteration.
#[derive(Debug, Clone, Copy)]
enum Work {
    /// BEGIN; INSERT (extended protocol); COMMIT.
    ExtendedCommit,
    /// `BEGIN; INSERT; INSERT; COMMIT` as one simple-protocol batch.
    SimpleCommit,
    /// BEGIN; INSERT; ROLLBACK.
    Rollback,
    /// BEGIN; INSERT; a statement that fails (division by zero); ROLLBACK.
    FailedTransaction,
    /// Counts the client's own rows: must equal its acknowledged commits.
    ReadOwnRows,
}

impl Work {
    fn pick() -> Work {
        match rand::random_range(0..100) {
            0..45 => Work::ExtendedCommit,
            45..65 => Work::SimpleCommit,
            65..75 => Work::Rollback,
            75..85 => Work::FailedTransaction,
            _ => Work::ReadOwnRows,
        }
    }
}

fn load_duration() -> Duration {
    let secs = match std::env::var(ENV_LOAD_SECS) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|e| panic!("{ENV_LOAD_SECS}={value:?}: {e}")),
        Err(_) => DEFAULT_LOAD_SECS,
    };
    Duration::from_secs(secs)
}

/// One step of one client; `Err` is an unexpected error, described.
async fn run_once(
    client: &mut Client,
    id: i32,
    seq: &mut i32,
    tally: &mut Tally,
) -> Result<(), String> {
    const INSERT: &str = "INSERT INTO load_rows (client, seq, kind) VALUES ($1, $2, $3)";
    let work = Work::pick();
    let failed = |what: &str, e: tokio_postgres::Error| format!("{work:?}: {what}: {e:?}");
    *seq += 2;
    let n = *seq;
    match work {
        Work::ExtendedCommit => {
            let tx = client.transaction().await.map_err(|e| failed("BEGIN", e))?;
            tx.execute(INSERT, &[&id, &n, &"extended"])
                .await
                .map_err(|e| failed("INSERT", e))?;
            tx.commit().await.map_err(|e| failed("COMMIT", e))?;
            tally.committed_rows += 1;
            tally.commits += 1;
        }
        Work::SimpleCommit => {
            let batch = format!(
                "BEGIN; INSERT INTO load_rows VALUES ({id}, {n}, 'simple'); \
                 INSERT INTO load_rows VALUES ({id}, {}, 'simple'); COMMIT",
                n + 1
            );
            client
                .batch_execute(&batch)
                .await
                .map_err(|e| failed("batch", e))?;
            tally.committed_rows += 2;
            tally.commits += 1;
        }
        Work::Rollback => {
            let tx = client.transaction().await.map_err(|e| failed("BEGIN", e))?;
            tx.execute(INSERT, &[&id, &n, &"rolled back"])
                .await
                .map_err(|e| failed("INSERT", e))?;
            tx.rollback().await.map_err(|e| failed("ROLLBACK", e))?;
            tally.rollbacks += 1;
        }
        Work::FailedTransaction => {
            let tx = client.transaction().await.map_err(|e| failed("BEGIN", e))?;
            tx.execute(INSERT, &[&id, &n, &"failed"])
                .await
                .map_err(|e| failed("INSERT", e))?;
            match tx.execute("SELECT 1 / (0 * $1::int4)", &[&id]).await {
                Err(e) if e.code() == Some(&SqlState::DIVISION_BY_ZERO) => {}
                Err(e) => return Err(failed("the failing statement", e)),
                Ok(_) => return Err(format!("{work:?}: 1/0 succeeded")),
            }
            tx.rollback().await.map_err(|e| failed("ROLLBACK", e))?;
            tally.expected_errors += 1;
        }
        Work::ReadOwnRows => {
            let row = client
                .query_one("SELECT count(*) FROM load_rows WHERE client = $1", &[&id])
                .await
                .map_err(|e| failed("SELECT", e))?;
            let seen: i64 = row.get(0);
            if seen != tally.committed_rows {
                return Err(format!(
                    "client {id} sees {seen} of its rows, but {} were acknowledged",
                    tally.committed_rows
                ));
            }
            tally.reads += 1;
        }
    }
    Ok(())
}

/// Runs one client until `until`; stops at its first unexpected error (its connection may be
/// unusable after that).
async fn run_client(mut client: Client, id: i32, until: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut seq = 0;
    while Instant::now() < until {
        let step = tokio::time::timeout(
            OPERATION_LIMIT,
            run_once(&mut client, id, &mut seq, &mut tally),
        )
        .await;
        let error = match step {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("an operation hung for {OPERATION_LIMIT:?}")),
        };
        if let Some(e) = error {
            tally.unexpected.push(format!("client {id}: {e}"));
            break;
        }
        // Application-like pacing: a little think time between transactions.
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..20))).await;
    }
    tally
}

// Long because one expensive load run feeds every check: errors, commits, sockets, sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_run_short_transactions_without_errors_or_lost_commits() {
    let duration = load_duration();
    // Each client is three sockets in this process: its own, the proxy's, the upstream's.
    let files = raise_open_files_limit(4 * CLIENTS as u64 + 1024).expect("setrlimit");
    assert!(
        files >= 3 * CLIENTS as u64 + 256,
        "open-files limit {files} is too low for {CLIENTS} proxied clients"
    );
    let max_connections = (CLIENTS + 100).to_string();
    let cluster = tokio::task::block_in_place(|| {
        TestCluster::start(&[("max_connections", max_connections.as_str())])
    })
    .expect("start a cluster for the load test");
    let db = cluster.create_database("load").await;
    let (admin, connection) = cluster
        .pg_config(cluster.superuser(), None, &db)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to the load database");
    tokio::spawn(connection);
    admin
        .batch_execute(
            "CREATE TABLE load_rows (client int4 NOT NULL, seq int4 NOT NULL, kind text NOT NULL, \
             PRIMARY KEY (client, seq))",
        )
        .await
        .expect("create the table");
    let proxy = TestProxy::start_with(config_for(&cluster)).await;

    let started = Instant::now();
    let clients: Vec<Client> = stream::iter(0..CLIENTS)
        .map(|i| {
            let proxy = &proxy;
            let superuser = cluster.superuser();
            let db = db.as_str();
            async move {
                proxy
                    .connect(superuser, None, db)
                    .await
                    .unwrap_or_else(|e| panic!("client {i} could not connect: {e:?}"))
            }
        })
        .buffer_unordered(CONNECT_PARALLELISM)
        .collect()
        .await;
    eprintln!(
        "{CLIENTS} clients connected through the proxy in {:?}",
        started.elapsed()
    );
    assert_eq!(proxy.registry().len(), CLIENTS);

    let until = Instant::now() + duration;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let id = i32::try_from(i).expect("client id");
            tokio::spawn(run_client(client, id, until))
        })
        .collect();
    let mut tallies = HashMap::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let id = i32::try_from(i).expect("client id");
        tallies.insert(id, task.await.expect("client task"));
    }

    let unexpected: Vec<&String> = tallies.values().flat_map(|t| &t.unexpected).collect();
    let commits: u64 = tallies.values().map(|t| t.commits).sum();
    let acknowledged_rows: i64 = tallies.values().map(|t| t.committed_rows).sum();
    let operations: u64 = tallies
        .values()
        .map(|t| t.commits + t.rollbacks + t.expected_errors + t.reads)
        .sum();
    eprintln!(
        "{operations} transactions in {duration:?} ({:.0}/s): {commits} commits, {} rollbacks, \
         {} failed on purpose, {} reads; {} unexpected errors",
        operations as f64 / duration.as_secs_f64(),
        tallies.values().map(|t| t.rollbacks).sum::<u64>(),
        tallies.values().map(|t| t.expected_errors).sum::<u64>(),
        tallies.values().map(|t| t.reads).sum::<u64>(),
        unexpected.len()
    );
    assert!(
        unexpected.is_empty(),
        "{} clients saw unexpected errors, e.g.:\n{}",
        unexpected.len(),
        unexpected
            .iter()
            .take(ERRORS_SHOWN)
            .map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        commits >= CLIENTS as u64,
        "only {commits} commits from {CLIENTS} clients"
    );

    // Every acknowledged commit is there, and nothing else: per client, and in total.
    let rows = admin
        .query(
            "SELECT client, count(*) FROM load_rows GROUP BY client",
            &[],
        )
        .await
        .expect("count the rows");
    let mut in_table: HashMap<i32, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut mismatches = Vec::new();
    for (id, tally) in &tallies {
        let found = in_table.remove(id).unwrap_or(0);
        if found != tally.committed_rows {
            mismatches.push(format!(
                "client {id}: {found} rows, {} acknowledged",
                tally.committed_rows
            ));
        }
    }
    assert!(
        mismatches.is_empty() && in_table.is_empty(),
        "rows differ from acknowledged commits: {mismatches:?}; rows of unknown clients: {in_table:?}"
    );
    let total: i64 = admin
        .query_one("SELECT count(*) FROM load_rows", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(total, acknowledged_rows);
    let stray: i64 = admin
        .query_one(
            "SELECT count(*) FROM load_rows WHERE kind NOT IN ('extended', 'simple')",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(stray, 0, "rows of rolled-back transactions were kept");

    // The clients are gone (dropped with their tasks): so are their sessions.
    proxy.wait_for_sessions(0, Duration::from_secs(60)).await;
}
