//! The routing table: which backend an HTTP request or a TCP port goes to. Made
//! from the watcher's view of Consul, never changed once published, and swapped
//! whole.
//!
//! ```text
//!  ServiceSpec per (service, datacenter) ──TableState──▶ RoutingTable ──ArcSwap──▶ proxy
//!    (passing instances + parsed tags)   (delta │ build)  route(host, path) ─▶ Route
//!  HealthRegistry (outlives every table) ───────┘         tcp_ports()       ─▶ listeners
//!                                                         Backend::pick()   ─▶ instance
//! ```
//!
//! The table's maps are persistent (`imbl`): [`TableState`] (in `delta.rs`) makes
//! the next table from the last one by a delta, the changed services' claims
//! out and in, so a change costs what it touches and the new table shares every
//! other entry with the old one. [`RoutingTable::build`] is the full build from
//! nothing, used for the first table, when the TCP listener ports move, for the
//! watcher's periodic re-sync, and as the reference the delta is checked against.
//!
//! `route` looks up, in order: the Host (exact names, then Fabio host+path prefixes,
//! then `svc.service.<dc>.<domain>` falling back to the local service), the path
//! prefixes (`haproxy_route`, host-less Fabio prefixes, longest wins), the landing
//! hosts, and otherwise gives up. Names are lower-cased at build time, so a request
//! costs a few hash lookups on slices of its Host and path; only a Host with
//! upper-case letters is copied.
//!
//! Conflicts (two services claiming one host, path or port) go to the service whose
//! name sorts first, and are reported as warnings, so the outcome never depends on
//! the order Consul answered in.
//!
//! What Consul says is checked here against the [`BackendPolicy`] (names, own
//! listeners, backend networks, TCP ports): a refused service, instance or port
//! never enters the table, so nothing that reads the table can connect to it.
//!
//! What must outlive a rebuild (ejections, check verdicts, in-flight counts) lives in
//! [`InstanceHealth`], shared by address through the [`HealthRegistry`]. The
//! round-robin position is per backend, and a service whose spec is unchanged
//! keeps its backend from table to table: only a changed service restarts its
//! sequence, which skews its weighted split for the few requests around the swap.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use super::policy::{BackendPolicy, Refusal, Refused, is_service_name};
use super::stats::RequestCounters;
use super::tags::{self, HttpCheck, InstanceTags};

mod delta;
pub use delta::{Applied, TableState};

// The health fields are independent flags read on the hot path; nothing is
// published through them, so Relaxed ordering is enough everywhere below.

/// Route counters of routes no table has any more, kept at most (see
/// [`HealthRegistry::retain_routes`] and [`HealthRegistry::retire_routes`]).
pub const MAX_RETIRED_ROUTES: usize = 1024;

/// Per-instance state that must survive table rebuilds (keyed by address).
#[derive(Debug)]
pub struct InstanceHealth {
    /// Passive ejection: the instance is skipped until this many ms after the
    /// [`HealthRegistry`] epoch. 0 = never ejected.
    pub ejected_until_ms: AtomicU64,
    /// Verdict of the active check. Starts true: Consul already says the instance
    /// passes, and waiting for our own first check would delay every new deploy.
    pub check_up: AtomicBool,
    /// Requests in flight to this instance (for maxconn and the status page).
    pub inflight: AtomicUsize,
    /// Told (`notify_one`) whenever an in-flight slot is given back, so a
    /// request queued for a full instance is woken, not polling.
    pub freed: tokio::sync::Notify,
}

// Not derived: a derived Default would start with check_up = false.
impl Default for InstanceHealth {
    fn default() -> Self {
        Self {
            ejected_until_ms: AtomicU64::new(0),
            check_up: AtomicBool::new(true),
            inflight: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
        }
    }
}

impl InstanceHealth {
    /// True when the instance is neither ejected at `now_ms` nor failing its check.
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms && self.check_up.load(Ordering::Relaxed)
    }
}

/// Owns the state that outlives a table generation: [`InstanceHealth`] per
/// instance address and [`RequestCounters`] per route.
#[derive(Debug)]
pub struct HealthRegistry {
    /// One entry per address in a live table; the tables hold clones of the Arcs.
    by_addr: Mutex<HashMap<SocketAddr, Arc<InstanceHealth>>>,
    /// Counters per (service, datacenter), and which routes left the table.
    routes: Mutex<RouteBook>,
    /// Zero of every `*_ms` time, so the times fit an atomic u64.
    epoch: Instant,
}

/// The route counters. Kept when a route goes away (up to
/// [`MAX_RETIRED_ROUTES`] of them, and only those that served requests), so the
/// counts stay monotonic for scrapers when it returns.
#[derive(Debug, Default)]
struct RouteBook {
    /// Counters by (service, datacenter), and whether a spec of the table has
    /// that route (`live`).
    by_route: HashMap<(String, String), (Arc<RequestCounters>, bool)>,
    /// Routes that went away, oldest first: the first to go when more than
    /// [`MAX_RETIRED_ROUTES`] are kept. May name routes live again or gone
    /// since (skipped when reached); compacted when it holds more than twice
    /// the bound.
    retired: std::collections::VecDeque<(String, String)>,
    /// Routes in `by_route` that are not live.
    retired_count: usize,
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

impl Default for HealthRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthRegistry {
    /// An empty registry whose clock starts now.
    pub fn new() -> Self {
        Self {
            by_addr: Mutex::new(HashMap::new()),
            routes: Mutex::new(RouteBook::default()),
            epoch: Instant::now(),
        }
    }

    /// The state of `addr`, created on first use (available, nothing in flight).
    pub fn get(&self, addr: SocketAddr) -> Arc<InstanceHealth> {
        // The map cannot be left half-updated by a panic, so a poisoned lock is fine to use.
        let mut map = self.by_addr.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(addr).or_default().clone()
    }

    /// The request counters of a service's route in a datacenter (a route a
    /// table is being built with, so live).
    pub fn route_counters(&self, service: &str, datacenter: &str) -> Arc<RequestCounters> {
        let mut book = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
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
        let book = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
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
        let mut book = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
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
        let mut book = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
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

    /// Route counter sets held (for the tests).
    pub fn route_count(&self) -> usize {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_route
            .len()
    }

    /// Forgets instances not in `live` (no longer in any table), so a returning
    /// address starts afresh and the map does not grow forever.
    pub fn retain(&self, live: &HashSet<SocketAddr>) {
        let mut map = self.by_addr.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|addr, _| live.contains(addr));
    }

    /// [`Self::retain`] for a delta: forgets the addresses that left every table.
    pub fn forget(&self, gone: impl IntoIterator<Item = SocketAddr>) {
        let mut map = self.by_addr.lock().unwrap_or_else(PoisonError::into_inner);
        for addr in gone {
            map.remove(&addr);
        }
    }

    /// Addresses held (for the tests).
    pub fn addr_count(&self) -> usize {
        self.by_addr.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Removes from `map` the addresses no table has (one lock for all).
    pub fn retain_live<T>(&self, map: &mut HashMap<SocketAddr, T>) {
        let live = self.by_addr.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|addr, _| live.contains_key(addr));
    }

    /// Milliseconds since the registry was created.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Passive ejection after a connect failure: skip the instance for `for_ms`.
    /// Never shortens an ejection already running.
    pub fn eject(&self, h: &InstanceHealth, for_ms: u64) {
        let until = self.now_ms().saturating_add(for_ms);
        h.ejected_until_ms.fetch_max(until, Ordering::Relaxed);
    }
}

/// One Consul service instance as the watcher sees it (already only *passing* instances).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Consul service ID (for logs and the status page).
    pub id: String,
    /// Consul node name.
    pub node: String,
    /// Service address (node address when the service has none) and port.
    pub addr: SocketAddr,
    /// The instance's parsed tags.
    pub tags: InstanceTags,
}

/// One service's passing instances in one datacenter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Consul service name as registered.
    pub name: String,
    /// Datacenter the instances were read from.
    pub datacenter: String,
    /// The passing instances.
    pub instances: Vec<InstanceSpec>,
}

/// Naming inputs of the table.
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// Consul's DNS domain, e.g. `consul` (dots at the ends are ignored).
    pub consul_domain: String,
    /// This host's datacenter, e.g. `dc1`.
    pub local_datacenter: String,
    /// `HAPROXY_ADD_DOMAIN`, e.g. `.apps.example.com`; a missing leading dot is added.
    pub add_domain: Option<String>,
    /// Names and addresses answered with the landing page: `localhost`, `HOST_IP`,
    /// the hostname... (any case; a port or trailing dot is ignored).
    pub landing_hosts: Vec<String>,
    /// What Consul data may make the lb connect to and listen on.
    pub policy: BackendPolicy,
}

/// One instance as the proxy uses it.
#[derive(Debug)]
pub struct BackendInstance {
    /// Consul service ID.
    pub id: String,
    /// Consul node name.
    pub node: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Share of new traffic (`haproxy_weight`); 0 takes none.
    pub weight: u16,
    /// State shared with every other table that has this address.
    pub health: Arc<InstanceHealth>,
    /// The active HTTP check, or `None` for a TCP connect check.
    pub httpchk: Option<HttpCheck>,
}

/// The instances of one service that take HTTP (or, for a port from
/// [`RoutingTable::tcp_ports`], TCP) traffic, with smooth weighted round-robin state.
#[derive(Debug)]
pub struct Backend {
    /// Consul service name as registered.
    pub service: String,
    /// Datacenter of the instances.
    pub datacenter: String,
    /// The instances, in the order Consul listed them.
    pub instances: Vec<BackendInstance>,
    /// Requests answered through this route (kept across tables).
    pub counters: Arc<RequestCounters>,
    /// Current weight per instance (nginx's `current_weight`), index-aligned with
    /// `instances`. A std Mutex: held for a few additions, never across `.await`.
    current: Mutex<Vec<i64>>,
}

impl Backend {
    /// A backend over `instances`, starting its round-robin sequence afresh.
    pub fn new(
        service: String,
        datacenter: String,
        instances: Vec<BackendInstance>,
        counters: Arc<RequestCounters>,
    ) -> Self {
        let current = Mutex::new(vec![0; instances.len()]);
        Self {
            service,
            datacenter,
            instances,
            counters,
            current,
        }
    }

