//! Feeds the routing table from the process's view of Consul, live.
//!
//! ```text
//!  CatalogView (consul::catalog) ──new picture──▶ services whose entry changed
//!      (an Arc comparison per service: unchanged ones cost nothing to skip)
//!      ──▶ ServiceSpec of each LB-tagged service (passing instances, parsed tags)
//!  remote::run ──Update──▶ other datacenters' specs
//!  KvView haproxy/ ──▶ maxconn per service
//!            └──▶ RoutingTable::build, ArcSwap::store (requests in flight keep
//!                 the table they started with); the first table from a complete
//!                 picture makes the lb ready
//! ```
//!
//! On a Consul outage the view keeps its last picture, so the last good table
//! stays live; `LbState::consul_ok` and the view's age say so.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::LbState;
use super::table::{BackendCache, InstanceSpec, RoutingTable, ServiceSpec, TableConfig};
use super::tags::parse_tags;
use crate::consul::kv::KvTree;
use crate::consul::{CatalogView, KvView, ServiceEntry};

/// A service's instances in another datacenter (None: no longer watched).
pub(super) struct Update {
    pub(super) service: String,
    pub(super) datacenter: String,
    pub(super) spec: Option<ServiceSpec>,
    pub(super) received: Instant,
}

/// The KV tree holding the per-service settings.
pub const MAXCONN_PREFIX: &str = "haproxy/";

/// True when a catalog tag means the load balancer must look at the service.
fn is_lb_tag(tag: &str) -> bool {
    let tag = tag.trim();
    tag == "haproxy"
        || tag.starts_with("haproxy_route=")
        || tag.starts_with("haproxy_tcp=")
        || tag.starts_with("urlprefix-")
}

/// What the builder has built from, so the next picture costs only what changed.
struct Inputs {
    /// The entry each local spec was made from.
    seen: HashMap<String, Arc<ServiceEntry>>,
    /// Every spec by (service, datacenter).
    specs: BTreeMap<(String, String), ServiceSpec>,
}

/// The watcher's per-change step, apart from the channels: takes pictures of the
/// catalog and other datacenters' specs, and turns them into the next table.
/// Public so that `benches/lb_table.rs` measures the path `run` takes.
pub struct Feed {
    config: TableConfig,
    inputs: Inputs,
    backends: BackendCache,
    last_warnings: HashSet<String>,
}

/// What one [`Feed::publish`] did.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Specs in the table.
    pub services: usize,
    /// Instance addresses in the table.
    pub instances: usize,
    /// How long building and swapping took.
    pub built: std::time::Duration,
}

impl Feed {
    /// A feed that has seen nothing yet.
    pub fn new(config: TableConfig) -> Self {
        Self {
            config,
            inputs: Inputs {
                seen: HashMap::new(),
                specs: BTreeMap::new(),
            },
            backends: BackendCache::default(),
            last_warnings: HashSet::new(),
        }
    }

    /// Takes a new picture of the local catalog; returns how many services changed.
    pub fn catalog(&mut self, services: &BTreeMap<String, Arc<ServiceEntry>>) -> usize {
        apply_catalog(&mut self.inputs, services, &self.config.local_datacenter)
    }

    /// Takes another datacenter's spec.
    pub(super) fn remote(&mut self, u: Update) {
        apply_remote(&mut self.inputs, u);
    }

    /// Builds the table from what the feed holds, swaps it into `state`, lets the
    /// registry forget what left, and logs the warnings that are new.
    pub fn publish(&mut self, state: &LbState) -> Published {
        let started = Instant::now();
        let specs: Vec<&ServiceSpec> = self.inputs.specs.values().collect();
        let (table, warnings) = RoutingTable::build_cached(&self.config, &specs, &state.health, &mut self.backends);
        let live: HashSet<SocketAddr> = specs.iter().flat_map(|s| s.instances.iter().map(|i| i.addr)).collect();
        state.health.retain(&live);
        state
            .health
            .retain_routes(specs.iter().map(|s| (s.name.as_str(), s.datacenter.as_str())));
        state.table.store(Arc::new(table));
        let built = started.elapsed();
        let warnings: HashSet<String> = warnings.into_iter().collect();
        for w in warnings.difference(&self.last_warnings) {
            tracing::warn!("lb: {w}");
        }
        self.last_warnings = warnings;
        Published {
            services: specs.len(),
            instances: live.len(),
            built,
        }
    }
}

