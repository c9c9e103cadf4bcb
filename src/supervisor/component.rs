//! An in-process component (vpn, dns, lb) as a supervised task: bound
//! sockets, its `run` on a child cancellation token, restarted with the same
//! backoff as a program when it returns an error, returns unasked, or panics.
//!
//! ```text
//!  supervise ─(lb: wait for Consul, bounded)─▶ bind (first time: sockets bound by `up`)
//!      └─▶ tokio::spawn(vpn::run | dns::run | lb::run)(token) ──Err / Ok unasked / panic──▶ Backoff ─▶ again
//!  shutdown / admin restart ──▶ token.cancel() ──▶ run drains (lb: in-flight requests) ──▶ joined
//! ```
//!
//! The handles the admin API reads ([`ComponentShared`]) outlive restarts: the
//! dns counters are one `DnsControl` for the life of `up`; the lb state is
//! replaced at each start (a fresh routing table) and published in an `ArcSwap`.
//! The vpn's state (key, peers and their sessions) is loaded once and kept: a
//! restart makes a new socket and TUN interface, and laptops keep their
//! sessions (a fresh state would make them wait ~15 s to handshake again).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio_util::sync::CancellationToken;

use super::roles::ComponentKind;
use super::settings::RestartSettings;
use super::unit::{Backoff, UnitHandle, UnitState, Verdict};
use crate::config::Config;
use crate::consul::ConsulHub;
use crate::{dns, lb, vpn};

/// How long a component gets to stop after its token is cancelled.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Sockets bound for one start of a component.
#[derive(Debug)]
pub enum ComponentSockets {
    /// The dns listeners.
    Dns(dns::DnsSockets),
    /// The lb listeners.
    Lb(lb::LbSockets),
    /// The vpn's UDP socket and TUN interface, with the state (server key,
    /// peers) loaded from `vpn.dir` for this start.
    Vpn(vpn::VpnSockets, Arc<vpn::VpnState>),
}

/// Component handles shared with the admin API, kept across restarts.
#[derive(Default)]
pub struct ComponentShared {
    /// dns counters and the zone-reload trigger.
    pub dns: dns::DnsControl,
    /// The running lb's state (routing table, health, counters), once started.
    pub lb: ArcSwapOption<lb::LbState>,
    /// The vpn's state (keys, peers, live counters), once started.
    pub vpn: ArcSwapOption<vpn::VpnState>,
}

/// Binds the sockets of `kind`; the message says what could not be bound. The
/// vpn reuses `vpn_state` when it has run before, else loads it from `vpn.dir`.
pub fn bind(
    kind: ComponentKind,
    config: &Config,
    vpn_state: Option<Arc<vpn::VpnState>>,
) -> Result<ComponentSockets, String> {
    match kind {
        ComponentKind::Dns => dns::DnsSockets::bind(&config.dns.listen, config.dns.workers)
            .map(ComponentSockets::Dns)
            .map_err(|e| e.to_string()),
        ComponentKind::Lb => lb::LbSockets::bind(&config.lb)
            .map(ComponentSockets::Lb)
            .map_err(|e| e.to_string()),
        // The state first: an unusable key file is reported before a TUN exists.
        ComponentKind::Vpn => {
            let state = match vpn_state {
                Some(s) => s,
                None => vpn::VpnState::new(&config.vpn).map_err(|e| e.to_string())?,
            };
            let sockets = vpn::VpnSockets::bind(&config.vpn).map_err(|e| e.to_string())?;
            Ok(ComponentSockets::Vpn(sockets, state))
        }
    }
}

/// One run of a component on `sockets` until `token` is cancelled.
async fn run_once(
    config: Arc<Config>,
    sockets: ComponentSockets,
    shared: Arc<ComponentShared>,
    consul: Arc<ConsulHub>,
    token: CancellationToken,
) -> Result<(), String> {
    match sockets {
        ComponentSockets::Dns(sockets) => dns::run(&config, sockets, shared.dns.clone(), consul, token)
            .await
            .map_err(|e| e.to_string()),
        ComponentSockets::Lb(sockets) => {
            let state = lb::LbState::new(&lb::table_config(&config));
            shared.lb.store(Some(state.clone()));
            lb::run(&config, sockets, state, consul, token)
                .await
                .map_err(|e| e.to_string())
        }
        ComponentSockets::Vpn(sockets, state) => {
            shared.vpn.store(Some(state.clone()));
            vpn::run(&config, sockets, state, token)
                .await
                .map_err(|e| e.to_string())
        }
    }
}

/// Everything a component supervisor needs.
pub struct ComponentContext {
    /// The configuration.
    pub config: Arc<Config>,
    /// Handles shared with the admin API.
    pub shared: Arc<ComponentShared>,
    /// The process's access to Consul.
    pub consul: Arc<ConsulHub>,
    /// Restart arithmetic settings.
    pub restart: RestartSettings,
    /// Fires `true` once the built-in Consul has a leader, when `up` runs one.
    pub consul_ready: Option<tokio::sync::watch::Receiver<bool>>,
    /// Upper bound of the wait for it.
    pub consul_wait: Duration,
}

/// Runs one component under supervision until `shutdown`.
pub async fn supervise(
    kind: ComponentKind,
    first_sockets: Option<ComponentSockets>,
    ctx: ComponentContext,
    handle: Arc<UnitHandle>,
    shutdown: CancellationToken,
) {
    let name = kind.name();
    if let (true, Some(mut ready)) = (kind.needs_consul(), ctx.consul_ready.clone()) {
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
            None => bind(kind, &ctx.config, ctx.shared.vpn.load_full()),
        };
        let result: Result<Outcome, String> = match bound {
            Err(e) => Err(e),
            Ok(bound) => {
                let token = CancellationToken::new();
                // Cancelled also when this future is dropped (a runtime shutting
                // down without our shutdown): the lb's proxy threads wait on it,
                // and a runtime cannot finish while they run.
                let _stop_on_drop = token.clone().drop_guard();
                let mut task = tokio::spawn(run_once(
                    ctx.config.clone(),
                    bound,
                    ctx.shared.clone(),
                    ctx.consul.clone(),
                    token.clone(),
                ));
                handle.running(None, first);
                first = false;
                let asked = tokio::select! {
                    joined = &mut task => {
                        match joined {
                            Ok(Ok(())) => Err("returned without being asked to stop".to_string()),
                            Ok(Err(e)) => Err(e),
                            Err(join) => Err(crate::threads::join_error_message(join)),
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
                handle.ended(error);
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

/// Why a run that was still going ended.
enum Outcome {
    /// The admin asked for a restart.
    Restart,
    /// `up` is shutting down.
    Shutdown,
}
