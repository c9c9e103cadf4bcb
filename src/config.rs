//! Configuration: the TOML file, the PanteraS environment, and the validated result.
//!
//! ```text
//!  wayfinder.toml ──serde (unknown keys rejected)──▶ FileConfig
//!  PanteraS env (LISTEN_IP, CONSUL_IP, ...) ──overrides──▶ FileConfig   (env beats file)
//!  FileConfig ──validate()──▶ Config  (addresses parsed, resolv.conf read, loops refused)
//! ```
//!
//! Precedence: environment variable, then the file, then the built-in default named
//! next to each field. Every error names the file, the key and the problem; `main`
//! maps a [`ConfigError`] to exit status 64.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_proto::rr::Name;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::env::{self, Env};
use crate::supervisor::settings::validate_supervisor;
pub use crate::supervisor::settings::{SupervisorConfig, SupervisorSection};

/// The config file used when `-c` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "wayfinder.toml";

/// A configuration problem: which file, which key, what is wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    /// The config file (or `environment` for a bad variable).
    pub file: String,
    /// The key, e.g. `dns.listen`, or the variable name.
    pub key: String,
    /// What is wrong, in words.
    pub problem: String,
}

/// The file as written, after environment overrides. Serialised back by `check`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// How to reach the Consul agent.
    #[serde(default)]
    pub consul: ConsulSection,
    /// The DNS server.
    #[serde(default)]
    pub dns: DnsSection,
    /// The HTTP load balancer.
    #[serde(default)]
    pub lb: LbSection,
    /// `wayfinder up`: the supervisor, its programs and the admin endpoint.
    #[serde(default)]
    pub supervisor: SupervisorSection,
    /// The WireGuard VPN.
    #[serde(default)]
    pub vpn: VpnSection,
}

/// `[lb]`: the HTTP/TCP load balancer fed by the Consul catalog.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LbSection {
    /// HTTP listener. Default `0.0.0.0:80`; `LISTEN_IP` replaces the address.
    #[serde(default = "default_lb_http")]
    pub http: SocketAddr,
    /// Extra Host names answered with the landing page (besides `localhost`,
    /// 127.0.0.1, the host name and `HOST_IP`). Default none.
    #[serde(default)]
    pub landing_hosts: Vec<String>,
    /// Time to connect to a backend instance before trying another. Default `5s`.
    #[serde(default = "default_lb_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Inactivity allowed to a client while the lb waits for it (HAProxy's
    /// `timeout client`): a connection whose client neither sends nor reads for
    /// this long while a response is waiting to be read, or a request body to be
    /// sent, is closed and its maxconn slot freed. Also bounds the time to send a
    /// request head (with `idle_timeout`, whichever is shorter), and is the h2
    /// keep-alive PING interval. Default `60s`.
    #[serde(default = "default_lb_io_timeout", with = "humantime_serde")]
    pub client_timeout: Duration,
    /// An HTTP/1.1 keep-alive connection with no request for this long, or an
    /// HTTP/2 session with no open stream for this long, is closed (h2 with a
    /// GOAWAY). Default `30s`.
    #[serde(default = "default_lb_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time from accepting a connection to the end of the TLS handshake and, for
    /// HTTP/2, the client's connection preface; a client that does not get that
    /// far is closed. Default `10s`.
    #[serde(default = "default_lb_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Client connections open at once over HTTP, HTTPS and the `haproxy_tcp`
    /// listeners; one more is accepted and closed at once (counted, logged at most
    /// every 10 s). Default `0` = derived from the open-file limit (raised to its
    /// hard limit at start): half of it less 1024, at most 20000.
    #[serde(default)]
    pub max_connections: usize,
    /// Client connections open at once from one source address (an IPv6 /64
    /// counts as one address), so one client, or one NATed office, cannot take
    /// every connection; over it new ones from that source are closed at once.
    /// Default `1000`; at least 1.
    #[serde(default = "default_lb_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Time a backend may take to start its response. Default `60s`.
    #[serde(default = "default_lb_io_timeout", with = "humantime_serde")]
    pub server_timeout: Duration,
    /// How long an instance that refused a connection gets no new requests
    /// (passive ejection). Default `10s`.
    #[serde(default = "default_lb_eject_time", with = "humantime_serde")]
    pub eject_time: Duration,
    /// Interval of the active checks (`haproxy_httpchk=` or a TCP connect).
    /// Default `2s` (HAProxy's `inter`).
    #[serde(default = "default_lb_check_interval", with = "humantime_serde")]
    pub check_interval: Duration,
    /// Time one active check may take. Default `2s`.
    #[serde(default = "default_lb_check_interval", with = "humantime_serde")]
    pub check_timeout: Duration,
    /// How long a request waits for an instance below its KV `maxconn` before
    /// it gets 503. Default `5s`.
    #[serde(default = "default_lb_queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Requests waiting for an instance below its maxconn, over all services, at
    /// most; one more gets 503 at once. Default `4096`; at least 1.
    #[serde(default = "default_lb_max_queued")]
    pub max_queued: usize,
    /// How long a request that arrives before the first routing table (built
    /// from a complete read of Consul) waits for it before it gets 503, so a
    /// restart never answers 503 for a service that exists. Default `10s`.
    #[serde(default = "default_lb_ready_timeout", with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// Consul service name the lb registers itself under (with a TCP check), so
    /// that `dns.wildcard_targets = ["consul:wayfinder-lb"]` follows the live LB
    /// hosts. Default `wayfinder-lb`; `""` turns self-registration off.
    #[serde(default = "default_lb_register")]
    pub register: String,
    /// Serve HTTPS on `https` (PanteraS `HAPROXY_SSL`, which overrides this).
    /// Default `false`.
    #[serde(default)]
    pub ssl: bool,
    /// HTTPS listener, used when `ssl` is on. Default `0.0.0.0:443`; `LISTEN_IP`
    /// replaces the address.
    #[serde(default = "default_lb_https")]
    pub https: SocketAddr,
    /// PEM files for HTTPS, each holding a certificate chain and its private key
    /// (HAProxy's format), or directories whose `*.pem` files are all loaded. The
    /// certificate is chosen by SNI from the names it covers (wildcards too); the
    /// first one answers clients that send no or an unknown name. Files are
    /// re-read when they change. Default none: with `ssl` on, the lb serves a
    /// self-signed certificate of its own for this host's names (made once, kept
    /// in `state_dir`) until files are given here.
    #[serde(default)]
    pub certs: Vec<PathBuf>,
    /// Directory of the lb's own state: `selfsigned.pem` (0600), the
    /// certificate HTTPS uses while `certs` is empty; created 0700. Default `lb`,
    /// relative to the working directory.
    #[serde(default = "default_lb_state_dir")]
    pub state_dir: PathBuf,
    /// Stats listener: the status page at `/` and the counters as JSON at
    /// `/stats.json`. Default `0.0.0.0:81`; `""` turns it off; `LISTEN_IP` replaces
    /// the address.
    #[serde(default = "default_lb_stats")]
    pub stats: String,
    /// Proxy threads, each with its own event loop and backend connection pool;
    /// client connections are spread over them. Default `0` = one per CPU.
    #[serde(default)]
    pub workers: usize,
    /// Networks backend instances may be in (CIDR, e.g. `["172.17.0.0/16",
    /// "10.0.0.0/8"]`); an instance outside them is refused and shown on the
    /// status pages. Default none = any address. Whatever this says, the lb never
    /// connects to the appliance's own listeners (admin, lb, stats, dns, Consul).
    #[serde(default)]
    pub backend_networks: Vec<IpNet>,
    /// Ports a `haproxy_tcp=` tag may open, as `"N"` or `"N-M"` entries. Default
    /// `["1024-65535"]`; the ports of the appliance's own listeners are never taken.
    #[serde(default = "default_lb_tcp_ports")]
    pub tcp_ports: Vec<String>,
}

impl Default for LbSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

