//! What a Consul registration may make the lb do: which addresses it connects
//! to (proxy, active checks, `haproxy_tcp` splices), which ports it listens on,
//! which names it routes.
//!
//! ```text
//!  ServiceSpec (from Consul, untrusted) ──table::compile──▶ BackendPolicy
//!     name not DNS-label characters        ─▶ the whole service refused
//!     instance reaching an own listener,
//!       or outside lb.backend_networks     ─▶ that instance refused
//!     haproxy_tcp port outside lb.tcp_ports,
//!       or an own listener's port           ─▶ that port not opened
//!  refusals ──▶ RoutingTable::refused (stats page, status page, logged once)
//! ```
//!
//! The rule is applied when a spec is compiled into the table, so the proxy,
//! the checker and the TCP listeners, which only use table instances, never see a
//! refused address, and the hot path pays nothing for it.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;

use ipnet::IpNet;
use serde::Serialize;

use crate::net::listeners::OwnListeners;

/// Longest service name taken (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// Ports `haproxy_tcp=` may open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRanges(Vec<RangeInclusive<u16>>);

impl Default for PortRanges {
    /// 1024-65535: a tag never takes a privileged port unless configured.
    fn default() -> Self {
        Self(vec![1024..=65535])
    }
}

impl PortRanges {
    /// Parses `"N"` and `"N-M"` entries.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let port = |t: &str| {
            t.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("`{t}` is not a port (1-65535)"))
        };
        entries
            .iter()
            .map(|e| {
                let (lo, hi) = match e.split_once('-') {
                    Some((lo, hi)) => (port(lo)?, port(hi)?),
                    None => (port(e)?, port(e)?),
                };
                if lo > hi {
                    return Err(format!("`{e}`: the range ends before it starts"));
                }
                Ok(lo..=hi)
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// True when `port` is in one of the ranges.
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(&port))
    }
}

impl fmt::Display for PortRanges {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| {
                if r.start() == r.end() {
                    r.start().to_string()
                } else {
                    format!("{}-{}", r.start(), r.end())
                }
            })
            .collect();
        out.write_str(&parts.join(","))
    }
}

/// Why a service, an instance or a port was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RefusalReason {
    /// The service name has characters outside a DNS label.
    Name,
    /// The instance's address is one of the appliance's own listeners.
    OwnListener {
        /// Which listener (`admin`, `lb http` ...).
        listener: &'static str,
    },
    /// The instance's address is the lb's own `haproxy_tcp` listener.
    OwnTcpListener,
    /// The instance's address is outside `lb.backend_networks`.
    OutsideNetworks,
    /// A `haproxy_tcp` port outside `lb.tcp_ports`.
    PortNotAllowed,
    /// A `haproxy_tcp` port of one of the appliance's own listeners.
    PortTaken {
        /// Which listener.
        listener: &'static str,
    },
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name => write!(
                f,
                "the name is not a DNS label (letters, digits, '-', '_'; at most {MAX_NAME_LEN})"
            ),
            Self::OwnListener { listener } => write!(f, "the address is the appliance's own {listener} listener"),
            Self::OwnTcpListener => f.write_str("the address is one of the lb's own haproxy_tcp listeners"),
            Self::OutsideNetworks => f.write_str("the address is outside lb.backend_networks"),
            Self::PortNotAllowed => f.write_str("the port is outside lb.tcp_ports"),
            Self::PortTaken { listener } => write!(f, "the port is the appliance's own {listener} port"),
        }
    }
}

/// One thing the table left out, for the status pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    /// Consul service name.
    pub service: String,
    /// Datacenter.
    pub datacenter: String,
    /// The instance (Consul service ID), when one instance was refused.
    pub instance: Option<String>,
    /// Its address, or the refused `haproxy_tcp` port on the lb's address.
    pub addr: Option<SocketAddr>,
    /// The refused `haproxy_tcp` port.
    pub port: Option<u16>,
    /// Why.
    pub reason: RefusalReason,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "service '{}' ({})", self.service, self.datacenter)?;
        if let (Some(id), Some(addr)) = (&self.instance, self.addr) {
            write!(f, " instance {id} at {addr}")?;
        }
        if let Some(port) = self.port {
            write!(f, " haproxy_tcp={port}")?;
        }
        write!(f, " refused: {}", self.reason)
    }
}

/// The rules, from `[lb]` and the appliance's listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendPolicy {
    /// The appliance's own listeners: never connected to, their ports never taken.
    pub own: OwnListeners,
    /// `lb.backend_networks` (empty: any).
    pub networks: Vec<IpNet>,
    /// `lb.tcp_ports`.
    pub tcp_ports: PortRanges,
}

