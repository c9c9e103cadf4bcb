//! The lb's own HTTP/1.1 path: client connections (plain and TLS after ALPN
//! chose HTTP/1.1) are read, framed ([`crate::lb::h1`]), routed and relayed
//! here, with pooled backend connections ([`super::conns`]); hyper keeps
//! HTTP/2. One task per client connection, its buffers made once; a request
//! whose head and body came in one read and whose answer comes in one read
//! costs four syscalls: read, send to the backend, read, send to the client.
//!
//! ```text
//!  client bytes ─▶ head complete (blank line) ─▶ h1::parse_request ──Refusal──▶ 4xx/5xx, close
//!     ─▶ route (authority of the target, else Host) ─▶ Landing | 503 | Backend
//!     Backend: body read first, up to body_buffer_bytes (decoded when chunked;
//!              min_body_rate and request_timeout → 408), as `super::forward` does
//!       ─▶ pick (maxconn, share, queue: `super::reserve_instance`) ─▶ pooled
//!          connection or connect (failed: eject, next instance)
//!       ─▶ head (the lb's headers, see `super`) + buffered body in one write;
//!          a longer body streamed after it (Content-Length, or re-chunked)
//!       ─▶ response head (server_timeout) ─▶ h1::parse_response ─▶ head to the
//!          client (hop-by-hop fields dropped) ─▶ body relayed by its framing
//!          (chunked passed through as checked; to an HTTP/1.0 client decoded)
//!       ─▶ backend connection back to the pool when it stays open and clean
//!     101 to an Upgrade ─▶ both connections spliced (`super::splice`)
//! ```
//!
//! A request that failed on a pooled connection before any byte of an answer
//! goes again on a new connection to the same instance (the backend closed it
//! while idle) when its whole body is still at hand; other failures before an
//! answer try the next instance only for a request without a body, as the
//! hyper path does. The connection's watchdog ([`crate::lb::client::watch`])
//! cuts idle and stalled clients as before; requests report to it (a head
//! complete starts a stream, the response done ends it).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::OwnedRelease;
use super::conns::{AnswerBody, BackendConn, ConnPool, ConnectError};
use super::{ClientConn, MAX_ATTEMPTS, MAX_HEADER_BYTES, NoSlot, Proxy, Release, Share, Tried, request_id_bytes};
use crate::lb::body::{ProxyBody, error_page};
use crate::lb::client::{self, ClientIo};
use crate::lb::h1::{self, Framing, RequestHead, ResponseHead, Version, chunked};
use crate::lb::table::{Backend, BackendInstance};
use crate::lb::upload::{BodyClock, BodyError, ForwardBody, Reservation};

/// Room made in a read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;
/// Largest head parsed (request or response); the request's fields are held
/// to [`MAX_HEADER_BYTES`] as on the hyper path.
const MAX_HEAD: usize = 2 * MAX_HEADER_BYTES;
/// Bytes of a body copied into the head's write rather than written apart.
const COALESCE: usize = 16 * 1024;
/// How long a closing connection keeps reading what the client still sends,
/// so that closing with unread bytes does not reset it before it read the answer.
const LINGER: Duration = Duration::from_millis(500);

/// What follows one exchange on a client connection.
enum Next {
    /// Read the next request.
    KeepAlive,
    /// The head is not complete yet (a blank line came before it did).
    NeedMore,
    /// Close the connection.
    Close,
    /// Close the connection with the request (or its body) unread: what the
    /// client still sends is read for a moment first ([`linger`]).
    Linger,
    /// Splice the client with this backend connection (101 Switching Protocols).
    Tunnel(BackendConn),
}

/// Why a request could not be sent on a backend connection.
pub(super) enum SendError {
    /// The client's body failed (slow, too late, gone, malformed).
    Body(BodyError),
    /// The backend connection failed.
    Backend(std::io::Error),
}

impl From<SendError> for AnswerError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Body(cut) => AnswerError::Body(cut),
            SendError::Backend(io) => AnswerError::Io(io),
        }
    }
}

/// Why relaying an answer stopped early.
enum RelayError {
    /// The backend failed, closed or sent a malformed body.
    Backend,
    /// The backend sent a malformed body before any byte of the answer went
    /// to the client (its head was still held to go out with the body): the
    /// client can still be told 502.
    Unsent,
    /// The client went away.
    Client,
}

/// The request body on the own path: the part read before an instance is
/// chosen (decoded when chunked), and how to read the rest.
struct InBody {
    framing: Framing,
    /// Body data read so far and not yet sent.
    prefix: Vec<u8>,
    /// The whole body is in `prefix`.
    ended: bool,
    /// Content-Length: bytes still to read from the client.
    left: u64,
    decoder: chunked::Decoder,
    clock: BodyClock,
    /// The body budget this request's buffered bytes hold (made with the first).
    reservation: Option<Reservation>,
}

impl InBody {
    /// Holds `n` more buffered bytes in the body budget; false once it is spent.
    fn reserve(&mut self, budget: &Arc<crate::lb::upload::BodyBudget>, n: usize) -> bool {
        self.reservation
            .get_or_insert_with(|| Reservation::new(budget))
            .try_add(n)
    }

    /// The buffered bytes went on: their part of the budget comes back.
    fn sent(&mut self, n: usize) {
        if let Some(r) = &mut self.reservation {
            r.release(n);
        }
    }
}

/// The connection's buffers, made once: the client's bytes, the request head
/// sent to the backend (kept for a retry) and the answer head sent to the client.
struct Buffers {
    client: BytesMut,
    request: Vec<u8>,
    answer: Vec<u8>,
}

impl Proxy {
    /// Serves one HTTP/1.1 client connection until it closes, the watchdog
    /// cuts it, or shutdown (after the request in progress).
    pub(super) async fn own_http1<S>(
        self: Arc<Self>,
        mut io: ClientIo<S>,
        client: ClientConn,
        shutdown: CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut bufs = Buffers {
            client: BytesMut::with_capacity(READ_CHUNK),
            request: Vec::with_capacity(1024),
            answer: Vec::with_capacity(1024),
        };
        let activity = client.activity.clone();
        let end = {
            let exchanges = self.exchanges(&mut io, &mut bufs, &client, &shutdown);
            let watchdog = client::watch(&activity, self.timeouts);
            tokio::pin!(exchanges, watchdog);
            tokio::select! {
                next = &mut exchanges => next,
                cut = &mut watchdog => {
                    self.cut(client.peer, cut);
                    return;
                }
            }
        };
        match end {
            Next::Tunnel(backend) => self.tunnel(io, bufs.client, backend, &shutdown).await,
            Next::Linger => linger(io).await,
            _ => {
                let _ = io.shutdown().await;
            }
        }
    }

