//! Three hosts in network namespaces on one bridge, each running `wayfinder up`
//! as a master (PanteraS's 3-masters layout: Consul server, `-bootstrap-expect
//! 3`, joins through `CONSUL_HOSTS`), each supervising an nginx registered in
//! its own agent. One host is cut off (its link down): dns and lb on the other
//! two keep answering, and the cut host's instance drops out.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{die_with_parent, require, wayfinder_bin};
use crate::netns::{Netns, link_to_bridge};

/// The hosts' network: a switch namespace holding one bridge, with a port per host.
struct Net {
    switch: Netns,
    /// The switch-side port of each host's link (down = that host is cut off).
    ports: Vec<String>,
}

impl Net {
    /// `count` hosts with `10.99.0.<i+1>/24` on eth0, all on one bridge.
    fn create(count: usize) -> (Self, Vec<Netns>) {
        let switch = Netns::new();
        switch.ip("link add br0 type bridge");
        switch.ip("link set br0 up");
        let mut ports = Vec::new();
        let mut hosts = Vec::new();
        for i in 1..=count {
            let host = Netns::new();
            let port = format!("h{i}");
            link_to_bridge(&switch, "br0", &port, &host, "eth0", &format!("10.99.0.{i}/24"));
            ports.push(port);
            hosts.push(host);
        }
        (Net { switch, ports }, hosts)
    }
}

/// One host's `wayfinder up` in its namespace, stopped (SIGTERM, then SIGKILL
/// after 10 s) before the namespace goes.
struct Host {
    child: Option<Child>,
    ip: String,
    log: PathBuf,
    ns: Netns,
}

impl Host {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `program args` in this host's namespace.
    fn cmd(&self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = self.ns.cmd(program.to_str().expect("program path"));
        cmd.args(args);
        cmd
    }

