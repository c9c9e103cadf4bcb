//! Connections to the Consul agent's HTTP API, bounded by design.
//!
//! ```text
//!  Lane  ── one per long poll (at most MAX_LANES for the process); one
//!           connection, one request at a time, reconnected when it breaks
//!  pool  ── POOL_SIZE connections shared by every short request (fetches,
//!           registrations, probes); a request waits for a free one
//!  both ──▶ connect timeout, request timeout, a body size cap, and counters
//!           by endpoint and open connections (ConsulStats)
//! ```
//!
//! Consul caps HTTP connections per client address
//! (`limits.http_max_conns_per_client`, 200 by default), and on a PanteraS host
//! every client of the agent (registrator, the `consul` CLI, Wayfinder) shares one
//! address. So the number of connections Wayfinder holds is a constant of the
//! design, [`MAX_CONNECTIONS`], whatever the size of the catalog; it is built on
//! hyper's connection-level client so that nothing can open one more behind our
//! back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::task::TaskTracker;

use super::ConsulError;

/// Long polls the process may hold at once (each is one connection).
pub const MAX_LANES: usize = 4;
/// Connections shared by short requests.
pub const POOL_SIZE: usize = 3;
/// Every connection Wayfinder may hold to its Consul agent.
pub const MAX_CONNECTIONS: usize = MAX_LANES + POOL_SIZE;
/// How long a TCP connect to the agent may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a short request may take, connect included.
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read (a full catalog of 20,000 instances is about 25 MiB
/// from a dev agent, which indents its JSON).
pub const MAX_BODY: usize = 64 << 20;

/// The Consul endpoints Wayfinder calls, as counted in metrics (a fixed set, so
/// made-up service names cannot grow the label space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/health/state/critical`.
    HealthCritical,
    /// `/v1/health/state/warning`.
    HealthWarning,
    /// `/v1/internal/ui/services`: one summary line per service.
    UiServices,
    /// `/v1/internal/ui/nodes`: the whole catalog with health.
    UiNodes,
    /// `/v1/catalog/services`.
    CatalogServices,
    /// `/v1/health/service/<name>`.
    HealthService,
    /// `/v1/kv/<prefix>?recurse`.
    KvTree,
    /// `/v1/catalog/datacenters`.
    Datacenters,
    /// `/v1/agent/service/register` and `deregister`.
    AgentService,
    /// `/v1/status/leader`.
    StatusLeader,
    /// `/v1/agent/services`: the local agent's services (the register component).
    AgentServices,
    /// `/v1/agent/checks` and `/v1/agent/check/update/<id>`.
    AgentChecks,
}

impl Endpoint {
    /// Every endpoint, in metrics order.
    pub const ALL: [Endpoint; 12] = [
        Endpoint::HealthCritical,
        Endpoint::HealthWarning,
        Endpoint::UiServices,
        Endpoint::UiNodes,
        Endpoint::CatalogServices,
        Endpoint::HealthService,
        Endpoint::KvTree,
        Endpoint::Datacenters,
        Endpoint::AgentService,
        Endpoint::StatusLeader,
        Endpoint::AgentServices,
        Endpoint::AgentChecks,
    ];

    /// The metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::HealthCritical => "health_state_critical",
            Endpoint::HealthWarning => "health_state_warning",
            Endpoint::UiServices => "ui_services",
            Endpoint::UiNodes => "ui_nodes",
            Endpoint::CatalogServices => "catalog_services",
            Endpoint::HealthService => "health_service",
            Endpoint::KvTree => "kv",
            Endpoint::Datacenters => "catalog_datacenters",
            Endpoint::AgentService => "agent_service",
            Endpoint::StatusLeader => "status_leader",
            Endpoint::AgentServices => "agent_services",
            Endpoint::AgentChecks => "agent_checks",
        }
    }

    fn slot(self) -> usize {
        Endpoint::ALL.iter().position(|e| *e == self).unwrap_or(0)
    }
}

