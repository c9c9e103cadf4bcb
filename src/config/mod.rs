//! Configuration: the TOML file, the PanteraS environment, and the validated result.
//!
//! ```text
//!  wayfinder.toml ──serde (unknown keys rejected)──▶ FileConfig
//!  PanteraS env (IP, LISTEN_IP, CONSUL_IP, ...; a host address guessed) ──overrides──▶ FileConfig
//!  FileConfig ──validate_for(runs)──▶ Config
//!      [consul] consul::settings   [dns] dns::settings   [lb] lb::settings
//!      [vpn] vpn::settings         [supervisor] supervisor::settings
//!      [register] register::settings
//! ```
//!
//! Each component owns its section: its type, defaults, documentation and
//! validation live in its `settings` module. This module aggregates them,
//! applies the PanteraS environment, and decides which sections a command
//! checks strictly ([`Runs`]: what it runs); rules that span sections are
//! passed in (the dns gets the vpn's tunnel address and Consul's domain).
//!
//! Precedence: environment variable, then the file, then the built-in default named
//! next to each field. Every error names the file, the key and the problem; `main`
//! maps a [`ConfigError`] to exit status 64.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub mod shared;

use crate::consul::settings::{ConsulConfig, ConsulSection, validate_consul};
use crate::dns::settings::{DnsConfig, DnsSection, Tunnel, validate_dns};
use crate::env::{self, Env};
use crate::lb::settings::{LbConfig, LbSection, validate_lb};
use crate::net::listeners::OwnListeners;
use crate::register::settings::{RegisterConfig, RegisterSection, validate_register};
use crate::supervisor::settings::{SupervisorConfig, SupervisorSection, validate_supervisor};
use crate::vpn::settings::{VpnConfig, VpnSection, validate_vpn};
use shared::{ConfigError, parse_bool, parse_domain};

/// The config file used when `-c` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "wayfinder.toml";

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
    /// The containers' registration in Consul.
    #[serde(default)]
    pub register: RegisterSection,
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
    pub host_address: Option<crate::net::host::HostAddress>,
    /// Problems in the sections of components this command does not run
    /// (see [`Runs`]): not errors here, but `check` shows them.
    pub unchecked: Vec<ConfigError>,
    /// The supervisor (`wayfinder up`).
    pub supervisor: SupervisorConfig,
    /// WireGuard VPN.
    pub vpn: VpnConfig,
    /// The containers' registration.
    pub register: RegisterConfig,
}

