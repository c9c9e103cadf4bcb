//! The status page at `/` of the admin endpoint: the appliance as a person sees
//! it ("Docker management for humans"): services with their instances and
//! health and the URLs and DNS names that reach them, the components and
//! programs with a restart button each, the vpn peers.
//!
//! Rendered on the server from the same [`StatusReport`] as `/api/status`: one
//! self-contained HTML document with inline CSS, no script and no external
//! asset, laid out in one column so it reads on a phone.

use std::fmt::Write as _;

use super::admin::StatusReport;
use super::unit::UnitState;

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
h2{font-size:1.05em;margin:.1em 0 .5em}h3{font-size:1em;margin:0}\
.card{border-top:1px solid var(--line);padding:.6em 0}.card:first-of-type{border-top:0}\
.badge{display:inline-block;border-radius:1em;padding:0 .6em;font-size:.8em;font-weight:600;color:#fff;vertical-align:middle}\
.passing,.running,.up{background:var(--ok)}.warning,.backoff,.waiting,.starting,.stopping{background:var(--warn)}\
.critical,.failed,.down{background:var(--bad)}.off,.unavailable,.exited,.stopped{background:var(--muted)}\
ul{margin:.3em 0;padding-left:1.1em}li{margin:.15em 0}code{font-size:.9em;word-break:break-all}\
a{color:#0969da}.muted{color:var(--muted);font-size:.9em}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.35em .3em;border-top:1px solid var(--line);vertical-align:top}th{white-space:nowrap}td:first-child{overflow-wrap:anywhere;width:60%}\
button{font:inherit;font-size:.85em;padding:.2em .7em;border-radius:6px;border:1px solid var(--line);background:#f6f8fa}\
form{display:inline}@media (max-width:30em){.wide{display:none}}";

fn badge(class: &str, text: &str) -> String {
    format!("<span class=\"badge {}\">{}</span>", escape(class), escape(text))
}

/// The page.
pub fn render(report: &StatusReport, token: Option<&str>) -> String {
    let q = token.map_or_else(String::new, |t| format!("?token={}", escape(t)));
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
            let lb =
                i.lb.as_deref()
                    .map_or_else(String::new, |l| format!(" lb {}", badge(l, l)));
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
            UnitState::Off | UnitState::Unavailable => String::new(),
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
    if let Some(h) = a.lb_stats {
        let _ = write!(html, "<li>lb stats <code>http://{h}/</code></li>");
    }
    if let Some(c) = consul.addr {
        let _ = write!(html, "<li>consul <code>http://{c}/ui/</code></li>");
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

    // vpn: the peers table and the "add peer" form (client config + QR code)
    // replace this section once the vpn component lands.
    html.push_str("<section id=\"vpn\"><h2>VPN peers</h2>");
    if report.vpn.available {
        let _ = write!(html, "<p>{} peers</p>", report.vpn.peers.len());
    } else {
        html.push_str(
            "<p class=\"muted\">The vpn component is not available in this build; \
             \"add peer\" (a WireGuard client config and its QR code) appears here when it is.</p>",
        );
    }
    html.push_str("</section>");

    let _ = writeln!(
        html,
        "<p class=\"muted\">wayfinder {} &middot; <a href=\"/api/status{q}\">JSON</a> &middot; \
         <a href=\"/metrics{q}\">metrics</a></p></main></body></html>",
        escape(report.version)
    );
    html
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
    }
}
