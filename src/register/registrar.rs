//! The register component's loop: Docker's events in, Consul's agent kept
//! equal to the host's serving containers, writing only differences.
//!
//! ```text
//!  events reader ──Event──▶ Pending (one mark per container, newest wins; kill = drain)
//!                  lost stream: reconnect with since=<last event>, then a full resync
//!  worker ◀─ Pending: stop signals and deaths deregistered at once (drain); then each
//!            container inspected (16 at once, one inspect per container at a time)
//!            and applied as soon as its own answer comes
//!         ◀─ resync tick: running list + agent read ─▶ diff ─▶ writes (none when equal)
//!         ◀─ TTL tick: Docker health renewed on its Consul checks
//!  Book (facts, plans, what the agent holds) ── read by status / metrics
//! ```
//!
//! Level-triggered: an event only says "look at this container again"; what
//! is written follows from the container's state as Docker reports it then,
//! so bursts, duplicates and replays (`since=`) cannot apply out of order.
//! One container is never inspected twice at once (an event meanwhile asks
//! for another look after), so its events apply in order; a slow inspect
//! (dockerd holds a container's while it starts or cleans it up) holds up
//! only its own container. A `kill` (`docker stop`) deregisters before the process exits: the
//! container drains.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt, stream};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::RegisterError;
use super::agent;
use super::docker::{ACTIONS, ContainerFacts, DockerClient, Event};
use super::plan::{self, Host, Planned, Registration};
use super::settings::RegisterConfig;
use crate::consul::ConsulHttp;

/// Containers waiting to be looked at; more make a full resync instead.
pub const MAX_PENDING: usize = 65_536;
/// Marks taken from the pending set at once (the rest wait a turn).
pub const BATCH: usize = 1024;
/// Docker inspects in flight at once.
pub const INSPECTS_IN_FLIGHT: usize = 16;
/// Consul writes in flight at once (the pool has 3 connections).
pub const WRITES_IN_FLIGHT: usize = 6;
/// A container still running this long after the stop signal is registered again.
pub const DRAIN_FORGET: Duration = Duration::from_secs(600);
/// Refusal reasons kept per container.
pub const MAX_REFUSALS: usize = 8;
/// Retry delays after a Docker or Consul failure.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(10));

/// Signals that ask a process to reload or report rather than stop: a
/// `kill` with one of them does not drain.
const NOT_STOPPING: &[i32] = &[libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH, 0];

/// What happened to a container since it was last looked at.
#[derive(Debug, Clone, Copy, Default)]
struct Mark {
    /// `Some(true)`: a stop signal or death (drain); `Some(false)`: started.
    drain: Option<bool>,
}

/// Containers to look at, filled by the events reader.
#[derive(Debug, Default)]
struct Pending {
    order: Vec<String>,
    marks: HashMap<String, Mark>,
    /// Too many, or events lost: look at everything.
    full: bool,
}

impl Pending {
    fn push(&mut self, event: &Event) {
        if self.full {
            return;
        }
        let mark = match self.marks.get_mut(&event.container) {
            Some(mark) => mark,
            None => {
                if self.order.len() >= MAX_PENDING {
                    self.full = true;
                    self.order.clear();
                    self.marks.clear();
                    return;
                }
                self.order.push(event.container.clone());
                self.marks.entry(event.container.clone()).or_default()
            }
        };
        match event.action.as_str() {
            // A stop signal, or the end: out of Consul at once (a `die` after
            // a `kill` keeps the drain; a `start` after either clears it).
            "kill" if !event.signal.is_some_and(|s| NOT_STOPPING.contains(&s)) => mark.drain = Some(true),
            "die" => mark.drain = Some(true),
            "start" | "restart" | "unpause" => mark.drain = Some(false),
            _ => {}
        }
    }

    fn take(&mut self) -> (Vec<(String, Mark)>, bool) {
        let full = std::mem::take(&mut self.full);
        let n = self.order.len().min(BATCH);
        let batch = self
            .order
            .drain(..n)
            .map(|id| {
                let mark = self.marks.remove(&id).unwrap_or_default();
                (id, mark)
            })
            .collect();
        (batch, full)
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.order.is_empty() && !self.full
    }
}

