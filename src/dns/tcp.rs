//! DNS over TCP (RFC 7766): length-prefixed messages, several per connection,
//! answered in order. Idle connections are closed; the number of connections is
//! bounded so a flood of idle clients cannot exhaust file descriptors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::engine::{Engine, Verdict};
use super::wire::Transport;

/// Most TCP clients served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 1024;

/// Accepts connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    idle: Duration,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "dns tcp connection limit reached; closing");
            continue;
        };
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = connection(stream, peer, &engine, idle) => {
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
        let response = match engine.classify(&message, peer, Transport::Tcp, &mut out) {
            Verdict::Answered => Some(out.as_slice()),
            Verdict::Drop => return Ok(()),
            Verdict::Resolve => None,
        };
        let resolved;
        let response = match response {
            Some(r) => r,
            None => {
                resolved = engine.resolve(&message, peer, Transport::Tcp).await;
                match &resolved {
                    Some(r) => r.as_slice(),
                    None => return Ok(()),
                }
            }
        };
        let mut framed = Vec::with_capacity(response.len() + 2);
        framed.extend_from_slice(&(response.len() as u16).to_be_bytes());
        framed.extend_from_slice(response);
        stream.write_all(&framed).await?;
    }
}
