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