fn default_lb_http() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 80))
}
fn default_lb_tcp_ports() -> Vec<String> {
    vec!["1024-65535".into()]
}
fn default_lb_https() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}
fn default_lb_state_dir() -> PathBuf {
    PathBuf::from("lb")
}
fn default_lb_stats() -> String {
    "0.0.0.0:81".into()
}
fn default_lb_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_lb_io_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_lb_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_lb_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_lb_max_connections_per_source() -> usize {
    1000
}
fn default_lb_max_queued() -> usize {
    4096
}
fn default_lb_queue_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_lb_ready_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_lb_register() -> String {
    "wayfinder-lb".into()
}
fn default_lb_check_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_lb_eject_time() -> Duration {
    Duration::from_secs(10)
}

/// `[consul]`: the local Consul agent.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulSection {
    /// Consul's HTTP API. Default `127.0.0.1:8500`; `CONSUL_IP` replaces the address.
    #[serde(default = "default_consul_http")]
    pub http: SocketAddr,
    /// Consul DNS interfaces, tried in order (failover). Default `["127.0.0.1:8600"]`.
    #[serde(default = "default_consul_dns")]
    pub dns: Vec<SocketAddr>,
    /// Consul's DNS domain. Default `consul`; `CONSUL_DOMAIN` overrides.
    #[serde(default = "default_consul_domain")]
    pub domain: String,
    /// This host's datacenter. Default `dc1`; `CONSUL_DC` overrides.
    #[serde(default = "default_consul_datacenter")]
    pub datacenter: String,
    /// How often the whole catalog is read again, as a check on the changes the
    /// watches reported (anything they missed is corrected and counted). Default
    /// `5m`; at least `10s`.
    #[serde(default = "default_consul_resync", with = "humantime_serde")]
    pub resync: Duration,
}

/// How A/AAAA questions for `*.service.<consul domain>` are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsulARecords {
    /// Ask Consul: the instances' own addresses (the default).
    Consul,
    /// Answer with the load-balancer hosts (the wildcard targets), as PanteraS's
    /// dnsmasq `--address=/consul/HOST_IP` did; SRV still goes to Consul.
    Lb,
}

/// `[dns]`: the host DNS server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    /// Addresses to answer on, UDP and TCP on each. Default `["0.0.0.0:53"]`;
    /// `LISTEN_IP` replaces the address of each (ports kept).
    #[serde(default = "default_dns_listen")]
    pub listen: Vec<SocketAddr>,
    /// Client networks that get answers; everyone else gets REFUSED.
    /// Default: loopback and the RFC 1918 private ranges.
    #[serde(default = "default_dns_allow")]
    pub allow: Vec<IpNet>,
    /// Resolvers for every other name: resolv.conf paths and/or `IP[:port]` entries.
    /// Default: `/etc/resolv.conf.orig` if it exists, else `/etc/resolv.conf`
    /// (nameservers that are this server itself are skipped in the default only).
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Directory of RFC 1035 master files, one zone per file, served authoritatively.
    /// Default `zones`; a missing directory means no zones.
    #[serde(default = "default_zones_dir")]
    pub zones_dir: PathBuf,
    /// How often `zones_dir` is checked for changes (SIGHUP reloads at once). Default `1s`.
    #[serde(default = "default_zones_poll", with = "humantime_serde")]
    pub zones_poll: Duration,
    /// The wildcard domain answered with the LB hosts, e.g. `.apps.example.com`.
    /// Default: none; `HAPROXY_ADD_DOMAIN` overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wildcard_domain: Option<String>,
    /// Targets of wildcard answers: IP addresses and/or `consul:SERVICE` (the passing
    /// instances of SERVICE). Default: `HOST_IP` when set.
    #[serde(default)]
    pub wildcard_targets: Vec<String>,
    /// TTL of wildcard and LB answers. Default `0s` (as dnsmasq's `address=`).
    #[serde(default, with = "humantime_serde")]
    pub wildcard_ttl: Duration,
    /// `consul` (default) or `lb`; see [`ConsulARecords`].
    #[serde(default = "default_consul_a_records")]
    pub consul_a_records: ConsulARecords,
    /// Deadline for a Consul answer over all Consul addresses; SERVFAIL after it. Default `2s`.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub consul_timeout: Duration,
    /// Deadline for an upstream answer over all upstreams; stale or SERVFAIL after it. Default `2s`.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Bytes the answer cache may hold: answers, keys and an estimated 256 bytes
    /// of bookkeeping per entry; the least useful answers are evicted beyond it.
    /// Default `33554432` (32 MiB); `0` caches nothing.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// Replaced by `cache_bytes` (the cache was bounded by entries): still
    /// accepted so older files keep working, and ignored with a warning.
    #[serde(default, skip_serializing)]
    pub cache_size: Option<u64>,
    /// Upper bound on the TTL of a cached positive answer. Default `1d`.
    #[serde(default = "default_max_ttl", with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Upper bound on negative caching (RFC 2308). Default `1h`.
    #[serde(default = "default_negative_max_ttl", with = "humantime_serde")]
    pub negative_max_ttl: Duration,
    /// How long an expired answer may still be served when every upstream fails
    /// (RFC 8767). Default `1d`; `0s` disables serve-stale.
    #[serde(default = "default_serve_stale", with = "humantime_serde")]
    pub serve_stale: Duration,
    /// UDP worker threads (one SO_REUSEPORT socket each) per listen address.
    /// Default `0` = one per CPU.
    #[serde(default)]
    pub workers: usize,
    /// Queries being resolved at once (Consul, upstreams, zones); more are dropped
    /// and counted. Default `4096`.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// Questions forwarded at once to Consul, and to the upstreams (each its own
    /// bound; one socket per question); more are answered SERVFAIL (or stale)
    /// at once. Default `1024`.
    #[serde(default = "default_max_forwarded")]
    pub max_forwarded: usize,
    /// A TCP client connection that sends no question for this long is closed,
    /// and one that leaves an answer unread for this long is cut. Default `10s`.
    #[serde(default = "default_tcp_idle_timeout", with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// TCP connections one client (an IPv4 address, an IPv6 /64) may hold at
    /// once; more are reset at accept. Default `32`.
    #[serde(default = "default_tcp_connections_per_source")]
    pub tcp_connections_per_source: usize,
}

impl Default for ConsulSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

impl Default for DnsSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

fn default_consul_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8500))
}
fn default_consul_dns() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 8600))]
}
fn default_consul_domain() -> String {
    "consul".into()
}
fn default_consul_datacenter() -> String {
    "dc1".into()
}
fn default_consul_resync() -> Duration {
    Duration::from_secs(300)
}
fn default_dns_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 53))]
}
fn default_dns_allow() -> Vec<IpNet> {
    [
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
    ]
    .iter()
    .map(|n| n.parse().expect("valid default network"))
    .collect()
}
fn default_zones_dir() -> PathBuf {
    PathBuf::from("zones")
}
fn default_zones_poll() -> Duration {
    Duration::from_secs(1)
}
fn default_consul_a_records() -> ConsulARecords {
    ConsulARecords::Consul
}
fn default_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_cache_bytes() -> u64 {
    32 << 20
}
fn default_max_forwarded() -> usize {
    1024
}
fn default_tcp_connections_per_source() -> usize {
    32
}
fn default_max_ttl() -> Duration {
    Duration::from_secs(86400)
}
fn default_negative_max_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_serve_stale() -> Duration {
    Duration::from_secs(86400)
}
fn default_max_inflight() -> usize {
    4096
}
fn default_tcp_idle_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The validated configuration every component is built from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from (for messages).
    pub source: String,
    /// Consul connection.
    pub consul: ConsulConfig,
    /// DNS server.
    pub dns: DnsConfig,
    /// Load balancer.
    pub lb: LbConfig,
    /// This host's address (`HOST_IP`), when known.
    pub host_ip: Option<IpAddr>,
    /// The same with where it came from (given or guessed), when [`load`]
    /// resolved it.
    pub host_address: Option<crate::host_address::HostAddress>,
    /// Problems in the sections of components this command does not run
    /// (see [`Runs`]): not errors here, but `check` shows them.
    pub unchecked: Vec<ConfigError>,
    /// The supervisor (`wayfinder up`).
    pub supervisor: SupervisorConfig,
    /// WireGuard VPN.
    pub vpn: VpnConfig,
}

