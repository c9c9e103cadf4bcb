//! The whole picture of a running `up`, as `/api/status` returns it and the
//! status page and `wayfinder status` show it: `up`'s own state (units,
//! Consul, listeners), the services from the process's Consul view, and each
//! component's own part under its name.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::readiness::Readiness;
use super::unit::UnitInfo;
use super::{Addresses, ConsulHealth, SupervisorState};
use crate::component::{InstanceReport, ServiceReport};

/// Services listed at most (the page is for people).
const MAX_SERVICES: usize = 1000;

/// The whole picture, as `/api/status` returns it.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Wayfinder's version.
    pub version: &'static str,
    /// This host's name.
    pub host: String,
    /// The role (`standalone (master + slave)`, `master`, `slave` ...).
    pub role: String,
    /// Seconds since `up` started.
    pub uptime_secs: f64,
    /// Every unit has started (or failed): start-up is over.
    pub ready: bool,
    /// Whether every unit the role needs runs and is ready now (`GET /api/ready`).
    pub readiness: Readiness,
    /// Listen addresses.
    pub addresses: Addresses,
    /// The Consul agent.
    pub consul: ConsulHealth,
    /// Programs and components.
    pub units: Vec<UnitInfo>,
    /// Consul services with their instances and how to reach them.
    pub services: Vec<ServiceReport>,
    /// Each component's own part, under its name (`dns`, `lb`, `vpn` ...).
    #[serde(flatten)]
    pub components: serde_json::Map<String, serde_json::Value>,
}

/// Every service from the process's Consul view (no Consul request per page
/// view), with what each component adds (the lb: URLs, its view of instances).
fn services(state: &SupervisorState) -> Vec<ServiceReport> {
    let Ok(view) = state.appliance.consul.catalog() else {
        return Vec::new();
    };
    let catalog = view.current();
    let host = state.host();
    let mut out: Vec<ServiceReport> = catalog
        .services
        .iter()
        .take(MAX_SERVICES)
        .map(|(name, entry)| ServiceReport {
            dns_names: vec![
                format!("{name}.service.{}", host.domain),
                format!("{name}.service.{}.{}", host.datacenter, host.domain),
            ],
            name: name.clone(),
            tags: entry.tags.clone(),
            urls: Vec::new(),
            instances: entry
                .instances
                .iter()
                .map(|i| InstanceReport {
                    id: i.id.clone(),
                    node: i.node.clone(),
                    address: format!("{}:{}", i.address, i.port),
                    health: i.health.name().to_string(),
                    lb: None,
                })
                .collect(),
        })
        .collect();
    for component in state.components.iter().filter(|c| state.plan.starts(c.name())) {
        component.annotate(&mut out, &host);
    }
    out
}

/// Collects the whole picture.
pub async fn report(state: &SupervisorState) -> StatusReport {
    StatusReport {
        version: env!("CARGO_PKG_VERSION"),
        host: crate::net::host::name().unwrap_or_default(),
        role: state.plan.role().into(),
        uptime_secs: state.started.elapsed().as_secs_f64(),
        ready: state.ready.load(Ordering::Relaxed),
        readiness: super::readiness::check(state),
        addresses: state.addresses(),
        consul: state.consul_health(),
        units: state.units.iter().map(|u| u.snapshot()).collect(),
        services: services(state),
        components: state
            .components
            .iter()
            .map(|c| (c.name().to_string(), c.status(state.plan.starts(c.name()))))
            .collect(),
    }
}
