//! The admin endpoint (`[supervisor] admin`, default 127.0.0.1:9000): a JSON API
//! with the whole picture, a few actions, Prometheus `/metrics`, and the status
//! page for people at `/`.
//!
//! ```text
//!  GET  /                          status page (HTML; its charts are SVG drawn on the server)
//!  GET  /charts                    the page's charts alone (what its script refreshes)
//!  GET  /assets/charts.js          that script (embedded in the binary)
//!  GET  /api/status                StatusReport: units, consul, services, and each
//!                                  component's own part under its name (dns, lb, vpn)
//!  GET  /api/ready                 200 {"ready": true} when every unit this host's
//!                                  role starts runs and is ready (readiness.rs), else
//!                                  503 {"ready": false, "waiting_for": [{"unit", "why"}]}:
//!                                  for orchestrators and the image's HEALTHCHECK
//!  GET  /api/units                 units only
//!  POST /api/units/<name>/restart  stop it if running, start it now
//!  *    /api/<component>/...       the component's own actions (Component::api):
//!                                  POST /api/dns/reload, POST /api/vpn/peers,
//!                                  DELETE /api/vpn/peers/<name> ...
//!  GET  /metrics                   Prometheus text format (metrics.rs)
//!  GET  /healthz                   `ok`
//! ```
//!
//! Only this host's own names reach it. Every request (GET included) must
//! name the endpoint in `Host` by one of them, else 421 Misdirected Request:
//! the configured and the bound listen address, `localhost`,
//! `127.0.0.1`, `[::1]`, the host name (`/proc/sys/kernel/hostname`) and
//! HOST_IP; when it listens on a wildcard (`0.0.0.0`, `[::]`), also any address
//! of a local interface (`getifaddrs`, read when an address not already listed
//! comes). Case does not matter, nor a trailing dot, nor the port (an SSH tunnel
//! reaches it under another one). So a page whose DNS name rebinds to 127.0.0.1
//! (`Host: attacker.example:9000`) gets neither the status page (with the form
//! secret) nor any answer. Refused values are logged at warn once each (the
//! first 32; then a line a minute counts the rest).
//!
//! With a token configured every request needs `Authorization: Bearer <token>`
//! (or `?token=<token>`, so a phone's browser can open the page); others get 401.
//! Actions (POST, DELETE) sent by a browser from another site get 403: an
//! `Origin` (`http`/`https`) must name a host of the same list (it is never
//! compared with `Host`, which a rebinding page sends equal to it); `Origin:
//! null` passes only with the status page's per-process form secret (`?csrf=`);
//! no `Origin` (curl, `wayfinder status`) passes. So no web page the operator has
//! open can act here.
//! Services and their health come from the process's Consul view (the same one
//! the lb and the dns read), so a page view costs Consul nothing; everything
//! else comes from in-process state.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::SupervisorState;
use super::report::report;
use crate::component::{ApiAnswer, ApiRequest};
use crate::report::html::{escape, refusal_page};
use crate::report::throttle::LogEvery;

type Body = Full<Bytes>;

/// Longest request body an action reads.
const MAX_BODY: usize = 4096;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// What the status page may load: its own script (no inline script), fetches
/// to this endpoint, inline styles, data: images (the favicon); nothing
/// framed, no base, forms only to here.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; \
                           img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// An HTML answer of the status page's own, under [`PAGE_POLICY`].
fn page(body: String) -> Response<Body> {
    let mut resp = respond(StatusCode::OK, "text/html; charset=utf-8", body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
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
        Some(t) => format!("?csrf={}&amp;token={}", state.csrf, escape(t)),
        None => format!("?csrf={}", state.csrf),
    }
}

/// The names and addresses this endpoint answers for (see the module docs).
/// Ports are not compared: an SSH tunnel (`ssh -L 8080:127.0.0.1:9000`) or a
/// port mapping reaches it under another port, and a rebinding page already
/// uses the endpoint's own port; what it cannot choose is the name.
#[derive(Debug, Clone, Default)]
struct Allowed {
    /// Host names, lowercase, without a trailing dot.
    names: Vec<String>,
    /// Addresses (canonical: an IPv4-mapped IPv6 address as IPv4).
    ips: Vec<IpAddr>,
    /// The endpoint listens on a wildcard address: every address of a local
    /// interface reaches it too.
    any_local: bool,
}

