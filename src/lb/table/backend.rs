//! The backends a table routes to: one service's instances in one datacenter
//! ([`Backend`], [`BackendInstance`]) and the pick of an instance per request
//! (smooth weighted round-robin over the available ones).
//!
//! ```text
//!  compile ──▶ Backend { instances: [BackendInstance { addr, weight, state }] }
//!  proxy, tcp ──Backend::pick(now, tried)──▶ instance (not ejected, check up,
//!                                             else the least recently ejected)
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use super::carryover::InstanceState;
use crate::lb::stats::RequestCounters;
use crate::lb::tags::HttpCheck;

/// One instance as the proxy uses it.
#[derive(Debug)]
pub struct BackendInstance {
    /// Consul service ID.
    pub id: String,
    /// Consul node name.
    pub node: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Share of new traffic (`haproxy_weight`); 0 takes none.
    pub weight: u16,
    /// State shared with every other table that has this address.
    pub health: Arc<InstanceState>,
    /// The active HTTP check, or `None` for a TCP connect check.
    pub httpchk: Option<HttpCheck>,
}

/// The instances of one service that take HTTP (or, for a port from
/// [`RoutingTable::tcp_ports`], TCP) traffic, with smooth weighted round-robin state.
#[derive(Debug)]
pub struct Backend {
    /// Consul service name as registered.
    pub service: String,
    /// Datacenter of the instances.
    pub datacenter: String,
    /// The instances, in the order Consul listed them.
    pub instances: Vec<BackendInstance>,
    /// Requests answered through this route (kept across tables).
    pub counters: Arc<RequestCounters>,
    /// Current weight per instance (nginx's `current_weight`), index-aligned with
    /// `instances`. A parking_lot Mutex: held for a few additions, never across `.await`.
    current: Mutex<Vec<i64>>,
}

impl Backend {
    /// A backend over `instances`, starting its round-robin sequence afresh.
    pub fn new(
        service: String,
        datacenter: String,
        instances: Vec<BackendInstance>,
        counters: Arc<RequestCounters>,
    ) -> Self {
        let current = Mutex::new(vec![0; instances.len()]);
        Self {
            service,
            datacenter,
            instances,
            counters,
            current,
        }
    }

    /// Next instance by smooth weighted round-robin (nginx's algorithm: add each
    /// eligible weight to its current, pick the max, subtract the total) among
    /// instances with weight > 0 that are available at `now_ms` (not ejected, check
    /// not down) and not in `exclude` (addresses this request already tried).
    ///
    /// If every such instance is ejected or down, falls back to the least recently
    /// ejected ones (round-robin among equals) rather than failing: better a
    /// maybe-recovered backend than a certain 503. `None` when nothing is left.
    pub fn pick(&self, now_ms: u64, exclude: &[SocketAddr]) -> Option<&BackendInstance> {
        self.pick_where(now_ms, |i| exclude.contains(&i.addr))
    }

    /// [`Self::pick`] with the exclusion given as a predicate (`skip` returns true
    /// for instances this request must not use), so the per-request caller builds
    /// no list.
    pub fn pick_where(&self, now_ms: u64, skip: impl Fn(&BackendInstance) -> bool) -> Option<&BackendInstance> {
        let usable = |i: &BackendInstance| i.weight > 0 && !skip(i);
        let mut current = self.current.lock();
        let chosen = smooth_wrr(&self.instances, &mut current, |i| {
            usable(i) && i.health.is_available(now_ms)
        })
        .or_else(|| {
            // An ejection that has run out counts as "never": those instances are
            // only failing their active check, and go first.
            let ejected_until = |i: &BackendInstance| {
                let until = i.health.ejected_until_ms.load(Ordering::Relaxed);
                if until <= now_ms { 0 } else { until }
            };
            let oldest = self.instances.iter().filter(|i| usable(i)).map(ejected_until).min()?;
            smooth_wrr(&self.instances, &mut current, |i| {
                usable(i) && ejected_until(i) == oldest
            })
        })?;
        self.instances.get(chosen)
    }
}

/// One step of nginx's smooth weighted round-robin over the instances `eligible`
/// accepts; `current` is index-aligned with `instances`. Ties go to the earlier
/// instance, as in nginx, so sequences are reproducible.
fn smooth_wrr(
    instances: &[BackendInstance],
    current: &mut [i64],
    eligible: impl Fn(&BackendInstance) -> bool,
) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<(usize, i64)> = None;
    for (index, (instance, cur)) in instances.iter().zip(current.iter_mut()).enumerate() {
        if !eligible(instance) {
            continue;
        }
        let weight = i64::from(instance.weight);
        *cur += weight;
        total += weight;
        if best.is_none_or(|(_, max)| *cur > max) {
            best = Some((index, *cur));
        }
    }
    let (index, _) = best?;
    if let Some(cur) = current.get_mut(index) {
        *cur -= total;
    }
    Some(index)
}
