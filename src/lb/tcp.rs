//! `haproxy_tcp=<port>` listeners, reconciled with the routing table at runtime.
//!
//! ```text
//!  table change ─▶ reconcile: ports wanted now vs listeners open
//!     new port ─▶ bind + accept loop      gone port ─▶ listener closed
//!  accepted connection ─▶ current table's backend for that port ─▶ pick
//!     (smooth WRR) ─▶ connect (eject + next instance on failure) ─▶ splice
//! ```
//!
//! Connections already spliced are left alone when their port goes away, and
//! end at shutdown or after `tunnel_timeout` without a byte either way; a listener that cannot be bound is logged and tried again at
//! the next change. Which ports may be opened, and which instances may be
//! connected to, the table has already decided (see [`super::policy`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::LbState;
use super::splice::{SpliceEnd, splice};

/// Instances tried per connection at most.
const MAX_ATTEMPTS: usize = 3;

/// Keeps one listener per wanted port on each of `ips` (the lb's HTTP
/// addresses) until shutdown.
pub async fn run(
    state: Arc<LbState>,
    ips: Vec<std::net::IpAddr>,
    connect_timeout: Duration,
    eject_ms: u64,
    tunnel_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut changes = state.changes.subscribe();
    let mut open: HashMap<u16, CancellationToken> = HashMap::new();
    // Listeners and their spliced connections; waited for at shutdown.
    let tasks = TaskTracker::new();
    loop {
        let wanted: Vec<u16> = state.table.load().tcp_ports().map(|(p, _)| p).collect();
        open.retain(|port, token| {
            let keep = wanted.contains(port);
            if !keep {
                token.cancel();
                tracing::info!(port, "lb: tcp listener closed (no service claims it any more)");
            }
            keep
        });
        for port in wanted {
            if open.contains_key(&port) {
                continue;
            }
            let token = shutdown.child_token();
            let mut bound = false;
            for &ip in &ips {
                let addr = SocketAddr::new(ip, port);
                match TcpListener::bind(addr).await {
                    Ok(listener) => {
                        bound = true;
                        tracing::info!(%addr, "lb: tcp listener opened");
                        let splices = Splices {
                            tasks: tasks.clone(),
                            shutdown: shutdown.clone(),
                            idle: tunnel_timeout,
                        };
                        tasks.spawn(accept(
                            listener,
                            port,
                            state.clone(),
                            connect_timeout,
                            eject_ms,
                            token.clone(),
                            splices,
                        ));
                    }
                    Err(error) => {
                        tracing::warn!(%addr, %error, "lb: cannot open tcp listener; retrying at the next change")
                    }
                }
            }
            if bound {
                open.insert(port, token);
            }
        }
        let ended = tokio::select! {
            _ = shutdown.cancelled() => true,
            r = changes.changed() => r.is_err(),
        };
        if ended {
            break;
        }
    }
    for token in open.values() {
        token.cancel();
    }
    tasks.close();
    tasks.wait().await;
}

/// Where the connections of a listener run: tracked, and ended at shutdown
/// (not when their port goes away).
struct Splices {
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// `lb.tunnel_timeout`.
    idle: Duration,
}

async fn accept(
    listener: TcpListener,
    port: u16,
    state: Arc<LbState>,
    connect_timeout: Duration,
    eject_ms: u64,
    stop: CancellationToken,
    splices: Splices,
) {
    loop {
        let (client, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The same caps as the HTTP listeners; over them the client is reset at once.
        let Ok(slot) = state.conns.admit(peer.ip()) else {
            crate::net::listeners::refuse(client);
            continue;
        };
        let (state, shutdown, idle) = (state.clone(), splices.shutdown.clone(), splices.idle);
        splices.tasks.spawn(async move {
            let _slot = slot;
            let server = tokio::select! {
                _ = shutdown.cancelled() => return,
                server = connect_backend(&state, port, connect_timeout, eject_ms) => server,
            };
            let Some(server) = server else {
                tracing::debug!(port, %peer, "lb: no tcp instance reachable; closing");
                return;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            if splice(client, server, idle, &shutdown).await == SpliceEnd::Idle {
                tracing::debug!(port, %peer, "lb: tcp connection idle for tunnel_timeout; closed");
            }
        });
    }
}

async fn connect_backend(state: &LbState, port: u16, connect_timeout: Duration, eject_ms: u64) -> Option<TcpStream> {
    let table = state.table.load_full();
    let backend = table.tcp_ports().find(|(p, _)| *p == port)?.1.clone();
    drop(table);
    let mut tried = Vec::with_capacity(MAX_ATTEMPTS);
    for _ in 0..MAX_ATTEMPTS {
        let instance = backend.pick(state.health.now_ms(), &tried)?;
        tried.push(instance.addr);
        match tokio::time::timeout(connect_timeout, TcpStream::connect(instance.addr)).await {
            Ok(Ok(stream)) => return Some(stream),
            _ => {
                tracing::warn!(service = %backend.service, addr = %instance.addr, "lb: tcp connect failed; instance ejected");
                state.health.eject(&instance.health, eject_ms);
            }
        }
    }
    None
}
