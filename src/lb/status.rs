//! What the lb shows about itself: the routes in force with their instances,
//! health and counters, the Consul connection, the certificates; as JSON
//! (`/stats.json`) and as an HTML page (`/`, also the landing page on the HTTP
//! port), served by the stats listener.
//!
//! ```text
//!  LbState (table, health, counters) ──LbStatus::collect──▶ JSON | HTML
//!  stats listener (hyper http1): GET / → page, GET /stats.json → JSON
//! ```
//!
//! Everything here runs per status request, never per proxied request.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::LbState;
use super::body::{ProxyBody, error_page, html};
use super::client::ConnSnapshot;
use super::stats::{LATENCY_BUCKETS_US, RequestSnapshot};
use super::table::{Backend, CheckResult};
use super::tls::CertInfo;
use crate::report::html::{escape, human_secs};

/// The whole lb, as the status page and the admin API show it.
#[derive(Debug, Clone, Serialize)]
pub struct LbStatus {
    /// True once the first routing table from a complete read of Consul is
    /// live; before that requests wait for it.
    pub ready: bool,
    /// False while Consul cannot be reached (the last good routes stay).
    pub consul_ok: bool,
    /// The Consul view the routes are built from: its age, watches and syncs.
    pub consul_view: Option<crate::consul::catalog::CatalogSnapshot>,
    /// How long the last routing table took to build (ms).
    pub table_build_ms: f64,
    /// The longest table build since start (ms).
    pub table_build_max_ms: f64,
    /// Routing changes applied since start.
    pub changes: u64,
    /// Median time from Consul's answer to live routing, over recent changes (ms).
    pub propagation_p50_ms: Option<f64>,
    /// 99th percentile of the same (ms).
    pub propagation_p99_ms: Option<f64>,
    /// Requests retried on another instance.
    pub retries: u64,
    /// Requests waiting for an instance below its maxconn right now.
    pub queued: usize,
    /// Client connections: open now, sources, the caps, refused at them.
    pub connections: ConnSnapshot,
    /// Client connections cut because the client stalled (`client_timeout`).
    pub cut_stalled: u64,
    /// Idle connections closed (`idle_timeout`: h2 sessions without a stream,
    /// HTTP/1.1 keep-alive without a request or with a slow request head).
    pub cut_idle: u64,
    /// Connections closed before their first request or h2 preface (`handshake_timeout`).
    pub cut_handshake: u64,
    /// Requests answered 408: a body slower than `min_body_rate`.
    pub body_too_slow: u64,
    /// Requests answered 408: not complete within `request_timeout`.
    pub request_deadline: u64,
    /// Requests answered 429: their client held its `max_client_share` of every instance with room.
    pub over_share: u64,
    /// Bytes of request bodies buffered right now, all proxy threads together.
    pub body_buffer_bytes: usize,
    /// Their cap (`body_buffer_total_bytes`).
    pub body_buffer_max: usize,
    /// Requests that found the body memory spent and streamed their body.
    pub body_buffer_spent: u64,
    /// Every request answered (routes, landing page, unknown names).
    pub requests: RequestSnapshot,
    /// Upper bounds of the latency buckets, microseconds (the last bucket has none).
    pub latency_bounds_us: &'static [u64],
    /// The routes, by service then datacenter.
    pub routes: Vec<RouteStatus>,
    /// TCP listeners (`haproxy_tcp=`): port and service.
    pub tcp: Vec<TcpStatus>,
    /// Services, instances and `haproxy_tcp` ports from Consul the lb refused
    /// (own listeners, outside `lb.backend_networks`, bad names or ports).
    pub refused: Vec<super::policy::Refused>,
    /// HTTPS certificates in force (empty without HTTPS).
    pub certificates: Vec<CertInfo>,
}

/// One service's route.
#[derive(Debug, Clone, Serialize)]
pub struct RouteStatus {
    /// Consul service name.
    pub service: String,
    /// Datacenter of its instances.
    pub datacenter: String,
    /// Host names and path prefixes that reach it (`host/path`, or `*/path` for a
    /// path route on any host).
    pub names: Vec<String>,
    /// Per-instance maxconn (Consul KV, else the default).
    pub maxconn: usize,
    /// Requests answered through this route.
    pub requests: RequestSnapshot,
    /// The instances.
    pub instances: Vec<InstanceStatus>,
}

