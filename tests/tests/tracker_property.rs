//! The transaction tracker against the real server: random client message sequences (simple
//! Query, Parse/Bind/Describe/Execute, Sync, Flush, FunctionCall, COPY IN over both protocols,
//! stray CopyData/CopyDone/CopyFail), pipelined and written in pieces split at random points,
//! go through lockguard to PostgreSQL. After every server message the pump scans, the tracker's
//! state must equal what the server's replies say:
//! - the transaction status is that of the last ReadyForQuery;
//! - a statement is in flight exactly while sync points sent (Query, Sync, FunctionCall; minus
//!   the Syncs the server swallows during COPY IN) outnumber the ReadyForQuery received, or an
//!   Execute has been sent with no answered sync point after it.
//!
//! The pump's own view comes from the proxy's `testing` observer, called as it scans each
//! message, so the check is exact whatever the timing. Which Syncs the server swallows the test
//! knows because, like libpq, it waits for CopyInResponse (or the error) before sending a
//! COPY's data; and it sends a Query or FunctionCall only after a Sync, so none is skipped after
//! an extended-protocol error (see the tracker's known limits). At the end of each sequence the
//! ReadyForQuery count must equal the sync points the model says the server answers: the model
//! is checked against the server too.
//!
//! The seed is printed; `LOCKGUARD_TRACKER_SEED=<n>` replays one run, and
//! `LOCKGUARD_TRACKER_SEQUENCES` changes how many sequences run (default 300).

use std::time::Duration;

use guard_core::TxnStatus;
use lockguard::session::testing::{observe_messages, Observation};
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::guard_support::{self, app_role};
use lockguard_tests::proxy::TestProxy;
use lockguard_tests::raw;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const QUERIES: &[&str] = &[
    "SELECT 1",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SELECT 1/0",
    "SAVEPOINT s",
    "ROLLBACK TO SAVEPOINT s",
    "SELECT 1; SELECT 2",
    "",
    "INSERT INTO t VALUES (7)",
];

const EXTENDED: &[&str] = &[
    "SELECT 1",
    "BEGIN",
    "COMMIT",
    "SELECT 1/0",
    "SELEC oops",
    "INSERT INTO t VALUES (8)",
    "SELECT pg_catalog.pg_sleep(0.001)",
];

/// What the model needs to know of one message the client sent.
#[derive(Debug, Clone, Copy)]
struct Sent {
    tag: u8,
    /// A sync point the server answers with ReadyForQuery.
    answered: bool,
}

/// The client side of one session: what it wrote, and its reader's messages.
struct App {
    write: OwnedWriteHalf,
    replies: UnboundedReceiver<raw::Received>,
    sent: Vec<Sent>,
    /// Sync points sent that the server answers, over the whole session.
    answered: usize,
    ready_seen: usize,
    rng: StdRng,
}

impl App {
    fn note(&mut self, tag: u8, answered: bool) {
        // Only the messages the pump looks at are observed.
        if matches!(tag, b'Q' | b'P' | b'E' | b'S' | b'F' | b'c' | b'f' | b'X') {
            self.sent.push(Sent { tag, answered });
            self.answered += usize::from(answered);
        }
    }

    /// Reads replies until every sync point sent so far is answered.
    async fn catch_up(&mut self) {
        while self.ready_seen < self.answered {
            self.read_until(|m| m.tag == b'Z').await;
        }
    }

    /// Writes `messages` in pieces split at random points.
    async fn write(&mut self, messages: &[(u8, Vec<u8>)]) {
        let bytes: Vec<u8> = messages
            .iter()
            .flat_map(|(t, b)| raw::message(*t, b))
            .collect();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let cut = self.rng.random_range(1..=rest.len());
            let (piece, tail) = rest.split_at(cut);
            self.write.write_all(piece).await.expect("write");
            if self.rng.random_bool(0.3) {
                tokio::task::yield_now().await;
            }
            rest = tail;
        }
    }

    /// Reads replies until `done` says so; counts ReadyForQuery.
    async fn read_until(&mut self, mut done: impl FnMut(&raw::Received) -> bool) -> raw::Received {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.replies.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no reply in time; {} of {} answers; sent {:?}",
                        self.ready_seen, self.answered, self.sent
                    )
                })
                .expect("the connection is open");
            if m.tag == b'Z' {
                self.ready_seen += 1;
            }
            if done(&m) {
                return m;
            }
        }
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn extended(sql: &str) -> Vec<(u8, Vec<u8>)> {
    let mut parse = cstr("");
    parse.extend(cstr(sql));
    parse.extend(0u16.to_be_bytes());
    vec![
        (b'P', parse),
        (b'B', vec![0, 0, 0, 0, 0, 0, 0, 0]),
        (b'D', b"P\0".to_vec()),
        (b'E', vec![0, 0, 0, 0, 0]),
    ]
}

