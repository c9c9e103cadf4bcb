//! Containers reach the appliance as PanteraS users expect: an app container
//! registered by the register component, and client containers on the
//! daemon's default bridge and on a user-defined network resolve and reach it
//! by every name and URL the README, deploy/README and the status page
//! present, with the shipped `deploy/appliance.toml` (A records of
//! `NAME.service.consul` = the lb hosts, as PanteraS's dnsmasq answered).
//!
//! ```text
//!  private dockerd (docker.rs) ── bridge 10.a.b.1 = LISTEN_IP = HOST_IP
//!  wayfinder up (appliance.toml; dns :53, lb :80 and :81 on the bridge address)
//!      ◀── client on the default bridge   (--dns 10.a.b.1)
//!      ◀── client on a user network       (Docker's embedded resolver → 10.a.b.1)
//!  clients: the appliance image (glibc: `getent ahosts` is getaddrinfo; bash's
//!  /dev/tcp for HTTP); SRV with the host's dig inside the client's network
//!  namespace (nsenter), since the image has no dig
//! ```
//!
//! Port 53 and 80 are fixed (a container's resolver has no port), but on the
//! test's own bridge address, which no other test has.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::docker::{Dockerd, output_within};
use crate::harness::{Consul, Process, Unbound, free_port, http_get, require};

/// The appliance image, built by `deploy/build-image.sh` (image.rs tests the build itself).
const IMAGE: &str = "wayfinder:containers";

/// How long anything here may take to become true.
const LIMIT: Duration = Duration::from_secs(60);

/// deploy/appliance.toml as shipped, with only what a test must change: the
/// test's Consul agent, its upstream, a free admin port (returned with the
/// file's path). Listeners, A-record mode and wildcard targets stay as
/// shipped (LISTEN_IP places them).
fn appliance_config(dir: &Path, consul: &Consul, upstream: SocketAddr, docker: &Dockerd) -> (PathBuf, SocketAddr) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/appliance.toml");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let mut doc: toml::Table = text.parse().expect("deploy/appliance.toml parses");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut set = |section: &str, key: &str, value: toml::Value| {
        let table = doc
            .entry(section)
            .or_insert_with(|| toml::Table::new().into())
            .as_table_mut()
            .expect("a section is a table");
        table.insert(key.into(), value);
    };
    set("consul", "http", consul.http_addr().to_string().into());
    set("consul", "dns", vec![consul.dns_addr().to_string()].into());
    set("dns", "upstreams", vec![upstream.to_string()].into());
    set("dns", "workers", 1.into());
    set("lb", "workers", 1.into());
    set("supervisor", "admin", admin.to_string().into());
    set("register", "docker", docker.host().into());
    let path = dir.join("wayfinder.toml");
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    (path, admin)
}

/// `/api/status` of the admin endpoint at `admin` (null when it does not answer).
fn status(admin: SocketAddr) -> Value {
    let body = http_get(admin, "/api/status").unwrap_or_default();
    serde_json::from_str(&body).unwrap_or_default()
}

/// Whether `/api/ready` says ready.
fn ready(admin: SocketAddr) -> bool {
    let body = http_get(admin, "/api/ready").unwrap_or_default();
    serde_json::from_str::<Value>(&body).is_ok_and(|v| v["ready"] == true)
}

/// Waits until `f` gives `Some`, or fails naming `what` with `context()`.
fn wait_some<T>(what: &str, context: impl Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {LIMIT:?} waiting for: {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A client container: the appliance image doing nothing, asking `dns` on
/// `network` (None: the default bridge) with the search list deploy/README
/// recommends.
fn client(d: &Dockerd, dns: IpAddr, network: Option<&str>) -> String {
    let dns = dns.to_string();
    let mut args = vec![
        "run",
        "-d",
        "--no-healthcheck",
        "--dns",
        &dns,
        "--dns-search",
        "consul",
        "--entrypoint",
        "sleep",
    ];
    if let Some(n) = network {
        args.extend(["--network", n]);
    }
    args.extend([IMAGE, "infinity"]);
    d.docker(&args)
}

/// `getent ahosts NAME` in `container` (glibc's getaddrinfo, the container's
/// resolv.conf): the addresses, or what went wrong.
fn getaddrinfo(d: &Dockerd, container: &str, name: &str) -> Result<Vec<IpAddr>, String> {
    let out = d.try_docker(&["exec", container, "getent", "ahosts", name])?;
    let mut ips: Vec<IpAddr> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    ips.dedup();
    Ok(ips)
}

/// `GET url` from `container` with bash's /dev/tcp (the name resolved by
/// getaddrinfo, `Host` from the URL, as any HTTP client sends it): the
/// response, or what went wrong.
fn http_from(d: &Dockerd, container: &str, url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an http URL: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p),
        None => (authority, "80"),
    };
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port} && printf 'GET {path} HTTP/1.1\\r\\nHost: {authority}\\r\\nConnection: close\\r\\n\\r\\n' >&3 && timeout 10 cat <&3"
    );
    d.try_docker(&["exec", container, "bash", "-c", &script])
}

