//! Section 3: what an idle session costs a proxy in resident memory.
//!
//! The proxy's RSS (`VmRSS`) is read with no client session, then with `sessions` idle ones
//! open (each has authenticated and run its queries, so its buffers have been used), then
//! again after they closed. Kernel socket buffers are not part of RSS and are not counted.
//! Sessions that ran one query stay with lockguard's runtime; after three, lockguard's
//! forwarding thread carries them, and their state lives there.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use tokio_postgres::{Client, Config, NoTls};

use crate::procs::Server;
use crate::report::{num, Table};

/// How many sessions are opened at once while filling the proxy.
const CONNECT_CONCURRENCY: usize = 16;
/// Time for the proxy's tasks to settle before RSS is read.
const SETTLE: Duration = Duration::from_millis(500);

/// RSS of one proxy with 0 and with `sessions` idle sessions.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub proxy: &'static str,
    pub sessions: usize,
    /// Queries each session ran before it went idle.
    pub queries: usize,
    pub idle_kib: u64,
    pub loaded_kib: u64,
    pub after_kib: u64,
}

impl Footprint {
    pub fn per_session_kib(&self) -> f64 {
        (self.loaded_kib as f64 - self.idle_kib as f64) / self.sessions.max(1) as f64
    }
}

/// Opens `sessions` idle sessions through `server` (as `user` on `dbname`), each after
/// `queries` queries, and reads its RSS before, during and after.
pub async fn measure(
    server: &Server,
    user: &str,
    dbname: &str,
    sessions: usize,
    queries: usize,
) -> anyhow::Result<Footprint> {
    let mut config = Config::new();
    config
        .host("127.0.0.1")
        .port(server.port())
        .user(user)
        .dbname(dbname)
        .application_name("lockguard-bench")
        .connect_timeout(Duration::from_secs(30));
    let config = Arc::new(config);

    // One session first, so whatever the proxy sets up lazily on first use is in the baseline.
    drop(open(&config, queries).await?);
    tokio::time::sleep(SETTLE).await;
    let idle_kib = server.rss_kib()?;

    let clients: Vec<Client> = stream::iter(0..sessions)
        .map(|_| open(&config, queries))
        .buffer_unordered(CONNECT_CONCURRENCY)
        .try_collect()
        .await
        .with_context(|| format!("opening {sessions} sessions through {}", server.name()))?;
    tokio::time::sleep(SETTLE).await;
    let loaded_kib = server.rss_kib()?;

    drop(clients);
    tokio::time::sleep(SETTLE * 2).await;
    let after_kib = server.rss_kib()?;
    Ok(Footprint {
        proxy: server.name(),
        sessions,
        queries,
        idle_kib,
        loaded_kib,
        after_kib,
    })
}

/// A session that has authenticated and run `queries` queries.
async fn open(config: &Config, queries: usize) -> anyhow::Result<Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    for _ in 0..queries {
        client.simple_query("SELECT 1").await?;
    }
    Ok(client)
}

/// The memory table.
pub fn table(footprints: &[Footprint]) -> Table {
    let mut table = Table::new([
        "proxy",
        "queries per session",
        "RSS, 0 sessions (KiB)",
        "RSS, N idle sessions (KiB)",
        "N",
        "KiB per session",
        "RSS after they closed (KiB)",
    ]);
    for f in footprints {
        table.row([
            f.proxy.to_owned(),
            f.queries.to_string(),
            f.idle_kib.to_string(),
            f.loaded_kib.to_string(),
            f.sessions.to_string(),
            num(f.per_session_kib()),
            f.after_kib.to_string(),
        ]);
    }
    table
}
