//! The register component's side of Docker: one `bollard` client (API
//! version negotiated down to the daemon's), and what the component asks of
//! it: the engine's ID, the running containers, one container's facts, and
//! the event stream, each turned into Wayfinder's own small types at once so
//! nothing past this module knows bollard's models.
//!
//! ```text
//!  endpoint (unix:// | tcp://) ──connect──▶ DockerClient
//!    engine_id()            /info      ID: which daemon's containers these are
//!    running()              /containers/json   IDs of running (and paused) containers
//!    inspect(id)            /containers/{id}/json ──▶ ContainerFacts (None: gone)
//!    events(since)          /events (container + network, the actions that matter) ──▶ Event
//! ```
//!
//! Everything a container says (env, labels, names) is untrusted and only
//! copied here; [`super::plan`] checks it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions};
use futures_util::{Stream, StreamExt};

use super::RegisterError;
use super::conventions::Port;

/// How long one Docker request (not the event stream) may take.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(15);

/// The event actions that change what a container should have in Consul.
pub const ACTIONS: &[&str] = &[
    "start",
    "restart",
    "die",
    "kill",
    "stop",
    "pause",
    "unpause",
    "health_status",
    "rename",
    "destroy",
    "update",
    "connect",
    "disconnect",
];

/// A connected Docker client.
#[derive(Clone)]
pub struct DockerClient {
    docker: Docker,
    endpoint: String,
}

/// A container's health as its Docker `HEALTHCHECK` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DockerHealth {
    /// Not yet decided (the start period).
    Starting,
    /// The last checks passed.
    Healthy,
    /// Failing.
    Unhealthy,
}

/// One published port: the container's port and where the host offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The container's port.
    pub port: Port,
    /// The host address it is bound to (`0.0.0.0` or `::`: every address
    /// of that family; Docker may give the two families different ports).
    pub host_ip: IpAddr,
    /// The host port.
    pub host_port: u16,
}

/// What Docker says about one container, copied out of its inspect answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerFacts {
    /// Its full ID.
    pub id: String,
    /// Its name, without the leading `/`.
    pub name: String,
    /// The image reference it was started from.
    pub image: String,
    /// Its environment (`KEY=VALUE`).
    pub env: Vec<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Running and not paused.
    pub serving: bool,
    /// Its `HEALTHCHECK` state, when it has one.
    pub health: Option<DockerHealth>,
    /// `bridge`, `host`, `none`, `container:<id>`, or a network name.
    pub network_mode: String,
    /// Its networks with its address on each (sorted by name).
    pub networks: Vec<(String, Option<IpAddr>)>,
    /// Ports it exposes (sorted).
    pub exposed: Vec<Port>,
    /// Ports the host publishes for it (sorted; one per binding).
    pub published: Vec<Published>,
}

/// One event that may change a container's services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The container it is about.
    pub container: String,
    /// `start`, `die`, `kill`, `health_status`, `connect` ...
    pub action: String,
    /// For `kill`: the signal number.
    pub signal: Option<i32>,
    /// When it happened (ns since the epoch), for `since=` on reconnect.
    pub time_nano: i64,
}

/// A `since`/`until` value Docker reads: seconds with nanoseconds.
pub fn docker_time(time_nano: i64) -> String {
    format!(
        "{}.{:09}",
        time_nano.div_euclid(1_000_000_000),
        time_nano.rem_euclid(1_000_000_000)
    )
}

impl DockerClient {
    /// Connects to `endpoint` and negotiates the API version.
    pub async fn connect(endpoint: &str) -> Result<Self, RegisterError> {
        let failed = |source: bollard::errors::Error| RegisterError::Docker {
            endpoint: endpoint.to_string(),
            what: "connect",
            source,
        };
        let docker = Docker::connect_with_host(endpoint).map_err(failed)?;
        let docker = docker.with_timeout(DOCKER_TIMEOUT);
        let docker = tokio::time::timeout(DOCKER_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| RegisterError::DockerTimeout {
                endpoint: endpoint.to_string(),
                what: "version",
            })?
            .map_err(failed)?;
        Ok(Self {
            docker,
            endpoint: endpoint.to_string(),
        })
    }

