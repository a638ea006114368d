//! The proxy is invisible to correct applications: every result through lockguard equals the
//! result of a direct connection to the same server.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{future, pin_mut, SinkExt, StreamExt, TryStreamExt};
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::wait_for;
use lockguard_tests::proxy::TestProxy;
use lockguard_tests::raw;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

/// A direct client and a proxied client on a private database.
struct Pair {
    direct: Client,
    proxied: Client,
    proxy: TestProxy,
    db: String,
}

async fn pair(prefix: &str) -> Pair {
    let cluster = TestCluster::shared();
    let db = cluster.create_database(prefix).await;
    let proxy = TestProxy::start(cluster).await;
    let (direct, conn) = cluster
        .pg_config(cluster.superuser(), None, &db)
        .connect(NoTls)
        .await
        .expect("direct connection");
    tokio::spawn(conn);
    let proxied = proxy
        .connect(cluster.superuser(), None, &db)
        .await
        .expect("connection through the proxy");
    Pair {
        direct,
        proxied,
        proxy,
        db,
    }
}

/// Rows of a simple-query result as text, plus command tags, for comparison.
fn simple_rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .map(|m| match m {
            SimpleQueryMessage::Row(row) => (0..row.len())
                .map(|i| row.get(i).map(str::to_owned))
                .collect(),
            SimpleQueryMessage::CommandComplete(n) => vec![Some(format!("complete {n}"))],
            _ => vec![Some("other".to_owned())],
        })
        .collect()
}

#[tokio::test]
async fn simple_queries_and_errors_match_a_direct_connection() {
    let p = pair("fwd_simple").await;
    let sql = "SELECT g, md5(g::text), NULL::text FROM generate_series(1, 2000) g; \
               SELECT 'second statement'::text, now() IS NOT NULL";
    let direct = p.direct.simple_query(sql).await.expect("direct");
    let proxied = p.proxied.simple_query(sql).await.expect("proxied");
    assert_eq!(simple_rows(&proxied), simple_rows(&direct));
    // Rows of both statements, two RowDescriptions and two CommandCompletes.
    assert_eq!(simple_rows(&proxied).len(), 2000 + 1 + 2 + 2);

    // Errors come back exactly as PostgreSQL wrote them.
    let direct_err = p.direct.simple_query("SELECT 1/0").await.unwrap_err();
    let proxied_err = p.proxied.simple_query("SELECT 1/0").await.unwrap_err();
    let (d, q) = (
        direct_err.as_db_error().expect("db error"),
        proxied_err.as_db_error().expect("db error"),
    );
    assert_eq!(q.code(), &SqlState::DIVISION_BY_ZERO);
    assert_eq!(
        (q.code(), q.message(), q.severity()),
        (d.code(), d.message(), d.severity())
    );
    // The session is still usable after the error.
    let rows = p
        .proxied
        .simple_query("SELECT 42")
        .await
        .expect("after error");
    assert_eq!(simple_rows(&rows)[1], vec![Some("42".to_owned())]);
}

#[tokio::test]
async fn extended_queries_with_binary_parameters_and_many_rows_match() {
    let p = pair("fwd_extended").await;
    let sql = "SELECT $1::int8 + g, $2::text || g::text, $3::bytea, g % 7 = 0, \
                      (g * 1.5)::float8, repeat('x', g % 300) \
               FROM generate_series(1, 50000) g";
    let blob: Vec<u8> = (0..=255u8).collect();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&5_000_000_000i64, &"row-", &blob];
    type Row = (i64, String, Vec<u8>, bool, f64, String);
    let collect = |rows: Vec<tokio_postgres::Row>| -> Vec<Row> {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect()
    };
    let direct = collect(p.direct.query(sql, &params).await.expect("direct"));
    let proxied = collect(p.proxied.query(sql, &params).await.expect("proxied"));
    assert_eq!(proxied.len(), 50_000);
    assert_eq!(proxied, direct);

    // A prepared statement reused many times.
    let stmt = p
        .proxied
        .prepare("SELECT $1::int4 * 2")
        .await
        .expect("prepare");
    for i in 0..200 {
        let v: i32 = p
            .proxied
            .query_one(&stmt, &[&i])
            .await
            .expect("execute")
            .get(0);
        assert_eq!(v, i * 2);
    }
}

