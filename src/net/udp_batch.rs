//! Batched UDP, shared by the dns workers and the vpn packet loop.
//!
//! * [`RecvBatch`]: one `recvmmsg` fills up to `N` fixed slots of `SLOT` bytes
//!   with datagrams and their source addresses.
//! * [`SendBatch`]: up to `N` datagrams sent with as few `sendmmsg` calls as
//!   the kernel takes; [`send_all`] is its loop, which the vpn's GSO batch
//!   uses with headers of its own. What to do with a datagram the kernel
//!   refuses is the caller's ([`OnSendError`]).
//!
//! Every buffer is allocated once, when the batch is made; the `mmsghdr` and
//! `iovec` arrays point into the slot and address arrays, which is why all of
//! them are boxed and never resized.
//!
//! On a socket bound to a wildcard address, [`enable_pktinfo`] makes each
//! datagram carry the local address it was sent to ([`RecvBatch::destination`]),
//! and a reply names it as its source ([`ReplyFrom`], [`SendBatch::set_control`],
//! [`send_from`]): without it the kernel picks the source by the route back,
//! and a client that asked the host's address through the docker bridge gets
//! an answer from the bridge's address, which its resolver drops.

use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Bytes of ancillary data a datagram may carry here: one `in6_pktinfo`
/// (`CMSG_SPACE(20)` = 40 on 64-bit Linux), as 8-byte-aligned words.
const CONTROL_WORDS: usize = 8;
/// The same in bytes.
pub const CONTROL_BYTES: usize = CONTROL_WORDS * 8;

/// Ancillary data of one message, aligned for `cmsghdr`.
pub type Control = [u64; CONTROL_WORDS];

/// The local address a datagram was sent to, which its reply goes out from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReplyFrom {
    /// Not known (a socket bound to one address): the kernel's choice.
    #[default]
    Any,
    /// This IPv4 address.
    V4(Ipv4Addr),
    /// This IPv6 address, on this interface (needed for link-local ones).
    V6 {
        /// The address.
        addr: Ipv6Addr,
        /// The interface it came in on.
        ifindex: u32,
    },
}

impl ReplyFrom {
    /// Writes the `IP_PKTINFO` / `IPV6_PKTINFO` message that sends from this
    /// address into `control`; the bytes used (0 for [`ReplyFrom::Any`]).
    pub fn write(&self, control: &mut Control) -> usize {
        // SAFETY: `control` is CONTROL_BYTES long and 8-byte aligned, room for
        // one cmsghdr with an in6_pktinfo (the larger of the two payloads).
        unsafe {
            let base = control.as_mut_ptr().cast::<u8>();
            let cmsg = base.cast::<libc::cmsghdr>();
            match *self {
                ReplyFrom::Any => 0,
                ReplyFrom::V4(ip) => {
                    let len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32);
                    (*cmsg).cmsg_level = libc::IPPROTO_IP;
                    (*cmsg).cmsg_type = libc::IP_PKTINFO;
                    (*cmsg).cmsg_len = len as usize;
                    let info = libc::in_pktinfo {
                        // 0: the route decides the interface; the source is set.
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(ip).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>(), info);
                    libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize
                }
                ReplyFrom::V6 { addr, ifindex } => {
                    let len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32);
                    (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                    (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                    (*cmsg).cmsg_len = len as usize;
                    let info = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr { s6_addr: addr.octets() },
                        ipi6_ifindex: ifindex,
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in6_pktinfo>(), info);
                    libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as usize
                }
            }
        }
    }
}

/// Makes every datagram `fd` receives carry its destination address (for a
/// socket bound to a wildcard address; see the module header).
pub fn enable_pktinfo(fd: RawFd, ipv6: bool) -> std::io::Result<()> {
    if ipv6 {
        set_int_option(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)
    } else {
        set_int_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
    }
}

