//! The lb as a component of the appliance (see [`crate::component`]): bound
//! from its own section, run by [`super::run`] with a fresh [`LbState`] each
//! start, and shown by itself: its Prometheus series, its part of
//! `/api/status`, of the status page, of the banner, and what it adds to the
//! services list (the URLs that reach a service, its view of each instance).
//!
//! ```text
//!  Lb (one per process: the running LbState, pinned listener addresses)
//!    bind() ─▶ LbSockets (http, https, stats; port 0 pinned after the first bind)
//!    BoundLb::run ─▶ LbState::new ─▶ published ─▶ lb::run(section, inputs, sockets, state, hub)
//!    metrics/status/page/annotate ◀── LbStatus::collect(running state)
//!    sample ◀── the counters of the running state (once per timeline step; no LbStatus)
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::settings::LbConfig;
use super::status::LbStatus;
use super::{Inputs, LbError, LbSockets, LbState};
use crate::component::{
    Appliance, Banner, Bound, BoxFuture, Component, ComponentError, Failure, Host, Listener, Listening, PageParts,
    ServiceReport,
};
use crate::consul::settings::ConsulConfig;
use crate::report::html::escape;
use crate::report::prometheus::{Kind, Writer};
use crate::report::timeline::{Chart, Tick, TopK};

/// Chart: requests per second, all and per busiest service.
static REQUESTS: Chart = Chart {
    order: 20,
    id: "lb-requests",
    title: "lb requests",
    unit: "/s",
};
/// Chart: 5xx answers per second, all and per busiest service.
static ERRORS: Chart = Chart {
    order: 21,
    id: "lb-5xx",
    title: "lb 5xx answers",
    unit: "/s",
};
/// Chart: request latency quantiles over the last step.
static LATENCY: Chart = Chart {
    order: 22,
    id: "lb-latency",
    title: "lb latency (request to response head)",
    unit: "s",
};
/// Chart: time from Consul's answer to live routing (recent changes).
static PROPAGATION: Chart = Chart {
    order: 41,
    id: "lb-propagation",
    title: "propagation: Consul change to live lb routing",
    unit: "s",
};
/// Services charted one by one (the busiest since start; the rest are in "all").
const CHARTED_SERVICES: usize = 8;

impl Failure for LbError {
    fn exit_code(&self) -> u8 {
        match self {
            LbError::Bind { .. } | LbError::Certs(_) => crate::EXIT_CONFIG,
            LbError::WorkerDied { .. } => crate::EXIT_SOFTWARE,
            _ => 1,
        }
    }
}

/// The lb component.
pub struct Lb {
    config: Mutex<LbConfig>,
    consul: ConsulConfig,
    appliance: Arc<Appliance>,
    /// The running lb's state (routing table, health, counters), once started.
    state: Arc<ArcSwapOption<LbState>>,
    bound: Mutex<Listening>,
}

impl Lb {
    /// The lb of `config`, naming services after `consul`'s domain.
    pub fn new(config: LbConfig, consul: ConsulConfig, appliance: Arc<Appliance>) -> Self {
        Self {
            config: Mutex::new(config),
            consul,
            appliance,
            state: Arc::new(ArcSwapOption::empty()),
            bound: Mutex::new(Listening::default()),
        }
    }

    /// The running lb's state, once started.
    pub fn state(&self) -> Option<Arc<LbState>> {
        self.state.load_full()
    }

    fn status_now(&self) -> Option<LbStatus> {
        self.state().map(|s| LbStatus::collect(&s))
    }
}

struct BoundLb {
    sockets: LbSockets,
    config: LbConfig,
    consul: ConsulConfig,
    appliance: Arc<Appliance>,
    state: Arc<ArcSwapOption<LbState>>,
}

fn listening_of(sockets: &LbSockets) -> Listening {
    let out = sockets
        .all()
        .filter_map(|(what, socket)| {
            let key = match what {
                "lb http" => "lb_http",
                "lb https" => "lb_https",
                _ => "lb_stats",
            };
            Some(Listener {
                key,
                what,
                addr: socket.local_addr().ok()?,
                tcp: true,
                list: false,
            })
        })
        .collect();
    Listening(out)
}