#[tokio::test]
async fn pipelined_extended_queries_match() {
    let p = pair("fwd_pipeline").await;
    // tokio-postgres pipelines concurrent queries on one connection: all Parse/Bind/Execute/Sync
    // go out before the first result comes back.
    async fn run(client: &Client) -> Vec<(i32, String)> {
        let stmt = client
            .prepare("SELECT $1::int4 * 3, md5($1::int4::text)")
            .await
            .expect("prepare");
        let queries = (0..300).map(|i| {
            let stmt = stmt.clone();
            async move { client.query_one(&stmt, &[&i]).await }
        });
        future::try_join_all(queries)
            .await
            .expect("pipelined queries")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
    let direct = run(&p.direct).await;
    let proxied = run(&p.proxied).await;
    assert_eq!(proxied.len(), 300);
    assert_eq!(proxied, direct);
}

/// FNV-1a, enough to tell two byte streams apart.
#[derive(Default)]
struct Checksum {
    hash: u64,
    bytes: u64,
}

impl Checksum {
    fn add(&mut self, data: &[u8]) {
        if self.bytes == 0 {
            self.hash = 0xcbf2_9ce4_8422_2325;
        }
        for &b in data {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.bytes += data.len() as u64;
    }
}

async fn copy_out_checksum(client: &Client) -> (u64, u64) {
    let stream = client
        .copy_out("COPY (SELECT g, md5(g::text) FROM generate_series(1, 1000000) g) TO STDOUT")
        .await
        .expect("copy out");
    pin_mut!(stream);
    let mut sum = Checksum::default();
    while let Some(chunk) = stream.try_next().await.expect("copy data") {
        sum.add(&chunk);
    }
    (sum.bytes, sum.hash)
}

#[tokio::test]
async fn copy_out_of_a_million_rows_matches() {
    let p = pair("fwd_copy_out").await;
    let direct = copy_out_checksum(&p.direct).await;
    let proxied = copy_out_checksum(&p.proxied).await;
    assert!(
        direct.0 > 30_000_000,
        "expected ~40 MB, got {} bytes",
        direct.0
    );
    assert_eq!(proxied, direct);
}

/// Deterministic COPY text of `rows` rows, ~130 bytes each.
fn copy_in_chunks(rows: usize) -> impl Iterator<Item = Bytes> {
    const ROWS_PER_CHUNK: usize = 1000;
    (0..rows.div_ceil(ROWS_PER_CHUNK)).map(move |chunk| {
        let mut text = String::with_capacity(ROWS_PER_CHUNK * 140);
        for id in chunk * ROWS_PER_CHUNK..((chunk + 1) * ROWS_PER_CHUNK).min(rows) {
            let letter = char::from(b'a' + (id % 26) as u8);
            text.push_str(&format!(
                "{id}\t{}{id:012}\n",
                letter.to_string().repeat(110)
            ));
        }
        Bytes::from(text)
    })
}

async fn copy_in(client: &Client, table: &str, rows: usize) -> (u64, u64) {
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int8, payload text)"))
        .await
        .expect("create table");
    let sink = client
        .copy_in(&format!("COPY {table} FROM STDIN"))
        .await
        .expect("copy in");
    pin_mut!(sink);
    let mut sent = Checksum::default();
    for chunk in copy_in_chunks(rows) {
        sent.add(&chunk);
        sink.send(chunk).await.expect("copy data");
    }
    let copied = sink.finish().await.expect("copy done");
    assert_eq!(copied, rows as u64);
    (sent.bytes, sent.hash)
}

#[tokio::test]
async fn copy_in_of_50_megabytes_matches() {
    let p = pair("fwd_copy_in").await;
    let rows = 400_000;
    let sent_direct = copy_in(&p.direct, "copied_direct", rows).await;
    let sent_proxied = copy_in(&p.proxied, "copied_proxied", rows).await;
    assert_eq!(sent_direct, sent_proxied);
    assert!(
        sent_proxied.0 >= 50_000_000,
        "sent only {} bytes",
        sent_proxied.0
    );

    let summary = "SELECT count(*), sum(length(payload))::int8, sum(hashtext(id || payload)::int8)::text FROM ";
    let read = |table: &'static str| {
        let client = &p.direct;
        async move {
            let row = client
                .query_one(&format!("{summary}{table}"), &[])
                .await
                .expect("summary");
            (
                row.get::<_, i64>(0),
                row.get::<_, i64>(1),
                row.get::<_, String>(2),
            )
        }
    };
    let direct = read("copied_direct").await;
    let proxied = read("copied_proxied").await;
    assert_eq!(direct.0, rows as i64);
    assert_eq!(proxied, direct);
    // The session state is consistent after COPY: idle, nothing in flight.
    let pid: i32 = p
        .proxied
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let record = p.proxy.session_of(pid).await;
    assert_eq!(record.state(), guard_core::TxnState::Idle);
}

