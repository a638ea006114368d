//! The probe latency histogram the metrics endpoint shows: lock-free, one atomic add per
//! bucket, so timing a probe costs the guard nothing it would notice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds (seconds) of the probe latency histogram's buckets.
pub const PROBE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Probe round trips, timed.
#[derive(Debug, Default)]
pub(crate) struct ProbeTimer {
    /// Non-cumulative: `buckets[i]` counts probes in `(PROBE_BUCKETS[i-1], PROBE_BUCKETS[i]]`;
    /// the last slot counts those above every bound.
    buckets: [AtomicU64; PROBE_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
    errors: AtomicU64,
}

/// A copy of the probe latency histogram.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeLatency {
    /// Cumulative counts, one per [`PROBE_BUCKETS`] bound (Prometheus `le` buckets).
    pub cumulative: Vec<u64>,
    /// All probes (the `+Inf` bucket).
    pub count: u64,
    /// Total time spent probing, in seconds.
    pub sum_seconds: f64,
    /// Probes that failed (included in the counts above).
    pub errors: u64,
}

impl ProbeTimer {
    /// Counts one probe that took `elapsed` and succeeded or not.
    pub(crate) fn record(&self, elapsed: Duration, ok: bool) {
        let secs = elapsed.as_secs_f64();
        let slot = PROBE_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(PROBE_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The histogram so far.
    pub(crate) fn snapshot(&self) -> ProbeLatency {
        let mut running = 0;
        let cumulative = self.buckets[..PROBE_BUCKETS.len()]
            .iter()
            .map(|b| {
                running += b.load(Ordering::Relaxed);
                running
            })
            .collect();
        ProbeLatency {
            cumulative,
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_latency_is_a_cumulative_histogram() {
        let timer = ProbeTimer::default();
        timer.record(Duration::from_micros(500), true);
        timer.record(Duration::from_millis(30), true);
        timer.record(Duration::from_secs(9), false);
        let h = timer.snapshot();
        assert_eq!(h.count, 3);
        assert_eq!(h.errors, 1);
        assert_eq!(h.cumulative.len(), PROBE_BUCKETS.len());
        assert_eq!(h.cumulative[0], 1, "<= 1ms");
        assert_eq!(h.cumulative[5], 2, "<= 50ms");
        assert_eq!(*h.cumulative.last().unwrap(), 2, "9s is above every bound");
        assert!((h.sum_seconds - 9.0305).abs() < 1e-6, "{}", h.sum_seconds);
    }
}
