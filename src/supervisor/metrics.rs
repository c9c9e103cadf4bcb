//! Prometheus `/metrics` (text exposition format 0.0.4) of a running `up`:
//! its own series (units, Consul), then each component's, which the
//! component writes itself ([`crate::component::Component::metrics`]).
//!
//! ```text
//!  UnitHandle (restarts, state), Consul probe, ConsulHub ──┐
//!  every started component ──Component::metrics──────────┼─▶ report::prometheus::Writer
//! ```
//!
//! Rendered per scrape, never on a request path of dns or lb.

use std::sync::atomic::Ordering;

use super::SupervisorState;
use super::unit::{UnitClass, UnitState};
use crate::report::prometheus::{Kind, Writer};

fn consul_hub(out: &mut Writer, hub: &crate::consul::ConsulHub) {
    use crate::consul::http::Endpoint;
    let http = hub.http().stats();
    out.family(
        "wayfinder_consul_connections",
        Kind::Gauge,
        "HTTP connections open to the Consul agent (bounded by design).",
    );
    out.sample("wayfinder_consul_connections", &[], http.connections());
    out.family(
        "wayfinder_consul_requests_total",
        Kind::Counter,
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
        Kind::Counter,
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
        Kind::Gauge,
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
        Kind::Counter,
        "Failed requests of each watch.",
    );
    for w in &watches {
        out.sample(
            "wayfinder_consul_watch_failures_total",
            &[("watch", &w.name)],
            w.snapshot().failures,
        );
    }
    consul_view(out, hub);
}

/// The catalog view's series, once a component has started it.
fn consul_view(out: &mut Writer, hub: &crate::consul::ConsulHub) {
    let Some(view) = hub.catalog_if_started() else {
        return;
    };
    let v = view.status().snapshot();
    let services = view.current().services.len();
    out.family(
        "wayfinder_consul_view_up",
        Kind::Gauge,
        "1 while the catalog view is kept current.",
    );
    out.sample("wayfinder_consul_view_up", &[], u8::from(v.ok));
    out.family(
        "wayfinder_consul_view_services",
        Kind::Gauge,
        "Services in the catalog view.",
    );
    out.sample("wayfinder_consul_view_services", &[], services);
    out.family(
        "wayfinder_consul_full_syncs_total",
        Kind::Counter,
        "Full reads of the catalog (start, resets, unexplained changes, periodic).",
    );
    out.sample("wayfinder_consul_full_syncs_total", &[], v.full_syncs);
    out.family(
        "wayfinder_consul_service_fetches_total",
        Kind::Counter,
        "Services read one by one after a change.",
    );
    out.sample("wayfinder_consul_service_fetches_total", &[], v.fetches);
    out.family(
        "wayfinder_consul_sync_corrections_total",
        Kind::Counter,
        "Services the periodic full sync found different from what the watches said.",
    );
    out.sample("wayfinder_consul_sync_corrections_total", &[], v.corrections);
    out.family(
        "wayfinder_consul_full_sync_seconds",
        Kind::Gauge,
        "How long the last full read of the catalog took.",
    );
    out.sample(
        "wayfinder_consul_full_sync_seconds",
        &[],
        format!("{:.6}", v.last_full_sync_ms / 1000.0),
    );
}

/// The metrics text.
pub fn render(state: &SupervisorState) -> String {
    let mut out = Writer::with_capacity(16 * 1024);
    out.single(
        "wayfinder_up_ready",
        Kind::Gauge,
        "1 once every unit has started (or failed): start-up is over (see wayfinder_ready for readiness).",
        u8::from(state.ready.load(Ordering::Relaxed)),
    );
    out.single(
        "wayfinder_ready",
        Kind::Gauge,
        "1 while every unit this host's role needs is running and ready (GET /api/ready answers 200).",
        u8::from(super::readiness::check(state).ready),
    );
    out.single(
        "wayfinder_uptime_seconds",
        Kind::Gauge,
        "Seconds since `wayfinder up` started.",
        format!("{:.3}", state.started.elapsed().as_secs_f64()),
    );
    let units: Vec<_> = state.units.iter().map(|u| u.snapshot()).collect();
    out.family(
        "wayfinder_supervisor_restarts_total",
        Kind::Counter,
        "Times a program or component was started again.",
    );
    for u in &units {
        let class = if u.class == UnitClass::Program {
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
        Kind::Gauge,
        "1 for the state each unit is in, 0 for every other (off, running, backoff, failed ...).",
    );
    // Every state of every unit (a state set, as node_exporter's systemd
    // units): `{state="failed"} == 1` can be alerted on, and a unit leaving a
    // state shows as 0 rather than as a series that vanished.
    for u in &units {
        for state in UnitState::ALL {
            out.sample(
                "wayfinder_supervisor_unit_state",
                &[("unit", &u.name), ("state", state.name())],
                u8::from(u.state == state),
            );
        }
    }
    out.family(
        "wayfinder_supervisor_unit_up",
        Kind::Gauge,
        "1 while a unit is running.",
    );
    for u in &units {
        out.sample(
            "wayfinder_supervisor_unit_up",
            &[("unit", &u.name)],
            u8::from(u.state == UnitState::Running),
        );
    }
    let consul = state.consul_health();
    out.single(
        "wayfinder_consul_up",
        Kind::Gauge,
        "1 while the Consul agent answers and has a leader.",
        u8::from(consul.reachable && consul.leader.as_deref().is_some_and(|l| !l.is_empty())),
    );
    consul_hub(&mut out, &state.appliance.consul);
    for component in state.components.iter().filter(|c| state.plan.starts(c.name())) {
        component.metrics(&mut out);
    }
    out.finish()
}
