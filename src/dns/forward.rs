//! Forwarding questions to a list of DNS servers (Consul agents, upstream resolvers).
//!
//! ```text
//!  resolve(query) ──merge identical in-flight questions──▶ one exchange
//!     exchange: a slot of `max_forwarded` (none free: Busy at once, no socket)
//!        servers in order (healthy first) under one deadline
//!        UDP: a fresh connected socket per question (random source port), or,
//!             for Consul on loopback, a pooled connected socket (ID → waiter map)
//!        random ID, random 0x20 case; only an answer from the server's address
//!        with that ID and that question byte for byte is taken
//!        TC set ──▶ same question over TCP to the same server
//!        timeout / ICMP refused / SERVFAIL ──▶ server held down 5 s, next server
//!     ──▶ Arc<Template> shared by every merged waiter, or ForwardError
//! ```
//!
//! Why a fresh socket per question: an off-path forger must then guess the
//! source port (the kernel picks it at random from the ephemeral range), the ID
//! and the case of every letter, instead of only an ID on one of four ports
//! known for the life of the process (what unbound and dnsmasq do too). The
//! socket is connected, so the kernel drops datagrams from any other address
//! and reports an ICMP port-unreachable as `ECONNREFUSED` on that one socket:
//! it fails exactly the question it belongs to, at once, not after a timeout.
//! The cost is a `socket` + `connect` + `close` per forwarded question.
//!
//! Consul on a loopback address keeps a pool of four long-lived connected
//! sockets, each read by a task of [`ReaderTasks`] (tracked; one that ends
//! before shutdown ends the dns with an error). Nothing off the host can send
//! from 127.0.0.0/8 (the kernel drops such martians on every other
//! interface), and Consul questions are the hot forwarded path (never
//! cached). An ICMP error there fails every question waiting on that socket:
//! they all went to the same dead agent.
//!
//! The UDP workers ask that first pooled server themselves, on sockets of
//! their own (`inline.rs`, under the rules of `consul_ask.rs`), with the same
//! `max_forwarded` slots, hold-down and deadline; what they cannot finish
//! there (truncated answers, failures with other servers left) comes back
//! through [`Forwarder::resolve_after`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::stats::RouteStats;
use super::wire::{self, ParsedQuery, Template};

/// Sockets per server in the UDP pool (Consul on loopback).
const POOL_SIZE: usize = 4;
/// How long a failed server is tried only after the healthy ones.
const HOLD_DOWN: Duration = Duration::from_secs(5);
/// Largest DNS message.
const MAX_MESSAGE: usize = 65535;

/// Why one exchange with one server failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    /// No matching answer within the time given to this server.
    #[error("no answer in time")]
    Timeout,
    /// The server's host said nothing listens there (ICMP port unreachable,
    /// or a TCP reset).
    #[error("refused (port unreachable)")]
    Refused,
    /// A socket operation failed.
    #[error("could not {op}: {error}")]
    Io {
        /// What was being done (`open a socket`, `send`, `receive`, `connect over TCP` ...).
        op: &'static str,
        /// The cause (shared: every merged waiter gets a copy of the error).
        error: Arc<std::io::Error>,
    },
    /// The answer did not parse as a DNS response with one question.
    #[error("malformed response")]
    Malformed,
    /// The TCP answer was not for our question.
    #[error("the TCP answer does not match the question")]
    Mismatch,
    /// The pooled socket's reader is gone (shutting down).
    #[error("socket closed")]
    Closed,
}

impl ExchangeError {
    pub(crate) fn io(op: &'static str, error: std::io::Error) -> Self {
        if error.kind() == std::io::ErrorKind::ConnectionRefused {
            ExchangeError::Refused
        } else {
            ExchangeError::Io {
                op,
                error: Arc::new(error),
            }
        }
    }
}

