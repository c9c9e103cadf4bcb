//! The HTTP proxy: client connections in, backend connections out.
//!
//! ```text
//!  accept ─▶ [TLS handshake, ALPN h2 → hyper http2, else HTTP/1.1]
//!         ─▶ HTTP/1.1: the lb's own path (`http1`: lb/h1 framing, strict RFC 9112;
//!            431 for large heads; idle and slow heads: the watchdog)
//!         ─▶ HTTP/2: hyper's server, one `handle` per stream
//!    request ─▶ two Host lines (h2: two `host` fields) → 400
//!           ─▶ table.route(authority of the target, else Host; path) ─▶ Landing page | 503 page | Backend
//!      Backend: the body read first, up to body_buffer_bytes (`super::upload`;
//!               slower than min_body_rate, or past request_timeout → 408)
//!         ─▶ pick an instance (smooth WRR) below maxconn where this client holds
//!            less than its max_client_share (none: 429) ─▶ a pooled connection
//!            (`conns`), else a new one
//!         connect failed ─▶ eject the instance, pick another (the request body is
//!                           still unsent, so any request can be retried)
//!         failed after sending ─▶ retried only when the request had no body
//!      answer relayed (HTTP/1.1: by its framing; h2: `conns::AnswerBody`);
//!      101 Switching Protocols (HTTP/1.1) ─▶ both connections spliced
//!      (WebSocket and other Upgrades; `super::splice`: cut after
//!      `tunnel_timeout` without a byte and at shutdown)
//! ```
//!
//! The request headers the backend gets (`http1::write_head_with`, for both paths): the
//! lb owns these, whatever the client sent (PanteraS's HAProxy appended
//! `X-Forwarded-For` with `option forwardfor` and added `X-Unique-ID`):
//!
//! | header | what the lb does |
//! |---|---|
//! | `Host` | the target's authority when it has one (absolute-form, h2 `:authority`), else the client's one Host |
//! | `X-Forwarded-For` | appended: every client line, in order, joined with `, `, then the client's address |
//! | `Forwarded` | appended (RFC 7239): the client's lines, then `for=<address>;proto=<http\|https>` |
//! | `X-Real-IP` | set to the client's address (client copies removed) |
//! | `X-Forwarded-Proto` | set to `http` or `https` (client copies removed) |
//! | `X-Forwarded-Host` | set to the Host sent on (client copies removed) |
//! | `X-Unique-ID` | set to the lb's own id, one per request, kept across retries (client copies removed) |
//! | `Content-Length` | one line of plain digits (`099` → `99`) |
//! | hop-by-hop (`Connection` and what it names, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, `Keep-Alive`, `Proxy-Connection`, `Proxy-Authorization`) | removed (an Upgrade the backend is asked for is set again) |
//! | names with `_` (`Transfer_Encoding`, `X_User`) | removed, as nginx does by default |
//!
//! Backend connections are plain HTTP/1.1 over TCP, one request at a time,
//! kept per instance address and per proxy thread (`conns::ConnPool`) for
//! HTTP/1.1 and HTTP/2 clients alike. The pool forgets addresses that left the
//! routing table (checked after every table change and every [`POOL_SWEEP`]).
//!
//! Client connections are admitted under [`super::client::ConnLimits`] and
//! watched by [`super::client::watch`]: a client that stalls for
//! `client_timeout`, an h2 session idle for `idle_timeout` and a connection
//! without a first request (h2: preface) after `handshake_timeout` are cut.
//! Requests over an instance's maxconn wait for a slot to be freed
//! ([`InstanceState::freed`](super::table::InstanceState)), in a queue of at
//! most `max_queued`, for at most `queue_timeout`; a request whose client
//! already holds its share of every instance with room is not queued (429):
//! neither one client address nor one h2 connection can take a whole
//! instance ([`super::share`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::LbState;
use super::body::{ProxyBody, error_page};
use super::client::{self, Activity, ClientBody, ClientIo, ConnSlot, Cut, RequestBody, Timeouts};
use super::settings::LbConfig;
use super::table::{Backend, BackendInstance, Carryover, Destination};
use super::upload::{BodyError, BodyRules, ClockedBody, ForwardBody};

mod conns;
mod http1;

/// Instances tried for one request at most.
const MAX_ATTEMPTS: usize = 3;
/// Idle sessions kept per backend instance.
const MAX_IDLE_PER_INSTANCE: usize = 64;
/// Largest request head accepted; more gets 431. hyper's read buffer bounds what
/// it parses, but does not reliably refuse a head below that bound, so the sum
/// of header sizes is checked again per request.
const MAX_HEADER_BYTES: usize = 32 * 1024;
/// How often the session pool drops closed sessions even without table changes.
pub const POOL_SWEEP: Duration = Duration::from_secs(30);
/// After a pool sweep, the next one waits at least this long (changes come in bursts).
const POOL_SWEEP_GAP: Duration = Duration::from_secs(1);
/// How long an idle h2 session may take to go away after its GOAWAY.
const GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// Hop-by-hop headers (RFC 9110 7.6.1, plus the legacy `Keep-Alive` and
/// `Proxy-Connection`): never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

