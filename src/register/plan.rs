//! What Consul should hold for one container: its facts from Docker, read
//! through registrator's conventions, in the address mode it asks for,
//! with Wayfinder's ownership in Meta. Pure (unit-tested); the registrar
//! diffs its output against what Consul holds.
//!
//! ```text
//!  ContainerFacts + Host (HOST_IP, host name, engine ID) + RegisterConfig
//!      ──plan()──▶ Planned { services: [Registration], refusals: [why] }
//!  Registration ──body()──▶ the JSON of PUT /v1/agent/service/register
//!               fingerprint: a hash of that body, kept in Meta, so a
//!               comparison with Consul is one string per service
//! ```
//!
//! A container registers only what Docker says it has: its own published
//! ports (host mode) or its own address on its own network (internal mode);
//! no variable or label can name an address.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};

use super::conventions::{self, Check, Container, Port, Probe};
use super::docker::{ContainerFacts, DockerHealth};
use super::settings::{AddressMode, RegisterConfig};

/// Ports one container may register; more refuse the container.
pub const MAX_PORTS: usize = 64;

/// Meta key: the container a service belongs to.
pub const META_CONTAINER: &str = "wayfinder-container";
/// Meta key: the Docker engine the container runs on.
pub const META_ENGINE: &str = "wayfinder-engine";
/// Meta key: the host name (for people; ownership is the engine or the host).
pub const META_HOST: &str = "wayfinder-host";
/// Meta key: the fingerprint of the registration as written.
pub const META_SPEC: &str = "wayfinder-spec";

/// Suffix of the check ID fed by Docker's `HEALTHCHECK`.
pub const HEALTH_CHECK_SUFFIX: &str = ":docker-health";

/// The per-container choice of address mode (registrator PR #258).
pub const INTERNAL_KEY: &str = "registrator:internal";

/// Who this host is, for ownership and addresses.
#[derive(Debug, Clone)]
pub struct Host {
    /// `HOST_IP`, for host-mode addresses.
    pub ip: Option<IpAddr>,
    /// The host name (generated service IDs, Meta).
    pub name: String,
    /// The Docker engine's ID.
    pub engine: String,
}

/// One service registration Wayfinder wants in Consul.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// Consul service ID.
    pub id: String,
    /// The container it belongs to.
    pub container: String,
    /// The JSON body (Meta includes the fingerprint).
    pub body: Value,
    /// The fingerprint in Meta.
    pub fingerprint: String,
    /// The TTL check fed by Docker health, and the status it should have.
    pub health: Option<(String, &'static str)>,
}

/// A container's plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Planned {
    /// What to register.
    pub services: Vec<Registration>,
    /// Why some (or all) of its ports are not registered.
    pub refusals: Vec<String>,
}

/// The Consul status of a Docker health state.
pub fn health_status(health: DockerHealth) -> &'static str {
    match health {
        DockerHealth::Healthy => "passing",
        DockerHealth::Starting | DockerHealth::Unhealthy => "critical",
    }
}

/// Whether the container asks for `internal` mode itself (label over env).
fn mode_of(facts: &ContainerFacts, default: AddressMode) -> Result<AddressMode, String> {
    let prefix = format!("{INTERNAL_KEY}=");
    let value = facts.labels.get(INTERNAL_KEY).cloned().or_else(|| {
        facts
            .env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix(&prefix).map(str::to_string))
    });
    match value {
        None => Ok(default),
        Some(v) => match crate::config::shared::parse_bool(&v) {
            Ok(true) => Ok(AddressMode::Internal),
            Ok(false) => Ok(AddressMode::Host),
            Err(e) => Err(format!("{INTERNAL_KEY}: {e}")),
        },
    }
}

/// Where a published port is reached: its own address when bound to one,
/// else `HOST_IP` when of the same family (Docker binds `0.0.0.0` and `::`
/// separately, sometimes on different ports).
fn host_binding(p: &super::docker::Published, host_ip: Option<IpAddr>) -> Option<SocketAddr> {
    if !p.host_ip.is_unspecified() {
        return Some(SocketAddr::new(p.host_ip, p.host_port));
    }
    let ip = host_ip?;
    (ip.is_ipv4() == p.host_ip.is_ipv4()).then(|| SocketAddr::new(ip, p.host_port))
}

