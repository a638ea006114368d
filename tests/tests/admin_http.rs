//! The admin HTTP endpoint: readiness, the JSON API under load, its connection limits.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lockguard_tests::admin::*;
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{self};
use lockguard_tests::http::json;
use lockguard_tests::raw::{self};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Readiness: 503 with a JSON reason while the guard connection cannot be made,
/// 200 when it can; /healthz answers either way.
#[tokio::test]
async fn readyz_reports_the_guard_connection() {
    let cluster = TestCluster::shared();
    // Bound but never listening: connections to it are refused, and no other test's
    // listener can take the port while this test runs.
    let reserved = tokio::net::TcpSocket::new_v4().expect("socket");
    reserved
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("free port");
    let closed_port = reserved.local_addr().expect("address").port();
    let mut broken = admin_config(&[]);
    broken.guard.dsn = Some(guard_dsn(cluster, closed_port));
    let broken = start(broken, None).await;
    let (status, _, body) = http(broken.http, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    let reason = json(&body);
    assert_eq!(reason["ready"], false);
    assert!(
        reason["reason"]
            .as_str()
            .is_some_and(|r| r.contains("guard")),
        "{reason}"
    );
    assert!(reason["upstream_error"].is_null(), "{reason}");
    let (status, _, _) = http(broken.http, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    let down = broken.metrics().await;
    assert_eq!(down.get("lockguard_guard_up"), Some(&0.0), "{down:?}");

    let healthy = start(admin_config(&[]), None).await;
    let (status, _, body) = http(healthy.http, "GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["ready"], true);
    assert_eq!(
        healthy.metrics().await.get("lockguard_guard_up"),
        Some(&1.0)
    );

    // An unreachable upstream is not ready either.
    let mut no_upstream = admin_config(&[]);
    no_upstream.proxy.upstream = lockguard_config::Upstream::Tcp {
        host: "127.0.0.1".into(),
        port: closed_port,
    };
    let no_upstream = start(no_upstream, None).await;
    let (status, _, body) = http(no_upstream.http, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(json(&body)["upstream_error"].is_string(), "{body}");
}

/// Readiness checks connect to the upstream (a backend fork each on a real server), so they
/// are shared: however many probes arrive, one check at a time and at most one per reuse
/// interval. The test counts the checks exactly (see [`ConnectCounter`]) and measures the
/// time the probes took, so a slow machine changes what is expected, not the verdict.
#[tokio::test]
async fn readyz_connects_upstream_at_most_once_a_second() {
    use lockguard::admin::commands::READINESS_REUSE;
    const PROBES: usize = 20;
    let mut upstream = ConnectCounter::start().await;
    let mut config = admin_config(&[]);
    config.proxy.upstream = lockguard_config::Upstream::Tcp {
        host: "127.0.0.1".into(),
        port: upstream.addr.port(),
    };
    let running = start(config, None).await;

    let sent = Instant::now();
    let answers = futures_util::future::join_all(
        (0..PROBES).map(|_| http(running.http, "GET", "/readyz", None)),
    )
    .await;
    let answered = Instant::now();
    for (status, _, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    // Each check starts at or after `sent`, and a new one needs the last one's start to be
    // READINESS_REUSE old: within `answered - sent` there is room for this many.
    let windows = 1 + (answered - sent).as_millis() / READINESS_REUSE.as_millis();
    let checks = upstream.connects_so_far().await;
    assert!(
        (1..=windows as usize).contains(&checks),
        "{PROBES} concurrent probes in {:?} ran {checks} checks (at most {windows})",
        answered - sent
    );

    // Still inside the first check's interval (it started at or after `sent`): answered
    // from the reused result.
    let (status, _, body) = http(running.http, "GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");
    if sent.elapsed() < READINESS_REUSE {
        assert_eq!(
            upstream.connects_so_far().await,
            checks,
            "a probe inside the reuse interval checks again"
        );
    }

    // Every check so far started before `answered`; once the interval has passed since
    // then, the next probe must check again.
    tokio::time::sleep_until((answered + READINESS_REUSE).into()).await;
    let before = upstream.connects_so_far().await;
    let (status, _, body) = http(running.http, "GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        upstream.connects_so_far().await,
        before + 1,
        "a probe after the reuse interval checks again"
    );
}

/// Stands in for the upstream of the readiness check (which only opens a TCP connection)
/// and counts the connections exactly, without waiting for "no more to come": the count
/// ends with a connection of the test's own. The listener accepts in arrival order, so
/// when that one is accepted every connection made before it has been counted.
struct ConnectCounter {
    addr: SocketAddr,
    accepted: tokio::sync::mpsc::UnboundedReceiver<SocketAddr>,
    counted: usize,
}

impl ConnectCounter {
    async fn start() -> ConnectCounter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (tell, accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((_, peer)) = listener.accept().await {
                if tell.send(peer).is_err() {
                    return;
                }
            }
        });
        ConnectCounter {
            addr,
            accepted,
            counted: 0,
        }
    }

    /// Connections made by others up to now.
    async fn connects_so_far(&mut self) -> usize {
        let marker = TcpStream::connect(self.addr).await.expect("connect");
        let marker = marker.local_addr().expect("marker address");
        loop {
            let peer = tokio::time::timeout(WAIT, self.accepted.recv())
                .await
                .expect("the marker connection is accepted")
                .expect("the counter runs");
            if peer == marker {
                return self.counted;
            }
            self.counted += 1;
        }
    }
}

/// Accepts connections on `listener` and copies bytes both ways to `target`.
fn forward(listener: tokio::net::TcpListener, target: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// Readiness on one instance: `/readyz` is 503 naming the guard while nothing listens on
/// the guard's port, and turns 200 once that port leads to the database.
#[tokio::test]
async fn readyz_turns_ready_when_the_guard_port_comes_up() {
    let cluster = TestCluster::shared();
    let guard_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        listener.local_addr().expect("address").port()
    };
    let mut config = admin_config(&[]);
    config.guard.dsn = Some(format!(
        "host=127.0.0.1 port={guard_port} user={} dbname=postgres",
        guard_support::guard_role(cluster)
    ));
    let running = start(config, None).await;
    let (status, _, body) = http(running.http, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        json(&body)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("guard")),
        "{body}"
    );

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", guard_port))
        .await
        .expect("listen on the guard's port");
    let forwarder = forward(listener, format!("{}:{}", cluster.host(), cluster.port()));
    // The guard may be waiting out a reconnect backoff, and a 503 is reused for a second.
    guard_support::wait_for(Duration::from_secs(15), "/readyz to turn 200", || async {
        let (status, _, body) = http(running.http, "GET", "/readyz", None).await;
        assert!(status == 200 || status == 503, "{status}: {body}");
        status == 200 && json(&body)["ready"] == true
    })
    .await;
    forwarder.abort();
}

/// A flood of anonymous readers (no API token) shares the guard's probes: as many concurrent
/// `GET /api/clients` as the endpoint serves at once all answer with the session's probed
/// facts, yet cost at most one probe per 250 ms of the flood (plus the first), not one each.
#[tokio::test]
async fn a_flood_of_api_readers_shares_a_few_probes() {
    const READERS: usize = lockguard::admin::http::MAX_HTTP_CONNECTIONS;
    lockguard_tests::resources::raise_open_files_limit(4096).expect("open-files limit");
    let db = database("admin_flood").await;
    let mut config = admin_config(&[]);
    config.admin.api_token = None;
    let running = start(config, None).await;
    let app = running.app(&db).await;
    let guard = running.admin.guard().expect("guard enabled");
    let probes_before = guard.probe_latency().count;
    let started = std::time::Instant::now();
    let answers = futures_util::future::join_all(
        (0..READERS).map(|_| http(running.http, "GET", "/api/clients", None)),
    )
    .await;
    let elapsed = started.elapsed();
    let probes = guard.probe_latency().count - probes_before;
    for (status, _, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        let clients = json(body);
        let row = clients
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["backend_pid"] == app.pid))
            .unwrap_or_else(|| panic!("the session is listed: {body}"));
        // Probed (a number), not left NULL: every reader got a probe's answer.
        assert_eq!(row["protected_locks"], 0, "{row}");
    }
    let allowed = 2 + elapsed.as_millis() as u64 / 250;
    assert!(
        (1..=allowed).contains(&probes),
        "{READERS} readers in {elapsed:?} ran {probes} probes (at most {allowed} allowed)"
    );
}

