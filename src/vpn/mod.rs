//! The vpn component: a WireGuard server for laptops (replaces the OpenVPN
//! container and sshuttle), built on boringtun's protocol core (`noise::Tunn`)
//! with our own packet loop and a kernel TUN interface.
//!
//! ```text
//!  VpnSockets::bind ─▶ UDP socket (listen) + TUN interface (address, MTU, offloads)
//!  VpnState::new     ─▶ server key (dir/server.key) + peer table (dir/peers.toml)
//!  run(config, sockets, state, shutdown):
//!    device::spawn: thread vpn-net  UDP ─recvmmsg─▶ decapsulate ─▶ TUN (GRO batches)
//!                   thread vpn-tun  TUN (TSO split) ─▶ encapsulate ─▶ UDP (GSO/sendmmsg)
//!    timers task: update_timers every 250 ms, handshake limiter reset every 1 s
//!    watch task: peers.toml polled every 500 ms, only the diff applied
//!    uapi::serve: /var/run/wireguard/<interface>.sock (wg show / wg set)
//!    forward::Firewall: nft table inet wayfinder_vpn_<interface>: peers reach
//!                       the tunnel address and `routes` only (+ masquerade);
//!                       ip_forward for `routes`; removed at stop
//! ```
//!
//! The peer table is immutable and swapped whole ([`ArcSwap`]) when peers change;
//! a peer that stays keeps its `Arc<Peer>` and so its session. Each peer's
//! `Tunn` sits behind its own mutex: the two packet threads only meet there.

pub mod admin;
pub mod allowed;
pub mod client;
pub mod component;
pub mod device;
pub mod forward;
pub mod keys;
pub mod page;
pub mod peers;
pub mod settings;
pub mod tun;
pub mod uapi;
pub mod udp;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use boringtun::noise::Tunn;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use parking_lot::Mutex;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::shared::ConfigError;
use allowed::AllowedIps;
use peers::{PeerRecord, PeerStore};
use settings::VpnConfig;

/// Handshakes per second over all peers before cookies are required. Every
/// initiation is counted twice (our check before the peer lookup, then the
/// `Tunn`'s own check with the same shared limiter), so this is 2x the
/// effective limit of 100/s that boringtun's `device` uses.
const HANDSHAKE_LIMIT: u64 = 200;
/// How often `peers.toml` is checked for changes.
const PEERS_POLL: Duration = Duration::from_millis(500);
/// How often every peer's timers run (boringtun's device uses 250 ms).
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Errors of the vpn component.
#[derive(Debug, thiserror::Error)]
pub enum VpnError {
    /// A state file or directory is unusable (permissions, contents).
    #[error("could not use {path}: {problem}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// A file operation failed.
    #[error("could not {what} {path}: {source}")]
    Io {
        /// The operation, e.g. `write the peer registry`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The UDP socket could not be bound.
    #[error("could not bind vpn udp socket on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The TUN interface could not be created or configured.
    #[error("could not create tun interface {name} (needs /dev/net/tun and CAP_NET_ADMIN): {source}")]
    Tun {
        /// The interface name.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// IP forwarding could not be enabled.
    #[error(
        "could not enable IP forwarding for vpn.routes (set sysctl net.ipv4.ip_forward=1 on the host, as deploy/sysctl-wayfinder-vpn.conf does, or run with CAP_NET_ADMIN and a writable /proc/sys): {0}"
    )]
    Forwarding(std::io::Error),
    /// The nft table that confines peers to the tunnel address and `vpn.routes`
    /// (and masquerades, when asked for) could not be installed.
    #[error("could not confine vpn peers: {0}")]
    Firewall(String),
    /// `nft` is not installed: the vpn does not run with its peers unconfined.
    #[error(
        "could not confine vpn peers: `nft` not found on PATH or in /usr/sbin, /sbin (the vpn limits its peers to the tunnel address and vpn.routes with an nft table and does not start without it); {}",
        forward::NFT_INSTALL
    )]
    NoNft,
    /// A peer change was refused (duplicate name, subnet full, no endpoint ...).
    #[error("could not change peers: {0}")]
    Peer(String),
    /// The packet threads could not start.
    #[error("could not start vpn threads: {0}")]
    Threads(std::io::Error),
    /// The packet loop ended on its own (the TUN interface went away).
    #[error("could not keep the tunnel running: {0}")]
    Device(std::io::Error),
    /// A client config cannot be written: no endpoint for clients to dial.
    #[error("could not write a client config: {0}")]
    NoEndpoint(#[source] ConfigError),
    /// The control socket could not be served.
    #[error("could not serve the control socket {path}: {problem}")]
    Uapi {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
}

impl VpnError {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        VpnError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Already-bound resources for [`run`].
pub struct VpnSockets {
    /// The WireGuard UDP socket.
    pub udp: std::net::UdpSocket,
    /// The TUN interface, addressed and up.
    pub tun: tun_rs::SyncDevice,
    /// The `nft` program that installs the peers' confinement (found at bind
    /// time, so a host without it fails before anything starts).
    pub nft: PathBuf,
}

impl VpnSockets {
    /// Finds `nft`, binds the UDP socket (port 0 picks one) and creates the
    /// TUN interface.
    pub fn bind(config: &VpnConfig) -> Result<Self, VpnError> {
        let nft = forward::nft_program()?;
        let udp = udp::bind(config.listen).map_err(|source| VpnError::Bind {
            addr: config.listen,
            source,
        })?;
        let tun = tun::create(config).map_err(|source| VpnError::Tun {
            name: config.interface.clone(),
            source,
        })?;
        Ok(Self { udp, tun, nft })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.udp.local_addr().ok()
    }
}

impl std::fmt::Debug for VpnSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VpnSockets")
            .field("udp", &self.local_addr())
            .field("tun", &self.tun.name().ok())
            .finish()
    }
}

