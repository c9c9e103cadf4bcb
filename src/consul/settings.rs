//! `[consul]`: how every component reaches the Consul agent; its defaults and
//! validation into [`ConsulConfig`].
//!
//! ```text
//!  wayfinder.toml [consul] + CONSUL_IP, CONSUL_DOMAIN, CONSUL_DC
//!      ──ConsulSection──validate_consul──▶ ConsulConfig (ConsulHub, dns, lb, up)
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::Name;
use serde::{Deserialize, Serialize};

use crate::config::shared::{ConfigError, parse_domain};

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

impl Default for ConsulSection {
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

/// Validates `[consul]`.
pub(crate) fn validate_consul(
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
