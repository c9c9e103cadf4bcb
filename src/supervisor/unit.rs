//! What every supervised unit (a program or a component) shares: its visible
//! state ([`UnitInfo`], read by the admin API), the admin's restart trigger, and
//! the restart arithmetic ([`Backoff`]: 100 ms doubling to a cap, reset after a
//! long enough run, `failed` after too many failures in a window).
//!
//! ```text
//!  supervising task ──set_state──▶ UnitHandle (Mutex<UnitInfo>) ◀──snapshot── admin
//!        ▲                                  │
//!        └──────── restart (Notify) ◀───────┘ POST /api/units/<name>/restart
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Notify;

use super::settings::RestartSettings;

/// Where a unit is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitState {
    /// Not started on this host (role, override or `autostart = false`).
    Off,
    /// Waiting for the built-in Consul agent before starting.
    Waiting,
    /// Being started.
    Starting,
    /// Up.
    Running,
    /// Ended unexpectedly; starts again after the backoff.
    Backoff,
    /// Failed too often in the window; left stopped until restarted by hand.
    Failed,
    /// Ended and its restart policy says not to start it again.
    Exited,
    /// Being stopped.
    Stopping,
    /// Stopped by the supervisor's shutdown.
    Stopped,
}

impl UnitState {
    /// Every state, in life order (the metric's state set).
    pub const ALL: [UnitState; 9] = [
        UnitState::Off,
        UnitState::Waiting,
        UnitState::Starting,
        UnitState::Running,
        UnitState::Backoff,
        UnitState::Failed,
        UnitState::Exited,
        UnitState::Stopping,
        UnitState::Stopped,
    ];

    /// Lower-case name (as in the JSON).
    pub fn name(self) -> &'static str {
        match self {
            UnitState::Off => "off",
            UnitState::Waiting => "waiting",
            UnitState::Starting => "starting",
            UnitState::Running => "running",
            UnitState::Backoff => "backoff",
            UnitState::Failed => "failed",
            UnitState::Exited => "exited",
            UnitState::Stopping => "stopping",
            UnitState::Stopped => "stopped",
        }
    }

    /// True while start-up has not settled (for the "ready" moment).
    pub fn is_pending(self) -> bool {
        matches!(self, UnitState::Waiting | UnitState::Starting)
    }
}

/// A program or an in-process component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitClass {
    /// A child process.
    Program,
    /// A task in this process.
    Component,
}

/// A unit as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct UnitInfo {
    /// Unit name.
    pub name: String,
    /// Program or component.
    pub class: UnitClass,
    /// Current state.
    pub state: UnitState,
    /// Process id while a program runs.
    pub pid: Option<u32>,
    /// Seconds since it last (re)started, while running.
    pub uptime_secs: Option<f64>,
    /// Times it was started again after the first start.
    pub restarts: u64,
    /// How it last ended (`exit status 1`, `signal 9`, an error message).
    pub last_exit: Option<String>,
    /// Why it runs (or not) on this host.
    pub why: String,
    /// Start order.
    pub priority: u32,
}

/// The shared handle of one unit.
#[derive(Debug)]
pub struct UnitHandle {
    info: Mutex<(UnitInfo, Option<Instant>)>,
    /// Notified by the admin API: stop the unit if it runs and start it again now
    /// (no backoff, not counted as a failure); starts a failed, exited or off one.
    pub restart: Notify,
}

impl UnitHandle {
    /// A unit in its first state.
    pub fn new(name: &str, class: UnitClass, state: UnitState, why: &str, priority: u32) -> Self {
        Self {
            info: Mutex::new((
                UnitInfo {
                    name: name.into(),
                    class,
                    state,
                    pid: None,
                    uptime_secs: None,
                    restarts: 0,
                    last_exit: None,
                    why: why.into(),
                    priority,
                },
                None,
            )),
            restart: Notify::new(),
        }
    }

