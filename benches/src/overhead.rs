//! Section 1: what a proxy costs, measured with pgbench side by side with a direct connection.
//!
//! Targets are interleaved (every mode runs against every target before the next repetition)
//! so drifts of the machine — caches, table bloat from tpcb-like, a noisy neighbour — fall on
//! all of them alike. The order runs forward in even repetitions and backward in odd ones:
//! lockguard and PgBouncer (its first run) always run back to back, each first half of the time
//! (with an even number of repetitions), so the per-repetition ratio of one to the other
//! compares runs seconds apart. Each figure is the median of the repetitions.
//!
//! PgBouncer runs a second time in each repetition, right after (or, backward, right before)
//! its first run: the ratio of those two runs is what this machine's noise alone does to a
//! comparison of two proxies within a repetition, and "lockguard below PgBouncer" is judged
//! against it (see [`Paired::tps_below`]).

use std::path::Path;
use std::time::Duration;

use crate::pgbench::{Mode, Pgbench, RunResult, Target};
use crate::report::{median, num, rank_sum_p_below, rank_sum_smallest_p, Table};

/// The target name of PgBouncer's second run in each repetition; it must come right after
/// `pgbouncer` in the target list, so the two runs are back to back like lockguard's and
/// PgBouncer's.
pub const PGBOUNCER_AGAIN: &str = "pgbouncer again";

