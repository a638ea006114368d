//! `lockguard-bench`: one command that measures lockguard side by side with a direct
//! connection and PgBouncer, and prints the tables of the README's "Benchmarks" section.
//!
//! ```text
//! cargo run --release -p lockguard-benches -- [--duration 10s] [--sections overhead,release,memory,scanner]
//!     [--unix-upstream] [--no-pgbouncer]
//! ```
//!
//! Progress goes to stderr; the report (machine, settings, tables, targets) to stdout.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use lockguard_benches::memory::{self, Footprint};
use lockguard_benches::overhead::{self, Cell};
use lockguard_benches::pgbench::{Pgbench, Target, MODES};
use lockguard_benches::procs::{self, LockguardSettings, Server, Upstream, Wrap};
use lockguard_benches::profile;
use lockguard_benches::release::{self, GuardTimings, Outcome};
use lockguard_benches::report::Table;
use lockguard_benches::scan::{self, Throughput};
use lockguard_tests::cluster::TestCluster;

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
    /// Repetitions of every (mode, target) pgbench run; the tables show medians.
    #[arg(long, default_value_t = 3)]
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
fn guard_settings() -> LockguardSettings {
    LockguardSettings {
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
    let wants = |s: Section| args.sections.contains(&s);

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
    let settings = guard_settings();
    let start_lockguard_as = |wrap: Wrap| {
        procs::start_lockguard(
            &lockguard_bin,
            &upstream,
            cluster.port(),
            &user,
            &settings,
            wrap,
        )
    };
    let start_lockguard = || start_lockguard_as(Wrap::Native);
    // PgBouncer is a comparison, not the subject: if it will not start, say so and go on.
    let start_pgbouncer_as = |bin: &Path, max_sessions: usize, wrap: Wrap| -> Option<Server> {
        match procs::start_pgbouncer(bin, &upstream, &user, max_sessions, wrap) {
            Ok(server) => Some(server),
            Err(e) => {
                eprintln!("PgBouncer did not start, skipped: {e:#}");
                None
            }
        }
    };
    let start_pgbouncer =
        |bin: &Path, max_sessions: usize| start_pgbouncer_as(bin, max_sessions, Wrap::Native);
    let lockguard = start_lockguard()?;
    let pgbouncer = pgbouncer_bin
        .as_deref()
        .and_then(|bin| start_pgbouncer(bin, args.clients as usize));

    let mut report = String::new();
    writeln!(
        report,
        "{}",
        machine_description(&pgbench_bin, pgbouncer_bin.as_deref(), &server_version)
    )?;
    writeln!(
        report,
        "Proxies reach PostgreSQL over {}; load average at the start: {load_at_start}",
        if args.unix_upstream {
            "its unix socket"
        } else {
            "TCP (127.0.0.1)"
        }
    )?;
    if pgbouncer.is_none() {
        writeln!(
            report,
            "PgBouncer: {}",
            if args.no_pgbouncer {
                "left out (--no-pgbouncer)"
            } else {
                "skipped (not installed or did not start; apt-get install pgbouncer)"
            }
        )?;
    }
    writeln!(report)?;

    let pgbench = Pgbench {
        bin: pgbench_bin,
        user: user.clone(),
        dbname: dbname.clone(),
    };
    if wants(Section::Overhead) || wants(Section::Profile) {
        eprintln!("pgbench -i -s {}", args.scale);
        pgbench.init(cluster.port(), args.scale)?;
    }
    let mut overhead_cells = Vec::new();
    if wants(Section::Overhead) {
        let mut targets = vec![
            Target {
                name: "direct",
                port: cluster.port(),
                proxy_pid: None,
            },
            Target {
                name: "lockguard",
                port: lockguard.port(),
                proxy_pid: Some(lockguard.pid()),
            },
        ];
        if let Some(pgbouncer) = &pgbouncer {
            targets.push(Target {
                name: "pgbouncer",
                port: pgbouncer.port(),
                proxy_pid: Some(pgbouncer.pid()),
            });
        }
        let plan = overhead::Plan {
            duration: args.duration,
            repetitions: args.repetitions,
            clients: args.clients,
            threads: args.threads,
        };
        // A short warm-up so the first measured run does not pay for cold caches.
        let warm_up = overhead::Plan {
            duration: Duration::from_secs(2),
            repetitions: 1,
            ..plan
        };
        eprintln!("overhead: warm-up");
        overhead::measure(
            &pgbench,
            &targets[..1],
            &MODES[..1],
            warm_up,
            &std::env::temp_dir(),
        )?;
        eprintln!(
            "overhead: {} modes x {} targets x {} repetitions of {}",
            MODES.len(),
            targets.len(),
            args.repetitions,
            humantime::format_duration(args.duration)
        );
        overhead_cells =
            overhead::measure(&pgbench, &targets, &MODES, plan, &std::env::temp_dir())?;
        section(
            &mut report,
            &format!(
                "Overhead: pgbench scale {}, {} clients, {} threads, {} per run, median of {} interleaved runs",
                args.scale,
                args.clients,
                args.threads,
                humantime::format_duration(args.duration),
                args.repetitions
            ),
            &overhead::table(&overhead_cells),
        );
        let ratios = overhead::cpu_ratios(&overhead_cells);
        if !ratios.is_empty() {
            section(
                &mut report,
                "Proxy CPU: lockguard's relative to PgBouncer's, a ratio per repetition (both ran in it); \
                 per connection under -C (PgBouncer reuses its server connections there, lockguard starts a backend each time)",
                &overhead::cpu_ratio_table(&ratios),
            );
        }
    }

    if wants(Section::Profile) {
        let plan = profile::Plan {
            short: args.profile_transactions / 6,
            long: args.profile_transactions,
            clients: args.profile_clients,
            threads: 1,
        };
        if let Some(dir) = &args.profile_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut counts = Vec::new();
        let mut proxies = vec![("lockguard", &lockguard)];
        if let Some(pgbouncer) = &pgbouncer {
            proxies.push(("pgbouncer", pgbouncer));
        }
        for (name, native) in proxies {
            eprintln!("profile: {name} under callgrind");
            let start_traced = || -> anyhow::Result<Server> {
                if name == "lockguard" {
                    start_lockguard_as(Wrap::Callgrind)
                } else {
                    pgbouncer_bin
                        .as_deref()
                        .and_then(|bin| {
                            start_pgbouncer_as(bin, args.clients as usize, Wrap::Callgrind)
                        })
                        .context("PgBouncer under callgrind did not start")
                }
            };
            let instructions = profile::instructions(
                &pgbench,
                &start_traced,
                &MODES,
                plan,
                args.profile_dir.as_deref(),
            )?;
            eprintln!("profile: {name} under strace");
            for (mode, syscalls) in profile::syscalls(&pgbench, native, &MODES, plan)? {
                counts.push(profile::Counts {
                    proxy: name,
                    mode,
                    instructions: instructions
                        .iter()
                        .find(|(m, _)| *m == mode)
                        .map(|(_, n)| *n),
                    syscalls,
                });
            }
        }
        counts.sort_by_key(|c| MODES.iter().position(|m| m.label == c.mode));
        section(
            &mut report,
            &format!(
                "Profile: per transaction (per connection under -C), user-space instructions \
                 (callgrind) and syscalls (strace -c -f); difference of {} and {} transactions \
                 per client, {} clients",
                plan.short, plan.long, plan.clients
            ),
            &profile::table(&counts),
        );
    }

    let mut outcomes = Vec::new();
    if wants(Section::Release) {
        eprintln!("release: the orphaned-lock incident");
        let setup = release::Setup {
            pg_port: cluster.port(),
            proxy_port: lockguard.port(),
            user: user.clone(),
            dbname: dbname.clone(),
            table: PROTECTED_TABLE.to_owned(),
        };
        let timings = GuardTimings {
            idle_in_transaction_timeout: settings.idle_in_transaction_timeout,
            sweep_interval: settings.sweep_interval,
            inflight_grace: settings.inflight_grace,
        };
        let plan = release::Plan {
            iterations: args.release_iterations,
            busy_iterations: args.busy_iterations,
            idle_lanes: args.idle_lanes,
            busy_statement: Duration::from_secs(3),
        };
        outcomes = runtime.block_on(release::measure(&setup, timings, plan))?;
        section(
            &mut report,
            &format!(
                "Time to release: from the client's death (or the idle timeout's expiry) to the waiter's success; \
                 lockguard with idle_in_transaction_timeout {}, sweep_interval {}, inflight_grace {}",
                humantime::format_duration(settings.idle_in_transaction_timeout),
                humantime::format_duration(settings.sweep_interval),
                humantime::format_duration(settings.inflight_grace)
            ),
            &release::table(&outcomes),
        );
    }
    drop(lockguard);
    drop(pgbouncer);

    if wants(Section::Budget) {
        let plan = lockguard_benches::budget::Plan {
            runs: args.budget_runs,
            max_blocking: Duration::from_secs(1),
            sweep_interval: Duration::from_millis(100),
        };
        eprintln!("budget: {} runs", plan.runs);
        let waits = runtime.block_on(lockguard_benches::budget::measure(
            &cluster,
            &user,
            &dbname,
            PROTECTED_TABLE,
            plan,
        ))?;
        section(
            &mut report,
            "Blocking budget: the waiter's total wait behind a busy proxied holder; max_blocking 1s, sweep_interval 100ms",
            &lockguard_benches::budget::table(&waits),
        );
    }

    let mut footprints = Vec::new();
    if wants(Section::Memory) {
        eprintln!("memory: {} idle sessions", args.idle_sessions);
        // Fresh processes, so nothing earlier sections allocated hides in the baseline.
        let fresh = start_lockguard()?;
        footprints.push(runtime.block_on(memory::measure(
            &fresh,
            &user,
            &dbname,
            args.idle_sessions,
        ))?);
        drop(fresh);
        if let Some(bin) = &pgbouncer_bin {
            runtime.block_on(wait_for_backends_to_exit(&cluster, 20))?;
            if let Some(fresh) = start_pgbouncer(bin, args.idle_sessions) {
                footprints.push(runtime.block_on(memory::measure(
                    &fresh,
                    &user,
                    &dbname,
                    args.idle_sessions,
                ))?);
            }
        }
        for f in &footprints {
            eprintln!("  {}: {:.1} KiB per session", f.proxy, f.per_session_kib());
        }
        section(
            &mut report,
            "Memory: proxy RSS (VmRSS) with 0 and N idle sessions (each has run one query)",
            &memory::table(&footprints),
        );
    }

    let mut throughputs = Vec::new();
    if wants(Section::Scanner) {
        eprintln!("scanner: frame scanner throughput");
        let (stats, results) = scan::measure(&[8 * 1024, 64 * 1024], Duration::from_secs(2));
        section(
            &mut report,
            "Frame scanner: server → client stream, best pass (divan: cargo bench -p lockguard-benches --bench scanner)",
            &scan::table(&stats, &results),
        );
        throughputs = results;
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
    drop(cluster);
    Ok(())
}

fn section(report: &mut String, title: &str, table: &Table) {
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
    for (mode, wanted) in [("-S", 0.85), ("-S -M prepared", 0.75), ("tpcb-like", 0.90)] {
        let Some(lockguard) = ratio(mode, "lockguard") else {
            continue;
        };
        let pgbouncer = ratio(mode, "pgbouncer");
        let beats = pgbouncer.is_none_or(|p| lockguard > p);
        table.row([
            format!("{mode}: lockguard/direct TPS ≥ {wanted:.2} and above PgBouncer's ratio"),
            match pgbouncer {
                Some(p) => format!("{lockguard:.2} (PgBouncer {p:.2})"),
                None => format!("{lockguard:.2}"),
            },
            verdict(lockguard >= wanted && beats).to_owned(),
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
    if let Some(f) = footprints.iter().find(|f| f.proxy == "lockguard") {
        table.row([
            "≤ 16 KiB RSS per idle session".to_owned(),
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
async fn wait_for_backends_to_exit(cluster: &TestCluster, max: i64) -> anyhow::Result<()> {
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
