//! A small Consul HTTP API client: the calls Wayfinder makes, nothing more.
//!
//! Watches use Consul blocking queries (`?index=N&wait=…`): the request returns when
//! the result changes or the wait ends. [`Watch`] applies Consul's documented index
//! rules (reset when the index goes backwards, never block on 0) and backs off on
//! errors, so a dead agent costs one request per backoff step, not a busy loop.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

/// Errors talking to Consul.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// The HTTP request failed (agent down, timeout).
    #[error("could not reach consul at {addr}: {source}")]
    Request {
        /// Agent address.
        addr: SocketAddr,
        /// The cause.
        source: reqwest::Error,
    },
    /// Consul answered with an error status.
    #[error("consul at {addr} answered {status}: {body}")]
    Status {
        /// Agent address.
        addr: SocketAddr,
        /// HTTP status.
        status: reqwest::StatusCode,
        /// Response body (trimmed).
        body: String,
    },
}

/// How long a blocking query may wait in Consul.
pub const BLOCKING_WAIT: Duration = Duration::from_secs(55);

/// A Consul agent's HTTP API.
#[derive(Clone, Debug)]
pub struct ConsulClient {
    addr: SocketAddr,
    http: reqwest::Client,
}

/// One instance in a `/v1/health/service` answer (only the fields we read).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: HealthNode,
    service: HealthService,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNode {
    address: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthService {
    #[serde(default)]
    address: String,
}

impl ConsulClient {
    /// A client for the agent at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            // Longer than the blocking wait plus Consul's jitter (wait/16).
            .timeout(BLOCKING_WAIT + Duration::from_secs(10))
            .build()
            .expect("reqwest client without TLS builds");
        Self { addr, http }
    }

    /// The addresses of the passing instances of `service` (instance address, else
    /// node address), blocking until the result's index passes `index`.
    pub async fn passing_addresses(&self, service: &str, index: u64) -> Result<(Vec<IpAddr>, u64), ConsulError> {
        let url = format!(
            "http://{}/v1/health/service/{}?passing=1&stale&index={}&wait={}s",
            self.addr,
            service,
            index,
            BLOCKING_WAIT.as_secs()
        );
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|source| ConsulError::Request {
                addr: self.addr,
                source,
            })?;
        let status = resp.status();
        let new_index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(ConsulError::Status {
                addr: self.addr,
                status,
                body: body.chars().take(200).collect(),
            });
        }
        let entries: Vec<HealthEntry> = resp.json().await.map_err(|source| ConsulError::Request {
            addr: self.addr,
            source,
        })?;
        let mut addrs: Vec<IpAddr> = entries
            .iter()
            .filter_map(|e| {
                let a = if e.service.address.is_empty() {
                    &e.node.address
                } else {
                    &e.service.address
                };
                a.parse().ok()
            })
            .collect();
        addrs.sort();
        addrs.dedup();
        Ok((addrs, new_index))
    }
}

/// Blocking-query bookkeeping: the index to send next and the error backoff.
#[derive(Debug, Default)]
pub struct Watch {
    index: u64,
    failures: u32,
}

impl Watch {
    /// The index for the next request.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Records a successful answer carrying `new_index`; true when it may differ
    /// from the last one.
    pub fn success(&mut self, new_index: u64) -> bool {
        self.failures = 0;
        // Consul's rules: an index that goes backwards means a reset (start over
        // from 0); a 0 answer would not block, which `spacing` rate-limits.
        let changed = new_index != self.index;
        self.index = if new_index < self.index { 0 } else { new_index };
        changed
    }

    /// Records a failure and returns how long to wait before retrying.
    pub fn failure(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.index = 0;
        let ms = 250u64 << self.failures.min(7);
        Duration::from_millis(ms.min(30_000))
    }

    /// The minimum spacing between two successful requests (rate limit when
    /// Consul returns at once, e.g. index reset storms).
    pub fn spacing(&self) -> Duration {
        Duration::from_millis(50)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        let mut w = Watch::default();
        assert!(w.success(10));
        assert_eq!(w.index(), 10);
        assert!(!w.success(10));
        assert!(w.success(5)); // backwards: reset
        assert_eq!(w.index(), 0);
        w.success(0);
        assert_eq!(w.index(), 0);
        assert!(w.failure() >= Duration::from_millis(250));
        for _ in 0..20 {
            assert!(w.failure() <= Duration::from_secs(30));
        }
    }
}
