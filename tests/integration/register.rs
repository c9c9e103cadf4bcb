//! The register component against a real Docker daemon (each test its own,
//! see docker.rs) and a real Consul agent (each test its own): containers
//! enter and leave Consul by themselves; `up` routes and resolves them;
//! drains, restarts of everything involved, health, bursts, hostile input.
//!
//! Black-box (the built binary: `wayfinder register`, `wayfinder up`) where a
//! process is killed or the whole appliance is needed; in-process where the
//! component's own counters are the point (nothing written when idle).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::docker::Dockerd;
use crate::harness::{
    Consul, Process, dig_until, free_port, http_client, http_get, http_put, require, wait_routed, wayfinder_bin,
};

/// How long anything the component does may take here (the benchmark says
/// how long it really takes: benches/register-latency.sh).
const LIMIT: Duration = Duration::from_secs(20);

/// Waits until `f` is true, or fails with `what` (and `context()`).
fn wait_for(what: &str, context: impl Fn() -> String, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {LIMIT:?} waiting for: {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One service the agent holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    name: String,
    address: String,
    port: u64,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
}

/// The agent's services by ID.
fn agent_services(consul: &Consul) -> BTreeMap<String, Held> {
    let body = http_get(consul.http_addr(), "/v1/agent/services").unwrap_or_default();
    let all: BTreeMap<String, Value> = serde_json::from_str(&body).unwrap_or_default();
    all.into_iter()
        .map(|(id, s)| {
            let meta = s["Meta"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let held = Held {
                name: s["Service"].as_str().unwrap_or("").into(),
                address: s["Address"].as_str().unwrap_or("").into(),
                port: s["Port"].as_u64().unwrap_or(0),
                tags: s["Tags"]
                    .as_array()
                    .map(|t| t.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                    .unwrap_or_default(),
                meta,
            };
            (id, held)
        })
        .collect()
}

/// The services Wayfinder wrote (those naming a container), by ID.
fn registered(consul: &Consul) -> BTreeMap<String, Held> {
    agent_services(consul)
        .into_iter()
        .filter(|(_, h)| h.meta.contains_key("wayfinder-container"))
        .collect()
}

/// The registered services of `container`.
fn of(consul: &Consul, container: &str) -> Vec<Held> {
    registered(consul)
        .into_values()
        .filter(|h| h.meta.get("wayfinder-container").map(String::as_str) == Some(container))
        .collect()
}

/// The status of the agent's check `id` (`""` when there is none).
fn check_status(consul: &Consul, id: &str) -> String {
    let body = http_get(consul.http_addr(), "/v1/agent/checks").unwrap_or_default();
    let all: Value = serde_json::from_str(&body).unwrap_or_default();
    all[id]["Status"].as_str().unwrap_or("").to_string()
}

/// `wayfinder register` alone against `docker` and `consul`, this host being
/// the docker bridge's address.
fn register_alone(dir: &Path, docker: &Dockerd, consul: &Consul, extra: &str) -> Process {
    let config = dir.join("register.toml");
    std::fs::write(
        &config,
        format!(
            "[consul]\nhttp = \"{}\"\n[register]\ndocker = \"{}\"\nresync = \"1s\"\n{extra}",
            consul.http_addr(),
            docker.host()
        ),
    )
    .unwrap();
    let host_ip = docker.bridge_ip().to_string();
    let mut p = Process::spawn(
        dir,
        &["register", "-c", config.to_str().unwrap()],
        &[("HOST_IP", &host_ip)],
    );
    p.wait_log("register: following docker");
    p
}

/// `wayfinder up` with dns, lb and register (Consul is the test's own agent).
struct Up {
    process: Process,
    dns: SocketAddr,
    lb: SocketAddr,
    admin: SocketAddr,
}

impl Up {
    fn start(dir: &Path, docker: &Dockerd, consul: &Consul) -> Self {
        let dns = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let lb = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.join("wayfinder.toml");
        std::fs::write(
            &config,
            format!(
                "[consul]\nhttp = \"{}\"\ndns = [\"{}\"]\n\
                 [dns]\nlisten = [\"{dns}\"]\nupstreams = [\"127.0.0.1:9\"]\nworkers = 1\n\
                 [lb]\nhttp = \"{lb}\"\nstats = \"\"\nworkers = 1\n\
                 [supervisor]\nadmin = \"{admin}\"\n\
                 [register]\ndocker = \"{}\"\nresync = \"1s\"\n",
                consul.http_addr(),
                consul.dns_addr(),
                docker.host()
            ),
        )
        .unwrap();
        let host_ip = docker.bridge_ip().to_string();
        let mut process = Process::spawn(
            dir,
            &["up", "-c", config.to_str().unwrap()],
            &[("START_CONSUL", "false"), ("HOST_IP", &host_ip)],
        );
        process.wait_log("wayfinder up: ready");
        process.wait_log("register: following docker");
        Up {
            process,
            dns,
            lb,
            admin,
        }
    }

    /// The register component's part of `/api/status`.
    fn status(&self) -> Value {
        let body = http_get(self.admin, "/api/status").unwrap_or_default();
        let all: Value = serde_json::from_str(&body).unwrap_or_default();
        all["register"].clone()
    }

    /// One sample of `/metrics`.
    fn metric(&self, line_start: &str) -> f64 {
        let body = http_get(self.admin, "/metrics").unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix(line_start).map(|v| v.trim().parse().unwrap_or(-1.0)))
            .unwrap_or(-1.0)
    }
}

fn short(id: &str) -> &str {
    &id[..12]
}

/// The README's promise: `docker run -p 8080 -e SERVICE_TAGS=haproxy`, and
/// the container is in Consul, answered by `dig SRV` through the dns and
/// routed by the lb; the status page and /metrics show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_container_is_registered_resolved_and_routed() {
    require("dig");
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    let up = Up::start(dir.path(), &docker, &consul);
    let started = Instant::now();
    let id = docker.run(&[
        "-p",
        "8080",
        "-e",
        "SERVICE_NAME=web",
        "-e",
        "SERVICE_TAGS=haproxy",
        image,
    ]);
    let port = docker.published_port(&id, "8080/tcp");
    wait_for("web in consul", || up.process.log(), || !of(&consul, &id).is_empty());
    let took = started.elapsed();
    let held = of(&consul, &id).remove(0);
    assert_eq!(
        (held.name.as_str(), held.address.clone(), held.port, held.tags.clone()),
        (
            "web",
            docker.bridge_ip().to_string(),
            u64::from(port),
            vec!["haproxy".to_string()]
        ),
        "{held:?}"
    );
    eprintln!("docker run -> registered in {took:?} (including the docker CLI)");

    let srv = dig_until(
        up.dns,
        &["web.service.consul", "SRV"],
        LIMIT,
        "SRV of the container through the dns",
        |d| d.status() == "NOERROR" && !d.answers().is_empty(),
    )
    .await;
    assert!(srv.answers()[0].contains(&format!(" {port} ")), "{}", srv.out);
    let body = wait_routed(&http_client(), up.lb, "web.service.consul", LIMIT, || up.process.log()).await;
    assert_eq!(body.trim(), short(&id), "the container's own answer");

    let status = up.status();
    let containers = status["containers"].as_array().cloned().unwrap_or_default();
    let mine = containers
        .iter()
        .find(|c| c["id"] == short(&id))
        .unwrap_or_else(|| panic!("{status:#}"));
    assert_eq!(
        mine["services"][0].as_str().map(|s| s.ends_with(":8080")),
        Some(true),
        "{mine:#}"
    );
    assert_eq!(status["event_stream"], true, "{status:#}");
    assert_eq!(up.metric("wayfinder_register_services "), 1.0);
    let out = Command::new(wayfinder_bin())
        .args(["status", "--admin", &up.admin.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let name = docker.docker(&["inspect", "--format", "{{.Name}}", &id]);
    for want in [
        "register: docker unix://",
        "events connected",
        short(&id),
        name.trim_start_matches('/'),
    ] {
        assert!(text.contains(want), "`{want}` not in `wayfinder status`:\n{text}");
    }
    assert!(up.metric("wayfinder_register_events_total{action=\"start\"} ") >= 1.0);
}

/// `docker stop` of one of two instances under a steady load through the lb:
/// the service leaves Consul at the stop signal while the app still serves
/// (DRAIN_SECONDS), so not one request fails, and the stopped instance gets
/// no new request long before it exits (without the drain it would serve
/// until its last second, and the lb would retry what then fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_stop_under_load_drains_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    let up = Up::start(dir.path(), &docker, &consul);
    let app = [
        "-p",
        "8080",
        "-e",
        "SERVICE_NAME=drain",
        "-e",
        "SERVICE_TAGS=haproxy",
        "-e",
        "DRAIN_SECONDS=5",
    ];
    let a = docker.run(&[&app[..], &[image]].concat());
    let b = docker.run(&[&app[..], &[image]].concat());
    let client = http_client();
    // Both instances routed.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + LIMIT;
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "both instances never answered: {seen:?}\n{}",
            up.process.log()
        );
        let body = wait_routed(&client, up.lb, "drain.service.consul", LIMIT, String::new).await;
        seen.insert(body.trim().to_string());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let last_from_a = Arc::new(parking_lot::Mutex::new(None::<Instant>));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, stop, failures, ok, lb) = (client.clone(), stop.clone(), failures.clone(), ok.clone(), up.lb);
        let (last_from_a, a_host) = (last_from_a.clone(), short(&a).to_string());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let answer = client
                    .get(format!("http://{lb}/"))
                    .header("Host", "drain.service.consul")
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if r.text().await.unwrap_or_default().trim() == a_host {
                            *last_from_a.lock() = Some(Instant::now());
                        }
                    }
                    Ok(r) => failures.lock().push(format!("status {}", r.status())),
                    Err(e) => failures.lock().push(e.to_string()),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    let stop_sent = Instant::now();
    let stopped = {
        let mut stop = docker.cli();
        stop.args(["stop", &a]);
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let out = stop.output().expect("docker stop");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            started.elapsed()
        })
        .await
        .unwrap()
    };
    assert!(
        stopped >= Duration::from_secs(5),
        "the app drained for 5 s: {stopped:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let failures = failures.lock().clone();
    let total = ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        total,
        &failures[..failures.len().min(5)]
    );
    assert!(
        total > before + 20,
        "the load went on during the stop ({before} then {total})"
    );
    let last = last_from_a.lock().expect("a answered before the stop");
    assert!(
        last.saturating_duration_since(stop_sent) < Duration::from_secs(3),
        "a still got requests {:?} after the stop signal (it drains for 5 s)",
        last.saturating_duration_since(stop_sent)
    );
    assert!(of(&consul, &a).is_empty() && of(&consul, &b).len() == 1);
    for _ in 0..5 {
        let body = wait_routed(&client, up.lb, "drain.service.consul", LIMIT, String::new).await;
        assert_eq!(body.trim(), short(&b), "only the running instance answers");
    }
}

