//! The live view of the Consul catalog: every service, its instances and their
//! health, kept current on a fixed number of connections whatever the size of
//! the catalog. The lb table, the dns wildcard targets, the status page and the
//! admin API all read this one view.
//!
//! ```text
//!  watches (consul::watch::follow, one lane each):
//!    catalog/services          names and tags; wakes on every registration change
//!    health/state/critical     the failing checks   (answer: the failing only)
//!    health/state/warning      the warning checks
//!        │ Signal (mpsc)
//!        ▼
//!  Runner ── names/tags differ from the view ──▶ those services ─────┐
//!         ── check lists moved ────────────────▶ their services ─────┤
//!         ── registration change ──▶ recently changed services ──────┼─▶ fetch
//!                                ──▶ ui/services lines that differ ──┘  /v1/health/service/<s>
//!                                    from the view (count, nodes, checks)
//!         ── index reset, failure, unexplained change, every `resync` ─▶ full sync
//!                                                    (/v1/internal/ui/nodes, one request)
//!        │ Arc<Catalog> (tokio watch: readers see the latest, never a half-applied one)
//!        ▼
//!  lb::watch, dns::wildcard, supervisor::admin
//! ```
//!
//! The services are a persistent map ([`Services`], `imbl::OrdMap`): publishing
//! a picture clones it in O(1), and two pictures share every node that a change
//! did not touch, so a reader that keeps the picture it last applied finds what
//! changed since with `OrdMap::diff` in time proportional to the change (the lb
//! does). A full sync merges what it read into the working copy, entry by entry,
//! so it too leaves the unchanged services shared.
//!
//! Cost per change: a check flip costs Consul two small answers (the unhealthy
//! lists) and one fetch of the service concerned, whatever the size of the
//! catalog. A registration change costs the service list and one `ui/services`
//! summary, both of which Consul builds from the whole catalog (Consul 1.8 has
//! no cheaper way to say *which* service a registration touched), the summary
//! paced so that Wayfinder never takes more than a third of the agent's time,
//! plus fetches of the services whose line differs from the view. Comparing the
//! summary with the view itself (not with the previous summary) makes the view
//! correct itself whatever was missed before. Services changed in the last
//! minute are fetched first on every registration change, so the steps of a
//! deploy (new instance, its check passing, the old one leaving) propagate
//! without waiting for the summary. A change that nothing explains, and every
//! `resync` period, is caught by a full sync, which also counts what the
//! incremental path had missed (`corrections`): a stale view shows up as a
//! number, not as a silence.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ConsulError;
use super::api::null_as_empty;
use super::api::{CheckRow, HealthRow, UiNode, UiService, instance_address};
use super::http::{Answer, ConsulHttp, Endpoint, POOL_SIZE};
use super::watch::{Event, Query, WatchSnapshot, WatchStats, follow};

/// More services than this to fetch at once: one full sync is cheaper.
const MAX_TARGETED: usize = 64;
/// Services that changed within this long are fetched first on a registration change.
const HOT_FOR: Duration = Duration::from_secs(60);
/// At most this many of them.
const HOT_MAX: usize = 8;
/// Time for signals that belong together (one registration moves several
/// watches) to arrive before acting on them.
const SETTLE: Duration = Duration::from_millis(2);
/// The shortest gap between two full syncs.
const FULL_MIN_GAP: Duration = Duration::from_secs(1);
/// The shortest gap between two `ui/services` summaries.
const SUMMARY_MIN_GAP: Duration = Duration::from_millis(10);
/// After a registration change the fast path explained (a new name, a service
/// that changed lately), the summary still checks the window for other changes,
/// this much later: one summary for a burst of changes, not one per change.
const VERIFY_AFTER: Duration = Duration::from_millis(500);

/// Worst health of an instance's checks (its node's included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Every check passes (or there are none).
    #[default]
    Passing,
    /// At least one warns, none fails.
    Warning,
    /// At least one fails.
    Critical,
}

impl Health {
    fn of(status: &str) -> Self {
        match status {
            "passing" => Health::Passing,
            "warning" => Health::Warning,
            _ => Health::Critical,
        }
    }

    /// `passing`, `warning`, `critical`.
    pub fn name(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// How many of an instance's checks (its node's included) are at each status,
/// counted as Consul's `ui/services` counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckCounts {
    /// Passing checks.
    pub passing: u32,
    /// Warning checks.
    pub warning: u32,
    /// Critical checks.
    pub critical: u32,
}

impl CheckCounts {
    fn add(&mut self, other: &CheckCounts) {
        self.passing += other.passing;
        self.warning += other.warning;
        self.critical += other.critical;
    }

    fn of<'a>(statuses: impl Iterator<Item = &'a str>) -> Self {
        let mut c = Self::default();
        for s in statuses {
            match s {
                "passing" => c.passing += 1,
                "warning" => c.warning += 1,
                "critical" => c.critical += 1,
                _ => {}
            }
        }
        c
    }
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEntry {
    /// Consul service ID.
    pub id: String,
    /// Node name.
    pub node: String,
    /// The address to reach it at (its own, else its node's), as Consul holds it.
    pub address: String,
    /// Port (0 when Consul holds no usable port).
    pub port: u16,
    /// Its tags.
    pub tags: Vec<String>,
    /// Worst of its checks.
    pub health: Health,
    /// The raft index of its last registration change (what tells the view
    /// which change a registration signal was about).
    pub modify_index: u64,
    /// Its checks by status.
    pub checks: CheckCounts,
}

/// One service and its instances, ordered by node then ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Service name.
    pub name: String,
    /// Union of its instances' tags, sorted.
    pub tags: Vec<String>,
    /// Its instances.
    pub instances: Vec<InstanceEntry>,
}

