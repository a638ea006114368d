//! The first bytes a client sends: hostile startup packets are refused while a normal client
//! keeps working, SSLRequest and GSSENCRequest are declined (protocol 3.2 passes through),
//! cancel requests are forwarded unchanged, and garbage instead of a startup packet gets the
//! answer PostgreSQL gives.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lockguard_config::Upstream;
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::proxy::{config_for, TestProxy};
use lockguard_tests::query::ask;
use lockguard_tests::raw::{self, PROTOCOL_3_0};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn hostile_input_is_refused_while_a_normal_client_keeps_working() {
    let cluster = TestCluster::shared();
    let mut config = config_for(cluster);
    config.proxy.startup_timeout = Duration::from_secs(1);
    let proxy = TestProxy::start_with(config).await;
    let normal = proxy
        .connect(cluster.superuser(), None, "postgres")
        .await
        .expect("normal client");
    let normal_keeps_working = async {
        for i in 0..40i32 {
            let v: i32 = normal
                .query_one("SELECT $1::int4", &[&i])
                .await
                .expect("normal query")
                .get(0);
            assert_eq!(v, i);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    let hostile = async {
        let connect = || TcpStream::connect(proxy.addr);

        // Random garbage (an HTTP request): its first bytes read as an absurd length, so the
        // connection is closed without an answer, as PostgreSQL does.
        let mut s = connect().await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: lockguard\r\n\r\n")
            .await
            .expect("write");
        let reply = raw::read_until_close(&mut s, Duration::from_secs(3)).await;
        assert!(reply.is_empty(), "garbage: {reply:?}");

        // Truly random bytes: an error or a close at the startup deadline, never a hang.
        let mut s = connect().await.expect("connect");
        let noise: Vec<u8> = (0..512).map(|_| rand::random::<u8>()).collect();
        let _ = s.write_all(&noise).await;
        assert!(
            raw::closed_within(&mut s, Duration::from_secs(3)).await,
            "random bytes: still open"
        );

        // A length field of 0xFFFFFFFF.
        let mut s = connect().await.expect("connect");
        s.write_all(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 3, 0, 0])
            .await
            .expect("write");
        let reply = raw::read_until_close(&mut s, Duration::from_secs(3)).await;
        assert!(reply.is_empty(), "length 0xFFFFFFFF: {reply:?}");

        // A 1 MB startup packet: refused from its length, before the body is read.
        let mut s = connect().await.expect("connect");
        let mut big = raw::startup_packet(
            PROTOCOL_3_0,
            &[("user", "x"), ("options", &"y".repeat(1 << 20))],
        );
        big.truncate(1 << 20);
        let (mut reader, mut writer) = s.split();
        let send = async {
            let _ = writer.write_all(&big).await;
        };
        let read = raw::read_until_close(&mut reader, Duration::from_secs(3));
        let (_, reply) = tokio::join!(send, read);
        assert!(reply.is_empty(), "1 MB packet: {reply:?}");

        // A client that connects and says nothing: closed at the startup deadline.
        let mut s = connect().await.expect("connect");
        let t = Instant::now();
        assert!(
            raw::closed_within(&mut s, Duration::from_secs(3)).await,
            "silent client: still open"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "closed too early: {:?}",
            t.elapsed()
        );

        // A logged-in client that sends a message with an impossible length.
        let mut s = connect().await.expect("connect");
        raw::login(&mut s, cluster.superuser(), "postgres").await;
        s.write_all(&[b'Q', 0xFF, 0xFF, 0xFF, 0xFF])
            .await
            .expect("write");
        let reply = raw::read_until_close(&mut s, Duration::from_secs(3)).await;
        let last = reply.last().expect("an error before the close");
        assert_eq!(last.error_fields().0, "08P01", "{reply:?}");
    };
    tokio::join!(normal_keeps_working, hostile);
    assert_eq!(ask(&normal, "SELECT 'survived'::text").await, "survived");
    proxy.wait_for_sessions(1, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn ssl_request_is_declined_and_protocol_3_2_is_passed_through() {
    let cluster = TestCluster::shared();
    let proxy = TestProxy::start(cluster).await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    // SSLRequest, answered 'N'; then a 3.2 startup, which PostgreSQL 15 negotiates down itself.
    assert_eq!(
        raw::encryption_request(&mut s, raw::SSL_REQUEST).await,
        b'N'
    );
    s.write_all(&raw::startup_packet(
        196_610,
        &[("user", cluster.superuser()), ("database", "postgres")],
    ))
    .await
    .expect("startup 3.2");
    let mut seen = Vec::new();
    while let Some(m) = raw::read_message(&mut s, Duration::from_secs(5)).await {
        let tag = m.tag;
        seen.push(tag);
        if tag == b'Z' || tag == b'E' {
            break;
        }
    }
    assert_eq!(
        seen.last(),
        Some(&b'Z'),
        "login with 3.2 failed: {:?}",
        String::from_utf8_lossy(&seen)
    );
    assert!(seen.contains(&b'K'));
}

#[tokio::test]
async fn gssenc_request_is_declined_and_the_same_socket_logs_in() {
    let cluster = TestCluster::shared();
    let proxy = TestProxy::start(cluster).await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    assert_eq!(
        raw::encryption_request(&mut s, raw::GSSENC_REQUEST).await,
        b'N'
    );

    let login = raw::login(&mut s, cluster.superuser(), "postgres").await;
    assert!(login.iter().any(|m| m.tag == b'K'), "{login:?}");
    s.write_all(&raw::query("SELECT 'after gssenc'::text"))
        .await
        .expect("query");
    let mut rows = Vec::new();
    loop {
        let m = raw::read_message(&mut s, Duration::from_secs(10))
            .await
            .expect("the query is answered");
        match m.tag {
            // Column count (2), value length (4), value.
            b'D' => rows.push(String::from_utf8_lossy(&m.body[6..]).into_owned()),
            b'E' => panic!("query failed: {:?}", m.error_fields()),
            b'Z' => break,
            _ => {}
        }
    }
    assert_eq!(rows, ["after gssenc"]);
}

/// Accepts one connection, records one untagged packet (read by its length prefix) plus
/// anything that follows within a moment, then closes, as a server does after a cancel.
async fn record_one_packet(listener: &TcpListener) -> Vec<u8> {
    let (mut conn, _) = listener.accept().await.expect("the proxy connects");
    let mut received = vec![0u8; 4];
    let read_packet = async {
        conn.read_exact(&mut received).await.expect("length");
        let len = u32::from_be_bytes([received[0], received[1], received[2], received[3]]);
        received.resize((len as usize).max(4), 0);
        conn.read_exact(&mut received[4..]).await.expect("body");
    };
    tokio::time::timeout(Duration::from_secs(10), read_packet)
        .await
        .expect("a whole packet arrives");
    // Whatever else arrives shows up in the comparison.
    let mut extra = [0u8; 512];
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), conn.read(&mut extra)).await
    {
        received.extend_from_slice(&extra[..n]);
    }
    received
}

#[tokio::test]
async fn cancel_requests_are_forwarded_unchanged_and_the_client_closed() {
    let cluster = TestCluster::shared();
    // The listener stands in for the server only to capture the forwarded bytes.
    let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server_addr = server.local_addr().expect("addr");
    let mut config = config_for(cluster);
    config.proxy.upstream = Upstream::Tcp {
        host: server_addr.ip().to_string(),
        port: server_addr.port(),
    };
    let proxy = TestProxy::start_with(config).await;

    let classic = raw::cancel_request(0x0102_0304, &[0xA1, 0xB2, 0xC3, 0xD4]);
    let key_3_2: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5A).collect();
    let long = raw::cancel_request(0x7FFF_0001, &key_3_2);
    assert_eq!((classic.len(), long.len()), (16, 44));
    for packet in [classic, long] {
        let cancel = async {
            let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
            client.write_all(&packet).await.expect("cancel request");
            raw::read_until_close(&mut client, Duration::from_secs(10)).await
        };
        let (received, answer) = tokio::join!(record_one_packet(&server), cancel);
        assert_eq!(received, packet, "forwarded bytes differ");
        assert!(answer.is_empty(), "a cancel gets no answer: {answer:?}");
    }
}

