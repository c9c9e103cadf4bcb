//! The README's quick start, as a newcomer meets it: a fresh `git clone` of
//! this repository (the committed HEAD of the tree the test was built from,
//! `CARGO_MANIFEST_DIR`), then the README's vpn command exactly as the README
//! writes it (read from the clone's README, `<this host's address>` filled in),
//! inside a fresh network namespace so that ports 53, 80, 8500 and 9000 are
//! free. Then the banner's "try" commands, each run as printed (`sh -c`): the
//! `docker run` of the demo app (registered by the register component from its
//! `SERVICE_*` variables), `dig` against port 53, `curl` through the lb on port
//! 80, the vpn peer from the admin API; the client config it gives brings up a
//! wireguard-go laptop in a second namespace, which resolves the service
//! through the tunnel's DNS and reaches it on the tunnel address. Ctrl-C's
//! SIGTERM stops it all with exit 0.
//!
//! What differs from a newcomer's run, and why:
//! - `WAYFINDER_BIN` (honoured by scripts/standalone.sh) points at the binary
//!   this test was built with: the clone is not built a second time (a release
//!   build from scratch takes many minutes on a 2-core machine). The script's
//!   install step (`scripts/install-deps.sh`) runs as written; with everything
//!   installed it only checks.
//! - `/run/wireguard` is a private tmpfs in the appliance's mount namespace
//!   (`ip netns exec` gives it one): the quick start's vpn uses the default
//!   interface name `wf0`, and its control socket must not meet another one.
//! - `ip netns exec` mounts a fresh /sys, without the cgroup file systems
//!   dockerd needs: the namespace's shell mounts them again as the host has
//!   them (see [`cgroup_mounts`]) before it runs the command.
//! - `DOCKER_HOST` names a socket where no daemon answers, so the script
//!   starts its own dockerd (in the appliance namespace, state in the clone's
//!   `.standalone/`) as on a fresh machine, even where the host runs Docker.
//! - The service is the demo container the banner's `docker run` starts, on
//!   port 8080 of every address of the namespace. The standalone lb listens on
//!   loopback only, so the laptop reaches the service at the tunnel address on
//!   the port its SRV answer names.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{require, wayfinder_bin};
use crate::netns::{Netns, WireguardGo, link, run};

/// The appliance's address on the laptop's network: the README's HOST_IP.
const HOST_IP: &str = "10.252.0.1";
const LAPTOP_IP: &str = "10.252.0.2";

/// The README's vpn quick-start command with `<...>` in `HOST_IP=<...>`
/// replaced by `host_ip`.
fn readme_vpn_command(readme: &str, host_ip: &str) -> String {
    let text = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    let start = text
        .find("`START_VPN=true")
        .unwrap_or_else(|| panic!("the README has no `START_VPN=true ...` quick-start command"));
    let rest = &text[start + 1..];
    let command = &rest[..rest.find('`').expect("closing backtick")];
    assert!(
        command.ends_with("scripts/standalone.sh"),
        "the README's vpn quick start: {command}"
    );
    let at = command.find("HOST_IP=<").expect("HOST_IP=<...> in the command") + "HOST_IP=".len();
    let end = at + command[at..].find('>').expect("HOST_IP=<...>") + 1;
    format!("{}{host_ip}{}", &command[..at], &command[end..])
}

