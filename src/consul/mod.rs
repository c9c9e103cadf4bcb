//! Wayfinder's side of Consul: one hub per process through which every part
//! that follows Consul reads it, on a fixed number of connections.
//!
//! ```text
//!  ConsulHub (one per process, created by `up` or the single-component command)
//!    http     ConsulHttp: MAX_LANES long-poll lanes + POOL_SIZE pooled connections
//!    catalog  CatalogView (started on first use): services, instances, health
//!    kv_tree  KvView per prefix (started on first use): e.g. haproxy/ for maxconn
//!  readers: lb table builder, dns wildcard targets, admin status, metrics
//! ```
//!
//! The hub outlives the components: when `up` restarts the lb, the new lb reads
//! the view the old one used, and its first table is built at once. The views
//! run until the hub's shutdown token is cancelled; a view whose task has ended
//! is started again by the next reader that asks for it.

pub mod api;
pub mod catalog;
pub mod http;
pub mod kv;
pub mod settings;
pub mod watch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use catalog::{Catalog, CatalogView, Health, InstanceEntry, ServiceEntry, Services};
pub use http::ConsulHttp;
pub use kv::KvView;

/// Errors talking to Consul.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// No TCP connection to the agent.
    #[error("could not connect to consul at {addr}: {source}")]
    Connect {
        /// Agent address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection reset, protocol error).
    #[error("consul at {addr}: {source}")]
    Http {
        /// Agent address.
        addr: SocketAddr,
        /// The cause.
        source: hyper::Error,
    },
    /// No answer in time.
    #[error("consul at {addr} did not answer {endpoint} within {after:?}")]
    Timeout {
        /// Agent address.
        addr: SocketAddr,
        /// What was asked.
        endpoint: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The request could not be built (a bug, or a name that is not valid in a URL).
    #[error("could not build a request to consul at {addr}: {problem}")]
    Request {
        /// Agent address.
        addr: SocketAddr,
        /// What was wrong.
        problem: String,
    },
    /// The answer was larger than [`http::MAX_BODY`].
    #[error("consul at {addr} sent more than {limit} bytes")]
    TooLarge {
        /// Agent address.
        addr: SocketAddr,
        /// The cap.
        limit: usize,
    },
    /// Consul answered with an error status.
    #[error("consul at {addr} answered {endpoint} with {status}: {body}")]
    Status {
        /// Agent address.
        addr: SocketAddr,
        /// What was asked.
        endpoint: &'static str,
        /// HTTP status.
        status: ::http::StatusCode,
        /// Response body (trimmed).
        body: String,
    },
    /// Consul's answer could not be decoded.
    #[error("could not decode consul's {endpoint} answer from {addr}: {source}")]
    Decode {
        /// Agent address.
        addr: SocketAddr,
        /// What was asked.
        endpoint: &'static str,
        /// The cause.
        source: serde_json::Error,
    },
    /// Every long-poll lane is taken (a view was started twice).
    #[error("no consul connection left for another watch ({} are allowed)", http::MAX_LANES)]
    NoLane,
    /// The hub is shutting down.
    #[error("the consul client is shutting down")]
    Closed,
}

/// The process's access to its Consul agent.
pub struct ConsulHub {
    http: ConsulHttp,
    resync: Duration,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    catalog: Mutex<Option<CatalogView>>,
    kv: Mutex<HashMap<String, KvView>>,
}

impl std::fmt::Debug for ConsulHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulHub").field("addr", &self.http.addr()).finish()
    }
}

impl ConsulHub {
    /// A hub for the agent at `addr`, re-reading the whole catalog every
    /// `resync`; its views run until `shutdown`.
    pub fn new(addr: SocketAddr, resync: Duration, shutdown: &CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            http: ConsulHttp::new(addr),
            resync,
            tasks: TaskTracker::new(),
            shutdown: shutdown.child_token(),
            catalog: Mutex::new(None),
            kv: Mutex::new(HashMap::new()),
        })
    }

    /// The agent's HTTP API (short requests go through its pool).
    pub fn http(&self) -> &ConsulHttp {
        &self.http
    }

    /// The live catalog, started on first use (and again if its task ended).
    pub fn catalog(&self) -> Result<CatalogView, ConsulError> {
        if self.shutdown.is_cancelled() {
            return Err(ConsulError::Closed);
        }
        let mut slot = self.catalog.lock();
        if let Some(view) = slot.as_ref().filter(|v| v.is_alive()) {
            return Ok(view.clone());
        }
        let view = catalog::start(self.http.clone(), self.resync, &self.tasks, &self.shutdown)?;
        *slot = Some(view.clone());
        Ok(view)
    }

    /// The catalog view if someone started it (the status page does not start it).
    pub fn catalog_if_started(&self) -> Option<CatalogView> {
        self.catalog.lock().clone()
    }

    /// The KV tree under `prefix`, followed live, started on first use.
    pub fn kv_tree(&self, prefix: &str) -> Result<KvView, ConsulError> {
        if self.shutdown.is_cancelled() {
            return Err(ConsulError::Closed);
        }
        let mut map = self.kv.lock();
        if let Some(view) = map.get(prefix).filter(|v| v.is_alive()) {
            return Ok(view.clone());
        }
        let view = kv::start(self.http.clone(), prefix, &self.tasks, &self.shutdown)?;
        map.insert(prefix.to_string(), view.clone());
        Ok(view)
    }

    /// Every watch the hub runs, for metrics.
    pub fn watches(&self) -> Vec<Arc<watch::WatchStats>> {
        let mut out = Vec::new();
        if let Some(c) = self.catalog.lock().as_ref() {
            out.extend(c.status().watches.iter().cloned());
        }
        out.extend(self.kv.lock().values().map(|k| k.stats().clone()));
        out
    }

    /// Stops the views and waits for their tasks.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