    /// The endpoint it talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn error(&self, what: &'static str) -> impl Fn(bollard::errors::Error) -> RegisterError + '_ {
        move |source| RegisterError::Docker {
            endpoint: self.endpoint.clone(),
            what,
            source,
        }
    }

    /// The negotiated API version (`1.41`).
    pub fn api_version(&self) -> String {
        let v = self.docker.client_version();
        format!("{}.{}", v.major_version, v.minor_version)
    }

    /// The daemon's ID (stable across reboots and host renames).
    pub async fn engine_id(&self) -> Result<String, RegisterError> {
        let info = self.docker.info().await.map_err(self.error("info"))?;
        Ok(info.id.unwrap_or_default())
    }

    /// IDs of the running (and paused) containers.
    pub async fn running(&self) -> Result<Vec<String>, RegisterError> {
        let options = ListContainersOptions {
            all: false,
            ..Default::default()
        };
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(self.error("list containers"))?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    /// The facts of container `id`; `None` when it no longer exists.
    pub async fn inspect(&self, id: &str) -> Result<Option<ContainerFacts>, RegisterError> {
        match self.docker.inspect_container(id, None::<InspectContainerOptions>).await {
            Ok(answer) => Ok(Some(facts(answer))),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.error("inspect")(e)),
        }
    }

    /// The daemon's events from `since` (ns since the epoch; `None`: from
    /// now) on, the relevant ones only; ends when the stream does.
    pub fn events(&self, since: Option<i64>) -> impl Stream<Item = Result<Event, RegisterError>> + Send + 'static {
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string(), "network".to_string()]),
            ("event".to_string(), ACTIONS.iter().map(|a| a.to_string()).collect()),
        ]);
        let options = EventsOptions {
            since: since.map(docker_time),
            until: None,
            filters: Some(filters),
        };
        let endpoint = self.endpoint.clone();
        self.docker.events(Some(options)).filter_map(move |item| {
            let out = match item {
                Ok(message) => event(message).map(Ok),
                Err(source) => Some(Err(RegisterError::Docker {
                    endpoint: endpoint.clone(),
                    what: "events",
                    source,
                })),
            };
            std::future::ready(out)
        })
    }
}

/// The container an event is about, and what happened; `None` for events
/// that are not about one container.
fn event(message: bollard::models::EventMessage) -> Option<Event> {
    use bollard::models::EventMessageTypeEnum as Kind;
    let actor = message.actor?;
    let attributes = actor.attributes.unwrap_or_default();
    let action = message.action?;
    // `health_status: healthy` → `health_status`.
    let action = action.split(':').next().unwrap_or_default().trim().to_string();
    let container = match message.typ? {
        Kind::CONTAINER => actor.id?,
        Kind::NETWORK => attributes.get("container")?.clone(),
        _ => return None,
    };
    let well_formed =
        !container.is_empty() && container.len() <= 128 && container.bytes().all(|b| b.is_ascii_hexdigit());
    if !well_formed {
        return None;
    }
    let signal = attributes.get("signal").and_then(|s| s.parse().ok());
    let time_nano = message
        .time_nano
        .or_else(|| message.time.map(|s| s.saturating_mul(1_000_000_000)))
        .unwrap_or(0);
    Some(Event {
        container,
        action,
        signal,
        time_nano,
    })
}

/// `8080/tcp` → the port.
fn parse_port(text: &str) -> Option<Port> {
    let (number, proto) = text.split_once('/').unwrap_or((text, "tcp"));
    let private = number.parse().ok()?;
    match proto {
        "tcp" => Some(Port { private, udp: false }),
        "udp" => Some(Port { private, udp: true }),
        _ => None,
    }
}

