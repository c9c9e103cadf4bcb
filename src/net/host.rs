//! This host: its address, given (`HOST_IP`, or PanteraS's `IP`) or guessed
//! the way PanteraS's `generate_yml.sh` and README did; its name; the
//! addresses of its interfaces (the one place they are read).
//!
//! ```text
//!  HOST_IP ─▶ IP ─▶ guess: the host name's address (not loopback)
//!                        ─▶ DOCKER_HOST's address (tcp://ADDR:PORT)
//!                        ─▶ the first private (RFC 1918) interface address,
//!                           skipping docker/bridge/veth/tunnel interfaces
//!      ──▶ HostAddress { ip, from } ──▶ Config::host_ip (wildcard targets, lb
//!          landing host and registration, vpn endpoint, Consul's -bind)
//! ```
//!
//! What it came from is kept, so `wayfinder check` and the start-up log can say
//! "10.0.0.5 (guessed from interface eth0)" and a wrong guess is easy to fix.
//!
//! [`OwnAddresses`] is the set of this host's (non-loopback) addresses the dns
//! always answers: the host's own queries to the docker bridge can arrive
//! masqueraded from its outward address, which `allow` may not name.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};

use crate::env::{self, Env};

/// Where the host address came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// An environment variable (`HOST_IP` or `IP`).
    Variable(&'static str),
    /// The address the host name resolves to.
    HostName(String),
    /// `DOCKER_HOST`'s address.
    DockerHost,
    /// The first private address of this interface.
    Interface(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Variable(var) => write!(f, "from {var}"),
            Self::HostName(name) => write!(f, "guessed from the host name {name}"),
            Self::DockerHost => f.write_str("guessed from DOCKER_HOST"),
            Self::Interface(name) => write!(f, "guessed from interface {name}"),
        }
    }
}

/// This host's address and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddress {
    /// The address.
    pub ip: IpAddr,
    /// Where it came from.
    pub from: Origin,
}

impl HostAddress {
    /// True when it was guessed rather than given.
    pub fn guessed(&self) -> bool {
        !matches!(self.from, Origin::Variable(_))
    }
}

