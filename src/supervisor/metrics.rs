//! Prometheus `/metrics` (text exposition format 0.0.4), written by hand from
//! the counters the components already keep (`dns::stats`, `lb::stats`, the
//! vpn's peers) and the supervisor's units. Every name starts with `wayfinder_`.
//!
//! ```text
//!  DnsStats (sharded atomics) ──┐
//!  LbState  (table, counters) ──┤
//!  VpnState (peers: Tunn stats) ┼─▶ render() ─▶ `# HELP`, `# TYPE`, samples
//!  UnitHandle (restarts, state) ┘
//! ```
//!
//! Rendered per scrape, never on a request path of dns or lb.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::SupervisorState;
use super::unit::UnitState;
use crate::dns::stats::{DnsStats, LATENCY_BUCKETS_US as DNS_BUCKETS_US, TcpClose};
use crate::lb::stats::LATENCY_BUCKETS_US as LB_BUCKETS_US;
use crate::lb::status::LbStatus;

/// DNS RCODE names by the index of `RouteSnapshot::rcodes`.
const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One metric family being written.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A histogram from non-cumulative buckets (microsecond bounds, last slot
    /// = slower than every bound) and a microsecond sum.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], bounds_us: &[u64], buckets: &[u64], sum_us: u64) {
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, count) in buckets.iter().enumerate() {
            cumulative += count;
            let le = bounds_us
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| format!("{}", *b as f64 / 1e6));
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, cumulative);
        }
        self.sample(&format!("{name}_sum"), labels, sum_us as f64 / 1e6);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }
}

fn dns(out: &mut Out, stats: &DnsStats) {
    let routes = stats.snapshot();
    out.family(
        "wayfinder_dns_queries_total",
        "counter",
        "DNS questions answered, by route and RCODE.",
    );
    for (route, s) in &routes {
        for (rcode, n) in RCODES.iter().zip(s.rcodes) {
            out.sample("wayfinder_dns_queries_total", &[("route", route), ("rcode", rcode)], n);
        }
    }
    out.family(
        "wayfinder_dns_cache_hits_total",
        "counter",
        "Answers served from the cache or pre-encoded local data, by route.",
    );
    for (route, s) in &routes {
        out.sample("wayfinder_dns_cache_hits_total", &[("route", route)], s.cache_hits);
    }
    out.family(
        "wayfinder_dns_stale_answers_total",
        "counter",
        "Expired answers served because every upstream failed (RFC 8767).",
    );
    for (route, s) in &routes {
        out.sample("wayfinder_dns_stale_answers_total", &[("route", route)], s.stale_served);
    }
    out.family(
        "wayfinder_dns_upstream_errors_total",
        "counter",
        "Upstream or Consul exchanges that failed, by route.",
    );
    for (route, s) in &routes {
        out.sample(
            "wayfinder_dns_upstream_errors_total",
            &[("route", route)],
            s.upstream_errors,
        );
    }
    out.family(
        "wayfinder_dns_upstream_ignored_total",
        "counter",
        "Datagrams on a forwarded question's socket that were not its answer (wrong ID, case or question), by route.",
    );
    for (route, s) in &routes {
        out.sample(
            "wayfinder_dns_upstream_ignored_total",
            &[("route", route)],
            s.ignored_responses,
        );
    }
    out.family(
        "wayfinder_dns_upstream_over_limit_total",
        "counter",
        "Questions not forwarded because dns.max_forwarded were in flight, by route.",
    );
    for (route, s) in &routes {
        out.sample(
            "wayfinder_dns_upstream_over_limit_total",
            &[("route", route)],
            s.over_limit,
        );
    }
    out.family(
        "wayfinder_dns_inline_exchanges_total",
        "counter",
        "Exchanges a UDP worker thread made itself on its own socket (Consul on loopback), by route.",
    );
    for (route, s) in &routes {
        out.sample(
            "wayfinder_dns_inline_exchanges_total",
            &[("route", route)],
            s.inline_exchanges,
        );
    }
    out.family(
        "wayfinder_dns_inline_overflow_total",
        "counter",
        "Questions that found a UDP worker's pending table (dns.consul_inline_slots) full and took the task path, by route.",
    );
    for (route, s) in &routes {
        out.sample(
            "wayfinder_dns_inline_overflow_total",
            &[("route", route)],
            s.inline_overflow,
        );
    }
    out.family(
        "wayfinder_dns_tcp_closed_total",
        "counter",
        "TCP client connections closed by the server, by reason.",
    );
    for why in TcpClose::ALL {
        out.sample(
            "wayfinder_dns_tcp_closed_total",
            &[("reason", why.name())],
            stats.tcp_closed(why),
        );
    }
    out.family(
        "wayfinder_dns_upstream_latency_seconds",
        "histogram",
        "Latency of exchanges with Consul and the upstream resolvers, by route.",
    );
    for (route, s) in &routes {
        out.histogram(
            "wayfinder_dns_upstream_latency_seconds",
            &[("route", route)],
            &DNS_BUCKETS_US,
            &s.latency_buckets,
            s.latency_sum_us,
        );
    }
    out.family("wayfinder_dns_dropped_total", "counter", "Packets dropped unanswered.");
    out.sample("wayfinder_dns_dropped_total", &[], stats.dropped());
}

