//! Slow and greedy clients (bounded startup and backpressure): a thousand connections
//! trickling their startup packet one byte per second are all cut at `startup_timeout` while a
//! normal client keeps working and the proxy's memory stays bounded; a client that stops
//! reading a huge result stalls its own stream (backpressure reaches PostgreSQL) instead of
//! making the proxy buffer it, and other clients do not notice. A single 200 MiB DataRow and a
//! single 200 MiB CopyData stream through without the proxy holding either whole (messages of
//! any size stream).
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

/// Peak of [`vm_rss_bytes`] sampled every `every` until `stop`.
async fn peak_rss_until(stop: &AtomicBool, every: Duration) -> u64 {
    let mut peak = 0;
    while !stop.load(Ordering::Relaxed) {
        peak = peak.max(vm_rss_bytes().expect("VmRSS"));
        tokio::time::sleep(every).await;
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
        raw::PROTOCOL_3_0,
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
        peak_rss_until(&attack_over, Duration::from_millis(100))
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

/// Another client connects through `proxy` and runs 50 small queries, each answered
/// correctly within 10 s.
async fn another_client_runs_50_queries(proxy: &TestProxy, user: &str) {
    let client = proxy
        .connect(user, None, "postgres")
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
    let pid = raw::backend_pid(&login);
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
    // The proxy's forwarding has stalled: nothing more moves while the client does not read,
    // all the while another client works through the proxy (its 50 queries are the window,
    // not a fixed wait), and the backend is still blocked writing at the end of it.
    let forwarded = record.bytes_from_server();
    another_client_runs_50_queries(&proxy, cluster.superuser()).await;
    let still_blocked = admin
        .query_opt(
            "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'ClientWrite'",
            &[&pid],
        )
        .await
        .expect("pg_stat_activity")
        .is_some();
    let later = record.bytes_from_server();
    eprintln!(
        "forwarded {} KiB to the client that stopped reading, then {} KiB more while another \
         client ran 50 queries",
        forwarded / 1024,
        (later - forwarded) / 1024
    );
    assert!(still_blocked, "the backend stopped waiting on ClientWrite");
    assert_eq!(
        forwarded, later,
        "the proxy keeps reading for a client that does not"
    );
    assert!(
        later < IN_FLIGHT_LIMIT,
        "{} MiB left the server for a client that read nothing",
        later / MIB
    );

    // The proxy did not grow meanwhile.
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

/// The size of the single message the streaming tests below push through the proxy: far
/// more than the proxy may hold, well under PostgreSQL's 1 GB field limit.
const HUGE_MESSAGE: usize = 200 * 1024 * 1024;
/// What the process may grow by while [`HUGE_MESSAGE`] passes: the proxy's buffers, the
/// clients' chunk buffers and allocator noise, nowhere near the message itself.
const HUGE_MESSAGE_RSS_GROWTH_LIMIT: u64 = 64 * MIB;
/// How the test clients read and write the huge value: in chunks of this, never whole.
const CHUNK_LEN: usize = 64 * 1024;
/// [`CHUNK_LEN`] `x`s: what the clients write, and compare what they read with.
static CHUNK: [u8; CHUNK_LEN] = [b'x'; CHUNK_LEN];
/// Sampling period of the RSS peak: fine enough that a whole-message buffer, alive for at
/// least the time the message takes to arrive, cannot slip between two samples.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// A 5-byte message header read from `stream`: the tag and the body length.
async fn read_header(stream: &mut TcpStream) -> (u8, usize) {
    let mut header = [0u8; 5];
    stream
        .read_exact(&mut header)
        .await
        .expect("a message header");
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    (
        header[0],
        len.checked_sub(4).expect("a length of at least 4"),
    )
}

/// Runs `sql` with the simple protocol, every answer message small. Returns the messages up
/// to ReadyForQuery; panics on an ErrorResponse.
async fn small_query(stream: &mut TcpStream, sql: &str) -> Vec<raw::Received> {
    stream
        .write_all(&raw::query(sql))
        .await
        .expect("send a query");
    read_small_until_ready(stream).await
}

/// Reads small messages up to ReadyForQuery; panics on an ErrorResponse.
async fn read_small_until_ready(stream: &mut TcpStream) -> Vec<raw::Received> {
    let mut seen = Vec::new();
    loop {
        let m = raw::read_message(stream, Duration::from_secs(30))
            .await
            .expect("the server answered");
        assert_ne!(m.tag, b'E', "the server failed: {:?}", m.error_fields());
        let tag = m.tag;
        seen.push(m);
        if tag == b'Z' {
            return seen;
        }
    }
}

/// Reads the answer to a query returning one huge text value of `x`s, the DataRow in
/// [`CHUNK`]-sized pieces that are compared and dropped. Returns the value's length.
async fn read_one_huge_x_value(stream: &mut TcpStream) -> usize {
    let mut received = None;
    loop {
        let (tag, len) = read_header(stream).await;
        match tag {
            b'D' => {
                let mut counts = [0u8; 6];
                stream.read_exact(&mut counts).await.expect("DataRow head");
                assert_eq!(u16::from_be_bytes([counts[0], counts[1]]), 1, "one column");
                let value_len =
                    u32::from_be_bytes([counts[2], counts[3], counts[4], counts[5]]) as usize;
                assert_eq!(len, 6 + value_len, "the DataRow holds exactly the value");
                let mut chunk = [0u8; CHUNK_LEN];
                let mut count = 0;
                while count < value_len {
                    let want = CHUNK.len().min(value_len - count);
                    let n = stream
                        .read(&mut chunk[..want])
                        .await
                        .expect("read the DataRow");
                    assert!(
                        n > 0,
                        "the connection closed after {count} bytes of the value"
                    );
                    assert!(
                        chunk[..n] == CHUNK[..n],
                        "a byte other than 'x' near {count}"
                    );
                    count += n;
                }
                received = Some(count);
            }
            b'E' => {
                let mut body = vec![0u8; len];
                stream.read_exact(&mut body).await.expect("ErrorResponse");
                let error = raw::Received { tag, body };
                panic!("the huge query failed: {:?}", error.error_fields());
            }
            _ => {
                assert!(
                    len < 64 * 1024,
                    "an unexpected {len}-byte {:?}",
                    tag as char
                );
                let mut body = vec![0u8; len];
                stream.read_exact(&mut body).await.expect("a small message");
                if tag == b'Z' {
                    return received.expect("a DataRow before ReadyForQuery");
                }
            }
        }
    }
}

/// A proxy and a raw client logged in through it, for one huge message.
async fn huge_message_session() -> (TestProxy, TcpStream) {
    let cluster = TestCluster::shared();
    let proxy = TestProxy::start(cluster).await;
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
    raw::login(&mut client, cluster.superuser(), "postgres").await;
    (proxy, client)
}

/// The process (proxy included) grew by less than [`HUGE_MESSAGE_RSS_GROWTH_LIMIT`] while one
/// `kind` message of [`HUGE_MESSAGE`] bytes passed.
fn assert_bounded_rss_growth(kind: &str, rss_before: u64, peak_rss: u64, started: Instant) {
    let growth = peak_rss.saturating_sub(rss_before);
    eprintln!(
        "a {} MiB {kind} took {:?}; RSS {} MiB before, grew by {} MiB at the peak",
        HUGE_MESSAGE / 1024 / 1024,
        started.elapsed(),
        rss_before / MIB,
        growth / MIB
    );
    assert!(
        growth < HUGE_MESSAGE_RSS_GROWTH_LIMIT,
        "RSS grew by {} MiB while a {} MiB {kind} passed",
        growth / MIB,
        HUGE_MESSAGE / 1024 / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_200_mib_data_row_streams_through_without_being_buffered_whole() {
    let _serial = SERIAL.lock().await;
    let (_proxy, mut client) = huge_message_session().await;
    let rss_before = vm_rss_bytes().expect("VmRSS");
    let started = Instant::now();

    client
        .write_all(&raw::query(&format!("SELECT repeat('x', {HUGE_MESSAGE})")))
        .await
        .expect("send the query");
    let streamed = AtomicBool::new(false);
    let read = async {
        let len = read_one_huge_x_value(&mut client).await;
        streamed.store(true, Ordering::Relaxed);
        len
    };
    let (received, peak_rss) = tokio::join!(read, peak_rss_until(&streamed, RSS_SAMPLE_EVERY));

    assert_eq!(received, HUGE_MESSAGE);
    assert_bounded_rss_growth("DataRow", rss_before, peak_rss, started);
    // The session goes on normally after it.
    let after = small_query(&mut client, "SELECT 1").await;
    assert!(after.iter().any(|m| m.tag == b'D'), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_200_mib_copy_data_message_streams_through_without_being_buffered_whole() {
    let _serial = SERIAL.lock().await;
    let (_proxy, mut client) = huge_message_session().await;
    small_query(&mut client, "CREATE TEMP TABLE huge_copy (v text)").await;
    let rss_before = vm_rss_bytes().expect("VmRSS");
    let started = Instant::now();

    client
        .write_all(&raw::query("COPY huge_copy FROM STDIN"))
        .await
        .expect("send COPY");
    let copy_in = raw::read_message(&mut client, Duration::from_secs(10))
        .await
        .expect("an answer to COPY");
    assert_eq!(
        copy_in.tag,
        b'G',
        "CopyInResponse: {:?}",
        copy_in.error_fields()
    );
    let copied = AtomicBool::new(false);
    let send = async {
        // One CopyData message: the row's `x`s and its newline.
        let body_len = u32::try_from(4 + HUGE_MESSAGE + 1).expect("fits");
        let mut header = vec![b'd'];
        header.extend_from_slice(&body_len.to_be_bytes());
        client.write_all(&header).await.expect("CopyData header");
        let mut sent = 0;
        while sent < HUGE_MESSAGE {
            let n = CHUNK.len().min(HUGE_MESSAGE - sent);
            client.write_all(&CHUNK[..n]).await.expect("CopyData");
            sent += n;
        }
        client.write_all(b"\n").await.expect("end of the row");
        client
            .write_all(&raw::message(raw::frontend::COPY_DONE, &[]))
            .await
            .expect("CopyDone");
        let done = read_small_until_ready(&mut client).await;
        copied.store(true, Ordering::Relaxed);
        done
    };
    let (done, peak_rss) = tokio::join!(send, peak_rss_until(&copied, RSS_SAMPLE_EVERY));

    assert_bounded_rss_growth("CopyData", rss_before, peak_rss, started);
    let complete = done
        .iter()
        .find(|m| m.tag == b'C')
        .expect("CommandComplete");
    assert_eq!(complete.body, b"COPY 1\0");
    let stored = small_query(&mut client, "SELECT length(v) FROM huge_copy").await;
    let row = stored.iter().find(|m| m.tag == b'D').expect("a DataRow");
    // One column: count (2 bytes), length (4 bytes), the number as text.
    let length: usize = std::str::from_utf8(&row.body[6..])
        .expect("text")
        .parse()
        .expect("a number");
    assert_eq!(length, HUGE_MESSAGE, "the stored value's length");
}
