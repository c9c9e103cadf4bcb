//! UDP receive loops: one OS thread per SO_REUSEPORT socket, batched syscalls.
//!
//! Each worker blocks in `recvmmsg` (up to [`BATCH`] datagrams per call), answers
//! cached and local questions inline (no task, no allocation: every buffer lives as
//! long as the thread), sends all those answers with one `sendmmsg`, and hands the
//! rest to the tokio runtime, which replies on the same socket when the answer is
//! in. The kernel spreads clients over the sockets. A short receive timeout lets
//! the loop notice shutdown. A worker only returns on shutdown; `dns::run`
//! watches the threads and fails when one ends (or panics) before.

use std::mem::zeroed;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::engine::{Engine, Verdict};
use super::wire::Transport;
use crate::udp_batch::RecvBatch;

/// How often an idle worker checks for shutdown.
const SHUTDOWN_POLL: Duration = Duration::from_millis(200);
/// Datagrams received (and answers sent) per syscall at most.
const BATCH: usize = 32;
/// Receive slot per datagram. Queries are small; a larger datagram is dropped.
const SLOT: usize = 4096;

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
            .spawn(move || {
                super::stats::set_worker_shard(index + 1);
                Worker::new(socket, engine, runtime).run(&shutdown);
            })?;
        threads.push(handle);
    }
    Ok(threads)
}

/// The buffers of one worker; `send_hdrs` point into `outs` and `received`,
/// which is why they are boxed once and never resized.
struct Worker {
    socket: Arc<UdpSocket>,
    engine: Arc<Engine>,
    runtime: tokio::runtime::Handle,
    received: RecvBatch<BATCH, SLOT>,
    outs: Vec<Vec<u8>>,
    send_iovecs: Box<[libc::iovec; BATCH]>,
    send_hdrs: Box<[libc::mmsghdr; BATCH]>,
}

// SAFETY: the raw pointers inside the send mmsghdr/iovec arrays point only into
// this struct's own boxed buffers; the worker is moved into its thread before use.
unsafe impl Send for Worker {}

impl Worker {
    fn new(socket: Arc<UdpSocket>, engine: Arc<Engine>, runtime: tokio::runtime::Handle) -> Self {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let zeroed_box = || -> Box<[libc::mmsghdr; BATCH]> { Box::new(unsafe { zeroed() }) };
        Worker {
            socket,
            engine,
            runtime,
            received: RecvBatch::default(),
            outs: (0..BATCH).map(|_| Vec::with_capacity(SLOT)).collect(),
            send_iovecs: Box::new(unsafe { zeroed() }),
            send_hdrs: zeroed_box(),
        }
    }

    fn run(mut self, shutdown: &CancellationToken) {
        let fd = self.socket.as_raw_fd();
        while !shutdown.is_cancelled() {
            let received = self.received.recv(fd);
            let mut answers = 0;
            for i in 0..received {
                let Some((packet, src)) = self.received.get(i) else {
                    continue;
                };
                match self
                    .engine
                    .classify(packet, src, Transport::Udp, &mut self.outs[answers])
                {
                    Verdict::Answered => {
                        let out = &mut self.outs[answers];
                        self.send_iovecs[answers] = libc::iovec {
                            iov_base: out.as_mut_ptr().cast(),
                            iov_len: out.len(),
                        };
                        let (name, namelen) = self.received.name(i);
                        let hdr = &mut self.send_hdrs[answers].msg_hdr;
                        hdr.msg_iov = &mut self.send_iovecs[answers];
                        hdr.msg_iovlen = 1;
                        hdr.msg_name = name.cast();
                        hdr.msg_namelen = namelen;
                        answers += 1;
                    }
                    Verdict::Drop => {}
                    Verdict::Resolve => self.resolve_later(packet, src),
                }
            }
            self.send(fd, answers);
        }
    }

    fn send(&mut self, fd: libc::c_int, count: usize) {
        let mut sent = 0;
        while sent < count {
            // SAFETY: headers [sent, count) point at live answer buffers.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    self.send_hdrs[sent..].as_mut_ptr(),
                    (count - sent) as libc::c_uint,
                    0,
                )
            };
            if n <= 0 {
                // A full send buffer or an unreachable client: skip that answer
                // (UDP clients retry) rather than stall the loop.
                sent += 1;
            } else {
                sent += n as usize;
            }
        }
    }

    fn resolve_later(&self, packet: &[u8], src: SocketAddr) {
        let Some(slot) = self.engine.admit() else { return };
        // Copied out: the next receive reuses the slot.
        let packet = packet.to_vec();
        let engine = self.engine.clone();
        let socket = self.socket.clone();
        self.runtime.spawn(async move {
            let _slot = slot;
            if let Some(response) = engine.resolve(&packet, src, Transport::Udp).await {
                let _ = socket.send_to(&response, src);
            }
        });
    }
}
