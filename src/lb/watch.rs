//! Feeds the routing table from the process's view of Consul, live.
//!
//! ```text
//!  CatalogView (consul::catalog) ──new picture──▶ services whose entry changed
//!      (OrdMap::diff against the last picture: the two share every node the
//!      change did not touch, so this costs the change, not the catalog)
//!      ──▶ ServiceSpec of each LB-tagged service (passing instances, parsed tags)
//!  remote::run ──Update──▶ other datacenters' specs
//!  KvView haproxy/ ──▶ maxconn per service
//!            └──▶ TableState::apply (by delta: the changed services' claims
//!                 only), ArcSwap::store (requests in flight keep the table they
//!                 started with); the first table from a complete picture makes
//!                 the lb ready; every RESYNC_EVERY a full build re-checks it
//! ```
//!
//! On a Consul outage the view keeps its last picture, so the last good table
//! stays live; `LbState::consul_ok` and the view's age say so.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use imbl::ordmap::DiffItem;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::LbState;
use super::table::{Applied, InstanceSpec, ServiceSpec, TableConfig, TableState};
use super::tags::parse_tags;
use crate::consul::kv::KvTree;
use crate::consul::{CatalogView, KvView, ServiceEntry, Services};

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

/// How often the table is built whole from the specs, however few the changes:
/// the delta is checked against it (a difference is logged) and any drift healed.
const RESYNC_EVERY: Duration = Duration::from_secs(600);

/// The watcher's per-change step, apart from the channels: takes pictures of the
/// catalog and other datacenters' specs, and turns them into the next table at a
/// cost proportional to what changed. Public so that `benches/lb_table.rs`
/// measures the path `run` takes.
pub struct Feed {
    /// The local datacenter, which the catalog's specs are of.
    datacenter: String,
    /// The catalog as last taken: the next picture is diffed against it (the
    /// two share every node a change did not touch, so that is cheap).
    last: Services,
    /// The specs and the table they make.
    tables: TableState,
}

/// What one [`Feed::publish`] did.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Specs in the table.
    pub services: usize,
    /// Instance addresses in the table.
    pub instances: usize,
    /// How long building and swapping took.
    pub built: Duration,
    /// True when the table was built whole rather than changed by delta.
    pub full: bool,
}

impl Feed {
    /// A feed that has seen nothing yet.
    pub fn new(config: TableConfig) -> Self {
        Self {
            datacenter: config.local_datacenter.clone(),
            last: Services::new(),
            tables: TableState::new(config),
        }
    }

    /// Takes a new picture of the local catalog; returns how many specs changed.
    pub fn catalog(&mut self, services: &Services) -> usize {
        let mut changed = 0;
        for d in self.last.diff(services) {
            let queued = match d {
                DiffItem::Add(name, entry) | DiffItem::Update { new: (name, entry), .. } => {
                    if entry.tags.iter().any(|t| is_lb_tag(t)) {
                        self.tables.set(service_spec(entry, &self.datacenter))
                    } else {
                        self.tables.remove(name, &self.datacenter)
                    }
                }
                DiffItem::Remove(name, _) => self.tables.remove(name, &self.datacenter),
            };
            changed += usize::from(queued);
        }
        self.last = services.clone();
        changed
    }

    /// Takes another datacenter's spec; false when it changes nothing.
    pub(super) fn remote(&mut self, u: Update) -> bool {
        match u.spec {
            Some(spec) => self.tables.set(spec),
            None => self.tables.remove(&u.service, &u.datacenter),
        }
    }

    /// Applies what changed to the table, swaps it into `state` (the carryover
    /// forgets the addresses and routes that left), and logs the warnings that
    /// are new.
    pub fn publish(&mut self, state: &LbState) -> Published {
        let started = Instant::now();
        let applied = self.tables.apply(&state.health);
        state.table.store(Arc::new(self.tables.table().clone()));
        self.published(started, applied)
    }

    /// Builds the table whole (the periodic re-sync), checks that the table the
    /// deltas made routes the same, and swaps it into `state`.
    pub fn resync(&mut self, state: &LbState) -> Published {
        let started = Instant::now();
        let before = self.tables.table().clone();
        let applied = self.tables.rebuild(&state.health);
        if let Err(difference) = self.tables.same_routes(&before) {
            tracing::warn!(%difference, "lb: the re-sync found the table out of step with its specs; rebuilt");
        }
        state.table.store(Arc::new(self.tables.table().clone()));
        self.published(started, applied)
    }

