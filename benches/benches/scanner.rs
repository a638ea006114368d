//! Frame-scanner throughput over a realistic server → client stream (mostly DataRow messages
//! of mixed sizes), fed in pieces the size of the pump's reads.
//!
//! `cargo bench -p lockguard-benches --bench scanner`; divan reports the throughput in B/s
//! (decimal: 1 GB/s = 10^9 bytes per second).

use std::hint::black_box;

use divan::counter::BytesCount;
use divan::Bencher;
use lockguard_benches::scan::{scan, STREAM_LEN};
use lockguard_benches::stream::server_stream;

fn main() {
    divan::main();
}

/// PostgreSQL sends results in pieces of up to 8 KiB and the pump reads up to 64 KiB per
/// syscall; 1 KiB shows small reads, 1 MiB the scanner's own ceiling once per-call overhead is
/// amortised.
#[divan::bench(args = [1024, 8 * 1024, 64 * 1024, 1024 * 1024])]
fn server_to_client(bencher: Bencher, chunk: usize) {
    let (stream, _) = server_stream(STREAM_LEN, 42);
    bencher
        .counter(BytesCount::of_slice(&stream))
        .bench(|| scan(black_box(&stream), chunk));
}