/// One random sequence, ended by a Sync and a Query; returns once all are answered.
async fn run_sequence(app: &mut App) {
    let units = app.rng.random_range(1..12);
    // An extended-protocol batch not yet closed by Sync: a Query or FunctionCall must not follow
    // (the server would skip it after an error in the batch).
    let mut open_batch = false;
    for _ in 0..units {
        let unit = app.rng.random_range(0..8);
        if open_batch && matches!(unit, 0 | 2 | 4 | 5) {
            app.write(&[(b'S', vec![])]).await;
            app.note(b'S', true);
            open_batch = false;
        }
        match unit {
            0 => {
                let sql = QUERIES[app.rng.random_range(0..QUERIES.len())];
                app.write(&[(b'Q', cstr(sql))]).await;
                app.note(b'Q', true);
            }
            1 => {
                let sql = EXTENDED[app.rng.random_range(0..EXTENDED.len())];
                let mut round = extended(sql);
                match app.rng.random_range(0..3) {
                    0 => round.push((b'S', vec![])),
                    1 => round.push((b'H', vec![])),
                    _ => {}
                }
                app.write(&round).await;
                for (tag, _) in &round {
                    app.note(*tag, *tag == b'S');
                }
                open_batch = round.last().is_none_or(|(t, _)| *t != b'S');
            }
            2 => {
                // pg_catalog.now(), or an OID no function has.
                let oid: i32 = if app.rng.random_bool(0.8) { 1299 } else { 0 };
                let mut body = oid.to_be_bytes().to_vec();
                body.extend([0, 0, 0, 0, 0, 0]);
                app.write(&[(b'F', body)]).await;
                app.note(b'F', true);
            }
            3 => {
                app.write(&[(b'S', vec![])]).await;
                app.note(b'S', true);
                open_batch = false;
            }
            4 | 5 => copy_in(app, unit == 5).await,
            6 => {
                app.write(&[(b'H', vec![])]).await;
            }
            _ => {
                // Stray COPY messages outside COPY IN: the server ignores them.
                let (tag, body) = match app.rng.random_range(0..3) {
                    0 => (b'd', b"1\n".to_vec()),
                    1 => (b'c', vec![]),
                    _ => (b'f', cstr("stray")),
                };
                app.write(&[(tag, body)]).await;
                app.note(tag, false);
            }
        }
    }
    // A Sync ends any batch; the closing Query fails harmlessly in a failed transaction.
    app.write(&[(b'S', vec![]), (b'Q', cstr("SELECT 1"))]).await;
    app.note(b'S', true);
    app.note(b'Q', true);
    app.catch_up().await;
}

/// A COPY t FROM STDIN by simple Query or (`extended`) Execute + Sync; waits, as libpq does,
/// for CopyInResponse (or the error) before sending data, Syncs, and CopyDone or CopyFail.
async fn copy_in(app: &mut App, extended_protocol: bool) {
    // The reply that says whether the COPY began must be the COPY's own.
    app.catch_up().await;
    let sync_after_execute = if extended_protocol {
        let mut round = extended("COPY t FROM STDIN");
        round.push((b'S', vec![]));
        app.write(&round).await;
        for (tag, _) in &round {
            if *tag != b'S' {
                app.note(*tag, false);
            }
        }
        Some(())
    } else {
        app.write(&[(b'Q', cstr("COPY t FROM STDIN"))]).await;
        app.note(b'Q', true);
        None
    };
    let reply = app.read_until(|m| m.tag == b'G' || m.tag == b'Z').await;
    let started = reply.tag == b'G';
    if sync_after_execute.is_some() {
        // Swallowed if the server is in COPY IN; answered (ending the error's skip) if not.
        app.note(b'S', !started);
    }
    let mut body = Vec::new();
    for _ in 0..app.rng.random_range(0..4) {
        if app.rng.random_bool(0.5) {
            body.push((b'd', b"1\n".to_vec()));
        } else {
            body.push((b'S', vec![]));
        }
    }
    body.push(if app.rng.random_bool(0.7) {
        (b'c', vec![])
    } else {
        (b'f', cstr("changed my mind"))
    });
    // Now and then, after a CopyDone over the extended protocol, a Parse that fails, and the
    // Sync only once its error is in: the error is a server message while the COPY's Execute
    // still waits for that Sync.
    let failing_parse = extended_protocol
        && body.last().is_some_and(|(tag, _)| *tag == b'c')
        && app.rng.random_bool(0.3);
    if failing_parse {
        let mut parse = cstr("");
        parse.extend(cstr("SELEC oops"));
        parse.extend(0u16.to_be_bytes());
        body.push((b'P', parse));
    }
    app.write(&body).await;
    if failing_parse {
        app.read_until(|m| m.tag == b'E').await;
    }
    if extended_protocol {
        body.push((b'S', vec![]));
        app.write(&body[body.len() - 1..]).await;
    }
    let last = body.len() - 1;
    for (i, (tag, _)) in body.iter().enumerate() {
        // Inside COPY IN every Sync is swallowed; the one after its end is answered.
        let answered = *tag == b'S' && (!started || (extended_protocol && i == last));
        app.note(*tag, answered);
    }
}

