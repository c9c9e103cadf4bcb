//! The one latency histogram: relaxed atomics a hot path adds to, and the
//! copy a scrape or a status page reads.
//!
//! Fixed bucket bounds per use (a [`Bounds`] type, so recording costs one
//! search of a constant array and two relaxed adds, with no pointer to chase),
//! in microseconds; the last slot counts everything slower than every bound.
//! [`super::prometheus::Writer::histogram`] writes a snapshot in seconds.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bounds per histogram.
pub const BOUNDS: usize = 10;

/// The bucket bounds of one kind of histogram (microseconds, ascending).
pub trait Bounds {
    /// The upper bounds.
    const US: [u64; BOUNDS];
}

/// Latencies by bucket, and their sum.
#[derive(Debug)]
pub struct Histogram<B: Bounds> {
    buckets: [AtomicU64; BOUNDS + 1],
    sum_us: AtomicU64,
    bounds: PhantomData<B>,
}

impl<B: Bounds> Default for Histogram<B> {
    fn default() -> Self {
        Self {
            buckets: Default::default(),
            sum_us: AtomicU64::new(0),
            bounds: PhantomData,
        }
    }
}

impl<B: Bounds> Histogram<B> {
    /// Counts one latency.
    #[inline]
    pub fn record(&self, took: Duration) {
        let us = took.as_micros() as u64;
        let bucket = B::US.iter().position(|&b| us <= b).unwrap_or(BOUNDS);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// A copy.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            bounds_us: &B::US,
            latency_buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            latency_sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// A copy of a [`Histogram`], as `/api/status` and `/stats.json` show it
/// (flattened into the owner's snapshot: `latency_buckets`, `latency_sum_us`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    /// The bucket bounds, microseconds (not serialized: the API documents them).
    #[serde(skip)]
    pub bounds_us: &'static [u64],
    /// Counts per bucket; the last one is "slower than every bound".
    pub latency_buckets: [u64; BOUNDS + 1],
    /// Sum of the latencies, microseconds.
    pub latency_sum_us: u64,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            bounds_us: &[],
            latency_buckets: [0; BOUNDS + 1],
            latency_sum_us: 0,
        }
    }
}

impl Snapshot {
    /// Latencies counted.
    pub fn count(&self) -> u64 {
        self.latency_buckets.iter().sum()
    }

    /// Adds another snapshot of the same kind.
    pub fn add(&mut self, other: &Snapshot) {
        if self.bounds_us.is_empty() {
            self.bounds_us = other.bounds_us;
        }
        for (a, b) in self.latency_buckets.iter_mut().zip(other.latency_buckets) {
            *a += b;
        }
        self.latency_sum_us += other.latency_sum_us;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Test;
    impl Bounds for Test {
        const US: [u64; BOUNDS] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    }

    #[test]
    fn latencies_land_in_their_bucket_and_the_sum() {
        let h = Histogram::<Test>::default();
        h.record(Duration::from_micros(1));
        h.record(Duration::from_micros(10));
        h.record(Duration::from_micros(11));
        let s = h.snapshot();
        assert_eq!(s.latency_buckets, [1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!((s.latency_sum_us, s.count()), (22, 3));
        let mut total = Snapshot::default();
        total.add(&s);
        total.add(&s);
        assert_eq!((total.count(), total.bounds_us.len()), (6, BOUNDS));
    }
}