/// One peer's live protocol state.
pub struct Peer {
    /// Its public key.
    pub public: [u8; 32],
    /// Our 24-bit session index for it (random; `Tunn` adds 8 bits of its own).
    index: u32,
    /// The WireGuard state machine.
    tunn: Mutex<Tunn>,
    /// Where its last authenticated packet came from.
    endpoint: ArcSwapOption<SocketAddr>,
    /// Packets dropped because their inner source is not this peer's.
    spoofed: AtomicU64,
    /// Handshakes completed with it (counted once per handshake, for metrics).
    handshakes: AtomicU64,
}

impl Peer {
    /// Its current endpoint.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint.load().as_deref().copied()
    }

    /// Roams to `addr` (only ever called after a packet authenticated).
    #[inline]
    fn set_endpoint(&self, addr: SocketAddr) {
        if self.endpoint() != Some(addr) {
            self.endpoint.store(Some(Arc::new(addr)));
        }
    }
}

/// A peer in the current table, with its registry data.
pub struct PeerEntry {
    /// Registry record.
    pub record: PeerRecord,
    /// Live state.
    pub peer: Arc<Peer>,
}

/// The immutable peer table the packet threads read.
#[derive(Default)]
pub struct PeerTable {
    entries: Vec<PeerEntry>,
    by_key: HashMap<[u8; 32], usize>,
    by_index: HashMap<u32, Arc<Peer>>,
    allowed: AllowedIps<Arc<Peer>>,
}

impl PeerTable {
    /// The peer whose session index is `receiver >> 8`.
    #[inline]
    pub fn by_receiver(&self, receiver: u32) -> Option<&Arc<Peer>> {
        self.by_index.get(&(receiver >> 8))
    }

    /// The peer with this public key.
    pub fn by_key(&self, key: &[u8; 32]) -> Option<&Arc<Peer>> {
        self.by_key.get(key).map(|i| &self.entries[*i].peer)
    }

    /// The peer that owns `ip` (longest prefix over all peers).
    #[inline]
    pub fn route(&self, ip: IpAddr) -> Option<&Arc<Peer>> {
        self.allowed.lookup(ip)
    }

    /// The peers in registry order.
    pub fn entries(&self) -> &[PeerEntry] {
        &self.entries
    }
}

/// A peer's status for `peer list`, `wg show` and the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    /// Name.
    pub name: String,
    /// Public key (base64).
    pub public_key: String,
    /// Tunnel address.
    pub address: Ipv4Addr,
    /// Every network it owns.
    pub allowed_ips: Vec<IpNet>,
    /// Last authenticated endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Unix time of the latest handshake.
    pub last_handshake: Option<Duration>,
    /// Payload bytes received from it.
    pub rx_bytes: u64,
    /// Payload bytes sent to it.
    pub tx_bytes: u64,
    /// Packets dropped because their inner source address was not its own.
    pub spoofed_drops: u64,
    /// Handshakes completed with it since the vpn started.
    pub handshakes: u64,
}

