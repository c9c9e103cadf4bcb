//! The status page at `/` of the admin endpoint: the appliance as a person sees
//! it ("Docker management for humans"): services with their instances and
//! health and the URLs and DNS names that reach them, the components and
//! programs with a restart button each, the vpn peers with a remove button each
//! and an "add peer" form.
//!
//! Rendered on the server from the same [`StatusReport`] as `/api/status`: one
//! HTML document with inline CSS, laid out in one column so it reads on a
//! phone. Its one asset is the charts' refresh script (embedded in the binary,
//! `/assets/charts.js`); the charts themselves are SVG drawn here from the
//! timeline ([`super::charts`]), so the page reads without script. "add peer" posts a
//! plain form; its answer is the vpn's own page. Each component writes its
//! own lines and sections ([`crate::component::Component::page`]).

use std::fmt::Write as _;

use super::SupervisorState;
use super::report::StatusReport;
use super::unit::UnitState;
use crate::component::PageParts;
use crate::report::html::{STYLE, badge, escape, human_secs};

/// The header's state: starting, ready, or what the role still waits for
/// (the same answer as `GET /api/ready`).
fn ready_text(report: &StatusReport) -> String {
    if !report.ready {
        return "starting".into();
    }
    if report.readiness.ready {
        return "ready".into();
    }
    let waiting: Vec<String> = report
        .readiness
        .waiting_for
        .iter()
        .map(|w| format!("{} ({})", escape(&w.unit), escape(&w.why)))
        .collect();
    format!("<strong>NOT READY</strong>: {}", waiting.join(", "))
}

/// The page.
pub fn render(state: &SupervisorState, report: &StatusReport, q: &str) -> String {
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
         <title>wayfinder on {host}</title><link rel=\"icon\" href=\"data:,\"><style>{STYLE}{charts_style}</style>\
         <script src=\"/assets/charts.js{q}\" defer></script></head><body>\
         <header><h1>wayfinder on {host}</h1><p>{role} &middot; {ready} &middot; {consul} &middot; up {uptime}</p></header><main>",
        charts_style = super::charts::STYLE,
        host = escape(&report.host),
        role = escape(&report.role),
        ready = ready_text(report),
        consul = escape(&consul_text),
        uptime = human_secs(report.uptime_secs),
    );

    let charts = state.timeline.lock().charts();
    html.push_str(&super::charts::render(&charts, q));
    services(&mut html, report);
    units(&mut html, report, q);

    // Where things listen, then each component's own sections.
    let mut parts = PageParts::default();
    for c in &state.components {
        c.page(state.plan.starts(c.name()), q, &mut parts);
    }
    html.push_str("<section id=\"listeners\"><h2>Listening</h2><ul>");
    for item in &parts.listening {
        let _ = write!(html, "<li>{item}</li>");
    }
    if let Some(c) = consul.addr {
        let _ = write!(html, "<li>consul <code>http://{c}/ui/</code></li>");
    }
    if let Some(admin) = report.addresses.admin {
        let _ = write!(html, "<li>admin <code>http://{admin}/</code> (this page)</li>");
    }
    html.push_str("</ul></section>");
    html.push_str(&parts.sections);

    let _ = writeln!(
        html,
        "<p class=\"muted\">wayfinder {} &middot; <a href=\"/api/status{q}\">JSON</a> &middot; \
         <a href=\"/metrics{q}\">metrics</a></p></main></body></html>",
        escape(report.version)
    );
    html
}

/// The services, each with its health, URLs, DNS names and instances.
fn services(html: &mut String, report: &StatusReport) {
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
}

/// The components and programs, each with its state and a restart button.
fn units(html: &mut String, report: &StatusReport, q: &str) {
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
}