impl Config {
    /// Every TCP listener the configuration asks for, whichever components run.
    pub fn own_listeners(&self) -> OwnListeners {
        let config = self;
        let mut own = OwnListeners::default();
        for addr in config.lb.http_addrs() {
            own.add("lb http", addr);
        }
        if let Some(https) = &config.lb.https {
            own.add("lb https", https.listen);
            for &ip in &config.lb.also_listen {
                own.add("lb https", SocketAddr::new(ip, https.listen.port()));
            }
        }
        if let Some(stats) = config.lb.stats {
            own.add("lb stats", stats);
        }
        for &listen in &config.dns.listen {
            own.add("dns", listen);
        }
        if let Some(admin) = config.supervisor.admin {
            own.add("admin", admin);
        }
        own.add("consul http", config.consul.http);
        for &dns in &config.consul.dns {
            own.add("consul dns", dns);
        }
        for port in crate::net::listeners::CONSUL_CLUSTER_PORTS {
            own.add(
                "consul cluster",
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            );
        }
        own
    }
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
        None => crate::net::host::guess(env),
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
    let (file, _) = parse_text(&text, &source, &env, crate::net::host::docker_bridge())?;
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
fn with_host(mut config: Config, host: Option<crate::net::host::HostAddress>) -> Config {
    if let Some(h) = &host {
        config.host_ip = Some(h.ip);
        config.lb.landing_hosts.push(h.ip.to_string());
    }
    config.host_address = host;
    config
}

/// `HOST_IP`, else PanteraS's `IP`, when one is set.
fn given_host_address(env: &dyn Env) -> Result<Option<crate::net::host::HostAddress>, ConfigError> {
    use crate::net::host::{HostAddress, Origin};
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
    parse_text(text, source, &env::Panteras::new(env, host), None)
}

/// Parses TOML text and applies `env` (already the PanteraS view).
fn parse_text(
    text: &str,
    source: &str,
    env: &dyn Env,
    bridge: Option<IpAddr>,
) -> Result<(FileConfig, Option<IpAddr>), ConfigError> {
    let mut file: FileConfig = toml::from_str(text).map_err(|e| ConfigError {
        file: source.to_string(),
        key: toml_error_key(&e, text),
        problem: e.message().to_string()
            + &e.span()
                .map(|s| format!(" (line {})", line_of(text, s.start)))
                .unwrap_or_default(),
    })?;
    apply_env(&mut file, env, bridge)?;
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
    ConfigError::env(var, problem)
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

/// `LISTEN_IP`'s addresses (commas or spaces between them), with the docker
/// bridge's address added when there is one and no wildcard address is
/// named; `None` when `LISTEN_IP` is unset. A wildcard address among others
/// stands alone (it takes them all).
fn listen_ips(env: &dyn Env, bridge: Option<IpAddr>) -> Result<Option<Vec<IpAddr>>, ConfigError> {
    let Some(text) = env.get(env::LISTEN_IP) else {
        return Ok(None);
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for word in text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
    {
        let ip = word.parse::<IpAddr>().map_err(|e| {
            env_error(
                env::LISTEN_IP,
                format!("`{word}` is not an IP address: {e} (several addresses: separate them with commas)"),
            )
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.len() > MAX_LISTEN_IPS {
        return Err(env_error(
            env::LISTEN_IP,
            format!("names {} addresses; at most {MAX_LISTEN_IPS}", ips.len()),
        ));
    }
    if let Some(wildcard) = ips.iter().find(|ip| ip.is_unspecified()) {
        return Ok(Some(vec![*wildcard]));
    }
    if let Some(bridge) = bridge.filter(|b| !ips.contains(b)) {
        ips.push(bridge);
    }
    Ok((!ips.is_empty()).then_some(ips))
}

/// Addresses `LISTEN_IP` may name (each costs every listener a socket).
const MAX_LISTEN_IPS: usize = 16;

/// Puts the listeners on `ips` (not empty): the dns on each (with each port it
/// had), the lb's HTTP and HTTPS on the first with `also_listen` the others,
/// the stats page and the vpn on the first.
fn apply_listen_ips(file: &mut FileConfig, ips: &[IpAddr]) {
    let first = ips[0];
    let mut ports: Vec<u16> = Vec::new();
    for addr in &file.dns.listen {
        if !ports.contains(&addr.port()) {
            ports.push(addr.port());
        }
    }
    file.dns.listen = ports
        .iter()
        .flat_map(|&port| ips.iter().map(move |&ip| SocketAddr::new(ip, port)))
        .collect();
    file.lb.http.set_ip(first);
    file.lb.https.set_ip(first);
    file.lb.also_listen = ips[1..].to_vec();
    file.vpn.listen.set_ip(first);
    if let Ok(mut stats) = file.lb.stats.trim().parse::<SocketAddr>() {
        stats.set_ip(first);
        file.lb.stats = stats.to_string();
    }
}

/// Applies the PanteraS variables (see [`crate::env::VARS`]) over the file;
/// `bridge` is the docker bridge's address, when [`load`] found one.
fn apply_env(file: &mut FileConfig, env: &dyn Env, bridge: Option<IpAddr>) -> Result<(), ConfigError> {
    if let Some(ips) = listen_ips(env, bridge)? {
        apply_listen_ips(file, &ips);
    }
    if let Some(mode) = env.get(env::DNS_CONSUL_A_RECORDS) {
        file.dns.consul_a_records = match mode.trim().to_ascii_lowercase().as_str() {
            "consul" => crate::dns::settings::ConsulARecords::Consul,
            "lb" => crate::dns::settings::ConsulARecords::Lb,
            other => {
                return Err(env_error(
                    env::DNS_CONSUL_A_RECORDS,
                    format!("`{other}` is neither `consul` (the instances) nor `lb` (the LB hosts)"),
                ));
            }
        };
    }
    if let Some(ssl) = env.get(env::HAPROXY_SSL) {
        file.lb.ssl = parse_bool(&ssl).map_err(|p| env_error(env::HAPROXY_SSL, p))?;
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
    if let Some(docker) = env.get(env::DOCKER_HOST).filter(|d| !d.trim().is_empty()) {
        file.register.docker = docker;
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
        file.vpn.enabled = parse_bool(&on).map_err(|p| env_error(env::START_VPN, p))?;
    }
    Ok(())
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
    /// The register component.
    pub register: bool,
    /// The supervisor (`up`, `status`).
    pub supervisor: bool,
}

impl Runs {
    /// Everything (what `validate` checks).
    pub const ALL: Runs = Runs {
        dns: true,
        lb: true,
        vpn: true,
        register: true,
        supervisor: true,
    };
    /// Nothing but `[consul]` (the first look of `up`, before the role says
    /// what starts).
    pub const NONE: Runs = Runs {
        dns: false,
        lb: false,
        vpn: false,
        register: false,
        supervisor: false,
    };
    /// `wayfinder dns`.
    pub const DNS: Runs = Runs {
        dns: true,
        ..Runs::NONE
    };
    /// `wayfinder lb`.
    pub const LB: Runs = Runs { lb: true, ..Runs::NONE };
    /// `wayfinder vpn` and its peer commands.
    pub const VPN: Runs = Runs {
        vpn: true,
        ..Runs::NONE
    };
    /// `wayfinder status` (the admin address and token).
    pub const SUPERVISOR: Runs = Runs {
        supervisor: true,
        ..Runs::NONE
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

/// What the dns takes from the vpn's section: the tunnel, when the vpn is on.
fn tunnel(vpn: &VpnConfig) -> Option<Tunnel> {
    vpn.enabled.then(|| Tunnel {
        address: IpAddr::V4(vpn.address.addr()),
        subnet: ipnet::IpNet::V4(vpn.subnet()),
    })
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
        validate_dns(&file.dns, &consul, tunnel(&vpn), &err),
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
    let register = checked(
        runs.register,
        validate_register(&file.register, &err),
        || validate_register(&RegisterSection::default(), &err),
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
        register,
        consul,
        dns,
        unchecked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::settings::WildcardTarget;
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::time::Duration;

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
    fn listen_ip_names_one_or_several_addresses_and_the_docker_bridge_joins_them() {
        let c = check(MIN, &[("LISTEN_IP", "10.1.2.3, 10.9.9.9")]).unwrap();
        assert_eq!(
            c.dns.listen,
            vec!["10.1.2.3:53".parse().unwrap(), "10.9.9.9:53".parse().unwrap()]
        );
        assert_eq!(c.lb.http, "10.1.2.3:80".parse().unwrap());
        assert_eq!(c.lb.also_listen, vec!["10.9.9.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            c.lb.stats,
            Some("10.1.2.3:81".parse().unwrap()),
            "stats on the first only"
        );
        assert_eq!(c.vpn.listen, "10.1.2.3:51820".parse().unwrap());
        let own: Vec<_> = c.own_listeners().iter().map(|l| l.addr).collect();
        assert!(own.contains(&"10.9.9.9:80".parse().unwrap()), "{own:?}");

        // Each dns port on each address; spaces separate too; duplicates once.
        let two_ports = format!("{MIN}listen = [\"0.0.0.0:53\", \"0.0.0.0:5353\"]\n");
        let c = check(&two_ports, &[("LISTEN_IP", "10.1.2.3 10.9.9.9 10.1.2.3")]).unwrap();
        assert_eq!(c.dns.listen.len(), 4, "{:?}", c.dns.listen);

        // The docker bridge joins a given LISTEN_IP (read by `load`; here by hand).
        let mut file = parse(MIN, "t", &env(&[])).unwrap();
        apply_env(
            &mut file,
            &env(&[("LISTEN_IP", "10.1.2.3")]),
            Some("172.17.0.1".parse().unwrap()),
        )
        .unwrap();
        let c = validate(&file, "t").unwrap();
        assert_eq!(c.dns.listen[1], "172.17.0.1:53".parse().unwrap());
        assert_eq!(c.lb.also_listen, vec!["172.17.0.1".parse::<IpAddr>().unwrap()]);
        // ... but not a wildcard one (it takes the bridge already), nor when unset.
        let mut file = parse(MIN, "t", &env(&[])).unwrap();
        apply_env(
            &mut file,
            &env(&[("LISTEN_IP", "10.1.2.3,0.0.0.0")]),
            Some("172.17.0.1".parse().unwrap()),
        )
        .unwrap();
        let c = validate(&file, "t").unwrap();
        assert_eq!(c.dns.listen, vec!["0.0.0.0:53".parse().unwrap()]);
        assert!(c.lb.also_listen.is_empty());
        let mut file = parse(MIN, "t", &env(&[])).unwrap();
        apply_env(&mut file, &env(&[]), Some("172.17.0.1".parse().unwrap())).unwrap();
        assert_eq!(
            validate(&file, "t").unwrap().dns.listen,
            vec!["0.0.0.0:53".parse().unwrap()]
        );

        // Refused: a word that is no address (named), too many addresses.
        let e = check(MIN, &[("LISTEN_IP", "10.1.2.3;10.9.9.9")]).unwrap_err();
        assert!(
            e.to_string().contains("LISTEN_IP") && e.to_string().contains("commas"),
            "{e}"
        );
        let many: Vec<String> = (1..=17).map(|i| format!("10.0.0.{i}")).collect();
        let e = check(MIN, &[("LISTEN_IP", &many.join(","))]).unwrap_err();
        assert!(e.to_string().contains("at most 16"), "{e}");
        // lb.also_listen needs a specific lb.http, and no wildcard of its own.
        let e = check(&format!("{MIN}[lb]\nalso_listen = [\"10.0.0.1\"]\n"), &[]).unwrap_err();
        assert_eq!(e.key, "lb.also_listen", "{e}");
        let e = check(
            &format!("{MIN}[lb]\nhttp = \"10.0.0.2:80\"\nalso_listen = [\"0.0.0.0\"]\n"),
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "lb.also_listen", "{e}");
    }

    #[test]
    fn dns_consul_a_records_comes_from_its_variable() {
        let targets = format!("{MIN}wildcard_targets = [\"10.0.0.1\"]\n");
        let c = check(&targets, &[("DNS_CONSUL_A_RECORDS", "lb")]).unwrap();
        assert_eq!(c.dns.consul_a_records, crate::dns::settings::ConsulARecords::Lb);
        let lb = format!("{targets}consul_a_records = \"lb\"\n");
        let c = check(&lb, &[("DNS_CONSUL_A_RECORDS", "Consul")]).unwrap();
        assert_eq!(c.dns.consul_a_records, crate::dns::settings::ConsulARecords::Consul);
        let e = check(&targets, &[("DNS_CONSUL_A_RECORDS", "host")]).unwrap_err();
        assert!(e.to_string().contains("DNS_CONSUL_A_RECORDS"), "{e}");
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

    /// The request-body and per-client limits of issue 21: their defaults, and
    /// every value that would switch one off or make no sense is refused.
    #[test]
    fn lb_body_and_share_limits() {
        let c = check(MIN, &[]).unwrap();
        assert_eq!(c.lb.body_buffer_bytes, 64 << 10);
        assert_eq!(c.lb.body_buffer_total_bytes, 64 << 20);
        assert_eq!(c.lb.min_body_rate, 500);
        assert_eq!(c.lb.request_timeout, Duration::from_secs(300));
        assert_eq!(c.lb.max_client_share, 50);
        let c = check(
            &format!(
                "{MIN}[lb]\nbody_buffer_bytes = 10\nbody_buffer_total_bytes = 10\nmin_body_rate = 1\n\
                 request_timeout = \"2s\"\nmax_client_share = 100\n"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.lb.body_buffer_bytes, c.lb.min_body_rate, c.lb.max_client_share),
            (10, 1, 100)
        );
        for (text, key) in [
            ("body_buffer_bytes = 0", "lb.body_buffer_bytes"),
            ("body_buffer_total_bytes = 0", "lb.body_buffer_total_bytes"),
            (
                "body_buffer_bytes = 2048\nbody_buffer_total_bytes = 1024",
                "lb.body_buffer_bytes",
            ),
            ("min_body_rate = 0", "lb.min_body_rate"),
            ("request_timeout = \"0s\"", "lb.request_timeout"),
            ("max_client_share = 0", "lb.max_client_share"),
            ("max_client_share = 101", "lb.max_client_share"),
        ] {
            let e = check(&format!("{MIN}[lb]\n{text}\n"), &[]).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
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
        // A file that gives no resolver is a problem the dns starts with (and
        // says), never a configuration error that would stop it.
        let c = check("[dns]\nupstreams = [\"/nonexistent/resolv.conf\"]\n", &[]).unwrap();
        assert!(c.dns.upstreams.is_empty());
        assert!(
            c.dns.upstream_problems[0].contains("could not read"),
            "{:?}",
            c.dns.upstream_problems
        );
        let e = check("[dns]\nupstreams = [\"resolv.conf\"]\n", &[]).unwrap_err();
        assert!(
            e.problem.contains("neither an `IP[:port]` nor a resolv.conf path"),
            "{e}"
        );
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
        assert_eq!(c.dns.consul_inline_slots, 256);
        let c = check(&format!("{MIN}consul_inline_slots = 0\n"), &[]).unwrap();
        assert_eq!(c.dns.consul_inline_slots, 0, "0 sends Consul questions the task path");
        let e = check(&format!("{MIN}consul_inline_slots = 4097\n"), &[]).unwrap_err();
        assert_eq!(e.key, "dns.consul_inline_slots", "{e}");
        let c = check(&format!("{MIN}cache_bytes = 0\n"), &[]).unwrap();
        assert_eq!(c.dns.cache_bytes, 0, "0 turns the cache off");
        // The entry count bound is gone: the cache is bounded by bytes only; an
        // older file that sets it still loads.
        let c = check(&format!("{MIN}cache_size = 100\n"), &[]).unwrap();
        assert_eq!(c.dns.cache_bytes, 32 << 20);
    }

    #[test]
    fn register_section_defaults_docker_host_and_mistakes() {
        use crate::register::settings::AddressMode;
        let c = check(MIN, &[]).unwrap();
        assert_eq!(c.register.docker, "unix:///var/run/docker.sock");
        assert_eq!(c.register.address, AddressMode::Host);
        assert_eq!(c.register.resync, std::time::Duration::from_secs(30));
        let c = check(MIN, &[("DOCKER_HOST", "tcp://10.0.0.5:2375")]).unwrap();
        assert_eq!(
            c.register.docker, "tcp://10.0.0.5:2375",
            "DOCKER_HOST wins over the file"
        );
        let c = check(
            &format!("{MIN}[register]\naddress = \"internal\"\nnetwork = \"front\"\ntags = [\"dc-east\"]\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.register.address, c.register.network.as_deref()),
            (AddressMode::Internal, Some("front"))
        );
        assert_eq!(c.register.tags, ["dc-east"]);
        for (text, key) in [
            ("docker = \"ftp://x\"", "register.docker"),
            ("docker = \"unix://relative.sock\"", "register.docker"),
            ("resync = \"0s\"", "register.resync"),
            ("health_ttl = \"1s\"", "register.health_ttl"),
            ("tags = [\"haproxy_weight=abc\"]", "register.tags"),
            ("network = \"two words\"", "register.network"),
            ("address = \"bogus\"", "register.address"),
            ("bogus = 1", "register.bogus"),
        ] {
            let e = check(&format!("{MIN}[register]\n{text}\n"), &[]).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
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
            ("deploy/wayfinder.toml", include_str!("../../deploy/wayfinder.toml")),
            ("deploy/standalone.toml", include_str!("../../deploy/standalone.toml")),
            ("deploy/appliance.toml", include_str!("../../deploy/appliance.toml")),
        ] {
            let mut file = parse(text, name, &env(&[])).unwrap_or_else(|e| panic!("{e}"));
            // The machine's resolv.conf may point anywhere; the rest must validate.
            file.dns.upstreams = vec!["192.0.2.53".into()];
            validate(&file, name).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