    /// Sits out a restart backoff of `delay` in state `backoff`: an admin
    /// restart ends it early (and starts the backoff over). False when
    /// `shutdown` came first (the unit is then `stopped`).
    pub async fn wait_out_backoff(
        &self,
        delay: Duration,
        backoff: &mut Backoff,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> bool {
        self.set_state(UnitState::Backoff);
        tokio::select! {
            _ = shutdown.cancelled() => {
                self.set_state(UnitState::Stopped);
                false
            }
            _ = tokio::time::sleep(delay) => true,
            _ = self.restart.notified() => {
                backoff.reset();
                true
            }
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut (UnitInfo, Option<Instant>)) -> R) -> R {
        f(&mut self.info.lock())
    }

    /// Its name.
    pub fn name(&self) -> String {
        self.with(|(i, _)| i.name.clone())
    }

    /// Its current state.
    pub fn state(&self) -> UnitState {
        self.with(|(i, _)| i.state)
    }

    /// Sets the state (logged when it changes).
    pub fn set_state(&self, state: UnitState) {
        let (name, old) = self.with(|(i, since)| {
            let old = i.state;
            i.state = state;
            if state != UnitState::Running {
                i.pid = None;
                *since = None;
            }
            (i.name.clone(), old)
        });
        if old != state {
            tracing::info!(unit = %name, from = old.name(), to = state.name(), "unit state");
        }
    }

    /// Marks it running (with the program's pid); counts a restart unless first.
    pub fn running(&self, pid: Option<u32>, first: bool) {
        self.with(|(i, since)| {
            i.pid = pid;
            *since = Some(Instant::now());
            if !first {
                i.restarts += 1;
            }
        });
        self.set_state(UnitState::Running);
    }

    /// Records how it ended.
    pub fn ended(&self, how: String) {
        self.with(|(i, _)| i.last_exit = Some(how));
    }

    /// A copy for the admin API.
    pub fn snapshot(&self) -> UnitInfo {
        self.with(|(i, since)| {
            let mut info = i.clone();
            info.uptime_secs = since.map(|s| s.elapsed().as_secs_f64());
            info
        })
    }
}

/// The next step after a unit ended unexpectedly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start again after this long.
    Retry(Duration),
    /// Too many failures: mark it failed.
    GiveUp,
}

/// Restart arithmetic of one unit.
#[derive(Debug)]
pub struct Backoff {
    settings: RestartSettings,
    next: Duration,
    failures: VecDeque<Instant>,
}

impl Backoff {
    /// A fresh backoff.
    pub fn new(settings: RestartSettings) -> Self {
        Self {
            settings,
            next: settings.backoff_initial,
            failures: VecDeque::new(),
        }
    }

    /// Forgets past failures (an admin restart is a fresh start).
    pub fn reset(&mut self) {
        self.next = self.settings.backoff_initial;
        self.failures.clear();
    }

    /// The unit ended at `now` after running `uptime`: wait how long, or give up?
    pub fn failed(&mut self, now: Instant, uptime: Duration) -> Verdict {
        if uptime >= self.settings.reset_after {
            // It ran long enough to call the last start a success.
            self.reset();
        }
        self.failures.push_back(now);
        while let Some(&first) = self.failures.front() {
            if now.duration_since(first) > self.settings.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        if self.failures.len() >= self.settings.max_failures as usize {
            return Verdict::GiveUp;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.settings.backoff_max);
        Verdict::Retry(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RestartSettings {
        RestartSettings {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            reset_after: Duration::from_secs(10),
            max_failures: 6,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn doubles_to_the_cap_then_gives_up() {
        let mut b = Backoff::new(settings());
        let t = Instant::now();
        let quick = Duration::from_millis(10);
        let delays: Vec<Verdict> = (0..6).map(|i| b.failed(t + Duration::from_millis(i), quick)).collect();
        let ms = |n| Verdict::Retry(Duration::from_millis(n));
        assert_eq!(delays, [ms(100), ms(200), ms(400), ms(800), ms(1000), Verdict::GiveUp]);
    }

    #[test]
    fn a_long_run_resets_and_old_failures_age_out() {
        let mut b = Backoff::new(settings());
        let t = Instant::now();
        for i in 0..4 {
            b.failed(t + Duration::from_millis(i), Duration::ZERO);
        }
        // Up for longer than reset_after: back to the first step.
        assert_eq!(
            b.failed(t + Duration::from_secs(11), Duration::from_secs(11)),
            Verdict::Retry(Duration::from_millis(100))
        );
        // Failures spread wider than the window never add up to GiveUp.
        let mut b = Backoff::new(settings());
        for i in 0..20u64 {
            let v = b.failed(t + Duration::from_secs(i * 15), Duration::ZERO);
            assert_ne!(v, Verdict::GiveUp, "failure {i}");
        }
    }

    #[test]
    fn handle_counts_restarts_and_uptime() {
        let h = UnitHandle::new("x", UnitClass::Program, UnitState::Starting, "test", 1);
        h.running(Some(42), true);
        h.set_state(UnitState::Backoff);
        h.running(Some(43), false);
        let s = h.snapshot();
        assert_eq!((s.state, s.pid, s.restarts), (UnitState::Running, Some(43), 1));
        assert!(s.uptime_secs.is_some());
        h.set_state(UnitState::Failed);
        assert_eq!(h.snapshot().pid, None);
    }
}
