//! `[dns]`: the dns component's section of the configuration file, its
//! defaults, and its validation into [`DnsConfig`] (upstreams resolved, the
//! wildcard domain and targets parsed, the tunnel address added when the vpn
//! is on).
//!
//! ```text
//!  wayfinder.toml [dns] + HAPROXY_ADD_DOMAIN, HOST_IP, LISTEN_IP
//!      ──DnsSection──validate_dns(consul, tunnel)──▶ DnsConfig
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_proto::rr::Name;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::shared::{ConfigError, parse_domain};
use crate::consul::settings::ConsulConfig;

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
    /// Consul questions each UDP worker thread may have on the wire itself, on
    /// its own socket to the first Consul address when that is a loopback
    /// address (the slots of its pending table; they count in `max_inflight`
    /// and `max_forwarded` too). A question finding them all taken goes the
    /// task path, as every Consul question does with `0`. Default `256`, at
    /// most `4096`.
    #[serde(default = "default_consul_inline_slots")]
    pub consul_inline_slots: usize,
    /// A TCP client connection that sends no question for this long is closed,
    /// and one that leaves an answer unread for this long is cut. Default `10s`.
    #[serde(default = "default_tcp_idle_timeout", with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// TCP connections one client (an IPv4 address, an IPv6 /64) may hold at
    /// once; more are reset at accept. Default `32`.
    #[serde(default = "default_tcp_connections_per_source")]
    pub tcp_connections_per_source: usize,
}

impl Default for DnsSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
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

fn default_consul_inline_slots() -> usize {
    256
}

/// Upper bound of `consul_inline_slots`: the slots share 65536 query IDs.
pub const MAX_CONSUL_INLINE_SLOTS: usize = 4096;

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
    /// The vpn's tunnel address among `listen`, when the vpn is on: it may
    /// appear only after the dns binds (the one address bound with IP_FREEBIND).
    pub tunnel: Option<IpAddr>,
    /// Allowed client networks.
    pub allow: Vec<IpNet>,
    /// Upstream resolvers, in order.
    pub upstreams: Vec<SocketAddr>,
    /// Why some upstream entries gave nothing (a missing or unreadable file, a
    /// directory, no usable `nameserver`, this server itself); with no
    /// upstream at all, names outside Consul, the zones and the wildcard
    /// domain answer SERVFAIL and this says why.
    pub upstream_problems: Vec<String>,
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
    /// Consul questions a UDP worker asks itself at once (0: none).
    pub consul_inline_slots: usize,
    /// TCP idle and write timeout.
    pub tcp_idle_timeout: Duration,
    /// TCP connections per client source.
    pub tcp_connections_per_source: usize,
}

impl DnsConfig {
    /// The dns settings of a command that does not run the dns, when `[dns]`
    /// does not validate: its listen addresses as written (other components
    /// must know them), everything else off or at its default.
    pub(crate) fn inactive(dns: &DnsSection) -> Self {
        let secs = |d: &Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        DnsConfig {
            listen: dns.listen.clone(),
            tunnel: None,
            allow: dns.allow.clone(),
            upstreams: Vec::new(),
            upstream_problems: Vec::new(),
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
            consul_inline_slots: dns.consul_inline_slots.min(MAX_CONSUL_INLINE_SLOTS),
            tcp_idle_timeout: dns.tcp_idle_timeout,
            tcp_connections_per_source: dns.tcp_connections_per_source.max(1),
        }
    }
}

/// The vpn's tunnel as the dns needs it (an input from the vpn's section):
/// laptops ask the dns on the tunnel address, from the tunnel subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunnel {
    /// The appliance's address in the tunnel.
    pub address: IpAddr,
    /// The peers' subnet.
    pub subnet: IpNet,
}

/// Validates `[dns]`: `consul` for the domain overlap, `tunnel` (when the vpn
/// is on) for the address it also answers on.
///
/// Long on purpose: one check per field, in the section's order, over an
/// exhaustive destructuring (a new field cannot be forgotten); split, the
/// checks would stand apart from the fields they read.
pub(crate) fn validate_dns(
    dns: &DnsSection,
    consul: &ConsulConfig,
    tunnel: Option<Tunnel>,
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
        consul_inline_slots,
        tcp_idle_timeout,
        tcp_connections_per_source,
    } = dns;

    if listen.is_empty() {
        return Err(err("dns.listen", "needs at least one address".into()));
    }
    // With the vpn on, laptops ask the dns on the tunnel address (see `vpn_dns`).
    let (listen, allow) = &vpn_dns(tunnel, listen, allow);
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
    if *consul_inline_slots > MAX_CONSUL_INLINE_SLOTS {
        return Err(err(
            "dns.consul_inline_slots",
            format!("must be at most {MAX_CONSUL_INLINE_SLOTS}"),
        ));
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

    let (resolved, upstream_problems) =
        resolve_upstreams(upstreams, listen, Path::new(DEFAULT_UPSTREAM_FILE)).map_err(|p| err("dns.upstreams", p))?;

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
        tunnel: tunnel.map(|t| t.address),
        allow: allow.clone(),
        upstreams: resolved,
        upstream_problems,
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
        consul_inline_slots: *consul_inline_slots,
        tcp_idle_timeout: *tcp_idle_timeout,
        tcp_connections_per_source: *tcp_connections_per_source,
    })
}

