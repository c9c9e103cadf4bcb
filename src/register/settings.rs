//! `[register]`: the register component's section of the configuration
//! file, its defaults, and its validation into [`RegisterConfig`].
//!
//! ```text
//!  wayfinder.toml [register] + DOCKER_HOST, START_REGISTRATOR (up)
//!      ──RegisterSection──validate_register──▶ RegisterConfig (register::run)
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::shared::{ConfigError, ErrorAt};
use crate::register::conventions;

/// The Docker endpoint when neither the file nor `DOCKER_HOST` names one.
pub const DEFAULT_DOCKER: &str = "unix:///var/run/docker.sock";

/// `[register]`: the host's containers in Consul, from their `SERVICE_*`
/// environment and labels (replaces registrator).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterSection {
    /// The Docker daemon: `unix:///path` or `tcp://host:port`. Default
    /// `DOCKER_HOST`, else `unix:///var/run/docker.sock`.
    #[serde(default = "default_docker")]
    pub docker: String,
    /// Which address a service gets: `host` (this host's `HOST_IP` and the
    /// published port, as PanteraS ran registrator with `-ip=HOST_IP`) or
    /// `internal` (the container's own address and exposed port). A container
    /// may choose for itself with the label or variable
    /// `registrator:internal=true|false`. Default `host`.
    #[serde(default)]
    pub address: AddressMode,
    /// In `internal` mode, the network whose address is registered. Default:
    /// the container's only network, else `bridge`, else the first by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Tags added to every service registered. Default none.
    #[serde(default)]
    pub tags: Vec<String>,
    /// How often the running containers and Consul are compared in full
    /// (only differences are written). Default `30s`; 1 s to 1 h.
    #[serde(default = "default_resync", with = "humantime_serde")]
    pub resync: Duration,
    /// The time to live of the Consul check fed by a container's Docker
    /// `HEALTHCHECK`; Wayfinder renews it three times per period, so a dead
    /// Wayfinder turns those services critical within it. Default `30s`;
    /// 3 s to 10 min.
    #[serde(default = "default_health_ttl", with = "humantime_serde")]
    pub health_ttl: Duration,
}

impl Default for RegisterSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

fn default_docker() -> String {
    DEFAULT_DOCKER.into()
}

fn default_resync() -> Duration {
    Duration::from_secs(30)
}

fn default_health_ttl() -> Duration {
    Duration::from_secs(30)
}

/// Which address a container's services are registered with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressMode {
    /// `HOST_IP` (or the binding's own address) and the published port.
    #[default]
    Host,
    /// The container's address on a network and its exposed port.
    Internal,
}

impl AddressMode {
    /// As written in the file (`host`, `internal`).
    pub fn name(self) -> &'static str {
        match self {
            AddressMode::Host => "host",
            AddressMode::Internal => "internal",
        }
    }
}

/// Validated `[register]`.
#[derive(Debug, Clone)]
pub struct RegisterConfig {
    /// The Docker endpoint (`unix://...` or `tcp://...`).
    pub docker: String,
    /// The default address mode.
    pub address: AddressMode,
    /// The network of `internal` mode, when named.
    pub network: Option<String>,
    /// Tags added to every service.
    pub tags: Vec<String>,
    /// Full comparison period.
    pub resync: Duration,
    /// TTL of the checks fed by Docker health.
    pub health_ttl: Duration,
}

pub(crate) fn validate_register(section: &RegisterSection, err: ErrorAt<'_>) -> Result<RegisterConfig, ConfigError> {
    let RegisterSection {
        docker,
        address,
        network,
        tags,
        resync,
        health_ttl,
    } = section;
    let docker = docker.trim();
    let scheme_ok = docker
        .strip_prefix("unix://")
        .map(|path| path.starts_with('/'))
        .or_else(|| {
            docker
                .strip_prefix("tcp://")
                .or_else(|| docker.strip_prefix("http://"))
                .map(|rest| {
                    rest.rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                })
        })
        .unwrap_or(false);
    if !scheme_ok {
        return Err(err(
            "register.docker",
            format!(
                "`{docker}` is not a Docker endpoint such as `unix:///var/run/docker.sock` or `tcp://10.0.0.1:2375`"
            ),
        ));
    }
    if let Some(n) = network
        && (n.is_empty() || n.len() > 128 || n.chars().any(|c| c.is_control() || c.is_whitespace()))
    {
        return Err(err("register.network", format!("`{n}` is not a Docker network name")));
    }
    let joined = tags.iter().map(|t| t.replace(',', "\\,")).collect::<Vec<_>>().join(",");
    let tags = conventions::checked_tags(&joined).map_err(|e| err("register.tags", e.to_string()))?;
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(resync) {
        return Err(err("register.resync", format!("{resync:?} is outside 1s..=1h")));
    }
    if !(Duration::from_secs(3)..=Duration::from_secs(600)).contains(health_ttl) {
        return Err(err(
            "register.health_ttl",
            format!("{health_ttl:?} is outside 3s..=10m"),
        ));
    }
    Ok(RegisterConfig {
        docker: docker.to_string(),
        address: *address,
        network: network.clone(),
        tags,
        resync: *resync,
        health_ttl: *health_ttl,
    })
}
