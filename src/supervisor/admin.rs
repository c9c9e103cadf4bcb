//! The admin endpoint (`[supervisor] admin`, default 127.0.0.1:9000): a JSON API
//! with the whole picture, a few actions, Prometheus `/metrics`, and the status
//! page for people at `/`.
//!
//! ```text
//!  GET  /                          status page (HTML, rendered here, no script)
//!  GET  /api/status                StatusReport: units, consul, services, lb, dns, vpn
//!  GET  /api/units                 units only
//!  POST /api/units/<name>/restart  stop it if running, start it now
//!  POST /api/dns/reload            reload zones_dir now
//!  POST /api/vpn/peers            add a peer ({"name"}: JSON back; a form: a page
//!                                  with the client config and its QR code)
//!  DELETE /api/vpn/peers/<name>    remove a peer (POST …/<name>/remove from the page)
//!  GET  /metrics                   Prometheus text format (metrics.rs)
//!  GET  /healthz                   `ok`
//! ```
//!
//! With a token configured every request needs `Authorization: Bearer <token>`
//! (or `?token=<token>`, so a phone's browser can open the page); others get 401.
//! Actions (POST, DELETE) sent by a browser from another site get 403: their
//! `Origin` must be this endpoint, or they must carry the status page's per-process
//! form secret (`?csrf=`), so no web page the operator has open can act here.
//! Services and their health come from the process's Consul view (the same one
//! the lb and the dns read), so a page view costs Consul nothing; everything
//! else comes from in-process state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::unit::UnitInfo;
use super::vpn_admin::{self, Refusal, VpnReport};
use super::{Addresses, ConsulHealth, SupervisorState, lock};
use crate::lb::status::LbStatus;

/// Services listed at most (the page is for people).
const MAX_SERVICES: usize = 1000;

type Body = Full<Bytes>;

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
    /// Every unit has started (or failed).
    pub ready: bool,
    /// Listen addresses.
    pub addresses: Addresses,
    /// The Consul agent.
    pub consul: ConsulHealth,
    /// Programs and components.
    pub units: Vec<UnitInfo>,
    /// Consul services with their instances and how to reach them.
    pub services: Vec<ServiceReport>,
    /// The lb's routes, instances and counters, when it runs.
    pub lb: Option<LbStatus>,
    /// dns counters, when dns runs.
    pub dns: Option<DnsReport>,
    /// The vpn and its peers.
    pub vpn: VpnReport,
}

/// A Consul service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceReport {
    /// Service name.
    pub name: String,
    /// The union of its instances' tags.
    pub tags: Vec<String>,
    /// DNS names that resolve it through the dns component.
    pub dns_names: Vec<String>,
    /// URLs that reach it through the lb (empty unless tagged for it).
    pub urls: Vec<String>,
    /// Its instances.
    pub instances: Vec<InstanceReport>,
}

/// One instance of a service.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceReport {
    /// Consul service ID.
    pub id: String,
    /// Node.
    pub node: String,
    /// Address and port.
    pub address: String,
    /// Worst check status: `passing`, `warning` or `critical`.
    pub health: String,
    /// The lb's own view (`up`, `down`), when it routes this instance.
    pub lb: Option<String>,
}

/// dns counters.
#[derive(Debug, Clone, Serialize)]
pub struct DnsReport {
    /// Per route (consul, lb, zone, upstream, rejected).
    pub routes: BTreeMap<&'static str, crate::dns::stats::RouteSnapshot>,
    /// Packets dropped unanswered.
    pub dropped: u64,
}

