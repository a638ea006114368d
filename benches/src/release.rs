//! Section 2: how long a waiter stays blocked behind an orphaned lock.
//!
//! The incident, reproduced with real sockets: session A (through lockguard) opens a
//! transaction and locks a row of the protected table; session B (direct) tries to update that
//! row and waits; then A's client vanishes — its TCP socket is shut down by the benchmark, as
//! when the application process dies — without a Terminate. The figure is the time from that
//! shutdown to B's UPDATE returning.
//!
//! Variants:
//! - A idle in its transaction when it vanishes (the common crash), through lockguard and, for
//!   comparison, directly (PostgreSQL then rolls back on EOF by itself);
//! - A busy in a statement when it vanishes: PostgreSQL notices the dead client only when the
//!   statement ends; lockguard waits `inflight_grace`, then terminates;
//! - A alive but idle in transaction past `idle_in_transaction_timeout`: measured from the
//!   moment the timeout expires (A's last ReadyForQuery plus the timeout) to B's success.

use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{Client, Config, NoTls, SimpleQueryMessage};

use crate::report::{Spread, Table};

/// How long a waiter may stay blocked before the iteration counts as "not released" and the
/// benchmark frees it itself.
const RELEASE_CAP: Duration = Duration::from_secs(5);
/// How long B may take to start waiting on A's lock.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Polling interval while waiting for B to block or A to be busy.
const POLL: Duration = Duration::from_millis(1);

/// Where the sessions connect and what they lock.
#[derive(Debug, Clone)]
pub struct Setup {
    pub pg_port: u16,
    pub proxy_port: u16,
    pub user: String,
    pub dbname: String,
    /// `schema.table` with an `id int` primary key and a `last_seen timestamptz` column, rows
    /// 1..=1000.
    pub table: String,
}

/// What the lockguard under test was configured with.
#[derive(Debug, Clone, Copy)]
pub struct GuardTimings {
    pub idle_in_transaction_timeout: Duration,
    pub sweep_interval: Duration,
    pub inflight_grace: Duration,
}

/// How many times each variant runs.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub iterations: usize,
    pub busy_iterations: usize,
    /// Concurrent lanes (each with its own row) for the idle-timeout variant, which otherwise
    /// takes `timeout + sweep` per iteration.
    pub idle_lanes: usize,
    /// Length of A's statement in the busy variant.
    pub busy_statement: Duration,
}

/// The samples of one variant.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub scenario: &'static str,
    pub through: &'static str,
    pub target_ms: Option<f64>,
    pub samples: Vec<Duration>,
    pub not_released: usize,
}

/// Runs all variants and returns their outcomes in table order. Progress goes to stderr.
pub async fn measure(
    setup: &Setup,
    guard: GuardTimings,
    plan: Plan,
) -> anyhow::Result<Vec<Outcome>> {
    let admin = Arc::new(connect(setup, setup.pg_port).await?);
    let bench = Bench {
        setup: setup.clone(),
        admin,
    };
    let mut outcomes = Vec::new();

    let vanish_target = Some(100.0);
    for (through, port, iterations, target) in [
        (
            "lockguard",
            setup.proxy_port,
            plan.iterations,
            vanish_target,
        ),
        ("direct", setup.pg_port, plan.iterations, None),
    ] {
        let mut outcome = Outcome::new("client vanishes, idle in transaction", through, target);
        for i in 0..iterations {
            outcome.add(bench.vanish(port, 1 + i % 100, None).await?);
        }
        eprintln!("  {outcome}");
        outcomes.push(outcome);
    }

    let busy = format!(
        "client vanishes during a {} statement",
        humantime::format_duration(plan.busy_statement)
    );
    let busy: &'static str = Box::leak(busy.into_boxed_str());
    let grace_target = guard.inflight_grace.as_secs_f64() * 1e3 + 100.0;
    for (through, port, iterations, target) in [
        (
            "lockguard",
            setup.proxy_port,
            plan.busy_iterations,
            Some(grace_target),
        ),
        ("direct", setup.pg_port, plan.busy_iterations.min(3), None),
    ] {
        let mut outcome = Outcome::new(busy, through, target);
        for i in 0..iterations {
            outcome.add(
                bench
                    .vanish(port, 101 + i % 100, Some(plan.busy_statement))
                    .await?,
            );
        }
        eprintln!("  {outcome}");
        outcomes.push(outcome);
    }

    let idle_target = guard.sweep_interval.as_secs_f64() * 1e3 + 100.0;
    let mut outcome = Outcome::new(
        "idle in transaction past the timeout (from expiry)",
        "lockguard",
        Some(idle_target),
    );
    let lanes = plan.idle_lanes.clamp(1, plan.iterations.max(1));
    let mut tasks: Vec<JoinHandle<anyhow::Result<Vec<Option<Duration>>>>> = Vec::new();
    for lane in 0..lanes {
        let bench = bench.clone();
        let count = plan.iterations / lanes + usize::from(lane < plan.iterations % lanes);
        let stagger = guard.sweep_interval.mul_f64(lane as f64 / lanes as f64);
        let timeout = guard.idle_in_transaction_timeout;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(stagger).await;
            let mut samples = Vec::new();
            for _ in 0..count {
                samples.push(bench.idle_timeout(201 + lane, timeout).await?);
            }
            Ok(samples)
        }));
    }
    for task in tasks {
        for sample in task.await.context("idle-timeout lane panicked")?? {
            outcome.add(sample);
        }
    }
    eprintln!("  {outcome}");
    outcomes.push(outcome);
    Ok(outcomes)
}

