//! Counters per route, kept in the process for the admin API.
//!
//! Relaxed atomics, sharded: each UDP worker thread writes to its own cache-line
//! aligned shard (two workers bumping one counter would bounce its cache line
//! between cores on every query); readers sum the shards into a [`RouteSnapshot`].
//! Nothing here allocates after start.

use crate::report::histogram::{BOUNDS, Bounds, Histogram, Snapshot};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where a question was answered from; its [`AnswerSource::name`] is the
/// route label of the metrics and the key of the admin API's `routes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerSource {
    /// Forwarded to Consul (never cached).
    Consul,
    /// The wildcard domain or Consul A/AAAA answered with LB hosts.
    Lb,
    /// An authoritative zone from `zones_dir`.
    Zone,
    /// Everything else: the upstream resolvers, through the cache.
    Upstream,
    /// Refused (client outside `allow`) or malformed before routing.
    Rejected,
}

impl AnswerSource {
    /// Every route, in display order.
    pub const ALL: [AnswerSource; 5] = [
        AnswerSource::Consul,
        AnswerSource::Lb,
        AnswerSource::Zone,
        AnswerSource::Upstream,
        AnswerSource::Rejected,
    ];

    /// Name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            AnswerSource::Consul => "consul",
            AnswerSource::Lb => "lb",
            AnswerSource::Zone => "zone",
            AnswerSource::Upstream => "upstream",
            AnswerSource::Rejected => "rejected",
        }
    }
}

/// Upper bounds (microseconds) of the upstream latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; BOUNDS] = [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000];

/// The upstream latency buckets (see [`LATENCY_BUCKETS_US`]).
#[derive(Debug)]
pub struct UpstreamLatency;

impl Bounds for UpstreamLatency {
    const US: [u64; BOUNDS] = LATENCY_BUCKETS_US;
}

/// Counters of one route.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Questions routed here.
    pub queries: AtomicU64,
    /// Responses by RCODE 0..=5; index 6 counts every other code.
    pub rcodes: [AtomicU64; 7],
    /// Answers served from the cache (upstream) or pre-encoded local answers.
    pub cache_hits: AtomicU64,
    /// Expired answers served because every upstream failed (RFC 8767).
    pub stale_served: AtomicU64,
    /// Upstream exchanges by latency.
    pub latency: Histogram<UpstreamLatency>,
    /// Upstream exchanges that failed (timeout, unreachable).
    pub upstream_errors: AtomicU64,
    /// Datagrams on a question's socket that were not its answer (wrong ID,
    /// case or question: late, stray or spoofed), ignored.
    pub ignored_responses: AtomicU64,
    /// Questions answered SERVFAIL (or stale) at once because `max_forwarded`
    /// questions were already on the wire.
    pub over_limit: AtomicU64,
    /// Exchanges a UDP worker made itself, on its own socket (Consul only).
    pub inline_exchanges: AtomicU64,
    /// Questions a UDP worker would have asked itself but its pending table was
    /// full: they took the task path instead (Consul only).
    pub inline_overflow: AtomicU64,
}

impl RouteStats {
    /// Counts one answered query with its RCODE.
    #[inline]
    pub fn answered(&self, rcode: u8) {
        self.queries.fetch_add(1, Ordering::Relaxed);
        self.rcodes[usize::from(rcode.min(6))].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one upstream exchange.
    pub fn upstream_latency(&self, took: Duration) {
        self.latency.record(took);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> RouteSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RouteSnapshot {
            queries: load(&self.queries),
            rcodes: std::array::from_fn(|i| load(&self.rcodes[i])),
            cache_hits: load(&self.cache_hits),
            stale_served: load(&self.stale_served),
            latency: self.latency.snapshot(),
            upstream_errors: load(&self.upstream_errors),
            ignored_responses: load(&self.ignored_responses),
            over_limit: load(&self.over_limit),
            inline_exchanges: load(&self.inline_exchanges),
            inline_overflow: load(&self.inline_overflow),
        }
    }
}

/// A point-in-time copy of [`RouteStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouteSnapshot {
    /// Questions.
    pub queries: u64,
    /// By RCODE (NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, other).
    pub rcodes: [u64; 7],
    /// Cache hits.
    pub cache_hits: u64,
    /// Stale answers served.
    pub stale_served: u64,
    /// Upstream latency (`latency_buckets`, `latency_sum_us`).
    #[serde(flatten)]
    pub latency: Snapshot,
    /// Failed upstream exchanges.
    pub upstream_errors: u64,
    /// Datagrams ignored on a question's socket (not its answer).
    pub ignored_responses: u64,
    /// Questions refused at once for `max_forwarded`.
    pub over_limit: u64,
    /// Exchanges made by the UDP workers themselves.
    pub inline_exchanges: u64,
    /// Questions that found a UDP worker's pending table full.
    pub inline_overflow: u64,
}

