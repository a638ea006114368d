//! What an unauthenticated or hostile console client meets: length limits enforced as the
//! bytes arrive, a connection cap, the startup timeout, no encryption.

use std::net::SocketAddr;
use std::time::Duration;

use lockguard_tests::admin::*;
use lockguard_tests::raw::{self, Received};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

/// Protocol 3.0's StartupMessage code.
const PROTOCOL_3_0: u32 = raw::PROTOCOL_3_0;

/// Sends `ops`'s StartupMessage for the console database.
async fn send_ops_startup(stream: &mut TcpStream) {
    let startup = raw::startup_packet(PROTOCOL_3_0, &[("user", OPS.0), ("database", "lockguard")]);
    stream.write_all(&startup).await.expect("send the startup");
}

/// Starts `ops`'s login and returns the console's authentication request.
async fn begin_ops_login(stream: &mut TcpStream) -> Received {
    send_ops_startup(stream).await;
    let challenge = raw::read_message(stream, WAIT)
        .await
        .expect("an authentication request");
    assert_eq!(challenge.tag, b'R', "{challenge:?}");
    challenge
}

/// Bytes each flooding connection tries to send after its `Q` header.
const FLOOD_BYTES: usize = 32 << 20;

/// One flooding connection: a login as `ops` (never completed), then a `Q` header declaring
/// 500 MB and its body trickled in 64 KiB chunks. Returns how much of the body got out
/// before the console cut the connection, `None` if it never did.
async fn flood_with_a_huge_query(console: SocketAddr) -> Option<usize> {
    let mut stream = TcpStream::connect(console)
        .await
        .expect("connect to the console");
    send_ops_startup(&mut stream).await;
    let mut header = vec![b'Q'];
    header.extend_from_slice(&500_000_004u32.to_be_bytes());
    if stream.write_all(&header).await.is_err() {
        return Some(0);
    }
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0;
    while sent < FLOOD_BYTES {
        if stream.write_all(&chunk).await.is_err() {
            return Some(sent);
        }
        sent += chunk.len();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

/// Bounded memory before authentication: 20 unauthenticated console connections that each declare a 500 MB
/// query and keep sending it (640 MiB offered in all) are cut at the header, the process
/// grows by far less than what they sent, and a console user and a proxied session carry on.
#[tokio::test]
async fn huge_unauthenticated_messages_are_cut_with_bounded_memory() {
    const FLOODERS: usize = 20;
    let db = database("admin_flood_console").await;
    let running = start(admin_config(&[]), None).await;
    let mut app = running.app(&db).await;
    let ops = console(&running, OPS).await.expect("ops logs in");
    let rss_before = lockguard_tests::resources::vm_rss_bytes().expect("VmRSS");

    let flooding = std::sync::atomic::AtomicBool::new(true);
    let flood = async {
        let flooders = (0..FLOODERS).map(|_| flood_with_a_huge_query(running.console));
        let cut = futures_util::future::join_all(flooders).await;
        flooding.store(false, std::sync::atomic::Ordering::Relaxed);
        cut
    };
    // The peak counts: buffers are freed once the flooders hang up.
    let sample_peak_rss = async {
        let mut peak = rss_before;
        while flooding.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(lockguard_tests::resources::vm_rss_bytes().expect("VmRSS"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    };
    let (cut, rss_peak, _) = tokio::join!(flood, sample_peak_rss, async {
        // Meanwhile the console and the proxy keep answering.
        let clients = rows(&ops, "SHOW CLIENTS").await;
        assert!(
            clients
                .iter()
                .any(|c| c["backend_pid"] == app.pid.to_string()),
            "{clients:?}"
        );
        app.exec_ok("SELECT 1").await;
    });

    let grown = rss_peak.saturating_sub(rss_before);
    assert!(
        grown < 64 << 20,
        "RSS grew by {} MiB while {FLOODERS} connections offered {} MiB",
        grown >> 20,
        (FLOODERS * FLOOD_BYTES) >> 20
    );
    for (i, sent) in cut.iter().enumerate() {
        let sent = sent.unwrap_or_else(|| {
            panic!("flooder {i} sent all {FLOOD_BYTES} bytes without being cut")
        });
        assert!(sent < FLOOD_BYTES, "flooder {i}");
    }
    // Everything still works, new console logins included.
    app.exec_ok("SELECT 2").await;
    assert_eq!(rows(&ops, "SHOW VERSION").await.len(), 1);
    let watcher = console(&running, WATCHER).await.expect("watcher logs in");
    assert!(!rows(&watcher, "SHOW CLIENTS").await.is_empty());
}

/// The console serves at most `MAX_CONSOLE_CONNECTIONS` connections; the next one is refused
/// with 53300 and a slot is free again once one of them closes.
#[tokio::test]
async fn the_console_refuses_connections_over_its_cap() {
    use lockguard::admin::console::MAX_CONSOLE_CONNECTIONS;
    let running = start(admin_config(&[]), None).await;
    let mut held = Vec::new();
    for _ in 0..MAX_CONSOLE_CONNECTIONS {
        held.push(
            TcpStream::connect(running.console)
                .await
                .expect("connect to the console"),
        );
    }
    // Connections are accepted in order: the held ones fill every slot first.
    let e = console(&running, OPS).await.expect_err("over the cap");
    assert_eq!(code_of(&e), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e:?}");

    held.pop();
    let deadline = tokio::time::Instant::now() + WAIT;
    let ops = loop {
        match console(&running, OPS).await {
            Ok(ops) => break ops,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(code_of(&e), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no slot freed after a connection closed: {e:?}"),
        }
    };
    assert_eq!(rows(&ops, "SHOW VERSION").await.len(), 1);
}

/// A console connection gets `proxy.startup_timeout` to log in, silent or half-way through
/// the password exchange; one that logged in stays.
#[tokio::test]
async fn console_logins_are_bounded_by_startup_timeout() {
    let mut config = admin_config(&[]);
    config.proxy.startup_timeout = Duration::from_secs(1);
    let running = start(config, None).await;
    // ops logs in first, so its own login deadline passes before the others' do: once they
    // are closed, a console that dropped logged-in connections at the deadline would have
    // dropped ops too.
    let ops = console(&running, OPS).await.expect("ops logs in");
    let mut silent = TcpStream::connect(running.console).await.expect("connect");
    let mut halfway = TcpStream::connect(running.console).await.expect("connect");
    begin_ops_login(&mut halfway).await;
    assert!(
        raw::closed_within(&mut silent, WAIT).await,
        "silent connection kept"
    );
    assert!(
        raw::closed_within(&mut halfway, WAIT).await,
        "half-way login kept"
    );
    assert_eq!(rows(&ops, "SHOW VERSION").await.len(), 1);
}

/// psql opens with an SSLRequest (and a GSSENCRequest where it has Kerberos): a console
/// without a certificate (neither its own nor the client side's) declines both with 'N' and
/// the login goes on.
#[tokio::test]
async fn the_console_declines_encryption_requests() {
    let running = start(admin_config(&[]), None).await;
    let mut stream = TcpStream::connect(running.console).await.expect("connect");
    for code in [raw::SSL_REQUEST, raw::GSSENC_REQUEST] {
        let answer = raw::encryption_request(&mut stream, code).await;
        assert_eq!(answer, b'N', "request {code}");
    }
    let challenge = begin_ops_login(&mut stream).await;
    // AuthenticationSASL (10) offering SCRAM-SHA-256.
    assert_eq!(challenge.body[..4], 10u32.to_be_bytes());
    assert!(challenge.body.windows(13).any(|w| w == b"SCRAM-SHA-256"));
}
