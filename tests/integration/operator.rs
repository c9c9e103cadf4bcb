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
    let client = http_client();
    wait_routed(
        &client,
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