/// Builds tables from `catalog`, `maxconn` and `remote` until shutdown; returns
/// when its inputs end (the caller treats that as a failure).
pub(super) async fn run(
    catalog: CatalogView,
    maxconn: KvView,
    mut remote: mpsc::UnboundedReceiver<Update>,
    config: TableConfig,
    state: Arc<LbState>,
    shutdown: CancellationToken,
) {
    let mut pictures = catalog.subscribe();
    let mut kv = maxconn.subscribe();
    let mut feed = Feed::new(config);
    apply_maxconn(&state, &kv.borrow_and_update());
    loop {
        let mut earliest: Option<Instant> = None;
        let mut dirty = false;
        let mut local_changed = false;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = pictures.changed() => {
                if changed.is_err() {
                    tracing::error!("lb: the consul view has stopped");
                    return;
                }
                local_changed = true;
            }
            u = remote.recv() => match u {
                Some(u) => {
                    earliest = Some(u.received);
                    feed.remote(u);
                    dirty = true;
                }
                None => return,
            },
            changed = kv.changed() => {
                if changed.is_err() {
                    tracing::error!("lb: the maxconn watch has stopped");
                    return;
                }
                apply_maxconn(&state, &kv.borrow_and_update());
                continue;
            }
        }
        // Everything already queued goes into this one table.
        while let Ok(u) = remote.try_recv() {
            earliest = Some(earliest.map_or(u.received, |e| e.min(u.received)));
            feed.remote(u);
            dirty = true;
        }
        let picture = pictures.borrow_and_update().clone();
        state.consul_ok.store(catalog.status().ok(), Ordering::Relaxed);
        if !picture.complete {
            continue;
        }
        if (local_changed || !state.is_ready()) && feed.catalog(&picture.services) > 0 {
            earliest = Some(earliest.map_or(picture.received, |e| e.min(picture.received)));
            dirty = true;
        }
        if !dirty && state.is_ready() {
            continue;
        }
        let Published {
            services,
            instances,
            built,
        } = feed.publish(&state);
        state.stats.table_built(built);
        state.changes.send_modify(|n| *n += 1);
        if let Some(earliest) = earliest {
            state.stats.propagation(earliest.elapsed());
        }
        if state.set_ready() {
            tracing::info!(
                services,
                instances,
                build_ms = built.as_secs_f64() * 1000.0,
                "lb: first routing table built; answering requests"
            );
        } else {
            tracing::info!(
                services,
                instances,
                build_us = built.as_micros() as u64,
                propagation_us = earliest.map_or(0, |e| e.elapsed().as_micros() as u64),
                "lb: routing table updated"
            );
        }
    }
}

/// Takes a new catalog picture into `inputs`; returns how many services changed.
fn apply_catalog(inputs: &mut Inputs, services: &BTreeMap<String, Arc<ServiceEntry>>, datacenter: &str) -> usize {
    let mut touched = 0;
    let gone: Vec<String> = inputs
        .seen
        .keys()
        .filter(|name| !services.contains_key(*name))
        .cloned()
        .collect();
    for name in gone {
        inputs.seen.remove(&name);
        inputs.specs.remove(&(name, datacenter.to_string()));
        touched += 1;
    }
    for (name, entry) in services {
        if inputs.seen.get(name).is_some_and(|seen| Arc::ptr_eq(seen, entry)) {
            continue;
        }
        let key = (name.clone(), datacenter.to_string());
        let had = inputs.specs.contains_key(&key);
        inputs.seen.insert(name.clone(), entry.clone());
        if entry.tags.iter().any(|t| is_lb_tag(t)) {
            inputs.specs.insert(key, service_spec(entry, datacenter));
            touched += 1;
        } else if had {
            inputs.specs.remove(&key);
            touched += 1;
        }
    }
    touched
}

fn apply_remote(inputs: &mut Inputs, u: Update) {
    let key = (u.service, u.datacenter);
    match u.spec {
        Some(spec) => inputs.specs.insert(key, spec),
        None => inputs.specs.remove(&key),
    };
}

fn apply_maxconn(state: &LbState, tree: &KvTree) {
    let parsed = maxconn_values(tree);
    if **state.maxconn.load() != parsed {
        tracing::info!(maxconn = ?parsed, default = super::DEFAULT_MAXCONN, "lb: maxconn from Consul KV");
        state.maxconn.store(Arc::new(parsed));
    }
}