/// Wayfinder killed (SIGKILL) while containers come and go, then started
/// again: Consul holds exactly what runs. Leftovers it owns (this engine, or
/// this host under its name, as after a reboot or a rename) go; services it
/// does not own stay. While it is dead, a service fed by Docker health turns
/// critical (its TTL runs out) rather than staying passing.
#[test]
fn a_killed_register_started_again_finds_consul_equal_to_reality() {
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    let engine = docker.docker(&["info", "--format", "{{.ID}}"]);
    let host = wayfinder::net::host::name().unwrap_or_else(|| "localhost".into());
    let ttl = "health_ttl = \"3s\"\n";
    let mut register = register_alone(dir.path(), &docker, &consul, ttl);
    let a = docker.run(&["-p", "8080", image]);
    let b = docker.run(&["-p", "8080", image]);
    let healthy = docker.run(&["-p", "8080", "--health-cmd", "true", "--health-interval", "1s", image]);
    wait_for(
        "a and b registered",
        || register.log(),
        || of(&consul, &a).len() == 1 && of(&consul, &b).len() == 1,
    );
    let check = format!("{}:docker-health", of_id(&consul, &healthy));
    wait_for(
        "healthy passing",
        || register.log(),
        || check_status(&consul, &check) == "passing",
    );

    register.kill9();
    wait_for(
        "critical once wayfinder is dead",
        || check_status(&consul, &check),
        || check_status(&consul, &check) == "critical",
    );
    docker.docker(&["stop", &a]);
    docker.rm_force(&[&b]);
    let c = docker.run(&["-p", "8080", image]);
    // Someone else's service, and leftovers of other kinds.
    consul.register("by-hand", "handmade", "10.0.0.9", 80, &[], false);
    let leftover = |id: &str, engine: &str, host: &str| {
        let body = serde_json::json!({
            "ID": id, "Name": "gone", "Address": "10.0.0.8", "Port": 80,
            "Meta": { "wayfinder-container": "0123456789ab", "wayfinder-engine": engine, "wayfinder-host": host },
        });
        http_put(consul.http_addr(), "/v1/agent/service/register", &body.to_string()).unwrap();
    };
    leftover("renamed-host", &engine, "old-name");
    leftover("after-reboot", "OTHER:ENGINE", &host);
    leftover("another-docker", "OTHER:ENGINE", "another-host");
    assert_eq!(
        of(&consul, &a).len(),
        1,
        "nothing follows docker while wayfinder is dead"
    );

    let register = register_alone(dir.path(), &docker, &consul, ttl);
    wait_for(
        "healthy passing again",
        || register.log(),
        || check_status(&consul, &check) == "passing",
    );
    wait_for(
        "only c registered",
        || format!("{:#?}\n{}", registered(&consul), register.log()),
        || {
            let ids: BTreeSet<String> = registered(&consul)
                .into_values()
                .map(|h| h.meta["wayfinder-container"].clone())
                .collect();
            ids == BTreeSet::from([c.clone(), healthy.clone(), "0123456789ab".to_string()])
                && !agent_services(&consul).contains_key("renamed-host")
                && !agent_services(&consul).contains_key("after-reboot")
        },
    );
    let all = agent_services(&consul);
    assert!(all.contains_key("by-hand"), "a service it does not own stays: {all:#?}");
    assert!(
        all.contains_key("another-docker"),
        "another host's and engine's stays: {all:#?}"
    );
}

