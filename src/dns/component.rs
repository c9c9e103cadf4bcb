//! The dns as a component of the appliance (see [`crate::component`]): bound
//! from its own section, run by [`super::run`], and shown by itself: its
//! Prometheus series, its part of `/api/status`, of the status page and of the
//! banner, and its one admin action (reload the zones).
//!
//! ```text
//!  Dns (one per process: counters, zone-reload trigger, pinned addresses)
//!    bind() ─▶ DnsSockets (listen addresses; port 0 pinned after the first bind)
//!    BoundDns::run ─▶ dns::run(section, consul section, sockets, control, hub)
//!    metrics/status/page ◀── DnsStats (sharded atomics, read per scrape)
//!    sample ◀── DnsStats (read once per timeline step: answers by kind and RCODE)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::settings::DnsConfig;
use super::stats::{DnsStats, RouteSnapshot, TcpClose};
use super::{DnsControl, DnsError, DnsSockets};
use crate::component::{
    ApiAnswer, ApiRequest, Appliance, Banner, Bound, BoxFuture, Component, ComponentError, Failure, Host, Listener,
    Listening, PageParts,
};
use crate::consul::settings::ConsulConfig;
use crate::report::html::escape;
use crate::report::prometheus::{Kind, Writer};
use crate::report::timeline::{Chart, Tick};

/// Chart: answers per second by where they came from.
static ANSWERS_BY_KIND: Chart = Chart {
    order: 10,
    id: "dns-kind",
    title: "dns answers by kind",
    unit: "/s",
};
/// Chart: answers per second by RCODE.
static ANSWERS_BY_RCODE: Chart = Chart {
    order: 11,
    id: "dns-rcode",
    title: "dns answers by rcode",
    unit: "/s",
};

/// DNS RCODE names by the index of `RouteSnapshot::rcodes`.
const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];

impl Failure for DnsError {
    fn exit_code(&self) -> u8 {
        match self {
            DnsError::Bind { .. } => crate::EXIT_CONFIG,
            DnsError::WorkerDied { .. } => crate::EXIT_SOFTWARE,
            _ => 1,
        }
    }
}

/// The dns component.
pub struct Dns {
    config: DnsConfig,
    consul: ConsulConfig,
    appliance: Arc<Appliance>,
    /// Counters and the zone-reload trigger, for the life of the process.
    control: DnsControl,
    /// The addresses bound by the first start (a port 0 keeps its port).
    bound: Mutex<Vec<SocketAddr>>,
}

impl Dns {
    /// The dns of `config`, asking Consul as `consul` says.
    pub fn new(config: DnsConfig, consul: ConsulConfig, appliance: Arc<Appliance>) -> Self {
        Self {
            config,
            consul,
            appliance,
            control: DnsControl::default(),
            bound: Mutex::new(Vec::new()),
        }
    }

    /// Its counters and zone-reload trigger.
    pub fn control(&self) -> &DnsControl {
        &self.control
    }

    fn addresses(&self) -> Vec<SocketAddr> {
        self.bound.lock().clone()
    }
}

/// The dns in `/api/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DnsReport {
    /// Per route (consul, lb, zone, upstream, rejected).
    pub routes: BTreeMap<&'static str, RouteSnapshot>,
    /// Packets dropped unanswered.
    pub dropped: u64,
    /// The upstream resolvers for every other name.
    pub upstreams: Vec<std::net::SocketAddr>,
    /// Why upstream entries gave nothing (with none left: why other names
    /// answer SERVFAIL).
    pub upstream_problems: Vec<String>,
}

/// One bound start of the dns.
struct BoundDns {
    sockets: DnsSockets,
    config: DnsConfig,
    consul: ConsulConfig,
    control: DnsControl,
    appliance: Arc<Appliance>,
}

fn listening(addrs: &[SocketAddr]) -> Listening {
    Listening(
        addrs
            .iter()
            .map(|&addr| Listener {
                key: "dns",
                what: "dns",
                addr,
                tcp: true,
                list: true,
            })
            .collect(),
    )
}

impl Bound for BoundDns {
    fn listening(&self) -> Listening {
        listening(&self.sockets.local_addrs())
    }

    fn run(self: Box<Self>, shutdown: CancellationToken) -> BoxFuture<'static, Result<(), ComponentError>> {
        Box::pin(async move {
            let BoundDns {
                sockets,
                config,
                consul,
                control,
                appliance,
            } = *self;
            super::run(&config, &consul, sockets, control, appliance.consul.clone(), shutdown)
                .await
                .map_err(ComponentError::from)
        })
    }
}

