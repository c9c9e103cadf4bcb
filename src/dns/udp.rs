//! UDP receive loops: one OS thread per SO_REUSEPORT socket, batched syscalls.
//!
//! Each worker takes up to [`BATCH`] datagrams per `recvmmsg`, answers cached
//! and local questions inline (no task, no allocation: every buffer lives as
//! long as the thread), asks Consul itself for `*.consul` questions when Consul
//! is on loopback ([`super::inline`]: its own connected socket, answers back in
//! the same loop), sends all those answers with one `sendmmsg`, and hands the
//! rest to the tokio runtime, which replies on the same socket when the answer
//! is in. The kernel spreads clients over the sockets. A short receive timeout
//! (or poll timeout) lets the loop notice shutdown. A worker only returns on
//! shutdown; `dns::run` watches the threads and fails when one ends (or
//! panics) before.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::engine::{Engine, Verdict};
use super::inline::InlineConsul;
use super::outbox::Outbox;
// Re-exported for `dns::run`, which names it through this module.
pub use super::slow_path::SlowPath;
use super::wire::{ParsedQuery, Transport};
use crate::net::udp_batch::{RecvBatch, ReplyFrom, send_from};

/// How often an idle worker checks for shutdown.
const SHUTDOWN_POLL: Duration = Duration::from_millis(200);
/// Datagrams received per syscall at most.
const BATCH: usize = 32;
/// Receive slot per datagram. Queries are small; a larger datagram is dropped.
const SLOT: usize = 4096;

/// Starts one worker thread per socket; each asks Consul itself, with up to
/// `inline_slots` questions on the wire (see [`super::inline`]).
pub fn spawn_workers(
    sockets: Vec<UdpSocket>,
    engine: &Arc<Engine>,
    slow: &SlowPath,
    inline_slots: usize,
    shutdown: &CancellationToken,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(sockets.len());
    for (index, socket) in sockets.into_iter().enumerate() {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(SHUTDOWN_POLL))?;
        let socket = Arc::new(socket);
        let inline = InlineConsul::new(engine, slow, &socket, inline_slots)?;
        let engine = engine.clone();
        let slow = slow.clone();
        let shutdown = shutdown.clone();
        let handle = std::thread::Builder::new()
            .name(format!("dns-udp-{index}"))
            .spawn(move || {
                super::stats::set_worker_shard(index + 1);
                Worker::new(socket, engine, slow, inline).run(&shutdown);
            })?;
        threads.push(handle);
    }
    Ok(threads)
}

/// The buffers of one worker, allocated once.
struct Worker {
    socket: Arc<UdpSocket>,
    engine: Arc<Engine>,
    slow: SlowPath,
    received: RecvBatch<BATCH, SLOT>,
    outbox: Outbox,
    /// This worker's own Consul client (Consul on loopback).
    inline: Option<InlineConsul>,
}

impl Worker {
    fn new(socket: Arc<UdpSocket>, engine: Arc<Engine>, slow: SlowPath, inline: Option<InlineConsul>) -> Self {
        Worker {
            outbox: Outbox::new(socket.as_raw_fd()),
            socket,
            engine,
            slow,
            received: RecvBatch::default(),
            inline,
        }
    }

    /// The loop: with no Consul question of its own on the wire, the worker
    /// blocks in `recvmmsg` on the client socket (as it always did); with
    /// some, it takes what both sockets have without waiting and, when
    /// neither has anything, polls both until the nearest deadline.
    fn run(mut self, shutdown: &CancellationToken) {
        let fd = self.socket.as_raw_fd();
        while !shutdown.is_cancelled() {
            let waiting = self.inline.as_ref().is_some_and(|i| !i.idle());
            let received = if waiting {
                self.received.try_recv(fd).unwrap_or(0)
            } else {
                self.received.recv(fd)
            };
            // The time, read once a batch and only when a Consul question of
            // this worker's own is (or is about to be) on the wire.
            let mut now = waiting.then(Instant::now);
            for i in 0..received {
                let Some((packet, src)) = self.received.get(i) else {
                    continue;
                };
                match self.engine.classify(packet, src, Transport::Udp, self.outbox.buf()) {
                    Verdict::Answered => {
                        if let Some((raw, len)) = self.received.source_raw(i) {
                            self.outbox.push(raw, len, self.received.destination(i));
                        }
                    }
                    Verdict::Drop => {}
                    Verdict::Resolve(query) => {
                        if let Some(inline) = self.inline.as_mut()
                            && self.engine.is_consul_forwarded(&query)
                            && let Some(raw) = self.received.source_raw(i)
                            && inline.ask(
                                &query,
                                raw,
                                src,
                                self.received.destination(i),
                                *now.get_or_insert_with(Instant::now),
                                &mut self.outbox,
                            )
                        {
                            continue;
                        }
                        let from = self.received.destination(i);
                        resolve_later(&self.engine, &self.slow, &self.socket, &query, src, from);
                    }
                }
            }
            if let (Some(inline), Some(now)) = (self.inline.as_mut(), now) {
                inline.send_queued(&mut self.outbox);
                if !inline.idle() {
                    let answers = inline.receive(&mut self.outbox);
                    inline.expire(now, &mut self.outbox);
                    if received == 0 && answers == 0 && self.outbox.is_empty() && !inline.idle() {
                        inline.wait(fd, now, SHUTDOWN_POLL);
                    }
                }
            }
            self.outbox.flush();
        }
    }
}

/// The task path: the question is copied out with its parse (the next
/// receive reuses the slot) and resolved in a tokio task, which answers on
/// the client socket.
fn resolve_later(
    engine: &Arc<Engine>,
    slow: &SlowPath,
    socket: &Arc<UdpSocket>,
    query: &ParsedQuery<'_>,
    src: SocketAddr,
    from: ReplyFrom,
) {
    let Some(slot) = engine.admit() else { return };
    let query = query.to_owned_query();
    let engine = engine.clone();
    let socket = socket.clone();
    slow.spawn(async move {
        let _slot = slot;
        let response = engine.resolve_query(&query.get(), src, Transport::Udp).await;
        let _ = send_from(socket.as_raw_fd(), &response, src, from);
    });
}