/// One step of a hand-played connection opening.
enum Step {
    Send(Vec<u8>),
    /// Read the one-byte answer to an encryption request (the client waits for it, as libpq).
    Answer,
    /// Close the sending side.
    Close,
}

/// Plays `steps` against `addr` and describes what came back: one-byte answers as
/// `answer N`, ErrorResponses as `E <severity> <sqlstate>`, errors in the format of protocol
/// 2 and older as `old-format E <text up to the colon>`, other messages by their tag (up to
/// ReadyForQuery), and `closed` when the peer closed the connection.
async fn opening(addr: SocketAddr, steps: &[Step]) -> Vec<String> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut seen = Vec::new();
    for step in steps {
        match step {
            Step::Send(bytes) => s.write_all(bytes).await.expect("send"),
            Step::Answer => {
                let mut byte = [0u8; 1];
                tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut byte))
                    .await
                    .expect("an answer in time")
                    .expect("an answer");
                seen.push(format!("answer {}", char::from(byte[0])));
            }
            Step::Close => s.shutdown().await.expect("shutdown"),
        }
    }
    let mut buf = Vec::new();
    loop {
        // Parse whole messages off the front of `buf`.
        loop {
            if buf.first() == Some(&b'E') && buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if len > 100_000 {
                    // Old format: 'E', then text such as "FATAL:  ...\n", NUL-terminated.
                    let Some(end) = buf.iter().position(|&b| b == 0) else {
                        break;
                    };
                    let text = String::from_utf8_lossy(&buf[1..end]).into_owned();
                    let severity = text.split(':').next().unwrap_or_default().to_owned();
                    seen.push(format!("old-format E {severity}"));
                    buf.drain(..=end);
                    continue;
                }
            }
            if buf.len() < 5 {
                break;
            }
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let message = raw::Received {
                tag: buf[0],
                body: buf[5..1 + len].to_vec(),
            };
            buf.drain(..1 + len);
            if message.tag == b'E' {
                let severity = message
                    .body
                    .split(|&b| b == 0)
                    .find_map(|field| field.strip_prefix(b"S"))
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .unwrap_or_default();
                seen.push(format!("E {severity} {}", message.error_fields().0));
            } else {
                seen.push(char::from(message.tag).to_string());
                if message.tag == b'Z' {
                    return seen;
                }
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                if !buf.is_empty() {
                    seen.push(format!("unparsed {buf:?}"));
                }
                seen.push("closed".to_owned());
                return seen;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("still open after 10 s; seen {seen:?}"),
        }
    }
}