/// A newly added peer: its record and the client configuration to hand out.
#[derive(Debug, Clone)]
pub struct NewPeer {
    /// What was stored.
    pub record: PeerRecord,
    /// The complete client configuration (holds the private key).
    pub client: client::ClientConfig,
}

/// The vpn's shared state: keys, the peer table, the registry. The packet
/// threads, the control socket, the CLI and a future admin API all use it.
pub struct VpnState {
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    table: ArcSwap<PeerTable>,
    store: PeerStore,
    /// Serialises table rebuilds (registry poll, control socket).
    rebuild: Mutex<()>,
    config: VpnConfig,
    /// Listening port, once bound.
    port: AtomicU64,
    /// Cookie replies sent because handshakes came in faster than the limit.
    pub cookies_sent: AtomicU64,
}

/// Never shows the keys: only what identifies the server.
impl std::fmt::Debug for VpnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VpnState")
            .field("interface", &self.config.interface)
            .field("public_key", &self.public_key())
            .field("peers", &self.table.load().entries.len())
            .finish_non_exhaustive()
    }
}

impl VpnState {
    /// Loads (or creates) the server key and the peer registry in `config.dir`.
    pub fn new(config: &VpnConfig) -> Result<Arc<Self>, VpnError> {
        let secret = keys::load_or_create_server_key(&config.dir)?;
        let public = PublicKey::from(&secret);
        let store = PeerStore::open(&config.dir)?;
        let state = Arc::new(VpnState {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_LIMIT)),
            secret,
            public,
            table: ArcSwap::from_pointee(PeerTable::default()),
            store,
            rebuild: Mutex::new(()),
            config: config.clone(),
            port: AtomicU64::new(u64::from(config.listen.port())),
            cookies_sent: AtomicU64::new(0),
        });
        let records = state.store.load()?;
        state.apply(&records);
        Ok(state)
    }

    /// The server's public key, base64.
    pub fn public_key(&self) -> String {
        keys::to_base64(self.public.as_bytes())
    }

    /// The current peer table.
    pub fn table(&self) -> arc_swap::Guard<Arc<PeerTable>> {
        self.table.load()
    }

    /// The listening UDP port.
    pub fn listen_port(&self) -> u16 {
        self.port.load(Ordering::Relaxed) as u16
    }

    /// Peers the tunnel subnet has addresses for: its host addresses less
    /// the appliance's own (a new peer past that is refused: the table is full).
    pub fn peer_capacity(&self) -> usize {
        // Host addresses: all but the network and broadcast ones (the
        // settings allow /30 or shorter), counted without walking them.
        let size = 1u64 << (32 - u32::from(self.config.address.prefix_len()));
        usize::try_from(size.saturating_sub(3)).unwrap_or(usize::MAX)
    }

    /// Every peer with live statistics.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let table = self.table.load();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        table
            .entries
            .iter()
            .map(|e| {
                let (since, tx, rx, _, _) = e.peer.tunn.lock().stats();
                PeerStatus {
                    name: e.record.name.clone(),
                    public_key: e.record.public_key.clone(),
                    address: e.record.address,
                    allowed_ips: e.record.networks(),
                    endpoint: e.peer.endpoint(),
                    last_handshake: since.map(|s| now.saturating_sub(s)),
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                    spoofed_drops: e.peer.spoofed.load(Ordering::Relaxed),
                    handshakes: e.peer.handshakes.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Adds a peer named `name` with a new key pair and the next free address,
    /// persists it, applies it, and returns the client configuration.
    /// `endpoint` is the `host:port` clients dial; `search` the DNS search domain.
    pub fn add_peer(&self, name: &str, endpoint: &str, search: &str) -> Result<NewPeer, VpnError> {
        if !peers::valid_name(name) {
            return Err(VpnError::Peer(format!(
                "`{name}` is not a peer name (1-64 letters, digits, `-`, `_`, `.`, `@`)"
            )));
        }
        let client_secret = keys::generate();
        let client_public = keys::public_of(&client_secret);
        let subnet = self.config.address;
        let record = self.store.update(|list| {
            if list.iter().any(|p| p.name == name) {
                return Err(VpnError::Peer(format!("a peer named `{name}` exists already")));
            }
            let record = new_record(list, subnet, name.to_string(), keys::to_base64(&client_public))?;
            list.push(record.clone());
            Ok(record)
        })?;
        self.reload()?;
        let mut allowed_ips = vec![IpNet::V4(self.config.subnet())];
        allowed_ips.extend(self.config.routes.iter().copied());
        let client = client::ClientConfig {
            private_key: keys::to_base64(&client_secret.to_bytes()),
            address: record.address,
            dns: self.config.address.addr(),
            search: search.to_string(),
            mtu: self.config.mtu,
            server_public_key: self.public_key(),
            endpoint: endpoint.to_string(),
            allowed_ips,
        };
        Ok(NewPeer { record, client })
    }

    /// Removes the peer named `name` (or with that base64 public key); false when
    /// there is none. Its sessions end at once.
    pub fn remove_peer(&self, name: &str) -> Result<bool, VpnError> {
        let removed = self.store.update(|list| {
            let before = list.len();
            list.retain(|p| p.name != name && p.public_key != name);
            Ok(before != list.len())
        })?;
        self.reload()?;
        Ok(removed)
    }

    /// Control-socket change for the peer with `key`: remove it, or set (or
    /// extend) its allowed networks, adding it under a generated name when new.
    pub fn set_peer(&self, key: &[u8; 32], remove: bool, allowed: Option<(Vec<IpNet>, bool)>) -> Result<(), VpnError> {
        let b64 = keys::to_base64(key);
        let subnet = self.config.address;
        self.store.update(|list| {
            if remove {
                list.retain(|p| p.public_key != b64);
                return Ok(());
            }
            let at = match list.iter().position(|p| p.public_key == b64) {
                Some(at) => at,
                None => {
                    let name = format!("key-{}", &keys::to_hex(key)[..8]);
                    list.push(new_record(list, subnet, name, b64.clone())?);
                    list.len() - 1
                }
            };
            if let Some((nets, replace)) = allowed {
                let record = &mut list[at];
                if replace {
                    record.allowed_ips.clear();
                }
                for n in nets {
                    let n = n.trunc();
                    if !record.allowed_ips.contains(&n) {
                        record.allowed_ips.push(n);
                    }
                }
            }
            Ok(())
        })?;
        self.reload()?;
        Ok(())
    }

    /// Re-reads the registry and applies what changed; true when it did.
    pub fn reload(&self) -> Result<bool, VpnError> {
        let records = self.store.load()?;
        Ok(self.apply(&records))
    }

    /// Builds a table from `records`, keeping the live state of peers whose key
    /// stays; swaps it in when anything differs.
    fn apply(&self, records: &[PeerRecord]) -> bool {
        let _guard = self.rebuild.lock();
        let old = self.table.load_full();
        let unchanged =
            old.entries.len() == records.len() && old.entries.iter().zip(records).all(|(e, r)| e.record == *r);
        if unchanged {
            return false;
        }
        let mut table = PeerTable::default();
        for record in records {
            let Some(key) = record.key() else { continue };
            if table.by_key.contains_key(&key) {
                continue;
            }
            let peer = match old.by_key(&key) {
                Some(p) => p.clone(),
                None => self.new_peer(key, &old, &table),
            };
            table.by_key.insert(key, table.entries.len());
            table.by_index.insert(peer.index, peer.clone());
            for net in record.networks() {
                table.allowed.insert(net, peer.clone());
            }
            table.entries.push(PeerEntry {
                record: record.clone(),
                peer,
            });
        }
        let (added, removed) = (
            table
                .entries
                .iter()
                .filter(|e| old.by_key(&e.peer.public).is_none())
                .count(),
            old.entries
                .iter()
                .filter(|e| !table.by_key.contains_key(&e.peer.public))
                .count(),
        );
        tracing::info!(peers = table.entries.len(), added, removed, "vpn peers applied");
        self.table.store(Arc::new(table));
        true
    }

    /// A fresh peer with a random session index used by no other peer.
    fn new_peer(&self, key: [u8; 32], old: &PeerTable, new: &PeerTable) -> Arc<Peer> {
        let mut rng = rand::rng();
        let index = loop {
            // 24 bits: Tunn shifts the index left by 8 for its session counter.
            let i = rng.random::<u32>() & 0x00ff_ffff;
            if !old.by_index.contains_key(&i) && !new.by_index.contains_key(&i) {
                break i;
            }
        };
        let tunn = Tunn::new(
            self.secret.clone(),
            PublicKey::from(key),
            None,
            None,
            index,
            Some(self.limiter.clone()),
        );
        Arc::new(Peer {
            public: key,
            index,
            tunn: Mutex::new(tunn),
            endpoint: ArcSwapOption::empty(),
            spoofed: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
        })
    }
}

/// What a client config takes from outside the vpn's section.
#[derive(Debug, Clone)]
pub struct ClientInputs {
    /// This host's address: the endpoint clients dial when `vpn.endpoint` is unset.
    pub host_ip: Option<IpAddr>,
    /// The DNS search domain handed to clients: `service.<consul domain>`.
    pub search_domain: String,
    /// The config file, for the error when no endpoint can be made.
    pub source: String,
}

impl ClientInputs {
    /// The inputs from this host's address and the Consul domain.
    pub fn new(host_ip: Option<IpAddr>, consul_domain: &hickory_proto::rr::Name, source: &str) -> Self {
        Self {
            host_ip,
            search_domain: format!("service.{}", consul_domain.to_string().trim_end_matches('.')),
            source: source.to_string(),
        }
    }
}

/// The `host:port` clients dial: `vpn.endpoint`, else `HOST_IP:<listen port>`.
pub fn client_endpoint(config: &VpnConfig, inputs: &ClientInputs) -> Result<String, ConfigError> {
    if let Some(e) = &config.endpoint {
        return Ok(e.clone());
    }
    match inputs.host_ip {
        Some(ip) => Ok(SocketAddr::new(ip, config.listen.port()).to_string()),
        None => Err(ConfigError {
            file: inputs.source.clone(),
            key: "vpn.endpoint".into(),
            problem:
                "client configs need the server's public address: set vpn.endpoint (\"host:port\"), or HOST_IP or IP"
                    .into(),
        }),
    }
}

/// Adds a client peer named `name`: the one path of `wayfinder vpn peer add`
/// and the admin API's `POST /api/vpn/peers`. The endpoint and search domain
/// come from `inputs`; the peer (next free address, new key pair) is saved in
/// `vpn.dir` and applied to `state` at once (a running server sharing `state`
/// serves it immediately; another one picks the file change up).
pub fn add_client(
    config: &VpnConfig,
    inputs: &ClientInputs,
    state: &VpnState,
    name: &str,
) -> Result<NewPeer, VpnError> {
    let endpoint = client_endpoint(config, inputs).map_err(VpnError::NoEndpoint)?;
    state.add_peer(name, &endpoint, &inputs.search_domain)
}

/// Runs the vpn on `sockets` until `shutdown` is cancelled.
pub async fn run(
    vpn: &VpnConfig,
    sockets: VpnSockets,
    state: Arc<VpnState>,
    shutdown: CancellationToken,
) -> Result<(), VpnError> {
    // Keys live in this process's memory: keep them out of core dumps and
    // away from ptrace by other users.
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let local_addr = sockets.local_addr();
    if let Some(addr) = local_addr {
        state.port.store(u64::from(addr.port()), Ordering::Relaxed);
    }
    // The control socket first: it refuses a second process on the same
    // interface before that one could replace (and at its exit delete) the
    // first one's firewall table.
    let control = uapi::bind(&vpn.interface)?;
    let firewall = {
        let (vpn, nft) = (vpn.clone(), sockets.nft.clone());
        tokio::task::spawn_blocking(move || forward::Firewall::install(&vpn, nft))
            .await
            .map_err(|e| VpnError::Firewall(format!("the install task failed: {e}")))
    };
    let firewall = match firewall.and_then(|f| f) {
        Ok(f) => f,
        Err(e) => {
            uapi::unlink(&vpn.interface);
            return Err(e);
        }
    };
    let local = shutdown.child_token();
    let tasks = TaskTracker::new();
    let udp = Arc::new(sockets.udp);
    let tun = Arc::new(sockets.tun);
    let threads = match device::spawn(state.clone(), udp.clone(), tun, local.clone()) {
        Ok(t) => t,
        Err(e) => {
            uapi::unlink(&vpn.interface);
            let _ = tokio::task::spawn_blocking(move || firewall.remove()).await;
            return Err(VpnError::Threads(e));
        }
    };
    tasks.spawn(uapi::serve(control, state.clone(), local.clone(), tasks.clone()));
    tasks.spawn(device::timers(state.clone(), udp, local.clone(), TIMER_TICK));
    tasks.spawn(watch_peers(state.clone(), local.clone()));
    tracing::info!(
        listen = ?local_addr,
        interface = %vpn.interface,
        address = %vpn.address,
        public_key = %state.public_key(),
        peers = state.table().entries.len(),
        routes = ?vpn.routes,
        "vpn listening"
    );

    // `local` is also cancelled by a packet thread that cannot go on.
    local.cancelled().await;
    tasks.close();
    tasks.wait().await;
    let failure = tokio::task::spawn_blocking(move || {
        let mut first = None;
        for t in threads {
            if let Ok(Err(e)) = t.join() {
                first.get_or_insert(e);
            }
        }
        first
    })
    .await
    .ok()
    .flatten();
    uapi::unlink(&vpn.interface);
    let _ = tokio::task::spawn_blocking(move || firewall.remove()).await;
    match failure {
        Some(e) if !shutdown.is_cancelled() => {
            tracing::error!(error = %e, "vpn packet loop ended");
            Err(VpnError::Device(e))
        }
        _ => {
            tracing::info!("vpn stopped");
            Ok(())
        }
    }
}

/// Applies registry changes made by other processes (`wayfinder vpn peer ...`).
async fn watch_peers(state: Arc<VpnState>, shutdown: CancellationToken) {
    let path = state.store.path();
    let stamp = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
    let mut seen = stamp(&path);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PEERS_POLL) => {}
        }
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let s = state.clone();
        match tokio::task::spawn_blocking(move || s.reload()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "peer registry not applied; the previous peers stay"),
            Err(_) => {}
        }
    }
}