#[tokio::test]
async fn notifications_and_notices_reach_the_client() {
    let cluster = TestCluster::shared();
    let p = pair("fwd_notify").await;
    let (client, mut connection) = p
        .proxy
        .pg_config(cluster.superuser(), None, &p.db)
        .connect(NoTls)
        .await
        .expect("connect through the proxy");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            let _ = tx.send(message);
        }
    });
    client
        .batch_execute("LISTEN lockguard_channel")
        .await
        .expect("listen");
    p.direct
        .batch_execute("NOTIFY lockguard_channel, 'hello through the proxy'")
        .await
        .expect("notify");
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'a notice for you'; END $$")
        .await
        .expect("raise notice");

    let (mut notification, mut notice) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while notification.is_none() || notice.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(AsyncMessage::Notification(n))) => notification = Some(n),
            Ok(Some(AsyncMessage::Notice(n))) => notice = Some(n),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let notification = notification.expect("notification arrived");
    assert_eq!(notification.channel(), "lockguard_channel");
    assert_eq!(notification.payload(), "hello through the proxy");
    assert_eq!(
        notice.expect("notice arrived").message(),
        "a notice for you"
    );
}

#[tokio::test]
async fn cancel_through_the_proxy_stops_a_running_query() {
    let p = pair("fwd_cancel").await;
    let token = p.proxied.cancel_token();
    let backend: i32 = p
        .proxied
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("backend pid through the proxy")
        .get(0);
    let started = Instant::now();
    let sleeper = {
        let client = p.proxied;
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await })
    };
    // The cancel must find the statement running, not still on its way to the server.
    let direct = &p.direct;
    wait_for(Duration::from_secs(10), "pg_sleep running", || async move {
        direct
            .query_one(
                "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity \
                 WHERE pid OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.=) 'active' \
                 AND query OPERATOR(pg_catalog.=) 'SELECT pg_sleep(30)'",
                &[&backend],
            )
            .await
            .expect("read pg_stat_activity")
            .get::<_, i64>(0)
            == 1
    })
    .await;
    token
        .cancel_query(NoTls)
        .await
        .expect("send cancel through the proxy");
    let result = tokio::time::timeout(Duration::from_secs(2), sleeper)
        .await
        .expect("query cancelled within 2 s")
        .expect("query task");
    let err = result.expect_err("cancelled query fails");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn two_hundred_clients_times_one_hundred_queries() {
    let cluster = TestCluster::shared();
    let p = pair("fwd_many").await;
    let proxy = &p.proxy;
    let db = &p.db;
    let clients = (0..200).map(|c| async move {
        let client = proxy
            .connect(cluster.superuser(), None, db)
            .await
            .unwrap_or_else(|e| panic!("client {c}: {e}"));
        for q in 0..100i32 {
            let v: i32 = client
                .query_one("SELECT $1::int4 + 1", &[&q])
                .await
                .unwrap_or_else(|e| panic!("client {c} query {q}: {e}"))
                .get(0);
            assert_eq!(v, q + 1);
        }
    });
    future::join_all(clients).await;
    drop(p.proxied);
    // Every client has been dropped: their sessions leave the registry.
    p.proxy.wait_for_sessions(0, Duration::from_secs(10)).await;
}

