//! The one blocking-query loop of the appliance: every long poll on Consul (the
//! catalog signal, the unhealthy checks, the KV tree) runs through [`follow`].
//!
//! ```text
//!  follow(lane, path) ── GET path?index=I&wait=55s ──▶ answer (index J, body)
//!     J < I            ─▶ Event { reset: true }   (snapshot restore, new agent)
//!     after a failure  ─▶ Event { reset: true }   (changes may have been missed)
//!     same index, at the end of the wait ─▶ nothing
//!     same index, early ─▶ ask again with index 0 at once: Consul wakes its
//!                         blocking queries this way when a snapshot restore
//!                         replaces its state, and the next answer shows
//!                         whether the index went backwards
//!     otherwise        ─▶ Event { reset: false }
//!     error            ─▶ backoff 250 ms doubling to 30 s; WatchStats says so;
//!                         logged at warn only when the agent should answer
//!                         (not while `up` starts or stops it: AgentPhase)
//!  then: token bucket (burst 4, one per 10 ms) before the next request
//! ```
//!
//! Consul's rules for blocking queries (api-docs/features/blocking): a return is
//! no proof of change; an index that goes backwards means start over; never block
//! on index 0; rate-limit re-queries. A watch that hangs is cut by the request
//! timeout (wait + Consul's wait/16 jitter + slack), so a watch can be late but
//! never silently stale: its age is exported, and after a failure the consumer is
//! told to re-sync in full.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ConsulError;
use super::http::{Answer, ConsulHttp, Endpoint, Lane};

/// How long a blocking query may wait in Consul.
pub const BLOCKING_WAIT: Duration = Duration::from_secs(55);
/// How long a blocking request may take in all: the wait, Consul's jitter of up
/// to wait/16, and slack for a busy agent.
pub const BLOCKING_TIMEOUT: Duration = Duration::from_secs(55 + 4 + 10);
/// Immediate re-queries a watch may make in a row.
pub const WATCH_BURST: f64 = 4.0;
/// Time to earn one more immediate re-query.
pub const WATCH_REFILL: Duration = Duration::from_millis(10);

/// Blocking-query bookkeeping: the index to send next, the error backoff, and a
/// token bucket (burst [`WATCH_BURST`], one token per [`WATCH_REFILL`]) that lets
/// quick successive changes through at once but rate-limits a storm of immediate
/// answers.
#[derive(Debug)]
pub struct Watch {
    /// The index to send.
    index: u64,
    /// The last index Consul answered with (what "backwards" is measured against).
    seen: u64,
    failures: u32,
    tokens: f64,
    refilled: Instant,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            index: 0,
            seen: 0,
            failures: 0,
            tokens: WATCH_BURST,
            refilled: Instant::now(),
        }
    }
}

impl Watch {
    /// The index for the next request.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Records a successful answer carrying `new_index`; true when the index went
    /// backwards (everything known before is suspect).
    pub fn success(&mut self, new_index: u64) -> bool {
        self.failures = 0;
        let backwards = new_index < self.seen;
        self.seen = new_index;
        // An index of 0 would not block: Consul's advice is to treat it as 1.
        self.index = new_index.max(1);
        backwards
    }

    /// The last index Consul answered with.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The next request asks with index 0 (it returns at once with Consul's
    /// current index), keeping the last one seen to compare it with.
    pub fn probe(&mut self) {
        self.index = 0;
    }

    /// Records a failure and returns how long to wait before retrying.
    pub fn failure(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.index = 0;
        let ms = 250u64 << self.failures.min(7);
        Duration::from_millis(ms.min(30_000))
    }

    /// How long to wait before the next request after a successful one: nothing
    /// while the bucket has a token, else until it earns one.
    pub fn spacing(&mut self) -> Duration {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() / WATCH_REFILL.as_secs_f64();
        self.tokens = (self.tokens + earned).min(WATCH_BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Duration::ZERO
        } else {
            let wait = WATCH_REFILL.mul_f64(1.0 - self.tokens);
            self.tokens = 0.0;
            self.refilled = now + wait;
            wait
        }
    }
}

/// What one watch has done, for `/metrics` and the status pages.
#[derive(Debug)]
pub struct WatchStats {
    /// The watch's name (`services`, `critical`, `warning`, `kv:haproxy/`).
    pub name: String,
    started: Instant,
    /// Milliseconds after `started` of the last answer (0: none yet).
    last_ok_ms: AtomicU64,
    index: AtomicU64,
    answers: AtomicU64,
    failures: AtomicU64,
    resets: AtomicU64,
    /// The last request failed.
    failing: std::sync::atomic::AtomicBool,
}

/// A copy of [`WatchStats`] at one moment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WatchSnapshot {
    /// The watch's name.
    pub name: String,
    /// Seconds since Consul last answered it (`None`: never yet).
    pub age_secs: Option<f64>,
    /// The index it holds.
    pub index: u64,
    /// Answers received.
    pub answers: u64,
    /// Requests that failed.
    pub failures: u64,
    /// Times its index went backwards or it recovered from a failure.
    pub resets: u64,
    /// Its last request failed.
    pub failing: bool,
}

impl WatchStats {
    /// Counters for a watch called `name`.
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            started: Instant::now(),
            last_ok_ms: AtomicU64::new(0),
            index: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            failing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn answered(&self, index: u64) {
        let ms = self.started.elapsed().as_millis().max(1) as u64;
        self.last_ok_ms.store(ms, Ordering::Relaxed);
        self.index.store(index, Ordering::Relaxed);
        self.answers.fetch_add(1, Ordering::Relaxed);
        self.failing.store(false, Ordering::Relaxed);
    }

    fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.failing.store(true, Ordering::Relaxed);
    }

    /// True while the watch's last request failed.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Time since Consul last answered this watch.
    pub fn age(&self) -> Option<Duration> {
        let ms = self.last_ok_ms.load(Ordering::Relaxed);
        (ms > 0).then(|| self.started.elapsed().saturating_sub(Duration::from_millis(ms)))
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> WatchSnapshot {
        WatchSnapshot {
            name: self.name.clone(),
            age_secs: self.age().map(|a| a.as_secs_f64()),
            index: self.index.load(Ordering::Relaxed),
            answers: self.answers.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            failing: self.failing(),
        }
    }
}

/// One answer of a watch, decoded.
#[derive(Debug)]
pub struct Event<T> {
    /// The decoded body.
    pub value: T,
    /// Consul's index for it.
    pub index: u64,
    /// When the answer arrived (propagation is measured from here).
    pub received: Instant,
    /// Changes may have been missed before this answer (first answer, index gone
    /// backwards, or the watch failed in between): re-read everything.
    pub reset: bool,
}

/// Decodes a watch's answer.
pub type Decode<T> = fn(&ConsulHttp, Endpoint, &Answer) -> Result<T, ConsulError>;

/// What a watch asks: the endpoint (for counters), the path with its query
/// string (without `index`/`wait`), and how to read the answer.
pub struct Query<T> {
    /// The endpoint, as counted.
    pub endpoint: Endpoint,
    /// Path and query string.
    pub path: String,
    /// Reads the body.
    pub decode: Decode<T>,
}

/// Follows `query` on `lane` until `shutdown` or until `events` is closed,
/// sending every answer that moved (as `wrap` makes it, so several watches can
/// share one channel).
pub async fn follow<T: Send + 'static, S: Send + 'static>(
    mut lane: Lane,
    query: Query<T>,
    stats: Arc<WatchStats>,
    events: mpsc::Sender<S>,
    wrap: impl Fn(Event<T>) -> S + Send + 'static,
    shutdown: CancellationToken,
) {
    let Query { endpoint, path, decode } = query;
    let http = lane.http().clone();
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut watch = Watch::default();
    let mut reset = true;
    loop {
        let url = format!("{path}{sep}index={}&wait={}s", watch.index(), BLOCKING_WAIT.as_secs());
        let requested = watch.index();
        let asked = Instant::now();
        let answer = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = lane.get(endpoint, &url, BLOCKING_TIMEOUT) => a,
        };
        let received = Instant::now();
        let decoded = answer.and_then(|a| {
            let value = decode(&http, endpoint, &a)?;
            Ok((a, value))
        });
        let pause = match decoded {
            Ok((answer, value)) => {
                let before = watch.seen();
                if watch.success(answer.index) {
                    reset = true;
                }
                stats.answered(watch.seen());
                let woken_early = requested > 0
                    && answer.index == requested
                    && asked.elapsed() + Duration::from_secs(5) < BLOCKING_WAIT;
                if woken_early {
                    watch.probe();
                }
                tracing::trace!(watch = %stats.name, requested, index = answer.index, reset, woken_early, "consul watch answered");
                if reset || watch.seen() != before {
                    if reset {
                        stats.resets.fetch_add(1, Ordering::Relaxed);
                    }
                    let event = Event {
                        value,
                        index: watch.seen(),
                        received,
                        reset,
                    };
                    if events.send(wrap(event)).await.is_err() {
                        return;
                    }
                    reset = false;
                }
                watch.spacing()
            }
            Err(error) => {
                stats.failed();
                let pause = watch.failure();
                reset = true;
                if http.phase().failure_is_outage() {
                    tracing::warn!(watch = %stats.name, %error, retry_in = ?pause, "consul watch failed; keeping what it last said");
                } else {
                    // The agent `up` is starting or stopping: expected, not an outage.
                    tracing::debug!(watch = %stats.name, %error, retry_in = ?pause, phase = ?http.phase(), "consul watch failed while the agent starts or stops");
                }
                pause
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        let mut w = Watch::default();
        assert!(!w.success(10));
        assert_eq!(w.index(), 10);
        assert!(!w.success(10));
        assert!(w.success(5)); // backwards: the caller starts over
        assert_eq!(w.index(), 5);
        w.success(0);
        assert_eq!(w.index(), 1, "never block on index 0");
        assert!(!w.success(7));
        w.probe();
        assert_eq!((w.index(), w.seen()), (0, 7), "a probe asks with 0, remembers 7");
        assert!(w.success(6), "and sees that the index went back");
        assert!(w.failure() >= Duration::from_millis(250));
        assert_eq!(w.index(), 0);
        // WATCH_BURST immediate re-queries, then paced.
        for _ in 0..WATCH_BURST as usize {
            assert_eq!(w.spacing(), Duration::ZERO);
        }
        let paced = w.spacing();
        assert!(paced > WATCH_REFILL / 2 && paced <= WATCH_REFILL, "{paced:?}");
        for _ in 0..20 {
            assert!(w.failure() <= Duration::from_secs(30));
        }
    }

    #[test]
    fn age_is_none_until_an_answer() {
        let s = WatchStats::new("t");
        assert!(s.age().is_none());
        std::thread::sleep(Duration::from_millis(2));
        s.answered(7);
        assert!(s.age().unwrap() < Duration::from_secs(1));
        assert_eq!(s.snapshot().index, 7);
    }
}