/// A Consul agent restarted without its state (dev mode keeps none) gets the
/// services back at the next comparison.
#[test]
fn a_consul_agent_that_lost_its_state_is_refilled() {
    let dir = tempfile::tempdir().unwrap();
    let mut consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    let register = register_alone(dir.path(), &docker, &consul, "");
    let a = docker.run(&["-p", "8080", "-e", "SERVICE_NAME=kept", image]);
    wait_for("a registered", || register.log(), || of(&consul, &a).len() == 1);
    consul.restart();
    wait_for("a registered again", || register.log(), || of(&consul, &a).len() == 1);
}

/// dockerd restarted: the event stream is lost and taken up again; the
/// container it restarts (new published port) and one started afterwards are
/// registered as they are.
#[test]
fn a_restarted_dockerd_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let mut docker = Dockerd::start();
    let image = docker.app_image();
    let register = register_alone(dir.path(), &docker, &consul, "");
    let a = docker.run(&["--restart=always", "-p", "8080", "-e", "SERVICE_NAME=always", image]);
    wait_for("a registered", || register.log(), || of(&consul, &a).len() == 1);
    docker.restart();
    wait_for(
        "a registered with the port it has now",
        || format!("{:#?}\n{}", registered(&consul), register.log()),
        || {
            let now = docker.try_docker(&["port", &a, "8080/tcp"]).unwrap_or_default();
            of(&consul, &a)
                .first()
                .is_some_and(|h| now.lines().next().is_some_and(|l| l.ends_with(&format!(":{}", h.port))))
        },
    );
    let b = docker.run(&["-p", "8080", "-e", "SERVICE_NAME=later", image]);
    wait_for(
        "b registered after the restart",
        || register.log(),
        || of(&consul, &b).len() == 1,
    );
    assert!(register.log().contains("event stream"), "{}", register.log());
}

