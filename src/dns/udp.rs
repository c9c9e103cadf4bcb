//! UDP receive loops: one OS thread per SO_REUSEPORT socket, batched syscalls.
//!
//! Each worker blocks in `recvmmsg` (up to [`BATCH`] datagrams per call), answers
//! cached and local questions inline (no task, no allocation: every buffer lives as
//! long as the thread), sends all those answers with one `sendmmsg`, and hands the
//! rest to the tokio runtime, which replies on the same socket when the answer is
//! in. The kernel spreads clients over the sockets. A short receive timeout lets
//! the loop notice shutdown.

use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::engine::{Engine, Verdict};
use super::wire::Transport;

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

/// The buffers of one worker; `recv_hdrs` and `send_hdrs` point into the others,
/// which is why they are boxed once and never resized.
struct Worker {
    socket: Arc<UdpSocket>,
    engine: Arc<Engine>,
    runtime: tokio::runtime::Handle,
    slots: Box<[u8]>,
    addrs: Box<[libc::sockaddr_storage; BATCH]>,
    recv_iovecs: Box<[libc::iovec; BATCH]>,
    recv_hdrs: Box<[libc::mmsghdr; BATCH]>,
    outs: Vec<Vec<u8>>,
    send_iovecs: Box<[libc::iovec; BATCH]>,
    send_hdrs: Box<[libc::mmsghdr; BATCH]>,
}

// SAFETY: the raw pointers inside the mmsghdr/iovec arrays point only into this
// struct's own boxed buffers; the worker is moved into its thread before use.
unsafe impl Send for Worker {}

impl Worker {
    fn new(socket: Arc<UdpSocket>, engine: Arc<Engine>, runtime: tokio::runtime::Handle) -> Self {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let zeroed_box = || -> Box<[libc::mmsghdr; BATCH]> { Box::new(unsafe { zeroed() }) };
        let mut worker = Worker {
            socket,
            engine,
            runtime,
            slots: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            addrs: Box::new(unsafe { zeroed() }),
            recv_iovecs: Box::new(unsafe { zeroed() }),
            recv_hdrs: zeroed_box(),
            outs: (0..BATCH).map(|_| Vec::with_capacity(SLOT)).collect(),
            send_iovecs: Box::new(unsafe { zeroed() }),
            send_hdrs: zeroed_box(),
        };
        for i in 0..BATCH {
            worker.recv_iovecs[i] = libc::iovec {
                iov_base: worker.slots[i * SLOT..].as_mut_ptr().cast(),
                iov_len: SLOT,
            };
            let hdr = &mut worker.recv_hdrs[i].msg_hdr;
            hdr.msg_iov = &mut worker.recv_iovecs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_name = (&mut worker.addrs[i] as *mut libc::sockaddr_storage).cast();
        }
        worker
    }

    fn run(mut self, shutdown: &CancellationToken) {
        let fd = self.socket.as_raw_fd();
        while !shutdown.is_cancelled() {
            for hdr in self.recv_hdrs.iter_mut() {
                hdr.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                hdr.msg_hdr.msg_flags = 0;
                hdr.msg_len = 0;
            }
            // SAFETY: the headers point at live buffers of the right sizes.
            let received = unsafe {
                libc::recvmmsg(
                    fd,
                    self.recv_hdrs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if received <= 0 {
                // Timeout (shutdown poll), EINTR, or an ICMP error from an earlier
                // send that concerns one client: none of them stop the loop.
                continue;
            }
            let mut answers = 0;
            for i in 0..received as usize {
                let len = self.recv_hdrs[i].msg_len as usize;
                if self.recv_hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    continue;
                }
                let Some(src) = socket_addr(&self.addrs[i]) else {
                    continue;
                };
                let packet = &self.slots[i * SLOT..i * SLOT + len];
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
                        let hdr = &mut self.send_hdrs[answers].msg_hdr;
                        hdr.msg_iov = &mut self.send_iovecs[answers];
                        hdr.msg_iovlen = 1;
                        hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                        hdr.msg_namelen = self.recv_hdrs[i].msg_hdr.msg_namelen;
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

/// Converts a received `sockaddr_storage` into a `SocketAddr`.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
