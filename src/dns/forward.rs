//! Forwarding questions to a list of DNS servers (Consul agents, upstream resolvers).
//!
//! ```text
//!  resolve(query) ──merge identical in-flight questions──▶ one exchange
//!     exchange: servers in order (healthy first) under one deadline
//!        UDP over a pooled *connected* socket (ID → waiter map, reader task)
//!        TC set ──▶ same question over TCP to the same server
//!        timeout / refused / SERVFAIL ──▶ server held down 5 s, next server
//!     ──▶ Arc<Template> shared by every merged waiter, or ForwardError
//! ```
//!
//! Connected sockets are the point of the pool: a fresh socket per query (what
//! hickory's resolver does) costs several syscalls per question, and a connected
//! socket also reports ICMP port-unreachable, so a dead local Consul fails over at
//! once instead of after a timeout. Responses are only accepted when ID and
//! question match the request we sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::stats::RouteStats;
use super::wire::{self, Query, Template};

/// Sockets per server in the UDP pool.
const POOL_SIZE: usize = 4;
/// How long a failed server is tried only after the healthy ones.
const HOLD_DOWN: Duration = Duration::from_secs(5);
/// Largest DNS message.
const MAX_MESSAGE: usize = 65535;

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
    #[error("could not reach {server}: {reason}")]
    Unreachable {
        /// The last server tried.
        server: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The in-flight query this one was merged with was abandoned.
    #[error("merged query abandoned")]
    Abandoned,
}

type Waiter = oneshot::Sender<Result<Arc<Template>, ForwardError>>;

/// Forwards questions to an ordered list of servers.
pub struct Forwarder {
    /// Servers in configured order.
    servers: Vec<Server>,
    /// Deadline for one question over all servers.
    timeout: Duration,
    /// Whether to set RD (upstream resolvers) or not (Consul).
    recursion: bool,
    /// EDNS payload size we advertise to the servers.
    payload: u16,
    /// Questions on the wire right now, by cache key, with the queries merged into them.
    inflight: Mutex<HashMap<Box<[u8]>, Vec<Waiter>>>,
    /// Stops the pool reader tasks.
    shutdown: CancellationToken,
}