/// Why forwarding failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    /// No server answered before the deadline.
    #[error("no answer from {servers} within {timeout:?}")]
    Timeout {
        /// The servers tried.
        servers: String,
        /// The deadline.
        timeout: Duration,
    },
    /// Every server failed; the last error.
    #[error("could not reach {server}: {cause}")]
    Unreachable {
        /// The last server tried.
        server: SocketAddr,
        /// What went wrong with it (printed here, so not a `source`).
        cause: ExchangeError,
    },
    /// `max_forwarded` questions were already on the wire.
    #[error("{limit} questions already in flight")]
    Busy {
        /// The limit.
        limit: usize,
    },
    /// The in-flight query this one was merged with was abandoned.
    #[error("merged query abandoned")]
    Abandoned,
}

type Waiter = oneshot::Sender<Result<Arc<Template>, ForwardError>>;

/// How a [`Forwarder`] talks to its servers.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    /// Deadline for one question over all servers.
    pub timeout: Duration,
    /// Whether to set RD (upstream resolvers) or not (Consul).
    pub recursion: bool,
    /// EDNS payload size we advertise to the servers.
    pub payload: u16,
    /// Whether servers on a loopback address are asked over a pool of
    /// long-lived sockets (Consul) instead of a fresh socket per question.
    pub pool_loopback: bool,
    /// Questions on the wire at once; more fail at once with [`ForwardError::Busy`].
    pub max_forwarded: usize,
}

/// Forwards questions to an ordered list of servers.
pub struct Forwarder {
    /// Servers in configured order.
    servers: Vec<Server>,
    /// Timeout, RD, payload, limit.
    options: ForwardOptions,
    /// One per question on the wire (the UDP workers' own Consul questions
    /// included): bounds sockets and upstream load.
    slots: Slots,
    /// Questions on the wire right now, by cache key, with the queries merged into them.
    inflight: Mutex<HashMap<Box<[u8]>, Vec<Waiter>>>,
    /// Where the pool sockets' readers run.
    readers: ReaderTasks,
}

/// Where a forwarder runs the readers of its pooled sockets: in the dns's
/// task tracker (waited for at shutdown), until `shutdown`. A reader that ends
/// before that (a panic) cancels `failed`, and the dns, which watches it,
/// ends with [`super::DnsError::ReaderDied`]: its supervisor restarts it
/// rather than let every pooled question time out.
#[derive(Clone, Default)]
pub struct ReaderTasks {
    /// The dns's task tracker.
    pub tasks: TaskTracker,
    /// Ends the readers.
    pub shutdown: CancellationToken,
    /// Cancelled when a reader ended before `shutdown`.
    pub failed: CancellationToken,
}

impl ReaderTasks {
    fn spawn(&self, reader: impl Future<Output = ()> + Send + 'static) {
        let ended = EndedEarly {
            shutdown: self.shutdown.clone(),
            failed: self.failed.clone(),
        };
        self.tasks.spawn(async move {
            let _ended = ended;
            reader.await;
        });
    }
}

/// Dropped when a reader's task ends, also by a panic's unwinding.
struct EndedEarly {
    shutdown: CancellationToken,
    failed: CancellationToken,
}

impl Drop for EndedEarly {
    fn drop(&mut self) {
        if !self.shutdown.is_cancelled() {
            self.failed.cancel();
        }
    }
}

/// One server of a [`Forwarder`], with its health.
pub(super) struct Server {
    addr: SocketAddr,
    /// `Some` for a pooled server; the sockets are created on first use, inside
    /// the runtime.
    pool: Option<OnceLock<Vec<PooledSocket>>>,
    next: AtomicUsize,
    /// Milliseconds since [`epoch`] until which this server is held down.
    down_until_ms: AtomicU64,
}

struct PooledSocket {
    socket: Arc<UdpSocket>,
    pending: Arc<Mutex<HashMap<u16, PendingQuery>>>,
}