impl ServiceEntry {
    fn new(name: String, mut instances: Vec<InstanceEntry>) -> Option<Self> {
        if instances.is_empty() {
            return None;
        }
        instances.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
        let tags: BTreeSet<&String> = instances.iter().flat_map(|i| &i.tags).collect();
        let tags = tags.into_iter().cloned().collect();
        Some(Self { name, tags, instances })
    }

    /// From a `/v1/health/service/<name>` answer; `None` when it has no instance.
    pub fn from_health(name: &str, rows: Vec<HealthRow>) -> Option<Self> {
        let instances = rows
            .into_iter()
            .map(|r| {
                let health = r
                    .checks
                    .iter()
                    .map(|c| Health::of(&c.status))
                    .max()
                    .unwrap_or(Health::Passing);
                InstanceEntry {
                    address: instance_address(&r.service, &r.node.address).to_string(),
                    checks: CheckCounts::of(r.checks.iter().map(|c| c.status.as_str())),
                    id: r.service.id,
                    node: r.node.node,
                    port: r.service.port,
                    tags: r.service.tags,
                    health,
                    modify_index: r.service.modify_index,
                }
            })
            .collect();
        Self::new(name.to_string(), instances)
    }

    /// The instances whose checks all pass.
    pub fn passing(&self) -> impl Iterator<Item = &InstanceEntry> {
        self.instances.iter().filter(|i| i.health == Health::Passing)
    }

    /// What `ui/services` says of this service, computed from the view.
    pub fn summary_line(&self) -> SummaryLine {
        let mut nodes: Vec<&str> = self.instances.iter().map(|i| i.node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut checks = CheckCounts::default();
        for i in &self.instances {
            checks.add(&i.checks);
        }
        SummaryLine {
            tags: self.tags.clone(),
            nodes: nodes.into_iter().map(str::to_string).collect(),
            instances: self.instances.len() as u64,
            checks,
        }
    }
}

/// One `ui/services` line, normalised (sorted, without duplicates) so that the
/// view's own line and Consul's compare equal when they agree.
#[derive(Debug, PartialEq, Eq)]
pub struct SummaryLine {
    /// Tags, sorted, once each.
    pub tags: Vec<String>,
    /// Nodes, sorted, once each.
    pub nodes: Vec<String>,
    /// Instances.
    pub instances: u64,
    /// Checks by status, node checks counted once per instance.
    pub checks: CheckCounts,
}

impl From<UiService> for SummaryLine {
    fn from(mut l: UiService) -> Self {
        l.tags.sort();
        l.tags.dedup();
        l.nodes.sort();
        l.nodes.dedup();
        Self {
            tags: l.tags,
            nodes: l.nodes,
            instances: l.instance_count,
            checks: CheckCounts {
                passing: l.checks_passing as u32,
                warning: l.checks_warning as u32,
                critical: l.checks_critical as u32,
            },
        }
    }
}

/// Every service by name, as the view publishes it: a persistent map (see the
/// module docs), cloned in O(1).
pub type Services = imbl::OrdMap<String, Arc<ServiceEntry>>;

/// Every service from a `/v1/internal/ui/nodes` answer.
fn services_from_nodes(nodes: Vec<UiNode>) -> BTreeMap<String, Arc<ServiceEntry>> {
    let mut by_service: BTreeMap<String, Vec<InstanceEntry>> = BTreeMap::new();
    for node in nodes {
        let node_health = node
            .checks
            .iter()
            .filter(|c| c.service_id.is_empty())
            .map(|c| Health::of(&c.status))
            .max()
            .unwrap_or(Health::Passing);
        let node_checks = node.checks.iter().filter(|c| c.service_id.is_empty());
        let node_counts = CheckCounts::of(node_checks.map(|c| c.status.as_str()));
        let mut own: HashMap<&str, (Health, CheckCounts)> = HashMap::new();
        for c in node.checks.iter().filter(|c| !c.service_id.is_empty()) {
            let (h, counts) = own
                .entry(c.service_id.as_str())
                .or_insert((Health::Passing, CheckCounts::default()));
            *h = (*h).max(Health::of(&c.status));
            counts.add(&CheckCounts::of(std::iter::once(c.status.as_str())));
        }
        for s in &node.services {
            let (health, mut checks) = own.get(s.id.as_str()).copied().unwrap_or_default();
            let health = health.max(node_health);
            checks.add(&node_counts);
            by_service.entry(s.service.clone()).or_default().push(InstanceEntry {
                id: s.id.clone(),
                node: node.node.clone(),
                address: instance_address(s, &node.address).to_string(),
                port: s.port,
                tags: s.tags.clone(),
                health,
                modify_index: s.modify_index,
                checks,
            });
        }
    }
    by_service
        .into_iter()
        .filter_map(|(name, instances)| ServiceEntry::new(name.clone(), instances).map(|e| (name, Arc::new(e))))
        .collect()
}

/// One consistent picture of the catalog, never changed once published.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Every service by name (shares its unchanged nodes with the previous picture).
    pub services: Services,
    /// False until the first full sync: readers that must not act on a partial
    /// picture (the lb's first table) wait for it.
    pub complete: bool,
    /// Bumped at every publication.
    pub generation: u64,
    /// When the Consul answer behind the newest change arrived (propagation is
    /// measured from here).
    pub received: Instant,
}