/// A registry record for a new peer: the next free tunnel address of `subnet`
/// (none left is an error), no extra networks, created now.
fn new_record(
    list: &[PeerRecord],
    subnet: ipnet::Ipv4Net,
    name: String,
    public_key: String,
) -> Result<PeerRecord, VpnError> {
    let address = peers::next_free_address(subnet, list)
        .ok_or_else(|| VpnError::Peer(format!("no free address left in {}", subnet.trunc())))?;
    Ok(PeerRecord {
        name,
        public_key,
        address,
        allowed_ips: Vec::new(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(dir: &Path) -> Arc<VpnState> {
        let text = format!(
            "[dns]\nupstreams = [\"192.0.2.1\"]\n[vpn]\ndir = {:?}\n",
            dir.join("vpn")
        );
        let file = crate::config::parse(&text, "test.toml", &HashMap::<String, String>::new()).unwrap();
        let config = crate::config::validate(&file, "test.toml").unwrap();
        VpnState::new(&config.vpn).unwrap()
    }

    /// Applying registry changes keeps the live state of unchanged peers (same
    /// `Arc<Peer>`, so the same session), drops removed ones from every index,
    /// and gives each new peer a distinct 24-bit session index.
    #[test]
    fn peer_changes_apply_only_the_diff() {
        let temp = tempfile::tempdir().unwrap();
        let s = state(temp.path());
        let a = s.add_peer("a", "192.0.2.1:51820", "service.consul").unwrap();
        let key_a = a.record.key().unwrap();
        let peer_a = s.table().by_key(&key_a).unwrap().clone();
        let b = s.add_peer("b", "192.0.2.1:51820", "service.consul").unwrap();
        assert_eq!(b.record.address, Ipv4Addr::new(10, 200, 0, 3));
        let table = s.table();
        assert!(Arc::ptr_eq(table.by_key(&key_a).unwrap(), &peer_a), "a kept its state");
        let peer_b = table.by_key(&b.record.key().unwrap()).unwrap().clone();
        assert_ne!(peer_a.index, peer_b.index);
        assert!(peer_b.index < (1 << 24));
        assert!(Arc::ptr_eq(table.by_receiver(peer_b.index << 8 | 7).unwrap(), &peer_b));
        assert!(Arc::ptr_eq(
            table.route("10.200.0.3".parse().unwrap()).unwrap(),
            &peer_b
        ));
        drop(table);

        assert!(s.remove_peer("b").unwrap());
        assert!(!s.remove_peer("b").unwrap());
        let table = s.table();
        assert!(table.by_receiver(peer_b.index << 8).is_none());
        assert!(table.route("10.200.0.3".parse().unwrap()).is_none());
        assert!(
            Arc::ptr_eq(table.by_key(&key_a).unwrap(), &peer_a),
            "a untouched by b's removal"
        );
        drop(table);
        assert!(!s.reload().unwrap(), "an unchanged file changes nothing");

        // A second process (the CLI) sees the same registry.
        let other = state(temp.path());
        assert_eq!(other.peers().len(), 1);
        assert_eq!(other.public_key(), s.public_key());
        assert!(s.add_peer("a", "x:1", "s").is_err(), "duplicate names are refused");
        assert!(s.add_peer("bad name", "x:1", "s").is_err());
    }
}