/// Docker's HEALTHCHECK feeds a TTL check: unhealthy takes the container out
/// of the lb, healthy puts it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_health_moves_the_service_out_of_the_lb_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    let up = Up::start(dir.path(), &docker, &consul);
    let id = docker.run(&[
        "-p",
        "8080",
        "-e",
        "SERVICE_NAME=healthy",
        "-e",
        "SERVICE_TAGS=haproxy",
        "--health-cmd",
        "wget -q -O /dev/null http://127.0.0.1:8080/health",
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
        image,
    ]);
    let check = format!("{}:docker-health", of_id(&consul, &id));
    let client = http_client();
    wait_routed(&client, up.lb, "healthy.service.consul", LIMIT, || up.process.log()).await;
    assert_eq!(check_status(&consul, &check), "passing");

    docker.docker(&["exec", &id, "rm", "/www/health"]);
    wait_for(
        "critical",
        || up.process.log(),
        || check_status(&consul, &check) == "critical",
    );
    let deadline = Instant::now() + LIMIT;
    loop {
        let r = client
            .get(format!("http://{}/", up.lb))
            .header("Host", "healthy.service.consul")
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still routed while unhealthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    docker.docker(&["exec", &id, "touch", "/www/health"]);
    wait_for(
        "passing again",
        || up.process.log(),
        || check_status(&consul, &check) == "passing",
    );
    let body = wait_routed(&client, up.lb, "healthy.service.consul", LIMIT, || up.process.log()).await;
    assert_eq!(body.trim(), short(&id));
}

