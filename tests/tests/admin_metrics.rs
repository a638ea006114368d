//! `GET /metrics`: the Prometheus exposition, parsed strictly, against real traffic.

use std::collections::BTreeMap;

use lockguard_tests::admin::*;
use lockguard_tests::cluster::TestCluster;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// `/metrics` carries the probe latency histogram, bytes each way and upstream connect
/// errors by reason; the last counts a client the proxy could not connect upstream for under
/// `reason="refused"` (nothing listens there), every other reason staying at zero.
#[tokio::test]
async fn metrics_show_probe_latency_bytes_and_upstream_connect_errors() {
    let db = database("admin_metrics").await;
    let running = start(admin_config(&[]), None).await;
    let mut app = running.app(&db).await;
    app.exec_ok("SELECT repeat('x', 1000)").await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    // SHOW CLIENTS probes the session's database.
    rows(&ops, "SHOW CLIENTS").await;
    let m = running.metrics().await;
    let probes = m["lockguard_probe_duration_seconds_count"];
    assert!(probes >= 1.0, "{m:?}");
    assert_eq!(
        m.get("lockguard_probe_duration_seconds_bucket{le=\"+Inf\"}"),
        Some(&probes)
    );
    let finite_buckets = m
        .keys()
        .filter(|k| k.starts_with("lockguard_probe_duration_seconds_bucket{") && !k.contains("Inf"))
        .count();
    assert!(finite_buckets > 1, "{m:?}");
    assert!(m["lockguard_bytes_total{direction=\"client_to_server\"}"] > 0.0);
    assert!(m["lockguard_bytes_total{direction=\"server_to_client\"}"] > 1000.0);
    assert_eq!(connect_errors(&m), zero_connect_errors());

    let closed_port = closed_port();
    let mut config = admin_config(&[]);
    config.proxy.upstream = lockguard_config::Upstream::Tcp {
        host: "127.0.0.1".into(),
        port: closed_port,
    };
    let unreachable = start(config, None).await;
    assert_eq!(
        connect_errors(&unreachable.metrics().await),
        zero_connect_errors()
    );
    let e = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(unreachable.addr.port())
        .user(TestCluster::shared().superuser())
        .dbname(&db)
        .connect_timeout(WAIT)
        .connect(NoTls)
        .await
        .err()
        .expect("no upstream to connect to");
    assert_eq!(code_of(&e), Some(&SqlState::CONNECTION_FAILURE), "{e:?}");
    let mut refused_once = zero_connect_errors();
    refused_once.insert("refused".to_owned(), 1.0);
    assert_eq!(connect_errors(&unreachable.metrics().await), refused_once);
    let ops = console(&unreachable, OPS).await.expect("ops logs in");
    assert_eq!(stats(&ops).await["upstream_connect_errors"], 1);
}

/// `lockguard_upstream_connect_errors_total` by its `reason` label.
fn connect_errors(m: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    m.iter()
        .filter_map(|(series, value)| {
            let reason = series
                .strip_prefix("lockguard_upstream_connect_errors_total{reason=\"")?
                .strip_suffix("\"}")?;
            Some((reason.to_owned(), *value))
        })
        .collect()
}

/// Every reason, at zero: each is exposed before it first happens.
fn zero_connect_errors() -> BTreeMap<String, f64> {
    ["refused", "timeout", "tls", "dns", "other"]
        .map(|reason| (reason.to_owned(), 0.0))
        .into()
}