    /// Exchanges until the connection is to close or be spliced.
    async fn exchanges<S>(
        &self,
        io: &mut ClientIo<S>,
        bufs: &mut Buffers,
        client: &ClientConn,
        shutdown: &CancellationToken,
    ) -> Next
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut scanned = 0;
        loop {
            if !head_complete(&bufs.client, &mut scanned) {
                if bufs.client.len() >= MAX_HEAD {
                    let _ = self.refuse_h1(io, &mut bufs.answer, h1::Refusal::TooLarge).await;
                    return Next::Close;
                }
                bufs.client.reserve(READ_CHUNK);
                let read = if bufs.client.is_empty() {
                    // Between requests: shutdown closes the connection now.
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Next::Close,
                        r = io.read_buf(&mut bufs.client) => r,
                    }
                } else {
                    io.read_buf(&mut bufs.client).await
                };
                match read {
                    Ok(0) | Err(_) => return Next::Close,
                    Ok(_) => continue,
                }
            }
            match self.exchange(io, bufs, client).await {
                Next::KeepAlive if !shutdown.is_cancelled() => scanned = 0,
                Next::KeepAlive => return Next::Close,
                // A blank line before the request line: read on past it.
                Next::NeedMore => scanned = bufs.client.len(),
                other => return other,
            }
        }
    }

    /// One request, from its complete head in `bufs.client` to its answer sent.
    async fn exchange<S>(&self, io: &mut ClientIo<S>, bufs: &mut Buffers, client: &ClientConn) -> Next
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let started = Instant::now();
        let mut fields = h1::EMPTY_HEADERS;
        let head = match h1::parse_request(&bufs.client, &mut fields, MAX_HEAD) {
            Ok(Some(head)) => head,
            Ok(None) => return Next::NeedMore,
            Err(refusal) => {
                tracing::debug!(peer = %client.peer, %refusal, "lb: request refused");
                let _ = self.refuse_h1(io, &mut bufs.answer, refusal).await;
                return Next::Close;
            }
        };
        let fields = &fields[..head.fields];
        let _stream = client.activity.stream_started();
        let head_bytes: usize =
            fields.iter().map(|f| f.name.len() + f.value.len() + 4).sum::<usize>() + head.target.len();
        if head_bytes > MAX_HEADER_BYTES {
            let _ = self.refuse_h1(io, &mut bufs.answer, h1::Refusal::TooLarge).await;
            return Next::Close;
        }
        let is_head = head.method == "HEAD";
        let has_body = head.framing != Framing::Empty;
        let host = std::str::from_utf8(head.authority).ok().filter(|h| !h.is_empty());
        let path = head.path();
        let route_path = path.split_once('?').map_or(path, |(p, _)| p);
        let backend = match self.destination(host, route_path).await {
            Ok(backend) => backend,
            Err(own) => {
                let wish = (head.keep_alive, has_body);
                return self.answer(io, &mut bufs.answer, own, wish, is_head, started).await;
            }
        };
        let expect_continue = head.expect_continue && has_body;
        let n = self.request_ids.fetch_add(1, Ordering::Relaxed);
        let unique_id = request_id_bytes(self.id_prefix, n);
        write_request_head(&mut bufs.request, &head, fields, client, expect_continue, &unique_id);
        let facts = Exchange {
            backend: &backend,
            started,
            framing: head.framing,
            keep_alive: head.keep_alive,
            upgrade: head.upgrade,
            is_head,
            version: head.version,
        };
        let head_len = head.len;
        bufs.client.advance(head_len);
        self.forward_h1(io, bufs, client, &facts, expect_continue).await
    }

    /// Counts the answer a forwarded request gets, before it is written (a
    /// client that has read it sees it counted).
    fn count(&self, facts: &Exchange<'_>, status: u16) {
        let took = facts.started.elapsed();
        facts.backend.counters.record(status, took);
        self.state.stats.requests.record(status, took);
    }

    /// Forwards one request to its backend and relays the answer, counted;
    /// what follows on the connection.
    async fn forward_h1<S>(
        &self,
        io: &mut ClientIo<S>,
        bufs: &mut Buffers,
        client: &ClientConn,
        facts: &Exchange<'_>,
        expect_continue: bool,
    ) -> Next
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (backend, started) = (facts.backend, facts.started);
        let mut body = InBody {
            framing: facts.framing,
            prefix: Vec::new(),
            ended: facts.framing == Framing::Empty,
            left: match facts.framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            decoder: chunked::Decoder::new(),
            clock: BodyClock::new(&self.body_rules, tokio::time::Instant::from_std(started)),
            reservation: None,
        };
        if !body.ended {
            if expect_continue
                && bufs.client.is_empty()
                && io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
            {
                self.count(facts, 499);
                return Next::Close;
            }
            // Before any slot is taken: a slow upload holds memory, not an instance.
            if let Err(error) = self.read_body_prefix(io, &mut bufs.client, &mut body, client).await {
                return self.body_cut_h1(io, &mut bufs.answer, &error, facts).await;
            }
        }
        let mut tried = Tried::default();
        let maxconn = self.maxconn(backend);
        let share = crate::lb::share::share_cap(maxconn, self.client_share).map(|cap| Share {
            source: client.source,
            cap,
        });
        let mut attempts = 0;
        while attempts < MAX_ATTEMPTS {
            attempts += 1;
            let instance = match self.pick_with_capacity(backend, maxconn, &tried, share).await {
                Ok(instance) => instance,
                Err(why) => match self.no_slot_answer(why, &tried, backend) {
                    Some(resp) => return self.own_answer(io, bufs, resp, facts, &body).await,
                    None => break,
                },
            };
            tried.push(instance.addr);
            if attempts > 1 {
                self.state.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            // Released when the answer is relayed, or on any early return.
            let release = Release {
                health: &instance.health,
                source: share.map(|s| s.source),
            };
            let Some(mut conn) = self.connection_to(backend, instance).await else {
                continue;
            };
            // Sent, and the answer's head read; a pooled connection the backend
            // closed while idle is replaced once, when the body is still at hand.
            let answered = loop {
                let result = match self.send_request(io, bufs, &mut conn, &mut body, client).await {
                    Ok(()) => {
                        let deadline = tokio::time::Instant::now() + self.server_timeout;
                        self.read_answer_head(&mut conn, deadline).await
                    }
                    Err(SendError::Body(error)) => {
                        return self.body_cut_h1(io, &mut bufs.answer, &error, facts).await;
                    }
                    Err(SendError::Backend(error)) => Err(AnswerError::Io(error)),
                };
                match result {
                    Err(AnswerError::Io(_)) if conn.reused && body.ended => {
                        match BackendConn::connect(instance.addr, self.connect_timeout).await {
                            Ok(fresh) => conn = fresh,
                            Err(error) => {
                                self.connect_failed(backend, instance, &error);
                                break Err(AnswerError::Retry);
                            }
                        }
                    }
                    other => break other,
                }
            };
            match answered {
                Ok(()) => {
                    return self.relay_h1(io, bufs, conn, instance.addr, facts, release).await;
                }
                Err(AnswerError::Retry) => continue,
                Err(AnswerError::Timeout) => {
                    let resp = error_page(StatusCode::GATEWAY_TIMEOUT, "The service did not answer in time.");
                    return self.own_answer(io, bufs, resp, facts, &body).await;
                }
                Err(error) => {
                    tracing::debug!(service = %backend.service, addr = %instance.addr, %error, "lb: backend connection failed");
                    if facts.framing != Framing::Empty {
                        let resp = error_page(StatusCode::BAD_GATEWAY, "The service failed while answering.");
                        return self.own_answer(io, bufs, resp, facts, &body).await;
                    }
                }
            }
        }
        let resp = error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "No instance of this service could be reached.",
        );
        self.own_answer(io, bufs, resp, facts, &body).await
    }

    /// A pooled connection to `instance`, else a new one; None when it cannot
    /// be reached (logged, the instance ejected: the caller tries another).
    pub(super) async fn connection_to(&self, backend: &Backend, instance: &BackendInstance) -> Option<BackendConn> {
        if let Some(conn) = self.conns.take(instance.addr) {
            return Some(conn);
        }
        match BackendConn::connect(instance.addr, self.connect_timeout).await {
            Ok(conn) => Some(conn),
            Err(error) => {
                self.connect_failed(backend, instance, &error);
                None
            }
        }
    }

    /// The lb's answer when no slot could be reserved for a request's first
    /// try (`why`): 429 for a client at its share of every instance with room,
    /// 503 when every instance is busy; None when there is none left to try
    /// (the caller's "could not be reached").
    pub(super) fn no_slot_answer(&self, why: NoSlot, tried: &Tried, backend: &Backend) -> Option<Response<ProxyBody>> {
        if tried.len > 0 {
            return None;
        }
        if why == NoSlot::OverShare {
            self.state.stats.over_share.fetch_add(1, Ordering::Relaxed);
            let mut resp = error_page(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many of your requests are in flight on this service.",
            );
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            return Some(resp);
        }
        (!backend.instances.is_empty()).then(|| {
            error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Every instance of this service is busy.",
            )
        })
    }

    /// A connect that failed: logged, the instance ejected.
    pub(super) fn connect_failed(
        &self,
        backend: &Backend,
        instance: &crate::lb::table::BackendInstance,
        error: &ConnectError,
    ) {
        tracing::warn!(service = %backend.service, instance = %instance.id, addr = %instance.addr, %error,
            "lb: cannot connect; instance ejected, trying another");
        self.state.health.eject(&instance.health, self.eject_ms);
    }

    /// Reads the body until it ends, `body_buffer_bytes` are in, or the body
    /// budget is spent.
    async fn read_body_prefix<S>(
        &self,
        io: &mut ClientIo<S>,
        buf: &mut BytesMut,
        body: &mut InBody,
        client: &ClientConn,
    ) -> Result<(), BodyError>
    where
        S: AsyncRead + Unpin,
    {
        let limit = self.body_rules.buffer;
        while !body.ended && body.prefix.len() < limit {
            if buf.is_empty() {
                read_clocked(io, buf, &mut body.clock, client).await?;
            }
            let before = body.prefix.len();
            take_body(buf, body, limit)?;
            let added = body.prefix.len() - before;
            if added > 0 && !body.reserve(&self.state.bodies, added) {
                // Spent: go on with what is in; the rest is streamed.
                break;
            }
        }
        Ok(())
    }

    /// Writes the request head and the buffered body to the backend, then
    /// streams the rest of the body from the client.
    async fn send_request<S>(
        &self,
        io: &mut ClientIo<S>,
        bufs: &mut Buffers,
        conn: &mut BackendConn,
        body: &mut InBody,
        client: &ClientConn,
    ) -> Result<(), SendError>
    where
        S: AsyncRead + Unpin,
    {
        let request = &mut bufs.request;
        let mark = request.len();
        // The framing line: the whole body is in hand (its length is known), or
        // the rest follows, by its length or re-chunked.
        let chunked_out = !body.ended && body.framing == Framing::Chunked;
        if body.framing != Framing::Empty {
            if chunked_out {
                request.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            } else {
                let length = match body.framing {
                    Framing::Length(n) => n,
                    _ => body.prefix.len() as u64,
                };
                request.extend_from_slice(b"Content-Length: ");
                request.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
                request.extend_from_slice(b"\r\n");
            }
        }
        request.extend_from_slice(b"\r\n");
        if chunked_out {
            push_chunk(request, &body.prefix);
        } else {
            request.extend_from_slice(&body.prefix);
        }
        let sent = conn.stream.write_all(request).await;
        request.truncate(mark);
        sent.map_err(SendError::Backend)?;
        if body.ended {
            return Ok(());
        }
        // The rest, as it comes: the buffered part is gone.
        let sent = body.prefix.len();
        body.prefix.clear();
        body.sent(sent);
        let mut out = Vec::with_capacity(READ_CHUNK);
        loop {
            if bufs.client.is_empty() {
                read_clocked(io, &mut bufs.client, &mut body.clock, client)
                    .await
                    .map_err(SendError::Body)?;
            }
            take_body(&mut bufs.client, body, usize::MAX).map_err(SendError::Body)?;
            out.clear();
            if chunked_out {
                if !body.prefix.is_empty() {
                    push_chunk(&mut out, &body.prefix);
                }
                if body.ended {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
            } else {
                out.extend_from_slice(&body.prefix);
            }
            body.prefix.clear();
            conn.stream.write_all(&out).await.map_err(SendError::Backend)?;
            if body.ended {
                return Ok(());
            }
        }
    }

    /// Reads until the answer's head (a final one; 1xx other than 101 are
    /// skipped) is complete in `conn.buf`, by `deadline` (`server_timeout`
    /// after the request went out).
    pub(super) async fn read_answer_head(
        &self,
        conn: &mut BackendConn,
        deadline: tokio::time::Instant,
    ) -> Result<(), AnswerError> {
        let mut scanned = 0;
        loop {
            if head_complete(&conn.buf, &mut scanned) {
                // Interim answers (100 Continue, 103 Early Hints) are not passed on.
                if let Some(skip) = interim_len(&conn.buf) {
                    conn.buf.advance(skip);
                    scanned = 0;
                    continue;
                }
                return Ok(());
            }
            if conn.buf.len() >= MAX_HEAD {
                return Err(AnswerError::Malformed);
            }
            conn.buf.reserve(READ_CHUNK);
            let got_any = !conn.buf.is_empty();
            match tokio::time::timeout_at(deadline, conn.stream.read_buf(&mut conn.buf)).await {
                Err(_) => return Err(AnswerError::Timeout),
                Ok(Ok(0)) if got_any => return Err(AnswerError::Malformed),
                Ok(Ok(0)) => {
                    return Err(AnswerError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(Ok(_)) => conn.reused = false,
                Ok(Err(e)) => return Err(AnswerError::Io(e)),
            }
        }
    }

    /// Sends the answer whose head is in `conn.buf` to the client and relays
    /// its body; the connection goes back to the pool when it can.
    async fn relay_h1<S>(
        &self,
        io: &mut ClientIo<S>,
        bufs: &mut Buffers,
        mut conn: BackendConn,
        addr: std::net::SocketAddr,
        facts: &Exchange<'_>,
        release: Release<'_>,
    ) -> Next
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let method = if facts.is_head { "HEAD" } else { "GET" };
        let mut fields = h1::EMPTY_HEADERS;
        let answer = match h1::parse_response(&conn.buf, &mut fields, MAX_HEAD, method) {
            Ok(Some(answer)) => answer,
            _ => {
                drop(release);
                let resp = error_page(StatusCode::BAD_GATEWAY, "The service sent a malformed answer.");
                return self.answer_closing(io, &mut bufs.answer, resp, facts).await;
            }
        };
        let status = answer.status;
        if status == 101 {
            if !facts.upgrade {
                drop(release);
                let resp = error_page(StatusCode::BAD_GATEWAY, "The service switched protocols unasked.");
                return self.answer_closing(io, &mut bufs.answer, resp, facts).await;
            }
            // The 101 as it came (its Upgrade and Connection fields included).
            let len = answer.len;
            self.count(facts, 101);
            let sent = io.write_all(&conn.buf[..len]).await;
            conn.buf.advance(len);
            drop(release);
            return match sent {
                Ok(()) => Next::Tunnel(conn),
                Err(_) => Next::Close,
            };
        }
        // To an HTTP/1.0 client a chunked body goes decoded, delimited by the close.
        let dechunk = answer.framing == Framing::Chunked && facts.version == Version::Http10;
        let client_keeps = facts.keep_alive && answer.framing != Framing::UntilClose && !dechunk;
        write_answer_head(
            &mut bufs.answer,
            &answer,
            &fields[..answer.fields],
            client_keeps,
            facts.version,
            dechunk,
        );
        let (framing, backend_keeps, len) = (answer.framing, answer.keep_alive, answer.len);
        conn.buf.advance(len);
        self.count(facts, status);
        let relayed = relay_body(io, &mut conn, &mut bufs.answer, framing, dechunk, self.server_timeout).await;
        drop(release);
        let flushed = io.flush().await.is_ok();
        match relayed {
            Ok(()) => {
                if backend_keeps && conn.buf.is_empty() {
                    self.conns.put(addr, conn);
                }
                if client_keeps && flushed {
                    Next::KeepAlive
                } else {
                    Next::Close
                }
            }
            Err(RelayError::Backend) => {
                tracing::debug!(%addr, "lb: the service's answer broke off");
                Next::Close
            }
            // Closing without a byte would leave the client with an empty
            // reply: it gets a 502 instead (counted as the backend's status,
            // which was counted before the body turned out malformed).
            Err(RelayError::Unsent) => {
                tracing::debug!(%addr, "lb: the service sent a malformed body");
                let resp = error_page(StatusCode::BAD_GATEWAY, "The service sent a malformed answer.");
                self.write_own(io, &mut bufs.answer, resp, false, facts.is_head).await;
                Next::Close
            }
            Err(RelayError::Client) => Next::Close,
        }
    }

    /// The lb's own answer to a request it forwarded nowhere: the connection
    /// stays open only when the request had no body left unread.
    async fn own_answer<S>(
        &self,
        io: &mut ClientIo<S>,
        bufs: &mut Buffers,
        resp: Response<ProxyBody>,
        facts: &Exchange<'_>,
        body: &InBody,
    ) -> Next
    where
        S: AsyncWrite + Unpin,
    {
        self.count(facts, resp.status().as_u16());
        let keep_alive = facts.keep_alive && body.ended;
        match self
            .write_own(io, &mut bufs.answer, resp, keep_alive, facts.is_head)
            .await
        {
            Next::Close if !body.ended => Next::Linger,
            next => next,
        }
    }

    /// [`Self::own_answer`] closing the connection.
    async fn answer_closing<S>(
        &self,
        io: &mut ClientIo<S>,
        out: &mut Vec<u8>,
        resp: Response<ProxyBody>,
        facts: &Exchange<'_>,
    ) -> Next
    where
        S: AsyncWrite + Unpin,
    {
        self.count(facts, resp.status().as_u16());
        self.write_own(io, out, resp, false, facts.is_head).await;
        Next::Close
    }

    /// The lb's own answer, counted (requests not forwarded to a backend);
    /// `(keep_alive, has_body)`: the client's wish, and whether a body it sent
    /// is left unread (the connection then closes, lingering).
    async fn answer<S>(
        &self,
        io: &mut ClientIo<S>,
        out: &mut Vec<u8>,
        resp: Response<ProxyBody>,
        (keep_alive, has_body): (bool, bool),
        is_head: bool,
        started: Instant,
    ) -> Next
    where
        S: AsyncWrite + Unpin,
    {
        self.state
            .stats
            .requests
            .record(resp.status().as_u16(), started.elapsed());
        let next = self.write_own(io, out, resp, keep_alive && !has_body, is_head).await;
        if has_body { Next::Linger } else { next }
    }

    /// A refused request head: the status the refusal names, counted; the
    /// connection is then closed.
    async fn refuse_h1<S>(&self, io: &mut ClientIo<S>, out: &mut Vec<u8>, refusal: h1::Refusal) -> Next
    where
        S: AsyncWrite + Unpin,
    {
        let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_REQUEST);
        let message = match refusal {
            h1::Refusal::TooLarge => "The request headers are too large.".to_string(),
            h1::Refusal::DuplicateHost => "The request has more than one Host header.".to_string(),
            other => format!("The request is malformed: {other}."),
        };
        self.state.stats.requests.record(status.as_u16(), Duration::ZERO);
        self.write_own(io, out, error_page(status, &message), false, false)
            .await;
        Next::Linger
    }

    /// The answer to a request whose body was cut (counted by why).
    async fn body_cut_h1<S>(
        &self,
        io: &mut ClientIo<S>,
        out: &mut Vec<u8>,
        error: &BodyError,
        facts: &Exchange<'_>,
    ) -> Next
    where
        S: AsyncWrite + Unpin,
    {
        let resp = self.body_cut(error, http::Version::HTTP_11);
        self.count(facts, resp.status().as_u16());
        self.write_own(io, out, resp, false, facts.is_head).await;
        Next::Linger
    }

    /// Writes a response the lb made itself (error and status pages).
    async fn write_own<S>(
        &self,
        io: &mut ClientIo<S>,
        out: &mut Vec<u8>,
        resp: Response<ProxyBody>,
        keep_alive: bool,
        is_head: bool,
    ) -> Next
    where
        S: AsyncWrite + Unpin,
    {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            if name == http::header::CONNECTION || name == http::header::CONTENT_LENGTH {
                continue;
            }
            push_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
        push_field(
            out,
            b"content-length",
            itoa::Buffer::new().format(body.len()).as_bytes(),
        );
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !is_head {
            out.extend_from_slice(&body);
        }
        let written = io.write_all(out).await.is_ok() && io.flush().await.is_ok();
        if written && keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// Splices a client with the backend that switched protocols for it,
    /// after handing each side what was read ahead from the other.
    async fn tunnel<S>(
        &self,
        mut io: ClientIo<S>,
        ahead: BytesMut,
        mut backend: BackendConn,
        shutdown: &CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if !ahead.is_empty() && backend.stream.write_all(&ahead).await.is_err() {
            return;
        }
        if !backend.buf.is_empty() && (io.write_all(&backend.buf).await.is_err() || io.flush().await.is_err()) {
            return;
        }
        let end = crate::lb::splice::splice(io, backend.stream, self.tunnel_timeout, shutdown).await;
        if end == crate::lb::splice::SpliceEnd::Idle {
            tracing::debug!("lb: upgraded connection idle for tunnel_timeout; closed");
        }
    }
}

/// What the relay needs to know about the request, after its head is gone
/// from the buffer.
struct Exchange<'a> {
    /// Where it goes (its counters count the answer).
    backend: &'a Backend,
    /// When its head was complete.
    started: Instant,
    framing: Framing,
    keep_alive: bool,
    upgrade: bool,
    is_head: bool,
    version: Version,
}