fn class_name(i: usize) -> String {
    if i == 0 { "none".into() } else { format!("{i}xx") }
}

fn lb(out: &mut Out, status: &LbStatus) {
    out.family(
        "wayfinder_lb_requests_total",
        "counter",
        "Requests the lb answered, by status class (none = client left first).",
    );
    for (i, n) in status.requests.status_classes.iter().enumerate() {
        out.sample("wayfinder_lb_requests_total", &[("class", &class_name(i))], n);
    }
    out.family(
        "wayfinder_lb_route_requests_total",
        "counter",
        "Requests answered through one route, by service, datacenter and status class.",
    );
    for r in &status.routes {
        for (i, n) in r.requests.status_classes.iter().enumerate() {
            out.sample(
                "wayfinder_lb_route_requests_total",
                &[
                    ("service", &r.service),
                    ("datacenter", &r.datacenter),
                    ("class", &class_name(i)),
                ],
                n,
            );
        }
    }
    out.family(
        "wayfinder_lb_request_duration_seconds",
        "histogram",
        "Time from request to response head.",
    );
    out.histogram(
        "wayfinder_lb_request_duration_seconds",
        &[],
        &LB_BUCKETS_US,
        &status.requests.latency_buckets,
        status.requests.latency_sum_us,
    );
    out.family(
        "wayfinder_lb_backend_up",
        "gauge",
        "1 when an instance takes new requests (not ejected, active check passing).",
    );
    for r in &status.routes {
        for i in &r.instances {
            out.sample(
                "wayfinder_lb_backend_up",
                &[
                    ("service", &r.service),
                    ("datacenter", &r.datacenter),
                    ("instance", &i.id),
                    ("addr", &i.addr.to_string()),
                ],
                u8::from(i.available),
            );
        }
    }
    out.family(
        "wayfinder_lb_backend_inflight",
        "gauge",
        "Requests in flight per instance.",
    );
    for r in &status.routes {
        for i in &r.instances {
            out.sample(
                "wayfinder_lb_backend_inflight",
                &[("service", &r.service), ("instance", &i.id)],
                i.inflight,
            );
        }
    }
    out.family(
        "wayfinder_lb_retries_total",
        "counter",
        "Requests retried on another instance.",
    );
    out.sample("wayfinder_lb_retries_total", &[], status.retries);
    out.family(
        "wayfinder_lb_queued",
        "gauge",
        "Requests waiting for an instance below its maxconn.",
    );
    out.sample("wayfinder_lb_queued", &[], status.queued);
    out.family(
        "wayfinder_lb_client_connections",
        "gauge",
        "Client connections open (HTTP, HTTPS, haproxy_tcp listeners).",
    );
    out.sample("wayfinder_lb_client_connections", &[], status.connections.open);
    out.family(
        "wayfinder_lb_client_connections_max",
        "gauge",
        "The cap on client connections (lb.max_connections, resolved).",
    );
    out.sample("wayfinder_lb_client_connections_max", &[], status.connections.max);
    out.family(
        "wayfinder_lb_client_connections_refused_total",
        "counter",
        "Client connections closed at once over a cap, by cap (total, source).",
    );
    out.sample(
        "wayfinder_lb_client_connections_refused_total",
        &[("cap", "total")],
        status.connections.refused_total,
    );
    out.sample(
        "wayfinder_lb_client_connections_refused_total",
        &[("cap", "source")],
        status.connections.refused_per_source,
    );
    out.family(
        "wayfinder_lb_client_connections_cut_total",
        "counter",
        "Client connections cut: stalled (client_timeout), idle (idle_timeout), handshake (handshake_timeout).",
    );
    for (reason, n) in [
        ("stalled", status.cut_stalled),
        ("idle", status.cut_idle),
        ("handshake", status.cut_handshake),
    ] {
        out.sample("wayfinder_lb_client_connections_cut_total", &[("reason", reason)], n);
    }
    out.family(
        "wayfinder_lb_routing_changes_total",
        "counter",
        "Routing tables swapped in.",
    );
    out.sample("wayfinder_lb_routing_changes_total", &[], status.changes);
    out.family(
        "wayfinder_lb_propagation_seconds",
        "gauge",
        "Time from Consul's answer to live routing over recent changes, by quantile.",
    );
    for (q, v) in [("0.5", status.propagation_p50_ms), ("0.99", status.propagation_p99_ms)] {
        if let Some(ms) = v {
            out.sample("wayfinder_lb_propagation_seconds", &[("quantile", q)], ms / 1000.0);
        }
    }
    out.family(
        "wayfinder_lb_consul_up",
        "gauge",
        "1 while the lb's Consul watch succeeds.",
    );
    out.sample("wayfinder_lb_consul_up", &[], u8::from(status.consul_ok));
    out.family(
        "wayfinder_lb_ready",
        "gauge",
        "1 once the first routing table from a complete read of Consul is live.",
    );
    out.sample("wayfinder_lb_ready", &[], u8::from(status.ready));
    out.family(
        "wayfinder_lb_table_build_seconds",
        "gauge",
        "How long the last routing table took to build.",
    );
    out.sample(
        "wayfinder_lb_table_build_seconds",
        &[],
        format!("{:.6}", status.table_build_ms / 1000.0),
    );
}

