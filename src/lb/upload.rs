//! Request bodies on their way in: read up to `body_buffer_bytes` before an
//! instance is chosen, so a slow upload waits without holding a maxconn slot;
//! timed, so a body that trickles in, or a request that never ends, is cut.
//!
//! ```text
//!  client body (hyper Incoming) ─▶ client::RequestBody (the watchdog's stall view)
//!     ─▶ ClockedBody: min_body_rate (per window of waiting) and request_timeout ─Err─▶ 408
//!     ─▶ read_prefix: chunks kept as they came (no copy) until the body ends or
//!        body_buffer_bytes are in; every chunk reserved in the BodyBudget
//!        (all requests together: body_buffer_total_bytes; when it is spent,
//!        the request goes on with what it has and streams the rest)
//!  instance chosen ─▶ ForwardBody: the buffered chunks (their reservation given
//!     back as each goes to the backend), then the rest of the ClockedBody
//! ```
//!
//! The rate rule is Apache mod_reqtimeout's `MinRate` without its banked
//! credit: every [`RATE_WINDOW`] the lb spends waiting for the client, at least
//! `min_body_rate × RATE_WINDOW` bytes must come. Only time spent waiting for the
//! client counts (not time the lb spent queued for an instance or a slow backend
//! spent not reading), and bytes beyond one window's quota are not carried over,
//! so a client cannot send fast once and then trickle for minutes.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::client::RequestBody;

/// The window of waiting over which `min_body_rate` is measured.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Why a request body was not (or not wholly) forwarded.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Reading the client's body failed (it went away, or sent a bad chunk).
    #[error("could not read the request body: {0}")]
    Client(#[source] hyper::Error),
    /// The client's connection failed or closed before the body was in (the
    /// lb's own HTTP/1.1 path).
    #[error("the client went away during the request body: {0}")]
    ClientGone(#[source] std::io::Error),
    /// A chunked body broke RFC 9112's rules (the lb's own HTTP/1.1 path).
    #[error("a malformed chunked request body: {0}")]
    Chunked(#[source] super::h1::chunked::ChunkError),
    /// Less than `min_body_rate × RATE_WINDOW` bytes in a window of waiting.
    #[error("the request body came slower than lb.min_body_rate")]
    TooSlow,
    /// The request was not complete within `request_timeout`.
    #[error("the request was not complete within lb.request_timeout")]
    Deadline,
}

impl BodyError {
    /// The body error behind a backend session's error, when one is: the
    /// session fails with it when the body it was sending is cut.
    pub fn behind<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if let Some(found) = e.downcast_ref::<BodyError>() {
                return Some(found);
            }
            cause = e.source();
        }
        None
    }
}

/// The memory all requests' buffered bodies may take together
/// (`body_buffer_total_bytes`), shared by every proxy thread.
#[derive(Debug)]
pub struct BodyBudget {
    used: AtomicUsize,
    max: AtomicUsize,
    /// Requests that found the budget spent and streamed the rest of their body.
    pub spent: AtomicU64,
}

impl Default for BodyBudget {
    fn default() -> Self {
        Self::new(super::settings::DEFAULT_BODY_BUFFER_TOTAL)
    }
}

impl BodyBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            spent: AtomicU64::new(0),
        }
    }

    /// Sets the budget (at start, from the configuration).
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Takes `n` bytes of the budget, unless that would go over it.
    fn try_take(&self, n: usize) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= max)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes of buffered bodies held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The budget.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }
}

