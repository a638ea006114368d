//! Section `profile` (run only when asked for): what one transaction costs a proxy in
//! user-space instructions and in syscalls, counts that a busy machine does not disturb.
//!
//! - Instructions: the proxy runs under `valgrind --tool=callgrind`, a fresh process for each
//!   of two pgbench runs of `short` and `long` transactions per client; the difference of
//!   their counts is divided by the extra transactions, so start, stop and the connections'
//!   setup cancel out. Under `-C` (a connection per transaction) the same
//!   difference gives the instructions per connection.
//! - Syscalls: `strace -c -f` attached to the (uninstrumented) proxy for the same two runs,
//!   counted the same way.
//!
//! The callgrind files can be kept (`--profile-dir`) for `callgrind_annotate`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::pgbench::{Mode, Pgbench, Target};
use crate::procs::Server;
use crate::report::Table;

/// Transactions per client of the two runs whose difference is measured.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub short: u32,
    pub long: u32,
    pub clients: u32,
    pub threads: u32,
}

/// (syscall, calls per transaction), most frequent first.
pub type SyscallCounts = Vec<(String, f64)>;

/// One proxy's counts in one mode, per transaction (per connection under `-C`).
#[derive(Debug, Clone)]
pub struct Counts {
    pub proxy: &'static str,
    pub mode: &'static str,
    pub instructions: Option<f64>,
    pub syscalls: SyscallCounts,
}

impl Counts {
    fn syscalls_total(&self) -> f64 {
        self.syscalls.iter().map(|(_, n)| n).sum()
    }
}

/// Counts the user-space instructions per transaction of a proxy that `start` runs under
/// callgrind ([`crate::procs::Wrap::Callgrind`]), in each of `modes`: a fresh process for each
/// of the two runs, whose counts callgrind writes when it exits (its start and stop cancel
/// out of the difference). The counts are copied to `keep` when given.
pub fn instructions(
    pgbench: &Pgbench,
    start: &dyn Fn() -> anyhow::Result<Server>,
    modes: &[Mode],
    plan: Plan,
    keep: Option<&Path>,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let mut out = Vec::new();
    for mode in modes {
        let mut totals = [0u64; 2];
        for (i, per_client) in [plan.short, plan.long].into_iter().enumerate() {
            let server = start()?;
            let name = server.name();
            pgbench.run_transactions(
                &target_of(&server),
                mode,
                per_client,
                plan.clients,
                plan.threads,
            )?;
            let dir = server.stop().context("the stopped proxy's directory")?;
            totals[i] = read_callgrind(
                &dir.path().join("callgrind.out"),
                keep,
                name,
                mode,
                per_client,
            )?;
        }
        let extra = f64::from(plan.clients) * f64::from(plan.long - plan.short);
        out.push((mode.label, (totals[1] as f64 - totals[0] as f64) / extra));
    }
    Ok(out)
}

/// Counts the syscalls per transaction of `server` (running natively) in each of `modes`.
pub fn syscalls(
    pgbench: &Pgbench,
    server: &Server,
    modes: &[Mode],
    plan: Plan,
) -> anyhow::Result<Vec<(&'static str, SyscallCounts)>> {
    let target = target_of(server);
    let mut out = Vec::new();
    for mode in modes {
        pgbench.run_transactions(&target, mode, 5, plan.clients, plan.threads)?;
        let mut counts = Vec::new();
        for per_client in [plan.short, plan.long] {
            let strace = Strace::attach(server.pid())?;
            pgbench.run_transactions(&target, mode, per_client, plan.clients, plan.threads)?;
            counts.push(strace.finish()?);
        }
        let extra = f64::from(plan.clients) * f64::from(plan.long - plan.short);
        let mut per_txn: SyscallCounts = counts[1]
            .iter()
            .map(|(name, long)| {
                let short = counts[0]
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0, |(_, c)| *c);
                (name.clone(), (*long as f64 - short as f64) / extra)
            })
            .filter(|(_, n)| *n >= 0.005)
            .collect();
        per_txn.sort_by(|a, b| b.1.total_cmp(&a.1));
        out.push((mode.label, per_txn));
    }
    Ok(out)
}