impl Catalog {
    fn empty() -> Self {
        Self {
            services: Services::new(),
            complete: false,
            generation: 0,
            received: Instant::now(),
        }
    }
}

/// What the view has done, for `/metrics` and the status pages.
#[derive(Debug)]
pub struct CatalogStatus {
    ok: AtomicBool,
    full_syncs: AtomicU64,
    summaries: AtomicU64,
    flagged: AtomicU64,
    fetches: AtomicU64,
    corrections: AtomicU64,
    last_full_sync_us: AtomicU64,
    /// The view's watches.
    pub watches: Vec<Arc<WatchStats>>,
}

/// A copy of [`CatalogStatus`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct CatalogSnapshot {
    /// The last sync or fetch worked and every watch is answering.
    pub ok: bool,
    /// Full syncs done (start, index resets, unexplained changes, periodic).
    pub full_syncs: u64,
    /// `ui/services` summaries read to find what a registration changed.
    pub summaries: u64,
    /// Services whose summary line differed from the view (and were fetched).
    pub flagged: u64,
    /// Services fetched one by one.
    pub fetches: u64,
    /// Services a full sync found different from what the watches had said.
    pub corrections: u64,
    /// How long the last full sync took, Consul's answer and decoding (ms).
    pub last_full_sync_ms: f64,
    /// Seconds since the stalest watch was last answered (`None`: not yet).
    pub age_secs: Option<f64>,
    /// The watches.
    pub watches: Vec<WatchSnapshot>,
}

impl CatalogStatus {
    /// True while the view is being kept current.
    pub fn ok(&self) -> bool {
        self.ok.load(Ordering::Relaxed) && self.watches.iter().all(|w| !w.failing())
    }

    /// Time since the stalest watch was last answered: how old the view may be.
    pub fn age(&self) -> Option<Duration> {
        self.watches
            .iter()
            .map(|w| w.age())
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> CatalogSnapshot {
        CatalogSnapshot {
            ok: self.ok(),
            full_syncs: self.full_syncs.load(Ordering::Relaxed),
            summaries: self.summaries.load(Ordering::Relaxed),
            flagged: self.flagged.load(Ordering::Relaxed),
            fetches: self.fetches.load(Ordering::Relaxed),
            corrections: self.corrections.load(Ordering::Relaxed),
            last_full_sync_ms: self.last_full_sync_us.load(Ordering::Relaxed) as f64 / 1000.0,
            age_secs: self.age().map(|a| a.as_secs_f64()),
            watches: self.watches.iter().map(|w| w.snapshot()).collect(),
        }
    }
}

/// A reader's handle on the view (cheap to clone).
#[derive(Clone, Debug)]
pub struct CatalogView {
    rx: watch::Receiver<Arc<Catalog>>,
    status: Arc<CatalogStatus>,
}

impl CatalogView {
    /// The catalog as it is now.
    pub fn current(&self) -> Arc<Catalog> {
        self.rx.borrow().clone()
    }

    /// A receiver that is told of every new picture.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.rx.clone()
    }

    /// The view's counters.
    pub fn status(&self) -> &CatalogStatus {
        &self.status
    }

    /// False once the task keeping the view current has ended (it is then
    /// started again by the next [`super::ConsulHub::catalog`]).
    pub fn is_alive(&self) -> bool {
        self.rx.has_changed().is_ok()
    }
}

