//! A private Docker daemon per test, for the register tests: its own dockerd
//! (with the containerd it manages under its exec root), bridge, /24 subnet,
//! cgroup parent, containerd namespaces and directory, plus an app image
//! built from busybox-static (no registry is ever asked).
//!
//! Everything a [`Dockerd`] makes is named after one unique name,
//! `wfd<pid>-<n>` (pid and a per-process counter in base 36, at most 15
//! bytes: the bridge, `/sys/fs/cgroup/*/<name>`, the containerd namespaces and
//! `$TMPDIR/<name>/`, which holds the socket, data root, exec root, pidfile
//! and log). Dropping the handle kills the daemon and what it started
//! (containerd, shims, containers, docker-proxy; no graceful stop), unmounts
//! anything still mounted under the directory, deletes the bridge, its veths
//! and cgroups, and removes the directory.
//! Tests share nothing else (`/etc/docker` included: dockerd's identity key
//! is kept in the directory too).
//!
//! dockerd dies with the test process (PDEATHSIG, containerd with it), but
//! container shims are daemons of their own and survive a crashed run, with
//! their containers, cgroups and bridge. The directory records its owner (pid
//! and start time), and the first [`Dockerd::start`] of every test process
//! cleans up after owners that are gone ([`sweep_stale`]); nothing without
//! such a record is ever touched.
//!
//! [`Dockerd::start_in`] runs the daemon inside a network namespace (an
//! `ip netns` one the test made): its bridge and its host-network containers
//! are that namespace's, so an appliance container on `--network host` binds
//! :53 and :80 there (tests/integration/compose.rs).
//!
//! The daemon runs without iptables (`--iptables=false --ip-masq=false
//! --ip-forward=false`: nothing global on the host changes); published ports
//! work through docker-proxy, the userland proxy, on 127.0.0.1 or all
//! addresses as asked.
//!
//! dockerd runs in a mount namespace of its own (a slave of the host's): the
//! overlays and network namespace files it mounts never appear on the host,
//! and they vanish with its last process. There, a file of the directory is
//! bind-mounted over /proc/sys/net/ipv4/ip_local_port_range, which dockerd
//! reads to choose published host ports: each daemon gets a block of 100
//! ports of its own ([`Dockerd::port_range`]), where two daemons would
//! otherwise both begin at the kernel's first ephemeral port and dockerd
//! gives up after 10 taken ports (even when it restarts a container after a
//! daemon restart, which no retry of ours can help). Since those mounts are
//! not the host's, a container's `SandboxKey` (network namespace file) is
//! not openable from the test: use `/proc/<State.Pid>/ns/net`.

#![allow(dead_code)]

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::harness::{die_with_parent, http_get, require};

/// The app image [`Dockerd::app_image`] imports.
pub const APP_IMAGE: &str = "wf-app:test";

/// What the app image runs (`CMD ["/app"]`): serves /www with busybox httpd on
/// each port of `$PORTS` (default `$PORT`, default 8080); `/` answers the
/// container's hostname, `/health` answers `ok` while /www/health exists.
/// On SIGTERM it prints `wf-app: draining` (see `docker logs`), keeps serving
/// for `$DRAIN_SECONDS` (default 1), then exits 0. The trap is set before
/// anything else: a signal without a handler never reaches PID 1, so an early
/// `docker stop` would wait its full 10 s.
const APP_SCRIPT: &str = r#"#!/bin/sh
# wf-app (tests/integration/docker.rs): serves /www on $PORTS (default $PORT,
# default 8080); / is this container's hostname, /health is "ok" until
# /www/health is removed. SIGTERM: keeps serving $DRAIN_SECONDS (default 1),
# then exits 0.
pids=
trap 'echo "wf-app: draining for ${DRAIN_SECONDS:-1} s"; sleep "${DRAIN_SECONDS:-1}"; kill $pids 2>/dev/null; exit 0' TERM
trap 'kill $pids 2>/dev/null; exit 0' INT
hostname > /www/index.html
for port in ${PORTS:-${PORT:-8080}}; do
  httpd -f -p "$port" -h /www &
  pids="$pids $!"
done
wait
"#;

/// How long one docker CLI command may take before the test fails.
const CLI_LIMIT: Duration = Duration::from_secs(60);

/// How long dockerd may take to answer its API.
const READY_LIMIT: Duration = Duration::from_secs(30);

/// How long [`Dockerd::stop`] waits after SIGTERM before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(15);

/// How many more times a container start failing on a taken host port is
/// tried (dockerd tries 10 ports each time).
const PORT_TRIES: u32 = 30;

/// Every name this module makes starts with this.
const PREFIX: &str = "wfd";

/// A running dockerd of the test's own; see the module header.
pub struct Dockerd {
    /// `wfd<pid>-<n>`: bridge, cgroup parent, containerd namespaces, directory.
    name: String,
    /// `$TMPDIR/<name>`: socket, data root, exec root, pidfile, log.
    dir: PathBuf,
    /// The docker CLI.
    cli: PathBuf,
    /// The bridge's /24 is `10.<subnet[0]>.<subnet[1]>.0/24`.
    subnet: [u8; 2],
    /// The host ports it publishes containers' ports on when none is given.
    ports: PortBlock,
    /// Extra dockerd arguments, kept for [`Self::restart`].
    extra: Vec<String>,
    /// The network namespace it runs in (`ip netns` name), if not the host's.
    netns: Option<String>,
    /// The daemon, while it runs.
    child: Option<Child>,
    /// Whether [`APP_IMAGE`] is imported (it survives restarts).
    imported: Mutex<bool>,
}