/// The ID of the one service registered for `container` (waits for it).
fn of_id(consul: &Consul, container: &str) -> String {
    let mut id = String::new();
    wait_for(
        "the container registered",
        || format!("{:#?}", registered(consul)),
        || {
            id = registered(consul)
                .into_iter()
                .find(|(_, h)| h.meta.get("wayfinder-container").map(String::as_str) == Some(container))
                .map(|(id, _)| id)
                .unwrap_or_default();
            !id.is_empty()
        },
    );
    id
}

/// 200 containers started at once, then removed at once: not one lost either
/// way (a burst of about 1,000 events).
#[test]
fn two_hundred_containers_at_once_none_lost() {
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    let register = register_alone(dir.path(), &docker, &consul, "address = \"internal\"\n");
    let ids = Arc::new(parking_lot::Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for _ in 0..8 {
            let (docker, ids) = (&docker, ids.clone());
            s.spawn(move || {
                for _ in 0..25 {
                    let id = docker.run(&["-e", "SERVICE_NAME=many", image]);
                    ids.lock().push(id);
                }
            });
        }
    });
    let ids = ids.lock().clone();
    assert_eq!(ids.len(), 200);
    wait_for(
        "200 registered",
        || format!("{} registered\n{}", registered(&consul).len(), register.log()),
        || registered(&consul).values().filter(|h| h.name == "many").count() == 200,
    );
    // Removed as they were started, 25 per `docker rm -f` from 8 threads: one
    // call for all 200 took 13 s with both cores busy, a fifth of the CLI's
    // limit, and its containers' events came one by one anyway.
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    std::thread::scope(|s| {
        for chunk in all.chunks(25) {
            let docker = &docker;
            s.spawn(move || docker.rm_force(chunk));
        }
    });
    wait_for(
        "none left",
        || format!("{} registered\n{}", registered(&consul).len(), register.log()),
        || registered(&consul).is_empty(),
    );
}

/// A new container given the address an old one had: no stale service of
/// the old one remains (internal address mode).
#[test]
fn an_address_reused_by_a_new_container_leaves_no_stale_service() {
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    let register = register_alone(dir.path(), &docker, &consul, "address = \"internal\"\n");
    let a = docker.run(&["-e", "SERVICE_NAME=reuse", image]);
    let ip = docker.inspect_ip(&a).to_string();
    wait_for(
        "a registered",
        || register.log(),
        || of(&consul, &a).first().is_some_and(|h| h.address == ip),
    );
    docker.rm_force(&[&a]);
    let b = docker.run(&["-e", "SERVICE_NAME=reuse", image]);
    assert_eq!(docker.inspect_ip(&b).to_string(), ip, "docker gave b the address a had");
    wait_for("b registered", || register.log(), || of(&consul, &b).len() == 1);
    let held = registered(&consul);
    assert_eq!(held.len(), 1, "only b: {held:#?}");
    assert_eq!(of(&consul, &b)[0].address, ip);
}

