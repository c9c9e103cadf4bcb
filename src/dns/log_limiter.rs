//! Logs at most once per interval (per-query logging under an outage would
//! both flood the log and slow the hot path).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Allows one log line per 10 s.
pub struct LogLimiter {
    next_ms: AtomicU64,
    base: Instant,
}

impl LogLimiter {
    /// A limiter that allows the first line at once.
    pub fn new() -> Self {
        Self {
            next_ms: AtomicU64::new(0),
            base: Instant::now(),
        }
    }

    /// Whether a line may be logged now.
    pub fn allow(&self) -> bool {
        let now = self.base.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_ms
                .compare_exchange(next, now + 10_000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}
