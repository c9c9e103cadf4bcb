//! Client connections: the caps that bound how many there are (in total and per
//! source address), and what each connection's watchdog reads to cut a client
//! that stalls, an idle h2 session, or a handshake that never ends.
//!
//! ```text
//!  accept ─▶ ConnLimits::admit(ip) ──Err──▶ closed at once (counted; a log line ≤ every 10 s)
//!               └─Ok(ConnSlot) ─▶ ClientIo { stream, Activity, slot }
//!                   (the slot is freed when the IO is dropped, also when an
//!                    Upgrade hands the IO on to the splice)
//!
//!  ClientIo      bytes read (h2 preface), writes blocked on a full socket ─┐
//!  ClientBody    response chunk handed to hyper, next one not asked for ───┼─▶ Activity
//!  RequestBody   waiting for the client's next request-body chunk ─────────┤     │
//!  StreamGuard   requests being answered (h2 idle), a first request seen ──┘     ▼
//!                                       watch(): Cut::{Stalled, Idle, Handshake}
//! ```
//!
//! "Stalled" is HAProxy's `timeout client`: the lb waits for the client (a
//! response it does not read, a request body it does not send) and nothing has
//! moved for `client_timeout`. Reads alone are not progress: an h2 client
//! answering PINGs while it leaves a 8 MB body unread is still stalled.
//!
//! The per-source map holds an entry only while that source has a connection
//! open, so it is bounded by the total cap.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::body::{BoxError, ProxyBody};
use crate::net::sources::{SourceSlot, Sources};
use crate::report::throttle::LogEvery;