/// Validated `[lb]`.
#[derive(Debug, Clone)]
pub struct LbConfig {
    /// HTTP listener.
    pub http: SocketAddr,
    /// Host names answered with the landing page (lower-case, complete list).
    pub landing_hosts: Vec<String>,
    /// The wildcard domain (`HAPROXY_ADD_DOMAIN`) without the trailing dot, with a
    /// leading one: `.apps.example.com`.
    pub add_domain: Option<String>,
    /// Backend connect timeout.
    pub connect_timeout: Duration,
    /// Client inactivity timeout (HAProxy `timeout client`).
    pub client_timeout: Duration,
    /// Keep-alive / h2 session idle timeout.
    pub idle_timeout: Duration,
    /// TLS handshake and h2 preface timeout.
    pub handshake_timeout: Duration,
    /// Cap on client connections; `None` = derived from the open-file limit at start.
    pub max_connections: Option<usize>,
    /// Cap on client connections per source address.
    pub max_connections_per_source: usize,
    /// Cap on requests queued for a free instance.
    pub max_queued: usize,
    /// Backend response-start timeout.
    pub server_timeout: Duration,
    /// Passive ejection time.
    pub eject_time: Duration,
    /// Active check interval.
    pub check_interval: Duration,
    /// Active check timeout.
    pub check_timeout: Duration,
    /// Consul service name to register as, if any.
    pub register: Option<String>,
    /// Queue wait for a free instance.
    pub queue_timeout: Duration,
    /// Wait for the first routing table.
    pub ready_timeout: Duration,
    /// HTTPS listener and its certificate files, when HTTPS is on.
    pub https: Option<HttpsConfig>,
    /// Stats listener, unless turned off.
    pub stats: Option<SocketAddr>,
    /// Proxy threads (resolved: never 0).
    pub workers: usize,
    /// Networks backends may be in (empty: any).
    pub backend_networks: Vec<IpNet>,
    /// Ports `haproxy_tcp=` may open.
    pub tcp_ports: crate::lb::policy::PortRanges,
}

/// Validated HTTPS settings of the lb.
#[derive(Debug, Clone)]
pub struct HttpsConfig {
    /// HTTPS listener.
    pub listen: SocketAddr,
    /// PEM files and directories of PEM files; empty: the self-signed one.
    pub certs: Vec<PathBuf>,
    /// Where the self-signed certificate is kept.
    pub state_dir: PathBuf,
}

/// Validated `[consul]`.
#[derive(Debug, Clone)]
pub struct ConsulConfig {
    /// Consul HTTP API address.
    pub http: SocketAddr,
    /// Consul DNS addresses in failover order.
    pub dns: Vec<SocketAddr>,
    /// Consul DNS domain as a fully qualified, lower-case name (`consul.`).
    pub domain: Name,
    /// Datacenter.
    pub datacenter: String,
    /// Period of the full re-read of the catalog.
    pub resync: Duration,
}

/// A wildcard answer target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WildcardTarget {
    /// A fixed address.
    Static(IpAddr),
    /// The addresses of the passing instances of a Consul service.
    ConsulService(String),
}

/// Validated `[dns]`.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Listen addresses (UDP and TCP on each).
    pub listen: Vec<SocketAddr>,
    /// Allowed client networks.
    pub allow: Vec<IpNet>,
    /// Upstream resolvers, in order.
    pub upstreams: Vec<SocketAddr>,
    /// Zone directory.
    pub zones_dir: PathBuf,
    /// Zone directory poll interval.
    pub zones_poll: Duration,
    /// The wildcard domain apex (`apps.example.com.`), if any.
    pub wildcard_domain: Option<Name>,
    /// Wildcard/LB answer targets.
    pub wildcard_targets: Vec<WildcardTarget>,
    /// TTL of wildcard answers, seconds.
    pub wildcard_ttl: u32,
    /// A/AAAA policy for Consul service names.
    pub consul_a_records: ConsulARecords,
    /// Consul deadline.
    pub consul_timeout: Duration,
    /// Upstream deadline.
    pub upstream_timeout: Duration,
    /// Cache capacity in bytes.
    pub cache_bytes: u64,
    /// Positive TTL cap, seconds.
    pub max_ttl: u32,
    /// Negative TTL cap, seconds.
    pub negative_max_ttl: u32,
    /// Serve-stale window.
    pub serve_stale: Duration,
    /// UDP workers per listen address (resolved: never 0).
    pub workers: usize,
    /// Bound on queries being resolved at once.
    pub max_inflight: usize,
    /// Bound on questions on the wire, per forwarder.
    pub max_forwarded: usize,
    /// TCP idle and write timeout.
    pub tcp_idle_timeout: Duration,
    /// TCP connections per client source.
    pub tcp_connections_per_source: usize,
}

/// Reads `path` (or the default file), applies `env`, validates what `runs`
/// needs (see [`Runs`]).
///
/// A missing default file means "all defaults"; a missing `-c` file is an error.
pub fn load(path: Option<&Path>, env: &dyn Env, runs: Runs) -> Result<(FileConfig, Config), ConfigError> {
    let (text, source) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                file: p.display().to_string(),
                key: "(file)".into(),
                problem: format!("could not read the config file: {e}"),
            })?;
            (text, p.display().to_string())
        }
        None => match std::fs::read_to_string(DEFAULT_CONFIG_PATH) {
            Ok(text) => (text, DEFAULT_CONFIG_PATH.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), "(built-in defaults)".to_string()),
            Err(e) => {
                return Err(ConfigError {
                    file: DEFAULT_CONFIG_PATH.into(),
                    key: "(file)".into(),
                    problem: format!("could not read the config file: {e}"),
                });
            }
        },
    };
    // The host address first: a guessed one counts as HOST_IP everywhere.
    let host = match given_host_address(env)? {
        Some(given) => Some(given),
        None => crate::host_address::guess(env),
    };
    match &host {
        Some(h) if h.guessed() => {
            tracing::info!(ip = %h.ip, "host address {} ({}); set IP or HOST_IP to choose another", h.ip, h.from);
        }
        Some(_) => {}
        None => tracing::info!(
            "no host address: HOST_IP and IP are unset and none could be guessed (the host name is loopback, no DOCKER_HOST, no private interface address)"
        ),
    }
    let env = env::Panteras::new(env, host.as_ref().map(|h| h.ip));
    let (file, _) = parse_text(&text, &source, &env)?;
    let config = with_host(validate_for(&file, &source, runs)?, host);
    Ok((file, config))
}

/// `config` validated again for what `runs` needs (`up` and `check`, once the
/// role says what starts), with the host address [`load`] found.
pub fn recheck(file: &FileConfig, config: &Config, runs: Runs) -> Result<Config, ConfigError> {
    Ok(with_host(
        validate_for(file, &config.source, runs)?,
        config.host_address.clone(),
    ))
}

/// `config` with this host's address, which is also a landing-page host.
fn with_host(mut config: Config, host: Option<crate::host_address::HostAddress>) -> Config {
    if let Some(h) = &host {
        config.host_ip = Some(h.ip);
        config.lb.landing_hosts.push(h.ip.to_string());
    }
    config.host_address = host;
    config
}

/// `HOST_IP`, else PanteraS's `IP`, when one is set.
fn given_host_address(env: &dyn Env) -> Result<Option<crate::host_address::HostAddress>, ConfigError> {
    use crate::host_address::{HostAddress, Origin};
    for var in [env::HOST_IP, env::IP] {
        if let Some(ip) = env_ip(env, var)? {
            return Ok(Some(HostAddress {
                ip,
                from: Origin::Variable(var),
            }));
        }
    }
    Ok(None)
}

