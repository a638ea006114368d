//! The `lockguard` binary: parse the command line, set up logging, run the proxy until a
//! signal. SIGHUP reloads the configuration like the console's RELOAD.
//!
//! `lockguard demo` runs the `lockguard-demo` crate with this library's proxy: the demo and its
//! throwaway clusters are a crate of their own, so the library carries none of it.

mod cli;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use clap::{CommandFactory, Parser};
use cli::{Cli, Command};
use lockguard::admin::{Admin, ConfigSource, LogReloader};
use lockguard::Proxy;
use lockguard_config::{Config, LogFormat};
use lockguard_demo::RunningProxy;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};
use tracing_subscriber::{reload, EnvFilter};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::CheckConfig { file, overrides }) => {
            match overrides.to_overrides().load(Some(file)) {
                Ok(config) => {
                    print!("{}", config.to_toml_string());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lockguard: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Demo {
            keep_running,
            no_color,
        }) => {
            let options = lockguard_demo::DemoOptions {
                keep_running: *keep_running,
                color: no_color.then_some(false),
                ..Default::default()
            };
            run_demo_task(lockguard_demo::run(options, start_demo_proxy))
        }
        Some(Command::SetupSql { role, schema }) => {
            match guard_core::setup::setup_sql(role, schema) {
                Ok(sql) => {
                    print!("{sql}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lockguard: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::DemoApp { addr, user_id }) => {
            run_demo_task(lockguard_demo::app_process(*addr, *user_id))
        }
        Some(Command::Completions { shell }) => {
            let mut command = cli::completion_command();
            clap_complete::generate(*shell, &mut command, "lockguard", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Some(Command::Man { dir }) => {
            let written = match dir {
                Some(dir) => clap_mangen::generate_to(Cli::command(), dir),
                None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
            };
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lockguard: could not write the manual page: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {
            let overrides = cli.overrides.to_overrides();
            let config = match overrides.load(cli.config.as_deref()) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("lockguard: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let log_reloader = match init_logging(&config) {
                Ok(reloader) => reloader,
                Err(e) => {
                    eprintln!("lockguard: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let source = ConfigSource {
                path: cli.config.clone(),
                overrides,
            };
            let runtime = match proxy_runtime() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("lockguard: could not start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(config, source, log_reloader)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs a demo task on its own runtime; errors go to stderr.
fn run_demo_task(task: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("lockguard: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockguard demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The demo's proxy: this library's, bound with the demo's configuration and running.
async fn start_demo_proxy(config: Config) -> anyhow::Result<RunningProxy> {
    let proxy = Proxy::bind(config).await?;
    Ok(RunningProxy {
        listen: proxy.local_addr().context("the proxy's address")?,
        console: proxy
            .admin_console_addr()
            .ok_or_else(|| anyhow!("the admin console did not start"))?,
        shutdown: proxy.shutdown_token(),
        hard_stop: proxy.hard_stop_token(),
        running: tokio::spawn(proxy.run()),
    })
}

async fn serve(
    config: Config,
    source: ConfigSource,
    log_reloader: LogReloader,
) -> anyhow::Result<()> {
    // Installed before anything else: SIGHUP's default action would end the process, and a
    // SIGTERM that arrives once the proxy says it is accepting must start a graceful shutdown.
    let hangups = signal(SignalKind::hangup())?;
    let mut stops = StopSignals::install()?;
    match lockguard::net::raise_open_files_limit(config.proxy.max_clients) {
        Ok(limit) => {
            if limit.now > limit.before {
                info!(
                    from = limit.before,
                    to = limit.now,
                    "open-files limit raised to the hard limit"
                );
            }
            if limit.now < limit.needed {
                warn!(
                    limit = limit.now,
                    needed = limit.needed,
                    max_clients = config.proxy.max_clients,
                    "the open-files limit is below what max_clients sessions need (two \
                     descriptors each): raise the hard limit (LimitNOFILE, ulimit -Hn) or lower \
                     proxy.max_clients, or connections will fail with 'too many open files'"
                );
            }
        }
        Err(e) => warn!(error = %e, "could not read or raise the open-files limit"),
    }
    let proxy = Proxy::bind_with_source(config, Some(source)).await?;
    let admin = proxy.admin();
    admin.set_log_reloader(log_reloader);
    tokio::spawn(reload_on_hangup(hangups, admin));
    let shutdown = proxy.shutdown_token();
    let hard_stop = proxy.hard_stop_token();
    tokio::spawn(async move {
        // First signal: graceful shutdown. Second: close everything now.
        stops.recv().await;
        info!("signal received: shutting down (send again to close sessions at once)");
        shutdown.cancel();
        stops.recv().await;
        hard_stop.cancel();
    });
    proxy.run().await
}

/// SIGHUP runs the same reload as the console's RELOAD.
async fn reload_on_hangup(mut hangups: Signal, admin: Arc<Admin>) {
    while hangups.recv().await.is_some() {
        info!("SIGHUP received: reloading the configuration");
        match admin.reload().await {
            Ok(changes) => info!(changed = changes.len(), "SIGHUP reload done"),
            Err(e) => warn!(error = %e, "SIGHUP reload failed"),
        }
    }
}

/// SIGTERM and SIGINT, either of which stops the proxy.
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Installs the log subscriber; the returned function changes its filter (RELOAD).
fn init_logging(config: &Config) -> Result<LogReloader, String> {
    let filter = EnvFilter::try_new(&config.log.level)
        .map_err(|e| format!("invalid log level {:?}: {e}", config.log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let failed = |e| format!("could not set up logging: {e}");
    match config.log.format {
        LogFormat::Text => {
            let builder = builder
                .fmt_fields(lockguard::log_format::EscapedFields)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map_err(failed)?;
            Ok(filter_reloader(handle))
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map_err(failed)?;
            Ok(filter_reloader(handle))
        }
    }
}

fn filter_reloader<S: 'static>(handle: reload::Handle<EnvFilter, S>) -> LogReloader {
    Arc::new(move |level: &str| {
        let filter =
            EnvFilter::try_new(level).map_err(|e| format!("invalid log level {level:?}: {e}"))?;
        handle
            .reload(filter)
            .map_err(|e| format!("could not change the log level: {e}"))
    })
}

/// The proxy's runtime. Forwarding is a read and a write per message, almost all of it kernel
/// time (README, "Benchmarks"), so more threads help only with cores to spare: on one or two
/// cores a single thread avoids cross-thread wake-ups and work stealing (measured here: about
/// 1,100 fewer instructions and a third of a futex call less per pgbench transaction); with more
/// cores, one worker per core ([`lockguard::default_threads`]).
fn proxy_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = lockguard::default_threads();
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}