fn facts(answer: bollard::models::ContainerInspectResponse) -> ContainerFacts {
    use bollard::models::HealthStatusEnum;
    let config = answer.config.unwrap_or_default();
    let state = answer.state.unwrap_or_default();
    let settings = answer.network_settings.unwrap_or_default();
    let host = answer.host_config.unwrap_or_default();
    let health = state.health.and_then(|h| h.status).and_then(|s| match s {
        HealthStatusEnum::STARTING => Some(DockerHealth::Starting),
        HealthStatusEnum::HEALTHY => Some(DockerHealth::Healthy),
        HealthStatusEnum::UNHEALTHY => Some(DockerHealth::Unhealthy),
        _ => None,
    });
    let mut networks: Vec<(String, Option<IpAddr>)> = settings
        .networks
        .unwrap_or_default()
        .into_iter()
        .map(|(name, endpoint)| {
            let ip = endpoint
                .ip_address
                .as_deref()
                .filter(|a| !a.is_empty())
                .and_then(|a| a.parse().ok());
            (name, ip)
        })
        .collect();
    networks.sort();
    let mut exposed: Vec<Port> = config
        .exposed_ports
        .unwrap_or_default()
        .iter()
        .filter_map(|p| parse_port(p))
        .collect();
    exposed.sort_by_key(|p| (p.private, p.udp));
    exposed.dedup();
    let mut published: Vec<Published> = Vec::new();
    for (key, bindings) in settings.ports.unwrap_or_default() {
        let Some(port) = parse_port(&key) else { continue };
        for binding in bindings.unwrap_or_default() {
            let Some(host_port) = binding.host_port.as_deref().and_then(|p| p.parse::<u16>().ok()) else {
                continue;
            };
            let Some(host_ip) = binding
                .host_ip
                .as_deref()
                .map_or(Some(IpAddr::from([0, 0, 0, 0])), |a| {
                    if a.is_empty() {
                        Some(IpAddr::from([0, 0, 0, 0]))
                    } else {
                        a.parse::<IpAddr>().ok()
                    }
                })
            else {
                continue;
            };
            let entry = Published {
                port,
                host_ip,
                host_port,
            };
            if !published.contains(&entry) {
                published.push(entry);
            }
        }
    }
    published.sort_by_key(|p| (p.port.private, p.port.udp, p.host_ip.is_ipv6(), p.host_port));
    ContainerFacts {
        id: answer.id.unwrap_or_default(),
        name: answer.name.unwrap_or_default().trim_start_matches('/').to_string(),
        image: config.image.unwrap_or_default(),
        env: config.env.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        serving: state.running.unwrap_or(false) && !state.paused.unwrap_or(false),
        health,
        network_mode: host.network_mode.unwrap_or_default(),
        networks,
        exposed,
        published,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_keeps_nanoseconds() {
        assert_eq!(docker_time(1_700_000_000_123_456_789), "1700000000.123456789");
        assert_eq!(docker_time(5), "0.000000005");
    }

    #[test]
    fn events_name_their_container_and_signal() {
        let message: bollard::models::EventMessage = serde_json::from_str(
            r#"{"Type":"container","Action":"health_status: unhealthy","Actor":{"ID":"abc123","Attributes":{"name":"x"}},"time":1,"timeNano":1000000001}"#,
        )
        .unwrap();
        let e = event(message).unwrap();
        assert_eq!(
            (e.container.as_str(), e.action.as_str(), e.time_nano),
            ("abc123", "health_status", 1_000_000_001)
        );
        let kill: bollard::models::EventMessage = serde_json::from_str(
            r#"{"Type":"container","Action":"kill","Actor":{"ID":"abc","Attributes":{"signal":"15"}},"timeNano":2}"#,
        )
        .unwrap();
        assert_eq!(event(kill).unwrap().signal, Some(15));
        let connect: bollard::models::EventMessage = serde_json::from_str(
            r#"{"Type":"network","Action":"connect","Actor":{"ID":"netid","Attributes":{"container":"def0","name":"front"}},"timeNano":3}"#,
        )
        .unwrap();
        assert_eq!(event(connect).unwrap().container, "def0");
        let forged: bollard::models::EventMessage = serde_json::from_str(
            r#"{"Type":"network","Action":"connect","Actor":{"ID":"n","Attributes":{"container":"../x"}}}"#,
        )
        .unwrap();
        assert!(event(forged).is_none());
    }

    #[test]
    fn inspect_answers_become_facts() {
        let answer: bollard::models::ContainerInspectResponse = serde_json::from_str(
            r#"{"Id":"c0ffee","Name":"/web-1",
                "Config":{"Image":"registry:5000/team/web:1","Env":["SERVICE_TAGS=haproxy"],"Labels":{"a":"b"},
                          "ExposedPorts":{"8080/tcp":{},"53/udp":{},"x/sctp":{}}},
                "State":{"Running":true,"Paused":false,"Health":{"Status":"healthy"}},
                "HostConfig":{"NetworkMode":"bridge"},
                "NetworkSettings":{"Ports":{"8080/tcp":[{"HostIp":"0.0.0.0","HostPort":"32768"},{"HostIp":"::","HostPort":"32769"}],"53/udp":null},
                                   "Networks":{"bridge":{"IPAddress":"172.17.0.2"}}}}"#,
        )
        .unwrap();
        let f = facts(answer);
        assert_eq!(f.name, "web-1");
        assert!(f.serving);
        assert_eq!(f.health, Some(DockerHealth::Healthy));
        assert_eq!(f.exposed.len(), 2);
        let port = Port {
            private: 8080,
            udp: false,
        };
        let published = |ip: &str, host_port| Published {
            port,
            host_ip: ip.parse().unwrap(),
            host_port,
        };
        assert_eq!(f.published, vec![published("0.0.0.0", 32768), published("::", 32769)]);
        assert_eq!(
            f.networks,
            vec![("bridge".to_string(), Some("172.17.0.2".parse().unwrap()))]
        );
    }
}