    /// Next instance by smooth weighted round-robin (nginx's algorithm: add each
    /// eligible weight to its current, pick the max, subtract the total) among
    /// instances with weight > 0 that are available at `now_ms` (not ejected, check
    /// not down) and not in `exclude` (addresses this request already tried).
    ///
    /// If every such instance is ejected or down, falls back to the least recently
    /// ejected ones (round-robin among equals) rather than failing: better a
    /// maybe-recovered backend than a certain 503. `None` when nothing is left.
    pub fn pick(&self, now_ms: u64, exclude: &[SocketAddr]) -> Option<&BackendInstance> {
        self.pick_where(now_ms, |i| exclude.contains(&i.addr))
    }

    /// [`Self::pick`] with the exclusion given as a predicate (`skip` returns true
    /// for instances this request must not use), so the per-request caller builds
    /// no list.
    pub fn pick_where(&self, now_ms: u64, skip: impl Fn(&BackendInstance) -> bool) -> Option<&BackendInstance> {
        let usable = |i: &BackendInstance| i.weight > 0 && !skip(i);
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let chosen = smooth_wrr(&self.instances, &mut current, |i| {
            usable(i) && i.health.is_available(now_ms)
        })
        .or_else(|| {
            // An ejection that has run out counts as "never": those instances are
            // only failing their active check, and go first.
            let ejected_until = |i: &BackendInstance| {
                let until = i.health.ejected_until_ms.load(Ordering::Relaxed);
                if until <= now_ms { 0 } else { until }
            };
            let oldest = self.instances.iter().filter(|i| usable(i)).map(ejected_until).min()?;
            smooth_wrr(&self.instances, &mut current, |i| {
                usable(i) && ejected_until(i) == oldest
            })
        })?;
        self.instances.get(chosen)
    }
}

/// One step of nginx's smooth weighted round-robin over the instances `eligible`
/// accepts; `current` is index-aligned with `instances`. Ties go to the earlier
/// instance, as in nginx, so sequences are reproducible.
fn smooth_wrr(
    instances: &[BackendInstance],
    current: &mut [i64],
    eligible: impl Fn(&BackendInstance) -> bool,
) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<(usize, i64)> = None;
    for (index, (instance, cur)) in instances.iter().zip(current.iter_mut()).enumerate() {
        if !eligible(instance) {
            continue;
        }
        let weight = i64::from(instance.weight);
        *cur += weight;
        total += weight;
        if best.is_none_or(|(_, max)| *cur > max) {
            best = Some((index, *cur));
        }
    }
    let (index, _) = best?;
    if let Some(cur) = current.get_mut(index) {
        *cur -= total;
    }
    Some(index)
}

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
pub enum Route<'a> {
    /// Proxy to this backend (`pick` may still find no instance: then 503).
    Backend(&'a Arc<Backend>),
    /// `svc.service.<dc>.<domain>` for a datacenter the table has no instances
    /// for: the local backend of that service (or a path route), as PanteraS
    /// always did, while the caller asks the watcher to follow that datacenter.
    OtherDatacenter(Option<&'a Arc<Backend>>),
    /// The landing/status page.
    Landing,
    /// Nobody answers to this Host and path.
    NotFound,
}

/// Path prefixes to backends, matched by whole segments: `/minions` takes
/// `/minions` and `/minions/...` but not `/minionsX`; `/` takes everything.
/// Persistent (`imbl`): a table made from the previous one by a delta shares
/// every entry the delta did not touch.
#[derive(Debug, Clone, Default)]
struct PrefixMap {
    /// Non-root prefixes (normalised: leading `/`, no trailing `/`).
    by_prefix: imbl::HashMap<Arc<str>, Arc<Backend>>,
    /// The distinct lengths of the keys of `by_prefix`, longest first, each with
    /// how many keys have it: a lookup tries only the cuts of the path that could
    /// be a key, longest match first. As many as distinct lengths, so a clone
    /// per change costs little.
    lens: Vec<(usize, u32)>,
    /// The `/` prefix.
    root: Option<Arc<Backend>>,
}

impl PrefixMap {
    /// The backend at exactly `prefix`.
    fn get(&self, prefix: &str) -> Option<&Arc<Backend>> {
        if prefix == "/" {
            self.root.as_ref()
        } else {
            self.by_prefix.get(prefix)
        }
    }

    /// Puts `backend` at `prefix`, or takes the prefix away (`None`).
    fn set(&mut self, prefix: &Arc<str>, backend: Option<Arc<Backend>>) {
        if &**prefix == "/" {
            self.root = backend;
            return;
        }
        let len = prefix.len();
        let at = self.lens.binary_search_by(|(l, _)| len.cmp(l));
        match backend {
            Some(backend) => {
                if self.by_prefix.insert(prefix.clone(), backend).is_none() {
                    match at {
                        Ok(i) => self.lens[i].1 += 1,
                        Err(i) => self.lens.insert(i, (len, 1)),
                    }
                }
            }
            None => {
                if self.by_prefix.remove(&**prefix).is_some()
                    && let Ok(i) = at
                {
                    self.lens[i].1 -= 1;
                    if self.lens[i].1 == 0 {
                        self.lens.remove(i);
                    }
                }
            }
        }
    }

    /// Claims `prefix` for `backend`; returns the backend that keeps it when another
    /// one got there first.
    fn claim(&mut self, prefix: &Arc<str>, backend: &Arc<Backend>) -> Result<(), Arc<Backend>> {
        match self.get(prefix) {
            Some(owner) if Arc::ptr_eq(owner, backend) => Ok(()),
            Some(owner) => Err(owner.clone()),
            None => {
                self.set(prefix, Some(backend.clone()));
                Ok(())
            }
        }
    }

    /// The backend of the longest prefix of `path`.
    fn longest(&self, path: &str) -> Option<&Arc<Backend>> {
        for &(len, _) in &self.lens {
            // A cut is a candidate only at a segment boundary (which also makes it a
            // char boundary, so `get` cannot fail there).
            if !matches!(path.as_bytes().get(len), None | Some(b'/')) {
                continue;
            }
            if let Some(backend) = path.get(..len).and_then(|cut| self.by_prefix.get(cut)) {
                return Some(backend);
            }
        }
        self.root.as_ref()
    }

    /// Every (prefix, backend), `/` first.
    fn iter(&self) -> impl Iterator<Item = (&str, &Arc<Backend>)> {
        let root = self.root.iter().map(|b| ("/", b));
        root.chain(self.by_prefix.iter().map(|(p, b)| (&**p, b)))
    }
}

/// What one host name routes to. Nearly every host is a service's own name
/// with only the `/` prefix: that case is kept inline, without a map.
#[derive(Debug, Clone)]
enum HostRoutes {
    /// Only `/`: every path.
    Root(Arc<Backend>),
    /// Path prefixes under the host (Fabio `urlprefix-host/path`).
    Prefixes(Arc<PrefixMap>),
}

impl HostRoutes {
    fn longest(&self, path: &str) -> Option<&Arc<Backend>> {
        match self {
            HostRoutes::Root(backend) => Some(backend),
            HostRoutes::Prefixes(map) => map.longest(path),
        }
    }

    fn to_map(&self) -> PrefixMap {
        match self {
            HostRoutes::Root(backend) => PrefixMap {
                root: Some(backend.clone()),
                ..PrefixMap::default()
            },
            HostRoutes::Prefixes(map) => (**map).clone(),
        }
    }

    /// The compact form of `map` (`None` when it routes nothing).
    fn of(map: PrefixMap) -> Option<Self> {
        if map.by_prefix.is_empty() {
            map.root.map(HostRoutes::Root)
        } else {
            Some(HostRoutes::Prefixes(Arc::new(map)))
        }
    }
}

/// Immutable once published; swapped atomically by the watcher (arc-swap), so
/// it must be Send + Sync. Its maps are persistent (`imbl`): cloning a table is
/// O(1), and the next table, made by [`TableState`] from a delta, shares every
/// entry the delta did not touch.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    /// Lower-case host name to its prefixes.
    hosts: imbl::HashMap<Arc<str>, HostRoutes>,
    /// Host-independent path prefixes.
    paths: PrefixMap,
    /// Local HTTP backends by lower-case service name, for `svc.service.<dc>.<domain>`
    /// when there is no spec for that datacenter.
    local: imbl::HashMap<Arc<str>, Arc<Backend>>,
    /// `.<domain>` (empty when the domain is).
    domain_suffix: Arc<str>,
    /// Lower-case landing host names and addresses.
    landing: Arc<HashSet<String>>,
    /// TCP port to backend.
    tcp: imbl::OrdMap<u16, Arc<Backend>>,
    /// Every HTTP backend, by service name then datacenter.
    backends: imbl::OrdMap<SpecKey, Arc<Backend>>,
    /// The parts with something the policy left out, by service name then datacenter.
    refused: imbl::OrdMap<SpecKey, Arc<Part>>,
}

