//! The appliance container as deploy/ ships it, against a private dockerd
//! (docker.rs) that runs inside a network namespace of its own: the compose
//! file's `network_mode: host` binds :53, :80, :81, :8500, :9000 and the
//! vpn's :51820 there, so parallel tests never meet.
//!
//! One test, one image build (deploy/build-image.sh, tagged as the compose
//! file's `image:` so that compose uses it without building), then in order:
//! - compose v1 (`docker-compose` 1.29) `up -d` of the shipped
//!   deploy/docker-compose.yml, copied unchanged beside `zones/` and a
//!   `restricted/host` made from deploy/restricted/standalone/host with this
//!   namespace's address filled in (and `START_VPN=true`); the variables the
//!   compose header documents (`DOCKER_GID`, `DOCKER_SOCKET`,
//!   `RESOLV_CONF_ORIG`) point at the private daemon. Measured: start to
//!   Docker's `healthy` (the image's own HEALTHCHECK).
//! - the register component inside (uid 900, the socket's group from
//!   `group_add`) registers an app container of the same daemon: `dig SRV`
//!   against the appliance's dns, HTTP through its lb; from client
//!   containers on the default bridge and on a user-defined network with the
//!   appliance as resolver: SRV, and `http://web.apps.example.com/` (the
//!   wildcard domain, getaddrinfo) through the lb.
//! - the vpn inside: a peer added on the admin endpoint, a wireguard-go
//!   laptop in another namespace resolves the service through the tunnel and
//!   reaches it through the lb on the tunnel address.
//! - HEALTHCHECK tells the truth (the image's own settings): Consul hung
//!   (SIGSTOP) turns the container `unhealthy`; killed then, the supervisor
//!   restarts it and the container turns `healthy` again. Killed until the
//!   supervisor gives it up: `unhealthy`, the probes saying so; restarted on
//!   the admin endpoint: `healthy`.
//! - a Consul KV key written, `docker-compose stop` (measured; exit 0, no
//!   SIGKILL, within the 45 s grace period), `down` (the named volume stays).
//! - compose v2 (`docker compose`) `up -d` of the same project: healthy,
//!   the key is still there; `docker stop` (measured, exit 0); `down -v`.
//! - `docker run --env-file` with the shipped quoted files as they are:
//!   restricted/standalone/host turns healthy; the cluster master-1 file
//!   passes `wayfinder check` (quotes unwrapped, CONSUL_HOSTS split).
//!
//! The figures are printed (`--nocapture`) and recorded in deploy/README.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::docker::{Dockerd, output_within};
use crate::harness::require;
use crate::netns::{Netns, WireguardGo, link};

/// The compose file's `image:`: built under that name, compose runs it.
const IMAGE: &str = "wayfinder:latest";
/// The appliance host's address (the namespace's), on the laptop's link.
const HOST_IP: &str = "10.253.0.1";
const LAPTOP_IP: &str = "10.253.0.2";
/// The compose file's `container_name`.
const CONTAINER: &str = "wayfinder";
/// The compose file's `stop_grace_period`.
const GRACE: Duration = Duration::from_secs(45);
/// How long a start may take to turn healthy on a loaded 2-core machine
/// (measured: a few seconds; the HEALTHCHECK probes every 5 s).
const HEALTHY_LIMIT: Duration = Duration::from_secs(90);
/// One compose command (`up -d` creates the network-less container and its volume).
const COMPOSE_LIMIT: Duration = Duration::from_secs(120);
/// The compose v2 CLI plugin scripts/install-deps.sh installs.
const COMPOSE_V2: &str = "/usr/local/lib/docker/cli-plugins/docker-compose";

/// A compose project of the shipped file copied into `dir`, run by v1 or v2
/// against `d`.
struct Compose<'a> {
    d: &'a Dockerd,
    dir: &'a Path,
    project: &'a str,
    env: Vec<(&'static str, String)>,
}

