//! The dns component: the host's DNS server (replaces PanteraS's dnsmasq).
//!
//! ```text
//!  DnsSockets::bind ─▶ N SO_REUSEPORT UDP sockets + 1 TCP listener per address
//!  run(dns section, consul section, sockets, control, hub, shutdown):
//!     Zones (zones_dir, polled + SIGHUP) ─┐
//!     LbAnswers (static + Consul view) ───┼─▶ Engine (router + answer cache)
//!     Forwarders (Consul, upstreams) ─────┘        ▲            ▲
//!                        udp::spawn_workers (threads)   tcp::serve (tasks)
//! ```
//!
//! Tests bind port 0 and pass the sockets in; `control` carries the counters and
//! the zone-reload trigger shared with the supervisor and admin API.
//!
//! The UDP workers are OS threads (`dns-udp-N`), watched by
//! [`crate::threads::WatchedThreads`]: one that ends before shutdown (a panic
//! on some packet) ends [`run`] with [`DnsError::WorkerDied`], so the supervisor
//! restarts the dns rather than let it answer on fewer sockets.

pub mod component;
pub mod consul_ask;
pub mod engine;
pub mod forward;
pub mod inline;
pub mod outbox;
pub mod settings;
pub mod slow_path;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod wildcard;
pub mod wire;
pub mod zones;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::consul::ConsulHub;
use crate::consul::settings::ConsulConfig;
use engine::Engine;
use settings::DnsConfig;
use stats::DnsStats;
use wildcard::LbAnswers;
use zones::Zones;

/// Errors of the dns component.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A listen address could not be bound.
    #[error("could not bind dns {proto} socket on {addr}: {source}")]
    Bind {
        /// `udp` or `tcp`.
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause (EADDRINUSE, EACCES for port 53 without CAP_NET_BIND_SERVICE ...).
        source: std::io::Error,
    },
    /// The UDP worker threads could not start.
    #[error("could not start dns workers: {0}")]
    Workers(std::io::Error),
    /// The Consul view for `consul:` wildcard targets could not be started.
    #[error("consul: {0}")]
    Consul(#[source] crate::consul::ConsulError),
    /// A UDP worker thread ended while the dns was not asked to stop (a
    /// panic): the dns stops so its supervisor restarts it.
    #[error("UDP worker thread {name} ended unexpectedly: {how}")]
    WorkerDied {
        /// The thread (`dns-udp-N`).
        name: String,
        /// `returned`, or `panicked: <message>`.
        how: String,
    },
    /// The reader of a pooled Consul socket ended while the dns was not asked
    /// to stop (a panic): the dns stops so its supervisor restarts it.
    #[error("a pooled Consul socket's reader ended unexpectedly")]
    ReaderDied,
}

/// Already-bound sockets for [`run`].
#[derive(Debug)]
pub struct DnsSockets {
    /// UDP sockets (several per address share it with SO_REUSEPORT).
    pub udp: Vec<std::net::UdpSocket>,
    /// One TCP listener per address.
    pub tcp: Vec<std::net::TcpListener>,
}

impl DnsSockets {
    /// Binds `workers` UDP sockets and one TCP listener on each address. Port 0
    /// picks a free port, shared by the UDP and TCP sockets of that address (tried
    /// again with another port when TCP happens to have that one in use).
    ///
    /// Only `tunnel` (the vpn's address, which appears when the vpn creates
    /// its interface) is bound with IP_FREEBIND: any other address this host
    /// does not have is an error at once (EADDRNOTAVAIL), not a listener that
    /// silently never hears a question.
    pub fn bind(listen: &[SocketAddr], workers: usize, tunnel: Option<IpAddr>) -> Result<Self, DnsError> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for &requested in listen {
            let mut attempt = 0;
            let (sockets, listener) = loop {
                match bind_address(requested, workers, tunnel == Some(requested.ip())) {
                    Ok(bound) => break bound,
                    Err(DnsError::Bind { source, .. })
                        if requested.port() == 0 && attempt < 20 && source.kind() == std::io::ErrorKind::AddrInUse =>
                    {
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            };
            udp.extend(sockets);
            tcp.push(listener);
        }
        Ok(Self { udp, tcp })
    }

    /// The bound addresses, one per listen address.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.tcp.iter().filter_map(|t| t.local_addr().ok()).collect()
    }
}

/// `workers` UDP sockets and one TCP listener on one address.
fn bind_address(
    requested: SocketAddr,
    workers: usize,
    freebind: bool,
) -> Result<(Vec<std::net::UdpSocket>, std::net::TcpListener), DnsError> {
    let mut addr = requested;
    let mut udp = Vec::with_capacity(workers.max(1));
    for _ in 0..workers.max(1) {
        let socket = udp_socket(addr, freebind).map_err(|source| DnsError::Bind {
            proto: "udp",
            addr,
            source,
        })?;
        if addr.port() == 0 {
            addr = socket.local_addr().map_err(|source| DnsError::Bind {
                proto: "udp",
                addr,
                source,
            })?;
        }
        udp.push(socket);
    }
    let tcp = tcp_listener(addr, freebind).map_err(|source| DnsError::Bind {
        proto: "tcp",
        addr,
        source,
    })?;
    Ok((udp, tcp))
}