fn consul_hub(out: &mut Out, hub: &crate::consul::ConsulHub) {
    use crate::consul::http::Endpoint;
    let http = hub.http().stats();
    out.family(
        "wayfinder_consul_connections",
        "gauge",
        "HTTP connections open to the Consul agent (bounded by design).",
    );
    out.sample("wayfinder_consul_connections", &[], http.connections());
    out.family(
        "wayfinder_consul_requests_total",
        "counter",
        "Requests sent to the Consul agent, by endpoint.",
    );
    for e in Endpoint::ALL {
        out.sample(
            "wayfinder_consul_requests_total",
            &[("endpoint", e.name())],
            http.requests(e),
        );
    }
    out.family(
        "wayfinder_consul_request_errors_total",
        "counter",
        "Requests to the Consul agent that failed, by endpoint.",
    );
    for e in Endpoint::ALL {
        out.sample(
            "wayfinder_consul_request_errors_total",
            &[("endpoint", e.name())],
            http.errors(e),
        );
    }
    let watches = hub.watches();
    out.family(
        "wayfinder_consul_watch_age_seconds",
        "gauge",
        "Seconds since Consul last answered each watch (a stale watch grows here).",
    );
    for w in &watches {
        if let Some(age) = w.age() {
            out.sample(
                "wayfinder_consul_watch_age_seconds",
                &[("watch", &w.name)],
                format!("{:.3}", age.as_secs_f64()),
            );
        }
    }
    out.family(
        "wayfinder_consul_watch_failures_total",
        "counter",
        "Failed requests of each watch.",
    );
    for w in &watches {
        out.sample(
            "wayfinder_consul_watch_failures_total",
            &[("watch", &w.name)],
            w.snapshot().failures,
        );
    }
    if let Some(view) = hub.catalog_if_started() {
        let v = view.status().snapshot();
        let services = view.current().services.len();
        out.family(
            "wayfinder_consul_view_up",
            "gauge",
            "1 while the catalog view is kept current.",
        );
        out.sample("wayfinder_consul_view_up", &[], u8::from(v.ok));
        out.family(
            "wayfinder_consul_view_services",
            "gauge",
            "Services in the catalog view.",
        );
        out.sample("wayfinder_consul_view_services", &[], services);
        out.family(
            "wayfinder_consul_full_syncs_total",
            "counter",
            "Full reads of the catalog (start, resets, unexplained changes, periodic).",
        );
        out.sample("wayfinder_consul_full_syncs_total", &[], v.full_syncs);
        out.family(
            "wayfinder_consul_service_fetches_total",
            "counter",
            "Services read one by one after a change.",
        );
        out.sample("wayfinder_consul_service_fetches_total", &[], v.fetches);
        out.family(
            "wayfinder_consul_sync_corrections_total",
            "counter",
            "Services the periodic full sync found different from what the watches said.",
        );
        out.sample("wayfinder_consul_sync_corrections_total", &[], v.corrections);
        out.family(
            "wayfinder_consul_full_sync_seconds",
            "gauge",
            "How long the last full read of the catalog took.",
        );
        out.sample(
            "wayfinder_consul_full_sync_seconds",
            &[],
            format!("{:.6}", v.last_full_sync_ms / 1000.0),
        );
    }
}

