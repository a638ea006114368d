//! Running pgbench against one target and reading its results.
//!
//! TPS and the average latency come from pgbench's summary; the p99 latency from its
//! per-transaction logs (`-l`), whose third column is each transaction's elapsed time in
//! microseconds (including the connection set-up under `-C`). For a proxy, the CPU time it
//! used during the run is divided by the transactions: what each one cost it, a figure that a
//! busy machine disturbs far less than throughput.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::report::percentile_sorted;

/// Where pgbench connects: PostgreSQL itself or a proxy in front of it.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: &'static str,
    pub port: u16,
    /// The proxy's process, whose CPU time is measured; `None` for PostgreSQL itself.
    pub proxy_pid: Option<u32>,
}

/// A pgbench workload.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub label: &'static str,
    pub args: &'static [&'static str],
}

/// The workloads of the overhead table, in the order the README's targets table lists them.
pub const MODES: [Mode; 4] = [
    Mode {
        label: "-S",
        args: &["-S"],
    },
    Mode {
        label: "-S -M prepared",
        args: &["-S", "-M", "prepared"],
    },
    Mode {
        label: "tpcb-like",
        args: &[],
    },
    Mode {
        label: "-C -S",
        args: &["-C", "-S"],
    },
];

/// One pgbench run's figures.
#[derive(Debug, Clone, Copy)]
pub struct RunResult {
    pub tps: f64,
    pub avg_latency_ms: f64,
    pub p99_latency_ms: f64,
    pub transactions: u64,
    /// CPU time the proxy used per transaction, in microseconds (`None` for direct).
    pub proxy_cpu_us_per_tx: Option<f64>,
}

/// pgbench and the database it works on.
pub struct Pgbench {
    pub bin: PathBuf,
    pub user: String,
    pub dbname: String,
}

impl Pgbench {
    /// `pgbench -i -s scale` against `port`.
    pub fn init(&self, port: u16, scale: u32) -> anyhow::Result<()> {
        let output = self
            .command(port)
            .args(["-i", "-q", "-s", &scale.to_string()])
            .arg(&self.dbname)
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !output.status.success() {
            bail!(
                "pgbench -i failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Runs `mode` for `duration` against `target` with `clients` clients on `threads`
    /// threads; the per-transaction logs go to a temp dir under `log_dir` and are removed.
    pub fn run(
        &self,
        target: &Target,
        mode: &Mode,
        duration: Duration,
        clients: u32,
        threads: u32,
        log_dir: &Path,
    ) -> anyhow::Result<RunResult> {
        let dir = tempfile::Builder::new()
            .prefix("pgbench-log-")
            .tempdir_in(log_dir)?;
        let prefix = dir.path().join("txn");
        let seconds = duration.as_secs().max(1);
        let proxy_cpu = |pid: Option<u32>| pid.map(crate::procs::cpu_time).transpose();
        let cpu_before = proxy_cpu(target.proxy_pid)?;
        let output = self
            .command(target.port)
            .args(mode.args)
            .args(["-c", &clients.to_string(), "-j", &threads.to_string()])
            .args(["-T", &seconds.to_string()])
            .arg("-l")
            .arg(format!("--log-prefix={}", prefix.display()))
            .arg(&self.dbname)
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        let cpu_after = proxy_cpu(target.proxy_pid)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "pgbench {} against {} failed ({}):\n{}\n{}",
                mode.label,
                target.name,
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let summary = parse_summary(&stdout)
            .with_context(|| format!("reading pgbench's summary:\n{stdout}"))?;
        let mut latencies = read_latencies(dir.path())?;
        latencies.sort_by(f64::total_cmp);
        let transactions = latencies.len() as u64;
        let proxy_cpu_us_per_tx = match (cpu_before, cpu_after) {
            (Some(before), Some(after)) if transactions > 0 => {
                Some(after.saturating_sub(before).as_secs_f64() * 1e6 / transactions as f64)
            }
            _ => None,
        };
        Ok(RunResult {
            tps: summary.tps,
            avg_latency_ms: summary.avg_latency_ms,
            p99_latency_ms: percentile_sorted(&latencies, 99.0),
            transactions,
            proxy_cpu_us_per_tx,
        })
    }

    /// Runs `mode` for `per_client` transactions per client against `target` (no logs, no
    /// figures: the profile section counts what the proxy did meanwhile).
    pub fn run_transactions(
        &self,
        target: &Target,
        mode: &Mode,
        per_client: u32,
        clients: u32,
        threads: u32,
    ) -> anyhow::Result<()> {
        let output = self
            .command(target.port)
            .args(mode.args)
            .args(["-c", &clients.to_string(), "-j", &threads.to_string()])
            .args(["-t", &per_client.to_string()])
            .arg(&self.dbname)
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !output.status.success() {
            bail!(
                "pgbench {} -t {per_client} against {} failed ({}):\n{}",
                mode.label,
                target.name,
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn command(&self, port: u16) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", &self.user])
            .env("PGAPPNAME", "lockguard-bench")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE");
        command
    }
}

struct Summary {
    tps: f64,
    avg_latency_ms: f64,
}

/// Reads `latency average = X ms` and `tps = Y (...)` from pgbench's output.
fn parse_summary(stdout: &str) -> anyhow::Result<Summary> {
    let field = |prefix: &str| -> Option<f64> {
        stdout.lines().find_map(|line| {
            line.trim()
                .strip_prefix(prefix)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    };
    Ok(Summary {
        tps: field("tps = ").context("no `tps = ` line")?,
        avg_latency_ms: field("latency average = ").context("no `latency average = ` line")?,
    })
}

/// Every transaction's latency in ms from the `-l` logs in `dir` (one file per thread).
fn read_latencies(dir: &Path) -> anyhow::Result<Vec<f64>> {
    let mut latencies = Vec::new();
    for entry in fs::read_dir(dir)? {
        let text = fs::read_to_string(entry?.path())?;
        for line in text.lines() {
            // client_id transaction_no time script_no time_epoch time_us
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|t| t.parse::<f64>().ok())
            {
                latencies.push(us / 1e3);
            }
        }
    }
    Ok(latencies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbench_15_summary() {
        let out = "transaction type: <builtin: select only>\n\
                   scaling factor: 10\n\
                   number of clients: 8\n\
                   latency average = 0.512 ms\n\
                   initial connection time = 12.345 ms\n\
                   tps = 15612.345678 (without initial connection time)\n";
        let s = parse_summary(out).unwrap();
        assert_eq!(s.tps, 15612.345678);
        assert_eq!(s.avg_latency_ms, 0.512);
    }
}