impl Allowed {
    /// The list for this process: the configured and the bound admin address,
    /// `localhost`, `127.0.0.1`, `[::1]`, the host name and HOST_IP.
    fn of(state: &SupervisorState) -> Self {
        let mut allowed = Allowed {
            names: vec!["localhost".into()],
            ips: vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ],
            any_local: false,
        };
        if let Some(h) = crate::net::host::name() {
            let h = h.trim_end_matches('.').to_ascii_lowercase();
            if !h.is_empty() {
                allowed.names.push(h);
            }
        }
        let listen = [state.config.supervisor.admin, state.addresses().admin];
        let listen = listen.iter().flatten().map(|a| a.ip());
        allowed.any_local = listen.clone().any(|ip| ip.is_unspecified());
        // A wildcard is no name a browser connects to: it stands for the
        // interface addresses, looked up when needed.
        for ip in listen.chain(state.config.host_ip).filter(|ip| !ip.is_unspecified()) {
            allowed.ips.push(ip.to_canonical());
        }
        allowed
    }

    /// Whether a parsed host is one of these; `local` lists the interface
    /// addresses, asked only for an address not already listed on a wildcard bind.
    fn contains(&self, host: &HostName, local: impl FnOnce() -> Vec<IpAddr>) -> bool {
        match host {
            HostName::Name(name) => self.names.iter().any(|n| n == name),
            HostName::Ip(ip) => {
                self.ips.contains(ip) || (self.any_local && local().iter().any(|l| l.to_canonical() == *ip))
            }
        }
    }
}

/// The host part of a `Host` header or of an `Origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostName {
    /// A DNS name, lowercase, without a trailing dot.
    Name(String),
    /// An address (canonical).
    Ip(IpAddr),
}

/// Parses `host[:port]` (`name`, `1.2.3.4`, `[v6]`, each with an optional port;
/// names case-insensitive, with an optional trailing dot). None for anything else.
fn parse_host(authority: &str) -> Option<HostName> {
    let port_ok =
        |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok();
    if let Some(rest) = authority.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port_ok)) {
            return None;
        }
        return inner
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|ip| HostName::Ip(IpAddr::V6(ip).to_canonical()));
    }
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port_ok(port) => host,
        Some(_) => return None,
        None => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return Some(HostName::Ip(IpAddr::V4(ip)));
    }
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (host.len() <= 253 && host.split('.').all(label_ok)).then_some(HostName::Name(host))
}

/// The host of an `Origin` (`http://host[:port]` or `https://…`). None for
/// `null`, another scheme, or anything with a path, user or query.
fn parse_origin(origin: &str) -> Option<HostName> {
    let (scheme, rest) = origin.split_once("://")?;
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
        return None;
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '@', '?', '#']) {
        return None;
    }
    parse_host(authority)
}

/// The addresses of this host's interfaces; empty when they cannot be read.
fn interface_addresses() -> Vec<IpAddr> {
    crate::net::host::interface_addresses()
        .into_iter()
        .map(|(_, ip)| ip)
        .collect()
}

/// Whether the request names this endpoint: every `Host` header (and the
/// authority of an absolute-form target) must be on the list, and there must be
/// one. On refusal, the offending value.
fn host_allowed<B>(req: &Request<B>, allowed: &Allowed) -> Result<(), String> {
    let hosts = req.headers().get_all(header::HOST).iter();
    let mut given = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .into_iter()
        .chain(hosts.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .peekable();
    if given.peek().is_none() {
        return Err(String::new());
    }
    let mut local = None;
    for host in given {
        let ok = parse_host(host.trim())
            .is_some_and(|h| allowed.contains(&h, || local.get_or_insert_with(interface_addresses).clone()));
        if !ok {
            return Err(host);
        }
    }
    Ok(())
}

/// Whether an action may come from where it comes from. A browser names the
/// page that sent a POST/DELETE in `Origin`; without a token on a loopback
/// endpoint, any web page the operator has open could otherwise restart units
/// or remove vpn peers. Allowed: no `Origin` (curl, `wayfinder status`, scripts);
/// an `Origin` (http or https) whose host is on the same list as `Host` (never
/// compared with `Host` itself: a DNS-rebinding page sends the two equal); or
/// `Origin: null` (an opaque origin, which names no other site: a privacy
/// setting, a redirect) with the form secret of this process in the query. Only
/// pages that could read the status page know that secret, and the page is only
/// served under an allowed `Host`, so a rebinding page never sees it; an
/// `Origin` naming another site is refused even with it.
fn same_site<B>(req: &Request<B>, allowed: &Allowed, csrf: &str) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let origin = String::from_utf8_lossy(origin.as_bytes());
    let origin = origin.trim();
    if origin == "null" {
        return req.uri().query().is_some_and(|q| {
            q.split('&').any(|kv| {
                kv.strip_prefix("csrf=")
                    .is_some_and(|v| same(v.as_bytes(), csrf.as_bytes()))
            })
        });
    }
    parse_origin(origin).is_some_and(|h| allowed.contains(&h, interface_addresses))
}

