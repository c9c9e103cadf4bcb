//! Feeds the routing table from the Consul catalog, live, with blocking queries.
//!
//! ```text
//!  /v1/catalog/services (blocking) ──▶ services carrying an LB tag
//!      └─ one task per such service: /v1/health/service/<svc>?passing (blocking)
//!  /v1/kv/haproxy/?recurse (blocking) ──▶ maxconn per service
//!            └─ changed? ──▶ Update ──mpsc──▶ builder
//!  builder: drain every pending update, RoutingTable::build, ArcSwap::store
//!           (requests in flight keep the table they started with), record the
//!           time from Consul's answer to the new table being live
//! ```
//!
//! On a Consul outage every watch keeps its last result: the last good table
//! stays live, and [`LbState::consul_ok`] says so.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::LbState;
use super::table::{InstanceSpec, RoutingTable, ServiceSpec, TableConfig};
use super::tags::parse_tags;
use crate::consul::{ConsulClient, HealthEntry, Watch};

/// A service's new passing instances (None: the service left the LB), with the
/// moment Consul's answer arrived.
pub(super) struct Update {
    pub(super) service: String,
    pub(super) datacenter: String,
    pub(super) spec: Option<ServiceSpec>,
    pub(super) received: Instant,
}

/// True when a catalog tag means the load balancer must watch the service.
fn is_lb_tag(tag: &str) -> bool {
    tag == "haproxy"
        || tag.starts_with("haproxy_route=")
        || tag.starts_with("haproxy_tcp=")
        || tag.starts_with("urlprefix-")
}