impl Compose<'_> {
    fn command(&self, v2: bool) -> Command {
        let mut cmd = if v2 {
            let plugin = Path::new(COMPOSE_V2);
            assert!(
                plugin.is_file(),
                "compose v2 ({COMPOSE_V2}) is not installed: run `scripts/install-deps.sh`"
            );
            let mut cmd = Command::new(require("docker"));
            cmd.arg("compose");
            cmd
        } else {
            Command::new(require("docker-compose"))
        };
        for var in [
            "DOCKER_CONTEXT",
            "DOCKER_TLS_VERIFY",
            "DOCKER_CERT_PATH",
            "COMPOSE_FILE",
            "COMPOSE_PROJECT_NAME",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("DOCKER_HOST", self.d.host())
            .env("DOCKER_CONFIG", self.d.dir().join("cli"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir)
            .args(["-p", self.project, "-f"])
            .arg(self.dir.join("deploy/docker-compose.yml"));
        cmd
    }

    /// Runs `compose <args>` (v2: `docker compose`), which must succeed
    /// within [`COMPOSE_LIMIT`]; returns how long it took.
    fn run(&self, v2: bool, args: &[&str]) -> Duration {
        let mut cmd = self.command(v2);
        cmd.args(args);
        let started = Instant::now();
        let out = output_within(&mut cmd, COMPOSE_LIMIT).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}):\n{}{}\ncontainer log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            logs(self.d, CONTAINER)
        );
        took
    }
}

/// The last lines of a container's log (for failure messages).
fn logs(d: &Dockerd, container: &str) -> String {
    d.try_docker(&["logs", "--tail", "60", container]).unwrap_or_else(|e| e)
}