/// How a client reached the proxy (`X-Forwarded-Proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP/1.1 or HTTP/2 over TLS.
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// What the forwarding headers need to know about one client connection,
/// computed once per connection rather than per request.
#[derive(Clone)]
struct ClientConn {
    /// The client's address (for the logs).
    peer: SocketAddr,
    /// The client's IP, ready to be the `X-Forwarded-For` and `X-Real-IP` value.
    ip: HeaderValue,
    /// This hop's `Forwarded` element, `for=<ip>;proto=<scheme>` (RFC 7239 4:
    /// an IPv6 address quoted, in brackets); the Host is in `X-Forwarded-Host`.
    forwarded: HeaderValue,
    /// The client's source for `max_client_share` (an IPv4 address, an IPv6 /64).
    source: IpAddr,
    /// How it reached the proxy (`X-Forwarded-Proto`).
    scheme: Scheme,
    /// What the connection's watchdog reads (request bodies report to it).
    activity: Arc<Activity>,
}

impl ClientConn {
    fn new(peer: SocketAddr, scheme: Scheme, activity: Arc<Activity>) -> Self {
        let unknown = || HeaderValue::from_static("unknown");
        let ip = HeaderValue::from_str(&peer.ip().to_string()).unwrap_or_else(|_| unknown());
        let proto = scheme.as_str();
        let forwarded = match peer.ip() {
            IpAddr::V4(v4) => format!("for={v4};proto={proto}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={proto}"),
        };
        let forwarded = HeaderValue::from_str(&forwarded).unwrap_or_else(|_| unknown());
        Self {
            peer,
            ip,
            forwarded,
            source: crate::net::sources::source_of(peer.ip()),
            scheme,
            activity,
        }
    }
}

/// The forwarding headers, as constants: no name parsing per request.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The proxy and its backend sessions.
pub struct Proxy {
    state: Arc<LbState>,
    /// Connections to backends, for HTTP/1.1 and HTTP/2 clients alike.
    conns: Arc<conns::ConnPool>,
    connect_timeout: Duration,
    client_timeout: Duration,
    handshake_timeout: Duration,
    /// The three client timeouts, as the watchdog takes them.
    timeouts: Timeouts,
    server_timeout: Duration,
    eject_ms: u64,
    queue_timeout: Duration,
    max_queued: usize,
    /// The limits on request bodies (buffer, rate, deadline).
    body_rules: BodyRules,
    /// `max_client_share`, in percent of an instance's maxconn.
    client_share: u8,
    ready_timeout: Duration,
    request_ids: AtomicU64,
    id_prefix: u32,
    /// Idle time after which an upgraded (spliced) connection is cut.
    tunnel_timeout: Duration,
}

impl Proxy {
    /// A proxy over `state` with the configured timeouts.
    pub fn new(config: &LbConfig, state: Arc<LbState>) -> Arc<Self> {
        Arc::new(Self {
            state,
            conns: Arc::default(),
            connect_timeout: config.connect_timeout,
            client_timeout: config.client_timeout,
            handshake_timeout: config.handshake_timeout,
            timeouts: Timeouts::new(config.client_timeout, config.idle_timeout, config.handshake_timeout),
            server_timeout: config.server_timeout,
            eject_ms: config.eject_time.as_millis() as u64,
            queue_timeout: config.queue_timeout,
            max_queued: config.max_queued,
            body_rules: BodyRules::new(config.body_buffer_bytes, config.min_body_rate, config.request_timeout),
            client_share: config.max_client_share,
            ready_timeout: config.ready_timeout,
            request_ids: AtomicU64::new(0),
            id_prefix: rand::random(),
            tunnel_timeout: config.tunnel_timeout,
        })
    }

