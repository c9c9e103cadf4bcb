//! UDP receive loops: one OS thread per SO_REUSEPORT socket.
//!
//! Each worker blocks in `recv_from`, answers cached and local questions inline
//! (no task, no allocation: the receive and send buffers live as long as the
//! thread), and hands the rest to the tokio runtime, which replies on the same
//! socket when the answer is in. The kernel spreads clients over the sockets.
//! A short read timeout lets the loop notice shutdown.

use std::net::UdpSocket;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::engine::{Engine, Verdict};
use super::wire::Transport;

/// How often an idle worker checks for shutdown.
const SHUTDOWN_POLL: Duration = Duration::from_millis(200);
/// Receive buffer: the largest UDP datagram.
const RECV_BUFFER: usize = 65536;

/// Starts one worker thread per socket.
pub fn spawn_workers(
    sockets: Vec<UdpSocket>,
    engine: &Arc<Engine>,
    runtime: &tokio::runtime::Handle,
    shutdown: &CancellationToken,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(sockets.len());
    for (index, socket) in sockets.into_iter().enumerate() {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(SHUTDOWN_POLL))?;
        let socket = Arc::new(socket);
        let engine = engine.clone();
        let runtime = runtime.clone();
        let shutdown = shutdown.clone();
        let handle = std::thread::Builder::new()
            .name(format!("dns-udp-{index}"))
            .spawn(move || worker(&socket, &engine, &runtime, &shutdown))?;
        threads.push(handle);
    }
    Ok(threads)
}

fn worker(
    socket: &Arc<UdpSocket>,
    engine: &Arc<Engine>,
    runtime: &tokio::runtime::Handle,
    shutdown: &CancellationToken,
) {
    let mut buf = vec![0u8; RECV_BUFFER];
    let mut out = Vec::with_capacity(4096);
    while !shutdown.is_cancelled() {
        let (len, src) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => {
                // ICMP errors from earlier sends surface here; they concern one
                // client and must not stop the loop.
                tracing::trace!(error = %e, "udp receive error");
                continue;
            }
        };
        let packet = &buf[..len];
        match engine.classify(packet, src, Transport::Udp, &mut out) {
            Verdict::Answered => {
                let _ = socket.send_to(&out, src);
            }
            Verdict::Drop => {}
            Verdict::Resolve => {
                let Some(slot) = engine.admit() else { continue };
                let packet = packet.to_vec();
                let engine = engine.clone();
                let socket = socket.clone();
                runtime.spawn(async move {
                    let _slot = slot;
                    if let Some(response) = engine.resolve(&packet, src, Transport::Udp).await {
                        let _ = socket.send_to(&response, src);
                    }
                });
            }
        }
    }
}
