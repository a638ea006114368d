//! `lockguard-bench`: one command that measures lockguard side by side with a direct
//! connection and PgBouncer, and prints the tables of the README's "Benchmarks" section.
//!
//! ```text
//! cargo run --release -p lockguard-benches -- [--duration 10s] [--sections overhead,release,memory,scanner]
//!     [--unix-upstream] [--no-pgbouncer] [--forwarding-threads N]
//! ```
//!
//! Progress goes to stderr; the report (machine, settings, tables, targets) to stdout.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use lockguard_benches::memory::Footprint;
use lockguard_benches::overhead::{self, Cell};
use lockguard_benches::pgbench::Pgbench;
use lockguard_benches::procs::{self, LockguardSettings, Server, Upstream, Wrap};
use lockguard_benches::release::Outcome;
use lockguard_benches::report::Table;
use lockguard_benches::scan::Throughput;
use lockguard_tests::cluster::TestCluster;

mod sections;

/// The protected table of the incident scenario.
const PROTECTED_TABLE: &str = "app.user_sessions";

const SCHEMA_SQL: &str = "\
CREATE SCHEMA app;
CREATE TABLE app.user_sessions (
    id int PRIMARY KEY,
    user_name text NOT NULL,
    last_seen timestamptz NOT NULL DEFAULT now()
);
INSERT INTO app.user_sessions (id, user_name) SELECT g, 'user' || g FROM generate_series(1, 1000) g;
";

#[derive(Debug, Parser)]
#[command(
    name = "lockguard-bench",
    about = "Benchmarks lockguard against a direct connection and PgBouncer"
)]
struct Args {
    /// Length of each pgbench run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Sections to run, comma-separated: overhead, release, memory, scanner; budget and
    /// profile (instructions and syscalls per transaction; needs valgrind and strace) only
    /// when asked for.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "overhead,release,memory,scanner"
    )]
    sections: Vec<Section>,
    /// Repetitions of every (mode, target) pgbench run; the tables show medians. Even, so the
    /// target order runs forward and backward equally often.
    #[arg(long, default_value_t = 4)]
    repetitions: u32,
    /// pgbench clients (-c).
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// pgbench threads (-j).
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// pgbench scale factor (-s) of `pgbench -i`.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Iterations of the incident (and of the idle-in-transaction rule).
    #[arg(long, default_value_t = 50)]
    release_iterations: usize,
    /// Iterations of the "client vanishes mid-statement" variant.
    #[arg(long, default_value_t = 10)]
    busy_iterations: usize,
    /// Concurrent lanes of the idle-in-transaction variant.
    #[arg(long, default_value_t = 5)]
    idle_lanes: usize,
    /// Runs of the blocking-budget section (`--sections budget`).
    #[arg(long, default_value_t = 50)]
    budget_runs: usize,
    /// Idle proxied sessions for the memory section.
    #[arg(long, default_value_t = 1000)]
    idle_sessions: usize,
    /// Transactions per client of the profile section's longer run (its shorter one has a
    /// sixth of them; the difference is what is counted).
    #[arg(long, default_value_t = 3000)]
    profile_transactions: u32,
    /// pgbench clients of the profile section. One client makes every transaction cost the
    /// same wake-ups (two per round trip), so the counts repeat from run to run; with several,
    /// how many events each wake-up finds varies with the machine's timing.
    #[arg(long, default_value_t = 1)]
    profile_clients: u32,
    /// Keep the profile section's callgrind dumps here (for callgrind_annotate).
    #[arg(long)]
    profile_dir: Option<PathBuf>,
    /// The lockguard binary; by default `cargo build --release -p lockguard` builds it.
    #[arg(long)]
    lockguard: Option<PathBuf>,
    /// pgbench; by default found on PATH or in /usr/lib/postgresql/*/bin.
    #[arg(long)]
    pgbench: Option<PathBuf>,
    /// PgBouncer; by default found on PATH or in /usr/sbin. Skipped when not found.
    #[arg(long)]
    pgbouncer: Option<PathBuf>,
    /// Leave PgBouncer out even when it is installed.
    #[arg(long)]
    no_pgbouncer: bool,
    /// Let the proxies reach PostgreSQL over its unix socket instead of TCP (pgbench still
    /// connects to every target over TCP).
    #[arg(long)]
    unix_upstream: bool,
    /// lockguard's `proxy.forwarding_threads` (by default its own default: one on up to two
    /// cores, else one per core)
    #[arg(long)]
    forwarding_threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Overhead,
    Release,
    Memory,
    Scanner,
    Budget,
    Profile,
}