/// Bytes of the [`BodyBudget`] one request holds; given back when dropped.
pub struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Reservation {
    /// Nothing reserved yet from `budget`.
    pub fn new(budget: &Arc<BodyBudget>) -> Self {
        Self {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Reserves `n` more bytes, unless the budget would go over; a refusal is
    /// counted in [`BodyBudget::spent`].
    pub fn try_add(&mut self, n: usize) -> bool {
        if self.budget.try_take(n) {
            self.bytes += n;
            true
        } else {
            self.budget.spent.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Gives back `n` of the bytes (their chunk has gone on).
    pub fn release(&mut self, n: usize) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        self.budget.give_back(n);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// The limits on one request's body, from `[lb]`.
#[derive(Debug, Clone, Copy)]
pub struct BodyRules {
    /// Bytes read before an instance is chosen (`body_buffer_bytes`).
    pub buffer: usize,
    /// Bytes that must come per [`RATE_WINDOW`] of waiting (`min_body_rate × 5 s`).
    pub quota: u64,
    /// The whole request's deadline, from its head (`request_timeout`).
    pub request_timeout: Duration,
}

impl BodyRules {
    /// From the configured values.
    pub fn new(buffer: usize, min_rate: u64, request_timeout: Duration) -> Self {
        Self {
            buffer,
            quota: min_rate.saturating_mul(RATE_WINDOW.as_secs()).max(1),
            request_timeout,
        }
    }
}

/// `min_body_rate` and `request_timeout` for one request, as arithmetic on
/// the bytes that came and the time spent waiting for them: [`ClockedBody`]
/// (hyper's bodies) and the own HTTP/1.1 path both keep one.
#[derive(Debug, Clone, Copy)]
pub struct BodyClock {
    /// When the whole request must be in.
    deadline: Instant,
    quota: u64,
    /// Bytes since the last full quota.
    window_bytes: u64,
    /// Time spent waiting for the client since the last full quota.
    waited: Duration,
}

impl BodyClock {
    /// The rules for a request that arrived at `started`.
    pub fn new(rules: &BodyRules, started: Instant) -> Self {
        Self {
            deadline: started + rules.request_timeout,
            quota: rules.quota,
            window_bytes: 0,
            waited: Duration::ZERO,
        }
    }

    /// `n` bytes came at `now`, after `waited` spent waiting for them; past the
    /// request's deadline that is an error, also for a client never waited for.
    pub fn arrived(&mut self, n: usize, waited: Duration, now: Instant) -> Result<(), BodyError> {
        self.waited += waited;
        self.window_bytes += n as u64;
        if self.window_bytes >= self.quota {
            // A full quota: a new window of waiting begins.
            self.window_bytes = 0;
            self.waited = Duration::ZERO;
        }
        if now >= self.deadline {
            return Err(BodyError::Deadline);
        }
        Ok(())
    }

    /// When a wait for the client that began at `since` must end.
    pub fn due(&self, since: Instant) -> Instant {
        (since + RATE_WINDOW.saturating_sub(self.waited)).min(self.deadline)
    }

    /// Why a wait that began at `since` fails at `now`, if it does by then.
    pub fn expired(&self, since: Instant, now: Instant) -> Option<BodyError> {
        if now >= self.deadline {
            Some(BodyError::Deadline)
        } else if now >= since + RATE_WINDOW.saturating_sub(self.waited) {
            Some(BodyError::TooSlow)
        } else {
            None
        }
    }
}

/// A request body held to `min_body_rate` and the request's deadline.
pub struct ClockedBody {
    inner: RequestBody,
    clock: BodyClock,
    /// Set while the last poll found nothing (the lb is waiting for the client).
    waiting_since: Option<Instant>,
    /// Wakes the body at its next due time while it waits; made on the first wait.
    timer: Option<Pin<Box<Sleep>>>,
    failed: bool,
}

impl ClockedBody {
    /// `inner` for a request that arrived at `started`.
    pub fn new(inner: RequestBody, rules: &BodyRules, started: Instant) -> Self {
        Self {
            inner,
            clock: BodyClock::new(rules, started),
            waiting_since: None,
            timer: None,
            failed: false,
        }
    }

    fn fail(&mut self, why: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.failed = true;
        Poll::Ready(Some(Err(why)))
    }
}

impl Body for ClockedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let now = Instant::now();
                    let waited = this.waiting_since.take().map_or(Duration::ZERO, |since| now - since);
                    let n = frame.data_ref().map_or(0, Bytes::len);
                    if let Err(why) = this.clock.arrived(n, waited, now) {
                        return this.fail(why);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => return this.fail(BodyError::Client(e)),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    let now = Instant::now();
                    let since = *this.waiting_since.get_or_insert(now);
                    if let Some(why) = this.clock.expired(since, now) {
                        return this.fail(why);
                    }
                    let due = this.clock.due(since);
                    let timer = match &mut this.timer {
                        Some(timer) => {
                            timer.as_mut().reset(due);
                            timer
                        }
                        None => this.timer.insert(Box::pin(tokio::time::sleep_until(due))),
                    };
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Due already: look once more (a chunk may have come), then cut.
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.failed && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The start of a request body, read before an instance is chosen.
pub struct Prefix {
    chunks: Vec<Bytes>,
    trailers: Option<Box<HeaderMap>>,
    /// The whole body is in `chunks` (and `trailers`).
    pub ended: bool,
    reservation: Reservation,
}

/// Reads `body` until it ends or `rules.buffer` bytes are in, taking each
/// chunk's size from `budget` (once the budget is spent, stops with what it
/// has). Cut by the body's own rate and deadline.
pub async fn read_prefix(
    body: &mut ClockedBody,
    rules: &BodyRules,
    budget: &Arc<BodyBudget>,
) -> Result<Prefix, BodyError> {
    let mut prefix = Prefix {
        chunks: Vec::new(),
        trailers: None,
        ended: false,
        reservation: Reservation::new(budget),
    };
    let mut buffered = 0usize;
    while buffered < rules.buffer {
        let Some(frame) = body.frame().await else {
            prefix.ended = true;
            break;
        };
        match frame?.into_data() {
            Ok(data) => {
                let n = data.len();
                buffered += n;
                prefix.chunks.push(data);
                if !prefix.reservation.try_add(n) {
                    // Spent: this chunk (hyper has read it anyway) goes on with
                    // the rest, streamed once an instance is chosen.
                    break;
                }
                if body.is_end_stream() {
                    prefix.ended = true;
                    break;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    prefix.trailers = Some(Box::new(trailers));
                    prefix.ended = true;
                    break;
                }
            }
        }
    }
    Ok(prefix)
}

/// What a backend session is given as the request body: nothing, the buffered
/// prefix, then (for a body longer than `body_buffer_bytes`) the rest as it comes.
pub struct ForwardBody {
    chunks: std::vec::IntoIter<Bytes>,
    reservation: Option<Reservation>,
    trailers: Option<Box<HeaderMap>>,
    rest: Option<ClockedBody>,
}

impl ForwardBody {
    /// No body.
    pub fn empty() -> Self {
        Self {
            chunks: Vec::new().into_iter(),
            reservation: None,
            trailers: None,
            rest: None,
        }
    }

    /// The `prefix`, then what `rest` still brings unless the prefix is the whole body.
    pub fn new(prefix: Prefix, rest: ClockedBody) -> Self {
        let Prefix {
            chunks,
            trailers,
            ended,
            reservation,
        } = prefix;
        Self {
            chunks: chunks.into_iter(),
            reservation: Some(reservation),
            trailers,
            rest: (!ended).then_some(rest),
        }
    }

    fn buffered_len(&self) -> u64 {
        self.chunks.as_slice().iter().map(|c| c.len() as u64).sum()
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.chunks.next() {
            if let Some(r) = &mut this.reservation {
                r.release(chunk.len());
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(rest) = &mut this.rest {
            match Pin::new(rest).poll_frame(cx) {
                Poll::Ready(None) => this.rest = None,
                other => return other,
            }
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(*t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.len() == 0 && self.trailers.is_none() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self.buffered_len();
        match &self.rest {
            None => SizeHint::with_exact(buffered),
            Some(rest) => {
                let hint = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower().saturating_add(buffered));
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper.saturating_add(buffered));
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_never_exceeded_and_comes_back() {
        let budget = Arc::new(BodyBudget::new(100));
        assert!(budget.try_take(60));
        assert!(!budget.try_take(41), "over the total");
        assert!(budget.try_take(40));
        assert_eq!(budget.used(), 100);
        let mut r = Reservation {
            budget: budget.clone(),
            bytes: 100,
        };
        r.release(30);
        assert_eq!(budget.used(), 70);
        drop(r);
        assert_eq!(budget.used(), 0, "the rest given back on drop");
    }

    #[test]
    fn errors_are_found_behind_a_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] BodyError);
        let e = Outer(BodyError::TooSlow);
        assert!(matches!(BodyError::behind(&e), Some(BodyError::TooSlow)));
        let plain = std::io::Error::other("x");
        assert!(BodyError::behind(&plain).is_none());
    }
}