/// Starts the watches and the runner on `tasks`; they end with `shutdown`.
pub(super) fn start(
    http: ConsulHttp,
    resync: Duration,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<CatalogView, ConsulError> {
    let (signals, signals_rx) = mpsc::channel::<Signal>(64);
    let stop = shutdown.child_token();
    // All three lanes first: a view gets all of its watches or none.
    let lanes = [http.lane(), http.lane(), http.lane()];
    let [Some(names_lane), Some(critical_lane), Some(warning_lane)] = lanes else {
        return Err(ConsulError::NoLane);
    };
    let registrations = WatchStats::new("registrations");
    let critical = WatchStats::new("critical checks");
    let warning = WatchStats::new("warning checks");

    let (tx, rx) = watch::channel(Arc::new(Catalog::empty()));
    let status = Arc::new(CatalogStatus {
        ok: AtomicBool::new(false),
        full_syncs: AtomicU64::new(0),
        summaries: AtomicU64::new(0),
        flagged: AtomicU64::new(0),
        fetches: AtomicU64::new(0),
        corrections: AtomicU64::new(0),
        last_full_sync_us: AtomicU64::new(0),
        watches: vec![registrations.clone(), critical.clone(), warning.clone()],
    });

    let names = Query {
        endpoint: Endpoint::CatalogServices,
        path: "/v1/catalog/services?stale".to_string(),
        decode: decode_names,
    };
    tasks.spawn(follow(
        names_lane,
        names,
        registrations,
        signals.clone(),
        Signal::Registrations,
        stop.clone(),
    ));
    for (lane, level, endpoint, stats) in [
        (critical_lane, Health::Critical, Endpoint::HealthCritical, critical),
        (warning_lane, Health::Warning, Endpoint::HealthWarning, warning),
    ] {
        let checks = Query {
            endpoint,
            path: format!("/v1/health/state/{}?stale", level.name()),
            decode: decode_checks,
        };
        tasks.spawn(follow(
            lane,
            checks,
            stats,
            signals.clone(),
            move |e| Signal::Checks(level, e),
            stop.clone(),
        ));
    }
    drop(signals);
    let runner = Runner {
        http,
        tx,
        status: status.clone(),
        services: Services::new(),
        unhealthy: HashMap::new(),
        shrink_index: 0,
        hot: VecDeque::new(),
        complete: false,
        generation: 0,
        summaries_supported: true,
        nodes_supported: true,
    };
    tasks.spawn(async move {
        // Whatever ends the runner (a panic included) ends its watches too, so
        // their lanes are free for the view that replaces it.
        let _stop_watches = stop.clone().drop_guard();
        runner.run(signals_rx, resync, stop).await;
    });
    Ok(CatalogView { rx, status })
}

/// `/v1/catalog/services`: every service with the union of its tags.
fn decode_names(http: &ConsulHttp, endpoint: Endpoint, answer: &Answer) -> Result<Names, ConsulError> {
    #[derive(serde::Deserialize)]
    struct Tags(#[serde(deserialize_with = "null_as_empty")] Vec<String>);
    let map: BTreeMap<String, Tags> = http.decode(endpoint, answer)?;
    Ok(map
        .into_iter()
        .map(|(name, Tags(mut tags))| {
            tags.sort();
            tags.dedup();
            (name, tags)
        })
        .collect())
}

/// Service names with their sorted tags.
type Names = BTreeMap<String, Vec<String>>;

fn decode_checks(http: &ConsulHttp, endpoint: Endpoint, answer: &Answer) -> Result<Vec<CheckRow>, ConsulError> {
    http.decode(endpoint, answer)
}

/// What the watches tell the runner.
enum Signal {
    /// The services table changed (or the watch was reset): names and tags.
    Registrations(Event<Names>),
    /// The list of checks at one unhealthy level.
    Checks(Health, Event<Vec<CheckRow>>),
}

/// Paces an expensive request: the next one waits at least `factor` times as
/// long as the last one took, and never less than `min_gap`.
struct Pacer {
    min_gap: Duration,
    factor: u32,
    next: Instant,
}

impl Pacer {
    fn new(min_gap: Duration, factor: u32) -> Self {
        Self {
            min_gap,
            factor,
            next: Instant::now(),
        }
    }

    fn ready(&self) -> bool {
        Instant::now() >= self.next
    }

    fn ran(&mut self, took: Duration) {
        self.next = Instant::now() + (took * self.factor).max(self.min_gap);
    }

    fn failed(&mut self, backoff: Duration) {
        self.next = Instant::now() + backoff.max(self.min_gap);
    }
}

/// Work the runner owes the view.
#[derive(Default)]
struct Pending {
    /// A full sync is needed (start, reset, failure, unexplained, periodic).
    full: bool,
    /// The periodic resync asked for it (corrections are counted then).
    periodic: bool,
    /// The services table moved to this index and is not explained yet.
    registrations: Option<u64>,
    /// The hot services were fetched for the pending registration change.
    hot_done: bool,
    /// A summary is due then, to check a window the fast path explained.
    verify_at: Option<Instant>,
    /// Services to fetch.
    fetch: BTreeSet<String>,
    /// When the oldest answer behind the pending work arrived.
    received: Option<Instant>,
}

impl Pending {
    fn arrived(&mut self, at: Instant) {
        self.received = Some(self.received.map_or(at, |r| r.min(at)));
    }
}

struct Runner {
    http: ConsulHttp,
    tx: watch::Sender<Arc<Catalog>>,
    status: Arc<CatalogStatus>,
    /// The working copy; published as `Arc<Catalog>` after each step (an O(1) clone).
    services: Services,
    /// Consul's index for the newest fetch that found a service with fewer
    /// instances (or none): a deregistration leaves no instance to carry its
    /// index, so this is what explains one.
    shrink_index: u64,
    /// The unhealthy checks by level, keyed by (node, check ID).
    unhealthy: HashMap<Health, HashMap<(String, String), CheckRow>>,
    /// Services that changed lately, newest last.
    hot: VecDeque<(String, Instant)>,
    complete: bool,
    generation: u64,
    summaries_supported: bool,
    nodes_supported: bool,
}

impl Runner {
    /// Keeps the view current until shutdown.
    ///
    /// Long on purpose: one loop owns the view's state machine (full sync,
    /// per-service fetches, periodic re-sync, back-off), and every branch of its
    /// `select!` reads and updates the same state.
    async fn run(mut self, mut signals: mpsc::Receiver<Signal>, resync: Duration, shutdown: CancellationToken) {
        let mut pending = Pending {
            full: true,
            ..Pending::default()
        };
        let mut full_pacer = Pacer::new(FULL_MIN_GAP, 4);
        let mut summary_pacer = Pacer::new(SUMMARY_MIN_GAP, 2);
        let mut resync_at = Instant::now() + resync;
        let mut failures = 0u32;
        // At most one summary in flight, read beside the runner so that a check
        // flip is not kept waiting behind it: (registration index or 0 for a
        // window check, when it started, the answer).
        let mut summaries = SummaryReads::new();
        let mut summary_done = None;
        loop {
            let due = self.next_due(&pending, &full_pacer, &summary_pacer, resync_at, !summaries.is_empty());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(joined) = summaries.join_next(), if !summaries.is_empty() => {
                    summary_done = joined.ok();
                }
                signal = signals.recv() => {
                    let Some(signal) = signal else { return };
                    self.absorb(signal, &mut pending);
                    // Signals of one change arrive within moments of each other.
                    tokio::time::sleep(SETTLE).await;
                    while let Ok(signal) = signals.try_recv() {
                        self.absorb(signal, &mut pending);
                    }
                }
                _ = tokio::time::sleep_until(due.into()) => {}
            }
            if Instant::now() >= resync_at {
                resync_at = Instant::now() + resync;
                pending.full = true;
                pending.periodic = true;
            }
            if pending.full {
                if !full_pacer.ready() {
                    continue;
                }
                let started = Instant::now();
                match self.full_sync(pending.periodic).await {
                    Ok(()) => {
                        failures = 0;
                        full_pacer.ran(started.elapsed());
                        let received = pending.received.unwrap_or(started);
                        pending = Pending::default();
                        self.publish(received);
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        let backoff = Duration::from_millis((250u64 << failures.min(7)).min(30_000));
                        full_pacer.failed(backoff);
                        self.status.ok.store(false, Ordering::Relaxed);
                        if self.http.phase().failure_is_outage() {
                            tracing::warn!(%error, retry_in = ?backoff, "consul: cannot read the catalog; keeping the last picture");
                        } else {
                            tracing::debug!(%error, retry_in = ?backoff, phase = ?self.http.phase(), "consul: cannot read the catalog while the agent starts or stops");
                        }
                    }
                }
                continue;
            }
            if !self.complete {
                continue;
            }
            let received = pending.received.unwrap_or_else(Instant::now);
            let mut changed = false;
            if !pending.fetch.is_empty() {
                let names = std::mem::take(&mut pending.fetch);
                match self.fetch_all(names).await {
                    Ok(c) => changed |= c,
                    Err(error) => {
                        if self.http.phase().failure_is_outage() {
                            tracing::warn!(%error, "consul: cannot fetch changed services; full sync");
                        } else {
                            tracing::debug!(%error, "consul: cannot fetch changed services while the agent starts or stops; full sync");
                        }
                        self.status.ok.store(false, Ordering::Relaxed);
                        pending.full = true;
                    }
                }
            }
            if let Some((index, started, result)) = summary_done.take() {
                summary_pacer.ran(started.elapsed());
                match result {
                    Ok(lines) => {
                        if lines.is_none() {
                            self.summaries_supported = false;
                        }
                        match self.apply_summary(lines, index).await {
                            Ok((c, explained)) => {
                                tracing::debug!(index, changed = c, explained, "consul: registration change localized");
                                changed |= c;
                                if !explained {
                                    tracing::debug!(
                                        index,
                                        "consul: a registration change no summary explains; full sync"
                                    );
                                    pending.full = true;
                                }
                            }
                            Err(error) => {
                                tracing::debug!(%error, "consul: fetch after the summary failed; full sync");
                                pending.full = true;
                            }
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "consul: summary failed; full sync");
                        pending.full = true;
                    }
                }
            }
            if let Some(index) = pending.registrations {
                if !pending.hot_done {
                    pending.hot_done = true;
                    let hot = self.hot_services();
                    if !hot.is_empty() {
                        match self.fetch_all(hot).await {
                            Ok(c) => changed |= c,
                            Err(_) => pending.full = true,
                        }
                    }
                }
                if self.explains(index) {
                    // Explained by the names or the hot services: publish now,
                    // check the rest of the window a little later.
                    pending.registrations = None;
                    pending.hot_done = false;
                    pending.verify_at.get_or_insert(Instant::now() + VERIFY_AFTER);
                } else if summaries.is_empty() && summary_pacer.ready() && !pending.full {
                    pending.registrations = None;
                    pending.hot_done = false;
                    pending.verify_at = None;
                    self.start_summary(&mut summaries, index);
                }
            } else if pending.verify_at.is_some_and(|at| Instant::now() >= at)
                && summaries.is_empty()
                && summary_pacer.ready()
                && !pending.full
            {
                pending.verify_at = None;
                self.start_summary(&mut summaries, 0);
            }
            if changed {
                self.publish(received);
            }
            // Work still waiting for a slow step keeps the time its answer
            // arrived; the later check of a window (verify) does not.
            if !pending.full && pending.registrations.is_none() && pending.fetch.is_empty() {
                pending.received = None;
            }
        }
    }

    /// When the runner must act next without a new signal.
    fn next_due(&self, pending: &Pending, full: &Pacer, summary: &Pacer, resync_at: Instant, reading: bool) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut due = resync_at.min(far);
        if pending.full {
            due = due.min(full.next);
        } else if !pending.fetch.is_empty() || (pending.registrations.is_some() && !pending.hot_done) {
            due = Instant::now();
        } else if reading {
            // The summary in flight wakes the runner when it lands.
        } else if pending.registrations.is_some() {
            due = due.min(summary.next);
        } else if let Some(at) = pending.verify_at {
            due = due.min(at.max(summary.next));
        }
        due
    }

    /// Reads the `ui/services` summary beside the runner (or, on a Consul
    /// without it, answers at once that there is none).
    fn start_summary(&self, summaries: &mut SummaryReads, index: u64) {
        let http = self.http.clone();
        let status = self.status.clone();
        let supported = self.summaries_supported;
        let started = Instant::now();
        summaries.spawn(async move {
            let result = if supported {
                read_summary(&http, &status).await
            } else {
                Ok(None)
            };
            (index, started, result)
        });
    }

    /// Takes one watch answer into the pending work.
    fn absorb(&mut self, signal: Signal, pending: &mut Pending) {
        match signal {
            Signal::Registrations(e) => {
                pending.arrived(e.received);
                if e.reset {
                    pending.full = true;
                    return;
                }
                pending.registrations = Some(e.index);
                pending.hot_done = false;
                // New or gone names and changed tags show at once.
                let names = e.value;
                for (name, tags) in &names {
                    if self.services.get(name).is_none_or(|s| &s.tags != tags) {
                        pending.fetch.insert(name.clone());
                    }
                }
                pending
                    .fetch
                    .extend(self.services.keys().filter(|n| !names.contains_key(*n)).cloned());
                if pending.fetch.len() > MAX_TARGETED {
                    pending.fetch.clear();
                    pending.full = true;
                }
            }
            Signal::Checks(level, e) => {
                pending.arrived(e.received);
                let now: HashMap<(String, String), CheckRow> = e
                    .value
                    .into_iter()
                    .map(|c| ((c.node.clone(), c.check_id.clone()), c))
                    .collect();
                let before = self.unhealthy.insert(level, now).unwrap_or_default();
                if e.reset {
                    pending.full = true;
                    return;
                }
                let now = &self.unhealthy[&level];
                let mut moved: Vec<&CheckRow> = now
                    .iter()
                    .filter(|(k, c)| before.get(*k) != Some(c))
                    .map(|(_, c)| c)
                    .collect();
                moved.extend(before.iter().filter(|(k, _)| !now.contains_key(*k)).map(|(_, c)| c));
                for check in moved {
                    if check.service_id.is_empty() {
                        // A node check gates every instance on that node.
                        let on_node = self
                            .services
                            .values()
                            .filter(|s| s.instances.iter().any(|i| i.node == check.node))
                            .map(|s| s.name.clone());
                        pending.fetch.extend(on_node);
                    } else if !check.service_name.is_empty() {
                        pending.fetch.insert(check.service_name.clone());
                    }
                }
                if pending.fetch.len() > MAX_TARGETED {
                    pending.fetch.clear();
                    pending.full = true;
                }
            }
        }
    }

    fn publish(&mut self, received: Instant) {
        self.generation += 1;
        let catalog = Catalog {
            services: self.services.clone(),
            complete: self.complete,
            generation: self.generation,
            received,
        };
        self.tx.send_replace(Arc::new(catalog));
    }

    /// The services that changed within [`HOT_FOR`], newest first.
    fn hot_services(&mut self) -> BTreeSet<String> {
        let now = Instant::now();
        self.hot.retain(|(_, at)| now.duration_since(*at) < HOT_FOR);
        self.hot.iter().rev().take(HOT_MAX).map(|(n, _)| n.clone()).collect()
    }

    fn mark_hot(&mut self, name: &str) {
        self.hot.retain(|(n, _)| n != name);
        self.hot.push_back((name.to_string(), Instant::now()));
        while self.hot.len() > HOT_MAX * 4 {
            self.hot.pop_front();
        }
    }

    /// Fetches `names` (at most [`POOL_SIZE`] at once) into the working copy.
    /// Returns whether anything changed.
    async fn fetch_all(&mut self, names: BTreeSet<String>) -> Result<bool, ConsulError> {
        let results = fetch_services(&self.http, names.into_iter()).await?;
        self.status.fetches.fetch_add(results.len() as u64, Ordering::Relaxed);
        let mut changed = false;
        for (name, (rows, index)) in results {
            let entry = ServiceEntry::from_health(&name, rows);
            let old = self.services.get(&name).map(|e| &**e);
            if old == entry.as_ref() {
                continue;
            }
            if old.map_or(0, |o| o.instances.len()) > entry.as_ref().map_or(0, |e| e.instances.len()) {
                self.shrink_index = self.shrink_index.max(index);
            }
            changed = true;
            self.mark_hot(&name);
            match entry {
                Some(e) => {
                    self.services.insert(name, Arc::new(e));
                }
                None => {
                    self.services.remove(&name);
                }
            }
        }
        Ok(changed)
    }

    /// Fetches the services whose `ui/services` line differs from the view's
    /// own (`lines`: the summary read for the registration change at `index`, 0
    /// for a window check). `explained` is true when the view now accounts for
    /// the change at `index`; else a change the summary cannot see (a new
    /// address, everything else equal) happened, and the caller does a full sync.
    async fn apply_summary(&mut self, lines: Option<Summary>, index: u64) -> Result<(bool, bool), ConsulError> {
        let mut changed = false;
        if let Some(lines) = lines {
            let mut candidates: BTreeSet<String> = BTreeSet::new();
            for (name, line) in &lines {
                if self.services.get(name).is_none_or(|s| &s.summary_line() != line) {
                    candidates.insert(name.clone());
                }
            }
            candidates.extend(self.services.keys().filter(|n| !lines.contains_key(*n)).cloned());
            tracing::debug!(
                index,
                candidates = candidates.len(),
                "consul: services whose summary differs from the view"
            );
            self.status
                .flagged
                .fetch_add(candidates.len() as u64, Ordering::Relaxed);
            if candidates.len() > MAX_TARGETED {
                return Ok((false, false));
            }
            if !candidates.is_empty() {
                changed = self.fetch_all(candidates).await?;
            }
        }
        Ok((changed, index == 0 || self.explains(index)))
    }

    /// True when the view accounts for the registration change at `index`: an
    /// instance last changed then, or a deregistration fetched at or after it.
    fn explains(&self, index: u64) -> bool {
        self.shrink_index >= index || self.holds_index(index)
    }

    /// True when some instance in the view was last changed at `index`.
    fn holds_index(&self, index: u64) -> bool {
        self.services
            .values()
            .any(|s| s.instances.iter().any(|i| i.modify_index == index))
    }

    /// Reads the whole catalog: `/v1/internal/ui/nodes` in one request, else
    /// (a Consul without it) the service list and every service one by one.
    async fn full_sync(&mut self, periodic: bool) -> Result<(), ConsulError> {
        let started = Instant::now();
        let services = if self.nodes_supported {
            let answer = self.http.get(Endpoint::UiNodes, "/v1/internal/ui/nodes?stale").await?;
            if answer.status == http::StatusCode::NOT_FOUND {
                tracing::info!("consul: no /v1/internal/ui/nodes; full syncs read every service");
                self.nodes_supported = false;
                None
            } else {
                let nodes: Vec<UiNode> = self.http.decode(Endpoint::UiNodes, &answer)?;
                Some(services_from_nodes(nodes))
            }
        } else {
            None
        };
        let services = match services {
            Some(s) => s,
            None => self.sweep().await?,
        };
        let took = started.elapsed();
        self.status
            .last_full_sync_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        self.status.full_syncs.fetch_add(1, Ordering::Relaxed);
        let changed = merge(&mut self.services, services);
        if self.complete && periodic {
            // Only the periodic sync measures the watches: the others run because
            // something changed that a targeted fetch could not pin down.
            let corrections = changed.len() as u64;
            if corrections > 0 {
                self.status.corrections.fetch_add(corrections, Ordering::Relaxed);
                tracing::warn!(
                    services = corrections,
                    "consul: the periodic full sync found services the watches had not reported"
                );
            }
        }
        if self.complete {
            // What a later full sync found changed is likely to change again;
            // the first one says nothing about that.
            for name in &changed {
                self.mark_hot(name);
            }
        }
        // Indexes may have gone backwards (that is one reason for a full sync).
        self.shrink_index = 0;
        self.complete = true;
        self.status.ok.store(true, Ordering::Relaxed);
        tracing::debug!(
            services = self.services.len(),
            took_ms = took.as_millis() as u64,
            "consul: full sync"
        );
        Ok(())
    }

    /// The public-API full sync: `/v1/catalog/services`, then each service.
    async fn sweep(&mut self) -> Result<BTreeMap<String, Arc<ServiceEntry>>, ConsulError> {
        let answer = self
            .http
            .get(Endpoint::CatalogServices, "/v1/catalog/services?stale")
            .await?;
        let names: BTreeMap<String, serde_json::Value> = self.http.decode(Endpoint::CatalogServices, &answer)?;
        let mut out = BTreeMap::new();
        for (name, (rows, _)) in fetch_services(&self.http, names.into_keys()).await? {
            if let Some(e) = ServiceEntry::from_health(&name, rows) {
                out.insert(name, Arc::new(e));
            }
        }
        Ok(out)
    }
}

