//! Load-balancer counters for the status page and the admin API: requests by
//! status class and latency, for the whole lb and per route ([`RequestCounters`],
//! one per service, kept across tables by the carryover), and the
//! propagation time of every routing change (Consul's answer to the new table
//! being live). Relaxed atomics on the request path; the propagation samples
//! (rare) keep a bounded ring for percentiles.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::report::histogram::{BOUNDS, Bounds, Histogram, Snapshot};

/// Upper bounds (microseconds) of the request latency buckets.
pub const LATENCY_BUCKETS_US: [u64; BOUNDS] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000, 10_000_000,
];
/// Propagation samples kept for percentiles.
const PROPAGATION_SAMPLES: usize = 1024;

/// The request latency buckets (see [`LATENCY_BUCKETS_US`]).
#[derive(Debug)]
pub struct RequestLatency;

impl Bounds for RequestLatency {
    const US: [u64; BOUNDS] = LATENCY_BUCKETS_US;
}

/// Requests by status class and latency (the whole lb, or one route).
#[derive(Debug, Default)]
pub struct RequestCounters {
    /// Requests by status class: 1xx..5xx at index 1..=5; index 0 counts
    /// requests that got no response (client gone).
    pub status_classes: [AtomicU64; 6],
    /// Request latency up to the response head.
    pub latency: Histogram<RequestLatency>,
    /// Requests of this route waiting for an instance below its maxconn now
    /// (HAProxy's backend queue; their sum is [`LbState`](super::LbState)'s `queued`).
    pub queued: std::sync::atomic::AtomicUsize,
}

/// A copy of [`RequestCounters`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RequestSnapshot {
    /// Requests by status class (index = first digit).
    pub status_classes: [u64; 6],
    /// Request latency (`latency_buckets`, `latency_sum_us`; bounds in
    /// [`LATENCY_BUCKETS_US`]).
    #[serde(flatten)]
    pub latency: Snapshot,
    /// Requests waiting for an instance now.
    pub queued: usize,
}

impl RequestSnapshot {
    /// Requests counted.
    pub fn total(&self) -> u64 {
        self.status_classes.iter().sum()
    }
}

impl RequestCounters {
    /// Counts one answered request.
    #[inline]
    pub fn record(&self, status: u16, took: Duration) {
        let class = usize::from(status / 100).min(5);
        self.status_classes[class].fetch_add(1, Ordering::Relaxed);
        self.latency.record(took);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> RequestSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestSnapshot {
            status_classes: std::array::from_fn(|i| load(&self.status_classes[i])),
            latency: self.latency.snapshot(),
            queued: self.queued.load(Ordering::Relaxed),
        }
    }
}

/// All load-balancer counters.
#[derive(Debug, Default)]
pub struct LbStats {
    /// Every request the lb answered (routes, landing page, 503 for unknown names).
    pub requests: RequestCounters,
    /// Requests retried on another instance after a connect failure.
    pub retries: AtomicU64,
    /// Routing changes applied.
    pub changes: AtomicU64,
    /// Client connections cut: stalled (`client_timeout`), idle (`idle_timeout`:
    /// h2 sessions without a stream, HTTP/1.1 keep-alive without a request or
    /// with a slow request head), no first request or h2 preface
    /// (`handshake_timeout`, TLS handshakes included).
    pub cut_stalled: AtomicU64,
    /// See `cut_stalled`.
    pub cut_idle: AtomicU64,
    /// See `cut_stalled`.
    pub cut_handshake: AtomicU64,
    /// Requests answered 408 because their body came slower than `min_body_rate`.
    pub body_too_slow: AtomicU64,
    /// Requests answered 408 because they were not complete within `request_timeout`.
    pub request_deadline: AtomicU64,
    /// Requests answered 429: their client held its `max_client_share` of
    /// every instance that had room.
    pub over_share: AtomicU64,
    propagation: Mutex<Vec<Duration>>,
    /// How long the last table build took (µs).
    last_build_us: AtomicU64,
    /// The longest table build since start (µs).
    max_build_us: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LbSnapshot {
    /// Every request the lb answered.
    pub requests: RequestSnapshot,
    /// Retries on another instance.
    pub retries: u64,
    /// Routing changes applied.
    pub changes: u64,
    /// Client connections cut because the client stalled (`client_timeout`).
    pub cut_stalled: u64,
    /// Idle connections closed (`idle_timeout`).
    pub cut_idle: u64,
    /// Connections closed before their first request or h2 preface (`handshake_timeout`).
    pub cut_handshake: u64,
    /// Requests cut for a body slower than `min_body_rate` (408).
    pub body_too_slow: u64,
    /// Requests cut at `request_timeout` (408).
    pub request_deadline: u64,
    /// Requests refused over their client's `max_client_share` (429).
    pub over_share: u64,
    /// Median propagation time of the recent changes.
    pub propagation_p50: Option<Duration>,
    /// 99th percentile propagation time of the recent changes.
    pub propagation_p99: Option<Duration>,
    /// How long the last routing table took to build.
    pub last_build: Duration,
    /// The longest table build since start.
    pub max_build: Duration,
}

impl LbStats {
    /// Records one routing change and how long it took to go live.
    pub fn propagation(&self, took: Duration) {
        self.changes.fetch_add(1, Ordering::Relaxed);
        let mut ring = self.propagation.lock();
        if ring.len() == PROPAGATION_SAMPLES {
            ring.remove(0);
        }
        ring.push(took);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> LbSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut samples = self.propagation.lock().clone();
        samples.sort();
        let pct = |p: usize| (!samples.is_empty()).then(|| samples[(samples.len() - 1) * p / 100]);
        LbSnapshot {
            requests: self.requests.snapshot(),
            retries: load(&self.retries),
            changes: load(&self.changes),
            cut_stalled: load(&self.cut_stalled),
            cut_idle: load(&self.cut_idle),
            cut_handshake: load(&self.cut_handshake),
            body_too_slow: load(&self.body_too_slow),
            request_deadline: load(&self.request_deadline),
            over_share: load(&self.over_share),
            propagation_p50: pct(50),
            propagation_p99: pct(99),
            last_build: Duration::from_micros(load(&self.last_build_us)),
            max_build: Duration::from_micros(load(&self.max_build_us)),
        }
    }

    /// Counts one connection cut by its watchdog.
    pub fn cut(&self, why: super::client::Cut) {
        use super::client::Cut;
        match why {
            Cut::Stalled => &self.cut_stalled,
            Cut::Idle => &self.cut_idle,
            Cut::Handshake => &self.cut_handshake,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long one table build took.
    pub fn table_built(&self, took: Duration) {
        let us = took.as_micros() as u64;
        self.last_build_us.store(us, Ordering::Relaxed);
        self.max_build_us.fetch_max(us, Ordering::Relaxed);
    }
}
