//! Whether `up` does what this host's role needs right now: every unit the
//! plan starts is running and ready. `GET /api/ready`, `wayfinder status`'s
//! exit code and so the image's HEALTHCHECK all read [`check`].
//!
//! ```text
//!  for each unit the plan starts (Consul agent, dns, lb, register, vpn, autostart programs):
//!    not running (starting, waiting, backoff, failed ...) ─▶ not ready, saying which state and why
//!    running:
//!      built-in Consul agent ─▶ a probe since its last start saw it answer with a leader
//!      component             ─▶ Component::ready (lb: its first table; register: Docker's events)
//!      program               ─▶ running is ready
//! ```
//!
//! The supervisor asks; what "ready" means inside a component is the
//! component's own business ([`crate::component::Component::ready`]).

use std::time::Instant;

use serde::Serialize;

use super::roles::UnitKind;
use super::unit::{UnitInfo, UnitState};
use super::{ConsulHealth, SupervisorState};

/// One unit the role needs that is not ready, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotReady {
    /// The unit (`consul`, `lb` ...).
    pub unit: String,
    /// What it is doing or waiting for.
    pub why: String,
}

/// The answer of `GET /api/ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// Every unit the plan starts is running and ready.
    pub ready: bool,
    /// Those that are not, in start order (absent when ready).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<NotReady>,
}

/// Asks every unit the plan starts.
pub fn check(state: &SupervisorState) -> Readiness {
    let consul = state.consul_health();
    let now = Instant::now();
    let waiting_for: Vec<NotReady> = state
        .plan
        .units
        .iter()
        .zip(&state.units)
        .filter(|(planned, _)| planned.start)
        .filter_map(|(planned, handle)| {
            let info = handle.snapshot();
            let why = unit_why(&info, || match &planned.kind {
                UnitKind::Consul(_) => consul_ready(&consul, &info, now),
                UnitKind::Component(kind) => match state.component(kind.name()) {
                    Some(component) => component.ready(),
                    None => Ok(()),
                },
                UnitKind::Program(_) => Ok(()),
            })?;
            Some(NotReady { unit: info.name, why })
        })
        .collect();
    Readiness {
        ready: waiting_for.is_empty(),
        waiting_for,
    }
}

/// Why a unit is not ready (`None`: it is); `running` asks a running unit.
fn unit_why(info: &UnitInfo, running: impl FnOnce() -> Result<(), String>) -> Option<String> {
    let last = || info.last_exit.as_deref().unwrap_or("no exit recorded").to_string();
    match info.state {
        UnitState::Running => running().err(),
        UnitState::Waiting => Some("waiting for Consul's leader before starting".into()),
        UnitState::Starting => Some("starting".into()),
        UnitState::Backoff => Some(format!("restarting after a failure ({})", last())),
        UnitState::Failed => Some(format!(
            "failed too often ({}); restart it: POST /api/units/{}/restart",
            last(),
            info.name
        )),
        // A one-shot program that finished well did its job.
        UnitState::Exited if info.last_exit.as_deref() == Some("exit status 0") => None,
        UnitState::Exited => Some(format!("exited ({}) and its restart policy leaves it", last())),
        UnitState::Off => Some("off".into()),
        UnitState::Stopping => Some("stopping".into()),
        UnitState::Stopped => Some("stopped".into()),
    }
}

