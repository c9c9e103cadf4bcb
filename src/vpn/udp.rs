//! Batched UDP for the packet path: `recvmmsg` into fixed slots on the way in,
//! and on the way out one `sendmmsg` per batch in which runs of equal-sized
//! datagrams to the same endpoint are sent as one UDP GSO message
//! (`UDP_SEGMENT`): the kernel cuts them, so a 64 KB TUN read costs one syscall.
//!
//! Every buffer is allocated once per thread; `mmsghdr`/`iovec` arrays point into
//! them, which is why they are boxed and never resized.

use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::RawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::net::udp_batch::OnSendError;

/// Datagrams per receive call.
pub const RECV_BATCH: usize = 64;
/// Receive slot. WireGuard datagrams are at most MTU + 32 bytes; anything larger
/// than this is truncated by the kernel and dropped.
pub const RECV_SLOT: usize = 4096;
/// How long a blocked receive waits before the loop checks for shutdown.
pub const POLL: Duration = Duration::from_millis(200);
/// Most segments the kernel accepts in one GSO send.
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO send (IP length limit minus headers).
const GSO_MAX_BYTES: usize = 65_000;
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;

/// Binds the WireGuard socket: large buffers, IPv6 sockets dual-stack.
pub fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // One socket for both families where the system allows it.
        let _ = socket.set_only_v6(false);
    }
    // Room for a burst of full-size datagrams while a thread is busy: a TSO
    // read becomes 45 datagrams at once. With CAP_NET_ADMIN (the vpn has it for
    // the TUN) the FORCE options pass rmem_max/wmem_max; else the kernel caps.
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set_int(&socket, force, BUFFER).is_err() {
            let _ = set_int(&socket, plain, BUFFER);
        }
    }
    socket.bind(&addr.into())?;
    socket.set_read_timeout(Some(POLL))?;
    Ok(socket.into())
}

/// Socket buffer size asked for in each direction.
const BUFFER: libc::c_int = 4 << 20;

fn set_int(socket: &Socket, option: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    crate::net::udp_batch::set_int_option(socket.as_raw_fd(), libc::SOL_SOCKET, option, value)
}

/// Converts a received `sockaddr_storage`; IPv4-mapped IPv6 becomes IPv4.
pub fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match crate::net::udp_batch::socket_addr(storage)? {
        SocketAddr::V6(a) => Some(match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, a.port())),
            None => SocketAddr::V6(a),
        }),
        v4 => Some(v4),
    }
}

/// Writes `addr` into `storage` in the socket's family; returns the length.
fn write_addr(addr: SocketAddr, v6_socket: bool, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    let addr = match (addr, v6_socket) {
        (SocketAddr::V4(a), true) => SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0)),
        (a, _) => a,
    };
    let sa = socket2::SockAddr::from(addr);
    let len = sa.len() as usize;
    // SAFETY: both are plain C structs; `len` <= size_of::<sockaddr_storage>().
    unsafe {
        std::ptr::copy_nonoverlapping(
            sa.as_ptr().cast::<u8>(),
            (storage as *mut libc::sockaddr_storage).cast(),
            len,
        );
    }
    len as libc::socklen_t
}

/// Sends one datagram now without blocking (handshake answers, timers).
pub fn send_now(fd: RawFd, v6_socket: bool, data: &[u8], dest: SocketAddr) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = write_addr(dest, v6_socket, &mut storage);
    // SAFETY: `data` and `storage` are live for the call; failures are dropped
    // datagrams, which WireGuard's timers retry.
    unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT,
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        );
    }
}

/// Receive buffers for one packet thread.
pub type RecvBatch = crate::net::udp_batch::RecvBatch<RECV_BATCH, RECV_SLOT>;

/// Datagram `i` of the last receive with its source (IPv4-mapped sources of a
/// dual-stack socket as IPv4, the form peers' endpoints are kept in).
#[inline]
pub fn datagram(batch: &RecvBatch, i: usize) -> Option<(&[u8], SocketAddr)> {
    let (data, storage) = batch.get_raw(i)?;
    Some((data, socket_addr(storage)?))
}

/// Outgoing datagrams of one thread, flushed with GSO + `sendmmsg`.
pub struct SendBatch {
    slot_size: usize,
    capacity: usize,
    slots: Box<[u8]>,
    lens: Vec<usize>,
    dests: Vec<SocketAddr>,
    names: Box<[libc::sockaddr_storage]>,
    iovecs: Box<[libc::iovec]>,
    controls: Box<[[u64; 4]]>,
    hdrs: Box<[libc::mmsghdr]>,
    gso: bool,
    v6_socket: bool,
}

// SAFETY: see RecvBatch; the header arrays are rebuilt from owned buffers on
// every flush.
unsafe impl Send for SendBatch {}

impl SendBatch {
    /// `capacity` datagrams of up to `slot_size` bytes each.
    pub fn new(capacity: usize, slot_size: usize, v6_socket: bool) -> Self {
        SendBatch {
            slot_size,
            capacity,
            slots: vec![0u8; capacity * slot_size].into_boxed_slice(),
            lens: Vec::with_capacity(capacity),
            dests: Vec::with_capacity(capacity),
            // SAFETY: all-zero is a valid value for these plain C structs.
            names: (0..capacity).map(|_| unsafe { zeroed() }).collect(),
            iovecs: (0..capacity).map(|_| unsafe { zeroed() }).collect(),
            controls: vec![[0u64; 4]; capacity].into_boxed_slice(),
            hdrs: (0..capacity).map(|_| unsafe { zeroed() }).collect(),
            gso: true,
            v6_socket,
        }
    }