impl Dockerd {
    /// Starts a daemon with the default options (see [`Self::start_with`]).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a daemon with `extra` dockerd arguments (`--live-restore`, say)
    /// and waits until it answers (30 s at most; the failure shows its log).
    /// Blocks for about 0.3 s on an idle machine. Fails the test, naming the
    /// install step, when dockerd, docker or ip is missing.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_in(None, extra)
    }

    /// [`Self::start_with`] inside network namespace `netns` (an `ip netns`
    /// name, e.g. a [`crate::netns::Netns`]'s, which must outlive the
    /// daemon): its bridge, its containers' networks and `--network host`
    /// are that namespace's, so a host-network container may bind any port
    /// there. Only the network namespace is entered: /sys and the cgroup
    /// file systems stay the host's. In its mount namespace /dev/net/tun is
    /// a node of mode 0666 (the same device), as stock hosts have it: Docker
    /// gives `--device /dev/net/tun` the host node's mode, and some test
    /// machines have 0600, which no container user but root may open.
    pub fn start_in(netns: Option<&str>, extra: &[&str]) -> Self {
        require("dockerd");
        require("ip");
        let cli = require("docker");
        static SWEPT: OnceLock<()> = OnceLock::new();
        SWEPT.get_or_init(sweep_stale);

        // A name whose directory, bridge or cgroup exists was used by a dead
        // process with our pid and not cleaned up: never reused, never touched.
        let (name, dir) = loop {
            let name = unique_name();
            let dir = base_dir().join(&name);
            if !dir.exists() && !Path::new("/sys/class/net").join(&name).exists() && cgroup_dirs(&name).is_empty() {
                break (name, dir);
            }
        };
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        // The owner record is what makes the directory ours to sweep later.
        let me = std::process::id();
        let owner = format!("{me} {}\n", start_time(me).expect("our own start time"));
        let tmp = dir.join("owner.tmp");
        std::fs::write(&tmp, owner).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, dir.join("owner")).unwrap_or_else(|e| panic!("rename {}: {e}", tmp.display()));
        let mut config = serde_json::json!({});
        if dockerd_major() < 23 {
            // dockerd 20.10 keeps an identity key, /etc/docker/key.json by
            // default: daemons starting at once would race to create it.
            config["deprecated-key-path"] = dir.join("key.json").to_string_lossy().into();
        }
        std::fs::write(dir.join("daemon.json"), config.to_string())
            .unwrap_or_else(|e| panic!("write {}/daemon.json: {e}", dir.display()));

        // From here on, Drop cleans up whatever fails.
        let ports = PortBlock::lock(&name);
        let range = dir.join("ip_local_port_range");
        std::fs::write(&range, format!("{}\t{}\n", ports.first, ports.last()))
            .unwrap_or_else(|e| panic!("write {}: {e}", range.display()));
        let mut dockerd = Dockerd {
            subnet: [0, 0],
            ports,
            name,
            dir,
            cli,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: netns.map(str::to_string),
            child: None,
            imported: Mutex::new(false),
        };
        dockerd.subnet = make_bridge(&dockerd.name, dockerd.netns.as_deref());
        dockerd.launch();
        dockerd
    }

    /// Spawns dockerd and waits for its API, then checks the CLI reaches it.
    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .unwrap_or_else(|e| panic!("open {}/dockerd.log: {e}", self.dir.display()));
        let stderr = log.try_clone().expect("clone the dockerd log's handle");
        let mut cmd = Command::new(require("dockerd"));
        cmd.arg("--host")
            .arg(self.host())
            .arg("--config-file")
            .arg(self.dir.join("daemon.json"))
            .arg("--data-root")
            .arg(self.data_root())
            .arg("--exec-root")
            .arg(self.exec_root())
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .args(["--bridge", &self.name])
            .args([
                "--iptables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--userland-proxy=true",
            ])
            .args(["--containerd-namespace", &self.name])
            .args(["--containerd-plugins-namespace", &format!("{}p", self.name)])
            // A cgroup parent of its own: the containers of this daemon, and
            // only they, are found (and killed) there whatever happened.
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .args(["--cgroup-parent", &format!("/{}", self.name)])
            .args(&self.extra)
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        let netns = self.netns.as_ref().map(|ns| {
            let path = Path::new("/run/netns").join(ns);
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        });
        let tun = netns.as_ref().map(|_| tun_node(&self.dir));
        private_mounts_and_ports(&mut cmd, &self.dir.join("ip_local_port_range"), netns, tun);
        let child = spawn_lasting(cmd).unwrap_or_else(|e| {
            panic!(
                "spawn dockerd ([setns into its network namespace,] unshare a mount namespace, bind-mount its port range [and /dev/net/tun] there, exec): {e}"
            )
        });
        self.child = Some(child);
        self.wait_ready();
        let version = self
            .try_docker(&["version", "--format", "{{.Server.Version}}"])
            .unwrap_or_else(|e| panic!("dockerd answers its API but the docker CLI does not reach it: {e}"));
        assert!(!version.is_empty(), "`docker version` named no server version");
    }

    /// Waits until `GET /_ping` on the socket answers `OK`.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            if ping(&self.socket_path()) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!(
                    "dockerd {} exited ({status}) before it answered; log:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "dockerd {} did not answer on {} in {READY_LIMIT:?}; log:\n{}",
                self.name,
                self.socket_path().display(),
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The unique name of this daemon (also its bridge's and cgroup parent's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directory (socket, data root, exec root, pidfile, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its data root (images, containers).
    pub fn data_root(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Its exec root (containerd's socket and state, network namespaces).
    pub fn exec_root(&self) -> PathBuf {
        self.dir.join("exec")
    }

    /// Its API socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `unix://<socket>`, for `DOCKER_HOST` or `--host`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket_path().display())
    }

    /// Its bridge (containers' default network).
    pub fn bridge(&self) -> &str {
        &self.name
    }

    /// The bridge's address: the containers' gateway, and how a container
    /// reaches the host (a Consul agent listening there, say).
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet[0], self.subnet[1], 1)
    }

    /// The bridge's subnet, `10.x.y.0/24`.
    pub fn subnet(&self) -> String {
        format!("10.{}.{}.0/24", self.subnet[0], self.subnet[1])
    }

    /// The host ports dockerd chooses published ports from (`-p 8080`,
    /// `-p 127.0.0.1::8080`, `-P`): a block of 100 no other daemon of these
    /// tests uses, below the kernel's ephemeral range.
    pub fn port_range(&self) -> std::ops::RangeInclusive<u16> {
        self.ports.first..=self.ports.last()
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The last `lines` lines of the daemon's log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A docker CLI command aimed at this daemon (`--host` set, the
    /// environment's `DOCKER_*` settings removed, a private config
    /// directory); add the subcommand and its arguments.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(&self.cli);
        for var in [
            "DOCKER_HOST",
            "DOCKER_CONTEXT",
            "DOCKER_TLS_VERIFY",
            "DOCKER_CERT_PATH",
            "DOCKER_API_VERSION",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("DOCKER_CONFIG", self.dir.join("cli"))
            .arg("--host")
            .arg(self.host());
        cmd
    }

    /// Runs `docker <args>` against this daemon: its stdout without trailing
    /// white space, or the failure (command, status, stderr).
    pub fn try_docker(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.cli();
        cmd.args(args);
        let out = output_within(&mut cmd, CLI_LIMIT).map_err(|e| format!("docker {}: {e}", args.join(" ")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
        } else {
            Err(format!(
                "docker {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end(),
                String::from_utf8_lossy(&out.stdout).trim_end()
            ))
        }
    }

    /// Runs `docker <args>` against this daemon: its stdout without trailing
    /// white space. Fails the test with stderr unless it succeeds.
    pub fn docker(&self, args: &[&str]) -> String {
        self.try_docker(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Imports [`APP_IMAGE`] (once per daemon; it survives restarts) and
    /// returns its name. See [`APP_SCRIPT`] for what it runs: set `PORT`,
    /// `PORTS` or `DRAIN_SECONDS` with `-e`; `docker exec <c> rm /www/health`
    /// makes `/health` answer 404. Every busybox applet is in /bin, so any
    /// other command works too (`docker run ... wf-app:test sleep 60`).
    pub fn app_image(&self) -> &'static str {
        let mut imported = self.imported.lock();
        if !*imported {
            let tar = build_app_tar(&self.dir);
            let tar = tar.to_string_lossy();
            self.docker(&[
                "import",
                "--change",
                r#"CMD ["/app"]"#,
                "--change",
                "EXPOSE 8080",
                "--change",
                "WORKDIR /",
                &tar,
                APP_IMAGE,
            ]);
            *imported = true;
        }
        APP_IMAGE
    }

    /// `docker run -d <args>` (options, image, command): the new container's
    /// full id. Use it (not `docker(&["run", ..])`) for containers that
    /// publish ports: dockerd tries the ports of [`Self::port_range`] in
    /// order and gives up after 10 taken ones (any program may hold some), so
    /// a start that fails on a taken port is tried again, further on.
    pub fn run(&self, args: &[&str]) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let cidfile = self.dir.join(format!("cid-{}", N.fetch_add(1, Ordering::Relaxed)));
        let cidfile_arg = cidfile.to_string_lossy();
        let mut all = vec!["run", "-d", "--cidfile", &cidfile_arg];
        all.extend_from_slice(args);
        let mut tries = 0;
        let id = loop {
            let _ = std::fs::remove_file(&cidfile);
            match self.try_docker(&all) {
                Ok(_) => break read_cidfile(&cidfile),
                Err(e) if port_taken(&e) && tries < PORT_TRIES => {
                    tries += 1;
                    // Created but not started: start it again. Gone (--rm):
                    // run it again.
                    let id = read_cidfile(&cidfile);
                    if !id.is_empty() && self.try_docker(&["inspect", "--format", "{{.Id}}", &id]).is_ok() {
                        self.start_container(&id);
                        break id;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        };
        let _ = std::fs::remove_file(&cidfile);
        assert!(
            id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "`docker run -d` left no container id: {id:?}"
        );
        id
    }

    /// `docker start <id>`, again while it fails on a published port that is
    /// taken (dockerd moves on through its range: 10 ports per try).
    pub fn start_container(&self, id: &str) {
        let mut tries = 0;
        loop {
            match self.try_docker(&["start", id]) {
                Ok(_) => return,
                Err(e) if port_taken(&e) && tries < PORT_TRIES => tries += 1,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// The container's address on its first network (the bridge unless it
    /// was attached elsewhere).
    pub fn inspect_ip(&self, id: &str) -> Ipv4Addr {
        let ips = self.docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            id,
        ]);
        let first = ips
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("container {id} has no IP address (not running?)"));
        first
            .parse()
            .unwrap_or_else(|e| panic!("container {id}'s address {first:?}: {e}"))
    }

    /// The host port published for the container's `port` (`"8080/tcp"`);
    /// published with `-p 127.0.0.1::8080` or `-p 8080`, dockerd chooses it.
    pub fn published_port(&self, id: &str, port: &str) -> u16 {
        let out = self.docker(&["port", id, port]);
        let line = out
            .lines()
            .next()
            .unwrap_or_else(|| panic!("container {id} publishes no {port}"));
        let (_, host_port) = line
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("`docker port {id} {port}` printed {out:?}"));
        host_port
            .parse()
            .unwrap_or_else(|e| panic!("`docker port {id} {port}` printed {out:?}: {e}"))
    }

    /// 127.0.0.1 and the host port published for the container's `port`.
    pub fn published_addr(&self, id: &str, port: &str) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.published_port(id, port)))
    }

    /// `docker network create` of a bridge network `<label>` on a /24 of its
    /// own (chosen as the daemon's bridge's is: overlapping nothing on the
    /// host, and checked again once made, for a parallel test's); its bridge
    /// is `<daemon name>n<k>`, removed with the daemon. Returns the network's
    /// name and its subnet (`10.x.y.0/24`).
    pub fn create_network(&self, label: &str) -> (String, String) {
        static N: AtomicU32 = AtomicU32::new(0);
        let k = N.fetch_add(1, Ordering::Relaxed);
        let bridge = format!("{}n{k}", self.name);
        assert!(bridge.len() <= 15, "bridge name {bridge} too long");
        let network = format!("{label}-{k}");
        for attempt in 0..64u32 {
            let mut h = std::hash::DefaultHasher::new();
            (&bridge, attempt).hash(&mut h);
            let h = h.finish();
            let subnet = [200 + (h % 55) as u8, (h >> 8) as u8];
            let net = Ipv4Addr::new(10, subnet[0], subnet[1], 0);
            if ipv4_in_use(net, 24, &bridge, self.netns.as_deref()).is_some() {
                continue;
            }
            let cidr = format!("{net}/24");
            let made = self.try_docker(&[
                "network",
                "create",
                "--driver",
                "bridge",
                "--subnet",
                &cidr,
                "-o",
                &format!("com.docker.network.bridge.name={bridge}"),
                &network,
            ]);
            if made.is_err() {
                continue;
            }
            if ipv4_in_use(net, 24, &bridge, self.netns.as_deref()).is_some() {
                self.docker(&["network", "rm", &network]);
                std::thread::sleep(Duration::from_millis(10 + h % 50));
                continue;
            }
            return (network, cidr);
        }
        panic!("found no free 10.2xx.y.0/24 for network {network} in 64 tries");
    }

    /// `docker rm -f <ids>` (nothing when `ids` is empty).
    pub fn rm_force(&self, ids: &[&str]) {
        if ids.is_empty() {
            return;
        }
        let mut all = vec!["rm", "-f"];
        all.extend_from_slice(ids);
        self.docker(&all);
    }

    /// Stops the daemon as an operator would: SIGTERM (dockerd then stops its
    /// containers, each within its stop timeout, and its containerd), SIGKILL
    /// after 15 s. Containers stay on disk. Takes about 2 s plus the slowest
    /// container's stop (containerd's shutdown is part of it).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: plain kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_LIMIT;
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// [`Self::stop`], then starts it again with the same directory, bridge,
    /// namespaces and options: containers are still there, and those with a
    /// restart policy start again.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Dockerd {
    /// Kills the daemon and everything it started (no graceful stop: it all
    /// goes away), then removes what is left; see [`cleanup`]. Problems are
    /// printed, never panicked on (this may run while a test unwinds).
    fn drop(&mut self) {
        let child = self.child.take();
        if let Some(child) = &child {
            // SAFETY: plain kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        }
        let problems = cleanup(&self.name, &self.dir);
        if let Some(mut child) = child {
            let _ = child.wait();
        }
        if !problems.is_empty() {
            eprintln!("dockerd {}: cleanup left {}", self.name, problems.join("; "));
        }
    }
}

/// The container id `docker run --cidfile` wrote ("" when none).
fn read_cidfile(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default().trim().to_string()
}

/// Whether a docker error is a published host port someone else holds.
fn port_taken(error: &str) -> bool {
    error.contains("address already in use") || error.contains("port is already allocated")
}

/// `wfd<pid>-<n>` in base 36: unique per process and call, at most 15 bytes.
fn unique_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "{PREFIX}{}-{}",
        base36(std::process::id()),
        base36(COUNTER.fetch_add(1, Ordering::Relaxed))
    );
    assert!(name.len() <= 15, "{name} is longer than an interface name may be");
    name
}