/// `haproxy/<svc>/maxconn` values that are positive numbers, by service; others
/// are logged and left to the default.
fn maxconn_values(tree: &KvTree) -> HashMap<String, usize> {
    let mut values = HashMap::new();
    for (key, value) in &tree.entries {
        let Some(service) = key
            .strip_prefix(MAXCONN_PREFIX)
            .and_then(|k| k.strip_suffix("/maxconn"))
            .filter(|s| !s.is_empty() && !s.contains('/'))
        else {
            continue;
        };
        match value.as_deref().map(|v| v.trim().parse::<usize>()) {
            Some(Ok(n)) if n > 0 => {
                values.insert(service.to_string(), n);
            }
            _ => tracing::warn!(key, value = ?value, "lb: maxconn is not a positive number; using the default"),
        }
    }
    values
}

/// The passing instances of `entry` that ask for the lb, with parsed tags.
pub(super) fn service_spec(entry: &ServiceEntry, datacenter: &str) -> ServiceSpec {
    let mut instances = Vec::new();
    for e in entry.passing() {
        let (tags, warnings) = parse_tags(&e.tags);
        for w in warnings {
            tracing::warn!(service = entry.name, instance = %e.id, "lb: {w}");
        }
        if !tags.wants_lb() {
            continue;
        }
        let Ok(ip) = e.address.parse::<IpAddr>() else {
            tracing::warn!(service = entry.name, instance = %e.id, address = e.address, "lb: instance address is not an IP; skipped");
            continue;
        };
        if e.port == 0 {
            tracing::warn!(service = entry.name, instance = %e.id, "lb: instance has no usable port; skipped");
            continue;
        }
        instances.push(InstanceSpec {
            id: e.id.clone(),
            node: e.node.clone(),
            addr: SocketAddr::new(ip, e.port),
            tags,
        });
    }
    ServiceSpec {
        name: entry.name.clone(),
        datacenter: datacenter.to_string(),
        instances,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::{Health, InstanceEntry};

    #[test]
    fn maxconn_values_take_positive_numbers_of_direct_service_keys() {
        let tree = |pairs: &[(&str, Option<&str>)]| KvTree {
            entries: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect(),
            loaded: true,
        };
        let values = maxconn_values(&tree(&[
            ("haproxy/web/maxconn", Some(" 20\n")),
            ("haproxy/api/maxconn", Some("0")),
            ("haproxy/bad/maxconn", Some("lots")),
            ("haproxy/empty/maxconn", None),
            ("haproxy/web/other", Some("5")),
            ("haproxy/a/b/maxconn", Some("5")),
            ("haproxy//maxconn", Some("5")),
        ]));
        assert_eq!(values, HashMap::from([("web".to_string(), 20)]));
    }

    fn entry(name: &str, tags: &[&str], port: u16) -> Arc<ServiceEntry> {
        Arc::new(ServiceEntry {
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            instances: vec![InstanceEntry {
                id: format!("{name}-1"),
                node: "n".into(),
                address: "10.0.0.1".into(),
                port,
                tags: tags.iter().map(|t| t.to_string()).collect(),
                health: Health::Passing,
                modify_index: 1,
                checks: Default::default(),
            }],
        })
    }

    #[test]
    fn only_changed_services_are_rebuilt() {
        let mut inputs = Inputs {
            seen: HashMap::new(),
            specs: BTreeMap::new(),
        };
        let web = entry("web", &["haproxy"], 80);
        let db = entry("db", &["other"], 5432);
        let mut services = BTreeMap::from([("web".to_string(), web.clone()), ("db".to_string(), db)]);
        assert_eq!(apply_catalog(&mut inputs, &services, "dc1"), 1);
        assert_eq!(inputs.specs.len(), 1);
        // The same Arcs again: nothing to do.
        assert_eq!(apply_catalog(&mut inputs, &services, "dc1"), 0);
        // web loses its tag, api arrives, db leaves.
        services.insert("web".into(), entry("web", &["x"], 80));
        services.insert("api".into(), entry("api", &["haproxy_tcp=5000"], 5000));
        services.remove("db");
        assert_eq!(apply_catalog(&mut inputs, &services, "dc1"), 3);
        let names: Vec<&str> = inputs.specs.keys().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["api"]);
    }

    #[test]
    fn instances_without_a_usable_address_or_port_are_skipped() {
        let mut e = (*entry("web", &["haproxy"], 0)).clone();
        e.instances.push(InstanceEntry {
            address: "not-an-ip".into(),
            port: 80,
            ..e.instances[0].clone()
        });
        assert!(service_spec(&e, "dc1").instances.is_empty());
    }
}