/// The commands under `try:` in the banner, one per line.
fn try_lines(banner: &str) -> Vec<String> {
    banner
        .lines()
        .skip_while(|l| l.trim() != "try:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.trim().to_string())
        .collect()
}

/// `sh -c line` in `ns` with `dir` as working directory: (success, stdout).
fn shell(ns: &Netns, dir: &Path, line: &str) -> (bool, String, String) {
    let out = ns
        .cmd("sh")
        .args(["-c", line])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `line` until `ok` holds for its output, within `limit`.
fn until(ns: &Netns, dir: &Path, line: &str, limit: Duration, log: &Path, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (success, out, err) = shell(ns, dir, line);
        if success && ok(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "`{line}` did not give what was wanted in {limit:?}: {out}{err}\nlog of the quick start:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Shell commands that mount the cgroup file systems as this process sees
/// them (the host's), for a namespace whose /sys `ip netns exec` made anew.
fn cgroup_mounts() -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let mut out = String::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (point, fstype, options) = (fields[4], fields[dash + 1], fields.get(dash + 3).copied().unwrap_or(""));
        if !point.starts_with("/sys/fs/cgroup") {
            continue;
        }
        let options: Vec<&str> = options.split(',').filter(|o| *o != "rw" && *o != "ro").collect();
        let options = if options.is_empty() {
            String::new()
        } else {
            format!("-o {}", options.join(","))
        };
        out.push_str(&format!(
            "mkdir -p {point} && mount -t {fstype} {options} {fstype} {point} || exit 1\n"
        ));
    }
    out
}

/// Pids of processes named `comm` in `ns`.
fn pids_named(ns: &Netns, comm: &str) -> Vec<libc::pid_t> {
    let out = run(Command::new("ip").args(["netns", "pids", &ns.name]));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm))
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

#[test]
fn readme_quick_start_with_the_vpn_works_in_a_fresh_clone() {
    for p in [
        "git",
        "bash",
        "consul",
        "curl",
        "dig",
        "ping",
        "wireguard-go",
        "wg",
        "wg-quick",
        "nft",
        "dockerd",
        "docker",
        "busybox",
    ] {
        require(p);
    }
    // Dropped last: after the namespaces (and everything running in them).
    let work = tempfile::tempdir().unwrap();
    let clone = work.path().join("wayfinder");
    run(Command::new("git")
        .args(["clone", "--quiet", env!("CARGO_MANIFEST_DIR")])
        .arg(&clone));
    let vpn_mode = |clone: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(clone.join("vpn")).map(|m| m.permissions().mode() & 0o777)
    };
    let readme = std::fs::read_to_string(clone.join("README.md")).expect("README.md in the clone");
    let command = readme_vpn_command(&readme, HOST_IP);

    let mut app = Netns::new();
    let mut laptop = Netns::new();
    link(
        &app,
        "wan0",
        &format!("{HOST_IP}/24"),
        &laptop,
        "wan",
        &format!("{LAPTOP_IP}/24"),
    );
    let log = work.path().join("quick-start.log");
    let mut cmd = app.cmd("sh");
    cmd.arg("-c")
        .arg(format!(
            "mkdir -p /run/wireguard && mount -t tmpfs -o mode=0755 quick-start /run/wireguard || exit 1\n{}{command}",
            cgroup_mounts()
        ))
        .current_dir(&clone)
        .env("WAYFINDER_BIN", wayfinder_bin())
        .env(
            "DOCKER_HOST",
            format!("unix://{}/no-docker-here.sock", work.path().display()),
        )
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("CARGO_TARGET_DIR");
    for (var, _) in wayfinder::env::VARS {
        if *var != wayfinder::env::DOCKER_HOST {
            cmd.env_remove(var);
        }
    }
    app.spawn(cmd, &log);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut started = false;
    while !read_log().contains("wayfinder up: ready") {
        assert!(
            Instant::now() < deadline,
            "`{command}` never printed its ready banner:\n{}",
            read_log()
        );
        // (Not in the namespace yet while `ip netns exec` itself starts.)
        let running = ["sh", "bash", "wayfinder"]
            .iter()
            .any(|c| !pids_named(&app, c).is_empty());
        assert!(
            running || !started,
            "`{command}` ended before its ready banner:\n{}",
            read_log()
        );
        started |= running;
        std::thread::sleep(Duration::from_millis(200));
    }
    let banner = read_log();
    assert_eq!(vpn_mode(&clone).ok(), Some(0o700), "vpn/ made private:\n{banner}");
    for want in ["vpn      running", &format!("vpn      udp {HOST_IP}:51820")] {
        assert!(banner.contains(want), "`{want}` not in:\n{banner}");
    }

    // The banner's commands, as printed.
    let lines = try_lines(&banner);
    let line = |start: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no `{start} ...` under try: in\n{banner}"))
            .clone()
    };
    let register = line("docker -H unix://");
    assert!(
        register.contains(" run -d -p 8080:8080 ")
            && register.contains("SERVICE_TAGS=haproxy")
            // The demo image is built here, never pulled from a registry.
            && register.contains(" --pull never "),
        "{register}"
    );
    until(&app, &clone, &register, Duration::from_secs(30), &log, |_| true);
    let dig = line("dig @127.0.0.1 -p 53 ");
    until(&app, &clone, &dig, Duration::from_secs(30), &log, |out| {
        out.contains("status: NOERROR") && out.lines().any(|l| l.contains("\tSRV\t") && l.contains(" 8080 "))
    });
    let through_lb = line("curl -H 'Host: web.service.consul' http://127.0.0.1:80/");
    until(&app, &clone, &through_lb, Duration::from_secs(30), &log, |out| {
        out.starts_with("hello from ")
    });
    let status = line(&format!("{} status", wayfinder_bin().display()));
    until(&app, &clone, &status, Duration::from_secs(10), &log, |out| {
        out.contains("web") && out.contains("wf0")
    });

    // The laptop's config from the admin API, with the banner's command.
    let add_peer = line("curl -X POST");
    let (ok, answer, err) = shell(&app, &clone, &add_peer);
    assert!(ok, "{add_peer}: {err}");
    let added: serde_json::Value =
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{add_peer}: {e}: {answer}\n{}", read_log()));
    let config = added["config"]
        .as_str()
        .unwrap_or_else(|| panic!("no client config in {added:#}"));
    assert!(config.contains(&format!("Endpoint = {HOST_IP}:51820")), "{config}");
    let dns = config
        .lines()
        .find_map(|l| l.strip_prefix("DNS = "))
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no DNS = in\n{config}"));

    let wg = WireguardGo::start(&mut laptop);
    wg.configure(&laptop, config);
    let up_log = || format!("quick start log:\n{}", read_log());
    laptop.wait_for_srv(&dns, "web.service.consul", 8080, Duration::from_secs(30), up_log);
    let curl = require("curl");
    let url = format!("http://{dns}:8080/");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = laptop.output(curl.to_str().unwrap(), &["-s", "-m", "5", &url]);
        if String::from_utf8_lossy(&out.stdout).starts_with("hello from ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the laptop never reached {url} through the tunnel\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Ctrl-C (SIGTERM here): everything stops, exit 0.
    let ups = pids_named(&app, "wayfinder");
    assert_eq!(ups.len(), 1, "one wayfinder up in the namespace: {ups:?}");
    // SAFETY: kill(2) on the `up` this test started in its own namespace.
    unsafe { libc::kill(ups[0], libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_log().contains("wayfinder up: stopped") || !pids_named(&app, "consul").is_empty() {
        assert!(Instant::now() < deadline, "up did not stop:\n{}", read_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Then the script stops the dockerd it started (and its container).
    while !read_log().contains("standalone: docker stopped") || !pids_named(&app, "dockerd").is_empty() {
        assert!(Instant::now() < deadline, "dockerd did not stop:\n{}", read_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // wg, laptop and app drop before `work` (declared first): nothing runs
    // in the clone when it is removed.
}