impl Bound for BoundLb {
    fn listening(&self) -> Listening {
        listening_of(&self.sockets)
    }

    fn run(self: Box<Self>, shutdown: CancellationToken) -> BoxFuture<'static, Result<(), ComponentError>> {
        Box::pin(async move {
            let BoundLb {
                sockets,
                config,
                consul,
                appliance,
                state,
            } = *self;
            let inputs = Inputs::new(&consul, &appliance);
            let lb_state = LbState::new(&super::table_config(&config, &inputs));
            state.store(Some(lb_state.clone()));
            super::run(&config, &inputs, sockets, lb_state, appliance.consul.clone(), shutdown)
                .await
                .map_err(ComponentError::from)
        })
    }
}

impl Component for Lb {
    fn name(&self) -> &'static str {
        "lb"
    }

    fn bind(&self) -> Result<Box<dyn Bound>, ComponentError> {
        let mut config = self.config.lock();
        let sockets = LbSockets::bind(&config)?;
        let listening = listening_of(&sockets);
        // A port 0 keeps the port it got at the first start (the first
        // listener of each kind is the configured one; `also_listen` follow).
        let first = |key| listening.0.iter().find(|l| l.key == key).map(|l| l.addr);
        if let Some(addr) = first("lb_http") {
            config.http = addr;
        }
        if let (Some(addr), Some(h)) = (first("lb_https"), config.https.as_mut()) {
            h.listen = addr;
        }
        if let Some(addr) = first("lb_stats") {
            config.stats = Some(addr);
        }
        *self.bound.lock() = listening;
        Ok(Box::new(BoundLb {
            sockets,
            config: config.clone(),
            consul: self.consul.clone(),
            appliance: self.appliance.clone(),
            state: self.state.clone(),
        }))
    }

    fn listening(&self) -> Listening {
        self.bound.lock().clone()
    }

    fn metrics(&self, out: &mut Writer) {
        if let Some(status) = self.status_now() {
            metrics(out, &status);
        }
    }

    fn sample(&self, tick: &mut Tick<'_>) {
        let Some(state) = self.state() else {
            return;
        };
        let stats = state.stats.snapshot();
        let all = &stats.requests;
        tick.counter(&REQUESTS, "all", all.total());
        tick.counter(&ERRORS, "all", all.status_classes[5]);
        tick.quantiles(&LATENCY, &all.latency, &[("p50", 0.5), ("p99", 0.99)]);
        for (label, p) in [("p50", stats.propagation_p50), ("p99", stats.propagation_p99)] {
            if let Some(p) = p {
                tick.gauge(&PROPAGATION, label, p.as_secs_f64());
            }
        }
        sample_routes(&state.table.load_full(), tick);
    }

    fn status(&self, started: bool) -> serde_json::Value {
        match self.status_now().filter(|_| started) {
            Some(status) => serde_json::to_value(status).unwrap_or_default(),
            None => serde_json::Value::Null,
        }
    }

    fn ready(&self) -> Result<(), String> {
        match self.state() {
            Some(state) if state.is_ready() => Ok(()),
            Some(_) => Err("waiting for its first routing table from a complete read of Consul".into()),
            None => Err("not started yet".into()),
        }
    }

    fn page(&self, started: bool, _q: &str, parts: &mut PageParts) {
        if !started {
            return;
        }
        let listening = self.listening();
        for h in listening.get("lb_http") {
            parts.listening.push(format!("lb <code>http://{h}/</code>"));
        }
        for h in listening.get("lb_https") {
            parts.listening.push(format!("lb <code>https://{h}/</code>"));
        }
        let status = self.status_now();
        for c in status.iter().flat_map(|lb| &lb.certificates) {
            let whose = if c.self_signed {
                ", self-signed (configure lb.certs to replace it)"
            } else {
                ""
            };
            parts.listening.push(format!(
                "lb certificate {}{whose}, SHA-256 <code>{}</code>",
                escape(&c.names.join(", ")),
                escape(&c.sha256)
            ));
        }
        for h in listening.get("lb_stats") {
            parts.listening.push(format!("lb stats <code>http://{h}/</code>"));
        }
        if let Some(lb) = &status {
            parts.listening.push(format!(
                "lb answered {} requests, {} routes, {} routing changes",
                lb.requests.total(),
                lb.routes.len(),
                lb.changes
            ));
        }
    }

    fn banner(&self, appliance: &Appliance, host: &Host, banner: &mut Banner) {
        let listening = self.listening();
        if let Some(h) = listening.get("lb_http").next().map(|h| appliance.reachable(h)) {
            banner.places.push(format!("  lb       http://{h}/"));
            banner
                .tries
                .push(format!("  curl -H 'Host: web.service.{}' http://{h}/", host.domain));
        }
        if let Some(s) = listening.get("lb_stats").next() {
            banner
                .places
                .push(format!("  lb stats http://{}/", appliance.reachable(s)));
        }
    }

    fn annotate(&self, services: &mut [ServiceReport], host: &Host) {
        let Some(lb) = self.status_now() else {
            return;
        };
        let http = self
            .listening()
            .get("lb_http")
            .next()
            .map(|a| self.appliance.reachable(a));
        for service in services {
            annotate(service, &lb, http, &host.datacenter);
        }
    }
}