impl RoutingTable {
    /// A table that routes nothing but the landing page (before Consul answers).
    pub fn empty(cfg: &TableConfig) -> Self {
        let names = Naming::new(cfg);
        let landing = cfg
            .landing_hosts
            .iter()
            .map(|h| tags::bare_host(h).to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        Self {
            hosts: imbl::HashMap::new(),
            paths: PrefixMap::default(),
            local: imbl::HashMap::new(),
            domain_suffix: if names.domain.is_empty() {
                "".into()
            } else {
                format!(".{}", names.domain).into()
            },
            landing: Arc::new(landing),
            tcp: imbl::OrdMap::new(),
            backends: imbl::OrdMap::new(),
            refused: imbl::OrdMap::new(),
        }
    }

    /// Builds from the watcher's view; returns warnings (conflicts such as two
    /// services claiming the same haproxy_route or tcp port: the alphabetically first
    /// service wins, deterministic, logged).
    ///
    /// Only specs of the local datacenter contribute path routes, Fabio prefixes, the
    /// add-domain name and TCP ports; another datacenter's spec only answers to
    /// `svc.service.<dc>.<domain>`. A service gets an HTTP backend when at least one
    /// instance takes HTTP; its routes are the union over its instances.
    ///
    /// This is the full build, from nothing; [`TableState`] keeps a table up to
    /// date by delta, and builds it this way only when it must.
    pub fn build(cfg: &TableConfig, services: &[ServiceSpec], health: &HealthRegistry) -> (Self, Vec<String>) {
        let names = Naming::new(cfg);
        let listeners = tcp_listeners(cfg, services.iter());
        let mut order: Vec<&ServiceSpec> = services.iter().collect();
        // Stable: equal keys keep the caller's order, which only the duplicate check
        // sees. Compared without allocating.
        order.sort_by(|a, b| {
            lower(&a.name)
                .cmp(lower(&b.name))
                .then_with(|| a.name.cmp(&b.name))
                .then_with(|| lower(&a.datacenter).cmp(lower(&b.datacenter)))
        });
        let mut builder = Builder::new(cfg, None);
        let mut previous: Option<&ServiceSpec> = None;
        for spec in order {
            // Sorted: a duplicate follows its first list.
            let twice = previous.is_some_and(|p| same_group(p, spec));
            previous = Some(spec);
            if twice {
                builder.warnings.push(listed_twice(spec));
                continue;
            }
            let part = Arc::new(compile(spec, &names, &cfg.policy, &listeners, health));
            builder.assemble(&SpecKey::of(spec), &part);
        }
        (builder.table, builder.warnings)
    }

    /// Routing decision for an HTTP request: `host` is the raw Host header (may carry
    /// :port, trailing dot, any case) or None; `path` is the request path (no query).
    pub fn route(&self, host: Option<&str>, path: &str) -> Route<'_> {
        let host = host.map(tags::bare_host).filter(|h| !h.is_empty()).map(|h| {
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(h.to_ascii_lowercase())
            } else {
                Cow::Borrowed(h)
            }
        });
        let host = host.as_deref();
        match host.map(|h| self.host_backend(h, path)) {
            Some(HostMatch::Found(backend)) => return Route::Backend(backend),
            Some(HostMatch::OtherDatacenter(local)) => {
                return Route::OtherDatacenter(local.or_else(|| self.paths.longest(path)));
            }
            Some(HostMatch::None) | None => {}
        }
        if let Some(backend) = self.paths.longest(path) {
            return Route::Backend(backend);
        }
        if host.is_some_and(|h| self.landing.contains(h)) {
            return Route::Landing;
        }
        Route::NotFound
    }

    /// TCP listeners wanted: port -> backend (haproxy_tcp), by port.
    pub fn tcp_ports(&self) -> impl Iterator<Item = (u16, &Arc<Backend>)> {
        self.tcp.iter().map(|(port, backend)| (*port, backend))
    }

    /// Every HTTP backend (for the status page and health checks), by service name
    /// then datacenter.
    pub fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.values()
    }

    /// The services, instances and ports the policy refused (by service name then
    /// datacenter), for status pages.
    pub fn refused(&self) -> impl Iterator<Item = &Refused> {
        self.refused.values().flat_map(|part| part.refused.iter())
    }

    /// Every routing entry: (host, path prefix, backend); host `None` for the
    /// host-independent path routes. Sorted by host then path; for status pages.
    pub fn entries(&self) -> Vec<(Option<&str>, &str, &Arc<Backend>)> {
        let mut all: Vec<_> = self
            .hosts
            .iter()
            .flat_map(|(h, routes)| -> Box<dyn Iterator<Item = _>> {
                match routes {
                    HostRoutes::Root(b) => Box::new(std::iter::once((Some(&**h), "/", b))),
                    HostRoutes::Prefixes(map) => Box::new(map.iter().map(move |(p, b)| (Some(&**h), p, b))),
                }
            })
            .chain(self.paths.iter().map(|(p, b)| (None, p, b)))
            .collect();
        all.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        all
    }

    /// What a lower-case host name asks for.
    fn host_backend(&self, host: &str, path: &str) -> HostMatch<'_> {
        if let Some(backend) = self.hosts.get(host).and_then(|routes| routes.longest(path)) {
            return HostMatch::Found(backend);
        }
        // `svc.service.<dc>.<domain>` for a datacenter we have no instances of.
        match other_datacenter_name(host, &self.domain_suffix) {
            Some((name, _)) => HostMatch::OtherDatacenter(self.local.get(name)),
            None => HostMatch::None,
        }
    }

    /// Puts `winner` at `key` (or takes the key out): the delta's one write.
    fn put(&mut self, key: &Key, winner: Option<Arc<Backend>>) {
        match key {
            Key::Host(host, path) => {
                let routes = match (self.hosts.get(&**host), &**path, winner) {
                    (None | Some(HostRoutes::Root(_)), "/", Some(b)) => Some(HostRoutes::Root(b)),
                    (None | Some(HostRoutes::Root(_)), "/", None) => None,
                    (current, _, winner) => {
                        let mut map = current.map(HostRoutes::to_map).unwrap_or_default();
                        map.set(path, winner);
                        HostRoutes::of(map)
                    }
                };
                match routes {
                    Some(r) => self.hosts.insert(host.clone(), r),
                    None => self.hosts.remove(&**host),
                };
            }
            Key::Path(path) => self.paths.set(path, winner),
            Key::Local(name) => {
                match winner {
                    Some(b) => self.local.insert(name.clone(), b),
                    None => self.local.remove(&**name),
                };
            }
            Key::Tcp(port) => {
                match winner {
                    Some(b) => self.tcp.insert(*port, b),
                    None => self.tcp.remove(port),
                };
            }
        }
    }

    /// Every routing decision of the table as text, in a fixed order: two
    /// tables route alike exactly when these are equal (what the delta is
    /// checked against, see [`TableState::check`]).
    fn describe(&self) -> Vec<String> {
        fn b(backend: &Backend) -> String {
            let instances: Vec<String> = backend
                .instances
                .iter()
                .map(|i| format!("{}/{}/{}/{}/{:?}", i.id, i.node, i.addr, i.weight, i.httpchk))
                .collect();
            format!("{}@{} [{}]", backend.service, backend.datacenter, instances.join(" "))
        }
        fn lens_ok(map: &PrefixMap) -> bool {
            let mut want: Vec<(usize, u32)> = Vec::new();
            let mut lens: Vec<usize> = map.by_prefix.keys().map(|k| k.len()).collect();
            lens.sort_unstable_by(|a, b| b.cmp(a));
            for len in lens {
                match want.last_mut() {
                    Some((l, n)) if *l == len => *n += 1,
                    _ => want.push((len, 1)),
                }
            }
            want == map.lens
        }
        let mut out: Vec<String> = self
            .entries()
            .into_iter()
            .map(|(h, p, backend)| format!("route {} {p} -> {}", h.unwrap_or("*"), b(backend)))
            .collect();
        for (host, routes) in &self.hosts {
            if let HostRoutes::Prefixes(map) = routes
                && (!lens_ok(map) || map.by_prefix.is_empty())
            {
                out.push(format!("host {host}: prefix lengths out of step"));
            }
        }
        if !lens_ok(&self.paths) {
            out.push("paths: prefix lengths out of step".into());
        }
        let mut local: Vec<String> = self
            .local
            .iter()
            .map(|(n, backend)| format!("local {n} -> {}", b(backend)))
            .collect();
        local.sort();
        out.extend(local);
        out.extend(self.tcp.iter().map(|(p, backend)| format!("tcp {p} -> {}", b(backend))));
        out.extend(self.backends().map(|backend| format!("backend {}", b(backend))));
        out.extend(self.refused().map(|r| format!("refused {r:?}")));
        out.push(format!("domain {:?} landing {:?}", self.domain_suffix, {
            let mut l: Vec<&String> = self.landing.iter().collect();
            l.sort();
            l
        }));
        out
    }
}

/// What a host name matched in [`RoutingTable::host_backend`].
enum HostMatch<'a> {
    Found(&'a Arc<Backend>),
    OtherDatacenter(Option<&'a Arc<Backend>>),
    None,
}

/// `(service, dc)` of a lower-case `svc.service.<dc>.<domain>` name;
/// `domain_suffix` is `.<domain>` (or empty).
pub fn other_datacenter_name<'h>(host: &'h str, domain_suffix: &str) -> Option<(&'h str, &'h str)> {
    let rest = host.strip_suffix(domain_suffix)?;
    let (service, dc) = rest.rsplit_once('.')?;
    let name = service.strip_suffix(".service")?;
    // Both go into Consul queries: names only, nothing a Host header can bend.
    (is_service_name(name) && is_service_name(dc)).then_some((name, dc))
}

/// The ports the `haproxy_tcp` listeners take: asked for by a local service
/// with a usable name, and allowed by the policy.
fn tcp_listeners<'s>(cfg: &TableConfig, services: impl Iterator<Item = &'s ServiceSpec>) -> BTreeSet<u16> {
    services.flat_map(|s| listener_ports(cfg, s)).collect()
}

/// The `haproxy_tcp` listener ports one spec asks for (once per instance).
fn listener_ports<'a>(cfg: &'a TableConfig, spec: &'a ServiceSpec) -> impl Iterator<Item = u16> + 'a {
    let local = cfg.local_datacenter.trim().trim_matches('.');
    let wanted = spec.datacenter.eq_ignore_ascii_case(local) && is_service_name(&spec.name);
    spec.instances
        .iter()
        .filter(move |_| wanted)
        .filter_map(|i| i.tags.tcp_port)
        .filter(|&port| cfg.policy.refuse_tcp_port(port).is_none())
}

/// Lower-case bytes of `s`, for comparing names without allocating.
fn lower(s: &str) -> impl Iterator<Item = u8> + '_ {
    s.bytes().map(|b| b.to_ascii_lowercase())
}

/// True when `b` lists the same service and datacenter as `a` (the datacenter
/// in another case): the table uses the first list.
fn same_group(a: &ServiceSpec, b: &ServiceSpec) -> bool {
    a.name == b.name && a.datacenter.eq_ignore_ascii_case(&b.datacenter)
}

/// The warning for a spec that [`same_group`] a spec before it.
fn listed_twice(spec: &ServiceSpec) -> String {
    format!(
        "service '{}' ({}) is listed twice; using the first list",
        spec.name, spec.datacenter
    )
}

/// A spec's (service, datacenter), ordered as conflicts are decided: by
/// lower-case name, name, lower-case datacenter, then datacenter. Two specs
/// that differ only in the datacenter's case are the same service listed
/// twice; the first in this order is used.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SpecKey {
    name: Arc<str>,
    datacenter: Arc<str>,
}

impl SpecKey {
    fn of(spec: &ServiceSpec) -> Self {
        Self {
            name: spec.name.as_str().into(),
            datacenter: spec.datacenter.as_str().into(),
        }
    }
}

impl Ord for SpecKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        lower(&self.name)
            .cmp(lower(&other.name))
            .then_with(|| self.name.cmp(&other.name))
            .then_with(|| lower(&self.datacenter).cmp(lower(&other.datacenter)))
            .then_with(|| self.datacenter.cmp(&other.datacenter))
    }
}

