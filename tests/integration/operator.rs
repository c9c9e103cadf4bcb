//! The operator view (issue 22) against real components: the status page's
//! live charts in headless Chromium under real dns and lb traffic (dig, HTTP
//! through the lb to real backends), the admin token over the page, its charts
//! and its script, the Grafana dashboard and alert rules in `deploy/grafana/`
//! checked series by series against a live `/metrics`, and `wayfinder top`
//! in a real terminal (tmux) against `/api/status`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{
    Consul, Up, consul_section, dig, dig_until, eventually, free_port, http_client, register_tagged, tagged_backend,
    wait_routed,
};
use crate::supervisor::{PROGRAMS_ONLY, chromium};

/// A zone for the dns to answer from (the "zone" kind of the dns chart).
const ZONE: &str = "$TTL 60\n@ IN SOA ns.op.internal. hostmaster.op.internal. 1 3600 600 86400 30\n\
                    @ IN NS ns.op.internal.\nns IN A 127.0.0.1\ndb IN A 10.9.0.1\n";

/// `up` with dns and lb against `consul` (not ours: START_CONSUL=false), the
/// zones of `zones`, and `extra` TOML.
async fn dns_and_lb(consul: &Consul, zones: &std::path::Path, extra: &str) -> Up {
    let up = Up::start_on_free_ports(
        || {
            format!(
                "{}[dns]\nlisten = [\"127.0.0.1:{}\"]\nworkers = 1\nzones_dir = {:?}\nzones_poll = \"1h\"\n\
                 [lb]\nhttp = \"127.0.0.1:{}\"\nstats = \"\"\nregister = \"\"\nworkers = 1\n{extra}",
                consul_section(consul),
                free_port(),
                zones.display().to_string(),
                free_port(),
            )
        },
        &[
            ("START_CONSUL", "false"),
            ("START_REGISTRATOR", "false"),
            ("START_VPN", "false"),
        ],
    )
    .await;
    eventually(Duration::from_secs(30), "supervisor ready", || {
        up.state.ready.load(Ordering::Relaxed)
    })
    .await;
    up
}

/// Traffic until dropped: HTTP through the lb to `hosts` (in turn) and dig
/// questions for the zone, about 20 a second of each.
struct Load {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(lb: SocketAddr, dns: SocketAddr, hosts: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let client = http_client();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let host = &hosts[i % hosts.len()];
                    i += 1;
                    let get = client.get(format!("http://{lb}/")).header("Host", host).send();
                    let _ = tokio::join!(get, dig(dns, &["db.op.internal", "A"]));
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }
        });
        Self { stop, task: Some(task) }
    }

    async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits until the lb routes `svc` and the dns serves the test zone.
async fn wait_serving(dns: SocketAddr, lb: SocketAddr, svc: &str) {
    wait_routed(
        &http_client(),
        lb,
        &format!("{svc}.service.consul"),
        Duration::from_secs(30),
        String::new,
    )
    .await;
    dig_until(
        dns,
        &["db.op.internal", "A"],
        Duration::from_secs(10),
        "zone served",
        |d| d.answers() == ["10.9.0.1"],
    )
    .await;
}

/// The points drawn for `label` in chart `chart` of a charts section (0 when absent).
fn points(html: &str, chart: &str, label: &str) -> usize {
    let Some(start) = html.find(&format!("id=\"chart-{chart}\"")) else {
        return 0;
    };
    let figure = &html[start..html[start..].find("</figure>").map_or(html.len(), |e| start + e)];
    let key = format!("data-label=\"{label}\" data-points=\"");
    figure
        .find(&key)
        .and_then(|i| {
            let rest = &figure[i + key.len()..];
            rest[..rest.find('"')?].parse().ok()
        })
        .unwrap_or(0)
}

async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    match http_client().get(format!("http://{addr}{path}")).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Console lines Chromium logged (`--enable-logging=stderr`): errors,
/// refused loads, CSP violations. The page itself never logs.
fn console_lines(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect()
}

/// A PNG's width and height (IHDR).
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    (
        u32::from_be_bytes(bytes[16..20].try_into().unwrap()),
        u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
    )
}

