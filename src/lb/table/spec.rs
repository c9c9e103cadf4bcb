//! What the table is made from: the watcher's view of one service in one
//! datacenter ([`ServiceSpec`], its passing [`InstanceSpec`]s) and the naming
//! inputs ([`TableConfig`]), normalised once per build as [`Naming`].
//!
//! ```text
//!  Consul (watch) ──▶ ServiceSpec { instances: [InstanceSpec { addr, tags }] } ──▶ compile
//!  [lb] config    ──▶ TableConfig ──Naming::new──▶ compile, RoutingTable::empty
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use crate::lb::policy::BackendPolicy;
use crate::lb::tags::InstanceTags;

/// One Consul service instance as the watcher sees it (already only *passing* instances).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Consul service ID (for logs and the status page).
    pub id: String,
    /// Consul node name.
    pub node: String,
    /// Service address (node address when the service has none) and port.
    pub addr: SocketAddr,
    /// The instance's parsed tags.
    pub tags: InstanceTags,
}

/// One service's passing instances in one datacenter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Consul service name as registered.
    pub name: String,
    /// Datacenter the instances were read from.
    pub datacenter: String,
    /// The passing instances.
    pub instances: Vec<InstanceSpec>,
}

/// Naming inputs of the table.
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// Consul's DNS domain, e.g. `consul` (dots at the ends are ignored).
    pub consul_domain: String,
    /// This host's datacenter, e.g. `dc1`.
    pub local_datacenter: String,
    /// `HAPROXY_ADD_DOMAIN`, e.g. `.apps.example.com`; a missing leading dot is added.
    pub add_domain: Option<String>,
    /// Names and addresses answered with the landing page: `localhost`, `HOST_IP`,
    /// the hostname... (any case; a port or trailing dot is ignored).
    pub landing_hosts: Vec<String>,
    /// What Consul data may make the lb connect to and listen on.
    pub policy: BackendPolicy,
}

/// The naming inputs, normalised once per build.
#[derive(Debug)]
pub(super) struct Naming {
    /// Lower-case Consul domain without dots at the ends.
    pub(super) domain: String,
    /// Lower-case local datacenter.
    pub(super) local_dc: String,
    /// Lower-case add-domain with exactly one leading dot and no trailing dot.
    pub(super) add_domain: Option<String>,
    /// The `/` prefix, shared by every service's own names (one allocation).
    pub(super) root: Arc<str>,
}

impl Naming {
    pub(super) fn new(cfg: &TableConfig) -> Self {
        let add_domain = cfg
            .add_domain
            .as_deref()
            .map(|d| d.trim().trim_matches('.').to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .map(|d| format!(".{d}"));
        Self {
            domain: cfg.consul_domain.trim().trim_matches('.').to_ascii_lowercase(),
            local_dc: cfg.local_datacenter.trim().to_ascii_lowercase(),
            add_domain,
            root: "/".into(),
        }
    }
}
