//! The packet loop: two OS threads, one per direction, so both cores work.
//!
//! ```text
//!  vpn-net: recvmmsg (64) ─▶ per datagram, by message type:
//!             init:     shared RateLimiter (mac1; cookie under load, keyed by the
//!                       source IP) ─▶ parse_handshake_anon (peer by static key)
//!             response/cookie/data: peer by receiver index >> 8
//!           ─▶ Tunn::decapsulate into a reused TUN buffer
//!           ─▶ inner source must be routed to the same peer (device-wide table)
//!           ─▶ TUN send_multiple (GRO coalesces TCP segments)
//!  vpn-tun: TUN recv_multiple (a 64 KB TSO read split into segments)
//!           ─▶ destination lookup ─▶ Tunn::encapsulate into a reused slot
//!           ─▶ SendBatch::flush (UDP GSO runs per endpoint, sendmmsg)
//!  timers:  every 250 ms update_timers for each peer; limiter reset every 1 s
//! ```
//!
//! When the TUN interface goes away under us (`ip link del`, the device
//! detached) the vpn-tun thread ends with an error and cancels the run's token,
//! so [`super::run`] returns the error (and a supervisor can make a new
//! interface) instead of the thread spinning on a dead descriptor.
//!
//! The endpoint of a peer changes only after one of its packets authenticated
//! (a handshake we answered, a response we accepted, or data that decrypted),
//! never on cookie replies or anything unauthenticated. Nothing here allocates,
//! logs or takes a global lock per packet: the peer table is an `ArcSwap` guard
//! loaded once per batch, and each `Tunn` has its own mutex.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use tokio_util::sync::CancellationToken;
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::udp::{self, RecvBatch, SendBatch};
use super::{Peer, PeerTable, VpnState};

const HANDSHAKE_INIT: u32 = 1;
const HANDSHAKE_RESP: u32 = 2;
const COOKIE_REPLY: u32 = 3;
const DATA: u32 = 4;
/// Smallest data message: header (16) + AEAD tag (16).
const DATA_MIN: usize = 32;
/// Scratch size for anything `Tunn` writes outside the batches: big enough for
/// any `encapsulate` of a queued packet (it panics on a short buffer).
const SCRATCH: usize = 65_535 + 32;
/// Bound on the queue flush after a handshake (the Tunn queues at most 256).
const MAX_FLUSH: usize = 300;
/// Per source IP: initiations per second that may cost an X25519 lookup, and
/// the burst (wireguard-go's limits).
const INITS_PER_SECOND: f32 = 20.0;
const INIT_BURST: f32 = 5.0;
/// Source IPs tracked at once. When a new one comes and the table is full,
/// buckets that have refilled (the same as no entry) go first, else the one
/// seen least recently: a flood of new sources never resets the others.
const MAX_SOURCES: usize = 4096;

/// Token buckets per source IP for handshake initiations, checked after mac1
/// and the cookie (so the source is proven under load) and before the DH in
/// `parse_handshake_anon`, the expensive step a flood aims at.
#[derive(Default)]
struct InitBuckets {
    buckets: std::collections::HashMap<IpAddr, (f32, Instant)>,
}

impl InitBuckets {
    fn allow(&mut self, ip: IpAddr) -> bool {
        self.allow_at(ip, Instant::now())
    }

