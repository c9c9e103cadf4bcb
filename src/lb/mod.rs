//! The lb component: the HTTP load balancer fed live by the Consul catalog
//! (replaces HAProxy + consul-template), with PanteraS's tags and no reloads.
//!
//! ```text
//!  ConsulHub view ──watch::run (changed services)──▶ RoutingTable ──ArcSwap──┐
//!  client ──TCP──▶ proxy::serve (hyper, HTTP/1.1 keep-alive) ──route()──────┤
//!  client ──TLS──▶ proxy::serve (SNI cert from tls::SniResolver; h2 or 1.1) ─┘
//!                     ├─ upload: the request body read first (bounded per request and in
//!                     │  total), held to min_body_rate and request_timeout
//!                     └─ Backend::pick (smooth WRR, ejected instances skipped; share: one
//!                        client source at most max_client_share of an instance)
//!                         └─ pool: connected backend sessions, retry on another
//!                            instance when a connection cannot be made
//!  tcp::run: haproxy_tcp= listeners opened and closed as the table changes
//!  register::run: the lb itself as Consul service `wayfinder-lb` (DNS follows it)
//!  checks::run: haproxy_httpchk / TCP connect checks every 2 s (rise 2, fall 3)
//!  remote::run: svc.service.<dc>.<domain> names polled in that datacenter on demand
//!  tls::watch: certificate files re-read when they change
//!  selfsigned: HTTPS on and no certificate files: the lb's own certificate
//!  status::serve: the stats listener (status page, /stats.json)
//! ```
//!
//! Per-instance state that must outlive a table (ejection, in-flight counts) lives
//! in the [`table::Carryover`], keyed by address.
//!
//! Client connections (HTTP, HTTPS and `haproxy_tcp` listeners) are capped in
//! total and per source address by [`client::ConnLimits`]; over a cap a new
//! connection is accepted and closed at once. At start the open-file limit is
//! raised to its hard limit, and `max_connections = 0` derives the cap from it.
//!
//! The proxy runs on `workers` OS threads of its own (`lb-proxy-N`, one
//! single-threaded runtime each), watched by [`crate::threads::WatchedThreads`]:
//! one that ends before shutdown (a panic) ends [`run`] with
//! [`LbError::WorkerDied`], as the routing table task ending does with
//! [`LbError::TaskEnded`], so the supervisor restarts the lb whole.
//!
//! Readiness: until the first table built from a complete picture of Consul is
//! live, requests wait (up to `ready_timeout`, then 503), so a restart never
//! answers 503 for a service that exists.

pub mod body;
pub mod checks;
pub mod client;
pub mod component;
pub mod h1;
pub mod policy;
pub mod proxy;
pub mod register;
pub mod remote;
pub mod selfsigned;
pub mod settings;
pub mod share;
pub mod splice;
pub mod stats;
pub mod status;
pub mod table;
pub mod tags;
pub mod tcp;
pub mod tls;
pub mod upload;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::component::Appliance;
use crate::consul::ConsulHub;
use crate::consul::settings::ConsulConfig;
use settings::LbConfig;
use stats::LbStats;
use table::{Carryover, RoutingTable, TableConfig};