/// The `ui/services` lines by service.
type Summary = HashMap<String, SummaryLine>;

/// Summary reads in flight (at most one): (registration index or 0, when it
/// started, the answer).
type SummaryReads = tokio::task::JoinSet<(u64, Instant, Result<Option<Summary>, ConsulError>)>;

/// Reads the `ui/services` summary; `None` when this Consul has no such endpoint.
async fn read_summary(http: &ConsulHttp, status: &CatalogStatus) -> Result<Option<Summary>, ConsulError> {
    let answer = http.get(Endpoint::UiServices, "/v1/internal/ui/services?stale").await?;
    if answer.status == http::StatusCode::NOT_FOUND {
        tracing::info!("consul: no /v1/internal/ui/services; registration changes are read with full syncs");
        return Ok(None);
    }
    status.summaries.fetch_add(1, Ordering::Relaxed);
    let lines: Vec<UiService> = http.decode(Endpoint::UiServices, &answer)?;
    Ok(Some(
        lines
            .into_iter()
            .map(|l| (l.name.clone(), SummaryLine::from(l)))
            .collect(),
    ))
}

/// `/v1/health/service/<name>` for every name, [`POOL_SIZE`] at once (the pool
/// holds no more connections): (name, (rows, Consul's index)); the first error
/// ends it.
async fn fetch_services(
    http: &ConsulHttp,
    mut names: impl Iterator<Item = String>,
) -> Result<Vec<(String, (Vec<HealthRow>, u64))>, ConsulError> {
    let mut set = tokio::task::JoinSet::new();
    let mut results = Vec::new();
    loop {
        while set.len() < POOL_SIZE {
            let Some(name) = names.next() else { break };
            let http = http.clone();
            set.spawn(async move {
                let r = http.health_service(&name, None).await;
                (name, r)
            });
        }
        let Some(joined) = set.join_next().await else { break };
        let (name, result) = joined.map_err(|_| ConsulError::Closed)?;
        results.push((name, result?));
    }
    Ok(results)
}

