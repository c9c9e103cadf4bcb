//! The shapes of Consul's answers that Wayfinder reads (only the fields it
//! uses; everything else is ignored), and the short calls made through the pool.
//!
//! Every name that goes into a URL is percent-encoded ([`segment`]), and nothing
//! here trusts a value from Consul to be well formed: missing fields default,
//! `null` lists are empty.

use serde::{Deserialize, Deserializer};

use super::ConsulError;
use super::http::{ConsulHttp, Endpoint, segment};

pub(crate) fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A port, or 0 for anything else (null, negative, too large, not a number), so
/// that one bad registration cannot make a whole answer unreadable.
fn lenient_port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(value.as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or(0))
}

/// One health check (`/v1/health/state/*`, the checks of `/v1/health/service`
/// and `/v1/internal/ui/nodes`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct CheckRow {
    /// The node the check belongs to.
    #[serde(default, deserialize_with = "null_as_default")]
    pub node: String,
    /// Check ID (unique per node).
    #[serde(rename = "CheckID", default, deserialize_with = "null_as_default")]
    pub check_id: String,
    /// `passing`, `warning` or `critical` (anything else counts as critical).
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: String,
    /// The instance it checks; empty for a node check (which gates every
    /// instance on the node).
    #[serde(rename = "ServiceID", default, deserialize_with = "null_as_default")]
    pub service_id: String,
    /// The service of that instance.
    #[serde(default, deserialize_with = "null_as_default")]
    pub service_name: String,
}

/// The node part of a `/v1/health/service` row.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthNode {
    /// Node name.
    #[serde(default, deserialize_with = "null_as_default")]
    pub node: String,
    /// Node address.
    #[serde(default, deserialize_with = "null_as_default")]
    pub address: String,
}

/// A service instance, as `/v1/health/service` and `/v1/internal/ui/nodes` list it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRow {
    /// Instance ID.
    #[serde(rename = "ID", default, deserialize_with = "null_as_default")]
    pub id: String,
    /// Service name.
    #[serde(default, deserialize_with = "null_as_default")]
    pub service: String,
    /// Instance address; empty means the node's address.
    #[serde(default, deserialize_with = "null_as_default")]
    pub address: String,
    /// Instance port (0 when Consul holds something that is not a port: a
    /// registrant may write any number there).
    #[serde(default, deserialize_with = "lenient_port")]
    pub port: u16,
    /// Tags.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tags: Vec<String>,
    /// The raft index of the instance's last change.
    #[serde(default, deserialize_with = "null_as_default")]
    pub modify_index: u64,
}

/// One row of `/v1/health/service/<name>`: an instance, its node and its checks
/// (the node's checks included).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthRow {
    /// The node.
    pub node: HealthNode,
    /// The instance.
    pub service: ServiceRow,
    /// Its checks and its node's.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub checks: Vec<CheckRow>,
}

/// One node of `/v1/internal/ui/nodes`: its instances and every check on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UiNode {
    /// Node name.
    #[serde(default, deserialize_with = "null_as_default")]
    pub node: String,
    /// Node address.
    #[serde(default, deserialize_with = "null_as_default")]
    pub address: String,
    /// Instances on the node.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub services: Vec<ServiceRow>,
    /// Checks on the node (node checks and instance checks).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub checks: Vec<CheckRow>,
}

/// One line of `/v1/internal/ui/services`: enough to tell that a service changed.
#[derive(Debug, Clone, Deserialize, Hash, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct UiService {
    /// Service name.
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    /// Union of its instances' tags.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tags: Vec<String>,
    /// Nodes it runs on.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub nodes: Vec<String>,
    /// Instances.
    #[serde(default, deserialize_with = "null_as_default")]
    pub instance_count: u64,
    /// Checks by status.
    #[serde(default, deserialize_with = "null_as_default")]
    pub checks_passing: u64,
    /// Checks by status.
    #[serde(default, deserialize_with = "null_as_default")]
    pub checks_warning: u64,
    /// Checks by status.
    #[serde(default, deserialize_with = "null_as_default")]
    pub checks_critical: u64,
}

/// The instance address to connect to: its own, else its node's.
pub fn instance_address<'a>(service: &'a ServiceRow, node_address: &'a str) -> &'a str {
    if service.address.is_empty() {
        node_address
    } else {
        &service.address
    }
}

impl ConsulHttp {
    /// Every instance of `service` with its checks (stale reads allowed), in the
    /// local datacenter or in `datacenter`; with Consul's index for the service.
    pub async fn health_service(
        &self,
        service: &str,
        datacenter: Option<&str>,
    ) -> Result<(Vec<HealthRow>, u64), ConsulError> {
        let mut path = format!("/v1/health/service/{}?stale", segment(service));
        if let Some(dc) = datacenter {
            path.push_str("&dc=");
            path.push_str(&segment(dc));
        }
        let answer = self.get(Endpoint::HealthService, &path).await?;
        let rows = self.decode(Endpoint::HealthService, &answer)?;
        Ok((rows, answer.index))
    }

    /// The datacenters Consul knows (WAN federation), its own included.
    pub async fn datacenters(&self) -> Result<Vec<String>, ConsulError> {
        let answer = self.get(Endpoint::Datacenters, "/v1/catalog/datacenters").await?;
        self.decode(Endpoint::Datacenters, &answer)
    }

    /// The raft leader the agent reports (empty while there is none).
    pub async fn leader(&self) -> Result<String, ConsulError> {
        let answer = self.get(Endpoint::StatusLeader, "/v1/status/leader").await?;
        let leader: String = self.decode(Endpoint::StatusLeader, &answer)?;
        Ok(leader)
    }

    /// Registers a service instance with the local agent.
    pub async fn register(&self, registration: &serde_json::Value) -> Result<(), ConsulError> {
        self.put_json(Endpoint::AgentService, "/v1/agent/service/register", registration)
            .await
    }

    /// True while the local agent holds the service instance `id`.
    pub async fn has_agent_service(&self, id: &str) -> Result<bool, ConsulError> {
        let path = format!("/v1/agent/service/{}", segment(id));
        let answer = self.get(Endpoint::AgentService, &path).await?;
        if answer.status == ::http::StatusCode::NOT_FOUND {
            return Ok(false);
        }
        self.expect_success(Endpoint::AgentService, &answer)?;
        Ok(true)
    }

    /// Removes a service instance from the local agent.
    pub async fn deregister(&self, id: &str) -> Result<(), ConsulError> {
        let path = format!("/v1/agent/service/deregister/{}", segment(id));
        self.put_json(Endpoint::AgentService, &path, &serde_json::json!({}))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_and_missing_fields_default() {
        let rows: Vec<HealthRow> = serde_json::from_str(
            r#"[{"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"a","Service":"web","Tags":null,"Address":"","Port":80},"Checks":null},
                {"Node":{"Node":null,"Address":"10.0.0.2"},"Service":{"Service":"web"}}]"#,
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].service.tags.is_empty());
        assert!(rows[0].checks.is_empty());
        assert_eq!(instance_address(&rows[0].service, &rows[0].node.address), "10.0.0.1");
        assert_eq!(rows[1].service.port, 0);
        assert_eq!(rows[1].node.node, "");
    }

    #[test]
    fn a_bad_port_spoils_only_its_own_row() {
        let rows: Vec<ServiceRow> =
            serde_json::from_str(r#"[{"Port":70000},{"Port":-1},{"Port":"80"},{"Port":8080}]"#).unwrap();
        let ports: Vec<u16> = rows.iter().map(|r| r.port).collect();
        assert_eq!(ports, [0, 0, 0, 8080]);
    }
}
