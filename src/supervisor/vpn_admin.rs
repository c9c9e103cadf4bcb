//! The vpn as the admin endpoint shows and changes it: the `vpn` part of
//! `/api/status` and the two peer actions.
//!
//! ```text
//!  ComponentShared.vpn (the running VpnState) ──report()──▶ VpnReport (API, page, metrics, terminal)
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

use super::SupervisorState;
use super::unit::UnitState;
use crate::vpn::{self, VpnError, VpnState};

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

/// The running vpn's state, when the role starts the vpn and it has started.
pub fn running_state(state: &SupervisorState) -> Option<std::sync::Arc<VpnState>> {
    state.components.vpn.load_full().filter(|_| state.plan.starts("vpn"))
}

/// The vpn part of the status report.
pub fn report(state: &SupervisorState) -> VpnReport {
    let config = &state.config;
    let available = state.plan.starts("vpn");
    let running = available && state.unit("vpn").is_some_and(|u| u.state() == UnitState::Running);
    let vpn_state = running_state(state);
    VpnReport {
        available,
        running,
        interface: config.vpn.interface.clone(),
        address: config.vpn.address.to_string(),
        listen: state.addresses().vpn,
        endpoint: vpn::client_endpoint(config).ok(),
        public_key: vpn_state.as_ref().map(|v| v.public_key()),
        peers: vpn_state
            .map(|v| {
                v.peers()
                    .into_iter()
                    .map(|p| VpnPeerReport {
                        name: p.name,
                        address: p.address,
                        public_key: p.public_key,
                        endpoint: p.endpoint,
                        latest_handshake: p.last_handshake.map(|t| t.as_secs()),
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                        handshakes: p.handshakes,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// A refused peer action: the HTTP status and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 4xx (5xx only when the registry could not be written).
    pub status: StatusCode,
    /// The message for people.
    pub message: String,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// The vpn this action works on: enabled on this host and running.
fn usable(state: &SupervisorState) -> Result<std::sync::Arc<VpnState>, Refusal> {
    if !state.plan.starts("vpn") {
        return Err(refuse(
            StatusCode::CONFLICT,
            "the vpn is not enabled on this host: set `enabled = true` in the [vpn] section \
             of the config (vpn.enabled = true) or START_VPN=true, then restart wayfinder up",
        ));
    }
    let unit = state.unit("vpn").map(|u| u.snapshot());
    match (running_state(state), unit) {
        (Some(v), Some(u)) if u.state == UnitState::Running => Ok(v),
        (_, u) => {
            let (now, last) = u.map_or(("unknown".to_string(), None), |u| {
                (u.state.name().to_string(), u.last_exit)
            });
            let last = last.map_or_else(String::new, |l| format!("; last: {l}"));
            Err(refuse(
                StatusCode::CONFLICT,
                format!("the vpn is not running (it is {now}{last}); see GET /api/units"),
            ))
        }
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
pub fn peer_name(body: &[u8], is_form: bool) -> Result<String, Refusal> {
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

/// Adds the peer named in `body` (JSON, or a form when `is_form`) to the
/// running vpn. Whether the vpn can take one is checked first: that is the
/// answer that matters to someone whose vpn is off.
pub fn add(state: &SupervisorState, body: &[u8], is_form: bool) -> Result<NewPeerAnswer, Refusal> {
    let vpn_state = usable(state)?;
    let name = peer_name(body, is_form)?;
    let name = name.as_str();
    if vpn_state.table().entries().iter().any(|e| e.record.name == name) {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!("a peer named `{name}` exists already; remove it first or pick another name"),
        ));
    }
    let added = vpn::add_client(&state.config, &vpn_state, name).map_err(|e| match e {
        VpnError::NoEndpoint(c) => refuse(
            StatusCode::CONFLICT,
            format!(
                "no endpoint configured for client configs: {}; restart wayfinder up after setting it",
                c.problem
            ),
        ),
        // Duplicates raced past the check above, the subnet is full ...
        VpnError::Peer(p) => refuse(StatusCode::CONFLICT, p),
        other => refuse(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    })?;
    let config = added.client.render();
    let qr_svg = vpn::client::qr_svg(&config).map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    tracing::info!(
        peer = %added.record.name,
        address = %added.record.address,
        public_key = %added.record.public_key,
        "vpn peer added through the admin endpoint"
    );
    Ok(NewPeerAnswer {
        ok: true,
        name: added.record.name,
        address: added.record.address,
        public_key: added.record.public_key,
        config,
        qr_svg,
    })
}

/// Removes peer `name` (or the peer with that public key) from the running vpn;
/// its sessions end at once.
pub fn remove(state: &SupervisorState, name: &str) -> Result<(), Refusal> {
    let vpn_state = usable(state)?;
    match vpn_state.remove_peer(name) {
        Ok(true) => {
            tracing::info!(peer = %name, "vpn peer removed through the admin endpoint");
            Ok(())
        }
        Ok(false) => Err(refuse(
            StatusCode::NOT_FOUND,
            format!("there is no peer named `{name}`; see GET /api/status for the peers"),
        )),
        Err(e) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
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
