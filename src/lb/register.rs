//! The load balancer registers itself in Consul (service `wayfinder-lb` by
//! default, with a TCP check on its HTTP port), so the DNS wildcard target
//! `consul:wayfinder-lb` follows the live LB hosts; it deregisters on a clean
//! shutdown. While Consul is unreachable the registration is retried.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::consul::ConsulHttp;

/// How often a failed registration is retried.
const RETRY: Duration = Duration::from_secs(5);

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
    loop {
        match consul.register(&body).await {
            Ok(()) => {
                tracing::info!(service = name, id, %addr, "lb registered in consul");
                break;
            }
            Err(error) => tracing::warn!(%error, retry_in = ?RETRY, "lb: cannot register in consul"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
    shutdown.cancelled().await;
    match tokio::time::timeout(Duration::from_secs(2), consul.deregister(&id)).await {
        Ok(Ok(())) => tracing::info!(id, "lb deregistered from consul"),
        Ok(Err(error)) => tracing::warn!(%error, "lb: could not deregister from consul"),
        Err(_) => tracing::warn!("lb: consul did not answer the deregistration in time"),
    }
}