/// Errors of the lb component.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// A listener could not be bound.
    #[error("could not bind lb listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause (EADDRINUSE, EACCES for port 80 without CAP_NET_BIND_SERVICE ...).
        source: std::io::Error,
    },
    /// The HTTPS certificates could not be loaded at start.
    #[error("HTTPS certificates: {0}")]
    Certs(#[source] tls::CertError),
    /// The TLS configuration was refused.
    #[error("TLS setup: {0}")]
    Tls(#[source] rustls::Error),
    /// The Consul view could not be started.
    #[error("consul: {0}")]
    Consul(#[source] crate::consul::ConsulError),
    /// A task the lb cannot work without has ended.
    #[error("the {0} task ended unexpectedly")]
    TaskEnded(&'static str),
    /// A proxy thread ended while the lb was not asked to stop (a panic, or a
    /// runtime it could not start): the lb stops so its supervisor restarts it.
    #[error("proxy thread {name} ended unexpectedly: {how}")]
    WorkerDied {
        /// The thread (`lb-proxy-N`).
        name: String,
        /// `returned`, or `panicked: <message>`.
        how: String,
    },
}

/// Already-bound listeners for [`run`].
#[derive(Debug)]
pub struct LbSockets {
    /// The HTTP listener.
    pub http: std::net::TcpListener,
    /// The HTTPS listener, when HTTPS is on.
    pub https: Option<std::net::TcpListener>,
    /// The stats listener, unless turned off.
    pub stats: Option<std::net::TcpListener>,
    /// The HTTP listeners on `also_listen`.
    pub http_also: Vec<std::net::TcpListener>,
    /// The HTTPS listeners on `also_listen`, when HTTPS is on.
    pub https_also: Vec<std::net::TcpListener>,
}

impl LbSockets {
    /// Binds the listeners the configuration asks for (port 0 picks a free port).
    pub fn bind(config: &LbConfig) -> Result<Self, LbError> {
        let http = bind_tcp(config.http)?;
        let https = config.https.as_ref().map(|h| bind_tcp(h.listen)).transpose()?;
        // `also_listen` on the ports the first listeners got (port 0 included).
        let also = |first: &std::net::TcpListener| -> Result<Vec<std::net::TcpListener>, LbError> {
            let port = first.local_addr().map_err(|source| LbError::Bind {
                addr: config.http,
                source,
            })?;
            config
                .also_listen
                .iter()
                .map(|&ip| bind_tcp(SocketAddr::new(ip, port.port())))
                .collect()
        };
        Ok(Self {
            http_also: also(&http)?,
            https_also: https.as_ref().map(also).transpose()?.unwrap_or_default(),
            http,
            https,
            stats: config.stats.map(bind_tcp).transpose()?,
        })
    }
}

impl LbSockets {
    /// Every listener with what it is (`lb http`, `lb https`, `lb stats`).
    pub fn all(&self) -> impl Iterator<Item = (&'static str, &std::net::TcpListener)> {
        let http = std::iter::once(&self.http)
            .chain(&self.http_also)
            .map(|l| ("lb http", l));
        let https = self.https.iter().chain(&self.https_also).map(|l| ("lb https", l));
        http.chain(https).chain(self.stats.iter().map(|l| ("lb stats", l)))
    }
}

/// A listening, non-blocking TCP socket for the lb.
fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, LbError> {
    crate::net::listeners::bind_tcp(addr).map_err(|source| LbError::Bind { addr, source })
}

/// What the lb shares with the admin API and the tests.
pub struct LbState {
    /// The routing table in force.
    pub table: ArcSwap<RoutingTable>,
    /// Per-instance state across tables.
    pub health: Carryover,
    /// Counters.
    pub stats: LbStats,
    /// False while Consul cannot be reached (the last good table stays).
    pub consul_ok: AtomicBool,
    /// True once the first table from a complete picture of Consul is live.
    ready: AtomicBool,
    /// Told when `ready` turns true (requests that arrived before wait on it).
    ready_tx: tokio::sync::watch::Sender<bool>,
    /// When the lb state was made (for the time to ready).
    created: std::time::Instant,
    /// The Consul view the table is built from (its age and health), once started.
    pub view: std::sync::OnceLock<crate::consul::CatalogView>,
    /// Bumped after every table swap (TCP listeners reconcile on it).
    pub changes: tokio::sync::watch::Sender<u64>,
    /// Per-instance connection caps by service, from Consul KV
    /// `haproxy/<svc>/maxconn` (absent: [`DEFAULT_MAXCONN`]).
    pub maxconn: ArcSwap<std::collections::HashMap<String, usize>>,
    /// Requests waiting for a free instance right now (bounded).
    pub queued: std::sync::atomic::AtomicUsize,
    /// The memory buffered request bodies hold, all proxy threads together
    /// (`body_buffer_total_bytes`; see [`upload`]).
    pub bodies: Arc<upload::BodyBudget>,
    /// Client connections open, per source and in total, and their caps.
    pub conns: Arc<client::ConnLimits>,
    /// The HTTPS certificates in force, when HTTPS is on.
    pub certs: std::sync::OnceLock<Arc<tls::SniResolver>>,
    /// The landing page as last rendered (see [`status::landing_page`]).
    pub landing: status::LandingCache,
    /// Host names of other datacenters requests asked for (see [`remote`]).
    datacenter_wants: tokio::sync::mpsc::Sender<String>,
    datacenter_wants_rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<String>>>,
}

/// Requests in flight per instance when Consul KV says nothing (PanteraS: 128).
pub const DEFAULT_MAXCONN: usize = 128;

impl LbState {
    /// An empty state (no routes yet) for these naming rules.
    pub fn new(table_config: &TableConfig) -> Arc<Self> {
        let (datacenter_wants, datacenter_wants_rx) = tokio::sync::mpsc::channel(remote::WANTS_QUEUE);
        Arc::new(Self {
            table: ArcSwap::from_pointee(RoutingTable::empty(table_config)),
            health: Carryover::new(),
            stats: LbStats::default(),
            consul_ok: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            ready_tx: tokio::sync::watch::Sender::new(false),
            created: std::time::Instant::now(),
            view: std::sync::OnceLock::new(),
            changes: tokio::sync::watch::Sender::new(0),
            maxconn: ArcSwap::from_pointee(std::collections::HashMap::new()),
            queued: std::sync::atomic::AtomicUsize::new(0),
            bodies: Arc::new(upload::BodyBudget::default()),
            conns: Arc::new(client::ConnLimits::default()),
            certs: std::sync::OnceLock::new(),
            landing: status::LandingCache::default(),
            datacenter_wants,
            datacenter_wants_rx: parking_lot::Mutex::new(Some(datacenter_wants_rx)),
        })
    }

    /// True once the first complete table is live.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks the lb ready; true the first time.
    pub fn set_ready(&self) -> bool {
        let first = !self.ready.swap(true, std::sync::atomic::Ordering::AcqRel);
        if first {
            self.ready_tx.send_replace(true);
            tracing::info!(after_ms = self.created.elapsed().as_millis() as u64, "lb: ready");
        }
        first
    }

    /// Waits up to `limit` for the first table; true when it is live.
    pub async fn wait_ready(&self, limit: std::time::Duration) -> bool {
        if self.is_ready() {
            return true;
        }
        let mut rx = self.ready_tx.subscribe();
        matches!(tokio::time::timeout(limit, rx.wait_for(|r| *r)).await, Ok(Ok(_)))
    }

    /// Asks the watcher to follow the datacenter a `svc.service.<dc>.<domain>`
    /// Host names. Cheap when the queue is full (the request is dropped).
    pub fn want_datacenter(&self, host: &str) {
        if self.datacenter_wants.capacity() > 0 {
            let _ = self
                .datacenter_wants
                .try_send(tags::bare_host(host).to_ascii_lowercase());
        }
    }

    /// The receiving end of [`Self::want_datacenter`] (once).
    pub fn take_datacenter_wants(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        self.datacenter_wants_rx.lock().take()
    }
}

/// What the lb takes from outside its own section: Consul's naming, this
/// host's address, and the appliance's own listeners (which no route may
/// reach), as known when a run starts.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The Consul domain without its trailing dot (`consul`).
    pub consul_domain: String,
    /// The local datacenter.
    pub datacenter: String,
    /// The Consul agent's HTTP address (for the log).
    pub consul_http: SocketAddr,
    /// This host's address: where Consul checks the lb, a name of the
    /// self-signed certificate.
    pub host_ip: Option<std::net::IpAddr>,
    /// The appliance's TCP listeners.
    pub own: crate::net::listeners::OwnListeners,
}

impl Inputs {
    /// The inputs from the `[consul]` section and the appliance.
    pub fn new(consul: &ConsulConfig, appliance: &Appliance) -> Self {
        Self {
            consul_domain: consul.domain.to_string().trim_end_matches('.').to_string(),
            datacenter: consul.datacenter.clone(),
            consul_http: consul.http,
            host_ip: appliance.host_ip,
            own: appliance.own_listeners(),
        }
    }
}

/// The table naming rules from the lb's section and its inputs.
pub fn table_config(config: &LbConfig, inputs: &Inputs) -> TableConfig {
    TableConfig {
        consul_domain: inputs.consul_domain.clone(),
        local_datacenter: inputs.datacenter.clone(),
        add_domain: config.add_domain.clone(),
        landing_hosts: config.landing_hosts.clone(),
        policy: policy::BackendPolicy {
            own: inputs.own.clone(),
            networks: config.backend_networks.clone(),
            tcp_ports: config.tcp_ports.clone(),
        },
    }
}

/// HTTPS without certificate files: the lb's own self-signed certificate for
/// this host's names, kept in `state_dir` (see [`selfsigned`]), marked so on the
/// status pages and logged with its fingerprint.
fn self_signed(
    config: &LbConfig,
    host_ip: Option<std::net::IpAddr>,
    state_dir: &std::path::Path,
) -> Result<tls::CertIndex, tls::CertError> {
    let hostname = crate::net::host::name();
    let names = selfsigned::names(hostname.as_deref(), host_ip, config.add_domain.as_deref());
    let made = selfsigned::load_or_create(state_dir, &names)?;
    let mut index = tls::CertIndex::load(std::slice::from_ref(&made.path))?;
    for cert in &mut index.certs {
        cert.self_signed = true;
    }
    tracing::warn!(
        file = %made.path.display(),
        sha256 = %made.fingerprint,
        names = ?names,
        "lb: HTTPS with a self-signed certificate ({}); configure lb.certs to replace it",
        if made.created { "made now" } else { "kept from an earlier start" },
    );
    Ok(index)
}

/// Raises the open-file limit and sets the client connection caps from it
/// and the configuration: (the total cap, the open-file limit).
fn connection_caps(config: &LbConfig, state: &LbState) -> (usize, Option<u64>) {
    let nofile = client::raise_nofile_limit();
    let max_connections = config
        .max_connections
        .unwrap_or_else(|| client::derived_max_connections(nofile));
    state
        .conns
        .set_limits(max_connections, config.max_connections_per_source);
    if let Some(limit) = nofile
        && max_connections as u64 * 2 > limit
    {
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            "lb: lb.max_connections may need more file descriptors than the process may open (a client and a backend socket each); raise LimitNOFILE"
        );
    }
    (max_connections, nofile)
}

/// The TLS acceptor when HTTPS is on: the configured certificate files, or
/// the lb's own self-signed one; published in `state` for the status pages.
fn tls_acceptor(
    config: &LbConfig,
    inputs: &Inputs,
    state: &LbState,
) -> Result<Option<tokio_rustls::TlsAcceptor>, LbError> {
    let Some(https) = &config.https else {
        return Ok(None);
    };
    let index = if https.certs.is_empty() {
        self_signed(config, inputs.host_ip, &https.state_dir).map_err(LbError::Certs)?
    } else {
        tls::CertIndex::load(&https.certs).map_err(LbError::Certs)?
    };
    let resolver = tls::SniResolver::new(index);
    let _ = state.certs.set(resolver.clone());
    Ok(Some(tokio_rustls::TlsAcceptor::from(
        tls::server_config(resolver).map_err(LbError::Tls)?,
    )))
}

/// Runs the load balancer on `sockets` until `shutdown` is cancelled; in-flight
/// requests are given the grace the caller allows.
pub async fn run(
    config: &LbConfig,
    inputs: &Inputs,
    sockets: LbSockets,
    state: Arc<LbState>,
    consul: Arc<ConsulHub>,
    stop: CancellationToken,
) -> Result<(), LbError> {
    // Cancelled on `stop`, or by the lb itself when a task it needs has ended.
    let shutdown = stop.child_token();
    let (max_connections, nofile) = connection_caps(config, &state);
    state.bodies.set_max(config.body_buffer_total_bytes);
    // Certificates first: a bad file is a start-up error, before any listener serves.
    let tls = tls_acceptor(config, inputs, &state)?;
    let tasks = TaskTracker::new();
    if let (Some(https), Some(resolver)) = (&config.https, state.certs.get())
        && !https.certs.is_empty()
    {
        tasks.spawn(tls::watch(https.certs.clone(), resolver.clone(), shutdown.clone()));
    }
    // The configuration names the listeners; the bound sockets say where they
    // really are (a port 0 in the file).
    let mut table_config = table_config(config, inputs);
    for (what, socket) in sockets.all() {
        if let Ok(addr) = socket.local_addr() {
            table_config.policy.own.add(what, addr);
        }
    }
    let (builder, remote) = spawn_table_tasks(config, table_config, &state, &consul, &tasks, &shutdown)?;
    let addr = sockets.http.local_addr().ok();
    let https_addr = sockets.https.as_ref().and_then(|l| l.local_addr().ok());
    let stats_addr = sockets.stats.as_ref().and_then(|l| l.local_addr().ok());
    let mut listeners = vec![(sockets.http, None)];
    listeners.extend(sockets.http_also.into_iter().map(|l| (l, None)));
    if let Some(tls) = tls {
        let https = sockets.https.into_iter().chain(sockets.https_also);
        listeners.extend(https.map(|l| (l, Some(tls.clone()))));
    }
    let bind_error = |source| LbError::Bind {
        addr: addr.unwrap_or(config.http),
        source,
    };
    let mut workers = spawn_proxies(config, &state, listeners, &shutdown).map_err(bind_error)?;
    if let Some(listener) = sockets.stats {
        tasks.spawn(status::serve(
            tokio_listener(listener)?,
            state.clone(),
            shutdown.clone(),
            tasks.clone(),
        ));
    }
    if let (Some(name), Some(bound)) = (&config.register, addr) {
        let at = registered_address(bound, inputs.host_ip);
        tasks.spawn(register::run(consul.http().clone(), name.clone(), at, shutdown.clone()));
    }
    tracing::info!(
        http = ?addr,
        https = ?https_addr,
        stats = ?stats_addr,
        consul = %inputs.consul_http,
        max_connections,
        max_connections_per_source = config.max_connections_per_source,
        open_file_limit = nofile,
        "lb listening"
    );
    // The table builder, the remote watcher and the proxy threads only end on
    // shutdown; if one ends before, the lb stops with an error so its
    // supervisor restarts it.
    let ended = tokio::select! {
        // First: the tasks end on `stop` too, which is no failure.
        biased;
        _ = stop.cancelled() => None,
        _ = builder => Some(LbError::TaskEnded("routing table")),
        _ = remote => Some(LbError::TaskEnded("other-datacenter")),
        Some(end) = workers.next_end() => Some(LbError::WorkerDied { name: end.name, how: end.how }),
    };
    if let Some(error) = &ended {
        tracing::error!(%error, "lb: something it needs has ended; stopping");
    }
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    workers.wait_all().await;
    tracing::info!("lb stopped");
    match ended {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Starts what keeps the routing table current: the Consul watch that builds
/// it, the other-datacenter poller, the active checks and the `haproxy_tcp`
/// listeners. The first two only end on shutdown: their handles are returned.
fn spawn_table_tasks(
    config: &LbConfig,
    table_config: TableConfig,
    state: &Arc<LbState>,
    consul: &ConsulHub,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>), LbError> {
    let view = consul.catalog().map_err(LbError::Consul)?;
    let maxconn = consul.kv_tree(watch::MAXCONN_PREFIX).map_err(LbError::Consul)?;
    let _ = state.view.set(view.clone());
    let (updates, updates_rx) = tokio::sync::mpsc::unbounded_channel();
    let remote = tasks.spawn(remote::run(
        consul.http().clone(),
        table_config.clone(),
        state.clone(),
        updates,
        shutdown.clone(),
    ));
    let builder = tasks.spawn(watch::run(
        view,
        maxconn,
        updates_rx,
        table_config,
        state.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(checks::run(
        state.clone(),
        config.check_interval,
        config.check_timeout,
        shutdown.clone(),
    ));
    tasks.spawn(tcp::run(
        state.clone(),
        config.http_addrs().iter().map(SocketAddr::ip).collect(),
        config.connect_timeout,
        config.eject_time.as_millis() as u64,
        config.tunnel_timeout,
        shutdown.clone(),
    ));
    Ok((builder, remote))
}

/// Starts `config.workers` proxy threads, each with its own copies of the
/// `listeners` and a proxy of its own (its backend session pool is then used
/// by one thread only: sessions never hop between runtimes).
fn spawn_proxies(
    config: &LbConfig,
    state: &Arc<LbState>,
    listeners: Vec<(std::net::TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    shutdown: &CancellationToken,
) -> std::io::Result<crate::threads::WatchedThreads> {
    let mut workers = crate::threads::WatchedThreads::default();
    for worker in 0..config.workers {
        let mine = listeners
            .iter()
            .map(|(l, tls)| Ok((l.try_clone()?, tls.clone())))
            .collect::<std::io::Result<Vec<_>>>()?;
        let proxy = proxy::Proxy::new(config, state.clone());
        let shutdown = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(format!("lb-proxy-{worker}"))
            .spawn(move || proxy_worker(proxy, mine, shutdown))?;
        workers.watch(thread);
    }
    Ok(workers)
}

/// Where the lb registers itself in Consul: Consul must reach the address it
/// checks: the bound one, else HOST_IP, else loopback (a single host).
fn registered_address(bound: SocketAddr, host_ip: Option<std::net::IpAddr>) -> SocketAddr {
    let ip = if bound.ip().is_unspecified() {
        host_ip.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
    } else {
        bound.ip()
    };
    SocketAddr::new(ip, bound.port())
}

/// One proxy thread: a single-threaded runtime serving its copies of the
/// listeners (the kernel hands each new connection to one of the threads), so
/// a request's client side, backend side and body all run on one core, with no
/// cross-thread wake-ups. Returns when shutdown is done and its connections ended.
fn proxy_worker(
    proxy: Arc<proxy::Proxy>,
    listeners: Vec<(std::net::TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    shutdown: CancellationToken,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            tracing::error!(%error, "lb: cannot start a proxy thread");
            return;
        }
    };
    runtime.block_on(async move {
        let connections = TaskTracker::new();
        connections.spawn(proxy.clone().sweep_pool(shutdown.clone()));
        for (listener, tls) in listeners {
            match tokio_listener(listener) {
                Ok(listener) => {
                    connections.spawn(
                        proxy
                            .clone()
                            .serve(listener, tls, shutdown.clone(), connections.clone()),
                    );
                }
                Err(error) => tracing::error!(%error, "lb: proxy thread cannot use its listener"),
            }
        }
        connections.close();
        connections.wait().await;
        proxy.close_sessions().await;
    });
}

fn tokio_listener(listener: std::net::TcpListener) -> Result<tokio::net::TcpListener, LbError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tokio::net::TcpListener::from_std(listener).map_err(|source| LbError::Bind { addr, source })
}