fn base36(mut n: u32) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).expect("base 36 digits are ASCII")
}

/// Whether `name` has the shape of [`unique_name`]'s names. Whose it is,
/// the `owner` record in the directory says.
fn looks_like_ours(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    name.strip_prefix(PREFIX)
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(pid, n)| digits(pid) && digits(n))
}

/// Where the daemons' directories go: `$TMPDIR` unless the socket path would
/// be too long for a unix socket (108 bytes with its NUL), else /tmp.
fn base_dir() -> PathBuf {
    let tmp = std::env::temp_dir();
    // "/wfd" + 7 (pid) + "-" + 3 (counter) + "/docker.sock"
    if tmp.as_os_str().len() + 28 <= 100 {
        tmp
    } else {
        PathBuf::from("/tmp")
    }
}

/// The start time of process `pid` (clock ticks since boot, field 22 of
/// `/proc/<pid>/stat`): with the pid, it names a process for good.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_comm) = stat.rsplit_once(')')?;
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// dockerd's major version (20 for Debian bookworm's 20.10).
fn dockerd_major() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        let out = Command::new(require("dockerd"))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("run dockerd --version: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        // "Docker version 20.10.24+dfsg1, build 5d6db84"
        text.split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("cannot read dockerd's version from {text:?}"))
    })
}

