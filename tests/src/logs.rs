//! lockguard's log, captured for the tests that check what it says (see
//! [`crate::proxy::ProxyOptions::capture_logs`]).

use std::net::SocketAddr;
use std::sync::{Mutex, Once};
use std::time::Duration;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::guard_support::wait_for;

/// Everything the proxies of this test binary logged, once [`capture`] ran first.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends this test binary's log (INFO and up, no colours) to the capture, and, with
/// `RUST_LOG` set, what it selects to the test output as well.
pub fn capture() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let capture = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .with_filter(LevelFilter::INFO);
        let console = std::env::var_os("RUST_LOG").map(|_| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(tracing_subscriber::EnvFilter::from_default_env())
        });
        let _ = tracing_subscriber::registry()
            .with(capture)
            .with(console)
            .try_init();
    });
}

/// Everything captured so far.
pub fn all() -> String {
    let log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&log).into_owned()
}

/// Every captured line that contains every one of `needles`.
pub fn lines_with(needles: &[&str]) -> Vec<String> {
    all()
        .lines()
        .filter(|line| needles.iter().all(|needle| line.contains(needle)))
        .map(str::to_owned)
        .collect()
}

/// The first captured line that contains every one of `needles`.
pub fn find(needles: &[&str]) -> Option<String> {
    lines_with(needles).into_iter().next()
}

/// Waits up to `timeout` for a line containing every one of `needles`, and returns it.
pub async fn wait_for_line(timeout: Duration, needles: &[&str]) -> String {
    wait_for(timeout, &format!("a log line with {needles:?}"), || {
        let found = find(needles).is_some();
        async move { found }
    })
    .await;
    find(needles).expect("found above")
}

/// Waits for a log line about `client` containing `needle`, and returns it.
pub async fn line_about(client: SocketAddr, needle: &str, timeout: Duration) -> String {
    wait_for_line(timeout, &[&client.to_string(), needle]).await
}
