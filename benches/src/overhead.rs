//! Section 1: what a proxy costs, measured with pgbench side by side with a direct connection.
//!
//! Targets are interleaved (every mode runs against every target before the next repetition,
//! and the order of targets rotates between repetitions) so drifts of the machine — caches,
//! table bloat from tpcb-like, a noisy neighbour — fall on all of them alike. Each figure is
//! the median of the repetitions.

use std::path::Path;
use std::time::Duration;

use crate::pgbench::{Mode, Pgbench, RunResult, Target};
use crate::report::{median, num, Table};

/// How the pgbench runs are shaped.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub duration: Duration,
    pub repetitions: u32,
    pub clients: u32,
    pub threads: u32,
}

/// The medians of one (mode, target) pair over the repetitions.
#[derive(Debug, Clone)]
pub struct Cell {
    pub mode: &'static str,
    pub target: &'static str,
    pub runs: Vec<RunResult>,
}

impl Cell {
    pub fn tps(&self) -> f64 {
        median(&self.runs.iter().map(|r| r.tps).collect::<Vec<_>>())
    }

    fn avg_ms(&self) -> f64 {
        median(
            &self
                .runs
                .iter()
                .map(|r| r.avg_latency_ms)
                .collect::<Vec<_>>(),
        )
    }

    fn p99_ms(&self) -> f64 {
        median(
            &self
                .runs
                .iter()
                .map(|r| r.p99_latency_ms)
                .collect::<Vec<_>>(),
        )
    }

    /// Median CPU time the proxy spent per transaction, in µs; `None` for direct.
    pub fn proxy_cpu_us(&self) -> Option<f64> {
        let values: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|r| r.proxy_cpu_us_per_tx)
            .collect();
        (!values.is_empty()).then(|| median(&values))
    }

    fn tps_range(&self) -> String {
        let min = self
            .runs
            .iter()
            .map(|r| r.tps)
            .fold(f64::INFINITY, f64::min);
        let max = self.runs.iter().map(|r| r.tps).fold(0.0, f64::max);
        format!("{}–{}", num(min), num(max))
    }
}

/// Runs every mode against every target `plan.repetitions` times. Progress goes to stderr.
pub fn measure(
    pgbench: &Pgbench,
    targets: &[Target],
    modes: &[Mode],
    plan: Plan,
    log_dir: &Path,
) -> anyhow::Result<Vec<Cell>> {
    let mut cells: Vec<Cell> = modes
        .iter()
        .flat_map(|mode| {
            targets.iter().map(|target| Cell {
                mode: mode.label,
                target: target.name,
                runs: Vec::new(),
            })
        })
        .collect();
    for rep in 0..plan.repetitions {
        for (m, mode) in modes.iter().enumerate() {
            for k in 0..targets.len() {
                let t = (k + rep as usize) % targets.len();
                let target = &targets[t];
                let result = pgbench.run(
                    target,
                    mode,
                    plan.duration,
                    plan.clients,
                    plan.threads,
                    log_dir,
                )?;
                let cpu = result
                    .proxy_cpu_us_per_tx
                    .map_or(String::new(), |us| format!("  proxy CPU {us:.1} µs/txn"));
                eprintln!(
                    "  rep {}/{} {:<15} {:<10} {:>9.0} tps  avg {:.3} ms  p99 {:.3} ms{cpu}",
                    rep + 1,
                    plan.repetitions,
                    mode.label,
                    target.name,
                    result.tps,
                    result.avg_latency_ms,
                    result.p99_latency_ms
                );
                cells[m * targets.len() + t].runs.push(result);
            }
        }
    }
    Ok(cells)
}

/// The overhead table: one row per (mode, target), with the ratio of TPS to direct.
pub fn table(cells: &[Cell]) -> Table {
    let mut table = Table::new([
        "mode",
        "target",
        "TPS (median)",
        "TPS / direct",
        "avg latency ms",
        "p99 latency ms",
        "TPS min–max",
        "proxy CPU µs/txn",
    ]);
    for cell in cells {
        let direct = cells
            .iter()
            .find(|c| c.mode == cell.mode && c.target == "direct")
            .map_or(f64::NAN, Cell::tps);
        table.row([
            cell.mode.to_owned(),
            cell.target.to_owned(),
            num(cell.tps()),
            format!("{:.2}", cell.tps() / direct),
            format!("{:.3}", cell.avg_ms()),
            format!("{:.3}", cell.p99_ms()),
            cell.tps_range(),
            cell.proxy_cpu_us()
                .map_or("—".to_owned(), |us| format!("{us:.1}")),
        ]);
    }
    table
}

/// lockguard's proxy CPU per transaction divided by PgBouncer's, in one mode: a ratio per
/// repetition, taken between the two runs of that repetition (they ran minutes apart at most,
/// on the same machine state), so a drift of the machine cancels out of each ratio.
#[derive(Debug, Clone)]
pub struct CpuRatio {
    pub mode: &'static str,
    /// Median µs of proxy CPU per transaction (per connection under `-C`).
    pub lockguard_us: f64,
    pub pgbouncer_us: f64,
    /// One ratio per repetition, sorted.
    pub ratios: Vec<f64>,
}

impl CpuRatio {
    pub fn median(&self) -> f64 {
        median(&self.ratios)
    }

    pub fn min(&self) -> f64 {
        self.ratios.first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.ratios.last().copied().unwrap_or(f64::NAN)
    }

    /// True in the modes that open a connection per transaction.
    pub fn per_connection(&self) -> bool {
        self.mode.starts_with("-C")
    }
}

/// The CPU ratios of every mode that ran through both proxies.
pub fn cpu_ratios(cells: &[Cell]) -> Vec<CpuRatio> {
    let mut out = Vec::new();
    for cell in cells.iter().filter(|c| c.target == "lockguard") {
        let Some(pgbouncer) = cells
            .iter()
            .find(|c| c.mode == cell.mode && c.target == "pgbouncer")
        else {
            continue;
        };
        // The runs of a cell are in repetition order, so equal indexes ran in the same one.
        let mut ratios: Vec<f64> = cell
            .runs
            .iter()
            .zip(&pgbouncer.runs)
            .filter_map(|(l, p)| Some(l.proxy_cpu_us_per_tx? / p.proxy_cpu_us_per_tx?))
            .filter(|r| r.is_finite())
            .collect();
        ratios.sort_by(f64::total_cmp);
        let (Some(lockguard_us), Some(pgbouncer_us)) =
            (cell.proxy_cpu_us(), pgbouncer.proxy_cpu_us())
        else {
            continue;
        };
        out.push(CpuRatio {
            mode: cell.mode,
            lockguard_us,
            pgbouncer_us,
            ratios,
        });
    }
    out
}

/// The table of [`cpu_ratios`]: per mode, each proxy's CPU per transaction (per connection
/// under `-C`) and lockguard's ratio to PgBouncer's with its spread over the repetitions.
pub fn cpu_ratio_table(ratios: &[CpuRatio]) -> Table {
    let mut table = Table::new([
        "mode",
        "per",
        "lockguard CPU µs",
        "PgBouncer CPU µs",
        "lockguard / PgBouncer (median)",
        "min–max over repetitions",
    ]);
    for r in ratios {
        table.row([
            r.mode.to_owned(),
            if r.per_connection() {
                "connection".to_owned()
            } else {
                "transaction".to_owned()
            },
            format!("{:.1}", r.lockguard_us),
            format!("{:.1}", r.pgbouncer_us),
            format!("{:.2}", r.median()),
            format!("{:.2}–{:.2}", r.min(), r.max()),
        ]);
    }
    table
}