/// Every service from the process's Consul view (no Consul request per page view).
fn services(state: &SupervisorState, lb: Option<&LbStatus>) -> Vec<ServiceReport> {
    let config = &state.config;
    let Ok(view) = state.consul_hub.catalog() else {
        return Vec::new();
    };
    let catalog = view.current();
    let domain = config.consul.domain.to_string().trim_end_matches('.').to_string();
    let dc = &config.consul.datacenter;
    let http = state.addresses().lb_http.map(|a| super::reachable(a, config));
    let mut out = Vec::new();
    for (name, entry) in catalog.services.iter().take(MAX_SERVICES) {
        let route = lb.and_then(|l| l.routes.iter().find(|r| &r.service == name && &r.datacenter == dc));
        let urls = match (route, http) {
            (Some(route), Some(http)) => route
                .names
                .iter()
                .map(|n| match n.strip_prefix('*') {
                    Some(path) => format!("http://{http}{path}"),
                    None => {
                        let port = if http.port() == 80 {
                            String::new()
                        } else {
                            format!(":{}", http.port())
                        };
                        match n.split_once('/') {
                            Some((host, path)) => format!("http://{host}{port}/{path}"),
                            None => format!("http://{n}{port}/"),
                        }
                    }
                })
                .collect(),
            _ => Vec::new(),
        };
        let instances = entry
            .instances
            .iter()
            .map(|i| {
                let address = format!("{}:{}", i.address, i.port);
                let lb = route.and_then(|route| {
                    route.instances.iter().find(|r| r.addr.to_string() == address).map(|r| {
                        if r.available {
                            "up".to_string()
                        } else {
                            "down".to_string()
                        }
                    })
                });
                InstanceReport {
                    id: i.id.clone(),
                    node: i.node.clone(),
                    address,
                    health: i.health.name().to_string(),
                    lb,
                }
            })
            .collect();
        out.push(ServiceReport {
            dns_names: vec![
                format!("{name}.service.{domain}"),
                format!("{name}.service.{dc}.{domain}"),
            ],
            name: name.clone(),
            tags: entry.tags.clone(),
            urls,
            instances,
        });
    }
    out
}

/// Collects the whole picture.
pub async fn report(state: &SupervisorState) -> StatusReport {
    let lb = state.components.lb.load_full().filter(|_| state.plan.starts("lb"));
    let lb = lb.map(|l| LbStatus::collect(&l));
    let dns = state.plan.starts("dns").then(|| DnsReport {
        routes: state.components.dns.stats.snapshot().into_iter().collect(),
        dropped: state.components.dns.stats.dropped(),
    });
    StatusReport {
        version: env!("CARGO_PKG_VERSION"),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        role: state.plan.role().into(),
        uptime_secs: state.started.elapsed().as_secs_f64(),
        ready: state.ready.load(Ordering::Relaxed),
        addresses: state.addresses(),
        consul: state.consul_health(),
        units: state.units.iter().map(|u| u.snapshot()).collect(),
        services: services(state, lb.as_ref()),
        lb,
        dns,
        vpn: super::vpn_admin::report(state),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    respond(
        status,
        "application/json",
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    )
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

/// Constant-time comparison (the token must not leak through timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn query_token(req: &Request<Incoming>) -> Option<&str> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix("token="))
}

fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    header
        .or_else(|| query_token(req))
        .is_some_and(|t| same(t.trim().as_bytes(), token.as_bytes()))
}

/// The query string of the status page's links and form actions: the
/// per-process form secret, and the token when there is one.
fn page_query(state: &SupervisorState) -> String {
    match &state.config.supervisor.token {
        Some(t) => format!("?csrf={}&amp;token={}", state.csrf, super::status_page::escape(t)),
        None => format!("?csrf={}", state.csrf),
    }
}

/// Whether an action may come from where it comes from. A browser names the
/// page that sent a POST/DELETE in `Origin`; without a token on a loopback
/// endpoint, any web page the operator has open could otherwise restart units
/// or remove vpn peers. Allowed: no `Origin` (curl, `wayfinder status`, scripts),
/// an `Origin` whose host:port is this endpoint's `Host`, or the form secret of
/// this process in the query (only pages that could read the status page know it).
fn same_site(req: &Request<Incoming>, csrf: &str) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest.trim_end_matches('/'));
    if origin_host.is_some() && origin_host == host {
        return true;
    }
    req.uri().query().is_some_and(|q| {
        q.split('&').any(|kv| {
            kv.strip_prefix("csrf=")
                .is_some_and(|v| same(v.as_bytes(), csrf.as_bytes()))
        })
    })
}

/// A form post from the status page gets sent back to the page; API clients get JSON.
fn done(req_is_form: bool, token: Option<&str>, status: StatusCode, value: serde_json::Value) -> Response<Body> {
    if req_is_form && status.is_success() {
        let mut resp = respond(StatusCode::SEE_OTHER, "text/plain", "see /");
        let location = match token {
            Some(t) => format!("/?token={t}"),
            None => "/".into(),
        };
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return resp;
    }
    json(status, &value)
}