    /// Accepts client connections until shutdown (over TLS when `tls` is given);
    /// open connections finish their current request. A connection over the
    /// caps is reset at once.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "lb accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Counted and logged by admit; the client is reset at once.
            let Ok(slot) = self.state.conns.admit(peer.ip()) else {
                crate::net::listeners::refuse(stream);
                continue;
            };
            let accepted = tokio::time::Instant::now();
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            let shutdown = shutdown.clone();
            match &tls {
                None => tasks.spawn(async move {
                    let activity = Activity::new(accepted, false);
                    let io = ClientIo::new(stream, activity.clone(), slot);
                    let client = ClientConn::new(peer, Scheme::Http, activity);
                    proxy.own_http1(io, client, shutdown).await
                }),
                Some(tls) => {
                    let tls = tls.clone();
                    tasks.spawn(async move { proxy.tls(tls, stream, slot, accepted, peer, shutdown).await })
                }
            };
        }
    }

    /// The TLS handshake, then HTTP/2 when the client chose it by ALPN, else HTTP/1.1.
    async fn tls(
        self: Arc<Self>,
        tls: TlsAcceptor,
        stream: TcpStream,
        slot: ConnSlot,
        accepted: tokio::time::Instant,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let handshake = tokio::time::timeout_at(accepted + self.handshake_timeout, tls.accept(stream));
        let stream = match handshake.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "lb: TLS handshake failed");
                return;
            }
            Err(_) => {
                self.state.stats.cut(Cut::Handshake);
                tracing::debug!(%peer, "lb: TLS handshake timed out");
                return;
            }
        };
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let activity = Activity::new(accepted, h2);
        let io = ClientIo::new(stream, activity.clone(), slot);
        if h2 {
            self.http2(io, activity, peer, shutdown).await;
        } else {
            let client = ClientConn::new(peer, Scheme::Https, activity);
            self.own_http1(io, client, shutdown).await;
        }
    }

    /// The service for one client connection: every response body reports to
    /// the connection's activity.
    fn service(
        self: Arc<Self>,
        client: ClientConn,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<ClientBody>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<ClientBody>, Infallible>> + Send,
    > + Clone {
        service_fn(move |req| {
            let proxy = self.clone();
            let client = client.clone();
            // Counted from here until the response body is done, or this future dropped.
            let stream = client.activity.stream_started();
            // Boxed: the request's future is ~3 KB (the whole forward path's
            // state), and hyper moves what this returns per request (h1: into
            // the connection's in-flight slot; h2: into a task spawned per
            // stream); a pointer moves for the price of one allocation
            // (benches/README.md, lb-capped.sh PROFILE_KIND=h2).
            Box::pin(async move {
                let resp = proxy.handle(req, &client).await;
                Ok::<_, Infallible>(resp.map(|body| ClientBody::new(body, stream)))
            })
        })
    }

    async fn http2<S>(
        self: Arc<Self>,
        io: ClientIo<S>,
        activity: Arc<Activity>,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = self
            .clone()
            .service(ClientConn::new(peer, Scheme::Https, activity.clone()));
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .keep_alive_interval(Some(self.client_timeout))
            .keep_alive_timeout(self.client_timeout);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let watchdog = client::watch(&activity, self.timeouts);
        tokio::pin!(conn, watchdog);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "lb client h2 connection ended");
                }
            }
            cut = &mut watchdog => {
                self.cut(peer, cut);
                if cut == Cut::Idle {
                    // No stream is open: GOAWAY, and the session ends at once
                    // unless the client does not read even that.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(GOAWAY_GRACE.min(self.client_timeout), conn).await;
                }
            }
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    _ = conn => {}
                    cut = watchdog => self.cut(peer, cut),
                }
            }
        }
    }

    /// Counts and logs a connection its watchdog cut (the caller drops it).
    fn cut(&self, peer: SocketAddr, cut: Cut) {
        self.state.stats.cut(cut);
        tracing::debug!(%peer, ?cut, "lb: client connection cut");
    }

    /// After the client connections have ended: closes the idle backend connections.
    pub async fn close_sessions(&self) {
        self.conns.clear();
    }

    /// Drops pooled backend connections to addresses no table has any more, and closed
    /// ones, after every table change (at most once per [`POOL_SWEEP_GAP`]) and
    /// every [`POOL_SWEEP`], until shutdown.
    pub async fn sweep_pool(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.state.changes.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(POOL_SWEEP) => {}
            }
            self.conns.prune(&self.state.health);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POOL_SWEEP_GAP) => {}
            }
        }
    }

    // `handle` and `forward` are plain fns around an `async move` block: an
    // `async fn` keeps each argument twice in its future (the argument and
    // the local it is moved into), and this future is copied into a box per
    // request (`service`; benches/README.md, lb-capped step 7).
    #[expect(clippy::manual_async_fn, reason = "an async fn keeps its arguments twice")]
    fn handle<'a>(
        &'a self,
        req: Request<Incoming>,
        client: &'a ClientConn,
    ) -> impl Future<Output = Response<ProxyBody>> + 'a {
        async move {
            let started = Instant::now();
            let head_bytes: usize = req
                .headers()
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>()
                + req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
            if head_bytes > MAX_HEADER_BYTES {
                return self.refuse(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "The request headers are too large.",
                    req.version(),
                    started,
                );
            }
            // RFC 9112 3.2: a request with more than one Host line gets 400 (also
            // two `host` fields over h2): the lb would route by one and the
            // backend might read the other.
            let mut hosts = req.headers().get_all(header::HOST).iter();
            let host_header = hosts.next();
            if hosts.next().is_some() {
                return self.refuse(
                    StatusCode::BAD_REQUEST,
                    "The request has more than one Host header.",
                    req.version(),
                    started,
                );
            }
            // The target's authority wins over Host: an absolute-form target
            // (RFC 9112 3.2.2) and h2's `:authority` (RFC 9113 8.3.1); the
            // backend is then sent that as its Host (`http1::write_h2_request_head`).
            let host = match req.uri().authority() {
                Some(authority) => Some(authority_host(authority)),
                None => host_header.and_then(|h| h.to_str().ok()),
            };
            let response = match self.destination(host, req.uri().path()).await {
                Ok(backend) => {
                    let response = self.forward(req, client, &backend, started).await;
                    backend.counters.record(response.status().as_u16(), started.elapsed());
                    response
                }
                Err(own) => own,
            };
            self.state
                .stats
                .requests
                .record(response.status().as_u16(), started.elapsed());
            response
        }
    }

    /// Where a request for `host` and `path` goes, for both paths: its
    /// backend, or the lb's own answer: 503 with `Retry-After` while the first
    /// complete read of Consul is not live yet (an empty table would answer
    /// 503 for services that exist: it is waited for, up to `ready_timeout`),
    /// the landing page, or 503 when no service answers to the name. A name of
    /// another datacenter asks the watcher to follow that datacenter.
    async fn destination(&self, host: Option<&str>, path: &str) -> Result<Arc<Backend>, Response<ProxyBody>> {
        if !self.state.is_ready() && !self.state.wait_ready(self.ready_timeout).await {
            let mut resp = error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The load balancer is still reading the service catalog from Consul.",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Err(resp);
        }
        let table = self.state.table.load();
        let route = table.route(host, path);
        if let (Destination::OtherDatacenter(_), Some(host)) = (&route, host) {
            self.state.want_datacenter(host);
        }
        match route {
            Destination::Backend(backend) | Destination::OtherDatacenter(Some(backend)) => Ok(backend.clone()),
            Destination::Landing => Err(super::status::landing_page(&self.state)),
            Destination::NotFound | Destination::OtherDatacenter(None) => Err(error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "No service answers to this name.",
            )),
        }
    }

    /// The lb's own answer to a request it will not forward, counted; HTTP/1
    /// connections are closed after it (what is left of the request on the
    /// connection is not read).
    fn refuse(
        &self,
        status: StatusCode,
        message: &str,
        version: http::Version,
        started: Instant,
    ) -> Response<ProxyBody> {
        self.state.stats.requests.record(status.as_u16(), started.elapsed());
        refusal(status, message, version)
    }

    /// Proxies one request to `backend`: its body read up to
    /// `body_buffer_bytes` first ([`Self::read_body`]), then up to
    /// [`MAX_ATTEMPTS`] instances, each picked with a free slot and under the
    /// client's share ([`Self::pick_with_capacity`]), a pooled session checked
    /// out (a failed connect ejects the instance and tries another), the
    /// request sent, and the answer relayed ([`Self::relay`]).
    /// The steps after the pick stay in this one future: the per-request
    /// future's size and layout are measured (`benches/lb-instructions.sh`),
    /// so the helpers it calls are synchronous and inlined.
    // A plain fn around an `async move` block, as `handle`.
    #[expect(clippy::manual_async_fn, reason = "an async fn keeps its arguments twice")]
    fn forward<'a>(
        &'a self,
        req: Request<Incoming>,
        client: &'a ClientConn,
        backend: &'a Backend,
        started: Instant,
    ) -> impl Future<Output = Response<ProxyBody>> + 'a {
        async move {
            let (parts, body) = req.into_parts();
            // A request without a body can be sent again after any failure that
            // happened before a response; one with a body only before it was sent.
            // (hyper knows: no length, `Content-Length: 0`, h2 END_STREAM on HEADERS.)
            let bodiless = body.is_end_stream();
            // Before any slot is taken: a slow upload holds memory, not an instance.
            let mut body = if bodiless {
                None
            } else {
                match self.read_body(body, client, started).await {
                    Ok(body) => Some(body),
                    Err(error) => return self.body_cut(&error, parts.version),
                }
            };
            // One id for every attempt: the instances see one request.
            let n = self.request_ids.fetch_add(1, Ordering::Relaxed);
            let unique_id = request_id_bytes(self.id_prefix, n);
            let is_head = parts.method == http::Method::HEAD;
            let mut tried = Tried::default();
            let maxconn = self.maxconn(backend);
            let share = super::share::share_cap(maxconn, self.client_share).map(|cap| Share {
                source: client.source,
                cap,
            });
            let mut head = Vec::with_capacity(1024);
            for attempt in 0..MAX_ATTEMPTS {
                let instance = match self.pick_with_capacity(backend, maxconn, &tried, share).await {
                    Ok(instance) => instance,
                    Err(why) => match self.no_slot_answer(why, &tried, backend) {
                        Some(resp) => return resp,
                        None => break,
                    },
                };
                tried.push(instance.addr);
                if attempt > 0 {
                    self.state.stats.retries.fetch_add(1, Ordering::Relaxed);
                }
                // pick_with_capacity reserved a slot (and the client's share of
                // it); both are released when the response body is done, or on
                // any early return.
                let release = Release {
                    health: &instance.health,
                    source: share.map(|s| s.source),
                };
                let Some(mut conn) = self.connection_to(backend, instance).await else {
                    continue;
                };
                http1::write_h2_request_head(&mut head, &parts, client, &unique_id);
                let out_body = if bodiless {
                    None
                } else {
                    match body.take() {
                        Some(b) => Some(b),
                        None => break,
                    }
                };
                // One deadline for sending the request and reading the answer's
                // head (one timer per request, armed only when a read waits).
                let deadline = tokio::time::Instant::now() + self.server_timeout;
                let sent = match out_body {
                    None => http1::send_hyper_request(&mut conn, &mut head, None)
                        .await
                        .map_err(http1::AnswerError::from),
                    body => {
                        match tokio::time::timeout_at(deadline, http1::send_hyper_request(&mut conn, &mut head, body))
                            .await
                        {
                            Ok(sent) => sent.map_err(http1::AnswerError::from),
                            Err(_) => Err(http1::AnswerError::Timeout),
                        }
                    }
                };
                let answered = match sent {
                    Ok(()) => self.read_answer_head(&mut conn, deadline).await,
                    Err(error) => Err(error),
                };
                match answered {
                    Ok(()) => match http1::answer_of(conn, is_head, instance.addr, &self.conns, release.owned()) {
                        Some(resp) => return resp,
                        None => {
                            return error_page(StatusCode::BAD_GATEWAY, "The service sent a malformed answer.");
                        }
                    },
                    Err(http1::AnswerError::Body(cut)) => return self.body_cut(&cut, parts.version),
                    Err(http1::AnswerError::Timeout) => {
                        return error_page(StatusCode::GATEWAY_TIMEOUT, "The service did not answer in time.");
                    }
                    Err(error) => {
                        tracing::debug!(service = %backend.service, addr = %instance.addr, %error, "lb: backend connection failed");
                        if !bodiless {
                            return error_page(StatusCode::BAD_GATEWAY, "The service failed while answering.");
                        }
                    }
                }
            }
            error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "No instance of this service could be reached.",
            )
        }
    }

    /// Reads the start of a request body (all of it up to `body_buffer_bytes`)
    /// under the body rules; the rest, if any, follows once an instance is chosen.
    async fn read_body(&self, body: Incoming, client: &ClientConn, started: Instant) -> Result<ForwardBody, BodyError> {
        let mut clocked = ClockedBody::new(
            RequestBody::new(body, client.activity.clone()),
            &self.body_rules,
            tokio::time::Instant::from_std(started),
        );
        let prefix = super::upload::read_prefix(&mut clocked, &self.body_rules, &self.state.bodies).await?;
        Ok(ForwardBody::new(prefix, clocked))
    }

    /// The answer to a request whose body was cut (counted by why); the
    /// connection is closed after it (HTTP/1), the rest of the body unread.
    fn body_cut(&self, error: &BodyError, version: http::Version) -> Response<ProxyBody> {
        let (status, message) = match error {
            BodyError::TooSlow => {
                self.state.stats.body_too_slow.fetch_add(1, Ordering::Relaxed);
                (StatusCode::REQUEST_TIMEOUT, "The request body came too slowly.")
            }
            BodyError::Deadline => {
                self.state.stats.request_deadline.fetch_add(1, Ordering::Relaxed);
                (StatusCode::REQUEST_TIMEOUT, "The request took too long to arrive.")
            }
            BodyError::Client(_) | BodyError::ClientGone(_) | BodyError::Chunked(_) => {
                (StatusCode::BAD_REQUEST, "The request body could not be read.")
            }
        };
        tracing::debug!(%error, "lb: request body cut");
        refusal(status, message, version)
    }

    /// The per-instance cap of `backend`'s service (`haproxy_maxconn`).
    #[inline(always)]
    fn maxconn(&self, backend: &Backend) -> usize {
        self.state
            .maxconn
            .load()
            .get(&backend.service)
            .copied()
            .unwrap_or(super::DEFAULT_MAXCONN)
    }

    /// An instance below `maxconn` (PanteraS's per-instance cap) where the
    /// client is below its `share`, with one in-flight slot reserved for this
    /// request; when all are at the cap, the request waits in a bounded queue
    /// for up to `queue_timeout`.
    async fn pick_with_capacity<'b>(
        &self,
        backend: &'b Backend,
        maxconn: usize,
        tried: &Tried,
        share: Option<Share>,
    ) -> Result<&'b BackendInstance, NoSlot> {
        let queue = Queue {
            queued: &self.state.queued,
            max: self.max_queued,
            timeout: self.queue_timeout,
        };
        reserve_instance(backend, maxconn, tried, share, &self.state.health, &queue).await
    }
}

