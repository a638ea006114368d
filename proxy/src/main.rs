//! The `lockguard` binary: parse the command line, set up logging, run the proxy until a
//! signal.

use std::process::ExitCode;

use clap::Parser;
use lockguard::cli::{effective_config, Cli, Command};
use lockguard::Proxy;
use lockguard_config::{Config, LogFormat};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::CheckConfig { file, overrides }) => {
            match effective_config(Some(file), overrides) {
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
        None => {
            let config = match effective_config(cli.config.as_deref(), &cli.overrides) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("lockguard: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Err(e) = init_logging(&config) {
                eprintln!("lockguard: {e}");
                return ExitCode::FAILURE;
            }
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
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let proxy = Proxy::bind(config).await?;
    let shutdown = proxy.shutdown_token();
    let hard_stop = proxy.hard_stop_token();
    tokio::spawn(async move {
        // First signal: graceful shutdown. Second: close everything now.
        if wait_for_signal().await.is_ok() {
            info!("signal received: shutting down (send again to close sessions at once)");
            shutdown.cancel();
            if wait_for_signal().await.is_ok() {
                hard_stop.cancel();
            }
        }
    });
    proxy.run().await
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn init_logging(config: &Config) -> Result<(), String> {
    let filter = EnvFilter::try_new(&config.log.level)
        .map_err(|e| format!("invalid log level {:?}: {e}", config.log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("could not set up logging: {e}"))
}
