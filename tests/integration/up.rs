//! `wayfinder up` as a real process: it starts its own Consul agent, dns and lb
//! and a program with a grandchild; a service registered in that Consul is
//! resolved by dig and reached through the lb; `wayfinder status` prints it;
//! SIGTERM (and SIGKILL) leave no process behind; `check` prints the role plan;
//! mistakes exit 64.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Nginx, dig_until, free_port, http_client, http_put, require, unique, wait_routed};

use crate::harness::wayfinder_command as wayfinder;

/// Every process descended from `root`, from /proc (pid -> ppid), with its
/// start time so that a recycled pid is not mistaken for it.
fn descendants(root: u32) -> Vec<(u32, u64, String)> {
    let mut parent = HashMap::new();
    let mut info = HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c.to_string()).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After `)`: state ppid pgrp ...; starttime is field 22 of stat (index 19 here).
        let (Some(ppid), Some(start)) = (
            fields.get(1).and_then(|p| p.parse::<u32>().ok()),
            fields.get(19).and_then(|s| s.parse::<u64>().ok()),
        ) else {
            continue;
        };
        parent.insert(pid, ppid);
        info.insert(pid, (start, comm));
    }
    let mut out = Vec::new();
    for &pid in parent.keys() {
        let mut p = pid;
        while let Some(&pp) = parent.get(&p) {
            if pp == root {
                let (start, comm) = info[&pid].clone();
                out.push((pid, start, comm));
                break;
            }
            if pp <= 1 {
                break;
            }
            p = pp;
        }
    }
    out
}

/// True while `pid` with that start time exists and is not a zombie.
fn still_running(pid: u32, start: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields.first() != Some(&"Z") && fields.get(19).and_then(|s| s.parse::<u64>().ok()) == Some(start)
}