/// The lb's error page for a request it will not forward; HTTP/1 connections
/// are closed after it (what is left of the request is not read).
fn refusal(status: StatusCode, message: &str, version: http::Version) -> Response<ProxyBody> {
    let mut resp = error_page(status, message);
    if version < http::Version::HTTP_2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The host (and port) of a target's authority, without any `user@`.
fn authority_host(authority: &http::uri::Authority) -> &str {
    let all = authority.as_str();
    all.rsplit_once('@').map_or(all, |(_, host)| host)
}

/// `X-Unique-ID`: 8 hex digits of the proxy's random prefix, 12 of the
/// counter, written into the head as bytes.
fn request_id_bytes(prefix: u32, n: u64) -> [u8; 20] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut id = [0u8; 20];
    let digits = (u64::from(prefix) << 48) | (n & 0xFFFF_FFFF_FFFF);
    // The prefix's top 16 bits do not fit the u64 above; they go first.
    let high = prefix >> 16;
    for (i, slot) in id[..4].iter_mut().enumerate() {
        *slot = HEX[((high >> (12 - 4 * i)) & 0xF) as usize];
    }
    for (i, slot) in id[4..].iter_mut().enumerate() {
        *slot = HEX[((digits >> (60 - 4 * i)) & 0xF) as usize];
    }
    id
}