    fn published(&self, started: Instant, applied: Applied) -> Published {
        let built = started.elapsed();
        for w in &applied.new_warnings {
            tracing::warn!("lb: {w}");
        }
        Published {
            services: self.tables.services(),
            instances: self.tables.instances(),
            built,
            full: applied.full,
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
    let mut resync_at = Instant::now() + RESYNC_EVERY;
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
                    dirty |= feed.remote(u);
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
            _ = tokio::time::sleep_until(resync_at.into()), if state.is_ready() => {
                resync_at = Instant::now() + RESYNC_EVERY;
                let p = feed.resync(&state);
                state.stats.table_built(p.built);
                state.changes.send_modify(|n| *n += 1);
                tracing::debug!(services = p.services, build_us = p.built.as_micros() as u64, "lb: routing table re-synced");
                continue;
            }
        }
        // Everything already queued goes into this one table.
        while let Ok(u) = remote.try_recv() {
            earliest = Some(earliest.map_or(u.received, |e| e.min(u.received)));
            dirty |= feed.remote(u);
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
            full,
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
                full,
                build_us = built.as_micros() as u64,
                propagation_us = earliest.map_or(0, |e| e.elapsed().as_micros() as u64),
                "lb: routing table updated"
            );
        }
    }
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

    fn cfg() -> TableConfig {
        TableConfig {
            consul_domain: "consul".into(),
            local_datacenter: "dc1".into(),
            add_domain: None,
            landing_hosts: Vec::new(),
            policy: Default::default(),
        }
    }

    fn names(feed: &Feed) -> Vec<&str> {
        feed.tables.specs().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn only_changed_services_are_rebuilt() {
        let state = LbState::new(&cfg());
        let mut feed = Feed::new(cfg());
        let web = entry("web", &["haproxy"], 80);
        let db = entry("db", &["other"], 5432);
        let mut services = Services::from_iter([("web".to_string(), web.clone()), ("db".to_string(), db)]);
        assert_eq!(feed.catalog(&services), 1);
        assert!(feed.publish(&state).full, "the first table is built whole");
        assert_eq!(names(&feed), ["web"]);
        // The same picture again: nothing to do.
        assert_eq!(feed.catalog(&services.clone()), 0);
        // A new entry with the same spec, or an untagged service changing: nothing either.
        services.insert("web".into(), entry("web", &["haproxy"], 80));
        services.insert("db".into(), entry("db", &["other"], 5433));
        assert_eq!(feed.catalog(&services), 0);
        // web loses its tag, api arrives, db leaves.
        services.insert("web".into(), entry("web", &["x"], 80));
        services.insert("api".into(), entry("api", &["haproxy_tcp=5000"], 5000));
        services.remove("db");
        assert_eq!(feed.catalog(&services), 2);
        let p = feed.publish(&state);
        assert!(p.full, "api's port is a new listener: a full build");
        assert_eq!(names(&feed), ["api"]);
        // A weight change is a delta.
        services.insert(
            "api".into(),
            entry("api", &["haproxy_tcp=5000", "haproxy_weight=5"], 5000),
        );
        assert_eq!(feed.catalog(&services), 1);
        let p = feed.publish(&state);
        assert!(!p.full);
        let table = state.table.load();
        let (port, backend) = table.tcp_ports().next().expect("api's port");
        assert_eq!((port, backend.instances[0].weight), (5000, 5));
    }

    /// The carryover follows the delta: an address that left every spec is
    /// forgotten, and so is a route that never served.
    #[test]
    fn the_carryover_forgets_what_a_delta_took_away() {
        let state = LbState::new(&cfg());
        let mut feed = Feed::new(cfg());
        let mut services = Services::from_iter([
            ("web".to_string(), entry("web", &["haproxy"], 80)),
            ("api".to_string(), entry("api", &["haproxy"], 81)),
        ]);
        feed.catalog(&services);
        feed.publish(&state);
        assert_eq!((state.health.addr_count(), state.health.route_count()), (2, 2));
        services.remove("api");
        feed.catalog(&services);
        assert!(!feed.publish(&state).full);
        assert_eq!((state.health.addr_count(), state.health.route_count()), (1, 1));
        let gone = SocketAddr::from(([10, 0, 0, 1], 81));
        assert!(
            !state
                .table
                .load()
                .backends()
                .any(|b| b.instances.iter().any(|i| i.addr == gone)),
            "api's instance is out of the table"
        );
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