async fn screenshot(url: &str, png: &std::path::Path, size: &str) -> Vec<u8> {
    let _ = std::fs::remove_file(png);
    let out = chromium(
        url,
        &[
            format!("--screenshot={}", png.display()),
            format!("--window-size={size}"),
        ],
    )
    .await;
    std::fs::read(png).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {} ({e}); chromium said:\n{}",
            png.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Under dns and lb traffic, the status page in headless Chromium: loads with
/// no console message (no script error, no refused load, no CSP violation),
/// its charts hold points for the traffic (dns by kind and rcode, lb requests
/// per service, 5xx for a service whose only instance refuses connections,
/// latency), its script refreshes them, and two screenshots of the charts
/// taken seconds apart differ. A full-page screenshot is kept under
/// target/screenshots for people.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_charts_live_in_chromium() {
    let consul = &Consul::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("op.internal.zone"), ZONE).unwrap();
    let (svc, _backend) = tagged_backend(consul, "chartweb", "chart-backend").await;
    // Nothing listens on its port: the lb answers 5xx for it.
    let dead = register_tagged(consul, "chartdead", free_port());
    let up = dns_and_lb(consul, dir.path(), "").await;
    let (dns, lb) = (up.dns.unwrap(), up.lb.unwrap());
    wait_serving(dns, lb, &svc).await;
    let load = Load::start(
        lb,
        dns,
        vec![format!("{svc}.service.consul"), format!("{dead}.service.consul")],
    );

    // The charts fill as the sampler ticks (every 2 s): wait for a few points.
    let deadline = Instant::now() + Duration::from_secs(90);
    let charts = loop {
        let (code, html) = get_text(up.admin, "/charts").await;
        assert_eq!(code, 200, "{html}");
        let enough = points(&html, "lb-requests", &svc) >= 3
            && points(&html, "lb-5xx", &dead) >= 3
            && points(&html, "dns-kind", "zone") >= 3
            && points(&html, "dns-rcode", "NOERROR") >= 3
            && points(&html, "lb-latency", "p99") >= 1;
        if enough {
            break html;
        }
        assert!(Instant::now() < deadline, "the charts never filled:\n{html}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(charts.contains("id=\"chart-restarts\""), "{charts}");

    // The page in a browser, its script given time to refresh the charts.
    let url = format!("http://{}/", up.admin);
    let out = chromium(
        &url,
        &[
            "--enable-logging=stderr".into(),
            "--v=0".into(),
            "--virtual-time-budget=7000".into(),
            "--dump-dom".into(),
        ],
    )
    .await;
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed: {:?}",
        out.status
    );
    let console = console_lines(&out.stderr);
    assert!(console.is_empty(), "console messages: {console:#?}");
    assert!(points(&dom, "lb-requests", &svc) >= 3, "{dom}");
    assert!(points(&dom, "dns-kind", "zone") >= 3, "{dom}");
    assert!(
        dom.contains("data-refreshed="),
        "the script never refreshed the charts:\n{dom}"
    );

    // Two pictures of the charts, three sampling steps apart, under load.
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let charts_url = format!("http://{}/charts", up.admin);
    let first = screenshot(&charts_url, &shots.join("charts-1.png"), "1000,900").await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let second = screenshot(&charts_url, &shots.join("charts-2.png"), "1000,900").await;
    assert_eq!(png_size(&first), (1000, 900));
    assert!(first.len() > 10_000, "a non-trivial picture: {} bytes", first.len());
    assert_ne!(first, second, "the charts did not move in 7 s of traffic");
    let page = screenshot(&url, &shots.join("status-page-charts.png"), "1280,1800").await;
    assert!(page.len() > 10_000);
    println!("screenshots: {}", shots.display());

    load.stop().await;
    up.stop().await;
    consul.deregister(&format!("{svc}-1"));
    consul.deregister(&format!("{dead}-1"));
}