/// The busiest routes' requests and 5xx: one pass over the routes' counters
/// (relaxed loads, no allocation), the [`CHARTED_SERVICES`] busiest since
/// start get a line each. Ranking by totals since start keeps a service's line
/// from coming and going with its traffic. O(routes) per tick: measured at
/// 50,000 services in the test below.
fn sample_routes(table: &super::table::RoutingTable, tick: &mut Tick<'_>) {
    let mut busiest = TopK::<&super::table::Backend, CHARTED_SERVICES>::default();
    for backend in table.backends() {
        let total = backend
            .counters
            .status_classes
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        busiest.offer(total, backend);
    }
    for (total, backend) in busiest.into_sorted() {
        tick.counter(&REQUESTS, &backend.service, total);
        let errors = backend.counters.status_classes[5].load(std::sync::atomic::Ordering::Relaxed);
        tick.counter(&ERRORS, &backend.service, errors);
    }
}

/// The URLs that reach `service` through the lb listening on `http`, and the
/// lb's view of each of its instances.
fn annotate(service: &mut ServiceReport, lb: &LbStatus, http: Option<SocketAddr>, dc: &str) {
    let route = lb
        .routes
        .iter()
        .find(|r| r.service == service.name && r.datacenter == dc);
    if let (Some(route), Some(http)) = (route, http) {
        let port = if http.port() == 80 {
            String::new()
        } else {
            format!(":{}", http.port())
        };
        service.urls = route
            .names
            .iter()
            .map(|n| match n.strip_prefix('*') {
                Some(path) => format!("http://{http}{path}"),
                None => match n.split_once('/') {
                    Some((host, path)) => format!("http://{host}{port}/{path}"),
                    None => format!("http://{n}{port}/"),
                },
            })
            .collect();
    }
    for instance in &mut service.instances {
        let refused = lb
            .refused
            .iter()
            .find(|r| r.service == service.name && r.instance.as_deref() == Some(&instance.id));
        instance.lb = match refused {
            Some(r) => Some(format!("refused: {}", r.reason)),
            None => route.and_then(|route| {
                route
                    .instances
                    .iter()
                    .find(|r| r.addr.to_string() == instance.address)
                    .map(|r| if r.available { "up" } else { "down" }.to_string())
            }),
        };
    }
}

fn code_label(i: usize) -> String {
    if i == 0 { "none".into() } else { format!("{i}xx") }
}

