//! `[lb]`: the lb's section of the configuration file, its defaults (each
//! documented on its field), and its validation into [`LbConfig`].
//!
//! ```text
//!  wayfinder.toml [lb] + PanteraS variables (config::apply_env)
//!      ──LbSection (serde, unknown keys refused)──validate_lb──▶ LbConfig
//! ```
//!
//! The shared `config` module aggregates the sections and decides which are
//! checked strictly (what the command runs); this module owns the rules.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hickory_proto::rr::Name;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::shared::ConfigError;

/// `[lb]`: the HTTP/TCP load balancer fed by the Consul catalog.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LbSection {
    /// HTTP listener. Default `0.0.0.0:80`; `LISTEN_IP` replaces the address.
    #[serde(default = "default_lb_http")]
    pub http: SocketAddr,
    /// More addresses the HTTP and HTTPS listeners take, on their ports (not
    /// the stats page): e.g. the docker bridge next to the host address, so
    /// containers and other hosts both reach the lb. Default none; `LISTEN_IP`
    /// with several addresses puts all but the first here, and adds the docker
    /// bridge (docker0) when it exists. Needs a specific `http` address (a
    /// wildcard one already takes them all).
    #[serde(default)]
    pub also_listen: Vec<IpAddr>,
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
    /// Request body bytes read before an instance is chosen: a body up to this
    /// size is in the lb whole before it takes one of an instance's maxconn
    /// slots, so a slow upload holds memory, not a slot (nginx's
    /// `proxy_request_buffering`, HAProxy's `option http-buffer-request`); a
    /// longer body has this much in before its slot is taken and streams the
    /// rest. Kept as the chunks arrived (no copy). Default `65536` (64 KiB); at
    /// least 1, at most `body_buffer_total_bytes`.
    #[serde(default = "default_lb_body_buffer_bytes")]
    pub body_buffer_bytes: usize,
    /// Memory all buffered request bodies may take together, over every proxy
    /// thread: once it is spent, a request stops buffering and streams its body
    /// (holding a slot, under `min_body_rate` and `max_client_share`). Default
    /// `67108864` (64 MiB); at least 1.
    #[serde(default = "default_lb_body_buffer_total_bytes")]
    pub body_buffer_total_bytes: usize,
    /// Slowest request body accepted, in bytes per second: in every 5 s the lb
    /// spends waiting for a body, at least 5 × this many bytes must come, else
    /// the request gets 408 (and its slot, if it had one, is freed). Only time
    /// spent waiting for the client counts; bytes beyond one window's share are
    /// not carried over (Apache mod_reqtimeout's `MinRate`, without its credit).
    /// Default `500`; at least 1.
    #[serde(default = "default_lb_min_body_rate")]
    pub min_body_rate: u64,
    /// Time from a request's head to the last byte of its body, whatever the
    /// rate (HAProxy's `timeout http-request`, which with a buffered body covers
    /// it too); a request not complete by then gets 408. Default `300s`.
    #[serde(default = "default_lb_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Share of one instance's maxconn slots one client source (an IPv4
    /// address, an IPv6 /64; so also one h2 connection) may hold, in percent,
    /// at least one slot: a request over it goes to another instance, or gets
    /// 429 with `Retry-After: 1` when every instance is full or has this client
    /// at its share. `100` = no share (when the share is not below maxconn,
    /// nothing is counted). Default `50`; 1 to 100.
    #[serde(default = "default_lb_max_client_share")]
    pub max_client_share: u8,
    /// Time a backend may take to start its response. Default `60s`.
    #[serde(default = "default_lb_io_timeout", with = "humantime_serde")]
    pub server_timeout: Duration,
    /// Inactivity allowed to a spliced connection (a `haproxy_tcp` port, or a
    /// WebSocket or other HTTP Upgrade) in both directions at once: one that
    /// moves no byte either way for this long is closed, one in use lives as
    /// long as it is used (HAProxy's `timeout tunnel`; PanteraS: `3600s`).
    /// Default `1h`.
    #[serde(default = "default_lb_tunnel_timeout", with = "humantime_serde")]
    pub tunnel_timeout: Duration,
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

