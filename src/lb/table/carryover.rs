//! What outlives a routing table: the state of every instance address
//! ([`InstanceState`]: passive ejection, the active check's verdict, requests in
//! flight) and the request counters of every route, held by the [`Carryover`].
//!
//! ```text
//!  compile (new backends) ──get(addr) / route_counters()──▶ Carryover ◀── delta / full build:
//!        │                                                    │         forget / retain what left
//!        ▼                                                    ▼
//!  BackendInstance.state (Arc, shared by every table)   status page: route_total()
//!        ▲ proxy: eject, in-flight    ▲ checks: check_up
//! ```
//!
//! A table rebuild never resets these: an ejected instance stays ejected and a
//! route's counters stay monotonic while the address or route is in some table.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use crate::lb::stats::RequestCounters;

// The health fields are independent flags read on the hot path; nothing is
// published through them, so Relaxed ordering is enough everywhere below.

/// Destination counters of routes no table has any more, kept at most (see
/// [`Carryover::retain_routes`] and [`Carryover::retire_routes`]).
pub const MAX_RETIRED_ROUTES: usize = 1024;

/// Per-instance state that must survive table rebuilds (keyed by address).
#[derive(Debug)]
pub struct InstanceState {
    /// Passive ejection: the instance is skipped until this many ms after the
    /// [`Carryover`] epoch. 0 = never ejected.
    pub ejected_until_ms: AtomicU64,
    /// Verdict of the active check. Starts true: Consul already says the instance
    /// passes, and waiting for our own first check would delay every new deploy.
    pub check_up: AtomicBool,
    /// Requests in flight to this instance (for maxconn and the status page).
    pub inflight: AtomicUsize,
    /// Told (`notify_one`) whenever an in-flight slot is given back, so a
    /// request queued for a full instance is woken, not polling.
    pub freed: tokio::sync::Notify,
    /// Connections to it that failed (each one ejected it; the request was
    /// retried elsewhere while retries remained). Counted on that error path only.
    pub connect_errors: AtomicU64,
    /// When the last active check ended (ms after the [`Carryover`] epoch; 0: none yet).
    pub last_check_ms: AtomicU64,
    /// Its result, see [`CheckResult`] (0: none yet).
    pub last_check: AtomicU32,
    /// When it last went down or up (check verdict, ejection; ms after the
    /// epoch; 0: not since the lb first saw it). An ejection that simply
    /// expires is a change at `ejected_until_ms`, read from there.
    pub changed_ms: AtomicU64,
    /// Which client sources hold its in-flight slots (the per-client share).
    pub holders: crate::lb::share::Holders,
}

/// The result of an active check, as HAProxy's stats page names them
/// (`L4OK`, `L4CON`, `L4TOUT`, `L7OK`, `L7STS 503`, `L7RSP`, `L7TOUT`), packed
/// in a `u32` for [`InstanceState::last_check`]: the kind above the low 16
/// bits, an HTTP status in them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    /// TCP connect succeeded (no `haproxy_httpchk`).
    L4Ok,
    /// TCP connect refused or failed.
    L4Con,
    /// No TCP connection within the timeout.
    L4Tout,
    /// HTTP check answered 2xx/3xx.
    L7Ok,
    /// HTTP check answered with another status.
    L7Sts(u16),
    /// HTTP check got no valid answer (closed, not HTTP, a read or write error).
    L7Rsp,
    /// HTTP check without an answer within the timeout.
    L7Tout,
}

impl CheckResult {
    /// Packed for [`InstanceState::last_check`] (never 0).
    pub fn pack(self) -> u32 {
        let (kind, status) = match self {
            CheckResult::L4Ok => (1, 0),
            CheckResult::L4Con => (2, 0),
            CheckResult::L4Tout => (3, 0),
            CheckResult::L7Ok => (4, 0),
            CheckResult::L7Sts(s) => (5, s),
            CheckResult::L7Rsp => (6, 0),
            CheckResult::L7Tout => (7, 0),
        };
        (kind << 16) | u32::from(status)
    }

    /// Unpacked (None for 0 or garbage).
    pub fn unpack(packed: u32) -> Option<Self> {
        Some(match packed >> 16 {
            1 => CheckResult::L4Ok,
            2 => CheckResult::L4Con,
            3 => CheckResult::L4Tout,
            4 => CheckResult::L7Ok,
            5 => CheckResult::L7Sts(packed as u16),
            6 => CheckResult::L7Rsp,
            7 => CheckResult::L7Tout,
            _ => return None,
        })
    }