/// Counters of the traffic to Consul (read by `/metrics` and the stats page).
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Connections open right now.
    connections: AtomicI64,
    /// Connections opened since start.
    connects: AtomicU64,
    requests: [AtomicU64; Endpoint::ALL.len()],
    errors: [AtomicU64; Endpoint::ALL.len()],
}

impl HttpStats {
    /// Connections open to the agent right now.
    pub fn connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Connections opened since start.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Requests sent to `endpoint` since start.
    pub fn requests(&self, endpoint: Endpoint) -> u64 {
        self.requests[endpoint.slot()].load(Ordering::Relaxed)
    }

    /// Requests to `endpoint` that failed (no answer, error status, bad body).
    pub fn errors(&self, endpoint: Endpoint) -> u64 {
        self.errors[endpoint.slot()].load(Ordering::Relaxed)
    }
}

/// Consul's answer to one request.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: StatusCode,
    /// `X-Consul-Index` (0 when absent).
    pub index: u64,
    /// The body.
    pub body: Bytes,
}

/// One connection to the agent, reused request after request.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

/// A long poll's own connection: used by one task, one request at a time.
pub struct Lane {
    http: ConsulHttp,
    conn: Option<Conn>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Lane {
    /// The client the lane belongs to.
    pub fn http(&self) -> &ConsulHttp {
        &self.http
    }

    /// Sends a GET and reads the answer, within `timeout` (connect included).
    pub async fn get(&mut self, endpoint: Endpoint, path: &str, timeout: Duration) -> Result<Answer, ConsulError> {
        let http = self.http.clone();
        http.exchange(&mut self.conn, endpoint, Method::GET, path, Bytes::new(), timeout)
            .await
    }
}

/// The agent's HTTP API with a bounded number of connections (cheap to clone).
#[derive(Clone)]
pub struct ConsulHttp {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    stats: HttpStats,
    /// Free pool connections (at most [`POOL_SIZE`] exist: `pool_slots` bounds
    /// the requests using or opening one).
    idle: Mutex<Vec<Conn>>,
    pool_slots: Arc<Semaphore>,
    lane_slots: Arc<Semaphore>,
    /// Drives the connections (each task ends when its connection closes).
    connections: TaskTracker,
    /// What the process expects of the agent ([`AgentPhase`] as a number).
    phase: AtomicU8,
}

/// What the process expects of the Consul agent right now, so that a failed
/// request is logged for what it is: an outage (warn), or the agent that `up`
/// itself is starting or stopping (debug).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentPhase {
    /// It should answer: a failure is an outage. The default (an agent
    /// `up` does not run, a one-component command).
    Up = 0,
    /// `up` started the agent and it has had no leader yet.
    Starting = 1,
    /// The process is shutting down (`up` stops its agent before the views).
    Stopping = 2,
}

impl AgentPhase {
    fn of(n: u8) -> Self {
        match n {
            1 => AgentPhase::Starting,
            2 => AgentPhase::Stopping,
            _ => AgentPhase::Up,
        }
    }

    /// Whether a failed request now is an outage worth a warning.
    pub fn failure_is_outage(self) -> bool {
        self == AgentPhase::Up
    }
}

impl std::fmt::Debug for ConsulHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulHttp").field("addr", &self.inner.addr).finish()
    }
}