/// Spawns `cmd` (killed when the test process dies) from a thread that lives
/// as long as the process: PDEATHSIG fires when the *thread* that spawned a
/// child exits, and a test may start a daemon from a short-lived thread.
fn spawn_lasting(cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("dockerd-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(die_with_parent(&mut cmd).spawn());
                }
            })
            .expect("start the dockerd spawner thread");
        tx
    });
    let (tx, rx) = mpsc::channel();
    spawner.send((cmd, tx)).expect("the dockerd spawner thread lives");
    rx.recv().expect("the dockerd spawner thread answers")
}

/// Makes `cmd` (dockerd) run in a mount namespace of its own, a slave of
/// the host's (host mounts still reach it, its mounts stay in it), where
/// `range` is bind-mounted over /proc/sys/net/ipv4/ip_local_port_range:
/// dockerd reads its ephemeral host ports from there, once, and without
/// this every daemon would start at the same port. With `netns`, it first
/// enters that network namespace; with `tun`, that node is bind-mounted over
/// /dev/net/tun (see [`Dockerd::start_in`]).
fn private_mounts_and_ports(cmd: &mut Command, range: &Path, netns: Option<std::fs::File>, tun: Option<PathBuf>) {
    use std::os::unix::process::CommandExt;
    let range = std::ffi::CString::new(range.as_os_str().as_bytes()).expect("a path without NUL");
    let tun = tun.map(|t| std::ffi::CString::new(t.as_os_str().as_bytes()).expect("a path without NUL"));
    // SAFETY: unshare(2) and mount(2) are async-signal-safe; the strings are
    // allocated before the fork and only read in the child, which allocates
    // nothing (hence errors without context: see the spawn's panic).
    unsafe {
        cmd.pre_exec(move || {
            let (null, no_data) = (std::ptr::null(), std::ptr::null());
            let target = c"/proc/sys/net/ipv4/ip_local_port_range";
            // The network namespace first: the port range file bound below
            // is then the namespace's (it reads per network namespace).
            if let Some(ns) = &netns
                && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_SLAVE, no_data) != 0
                || libc::mount(range.as_ptr(), target.as_ptr(), null, libc::MS_BIND, no_data) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(tun) = &tun
                && libc::mount(tun.as_ptr(), c"/dev/net/tun".as_ptr(), null, libc::MS_BIND, no_data) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

/// A TUN device node (char 10:200) of mode 0666 in `dir`, made once.
fn tun_node(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("tun");
    if !path.exists() {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("a path without NUL");
        // SAFETY: mknod(2) with a NUL-terminated path we own.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, 200)) };
        assert_eq!(rc, 0, "mknod {}: {}", path.display(), std::io::Error::last_os_error());
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    path
}

/// A block of host ports for one daemon's published ports, held (flock on
/// `$TMPDIR/wfd-port-locks/<block>`) as long as the handle lives; a dead
/// process's locks go with it.
struct PortBlock {
    first: u16,
    _lock: std::fs::File,
}

impl PortBlock {
    /// Ports 20000..=32699 (below Linux's default ephemeral range, which
    /// `free_port` and outgoing connections use), in blocks of 100.
    const BASE: u16 = 20_000;
    const SIZE: u16 = 100;
    const COUNT: u16 = 127;

    /// Locks a free block, trying from one derived from `name`.
    fn lock(name: &str) -> Self {
        let dir = base_dir().join("wfd-port-locks");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut h = std::hash::DefaultHasher::new();
        name.hash(&mut h);
        let start = (h.finish() % u64::from(Self::COUNT)) as u16;
        for i in 0..Self::COUNT {
            let block = (start + i) % Self::COUNT;
            let path = dir.join(block.to_string());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            // SAFETY: flock(2) on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return PortBlock {
                    first: Self::BASE + block * Self::SIZE,
                    _lock: file,
                };
            }
        }
        panic!("all {} port blocks are taken (by as many daemons)", Self::COUNT);
    }

    fn last(&self) -> u16 {
        self.first + Self::SIZE - 1
    }
}

/// Runs `cmd` to completion with its output captured, killing it after `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = die_with_parent(cmd).spawn().map_err(|e| format!("cannot run: {e}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer in {limit:?}"));
            }
            Err(e) => return Err(format!("wait: {e}")),
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Whether dockerd answers `GET /_ping` on `socket`.
fn ping(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
}

/// Makes bridge `name` with the gateway address of a /24 no route or address
/// of the host overlaps (`10.<200..=254>.<0..=255>.0/24`, derived from the
/// name and the attempt); returns the subnet's middle octets.
fn make_bridge(name: &str, netns: Option<&str>) -> [u8; 2] {
    let ip = |args: &[&str]| ip_in(netns, args);
    ip(&["link", "add", name, "type", "bridge"]);
    for attempt in 0..64u32 {
        let mut h = std::hash::DefaultHasher::new();
        (name, attempt).hash(&mut h);
        let h = h.finish();
        let subnet = [200 + (h % 55) as u8, (h >> 8) as u8];
        let net = Ipv4Addr::new(10, subnet[0], subnet[1], 0);
        if ipv4_in_use(net, 24, name, netns).is_some() {
            continue;
        }
        ip(&[
            "addr",
            "add",
            &format!("10.{}.{}.1/24", subnet[0], subnet[1]),
            "dev",
            name,
        ]);
        // Another process may have taken the same /24 at the same moment:
        // whoever sees the other gives it up and tries another.
        if let Some(other) = ipv4_in_use(net, 24, name, netns) {
            eprintln!(
                "dockerd {name}: 10.{}.{}.0/24 is also on {other}; trying another",
                subnet[0], subnet[1]
            );
            ip(&["addr", "flush", "dev", name]);
            std::thread::sleep(Duration::from_millis(10 + h % 50));
            continue;
        }
        ip(&["link", "set", name, "up"]);
        return subnet;
    }
    let _ = Command::new("ip")
        .args(netns.map(|ns| ["-n", ns]).iter().flatten())
        .args(["link", "del", name])
        .status();
    panic!("found no free 10.2xx.y.0/24 for bridge {name} in 64 tries");
}

/// `ip [-n <netns>] <args>`, which must succeed.
fn ip_in(netns: Option<&str>, args: &[&str]) {
    let out = Command::new("ip")
        .args(netns.map(|ns| ["-n", ns]).iter().flatten())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An IPv4 address or route of the host (any table) overlapping
/// `net/len`, on a device other than `except_dev`: what it is, for messages.
fn ipv4_in_use(net: Ipv4Addr, len: u8, except_dev: &str, netns: Option<&str>) -> Option<String> {
    let overlaps = |prefix: &str| -> bool {
        let (addr, plen) = prefix.split_once('/').unwrap_or((prefix, "32"));
        let (Ok(addr), Ok(plen)) = (addr.parse::<Ipv4Addr>(), plen.parse::<u8>()) else {
            return false;
        };
        let shorter = plen.min(len);
        let mask = if shorter == 0 { 0 } else { u32::MAX << (32 - shorter) };
        u32::from(addr) & mask == u32::from(net) & mask
    };
    let lines = |args: &[&str]| -> Vec<String> {
        Command::new("ip")
            .args(netns.map(|ns| ["-n", ns]).iter().flatten())
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect())
            .unwrap_or_default()
    };
    // "3: eth0    inet 192.0.2.2/24 brd ... scope global eth0"
    for line in lines(&["-4", "-o", "addr", "show"]) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 3 && f[1] != except_dev && overlaps(f[3]) {
            return Some(format!("address {} on {}", f[3], f[1]));
        }
    }
    // "10.1.0.0/24 dev br0 ...", "local 10.1.0.1 dev br0 table local ...", "default via ..."
    for line in lines(&["-4", "route", "show", "table", "all"]) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let kinds = [
            "unicast",
            "local",
            "broadcast",
            "multicast",
            "anycast",
            "unreachable",
            "blackhole",
            "prohibit",
            "throw",
            "nat",
        ];
        let dest = match f.first() {
            Some(k) if kinds.contains(k) => f.get(1).copied(),
            other => other.copied(),
        };
        let dev = f.iter().position(|w| *w == "dev").and_then(|i| f.get(i + 1)).copied();
        if let Some(dest) = dest
            && dest != "default"
            && dev != Some(except_dev)
            && overlaps(dest)
        {
            return Some(format!("route {line:?}"));
        }
    }
    None
}

