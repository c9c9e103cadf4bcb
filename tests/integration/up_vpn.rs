//! `wayfinder up` with the vpn, as a real process inside a network namespace
//! (so its TUN interface, its Consul and its ports stay private to the test):
//! a peer added through the admin API is a wireguard-go laptop in a second
//! namespace, configured from the client config the API returned, which pings
//! the tunnel address and resolves `web.service.consul` through `up`'s own dns
//! and Consul; `/metrics` and `wayfinder status` show the peer; DELETE removes
//! it. The status page does the same in headless Chromium: "add peer" shows the
//! config and its QR code as SVG, and "remove" removes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{require, wayfinder_bin};
use crate::netns::{Netns, WireguardGo, link, unique};

pub(crate) const TUNNEL: &str = "10.200.0.1";

/// Parsed `/metrics`: (name, sorted labels) -> value.
pub(crate) type Metrics = HashMap<(String, Vec<(String, String)>), f64>;
const ADMIN: &str = "127.0.0.1:9000";

/// One `wayfinder up` in its own namespace, with its files in a temp dir.
pub(crate) struct Appliance {
    pub(crate) ns: Netns,
    pub(crate) dir: tempfile::TempDir,
    config: PathBuf,
    /// The vpn's TUN interface (unique: its control socket is in the shared
    /// /var/run/wireguard).
    interface: String,
    log: PathBuf,
}

