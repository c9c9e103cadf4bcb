//! The sampler: one of `up`'s own tasks, it writes a point of every chart
//! into the process's [`Timeline`] once per [`STEP`].
//!
//! ```text
//!  every STEP: Timeline::tick(now)
//!    up's own series: restarts per unit, Consul watch ages (ConsulHub::watches)
//!    each started component ──Component::sample(&mut Tick)──▶ its counters and gauges
//!  the status page (status_page.rs, charts.rs) reads copies of the points
//! ```
//!
//! It only reads what already exists: the components' atomics, the units'
//! snapshots, the watches' timestamps. A page view reads the timeline, never
//! the components nor Consul, so the charts cost Consul nothing per view.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::SupervisorState;
use crate::report::timeline::{Chart, STEP};

/// Chart: restarts of each unit since `up` started.
static RESTARTS: Chart = Chart {
    order: 90,
    id: "restarts",
    title: "restarts since start, per unit",
    unit: "",
};
/// Chart: seconds since Consul last answered each watch.
static WATCH_AGE: Chart = Chart {
    order: 40,
    id: "consul-watch-age",
    title: "Consul watch age (since its last answer)",
    unit: "s",
};

/// Writes one point of every chart now.
pub fn sample(state: &SupervisorState) {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut timeline = state.timeline.lock();
    let mut tick = timeline.tick(now_ms);
    for unit in &state.units {
        let u = unit.snapshot();
        if state.plan.starts(&u.name) || u.restarts > 0 {
            tick.gauge(&RESTARTS, &u.name, u.restarts as f64);
        }
    }
    for w in state.appliance.consul.watches() {
        if let Some(age) = w.age() {
            tick.gauge(&WATCH_AGE, &w.name, age.as_secs_f64());
        }
    }
    for component in state.components.iter().filter(|c| state.plan.starts(c.name())) {
        component.sample(&mut tick);
    }
}

/// Samples every [`STEP`] until `shutdown`.
pub async fn run(state: Arc<SupervisorState>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(STEP);
    // A late tick (a loaded host) is not made up for with a burst.
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => sample(&state),
        }
    }
}
