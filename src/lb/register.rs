//! The load balancer registers itself in Consul (service `wayfinder-lb` by
//! default, with a TCP check on its HTTP port), so the DNS wildcard target
//! `consul:wayfinder-lb` follows the live LB hosts; it deregisters on a clean
//! shutdown. While Consul is unreachable the registration is retried, and every
//! [`CHECK_EVERY`] the agent is asked whether it still has it: an agent that
//! restarted without its state (or an operator's deregistration) would otherwise
//! drop this host from the wildcard answers for good.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::consul::ConsulHttp;

/// How often a failed registration is retried.
const RETRY: Duration = Duration::from_secs(5);
/// How often the agent is asked whether it still holds the registration.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);
/// How long the deregistration at shutdown may take: the agent answers only
/// once the servers committed it, which on a busy host takes seconds (2 s was
/// seen to run out); well inside the supervisor's stop grace.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(6);

/// Registers `name` at `addr` until it succeeds, then waits for shutdown and
/// deregisters.
pub async fn run(consul: ConsulHttp, name: String, addr: SocketAddr, shutdown: CancellationToken) {
    let id = format!("{name}-{}-{}", addr.ip(), addr.port());
    let body = serde_json::json!({
        "ID": id,
        "Name": name,
        "Address": addr.ip().to_string(),
        "Port": addr.port(),
        "Tags": ["wayfinder"],
        "Check": {
            "Name": "lb http port",
            "TCP": addr.to_string(),
            "Interval": "2s",
            "Timeout": "1s",
            "DeregisterCriticalServiceAfter": "1m",
        },
    });
    let mut registered = false;
    loop {
        let pause = if registered {
            match consul.has_agent_service(&id).await {
                Ok(true) | Err(_) => CHECK_EVERY,
                Ok(false) => {
                    tracing::warn!(
                        id,
                        "lb: the consul agent no longer has this lb's registration; registering again"
                    );
                    registered = false;
                    Duration::ZERO
                }
            }
        } else {
            match consul.register(&body).await {
                Ok(()) => {
                    tracing::info!(service = name, id, %addr, "lb registered in consul");
                    registered = true;
                    CHECK_EVERY
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?RETRY, "lb: cannot register in consul");
                    RETRY
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    if !registered {
        return;
    }
    match tokio::time::timeout(DEREGISTER_TIMEOUT, consul.deregister(&id)).await {
        Ok(Ok(())) => tracing::info!(id, "lb deregistered from consul"),
        Ok(Err(error)) => tracing::warn!(%error, "lb: could not deregister from consul"),
        Err(_) => tracing::warn!("lb: consul did not answer the deregistration in time"),
    }
}