/// The time-to-release table.
pub fn table(outcomes: &[Outcome]) -> Table {
    let mut table = Table::new([
        "scenario",
        "through",
        "n",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "not released in 5 s",
        "target",
    ]);
    for o in outcomes {
        let s = Spread::of(&o.samples);
        let ms = |v: f64| {
            if v.is_nan() {
                "—".to_owned()
            } else {
                format!("{v:.1}")
            }
        };
        table.row([
            o.scenario.to_owned(),
            o.through.to_owned(),
            (o.samples.len() + o.not_released).to_string(),
            ms(s.p50),
            ms(s.p95),
            ms(s.p99),
            ms(s.max),
            o.not_released.to_string(),
            o.target_ms
                .map_or("—".to_owned(), |t| format!("p99 ≤ {t:.0} ms")),
        ]);
    }
    table
}

impl Outcome {
    fn new(scenario: &'static str, through: &'static str, target_ms: Option<f64>) -> Outcome {
        Outcome {
            scenario,
            through,
            target_ms,
            samples: Vec::new(),
            not_released: 0,
        }
    }

    fn add(&mut self, sample: Option<Duration>) {
        match sample {
            Some(d) => self.samples.push(d),
            None => self.not_released += 1,
        }
    }

    /// Whether the p99 target (if any) is met and nothing stayed blocked.
    pub fn meets_target(&self) -> Option<bool> {
        let target = self.target_ms?;
        Some(self.not_released == 0 && Spread::of(&self.samples).p99 <= target)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = Spread::of(&self.samples);
        write!(
            f,
            "{} via {}: n={} p50 {:.1} ms p95 {:.1} ms max {:.1} ms, not released {}",
            self.scenario,
            self.through,
            self.samples.len() + self.not_released,
            s.p50,
            s.p95,
            s.max,
            self.not_released
        )
    }
}

/// What every iteration needs; cheap to clone into lanes.
#[derive(Clone)]
struct Bench {
    setup: Setup,
    admin: Arc<Client>,
}

/// Session A: a client whose socket the benchmark can shut down at a moment of its choosing.
struct Holder {
    client: Client,
    connection: JoinHandle<()>,
    /// A second handle on A's socket, to shut it down like a dying process would.
    socket: std::net::TcpStream,
    pid: i32,
}

impl Holder {
    /// Connects through `port`, begins a transaction and locks `row`.
    async fn lock_row(bench: &Bench, port: u16, row: usize) -> anyhow::Result<Holder> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let std_stream = stream.into_std()?;
        let socket = std_stream.try_clone()?;
        let stream = tokio::net::TcpStream::from_std(std_stream)?;
        let (client, connection) = bench
            .config()
            .connect_raw(stream, NoTls)
            .await
            .context("session A: connecting")?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let sql = format!(
            "BEGIN; SELECT pg_backend_pid() FROM {} WHERE id = {row} FOR UPDATE",
            bench.setup.table
        );
        let pid = first_value(
            &client
                .simple_query(&sql)
                .await
                .context("session A: locking")?,
        )?
        .parse()?;
        Ok(Holder {
            client,
            connection,
            socket,
            pid,
        })
    }

    /// The client process dies: its socket closes without a Terminate message.
    fn vanish(self) {
        let _ = self.socket.shutdown(Shutdown::Both);
        self.connection.abort();
        drop(self.client);
    }
}

impl Bench {
    fn config(&self) -> Config {
        let mut config = Config::new();
        config
            .user(&self.setup.user)
            .dbname(&self.setup.dbname)
            .application_name("lockguard-bench");
        config
    }