/// Why no usable answer head came.
#[derive(Debug, thiserror::Error)]
pub(super) enum AnswerError {
    /// The client's body failed while it was sent (HTTP/2 clients).
    #[error("{0}")]
    Body(BodyError),
    /// The connection failed or closed before an answer began.
    #[error("{0}")]
    Io(std::io::Error),
    /// The connection closed or overflowed inside the head.
    #[error("a malformed answer")]
    Malformed,
    /// No answer within `server_timeout`.
    #[error("no answer in time")]
    Timeout,
    /// Try the next instance (no connection could be made).
    #[error("no connection")]
    Retry,
}

/// Whether `buf` holds a complete head: a blank line (CRLF CRLF, or a bare LF
/// one, which the parser then refuses). `scanned` keeps where the last look
/// ended, so a head that comes in pieces is scanned once.
fn head_complete(buf: &[u8], scanned: &mut usize) -> bool {
    let from = scanned.saturating_sub(3);
    let mut at = from;
    while let Some(i) = buf[at..].iter().position(|&b| b == b'\n') {
        let lf = at + i;
        match (buf.get(lf + 1), buf.get(lf + 2)) {
            (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => return true,
            _ => at = lf + 1,
        }
    }
    *scanned = buf.len();
    false
}

/// The length of an interim (1xx other than 101) answer head at the start of
/// `buf`, which is complete.
fn interim_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 12 || !buf.starts_with(b"HTTP/1.") || buf[9] != b'1' || &buf[9..12] == b"101" {
        return None;
    }
    let mut fields = h1::EMPTY_HEADERS;
    match h1::parse_response(buf, &mut fields, MAX_HEAD, "GET") {
        Ok(Some(head)) if (100..200).contains(&head.status) && head.status != 101 => Some(head.len),
        _ => None,
    }
}