/// Writes the app image's root file system as a tar file in `dir`: a static
/// busybox with every applet linked in /bin, /app, /www, /tmp and a minimal
/// /etc. Fails the test when busybox is missing or dynamically linked.
fn build_app_tar(dir: &Path) -> PathBuf {
    let busybox = require("busybox");
    let elf = std::fs::read(&busybox).unwrap_or_else(|e| panic!("read {}: {e}", busybox.display()));
    assert!(
        is_static_elf(&elf),
        "{} is dynamically linked and cannot run in a scratch image: install busybox-static (scripts/install-deps.sh)",
        busybox.display()
    );
    let root = dir.join("app-rootfs");
    let _ = std::fs::remove_dir_all(&root);
    for sub in ["bin", "www", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(sub)).unwrap_or_else(|e| panic!("create {}/{sub}: {e}", root.display()));
    }
    let write = |path: &str, content: &[u8], mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let path = root.join(path);
        std::fs::write(&path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    };
    write("bin/busybox", &elf, 0o755);
    write("app", APP_SCRIPT.as_bytes(), 0o755);
    write("www/index.html", b"wf-app\n", 0o644);
    write("www/health", b"ok\n", 0o644);
    write("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n", 0o644);
    write("etc/group", b"root:x:0:\n", 0o644);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .unwrap_or_else(|e| panic!("chmod {}/tmp: {e}", root.display()));
    }
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .unwrap_or_else(|e| panic!("run busybox --list: {e}"));
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            let link = root.join("bin").join(applet);
            std::os::unix::fs::symlink("busybox", &link).unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
        }
    }
    let tar = dir.join("app.tar");
    let out = Command::new(require("tar"))
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()
        .unwrap_or_else(|e| panic!("run tar: {e}"));
    assert!(
        out.status.success(),
        "tar of the app image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tar
}

/// Whether `elf` is an ELF executable without a program interpreter (static).
fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return false; // only 64-bit little-endian is handled
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        elf.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) != PT_INTERP)
    })
}