/// The lockguard configuration every section uses (guard on, the incident's table protected).
fn guard_settings(forwarding_threads: Option<usize>) -> LockguardSettings {
    LockguardSettings {
        forwarding_threads,
        protected_table: PROTECTED_TABLE.to_owned(),
        idle_in_transaction_timeout: Duration::from_secs(2),
        sweep_interval: Duration::from_secs(1),
        inflight_grace: Duration::from_secs(1),
    }
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("lockguard-bench: {e:#}");
        std::process::exit(1);
    }
}

/// What every section shares: the options, the throwaway cluster and its database, the
/// runtime, and how to start each proxy in front of the cluster.
pub(crate) struct Bench {
    args: Args,
    cluster: TestCluster,
    runtime: tokio::runtime::Runtime,
    user: String,
    dbname: String,
    upstream: Upstream,
    settings: LockguardSettings,
    lockguard_bin: PathBuf,
    pgbouncer_bin: Option<PathBuf>,
    pgbench: Pgbench,
}

impl Bench {
    /// Finds the programs, starts the cluster and creates the benchmark's database; returns
    /// the server's version too, for the report's header.
    fn prepare(args: Args) -> anyhow::Result<(Bench, String)> {
        let lockguard_bin = match &args.lockguard {
            Some(path) => path.clone(),
            None => build_lockguard()?,
        };
        let pgbench_bin = match &args.pgbench {
            Some(path) => path.clone(),
            None => find_pgbench()
                .context("pgbench not found: install postgresql-client or pass --pgbench")?,
        };
        let pgbouncer_bin = if args.no_pgbouncer {
            None
        } else {
            args.pgbouncer
                .clone()
                .or_else(|| procs::find_program("pgbouncer", &["/usr/sbin", "/usr/local/sbin"]))
        };
        if pgbouncer_bin.is_none() && !args.no_pgbouncer {
            eprintln!("PgBouncer not found (apt-get install pgbouncer): skipped");
        }

        eprintln!("starting a throwaway PostgreSQL cluster");
        let max_connections = (args.idle_sessions + 100).max(300).to_string();
        let cluster = TestCluster::start(&[
            ("max_connections", max_connections.as_str()),
            ("shared_buffers", "256MB"),
        ])
        .context("starting PostgreSQL")?;
        let user = cluster.superuser().to_owned();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (dbname, server_version) = runtime.block_on(async {
            let dbname = cluster.create_database("bench").await;
            let admin = cluster.connect_admin().await;
            let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
            let (client, connection) = cluster
                .pg_config(&user, None, &dbname)
                .connect(tokio_postgres::NoTls)
                .await?;
            tokio::spawn(connection);
            client.batch_execute(SCHEMA_SQL).await?;
            anyhow::Ok((dbname, version))
        })?;
        let upstream = match (args.unix_upstream, cluster.socket_dir()) {
            (false, _) => Upstream::Tcp(cluster.port()),
            (true, Some(dir)) => Upstream::Unix {
                dir: dir.to_owned(),
                port: cluster.port(),
            },
            (true, None) => bail!("--unix-upstream: the cluster has no unix socket directory"),
        };
        let pgbench = Pgbench {
            bin: pgbench_bin,
            user: user.clone(),
            dbname: dbname.clone(),
        };
        let settings = guard_settings(args.forwarding_threads);
        let bench = Bench {
            args,
            cluster,
            runtime,
            user,
            dbname,
            upstream,
            settings,
            lockguard_bin,
            pgbouncer_bin,
            pgbench,
        };
        Ok((bench, server_version))
    }

    fn wants(&self, section: Section) -> bool {
        self.args.sections.contains(&section)
    }

    /// A release lockguard in front of the cluster, guard on.
    fn start_lockguard(&self, wrap: Wrap) -> anyhow::Result<Server> {
        procs::start_lockguard(
            &self.lockguard_bin,
            &self.upstream,
            self.cluster.port(),
            &self.user,
            &self.settings,
            wrap,
        )
    }

