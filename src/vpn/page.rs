//! The vpn's part of the status page (its peers with a remove button each and
//! the "add peer" form, or how to turn it on) and the page that answers "add
//! peer" from that form (the client config and its QR code, shown once).

use std::fmt::Write as _;

use super::admin::{NewPeerAnswer, VpnReport};
use serde_json::Value;

use crate::report::html::{badge, escape, human_bytes, human_secs, page_start, percent_encode};

/// The VPN section: where the vpn listens, its peers with a remove button
/// each, and the "add peer" form; or how to turn it on.
pub fn section(html: &mut String, vpn: &VpnReport, q: &str) {
    html.push_str("<section id=\"vpn\"><h2>VPN peers</h2>");
    if !vpn.available {
        html.push_str(
            "<p class=\"muted\">The vpn is off on this host. Turn it on with <code>enabled = true</code> \
             in the <code>[vpn]</code> section of the config (or <code>START_VPN=true</code>) and restart \
             <code>wayfinder up</code>: laptops and phones then get a WireGuard config and its QR code here.</p></section>",
        );
        return;
    }
    let state = if vpn.running {
        badge("running", "running")
    } else {
        badge("backoff", "not running")
    };
    let _ = write!(
        html,
        "<p>{state} <code>{}</code> on {}{}</p>",
        escape(&vpn.address),
        escape(&vpn.interface),
        vpn.listen
            .map_or_else(String::new, |l| format!(", udp <code>{l}</code>")),
    );
    match &vpn.endpoint {
        Some(e) => {
            let _ = write!(html, "<p class=\"muted\">clients dial <code>{}</code></p>", escape(e));
        }
        None => html.push_str(
            "<p class=\"muted\">Adding a peer needs the address clients dial: set <code>vpn.endpoint</code> \
             (<code>host:port</code>) or <code>HOST_IP</code>.</p>",
        ),
    }
    if vpn.peers.is_empty() {
        html.push_str("<p class=\"muted\">No peers yet.</p>");
    }
    // One card per peer rather than a table: a 44-character key and a button
    // must fit a phone's width.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for p in &vpn.peers {
        let handshake = p.latest_handshake.map_or_else(
            || "never".to_string(),
            |t| format!("{} ago", human_secs(now.saturating_sub(t) as f64)),
        );
        let _ = write!(
            html,
            "<div class=\"card peer\"><h3>{name} <code>{address}</code> \
             <form method=\"post\" action=\"/api/vpn/peers/{name}/remove{q}\"><button>remove</button></form></h3>\
             <p class=\"muted\">handshake {handshake} &middot; received {rx}, sent {tx}{from}<br>\
             key <code>{key}</code></p></div>",
            name = escape(&p.name),
            address = p.address,
            from = p
                .endpoint
                .map_or_else(String::new, |e| format!(" &middot; from <code>{e}</code>")),
            key = escape(&p.public_key),
            rx = human_bytes(p.rx_bytes),
            tx = human_bytes(p.tx_bytes),
        );
    }
    let _ = write!(
        html,
        "<form class=\"add-peer\" method=\"post\" action=\"/api/vpn/peers{q}\">\
         <label>new peer <input name=\"name\" required maxlength=\"64\" pattern=\"[A-Za-z0-9._@\\-]+\" \
         placeholder=\"laptop-alice\" autocomplete=\"off\"></label> <button>add peer</button></form>\
         <p class=\"muted\">Gives a WireGuard config and its QR code, shown once.</p></section>"
    );
}

/// The answer to "add peer" from the page: the client config in a `<pre>`,
/// the QR code inline (scan it with the WireGuard app), a download link, and
/// the way back. The private key is in this page only.
pub fn new_peer(interface: &str, peer: &NewPeerAnswer, q: &str) -> String {
    let mut html = page_start(
        &format!("peer {} added", peer.name),
        &format!("tunnel address {} on {}", peer.address, interface),
    );
    let file = format!("{}.conf", peer.name);
    let _ = write!(
        html,
        "<section id=\"new-peer\"><h2>Scan with the WireGuard app</h2>\
         <div class=\"qr\">{svg}</div>\
         <p class=\"muted\">The private key is shown only now and is not stored: scan the code or save the \
         file before leaving this page.</p></section>\
         <section id=\"client-config\"><h2>Or use this file: <code>{file}</code></h2>\
         <pre>{conf}</pre>\
         <p><a download=\"{file}\" href=\"data:text/plain;charset=utf-8,{data}\">download {file}</a> \
         &middot; <span class=\"muted\">then <code>wg-quick up ./{file}</code></span></p></section>\
         <p><a href=\"/{q}\">back to the status page</a></p></main></body></html>",
        svg = peer.qr_svg,
        file = escape(&file),
        conf = escape(&peer.config),
        data = percent_encode(&peer.config),
    );
    html
}

/// The vpn and its peers, for `wayfinder status` (from the vpn's part of `/api/status`).
pub fn terminal(out: &mut String, vpn: &Value) {
    if vpn["available"].as_bool() != Some(true) {
        let _ = writeln!(
            out,
            "\nVPN: off on this host (vpn.enabled = true or START_VPN=true turns it on)"
        );
        return;
    }
    let peers = vpn["peers"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "\nVPN {} on {}: {}, clients dial {} ({} peer{})",
        s(vpn, "address"),
        s(vpn, "interface"),
        if vpn["running"].as_bool() == Some(true) {
            "running"
        } else {
            "NOT RUNNING"
        },
        vpn["endpoint"]
            .as_str()
            .unwrap_or("(unset: set vpn.endpoint or HOST_IP)"),
        peers.len(),
        if peers.len() == 1 { "" } else { "s" },
    );
    if peers.is_empty() {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let _ = writeln!(
        out,
        "  {:<20} {:<15} {:<14} {:>11} {:>11}  ENDPOINT",
        "PEER", "ADDRESS", "HANDSHAKE", "RECEIVED", "SENT"
    );
    for p in &peers {
        let handshake = p["latest_handshake"].as_u64().map_or_else(
            || "never".to_string(),
            |t| format!("{} ago", human_secs(now.saturating_sub(t) as f64)),
        );
        let _ = writeln!(
            out,
            "  {:<20} {:<15} {:<14} {:>11} {:>11}  {}",
            s(p, "name"),
            s(p, "address"),
            handshake,
            human_bytes(p["rx_bytes"].as_u64().unwrap_or(0)),
            human_bytes(p["tx_bytes"].as_u64().unwrap_or(0)),
            p["endpoint"].as_str().unwrap_or("-"),
        );
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}