impl BackendPolicy {
    /// Why the lb must not connect to `addr`, if it must not. `tcp_listeners` are
    /// the ports the lb's `haproxy_tcp` listeners take in this table.
    pub fn refuse_addr(&self, addr: SocketAddr, tcp_listeners: &BTreeSet<u16>) -> Option<RefusalReason> {
        if let Some(own) = self.own.reaches(addr) {
            return Some(RefusalReason::OwnListener { listener: own.what });
        }
        if tcp_listeners.contains(&addr.port()) && crate::net::host::is_local(addr.ip()) {
            return Some(RefusalReason::OwnTcpListener);
        }
        if !self.networks.is_empty() && !self.networks.iter().any(|n| n.contains(&addr.ip())) {
            return Some(RefusalReason::OutsideNetworks);
        }
        None
    }

    /// Why the lb must not listen on `port` for `haproxy_tcp`, if it must not.
    pub fn refuse_tcp_port(&self, port: u16) -> Option<RefusalReason> {
        if let Some(own) = self.own.has_port(port) {
            return Some(RefusalReason::PortTaken { listener: own.what });
        }
        (!self.tcp_ports.contains(port)).then_some(RefusalReason::PortNotAllowed)
    }
}

/// True when `name` can be a DNS label, so it is safe in a Host name, a URL
/// path and a Consul query (letters, digits, `-` and `_`, 1 to 63 of them).
pub fn is_service_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy() -> BackendPolicy {
        let mut own = OwnListeners::default();
        own.add("admin", a("127.0.0.1:9090"));
        own.add("lb http", a("0.0.0.0:8080"));
        BackendPolicy {
            own,
            networks: Vec::new(),
            tcp_ports: PortRanges::default(),
        }
    }

    #[test]
    fn own_listeners_and_the_lbs_tcp_ports_are_refused() {
        let p = policy();
        let none = BTreeSet::new();
        assert_eq!(
            p.refuse_addr(a("127.0.0.1:9090"), &none),
            Some(RefusalReason::OwnListener { listener: "admin" })
        );
        assert_eq!(
            p.refuse_addr(a("0.0.0.0:8080"), &none),
            Some(RefusalReason::OwnListener { listener: "lb http" })
        );
        assert_eq!(p.refuse_addr(a("127.0.0.1:9091"), &none), None);
        assert_eq!(p.refuse_addr(a("192.0.2.10:9090"), &none), None, "another host's port");
        let tcp = BTreeSet::from([5000]);
        assert_eq!(
            p.refuse_addr(a("127.0.0.1:5000"), &tcp),
            Some(RefusalReason::OwnTcpListener)
        );
        assert_eq!(p.refuse_addr(a("192.0.2.10:5000"), &tcp), None);
    }

    #[test]
    fn backend_networks_limit_instances_when_given() {
        let mut p = policy();
        p.networks = vec!["172.17.0.0/16".parse().unwrap()];
        let none = BTreeSet::new();
        assert_eq!(p.refuse_addr(a("172.17.0.5:80"), &none), None);
        assert_eq!(
            p.refuse_addr(a("10.0.0.5:80"), &none),
            Some(RefusalReason::OutsideNetworks)
        );
    }

    #[test]
    fn tcp_ports_stay_in_range_and_off_own_ports() {
        let p = policy();
        assert_eq!(p.refuse_tcp_port(1), Some(RefusalReason::PortNotAllowed));
        assert_eq!(p.refuse_tcp_port(1023), Some(RefusalReason::PortNotAllowed));
        assert_eq!(p.refuse_tcp_port(5000), None);
        assert_eq!(
            p.refuse_tcp_port(8080),
            Some(RefusalReason::PortTaken { listener: "lb http" })
        );
        let ranges = PortRanges::parse(&["53".into(), "2000-2010".into()]).unwrap();
        assert!(ranges.contains(53) && ranges.contains(2005) && !ranges.contains(2011));
        assert_eq!(ranges.to_string(), "53,2000-2010");
        assert!(PortRanges::parse(&["0".into()]).is_err());
        assert!(PortRanges::parse(&["9-3".into()]).is_err());
        assert!(PortRanges::parse(&["x".into()]).is_err());
    }

    #[test]
    fn service_names_are_dns_labels() {
        for ok in ["web", "my_app", "a-1", &"x".repeat(63)] {
            assert!(is_service_name(ok), "{ok}");
        }
        for bad in ["", "a/b", "../admin", "x?y", "a#b", "a.b", "a b", "ü", &"x".repeat(64)] {
            assert!(!is_service_name(bad), "{bad}");
        }
    }
}