    /// PgBouncer in front of the cluster, when installed. It is a comparison, not the
    /// subject: if it will not start, say so and go on.
    fn start_pgbouncer(&self, max_sessions: usize, wrap: Wrap) -> Option<Server> {
        let bin = self.pgbouncer_bin.as_deref()?;
        match procs::start_pgbouncer(bin, &self.upstream, &self.user, max_sessions, wrap) {
            Ok(server) => Some(server),
            Err(e) => {
                eprintln!("PgBouncer did not start, skipped: {e:#}");
                None
            }
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let load_at_start = load_average();
    // Each idle session is a socket here and two in the proxy (which inherits the limit).
    let wanted_files = 3 * args.idle_sessions as u64 + 1024;
    match lockguard_tests::resources::raise_open_files_limit(wanted_files) {
        Ok(limit) if limit < wanted_files => {
            eprintln!(
                "open-files limit is {limit}; the memory section may fail (wanted {wanted_files})"
            );
        }
        Ok(_) => {}
        Err(e) => eprintln!("could not raise the open-files limit: {e}"),
    }
    let (bench, server_version) = Bench::prepare(args)?;
    let lockguard = bench.start_lockguard(Wrap::Native)?;
    let pgbouncer = bench.start_pgbouncer(bench.args.clients as usize, Wrap::Native);

    let mut report = header(&bench, pgbouncer.is_some(), &server_version, &load_at_start)?;
    if bench.wants(Section::Overhead) || bench.wants(Section::Profile) {
        eprintln!("pgbench -i -s {}", bench.args.scale);
        bench.pgbench.init(bench.cluster.port(), bench.args.scale)?;
    }
    let mut overhead_cells = Vec::new();
    if bench.wants(Section::Overhead) {
        overhead_cells = sections::overhead(&bench, &lockguard, pgbouncer.as_ref(), &mut report)?;
    }
    if bench.wants(Section::Profile) {
        sections::profile(&bench, &lockguard, pgbouncer.as_ref(), &mut report)?;
    }
    let mut outcomes = Vec::new();
    if bench.wants(Section::Release) {
        outcomes = sections::release(&bench, &lockguard, &mut report)?;
    }
    drop(lockguard);
    drop(pgbouncer);
    if bench.wants(Section::Budget) {
        sections::budget(&bench, &mut report)?;
    }
    let mut footprints = Vec::new();
    if bench.wants(Section::Memory) {
        footprints = sections::memory(&bench, &mut report)?;
    }
    let mut throughputs = Vec::new();
    if bench.wants(Section::Scanner) {
        throughputs = sections::scanner(&mut report);
    }

    section(
        &mut report,
        "Targets",
        &targets_table(&overhead_cells, &outcomes, &footprints, &throughputs),
    );
    writeln!(
        report,
        "Total run time: {}; load average at the end: {}",
        humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())),
        load_average()
    )?;
    print!("{report}");
    Ok(())
}

/// The report's first lines: the machine, how the proxies reach PostgreSQL, PgBouncer's
/// absence when it is absent.
fn header(
    bench: &Bench,
    pgbouncer_running: bool,
    server_version: &str,
    load_at_start: &str,
) -> anyhow::Result<String> {
    let mut report = String::new();
    writeln!(
        report,
        "{}",
        machine_description(
            &bench.pgbench.bin,
            bench.pgbouncer_bin.as_deref(),
            server_version
        )
    )?;
    writeln!(
        report,
        "Proxies reach PostgreSQL over {}; load average at the start: {load_at_start}",
        if bench.args.unix_upstream {
            "its unix socket"
        } else {
            "TCP (127.0.0.1)"
        }
    )?;
    if let Some(n) = bench.args.forwarding_threads {
        writeln!(report, "lockguard: proxy.forwarding_threads = {n}")?;
    }
    if !pgbouncer_running {
        writeln!(
            report,
            "PgBouncer: {}",
            if bench.args.no_pgbouncer {
                "left out (--no-pgbouncer)"
            } else {
                "skipped (not installed or did not start; apt-get install pgbouncer)"
            }
        )?;
    }
    writeln!(report)?;
    Ok(report)
}

pub(crate) fn section(report: &mut String, title: &str, table: &Table) {
    let text = format!("### {title}\n\n{}\n", table.render());
    eprintln!("\n{text}");
    report.push_str(&text);
}