/// Parses TOML text and applies environment overrides (`IP` included; nothing
/// is guessed: that is [`load`]'s).
pub fn parse(text: &str, source: &str, env: &dyn Env) -> Result<FileConfig, ConfigError> {
    parse_with_host(text, source, env).map(|(file, _)| file)
}

/// [`parse`], also returning the host address (`HOST_IP` or `IP`, which have
/// no key of their own).
pub fn parse_with_host(text: &str, source: &str, env: &dyn Env) -> Result<(FileConfig, Option<IpAddr>), ConfigError> {
    let host = given_host_address(env)?.map(|h| h.ip);
    parse_text(text, source, &env::Panteras::new(env, host))
}

/// Parses TOML text and applies `env` (already the PanteraS view).
fn parse_text(text: &str, source: &str, env: &dyn Env) -> Result<(FileConfig, Option<IpAddr>), ConfigError> {
    let mut file: FileConfig = toml::from_str(text).map_err(|e| ConfigError {
        file: source.to_string(),
        key: toml_error_key(&e, text),
        problem: e.message().to_string()
            + &e.span()
                .map(|s| format!(" (line {})", line_of(text, s.start)))
                .unwrap_or_default(),
    })?;
    apply_env(&mut file, env)?;
    Ok((file, env_ip(env, env::HOST_IP)?))
}