    fn allow_at(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(&ip) {
            // Rare (a full table and a new source): one pass over the table.
            self.buckets.retain(|_, (tokens, last)| {
                *tokens + now.duration_since(*last).as_secs_f32() * INITS_PER_SECOND < INIT_BURST
            });
            if self.buckets.len() >= MAX_SOURCES
                && let Some(oldest) = self
                    .buckets
                    .iter()
                    .min_by_key(|(_, (_, last))| *last)
                    .map(|(ip, _)| *ip)
            {
                self.buckets.remove(&oldest);
            }
        }
        let (tokens, last) = self.buckets.entry(ip).or_insert((INIT_BURST, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f32() * INITS_PER_SECOND).min(INIT_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Starts the two packet threads. Each ends when `shutdown` is cancelled; one
/// that meets a fatal error cancels `shutdown` itself and returns the error.
pub fn spawn(
    state: Arc<VpnState>,
    udp: Arc<UdpSocket>,
    tun: Arc<SyncDevice>,
    shutdown: CancellationToken,
) -> std::io::Result<Vec<JoinHandle<std::io::Result<()>>>> {
    let net = {
        let (state, udp, tun, shutdown) = (state.clone(), udp.clone(), tun.clone(), shutdown.clone());
        std::thread::Builder::new().name("vpn-net".into()).spawn(move || {
            NetToTun::new(&tun).run(&state, &udp, &tun, &shutdown);
            Ok(())
        })?
    };
    let mtu = state.config.mtu as usize;
    let tun_thread = std::thread::Builder::new()
        .name("vpn-tun".into())
        .spawn(move || TunToNet::new(&tun, &udp, mtu).run(&state, &udp, &tun, &shutdown))?;
    Ok(vec![net, tun_thread])
}

/// The message type of a WireGuard datagram (first four bytes, little endian).
#[inline]
fn message_type(data: &[u8]) -> Option<u32> {
    data.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The receiver index of a response (bytes 8..12), cookie or data (4..8) message.
#[inline]
fn receiver(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Buffers of the network-to-TUN thread.
struct NetToTun {
    batch: RecvBatch,
    /// Decrypted packets waiting for the TUN write, `offset` bytes in.
    bufs: Vec<Vec<u8>>,
    ready: usize,
    offset: usize,
    gro: GROTable,
    scratch: Vec<u8>,
    cookie: [u8; 64],
    inits: InitBuckets,
}

impl NetToTun {
    fn new(tun: &SyncDevice) -> Self {
        let offset = if tun.tcp_gso() { VIRTIO_NET_HDR_LEN } else { 0 };
        NetToTun {
            batch: RecvBatch::default(),
            // GRO appends coalesced segments to the first buffer of a flow:
            // reserve 64 KB so that never reallocates.
            bufs: (0..udp::RECV_BATCH)
                .map(|_| Vec::with_capacity(offset + 65_536))
                .collect(),
            ready: 0,
            offset,
            gro: GROTable::new(),
            scratch: vec![0u8; SCRATCH],
            cookie: [0u8; 64],
            inits: InitBuckets::default(),
        }
    }

    fn run(mut self, state: &VpnState, udp: &UdpSocket, tun: &SyncDevice, shutdown: &CancellationToken) {
        let fd = udp.as_raw_fd();
        let v6 = udp.local_addr().is_ok_and(|a| a.is_ipv6());
        while !shutdown.is_cancelled() {
            let n = self.batch.recv(fd);
            if n == 0 {
                continue;
            }
            let table = state.table.load();
            for i in 0..n {
                self.datagram(i, state, &table, fd, v6);
            }
            drop(table);
            if self.ready > 0 {
                // A write error (interface going down) drops this batch only.
                let _ = tun.send_multiple(&mut self.gro, &mut self.bufs[..self.ready], self.offset);
                self.ready = 0;
            }
        }
    }

    #[inline]
    fn datagram(&mut self, i: usize, state: &VpnState, table: &PeerTable, fd: RawFd, v6: bool) {
        let Some((data, src)) = udp::datagram(&self.batch, i) else {
            return;
        };
        match message_type(data) {
            Some(DATA) if data.len() >= DATA_MIN => {
                let Some(peer) = receiver(data, 4).and_then(|r| table.by_receiver(r)) else {
                    return;
                };
                let buf = &mut self.bufs[self.ready];
                // Room for the packet: only bytes past what the previous packet
                // left are zeroed, not the whole slot (the virtio header in front
                // is written by the TUN side for every packet it sends).
                buf.truncate(self.offset + udp::RECV_SLOT);
                buf.resize(self.offset + udp::RECV_SLOT, 0);
                let decrypted = {
                    let mut tunn = peer.tunn.lock();
                    match tunn.decapsulate(Some(src.ip()), data, &mut buf[self.offset..]) {
                        TunnResult::WriteToTunnelV4(p, ip) => Some(Some((p.len(), IpAddr::V4(ip)))),
                        TunnResult::WriteToTunnelV6(p, ip) => Some(Some((p.len(), IpAddr::V6(ip)))),
                        // A keepalive: authenticated, nothing to deliver.
                        TunnResult::Done => Some(None),
                        _ => None,
                    }
                };
                let Some(inner) = decrypted else { return };
                peer.set_endpoint(src);
                let Some((len, inner_src)) = inner else { return };
                // Cryptokey routing: the inner source must belong to this very
                // peer under the table of all peers together.
                if !table.route(inner_src).is_some_and(|owner| Arc::ptr_eq(owner, peer)) {
                    peer.spoofed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                buf.truncate(self.offset + len);
                self.ready += 1;
            }
            Some(HANDSHAKE_INIT) => {
                let peer = {
                    let packet = match state.limiter.verify_packet(Some(src.ip()), data, &mut self.cookie) {
                        Ok(p) => p,
                        Err(TunnResult::WriteToNetwork(cookie)) => {
                            udp::send_now(fd, v6, cookie, src);
                            state.cookies_sent.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        // Bad mac1 or malformed: silence keeps the port stealthy.
                        Err(_) => return,
                    };
                    let Packet::HandshakeInit(init) = packet else { return };
                    if !self.inits.allow(src.ip()) {
                        return;
                    }
                    let Ok(half) = parse_handshake_anon(&state.secret, &state.public, &init) else {
                        return;
                    };
                    match table.by_key(&half.peer_static_public) {
                        Some(p) => p.clone(),
                        None => return,
                    }
                };
                handshake(&mut self.scratch, &peer, data, src, fd, v6, state);
            }
            Some(HANDSHAKE_RESP) => {
                if state
                    .limiter
                    .verify_packet(Some(src.ip()), data, &mut self.cookie)
                    .is_err()
                {
                    return;
                }
                let Some(peer) = receiver(data, 8).and_then(|r| table.by_receiver(r)).cloned() else {
                    return;
                };
                handshake(&mut self.scratch, &peer, data, src, fd, v6, state);
            }
            Some(COOKIE_REPLY) if data.len() == 64 => {
                let Some(peer) = receiver(data, 4).and_then(|r| table.by_receiver(r)) else {
                    return;
                };
                // Stores the cookie for our next initiation; never roams.
                let _ = peer.tunn.lock().decapsulate(Some(src.ip()), data, &mut self.scratch);
            }
            _ => {}
        }
    }
}

/// Runs an initiation or response through the peer's Tunn, answers it, roams
/// the endpoint when it authenticated, and flushes packets queued meanwhile.
fn handshake(scratch: &mut [u8], peer: &Peer, data: &[u8], src: SocketAddr, fd: RawFd, v6: bool, state: &VpnState) {
    let mut tunn = peer.tunn.lock();
    let answered = match tunn.decapsulate(Some(src.ip()), data, scratch) {
        TunnResult::WriteToNetwork(out) => {
            let cookie = message_type(out) == Some(COOKIE_REPLY);
            udp::send_now(fd, v6, out, src);
            if cookie {
                state.cookies_sent.fetch_add(1, Ordering::Relaxed);
            }
            !cookie
        }
        _ => false,
    };
    if !answered {
        return;
    }
    // An initiation answered with our response, or a response to ours
    // accepted (answered with a keepalive): one handshake, counted once.
    peer.handshakes.fetch_add(1, Ordering::Relaxed);
    peer.set_endpoint(src);
    for _ in 0..MAX_FLUSH {
        match tunn.decapsulate(None, &[], scratch) {
            TunnResult::WriteToNetwork(out) => udp::send_now(fd, v6, out, src),
            _ => break,
        }
    }
}

/// Buffers of the TUN-to-network thread.
struct TunToNet {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    out: SendBatch,
}

impl TunToNet {
    fn new(tun: &SyncDevice, udp: &UdpSocket, mtu: usize) -> Self {
        let v6 = udp.local_addr().is_ok_and(|a| a.is_ipv6());
        let segment = mtu.max(1500) + 256;
        let count = if tun.tcp_gso() { IDEAL_BATCH_SIZE } else { 1 };
        TunToNet {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65_535],
            bufs: (0..count).map(|_| vec![0u8; segment]).collect(),
            sizes: vec![0; count],
            // Slots fit any segment plus the 32 bytes of WireGuard overhead.
            out: SendBatch::new(IDEAL_BATCH_SIZE, segment + 32, v6),
        }
    }

    fn run(
        mut self,
        state: &VpnState,
        udp: &UdpSocket,
        tun: &SyncDevice,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()> {
        let fd = udp.as_raw_fd();
        let tun_fd = tun.as_raw_fd();
        while !shutdown.is_cancelled() {
            let mut poll = libc::pollfd {
                fd: tun_fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut poll, 1, udp::POLL.as_millis() as libc::c_int) };
            if ready <= 0 {
                continue;
            }
            if poll.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                // Nothing will ever come again (poll would return at once,
                // forever): end, and take the other thread and tasks along.
                shutdown.cancel();
                return Err(std::io::Error::other(
                    "the TUN interface went away (deleted or detached)",
                ));
            }
            let n = match tun.recv_multiple(&mut self.original, &mut self.bufs, &mut self.sizes, 0) {
                Ok(n) => n,
                Err(e) if gone(&e) => {
                    shutdown.cancel();
                    return Err(e);
                }
                // A malformed offload header from the kernel: skip that read.
                Err(_) => continue,
            };
            let table = state.table.load();
            for i in 0..n {
                let packet = &self.bufs[i][..self.sizes[i].min(self.bufs[i].len())];
                let Some(peer) = Tunn::dst_address(packet).and_then(|dst| table.route(dst)) else {
                    continue;
                };
                let Some(endpoint) = peer.endpoint() else { continue };
                if self.out.is_full() {
                    self.out.flush(fd);
                }
                let slot = self.out.slot();
                if packet.len() + 32 > slot.len() {
                    continue;
                }
                let len = match peer.tunn.lock().encapsulate(packet, slot) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => continue,
                };
                self.out.commit(len, endpoint);
            }
            drop(table);
            self.out.flush(fd);
        }
        Ok(())
    }
}

/// True for a TUN read error that means the interface is gone for good.
fn gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::EBADF | libc::ENODEV | libc::ENXIO)
    )
}

/// Drives every peer's timers (rekey, keepalive, handshake retries, expiry) and
/// resets the shared handshake counter once a second.
pub async fn timers(state: Arc<VpnState>, udp: Arc<UdpSocket>, shutdown: CancellationToken, tick: Duration) {
    let fd = udp.as_raw_fd();
    let v6 = udp.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut buf = vec![0u8; SCRATCH];
    let mut last_reset = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        {
            let table = state.table.load();
            for entry in table.entries() {
                let peer = &entry.peer;
                let mut tunn = peer.tunn.lock();
                match tunn.update_timers(&mut buf) {
                    TunnResult::WriteToNetwork(out) => {
                        if let Some(endpoint) = peer.endpoint() {
                            udp::send_now(fd, v6, out, endpoint);
                        }
                    }
                    // The session is over; the laptop initiates a new one when it
                    // has traffic (we are the responder and keep no queue).
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                    _ => {}
                }
            }
        }
        if last_reset.elapsed() >= Duration::from_secs(1) {
            state.limiter.reset_count();
            last_reset = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_buckets_allow_a_burst_then_the_rate() {
        let mut b = InitBuckets::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let allowed = (0..20).filter(|_| b.allow(ip)).count();
        assert_eq!(allowed, INIT_BURST as usize, "a burst of 5, then nothing at once");
        assert!(
            b.allow("192.0.2.2".parse().unwrap()),
            "other sources have their own bucket"
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(b.allow(ip), "the bucket refills at 20/s");
    }

    /// The table is bounded, and filling it with new sources neither resets
    /// the sources already spent nor refuses the newcomers.
    #[test]
    fn init_buckets_stay_bounded_without_resetting_spent_sources() {
        // One instant for every call: no refill, whatever the machine's speed.
        let now = Instant::now();
        let mut b = InitBuckets::default();
        for i in 0..MAX_SOURCES as u32 {
            let ip = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            while b.allow_at(ip, now) {}
        }
        assert_eq!(b.buckets.len(), MAX_SOURCES);
        let spent: IpAddr = "10.0.0.7".parse().unwrap();
        let later = now + Duration::from_micros(1);
        assert!(!b.allow_at(spent, later), "spent, and now the most recently seen");
        for i in 0..100u32 {
            let newcomer = IpAddr::from((0xc000_0200 + i).to_be_bytes());
            assert!(b.allow_at(newcomer, later), "a new source gets its burst");
            assert!(b.buckets.len() <= MAX_SOURCES);
        }
        assert!(!b.allow_at(spent, later), "a flood of new sources did not refill it");
    }

    #[test]
    fn message_fields_are_read_without_panics() {
        assert_eq!(message_type(&[]), None);
        assert_eq!(message_type(&[4, 0, 0]), None);
        assert_eq!(message_type(&[4, 0, 0, 0]), Some(DATA));
        assert_eq!(receiver(&[4, 0, 0, 0, 1, 2], 4), None);
        assert_eq!(receiver(&[4, 0, 0, 0, 1, 0, 0, 0], 4), Some(1));
    }
}