fn target_of(server: &Server) -> Target {
    Target {
        name: server.name(),
        port: server.port(),
        proxy_pid: Some(server.pid()),
    }
}

/// The instructions counted in callgrind output `file`, which is copied to `keep` if given.
fn read_callgrind(
    file: &Path,
    keep: Option<&Path>,
    proxy: &str,
    mode: &Mode,
    per_client: u32,
) -> anyhow::Result<u64> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let total = text
        .lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no `totals:` in {}", file.display()))?;
    if let Some(dir) = keep {
        let mode: String = mode
            .label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let name = format!("{proxy}-{mode}-{per_client}.callgrind");
        fs::copy(file, dir.join(&name)).with_context(|| format!("keeping {name}"))?;
    }
    Ok(total)
}

/// `strace -c -f` attached to a process until [`finish`](Strace::finish).
struct Strace {
    child: std::process::Child,
    output: PathBuf,
    _dir: tempfile::TempDir,
}

impl Strace {
    fn attach(pid: u32) -> anyhow::Result<Strace> {
        let dir = tempfile::Builder::new().prefix("strace-").tempdir()?;
        let output = dir.path().join("summary");
        let mut child = Command::new("strace")
            .args(["-c", "-f", "-o"])
            .arg(&output)
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting strace")?;
        // strace says "Process N attached" once it traces the process.
        let stderr = child.stderr.take().context("strace's stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("attached") => break,
                Some(Ok(_)) => {}
                _ => bail!("strace -p {pid} ended before it attached"),
            }
        }
        // Keep draining stderr (one line per thread) so strace never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Strace {
            child,
            output,
            _dir: dir,
        })
    }

    /// Detaches and returns (syscall, calls).
    fn finish(mut self) -> anyhow::Result<Vec<(String, u64)>> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: `pid` is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        self.child.wait()?;
        let text = fs::read_to_string(&self.output)
            .with_context(|| format!("reading {}", self.output.display()))?;
        Ok(parse_strace_summary(&text))
    }
}

/// The (syscall, calls) rows of `strace -c` output.
fn parse_strace_summary(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors,] syscall
            let name = *fields.last()?;
            let calls = fields.get(3)?.parse().ok()?;
            (fields.len() >= 5 && name != "total").then(|| (name.to_owned(), calls))
        })
        .collect()
}

/// The table of [`Counts`].
pub fn table(counts: &[Counts]) -> Table {
    let mut table = Table::new([
        "mode",
        "proxy",
        "per",
        "instructions (user space)",
        "syscalls",
        "syscalls by kind",
    ]);
    for c in counts {
        let kinds: Vec<String> = c
            .syscalls
            .iter()
            .take(6)
            .map(|(name, n)| format!("{n:.2} {name}"))
            .collect();
        table.row([
            c.mode.to_owned(),
            c.proxy.to_owned(),
            if c.mode.starts_with("-C") {
                "connection".to_owned()
            } else {
                "transaction".to_owned()
            },
            c.instructions.map_or("—".to_owned(), |n| format!("{n:.0}")),
            format!("{:.2}", c.syscalls_total()),
            kinds.join(", "),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_strace_summaries() {
        let text = "% time     seconds  usecs/call     calls    errors syscall\n\
                    ------ ----------- ----------- --------- --------- ----------------\n\
                    \x20 60.00    0.006000           3      2000           sendto\n\
                    \x20 30.00    0.003000           1      2000       100 recvfrom\n\
                    \x20 10.00    0.001000           1       330           epoll_wait\n\
                    ------ ----------- ----------- --------- --------- ----------------\n\
                    100.00    0.010000           2      4330       100 total\n";
        assert_eq!(
            parse_strace_summary(text),
            [
                ("sendto".to_owned(), 2000),
                ("recvfrom".to_owned(), 2000),
                ("epoll_wait".to_owned(), 330)
            ]
        );
    }
}
