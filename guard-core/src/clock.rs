//! A process-wide monotonic clock in microseconds, so timestamps fit in an `AtomicU64`; the
//! guard's [`Clock`], which tests can move forward instead of sleeping past a timeout; and the
//! offset between this machine's wall clock and the PostgreSQL server's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

/// The process epoch, as an `Instant` and as a `CLOCK_MONOTONIC` reading in microseconds
/// (`Instant` reads the same clock on Linux).
fn epoch() -> (Instant, u64) {
    static EPOCH: OnceLock<(Instant, u64)> = OnceLock::new();
    *EPOCH.get_or_init(|| (Instant::now(), monotonic_micros()))
}

/// `CLOCK_MONOTONIC` in microseconds. Read directly: the pump stamps the session record twice
/// per round trip, and `Instant::elapsed` costs about three times as much (the `Timespec`
/// subtraction and the `Duration` conversion).
fn monotonic_micros() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1_000
}

/// Microseconds since the process epoch; never 0, so 0 can mean "unset".
pub fn now_micros() -> u64 {
    monotonic_micros().saturating_sub(epoch().1) + 1
}

/// Time elapsed since a value returned by [`now_micros`].
pub fn since_micros(then: u64) -> Duration {
    Duration::from_micros(now_micros().saturating_sub(then))
}

/// The `Instant` a value of [`now_micros`] stands for.
pub fn instant_of_micros(micros: u64) -> Instant {
    epoch().0 + Duration::from_micros(micros.saturating_sub(1))
}

/// How the guard measures how long a session has been in its state: the process clock
/// ([`now_micros`]), which session records are stamped with, possibly running ahead by an
/// amount a [`ManualClock`] sets. Production guards use [`Clock::system`], which never runs
/// ahead; tests move a manual clock past a timeout instead of sleeping through it, so the
/// idle rules are tested exactly and fast.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
}

#[derive(Debug, Default)]
struct Manual {
    ahead_micros: AtomicU64,
    advanced: Notify,
}

impl Clock {
    /// The process clock, as it is.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// How far this clock runs ahead of the process clock.
    pub fn ahead(&self) -> Duration {
        self.manual.as_ref().map_or(Duration::ZERO, |m| {
            Duration::from_micros(m.ahead_micros.load(Ordering::Acquire))
        })
    }

    /// The age, on this clock, of something the process clock says is `measured` old.
    pub fn age(&self, measured: Duration) -> Duration {
        measured.saturating_add(self.ahead())
    }

    /// Resolves when a manual clock is moved forward; never for the system clock. The sweeper
    /// waits on it beside its period, so a test's [`ManualClock::advance`] is followed by a
    /// sweep at once rather than at the next tick.
    pub async fn advanced(&self) {
        match &self.manual {
            Some(m) => m.advanced.notified().await,
            None => std::future::pending().await,
        }
    }
}

/// A clock a test moves forward by hand ([`ManualClock::clock`] is what it gives the guard).
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    manual: Arc<Manual>,
}

impl ManualClock {
    /// A clock that starts level with the process clock.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// The guard's view of this clock.
    pub fn clock(&self) -> Clock {
        Clock {
            manual: Some(Arc::clone(&self.manual)),
        }
    }

    /// Moves the clock `by` forward (sessions look that much older) and wakes the sweeper.
    pub fn advance(&self, by: Duration) {
        let micros = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.manual.ahead_micros.fetch_add(micros, Ordering::AcqRel);
        self.manual.advanced.notify_waiters();
    }
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
    fn a_manual_clock_ages_everything_by_what_it_was_advanced_and_the_system_clock_by_nothing() {
        let measured = Duration::from_millis(40);
        assert_eq!(Clock::system().age(measured), measured);
        let manual = ManualClock::new();
        let clock = manual.clock();
        assert_eq!(clock.age(measured), measured);
        manual.advance(Duration::from_secs(2));
        manual.advance(Duration::from_millis(500));
        assert_eq!(clock.ahead(), Duration::from_millis(2500));
        assert_eq!(clock.age(measured), Duration::from_millis(2540));
        assert_eq!(Clock::system().ahead(), Duration::ZERO);
    }

    #[tokio::test]
    async fn advancing_a_manual_clock_wakes_its_waiters() {
        let manual = ManualClock::new();
        let clock = manual.clock();
        let waiting = tokio::spawn(async move { clock.advanced().await });
        // The waiter registers before the advance: retry the advance until it is woken.
        while !waiting.is_finished() {
            manual.advance(Duration::from_millis(1));
            tokio::task::yield_now().await;
        }
        waiting.await.unwrap();
    }

    #[test]
    fn process_clock_stamps_map_to_the_instants_they_were_taken_at() {
        let before = Instant::now();
        let stamp = now_micros();
        let after = Instant::now();
        assert!(stamp > 0);
        // The stamp's instant lies between the two readings, give or take its microsecond
        // truncation and the moment between the epoch's two readings (a preemption there
        // would be rare, hence the wide slack).
        let at = instant_of_micros(stamp);
        let slack = Duration::from_millis(1);
        assert!(at + slack >= before, "{at:?} before {before:?}");
        assert!(at <= after + slack, "{at:?} after {after:?}");
        let later = now_micros();
        assert!(later >= stamp);
        assert!(since_micros(stamp) >= Duration::from_micros(later - stamp));
    }

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