/// The dotted key a TOML error points at, read from the text around its span
/// (`[dns]` … `consul_timeout = "soon"` → `dns.consul_timeout`).
fn toml_error_key(e: &toml::de::Error, text: &str) -> String {
    let Some(span) = e.span() else {
        return "(syntax)".to_string();
    };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let section = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    match (line.split_once('='), section) {
        (Some((key, _)), Some(section)) => format!("{section}.{}", key.trim()),
        (Some((key, _)), None) => key.trim().to_string(),
        (None, Some(section)) if line.trim().starts_with('[') => section,
        (None, _) => line.trim().trim_matches(|c| c == '[' || c == ']').to_string(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn env_error(var: &str, problem: String) -> ConfigError {
    ConfigError {
        file: "environment".into(),
        key: var.into(),
        problem,
    }
}

fn env_ip(env: &dyn Env, var: &str) -> Result<Option<IpAddr>, ConfigError> {
    env.get(var)
        .map(|v| {
            v.trim()
                .parse::<IpAddr>()
                .map_err(|e| env_error(var, format!("`{v}` is not an IP address: {e}")))
        })
        .transpose()
}

/// Applies the PanteraS variables (see [`crate::env::VARS`]) over the file.
fn apply_env(file: &mut FileConfig, env: &dyn Env) -> Result<(), ConfigError> {
    if let Some(ip) = env_ip(env, env::LISTEN_IP)? {
        for addr in &mut file.dns.listen {
            addr.set_ip(ip);
        }
        file.lb.http.set_ip(ip);
        file.lb.https.set_ip(ip);
        file.vpn.listen.set_ip(ip);
        if let Ok(mut stats) = file.lb.stats.trim().parse::<SocketAddr>() {
            stats.set_ip(ip);
            file.lb.stats = stats.to_string();
        }
    }
    if let Some(ssl) = env.get(env::HAPROXY_SSL) {
        file.lb.ssl = match ssl.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            other => return Err(env_error(env::HAPROXY_SSL, format!("`{other}` is not true or false"))),
        };
    }
    if let Some(ip) = env_ip(env, env::CONSUL_IP)? {
        file.consul.http.set_ip(ip);
        let port = file.consul.dns.first().map_or(8600, |a| a.port());
        file.consul.dns = vec![SocketAddr::new(ip, port)];
    }
    if let Some(domain) = env.get(env::CONSUL_DOMAIN) {
        file.consul.domain = domain;
    }
    if let Some(dc) = env.get(env::CONSUL_DC) {
        file.consul.datacenter = dc;
    }
    if let Some(domain) = env.get(env::HAPROXY_ADD_DOMAIN) {
        file.dns.wildcard_domain = Some(domain);
    }
    if let Some(token) = env.get(env::WAYFINDER_ADMIN_TOKEN) {
        file.supervisor.token = token;
    }
    if let Some(ip) = env_ip(env, env::HOST_IP)?
        && file.dns.wildcard_targets.is_empty()
    {
        file.dns.wildcard_targets = vec![ip.to_string()];
    }
    // START_VPN switches the whole vpn, not only `up`'s unit: with it on, the dns
    // must answer on the tunnel address too (see `vpn_dns`).
    if let Some(on) = env.get(env::START_VPN) {
        file.vpn.enabled = match on.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            other => return Err(env_error(env::START_VPN, format!("`{other}` is not true or false"))),
        };
    }
    Ok(())
}

/// Parses a domain written by a person (`.apps.example.com`, `consul`) into a
/// fully qualified lower-case name.
pub fn parse_domain(text: &str) -> Result<Name, String> {
    let trimmed = text.trim().trim_start_matches('.');
    if trimmed.is_empty() || trimmed == "." {
        return Err("must be a domain name such as `apps.example.com`".into());
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| format!("`{text}` is not a domain: {e}"))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

/// Turns the (overridden) file into a [`Config`], checking everything that can be
/// checked before binding sockets, for every component.
pub fn validate(file: &FileConfig, source: &str) -> Result<Config, ConfigError> {
    validate_for(file, source, Runs::ALL)
}

/// Which components a command runs: their sections are checked strictly; the
/// others' problems are kept in [`Config::unchecked`] (shown by `check`,
/// logged by `up`) and their defaults stand in, so `wayfinder lb` never fails
/// on `[dns]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runs {
    /// The dns component.
    pub dns: bool,
    /// The lb component.
    pub lb: bool,
    /// The vpn component (or a peer command).
    pub vpn: bool,
    /// The supervisor (`up`, `status`).
    pub supervisor: bool,
}

impl Runs {
    /// Everything (what `validate` checks).
    pub const ALL: Runs = Runs {
        dns: true,
        lb: true,
        vpn: true,
        supervisor: true,
    };
    /// Nothing but `[consul]` (the first look of `up` and `check`, before the
    /// role says what starts).
    pub const NONE: Runs = Runs {
        dns: false,
        lb: false,
        vpn: false,
        supervisor: false,
    };
}

/// A section's validated config when its component runs; when it does not, its
/// problem is kept in `unchecked` and `fallback` stands in.
fn checked<T>(
    runs: bool,
    result: Result<T, ConfigError>,
    fallback: impl FnOnce() -> Result<T, ConfigError>,
    unchecked: &mut Vec<ConfigError>,
) -> Result<T, ConfigError> {
    match result {
        Ok(value) => Ok(value),
        Err(e) if runs => Err(e),
        Err(e) => {
            let value = fallback()?;
            unchecked.push(e);
            Ok(value)
        }
    }
}

/// [`validate`] for a command that runs `runs`.
pub fn validate_for(file: &FileConfig, source: &str, runs: Runs) -> Result<Config, ConfigError> {
    let err = |key: &str, problem: String| ConfigError {
        file: source.to_string(),
        key: key.to_string(),
        problem,
    };
    let mut unchecked = Vec::new();
    let consul = validate_consul(&file.consul, &err)?;
    let vpn = checked(
        runs.vpn,
        validate_vpn(&file.vpn, &err),
        || validate_vpn(&VpnSection::default(), &err),
        &mut unchecked,
    )?;
    let dns = checked(
        runs.dns,
        validate_dns(&file.dns, &consul, &vpn, &err),
        || Ok(DnsConfig::inactive(&file.dns)),
        &mut unchecked,
    )?;
    // The wildcard domain is the lb's too (HAPROXY_ADD_DOMAIN).
    let wildcard_domain = checked(
        runs.lb,
        file.dns
            .wildcard_domain
            .as_deref()
            .map(parse_domain)
            .transpose()
            .map_err(|p| err("dns.wildcard_domain", p)),
        || Ok(None),
        &mut unchecked,
    )?;
    let lb = checked(
        runs.lb,
        validate_lb(&file.lb, wildcard_domain.as_ref(), &err),
        || validate_lb(&LbSection::default(), None, &err),
        &mut unchecked,
    )?;
    let supervisor = checked(
        runs.supervisor,
        validate_supervisor(&file.supervisor, &err),
        || validate_supervisor(&SupervisorSection::default(), &err),
        &mut unchecked,
    )?;
    unchecked.dedup_by(|a, b| a.to_string() == b.to_string());
    Ok(Config {
        source: source.to_string(),
        lb,
        host_ip: None,
        host_address: None,
        supervisor,
        vpn,
        consul,
        dns,
        unchecked,
    })
}

/// Validates `[consul]`.
fn validate_consul(
    consul: &ConsulSection,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ConsulConfig, ConfigError> {
    let ConsulSection {
        http,
        dns: consul_dns,
        domain,
        datacenter,
        resync,
    } = consul;
    if *resync < Duration::from_secs(10) {
        return Err(err("consul.resync", format!("{resync:?} is too often: at least 10s")));
    }
    if consul_dns.is_empty() {
        return Err(err("consul.dns", "needs at least one address".into()));
    }
    if datacenter.trim().is_empty() || datacenter.contains('.') {
        return Err(err(
            "consul.datacenter",
            format!("`{datacenter}` is not a datacenter name"),
        ));
    }
    let consul = ConsulConfig {
        http: *http,
        dns: consul_dns.clone(),
        domain: parse_domain(domain).map_err(|p| err("consul.domain", p))?,
        datacenter: datacenter.clone(),
        resync: *resync,
    };
    Ok(consul)
}

impl DnsConfig {
    /// The dns settings of a command that does not run the dns, when `[dns]`
    /// does not validate: its listen addresses as written (other components
    /// must know them), everything else off or at its default.
    fn inactive(dns: &DnsSection) -> Self {
        let secs = |d: &Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        DnsConfig {
            listen: dns.listen.clone(),
            allow: dns.allow.clone(),
            upstreams: Vec::new(),
            zones_dir: dns.zones_dir.clone(),
            zones_poll: dns.zones_poll,
            wildcard_domain: None,
            wildcard_targets: Vec::new(),
            wildcard_ttl: secs(&dns.wildcard_ttl),
            consul_a_records: ConsulARecords::Consul,
            consul_timeout: dns.consul_timeout,
            upstream_timeout: dns.upstream_timeout,
            cache_bytes: dns.cache_bytes,
            max_ttl: secs(&dns.max_ttl),
            negative_max_ttl: secs(&dns.negative_max_ttl),
            serve_stale: dns.serve_stale,
            workers: dns.workers.max(1),
            max_inflight: dns.max_inflight.max(1),
            max_forwarded: dns.max_forwarded.max(1),
            tcp_idle_timeout: dns.tcp_idle_timeout,
            tcp_connections_per_source: dns.tcp_connections_per_source.max(1),
        }
    }
}

/// Validates `[dns]`: `consul` for the domain overlap, `vpn` for the tunnel
/// address it also answers on.
fn validate_dns(
    dns: &DnsSection,
    consul: &ConsulConfig,
    vpn: &VpnConfig,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<DnsConfig, ConfigError> {
    let DnsSection {
        listen,
        allow,
        upstreams,
        zones_dir,
        zones_poll,
        wildcard_domain,
        wildcard_targets,
        wildcard_ttl,
        consul_a_records,
        consul_timeout,
        upstream_timeout,
        cache_bytes,
        cache_size,
        max_ttl,
        negative_max_ttl,
        serve_stale,
        workers,
        max_inflight,
        max_forwarded,
        tcp_idle_timeout,
        tcp_connections_per_source,
    } = dns;

    if listen.is_empty() {
        return Err(err("dns.listen", "needs at least one address".into()));
    }
    // With the vpn on, laptops ask the dns on the tunnel address (see `vpn_dns`).
    let (listen, allow) = &vpn_dns(vpn, listen, allow);
    for (key, d) in [
        ("dns.consul_timeout", consul_timeout),
        ("dns.upstream_timeout", upstream_timeout),
        ("dns.zones_poll", zones_poll),
        ("dns.tcp_idle_timeout", tcp_idle_timeout),
    ] {
        if d.is_zero() {
            return Err(err(key, "must be longer than 0s".into()));
        }
    }
    for (key, n) in [
        ("dns.max_inflight", max_inflight),
        ("dns.max_forwarded", max_forwarded),
        ("dns.tcp_connections_per_source", tcp_connections_per_source),
    ] {
        if *n == 0 {
            return Err(err(key, "must be at least 1".into()));
        }
    }

    let wildcard_domain = wildcard_domain
        .as_deref()
        .map(parse_domain)
        .transpose()
        .map_err(|p| err("dns.wildcard_domain", p))?;
    if let Some(w) = &wildcard_domain
        && (consul.domain.zone_of(w) || w.zone_of(&consul.domain))
    {
        return Err(err(
            "dns.wildcard_domain",
            format!("`{w}` overlaps the Consul domain `{}`", consul.domain),
        ));
    }
    let wildcard_targets = wildcard_targets
        .iter()
        .map(|t| parse_target(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|p| err("dns.wildcard_targets", p))?;
    if wildcard_domain.is_some() && wildcard_targets.is_empty() {
        return Err(err(
            "dns.wildcard_targets",
            "a wildcard_domain needs targets: set dns.wildcard_targets, or HOST_IP or IP (no host address was given or could be guessed)".into(),
        ));
    }
    if *consul_a_records == ConsulARecords::Lb && wildcard_targets.is_empty() {
        return Err(err(
            "dns.consul_a_records",
            "`lb` answers with the LB hosts: set dns.wildcard_targets, or HOST_IP or IP (no host address was given or could be guessed)".into(),
        ));
    }

    let explicit = !upstreams.is_empty();
    let entries: Vec<String> = if explicit {
        upstreams.clone()
    } else if Path::new("/etc/resolv.conf.orig").exists() {
        vec!["/etc/resolv.conf.orig".into()]
    } else {
        vec!["/etc/resolv.conf".into()]
    };
    let mut resolved = Vec::new();
    for entry in &entries {
        for addr in parse_upstream(entry).map_err(|p| err("dns.upstreams", p))? {
            if let Some(own) = listen.iter().find(|l| crate::listeners::reaches(**l, addr)) {
                if explicit {
                    return Err(err(
                        "dns.upstreams",
                        format!(
                            "upstream {addr} (from `{entry}`) is this server's own listen address {own}: \
                             queries would loop; point upstreams at the host's real resolvers"
                        ),
                    ));
                }
                tracing::warn!(%addr, entry, "skipping upstream that is this server itself");
                continue;
            }
            if !resolved.contains(&addr) {
                resolved.push(addr);
            }
        }
    }
    if resolved.is_empty() {
        return Err(err(
            "dns.upstreams",
            format!("no usable upstream resolver in {entries:?}"),
        ));
    }

    let workers = if *workers == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        *workers
    };
    if let Some(entries) = cache_size {
        tracing::warn!(
            entries,
            cache_bytes = *cache_bytes,
            "dns.cache_size is replaced by dns.cache_bytes (the cache is bounded by bytes); ignored"
        );
    }
    let secs = |d: &Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    Ok(DnsConfig {
        listen: listen.clone(),
        allow: allow.clone(),
        upstreams: resolved,
        zones_dir: zones_dir.clone(),
        zones_poll: *zones_poll,
        wildcard_domain,
        wildcard_targets,
        wildcard_ttl: secs(wildcard_ttl),
        consul_a_records: *consul_a_records,
        consul_timeout: *consul_timeout,
        upstream_timeout: *upstream_timeout,
        cache_bytes: *cache_bytes,
        max_ttl: secs(max_ttl),
        negative_max_ttl: secs(negative_max_ttl),
        serve_stale: *serve_stale,
        workers,
        max_inflight: *max_inflight,
        max_forwarded: *max_forwarded,
        tcp_idle_timeout: *tcp_idle_timeout,
        tcp_connections_per_source: *tcp_connections_per_source,
    })
}

fn validate_lb(
    lb: &LbSection,
    wildcard_domain: Option<&Name>,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<LbConfig, ConfigError> {
    let LbSection {
        http,
        landing_hosts,
        connect_timeout,
        client_timeout,
        idle_timeout,
        handshake_timeout,
        max_connections,
        max_connections_per_source,
        server_timeout,
        eject_time,
        check_interval,
        check_timeout,
        queue_timeout,
        max_queued,
        ready_timeout,
        register,
        ssl,
        https,
        certs,
        state_dir,
        stats,
        workers,
        backend_networks,
        tcp_ports,
    } = lb;
    let tcp_ports = crate::lb::policy::PortRanges::parse(tcp_ports).map_err(|p| err("lb.tcp_ports", p))?;
    if state_dir.as_os_str().is_empty() {
        return Err(err("lb.state_dir", "must name a directory".into()));
    }
    let https = ssl.then(|| HttpsConfig {
        listen: *https,
        certs: certs.clone(),
        state_dir: state_dir.clone(),
    });
    let stats = match stats.trim() {
        "" => None,
        text => Some(
            text.parse::<SocketAddr>()
                .map_err(|e| err("lb.stats", format!("`{text}` is not an address with a port: {e}")))?,
        ),
    };
    let register = register.trim();
    if !register
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(err("lb.register", format!("`{register}` is not a Consul service name")));
    }
    for (key, d) in [
        ("lb.check_interval", check_interval),
        ("lb.check_timeout", check_timeout),
        ("lb.connect_timeout", connect_timeout),
        ("lb.client_timeout", client_timeout),
        ("lb.idle_timeout", idle_timeout),
        ("lb.handshake_timeout", handshake_timeout),
        ("lb.server_timeout", server_timeout),
    ] {
        if d.is_zero() {
            return Err(err(key, "must be longer than 0s".into()));
        }
    }
    for (key, n) in [
        ("lb.max_connections_per_source", max_connections_per_source),
        ("lb.max_queued", max_queued),
    ] {
        if *n == 0 {
            return Err(err(key, "must be at least 1".into()));
        }
    }
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()];
    if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        hosts.push(name.trim().to_ascii_lowercase());
    }
    for h in landing_hosts {
        if h.trim().is_empty() || h.contains(char::is_whitespace) {
            return Err(err("lb.landing_hosts", format!("`{h}` is not a host name")));
        }
        hosts.push(h.trim().to_ascii_lowercase());
    }
    hosts.sort();
    hosts.dedup();
    Ok(LbConfig {
        http: *http,
        landing_hosts: hosts,
        add_domain: wildcard_domain.map(|n| format!(".{}", n.to_string().trim_end_matches('.'))),
        connect_timeout: *connect_timeout,
        client_timeout: *client_timeout,
        idle_timeout: *idle_timeout,
        handshake_timeout: *handshake_timeout,
        max_connections: (*max_connections > 0).then_some(*max_connections),
        max_connections_per_source: *max_connections_per_source,
        max_queued: *max_queued,
        server_timeout: *server_timeout,
        eject_time: *eject_time,
        check_interval: *check_interval,
        check_timeout: *check_timeout,
        register: (!register.is_empty()).then(|| register.to_string()),
        queue_timeout: *queue_timeout,
        ready_timeout: *ready_timeout,
        https,
        stats,
        workers: if *workers == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            *workers
        },
        backend_networks: backend_networks.iter().map(IpNet::trunc).collect(),
        tcp_ports,
    })
}

