//! The blocking budget's enforcement: a proxied session holds a row of the protected table
//! inside a long statement; a direct session's `UPDATE` of that row waits. The waiter's total
//! wait, from sending its `UPDATE` to its success, is what the budget bounds: target p99 ≤
//! `max_blocking` + `sweep_interval` + 100 ms.
//!
//! lockguard runs in-process here (the harness's `TestProxy`, in the same release build): the
//! budget lives in the guard's sweep, and the rule needs a `[[guard.rules]]` entry the
//! runner's common lockguard process does not have.

use std::time::{Duration, Instant};

use anyhow::Context;
use lockguard_config::Config;
use lockguard_tests::cluster::TestCluster;
use lockguard_tests::proxy::{config_for, TestProxy};
use tokio_postgres::NoTls;

use crate::report::{num, Spread, Table};

/// What one run of the section measures with.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub runs: usize,
    pub max_blocking: Duration,
    pub sweep_interval: Duration,
}

/// The waiters' total waits, one per run.
#[derive(Debug, Clone)]
pub struct Waits {
    pub plan: Plan,
    pub samples: Vec<Duration>,
}

impl Waits {
    /// The budget's promise with the 100 ms margin of the target.
    pub fn target(&self) -> Duration {
        self.plan.max_blocking + self.plan.sweep_interval + Duration::from_millis(100)
    }

    pub fn meets_target(&self) -> bool {
        let p99 = Spread::of(&self.samples).p99;
        p99 <= self.target().as_secs_f64() * 1e3
    }
}

/// Runs the scenario `plan.runs` times on `table` (its row 1 must exist; the column `id` is
/// its key) of `dbname`, the guard logging in as `user` (a superuser may cancel anyone).
pub async fn measure(
    cluster: &TestCluster,
    user: &str,
    dbname: &str,
    table: &str,
    plan: Plan,
) -> anyhow::Result<Waits> {
    let rule = format!(
        "[[guard.rules]]\nname = \"budget\"\ntables = [\"{table}\"]\nmax_blocking = \"{}\"\n",
        humantime::format_duration(plan.max_blocking)
    );
    let mut config = config_for(cluster);
    config.guard.dsn = Some(format!(
        "host={} port={} user={user} dbname=postgres",
        cluster.host(),
        cluster.port()
    ));
    config.guard.sweep_interval = plan.sweep_interval;
    config.guard.idle_in_transaction_timeout = Duration::from_secs(3600);
    config.guard.rules = Config::from_toml_str(&rule)
        .context("the budget rule")?
        .guard
        .rules;
    let proxy = TestProxy::start_with(config).await;
    let (waiter, connection) = cluster.pg_config(user, None, dbname).connect(NoTls).await?;
    tokio::spawn(connection);
    let update = format!("UPDATE {table} SET id = id WHERE id = 1");
    let mut samples = Vec::with_capacity(plan.runs);
    for _ in 0..plan.runs {
        let holder = proxy.connect(user, None, dbname).await?;
        let holder_pid: i32 = holder
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        holder.batch_execute("BEGIN").await?;
        holder.batch_execute(&update).await?;
        // The long statement the budget cancels; its error (57014) is the expected end.
        let sleeping = tokio::spawn(async move {
            let result = holder.batch_execute("SELECT pg_sleep(30)").await;
            (holder, result)
        });
        // The waiter queues once the holder's statement runs, so the budget meets a busy
        // holder (cancelled) rather than one idle in its transaction (terminated).
        loop {
            let running = waiter
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                    &[&holder_pid],
                )
                .await?;
            if running.is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        waiter.execute(update.as_str(), &[]).await?;
        samples.push(started.elapsed());
        let (holder, result) = sleeping.await?;
        anyhow::ensure!(result.is_err(), "the holder's statement was not cancelled");
        holder.batch_execute("ROLLBACK").await?;
    }
    Ok(Waits { plan, samples })
}

/// One row: the waits' spread and the target.
pub fn table(waits: &Waits) -> Table {
    let spread = Spread::of(&waits.samples);
    let mut table = Table::new([
        "runs",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "target p99 ms",
        "met",
    ]);
    table.row([
        spread.count.to_string(),
        num(spread.p50),
        num(spread.p95),
        num(spread.p99),
        num(spread.max),
        num(waits.target().as_secs_f64() * 1e3),
        if waits.meets_target() { "yes" } else { "no" }.to_owned(),
    ]);
    table
}