/// With a token, the status page, its charts and its script refuse requests
/// without it (401) and the browser gets neither page nor points; with it in
/// the page's address, the page loads cleanly and its script's refreshes
/// (which carry the token) succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charts_need_the_token() {
    let token = "chart-token-789";
    let up = Up::start(
        &format!(
            "[supervisor]\ntoken = \"{token}\"\n[[supervisor.program]]\nname = \"helper\"\ncommand = \"sleep\"\nargs = [\"1000\"]\n"
        ),
        PROGRAMS_ONLY,
    )
    .await;
    for path in ["/", "/charts", "/assets/charts.js"] {
        let (code, body) = get_text(up.admin, path).await;
        assert_eq!(code, 401, "{path}: {body}");
        assert!(!body.contains("chart-"), "{path} shows nothing: {body}");
        let (code, _) = get_text(up.admin, &format!("{path}?token=wrong-{token}")).await;
        assert_eq!(code, 401, "{path} with a wrong token");
        let (code, _) = get_text(up.admin, &format!("{path}?token={token}")).await;
        assert_eq!(code, 200, "{path} with the token");
    }
    // Points for the restarts chart come with the first ticks.
    let deadline = Instant::now() + Duration::from_secs(30);
    while points(
        &get_text(up.admin, &format!("/charts?token={token}")).await.1,
        "restarts",
        "helper",
    ) == 0
    {
        assert!(Instant::now() < deadline, "no point for the helper's restarts");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let browse = |url: String| async move {
        chromium(
            &url,
            &[
                "--enable-logging=stderr".into(),
                "--v=0".into(),
                "--virtual-time-budget=5000".into(),
                "--dump-dom".into(),
            ],
        )
        .await
    };
    let out = browse(format!("http://{}/", up.admin)).await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(!dom.contains("chart-restarts"), "no charts without the token:\n{dom}");
    assert!(dom.contains("Bearer"), "the refusal is shown:\n{dom}");
    let out = browse(format!("http://{}/?token={token}", up.admin)).await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(points(&dom, "restarts", "helper") > 0, "{dom}");
    assert!(dom.contains("data-refreshed="), "refreshes carry the token:\n{dom}");
    let console = console_lines(&out.stderr);
    assert!(console.is_empty(), "console messages: {console:#?}");
    up.stop().await;
}

/// What one PromQL expression names: each `wayfinder_*` series with its label
/// matchers (`(label, op, value)`), and the labels of its `by`/`without`/`on`/
/// `ignoring`/`group_*` clauses. A small lexer, enough for the expressions we
/// ship (the test fails on anything it cannot read).
#[derive(Debug, Default)]
struct PromqlUses {
    series: Vec<(String, Vec<Matcher>)>,
    grouping: Vec<String>,
}

/// `(label, op, value)` of a selector.
type Matcher = (String, String, String);

fn promql_uses(expr: &str) -> PromqlUses {
    let chars: Vec<char> = expr.chars().collect();
    let mut uses = PromqlUses::default();
    let mut i = 0;
    let ident = |i: &mut usize| -> String {
        let start = *i;
        while *i < chars.len() && (chars[*i].is_ascii_alphanumeric() || chars[*i] == '_' || chars[*i] == ':') {
            *i += 1;
        }
        chars[start..*i].iter().collect()
    };
    let skip_space = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            // A string outside a selector (label_replace ...): skipped.
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let word = ident(&mut i);
            let mut j = i;
            skip_space(&mut j);
            let grouping = ["by", "without", "on", "ignoring", "group_left", "group_right"];
            if grouping.contains(&word.as_str()) && chars.get(j) == Some(&'(') {
                let end = j + chars[j..].iter().position(|c| *c == ')').expect("closed grouping");
                let list: String = chars[j + 1..end].iter().collect();
                uses.grouping
                    .extend(list.split(',').map(|l| l.trim().to_string()).filter(|l| !l.is_empty()));
                i = end + 1;
            } else if word.starts_with("wayfinder_") {
                let mut matchers = Vec::new();
                if chars.get(j) == Some(&'{') {
                    let mut k = j + 1;
                    loop {
                        skip_space(&mut k);
                        if chars.get(k) == Some(&'}') {
                            k += 1;
                            break;
                        }
                        let label = ident(&mut k);
                        skip_space(&mut k);
                        let op_start = k;
                        while k < chars.len() && matches!(chars[k], '=' | '!' | '~') {
                            k += 1;
                        }
                        let op: String = chars[op_start..k].iter().collect();
                        skip_space(&mut k);
                        assert_eq!(chars.get(k), Some(&'"'), "a quoted value in {expr}");
                        let vstart = k + 1;
                        k = vstart;
                        while chars[k] != '"' {
                            k += if chars[k] == '\\' { 2 } else { 1 };
                        }
                        let value: String = chars[vstart..k].iter().collect();
                        k += 1;
                        assert!(!label.is_empty() && !op.is_empty(), "a matcher in {expr}");
                        matchers.push((label, op, value));
                        skip_space(&mut k);
                        if chars.get(k) == Some(&',') {
                            k += 1;
                        }
                    }
                    i = k;
                }
                uses.series.push((word, matchers));
            }
        } else {
            i += 1;
        }
    }
    uses
}