struct Server {
    addr: SocketAddr,
    /// Created on first use, inside the runtime.
    pool: OnceLock<Vec<PooledSocket>>,
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
    reply: oneshot::Sender<Result<Vec<u8>, String>>,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Forwarder {
    /// A forwarder to `servers` (in failover order).
    pub fn new(
        servers: &[SocketAddr],
        timeout: Duration,
        recursion: bool,
        payload: u16,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            servers: servers
                .iter()
                .map(|&addr| Server {
                    addr,
                    pool: OnceLock::new(),
                    next: AtomicUsize::new(0),
                    down_until_ms: AtomicU64::new(0),
                })
                .collect(),
            timeout,
            recursion,
            payload,
            inflight: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// Resolves `query`'s question; identical questions already on the wire share
    /// that exchange (`key` identifies the question, see [`Query::key`]). Only
    /// real exchanges are recorded in `stats` (latency, errors), not merged waiters.
    pub async fn resolve(
        &self,
        key: &[u8],
        query: &Query<'_>,
        stats: &RouteStats,
    ) -> Result<Arc<Template>, ForwardError> {
        let waiting = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
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
        let result = self.exchange(query).await;
        match &result {
            Ok(_) => stats.upstream_latency(started.elapsed()),
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

    async fn exchange(&self, query: &Query<'_>) -> Result<Arc<Template>, ForwardError> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let order = self.servers_in_order();
        let mut last_error = None;
        let mut last_failure_answer = None;
        for (index, server) in order.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // Share the time left among the servers not yet tried.
            let attempt = (deadline - now) / (order.len() - index) as u32;
            match server.exchange(self, query, attempt).await {
                Ok(template) => {
                    let failure = matches!(template.rcode, wire::rcode::SERVFAIL | wire::rcode::REFUSED);
                    if !failure {
                        server.down_until_ms.store(0, Ordering::Relaxed);
                        return Ok(Arc::new(template));
                    }
                    server.hold_down();
                    last_failure_answer = Some(template);
                }
                Err(reason) => {
                    tracing::debug!(server = %server.addr, %reason, "dns server failed");
                    server.hold_down();
                    last_error = Some((server.addr, reason));
                }
            }
        }
        if let Some(answer) = last_failure_answer {
            return Ok(Arc::new(answer));
        }
        match last_error {
            Some((server, reason)) if reason != "timeout" => Err(ForwardError::Unreachable { server, reason }),
            _ => Err(ForwardError::Timeout {
                servers: self
                    .servers
                    .iter()
                    .map(|s| s.addr.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                timeout: self.timeout,
            }),
        }
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
        self.forwarder
            .inflight
            .lock()
            .expect("inflight lock")
            .remove(self.key)
            .unwrap_or_default()
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
    fn hold_down(&self) {
        self.down_until_ms
            .store(now_ms() + HOLD_DOWN.as_millis() as u64, Ordering::Relaxed);
    }

    fn pool(&self, shutdown: &CancellationToken) -> Result<&[PooledSocket], String> {
        if let Some(pool) = self.pool.get() {
            return Ok(pool);
        }
        let mut sockets = Vec::with_capacity(POOL_SIZE);
        for _ in 0..POOL_SIZE {
            sockets.push(PooledSocket::connect(self.addr, shutdown.clone())?);
        }
        // Another task may have won the race; its pool is used and ours dropped.
        Ok(self.pool.get_or_init(|| sockets))
    }

    async fn exchange(&self, fwd: &Forwarder, query: &Query<'_>, limit: Duration) -> Result<Template, String> {
        let deadline = Instant::now() + limit;
        let pool = self.pool(&fwd.shutdown)?;
        let socket = &pool[self.next.fetch_add(1, Ordering::Relaxed) % pool.len()];
        let response = socket.exchange(query, fwd.recursion, fwd.payload, limit).await?;
        let response = if wire::is_truncated(&response) {
            let left = deadline.saturating_duration_since(Instant::now());
            tcp_exchange(self.addr, query, fwd.recursion, fwd.payload, left).await?
        } else {
            response
        };
        wire::make_template(&response).ok_or_else(|| "malformed response".to_string())
    }
}

impl PooledSocket {
    fn connect(addr: SocketAddr, shutdown: CancellationToken) -> Result<Self, String> {
        let local: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let std_socket = std::net::UdpSocket::bind(local).map_err(|e| format!("bind: {e}"))?;
        std_socket.connect(addr).map_err(|e| format!("connect: {e}"))?;
        std_socket
            .set_nonblocking(true)
            .map_err(|e| format!("nonblocking: {e}"))?;
        let socket = Arc::new(UdpSocket::from_std(std_socket).map_err(|e| format!("register: {e}"))?);
        let pending: Arc<Mutex<HashMap<u16, PendingQuery>>> = Arc::default();
        tokio::spawn(read_responses(socket.clone(), pending.clone(), shutdown));
        Ok(Self { socket, pending })
    }

    async fn exchange(
        &self,
        query: &Query<'_>,
        recursion: bool,
        payload: u16,
        limit: Duration,
    ) -> Result<Vec<u8>, String> {
        let (tx, rx) = oneshot::channel();
        let mut request = Vec::with_capacity(query.qname.len() + 32);
        let id = {
            let mut pending = self.pending.lock().expect("pending lock");
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
        self.socket.send(&request).await.map_err(|e| format!("send: {e}"))?;
        let result = match tokio::time::timeout(limit, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("socket closed".to_string()),
            Err(_) => Err("timeout".to_string()),
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
        self.pending.lock().expect("pending lock").remove(&self.id);
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
                let mut map = pending.lock().expect("pending lock");
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
                // ICMP port unreachable: the server is not there; fail everything
                // waiting on this socket so the caller fails over now.
                let mut map = pending.lock().expect("pending lock");
                for (_, p) in map.drain() {
                    let _ = p.reply.send(Err("connection refused".to_string()));
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
    query: &Query<'_>,
    recursion: bool,
    payload: u16,
    limit: Duration,
) -> Result<Vec<u8>, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("tcp connect: {e}"))?;
        let mut request = Vec::with_capacity(query.qname.len() + 34);
        request.extend_from_slice(&[0, 0]);
        let mut body = Vec::new();
        wire::upstream_query(query, rand::random(), recursion, payload, &mut body);
        request[0..2].copy_from_slice(&(body.len() as u16).to_be_bytes());
        request.extend_from_slice(&body);
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("tcp write: {e}"))?;
        let len = stream.read_u16().await.map_err(|e| format!("tcp read: {e}"))? as usize;
        let mut resp = vec![0u8; len];
        stream
            .read_exact(&mut resp)
            .await
            .map_err(|e| format!("tcp read: {e}"))?;
        if !wire::answers_question(&body, &resp) {
            return Err("tcp response does not match the question".to_string());
        }
        Ok(resp)
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err("timeout".to_string()))
}