/// `[vpn]`: the WireGuard server that gives laptops the platform's networks and DNS.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VpnSection {
    /// Run the vpn (read by the supervisor, which also honours `START_VPN`), and let
    /// the dns answer on the tunnel address. Default `false`.
    #[serde(default)]
    pub enabled: bool,
    /// UDP address WireGuard listens on. Default `0.0.0.0:51820`; `LISTEN_IP`
    /// replaces the address.
    #[serde(default = "default_vpn_listen")]
    pub listen: SocketAddr,
    /// Name of the TUN interface (at most 15 bytes). Default `wf0`.
    #[serde(default = "default_vpn_interface")]
    pub interface: String,
    /// The appliance's tunnel address with the prefix of the subnet peers get their
    /// addresses from. Default `10.200.0.1/24`.
    #[serde(default = "default_vpn_address")]
    pub address: String,
    /// Directory of the server key (`server.key`) and the peer registry
    /// (`peers.toml`), created 0700. Default `vpn`.
    #[serde(default = "default_vpn_dir")]
    pub dir: PathBuf,
    /// Public `host:port` written into client configs. Default `HOST_IP:<listen port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Networks reachable through the tunnel (e.g. the docker bridge networks),
    /// routed on the clients and forwarded by the host kernel. Besides the
    /// tunnel address, they are all a peer reaches, whatever its own config
    /// says (an nft table of the vpn's own drops the rest). Default none.
    #[serde(default)]
    pub routes: Vec<String>,
    /// MTU of the TUN interface and of client configs. Default `1420`.
    #[serde(default = "default_vpn_mtu")]
    pub mtu: u16,
    /// Masquerade tunnel traffic leaving towards `routes` (and only those, in
    /// the vpn's nft table), for networks that have no route back to the
    /// tunnel subnet. Default `false`.
    #[serde(default)]
    pub masquerade: bool,
}

impl Default for VpnSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

fn default_vpn_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 51820))
}
fn default_vpn_interface() -> String {
    "wf0".into()
}
fn default_vpn_address() -> String {
    "10.200.0.1/24".into()
}
fn default_vpn_dir() -> PathBuf {
    PathBuf::from("vpn")
}
fn default_vpn_mtu() -> u16 {
    1420
}

/// Validated `[vpn]`.
#[derive(Debug, Clone)]
pub struct VpnConfig {
    /// Whether the vpn (and the dns on the tunnel address) is on.
    pub enabled: bool,
    /// UDP listen address.
    pub listen: SocketAddr,
    /// TUN interface name.
    pub interface: String,
    /// The appliance's tunnel address and the peer subnet's prefix.
    pub address: ipnet::Ipv4Net,
    /// State directory (key, peers).
    pub dir: PathBuf,
    /// Client-config endpoint, when configured (else `HOST_IP:<port>` at use).
    pub endpoint: Option<String>,
    /// Networks routed through the tunnel.
    pub routes: Vec<IpNet>,
    /// Tunnel MTU.
    pub mtu: u16,
    /// Masquerade towards `routes`.
    pub masquerade: bool,
}

impl VpnConfig {
    /// The tunnel subnet (`10.200.0.0/24`).
    pub fn subnet(&self) -> ipnet::Ipv4Net {
        self.address.trunc()
    }
}