/// Removes what daemons of dead test processes left: directories named like
/// ours whose `owner` record (pid and start time) names a process that is
/// gone (its pid free, or now another process's). Run by the first
/// [`Dockerd::start`] of every process; safe to run at any time.
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(base_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !looks_like_ours(&name) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        // Only a directory with an owner record is ours (one being made has
        // none yet; a look-alike of someone else's has none at all).
        let Ok(owner) = std::fs::read_to_string(entry.path().join("owner")) else {
            continue;
        };
        let mut fields = owner.split_whitespace();
        let (Some(Ok(pid)), Some(Ok(started))) = (
            fields.next().map(str::parse::<u32>),
            fields.next().map(str::parse::<u64>),
        ) else {
            continue;
        };
        if start_time(pid) == Some(started) {
            continue; // its owner lives (our own process included)
        }
        let problems = cleanup(&name, &entry.path());
        if !problems.is_empty() {
            eprintln!("stale dockerd {name}: cleanup left {}", problems.join("; "));
        }
    }
}

/// One process (from /proc).
struct Proc {
    pid: i32,
    ppid: i32,
    zombie: bool,
    cmdline: String,
}

/// Every process of the host (this pid namespace).
fn processes() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (_, after_comm) = stat.rsplit_once(')')?;
            let mut f = after_comm.split_whitespace();
            let state = f.next()?;
            let ppid = f.next()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            Some(Proc {
                pid,
                ppid,
                zombie: matches!(state, "Z" | "X"),
                cmdline,
            })
        })
        .collect()
}

/// Where cgroup hierarchies are mounted (v1 controllers, v2, hybrid).
fn cgroup_roots() -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|(_, fs)| fs == "cgroup" || fs == "cgroup2")
        .map(|(point, _)| point)
        .collect()
}

/// The cgroup directories of daemon `name` (its parent, in every hierarchy
/// that has it).
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    cgroup_roots()
        .into_iter()
        .map(|r| r.join(name))
        .filter(|p| p.is_dir())
        .collect()
}

/// Pids in the cgroup trees under `dirs`.
fn cgroup_pids(dirs: &[PathBuf]) -> HashSet<i32> {
    fn walk(dir: &Path, pids: &mut HashSet<i32>) {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), pids);
                }
            }
        }
    }
    let mut pids = HashSet::new();
    for d in dirs {
        walk(d, &mut pids);
    }
    pids
}

/// Mount points and file system types, from /proc/self/mountinfo (octal
/// escapes decoded).
fn mounts() -> Vec<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let point = unescape_mount(f.get(4)?);
            let sep = f.iter().position(|w| *w == "-")?;
            Some((point, f.get(sep + 1)?.to_string()))
        })
        .collect()
}