/// `setsockopt(fd, level, name, &value)` for an `int` option (what socket2
/// does not offer: SO_RCVBUFFORCE, IP_PKTINFO ...).
pub fn set_int_option(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a plain int option; the kernel checks the descriptor.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The destination in a received message's ancillary data, if it has one.
///
/// # Safety
///
/// `hdr` is a header `recvmsg`/`recvmmsg` just filled, its control buffer alive.
unsafe fn destination_of(hdr: &libc::msghdr) -> ReplyFrom {
    if hdr.msg_controllen == 0 || hdr.msg_control.is_null() {
        return ReplyFrom::Any;
    }
    // SAFETY: the caller's promise; the CMSG_* walk stays within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            let (level, kind) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>());
                return ReplyFrom::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
            }
            if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in6_pktinfo>());
                return ReplyFrom::V6 {
                    addr: Ipv6Addr::from(info.ipi6_addr.s6_addr),
                    ifindex: info.ipi6_ifindex,
                };
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    ReplyFrom::Any
}

/// Sends one datagram to `to` from `from` (see [`ReplyFrom`]): the task
/// path's reply on a wildcard socket.
pub fn send_from(fd: RawFd, data: &[u8], to: SocketAddr, from: ReplyFrom) -> std::io::Result<usize> {
    let to = socket2::SockAddr::from(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control: Control = [0; CONTROL_WORDS];
    let control_len = from.write(&mut control);
    // SAFETY: all-zero is a valid msghdr; every pointer set below is alive
    // for the call.
    let mut hdr: libc::msghdr = unsafe { zeroed() };
    hdr.msg_name = to.as_ptr() as *mut libc::c_void;
    hdr.msg_namelen = to.len();
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if control_len > 0 {
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = control_len;
    }
    // SAFETY: as above.
    let n = unsafe { libc::sendmsg(fd, &hdr, 0) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receive buffers for `N` datagrams of up to `SLOT` bytes.
pub struct RecvBatch<const N: usize, const SLOT: usize> {
    slots: Box<[u8]>,
    addrs: Box<[libc::sockaddr_storage; N]>,
    controls: Box<[Control; N]>,
    iovecs: Box<[libc::iovec; N]>,
    hdrs: Box<[libc::mmsghdr; N]>,
    count: usize,
}

// SAFETY: the raw pointers in `iovecs`/`hdrs` point only into this struct's own
// boxed buffers, which move with it.
unsafe impl<const N: usize, const SLOT: usize> Send for RecvBatch<N, SLOT> {}

impl<const N: usize, const SLOT: usize> Default for RecvBatch<N, SLOT> {
    fn default() -> Self {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut batch = RecvBatch {
            slots: vec![0u8; N * SLOT].into_boxed_slice(),
            addrs: Box::new(unsafe { zeroed() }),
            controls: Box::new([[0; CONTROL_WORDS]; N]),
            iovecs: Box::new(unsafe { zeroed() }),
            hdrs: Box::new(unsafe { zeroed() }),
            count: 0,
        };
        for i in 0..N {
            batch.iovecs[i] = libc::iovec {
                iov_base: batch.slots[i * SLOT..].as_mut_ptr().cast(),
                iov_len: SLOT,
            };
            let hdr = &mut batch.hdrs[i].msg_hdr;
            hdr.msg_iov = &mut batch.iovecs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_name = (&mut batch.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_control = batch.controls[i].as_mut_ptr().cast();
        }
        batch
    }
}

impl<const N: usize, const SLOT: usize> RecvBatch<N, SLOT> {
    /// Blocks (up to the socket's read timeout) for at least one datagram and
    /// takes what else is queued, up to `N`; returns how many came.
    pub fn recv(&mut self, fd: RawFd) -> usize {
        // A timeout (the caller's shutdown poll), EINTR, or an ICMP error about
        // one earlier send: none of them stop the caller's loop.
        self.recv_with(fd, libc::MSG_WAITFORONE).unwrap_or(0)
    }

    /// Takes what is queued, up to `N`, without waiting: `Ok(0)` when nothing
    /// is (or the call was interrupted); other errors are returned, e.g.
    /// `ECONNREFUSED` on a connected socket whose peer's host sent ICMP port
    /// unreachable.
    pub fn try_recv(&mut self, fd: RawFd) -> std::io::Result<usize> {
        match self.recv_with(fd, libc::MSG_DONTWAIT) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(0)
            }
            other => other,
        }
    }

    fn recv_with(&mut self, fd: RawFd, flags: libc::c_int) -> std::io::Result<usize> {
        for hdr in self.hdrs.iter_mut() {
            hdr.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_hdr.msg_controllen = CONTROL_BYTES;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        // SAFETY: the headers point at live buffers of the stated sizes.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                N as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            self.count = 0;
            return Err(std::io::Error::last_os_error());
        }
        self.count = n as usize;
        Ok(self.count)
    }

    /// Datagram `i` of the last receive, cut to `SLOT` bytes, and whether it
    /// was cut (it was larger); `None` when it is not in the batch.
    #[inline]
    pub fn get_cut(&self, i: usize) -> Option<(&[u8], bool)> {
        let hdr = self.hdrs.get(i)?;
        if i >= self.count {
            return None;
        }
        let len = (hdr.msg_len as usize).min(SLOT);
        let cut = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        Some((&self.slots[i * SLOT..i * SLOT + len], cut))
    }

    /// Datagram `i` of the last receive and its raw source address, or None
    /// when it was truncated (larger than `SLOT`) or is not in the batch.
    #[inline]
    pub fn get_raw(&self, i: usize) -> Option<(&[u8], &libc::sockaddr_storage)> {
        let hdr = self.hdrs.get(i)?;
        if i >= self.count || hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let len = (hdr.msg_len as usize).min(SLOT);
        Some((&self.slots[i * SLOT..i * SLOT + len], &self.addrs[i]))
    }

    /// Datagram `i` with its source as a `SocketAddr` (as the socket saw it:
    /// IPv4 clients of a dual-stack socket stay IPv4-mapped).
    #[inline]
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        let (data, storage) = self.get_raw(i)?;
        Some((data, socket_addr(storage)?))
    }

    /// The source address of datagram `i` in C form and its length, to be
    /// copied for a reply's `msg_name`.
    #[inline]
    pub fn source_raw(&self, i: usize) -> Option<(&libc::sockaddr_storage, libc::socklen_t)> {
        let hdr = self.hdrs.get(i)?;
        (i < self.count).then(|| (&self.addrs[i], hdr.msg_hdr.msg_namelen))
    }

    /// The local address datagram `i` was sent to, when the socket reports
    /// it ([`enable_pktinfo`]): where its reply must come from.
    #[inline]
    pub fn destination(&self, i: usize) -> ReplyFrom {
        match self.hdrs.get(i) {
            // SAFETY: the last receive filled header i, whose control buffer
            // is this batch's own.
            Some(hdr) if i < self.count => unsafe { destination_of(&hdr.msg_hdr) },
            _ => ReplyFrom::Any,
        }
    }

    /// The source address of datagram `i` in C form, for a reply's `msg_name`.
    #[inline]
    pub fn name(&mut self, i: usize) -> (*mut libc::sockaddr_storage, libc::socklen_t) {
        (&mut self.addrs[i], self.hdrs[i].msg_hdr.msg_namelen)
    }
}

/// What [`send_all`] does after `sendmmsg` refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSendError {
    /// Drop that message and go on with the next.
    Skip,
    /// Try the same message again (e.g. after `EINTR`).
    Retry,
    /// Stop: the rest is not sent.
    Stop,
}

