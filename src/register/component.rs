//! The register component as a component of the appliance (see
//! [`crate::component`]): nothing to bind (it dials Docker and Consul), run
//! by [`super::run`], and shown by itself: its Prometheus series, the
//! "containers" part of `/api/status` and of the status page, and its
//! section of `wayfinder status`.
//!
//! ```text
//!  Register (one per process; its Stats and Book outlive restarts)
//!    bind() ─▶ BoundRegister ─run─▶ register::run(section, Consul pool, HOST_IP, host name)
//!    metrics / status / page ◀── Stats (counters) + Book (containers, services)
//!    sample ◀── Stats (counters only, once per timeline step)
//! ```

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use super::RegisterError;
use super::docker::ACTIONS;
use super::registrar::Stats;
use super::settings::RegisterConfig;
use crate::component::{
    Appliance, Banner, Bound, BoxFuture, Component, ComponentError, Failure, Host, Listening, PageParts,
};
use crate::report::html::{badge, escape};
use crate::report::prometheus::{Kind, Writer};
use crate::report::timeline::{Chart, Tick};

/// Chart: Docker events per second, by action.
static EVENTS: Chart = Chart {
    order: 50,
    id: "register-events",
    title: "docker events",
    unit: "/s",
};
/// Chart: writes to the Consul agent per second, by operation.
static WRITES: Chart = Chart {
    order: 51,
    id: "register-writes",
    title: "registrations (writes to the Consul agent)",
    unit: "/s",
};

impl Failure for RegisterError {
    fn exit_code(&self) -> u8 {
        1
    }
}

/// The register component.
pub struct Register {
    config: RegisterConfig,
    appliance: Arc<Appliance>,
    stats: Arc<Stats>,
}

impl Register {
    /// The component of `config` on `appliance` (its Consul, `HOST_IP`).
    pub fn new(config: RegisterConfig, appliance: Arc<Appliance>) -> Self {
        Self {
            config,
            appliance,
            stats: Arc::new(Stats::default()),
        }
    }

    /// Its counters and book.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    fn report(&self, started: bool) -> RegisterReport {
        let stats = &self.stats;
        let book = stats.book.lock();
        let mut containers: Vec<ContainerReport> = book
            .containers
            .iter()
            .map(|(id, state)| ContainerReport {
                id: id.chars().take(12).collect(),
                name: state.facts.name.clone(),
                image: state.facts.image.clone(),
                services: book.services_of(id),
                health: state.facts.health.map(|h| format!("{h:?}").to_lowercase()),
                draining: book.draining.contains_key(id),
                refused: state.planned.refusals.clone(),
            })
            .collect();
        containers.sort_by(|a, b| a.name.cmp(&b.name));
        let since = stats.stream_since_ms.load(Ordering::Relaxed);
        RegisterReport {
            started,
            docker: self.config.docker.clone(),
            address_mode: self.config.address.name(),
            engine: book.engine.clone(),
            api_version: book.api_version.clone(),
            event_stream: stats.stream_up.load(Ordering::Relaxed),
            event_stream_since_ms: (since > 0).then_some(since),
            services: book.owned(),
            registered: stats.registered.load(Ordering::Relaxed),
            deregistered: stats.deregistered.load(Ordering::Relaxed),
            resyncs: stats.resyncs.load(Ordering::Relaxed),
            resync_writes: stats.resync_writes.load(Ordering::Relaxed),
            last_error: stats.last_error.lock().clone(),
            containers,
        }
    }
}

/// The register component's part of `/api/status`.
#[derive(Debug, serde::Serialize)]
struct RegisterReport {
    started: bool,
    docker: String,
    address_mode: &'static str,
    engine: Option<String>,
    api_version: Option<String>,
    event_stream: bool,
    event_stream_since_ms: Option<u64>,
    services: usize,
    registered: u64,
    deregistered: u64,
    resyncs: u64,
    resync_writes: u64,
    last_error: Option<String>,
    containers: Vec<ContainerReport>,
}

/// One container in the report.
#[derive(Debug, serde::Serialize)]
struct ContainerReport {
    id: String,
    name: String,
    image: String,
    services: Vec<String>,
    health: Option<String>,
    draining: bool,
    refused: Vec<String>,
}

struct BoundRegister {
    config: RegisterConfig,
    appliance: Arc<Appliance>,
    stats: Arc<Stats>,
}

