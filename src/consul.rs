//! A small Consul HTTP API client: the calls Wayfinder makes, nothing more.
//!
//! Watches use Consul blocking queries (`?index=N&wait=…`): the request returns when
//! the result changes or the wait ends. [`Watch`] applies Consul's documented index
//! rules (reset when the index goes backwards, never block on 0) and backs off on
//! errors, so a dead agent costs one request per backoff step, not a busy loop.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

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
    /// Consul's answer could not be decoded.
    #[error("could not decode consul's answer from {addr}: {source}")]
    Decode {
        /// Agent address.
        addr: SocketAddr,
        /// The cause.
        source: serde_json::Error,
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
pub struct HealthEntry {
    /// The node the instance runs on.
    pub node: HealthNode,
    /// The instance.
    pub service: HealthService,
}

/// The node part of a [`HealthEntry`].
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthNode {
    /// Node name.
    #[serde(default)]
    pub node: String,
    /// Node address.
    pub address: String,
}

/// The service part of a [`HealthEntry`].
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthService {
    /// Instance ID.
    #[serde(rename = "ID", default)]
    pub id: String,
    /// Service name.
    #[serde(default)]
    pub service: String,
    /// Instance address; empty means the node's address.
    #[serde(default)]
    pub address: String,
    /// Instance port.
    #[serde(default)]
    pub port: u16,
    /// Tags (null in Consul's JSON when there are none).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tags: Vec<String>,
}

impl HealthEntry {
    /// The address to reach the instance at: its own, else its node's.
    pub fn address(&self) -> &str {
        if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        }
    }
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
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

    /// GETs `path` (query string included, without `index`/`wait`) as a blocking
    /// query: the status, Consul's index and the body, once the index passes `index`.
    async fn get_indexed(&self, path: &str, index: u64) -> Result<(reqwest::StatusCode, u64, String), ConsulError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!(
            "http://{}{path}{sep}index={index}&wait={}s",
            self.addr,
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
        let body = resp.text().await.map_err(|source| ConsulError::Request {
            addr: self.addr,
            source,
        })?;
        Ok((status, new_index, body))
    }

    fn status_error(&self, status: reqwest::StatusCode, body: &str) -> ConsulError {
        ConsulError::Status {
            addr: self.addr,
            status,
            body: body.chars().take(200).collect(),
        }
    }

    /// A blocking GET of `path` decoded from JSON.
    pub async fn blocking_get<T: DeserializeOwned>(&self, path: &str, index: u64) -> Result<(T, u64), ConsulError> {
        let (status, new_index, body) = self.get_indexed(path, index).await?;
        if !status.is_success() {
            return Err(self.status_error(status, &body));
        }
        let value = serde_json::from_str(&body).map_err(|source| ConsulError::Decode {
            addr: self.addr,
            source,
        })?;
        Ok((value, new_index))
    }

    /// A blocking GET of every KV key under `prefix` with its value (UTF-8,
    /// `None` when the value is empty or not text); empty when none exists.
    pub async fn kv_tree(&self, prefix: &str, index: u64) -> Result<(Vec<(String, Option<String>)>, u64), ConsulError> {
        #[derive(serde::Deserialize)]
        struct KvEntry {
            #[serde(rename = "Key")]
            key: String,
            #[serde(rename = "Value")]
            value: Option<String>,
        }
        let (status, new_index, body) = self
            .get_indexed(&format!("/v1/kv/{prefix}?recurse&stale"), index)
            .await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok((Vec::new(), new_index));
        }
        if !status.is_success() {
            return Err(self.status_error(status, &body));
        }
        let entries: Vec<KvEntry> = serde_json::from_str(&body).map_err(|source| ConsulError::Decode {
            addr: self.addr,
            source,
        })?;
        use base64::Engine as _;
        let decode = |v: Option<String>| {
            let bytes = base64::engine::general_purpose::STANDARD.decode(v?).ok()?;
            String::from_utf8(bytes).ok()
        };
        let tree = entries.into_iter().map(|e| (e.key, decode(e.value))).collect();
        Ok((tree, new_index))
    }

    /// A PUT with a JSON body (agent endpoints such as service registration).
    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Result<(), ConsulError> {
        let resp = self
            .http
            .put(format!("http://{}{path}", self.addr))
            .json(body)
            .send()
            .await
            .map_err(|source| ConsulError::Request {
                addr: self.addr,
                source,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        Err(ConsulError::Status {
            addr: self.addr,
            status,
            body: body.chars().take(200).collect(),
        })
    }

    /// The passing instances of `service` (stale reads allowed), blocking until
    /// the result's index passes `index`.
    pub async fn passing_instances(&self, service: &str, index: u64) -> Result<(Vec<HealthEntry>, u64), ConsulError> {
        self.blocking_get(&format!("/v1/health/service/{service}?passing=1&stale"), index)
            .await
    }

    /// [`Self::passing_instances`] in another datacenter (Consul's `?dc=`).
    pub async fn passing_instances_in(
        &self,
        service: &str,
        datacenter: &str,
        index: u64,
    ) -> Result<(Vec<HealthEntry>, u64), ConsulError> {
        self.blocking_get(
            &format!("/v1/health/service/{service}?passing=1&stale&dc={datacenter}"),
            index,
        )
        .await
    }

    /// The datacenters Consul knows (WAN federation), its own included.
    pub async fn datacenters(&self) -> Result<Vec<String>, ConsulError> {
        let (status, _, body) = self.get_indexed("/v1/catalog/datacenters", 0).await?;
        if !status.is_success() {
            return Err(self.status_error(status, &body));
        }
        serde_json::from_str(&body).map_err(|source| ConsulError::Decode {
            addr: self.addr,
            source,
        })
    }

    /// The addresses of the passing instances of `service` (instance address, else
    /// node address), sorted and de-duplicated.
    pub async fn passing_addresses(&self, service: &str, index: u64) -> Result<(Vec<IpAddr>, u64), ConsulError> {
        let (entries, new_index) = self.passing_instances(service, index).await?;
        let mut addrs: Vec<IpAddr> = entries.iter().filter_map(|e| e.address().parse().ok()).collect();
        addrs.sort();
        addrs.dedup();
        Ok((addrs, new_index))
    }

    /// Every service in the catalog with the union of its instances' tags.
    pub async fn services(
        &self,
        index: u64,
    ) -> Result<(std::collections::BTreeMap<String, Vec<String>>, u64), ConsulError> {
        let (map, new_index): (std::collections::BTreeMap<String, Option<Vec<String>>>, u64) =
            self.blocking_get("/v1/catalog/services?stale", index).await?;
        Ok((
            map.into_iter().map(|(k, v)| (k, v.unwrap_or_default())).collect(),
            new_index,
        ))
    }
}

/// Blocking-query bookkeeping: the index to send next, the error backoff, and a
/// token bucket (burst [`WATCH_BURST`], one token per [`WATCH_REFILL`], so at most
/// 100 re-queries a second per watch) that lets
/// quick successive changes through at once but rate-limits a storm of immediate
/// answers (Consul's advice for blocking queries).
#[derive(Debug)]
pub struct Watch {
    index: u64,
    failures: u32,
    tokens: f64,
    refilled: std::time::Instant,
}

/// Immediate re-queries a watch may make in a row.
pub const WATCH_BURST: f64 = 4.0;
/// Time to earn one more immediate re-query.
pub const WATCH_REFILL: Duration = Duration::from_millis(10);

impl Default for Watch {
    fn default() -> Self {
        Self {
            index: 0,
            failures: 0,
            tokens: WATCH_BURST,
            refilled: std::time::Instant::now(),
        }
    }
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

    /// How long to wait before the next request after a successful one: nothing
    /// while the bucket has a token, else until it earns one.
    pub fn spacing(&mut self) -> Duration {
        let now = std::time::Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() / WATCH_REFILL.as_secs_f64();
        self.tokens = (self.tokens + earned).min(WATCH_BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Duration::ZERO
        } else {
            let wait = WATCH_REFILL.mul_f64(1.0 - self.tokens);
            self.tokens = 0.0;
            self.refilled = now + wait;
            wait
        }
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
        // WATCH_BURST immediate re-queries, then paced.
        for _ in 0..WATCH_BURST as usize {
            assert_eq!(w.spacing(), Duration::ZERO);
        }
        let paced = w.spacing();
        assert!(paced > WATCH_REFILL / 2 && paced <= WATCH_REFILL, "{paced:?}");
        for _ in 0..20 {
            assert!(w.failure() <= Duration::from_secs(30));
        }
    }
}