/// The performance targets (README, "Targets"), each with the measured value and whether it is met.
fn targets_table(
    cells: &[Cell],
    outcomes: &[Outcome],
    footprints: &[Footprint],
    throughputs: &[Throughput],
) -> Table {
    let mut table = Table::new(["target", "measured", "met"]);
    let verdict = |ok: bool| if ok { "yes" } else { "no" };
    let ratio = |mode: &str, target: &str| -> Option<f64> {
        let tps = |t: &str| {
            cells
                .iter()
                .find(|c| c.mode == mode && c.target == t)
                .map(Cell::tps)
        };
        Some(tps(target)? / tps("direct")?)
    };
    let tps_ratios = overhead::tps_ratios(cells);
    for (mode, wanted) in [("-S", 0.85), ("-S -M prepared", 0.75), ("tpcb-like", 0.90)] {
        let Some(lockguard) = ratio(mode, "lockguard") else {
            continue;
        };
        let pgbouncer = ratio(mode, "pgbouncer");
        let not_below = tps_ratios
            .iter()
            .find(|r| r.mode == mode)
            .is_none_or(|r| !r.tps_below());
        table.row([
            format!("{mode}: lockguard/direct TPS ≥ {wanted:.2} and not below PgBouncer's"),
            match pgbouncer {
                Some(p) => format!("{lockguard:.2} (PgBouncer {p:.2})"),
                None => format!("{lockguard:.2}"),
            },
            verdict(lockguard >= wanted && not_below).to_owned(),
        ]);
    }
    for r in tps_ratios.iter().filter(|r| !r.per_connection()) {
        let against_itself = if r.itself.is_empty() {
            String::new()
        } else {
            format!(
                "; PgBouncer / itself {}, p = {:.3}",
                overhead::itself_spread(r, 3),
                r.below_itself_p()
            )
        };
        table.row([
            format!(
                "{}: TPS not below PgBouncer's (lockguard / PgBouncer per repetition, below only beyond PgBouncer / itself: p ≤ {})",
                r.mode,
                overhead::BELOW_P
            ),
            format!(
                "{:.3} ({:.3}–{:.3}){against_itself}",
                r.median(),
                r.min(),
                r.max()
            ),
            verdict(!r.tps_below()).to_owned(),
        ]);
    }
    for r in overhead::cpu_ratios(cells)
        .iter()
        .filter(|r| !r.per_connection())
    {
        table.row([
            format!("{}: proxy CPU per transaction ≤ PgBouncer's", r.mode),
            format!(
                "{:.2} of PgBouncer's ({:.2}–{:.2})",
                r.median(),
                r.min(),
                r.max()
            ),
            verdict(r.median() <= 1.0).to_owned(),
        ]);
    }
    for o in outcomes {
        if let (Some(target), Some(met)) = (o.target_ms, o.meets_target()) {
            let s = lockguard_benches::report::Spread::of(&o.samples);
            table.row([
                format!("{} via {}: p99 ≤ {target:.0} ms", o.scenario, o.through),
                format!("p99 {:.1} ms, {} not released", s.p99, o.not_released),
                verdict(met).to_owned(),
            ]);
        }
    }
    for f in footprints.iter().filter(|f| f.proxy == "lockguard") {
        table.row([
            format!(
                "≤ 16 KiB RSS per idle session (after {} {})",
                f.queries,
                if f.queries == 1 { "query" } else { "queries" }
            ),
            format!("{:.1} KiB", f.per_session_kib()),
            verdict(f.per_session_kib() <= 16.0).to_owned(),
        ]);
    }
    if let Some(t) = throughputs.iter().find(|t| t.chunk == 8 * 1024) {
        table.row([
            "scanner ≥ 5 GB/s (8 KiB reads)".to_owned(),
            format!("{:.2} GB/s", t.gb_per_s),
            verdict(t.gb_per_s >= 5.0).to_owned(),
        ]);
    }
    table
}

/// Waits until at most `max` client backends remain (those of a closed proxy exit
/// asynchronously), so the next proxy's sessions fit under `max_connections`.
pub(crate) async fn wait_for_backends_to_exit(
    cluster: &TestCluster,
    max: i64,
) -> anyhow::Result<()> {
    let admin = cluster.connect_admin().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
                &[],
            )
            .await?
            .get(0);
        if n <= max {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{n} client backends still there after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Builds the release lockguard binary with the cargo that runs us and returns its path.
fn build_lockguard() -> anyhow::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the bench crate has no parent directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building lockguard (cargo build --release -p lockguard)");
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "lockguard",
            "--bin",
            "lockguard",
        ])
        .current_dir(workspace)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo build --release -p lockguard failed ({status}); pass --lockguard PATH to use a built binary");
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target_dir.join("release").join("lockguard");
    if !bin.is_file() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

/// pgbench of the newest installed PostgreSQL, else the one on PATH.
fn find_pgbench() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin").join("pgbench");
            bin.is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .or_else(|| procs::find_program("pgbench", &[]))
}

/// Machine and software versions, for the report's header.
fn machine_description(pgbench: &Path, pgbouncer: Option<&Path>, server_version: &str) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .map_or("unknown CPU", str::trim)
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: u64 = m
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(format!("{:.0} GiB", kib as f64 / (1 << 20) as f64))
        })
        .unwrap_or_else(|| "? GiB".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = |bin: &Path| {
        Command::new(bin)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_owned))
            .unwrap_or_else(|| "unknown version".to_owned())
    };
    let mut text = format!(
        "Machine: {cores} cores ({model}), {memory} RAM, Linux {}; PostgreSQL {server_version}; {}",
        kernel.trim(),
        version(pgbench)
    );
    if let Some(bin) = pgbouncer {
        text.push_str(&format!("; {}", version(bin)));
    }
    text.push('\n');
    text
}

/// The 1, 5 and 15 minute load averages: how busy the machine was besides the benchmark.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}