impl Bound for BoundRegister {
    fn listening(&self) -> Listening {
        Listening::default()
    }

    fn run(self: Box<Self>, shutdown: CancellationToken) -> BoxFuture<'static, Result<(), ComponentError>> {
        Box::pin(async move {
            let host_name = crate::net::host::name().unwrap_or_else(|| "localhost".into());
            super::run(
                &self.config,
                self.appliance.consul.http().clone(),
                self.appliance.host_ip,
                host_name,
                self.stats.clone(),
                shutdown,
            )
            .await
            .map_err(ComponentError::from)
        })
    }
}

impl Component for Register {
    fn name(&self) -> &'static str {
        "register"
    }

    fn bind(&self) -> Result<Box<dyn Bound>, ComponentError> {
        Ok(Box::new(BoundRegister {
            config: self.config.clone(),
            appliance: self.appliance.clone(),
            stats: self.stats.clone(),
        }))
    }

    fn listening(&self) -> Listening {
        Listening::default()
    }

    fn metrics(&self, out: &mut Writer) {
        let s = &self.stats;
        out.family(
            "wayfinder_register_events_total",
            Kind::Counter,
            "Docker events read, by action.",
        );
        for (slot, action) in ACTIONS.iter().enumerate() {
            out.sample(
                "wayfinder_register_events_total",
                &[("action", action)],
                s.events[slot].load(Ordering::Relaxed),
            );
        }
        out.family(
            "wayfinder_register_writes_total",
            Kind::Counter,
            "Writes to the Consul agent, by operation.",
        );
        for (op, n) in [
            ("register", &s.registered),
            ("deregister", &s.deregistered),
            ("check_update", &s.check_updates),
        ] {
            out.sample(
                "wayfinder_register_writes_total",
                &[("op", op)],
                n.load(Ordering::Relaxed),
            );
        }
        out.single(
            "wayfinder_register_resyncs_total",
            Kind::Counter,
            "Full comparisons of Docker and Consul.",
            s.resyncs.load(Ordering::Relaxed),
        );
        out.single(
            "wayfinder_register_resync_writes_total",
            Kind::Counter,
            "Writes full comparisons had to make (0 while nothing changes behind Wayfinder's back).",
            s.resync_writes.load(Ordering::Relaxed),
        );
        out.family(
            "wayfinder_register_errors_total",
            Kind::Counter,
            "Failed Docker and Consul requests (retried).",
        );
        out.sample(
            "wayfinder_register_errors_total",
            &[("source", "docker")],
            s.docker_errors.load(Ordering::Relaxed),
        );
        out.sample(
            "wayfinder_register_errors_total",
            &[("source", "consul")],
            s.consul_errors.load(Ordering::Relaxed),
        );
        out.single(
            "wayfinder_register_event_stream_up",
            Kind::Gauge,
            "1 while the Docker event stream is connected.",
            u8::from(s.stream_up.load(Ordering::Relaxed)),
        );
        out.single(
            "wayfinder_register_event_stream_age_seconds",
            Kind::Gauge,
            "Time since the Docker event stream was last (re)connected.",
            s.stream_age().map_or(0.0, |age| age.as_secs_f64()),
        );
        out.single(
            "wayfinder_register_event_stream_reconnects_total",
            Kind::Counter,
            "Times the Docker event stream was lost and reconnected.",
            s.reconnects.load(Ordering::Relaxed),
        );
        let book = s.book.lock();
        out.single(
            "wayfinder_register_containers",
            Kind::Gauge,
            "Serving containers followed.",
            book.containers.len(),
        );
        out.single(
            "wayfinder_register_services",
            Kind::Gauge,
            "Services Wayfinder holds in the local Consul agent.",
            book.owned(),
        );
        out.single(
            "wayfinder_register_refused_containers",
            Kind::Gauge,
            "Containers with at least one refused service.",
            book.containers
                .values()
                .filter(|c| !c.planned.refusals.is_empty())
                .count(),
        );
    }

    fn sample(&self, tick: &mut Tick<'_>) {
        let s = &self.stats;
        for (slot, action) in ACTIONS.iter().enumerate() {
            tick.counter(&EVENTS, action, s.events[slot].load(Ordering::Relaxed));
        }
        for (op, n) in [
            ("register", &s.registered),
            ("deregister", &s.deregistered),
            ("check_update", &s.check_updates),
        ] {
            tick.counter(&WRITES, op, n.load(Ordering::Relaxed));
        }
    }

    fn status(&self, started: bool) -> serde_json::Value {
        serde_json::to_value(self.report(started)).unwrap_or_default()
    }

    fn ready(&self) -> Result<(), String> {
        if self.stats.stream_up.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(match self.stats.last_error.lock().as_deref() {
            Some(e) => format!("not following Docker's events: {e}"),
            None => "not following Docker's events yet".into(),
        })
    }

    fn page(&self, started: bool, _q: &str, parts: &mut PageParts) {
        if !started {
            return;
        }
        let r = self.report(started);
        let out = &mut parts.sections;
        let stream = if r.event_stream {
            badge("ok", "events")
        } else {
            badge("bad", "no events")
        };
        let _ = write!(
            out,
            "<h2>Containers</h2><p>{stream} Docker <code>{}</code> (API {}), {} address mode: {} services in Consul, {} registered and {} deregistered since start, {} resyncs ({} writes).</p>",
            escape(&r.docker),
            escape(r.api_version.as_deref().unwrap_or("?")),
            r.address_mode,
            r.services,
            r.registered,
            r.deregistered,
            r.resyncs,
            r.resync_writes
        );
        if let Some(e) = &r.last_error {
            let _ = write!(out, "<p>Last error: <code>{}</code></p>", escape(e));
        }
        if r.containers.is_empty() {
            out.push_str("<p>No serving container.</p>");
            return;
        }
        out.push_str("<table><tr><th>Container</th><th>Image</th><th>Services</th><th>State</th></tr>");
        for c in &r.containers {
            let mut state = String::new();
            if c.draining {
                state.push_str(&badge("warn", "draining"));
            }
            if let Some(h) = &c.health {
                state.push_str(&badge(if h == "healthy" { "ok" } else { "bad" }, h));
            }
            for why in &c.refused {
                let _ = write!(state, "{} {}<br>", badge("bad", "refused"), escape(why));
            }
            let _ = write!(
                out,
                "<tr><td><code>{}</code> {}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&c.id),
                escape(&c.name),
                escape(&c.image),
                c.services.iter().map(|s| escape(s)).collect::<Vec<_>>().join("<br>"),
                state
            );
        }
        out.push_str("</table>");
    }

    fn banner(&self, _appliance: &Appliance, _host: &Host, banner: &mut Banner) {
        banner.places.push(format!(
            "  register docker {} ({} addresses)",
            self.config.docker,
            self.config.address.name()
        ));
        // `wayfinder/demo`: scripts/demo-image.sh (the standalone script builds it).
        // `--pull never`: where it was not built (the appliance's container, a
        // host set up by hand) the command says "No such image" instead of
        // pulling whatever a public registry holds under that name.
        let docker = if self.config.docker == super::settings::DEFAULT_DOCKER {
            "docker".to_string()
        } else {
            format!("docker -H {}", self.config.docker)
        };
        banner.registers.push(format!(
            "  {docker} run -d -p 8080:8080 --pull never -e SERVICE_NAME=web -e SERVICE_TAGS=haproxy wayfinder/demo"
        ));
    }
}

/// Its section of `wayfinder status` (a terminal).
pub fn terminal(out: &mut String, report: &serde_json::Value) {
    if !report["started"].as_bool().unwrap_or(false) {
        return;
    }
    let containers = report["containers"].as_array().map_or(0, Vec::len);
    let _ = writeln!(
        out,
        "\nregister: docker {} ({}), events {}, {} containers, {} services in Consul",
        report["docker"].as_str().unwrap_or("?"),
        report["address_mode"].as_str().unwrap_or("?"),
        if report["event_stream"].as_bool().unwrap_or(false) {
            "connected"
        } else {
            "DISCONNECTED"
        },
        containers,
        report["services"].as_u64().unwrap_or(0)
    );
    for c in report["containers"].as_array().into_iter().flatten() {
        let services = c["services"]
            .as_array()
            .map(|s| s.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<12} {:<24} {}",
            c["id"].as_str().unwrap_or(""),
            c["name"].as_str().unwrap_or(""),
            if services.is_empty() { "-" } else { &services }
        );
        for why in c["refused"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "      refused: {}", why.as_str().unwrap_or(""));
        }
    }
}
