//! Three hosts in network namespaces on one bridge, each running `wayfinder up`
//! as a master (PanteraS's 3-masters layout: Consul server, `-bootstrap-expect
//! 3`, joins through `CONSUL_HOSTS`), each supervising an nginx registered in
//! its own agent. One host is cut off (its link down): dns and lb on the other
//! two keep answering, and the cut host's instance drops out.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{require, wayfinder_bin};

/// Runs `ip <args>`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new(require("ip")).args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip netns exec <ns> <program> <args>` as a command.
fn in_ns(ns: &str, program: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(require("ip"));
    cmd.args(["netns", "exec", ns]).arg(program).args(args);
    cmd
}

/// The bridge, the namespaces and their links, removed on drop.
struct Net {
    bridge: String,
    hosts: Vec<(String, String)>,
}

impl Net {
    /// `count` namespaces with `10.99.0.<i+1>/24` on eth0, all on one new bridge.
    fn create(count: usize) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag = format!("{}{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed));
        let net = Net {
            bridge: format!("wfb{tag}"),
            hosts: (1..=count)
                .map(|i| (format!("wfup-{tag}-h{i}"), format!("wfv{tag}h{i}")))
                .collect(),
        };
        ip(&["link", "add", &net.bridge, "type", "bridge"]);
        ip(&["link", "set", &net.bridge, "up"]);
        for (i, (ns, veth)) in net.hosts.iter().enumerate() {
            ip(&["netns", "add", ns]);
            let peer = format!("{veth}p");
            ip(&["link", "add", veth, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &peer, "netns", ns]);
            ip(&["link", "set", veth, "master", &net.bridge]);
            ip(&["link", "set", veth, "up"]);
            let addr = format!("10.99.0.{}/24", i + 1);
            ip(&["-n", ns, "link", "set", &peer, "name", "eth0"]);
            ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (ns, veth) in &self.hosts {
            let _ = Command::new("ip").args(["link", "del", veth]).output();
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}

/// One host's `wayfinder up`, killed with its children on drop.
struct Host {
    ns: String,
    ip: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Host {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Host {
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

fn start_host(net: &Net, i: usize, base: &Path) -> Host {
    let (ns, _) = &net.hosts[i];
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
    let joins = (1..=net.hosts.len())
        .map(|h| format!("-join=10.99.0.{h}"))
        .collect::<Vec<_>>()
        .join(" ");
    let log = dir.join("up.log");
    let mut cmd = in_ns(ns, wayfinder_bin(), &["up", "-c", config.to_str().unwrap()]);
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
    // SAFETY: prctl is async-signal-safe; `ip netns exec` execs wayfinder in
    // this same process, which keeps the flag.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Host {
        ns: ns.clone(),
        child: Some(cmd.spawn().expect("start wayfinder up in its namespace")),
        ip,
        log,
    }
}

/// `dig` in `host`'s namespace against its own Wayfinder dns: (status, answers).
fn dig(host: &Host, name: &str) -> (String, Vec<String>) {
    let out = in_ns(
        &host.ns,
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
    let out = in_ns(
        &host.ns,
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
    let out = in_ns(
        &host.ns,
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
                        h.ns,
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
    let net = Net::create(3);
    let base = tempfile::tempdir().unwrap();
    let hosts: Vec<Host> = (0..3).map(|i| start_host(&net, i, base.path())).collect();
    let started = Instant::now();

    // The cluster forms (three servers, one leader) and every agent takes its
    // registration.
    for (i, h) in hosts.iter().enumerate() {
        wait_until(
            Duration::from_secs(40),
            &format!("h{} consul up", i + 1),
            &hosts,
            || {
                in_ns(
                    &h.ns,
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
            &format!("{}: three passing instances", h.ns),
            &hosts,
            || dig(h, "web.service.consul").1 == all,
        );
        wait_until(
            Duration::from_secs(10),
            &format!("{}: lb routes web", h.ns),
            &hosts,
            || get(h).0 == "200",
        );
    }

    println!("cluster formed and serving after {:?}", started.elapsed());
    // Cut host 3 off.
    ip(&["link", "set", &net.hosts[2].1, "down"]);
    let cut = Instant::now();

    // The other two keep answering, dns and lb, all the while.
    let survivors = &hosts[..2];
    let mut answered = 0;
    while cut.elapsed() < Duration::from_secs(6) {
        for h in survivors {
            let (status, answers) = dig(h, "web.service.consul");
            assert_eq!(status, "NOERROR", "{}: dns after the cut ({:?})", h.ns, cut.elapsed());
            assert!(!answers.is_empty(), "{}: no instances after the cut", h.ns);
            let (code, body) = get(h);
            assert_eq!(code, "200", "{}: lb after the cut ({:?}): {body}", h.ns, cut.elapsed());
            assert!(body == "web-h1" || body == "web-h2", "{}: {body}", h.ns);
            answered += 1;
        }
    }
    assert!(answered >= 4, "{answered}");
    // And the cut host's instance drops out of the answers (serf marks it failed).
    for h in survivors {
        wait_until(
            Duration::from_secs(30),
            &format!("{}: h3's instance gone", h.ns),
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