struct PendingQuery {
    request: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<u8>, ExchangeError>>,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the forwarders' epoch: what hold-downs are kept in.
pub(super) fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Forwarder {
    /// A forwarder to `servers` (in failover order).
    pub fn new(servers: &[SocketAddr], options: ForwardOptions, readers: ReaderTasks) -> Self {
        Self {
            servers: servers
                .iter()
                .map(|&addr| Server {
                    addr,
                    pool: (options.pool_loopback && addr.ip().is_loopback()).then(OnceLock::new),
                    next: AtomicUsize::new(0),
                    down_until_ms: AtomicU64::new(0),
                })
                .collect(),
            options,
            slots: Slots {
                used: AtomicUsize::new(0),
                limit: options.max_forwarded,
            },
            inflight: Mutex::new(HashMap::new()),
            readers,
        }
    }

    /// Resolves `query`'s question; identical questions already on the wire share
    /// that exchange (`key` identifies the question, see [`ParsedQuery::key`]). Only
    /// real exchanges are recorded in `stats` (latency, errors), not merged waiters.
    pub async fn resolve(
        &self,
        key: &[u8],
        query: &ParsedQuery<'_>,
        stats: &RouteStats,
    ) -> Result<Arc<Template>, ForwardError> {
        let waiting = {
            let mut inflight = self.inflight.lock();
            match inflight.get_mut(key) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    inflight.insert(key.into(), Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = waiting {
            return rx.await.unwrap_or(Err(ForwardError::Abandoned));
        }
        // We lead: whatever happens (even cancellation), the guard removes the
        // entry; dropped waiters then see `Abandoned`.
        let guard = LeaderGuard {
            forwarder: self,
            key,
            finished: false,
        };
        let started = Instant::now();
        let result = self.exchange(query, stats).await;
        match &result {
            Ok(_) => stats.upstream_latency(started.elapsed()),
            Err(ForwardError::Busy { .. }) => {
                stats.over_limit.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        guard.finish(&result);
        result
    }

    fn servers_in_order(&self) -> Vec<&Server> {
        let now = now_ms();
        let (mut healthy, down): (Vec<&Server>, Vec<&Server>) = self
            .servers
            .iter()
            .partition(|s| s.down_until_ms.load(Ordering::Relaxed) <= now);
        healthy.extend(down);
        healthy
    }

    async fn exchange(&self, query: &ParsedQuery<'_>, stats: &RouteStats) -> Result<Arc<Template>, ForwardError> {
        // Held for the whole exchange: one question uses one socket at a time.
        let Some(_slot) = self.slots.acquire() else {
            return Err(ForwardError::Busy {
                limit: self.options.max_forwarded,
            });
        };
        let deadline = Instant::now() + self.options.timeout;
        let order = self.servers_in_order();
        self.try_servers(query, stats, &order, deadline, Tried::default()).await
    }

    /// Asks `order` in turn until one answers well or `deadline` passes; `tried`
    /// holds what servers asked before (by a UDP worker) left behind.
    async fn try_servers(
        &self,
        query: &ParsedQuery<'_>,
        stats: &RouteStats,
        order: &[&Server],
        deadline: Instant,
        mut tried: Tried,
    ) -> Result<Arc<Template>, ForwardError> {
        for (index, server) in order.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // Share the time left among the servers not yet tried.
            let attempt = (deadline - now) / (order.len() - index) as u32;
            match server.exchange(self, query, attempt, stats).await {
                Ok(template) => {
                    if !is_failure(&template) {
                        server.healthy();
                        return Ok(Arc::new(template));
                    }
                    server.hold_down();
                    tried.failure_answer = Some(template);
                }
                Err(cause) => {
                    tracing::debug!(server = %server.addr, %cause, "dns server failed");
                    server.hold_down();
                    tried.error = Some((server.addr, cause));
                }
            }
        }
        if let Some(answer) = tried.failure_answer {
            return Ok(Arc::new(answer));
        }
        Err(self.final_error(tried.error))
    }

    /// The error of a question no server answered; `last` is the last failure.
    pub(super) fn final_error(&self, last: Option<(SocketAddr, ExchangeError)>) -> ForwardError {
        match last {
            Some((server, cause)) if !matches!(cause, ExchangeError::Timeout) => {
                ForwardError::Unreachable { server, cause }
            }
            _ => ForwardError::Timeout {
                servers: self
                    .servers
                    .iter()
                    .map(|s| s.addr.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                timeout: self.options.timeout,
            },
        }
    }

    /// The servers, in configured order.
    pub(super) fn servers(&self) -> &[Server] {
        &self.servers
    }

    /// How this forwarder talks to its servers.
    pub(super) fn options(&self) -> &ForwardOptions {
        &self.options
    }

    /// Takes one `max_forwarded` slot for a UDP worker's own exchange; `false`
    /// when none is free (the question is then [`ForwardError::Busy`]). Given
    /// back with [`Forwarder::release_slot`] or handed to
    /// [`Forwarder::resolve_after`].
    pub fn take_slot(&self) -> bool {
        self.slots.take()
    }

    /// Gives back a slot taken with [`Forwarder::take_slot`].
    pub fn release_slot(&self) {
        self.slots.release();
    }

    /// Goes on with a question a UDP worker asked the first server itself,
    /// `started` at that moment, holding a slot from [`Forwarder::take_slot`]
    /// (released here): over TCP to that server when its answer was truncated,
    /// else on to the other servers, all within the question's deadline.
    /// Recorded in `stats` as [`Forwarder::resolve`] records an exchange.
    pub async fn resolve_after(
        &self,
        query: &ParsedQuery<'_>,
        stats: &RouteStats,
        started: Instant,
        first: FirstTry,
    ) -> Result<Arc<Template>, ForwardError> {
        let _slot = SlotGuard(&self.slots);
        let deadline = started + self.options.timeout;
        let mut tried = Tried::default();
        let result = async {
            let first_server = self.servers.first()?;
            match first {
                FirstTry::Truncated => {
                    let ForwardOptions { recursion, payload, .. } = self.options;
                    let own = started + self.options.timeout / self.servers.len() as u32;
                    let left = own.saturating_duration_since(Instant::now());
                    let answer = tcp_exchange(first_server.addr, query, recursion, payload, left)
                        .await
                        .and_then(|r| wire::make_template(&r).ok_or(ExchangeError::Malformed));
                    match answer {
                        Ok(t) if !is_failure(&t) => {
                            first_server.healthy();
                            return Some(Ok(Arc::new(t)));
                        }
                        Ok(t) => {
                            first_server.hold_down();
                            tried.failure_answer = Some(t);
                        }
                        Err(cause) => {
                            first_server.hold_down();
                            tried.error = Some((first_server.addr, cause));
                        }
                    }
                }
                FirstTry::Failed(cause) => tried.error = Some((first_server.addr, cause)),
                FirstTry::FailureAnswer(t) => tried.failure_answer = Some(t),
            }
            None
        }
        .await;
        let result = match result {
            Some(done) => done,
            None => {
                let rest: Vec<&Server> = self
                    .servers_in_order()
                    .into_iter()
                    .filter(|s| !std::ptr::eq(*s, &self.servers[0]))
                    .collect();
                self.try_servers(query, stats, &rest, deadline, tried).await
            }
        };
        match &result {
            Ok(_) => stats.upstream_latency(started.elapsed()),
            Err(_) => {
                stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }
}

/// SERVFAIL and REFUSED answers make the next server be tried.
pub fn is_failure(template: &Template) -> bool {
    matches!(template.rcode, wire::rcode::SERVFAIL | wire::rcode::REFUSED)
}

/// How a UDP worker's own exchange with the first server ended, when it
/// hands the question to [`Forwarder::resolve_after`].
#[derive(Debug)]
pub enum FirstTry {
    /// The answer was truncated (TC set, or larger than the worker's buffer):
    /// the same server is asked over TCP.
    Truncated,
    /// No usable answer (timeout, refused, malformed); the server is held down.
    Failed(ExchangeError),
    /// SERVFAIL or REFUSED; kept in case no other server does better.
    FailureAnswer(Template),
}

/// What the servers tried so far left behind.
#[derive(Default)]
struct Tried {
    /// The last SERVFAIL/REFUSED answer: returned when no server does better.
    failure_answer: Option<Template>,
    /// The last failed exchange.
    error: Option<(SocketAddr, ExchangeError)>,
}

/// The `max_forwarded` bound: a counter, taken without waiting (a question
/// over the bound fails at once), shared by the tasks and the UDP workers.
struct Slots {
    used: AtomicUsize,
    limit: usize,
}

impl Slots {
    fn take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }

    fn acquire(&self) -> Option<SlotGuard<'_>> {
        // `then`, not `then_some`: a guard made eagerly would give back, when
        // dropped, a slot that was never taken.
        self.take().then(|| SlotGuard(self))
    }
}

/// A taken slot, given back on drop.
struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

struct LeaderGuard<'a> {
    forwarder: &'a Forwarder,
    key: &'a [u8],
    /// Set once the entry is removed: by then a new leader may own the key, and
    /// removing it again would abandon that leader's waiters.
    finished: bool,
}

impl LeaderGuard<'_> {
    fn finish(mut self, result: &Result<Arc<Template>, ForwardError>) {
        let waiters = self.take();
        self.finished = true;
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }

    fn take(&self) -> Vec<Waiter> {
        self.forwarder.inflight.lock().remove(self.key).unwrap_or_default()
    }
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        // A leader dropped before finishing (cancelled): its waiters see
        // `Abandoned` instead of hanging.
        if !self.finished {
            drop(self.take());
        }
    }
}

impl Server {
    /// Its address.
    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether it is asked over long-lived pooled sockets (Consul on loopback).
    pub(super) fn is_pooled(&self) -> bool {
        self.pool.is_some()
    }

    /// Whether it is held down at `now_ms` ([`now_ms`]).
    pub(super) fn is_held_down(&self, now_ms: u64) -> bool {
        self.down_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Answered well: no longer held down (a store only when it was).
    pub(super) fn healthy(&self) {
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }

    pub(super) fn hold_down(&self) {
        self.down_until_ms
            .store(now_ms() + HOLD_DOWN.as_millis() as u64, Ordering::Relaxed);
    }

    fn pool<'a>(
        &self,
        pool: &'a OnceLock<Vec<PooledSocket>>,
        readers: &ReaderTasks,
    ) -> Result<&'a [PooledSocket], ExchangeError> {
        if let Some(pool) = pool.get() {
            return Ok(pool);
        }
        let mut sockets = Vec::with_capacity(POOL_SIZE);
        for _ in 0..POOL_SIZE {
            sockets.push(PooledSocket::connect(self.addr, readers)?);
        }
        // Another task may have won the race; its pool is used and ours dropped.
        Ok(pool.get_or_init(|| sockets))
    }

    async fn exchange(
        &self,
        fwd: &Forwarder,
        query: &ParsedQuery<'_>,
        limit: Duration,
        stats: &RouteStats,
    ) -> Result<Template, ExchangeError> {
        let deadline = Instant::now() + limit;
        let ForwardOptions { recursion, payload, .. } = fwd.options;
        let (response, cut) = match &self.pool {
            Some(pool) => {
                let pool = self.pool(pool, &fwd.readers)?;
                let socket = &pool[self.next.fetch_add(1, Ordering::Relaxed) % pool.len()];
                (socket.exchange(query, recursion, payload, limit).await?, false)
            }
            None => fresh_exchange(self.addr, query, recursion, payload, limit, stats).await?,
        };
        let response = if cut || wire::is_truncated(&response) {
            let left = deadline.saturating_duration_since(Instant::now());
            tcp_exchange(self.addr, query, recursion, payload, left).await?
        } else {
            response
        };
        wire::make_template(&response).ok_or(ExchangeError::Malformed)
    }
}

/// An unbound UDP socket connected to `addr`: the kernel binds it to a random
/// ephemeral port on connect (as `bind` to port 0 would) and from then on
/// delivers only datagrams from `addr`.
fn connected_udp(addr: SocketAddr) -> Result<UdpSocket, ExchangeError> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.nonblocking(),
        Some(Protocol::UDP),
    )
    .map_err(|e| ExchangeError::io("open a UDP socket", e))?;
    socket
        .connect(&addr.into())
        .map_err(|e| ExchangeError::io("connect a UDP socket", e))?;
    UdpSocket::from_std(socket.into()).map_err(|e| ExchangeError::io("register a UDP socket", e))
}

