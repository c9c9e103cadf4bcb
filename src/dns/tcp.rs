//! DNS over TCP (RFC 7766): length-prefixed messages, several per connection,
//! answered in order.
//!
//! ```text
//!  accept ─▶ outside `allow`? ──▶ reset (no slot, no task)
//!         ─▶ source has tcp_connections_per_source? ──▶ reset
//!         ─▶ all MAX_CONNECTIONS taken? ──▶ reset
//!         ─▶ task: read (idle timeout) ─▶ answer ─▶ write (same timeout) ─▶ ...
//! ```
//!
//! Every connection holds a slot of the total and of its source until it ends,
//! so each limit is a bound on what one client can hold: a client that sends
//! nothing is closed after `tcp_idle_timeout`, and one that pipelines questions
//! without reading the answers is cut once an answer has waited that long to be
//! taken (RFC 7766 6.2.3 lets a server close connections to manage its
//! resources). A source is one IPv4 address or one IPv6 /64 (what one host
//! usually gets). Refused and cut connections are reset rather than closed,
//! so no unsent answers or TIME_WAIT state are left behind.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::engine::{Engine, Verdict};
use super::stats::TcpClose;
use super::wire::Transport;
use crate::net::listeners::refuse;
use crate::net::sources::Sources;

/// Most TCP clients served at once; more are reset at accept.
const MAX_CONNECTIONS: usize = 1024;

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    /// A connection that sends no question, or does not take an answer, for
    /// this long is closed (`dns.tcp_idle_timeout`).
    pub idle: Duration,
    /// Connections one source may hold at once (`dns.tcp_connections_per_source`).
    pub per_source: usize,
}

/// Accepts connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    limits: TcpLimits,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sources = Arc::new(Sources::default());
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "dns tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let stats = engine.stats();
        if !engine.allowed(peer.ip()) {
            stats.count_tcp_closed(TcpClose::NotAllowed);
            refuse(stream);
            continue;
        }
        let Some(source) = sources.take(peer.ip(), limits.per_source) else {
            stats.count_tcp_closed(TcpClose::PerSource);
            refuse(stream);
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.count_tcp_closed(TcpClose::Full);
            refuse(stream);
            continue;
        };
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _slots = (permit, source);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = connection(stream, peer, &engine, limits.idle) => {
                    if let Err(e) = r {
                        tracing::trace!(%peer, error = %e, "dns tcp connection ended");
                    }
                }
            }
        });
    }
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, engine: &Engine, idle: Duration) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut message = Vec::with_capacity(512);
    let mut out = Vec::with_capacity(4096);
    let mut framed = Vec::with_capacity(4096);
    loop {
        let len = match tokio::time::timeout(idle, stream.read_u16()).await {
            Ok(Ok(len)) => len as usize,
            Ok(Err(_)) | Err(_) => return Ok(()), // closed or idle
        };
        message.resize(len, 0);
        match tokio::time::timeout(idle, stream.read_exact(&mut message)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        let resolved;
        let response = match engine.classify(&message, peer, Transport::Tcp, &mut out) {
            Verdict::Answered => out.as_slice(),
            Verdict::Drop => return Ok(()),
            Verdict::Resolve(query) => {
                resolved = engine.resolve_query(&query, peer, Transport::Tcp).await;
                resolved.as_slice()
            }
        };
        framed.clear();
        framed.extend_from_slice(&(response.len() as u16).to_be_bytes());
        framed.extend_from_slice(response);
        if tokio::time::timeout(idle, stream.write_all(&framed)).await.is_err() {
            // The client does not read what it asked for (the socket buffers
            // are full): it loses the connection, and with it the slots.
            engine.stats().count_tcp_closed(TcpClose::SlowReader);
            refuse(stream);
            return Ok(());
        }
    }
}