/// The built-in Consul agent, running: ready once a probe made since this run
/// started saw it answer with a leader (an older probe speaks of the last run).
fn consul_ready(health: &ConsulHealth, info: &UnitInfo, now: Instant) -> Result<(), String> {
    let run_age = info.uptime_secs.unwrap_or(0.0);
    let fresh = health
        .probed
        .is_some_and(|p| now.saturating_duration_since(p).as_secs_f64() < run_age);
    if !fresh {
        return Err("started; not asked for its leader yet".into());
    }
    if !health.reachable {
        let error = health.error.as_deref().unwrap_or("no answer");
        return Err(format!("not answering its HTTP API: {error}"));
    }
    match health.leader.as_deref() {
        Some(l) if !l.is_empty() => Ok(()),
        _ => Err("no leader yet".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::supervisor::unit::UnitClass;

    fn info(state: UnitState, last_exit: Option<&str>, uptime: Option<f64>) -> UnitInfo {
        UnitInfo {
            name: "x".into(),
            class: UnitClass::Program,
            state,
            pid: None,
            uptime_secs: uptime,
            restarts: 0,
            last_exit: last_exit.map(Into::into),
            why: "test".into(),
            priority: 1,
        }
    }

    #[test]
    fn only_a_running_unit_is_asked_and_every_other_state_says_why() {
        let ok = || Ok(());
        assert_eq!(unit_why(&info(UnitState::Running, None, Some(1.0)), ok), None);
        assert_eq!(
            unit_why(&info(UnitState::Running, None, Some(1.0)), || Err("no table".into())),
            Some("no table".into())
        );
        let failed = unit_why(&info(UnitState::Failed, Some("exit status 3"), None), || {
            panic!("a failed unit is not asked")
        });
        assert!(
            failed
                .as_deref()
                .is_some_and(|w| w.contains("exit status 3") && w.contains("/api/units/x/restart")),
            "{failed:?}"
        );
        for state in [
            UnitState::Waiting,
            UnitState::Starting,
            UnitState::Backoff,
            UnitState::Stopping,
            UnitState::Stopped,
            UnitState::Off,
        ] {
            assert!(unit_why(&info(state, None, None), ok).is_some(), "{state:?}");
        }
        // A one-shot that ended well is done; one that ended badly is not.
        assert_eq!(
            unit_why(&info(UnitState::Exited, Some("exit status 0"), None), ok),
            None
        );
        assert!(unit_why(&info(UnitState::Exited, Some("exit status 2"), None), ok).is_some());
    }

    #[test]
    fn consul_is_ready_only_on_a_probe_of_this_run_that_saw_a_leader() {
        let now = Instant::now();
        let probed = |ago: u64| Some(now - Duration::from_secs(ago));
        let running = |uptime: f64| info(UnitState::Running, None, Some(uptime));
        let healthy = ConsulHealth {
            addr: None,
            reachable: true,
            leader: Some("127.0.0.1:8300".into()),
            error: None,
            probed: probed(1),
        };
        assert_eq!(consul_ready(&healthy, &running(5.0), now), Ok(()));
        // Restarted half a second ago: the leader seen a second ago was the last run's.
        let stale = consul_ready(&healthy, &running(0.5), now).unwrap_err();
        assert!(stale.contains("not asked"), "{stale}");
        let never = ConsulHealth {
            probed: None,
            ..healthy.clone()
        };
        assert!(consul_ready(&never, &running(5.0), now).is_err());
        // Unreachable (a stopped or hung agent): the old leader does not count.
        let down = ConsulHealth {
            reachable: false,
            error: Some("no answer within 1s".into()),
            ..healthy.clone()
        };
        let why = consul_ready(&down, &running(5.0), now).unwrap_err();
        assert!(why.contains("no answer within 1s"), "{why}");
        let leaderless = ConsulHealth {
            leader: Some(String::new()),
            ..healthy
        };
        assert_eq!(
            consul_ready(&leaderless, &running(5.0), now),
            Err("no leader yet".into())
        );
    }

    #[test]
    fn the_answer_lists_what_it_waits_for_only_when_not_ready() {
        let ready = Readiness {
            ready: true,
            waiting_for: Vec::new(),
        };
        assert_eq!(
            serde_json::to_value(&ready).unwrap(),
            serde_json::json!({"ready": true})
        );
        let not = Readiness {
            ready: false,
            waiting_for: vec![NotReady {
                unit: "lb".into(),
                why: "waiting for Consul's leader before starting".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&not).unwrap(),
            serde_json::json!({"ready": false, "waiting_for": [{"unit": "lb", "why": "waiting for Consul's leader before starting"}]})
        );
    }
}
