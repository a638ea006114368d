//! Graceful shutdown of the real `lockguard` binary with open transactions:
//! after SIGTERM the listener closes at once, idle sessions are closed, a transaction that is
//! running can still finish within `shutdown_timeout`, the sessions still open after that are
//! closed, the process exits cleanly, and no acknowledged commit is lost.
//!
//! It lives with the binary (not in the `tests` crate) because only a package's own
//! integration tests are given the path of its freshly built binary.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use lockguard_sandbox::{Sandbox, SandboxOptions, SUPERUSER, TRUST_ALL_HBA};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(4);
/// Slack for two loaded CI cores on top of what the proxy promises.
const SLACK: Duration = Duration::from_secs(3);

/// The running binary; killed if the test fails before it exits.
struct Lockguard {
    child: Child,
    addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Lockguard {
    /// Starts `lockguard --config FILE` and waits for it to say where it listens.
    fn start(config: &std::path::Path) -> Lockguard {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lockguard"))
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lockguard");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (listening, addr) = mpsc::channel();
        let collected = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                    if event["message"] == "lockguard is accepting connections" {
                        let _ = listening.send(event["listen"].as_str().map(str::to_owned));
                    }
                }
                collected.lock().expect("logs").push(line);
            }
        });
        let addr = addr
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .flatten()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("lockguard did not report its address: {:?}", logs.lock()));
        Lockguard { child, addr, logs }
    }

    fn sigterm(&self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own, not yet reaped child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    fn logs(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }
}

impl Drop for Lockguard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(
    addr: SocketAddr,
    db: &str,
) -> (
    Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::Config::new()
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(SUPERUSER)
        .dbname(db)
        .connect_timeout(Duration::from_secs(10))
        .connect(NoTls)
        .await
        .expect("connect through lockguard");
    (client, tokio::spawn(connection))
}

async fn insert(client: &Client, who: &str) -> Result<u64, tokio_postgres::Error> {
    client
        .execute("INSERT INTO acks (who) VALUES ($1)", &[&who])
        .await
}

/// The error a session closed by the proxy's shutdown ends with.
fn assert_shutdown_fatal(ended: Result<(), tokio_postgres::Error>, who: &str) {
    let error = ended.expect_err("the connection ends with the proxy's error");
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("{who}: {error:?}"));
    assert_eq!(db.code(), &SqlState::ADMIN_SHUTDOWN, "{who}: {db:?}");
    assert!(db.message().starts_with("lockguard:"), "{who}: {db:?}");
}

