//! Logs that could come once per packet or per connection (an outage, a
//! flood of refused clients) are written at most once per period, with the
//! count of the ones left out: the log stays readable at 3 a.m. and the hot
//! path pays two relaxed atomics, no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most one line per period.
#[derive(Debug)]
pub struct LogEvery {
    period_ms: u64,
    /// When the next line may be written (ms since `base`); 0: at once.
    next_ms: AtomicU64,
    /// Events since the last line written.
    unlogged: AtomicU64,
    base: Instant,
}

impl LogEvery {
    /// A limiter of one line per `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
            next_ms: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
            base: Instant::now(),
        }
    }

    /// Counts one event; `Some(n)` when this one is to be logged, `n` being
    /// the events since the last line (this one included). The first event is
    /// logged at once; whichever thread wins the exchange writes the line.
    pub fn event(&self) -> Option<u64> {
        self.event_at(u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// [`Self::event`] at `now` (ms since the limiter was made).
    fn event_at(&self, now: u64) -> Option<u64> {
        let unlogged = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now < next {
            return None;
        }
        self.next_ms
            .compare_exchange(
                next,
                now.saturating_add(self.period_ms).max(1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .ok()?;
        self.unlogged.fetch_sub(unlogged, Ordering::Relaxed);
        Some(unlogged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_counting_the_rest() {
        let log = LogEvery::new(Duration::from_secs(10));
        assert_eq!(log.event_at(0), Some(1), "the first at once");
        assert_eq!(log.event_at(5), None);
        assert_eq!(log.event_at(9_999), None);
        assert_eq!(log.event_at(10_000), Some(3), "then one line with the count");
        assert_eq!(log.event_at(10_001), None);
        assert_eq!(log.event_at(25_000), Some(2));
    }
}