/// `dig` (the host's) inside `container`'s network namespace, asking `server`.
fn dig_in(d: &Dockerd, container: &str, server: &str, args: &[&str]) -> String {
    let pid = d.docker(&["inspect", "-f", "{{.State.Pid}}", container]);
    let mut cmd = Command::new(require("nsenter"));
    cmd.args(["-t", &pid, "-n", require("dig").to_str().unwrap()])
        .arg(format!("@{server}"))
        .args(["+tries=2", "+time=3", "+short"])
        .args(args);
    let out = output_within(&mut cmd, Duration::from_secs(20)).unwrap_or_else(|e| panic!("nsenter dig: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn containers_reach_the_appliance_by_every_presented_name_and_url() {
    require("dig");
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let upstream = Unbound::start(&["up.test. 300 IN A 192.0.2.99"]);
    let d = Dockerd::start();
    crate::image::build(&d, IMAGE);
    let app = d.app_image();
    let bridge = IpAddr::V4(d.bridge_ip());
    let bridge_text = bridge.to_string();
    // The instances are registered at the host's outward address, the lb at
    // the bridge's: A records of NAME.service.consul tell the two apart.
    let outward = wayfinder::net::host::interface_addresses()
        .into_iter()
        .map(|(_, ip)| ip)
        .find(|ip| ip.is_ipv4() && !ip.is_loopback() && *ip != bridge)
        .expect("this test needs a non-loopback IPv4 interface address (ip -brief address)");
    let outward_text = outward.to_string();

    let (config, admin) = appliance_config(dir.path(), &consul, upstream.addr, &d);
    let up = Process::spawn(
        dir.path(),
        &["up", "-c", config.to_str().unwrap()],
        &[
            ("MASTER", "true"),
            ("SLAVE", "true"),
            ("START_CONSUL", "false"),
            ("LISTEN_IP", &bridge_text),
            ("HOST_IP", &outward_text),
            ("HAPROXY_ADD_DOMAIN", ".apps.example.com"),
        ],
    );
    wait_some(
        "wayfinder up ready (/api/ready)",
        || format!("{:?}\n{}", http_get(admin, "/api/ready"), up.log()),
        || ready(admin).then_some(()),
    );

    // The app, registered by the register component and routed by the lb.
    let web = d.run(&[
        "-p",
        "8080",
        "-e",
        "SERVICE_NAME=web",
        "-e",
        "SERVICE_TAGS=haproxy",
        app,
    ]);
    let hostname = web[..12].to_string();
    let presented = wait_some(
        "web on the status page with its URLs and names",
        || format!("{:#}\n{}", status(admin)["services"], up.log()),
        || {
            let status = status(admin);
            let web = status["services"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == "web")?
                .clone();
            let strings = |key: &str| -> Vec<String> {
                web[key]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                    .unwrap_or_default()
            };
            let (urls, names) = (strings("urls"), strings("dns_names"));
            (web["instances"][0]["lb"] == "up" && !urls.is_empty()).then_some((urls, names))
        },
    );
    let (status_urls, status_names) = presented;

    // Every URL presented: the status page's, and the READMEs'.
    let mut urls: Vec<String> = status_urls.clone();
    for readme in [
        "http://web.service.consul/",
        "http://web.apps.example.com/",
        "http://web.service/",
    ] {
        if !urls.iter().any(|u| u == readme) {
            urls.push(readme.to_string());
        }
    }
    let (network, _subnet) = d.create_network("clients");
    let on_bridge = client(&d, bridge, None);
    let on_network = client(&d, bridge, Some(&network));
    for (where_, c) in [("default bridge", &on_bridge), ("user network", &on_network)] {
        // getaddrinfo: the service (lb hosts), the search list, the wildcard
        // domain, an upstream name, every name the status page shows.
        let mut names: Vec<(&str, Vec<IpAddr>)> = vec![
            ("web.service.consul", vec![bridge]),
            ("web.service", vec![bridge]),
            ("x.apps.example.com", vec![bridge]),
            ("up.test", vec!["192.0.2.99".parse().unwrap()]),
        ];
        for n in &status_names {
            names.push((n.as_str(), vec![bridge]));
        }
        for (name, want) in &names {
            let got = wait_some(
                &format!("{name} from a client on the {where_}"),
                || format!("last: {:?}\n{}", getaddrinfo(&d, c, name), up.log()),
                || getaddrinfo(&d, c, name).ok().filter(|ips| ips == want),
            );
            assert_eq!(&got, want, "{name} on the {where_}");
        }
        // SRV: the instances themselves (port = the published port), from
        // the client's network namespace, asking the resolver it has.
        let resolver = if c == &on_bridge {
            bridge_text.clone()
        } else {
            "127.0.0.11".to_string()
        };
        let port = d.published_port(&web, "8080/tcp");
        let srv = dig_in(&d, c, &resolver, &["web.service.consul", "SRV"]);
        assert!(
            srv.lines()
                .any(|l| l.split_whitespace().nth(2) == Some(&port.to_string())),
            "SRV of web from the {where_} via {resolver}: {srv:?}"
        );
        // HTTP through the lb by every presented URL.
        for url in &urls {
            let response = wait_some(
                &format!("{url} from the {where_}"),
                || format!("last: {:?}", http_from(&d, c, url)),
                || http_from(&d, c, url).ok().filter(|r| r.starts_with("HTTP/1.1 200")),
            );
            assert!(response.contains(&hostname), "{url} from the {where_}: {response}");
        }
    }
    d.rm_force(&[&on_bridge, &on_network, &web]);
}