/// Live `/metrics`: sample name -> label -> values seen.
type Exported = std::collections::HashMap<String, std::collections::HashMap<String, std::collections::HashSet<String>>>;

fn exported(text: &str) -> Exported {
    let mut out = Exported::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (name, labels, _) = crate::supervisor::parse_metric(line).unwrap_or_else(|| panic!("unparsable: {line:?}"));
        let entry = out.entry(name).or_default();
        for (k, v) in labels {
            entry.entry(k).or_default().insert(v);
        }
    }
    out
}

/// Labels Prometheus adds when it scrapes (never in `/metrics`).
const SCRAPE_LABELS: [&str; 2] = ["instance", "job"];

/// Every problem of `expr` (from `place`) against the live series.
fn check_expr(place: &str, expr: &str, live: &Exported) -> Vec<String> {
    let uses = promql_uses(expr);
    let mut problems = Vec::new();
    if uses.series.is_empty() {
        problems.push(format!("{place}: names no wayfinder_ series: {expr}"));
    }
    let mut labels_here: std::collections::HashSet<&str> = SCRAPE_LABELS.into_iter().collect();
    for (name, matchers) in &uses.series {
        let Some(labels) = live.get(name) else {
            problems.push(format!("{place}: {name} is not exported by /metrics"));
            continue;
        };
        labels_here.extend(labels.keys().map(String::as_str));
        for (label, op, value) in matchers {
            if SCRAPE_LABELS.contains(&label.as_str()) {
                continue;
            }
            match labels.get(label) {
                None => problems.push(format!(
                    "{place}: {name} has no label {label:?} (it has {:?})",
                    labels.keys()
                )),
                Some(values) if op == "=" && !values.contains(value) => problems.push(format!(
                    "{place}: {name}{{{label}=\"{value}\"}} matches nothing (values: {values:?})"
                )),
                Some(_) => {}
            }
        }
    }
    for g in &uses.grouping {
        if !labels_here.contains(g.as_str()) {
            problems.push(format!("{place}: groups by {g:?}, which none of its series has"));
        }
    }
    problems
}