async fn answer(state: Arc<SupervisorState>, req: Request<Incoming>) -> Response<Body> {
    let token = state.config.supervisor.token.clone();
    if let Some(t) = &token
        && !authorized(&req, t)
    {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "this admin endpoint needs `Authorization: Bearer <token>`",
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) && !same_site(&req, &state.csrf) {
        tracing::warn!(origin = ?req.headers().get(header::ORIGIN), path = %req.uri().path(),
            "admin: cross-site request refused");
        return error(
            StatusCode::FORBIDDEN,
            "cross-site request refused: actions come from the status page itself or from a client without an Origin header",
        );
    }
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/x-www-form-urlencoded"));
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET | &Method::HEAD, []) => {
            let report = report(&state).await;
            respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                super::status_page::render(&report, &page_query(&state)),
            )
        }
        (&Method::GET, ["healthz"]) => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, ["api", "status"]) => json(StatusCode::OK, &report(&state).await),
        (&Method::GET, ["api", "units"]) => json(
            StatusCode::OK,
            &state.units.iter().map(|u| u.snapshot()).collect::<Vec<_>>(),
        ),
        (&Method::GET, ["metrics"]) => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            super::metrics::render(&state),
        ),
        (&Method::POST, ["api", "units", name, "restart"]) => {
            let Some(unit) = state.unit(name) else {
                return error(StatusCode::NOT_FOUND, &format!("no unit called `{name}`"));
            };
            if !state.is_supervised(name) {
                let why = unit.snapshot().why;
                return error(
                    StatusCode::CONFLICT,
                    &format!("`{name}` does not run on this host: {why}"),
                );
            }
            tracing::info!(unit = %name, "restart requested through the admin endpoint");
            unit.restart.notify_one();
            done(
                is_form,
                token.as_deref(),
                StatusCode::ACCEPTED,
                serde_json::json!({ "ok": true, "unit": name, "action": "restart" }),
            )
        }
        (&Method::POST, ["api", "dns", "reload"]) => {
            if !state.is_supervised("dns") {
                return error(StatusCode::CONFLICT, "dns does not run on this host");
            }
            tracing::info!("zone reload requested through the admin endpoint");
            state.components.dns.reload_zones.notify_one();
            done(
                is_form,
                token.as_deref(),
                StatusCode::ACCEPTED,
                serde_json::json!({ "ok": true, "action": "reload zones" }),
            )
        }
        (&Method::POST, ["api", "vpn", "peers"]) => {
            let added = match read_body(req).await {
                Ok(body) => vpn_admin::add(&state, &body, is_form),
                Err(refusal) => Err(refusal),
            };
            match (added, is_form) {
                (Ok(answer), false) => json(StatusCode::CREATED, &answer),
                (Ok(answer), true) => respond(
                    StatusCode::CREATED,
                    "text/html; charset=utf-8",
                    super::status_page::render_new_peer(&state.config, &answer, &page_query(&state)),
                ),
                (Err(r), false) => error(r.status, &r.message),
                (Err(r), true) => refused_page(&r, &page_query(&state)),
            }
        }
        (&Method::DELETE, ["api", "vpn", "peers", name]) | (&Method::POST, ["api", "vpn", "peers", name, "remove"]) => {
            match (vpn_admin::remove(&state, name), is_form) {
                (Ok(()), _) => done(
                    is_form,
                    token.as_deref(),
                    StatusCode::OK,
                    serde_json::json!({ "ok": true, "peer": name, "action": "remove" }),
                ),
                (Err(r), false) => error(r.status, &r.message),
                (Err(r), true) => refused_page(&r, &page_query(&state)),
            }
        }
        (_, ["api", ..]) | (_, ["metrics"]) | (_, ["healthz"]) => error(
            StatusCode::NOT_FOUND,
            &format!("no {method} {path} here; see GET /api/status"),
        ),
        _ => error(StatusCode::NOT_FOUND, "not found; try / or /api/status"),
    }
}

/// A refused form action as a page (a person sent it from the status page).
fn refused_page(r: &Refusal, q: &str) -> Response<Body> {
    respond(
        r.status,
        "text/html; charset=utf-8",
        super::status_page::render_refusal(&r.message, q),
    )
}

/// The request body, at most [`vpn_admin::MAX_BODY`] bytes.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Refusal> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(req.into_body(), vpn_admin::MAX_BODY)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "could not read the request body (at most {} bytes): {e}",
                vpn_admin::MAX_BODY
            ),
        }),
    }
}

/// Serves the admin endpoint until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<SupervisorState>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, token = state.config.supervisor.token.is_some(), "admin endpoint listening");
        lock(&state.addresses).admin = Some(addr);
    }
    let connections = TaskTracker::new();
    let handler = move |req| answer(state.clone(), req);
    crate::http_server::serve(listener, "admin", handler, shutdown, connections.clone()).await;
    connections.close();
    connections.wait().await;
}