/// The one-sided rank-sum p-value below which lockguard's ratios to PgBouncer count as below
/// PgBouncer's ratios to itself.
pub const BELOW_P: f64 = 0.05;

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
    /// The median over the runs of a figure, from the runs that have it; `None` if none does.
    pub fn median_of(&self, figure: impl Fn(&RunResult) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.runs.iter().filter_map(figure).collect();
        (!values.is_empty()).then(|| median(&values))
    }

    pub fn tps(&self) -> f64 {
        self.median_of(|r| Some(r.tps)).unwrap_or(f64::NAN)
    }

    fn avg_ms(&self) -> f64 {
        self.median_of(|r| Some(r.avg_latency_ms))
            .unwrap_or(f64::NAN)
    }

    fn p99_ms(&self) -> f64 {
        self.median_of(|r| Some(r.p99_latency_ms))
            .unwrap_or(f64::NAN)
    }

    /// Median CPU time the proxy spent per transaction, in µs; `None` for direct.
    pub fn proxy_cpu_us(&self) -> Option<f64> {
        self.median_of(|r| r.proxy_cpu_us_per_tx)
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
                let t = if rep % 2 == 0 {
                    k
                } else {
                    targets.len() - 1 - k
                };
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

/// lockguard's figure divided by PgBouncer's, in one mode: a ratio per repetition, taken
/// between the two runs of that repetition (they ran minutes apart at most, on the same machine
/// state), so a drift of the machine cancels out of each ratio. Comparing TPS this way is the
/// same as comparing the two proxies' TPS / direct within a repetition: direct cancels out.
#[derive(Debug, Clone)]
pub struct Paired {
    pub mode: &'static str,
    /// Medians over the repetitions: µs of proxy CPU per transaction (per connection under
    /// `-C`), or TPS.
    pub lockguard: f64,
    pub pgbouncer: f64,
    /// One ratio per repetition, sorted.
    pub ratios: Vec<f64>,
    /// PgBouncer's second run over its first, per repetition, sorted: the same comparison with
    /// nothing changed. Empty when PgBouncer ran once.
    pub itself: Vec<f64>,
}

impl Paired {
    pub fn median(&self) -> f64 {
        median(&self.ratios)
    }

    pub fn min(&self) -> f64 {
        self.ratios.first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.ratios.last().copied().unwrap_or(f64::NAN)
    }

    /// The one-sided p-value that lockguard's ratios lie below PgBouncer's ratios to itself
    /// (NaN without the second PgBouncer run).
    pub fn below_itself_p(&self) -> f64 {
        rank_sum_p_below(&self.ratios, &self.itself)
    }

    /// Whether lockguard's TPS is below PgBouncer's by more than the machine's noise: its
    /// ratios rank below PgBouncer's ratios to itself (p ≤ [`BELOW_P`]). A median under 1.0
    /// alone is a coin toss between two equal proxies here: PgBouncer against itself moves
    /// ±10 % on `-S` from one repetition to the next. This says "below" only on evidence, and
    /// with few repetitions it needs a large gap: with 3, each of lockguard's ratios under each
    /// of PgBouncer's to itself. Without the second run, or with too few repetitions for the
    /// test to ever reach [`BELOW_P`] (1 or 2), the median decides.
    pub fn tps_below(&self) -> bool {
        let testable = !self.itself.is_empty()
            && rank_sum_smallest_p(self.ratios.len(), self.itself.len()) <= BELOW_P;
        if testable {
            self.below_itself_p() <= BELOW_P
        } else {
            self.median() < 1.0
        }
    }

    /// The median of PgBouncer's ratios to itself (NaN without the second run).
    pub fn itself_median(&self) -> f64 {
        median(&self.itself)
    }

    /// True in the modes that open a connection per transaction.
    pub fn per_connection(&self) -> bool {
        self.mode.starts_with("-C")
    }
}

/// lockguard's proxy CPU over PgBouncer's, per mode that ran through both proxies.
pub fn cpu_ratios(cells: &[Cell]) -> Vec<Paired> {
    paired(cells, |r| r.proxy_cpu_us_per_tx)
}

/// lockguard's TPS over PgBouncer's, per mode that ran through both proxies.
pub fn tps_ratios(cells: &[Cell]) -> Vec<Paired> {
    paired(cells, |r| Some(r.tps))
}

fn paired(cells: &[Cell], figure: fn(&RunResult) -> Option<f64>) -> Vec<Paired> {
    let mut out = Vec::new();
    for cell in cells.iter().filter(|c| c.target == "lockguard") {
        let Some(pgbouncer) = cells
            .iter()
            .find(|c| c.mode == cell.mode && c.target == "pgbouncer")
        else {
            continue;
        };
        // The runs of a cell are in repetition order, so equal indexes ran in the same one.
        let per_repetition = |over: &Cell| {
            let mut ratios: Vec<f64> = over
                .runs
                .iter()
                .zip(&pgbouncer.runs)
                .filter_map(|(l, p)| Some(figure(l)? / figure(p)?))
                .filter(|r| r.is_finite())
                .collect();
            ratios.sort_by(f64::total_cmp);
            ratios
        };
        let ratios = per_repetition(cell);
        let itself = cells
            .iter()
            .find(|c| c.mode == cell.mode && c.target == PGBOUNCER_AGAIN)
            .map_or_else(Vec::new, per_repetition);
        let (Some(lockguard), Some(pgbouncer)) =
            (cell.median_of(figure), pgbouncer.median_of(figure))
        else {
            continue;
        };
        out.push(Paired {
            mode: cell.mode,
            lockguard,
            pgbouncer,
            ratios,
            itself,
        });
    }
    out
}

/// The table of [`cpu_ratios`]: per mode, each proxy's CPU per transaction (per connection
/// under `-C`) and lockguard's ratio to PgBouncer's with its spread over the repetitions.
pub fn cpu_ratio_table(ratios: &[Paired]) -> Table {
    let mut table = Table::new([
        "mode",
        "per",
        "lockguard CPU µs",
        "PgBouncer CPU µs",
        "lockguard / PgBouncer (median)",
        "min–max over repetitions",
        "PgBouncer / itself median (min–max)",
    ]);
    for r in ratios {
        table.row([
            r.mode.to_owned(),
            if r.per_connection() {
                "connection".to_owned()
            } else {
                "transaction".to_owned()
            },
            format!("{:.1}", r.lockguard),
            format!("{:.1}", r.pgbouncer),
            format!("{:.2}", r.median()),
            format!("{:.2}–{:.2}", r.min(), r.max()),
            itself_spread(r, 2),
        ]);
    }
    table
}

/// PgBouncer's ratios to itself, median (min–max), with `decimals`; "–" when it ran once.
pub fn itself_spread(r: &Paired, decimals: usize) -> String {
    match (r.itself.first(), r.itself.last()) {
        (Some(min), Some(max)) => format!(
            "{:.decimals$} ({min:.decimals$}–{max:.decimals$})",
            r.itself_median()
        ),
        _ => "–".to_owned(),
    }
}

/// The table of [`tps_ratios`]: per mode, each proxy's median TPS and lockguard's TPS over
/// PgBouncer's with its spread over the repetitions (`-C` left out: PgBouncer skips the
/// backend start there, so its TPS is not comparable).
pub fn tps_ratio_table(ratios: &[Paired]) -> Table {
    let mut table = Table::new([
        "mode",
        "lockguard TPS",
        "PgBouncer TPS",
        "lockguard / PgBouncer (median)",
        "min–max over repetitions",
        "repetitions lockguard ahead",
        "PgBouncer / itself median (min–max)",
        "p (lockguard below it)",
    ]);
    for r in ratios.iter().filter(|r| !r.per_connection()) {
        table.row([
            r.mode.to_owned(),
            num(r.lockguard),
            num(r.pgbouncer),
            format!("{:.3}", r.median()),
            format!("{:.3}–{:.3}", r.min(), r.max()),
            format!(
                "{} of {}",
                r.ratios.iter().filter(|x| **x >= 1.0).count(),
                r.ratios.len()
            ),
            itself_spread(r, 3),
            if r.itself.is_empty() {
                "–".to_owned()
            } else {
                format!("{:.3}", r.below_itself_p())
            },
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tps: f64, cpu: Option<f64>) -> RunResult {
        RunResult {
            tps,
            avg_latency_ms: 1.0,
            p99_latency_ms: 1.0,
            transactions: 1,
            proxy_cpu_us_per_tx: cpu,
        }
    }

    fn cell(target: &'static str, runs: Vec<RunResult>) -> Cell {
        Cell {
            mode: "-S",
            target,
            runs,
        }
    }

    #[test]
    fn ratios_pair_the_runs_of_one_repetition() {
        let cells = [
            cell("direct", vec![run(200.0, None), run(100.0, None)]),
            // Repetition 2 ran on a slower machine state: both proxies lost half their TPS.
            cell(
                "lockguard",
                vec![run(110.0, Some(9.0)), run(55.0, Some(18.0))],
            ),
            cell(
                "pgbouncer",
                vec![run(100.0, Some(10.0)), run(50.0, Some(20.0))],
            ),
        ];
        let tps = tps_ratios(&cells);
        assert_eq!(tps.len(), 1);
        // Paired, each repetition says 1.1; the medians of the cells alone say 82.5 / 75.
        assert!((tps[0].min() - 1.1).abs() < 1e-9 && (tps[0].max() - 1.1).abs() < 1e-9);
        let cpu = cpu_ratios(&cells);
        assert!((cpu[0].median() - 0.9).abs() < 1e-9);
        assert_eq!((cpu[0].lockguard, cpu[0].pgbouncer), (13.5, 15.0));
    }

    #[test]
    fn lockguard_is_below_only_beyond_pgbouncer_against_itself() {
        let tps = |lockguard: [f64; 3], again: [f64; 3]| {
            let cells = [
                cell("lockguard", lockguard.map(|t| run(t, Some(1.0))).to_vec()),
                cell("pgbouncer", vec![run(100.0, Some(1.0)); 3]),
                cell(PGBOUNCER_AGAIN, again.map(|t| run(t, Some(1.0))).to_vec()),
            ];
            tps_ratios(&cells).remove(0)
        };
        // PgBouncer moves ±10 % against itself; lockguard 3 % under it in every repetition
        // sits inside that: not below.
        let level = tps([97.0, 97.0, 97.0], [90.0, 100.0, 110.0]);
        assert_eq!(level.itself, vec![0.9, 1.0, 1.1]);
        assert!(!level.tps_below(), "p = {}", level.below_itself_p());
        // Each of lockguard's ratios under each of PgBouncer's to itself: below.
        let below = tps([95.0, 96.0, 97.0], [99.0, 100.0, 101.0]);
        assert!(below.tps_below(), "p = {}", below.below_itself_p());
        // Without the second run, the median decides.
        let cells = [
            cell("lockguard", vec![run(97.0, None)]),
            cell("pgbouncer", vec![run(100.0, None)]),
        ];
        let alone = tps_ratios(&cells).remove(0);
        assert!(alone.itself.is_empty() && alone.tps_below());
        // Two repetitions cannot reach p ≤ 0.05 (1 / 6 at best): the median decides too.
        let cells = [
            cell("lockguard", vec![run(97.0, None), run(98.0, None)]),
            cell("pgbouncer", vec![run(100.0, None); 2]),
            cell(PGBOUNCER_AGAIN, vec![run(101.0, None), run(102.0, None)]),
        ];
        let two = tps_ratios(&cells).remove(0);
        assert!(two.below_itself_p() > BELOW_P && two.tps_below());
    }

    #[test]
    fn pgbouncer_against_itself_is_paired_by_repetition() {
        // The first PgBouncer run halves in repetition 2; its second run with it.
        let cells = [
            cell("lockguard", vec![run(100.0, None), run(50.0, None)]),
            cell("pgbouncer", vec![run(100.0, None), run(50.0, None)]),
            cell(PGBOUNCER_AGAIN, vec![run(102.0, None), run(51.0, None)]),
        ];
        let r = tps_ratios(&cells).remove(0);
        assert_eq!(r.itself.len(), 2);
        assert!(
            r.itself.iter().all(|x| (x - 1.02).abs() < 1e-9),
            "{:?}",
            r.itself
        );
    }

    #[test]
    fn no_ratio_without_pgbouncer() {
        let cells = [cell("lockguard", vec![run(110.0, Some(9.0))])];
        assert!(tps_ratios(&cells).is_empty());
        assert!(cpu_ratios(&cells).is_empty());
    }
}