fn validate_vpn(vpn: &VpnSection, err: &dyn Fn(&str, String) -> ConfigError) -> Result<VpnConfig, ConfigError> {
    let VpnSection {
        enabled,
        listen,
        interface,
        address,
        dir,
        endpoint,
        routes,
        mtu,
        masquerade,
    } = vpn;
    let name_ok = !interface.is_empty()
        && interface.len() <= 15
        && interface
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !name_ok {
        return Err(err(
            "vpn.interface",
            format!("`{interface}` is not an interface name (1-15 letters, digits, `-`, `_`, `.`)"),
        ));
    }
    let address: ipnet::Ipv4Net = address.trim().parse().map_err(|_| {
        err(
            "vpn.address",
            format!("`{address}` is not an IPv4 address with a prefix, such as `10.200.0.1/24`"),
        )
    })?;
    if address.prefix_len() > 30 || address.addr() == address.network() || address.addr() == address.broadcast() {
        return Err(err(
            "vpn.address",
            format!(
                "`{address}` must be a host address inside a subnet of at least 4 addresses (prefix /30 or shorter)"
            ),
        ));
    }
    let routes = routes
        .iter()
        .map(|r| {
            r.trim()
                .parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| err("vpn.routes", format!("`{r}` is not a network such as `172.17.0.0/16`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(e) = endpoint {
        let ok = e
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
        if !ok {
            return Err(err("vpn.endpoint", format!("`{e}` is not `host:port`")));
        }
    }
    if !(576..=9000).contains(mtu) {
        return Err(err("vpn.mtu", format!("{mtu} is outside 576..=9000")));
    }
    Ok(VpnConfig {
        enabled: *enabled,
        listen: *listen,
        interface: interface.clone(),
        address,
        dir: dir.clone(),
        endpoint: endpoint.clone(),
        routes,
        mtu: *mtu,
        masquerade: *masquerade,
    })
}

/// The dns listen and allow lists with the vpn taken into account: when it is on,
/// the tunnel address (on the port of the first listener) is added unless a
/// listener already covers it, and the tunnel subnet is allowed.
fn vpn_dns(vpn: &VpnConfig, listen: &[SocketAddr], allow: &[IpNet]) -> (Vec<SocketAddr>, Vec<IpNet>) {
    let (mut listen, mut allow) = (listen.to_vec(), allow.to_vec());
    if vpn.enabled {
        let port = listen.first().map_or(53, |l| l.port());
        let tunnel = SocketAddr::new(IpAddr::V4(vpn.address.addr()), port);
        let covered = listen
            .iter()
            .any(|l| l.port() == port && (l.ip() == tunnel.ip() || l.ip() == IpAddr::from([0, 0, 0, 0])));
        if !covered {
            listen.push(tunnel);
        }
        let subnet = IpNet::V4(vpn.subnet());
        if !allow.iter().any(|a| a.contains(&subnet)) {
            allow.push(subnet);
        }
    }
    (listen, allow)
}

fn parse_target(text: &str) -> Result<WildcardTarget, String> {
    let text = text.trim();
    if let Some(service) = text.strip_prefix("consul:") {
        let ok = !service.is_empty()
            && service
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        return if ok {
            Ok(WildcardTarget::ConsulService(service.to_string()))
        } else {
            Err(format!("`{text}`: `consul:` needs a service name"))
        };
    }
    text.parse::<IpAddr>()
        .map(WildcardTarget::Static)
        .map_err(|_| format!("`{text}` is neither an IP address nor `consul:SERVICE`"))
}

/// An upstream entry: `IP`, `IP:port`, `[v6]:port`, or a resolv.conf path.
fn parse_upstream(entry: &str) -> Result<Vec<SocketAddr>, String> {
    let entry = entry.trim();
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, 53)]);
    }
    if entry.starts_with('/') || entry.starts_with('.') {
        let text = std::fs::read_to_string(entry).map_err(|e| format!("could not read resolv.conf `{entry}`: {e}"))?;
        let servers = parse_resolv_conf(&text);
        if servers.is_empty() {
            return Err(format!("`{entry}` has no `nameserver` lines"));
        }
        return Ok(servers);
    }
    Err(format!(
        "`{entry}` is neither an `IP[:port]` nor a resolv.conf path (paths start with `/`)"
    ))
}