/// Counter shards: UDP workers take 1.., every other thread shares shard 0.
const SHARDS: usize = 8;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread write to shard `index` (UDP workers call this once).
pub fn set_worker_shard(index: usize) {
    SHARD.with(|s| s.set(index % SHARDS));
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    routes: [RouteStats; 5],
    dropped: AtomicU64,
}

/// Why a TCP client connection was closed by the server before its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpClose {
    /// The client is outside `allow`: closed at accept, before it takes a slot.
    NotAllowed,
    /// Its source already had `tcp_connections_per_source` connections.
    PerSource,
    /// Every connection slot was taken.
    Full,
    /// It did not read an answer within `tcp_idle_timeout` (a write stall).
    SlowReader,
}

impl TcpClose {
    /// Every reason, in display order.
    pub const ALL: [TcpClose; 4] = [
        TcpClose::NotAllowed,
        TcpClose::PerSource,
        TcpClose::Full,
        TcpClose::SlowReader,
    ];

    /// Name used in metrics.
    pub fn name(self) -> &'static str {
        match self {
            TcpClose::NotAllowed => "not_allowed",
            TcpClose::PerSource => "per_source",
            TcpClose::Full => "full",
            TcpClose::SlowReader => "slow_reader",
        }
    }
}

/// All DNS counters.
#[derive(Debug, Default)]
pub struct DnsStats {
    shards: [Shard; SHARDS],
    /// TCP connections closed by the server, by [`TcpClose`] (rare: not sharded).
    tcp_closed: [AtomicU64; 4],
}

impl DnsStats {
    /// The calling thread's counters of `route`, to record into.
    #[inline]
    pub fn at(&self, route: AnswerSource) -> &RouteStats {
        &self.shards[SHARD.with(Cell::get)].routes[route as usize]
    }

    /// Counts a packet dropped unanswered (responses, runt packets, overload).
    #[inline]
    pub fn count_dropped(&self) {
        self.shards[SHARD.with(Cell::get)]
            .dropped
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a TCP connection the server closed for `why`.
    pub fn count_tcp_closed(&self, why: TcpClose) {
        self.tcp_closed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// TCP connections closed for `why` so far.
    pub fn tcp_closed(&self, why: TcpClose) -> u64 {
        self.tcp_closed[why as usize].load(Ordering::Relaxed)
    }

    /// Packets dropped unanswered so far.
    pub fn dropped(&self) -> u64 {
        self.shards.iter().map(|s| s.dropped.load(Ordering::Relaxed)).sum()
    }

    /// The counters of `route`, summed over all threads.
    pub fn route(&self, route: AnswerSource) -> RouteSnapshot {
        let mut total = RouteSnapshot::default();
        for shard in &self.shards {
            total.add(&shard.routes[route as usize].snapshot());
        }
        total
    }

    /// Snapshot of every route, by name.
    pub fn snapshot(&self) -> Vec<(&'static str, RouteSnapshot)> {
        AnswerSource::ALL.iter().map(|r| (r.name(), self.route(*r))).collect()
    }
}

impl RouteSnapshot {
    fn add(&mut self, other: &RouteSnapshot) {
        self.queries += other.queries;
        for (a, b) in self.rcodes.iter_mut().zip(other.rcodes) {
            *a += b;
        }
        self.cache_hits += other.cache_hits;
        self.stale_served += other.stale_served;
        self.latency.add(&other.latency);
        self.upstream_errors += other.upstream_errors;
        self.ignored_responses += other.ignored_responses;
        self.over_limit += other.over_limit;
        self.inline_exchanges += other.inline_exchanges;
        self.inline_overflow += other.inline_overflow;
    }

    /// Upstream exchanges made (merged questions count once).
    pub fn exchanges(&self) -> u64 {
        self.latency.count()
    }
}
