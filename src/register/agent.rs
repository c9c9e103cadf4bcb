//! The register component's side of Consul: what the local agent holds
//! (the services Wayfinder owns there, and the IDs of every other one), and
//! the writes: register, deregister, a TTL check's status. Through the
//! process's Consul pool (bounded connections), on the agent endpoints.
//!
//! ```text
//!  GET /v1/agent/services, /v1/agent/checks ──read()──▶ AgentView { owned, foreign, ttl status }
//!  Registration ──register()──▶ PUT /v1/agent/service/register
//!  service ID   ──deregister()──▶ PUT /v1/agent/service/deregister/<id>
//!  check ID     ──set_status()──▶ PUT /v1/agent/check/update/<id>
//! ```
//!
//! Ownership: a service is Wayfinder's when its Meta names a container and
//! either this Docker engine or this host (so a renamed host, or a
//! reinstalled Docker, still finds its leftovers); everything else on the
//! agent is someone else's and never touched.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

use super::plan::{Host, META_CONTAINER, META_ENGINE, META_HOST, META_SPEC, Registration};
use crate::consul::http::{Endpoint, segment};
use crate::consul::{ConsulError, ConsulHttp};

/// One owned service as the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// The container its Meta names.
    pub container: String,
    /// The fingerprint its Meta carries (empty when none).
    pub fingerprint: String,
}

/// What the agent holds.
#[derive(Debug, Default)]
pub struct AgentView {
    /// Services Wayfinder owns, by ID.
    pub owned: HashMap<String, Owned>,
    /// IDs of every other service on the agent.
    pub foreign: HashSet<String>,
    /// Status of every check on the agent, by check ID.
    pub checks: HashMap<String, String>,
}

#[derive(Deserialize)]
struct AgentService {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Meta", default)]
    meta: Option<HashMap<String, String>>,
}

#[derive(Deserialize)]
struct AgentCheck {
    #[serde(rename = "Status", default)]
    status: String,
}

/// Reads the agent's services and checks.
pub async fn read(http: &ConsulHttp, host: &Host) -> Result<AgentView, ConsulError> {
    let answer = http.get(Endpoint::AgentServices, "/v1/agent/services").await?;
    let services: HashMap<String, AgentService> = http.decode(Endpoint::AgentServices, &answer)?;
    let answer = http.get(Endpoint::AgentChecks, "/v1/agent/checks").await?;
    let checks: HashMap<String, AgentCheck> = http.decode(Endpoint::AgentChecks, &answer)?;
    let mut view = AgentView {
        checks: checks.into_iter().map(|(id, c)| (id, c.status)).collect(),
        ..AgentView::default()
    };
    for (key, service) in services {
        let id = if service.id.is_empty() { key } else { service.id };
        let meta = service.meta.unwrap_or_default();
        let ours = meta
            .get(META_ENGINE)
            .is_some_and(|e| !e.is_empty() && *e == host.engine)
            || meta.get(META_HOST).is_some_and(|h| *h == host.name);
        match meta.get(META_CONTAINER) {
            Some(container) if ours => {
                let fingerprint = meta.get(META_SPEC).cloned().unwrap_or_default();
                view.owned.insert(
                    id,
                    Owned {
                        container: container.clone(),
                        fingerprint,
                    },
                );
            }
            _ => {
                view.foreign.insert(id);
            }
        }
    }
    Ok(view)
}

/// Registers (or replaces) one service.
pub async fn register(http: &ConsulHttp, registration: &Registration) -> Result<(), ConsulError> {
    http.register(&registration.body).await
}

/// Removes one service (and its checks); one already gone is not an error.
pub async fn deregister(http: &ConsulHttp, id: &str) -> Result<(), ConsulError> {
    match http.deregister(id).await {
        Err(ConsulError::Status { status, .. }) if status == http::StatusCode::NOT_FOUND => Ok(()),
        other => other,
    }
}

/// Sets a TTL check's status (and renews its TTL). `Ok(false)`: the agent
/// does not know the check (it lost its state).
pub async fn set_status(http: &ConsulHttp, check_id: &str, status: &str) -> Result<bool, ConsulError> {
    let path = format!("/v1/agent/check/update/{}", segment(check_id));
    let body = serde_json::json!({ "Status": status, "Output": format!("Docker HEALTHCHECK: {status} (set by wayfinder register)") });
    match http.put_json(Endpoint::AgentChecks, &path, &body).await {
        Ok(()) => Ok(true),
        Err(ConsulError::Status { status, body, .. })
            // Consul 1.8 answers 500 `CheckID "x" does not have associated
            // TTL` for a check it does not hold; later versions 404.
            if status == http::StatusCode::NOT_FOUND
                || (status == http::StatusCode::INTERNAL_SERVER_ERROR && body.contains("does not have associated TTL")) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