/// The Grafana dashboard and the Prometheus rules in deploy/grafana/, parsed,
/// checked for shape (one row per component, every panel with a query, every
/// rule with a severity and a summary, the alerts the appliance needs), and
/// every series, label and label value they name checked against the
/// `/metrics` of a live appliance: `up` in a network namespace with its own
/// Consul, dns, lb (a routed service whose instance refuses: 5xx), register
/// (no Docker: its stream is down) and vpn (a wireguard-go laptop that has
/// made a handshake, so per-peer series exist). The vpn's and register's
/// charts on the status page get their points there too.
#[test]
fn grafana_dashboard_and_alert_rules_name_live_series() {
    for p in ["consul", "curl", "ping", "wireguard-go", "wg", "wg-quick", "nft"] {
        crate::harness::require(p);
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("wayfinder-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    let rules: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("wayfinder-alerts.yml")).unwrap())
            .expect("the rules are YAML");

    // Shape of the dashboard: a row per component, in order, each with panels.
    let panels = dashboard["panels"].as_array().expect("panels");
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(rows, ["Appliance and Consul", "dns", "lb", "register", "vpn"]);
    let mut queries: Vec<(String, String)> = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let mut row = "";
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("an id")), "duplicate id {}", p["id"]);
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{}",
            p["title"]
        );
        if p["type"] == "row" {
            row = p["title"].as_str().unwrap();
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            let place = format!("dashboard {row} / {}", p["title"].as_str().unwrap());
            queries.push((place, t["expr"].as_str().expect("an expr").to_string()));
        }
    }
    for (row, _) in rows.iter().zip(0..) {
        assert!(
            queries
                .iter()
                .any(|(place, _)| place.starts_with(&format!("dashboard {row} /"))),
            "row {row} has no panel"
        );
    }
    let variable = dashboard["templating"]["list"][0]["definition"].as_str().unwrap();
    queries.push(("dashboard variable".into(), variable.to_string()));

    // Shape of the rules: the alerts the appliance needs, each complete.
    let mut alerts = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for r in group["rules"].as_array().expect("rules") {
            let name = r["alert"].as_str().expect("an alert name");
            assert!(
                matches!(r["labels"]["severity"].as_str(), Some("warning" | "critical")),
                "{name}: severity"
            );
            assert!(r["annotations"]["summary"].is_string(), "{name}: summary");
            alerts.push(name.to_string());
            queries.push((
                format!("alert {name}"),
                r["expr"].as_str().expect("an expr").to_string(),
            ));
        }
    }
    for needed in [
        "WayfinderConsulUnreachable",
        "WayfinderConsulWatchStale",
        "WayfinderComponentRestarting",
        "WayfinderLb5xxRatio",
        "WayfinderDnsServfailRatio",
        "WayfinderVpnPeerTableFull",
        "WayfinderRegisterEventStreamLost",
    ] {
        assert!(alerts.iter().any(|a| a == needed), "no alert {needed}: {alerts:?}");
    }
    // The lexer sees what it must (a check of the check).
    let u = promql_uses("sum by (instance, proxy) (rate(wayfinder_x_total{code=\"5xx\",a=~\"$b\"}[5m]))");
    assert_eq!(u.grouping, ["instance", "proxy"]);
    assert_eq!(u.series[0].0, "wayfinder_x_total");
    assert_eq!(u.series[0].1[0], ("code".into(), "=".into(), "5xx".into()));

    // A live appliance with every component.
    let app = crate::up_vpn::Appliance::start(&[]);
    app.wait(Duration::from_secs(30), "consul's leader", |a| {
        let (code, body) = a.http("GET", "http://127.0.0.1:8500/v1/status/leader", None);
        code == 200 && body.len() > 4
    });
    let (code, body) = app.http(
        "PUT",
        "http://127.0.0.1:8500/v1/agent/service/register",
        Some((
            "application/json",
            r#"{"ID":"dash1","Name":"dash","Address":"10.251.0.1","Port":8080,"Tags":["haproxy"]}"#,
        )),
    );
    assert_eq!(code, 200, "register: {body}");
    app.wait(Duration::from_secs(30), "the lb routes dash", |a| {
        a.http("GET", "/metrics", None).1.contains("proxy=\"dash\"")
    });
    // Requests through the lb: a 5xx (nothing listens at the instance).
    let _ = app.ns.output(
        "curl",
        &["-s", "-m", "5", "-H", "Host: dash.service.consul", "http://127.0.0.1/"],
    );
    let (code, added) = app.json("POST", "/api/vpn/peers", Some(r#"{"name": "laptop"}"#));
    assert_eq!(code, 201, "{added:#}");
    let mut laptop = crate::up_vpn::laptop(&app);
    let wg = crate::netns::WireguardGo::start(&mut laptop);
    wg.configure(&laptop, added["config"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !crate::up_vpn::ping_once(&laptop, crate::up_vpn::TUNNEL) {
        assert!(Instant::now() < deadline, "no handshake; up log:\n{}", app.log());
    }
    let (text, _) = app.metrics();
    let live = exported(&text);
    let problems: Vec<String> = queries
        .iter()
        .flat_map(|(place, expr)| check_expr(place, expr, &live))
        .collect();
    assert!(
        problems.is_empty(),
        "{} problems:\n{}\n/metrics:\n{text}",
        problems.len(),
        problems.join("\n")
    );
    // The vpn's and register's charts on the page: the laptop's bytes and
    // handshake age, Docker events (none: no Docker here, but sampled).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, charts) = app.http("GET", "/charts", None);
        assert_eq!(code, 200, "{charts}");
        if points(&charts, "vpn-bytes", "laptop rx") >= 1
            && points(&charts, "vpn-handshake", "laptop") >= 1
            && points(&charts, "register-writes", "register") >= 1
        {
            break;
        }
        assert!(Instant::now() < deadline, "no vpn or register points:\n{charts}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // And the check can fail: a misspelt series, label and value are caught.
    assert_eq!(
        check_expr(
            "t",
            "sum by (instance, server) (wayfinder_lb_http_responses_total{code=\"6xx\"}) + wayfinder_nope",
            &live
        )
        .len(),
        3
    );
    crate::up_vpn::stop(&app);
}

/// A private tmux server (its own socket name), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(crate::harness::require("tmux"))
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("run tmux")
    }

    /// What the pane of session `top` shows now.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// The figures of `/api/status` that `top` must show, as (what, line start,
/// words the line holds): the header, every unit with its state and restarts,
/// the service count, each service's health, and the dns and lb totals.
fn figures(v: &serde_json::Value) -> Vec<(String, Vec<String>)> {
    let mut out = vec![(
        format!(
            "wayfinder {} on {}",
            v["version"].as_str().unwrap(),
            v["host"].as_str().unwrap()
        ),
        vec!["ready".to_string()],
    )];
    for u in v["units"].as_array().unwrap() {
        out.push((
            format!("{} ", u["name"].as_str().unwrap()),
            vec![u["state"].as_str().unwrap().to_string(), u["restarts"].to_string()],
        ));
    }
    let services = v["services"].as_array().unwrap();
    out.push((format!("SERVICES ({})", services.len()), vec![]));
    for s in services {
        let n = s["instances"].as_array().unwrap().len();
        out.push((
            format!("  {}  ", s["name"].as_str().unwrap()),
            vec![format!("{n}/{n}"), "passing".into()],
        ));
    }
    let zone = v["dns"]["routes"]["zone"]["queries"].as_u64().unwrap();
    out.push(("  dns zone ".into(), vec![zone.to_string()]));
    let lb: u64 = v["lb"]["requests"]["status_classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .sum();
    out.push(("  lb requests ".into(), vec![lb.to_string()]));
    out
}

/// The figures `screen` misses (empty: it shows all of them).
fn missing(screen: &str, figures: &[(String, Vec<String>)]) -> Vec<String> {
    figures
        .iter()
        .filter(|(start, words)| {
            !screen
                .lines()
                .any(|l| l.starts_with(start.as_str()) && words.iter().all(|w| l.split_whitespace().any(|x| x == w)))
        })
        .map(|(start, words)| format!("{start:?} with {words:?}"))
        .collect()
}

/// `wayfinder top` in a real terminal (tmux): under traffic it shows rates,
/// and once traffic stops its screen shows the same figures as `/api/status`
/// (units with state and restarts, services and health, dns and lb totals);
/// Ctrl-C ends it and gives the terminal back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_in_tmux_shows_the_figures_of_api_status() {
    let tmux_bin = crate::harness::require("tmux");
    let consul = &Consul::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("op.internal.zone"), ZONE).unwrap();
    let (svc, _backend) = tagged_backend(consul, "topweb", "top-backend").await;
    let up = dns_and_lb(consul, dir.path(), "").await;
    let (dns, lb) = (up.dns.unwrap(), up.lb.unwrap());
    wait_serving(dns, lb, &svc).await;

    let tmux = Tmux {
        socket: crate::harness::unique("wftop"),
    };
    // A clean environment (no WAYFINDER_* or PanteraS variables) in an empty
    // directory (no wayfinder.toml): only --admin says where to look.
    let command = format!(
        "env -i PATH=/usr/bin:/bin TERM=xterm-256color {} top --admin {} -n 500ms",
        crate::harness::wayfinder_bin().display(),
        up.admin
    );
    let out = tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "100",
        "-c",
        &dir.path().display().to_string(),
        &command,
    ]);
    assert!(
        out.status.success(),
        "{} new-session: {}",
        tmux_bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );

    // Under traffic: rates.
    let load = Load::start(lb, dns, vec![format!("{svc}.service.consul")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let screen = tmux.screen();
        let rate = |row: &str| {
            screen
                .lines()
                .find(|l| l.starts_with(row))
                .and_then(|l| l.split_whitespace().last().and_then(|r| r.parse::<f64>().ok()))
        };
        if rate("  lb requests ").is_some_and(|r| r > 0.0) && rate("  dns zone ").is_some_and(|r| r > 0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no rates under traffic:\n{screen}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    load.stop().await;

    // Traffic over: the screen settles on /api/status's figures.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = get_text(up.admin, "/api/status").await;
        assert_eq!(code, 200);
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        let want = figures(&status);
        let screen = tmux.screen();
        let not_shown = missing(&screen, &want);
        if not_shown.is_empty() {
            assert!(screen.contains(&format!("wayfinder top: {}", up.admin)), "{screen}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "top does not show {not_shown:#?}\nscreen:\n{screen}\n/api/status:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Ctrl-C: top ends (the session with it).
    assert!(tmux.cmd(&["send-keys", "-t", "top", "C-c"]).status.success());
    eventually(Duration::from_secs(10), "top to end on Ctrl-C", || {
        !tmux.cmd(&["has-session", "-t", "top"]).status.success()
    })
    .await;
    up.stop().await;
    consul.deregister(&format!("{svc}-1"));
}

/// The lb's stats page at HAProxy density, against a real Consul and two real
/// instances, one of which refuses connections: per instance its state and
/// how long it has held it, weight, in flight / maxconn, connection errors,
/// and the last active check's result (HAProxy's names, `L4OK`, `L4CON`) and
/// age; the lb's retries and queue in the header. `/stats.json` carries the
/// same figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_stats_show_each_instance_at_haproxy_density() {
    let consul = &Consul::start();
    let svc = crate::harness::unique("dense");
    let live = crate::harness::HttpBackend::start("dense-live").await;
    let dead_port = free_port();
    consul.register(
        &format!("{svc}-1"),
        &svc,
        "127.0.0.1",
        live.addr.port(),
        &["haproxy"],
        true,
    );
    consul.register(&format!("{svc}-2"), &svc, "127.0.0.1", dead_port, &["haproxy"], true);
    let lb = crate::harness::Lb::start(&format!(
        "{}[lb]\ncheck_interval = \"300ms\"\ncheck_timeout = \"300ms\"\n",
        consul_section(consul)
    ))
    .await;
    let host = format!("{svc}.service.consul");
    lb.wait_for(&host, "/", &["dense-live"]).await;
    // Requests that pick the dead instance are retried on the live one.
    for _ in 0..20 {
        let (code, body, _) = lb.get(&host, "/").await;
        assert_eq!((code, body.as_str()), (200, "dense-live"));
    }
    let instance = |v: &serde_json::Value, id: &str| -> serde_json::Value {
        v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["service"] == svc.as_str())
            .flat_map(|r| r["instances"].as_array().unwrap().clone())
            .find(|i| i["id"] == id)
            .unwrap_or_else(|| panic!("no instance {id} in {v:#}"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = loop {
        let (code, text) = get_text(lb.stats, "/stats.json").await;
        assert_eq!(code, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let (ok, bad) = (instance(&v, &format!("{svc}-1")), instance(&v, &format!("{svc}-2")));
        let done = ok["last_check"] == "L4OK"
            && bad["last_check"] == "L4CON"
            && bad["connect_errors"].as_u64() >= Some(1)
            && bad["available"] == false
            && bad["since_change_ms"].is_u64()
            && ok["last_check_age_ms"].as_u64().is_some_and(|age| age < 10_000);
        if done {
            assert_eq!(ok["connect_errors"], 0, "{ok:#}");
            assert!(ok["since_change_ms"].is_null(), "up since the lb saw it: {ok:#}");
            assert!(v["retries"].as_u64() >= Some(1), "{v:#}");
            break v;
        }
        assert!(Instant::now() < deadline, "instances never showed their checks:\n{v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (code, page) = get_text(lb.stats, "/").await;
    assert_eq!(code, 200);
    for want in [
        "<th>state</th>",
        "<th>for</th>",
        "<th>weight</th>",
        "<th>in flight / max</th>",
        "<th>conn errors (each retried elsewhere)</th>",
        "<th>last check</th>",
        "DOWN (",
        ">UP<",
        "L4CON ",
        "L4OK ",
        "retried",
        "queued now",
        "maxconn ",
        " queued</td>",
    ] {
        assert!(
            page.contains(want),
            "{want:?} not on the stats page:\n{page}\n{stats:#}"
        );
    }
    lb.stop().await;
    consul.deregister(&format!("{svc}-1"));
    consul.deregister(&format!("{svc}-2"));
}