/// One instance of a route.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    /// Consul service ID.
    pub id: String,
    /// Consul node.
    pub node: String,
    /// Address.
    pub addr: SocketAddr,
    /// `haproxy_weight`.
    pub weight: u16,
    /// Takes new requests now (not ejected, active check passing).
    pub available: bool,
    /// The active check's verdict.
    pub check_up: bool,
    /// Passively ejected after a refused connection, for this long still (ms).
    pub ejected_for_ms: u64,
    /// Requests in flight.
    pub inflight: usize,
    /// Connections to it that failed (each ejected it; retried elsewhere
    /// while retries remained).
    pub connect_errors: u64,
    /// The last active check's result (`L4OK`, `L7STS 503` ...), once checked.
    pub last_check: Option<String>,
    /// How long ago that check ended (ms).
    pub last_check_age_ms: Option<u64>,
    /// How long it has been in its present state (ms); None: unchanged since
    /// the lb first saw it.
    pub since_change_ms: Option<u64>,
}

/// One TCP listener.
#[derive(Debug, Clone, Serialize)]
pub struct TcpStatus {
    /// The port.
    pub port: u16,
    /// Its service.
    pub service: String,
    /// Instances and their state.
    pub instances: Vec<InstanceStatus>,
}

impl LbStatus {
    /// A snapshot of `state`.
    pub fn collect(state: &LbState) -> Self {
        let table = state.table.load_full();
        let now = state.health.now_ms();
        let maxconn = state.maxconn.load();
        let instances = |backend: &Backend| -> Vec<InstanceStatus> {
            backend
                .instances
                .iter()
                .map(|i| {
                    let until = i.health.ejected_until_ms.load(Ordering::Relaxed);
                    let checked = i.health.last_check_ms.load(Ordering::Relaxed);
                    // An ejection that expired by itself changed the state at its end.
                    let expired = if until != 0 && until <= now { until } else { 0 };
                    let changed = i.health.changed_ms.load(Ordering::Relaxed).max(expired);
                    InstanceStatus {
                        id: i.id.clone(),
                        node: i.node.clone(),
                        addr: i.addr,
                        weight: i.weight,
                        available: i.weight > 0 && i.health.is_available(now),
                        check_up: i.health.check_up.load(Ordering::Relaxed),
                        ejected_for_ms: until.saturating_sub(now),
                        inflight: i.health.inflight.load(Ordering::Relaxed),
                        connect_errors: i.health.connect_errors.load(Ordering::Relaxed),
                        last_check: CheckResult::unpack(i.health.last_check.load(Ordering::Relaxed))
                            .map(|c| c.to_string()),
                        last_check_age_ms: (checked != 0).then(|| now.saturating_sub(checked)),
                        since_change_ms: (changed != 0).then(|| now.saturating_sub(changed)),
                    }
                })
                .collect()
        };
        let mut names: BTreeMap<*const Backend, Vec<String>> = BTreeMap::new();
        for (host, path, backend) in table.entries() {
            let path = if path == "/" { "" } else { path };
            names
                .entry(Arc::as_ptr(backend))
                .or_default()
                .push(format!("{}{path}", host.unwrap_or("*")));
        }
        let routes = table
            .backends()
            .map(|b| RouteStatus {
                service: b.service.clone(),
                datacenter: b.datacenter.clone(),
                names: names.remove(&Arc::as_ptr(b)).unwrap_or_default(),
                maxconn: maxconn.get(&b.service).copied().unwrap_or(super::DEFAULT_MAXCONN),
                requests: b.counters.snapshot(),
                instances: instances(b),
            })
            .collect();
        let tcp = table
            .tcp_ports()
            .map(|(port, b)| TcpStatus {
                port,
                service: b.service.clone(),
                instances: instances(b),
            })
            .collect();
        let stats = state.stats.snapshot();
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        LbStatus {
            ready: state.is_ready(),
            consul_ok: state.consul_ok.load(Ordering::Relaxed),
            consul_view: state.view.get().map(|v| v.status().snapshot()),
            table_build_ms: stats.last_build.as_secs_f64() * 1000.0,
            table_build_max_ms: stats.max_build.as_secs_f64() * 1000.0,
            changes: stats.changes,
            propagation_p50_ms: ms(stats.propagation_p50),
            propagation_p99_ms: ms(stats.propagation_p99),
            retries: stats.retries,
            queued: state.queued.load(Ordering::Relaxed),
            connections: state.conns.snapshot(),
            cut_stalled: stats.cut_stalled,
            cut_idle: stats.cut_idle,
            cut_handshake: stats.cut_handshake,
            body_too_slow: stats.body_too_slow,
            request_deadline: stats.request_deadline,
            over_share: stats.over_share,
            body_buffer_bytes: state.bodies.used(),
            body_buffer_max: state.bodies.max(),
            body_buffer_spent: state.bodies.spent.load(Ordering::Relaxed),
            requests: stats.requests,
            latency_bounds_us: &LATENCY_BUCKETS_US,
            routes,
            tcp,
            refused: table.refused().cloned().collect(),
            certificates: state.certs.get().map(|r| r.current().certs.clone()).unwrap_or_default(),
        }
    }

