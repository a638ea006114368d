//! No allocation per message on the hot path (the data path's rule: buffers reused, nothing
//! allocated per message): once a session is logged in, the pump hands every read to a
//! `FrameScanner` and updates the transaction tracker and the session record from the messages
//! it reports; none of it may allocate, whatever the traffic. A separate test binary, so it can
//! install a counting global allocator.
//! The messages are handled by the pump's own callbacks, `session::on_server_message` and
//! `session::on_client_message`, with the pump's own `session::Tracker`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use guard_core::{ClientInfo, SessionRecord, UpstreamIdentity};
use lockguard::frame::{FrameScanner, Message, CLIENT_INTERESTS, SERVER_INTERESTS};
use lockguard::protocol::{backend, frontend};
use lockguard::session::{on_client_message, on_server_message, Tracker};

/// Counts allocations made by threads that asked for it; everything else (the test harness's
/// other threads) is ignored.
struct CountingAllocator;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note_allocation() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Allocations this thread makes while running `f`.
fn allocations_during<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    let result = f();
    COUNTING.with(|c| c.set(false));
    (ALLOCATIONS.load(Ordering::Relaxed) - before, result)
}

/// Deterministic, so every run scans the same bytes.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn put(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// What the server sends at login, scanned before counting: BackendKeyData is stored once per
/// session (its secret is copied), not per message.
fn login_stream() -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, b'R', &0u32.to_be_bytes());
    let mut status = Vec::new();
    cstr(&mut status, "server_version");
    cstr(&mut status, "15.0");
    put(&mut out, b'S', &status);
    let mut key = 4242i32.to_be_bytes().to_vec();
    key.extend_from_slice(&[7; 32]);
    put(&mut out, backend::BACKEND_KEY_DATA, &key);
    put(&mut out, backend::READY_FOR_QUERY, b"I");
    out
}

/// Query results as PostgreSQL sends them: RowDescription, DataRows (mostly small, NULLs,
/// the odd value of tens of KiB), CommandComplete, ReadyForQuery moving in and out of
/// transactions, and now and then an ErrorResponse. At least `messages` messages.
fn server_stream(messages: usize) -> (Vec<u8>, usize) {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::new();
    let mut count = 0;
    let mut body = Vec::new();
    while count < messages {
        let columns = 1 + rng.below(8) as i16;
        body.clear();
        body.extend_from_slice(&columns.to_be_bytes());
        for c in 0..columns {
            cstr(&mut body, &format!("column_{c}"));
            body.extend_from_slice(&[0, 0, 0x40, 0x01, 0, 1, 0, 0, 0, 25, 0xFF, 0xFF]);
            body.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0]);
        }
        put(&mut out, b'T', &body);
        let rows = match rng.below(10) {
            0..=5 => 1,
            6..=8 => 2 + rng.below(30),
            _ => 50 + rng.below(300),
        };
        for _ in 0..rows {
            body.clear();
            body.extend_from_slice(&columns.to_be_bytes());
            for _ in 0..columns {
                let len: i32 = match rng.below(100) {
                    0..=9 => -1,
                    10..=98 => rng.below(40) as i32,
                    _ => 1000 + rng.below(60_000) as i32,
                };
                body.extend_from_slice(&len.to_be_bytes());
                body.extend((0..len.max(0)).map(|i| b'a' + (i % 26) as u8));
            }
            put(&mut out, b'D', &body);
        }
        count += 1 + rows as usize;
        match rng.below(20) {
            0 => {
                body.clear();
                for (kind, value) in [
                    (b'S', "ERROR"),
                    (b'V', "ERROR"),
                    (b'C', "23505"),
                    (
                        b'M',
                        "duplicate key value violates unique constraint \"t_pkey\"",
                    ),
                    (b'D', "Key (id)=(42) already exists."),
                ] {
                    body.push(kind);
                    cstr(&mut body, value);
                }
                body.push(0);
                put(&mut out, backend::ERROR_RESPONSE, &body);
                put(&mut out, backend::READY_FOR_QUERY, b"E");
            }
            n => {
                put(&mut out, b'C', format!("SELECT {rows}\0").as_bytes());
                let status = if n < 8 { b"I" } else { b"T" };
                put(&mut out, backend::READY_FOR_QUERY, status);
            }
        }
        count += 2;
    }
    (out, count)
}