    /// Asks its `up` to stop (SIGTERM); drop waits for it.
    fn terminate(&self) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first so Consul and nginx are stopped by the supervisor;
            // their PDEATHSIG catches them if it does not finish.
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn nginx_conf(dir: &Path, ip: &str, name: &str) -> PathBuf {
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen {ip}:8080;\n    location / {{ return 200 \"{name}\"; }}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    conf
}

fn start_host(ns: Netns, i: usize, count: usize, base: &Path) -> Host {
    let ip = format!("10.99.0.{}", i + 1);
    let dir = base.join(format!("h{}", i + 1));
    std::fs::create_dir_all(&dir).unwrap();
    let nginx = nginx_conf(&dir, &ip, &format!("web-h{}", i + 1));
    let config = dir.join("wayfinder.toml");
    std::fs::write(
        &config,
        format!(
            "[dns]\nupstreams = [\"127.0.0.1:9\"]\nworkers = 1\n\
             [lb]\nworkers = 1\nconnect_timeout = \"300ms\"\nstats = \"\"\n\
             [supervisor.consul]\nnode = \"h{n}\"\ndata_dir = \"{d}/consul\"\n\
             [[supervisor.program]]\nname = \"web\"\ncommand = \"{nginx_bin}\"\n\
             args = [\"-p\", \"{d}\", \"-c\", \"{conf}\", \"-e\", \"{d}/error.log\"]\n",
            n = i + 1,
            d = dir.display(),
            nginx_bin = require("nginx").display(),
            conf = nginx.display(),
        ),
    )
    .unwrap();
    let joins = (1..=count)
        .map(|h| format!("-join=10.99.0.{h}"))
        .collect::<Vec<_>>()
        .join(" ");
    let log = dir.join("up.log");
    let mut cmd = ns.cmd(wayfinder_bin().to_str().unwrap());
    cmd.args(["up", "-c", config.to_str().unwrap()]);
    cmd.current_dir(&dir).env("RUST_LOG", "info");
    for (var, _) in wayfinder::env::VARS {
        cmd.env_remove(var);
    }
    // A PanteraS restricted/host file for a master of a 3-master cluster.
    cmd.envs([
        ("MASTER", "true"),
        ("SLAVE", "true"),
        ("HOST_IP", ip.as_str()),
        ("LISTEN_IP", ip.as_str()),
        ("CONSUL_IP", ip.as_str()),
        ("CONSUL_HOSTS", joins.as_str()),
        ("CONSUL_PARAMS", "-bootstrap-expect 3"),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap());
    // `ip netns exec` execs wayfinder in the same process, which keeps the
    // parent-death signal.
    let child = die_with_parent(&mut cmd)
        .spawn()
        .expect("start wayfinder up in its namespace");
    Host {
        child: Some(child),
        ip,
        log,
        ns,
    }
}

/// `dig` in `host`'s namespace against its own Wayfinder dns: (status, answers).
fn dig(host: &Host, name: &str) -> (String, Vec<String>) {
    let out = host
        .cmd(
            &require("dig"),
            &[&format!("@{}", host.ip), "+tries=1", "+time=2", name, "A"],
        )
        .output()
        .expect("run dig");
    let d = crate::harness::Dig {
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        took: Duration::ZERO,
    };
    (d.status(), d.answers())
}

/// An HTTP GET through `host`'s lb with `Host: web.service.consul`: (status, body).
fn get(host: &Host) -> (String, String) {
    let out = host
        .cmd(
            &require("curl"),
            &[
                "-s",
                "-m",
                "3",
                "-H",
                "Host: web.service.consul",
                "-w",
                "\n%{http_code}",
                &format!("http://{}/", host.ip),
            ],
        )
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

/// Registers host i's nginx in its own agent, with an HTTP check.
fn register(host: &Host, i: usize) {
    let body = serde_json::json!({
        "ID": format!("web-h{}", i + 1), "Name": "web", "Address": host.ip, "Port": 8080,
        "Tags": ["haproxy"],
        "Check": { "HTTP": format!("http://{}:8080/", host.ip), "Interval": "1s", "Timeout": "500ms" },
    });
    let out = host
        .cmd(
            &require("curl"),
            &[
                "-sf",
                "-X",
                "PUT",
                "-d",
                &body.to_string(),
                &format!("http://{}:8500/v1/agent/service/register", host.ip),
            ],
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "register on h{}: {}",
        i + 1,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_until(limit: Duration, what: &str, hosts: &[Host], mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() >= deadline {
            let logs: Vec<String> = hosts
                .iter()
                .map(|h| {
                    let log = h.log();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    format!(
                        "--- {}:\n{}",
                        h.ns.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })
                .collect();
            panic!("timed out after {limit:?} waiting for: {what}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn three_masters_survive_one_host_cut_off() {
    for p in ["consul", "nginx", "dig", "curl", "ip"] {
        require(p);
    }
    let (net, namespaces) = Net::create(3);
    let base = tempfile::tempdir().unwrap();
    let hosts: Vec<Host> = namespaces
        .into_iter()
        .enumerate()
        .map(|(i, ns)| start_host(ns, i, 3, base.path()))
        .collect();
    let started = Instant::now();

    // The cluster forms (three servers, one leader) and every agent takes its
    // registration.
    for (i, h) in hosts.iter().enumerate() {
        wait_until(
            Duration::from_secs(40),
            &format!("h{} consul up", i + 1),
            &hosts,
            || {
                h.cmd(
                    &require("curl"),
                    &["-sf", &format!("http://{}:8500/v1/status/leader", h.ip)],
                )
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.len() > 4)
            },
        );
    }
    for (i, h) in hosts.iter().enumerate() {
        register(h, i);
    }
    let all = vec!["10.99.0.1", "10.99.0.2", "10.99.0.3"];
    for h in &hosts {
        wait_until(
            Duration::from_secs(20),
            &format!("{}: three passing instances", h.ns.name),
            &hosts,
            || dig(h, "web.service.consul").1 == all,
        );
        wait_until(
            Duration::from_secs(10),
            &format!("{}: lb routes web", h.ns.name),
            &hosts,
            || get(h).0 == "200",
        );
    }

    println!("cluster formed and serving after {:?}", started.elapsed());
    // Cut host 3 off.
    net.switch.ip(&format!("link set {} down", net.ports[2]));
    let cut = Instant::now();

    // The other two keep answering, dns and lb, all the while.
    let survivors = &hosts[..2];
    let mut answered = 0;
    while cut.elapsed() < Duration::from_secs(6) {
        for h in survivors {
            let (status, answers) = dig(h, "web.service.consul");
            assert_eq!(
                status,
                "NOERROR",
                "{}: dns after the cut ({:?})",
                h.ns.name,
                cut.elapsed()
            );
            assert!(!answers.is_empty(), "{}: no instances after the cut", h.ns.name);
            let (code, body) = get(h);
            assert_eq!(
                code,
                "200",
                "{}: lb after the cut ({:?}): {body}",
                h.ns.name,
                cut.elapsed()
            );
            assert!(body == "web-h1" || body == "web-h2", "{}: {body}", h.ns.name);
            answered += 1;
        }
    }
    assert!(answered >= 4, "{answered}");
    // And the cut host's instance drops out of the answers (serf marks it failed).
    for h in survivors {
        wait_until(
            Duration::from_secs(30),
            &format!("{}: h3's instance gone", h.ns.name),
            &hosts,
            || dig(h, "web.service.consul").1 == ["10.99.0.1", "10.99.0.2"],
        );
    }
    println!("h3's instance dropped out {:?} after the cut", cut.elapsed());
    // All at once: each stop waits for its Consul, which waits for its peers.
    let stopping = Instant::now();
    for h in &hosts {
        h.terminate();
    }
    drop(hosts);
    println!("three hosts stopped in {:?}", stopping.elapsed());
}
