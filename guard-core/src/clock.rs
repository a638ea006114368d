//! A process-wide monotonic clock in microseconds, so timestamps fit in an `AtomicU64`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since the process epoch; never 0, so 0 can mean "unset".
pub fn now_micros() -> u64 {
    epoch().elapsed().as_micros() as u64 + 1
}

/// Time elapsed since a value returned by [`now_micros`].
pub fn since_micros(then: u64) -> Duration {
    Duration::from_micros(now_micros().saturating_sub(then))
}

/// The `Instant` a value of [`now_micros`] stands for.
pub fn instant_of_micros(micros: u64) -> Instant {
    epoch() + Duration::from_micros(micros.saturating_sub(1))
}
