//! An in-process component (see [`crate::component`]) as a supervised task:
//! bound resources, its run on a child cancellation token, restarted with
//! the same backoff as a program when it returns an error, returns unasked,
//! or panics.
//!
//! ```text
//!  supervise ─(needs Consul: wait for its leader, bounded)─▶ Component::bind (first time: bound by `up`)
//!      └─▶ tokio::spawn(Bound::run(token)) ──Err / Ok unasked / panic──▶ Backoff ─▶ again
//!  shutdown / admin restart ──▶ token.cancel() ──▶ run drains (lb: in-flight requests) ──▶ joined
//! ```
//!
//! What the admin API reads of a component lives in the component value,
//! which outlives restarts (the dns counters, the lb state of its last start,
//! the vpn's keys and peer sessions).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::settings::RestartSettings;
use super::unit::{Backoff, UnitHandle, UnitState, Verdict};
use crate::component::{Appliance, Bound, Component};

/// How long a component gets to stop after its token is cancelled.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Everything a component supervisor needs.
pub struct ComponentContext {
    /// What the components share (where bound listeners are recorded).
    pub appliance: Arc<Appliance>,
    /// Restart arithmetic settings.
    pub restart: RestartSettings,
    /// Fires `true` once the built-in Consul has a leader, when `up` runs one
    /// and the component waits for it.
    pub consul_ready: Option<tokio::sync::watch::Receiver<bool>>,
    /// Upper bound of the wait for it.
    pub consul_wait: Duration,
}

/// Runs one component under supervision until `shutdown`.
///
/// Long on purpose: one loop is the component's life (wait for Consul, bind,
/// run, stop, back off), and each state's `select!` needs the same locals.
pub async fn supervise(
    component: Arc<dyn Component>,
    first_sockets: Option<Box<dyn Bound>>,
    ctx: ComponentContext,
    handle: Arc<UnitHandle>,
    shutdown: CancellationToken,
) {
    let name = component.name();
    if let Some(mut ready) = ctx.consul_ready.clone() {
        handle.set_state(UnitState::Waiting);
        let wait = tokio::time::timeout(ctx.consul_wait, ready.wait_for(|r| *r));
        tokio::select! {
            _ = shutdown.cancelled() => {
                handle.set_state(UnitState::Stopped);
                return;
            }
            waited = wait => if waited.is_err() {
                tracing::warn!(component = name, wait = ?ctx.consul_wait, "consul has no leader yet; starting anyway");
            },
        }
    }
    let mut sockets = first_sockets;
    let mut backoff = Backoff::new(ctx.restart);
    let mut first = true;
    loop {
        handle.set_state(UnitState::Starting);
        let started = Instant::now();
        let bound = match sockets.take() {
            Some(s) => Ok(s),
            None => component.bind().map_err(Ended::Failed),
        };
        let result: Result<Outcome, Ended> = match bound {
            Err(e) => Err(e),
            Ok(bound) => {
                let token = CancellationToken::new();
                // Cancelled also when this future is dropped (a runtime shutting
                // down without our shutdown): the lb's proxy threads wait on it,
                // and a runtime cannot finish while they run.
                let _stop_on_drop = token.clone().drop_guard();
                ctx.appliance.listened(&bound.listening());
                let mut task = tokio::spawn(bound.run(token.clone()));
                handle.running(None, first);
                first = false;
                let asked = tokio::select! {
                    joined = &mut task => {
                        match joined {
                            Ok(Ok(())) => Err(Ended::Returned),
                            Ok(Err(e)) => Err(Ended::Failed(e)),
                            Err(join) => Err(Ended::Died(crate::threads::join_error_message(join))),
                        }
                    }
                    _ = handle.restart.notified() => Ok(Outcome::Restart),
                    _ = shutdown.cancelled() => Ok(Outcome::Shutdown),
                };
                if asked.is_ok() {
                    handle.set_state(UnitState::Stopping);
                    token.cancel();
                    match tokio::time::timeout(STOP_GRACE, &mut task).await {
                        Ok(Ok(Err(e))) => {
                            tracing::warn!(component = name, error = %e, "ended with an error while stopping")
                        }
                        Ok(_) => {}
                        Err(_) => {
                            tracing::warn!(component = name, grace = ?STOP_GRACE, "did not stop in time; abandoned");
                            task.abort();
                        }
                    }
                }
                asked
            }
        };
        match result {
            Ok(Outcome::Shutdown) => {
                handle.ended("stopped".into());
                handle.set_state(UnitState::Stopped);
                tracing::info!(component = name, "component stopped");
                return;
            }
            Ok(Outcome::Restart) => {
                handle.ended("restarted by request".into());
                backoff.reset();
                continue;
            }
            Err(error) => {
                tracing::error!(component = name, %error, "component failed");
                handle.ended(error.to_string());
                match backoff.failed(Instant::now(), started.elapsed()) {
                    Verdict::GiveUp => {
                        tracing::error!(
                            component = name,
                            "failed too often; marked failed (restart it from the admin API)"
                        );
                        handle.set_state(UnitState::Failed);
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = handle.restart.notified() => backoff.reset(),
                        }
                    }
                    Verdict::Retry(delay) => {
                        if !handle.wait_out_backoff(delay, &mut backoff, &shutdown).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// How a run ended that nobody asked to stop.
#[derive(Debug, thiserror::Error)]
enum Ended {
    /// It could not bind, or its run failed.
    #[error("{0}")]
    Failed(crate::component::ComponentError),
    /// Its run returned `Ok` before shutdown.
    #[error("returned without being asked to stop")]
    Returned,
    /// Its task panicked (or was cancelled).
    #[error("{0}")]
    Died(String),
}

/// Why a run that was still going ended.
enum Outcome {
    /// The admin asked for a restart.
    Restart,
    /// `up` is shutting down.
    Shutdown,
}