/// Interfaces whose addresses are never this host's address for others:
/// docker's bridges and veths, and tunnels (the vpn's own included).
fn is_internal_interface(name: &str) -> bool {
    [
        "docker", "br-", "veth", "virbr", "cni", "flannel", "wf", "wg", "tun", "tap", "lo",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// The guess PanteraS made, in its order; `None` when nothing fits.
pub fn guess(env: &dyn Env) -> Option<HostAddress> {
    let host_name = name();
    if let Some(name) = host_name
        && let Some(ip) = resolve(&name)
    {
        return Some(HostAddress {
            ip,
            from: Origin::HostName(name),
        });
    }
    if let Some(ip) = env.get(env::DOCKER_HOST).as_deref().and_then(docker_host_address) {
        return Some(HostAddress {
            ip,
            from: Origin::DockerHost,
        });
    }
    first_private(&interfaces()).map(|(name, ip)| HostAddress {
        ip: IpAddr::V4(ip),
        from: Origin::Interface(name),
    })
}

/// The first IPv4 address `name` resolves to that is not loopback (Debian maps
/// the host name to 127.0.1.1, which says nothing).
fn resolve(name: &str) -> Option<IpAddr> {
    (name, 0)
        .to_socket_addrs()
        .ok()?
        .map(|a| a.ip())
        .find(|ip| ip.is_ipv4() && !ip.is_loopback() && !ip.is_unspecified())
}

/// The address in `tcp://ADDR:PORT` (or `ADDR:PORT`, or a name that resolves);
/// `None` for a unix socket.
pub fn docker_host_address(value: &str) -> Option<IpAddr> {
    let rest = value.trim();
    if rest.starts_with("unix:") || rest.starts_with("npipe:") {
        return None;
    }
    let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
    let host = rest.split(['/', '?']).next()?;
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
        Ok(_) => None,
        Err(_) => resolve(host),
    }
}

/// The interfaces' IPv4 addresses, in the kernel's order.
fn interfaces() -> Vec<(String, Ipv4Addr)> {
    interface_addresses()
        .into_iter()
        .filter_map(|(name, ip)| match ip {
            IpAddr::V4(v4) => Some((name, v4)),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// Every address of this host's interfaces (IPv4 and IPv6), with the
/// interface's name, in the kernel's order; empty when they cannot be read.
pub fn interface_addresses() -> Vec<(String, IpAddr)> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|ifa| {
            let address = ifa.address.as_ref()?;
            let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            Some((ifa.interface_name, ip))
        })
        .collect()
}

/// This host's non-loopback interface addresses, read at start and again
/// (at most every [`OwnAddresses::REREAD`]) when asked about an address not
/// among them, so an address that appears later counts too. Asked only for
/// clients outside `allow`: the answer path never reads interfaces.
///
/// No spoofing concern: Linux drops a packet arriving from outside with a
/// source address of its own (`accept_local` is off by default).
pub struct OwnAddresses {
    addresses: arc_swap::ArcSwap<Vec<IpAddr>>,
    /// Milliseconds after `epoch` of the last read.
    read_at: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

impl Default for OwnAddresses {
    fn default() -> Self {
        Self::new()
    }
}

impl OwnAddresses {
    /// How long a read stands before an unknown address makes it read again.
    pub const REREAD: std::time::Duration = std::time::Duration::from_secs(5);

    /// Reads the interfaces now.
    pub fn new() -> Self {
        Self {
            addresses: arc_swap::ArcSwap::from_pointee(own_addresses()),
            read_at: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        }
    }

    /// True when `ip` is one of this host's non-loopback addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        use std::sync::atomic::Ordering;
        let ip = ip.to_canonical();
        if self.addresses.load().contains(&ip) {
            return true;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.read_at.load(Ordering::Relaxed);
        let due = now.saturating_sub(last) >= Self::REREAD.as_millis() as u64;
        // One caller reads; the others answer from the old list meanwhile.
        if due
            && self
                .read_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let fresh = own_addresses();
            let found = fresh.contains(&ip);
            self.addresses.store(std::sync::Arc::new(fresh));
            return found;
        }
        false
    }
}

fn own_addresses() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = interface_addresses()
        .into_iter()
        .map(|(_, ip)| ip.to_canonical())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The interface Docker's default bridge network uses.
pub const DOCKER_BRIDGE: &str = "docker0";

/// The IPv4 address of the docker bridge (`docker0`), when it exists: where
/// containers on the default network reach this host.
pub fn docker_bridge() -> Option<IpAddr> {
    bridge_of(&interfaces())
}

fn bridge_of(interfaces: &[(String, Ipv4Addr)]) -> Option<IpAddr> {
    interfaces
        .iter()
        .find(|(name, _)| name == DOCKER_BRIDGE)
        .map(|(_, ip)| IpAddr::V4(*ip))
}

/// True when `ip` is this host's: loopback, or assigned to one of its interfaces.
pub fn is_local(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || interface_addresses().iter().any(|(_, a)| a.to_canonical() == ip)
}

/// This host's name (`/proc/sys/kernel/hostname`), trimmed; `None` when unset.
pub fn name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
}

/// The first RFC 1918 address of an interface that is not internal.
fn first_private(interfaces: &[(String, Ipv4Addr)]) -> Option<(String, Ipv4Addr)> {
    interfaces
        .iter()
        .find(|(name, ip)| ip.is_private() && !is_internal_interface(name))
        .cloned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_addresses_are_the_interfaces_but_loopback() {
        let own = super::OwnAddresses::new();
        let first = super::interface_addresses()
            .into_iter()
            .map(|(_, ip)| ip)
            .find(|ip| !ip.is_loopback())
            .expect("this test needs a host with a non-loopback interface address");
        assert!(own.contains(first), "{first}");
        assert!(
            !own.contains("127.0.0.1".parse().unwrap()),
            "loopback is allow's to decide"
        );
        assert!(!own.contains("192.0.2.77".parse().unwrap()), "not this host's");
    }

    #[test]
    fn the_docker_bridge_is_docker0s_address() {
        let ifs = [
            ("eth0".to_string(), std::net::Ipv4Addr::new(10, 0, 0, 5)),
            ("docker0".to_string(), std::net::Ipv4Addr::new(172, 17, 0, 1)),
        ];
        assert_eq!(super::bridge_of(&ifs), Some("172.17.0.1".parse().unwrap()));
        assert_eq!(super::bridge_of(&ifs[..1]), None);
    }

    use super::*;

    #[test]
    fn docker_host_gives_its_address() {
        assert_eq!(
            docker_host_address("tcp://10.1.2.3:2376"),
            Some(IpAddr::from([10, 1, 2, 3]))
        );
        assert_eq!(docker_host_address("10.1.2.3:2375"), Some(IpAddr::from([10, 1, 2, 3])));
        assert_eq!(
            docker_host_address("tcp://[fd00::5]:2376"),
            Some("fd00::5".parse().unwrap())
        );
        assert_eq!(docker_host_address("unix:///var/run/docker.sock"), None);
        assert_eq!(
            docker_host_address("tcp://127.0.0.1:2375"),
            None,
            "loopback says nothing"
        );
        assert_eq!(docker_host_address(""), None);
    }

    #[test]
    fn the_first_private_address_skips_docker_and_tunnels() {
        let list = |v: &[(&str, [u8; 4])]| -> Vec<(String, Ipv4Addr)> {
            v.iter().map(|(n, ip)| (n.to_string(), Ipv4Addr::from(*ip))).collect()
        };
        let found = first_private(&list(&[
            ("lo", [127, 0, 0, 1]),
            ("docker0", [172, 17, 0, 1]),
            ("eth0", [192, 0, 2, 2]),
            ("br-1a2b", [172, 18, 0, 1]),
            ("wf0", [10, 200, 0, 1]),
            ("ens3", [10, 0, 0, 5]),
            ("ens4", [192, 168, 1, 9]),
        ]));
        assert_eq!(found, Some(("ens3".to_string(), Ipv4Addr::new(10, 0, 0, 5))));
        assert_eq!(first_private(&list(&[("eth0", [192, 0, 2, 2])])), None, "not private");
    }

    #[test]
    fn origins_say_where_the_address_came_from() {
        assert_eq!(Origin::Variable("IP").to_string(), "from IP");
        assert_eq!(
            Origin::Interface("ens3".into()).to_string(),
            "guessed from interface ens3"
        );
        let a = HostAddress {
            ip: IpAddr::from([10, 0, 0, 5]),
            from: Origin::DockerHost,
        };
        assert!(a.guessed());
    }
}