/// The `nameserver` addresses of a resolv.conf, port 53 (scoped v6 addresses kept
/// without their zone, which resolv.conf users rarely need on a server).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip = words.next()?.split('%').next()?.parse::<IpAddr>().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn check(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let file = parse(text, "test.toml", &env(vars))?;
        validate(&file, "test.toml")
    }

    const MIN: &str = "[dns]\nupstreams = [\"192.0.2.1\"]\n";

    #[test]
    fn defaults_are_documented_values() {
        let c = check(MIN, &[]).unwrap();
        assert_eq!(c.dns.listen, vec!["0.0.0.0:53".parse().unwrap()]);
        assert_eq!(c.consul.dns, vec!["127.0.0.1:8600".parse().unwrap()]);
        assert_eq!(c.consul.domain.to_string(), "consul.");
        assert_eq!(c.dns.upstreams, vec!["192.0.2.1:53".parse().unwrap()]);
        assert_eq!(c.dns.consul_timeout, Duration::from_secs(2));
        assert!(c.dns.workers >= 1);
    }

    #[test]
    fn lb_https_and_stats_listeners() {
        let c = check(MIN, &[]).unwrap();
        assert!(c.lb.https.is_none(), "HTTPS is off by default");
        assert_eq!(c.lb.stats, Some("0.0.0.0:81".parse().unwrap()));

        // HTTPS without certificate files: the self-signed one, kept in state_dir.
        let c = check(&format!("{MIN}[lb]\nssl = true\n"), &[]).unwrap();
        let https = c.lb.https.expect("on");
        assert!(https.certs.is_empty());
        assert_eq!(https.state_dir, PathBuf::from("lb"));
        let c = check(MIN, &[("HAPROXY_SSL", "true")]).unwrap();
        assert!(c.lb.https.is_some(), "HAPROXY_SSL turns HTTPS on");
        let e = check(&format!("{MIN}[lb]\nssl = true\nstate_dir = \"\"\n"), &[]).unwrap_err();
        assert_eq!(e.key, "lb.state_dir", "{e}");
        let e = check(MIN, &[("HAPROXY_SSL", "maybe")]).unwrap_err();
        assert!(e.to_string().contains("HAPROXY_SSL"), "{e}");

        let with_certs = format!("{MIN}[lb]\ncerts = [\"/etc/ssl/site.pem\"]\nstats = \"\"\n");
        let c = check(&with_certs, &[("HAPROXY_SSL", "true"), ("LISTEN_IP", "10.1.2.3")]).unwrap();
        let https = c.lb.https.expect("on");
        assert_eq!(https.listen, "10.1.2.3:443".parse().unwrap());
        assert_eq!(https.certs, vec![PathBuf::from("/etc/ssl/site.pem")]);
        assert_eq!(c.lb.stats, None, "\"\" turns the stats listener off");
        let c = check(
            &format!("{MIN}[lb]\nssl = true\ncerts = [\"x.pem\"]\n"),
            &[("HAPROXY_SSL", "false")],
        )
        .unwrap();
        assert!(c.lb.https.is_none(), "HAPROXY_SSL=false wins over the file");
        let c = check(MIN, &[("LISTEN_IP", "10.1.2.3")]).unwrap();
        assert_eq!(c.lb.stats, Some("10.1.2.3:81".parse().unwrap()));

        let e = check(&format!("{MIN}[lb]\nstats = \"81\"\n"), &[]).unwrap_err();
        assert_eq!(e.key, "lb.stats", "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected_in_every_table() {
        for text in [
            "bogus = 1",
            "[consul]\nbogus = 1",
            "[dns]\nbogus = 1",
            "[nope]\n",
            "[supervisor]\nbogus = 1",
            "[supervisor.consul]\nbogus = 1",
            "[[supervisor.program]]\nname = \"a\"\ncommand = \"b\"\nbogus = 1",
        ] {
            let e = check(text, &[]).unwrap_err();
            assert!(e.problem.contains("unknown"), "{text}: {e}");
        }
        let e = check("[dns]\nlistne = []", &[]).unwrap_err();
        assert_eq!(e.file, "test.toml");
        assert!(e.to_string().contains("listne"), "{e}");
    }

    #[test]
    fn panteras_environment_overrides_the_file() {
        let c = check(
            "[dns]\nlisten = [\"127.0.0.1:5353\"]\nupstreams = [\"192.0.2.1\"]\n",
            &[
                ("LISTEN_IP", "10.1.1.1"),
                ("CONSUL_IP", "10.1.1.2"),
                ("CONSUL_DOMAIN", "disco"),
                ("CONSUL_DC", "eu1"),
                ("HAPROXY_ADD_DOMAIN", ".apps.example.com"),
                ("HOST_IP", "10.1.1.3"),
            ],
        )
        .unwrap();
        assert_eq!(c.dns.listen, vec!["10.1.1.1:5353".parse().unwrap()]);
        assert_eq!(c.consul.http, "10.1.1.2:8500".parse().unwrap());
        assert_eq!(c.consul.dns, vec!["10.1.1.2:8600".parse().unwrap()]);
        assert_eq!(c.consul.domain.to_string(), "disco.");
        assert_eq!(c.consul.datacenter, "eu1");
        assert_eq!(c.dns.wildcard_domain.unwrap().to_string(), "apps.example.com.");
        assert_eq!(
            c.dns.wildcard_targets,
            vec![WildcardTarget::Static("10.1.1.3".parse().unwrap())]
        );
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        let e = check(MIN, &[("CONSUL_IP", "not-an-ip")]).unwrap_err();
        assert_eq!(e.key, "CONSUL_IP");
    }

    #[test]
    fn upstream_loop_to_own_listener_is_refused() {
        let e = check(
            "[dns]\nlisten = [\"127.0.0.1:5353\"]\nupstreams = [\"127.0.0.1:5353\"]\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "dns.upstreams");
        assert!(e.problem.contains("loop"), "{e}");
        let e = check("[dns]\nlisten = [\"0.0.0.0:53\"]\nupstreams = [\"127.0.0.53\"]\n", &[]).unwrap_err();
        assert!(e.problem.contains("loop"), "{e}");
        assert!(
            check(
                "[dns]\nlisten = [\"127.0.0.1:5353\"]\nupstreams = [\"127.0.0.1:53\"]\n",
                &[]
            )
            .is_ok()
        );
    }

    #[test]
    fn resolv_conf_upstreams_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(
            &path,
            "# comment\nsearch example.com\nnameserver 192.0.2.7\nnameserver fe80::1%eth0\n",
        )
        .unwrap();
        let c = check(&format!("[dns]\nupstreams = [{:?}]\n", path), &[]).unwrap();
        assert_eq!(
            c.dns.upstreams,
            vec!["192.0.2.7:53".parse().unwrap(), "[fe80::1]:53".parse().unwrap()]
        );
        let e = check("[dns]\nupstreams = [\"/nonexistent/resolv.conf\"]\n", &[]).unwrap_err();
        assert!(e.problem.contains("could not read"), "{e}");
    }

    #[test]
    fn wildcard_needs_targets_and_parses_consul_targets() {
        let e = check(
            "[dns]\nupstreams = [\"192.0.2.1\"]\nwildcard_domain = \".apps.example.com\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "dns.wildcard_targets");
        let c = check(
            "[dns]\nupstreams = [\"192.0.2.1\"]\nwildcard_domain = \"apps.example.com\"\n\
             wildcard_targets = [\"10.0.0.5\", \"consul:wayfinder-lb\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.dns.wildcard_targets[1],
            WildcardTarget::ConsulService("wayfinder-lb".into())
        );
        let e = check(
            "[dns]\nupstreams = [\"192.0.2.1\"]\nwildcard_domain = \"a.b\"\nwildcard_targets = [\"nope\"]\n",
            &[],
        )
        .unwrap_err();
        assert!(e.problem.contains("nope"), "{e}");
    }

    #[test]
    fn type_errors_name_the_key_and_line() {
        let e = check("[dns]\nupstreams = [\"192.0.2.1\"]\nlisten = [\"nope\"]\n", &[]).unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        let e = check("[dns]\nconsul_timeout = \"soon\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("consul_timeout"), "{e}");
        let e = check("[dns]\nupstreams = [\"192.0.2.1\"]\nconsul_a_records = \"x\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("consul_a_records"), "{e}");
    }

    #[test]
    fn dns_limits_have_defaults_and_refuse_zero() {
        let c = check(MIN, &[]).unwrap();
        assert_eq!(c.dns.cache_bytes, 32 << 20);
        assert_eq!(c.dns.max_forwarded, 1024);
        assert_eq!(c.dns.tcp_connections_per_source, 32);
        for key in ["max_forwarded", "tcp_connections_per_source", "max_inflight"] {
            let e = check(&format!("{MIN}{key} = 0\n"), &[]).unwrap_err();
            assert_eq!(e.key, format!("dns.{key}"), "{e}");
        }
        let c = check(&format!("{MIN}cache_bytes = 0\n"), &[]).unwrap();
        assert_eq!(c.dns.cache_bytes, 0, "0 turns the cache off");
        // The entry count bound is gone: the cache is bounded by bytes only; an
        // older file that sets it still loads.
        let c = check(&format!("{MIN}cache_size = 100\n"), &[]).unwrap();
        assert_eq!(c.dns.cache_bytes, 32 << 20);
    }

    #[test]
    fn vpn_section_is_validated_and_feeds_the_dns() {
        let c = check(MIN, &[]).unwrap();
        assert!(!c.vpn.enabled);
        assert_eq!(c.vpn.listen, "0.0.0.0:51820".parse().unwrap());
        assert_eq!(c.vpn.interface, "wf0");
        assert_eq!(c.vpn.subnet().to_string(), "10.200.0.0/24");
        assert_eq!(c.vpn.mtu, 1420);
        assert_eq!(c.dns.listen.len(), 1, "a disabled vpn leaves the dns alone");

        for (text, key) in [
            ("address = \"10.200.0.0/33\"", "vpn.address"),
            ("address = \"10.200.0.0/24\"", "vpn.address"),
            ("address = \"fd00::1/64\"", "vpn.address"),
            ("routes = [\"172.17.0.0/16\", \"nope\"]", "vpn.routes"),
            ("interface = \"a-name-much-too-long\"", "vpn.interface"),
            ("endpoint = \"example.com\"", "vpn.endpoint"),
            ("mtu = 100", "vpn.mtu"),
            ("bogus = 1", "vpn.bogus"),
        ] {
            let e = check(&format!("{MIN}[vpn]\n{text}\n"), &[]).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }

        let on = "[dns]\nupstreams = [\"192.0.2.1\"]\nlisten = [\"127.0.0.1:5353\"]\nallow = [\"127.0.0.0/8\"]\n[vpn]\nenabled = true\n";
        let c = check(on, &[("LISTEN_IP", "127.0.0.1")]).unwrap();
        assert_eq!(
            c.dns.listen,
            vec!["127.0.0.1:5353".parse().unwrap(), "10.200.0.1:5353".parse().unwrap()]
        );
        assert!(c.dns.allow.contains(&"10.200.0.0/24".parse().unwrap()));
        assert_eq!(
            c.vpn.listen,
            "127.0.0.1:51820".parse().unwrap(),
            "LISTEN_IP applies to the vpn"
        );
        let wildcard = format!("{MIN}[vpn]\nenabled = true\n");
        let c = check(&wildcard, &[]).unwrap();
        assert_eq!(c.dns.listen.len(), 1, "0.0.0.0:53 already covers the tunnel address");

        // START_VPN switches the vpn (and so the dns on the tunnel) both ways.
        let off = "[dns]\nupstreams = [\"192.0.2.1\"]\nlisten = [\"127.0.0.1:5353\"]\n";
        let c = check(off, &[("START_VPN", "true")]).unwrap();
        assert!(c.vpn.enabled);
        assert!(c.dns.listen.contains(&"10.200.0.1:5353".parse().unwrap()));
        let c = check(on, &[("START_VPN", "0")]).unwrap();
        assert!(!c.vpn.enabled);
        assert_eq!(c.dns.listen, vec!["127.0.0.1:5353".parse().unwrap()]);
        let e = check(off, &[("START_VPN", "sometimes")]).unwrap_err();
        assert_eq!((e.file.as_str(), e.key.as_str()), ("environment", "START_VPN"), "{e}");
    }

    /// Every shipped example config is valid (style: every deploy file is a fixture).
    #[test]
    fn shipped_configs_are_valid() {
        for (name, text) in [
            ("deploy/wayfinder.toml", include_str!("../deploy/wayfinder.toml")),
            ("deploy/standalone.toml", include_str!("../deploy/standalone.toml")),
            ("deploy/appliance.toml", include_str!("../deploy/appliance.toml")),
        ] {
            let mut file = parse(text, name, &env(&[])).unwrap_or_else(|e| panic!("{e}"));
            // The machine's resolv.conf may point anywhere; the rest must validate.
            file.dns.upstreams = vec!["192.0.2.53".into()];
            validate(&file, name).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