/// Hostile environments are refused, shown and logged; the others' services
/// are untouched.
#[test]
fn hostile_settings_are_refused_and_nothing_else_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    let up = Up::start(dir.path(), &docker, &consul);
    let victim = docker.run(&["-p", "8080", "-e", "SERVICE_NAME=victim", image]);
    let victim_id = of_id(&consul, &victim);
    let before = of(&consul, &victim);
    let many_tags = format!(
        "SERVICE_TAGS={}",
        (0..10_000).map(|i| format!("t{i}")).collect::<Vec<_>>().join(",")
    );
    let steal = format!("SERVICE_ID={victim_id}");
    let hostile = [
        docker.run(&["-p", "8080", "-e", "SERVICE_NAME=../x", image]),
        docker.run(&["-p", "8080", "-e", &many_tags, image]),
        docker.run(&["-p", "8080", "-e", &steal, "-e", "SERVICE_NAME=victim", image]),
        docker.run(&["-p", "8080", "--label", "SERVICE_WAYFINDER_CONTAINER=abc", image]),
        docker.run(&["-p", "8080", "-e", "SERVICE_TAGS=haproxy_weight=lots", image]),
    ];
    let good = docker.run(&["-p", "8080", "-e", "SERVICE_NAME=fine", image]);
    wait_for(
        "the good one registered",
        || up.process.log(),
        || of(&consul, &good).len() == 1,
    );
    wait_for(
        "every hostile container shown refused",
        || format!("{:#}", up.status()),
        || {
            let status = up.status();
            hostile.iter().all(|h| {
                status["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["id"] == short(h) && !c["refused"].as_array().is_none_or(Vec::is_empty))
            })
        },
    );
    for h in &hostile {
        assert!(
            of(&consul, h).is_empty(),
            "{h} registered something: {:#?}",
            of(&consul, h)
        );
    }
    assert_eq!(of(&consul, &victim), before, "the victim's service is untouched");
    assert!(up.metric("wayfinder_register_refused_containers ") >= 5.0);
    let log = up.process.log();
    assert!(log.contains("refused"), "refusals are logged:\n{log}");
}

/// Internal address mode on a user-defined network: the container's own
/// address there and its exposed port, which answer.
#[test]
fn internal_mode_registers_the_address_on_a_user_defined_network() {
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    let (network, subnet) = docker.create_network("front");
    let register = register_alone(
        dir.path(),
        &docker,
        &consul,
        &format!("address = \"internal\"\nnetwork = \"{network}\"\n"),
    );
    let id = docker.run(&["--network", &network, "-e", "SERVICE_NAME=inside", image]);
    wait_for("registered", || register.log(), || of(&consul, &id).len() == 1);
    let held = of(&consul, &id).remove(0);
    let net: ipnet::Ipv4Net = subnet.parse().unwrap();
    let ip: std::net::Ipv4Addr = held.address.parse().unwrap();
    assert!(net.contains(&ip), "{held:?} in {subnet}");
    assert_eq!(held.port, 8080);
    // Registered at the container's start, which can come before its httpd
    // listens: the address answers once the app is up.
    let at = SocketAddr::from((ip, 8080));
    wait_for(
        "the app answers at its registered address",
        || register.log(),
        || http_get(at, "/").is_ok(),
    );
    let body = http_get(at, "/").unwrap();
    assert_eq!(body.trim(), short(&id));
}

