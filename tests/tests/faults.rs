//! Slow and greedy clients (issue 6, point 3): a thousand connections trickling their startup
//! packet one byte per second are all cut at `startup_timeout` while a normal client keeps
//! working and the proxy's memory stays bounded; a client that stops reading a huge result
//! stalls its own stream (backpressure reaches PostgreSQL) instead of making the proxy buffer
//! it, and other clients do not notice.
//!
//! The proxy runs in this process, so the process's resident memory bounds the proxy's. The
//! tests of this binary run one at a time (see [`SERIAL`]) so neither measures the other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{backend_alive, wait_for};
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::raw;
use lockguard_tests::resources::{raise_open_files_limit, vm_rss_bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

const MIB: u64 = 1024 * 1024;

/// Serializes the tests of this binary: each measures the memory of the whole process.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// The normal client's work while the proxy is under attack: a query every 50 ms until `stop`,
/// each answered correctly within a generous bound. Returns how many ran.
async fn keep_querying(proxy: &TestProxy, user: &str, stop: &AtomicBool) -> usize {
    let client = proxy
        .connect(user, None, "postgres")
        .await
        .expect("a normal client connects during the attack");
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        let i = i32::try_from(done).expect("fits");
        let row = tokio::time::timeout(
            Duration::from_secs(10),
            client.query_one("SELECT $1::int4 + 1", &[&i]),
        )
        .await
        .unwrap_or_else(|_| panic!("query {done} of the normal client hung"))
        .unwrap_or_else(|e| panic!("query {done} of the normal client failed: {e}"));
        assert_eq!(row.get::<_, i32>(0), i + 1);
        done += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done
}

/// Peak of [`vm_rss_bytes`] sampled every 100 ms until `stop`.
async fn peak_rss_until(stop: &AtomicBool) -> u64 {
    let mut peak = 0;
    while !stop.load(Ordering::Relaxed) {
        peak = peak.max(vm_rss_bytes().expect("VmRSS"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak.max(vm_rss_bytes().expect("VmRSS"))
}

/// One slowloris connection, whose connect began at `connected`: sends `packet` one byte per
/// second until the proxy closes the connection. Returns how long after `connected` that was.
async fn trickle(
    mut stream: TcpStream,
    connected: Instant,
    packet: Vec<u8>,
    give_up: Duration,
) -> Duration {
    let mut sent = 0;
    let mut sink = [0u8; 256];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        assert!(
            connected.elapsed() < give_up,
            "a slow startup was still open after {give_up:?}"
        );
        tokio::select! {
            read = stream.read(&mut sink) => match read {
                // Whatever the proxy says (nothing, or an error) ends with the close.
                Ok(n) if n > 0 => {}
                Ok(_) | Err(_) => return connected.elapsed(),
            },
            _ = tick.tick() => {
                if let Some(&byte) = packet.get(sent) {
                    if stream.write_all(&[byte]).await.is_err() {
                        return connected.elapsed();
                    }
                    sent += 1;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_startups_are_cut_at_the_deadline_while_a_normal_client_works() {
    const SLOW_CLIENTS: usize = 1_000;
    const STARTUP_TIMEOUT: Duration = Duration::from_secs(3);
    // Generous: CI has two loaded cores; the point is "cut at the deadline", not precision.
    const LATE: Duration = Duration::from_secs(5);
    const RSS_GROWTH_LIMIT: u64 = 256 * MIB;
    let _serial = SERIAL.lock().await;
    // Each slow client is two sockets in this process (ours and the proxy's), plus slack.
    let files = raise_open_files_limit(4 * SLOW_CLIENTS as u64 + 1024).expect("setrlimit");
    assert!(
        files >= 2 * SLOW_CLIENTS as u64 + 256,
        "open-files limit {files} is too low for {SLOW_CLIENTS} connections"
    );
    let cluster = TestCluster::shared();
    let mut config = config_for(cluster);
    config.proxy.startup_timeout = STARTUP_TIMEOUT;
    let proxy = TestProxy::start_with(config).await;
    let rss_before = vm_rss_bytes().expect("VmRSS");

    let packet = raw::startup_packet(
        196_608,
        &[("user", cluster.superuser()), ("database", "postgres")],
    );
    assert!(packet.len() as u64 > STARTUP_TIMEOUT.as_secs() + LATE.as_secs());
    let attack_over = AtomicBool::new(false);
    let attack = async {
        let mut slow = Vec::with_capacity(SLOW_CLIENTS);
        for _ in 0..SLOW_CLIENTS {
            // Taken before connecting: the proxy's deadline starts at its accept, which can
            // only come later (the end of our connect may be noticed after it).
            let connecting = Instant::now();
            let stream = TcpStream::connect(proxy.addr)
                .await
                .expect("a slow client connects");
            slow.push(tokio::spawn(trickle(
                stream,
                connecting,
                packet.clone(),
                STARTUP_TIMEOUT + LATE * 2,
            )));
        }
        let mut lifetimes = Vec::with_capacity(SLOW_CLIENTS);
        for task in slow {
            lifetimes.push(task.await.expect("slow client task"));
        }
        attack_over.store(true, Ordering::Relaxed);
        lifetimes
    };
    let (lifetimes, queries, peak_rss) = tokio::join!(
        attack,
        keep_querying(&proxy, cluster.superuser(), &attack_over),
        peak_rss_until(&attack_over)
    );

    let shortest = lifetimes.iter().min().copied().unwrap_or_default();
    let longest = lifetimes.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} slow startups lived {shortest:?}..{longest:?}; the normal client ran {queries} queries; \
         RSS {} MiB before, peak {} MiB",
        lifetimes.len(),
        rss_before / MIB,
        peak_rss / MIB
    );
    assert_eq!(lifetimes.len(), SLOW_CLIENTS);
    assert!(
        shortest >= STARTUP_TIMEOUT,
        "a slow startup was cut after {shortest:?}, before startup_timeout"
    );
    assert!(
        longest <= STARTUP_TIMEOUT + LATE,
        "a slow startup was cut only after {longest:?}"
    );
    assert!(queries > 10, "the normal client ran only {queries} queries");
    let growth = peak_rss.saturating_sub(rss_before);
    assert!(
        growth < RSS_GROWTH_LIMIT,
        "RSS grew by {} MiB during the attack",
        growth / MIB
    );
    // No session was ever registered for a slow client; the normal one has gone too.
    proxy.wait_for_sessions(0, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_huge_result_is_held_back_not_buffered() {
    // 2,000,000 rows of ~1 KB: about 2 GB if the proxy buffered what the client does not read.
    const GREEDY_QUERY: &str = "SELECT repeat('x', 1000) FROM generate_series(1, 2000000)";
    const RSS_GROWTH_LIMIT: u64 = 128 * MIB;
    // Kernel socket buffers on the way (ours, the proxy's two sockets, PostgreSQL's) hold at
    // most a few MiB each with autotuning; the proxy itself holds one 8 KiB buffer.
    const IN_FLIGHT_LIMIT: u64 = 64 * MIB;
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::shared();
    let proxy = TestProxy::start(cluster).await;
    let admin = cluster.connect_admin().await;
    let rss_before = vm_rss_bytes().expect("VmRSS");

    let mut greedy = TcpStream::connect(proxy.addr).await.expect("connect");
    let login = raw::login(&mut greedy, cluster.superuser(), "postgres").await;
    let key = login
        .iter()
        .find(|m| m.tag == b'K')
        .expect("BackendKeyData");
    let pid = i32::from_be_bytes([key.body[0], key.body[1], key.body[2], key.body[3]]);
    let record = proxy.session_of(pid).await;
    greedy
        .write_all(&raw::query(GREEDY_QUERY))
        .await
        .expect("send the query");
    // ... and never read again.

    // Backpressure reaches the server: its backend blocks writing to its client (the proxy).
    wait_for(
        Duration::from_secs(60),
        "the backend to block on ClientWrite",
        || async {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'ClientWrite'",
                    &[&pid],
                )
                .await
                .expect("pg_stat_activity")
                .is_some()
        },
    )
    .await;
    // The proxy's forwarding has stalled: nothing more moves while the client does not read.
    let forwarded = record.bytes_from_server();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = record.bytes_from_server();
    eprintln!(
        "forwarded {} KiB to the client that stopped reading, then {} KiB more in 2 s",
        forwarded / 1024,
        (later - forwarded) / 1024
    );
    assert_eq!(
        forwarded, later,
        "the proxy keeps reading for a client that does not"
    );
    assert!(
        later < IN_FLIGHT_LIMIT,
        "{} MiB left the server for a client that read nothing",
        later / MIB
    );

    // Others are unaffected meanwhile, and the proxy did not grow.
    {
        let client = proxy
            .connect(cluster.superuser(), None, "postgres")
            .await
            .expect("another client connects");
        for i in 0..50i32 {
            let row = tokio::time::timeout(
                Duration::from_secs(10),
                client.query_one(
                    "SELECT count(*)::int4 + $1 FROM generate_series(1, 1000)",
                    &[&i],
                ),
            )
            .await
            .expect("a query of another client hung")
            .expect("a query of another client");
            assert_eq!(row.get::<_, i32>(0), 1000 + i);
        }
    }
    let growth = vm_rss_bytes().expect("VmRSS").saturating_sub(rss_before);
    assert!(
        growth < RSS_GROWTH_LIMIT,
        "RSS grew by {} MiB while a client refused to read",
        growth / MIB
    );

    // When the greedy client finally goes, its session and backend go too.
    drop(greedy);
    wait_for(
        Duration::from_secs(30),
        "the greedy backend to exit",
        || async { !backend_alive(&admin, pid).await },
    )
    .await;
    proxy.wait_for_sessions(0, Duration::from_secs(10)).await;
}
