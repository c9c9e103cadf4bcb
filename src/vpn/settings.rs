//! `[vpn]`: the vpn component's section of the configuration file, its
//! defaults, and its validation into [`VpnConfig`].
//!
//! ```text
//!  wayfinder.toml [vpn] + START_VPN, LISTEN_IP
//!      ──VpnSection──validate_vpn──▶ VpnConfig (vpn::run; the dns answers on its address)
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::shared::ConfigError;

/// `[vpn]`: the WireGuard server that gives laptops the platform's networks and DNS.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VpnSection {
    /// Run the vpn (read by the supervisor, which also honours `START_VPN`), and let
    /// the dns answer on the tunnel address. Default `false`.
    #[serde(default)]
    pub enabled: bool,
    /// UDP address WireGuard listens on. Default `0.0.0.0:51820`; `LISTEN_IP`
    /// replaces the address.
    #[serde(default = "default_vpn_listen")]
    pub listen: SocketAddr,
    /// Name of the TUN interface (at most 15 bytes). Default `wf0`.
    #[serde(default = "default_vpn_interface")]
    pub interface: String,
    /// The appliance's tunnel address with the prefix of the subnet peers get their
    /// addresses from. Default `10.200.0.1/24`.
    #[serde(default = "default_vpn_address")]
    pub address: String,
    /// Directory of the server key (`server.key`) and the peer registry
    /// (`peers.toml`), created 0700. Default `vpn`.
    #[serde(default = "default_vpn_dir")]
    pub dir: PathBuf,
    /// Public `host:port` written into client configs. Default `HOST_IP:<listen port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Networks reachable through the tunnel (e.g. the docker bridge networks),
    /// routed on the clients and forwarded by the host kernel. Besides the
    /// tunnel address, they are all a peer reaches, whatever its own config
    /// says (an nft table of the vpn's own drops the rest). Default none.
    #[serde(default)]
    pub routes: Vec<String>,
    /// MTU of the TUN interface and of client configs. Default `1420`.
    #[serde(default = "default_vpn_mtu")]
    pub mtu: u16,
    /// Masquerade tunnel traffic leaving towards `routes` (and only those, in
    /// the vpn's nft table), for networks that have no route back to the
    /// tunnel subnet. Default `false`.
    #[serde(default)]
    pub masquerade: bool,
}

impl Default for VpnSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

fn default_vpn_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 51820))
}

fn default_vpn_interface() -> String {
    "wf0".into()
}

fn default_vpn_address() -> String {
    "10.200.0.1/24".into()
}

fn default_vpn_dir() -> PathBuf {
    PathBuf::from("vpn")
}

fn default_vpn_mtu() -> u16 {
    1420
}

/// Validated `[vpn]`.
#[derive(Debug, Clone)]
pub struct VpnConfig {
    /// Whether the vpn (and the dns on the tunnel address) is on.
    pub enabled: bool,
    /// UDP listen address.
    pub listen: SocketAddr,
    /// TUN interface name.
    pub interface: String,
    /// The appliance's tunnel address and the peer subnet's prefix.
    pub address: ipnet::Ipv4Net,
    /// State directory (key, peers).
    pub dir: PathBuf,
    /// Client-config endpoint, when configured (else `HOST_IP:<port>` at use).
    pub endpoint: Option<String>,
    /// Networks routed through the tunnel.
    pub routes: Vec<IpNet>,
    /// Tunnel MTU.
    pub mtu: u16,
    /// Masquerade towards `routes`.
    pub masquerade: bool,
}

impl VpnConfig {
    /// The tunnel subnet (`10.200.0.0/24`).
    pub fn subnet(&self) -> ipnet::Ipv4Net {
        self.address.trunc()
    }
}

pub(crate) fn validate_vpn(
    vpn: &VpnSection,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<VpnConfig, ConfigError> {
    let VpnSection {
        enabled,
        listen,
        interface,
        address,
        dir,
        endpoint,
        routes,
        mtu,
        masquerade,
    } = vpn;
    let name_ok = !interface.is_empty()
        && interface.len() <= 15
        && interface
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !name_ok {
        return Err(err(
            "vpn.interface",
            format!("`{interface}` is not an interface name (1-15 letters, digits, `-`, `_`, `.`)"),
        ));
    }
    let address: ipnet::Ipv4Net = address.trim().parse().map_err(|_| {
        err(
            "vpn.address",
            format!("`{address}` is not an IPv4 address with a prefix, such as `10.200.0.1/24`"),
        )
    })?;
    if address.prefix_len() > 30 || address.addr() == address.network() || address.addr() == address.broadcast() {
        return Err(err(
            "vpn.address",
            format!(
                "`{address}` must be a host address inside a subnet of at least 4 addresses (prefix /30 or shorter)"
            ),
        ));
    }
    let routes = routes
        .iter()
        .map(|r| {
            r.trim()
                .parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| err("vpn.routes", format!("`{r}` is not a network such as `172.17.0.0/16`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(e) = endpoint {
        let ok = e
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
        if !ok {
            return Err(err("vpn.endpoint", format!("`{e}` is not `host:port`")));
        }
    }
    if !(576..=9000).contains(mtu) {
        return Err(err("vpn.mtu", format!("{mtu} is outside 576..=9000")));
    }
    Ok(VpnConfig {
        enabled: *enabled,
        listen: *listen,
        interface: interface.clone(),
        address,
        dir: dir.clone(),
        endpoint: endpoint.clone(),
        routes,
        mtu: *mtu,
        masquerade: *masquerade,
    })
}
