//! Benchmarks of lockguard: what the proxy costs next to a direct connection and PgBouncer,
//! how fast it releases an orphaned lock, and what a session costs in memory.
//!
//! The runner (`src/main.rs`, binary `lockguard-bench`) starts everything itself — a throwaway
//! PostgreSQL cluster, the release lockguard binary with its guard enabled, PgBouncer when it
//! is installed — and prints one table per section:
//! - [`overhead`]: pgbench through each target ([`pgbench`] runs it and reads its logs);
//! - [`release`]: the orphaned-lock incident, timed from the client's death to the waiter's
//!   success;
//! - [`budget`]: the blocking budget, timed as the waiter's total wait;
//! - [`memory`]: proxy RSS with and without idle sessions;
//! - [`scan`]: frame-scanner throughput over a realistic server stream ([`stream`]), also
//!   benchmarked with divan in `benches/scanner.rs`.
//!
//! - [`profile`] (on request): instructions and syscalls per transaction of each proxy.
//!
//! [`procs`] starts and stops the proxies; [`report`] holds the statistics and table printing.

pub mod budget;
pub mod memory;
pub mod overhead;
pub mod pgbench;
pub mod procs;
pub mod profile;
pub mod release;
pub mod report;
pub mod scan;
pub mod stream;