    /// True for a passing check.
    pub fn passed(self) -> bool {
        matches!(self, CheckResult::L4Ok | CheckResult::L7Ok)
    }
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckResult::L4Ok => f.write_str("L4OK"),
            CheckResult::L4Con => f.write_str("L4CON"),
            CheckResult::L4Tout => f.write_str("L4TOUT"),
            CheckResult::L7Ok => f.write_str("L7OK"),
            CheckResult::L7Sts(s) => write!(f, "L7STS {s}"),
            CheckResult::L7Rsp => f.write_str("L7RSP"),
            CheckResult::L7Tout => f.write_str("L7TOUT"),
        }
    }
}

// Not derived: a derived Default would start with check_up = false.
impl Default for InstanceState {
    fn default() -> Self {
        Self {
            ejected_until_ms: AtomicU64::new(0),
            check_up: AtomicBool::new(true),
            inflight: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
            connect_errors: AtomicU64::new(0),
            last_check_ms: AtomicU64::new(0),
            last_check: AtomicU32::new(0),
            changed_ms: AtomicU64::new(0),
            holders: crate::lb::share::Holders::default(),
        }
    }
}

impl InstanceState {
    /// True when the instance is neither ejected at `now_ms` nor failing its check.
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms && self.check_up.load(Ordering::Relaxed)
    }
}

/// Owns the state that outlives a table generation: [`InstanceState`] per
/// instance address and [`RequestCounters`] per route.
#[derive(Debug)]
pub struct Carryover {
    /// One entry per address in a live table; the tables hold clones of the Arcs.
    pub(super) by_addr: Mutex<HashMap<SocketAddr, Arc<InstanceState>>>,
    /// Counters per (service, datacenter), and which routes left the table.
    pub(super) routes: Mutex<RouteBook>,
    /// Zero of every `*_ms` time, so the times fit an atomic u64.
    epoch: Instant,
}

/// The route counters. Kept when a route goes away (up to
/// [`MAX_RETIRED_ROUTES`] of them, and only those that served requests), so the
/// counts stay monotonic for scrapers when it returns.
#[derive(Debug, Default)]
pub(super) struct RouteBook {
    /// Counters by (service, datacenter), and whether a spec of the table has
    /// that route (`live`).
    by_route: HashMap<(String, String), (Arc<RequestCounters>, bool)>,
    /// Routes that went away, oldest first: the first to go when more than
    /// [`MAX_RETIRED_ROUTES`] are kept. May name routes live again or gone
    /// since (skipped when reached); compacted when it holds more than twice
    /// the bound.
    pub(super) retired: std::collections::VecDeque<(String, String)>,
    /// Routes in `by_route` that are not live.
    pub(super) retired_count: usize,
}

impl RouteBook {
    /// Drops the oldest retired routes beyond [`MAX_RETIRED_ROUTES`].
    fn evict(&mut self) {
        while self.retired_count > MAX_RETIRED_ROUTES {
            let Some(key) = self.retired.pop_front() else {
                break;
            };
            if self.by_route.get(&key).is_some_and(|(_, live)| !live) {
                self.by_route.remove(&key);
                self.retired_count -= 1;
            }
        }
        if self.retired.len() > 2 * MAX_RETIRED_ROUTES + 64 {
            let mut seen = HashSet::new();
            let by_route = &self.by_route;
            self.retired
                .retain(|k| by_route.get(k).is_some_and(|(_, live)| !live) && seen.insert(k.clone()));
        }
    }
}

impl Default for Carryover {
    fn default() -> Self {
        Self::new()
    }
}

impl Carryover {
    /// An empty carryover whose clock starts now.
    pub fn new() -> Self {
        Self {
            by_addr: Mutex::new(HashMap::new()),
            routes: Mutex::new(RouteBook::default()),
            epoch: Instant::now(),
        }
    }

    /// The state of `addr`, created on first use (available, nothing in flight).
    pub fn get(&self, addr: SocketAddr) -> Arc<InstanceState> {
        let mut map = self.by_addr.lock();
        map.entry(addr).or_default().clone()
    }

