//! The real `psql` client, for tests that prove compatibility with it.

use std::process::{Command, Output};

/// Runs `psql` with `args` (stdin closed, `-X` added so no ~/.psqlrc interferes) off the async
/// runtime: the proxy under test usually shares the test's single-threaded runtime, and a
/// blocking wait here would stall it. `None` when psql is not installed.
pub async fn run(args: &[&str]) -> Option<Output> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("psql")
            .arg("-X")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
    })
    .await
    .expect("psql runner task");
    match output {
        Ok(output) => Some(output),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("psql is not installed: skipped the psql part of this test");
            None
        }
        Err(e) => panic!("could not run psql: {e}"),
    }
}