/// What clients send: simple queries, and extended-protocol rounds (Parse/Bind/Execute/Sync),
/// some with statements longer than the 1 KiB the record keeps. Returns the stream and how
/// many of its messages the client scanner reports (all but Bind).
fn client_stream(messages: usize) -> (Vec<u8>, usize) {
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    let mut out = Vec::new();
    let (mut count, mut reported) = (0, 0);
    let mut body = Vec::new();
    while count < messages {
        let padding = if rng.below(10) == 0 { 2000 } else { 0 };
        let sql = format!(
            "SELECT * FROM t WHERE id = {} /*{}*/",
            rng.below(1_000_000),
            "x".repeat(padding)
        );
        body.clear();
        if rng.below(2) == 0 {
            cstr(&mut body, &sql);
            put(&mut out, frontend::QUERY, &body);
            count += 1;
            reported += 1;
        } else {
            cstr(&mut body, "");
            cstr(&mut body, &sql);
            body.extend_from_slice(&0i16.to_be_bytes());
            put(&mut out, frontend::PARSE, &body);
            put(&mut out, b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
            put(&mut out, frontend::EXECUTE, &[0, 0, 0, 0, 0]);
            put(&mut out, frontend::SYNC, b"");
            count += 4;
            reported += 3;
        }
    }
    (out, reported)
}

/// Read sizes the pump sees: whole 64 KiB buffers, PostgreSQL's 8 KiB sends, and odd sizes
/// that split headers and captured prefixes anywhere.
const PIECES: [usize; 6] = [65_536, 8192, 1500, 333, 17, 5];

/// Feeds `stream` in pieces of the sizes above, in turn; returns the messages reported.
fn feed_in_pieces(
    scanner: &mut FrameScanner,
    stream: &[u8],
    mut on_message: impl FnMut(Message<'_>),
    mut on_read: impl FnMut(usize),
) -> usize {
    let mut reported = 0;
    let mut rest = stream;
    let mut turn = 0;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(PIECES[turn % PIECES.len()].min(rest.len()));
        on_read(piece.len());
        scanner
            .feed(piece, |m| {
                reported += 1;
                on_message(m);
            })
            .expect("the generated stream is valid protocol");
        rest = tail;
        turn += 1;
    }
    reported
}

fn record() -> SessionRecord {
    let client = ClientInfo {
        addr: "127.0.0.1:5000".parse().expect("address"),
        user: "app".into(),
        database: "db".into(),
        application_name: "no_alloc".into(),
    };
    SessionRecord::new(1, client, UpstreamIdentity::Unix)
}

#[test]
fn scanning_and_recording_messages_does_not_allocate() {
    let (server_bytes, server_messages) = server_stream(100_000);
    let (client_bytes, client_reported) = client_stream(20_000);
    let record = record();
    let mut sent_fatal = false;
    let mut server = FrameScanner::new(&SERVER_INTERESTS);
    let mut client = FrameScanner::new(&CLIENT_INTERESTS);

    let tracker = Tracker::new();
    let on_login = |m: Message<'_>| on_server_message(m, &record, &tracker, &mut false);
    feed_in_pieces(&mut server, &login_stream(), on_login, |_| {});
    assert_eq!(record.backend_pid(), Some(4242));
    // One pass over each stream first: a scanner keeps the buffer for a prefix split across
    // two reads once it first needs one, and that is per session, not per message.
    let on_server = |m: Message<'_>| on_server_message(m, &record, &tracker, &mut sent_fatal);
    feed_in_pieces(&mut server, &server_bytes, on_server, |_| {});
    let mut goodbye = None;
    let on_client = |m: Message<'_>| on_client_message(m, &record, &tracker, &mut goodbye);
    feed_in_pieces(&mut client, &client_bytes, on_client, |_| {});

    let (allocations, reported) = allocations_during(|| {
        let server_reported = feed_in_pieces(
            &mut server,
            &server_bytes,
            |m| on_server_message(m, &record, &tracker, &mut sent_fatal),
            |n| record.add_bytes_from_server(n),
        );
        let client_reported = feed_in_pieces(
            &mut client,
            &client_bytes,
            |m| on_client_message(m, &record, &tracker, &mut goodbye),
            |n| record.add_bytes_from_client(n),
        );
        (server_reported, client_reported)
    });

    // The work really happened: every interesting message was reported and the record
    // followed along.
    assert!(server_messages >= 100_000, "{server_messages} generated");
    assert_eq!(reported, (server_reported(&server_bytes), client_reported));
    assert!(!sent_fatal, "the stream has ERRORs only");
    assert_eq!(record.bytes_from_server(), server_bytes.len() as u64);
    assert_eq!(record.bytes_from_client(), client_bytes.len() as u64);
    assert!(record.last_statement().starts_with("SELECT * FROM t"));
    assert_eq!(
        allocations, 0,
        "scanning {server_messages} server messages and {} client messages allocated",
        reported.1
    );
}

/// ReadyForQuery and ErrorResponse messages in `stream`: what the server scanner reports
/// after login.
fn server_reported(stream: &[u8]) -> usize {
    let mut count = 0;
    let mut rest = stream;
    while let Some((&tag, after)) = rest.split_first() {
        let len = u32::from_be_bytes([after[0], after[1], after[2], after[3]]) as usize;
        count += usize::from(tag == backend::READY_FOR_QUERY || tag == backend::ERROR_RESPONSE);
        rest = &after[len..];
    }
    count
}