/// The instances one request has tried, without allocating.
#[derive(Default)]
struct Tried {
    addrs: [Option<SocketAddr>; MAX_ATTEMPTS],
    len: usize,
}

impl Tried {
    fn push(&mut self, addr: SocketAddr) {
        if let Some(slot) = self.addrs.get_mut(self.len) {
            *slot = Some(addr);
            self.len += 1;
        }
    }

    fn contains(&self, addr: SocketAddr) -> bool {
        self.addrs[..self.len].contains(&Some(addr))
    }
}

/// A client's place under `max_client_share` on the instance it reserves:
/// its source, and how many slots of one instance that source may hold.
#[derive(Debug, Clone, Copy)]
struct Share {
    source: IpAddr,
    cap: usize,
}

/// Gives an instance's in-flight slot (and its client's share of it) back when dropped.
struct Release<'a> {
    health: &'a Arc<super::table::InstanceState>,
    /// The client source counted in the instance's holders, when the share is on.
    source: Option<IpAddr>,
}

impl Release<'_> {
    /// Hands the slot over to something that outlives this function.
    fn owned(self) -> OwnedRelease {
        let owned = OwnedRelease {
            health: self.health.clone(),
            source: self.source,
        };
        std::mem::forget(self);
        owned
    }
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        free_slot(self.health, self.source);
    }
}

