//! `wayfinder status`: asks a running `up`'s admin endpoint for `/api/status` and
//! prints the same picture as the status page, for a terminal.
//!
//! ```text
//!  -c FILE / --admin ADDR ─▶ GET http://ADDR/api/status (Bearer token) ─▶ JSON ─▶ render()
//! ```
//!
//! The JSON is read as a generic value, so an older or newer `up` still prints
//! what both know.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::SupervisorError;
use crate::report::html::human_secs;

/// Fetches `/api/status` from the admin endpoint at `addr`.
pub async fn fetch(addr: SocketAddr, token: Option<&str>) -> Result<Value, SupervisorError> {
    let problem = |p: String| SupervisorError::Status { addr, problem: p };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .map_err(|e| problem(e.to_string()))?;
    let mut req = client.get(format!("http://{addr}/api/status"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| {
        if e.is_connect() {
            problem("nothing is listening there: is `wayfinder up` running, with this admin address?".into())
        } else {
            problem(e.to_string())
        }
    })?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(problem(
            "401 unauthorized: give the token (supervisor.token or WAYFINDER_ADMIN_TOKEN)".into(),
        ));
    }
    if !status.is_success() {
        return Err(problem(format!("answered {status}")));
    }
    resp.json()
        .await
        .map_err(|e| problem(format!("sent no status JSON: {e}")))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The picture as text.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "wayfinder {} on {}: {}, {} (up {})",
        s(v, "version"),
        s(v, "host"),
        s(v, "role"),
        if v["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "starting"
        },
        human_secs(v["uptime_secs"].as_f64().unwrap_or(0.0)),
    );
    let consul = &v["consul"];
    let leader = s(consul, "leader");
    let _ = writeln!(
        out,
        "consul {}: {}",
        s(consul, "addr"),
        match (consul["reachable"].as_bool() == Some(true), leader.is_empty()) {
            (true, false) => format!("connected, leader {leader}"),
            (true, true) => "reachable, no leader yet".into(),
            (false, _) => format!("UNREACHABLE ({})", s(consul, "error")),
        }
    );

    let _ = writeln!(out, "\nUNIT             STATE        PID      UP        RESTARTS  WHY");
    for u in v["units"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:<8} {:<9} {:<9} {}",
            s(u, "name"),
            s(u, "state"),
            u["pid"].as_u64().map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            u["uptime_secs"].as_f64().map(human_secs).unwrap_or_else(|| "-".into()),
            u["restarts"].as_u64().unwrap_or(0),
            s(u, "why"),
        );
        if let Some(last) = u["last_exit"].as_str() {
            let _ = writeln!(out, "{:<16} last: {last}", "");
        }
    }

    let services = v["services"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nSERVICES ({})", services.len());
    for svc in &services {
        let instances = svc["instances"].as_array().cloned().unwrap_or_default();
        let passing = instances.iter().filter(|i| s(i, "health") == "passing").count();
        let _ = writeln!(out, "  {}  {passing}/{} passing", s(svc, "name"), instances.len());
        for url in svc["urls"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "    url  {}", url.as_str().unwrap_or(""));
        }
        for name in svc["dns_names"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "    dns  {}", name.as_str().unwrap_or(""));
        }
        for i in &instances {
            let lb = i["lb"].as_str().map(|l| format!(" lb:{l}")).unwrap_or_default();
            let _ = writeln!(
                out,
                "    - {} {}{lb} ({} on {})",
                s(i, "address"),
                s(i, "health"),
                s(i, "id"),
                s(i, "node")
            );
        }
    }

    let _ = writeln!(out, "\nLISTENING");
    for (key, value) in v["addresses"].as_object().into_iter().flatten() {
        for addr in value.as_array().cloned().unwrap_or_else(|| vec![value.clone()]) {
            if let Some(addr) = addr.as_str() {
                let _ = writeln!(out, "  {key:<9} {addr}");
            }
        }
    }
    out
}