/// Sends `hdrs` in order with as few `sendmmsg` calls as the kernel takes.
/// When the kernel refuses message `i` (or takes none), `on_error(i, error)`
/// decides what follows. Returns how many messages the kernel took.
///
/// # Safety
///
/// Every header must point at live buffers (iovecs, data, name, control) of
/// the lengths it states, for the whole call, also across `on_error`.
pub unsafe fn send_all(
    fd: RawFd,
    hdrs: &mut [libc::mmsghdr],
    mut on_error: impl FnMut(usize, std::io::Error) -> OnSendError,
) -> usize {
    let count = hdrs.len();
    let (mut done, mut sent) = (0, 0);
    while done < count {
        // SAFETY: the caller's promise: headers [done, count) point at live buffers.
        let n = unsafe { libc::sendmmsg(fd, hdrs[done..].as_mut_ptr(), (count - done) as libc::c_uint, 0) };
        if n > 0 {
            done += n as usize;
            sent += n as usize;
            continue;
        }
        match on_error(done, std::io::Error::last_os_error()) {
            OnSendError::Skip => done += 1,
            OnSendError::Retry => {}
            OnSendError::Stop => break,
        }
    }
    sent
}

/// Up to `N` outgoing datagrams, one buffer each, sent with [`send_all`]: the
/// caller keeps the buffers and points header `i` at one with
/// [`SendBatch::set`] right before [`SendBatch::send`].
pub struct SendBatch<const N: usize> {
    iovecs: Box<[libc::iovec; N]>,
    hdrs: Box<[libc::mmsghdr; N]>,
}