/// A running `wayfinder up`: in its own process group, killed with everything
/// it started when the test ends (whatever happened).
struct UpProcess {
    child: Option<Child>,
    pid: u32,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl UpProcess {
    fn spawn(mut cmd: Command, dir: &Path) -> Self {
        let stdout = dir.join("up.stdout");
        let stderr = dir.join("up.stderr");
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and affects only the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start wayfinder up");
        UpProcess {
            pid: child.id(),
            child: Some(child),
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not reaped yet.
        assert_eq!(unsafe { libc::kill(self.pid as i32, sig) }, 0);
    }

    /// Waits for the ready banner.
    async fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.stdout().contains("wayfinder up: ready") {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("up exited early ({status:?}):\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "not ready after {limit:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for UpProcess {
    fn drop(&mut self) {
        for (pid, start, _) in descendants(self.pid) {
            if still_running(pid, start) {
                // SAFETY: kill(2) on a process this test's `up` started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Ports of the built-in Consul agent of one test.
struct ConsulPorts {
    http: u16,
    dns: u16,
    extra: String,
}

fn consul_ports() -> ConsulPorts {
    ConsulPorts {
        http: free_port(),
        dns: free_port(),
        extra: format!(
            "extra_args = [\"-serf-lan-port\", \"{}\", \"-serf-wan-port\", \"{}\", \"-server-port\", \"{}\"]",
            free_port(),
            free_port(),
            free_port()
        ),
    }
}

/// Unit `name` as `GET /api/units` shows it (fails the test when it is not listed).
async fn unit(client: &reqwest::Client, admin: SocketAddr, name: &str) -> serde_json::Value {
    let units: serde_json::Value = client
        .get(format!("http://{admin}/api/units"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    units
        .as_array()
        .and_then(|all| all.iter().find(|u| u["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no unit {name} in {units:#}"))
}

/// The end-to-end test: `up` starts the real Consul itself, then dns and lb;
/// a service registered in that Consul (a real nginx) is resolved by dig
/// through Wayfinder's dns and reached through its lb; `wayfinder status`
/// shows it; SIGTERM stops everything (no process left) with exit status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_consul_dns_lb_and_sigterm_leaves_nothing() {
    require("consul");
    let dir = tempfile::tempdir().unwrap();
    let c = consul_ports();
    let dns = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let lb = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // Stands in for registrator: it exits unless Consul has a leader when it starts.
    let registrar = dir.path().join("registrar.sh");
    std::fs::write(
        &registrar,
        format!(
            "leader=$(curl -sf http://127.0.0.1:{}/v1/status/leader) || exit 1\n\
             [ -n \"$leader\" ] && [ \"$leader\" != '\"\"' ] || exit 1\nexec sleep 1000\n",
            c.http
        ),
    )
    .unwrap();
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(
        &config,
        format!(
            "[consul]\nhttp = \"127.0.0.1:{http}\"\ndns = [\"127.0.0.1:{cdns}\"]\n\
             [dns]\nlisten = [\"{dns}\"]\nupstreams = [\"127.0.0.1:9\"]\nworkers = 1\n\
             [lb]\nhttp = \"{lb}\"\nstats = \"\"\nworkers = 1\n\
             [supervisor]\nadmin = \"{admin}\"\n\
             [supervisor.consul]\nnode = \"{node}\"\ndata_dir = \"consul-state\"\n{extra}\n\
             [[supervisor.program]]\nname = \"family\"\ncommand = \"sh\"\n\
             args = [\"-c\", \"echo family says hello; sleep 1000 & sleep 1000\"]\n\
             [[supervisor.program]]\nname = \"orphaner\"\ncommand = \"sh\"\n\
             args = [\"-c\", \"(sleep 0.2 &); exec sleep 1000\"]\n\
             [[supervisor.program]]\nname = \"registrar\"\ncommand = \"sh\"\nneeds_consul = true\n\
             args = [\"{registrar}\"]\n",
            http = c.http,
            cdns = c.dns,
            node = unique("up-e2e"),
            extra = c.extra,
            registrar = registrar.display(),
        ),
    )
    .unwrap();
    // No Docker here: the register component would never be ready.
    let mut up = UpProcess::spawn(
        wayfinder(
            dir.path(),
            &["up", "-c", config.to_str().unwrap()],
            &[("START_REGISTRATOR", "false")],
        ),
        dir.path(),
    );
    up.wait_ready(Duration::from_secs(60)).await;
    let banner = up.stdout();
    for want in [
        format!("dns      {dns}"),
        format!("lb       http://{lb}/"),
        format!("admin    http://{admin}/"),
        format!("consul   http://127.0.0.1:{}/ui/", c.http),
        format!("dig @127.0.0.1 -p {} web.service.consul SRV", dns.port()),
        format!("curl -H 'Host: web.service.consul' http://{lb}/"),
    ] {
        assert!(banner.contains(&want), "`{want}` not in the banner:\n{banner}");
    }
    assert!(dir.path().join("consul-state").is_dir(), "persistent consul data dir");
    let log = up.stderr();
    assert!(
        log.contains("family: family says hello"),
        "program output prefixed:\n{log}"
    );
    assert!(log.contains("consul: "), "consul output prefixed:\n{log}");

    // A service in the Consul that `up` started, backed by a real nginx.
    let nginx = Nginx::start("e2e-nginx");
    let consul_http = SocketAddr::from(([127, 0, 0, 1], c.http));
    let svc = unique("e2e");
    let body = serde_json::json!({
        "ID": format!("{svc}-1"), "Name": svc, "Address": "127.0.0.1", "Port": nginx.addr.port(),
        "Tags": ["haproxy"], "Check": { "TTL": "10m", "Status": "passing" },
    });
    http_put(consul_http, "/v1/agent/service/register", &body.to_string()).expect("register in up's consul");
    let srv = dig_until(
        dns,
        &[&format!("{svc}.service.consul"), "SRV"],
        Duration::from_secs(10),
        "SRV through wayfinder dns",
        |d| d.status() == "NOERROR" && !d.answers().is_empty(),
    )
    .await;
    assert!(srv.answers()[0].contains(&nginx.addr.port().to_string()), "{}", srv.out);
    let client = http_client();
    let host = format!("{svc}.service.consul");
    let body = wait_routed(&client, lb, &host, Duration::from_secs(10), String::new).await;
    assert_eq!(body, "e2e-nginx");

    // `wayfinder status` in the terminal.
    let out = wayfinder(dir.path(), &["status", "--admin", &admin.to_string()], &[])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        svc.as_str(),
        "1/1 passing",
        &format!("{svc}.service.consul"),
        "consul           running",
        "dns              running",
        "lb               running",
        "family           running",
        "registrar        running",
        "connected, leader",
    ] {
        assert!(text.contains(want), "`{want}` not in `wayfinder status`:\n{text}");
    }

    // `needs_consul`: the registrar checks for a leader at start and exits
    // without one; it waited, so it started once.
    let registrar = unit(&client, admin, "registrar").await;
    assert_eq!(registrar["restarts"], 0, "{registrar:#}");
    assert_eq!(registrar["state"], "running", "{registrar:#}");

    // The orphaner's short-lived grandchild was re-parented to `up` (a child
    // subreaper) when its subshell exited, and reaped when it ended: no zombie.
    let zombies: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
                let rest = st.rsplit_once(')').map_or("", |(_, r)| r);
                let f: Vec<&str> = rest.split_whitespace().collect();
                f.first() == Some(&"Z") && f.get(1) == Some(&up.pid.to_string().as_str())
            })
        })
        .collect();
    assert!(zombies.is_empty(), "zombie children of up: {zombies:?}");

    // SIGTERM: everything stops, in reverse order, and nothing is left.
    let family = descendants(up.pid);
    let names: Vec<&str> = family.iter().map(|(_, _, c)| c.as_str()).collect();
    assert!(names.contains(&"consul"), "{names:?}");
    assert!(
        names.iter().filter(|n| **n == "sleep").count() >= 2,
        "child and grandchild: {names:?}"
    );
    up.signal(libc::SIGTERM);
    let status = up
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("still running 30 s after SIGTERM:\n{}", up.stderr()));
    let log = up.stderr();
    assert_eq!(status.code(), Some(0), "{status:?}\n{log}");
    let left: Vec<_> = family.iter().filter(|(p, s, _)| still_running(*p, *s)).collect();
    assert!(left.is_empty(), "left running after SIGTERM: {left:?}");
    // Reverse start order: the lb (30) stops before consul (10).
    let lb_stop = log.find("unit=lb from=\"running\" to=\"stopping\"");
    let consul_stop = log.find("unit=consul from=\"running\" to=\"stopping\"");
    assert!(
        matches!((lb_stop, consul_stop), (Some(l), Some(c)) if l < c),
        "lb stops before consul:\n{log}"
    );
    assert!(log.contains("lb deregistered from consul"), "{log}");
    assert_quiet_start_and_stop(&log);
}

/// A normal start and stop of `up` with its own Consul: no warning about the
/// Consul watches (failing while `up` starts the agent or after it stopped it
/// is expected), and Consul's stop (it exits 1 on SIGTERM) is no failure.
fn assert_quiet_start_and_stop(log: &str) {
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && (l.contains("consul watch") || l.contains("cannot read the catalog")))
        .collect();
    assert!(
        noisy.is_empty(),
        "warnings about consul at a normal start/stop:\n{}",
        noisy.join("\n")
    );
    let consul_exit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("program=consul") && l.contains("exit status"))
        .collect();
    assert!(
        consul_exit.is_empty(),
        "consul's stop logged as an exit status:\n{}",
        consul_exit.join("\n")
    );
    assert!(
        log.lines()
            .any(|l| l.contains(" INFO ") && l.contains("program stopped") && l.contains("program=consul")),
        "consul's stop logged as stopped:\n{log}"
    );
}

/// `GET /api/ready` on the admin endpoint.
async fn ready(client: &reqwest::Client, admin: SocketAddr) -> (u16, serde_json::Value) {
    match client.get(format!("http://{admin}/api/ready")).send().await {
        Ok(resp) => {
            let code = resp.status().as_u16();
            (code, resp.json().await.unwrap_or_default())
        }
        Err(e) => (0, serde_json::json!({ "error": e.to_string() })),
    }
}

/// Polls `/api/ready` until `want(code, body)`; the last answer.
async fn ready_until(
    client: &reqwest::Client,
    admin: SocketAddr,
    limit: Duration,
    what: &str,
    up: &UpProcess,
    want: impl Fn(u16, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let (code, body) = ready(client, admin).await;
        if want(code, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {code} {body:#} after {limit:?}\n{}",
            up.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn waits_for(body: &serde_json::Value, unit: &str) -> bool {
    body["waiting_for"]
        .as_array()
        .is_some_and(|w| w.iter().any(|u| u["unit"] == unit))
}

/// Readiness tells the truth (the image's HEALTHCHECK): `/api/ready` is 503
/// naming what it waits for until Consul, dns and lb are all ready, then 200;
/// Consul killed, it is 503 until the restarted agent has a leader; Consul
/// frozen (SIGSTOP: running, not answering), 503 and `wayfinder status` exits 1
/// naming it, 0 once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_consul_killed_and_frozen() {
    require("consul");
    let dir = tempfile::tempdir().unwrap();
    let c = consul_ports();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(
        &config,
        format!(
            "[consul]\nhttp = \"127.0.0.1:{http}\"\ndns = [\"127.0.0.1:{cdns}\"]\n\
             [dns]\nlisten = [\"127.0.0.1:{dns}\"]\nupstreams = [\"127.0.0.1:9\"]\nworkers = 1\n\
             [lb]\nhttp = \"127.0.0.1:{lb}\"\nstats = \"\"\nworkers = 1\n\
             [supervisor]\nadmin = \"{admin}\"\n\
             [supervisor.consul]\nnode = \"{node}\"\ndata_dir = \"consul-state\"\n{extra}\n",
            http = c.http,
            cdns = c.dns,
            dns = free_port(),
            lb = free_port(),
            node = unique("up-ready"),
            extra = c.extra,
        ),
    )
    .unwrap();
    let mut up = UpProcess::spawn(
        wayfinder(
            dir.path(),
            &["up", "-c", config.to_str().unwrap()],
            &[("START_REGISTRATOR", "false")],
        ),
        dir.path(),
    );
    let client = http_client();
    // Before Consul's leader: 503 (when the admin endpoint is quicker than
    // Consul, as it always has been here) naming consul and the lb.
    let first = ready_until(&client, admin, Duration::from_secs(30), "an answer", &up, |code, _| {
        code != 0
    })
    .await;
    if first["ready"] == false {
        assert!(waits_for(&first, "consul") && waits_for(&first, "lb"), "{first:#}");
    }
    let ok = ready_until(&client, admin, Duration::from_secs(60), "ready", &up, |code, _| {
        code == 200
    })
    .await;
    assert_eq!(ok, serde_json::json!({ "ready": true }));
    let status = |up: &UpProcess| {
        let out = wayfinder(dir.path(), &["status", "--admin", &admin.to_string()], &[])
            .output()
            .unwrap();
        let text = format!(
            "{}\n--- stderr:\n{}\n--- up:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            up.stderr()
        );
        (out.status.code(), text)
    };
    let (code, text) = status(&up);
    assert_eq!(code, Some(0), "{text}");

    let consul_pid = |client: &reqwest::Client| {
        let client = client.clone();
        async move {
            let consul = unit(&client, admin, "consul").await;
            consul["pid"].as_u64().expect("consul runs with a pid") as i32
        }
    };

    // Killed: restarted at once, and not ready until the new agent has a leader.
    let pid = consul_pid(&client).await;
    // SAFETY: kill(2) on the Consul agent that this test's `up` started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let down = ready_until(
        &client,
        admin,
        Duration::from_secs(10),
        "503 after consul was killed",
        &up,
        |code, _| code == 503,
    )
    .await;
    assert!(waits_for(&down, "consul"), "{down:#}");
    ready_until(
        &client,
        admin,
        Duration::from_secs(60),
        "ready again",
        &up,
        |code, _| code == 200,
    )
    .await;
    assert_ne!(consul_pid(&client).await, pid, "a new agent");

    // Frozen: running, not answering. 503, and `wayfinder status` exits 1.
    let pid = consul_pid(&client).await;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let frozen = ready_until(
        &client,
        admin,
        Duration::from_secs(15),
        "503 while consul is frozen",
        &up,
        |code, b| code == 503 && waits_for(b, "consul"),
    )
    .await;
    let why = frozen["waiting_for"][0]["why"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("not answering"), "{frozen:#}");
    let (code, text) = status(&up);
    let fetch = |path: &'static str| {
        let client = client.clone();
        async move {
            match client
                .get(format!("http://{admin}{path}"))
                .timeout(Duration::from_secs(10))
                .send()
                .await
            {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => format!("GET {path}: {e}"),
            }
        }
    };
    let (metrics, page) = (fetch("/metrics").await, fetch("/").await);
    // SAFETY: as above; before any assertion, so a failure leaves no frozen agent.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(metrics.lines().any(|l| l == "wayfinder_ready 0"), "{metrics}");
    assert!(
        page.contains("<strong>NOT READY</strong>: consul (not answering"),
        "the status page's header says what waits: {page}"
    );
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("NOT READY") && text.contains("not ready: consul: not answering"),
        "{text}"
    );
    assert!(
        text.contains("wayfinder: not ready: consul ("),
        "named on stderr too: {text}"
    );
    ready_until(
        &client,
        admin,
        Duration::from_secs(30),
        "ready after SIGCONT",
        &up,
        |code, _| code == 200,
    )
    .await;
    let (code, text) = status(&up);
    assert_eq!(code, Some(0), "{text}");
    let metrics = fetch("/metrics").await;
    assert!(metrics.lines().any(|l| l == "wayfinder_ready 1"), "{metrics}");

    up.signal(libc::SIGTERM);
    let status = up.wait_exit(Duration::from_secs(30)).await.expect("stops");
    assert_eq!(status.code(), Some(0), "{}", up.stderr());
}

/// A `wayfinder up` killed with SIGKILL cannot stop anything itself: its
/// children (Consul included) die with it through PDEATHSIG.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_up_leaves_no_consul_behind() {
    require("consul");
    let dir = tempfile::tempdir().unwrap();
    let c = consul_ports();
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(
        &config,
        format!(
            "[consul]\nhttp = \"127.0.0.1:{}\"\ndns = [\"127.0.0.1:{}\"]\n[dns]\nupstreams = [\"127.0.0.1:9\"]\n\
             [supervisor]\nadmin = \"\"\n[supervisor.consul]\nnode = \"{}\"\n{}\n\
             [[supervisor.program]]\nname = \"napper\"\ncommand = \"sleep\"\nargs = [\"1000\"]\n",
            c.http,
            c.dns,
            unique("up-kill"),
            c.extra
        ),
    )
    .unwrap();
    let mut up = UpProcess::spawn(
        wayfinder(
            dir.path(),
            &["up", "-c", config.to_str().unwrap()],
            &[("START_DNS", "false"), ("START_LB", "false")],
        ),
        dir.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let family = loop {
        let d = descendants(up.pid);
        if d.iter().any(|(_, _, c)| c == "consul") && d.iter().any(|(_, _, c)| c == "sleep") {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "consul and sleep not started: {d:?}\n{}",
            up.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    up.signal(libc::SIGKILL);
    up.wait_exit(Duration::from_secs(5)).await.expect("killed");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<_> = family.iter().filter(|(p, s, _)| still_running(*p, *s)).collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left running after SIGKILL of up: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Under systemd (`Type=notify`): `READY=1` once everything has started,
/// `STOPPING=1` when SIGTERM arrives, on the socket in `$NOTIFY_SOCKET`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_systemd_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(
        &config,
        "[dns]\nupstreams = [\"192.0.2.1\"]\n[supervisor]\nadmin = \"\"\n\
         [[supervisor.program]]\nname = \"napper\"\ncommand = \"sleep\"\nargs = [\"1000\"]\n",
    )
    .unwrap();
    let mut cmd = wayfinder(
        dir.path(),
        &["up", "-c", config.to_str().unwrap()],
        &[("START_CONSUL", "false"), ("START_DNS", "false"), ("START_LB", "false")],
    );
    cmd.env("NOTIFY_SOCKET", &socket_path);
    let mut up = UpProcess::spawn(cmd, dir.path());
    let mut buf = [0u8; 256];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 ({e}):\n{}", up.stderr()));
    assert_eq!(&buf[..n], b"READY=1");
    assert!(up.stdout().contains("wayfinder up: ready"), "{}", up.stdout());
    up.signal(libc::SIGTERM);
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no STOPPING=1 ({e}):\n{}", up.stderr()));
    assert_eq!(&buf[..n], b"STOPPING=1");
    let status = up
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", up.stderr());
}

/// `check` prints what the role would start; bad role values and a non-loopback
/// admin endpoint without a token exit 64 naming the key; `status` with nothing
/// listening fails clearly; an admin port in use ends `up` with exit 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_shows_the_role_and_mistakes_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(&config, "[dns]\nupstreams = [\"192.0.2.1\"]\n").unwrap();
    let path = config.to_str().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| wayfinder(dir.path(), args, env).output().unwrap();

    let out = run(&["check", "-c", path], &[("MASTER", "true"), ("SLAVE", "false")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("# role: master (MASTER=true, SLAVE=false)"), "{text}");
    assert!(text.contains("starts consul"), "{text}");
    assert!(text.contains("starts dns"), "{text}");
    assert!(text.contains("off    lb"), "{text}");
    let out = run(&["check", "-c", path], &[("START_VPN", "true")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("starts vpn            START_VPN=true"), "{text}");
    assert!(text.contains("# vpn: enabled on wf0"), "{text}");
    let out = run(&["check", "-c", path], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("off    vpn            the vpn runs only where enabled (vpn.enabled = false)"),
        "{text}"
    );

    let out = run(&["check", "-c", path], &[("MASTER", "perhaps")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("environment: MASTER:"), "{err}");

    let open = dir.path().join("open.toml");
    std::fs::write(
        &open,
        "[dns]\nupstreams = [\"192.0.2.1\"]\n[supervisor]\nadmin = \"0.0.0.0:9000\"\n",
    )
    .unwrap();
    let out = run(&["check", "-c", open.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains(&format!("{}: supervisor.token:", open.display())), "{err}");
    let out = run(
        &["check", "-c", open.to_str().unwrap()],
        &[("WAYFINDER_ADMIN_TOKEN", "from-the-environment")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("from-the-environment"),
        "check never prints the token"
    );

    let nobody = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let out = run(&["status", "--admin", &nobody.to_string()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(69),
        "no status: EX_UNAVAILABLE, not 1 (not ready): {err}"
    );
    assert!(
        err.contains(&format!("admin endpoint at {nobody}")) && err.contains("nothing is listening"),
        "{err}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = dir.path().join("busy.toml");
    std::fs::write(
        &busy,
        format!(
            "[dns]\nupstreams = [\"192.0.2.1\"]\n[supervisor]\nadmin = \"{}\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let mut up = UpProcess::spawn(
        wayfinder(
            dir.path(),
            &["up", "-c", busy.to_str().unwrap()],
            &[("START_CONSUL", "false"), ("START_DNS", "false"), ("START_LB", "false")],
        ),
        dir.path(),
    );
    let status = up.wait_exit(Duration::from_secs(10)).await.expect("exits");
    assert_eq!(status.code(), Some(64), "{}", up.stderr());
    assert!(
        up.stderr().contains("could not bind the admin endpoint"),
        "{}",
        up.stderr()
    );
}

/// An example `restricted/host` copied unchanged names an address this host
/// does not have: `up` exits 64 once (no restart loop to read through) and the
/// message says which variable, in which file and line, to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_is_not_this_hosts_exits_64_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wayfinder.toml");
    std::fs::write(
        &config,
        format!(
            "[dns]\nupstreams = [\"192.0.2.1\"]\n[lb]\nhttp = \"127.0.0.1:{}\"\nstats = \"127.0.0.1:{}\"\n\
             [supervisor]\nadmin = \"\"\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let restricted = dir.path().join("restricted");
    std::fs::create_dir(&restricted).unwrap();
    std::fs::write(
        restricted.join("host"),
        "MASTER=true\nSLAVE=true\n# this host's address:\nLISTEN_IP=192.0.2.10\n",
    )
    .unwrap();
    // The lb binds its listeners at start (the dns binds with IP_FREEBIND,
    // for the vpn's tunnel address that appears later).
    let env = [("START_CONSUL", "false"), ("START_DNS", "false")];
    let restricted = restricted.to_str().unwrap();
    for (args, env, origin) in [
        (
            vec!["up", "-c", config.to_str().unwrap(), "--restricted", restricted],
            &env[..],
            format!("({restricted}/host line 4)"),
        ),
        (
            vec!["up", "-c", config.to_str().unwrap()],
            &[
                ("START_CONSUL", "false"),
                ("START_DNS", "false"),
                ("LISTEN_IP", "\"192.0.2.10\""),
            ][..],
            "(environment)".to_string(),
        ),
    ] {
        let mut up = UpProcess::spawn(wayfinder(dir.path(), &args, env), dir.path());
        let status = up.wait_exit(Duration::from_secs(10)).await.expect("exits");
        let err = up.stderr();
        assert_eq!(status.code(), Some(64), "{err}");
        assert!(err.contains("could not bind"), "{err}");
        assert!(
            err.contains(&format!("not an address of this host: LISTEN_IP=192.0.2.10 {origin}")),
            "{err}"
        );
    }
}