impl Component for Dns {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn bind(&self) -> Result<Box<dyn Bound>, ComponentError> {
        let mut bound = self.bound.lock();
        let listen = if bound.is_empty() { &self.config.listen } else { &*bound };
        let sockets = DnsSockets::bind(listen, self.config.workers, self.config.tunnel)?;
        *bound = sockets.local_addrs();
        Ok(Box::new(BoundDns {
            sockets,
            config: DnsConfig {
                listen: bound.clone(),
                ..self.config.clone()
            },
            consul: self.consul.clone(),
            control: self.control.clone(),
            appliance: self.appliance.clone(),
        }))
    }

    fn listening(&self) -> Listening {
        listening(&self.addresses())
    }

    fn metrics(&self, out: &mut Writer) {
        metrics(out, &self.control.stats);
    }

    fn sample(&self, tick: &mut Tick<'_>) {
        let stats = &self.control.stats;
        let route = |r| stats.route(r);
        use super::stats::AnswerSource;
        let (consul, lb, zone, upstream, rejected) = (
            route(AnswerSource::Consul),
            route(AnswerSource::Lb),
            route(AnswerSource::Zone),
            route(AnswerSource::Upstream),
            route(AnswerSource::Rejected),
        );
        for (kind, n) in [
            ("consul", consul.queries),
            ("wildcard", lb.queries),
            ("zone", zone.queries),
            ("cache", upstream.cache_hits),
            ("upstream", upstream.queries.saturating_sub(upstream.cache_hits)),
            ("rejected", rejected.queries),
        ] {
            tick.counter(&ANSWERS_BY_KIND, kind, n);
        }
        for (i, rcode) in RCODES.iter().enumerate() {
            let n = [&consul, &lb, &zone, &upstream, &rejected]
                .iter()
                .map(|r| r.rcodes[i])
                .sum();
            tick.counter(&ANSWERS_BY_RCODE, rcode, n);
        }
    }

    fn status(&self, started: bool) -> serde_json::Value {
        if !started {
            return serde_json::Value::Null;
        }
        let stats = &self.control.stats;
        serde_json::to_value(DnsReport {
            routes: stats.snapshot().into_iter().collect(),
            dropped: stats.dropped(),
            upstreams: self.config.upstreams.clone(),
            upstream_problems: self.config.upstream_problems.clone(),
        })
        .unwrap_or_default()
    }

    fn page(&self, started: bool, _q: &str, parts: &mut PageParts) {
        if !started {
            return;
        }
        for d in self.addresses() {
            parts.listening.push(format!("dns <code>{d}</code> (udp + tcp)"));
        }
        let routes = self.control.stats.snapshot();
        let total: u64 = routes.iter().map(|(_, r)| r.queries).sum();
        let mut line = format!("dns answered {total} questions");
        let parts_by_route: Vec<String> = routes
            .iter()
            .filter(|(_, r)| r.queries > 0)
            .map(|(n, r)| format!("{n} {}", r.queries))
            .collect();
        if !parts_by_route.is_empty() {
            line.push_str(&format!(" ({})", escape(&parts_by_route.join(", "))));
        }
        parts.listening.push(line);
        parts
            .listening
            .push(upstream_line(&self.config.upstreams, &self.config.upstream_problems));
    }

    fn banner(&self, appliance: &Appliance, host: &Host, banner: &mut Banner) {
        if let Some(d) = self.addresses().first().map(|d| appliance.reachable(*d)) {
            banner.places.push(format!("  dns      {d} (udp+tcp)"));
            banner.tries.push(format!(
                "  dig @{} -p {} web.service.{} SRV",
                d.ip(),
                d.port(),
                host.domain
            ));
        }
    }

    fn reload(&self) -> bool {
        self.control.reload_zones.notify_one();
        true
    }

    fn api<'a>(&'a self, req: ApiRequest<'a>) -> BoxFuture<'a, Option<ApiAnswer>> {
        Box::pin(async move {
            if !(req.method == http::Method::POST && req.path == ["reload"]) {
                return None;
            }
            if !req.started {
                return Some(ApiAnswer::Json(
                    http::StatusCode::CONFLICT,
                    serde_json::json!({ "error": "dns does not run on this host" }),
                ));
            }
            tracing::info!("zone reload requested through the admin endpoint");
            self.reload();
            Some(ApiAnswer::Done(
                http::StatusCode::ACCEPTED,
                serde_json::json!({ "ok": true, "action": "reload zones" }),
            ))
        })
    }
}