/// Distinct refused values logged one by one.
const REFUSALS_LOGGED: usize = 32;

/// Distinct refused `Host`/`Origin` values logged so far, at most
/// [`REFUSALS_LOGGED`]; past that, [`MORE_REFUSALS`] says how many more.
static REFUSALS: parking_lot::Mutex<Vec<String>> = parking_lot::Mutex::new(Vec::new());

/// One line a minute for refusals past the distinct ones.
static MORE_REFUSALS: std::sync::LazyLock<LogEvery> =
    std::sync::LazyLock::new(|| LogEvery::new(std::time::Duration::from_secs(60)));

/// Logs a refusal at warn once per distinct `what`+`value` (bounded, see [`REFUSALS`]).
fn log_refusal(what: &'static str, value: &str, path: &str) {
    let value: String = value.chars().take(100).collect();
    let key = format!("{what} {value}");
    let mut seen = REFUSALS.lock();
    if seen.contains(&key) {
        return;
    }
    if seen.len() < REFUSALS_LOGGED {
        seen.push(key);
        drop(seen);
        tracing::warn!(what, value = ?value, path, "admin: request refused: not addressed to this endpoint by one of its own names (a DNS-rebinding or cross-site page?); further ones with this value are not logged");
        return;
    }
    drop(seen);
    if let Some(unlogged) = MORE_REFUSALS.event() {
        tracing::warn!(what, value = ?value, path, unlogged, "admin: more requests refused for foreign Host/Origin values");
    }
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
    let allowed = Allowed::of(&state);
    if let Err(host) = host_allowed(&req, &allowed) {
        log_refusal("host", &host, req.uri().path());
        let shown: String = host.chars().take(100).collect();
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "this admin endpoint answers only under its own names: localhost, 127.0.0.1, [::1], \
                 the host name, HOST_IP and its listen address (any local address when it listens on a wildcard); \
                 Host {shown:?} is none of them"
            ),
        );
    }
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
    if !matches!(*req.method(), Method::GET | Method::HEAD) && !same_site(&req, &allowed, &state.csrf) {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        log_refusal("origin", origin.as_deref().unwrap_or_default(), req.uri().path());
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
            page(super::status_page::render(&state, &report, &page_query(&state)))
        }
        (&Method::GET | &Method::HEAD, ["charts"]) => {
            let charts = state.timeline.lock().charts();
            page(super::charts::page(&charts, &page_query(&state)))
        }
        (&Method::GET | &Method::HEAD, ["assets", "charts.js"]) => {
            let mut resp = respond(StatusCode::OK, "text/javascript; charset=utf-8", super::charts::SCRIPT);
            resp.headers_mut()
                .insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            resp
        }
        (&Method::GET, ["healthz"]) => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET | &Method::HEAD, ["api", "ready"]) => {
            let readiness = super::readiness::check(&state);
            let status = if readiness.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &readiness)
        }
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
        (_, ["api", name, rest @ ..]) if state.component(name).is_some() => {
            let name = name.to_string();
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            component_action(&state, &name, &rest, req, is_form, token.as_deref()).await
        }
        (_, ["api", ..]) | (_, ["metrics"]) | (_, ["healthz"]) => error(
            StatusCode::NOT_FOUND,
            &format!("no {method} {path} here; see GET /api/status"),
        ),
        _ => error(StatusCode::NOT_FOUND, "not found; try / or /api/status"),
    }
}