/// The dns listen and allow lists with the vpn taken into account: when it is on,
/// the tunnel address (on the port of the first listener) is added unless a
/// listener already covers it, and the tunnel subnet is allowed.
fn vpn_dns(tunnel: Option<Tunnel>, listen: &[SocketAddr], allow: &[IpNet]) -> (Vec<SocketAddr>, Vec<IpNet>) {
    let (mut listen, mut allow) = (listen.to_vec(), allow.to_vec());
    if let Some(Tunnel { address, subnet }) = tunnel {
        let port = listen.first().map_or(53, |l| l.port());
        let tunnel = SocketAddr::new(address, port);
        let covered = listen
            .iter()
            .any(|l| l.port() == port && (l.ip() == tunnel.ip() || l.ip() == IpAddr::from([0, 0, 0, 0])));
        if !covered {
            listen.push(tunnel);
        }
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

/// The host's saved resolvers, the default upstream file (PanteraS's; the
/// compose file mounts it).
pub const DEFAULT_UPSTREAM_FILE: &str = "/etc/resolv.conf.orig";

/// `dns.upstreams` as resolvers, with why some entries gave none. Without
/// entries: `saved` (the host's saved resolvers) when it is a file, else
/// `/etc/resolv.conf`. A file that is missing, a directory (docker creates one
/// where a mounted file is missing on the host), unreadable or without a
/// usable `nameserver` is a problem, not an error: the dns starts without it,
/// and without any upstream answers other names SERVFAIL, saying why. A
/// resolver that is this server itself is never used (queries would loop): an
/// address written in `dns.upstreams` is an error, one read from a file is
/// skipped. A malformed entry is an error.
fn resolve_upstreams(
    upstreams: &[String],
    listen: &[SocketAddr],
    saved: &Path,
) -> Result<(Vec<SocketAddr>, Vec<String>), String> {
    let mut problems = Vec::new();
    let entries: Vec<String> = if !upstreams.is_empty() {
        upstreams.to_vec()
    } else if saved.is_file() {
        vec![saved.display().to_string()]
    } else {
        if saved.exists() {
            problems.push(format!(
                "{} is not a file (docker makes a directory where a mounted file is missing on the host): \
                 /etc/resolv.conf used instead",
                saved.display()
            ));
        }
        vec!["/etc/resolv.conf".into()]
    };
    let mut resolved = Vec::new();
    for entry in &entries {
        let (from_file, addrs) = match parse_upstream(entry)? {
            Upstream::Addr(addr) => (false, vec![addr]),
            Upstream::File(Ok(addrs)) => (true, addrs),
            Upstream::File(Err(problem)) => {
                problems.push(problem);
                continue;
            }
        };
        for addr in addrs {
            if let Some(own) = listen.iter().find(|l| crate::net::listeners::reaches(**l, addr)) {
                let problem = format!(
                    "upstream {addr} (from `{entry}`) is this server's own listen address {own}: \
                     queries would loop; point upstreams at the host's real resolvers"
                );
                if !from_file {
                    return Err(problem);
                }
                problems.push(problem);
                continue;
            }
            if !resolved.contains(&addr) {
                resolved.push(addr);
            }
        }
    }
    Ok((resolved, problems))
}

/// What one `dns.upstreams` entry is.
enum Upstream {
    /// A resolver's address.
    Addr(SocketAddr),
    /// A resolv.conf: its resolvers, or why it gives none.
    File(Result<Vec<SocketAddr>, String>),
}

/// An upstream entry: `IP`, `IP:port`, `[v6]:port`, or a resolv.conf path.
fn parse_upstream(entry: &str) -> Result<Upstream, String> {
    let entry = entry.trim();
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Ok(Upstream::Addr(addr));
    }
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Ok(Upstream::Addr(SocketAddr::new(ip, 53)));
    }
    if entry.starts_with('/') || entry.starts_with('.') {
        let path = Path::new(entry);
        if path.is_dir() {
            return Ok(Upstream::File(Err(format!(
                "`{entry}` is a directory, not a resolv.conf (docker makes one where a mounted file is missing on the host)"
            ))));
        }
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                return Ok(Upstream::File(Err(format!(
                    "could not read resolv.conf `{entry}`: {e}"
                ))));
            }
        };
        let servers = parse_resolv_conf(&text);
        if servers.is_empty() {
            return Ok(Upstream::File(Err(format!("`{entry}` has no `nameserver` lines"))));
        }
        return Ok(Upstream::File(Ok(servers)));
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
mod upstream_tests {
    use super::*;

