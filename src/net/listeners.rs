//! The appliance's own TCP listeners, and whether an address reaches one.
//!
//! ```text
//!  every section's listeners (lb http/https/stats, dns listen, admin, Consul's
//!  HTTP/DNS/RPC ports) ──Config::own_listeners──▶ the control plane's addresses
//!  an address from Consul ──reaches()──▶ the listener it would connect to, if any
//! ```
//!
//! Used by the lb (a Consul registration must never make it proxy, check or
//! splice to the appliance itself) and by the dns config check (an upstream that
//! is the dns itself). A listener on a wildcard address owns every local address
//! with its port; connecting to `0.0.0.0` or `::` reaches the host too.
//!
//! [`refuse`] is how every listener turns a client away (over a cap, outside
//! `allow`): a reset, so a flood of refused connections leaves no orphaned
//! socket in FIN_WAIT2 or TIME_WAIT behind in the kernel.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Closes an accepted connection the listener will not serve, with a reset:
/// nothing queued is sent and the kernel keeps no state for it afterwards
/// (a plain close would leave an orphaned socket for up to `tcp_fin_timeout`
/// per refused connection, while the peer holds its end open).
pub fn refuse(stream: tokio::net::TcpStream) {
    // Only fails on a socket that is already gone; dropping it closes it either way.
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// A listening, non-blocking TCP socket on `addr` (`SO_REUSEADDR`, backlog
/// 1024), as every TCP listener of the appliance but the dns's is bound.
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Consul's server RPC, Serf LAN and Serf WAN ports (the agent `up` runs binds
/// them on the cluster address; they are control plane like its HTTP API).
pub const CONSUL_CLUSTER_PORTS: [u16; 3] = [8300, 8301, 8302];

/// One listener of the appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnListener {
    /// What it is, for messages (`admin`, `lb http`, `consul http` ...).
    pub what: &'static str,
    /// Its address (a wildcard address owns every local address).
    pub addr: SocketAddr,
}

/// The TCP listeners of the appliance (this process and the Consul agent it
/// runs or talks to).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnListeners {
    listeners: Vec<OwnListener>,
}

impl OwnListeners {
    /// Adds a listener (a bound socket's real address, e.g. after binding port 0).
    pub fn add(&mut self, what: &'static str, addr: SocketAddr) {
        let listener = OwnListener { what, addr };
        if !self.listeners.contains(&listener) {
            self.listeners.push(listener);
        }
    }

    /// The listeners.
    pub fn iter(&self) -> impl Iterator<Item = &OwnListener> {
        self.listeners.iter()
    }

    /// True when `port` is the port of one of the listeners (on any address).
    pub fn has_port(&self, port: u16) -> Option<&OwnListener> {
        self.listeners.iter().find(|l| l.addr.port() == port)
    }

    /// The listener a connection to `dest` would reach, if any.
    pub fn reaches(&self, dest: SocketAddr) -> Option<&OwnListener> {
        // Cheap first: no listener has the port (the usual case).
        self.has_port(dest.port())?;
        self.listeners.iter().find(|l| reaches(l.addr, dest))
    }
}

/// True when a connection (or datagram) to `dest` would reach the socket
/// listening on `listen`.
pub fn reaches(listen: SocketAddr, dest: SocketAddr) -> bool {
    if listen.port() != dest.port() {
        return false;
    }
    let dest_ip = connected(unmapped(dest.ip()));
    let listen_ip = unmapped(listen.ip());
    if listen_ip == dest_ip || connected(listen_ip) == dest_ip {
        return true;
    }
    // A wildcard listener also owns loopback and every local interface address.
    listen_ip.is_unspecified() && super::host::is_local(dest_ip)
}

/// IPv4-mapped IPv6 as IPv4.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Where a connection to `ip` goes: Linux connects the unspecified addresses to
/// loopback.
fn connected(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_wildcard_listener_owns_every_local_address_with_its_port() {
        let listen = a("0.0.0.0:9000");
        for dest in [
            "127.0.0.1:9000",
            "127.3.4.5:9000",
            "0.0.0.0:9000",
            "[::ffff:127.0.0.1]:9000",
        ] {
            assert!(reaches(listen, a(dest)), "{dest}");
        }
        assert!(!reaches(listen, a("127.0.0.1:9001")));
        // TEST-NET-3 is nobody's.
        assert!(!reaches(listen, a("203.0.113.7:9000")));
    }

    #[test]
    fn a_specific_listener_owns_only_its_address() {
        let listen = a("127.0.0.1:9000");
        assert!(reaches(listen, a("127.0.0.1:9000")));
        assert!(reaches(listen, a("0.0.0.0:9000")), "0.0.0.0 connects to the host");
        assert!(!reaches(listen, a("127.0.0.2:9000")));
        assert!(reaches(a("[::1]:53"), a("[::]:53")));
    }

    #[test]
    fn own_listeners_name_the_one_reached() {
        let mut own = OwnListeners::default();
        own.add("admin", a("127.0.0.1:8053"));
        own.add("lb http", a("0.0.0.0:80"));
        own.add("admin", a("127.0.0.1:8053"));
        assert_eq!(own.iter().count(), 2, "added once");
        assert_eq!(own.reaches(a("127.0.0.1:8053")).map(|l| l.what), Some("admin"));
        assert_eq!(own.reaches(a("127.0.0.9:80")).map(|l| l.what), Some("lb http"));
        assert_eq!(own.reaches(a("127.0.0.9:8053")), None);
        assert_eq!(own.has_port(80).map(|l| l.what), Some("lb http"));
    }
}