/// Runs the watches and the table builder until shutdown.
pub async fn run(
    consul: ConsulClient,
    table_config: TableConfig,
    datacenter: String,
    state: Arc<LbState>,
    shutdown: CancellationToken,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let remote = tokio::spawn(super::remote::run(
        consul.clone(),
        table_config.clone(),
        state.clone(),
        tx.clone(),
        shutdown.clone(),
    ));
    let builder = tokio::spawn(build_tables(rx, table_config, state.clone(), shutdown.clone()));
    let maxconn = tokio::spawn(watch_maxconn(consul.clone(), state.clone(), shutdown.clone()));
    let mut watch = Watch::default();
    let mut watched: HashMap<String, CancellationToken> = HashMap::new();
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = consul.services(watch.index()) => r,
        };
        let pause = match result {
            Ok((services, index)) => {
                watch.success(index);
                state.consul_ok.store(true, Ordering::Relaxed);
                let wanted: HashSet<&String> = services
                    .iter()
                    .filter(|(_, tags)| tags.iter().any(|t| is_lb_tag(t)))
                    .map(|(name, _)| name)
                    .collect();
                watched.retain(|name, token| {
                    let keep = wanted.contains(name);
                    if !keep {
                        token.cancel();
                        let _ = tx.send(Update {
                            service: name.clone(),
                            datacenter: datacenter.clone(),
                            spec: None,
                            received: Instant::now(),
                        });
                    }
                    keep
                });
                for name in wanted {
                    if !watched.contains_key(name) {
                        let token = shutdown.child_token();
                        watched.insert(name.clone(), token.clone());
                        tokio::spawn(watch_service(
                            consul.clone(),
                            name.clone(),
                            datacenter.clone(),
                            None,
                            state.clone(),
                            tx.clone(),
                            token,
                        ));
                    }
                }
                watch.spacing()
            }
            Err(error) => {
                state.consul_ok.store(false, Ordering::Relaxed);
                let pause = watch.failure();
                tracing::warn!(%error, retry_in = ?pause, "lb: consul service list unavailable; keeping the current routes");
                pause
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    for token in watched.values() {
        token.cancel();
    }
    drop(tx);
    let _ = remote.await;
    let _ = builder.await;
    let _ = maxconn.await;
}

/// Follows the passing instances of `service` in `datacenter`; `remote` is the
/// datacenter to ask Consul about (`?dc=`) when it is not the local one.
#[allow(clippy::too_many_arguments)]
pub(super) async fn watch_service(
    consul: ConsulClient,
    service: String,
    datacenter: String,
    remote: Option<String>,
    state: Arc<LbState>,
    tx: mpsc::UnboundedSender<Update>,
    stop: CancellationToken,
) {
    let mut watch = Watch::default();
    let mut last: Option<Vec<HealthEntryKey>> = None;
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = async {
                match &remote {
                    Some(dc) => consul.passing_instances_in(&service, dc, watch.index()).await,
                    None => consul.passing_instances(&service, watch.index()).await,
                }
            } => r,
        };
        let received = Instant::now();
        let pause = match result {
            Ok((entries, index)) => {
                watch.success(index);
                state.consul_ok.store(true, Ordering::Relaxed);
                let key: Vec<HealthEntryKey> = entries.iter().map(HealthEntryKey::from).collect();
                if last.as_ref() != Some(&key) {
                    last = Some(key);
                    let spec = service_spec(&service, &datacenter, &entries);
                    if tx
                        .send(Update {
                            service: service.clone(),
                            datacenter: datacenter.clone(),
                            spec: Some(spec),
                            received,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                watch.spacing()
            }
            Err(error) => {
                let pause = watch.failure();
                if remote.is_none() {
                    state.consul_ok.store(false, Ordering::Relaxed);
                    tracing::warn!(service, %error, retry_in = ?pause, "lb: consul watch failed; keeping this service's last instances");
                } else {
                    tracing::warn!(service, datacenter, %error, retry_in = ?pause,
                        "lb: watch of another datacenter failed; its names fall back to the local instances");
                }
                pause
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Follows Consul KV `haproxy/<svc>/maxconn` (PanteraS's per-instance cap) for
/// every service with one blocking query on the `haproxy/` tree: one connection
/// to Consul, not one per service (Consul caps connections per client address,
/// `limits.http_max_conns_per_client`, 200 by default).
async fn watch_maxconn(consul: ConsulClient, state: Arc<LbState>, stop: CancellationToken) {
    let mut watch = Watch::default();
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => break,
            r = consul.kv_tree(MAXCONN_PREFIX, watch.index()) => r,
        };
        let pause = match result {
            Ok((tree, index)) => {
                watch.success(index);
                let parsed = maxconn_values(&tree);
                if **state.maxconn.load() != parsed {
                    tracing::info!(maxconn = ?parsed, default = super::DEFAULT_MAXCONN, "lb: maxconn from Consul KV");
                    state.maxconn.store(Arc::new(parsed));
                }
                watch.spacing()
            }
            Err(error) => {
                let pause = watch.failure();
                tracing::debug!(%error, "lb: maxconn watch failed; keeping the last values");
                pause
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The KV tree holding the per-service settings.
const MAXCONN_PREFIX: &str = "haproxy/";

/// `haproxy/<svc>/maxconn` values that are positive numbers, by service; others
/// are logged and left to the default.
fn maxconn_values(tree: &[(String, Option<String>)]) -> HashMap<String, usize> {
    let mut values = HashMap::new();
    for (key, value) in tree {
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

/// What makes two answers for a service the same (Consul returns at the end of
/// every wait even when nothing changed).
#[derive(Debug, PartialEq, Eq)]
struct HealthEntryKey {
    id: String,
    address: String,
    port: u16,
    tags: Vec<String>,
}

impl From<&HealthEntry> for HealthEntryKey {
    fn from(e: &HealthEntry) -> Self {
        Self {
            id: e.service.id.clone(),
            address: e.address().to_string(),
            port: e.service.port,
            tags: e.service.tags.clone(),
        }
    }
}

fn service_spec(service: &str, datacenter: &str, entries: &[HealthEntry]) -> ServiceSpec {
    let mut instances = Vec::new();
    for e in entries {
        let (tags, warnings) = parse_tags(&e.service.tags);
        for w in warnings {
            tracing::warn!(service, instance = %e.service.id, "lb: {w}");
        }
        if !tags.wants_lb() {
            continue;
        }
        let Ok(ip) = e.address().parse::<IpAddr>() else {
            tracing::warn!(service, instance = %e.service.id, address = e.address(), "lb: instance address is not an IP; skipped");
            continue;
        };
        instances.push(InstanceSpec {
            id: e.service.id.clone(),
            node: e.node.node.clone(),
            addr: SocketAddr::new(ip, e.service.port),
            tags,
        });
    }
    ServiceSpec {
        name: service.to_string(),
        datacenter: datacenter.to_string(),
        instances,
    }
}

async fn build_tables(
    mut rx: mpsc::UnboundedReceiver<Update>,
    config: TableConfig,
    state: Arc<LbState>,
    shutdown: CancellationToken,
) {
    let mut services: BTreeMap<(String, String), ServiceSpec> = BTreeMap::new();
    let mut last_warnings: HashSet<String> = HashSet::new();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            u = rx.recv() => match u { Some(u) => u, None => return },
        };
        // Coalesce a burst: everything already queued goes into this one table.
        let mut earliest = first.received;
        let mut batch = vec![first];
        while let Ok(u) = rx.try_recv() {
            earliest = earliest.min(u.received);
            batch.push(u);
        }
        for u in batch {
            match u.spec {
                Some(spec) => services.insert((u.service, u.datacenter), spec),
                None => services.remove(&(u.service, u.datacenter)),
            };
        }
        let specs: Vec<ServiceSpec> = services.values().cloned().collect();
        let (table, warnings) = RoutingTable::build(&config, &specs, &state.health);
        let live: HashSet<SocketAddr> = specs.iter().flat_map(|s| s.instances.iter().map(|i| i.addr)).collect();
        state.health.retain(&live);
        state.table.store(Arc::new(table));
        state.changes.send_modify(|n| *n += 1);
        let took = earliest.elapsed();
        state.stats.propagation(took);
        let warnings: HashSet<String> = warnings.into_iter().collect();
        for w in warnings.difference(&last_warnings) {
            tracing::warn!("lb: {w}");
        }
        last_warnings = warnings;
        tracing::info!(
            services = specs.len(),
            instances = live.len(),
            propagation_us = took.as_micros() as u64,
            "lb: routing table updated"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maxconn_values_take_positive_numbers_of_direct_service_keys() {
        let tree = |pairs: &[(&str, Option<&str>)]| -> Vec<(String, Option<String>)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect()
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
}