/// The metrics text.
pub fn render(state: &SupervisorState) -> String {
    let mut out = Out(String::with_capacity(16 * 1024));
    out.family(
        "wayfinder_up_ready",
        "gauge",
        "1 once every unit has started (or failed).",
    );
    out.sample("wayfinder_up_ready", &[], u8::from(state.ready.load(Ordering::Relaxed)));
    out.family(
        "wayfinder_uptime_seconds",
        "gauge",
        "Seconds since `wayfinder up` started.",
    );
    out.sample(
        "wayfinder_uptime_seconds",
        &[],
        format!("{:.3}", state.started.elapsed().as_secs_f64()),
    );
    let units: Vec<_> = state.units.iter().map(|u| u.snapshot()).collect();
    out.family(
        "wayfinder_supervisor_restarts_total",
        "counter",
        "Times a program or component was started again.",
    );
    for u in &units {
        let class = if u.class == super::unit::UnitClass::Program {
            "program"
        } else {
            "component"
        };
        out.sample(
            "wayfinder_supervisor_restarts_total",
            &[("unit", &u.name), ("class", class)],
            u.restarts,
        );
    }
    out.family(
        "wayfinder_supervisor_unit_state",
        "gauge",
        "1 for the state each unit is in (off, running, backoff, failed ...).",
    );
    for u in &units {
        out.sample(
            "wayfinder_supervisor_unit_state",
            &[("unit", &u.name), ("state", u.state.name())],
            1,
        );
    }
    out.family("wayfinder_supervisor_unit_up", "gauge", "1 while a unit is running.");
    for u in &units {
        out.sample(
            "wayfinder_supervisor_unit_up",
            &[("unit", &u.name)],
            u8::from(u.state == UnitState::Running),
        );
    }
    let consul = state.consul_health();
    out.family(
        "wayfinder_consul_up",
        "gauge",
        "1 while the Consul agent answers and has a leader.",
    );
    out.sample(
        "wayfinder_consul_up",
        &[],
        u8::from(consul.reachable && consul.leader.as_deref().is_some_and(|l| !l.is_empty())),
    );
    consul_hub(&mut out, &state.consul_hub);
    if state.plan.starts("dns") {
        dns(&mut out, &state.components.dns.stats);
    }
    if state.plan.starts("lb")
        && let Some(lb_state) = state.components.lb.load_full()
    {
        lb(&mut out, &LbStatus::collect(&lb_state));
    }
    if let Some(vpn_state) = super::vpn_admin::running_state(state) {
        vpn(&mut out, &vpn_state);
    }
    out.0
}

fn vpn(out: &mut Out, state: &crate::vpn::VpnState) {
    let peers = state.peers();
    out.family("wayfinder_vpn_peers", "gauge", "Peers configured on the vpn.");
    out.sample("wayfinder_vpn_peers", &[], peers.len());
    out.family(
        "wayfinder_vpn_last_handshake_timestamp_seconds",
        "gauge",
        "Unix time of each peer's latest handshake (absent before the first).",
    );
    for p in &peers {
        if let Some(t) = p.last_handshake {
            out.sample(
                "wayfinder_vpn_last_handshake_timestamp_seconds",
                &[("peer", &p.name)],
                t.as_secs(),
            );
        }
    }
    out.family(
        "wayfinder_vpn_handshakes_total",
        "counter",
        "Handshakes completed with each peer.",
    );
    for p in &peers {
        out.sample("wayfinder_vpn_handshakes_total", &[("peer", &p.name)], p.handshakes);
    }
    out.family(
        "wayfinder_vpn_bytes_total",
        "counter",
        "Payload bytes through the tunnel, by peer and direction (rx = from the peer).",
    );
    for p in &peers {
        for (direction, n) in [("rx", p.rx_bytes), ("tx", p.tx_bytes)] {
            out.sample(
                "wayfinder_vpn_bytes_total",
                &[("peer", &p.name), ("direction", direction)],
                n,
            );
        }
    }
    out.family(
        "wayfinder_vpn_spoofed_packets_total",
        "counter",
        "Packets dropped because their inner source address was not the sending peer's.",
    );
    for p in &peers {
        out.sample(
            "wayfinder_vpn_spoofed_packets_total",
            &[("peer", &p.name)],
            p.spoofed_drops,
        );
    }
    out.family(
        "wayfinder_vpn_cookie_replies_total",
        "counter",
        "Cookie replies sent because handshakes came faster than the limit.",
    );
    out.sample(
        "wayfinder_vpn_cookie_replies_total",
        &[],
        state.cookies_sent.load(Ordering::Relaxed),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_inf_sum_and_count() {
        let mut out = Out(String::new());
        out.histogram("x_seconds", &[("route", "a\"b")], &[1000, 2000], &[1, 2, 3], 2_500_000);
        assert_eq!(
            out.0,
            "x_seconds_bucket{route=\"a\\\"b\",le=\"0.001\"} 1\n\
             x_seconds_bucket{route=\"a\\\"b\",le=\"0.002\"} 3\n\
             x_seconds_bucket{route=\"a\\\"b\",le=\"+Inf\"} 6\n\
             x_seconds_sum{route=\"a\\\"b\"} 2.5\n\
             x_seconds_count{route=\"a\\\"b\"} 6\n"
        );
    }
}