impl PartialOrd for SpecKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One thing services claim, whose first claimant (in [`SpecKey`] order) the
/// table routes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    /// A lower-case host name and a path prefix under it.
    Host(Arc<str>, Arc<str>),
    /// A host-independent path prefix.
    Path(Arc<str>),
    /// The `svc.service.<dc>.<domain>` fallback of a lower-case local service name.
    Local(Arc<str>),
    /// A `haproxy_tcp` port.
    Tcp(u16),
}

/// The naming inputs, normalised once per build.
#[derive(Debug)]
struct Naming {
    /// Lower-case Consul domain without dots at the ends.
    domain: String,
    /// Lower-case local datacenter.
    local_dc: String,
    /// Lower-case add-domain with exactly one leading dot and no trailing dot.
    add_domain: Option<String>,
    /// The `/` prefix, shared by every service's own names (one allocation).
    root: Arc<str>,
}

impl Naming {
    fn new(cfg: &TableConfig) -> Self {
        let add_domain = cfg
            .add_domain
            .as_deref()
            .map(|d| d.trim().trim_matches('.').to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .map(|d| format!(".{d}"));
        Self {
            domain: cfg.consul_domain.trim().trim_matches('.').to_ascii_lowercase(),
            local_dc: cfg.local_datacenter.trim().to_ascii_lowercase(),
            add_domain,
            root: "/".into(),
        }
    }
}

/// Joins the non-empty labels with dots (an empty domain must not leave `svc.service.`).
fn dotted(labels: &[&str]) -> String {
    labels
        .iter()
        .filter(|l| !l.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(".")
}

/// How a backend is named in warnings.
fn label(backend: &Backend) -> String {
    format!("'{}' ({})", backend.service, backend.datacenter)
}

/// What one service spec asks of the table, worked out once and reused by the
/// next tables while the spec is unchanged.
#[derive(Debug, Default)]
struct Part {
    /// The HTTP backend, when an instance takes HTTP.
    http: Option<Arc<Backend>>,
    /// Lower-case service name for the `svc.service.<dc>.<domain>` fallback
    /// (local datacenter only).
    local_name: Option<Arc<str>>,
    /// Claims of the HTTP backend, in the order they are made.
    claims: Vec<Claim>,
    /// The TCP backend and its ports.
    tcp: Option<(Arc<Backend>, Vec<u16>)>,
    /// Warnings about the service itself (instances that disagree on tags).
    notes: Vec<String>,
    /// What the policy refused.
    refused: Vec<Refused>,
}

impl Part {
    /// Every key the part claims, once each.
    fn keys(&self) -> Vec<Key> {
        let mut keys = Vec::new();
        if self.http.is_some() {
            keys.extend(self.local_name.iter().map(|n| Key::Local(n.clone())));
            keys.extend(self.claims.iter().map(Claim::key));
        }
        if let Some((_, ports)) = &self.tcp {
            keys.extend(ports.iter().map(|&p| Key::Tcp(p)));
        }
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The backend the part puts at `key`.
    fn backend_for(&self, key: &Key) -> Option<&Arc<Backend>> {
        match key {
            Key::Tcp(_) => self.tcp.as_ref().map(|(b, _)| b),
            _ => self.http.as_ref(),
        }
    }

    /// What each of the part's claims on `key` is called in a conflict warning
    /// (one per claim, as the full build warns once per lost claim).
    fn claim_names(&self, key: &Key) -> Vec<String> {
        match key {
            Key::Tcp(port) => vec![format!("haproxy_tcp port {port}")],
            Key::Local(_) => Vec::new(),
            _ => self
                .claims
                .iter()
                .filter(|c| c.key() == *key)
                .map(|c| match c {
                    Claim::Host(host, path) if &**path == "/" => format!("host {host}"),
                    Claim::Host(host, path) => format!("host {host} path {path}"),
                    Claim::Path(_, what) => what.clone(),
                })
                .collect(),
        }
    }

    /// The part's own warnings (before any conflict with another service).
    fn warnings(&self) -> impl Iterator<Item = String> + '_ {
        self.notes
            .iter()
            .cloned()
            .chain(self.refused.iter().map(Refused::to_string))
    }
}

/// One name the HTTP backend of a service claims (shared with every table
/// built from this part: no allocation per build).
#[derive(Debug)]
enum Claim {
    /// A lower-case host name and a path prefix under it.
    Host(Arc<str>, Arc<str>),
    /// A host-independent path prefix, and what claims it (for warnings).
    Path(Arc<str>, String),
}

impl Claim {
    fn key(&self) -> Key {
        match self {
            Claim::Host(host, path) => Key::Host(host.clone(), path.clone()),
            Claim::Path(path, _) => Key::Path(path.clone()),
        }
    }
}

/// A spec and the part it claims with.
type Claimant = (SpecKey, Arc<Part>);

/// The claimants of each key (the first one wins): what lets a delta decide
/// again only the keys it touches.
type Claims = HashMap<Key, Claimants>;

/// The claimants of one key, in [`SpecKey`] order, each spec once. Nearly
/// every key has one (a conflict is the exception), kept inline: the index
/// costs no allocation per key.
#[derive(Debug)]
enum Claimants {
    One(Claimant),
    Many(Vec<Claimant>),
}

impl Claimants {
    fn as_slice(&self) -> &[Claimant] {
        match self {
            Claimants::One(c) => std::slice::from_ref(c),
            Claimants::Many(v) => v,
        }
    }

    /// Adds (or replaces) the claim of `c`'s spec, in order.
    fn insert(&mut self, c: Claimant) {
        match self {
            Claimants::One(one) if one.0 == c.0 => *one = c,
            Claimants::One(one) => {
                let mut list = vec![one.clone(), c];
                list.sort_by(|a, b| a.0.cmp(&b.0));
                *self = Claimants::Many(list);
            }
            Claimants::Many(list) => match list.binary_search_by(|(k, _)| k.cmp(&c.0)) {
                Ok(i) => list[i] = c,
                Err(i) => list.insert(i, c),
            },
        }
    }

    /// Takes `key`'s claim out; false when none is left.
    fn remove(&mut self, key: &SpecKey) -> bool {
        match self {
            Claimants::One(one) => one.0 != *key,
            Claimants::Many(list) => {
                list.retain(|(k, _)| k != key);
                if list.len() == 1
                    && let Some(last) = list.pop()
                {
                    *self = Claimants::One(last);
                }
                !matches!(self, Claimants::Many(l) if l.is_empty())
            }
        }
    }
}

/// A table under construction from nothing, and what went wrong so far.
struct Builder<'c> {
    table: RoutingTable,
    warnings: Vec<String>,
    /// The claimants of each key, when the caller keeps them for deltas.
    claims: Option<&'c mut Claims>,
}

impl<'c> Builder<'c> {
    fn new(cfg: &TableConfig, claims: Option<&'c mut Claims>) -> Self {
        Self {
            table: RoutingTable::empty(cfg),
            warnings: Vec::new(),
            claims,
        }
    }

    /// Makes the claims of `part` (earlier, alphabetically first, services win).
    /// Parts come in [`SpecKey`] order.
    fn assemble(&mut self, key: &SpecKey, part: &Arc<Part>) {
        self.warnings.extend(part.warnings());
        if !part.refused.is_empty() {
            self.table.refused.insert(key.clone(), part.clone());
        }
        if let Some(backend) = &part.http {
            self.table.backends.insert(key.clone(), backend.clone());
            if let Some(name) = &part.local_name {
                self.table.local.entry(name.clone()).or_insert_with(|| backend.clone());
            }
            for claim in &part.claims {
                match claim {
                    Claim::Host(host, path) => self.claim_host(host, path, backend),
                    Claim::Path(path, what) => {
                        if let Err(owner) = self.table.paths.claim(path, backend) {
                            self.warnings.push(conflict(what, &owner, backend));
                        }
                    }
                }
            }
        }
        if let Some((backend, ports)) = &part.tcp {
            for &port in ports {
                match self.table.tcp.get(&port) {
                    Some(owner) => {
                        let warning = conflict(&format!("haproxy_tcp port {port}"), owner, backend);
                        self.warnings.push(warning);
                    }
                    None => {
                        self.table.tcp.insert(port, backend.clone());
                    }
                }
            }
        }
        if let Some(claims) = self.claims.as_deref_mut() {
            for k in part.keys() {
                let claimant = (key.clone(), part.clone());
                match claims.entry(k) {
                    std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().insert(claimant),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(Claimants::One(claimant));
                    }
                }
            }
        }
    }

    fn claim_host(&mut self, host: &Arc<str>, path: &Arc<str>, backend: &Arc<Backend>) {
        let root = &**path == "/";
        let owner = match self.table.hosts.entry(host.clone()) {
            // The common case (a service's own names) stays inline, one lookup.
            imbl::hashmap::Entry::Vacant(e) if root => {
                e.insert(HostRoutes::Root(backend.clone()));
                return;
            }
            imbl::hashmap::Entry::Occupied(e) if root && matches!(e.get(), HostRoutes::Root(_)) => match e.get() {
                HostRoutes::Root(owner) => owner.clone(),
                // Not reached: the guard matched Root.
                HostRoutes::Prefixes(_) => return,
            },
            entry => {
                let mut map = match &entry {
                    imbl::hashmap::Entry::Occupied(e) => e.get().to_map(),
                    imbl::hashmap::Entry::Vacant(_) => PrefixMap::default(),
                };
                let claimed = map.claim(path, backend);
                if let Some(routes) = HostRoutes::of(map) {
                    match entry {
                        imbl::hashmap::Entry::Occupied(mut e) => {
                            e.insert(routes);
                        }
                        imbl::hashmap::Entry::Vacant(e) => {
                            e.insert(routes);
                        }
                    }
                }
                match claimed {
                    Ok(()) => return,
                    Err(owner) => owner,
                }
            }
        };
        if Arc::ptr_eq(&owner, backend) {
            return;
        }
        let what = if root {
            format!("host {host}")
        } else {
            format!("host {host} path {path}")
        };
        self.warnings.push(conflict(&what, &owner, backend));
    }
}

/// The conflict warnings of one key: each claim of each claimant after the
/// first one lost to it.
fn key_warnings(key: &Key, claimants: Option<&Claimants>) -> Vec<String> {
    let Some([(_, first), rest @ ..]) = claimants.map(Claimants::as_slice) else {
        return Vec::new();
    };
    let Some(winner) = first.backend_for(key) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (_, part) in rest {
        if let Some(loser) = part.backend_for(key) {
            out.extend(part.claim_names(key).iter().map(|what| conflict(what, winner, loser)));
        }
    }
    out
}