/// The HTTP endpoint serves at most `MAX_HTTP_CONNECTIONS` connections; the next gets a 503
/// that says why. A connection that sends no request head within `proxy.startup_timeout` is
/// closed, which frees its slot; one that sent its request half-way is closed too.
#[tokio::test]
async fn the_http_endpoint_caps_connections_and_closes_silent_ones() {
    use lockguard::admin::http::MAX_HTTP_CONNECTIONS;
    let mut config = admin_config(&[]);
    config.proxy.startup_timeout = Duration::from_secs(1);
    let running = start(config, None).await;
    let mut held = Vec::new();
    for _ in 0..MAX_HTTP_CONNECTIONS {
        held.push(TcpStream::connect(running.http).await.expect("connect"));
    }
    held[0]
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: lock")
        .await
        .expect("half a request");
    let (status, headers, body) = http(running.http, "GET", "/healthz", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers.get("retry-after").map(String::as_str), Some("1"));
    assert!(
        json(&body)["error"]
            .as_str()
            .is_some_and(|e| e.contains("too many admin HTTP connections")),
        "{body}"
    );

    for (i, silent) in held.iter_mut().enumerate() {
        assert!(
            raw::closed_within(silent, WAIT).await,
            "connection {i} kept open without a request"
        );
    }
    let (status, _, body) = http(running.http, "GET", "/healthz", None).await;
    assert_eq!(status, 200, "{body}");
}