/// The model of what the server's replies say, driven by the observed message order.
#[derive(Debug, Default)]
struct Model {
    pending: usize,
    unsynced_execute: bool,
    status: Option<TxnStatus>,
    answered_sent: usize,
    ready_received: usize,
}

impl Model {
    fn client(&mut self, sent: Sent) {
        match sent.tag {
            b'E' => self.unsynced_execute = true,
            b'Q' | b'S' | b'F' if sent.answered => {
                self.pending += 1;
                self.answered_sent += 1;
                self.unsynced_execute = false;
            }
            _ => {}
        }
    }

    fn server(&mut self, o: &Observation) {
        if o.tag == b'Z' {
            assert!(
                self.pending > 0,
                "a ReadyForQuery the model did not expect: {o:?}"
            );
            self.pending -= 1;
            self.ready_received += 1;
            self.status = match o.first_byte {
                Some(b'I') => Some(TxnStatus::Idle),
                Some(b'T') => Some(TxnStatus::InTransaction),
                Some(b'E') => Some(TxnStatus::Failed),
                other => panic!("ReadyForQuery status {other:?}"),
            };
        }
    }

    fn in_flight(&self) -> bool {
        self.pending > 0 || self.unsynced_execute
    }
}

// Long because each random case drives one raw session and compares after every server message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_follows_the_server_through_random_message_sequences() {
    let seed = std::env::var("LOCKGUARD_TRACKER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let sequences: usize = std::env::var("LOCKGUARD_TRACKER_SEQUENCES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    println!("tracker property: seed {seed} (LOCKGUARD_TRACKER_SEED={seed} replays it), {sequences} sequences");

    let (observed, mut observations) = unbounded_channel();
    assert!(observe_messages(move |o| {
        let _ = observed.send(o);
    }));
    let cluster = TestCluster::shared();
    let db = cluster.create_database("tracker").await;
    let owner = guard_support::connect(cluster, &db).await;
    owner
        .batch_execute(&format!(
            "CREATE TABLE t (v int); GRANT INSERT, SELECT ON t TO \"{}\"",
            app_role(cluster)
        ))
        .await
        .expect("create t");
    let proxy = TestProxy::start(cluster).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    // Pieces are written as they come, not held back for an acknowledgement.
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let login = raw::login(&mut stream, app_role(cluster), &db).await;
    let pid = raw::backend_pid(&login);
    let session = proxy.session_of(pid).await.id;

    let (mut read, write) = stream.into_split();
    let (replies_tx, replies) = unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = raw::read_message(&mut read, Duration::from_secs(60)).await {
            if replies_tx.send(m).is_err() {
                break;
            }
        }
    });
    let mut app = App {
        write,
        replies,
        sent: Vec::new(),
        answered: 0,
        ready_seen: 0,
        rng: StdRng::seed_from_u64(seed),
    };
    let mut model = Model {
        status: Some(TxnStatus::Idle),
        ..Model::default()
    };
    // The login's messages were all scanned before its ReadyForQuery reached the client.
    while observations.try_recv().is_ok() {}

    let started = std::time::Instant::now();
    let mut checked = 0usize;
    for n in 0..sequences {
        run_sequence(&mut app).await;
        // Everything the pump scanned is observed before the client receives it.
        let mut sent = std::mem::take(&mut app.sent).into_iter();
        let mut trace = String::new();
        while model.ready_received < app.ready_seen {
            let o = observations
                .try_recv()
                .expect("an observation per scanned message");
            if o.session != session {
                continue;
            }
            trace.push(if o.from_client { '>' } else { '<' });
            trace.push(char::from(o.tag));
            trace.extend(o.first_byte.filter(|_| o.tag == b'Z').map(char::from));
            trace.push(' ');
            if o.from_client {
                let s = sent
                    .next()
                    .unwrap_or_else(|| panic!("seed {seed}: unsent {o:?}"));
                assert_eq!(o.tag, s.tag, "seed {seed}, sequence {n}: message order");
                model.client(s);
                continue;
            }
            model.server(&o);
            checked += 1;
            assert_eq!(
                (o.in_flight, o.record_in_flight, o.status),
                (model.in_flight(), model.in_flight(), model.status),
                "seed {seed}, sequence {n}: after server message {:?}, model {model:?}; \
                 observed: {trace}",
                char::from(o.tag)
            );
        }
        assert!(
            sent.next().is_none(),
            "seed {seed}, sequence {n}: unobserved messages"
        );
        assert_eq!(
            model.answered_sent, model.ready_received,
            "seed {seed}, sequence {n}: every answered sync point got its ReadyForQuery; \
             observed: {trace}"
        );
        assert!(
            !model.in_flight(),
            "seed {seed}, sequence {n}: idle at the end"
        );
    }
    println!(
        "tracker property: {sequences} sequences, {checked} server messages checked in {:?}",
        started.elapsed()
    );
}