    fn listen(addrs: &[&str]) -> Vec<SocketAddr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn an_upstream_file_that_gives_nothing_is_a_problem_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.conf");
        std::fs::write(&empty, "# no nameserver\nsearch example.com\n").unwrap();
        let good = dir.path().join("good.conf");
        std::fs::write(&good, "nameserver 192.0.2.7\n").unwrap();
        let own = listen(&["127.0.0.1:5353"]);
        for (entry, needle) in [
            (dir.path().join("missing.conf"), "could not read"),
            (dir.path().to_path_buf(), "is a directory"),
            (empty.clone(), "no `nameserver` lines"),
        ] {
            let entries = vec![entry.display().to_string()];
            let (resolved, problems) = resolve_upstreams(&entries, &own, Path::new("/unused")).unwrap();
            assert!(resolved.is_empty(), "{entry:?}");
            assert!(problems.len() == 1 && problems[0].contains(needle), "{problems:?}");
        }
        // The other entries still count.
        let entries = vec![empty.display().to_string(), good.display().to_string()];
        let (resolved, problems) = resolve_upstreams(&entries, &own, Path::new("/unused")).unwrap();
        assert_eq!(resolved, listen(&["192.0.2.7:53"]));
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn a_saved_resolvers_directory_falls_back_to_resolv_conf_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        // What docker makes when the host has no /etc/resolv.conf.orig to mount.
        let saved = dir.path().join("resolv.conf.orig");
        std::fs::create_dir(&saved).unwrap();
        let (_, problems) = resolve_upstreams(&[], &listen(&["127.0.0.1:5353"]), &saved).unwrap();
        assert!(
            problems[0].contains("is not a file") && problems[0].contains("/etc/resolv.conf used instead"),
            "{problems:?}"
        );
        // A saved file is read.
        let saved = dir.path().join("saved.conf");
        std::fs::write(&saved, "nameserver 192.0.2.9\n").unwrap();
        let (resolved, problems) = resolve_upstreams(&[], &listen(&["127.0.0.1:5353"]), &saved).unwrap();
        assert_eq!(resolved, listen(&["192.0.2.9:53"]));
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn the_dns_never_forwards_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        // The host pointed at Wayfinder: its resolv.conf names Wayfinder itself.
        let conf = dir.path().join("resolv.conf");
        std::fs::write(&conf, "nameserver 127.0.0.1\nnameserver 192.0.2.7\n").unwrap();
        let wildcard = listen(&["0.0.0.0:53"]);
        let entries = vec![conf.display().to_string()];
        let (resolved, problems) = resolve_upstreams(&entries, &wildcard, Path::new("/unused")).unwrap();
        assert_eq!(resolved, listen(&["192.0.2.7:53"]), "127.0.0.1:53 is this server");
        assert!(problems[0].contains("queries would loop"), "{problems:?}");
        // Only itself: no upstream at all rather than a loop.
        std::fs::write(&conf, "nameserver 127.0.0.1\n").unwrap();
        let (resolved, _) = resolve_upstreams(&entries, &wildcard, Path::new("/unused")).unwrap();
        assert!(resolved.is_empty());
        // Written in dns.upstreams: a configuration error.
        for (entry, listening) in [
            ("127.0.0.1:53", "0.0.0.0:53"),
            ("127.0.0.1", "127.0.0.1:53"),
            ("10.0.0.5:53", "10.0.0.5:53"),
        ] {
            let e = resolve_upstreams(&[entry.into()], &listen(&[listening]), Path::new("/unused")).unwrap_err();
            assert!(e.contains("queries would loop"), "{entry} on {listening}: {e}");
        }
        // Another port of the same host is another server.
        let (resolved, _) = resolve_upstreams(
            &["127.0.0.1:53".into()],
            &listen(&["127.0.0.1:5353"]),
            Path::new("/unused"),
        )
        .unwrap();
        assert_eq!(resolved, listen(&["127.0.0.1:53"]));
    }
}
