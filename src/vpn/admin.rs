//! The vpn as the admin endpoint shows and changes it: the shapes of the
//! `vpn` part of `/api/status` and of the peer actions' answers and refusals
//! (the actions themselves are the vpn component's, in `component.rs`).
//!
//! ```text
//!  Vpn component (the running VpnState) ──report()──▶ VpnReport (API, page, terminal)
//!  POST   /api/vpn/peers  {"name"} | name=…   ─▶ checks ─▶ vpn::add_client ─▶ NewPeerAnswer
//!  DELETE /api/vpn/peers/<name>, POST …/<name>/remove ─▶ VpnState::remove_peer
//! ```
//!
//! Adding goes through `vpn::add_client`, the same path as `wayfinder vpn peer
//! add`: next free address, a new key pair, saved in `vpn.dir`, applied to the
//! running server at once. The client's private key is in the answer only; it
//! is never stored or logged. Every refusal is a 4xx with a message that says
//! what to change.

use std::net::{Ipv4Addr, SocketAddr};

use http::StatusCode;
use serde::Serialize;

use crate::vpn;

/// Longest request body a peer action reads (a name is at most 64 bytes).
pub const MAX_BODY: usize = 4096;

/// The vpn in `/api/status`.
#[derive(Debug, Clone, Serialize)]
pub struct VpnReport {
    /// The vpn is enabled on this host (`vpn.enabled = true` or `START_VPN=true`),
    /// so `up` supervises it.
    pub available: bool,
    /// Its unit is running now.
    pub running: bool,
    /// The TUN interface.
    pub interface: String,
    /// The appliance's tunnel address with the peer subnet's prefix.
    pub address: String,
    /// The UDP address WireGuard listens on.
    pub listen: Option<SocketAddr>,
    /// The `host:port` client configs dial (`vpn.endpoint` or `HOST_IP`); none
    /// when neither is set (adding a peer is refused then).
    pub endpoint: Option<String>,
    /// The server's public key, once the vpn has loaded it.
    pub public_key: Option<String>,
    /// Its peers, with live counters.
    pub peers: Vec<VpnPeerReport>,
}

/// One peer in `/api/status`.
#[derive(Debug, Clone, Serialize)]
pub struct VpnPeerReport {
    /// Name.
    pub name: String,
    /// Tunnel address.
    pub address: Ipv4Addr,
    /// Public key (base64).
    pub public_key: String,
    /// Where its last authenticated packet came from.
    pub endpoint: Option<SocketAddr>,
    /// Unix time (seconds) of its latest handshake; none yet: null.
    pub latest_handshake: Option<u64>,
    /// Payload bytes received from it.
    pub rx_bytes: u64,
    /// Payload bytes sent to it.
    pub tx_bytes: u64,
    /// Handshakes completed with it since the vpn started.
    pub handshakes: u64,
}

/// A refused peer action: the HTTP status and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRefusal {
    /// 4xx (5xx only when the registry could not be written).
    pub status: StatusCode,
    /// The message for people.
    pub message: String,
}

pub(crate) fn refuse(status: StatusCode, message: impl Into<String>) -> PeerRefusal {
    PeerRefusal {
        status,
        message: message.into(),
    }
}

/// True for a body that is a JSON object. `curl -d '{"name": ...}'`, as the
/// README and the ready banner write it, labels its JSON as a form (curl's
/// default type for `-d`); such a body is taken as JSON and answered with
/// JSON, while a browser's form (`name=...`) gets the HTML page.
pub fn is_json_object(body: &[u8]) -> bool {
    body.trim_ascii_start().starts_with(b"{")
}

/// The peer name from a JSON (`{"name": "..."}`) or form (`name=...`) body.
pub fn peer_name(body: &[u8], is_form: bool) -> Result<String, PeerRefusal> {
    let bad = || {
        refuse(
            StatusCode::BAD_REQUEST,
            "send the new peer's name: {\"name\": \"laptop-alice\"} as JSON, or name=laptop-alice from a form",
        )
    };
    let json = || {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct AddPeer {
            name: String,
        }
        serde_json::from_slice::<AddPeer>(body).ok().map(|a| a.name)
    };
    let name = if is_form {
        form_urlencoded::parse(body)
            .find(|(k, _)| k == "name")
            .map(|(_, v)| v.into_owned())
    } else {
        json()
    };
    let name = name.ok_or_else(bad)?.trim().to_string();
    if !vpn::peers::valid_name(&name) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("`{name}` is not a peer name: 1-64 letters, digits, `-`, `_`, `.` or `@`"),
        ));
    }
    Ok(name)
}

/// What a successful add answers.
#[derive(Debug, Clone, Serialize)]
pub struct NewPeerAnswer {
    /// Always true.
    pub ok: bool,
    /// The peer's name.
    pub name: String,
    /// Its tunnel address.
    pub address: Ipv4Addr,
    /// Its public key (base64).
    pub public_key: String,
    /// The complete wg-quick client config (holds the private key: shown once).
    pub config: String,
    /// The same config as a QR code, an inline SVG document.
    pub qr_svg: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_json_or_forms_and_are_checked() {
        assert_eq!(peer_name(br#"{"name": "laptop"}"#, false).unwrap(), "laptop");
        assert_eq!(peer_name(b"name=alice%40home&x=1", true).unwrap(), "alice@home");
        // curl -d without -H 'Content-Type: application/json'.
        assert!(is_json_object(br#" {"name":"laptop"}"#) && !is_json_object(b"name=laptop"));
        for (body, form) in [
            (&b"{}"[..], false),
            (b"not json", false),
            (br#"{"name": "a", "extra": 1}"#, false),
            (b"other=1", true),
        ] {
            let e = peer_name(body, form).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains("name"), "{e:?}");
        }
        let e = peer_name(b"name=two+words", true).unwrap_err();
        assert!(e.message.contains("`two words` is not a peer name"), "{e:?}");
        let e = peer_name(format!(r#"{{"name": "{}"}}"#, "x".repeat(65)).as_bytes(), false).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
