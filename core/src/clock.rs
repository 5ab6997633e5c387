//! Time sources. Backends read `now` from a [`Clock`] so tests can move time
//! without sleeping.
//!
//! relayq keeps every timestamp at microsecond precision (what PostgreSQL
//! stores), so all clocks here round down to whole microseconds and every
//! backend agrees to the microsecond.

use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};

use time::{Duration, OffsetDateTime, PrimitiveDateTime};

/// A source of the current time.
pub trait Clock: Debug + Send + Sync {
    /// The current time, truncated to whole microseconds.
    fn now(&self) -> OffsetDateTime;
}

/// Rounds `t` down to a whole microsecond, the precision relayq stores.
pub fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    let nanos = t.nanosecond();
    t.replace_nanosecond(nanos - nanos % 1_000).unwrap_or(t)
}

/// The instant `micros` microseconds after the Unix epoch, in UTC; past
/// the years `OffsetDateTime` holds (-9999 to 9999, unless `time`'s
/// `large-dates` feature is on), the nearest instant it holds. How backends read stored timestamps: one that another program
/// wrote out of that range (PostgreSQL's `infinity`, the year 10000) reads
/// as the far past or future, so its job can still be read and run.
///
/// ```
/// use relayq_core::from_unix_micros;
/// use time::macros::datetime;
///
/// assert_eq!(from_unix_micros(1), datetime!(1970-01-01 00:00:00.000001 UTC));
/// assert_eq!(from_unix_micros(i64::MAX), datetime!(9999-12-31 23:59:59.999999 UTC));
/// assert_eq!(from_unix_micros(i64::MIN), datetime!(-9999-01-01 00:00:00 UTC));
/// ```
pub fn from_unix_micros(micros: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).unwrap_or_else(|_| {
        let nearest = if micros < 0 {
            PrimitiveDateTime::MIN
        } else {
            PrimitiveDateTime::MAX
        };
        truncate_to_micros(nearest.assume_utc())
    })
}

/// The host's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        truncate_to_micros(OffsetDateTime::now_utc())
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// ```
/// use relayq_core::{Clock, ManualClock};
/// use time::{Duration, macros::datetime};
///
/// let clock = ManualClock::new(datetime!(2030-01-01 00:00 UTC));
/// clock.advance(Duration::seconds(90));
/// assert_eq!(clock.now(), datetime!(2030-01-01 00:01:30 UTC));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<OffsetDateTime>>,
}

impl ManualClock {
    /// A clock stopped at `start` (truncated to microseconds).
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            now: Arc::new(Mutex::new(truncate_to_micros(start))),
        }
    }

    /// A clock stopped at the current wall-clock time.
    pub fn starting_now() -> Self {
        Self::new(OffsetDateTime::now_utc())
    }

    /// Moves the clock forward (or back, for a negative `by`).
    ///
    /// # Panics
    ///
    /// When the new time is out of `OffsetDateTime`'s range, as
    /// `OffsetDateTime + Duration` does.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now = truncate_to_micros(*now + by);
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: OffsetDateTime) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = truncate_to_micros(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn truncates_to_microseconds() {
        let t = datetime!(2030-01-01 00:00:00.123456789 UTC);
        assert_eq!(
            truncate_to_micros(t),
            datetime!(2030-01-01 00:00:00.123456 UTC)
        );
    }

    #[test]
    fn manual_clock_clones_share_time() {
        let a = ManualClock::new(datetime!(2030-01-01 00:00 UTC));
        let b = a.clone();
        a.advance(Duration::minutes(1));
        assert_eq!(b.now(), datetime!(2030-01-01 00:01 UTC));
    }
}
