//! A process-wide monotonic clock in microseconds, so timestamps fit in an `AtomicU64`; and the
//! offset between this machine's wall clock and the PostgreSQL server's.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

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

/// How far the PostgreSQL server's wall clock is ahead of this machine's (negative: behind),
/// measured when a guard connection opens. The kill's identity check compares the server's
/// `backend_start` with the session's connect time taken here; over TCP the two clocks may
/// differ, and without this a skew of seconds would make every kill an identity mismatch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClockOffset {
    micros: i64,
}

impl ClockOffset {
    /// Same clock (a unix socket, or nothing measured yet).
    pub const ZERO: ClockOffset = ClockOffset { micros: 0 };

    /// The offset given the server's time `server`, read by a query sent at `sent` whose
    /// answer came back at `received` (both on this machine's clock): the server read its
    /// clock somewhere in between, so the midpoint is off by at most half the round trip.
    pub fn measure(sent: SystemTime, received: SystemTime, server: SystemTime) -> ClockOffset {
        let half_trip = received.duration_since(sent).unwrap_or_default() / 2;
        let local = sent + half_trip;
        let micros = match server.duration_since(local) {
            Ok(ahead) => i64::try_from(ahead.as_micros()).unwrap_or(i64::MAX),
            Err(behind) => -i64::try_from(behind.duration().as_micros()).unwrap_or(i64::MAX),
        };
        ClockOffset { micros }
    }

    /// Microseconds the server is ahead.
    pub fn as_micros(self) -> i64 {
        self.micros
    }

    /// `local` (this machine's clock) as the server's clock shows the same moment.
    pub fn to_server(self, local: SystemTime) -> SystemTime {
        let shift = Duration::from_micros(self.micros.unsigned_abs());
        let shifted = if self.micros >= 0 {
            local.checked_add(shift)
        } else {
            local.checked_sub(shift)
        };
        shifted.unwrap_or(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_offset_is_the_server_time_minus_the_round_trip_midpoint() {
        let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let received = sent + Duration::from_millis(20);
        let ahead = ClockOffset::measure(sent, received, sent + Duration::from_secs(30));
        assert_eq!(ahead.as_micros(), 30_000_000 - 10_000);
        let behind = ClockOffset::measure(sent, received, sent - Duration::from_secs(5));
        assert_eq!(behind.as_micros(), -5_010_000);
        assert_eq!(
            behind.to_server(sent),
            sent - Duration::from_micros(5_010_000)
        );
        assert_eq!(ClockOffset::ZERO.to_server(sent), sent);
    }
}