/// The lb's Prometheus series (labels as HAProxy's exporter names them:
/// `proxy` for the service, `server` for an instance, `code` for the status class).
fn metrics(out: &mut Writer, status: &LbStatus) {
    request_metrics(out, status);
    connection_metrics(out, status);
    table_metrics(out, status);
}

/// Requests by status class, per service and instance, and their latency.
fn request_metrics(out: &mut Writer, status: &LbStatus) {
    out.family(
        "wayfinder_lb_http_responses_total",
        Kind::Counter,
        "Requests the lb answered, by status class (none = client left first).",
    );
    for (i, n) in status.requests.status_classes.iter().enumerate() {
        out.sample("wayfinder_lb_http_responses_total", &[("code", &code_label(i))], n);
    }
    out.family(
        "wayfinder_lb_backend_http_responses_total",
        Kind::Counter,
        "Requests answered through one route, by service (proxy), datacenter and status class.",
    );
    for r in &status.routes {
        for (i, n) in r.requests.status_classes.iter().enumerate() {
            out.sample(
                "wayfinder_lb_backend_http_responses_total",
                &[
                    ("proxy", &r.service),
                    ("datacenter", &r.datacenter),
                    ("code", &code_label(i)),
                ],
                n,
            );
        }
    }
    out.family(
        "wayfinder_lb_request_duration_seconds",
        Kind::Histogram,
        "Time from request to response head.",
    );
    out.histogram("wayfinder_lb_request_duration_seconds", &[], &status.requests.latency);
    out.family(
        "wayfinder_lb_server_up",
        Kind::Gauge,
        "1 when an instance (server) takes new requests (not ejected, active check passing).",
    );
    for r in &status.routes {
        for i in &r.instances {
            out.sample(
                "wayfinder_lb_server_up",
                &[
                    ("proxy", &r.service),
                    ("datacenter", &r.datacenter),
                    ("server", &i.id),
                    ("addr", &i.addr.to_string()),
                ],
                u8::from(i.available),
            );
        }
    }
    out.family(
        "wayfinder_lb_backend_current_queue",
        Kind::Gauge,
        "Requests of a service (backend) waiting for an instance below its maxconn.",
    );
    for r in &status.routes {
        out.sample(
            "wayfinder_lb_backend_current_queue",
            &[("proxy", &r.service), ("datacenter", &r.datacenter)],
            r.requests.queued,
        );
    }
    out.family(
        "wayfinder_lb_server_current_sessions",
        Kind::Gauge,
        "Requests in flight per instance (server).",
    );
    for r in &status.routes {
        for i in &r.instances {
            out.sample(
                "wayfinder_lb_server_current_sessions",
                &[("proxy", &r.service), ("server", &i.id)],
                i.inflight,
            );
        }
    }
}

/// Client connections, their caps and cuts, retries and the queue.
fn connection_metrics(out: &mut Writer, status: &LbStatus) {
    out.single(
        "wayfinder_lb_retries_total",
        Kind::Counter,
        "Requests retried on another instance.",
        status.retries,
    );
    out.single(
        "wayfinder_lb_current_queue",
        Kind::Gauge,
        "Requests waiting for an instance below its maxconn.",
        status.queued,
    );
    out.single(
        "wayfinder_lb_client_connections",
        Kind::Gauge,
        "Client connections open (HTTP, HTTPS, haproxy_tcp listeners).",
        status.connections.open,
    );
    out.single(
        "wayfinder_lb_client_connections_max",
        Kind::Gauge,
        "The cap on client connections (lb.max_connections, resolved).",
        status.connections.max,
    );
    out.family(
        "wayfinder_lb_client_connections_refused_total",
        Kind::Counter,
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
        Kind::Counter,
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
        "wayfinder_lb_requests_refused_total",
        Kind::Counter,
        "Requests the lb answered itself: body_too_slow and request_deadline (408, min_body_rate, request_timeout), over_share (429, max_client_share).",
    );
    for (reason, n) in [
        ("body_too_slow", status.body_too_slow),
        ("request_deadline", status.request_deadline),
        ("over_share", status.over_share),
    ] {
        out.sample("wayfinder_lb_requests_refused_total", &[("reason", reason)], n);
    }
    out.single(
        "wayfinder_lb_body_buffer_bytes",
        Kind::Gauge,
        "Request body bytes buffered before an instance is chosen, all requests together (cap: lb.body_buffer_total_bytes).",
        status.body_buffer_bytes,
    );
}