// Long because one shutdown is observed from every kind of session at once (busy, idle in a
// transaction, idle, new), which separate tests could not show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_transactions_finish_then_closes_the_rest_and_loses_no_commit() {
    let sandbox = tokio::task::block_in_place(|| {
        Sandbox::start(SandboxOptions {
            temp_prefix: "lockguard-test-",
            pg_hba: TRUST_ALL_HBA,
            settings: &[],
            setup_sql: "CREATE TABLE acks (id serial PRIMARY KEY, who text NOT NULL)",
        })
    })
    .expect("start a throwaway PostgreSQL");
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(
        config.path(),
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:{}\"\n\
             shutdown_timeout = \"{}s\"\n[log]\nformat = \"json\"\n",
            sandbox.port(),
            SHUTDOWN_TIMEOUT.as_secs()
        ),
    )
    .expect("write the config");
    let mut lockguard = Lockguard::start(config.path());
    let addr = lockguard.addr;

    // An idle session; a transaction with a statement running when the signal comes, that
    // then commits; a transaction that never finishes; a client committing in a loop.
    let (idle, idle_connection) = connect(addr, "postgres").await;
    idle.execute("SELECT 1", &[])
        .await
        .expect("idle session works");
    let (finisher, _finisher_connection) = connect(addr, "postgres").await;
    finisher.batch_execute("BEGIN").await.expect("begin");
    insert(&finisher, "finisher").await.expect("insert");
    let (straggler, straggler_connection) = connect(addr, "postgres").await;
    straggler.batch_execute("BEGIN").await.expect("begin");
    insert(&straggler, "straggler").await.expect("insert");
    let (committer, _committer_connection) = connect(addr, "postgres").await;
    let committing = tokio::spawn(async move {
        let mut acknowledged = 0u64;
        while insert(&committer, "committer").await.is_ok() {
            acknowledged += 1;
        }
        acknowledged
    });
    let running = tokio::spawn(async move {
        finisher.execute("SELECT pg_sleep(1.5)", &[]).await?;
        insert(&finisher, "finisher").await?;
        finisher.batch_execute("COMMIT").await?;
        let after = finisher.execute("SELECT 1", &[]).await;
        Ok::<_, tokio_postgres::Error>((Instant::now(), after))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    lockguard.sigterm();
    let signalled = Instant::now();

    // The listener closes at once.
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {}
        }
        assert!(
            signalled.elapsed() < SLACK,
            "still accepting connections {:?} after SIGTERM",
            signalled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The idle session is closed at once, with lockguard's reason.
    let idle_ended = tokio::time::timeout(SLACK, idle_connection)
        .await
        .expect("the idle session is closed at once")
        .expect("join");
    assert_shutdown_fatal(idle_ended, "idle session");

    // The running transaction finishes and commits within shutdown_timeout; then its
    // session is closed too.
    let (committed_at, after) = tokio::time::timeout(SHUTDOWN_TIMEOUT + SLACK, running)
        .await
        .expect("the running transaction finished")
        .expect("join")
        .expect("the running transaction commits during the shutdown");
    assert!(
        committed_at.duration_since(signalled) < SHUTDOWN_TIMEOUT,
        "committed only {:?} after SIGTERM",
        committed_at.duration_since(signalled)
    );
    assert!(
        after.is_err(),
        "the session stays open after its transaction"
    );

    // The transaction that never finishes is closed when shutdown_timeout runs out.
    let straggler_ended = tokio::time::timeout(SHUTDOWN_TIMEOUT + SLACK, straggler_connection)
        .await
        .expect("the open transaction is closed at shutdown_timeout")
        .expect("join");
    let closed_after = signalled.elapsed();
    assert_shutdown_fatal(straggler_ended, "open transaction");
    assert!(
        closed_after >= SHUTDOWN_TIMEOUT - Duration::from_millis(100),
        "the open transaction was closed after {closed_after:?}, before shutdown_timeout"
    );

    // The process exits cleanly.
    let deadline = signalled + SHUTDOWN_TIMEOUT + SLACK * 2;
    let status = loop {
        if let Some(status) = lockguard.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "lockguard still running {:?} after SIGTERM:\n{}",
            signalled.elapsed(),
            lockguard.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit {status:?}:\n{}", lockguard.logs());
    let committer_acknowledged = committing.await.expect("join");

    // No acknowledged commit is lost; the unfinished transaction left nothing.
    let (direct, connection) = sandbox
        .pg_config(SUPERUSER, "postgres")
        .connect(NoTls)
        .await
        .expect("connect directly");
    tokio::spawn(connection);
    let count = |who: &'static str| {
        let direct = &direct;
        async move {
            direct
                .query_one("SELECT count(*) FROM acks WHERE who = $1", &[&who])
                .await
                .expect("count")
                .get::<_, i64>(0)
        }
    };
    assert_eq!(count("finisher").await, 2);
    assert_eq!(count("straggler").await, 0);
    let committed = u64::try_from(count("committer").await).expect("count");
    eprintln!(
        "committer: {committer_acknowledged} commits acknowledged, {committed} rows; shutdown took {:?}",
        signalled.elapsed()
    );
    assert!(committer_acknowledged > 0);
    // A statement sent just as its session was being closed may have committed without the
    // client hearing of it (in doubt, as with any dropped connection): at most one.
    assert!(
        (committer_acknowledged..=committer_acknowledged + 1).contains(&committed),
        "{committer_acknowledged} commits acknowledged but {committed} rows"
    );
}
