//! The status page at `/` of the admin endpoint: the appliance as a person sees
//! it ("Docker management for humans"): services with their instances and
//! health and the URLs and DNS names that reach them, the components and
//! programs with a restart button each, the vpn peers with a remove button each
//! and an "add peer" form.
//!
//! Rendered on the server from the same [`StatusReport`] as `/api/status`: one
//! self-contained HTML document with inline CSS, no script and no external
//! asset, laid out in one column so it reads on a phone. "add peer" posts a
//! plain form; its answer is a second page ([`render_new_peer`]) with the
//! client config and its QR code as inline SVG, for the WireGuard apps.

use std::fmt::Write as _;

use super::admin::StatusReport;
use super::unit::UnitState;
use super::vpn_admin::{NewPeerAnswer, VpnReport};
use crate::config::Config;

/// HTML-escapes `s`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "\
:root{--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;--muted:#57606a;--line:#d0d7de}\
*{box-sizing:border-box}body{font:16px/1.45 system-ui,-apple-system,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}\
header{background:#24292f;color:#fff;padding:.8em 1em}header h1{margin:0;font-size:1.25em}\
header p{margin:.2em 0 0;color:#d0d7de;font-size:.9em}main{max-width:56em;margin:0 auto;padding:.5em}\
section{background:#fff;border:1px solid var(--line);border-radius:8px;margin:.7em 0;padding:.7em .9em}\
h2{font-size:1.05em;margin:.1em 0 .5em}h3{font-size:1em;margin:0}.peer p{margin:.2em 0}\
.card{border-top:1px solid var(--line);padding:.6em 0}.card:first-of-type{border-top:0}\
.badge{display:inline-block;border-radius:1em;padding:0 .6em;font-size:.8em;font-weight:600;color:#fff;vertical-align:middle}\
.passing,.running,.up{background:var(--ok)}.warning,.backoff,.waiting,.starting,.stopping{background:var(--warn)}\
.critical,.failed,.down,.refused{background:var(--bad)}.off,.exited,.stopped{background:var(--muted)}\
ul{margin:.3em 0;padding-left:1.1em}li{margin:.15em 0}code{font-size:.9em;word-break:break-all}\
a{color:#0969da}.muted{color:var(--muted);font-size:.9em}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.35em .3em;border-top:1px solid var(--line);vertical-align:top}th{white-space:nowrap}td:first-child{overflow-wrap:anywhere;width:60%}\
button{font:inherit;font-size:.85em;padding:.2em .7em;border-radius:6px;border:1px solid var(--line);background:#f6f8fa}\
form{display:inline}@media (max-width:30em){.wide{display:none}}input{font:inherit;padding:.25em .5em;border:1px solid var(--line);border-radius:6px;width:11em;max-width:100%}pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f8fa;border:1px solid var(--line);border-radius:6px;padding:.6em;font-size:.85em}.qr svg{display:block;width:100%;max-width:20em;height:auto;margin:.5em auto}.add-peer{display:block;margin-top:.6em}";

fn badge(class: &str, text: &str) -> String {
    format!("<span class=\"badge {}\">{}</span>", escape(class), escape(text))
}

/// The page.
pub fn render(report: &StatusReport, q: &str) -> String {
    let mut html = String::with_capacity(16 * 1024);
    let consul = &report.consul;
    let consul_text = match (consul.reachable, consul.leader.as_deref()) {
        (true, Some(l)) if !l.is_empty() => format!("Consul: connected, leader {l}"),
        (true, _) => "Consul: reachable, no leader yet".to_string(),
        (false, _) => format!(
            "Consul: UNREACHABLE at {}",
            consul.addr.map(|a| a.to_string()).unwrap_or_default()
        ),
    };
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>wayfinder on {host}</title><style>{STYLE}</style></head><body>\
         <header><h1>wayfinder on {host}</h1><p>{role} &middot; {ready} &middot; {consul} &middot; up {uptime}</p></header><main>",
        host = escape(&report.host),
        role = escape(&report.role),
        ready = if report.ready { "ready" } else { "starting" },
        consul = escape(&consul_text),
        uptime = human_secs(report.uptime_secs),
    );

    // Services.
    let _ = write!(
        html,
        "<section id=\"services\"><h2>Services ({})</h2>",
        report.services.len()
    );
    if report.services.is_empty() {
        html.push_str("<p class=\"muted\">No services in Consul yet. Register one, e.g. with Marathon's <code>SERVICE_TAGS=haproxy</code>.</p>");
    }
    for s in &report.services {
        let passing = s.instances.iter().filter(|i| i.health == "passing").count();
        let overall = match (passing, s.instances.len()) {
            (_, 0) => "critical",
            (p, n) if p == n => "passing",
            (0, _) => "critical",
            _ => "warning",
        };
        let _ = write!(
            html,
            "<div class=\"card service\"><h3>{} {}</h3>",
            escape(&s.name),
            badge(overall, &format!("{passing}/{} passing", s.instances.len()))
        );
        html.push_str("<ul>");
        for u in &s.urls {
            let _ = write!(html, "<li>URL <a href=\"{0}\">{0}</a></li>", escape(u));
        }
        for d in &s.dns_names {
            let _ = write!(html, "<li>DNS <code>{}</code></li>", escape(d));
        }
        html.push_str("</ul><ul class=\"instances\">");
        for i in &s.instances {
            let lb = i.lb.as_deref().map_or_else(String::new, |l| {
                // `refused: <why>` is styled as refused, with the reason shown.
                let class = if l.starts_with("refused") { "refused" } else { l };
                format!(" lb {}", badge(class, l))
            });
            let _ = write!(
                html,
                "<li class=\"instance\"><code>{}</code> {} <span class=\"muted\">{} on {}</span>{lb}</li>",
                escape(&i.address),
                badge(&i.health, &i.health),
                escape(&i.id),
                escape(&i.node),
            );
        }
        html.push_str("</ul>");
        if !s.tags.is_empty() {
            let _ = write!(html, "<p class=\"muted\">tags: {}</p>", escape(&s.tags.join(", ")));
        }
        html.push_str("</div>");
    }
    html.push_str("</section>");

    // Components and programs.
    html.push_str(
        "<section id=\"units\"><h2>Components and programs</h2><table><thead><tr><th>name</th><th>state</th>\
         <th class=\"wide\">pid</th><th>up</th><th class=\"wide\">restarts</th><th></th></tr></thead><tbody>",
    );
    for u in &report.units {
        let button = match u.state {
            UnitState::Off => String::new(),
            _ => format!(
                "<form method=\"post\" action=\"/api/units/{name}/restart{q}\"><button>restart</button></form>",
                name = escape(&u.name)
            ),
        };
        let _ = write!(
            html,
            "<tr class=\"unit\"><td><b>{name}</b><br><span class=\"muted\">{class}: {why}{last}</span></td><td>{state}</td>\
             <td class=\"wide\">{pid}</td><td>{up}</td><td class=\"wide\">{restarts}</td><td>{button}</td></tr>",
            name = escape(&u.name),
            class = if u.class == super::unit::UnitClass::Program {
                "program"
            } else {
                "component"
            },
            why = escape(&u.why),
            last = u
                .last_exit
                .as_deref()
                .map_or_else(String::new, |l| format!("; last: {}", escape(l))),
            state = badge(u.state.name(), u.state.name()),
            pid = u.pid.map(|p| p.to_string()).unwrap_or_default(),
            up = u.uptime_secs.map(human_secs).unwrap_or_default(),
            restarts = u.restarts,
        );
    }
    html.push_str("</tbody></table></section>");

    // Where things listen.
    let a = &report.addresses;
    html.push_str("<section id=\"listeners\"><h2>Listening</h2><ul>");
    for d in &a.dns {
        let _ = write!(html, "<li>dns <code>{d}</code> (udp + tcp)</li>");
    }
    if let Some(h) = a.lb_http {
        let _ = write!(html, "<li>lb <code>http://{h}/</code></li>");
    }
    if let Some(h) = a.lb_https {
        let _ = write!(html, "<li>lb <code>https://{h}/</code></li>");
    }
    for c in report.lb.iter().flat_map(|lb| &lb.certificates) {
        let whose = if c.self_signed {
            ", self-signed (configure lb.certs to replace it)"
        } else {
            ""
        };
        let _ = write!(
            html,
            "<li>lb certificate {}{whose}, SHA-256 <code>{}</code></li>",
            escape(&c.names.join(", ")),
            escape(&c.sha256)
        );
    }
    if let Some(h) = a.lb_stats {
        let _ = write!(html, "<li>lb stats <code>http://{h}/</code></li>");
    }
    if let Some(v) = a.vpn {
        let _ = write!(html, "<li>vpn <code>{v}</code> (udp, WireGuard)</li>");
    }
    if let Some(c) = consul.addr {
        let _ = write!(html, "<li>consul <code>http://{c}/ui/</code></li>");
    }
    if let Some(admin) = a.admin {
        let _ = write!(html, "<li>admin <code>http://{admin}/</code> (this page)</li>");
    }
    if let Some(dns) = &report.dns {
        let total: u64 = dns.routes.values().map(|r| r.queries).sum();
        let _ = write!(html, "<li>dns answered {total} questions");
        if dns.routes.values().any(|r| r.queries > 0) {
            html.push_str(" (");
            let parts: Vec<String> = dns
                .routes
                .iter()
                .filter(|(_, r)| r.queries > 0)
                .map(|(n, r)| format!("{n} {}", r.queries))
                .collect();
            html.push_str(&escape(&parts.join(", ")));
            html.push(')');
        }
        html.push_str("</li>");
    }
    if let Some(lb) = &report.lb {
        let _ = write!(
            html,
            "<li>lb answered {} requests, {} routes, {} routing changes</li>",
            lb.requests.total(),
            lb.routes.len(),
            lb.changes
        );
    }
    html.push_str("</ul></section>");

    vpn_section(&mut html, &report.vpn, q);

    let _ = writeln!(
        html,
        "<p class=\"muted\">wayfinder {} &middot; <a href=\"/api/status{q}\">JSON</a> &middot; \
         <a href=\"/metrics{q}\">metrics</a></p></main></body></html>",
        escape(report.version)
    );
    html
}

/// The VPN section: where the vpn listens, its peers with a remove button
/// each, and the "add peer" form; or how to turn it on.
fn vpn_section(html: &mut String, vpn: &VpnReport, q: &str) {
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

/// The head of a page with `title`, and its header bar.
fn page_start(title: &str, subtitle: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t}</title><style>{STYLE}</style></head><body>\
         <header><h1>{t}</h1><p>{s}</p></header><main>",
        t = escape(title),
        s = escape(subtitle),
    )
}

/// The answer to "add peer" from the page: the client config in a `<pre>`,
/// the QR code inline (scan it with the WireGuard app), a download link, and
/// the way back. The private key is in this page only.
pub fn render_new_peer(config: &Config, peer: &NewPeerAnswer, q: &str) -> String {
    let mut html = page_start(
        &format!("peer {} added", peer.name),
        &format!("tunnel address {} on {}", peer.address, config.vpn.interface),
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

/// A refused form action (duplicate name, vpn off ...) as a page with the reason.
pub fn render_refusal(message: &str, q: &str) -> String {
    let mut html = page_start("not done", "wayfinder admin");
    let _ = write!(
        html,
        "<section id=\"refused\"><p>{}</p></section><p><a href=\"/{q}\">back to the status page</a></p>\
         </main></body></html>",
        escape(message)
    );
    html
}

/// `text` for a `data:` URL: everything but unreserved characters as `%XX`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `512 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `3d 4h`, `2h 5m`, `4m 10s`, `12s`.
pub fn human_secs(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_durations() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(human_secs(12.7), "12s");
        assert_eq!(human_secs(250.0), "4m 10s");
        assert_eq!(human_secs(7500.0), "2h 5m");
        assert_eq!(human_secs(3.0 * 86400.0 + 4.0 * 3600.0), "3d 4h");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 + 200 * 1024), "3.2 MiB");
        assert_eq!(percent_encode("a = b\n[x]"), "a%20%3D%20b%0A%5Bx%5D");
    }
}