struct OwnedRelease {
    health: Arc<super::table::InstanceState>,
    source: Option<IpAddr>,
}

impl Drop for OwnedRelease {
    fn drop(&mut self) {
        free_slot(&self.health, self.source);
    }
}

/// Gives an in-flight slot back (and `source`'s count of it) and wakes one
/// request queued for it (FIFO).
fn free_slot(health: &super::table::InstanceState, source: Option<IpAddr>) {
    if let Some(source) = source {
        health.holders.give_back(source);
    }
    health.inflight.fetch_sub(1, Ordering::AcqRel);
    health.freed.notify_one();
}

/// The maxconn queue: its length now, its bound and its timeout.
struct Queue<'a> {
    queued: &'a AtomicUsize,
    max: usize,
    timeout: Duration,
}

/// A place in the [`Queue`], given back when dropped.
struct QueueTicket<'a>(&'a AtomicUsize);

impl<'a> QueueTicket<'a> {
    /// A place in a count with no bound of its own (a route's part of the queue).
    fn join(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }

    fn take(queue: &Queue<'a>) -> Option<Self> {
        queue
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < queue.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(queue.queued))
    }
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why no instance slot was reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoSlot {
    /// Some instance is merely full: worth queueing for.
    Full,
    /// Every instance with room has this client at its `max_client_share`.
    OverShare,
    /// No instance can take the request (none usable, or all tried).
    None,
}

/// One attempt at an instance with a free slot, under the client's share: the
/// instance (slot and share reserved), or why there is none.
fn try_reserve<'b>(
    backend: &'b Backend,
    now_ms: u64,
    maxconn: usize,
    tried: &Tried,
    share: Option<Share>,
) -> Result<&'b BackendInstance, NoSlot> {
    let at_cap = |i: &BackendInstance| i.health.inflight.load(Ordering::Acquire) >= maxconn;
    // Looked up (under the holders' lock) only when the instance has at least
    // `cap` requests in flight: below that, no source can hold `cap` of them.
    // Only while another thread is between its two counts can a source hold
    // more than the instance counts; once a `try_take` failed, look always,
    // so this loop never spins on that instance.
    let always_look = std::cell::Cell::new(false);
    let over_share = |i: &BackendInstance| {
        share.is_some_and(|s| {
            (always_look.get() || i.health.inflight.load(Ordering::Acquire) >= s.cap)
                && i.health.holders.held_by(s.source) >= s.cap
        })
    };
    loop {
        let Some(instance) = backend.pick_where(now_ms, |i| tried.contains(i.addr) || at_cap(i) || over_share(i))
        else {
            let untried = || backend.instances.iter().filter(|i| !tried.contains(i.addr));
            return Err(if untried().any(|i| at_cap(i) && !over_share(i)) {
                NoSlot::Full
            } else if untried().any(over_share) {
                NoSlot::OverShare
            } else {
                NoSlot::None
            });
        };
        if let Some(s) = share
            && !instance.health.holders.try_take(s.source, s.cap)
        {
            // Another request of this client took its last share meanwhile.
            always_look.set(true);
            continue;
        }
        // Reserve the slot atomically: another request may have taken the last
        // one since the cap was read above.
        let reserved = instance
            .health
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < maxconn).then_some(n + 1))
            .is_ok();
        if reserved {
            return Ok(instance);
        }
        if let Some(s) = share {
            instance.health.holders.give_back(s.source);
        }
    }
}