impl Appliance {
    /// Writes the config (vpn enabled; the endpoint is the namespace's `wan0`
    /// address) and starts `up` with the role variables `env`; waits until it
    /// is ready.
    pub(crate) fn start(env: &[(&str, &str)]) -> Self {
        let ns = Netns::new();
        let dir = tempfile::tempdir().unwrap();
        let interface = unique("wfu");
        let config = dir.path().join("wayfinder.toml");
        std::fs::write(
            &config,
            format!(
                "[dns]\nlisten = [\"127.0.0.1:53\"]\nupstreams = [\"127.0.0.1:9\"]\nworkers = 1\n\
                 [lb]\nstats = \"\"\nworkers = 1\n\
                 [supervisor]\nadmin = \"{ADMIN}\"\n\
                 [supervisor.consul]\nnode = \"appliance\"\ndata_dir = \"{d}/consul\"\n\
                 [vpn]\nenabled = true\ninterface = \"{interface}\"\ndir = \"{d}/vpn\"\n\
                 endpoint = \"10.251.0.1:51820\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let log = dir.path().join("up.log");
        let mut app = Appliance {
            ns,
            dir,
            config,
            interface,
            log,
        };
        let mut cmd = app.ns.cmd(wayfinder_bin().to_str().unwrap());
        cmd.args(["up", "-c"])
            .arg(&app.config)
            .current_dir(app.dir.path())
            .env("RUST_LOG", "info");
        for (var, _) in wayfinder::env::VARS {
            cmd.env_remove(var);
        }
        cmd.env_remove("NOTIFY_SOCKET").envs(env.iter().copied());
        app.ns.spawn(cmd, &app.log);
        app.wait(Duration::from_secs(30), "the ready banner", |a| {
            a.log().contains("wayfinder up: ready")
        });
        app
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `f`, failing with the log of `up`.
    pub(crate) fn wait(&self, limit: Duration, what: &str, f: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}; up log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `curl` inside the namespace: (status code, body). `body` is sent with
    /// its content type when given.
    pub(crate) fn http(&self, method: &str, url: &str, body: Option<(&str, &str)>) -> (u16, String) {
        let mut args = vec![
            "-s".to_string(),
            "-m".into(),
            "10".into(),
            "-X".into(),
            method.into(),
            "-w".into(),
            "\n%{http_code}".into(),
        ];
        if let Some((content_type, data)) = body {
            args.extend([
                "-H".into(),
                format!("Content-Type: {content_type}"),
                "--data-binary".into(),
                data.into(),
            ]);
        }
        let url = if url.starts_with("http") {
            url.to_string()
        } else {
            format!("http://{ADMIN}{url}")
        };
        args.push(url);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.ns.output(require("curl").to_str().unwrap(), &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    pub(crate) fn json(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let (code, text) = self.http(method, path, body.map(|b| ("application/json", b)));
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {code} {text:?}: {e}"));
        (code, value)
    }

    pub(crate) fn status(&self) -> serde_json::Value {
        let (code, v) = self.json("GET", "/api/status", None);
        assert_eq!(code, 200, "{v:#}");
        v
    }

    /// Unit `name` as `/api/status` reports it.
    pub(crate) fn unit(&self, name: &str) -> serde_json::Value {
        let status = self.status();
        let units = status["units"].as_array().expect("units");
        units
            .iter()
            .find(|u| u["name"] == name)
            .unwrap_or_else(|| panic!("no unit {name} in {units:?}"))
            .clone()
    }

    /// `/metrics` as (name, labels) -> value.
    pub(crate) fn metrics(&self) -> (String, Metrics) {
        let (code, text) = self.http("GET", "/metrics", None);
        assert_eq!(code, 200, "{text}");
        let mut out = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, labels, value) =
                crate::supervisor::parse_metric(line).unwrap_or_else(|| panic!("unparsable: {line:?}"));
            let mut labels: Vec<(String, String)> = labels.into_iter().collect();
            labels.sort();
            out.insert((name, labels), value);
        }
        (text, out)
    }
}

/// The value of `name{labels}` in parsed metrics.
pub(crate) fn metric(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    want.sort();
    m.get(&(name.to_string(), want)).copied()
}

/// A laptop namespace on the appliance's `wan0` (10.251.0.0/24).
pub(crate) fn laptop(app: &Appliance) -> Netns {
    let ns = Netns::new();
    link(&app.ns, "wan0", "10.251.0.1/24", &ns, "wan", "10.251.0.2/24");
    ns
}

/// One ping from `ns` to `target` (1 s wait); true on a reply.
pub(crate) fn ping_once(ns: &Netns, target: &str) -> bool {
    let out = ns.output("ping", &["-c", "1", "-W", "1", target]);
    out.status.success()
}

/// The end to end test: the vpn as a unit of `up`, its peers through the admin API.
#[test]
fn up_runs_the_vpn_and_the_admin_api_manages_its_peers() {
    for p in ["consul", "curl", "dig", "ping", "wireguard-go", "wg", "wg-quick", "nft"] {
        require(p);
    }
    // The lb is not what this test is about: off, so only Consul, vpn and dns run.
    // No Docker here: the register component would never be ready.
    let app = Appliance::start(&[("START_LB", "false"), ("START_REGISTRATOR", "false")]);
    let laptop_ns = laptop(&app);
    let log = app.log();
    assert!(
        log.contains(&format!("tunnel 10.200.0.1/24 on {}", app.interface)),
        "the banner names the vpn:\n{log}"
    );

    // The vpn runs as a unit before the dns; no peers yet.
    let status = app.status();
    let units = status["units"].as_array().unwrap();
    let names: Vec<&str> = units.iter().filter_map(|u| u["name"].as_str()).collect();
    let at = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(at("vpn") < at("dns"), "start order {names:?}");
    let vpn_unit = units.iter().find(|u| u["name"] == "vpn").unwrap();
    assert_eq!(vpn_unit["state"], "running", "{vpn_unit:#}");
    let vpn = &status["vpn"];
    assert_eq!(vpn["available"], true, "{vpn:#}");
    assert_eq!(vpn["running"], true, "{vpn:#}");
    assert_eq!(vpn["interface"], app.interface.as_str());
    assert_eq!(vpn["address"], "10.200.0.1/24");
    assert_eq!(vpn["endpoint"], "10.251.0.1:51820");
    assert_eq!(vpn["peers"], serde_json::json!([]));

    // A service in up's own Consul, once it has a leader.
    app.wait(Duration::from_secs(30), "consul's leader", |a| {
        let (code, body) = a.http("GET", "http://127.0.0.1:8500/v1/status/leader", None);
        code == 200 && body.len() > 4
    });
    let (code, body) = app.http(
        "PUT",
        "http://127.0.0.1:8500/v1/agent/service/register",
        Some((
            "application/json",
            r#"{"ID":"web1","Name":"web","Address":"10.251.0.1","Port":8080}"#,
        )),
    );
    assert_eq!(code, 200, "register: {body}");

    // Add a peer through the API: a client config and its QR code come back.
    let (code, added) = app.json("POST", "/api/vpn/peers", Some(r#"{"name": "laptop"}"#));
    assert_eq!(code, 201, "{added:#}");
    let conf = added["config"].as_str().unwrap().to_string();
    for line in [
        "PrivateKey = ",
        "Address = 10.200.0.2/32",
        "DNS = 10.200.0.1, service.consul",
        "Endpoint = 10.251.0.1:51820",
        "AllowedIPs = 10.200.0.0/24",
    ] {
        assert!(conf.contains(line), "{line} missing:\n{conf}");
    }
    let svg = added["qr_svg"].as_str().unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<path"), "{svg}");
    assert_eq!(added["address"], "10.200.0.2");
    let registry = std::fs::read_to_string(app.dir.path().join("vpn/peers.toml")).unwrap();
    assert!(registry.contains("laptop"), "saved in vpn.dir:\n{registry}");
    let private = conf.lines().find_map(|l| l.strip_prefix("PrivateKey = ")).unwrap();
    assert!(!registry.contains(private), "the client's private key was stored");
    assert!(!app.log().contains(private), "the client's private key was logged");

    // Refusals, each a 4xx saying why.
    let (code, v) = app.json("POST", "/api/vpn/peers", Some(r#"{"name": "laptop"}"#));
    assert_eq!(code, 409, "{v:#}");
    assert!(v["error"].as_str().unwrap().contains("exists already"), "{v:#}");
    let (code, v) = app.json("POST", "/api/vpn/peers", Some(r#"{"name": "two words"}"#));
    assert_eq!(code, 400, "{v:#}");
    assert!(v["error"].as_str().unwrap().contains("not a peer name"), "{v:#}");
    let (code, v) = app.json("POST", "/api/vpn/peers", Some("nonsense"));
    assert_eq!(code, 400, "{v:#}");
    let (code, v) = app.json("DELETE", "/api/vpn/peers/nobody", None);
    assert_eq!(code, 404, "{v:#}");
    assert!(v["error"].as_str().unwrap().contains("no peer named `nobody`"), "{v:#}");

    // The laptop, configured from what the API returned, reaches the tunnel
    // address and resolves a Consul service through up's dns.
    let mut laptop_ns = laptop_ns;
    let wg = WireguardGo::start(&mut laptop_ns);
    wg.configure(&laptop_ns, &conf);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ping_once(&laptop_ns, TUNNEL) {
        assert!(
            Instant::now() < deadline,
            "no ping through the tunnel; up log:\n{}",
            app.log()
        );
    }
    let up_log = || format!("up log:\n{}", app.log());
    laptop_ns.wait_for_srv(TUNNEL, "web.service.consul", 8080, Duration::from_secs(20), up_log);

    // A restart of the vpn unit (new socket, new TUN) keeps the laptop's
    // session: it gets through again at once, dns on the tunnel address too.
    let (code, v) = app.json("POST", "/api/units/vpn/restart", None);
    assert_eq!(code, 202, "{v:#}");
    app.wait(Duration::from_secs(10), "the vpn restarted", |a| {
        let unit = a.unit("vpn");
        unit["state"] == "running" && unit["restarts"] == 1
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ping_once(&laptop_ns, TUNNEL) {
        assert!(
            Instant::now() < deadline,
            "the session did not survive a vpn restart; up log:\n{}",
            app.log()
        );
    }
    let answer = laptop_ns.dig_short(TUNNEL, &["web.service.consul", "SRV"], 3);
    assert!(
        answer.contains(" 8080 "),
        "dns on the tunnel after the vpn restart: {answer}"
    );

    // The TUN interface deleted under the running vpn: the unit fails, is
    // restarted after its backoff with a new interface, and the session goes on.
    app.ns.ip(&format!("link del {}", app.interface));
    app.wait(Duration::from_secs(10), "the vpn back after losing its TUN", |a| {
        let unit = a.unit("vpn");
        unit["state"] == "running"
            && unit["restarts"] == 2
            && unit["last_exit"]
                .as_str()
                .is_some_and(|l| l.contains("TUN interface went away"))
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ping_once(&laptop_ns, TUNNEL) {
        assert!(
            Instant::now() < deadline,
            "no ping after the TUN was made again; up log:\n{}",
            app.log()
        );
    }

    // The vpn's own nft table confines the peer (see vpn.rs for what it refuses).
    let table = wayfinder::vpn::forward::table_name(&app.interface);
    let listed = app
        .ns
        .output(require("nft").to_str().unwrap(), &["list", "table", "inet", &table]);
    assert!(
        listed.status.success() && String::from_utf8_lossy(&listed.stdout).contains("10.200.0.1"),
        "no table inet {table}: {}",
        String::from_utf8_lossy(&listed.stderr)
    );

    // The peer's traffic in /api/status, /metrics and `wayfinder status`.
    let status = app.status();
    let peer = &status["vpn"]["peers"][0];
    assert_eq!(peer["name"], "laptop", "{peer:#}");
    assert_eq!(peer["address"], "10.200.0.2");
    assert_eq!(peer["public_key"], added["public_key"]);
    assert!(
        peer["endpoint"].as_str().unwrap().starts_with("10.251.0.2:"),
        "{peer:#}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let handshake = peer["latest_handshake"].as_u64().expect("a handshake time");
    assert!(now.abs_diff(handshake) < 60, "unix seconds: {handshake} vs {now}");
    assert!(peer["rx_bytes"].as_u64().unwrap() > 0 && peer["tx_bytes"].as_u64().unwrap() > 0);
    let (text, m) = app.metrics();
    let laptop = [("peer", "laptop")];
    assert_eq!(metric(&m, "wayfinder_vpn_peers", &[]), Some(1.0), "{text}");
    for direction in ["received", "sent"] {
        let bytes = metric(&m, &format!("wayfinder_vpn_{direction}_bytes_total"), &laptop);
        assert!(bytes.is_some_and(|b| b > 0.0), "{direction} bytes: {text}");
    }
    assert!(
        metric(&m, "wayfinder_vpn_handshakes_total", &laptop).is_some_and(|h| h >= 1.0),
        "{text}"
    );
    assert_eq!(
        metric(&m, "wayfinder_vpn_last_handshake_timestamp_seconds", &laptop),
        Some(handshake as f64),
        "{text}"
    );
    assert_eq!(
        metric(&m, "wayfinder_supervisor_unit_up", &[("unit", "vpn")]),
        Some(1.0)
    );
    let out = app.ns.output(
        wayfinder_bin().to_str().unwrap(),
        &["status", "-c", app.config.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(&format!("VPN 10.200.0.1/24 on {}: running", app.interface)),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("laptop "))
        .unwrap_or_else(|| panic!("no peer row:\n{text}"));
    assert!(row.contains("10.200.0.2") && row.contains(" ago"), "{row}");

    // DELETE: gone from the registry and the status, and its traffic stops.
    let (code, v) = app.json("DELETE", "/api/vpn/peers/laptop", None);
    assert_eq!(code, 200, "{v:#}");
    assert_eq!(app.status()["vpn"]["peers"], serde_json::json!([]));
    let registry = std::fs::read_to_string(app.dir.path().join("vpn/peers.toml")).unwrap();
    assert!(!registry.contains("laptop"), "{registry}");
    assert!(
        !ping_once(&laptop_ns, TUNNEL) && !ping_once(&laptop_ns, TUNNEL),
        "a removed peer still gets through"
    );
    let (_, m) = app.metrics();
    assert_eq!(metric(&m, "wayfinder_vpn_peers", &[]), Some(0.0));

    // SIGTERM: up stops the vpn too: its interface and control socket go.
    stop(&app);
}

/// SIGTERM to `up` in `app`; waits until the vpn's interface and control socket
/// are gone.
pub(crate) fn stop(app: &Appliance) {
    // Earlier restarts logged their own stops: wait for one more.
    let stops_before = app.log().matches("vpn stopped").count();
    let out = Command::new("ip")
        .args(["netns", "pids", &app.ns.name])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "wayfinder" {
            // SAFETY: kill(2) on the `up` this test started in its namespace.
            unsafe { libc::kill(pid.parse().unwrap(), libc::SIGTERM) };
        }
    }
    let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", app.interface));
    // The interface goes a moment before the vpn logs that it stopped (and
    // removes its nft table): wait for all of it.
    app.wait(Duration::from_secs(20), "the vpn to stop", |a| {
        !sock.exists()
            && !a.ns.output("ip", &["link", "show", &a.interface]).status.success()
            && a.log().matches("vpn stopped").count() > stops_before
    });
    let tables = app.ns.output(require("nft").to_str().unwrap(), &["list", "tables"]);
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(
        !tables.contains("wayfinder_vpn"),
        "the vpn's nft table outlived it:\n{tables}"
    );
}

/// Headless Chromium from Debian inside `ns`, with a fresh profile; `args`
/// add the mode (`--dump-dom` or `--screenshot=...`). Forms submitted by the
/// page's own script finish within the virtual time budget.
fn chromium(ns: &Netns, url: &str, args: &[String]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = ns.cmd("timeout");
    cmd.arg("60")
        .arg(require("chromium"))
        .args(crate::supervisor::CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--virtual-time-budget=5000")
        .args(args)
        .arg(url)
        .stdin(std::process::Stdio::null());
    cmd.output().expect("run chromium")
}

/// A local page that submits `form` (copied from the status page, so its
/// action and fields are the page's own) with `name` filled in, as a person
/// pressing the button would (`requestSubmit` runs the form's validation).
/// The script submits while the page is still being parsed: the browser then
/// waits for the answer page alone (submitting from `onload` races the
/// screenshot and the DOM dump with the navigation).
fn submitting(dir: &Path, file: &str, form: &str, name: Option<&str>) -> String {
    let fill = name.map_or_else(String::new, |n| {
        format!("document.querySelector('input[name=name]').value='{n}';")
    });
    let path = dir.join(file);
    std::fs::write(
        &path,
        format!(
            "<!doctype html><html><head><base href=\"http://{ADMIN}/\"></head><body>{form}\
             <script>{fill}document.forms[0].requestSubmit()</script></body></html>"
        ),
    )
    .unwrap();
    format!("file://{}", path.display())
}

/// The `<form ...>...</form>` of `html` whose opening tag contains `marker`.
fn form_with(html: &str, marker: &str) -> String {
    let start = html
        .match_indices("<form")
        .map(|(i, _)| i)
        .find(|i| html[*i..].split_once('>').is_some_and(|(tag, _)| tag.contains(marker)))
        .unwrap_or_else(|| panic!("no form with `{marker}` in:\n{html}"));
    let end = html[start..].find("</form>").unwrap() + start + "</form>".len();
    html[start..end].to_string()
}

fn assert_png(path: &Path, width: u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("no screenshot at {} ({e})", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert!(bytes.len() > 10_000, "a non-trivial picture: {} bytes", bytes.len());
    // IHDR: width as a big-endian u32 at bytes 16..20.
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), width);
    println!("screenshot: {}", path.display());
}

/// The status page with the vpn running, in a real browser: "add peer" answers
/// with the client config in a `<pre>` and its QR code as an inline `<svg>`
/// (screenshot saved under target/screenshots), the page lists the peers, and
/// a peer's "remove" button removes it.
#[test]
fn status_page_adds_and_removes_vpn_peers_in_headless_chromium() {
    require("curl");
    let app = Appliance::start(&[("START_CONSUL", "false"), ("START_LB", "false")]);
    let (code, page) = app.http("GET", "/", None);
    assert_eq!(code, 200);
    assert!(page.contains("No peers yet"), "{page}");
    let add = form_with(&page, "add-peer");
    assert!(add.contains("action=\"/api/vpn/peers?csrf="), "{add}");

    let dir = app.dir.path();
    let out = chromium(
        &app.ns,
        &submitting(dir, "add-phone.html", &add, Some("phone")),
        &["--dump-dom".into()],
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    for want in [
        "peer phone added",
        "<pre>[Interface]",
        "PrivateKey = ",
        "Address = 10.200.0.2/32",
        "Endpoint = 10.251.0.1:51820",
        "<div class=\"qr\"><svg",
        "download=\"phone.conf\"",
    ] {
        assert!(
            dom.contains(want),
            "`{want}` not in the new-peer page:\n{dom}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The same page for a second peer, as a phone shows it.
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("vpn-new-peer-phone.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        &app.ns,
        &submitting(dir, "add-tablet.html", &add, Some("tablet")),
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=390,844".into(),
        ],
    );
    assert_png(&png, 390);

    // The status page lists both, each with a remove button.
    let url = format!("http://{ADMIN}/");
    let out = chromium(&app.ns, &url, &["--dump-dom".into()]);
    let dom = String::from_utf8_lossy(&out.stdout);
    for want in [
        "phone <code>10.200.0.2</code>",
        "tablet <code>10.200.0.3</code>",
        "handshake never",
        "add peer",
        "(udp, WireGuard)",
    ] {
        assert!(dom.contains(want), "`{want}` not in the status page:\n{dom}");
    }
    let png = shots.join("status-page-vpn.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        &app.ns,
        &url,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=390,1700".into(),
        ],
    );
    assert_png(&png, 390);

    // "remove" on tablet's row: back on the status page, without it.
    let remove = form_with(&dom, "/api/vpn/peers/tablet/remove");
    let out = chromium(
        &app.ns,
        &submitting(dir, "remove-tablet.html", &remove, None),
        &["--dump-dom".into()],
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("phone <code>") && !dom.contains("tablet <code>"),
        "tablet not removed:\n{dom}"
    );
    let names: Vec<String> = app.status()["vpn"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["phone"]);

    // A duplicate from the form: a page saying why, not JSON.
    let out = chromium(
        &app.ns,
        &submitting(dir, "add-again.html", &add, Some("phone")),
        &["--dump-dom".into()],
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("a peer named `phone` exists already") && dom.contains("back to the status page"),
        "{dom}"
    );
    stop(&app);
}

/// The vpn's port taken when `up` starts: exit 64 naming the vpn and the
/// address, like dns and lb. The UDP bind fails before any TUN interface is
/// made, so this runs in the test's own namespace.
#[test]
fn up_exits_64_when_the_vpn_port_is_taken() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(
        &config,
        format!(
            "[dns]\nupstreams = [\"127.0.0.1:9\"]\n[supervisor]\nadmin = \"\"\n\
             [vpn]\nenabled = true\nlisten = \"{addr}\"\ninterface = \"{}\"\ndir = \"{}/vpn\"\n",
            unique("wfx"),
            dir.path().display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(wayfinder_bin());
    cmd.args(["up", "-c"]).arg(&config).current_dir(dir.path());
    for (var, _) in wayfinder::env::VARS {
        cmd.env_remove(var);
    }
    let out = cmd
        .envs([("START_CONSUL", "false"), ("START_DNS", "false"), ("START_LB", "false")])
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("could not start vpn") && err.contains(&addr.to_string()),
        "{err}"
    );
}