/// The Marathon plans of deploy/marathon, run as Marathon runs them (`docker
/// run` with their env and port mappings): registered as they say, and every
/// tag passes the lb's rules.
#[test]
fn the_marathon_plans_register_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    let register = register_alone(dir.path(), &docker, &consul, "");
    let plans = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/marathon");
    let mut expected = Vec::new();
    for entry in std::fs::read_dir(&plans).unwrap() {
        let path = entry.unwrap().path();
        let plan: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut args: Vec<String> = Vec::new();
        let env = plan["env"].as_object().cloned().unwrap_or_default();
        for (k, v) in &env {
            args.extend(["-e".into(), format!("{k}={}", v.as_str().unwrap())]);
        }
        let port = plan["container"]["docker"]["portMappings"][0]["containerPort"]
            .as_u64()
            .unwrap();
        args.extend([
            "-e".into(),
            format!("PORT={port}"),
            "-p".into(),
            port.to_string(),
            image.into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = docker.run(&args);
        let tags: Vec<String> = env
            .get("SERVICE_TAGS")
            .and_then(Value::as_str)
            .map(|t| t.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        expected.push((path, id, env["SERVICE_NAME"].as_str().unwrap().to_string(), tags));
    }
    assert!(expected.len() >= 4, "deploy/marathon holds the plans");
    for (path, id, name, tags) in expected {
        wait_for(
            &format!("{} registered", path.display()),
            || format!("{:#?}\n{}", registered(&consul), register.log()),
            || of(&consul, &id).len() == 1,
        );
        let held = of(&consul, &id).remove(0);
        assert_eq!((held.name, held.tags), (name, tags), "{}", path.display());
    }
}

/// pause and rename: a paused container leaves Consul and comes back on
/// unpause; a renamed one is registered under its new name's ID only.
#[test]
fn pause_and_rename_are_followed() {
    let dir = tempfile::tempdir().unwrap();
    let consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    let register = register_alone(dir.path(), &docker, &consul, "");
    let id = docker.run(&["--name", "first-name", "-p", "8080", image]);
    wait_for("registered", || register.log(), || of(&consul, &id).len() == 1);
    docker.docker(&["pause", &id]);
    wait_for("gone while paused", || register.log(), || of(&consul, &id).is_empty());
    docker.docker(&["unpause", &id]);
    wait_for("back after unpause", || register.log(), || of(&consul, &id).len() == 1);
    docker.docker(&["rename", "first-name", "second-name"]);
    wait_for(
        "registered under the new name",
        || format!("{:#?}", registered(&consul)),
        || registered(&consul).keys().any(|k| k.contains(":second-name:8080")),
    );
    assert!(
        !registered(&consul).keys().any(|k| k.contains("first-name")),
        "{:#?}",
        registered(&consul)
    );
}

/// In-process: once Consul equals the containers, comparisons (one a second
/// here) write nothing, however many run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resyncs_write_nothing_when_nothing_changed() {
    let consul = Consul::start();
    let docker = Dockerd::start();
    let image = docker.app_image();
    for _ in 0..3 {
        docker.run(&["-p", "8080", "--health-cmd", "true", "--health-interval", "1s", image]);
    }
    let file = wayfinder::config::parse(
        &format!("[register]\ndocker = \"{}\"\nresync = \"1s\"\n", docker.host()),
        "test.toml",
        &std::collections::HashMap::<String, String>::new(),
    )
    .unwrap();
    let config = wayfinder::config::validate(&file, "test.toml").unwrap();
    let stats = Arc::new(wayfinder::register::registrar::Stats::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (stats, shutdown) = (stats.clone(), shutdown.clone());
        let http = wayfinder::consul::ConsulHttp::new(consul.http_addr());
        let host_ip = Some(std::net::IpAddr::V4(docker.bridge_ip()));
        async move { wayfinder::register::run(&config.register, http, host_ip, "node".into(), stats, shutdown).await }
    });
    let deadline = Instant::now() + LIMIT;
    while registered(&consul).len() < 3
        || check_status(
            &consul,
            &format!(
                "{}:docker-health",
                registered(&consul).keys().next().cloned().unwrap_or_default()
            ),
        ) != "passing"
    {
        assert!(
            Instant::now() < deadline,
            "not registered and healthy: {:#?}",
            registered(&consul)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resyncs = stats.resyncs.load(Ordering::Relaxed);
    let written = stats.registered.load(Ordering::Relaxed) + stats.deregistered.load(Ordering::Relaxed);
    let resync_writes = stats.resync_writes.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(stats.resyncs.load(Ordering::Relaxed) >= resyncs + 3, "resyncs ran");
    assert_eq!(
        stats.registered.load(Ordering::Relaxed) + stats.deregistered.load(Ordering::Relaxed),
        written,
        "no registration written while idle"
    );
    assert_eq!(
        stats.resync_writes.load(Ordering::Relaxed),
        resync_writes,
        "no resync wrote anything"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("register stops when asked")
        .unwrap()
        .expect("register ends cleanly");
}

/// The agent's own answers the component relies on: a check the agent does
/// not hold (it lost its state) is "gone", not an error, so the component
/// registers its service again at once; a TTL check it holds is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_the_agent_lost_is_told_apart_from_a_failure() {
    use wayfinder::register::agent;
    let consul = Consul::start();
    let http = wayfinder::consul::ConsulHttp::new(consul.http_addr());
    let held = agent::set_status(&http, "never-registered", "passing").await;
    assert!(matches!(held, Ok(false)), "a check the agent does not hold: {held:?}");
    consul.register("held", "held", "10.0.0.1", 80, &[], true);
    let held = agent::set_status(&http, "service:held", "critical").await;
    assert!(matches!(held, Ok(true)), "a TTL check the agent holds: {held:?}");
    assert_eq!(check_status(&consul, "service:held"), "critical");
    agent::deregister(&http, "never-registered")
        .await
        .expect("deregistering what is gone is fine");
}
