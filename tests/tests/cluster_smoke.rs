//! Smoke tests of the throwaway-PostgreSQL harness itself: if these fail, every other
//! integration test will, so they point at the harness rather than the proxy.

use std::net::TcpListener;

use lockguard_tests::cluster::{
    TestCluster, APP_USER, MD5_PASSWORD, MD5_USER, SCRAM_PASSWORD, SCRAM_USER,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

async fn connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test]
async fn superuser_can_query() {
    let client = TestCluster::shared().connect_admin().await;
    let one: i32 = client
        .query_one("SELECT 1::int4", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn password_roles_authenticate_over_tcp() {
    let cluster = TestCluster::shared();
    if !cluster.is_owned() {
        eprintln!("skipped: the harness roles exist only on an owned cluster");
        return;
    }
    let db = cluster.create_database("smoke_auth").await;
    for (user, password, stored_prefix) in [
        (MD5_USER, MD5_PASSWORD, "md5"),
        (SCRAM_USER, SCRAM_PASSWORD, "SCRAM-SHA-256$"),
    ] {
        let client = connect(&cluster.pg_config(user, Some(password), &db))
            .await
            .unwrap_or_else(|e| panic!("{user} with the right password: {e:?}"));
        let current: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(current, user);

        let err = connect(&cluster.pg_config(user, Some("wrong"), &db))
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} with a wrong password was let in"));
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_PASSWORD),
            "{user}: {err:?}"
        );

        let admin = cluster.connect_admin().await;
        let stored: String = admin
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&user],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            stored.starts_with(stored_prefix),
            "{user} password stored as {stored}"
        );
    }
    let client = connect(&cluster.pg_config(APP_USER, None, &db))
        .await
        .expect("app_user is trusted");
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn private_cluster_restarts_and_cleans_up() {
    let cluster = TestCluster::start(&[("max_connections", "50")]).unwrap();
    let port = cluster.port();
    let data_dir = cluster.data_dir().unwrap().to_path_buf();
    let socket_dir = cluster.socket_dir().unwrap().to_path_buf();
    assert!(socket_dir.join(format!(".s.PGSQL.{port}")).exists());

    let db = cluster.create_database("smoke_restart").await;
    let client = connect(&cluster.pg_config(cluster.superuser(), None, &db))
        .await
        .unwrap();
    let max: String = client
        .query_one("SHOW max_connections", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(max, "50");
    client
        .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        .await
        .unwrap();

    cluster.restart().unwrap();
    assert!(
        client.simple_query("SELECT 1").await.is_err(),
        "old session survived a restart"
    );
    assert_eq!(cluster.port(), port);
    let client = connect(&cluster.pg_config(cluster.superuser(), None, &db))
        .await
        .unwrap();
    let v: i32 = client
        .query_one("SELECT v FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42);
    drop(client);

    // A port taken while the server is down makes start_again fail clearly (AddrInUse is what
    // `start` retries on), and the cluster can still be started once the port is free again.
    cluster.stop().unwrap();
    let squatter = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let err = cluster.start_again().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    drop(squatter);
    cluster.start_again().unwrap();
    cluster
        .connect_admin()
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();

    drop(cluster);
    assert!(!data_dir.exists(), "{} left behind", data_dir.display());
    assert!(!socket_dir.exists(), "{} left behind", socket_dir.display());
    TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("port {port} still taken: {e}"));
}

#[test]
fn external_cluster_cannot_be_restarted() {
    // Only meaningful on an external server; on an owned shared cluster, restarting it would
    // disturb the other tests, so just check the accessors agree.
    let cluster = TestCluster::shared();
    if cluster.is_owned() {
        assert!(cluster.socket_dir().is_some());
        assert_eq!(cluster.host(), "127.0.0.1");
    } else {
        let err = cluster.restart().unwrap_err();
        assert!(err.to_string().contains("not an owned cluster"), "{err}");
    }
}