/// One question over its own connected socket. Datagrams that are not the
/// answer (wrong ID, wrong case, another question) are counted and ignored:
/// the real answer may still come. Returns the answer and whether it may have
/// been cut (it filled the buffer: larger than the payload we advertised).
async fn fresh_exchange(
    addr: SocketAddr,
    query: &ParsedQuery<'_>,
    recursion: bool,
    payload: u16,
    limit: Duration,
    stats: &RouteStats,
) -> Result<(Vec<u8>, bool), ExchangeError> {
    let socket = connected_udp(addr)?;
    let mut request = Vec::with_capacity(query.qname.len() + 32);
    wire::upstream_query(query, rand::random(), recursion, payload, &mut request);
    let exchange = async {
        socket.send(&request).await.map_err(|e| ExchangeError::io("send", e))?;
        let mut buf = vec![0u8; usize::from(payload).max(wire::PLAIN_UDP_LIMIT) + 1];
        loop {
            let n = socket
                .recv(&mut buf)
                .await
                .map_err(|e| ExchangeError::io("receive", e))?;
            if wire::answers_question(&request, &buf[..n]) {
                let cut = n == buf.len();
                buf.truncate(n);
                return Ok((buf, cut));
            }
            stats.ignored_responses.fetch_add(1, Ordering::Relaxed);
        }
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or(Err(ExchangeError::Timeout))
}

impl PooledSocket {
    fn connect(addr: SocketAddr, readers: &ReaderTasks) -> Result<Self, ExchangeError> {
        let socket = Arc::new(connected_udp(addr)?);
        let pending: Arc<Mutex<HashMap<u16, PendingQuery>>> = Arc::default();
        readers.spawn(read_responses(
            socket.clone(),
            pending.clone(),
            readers.shutdown.clone(),
        ));
        Ok(Self { socket, pending })
    }

    async fn exchange(
        &self,
        query: &ParsedQuery<'_>,
        recursion: bool,
        payload: u16,
        limit: Duration,
    ) -> Result<Vec<u8>, ExchangeError> {
        let (tx, rx) = oneshot::channel();
        let mut request = Vec::with_capacity(query.qname.len() + 32);
        let id = {
            let mut pending = self.pending.lock();
            let id = loop {
                let id: u16 = rand::random();
                if !pending.contains_key(&id) {
                    break id;
                }
            };
            wire::upstream_query(query, id, recursion, payload, &mut request);
            pending.insert(
                id,
                PendingQuery {
                    request: request.clone(),
                    reply: tx,
                },
            );
            id
        };
        let cleanup = PendingGuard {
            pending: &self.pending,
            id,
        };
        self.socket
            .send(&request)
            .await
            .map_err(|e| ExchangeError::io("send", e))?;
        let result = match tokio::time::timeout(limit, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ExchangeError::Closed),
            Err(_) => Err(ExchangeError::Timeout),
        };
        drop(cleanup);
        result
    }
}