fn default_lb_tunnel_timeout() -> Duration {
    Duration::from_secs(3600)
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

/// `body_buffer_total_bytes` by default (64 MiB).
pub const DEFAULT_BODY_BUFFER_TOTAL: usize = 64 << 20;

fn default_lb_body_buffer_bytes() -> usize {
    64 << 10
}

fn default_lb_body_buffer_total_bytes() -> usize {
    DEFAULT_BODY_BUFFER_TOTAL
}

fn default_lb_min_body_rate() -> u64 {
    500
}

fn default_lb_request_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_lb_max_client_share() -> u8 {
    50
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

/// Validated `[lb]`.
#[derive(Debug, Clone)]
pub struct LbConfig {
    /// HTTP listener.
    pub http: SocketAddr,
    /// More addresses of the HTTP and HTTPS listeners (their ports); never a
    /// wildcard one, never the `http` address again.
    pub also_listen: Vec<IpAddr>,
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
    /// Request body bytes read before an instance is chosen.
    pub body_buffer_bytes: usize,
    /// Memory all buffered request bodies may take together.
    pub body_buffer_total_bytes: usize,
    /// Slowest request body accepted (bytes per second of waiting).
    pub min_body_rate: u64,
    /// Head-to-last-body-byte deadline of a request.
    pub request_timeout: Duration,
    /// Share of an instance's slots one client source may hold (percent; 100 = off).
    pub max_client_share: u8,
    /// Backend response-start timeout.
    pub server_timeout: Duration,
    /// Inactivity timeout of spliced connections (HAProxy `timeout tunnel`).
    pub tunnel_timeout: Duration,
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

/// `also_listen` checked against `http`: specific addresses only, each once,
/// not `http`'s own, and only beside a specific `http` address.
fn check_also_listen(http: &SocketAddr, also: &[IpAddr]) -> Result<Vec<IpAddr>, String> {
    if also.is_empty() {
        return Ok(Vec::new());
    }
    if http.ip().is_unspecified() {
        return Err(format!(
            "lb.http {http} already takes every address; list further addresses only beside a specific one"
        ));
    }
    let mut out: Vec<IpAddr> = Vec::with_capacity(also.len());
    for &ip in also {
        if ip.is_unspecified() {
            return Err(format!("{ip} is a wildcard address: put it in lb.http instead"));
        }
        if ip != http.ip() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

impl LbConfig {
    /// Every address the HTTP listener takes: `http`, then `also_listen` on
    /// its port.
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(self.http)
            .chain(self.also_listen.iter().map(|&ip| SocketAddr::new(ip, self.http.port())))
            .collect()
    }
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

///
/// Long on purpose: one check per field, in the section's order, over an
/// exhaustive destructuring (a new field cannot be forgotten); split, the
/// checks would stand apart from the fields they read.
pub(crate) fn validate_lb(
    lb: &LbSection,
    wildcard_domain: Option<&Name>,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<LbConfig, ConfigError> {
    let LbSection {
        http,
        also_listen,
        landing_hosts,
        connect_timeout,
        client_timeout,
        idle_timeout,
        handshake_timeout,
        max_connections,
        max_connections_per_source,
        body_buffer_bytes,
        body_buffer_total_bytes,
        min_body_rate,
        request_timeout,
        max_client_share,
        server_timeout,
        tunnel_timeout,
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
    let also_listen = check_also_listen(http, also_listen).map_err(|p| err("lb.also_listen", p))?;
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
        ("lb.tunnel_timeout", tunnel_timeout),
        ("lb.request_timeout", request_timeout),
    ] {
        if d.is_zero() {
            return Err(err(key, "must be longer than 0s".into()));
        }
    }
    for (key, n) in [
        ("lb.max_connections_per_source", max_connections_per_source),
        ("lb.max_queued", max_queued),
        ("lb.body_buffer_bytes", body_buffer_bytes),
        ("lb.body_buffer_total_bytes", body_buffer_total_bytes),
    ] {
        if *n == 0 {
            return Err(err(key, "must be at least 1".into()));
        }
    }
    if body_buffer_bytes > body_buffer_total_bytes {
        return Err(err(
            "lb.body_buffer_bytes",
            format!("{body_buffer_bytes} is more than lb.body_buffer_total_bytes ({body_buffer_total_bytes})"),
        ));
    }
    if *min_body_rate == 0 {
        return Err(err("lb.min_body_rate", "must be at least 1 (bytes per second)".into()));
    }
    if !(1..=100).contains(max_client_share) {
        return Err(err("lb.max_client_share", "must be a percentage from 1 to 100".into()));
    }
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()];
    if let Some(name) = crate::net::host::name() {
        hosts.push(name.to_ascii_lowercase());
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
        also_listen,
        landing_hosts: hosts,
        add_domain: wildcard_domain.map(|n| format!(".{}", n.to_string().trim_end_matches('.'))),
        connect_timeout: *connect_timeout,
        client_timeout: *client_timeout,
        idle_timeout: *idle_timeout,
        handshake_timeout: *handshake_timeout,
        max_connections: (*max_connections > 0).then_some(*max_connections),
        max_connections_per_source: *max_connections_per_source,
        max_queued: *max_queued,
        body_buffer_bytes: *body_buffer_bytes,
        body_buffer_total_bytes: *body_buffer_total_bytes,
        min_body_rate: *min_body_rate,
        request_timeout: *request_timeout,
        max_client_share: *max_client_share,
        server_timeout: *server_timeout,
        tunnel_timeout: *tunnel_timeout,
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