/// The routing table: changes, propagation, Consul, readiness, build time.
fn table_metrics(out: &mut Writer, status: &LbStatus) {
    out.single(
        "wayfinder_lb_routing_changes_total",
        Kind::Counter,
        "Routing tables swapped in.",
        status.changes,
    );
    out.family(
        "wayfinder_lb_propagation_seconds",
        Kind::Gauge,
        "Time from Consul's answer to live routing over recent changes, by quantile.",
    );
    for (q, v) in [("0.5", status.propagation_p50_ms), ("0.99", status.propagation_p99_ms)] {
        if let Some(ms) = v {
            out.sample("wayfinder_lb_propagation_seconds", &[("quantile", q)], ms / 1000.0);
        }
    }
    out.single(
        "wayfinder_lb_consul_up",
        Kind::Gauge,
        "1 while the lb's Consul watch succeeds.",
        u8::from(status.consul_ok),
    );
    out.single(
        "wayfinder_lb_ready",
        Kind::Gauge,
        "1 once the first routing table from a complete read of Consul is live.",
        u8::from(status.ready),
    );
    out.single(
        "wayfinder_lb_table_build_seconds",
        Kind::Gauge,
        "How long the last routing table took to build.",
        format!("{:.6}", status.table_build_ms / 1000.0),
    );
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::lb::table::{Carryover, InstanceSpec, RoutingTable, ServiceSpec, TableConfig};
    use crate::report::timeline::{MAX_SERIES, Timeline};

    /// 10x the services expected (5,000): a tick's pass over 50,000 routes
    /// charts only the busiest 8, and costs one relaxed read of each route's
    /// counters. The time is printed (debug build, shared 2-core machine) and
    /// bounded loosely so that it cannot flake.
    #[test]
    fn sampling_fifty_thousand_routes_charts_the_busiest_few() {
        let (tags, _) = crate::lb::tags::parse_tags(&["haproxy".to_string()]);
        let specs: Vec<ServiceSpec> = (0..50_000u32)
            .map(|i| ServiceSpec {
                name: format!("svc{i}"),
                datacenter: "dc1".into(),
                instances: vec![InstanceSpec {
                    id: format!("svc{i}-1"),
                    node: "n1".into(),
                    addr: std::net::SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080)),
                    tags: tags.clone(),
                }],
            })
            .collect();
        let cfg = TableConfig {
            consul_domain: "consul".into(),
            local_datacenter: "dc1".into(),
            add_domain: None,
            landing_hosts: vec![],
            policy: Default::default(),
        };
        let (table, _) = RoutingTable::build(&cfg, &specs, &Carryover::new());
        assert_eq!(table.backends().count(), 50_000);
        for (n, b) in table.backends().enumerate().filter(|(n, _)| n % 5000 == 0) {
            b.counters
                .record(if n == 0 { 503 } else { 200 }, Duration::from_millis(1));
        }
        let mut timeline = Timeline::default();
        let mut worst = Duration::ZERO;
        for t in 1..=3u64 {
            let started = Instant::now();
            sample_routes(&table, &mut timeline.tick(t * 2000));
            worst = worst.max(started.elapsed());
        }
        let charts = timeline.charts();
        let requests = charts.iter().find(|c| c.chart.id == "lb-requests").unwrap();
        assert_eq!(requests.lines.len(), CHARTED_SERVICES, "only the busiest");
        assert!(timeline.len() <= 2 * CHARTED_SERVICES && timeline.len() < MAX_SERIES);
        println!("lb sample pass over 50,000 routes: worst {worst:?} of 3 ticks (debug build)");
        assert!(worst < Duration::from_secs(2), "{worst:?}");
    }
}
