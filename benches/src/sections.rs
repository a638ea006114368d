//! The report's sections, one function each: what runs, and the table it adds to the report.

use std::time::Duration;

use anyhow::Context;
use lockguard_benches::memory::{self, Footprint};
use lockguard_benches::overhead::{self, Cell};
use lockguard_benches::pgbench::{Target, MODES};
use lockguard_benches::procs::{Server, Wrap};
use lockguard_benches::release::{self, GuardTimings, Outcome};
use lockguard_benches::scan::{self, Throughput};
use lockguard_benches::{budget, profile};

use crate::{section, wait_for_backends_to_exit, Bench, PROTECTED_TABLE};

/// pgbench in every mode against the cluster directly, lockguard and PgBouncer, interleaved;
/// then the proxies' CPU as a ratio per repetition.
pub(crate) fn overhead(
    bench: &Bench,
    lockguard: &Server,
    pgbouncer: Option<&Server>,
    report: &mut String,
) -> anyhow::Result<Vec<Cell>> {
    let args = &bench.args;
    let mut targets = vec![
        Target {
            name: "direct",
            port: bench.cluster.port(),
            proxy_pid: None,
        },
        Target {
            name: "lockguard",
            port: lockguard.port(),
            proxy_pid: Some(lockguard.pid()),
        },
    ];
    if let Some(pgbouncer) = pgbouncer {
        // Twice, back to back: the second run measures the noise of a comparison.
        for name in ["pgbouncer", overhead::PGBOUNCER_AGAIN] {
            targets.push(Target {
                name,
                port: pgbouncer.port(),
                proxy_pid: Some(pgbouncer.pid()),
            });
        }
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
        &bench.pgbench,
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
    let cells = overhead::measure(
        &bench.pgbench,
        &targets,
        &MODES,
        plan,
        &std::env::temp_dir(),
    )?;
    section(
        report,
        &format!(
            "Overhead: pgbench scale {}, {} clients, {} threads, {} per run, median of {} interleaved runs",
            args.scale,
            args.clients,
            args.threads,
            humantime::format_duration(args.duration),
            args.repetitions
        ),
        &overhead::table(&cells),
    );
    let tps_ratios = overhead::tps_ratios(&cells);
    if !tps_ratios.is_empty() {
        section(
            report,
            "Throughput: lockguard's TPS relative to PgBouncer's, a ratio per repetition (both ran in it, \
             so this is their TPS / direct compared within a repetition), against PgBouncer's second run \
             over its first (the noise of such a ratio); p: one-sided rank-sum test (exact without ties) that lockguard's \
             ratios lie below PgBouncer's to itself",
            &overhead::tps_ratio_table(&tps_ratios),
        );
    }
    let ratios = overhead::cpu_ratios(&cells);
    if !ratios.is_empty() {
        section(
            report,
            "Proxy CPU: lockguard's relative to PgBouncer's, a ratio per repetition (both ran in it); \
             per connection under -C (PgBouncer reuses its server connections there, lockguard starts a backend each time)",
            &overhead::cpu_ratio_table(&ratios),
        );
    }
    Ok(cells)
}

/// Instructions (callgrind) and syscalls (strace) per transaction of each proxy.
pub(crate) fn profile(
    bench: &Bench,
    lockguard: &Server,
    pgbouncer: Option<&Server>,
    report: &mut String,
) -> anyhow::Result<()> {
    let args = &bench.args;
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
    let mut proxies = vec![("lockguard", lockguard)];
    if let Some(pgbouncer) = pgbouncer {
        proxies.push(("pgbouncer", pgbouncer));
    }
    for (name, native) in proxies {
        eprintln!("profile: {name} under callgrind");
        let start_traced = || -> anyhow::Result<Server> {
            if name == "lockguard" {
                bench.start_lockguard(Wrap::Callgrind)
            } else {
                bench
                    .start_pgbouncer(args.clients as usize, Wrap::Callgrind)
                    .context("PgBouncer under callgrind did not start")
            }
        };
        let instructions = profile::instructions(
            &bench.pgbench,
            &start_traced,
            &MODES,
            plan,
            args.profile_dir.as_deref(),
        )?;
        eprintln!("profile: {name} under strace");
        for (mode, syscalls) in profile::syscalls(&bench.pgbench, native, &MODES, plan)? {
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
        report,
        &format!(
            "Profile: per transaction (per connection under -C), user-space instructions \
             (callgrind) and syscalls (strace -c -f); difference of {} and {} transactions \
             per client, {} clients",
            plan.short, plan.long, plan.clients
        ),
        &profile::table(&counts),
    );
    Ok(())
}

/// The orphaned-lock incident, timed from the client's death to the waiter's success.
pub(crate) fn release(
    bench: &Bench,
    lockguard: &Server,
    report: &mut String,
) -> anyhow::Result<Vec<Outcome>> {
    eprintln!("release: the orphaned-lock incident");
    let args = &bench.args;
    let settings = &bench.settings;
    let setup = release::Setup {
        pg_port: bench.cluster.port(),
        proxy_port: lockguard.port(),
        user: bench.user.clone(),
        dbname: bench.dbname.clone(),
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
    let outcomes = bench
        .runtime
        .block_on(release::measure(&setup, timings, plan))?;
    section(
        report,
        &format!(
            "Time to release: from the client's death (or the idle timeout's expiry) to the waiter's success; \
             lockguard with idle_in_transaction_timeout {}, sweep_interval {}, inflight_grace {}",
            humantime::format_duration(settings.idle_in_transaction_timeout),
            humantime::format_duration(settings.sweep_interval),
            humantime::format_duration(settings.inflight_grace)
        ),
        &release::table(&outcomes),
    );
    Ok(outcomes)
}

/// The blocking budget: the waiter's total wait behind a busy proxied holder.
pub(crate) fn budget(bench: &Bench, report: &mut String) -> anyhow::Result<()> {
    let plan = budget::Plan {
        runs: bench.args.budget_runs,
        max_blocking: Duration::from_secs(1),
        sweep_interval: Duration::from_millis(100),
    };
    eprintln!("budget: {} runs", plan.runs);
    let waits = bench.runtime.block_on(budget::measure(
        &bench.cluster,
        &bench.user,
        &bench.dbname,
        PROTECTED_TABLE,
        plan,
    ))?;
    section(
        report,
        "Blocking budget: the waiter's total wait behind a busy proxied holder; max_blocking 1s, sweep_interval 100ms",
        &budget::table(&waits),
    );
    Ok(())
}

/// Each proxy's RSS with no client and with many idle sessions, in fresh processes so that
/// nothing earlier sections allocated hides in the baseline.
pub(crate) fn memory(bench: &Bench, report: &mut String) -> anyhow::Result<Vec<Footprint>> {
    let sessions = bench.args.idle_sessions;
    eprintln!("memory: {sessions} idle sessions");
    let measure = |proxy: &Server, queries: usize| {
        bench.runtime.block_on(memory::measure(
            proxy,
            &bench.user,
            &bench.dbname,
            sessions,
            queries,
        ))
    };
    let settle = || {
        bench
            .runtime
            .block_on(wait_for_backends_to_exit(&bench.cluster, 20))
    };
    // One query: the session stays with the runtime. Three: the forwarding thread has it.
    let mut footprints = vec![measure(&bench.start_lockguard(Wrap::Native)?, 1)?];
    settle()?;
    footprints.push(measure(&bench.start_lockguard(Wrap::Native)?, 3)?);
    if bench.pgbouncer_bin.is_some() {
        settle()?;
        if let Some(fresh) = bench.start_pgbouncer(sessions, Wrap::Native) {
            footprints.push(measure(&fresh, 1)?);
        }
    }
    for f in &footprints {
        eprintln!(
            "  {} ({} queries): {:.1} KiB per session",
            f.proxy,
            f.queries,
            f.per_session_kib()
        );
    }
    section(
        report,
        "Memory: proxy RSS (VmRSS) with 0 and N idle sessions (each has run its queries; lockguard's forwarding thread takes a session at its third ReadyForQuery)",
        &memory::table(&footprints),
    );
    Ok(footprints)
}

/// The frame scanner's throughput over generated server traffic.
pub(crate) fn scanner(report: &mut String) -> Vec<Throughput> {
    eprintln!("scanner: frame scanner throughput");
    let (stats, results) = scan::measure(&[8 * 1024, 64 * 1024], Duration::from_secs(2));
    section(
        report,
        "Frame scanner: server → client stream, best pass (divan: cargo bench -p lockguard-benches --bench scanner)",
        &scan::table(&stats, &results),
    );
    results
}