/// Waits until the container's health is `want`; fails early when it stops
/// running. Returns how long it took.
fn wait_health(d: &Dockerd, container: &str, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    let deadline = started + limit;
    loop {
        let state = d.docker(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
            container,
        ]);
        let (status, health) = state.split_once(' ').unwrap_or((&state, ""));
        if health == want {
            return started.elapsed();
        }
        let health_log = || {
            d.try_docker(&[
                "inspect",
                "-f",
                "exit {{.State.ExitCode}} {{.State.Error}}; health {{json .State.Health}}",
                container,
            ])
            .unwrap_or_else(|e| e)
        };
        assert!(
            status == "running",
            "{container} is {status} while waiting for {want}: {}\nlog:\n{}",
            health_log(),
            logs(d, container)
        );
        assert!(
            Instant::now() < deadline,
            "{container} not {want} in {limit:?} (now {health:?}): {}\nlog:\n{}",
            health_log(),
            logs(d, container)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the appliance's `GET /api/ready` (admin endpoint, loopback of
/// the host network) answers 200: what its HEALTHCHECK's next probe sees.
fn wait_ready(d: &Dockerd, host: &Netns, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let out = host.output(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "2",
                "http://127.0.0.1:9000/api/ready",
            ],
        );
        if String::from_utf8_lossy(&out.stdout) == "200" {
            return;
        }
        if Instant::now() >= deadline {
            let why = host.output("curl", &["-s", "-m", "2", "http://127.0.0.1:9000/api/ready"]);
            panic!(
                "not ready in {limit:?}: {}\nlog:\n{}",
                String::from_utf8_lossy(&why.stdout),
                logs(d, CONTAINER)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The host pid of the process named `comm` in the container, if any.
fn try_pid_in(d: &Dockerd, container: &str, comm: &str) -> Option<libc::pid_t> {
    let top = d.try_docker(&["top", container, "-eo", "pid,comm"]).ok()?;
    top.lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        let pid = f.next()?.parse().ok()?;
        (f.next()? == comm).then_some(pid)
    })
}

/// The host pid of the process named `comm` in the container.
fn pid_in(d: &Dockerd, container: &str, comm: &str) -> libc::pid_t {
    try_pid_in(d, container, comm).unwrap_or_else(|| panic!("no {comm} in {container}:\n{}", logs(d, container)))
}

/// `docker inspect` of the exit: (exit code, OOM-killed), after a stop.
fn exit_of(d: &Dockerd, container: &str) -> String {
    d.docker(&["inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", container])
}

/// `program args` in `ns` until its stdout satisfies `ok` (within `limit`).
fn until_in(
    ns: &Netns,
    program: &str,
    args: &[&str],
    limit: Duration,
    ok: impl Fn(&str) -> bool,
    context: impl Fn() -> String,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let out = ns.output(program, args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && ok(&stdout) {
            return stdout;
        }
        assert!(
            Instant::now() < deadline,
            "`{program} {}` in {} did not give what was wanted in {limit:?}: {stdout}{}\n{}",
            args.join(" "),
            ns.name,
            String::from_utf8_lossy(&out.stderr),
            context()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// deploy/docker-compose.yml, zones/ and the standalone restricted/host
/// (`IP` filled in, the vpn on) in `dir`, laid out as in the repository.
fn lay_out(dir: &Path) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.join("deploy")).unwrap();
    std::fs::create_dir_all(dir.join("restricted")).unwrap();
    std::fs::copy(
        repo.join("deploy/docker-compose.yml"),
        dir.join("deploy/docker-compose.yml"),
    )
    .unwrap();
    let out = Command::new("cp")
        .arg("-r")
        .arg(repo.join("zones"))
        .arg(dir.join("zones"))
        .output()
        .expect("run cp");
    assert!(out.status.success(), "cp -r zones: {out:?}");
    let shipped = std::fs::read_to_string(repo.join("deploy/restricted/standalone/host")).unwrap();
    let ip_line = shipped
        .lines()
        .find(|l| l.starts_with("#IP="))
        .expect("restricted/standalone/host has an `#IP=...` line to fill");
    let host = format!(
        "{}START_VPN=true\n",
        shipped.replacen(ip_line, &format!("IP={HOST_IP}"), 1)
    );
    std::fs::write(dir.join("restricted/host"), &host).unwrap();
    // The host's resolvers: none reachable from the namespace (names
    // outside Consul are not asked for here).
    std::fs::write(dir.join("resolv.conf.orig"), "nameserver 192.0.2.53\n").unwrap();
    host
}

/// The group id of `path`.
fn gid_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .gid()
}

#[test]
fn shipped_compose_stack_v1_and_v2_registers_serves_the_vpn_and_keeps_state() {
    for p in ["docker-compose", "dig", "curl", "wireguard-go", "wg", "wg-quick"] {
        require(p);
    }
    let test_started = Instant::now();
    // Dropped last: the namespaces after the daemon (declared later).
    let work = tempfile::tempdir().unwrap();
    let host = Netns::new();
    let mut laptop = Netns::new();
    link(
        &host,
        "wan0",
        &format!("{HOST_IP}/24"),
        &laptop,
        "wan",
        &format!("{LAPTOP_IP}/24"),
    );
    let d = Dockerd::start_in(Some(&host.name), &[]);
    crate::image::build(&d, IMAGE);
    let sizes = d.docker(&["history", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGE]);
    eprintln!("{IMAGE} layers:\n{sizes}");

    let restricted = lay_out(work.path());
    let project = format!("wf{}", d.name().replace('-', ""));
    let compose = Compose {
        d: &d,
        dir: work.path(),
        project: &project,
        env: vec![
            ("DOCKER_GID", gid_of(&d.socket_path()).to_string()),
            ("DOCKER_SOCKET", d.socket_path().display().to_string()),
            (
                "RESOLV_CONF_ORIG",
                work.path().join("resolv.conf.orig").display().to_string(),
            ),
        ],
    };
    let context = || format!("restricted/host:\n{restricted}\nlog:\n{}", logs(&d, CONTAINER));

    // compose v1: up, healthy.
    let up_started = Instant::now();
    compose.run(false, &["up", "-d"]);
    wait_ready(&d, &host, HEALTHY_LIMIT);
    let v1_ready = up_started.elapsed();
    wait_health(&d, CONTAINER, "healthy", HEALTHY_LIMIT);
    let v1_healthy = up_started.elapsed();
    eprintln!("compose v1: up -d to ready (/api/ready) in {v1_ready:.1?}, to healthy in {v1_healthy:.1?}");
    assert_eq!(
        d.docker(&[
            "inspect",
            "-f",
            "{{.Config.User}} {{.HostConfig.NetworkMode}}",
            CONTAINER
        ]),
        "wayfinder:wayfinder host"
    );

    // The register component (uid 900 with the socket's group) registers an
    // app container of the same daemon: SRV from the appliance's dns, HTTP
    // through its lb.
    let app = d.run(&[
        "-p",
        "8080",
        "-e",
        "SERVICE_NAME=web",
        "-e",
        "SERVICE_TAGS=haproxy",
        d.app_image(),
    ]);
    let port = d.published_port(&app, "8080/tcp");
    let server = format!("@{HOST_IP}");
    let srv = until_in(
        &host,
        "dig",
        &[&server, "+short", "+time=2", "+tries=1", "web.service.consul", "SRV"],
        Duration::from_secs(60),
        |out| out.contains(&format!(" {port} ")),
        context,
    );
    eprintln!("web.service.consul SRV: {}", srv.trim());
    let hello = until_in(
        &host,
        "curl",
        &[
            "-s",
            "-m",
            "5",
            "-H",
            "Host: web.service.consul",
            &format!("http://{HOST_IP}:80/"),
        ],
        Duration::from_secs(30),
        |out| out.trim() == &app[..12],
        context,
    );
    assert_eq!(hello.trim(), &app[..12]);

    // Client containers on the default bridge and on a user-defined network,
    // the appliance as their resolver at the two addresses deploy/README.md
    // ("Pointing the host and its containers at Wayfinder") offers: the
    // bridge's address, and the host's. SRV through the busybox resolver, the
    // wildcard domain through getaddrinfo (glibc) and HTTP through the lb by
    // that URL (deploy/README.md's `http://web.apps.example.com/`). The dns
    // listens on 0.0.0.0:53 and answers from the address it was asked on
    // (IP_PKTINFO): asked at the host's address from a container, the route
    // back would otherwise give the bridge's, and the client's resolver drops
    // an answer from another address than it asked.
    let (network, _subnet) = d.create_network("clients");
    let bridge_ip = d.bridge_ip().to_string();
    for (net, resolver) in [("bridge", bridge_ip.as_str()), (network.as_str(), HOST_IP)] {
        // `image` runs `shell -c script` on `net` with the appliance as resolver.
        let in_client = |image: &str, shell: &str, script: &str, ok: &dyn Fn(&str) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let out = d.try_docker(&[
                    "run",
                    "--rm",
                    "--network",
                    net,
                    "--dns",
                    resolver,
                    "--entrypoint",
                    shell,
                    image,
                    "-c",
                    script,
                ]);
                match out {
                    Ok(out) if ok(&out) => return out,
                    other => assert!(
                        Instant::now() < deadline,
                        "`{script}` in a container on {net}: {other:?}\n{}",
                        context()
                    ),
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        };
        in_client(d.app_image(), "sh", "nslookup -type=SRV web.service.consul", &|out| {
            out.contains(&format!(" {port} "))
        });
        // getaddrinfo needs glibc's NSS, which the static busybox lacks: the
        // appliance image (Debian) is the client here, bash's /dev/tcp the
        // HTTP client.
        let body = in_client(
            IMAGE,
            "bash",
            "getent hosts web.apps.example.com >&2 && exec 3<>/dev/tcp/web.apps.example.com/80 \
             && printf 'GET / HTTP/1.0\\r\\nHost: web.apps.example.com\\r\\n\\r\\n' >&3 && timeout 10 cat <&3",
            &|out| out.lines().last().is_some_and(|l| l.trim() == &app[..12]),
        );
        assert!(body.starts_with("HTTP/1.") && body.contains(" 200 "), "{body}");
    }
    d.docker(&["network", "rm", &network]);

    // The vpn in the container: a peer from the admin endpoint (loopback of
    // the host network), a wireguard-go laptop resolving and reaching web.
    let added = until_in(
        &host,
        "curl",
        &[
            "-s",
            "-m",
            "5",
            "-X",
            "POST",
            "-d",
            r#"{"name": "laptop"}"#,
            "http://127.0.0.1:9000/api/vpn/peers",
        ],
        Duration::from_secs(10),
        |out| out.contains("\"config\""),
        context,
    );
    let added: serde_json::Value = serde_json::from_str(&added).unwrap_or_else(|e| panic!("{e}: {added}"));
    let config = added["config"].as_str().expect("a client config").to_string();
    assert!(config.contains(&format!("Endpoint = {HOST_IP}:51820")), "{config}");
    let dns = config
        .lines()
        .find_map(|l| l.strip_prefix("DNS = "))
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no DNS = in\n{config}"));
    let wg = WireguardGo::start(&mut laptop);
    wg.configure(&laptop, &config);
    laptop.wait_for_srv(&dns, "web.service.consul", port, Duration::from_secs(30), context);
    let through_tunnel = until_in(
        &laptop,
        "curl",
        &[
            "-s",
            "-m",
            "5",
            "-H",
            "Host: web.service.consul",
            &format!("http://{dns}:80/"),
        ],
        Duration::from_secs(30),
        |out| out.trim() == &app[..12],
        context,
    );
    assert_eq!(through_tunnel.trim(), &app[..12]);
    d.rm_force(&[&app]);

    // HEALTHCHECK tells the truth: Consul hung turns the container
    // unhealthy; killed, the supervisor restarts it and it turns healthy.
    let consul = pid_in(&d, CONTAINER, "consul");
    // SAFETY: kill(2) on the container's Consul, which this test started.
    unsafe { libc::kill(consul, libc::SIGSTOP) };
    let to_unhealthy = wait_health(&d, CONTAINER, "unhealthy", HEALTHY_LIMIT);
    let why = d.docker(&["inspect", "-f", "{{json .State.Health}}", CONTAINER]);
    assert!(why.contains("consul"), "the failing probes name Consul: {why}");
    // SAFETY: as above; SIGKILL ends a stopped process too.
    unsafe { libc::kill(consul, libc::SIGKILL) };
    let to_healthy = wait_health(&d, CONTAINER, "healthy", HEALTHY_LIMIT);
    assert_ne!(pid_in(&d, CONTAINER, "consul"), consul, "Consul was restarted");
    eprintln!("HEALTHCHECK: Consul hung -> unhealthy in {to_unhealthy:.1?}; killed -> healthy in {to_healthy:.1?}");
    // Killed again and again until the supervisor gives it up (failed):
    // unhealthy, saying so; restarted on the admin endpoint: healthy.
    let started = Instant::now();
    let mut killed = Vec::new();
    let status = || {
        d.try_docker(&[
            "exec",
            CONTAINER,
            "wayfinder",
            "status",
            "-c",
            "/etc/wayfinder/wayfinder.toml",
        ])
        .unwrap_or_else(|e| e)
    };
    while !status().contains("not ready: consul: failed too often") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Consul killed {} times and not given up: {}",
            killed.len(),
            status()
        );
        if let Some(pid) = try_pid_in(&d, CONTAINER, "consul").filter(|p| !killed.contains(p)) {
            // SAFETY: kill(2) on the container's Consul, which this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(pid);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let to_unhealthy = wait_health(&d, CONTAINER, "unhealthy", HEALTHY_LIMIT);
    let why = d.docker(&["inspect", "-f", "{{json .State.Health}}", CONTAINER]);
    assert!(why.contains("failed too often"), "the failing probes say why: {why}");
    until_in(
        &host,
        "curl",
        &[
            "-s",
            "-m",
            "5",
            "-X",
            "POST",
            "http://127.0.0.1:9000/api/units/consul/restart",
        ],
        Duration::from_secs(10),
        |_| true,
        context,
    );
    let to_healthy = wait_health(&d, CONTAINER, "healthy", HEALTHY_LIMIT);
    eprintln!(
        "HEALTHCHECK: Consul killed {} times -> given up, unhealthy {to_unhealthy:.1?} later; restarted -> healthy in {to_healthy:.1?}",
        killed.len()
    );

    // State in the named volume: a KV key, then stop (timed) and down.
    let consul_addr = format!("CONSUL_HTTP_ADDR={HOST_IP}:8500");
    d.docker(&[
        "exec",
        "-e",
        &consul_addr,
        CONTAINER,
        "consul",
        "kv",
        "put",
        "wayfinder-test/kept",
        "yes",
    ]);
    let v1_stop = compose.run(false, &["stop"]);
    assert_eq!(exit_of(&d, CONTAINER), "exited 0", "{}", logs(&d, CONTAINER));
    assert!(v1_stop < GRACE, "docker-compose stop took {v1_stop:?}");
    eprintln!("compose v1: stop in {v1_stop:.1?} (exit 0)");
    compose.run(false, &["down"]);
    assert_eq!(d.docker(&["ps", "-aq", "--filter", &format!("name={CONTAINER}")]), "");

    // compose v2, the same project: healthy again, the key kept.
    let up_started = Instant::now();
    compose.run(true, &["up", "-d"]);
    wait_ready(&d, &host, HEALTHY_LIMIT);
    let v2_ready = up_started.elapsed();
    wait_health(&d, CONTAINER, "healthy", HEALTHY_LIMIT);
    let v2_healthy = up_started.elapsed();
    eprintln!("compose v2: up -d to ready (/api/ready) in {v2_ready:.1?}, to healthy in {v2_healthy:.1?}");
    let kept = d.docker(&[
        "exec",
        "-e",
        &consul_addr,
        CONTAINER,
        "consul",
        "kv",
        "get",
        "wayfinder-test/kept",
    ]);
    assert_eq!(kept, "yes", "Consul's state across down/up");
    let stop_started = Instant::now();
    d.docker(&["stop", CONTAINER]);
    let docker_stop = stop_started.elapsed();
    assert_eq!(exit_of(&d, CONTAINER), "exited 0", "{}", logs(&d, CONTAINER));
    assert!(docker_stop < GRACE, "docker stop took {docker_stop:?}");
    eprintln!("docker stop in {docker_stop:.1?} (exit 0)");
    compose.run(true, &["down", "-v"]);
    assert_eq!(d.docker(&["volume", "ls", "-q"]), "", "down -v removes the volume");

    env_files(&d, &host);
    eprintln!("compose test: {:.0?} in all", test_started.elapsed());
}

/// `docker run --env-file` with the shipped quoted files, as they are.
fn env_files(d: &Dockerd, host: &Netns) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let standalone: PathBuf = repo.join("deploy/restricted/standalone/host");
    let gid = gid_of(&d.socket_path()).to_string();
    let socket = format!("{}:/var/run/docker.sock", d.socket_path().display());
    // The Dockerfile header's command.
    let id = d.docker(&[
        "run",
        "-d",
        "--network",
        "host",
        "--cap-add",
        "NET_ADMIN",
        "--device",
        "/dev/net/tun",
        "--env-file",
        &standalone.to_string_lossy(),
        "--group-add",
        &gid,
        "-v",
        &socket,
        "-v",
        "wayfinder-data:/var/lib/wayfinder",
        IMAGE,
    ]);
    let took = wait_health(d, &id, "healthy", HEALTHY_LIMIT);
    eprintln!("docker run --env-file restricted/standalone/host: healthy in {took:.1?}");
    // Its wildcard domain came through unquoted.
    let answer = until_in(
        host,
        "dig",
        &[
            "@127.0.0.1",
            "+short",
            "+time=2",
            "+tries=1",
            "anything.apps.example.com",
        ],
        Duration::from_secs(20),
        |out| !out.trim().is_empty(),
        || logs(d, &id),
    );
    assert!(answer.trim().parse::<std::net::Ipv4Addr>().is_ok(), "{answer}");
    d.docker(&["stop", &id]);
    assert_eq!(exit_of(d, &id), "exited 0", "{}", logs(d, &id));
    d.docker(&["rm", "-v", &id]);
    d.docker(&["volume", "rm", "wayfinder-data"]);

    // A cluster master's file as shipped, on a host that has its address
    // (10.0.0.11, added to the namespace) but no peers: `check` says ok with
    // the quotes gone; `up` gets as far as it can: Consul runs with
    // CONSUL_HOSTS and CONSUL_PARAMS as separate arguments, waits for the
    // other masters, and the HEALTHCHECK says why it is not healthy.
    let master = repo.join("deploy/restricted/cluster/master-1/host");
    let master = master.to_string_lossy();
    host.ip("addr add 10.0.0.11/24 dev wan0");
    let check = d.docker(&[
        "run",
        "--rm",
        "--network",
        "host",
        "--cap-add",
        "NET_ADMIN",
        "--env-file",
        &master,
        IMAGE,
        "check",
        "-c",
        "/etc/wayfinder/wayfinder.toml",
    ]);
    for want in [
        "configuration ok",
        "wildcard_domain = \".apps.example.com\"",
        "http = \"10.0.0.11:8500\"",
    ] {
        assert!(check.contains(want), "`{want}` not in:\n{check}");
    }
    let id = d.docker(&[
        "run",
        "-d",
        "--network",
        "host",
        "--cap-add",
        "NET_ADMIN",
        "--env-file",
        &master,
        IMAGE,
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let consul = loop {
        let top = d.try_docker(&["top", &id, "-eo", "pid,comm"]).unwrap_or_default();
        if let Some(pid) = top.lines().skip(1).find_map(|l| {
            let mut f = l.split_whitespace();
            let pid: libc::pid_t = f.next()?.parse().ok()?;
            (f.next()? == "consul").then_some(pid)
        }) {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "no Consul in the master-1 container:\n{}",
            logs(d, &id)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let args: Vec<String> = std::fs::read(format!("/proc/{consul}/cmdline"))
        .expect("Consul's command line")
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    for host in ["10.0.0.12", "10.0.0.13"] {
        assert!(args.contains(&format!("-retry-join={host}")), "{args:?}");
    }
    let expect = args.iter().position(|a| a == "-bootstrap-expect");
    assert_eq!(
        expect.and_then(|i| args.get(i + 1)).map(String::as_str),
        Some("3"),
        "{args:?}"
    );
    // Not ready (exit 1, naming Consul) while it waits for the others.
    let status = d
        .try_docker(&[
            "exec",
            &id,
            "wayfinder",
            "status",
            "-c",
            "/etc/wayfinder/wayfinder.toml",
        ])
        .expect_err("ready without the other masters");
    assert!(
        status.contains("exit status: 1") && status.contains("not ready: consul"),
        "{status}"
    );
    eprintln!("master-1 without peers: {status}");
    d.rm_force(&[&id]);
}