/// The address of the container on the network `internal` mode uses.
fn internal_address(facts: &ContainerFacts, network: Option<&str>) -> Option<IpAddr> {
    let find = |name: &str| facts.networks.iter().find(|(n, _)| n == name).and_then(|(_, ip)| *ip);
    match network {
        Some(name) => find(name),
        None if facts.networks.len() == 1 => facts.networks[0].1,
        None => find("bridge").or_else(|| facts.networks.iter().find_map(|(_, ip)| *ip)),
    }
}

/// What Consul should hold for `facts` (nothing when it is not serving, or
/// being drained).
pub fn plan(facts: &ContainerFacts, config: &RegisterConfig, host: &Host) -> Planned {
    let mut out = Planned::default();
    if !facts.serving {
        return out;
    }
    if facts.network_mode.starts_with("container:") {
        // Its ports are another container's.
        return out;
    }
    let mode = match mode_of(facts, config.address) {
        Ok(mode) => mode,
        Err(why) => {
            out.refusals.push(why);
            return out;
        }
    };
    let host_network = facts.network_mode == "host";
    // (the container's port, the address and port registered)
    let mut targets: Vec<(Port, SocketAddr)> = Vec::new();
    match mode {
        AddressMode::Host if host_network => {
            let Some(ip) = host.ip else {
                out.refusals
                    .push("host network without HOST_IP: no address to register".into());
                return out;
            };
            targets.extend(facts.exposed.iter().map(|p| (*p, SocketAddr::new(ip, p.private))));
        }
        AddressMode::Host => {
            for p in &facts.published {
                if targets.iter().any(|(port, _)| *port == p.port) {
                    continue; // one service per container port: the first usable binding
                }
                if let Some(addr) = host_binding(p, host.ip) {
                    targets.push((p.port, addr));
                }
            }
            for p in &facts.published {
                if !targets.iter().any(|(port, _)| *port == p.port)
                    && !out
                        .refusals
                        .iter()
                        .any(|r| r.starts_with(&format!("port {} ", p.port.private)))
                {
                    out.refusals.push(format!(
                        "port {} is published on every address and HOST_IP is unknown (or of the other family)",
                        p.port.private
                    ));
                }
            }
        }
        AddressMode::Internal => {
            let ip = if host_network {
                host.ip
            } else {
                internal_address(facts, config.network.as_deref())
            };
            let Some(ip) = ip else {
                out.refusals.push(match &config.network {
                    Some(n) => format!("internal mode: no address on network `{n}`"),
                    None => "internal mode: no container address".into(),
                });
                return out;
            };
            let mut ports = facts.exposed.clone();
            for p in &facts.published {
                if !ports.contains(&p.port) {
                    ports.push(p.port);
                }
            }
            targets.extend(ports.into_iter().map(|p| (p, SocketAddr::new(ip, p.private))));
        }
    }
    if targets.len() > MAX_PORTS {
        out.refusals.push(format!(
            "{} ports (at most {MAX_PORTS} are registered per container)",
            targets.len()
        ));
        return out;
    }
    let ports: Vec<Port> = targets.iter().map(|(p, _)| *p).collect();
    let container = Container {
        name: &facts.name,
        image: &facts.image,
        env: &facts.env,
        labels: &facts.labels,
        ports: &ports,
    };
    let defs = match conventions::services(&container) {
        Ok(defs) => defs,
        Err(why) => {
            out.refusals.push(why.to_string());
            return out;
        }
    };
    for def in defs {
        let def = match def {
            Ok(def) => def,
            Err(why) => {
                out.refusals.push(why.to_string());
                continue;
            }
        };
        let Some((_, addr)) = targets.iter().find(|(p, _)| *p == def.port) else {
            continue;
        };
        let id = def.id.clone().unwrap_or_else(|| {
            let udp = if def.port.udp { ":udp" } else { "" };
            format!("{}:{}:{}{udp}", host.name, facts.name, def.port.private)
        });
        if out.services.iter().any(|s| s.id == id) {
            out.refusals
                .push(format!("service ID `{id}` is used by another of its ports"));
            continue;
        }
        let mut tags = def.tags.clone();
        for t in &config.tags {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
        if tags.len() > conventions::MAX_TAGS {
            out.refusals.push(format!(
                "{}: {} tags (at most {})",
                def.name,
                tags.len(),
                conventions::MAX_TAGS
            ));
            continue;
        }
        let mut meta: BTreeMap<String, String> = def.meta.clone();
        meta.insert(META_CONTAINER.into(), facts.id.clone());
        meta.insert(META_ENGINE.into(), host.engine.clone());
        meta.insert(META_HOST.into(), host.name.clone());
        let mut checks: Vec<Value> = Vec::new();
        if let Some(check) = &def.check {
            checks.push(probe_check(&id, check, *addr));
        }
        let health = facts
            .health
            .map(|h| (format!("{id}{HEALTH_CHECK_SUFFIX}"), health_status(h)));
        if let Some((check_id, _)) = &health {
            checks.push(json!({
                "CheckID": check_id,
                "Name": "Docker HEALTHCHECK",
                "TTL": format!("{}s", config.health_ttl.as_secs()),
            }));
        }
        let mut body = json!({
            "ID": id,
            "Name": def.name,
            "Tags": tags,
            "Address": addr.ip().to_string(),
            "Port": addr.port(),
            "Meta": meta,
            "Checks": checks,
        });
        let fingerprint = fingerprint(&body);
        body["Meta"][META_SPEC] = Value::String(fingerprint.clone());
        // The TTL check starts as Docker says (not in the fingerprint: a
        // status change is a check update, not a new registration).
        if let (Some((_, status)), Some(Value::Array(checks))) = (&health, body.get_mut("Checks"))
            && let Some(last) = checks.last_mut()
        {
            last["Status"] = Value::String((*status).to_string());
        }
        out.services.push(Registration {
            id,
            container: facts.id.clone(),
            body,
            fingerprint,
            health,
        });
    }
    out
}

fn probe_check(id: &str, check: &Check, addr: SocketAddr) -> Value {
    let secs = |d: Duration| format!("{}s", d.as_secs());
    let mut value = json!({
        "CheckID": format!("{id}:check"),
        "Name": "SERVICE_CHECK",
        "Interval": secs(check.interval),
        "Timeout": secs(check.timeout),
    });
    match &check.probe {
        Probe::Http(path) => value["HTTP"] = Value::String(format!("http://{addr}{path}")),
        Probe::Tcp => value["TCP"] = Value::String(addr.to_string()),
    }
    value
}

/// FNV-1a of the body's JSON (serde_json's maps are sorted, so equal bodies
/// hash equal), as 16 hex digits: stable across builds and versions.
fn fingerprint(body: &Value) -> String {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::super::docker::Published;
    use super::*;

    fn config() -> RegisterConfig {
        crate::register::settings::validate_register(&Default::default(), &|k, p| crate::config::shared::ConfigError {
            file: "t".into(),
            key: k.into(),
            problem: p,
        })
        .unwrap()
    }

    fn host() -> Host {
        Host {
            ip: Some("10.0.0.5".parse().unwrap()),
            name: "node1".into(),
            engine: "ENGINE".into(),
        }
    }

    fn web() -> ContainerFacts {
        ContainerFacts {
            id: "c0ffee".into(),
            name: "web-1".into(),
            image: "team/web:1".into(),
            env: vec!["SERVICE_TAGS=haproxy".into()],
            labels: BTreeMap::new(),
            serving: true,
            health: None,
            network_mode: "bridge".into(),
            networks: vec![("bridge".into(), Some("172.17.0.2".parse().unwrap()))],
            exposed: vec![Port {
                private: 8080,
                udp: false,
            }],
            published: vec![Published {
                port: Port {
                    private: 8080,
                    udp: false,
                },
                host_ip: "0.0.0.0".parse().unwrap(),
                host_port: 32768,
            }],
        }
    }

    #[test]
    fn host_mode_registers_host_ip_and_the_published_port_with_ownership() {
        let p = plan(&web(), &config(), &host());
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        let s = &p.services[0];
        assert_eq!(s.id, "node1:web-1:8080");
        assert_eq!(s.body["Name"], "web");
        assert_eq!(s.body["Address"], "10.0.0.5");
        assert_eq!(s.body["Port"], 32768);
        assert_eq!(s.body["Tags"], json!(["haproxy"]));
        assert_eq!(s.body["Meta"][META_CONTAINER], "c0ffee");
        assert_eq!(s.body["Meta"][META_ENGINE], "ENGINE");
        assert_eq!(s.body["Meta"][META_SPEC], s.fingerprint.as_str());
        // Same facts, same fingerprint; a change of tags, another one.
        assert_eq!(plan(&web(), &config(), &host()).services[0].fingerprint, s.fingerprint);
        let mut other = web();
        other.env = vec!["SERVICE_TAGS=haproxy,x".into()];
        assert_ne!(plan(&other, &config(), &host()).services[0].fingerprint, s.fingerprint);
    }

    #[test]
    fn a_port_published_on_both_families_is_registered_with_the_host_ip_family() {
        let mut c = web();
        c.published.insert(
            0,
            Published {
                port: Port {
                    private: 8080,
                    udp: false,
                },
                host_ip: "::".parse().unwrap(),
                host_port: 32770,
            },
        );
        let p = plan(&c, &config(), &host());
        assert_eq!(p.services[0].body["Port"], 32768, "{p:?}");
        let mut v6 = host();
        v6.ip = Some("fd00::5".parse().unwrap());
        assert_eq!(plan(&c, &config(), &v6).services[0].body["Port"], 32770);
        let mut bound = web();
        bound.published[0].host_ip = "127.0.0.1".parse().unwrap();
        assert_eq!(
            plan(&bound, &config(), &host()).services[0].body["Address"],
            "127.0.0.1"
        );
        let mut unknown = host();
        unknown.ip = None;
        let p = plan(&web(), &config(), &unknown);
        assert!(p.services.is_empty() && p.refusals[0].contains("HOST_IP"), "{p:?}");
    }

    #[test]
    fn not_serving_or_unpublished_means_nothing() {
        let mut stopped = web();
        stopped.serving = false;
        assert_eq!(plan(&stopped, &config(), &host()), Planned::default());
        let mut unpublished = web();
        unpublished.published.clear();
        assert!(plan(&unpublished, &config(), &host()).services.is_empty());
    }

    #[test]
    fn internal_mode_uses_the_container_address_and_its_own_port() {
        let mut c = web();
        c.labels.insert(INTERNAL_KEY.into(), "true".into());
        let s = &plan(&c, &config(), &host()).services[0];
        assert_eq!(
            (s.body["Address"].as_str(), s.body["Port"].as_u64()),
            (Some("172.17.0.2"), Some(8080))
        );
        let mut named = config();
        named.address = AddressMode::Internal;
        named.network = Some("front".into());
        let p = plan(&web(), &named, &host());
        assert!(p.services.is_empty() && p.refusals[0].contains("front"), "{p:?}");
    }

    #[test]
    fn health_feeds_a_ttl_check_whose_status_is_not_in_the_fingerprint() {
        let mut c = web();
        c.health = Some(DockerHealth::Starting);
        let starting = plan(&c, &config(), &host()).services.remove(0);
        assert_eq!(starting.health.as_ref().unwrap().1, "critical");
        assert_eq!(starting.body["Checks"][0]["Status"], "critical");
        c.health = Some(DockerHealth::Healthy);
        let healthy = plan(&c, &config(), &host()).services.remove(0);
        assert_eq!(healthy.health.as_ref().unwrap().1, "passing");
        assert_eq!(healthy.fingerprint, starting.fingerprint);
    }

    #[test]
    fn hostile_settings_are_refused_and_cannot_claim_ownership() {
        let mut c = web();
        c.env = vec!["SERVICE_NAME=../x".into()];
        let p = plan(&c, &config(), &host());
        assert!(p.services.is_empty() && p.refusals.len() == 1, "{p:?}");
        let mut c = web();
        c.labels.insert("SERVICE_WAYFINDER-CONTAINER".into(), "other".into());
        assert!(plan(&c, &config(), &host()).services.is_empty());
        let mut c = web();
        c.published = (1..=100)
            .map(|n| Published {
                port: Port { private: n, udp: false },
                host_ip: "0.0.0.0".parse().unwrap(),
                host_port: 10000 + n,
            })
            .collect();
        assert!(plan(&c, &config(), &host()).refusals[0].contains("ports"));
        let mut c = web();
        c.env.push("SERVICE_TAGS=haproxy_weight=abc".into());
        assert!(plan(&c, &config(), &host()).services.is_empty());
    }
}