    /// True when no further datagram fits.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.lens.len() == self.capacity
    }

    /// True when nothing is queued.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// The next free slot (check [`Self::is_full`] first).
    #[inline]
    pub fn slot(&mut self) -> &mut [u8] {
        let i = self.lens.len();
        &mut self.slots[i * self.slot_size..(i + 1) * self.slot_size]
    }

    /// Queues the first `len` bytes of the slot returned by [`Self::slot`] for `dest`.
    #[inline]
    pub fn commit(&mut self, len: usize, dest: SocketAddr) {
        self.lens.push(len.min(self.slot_size));
        self.dests.push(dest);
    }

    /// Sends everything queued. Datagrams the kernel refuses are dropped (UDP).
    pub fn flush(&mut self, fd: RawFd) {
        if self.lens.is_empty() {
            return;
        }
        let messages = self.build();
        let sent = self.send(fd, messages);
        if let Err(e) = sent
            && self.gso
            && e.raw_os_error() == Some(libc::EIO)
        {
            // No checksum offload on the egress path: the kernel refuses GSO
            // with EIO. Fall back to one datagram per message for good.
            tracing::warn!("UDP GSO refused by the kernel; sending datagrams one by one");
            self.gso = false;
            let messages = self.build();
            let _ = self.send(fd, messages);
        }
        self.lens.clear();
        self.dests.clear();
    }

    /// Fills the message headers: one per run of same-destination datagrams
    /// of equal size (the last may be shorter), or one per datagram without GSO.
    fn build(&mut self) -> usize {
        let n = self.lens.len();
        let mut messages = 0;
        let mut i = 0;
        while i < n {
            let size = self.lens[i];
            let mut j = i + 1;
            let mut bytes = size;
            if self.gso {
                while j < n
                    && j - i < GSO_MAX_SEGMENTS
                    && self.dests[j] == self.dests[i]
                    && self.lens[j] <= size
                    && bytes + self.lens[j] <= GSO_MAX_BYTES
                {
                    bytes += self.lens[j];
                    j += 1;
                    // Only the last segment may be shorter than the others.
                    if self.lens[j - 1] < size {
                        break;
                    }
                }
            }
            for k in i..j {
                self.iovecs[k] = libc::iovec {
                    iov_base: self.slots[k * self.slot_size..].as_mut_ptr().cast(),
                    iov_len: self.lens[k],
                };
            }
            let namelen = write_addr(self.dests[i], self.v6_socket, &mut self.names[messages]);
            let hdr = &mut self.hdrs[messages];
            hdr.msg_len = 0;
            hdr.msg_hdr.msg_name = (&mut self.names[messages] as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = namelen;
            hdr.msg_hdr.msg_iov = &mut self.iovecs[i];
            hdr.msg_hdr.msg_iovlen = j - i;
            hdr.msg_hdr.msg_flags = 0;
            if j - i > 1 {
                let control = &mut self.controls[messages];
                // SAFETY: the control buffer is 32 bytes, 8-aligned, larger than
                // CMSG_SPACE(2); the CMSG macros stay inside it.
                unsafe {
                    let space = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
                    hdr.msg_hdr.msg_control = control.as_mut_ptr().cast();
                    hdr.msg_hdr.msg_controllen = space;
                    let cmsg = libc::CMSG_FIRSTHDR(&hdr.msg_hdr);
                    (*cmsg).cmsg_level = SOL_UDP;
                    (*cmsg).cmsg_type = UDP_SEGMENT;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size as u16);
                }
            } else {
                hdr.msg_hdr.msg_control = std::ptr::null_mut();
                hdr.msg_hdr.msg_controllen = 0;
            }
            messages += 1;
            i = j;
        }
        messages
    }

    fn send(&mut self, fd: RawFd, messages: usize) -> std::io::Result<()> {
        let mut refused = None;
        // SAFETY: headers [0, messages) point at live buffers built by `build`.
        unsafe {
            crate::net::udp_batch::send_all(fd, &mut self.hdrs[..messages], |_, e| match e.kind() {
                std::io::ErrorKind::Interrupted => OnSendError::Retry,
                _ if e.raw_os_error() == Some(libc::EIO) => {
                    refused = Some(e);
                    OnSendError::Stop
                }
                // A full buffer or an unreachable peer: drop that message.
                _ => OnSendError::Skip,
            })
        };
        refused.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn batches_round_trip_with_gso_runs_and_mixed_sizes() {
        let rx = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let tx = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dest = rx.local_addr().unwrap();
        let mut out = SendBatch::new(16, 2048, false);
        // A run of five 1000-byte datagrams, a shorter tail, then an odd size.
        let sizes = [1000, 1000, 1000, 1000, 1000, 300, 1200];
        for (n, size) in sizes.iter().enumerate() {
            out.slot()[..*size].fill(n as u8);
            out.commit(*size, dest);
        }
        out.flush(tx.as_raw_fd());
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        while got.len() < sizes.len() {
            let n = batch.recv(rx.as_raw_fd());
            assert!(n > 0, "timed out after {got:?}");
            for i in 0..n {
                let (data, src) = batch.get(i).unwrap();
                assert_eq!(src, tx.local_addr().unwrap());
                got.push((data.len(), data[0]));
            }
        }
        let want: Vec<(usize, u8)> = sizes.iter().enumerate().map(|(n, s)| (*s, n as u8)).collect();
        assert_eq!(got, want);
    }
}
