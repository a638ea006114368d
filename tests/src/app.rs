//! An application session through the proxy on a raw socket: the test sees every message,
//! including the FATAL lockguard sends when it ends the session, and can make the session
//! vanish without a Terminate (drop it), like a crashed process.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::raw::{self, Received};

/// How long one answer may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// A logged-in session and its backend's pid (from BackendKeyData).
pub struct App {
    pub stream: TcpStream,
    pub pid: i32,
}

impl App {
    /// Logs in to `database` as `user` through the proxy at `proxy`. The guard tests use an
    /// ordinary role (`guard_support::app_role`): the guard's role may not signal a
    /// superuser's backend.
    pub async fn connect(proxy: SocketAddr, user: &str, database: &str) -> App {
        let mut stream = TcpStream::connect(proxy).await.expect("connect");
        let login = raw::login(&mut stream, user, database).await;
        let key = login
            .iter()
            .find(|m| m.tag == b'K')
            .expect("BackendKeyData");
        let pid = key
            .body
            .get(..4)
            .and_then(|pid| pid.try_into().ok())
            .map(i32::from_be_bytes)
            .expect("a pid in BackendKeyData");
        App { stream, pid }
    }

    /// Sends `sql` as a simple Query without waiting for the answer.
    pub async fn send(&mut self, sql: &str) {
        self.stream
            .write_all(&raw::query(sql))
            .await
            .expect("send query");
    }

    /// Runs `sql` and reads up to ReadyForQuery; returns the messages.
    pub async fn exec(&mut self, sql: &str) -> Vec<Received> {
        self.send(sql).await;
        let mut seen = Vec::new();
        while let Some(m) = raw::read_message(&mut self.stream, ANSWER_WITHIN).await {
            let done = m.tag == b'Z';
            seen.push(m);
            if done {
                return seen;
            }
        }
        panic!("no ReadyForQuery for {sql:?}: {seen:?}");
    }

    /// Runs `sql`, asserting it did not fail.
    pub async fn exec_ok(&mut self, sql: &str) {
        let reply = self.exec(sql).await;
        if let Some(error) = reply.iter().find(|m| m.tag == b'E') {
            panic!("{sql}: {:?}", error.error_fields());
        }
    }

    /// Holds a row lock on the guard tests' protected table (`app.user_sessions`, made by
    /// `guard_support`) inside an open transaction.
    pub async fn lock_protected_row(&mut self) {
        self.exec_ok("BEGIN").await;
        self.exec_ok("SELECT * FROM app.user_sessions WHERE id = 1 FOR UPDATE")
            .await;
    }

    /// The ErrorResponse the proxy sends when it ends the session unasked: (SQLSTATE,
    /// message).
    pub async fn farewell(&mut self) -> (String, String) {
        let m = raw::read_message(&mut self.stream, ANSWER_WITHIN)
            .await
            .expect("an ErrorResponse before the close");
        assert_eq!(m.tag, b'E', "{m:?}");
        m.error_fields()
    }
}