/// `/api/<name>/<rest>`: the component's own action, with the body read
/// (bounded) and its answer turned into a response.
async fn component_action(
    state: &SupervisorState,
    name: &str,
    rest: &[String],
    req: Request<Incoming>,
    is_form: bool,
    token: Option<&str>,
) -> Response<Body> {
    let method = req.method().clone();
    let query = page_query(state);
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(message) if is_form => {
            return respond(
                StatusCode::BAD_REQUEST,
                "text/html; charset=utf-8",
                refusal_page(&message.to_string(), &query),
            );
        }
        Err(message) => return error(StatusCode::BAD_REQUEST, &message.to_string()),
    };
    let Some(component) = state.component(name) else {
        return error(StatusCode::NOT_FOUND, "not found; try / or /api/status");
    };
    let path: Vec<&str> = rest.iter().map(String::as_str).collect();
    let request = ApiRequest {
        method: &method,
        path: &path,
        body: &body,
        is_form,
        page_query: &query,
        started: state.is_supervised(name),
    };
    match component.api(request).await {
        Some(ApiAnswer::Json(status, value)) => json(status, &value),
        Some(ApiAnswer::Html(status, page)) => respond(status, "text/html; charset=utf-8", page),
        Some(ApiAnswer::Done(status, value)) => done(is_form, token, status, value),
        None => error(
            StatusCode::NOT_FOUND,
            &format!("no {method} /api/{name}/{} here; see GET /api/status", rest.join("/")),
        ),
    }
}

/// The request body, at most [`MAX_BODY`] bytes.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(BodyError(e)),
    }
}

/// A request body that was too long or broken off.
#[derive(Debug, thiserror::Error)]
#[error("could not read the request body (at most {MAX_BODY} bytes): {0}")]
struct BodyError(Box<dyn std::error::Error + Send + Sync>);