/// Default total cap when the open-file limit cannot be read.
pub const FALLBACK_MAX_CONNECTIONS: usize = 4096;
/// The derived total cap is never above this.
pub const MAX_DERIVED_CONNECTIONS: usize = 20_000;
/// File descriptors kept for everything but client connections (backends,
/// Consul, checks, listeners) when the cap is derived from the limit.
const FD_RESERVE: u64 = 1024;
/// At most one log line about refused connections per this many ms.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(10);
/// The HTTP/2 client connection preface (RFC 9113 3.4) is this long.
const H2_PREFACE_LEN: u64 = 24;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections` reached.
    Total,
    /// `max_connections_per_source` reached for this source.
    Source,
}

/// The client connection caps, shared by every proxy thread and TCP listener.
#[derive(Debug)]
pub struct ConnLimits {
    /// Total cap (set at start from the configuration).
    max_total: AtomicUsize,
    /// Per-source cap.
    max_per_source: AtomicUsize,
    /// Connections open now.
    open: AtomicUsize,
    /// Open connections per source.
    per_source: Arc<Sources>,
    /// Refused because the total cap was reached.
    refused_total: AtomicU64,
    /// Refused because their source was at its cap.
    refused_source: AtomicU64,
    /// Refusals are logged at most once per [`REFUSED_LOG_EVERY`].
    refused_log: LogEvery,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self::new(FALLBACK_MAX_CONNECTIONS, 1000)
    }
}

/// A copy of the connection counters.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ConnSnapshot {
    /// Client connections open now.
    pub open: usize,
    /// Source addresses with a connection open now.
    pub sources: usize,
    /// The total cap.
    pub max: usize,
    /// The per-source cap.
    pub max_per_source: usize,
    /// Connections refused at the total cap since start.
    pub refused_total: u64,
    /// Connections refused at their source's cap since start.
    pub refused_per_source: u64,
}

impl ConnLimits {
    /// Caps of `max_total` connections, `max_per_source` from one source.
    pub fn new(max_total: usize, max_per_source: usize) -> Self {
        Self {
            max_total: AtomicUsize::new(max_total),
            max_per_source: AtomicUsize::new(max_per_source),
            open: AtomicUsize::new(0),
            per_source: Arc::new(Sources::default()),
            refused_total: AtomicU64::new(0),
            refused_source: AtomicU64::new(0),
            refused_log: LogEvery::new(REFUSED_LOG_EVERY),
        }
    }

    /// Sets the caps (at start, from the configuration).
    pub fn set_limits(&self, max_total: usize, max_per_source: usize) {
        self.max_total.store(max_total.max(1), Ordering::Relaxed);
        self.max_per_source.store(max_per_source.max(1), Ordering::Relaxed);
    }

    /// A slot for a new connection from `ip`, or why there is none (counted and
    /// logged here; the caller just closes the connection).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refused> {
        let max_total = self.max_total.load(Ordering::Relaxed);
        if self.open.fetch_add(1, Ordering::AcqRel) >= max_total {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused(Refused::Total, ip);
            return Err(Refused::Total);
        }
        let max_per_source = self.max_per_source.load(Ordering::Relaxed);
        let Some(source) = self.per_source.take(ip, max_per_source) else {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused(Refused::Source, ip);
            return Err(Refused::Source);
        };
        Ok(ConnSlot {
            limits: self.clone(),
            _source: source,
        })
    }

    fn refused(&self, why: Refused, ip: IpAddr) {
        match why {
            Refused::Total => &self.refused_total,
            Refused::Source => &self.refused_source,
        }
        .fetch_add(1, Ordering::Relaxed);
        if let Some(unlogged) = self.refused_log.event() {
            let (max, reason) = match why {
                Refused::Total => (self.max_total.load(Ordering::Relaxed), "lb.max_connections"),
                Refused::Source => (
                    self.max_per_source.load(Ordering::Relaxed),
                    "lb.max_connections_per_source",
                ),
            };
            tracing::warn!(
                refused = unlogged,
                last_source = %ip,
                cap = max,
                reason,
                "lb: client connections refused at their cap (closed at once)"
            );
        }
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> ConnSnapshot {
        ConnSnapshot {
            open: self.open.load(Ordering::Relaxed),
            sources: self.per_source.len(),
            max: self.max_total.load(Ordering::Relaxed),
            max_per_source: self.max_per_source.load(Ordering::Relaxed),
            refused_total: self.refused_total.load(Ordering::Relaxed),
            refused_per_source: self.refused_source.load(Ordering::Relaxed),
        }
    }
}

/// The total cap when the configuration leaves it to the open-file limit:
/// two descriptors per proxied connection (client and backend) after a reserve.
pub fn derived_max_connections(nofile: Option<u64>) -> usize {
    match nofile {
        Some(n) => usize::try_from(n.saturating_sub(FD_RESERVE) / 2)
            .unwrap_or(usize::MAX)
            .clamp(64, MAX_DERIVED_CONNECTIONS),
        None => FALLBACK_MAX_CONNECTIONS,
    }
}

/// Raises the soft open-file limit to the hard one (as Go's runtime and nginx's
/// `worker_rlimit_nofile` do) and returns the soft limit in force.
pub fn raise_nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Some(lim.rlim_cur)
}

/// One admitted connection's place under the caps; given back when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    /// Its source's slot (given back when this drops).
    _source: SourceSlot,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why the watchdog cut a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The client neither sent nor read for `client_timeout` while the lb waited for it.
    Stalled,
    /// An h2 session without an open stream for `idle_timeout`.
    Idle,
    /// No first request (HTTP/1.1) or connection preface (h2) within `handshake_timeout`.
    Handshake,
}

/// The timeouts a connection's watchdog applies, in ms.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// `client_timeout`.
    pub client_ms: u64,
    /// `idle_timeout`: an h2 session without a stream this long is closed.
    pub idle_ms: u64,
    /// HTTP/1.1: the smaller of `client_timeout` and `idle_timeout`, from the
    /// moment no request is being answered (the accept, or the last response
    /// done) until the next request head is complete: bounds keep-alive idling
    /// and slow request heads alike. One deadline per connection, looked at by
    /// its watchdog, instead of a timer armed and cancelled per request.
    pub head_ms: u64,
    /// `handshake_timeout`, from the accept.
    pub handshake_ms: u64,
}

impl Timeouts {
    /// From the configured durations.
    pub fn new(client: Duration, idle: Duration, handshake: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        Self {
            client_ms: ms(client),
            idle_ms: ms(idle),
            head_ms: ms(client.min(idle)),
            handshake_ms: ms(handshake),
        }
    }
}

/// What one client connection has been doing, as its watchdog needs to know.
/// Times are ms since the accept.
#[derive(Debug)]
pub struct Activity {
    /// When the connection was accepted.
    start: Instant,
    /// HTTP/2 (idle sessions and the preface are watched) or HTTP/1.1.
    h2: bool,
    /// The last time the client showed it was there: it took a response chunk,
    /// sent a request-body chunk, or drained a blocked write; also when a wait
    /// for it began.
    last_progress_ms: AtomicU64,
    /// Bodies waiting for the client right now.
    waiting: AtomicU32,
    /// The last write to the client could not go out (its socket is full).
    write_blocked: AtomicBool,
    /// Requests being answered (their response body not yet done).
    streams: AtomicU32,
    /// When `streams` last fell to 0 (or the accept).
    idle_since_ms: AtomicU64,
    /// A request has arrived (HTTP/1.1: its head is complete).
    first_request: AtomicBool,
    /// Bytes read from the client, counted until the h2 preface is in.
    read: AtomicU64,
    preface_seen: AtomicBool,
}

/// The watchdog's verdict at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Cut the connection.
    Cut(Cut),
    /// Look again at this time (ms since the accept).
    WakeAt(u64),
}

impl Activity {
    /// A connection accepted at `start`.
    pub fn new(start: Instant, h2: bool) -> Arc<Self> {
        Arc::new(Self {
            start,
            h2,
            last_progress_ms: AtomicU64::new(0),
            waiting: AtomicU32::new(0),
            write_blocked: AtomicBool::new(false),
            streams: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            first_request: AtomicBool::new(false),
            read: AtomicU64::new(0),
            preface_seen: AtomicBool::new(!h2),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn touch(&self) {
        self.last_progress_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn wait_started(&self) {
        self.touch();
        self.waiting.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn wait_ended(&self) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    fn on_read(&self, n: usize) {
        if !self.preface_seen.load(Ordering::Relaxed) {
            let total = self.read.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            if total >= H2_PREFACE_LEN {
                self.preface_seen.store(true, Ordering::Relaxed);
            }
        }
    }

    fn on_write(&self, pending: bool) {
        let blocked = self.write_blocked.load(Ordering::Relaxed);
        if pending && !blocked {
            // The wait for the client starts now.
            self.touch();
            self.write_blocked.store(true, Ordering::Relaxed);
        } else if !pending && blocked {
            // The client read what was stuck.
            self.touch();
            self.write_blocked.store(false, Ordering::Relaxed);
        }
    }

    /// A request arrived: counted until its response body is done.
    pub fn stream_started(self: &Arc<Self>) -> StreamGuard {
        self.first_request.store(true, Ordering::Relaxed);
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    /// The verdict at `now` (ms since the accept).
    pub fn check(&self, now: u64, t: &Timeouts) -> Verdict {
        let mut wake = now.saturating_add(t.client_ms);
        let handshaking = if self.h2 {
            !self.preface_seen.load(Ordering::Relaxed)
        } else {
            !self.first_request.load(Ordering::Relaxed)
        };
        if handshaking {
            if now >= t.handshake_ms {
                return Verdict::Cut(Cut::Handshake);
            }
            wake = wake.min(t.handshake_ms);
        }
        // Idle: an h2 session without a stream, an HTTP/1.1 connection between
        // requests (or in a slow head). While a request is answered, look again
        // after `limit`: nothing wakes the watchdog when it ends.
        let limit = if self.h2 { t.idle_ms } else { t.head_ms };
        if self.streams.load(Ordering::Relaxed) == 0 {
            let deadline = self.idle_since_ms.load(Ordering::Relaxed).saturating_add(limit);
            if now >= deadline {
                return Verdict::Cut(Cut::Idle);
            }
            wake = wake.min(deadline);
        } else {
            wake = wake.min(now.saturating_add(limit));
        }
        if self.waiting.load(Ordering::Relaxed) > 0 || self.write_blocked.load(Ordering::Relaxed) {
            let deadline = self
                .last_progress_ms
                .load(Ordering::Relaxed)
                .saturating_add(t.client_ms);
            if now >= deadline {
                return Verdict::Cut(Cut::Stalled);
            }
            wake = wake.min(deadline);
        }
        Verdict::WakeAt(wake)
    }
}

/// Resolves when the connection should be cut. Wakes once per `client_timeout`
/// when nothing is pending (a stall that begins in between is still caught
/// exactly `client_timeout` after it began), else at the nearest deadline.
pub async fn watch(activity: &Activity, timeouts: Timeouts) -> Cut {
    loop {
        match activity.check(activity.now_ms(), &timeouts) {
            Verdict::Cut(cut) => return cut,
            Verdict::WakeAt(ms) => tokio::time::sleep_until(activity.start + Duration::from_millis(ms)).await,
        }
    }
}

/// Counts one request until its response body is done (or dropped).
#[derive(Debug)]
pub struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle_since_ms.store(self.0.now_ms(), Ordering::Relaxed);
        }
    }
}

/// The client's stream, reporting reads and blocked writes to its [`Activity`]
/// and holding the connection's [`ConnSlot`] for as long as the stream lives.
pub struct ClientIo<S> {
    inner: S,
    activity: Arc<Activity>,
    _slot: ConnSlot,
}

impl<S> ClientIo<S> {
    /// Wraps an accepted (and, for HTTPS, handshaken) stream.
    pub fn new(inner: S, activity: Arc<Activity>, slot: ConnSlot) -> Self {
        Self {
            inner,
            activity,
            _slot: slot,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.activity.on_read(buf.filled().len() - before);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.activity.on_write(r.is_pending());
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.activity.on_write(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.activity.on_write(r.is_pending());
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body on its way to the client: between handing hyper a chunk
/// and hyper asking for the next one, the lb waits for the client to read.
pub struct ClientBody {
    inner: ProxyBody,
    activity: Arc<Activity>,
    waiting: bool,
    _stream: StreamGuard,
}

impl ClientBody {
    /// `inner`, answering the request `stream` counts.
    pub fn new(inner: ProxyBody, stream: StreamGuard) -> Self {
        Self {
            inner,
            activity: stream.0.clone(),
            waiting: false,
            _stream: stream,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.waiting {
            // hyper is back for more: the client took the last chunk.
            this.waiting = false;
            this.activity.wait_ended();
        }
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &r
            && !this.inner.is_end_stream()
        {
            this.waiting = true;
            this.activity.wait_started();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if self.waiting {
            self.activity.wait_ended();
        }
    }
}

/// A request body coming from the client: while the backend side asks for a
/// chunk the client has not sent, the lb waits for the client.
pub struct RequestBody {
    inner: Incoming,
    activity: Arc<Activity>,
    waiting: bool,
}

impl RequestBody {
    /// The body of a request on the connection `activity` watches.
    pub fn new(inner: Incoming, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            waiting: false,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match (&r, this.waiting) {
            (Poll::Pending, false) => {
                this.waiting = true;
                this.activity.wait_started();
            }
            (Poll::Ready(_), true) => {
                this.waiting = false;
                this.activity.wait_ended();
                this.activity.touch();
            }
            (Poll::Ready(_), false) => this.activity.touch(),
            (Poll::Pending, true) => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if self.waiting {
            self.activity.wait_ended();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_total_cap_holds_and_slots_come_back() {
        let limits = Arc::new(ConnLimits::new(3, 10));
        let slots: Vec<_> = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .into_iter()
            .map(|a| limits.admit(ip(a)).expect("under the cap"))
            .collect();
        assert_eq!(limits.admit(ip("192.0.2.4")).unwrap_err(), Refused::Total);
        assert_eq!(limits.snapshot().open, 3);
        drop(slots);
        let s = limits.snapshot();
        assert_eq!((s.open, s.sources, s.refused_total), (0, 0, 1), "{s:?}");
        assert!(limits.admit(ip("192.0.2.4")).is_ok());
    }

    #[test]
    fn the_per_source_cap_holds_and_the_map_keeps_only_open_sources() {
        let limits = Arc::new(ConnLimits::new(100, 2));
        let a = [
            limits.admit(ip("192.0.2.1")).unwrap(),
            limits.admit(ip("192.0.2.1")).unwrap(),
        ];
        assert_eq!(limits.admit(ip("192.0.2.1")).unwrap_err(), Refused::Source);
        let b = limits.admit(ip("192.0.2.2")).expect("another source is not affected");
        // One IPv6 /64 is one source; another /64 is not.
        let v6 = [
            limits.admit(ip("2001:db8::1")).unwrap(),
            limits.admit(ip("2001:db8::ffff:2")).unwrap(),
        ];
        assert_eq!(limits.admit(ip("2001:db8::3")).unwrap_err(), Refused::Source);
        assert!(limits.admit(ip("2001:db8:0:1::1")).is_ok());
        // IPv4-mapped counts as the IPv4 address.
        drop(b);
        let mapped = [
            limits.admit(ip("::ffff:192.0.2.2")).unwrap(),
            limits.admit(ip("192.0.2.2")).unwrap(),
        ];
        assert_eq!(limits.admit(ip("::ffff:192.0.2.2")).unwrap_err(), Refused::Source);
        assert_eq!(limits.snapshot().sources, 3);
        drop((a, v6, mapped));
        let s = limits.snapshot();
        assert_eq!((s.open, s.sources), (0, 0), "no entry outlives its connections");
        assert_eq!(s.refused_per_source, 3);

        // Many sources one after the other: the map never holds more than are open.
        for i in 0..10_000u32 {
            let slot = limits.admit(IpAddr::from(i.to_be_bytes())).unwrap();
            drop(slot);
        }
        assert_eq!(limits.snapshot().sources, 0);
    }

    #[test]
    fn the_derived_cap_follows_the_open_file_limit() {
        assert_eq!(derived_max_connections(Some(20_000)), 9_488);
        assert_eq!(derived_max_connections(Some(1_048_576)), MAX_DERIVED_CONNECTIONS);
        assert_eq!(derived_max_connections(Some(1024)), 64, "never below a floor");
        assert_eq!(derived_max_connections(None), FALLBACK_MAX_CONNECTIONS);
    }

    const T: Timeouts = Timeouts {
        client_ms: 1_000,
        idle_ms: 500,
        head_ms: 400,
        handshake_ms: 300,
    };

    #[tokio::test]
    async fn h1_waits_for_the_first_request_then_for_stalls_only() {
        let a = Activity::new(Instant::now(), false);
        assert_eq!(a.check(0, &T), Verdict::WakeAt(300));
        assert_eq!(a.check(300, &T), Verdict::Cut(Cut::Handshake));
        let guard = a.stream_started();
        // A request being answered, nothing pending: no idle cut, but a look
        // again after head_ms (its end wakes nothing).
        assert_eq!(a.check(10_000, &T), Verdict::WakeAt(10_400));
        // A response chunk handed over at 10 s and not taken.
        a.last_progress_ms.store(10_000, Ordering::Relaxed);
        a.waiting.store(1, Ordering::Relaxed);
        assert_eq!(a.check(10_700, &T), Verdict::WakeAt(11_000));
        assert_eq!(a.check(11_000, &T), Verdict::Cut(Cut::Stalled));
        a.waiting.store(0, Ordering::Relaxed);
        // A write blocked on a full socket is a stall too.
        a.write_blocked.store(true, Ordering::Relaxed);
        assert_eq!(a.check(11_000, &T), Verdict::Cut(Cut::Stalled));
        a.on_write(false);
        assert!(matches!(a.check(11_000, &T), Verdict::WakeAt(_)), "drained: progress");
        drop(guard);
        // Answered: keep-alive idling (and the next head) gets head_ms from now.
        let since = a.idle_since_ms.load(Ordering::Relaxed);
        assert_eq!(a.check(since, &T), Verdict::WakeAt(since + 400));
        assert_eq!(a.check(since + 400, &T), Verdict::Cut(Cut::Idle));
        let _next = a.stream_started();
        assert_eq!(
            a.check(since + 400, &T),
            Verdict::WakeAt(since + 800),
            "the next request came"
        );
    }

    #[tokio::test]
    async fn h2_needs_its_preface_and_an_open_stream() {
        let a = Activity::new(Instant::now(), true);
        a.on_read(10);
        assert_eq!(a.check(0, &T), Verdict::WakeAt(300));
        assert_eq!(a.check(300, &T), Verdict::Cut(Cut::Handshake), "10 of 24 preface bytes");
        a.on_read(14);
        assert_eq!(a.check(300, &T), Verdict::WakeAt(500));
        assert_eq!(a.check(500, &T), Verdict::Cut(Cut::Idle), "preface, then no stream");
        let guard = a.stream_started();
        assert_eq!(a.check(5_000, &T), Verdict::WakeAt(5_500), "a stream open: not idle");
        drop(guard);
        let since = a.idle_since_ms.load(Ordering::Relaxed);
        assert_eq!(a.check(since, &T), Verdict::WakeAt(since + 500));
        assert_eq!(a.check(since + 500, &T), Verdict::Cut(Cut::Idle));
    }

    /// A body of chunks that says it has ended only once they are all out.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn bodies_count_as_waiting_until_taken_or_dropped() {
        use http_body_util::BodyExt;
        let a = Activity::new(Instant::now(), true);
        let inner = Chunks([Bytes::from_static(b"one"), Bytes::from_static(b"two")].into()).boxed();
        let mut body = ClientBody::new(inner, a.stream_started());
        assert_eq!(a.streams.load(Ordering::Relaxed), 1);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "one");
        assert_eq!(a.waiting.load(Ordering::Relaxed), 1, "handed over, not asked for again");
        let _ = body.frame().await.unwrap().unwrap();
        assert_eq!(a.waiting.load(Ordering::Relaxed), 1);
        drop(body);
        assert_eq!(a.waiting.load(Ordering::Relaxed), 0, "a dropped body waits for nobody");
        assert_eq!(a.streams.load(Ordering::Relaxed), 0);
    }
}