fn unescape_mount(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(c) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(c);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Mount points at or under `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Live processes of daemon `dir`/`name`: those naming the directory in
/// their command line (dockerd, containerd, shims), those in its cgroup
/// parent (containers), and their descendants (docker-proxy, exec'd
/// commands).
fn daemon_processes(name: &str, dir: &Path) -> Vec<Proc> {
    let marker = format!("{}/", dir.display());
    let me = std::process::id() as i32;
    let procs = processes();
    let mut doomed: HashSet<i32> = procs
        .iter()
        .filter(|p| p.cmdline.contains(&marker))
        .map(|p| p.pid)
        .collect();
    doomed.extend(cgroup_pids(&cgroup_dirs(name)));
    loop {
        let before = doomed.len();
        for p in &procs {
            if doomed.contains(&p.ppid) {
                doomed.insert(p.pid);
            }
        }
        if doomed.len() == before {
            break;
        }
    }
    procs
        .into_iter()
        .filter(|p| doomed.contains(&p.pid) && !p.zombie && p.pid != me && p.pid > 1)
        .collect()
}

/// What remains of daemon `name` in `dir`: processes, mounts, network
/// devices, cgroups, the directory. Empty when it is all gone.
pub fn leftovers(name: &str, dir: &Path) -> Vec<String> {
    let mut left = Vec::new();
    for p in daemon_processes(name, dir) {
        left.push(format!("process {} ({})", p.pid, p.cmdline.trim()));
    }
    for m in mounts_under(dir) {
        left.push(format!("mount {}", m.display()));
    }
    if Path::new("/sys/class/net").join(name).exists() {
        left.push(format!("bridge {name}"));
    }
    for c in cgroup_dirs(name) {
        left.push(format!("cgroup {}", c.display()));
    }
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    left
}

/// Removes everything of daemon `name` in `dir`, its daemon already dead or
/// not: SIGKILLs its processes (until none is left, 10 s at most), lazily
/// unmounts what is mounted under `dir` (deepest first), deletes the veths
/// on its bridge and the bridge, removes its cgroups, then the directory
/// (kept when something else could not be removed, so that a later sweep
/// retries). Returns what is left (see [`leftovers`]).
fn cleanup(name: &str, dir: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let doomed = daemon_processes(name, dir);
        if doomed.is_empty() || Instant::now() > deadline {
            break;
        }
        for p in &doomed {
            // SAFETY: plain kill(2) on processes of this daemon.
            unsafe { libc::kill(p.pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    for _ in 0..5 {
        let mut points = mounts_under(dir);
        if points.is_empty() {
            break;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in points {
            if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) {
                // SAFETY: umount2 with a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }

    // Its bridge, and those of the networks made by `create_network`
    // (`<name>n<k>`), with their veths.
    let network_prefix = format!("{name}n");
    let bridges: Vec<std::ffi::OsString> = std::fs::read_dir("/sys/class/net")
        .map(|all| {
            all.flatten()
                .map(|e| e.file_name())
                .filter(|f| f.to_str().is_some_and(|f| f == name || f.starts_with(&network_prefix)))
                .collect()
        })
        .unwrap_or_default();
    for bridge in bridges {
        let net = Path::new("/sys/class/net").join(&bridge);
        if let Ok(ports) = std::fs::read_dir(net.join("brif")) {
            for port in ports.flatten() {
                let _ = Command::new("ip").arg("link").arg("del").arg(port.file_name()).output();
            }
        }
        let _ = Command::new("ip").arg("link").arg("del").arg(&bridge).output();
    }

    // A killed task leaves its cgroup a moment after it is reaped.
    let cg_deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let dirs = cgroup_dirs(name);
        if dirs.is_empty() || Instant::now() > cg_deadline {
            break;
        }
        for d in dirs {
            remove_cgroup_tree(&d);
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut left = leftovers(name, dir);
    if left.len() == 1 && left[0].starts_with("directory ") {
        let _ = std::fs::remove_dir_all(dir);
        left = leftovers(name, dir);
    }
    left
}

/// rmdir of a cgroup and its children, deepest first (cgroup directories
/// hold only control files, which rmdir takes with them).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// GETs `path` from `addr` until it answers 200 (within `limit`): the body.
/// Fails the test with the last error otherwise.
pub fn wait_http(addr: SocketAddr, path: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        match http_get(addr, path) {
            Ok(body) => return body,
            Err(e) if Instant::now() >= deadline => panic!("GET http://{addr}{path}: no 200 in {limit:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The container's short id: its default hostname, which the app serves at `/`.
fn short(id: &str) -> &str {
    &id[..12]
}

#[test]
fn docker_harness_serves_published_ports_and_drains_on_stop() {
    let t0 = Instant::now();
    let d = Dockerd::start();
    let started = t0.elapsed();
    let t1 = Instant::now();
    let image = d.app_image();
    let imported = t1.elapsed();
    let t2 = Instant::now();
    let a = d.run(&["-p", "127.0.0.1::8080", "-e", "DRAIN_SECONDS=1", image]);
    let ran = t2.elapsed();
    let b = d.run(&["-p", "8080", image]);
    eprintln!(
        "dockerd {}: start {started:?}, import {imported:?}, run {ran:?}",
        d.name()
    );

    let (addr_a, addr_b) = (d.published_addr(&a, "8080/tcp"), d.published_addr(&b, "8080/tcp"));
    assert_ne!(addr_a, addr_b);
    for addr in [addr_a, addr_b] {
        assert!(
            d.port_range().contains(&addr.port()),
            "{addr} is outside {:?}",
            d.port_range()
        );
    }
    let limit = Duration::from_secs(5);
    assert_eq!(
        wait_http(addr_a, "/", limit).trim(),
        short(&a),
        "a's page names its hostname"
    );
    assert_eq!(
        wait_http(addr_b, "/", limit).trim(),
        short(&b),
        "b's page names its hostname"
    );
    for ip in [d.inspect_ip(&a), d.inspect_ip(&b)] {
        let [x, y, z, _] = ip.octets();
        assert_eq!(
            format!("{x}.{y}.{z}.0/24"),
            d.subnet(),
            "{ip} is on the daemon's bridge"
        );
    }

    // Health flips from inside the container.
    assert_eq!(wait_http(addr_b, "/health", limit).trim(), "ok");
    d.docker(&["exec", &b, "rm", "/www/health"]);
    assert!(
        http_get(addr_b, "/health").is_err(),
        "/health still answers without /www/health"
    );
    assert!(
        d.try_docker(&["exec", &b, "wget", "-q", "-O-", "http://127.0.0.1:8080/health"])
            .is_err(),
        "the in-container probe still passes"
    );

    // `docker stop` drains for DRAIN_SECONDS, answering meanwhile, then exits 0.
    let stopping = Instant::now();
    let took = std::thread::scope(|s| {
        let stop = s.spawn(|| {
            d.docker(&["stop", &a]);
            stopping.elapsed()
        });
        // Once the app has the SIGTERM (it says so), it still answers.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !d.docker(&["logs", &a]).contains("wf-app: draining") {
            assert!(Instant::now() < deadline, "the app never got the SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
        let during = http_get(addr_a, "/").expect("a answers while draining");
        assert_eq!(during.trim(), short(&a), "a answers while draining");
        stop.join().expect("docker stop thread")
    });
    eprintln!("dockerd {}: docker stop with DRAIN_SECONDS=1 took {took:?}", d.name());
    assert!(
        took >= Duration::from_millis(900),
        "docker stop took {took:?}: no drain"
    );
    assert!(
        took < Duration::from_secs(5),
        "docker stop took {took:?}: SIGTERM not handled"
    );
    assert_eq!(d.docker(&["inspect", "--format", "{{.State.ExitCode}}", &a]), "0");
    d.rm_force(&[&a, &b]);
    assert_eq!(d.docker(&["ps", "-aq"]), "");
}

#[test]
fn docker_harness_two_daemons_at_once() {
    let started = Instant::now();
    let (d1, d2) = std::thread::scope(|s| {
        let one = s.spawn(Dockerd::start);
        let two = s.spawn(Dockerd::start);
        (one.join().expect("first daemon"), two.join().expect("second daemon"))
    });
    eprintln!("two daemons at once: up in {:?}", started.elapsed());
    assert_ne!(d1.bridge(), d2.bridge());
    assert_ne!(d1.subnet(), d2.subnet());
    assert_ne!(d1.socket_path(), d2.socket_path());
    let ids = std::thread::scope(|s| {
        let runs: Vec<_> = [&d1, &d2]
            .into_iter()
            .map(|d| s.spawn(move || d.run(&["-p", "127.0.0.1::8080", d.app_image()])))
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("docker run thread"))
            .collect::<Vec<_>>()
    });
    for (d, id) in [(&d1, &ids[0]), (&d2, &ids[1])] {
        let [x, y, z, _] = d.inspect_ip(id).octets();
        assert_eq!(format!("{x}.{y}.{z}.0/24"), d.subnet());
        let body = wait_http(d.published_addr(id, "8080/tcp"), "/", Duration::from_secs(5));
        assert_eq!(body.trim(), short(id));
        // Each daemon sees only its own container.
        assert_eq!(d.docker(&["ps", "-q", "--no-trunc"]), *id);
    }
}

#[test]
fn docker_harness_restart_keeps_containers() {
    let mut d = Dockerd::start();
    let image = d.app_image();
    let always = d.run(&["--restart=always", "-p", "127.0.0.1::8080", image]);
    let plain = d.run(&[image]);
    wait_http(d.published_addr(&always, "8080/tcp"), "/", Duration::from_secs(5));
    let pid_before = d.pid();
    let t = Instant::now();
    d.restart();
    eprintln!("dockerd {}: restart took {:?}", d.name(), t.elapsed());
    assert_ne!(d.pid(), pid_before, "a new dockerd runs");
    let listed = d.docker(&["ps", "-aq", "--no-trunc"]);
    for id in [&always, &plain] {
        assert!(listed.contains(id.as_str()), "{id} is gone after the restart: {listed}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.docker(&["inspect", "--format", "{{.State.Running}}", &always]) != "true" {
        assert!(
            Instant::now() < deadline,
            "the --restart=always container did not come back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its port was chosen anew; the app answers there.
    let body = wait_http(d.published_addr(&always, "8080/tcp"), "/", Duration::from_secs(5));
    assert_eq!(body.trim(), short(&always));
    assert_eq!(
        d.docker(&["inspect", "--format", "{{.State.Running}}", &plain]),
        "false"
    );
}

#[test]
fn docker_harness_drop_leaves_nothing() {
    let d = Dockerd::start();
    let image = d.app_image();
    let id = d.run(&["-p", "127.0.0.1::8080", image]);
    d.run(&[image, "sleep", "600"]);
    let addr = d.published_addr(&id, "8080/tcp");
    wait_http(addr, "/", Duration::from_secs(5));
    let (name, dir) = (d.name().to_string(), d.dir().to_path_buf());
    let container_pid: i32 = d
        .docker(&["inspect", "--format", "{{.State.Pid}}", &id])
        .parse()
        .expect("a container pid");
    let veths: Vec<_> = std::fs::read_dir(Path::new("/sys/class/net").join(&name).join("brif"))
        .expect("the bridge has ports")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(veths.len(), 2, "one veth per container");
    let before = leftovers(&name, &dir);
    let has = |what: &str| before.iter().any(|l| l.starts_with(what));
    assert!(
        has("process ") && has("cgroup ") && has("bridge "),
        "a running daemon has processes, cgroups and a bridge: {before:?}"
    );
    // Its mounts (overlays, network namespaces) stay in its mount namespace.
    assert_eq!(mounts_under(&dir), Vec::<PathBuf>::new());

    let t = Instant::now();
    drop(d);
    eprintln!("dockerd {name}: drop took {:?}", t.elapsed());
    assert_eq!(leftovers(&name, &dir), Vec::<String>::new());
    for v in &veths {
        assert!(!Path::new("/sys/class/net").join(v).exists(), "veth {v:?} is left");
    }
    let state = std::fs::read_to_string(format!("/proc/{container_pid}/stat")).unwrap_or_default();
    assert!(
        state.is_empty()
            || state
                .rsplit_once(')')
                .is_some_and(|(_, s)| s.trim_start().starts_with('Z')),
        "the container's process {container_pid} lives on: {state}"
    );
    assert!(http_get(addr, "/").is_err(), "the published port still answers");
}

#[test]
fn docker_harness_run_moves_past_taken_ports() {
    let d = Dockerd::start();
    let image = d.app_image();
    // dockerd tries its ports in order, 10 per start: with the first 25 of
    // its block taken (by anyone: another program may hold some), starts fail.
    let first = *d.port_range().start();
    let held: Vec<std::net::TcpListener> = (first..first + 25)
        .filter_map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
        .collect();
    let held_ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect();
    let id = d.run(&["-p", "127.0.0.1::8080", image]);
    let port = d.published_port(&id, "8080/tcp");
    assert!(!held_ports.contains(&port), "published on a port we hold: {port}");
    assert!(d.port_range().contains(&port), "{port} is outside {:?}", d.port_range());
    let body = wait_http(d.published_addr(&id, "8080/tcp"), "/", Duration::from_secs(5));
    assert_eq!(body.trim(), short(&id));
    // A --rm container is gone after a failed start: it is run again.
    let more: Vec<std::net::TcpListener> = (port + 1..port + 26)
        .filter_map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
        .collect();
    let more_ports: Vec<u16> = more
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect();
    let again = d.run(&["--rm", "-p", "127.0.0.1::8080", image]);
    let port = d.published_port(&again, "8080/tcp");
    assert!(!more_ports.contains(&port), "published on a port we hold: {port}");
    wait_http(d.published_addr(&again, "8080/tcp"), "/", Duration::from_secs(5));
    drop((held, more));
}

/// Set in the environment of the process [`docker_harness_sweeps_a_crashed_run`] crashes.
const CRASH_ENV: &str = "WF_DOCKER_HARNESS_CRASH";

/// Half of [`docker_harness_sweeps_a_crashed_run`]: in a child test process,
/// starts a daemon with a container and dies by SIGKILL (no Drop runs).
/// Until the parent has looked at the leftovers, its `owner` record names
/// the parent, so that no other test process sweeps them first.
#[test]
#[ignore = "run by docker_harness_sweeps_a_crashed_run in a process of its own"]
fn docker_harness_crash_child() {
    if std::env::var_os(CRASH_ENV).is_none() {
        return;
    }
    let d = Dockerd::start();
    let id = d.run(&["-p", "127.0.0.1::8080", d.app_image()]);
    wait_http(d.published_addr(&id, "8080/tcp"), "/", Duration::from_secs(5));
    let parent = std::os::unix::process::parent_id();
    let owner = d.dir().join("owner");
    let real = std::fs::read_to_string(&owner).expect("the owner record");
    let parent_start = start_time(parent).expect("the parent's start time");
    std::fs::write(&owner, format!("{parent} {parent_start}\n")).expect("write the owner record");
    println!("crashed-dockerd {} {} {}", d.name(), d.dir().display(), real.trim());
    let _ = std::io::stdout().flush();
    // SAFETY: kill(2) of this very process: the crash under test.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}

#[test]
fn docker_harness_sweeps_a_crashed_run() {
    let out = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([
            "docker::docker_harness_crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CRASH_ENV, "1")
        .stdin(Stdio::null())
        .output()
        .expect("run the crashing child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("crashed-dockerd "))
        .unwrap_or_else(|| {
            panic!(
                "the child made no daemon ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let mut fields = line.splitn(3, ' ');
    let (Some(name), Some(dir), Some(owner)) = (fields.next(), fields.next(), fields.next()) else {
        panic!("the child printed {line:?}");
    };
    let dir = Path::new(dir);
    // Whatever happens below, the leftovers go back to their dead owner
    // (from then on any sweep takes them).
    struct GiveBack<'a>(&'a Path, &'a str);
    impl Drop for GiveBack<'_> {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0.join("owner"), format!("{}\n", self.1));
        }
    }
    let give_back = GiveBack(dir, owner);
    // The crash left what only a sweep removes: the shim and container run on.
    let left = leftovers(name, dir);
    let has = |what: &str| left.iter().any(|l| l.starts_with(what));
    assert!(
        has("process ") && has("bridge ") && has("cgroup ") && has("directory "),
        "a crashed run leaves its shim, container, bridge, cgroups and directory: {left:?}"
    );
    drop(give_back);
    let t = Instant::now();
    sweep_stale();
    eprintln!("stale dockerd {name}: swept in {:?} (had {left:?})", t.elapsed());
    // Another test process may be sweeping it too: wait for whoever is last.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = leftovers(name, dir);
        if now.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the sweep left {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