/// Serves the admin endpoint until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<SupervisorState>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, token = state.config.supervisor.token.is_some(), "admin endpoint listening");
        state.addresses.lock().admin = Some(addr);
    }
    let connections = TaskTracker::new();
    let handler = move |req| answer(state.clone(), req);
    crate::http_server::serve(listener, "admin", handler, shutdown, connections.clone()).await;
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(any_local: bool) -> Allowed {
        Allowed {
            names: vec!["localhost".into(), "box7.lan".into()],
            ips: vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                IpAddr::from([10, 1, 2, 3]),
            ],
            any_local,
        }
    }

    fn name(n: &str) -> Option<HostName> {
        Some(HostName::Name(n.into()))
    }

    fn ip(a: impl Into<IpAddr>) -> Option<HostName> {
        Some(HostName::Ip(a.into()))
    }

    #[test]
    fn hosts_parse_with_or_without_port_case_and_trailing_dot() {
        assert_eq!(parse_host("localhost"), name("localhost"));
        assert_eq!(parse_host("LocalHost.:9000"), name("localhost"));
        assert_eq!(parse_host("Box7.LAN:80"), name("box7.lan"));
        assert_eq!(parse_host("127.0.0.1"), ip([127, 0, 0, 1]));
        assert_eq!(parse_host("127.0.0.1:9000"), ip([127, 0, 0, 1]));
        assert_eq!(parse_host("127.0.0.1.:9000"), ip([127, 0, 0, 1]));
        assert_eq!(parse_host("[::1]"), ip(std::net::Ipv6Addr::LOCALHOST));
        assert_eq!(parse_host("[::1]:9000"), ip(std::net::Ipv6Addr::LOCALHOST));
        assert_eq!(
            parse_host("[::ffff:127.0.0.1]:9000"),
            ip([127, 0, 0, 1]),
            "mapped: canonical"
        );
        for bad in [
            "",
            ":9000",
            "localhost:",
            "localhost:99999",
            "localhost:9x",
            "::1",
            "[::1",
            "[::1]9000",
            "[::1]:",
            "[nope]:1",
            "a b",
            "user@localhost",
            "localhost/x",
            "a..b",
            "localhost..",
        ] {
            assert_eq!(parse_host(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn origins_parse_http_and_https_only() {
        assert_eq!(parse_origin("http://127.0.0.1:9000"), ip([127, 0, 0, 1]));
        assert_eq!(parse_origin("HTTPS://LOCALHOST"), name("localhost"));
        assert_eq!(parse_origin("http://[::1]:9000/"), ip(std::net::Ipv6Addr::LOCALHOST));
        for bad in [
            "null",
            "127.0.0.1:9000",
            "file://localhost",
            "ftp://localhost",
            "http://localhost/path",
            "http://me@localhost",
            "http://localhost?x",
            "http://",
        ] {
            assert_eq!(parse_origin(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_own_names_and_addresses_are_allowed() {
        let a = allowed(false);
        let never = || -> Vec<IpAddr> { panic!("no interface lookup without a wildcard bind") };
        for ok in ["localhost", "box7.lan.", "127.0.0.1:1234", "[::1]:9000", "10.1.2.3"] {
            assert!(a.contains(&parse_host(ok).unwrap(), never), "{ok}");
        }
        for refused in ["attacker.example", "box7", "lan", "127.0.0.2", "10.1.2.4", "[::2]"] {
            assert!(!a.contains(&parse_host(refused).unwrap(), Vec::new), "{refused}");
        }
        // A wildcard bind: interface addresses too, but never other names.
        let a = allowed(true);
        let local = || vec![IpAddr::from([192, 168, 5, 9])];
        assert!(a.contains(&parse_host("192.168.5.9:9000").unwrap(), local));
        assert!(!a.contains(&parse_host("192.168.5.10").unwrap(), local));
        assert!(!a.contains(&parse_host("attacker.example").unwrap(), local));
    }

    #[test]
    fn a_wildcard_bind_allows_every_interface_address() {
        let local = interface_addresses();
        assert!(local.contains(&IpAddr::from([127, 0, 0, 1])), "{local:?}");
        let wildcard = Allowed {
            names: vec!["localhost".into()],
            ips: Vec::new(),
            any_local: true,
        };
        for addr in &local {
            let host = match addr {
                IpAddr::V4(v4) => format!("{v4}:9000"),
                IpAddr::V6(v6) => format!("[{v6}]:9000"),
            };
            let Some(parsed) = parse_host(&host) else {
                panic!("{host} does not parse")
            };
            assert!(wildcard.contains(&parsed, interface_addresses), "{host}");
        }
        assert!(!wildcard.contains(&parse_host("192.0.2.77").unwrap(), interface_addresses));
    }

    fn request(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_header_is_required_and_checked() {
        let a = allowed(false);
        let get = |h: &[(&str, &str)]| host_allowed(&request(Method::GET, "/", h), &a);
        assert_eq!(get(&[("host", "127.0.0.1:9000")]), Ok(()));
        assert_eq!(get(&[("host", "LOCALHOST.")]), Ok(()));
        assert_eq!(
            get(&[("host", "attacker.example:9000")]),
            Err("attacker.example:9000".into())
        );
        assert_eq!(get(&[]), Err(String::new()), "no Host at all");
        assert!(get(&[("host", "127.0.0.1"), ("host", "attacker.example")]).is_err());
        // An absolute-form target names the host too.
        let r = request(Method::GET, "http://attacker.example:9000/", &[("host", "127.0.0.1")]);
        assert!(host_allowed(&r, &a).is_err());
    }

    #[test]
    fn rebinding_origin_is_refused_own_origin_allowed() {
        let a = allowed(false);
        let csrf = "0123456789abcdef0123456789abcdef";
        let post = |uri: &str, h: &[(&str, &str)]| same_site(&request(Method::POST, uri, h), &a, csrf);
        assert!(post("/api/dns/reload", &[]), "no Origin: curl");
        assert!(post("/api/dns/reload", &[("origin", "http://127.0.0.1:9000")]));
        assert!(post("/api/dns/reload", &[("origin", "https://box7.lan")]));
        // Host and Origin equal, both the attacker's: not compared with each other.
        assert!(!post(
            "/api/dns/reload",
            &[
                ("host", "attacker.example:9000"),
                ("origin", "http://attacker.example:9000")
            ]
        ));
        assert!(!post("/api/dns/reload", &[("origin", "http://evil.example")]));
        // The form secret: only with an opaque origin, never for another site.
        let with = format!("/api/dns/reload?csrf={csrf}");
        assert!(post(&with, &[("origin", "null")]));
        assert!(!post("/api/dns/reload", &[("origin", "null")]));
        assert!(!post(&format!("/api/dns/reload?csrf=0{csrf}"), &[("origin", "null")]));
        assert!(!post(&with, &[("origin", "http://evil.example")]));
    }
}