/// An instance of `backend` below `maxconn` (and below the client's share)
/// with a slot reserved for the caller; when every candidate is full, waits in
/// `queue` until a slot is freed (woken by [`free_slot`], no polling) or the
/// queue timeout passes.
async fn reserve_instance<'b>(
    backend: &'b Backend,
    maxconn: usize,
    tried: &Tried,
    share: Option<Share>,
    health: &Carryover,
    queue: &Queue<'_>,
) -> Result<&'b BackendInstance, NoSlot> {
    match try_reserve(backend, health.now_ms(), maxconn, tried, share) {
        Err(NoSlot::Full) => {}
        other => return other,
    }
    let Some(_ticket) = QueueTicket::take(queue) else {
        return Err(NoSlot::Full);
    };
    // The route's own share of the queue, shown per service on the stats page.
    let _route_place = QueueTicket::join(&backend.counters.queued);
    let deadline = tokio::time::Instant::now() + queue.timeout;
    loop {
        // Waiting on every candidate, registered before looking again, so a
        // slot freed in between wakes this request rather than nobody.
        let mut freed: Vec<Pin<Box<tokio::sync::futures::Notified<'b>>>> = backend
            .instances
            .iter()
            .filter(|i| !tried.contains(i.addr))
            .map(|i| Box::pin(i.health.freed.notified()))
            .collect();
        for f in &mut freed {
            f.as_mut().enable();
        }
        match try_reserve(backend, health.now_ms(), maxconn, tried, share) {
            Err(NoSlot::Full) => {}
            other => return other,
        }
        let any_freed = std::future::poll_fn(|cx| {
            if freed.iter_mut().any(|f| f.as_mut().poll(cx).is_ready()) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        });
        // A notification taken by a Notified dropped here is handed on to the
        // next waiter (tokio's notify_one semantics), so none is lost.
        if tokio::time::timeout_at(deadline, any_freed).await.is_err() {
            return Err(NoSlot::Full);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_prefix_then_counter_in_hex() {
        for (prefix, n) in [
            (0u32, 0u64),
            (0xDEAD_BEEF, 1),
            (0x0123_4567, 0xABC_DEF0_1234),
            (u32::MAX, (1 << 48) - 1),
        ] {
            let id = request_id_bytes(prefix, n);
            assert_eq!(std::str::from_utf8(&id).unwrap(), format!("{prefix:08X}{n:012X}"));
        }
    }

    fn backend(instances: &[(u8, &Carryover)]) -> Backend {
        let instances = instances
            .iter()
            .map(|&(last, health)| {
                let addr = SocketAddr::from(([192, 0, 2, last], 80));
                BackendInstance {
                    id: format!("i{last}"),
                    node: "n".into(),
                    addr,
                    weight: 100,
                    health: health.get(addr),
                    httpchk: None,
                }
            })
            .collect();
        Backend::new("svc".into(), "dc1".into(), instances, Default::default())
    }

    /// A queued request is woken by the slot being given back, not by a poll:
    /// with the clock paused, it is served at the very instant the slot frees.
    #[tokio::test(start_paused = true)]
    async fn a_queued_request_takes_a_freed_slot_at_once() {
        let health = Carryover::new();
        let backend = Arc::new(backend(&[(1, &health), (2, &health)]));
        let queued = Arc::new(AtomicUsize::new(0));
        let queue = |queued| Queue {
            queued,
            max: 8,
            timeout: Duration::from_secs(60),
        };
        // Both instances at maxconn 1.
        let q = queue(&queued);
        let a = reserve_instance(&backend, 1, &Tried::default(), None, &health, &q)
            .await
            .unwrap();
        let b = reserve_instance(&backend, 1, &Tried::default(), None, &health, &q)
            .await
            .unwrap();
        assert_ne!(a.addr, b.addr);
        let waiter = {
            let (backend, queued) = (backend.clone(), queued.clone());
            tokio::spawn(async move {
                let health = Carryover::new();
                let q = Queue {
                    queued: &queued,
                    max: 8,
                    timeout: Duration::from_secs(60),
                };
                let got = reserve_instance(&backend, 1, &Tried::default(), None, &health, &q).await;
                (got.ok().map(|i| i.addr), tokio::time::Instant::now())
            })
        };
        // The waiter is queued (the paused clock does not move while it waits).
        while queued.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // Not a multiple of any poll period a loop might use.
        tokio::time::sleep(Duration::from_millis(7_001)).await;
        assert_eq!(queued.load(Ordering::Acquire), 1, "still queued after 7 s");
        let freed_at = tokio::time::Instant::now();
        free_slot(&b.health, None);
        let (got, served_at) = waiter.await.unwrap();
        assert_eq!(got, Some(b.addr), "the freed instance");
        assert_eq!(served_at, freed_at, "woken by the release, not by a timer");
        assert_eq!(queued.load(Ordering::Acquire), 0);
        assert_eq!(
            b.health.inflight.load(Ordering::Acquire),
            1,
            "the slot is the waiter's now"
        );
    }

    /// The queue bound holds (one more gets nothing at once), and a queued
    /// request gives up after the queue timeout.
    #[tokio::test(start_paused = true)]
    async fn the_queue_is_bounded_in_length_and_time() {
        let health = Carryover::new();
        let backend = Arc::new(backend(&[(1, &health)]));
        let queued = Arc::new(AtomicUsize::new(0));
        let q = Queue {
            queued: &queued,
            max: 2,
            timeout: Duration::from_secs(5),
        };
        let held = reserve_instance(&backend, 1, &Tried::default(), None, &health, &q)
            .await
            .unwrap();
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let (backend, queued) = (backend.clone(), queued.clone());
            waiters.push(tokio::spawn(async move {
                let health = Carryover::new();
                let q = Queue {
                    queued: &queued,
                    max: 2,
                    timeout: Duration::from_secs(5),
                };
                let started = tokio::time::Instant::now();
                let got = reserve_instance(&backend, 1, &Tried::default(), None, &health, &q)
                    .await
                    .is_ok();
                (got, started.elapsed())
            }));
        }
        while queued.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        assert!(
            reserve_instance(&backend, 1, &Tried::default(), None, &health, &q)
                .await
                .is_err(),
            "a third request finds the queue full"
        );
        assert_eq!(started.elapsed(), Duration::ZERO, "refused at once, not after waiting");
        for w in waiters {
            let (got, waited) = w.await.unwrap();
            assert!(!got, "nothing freed: the queue timeout ends the wait");
            assert_eq!(waited, Duration::from_secs(5));
        }
        assert_eq!(queued.load(Ordering::Acquire), 0);
        assert_eq!(held.health.inflight.load(Ordering::Acquire), 1);
    }

    #[test]
    fn tried_holds_up_to_max_attempts() {
        let mut tried = Tried::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert!(!tried.contains(a));
        tried.push(a);
        assert!(tried.contains(a) && !tried.contains(b));
        for _ in 0..5 {
            tried.push(b);
        }
        assert_eq!(tried.len, MAX_ATTEMPTS);
    }

    /// One source holds at most its share of an instance: past it, the next
    /// instance; past it everywhere, `OverShare` (429), without queueing; another
    /// source is not affected; a freed slot gives the share back.
    #[tokio::test(start_paused = true)]
    async fn a_source_holds_at_most_its_share_of_each_instance() {
        let health = Carryover::new();
        let backend = backend(&[(1, &health), (2, &health)]);
        let queued = AtomicUsize::new(0);
        let q = Queue {
            queued: &queued,
            max: 8,
            timeout: Duration::from_secs(60),
        };
        let attacker = Share {
            source: "192.0.2.66".parse().unwrap(),
            cap: 2,
        };
        let mut held = Vec::new();
        for _ in 0..4 {
            let i = reserve_instance(&backend, 4, &Tried::default(), Some(attacker), &health, &q)
                .await
                .expect("under the share");
            held.push(i);
        }
        for i in &backend.instances {
            assert_eq!(i.health.holders.held_by(attacker.source), 2, "{}", i.addr);
            assert_eq!(i.health.inflight.load(Ordering::Acquire), 2);
        }
        let started = tokio::time::Instant::now();
        let over = reserve_instance(&backend, 4, &Tried::default(), Some(attacker), &health, &q).await;
        assert_eq!(over.err(), Some(NoSlot::OverShare));
        assert_eq!(started.elapsed(), Duration::ZERO, "refused at once, not queued");
        assert_eq!(queued.load(Ordering::Acquire), 0);
        let other = Share {
            source: "192.0.2.7".parse().unwrap(),
            cap: 2,
        };
        let served = reserve_instance(&backend, 4, &Tried::default(), Some(other), &health, &q).await;
        assert!(served.is_ok(), "another source is served");
        let first = held.remove(0);
        free_slot(&first.health, Some(attacker.source));
        assert!(
            reserve_instance(&backend, 4, &Tried::default(), Some(attacker), &health, &q)
                .await
                .is_ok(),
            "a freed slot gives the share back"
        );
    }

    #[test]
    fn an_authority_loses_its_userinfo() {
        let authority: http::uri::Authority = "user:pw@beta.service:8080".parse().unwrap();
        assert_eq!(authority_host(&authority), "beta.service:8080");
    }
}