/// PostgreSQL's `ProcessStartupPacket` closes without a word on an impossible length or a
/// packet cut short (it only logs), and sends a FATAL for an unsupported protocol, a repeated
/// encryption request, data sent before the answer to one, a bad layout or no user. Each
/// opening gets the same answer through lockguard as from the server itself. (GSSENCRequest
/// is left out: a server built with GSSAPI answers it 'G', lockguard always 'N'.)
#[tokio::test]
async fn garbage_instead_of_a_startup_packet_gets_the_answer_postgres_gives() {
    use Step::{Answer, Close, Send};
    let cluster = TestCluster::shared();
    let proxy = TestProxy::start(cluster).await;
    let user = cluster.superuser();
    let ssl = || raw::packet(raw::SSL_REQUEST, &[]);
    let login = || raw::startup_packet(PROTOCOL_3_0, &[("user", user)]);
    let pipelined = [ssl(), login()].concat();
    let huge = [&(1u32 << 20).to_be_bytes()[..], &[0, 3, 0, 0], &[b'x'; 200]].concat();
    let cases: Vec<(&str, Vec<Step>)> = vec![
        (
            "an HTTP request",
            vec![Send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec())],
        ),
        (
            "length 0xFFFFFFFF",
            vec![Send(vec![0xFF, 0xFF, 0xFF, 0xFF, 0, 3, 0, 0])],
        ),
        ("length 7", vec![Send(vec![0, 0, 0, 7, 0, 3, 0])]),
        ("a 1 MB length", vec![Send(huge)]),
        ("half a length", vec![Send(vec![0, 0]), Close]),
        (
            "a body cut short",
            vec![Send(login()[..12].to_vec()), Close],
        ),
        ("nothing at all", vec![Close]),
        (
            "protocol 2.0",
            vec![Send(raw::packet(2 << 16, b"user\0x\0\0"))],
        ),
        (
            "protocol 1234.0",
            vec![Send(raw::packet(1234 << 16, b"user\0x\0\0"))],
        ),
        (
            "a second SSLRequest",
            vec![Send(ssl()), Answer, Send(ssl())],
        ),
        (
            "a startup sent with its SSLRequest",
            vec![Send(pipelined), Answer],
        ),
        (
            "no terminator",
            vec![Send(raw::packet(PROTOCOL_3_0, b"user\0x\0"))],
        ),
        (
            "only a protocol version",
            vec![Send(raw::packet(PROTOCOL_3_0, &[]))],
        ),
        (
            "no user",
            vec![Send(raw::startup_packet(
                PROTOCOL_3_0,
                &[("database", "postgres")],
            ))],
        ),
        (
            "a cancel of the wrong length",
            vec![Send(raw::packet(raw::CANCEL_REQUEST, &[0; 3]))],
        ),
        (
            "an SSLRequest with trailing bytes",
            vec![
                Send(raw::packet(raw::SSL_REQUEST, b"xx")),
                Answer,
                Send(login()),
            ],
        ),
    ];
    let server = SocketAddr::from(([127, 0, 0, 1], cluster.port()));
    let server = if cluster.host() == "127.0.0.1" {
        server
    } else {
        tokio::net::lookup_host((cluster.host(), cluster.port()))
            .await
            .expect("resolve the server")
            .next()
            .expect("an address")
    };
    for (name, steps) in &cases {
        let direct = opening(server, steps).await;
        let through = opening(proxy.addr, steps).await;
        assert_eq!(through, direct, "{name}: lockguard vs PostgreSQL");
    }
    // Sanity of the comparison itself: the cases cover both kinds of answer.
    let direct = opening(server, &cases[0].1).await;
    assert_eq!(direct, ["closed"]);
    let direct = opening(server, &cases[8].1).await;
    assert_eq!(direct, ["E FATAL 0A000", "closed"]);
}