/// What a client sends after login in [`server_bytes_match_a_direct_connection_byte_for_byte`]:
/// a simple query (NULLs, control characters, non-ASCII text), an extended-protocol round with
/// binary parameters and binary results, and a query that fails, all pipelined.
fn byte_exact_script() -> (Vec<u8>, usize) {
    let mut script = raw::query(
        "SELECT g, CASE WHEN g % 3 = 0 THEN NULL ELSE md5(g::text) END, \
                repeat(chr(g % 250 + 1), g % 40), 'zäø€'::text || g \
         FROM generate_series(1, 120) g",
    );

    let sql = "SELECT $1::int4 + g, $2::bytea, NULL::int8, g::float8 / 7 \
               FROM generate_series(1, 60) g";
    const INT4: u32 = 23;
    const BYTEA: u32 = 17;
    script.extend(raw::parse(sql, &[INT4, BYTEA]));

    let blob: Vec<u8> = (0..=255u8).rev().collect();
    // Parameters and results in binary.
    script.extend(raw::bind(&[&1_000_000i32.to_be_bytes(), &blob], 1));
    script.extend(raw::describe_portal());
    script.extend(raw::execute());
    script.extend(raw::sync());

    script.extend(raw::query("SELECT 1/0"));
    // Each simple query and the Sync end with a ReadyForQuery.
    (script, 3)
}

/// Logs in on `stream`, runs the script and returns every message the server sent after the
/// login, up to the script's last ReadyForQuery, re-encoded byte for byte.
async fn run_byte_exact_script(mut stream: TcpStream, user: &str, db: &str) -> Vec<u8> {
    raw::login(&mut stream, user, db).await;
    let (script, ready_for_queries) = byte_exact_script();
    stream.write_all(&script).await.expect("send the script");
    let mut received = Vec::new();
    let mut ready = 0;
    while ready < ready_for_queries {
        let m = raw::read_message(&mut stream, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("answer {ready} of {ready_for_queries} never came"));
        ready += usize::from(m.tag == b'Z');
        received.extend(raw::message(m.tag, &m.body));
    }
    stream
        .write_all(&raw::terminate())
        .await
        .expect("terminate");
    received
}

#[tokio::test]
async fn server_bytes_match_a_direct_connection_byte_for_byte() {
    let cluster = TestCluster::shared();
    let db = cluster.create_database("fwd_bytes").await;
    let proxy = TestProxy::start(cluster).await;
    let su = cluster.superuser();
    let direct_socket = TcpStream::connect((cluster.host(), cluster.port()))
        .await
        .expect("direct connection");
    let direct = run_byte_exact_script(direct_socket, su, &db).await;
    let proxied_socket = TcpStream::connect(proxy.addr).await.expect("proxy");
    let proxied = run_byte_exact_script(proxied_socket, su, &db).await;

    // The script did what it says: rows with NULLs, the error, three ReadyForQuery.
    let tags: Vec<u8> = messages(&direct).map(|(tag, _)| tag).collect();
    assert_eq!(tags.iter().filter(|&&t| t == b'D').count(), 120 + 60);
    assert_eq!(tags.iter().filter(|&&t| t == b'Z').count(), 3);
    let (_, error) = messages(&direct)
        .find(|(tag, _)| *tag == b'E')
        .expect("an error");
    assert!(
        error.windows(6).any(|w| w == b"C22012"),
        "{}",
        String::from_utf8_lossy(error)
    );
    assert_eq!(proxied.len(), direct.len(), "byte counts differ");
    if let Some(at) = direct.iter().zip(&proxied).position(|(d, p)| d != p) {
        panic!(
            "streams differ from byte {at}: direct {:?}, proxied {:?}",
            &direct[at..(at + 32).min(direct.len())],
            &proxied[at..(at + 32).min(proxied.len())]
        );
    }
}

/// (tag, body) of each message in an encoded server stream.
fn messages(stream: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = stream;
    std::iter::from_fn(move || {
        let (&tag, after_tag) = rest.split_first()?;
        let len = u32::from_be_bytes(after_tag.get(..4)?.try_into().ok()?) as usize;
        let body = after_tag.get(4..len)?;
        rest = &after_tag[len..];
        Some((tag, body))
    })
}