/// What `spec` asks of the table: its backends and the names they claim, less
/// what the policy refuses.
fn compile(
    spec: &ServiceSpec,
    names: &Naming,
    policy: &BackendPolicy,
    tcp_listeners: &BTreeSet<u16>,
    health: &HealthRegistry,
) -> Part {
    let name = spec.name.to_ascii_lowercase();
    let dc = spec.datacenter.to_ascii_lowercase();
    let local = dc == names.local_dc;
    let mut part = Part::default();
    let refused = |instance: Option<&InstanceSpec>, port: Option<u16>, reason: Refusal| Refused {
        service: spec.name.clone(),
        datacenter: spec.datacenter.clone(),
        instance: instance.map(|i| i.id.clone()),
        addr: instance.map(|i| i.addr),
        port,
        reason,
    };
    if !is_service_name(&spec.name) {
        part.refused.push(refused(None, None, Refusal::Name));
        return part;
    }
    let mut allowed: Vec<&InstanceSpec> = Vec::with_capacity(spec.instances.len());
    for i in &spec.instances {
        match policy.refuse_addr(i.addr, tcp_listeners) {
            Some(reason) => part.refused.push(refused(Some(i), None, reason)),
            None => allowed.push(i),
        }
    }
    let http: Vec<&InstanceSpec> = allowed.iter().copied().filter(|i| i.tags.takes_http()).collect();
    if !http.is_empty() {
        part.http = Some(Arc::new(new_backend(spec, &http, health)));
        if local {
            compile_local_http(spec, &name, &http, names, &mut part);
        } else {
            let host = dotted(&[&name, "service", &dc, &names.domain]);
            part.claims.push(Claim::Host(host.into(), names.root.clone()));
        }
    }
    // Another datacenter's ports are that datacenter's load balancers' business.
    let tcp: Vec<&InstanceSpec> = allowed.iter().copied().filter(|i| i.tags.tcp_port.is_some()).collect();
    if local && !tcp.is_empty() {
        let mut ports: BTreeSet<u16> = tcp.iter().filter_map(|i| i.tags.tcp_port).collect();
        ports.retain(|&port| match policy.refuse_tcp_port(port) {
            Some(reason) => {
                part.refused.push(refused(None, Some(port), reason));
                false
            }
            None => true,
        });
        check_agreement(spec, "haproxy_tcp", &tcp, &mut part.notes, |t| {
            t.tcp_port.iter().map(u16::to_string).collect()
        });
        if !ports.is_empty() {
            part.tcp = Some((Arc::new(new_backend(spec, &tcp, health)), ports.into_iter().collect()));
        }
    }
    part
}

/// The names, routes and prefixes of a local service's HTTP backend.
fn compile_local_http(spec: &ServiceSpec, name: &str, http: &[&InstanceSpec], names: &Naming, part: &mut Part) {
    let domain = &names.domain;
    let mut hosts = vec![
        format!("{name}.service"),
        dotted(&[name, "service", domain]),
        dotted(&[name, "service", &names.local_dc, domain]),
    ];
    if let Some(add) = &names.add_domain {
        hosts.push(format!("{name}{add}"));
    }
    part.claims
        .extend(hosts.into_iter().map(|h| Claim::Host(h.into(), names.root.clone())));
    part.local_name = Some(name.into());

    check_agreement(spec, "haproxy_route", http, &mut part.notes, |t| t.routes.clone());
    let routes: BTreeSet<&str> = http
        .iter()
        .flat_map(|i| i.tags.routes.iter().map(String::as_str))
        .collect();
    for route in routes {
        part.claims
            .push(Claim::Path(route.into(), format!("haproxy_route {route}")));
    }

    check_agreement(spec, "urlprefix-", http, &mut part.notes, |t| {
        t.fabio
            .iter()
            .map(|p| format!("{}{}", p.host.as_deref().unwrap_or(""), p.path))
            .collect()
    });
    let prefixes: BTreeSet<(Option<&str>, &str)> = http
        .iter()
        .flat_map(|i| i.tags.fabio.iter().map(|p| (p.host.as_deref(), p.path.as_str())))
        .collect();
    for (host, path) in prefixes {
        part.claims.push(match host {
            Some(host) => Claim::Host(host.into(), path.into()),
            None => Claim::Path(path.into(), format!("urlprefix-{path}")),
        });
    }
}

fn new_backend(spec: &ServiceSpec, members: &[&InstanceSpec], health: &HealthRegistry) -> Backend {
    let instances = members
        .iter()
        .map(|i| BackendInstance {
            id: i.id.clone(),
            node: i.node.clone(),
            addr: i.addr,
            weight: i.tags.weight,
            health: health.get(i.addr),
            httpchk: i.tags.httpchk.clone(),
        })
        .collect();
    Backend::new(
        spec.name.clone(),
        spec.datacenter.clone(),
        instances,
        health.route_counters(&spec.name, &spec.datacenter),
    )
}

/// Warns when the instances of one service disagree on a tag: the union is used,
/// which is right during a rolling change and worth a look otherwise.
fn check_agreement(
    spec: &ServiceSpec,
    what: &str,
    members: &[&InstanceSpec],
    notes: &mut Vec<String>,
    values: impl Fn(&InstanceTags) -> Vec<String>,
) {
    let sets: Vec<BTreeSet<String>> = members.iter().map(|i| values(&i.tags).into_iter().collect()).collect();
    if sets.windows(2).all(|w| w[0] == w[1]) {
        return;
    }
    let union: BTreeSet<&String> = sets.iter().flatten().collect();
    let union: Vec<&str> = union.into_iter().map(String::as_str).collect();
    notes.push(format!(
        "service '{}' ({}): instances disagree on {what} tags; using all of: {}",
        spec.name,
        spec.datacenter,
        union.join(", ")
    ));
}