impl ConsulHttp {
    /// A client for the agent at `addr`; connects on first use.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            inner: Arc::new(Inner {
                addr,
                stats: HttpStats::default(),
                idle: Mutex::new(Vec::new()),
                pool_slots: Arc::new(Semaphore::new(POOL_SIZE)),
                lane_slots: Arc::new(Semaphore::new(MAX_LANES)),
                connections: TaskTracker::new(),
                phase: AtomicU8::new(AgentPhase::Up as u8),
            }),
        }
    }

    /// What the process expects of the agent now.
    pub fn phase(&self) -> AgentPhase {
        AgentPhase::of(self.inner.phase.load(Ordering::Relaxed))
    }

    /// Says what to expect of the agent from now on. Stopping is final: a
    /// late "has a leader" does not undo it.
    pub fn set_phase(&self, phase: AgentPhase) {
        let _ = self
            .inner
            .phase
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                (AgentPhase::of(now) != AgentPhase::Stopping).then_some(phase as u8)
            });
    }

    /// The agent's address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Traffic counters.
    pub fn stats(&self) -> &HttpStats {
        &self.inner.stats
    }

    /// A connection of its own for a long poll; `None` when [`MAX_LANES`] are
    /// taken (a design error: the process has a fixed set of long polls).
    pub fn lane(&self) -> Option<Lane> {
        let permit = self.inner.lane_slots.clone().try_acquire_owned().ok()?;
        Some(Lane {
            http: self.clone(),
            conn: None,
            _permit: permit,
        })
    }

    /// A short GET through the shared pool.
    pub async fn get(&self, endpoint: Endpoint, path: &str) -> Result<Answer, ConsulError> {
        self.pooled(endpoint, Method::GET, path, Bytes::new()).await
    }

    /// A short PUT with a JSON body through the shared pool; an error unless 2xx.
    pub async fn put_json(&self, endpoint: Endpoint, path: &str, body: &serde_json::Value) -> Result<(), ConsulError> {
        let body = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        let answer = self.pooled(endpoint, Method::PUT, path, body).await?;
        self.expect_success(endpoint, &answer)?;
        Ok(())
    }

    /// An error for a non-2xx answer.
    pub fn expect_success(&self, endpoint: Endpoint, answer: &Answer) -> Result<(), ConsulError> {
        if answer.status.is_success() {
            return Ok(());
        }
        self.inner.stats.errors[endpoint.slot()].fetch_add(1, Ordering::Relaxed);
        Err(ConsulError::Status {
            addr: self.inner.addr,
            endpoint: endpoint.name(),
            status: answer.status,
            body: String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)]).into_owned(),
        })
    }

    /// Decodes a 2xx JSON answer.
    pub fn decode<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        answer: &Answer,
    ) -> Result<T, ConsulError> {
        self.expect_success(endpoint, answer)?;
        serde_json::from_slice(&answer.body).map_err(|source| {
            self.inner.stats.errors[endpoint.slot()].fetch_add(1, Ordering::Relaxed);
            ConsulError::Decode {
                addr: self.inner.addr,
                endpoint: endpoint.name(),
                source,
            }
        })
    }

    async fn pooled(&self, endpoint: Endpoint, method: Method, path: &str, body: Bytes) -> Result<Answer, ConsulError> {
        let _slot = self.inner.pool_slots.acquire().await.map_err(|_| ConsulError::Closed)?;
        let mut conn = self.inner.idle.lock().await.pop();
        let result = self
            .exchange(&mut conn, endpoint, method, path, body, SHORT_TIMEOUT)
            .await;
        if let Some(conn) = conn {
            self.inner.idle.lock().await.push(conn);
        }
        result
    }

    /// One request on `conn` (connecting first when there is none or it broke).
    /// A GET that fails on a reused connection is sent once more on a new one:
    /// the agent may have closed an idle connection in the meantime.
    async fn exchange(
        &self,
        conn: &mut Option<Conn>,
        endpoint: Endpoint,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, ConsulError> {
        self.inner.stats.requests[endpoint.slot()].fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(timeout, async {
            let reused = conn.as_ref().is_some_and(|c| !c.sender.is_closed());
            let first = self.send_on(conn, method.clone(), path, body.clone()).await;
            match first {
                Err(ConsulError::Http { .. }) if reused && method == Method::GET => {
                    *conn = None;
                    self.send_on(conn, method, path, body).await
                }
                other => other,
            }
        })
        .await;
        let result = match result {
            Ok(r) => r,
            Err(_) => {
                // The connection may be mid-answer: never reuse it.
                *conn = None;
                Err(ConsulError::Timeout {
                    addr: self.inner.addr,
                    endpoint: endpoint.name(),
                    after: timeout,
                })
            }
        };
        if result.is_err() {
            *conn = None;
            self.inner.stats.errors[endpoint.slot()].fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn send_on(
        &self,
        conn: &mut Option<Conn>,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Answer, ConsulError> {
        let addr = self.inner.addr;
        if conn.as_ref().is_none_or(|c| c.sender.is_closed()) {
            *conn = Some(self.connect().await?);
        }
        let Some(c) = conn.as_mut() else {
            return Err(ConsulError::Closed);
        };
        let http_error = |source| ConsulError::Http { addr, source };
        c.sender.ready().await.map_err(http_error)?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .header(header::USER_AGENT, concat!("wayfinder/", env!("CARGO_PKG_VERSION")));
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Full::new(body)).map_err(|e| ConsulError::Request {
            addr,
            problem: e.to_string(),
        })?;
        let response = c.sender.send_request(request).await.map_err(http_error)?;
        let status = response.status();
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(source) => ConsulError::Http { addr, source: *source },
                Err(_) => ConsulError::TooLarge { addr, limit: MAX_BODY },
            })?
            .to_bytes();
        Ok(Answer { status, index, body })
    }

    async fn connect(&self) -> Result<Conn, ConsulError> {
        let addr = self.inner.addr;
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(ConsulError::Connect { addr, source }),
            Err(_) => {
                return Err(ConsulError::Connect {
                    addr,
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
                });
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConsulError::Http { addr, source })?;
        let inner = self.inner.clone();
        inner.stats.connections.fetch_add(1, Ordering::Relaxed);
        inner.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.inner.connections.spawn(async move {
            // Ends when the agent closes the connection or every sender is gone.
            let _ = connection.await;
            inner.stats.connections.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Conn { sender })
    }
}

/// Percent-encodes one path segment (a service name, a KV prefix's parts), so
/// that `#`, `?`, `/` or `..` in a name cannot change the URL Consul sees.
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // "." and ".." are unreserved but still walk the path.
    if out == "." || out == ".." {
        return out.replace('.', "%2E");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_phase_warns_only_when_it_should_answer_and_stopping_is_final() {
        let http = ConsulHttp::new(SocketAddr::from(([127, 0, 0, 1], 8500)));
        assert_eq!(http.phase(), AgentPhase::Up, "an agent up does not run should answer");
        assert!(http.phase().failure_is_outage());
        http.set_phase(AgentPhase::Starting);
        assert!(!http.clone().phase().failure_is_outage(), "shared by clones");
        http.set_phase(AgentPhase::Up);
        assert!(http.phase().failure_is_outage());
        http.set_phase(AgentPhase::Stopping);
        http.set_phase(AgentPhase::Up);
        assert_eq!(
            http.phase(),
            AgentPhase::Stopping,
            "a late leader does not undo the stop"
        );
    }

    #[test]
    fn segments_cannot_change_the_url() {
        assert_eq!(segment("web"), "web");
        assert_eq!(segment("web-1_a.b"), "web-1_a.b");
        assert_eq!(segment("../agent/self"), "..%2Fagent%2Fself");
        assert_eq!(segment("a#b?c=d&e"), "a%23b%3Fc%3Dd%26e");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("."), "%2E");
        assert_eq!(segment("ü"), "%C3%BC");
    }

    #[test]
    fn every_endpoint_has_its_own_slot_and_label() {
        let mut labels = std::collections::HashSet::new();
        for (i, e) in Endpoint::ALL.into_iter().enumerate() {
            assert_eq!(e.slot(), i, "{e:?} listed twice in ALL");
            assert!(labels.insert(e.name()), "{e:?}: label {} taken", e.name());
        }
    }
}
