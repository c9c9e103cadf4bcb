//! Other datacenters: `svc.service.<dc>.<domain>` routed to that datacenter's
//! instances, watched on demand.
//!
//! ```text
//!  proxy: Destination::OtherDatacenter ──want(host)──▶ bounded channel (dropped if full)
//!  run: parse svc + dc ─▶ dc known to Consul (/v1/catalog/datacenters, cached)?
//!        ─▶ poll(svc, dc): /v1/health/service/<svc>?dc= every REMOTE_POLL through
//!           the shared pool ──Update (when it changed)──▶ table builder
//!  every REMOTE_SWEEP: a poll whose route served nothing for REMOTE_IDLE stops
//! ```
//!
//! Polled, not watched: a blocking query would hold a connection to the agent
//! per route, and the process holds a fixed number of those. A change in another
//! datacenter reaches its names within [`REMOTE_POLL`].
//!
//! Until the first answer arrives (and whenever that datacenter has no passing
//! instance or cannot be reached) such names go to the local instances, as
//! PanteraS did. Watches are capped at [`MAX_REMOTE_WATCHES`], and only
//! datacenters Consul lists are watched, so made-up Host names cannot make the lb
//! open connections without end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::LbState;
use super::table::{ServiceSpec, TableConfig, other_datacenter_name};
use super::watch::{Update, service_spec};
use crate::consul::{ConsulHttp, ServiceEntry};

/// Remote (service, datacenter) routes polled at most.
pub const MAX_REMOTE_WATCHES: usize = 64;
/// How often a remote route is read again.
pub const REMOTE_POLL: Duration = Duration::from_secs(2);
/// A remote watch whose route answered no request for this long is stopped.
pub const REMOTE_IDLE: Duration = Duration::from_secs(600);
/// How often idle remote watches are looked for.
const REMOTE_SWEEP: Duration = Duration::from_secs(60);
/// How long the list of datacenters is trusted.
const DATACENTERS_TTL: Duration = Duration::from_secs(30);
/// Pending requests for a datacenter watch (more are dropped; the next request
/// for the name asks again).
pub const WANTS_QUEUE: usize = 64;

struct RemoteWatch {
    stop: CancellationToken,
    /// Requests answered through the route when last swept, and since when.
    served: u64,
    since: Instant,
}

/// Starts and stops the remote datacenter watches until shutdown.
pub(super) async fn run(
    consul: ConsulHttp,
    config: TableConfig,
    state: Arc<LbState>,
    updates: mpsc::UnboundedSender<Update>,
    shutdown: CancellationToken,
) {
    let Some(mut wants) = state.take_datacenter_wants() else {
        return;
    };
    let domain = config.consul_domain.trim().trim_matches('.').to_ascii_lowercase();
    let suffix = if domain.is_empty() {
        String::new()
    } else {
        format!(".{domain}")
    };
    let local = config.local_datacenter.trim().to_ascii_lowercase();
    let mut known: Option<(Instant, Vec<String>)> = None;
    let mut watches: HashMap<(String, String), RemoteWatch> = HashMap::new();
    let polls = tokio_util::task::TaskTracker::new();
    let mut sweep = tokio::time::interval(REMOTE_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let host = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sweep.tick() => {
                stop_idle(&state, &mut watches, &updates);
                continue;
            }
            h = wants.recv() => match h { Some(h) => h, None => break },
        };
        let Some((service, dc)) = other_datacenter_name(&host, &suffix) else {
            continue;
        };
        let key = (service.to_string(), dc.to_string());
        if dc == local || watches.contains_key(&key) {
            continue;
        }
        if watches.len() >= MAX_REMOTE_WATCHES {
            tracing::warn!(
                service,
                datacenter = dc,
                max = MAX_REMOTE_WATCHES,
                "lb: too many other-datacenter routes watched; this one stays on the local instances"
            );
            continue;
        }
        if known.as_ref().is_none_or(|(at, _)| at.elapsed() > DATACENTERS_TTL) {
            match consul.datacenters().await {
                Ok(list) => known = Some((Instant::now(), list.iter().map(|d| d.to_ascii_lowercase()).collect())),
                Err(error) => {
                    tracing::warn!(%error, "lb: cannot list Consul's datacenters; other-datacenter names stay local");
                    continue;
                }
            }
        }
        // Consul names datacenters in lower case; a name it does not list is
        // just part of a Host header.
        if !known.as_ref().is_some_and(|(_, list)| list.iter().any(|d| d == dc)) {
            continue;
        }
        tracing::info!(
            service,
            datacenter = dc,
            "lb: watching another datacenter for its names"
        );
        let stop = shutdown.child_token();
        polls.spawn(poll(
            consul.clone(),
            key.0.clone(),
            key.1.clone(),
            updates.clone(),
            stop.clone(),
        ));
        watches.insert(
            key,
            RemoteWatch {
                stop,
                served: 0,
                since: Instant::now(),
            },
        );
    }
    for w in watches.values() {
        w.stop.cancel();
    }
    polls.close();
    polls.wait().await;
}

/// Reads `service` in `datacenter` every [`REMOTE_POLL`] until `stop`, sending
/// an update whenever its passing instances change.
async fn poll(
    consul: ConsulHttp,
    service: String,
    datacenter: String,
    updates: mpsc::UnboundedSender<Update>,
    stop: CancellationToken,
) {
    let mut last: Option<Vec<(String, std::net::SocketAddr)>> = None;
    let mut failing = false;
    loop {
        let fetched = tokio::select! {
            _ = stop.cancelled() => return,
            r = consul.health_service(&service, Some(&datacenter)) => r,
        };
        let received = Instant::now();
        match fetched {
            Ok((rows, _)) => {
                failing = false;
                let spec = match ServiceEntry::from_health(&service, rows) {
                    Some(entry) => service_spec(&entry, &datacenter),
                    None => ServiceSpec {
                        name: service.clone(),
                        datacenter: datacenter.clone(),
                        instances: Vec::new(),
                    },
                };
                let key: Vec<(String, std::net::SocketAddr)> =
                    spec.instances.iter().map(|i| (i.id.clone(), i.addr)).collect();
                if last.as_ref() != Some(&key) {
                    last = Some(key);
                    let update = Update {
                        service: service.clone(),
                        datacenter: datacenter.clone(),
                        spec: Some(spec),
                        received,
                    };
                    if updates.send(update).is_err() {
                        return;
                    }
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(service, datacenter, %error,
                        "lb: cannot read another datacenter; its names keep their last instances or fall back to the local ones");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REMOTE_POLL) => {}
        }
    }
}

/// Stops the watches whose routes served nothing for [`REMOTE_IDLE`] and takes
/// their instances out of the table.
fn stop_idle(
    state: &LbState,
    watches: &mut HashMap<(String, String), RemoteWatch>,
    updates: &mpsc::UnboundedSender<Update>,
) {
    watches.retain(|(service, dc), w| {
        // Read without creating counters for a route the table never built.
        let served = state.health.route_total(service, dc).unwrap_or(0);
        if served != w.served {
            w.served = served;
            w.since = Instant::now();
            return true;
        }
        if w.since.elapsed() < REMOTE_IDLE {
            return true;
        }
        tracing::info!(
            service,
            datacenter = dc,
            "lb: other-datacenter route idle; watch stopped"
        );
        w.stop.cancel();
        let _ = updates.send(Update {
            service: service.clone(),
            datacenter: dc.clone(),
            spec: None,
            received: Instant::now(),
        });
        false
    });
}