/// A service Wayfinder holds in the agent.
#[derive(Debug, Clone)]
struct Written {
    container: String,
    fingerprint: String,
    /// The TTL check and the status last set on it.
    health: Option<(String, String)>,
}

/// What the agent holds for Wayfinder: by service ID, and indexed by
/// container so that one container's change costs what it touches.
#[derive(Debug, Default)]
struct Held {
    by_id: HashMap<String, Written>,
    by_container: HashMap<String, HashSet<String>>,
}

impl Held {
    fn from_view(all: impl IntoIterator<Item = (String, Written)>) -> Self {
        let mut held = Held::default();
        for (id, w) in all {
            held.insert(id, w);
        }
        held
    }

    fn insert(&mut self, id: String, w: Written) {
        if let Some(old) = self.by_id.get(&id)
            && old.container != w.container
        {
            let old = old.container.clone();
            self.unindex(&old, &id);
        }
        self.by_container
            .entry(w.container.clone())
            .or_default()
            .insert(id.clone());
        self.by_id.insert(id, w);
    }

    fn remove(&mut self, id: &str) {
        if let Some(w) = self.by_id.remove(id) {
            self.unindex(&w.container, id);
        }
    }

    fn unindex(&mut self, container: &str, id: &str) {
        if let Some(ids) = self.by_container.get_mut(container) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_container.remove(container);
            }
        }
    }

    /// The service IDs held for `container`.
    fn of(&self, container: &str) -> impl Iterator<Item = &String> {
        self.by_container.get(container).into_iter().flatten()
    }
}

/// One container as the component sees it.
#[derive(Debug, Clone)]
pub struct ContainerState {
    /// Its facts when last inspected.
    pub facts: ContainerFacts,
    /// Its plan then.
    pub planned: Planned,
}

/// Everything the worker knows; read by the status and metrics.
#[derive(Debug, Default)]
pub struct Book {
    /// Containers by ID (the serving ones, and those being drained).
    pub containers: HashMap<String, ContainerState>,
    /// Containers sent a stop signal (deregistered, waiting to exit), and when.
    pub draining: HashMap<String, Instant>,
    /// Service ID → what the agent holds for Wayfinder.
    written: Held,
    /// IDs of the agent's other services.
    foreign: HashSet<String>,
    /// The Docker engine, once connected.
    pub engine: Option<String>,
    /// The negotiated Docker API version.
    pub api_version: Option<String>,
}

impl Book {
    /// Services Wayfinder holds in the agent now.
    pub fn owned(&self) -> usize {
        self.written.by_id.len()
    }

    /// The services written for `container`: (ID, status of its Docker health check).
    pub fn services_of(&self, container: &str) -> Vec<String> {
        let mut ids: Vec<String> = self.written.of(container).cloned().collect();
        ids.sort();
        ids
    }
}

/// Counters and state shared with the component (metrics, status).
#[derive(Debug)]
pub struct Stats {
    /// Events seen, by [`ACTIONS`] slot.
    pub events: [AtomicU64; ACTIONS.len()],
    /// Services registered (written).
    pub registered: AtomicU64,
    /// Services deregistered.
    pub deregistered: AtomicU64,
    /// TTL check updates.
    pub check_updates: AtomicU64,
    /// Full resyncs done.
    pub resyncs: AtomicU64,
    /// Writes those resyncs made (0 while nothing changes behind Wayfinder's back).
    pub resync_writes: AtomicU64,
    /// Docker failures.
    pub docker_errors: AtomicU64,
    /// Consul failures.
    pub consul_errors: AtomicU64,
    /// The event stream is connected.
    pub stream_up: AtomicBool,
    /// When the event stream (re)connected, ms since the UNIX epoch (0: never).
    pub stream_since_ms: AtomicU64,
    /// Reconnections of the event stream.
    pub reconnects: AtomicU64,
    /// The last error, for the status page.
    pub last_error: Mutex<Option<String>>,
    /// The book.
    pub book: Mutex<Book>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            events: std::array::from_fn(|_| AtomicU64::new(0)),
            registered: AtomicU64::new(0),
            deregistered: AtomicU64::new(0),
            check_updates: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            resync_writes: AtomicU64::new(0),
            docker_errors: AtomicU64::new(0),
            consul_errors: AtomicU64::new(0),
            stream_up: AtomicBool::new(false),
            stream_since_ms: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::new(None),
            book: Mutex::new(Book::default()),
        }
    }
}

