//! `wayfinder status`: asks a running `up`'s admin endpoint for `/api/status` and
//! prints the same picture as the status page, for a terminal.
//!
//! ```text
//!  -c FILE / --admin ADDR ─▶ GET http://ADDR/api/status (Bearer token) ─▶ JSON ─▶ render()
//!  exit 0: ready; 1: it answered, and a unit the role needs is not ready
//!  (`not_ready`, named at the top); 69: no status (nothing listening, 401 ...)
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

/// The units the role needs that are not ready, as `(unit, why)`, from the
/// report's `readiness` (`GET /api/ready`'s answer). An `up` too old to say
/// is taken at its start-up flag.
pub fn not_ready(v: &Value) -> Vec<(String, String)> {
    let readiness = &v["readiness"];
    if readiness.is_null() {
        return match v["ready"].as_bool() {
            Some(true) => Vec::new(),
            _ => vec![("up".into(), "starting".into())],
        };
    }
    if readiness["ready"].as_bool() == Some(true) {
        return Vec::new();
    }
    let waiting: Vec<(String, String)> = readiness["waiting_for"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| (s(w, "unit").to_string(), s(w, "why").to_string()))
        .collect();
    if waiting.is_empty() {
        vec![("up".into(), "not ready (no reason given)".into())]
    } else {
        waiting
    }
}

/// The picture as text; the units the role needs that are not ready first.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let missing = not_ready(v);
    let _ = writeln!(
        out,
        "wayfinder {} on {}: {}, {} (up {})",
        s(v, "version"),
        s(v, "host"),
        s(v, "role"),
        match (missing.is_empty(), v["ready"].as_bool() == Some(true)) {
            (true, _) => "ready",
            (false, true) => "NOT READY",
            (false, false) => "starting",
        },
        human_secs(v["uptime_secs"].as_f64().unwrap_or(0.0)),
    );
    for (unit, why) in &missing {
        let _ = writeln!(out, "  not ready: {unit}: {why}");
    }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn not_ready_units_are_named_at_the_top() {
        let v = json!({
            "version": "0.1.0", "host": "h", "role": "standalone", "ready": true, "uptime_secs": 3.0,
            "readiness": {"ready": false, "waiting_for": [
                {"unit": "consul", "why": "not answering its HTTP API: no answer within 1s"},
                {"unit": "lb", "why": "waiting for Consul's leader before starting"}
            ]},
            "consul": {}, "units": [], "services": [], "addresses": {}
        });
        assert_eq!(
            not_ready(&v),
            [
                (
                    "consul".to_string(),
                    "not answering its HTTP API: no answer within 1s".to_string()
                ),
                (
                    "lb".to_string(),
                    "waiting for Consul's leader before starting".to_string()
                )
            ]
        );
        let text = render(&v);
        let mut lines = text.lines();
        assert!(lines.next().unwrap().contains("NOT READY"), "{text}");
        assert_eq!(
            lines.next(),
            Some("  not ready: consul: not answering its HTTP API: no answer within 1s")
        );
        let ready = json!({"ready": true, "readiness": {"ready": true}});
        assert!(not_ready(&ready).is_empty());
        assert!(render(&ready).lines().next().unwrap().contains(", ready"));
        // An `up` from before readiness: its start-up flag.
        assert!(not_ready(&json!({"ready": true})).is_empty());
        assert_eq!(not_ready(&json!({"ready": false})).len(), 1);
        // Not ready without a reason still counts as not ready.
        assert_eq!(not_ready(&json!({"readiness": {"ready": false}})).len(), 1);
    }
}
