//! The laptop's side: a complete wg-quick configuration for a new peer, and the
//! same text as a QR code (for the WireGuard mobile apps): in the terminal for
//! `peer add --qr`, as SVG for the admin API and the status page.
//!
//! Split tunnel by default: `AllowedIPs` is the tunnel subnet plus `vpn.routes`,
//! never `0.0.0.0/0`. `DNS` is the appliance's tunnel address plus the
//! `service.<consul domain>` search domain, so `curl http://web` works.

use std::fmt::Write;

use ipnet::IpNet;
use qrcode::QrCode;
use qrcode::render::svg;
use qrcode::render::unicode::Dense1x2;

/// Everything a client config says.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The client's private key (base64); printed once, never stored.
    pub private_key: String,
    /// The client's tunnel address.
    pub address: std::net::Ipv4Addr,
    /// The appliance's tunnel address (DNS server).
    pub dns: std::net::Ipv4Addr,
    /// Search domain, e.g. `service.consul`.
    pub search: String,
    /// Tunnel MTU.
    pub mtu: u16,
    /// The server's public key (base64).
    pub server_public_key: String,
    /// `host:port` of the server.
    pub endpoint: String,
    /// Networks routed into the tunnel.
    pub allowed_ips: Vec<IpNet>,
}

impl ClientConfig {
    /// The wg-quick file.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let allowed: Vec<String> = self.allowed_ips.iter().map(|n| n.to_string()).collect();
        let _ = write!(
            out,
            "[Interface]\nPrivateKey = {}\nAddress = {}/32\nDNS = {}, {}\nMTU = {}\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = {}\nPersistentKeepalive = 25\n",
            self.private_key,
            self.address,
            self.dns,
            self.search,
            self.mtu,
            self.server_public_key,
            self.endpoint,
            allowed.join(", "),
        );
        out
    }
}

/// A client config too long for a QR code.
#[derive(Debug, thiserror::Error)]
#[error("could not draw a QR code: {0}")]
pub struct QrError(#[from] qrcode::types::QrError);

/// `text` as a QR code drawn with Unicode half blocks (two modules per line).
pub fn qr(text: &str) -> Result<String, QrError> {
    let code = QrCode::new(text.as_bytes())?;
    Ok(code.render::<Dense1x2>().quiet_zone(true).build())
}

/// `text` as a QR code in SVG, without the XML declaration so that it can sit
/// inline in an HTML page (it scales: the page sets its displayed size).
pub fn qr_svg(text: &str) -> Result<String, QrError> {
    let code = QrCode::new(text.as_bytes())?;
    let image = code
        .render::<svg::Color>()
        .quiet_zone(true)
        .min_dimensions(256, 256)
        .build();
    Ok(match image.find("<svg") {
        Some(at) => image[at..].to_string(),
        None => image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_every_wg_quick_line() {
        let c = ClientConfig {
            private_key: "cHJpdmF0ZQ==".into(),
            address: "10.200.0.2".parse().unwrap(),
            dns: "10.200.0.1".parse().unwrap(),
            search: "service.consul".into(),
            mtu: 1420,
            server_public_key: "cHVibGlj".into(),
            endpoint: "198.51.100.7:51820".into(),
            allowed_ips: vec!["10.200.0.0/24".parse().unwrap(), "172.17.0.0/16".parse().unwrap()],
        };
        let text = c.render();
        for line in [
            "Address = 10.200.0.2/32",
            "DNS = 10.200.0.1, service.consul",
            "MTU = 1420",
            "Endpoint = 198.51.100.7:51820",
            "AllowedIPs = 10.200.0.0/24, 172.17.0.0/16",
            "PersistentKeepalive = 25",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        let code = qr(&text).unwrap();
        assert!(code.contains('█') && code.lines().count() > 20, "{code}");
        let svg = qr_svg(&text).unwrap();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert!(svg.contains("viewBox") && !svg.contains("<?xml"), "{svg}");
    }
}