    /// The status page: one table row per instance, grouped by route.
    pub fn render_html(&self) -> String {
        let mut rows = String::new();
        for route in &self.routes {
            let links: Vec<String> = route
                .names
                .iter()
                .map(|n| match n.strip_prefix('*') {
                    Some(path) => format!("<code>{}</code>", escape(&format!("any host{path}"))),
                    None => format!("<a href=\"http://{0}\">{0}</a>", escape(n)),
                })
                .collect();
            let r = &route.requests;
            let _ = write!(
                rows,
                "<tbody><tr class=\"svc\"><th colspan=\"2\">{}<br><span class=\"muted\">{}</span></th>\
                 <td colspan=\"3\">{}</td><td>{} req<br>{} 5xx</td><td>maxconn {}<br>{} queued</td><td></td></tr>",
                escape(&route.service),
                escape(&route.datacenter),
                links.join("<br>"),
                r.total(),
                r.status_classes[5],
                route.maxconn,
                r.queued,
            );
            for i in &route.instances {
                let state = match (i.weight, i.available, i.check_up) {
                    (0, _, _) => "MAINT (weight 0)",
                    (_, true, _) => "UP",
                    (_, false, false) => "DOWN (check)",
                    (_, false, true) => "DOWN (ejected)",
                };
                let since = i
                    .since_change_ms
                    .map_or_else(|| "since seen".to_string(), |ms| human_secs(ms as f64 / 1000.0));
                let check = match (&i.last_check, i.last_check_age_ms) {
                    (Some(c), Some(age)) => format!("{} {} ago", escape(c), human_secs(age as f64 / 1000.0)),
                    _ => "-".to_string(),
                };
                let _ = write!(
                    rows,
                    "<tr class=\"{cls}\"><td>{id}<br><span class=\"muted\">{node}</span></td><td>{addr}</td>\
                     <td>{state}</td><td>{since}</td><td>{w}</td><td>{inflight} / {maxconn}</td>\
                     <td>{errors}</td><td>{check}</td></tr>",
                    cls = if i.available { "up" } else { "down" },
                    id = escape(&i.id),
                    node = escape(&i.node),
                    addr = i.addr,
                    w = i.weight,
                    inflight = i.inflight,
                    maxconn = route.maxconn,
                    errors = i.connect_errors,
                );
            }
            rows.push_str("</tbody>");
        }
        let mut refused = String::new();
        if !self.refused.is_empty() {
            refused.push_str("<h2>Refused from Consul</h2><ul>");
            for r in &self.refused {
                let _ = write!(refused, "<li>{}</li>", escape(&r.to_string()));
            }
            refused.push_str("</ul>");
        }
        let mut certs = String::new();
        if !self.certificates.is_empty() {
            certs.push_str("<h2>HTTPS certificates</h2><ul>");
            for c in &self.certificates {
                let whose = if c.self_signed {
                    "<strong>self-signed</strong> (made by the lb: configure lb.certs to replace it), "
                } else {
                    ""
                };
                let _ = write!(
                    certs,
                    "<li><code>{}</code>: {}{whose}until {}, SHA-256 <code>{}</code></li>",
                    escape(&c.file.display().to_string()),
                    escape(&c.names.join(", ")),
                    escape(&c.not_after),
                    escape(&c.sha256),
                );
            }
            certs.push_str("</ul>");
        }
        let age = self
            .consul_view
            .as_ref()
            .and_then(|v| v.age_secs)
            .map_or_else(String::new, |a| format!(", view {a:.0} s old"));
        let consul = match (self.ready, self.consul_ok) {
            (false, _) => format!("NOT READY: reading the catalog; requests wait for the first routing table{age}"),
            (true, true) => format!("connected{age}"),
            (true, false) => format!("UNREACHABLE (serving the last known routes{age})"),
        };
        let p99 = self
            .propagation_p99_ms
            .map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms"));
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>wayfinder lb</title>\
             <style>body{{font-family:system-ui,sans-serif;margin:1em}}table{{border-collapse:collapse;width:100%}}\
             td,th{{padding:.3em .5em;text-align:left;border-bottom:1px solid #ddd;vertical-align:top}}\
             tr.svc{{background:#f3f3f3}}tr.down td{{color:#b00}}.muted{{color:#666;font-size:.85em}}\
             tr.up td:nth-child(3){{color:#1a7f37;font-weight:600}}tr.down td:nth-child(3){{font-weight:600}}</style></head><body>\
             <h1>wayfinder lb</h1><p>Consul: {consul}. Routing changes: {changes} (propagation p99 {p99}). \
             Requests: {total} ({errors5} 5xx), {retries} retried, {queued} queued now. \
             Client connections: {open} open of {max} ({conns_refused} refused at a cap). \
             <a href=\"/stats.json\">JSON</a></p>\
             <table><thead><tr><th>instance</th><th>address</th><th>state</th><th>for</th><th>weight</th>\
             <th>in flight / max</th><th>conn errors (each retried elsewhere)</th><th>last check</th></tr></thead>\
             {rows}</table>{refused}{certs}</body></html>\n",
            errors5 = self.requests.status_classes[5],
            retries = self.retries,
            queued = self.queued,
            changes = self.changes,
            total = self.requests.total(),
            open = self.connections.open,
            max = self.connections.max,
            conns_refused = self.connections.refused_total + self.connections.refused_per_source,
        )
    }
}

/// The landing page (the lb's own host name on the HTTP port).
pub fn landing_page(state: &LbState) -> Response<ProxyBody> {
    html(
        StatusCode::OK,
        state
            .landing
            .get(|| Bytes::from(LbStatus::collect(state).render_html())),
    )
}

/// How long a rendered landing page is served again before it is rendered anew.
pub const LANDING_MAX_AGE: Duration = Duration::from_secs(1);

/// The landing page as last rendered: anyone who reaches the lb's HTTP port can
/// ask for it (`Host: localhost`), and it lists every route, so it is rendered
/// at most once per [`LANDING_MAX_AGE`] whatever the request rate.
#[derive(Debug, Default)]
pub struct LandingCache {
    page: parking_lot::Mutex<Option<(std::time::Instant, Bytes)>>,
}

impl LandingCache {
    /// The cached page while fresh, else the one `render` makes (kept).
    pub fn get(&self, render: impl FnOnce() -> Bytes) -> Bytes {
        let mut page = self.page.lock();
        match &*page {
            Some((at, body)) if at.elapsed() < LANDING_MAX_AGE => body.clone(),
            _ => {
                let body = render();
                *page = Some((std::time::Instant::now(), body.clone()));
                body
            }
        }
    }
}

fn json(status: &LbStatus) -> Response<ProxyBody> {
    let body = serde_json::to_vec_pretty(status).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    resp
}

fn answer(state: &LbState, req: &Request<Incoming>) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error_page(StatusCode::METHOD_NOT_ALLOWED, "Only GET is served here.");
    }
    match req.uri().path() {
        "/" => html(StatusCode::OK, LbStatus::collect(state).render_html()),
        "/stats.json" => json(&LbStatus::collect(state)),
        _ => error_page(StatusCode::NOT_FOUND, "Try / or /stats.json."),
    }
}

/// Serves the stats listener until shutdown.
pub async fn serve(listener: TcpListener, state: Arc<LbState>, shutdown: CancellationToken, tasks: TaskTracker) {
    let handler = move |req: Request<Incoming>| {
        let resp = answer(&state, &req);
        async move { resp }
    };
    crate::http_server::serve(listener, "lb stats", handler, shutdown, tasks).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_landing_page_is_rendered_once_per_max_age() {
        let cache = LandingCache::default();
        let mut renders = 0;
        for _ in 0..100 {
            let page = cache.get(|| {
                renders += 1;
                Bytes::from_static(b"page")
            });
            assert_eq!(&page[..], b"page");
        }
        assert_eq!(renders, 1, "100 requests, one render");
    }
}