    /// The request counters of a service's route in a datacenter (a route a
    /// table is being built with, so live).
    pub fn route_counters(&self, service: &str, datacenter: &str) -> Arc<RequestCounters> {
        let mut book = self.routes.lock();
        let book = &mut *book;
        let (counters, live) = book
            .by_route
            .entry((service.to_string(), datacenter.to_string()))
            .or_insert_with(|| (Arc::default(), true));
        if !*live {
            *live = true;
            book.retired_count -= 1;
        }
        counters.clone()
    }

    /// Requests answered through a route so far, without creating its counters.
    pub fn route_total(&self, service: &str, datacenter: &str) -> Option<u64> {
        let book = self.routes.lock();
        book.by_route
            .get(&(service.to_string(), datacenter.to_string()))
            .map(|(c, _)| c.snapshot().total())
    }

    /// Bounds the route counters after a full table build: the routes of `live`
    /// stay; of the others (services gone, other-datacenter names nobody asks
    /// for any more, made-up names that were watched), those that never served
    /// a request go at once, and the rest are kept up to [`MAX_RETIRED_ROUTES`].
    pub fn retain_routes<'a>(&self, live: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let live: HashSet<(&str, &str)> = live.into_iter().collect();
        let mut book = self.routes.lock();
        book.by_route.retain(|k, (c, is_live)| {
            *is_live = live.contains(&(k.0.as_str(), k.1.as_str()));
            *is_live || c.snapshot().total() > 0
        });
        let retired: std::collections::VecDeque<(String, String)> = book
            .by_route
            .iter()
            .filter(|(_, (_, live))| !live)
            .map(|(k, _)| k.clone())
            .collect();
        book.retired_count = retired.len();
        book.retired = retired;
        book.evict();
    }

    /// [`Self::retain_routes`] for a delta: the routes of `gone` left the
    /// table (those that never served go at once, the others join the retired
    /// ones, bounded as there), and those of `back` are in it again. Costs
    /// what the delta names, not what the table holds.
    pub fn retire_routes<'a>(
        &self,
        gone: impl IntoIterator<Item = (&'a str, &'a str)>,
        back: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        let mut book = self.routes.lock();
        let book = &mut *book;
        for (service, datacenter) in gone {
            let key = (service.to_string(), datacenter.to_string());
            let Some((counters, live)) = book.by_route.get_mut(&key) else {
                continue;
            };
            if !*live {
                continue;
            }
            if counters.snapshot().total() == 0 {
                book.by_route.remove(&key);
            } else {
                *live = false;
                book.retired_count += 1;
                book.retired.push_back(key);
            }
        }
        for (service, datacenter) in back {
            if let Some((_, live)) = book.by_route.get_mut(&(service.to_string(), datacenter.to_string()))
                && !*live
            {
                *live = true;
                book.retired_count -= 1;
            }
        }
        book.evict();
    }

    /// Destination counter sets held (for the tests).
    pub fn route_count(&self) -> usize {
        self.routes.lock().by_route.len()
    }

    /// Forgets instances not in `live` (no longer in any table), so a returning
    /// address starts afresh and the map does not grow forever.
    pub fn retain(&self, live: &HashSet<SocketAddr>) {
        let mut map = self.by_addr.lock();
        map.retain(|addr, _| live.contains(addr));
    }

    /// [`Self::retain`] for a delta: forgets the addresses that left every table.
    pub fn forget(&self, gone: impl IntoIterator<Item = SocketAddr>) {
        let mut map = self.by_addr.lock();
        for addr in gone {
            map.remove(&addr);
        }
    }

    /// Addresses held (for the tests).
    pub fn addr_count(&self) -> usize {
        self.by_addr.lock().len()
    }

    /// Removes from `map` the addresses no table has (one lock for all).
    pub fn retain_live<T>(&self, map: &mut HashMap<SocketAddr, T>) {
        let live = self.by_addr.lock();
        map.retain(|addr, _| live.contains_key(addr));
    }

    /// Milliseconds since the carryover was created.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Passive ejection after a connect failure: skip the instance for `for_ms`.
    /// Never shortens an ejection already running.
    pub fn eject(&self, h: &InstanceState, for_ms: u64) {
        let now = self.now_ms();
        let until = now.saturating_add(for_ms);
        let before = h.ejected_until_ms.fetch_max(until, Ordering::Relaxed);
        h.connect_errors.fetch_add(1, Ordering::Relaxed);
        // Was serving, now ejected: a state change (for the stats page).
        if before <= now {
            h.changed_ms.store(now.max(1), Ordering::Relaxed);
        }
    }
}