struct PendingGuard<'a> {
    pending: &'a Mutex<HashMap<u16, PendingQuery>>,
    id: u16,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.id);
    }
}

async fn read_responses(
    socket: Arc<UdpSocket>,
    pending: Arc<Mutex<HashMap<u16, PendingQuery>>>,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.recv(&mut buf) => r,
        };
        match received {
            Ok(n) if n >= wire::HEADER_LEN => {
                let resp = &buf[..n];
                let id = u16::from_be_bytes([resp[0], resp[1]]);
                let mut map = pending.lock();
                let matches = map.get(&id).is_some_and(|p| wire::answers_question(&p.request, resp));
                if matches {
                    if let Some(p) = map.remove(&id) {
                        let _ = p.reply.send(Ok(resp.to_vec()));
                    }
                } else {
                    tracing::debug!(id, "dropping a response that matches no question we asked");
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                // ICMP port unreachable: the agent is not there; every question
                // on this socket went to it, so all fail over now.
                let mut map = pending.lock();
                for (_, p) in map.drain() {
                    let _ = p.reply.send(Err(ExchangeError::Refused));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "upstream socket receive error");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One question over TCP (RFC 7766), used when the UDP answer was truncated.
async fn tcp_exchange(
    addr: SocketAddr,
    query: &ParsedQuery<'_>,
    recursion: bool,
    payload: u16,
    limit: Duration,
) -> Result<Vec<u8>, ExchangeError> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| ExchangeError::io("connect over TCP", e))?;
        let mut request = vec![0, 0];
        let mut body = Vec::with_capacity(query.qname.len() + 32);
        wire::upstream_query(query, rand::random(), recursion, payload, &mut body);
        request[0..2].copy_from_slice(&(body.len() as u16).to_be_bytes());
        request.extend_from_slice(&body);
        stream
            .write_all(&request)
            .await
            .map_err(|e| ExchangeError::io("write over TCP", e))?;
        let len = stream
            .read_u16()
            .await
            .map_err(|e| ExchangeError::io("read over TCP", e))? as usize;
        let mut resp = vec![0u8; len];
        stream
            .read_exact(&mut resp)
            .await
            .map_err(|e| ExchangeError::io("read over TCP", e))?;
        if !wire::answers_question(&body, &resp) {
            return Err(ExchangeError::Mismatch);
        }
        Ok(resp)
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or(Err(ExchangeError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that panics cancels `failed` (the dns then stops with an
    /// error); readers that end at shutdown do not, and the tracker waits for
    /// them.
    #[tokio::test]
    async fn a_reader_that_dies_before_shutdown_is_loud() {
        let readers = ReaderTasks::default();
        readers.spawn(async { panic!("reader bug") });
        tokio::time::timeout(Duration::from_secs(5), readers.failed.cancelled())
            .await
            .expect("a panicked reader cancels `failed`");

        let readers = ReaderTasks::default();
        let shutdown = readers.shutdown.clone();
        readers.spawn(async move { shutdown.cancelled().await });
        readers.shutdown.cancel();
        readers.tasks.close();
        tokio::time::timeout(Duration::from_secs(5), readers.tasks.wait())
            .await
            .expect("the tracker waits for the readers, which end at shutdown");
        assert!(!readers.failed.is_cancelled(), "ending at shutdown is not a failure");
    }

    /// `max_forwarded`: at most `limit` slots are out; a refused take leaves
    /// the count alone (it gives nothing back), and a dropped guard frees one.
    #[test]
    fn slots_are_bounded_and_a_refused_take_gives_nothing_back() {
        let slots = Slots {
            used: AtomicUsize::new(0),
            limit: 2,
        };
        let a = slots.acquire().expect("first");
        let b = slots.acquire().expect("second");
        for _ in 0..3 {
            assert!(slots.acquire().is_none());
        }
        assert_eq!(slots.used.load(Ordering::Relaxed), 2);
        drop(a);
        assert!(slots.take(), "the freed slot");
        assert!(!slots.take());
        slots.release();
        drop(b);
        assert_eq!(slots.used.load(Ordering::Relaxed), 0);
    }
}