impl Stats {
    /// Time since the event stream was last (re)connected (`None`: never).
    pub fn stream_age(&self) -> Option<Duration> {
        let since = self.stream_since_ms.load(Ordering::Relaxed);
        (since > 0).then(|| Duration::from_millis(now_ms().saturating_sub(since)))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// The shared inputs of the reader and the worker.
struct Run {
    config: RegisterConfig,
    consul: ConsulHttp,
    stats: Arc<Stats>,
    pending: Mutex<Pending>,
    wake: Notify,
}

/// Runs until `shutdown`: connects to Docker (retrying while it is away),
/// follows its events and keeps Consul equal to the serving containers.
pub async fn run(
    config: RegisterConfig,
    consul: ConsulHttp,
    host_ip: Option<std::net::IpAddr>,
    host_name: String,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), RegisterError> {
    // Not following Docker until this run says so, and no longer once it ends
    // however it ends (readiness and the status read the flag).
    let _stream_flag = StreamFlag(stats.clone());
    stats.stream_up.store(false, Ordering::Relaxed);
    let run = Run {
        config,
        consul,
        stats,
        pending: Mutex::new(Pending::default()),
        wake: Notify::new(),
    };
    let docker = tokio::select! {
        docker = connect(&run) => docker,
        () = shutdown.cancelled() => return Ok(()),
    };
    let engine = match docker.engine_id().await {
        Ok(id) => id,
        Err(e) => return Err(e),
    };
    {
        let mut book = run.stats.book.lock();
        book.engine = Some(engine.clone());
        book.api_version = Some(docker.api_version());
    }
    tracing::info!(endpoint = docker.endpoint(), api = %docker.api_version(), engine = %engine, "register: following docker");
    let host = Host {
        ip: host_ip,
        name: host_name,
        engine,
    };
    tokio::select! {
        () = read_events(&run, &docker) => Ok(()),
        result = work(&run, &docker, &host) => result,
        () = shutdown.cancelled() => Ok(()),
    }
}

/// Clears [`Stats::stream_up`] when a run ends.
struct StreamFlag(Arc<Stats>);

impl Drop for StreamFlag {
    fn drop(&mut self) {
        self.0.stream_up.store(false, Ordering::Relaxed);
    }
}

/// Connects to Docker, retrying with backoff while it is away.
async fn connect(run: &Run) -> DockerClient {
    let mut delay = BACKOFF.0;
    loop {
        match DockerClient::connect(&run.config.docker).await {
            Ok(docker) => return docker,
            Err(e) => {
                run.stats.docker_errors.fetch_add(1, Ordering::Relaxed);
                if run.stats.docker_errors.load(Ordering::Relaxed) == 1 || delay == BACKOFF.1 {
                    tracing::warn!(error = %e, retry_in = ?delay, "register: docker unreachable");
                }
                *run.stats.last_error.lock() = Some(e.to_string());
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF.1);
    }
}

/// Follows the event stream forever; a lost stream is reconnected from the
/// last event seen, and a full resync is asked for.
async fn read_events(run: &Run, docker: &DockerClient) {
    let mut since = now_ns() - 1_000_000_000;
    let mut delay = BACKOFF.0;
    let mut first = true;
    loop {
        // A daemon that answers is one whose stream will be served.
        if let Err(e) = docker.engine_id().await {
            run.stats.docker_errors.fetch_add(1, Ordering::Relaxed);
            *run.stats.last_error.lock() = Some(e.to_string());
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(BACKOFF.1);
            continue;
        }
        delay = BACKOFF.0;
        run.stats.stream_up.store(true, Ordering::Relaxed);
        run.stats.stream_since_ms.store(now_ms(), Ordering::Relaxed);
        if !first {
            run.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!("register: docker event stream back; resyncing");
            run.pending.lock().full = true;
            run.wake.notify_one();
        }
        first = false;
        let mut events = std::pin::pin!(docker.events(Some(since)));
        let ended = loop {
            match events.next().await {
                Some(Ok(event)) => {
                    since = since.max(event.time_nano);
                    if let Some(slot) = ACTIONS.iter().position(|a| *a == event.action) {
                        run.stats.events[slot].fetch_add(1, Ordering::Relaxed);
                    }
                    run.pending.lock().push(&event);
                    run.wake.notify_one();
                }
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        run.stats.stream_up.store(false, Ordering::Relaxed);
        match ended {
            Some(e) => {
                run.stats.docker_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "register: docker event stream failed; reconnecting");
                *run.stats.last_error.lock() = Some(e.to_string());
            }
            None => tracing::warn!("register: docker closed the event stream; reconnecting"),
        }
        tokio::time::sleep(BACKOFF.0).await;
    }
}

/// The worker: full resyncs, pending containers looked at again (each
/// applied as soon as its own inspect answers: dockerd holds a container's
/// inspect while it starts or cleans it up, and that must not hold up the
/// others), TTL renewals.
async fn work(run: &Run, docker: &DockerClient, host: &Host) -> Result<(), RegisterError> {
    let ttl_every = run.config.health_ttl / 3;
    let mut next_resync = Instant::now();
    let mut next_ttl = Instant::now() + ttl_every;
    // Look at every container again (at start, after lost events), not only new ones.
    let mut reinspect = true;
    let mut delay = BACKOFF.0;
    let mut lookups = Lookups::default();
    loop {
        if Instant::now() >= next_resync {
            match resync(run, docker, host, reinspect).await {
                Ok(()) => {
                    reinspect = false;
                    delay = BACKOFF.0;
                    next_resync = Instant::now() + run.config.resync;
                }
                Err(e) => {
                    note_error(run, &e);
                    next_resync = Instant::now() + delay;
                    delay = (delay * 2).min(BACKOFF.1);
                }
            }
        }
        if Instant::now() >= next_ttl {
            if !renew_health(run).await {
                next_resync = Instant::now();
            }
            next_ttl = Instant::now() + ttl_every;
        }
        let (marks, wants_full) = run.pending.lock().take();
        if wants_full {
            reinspect = true;
            next_resync = Instant::now();
            continue;
        }
        if !marks.is_empty() {
            if let Err(e) = drain_at_once(run, &marks).await {
                note_error(run, &e);
                next_resync = next_resync.min(Instant::now() + delay);
            }
            for (id, _) in marks {
                lookups.want(id);
            }
            if lookups.overflowing() {
                // More waiting than Pending may hold: look at everything instead.
                lookups.forget_queue();
                reinspect = true;
                next_resync = Instant::now();
            }
        }
        while let Some(id) = lookups.next_to_start() {
            lookups.in_flight.push(Box::pin(async move {
                let facts = docker.inspect(&id).await;
                (id, facts)
            }));
        }
        let wake_at = next_resync.min(next_ttl);
        tokio::select! {
            Some((id, facts)) = lookups.in_flight.next(), if !lookups.in_flight.is_empty() => {
                lookups.done(&id);
                let applied = match facts {
                    Ok(facts) => apply(run, host, id, facts).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = applied {
                    note_error(run, &e);
                    next_resync = next_resync.min(Instant::now() + delay);
                }
            }
            () = run.wake.notified() => {}
            () = tokio::time::sleep_until(wake_at.into()) => {}
        }
    }
}

/// One container's inspect in flight: its ID and what Docker said.
type Lookup<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = (String, Result<Option<ContainerFacts>, RegisterError>)> + Send + 'a>,
>;

/// The containers to inspect: at most [`INSPECTS_IN_FLIGHT`] at once, one
/// inspect per container at a time (an event meanwhile asks for another
/// look after it, so a container's events apply in order).
#[derive(Default)]
struct Lookups<'a> {
    in_flight: futures_util::stream::FuturesUnordered<Lookup<'a>>,
    busy: HashSet<String>,
    again: HashSet<String>,
    queue: std::collections::VecDeque<String>,
    queued: HashSet<String>,
}

impl Lookups<'_> {
    fn want(&mut self, id: String) {
        if self.busy.contains(&id) {
            self.again.insert(id);
        } else if self.queued.insert(id.clone()) {
            self.queue.push_back(id);
        }
    }

    /// More containers wait than [`MAX_PENDING`].
    fn overflowing(&self) -> bool {
        self.queue.len() + self.again.len() > MAX_PENDING
    }

    /// Drops the containers waiting (not those in flight).
    fn forget_queue(&mut self) {
        self.queue.clear();
        self.queued.clear();
        self.again.clear();
    }

    fn next_to_start(&mut self) -> Option<String> {
        if self.busy.len() >= INSPECTS_IN_FLIGHT {
            return None;
        }
        let id = self.queue.pop_front()?;
        self.queued.remove(&id);
        self.busy.insert(id.clone());
        Some(id)
    }

    fn done(&mut self, id: &str) {
        self.busy.remove(id);
        if self.again.remove(id) {
            self.want(id.to_string());
        }
    }
}

fn note_error(run: &Run, e: &RegisterError) {
    match e {
        RegisterError::Consul(_) => run.stats.consul_errors.fetch_add(1, Ordering::Relaxed),
        _ => run.stats.docker_errors.fetch_add(1, Ordering::Relaxed),
    };
    tracing::warn!(error = %e, "register: will retry");
    *run.stats.last_error.lock() = Some(e.to_string());
}

/// Inspects `ids` concurrently; `None` for containers that are gone.
async fn inspect_all(
    docker: &DockerClient,
    ids: Vec<String>,
) -> Result<Vec<(String, Option<ContainerFacts>)>, RegisterError> {
    stream::iter(ids)
        .map(|id| async move {
            let facts = docker.inspect(&id).await?;
            Ok((id, facts))
        })
        .buffer_unordered(INSPECTS_IN_FLIGHT)
        .collect::<Vec<Result<_, RegisterError>>>()
        .await
        .into_iter()
        .collect()
}

/// Records the marks (stop signals, starts) and deregisters the containers
/// told to stop or dead at once, before anything slower: they drain.
async fn drain_at_once(run: &Run, marks: &[(String, Mark)]) -> Result<(), RegisterError> {
    let mut draining = Vec::new();
    {
        let mut book = run.stats.book.lock();
        for (id, mark) in marks {
            match mark.drain {
                Some(true) => {
                    book.draining.insert(id.clone(), Instant::now());
                    draining.push(id.clone());
                }
                Some(false) => {
                    book.draining.remove(id);
                }
                None => {}
            }
        }
    }
    if draining.is_empty() {
        return Ok(());
    }
    let writes = diff(run, &draining, Keep::Nothing);
    perform(run, writes, false).await
}

/// Applies what Docker said of container `id` (`None`: it is gone).
async fn apply(run: &Run, host: &Host, id: String, facts: Option<ContainerFacts>) -> Result<(), RegisterError> {
    update_containers(run, host, HashMap::from([(id.clone(), facts)]));
    let writes = diff(run, std::slice::from_ref(&id), Keep::Planned);
    perform(run, writes, false).await
}

/// Records freshly inspected facts and their plans.
fn update_containers(run: &Run, host: &Host, fresh: HashMap<String, Option<ContainerFacts>>) {
    let mut book = run.stats.book.lock();
    for (id, facts) in fresh {
        match facts {
            Some(facts) if facts.serving => {
                let mut planned = plan::plan(&facts, &run.config, host);
                planned.refusals.truncate(MAX_REFUSALS);
                // Logged once per container and reason set (not at every look).
                let before = book.containers.get(&id).map(|s| &s.planned.refusals);
                if !planned.refusals.is_empty() && before != Some(&planned.refusals) {
                    tracing::warn!(container = %facts.name, id = %&id[..id.len().min(12)], reasons = ?planned.refusals, "register: refused (some of) its services");
                }
                book.containers.insert(id, ContainerState { facts, planned });
            }
            _ => {
                book.containers.remove(&id);
                book.draining.remove(&id);
            }
        }
    }
}

/// One write to the agent.
#[derive(Debug)]
enum Write {
    Register(Box<Registration>),
    Deregister(String),
    Status(String, String, &'static str),
}

/// Which planned services a diff keeps.
#[derive(Debug, Clone, Copy)]
enum Keep {
    /// Those of containers not being drained.
    Planned,
    /// None: the containers are being drained.
    Nothing,
}

impl Keep {
    fn keeps(self, book: &Book, container: &str) -> bool {
        match self {
            Keep::Nothing => false,
            Keep::Planned => book
                .draining
                .get(container)
                .is_none_or(|at| at.elapsed() > DRAIN_FORGET),
        }
    }
}

/// The writes that make the agent hold what `containers` should have.
fn diff(run: &Run, containers: &[String], keep: Keep) -> Vec<Write> {
    let mut book = run.stats.book.lock();
    let mut writes = Vec::new();
    let mut desired: HashMap<String, Registration> = HashMap::new();
    let mut collisions: Vec<(String, String)> = Vec::new();
    for id in containers {
        let Some(state) = book.containers.get(id) else { continue };
        if !keep.keeps(&book, id) {
            continue;
        }
        for r in &state.planned.services {
            let taken_by_other = book.foreign.contains(&r.id)
                || book
                    .written
                    .by_id
                    .get(&r.id)
                    .is_some_and(|w| w.container != r.container)
                || desired.contains_key(&r.id);
            if taken_by_other {
                collisions.push((id.clone(), r.id.clone()));
                continue;
            }
            desired.insert(r.id.clone(), r.clone());
        }
    }
    for (container, service) in collisions {
        if let Some(state) = book.containers.get_mut(&container) {
            let why = format!("service ID `{service}` belongs to another service");
            if !state.planned.refusals.contains(&why) && state.planned.refusals.len() < MAX_REFUSALS {
                tracing::warn!(container = %state.facts.name, service = %service, "register: service ID already taken; refused");
                state.planned.refusals.push(why);
            }
        }
    }
    // Removals: held for these containers, no longer desired.
    for container in containers {
        for id in book.written.of(container) {
            if !desired.contains_key(id) {
                writes.push(Write::Deregister(id.clone()));
            }
        }
    }
    for (id, r) in desired {
        match book.written.by_id.get(&id) {
            Some(w) if w.fingerprint == r.fingerprint => {
                if let (Some((check, status)), Some((_, held))) = (&r.health, &w.health)
                    && held != status
                {
                    writes.push(Write::Status(id.clone(), check.clone(), status));
                }
            }
            _ => writes.push(Write::Register(Box::new(r))),
        }
    }
    writes
}

/// Performs `writes` (a few at a time) and records each success in the book.
async fn perform(run: &Run, writes: Vec<Write>, from_resync: bool) -> Result<(), RegisterError> {
    if writes.is_empty() {
        return Ok(());
    }
    let consul = &run.consul;
    let results: Vec<(Write, Result<bool, crate::consul::ConsulError>)> = stream::iter(writes)
        .map(|w| async move {
            let result = match &w {
                Write::Register(r) => agent::register(consul, r).await.map(|()| true),
                Write::Deregister(id) => agent::deregister(consul, id).await.map(|()| true),
                Write::Status(_, check, status) => agent::set_status(consul, check, status).await,
            };
            (w, result)
        })
        .buffer_unordered(WRITES_IN_FLIGHT)
        .collect()
        .await;
    let mut first_error = None;
    let mut book = run.stats.book.lock();
    for (write, result) in results {
        match result {
            Ok(done) => {
                if from_resync {
                    run.stats.resync_writes.fetch_add(1, Ordering::Relaxed);
                }
                match write {
                    Write::Register(r) => {
                        run.stats.registered.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(service = %r.id, name = %r.body["Name"].as_str().unwrap_or(""), address = %r.body["Address"].as_str().unwrap_or(""), port = %r.body["Port"], "register: registered");
                        book.written.insert(
                            r.id.clone(),
                            Written {
                                container: r.container.clone(),
                                fingerprint: r.fingerprint.clone(),
                                health: r.health.as_ref().map(|(c, s)| (c.clone(), (*s).to_string())),
                            },
                        );
                    }
                    Write::Deregister(id) => {
                        run.stats.deregistered.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(service = %id, "register: deregistered");
                        book.written.remove(&id);
                    }
                    Write::Status(id, _, status) => {
                        run.stats.check_updates.fetch_add(1, Ordering::Relaxed);
                        if !done {
                            // The agent lost the check: register it again.
                            book.written.remove(&id);
                        } else if let Some(w) = book.written.by_id.get_mut(&id)
                            && let Some(h) = w.health.as_mut()
                        {
                            h.1 = status.to_string();
                        }
                    }
                }
            }
            Err(e) => {
                if first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(RegisterError::Consul(e)),
        None => Ok(()),
    }
}

/// Compares everything: Docker's running containers (inspecting the new
/// ones, or all of them when events may have been lost) and the agent's
/// services; writes only the differences.
async fn resync(run: &Run, docker: &DockerClient, host: &Host, reinspect_all: bool) -> Result<(), RegisterError> {
    let running: HashSet<String> = docker.running().await?.into_iter().collect();
    let to_inspect: Vec<String> = {
        let book = run.stats.book.lock();
        running
            .iter()
            .filter(|id| reinspect_all || !book.containers.contains_key(*id))
            .cloned()
            .collect()
    };
    let mut fresh: HashMap<String, Option<ContainerFacts>> =
        inspect_all(docker, to_inspect).await?.into_iter().collect();
    {
        let book = run.stats.book.lock();
        for id in book.containers.keys() {
            if !running.contains(id) {
                fresh.insert(id.clone(), None);
            }
        }
    }
    update_containers(run, host, fresh);
    let view = agent::read(&run.consul, host).await.map_err(RegisterError::Consul)?;
    let containers: Vec<String> = {
        let mut book = run.stats.book.lock();
        book.foreign = view.foreign;
        book.written = Held::from_view(view.owned.into_iter().map(|(id, owned)| {
            let health = {
                let check = format!("{id}{}", plan::HEALTH_CHECK_SUFFIX);
                view.checks.get(&check).map(|status| (check, status.clone()))
            };
            (
                id,
                Written {
                    container: owned.container,
                    fingerprint: owned.fingerprint,
                    health,
                },
            )
        }));
        // Services of containers Docker no longer runs are in the diff too.
        let mut ids: HashSet<String> = book.containers.keys().cloned().collect();
        ids.extend(book.written.by_container.keys().cloned());
        // Drain marks of containers that outlived their stop are forgotten;
        // those of containers that are gone, too.
        let Book {
            draining, containers, ..
        } = &mut *book;
        draining.retain(|id, at| at.elapsed() <= DRAIN_FORGET && containers.contains_key(id));
        ids.into_iter().collect()
    };
    let writes = diff(run, &containers, Keep::Planned);
    run.stats.resyncs.fetch_add(1, Ordering::Relaxed);
    if !writes.is_empty() {
        tracing::info!(writes = writes.len(), "register: resync found differences");
    }
    perform(run, writes, true).await
}

/// Renews every Docker-health TTL check with its status; false when the
/// agent lost one (a resync puts it back).
async fn renew_health(run: &Run) -> bool {
    let checks: Vec<Write> = {
        let book = run.stats.book.lock();
        book.written
            .by_id
            .iter()
            .filter_map(|(id, w)| {
                let (check, status) = w.health.as_ref()?;
                let status = match status.as_str() {
                    "passing" => "passing",
                    "warning" => "warning",
                    _ => "critical",
                };
                Some(Write::Status(id.clone(), check.clone(), status))
            })
            .collect()
    };
    let before = run.stats.book.lock().owned();
    if let Err(e) = perform(run, checks, false).await {
        note_error(run, &e);
        return false;
    }
    run.stats.book.lock().owned() == before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, action: &str, signal: Option<i32>) -> Event {
        Event {
            container: id.into(),
            action: action.into(),
            signal,
            time_nano: 0,
        }
    }

    #[test]
    fn pending_keeps_one_mark_per_container_newest_wins() {
        let mut p = Pending::default();
        p.push(&ev("a", "start", None));
        p.push(&ev("b", "kill", Some(15)));
        p.push(&ev("a", "kill", Some(libc::SIGHUP)));
        p.push(&ev("c", "kill", Some(9)));
        p.push(&ev("c", "die", None));
        p.push(&ev("d", "die", None));
        p.push(&ev("d", "start", None));
        let (batch, full) = p.take();
        assert!(!full);
        let marks: Vec<(&str, Option<bool>)> = batch.iter().map(|(id, m)| (id.as_str(), m.drain)).collect();
        assert_eq!(
            marks,
            [
                ("a", Some(false)),
                ("b", Some(true)),
                ("c", Some(true)),
                ("d", Some(false))
            ]
        );
        assert!(p.is_empty());
    }

    #[test]
    fn lookups_are_one_per_container_and_bounded() {
        let mut l = Lookups::default();
        l.want("a".into());
        l.want("a".into());
        assert_eq!(l.next_to_start().as_deref(), Some("a"));
        assert_eq!(l.next_to_start(), None, "queued once");
        l.want("a".into());
        assert_eq!(l.next_to_start(), None, "not twice in flight");
        l.done("a");
        assert_eq!(l.next_to_start().as_deref(), Some("a"), "looked at again after");
        for i in 0..=MAX_PENDING {
            l.want(format!("{i:x}"));
        }
        assert!(l.overflowing());
        l.forget_queue();
        assert!(!l.overflowing() && l.queued.is_empty() && l.busy.contains("a"));
    }

    #[test]
    fn held_services_are_indexed_by_container() {
        let w = |c: &str| Written {
            container: c.into(),
            fingerprint: String::new(),
            health: None,
        };
        let mut held = Held::from_view([
            ("s1".to_string(), w("a")),
            ("s2".to_string(), w("a")),
            ("s3".to_string(), w("b")),
        ]);
        let of = |held: &Held, c: &str| {
            let mut ids: Vec<String> = held.of(c).cloned().collect();
            ids.sort();
            ids
        };
        assert_eq!(of(&held, "a"), ["s1", "s2"]);
        held.insert("s2".into(), w("b"));
        assert_eq!(
            (of(&held, "a"), of(&held, "b")),
            (vec!["s1".to_string()], vec!["s2".to_string(), "s3".to_string()])
        );
        held.remove("s1");
        assert!(of(&held, "a").is_empty() && !held.by_container.contains_key("a"));
        held.remove("unknown");
        assert_eq!(held.by_id.len(), 2);
    }

    #[test]
    fn pending_is_bounded_and_overflows_into_a_full_resync() {
        let mut p = Pending::default();
        for i in 0..=MAX_PENDING {
            p.push(&ev(&format!("{i:x}"), "start", None));
        }
        let (batch, full) = p.take();
        assert!(full && batch.is_empty());
        assert!(p.marks.is_empty() && p.order.capacity() <= MAX_PENDING + 1);
    }
}