fn udp_socket(addr: SocketAddr, freebind: bool) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_port(true)?;
    // The vpn's tunnel address may not exist yet when the dns starts (the vpn
    // creates the interface): bind it anyway and receive once it appears.
    if freebind {
        set_freebind(&socket, addr);
    }
    // On a wildcard address each question carries the address it was sent
    // to, and its answer goes out from there (see net::udp_batch).
    if addr.ip().is_unspecified() {
        use std::os::fd::AsRawFd;
        crate::net::udp_batch::enable_pktinfo(socket.as_raw_fd(), addr.is_ipv6())?;
    }
    // Room for bursts while a worker is busy (the kernel caps this at rmem_max).
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn set_freebind(socket: &Socket, addr: SocketAddr) {
    // Without it the bind fails when the address is not there yet, as it would anyway.
    let _ = if addr.is_ipv6() {
        socket.set_freebind_v6(true)
    } else {
        socket.set_freebind_v4(true)
    };
}

fn tcp_listener(addr: SocketAddr, freebind: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if freebind {
        set_freebind(&socket, addr);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Handles shared between the dns component and whoever runs it.
#[derive(Clone, Default)]
pub struct DnsControl {
    /// The counters (read by the admin API).
    pub stats: Arc<DnsStats>,
    /// Notified to reload `zones_dir` now (SIGHUP, admin action).
    pub reload_zones: Arc<Notify>,
}

/// Runs the DNS server on `sockets` until `shutdown` is cancelled.
///
/// Long on purpose: it starts each part of the dns in dependency order (zones,
/// wildcard answers, engine, listeners, workers), one call each, then watches
/// them; the order is the documentation.
pub async fn run(
    dns: &DnsConfig,
    consul_config: &ConsulConfig,
    sockets: DnsSockets,
    control: DnsControl,
    consul: Arc<ConsulHub>,
    shutdown: CancellationToken,
) -> Result<(), DnsError> {
    let tasks = TaskTracker::new();
    let local = shutdown.child_token();

    let zones = Arc::new(Zones::new(&dns.zones_dir));
    if dns.zones_dir.is_dir() {
        let (_, errors) = zones.reload(true);
        tracing::info!(dir = %dns.zones_dir.display(), zones = zones.current().len(), broken = errors.len(), "zones loaded");
    } else {
        tracing::info!(dir = %dns.zones_dir.display(), "zones directory does not exist; serving no zones");
    }
    let lb = LbAnswers::new(&dns.wildcard_targets, dns.wildcard_ttl);
    let readers = forward::ReaderTasks {
        tasks: tasks.clone(),
        shutdown: local.clone(),
        failed: CancellationToken::new(),
    };
    let engine = Arc::new(Engine::new(
        dns,
        consul_config,
        lb.clone(),
        zones.clone(),
        control.stats.clone(),
        readers.clone(),
    ));

    if lb.follows_consul() {
        let view = consul.catalog().map_err(DnsError::Consul)?;
        let on_change = {
            let engine = engine.clone();
            Arc::new(move || engine.local_data_changed()) as Arc<dyn Fn() + Send + Sync>
        };
        tasks.spawn(lb.clone().follow(view, on_change, local.clone()));
    }

    tasks.spawn(watch_zones(
        zones,
        engine.clone(),
        dns.zones_poll,
        control.reload_zones.clone(),
        local.clone(),
    ));

    let addrs = sockets.local_addrs();
    let udp_count = sockets.udp.len();
    for listener in sockets.tcp {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(DnsError::Workers)?;
        tasks.spawn(tcp::serve(
            listener,
            engine.clone(),
            tcp::TcpLimits {
                idle: dns.tcp_idle_timeout,
                per_source: dns.tcp_connections_per_source,
            },
            local.clone(),
            tasks.clone(),
        ));
    }
    let threads = udp::spawn_workers(
        sockets.udp,
        &engine,
        &udp::SlowPath::new(tokio::runtime::Handle::current(), tasks.clone()),
        dns.consul_inline_slots,
        &local,
    )
    .map_err(DnsError::Workers)?;
    for problem in &dns.upstream_problems {
        tracing::warn!(%problem, "dns upstream skipped");
    }
    if dns.upstreams.is_empty() {
        tracing::warn!(
            "no upstream resolver: names outside Consul, the zones and the wildcard domain answer SERVFAIL \
             (set dns.upstreams, or save the host's resolvers in /etc/resolv.conf.orig)"
        );
    }
    tracing::info!(
        listen = ?addrs,
        udp_workers = udp_count,
        consul = ?consul_config.dns,
        upstreams = ?dns.upstreams,
        wildcard = ?dns.wildcard_domain.as_ref().map(|n| n.to_string()),
        "dns listening"
    );

    // The UDP workers and the forwarders' socket readers only end on
    // shutdown; one that ends before (a panic) stops the dns with an error,
    // so its supervisor restarts it whole.
    let mut workers = crate::threads::WatchedThreads::new(threads);
    let died = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        Some(end) = workers.next_end() => Some(DnsError::WorkerDied {
            name: end.name,
            how: end.how,
        }),
        _ = readers.failed.cancelled() => Some(DnsError::ReaderDied),
    };
    if let Some(error) = &died {
        tracing::error!(%error, "dns: stopping");
    }
    local.cancel();
    tasks.close();
    tasks.wait().await;
    workers.wait_all().await;
    tracing::info!("dns stopped");
    match died {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

async fn watch_zones(
    zones: Arc<Zones>,
    engine: Arc<Engine>,
    poll: std::time::Duration,
    reload: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        let force = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll) => false,
            _ = reload.notified() => true,
        };
        let z = zones.clone();
        let Ok((changed, errors)) = tokio::task::spawn_blocking(move || z.reload(force)).await else {
            continue;
        };
        if changed || force {
            engine.zones_changed();
            tracing::info!(
                zones = zones.current().len(),
                broken = errors.len(),
                forced = force,
                "zones reloaded"
            );
        }
    }
}