/// The status page's line about the upstreams: where other names go, or
/// why they answer SERVFAIL.
fn upstream_line(upstreams: &[std::net::SocketAddr], problems: &[String]) -> String {
    let why = escape(&problems.join("; "));
    if upstreams.is_empty() {
        let why = if why.is_empty() {
            "none configured".to_string()
        } else {
            why
        };
        return format!(
            "dns upstreams: <strong>none</strong>: names outside Consul, the zones and the wildcard domain \
             answer SERVFAIL ({why}; set dns.upstreams, or save the host's resolvers in /etc/resolv.conf.orig)"
        );
    }
    let list: Vec<String> = upstreams.iter().map(|u| format!("<code>{u}</code>")).collect();
    let skipped = if why.is_empty() {
        String::new()
    } else {
        format!(" (skipped: {why})")
    };
    format!("dns upstreams {}{skipped}", list.join(", "))
}

/// The dns's Prometheus series.
fn metrics(out: &mut Writer, stats: &DnsStats) {
    let routes = stats.snapshot();
    out.family(
        "wayfinder_dns_responses_total",
        Kind::Counter,
        "DNS questions answered, by route and RCODE.",
    );
    for (route, s) in &routes {
        for (rcode, n) in RCODES.iter().zip(s.rcodes) {
            out.sample(
                "wayfinder_dns_responses_total",
                &[("route", route), ("rcode", rcode)],
                n,
            );
        }
    }
    type Counter = fn(&RouteSnapshot) -> u64;
    let counters: [(&str, &str, Counter); 7] = [
        (
            "wayfinder_dns_cache_hits_total",
            "Answers served from the cache or pre-encoded local data, by route.",
            |s| s.cache_hits,
        ),
        (
            "wayfinder_dns_stale_answers_total",
            "Expired answers served because every upstream failed (RFC 8767).",
            |s| s.stale_served,
        ),
        (
            "wayfinder_dns_upstream_errors_total",
            "Upstream or Consul exchanges that failed, by route.",
            |s| s.upstream_errors,
        ),
        (
            "wayfinder_dns_upstream_ignored_total",
            "Datagrams on a forwarded question's socket that were not its answer (wrong ID, case or question), by route.",
            |s| s.ignored_responses,
        ),
        (
            "wayfinder_dns_upstream_over_limit_total",
            "Questions not forwarded because dns.max_forwarded were in flight, by route.",
            |s| s.over_limit,
        ),
        (
            "wayfinder_dns_inline_exchanges_total",
            "Exchanges a UDP worker thread made itself on its own socket (Consul on loopback), by route.",
            |s| s.inline_exchanges,
        ),
        (
            "wayfinder_dns_inline_overflow_total",
            "Questions that found a UDP worker's pending table (dns.consul_inline_slots) full and took the task path, by route.",
            |s| s.inline_overflow,
        ),
    ];
    for (name, help, value) in counters {
        out.family(name, Kind::Counter, help);
        for (route, s) in &routes {
            out.sample(name, &[("route", route)], value(s));
        }
    }
    out.family(
        "wayfinder_dns_tcp_closed_total",
        Kind::Counter,
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
        "wayfinder_dns_upstream_request_duration_seconds",
        Kind::Histogram,
        "Latency of exchanges with Consul and the upstream resolvers, by route.",
    );
    for (route, s) in &routes {
        out.histogram(
            "wayfinder_dns_upstream_request_duration_seconds",
            &[("route", route)],
            &s.latency,
        );
    }
    out.single(
        "wayfinder_dns_dropped_total",
        Kind::Counter,
        "Packets dropped unanswered.",
        stats.dropped(),
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_says_why_there_is_no_upstream() {
        let none = super::upstream_line(&[], &["/etc/resolv.conf.orig is a directory <x>".into()]);
        assert!(
            none.contains("<strong>none</strong>") && none.contains("SERVFAIL"),
            "{none}"
        );
        assert!(none.contains("is a directory &lt;x&gt;"), "escaped: {none}");
        let some = super::upstream_line(&["192.0.2.1:53".parse().unwrap()], &[]);
        assert_eq!(some, "dns upstreams <code>192.0.2.1:53</code>");
    }
}