// SAFETY: the raw pointers in `iovecs`/`hdrs` are set right before each send
// (to buffers the caller keeps alive for it) and not used in between.
unsafe impl<const N: usize> Send for SendBatch<N> {}

impl<const N: usize> Default for SendBatch<N> {
    fn default() -> Self {
        SendBatch {
            // SAFETY: all-zero is a valid value for these plain C structs.
            iovecs: Box::new(unsafe { zeroed() }),
            // SAFETY: as above.
            hdrs: Box::new(unsafe { zeroed() }),
        }
    }
}

impl<const N: usize> SendBatch<N> {
    /// Points message `i` at `data`, for `name` (`None` on a connected socket).
    #[inline]
    pub fn set(&mut self, i: usize, data: &[u8], name: Option<(&libc::sockaddr_storage, libc::socklen_t)>) {
        self.iovecs[i] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let hdr = &mut self.hdrs[i].msg_hdr;
        hdr.msg_iov = &mut self.iovecs[i];
        hdr.msg_iovlen = 1;
        (hdr.msg_name, hdr.msg_namelen) = match name {
            Some((addr, len)) => ((addr as *const libc::sockaddr_storage).cast_mut().cast(), len),
            None => (std::ptr::null_mut(), 0),
        };
        hdr.msg_control = std::ptr::null_mut();
        hdr.msg_controllen = 0;
    }

    /// Gives message `i` (after [`SendBatch::set`]) the ancillary data in
    /// `control`'s first `len` bytes (a [`ReplyFrom`]'s source address).
    #[inline]
    pub fn set_control(&mut self, i: usize, control: &Control, len: usize) {
        let hdr = &mut self.hdrs[i].msg_hdr;
        hdr.msg_control = control.as_ptr().cast_mut().cast();
        hdr.msg_controllen = len.min(CONTROL_BYTES);
    }

    /// Sends messages `0..count` as [`send_all`] does.
    ///
    /// # Safety
    ///
    /// Each of them was [`SendBatch::set`] to buffers that are still alive and
    /// unchanged, and stay so across `on_error`.
    pub unsafe fn send(
        &mut self,
        fd: RawFd,
        count: usize,
        on_error: impl FnMut(usize, std::io::Error) -> OnSendError,
    ) -> usize {
        // SAFETY: the caller's promise, passed on.
        unsafe { send_all(fd, &mut self.hdrs[..count], on_error) }
    }
}

/// Converts a received `sockaddr_storage` into a `SocketAddr`.
pub fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_takes_queued_datagrams_and_drops_oversized_ones() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        tx.send_to(b"one", to).unwrap();
        tx.send_to(&[7u8; 100], to).unwrap(); // larger than the 64-byte slot
        tx.send_to(b"three", to).unwrap();
        let mut batch = RecvBatch::<4, 64>::default();
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = batch.recv(rx.as_raw_fd());
            assert!(n > 0, "datagrams were sent");
            for i in 0..n {
                got.push(batch.get(i).map(|(d, src)| (d.to_vec(), src)));
            }
        }
        let from = tx.local_addr().unwrap();
        assert_eq!(got[0], Some((b"one".to_vec(), from)));
        assert_eq!(got[1], None, "a truncated datagram is not handed out");
        assert_eq!(got[2], Some((b"three".to_vec(), from)));
        assert!(batch.get(3).is_none() && batch.get(99).is_none());
    }
}