    /// One iteration of "A vanishes while B waits"; `busy` makes A run `pg_sleep` first.
    async fn vanish(
        &self,
        port: u16,
        row: usize,
        busy: Option<Duration>,
    ) -> anyhow::Result<Option<Duration>> {
        let holder = Holder::lock_row(self, port, row).await?;
        let waiter = Waiter::start(self, row).await?;
        if let Some(length) = busy {
            let sql = format!("SELECT pg_sleep({})", length.as_secs_f64());
            let client = &holder.client;
            let sleep = client.simple_query(&sql);
            // Drive the query far enough to be sent, then leave it running on the server.
            tokio::select! {
                _ = sleep => bail!("session A's pg_sleep ended before it vanished"),
                ready = self.wait_active(holder.pid) => ready?,
            }
        }
        self.wait_blocked(waiter.pid, holder.pid).await?;
        let a_pid = holder.pid;
        let dropped = Instant::now();
        holder.vanish();
        self.finish(waiter, a_pid, dropped).await
    }

    /// One iteration of the idle-in-transaction rule: A stays connected and idle.
    async fn idle_timeout(
        &self,
        row: usize,
        timeout: Duration,
    ) -> anyhow::Result<Option<Duration>> {
        let holder = Holder::lock_row(self, self.setup.proxy_port, row).await?;
        let expiry = Instant::now() + timeout;
        let waiter = Waiter::start(self, row).await?;
        self.wait_blocked(waiter.pid, holder.pid).await?;
        let a_pid = holder.pid;
        let released = self.finish(waiter, a_pid, expiry).await;
        holder.vanish();
        released
    }

    /// Waits for B's UPDATE (up to [`RELEASE_CAP`] after `from`), returning its delay from
    /// `from`; if it stays blocked, terminates A's backend itself and returns `None`.
    async fn finish(
        &self,
        waiter: Waiter,
        a_pid: i32,
        from: Instant,
    ) -> anyhow::Result<Option<Duration>> {
        let Waiter { mut done, .. } = waiter;
        match tokio::time::timeout_at(from + RELEASE_CAP, &mut done).await {
            Ok(finished) => {
                let at = finished.context("session B's task panicked")??;
                Ok(Some(at.saturating_duration_since(from)))
            }
            Err(_) => {
                self.admin
                    .execute("SELECT pg_terminate_backend($1)", &[&a_pid])
                    .await?;
                done.await.context("session B's task panicked")??;
                Ok(None)
            }
        }
    }

    /// Waits until `waiter` is blocked by `holder`.
    async fn wait_blocked(&self, waiter: i32, holder: i32) -> anyhow::Result<()> {
        self.poll_until(
            "SELECT $2::int4 = ANY(pg_blocking_pids($1::int4))",
            waiter,
            holder,
            "session B to wait on session A's lock",
        )
        .await
    }

    /// Waits until backend `pid` runs a statement.
    async fn wait_active(&self, pid: i32) -> anyhow::Result<()> {
        self.poll_until(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1::int4 AND state = 'active' AND $2::int4 = $2::int4)",
            pid,
            pid,
            "session A's statement to start",
        )
        .await
    }

    async fn poll_until(&self, sql: &str, a: i32, b: i32, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let statement = self.admin.prepare(sql).await?;
        loop {
            let row = self.admin.query_one(&statement, &[&a, &b]).await?;
            if row.get::<_, bool>(0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Session B: a direct connection whose UPDATE waits on A's row; `done` resolves at the
/// instant the UPDATE returned.
struct Waiter {
    pid: i32,
    done: JoinHandle<anyhow::Result<Instant>>,
}

impl Waiter {
    async fn start(bench: &Bench, row: usize) -> anyhow::Result<Waiter> {
        let client = connect(&bench.setup, bench.setup.pg_port).await?;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        let sql = format!(
            "UPDATE {} SET last_seen = now() WHERE id = {row}",
            bench.setup.table
        );
        let done = tokio::spawn(async move {
            client
                .batch_execute(&sql)
                .await
                .context("session B's UPDATE")?;
            Ok(Instant::now())
        });
        Ok(Waiter { pid, done })
    }
}

/// A plain connection on `port` to the benchmark database.
async fn connect(setup: &Setup, port: u16) -> anyhow::Result<Client> {
    let mut config = Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(&setup.user)
        .dbname(&setup.dbname)
        .application_name("lockguard-bench");
    let (client, connection) = config
        .connect(NoTls)
        .await
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn first_value(messages: &[SimpleQueryMessage]) -> anyhow::Result<&str> {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        })
        .context("the query returned no row")
}