/// The warning for a claim lost to an earlier (alphabetically first) service.
fn conflict(what: &str, winner: &Backend, loser: &Backend) -> String {
    format!(
        "{what} is claimed by services {} and {}; {} wins",
        label(winner),
        label(loser),
        label(winner)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], port))
    }

    fn inst(last: u8, tag_list: &[&str]) -> InstanceSpec {
        let (parsed, warnings) = tags::parse_tags(&tag_list.iter().map(|t| t.to_string()).collect::<Vec<_>>());
        assert!(warnings.is_empty(), "{warnings:?}");
        InstanceSpec {
            id: format!("i{last}"),
            node: format!("node{last}"),
            addr: addr(last, 8080),
            tags: parsed,
        }
    }

    /// A spec of `name` in `dc` (also used by `delta`'s tests).
    pub(super) fn spec(name: &str, dc: &str, instances: Vec<InstanceSpec>) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            datacenter: dc.into(),
            instances,
        }
    }

    fn cfg() -> TableConfig {
        TableConfig {
            consul_domain: "consul".into(),
            local_datacenter: "dc1".into(),
            add_domain: Some(".apps.example.com".into()),
            landing_hosts: vec!["localhost".into(), "10.0.0.5".into(), "Host1.".into(), "[::1]".into()],
            policy: Default::default(),
        }
    }

    fn build_with(cfg: &TableConfig, specs: &[ServiceSpec]) -> (RoutingTable, Vec<String>) {
        RoutingTable::build(cfg, specs, &HealthRegistry::new())
    }

    fn build(specs: &[ServiceSpec]) -> RoutingTable {
        let (table, warnings) = build_with(&cfg(), specs);
        assert!(warnings.is_empty(), "{warnings:?}");
        table
    }

    /// The routing decision as `service@dc`, `landing` or `none`.
    fn to(table: &RoutingTable, host: Option<&str>, path: &str) -> String {
        match table.route(host, path) {
            Route::Backend(b) | Route::OtherDatacenter(Some(b)) => format!("{}@{}", b.service, b.datacenter),
            Route::OtherDatacenter(None) => "none".into(),
            Route::Landing => "landing".into(),
            Route::NotFound => "none".into(),
        }
    }

    fn web() -> ServiceSpec {
        spec("web", "dc1", vec![inst(1, &["haproxy"])])
    }

    /// Route counters are bounded: routes no table has any more go at once
    /// when they never served a request, and the others are kept up to
    /// MAX_RETIRED_ROUTES; reading a total creates nothing.
    #[test]
    fn route_counters_of_gone_and_made_up_routes_are_pruned() {
        let health = HealthRegistry::new();
        // Made-up other-datacenter names that were watched and never served.
        for i in 0..5000 {
            let _ = health.route_counters(&format!("madeup{i}"), "dc2");
        }
        assert_eq!(health.route_total("nobody", "dc9"), None);
        // Routes that served before they went away.
        for i in 0..(MAX_RETIRED_ROUTES + 100) {
            health
                .route_counters(&format!("gone{i}"), "dc1")
                .record(200, std::time::Duration::ZERO);
        }
        let live = health.route_counters("web", "dc1");
        live.record(200, std::time::Duration::ZERO);
        let _ = health.route_counters("quiet", "dc1");
        health.retain_routes([("web", "dc1"), ("quiet", "dc1")]);
        assert_eq!(
            health.route_count(),
            2 + MAX_RETIRED_ROUTES,
            "live ones plus the retired bound"
        );
        assert_eq!(
            health.route_total("web", "dc1"),
            Some(1),
            "live counters are kept as they are"
        );
        assert_eq!(
            health.route_total("quiet", "dc1"),
            Some(0),
            "live routes stay even unused"
        );
        assert_eq!(health.route_total("madeup1", "dc2"), None);
        // The same counters come back for a live route (monotonic for scrapers).
        assert!(Arc::ptr_eq(&live, &health.route_counters("web", "dc1")));
        health.retain_routes([]);
        assert_eq!(health.route_count(), MAX_RETIRED_ROUTES);
    }

    /// The delta's version of the same bound: routes that leave go at once
    /// when they never served, the others are kept up to MAX_RETIRED_ROUTES
    /// (oldest out first), a route that comes back is live again, and the
    /// queue of retired routes stays bounded however often routes come and go.
    #[test]
    fn retired_routes_are_bounded_by_delta_too() {
        let health = HealthRegistry::new();
        let _ = health.route_counters("quiet", "dc1");
        health.retire_routes([("quiet", "dc1")], []);
        assert_eq!(health.route_count(), 0, "never served: gone at once");
        let names: Vec<String> = (0..MAX_RETIRED_ROUTES + 100).map(|i| format!("gone{i}")).collect();
        for n in &names {
            health.route_counters(n, "dc1").record(200, std::time::Duration::ZERO);
        }
        health.retire_routes(names.iter().map(|n| (n.as_str(), "dc1")), []);
        assert_eq!(health.route_count(), MAX_RETIRED_ROUTES);
        assert_eq!(health.route_total("gone0", "dc1"), None, "the oldest went first");
        assert_eq!(health.route_total("gone100", "dc1"), Some(1));
        // Back in a table: live, and no longer counted against the bound.
        health.retire_routes([], [("gone100", "dc1")]);
        let more: Vec<String> = (0..10).map(|i| format!("more{i}")).collect();
        for n in &more {
            health.route_counters(n, "dc1").record(200, std::time::Duration::ZERO);
        }
        health.retire_routes(more.iter().map(|n| (n.as_str(), "dc1")), []);
        assert_eq!(
            health.route_total("gone100", "dc1"),
            Some(1),
            "live routes are never evicted"
        );
        assert_eq!(health.route_count(), MAX_RETIRED_ROUTES + 1);
        // A route flapping in and out many times leaves the bookkeeping bounded.
        for _ in 0..10 * MAX_RETIRED_ROUTES {
            health.retire_routes([("gone100", "dc1")], []);
            health.retire_routes([], [("gone100", "dc1")]);
        }
        let book = health.routes.lock().unwrap();
        assert!(
            book.retired.len() <= 2 * MAX_RETIRED_ROUTES + 64,
            "{}",
            book.retired.len()
        );
        assert_eq!(book.retired_count, MAX_RETIRED_ROUTES - 1, "gone100 is live again");
    }

    #[test]
    fn local_service_host_forms() {
        let t = build(&[web()]);
        for host in [
            "web.service",
            "web.service.consul",
            "web.service.dc1.consul",
            "web.apps.example.com",
            "WEB.Service.Consul",
            "web.service.consul.",
            "web.service.consul:80",
            "Web.Service.DC1.Consul.:8080",
            " web.apps.example.com ",
        ] {
            assert_eq!(to(&t, Some(host), "/"), "web@dc1", "{host}");
        }
        for host in [
            "web",
            "web.consul",
            "xweb.service.consul",
            "web.service.consul.evil.com",
            "web.apps.example.org",
            "",
        ] {
            assert_eq!(to(&t, Some(host), "/"), "none", "{host}");
        }
        assert_eq!(to(&t, None, "/"), "none");
    }

    /// A table config whose policy knows an admin listener on 127.0.0.1:9090.
    fn guarded() -> TableConfig {
        let mut c = cfg();
        c.policy.own.add("admin", "127.0.0.1:9090".parse().unwrap());
        c
    }

    fn at(mut i: InstanceSpec, addr: &str) -> InstanceSpec {
        i.addr = addr.parse().unwrap();
        i
    }

    #[test]
    fn instances_at_own_listeners_are_refused_and_reported() {
        let c = guarded();
        let specs = [spec(
            "x",
            "dc1",
            vec![at(inst(1, &["haproxy"]), "127.0.0.1:9090"), inst(2, &["haproxy"])],
        )];
        let (t, warnings) = build_with(&c, &specs);
        let b = t.backends().next().expect("the other instance still routes");
        assert_eq!(b.instances.len(), 1);
        assert_eq!(b.instances[0].addr, addr(2, 8080));
        let refused: Vec<&Refused> = t.refused().collect();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].reason, Refusal::OwnListener { listener: "admin" });
        assert_eq!(refused[0].instance.as_deref(), Some("i1"));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("admin"), "{warnings:?}");

        // Only instance: no route at all (a 503 from the lb, never the admin page).
        let (t, _) = build_with(&c, &[spec("x", "dc1", vec![at(inst(1, &["haproxy"]), "0.0.0.0:9090")])]);
        assert_eq!(t.backends().count(), 0);
        assert_eq!(to(&t, Some("x.service.consul"), "/"), "none");
    }

    #[test]
    fn tcp_ports_outside_the_range_or_owned_are_not_opened() {
        let mut c = guarded();
        c.policy.own.add("dns", "0.0.0.0:5353".parse().unwrap());
        let specs = [
            spec("a", "dc1", vec![inst(1, &["haproxy_tcp=1"])]),
            spec("b", "dc1", vec![inst(2, &["haproxy_tcp=5353"])]),
            spec("c", "dc1", vec![inst(3, &["haproxy_tcp=5000"])]),
        ];
        let (t, _) = build_with(&c, &specs);
        let ports: Vec<u16> = t.tcp_ports().map(|(p, _)| p).collect();
        assert_eq!(ports, vec![5000]);
        let reasons: Vec<_> = t.refused().map(|r| (r.port, r.reason.clone())).collect();
        assert_eq!(
            reasons,
            vec![
                (Some(1), Refusal::PortNotAllowed),
                (Some(5353), Refusal::PortTaken { listener: "dns" })
            ]
        );
        // Configured: a privileged port is taken.
        c.policy.tcp_ports = super::super::policy::PortRanges::parse(&["1".into()]).unwrap();
        let (t, _) = build_with(&c, &specs[..1]);
        assert_eq!(t.tcp_ports().map(|(p, _)| p).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn instances_at_the_lbs_own_tcp_listeners_are_refused() {
        // b's instance on a local address and a's listener port would splice
        // the lb to itself without end.
        let c = guarded();
        let specs = [
            spec("a", "dc1", vec![inst(1, &["haproxy_tcp=5000"])]),
            spec("b", "dc1", vec![at(inst(2, &["haproxy"]), "127.0.0.1:5000")]),
        ];
        let health = HealthRegistry::new();
        let mut state = TableState::new(c);
        for s in &specs {
            state.set(s.clone());
        }
        state.apply(&health);
        let t = state.table();
        let refused: Vec<&Refused> = t.refused().collect();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].reason, Refusal::OwnTcpListener);
        // a's port goes away: b is taken again (the compiled part is not reused).
        state.remove("a", "dc1");
        assert!(state.apply(&health).full, "the listener ports moved: a full build");
        let t = state.table();
        assert_eq!(t.refused().count(), 0);
        assert_eq!(to(t, Some("b.service.consul"), "/"), "b@dc1");
    }

    #[test]
    fn names_that_are_not_dns_labels_are_refused() {
        let specs = [
            spec("../admin", "dc1", vec![inst(1, &["haproxy"])]),
            spec("a?b", "dc1", vec![inst(2, &["haproxy_tcp=5000"])]),
            web(),
        ];
        let (t, warnings) = build_with(&cfg(), &specs);
        assert_eq!(t.backends().count(), 1);
        assert_eq!(t.tcp_ports().count(), 0);
        assert_eq!(t.refused().count(), 2);
        assert!(t.refused().all(|r| r.reason == Refusal::Name));
        assert_eq!(warnings.len(), 2);
        // Host names that would carry such a name into a Consul query.
        assert_eq!(other_datacenter_name("a?b.service.dc2.consul", ".consul"), None);
        assert_eq!(other_datacenter_name("web.service.d#c.consul", ".consul"), None);
        assert_eq!(
            other_datacenter_name("web.service.dc2.consul", ".consul"),
            Some(("web", "dc2"))
        );
    }

    #[test]
    fn add_domain_is_normalised() {
        for add in [
            "apps.example.com",
            ".apps.example.com",
            ".APPS.Example.com.",
            " apps.example.com ",
        ] {
            let c = TableConfig {
                add_domain: Some(add.into()),
                ..cfg()
            };
            let (t, _) = build_with(&c, &[web()]);
            assert_eq!(to(&t, Some("web.apps.example.com"), "/"), "web@dc1", "{add:?}");
            assert_eq!(to(&t, Some("webapps.example.com"), "/"), "none", "{add:?}");
        }
        for add in [None, Some(""), Some(".")] {
            let c = TableConfig {
                add_domain: add.map(Into::into),
                ..cfg()
            };
            let (t, _) = build_with(&c, &[web()]);
            assert_eq!(to(&t, Some("web.apps.example.com"), "/"), "none");
            assert_eq!(
                to(&t, Some("web"), "/"),
                "none",
                "no add-domain must not mean the bare name"
            );
            assert_eq!(to(&t, Some("web.service.consul"), "/"), "web@dc1");
        }
    }

    #[test]
    fn domain_and_datacenter_are_case_and_dot_insensitive() {
        let c = TableConfig {
            consul_domain: ".Consul.".into(),
            local_datacenter: "DC1".into(),
            ..cfg()
        };
        let (t, w) = build_with(&c, &[spec("Web", "dc1", vec![inst(1, &["haproxy"])])]);
        assert!(w.is_empty());
        assert_eq!(to(&t, Some("web.service.dc1.consul"), "/"), "Web@dc1");
        assert_eq!(to(&t, Some("web.service.consul"), "/"), "Web@dc1");
        assert_eq!(to(&t, Some("web.apps.example.com"), "/"), "Web@dc1");
    }

    #[test]
    fn other_datacenters_and_their_fallback() {
        let t = build(&[
            web(),
            spec(
                "web",
                "DC2",
                vec![inst(21, &["haproxy", "haproxy_route=/remote", "haproxy_tcp=7000"])],
            ),
            spec("api", "dc1", vec![inst(2, &["haproxy"])]),
            spec("db", "dc2", vec![inst(22, &["haproxy"])]),
        ]);
        assert_eq!(to(&t, Some("web.service.dc2.consul"), "/"), "web@DC2");
        assert_eq!(to(&t, Some("WEB.service.dc2.consul."), "/x"), "web@DC2");
        assert_eq!(
            to(&t, Some("web.service.consul"), "/"),
            "web@dc1",
            "the plain name stays local"
        );
        assert_eq!(
            to(&t, Some("web.service.dc3.consul"), "/"),
            "web@dc1",
            "unknown dc falls back to local"
        );
        assert_eq!(
            to(&t, Some("api.service.dc2.consul"), "/"),
            "api@dc1",
            "no dc2 spec for api"
        );
        assert_eq!(to(&t, Some("db.service.dc2.consul"), "/"), "db@dc2");
        assert_eq!(
            to(&t, Some("db.service.consul"), "/"),
            "none",
            "a remote-only service has no local names"
        );
        assert_eq!(to(&t, Some("db.service.dc3.consul"), "/"), "none");
        assert_eq!(to(&t, Some("db.apps.example.com"), "/"), "none");
        // Another datacenter's routes and ports are not ours.
        assert_eq!(to(&t, Some("unknown.example.com"), "/remote"), "none");
        assert_eq!(t.tcp_ports().count(), 0);
        // Malformed variants of the pattern.
        for host in [
            "service.dc2.consul",
            ".service.dc2.consul",
            "web.service..consul",
            "web.service.dc2",
            "consul",
        ] {
            assert_eq!(to(&t, Some(host), "/"), "none", "{host}");
        }
        // A remote spec whose instances are all gone falls back to local too.
        let t = build(&[web(), spec("web", "dc2", vec![])]);
        assert_eq!(to(&t, Some("web.service.dc2.consul"), "/"), "web@dc1");
        // Fallbacks are flagged, so the proxy can ask for that datacenter.
        assert!(matches!(
            t.route(Some("web.service.dc2.consul"), "/"),
            Route::OtherDatacenter(Some(_))
        ));
        assert!(matches!(
            t.route(Some("nope.service.dc2.consul"), "/"),
            Route::OtherDatacenter(None)
        ));
        assert!(matches!(t.route(Some("web.service.consul"), "/"), Route::Backend(_)));
        assert_eq!(
            other_datacenter_name("web.service.dc2.consul", ".consul"),
            Some(("web", "dc2"))
        );
        assert_eq!(other_datacenter_name("web.service.consul", ".consul"), None);
    }

    #[test]
    fn path_routes_take_the_longest_segment_prefix() {
        let t = build(&[
            spec("minions", "dc1", vec![inst(1, &["haproxy_route=/minions"])]),
            spec("admin", "dc1", vec![inst(2, &["haproxy_route=/minions/admin/"])]),
        ]);
        for (path, want) in [
            ("/minions", "minions@dc1"),
            ("/minions/", "minions@dc1"),
            ("/minions/x", "minions@dc1"),
            ("/minions/admin", "admin@dc1"),
            ("/minions/admin/x/y", "admin@dc1"),
            ("/minions/administrator", "minions@dc1"),
            ("/minionsX", "none"),
            ("/minion", "none"),
            ("/Minions", "none"),
            ("/", "none"),
            ("", "none"),
            ("minions", "none"),
            ("/caf\u{e9}/minions", "none"),
        ] {
            assert_eq!(to(&t, Some("any.example.com"), path), want, "{path:?}");
        }
        assert_eq!(
            to(&t, None, "/minions/x"),
            "minions@dc1",
            "whatever the Host, even none"
        );
        let t = build(&[
            spec("minions", "dc1", vec![inst(1, &["haproxy_route=/minions"])]),
            spec("root", "dc1", vec![inst(2, &["haproxy_route=/"])]),
        ]);
        for (path, want) in [
            ("/minionsX", "root@dc1"),
            ("/", "root@dc1"),
            ("", "root@dc1"),
            ("*", "root@dc1"),
        ] {
            assert_eq!(to(&t, Some("x"), path), want, "{path:?}");
        }
        assert_eq!(to(&t, Some("x"), "/minions/1"), "minions@dc1");
    }

    #[test]
    fn host_beats_path_and_path_beats_landing() {
        let t = build(&[
            spec("app", "dc1", vec![inst(1, &["haproxy"])]),
            spec(
                "catch",
                "dc1",
                vec![inst(2, &["haproxy_route=/", "haproxy_route=/very/long/prefix"])],
            ),
        ]);
        assert_eq!(to(&t, Some("app.service.consul"), "/very/long/prefix/x"), "app@dc1");
        assert_eq!(to(&t, Some("other.example.com"), "/very/long/prefix/x"), "catch@dc1");
        assert_eq!(to(&t, Some("localhost"), "/"), "catch@dc1");
    }

    #[test]
    fn landing_hosts() {
        let t = build(&[web()]);
        for host in [
            "localhost",
            "LOCALHOST:80",
            "localhost.",
            "10.0.0.5",
            "10.0.0.5:8080",
            "host1",
            "[::1]:80",
            "::1",
        ] {
            assert_eq!(to(&t, Some(host), "/anything"), "landing", "{host}");
        }
        assert_eq!(to(&t, Some("unknown.example.com"), "/"), "none");
        assert_eq!(to(&t, None, "/"), "none");
        let empty = RoutingTable::empty(&cfg());
        assert_eq!(to(&empty, Some("localhost"), "/"), "landing");
        assert_eq!(to(&empty, Some("web.service.consul"), "/"), "none");
        assert_eq!((empty.backends().count(), empty.tcp_ports().count()), (0, 0));
        // A service that claims a landing name gets it.
        let t = build(&[spec("home", "dc1", vec![inst(1, &["urlprefix-localhost/"])])]);
        assert_eq!(to(&t, Some("localhost"), "/"), "home@dc1");
    }

    #[test]
    fn fabio_prefixes_route_by_host_and_path() {
        let t = build(&[
            spec(
                "shop",
                "dc1",
                vec![inst(
                    1,
                    &[
                        "urlprefix-shop.example.com/",
                        "urlprefix-api.example.com/v1",
                        "urlprefix-/static",
                    ],
                )],
            ),
            spec("api", "dc1", vec![inst(2, &["urlprefix-API.example.com:443/"])]),
        ]);
        assert_eq!(to(&t, Some("Shop.Example.com"), "/cart"), "shop@dc1");
        assert_eq!(to(&t, Some("api.example.com"), "/v1/items"), "shop@dc1");
        assert_eq!(to(&t, Some("api.example.com"), "/v1"), "shop@dc1");
        assert_eq!(to(&t, Some("api.example.com"), "/v10"), "api@dc1");
        assert_eq!(to(&t, Some("api.example.com"), "/"), "api@dc1");
        assert_eq!(to(&t, Some("elsewhere.example.com"), "/static/app.js"), "shop@dc1");
        assert_eq!(to(&t, Some("elsewhere.example.com"), "/v1"), "none");
        // Fabio tags alone make an HTTP service, with its Consul names too.
        assert_eq!(to(&t, Some("shop.service.consul"), "/"), "shop@dc1");
        // A host with only a deeper prefix falls through to the path routes.
        let t = build(&[
            spec("v1", "dc1", vec![inst(1, &["urlprefix-only.example.com/v1"])]),
            spec("rest", "dc1", vec![inst(2, &["haproxy_route=/"])]),
        ]);
        assert_eq!(to(&t, Some("only.example.com"), "/v1/x"), "v1@dc1");
        assert_eq!(to(&t, Some("only.example.com"), "/v2"), "rest@dc1");
    }

    #[test]
    fn http_membership_and_union_of_route_tags() {
        let (t, w) = build_with(
            &cfg(),
            &[spec(
                "mixed",
                "dc1",
                vec![
                    inst(1, &["haproxy", "haproxy_route=/a"]),
                    inst(2, &["haproxy_route=/b"]),
                    inst(3, &["haproxy_tcp=9000"]),
                ],
            )],
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("disagree on haproxy_route") && w[0].contains("/a, /b"),
            "{w:?}"
        );
        let backend = t.backends().next().expect("one HTTP backend");
        let addrs: Vec<SocketAddr> = backend.instances.iter().map(|i| i.addr).collect();
        assert_eq!(
            addrs,
            [addr(1, 8080), addr(2, 8080)],
            "the TCP-only instance takes no HTTP"
        );
        assert_eq!(to(&t, None, "/a"), "mixed@dc1");
        assert_eq!(to(&t, None, "/b/c"), "mixed@dc1");
        let tcp: Vec<(u16, Vec<SocketAddr>)> = t
            .tcp_ports()
            .map(|(p, b)| (p, b.instances.iter().map(|i| i.addr).collect()))
            .collect();
        assert_eq!(tcp, [(9000, vec![addr(3, 8080)])]);
        // TCP only: no HTTP names at all.
        let t = build(&[spec("pg", "dc1", vec![inst(1, &["haproxy_tcp=5432"])])]);
        assert_eq!(to(&t, Some("pg.service.consul"), "/"), "none");
        assert_eq!(t.backends().count(), 0);
        assert_eq!(t.tcp_ports().map(|(p, _)| p).collect::<Vec<_>>(), [5432]);
        // Instances nobody asked us to balance are left out entirely.
        let t = build(&[spec("plain", "dc1", vec![inst(1, &["production"])])]);
        assert_eq!((t.backends().count(), t.tcp_ports().count()), (0, 0));
    }

    #[test]
    fn tcp_ports_union_and_disagreement() {
        let (t, w) = build_with(
            &cfg(),
            &[
                spec(
                    "db",
                    "dc1",
                    vec![inst(1, &["haproxy_tcp=5433"]), inst(2, &["haproxy_tcp=5432"])],
                ),
                spec(
                    "cache",
                    "dc1",
                    vec![inst(3, &["haproxy_tcp=6379"]), inst(4, &["haproxy_tcp=6379"])],
                ),
            ],
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("'db'") && w[0].contains("5432, 5433"), "{w:?}");
        let ports: Vec<(u16, String, usize)> = t
            .tcp_ports()
            .map(|(p, b)| (p, b.service.clone(), b.instances.len()))
            .collect();
        assert_eq!(
            ports,
            [
                (5432, "db".into(), 2),
                (5433, "db".into(), 2),
                (6379, "cache".into(), 2)
            ]
        );
    }

    #[test]
    fn all_weight_zero_still_routes_but_picks_nothing() {
        let t = build(&[spec("drain", "dc1", vec![inst(1, &["haproxy", "haproxy_weight=0"])])]);
        let Route::Backend(backend) = t.route(Some("drain.service.consul"), "/") else {
            panic!("drained service must still route (503 from the proxy, not 'unknown host')");
        };
        assert!(backend.pick(0, &[]).is_none());
    }

    #[test]
    fn conflicts_go_to_the_first_name_whatever_the_input_order() {
        let alpha = spec(
            "alpha",
            "dc1",
            vec![inst(
                1,
                &[
                    "haproxy_route=/x",
                    "haproxy_tcp=5432",
                    "urlprefix-shared.example.com/",
                    "urlprefix-/f",
                ],
            )],
        );
        let beta = spec(
            "beta",
            "dc1",
            vec![inst(
                2,
                &[
                    "haproxy_route=/x",
                    "haproxy_tcp=5432",
                    "urlprefix-shared.example.com/",
                    "urlprefix-/f",
                ],
            )],
        );
        let (t1, w1) = build_with(&cfg(), &[beta.clone(), alpha.clone()]);
        let (t2, w2) = build_with(&cfg(), &[alpha, beta]);
        assert_eq!(w1, w2);
        assert_eq!(w1.len(), 4, "{w1:?}");
        for w in &w1 {
            assert!(w.contains("'alpha' (dc1) and 'beta' (dc1); 'alpha' (dc1) wins"), "{w}");
        }
        assert!(w1.iter().any(|w| w.starts_with("haproxy_route /x ")), "{w1:?}");
        assert!(w1.iter().any(|w| w.starts_with("haproxy_tcp port 5432 ")), "{w1:?}");
        assert!(w1.iter().any(|w| w.starts_with("host shared.example.com ")), "{w1:?}");
        assert!(w1.iter().any(|w| w.starts_with("urlprefix-/f ")), "{w1:?}");
        for t in [&t1, &t2] {
            assert_eq!(to(t, None, "/x"), "alpha@dc1");
            assert_eq!(to(t, None, "/f"), "alpha@dc1");
            assert_eq!(to(t, Some("shared.example.com"), "/"), "alpha@dc1");
            assert_eq!(t.tcp_ports().next().map(|(_, b)| b.service.as_str()), Some("alpha"));
            assert_eq!(
                to(t, Some("beta.service.consul"), "/"),
                "beta@dc1",
                "the loser keeps its own names"
            );
            let names: Vec<&str> = t.backends().map(|b| b.service.as_str()).collect();
            assert_eq!(names, ["alpha", "beta"]);
        }
        // Names differing only in case collide on every host name.
        let (t, w) = build_with(
            &cfg(),
            &[
                spec("web", "dc1", vec![inst(1, &["haproxy"])]),
                spec("Web", "dc1", vec![inst(2, &["haproxy"])]),
            ],
        );
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w.iter().all(|w| w.contains("'Web' (dc1) wins")), "{w:?}");
        assert_eq!(to(&t, Some("web.service.consul"), "/"), "Web@dc1");
        assert_eq!(to(&t, Some("web.service.dc9.consul"), "/"), "Web@dc1");
    }

    #[test]
    fn one_service_claiming_a_thing_twice_is_no_conflict() {
        build(&[spec(
            "web",
            "dc1",
            vec![
                inst(
                    1,
                    &[
                        "haproxy",
                        "urlprefix-web.service.consul/",
                        "urlprefix-/a",
                        "haproxy_route=/a",
                    ],
                ),
                inst(
                    2,
                    &[
                        "haproxy",
                        "urlprefix-web.service.consul/",
                        "urlprefix-/a",
                        "haproxy_route=/a",
                    ],
                ),
            ],
        )]);
    }

    #[test]
    fn duplicate_specs_are_warned() {
        let (t, w) = build_with(&cfg(), &[web(), spec("web", "DC1", vec![inst(9, &["haproxy"])])]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("listed twice"));
        assert_eq!(t.backends().count(), 1);
        assert_eq!(
            t.backends().next().map(|b| b.instances[0].addr),
            Some(addr(1, 8080)),
            "the first list is kept"
        );
    }

    fn backend(weights: &[u16]) -> Backend {
        let instances = weights
            .iter()
            .zip(b'a'..)
            .map(|(w, id)| BackendInstance {
                id: char::from(id).to_string(),
                node: "n".into(),
                addr: addr(id, 80),
                weight: *w,
                health: Arc::default(),
                httpchk: None,
            })
            .collect();
        Backend::new("svc".into(), "dc1".into(), instances, Arc::default())
    }

    /// `n` picks at `now` as instance ids, `-` for none.
    fn picks(b: &Backend, n: usize, now: u64, exclude: &[SocketAddr]) -> String {
        (0..n)
            .map(|_| b.pick(now, exclude).map_or("-", |i| i.id.as_str()))
            .collect()
    }

    #[test]
    fn smooth_wrr_matches_nginx() {
        let b = backend(&[5, 1, 1]);
        assert_eq!(picks(&b, 7, 0, &[]), "aabacaa");
        assert_eq!(picks(&b, 14, 0, &[]), "aabacaaaabacaa", "the cycle repeats exactly");
        let b = backend(&[100, 50]);
        assert_eq!(picks(&b, 6, 0, &[]), "abaaba");
        let many = picks(&b, 300, 0, &[]);
        assert_eq!((many.matches('a').count(), many.matches('b').count()), (200, 100));
        let b = backend(&[1, 1, 1]);
        assert_eq!(picks(&b, 6, 0, &[]), "abcabc");
    }

    #[test]
    fn weight_zero_is_never_picked() {
        let b = backend(&[0, 1, 0]);
        assert_eq!(picks(&b, 5, 0, &[]), "bbbbb");
        b.instances[1].health.ejected_until_ms.store(100, Ordering::Relaxed);
        assert_eq!(picks(&b, 3, 0, &[]), "bbb", "not even as a fallback");
        assert_eq!(picks(&b, 1, 0, &[addr(b'b', 80)]), "-");
        assert_eq!(picks(&backend(&[]), 1, 0, &[]), "-");
    }

    #[test]
    fn ejected_and_down_instances_are_skipped_until_they_recover() {
        let b = backend(&[1, 1, 1]);
        b.instances[0].health.ejected_until_ms.store(1000, Ordering::Relaxed);
        assert_eq!(picks(&b, 4, 999, &[]), "bcbc");
        assert!(
            picks(&b, 3, 1000, &[]).contains('a'),
            "back once the ejection has run out"
        );
        let b = backend(&[1, 1, 1]);
        b.instances[1].health.check_up.store(false, Ordering::Relaxed);
        assert_eq!(picks(&b, 4, 0, &[]), "acac");
        b.instances[1].health.check_up.store(true, Ordering::Relaxed);
        assert!(picks(&b, 3, 0, &[]).contains('b'));
    }

    #[test]
    fn exclude_list_skips_tried_addresses() {
        let b = backend(&[5, 1, 1]);
        assert_eq!(picks(&b, 4, 0, &[addr(b'a', 80)]), "bcbc");
        assert_eq!(picks(&b, 2, 0, &[addr(b'a', 80), addr(b'c', 80)]), "bb");
        assert_eq!(picks(&b, 1, 0, &[addr(b'a', 80), addr(b'b', 80), addr(b'c', 80)]), "-");
    }

    #[test]
    fn all_unavailable_falls_back_to_the_least_recently_ejected() {
        let b = backend(&[1, 1, 1]);
        for (instance, until) in b.instances.iter().zip([5000, 3000, 4000]) {
            instance.health.ejected_until_ms.store(until, Ordering::Relaxed);
        }
        assert_eq!(picks(&b, 2, 1000, &[]), "bb");
        assert_eq!(picks(&b, 1, 1000, &[addr(b'b', 80)]), "c");
        assert_eq!(picks(&b, 1, 1000, &[addr(b'b', 80), addr(b'c', 80)]), "a");
        // Failing only the active check counts as never ejected: those go first.
        b.instances[0].health.ejected_until_ms.store(0, Ordering::Relaxed);
        b.instances[0].health.check_up.store(false, Ordering::Relaxed);
        assert_eq!(picks(&b, 2, 1000, &[]), "aa");
        // All failing their check: round-robin among them, not one instance taking it all.
        let b = backend(&[1, 1]);
        for i in &b.instances {
            i.health.check_up.store(false, Ordering::Relaxed);
        }
        assert_eq!(picks(&b, 4, 0, &[]), "abab");
    }

    #[test]
    fn eject_uses_the_registry_clock_and_never_shortens() {
        let registry = HealthRegistry::new();
        let h = registry.get(addr(1, 80));
        assert!(h.is_available(registry.now_ms()));
        registry.eject(&h, 60_000);
        let until = h.ejected_until_ms.load(Ordering::Relaxed);
        assert!(until >= 60_000 && !h.is_available(registry.now_ms()));
        registry.eject(&h, 1);
        assert_eq!(h.ejected_until_ms.load(Ordering::Relaxed), until);
        assert!(h.is_available(until));
        registry.eject(&h, u64::MAX);
        assert_eq!(h.ejected_until_ms.load(Ordering::Relaxed), u64::MAX, "saturates");
    }

    #[test]
    fn health_survives_rebuilds_and_retain_forgets() {
        let registry = HealthRegistry::new();
        let specs = [spec("web", "dc1", vec![inst(1, &["haproxy"]), inst(2, &["haproxy"])])];
        let (t1, _) = RoutingTable::build(&cfg(), &specs, &registry);
        let (t2, _) = RoutingTable::build(&cfg(), &specs, &registry);
        let h = |t: &RoutingTable, i: usize| {
            t.backends()
                .next()
                .map(|b| b.instances[i].health.clone())
                .expect("backend")
        };
        assert!(Arc::ptr_eq(&h(&t1, 0), &h(&t2, 0)));
        assert!(!Arc::ptr_eq(&h(&t1, 0), &h(&t1, 1)));
        assert!(Arc::ptr_eq(&h(&t1, 0), &registry.get(addr(1, 8080))));
        // An ejection recorded through the old table is seen by the new one.
        h(&t1, 0).ejected_until_ms.store(u64::MAX, Ordering::Relaxed);
        let picked = t2.backends().next().and_then(|b| b.pick(0, &[])).map(|i| i.addr);
        assert_eq!(picked, Some(addr(2, 8080)));
        // The TCP and HTTP backends of one address share its state too.
        let both = [spec("svc", "dc1", vec![inst(1, &["haproxy", "haproxy_tcp=9000"])])];
        let (t3, _) = RoutingTable::build(&cfg(), &both, &registry);
        let tcp_health = t3
            .tcp_ports()
            .next()
            .map(|(_, b)| b.instances[0].health.clone())
            .expect("tcp");
        assert!(Arc::ptr_eq(&tcp_health, &h(&t1, 0)));

        registry.retain(&HashSet::from([addr(1, 8080)]));
        assert!(Arc::ptr_eq(&registry.get(addr(1, 8080)), &h(&t1, 0)));
        let fresh = registry.get(addr(2, 8080));
        assert!(!Arc::ptr_eq(&fresh, &h(&t1, 1)), "forgotten, so a new state");
        assert!(fresh.check_up.load(Ordering::Relaxed), "new instances start up");
    }

    #[test]
    fn table_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RoutingTable>();
        assert_send_sync::<HealthRegistry>();
        assert_send_sync::<Arc<Backend>>();
    }
}
