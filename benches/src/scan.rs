//! Section 4 (quick form): frame-scanner throughput, timed in the runner so one command prints
//! every table. The statistically careful version is the divan benchmark
//! `benches/scanner.rs` (`cargo bench -p lockguard-benches --bench scanner`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use lockguard::frame::{FrameScanner, SERVER_INTERESTS};

use crate::report::Table;
use crate::stream::{server_stream, StreamStats};

/// Size of the generated stream: bigger than the L2 cache, like real traffic.
pub const STREAM_LEN: usize = 8 << 20;

/// Throughput when the stream is fed in pieces of `chunk` bytes.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub chunk: usize,
    /// Best of the timed passes, in 10^9 bytes per second.
    pub gb_per_s: f64,
}

/// Scans the stream in chunks of each size in `chunks` for about `budget` each, returning the
/// best pass per size.
pub fn measure(chunks: &[usize], budget: Duration) -> (StreamStats, Vec<Throughput>) {
    let (stream, stats) = server_stream(STREAM_LEN, 42);
    let results = chunks
        .iter()
        .map(|&chunk| {
            let start = Instant::now();
            let mut best = Duration::MAX;
            while start.elapsed() < budget {
                let pass = Instant::now();
                black_box(scan(black_box(&stream), chunk));
                best = best.min(pass.elapsed());
            }
            Throughput {
                chunk,
                gb_per_s: stream.len() as f64 / best.as_secs_f64() / 1e9,
            }
        })
        .collect();
    (stats, results)
}

/// Feeds `stream` to a fresh server-side scanner `chunk` bytes at a time, as the pump does
/// with each read, and counts the reported messages.
pub fn scan(stream: &[u8], chunk: usize) -> usize {
    let mut scanner = FrameScanner::new(&SERVER_INTERESTS);
    let mut reported = 0;
    for piece in stream.chunks(chunk) {
        scanner
            .feed(piece, |m| {
                reported += 1;
                black_box(m.body_prefix);
            })
            .expect("the generated stream is valid protocol");
    }
    reported
}

/// The scanner table.
pub fn table(stats: &StreamStats, results: &[Throughput]) -> Table {
    let mut table = Table::new(["input", "fed in pieces of", "GB/s (best pass)"]);
    let input = format!(
        "{:.1} MiB, {} messages ({} DataRow), mean {:.0} B",
        stats.bytes as f64 / (1 << 20) as f64,
        stats.messages,
        stats.data_rows,
        stats.mean_message_len()
    );
    for r in results {
        table.row([
            input.clone(),
            format!("{} KiB", r.chunk / 1024),
            format!("{:.2}", r.gb_per_s),
        ]);
    }
    table
}