/// Makes `view` what a full sync read (`fresh`), touching only the services
/// that differ, so that the next picture shares every other one with the last
/// (readers diff them); returns the names of those that differed (added,
/// changed or gone).
fn merge(view: &mut Services, fresh: BTreeMap<String, Arc<ServiceEntry>>) -> Vec<String> {
    let gone: Vec<String> = view.keys().filter(|k| !fresh.contains_key(*k)).cloned().collect();
    for name in &gone {
        view.remove(name);
    }
    let mut changed = gone;
    for (name, entry) in fresh {
        if view.get(&name) != Some(&entry) {
            changed.push(name.clone());
            view.insert(name, entry);
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, json: &str) -> UiNode {
        let mut n: UiNode = serde_json::from_str(json).unwrap();
        n.node = name.into();
        n
    }

    #[test]
    fn full_sync_health_counts_node_checks() {
        let n1 = node(
            "n1",
            r#"{"Address":"10.0.0.1","Services":[
                {"ID":"web-1","Service":"web","Port":80,"Tags":["haproxy"]},
                {"ID":"db-1","Service":"db","Address":"10.0.9.9","Port":5432}],
               "Checks":[{"CheckID":"c1","Status":"critical","ServiceID":"web-1","ServiceName":"web"},
                         {"CheckID":"serfHealth","Status":"passing","ServiceID":""}]}"#,
        );
        let n2 = node(
            "n2",
            r#"{"Address":"10.0.0.2","Services":[{"ID":"web-2","Service":"web","Port":81,"Tags":["x"]}],
               "Checks":[{"CheckID":"serfHealth","Status":"warning"}]}"#,
        );
        let services = services_from_nodes(vec![n1, n2]);
        let web = &services["web"];
        assert_eq!(web.tags, ["haproxy", "x"]);
        let health: Vec<(&str, &str, Health)> = web
            .instances
            .iter()
            .map(|i| (i.id.as_str(), i.address.as_str(), i.health))
            .collect();
        assert_eq!(
            health,
            [
                ("web-1", "10.0.0.1", Health::Critical),
                ("web-2", "10.0.0.2", Health::Warning)
            ]
        );
        assert_eq!(services["db"].instances[0].address, "10.0.9.9");
        assert_eq!(services["db"].passing().count(), 1);
        assert_eq!(web.passing().count(), 0);
        // As ui/services counts: node checks once per instance.
        let line = web.summary_line();
        assert_eq!(line.nodes, ["n1", "n2"]);
        assert_eq!(line.instances, 2);
        assert_eq!(
            line.checks,
            CheckCounts {
                passing: 1,
                warning: 1,
                critical: 1
            }
        );
        let consul: UiService = serde_json::from_str(
            r#"{"Name":"web","Tags":["x","haproxy","x"],"Nodes":["n2","n1"],"InstanceCount":2,
                "ChecksPassing":1,"ChecksWarning":1,"ChecksCritical":1}"#,
        )
        .unwrap();
        assert_eq!(SummaryLine::from(consul), line);
    }

    #[test]
    fn a_service_without_instances_is_absent() {
        assert!(ServiceEntry::from_health("web", Vec::new()).is_none());
    }

    #[test]
    fn a_full_sync_merges_only_what_differs() {
        let entry = |port| {
            Arc::new(
                ServiceEntry::new(
                    "s".into(),
                    vec![InstanceEntry {
                        id: "i".into(),
                        node: "n".into(),
                        address: "10.0.0.1".into(),
                        port,
                        tags: vec![],
                        health: Health::Passing,
                        modify_index: 1,
                        checks: CheckCounts::default(),
                    }],
                )
                .unwrap(),
            )
        };
        let a = BTreeMap::from([
            ("a".to_string(), entry(1)),
            ("b".to_string(), entry(1)),
            ("d".to_string(), entry(1)),
        ]);
        let b = BTreeMap::from([
            ("a".to_string(), entry(1)),
            ("b".to_string(), entry(2)),
            ("c".to_string(), entry(1)),
        ]);
        let mut view: Services = a.clone().into_iter().collect();
        let before = view.clone();
        let mut changed = merge(&mut view, b.clone());
        changed.sort();
        assert_eq!(changed, ["b", "c", "d"]);
        assert_eq!(
            view.iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            b
        );
        // Only what differed is touched: the rest stays shared with the old picture.
        assert!(Arc::ptr_eq(&view["a"], &before["a"]));
        let diff: Vec<&String> = before
            .diff(&view)
            .map(|d| match d {
                imbl::ordmap::DiffItem::Add(k, _) | imbl::ordmap::DiffItem::Remove(k, _) => k,
                imbl::ordmap::DiffItem::Update { new: (k, _), .. } => k,
            })
            .collect();
        assert_eq!(diff, ["b", "c", "d"]);
        assert!(merge(&mut view, b).is_empty());
    }

    #[test]
    fn pacer_waits_a_multiple_of_the_last_run() {
        let mut p = Pacer::new(Duration::from_millis(1), 2);
        assert!(p.ready());
        p.ran(Duration::from_millis(200));
        assert!(!p.ready());
        assert!(p.next > Instant::now() + Duration::from_millis(300));
    }
}