/// Moves body bytes from the client's buffer into `body.prefix` (decoded when
/// chunked), until the body ends or `limit` bytes are in the prefix.
fn take_body(buf: &mut BytesMut, body: &mut InBody, limit: usize) -> Result<(), BodyError> {
    match body.framing {
        Framing::Empty | Framing::UntilClose => body.ended = true,
        Framing::Length(_) => {
            let room = limit.saturating_sub(body.prefix.len()) as u64;
            let take = body.left.min(buf.len() as u64).min(room) as usize;
            body.prefix.extend_from_slice(&buf[..take]);
            buf.advance(take);
            body.left -= take as u64;
            body.ended = body.left == 0;
        }
        Framing::Chunked => {
            while !buf.is_empty() && body.prefix.len() < limit {
                let step = body.decoder.step(buf).map_err(BodyError::Chunked)?;
                if let Some(data) = step.data {
                    body.prefix.extend_from_slice(&buf[data]);
                }
                buf.advance(step.consumed);
                if step.done {
                    body.ended = true;
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Reads more of the request body from the client, held to the body's clock;
/// the watchdog sees the lb waiting for the client meanwhile.
async fn read_clocked<S>(
    io: &mut ClientIo<S>,
    buf: &mut BytesMut,
    clock: &mut BodyClock,
    client: &ClientConn,
) -> Result<(), BodyError>
where
    S: AsyncRead + Unpin,
{
    buf.reserve(READ_CHUNK);
    let since = tokio::time::Instant::now();
    client.activity.wait_started();
    let read = tokio::time::timeout_at(clock.due(since), io.read_buf(buf)).await;
    client.activity.wait_ended();
    let now = tokio::time::Instant::now();
    match read {
        Ok(Ok(0)) => Err(BodyError::ClientGone(std::io::ErrorKind::UnexpectedEof.into())),
        Ok(Ok(n)) => {
            client.activity.touch();
            clock.arrived(n, now - since, now)
        }
        Ok(Err(e)) => Err(BodyError::ClientGone(e)),
        Err(_) => Err(clock.expired(since, now).unwrap_or(BodyError::TooSlow)),
    }
}

/// Copies the answer's body from the backend to the client by its framing;
/// `out` holds the answer's head, sent with the first bytes of the body.
async fn relay_body<S>(
    io: &mut ClientIo<S>,
    conn: &mut BackendConn,
    out: &mut Vec<u8>,
    framing: Framing,
    dechunk: bool,
    server_timeout: Duration,
) -> Result<(), RelayError>
where
    S: AsyncWrite + Unpin,
{
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut decoder = chunked::Decoder::new();
    // Whether anything (the head first) went to the client yet.
    let mut sent = false;
    loop {
        // What is in the buffer and belongs to this body goes out.
        let done = match framing {
            Framing::Empty => true,
            Framing::Length(_) => {
                let take = left.min(conn.buf.len() as u64) as usize;
                sent |= send_part(io, out, &conn.buf[..take]).await?;
                conn.buf.advance(take);
                left -= take as u64;
                left == 0
            }
            Framing::Chunked => {
                let mut done = false;
                while !conn.buf.is_empty() && !done {
                    let step = match decoder.step(&conn.buf) {
                        Ok(step) => step,
                        Err(_) if !sent => return Err(RelayError::Unsent),
                        Err(_) => return Err(RelayError::Backend),
                    };
                    if dechunk {
                        if let Some(data) = step.data {
                            sent |= send_part(io, out, &conn.buf[data]).await?;
                        }
                    } else {
                        sent |= send_part(io, out, &conn.buf[..step.consumed]).await?;
                    }
                    conn.buf.advance(step.consumed);
                    done = step.done;
                }
                done
            }
            Framing::UntilClose => {
                let all = conn.buf.len();
                sent |= send_part(io, out, &conn.buf[..all]).await?;
                conn.buf.clear();
                false
            }
        };
        if done {
            if !out.is_empty() {
                io.write_all(out).await.map_err(|_| RelayError::Client)?;
                out.clear();
            }
            return Ok(());
        }
        // Before waiting for the backend, the client gets what is pending.
        if !out.is_empty() {
            io.write_all(out).await.map_err(|_| RelayError::Client)?;
            out.clear();
            sent = true;
        }
        conn.buf.reserve(READ_CHUNK);
        match tokio::time::timeout(server_timeout, conn.stream.read_buf(&mut conn.buf)).await {
            Ok(Ok(0)) if framing == Framing::UntilClose => return Ok(()),
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err(RelayError::Backend),
            Ok(Ok(_)) => {}
        }
    }
}

/// Adds `part` to what goes to the client next: copied behind the head when
/// small, else the head is written first and `part` after it. Whether
/// anything was written.
async fn send_part<S>(io: &mut ClientIo<S>, out: &mut Vec<u8>, part: &[u8]) -> Result<bool, RelayError>
where
    S: AsyncWrite + Unpin,
{
    if out.len() + part.len() <= COALESCE {
        out.extend_from_slice(part);
        return Ok(false);
    }
    if !out.is_empty() {
        io.write_all(out).await.map_err(|_| RelayError::Client)?;
        out.clear();
    }
    io.write_all(part).await.map_err(|_| RelayError::Client)?;
    Ok(true)
}

/// Appends `name: value` CRLF.
fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `data` as one chunk (nothing for no data: a zero chunk ends the body).
fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    // The size in hex, written without formatting machinery (no allocation).
    let len = data.len();
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        out.push(b"0123456789ABCDEF"[(len >> (shift * 4)) & 0xF]);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The headers the lb owns (see the table in `super`'s header): the client's
/// lines of these are not forwarded as they are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owned {
    Host,
    XForwardedFor,
    Forwarded,
    Set,
    Expect,
}

/// Which owned header `name` is, if any (ASCII case-insensitive).
fn owned(name: &str) -> Option<Owned> {
    let is = |h: &str| name.eq_ignore_ascii_case(h);
    match name.len() {
        4 if is("host") => Some(Owned::Host),
        6 if is("expect") => Some(Owned::Expect),
        9 if is("forwarded") => Some(Owned::Forwarded),
        9 if is("x-real-ip") => Some(Owned::Set),
        11 if is("x-unique-id") => Some(Owned::Set),
        15 if is("x-forwarded-for") => Some(Owned::XForwardedFor),
        16 if is("x-forwarded-host") => Some(Owned::Set),
        17 if is("x-forwarded-proto") => Some(Owned::Set),
        _ => None,
    }
}

/// One field of a request as the head writer sees it: its name, its value,
/// and whether it is this hop's (not forwarded as it is: hop-by-hop, framing,
/// a name with an underscore).
type Field<'a> = (&'a str, &'a [u8], bool);

/// The request head as the backend gets it from an HTTP/1.1 client, without
/// its framing line and the blank line (added when it is sent).
fn write_request_head(
    out: &mut Vec<u8>,
    head: &RequestHead<'_>,
    fields: &[httparse::Header<'_>],
    client: &ClientConn,
    expect_handled: bool,
    unique_id: &[u8],
) {
    let upgrade = head
        .upgrade
        .then(|| fields.iter().find(|f| f.name.eq_ignore_ascii_case("upgrade")))
        .flatten()
        .map(|f| f.value);
    let fields = || {
        fields
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name, f.value, head.drop.contains(i)))
    };
    let target = head.path().as_bytes();
    let request = (head.method.as_bytes(), target, head.authority);
    write_head_with(out, request, fields, client, expect_handled, unique_id, upgrade);
}

/// The same for an HTTP/2 client's request, from hyper's request: the target's
/// authority (`:authority`) wins over a `host` field.
pub(super) fn write_h2_request_head(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    client: &ClientConn,
    unique_id: &[u8],
) {
    let authority = parts
        .uri
        .authority()
        .map(|a| super::authority_host(a).as_bytes())
        .or_else(|| parts.headers.get(http::header::HOST).map(http::HeaderValue::as_bytes))
        .unwrap_or_default();
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let fields = || {
        parts
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes(), h2_hop_field(name)))
    };
    let request = (parts.method.as_str().as_bytes(), target.as_bytes(), authority);
    write_head_with(out, request, fields, client, false, unique_id, None);
}

/// Whether an HTTP/2 request's field is this hop's: hop-by-hop ones (HTTP/2
/// forbids most of them, `te` is allowed), the framing (written anew), and
/// names with an underscore (dropped as nginx does).
fn h2_hop_field(name: &http::HeaderName) -> bool {
    super::HOP_BY_HOP.contains(name) || name == http::header::CONTENT_LENGTH || name.as_str().contains('_')
}

/// Writes the request line and the fields: the client's own (what `fields`
/// iterates, those marked this hop's left out), then the ones the lb owns (see the table in
/// `super`'s header): Host, X-Forwarded-For and Forwarded appended to,
/// X-Real-IP, X-Forwarded-Proto, X-Forwarded-Host and X-Unique-ID set, and
/// the Upgrade asked for.
fn write_head_with<'f, I: Iterator<Item = Field<'f>>>(
    out: &mut Vec<u8>,
    (method, target, authority): (&[u8], &[u8], &[u8]),
    fields: impl Fn() -> I,
    client: &ClientConn,
    expect_handled: bool,
    unique_id: &[u8],
    upgrade: Option<&[u8]>,
) {
    out.clear();
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !authority.is_empty() {
        push_field(out, b"Host", authority);
    }
    let (mut xff, mut forwarded) = (false, false);
    for (name, value, dropped) in fields() {
        if dropped {
            continue;
        }
        match owned(name) {
            None => push_field(out, name.as_bytes(), value),
            Some(Owned::XForwardedFor) => xff = true,
            Some(Owned::Forwarded) => forwarded = true,
            Some(Owned::Expect) if !expect_handled => push_field(out, name.as_bytes(), value),
            Some(_) => {}
        }
    }
    // Appended to: every line the client sent, in order, then this hop.
    for (present, name, wanted, hop) in [
        (xff, &b"X-Forwarded-For"[..], Owned::XForwardedFor, client.ip.as_bytes()),
        (
            forwarded,
            &b"Forwarded"[..],
            Owned::Forwarded,
            client.forwarded.as_bytes(),
        ),
    ] {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        if present {
            for (field, value, dropped) in fields() {
                if !dropped && owned(field) == Some(wanted) {
                    out.extend_from_slice(value);
                    out.extend_from_slice(b", ");
                }
            }
        }
        out.extend_from_slice(hop);
        out.extend_from_slice(b"\r\n");
    }
    push_field(out, b"X-Real-IP", client.ip.as_bytes());
    push_field(out, b"X-Forwarded-Proto", client.scheme.as_str().as_bytes());
    if !authority.is_empty() {
        push_field(out, b"X-Forwarded-Host", authority);
    }
    push_field(out, b"X-Unique-ID", unique_id);
    if let Some(upgrade) = upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
        push_field(out, b"Upgrade", upgrade);
    }
}

/// The answer's head as the client gets it: hop-by-hop fields dropped, the
/// framing fields kept as the backend sent them (checked by the parser), and
/// the connection's fate said.
fn write_answer_head(
    out: &mut Vec<u8>,
    answer: &ResponseHead<'_>,
    fields: &[httparse::Header<'_>],
    keep_alive: bool,
    client_version: Version,
    dechunk: bool,
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(answer.status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(answer.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (i, field) in fields.iter().enumerate() {
        let name = field.name;
        let framing_field =
            name.eq_ignore_ascii_case("content-length") || (name.eq_ignore_ascii_case("transfer-encoding") && !dechunk);
        if answer.drop.contains(i) && !framing_field && !name.contains('_') {
            continue;
        }
        push_field(out, name.as_bytes(), field.value);
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if client_version == Version::Http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Sends a request whose head [`write_h2_request_head`] wrote in `head`, with its
/// body: all of it in one write when it is in hand (a `Content-Length`),
/// else re-chunked as it comes.
pub(super) async fn send_hyper_request(
    conn: &mut BackendConn,
    head: &mut Vec<u8>,
    body: Option<ForwardBody>,
) -> Result<(), SendError> {
    use hyper::body::Body as _;
    let Some(mut body) = body else {
        head.extend_from_slice(b"\r\n");
        return conn.stream.write_all(head).await.map_err(SendError::Backend);
    };
    let exact = body.size_hint().exact();
    match exact {
        Some(n) => {
            head.extend_from_slice(b"Content-Length: ");
            head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            head.extend_from_slice(b"\r\n\r\n");
        }
        None => head.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n"),
    }
    loop {
        // What is ready goes into one write; a wait for the client sends what is pending first.
        let frame = match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                conn.stream.write_all(head).await.map_err(SendError::Backend)?;
                head.clear();
                body.frame().await
            }
        };
        match frame {
            None => break,
            Some(Err(cut)) => return Err(SendError::Body(cut)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if exact.is_some() {
                        head.extend_from_slice(&data);
                    } else {
                        push_chunk(head, &data);
                    }
                }
            }
        }
        if head.len() >= COALESCE {
            conn.stream.write_all(head).await.map_err(SendError::Backend)?;
            head.clear();
        }
    }
    if exact.is_none() {
        head.extend_from_slice(b"0\r\n\r\n");
    }
    conn.stream.write_all(head).await.map_err(SendError::Backend)
}

/// The answer whose head is in `conn.buf`, as an HTTP/2 client gets it: its
/// fields but the hop-by-hop ones (HTTP/2 has no Connection or
/// Transfer-Encoding), the body read from the connection as the client asks.
/// None for a head that is malformed or a 101 (HTTP/2 upgrades nothing).
pub(super) fn answer_of(
    mut conn: BackendConn,
    is_head: bool,
    addr: std::net::SocketAddr,
    pool: &Arc<ConnPool>,
    release: OwnedRelease,
) -> Option<Response<ProxyBody>> {
    let method = if is_head { "HEAD" } else { "GET" };
    let mut fields = h1::EMPTY_HEADERS;
    let answer = h1::parse_response(&conn.buf, &mut fields, MAX_HEAD, method).ok()??;
    if answer.status == 101 {
        return None;
    }
    let status = StatusCode::from_u16(answer.status).ok()?;
    // The fields kept, with where their values are in the head: the values
    // are then slices of the head (no copy, no allocation each).
    let start = conn.buf.as_ptr() as usize;
    let mut kept = Vec::with_capacity(answer.fields);
    for (i, field) in fields[..answer.fields].iter().enumerate() {
        let content_length = field.name.eq_ignore_ascii_case("content-length");
        if answer.drop.contains(i) && !content_length && !field.name.contains('_') {
            continue;
        }
        let Ok(name) = http::HeaderName::from_bytes(field.name.as_bytes()) else {
            continue;
        };
        let at = field.value.as_ptr() as usize - start;
        kept.push((name, at..at + field.value.len()));
    }
    let (framing, keep, len) = (answer.framing, answer.keep_alive, answer.len);
    let head = conn.buf.split_to(len).freeze();
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.reserve(kept.len());
    for (name, range) in kept {
        if let Ok(value) = http::HeaderValue::from_maybe_shared(head.slice(range)) {
            headers.append(name, value);
        }
    }
    let body = AnswerBody::new(conn, framing, keep, addr, pool.clone(), release);
    Some(resp.map(|()| body.boxed()))
}

/// Closes a client connection: what the client still sends is read for a
/// moment (a close with unread bytes would reset the connection, and the
/// client could lose the answer it has not read yet), then it is shut.
async fn linger<S>(mut io: ClientIo<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = io.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0usize;
        while total < 256 * 1024 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_complete_at_its_blank_line_however_it_arrives() {
        let whole = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 1..whole.len() {
            let mut scanned = 0;
            assert!(!head_complete(&whole[..cut], &mut scanned), "{cut}");
            assert!(head_complete(&whole[..], &mut scanned), "{cut}");
        }
        let mut scanned = 0;
        assert!(
            head_complete(b"GET / HTTP/1.1\nHost: a\n\n", &mut scanned),
            "bare LF: the parser refuses it"
        );
    }

    #[test]
    fn interim_answers_are_recognised_and_101_is_not_one() {
        assert_eq!(
            interim_len(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
            Some(25)
        );
        assert_eq!(interim_len(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), None);
        assert_eq!(interim_len(b"HTTP/1.1 200 OK\r\n\r\n"), None);
    }

    /// An h2 client's request as the backend gets it: `:authority` wins over
    /// `host`, hop-by-hop, framing and underscore fields go, the lb's own
    /// fields are set once and the forwarding lines appended to, in order.
    #[test]
    fn an_h2_request_head_carries_one_truth() {
        let mut request = http::Request::get("https://web.service/a?b=1").body(()).unwrap();
        let h = request.headers_mut();
        for (name, value) in [
            ("host", "other.service"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2, 3.3.3.3"),
            ("forwarded", "for=1.1.1.1"),
            ("x-real-ip", "6.6.6.6"),
            ("x-unique-id", "mine"),
            ("x_user", "admin"),
            ("te", "trailers"),
            ("content-length", "099"),
            ("accept", "*/*"),
        ] {
            h.append(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            );
        }
        let (parts, ()) = request.into_parts();
        let activity = crate::lb::client::Activity::new(tokio::time::Instant::now(), true);
        let peer: std::net::SocketAddr = "192.0.2.9:5555".parse().unwrap();
        let client = ClientConn::new(peer, super::super::Scheme::Https, activity);
        let mut out = Vec::new();
        write_h2_request_head(&mut out, &parts, &client, b"00000000000000000001");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a?b=1 HTTP/1.1\r\nHost: web.service\r\naccept: */*\r\n\
             X-Forwarded-For: 1.1.1.1, 2.2.2.2, 3.3.3.3, 192.0.2.9\r\n\
             Forwarded: for=1.1.1.1, for=192.0.2.9;proto=https\r\nX-Real-IP: 192.0.2.9\r\n\
             X-Forwarded-Proto: https\r\nX-Forwarded-Host: web.service\r\n\
             X-Unique-ID: 00000000000000000001\r\n"
        );
    }

    #[test]
    fn chunks_carry_their_size_in_hex() {
        for (len, size) in [(1usize, "1"), (15, "F"), (16, "10"), (4096, "1000"), (65_535, "FFFF")] {
            let mut out = Vec::new();
            push_chunk(&mut out, &vec![b'x'; len]);
            assert_eq!(
                out,
                [format!("{size}\r\n").as_bytes(), &vec![b'x'; len], b"\r\n"].concat()
            );
        }
        let mut out = Vec::new();
        push_chunk(&mut out, b"");
        assert!(out.is_empty(), "no data: no chunk (a zero chunk would end the body)");
    }

    #[test]
    fn owned_headers_are_found_in_any_case() {
        assert!(owned("HOST") == Some(Owned::Host));
        assert!(owned("X-Forwarded-For") == Some(Owned::XForwardedFor));
        assert!(owned("x-unique-id") == Some(Owned::Set));
        assert!(owned("x-forwarded-fox").is_none());
    }
}
